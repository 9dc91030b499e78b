"""TrainState: all progress of a run and the arithmetic of resuming it.

One object owns where a run is (optimizer step, epoch, samples consumed in the epoch), what it
runs towards (total and warmup steps of the LR schedule), which run it is (run id) and which
data it saw (the token cache's content digest). The checkpoint stores `state_dict()`; resume
goes through `load_state_dict()`, which validates every field before anything is used. Follows
torchtitan's TrainState (one stateful progress object that the checkpointer saves and loads).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..data import ResumableSampler


class StateError(ValueError):
    """A saved train state is missing a field or holds an impossible value."""


@dataclass
class TrainState:
    run_id: str
    num_samples: int  # training rows per epoch (global, all ranks)
    data_digest: str = ""  # content digest of the token cache the rows come from
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch, 0-based
    consumed: int = 0  # samples of the current epoch consumed by all ranks together
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch
    total_steps: int = 0  # the LR schedule's length
    warmup_steps: int = 0

    @property
    def epoch_of_step(self) -> int:
        """The 1-based epoch of the last step taken (an epoch's last step moves `epoch` on)."""
        return self.epoch if self.step_in_epoch == 0 and self.step > 0 else self.epoch + 1

    def start_step(self, rows: int) -> None:
        """Count `rows` samples (global) as consumed by the step being taken."""
        self.consumed += rows

    def finish_step(self, end_of_epoch: bool) -> None:
        self.step += 1
        self.step_in_epoch += 1
        if end_of_epoch:
            self.next_epoch()

    def next_epoch(self) -> None:
        self.epoch, self.consumed, self.step_in_epoch = self.epoch + 1, 0, 0

    def remaining_steps(
        self, epochs: int, batch_size: int, accumulation_steps: int, world_size: int
    ) -> int:
        """Optimizer steps left in epochs [epoch, epochs) from `consumed` samples into `epoch`."""
        steps = 0
        for epoch in range(self.epoch, epochs):
            consumed = self.consumed if epoch == self.epoch else 0
            rows = len(ResumableSampler(self.num_samples, 0, 0, 0, world_size, consumed))
            steps += math.ceil(math.ceil(rows / batch_size) / accumulation_steps)
        return steps

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, values, source: str = "checkpoint") -> "TrainState":
        """Validate a saved state: every field present, of the right type, and consistent."""
        if not isinstance(values, dict):
            raise StateError(f"{source}: train_state is {type(values).__name__}, not a dict")
        kwargs = {}
        for field in fields(cls):
            if field.name not in values:
                raise StateError(f"{source}: train_state has no '{field.name}'")
            value = values[field.name]
            if field.type == "str":
                ok = isinstance(value, str)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            if not ok:
                kind = "a string" if field.type == "str" else "an integer >= 0"
                raise StateError(f"{source}: train_state.{field.name}={value!r} must be {kind}")
            kwargs[field.name] = value
        state = cls(**kwargs)
        if not state.run_id:
            raise StateError(f"{source}: train_state.run_id is empty")
        if state.consumed > state.num_samples:
            raise StateError(
                f"{source}: train_state.consumed={state.consumed} exceeds the epoch's "
                f"num_samples={state.num_samples}"
            )
        if state.step_in_epoch > state.step or state.warmup_steps > max(state.total_steps, 0):
            raise StateError(
                f"{source}: train_state is inconsistent (step {state.step}, step_in_epoch "
                f"{state.step_in_epoch}, warmup {state.warmup_steps} of {state.total_steps})"
            )
        return state
