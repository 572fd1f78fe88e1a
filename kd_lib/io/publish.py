"""Publishing a stage output so that one whole version is published at every moment.

A :class:`Publication` writes the new files under a folder of their own,
``OUT/v-<token>/``, never over the published ones; :meth:`~Publication.commit`
then writes ``OUT/manifest.json`` (one atomic write: the commit point), whose
``paths`` name the new files, and only after that removes the files of the
output it replaced. A failure before the commit leaves the previous manifest
and every file it names in place, and removes the new files; a failure after
it leaves the new output published and, at worst, old files behind.

Nothing is removed that the stage did not write: the replaced output's files
go only when its manifest names the same stage; the manifest and whatever
else lies under ``OUT`` (checkpoints, another stage's files) stay.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

from kd_lib.errors import DataError
from kd_lib.io.fs import join, remove, remove_if_empty, write_text
from kd_lib.io.manifest import MANIFEST, IncompleteOutputError, build_manifest, read_manifest, stored_path


def previous_manifest(out: str) -> dict[str, Any] | None:
    """The manifest published at ``out``, or None (none, or a damaged one)."""
    try:
        return read_manifest(out)
    except (IncompleteOutputError, DataError):
        return None


class Publication:
    """One new version of the output of ``stage`` under ``out`` (module docstring).

    Files are written under :attr:`folder`; ``commit(files, info)`` publishes
    them. As a context manager, an error inside the block removes the new
    files. An output that holds others (the detection-distill stage's ``assistant/`` and
    ``student/`` detector folders) publishes them through :meth:`child`.
    """

    def __init__(self, out: str, stage: str, key: str):
        self.out, self.stage, self.key = out, stage, key
        self.version = f"v-{uuid.uuid4().hex[:12]}"
        self.folder = join(out, self.version)
        self.previous = previous_manifest(out)
        self.children: dict[str, Publication] = {}
        self.parent: Publication | None = None
        self.manifest: dict[str, Any] | None = None

    def child(self, name: str, stage: str) -> Publication:
        """The publication of the output ``out/name`` of ``stage``, part of this one: its files are
        listed in this manifest as ``name/FILE``, and this commit removes what it replaced."""
        child = Publication(join(self.out, name), stage, self.key)
        child.parent = self
        self.children[name] = child
        return child

    def __enter__(self) -> Publication:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.discard()

    def discard(self) -> None:
        """Remove the files written for this version and its children's, unless committed."""
        for child in self.children.values():
            child.discard()
        if self.manifest is None:
            remove(self.folder, recursive=True)

    def commit(self, files: list[str], info: dict[str, Any],
               hashed: dict[str, tuple[str, int]] | None = None) -> dict[str, Any]:
        """Write the manifest of ``files`` (names under :attr:`folder`; ``hashed``: the SHA-256 and size of
        those their writer hashed, :func:`~kd_lib.io.manifest.build_manifest`) and of the committed
        children's files, then remove the replaced output's files (unless this is a child); returns the
        manifest."""
        paths = {name: posixpath.join(self.version, name) for name in files}
        for name, child in self.children.items():
            paths.update({f"{name}/{file}": f"{name}/{stored_path(child.manifest, file)}"
                          for file in child.manifest["files"]})
        try:
            manifest = build_manifest(self.out, stage=self.stage, key=self.key, paths=paths, info=info,
                                      hashed=hashed)
            write_text(join(self.out, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
        except BaseException:
            self.discard()
            raise
        self.manifest = manifest
        if self.parent is None:
            self.remove_replaced()
        else:  # what the published parent still names stays until the parent's commit
            self.remove_replaced(self.parent.published_uris())
        return self.manifest

    def published_uris(self) -> set[str]:
        """The URIs of the files that the manifest this publication replaces names."""
        previous = self.previous or {"files": {}}
        return {join(self.out, stored_path(previous, name)) for name in previous["files"]}

    def remove_replaced(self, keep: set[str] = frozenset()) -> None:
        """Remove the files that the replaced manifest named and the new one does not, if the same stage
        wrote them, and the folders they leave empty, but not those in ``keep`` (URIs); then the same
        for the children."""
        for child in self.children.values():
            child.remove_replaced()
        previous, current = self.previous, self.manifest or {}
        if previous is None or previous.get("stage") != self.stage:
            return
        current_paths = {stored_path(current, name) for name in current.get("files", {})}
        for name in previous["files"]:
            path = stored_path(previous, name)
            uri = join(self.out, path)
            if path not in current_paths and posixpath.basename(path) != MANIFEST and uri not in keep:
                remove(uri)
                folder = posixpath.dirname(path)
                if folder:
                    remove_if_empty(join(self.out, folder))
