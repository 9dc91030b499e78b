"""A randomised life of one run directory beside another run's directory: a seeded sequence of
fresh starts, resumes, kill -9 at a random moment, a full disk at a random write, a second
trainer on the same directory, and SIGTERM. After every event: every checkpoint marked complete
reads back whole, the newest healthy one loads, and the other run's files are byte-identical.

About 14 trainer processes of a tiny model: well under two minutes on 2 cores. Set
MINIMIND_FAST_LIFE_EVENTS for a longer run (e.g. 60).
"""

from __future__ import annotations

import os
import random
import resource
import signal

from pretrain_helpers import (
    Child,
    assets,
    check_every_complete_checkpoint_loads,
    final_state,  # noqa: F401
    no_orphans,
    tiny_flags,
)

from minimind_fast import checkpoints

SEED = 1234
EVENTS = int(os.environ.get("MINIMIND_FAST_LIFE_EVENTS", "12"))
KINDS = ("fresh", "resume", "kill9", "disk_full", "second_trainer", "sigterm")


def snapshot(run_dir) -> dict:
    return {
        p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
    }


def limit_file_size(limit_bytes):
    def apply():  # writes past the limit fail with EFBIG (as ENOSPC would) instead of SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_random_life_of_a_run_directory(assets, tmp_path, no_orphans):
    rng = random.Random(SEED)
    other = tmp_path / "other"
    flags = dict(log_interval=1, save_interval=2, keep_checkpoints=2, sample_tokens=0)
    done = Child(tiny_flags(assets, other, max_steps=4, **flags))
    assert done.finish() == 0, done.output()[-2000:]
    other_files = snapshot(other)

    run_dir, history = tmp_path / "run", []
    kinds = list(KINDS) + [rng.choice(KINDS) for _ in range(max(EVENTS - len(KINDS), 0))]
    rng.shuffle(kinds)
    for kind in kinds[:EVENTS]:
        had_run = run_dir.exists() and any(run_dir.iterdir())
        healthy_before = checkpoints.latest_checkpoint(run_dir) if run_dir.exists() else None
        newest = (
            checkpoints.latest_checkpoint(run_dir, healthy_only=False) if run_dir.exists() else None
        )
        current = checkpoints.read_marker(newest)["step"] if newest is not None else 0
        budget = current + (30 if kind in ("kill9", "sigterm") else rng.randint(2, 6))
        mode = "0" if kind == "fresh" else "auto"
        argv = tiny_flags(assets, run_dir, max_steps=budget, from_resume=mode, **flags)
        if kind == "disk_full":
            child = Child(argv, preexec_fn=limit_file_size(rng.choice([30_000, 90_000, 250_000])))
            code = child.finish()
            # a failed write (or refused start), one line
            assert code in (1, 2), child.output()[-2000:]
            assert "error:" in child.output() and "Traceback" not in child.output()
        elif kind in ("kill9", "sigterm", "second_trainer"):
            if kind == "second_trainer":
                # long enough to still hold the lock when the second starts
                argv = tiny_flags(
                    assets, run_dir, max_steps=budget + 10_000, from_resume=mode, **flags
                )
            child = Child(argv)
            steps = rng.randint(0, 3)
            running = child.wait_until(
                lambda child=child, steps=steps: child.logged_step() >= steps, timeout=120
            )
            if kind == "second_trainer" and running:
                second = Child(
                    tiny_flags(assets, run_dir, max_steps=budget, from_resume="auto", **flags)
                )
                assert second.finish() == 2, second.output()[-2000:]
                assert "is in use by another run" in second.output()
                child.kill(signal.SIGTERM)
                code = child.finish()
                assert code == 143, child.output()[-2000:]
            elif kind == "sigterm" and running:
                child.kill(signal.SIGTERM)
                code = child.finish()
                assert code in (0, 143), child.output()[-2000:]
            elif running:
                child.kill()
                code = -9
            else:
                code = child.finish()
        else:
            child = Child(argv)
            code = child.finish()
            if kind == "fresh" and had_run:
                assert code == 2 and "already holds an earlier run" in child.output(), (
                    child.output()[-2000:]
                )
        history.append((kind, code))
        check_every_complete_checkpoint_loads(run_dir)
        healthy = checkpoints.latest_checkpoint(run_dir) if run_dir.exists() else None
        if healthy is not None:
            final_state(run_dir)
        if healthy_before is not None:
            assert healthy is not None, history  # a healthy checkpoint is never lost
        assert snapshot(other) == other_files, history
    print(history)
    assert len({kind for kind, _ in history}) == len(KINDS), history
