"""Checkpoints: round trips into a fresh model, layout, crash safety, safe loading, resume-state
validation, RNG state."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from minimind_fast import checkpoints
from minimind_fast.config import get_preset
from minimind_fast.interop import load_weights
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.train import checkpoint, resume
from minimind_fast.train.run_dir import RunDirectory

CONFIG = dict(hidden_size=32, num_hidden_layers=2, vocab_size=300)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(get_preset("demo", **{**CONFIG, **overrides}))


def load_into(model, path, config=None):
    """What --from_weight does: resolve a run directory, load and validate, load_state_dict."""
    _, state = load_weights(checkpoints.resolve_checkpoint_path(path), config or model.config)
    model.load_state_dict(state)


def save(run_dir, step, model, healthy=True, run_id="run"):
    """A checkpoint as the trainer writes it: the step's directory, then the mirror beside it."""
    path = checkpoint.save_checkpoint(
        run_dir,
        step,
        model,
        {"train_state": {"step": step}},
        model.config,
        "pretrain_32.pth",
        run_id=run_id,
        healthy=healthy,
    )
    directory = RunDirectory(run_dir)
    directory.run_id, directory.mirror_name = run_id, "pretrain_32.pth"
    directory.after_save(path, healthy, keep=100)
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_loads_back_into_a_fresh_model(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    path = save(tmp_path, 7, model)
    assert path.name == "step_00000007"
    for name in ("model.safetensors", "pretrain_32.pth", "resume.pt", "config.json", "COMPLETE"):
        assert (path / name).is_file(), name
    assert (tmp_path / "pretrain_32.pth").is_file()  # MiniMind-style mirror in the run directory
    reference = {k: v.half() for k, v in model.state_dict().items()}
    for source in (path / "model.safetensors", path / "pretrain_32.pth", path, tmp_path):
        fresh = tiny_model(seed=1, tie_word_embeddings=tied)
        load_into(fresh, source)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value.half(), reference[key]), (source, key)
        if tied:
            assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    exact = tiny_model(
        seed=2, tie_word_embeddings=tied
    )  # the fp32 copy in the resume state is exact
    load_into(exact, path / "resume.pt")
    for key, value in exact.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_saved_files_have_clean_keys_and_minimind_layout(tmp_path):
    model = tiny_model()
    path = save(tmp_path, 1, model)
    from safetensors.torch import load_file

    safetensors_keys = set(load_file(str(path / "model.safetensors")))
    assert "lm_head.weight" not in safetensors_keys  # tied: stored once
    pth = torch.load(path / "pretrain_32.pth", weights_only=True)
    assert set(pth) == set(model.state_dict())  # MiniMind's file has both keys
    assert all(v.dtype == torch.float16 for v in pth.values())
    assert pth["lm_head.weight"].data_ptr() == pth["model.embed_tokens.weight"].data_ptr()
    resume = torch.load(path / "resume.pt", weights_only=True)
    assert not any(
        k.startswith(("module.", "_orig_mod.")) for k in list(pth) + list(resume["model"])
    )
    assert resume["config"]["hidden_size"] == 32 and resume["run_id"] == "run"
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 32
    assert "freqs_cos" not in " ".join(resume["model"])  # RoPE tables are not persistent


def test_prefixed_state_dicts_are_cleaned(tmp_path):
    model = tiny_model()
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    fresh = tiny_model(seed=1)
    load_into(fresh, tmp_path / "wrapped.pth")
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight)


def test_latest_is_by_completion_order_and_skips_unhealthy(tmp_path):
    model = tiny_model()
    for step in (10, 20, 30):
        save(tmp_path, step, model)
    save(tmp_path, 5, model)  # a lower step completed later is newer
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000005"
    save(tmp_path, 40, model, healthy=False)
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000005"
    assert checkpoints.latest_checkpoint(tmp_path, healthy_only=False).name == "step_00000040"
    assert [
        p.name for p in checkpoints.list_checkpoints(tmp_path, healthy_only=False, run_id="other")
    ] == []
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = tiny_model()
    good = save(tmp_path, 10, model)
    mirror_before = (tmp_path / "pretrain_32.pth").read_bytes()
    real_save = checkpoint._save_torch

    def full_disk(value, path):  # write half the file, then fail like ENOSPC
        real_save(value, path)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_save_torch", full_disk)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(
        checkpoint.CheckpointError, match="disk full.*earlier checkpoints are intact"
    ):
        save(tmp_path, 20, model)
    assert checkpoints.latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000010"
    ]  # no debris
    assert (tmp_path / "pretrain_32.pth").read_bytes() == mirror_before
    fresh = tiny_model(seed=1)
    load_into(fresh, tmp_path)
    assert torch.equal(fresh.model.norm.weight, torch.ones(32))
    assert torch.load(good / "resume.pt", weights_only=True)["train_state"]["step"] == 10


def test_crash_debris_is_ignored_and_swept(tmp_path):
    model = tiny_model()
    good = save(tmp_path, 10, model)
    # What a kill -9 can leave: a half-written temp dir, and a step dir without its marker.
    debris = tmp_path / "checkpoints" / ".tmp-step_00000020-abc"
    debris.mkdir()
    (debris / "resume.pt").write_bytes(b"\x00" * 10)
    unmarked = tmp_path / "checkpoints" / "step_00000030"
    unmarked.mkdir()
    (unmarked / "model.safetensors").write_bytes(b"garbage")
    assert checkpoints.latest_checkpoint(tmp_path) == good
    save(tmp_path, 40, model)
    assert not debris.exists()
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_00000040"


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create a file when unpickled


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_executing_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"model.norm.weight": _Exploit(str(target))}, handle)
    torch.save({"model.norm.weight": _Exploit(str(target))}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(ValueError, match="refusing to load|cannot read"):
            load_weights(tmp_path / name)
    assert not target.exists()


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path):
    path = save(tmp_path, 1, tiny_model())
    data = (path / "pretrain_32.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.pth"):
        load_weights(tmp_path / "cut.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoints.resolve_checkpoint_path(tmp_path / "empty_run")


def test_weights_of_another_size_are_rejected(tmp_path):
    path = save(tmp_path, 1, tiny_model())
    other = tiny_model(hidden_size=64)
    with pytest.raises(
        ValueError, match=r"has shape \(300, 32\) but the config expects \(300, 64\).*hidden_size"
    ):
        load_into(other, path)
    deeper = tiny_model(num_hidden_layers=3)
    with pytest.raises(
        ValueError,
        match=r"missing key 'model\.layers\.2\..*' \(and 8 more\).*"
        "num_hidden_layers=3: the checkpoint has 2 layers",
    ):
        load_into(deeper, path)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = resume.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    resume.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert (
        expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])
    )
