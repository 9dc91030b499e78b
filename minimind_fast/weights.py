"""Weights I/O: every path that reads or writes model weights (checkpoints, interop, generate).

- `load_torch_file(path)`: torch.load(weights_only=True) on CPU, never unpickling code
  (PyTorch's own guidance for untrusted checkpoints); one-line errors for bad files.
- `load_safetensors(files)` / `save_safetensors(tensors, path)`: safetensors files; a failed
  write is an OSError carrying the errno, and the file gets the mode any new file gets.
- `strip_wrapper_prefixes(state)`: drop DDP's `module.` and torch.compile's `_orig_mod.`.
- `check_weights(state, source)`: floating-point dtypes and finite values only.
- `validate_state_dict(state, config)`: all of the above plus keys and shapes against our model.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import safetensors
import safetensors.torch
import torch

from .config import MiniMindConfig
from .model import MiniMindForCausalLM

PathLike = Union[str, Path]
# RoPE tables: recomputed from the config, never loaded
_DROPPED_SUFFIXES = ("freqs_cos", "freqs_sin", "pos_cis", "rotary_emb.inv_freq")
_WRAPPERS = ("module", "_orig_mod")
FIX = (
    "use the model config the weights were trained with (a config.json beside them, or the "
    "matching --preset / --hidden_size / --num_hidden_layers / --vocab_size / --use_moe flags)"
)


# ---- reading ------------------------------------------------------------------------------------


def load_torch_file(path: PathLike) -> Any:
    """torch.load(path, weights_only=True) on CPU: tensors and plain containers only, never code.
    One-line ValueError for a file that is truncated, not a checkpoint, or holds other Python
    objects."""
    path = Path(path)
    try:
        # a plain-pickle file draws a protocol warning; the error below says it all
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(error))
        what = found.group(1) if found else "not a plain state dict"
        raise ValueError(
            f"refusing to load {path}: it holds Python objects beyond tensors and "
            f"plain containers ({what}), which could run code when unpickled; re-save "
            "it as safetensors or a plain state dict"
        ) from None
    except FileNotFoundError:
        raise ValueError(f"cannot read {path}: the file does not exist") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"cannot read {path}: {first}. The file is truncated or not a PyTorch "
            "checkpoint; use another one"
        ) from None


def load_safetensors(files: Iterable[PathLike]) -> dict[str, torch.Tensor]:
    """The tensors of one or more safetensors files (shards), on CPU."""
    state = {}
    for file in files:
        try:
            state.update(safetensors.torch.load_file(str(file)))
        except (safetensors.SafetensorError, OSError) as error:
            raise ValueError(
                f"cannot read {file}: {error}. The file is truncated or corrupt (a "
                "bad safetensors header); use another copy of the weights"
            ) from None
    return state


# ---- writing ------------------------------------------------------------------------------------


def _new_file_mode() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: PathLike, metadata: Optional[dict] = None
) -> None:
    """Write `tensors` to `path`; on failure an OSError whose errno is the cause (ENOSPC, ...)."""
    path = Path(path)
    try:
        safetensors.torch.save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    except safetensors.SafetensorError as error:  # how safetensors reports a failed write
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise OSError(f"writing {path} failed: {error}") from error
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from error
    # safetensors creates the file owner-only; give it the mode of every other new file
    os.chmod(path, _new_file_mode())


# ---- checking -----------------------------------------------------------------------------------


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Keys without DDP's `module.` and torch.compile's `_orig_mod.` wrapper components, which
    appear in front (either order, nested) or, for `_orig_mod`, at a compiled submodule."""
    out = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        while len(parts) > 1 and parts[0] in _WRAPPERS:
            parts = parts[1:]
        out[".".join(parts)] = value
    return out


def normalize_keys(state_dict: dict) -> dict:
    """Wrapper prefixes stripped and RoPE tables (recomputed, never loaded) dropped."""
    state = strip_wrapper_prefixes(state_dict)
    return {k: v for k, v in state.items() if not k.endswith(_DROPPED_SUFFIXES)}


def check_weights(state_dict: dict, source: str = "checkpoint") -> None:
    """ValueError (one line, naming the tensor) unless every value is a finite floating-point
    tensor: an integer tensor cast to float trains from garbage, one NaN makes every logit NaN."""
    for key, tensor in state_dict.items():
        if not torch.is_tensor(tensor):
            raise ValueError(
                f"{source}: {key!r} is a {type(tensor).__name__}, not a tensor; "
                "pass a file saved from model.state_dict()"
            )
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ValueError(
                f"{source}: {key!r} has dtype {dtype}, but model weights are floating "
                "point (float32, bfloat16 or float16); this file holds something else "
                "(token ids, quantised or converted weights): use the model's "
                "floating-point weights"
            )
        if tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{source}: {key!r} holds {bad} non-finite (NaN/inf) "
                f"value{'s' * (bad > 1)}, so the model's outputs are NaN; the run "
                "diverged before these weights were saved: use an earlier checkpoint"
            )


def expected_shapes(config: MiniMindConfig) -> dict[str, tuple[int, ...]]:
    """Our model's state-dict keys and shapes for `config` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = MiniMindForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _field_hint(key: str, config: MiniMindConfig) -> str:
    layer = re.match(r"model\.layers\.(\d+)\.", key)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        return f"num_hidden_layers={config.num_hidden_layers}"
    rules = (
        ("q_norm", "qk_norm"),
        ("k_norm", "qk_norm"),
        ("shared_experts", "n_shared_experts"),
        (".mlp.experts.", "use_moe / n_routed_experts"),
        (".mlp.gate.", "use_moe / n_routed_experts"),
        ("q_proj", "num_attention_heads / head_dim"),
        ("o_proj", "num_attention_heads / head_dim"),
        ("k_proj", "num_key_value_heads / head_dim"),
        ("v_proj", "num_key_value_heads / head_dim"),
        ("_proj", "intermediate_size / use_moe"),
        ("layernorm", "hidden_size"),
        ("norm", "hidden_size"),
        ("embed_tokens", "vocab_size / hidden_size"),
        ("lm_head", "vocab_size / tie_word_embeddings"),
    )
    return next((field for pattern, field in rules if pattern in key), "the architecture fields")


def _check_keys(state: dict, shapes: dict, config: MiniMindConfig, source: str, fix: str) -> None:
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        if not keys:
            continue
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        hint = _field_hint(keys[0], config)
        if kind == "missing" and keys[0] == "lm_head.weight":
            hint = "tie_word_embeddings: the checkpoint ties lm_head to embed_tokens"
        layer = re.match(r"model\.layers\.(\d+)\.", keys[0])
        if kind == "missing" and layer and not any(k.startswith(layer.group(0)) for k in state):
            found_layers = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
            hint = (
                f"num_hidden_layers={config.num_hidden_layers}: the checkpoint has "
                f"{found_layers} layers"
            )
        raise ValueError(
            f"{source}: {kind} key {keys[0]!r}{more} for this config (check {hint}); {fix}"
        )
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(state[key].shape)} but the "
                f"config expects {shape} (check {_field_hint(key, config)}); {fix}"
            )


def validate_state_dict(
    state_dict: dict, config: MiniMindConfig, source: str = "checkpoint", fix: str = FIX
) -> dict:
    """Normalised keys, tied embeddings filled in, checked by `check_weights`, key by key and shape
    by shape. Returns a new dict in our model's key order; raises a one-line ValueError ending
    with `fix` (what the caller's user should do) on any mismatch."""
    state = normalize_keys(state_dict)
    check_weights(state, source)
    shapes = expected_shapes(config)
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if config.tie_word_embeddings:
        if head in state and embed in state:
            head_w, embed_w = state[head], state[embed]
            if head_w.shape != embed_w.shape or not torch.equal(head_w, embed_w):
                raise ValueError(
                    f"{source}: lm_head.weight differs from model.embed_tokens.weight "
                    "but the config has tie_word_embeddings=True; set "
                    "tie_word_embeddings=False to load it"
                )
        elif head in state or embed in state:
            state[head] = state[embed] = state.get(embed, state.get(head))
    _check_keys(state, shapes, config, source, fix)
    return {key: state[key] for key in shapes}
