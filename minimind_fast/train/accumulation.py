"""How the micro-batches of one optimizer step are weighted.

Each micro-batch's loss is the mean over its own scored targets (labels other than -100, after
the model's shift). With the default recipe an optimizer step minimises the mean over every
scored target of the step, on all ranks: micro-batch i is weighted by its share n_i / N of the
step's N scored targets, times the world size (DDP averages the ranks' gradients). So a window
of micro-batches, or W ranks, computes exactly what one big batch would, also when rows score
different numbers of tokens (padded rows, conversations). For packed pretraining every
micro-batch scores the same count and the weight is exactly 1 / window. The MiniMind recipe
weights each micro-batch's mean by 1 / window, as MiniMind's trainer does.
"""

from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX
from . import distributed


def scored_targets(batch: dict[str, torch.Tensor]) -> int:
    """Targets that carry loss in a batch {"labels": (B, T)}: position t predicts labels[t + 1]."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_batch_weights(counts: list[int], recipe: str, context) -> list[float]:
    """The factor of each micro-batch's mean loss in the step's objective (see above); one small
    all-reduce over the host control group when distributed."""
    window = len(counts)
    if recipe == "minimind":
        return [1.0 / window] * window
    total = distributed.sum_over_ranks(sum(counts), context)
    if total == 0:  # nothing scored anywhere: every loss is 0 and so is every gradient
        return [0.0] * window
    return [count * context.world_size / total for count in counts]
