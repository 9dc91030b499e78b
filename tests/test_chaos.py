"""kill -9 chaos (issue 6): a tiny CPU pretraining run, SIGKILLed at random moments at least 10
times and resumed each time with --from_resume 1, ends bit-identical to an uninterrupted run of
the same length; after every kill, every checkpoint directory marked complete reads back whole.

Kill moments come from a seeded RNG and are placed in three ways so that they cover the stages
that matter, whatever the machine's speed (no test hook in the training code):
- "startup": a random 0.2-3 s after the spawn (imports, data setup, resume loading, the run
  directory's config/tokenizer/metrics writes), at the latest when the training loop starts;
- "step": 0-20 ms after the log line of the 0th-4th step after the resumed one (the checkpoint
  write of that step, or the next forward/backward);
- "save": 0-2 ms after the temp directory of this process's 1st-4th checkpoint appears (inside
  the checkpoint write).
A process wins at most a few steps, so the 80-step run (11 epochs) never finishes before the
last kill, however fast the machine.
Every step is checkpointed (--save_interval 1, --keep_checkpoints 2, so old checkpoints are also
being deleted) with dropout on and 3 micro-batches per step, so RNG, optimizer, accumulation and
data-order state (across epoch boundaries) must all resume exactly.
Runs in about 50 s on 2 busy cores (14 process starts of an 80-step run of a 40k-parameter model).
"""
from __future__ import annotations

import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minimind_fast.interop import load_weights
from minimind_fast.tokenizer import load_tokenizer
from minimind_fast.train import checkpoint
from pretrain_helpers import assets, read_metrics, tiny_flags  # noqa: F401 (assets is a fixture)

SEED = 20240606
KILLS = 12
STEPS = 80
REPO = Path(__file__).resolve().parents[1]
TEMP_NAMES = (".tmp-", ".trash-", ".write-test")


class Child:
    """`python -m minimind_fast.pretrain argv` with its output collected line by line."""

    live: list["Child"] = []  # killed at the end of the test, should an assertion leave one running

    def __init__(self, argv):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "minimind_fast.pretrain", *map(str, argv)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        Child.live.append(self)

    def output(self) -> str:
        return "".join(self.lines)

    def resumed_step(self) -> int:
        found = re.search(r"resumed \S+ at step (\d+)", self.output())
        return int(found.group(1)) if found else 0

    def training(self) -> bool:
        return any(line.startswith("model ") for line in self.lines)

    def logged_step(self) -> int:
        steps = re.findall(r"step (\d+)/\d+ \|", self.output())
        return int(steps[-1]) if steps else -1

    def wait_until(self, condition, timeout: float = 60.0, poll: float = 0.0002) -> bool:
        """True once condition() holds while the process still runs; False if it exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if condition():
                return True
            time.sleep(poll)
        raise AssertionError(f"timed out waiting; output so far:\n{self.output()[-3000:]}")

    def kill(self) -> bool:
        """SIGKILL; True if it landed on a running process."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return code == -signal.SIGKILL

    def finish(self, timeout: float = 180) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def debris(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.startswith(TEMP_NAMES) or p.name.endswith(".tmp")]


def check_every_complete_checkpoint_loads(run_dir: Path) -> list[int]:
    """Every checkpoint marked complete reads back whole and self-consistent; returns their steps."""
    root = run_dir / checkpoint.CHECKPOINTS_DIR
    steps, config = [], None
    if root.is_dir():  # a step_* directory only ever appears by renaming a complete temp directory
        unmarked = [p.name for p in root.iterdir()
                    if p.name.startswith("step_") and not (p / checkpoint.MARKER).is_file()]
        assert not unmarked, unmarked
    for ckpt in checkpoint.list_checkpoints(run_dir):
        state = checkpoint.load_resume_state(ckpt)
        step = int(ckpt.name.split("_")[1])
        assert state["progress"]["step"] == step, ckpt
        config, weights = load_weights(ckpt)  # model.safetensors, validated against its config.json
        _, pth = load_weights(ckpt / "pretrain_32.pth", config)
        for key, value in weights.items():
            assert torch.equal(pth[key], value), (ckpt, key)
            assert torch.equal(state["model"][key].half(), value), (ckpt, key)
        assert set(state["optimizer"]["state"]) and len(state["rng"]) == 1
        load_tokenizer(ckpt)
        steps.append(step)
    if (run_dir / "pretrain_32.pth").exists():  # the run directory's MiniMind mirror is always whole
        load_weights(run_dir / "pretrain_32.pth", config)
    if (run_dir / "tokenizer.json").exists():
        load_tokenizer(run_dir)
    return steps


@pytest.fixture
def no_orphans():
    yield
    for child in Child.live:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
    Child.live.clear()


def test_kill_9_chaos_resumes_bit_identical(assets, tmp_path, no_orphans):
    rng = random.Random(SEED)
    flags = dict(max_steps=STEPS, save_interval=1, keep_checkpoints=2, dropout=0.1, log_interval=1, from_resume=1,
                 sample_tokens=0, batch_size=4, accumulation_steps=3)  # 7 steps an epoch, the last a partial window

    reference_dir = tmp_path / "reference"
    reference = Child(tiny_flags(assets, reference_dir, **flags))
    assert reference.finish() == 0, reference.output()[-3000:]

    run_dir = tmp_path / "chaos"
    ckpt_root = run_dir / checkpoint.CHECKPOINTS_DIR
    modes = ["startup", "step", "save"] * (KILLS // 3)
    rng.shuffle(modes)
    log = []  # (mode, resumed at (None: killed before), latest complete step after the kill, a write cut short)
    attempts = 0
    while len(log) < KILLS:
        attempts += 1
        assert attempts <= 3 * KILLS, log
        mode = modes[len(log)]
        before = set(debris(run_dir))
        child = Child(tiny_flags(assets, run_dir, **flags))
        if mode == "startup":
            deadline = child.started + rng.uniform(0.2, 3.0)
            ready = child.wait_until(lambda: time.monotonic() >= deadline or child.training())
        elif mode == "step":
            target = rng.randint(0, 4)
            ready = child.wait_until(lambda: child.training() and child.logged_step() >= child.resumed_step() + target)
            time.sleep(rng.uniform(0, 0.02))
        else:  # inside the 1st to 4th checkpoint write of this process
            nth, seen = rng.randint(1, 4), set()

            def in_nth_save():  # (or, should polling miss the short-lived temp dirs, 6 steps in)
                if child.training() and ckpt_root.is_dir():
                    seen.update(n for n in os.listdir(ckpt_root) if n.startswith(".tmp-step"))
                return ((len(seen) >= nth and any(n in seen for n in os.listdir(ckpt_root)))
                        or child.logged_step() >= child.resumed_step() + 6)

            ready = child.wait_until(in_nth_save)
            time.sleep(rng.uniform(0, 0.002))
        if not ready:  # it finished before the kill: the run is complete
            assert child.finish() == 0, child.output()[-3000:]
            break
        if not child.kill():
            continue
        cut_short = bool(set(debris(run_dir)) - before)
        steps = check_every_complete_checkpoint_loads(run_dir)
        log.append((mode, child.resumed_step() if child.training() else None, max(steps, default=0), cut_short))
    print("\n".join(f"kill {i + 1:2d}: {m:7s} {'before training' if r is None else f'resumed at {r:2d}':15s} -> "
                    f"latest complete checkpoint {s:2d}{', a write cut short' if c else ''}"
                    for i, (m, r, s, c) in enumerate(log)))
    assert len(log) >= 10, log
    assert sum(cut for *_, cut in log) >= 1, log  # some kills landed inside a checkpoint write
    assert len({mode for mode, *_ in log}) == 3, log

    final = Child(tiny_flags(assets, run_dir, **flags))
    assert final.finish() == 0, final.output()[-3000:]
    assert check_every_complete_checkpoint_loads(run_dir)[-1] == STEPS
    assert not debris(run_dir), debris(run_dir)

    expected = checkpoint.load_resume_state(checkpoint.latest_checkpoint(reference_dir))
    result = checkpoint.load_resume_state(checkpoint.latest_checkpoint(run_dir))
    assert result["progress"] == expected["progress"]
    assert result["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(result["model"][key], value), key
    for index, values in expected["optimizer"]["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(result["optimizer"]["state"][index][name], values[name]), (index, name)
    losses = {r["step"]: r["loss"] for r in read_metrics(reference_dir) if "loss" in r}
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses.values())
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r} == losses
