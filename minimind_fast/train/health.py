"""The health of a run: consecutive bad optimizer steps, counted on the device.

A step is bad when its loss is NaN/inf or it was skipped because a gradient was non-finite
(the fused AdamW / GradScaler skip). `update` runs every step without a host sync; `check` syncs
once (at log, save and end points) and tells whether the run is healthy now (the last step was
good) and whether `max_bad_steps` consecutive bad steps have been reached. A checkpoint saved
while unhealthy is marked so; a run that reaches the limit stops with exit code 1, pointing to
its newest healthy checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import distributed


class TrainingUnhealthy(RuntimeError):
    """The run had `max_bad_steps` consecutive bad optimizer steps, or non-finite weights."""


@dataclass
class HealthReport:
    streak: int  # consecutive bad steps up to the last one (0: the last step was good)
    tripped_at: Optional[int]  # first step of the streak that reached the limit, else None

    @property
    def healthy(self) -> bool:
        return self.streak == 0


class Health:
    def __init__(self, max_bad_steps: int, device: torch.device):
        self.max_bad_steps = max_bad_steps
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.tripped_at = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, step: int, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        """Record optimizer step `step` (1-based): loss () and skipped () (1.0 = skipped)."""
        bad = ~torch.isfinite(loss) | (skipped > 0)
        self.streak = torch.where(bad, self.streak + 1, 0)
        reached = (self.streak >= self.max_bad_steps) & (self.tripped_at < 0)
        self.tripped_at = torch.where(reached, step - self.max_bad_steps + 1, self.tripped_at)

    def check(self, context) -> HealthReport:
        """One host sync; the worst of all ranks."""
        values = distributed.all_reduce(
            torch.stack([self.streak, self.tripped_at]), context, op="max"
        )
        streak, tripped_at = values.tolist()
        return HealthReport(streak, tripped_at if tripped_at >= 0 else None)


def weights_finite(parameters) -> bool:
    """Whether every parameter is finite: one fused max-abs reduction, one host sync."""
    tensors = [p.detach() for p in parameters]
    return bool(
        torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"), foreach=True))
    )
