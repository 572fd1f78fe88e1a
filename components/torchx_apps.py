"""TorchX components: one stage as a DDP job (torchrun) on one node or several.

    torchx run -s local_cwd components/torchx_apps.py:teacher --nproc_per_node 2 --gpus_per_node 0 \\
        -- --data runs/demo/data --out runs/demo/teacher --device cpu
    torchx run -s kubernetes -cfg queue=default components/torchx_apps.py:student \\
        --nnodes 2 --nproc_per_node 4 -- --data gs://b/data --assistant gs://b/assistant --out gs://b/student

Component options go before ``--``, the stage's own flags (``kdp stage NAME --help``) after it.
Each node (a replica of the one role) runs ``torchrun ... -m components.<stage> <stage flags>``,
built by torchx's ``dist.torchrun``: one node rendezvouses on a free local port, several nodes on
rank 0's host, port 29500 (on Kubernetes, Volcano's ``VC_<ROLE>_0_HOSTS``).
:func:`launch_and_wait` does the same from Python, for a KFP task that hands its stage to a cluster.

The annotations in this module are real types, not postponed strings: torchx reads them to parse
its command line.
"""

import inspect
import sys
from collections.abc import Callable
from typing import Any

from torchx import specs
from torchx.components import dist
from torchx.runner import get_runner

from components.image import IMAGES
from kd_lib.config import check

#: Every job's image unless told otherwise: the training image (CUDA, torch's CUDA build, the kernels).
DEFAULT_IMAGE = IMAGES["train"]
#: Stages that train with DDP under torchrun (``kdp stage`` names, ``_`` for ``-``).
DDP_STAGES = ("teacher", "assistant", "student", "lr_baseline", "detector", "afp")
#: Every stage with a component here; evaluate writes one report and runs as one process.
STAGES = (*DDP_STAGES, "evaluate")


def stage_name(stage: str) -> str:
    """The module name of ``stage`` (``lr-baseline`` and ``lr_baseline`` alike), checked."""
    name = stage.replace("-", "_")
    check(name in STAGES, "stage", f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return name


def check_topology(stage: str, nnodes: int, nproc_per_node: int, gpus_per_node: int) -> None:
    """Refuse node, process and GPU counts that cannot run ``stage``."""
    check(nnodes >= 1, "nnodes", f"must be >= 1, got {nnodes}")
    check(nproc_per_node >= 1, "nproc_per_node", f"must be >= 1, got {nproc_per_node}")
    check(gpus_per_node >= -1, "gpus_per_node", f"must be >= 0 (or -1: one per process), got {gpus_per_node}")
    check(stage in DDP_STAGES or nnodes * nproc_per_node == 1, "nproc_per_node",
          f"{stage} runs as one process: nnodes and nproc_per_node must be 1, "
          f"got {nnodes} x {nproc_per_node}")


def stage_app(stage: str, *script_args: str, nnodes: int = 1, nproc_per_node: int = 1,
              gpus_per_node: int = -1, cpu: int = 8, memMB: int = 32768, h: str = "",
              image: str = DEFAULT_IMAGE, env: dict[str, str] | None = None,
              mounts: list[str] | None = None, max_retries: int = 0) -> specs.AppDef:
    """The TorchX app that runs one stage with torchrun on ``nnodes`` x ``nproc_per_node`` processes.

    Args:
        stage: the stage, as named by ``kdp stage`` (one of STAGES)
        script_args: the stage's own flags (--data URI --out URI ...), after ``--`` on the torchx CLI
        nnodes: nodes (replicas of the role); with more than one they rendezvous on rank 0's host
        nproc_per_node: processes per node (one per GPU on a GPU node)
        gpus_per_node: GPUs each node asks for; -1: one per process
        cpu: CPUs each node asks for (unless h is given)
        memMB: memory in MB each node asks for (unless h is given)
        h: a torchx named resource (e.g. aws_p4d.24xlarge) that sets cpu, GPUs and memory instead
        image: the image with this project installed (local_cwd runs the working tree instead)
        env: extra environment variables of every process (e.g. GOOGLE_APPLICATION_CREDENTIALS=/k.json)
        mounts: volumes to mount, e.g. type=volume,src=CLAIM,dst=/data (see the scheduler's docs)
        max_retries: scheduler restarts of a failed job; a restarted stage resumes from its checkpoint
    """
    name = stage_name(stage)
    check_topology(name, nnodes, nproc_per_node, gpus_per_node)
    return dist.torchrun(
        *script_args, m=f"components.{name}", image=image, name=f"kdp-{name.replace('_', '-')}",
        h=h or None, cpu=cpu, gpu=nproc_per_node if gpus_per_node == -1 else gpus_per_node, memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}", env=env, mounts=mounts, max_retries=max_retries)


def stage_component(component: Callable[..., specs.AppDef]) -> Callable[..., specs.AppDef]:
    """Give a named stage's component the options of :func:`stage_app` (all but ``stage``).

    torchx builds a component's command line from its signature and the ``Args:`` of its
    docstring: both are taken from :func:`stage_app`, under the component's own summary.
    """
    options = list(inspect.signature(stage_app).parameters.values())[1:]
    component.__signature__ = inspect.Signature(options, return_annotation=specs.AppDef)
    component.__doc__ = f"{component.__doc__}\n\n    Args:{stage_app.__doc__.partition('Args:')[2]}"
    return component


@stage_component
def teacher(*script_args: str, **options: Any) -> specs.AppDef:
    """The HR teacher, trained with cross-entropy (components.teacher), as a DDP job."""
    return stage_app("teacher", *script_args, **options)


@stage_component
def assistant(*script_args: str, **options: Any) -> specs.AppDef:
    """The HR assistant, distilled from the teacher (components.assistant), as a DDP job."""
    return stage_app("assistant", *script_args, **options)


@stage_component
def student(*script_args: str, **options: Any) -> specs.AppDef:
    """The LR student, distilled from the assistant or teacher (components.student), as a DDP job."""
    return stage_app("student", *script_args, **options)


@stage_component
def lr_baseline(*script_args: str, **options: Any) -> specs.AppDef:
    """The LR baseline, trained with cross-entropy alone (components.lr_baseline), as a DDP job."""
    return stage_app("lr_baseline", *script_args, **options)


@stage_component
def detector(*script_args: str, **options: Any) -> specs.AppDef:
    """A detector trained alone on one view (components.detector), as a DDP job."""
    return stage_app("detector", *script_args, **options)


@stage_component
def afp(*script_args: str, **options: Any) -> specs.AppDef:
    """The AFP/MSAD-aligned assistant and LR student detectors (components.afp), as a DDP job."""
    return stage_app("afp", *script_args, **options)


@stage_component
def evaluate(*script_args: str, **options: Any) -> specs.AppDef:
    """The metrics table and report of every model (components.evaluate), as one process."""
    return stage_app("evaluate", *script_args, **options)


def launch_and_wait(stage: str, args: list[str], *, scheduler: str = "kubernetes", nnodes: int = 1,
                    nproc_per_node: int = 1, image: str = DEFAULT_IMAGE, cfg: str = "",
                    gpus_per_node: int = -1, wait_interval: float = 10.0) -> None:
    """Run ``stage`` with its flags ``args`` as a TorchX job on ``scheduler`` and wait for its end.

    ``cfg`` is the scheduler's run config as ``k=v,k=v`` (for kubernetes at least ``queue=NAME``);
    the scheduler's state is polled every ``wait_interval`` seconds. Raises RuntimeError naming the
    app handle and its final state unless the job succeeded.
    """
    app = stage_app(stage, *args, nnodes=nnodes, nproc_per_node=nproc_per_node,
                    gpus_per_node=gpus_per_node, image=image)
    with get_runner() as runner:
        handle = runner.run(app, scheduler, cfg=runner.cfg_from_str(scheduler, cfg))
        print(f"{stage}: launched {handle} ({nnodes} x {nproc_per_node} processes)", file=sys.stderr)
        status = runner.wait(handle, wait_interval=wait_interval)
    if status is None:
        raise RuntimeError(f"{stage}: TorchX app {handle} ended UNKNOWN: the scheduler no longer knows it")
    if status.state != specs.AppState.SUCCEEDED:
        detail = f": {status.msg}" if status.msg not in ("", specs.NONE) else ""
        raise RuntimeError(f"{stage}: TorchX app {handle} ended {status.state.name}{detail}")
