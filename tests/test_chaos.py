"""kill -9 chaos: a tiny CPU pretraining run, SIGKILLed at random moments at least 10
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
import time

import torch
from pretrain_helpers import (
    Child,
    assets,
    check_every_complete_checkpoint_loads,
    debris,
    final_state,  # noqa: F401
    no_orphans,
    read_metrics,
    tiny_flags,
)

from minimind_fast import checkpoints

SEED = 20240606
KILLS = 12
STEPS = 80


def _wait_for_kill_moment(child: Child, mode: str, rng: random.Random, ckpt_root) -> bool:
    """Wait for the moment `mode` kills `child` at; False if the run finished first."""
    if mode == "startup":
        deadline = child.started + rng.uniform(0.2, 3.0)
        return child.wait_until(lambda: time.monotonic() >= deadline or child.training())
    if mode == "step":
        target = rng.randint(0, 4)
        ready = child.wait_until(
            lambda: child.training() and child.logged_step() >= child.resumed_step() + target
        )
        time.sleep(rng.uniform(0, 0.02))
        return ready
    # inside the 1st to 4th checkpoint write of this process
    nth, seen = rng.randint(1, 4), set()

    def in_nth_save():  # (or, should polling miss the short-lived temp dirs, 6 steps in)
        if child.training() and ckpt_root.is_dir():
            seen.update(n for n in os.listdir(ckpt_root) if n.startswith(".tmp-step"))
        return (
            len(seen) >= nth and any(n in seen for n in os.listdir(ckpt_root))
        ) or child.logged_step() >= child.resumed_step() + 6

    ready = child.wait_until(in_nth_save)
    time.sleep(rng.uniform(0, 0.002))
    return ready


def test_kill_9_chaos_resumes_bit_identical(assets, tmp_path, no_orphans):
    rng = random.Random(SEED)
    flags = dict(
        max_steps=STEPS,
        save_interval=1,
        keep_checkpoints=2,
        dropout=0.1,
        log_interval=1,
        from_resume="auto",
        sample_tokens=0,
        batch_size=4,
        accumulation_steps=3,
    )  # 7 steps an epoch, the last a partial window

    reference_dir = tmp_path / "reference"
    reference = Child(tiny_flags(assets, reference_dir, **flags))
    assert reference.finish() == 0, reference.output()[-3000:]

    run_dir = tmp_path / "chaos"
    ckpt_root = run_dir / checkpoints.CHECKPOINTS_DIR
    modes = ["startup", "step", "save"] * (KILLS // 3)
    rng.shuffle(modes)
    # (mode, resumed at (None: killed before), latest complete step after the kill,
    #  a write cut short)
    log = []
    attempts = 0
    while len(log) < KILLS:
        attempts += 1
        assert attempts <= 3 * KILLS, log
        mode = modes[len(log)]
        before = set(debris(run_dir))
        child = Child(tiny_flags(assets, run_dir, **flags))
        ready = _wait_for_kill_moment(child, mode, rng, ckpt_root)
        if not ready:  # it finished before the kill: the run is complete
            assert child.finish() == 0, child.output()[-3000:]
            break
        if not child.kill():
            continue
        cut_short = bool(set(debris(run_dir)) - before)
        steps = check_every_complete_checkpoint_loads(run_dir)
        log.append(
            (
                mode,
                child.resumed_step() if child.training() else None,
                max(steps, default=0),
                cut_short,
            )
        )
    print(
        "\n".join(
            f"kill {i + 1:2d}: {m:7s} "
            f"{'before training' if r is None else f'resumed at {r:2d}':15s} -> "
            f"latest complete checkpoint {s:2d}{', a write cut short' if c else ''}"
            for i, (m, r, s, c) in enumerate(log)
        )
    )
    assert len(log) >= 10, log
    assert sum(cut for *_, cut in log) >= 1, log  # some kills landed inside a checkpoint write
    assert len({mode for mode, *_ in log}) == 3, log

    final = Child(tiny_flags(assets, run_dir, **flags))
    assert final.finish() == 0, final.output()[-3000:]
    assert check_every_complete_checkpoint_loads(run_dir)[-1] == STEPS
    assert not debris(run_dir), debris(run_dir)

    expected, result = final_state(reference_dir), final_state(run_dir)
    assert {**result["train_state"], "run_id": ""} == {**expected["train_state"], "run_id": ""}
    assert result["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(result["model"][key], value), key
    for index, values in expected["optimizer"]["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(result["optimizer"]["state"][index][name], values[name]), (
                index,
                name,
            )
    losses = {r["step"]: r["loss"] for r in read_metrics(reference_dir) if "loss" in r}
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses.values())
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r} == losses
