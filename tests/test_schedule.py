"""Learning-rate schedules: warmup + cosine at the optimizer step (values at the boundaries,
monotonicity, warmup resolution) and MiniMind's get_lr at its micro-step index."""

import math

import pytest

from minimind_fast.train.schedule import (
    learning_rate_at,
    micro_batches_per_epoch,
    minimind_learning_rate,
    minimind_micro_step,
    minimind_total_micro_steps,
    resolve_warmup_steps,
)

MAX, MIN = 1e-3, 1e-4


def test_warmup_is_linear_and_reaches_the_peak():
    assert learning_rate_at(0, 100, MAX, MIN, warmup_steps=10) == pytest.approx(MAX / 10)
    assert learning_rate_at(4, 100, MAX, MIN, warmup_steps=10) == pytest.approx(MAX * 5 / 10)
    assert learning_rate_at(9, 100, MAX, MIN, warmup_steps=10) == pytest.approx(MAX)
    assert learning_rate_at(10, 100, MAX, MIN, warmup_steps=10) == pytest.approx(
        MAX
    )  # cosine starts at the peak


def test_cosine_midpoint_end_and_after():
    # warmup 10, total 110: the decay spans steps 10..110, midpoint 60
    assert learning_rate_at(60, 110, MAX, MIN, warmup_steps=10) == pytest.approx((MAX + MIN) / 2)
    assert learning_rate_at(35, 110, MAX, MIN, warmup_steps=10) == pytest.approx(
        MIN + (MAX - MIN) * 0.5 * (1 + math.cos(math.pi * 0.25))
    )
    assert learning_rate_at(110, 110, MAX, MIN, warmup_steps=10) == pytest.approx(MIN)
    assert learning_rate_at(500, 110, MAX, MIN, warmup_steps=10) == pytest.approx(MIN)


def test_no_warmup_starts_at_peak_and_decreases_monotonically():
    values = [learning_rate_at(s, 50, MAX, MIN) for s in range(51)]
    assert values[0] == pytest.approx(MAX)
    assert values[-1] == pytest.approx(MIN)
    assert all(a > b for a, b in zip(values, values[1:]))


def test_minimind_special_case():
    # MiniMind's get_lr (trainer_utils.py): lr * (0.1 + 0.45 * (1 + cos(pi * step / total)))
    lr, total = 5e-4, 1000
    for step in (0, 1, 250, 999):
        expected = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))
        assert learning_rate_at(step, total, lr, lr / 10) == pytest.approx(expected)


def test_warmup_covering_all_steps_and_negative_step():
    assert learning_rate_at(4, 5, MAX, MIN, warmup_steps=5) == pytest.approx(MAX)
    assert learning_rate_at(5, 5, MAX, MIN, warmup_steps=5) == pytest.approx(MIN)
    with pytest.raises(ValueError, match="step=-1"):
        learning_rate_at(-1, 5, MAX, MIN)


def test_resolve_warmup_steps():
    assert resolve_warmup_steps(1000, None, 0.02) == 20
    assert resolve_warmup_steps(1000, 7, 0.5) == 7  # explicit steps win
    assert resolve_warmup_steps(10, 50, 0.0) == 10  # never more than the run
    assert resolve_warmup_steps(10, None, 0.0) == 0


def test_minimind_learning_rate_is_get_lr():
    lr = 5e-4
    assert minimind_learning_rate(0, 40, lr) == lr * (0.1 + 0.45 * 2)
    assert minimind_learning_rate(40, 40, lr) == lr * 0.1
    cosine = 1 + math.cos(math.pi * 13 / 40)
    assert minimind_learning_rate(13, 40, lr) == lr * (0.1 + 0.45 * cosine)
    assert minimind_learning_rate(45, 40, lr) == lr * 0.1  # never past S (a cycled --max_steps run)
    with pytest.raises(ValueError, match="total_micro_steps=0"):
        minimind_learning_rate(0, 0, lr)


def test_minimind_step_index_counts_micro_batches_per_rank():
    assert micro_batches_per_epoch(11, 2, 1) == 6  # the last micro-batch holds one row
    assert micro_batches_per_epoch(11, 2, 2) == 3  # 5 rows per rank (the odd row is dropped)
    # epoch 1 of 6 micro-batches, 4 taken (8 rows on one rank), a window of 2 ends at the 6th
    assert minimind_micro_step(1, 8, 2, 11, 2, 1) == 6 + 6
    # two ranks: 8 rows consumed globally = 2 micro-batches of 2 rows on each rank
    assert minimind_micro_step(0, 8, 2, 20, 2, 2) == 4
    assert minimind_micro_step(0, 8, 4, 20, 2, 2) == 5  # a short last window stops at iters


def test_minimind_total_covers_the_optimizer_steps():
    assert minimind_total_micro_steps(6, 10, 2, 2, 1) == 10  # 2 epochs of 5 micro-batches
    assert minimind_total_micro_steps(4, 10, 2, 2, 1) == 5 + 2  # --max_steps 4: an epoch + 1 window
    assert minimind_total_micro_steps(1, 10, 8, 4, 1) == 2
