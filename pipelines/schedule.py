"""``kdp schedule``: a KFP recurring run of a compiled pipeline package.

The run is created with ``kfp.Client(host=...).create_recurring_run(...)``
in an experiment (made if missing), with caching on: a scheduled run
retrains only the stages whose inputs changed (a new data fingerprint
reruns everything after prepare-data; unchanged data is a cache hit
throughout). ``--param KEY=VALUE`` values are typed by the package's own
parameter definitions (a ``STRUCT`` such as ``teacher_settings`` is JSON).
``--dry-run`` prints a command that creates the same recurring run through
``kfp.Client`` instead of calling the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from croniter import CroniterError, croniter

from kd_lib.config import ConfigError

#: KFP's cron format (robfig/cron with seconds): second minute hour day-of-month month day-of-week.
CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
WHERE = "kdp schedule"


@dataclass
class Schedule:
    """One recurring run: where, what, when and with which parameters."""

    host: str
    package: str
    experiment: str
    cron: str
    name: str
    params: dict
    max_concurrency: int = 1


def check_cron(cron: str) -> str:
    """``cron`` if it is a valid cron expression of KFP's 6 fields, seconds first (checked by
    croniter); else a ConfigError that says what is wrong."""
    count = len(cron.split())
    if count != len(CRON_FIELDS):
        hint = f": add the seconds first, e.g. {'0 ' + cron.strip()!r}" if count == 5 else ""
        raise ConfigError("--cron", f"KFP cron expressions have 6 fields ({', '.join(CRON_FIELDS)}), "
                          f"got {count} in {cron!r}{hint}", WHERE)
    try:
        croniter.expand(cron, second_at_beginning=True)
    except CroniterError as err:
        raise ConfigError("--cron", f"{cron!r} is not a valid cron expression ({', '.join(CRON_FIELDS)}): "
                          f"{err}", WHERE) from None
    return cron


def package_parameters(package: str) -> dict[str, dict]:
    """The pipeline parameters of the compiled package: name -> KFP parameter definition."""
    path = Path(package)
    if not path.is_file():
        raise ConfigError("--pipeline-package", f"no such file: {package} (compile it with kdp compile)", WHERE)
    spec = next(yaml.safe_load_all(path.read_text()))
    if not isinstance(spec, dict) or "root" not in spec:
        raise ConfigError("--pipeline-package", f"{package} is not a compiled KFP pipeline", WHERE)
    return spec["root"].get("inputDefinitions", {}).get("parameters", {})


def typed_value(name: str, text: str, kind: str):
    """``text`` as the KFP parameter type ``kind`` (STRING, NUMBER_INTEGER, ..., STRUCT, LIST)."""
    try:
        if kind == "NUMBER_INTEGER":
            return int(text)
        if kind == "NUMBER_DOUBLE":
            return float(text)
        if kind == "BOOLEAN":
            return {"true": True, "false": False}[text.lower()]
        if kind in ("STRUCT", "LIST"):
            value = json.loads(text)
            if not isinstance(value, dict if kind == "STRUCT" else list):
                raise ValueError(text)
            return value
    except (ValueError, KeyError):
        raise ConfigError("--param", f"{name} is a {kind} parameter, got {text!r}"
                          + (" (JSON)" if kind in ("STRUCT", "LIST") else ""), WHERE) from None
    return text


def parse_params(texts: list[str], definitions: dict[str, dict]) -> dict:
    """``KEY=VALUE`` texts -> typed pipeline parameters; every required parameter must be given."""
    params = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or name not in definitions:
            raise ConfigError("--param", f"expected KEY=VALUE with KEY one of {', '.join(definitions)}, "
                              f"got {text!r}", WHERE)
        params[name] = typed_value(name, value, definitions[name]["parameterType"])
    missing = [name for name, spec in definitions.items()
               if name not in params and "defaultValue" not in spec and not spec.get("isOptional")]
    if missing:
        raise ConfigError("--param", f"the pipeline needs {', '.join(missing)}: pass --param "
                          f"{missing[0]}=VALUE", WHERE)
    return params


def recurring_run_arguments(schedule: Schedule) -> dict:
    """The keyword arguments of ``kfp.Client.create_recurring_run`` but the experiment's id: an
    enabled recurring run of the package, cached, with the typed parameters."""
    return {"job_name": schedule.name, "cron_expression": schedule.cron, "max_concurrency": schedule.max_concurrency,
            "params": schedule.params, "pipeline_package_path": schedule.package, "enable_caching": True,
            "enabled": True}


def dry_run_text(schedule: Schedule) -> str:
    """A shell command that creates the very recurring run of ``schedule`` through ``kfp.Client``.

    Not ``kfp recurring-run create``: kfp 2.17's CLI passes every parameter as a string and,
    without ``--enabled``, creates the recurring run disabled.
    """
    arguments = "".join(f"\n    {name}={value!r}," for name, value in recurring_run_arguments(schedule).items())
    return (f"python3 - <<'EOF'\nimport kfp\n\nclient = kfp.Client(host={schedule.host!r})\n"
            f"experiment = client.create_experiment(name={schedule.experiment!r})\n"
            f"client.create_recurring_run(\n    experiment_id=experiment.experiment_id,{arguments}\n)\nEOF")


def create(schedule: Schedule, client_factory: Callable[..., object]):
    """Create the recurring run through ``client_factory(host=...)`` (``kfp.Client``); returns it."""
    client = client_factory(host=schedule.host)
    experiment = client.create_experiment(name=schedule.experiment)
    return client.create_recurring_run(experiment_id=experiment.experiment_id, **recurring_run_arguments(schedule))
