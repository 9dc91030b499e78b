"""Learning-rate schedules, each a pure function of the run's position (nothing is stored in the
optimizer or a scheduler object, so a resume or another world size gives the same value).

- recipe default: linear warmup, then cosine decay to `min_lr`, at the 0-based optimizer step
  (nanoGPT's `get_lr`);
- recipe minimind: MiniMind's `get_lr` (trainer/trainer_utils.py),
  lr * (0.1 + 0.45 * (1 + cos(pi * s / S))), at MiniMind's own index: it sets the LR at every
  micro-batch, s = epoch * iters + the 1-based micro-batch of the epoch, S = epochs * iters
  (iters: micro-batches per epoch), and an optimizer step uses the value of its last micro-batch.
"""

from __future__ import annotations

import math
from typing import Optional


def learning_rate_at(
    step: int, total_steps: int, max_lr: float, min_lr: float, warmup_steps: int = 0
) -> float:
    """Learning rate of optimizer step `step` (0-based: the step about to be taken).

    - step < warmup_steps: max_lr * (step + 1) / warmup_steps (linear; the last warmup step
      reaches max_lr, step 0 is never 0);
    - warmup_steps <= step <= total_steps: min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2
      with p = (step - warmup_steps) / (total_steps - warmup_steps), so p=0 -> max_lr,
      p=1 -> min_lr;
    - step > total_steps: min_lr.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    # > 0 here: warmup <= step < total
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup_steps(total_steps: int, warmup_steps: Optional[int], warmup_ratio: float) -> int:
    """--warmup_steps when given, else round(warmup_ratio * total_steps); never above
    total_steps."""
    steps = warmup_steps if warmup_steps is not None else int(round(warmup_ratio * total_steps))
    return max(0, min(int(steps), int(total_steps)))


def minimind_learning_rate(micro_step: int, total_micro_steps: int, max_lr: float) -> float:
    """MiniMind's get_lr: max_lr * (0.1 + 0.45 * (1 + cos(pi * s / S))), s clamped to [0, S]."""
    if total_micro_steps < 1:
        raise ValueError(f"total_micro_steps={total_micro_steps} must be >= 1")
    s = min(max(micro_step, 0), total_micro_steps)
    return max_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * s / total_micro_steps)))


def micro_batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """MiniMind's `iters`: micro-batches of one rank per epoch (the sampler drops the tail of an
    epoch that does not divide among the ranks; the last micro-batch may be short)."""
    return math.ceil(num_samples // world_size / batch_size)


def minimind_micro_step(
    epoch: int, consumed: int, window: int, num_samples: int, batch_size: int, world_size: int
) -> int:
    """MiniMind's s for the window about to be taken: epoch * iters + the 1-based index in the
    epoch of the window's last micro-batch. consumed: samples of the epoch taken by all ranks."""
    iters = micro_batches_per_epoch(num_samples, batch_size, world_size)
    done = math.ceil(consumed / (batch_size * world_size))
    return epoch * iters + min(done + window, iters)


def minimind_total_micro_steps(
    total_steps: int, num_samples: int, batch_size: int, accumulation_steps: int, world_size: int
) -> int:
    """MiniMind's S: the micro-batches that `total_steps` optimizer steps cover (epochs * iters
    for a run of whole epochs; windows restart at each epoch, its last one may be short)."""
    iters = micro_batches_per_epoch(num_samples, batch_size, world_size)
    full_epochs, rest = divmod(total_steps, math.ceil(iters / accumulation_steps))
    return max(1, full_epochs * iters + min(rest * accumulation_steps, iters))


def step_learning_rate(args, state, window: int, world_size: int) -> float:
    """The learning rate of the optimizer step about to be taken under args.recipe.

    state: the run's TrainState (step, epoch, consumed, num_samples, total/warmup steps);
    window: micro-batches in this step.
    """
    if getattr(args, "recipe", "default") != "minimind":
        return learning_rate_at(
            state.step, state.total_steps, args.learning_rate, args.min_lr, state.warmup_steps
        )
    s = minimind_micro_step(
        state.epoch, state.consumed, window, state.num_samples, args.batch_size, world_size
    )
    total = minimind_total_micro_steps(
        state.total_steps, state.num_samples, args.batch_size, args.accumulation_steps, world_size
    )
    return minimind_learning_rate(s, total, args.learning_rate)
