"""Load weights into minimind_fast: HF directories from our exporter, MiniMind .pth, safetensors files.

`load_weights(path, config=None) -> (config_or_None, state_dict)` is the one entry point
(`pretrain --from_weight` calls it). `path` may be
- a directory written by `export_hf` (config.json with model_type llama / qwen3 / qwen3_moe /
  qwen2_moe / mixtral + model.safetensors): returns the config it describes and our state dict;
- a directory holding a MiniMind-format config.json (our `MiniMindConfig.to_dict()`, or MiniMind's
  own) and one weights file (model.safetensors, one *.safetensors, or one *.pth);
- a `.safetensors` or MiniMind `.pth` file (torch.load(weights_only=True); a resume checkpoint's
  {"model": state_dict, ...} works too); a config.json next to it is read when present.
`module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped, RoPE buffers dropped,
and the state dict is checked against `config` (else the carried config): missing or unexpected
keys and shape mismatches raise a one-line ValueError naming the key, the config field to
check, and the fix. The returned config is the one found with the weights (None if none was);
callers compare it with their own when non-shape fields (rope_theta, eps, ...) matter.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..config import MiniMindConfig
from .hf_export import HF_ARCHITECTURES, hf_rope_scaling

PathLike = Union[str, Path]
_DROPPED_SUFFIXES = ("freqs_cos", "freqs_sin", "pos_cis", "rotary_emb.inv_freq")  # recomputed, never loaded
_FIX = ("use the model config the weights were trained with (a config.json beside them, or the matching "
        "--preset / --hidden_size / --num_hidden_layers / --vocab_size / --use_moe flags)")


def normalize_keys(state_dict: dict) -> dict[str, torch.Tensor]:
    """Strip leading `module.` (DDP) and every `_orig_mod.` (torch.compile); drop RoPE buffers."""
    out = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        while parts and parts[0] == "module":
            parts = parts[1:]
        key = ".".join(parts)
        if not key.endswith(_DROPPED_SUFFIXES):
            out[key] = value
    return out


def expected_shapes(config: MiniMindConfig) -> dict[str, tuple[int, ...]]:
    """Our model's state-dict keys and shapes for `config` (built on the meta device: no memory)."""
    from ..model import MiniMindForCausalLM

    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _field_hint(key: str, config: MiniMindConfig) -> str:
    layer = re.match(r"model\.layers\.(\d+)\.", key)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        return f"num_hidden_layers={config.num_hidden_layers}"
    rules = (("q_norm", "qk_norm"), ("k_norm", "qk_norm"), ("shared_experts", "n_shared_experts"),
             (".mlp.experts.", "use_moe / n_routed_experts"), (".mlp.gate.", "use_moe / n_routed_experts"),
             ("q_proj", "num_attention_heads / head_dim"), ("o_proj", "num_attention_heads / head_dim"),
             ("k_proj", "num_key_value_heads / head_dim"), ("v_proj", "num_key_value_heads / head_dim"),
             ("_proj", "intermediate_size / use_moe"), ("layernorm", "hidden_size"), ("norm", "hidden_size"),
             ("embed_tokens", "vocab_size / hidden_size"), ("lm_head", "vocab_size / tie_word_embeddings"))
    return next((field for pattern, field in rules if pattern in key), "the architecture fields")


def validate_state_dict(state_dict: dict, config: MiniMindConfig, source: str = "checkpoint") -> dict:
    """Normalised keys, tied embeddings filled in, checked key by key and shape by shape.

    Returns a new dict in our model's key order; raises a one-line ValueError on any mismatch.
    """
    state = normalize_keys(state_dict)
    shapes = expected_shapes(config)
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if config.tie_word_embeddings:
        if head in state and embed in state:
            if state[head].shape != state[embed].shape or not torch.equal(state[head], state[embed]):
                raise ValueError(f"{source}: lm_head.weight differs from model.embed_tokens.weight but the config "
                                 "has tie_word_embeddings=True; set tie_word_embeddings=False to load it")
        elif head in state or embed in state:
            state[head] = state[embed] = state.get(embed, state.get(head))
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            hint = _field_hint(keys[0], config)
            if kind == "missing" and keys[0] == head:
                hint = "tie_word_embeddings: the checkpoint ties lm_head to embed_tokens"
            layer = re.match(r"model\.layers\.(\d+)\.", keys[0])
            if kind == "missing" and layer and not any(k.startswith(layer.group(0)) for k in state):
                found_layers = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
                hint = f"num_hidden_layers={config.num_hidden_layers}: the checkpoint has {found_layers} layers"
            raise ValueError(f"{source}: {kind} key {keys[0]!r}{more} for this config (check {hint}); {_FIX}")
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: {key!r} has shape {tuple(state[key].shape)} but the config expects {shape} "
                             f"(check {_field_hint(key, config)}); {_FIX}")
    return {key: state[key] for key in shapes}


# ---------------------------------------------------------------- configs

def from_hf_config(hf: dict) -> MiniMindConfig:
    """MiniMindConfig equivalent to an HF config dict; ValueError for anything MiniMind cannot compute."""
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not importable; supported: {', '.join(HF_ARCHITECTURES)}")

    def refuse(field: str, why: str):
        raise ValueError(f"cannot import {model_type} config: {field}={hf.get(field)!r} {why}")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "is not supported; MiniMind uses silu")
    for field in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(field):
            refuse(field, "has no MiniMind counterpart")
    if model_type == "mixtral" and hf.get("sliding_window") is not None:
        refuse("sliding_window", "has no MiniMind counterpart (full attention only)")
    if model_type == "qwen2_moe" and not hf.get("qkv_bias", True):
        refuse("qkv_bias", "is not what export_hf writes (zero biases with qkv_bias=True)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "is not supported; MiniMind rotates the whole head")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        refuse("mlp_only_layers", "(or decoder_sparse_step) mixes dense and MoE layers; MiniMind does not")

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = None
    if rope_type == "yarn":
        if not rope.get("truncate", True):
            refuse("rope_parameters", "uses YaRN with truncate=False; MiniMind truncates")
        factor = float(rope["factor"])
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            if rope.get("mscale") and rope.get("mscale_all_dim"):
                refuse("rope_parameters", "derives attention_factor from mscale; MiniMind needs it explicit")
            attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0  # HF's default
        rope_scaling = {"type": "yarn", "factor": factor,
                        "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
                        "beta_fast": float(rope.get("beta_fast") or 32.0),
                        "beta_slow": float(rope.get("beta_slow") or 1.0),
                        "attention_factor": float(attention_factor)}
    elif rope_type != "default":
        refuse("rope_parameters", f"uses rope_type {rope_type!r}; MiniMind has plain RoPE and YaRN only")

    eos = hf.get("eos_token_id", 2)
    values = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf.get("moe_intermediate_size") if model_type in ("qwen3_moe", "qwen2_moe")
        else hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    if model_type in ("qwen3_moe", "qwen2_moe", "mixtral"):
        top_k = hf.get("num_experts_per_tok", 2)
        normalised = True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False))
        if top_k == 1 and normalised:
            refuse("num_experts_per_tok", "with renormalised top-k weights gives every token weight 1.0; "
                   "MiniMind's top-1 weight is the softmax probability")
        n_shared = 0
        if model_type == "qwen2_moe":
            shared = hf.get("shared_expert_intermediate_size", 0)
            if shared % values["intermediate_size"]:
                refuse("shared_expert_intermediate_size", f"is not a multiple of moe_intermediate_size="
                       f"{values['intermediate_size']}, so it is not a set of MiniMind shared experts")
            n_shared = shared // values["intermediate_size"]
        values.update(use_moe=True, n_routed_experts=hf.get("num_experts") or hf.get("num_local_experts"),
                      num_experts_per_tok=top_k, n_shared_experts=n_shared, scoring_func="softmax",
                      norm_topk_prob=normalised or top_k == 1,  # ignored at top-1: keep MiniMind's default
                      aux_loss_alpha=float(hf.get("router_aux_loss_coef", 0.01)))
    config = MiniMindConfig(**values)
    if rope_scaling is not None:  # the export rules, applied backwards: HF's YaRN must be MiniMind's
        try:
            back = hf_rope_scaling(config)
        except ValueError as error:
            raise ValueError(f"cannot import {model_type} config: {error}") from None
        if (back["factor"] if back else 1.0) != rope_scaling["factor"]:
            refuse("rope_parameters", f"uses YaRN factor {rope_scaling['factor']} with max_position_embeddings="
                   f"{config.max_position_embeddings}, which MiniMind's YaRN does not reproduce")
    return config


def read_config(path: PathLike) -> MiniMindConfig:
    """A config JSON file: an HF config.json (see from_hf_config) or a MiniMind/minimind_fast config dict."""
    path = Path(path).expanduser()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read config {path}: {error}; pass a JSON file with the model config") from None
    if values.get("model_type") in HF_ARCHITECTURES:
        return from_hf_config(values)
    if "hidden_size" not in values:  # a run config with the model config nested inside
        nested = [v for k, v in values.items() if isinstance(v, dict) and "hidden_size" in v]
        if len(nested) != 1:
            raise ValueError(f"config {path} has no hidden_size (nor one nested dict with it); pass the "
                             "model config JSON (MiniMindConfig fields)")
        values = nested[0]
    return MiniMindConfig.from_dict(values)


# ---------------------------------------------------------------- state dicts

def from_hf_state_dict(tensors: dict, config: MiniMindConfig, model_type: str, source: str = "checkpoint") -> dict:
    """An HF checkpoint's tensors (as written by export_hf) -> our validated state dict."""
    state = {}
    for key, tensor in normalize_keys(tensors).items():
        if model_type == "mixtral" and ".block_sparse_moe." in key:
            key = key.replace(".block_sparse_moe.", ".mlp.").replace(".w1.", ".gate_proj.") \
                     .replace(".w2.", ".down_proj.").replace(".w3.", ".up_proj.")
        state[key] = tensor
    if model_type == "qwen2_moe":
        I, S = config.intermediate_size, config.n_shared_experts
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = state.pop(f"{prefix}.self_attn.{proj}.bias", None)
                if bias is not None and bool(bias.any()):
                    raise ValueError(f"{source}: {prefix}.self_attn.{proj}.bias is non-zero; MiniMind attention "
                                     "has no biases, so this Qwen2-MoE checkpoint cannot be imported")
            gate = state.pop(f"{prefix}.mlp.shared_expert_gate.weight", None)
            if gate is not None and bool(gate.any()):
                raise ValueError(f"{source}: {prefix}.mlp.shared_expert_gate.weight is non-zero; MiniMind's shared "
                                 "experts are ungated, so only checkpoints written by export_hf can be imported")
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                merged = state.pop(f"{prefix}.mlp.shared_expert.{name}.weight", None)
                if merged is None or S == 0:
                    continue
                if name == "down_proj":
                    merged = merged / 2  # export wrote 2x to cancel sigmoid(0) = 0.5; exact
                for s, part in enumerate(merged.split(I, dim=dim)):
                    state[f"{prefix}.mlp.shared_experts.{s}.{name}.weight"] = part.contiguous()
    return validate_state_dict(state, config, source)


def load_torch_file(path: PathLike) -> Any:
    """torch.load(path, weights_only=True) on CPU: tensors and plain containers only, never code.
    One-line ValueError for a file that is truncated, not a checkpoint, or holds other Python objects."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a plain-pickle file draws a protocol warning; the error says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(error))
        raise ValueError(f"refusing to load {path}: it holds Python objects beyond tensors and plain containers "
                         f"({found.group(1) if found else 'not a plain state dict'}), which could run code when "
                         "unpickled; re-save it as safetensors or a plain state dict") from None
    except FileNotFoundError:
        raise ValueError(f"cannot read {path}: the file does not exist") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"cannot read {path}: {first}. The file is truncated or not a PyTorch checkpoint; "
                         "use another one") from None


def _load_safetensors(files: list[Path]) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {file}: {error}. The file is truncated or corrupt (a bad safetensors "
                             "header); use another copy of the weights") from None
    return state


def import_hf(directory: PathLike) -> tuple[MiniMindConfig, dict]:
    """(config, state_dict) from an HF directory (config.json + model.safetensors, possibly sharded)."""
    directory = Path(directory).expanduser()
    hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config = from_hf_config(hf)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = _load_safetensors([directory / s for s in shards])
    elif (directory / "model.safetensors").is_file():
        tensors = _load_safetensors([directory / "model.safetensors"])
    elif (directory / "pytorch_model.bin").is_file():
        tensors = load_torch_file(directory / "pytorch_model.bin")
    else:
        raise ValueError(f"{directory} has config.json but no model.safetensors (or index / pytorch_model.bin)")
    return config, from_hf_state_dict(tensors, config, hf["model_type"], source=str(directory))


def load_minimind_pth(path: PathLike, config: Optional[MiniMindConfig] = None) -> dict:
    """A MiniMind .pth (state dict, or a resume checkpoint holding one under "model"), normalised and,
    given a config, validated."""
    path = Path(path).expanduser()
    state = load_torch_file(path)
    if isinstance(state, dict) and not all(torch.is_tensor(v) for v in state.values()):
        nested = state.get("model", state.get("state_dict"))
        if not isinstance(nested, dict):
            raise ValueError(f"{path} is not a state dict (keys: {', '.join(map(str, list(state)[:5]))}); "
                             "pass a weights file saved from model.state_dict()")
        state = nested
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return validate_state_dict(state, config, str(path)) if config is not None else normalize_keys(state)


def _load_file(path: Path, config: Optional[MiniMindConfig]) -> dict:
    if path.suffix == ".safetensors":
        state = _load_safetensors([path])
        return validate_state_dict(state, config, str(path)) if config is not None else normalize_keys(state)
    if path.suffix in (".pth", ".pt", ".bin"):
        return load_minimind_pth(path, config)
    raise ValueError(f"{path}: unknown weights format; pass a .safetensors or .pth file, or a directory")


def load_weights(path: PathLike, config: Optional[MiniMindConfig] = None) -> tuple[Optional[MiniMindConfig], dict]:
    """(config found with the weights or None, our state dict), validated against `config` when given,
    else against the found config. See the module docstring for the accepted layouts."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"weights not found: {path} does not exist")
    directory = path if path.is_dir() else path.parent
    config_file = directory / "config.json"
    found, hf_type = None, None
    if config_file.is_file():
        try:
            values = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {config_file}: {error}; fix or remove that config.json") from None
        if values.get("model_type") in HF_ARCHITECTURES:
            if path.is_dir():
                found, state = import_hf(path)
                return found, validate_state_dict(state, config, str(path)) if config is not None else state
            hf_type = values["model_type"]
        found = read_config(config_file)
    if path.is_dir():
        candidates = [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else \
            sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.pth"))
        if len(candidates) != 1:
            raise ValueError(f"{path}: expected one weights file (model.safetensors, *.safetensors or *.pth), found "
                             f"{len(candidates)}; pass the file itself")
        path = candidates[0]
    if hf_type is not None and path.suffix == ".safetensors":  # one file of an HF directory
        state = from_hf_state_dict(_load_safetensors([path]), found, hf_type, str(path))
        return found, validate_state_dict(state, config, str(path)) if config is not None else state
    return found, _load_file(path, config if config is not None else found)
