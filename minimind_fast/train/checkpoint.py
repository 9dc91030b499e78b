"""Writing checkpoints: one directory per checkpoint, atomic, with MiniMind-loadable weights.

Layout of a run directory (--save_dir; owned by train/run_dir.py):

    <save_dir>/
      run.json, .lock                          which run owns the directory; its advisory lock
      config.json, tokenizer.json, tokenizer_config.json
      metrics.jsonl, loss_curve.png, tensorboard/
      pretrain_512.pth                         MiniMind-format fp16 weights of the newest healthy
                                               checkpoint ({save_weight}_{hidden}{_moe}.pth)
      checkpoints/
        step_00001000/
          model.safetensors     fp16 inference weights (a tied lm_head is stored once)
          pretrain_512.pth      the same weights in MiniMind's format
          resume.pt             fp32 model, optimizer, GradScaler, TrainState, RNG, config, flags
          config.json, tokenizer.json, tokenizer_config.json
          COMPLETE              JSON marker {step, sequence, run_id, healthy}, written last

A checkpoint is written into `checkpoints/.tmp-*`, every file fsynced, the marker written last,
then the directory is renamed into place and the parent fsynced: a crash at any moment leaves
either the new checkpoint complete or no trace of it (temp debris is swept at the next save),
and no earlier checkpoint is touched. Reading is minimind_fast/checkpoints.py (which checkpoint
is newest) and train/resume.py (the resume state). Follows MiniMind's `lm_checkpoint`
(trainer/trainer_utils.py) for what is saved, torchtitan for atomicity.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoints import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    MARKER,
    RESUME_FILE,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    list_checkpoints,
    read_marker,
)
from ..fileio import describe_write_error, fsync_dir, fsync_file, write_json_atomic
from ..weights import save_safetensors, strip_wrapper_prefixes
from .resume import FORMAT_VERSION


class CheckpointError(RuntimeError):
    """Writing to the run directory failed (disk full, permissions); the previous checkpoint is
    intact."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def minimind_weight_name(save_weight: str, hidden_size: int, use_moe: bool) -> str:
    """MiniMind's file name for inference weights: `{save_weight}_{hidden_size}{_moe}.pth`."""
    return f"{save_weight}_{hidden_size}{'_moe' if use_moe else ''}.pth"


def inference_state_dict(
    model: nn.Module, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """Half-precision CPU copy of the model's weights; tensors shared in the model (a tied
    lm_head) stay shared, so each is converted and stored once."""
    converted: dict[tuple, torch.Tensor] = {}
    result = {}
    for key, tensor in strip_wrapper_prefixes(model.state_dict()).items():
        identity = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
        )
        if identity not in converted:
            converted[identity] = tensor.detach().to("cpu", dtype).contiguous()
        result[key] = converted[identity]
    return result


def _save_safetensors(weights: dict[str, torch.Tensor], path: Path, tied: bool) -> None:
    tensors = dict(weights)
    if tied and "lm_head.weight" in tensors:  # stored once, restored by interop.load_weights
        del tensors["lm_head.weight"]
    save_safetensors(
        tensors, path, metadata={"format": "pt", "tie_word_embeddings": str(tied).lower()}
    )


def _save_torch(value: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        try:
            torch.save(value, handle)
        except (
            RuntimeError
        ) as error:  # torch's zip writer reports a short write (disk full) this way
            raise OSError(
                f"writing {path.name} failed ({error}): the disk is full or a file size limit "
                "was reached"
            ) from error  # the zip writer loses the errno
        handle.flush()
        os.fsync(handle.fileno())


def sweep_run_dir_debris(run_dir) -> None:
    """Remove the temp files a killed process can leave in `run_dir` (by write_json_atomic and
    copy_file_atomic: `.<name>.<random>.tmp`). Only rank 0 writes there, so none is live."""
    for debris in Path(run_dir).glob(".*.tmp"):
        if debris.is_file():
            debris.unlink(missing_ok=True)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, hiding it with a rename first, so a crash mid-delete never
    leaves a half checkpoint that still looks like one."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:6]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    run_dir,
    step: int,
    model: nn.Module,
    resume_state: dict,
    config,
    mirror_name: str,
    tokenizer_dir=None,
    run_id: str = "",
    healthy: bool = True,
) -> Path:
    """Write checkpoint `step` atomically into run_dir/checkpoints and return its directory.

    `model` is the unwrapped module; `resume_state` is everything else resume needs (the fp32
    weights are added here). `healthy` goes into the marker: a checkpoint saved while the run
    was unhealthy is kept for inspection but never resumed from or mirrored. Raises
    CheckpointError on I/O failure; the previous checkpoints are untouched then.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step_{step:08d}"
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
        fsync_file(tmp / WEIGHTS_FILE)
        _save_torch(weights, tmp / mirror_name)
        state = dict(
            resume_state,
            format_version=FORMAT_VERSION,
            run_id=run_id,
            config=config.to_dict(),
            model=strip_wrapper_prefixes(model.state_dict()),
        )
        _save_torch(state, tmp / RESUME_FILE)
        write_json_atomic(tmp / CONFIG_FILE, config.to_dict())
        for name in TOKENIZER_FILES:
            if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
                fsync_file(tmp / name)
        write_json_atomic(
            tmp / MARKER,
            {"step": step, "sequence": sequence, "run_id": run_id, "healthy": bool(healthy)},
        )
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        if final.exists():  # an unhealthy save of the same step, resumed past: replace it
            remove_checkpoint(final)
        os.rename(tmp, final)
        tmp = None
        fsync_dir(root)
    except OSError as error:
        raise CheckpointError(
            f"saving checkpoint step {step} to {final} failed: "
            f"{describe_write_error(error, root)}; the earlier checkpoints are intact. "
            "Free disk space (or fix the cause), then continue with --from_resume 1"
        ) from error
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
