"""Weights I/O: the one check every reader goes through (floating dtype, finite values), the
wrapper-prefix stripping, safetensors writes (permissions, the reason of a failed write), and
the import graph of the inference side (interop, generate, export): one way, one home per name."""

import ast
import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from interop_helpers import tiny_config, tiny_model, write_checkpoint_dir

from minimind_fast import fileio, weights
from minimind_fast.interop import export_hf, import_hf, load_weights, validate_state_dict

KEY = "model.layers.1.mlp.up_proj.weight"


def save_state(path, state, fmt):
    from safetensors.torch import save_file

    if fmt == "safetensors":
        # tied: the embedding is stored once
        state = {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
        save_file(state, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    torch.save(state, path.with_suffix(".pth"))
    return path.with_suffix(".pth")


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_floating_weights_are_refused(tmp_path, fmt, dtype):
    """An integer tensor cast to float would train from garbage (int64 -> all zeros)."""
    config = tiny_config()
    state = dict(tiny_model(config).state_dict())
    state[KEY] = (state[KEY] * 10).to(dtype)
    path = save_state(tmp_path / "weights", state, fmt)
    with pytest.raises(ValueError) as error:
        load_weights(path, config)
    assert_one_line(error, str(path), KEY, str(dtype).removeprefix("torch."), "floating point")


def test_every_tensor_integer_is_refused_by_export(tmp_path):
    config = tiny_config()
    state = {k: v.to(torch.int64) for k, v in tiny_model(config).state_dict().items()}
    with pytest.raises(ValueError) as error:
        export_hf(state, config, tmp_path / "out")
    assert_one_line(error, "int64", "floating point")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    config = tiny_config()
    state = dict(tiny_model(config).state_dict())
    state[KEY] = state[KEY].clone()
    state[KEY][3, 5] = bad
    state[KEY][0, 1] = bad
    directory = write_checkpoint_dir(tmp_path / "ckpt", config, state)
    for path in (directory, directory / "model.safetensors"):
        with pytest.raises(ValueError) as error:
            load_weights(path)
        assert_one_line(error, KEY, "2 non-finite")


def test_non_finite_weights_are_refused_in_an_hf_directory(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_config()
    out = export_hf(tiny_model(config), config, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError) as error:
        import_hf(out)
    assert_one_line(error, "model.norm.weight", "non-finite")


def test_validate_state_dict_checks_dtype_before_the_tied_comparison():
    """A NaN embedding is not 'an lm_head that differs from the embedding'."""
    config = tiny_config()
    state = dict(tiny_model(config).state_dict())
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.embed_tokens.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError) as error:
        validate_state_dict(state, config)
    assert_one_line(error, "model.embed_tokens.weight", "non-finite")


def test_validation_fix_is_the_callers():
    config = tiny_config()
    state = dict(tiny_model(tiny_config(hidden_size=32)).state_dict())
    with pytest.raises(ValueError) as error:
        validate_state_dict(state, config, fix="pass --preset NAME")
    assert_one_line(error, "has shape", "pass --preset NAME")
    assert "--hidden_size" not in str(error.value)


def test_wrapper_prefixes_are_stripped():
    t = torch.zeros(1)
    state = {
        "module._orig_mod.model.norm.weight": t,
        "_orig_mod.module.lm_head.weight": t,
        "model.layers.0._orig_mod.mlp.up_proj.weight": t,
        "model.module_list.weight": t,
    }
    assert list(weights.strip_wrapper_prefixes(state)) == [
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.module_list.weight",
    ]


def test_load_torch_file_refuses_a_directory(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        weights.load_torch_file(tmp_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_safetensors_uses_the_mode_of_any_new_file(tmp_path):
    path = tmp_path / "model.safetensors"
    weights.save_safetensors({"a": torch.ones(3)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


@pytest.mark.parametrize(
    "code, reason",
    [
        (errno.ENOSPC, "disk full"),
        (errno.EFBIG, "file size limit"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_save_safetensors_reports_the_cause(tmp_path, monkeypatch, code, reason):
    import safetensors.torch
    from safetensors import SafetensorError

    def failing(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: I/O error: something (os error {code})")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError) as error:
        weights.save_safetensors({"a": torch.ones(3)}, tmp_path / "model.safetensors")
    assert error.value.errno == code
    assert reason in fileio.describe_write_error(error.value, tmp_path)


# ---- imports run one way -------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "minimind_fast"
INFERENCE_SIDE = [
    "interop/__init__.py",
    "interop/hf_config.py",
    "interop/hf_export.py",
    "interop/hf_import.py",
    "weights.py",
    "dtypes.py",
    "inference.py",
    "sampling.py",
    "generate.py",
    "export.py",
]


def imported_modules(relative: str) -> set[str]:
    """Absolute names of the minimind_fast modules a file imports, at any level (function-level
    imports too)."""
    path = PACKAGE / relative
    package = ["minimind_fast", *Path(relative).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x`
    return {name for name in found if name.startswith("minimind_fast")}


def test_hf_export_and_hf_import_do_not_import_each_other():
    assert "minimind_fast.interop.hf_import" not in imported_modules("interop/hf_export.py")
    assert "minimind_fast.interop.hf_export" not in imported_modules("interop/hf_import.py")
    for module in ("interop/hf_export.py", "interop/hf_import.py"):
        assert "minimind_fast.interop.hf_config" in imported_modules(module)


@pytest.mark.parametrize("module", INFERENCE_SIDE)
def test_inference_side_never_imports_the_trainer(module):
    trainer = {"minimind_fast.train", "minimind_fast.pretrain"}
    imported = imported_modules(module)
    assert not {name for name in imported if name.split(".")[:2] == ["minimind_fast", "train"]}
    assert not imported & trainer, imported
    if module != "generate.py":
        assert "minimind_fast.generate" not in imported  # the command line is a leaf


def defined_names(relative: str) -> set[str]:
    tree = ast.parse((PACKAGE / relative).read_text())
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assignments = [node for node in tree.body if isinstance(node, ast.Assign)]
    names.update(
        target.id for node in assignments for target in node.targets if isinstance(target, ast.Name)
    )
    return names


def test_weights_io_and_dtype_names_have_one_home():
    homes = {
        "load_torch_file": "weights.py",
        "load_safetensors": "weights.py",
        "normalize_keys": "weights.py",
        "validate_state_dict": "weights.py",
        "DTYPES": "dtypes.py",
        "HF_ARCHITECTURES": "interop/hf_config.py",
        "sample_text": "inference.py",
        "load_for_inference": "inference.py",
    }
    for module in INFERENCE_SIDE:
        for name in defined_names(module) & set(homes):
            assert module == homes[name], f"{name} is defined in {module}, not {homes[name]}"
