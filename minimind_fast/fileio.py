"""Durable, atomic file writes and the words for a failed one.

Every file this package writes that a user relies on goes through a temp file in the same
directory, fsync, then os.replace, so a crash or a full disk leaves either the old file or the
whole new one. `describe_write_error` turns an OSError into what a user can act on ("the disk is
full", "permission denied", a file deleted under us), which torch's and safetensors' writers do
not say themselves.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy `source` to `target` through a fsynced temp file and os.replace: `target` is always
    either the old file or the whole new one."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        shutil.copyfile(source, tmp)
        fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def describe_write_error(error: OSError, directory: Path) -> str:
    """Why a write into `directory` failed, in words a user acts on: "disk full" is named as such
    (torch's zip writer loses the errno, so free space is checked as well)."""
    code = getattr(error, "errno", None)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if code == errno.ENOSPC:
        return f"disk full ({error})"
    if code == errno.EDQUOT:
        return f"disk quota exceeded ({error})"
    if code == errno.EFBIG:
        return f"file size limit reached ({error})"
    if free is not None and free < 16 << 20:
        return f"disk full, {free >> 20} MiB left ({error})"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({error})"
    if code == errno.ENOENT:
        return f"a file or folder vanished while writing; did another process delete it? ({error})"
    return str(error)
