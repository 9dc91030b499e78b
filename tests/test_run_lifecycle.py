"""A run directory's life under the situations that used to lose checkpoints or crash: the health
policy, fresh-vs-resume, the lock, non-finite state, crafted resume states, changed inputs on
resume, wrong directories, signals, and save errors that say what failed. Each test states the
rule it protects; every run is a tiny model that trains in a second or two."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from pretrain_helpers import (
    Child,
    assets,
    check_every_complete_checkpoint_loads,
    final_state,  # noqa: F401
    no_orphans,
    read_metrics,
    run,
    tiny_flags,
)

from minimind_fast import checkpoints
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.train import checkpoint, resume


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def snapshot(run_dir) -> dict:
    """Every file of a run directory with its bytes (to prove nothing changed)."""
    return {
        p.relative_to(run_dir): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def healthy_run(assets, run_dir, steps=15, **flags):
    assert (
        run(
            tiny_flags(
                assets, run_dir, max_steps=steps, save_interval=5, keep_checkpoints=3, **flags
            )
        )
        == 0
    )
    return run_dir


def poison_gradients(monkeypatch, from_call):
    """Every training forward from the `from_call`-th on gives a NaN loss (so NaN gradients)."""
    real_forward = MiniMindForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= from_call:
                return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(MiniMindForCausalLM, "forward", forward)


# ---- 1. health: all-skipped steps stop the run and never rotate out the good checkpoints ---------


def test_exploding_learning_rate_stops_and_keeps_every_healthy_checkpoint(assets, tmp_path, capsys):
    run_dir = healthy_run(assets, tmp_path / "run")
    mirror = (run_dir / "pretrain_32.pth").read_bytes()
    before = [p.name for p in checkpoints.list_checkpoints(run_dir)]
    assert before == ["step_00000005", "step_00000010", "step_00000015"]
    code = run(
        tiny_flags(
            assets,
            run_dir,
            max_steps=60,
            save_interval=5,
            keep_checkpoints=3,
            from_resume=1,
            learning_rate=1e3,
            log_interval=50,
        )
    )
    line = one_error_line(capsys)
    assert code == 1
    assert (
        "consecutive optimizer steps" in line
        and "step_00000015" in line
        and "--max_bad_steps" in line
    )
    healthy = [p.name for p in checkpoints.list_checkpoints(run_dir)]
    assert "step_00000015" in healthy and healthy[-1] == "step_00000015"
    assert (run_dir / "pretrain_32.pth").read_bytes() == mirror
    for ckpt in checkpoints.list_checkpoints(run_dir):
        assert all(
            torch.isfinite(v).all() for v in resume.load_resume_state(ckpt)["model"].values()
        )


def test_fresh_run_with_exploding_learning_rate_exits_nonzero(assets, tmp_path, capsys):
    code = run(
        tiny_flags(assets, tmp_path / "run", max_steps=40, save_interval=5, learning_rate=1e3)
    )
    assert code == 1, capsys.readouterr()
    assert "consecutive optimizer steps" in one_error_line(capsys)
    assert not (tmp_path / "run" / "pretrain_32.pth").exists() or checkpoints.latest_checkpoint(
        tmp_path / "run"
    )


def test_bad_streak_shorter_than_the_limit_at_the_end_is_an_error(
    assets, tmp_path, monkeypatch, capsys
):
    """Fewer bad steps than --max_bad_steps at the very end: the final checkpoint is marked
    unhealthy, the mirror stays at the last healthy one, the exit code is 1."""
    run_dir = tmp_path / "run"
    poison_gradients(monkeypatch, from_call=9)  # steps 9 and 10 are bad (one micro-batch a step)
    code = run(tiny_flags(assets, run_dir, max_steps=10, save_interval=4, max_bad_steps=5))
    line = one_error_line(capsys)
    assert code == 1 and "ended with 2 bad optimizer step(s)" in line and "step_00000008" in line
    assert checkpoints.latest_checkpoint(run_dir).name == "step_00000008"
    newest = checkpoints.latest_checkpoint(run_dir, healthy_only=False)
    assert newest.name == "step_00000010" and checkpoints.read_marker(newest)["healthy"] is False
    mirror = torch.load(run_dir / "pretrain_32.pth", weights_only=True)
    expected = torch.load(
        run_dir / "checkpoints" / "step_00000008" / "pretrain_32.pth", weights_only=True
    )
    assert all(torch.equal(mirror[k], expected[k]) for k in expected)


def test_rotation_keeps_the_newest_healthy_checkpoint(assets, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    poison_gradients(monkeypatch, from_call=5)  # steps 5.. are bad; saves at 2, 4 healthy, 6, 8 not
    code = run(
        tiny_flags(
            assets, run_dir, max_steps=9, save_interval=2, keep_checkpoints=1, max_bad_steps=20
        )
    )
    assert code == 1
    names = [p.name for p in checkpoints.list_checkpoints(run_dir, healthy_only=False)]
    assert (
        "step_00000004" in names and checkpoints.latest_checkpoint(run_dir).name == "step_00000004"
    )


# ---- 2. a fresh run never touches an earlier run's files -----------------------------------------


def test_fresh_run_in_a_used_directory_is_refused_and_changes_nothing(assets, tmp_path, capsys):
    run_dir = healthy_run(assets, tmp_path / "run")
    before = snapshot(run_dir)
    capsys.readouterr()
    assert run(tiny_flags(assets, run_dir, max_steps=30, save_interval=5, keep_checkpoints=1)) == 2
    line = one_error_line(capsys)
    assert "already holds an earlier run" in line and "--from_resume 1" in line
    assert snapshot(run_dir) == before


def test_rotation_only_deletes_this_runs_checkpoints(assets, tmp_path):
    """A directory that also holds another run's checkpoint (an older layout): rotation leaves
    it."""
    run_dir = healthy_run(assets, tmp_path / "run", steps=5)
    foreign = run_dir / "checkpoints" / "step_00000001"
    foreign.mkdir()
    (foreign / "resume.pt").write_bytes(b"x")
    (foreign / "COMPLETE").write_text(
        json.dumps({"step": 1, "sequence": 0, "run_id": "someone-else"})
    )
    assert (
        run(
            tiny_flags(
                assets, run_dir, max_steps=12, save_interval=2, keep_checkpoints=1, from_resume=1
            )
        )
        == 0
    )
    names = [p.name for p in checkpoints.list_checkpoints(run_dir)]
    assert names == ["step_00000001", "step_00000012"]


# ---- 3. one trainer per directory ----------------------------------------------------------------


def test_second_trainer_on_a_locked_directory_exits_at_once(assets, tmp_path, no_orphans):
    run_dir = tmp_path / "run"
    first = Child(tiny_flags(assets, run_dir, max_steps=100000, log_interval=1, save_interval=1))
    assert first.wait_until(lambda: first.logged_step() >= 2, timeout=120)
    second = Child(tiny_flags(assets, run_dir, max_steps=5, from_resume="auto"))
    assert second.finish(timeout=60) == 2
    assert f"is in use by another run (pid {first.proc.pid}" in second.output()
    # kill -9 leaves a stale lock record that the next trainer detects and takes over
    assert first.kill()
    third = Child(tiny_flags(assets, run_dir, max_steps=3, from_resume="auto"))
    assert third.finish() == 0, third.output()[-2000:]
    assert "did not exit cleanly" in third.output() and f"pid {first.proc.pid}" in third.output()


# ---- 4. non-finite state is refused --------------------------------------------------------------


def test_non_finite_initial_weights_are_refused(assets, tmp_path, capsys):
    source = healthy_run(assets, tmp_path / "source", steps=5)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(checkpoints.latest_checkpoint(source) / "model.safetensors"))
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, str(tmp_path / "nan.safetensors"))
    capsys.readouterr()
    assert (
        run(
            tiny_flags(
                assets, tmp_path / "run", max_steps=2, from_weight=tmp_path / "nan.safetensors"
            )
        )
        == 2
    )
    assert "model.norm.weight" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_save_with_non_finite_weights_is_refused(assets, tmp_path, monkeypatch, capsys):
    from minimind_fast.train import optim

    real = optim.clip_and_step

    def corrupting(optimizer, scaler, grad_clip):  # the update itself writes a NaN at step 3
        result = real(optimizer, scaler, grad_clip)
        if optimizer.state[optimizer.param_groups[0]["params"][0]]["step"].item() >= 3:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(optim, "clip_and_step", corrupting)
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=6, save_interval=2)) == 1
    line = one_error_line(capsys)
    assert "NaN/inf" in line and "step_00000002" in line
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "run", healthy_only=False)] == [
        "step_00000002"
    ]


# ---- 5. a crafted or stale resume.pt is a clear error, never a crash -----------------------------


def _edit_resume_state(run_dir, edit):
    for ckpt in checkpoints.list_checkpoints(run_dir):
        path = ckpt / checkpoints.RESUME_FILE
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)


def _first_moment(state):
    return next(iter(state["optimizer"]["state"].values()))


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda s: _first_moment(s).update(exp_avg=torch.zeros(7, 3)), "has shape (7, 3)"),
        (lambda s: _first_moment(s).update(exp_avg_sq=torch.zeros(10**6)), "has shape (1000000,)"),
        (lambda s: s["optimizer"]["param_groups"].pop(), "parameter groups"),
        (lambda s: s.pop("rng"), "'rng' is missing"),
        (lambda s: s.update(args=["not", "a", "dict"]), "'args' is list"),
        (lambda s: s.update(world_size=0), "world_size=0"),
        (lambda s: s["rng"][0].update(torch=torch.zeros(3)), "not a valid generator state"),
        (lambda s: s["train_state"].update(consumed=-5), "consumed=-5"),
        (lambda s: s["train_state"].pop("epoch"), "has no 'epoch'"),
        (lambda s: s["scaler"].update(scale=float("nan")), "scaler.scale"),
    ],
)
def test_crafted_resume_state_is_a_one_line_error(assets, tmp_path, capsys, edit, fragment):
    run_dir = healthy_run(assets, tmp_path / "run", steps=5, dtype="float32")
    if "scaler" in fragment:
        _edit_resume_state(
            run_dir,
            lambda s: s.update(
                scaler={
                    "scale": 1.0,
                    "growth_factor": 2.0,
                    "backoff_factor": 0.5,
                    "growth_interval": 10,
                    "_growth_tracker": 0,
                }
            ),
        )
    _edit_resume_state(run_dir, edit)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert run(tiny_flags(assets, run_dir, max_steps=8, from_resume=1)) == 2
    line = one_error_line(capsys)
    assert fragment in line and "resume.pt" in line, line
    assert snapshot(run_dir) == before


# ---- 6/7. resume keeps the run's own settings; changes are applied, warned about or refused ------


def test_resume_restores_every_flag_and_the_data_path(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = tiny_flags(
        assets,
        run_dir,
        max_steps=6,
        save_interval=3,
        batch_size=3,
        learning_rate=7e-3,
        max_seq_len=24,
        seed=5,
    )
    assert run(argv) == 0
    saved = final_state(run_dir)["args"]
    checkpoint.remove_checkpoint(checkpoints.latest_checkpoint(run_dir))  # resume from step 3
    capsys.readouterr()
    assert run(["--from_resume", "1", "--save_dir", run_dir, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and "warning:" not in out
    resumed = final_state(run_dir)["args"]
    for name in (
        "data_path",
        "batch_size",
        "learning_rate",
        "max_seq_len",
        "seed",
        "max_steps",
        "tokenizer_path",
    ):
        assert resumed[name] == saved[name], name
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-1] == 6


def test_raising_max_steps_on_resume_says_how_the_learning_rate_moves(assets, tmp_path, capsys):
    run_dir = healthy_run(assets, tmp_path / "run", steps=10)
    capsys.readouterr()
    assert run(tiny_flags(assets, run_dir, max_steps=20, save_interval=5, from_resume=1)) == 0
    out = capsys.readouterr().out
    assert "note: --max_steps 10 -> 20" in out and "the learning rate of step 11 moves" in out


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("seed", 4, "--seed 4"),
        ("val_fraction", 0.2, "--val_fraction 0.2"),
        ("packing", 0, "--packing 0"),
        ("max_seq_len", 16, "--max_seq_len 16"),
        ("add_special_tokens", "never", "--add_special_tokens never"),
    ],
)
def test_resume_refuses_changes_to_the_data_stream(assets, tmp_path, capsys, flag, value, fragment):
    run_dir = healthy_run(assets, tmp_path / "run", steps=5)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert run(tiny_flags(assets, run_dir, max_steps=8, from_resume=1, **{flag: value})) == 2
    line = one_error_line(capsys)
    assert fragment in line and "drop the flag" in line
    assert snapshot(run_dir) == before


def test_resume_refuses_an_edited_data_file_and_a_from_weight(assets, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(assets["data"].read_bytes())
    run_dir = healthy_run(assets, tmp_path / "run", steps=5, data_path=data)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same rows, another order
    capsys.readouterr()
    assert run(tiny_flags(assets, run_dir, max_steps=8, from_resume=1, data_path=data)) == 2
    assert "changed since" in one_error_line(capsys)
    data.write_bytes(assets["data"].read_bytes())
    assert (
        run(
            tiny_flags(
                assets, run_dir, max_steps=8, from_resume=1, data_path=data, from_weight=run_dir
            )
        )
        == 2
    )
    assert "--from_weight" in one_error_line(capsys)


def test_resume_with_another_batch_warns_and_keeps_the_data_order(assets, tmp_path, capsys):
    run_dir = healthy_run(assets, tmp_path / "run", steps=5)
    consumed = final_state(run_dir)["train_state"]["consumed"]
    capsys.readouterr()
    assert run(tiny_flags(assets, run_dir, max_steps=6, from_resume=1, batch_size=2)) == 0
    assert "warning: --batch_size 4 -> 2" in capsys.readouterr().out
    assert final_state(run_dir)["train_state"]["consumed"] == consumed + 2


# ---- 8/9. wrong directories ----------------------------------------------------------------------


def test_resume_from_a_missing_or_checkpoint_directory_is_an_error(assets, tmp_path, capsys):
    assert run(tiny_flags(assets, tmp_path / "typo", max_steps=2, from_resume=1)) == 2
    assert "does not exist" in one_error_line(capsys) and not (tmp_path / "typo").exists()
    run_dir = healthy_run(assets, tmp_path / "run", steps=5)
    ckpt = checkpoints.latest_checkpoint(run_dir)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert run(tiny_flags(assets, ckpt, max_steps=2, from_resume=1)) == 2
    assert f"--save_dir {run_dir}" in one_error_line(capsys)
    assert snapshot(run_dir) == before


def test_an_exported_model_directory_is_not_a_save_dir(assets, tmp_path, capsys):
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    before = snapshot(export)
    assert run(tiny_flags(assets, export, max_steps=2)) == 2
    assert "exported Hugging Face model" in one_error_line(capsys)
    assert snapshot(export) == before


# ---- 10. signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_resumes_bit_identical(
    assets, tmp_path, no_orphans, signum, code
):
    flags = dict(max_steps=40, log_interval=1, save_interval=0, dropout=0.1, accumulation_steps=2)
    reference = tmp_path / "reference"
    assert run(tiny_flags(assets, reference, **flags)) == 0
    run_dir = tmp_path / "run"
    child = Child(tiny_flags(assets, run_dir, **flags))
    assert child.wait_until(lambda: child.logged_step() >= 3, timeout=120)
    child.kill(signum)
    assert child.finish() == code, child.output()[-2000:]
    stopped_at = checkpoints.latest_checkpoint(run_dir)
    assert stopped_at is not None and f"checkpoint {stopped_at}" in child.output()
    assert "--from_resume 1" in child.output()
    assert run(tiny_flags(assets, run_dir, from_resume=1, **flags)) == 0
    expected, result = final_state(reference), final_state(run_dir)
    for key, value in expected["model"].items():
        assert torch.equal(result["model"][key], value), key


def test_second_signal_exits_at_once_and_keeps_checkpoints_whole(assets, tmp_path, no_orphans):
    run_dir = tmp_path / "run"
    child = Child(tiny_flags(assets, run_dir, max_steps=100000, log_interval=1, save_interval=1))
    assert child.wait_until(lambda: child.logged_step() >= 3, timeout=120)
    child.kill(signal.SIGTERM)
    child.kill(signal.SIGTERM)
    assert child.finish() == 143
    assert "again: exiting now" in child.output() or "stopped by SIGTERM" in child.output()
    check_every_complete_checkpoint_loads(run_dir)


# ---- 11. save errors say what failed and what is intact ------------------------------------------


def test_a_failed_mirror_update_says_the_checkpoint_is_intact(
    assets, tmp_path, monkeypatch, capsys
):
    from minimind_fast.train import run_dir as run_dir_module

    real = run_dir_module.copy_file_atomic

    def failing(source, target):
        if target.name.endswith(".pth"):
            raise OSError(28, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(run_dir_module, "copy_file_atomic", failing)
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=2, save_interval=2)) == 1
    line = one_error_line(capsys)
    assert "is saved and complete" in line and "pretrain_32.pth" in line and "disk full" in line
    assert checkpoints.latest_checkpoint(tmp_path / "run").name == "step_00000002"


def test_a_temp_directory_deleted_by_another_process_is_not_called_a_full_disk(
    assets, tmp_path, monkeypatch, capsys
):
    import shutil

    real = checkpoint.write_json_atomic

    def vanishing(path, value):
        if path.name == checkpoints.MARKER:
            shutil.rmtree(path.parent)
        return real(path, value)

    monkeypatch.setattr(checkpoint, "write_json_atomic", vanishing)
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=2, save_interval=2)) == 1
    line = one_error_line(capsys)
    assert "vanished" in line and "disk full" not in line


class FullDisk:
    """A file handle whose `fail_at`-th write stores half its text, then fails like ENOSPC."""

    def __init__(self, handle, fail_at: int):
        self.handle, self.fail_at, self.writes = handle, fail_at, 0

    def write(self, text):
        self.writes += 1
        if self.writes == self.fail_at:
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise OSError(28, "No space left on device")
        return self.handle.write(text)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_disk_full_on_the_metrics_file_is_one_line(assets, tmp_path, monkeypatch, capsys):
    from minimind_fast.train import metrics

    real_init = metrics.Reporter.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.jsonl is not None:
            self.jsonl = FullDisk(self.jsonl, fail_at=3)

    monkeypatch.setattr(metrics.Reporter, "__init__", init)
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=6)) == 1
    line = one_error_line(capsys)
    assert "metrics.jsonl" in line and "disk full" in line
    assert [
        json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]


def test_healthy_run_uses_the_whole_budget(assets, tmp_path):
    """The health checks never stop a healthy run and never mark its checkpoints unhealthy."""
    run_dir = healthy_run(assets, tmp_path / "run", steps=10)
    markers = [
        checkpoints.read_marker(p)
        for p in checkpoints.list_checkpoints(run_dir, healthy_only=False)
    ]
    assert markers and all(m["healthy"] for m in markers)
    assert math.isfinite(read_metrics(run_dir)[-1]["val_loss"])
