"""kdp: the command line of the pipeline.

    kdp run [--data URI] [--out DIR] [...]   the whole pipeline, locally, with kfp.local
    kdp detect [--data COCO_JSON --images DIR] the detection pipeline, locally (or --data YOLO_ROOT)
    kdp stage NAME [flags]                    one stage (the per-stage rerun)
    kdp demo-data DEST                        write the generated demo ImageFolder
    kdp compile --image IMAGE [-o FILE]       the KFP pipeline YAML for a cluster (GPUs, secrets, ...)
    kdp schedule --host URL --pipeline-package FILE --experiment NAME --cron CRON --name NAME
                                              a recurring run on a KFP server

Without --data, kdp run and kdp detect generate their demo dataset and use
the demo settings, sized to finish in minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

from kd_lib.config import ConfigError
from kd_lib.errors import guarded, take_debug_flag
from pipelines import detection, pixel_distillation
from pipelines.cluster import ClusterOptions, add_cluster_arguments, options_from_args
from pipelines.tasks import parameters, plan

#: ``kdp compile --pipeline NAME``: the pipeline builder and its checked-in YAML.
PIPELINES = {
    "classification": (pixel_distillation.build_pipeline, "pipelines/pixel_distillation.yaml"),
    "detection": (detection.build_pipeline, "pipelines/detection_distillation.yaml"),
}

#: The demo: the generated dataset at 64 px, students at 16 px, 6 minutes on 2 AVX-512 CPU cores.
DEMO_DATA = {"seed": 0, "num_classes": 8, "train_per_class": 150, "val_per_class": 30, "size": 64}
#: The HR models train at lr 0.02: at the pipeline's 0.05, a from-scratch teacher on this data can sit
#: at chance for its first epochs and end without the stripes; at 0.02 it is within a point of its end
#: after 4 epochs. Every LR model trains at the students' lr (Pixel Distillation's 0.01) for 10 epochs,
#: the LR baseline included, so that the table compares methods, not learning rates or schedules; in 6
#: epochs the students had not yet learned the cue that the HR models give them. The TAS student starts
#: fresh and is distilled from the assistant: at 16 px a ResNet-18's maps are 1x1 from layer3 on, and
#: the assistant's 64 px weights are a worse start than random ones (docs/demo.md says why).
DEMO_SETTINGS = {"teacher": {"epochs": 5, "lr": 0.02}, "assistant": {"epochs": 5, "lr": 0.02},
                 "student": {"epochs": 10, "start_from_assistant": False},
                 "onestage": {"epochs": 10}, "lr_baseline": {"epochs": 10, "lr": 0.01},
                 "evaluate": {"latency_repeats": 5}}

#: The detection demo: the generated detection set at 128 px (320 train, 80 val images, 4 classes),
#: LR at 64 px, ResNet-18 FCOS with a 128-channel pyramid and head (4x fewer head FLOPs than 256). The
#: teacher trains 6 epochs: with 4, seed 1's reached 27.5 AP, still rising (47.9 after 6). The AFP
#: student trains as many epochs as the LR baseline (6): with 3 it was level with the baseline.
DETECTION_DEMO_DATA = {"seed": 0, "num_classes": 4, "train_images": 320, "val_images": 80, "size": 128,
                       "max_objects": 4}
DETECTION_DEMO_PARAMS = {"image_size": 128, "ratio": 2, "teacher_backbone": "resnet18", "fpn_channels": 128}
DETECTION_DEMO_SETTINGS = {"teacher": {"epochs": 6}, "afp": {"epochs": 6, "assistant_epochs": 6},
                           "msad": {"epochs": 3, "assistant_epochs": 2, "msad_ramp_iters": 50},
                           "lr_baseline": {"epochs": 6}, "evaluate": {"latency_repeats": 5}}


def parse_setting(text: str, tasks: dict[str, str]) -> tuple[str, str, str]:
    """``TASK.FIELD=VALUE`` -> (the task's settings parameter, field, value); ``tasks``: the
    pipeline's task names -> their settings parameters."""
    target, sep, value = text.partition("=")
    task, dot, field = target.partition(".")
    if not sep or not dot or task not in tasks:
        raise ConfigError("--set", f"expected STAGE.FIELD=VALUE with STAGE one of "
                          f"{', '.join(tasks)}, got {text!r}")
    return tasks[task], field, value


def merged_settings(args: argparse.Namespace, pipeline, overrides: dict | None = None) -> dict[str, dict]:
    """The settings parameter of each stage task of ``pipeline``: its default, then ``overrides``
    (settings key -> fields), then ``--set``."""
    tasks = plan(pipeline, {})
    defaults = parameters(pipeline)
    settings = {task.settings: dict(defaults[task.settings].get("defaultValue", {})) for task in tasks}
    for key, value in (overrides or {}).items():
        settings[f"{key}_settings"].update(value)
    for text in args.set:
        param, field, value = parse_setting(text, {task.name: task.settings for task in tasks})
        settings[param][field] = value
    return settings


def shared_params(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def pipeline_params(args: argparse.Namespace, source: str, pipeline) -> dict:
    """The classification pipeline's parameters: its defaults, the demo's when there is no
    ``--data``, then the command line, merged field by field."""
    return {"source": source, **merged_settings(args, pipeline, DEMO_SETTINGS if args.data is None else None),
            **shared_params(args, ("hr_size", "ratio", "seed", "teacher_arch", "student_arch", "teacher_weights",
                                   "student_weights", "epochs", "min_teacher_margin"))}


def detection_params(args: argparse.Namespace, source: str, pipeline) -> dict:
    """The detection pipeline's parameters: its defaults, the detection demo's when there is no
    ``--data``, then the command line, merged field by field."""
    demo = args.data is None
    images = args.images and (args.images if "://" in args.images else str(Path(args.images).resolve()))
    return {"source": source, **({"images": images} if images else {}),
            **merged_settings(args, pipeline, DETECTION_DEMO_SETTINGS if demo else None),
            **(DETECTION_DEMO_PARAMS if demo else {}),
            **shared_params(args, ("image_size", "ratio", "seed", "kind", "teacher_backbone", "student_backbone",
                                   "fpn_channels", "teacher_backbone_weights", "student_backbone_weights",
                                   "epochs"))}


def print_result(paths: dict[str, Path]) -> None:
    from kd_lib.eval.report import format_table
    from kd_lib.eval.verdicts import verdict_lines

    summary = json.loads(paths["summary.json"].read_text())
    print()
    print(format_table(summary))
    lines = verdict_lines(summary)
    if lines:
        print("\n" + "\n".join(lines))
    print(f"\nsummary: {paths['summary.json']}\nreport:  {paths['report.html']}")
    if "model" in paths:
        from pipelines.local import MODEL_FILES

        print("model:   " + ", ".join(str(paths["model"] / name) for name in MODEL_FILES))


def cmd_detect(args: argparse.Namespace) -> int:
    from pipelines.local import run_pipeline

    if args.data is None:
        if args.images:
            raise ConfigError("--images", "goes with --data COCO_JSON; without --data the demo data is generated")
        name = "demo"
    else:
        path = Path(args.data.rstrip("/"))
        name = path.stem if args.data.endswith(".json") else path.name
    out = Path(args.out or f"runs/detection-{name}")
    source = args.data or str((out / "demo-data").resolve())
    if "://" not in source:
        source = str(Path(source).resolve())
    pipeline = detection.build_pipeline()
    params = detection_params(args, source, pipeline)
    plan(pipeline, params)  # every task's settings, checked before anything runs
    check_runner(args.runner)
    if args.data is None:
        from kd_lib.data.detection_demo import generate_detection_demo

        generate_detection_demo(source, **DETECTION_DEMO_DATA)
    print_result(run_pipeline(params, out, pipeline, args.runner))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.local import run_pipeline

    out = Path(args.out or ("runs/demo" if args.data is None else f"runs/{Path(args.data.rstrip('/')).name}"))
    source = args.data
    if source is None:
        source = str((out / "demo-data").resolve())
    elif "://" not in source:
        source = str(Path(source).resolve())
    pipeline = pixel_distillation.build_pipeline()
    params = pipeline_params(args, source, pipeline)
    plan(pipeline, params)  # every task's settings, checked before anything runs
    check_runner(args.runner)
    if args.data is None:
        from kd_lib.data.demo import generate_demo_dataset

        generate_demo_dataset(source, **DEMO_DATA)
    print_result(run_pipeline(params, out, pipeline, args.runner))
    return 0


def compile_pipeline(pipeline: str, path: str | Path, options: ClusterOptions | None = None) -> Path:
    """Compile ``pipeline`` (a :data:`PIPELINES` key) with ``options`` (default: :class:`ClusterOptions`'
    defaults, the images included) to the YAML file ``path``. The same inputs give the same bytes."""
    from kfp import compiler

    build, _ = PIPELINES[pipeline]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(options or ClusterOptions()), str(path))
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
    options = options_from_args(args)
    path = compile_pipeline(args.pipeline, args.output or PIPELINES[args.pipeline][1], options)
    print(f"{args.pipeline} pipeline for {options.image_train} (training) and {options.image_cpu} (CPU): {path}")
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


def stage_list() -> str:
    """``kdp stage --help``: each stage with the first line of its module's docstring."""
    from components.stage import stages

    lines = ["usage: kdp stage NAME [--config YAML] [flags]   (kdp stage NAME --help: its flags)", "", "stages:"]
    for name, stage in stages().items():
        summary = (sys.modules[stage.run.__module__].__doc__ or "").strip().split("\n")[0]
        lines.append(f"  {name:<14}{summary.partition(': ')[2] or summary}")
    return "\n".join(lines)


def cmd_stage(args: argparse.Namespace, rest: list[str]) -> int:
    from components.stage import find

    if args.name is None:
        help_asked = bool({"-h", "--help"} & set(rest))
        print(stage_list(), file=sys.stdout if help_asked else sys.stderr)
        return 0 if help_asked else 2
    try:
        stage = find(args.name)
    except ConfigError as err:
        print(f"kdp: error: {err}", file=sys.stderr)
        return 2
    return stage.main(rest)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from kd_lib.data.demo import generate_demo_dataset

    info = generate_demo_dataset(args.dest, seed=args.seed, **{k: v for k, v in DEMO_DATA.items() if k != "seed"})
    print(f"{args.dest}: {len(info['classes'])} classes")
    return 0


def check_runner(runner: str) -> None:
    """Fail now, before any data is made, when ``runner`` cannot run here."""
    if runner == "docker":
        from pipelines.docker_runner import check_engine

        check_engine()


def add_runner_argument(parser: argparse.ArgumentParser) -> None:
    from pipelines.local import RUNNERS

    parser.add_argument("--runner", choices=RUNNERS, default=RUNNERS[0],
                        help="where each task runs: subprocess (this Python environment, the default) or "
                             "docker (the container image of its role, as on a cluster; `make images` builds "
                             "them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kdp {version('kd-pipeline')}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline locally (kfp.local)")
    run.add_argument("--data", help="ImageFolder root (path or URI) with train/ and val/; default: the demo")
    run.add_argument("--out", help="run folder (default: runs/demo or runs/<data folder name>)")
    run.add_argument("--hr-size", type=int)
    run.add_argument("--ratio", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--teacher-arch")
    run.add_argument("--student-arch")
    run.add_argument("--teacher-weights", help="where the teacher starts from: torchvision:DEFAULT, timm:TAG, "
                     "or a model folder / state dict / .safetensors URI (default: random)")
    run.add_argument("--student-weights", help="where the assistant, one-stage student and LR baseline start "
                     "from (the TAS student starts from the assistant)")
    run.add_argument("--epochs", type=int, help="epochs of every training stage")
    run.add_argument("--min-teacher-margin", type=float, metavar="POINTS",
                     help="train the assistant and the students only if the teacher's val top-1 beats the LR "
                          "baseline's by at least POINTS (default: off)")
    run.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                     help="a stage setting, e.g. --set teacher.lr=0.1 (repeatable)")
    add_runner_argument(run)
    detect = sub.add_parser("detect", help="run the detection pipeline locally (kfp.local)")
    detect.add_argument("--data", help="COCO instances JSON, or a YOLO root (path or URI); default: the "
                        "generated detection demo")
    detect.add_argument("--images", help="the folder of the COCO JSON's images")
    detect.add_argument("--out", help="run folder (default: runs/detection-demo or runs/detection-<data name>)")
    detect.add_argument("--image-size", type=int, help="letterbox side of the HR images (default 256)")
    detect.add_argument("--ratio", type=int)
    detect.add_argument("--seed", type=int)
    detect.add_argument("--kind", choices=("fcos", "retinanet"))
    detect.add_argument("--teacher-backbone")
    detect.add_argument("--student-backbone")
    detect.add_argument("--fpn-channels", type=int, help="width of every detector's pyramid and head (default 256)")
    detect.add_argument("--teacher-backbone-weights", help="where the teacher's backbone starts from: "
                        "torchvision:DEFAULT or a classification model folder / state dict URI (default: random)")
    detect.add_argument("--student-backbone-weights", help="the same for the students' backbones")
    detect.add_argument("--epochs", type=int, help="epochs of every training stage")
    detect.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                        help="a stage setting, e.g. --set afp.epochs=4 (repeatable)")
    add_runner_argument(detect)
    stage = sub.add_parser("stage", help="run one stage; `kdp stage --help` lists the stages, "
                           "`kdp stage NAME --help` the fields of one", add_help=False)
    stage.add_argument("name", nargs="?", metavar="NAME")
    demo = sub.add_parser("demo-data", help="write the generated demo dataset to DEST")
    demo.add_argument("dest")
    demo.add_argument("--seed", type=int, default=0)
    compile_ = sub.add_parser("compile", help="compile a pipeline to KFP v2 YAML for a cluster")
    compile_.add_argument("--pipeline", choices=sorted(PIPELINES), default="classification")
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
                       help="print a command that creates the same recurring run instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, debug = take_debug_flag(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "stage":
        return guarded("kdp", lambda: cmd_stage(args, rest + ["--debug"] * debug), debug)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    commands = {"run": cmd_run, "detect": cmd_detect, "demo-data": cmd_demo_data, "compile": cmd_compile,
                "schedule": cmd_schedule}
    return guarded("kdp", lambda: commands[args.command](args), debug, failures=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
