"""`python -m minimind_fast.export`: where it may write, and that it writes all or nothing.

Every refusal is one `error:` line on stderr, exit 2 (1 for a failed write), and leaves the
target exactly as it was; an export replaces a previous export whole or not at all."""

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interop_helpers import make_tokenizer_dir, tiny_config, tiny_model, write_checkpoint_dir

from minimind_fast.export import main as export_main

REPO = Path(__file__).resolve().parents[1]
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def snapshot(root: Path) -> dict:
    """{relative path: bytes (files) or None (directories)} of everything under root."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def run(argv, capsys) -> tuple[int, str, str]:
    code = export_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_error(code, err, *fragments, expected_code=2):
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def no_debris(parent: Path):
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


@pytest.fixture
def ckpt(tmp_path):
    config = tiny_config()
    return write_checkpoint_dir(tmp_path / "ckpt", config, tiny_model(config).state_dict())


def make_run_dir(path: Path, config) -> Path:
    """What pretrain writes: config.json (ours), tokenizer, the latest .pth, checkpoints/."""
    make_tokenizer_dir(path)
    (path / "config.json").write_text(json.dumps(config.to_dict(), sort_keys=True))
    torch.save(tiny_model(config).state_dict(), path / "pretrain_64.pth")
    step = path / "checkpoints" / "step_00000001"
    write_checkpoint_dir(step, config, tiny_model(config).state_dict())
    (path / "checkpoints" / "step_00000001" / "COMPLETE").write_text('{"step": 1, "sequence": 1}')
    return path


def test_refuses_the_run_directory_itself(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path / "run", tiny_config())
    before = snapshot(run_dir)
    code, _, err = run(["--ckpt", run_dir, "--out", run_dir], capsys)
    assert_error(code, err, str(run_dir), "training run directory", "--out")
    assert snapshot(run_dir) == before
    no_debris(tmp_path)


def test_refuses_another_run_or_checkpoint_directory(tmp_path, ckpt, capsys):
    config = tiny_config()
    run_dir = make_run_dir(tmp_path / "run", config)
    checkpoint_dir = run_dir / "checkpoints" / "step_00000001"
    plain_run = tmp_path / "plain"  # an early run: our config.json and a .pth, no checkpoints/
    plain_run.mkdir()
    (plain_run / "config.json").write_text(json.dumps(config.to_dict()))
    (plain_run / "pretrain_64.pth").write_bytes(b"x")
    for target, kind in (
        (run_dir, "training run directory"),
        (checkpoint_dir, "checkpoint directory"),
        (plain_run, "training run directory"),
    ):
        before = snapshot(target)
        code, _, err = run(["--ckpt", ckpt, "--out", target], capsys)
        assert_error(code, err, str(target), kind)
        assert snapshot(target) == before


def test_refuses_a_non_empty_directory_that_is_not_an_export(tmp_path, ckpt, capsys):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "todo.txt").write_text("keep me")
    code, _, err = run(["--ckpt", ckpt, "--out", target], capsys)
    assert_error(code, err, str(target), "not empty", "todo.txt")
    assert snapshot(target) == {"todo.txt": b"keep me"}
    no_debris(tmp_path)


def test_refuses_an_existing_file(tmp_path, ckpt, capsys):
    target = tmp_path / "model.bin"
    target.write_text("x")
    code, _, err = run(["--ckpt", ckpt, "--out", target], capsys)
    assert_error(code, err, str(target), "is a file")
    assert target.read_text() == "x"


def test_refuses_exporting_into_the_weights_source(tmp_path, ckpt, capsys):
    out = tmp_path / "hf"
    assert run(["--ckpt", ckpt, "--out", out], capsys)[0] == 0
    before = snapshot(out)
    for source in (out, out / "model.safetensors"):
        code, _, err = run(["--ckpt", source, "--out", out], capsys)
        assert_error(code, err, str(out), "the weights are read from")
        assert snapshot(out) == before


def test_replaces_a_previous_export_whole(tmp_path, capsys):
    config = tiny_config()
    first = write_checkpoint_dir(tmp_path / "a", config, tiny_model(config).state_dict())
    second = write_checkpoint_dir(tmp_path / "b", config, tiny_model(config).state_dict())
    out = tmp_path / "hf"
    assert run(["--ckpt", first, "--out", out], capsys)[0] == 0
    assert run(["--ckpt", second, "--out", out, "--tokenizer", out], capsys)[0] == 0
    assert (out / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    expected = load_file(str(second / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in expected.items())
    no_debris(tmp_path)


def test_tokenizer_read_from_the_export_it_replaces(tmp_path, ckpt, capsys):
    """--tokenizer OUT --out OUT: the source tokenizer is read before OUT is replaced."""
    out = tmp_path / "hf"
    assert run(["--ckpt", ckpt, "--out", out], capsys)[0] == 0
    tokenizer = (out / "tokenizer.json").read_bytes()
    code, stdout, err = run(["--ckpt", ckpt, "--out", out, "--tokenizer", out], capsys)
    assert code == 0, err
    assert "tokenizer: yes" in stdout
    assert (out / "tokenizer.json").read_bytes() == tokenizer


def test_every_file_gets_the_same_mode(tmp_path, ckpt, capsys):
    out = tmp_path / "hf"
    assert run(["--ckpt", ckpt, "--out", out], capsys)[0] == 0
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask


def test_integer_weights_are_one_line(tmp_path, capsys):
    config = tiny_config()
    state = {k: v.to(torch.int64) for k, v in tiny_model(config).state_dict().items()}
    source = write_checkpoint_dir(tmp_path / "ckpt", config, state)
    code, _, err = run(["--ckpt", source, "--out", tmp_path / "hf"], capsys)
    assert_error(code, err, "int64", "floating point")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("failing", ["weights", "json"])
def test_disk_full_leaves_nothing(tmp_path, ckpt, capsys, monkeypatch, failing):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_weights(*args, **kwargs):
        raise SafetensorError(FULL)

    def full_json(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", full_weights)
    else:
        monkeypatch.setattr(Path, "write_text", full_json)
    out = tmp_path / "new" / "deeper" / "hf"
    code, _, err = run(["--ckpt", ckpt, "--out", out], capsys)
    assert_error(code, err, "disk full", str(out.parent), expected_code=1)
    assert not (tmp_path / "new").exists()
    no_debris(tmp_path)


def test_disk_full_keeps_the_previous_export(tmp_path, ckpt, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "hf"
    assert run(["--ckpt", ckpt, "--out", out], capsys)[0] == 0
    before = snapshot(out)

    def full(*args, **kwargs):
        raise SafetensorError(FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run(["--ckpt", ckpt, "--out", out, "--dtype", "float16"], capsys)
    assert_error(code, err, "disk full", expected_code=1)
    assert snapshot(out) == before
    no_debris(tmp_path)


def test_a_real_failed_write_is_one_line_in_a_subprocess(tmp_path, ckpt):
    """A file-size limit makes the kernel refuse the write (EFBIG), as a full disk would
    (ENOSPC)."""
    out = tmp_path / "hf"
    limit = 16 * 1024  # below model.safetensors (~100 kB), above every JSON file
    code = (
        f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        f"from minimind_fast.export import main; sys.exit(main(sys.argv[1:]))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", code, "--ckpt", str(ckpt), "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "model.safetensors" in lines[0] and "file size limit" in lines[0], lines
    assert not out.exists()
    no_debris(tmp_path)
