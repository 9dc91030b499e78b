"""The bad-input catalogue, part 1: CLI flags, data, the tokenizer and numerics. One test
id each; every case asserts the contract in tests/bad_input_helpers.py (one `error:` line naming
the value and the fix, exit 2, no traceback, nothing left behind). Cases run in-process through
`pretrain.main(argv)` (seconds each). Checkpoints and disk: test_bad_inputs_files.py; the ops:
test_bad_inputs_ops.py.
NaN/overflow: fp16 overflow absorbed by GradScaler is tested here; a persistent NaN stopping the
run with its step number and the last good checkpoint kept is tested in tests/test_pretrain.py
(test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from bad_input_helpers import (
    assert_clean,
    assert_user_error,
    one_thread,
    run_cli,  # noqa: F401
    trained_run,
    write_lines,
)
from pretrain_helpers import VOCAB_SIZE, assets, read_metrics, tiny_flags, write_corpus  # noqa: F401

from minimind_fast import checkpoints, dtypes, pretrain
from minimind_fast.data import reader
from minimind_fast.tokenizer import train_tokenizer
from minimind_fast.train import precision, resume

# ---- CLI flags -----------------------------------------------------------------------------------

CLI_CASES = {
    "batch-size-zero": (dict(batch_size=0), ["--batch_size", "0 must be >= 1"]),
    "batch-size-negative": (dict(batch_size=-4), ["--batch_size", "-4 must be >= 1"]),
    "accumulation-zero": (dict(accumulation_steps=0), ["--accumulation_steps", "0 must be >= 1"]),
    "unknown-dtype": (dict(dtype="fp8"), ["--dtype", "'fp8'", "float32", "bfloat16", "float16"]),
    "learning-rate-not-a-number": (
        dict(learning_rate="abc"),
        ["--learning_rate", "'abc' is not a number"],
    ),
    "max-seq-len-above-max-positions": (
        dict(max_seq_len=4096),
        ["--max_seq_len 4096 exceeds", "max_position_embeddings=2048", "use --max_seq_len <= 2048"],
    ),
    "hidden-not-divisible-by-heads": (
        dict(hidden_size=30),
        ["--hidden_size 30", "4 attention heads", "use a multiple of 8", "--hidden_size 24 or 32"],
    ),
    "head-dim-odd": (
        dict(hidden_size=100),
        ["--hidden_size 100", "head_dim=25", "use a multiple of 8"],
    ),
    "vocab-smaller-than-tokenizer": (
        dict(vocab_size=300),
        [f"has {VOCAB_SIZE} tokens", "vocab_size is 300", f"pass --vocab_size {VOCAB_SIZE}"],
    ),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_flag(assets, tmp_path, capsys, case):
    overrides, fragments = CLI_CASES[case]
    save_dir = tmp_path / "run"
    code, err = run_cli(tiny_flags(assets, save_dir, max_steps=1, **overrides), capsys)
    assert_user_error(code, err, *fragments)
    assert_clean(save_dir)


def test_cli_unknown_flag(assets, tmp_path, capsys):
    code, err = run_cli(
        tiny_flags(assets, tmp_path / "run", max_steps=1) + ["--batchsize", "4"], capsys
    )
    assert_user_error(code, err, "unrecognized argument --batchsize; did you mean --batch_size?")


def test_cli_bfloat16_on_a_device_without_it(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dtypes, "bf16_supported", lambda device: False)  # as on a pre-Ampere GPU
    code, err = run_cli(tiny_flags(assets, tmp_path / "run", max_steps=1, dtype="bfloat16"), capsys)
    assert_user_error(
        code, err, "--dtype bfloat16 is not supported by device cpu", "use --dtype float16"
    )
    assert_clean(tmp_path / "run")


# ---- data ----------------------------------------------------------------------------------------


def _enormous_line(tmp_path, monkeypatch):
    monkeypatch.setattr(
        reader, "MAX_LINE_BYTES", 4096
    )  # the real limit is 8 MiB; the logic is the same
    return write_lines(
        tmp_path / "one_line.jsonl", [json.dumps({"text": "the model reads " * 4000})]
    )


DATA_CASES = {
    "missing-path": (
        lambda tmp, mp: tmp / "nope.jsonl",
        ["data file not found", "nope.jsonl", "omit --data_path"],
    ),
    "empty-file": (
        lambda tmp, mp: write_lines(tmp / "empty.jsonl", []),
        ["data file is empty", "empty.jsonl", "(0 bytes)"],
    ),
    "directory": (
        lambda tmp, mp: (tmp / "corpus.jsonl").mkdir() or tmp / "corpus.jsonl",
        ["is a directory, not a data file", "Pass one file inside it"],
    ),
    "unsupported-extension": (
        lambda tmp, mp: write_lines(tmp / "data.csv", ["text\nhello"]),
        ["unsupported data file extension '.csv'", ".jsonl"],
    ),
    "bad-json": (
        lambda tmp, mp: write_lines(
            tmp / "bad.jsonl", ['{"text": "a b c d', "{'text': 'single quotes'}", "not json at all"]
        ),
        [
            "no usable documents",
            "bad.jsonl",
            "3 malformed JSON (lines 1, 2, 3)",
            'one JSON object {"text"',
        ],
    ),
    "missing-text-field": (
        lambda tmp, mp: write_lines(
            tmp / "notext.jsonl", [json.dumps({"content": "hi there"})] * 3
        ),
        ["no usable documents", '3 missing "text" field (lines 1, 2, 3)'],
    ),
    "non-utf8": (
        lambda tmp, mp: write_lines(
            tmp / "latin1.jsonl", ['{"text": "caf\xe9 au lait"}'.encode("latin-1")] * 2
        ),
        ["no usable documents", "2 not valid UTF-8 (lines 1, 2)"],
    ),
    "enormous-line": (
        _enormous_line,
        ["no usable documents", "1 line longer than 4096 bytes (split it into documents) (line 1)"],
    ),
    "every-document-shorter-than-2-tokens": (
        lambda tmp, mp: write_lines(
            tmp / "short.jsonl", [json.dumps({"text": t}) for t in ("a", "b", "", ".")]
        ),
        ["no usable documents", "too short (< 2 tokens)", "at least 2 tokens"],
    ),
    "less-than-one-row": (
        lambda tmp, mp: write_lines(tmp / "tiny.jsonl", [json.dumps({"text": "the model reads"})]),
        ["less than one row of max_seq_len=32", "lower --max_seq_len"],
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data(assets, tmp_path, capsys, monkeypatch, case):
    make, fragments = DATA_CASES[case]
    data_path = make(tmp_path, monkeypatch)
    save_dir = tmp_path / "run"
    code, err = run_cli(tiny_flags(assets, save_dir, max_steps=1, data_path=data_path), capsys)
    assert_user_error(code, err, *fragments)
    assert_clean(save_dir)


def test_data_bad_lines_among_good_ones_are_skipped_and_counted(assets, tmp_path, caplog):
    good = write_corpus(tmp_path / "good.jsonl").read_text().splitlines()
    data = write_lines(
        tmp_path / "mixed.jsonl", good[:20] + ["{broken", json.dumps({"content": "x"})] + good[20:]
    )
    assert (
        pretrain.main(
            [str(a) for a in tiny_flags(assets, tmp_path / "run", max_steps=1, data_path=data)]
        )
        == 0
    )
    assert "skipped 2 line(s)" in caplog.text and "malformed JSON (line 21)" in caplog.text


def test_data_long_document_within_the_line_limit_trains(assets, tmp_path):
    text = (
        " ".join(write_corpus(tmp_path / "c.jsonl").read_text().split())[:20000] * 10
    )  # one 200 KB document
    data = write_lines(tmp_path / "long.jsonl", [json.dumps({"text": text})])
    assert (
        pretrain.main(
            [str(a) for a in tiny_flags(assets, tmp_path / "run", max_steps=2, data_path=data)]
        )
        == 0
    )
    assert len([r for r in read_metrics(tmp_path / "run") if "loss" in r]) == 2


def test_reader_never_holds_an_enormous_line(tmp_path, monkeypatch):
    """The over-long line is drained in pieces: the reader yields the documents around it."""
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 1000)
    data = write_lines(
        tmp_path / "d.jsonl",
        [json.dumps({"text": "before"}), b"x" * 50_000, json.dumps({"text": "after"})],
    )
    stats = reader.SkipStats(data)
    assert list(reader.iter_documents(data, stats)) == [(1, "before"), (3, "after")]
    assert stats.counts == {"line longer than 1000 bytes (split it into documents)": 1}
    text = write_lines(
        tmp_path / "d.txt", ["word " * 100] * 30
    )  # one 15 KB .txt document of 501-byte lines
    pieces = list(reader.iter_documents(text, reader.SkipStats(text)))
    assert [line for line, _ in pieces] == list(
        range(1, 31, 2)
    )  # cut every 2 lines, once past 1000 bytes
    assert all(len(doc) == 1001 for _, doc in pieces)


# ---- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_missing(assets, tmp_path, capsys):
    code, err = run_cli(
        tiny_flags(assets, tmp_path / "run", max_steps=1, tokenizer_path=tmp_path / "nope"), capsys
    )
    assert_user_error(
        code, err, "tokenizer not found", "nope does not exist", "python -m minimind_fast.tokenizer"
    )
    assert_clean(tmp_path / "run")


def test_tokenizer_corrupt(assets, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": ')
    code, err = run_cli(
        tiny_flags(assets, tmp_path / "run", max_steps=1, tokenizer_path=tmp_path / "tok"), capsys
    )
    assert_user_error(code, err, "cannot read tokenizer", "tok/tokenizer.json", "retrain it")
    assert_clean(tmp_path / "run")


def test_tokenizer_size_mismatch_with_the_resumed_config(assets, tmp_path, capsys):
    run_dir = trained_run(assets, tmp_path / "run")
    other = train_tokenizer([assets["data"]], VOCAB_SIZE + 40, tmp_path / "bigger")
    code, err = run_cli(
        tiny_flags(assets, run_dir, max_steps=4, from_resume=1, tokenizer_path=other), capsys
    )
    latest = checkpoints.latest_checkpoint(run_dir)
    assert_user_error(
        code,
        err,
        "bigger/tokenizer.json is not the one",
        f"{latest} was trained with",
        f"pass --tokenizer_path {latest}",
    )
    assert_clean(run_dir, empty=False)
    assert latest == checkpoints.latest_checkpoint(run_dir)  # nothing was written


# ---- numerics ------------------------------------------------------------------------------------


def test_fp16_overflow_is_absorbed_by_grad_scaler(assets, tmp_path, monkeypatch):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(4, 4)(torch.ones(1, 4))
    except RuntimeError as error:
        pytest.skip(f"torch refuses float16 autocast on CPU: {error}")
    real = precision.make_grad_scaler
    monkeypatch.setattr(
        precision,
        "make_grad_scaler",  # start at 2**22: the first fp16 gradients overflow
        lambda device, dtype: torch.amp.GradScaler(
            device.type, init_scale=2.0**22, enabled=real(device, dtype).is_enabled()
        ),
    )
    run_dir = tmp_path / "run"
    assert (
        pretrain.main([str(a) for a in tiny_flags(assets, run_dir, max_steps=12, dtype="float16")])
        == 0
    )
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    skipped = sum(r["skipped_steps"] for r in records)
    assert 0 < skipped < 10 and all(
        math.isfinite(r["loss"]) for r in records
    )  # skipped, counted, loss finite
    assert records[-1]["loss"] < records[0]["loss"] - 0.3  # and training went on
    state = resume.load_resume_state(checkpoints.latest_checkpoint(run_dir))
    assert state["scaler"]["scale"] == 2.0 ** (22 - skipped)  # halved once per overflowing step
    assert all(int(s["step"]) == 12 - skipped for s in state["optimizer"]["state"].values())
    assert all(torch.isfinite(v).all() for v in state["model"].values())
