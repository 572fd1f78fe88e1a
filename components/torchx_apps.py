"""The TorchX component: one stage as a torchrun job (DDP for a training stage) on one node or several.

    torchx run -s local_cwd components/torchx_apps.py:stage_app --stage teacher --nproc_per_node 2 \\
        --gpus_per_node 0 -- --data runs/demo/data --out runs/demo/teacher --device cpu
    torchx run -s kubernetes -cfg queue=default components/torchx_apps.py:stage_app --stage student \\
        --nnodes 2 --nproc_per_node 4 -- --data gs://b/data --assistant gs://b/assistant --out gs://b/student

Component options go before ``--``, the stage's own flags (``kdp stage NAME --help``) after it.
Each node (a replica of the one role) runs ``torchrun ... -m components.<stage> <stage flags>``,
built by torchx's ``dist.torchrun``: one node rendezvouses on a free local port, several nodes on
rank 0's host, port 29500 (on Kubernetes, Volcano's ``VC_<ROLE>_0_HOSTS``).
:func:`launch_and_wait` does the same from Python, for a KFP task that hands its stage to a cluster.

The annotations in this module are real types, not postponed strings: torchx reads them to parse
its command line.
"""

import sys

from torchx import specs
from torchx.components import dist
from torchx.runner import get_runner
from torchx.specs.overlays import set_overlay

from components.image import DEFAULT_IMAGE
from components.pod import PodSettings
from components.stage import Stage, find
from kd_lib.config import check, flag_text, from_dict

#: The pod settings of a job unless told otherwise: those of the KFP tasks (kdp compile's defaults).
POD = PodSettings()


def check_topology(stage: Stage, nnodes: int, nproc_per_node: int, gpus_per_node: int) -> None:
    """Refuse node, process and GPU counts that cannot run ``stage``."""
    check(nnodes >= 1, "nnodes", f"must be >= 1, got {nnodes}")
    check(nproc_per_node >= 1, "nproc_per_node", f"must be >= 1, got {nproc_per_node}")
    check(gpus_per_node >= -1, "gpus_per_node", f"must be >= 0 (or -1: one per process), got {gpus_per_node}")
    check(stage.trains or nnodes * nproc_per_node == 1, "nproc_per_node",
          f"{stage.name} trains nothing and runs as one process: nnodes and nproc_per_node must be 1, "
          f"got {nnodes} x {nproc_per_node}")


def stage_app(stage: str, *script_args: str, nnodes: int = 1, nproc_per_node: int = 1,
              gpus_per_node: int = -1, cpu: int = 8, memMB: int = 32768, h: str = "",
              image: str = DEFAULT_IMAGE, env: dict[str, str] | None = None,
              mounts: list[str] | None = None, max_retries: int = 0,
              node_selector: str = flag_text(POD.node_selector), tolerations: str = flag_text(POD.tolerations),
              gcs_secret: str = POD.gcs_secret, gcs_secret_key: str = POD.gcs_secret_key) -> specs.AppDef:
    """One stage as a torchrun job of ``nnodes`` x ``nproc_per_node`` processes.

    Args:
        stage: the stage, as named by ``kdp stage --help``; a training stage runs data-parallel, others as one process
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
        node_selector: on Kubernetes, node labels of the pods, KEY=VALUE,... ('': none)
        tolerations: on Kubernetes, taints the pods tolerate, KEY[=VALUE]:EFFECT,... ('': none)
        gcs_secret: on Kubernetes, the secret with the GCS service-account key, mounted ('': none)
        gcs_secret_key: the key file's name in that secret (GOOGLE_APPLICATION_CREDENTIALS points at it)
    """
    declared = find(stage)
    check_topology(declared, nnodes, nproc_per_node, gpus_per_node)
    pod = from_dict(PodSettings, {"node_selector": node_selector, "tolerations": tolerations,
                                  "gcs_secret": gcs_secret, "gcs_secret_key": gcs_secret_key})
    return with_pod_settings(dist.torchrun(
        *script_args, m=declared.module, image=image, name=f"kdp-{declared.name}",
        h=h or None, cpu=cpu, gpu=nproc_per_node if gpus_per_node == -1 else gpus_per_node, memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}", env={**pod.env(), **(env or {})}, mounts=mounts,
        max_retries=max_retries), pod)


def with_pod_settings(app: specs.AppDef, pod: PodSettings) -> specs.AppDef:
    """``app`` with ``pod``'s secret, node selector and tolerations on the pods of every role."""
    for role in app.roles:
        overlay = pod.torchx_overlay(role)
        if overlay:
            set_overlay(role, "kubernetes", "V1Pod", overlay)
    return app


def launch_and_wait(stage: str, args: list[str], *, scheduler: str = "kubernetes", nnodes: int = 1,
                    nproc_per_node: int = 1, image: str = DEFAULT_IMAGE, cfg: str = "",
                    pod: PodSettings = POD, gpus_per_node: int = -1, wait_interval: float = 10.0) -> None:
    """Run ``stage`` with its flags ``args`` as a TorchX job on ``scheduler`` and wait for its end;
    its pods get the settings ``pod``.

    ``cfg`` is the scheduler's run config as ``k=v,k=v`` (for kubernetes at least ``queue=NAME``);
    the scheduler's state is polled every ``wait_interval`` seconds. Raises RuntimeError naming the
    app handle and its final state unless the job succeeded.
    """
    app = stage_app(stage, *args, nnodes=nnodes, nproc_per_node=nproc_per_node, gpus_per_node=gpus_per_node,
                    image=image, node_selector=flag_text(pod.node_selector), tolerations=flag_text(pod.tolerations),
                    gcs_secret=pod.gcs_secret, gcs_secret_key=pod.gcs_secret_key)
    with get_runner() as runner:
        handle = runner.run(app, scheduler, cfg=runner.cfg_from_str(scheduler, cfg))
        print(f"{stage}: launched {handle} ({nnodes} x {nproc_per_node} processes)", file=sys.stderr)
        status = runner.wait(handle, wait_interval=wait_interval)
    if status is None:
        raise RuntimeError(f"{stage}: TorchX app {handle} ended UNKNOWN: the scheduler no longer knows it")
    if status.state != specs.AppState.SUCCEEDED:
        detail = f": {status.msg}" if status.msg not in ("", specs.NONE) else ""
        raise RuntimeError(f"{stage}: TorchX app {handle} ended {status.state.name}{detail}")
