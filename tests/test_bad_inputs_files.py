"""The bad-input catalogue, part 2: checkpoints and the disk. Unsafe, truncated, corrupt
or mismatched weights and resume states are refused with one `error:` line and nothing loaded; a
failed write (disk full, not writable, a real EFBIG in a subprocess) keeps the previous checkpoint.
The contract: tests/bad_input_helpers.py. Also what a user sees from a real subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
from pathlib import Path

import pytest
import torch
from bad_input_helpers import (
    assert_clean,
    assert_user_error,
    one_thread,
    run_cli,  # noqa: F401
    subprocess_pretrain,
    trained_run,
    write_lines,
)
from pretrain_helpers import assets, read_metrics, tiny_flags  # noqa: F401

from minimind_fast import checkpoints, pretrain
from minimind_fast.interop import export_hf, load_weights
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.train import checkpoint, resume

# ---- checkpoints ---------------------------------------------------------------------------------


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
    data = (
        checkpoints.latest_checkpoint(trained_run(assets, tmp_path / "src")) / "model.safetensors"
    ).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.safetensors"


def _corrupt_header(tmp_path, assets):
    data = bytearray(
        (
            checkpoints.latest_checkpoint(trained_run(assets, tmp_path / "src"))
            / "model.safetensors"
        ).read_bytes()
    )
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
    "truncated-pth": (
        _truncated_pth,
        ["cannot read", "cut.pth", "truncated or not a PyTorch checkpoint"],
    ),
    "truncated-safetensors": (
        _truncated_safetensors,
        ["cannot read", "cut.safetensors", "truncated or corrupt"],
    ),
    "corrupted-safetensors-header": (_corrupt_header, ["cannot read", "bad.safetensors", "header"]),
    "another-model-size": (
        _other_size,
        ["has shape (320, 64) but the config expects (320, 32)", "hidden_size", "--hidden_size"],
    ),
    "pickle-that-runs-code": (
        _pickle,
        ["refusing to load", "evil.pth", "could run code", "re-save it as safetensors"],
    ),
    "torch-saved-pickle-that-runs-code": (
        _torch_saved_pickle,
        ["refusing to load", "evil.pt", "Unsupported global"],
    ),
    "missing-weights": (
        lambda tmp, assets: tmp / "missing.safetensors",
        ["--from_weight", "missing.safetensors", "neither that path"],
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_from_weight(assets, tmp_path, capsys, case):
    make, fragments = CHECKPOINT_CASES[case]
    weights = make(tmp_path, assets)
    capsys.readouterr()
    code, err = run_cli(
        tiny_flags(assets, tmp_path / "run", max_steps=1, from_weight=weights), capsys
    )
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
    code, err = run_cli(
        tiny_flags(assets, run_dir, max_steps=4, from_resume=1, hidden_size=64), capsys
    )
    assert_user_error(code, err, "was trained with --hidden_size 32", "drop the flag")
    assert_clean(run_dir, empty=False)


def test_checkpoint_resume_with_every_resume_state_unreadable(assets, tmp_path, capsys):
    run_dir = trained_run(assets, tmp_path / "run")
    for ckpt in checkpoints.list_checkpoints(run_dir):
        data = (ckpt / checkpoints.RESUME_FILE).read_bytes()
        (ckpt / checkpoints.RESUME_FILE).write_bytes(data[: len(data) // 3])  # a damaged disk
    capsys.readouterr()
    code, err = run_cli(tiny_flags(assets, run_dir, max_steps=4, from_resume=1), capsys)
    line = assert_user_error(
        code, err, "no checkpoint can be read", "can be read", "truncated", "another --save_dir"
    )
    assert line.count("error:") == 1
    assert_clean(run_dir, empty=False)


def test_checkpoint_resume_skips_an_unreadable_latest_state(assets, tmp_path, capsys):
    run_dir = trained_run(assets, tmp_path / "run")
    older, latest = checkpoints.list_checkpoints(run_dir)[-2:]
    data = (latest / checkpoints.RESUME_FILE).read_bytes()
    (latest / checkpoints.RESUME_FILE).write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert (
        pretrain.main([str(a) for a in tiny_flags(assets, run_dir, max_steps=3, from_resume=1)])
        == 0
    )
    out = capsys.readouterr().out
    assert f"skipping unreadable checkpoint {latest}" in out and f"resumed {older} at step 1" in out


def test_from_weight_accepts_an_exported_hf_directory(assets, tmp_path, capsys):
    """--from_weight goes through interop.load_weights: an export_hf directory loads, exactly."""
    source = trained_run(assets, tmp_path / "src", steps=3)
    config, state = load_weights(checkpoints.latest_checkpoint(source))
    hf_dir = export_hf(
        state, config, tmp_path / "hf", tokenizer_dir=assets["tokenizer"], dtype="float32"
    )
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


# ---- disk ----------------------------------------------------------------------------------------


def test_disk_save_dir_not_writable(assets, tmp_path, capsys):
    """A path under a regular file: not creatable even for root (chmod does not stop root)."""
    (tmp_path / "file").write_text("x")
    code, err = run_cli(tiny_flags(assets, tmp_path / "file" / "run", max_steps=1), capsys)
    assert_user_error(
        code,
        err,
        "--save_dir",
        "file/run is not writable (Not a directory)",
        "pick another directory",
    )
    assert (tmp_path / "file").read_text() == "x"


def test_disk_save_dir_is_a_file(assets, tmp_path, capsys):
    (tmp_path / "run").write_text("x")
    code, err = run_cli(tiny_flags(assets, tmp_path / "run", max_steps=1), capsys)
    assert_user_error(
        code, err, "--save_dir", "run is a file, not a directory", "pick another path"
    )
    assert (tmp_path / "run").read_text() == "x"


def test_disk_full_at_the_write_keeps_the_previous_checkpoint(
    assets, tmp_path, capsys, monkeypatch
):
    real_save = checkpoint._save_torch

    def full_disk(value, path):  # the resume state of step 4 gets half written, then ENOSPC
        if Path(path).name == checkpoints.RESUME_FILE and value["train_state"]["step"] == 4:
            real_save(value, path)
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            raise OSError(28, "No space left on device")
        return real_save(value, path)

    monkeypatch.setattr(checkpoint, "_save_torch", full_disk)
    run_dir = tmp_path / "run"
    code, err = run_cli(tiny_flags(assets, run_dir, max_steps=6, save_interval=2), capsys)
    assert_user_error(
        code,
        err,
        "saving checkpoint step 4",
        "No space left on device",
        "the earlier checkpoints are intact",
        "Free disk space",
        expected_code=1,
    )
    latest = checkpoints.latest_checkpoint(run_dir)
    assert latest.name == "step_00000002"
    assert resume.load_resume_state(latest)["train_state"]["step"] == 2
    load_weights(latest)
    load_weights(
        run_dir / "pretrain_32.pth"
    )  # the run directory's mirror is the previous one, whole
    assert_clean(run_dir, empty=False)


def _limit_file_size(limit_bytes):
    # in the child: writes past the limit fail with EFBIG instead of killing it (SIGXFSZ)
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


@pytest.mark.parametrize(
    "limit, fragment",
    [
        (
            40_000,
            "model.safetensors",
        ),  # the 84 KB safetensors file: safetensors raises SafetensorError
        (200_000, "resume.pt failed"),  # the 530 KB resume state: torch.save raises RuntimeError
    ],
)
def test_disk_write_failure_for_real_in_a_subprocess(assets, tmp_path, limit, fragment):
    """A real failed write in the child (RLIMIT_FSIZE: EFBIG where a full disk gives ENOSPC) ends in
    the one-line CheckpointError, exit 1, with the previous checkpoint and the mirror untouched."""
    run_dir = trained_run(assets, tmp_path / "run", steps=2)
    before = checkpoints.latest_checkpoint(run_dir)
    mirror = (run_dir / "pretrain_32.pth").read_bytes()
    result = subprocess_pretrain(
        tiny_flags(assets, run_dir, max_steps=4, save_interval=1, from_resume=1),
        preexec_fn=_limit_file_size(limit),
    )
    assert_user_error(
        result.returncode,
        result.stderr,
        "saving checkpoint step 3",
        fragment,
        "the earlier checkpoints are intact",
        expected_code=1,
    )
    assert checkpoints.latest_checkpoint(run_dir) == before
    assert resume.load_resume_state(before)["train_state"]["step"] == 2
    assert (run_dir / "pretrain_32.pth").read_bytes() == mirror
    assert_clean(run_dir, empty=False)


# ---- true subprocesses: what the user sees -------------------------------------------------------


def test_subprocess_user_errors_exit_2_without_traceback(assets, tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", ["{oops"] * 3)
    result = subprocess_pretrain(tiny_flags(assets, tmp_path / "run", max_steps=1, data_path=bad))
    assert_user_error(result.returncode, result.stderr, "no usable documents", "3 malformed JSON")
    _pickle(tmp_path, assets)
    result = subprocess_pretrain(
        tiny_flags(assets, tmp_path / "run", max_steps=1, from_weight=tmp_path / "evil.pth")
    )
    assert_user_error(result.returncode, result.stderr, "refusing to load")
    assert not (tmp_path / "pwned").exists()
    assert_clean(tmp_path / "run")
