"""The training loop end to end on a tiny model: CLI, exact resume, accumulation, precision paths,
NaN handling, generation from a run. Every run takes a few seconds on 2 CPU cores."""

import contextlib
import math

import pytest
import torch
from pretrain_helpers import assets, final_state, read_metrics, run, tiny_flags  # noqa: F401 (assets is a fixture)

from minimind_fast import checkpoints, generate
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.train import checkpoint, cli, optim, resume

REQUIRED_FLAGS = (
    "--epochs --batch_size --learning_rate --accumulation_steps --grad_clip --dtype --log_interval "
    "--save_interval --hidden_size --num_hidden_layers --max_seq_len --use_moe --data_path "
    "--from_resume --use_wandb --use_compile --save_dir --preset --warmup_steps --warmup_ratio "
    "--min_lr --weight_decay --max_steps --seed --packing --num_workers --grad_checkpointing "
    "--tokenizer_path --eval_interval --from_weight --save_weight --keep_checkpoints --device"
).split()


@contextlib.contextmanager
def interrupt_after_save(monkeypatch, at_step):
    """Make the run die (KeyboardInterrupt) right after its checkpoint at `at_step` is written."""
    real = checkpoint.save_checkpoint

    def save_then_die(run_dir, step, *args, **kwargs):
        path = real(run_dir, step, *args, **kwargs)
        if step == at_step:
            raise KeyboardInterrupt
        return path

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", save_then_die)
        yield


# ---- CLI -----------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    assert run(["--help"]) == 0
    text = capsys.readouterr().out
    options = [o for action in cli.build_parser()._actions for o in action.option_strings]
    for flag in set(options) | set(REQUIRED_FLAGS):
        assert flag in text, flag
    for action in cli.build_parser()._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--batch_size", "0"], "--batch_size: 0 must be >= 1"),
        (["--accumulation_steps", "-2"], "--accumulation_steps: -2"),
        (["--dtype", "fp8"], "'fp8'"),
        (["--learning_rate", "abc"], "'abc' is not a number"),
        (["--use_moe", "2"], "'2' must be 0 or 1"),
        (["--warmup_ratio", "1.5"], "1.5 must be"),
        (["--preset", "huge"], "'huge'"),
        (["--learning_rate", "1e-3", "--min_lr", "1e-2"], "--min_lr 0.01 exceeds"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(capsys, argv, fragment):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(max_seq_len=4096), "--max_seq_len 4096 exceeds"),
        (dict(hidden_size=100), "head_dim=25"),
        (dict(vocab_size=300), "pass --vocab_size 320"),
        (dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), "cuda"),
        (dict(data_path="/nonexistent/corpus.jsonl"), "/nonexistent/corpus.jsonl"),
        (dict(from_weight="/nonexistent/w.safetensors"), "/nonexistent/w.safetensors"),
    ],
)
def test_bad_setups_exit_2_with_one_line(assets, tmp_path, capsys, overrides, fragment):
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=1, **overrides)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err


def test_unwritable_save_dir(assets, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert run(tiny_flags(assets, blocker / "run", max_steps=1)) == 2
    assert "is not writable" in capsys.readouterr().err


# ---- a whole run ---------------------------------------------------------------------------------


def test_run_logs_saves_evaluates_and_samples(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = tiny_flags(
        assets,
        run_dir,
        max_steps=30,
        learning_rate=2e-2,
        eval_interval=10,
        save_interval=10,
        keep_checkpoints=2,
        log_interval=5,
        sample_tokens=8,
        sample_prompt="the model",
    )
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "sample: the model" in out
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 5, 10, 15, 20, 25, 30]  # the first step, then every 5
    for key in (
        "epoch",
        "loss",
        "aux_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tflops",
        "mfu",
        "peak_mem_gb",
        "eta_s",
        "skipped_steps",
    ):
        assert key in train[0], key
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert train[-1]["tokens_per_s"] > 0 and train[-1]["skipped_steps"] == 0
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert [p.name for p in checkpoints.list_checkpoints(run_dir)] == [
        "step_00000020",
        "step_00000030",
    ]
    assert (run_dir / "pretrain_32.pth").is_file() and (run_dir / "tokenizer.json").is_file()
    # generate from the run directory and from a weights file
    for ckpt in (run_dir, run_dir / "checkpoints" / "step_00000030" / "model.safetensors"):
        assert (
            generate.main(["--ckpt", str(ckpt), "--prompt", "the model", "--max_new_tokens", "5"])
            == 0
        )
        assert capsys.readouterr().out.startswith("the model")
    # --from_weight starts from those weights: its first loss is far below a random init's
    assert run(tiny_flags(assets, tmp_path / "warm", max_steps=1, from_weight=run_dir)) == 0
    assert read_metrics(tmp_path / "warm")[0]["loss"] < train[0]["loss"] - 0.5


@pytest.mark.parametrize(
    "interrupt_at, extra",
    [
        (4, {}),  # mid-epoch
        (7, {}),  # the end of epoch 1, which is a partial batch and a partial accumulation window
        (4, {"packing": 0, "num_workers": 1}),  # padded rows, DataLoader worker processes
    ],
)
def test_interrupted_and_resumed_run_is_bit_identical(
    assets, tmp_path, monkeypatch, capsys, interrupt_at, extra
):
    common = dict(
        epochs=2,
        batch_size=4,
        accumulation_steps=3,
        dropout=0.1,
        eval_interval=2,
        val_fraction=0.1,
        **extra,
    )
    straight = tmp_path / "straight"
    assert run(tiny_flags(assets, straight, **common)) == 0
    reference = final_state(straight)
    rows = reference["train_state"]["num_samples"]
    if not extra:  # the packed epoch ends in a partial batch and a partial window
        assert math.ceil(rows / 4) % 3 != 0 and rows % 4 != 0
    assert reference["train_state"]["step"] == 2 * math.ceil(math.ceil(rows / 4) / 3)
    assert reference["train_state"]["epoch"] == 2

    resumed = tmp_path / "resumed"
    with interrupt_after_save(monkeypatch, interrupt_at):
        assert run(tiny_flags(assets, resumed, save_interval=interrupt_at, **common)) == 130
    assert checkpoints.latest_checkpoint(resumed).name == f"step_{interrupt_at:08d}"
    assert (
        run(tiny_flags(assets, resumed, save_interval=interrupt_at, from_resume=1, **common)) == 0
    )
    assert f"at step {interrupt_at}" in capsys.readouterr().out
    result = final_state(resumed)
    assert {**result["train_state"], "run_id": ""} == {**reference["train_state"], "run_id": ""}
    for key, value in reference["model"].items():
        assert torch.equal(value, result["model"][key]), key
    for index, values in reference["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(values[name], result["optimizer"]["state"][index][name])
    losses = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    assert {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r} == losses


def test_resume_auto_without_checkpoint_starts_fresh(assets, tmp_path, capsys):
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=2, from_resume="auto")) == 0
    assert final_state(tmp_path / "run")["train_state"]["step"] == 2
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=3, from_resume="auto")) == 0
    assert "resumed" in capsys.readouterr().out
    assert final_state(tmp_path / "run")["train_state"]["step"] == 3


def capture_gradients(monkeypatch):
    captured = []
    real = optim.clip_and_step

    def spy(optimizer, scaler, grad_clip):
        captured.append(
            [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        )
        return real(optimizer, scaler, grad_clip)

    monkeypatch.setattr(optim, "clip_and_step", spy)
    return captured


@pytest.mark.parametrize("packing", [1, 0])  # padded rows score different numbers of tokens
def test_accumulation_matches_one_big_batch(assets, tmp_path, monkeypatch, packing):
    grads = capture_gradients(monkeypatch)
    flags = dict(max_steps=1, packing=packing, val_fraction=0)
    assert run(tiny_flags(assets, tmp_path / "a", batch_size=2, accumulation_steps=4, **flags)) == 0
    assert run(tiny_flags(assets, tmp_path / "b", batch_size=8, accumulation_steps=1, **flags)) == 0
    assert len(grads) == 2
    for small, big in zip(*grads):
        torch.testing.assert_close(small, big, rtol=0, atol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients(assets, tmp_path, monkeypatch):
    grads = capture_gradients(monkeypatch)
    assert run(tiny_flags(assets, tmp_path / "a", max_steps=1, grad_checkpointing=1)) == 0
    assert run(tiny_flags(assets, tmp_path / "b", max_steps=1, grad_checkpointing=0)) == 0
    for with_, without in zip(*grads):
        torch.testing.assert_close(with_, without, rtol=0, atol=1e-7)


# ---- precision and failure paths -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_paths_run(assets, tmp_path, dtype):
    try:
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            torch.nn.Linear(4, 4)(torch.ones(1, 4))
    except RuntimeError as error:
        pytest.skip(f"torch refuses {dtype} autocast on CPU: {error}")
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=4, dtype=dtype)) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    state = final_state(tmp_path / "run")
    if dtype == "float16":
        assert state["scaler"]["scale"] > 0  # GradScaler on, its state saved
    else:
        assert state["scaler"] == {}  # GradScaler only for float16


def test_nonfinite_gradients_are_skipped_and_counted(assets, tmp_path, monkeypatch):
    real_forward = MiniMindForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # step 2's loss is inf: its step must be skipped
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        return (
            out._replace(loss=out.loss * float("inf")) if calls["n"] == 2 and self.training else out
        )

    monkeypatch.setattr(MiniMindForCausalLM, "forward", poisoned)
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=4)) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 0, 0]
    state = final_state(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(
        int(s["step"]) == 3 for s in state["optimizer"]["state"].values()
    )  # 4 steps, 1 skipped


def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
    assets, tmp_path, monkeypatch, capsys
):
    real_forward = MiniMindForCausalLM.forward
    calls = {"n": 0}

    def diverging(self, *args, **kwargs):  # NaN from step 4 on
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if calls["n"] >= 4 else out

    monkeypatch.setattr(MiniMindForCausalLM, "forward", diverging)
    assert run(tiny_flags(assets, tmp_path / "run", max_steps=50, save_interval=3)) == 1
    err = capsys.readouterr().err
    assert (
        "5 consecutive optimizer steps from step 4 had a NaN/inf loss" in err
        and "stopped at step 8" in err
    )
    assert "Traceback" not in err
    good = checkpoints.latest_checkpoint(tmp_path / "run")
    assert good is not None and str(good) in err
    state = resume.load_resume_state(good)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_from_weight_without_model_flags_takes_the_model_of_those_weights(assets, tmp_path, capsys):
    """Continuing (or fine-tuning) a model needs none of its flags repeated: the config beside
    --from_weight's weights is the model, and its preset's defaults apply when it is one."""
    source = tmp_path / "source"
    assert run(tiny_flags(assets, source, max_steps=2, hidden_size=64, num_hidden_layers=3)) == 0
    argv = tiny_flags(
        assets,
        tmp_path / "next",
        max_steps=1,
        from_weight=source,
        preset=None,
        hidden_size=None,
        num_hidden_layers=None,
        vocab_size=None,
    )
    capsys.readouterr()
    assert run(argv) == 0
    assert f"model of {source}" in capsys.readouterr().out
    config = final_state(tmp_path / "next")["config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        64,
        3,
        320,
    )
