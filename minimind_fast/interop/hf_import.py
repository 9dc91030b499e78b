"""Load weights into minimind_fast: exported HF directories, MiniMind .pth, safetensors files.

`load_weights(path, config=None) -> (config_or_None, state_dict)` is the one entry point
(`pretrain --from_weight`, generate and export call it). `path` may be
- a directory written by `export_hf` (config.json with model_type llama / qwen3 / qwen3_moe /
  qwen2_moe / mixtral + model.safetensors): returns the config it describes and our state dict;
- a directory holding a MiniMind-format config.json (our `MiniMindConfig.to_dict()`, or
  MiniMind2's or MiniMind-3's own: `MiniMindConfig.from_dict` tells them apart) and one weights
  file (model.safetensors, one *.safetensors, or one *.pth);
- a `.safetensors` or MiniMind `.pth` file (torch.load(weights_only=True); a resume
  checkpoint's {"model": state_dict, ...} works too); a config.json next to it is read when
  present.
Every state dict goes through `weights.validate_state_dict` (without a config, through the
checks that need none): wrapper prefixes stripped, RoPE buffers dropped, finite floating-point
values only, keys and shapes checked against `config` (else the carried config), each mismatch
a one-line ValueError naming the key, the config field to check, and the fix. The returned
config is the one found with the weights (None if none was); callers compare it with their own
when non-shape fields (rope_theta, eps, ...) matter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..config import MiniMindConfig
from ..weights import (
    FIX,
    check_weights,
    load_safetensors,
    load_torch_file,
    normalize_keys,
    validate_state_dict,
)
from .hf_config import HF_ARCHITECTURES, from_hf_config, read_config

PathLike = Union[str, Path]


def from_hf_state_dict(
    tensors: dict, config: MiniMindConfig, model_type: str, source: str = "checkpoint"
) -> dict:
    """An HF checkpoint's tensors (as written by export_hf) -> our validated state dict."""
    state = {}
    for key, tensor in normalize_keys(tensors).items():
        if model_type == "mixtral" and ".block_sparse_moe." in key:
            key = (
                key.replace(".block_sparse_moe.", ".mlp.")
                .replace(".w1.", ".gate_proj.")
                .replace(".w2.", ".down_proj.")
                .replace(".w3.", ".up_proj.")
            )
        state[key] = tensor
    if model_type == "qwen2_moe":
        width, S = config.intermediate_size, config.n_shared_experts
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = state.pop(f"{prefix}.self_attn.{proj}.bias", None)
                if bias is not None and bool(bias.any()):
                    raise ValueError(
                        f"{source}: {prefix}.self_attn.{proj}.bias is non-zero; "
                        "MiniMind attention has no biases, so this Qwen2-MoE "
                        "checkpoint cannot be imported"
                    )
            gate = state.pop(f"{prefix}.mlp.shared_expert_gate.weight", None)
            if gate is not None and bool(gate.any()):
                raise ValueError(
                    f"{source}: {prefix}.mlp.shared_expert_gate.weight is non-zero; "
                    "MiniMind's shared experts are ungated, so only checkpoints "
                    "written by export_hf can be imported"
                )
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                merged = state.pop(f"{prefix}.mlp.shared_expert.{name}.weight", None)
                if merged is None or S == 0:
                    continue
                if name == "down_proj":
                    merged = merged / 2  # export wrote 2x to cancel sigmoid(0) = 0.5; exact
                for s, part in enumerate(merged.split(width, dim=dim)):
                    state[f"{prefix}.mlp.shared_experts.{s}.{name}.weight"] = part.contiguous()
    return validate_state_dict(state, config, source)


def import_hf(directory: PathLike) -> tuple[MiniMindConfig, dict]:
    """(config, state_dict) from an HF directory (config.json + model.safetensors, possibly
    sharded)."""
    directory = Path(directory).expanduser()
    hf = _read_json(directory / "config.json")
    config = from_hf_config(hf)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        tensors = load_safetensors([directory / s for s in shards])
    elif (directory / "model.safetensors").is_file():
        tensors = load_safetensors([directory / "model.safetensors"])
    elif (directory / "pytorch_model.bin").is_file():
        tensors = load_torch_file(directory / "pytorch_model.bin")
    else:
        raise ValueError(
            f"{directory} has config.json but no model.safetensors (or index / pytorch_model.bin)"
        )
    return config, from_hf_state_dict(tensors, config, hf["model_type"], source=str(directory))


def _checked(state: dict, config: Optional[MiniMindConfig], source: str, fix: str = FIX) -> dict:
    """validate_state_dict against `config`; without one, the checks that need no config."""
    if config is not None:
        return validate_state_dict(state, config, source, fix)
    state = normalize_keys(state)
    check_weights(state, source)
    return state


def load_minimind_pth(
    path: PathLike, config: Optional[MiniMindConfig] = None, fix: str = FIX
) -> dict:
    """A MiniMind .pth (state dict, or a resume checkpoint holding one under "model"), normalised,
    checked and, given a config, validated against it."""
    path = Path(path).expanduser()
    state = load_torch_file(path)
    if isinstance(state, dict) and not all(torch.is_tensor(v) for v in state.values()):
        nested = state.get("model", state.get("state_dict"))
        if not isinstance(nested, dict):
            keys = ", ".join(map(str, list(state)[:5]))
            raise ValueError(
                f"{path} is not a state dict (keys: {keys}); pass a weights file "
                "saved from model.state_dict()"
            )
        state = nested
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return _checked(state, config, str(path), fix)


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}; fix or remove that file") from None
    if not isinstance(values, dict):
        raise ValueError(
            f"{path} holds a JSON {type(values).__name__}, not an object; fix or remove that file"
        )
    return values


def _weights_file(directory: Path) -> Path:
    """The one weights file of a directory."""
    if (directory / "model.safetensors").is_file():
        return directory / "model.safetensors"
    candidates = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.pth"))
    if len(candidates) != 1:
        raise ValueError(
            f"{directory}: expected one weights file (model.safetensors, "
            f"*.safetensors or *.pth), found {len(candidates)}; pass the file itself"
        )
    return candidates[0]


def load_weights(
    path: PathLike, config: Optional[MiniMindConfig] = None, fix: str = FIX
) -> tuple[Optional[MiniMindConfig], dict]:
    """(config found with the weights or None, our state dict), validated against `config` when
    given, else against the found config. `fix` ends every mismatch message: what the caller's
    user should do (e.g. which flags to pass). See the module docstring for the layouts."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"weights not found: {path} does not exist")
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    found, hf_type = None, None
    if config_file.is_file():
        values = _read_json(config_file)
        if values.get("model_type") in HF_ARCHITECTURES:
            if path.is_dir():
                found, state = import_hf(path)
                if config is not None:
                    state = _checked(state, config, str(path), fix)
                return found, state
            hf_type = values["model_type"]
        found = read_config(config_file)
    if path.is_dir():
        path = _weights_file(directory)
    config = config if config is not None else found
    if hf_type is not None and path.suffix == ".safetensors":  # one file of an HF directory
        state = from_hf_state_dict(load_safetensors([path]), found, hf_type, str(path))
        return found, _checked(state, config, str(path), fix)
    if path.suffix == ".safetensors":
        return found, _checked(load_safetensors([path]), config, str(path), fix)
    if path.suffix in (".pth", ".pt", ".bin"):
        return found, load_minimind_pth(path, config, fix)
    raise ValueError(
        f"{path}: unknown weights format; pass a .safetensors or .pth file, or a directory"
    )
