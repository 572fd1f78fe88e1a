"""Stage manifests: the last file a stage writes, and the proof that it finished.

``manifest.json`` under a stage's output names the stage, the key of its
inputs and config, every output file with its SHA-256, and a fingerprint that
downstream stages use as their input's identity. No manifest means not done.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kd_lib.io.fs import exists, join, read_bytes, read_text, remove, sha256_bytes, write_text

MANIFEST = "manifest.json"


class IncompleteOutputError(FileNotFoundError):
    """A stage output has no manifest: it never finished or is not a stage output."""


def stage_key(stage: str, settings: dict[str, Any], inputs: dict[str, str]) -> str:
    """SHA-256 of the stage name, the settings that change its result, and the
    fingerprints of its inputs."""
    payload = json.dumps({"stage": stage, "settings": settings, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of the stage output at ``uri``; :class:`IncompleteOutputError` if none."""
    path = join(uri, MANIFEST)
    if not exists(path):
        raise IncompleteOutputError(
            f"{uri}: no {MANIFEST}: not a finished stage output (the stage that writes it "
            "has not completed, or the URI is wrong)")
    return json.loads(read_text(path))


def finished_with_key(uri: str, key: str) -> dict[str, Any] | None:
    """The manifest at ``uri`` if it records ``key``, else None."""
    try:
        manifest = read_manifest(uri)
    except IncompleteOutputError:
        return None
    return manifest if manifest.get("key") == key else None


def published_files(uri: str) -> list[str]:
    """The files the manifest at ``uri`` lists, or none if there is no manifest."""
    try:
        return list(read_manifest(uri)["files"])
    except IncompleteOutputError:
        return []


def unpublish(uri: str) -> None:
    """Remove the manifest at ``uri`` before rewriting the output under it."""
    remove(join(uri, MANIFEST))


def write_manifest(uri: str, *, stage: str, key: str, files: list[str],
                   info: dict[str, Any]) -> dict[str, Any]:
    """Hash every output file and write ``manifest.json`` last.

    The fingerprint is the SHA-256 of the key and the files' hashes: equal
    fingerprints mean equal outputs from equal inputs.
    """
    hashes = {name: sha256_bytes(read_bytes(join(uri, name))) for name in files}
    fingerprint = stage_key(stage, {"key": key}, hashes)
    manifest = {"stage": stage, "key": key, "fingerprint": fingerprint, "files": hashes, **info}
    write_text(join(uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
