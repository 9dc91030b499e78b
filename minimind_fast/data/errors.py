"""The data side's one user-facing error, and the translation of failed writes (a full disk above
all) into it: one line naming the path and the fix instead of an OSError traceback."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DataError(ValueError):
    """A user-facing data problem; the message names the file (and line) and the fix."""


def is_disk_full(error: OSError) -> bool:
    """No space left on the device, or the user's disk quota is exhausted."""
    return error.errno in FULL_DISK_ERRNOS


@contextlib.contextmanager
def writing(path, what: str):
    """Turn an OSError raised inside the block into a one-line DataError about writing `what`
    into `path` (a full disk says "disk full"); callers clean up their temp files in `finally`."""
    try:
        yield
    except OSError as error:
        path = Path(path)
        reason = error.strerror or str(error)
        if is_disk_full(error):
            raise DataError(
                f"disk full: writing {what} to {path} failed ({reason}); free space on "
                "that disk or write it elsewhere (e.g. set MINIMIND_FAST_CACHE to a "
                "directory on another disk)"
            ) from None
        raise DataError(
            f"cannot write {what} to {path} ({reason}); make that directory writable "
            "or write it elsewhere (e.g. set MINIMIND_FAST_CACHE)"
        ) from None
