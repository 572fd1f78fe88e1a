"""Prepared data: an ImageFolder packed into Parquet shards with a manifest.

``prepare_imagefolder`` reads every image once, checks that it decodes, and
writes ``{split}-{i:05d}.parquet`` files (columns ``image`` bytes as stored,
``label`` int32, ``path`` string; the images of a split in a fixed shuffled
order, in row groups of about ``ROW_GROUP_BYTES``, the unit a reader fetches;
each page with its CRC-32, which a reader checks) plus ``manifest.json`` last. The manifest
holds the class names, ``max_side`` (0: the images as they are) and a content
fingerprint: the SHA-256 over the class names and every image's split, relative
path, label and stored bytes' hash, so the same images at another URI have the
same fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from operator import attrgetter
from typing import NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from kd_lib.data.imagefolder import SPLITS, image_row, list_classes, list_images, load_rgb, open_image
from kd_lib.data.parallel import OrderedPool, read_and_apply
from kd_lib.data.transforms import CropTransform, PairedResize
from kd_lib.errors import DataError
from kd_lib.io.fs import filesystem, join, write_bytes
from kd_lib.io.manifest import published_uri, read_manifest, stage_key
from kd_lib.io.publish import Publication

SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("path", pa.string())])
#: The target size of a shard's row groups: what a reader fetches and caches to get one image.
ROW_GROUP_BYTES = 4 << 20
#: Row groups a reader keeps (per process and loader worker); EpochBatchSampler's shuffle window.
CACHED_GROUPS = 16

T = TypeVar("T")


def shuffled(records: list) -> list:
    """``records`` in a fixed pseudo-random order: the order a split is written in, so that every row
    group holds a sample of all classes (a listing is sorted by class) and a window of a few row groups is
    a fair sample of the split. The order depends on the listing alone, so the shards and the fingerprint
    stay a function of the data."""
    return [records[i] for i in np.random.default_rng(0).permutation(len(records))]


class ShardWriter(Publication):
    """Writes one prepare-data output: Parquet shards, then the manifest (see
    :class:`~kd_lib.io.publish.Publication`: an earlier output under ``out``
    stays whole until the new manifest replaces it). The manifest takes each
    shard's hash from the process that wrote it, rather than reading the
    shards back. Used as a context manager: an error inside the block removes
    the shards written so far, so nothing is published.
    """

    def __init__(self, out: str, schema: pa.Schema = SCHEMA):
        super().__init__(out, "prepare-data", key="")
        self.schema = schema
        self.shards: dict[str, list[str]] = {}
        self.hashed: dict[str, tuple[str, int]] = {}

    def write_split(self, pool: OrderedPool, split: str, root: str, items: list[T], shard_size: int,
                    row: Callable[[T, bytes, str], dict], path: Callable[[T], str]) -> Iterator[tuple[T, dict]]:
        """Write ``items`` as the shards of ``split``, ``shard_size`` items each, one shard a task of ``pool``
        (:func:`write_shard`); yields each item and what its row holds besides the schema's columns, in order.
        :attr:`shards` lists the shards of each split."""
        numbered = list(enumerate(items[start:start + shard_size] for start in range(0, len(items), shard_size)))
        task = partial(write_shard, row=row, path=path, root=root, folder=self.folder, split=split,
                       schema=self.schema)
        names = self.shards.setdefault(split, [])
        for (_, shard), written in zip(numbered, pool.map(task, numbered)):
            names.append(written.name)
            self.hashed[written.name] = written.sha256, written.size
            yield from zip(shard, written.kept)

    def publish(self, fingerprint: str, info: dict) -> dict:
        """Write the manifest (``info`` plus the data fingerprint), then drop the earlier shards."""
        self.key = stage_key("prepare-data", {}, {"data": fingerprint})
        return self.commit([name for names in self.shards.values() for name in names],
                           {**info, "data_fingerprint": fingerprint}, self.hashed)


class WrittenShard(NamedTuple):
    """A shard :func:`write_shard` wrote: its file name, the SHA-256 and size of its bytes, and, for each
    row, what it holds besides the schema's columns."""
    name: str
    sha256: str
    size: int
    kept: list[dict]


def write_shard(numbered: tuple[int, list[T]], *, row: Callable[[T, bytes, str], dict], path: Callable[[T], str],
                root: str, folder: str, split: str, schema: pa.Schema) -> WrittenShard:
    """Shard ``index`` of ``split`` from ``numbered = (index, items)``: the rows ``row(item, data, uri)`` of the
    files ``root/path(item)`` (:func:`~kd_lib.data.parallel.read_and_apply`), written under ``folder`` as
    ``{split}-{index:05d}.parquet`` in row groups of about ``ROW_GROUP_BYTES``, and hashed."""
    index, items = numbered
    rows = read_and_apply(row, root, items, path)
    name = f"{split}-{index:05d}.parquet"
    columns = {column: [values[column] for values in rows] for column in schema.names}
    table = pa.table({column: binary_array(values) if schema.field(column).type == pa.binary() else values
                      for column, values in columns.items()}, schema=schema)
    group = max(1, int(table.num_rows * ROW_GROUP_BYTES / max(1, table.nbytes)))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none", row_group_size=group, write_statistics=False,
                   write_page_checksum=True)
    data = buffer.getbuffer()  # no copy: a worker holds a shard's images, their column and this file
    write_bytes(join(folder, name), data)
    return WrittenShard(name, hashlib.sha256(data).hexdigest(), len(data),
                        [{key: value for key, value in values.items() if key not in schema.names} for values in rows])


def binary_array(values: list[bytes]) -> pa.Array:
    """``pa.array(values, pa.binary())``, made from one joined buffer and its offsets (several times faster
    for many large values); ``pa.array`` itself past binary's 2 GiB, which it splits into chunks."""
    sizes = np.fromiter(map(len, values), np.int64, len(values))
    if sizes.sum() >= 2 ** 31:
        return pa.array(values, pa.binary())
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    return pa.Array.from_buffers(pa.binary(), len(values),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))])


def prepare_imagefolder(source: str, out: str, shard_size: int = 1024, max_per_class: int = 0,
                        classes: list[str] | None = None, num_workers: int = 0, follow_links: bool = False,
                        max_side: int = 0) -> dict:
    """Validate the ImageFolder at ``source`` and publish it as shards under ``out``.

    ``max_per_class > 0`` keeps the first ``max_per_class`` images (in sorted
    path order) of each class in each split: a quick, reproducible subset.
    ``classes`` keeps only those class folders, labelled in that order.
    ``num_workers`` processes read, decode and hash the images and write the
    shards, one shard a task (0: this process); the shards and the fingerprint
    do not depend on it (:class:`~kd_lib.data.parallel.OrderedPool`). An image
    that is a link out of ``source`` is an error unless ``follow_links``.
    ``max_side > 0`` stores each image whose shorter side is longer resized to
    it, as a JPEG (:func:`~kd_lib.data.imagefolder.bounded`; bounded resolution,
    as FFCV stores ImageNet), and the manifest records ``max_side``, which a
    training stage checks its ``hr_size`` against.

    On any error, the shards written so far are removed and no manifest is
    written; the error names the offending file or folder. An earlier output
    under ``out`` stays whole until the new manifest replaces it; its shards
    are removed after that.
    """
    classes = list_classes(source, classes)
    records = list_images(source, classes, follow_links)
    if max_per_class:
        seen: Counter = Counter()
        kept = []
        for record in records:
            seen[record.split, record.label] += 1
            if seen[record.split, record.label] <= max_per_class:
                kept.append(record)
        records = kept
    digest = hashlib.sha256("\n".join(classes).encode())
    splits: dict[str, dict] = {}
    short_sides: Counter = Counter()
    with ShardWriter(out) as writer, OrderedPool(num_workers) as pool:
        # closed on an error too: its line ends before the error is printed
        with tqdm(total=len(records), desc="prepare-data", unit="img") as progress:
            for split in SPLITS:
                split_records = shuffled([r for r in records if r.split == split])
                for record, kept in writer.write_split(pool, split, source, split_records, shard_size,
                                                       partial(image_row, max_side=max_side), attrgetter("path")):
                    short_sides[kept["side"]] += 1
                    digest.update(f"{record.path}\t{record.label}\t{kept['sha256']}\n".encode())
                    progress.update()
                splits[split] = {"images": len(split_records), "shards": writer.shards[split]}
    return writer.publish(digest.hexdigest(), {"task": "classification", "source": source, "classes": classes,
                                               "num_classes": len(classes), "splits": splits, "max_side": max_side,
                                               "short_sides": dict(sorted(short_sides.items(), key=lambda kv: int(kv[0])))})


class StreamedSplit(torch.utils.data.Dataset):
    """One split of prepared data (classification or detection), read from its shards as needed.

    Opening the split reads the shards' footers and the small per-item
    ``columns`` (labels, annotations) into :attr:`table`; :meth:`encoded`
    reads the row group that holds an item (range reads from object storage,
    through fsspec), and each process and loader worker keeps the last
    :data:`CACHED_GROUPS` row groups it read. Memory is therefore bounded by
    the cache and grows with the split only by those columns. ``blocks``, the
    row groups' sizes in item order, lets
    :class:`kd_lib.data.sampler.EpochBatchSampler` shuffle within windows of
    row groups, so that a batch hits the cache. Each shard's size is checked
    against the manifest on opening, and each page it reads against the page's
    CRC-32 (a flipped byte stops the stage naming the shard, for about the
    cost of a copy).
    """

    #: whether each page read is checked against its CRC-32 (bench/data_scale.py turns it off on one
    #: copy, to measure what the check costs)
    verify_pages = True

    def __init__(self, data: str, split: str, columns: list[str], schema: pa.Schema, manifest: dict | None = None):
        self.data = data
        self.manifest = manifest or read_manifest(data)
        self.files = [self._checked(name) for name in self.manifest["splits"][split]["shards"]]
        tables, self.groups, self.blocks = [], [], []  # groups: (file, row group) of each block
        for number, uri in enumerate(self.files):
            with self._open(uri) as shard:
                tables.append(shard.read(columns=columns))
                for group in range(shard.num_row_groups):
                    self.groups.append((number, group))
                    self.blocks.append(shard.metadata.row_group(group).num_rows)
        self.table: pa.Table = pa.concat_tables(tables) if tables else schema.empty_table().select(columns)
        self.starts = np.cumsum([0, *self.blocks])
        self.cache: OrderedDict[int, pa.Table] = OrderedDict()

    def _checked(self, name: str) -> str:
        """The URI of shard ``name``, once its size is checked against the manifest."""
        uri = published_uri(self.data, name, self.manifest)
        fs, path = filesystem(uri)
        size, promised = fs.size(path), self.manifest.get("sizes", {}).get(name)
        if promised is not None and size != promised:
            raise self._damaged(uri, f"{size} bytes, but the manifest of {self.data} promises {promised}")
        return uri

    def _damaged(self, uri: str, what: str) -> DataError:
        return DataError(f"{uri}: {what}: the file was damaged or replaced; run the stage that wrote {self.data} "
                         "again")

    @contextlib.contextmanager
    def _open(self, uri: str) -> Iterator[pq.ParquetFile]:
        """Shard ``uri``, each page read checked against its CRC-32; a damaged shard is a
        :class:`DataError` naming it."""
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as file:
            try:
                yield pq.ParquetFile(file, page_checksum_verification=self.verify_pages)
            except (OSError, pa.ArrowException) as err:
                raise self._damaged(uri, str(err)) from None

    def _group(self, block: int) -> pa.Table:
        """The images and paths of row group ``block``, from the cache or read."""
        if block in self.cache:
            self.cache.move_to_end(block)
        else:
            number, group = self.groups[block]
            with self._open(self.files[number]) as shard:
                self.cache[block] = shard.read_row_group(group, columns=["image", "path"])
            if len(self.cache) > CACHED_GROUPS:
                self.cache.popitem(last=False)
        return self.cache[block]

    def encoded(self, index: int) -> tuple[bytes, str]:
        """Item ``index``'s image bytes, as stored, and its path (for errors), read from its row group."""
        block = int(np.searchsorted(self.starts, index, side="right")) - 1
        row, group = index - int(self.starts[block]), self._group(block)
        return group.column("image")[row].as_py(), group.column("path")[row].as_py()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "cache": OrderedDict()}  # a loader worker starts with its own empty cache

    def __len__(self) -> int:
        return self.table.num_rows


class ShardedImageDataset(StreamedSplit):
    """One split of prepared classification data (streamed, see :class:`StreamedSplit`); items are
    ``(transform(rgb_image, seed), label)``: the uint8 ``(hr_size, hr_size, 3)`` crop and the class index.

    ``pairing``, the transform's, makes the normalized HR and LR batches of a
    batch of crops on the training device
    (:func:`kd_lib.engine.loop.paired_batches`). Opening reads the labels
    (4 bytes an image). Decoding happens per item, in the loader's workers, at
    the smallest DCT scale of a JPEG that the item's crop allows
    (:meth:`~kd_lib.data.transforms.CropTransform.draft`). Indices are
    ``(index, seed)`` pairs from the sampler or plain ints (seed 0).
    """

    def __init__(self, data: str, split: str, transform: CropTransform):
        super().__init__(data, split, ["label"], SCHEMA)
        self.classes: list[str] = self.manifest["classes"]
        self.labels = self.table.column("label").to_numpy()
        self.transform = transform
        self.pairing: PairedResize = transform.pairing

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        data, path = self.encoded(index)
        image = open_image(data, path)  # the header only: the crop is drawn on it before anything is decoded
        crop = self.transform.draft(image, seed)
        return self.transform.crop(load_rgb(image, path), crop), int(self.labels[index])
