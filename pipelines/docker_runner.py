"""``kdp run --runner docker``: every task of a pipeline in the container image of its role.

kfp.local's ``DockerRunner`` starts each task as a container of the image its
component names (:mod:`components.image`: the cpu image for source-version,
prepare-data, evaluate and export, the train image for the training tasks), as
a pod runs it on a cluster: the image's own Python environment and its user
(uid 1000), and of this machine only what is mounted:

- the run folder, read-write at its own path (it holds the pipeline root and
  the checkpoints); when ``kdp`` runs as root its writable parts are handed
  to uid 1000, as a cluster's volume would be;
- each local path among the pipeline's parameters (the dataset, a weights
  file), read-only at its own path.

:func:`docker_runner` checks first that the daemon answers and that both images
are built, so that a missing one fails at once, with what to do, not after
the first task. :func:`task_images` says which image each task ran in, for
``summary.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

from components.image import IMAGES
from kd_lib.config import ConfigError

#: the images' user (the Dockerfile's ``useradd --uid 1000``)
IMAGE_UID = 1000


def docker_client():
    """A client of the daemon that ``DOCKER_HOST`` (default: the local socket) names, which answered
    a ping.

    Raises:
        ConfigError: no daemon answers; the message says how to start one.
    """
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as err:  # docker raises DockerException, requests' and socket errors alike
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise ConfigError("--runner", f"docker: no Docker daemon answers at {where} ({type(err).__name__}); "
                          "start it (`sudo systemctl start docker`, or `dockerd &`) or use --runner subprocess",
                          "kdp") from None
    return client


def image_ids(client) -> dict[str, str]:
    """The ID of each role's image (:data:`~components.image.IMAGES`).

    Raises:
        ConfigError: an image is not built; the message says how to build it.
    """
    import docker

    ids, missing = {}, []
    for role, name in IMAGES.items():
        try:
            ids[name] = client.images.get(name).id
        except docker.errors.ImageNotFound:
            missing.append(f"{name} ({role})")
    if missing:
        raise ConfigError("--runner", f"docker: image {', '.join(missing)} not built; run `make images` "
                          "(or pull them) first", "kdp")
    return ids


def check_engine() -> None:
    """Raise :class:`ConfigError` unless the daemon answers and both images are built."""
    client = docker_client()
    try:
        image_ids(client)
    finally:
        client.close()


def local_paths(params: dict) -> list[Path]:
    """The pipeline parameters that are paths of this machine that exist (the dataset, weights files)."""
    paths = {Path(value) for value in params.values()
             if isinstance(value, str) and value.startswith("/") and Path(value).exists()}
    return sorted(paths)


def docker_runner(out: Path, params: dict):
    """kfp.local's ``DockerRunner`` for a run in ``out`` (absolute) with ``params``: ``out``
    mounted read-write, every other local path of ``params`` read-only, each at its own path.

    Raises:
        ConfigError: no daemon, or an image is not built (before anything runs).
    """
    from docker.types import Mount
    from kfp import local

    check_engine()
    mounts = [Mount(str(out), str(out), type="bind")]
    mounts += [Mount(str(path), str(path), type="bind", read_only=True)
               for path in local_paths(params) if not path.is_relative_to(out)]
    if os.getuid() == 0:
        for folder in (out / "pipeline_root", Path(params["checkpoint_root"])):
            folder.mkdir(parents=True, exist_ok=True)
            for path in (folder, *folder.rglob("*")):
                os.chown(path, IMAGE_UID, IMAGE_UID, follow_symlinks=False)
        return local.DockerRunner(mounts=mounts)
    # the host's user, so that what the tasks write is the user's; HOME: the image's belongs to uid 1000
    return local.DockerRunner(mounts=mounts, user=f"{os.getuid()}:{os.getgid()}", environment={"HOME": "/tmp"})


def task_images(pipeline) -> dict[str, dict[str, str]]:
    """Each task of ``pipeline`` (a ``dsl.pipeline``), by its display name -> ``{"image": NAME, "id": ID}``,
    the image it runs in and that image's ID here (empty when it is not present)."""
    import docker

    spec = pipeline.pipeline_spec
    executors = spec.deployment_spec["executors"]
    client = docker.from_env(timeout=10)
    try:
        ids = {name: image.id for image in client.images.list() for name in image.tags}
    finally:
        client.close()
    images = {}
    for dag in (spec.root.dag, *(component.dag for component in spec.components.values())):
        for task in dag.tasks.values():
            executor = spec.components[task.component_ref.name].executor_label
            if executor:
                image = executors[executor]["container"]["image"]
                images[task.task_info.name] = {"image": image, "id": ids.get(image, "")}
    return dict(sorted(images.items()))
