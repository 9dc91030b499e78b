"""RunDirectory: the one owner of a run's --save_dir.

It decides what a directory may be used for and never touches another run's files:
- location: not a file, not a checkpoint folder or the checkpoints/ folder of a run, not an
  exported Hugging Face model, writable;
- lock: an advisory fcntl lock on `<save_dir>/.lock`, held for the whole run by one process
  (rank 0 under torchrun). The kernel drops it when the process dies (kill -9 included); the file
  keeps the holder's pid/host while held, so a second trainer is told who has it, and a lock
  file still naming a holder when we get the lock marks the previous run as killed (stale);
- fresh vs resume: a fresh run needs a directory without another run in it; `--from_resume 1`
  needs a healthy complete checkpoint; `auto` resumes when there is one and starts fresh when
  the directory holds no run;
- ownership: `run.json` names the run the directory belongs to; checkpoint markers carry the run
  id, and rotation only ever deletes the current run's own checkpoints, never the newest one
  saved while the run was healthy;
- the MiniMind-style `{save_weight}_{hidden}[_moe].pth` mirror beside the checkpoints, updated
  only from healthy checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ..checkpoints import (
    CHECKPOINTS_DIR,
    MARKER,
    RESUME_FILE,
    STEP_DIR,
    list_checkpoints,
    read_marker,
)
from ..fileio import copy_file_atomic, describe_write_error, write_json_atomic
from . import checkpoint

try:
    import fcntl
except ImportError:  # no advisory locks on this platform: the directory is not guarded
    fcntl = None

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
RESUME_MODES = ("0", "1", "auto")


class RunDirError(ValueError):
    """The directory cannot be used as asked; nothing in it was changed."""


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_hf_export(path: Path) -> bool:
    """A directory written by an exporter: config.json with a Hugging Face model_type."""
    config = _read_json(path / "config.json")
    return config is not None and ("model_type" in config or "architectures" in config)


class RunDirectory:
    def __init__(self, path, flag: str = "--save_dir"):
        self.path = Path(path).expanduser()
        self.flag = flag
        self.run_id: Optional[str] = None
        self.mirror_name: Optional[str] = None
        self._lock_handle = None
        self._lock_created = self._dir_created = False

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    # ---- where -------------------------------------------------------------------------------
    def check_location(self) -> None:
        """RunDirError unless the path can hold a run (it may not exist yet)."""
        path, flag = self.path, self.flag
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{flag} {path} is a file, not a directory; pick another path")
        if (
            (path / MARKER).is_file()
            or (path / RESUME_FILE).is_file()
            or (path.parent.name == CHECKPOINTS_DIR and STEP_DIR.match(path.name))
        ):
            raise RunDirError(
                f"{flag} {path} is a checkpoint folder, not a run directory; use the run it "
                f"belongs to: {flag} {path.parent.parent}"
            )
        if path.name == CHECKPOINTS_DIR and (path.parent / RUN_FILE).is_file():
            raise RunDirError(
                f"{flag} {path} is the checkpoints folder of a run; use {flag} {path.parent}"
            )
        if _is_hf_export(path):
            raise RunDirError(
                f"{flag} {path} holds an exported Hugging Face model, which training would "
                "overwrite; pick another directory (pass this one as --from_weight to start "
                "from its weights)"
            )

    def create(self) -> None:
        """Make the directory (a fresh run's) and prove it writable."""
        path = self.path
        self._dir_created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise RunDirError(
                f"{self.flag} {path} is not writable ({error.strerror}); pick another directory"
            ) from None

    # ---- lock --------------------------------------------------------------------------------
    def lock(self) -> Optional[dict]:
        """Take the directory's lock for this process, or RunDirError naming its holder. Returns
        the holder record a killed run left behind (None when the last holder released it)."""
        if fcntl is None:
            return None
        path = self.path / LOCK_FILE
        for _ in range(10):  # retry while a releasing holder unlinks the file under us
            self._lock_created = not path.exists()
            handle = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.seek(0)
                holder = _describe_holder(handle.read())
                handle.close()
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunDirError(
                        f"cannot lock {self.flag} {self.path} ({error.strerror})"
                    ) from None
                raise RunDirError(
                    f"{self.flag} {self.path} is in use by another run ({holder}); wait for it to "
                    "finish or pick another directory"
                ) from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        else:
            raise RunDirError(f"cannot lock {self.flag} {self.path}: its lock file keeps changing")
        handle.seek(0)
        try:
            stale = json.loads(handle.read() or "null")
        except ValueError:
            stale = None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            )
            + "\n"
        )
        handle.flush()
        self._lock_handle = handle
        return stale if isinstance(stale, dict) else None

    def release(self, undo: bool = False) -> None:
        """Clear the holder record and drop the lock (the kernel also drops it at exit). With
        undo (a run that never started), also remove the lock file and the directory if this
        process created them and they are empty, so a refused start leaves nothing behind."""
        handle, self._lock_handle = self._lock_handle, None
        if handle is None:
            return
        try:
            if undo and self._lock_created:
                (self.path / LOCK_FILE).unlink(missing_ok=True)  # while still holding it
            else:
                handle.seek(0)
                handle.truncate()
                handle.flush()
        except OSError:
            pass  # the record only names the holder; the lock itself is dropped below
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        if undo and self._dir_created:
            try:
                self.path.rmdir()  # only if empty
            except OSError:
                pass

    # ---- fresh or resume ---------------------------------------------------------------------
    def existing_run(self) -> Optional[str]:
        """What of an earlier run the directory holds, as a phrase for messages; None if nothing."""
        found = []
        record = _read_json(self.path / RUN_FILE)
        if record is not None:
            found.append(f"run {record.get('run_id', '?')}")
        checkpoints = list_checkpoints(self.path, healthy_only=False)
        if checkpoints:
            found.append(f"checkpoints up to step {read_marker(checkpoints[-1])['step']}")
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size > 0:
            found.append(METRICS_FILE)
        return ", ".join(found) or None

    def choose_start(self, mode: str) -> Optional[Path]:
        """The checkpoint to resume (None: start fresh) under --from_resume `mode`."""
        if mode not in RESUME_MODES:
            raise RunDirError(f"--from_resume {mode!r} must be 0, 1 or auto")
        healthy = list_checkpoints(self.path)
        existing = self.existing_run()
        if mode in ("1", "auto") and healthy:
            return healthy[-1]
        if mode == "1":
            if not self.path.is_dir():
                detail = "nothing: it does not exist"
            elif existing and list_checkpoints(self.path, healthy_only=False):
                detail = "only checkpoints marked unhealthy"
            else:
                detail = f"no complete checkpoint{f' ({existing})' if existing else ''}"
            raise RunDirError(
                f"--from_resume 1: {self.flag} {self.path} holds {detail}, so there is nothing to "
                "resume; check the path (the --save_dir of the run), or pass --from_resume auto "
                "to start fresh when there is nothing to resume"
            )
        if existing and not list_checkpoints(self.path, healthy_only=False):
            raise RunDirError(
                f"{self.flag} {self.path} already holds an earlier run with no checkpoint to "
                f"resume ({existing}); delete those files or start in another directory (nothing "
                "was changed)"
            )
        if existing:
            raise RunDirError(
                f"{self.flag} {self.path} already holds an earlier run ({existing}); continue it "
                "with --from_resume 1, or start a new run in another directory (nothing was "
                "changed)"
            )
        return None

    def claim(self, run_id: str, mirror_name: str, fresh: bool) -> None:
        """Record this run as the directory's owner; a fresh run first checks it would not
        overwrite a weights file that is not its own."""
        if fresh and (self.path / mirror_name).exists():
            raise RunDirError(
                f"{self.flag} {self.path} already has {mirror_name}, which this run would "
                "overwrite; pick another directory or another --save_weight"
            )
        self.run_id, self.mirror_name = run_id, mirror_name
        write_json_atomic(self.path / RUN_FILE, {"run_id": run_id, "mirror": mirror_name})

    # ---- after a save ------------------------------------------------------------------------
    def newest_healthy(self) -> Optional[Path]:
        """This directory's newest checkpoint saved while the run was healthy (what to resume)."""
        healthy = list_checkpoints(self.path)
        return healthy[-1] if healthy else None

    def after_save(self, saved: Path, healthy: bool, keep: int, log=print) -> None:
        """Mirror a healthy checkpoint's weights beside the run, then rotate old checkpoints."""
        if healthy:
            target = self.path / self.mirror_name
            try:
                copy_file_atomic(Path(saved) / self.mirror_name, target)
            except OSError as error:
                raise checkpoint.CheckpointError(
                    f"checkpoint {saved} is saved and complete, but updating {target} from it "
                    f"failed: {describe_write_error(error, self.path)}; "
                    f"the previous {target.name} is intact"
                ) from error
        for path in self.rotate(keep):
            log(f"warning: could not delete old checkpoint {path}; delete it by hand")

    def rotate(self, keep: int) -> list[Path]:
        """Delete this run's checkpoints beyond the newest `keep`, never the newest healthy one.
        Returns what could not be deleted (a warning, not an error: nothing is lost)."""
        own = list_checkpoints(self.path, healthy_only=False, run_id=self.run_id)
        healthy = list_checkpoints(self.path, run_id=self.run_id)
        protected = healthy[-1] if healthy else None
        failed = []
        for old in own[:-keep]:
            if old == protected:
                continue
            try:
                checkpoint.remove_checkpoint(old)
            except OSError:
                failed.append(old)
        return failed


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process holds its lock"
