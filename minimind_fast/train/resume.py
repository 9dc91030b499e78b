"""The resume state of a checkpoint (resume.pt): read it back and validate every part before use.

A resume state holds the fp32 model, the optimizer and GradScaler states, the TrainState, every
rank's RNG states, the world size, the config and every flag of the run. It is loaded with
`torch.load(weights_only=True)` (no code is ever unpickled) and checked field by field: a stale
or crafted file gives a one-line ValueError naming the file and the field, before anything of it
reaches the optimizer (a mis-shaped moment tensor would otherwise crash the fused AdamW kernel).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..checkpoints import RESUME_FILE
from ..config import MiniMindConfig
from ..weights import load_torch_file
from .state import StateError, TrainState

FORMAT_VERSION = 2
_FIX = (
    "the checkpoint is damaged or belongs to another model: start a new run in another --save_dir"
)
_ADAM_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SCALER_FIELDS = {
    "scale": float,
    "growth_factor": float,
    "backoff_factor": float,
    "growth_interval": int,
    "_growth_tracker": int,
}


def _fail(source: str, what: str) -> ValueError:
    return ValueError(f"{source}: {what}; {_FIX}")


def _upgrade(state: dict) -> dict:
    """A format-1 state (progress + schedule dicts) as format 2 (one train_state)."""
    progress, schedule = state.get("progress"), state.get("schedule")
    if isinstance(progress, dict) and isinstance(schedule, dict):
        state["train_state"] = dict(
            run_id=state.get("run_id"),
            num_samples=progress.get("num_samples"),
            data_digest="",
            step=progress.get("step"),
            epoch=progress.get("epoch"),
            consumed=progress.get("consumed"),
            step_in_epoch=progress.get("step_in_epoch"),
            total_steps=schedule.get("total_steps"),
            warmup_steps=schedule.get("warmup_steps"),
        )
    state["format_version"] = FORMAT_VERSION
    return state


def load_resume_state(checkpoint_dir) -> dict:
    """The resume state of a checkpoint directory, structurally validated (see `validate`)."""
    path = Path(checkpoint_dir) / RESUME_FILE
    state = load_torch_file(path)
    if not isinstance(state, dict) or state.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(
            f"{path} is not a minimind_fast resume state (format {FORMAT_VERSION}); start a new "
            "run in another --save_dir"
        )
    if state["format_version"] == 1:
        state = _upgrade(state)
    validate(state, str(path))
    return state


def load_latest_resume_state(
    checkpoint_dirs: list[Path], warn=print
) -> tuple[Optional[Path], Optional[dict]]:
    """(checkpoint dir, state) of the newest of `checkpoint_dirs` whose file reads back; an
    unreadable one (a damaged disk) is reported through `warn` and the next older one is tried.
    A state that reads but fails validation is an error, not skipped."""
    errors = []
    for candidate in reversed(checkpoint_dirs):
        try:
            return candidate, load_resume_state(candidate)
        except ValueError as error:
            if "cannot read" not in str(error) and "not a minimind_fast" not in str(error):
                raise
            warn(f"warning: skipping unreadable checkpoint {candidate}: {error}")
            errors.append(str(error))
    if errors:
        raise ValueError(
            f"no checkpoint can be read ({errors[0]}); start a new run in another --save_dir"
        )
    return None, None


def validate(state: dict, source: str) -> None:
    """Every part of a resume state except what needs the live optimizer (check_optimizer)."""
    for key, kind in (
        ("config", dict),
        ("model", dict),
        ("optimizer", dict),
        ("scaler", dict),
        ("train_state", dict),
        ("rng", list),
        ("args", dict),
        ("world_size", int),
    ):
        if key not in state:
            raise _fail(source, f"'{key}' is missing")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise _fail(source, f"'{key}' is {type(state[key]).__name__}, not {kind.__name__}")
    if state["world_size"] < 1:
        raise _fail(source, f"world_size={state['world_size']} must be >= 1")
    try:
        MiniMindConfig.from_dict(state["config"])
        TrainState.from_state_dict(state["train_state"], source)
    except (StateError, TypeError, ValueError) as error:
        raise _fail(source, str(error).removeprefix(f"{source}: ")) from None
    for key, tensor in state["model"].items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise _fail(source, f"model[{key!r}] is not a floating-point tensor")
    _check_scaler(state["scaler"], source)
    if len(state["rng"]) != state["world_size"]:
        raise _fail(
            source,
            f"rng holds {len(state['rng'])} rank states for world_size {state['world_size']}",
        )
    for rank, rng in enumerate(state["rng"]):
        check_rng_state(rng, f"{source}: rng[{rank}]")


def _check_scaler(scaler: dict, source: str) -> None:
    if not scaler:  # GradScaler was off (float32 / bfloat16)
        return
    for name, kind in _SCALER_FIELDS.items():
        value = scaler.get(name)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise _fail(source, f"scaler.{name}={value!r} is not a finite number")
        if kind is int and value != int(value) or (name != "_growth_tracker" and value <= 0):
            raise _fail(source, f"scaler.{name}={value!r} is out of range")


def check_optimizer(saved: Any, optimizer: torch.optim.Optimizer, source: str) -> None:
    """`saved` (an optimizer state_dict) fits `optimizer`: same groups, and every AdamW moment
    has its parameter's shape and a floating dtype."""
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("state"), dict)
        or not isinstance(saved.get("param_groups"), list)
    ):
        raise _fail(source, "optimizer has no 'state' dict and 'param_groups' list")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        raise _fail(
            source,
            f"optimizer has {len(saved['param_groups'])} parameter groups, this run {len(groups)}",
        )
    parameters = _saved_parameters(saved["param_groups"], groups, source)
    for key, entry in saved["state"].items():
        if key not in parameters or not isinstance(entry, dict):
            raise _fail(source, f"optimizer state for parameter {key!r} matches no parameter")
        for name, value in entry.items():
            _check_state_entry(
                f"optimizer.state[{key}].{name}", name, value, parameters[key], source
            )


def _saved_parameters(saved_groups: list, groups: list, source: str) -> dict:
    """Map each saved parameter id to this run's parameter, group by group, checking each saved
    group's size and hyperparameters."""
    parameters = {}
    for index, (saved_group, group) in enumerate(zip(saved_groups, groups)):
        ids = saved_group.get("params") if isinstance(saved_group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            raise _fail(
                source,
                f"optimizer param group {index} lists {len(ids or [])} parameters, this run "
                f"{len(group['params'])}",
            )
        for name in ("betas", "eps", "weight_decay"):
            if name in saved_group and not _numbers(saved_group[name]):
                raise _fail(
                    source, f"optimizer param group {index} has {name}={saved_group[name]!r}"
                )
        parameters.update(zip(ids, group["params"]))
    return parameters


def _check_state_entry(
    where: str, name: str, value: Any, parameter: torch.Tensor, source: str
) -> None:
    """One entry of a parameter's saved AdamW state: a finite `step` count, or a floating moment
    of the parameter's shape."""
    if not isinstance(value, torch.Tensor):
        if name != "step" or not _numbers(value):
            raise _fail(source, f"{where} is {type(value).__name__}, not a tensor")
    elif name == "step":
        if value.numel() != 1 or not bool(torch.isfinite(value).all()) or value.item() < 0:
            raise _fail(source, f"{where} is not one finite count")
    elif name not in _ADAM_TENSORS:
        raise _fail(source, f"{where} is not an AdamW state")
    elif tuple(value.shape) != tuple(parameter.shape) or not value.is_floating_point():
        raise _fail(
            source,
            f"{where} has shape {tuple(value.shape)} ({value.dtype}) but the parameter is "
            f"{tuple(parameter.shape)}",
        )


def _numbers(value) -> bool:
    values = value if isinstance(value, (tuple, list)) else [value]
    return all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


# ---- RNG state ---------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """python, numpy, torch CPU (and the current CUDA device's) generator states, as plain
    containers and tensors so torch.load(weights_only=True) reads them back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _as_numpy_state(numpy_state) -> tuple:
    kind, keys, position, has_gauss, cached = numpy_state
    return kind, keys.numpy().astype(np.uint32), position, has_gauss, cached


def check_rng_state(state: Any, source: str) -> None:
    """Load each entry into a throwaway generator: whatever they accept, restore_rng_state will."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise ValueError(f"{source} lacks the python/numpy/torch generator states; {_FIX}")
    try:
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        np.random.RandomState().set_state(_as_numpy_state(state["numpy"]))
        torch.Generator().set_state(state["torch"])
        if "cuda" in state and not (
            isinstance(state["cuda"], torch.Tensor) and state["cuda"].dtype == torch.uint8
        ):
            raise TypeError("cuda state is not a byte tensor")
    except (TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise ValueError(f"{source} is not a valid generator state ({error}); {_FIX}") from None


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_as_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
