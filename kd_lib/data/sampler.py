"""Seeded, resumable batches: which images, in which order, with which crop seed.

Epoch ``e`` of a run with seed ``s`` is a permutation drawn from a generator
seeded with ``(s, e)``, and each position gets its own augmentation seed from
the same generator. A run resumed at batch ``b`` of epoch ``e`` therefore sees
exactly the batches an uninterrupted run would have seen.

Streamed data comes in blocks (a shard's row groups, which a reader fetches
whole and caches, :class:`kd_lib.data.shards.ShardedImageDataset`). With
more blocks than ``window``, the permutation is a windowed shuffle, as
streaming loaders do: the blocks in a random order, then the items of each
``window`` consecutive blocks in a random order. A batch then reads from at
most ``window`` blocks, which the reader's cache holds. With ``window``
blocks or fewer it is a plain permutation of all items.

Under data-parallel training each batch is split between the processes:
process ``r`` of ``W`` reads the ``r``-th of ``W`` equal slices of every
batch, so together they read exactly the batches of a single process, and
each takes the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from kd_lib.config import ConfigError
from kd_lib.data.shards import CACHED_GROUPS


class EpochBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, augmentation_seed)`` for one epoch, or this process's slice of each.

    The last incomplete batch is dropped (a batch of one breaks BatchNorm in
    training), so an epoch has ``len(self)`` = ``n // batch_size`` batches.
    ``batch_size`` is the whole batch; process ``rank`` of ``world_size``
    gets ``batch_size // world_size`` items of each.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, blocks: Sequence[int] = (), window: int = CACHED_GROUPS):
        if num_items < batch_size:
            raise ConfigError("batch_size", f"{num_items} training images are fewer than one batch of "
                              f"{batch_size}: lower batch_size")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ConfigError("batch_size", f"{batch_size} must split evenly over {world_size} processes, "
                              f"and rank {rank} must be one of them")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        if blocks and sum(blocks) != num_items:
            raise ValueError(f"blocks of {sum(blocks)} items in all, but {num_items} items")
        self.share = batch_size // world_size
        self.offset = rank * self.share
        self.blocks, self.window = list(blocks), window

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self._order(generator)
        seeds = torch.randint(2**31 - 1, (self.num_items,), generator=generator).tolist()
        for batch in range(self.start_batch, self.num_items // self.batch_size):
            first = batch * self.batch_size + self.offset
            yield [(order[p], seeds[p]) for p in range(first, first + self.share)]

    def _order(self, generator: torch.Generator) -> list[int]:
        """The epoch's permutation of the items (the module docstring)."""
        if len(self.blocks) <= self.window:
            return torch.randperm(self.num_items, generator=generator).tolist()
        starts = torch.tensor([0, *self.blocks]).cumsum(0)
        blocks = torch.randperm(len(self.blocks), generator=generator).tolist()
        order = []
        for first in range(0, len(blocks), self.window):
            items = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in blocks[first:first + self.window]])
            order += items[torch.randperm(len(items), generator=generator)].tolist()
        return order
