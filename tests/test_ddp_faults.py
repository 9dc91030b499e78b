"""DDP faults, two CPU processes on gloo under torchrun, loopback only:
- one rank raising mid-run ends every rank within a bounded time, and torchrun reports the error;
- with `torchrun --max-restarts=1` and `--from_resume 1`, a rank killed with SIGKILL leads to a
  restart that continues from the last checkpoint and ends bit-identical to an uninterrupted run.

Faults are injected without any hook in the training code: torchrun runs a small runner script
(written below) that wraps `optim.clip_and_step` to raise, or SIGKILL its own process, on one rank
at its N-th optimizer step, in the first attempt only (TORCHELASTIC_RESTART_COUNT == 0), and then
calls `pretrain.main` under torchrun's `record`, exactly as `python -m minimind_fast.pretrain` does.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from pretrain_helpers import assets, read_metrics, tiny_flags  # noqa: F401 (assets is a fixture)

from minimind_fast import checkpoints
from minimind_fast.train import distributed, resume

pytestmark = pytest.mark.slow  # each torchrun starts 2 torch processes: 7-15 s on 2 cores

REPO = Path(__file__).resolve().parents[1]
RUNNER = """
import os, signal, sys
from torch.distributed.elastic.multiprocessing.errors import record
from minimind_fast import pretrain
from minimind_fast.train import optim

calls = 0
real_clip_and_step = optim.clip_and_step


def clip_and_step_with_fault(*args, **kwargs):
    global calls
    calls += 1
    if (os.environ["RANK"] == os.environ["FAULT_RANK"] and calls == int(os.environ["FAULT_STEP"])
            and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"):
        if os.environ["FAULT"] == "raise":
            raise RuntimeError(f"injected fault on rank {os.environ['RANK']} at step {calls}")
        if os.environ["FAULT"] == "sigterm":  # only this rank is told to stop
            os.kill(os.getpid(), signal.SIGTERM)
            return real_clip_and_step(*args, **kwargs)
        print(f"injecting SIGKILL on rank {os.environ['RANK']} at step {calls}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_clip_and_step(*args, **kwargs)


optim.clip_and_step = clip_and_step_with_fault
sys.exit(record(pretrain.main)())
"""
FLAGS = dict(
    max_steps=8,
    batch_size=2,
    save_interval=2,
    log_interval=1,
    dropout=0.1,
    from_resume="auto",
    sample_tokens=0,
)


def torchrun(
    assets,
    tmp_path: Path,
    run_dir: Path,
    fault: str = "none",
    rank: int = 1,
    step: int = 0,
    max_restarts: int = 0,
    timeout: float = 120,
):
    """Run the runner under torchrun; returns (CompletedProcess, seconds). A hang fails the test
    (after killing the whole process group)."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max_restarts={max_restarts}",
        "--monitor_interval=0.1",
        str(runner),
        *map(str, tiny_flags(assets, run_dir, **FLAGS)),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONPATH=str(REPO),
        FAULT=fault,
        FAULT_RANK=str(rank),
        FAULT_STEP=str(step),
    )
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(
            f"torchrun hung for {timeout} s:\n{out[-2000:]}\n{err[-4000:]}"
        ) from None
    result = subprocess.CompletedProcess(command, process.returncode, out, err)
    return result, time.monotonic() - start


def leftover_workers(tmp_path: Path) -> list[str]:
    """Processes still running our runner script (none may outlive torchrun)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
            if str(tmp_path / "runner.py") in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets):
    """An uninterrupted 2-rank run with the same flags: (run dir, final resume state)."""
    tmp_path = tmp_path_factory.mktemp("ddp_reference")
    result, _ = torchrun(assets, tmp_path, tmp_path / "run")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return tmp_path / "run", resume.load_resume_state(
        checkpoints.latest_checkpoint(tmp_path / "run")
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_one_rank_raising_ends_every_rank_promptly_with_the_error(assets, tmp_path, rank):
    result, seconds = torchrun(assets, tmp_path, tmp_path / "run", fault="raise", rank=rank, step=3)
    assert result.returncode != 0
    assert (
        f"RuntimeError: injected fault on rank {rank} at step 3" in result.stderr
    )  # torchrun's root cause
    assert "Root Cause" in result.stderr
    assert seconds < 60, seconds  # bounded: no rank waits out --ddp_timeout (1800 s)
    assert not leftover_workers(tmp_path)
    assert (
        "step 2/8" in result.stdout and "step 4/8" not in result.stdout
    )  # it stopped at the fault
    assert (
        checkpoints.latest_checkpoint(tmp_path / "run").name == "step_00000002"
    )  # the last good one


@pytest.mark.parametrize("rank", [1, 0])
def test_killed_rank_restarts_and_continues_from_the_last_checkpoint(
    assets, tmp_path, reference, rank
):
    result, _ = torchrun(
        assets, tmp_path, tmp_path / "run", fault="kill", rank=rank, step=5, max_restarts=1
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run_dir = tmp_path / "run"
    first, _, second = result.stdout.partition(f"injecting SIGKILL on rank {rank} at step 5")
    assert (
        "starting a fresh run" in first and "step 4/8" in first and "step 5/8" not in first
    )  # attempt 0, killed
    assert (
        f"resumed {run_dir}/checkpoints/step_00000004 at step 4" in second
    )  # attempt 1, by torchrun
    reference_dir, expected = reference
    state = resume.load_resume_state(checkpoints.latest_checkpoint(run_dir))
    assert {**state["train_state"], "run_id": ""} == {**expected["train_state"], "run_id": ""}
    assert state["train_state"]["step"] == 8
    assert state["world_size"] == 2
    for key, value in expected["model"].items():
        assert torch.equal(state["model"][key], value), key
    losses = {r["step"]: r["loss"] for r in read_metrics(reference_dir) if "loss" in r}
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r} == losses
    assert not leftover_workers(tmp_path)


def test_restarted_workers_get_a_store_of_their_own_attempt(monkeypatch):
    """torchrun keeps its shared store across restarts on one node; keys that a dead attempt's
    ranks left there (their addresses) must be invisible to the next attempt, which otherwise
    connects to dead peers whenever it reads before its peers rewrote them (a race)."""
    agent_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    for name, value in dict(
        TORCHELASTIC_USE_AGENT_STORE="True",
        GROUP_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(agent_store.port),
    ).items():
        monkeypatch.setenv(name, value)
    stores = {}
    for attempt in (0, 1):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        stores[attempt] = distributed._restart_safe_store(2, datetime.timedelta(seconds=10))
    stores[0].set("default_pg/0//cpu//rank_1", "address of a dead rank")
    assert stores[0].get("default_pg/0//cpu//rank_1") == b"address of a dead rank"
    assert not stores[1].check(["default_pg/0//cpu//rank_1"])
    monkeypatch.setenv(
        "GROUP_WORLD_SIZE", "2"
    )  # several nodes count restarts separately: torch's default
    assert distributed._restart_safe_store(2, datetime.timedelta(seconds=10)) is None
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")  # not under torchrun's shared store
    assert distributed._restart_safe_store(2, datetime.timedelta(seconds=10)) is None


@pytest.mark.parametrize("rank", [1, 0])
def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(
    assets, tmp_path, reference, rank
):
    """The ranks agree on the step to stop at (a signal may reach one rank only), save it, and
    a new torchrun continues it bit-identical to an uninterrupted run."""
    run_dir = tmp_path / "run"
    result, seconds = torchrun(assets, tmp_path, run_dir, fault="sigterm", rank=rank, step=3)
    assert result.returncode != 0 and seconds < 60, result.stdout[-2000:] + result.stderr[-4000:]
    assert "stopped by SIGTERM at step 3" in result.stderr, result.stderr[-4000:]
    assert checkpoints.latest_checkpoint(run_dir).name == "step_00000003"
    assert not leftover_workers(tmp_path)
    result, _ = torchrun(assets, tmp_path, run_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    _, expected = reference
    state = resume.load_resume_state(checkpoints.latest_checkpoint(run_dir))
    assert {**state["train_state"], "run_id": ""} == {**expected["train_state"], "run_id": ""}
    for key, value in expected["model"].items():
        assert torch.equal(state["model"][key], value), key
