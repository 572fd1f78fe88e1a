"""prepare-data: validate an ImageFolder (any fsspec URI) and publish it as
Parquet shards with a manifest holding the class names and a content
fingerprint. Every image is decoded once: a corrupt image, an empty class
folder or classes that differ between train/ and val/ stop the stage with an
error naming the file or folder, and nothing is published. ``max_per_class``
keeps the first N images of each class in each split (0: all)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from components.common import stage_cli
from kd_lib.config import check
from kd_lib.data.shards import prepare_imagefolder


@dataclass
class PrepareDataConfig:
    source: str = ""
    out: str = ""
    shard_size: int = 4096
    max_per_class: int = 0

    def validate(self) -> None:
        check(bool(self.source), "source", "is required: an ImageFolder root with train/ and val/")
        check(bool(self.out), "out", "is required: where the shards and manifest go")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        check(self.max_per_class >= 0, "max_per_class", f"must be >= 0 (0: all), got {self.max_per_class}")


def run(config: PrepareDataConfig) -> dict:
    manifest = prepare_imagefolder(config.source, config.out, config.shard_size, config.max_per_class)
    print(f"prepare-data: {manifest['num_classes']} classes, "
          f"{manifest['splits']['train']['images']} train / {manifest['splits']['val']['images']} val images, "
          f"fingerprint {manifest['data_fingerprint'][:12]}", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    return stage_cli(PrepareDataConfig, run, argv, "kdp stage prepare-data", __doc__)


if __name__ == "__main__":
    sys.exit(main())
