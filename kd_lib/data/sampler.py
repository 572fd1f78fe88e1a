"""Seeded, resumable batches: which images, in which order, with which crop seed.

Epoch ``e`` of a run with seed ``s`` is a permutation drawn from a generator
seeded with ``(s, e)``, and each position gets its own augmentation seed from
the same generator. A run resumed at batch ``b`` of epoch ``e`` therefore sees
exactly the batches an uninterrupted run would have seen.

Under data-parallel training each batch is split between the processes:
process ``r`` of ``W`` reads the ``r``-th of ``W`` equal slices of every
batch, so together they read exactly the batches of a single process, and
each takes the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class EpochBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, augmentation_seed)`` for one epoch, or this process's slice of each.

    The last incomplete batch is dropped (a batch of one breaks BatchNorm in
    training), so an epoch has ``len(self)`` = ``n // batch_size`` batches.
    ``batch_size`` is the whole batch; process ``rank`` of ``world_size``
    gets ``batch_size // world_size`` items of each.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_items < batch_size:
            raise ValueError(f"{num_items} training images are fewer than one batch of {batch_size}: "
                             "lower batch_size")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over {world_size} processes, "
                             f"and rank {rank} must be one of them")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.share = batch_size // world_size
        self.offset = rank * self.share

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        seeds = torch.randint(2**31 - 1, (self.num_items,), generator=generator).tolist()
        for batch in range(self.start_batch, self.num_items // self.batch_size):
            first = batch * self.batch_size + self.offset
            yield [(order[p], seeds[p]) for p in range(first, first + self.share)]
