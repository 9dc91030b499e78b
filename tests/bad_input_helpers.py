"""Shared pieces of the bad-input catalogue: tests/test_bad_inputs_{cli,files,ops}.py.

The contract every CLI case asserts: a non-zero exit (2 for user errors, 1 for a failed write),
exactly one stderr line `python -m minimind_fast.pretrain: error: ...` naming the value and the
fix, no Python traceback, and no partial file left in the save directory or the token cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import tiny_flags

from minimind_fast import pretrain

PREFIX = "python -m minimind_fast.pretrain: error: "
REPO = Path(__file__).resolve().parents[1]
TEMP_NAMES = (".tmp-", ".trash-", ".write-test")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine, 2 OpenMP threads make tiny runs several
    times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of pretrain.main(argv) in this process."""
    try:
        code = pretrain.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def debris(*roots: Path) -> list[Path]:
    """Temp files/directories that a failed or killed write could leave under `roots`."""
    found = []
    for root in roots:
        if Path(root).exists():
            found += [
                p
                for p in Path(root).rglob("*")
                if p.name.startswith(TEMP_NAMES) or p.name.endswith(".tmp")
            ]
    return found


def assert_user_error(code: int, err: str, *fragments: str, expected_code: int = 2) -> str:
    """One `error:` line holding every fragment, no traceback, the expected exit code."""
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_clean(save_dir: Path, empty: bool = True) -> None:
    """No temp debris in the save dir or the token cache; `empty`: not one file written at all."""
    found = debris(save_dir, Path(os.environ["MINIMIND_FAST_CACHE"]))
    assert not found, found
    if empty and Path(save_dir).exists():
        written = [p for p in Path(save_dir).rglob("*") if p.is_file()]
        assert not written, written


def write_lines(path: Path, lines) -> Path:
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            handle.write(b"\n")
    return path


def trained_run(assets, run_dir: Path, steps: int = 2, **overrides) -> Path:
    """A finished tiny run (checkpoints at every step); returns run_dir."""
    flags = dict(max_steps=steps, save_interval=1, sample_tokens=0, **overrides)
    assert pretrain.main([str(a) for a in tiny_flags(assets, run_dir, **flags)]) == 0
    return run_dir


def subprocess_pretrain(argv, preexec_fn=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "minimind_fast.pretrain", *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
