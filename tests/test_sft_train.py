"""`python -m minimind_fast.sft` end to end on a tiny model fine-tuned from a tiny pretraining run:
the SFT flags and defaults, the starting model's tokenizer (chat markers required), packed rows
reaching the model with their segment ids, validation on held-out conversations, the final
answer, exact resume, bad conversations, the default offline set, and torchrun."""

import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from pretrain_helpers import (
    REPO,
    VOCAB_SIZE,
    Child,
    final_state,
    no_orphans,  # noqa: F401
    read_metrics,
    tiny_flags,
    write_corpus,
)
from sft_helpers import random_conversations, write_jsonl

from minimind_fast import checkpoints, generate, pretrain, sft
from minimind_fast.data.tokenizer import train_tokenizer
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.train import checkpoint

PREFIX = f"{sft.PROG}: error: "


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer that knows both corpora, a 4-step pretraining run, and SFT conversations;
    caches go to a temp $MINIMIND_FAST_CACHE."""
    root = tmp_path_factory.mktemp("sft_train")
    previous = os.environ.get("MINIMIND_FAST_CACHE")
    os.environ["MINIMIND_FAST_CACHE"] = str(root / "cache")
    try:
        conversations = random_conversations(90, seed=5, turns=None, reply_words=(1, 6))
        data = write_jsonl(root / "sft.jsonl", conversations)
        corpus = write_corpus(root / "corpus.jsonl")
        texts = write_jsonl(
            root / "texts.jsonl",
            [{"text": m["content"]} for c in conversations for m in c["conversations"]],
        )
        tokenizer = train_tokenizer([corpus, texts], VOCAB_SIZE, root / "tokenizer")
        pre_assets = {"data": corpus, "tokenizer": tokenizer}
        assert (
            pretrain.main(
                [str(a) for a in tiny_flags(pre_assets, root / "pre", max_steps=4, max_seq_len=64)]
            )
            == 0
        )
        yield {
            "root": root,
            "data": data,
            "tokenizer": tokenizer,
            "pre": root / "pre",
            "conversations": conversations,
        }
    finally:
        if previous is None:
            os.environ.pop("MINIMIND_FAST_CACHE", None)
        else:
            os.environ["MINIMIND_FAST_CACHE"] = previous


def sft_flags(assets, save_dir, **overrides) -> list[str]:
    """argv for minimind_fast.sft: fine-tune the tiny pretraining run on the tiny conversations
    (the tokenizer comes from the run, the learning rate is SFT's default)."""
    values = dict(
        data_path=assets["data"],
        from_weight=assets["pre"],
        tokenizer_path=None,
        learning_rate=None,
        max_seq_len=128,
        val_fraction=0.1,
    )
    values.update(overrides)
    pre_assets = {"data": values.pop("data_path"), "tokenizer": values.pop("tokenizer_path")}
    return [str(a) for a in tiny_flags(pre_assets, save_dir, **values)]


def run(argv) -> int:
    try:
        return sft.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and "Traceback" not in err, err
    return lines[0]


# ---- flags ---------------------------------------------------------------------------------------


def test_help_names_sft_and_its_defaults(capsys):
    assert run(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {sft.PROG}")
    for flag in ("--data_path", "--from_weight", "--packing", "--max_steps", "--from_resume"):
        assert flag in text
    assert "conversations" in text and "full_sft" in text and "out_sft" in text
    assert all(action.help for action in sft.build_parser()._actions)


def test_fresh_defaults_are_sfts_and_typed_flags_win():
    parser = sft.build_parser()
    args = parser.parse_args([])
    args.preset, args.learning_rate, args.min_lr = "demo", 3e-3, 3e-4  # what the preset filled
    sft.fresh_defaults(args, set())
    assert (args.learning_rate, args.min_lr, args.epochs) == (2e-3, 2e-4, 2)
    args.preset, args.learning_rate, args.batch_size = "minimind2", 5e-4, 32
    sft.fresh_defaults(args, {"batch_size"})
    assert (args.learning_rate, args.batch_size, args.accumulation_steps) == (1e-5, 32, 1)
    args.min_lr = 1e-2
    with pytest.raises(ValueError, match="--min_lr 0.01 exceeds --learning_rate 1e-05"):
        sft.fresh_defaults(args, {"min_lr"})


# ---- a whole run ---------------------------------------------------------------------------------


def test_fine_tunes_a_pretraining_run_and_answers_a_held_out_question(assets, tmp_path, capsys):
    run_dir = tmp_path / "sft"
    argv = sft_flags(assets, run_dir, max_steps=12, eval_interval=6, sample_tokens=6)
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert f"initial weights: {checkpoints.latest_checkpoint(assets['pre'])}" in out
    # the tokenizer is the pretraining run's, copied into the SFT run
    copied = (run_dir / "tokenizer.json").read_bytes()
    assert copied == (assets["pre"] / "tokenizer.json").read_bytes()
    question = next(line for line in out.splitlines() if line.startswith("question: "))
    assert "\nanswer: " in out
    asked = question[len("question: ") :]
    users = {
        m["content"]
        for c in assets["conversations"]
        for m in c["conversations"]
        if m["role"] == "user"
    }
    assert asked in users
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert 0 < train[-1]["scored_tokens_per_s"] < train[-1]["tokens_per_s"]
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    state = final_state(run_dir)
    assert state["args"]["learning_rate"] == sft.PRESET_DEFAULTS["demo"]["learning_rate"]
    assert state["args"]["sample_prompt"] == asked  # a held-out question, kept for a resume
    assert (run_dir / "full_sft_32.pth").is_file()
    # the fine-tuned run chats
    assert (
        generate.main(
            [
                "--ckpt",
                str(run_dir),
                "--chat",
                "--prompt",
                asked,
                "--max_new_tokens",
                "4",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("packing", [1, 0])
def test_rows_reach_the_model_with_segment_ids_when_packed(assets, tmp_path, monkeypatch, packing):
    real_forward = MiniMindForCausalLM.forward
    seen = []

    def spy(self, input_ids, *args, segment_ids=None, **kwargs):
        seen.append(segment_ids)
        return real_forward(self, input_ids, *args, segment_ids=segment_ids, **kwargs)

    monkeypatch.setattr(MiniMindForCausalLM, "forward", spy)
    assert (
        run(
            sft_flags(
                assets,
                tmp_path / "run",
                max_steps=2,
                packing=packing,
                sample_tokens=0,
                eval_interval=1,
            )
        )
        == 0
    )
    assert len(seen) >= 4  # training and validation batches
    if packing:
        assert all(s is not None and s.dtype == torch.int64 for s in seen)
        assert any(int(s.max()) >= 2 for s in seen)  # rows of several conversations
    else:
        assert all(s is None for s in seen)


def test_minimind_recipe_reads_padded_rows_in_minimind_order(assets, tmp_path, monkeypatch):
    from minimind_fast.data.sft import SFTPaddedDataset, build_sft_cache

    real_forward = MiniMindForCausalLM.forward
    seen = []

    def spy(self, input_ids, *args, segment_ids=None, **kwargs):
        if self.training and input_ids.shape[0] == 4:  # training batches only
            seen.append((input_ids.clone(), segment_ids))
        return real_forward(self, input_ids, *args, segment_ids=segment_ids, **kwargs)

    monkeypatch.setattr(MiniMindForCausalLM, "forward", spy)
    assert (
        run(
            sft_flags(
                assets,
                tmp_path / "run",
                recipe="minimind",
                max_steps=1,
                seed=11,
                batch_size=4,
                val_fraction=None,
                warmup_steps=None,
                sample_tokens=0,
            )
        )
        == 0
    )
    rows = SFTPaddedDataset(build_sft_cache(assets["data"], assets["tokenizer"]), None, 128)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(11 + 0))  # epoch 0
    expected = torch.stack([rows[int(i)]["input_ids"] for i in order[:4]])
    assert torch.equal(seen[-1][0], expected) and seen[-1][1] is None  # the one step


@pytest.mark.parametrize("interrupt_at, extra", [(3, {}), (4, {"packing": 0})])
def test_interrupted_and_resumed_sft_run_is_bit_identical(
    assets, tmp_path, monkeypatch, capsys, interrupt_at, extra
):
    common = dict(
        epochs=2, batch_size=4, accumulation_steps=2, dropout=0.1, eval_interval=2, **extra
    )
    straight = tmp_path / "straight"
    assert run(sft_flags(assets, straight, **common)) == 0
    reference = final_state(straight)
    assert reference["train_state"]["step"] > interrupt_at + 1

    real = checkpoint.save_checkpoint

    def save_then_die(run_dir, step, *args, **kwargs):
        path = real(run_dir, step, *args, **kwargs)
        if step == interrupt_at:
            raise KeyboardInterrupt
        return path

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", save_then_die)
        assert run(sft_flags(assets, resumed, save_interval=interrupt_at, **common)) == 130
    # the starting run is not needed to resume: the tokenizer comes from the checkpoint
    argv = sft_flags(
        assets, resumed, save_interval=interrupt_at, from_resume=1, from_weight=None, **common
    )
    assert run(argv) == 0
    assert f"at step {interrupt_at}" in capsys.readouterr().out
    result = final_state(resumed)
    assert {**result["train_state"], "run_id": ""} == {**reference["train_state"], "run_id": ""}
    for key, value in reference["model"].items():
        assert torch.equal(value, result["model"][key]), key
    for index, values in reference["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(values[name], result["optimizer"]["state"][index][name])
    losses = {r["step"]: r for r in read_metrics(straight) if "loss" in r or "val_loss" in r}
    again = {r["step"]: r for r in read_metrics(resumed) if "loss" in r or "val_loss" in r}
    for step, record in losses.items():
        for key in ("loss", "val_loss"):
            assert record.get(key) == again[step].get(key), (step, key)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_with_the_document_mask(assets, tmp_path, dtype):
    try:
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            torch.nn.Linear(4, 4)(torch.ones(1, 4))
    except RuntimeError as error:
        pytest.skip(f"torch refuses {dtype} autocast on CPU: {error}")
    assert run(sft_flags(assets, tmp_path / "run", max_steps=3, dtype=dtype)) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    scaler = final_state(tmp_path / "run")["scaler"]
    assert (scaler["scale"] > 0) if dtype == "float16" else scaler == {}


def test_sigterm_saves_and_says_how_to_continue_with_sft(assets, tmp_path, no_orphans):
    child = Child(
        sft_flags(assets, tmp_path / "run", max_steps=100000, log_interval=1),
        module="minimind_fast.sft",
    )
    assert child.wait_until(lambda: child.logged_step() >= 2)
    child.kill(signal.SIGTERM)
    assert child.finish() == 143, child.output()[-2000:]
    step = final_state(tmp_path / "run")["train_state"]["step"]
    assert f"{sft.PROG}: stopped by SIGTERM at step {step}" in child.output()
    assert f"continue with {sft.PROG} --from_resume 1" in child.output()


# ---- the starting point and its tokenizer ------------------------------------------------------


def test_missing_starting_model_is_one_line(assets, tmp_path, capsys):
    assert (
        run(sft_flags(assets, tmp_path / "run", max_steps=1, from_weight=tmp_path / "no_such_run"))
        == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert "no_such_run" in line and "minimind_fast.pretrain" in line


def test_tokenizer_without_chat_markers_is_refused(assets, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        ["plain text only"] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    (tmp_path / "plain").mkdir()
    tokenizer.save(str(tmp_path / "plain" / "tokenizer.json"))
    assert (
        run(sft_flags(assets, tmp_path / "run", max_steps=1, tokenizer_path=tmp_path / "plain"))
        == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert "has no <|im_start|> or <|im_end|>, the chat markers" in line
    assert not (tmp_path / "run").exists()  # nothing half-made


def test_tokenizer_with_another_chat_template_warns(assets, tmp_path, capsys):
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((assets["tokenizer"] / "tokenizer.json").read_bytes())
    settings = json.loads((assets["tokenizer"] / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{{ '<think>' }}"
    (other / "tokenizer_config.json").write_text(json.dumps(settings))
    assert (
        run(sft_flags(assets, tmp_path / "run", max_steps=1, tokenizer_path=other, sample_tokens=0))
        == 0
    )
    out = capsys.readouterr().out
    assert "has its own chat template; SFT trains on plain ChatML" in out


# ---- bad conversations ---------------------------------------------------------------------------


def test_bad_conversations_are_skipped_and_counted(assets, tmp_path, caplog):
    good = random_conversations(40, seed=9, turns=1, reply_words=(1, 4))
    reply = {"role": "assistant", "content": "x"}
    bad = [
        {"conversations": [{"content": "no role"}, reply]},
        {"conversations": [{"role": "user", "content": ""}, reply]},
        {"conversations": [{"role": "user", "content": 3}, reply]},
        {"conversations": [{"role": "user", "content": "unanswered question"}]},
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", bad + good)
    with caplog.at_level("WARNING", logger="minimind_fast.data"):
        assert (
            run(sft_flags(assets, tmp_path / "run", max_steps=1, data_path=data, sample_tokens=0))
            == 0
        )
    text = caplog.text
    assert "skipped 4 line(s)" in text
    for reason in (
        'message without "role" (line 1)',
        'empty "content" (line 2)',
        '"content" is not a string (line 3)',
        "no assistant turn (line 4)",
    ):
        assert reason in text, reason


def test_nothing_usable_is_one_line(assets, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"conversations": [{"role": "user", "content": "hi"}]}, {"text": "pretraining text"}],
    )
    assert run(sft_flags(assets, tmp_path / "run", max_steps=1, data_path=data)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no usable conversations" in line and "bad.jsonl" in line


# ---- the default offline set ---------------------------------------------------------------------


@pytest.mark.slow  # builds the default set from the standard library (~10 s)
def test_default_set_trains_validates_on_its_held_out_file_and_resumes(assets, tmp_path, capsys):
    from minimind_fast.corpus_sft import build_default_sft_set

    run_dir = tmp_path / "run"
    common = dict(
        data_path=None,
        max_seq_len=256,
        max_steps=2,
        eval_interval=1,
        eval_batches=1,
        save_interval=1,
        sample_tokens=2,
    )
    assert run(sft_flags(assets, run_dir, **common)) == 0
    out = capsys.readouterr().out
    held_out = [json.loads(line) for line in build_default_sft_set().val.read_text().splitlines()]
    questions = {m["content"] for c in held_out for m in c["conversations"] if m["role"] == "user"}
    asked = next(line for line in out.splitlines() if line.startswith("question: "))[10:]
    assert asked in questions
    assert [r["step"] for r in read_metrics(run_dir) if "val_loss" in r] == [1, 2]
    assert final_state(run_dir)["args"]["data_path"] == str(build_default_sft_set().train)
    # the saved data path is the default set's: resuming finds its held-out file again
    assert (
        run(
            sft_flags(
                assets, run_dir, **{**common, "max_steps": 3}, from_resume=1, from_weight=None
            )
        )
        == 0
    )
    assert "resumed" in capsys.readouterr().out
    assert final_state(run_dir)["train_state"]["step"] == 3


# ---- torchrun ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # two torch processes start
def test_torchrun_two_processes_match_one(assets, tmp_path):
    common = dict(max_steps=3, accumulation_steps=2, eval_interval=3, sample_tokens=0)
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
        "minimind_fast.sft",
        *sft_flags(assets, tmp_path / "ddp", batch_size=2, **common),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        PYTHONPATH=str(REPO),
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x2;" in result.stdout
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(sft_flags(assets, tmp_path / "single", batch_size=4, **common)) == 0
    finally:
        torch.set_num_threads(threads)
    # Each rank averages over its own scored tokens (as MiniMind's loss does), so the losses are
    # close but not equal to one process's; the data stream is the same.
    ddp, single = final_state(tmp_path / "ddp"), final_state(tmp_path / "single")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    assert {**ddp["train_state"], "run_id": ""} == {**single["train_state"], "run_id": ""}
    losses = [
        [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
        for name in ("ddp", "single")
    ]
    assert len(losses[0]) == len(losses[1]) == 3
    for a, b in zip(*losses):
        assert math.isclose(a, b, rel_tol=0.05), losses
