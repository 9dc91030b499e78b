"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr`.

A pure function of the global optimizer step (nanoGPT's `get_lr`), so the value at step s is the
same after a resume and under any world size; nothing is stored in the optimizer or a scheduler
object. MiniMind's `get_lr` is the special case warmup_steps=0, min_lr=lr/10.
"""
from __future__ import annotations

import math
from typing import Optional


def learning_rate_at(step: int, total_steps: int, max_lr: float, min_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate of optimizer step `step` (0-based: the step about to be taken).

    - step < warmup_steps: max_lr * (step + 1) / warmup_steps (linear; the last warmup step
      reaches max_lr, step 0 is never 0);
    - warmup_steps <= step <= total_steps: min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2
      with p = (step - warmup_steps) / (total_steps - warmup_steps), so p=0 -> max_lr, p=1 -> min_lr;
    - step > total_steps: min_lr.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # > 0 here: warmup <= step < total
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup_steps(total_steps: int, warmup_steps: Optional[int], warmup_ratio: float) -> int:
    """--warmup_steps when given, else round(warmup_ratio * total_steps); never above total_steps."""
    steps = warmup_steps if warmup_steps is not None else int(round(warmup_ratio * total_steps))
    return max(0, min(int(steps), int(total_steps)))
