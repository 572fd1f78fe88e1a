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

from kd_lib.config import ConfigError, flag_name, flag_text
from kd_lib.errors import guarded, take_debug_flag
from pipelines import detection, pixel_distillation, sweep
from pipelines.cluster import ClusterOptions, add_cluster_arguments, options_from_args
from pipelines.dag import UNSET, Pipeline

#: ``kdp compile --pipeline NAME``: the pipeline's DAG table and its checked-in YAML.
PIPELINES = {
    "classification": (pixel_distillation.PIPELINE, "pipelines/pixel_distillation.yaml"),
    "detection": (detection.PIPELINE, "pipelines/detection_distillation.yaml"),
    "sweep": (sweep.PIPELINE, "pipelines/resolution_sweep.yaml"),
}
#: Typed parameters that ``kdp run`` and ``kdp detect`` set from --data and --out, not from a flag of their own.
NOT_FLAGS = ("source", "checkpoint_root", "code_version")

#: The demo: the generated dataset at 64 px, students at 16 px, 6 minutes on 2 AVX-512 CPU cores.
DEMO_DATA = {"seed": 0, "num_classes": 8, "train_per_class": 150, "val_per_class": 30, "size": 64}
#: What the demo changes of each task's settings, and nothing else. The HR models train 5 epochs at lr
#: 0.02: at the stages' 0.05, a from-scratch teacher on this data can sit at chance for its first epochs
#: and end without the stripes; at 0.02 it is within a point of its end after 4 epochs. Every LR model
#: keeps the stages' 10 epochs at Pixel Distillation's 0.01, the LR baseline included, so that the table
#: compares methods, not learning rates or schedules. The TAS student starts fresh and is distilled from
#: the assistant: at 16 px a ResNet-18's maps are 1x1 from layer3 on, and the assistant's 64 px weights
#: are a worse start than random ones (docs/demo.md says why).
DEMO_SETTINGS = {"teacher": {"epochs": 5, "lr": 0.02}, "assistant": {"epochs": 5, "lr": 0.02},
                 "student": {"start_from_assistant": False}, "evaluate": {"latency_repeats": 5}}

#: The detection demo: the generated detection set at 128 px (320 train, 80 val images, 4 classes),
#: LR at 64 px, ResNet-18 FCOS with a 128-channel pyramid and head (4x fewer head FLOPs than 256). The
#: teacher trains 6 epochs: with 4, seed 1's reached 27.5 AP, still rising (47.9 after 6). The AFP
#: student trains as many epochs as the LR baseline (6): with 3 it was level with the baseline.
DETECTION_DEMO_DATA = {"seed": 0, "num_classes": 4, "train_images": 320, "val_images": 80, "size": 128,
                       "max_objects": 4}
DETECTION_DEMO_PARAMS = {"image_size": 128, "ratio": 2, "teacher_backbone": "resnet18", "fpn_channels": 128}
DETECTION_DEMO_SETTINGS = {"teacher": {"epochs": 6}, "afp": {"epochs": 6, "assistant_epochs": 6},
                           "msad": {"epochs": 3, "assistant_epochs": 2, "msad_ramp_iters": 50},
                           "lr-baseline": {"epochs": 6}, "evaluate": {"latency_repeats": 5}}


#: ``kdp run``, ``kdp detect`` and ``kdp sweep``: the pipeline each runs (of the command line's arguments),
#: and its demo (typed parameters, settings).
LOCAL_RUNS = {"run": (lambda args: pixel_distillation.PIPELINE, ({}, DEMO_SETTINGS)),
              "detect": (lambda args: detection.PIPELINE, (DETECTION_DEMO_PARAMS, DETECTION_DEMO_SETTINGS)),
              "sweep": (lambda args: sweep.sweep_pipeline(tuple(args.ratios), tuple(args.student_archs)),
                        ({}, DEMO_SETTINGS))}


def named_tasks(pipeline: Pipeline, name: str) -> list:
    """The tasks ``name`` names in ``--set`` and the demo tables: the task of that name, else every task
    of the stage of that name (``student``: each cell's student of a sweep)."""
    named = [task for task in pipeline.tasks if task.name == name]
    return named or [task for task in pipeline.tasks if task.declaration.name == name]


def parse_setting(text: str, pipeline: Pipeline) -> tuple[list, str, str]:
    """``NAME.FIELD=VALUE`` -> (the tasks NAME names, field, value)."""
    target, sep, value = text.partition("=")
    name, dot, field = target.partition(".")
    tasks = named_tasks(pipeline, name) if sep and dot else []
    if not tasks:
        raise ConfigError("--set", f"expected TASK.FIELD=VALUE with TASK one of "
                          f"{', '.join(task.name for task in pipeline.tasks)} (or a stage's name: all its "
                          f"tasks), got {text!r}")
    return tasks, field, value


def merged_settings(args: argparse.Namespace, pipeline: Pipeline, overrides: dict | None = None) -> dict[str, dict]:
    """The settings parameter of each task of ``pipeline``: its default, then ``overrides``
    (task or stage name -> fields), then ``--set``."""
    settings = {task.settings_parameter: dict(task.settings) for task in pipeline.tasks}
    changes = [(named_tasks(pipeline, name), fields) for name, fields in (overrides or {}).items()]
    for text in args.set:
        tasks, field, value = parse_setting(text, pipeline)
        changes.append((tasks, {field: value}))
    for tasks, fields in changes:
        for task in tasks:
            settings[task.settings_parameter].update(fields)
    return settings


def typed_params(args: argparse.Namespace, pipeline: Pipeline) -> dict:
    """The typed parameters given on the command line (:func:`add_parameter_flags`)."""
    return {name: getattr(args, name) for name in pipeline.defaults
            if name not in NOT_FLAGS and getattr(args, name) is not None}


def pipeline_params(args: argparse.Namespace, source: str, pipeline: Pipeline, demo: tuple[dict, dict]) -> dict:
    """The parameters of a local run of ``pipeline``: its defaults, the ``demo``'s (typed parameters,
    settings) when there is no ``--data``, then the command line, merged field by field."""
    params, settings = demo if args.data is None else ({}, None)
    return {"source": source, **merged_settings(args, pipeline, settings), **params, **typed_params(args, pipeline)}


def print_result(paths: dict[str, Path]) -> None:
    from kd_lib.eval.report import format_table
    from kd_lib.eval.verdicts import verdict_lines

    summary = json.loads(paths["summary.json"].read_text())
    print()
    if summary["task"] == "sweep":
        print(sweep_answer(summary))
    else:
        print(format_table(summary))
        lines = verdict_lines(summary)
        if lines:
            print("\n" + "\n".join(lines))
    print(f"\nsummary: {paths['summary.json']}\nreport:  {paths['report.html']}")
    if "model" in paths:
        from pipelines.local import MODEL_FILES

        print("model:   " + ", ".join(str(paths["model"] / name) for name in MODEL_FILES))


def sweep_answer(summary: dict, budget=None) -> str:
    """A sweep's table and choice, from its summary; with ``budget`` (a :class:`kd_lib.eval.sweep.Budget`),
    the choice for that budget instead, and how to export it."""
    from kd_lib.eval.sweep import Cell, Choice, choose, format_table

    cells = [Cell.from_dict(cell) for cell in summary["cells"]]
    if budget is None:
        return format_table(cells, summary["reference_top1"], Choice.from_dict(summary["choice"], cells))
    choice = choose(cells, summary["reference_top1"], summary["reference_se"], budget)
    text = format_table(cells, summary["reference_top1"], choice)
    if choice.cell is not None:
        uri = summary["model_uris"][choice.cell.key]
        text += f"\nexport it: .venv/bin/kdp stage export --model {uri} --data {summary['data']} --out OUT"
    return text


def local_path(location: str) -> str:
    """A URI as given, a local path made absolute (the tasks run in other working folders)."""
    return location if "://" in location else str(Path(location).resolve())


def run_locally(args: argparse.Namespace, out: Path, generate) -> int:
    """Run the command's pipeline (:data:`LOCAL_RUNS`) on ``--data`` or, without it, on the data
    ``generate(folder)`` writes under ``out``, with its demo's parameters; every task's settings are
    checked before anything runs."""
    build, demo = LOCAL_RUNS[args.command]
    pipeline = build(args)
    source = local_path(args.data or str(out / "demo-data"))
    params = pipeline_params(args, source, pipeline, demo)
    if params.get("images"):
        params["images"] = local_path(params["images"])
    pipeline.plan(params)
    check_runner(args.runner)
    if args.data is None:
        generate(source)
    from pipelines.local import run_pipeline

    print_result(run_pipeline(params, out, pipeline.build(), args.runner))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from kd_lib.data.detection_demo import generate_detection_demo

    if args.data is None:
        if args.images:
            raise ConfigError("--images", "goes with --data COCO_JSON; without --data the demo data is generated")
        name = "demo"
    else:
        path = Path(args.data.rstrip("/"))
        name = path.stem if args.data.endswith(".json") else path.name
    return run_locally(args, Path(args.out or f"runs/detection-{name}"),
                       lambda folder: generate_detection_demo(folder, **DETECTION_DEMO_DATA))


def cmd_run(args: argparse.Namespace) -> int:
    from kd_lib.data.demo import generate_demo_dataset

    out = Path(args.out or ("runs/demo" if args.data is None else f"runs/{Path(args.data.rstrip('/')).name}"))
    return run_locally(args, out, lambda folder: generate_demo_dataset(folder, **DEMO_DATA))


def cmd_sweep(args: argparse.Namespace) -> int:
    from kd_lib.data.demo import generate_demo_dataset
    from kd_lib.eval.sweep import check_grid

    if args.choose:
        return choose_again(args)
    hr_size = args.hr_size or sweep.PIPELINE.defaults["hr_size"][1]
    check_grid(args.ratios, hr_size, args.student_archs)
    out = Path(args.out or ("runs/sweep-demo" if args.data is None else
                            f"runs/sweep-{Path(args.data.rstrip('/')).name}"))
    return run_locally(args, out, lambda folder: generate_demo_dataset(folder, **DEMO_DATA))


def choose_again(args: argparse.Namespace) -> int:
    """``kdp sweep --choose --out DIR``: the choice for the budget given, from the finished sweep in DIR."""
    from components.sweep import SweepConfig

    if args.out is None:
        raise ConfigError("--out", "--choose answers from a finished sweep: give its --out", "kdp sweep")
    path = Path(args.out) / "summary.json"
    if not path.is_file():
        raise ConfigError("--out", f"{path} does not exist: run the sweep first", "kdp sweep")
    summary = json.loads(path.read_text())
    fields = {name: getattr(args, name) for name in ("keep", "max_bytes", "max_gflops", "max_latency_ms", "cost")
              if getattr(args, name) is not None}
    print(sweep_answer(summary, SweepConfig(**fields).budget))  # the stage's defaults; choose() checks it
    return 0


def compile_pipeline(pipeline: str, path: str | Path, options: ClusterOptions | None = None,
                     table: Pipeline | None = None) -> Path:
    """Compile ``pipeline`` (a :data:`PIPELINES` key, or its ``table``) with ``options`` (default:
    :class:`ClusterOptions`' defaults, the images included) to the YAML file ``path``. The same inputs give
    the same bytes."""
    from kfp import compiler

    table = table or PIPELINES[pipeline][0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(table.build(options or ClusterOptions()), str(path))
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
    table = None
    if args.ratios or args.student_archs:
        from kd_lib.eval.sweep import check_grid

        if args.pipeline != "sweep":
            raise ConfigError("--ratios" if args.ratios else "--student-archs", "go with --pipeline sweep")
        ratios, archs = tuple(args.ratios or sweep.RATIOS), tuple(args.student_archs or sweep.ARCHS)
        check_grid(ratios, sweep.PIPELINE.defaults["hr_size"][1], archs)
        table = sweep.sweep_pipeline(ratios, archs)
    path = compile_pipeline(args.pipeline, args.output or PIPELINES[args.pipeline][1], options, table)
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
    """``kdp stage --help``: each stage with what it does."""
    from components.stage import stages

    lines = ["usage: kdp stage NAME [--config YAML] [flags]   (kdp stage NAME --help: its flags)", "", "stages:"]
    lines += [f"  {name:<18}{stage.summary}" for name, stage in stages().items()]
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


def add_set_and_runner_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set`` and ``--runner``, of the commands that run a pipeline locally."""
    from pipelines.local import RUNNERS

    parser.add_argument("--set", action="append", default=[], metavar="TASK.FIELD=VALUE",
                        help=f"a task's setting, or with a stage's name every task of that stage, e.g. --set "
                             f"{example} (repeatable)")
    parser.add_argument("--runner", choices=RUNNERS, default=RUNNERS[0],
                        help="where each task runs: subprocess (this Python environment, the default) or "
                             "docker (the container image of its role, as on a cluster; `make images` builds "
                             "them)")


def add_parameter_flags(parser: argparse.ArgumentParser, pipeline: Pipeline, helps: bool) -> None:
    """A flag per typed parameter of ``pipeline`` (``--teacher-arch`` for ``teacher_arch``), with the
    help of the fields it feeds and its default when ``helps`` (reading the fields' docstrings takes a
    second: only when help is asked)."""
    texts = pipeline.parameter_help() if helps else {}
    for name, (kind, default) in pipeline.defaults.items():
        if name in NOT_FLAGS:
            continue
        if not helps:
            shown = ""
        elif pipeline.parameters[name] == UNSET:
            own = ", ".join(f"{stage} {flag_text(value)}" for stage, value in pipeline.own_defaults(name).items())
            shown = f"each task's own: {own}"
        else:
            shown = flag_text(default) or "''"
        parser.add_argument(flag_name(name), type={"int": int, "float": float}.get(kind, str), metavar=kind.upper(),
                            help=f"{texts[name]} (default: {shown})".lstrip().replace("%", "%%") if helps else None)


def build_parser(helps: bool = True) -> argparse.ArgumentParser:
    """``kdp``'s parser; without ``helps``, the pipeline commands' parameter flags have no help text."""
    parser = argparse.ArgumentParser(prog="kdp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kdp {version('kd-pipeline')}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline locally (kfp.local)")
    run.add_argument("--data", help="ImageFolder root (path or URI) with train/ and val/; default: the demo")
    run.add_argument("--out", help="run folder (default: runs/demo or runs/<data folder name>)")
    add_parameter_flags(run, pixel_distillation.PIPELINE, helps)
    add_set_and_runner_arguments(run, "teacher.lr=0.1")
    detect = sub.add_parser("detect", help="run the detection pipeline locally (kfp.local)")
    detect.add_argument("--data", help="COCO instances JSON, or a YOLO root (path or URI); default: the "
                        "generated detection demo")
    detect.add_argument("--out", help="run folder (default: runs/detection-demo or runs/detection-<data name>)")
    add_parameter_flags(detect, detection.PIPELINE, helps)
    add_set_and_runner_arguments(detect, "afp.epochs=4")
    swept = sub.add_parser("sweep", help="which input size and which student: a grid of ratios x architectures "
                           "(kfp.local), its Pareto fronts and the cell chosen for a budget")
    swept.add_argument("--data", help="ImageFolder root (path or URI); default: the demo")
    swept.add_argument("--out", help="run folder (default: runs/sweep-demo or runs/sweep-<data folder name>)")
    swept.add_argument("--ratios", type=int, nargs="+", default=list(sweep.RATIOS), metavar="R",
                       help="the LR side is hr-size / R; 1 is the assistant at HR (default: "
                            f"{' '.join(map(str, sweep.RATIOS))})")
    swept.add_argument("--student-archs", nargs="+", default=list(sweep.ARCHS), metavar="ARCH",
                       help="torchvision names or timm:NAME,key=value,... (default: " + " ".join(sweep.ARCHS) + ")")
    swept.add_argument("--choose", action="store_true",
                       help="answer again for the budget given, from the finished sweep in --out, without training")
    add_parameter_flags(swept, sweep.PIPELINE, helps)
    add_set_and_runner_arguments(swept, "student.epochs=20 (every cell's student)")
    stage = sub.add_parser("stage", help="run one stage; `kdp stage --help` lists the stages, "
                           "`kdp stage NAME --help` the fields of one", add_help=False)
    stage.add_argument("name", nargs="?", metavar="NAME")
    demo = sub.add_parser("demo-data", help="write the generated demo dataset to DEST")
    demo.add_argument("dest")
    demo.add_argument("--seed", type=int, default=0)
    compile_ = sub.add_parser("compile", help="compile a pipeline to KFP v2 YAML for a cluster")
    compile_.add_argument("--pipeline", choices=sorted(PIPELINES), default="classification")
    compile_.add_argument("--ratios", type=int, nargs="+", metavar="R", help="the sweep's ratios (default: "
                          f"{' '.join(map(str, sweep.RATIOS))})")
    compile_.add_argument("--student-archs", nargs="+", metavar="ARCH",
                          help="the sweep's student architectures (default: " + " ".join(sweep.ARCHS) + ")")
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
    parser = build_parser(helps=bool({"-h", "--help"} & set(argv if argv is not None else sys.argv[1:])))
    args, rest = parser.parse_known_args(argv)
    if args.command == "stage":
        return guarded("kdp", lambda: cmd_stage(args, rest + ["--debug"] * debug), debug)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    commands = {"run": cmd_run, "detect": cmd_detect, "sweep": cmd_sweep, "demo-data": cmd_demo_data,
                "compile": cmd_compile,
                "schedule": cmd_schedule}
    return guarded("kdp", lambda: commands[args.command](args), debug, failures=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
