"""What a pipeline task asks of the cluster, and how each task is cached and rerun.

Every option of :class:`ClusterOptions` is a ``kdp compile`` flag (``gpus`` is
``--gpus``); an empty value turns an option off (``--node-selector ""``,
``--gcs-secret ""``). Training tasks get the training image, the GPUs, the
CPU and memory of ``cpu``/``memory`` (request = limit), the node selector and
the tolerations; source-version, prepare-data and evaluate get the CPU image
(:mod:`components.image`), ``aux_cpu``/``aux_memory`` and no GPU. Every
task gets a memory-backed ``/dev/shm`` (DataLoader workers share batches
through it) and the GCS credentials secret, mounted as a volume with
``GOOGLE_APPLICATION_CREDENTIALS`` pointing at its key file.

A training task that fails (a preempted node, an evicted pod) is retried
``retries`` times with exponential backoff (1 minute, then doubling, for at
most ``RETRY_MAX_DURATION``); the stage resumes from its last checkpoint.

With ``launcher: torchx`` a training task does not train: it starts the
stage as a TorchX job (``nnodes`` x ``nproc_per_node`` processes, DDP) on
``torchx_scheduler`` and waits for it, so the task itself gets the CPU image,
the aux resources and no GPU, and the job's pods get the training image, the
GPUs, and the same GCS credentials, node selector and tolerations
(:class:`components.pod.PodSettings`).

Caching and per-stage reruns. Every task has caching on and a string input
``rerun_token``, fed by one pipeline parameter per stage (``rerun_teacher``,
...); the stage code never sees it. KFP's cache key for a task (the
``CacheKey`` message of ``api/v2alpha1/cache_key.proto``, filled by
``GenerateCacheKey`` in ``backend/src/v2/cacheutils/cache.go`` of
kubeflow/pipelines) holds the input parameter values, the input artifacts'
*names* (not their contents: ``toRuntimeArtifact`` in
``backend/src/v2/metadata/converter.go`` names a runtime artifact after its
MLMD artifact id), the output artifact and parameter specs, and the image,
command and arguments (in newer backends also PVC names and env). So a new
``rerun_teacher`` changes only the teacher's key; the teacher runs again and
publishes a new artifact (a new MLMD id), which changes the keys of the tasks
that read it (assistant, student-onestage, evaluate, and through the
assistant the student), while prepare-data and lr-baseline stay cache hits.
A cache hit hands the cached execution's artifacts (the same ids) downstream,
so nothing after it reruns. ``kfp.local`` keys tasks the same way, on the
component, image, command and arguments, input artifacts by name, URI and
metadata (``kfp/local/cache.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Literal

from kfp import kubernetes
from kfp.dsl import PipelineTask

from components.image import IMAGES
from components.pod import GCS_SECRET_MOUNT, PodSettings, option, parse_toleration
from kd_lib.config import check, field_help, flag_name, from_dict

SHM_VOLUME = "dshm"
#: How long a training task is retried for after its first failure.
RETRY_MAX_DURATION = "6h"
#: Kubernetes quantities as KFP accepts them for CPU and memory.
CPU_PATTERN = re.compile(r"^([0-9]*[.])?[0-9]+m?$")
MEMORY_PATTERN = re.compile(r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")


@dataclass
class ClusterOptions(PodSettings):
    """Resources and pod settings of the compiled pipeline's tasks (see the module docstring)."""

    gpus: int = option(1, "GPUs of each training task (0: none)")
    accelerator: str = option("nvidia.com/gpu", "accelerator resource of the GPUs ('': none)")
    cpu: str = option("8", "CPU of each training task, request = limit ('': unset)")
    memory: str = option("32Gi", "memory of each training task, request = limit ('': unset)")
    aux_cpu: str = option("4", "CPU of prepare-data and evaluate ('': unset)")
    aux_memory: str = option("16Gi", "memory of prepare-data and evaluate ('': unset)")
    shm_size: str = option("16Gi", "size of the memory-backed /dev/shm of every task ('': none)")
    launcher: Literal["pod", "torchx"] = option("pod", "pod: train in the task's pod; torchx: the task "
                                                       "launches the stage as a TorchX job and waits")
    torchx_scheduler: str = option("kubernetes", "TorchX scheduler of launcher torchx")
    nnodes: int = option(1, "nodes of each TorchX job")
    nproc_per_node: int = option(0, "processes per node of each TorchX job (0: one per GPU)")
    torchx_cfg: str = option("queue=default", "TorchX scheduler run config, KEY=VALUE,...")
    retries: int = option(3, "retries of a failed training task, 1 minute apart, then doubling; the stage "
                             "resumes from its checkpoint (0: none)")
    pipeline_root: str = option("", "where runs write their artifacts, e.g. gs://BUCKET/kfp ('': the KFP "
                                    "deployment's default root)")
    image_train: str = option(IMAGES["train"], "REGISTRY/NAME:TAG of the tasks that train in their pod and of "
                                               "the TorchX jobs: the Dockerfile's train target")
    image_cpu: str = option(IMAGES["cpu"], "REGISTRY/NAME:TAG of every other task: the Dockerfile's cpu target")

    def validate(self) -> None:
        super().validate()
        check(self.gpus >= 0, "gpus", f"must be >= 0, got {self.gpus}")
        for name in ("cpu", "aux_cpu"):
            value = getattr(self, name)
            check(not value or bool(CPU_PATTERN.match(value)), name,
                  f"must be a CPU quantity such as 8, 0.5 or 500m, got {value!r}")
        for name in ("memory", "aux_memory", "shm_size"):
            value = getattr(self, name)
            check(not value or bool(MEMORY_PATTERN.match(value)), name,
                  f"must be a memory quantity such as 32Gi or 512Mi, got {value!r}")
        check(self.nnodes >= 1, "nnodes", f"must be >= 1, got {self.nnodes}")
        check(self.nproc_per_node >= 0, "nproc_per_node", f"must be >= 0, got {self.nproc_per_node}")
        for name in ("image_train", "image_cpu"):
            value = getattr(self, name)
            check(bool(value) and not any(c.isspace() for c in value), name,
                  f"must be an image reference such as REGISTRY/NAME:TAG, got {value!r}")
        check(self.retries >= 0, "retries", f"must be >= 0, got {self.retries}")

    @property
    def root(self) -> str | None:
        """The ``pipeline_root`` of ``dsl.pipeline``: None leaves it to the deployment."""
        return self.pipeline_root or None

    @property
    def uses_gpus(self) -> bool:
        return self.gpus > 0 and bool(self.accelerator)


def add_cluster_arguments(parser) -> None:
    """One ``--flag`` per :class:`ClusterOptions` field, with its help and default, and ``--image``."""
    group = parser.add_argument_group("cluster options (an empty value turns an option off)")
    group.add_argument("--image", metavar="IMAGE", help="REGISTRY/NAME:TAG of every task and job: sets "
                                                        "--image-train and --image-cpu unless they are given")
    for name, text in field_help(ClusterOptions).items():
        group.add_argument(flag_name(name), dest=name, metavar=name.upper(), help=text.replace("%", "%%"))


def options_from_args(args) -> ClusterOptions:
    """The :class:`ClusterOptions` of the flags given (``--image``: both images); the others keep
    their defaults."""
    image = getattr(args, "image", None)
    given = {} if image is None else {"image_train": image, "image_cpu": image}
    given.update({spec.name: getattr(args, spec.name) for spec in fields(ClusterOptions)
                  if getattr(args, spec.name, None) is not None})
    return from_dict(ClusterOptions, given)


def launcher_input(options: ClusterOptions | None) -> dict:
    """The ``launcher`` input of training tasks (see ``components.kfp_entry.Launcher``)."""
    if options is None or options.launcher == "pod":
        return {"kind": "pod"}
    pod = {spec.name: getattr(options, spec.name) for spec in fields(PodSettings)}
    return {"kind": "torchx", "scheduler": options.torchx_scheduler, "nnodes": options.nnodes,
            "nproc_per_node": options.nproc_per_node or max(options.gpus, 1), "image": options.image_train,
            "cfg": options.torchx_cfg, **pod}


def configure_task(task: PipelineTask, options: ClusterOptions | None, *, cached: bool = True) -> PipelineTask:
    """Set ``task``'s caching and apply ``options`` to it. A training task is one with a
    ``launcher`` input: where its stage trains.

    The task's image is its role's: the training image where it trains in its pod, else the CPU
    image (``options``' images, else :data:`~components.image.IMAGES`, which kfp.local's docker
    runner runs). ``options=None`` (the local runs of ``kfp.local``) applies no other cluster settings.
    """
    task.set_caching_options(cached)
    training = "launcher" in task.inputs
    trains_here = training and (options is None or options.launcher == "pod")
    train_image, cpu_image = (options.image_train, options.image_cpu) if options else (IMAGES["train"], IMAGES["cpu"])
    task.set_container_image(train_image if trains_here else cpu_image)
    if options is None:
        return task
    if training and options.retries:
        task.set_retry(options.retries, backoff_duration="60s", backoff_factor=2.0,
                       backoff_max_duration=RETRY_MAX_DURATION)
    set_resources(task, *((options.cpu, options.memory) if trains_here else (options.aux_cpu, options.aux_memory)))
    if trains_here:
        set_gpus(task, options)
    if options.shm_size:
        kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory",
                                   size_limit=options.shm_size)
    if options.gcs_secret:
        kubernetes.use_secret_as_volume(task, secret_name=options.gcs_secret, mount_path=GCS_SECRET_MOUNT)
    for name, value in options.env().items():
        task.set_env_variable(name, value)
    return task


def set_resources(task: PipelineTask, cpu: str, memory: str) -> None:
    """CPU and memory, each its request and limit; an empty value leaves it unset."""
    if cpu:
        task.set_cpu_request(cpu).set_cpu_limit(cpu)
    if memory:
        task.set_memory_request(memory).set_memory_limit(memory)


def set_gpus(task: PipelineTask, options: ClusterOptions) -> None:
    """The GPUs, node selector and tolerations of a task that trains in its own pod."""
    if options.uses_gpus:
        task.set_accelerator_type(options.accelerator).set_accelerator_limit(options.gpus)
    for key, value in options.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for text in options.tolerations:
        kubernetes.add_toleration(task, **parse_toleration(text))
