"""Two-process DDP (gloo, CPU) launched with torchrun matches one process with the same global
batch; its checkpoint then resumes in one process from the same consumed-sample count."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_helpers import assets, read_metrics, tiny_flags  # noqa: F401 (assets is a fixture)

from minimind_fast import checkpoints, pretrain
from minimind_fast.train import checkpoint, resume

pytestmark = pytest.mark.slow  # two torch processes start: ~20-40 s on 2 cores


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(argv, timeout=300):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        "--max_restarts=0",
        "-m",
        "minimind_fast.pretrain",
        *map(str, argv),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_gloo_matches_single_process(assets, tmp_path, capsys):
    common = dict(
        max_steps=4, accumulation_steps=2, learning_rate=1e-2, warmup_steps=1, eval_interval=2
    )
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    result = torchrun(tiny_flags(assets, ddp_dir, batch_size=2, save_interval=2, **common))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x2;" in result.stdout  # the run knew it had 2 ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process had (OMP_NUM_THREADS=1)
    try:
        argv = tiny_flags(assets, single_dir, batch_size=4, save_interval=2, **common)
        assert pretrain.main([str(a) for a in argv]) == 0
    finally:
        torch.set_num_threads(threads)

    ddp, single = read_metrics(ddp_dir), read_metrics(single_dir)
    ddp_loss = [r["loss"] for r in ddp if "loss" in r]
    single_loss = [r["loss"] for r in single if "loss" in r]
    assert len(ddp_loss) == len(single_loss) == 4
    assert max(abs(a - b) for a, b in zip(ddp_loss, single_loss)) < 1e-5, (ddp_loss, single_loss)
    ddp_val = [r["val_loss"] for r in ddp if "val_loss" in r]
    single_val = [r["val_loss"] for r in single if "val_loss" in r]
    assert len(ddp_val) == 2 and abs(ddp_val[-1] - single_val[-1]) < 1e-4
    ddp_state = resume.load_resume_state(checkpoints.latest_checkpoint(ddp_dir))
    single_state = resume.load_resume_state(checkpoints.latest_checkpoint(single_dir))
    assert ddp_state["world_size"] == 2 and len(ddp_state["rng"]) == 2  # RNG state of every rank
    assert {**ddp_state["train_state"], "run_id": ""} == {
        **single_state["train_state"],
        "run_id": "",
    }
    for key, value in single_state["model"].items():
        torch.testing.assert_close(ddp_state["model"][key], value, rtol=0, atol=1e-4)

    # Resume the 2-rank checkpoint of step 2 in one process: same consumed samples, and it says so.
    capsys.readouterr()
    for stale in checkpoints.list_checkpoints(ddp_dir)[1:]:
        checkpoint.remove_checkpoint(stale)
    argv = tiny_flags(assets, ddp_dir, batch_size=4, from_resume=1, **dict(common, max_steps=3))
    assert pretrain.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "world size changed 2 -> 1" in out and "at step 2" in out
