"""kdp: the command line of the pipeline.

    kdp run [--data URI] [--out DIR] [...]   the whole pipeline, locally, with kfp.local
    kdp stage NAME [flags]                    one stage (the per-stage rerun)
    kdp demo-data DEST                        write the generated demo ImageFolder

Without --data, kdp run generates the demo dataset and uses the demo
settings, sized to finish in minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kd_lib.config import ConfigError
from pipelines.pixel_distillation import DEFAULT_SETTINGS, STUDENT_METHODS

STAGE_MODULES = {
    "prepare-data": "components.prepare_data",
    "teacher": "components.teacher",
    "assistant": "components.assistant",
    "student": "components.student",
    "lr-baseline": "components.lr_baseline",
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

#: The demo: the generated dataset at 64 px, students at 16 px, a few minutes on 2 CPU cores.
DEMO_DATA = {"seed": 0, "num_classes": 8, "train_per_class": 150, "val_per_class": 30, "size": 64}
DEMO_SETTINGS = {"teacher": {"epochs": 8}, "assistant": {"epochs": 6}, "student": {"epochs": 6},
                 "onestage": {"epochs": 6}, "lr_baseline": {"epochs": 6}, "evaluate": {"latency_repeats": 5}}


def parse_setting(text: str) -> tuple[str, str, str]:
    """``STAGE.FIELD=VALUE`` -> (settings key, field, value)."""
    target, sep, value = text.partition("=")
    stage, dot, field = target.partition(".")
    if not sep or not dot or stage not in SETTINGS_KEYS:
        raise ConfigError("--set", f"expected STAGE.FIELD=VALUE with STAGE one of "
                          f"{', '.join(SETTINGS_KEYS)}, got {text!r}")
    return SETTINGS_KEYS[stage], field, value


def pipeline_params(args: argparse.Namespace, source: str) -> dict:
    """The pipeline's parameters: its defaults, the demo's when there is no
    ``--data``, then the command line, merged field by field."""
    settings = {key: dict(value) for key, value in DEFAULT_SETTINGS.items()}
    if args.data is None:
        for key, value in DEMO_SETTINGS.items():
            settings[key].update(value)
    if args.epochs is not None:
        for stage in TRAINING_STAGES:
            settings[SETTINGS_KEYS[stage]]["epochs"] = args.epochs
    for text in args.set:
        key, field, value = parse_setting(text)
        settings[key][field] = value
    params = {"source": source, **{f"{key}_settings": value for key, value in settings.items()}}
    for name in ("hr_size", "ratio", "seed", "teacher_arch", "student_arch"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    return params


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


def cmd_run(args: argparse.Namespace) -> int:
    from kd_lib.eval.report import format_table
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
    paths = run_pipeline(params, out)
    summary = json.loads(paths["summary.json"].read_text())
    print()
    print(format_table(summary))
    print(f"\nsummary: {paths['summary.json']}\nreport:  {paths['report.html']}")
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
    stage = sub.add_parser("stage", help="run one stage; `kdp stage NAME --help` lists its fields",
                           add_help=False)
    stage.add_argument("name", choices=sorted(STAGE_MODULES))
    demo = sub.add_parser("demo-data", help="write the generated demo dataset to DEST")
    demo.add_argument("dest")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "stage":
        return cmd_stage(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return cmd_run(args) if args.command == "run" else cmd_demo_data(args)
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
