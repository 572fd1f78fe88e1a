"""What the pods of a stage get on Kubernetes, KFP task and TorchX job alike: the GCS credentials
secret (mounted at ``GCS_SECRET_MOUNT``, with ``GOOGLE_APPLICATION_CREDENTIALS`` pointing at its
key file), and for a training stage the node selector and the tolerations.

:class:`PodSettings` is declared once here: ``kdp compile`` takes its fields as options of the KFP
tasks (:class:`pipelines.cluster.ClusterOptions`), the TorchX component as its own options, and a
KFP task that launches its stage as a TorchX job hands them on to the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kd_lib.config import ConfigError, check

#: Where the GCS credentials secret is mounted, and the name of its volume.
GCS_SECRET_MOUNT = "/var/secrets/gcs"
GCS_SECRET_VOLUME = "gcs-credentials"
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def option(default, help: str):
    """A dataclass field with its command-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_toleration(text: str) -> dict[str, str]:
    """``KEY[=VALUE]:EFFECT`` (``kubectl taint`` syntax) -> a Kubernetes toleration (the arguments
    of :func:`kfp.kubernetes.add_toleration`); no VALUE means operator Exists."""
    target, sep, effect = text.rpartition(":")
    key, has_value, value = target.partition("=")
    if not sep or effect not in TAINT_EFFECTS or (has_value and not (key and value)):
        raise ConfigError("tolerations", f"expected KEY[=VALUE]:EFFECT with EFFECT one of "
                          f"{', '.join(TAINT_EFFECTS)}, got {text!r}")
    if has_value:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


@dataclass
class PodSettings:
    """The credentials and placement of a stage's pods (see the module docstring)."""

    node_selector: dict[str, str] = option({"nvidia.com/gpu.present": "true"},
                                           "node labels of training tasks, KEY=VALUE,... ('': none)")
    tolerations: list[str] = option(["nvidia.com/gpu:NoSchedule"],
                                    "taints training tasks tolerate, KEY[=VALUE]:EFFECT,... "
                                    "(no VALUE: operator Exists; '': none)")
    gcs_secret: str = option("gcs-credentials", "Kubernetes secret with the GCS service-account key "
                                                "('': none, e.g. with Workload Identity)")
    gcs_secret_key: str = option("key.json", "the key file's name in that secret")

    def validate(self) -> None:
        check(all(self.node_selector), "node_selector", f"a label needs a key, got {self.node_selector}")
        for text in self.tolerations:
            parse_toleration(text)
        check(not self.gcs_secret or bool(self.gcs_secret_key), "gcs_secret_key",
              "is required with gcs_secret: the key file's name in the secret")

    def env(self) -> dict[str, str]:
        """The environment that points Google's libraries (gcsfs) at the mounted key."""
        return {"GOOGLE_APPLICATION_CREDENTIALS": f"{GCS_SECRET_MOUNT}/{self.gcs_secret_key}"} if self.gcs_secret else {}

    def torchx_overlay(self, role) -> dict[str, Any]:
        """The pod overlay (``torchx.specs.overlays``, kubernetes ``V1Pod``) that gives every pod of
        the TorchX ``role`` these settings. The secret's mount joins the volume mounts that torchx
        gives the role's container (an overlay replaces a container's list)."""
        from kubernetes.client import ApiClient
        from torchx.schedulers.kubernetes_scheduler import role_to_pod
        from torchx.specs.overlays import JOIN

        spec: dict[str, Any] = {}
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            spec["tolerations"] = [parse_toleration(text) for text in self.tolerations]
        if self.gcs_secret:
            [container] = role_to_pod(role.name, role, None).spec.containers
            mounts = ApiClient().sanitize_for_serialization(container.volume_mounts)
            spec["volumes"] = [{"name": GCS_SECRET_VOLUME, "secret": {"secretName": self.gcs_secret}}]
            spec[JOIN("containers", on="image")] = [{"image": role.image, "volumeMounts": [
                *mounts, {"name": GCS_SECRET_VOLUME, "mountPath": GCS_SECRET_MOUNT, "readOnly": True}]}]
        return {"spec": spec} if spec else {}
