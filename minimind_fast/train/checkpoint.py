"""Checkpoints: atomic directory-per-checkpoint saves, keep-last-K, resume state.

Layout of a run directory (--save_dir):

    <save_dir>/
      config.json, tokenizer.json, tokenizer_config.json   the model config and the run's tokenizer
      metrics.jsonl, loss_curve.png                        metrics (train/metrics.py)
      pretrain_512.pth                                     MiniMind-format fp16 weights of the latest
                                                           checkpoint ({save_weight}_{hidden}{_moe}.pth)
      checkpoints/
        step_00001000/
          model.safetensors     fp16 inference weights (a tied lm_head is stored once, as the embedding)
          pretrain_512.pth      the same weights in MiniMind's format (both keys, one shared tensor)
          resume.pt             fp32 model, optimizer, GradScaler, progress, per-rank RNG, config, args
          config.json, tokenizer.json, tokenizer_config.json
          COMPLETE              JSON marker {step, sequence, run_id}, written last

A checkpoint is written into `checkpoints/.tmp-*`, every file fsynced, the marker written last,
then the directory is renamed into place and the parent fsynced: a crash at any moment leaves
either the new checkpoint complete or no trace of it (temp debris is ignored and swept at the
next save), and the previous checkpoint is never touched until the new one is complete. The
newest checkpoint is the complete one with the highest `sequence` (so a fresh run saving into an
old run's directory supersedes it cleanly); the K newest are kept.

Loading never unpickles code: safetensors, or `torch.load(weights_only=True)`. Weights (for
--from_weight, generate, export) are read by minimind_fast.interop.load_weights, which validates
them against the config; this module only resolves a run directory to its newest checkpoint and
reads resume states. Follows MiniMind's `lm_checkpoint` (trainer/trainer_utils.py) for what is
saved, torchtitan for atomicity.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from ..checkpoints import (CHECKPOINTS_DIR, CONFIG_FILE, MARKER, RESUME_FILE, TOKENIZER_FILES, WEIGHTS_FILE,
                           latest_checkpoint, list_checkpoints, read_marker, resolve_checkpoint_path)
from ..interop.hf_import import load_torch_file

FORMAT_VERSION = 1
_PREFIX_PATTERN = re.compile(r"(?<![^.])(?:module|_orig_mod)\.")  # at the start or after a dot


class CheckpointError(RuntimeError):
    """Writing to the run directory failed (disk full, permissions); the previous checkpoint is intact."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def minimind_weight_name(save_weight: str, hidden_size: int, use_moe: bool) -> str:
    """MiniMind's file name for inference weights: `{save_weight}_{hidden_size}{_moe}.pth`."""
    return f"{save_weight}_{hidden_size}{'_moe' if use_moe else ''}.pth"


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's `module.` and torch.compile's `_orig_mod.` prefixes (at any nesting level)."""
    return {_PREFIX_PATTERN.sub("", key): value for key, value in state_dict.items()}


# --- writing -------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to `path` through a fsynced temp file and os.replace."""
    path = Path(path)
    descriptor, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def inference_state_dict(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Half-precision CPU copy of the model's weights; tensors shared in the model (a tied
    lm_head) stay shared, so each is converted and stored once."""
    converted: dict[tuple, torch.Tensor] = {}
    result = {}
    for key, tensor in clean_state_dict(model.state_dict()).items():
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity not in converted:
            converted[identity] = tensor.detach().to("cpu", dtype).contiguous()
        result[key] = converted[identity]
    return result


def _save_safetensors(weights: dict[str, torch.Tensor], path: Path, tied: bool) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = dict(weights)
    if tied and "lm_head.weight" in tensors:  # stored once, restored by interop.load_weights
        del tensors["lm_head.weight"]
    try:
        save_file(tensors, str(path), metadata={"format": "pt", "tie_word_embeddings": str(tied).lower()})
    except SafetensorError as error:  # how safetensors reports a failed write (disk full, file too large)
        raise OSError(f"writing {path.name} failed: {error}") from error
    os.chmod(path, 0o644)  # safetensors creates it owner-only; the checkpoint's other files are 0644


def _save_torch(value: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        try:
            torch.save(value, handle)
        except RuntimeError as error:  # torch's zip writer reports a short write (disk full) this way
            raise OSError(f"writing {path.name} failed ({error}): the disk is full or a file size limit "
                          "was reached") from error
        handle.flush()
        os.fsync(handle.fileno())


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a fsynced temp file and os.replace: `target` is always
    either the old file or the whole new one."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        shutil.copyfile(source, tmp)
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def sweep_run_dir_debris(run_dir) -> None:
    """Remove the temp files a killed process can leave in `run_dir` (by write_json_atomic and
    copy_file_atomic: `.<name>.<random>.tmp`). Only rank 0 writes there, so none is live."""
    for debris in Path(run_dir).glob(".*.tmp"):
        if debris.is_file():
            debris.unlink(missing_ok=True)


def _remove_dir(path: Path) -> None:
    """Hide `path` with a rename first, so a crash mid-delete never leaves a half checkpoint
    that still looks like one."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:6]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir, step: int, model: nn.Module, resume_state: dict, config, save_weight: str,
                    keep: int = 3, tokenizer_dir=None, run_id: str = "") -> Path:
    """Write checkpoint `step` atomically, mirror the MiniMind .pth into run_dir, keep the newest
    `keep`. `model` is the unwrapped module; `resume_state` is everything else resume needs
    (its "model" entry is filled here with the fp32 weights). Raises CheckpointError on I/O failure."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step_{step:08d}"
    pth_name = minimind_weight_name(save_weight, config.hidden_size, config.use_moe)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        for debris in root.glob(".t*-*"):  # temp dirs of crashed saves, half-deleted old ones
            shutil.rmtree(debris, ignore_errors=True)
        sweep_run_dir_debris(run_dir)
        previous = list_checkpoints(run_dir, healthy_only=False)
        sequence = 1 + max((read_marker(p)["sequence"] for p in previous), default=0)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        weights = inference_state_dict(model)
        _save_safetensors(weights, tmp / WEIGHTS_FILE, bool(config.tie_word_embeddings))
        _fsync_file(tmp / WEIGHTS_FILE)
        _save_torch(weights, tmp / pth_name)
        state = dict(resume_state, format_version=FORMAT_VERSION, run_id=run_id, config=config.to_dict(),
                     model=clean_state_dict(model.state_dict()))
        _save_torch(state, tmp / RESUME_FILE)
        write_json_atomic(tmp / CONFIG_FILE, config.to_dict())
        for name in TOKENIZER_FILES:
            if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
                _fsync_file(tmp / name)
        write_json_atomic(tmp / MARKER, {"step": step, "sequence": sequence, "run_id": run_id})
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        if final.exists():  # same step of a superseded run: move it aside, then take its name
            _remove_dir(final)
        os.rename(tmp, final)
        tmp = None
        _fsync_dir(root)
        copy_file_atomic(final / pth_name, run_dir / pth_name)
        _fsync_dir(run_dir)
        for old in list_checkpoints(run_dir)[:-keep]:
            _remove_dir(old)
    except OSError as error:
        raise CheckpointError(f"saving checkpoint step {step} to {final} failed: {error}; the previous "
                              f"checkpoint is intact. Free disk space or fix permissions of {run_dir}") from error
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- reading -------------------------------------------------------------------------------------


def load_resume_state(checkpoint_dir) -> dict:
    """The resume state (resume.pt) of a checkpoint directory."""
    path = Path(checkpoint_dir) / RESUME_FILE
    state = load_torch_file(path)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a minimind_fast resume state (format {FORMAT_VERSION}); "
                         "start a new run with --from_resume 0 or another --save_dir")
    return state


def load_latest_resume_state(run_dir, warn=print) -> tuple[Optional[Path], Optional[dict]]:
    """(checkpoint dir, resume state) of the newest complete checkpoint that reads back; an
    unreadable one (a damaged disk) is reported through `warn` and the next older one is tried."""
    errors = []
    for candidate in reversed(list_checkpoints(run_dir)):
        try:
            return candidate, load_resume_state(candidate)
        except ValueError as error:
            warn(f"warning: skipping unreadable checkpoint {candidate}: {error}")
            errors.append(str(error))
    if errors:
        raise ValueError(f"no checkpoint in {run_dir} can be read ({errors[0]}); start a new run in another --save_dir")
    return None, None


# --- RNG state -----------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """python, numpy, torch CPU (and the current CUDA device's) generator states, as plain
    containers and tensors so torch.load(weights_only=True) reads them back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
