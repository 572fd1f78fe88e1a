"""Stage manifests: the last file a stage writes, and the proof that it finished.

``manifest.json`` under a stage's output names the stage, the key of its
inputs and config, every output file with its SHA-256 (``files``), its size
(``sizes``) and where it is stored under the output (``paths``; a file is
stored under its own name when the manifest has no ``paths``), and a
fingerprint that downstream stages use as their input's identity. No manifest
means not done.

A reader goes through :func:`read_published`, which checks what the manifest
promises: the file's size always, its SHA-256 when asked (model files). A
mismatch is a :class:`~kd_lib.errors.DataError` naming the file and both
values. How a new output replaces an old one: :mod:`kd_lib.io.publish`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kd_lib.errors import DataError
from kd_lib.io.fs import exists, join, read_bytes, read_text, sha256_bytes

MANIFEST = "manifest.json"


class IncompleteOutputError(FileNotFoundError):
    """A stage output has no manifest: it never finished or is not a stage output."""


def stage_key(stage: str, settings: dict[str, Any], inputs: dict[str, str]) -> str:
    """SHA-256 of the stage name, the settings that change its result, and the
    fingerprints of its inputs."""
    payload = json.dumps({"stage": stage, "settings": settings, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of the stage output at ``uri``.

    Raises:
        IncompleteOutputError: there is none.
        DataError: it is damaged (not a JSON object with ``stage`` and ``files``).
    """
    path = join(uri, MANIFEST)
    if not exists(path):
        raise IncompleteOutputError(
            f"{uri}: no {MANIFEST}: not a finished stage output (the stage that writes it "
            "has not completed, or the URI is wrong)")
    try:
        manifest = json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: damaged manifest ({err}): run the stage that wrote {uri} again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "stage" not in manifest:
        raise DataError(f"{path}: not a stage manifest (no 'stage' and 'files'): run the stage that wrote "
                        f"{uri} again")
    return manifest


def finished_with_key(uri: str, key: str) -> dict[str, Any] | None:
    """The manifest at ``uri`` if it records ``key``, else None (a damaged manifest records nothing)."""
    try:
        manifest = read_manifest(uri)
    except (IncompleteOutputError, DataError):
        return None
    return manifest if manifest.get("key") == key else None


def stored_path(manifest: dict[str, Any], name: str) -> str:
    """Where the file ``name`` of ``manifest`` is stored, relative to the output."""
    return manifest.get("paths", {}).get(name, name)


def published_uri(uri: str, name: str, manifest: dict[str, Any] | None = None) -> str:
    """The URI of the published file ``name`` of the stage output at ``uri``."""
    manifest = read_manifest(uri) if manifest is None else manifest
    if name not in manifest["files"]:
        raise DataError(f"{join(uri, MANIFEST)} lists no {name!r} (it has {sorted(manifest['files'])}): "
                        f"{uri} is not the output of the stage expected here")
    return join(uri, stored_path(manifest, name))


def read_published(uri: str, name: str, manifest: dict[str, Any] | None = None, check_hash: bool = False) -> bytes:
    """The bytes of the published file ``name`` of the stage output at ``uri``, checked against its
    manifest: the size always (when recorded), the SHA-256 with ``check_hash``.

    Raises:
        DataError: the file differs from what the manifest promises (the message names the file and
            both values), or the manifest does not list it.
        FileNotFoundError: the file is missing.
    """
    manifest = read_manifest(uri) if manifest is None else manifest
    path = published_uri(uri, name, manifest)
    data = read_bytes(path)
    redo = f"the file was damaged or replaced; run the stage that wrote {uri} again"
    if check_hash:
        digest = sha256_bytes(data)
        if digest != manifest["files"][name]:
            raise DataError(f"{path}: SHA-256 {digest}, but {join(uri, MANIFEST)} promises "
                            f"{manifest['files'][name]}: {redo}")
    size = manifest.get("sizes", {}).get(name)
    if size is not None and len(data) != size:
        raise DataError(f"{path}: {len(data)} bytes, but {join(uri, MANIFEST)} promises {size}: {redo}")
    return data


def build_manifest(uri: str, *, stage: str, key: str, paths: dict[str, str], info: dict[str, Any],
                   hashed: dict[str, tuple[str, int]] | None = None) -> dict[str, Any]:
    """The manifest of the files ``paths`` (name -> stored path under ``uri``), hashed as stored: each file
    is read back, except those in ``hashed`` (name -> the SHA-256 and size of the bytes its writer stored,
    such as prepare-data's shards, each hashed by the worker that wrote it).

    The fingerprint is the SHA-256 of the key and the files' hashes: equal
    fingerprints mean equal outputs from equal inputs.
    """
    hashed = dict(hashed or {})
    for name, path in paths.items():
        if name not in hashed:
            data = read_bytes(join(uri, path))
            hashed[name] = sha256_bytes(data), len(data)
    hashes = {name: hashed[name][0] for name in paths}
    fingerprint = stage_key(stage, {"key": key}, hashes)
    stored = {name: path for name, path in paths.items() if path != name}
    return {"stage": stage, "key": key, "fingerprint": fingerprint, "files": hashes,
            "sizes": {name: hashed[name][1] for name in paths}, **({"paths": stored} if stored else {}),
            **info}


