"""The bad-input catalogue (issue 6): every way a user can hand pretraining something wrong, one
test id each, across CLI flags, data, tokenizer, checkpoints, disk and the ops.

Every CLI case asserts the contract: a non-zero exit (2 for user errors, 1 for a failed write),
exactly one stderr line `python -m minimind_fast.pretrain: error: ...` naming the value and the
fix, no Python traceback, and no partial file left in the save directory or the token cache.
CLI cases run in-process through `pretrain.main(argv)` (seconds each); a few re-run as real
subprocesses to check what a user sees. Ops cases assert a one-line ValueError naming the value.
NaN/overflow: fp16 overflow absorbed by GradScaler is tested here; a persistent NaN stopping the
run with its step number and the last good checkpoint kept is tested in tests/test_pretrain.py
(test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimind_fast import pretrain
from minimind_fast.data import reader
from minimind_fast.interop import export_hf, load_weights
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.tokenizer import train_tokenizer
from minimind_fast.train import checkpoint, precision
from pretrain_helpers import VOCAB_SIZE, assets, read_metrics, tiny_flags, write_corpus  # noqa: F401

PREFIX = "python -m minimind_fast.pretrain: error: "
REPO = Path(__file__).resolve().parents[1]
TEMP_NAMES = (".tmp-", ".trash-", ".write-test")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine, 2 OpenMP threads make tiny runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of pretrain.main(argv) in this process."""
    try:
        code = pretrain.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def debris(*roots: Path) -> list[Path]:
    """Temp files/directories that a failed or killed write could leave under `roots`."""
    found = []
    for root in roots:
        if Path(root).exists():
            found += [p for p in Path(root).rglob("*") if p.name.startswith(TEMP_NAMES) or p.name.endswith(".tmp")]
    return found


def assert_user_error(code: int, err: str, *fragments: str, expected_code: int = 2) -> str:
    """One `error:` line holding every fragment, no traceback, the expected exit code."""
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_clean(save_dir: Path, empty: bool = True) -> None:
    """No temp debris in the save dir or the token cache; `empty`: not one file written at all."""
    found = debris(save_dir, Path(os.environ["MINIMIND_FAST_CACHE"]))
    assert not found, found
    if empty and Path(save_dir).exists():
        written = [p for p in Path(save_dir).rglob("*") if p.is_file()]
        assert not written, written


def write_lines(path: Path, lines) -> Path:
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else line.encode("utf-8"))
            handle.write(b"\n")
    return path


def trained_run(assets, run_dir: Path, steps: int = 2, **overrides) -> Path:
    """A finished tiny run (checkpoints at every step); returns run_dir."""
    flags = dict(max_steps=steps, save_interval=1, sample_tokens=0, **overrides)
    assert pretrain.main([str(a) for a in tiny_flags(assets, run_dir, **flags)]) == 0
    return run_dir


# ---- CLI flags --------------------------------------------------------------------------------------

CLI_CASES = {
    "batch-size-zero": (dict(batch_size=0), ["--batch_size", "0 must be >= 1"]),
    "batch-size-negative": (dict(batch_size=-4), ["--batch_size", "-4 must be >= 1"]),
    "accumulation-zero": (dict(accumulation_steps=0), ["--accumulation_steps", "0 must be >= 1"]),
    "unknown-dtype": (dict(dtype="fp8"), ["--dtype", "'fp8'", "float32", "bfloat16", "float16"]),
    "learning-rate-not-a-number": (dict(learning_rate="abc"), ["--learning_rate", "'abc' is not a number"]),
    "max-seq-len-above-max-positions": (dict(max_seq_len=4096),
                                        ["--max_seq_len 4096 exceeds", "max_position_embeddings=2048",
                                         "use --max_seq_len <= 2048"]),
    "hidden-not-divisible-by-heads": (dict(hidden_size=30),
                                      ["--hidden_size 30", "4 attention heads", "use a multiple of 8",
                                       "--hidden_size 24 or 32"]),
    "head-dim-odd": (dict(hidden_size=100), ["--hidden_size 100", "head_dim=25", "use a multiple of 8"]),
    "vocab-smaller-than-tokenizer": (dict(vocab_size=300),
                                     [f"has {VOCAB_SIZE} tokens", "vocab_size is 300",
                                      f"pass --vocab_size {VOCAB_SIZE}"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_flag(assets, tmp_path, capsys, case):
    overrides, fragments = CLI_CASES[case]
    save_dir = tmp_path / "run"
    code, err = run_cli(tiny_flags(assets, save_dir, max_steps=1, **overrides), capsys)
    assert_user_error(code, err, *fragments)
    assert_clean(save_dir)


def test_cli_unknown_flag(assets, tmp_path, capsys):
    code, err = run_cli(tiny_flags(assets, tmp_path / "run", max_steps=1) + ["--batchsize", "4"], capsys)
    assert_user_error(code, err, "unrecognized arguments: --batchsize 4")


def test_cli_bfloat16_on_a_device_without_it(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)  # as on a pre-Ampere GPU
    code, err = run_cli(tiny_flags(assets, tmp_path / "run", max_steps=1, dtype="bfloat16"), capsys)
    assert_user_error(code, err, "--dtype bfloat16 is not supported by device cpu", "use --dtype float16")
    assert_clean(tmp_path / "run")


# ---- data -------------------------------------------------------------------------------------------


def _enormous_line(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 4096)  # the real limit is 8 MiB; the logic is the same
    return write_lines(tmp_path / "one_line.jsonl", [json.dumps({"text": "the model reads " * 4000})])


DATA_CASES = {
    "missing-path": (lambda tmp, mp: tmp / "nope.jsonl", ["data file not found", "nope.jsonl", "omit --data_path"]),
    "empty-file": (lambda tmp, mp: write_lines(tmp / "empty.jsonl", []), ["data file is empty", "empty.jsonl",
                                                                          "(0 bytes)"]),
    "directory": (lambda tmp, mp: (tmp / "corpus.jsonl").mkdir() or tmp / "corpus.jsonl",
                  ["is a directory, not a data file", "Pass one file inside it"]),
    "unsupported-extension": (lambda tmp, mp: write_lines(tmp / "data.csv", ["text\nhello"]),
                              ["unsupported data file extension '.csv'", ".jsonl"]),
    "bad-json": (lambda tmp, mp: write_lines(tmp / "bad.jsonl", ['{"text": "a b c d', "{'text': 'single quotes'}",
                                                                 "not json at all"]),
                 ["no usable documents", "bad.jsonl", "3 malformed JSON (lines 1, 2, 3)", 'one JSON object {"text"']),
    "missing-text-field": (lambda tmp, mp: write_lines(tmp / "notext.jsonl", [json.dumps({"content": "hi there"})] * 3),
                           ["no usable documents", '3 missing "text" field (lines 1, 2, 3)']),
    "non-utf8": (lambda tmp, mp: write_lines(tmp / "latin1.jsonl", ['{"text": "caf\xe9 au lait"}'.encode("latin-1")]
                                             * 2), ["no usable documents", "2 not valid UTF-8 (lines 1, 2)"]),
    "enormous-line": (_enormous_line, ["no usable documents", "1 line longer than 4096 bytes (split it into documents)"
                                       " (line 1)"]),
    "every-document-shorter-than-2-tokens": (
        lambda tmp, mp: write_lines(tmp / "short.jsonl", [json.dumps({"text": t}) for t in ("a", "b", "", ".")]),
        ["no usable documents", "too short (< 2 tokens)", "at least 2 tokens"]),
    "less-than-one-row": (lambda tmp, mp: write_lines(tmp / "tiny.jsonl", [json.dumps({"text": "the model reads"})]),
                          ["less than one row of max_seq_len=32", "lower --max_seq_len"]),
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
    data = write_lines(tmp_path / "mixed.jsonl", good[:20] + ["{broken", json.dumps({"content": "x"})] + good[20:])
    assert pretrain.main([str(a) for a in tiny_flags(assets, tmp_path / "run", max_steps=1, data_path=data)]) == 0
    assert "skipped 2 line(s)" in caplog.text and "malformed JSON (line 21)" in caplog.text


def test_data_long_document_within_the_line_limit_trains(assets, tmp_path):
    text = " ".join(write_corpus(tmp_path / "c.jsonl").read_text().split())[:20000] * 10  # one 200 KB document
    data = write_lines(tmp_path / "long.jsonl", [json.dumps({"text": text})])
    assert pretrain.main([str(a) for a in tiny_flags(assets, tmp_path / "run", max_steps=2, data_path=data)]) == 0
    assert len([r for r in read_metrics(tmp_path / "run") if "loss" in r]) == 2


def test_reader_never_holds_an_enormous_line(tmp_path, monkeypatch):
    """The over-long line is drained in pieces: the reader yields the documents around it."""
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 1000)
    data = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "before"}), b"x" * 50_000,
                                             json.dumps({"text": "after"})])
    stats = reader.SkipStats(data)
    assert list(reader.iter_documents(data, stats)) == [(1, "before"), (3, "after")]
    assert stats.counts == {"line longer than 1000 bytes (split it into documents)": 1}
    text = write_lines(tmp_path / "d.txt", ["word " * 100] * 30)  # one 15 KB .txt document of 501-byte lines
    pieces = list(reader.iter_documents(text, reader.SkipStats(text)))
    assert [line for line, _ in pieces] == list(range(1, 31, 2))  # cut every 2 lines, once past 1000 bytes
    assert all(len(doc) == 1001 for _, doc in pieces)


# ---- tokenizer --------------------------------------------------------------------------------------


def test_tokenizer_missing(assets, tmp_path, capsys):
    code, err = run_cli(tiny_flags(assets, tmp_path / "run", max_steps=1, tokenizer_path=tmp_path / "nope"), capsys)
    assert_user_error(code, err, "tokenizer not found", "nope does not exist", "python -m minimind_fast.tokenizer")
    assert_clean(tmp_path / "run")


def test_tokenizer_corrupt(assets, tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": ')
    code, err = run_cli(tiny_flags(assets, tmp_path / "run", max_steps=1, tokenizer_path=tmp_path / "tok"), capsys)
    assert_user_error(code, err, "cannot read tokenizer", "tok/tokenizer.json", "retrain it")
    assert_clean(tmp_path / "run")


def test_tokenizer_size_mismatch_with_the_resumed_config(assets, tmp_path, capsys):
    run_dir = trained_run(assets, tmp_path / "run")
    other = train_tokenizer([assets["data"]], VOCAB_SIZE + 40, tmp_path / "bigger")
    code, err = run_cli(tiny_flags(assets, run_dir, max_steps=4, from_resume=1, tokenizer_path=other), capsys)
    latest = checkpoint.latest_checkpoint(run_dir)
    assert_user_error(code, err, "bigger/tokenizer.json is not the one", f"{latest} was trained with",
                      f"pass --tokenizer_path {latest}")
    assert_clean(run_dir, empty=False)
    assert latest == checkpoint.latest_checkpoint(run_dir)  # nothing was written


# ---- checkpoints ------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # creates the sentinel file if it is ever unpickled


def _truncated_pth(tmp_path, assets):
    data = (trained_run(assets, tmp_path / "src") / "pretrain_32.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.pth"


def _truncated_safetensors(tmp_path, assets):
    data = (checkpoint.latest_checkpoint(trained_run(assets, tmp_path / "src")) / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.safetensors"


def _corrupt_header(tmp_path, assets):
    data = bytearray((checkpoint.latest_checkpoint(trained_run(assets, tmp_path / "src")) / "model.safetensors")
                     .read_bytes())
    data[8:16] = b"{not js:"  # the JSON header starts after its 8-byte length
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    return tmp_path / "bad.safetensors"


def _other_size(tmp_path, assets):
    return trained_run(assets, tmp_path / "src", hidden_size=64)


def _pickle(tmp_path, assets):
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"model.norm.weight": _Exploit(str(tmp_path / "pwned"))}, handle)
    return tmp_path / "evil.pth"


def _torch_saved_pickle(tmp_path, assets):
    torch.save({"model.norm.weight": _Exploit(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    return tmp_path / "evil.pt"


CHECKPOINT_CASES = {
    "truncated-pth": (_truncated_pth, ["cannot read", "cut.pth", "truncated or not a PyTorch checkpoint"]),
    "truncated-safetensors": (_truncated_safetensors, ["cannot read", "cut.safetensors", "truncated or corrupt"]),
    "corrupted-safetensors-header": (_corrupt_header, ["cannot read", "bad.safetensors", "header"]),
    "another-model-size": (_other_size, ["has shape (320, 64) but the config expects (320, 32)", "hidden_size",
                                         "--hidden_size"]),
    "pickle-that-runs-code": (_pickle, ["refusing to load", "evil.pth", "could run code",
                                        "re-save it as safetensors"]),
    "torch-saved-pickle-that-runs-code": (_torch_saved_pickle, ["refusing to load", "evil.pt",
                                                                "Unsupported global"]),
    "missing-weights": (lambda tmp, assets: tmp / "missing.safetensors", ["--from_weight", "missing.safetensors",
                                                                           "neither that path"]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_from_weight(assets, tmp_path, capsys, case):
    make, fragments = CHECKPOINT_CASES[case]
    weights = make(tmp_path, assets)
    capsys.readouterr()
    code, err = run_cli(tiny_flags(assets, tmp_path / "run", max_steps=1, from_weight=weights), capsys)
    assert_user_error(code, err, *fragments)
    assert not (tmp_path / "pwned").exists()  # the pickle's payload never ran
    assert_clean(tmp_path / "run")
    if "pickle" in case:  # control: the file really runs code when unpickled without weights_only
        if case.startswith("torch-saved"):
            torch.load(weights, weights_only=False)
        else:
            pickle.loads(weights.read_bytes())
        assert (tmp_path / "pwned").exists()


def test_checkpoint_resume_with_another_model_size(assets, tmp_path, capsys):
    run_dir = trained_run(assets, tmp_path / "run")
    capsys.readouterr()
    code, err = run_cli(tiny_flags(assets, run_dir, max_steps=4, from_resume=1, hidden_size=64), capsys)
    assert_user_error(code, err, "was trained with a different model", "hidden_size=64 (checkpoint: 32)",
                      "drop those flags")
    assert_clean(run_dir, empty=False)


def test_checkpoint_resume_with_every_resume_state_unreadable(assets, tmp_path, capsys):
    run_dir = trained_run(assets, tmp_path / "run")
    for ckpt in checkpoint.list_checkpoints(run_dir):
        data = (ckpt / checkpoint.RESUME_FILE).read_bytes()
        (ckpt / checkpoint.RESUME_FILE).write_bytes(data[: len(data) // 3])  # a damaged disk
    capsys.readouterr()
    code, err = run_cli(tiny_flags(assets, run_dir, max_steps=4, from_resume=1), capsys)
    line = assert_user_error(code, err, "no checkpoint in", "can be read", "truncated", "another --save_dir")
    assert line.count("error:") == 1
    assert_clean(run_dir, empty=False)


def test_checkpoint_resume_skips_an_unreadable_latest_state(assets, tmp_path, capsys):
    run_dir = trained_run(assets, tmp_path / "run")
    older, latest = checkpoint.list_checkpoints(run_dir)[-2:]
    data = (latest / checkpoint.RESUME_FILE).read_bytes()
    (latest / checkpoint.RESUME_FILE).write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert pretrain.main([str(a) for a in tiny_flags(assets, run_dir, max_steps=3, from_resume=1)]) == 0
    out = capsys.readouterr().out
    assert f"skipping unreadable checkpoint {latest}" in out and f"resumed {older} at step 1" in out


def test_from_weight_accepts_an_exported_hf_directory(assets, tmp_path, capsys):
    """--from_weight goes through interop.load_weights: an export_hf directory loads, exactly."""
    source = trained_run(assets, tmp_path / "src", steps=3)
    config, state = load_weights(checkpoint.latest_checkpoint(source))
    hf_dir = export_hf(state, config, tmp_path / "hf", tokenizer_dir=assets["tokenizer"], dtype="float32")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "llama"
    captured = {}
    real = MiniMindForCausalLM.load_state_dict

    def spy(self, state_dict, *args, **kwargs):
        captured.update(state_dict)
        return real(self, state_dict, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MiniMindForCausalLM, "load_state_dict", spy)
        argv = tiny_flags(assets, tmp_path / "run", max_steps=1, from_weight=hf_dir)
        assert pretrain.main([str(a) for a in argv]) == 0
    assert f"initial weights: {hf_dir}" in capsys.readouterr().out
    assert captured.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(captured[key], value.float()), key
    # the first loss is the trained model's, far below a random init's
    first = read_metrics(tmp_path / "run")[0]["loss"]
    assert first < [r["loss"] for r in read_metrics(source) if "loss" in r][0] - 0.3


# ---- disk -------------------------------------------------------------------------------------------


def test_disk_save_dir_not_writable(assets, tmp_path, capsys):
    """A path under a regular file: not creatable even for root (chmod does not stop root)."""
    (tmp_path / "file").write_text("x")
    code, err = run_cli(tiny_flags(assets, tmp_path / "file" / "run", max_steps=1), capsys)
    assert_user_error(code, err, "--save_dir", "file/run is not writable (Not a directory)", "pick another directory")
    assert (tmp_path / "file").read_text() == "x"


def test_disk_save_dir_is_a_file(assets, tmp_path, capsys):
    (tmp_path / "run").write_text("x")
    code, err = run_cli(tiny_flags(assets, tmp_path / "run", max_steps=1), capsys)
    assert_user_error(code, err, "--save_dir", "run is a file, not a directory", "pick another path")
    assert (tmp_path / "run").read_text() == "x"


def test_disk_full_at_the_write_keeps_the_previous_checkpoint(assets, tmp_path, capsys, monkeypatch):
    real_save = checkpoint._save_torch

    def full_disk(value, path):  # the resume state of step 4 gets half written, then ENOSPC
        if Path(path).name == checkpoint.RESUME_FILE and value["progress"]["step"] == 4:
            real_save(value, path)
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            raise OSError(28, "No space left on device")
        return real_save(value, path)

    monkeypatch.setattr(checkpoint, "_save_torch", full_disk)
    run_dir = tmp_path / "run"
    code, err = run_cli(tiny_flags(assets, run_dir, max_steps=6, save_interval=2), capsys)
    assert_user_error(code, err, "saving checkpoint step 4", "No space left on device",
                      "the previous checkpoint is intact", "Free disk space", expected_code=1)
    latest = checkpoint.latest_checkpoint(run_dir)
    assert latest.name == "step_00000002"
    assert checkpoint.load_resume_state(latest)["progress"]["step"] == 2
    load_weights(latest)
    load_weights(run_dir / "pretrain_32.pth")  # the run directory's mirror is the previous one, whole
    assert_clean(run_dir, empty=False)


def _limit_file_size(limit_bytes):
    def apply():  # in the child: writes past the limit fail with EFBIG instead of killing it (SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def subprocess_pretrain(argv, preexec_fn=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "minimind_fast.pretrain", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


@pytest.mark.parametrize("limit, fragment", [
    (40_000, "model.safetensors failed"),  # the 84 KB safetensors file: safetensors raises SafetensorError
    (200_000, "resume.pt failed"),  # the 530 KB resume state: torch.save raises RuntimeError
])
def test_disk_write_failure_for_real_in_a_subprocess(assets, tmp_path, limit, fragment):
    """A real failed write in the child (RLIMIT_FSIZE: EFBIG where a full disk gives ENOSPC) ends in
    the one-line CheckpointError, exit 1, with the previous checkpoint and the mirror untouched."""
    run_dir = trained_run(assets, tmp_path / "run", steps=2)
    before = checkpoint.latest_checkpoint(run_dir)
    mirror = (run_dir / "pretrain_32.pth").read_bytes()
    result = subprocess_pretrain(tiny_flags(assets, run_dir, max_steps=4, save_interval=1, from_resume=1),
                                 preexec_fn=_limit_file_size(limit))
    assert_user_error(result.returncode, result.stderr, "saving checkpoint step 3", fragment,
                      "the previous checkpoint is intact", expected_code=1)
    assert checkpoint.latest_checkpoint(run_dir) == before
    assert checkpoint.load_resume_state(before)["progress"]["step"] == 2
    assert (run_dir / "pretrain_32.pth").read_bytes() == mirror
    assert_clean(run_dir, empty=False)


# ---- true subprocesses: what the user sees ----------------------------------------------------------


def test_subprocess_user_errors_exit_2_without_traceback(assets, tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", ["{oops"] * 3)
    result = subprocess_pretrain(tiny_flags(assets, tmp_path / "run", max_steps=1, data_path=bad))
    assert_user_error(result.returncode, result.stderr, "no usable documents", "3 malformed JSON")
    _pickle(tmp_path, assets)
    result = subprocess_pretrain(tiny_flags(assets, tmp_path / "run", max_steps=1, from_weight=tmp_path / "evil.pth"))
    assert_user_error(result.returncode, result.stderr, "refusing to load")
    assert not (tmp_path / "pwned").exists()
    assert_clean(tmp_path / "run")


# ---- numerics ---------------------------------------------------------------------------------------


def test_fp16_overflow_is_absorbed_by_grad_scaler(assets, tmp_path, monkeypatch):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(4, 4)(torch.ones(1, 4))
    except RuntimeError as error:
        pytest.skip(f"torch refuses float16 autocast on CPU: {error}")
    real = precision.make_grad_scaler
    monkeypatch.setattr(precision, "make_grad_scaler",  # start at 2**22: the first fp16 gradients overflow
                        lambda device, dtype: torch.amp.GradScaler(device.type, init_scale=2.0 ** 22,
                                                                   enabled=real(device, dtype).is_enabled()))
    run_dir = tmp_path / "run"
    assert pretrain.main([str(a) for a in tiny_flags(assets, run_dir, max_steps=12, dtype="float16")]) == 0
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    skipped = sum(r["skipped_steps"] for r in records)
    assert 0 < skipped < 10 and all(math.isfinite(r["loss"]) for r in records)  # skipped, counted, loss finite
    assert records[-1]["loss"] < records[0]["loss"] - 0.3  # and training went on
    state = checkpoint.load_resume_state(checkpoint.latest_checkpoint(run_dir))
    assert state["scaler"]["scale"] == 2.0 ** (22 - skipped)  # halved once per overflowing step
    assert all(int(s["step"]) == 12 - skipped for s in state["optimizer"]["state"].values())
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ---- ops ----------------------------------------------------------------------------------------------


def _rope(**changes):
    from minimind_fast import ops

    cos, sin = ops.rope_tables(8, 16)
    values = dict(q=torch.randn(2, 16, 4, 8), k=torch.randn(2, 16, 2, 8), cos=cos, sin=sin)
    values.update(changes)
    return ops.apply_rotary(**values)


def _ce(logits, targets):
    from minimind_fast import ops

    return ops.cross_entropy(logits, targets)


def _flce(hidden, weight, targets):
    from minimind_fast import ops

    return ops.fused_linear_cross_entropy(hidden, weight, targets)


def _rms(x, weight, residual=None):
    from minimind_fast import ops

    return ops.rms_norm(x, weight) if residual is None else ops.add_rms_norm(x, residual, weight)


def _model_loss(labels):
    config = pretrain.get_preset("demo", hidden_size=32, num_hidden_layers=1, vocab_size=300)
    return MiniMindForCausalLM(config)(torch.tensor([[1, 2, 3]]), labels=labels).loss


LONG, META = torch.int64, "meta"
OPS_CASES = {
    "rms-norm-wrong-dtype": (lambda: _rms(torch.ones(3, 8, dtype=LONG), torch.ones(8)),
                             ["rms_norm: x must be a floating-point tensor, got torch.int64", "x.float()"]),
    "rms-norm-wrong-device": (lambda: _rms(torch.ones(3, 8), torch.ones(8, device=META)),
                              ["rms_norm: weight is on meta but x is on cpu", "weight.to(x.device)"]),
    "rms-norm-wrong-shape": (lambda: _rms(torch.ones(3, 8), torch.ones(7)),
                             ["rms_norm: weight shape (7,) must be (H,)", "(3, 8)"]),
    "add-rms-norm-wrong-shape": (lambda: _rms(torch.ones(3, 8), torch.ones(8), residual=torch.ones(2, 8)),
                                 ["add_rms_norm: residual shape (2, 8) must equal x shape (3, 8)"]),
    "apply-rotary-wrong-dtype": (lambda: _rope(q=torch.ones(2, 16, 4, 8, dtype=LONG)),
                                 ["apply_rotary: q must be a floating-point tensor, got torch.int64"]),
    "apply-rotary-wrong-device": (lambda: _rope(k=torch.ones(2, 16, 2, 8, device=META)),
                                  ["apply_rotary: k is on meta but q is on cpu"]),
    "apply-rotary-wrong-shape": (lambda: _rope(q=torch.randn(16, 4, 8)),
                                 ["apply_rotary: q (16, 4, 8)", "must be (B, T, Hq, D)"]),
    "apply-rotary-tables-too-short": (lambda: _rope(cos=torch.ones(8, 8), sin=torch.ones(8, 8)),
                                      ["cos (8, 8) and sin (8, 8) must be (T, D) = (16, 8)", "position_offset"]),
    "cross-entropy-label-out-of-range": (lambda: _ce(torch.randn(4, 10), torch.tensor([1, 2, 10, -100])),
                                         ["target 10 is outside [0, 10)", "ignore_index=-100", "fix the labels"]),
    "cross-entropy-negative-label": (lambda: _ce(torch.randn(4, 10), torch.tensor([1, -5, 2, 3])),
                                     ["target -5 is outside [0, 10)"]),
    "cross-entropy-wrong-target-dtype": (lambda: _ce(torch.randn(4, 10), torch.ones(4)),
                                         ["targets must be class indices (an integer dtype), got torch.float32"]),
    "cross-entropy-wrong-logits-dtype": (lambda: _ce(torch.ones(4, 10, dtype=LONG), torch.ones(4, dtype=LONG)),
                                         ["cross_entropy: input must be a floating-point tensor, got torch.int64"]),
    "cross-entropy-wrong-device": (lambda: _ce(torch.randn(4, 10), torch.ones(4, dtype=LONG, device=META)),
                                   ["cross_entropy: targets is on meta but input is on cpu"]),
    "cross-entropy-wrong-shape": (lambda: _ce(torch.randn(4, 10), torch.tensor([1, 2, 3])),
                                  ["input (4, 10) must be (..., D) with targets of shape (...), got targets (3,)"]),
    "fused-linear-cross-entropy-dtype-mismatch": (
        lambda: _flce(torch.randn(4, 8), torch.randn(10, 8).half(), torch.ones(4, dtype=LONG)),
        ["hidden is torch.float32 but weight is torch.float16", "torch.autocast"]),
    "fused-linear-cross-entropy-label-out-of-range": (
        lambda: _flce(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 30, 4])),
        ["target 30 is outside [0, 10)"]),
    "model-labels-out-of-range": (lambda: _model_loss(torch.tensor([[1, 2, 999]])),
                                  ["target 999 is outside [0, 300)"]),
}


@pytest.mark.parametrize("case", list(OPS_CASES))
def test_ops(case):
    call, fragments = OPS_CASES[case]
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_ops_moe_route_top_k_above_experts():
    try:
        from minimind_fast.ops import moe_route
    except ImportError as error:
        pytest.skip(f"moe_route is not importable yet: {error}")
    with pytest.raises(ValueError, match=r"top_k=5 must be in \[1, 4\]"):
        moe_route(torch.randn(6, 4), 5)
