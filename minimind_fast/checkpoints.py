"""Reading a training run directory: which checkpoints it holds, which is the newest, and what a
path given by a user (a run directory, a checkpoint directory, a weights file) resolves to.

Writing checkpoints is the trainer's job (minimind_fast/train/checkpoint.py); everything that only
reads them (generate, export, --from_weight) uses this module. A run directory looks like

    <save_dir>/checkpoints/step_00001000/{model.safetensors, resume.pt, config.json, ..., COMPLETE}

and a checkpoint counts only once its COMPLETE marker (JSON, written last) is there. The marker
records the step, a completion `sequence` (the order checkpoints were finished in), the run id,
and whether the run was healthy when it was saved; an unhealthy checkpoint is kept for inspection
but is never what "the newest checkpoint" means.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE"
RESUME_FILE = "resume.pt"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STEP_DIR = re.compile(r"^step_(\d+)$")


def read_marker(checkpoint_dir) -> Optional[dict]:
    """The COMPLETE marker of a checkpoint directory, or None when it is missing or unreadable."""
    try:
        marker = json.loads((Path(checkpoint_dir) / MARKER).read_text(encoding="utf-8"))
        int(marker["sequence"]), int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker if isinstance(marker, dict) else None


def list_checkpoints(
    run_dir, healthy_only: bool = True, run_id: Optional[str] = None
) -> list[Path]:
    """Complete checkpoints of `run_dir`, oldest first (by completion sequence); only those saved
    while the run was healthy unless healthy_only=False; only run `run_id`'s when given."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if not (entry.is_dir() and STEP_DIR.match(entry.name)):
            continue
        marker = read_marker(entry)
        if marker is None or (healthy_only and not marker.get("healthy", True)):
            continue
        if run_id is not None and marker.get("run_id") != run_id:
            continue
        found.append((int(marker["sequence"]), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir, healthy_only: bool = True) -> Optional[Path]:
    """The newest complete (and, by default, healthy) checkpoint directory of `run_dir`, or None."""
    checkpoints = list_checkpoints(run_dir, healthy_only)
    return checkpoints[-1] if checkpoints else None


def is_run_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CHECKPOINTS_DIR).is_dir() and not (path / MARKER).is_file()


def resolve_checkpoint_path(path) -> Path:
    """A run directory (it has checkpoints/) -> its newest healthy complete checkpoint directory;
    any other path unchanged (weights files, checkpoint and exported directories are read by
    minimind_fast.interop.load_weights)."""
    path = Path(path).expanduser()
    if is_run_dir(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(
                f"{path} holds no complete checkpoint; pass a .safetensors/.pth file, a checkpoint "
                "directory or a run directory (--save_dir) that has saved one"
            )
        return latest
    return path
