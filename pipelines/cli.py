"""kdp: the command line of the pipeline.

    kdp run [--data URI] [--out DIR] [...]   the whole pipeline, locally, with kfp.local
    kdp detect --data COCO_JSON --images DIR  the detection pipeline, locally (or --data YOLO_ROOT)
    kdp stage NAME [flags]                    one stage (the per-stage rerun)
    kdp demo-data DEST                        write the generated demo ImageFolder
    kdp compile --image IMAGE [-o FILE]       the KFP pipeline YAML for a cluster (GPUs, secrets, ...)
    kdp schedule --host URL --pipeline-package FILE --experiment NAME --cron CRON --name NAME
                                              a recurring run on a KFP server

Without --data, kdp run generates the demo dataset and uses the demo
settings, sized to finish in minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kd_lib.config import ConfigError
from pipelines import detection, pixel_distillation
from pipelines.cluster import ClusterOptions, add_cluster_arguments, options_from_args
from pipelines.pixel_distillation import DEFAULT_IMAGE, DEFAULT_SETTINGS, STUDENT_METHODS

STAGE_MODULES = {
    "prepare-data": "components.prepare_data",
    "teacher": "components.teacher",
    "assistant": "components.assistant",
    "student": "components.student",
    "lr-baseline": "components.lr_baseline",
    "detector": "components.detector",
    "afp": "components.afp",
    "evaluate": "components.evaluate",
}
#: ``--set STAGE.FIELD=VALUE`` stage names -> keys of the pipeline's ``*_settings`` parameters.
SETTINGS_KEYS = {
    "prepare-data": "prepare",
    "teacher": "teacher",
    "assistant": "assistant",
    "student": "student",
    "student-onestage": "onestage",
    "lr-baseline": "lr_baseline",
    "evaluate": "evaluate",
}
TRAINING_STAGES = ("teacher", "assistant", "student", "student-onestage", "lr-baseline")
#: The same for the detection pipeline.
DETECTION_SETTINGS_KEYS = {"prepare-data": "prepare", "teacher": "teacher", "afp": "afp", "msad": "msad",
                           "lr-baseline": "lr_baseline", "evaluate": "evaluate"}
DETECTION_TRAINING_STAGES = ("teacher", "afp", "msad", "lr-baseline")

#: ``kdp compile --pipeline NAME``: the pipeline builder and its checked-in YAML.
PIPELINES = {
    "classification": (pixel_distillation.build_pipeline, "pipelines/pixel_distillation.yaml"),
    "detection": (detection.build_pipeline, "pipelines/detection_distillation.yaml"),
}

#: The demo: the generated dataset at 64 px, students at 16 px, a few minutes on 2 CPU cores. Trained
#: from scratch on 1,200 images, the models need many small steps: batch 32, and lr 0.02 where the
#: defaults say 0.05 (with which the teacher's loss jumps to several times chance in its first epoch).
DEMO_DATA = {"seed": 0, "num_classes": 8, "train_per_class": 150, "val_per_class": 50, "size": 64}
DEMO_SETTINGS = {"teacher": {"epochs": 10, "lr": 0.02, "batch_size": 32},
                 "assistant": {"epochs": 6, "lr": 0.02, "batch_size": 32},
                 "student": {"epochs": 6, "batch_size": 32}, "onestage": {"epochs": 6, "batch_size": 32},
                 "lr_baseline": {"epochs": 6, "lr": 0.02, "batch_size": 32}, "evaluate": {"latency_repeats": 5}}


def parse_setting(text: str, keys: dict[str, str] = SETTINGS_KEYS) -> tuple[str, str, str]:
    """``STAGE.FIELD=VALUE`` -> (settings key, field, value)."""
    target, sep, value = text.partition("=")
    stage, dot, field = target.partition(".")
    if not sep or not dot or stage not in keys:
        raise ConfigError("--set", f"expected STAGE.FIELD=VALUE with STAGE one of "
                          f"{', '.join(keys)}, got {text!r}")
    return keys[stage], field, value


def merged_settings(args: argparse.Namespace, defaults: dict, keys: dict[str, str], training: tuple[str, ...],
                    overrides: dict | None = None) -> dict[str, dict]:
    """Each stage's settings: ``defaults``, then ``overrides``, then ``--epochs`` and ``--set``."""
    settings = {key: dict(value) for key, value in defaults.items()}
    for key, value in (overrides or {}).items():
        settings[key].update(value)
    if args.epochs is not None:
        for stage in training:
            settings[keys[stage]]["epochs"] = args.epochs
    for text in args.set:
        key, field, value = parse_setting(text, keys)
        settings[key][field] = value
    return {f"{key}_settings": value for key, value in settings.items()}


def shared_params(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def pipeline_params(args: argparse.Namespace, source: str) -> dict:
    """The pipeline's parameters: its defaults, the demo's when there is no
    ``--data``, then the command line, merged field by field."""
    settings = merged_settings(args, DEFAULT_SETTINGS, SETTINGS_KEYS, TRAINING_STAGES,
                               DEMO_SETTINGS if args.data is None else None)
    return {"source": source, **settings,
            **shared_params(args, ("hr_size", "ratio", "seed", "teacher_arch", "student_arch"))}


def detection_params(args: argparse.Namespace) -> dict:
    """The detection pipeline's parameters: its defaults, then the command line."""
    source = args.data if "://" in args.data else str(Path(args.data).resolve())
    images = args.images and (args.images if "://" in args.images else str(Path(args.images).resolve()))
    return {"source": source, **({"images": images} if images else {}),
            **merged_settings(args, detection.DEFAULT_SETTINGS, DETECTION_SETTINGS_KEYS, DETECTION_TRAINING_STAGES),
            **shared_params(args, ("image_size", "ratio", "seed", "kind", "teacher_backbone", "student_backbone"))}


def check_params(params: dict) -> None:
    """Build every stage's config once before anything runs, so a bad field
    fails in a second rather than after the teacher has trained."""
    from components.kfp_entry import stage_config

    shared = {k: params[k] for k in ("hr_size", "ratio", "seed") if k in params}
    wiring = {"data": "-", "out": "-", **shared}
    stage_config("teacher", params.get("teacher_settings", {}), **wiring)
    stage_config("assistant", params.get("assistant_settings", {}), teacher="-", **wiring)
    for key, source in (("student", "assistant"), ("onestage", "teacher")):
        settings = {"method": STUDENT_METHODS[key], **params.get(f"{key}_settings", {})}
        stage_config("student", settings, **{source: "-"}, **wiring)
    stage_config("lr-baseline", params.get("lr_baseline_settings", {}), **wiring)
    stage_config("evaluate", params.get("evaluate_settings", {}), data="-", out="-", models={"m": "-"},
                 **{k: v for k, v in shared.items() if k != "seed"})


def check_detection_params(params: dict) -> None:
    """Build every detection stage's config once before anything runs."""
    from components.kfp_entry import stage_config

    shared = {k: params[k] for k in ("ratio", "seed", "kind") if k in params}
    prepare = {k: params[k] for k in ("images", "image_size") if k in params}
    stage_config("prepare-data", params["prepare_settings"], source=params["source"], out="-", **prepare)
    stage_config("detector", params["teacher_settings"], data="-", out="-", view="hr", **shared)
    for key, method in (("afp", "afp"), ("msad", "msad")):
        stage_config("afp", params[f"{key}_settings"], data="-", out="-", teacher="-", method=method, **shared)
    stage_config("detector", params["lr_baseline_settings"], data="-", out="-", view="lr", **shared)
    stage_config("evaluate", params["evaluate_settings"], data="-", out="-", models={"m": "-"})


def print_result(paths: dict[str, Path]) -> None:
    from kd_lib.eval.report import format_table

    summary = json.loads(paths["summary.json"].read_text())
    print()
    print(format_table(summary))
    print(f"\nsummary: {paths['summary.json']}\nreport:  {paths['report.html']}")


def cmd_detect(args: argparse.Namespace) -> int:
    from pipelines.local import run_pipeline

    params = detection_params(args)
    check_detection_params(params)
    name = Path(args.data.rstrip("/")).stem if args.data.endswith(".json") else Path(args.data.rstrip("/")).name
    print_result(run_pipeline(params, args.out or f"runs/detection-{name}", detection.build_pipeline))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.local import run_pipeline

    out = Path(args.out or ("runs/demo" if args.data is None else f"runs/{Path(args.data.rstrip('/')).name}"))
    source = args.data
    if source is None:
        from kd_lib.data.demo import generate_demo_dataset

        source = str((out / "demo-data").resolve())
        generate_demo_dataset(source, **DEMO_DATA)
    elif "://" not in source:
        source = str(Path(source).resolve())
    params = pipeline_params(args, source)
    check_params(params)
    print_result(run_pipeline(params, out))
    return 0


def compile_pipeline(pipeline: str, path: str | Path, image: str = DEFAULT_IMAGE,
                     options: ClusterOptions | None = None) -> Path:
    """Compile ``pipeline`` (a :data:`PIPELINES` key) for ``image`` with ``options`` (default:
    :class:`ClusterOptions`' defaults) to the YAML file ``path``. The same inputs give the same bytes."""
    from kfp import compiler

    build, _ = PIPELINES[pipeline]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(image, options or ClusterOptions()), str(path))
    stabilize_header(path)
    return path


def stabilize_header(path: Path) -> None:
    """Rewrite the comment KFP puts on top of a compiled pipeline from the YAML below it.

    KFP prints dict defaults there in protobuf map order, which changes from one
    process to the next; the YAML itself is written with sorted keys.
    """
    import yaml
    from kfp.compiler.pipeline_spec_builder import extract_comments_from_pipeline_spec

    lines = path.read_text().splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    body = "".join(lines[header:])
    spec = next(yaml.safe_load_all(body))
    path.write_text(extract_comments_from_pipeline_spec(spec, spec["pipelineInfo"].get("description")) + body)


def cmd_compile(args: argparse.Namespace) -> int:
    path = compile_pipeline(args.pipeline, args.output or PIPELINES[args.pipeline][1], args.image,
                            options_from_args(args))
    print(f"{args.pipeline} pipeline for {args.image}: {path}")
    return 0


def cmd_schedule(args: argparse.Namespace, client_factory=None) -> int:
    """Create the recurring run (``client_factory``: ``kfp.Client`` unless told otherwise), or print it."""
    from pipelines import schedule

    if args.max_concurrency < 1:
        raise ConfigError("--max-concurrency", f"must be >= 1, got {args.max_concurrency}", "kdp schedule")
    plan = schedule.Schedule(
        host=args.host, package=args.pipeline_package, experiment=args.experiment,
        cron=schedule.check_cron(args.cron), name=args.name, max_concurrency=args.max_concurrency,
        params=schedule.parse_params(args.param, schedule.package_parameters(args.pipeline_package)))
    if args.dry_run:
        print(schedule.dry_run_text(plan))
        return 0
    if client_factory is None:
        import kfp

        client_factory = kfp.Client
    run = schedule.create(plan, client_factory)
    print(f"recurring run {args.name!r}: {run.recurring_run_id}")
    return 0


def cmd_stage(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    return importlib.import_module(STAGE_MODULES[args.name]).main(rest)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from kd_lib.data.demo import generate_demo_dataset

    info = generate_demo_dataset(args.dest, seed=args.seed, **{k: v for k, v in DEMO_DATA.items() if k != "seed"})
    print(f"{args.dest}: {len(info['classes'])} classes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline locally (kfp.local)")
    run.add_argument("--data", help="ImageFolder root (path or URI) with train/ and val/; default: the demo")
    run.add_argument("--out", help="run folder (default: runs/demo or runs/<data folder name>)")
    run.add_argument("--hr-size", type=int)
    run.add_argument("--ratio", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--teacher-arch")
    run.add_argument("--student-arch")
    run.add_argument("--epochs", type=int, help="epochs of every training stage")
    run.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                     help="a stage setting, e.g. --set teacher.lr=0.1 (repeatable)")
    detect = sub.add_parser("detect", help="run the detection pipeline locally (kfp.local)")
    detect.add_argument("--data", required=True, help="COCO instances JSON, or a YOLO root (path or URI)")
    detect.add_argument("--images", help="the folder of the COCO JSON's images")
    detect.add_argument("--out", help="run folder (default: runs/detection-<data name>)")
    detect.add_argument("--image-size", type=int, help="letterbox side of the HR images (default 256)")
    detect.add_argument("--ratio", type=int)
    detect.add_argument("--seed", type=int)
    detect.add_argument("--kind", choices=("fcos", "retinanet"))
    detect.add_argument("--teacher-backbone")
    detect.add_argument("--student-backbone")
    detect.add_argument("--epochs", type=int, help="epochs of every training stage")
    detect.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                        help=f"a stage setting; STAGE is one of {', '.join(DETECTION_SETTINGS_KEYS)}")
    stage = sub.add_parser("stage", help="run one stage; `kdp stage NAME --help` lists its fields",
                           add_help=False)
    stage.add_argument("name", choices=sorted(STAGE_MODULES))
    demo = sub.add_parser("demo-data", help="write the generated demo dataset to DEST")
    demo.add_argument("dest")
    demo.add_argument("--seed", type=int, default=0)
    compile_ = sub.add_parser("compile", help="compile a pipeline to KFP v2 YAML for a cluster")
    compile_.add_argument("--pipeline", choices=sorted(PIPELINES), default="classification")
    compile_.add_argument("--image", default=DEFAULT_IMAGE,
                          help=f"REGISTRY/IMAGE:TAG of every task (default: {DEFAULT_IMAGE})")
    compile_.add_argument("-o", "--output", help="the YAML file (default: "
                          + "; ".join(f"{name}: {path}" for name, (_, path) in PIPELINES.items()) + ")")
    add_cluster_arguments(compile_)
    sched = sub.add_parser("schedule", help="create a KFP recurring run of a compiled pipeline")
    sched.add_argument("--host", required=True, help="the KFP API endpoint, e.g. http://localhost:8080")
    sched.add_argument("--pipeline-package", required=True, help="the compiled YAML (kdp compile)")
    sched.add_argument("--experiment", required=True, help="experiment name (created if missing)")
    sched.add_argument("--cron", required=True,
                       help="KFP cron expression, 6 fields, seconds first: '0 0 3 * * *' is 03:00 daily")
    sched.add_argument("--name", required=True, help="the recurring run's name")
    sched.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a pipeline parameter (repeatable); STRUCT values are JSON")
    sched.add_argument("--max-concurrency", type=int, default=1, help="runs at once (default: 1)")
    sched.add_argument("--dry-run", action="store_true",
                       help="print the kfp recurring-run create command and the parameters instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "stage":
        return cmd_stage(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        commands = {"run": cmd_run, "detect": cmd_detect, "demo-data": cmd_demo_data, "compile": cmd_compile,
                    "schedule": cmd_schedule}
        return commands[args.command](args)
    except ConfigError as err:
        print(f"kdp: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"kdp: {args.command} failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kdp: interrupted; the stage that was training saved a checkpoint: run the same command "
              "again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
