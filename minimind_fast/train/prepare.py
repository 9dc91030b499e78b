"""The steps that set a run up, each a plain function the entry points call in order:
run directory -> resume state -> flags -> model config -> model weights -> optimizer state ->
TrainState and schedule. Every user error is a one-line ValueError (the CLI exits 2 on it).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Optional

import torch.nn as nn

from ..checkpoints import CONFIG_FILE, RESUME_FILE, list_checkpoints, resolve_checkpoint_path
from ..config import PRESETS, MiniMindConfig, get_preset
from ..interop import load_weights, read_config, validate_state_dict
from . import checkpoint, cli, distributed, resume
from .run_dir import RunDirectory
from .schedule import resolve_warmup_steps, step_learning_rate
from .state import TrainState


def open_run_dir(args, context, log=print) -> tuple[RunDirectory, list[Path]]:
    """Rank 0 checks --save_dir, takes its lock and applies the fresh-vs-resume policy; every
    rank learns the outcome. Returns (the directory, checkpoints to resume from, newest last;
    empty for a fresh run)."""
    run_dir = RunDirectory(args.save_dir)
    outcome = None
    if context.is_main:
        try:
            run_dir.check_location()
            if args.from_resume == "1" and not run_dir.path.is_dir():
                run_dir.choose_start("1")  # the error that names the missing run
            run_dir.create()
            stale = run_dir.lock()
            if stale:
                log(
                    f"note: {run_dir.path} was locked by a run that did not exit cleanly "
                    f"(pid {stale.get('pid')} on {stale.get('host')}); taking it over"
                )
            fresh = run_dir.choose_start(args.from_resume) is None
            if fresh and args.from_resume == "auto":
                log(
                    f"--from_resume auto: nothing to resume in {run_dir.path}; starting a fresh run"
                )
            outcome = [] if fresh else [str(p) for p in list_checkpoints(run_dir.path)]
        except ValueError as error:
            run_dir.release(undo=True)
            outcome = str(error)
    outcome = distributed.broadcast_object(outcome, context)
    if isinstance(outcome, str):
        raise ValueError(outcome)
    return run_dir, [Path(p) for p in outcome]


def load_resume(candidates: list[Path], log=print) -> tuple[Optional[Path], Optional[dict]]:
    """(checkpoint, validated resume state) of the newest readable candidate, or (None, None)."""
    if not candidates:
        return None, None
    return resume.load_latest_resume_state(candidates, log)


MODEL_FLAGS = ("preset", "hidden_size", "num_hidden_layers", "vocab_size", "use_moe")


def config_of_weights(args, explicit: set[str]) -> Optional[MiniMindConfig]:
    """The model of --from_weight (the config.json beside its weights) for a fresh run that names
    no model flag, so fine-tuning or continuing a model needs none of its flags repeated."""
    path = Path(args.from_weight).expanduser()
    if args.from_weight.lower() == "none" or explicit & set(MODEL_FLAGS) or not path.exists():
        return None
    path = resolve_checkpoint_path(path)
    beside = (path if path.is_dir() else path.parent) / CONFIG_FILE
    return read_config(beside) if beside.is_file() else None


def resolve_flags(
    args, explicit: set[str], saved: Optional[dict], source: Optional[Path], device, log=print
) -> tuple[argparse.Namespace, Optional[MiniMindConfig]]:
    """(flags, the model of --from_weight or None). Fresh: the preset's defaults for every flag
    left unset. Resumed: the saved flags, then the command line's (see cli.resume_flags)."""
    if saved is not None:
        return cli.resume_flags(args, explicit, saved["args"], str(source), log), None
    base = config_of_weights(args, explicit)
    if base is not None:  # the preset that is this model, for its training defaults and the logs
        same = [name for name in PRESETS if _same_model(get_preset(name), base)]
        args.preset = same[0] if same else None
        args.model_from = args.from_weight
    args.preset = args.preset or ("minimind2-small" if device.type == "cuda" else "demo")
    cli.apply_preset_defaults(args)
    cli.check_model_flags(args)
    return args, base


def _same_model(a: MiniMindConfig, b: MiniMindConfig) -> bool:
    ignore = ("dropout", "extra")
    return {k: v for k, v in a.to_dict().items() if k not in ignore} == {
        k: v for k, v in b.to_dict().items() if k not in ignore
    }


def model_config(
    args, saved: Optional[dict], base: Optional[MiniMindConfig] = None
) -> MiniMindConfig:
    """The resumed model's config; else --from_weight's (`base`); else the preset's with the
    flags."""
    if saved is not None:
        return MiniMindConfig.from_dict(saved["config"])
    if base is not None:
        config = base if args.dropout is None else base.replace(dropout=args.dropout)
    else:
        config = get_preset(
            args.preset,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            vocab_size=args.vocab_size,
            dropout=args.dropout,
            use_moe=None if args.use_moe is None else bool(args.use_moe),
        )
    if args.max_seq_len > config.max_position_embeddings:
        raise ValueError(
            f"--max_seq_len {args.max_seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; "
            f"use --max_seq_len <= {config.max_position_embeddings}"
        )
    return config


def resolve_from_weight(args, config) -> Path:
    """--from_weight: a path (weights file, checkpoint / run / exported HF directory), or MiniMind's
    prefix form {save_dir}/{name}_{hidden}[_moe].pth."""
    path = Path(args.from_weight).expanduser()
    if path.exists():
        return resolve_checkpoint_path(path)
    name = checkpoint.minimind_weight_name(args.from_weight, config.hidden_size, config.use_moe)
    prefixed = Path(args.save_dir) / name
    if prefixed.is_file():
        return prefixed
    raise ValueError(
        f"--from_weight {args.from_weight!r}: neither that path nor {prefixed} exists; pass a "
        ".safetensors/.pth file, a checkpoint, run or exported Hugging Face directory, or 'none'"
    )


def initial_weights(
    model: nn.Module, args, config, saved: Optional[dict], source, log=print
) -> None:
    """Load the resumed weights, or --from_weight's (validate_state_dict refuses non-finite
    ones)."""
    if saved is not None:
        weights, origin = validate_state_dict(saved["model"], config, source=str(source)), source
    elif args.from_weight.lower() != "none":
        origin = resolve_from_weight(args, config)
        found, weights = load_weights(origin, config)  # validated against config's shapes
        log(f"initial weights: {origin}")
        found_values = found.to_dict() if found is not None else {}
        differ = [
            f"{k}={v!r} (this run: {getattr(config, k)!r})"
            for k, v in found_values.items()
            if k not in ("dropout", "extra") and v != getattr(config, k)
        ]
        if differ:
            log(
                f"warning: {origin} was configured with {', '.join(differ)}; "
                "this run uses its own values"
            )
    else:
        return
    model.load_state_dict(weights)


def restore_optimizer(optimizer, scaler, saved: dict, source) -> None:
    """Validated, then loaded: a mis-shaped moment would crash the fused AdamW kernel."""
    resume.check_optimizer(saved["optimizer"], optimizer, str(Path(source) / RESUME_FILE))
    optimizer.load_state_dict(saved["optimizer"])
    if scaler.is_enabled() and saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])


def train_state(args, data, saved: Optional[dict], source, context, log=print) -> TrainState:
    """The resumed TrainState (its data checked against this run's), or a fresh one."""
    if saved is None:
        return TrainState(
            run_id=checkpoint.new_run_id(),
            num_samples=data.num_samples,
            data_digest=data.data_digest,
        )
    state = TrainState.from_state_dict(saved["train_state"], str(source))
    if state.data_digest and state.data_digest != data.data_digest:
        raise ValueError(
            f"{data.data_path} changed since {source} was saved (its content differs), "
            "so the saved position would point into other data; restore the file, or start a new "
            "run (another --save_dir) with --from_weight to continue these weights on the new data"
        )
    if state.num_samples != data.num_samples:
        raise ValueError(
            f"the training split has {data.num_samples} rows but {source} had {state.num_samples}; "
            "resume with the data and flags it was trained with, or start a new run"
        )
    state.data_digest = data.data_digest
    log(
        f"resumed {source} at step {state.step} (epoch {state.epoch + 1}, "
        f"{state.consumed} of {state.num_samples} samples into it)"
    )
    if saved["world_size"] != context.world_size:
        log(
            f"warning: world size changed {saved['world_size']} -> {context.world_size}: "
            f"continuing from the same {state.consumed} consumed samples; "
            "this run is not bit-identical to an uninterrupted one"
        )
    return state


def schedule(state: TrainState, args, world_size: int, resumed: bool, log=print) -> None:
    """Set the LR schedule's length (total and warmup steps) for the flags of this invocation; on
    resume, say when that moves the learning rate of the next step."""
    remaining = state.remaining_steps(
        args.epochs, args.batch_size, args.accumulation_steps, world_size
    )
    total = args.max_steps or state.step + remaining
    warmup = resolve_warmup_steps(total, args.warmup_steps, args.warmup_ratio)
    if (
        resumed
        and (total, warmup) != (state.total_steps, state.warmup_steps)
        and state.step < total
    ):
        before = copy.copy(state)
        state.total_steps, state.warmup_steps = total, warmup
        old = step_learning_rate(args, before, args.accumulation_steps, world_size)
        new = step_learning_rate(args, state, args.accumulation_steps, world_size)
        log(
            f"note: the schedule now runs {total} steps with {warmup} warmup "
            f"(was {before.total_steps}, {before.warmup_steps}): "
            f"the learning rate of step {state.step + 1} moves {old:.3g} -> {new:.3g}"
        )
    state.total_steps, state.warmup_steps = total, warmup
    if resumed and state.step >= total:
        log(f"note: the run is already at step {state.step} of {total}; nothing left to train")


def restore_rng(saved: Optional[dict], args, context, step: int) -> None:
    if saved is None:
        distributed.seed_everything(args.seed + context.rank)
    elif saved["world_size"] == context.world_size:
        resume.restore_rng_state(saved["rng"][context.rank])
    else:
        distributed.seed_everything(args.seed + context.rank + 1_000_003 * step)
