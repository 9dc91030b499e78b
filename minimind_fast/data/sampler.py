"""Deterministic, resumable, DDP-sharded sampling and the DataLoader that batches it.

The order of an epoch is one global permutation, `torch.randperm(N)` under a generator seeded from
(seed, epoch) (identity when shuffle=False), truncated to a multiple of world_size. Seeding
"mixed" (default) mixes the pair so that nearby seeds give unrelated orders; "sum" seeds the
generator with seed + epoch, as MiniMind's trainer does (`setup_seed(42 + epoch);
torch.randperm(len(ds))`), so one process reads MiniMind's exact order. Rank r reads
order[consumed + r :: world_size], where `consumed` counts the samples of this epoch already
consumed by all ranks together. Hence (as in torchtitan's / Megatron's resumable samplers):
- resuming at any `consumed`, with any world size, continues at exactly the same place in the
  global order, without reading what was consumed;
- world_size W with batch B sees, per step, the same samples as world_size 1 with batch W*B.

`make_dataloader` wraps it with a collate that stacks dicts of LongTensors; `count_tokens` gives
the number of label tokens that carry loss (the tokens/s numerator).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..constants import IGNORE_INDEX


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")
    return int(value)


SEEDINGS = ("mixed", "sum")


def epoch_order(
    num_samples: int, seed: int, epoch: int, shuffle: bool = True, seeding: str = "mixed"
) -> torch.Tensor:
    """The global sample order of one epoch: (num_samples,) int64, a permutation of range(N)."""
    if seeding not in SEEDINGS:
        raise ValueError(f"seeding={seeding!r}: use one of {', '.join(SEEDINGS)}")
    if not shuffle:
        return torch.arange(num_samples, dtype=torch.int64)
    if seeding == "sum":  # torch.manual_seed(s) seeds the default generator exactly like this
        return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    # SeedSequence mixes (seed, epoch) so that e.g. (0, 1) and (1, 0) give unrelated orders.
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]) >> 1
    generator = torch.Generator().manual_seed(mixed)
    return torch.randperm(num_samples, generator=generator)


class ResumableSampler(Sampler[int]):
    """Yields this rank's share of the global order of `epoch`, starting after `consumed` samples.

    consumed: samples of this epoch already consumed globally (all ranks), e.g. step * B * W.
    All ranks yield the same number of samples (the global tail that does not divide evenly
    among the ranks is dropped), so DDP ranks never disagree on the number of steps.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        consumed: int = 0,
        shuffle: bool = True,
        seeding: str = "mixed",
    ):
        self.num_samples = _non_negative_int("num_samples", num_samples)
        self.seed = _non_negative_int("seed", seed)
        self.epoch = _non_negative_int("epoch", epoch)
        self.world_size = _non_negative_int("world_size", world_size)
        if self.world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self.rank = _non_negative_int("rank", rank)
        if self.rank >= self.world_size:
            raise ValueError(f"rank={rank} must be < world_size={world_size}")
        self.shuffle = bool(shuffle)
        if seeding not in SEEDINGS:
            raise ValueError(f"seeding={seeding!r}: use one of {', '.join(SEEDINGS)}")
        self.seeding = seeding
        self.set_epoch(epoch, consumed)

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Move to `epoch`, `consumed` samples in (a new epoch starts at consumed=0)."""
        self.epoch = _non_negative_int("epoch", epoch)
        self.consumed = _non_negative_int("consumed", consumed)
        if self.consumed > self.num_samples:
            raise ValueError(
                f"consumed={consumed} exceeds the {self.num_samples} samples of an epoch; "
                "resume with consumed in [0, num_samples] or start the next epoch"
            )

    def _bounds(self) -> tuple[int, int]:
        total = self.num_samples // self.world_size * self.world_size
        start = min(self.consumed, total)
        per_rank = (total - start) // self.world_size
        return start, per_rank

    def __len__(self) -> int:
        return self._bounds()[1]

    def __iter__(self) -> Iterator[int]:
        start, per_rank = self._bounds()
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle, self.seeding)
        first = start + self.rank
        mine = order[first : first + per_rank * self.world_size : self.world_size]
        for chunk in mine.split(1 << 16):  # bounded Python-int overhead for huge epochs
            yield from chunk.tolist()


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of {"input_ids": (T,), "labels": (T,)} into
    {"input_ids": (B, T), "labels": (B, T)}."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over `sampler` with `collate`; keeps the trailing partial batch
    (drop_last=False)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    num_workers = _non_negative_int("num_workers", num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
    )


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of label tokens that are not IGNORE_INDEX in a batch {"labels": (B, T), ...}."""
    return int((batch["labels"] != IGNORE_INDEX).sum())
