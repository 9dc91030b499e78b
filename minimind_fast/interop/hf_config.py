"""Model configs both ways: ours (MiniMindConfig) <-> a stock transformers config.json.

`to_hf_config(config)` / `from_hf_config(hf)` translate, `read_config(path)` reads either kind.
Shared by hf_export (writes the directory) and hf_import (reads it back).

Which architecture (`hf_architecture`), and why each mapping is exact:

| MiniMind config                             | transformers class  | weights                     |
|---------------------------------------------|---------------------|-----------------------------|
| dense                                       | LlamaForCausalLM    | same names                  |
| dense, qk_norm                              | Qwen3ForCausalLM    | same names                  |
| MoE, qk_norm, no shared expert              | Qwen3MoeForCausalLM | same names                  |
| MoE, shared expert(s), no qk_norm           | Qwen2MoeForCausalLM | shared experts merged below |
| MoE, no shared expert, norm_topk_prob       | MixtralForCausalLM  | block_sparse_moe / w1 w2 w3 |

All routers are softmax → top-k → (renormalise whenever norm_topk_prob, top-1 included, as
MiniMind-3 and the norm_topk_prob of Qwen2/3-MoE do; Mixtral always does. MiniMind's +1e-20 in
the denominator cannot change an fp32 sum of ≥ 1/E, so a top-1 weight is exactly 1 on both sides).
Qwen2-MoE gates its one shared expert with sigmoid(x · g) where MiniMind adds its shared experts
ungated: we write g = 0 (sigmoid(0) = 0.5 exactly) and the shared down_proj times 2 (exact in
floating point), concatenate several shared experts into one wider MLP (a sum of MLPs is one MLP
of the summed width) and write zero q/k/v biases (Qwen2-MoE checkpoints carry them). Refused:
sigmoid scoring (no stock router scores without softmax); q/k norm together with a shared expert
(Qwen3-MoE has no shared expert, Qwen2-MoE no q/k norm); no shared expert with
norm_topk_prob=False and no q/k norm (Mixtral always renormalises top-k, Qwen2-MoE always has a
shared expert). The training-time aux loss is not part of any of these: only the forward pass is.

RoPE: `rope_theta` as is; MiniMind's YaRN (reference.rope_tables) is written as HF's
{"rope_type": "yarn", ...} only when the two compute the same frequencies: factor ==
max_position_embeddings / original_max_position_embeddings (transformers 4.x recomputes the
factor from that ratio, 5.x uses it as given), the ramp's upper end below head_dim/2 (MiniMind
clamps it to head_dim/2 - 1, HF to head_dim - 1), and attention_factor written explicitly
(HF's default is 0.1 ln(factor) + 1, MiniMind's 1.0). Anything else raises ValueError.
The config carries both the 4.x keys (`rope_theta`, `rope_scaling`) and the 5.x `rope_parameters`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NoReturn, Optional, Union

import torch

from ..config import MiniMindConfig
from ..ops.reference import yarn_correction_dims, yarn_params

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
_MOE_WIDTH_TYPES = ("qwen3_moe", "qwen2_moe")  # their expert width is moe_intermediate_size
PathLike = Union[str, Path]


def hf_architecture(config: MiniMindConfig) -> str:
    """The transformers model_type that computes exactly what `config` does; ValueError if none."""
    if not config.use_moe:
        if not config.qk_norm and config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"cannot export to LlamaForCausalLM: hidden_size={config.hidden_size} is not "
                f"divisible by num_attention_heads={config.num_attention_heads}, which LlamaConfig "
                "rejects even with an explicit head_dim; use a head count that divides hidden_size"
            )
        return "qwen3" if config.qk_norm else "llama"
    if config.scoring_func != "softmax":
        raise ValueError(
            f"cannot export MoE with scoring_func={config.scoring_func!r}: every "
            "stock transformers MoE router scores with softmax; only softmax MoE "
            "models can be exported"
        )
    if config.qk_norm:
        if config.n_shared_experts == 0:
            return "qwen3_moe"
        raise ValueError(
            f"cannot export MoE with qk_norm=True and n_shared_experts={config.n_shared_experts}: "
            "no stock transformers architecture has both (Qwen3-MoE has q/k norm but no shared "
            "expert, Qwen2-MoE a shared expert but no q/k norm); train with n_shared_experts=0 or "
            "qk_norm=False to export"
        )
    if config.hidden_size != config.num_attention_heads * config.head_dim:
        raise ValueError(
            f"cannot export MoE without qk_norm when head_dim={config.head_dim} != hidden_size / "
            f"num_attention_heads ({config.hidden_size}/{config.num_attention_heads}): Qwen2-MoE "
            "and Mixtral in transformers 4.x derive head_dim from hidden_size; drop the explicit "
            "head_dim"
        )
    if config.n_shared_experts > 0:
        return "qwen2_moe"
    if config.norm_topk_prob:
        return "mixtral"
    raise ValueError(
        "cannot export MoE with no shared expert, no qk_norm and norm_topk_prob=False: Mixtral "
        "always renormalises the top-k weights and Qwen2-MoE always adds a shared expert; train "
        "with norm_topk_prob=True or qk_norm=True to export"
    )


def hf_rope_scaling(config: MiniMindConfig) -> Optional[dict]:
    """HF's rope_scaling dict (without rope_theta) equivalent to config.rope_scaling; None for
    plain RoPE."""
    if not config.rope_scaling:
        return None
    kind = config.rope_scaling.get("rope_type", config.rope_scaling.get("type", "yarn"))
    if kind != "yarn":
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; MiniMind's only scaling is 'yarn'"
        )
    p = yarn_params(config.rope_scaling)
    original, max_pos = p["original_max_position_embeddings"], config.max_position_embeddings
    attention_factor = float(p["attention_factor"])
    if max_pos <= original:  # reference.rope_tables leaves the frequencies unscaled here
        if attention_factor == 1.0:
            return None
        if max_pos == original:  # YaRN with factor 1 is plain RoPE times attention_factor
            return {
                "rope_type": "yarn",
                "factor": 1.0,
                "original_max_position_embeddings": int(original),
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "attention_factor": attention_factor,
            }
        raise ValueError(
            f"cannot export rope_scaling={config.rope_scaling}: with max_position_embeddings="
            f"{max_pos} < original_max_position_embeddings={original} MiniMind scales cos/sin by "
            f"attention_factor={attention_factor} without YaRN, which HF cannot express; set "
            "attention_factor=1.0"
        )
    if float(p["factor"]) != max_pos / original:
        raise ValueError(
            f"cannot export rope_scaling={config.rope_scaling}: factor={p['factor']} differs from "
            f"max_position_embeddings / original_max_position_embeddings = {max_pos}/{original}, "
            "and transformers 4.x replaces the factor by that ratio; set factor (or "
            "max_position_embeddings) so they agree"
        )
    beta_fast, beta_slow = float(p["beta_fast"]), float(p["beta_slow"])
    if not beta_fast > beta_slow > 0:
        raise ValueError(
            f"cannot export YaRN with beta_fast={beta_fast}, beta_slow={beta_slow}: "
            "need beta_fast > beta_slow > 0"
        )
    dim = config.head_dim
    low, high = yarn_correction_dims(dim, config.rope_theta, original, beta_fast, beta_slow)
    low = max(low, 0)
    if not low <= high <= dim // 2 - 1:
        raise ValueError(
            f"cannot export YaRN with beta_fast={beta_fast}, beta_slow={beta_slow}, "
            f"head_dim={dim}, rope_theta={config.rope_theta}, original_max_position_embeddings="
            f"{original}: the ramp spans dims [{low}, {high}], outside [0, head_dim/2 - 1] where "
            "MiniMind clamps differently from HF, so the frequencies would differ; adjust "
            "beta_slow/beta_fast"
        )
    return {
        "rope_type": "yarn",
        "factor": float(max_pos / original),
        "original_max_position_embeddings": int(original),
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "attention_factor": attention_factor,
    }


def to_hf_config(config: MiniMindConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """The config.json dict for `config` (raises ValueError when no stock architecture matches)."""
    arch = hf_architecture(config)
    rope_scaling = hf_rope_scaling(config)
    rope_parameters = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    if rope_scaling is not None:
        rope_parameters = {**rope_scaling, "rope_theta": float(config.rope_theta), "truncate": True}
    hf = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": float(config.rope_theta),
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if arch in ("qwen3", "qwen3_moe", "qwen2_moe"):
        hf.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=config.num_hidden_layers,
        )
    if arch in ("qwen3", "qwen3_moe"):
        hf.update(attention_bias=False)
    if arch in _MOE_WIDTH_TYPES:
        hf.update(
            num_experts=config.n_routed_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.intermediate_size,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=bool(config.norm_topk_prob),
            output_router_logits=False,
            router_aux_loss_coef=config.aux_loss_alpha,
        )
    if arch == "qwen2_moe":
        shared_width = config.n_shared_experts * config.intermediate_size
        hf.update(qkv_bias=True, shared_expert_intermediate_size=shared_width)
    if arch == "mixtral":
        hf.update(
            num_local_experts=config.n_routed_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            sliding_window=None,
            router_jitter_noise=0.0,
            output_router_logits=False,
            router_aux_loss_coef=config.aux_loss_alpha,
        )
    if dtype is not None:
        hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    return hf


def from_hf_config(hf: dict) -> MiniMindConfig:
    """MiniMindConfig equivalent to an HF config dict; ValueError for anything MiniMind cannot
    compute."""
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(
            f"model_type={model_type!r} is not importable; supported: {', '.join(HF_ARCHITECTURES)}"
        )
    _check_importable(hf, model_type)
    theta, rope_scaling = _import_rope(hf, model_type)

    eos = hf.get("eos_token_id", 2)
    values = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=(
            hf.get("moe_intermediate_size")
            if model_type in _MOE_WIDTH_TYPES
            else hf["intermediate_size"]
        ),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    if model_type in ("qwen3_moe", "qwen2_moe", "mixtral"):
        values.update(_import_moe(hf, model_type, values["intermediate_size"]))
    config = MiniMindConfig(**values)
    if rope_scaling is not None:  # the export rules backwards: HF's YaRN must be MiniMind's
        try:
            back = hf_rope_scaling(config)
        except ValueError as error:
            raise ValueError(f"cannot import {model_type} config: {error}") from None
        if (back["factor"] if back else 1.0) != rope_scaling["factor"]:
            _refuse(
                hf,
                model_type,
                "rope_parameters",
                f"uses YaRN factor {rope_scaling['factor']} with "
                f"max_position_embeddings={config.max_position_embeddings}, which MiniMind's "
                "YaRN does not reproduce",
            )
    return config


def _refuse(hf: dict, model_type: str, field: str, why: str) -> NoReturn:
    raise ValueError(f"cannot import {model_type} config: {field}={hf.get(field)!r} {why}")


def _check_importable(hf: dict, model_type: str) -> None:
    """Refuse the HF options that MiniMind's model has no counterpart for."""
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(hf, model_type, "hidden_act", "is not supported; MiniMind uses silu")
    for field in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(field):
            _refuse(hf, model_type, field, "has no MiniMind counterpart")
    if model_type == "mixtral" and hf.get("sliding_window") is not None:
        _refuse(
            hf, model_type, "sliding_window", "has no MiniMind counterpart (full attention only)"
        )
    if model_type == "qwen2_moe" and not hf.get("qkv_bias", True):
        _refuse(
            hf,
            model_type,
            "qkv_bias",
            "is not what export_hf writes (zero biases with qkv_bias=True)",
        )
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(
            hf,
            model_type,
            "partial_rotary_factor",
            "is not supported; MiniMind rotates the whole head",
        )
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        _refuse(
            hf,
            model_type,
            "mlp_only_layers",
            "(or decoder_sparse_step) mixes dense and MoE layers; MiniMind does not",
        )


def _import_rope(hf: dict, model_type: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, MiniMind's rope_scaling) from the 4.x or 5.x keys: plain RoPE or YaRN."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        _refuse(
            hf,
            model_type,
            "rope_parameters",
            f"uses rope_type {rope_type!r}; MiniMind has plain RoPE and YaRN only",
        )
    if not rope.get("truncate", True):
        _refuse(
            hf, model_type, "rope_parameters", "uses YaRN with truncate=False; MiniMind truncates"
        )
    factor = float(rope["factor"])
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            _refuse(
                hf,
                model_type,
                "rope_parameters",
                "derives attention_factor from mscale; MiniMind needs it explicit",
            )
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0  # HF's default
    original = int(rope["original_max_position_embeddings"])
    return theta, {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": float(rope.get("beta_fast") or 32.0),
        "beta_slow": float(rope.get("beta_slow") or 1.0),
        "attention_factor": float(attention_factor),
    }


def _import_moe(hf: dict, model_type: str, intermediate_size: int) -> dict:
    """MiniMind's MoE fields of a Qwen3-MoE, Qwen2-MoE or Mixtral config."""
    top_k = hf.get("num_experts_per_tok", 2)
    normalised = True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False))
    n_shared = 0
    if model_type == "qwen2_moe":
        shared = hf.get("shared_expert_intermediate_size", 0)
        if shared % intermediate_size:
            _refuse(
                hf,
                model_type,
                "shared_expert_intermediate_size",
                "is not a multiple of "
                f"moe_intermediate_size={intermediate_size}, so it is not a set "
                "of MiniMind shared experts",
            )
        n_shared = shared // intermediate_size
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    return dict(
        use_moe=True,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_shared_experts=n_shared,
        scoring_func="softmax",
        norm_topk_prob=normalised,
        aux_loss_alpha=float(hf.get("router_aux_loss_coef", 0.01)),
    )


def read_config(path: PathLike) -> MiniMindConfig:
    """A config JSON file: an HF config.json (see from_hf_config) or a MiniMind2, MiniMind-3 or
    minimind_fast config dict (see MiniMindConfig.from_dict)."""
    path = Path(path).expanduser()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"cannot read config {path}: {error}; pass a JSON file with the model config"
        ) from None
    if values.get("model_type") in HF_ARCHITECTURES:
        return from_hf_config(values)
    if "hidden_size" not in values:  # a run config with the model config nested inside
        nested = [v for k, v in values.items() if isinstance(v, dict) and "hidden_size" in v]
        if len(nested) != 1:
            raise ValueError(
                f"config {path} has no hidden_size (nor one nested dict with it); "
                "pass the model config JSON (MiniMindConfig fields)"
            )
        values = nested[0]
    return MiniMindConfig.from_dict(values)
