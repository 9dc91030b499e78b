"""Export a MiniMind model to a Hugging Face directory that loads as a stock architecture.

`export_hf(state_dict_or_model, config, out_dir, tokenizer_dir=None, dtype=None)` writes
config.json, generation_config.json, model.safetensors and (given a tokenizer) tokenizer.json +
tokenizer_config.json + special_tokens_map.json, so that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` needs no `trust_remote_code`.

Which architecture (`hf_architecture`), and why each mapping is exact:

| MiniMind config                                | transformers class  | weights                       |
|------------------------------------------------|---------------------|-------------------------------|
| dense                                          | LlamaForCausalLM    | same names                    |
| dense, qk_norm                                 | Qwen3ForCausalLM    | same names                    |
| MoE, qk_norm, no shared expert                 | Qwen3MoeForCausalLM | same names                    |
| MoE, shared expert(s), no qk_norm              | Qwen2MoeForCausalLM | shared experts merged, see below |
| MoE, no shared expert, top-k>1 renormalised    | MixtralForCausalLM  | block_sparse_moe / w1 w2 w3   |

All routers are softmax → top-k → (renormalise when MiniMind does: top-k > 1 and
norm_topk_prob; MiniMind's +1e-20 in the denominator cannot change an fp32 sum of ≥ 1/E).
Qwen2-MoE gates its one shared expert with sigmoid(x · g) where MiniMind adds its shared experts
ungated: we write g = 0 (sigmoid(0) = 0.5 exactly) and the shared down_proj times 2 (exact in
floating point), concatenate several shared experts into one wider MLP (a sum of MLPs is one MLP
of the summed width) and write zero q/k/v biases (Qwen2-MoE checkpoints carry them). Refused:
sigmoid scoring (no stock router scores without softmax); q/k norm together with a shared expert
(Qwen3-MoE has no shared expert, Qwen2-MoE no q/k norm); no shared expert with top-1 or
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
import shutil
from pathlib import Path
from typing import Optional, Union

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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_architecture(config: MiniMindConfig) -> str:
    """The transformers model_type that computes exactly what `config` does; ValueError if none."""
    if not config.use_moe:
        if not config.qk_norm and config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"cannot export to LlamaForCausalLM: hidden_size={config.hidden_size} is not divisible by "
                f"num_attention_heads={config.num_attention_heads}, which LlamaConfig rejects even with an "
                "explicit head_dim; use a head count that divides hidden_size")
        return "qwen3" if config.qk_norm else "llama"
    if config.scoring_func != "softmax":
        raise ValueError(f"cannot export MoE with scoring_func={config.scoring_func!r}: every stock "
                         "transformers MoE router scores with softmax; only softmax MoE models can be exported")
    if config.qk_norm:
        if config.n_shared_experts == 0:
            return "qwen3_moe"
        raise ValueError(
            f"cannot export MoE with qk_norm=True and n_shared_experts={config.n_shared_experts}: no stock "
            "transformers architecture has both (Qwen3-MoE has q/k norm but no shared expert, Qwen2-MoE a "
            "shared expert but no q/k norm); train with n_shared_experts=0 or qk_norm=False to export")
    if config.hidden_size != config.num_attention_heads * config.head_dim:
        raise ValueError(
            f"cannot export MoE without qk_norm when head_dim={config.head_dim} != hidden_size / "
            f"num_attention_heads ({config.hidden_size}/{config.num_attention_heads}): Qwen2-MoE and Mixtral in "
            "transformers 4.x derive head_dim from hidden_size; drop the explicit head_dim")
    if config.n_shared_experts > 0:
        return "qwen2_moe"
    if config.num_experts_per_tok > 1 and config.norm_topk_prob:
        return "mixtral"
    raise ValueError(
        f"cannot export MoE with no shared expert, no qk_norm and num_experts_per_tok="
        f"{config.num_experts_per_tok}, norm_topk_prob={config.norm_topk_prob}: Mixtral always renormalises "
        "the top-k weights (MiniMind does not here) and Qwen2-MoE always adds a shared expert")


def hf_rope_scaling(config: MiniMindConfig) -> Optional[dict]:
    """HF's rope_scaling dict (without rope_theta) equivalent to config.rope_scaling; None for plain RoPE."""
    if not config.rope_scaling:
        return None
    kind = config.rope_scaling.get("rope_type", config.rope_scaling.get("type", "yarn"))
    if kind != "yarn":
        raise ValueError(f"rope_scaling type {kind!r} is not supported; MiniMind's only scaling is 'yarn'")
    p = yarn_params(config.rope_scaling)
    original, max_pos = p["original_max_position_embeddings"], config.max_position_embeddings
    attention_factor = float(p["attention_factor"])
    if max_pos <= original:  # reference.rope_tables leaves the frequencies unscaled here
        if attention_factor == 1.0:
            return None
        if max_pos == original:  # YaRN with factor 1 is plain RoPE times attention_factor
            return {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": int(original),
                    "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": attention_factor}
        raise ValueError(
            f"cannot export rope_scaling={config.rope_scaling}: with max_position_embeddings={max_pos} < "
            f"original_max_position_embeddings={original} MiniMind scales cos/sin by attention_factor="
            f"{attention_factor} without YaRN, which HF cannot express; set attention_factor=1.0")
    if float(p["factor"]) != max_pos / original:
        raise ValueError(
            f"cannot export rope_scaling={config.rope_scaling}: factor={p['factor']} differs from "
            f"max_position_embeddings / original_max_position_embeddings = {max_pos}/{original}, and transformers "
            "4.x replaces the factor by that ratio; set factor (or max_position_embeddings) so they agree")
    beta_fast, beta_slow = float(p["beta_fast"]), float(p["beta_slow"])
    if not beta_fast > beta_slow > 0:
        raise ValueError(f"cannot export YaRN with beta_fast={beta_fast}, beta_slow={beta_slow}: "
                         "need beta_fast > beta_slow > 0")
    dim = config.head_dim
    low, high = yarn_correction_dims(dim, config.rope_theta, original, beta_fast, beta_slow)
    low = max(low, 0)
    if not low <= high <= dim // 2 - 1:
        raise ValueError(
            f"cannot export YaRN with beta_fast={beta_fast}, beta_slow={beta_slow}, head_dim={dim}, "
            f"rope_theta={config.rope_theta}, original_max_position_embeddings={original}: the ramp spans dims "
            f"[{low}, {high}], outside [0, head_dim/2 - 1] where MiniMind clamps differently from HF, so the "
            "frequencies would differ; adjust beta_slow/beta_fast")
    return {"rope_type": "yarn", "factor": float(max_pos / original),
            "original_max_position_embeddings": int(original), "beta_fast": beta_fast,
            "beta_slow": beta_slow, "attention_factor": attention_factor}


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
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    if arch in ("qwen3", "qwen3_moe"):
        hf.update(attention_bias=False)
    if arch in ("qwen3_moe", "qwen2_moe"):
        hf.update(num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                  moe_intermediate_size=config.intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
                  norm_topk_prob=bool(config.norm_topk_prob and config.num_experts_per_tok > 1),
                  output_router_logits=False, router_aux_loss_coef=config.aux_loss_alpha)
    if arch == "qwen2_moe":
        hf.update(qkv_bias=True, shared_expert_intermediate_size=config.n_shared_experts * config.intermediate_size)
    if arch == "mixtral":
        hf.update(num_local_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                  sliding_window=None, router_jitter_noise=0.0, output_router_logits=False,
                  router_aux_loss_coef=config.aux_loss_alpha)
    if dtype is not None:
        hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
    return hf


def to_hf_state_dict(state_dict: dict, config: MiniMindConfig) -> dict[str, torch.Tensor]:
    """Our (MiniMind-named) state dict -> the HF checkpoint's tensors (contiguous, none shared)."""
    arch = hf_architecture(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # HF re-ties lm_head to embed_tokens on load
        if arch == "mixtral" and ".mlp." in key:
            key = key.replace(".mlp.", ".block_sparse_moe.").replace(".gate_proj.", ".w1.") \
                     .replace(".down_proj.", ".w2.").replace(".up_proj.", ".w3.")
        elif arch == "qwen2_moe" and ".mlp.shared_experts." in key:
            continue  # merged below
        out[key] = tensor.detach().clone().contiguous()
    if arch == "qwen2_moe":
        H, S = config.hidden_size, config.n_shared_experts
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            shared = f"{prefix}.mlp.shared_experts"
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                parts = [state_dict[f"{shared}.{s}.{name}.weight"].detach() for s in range(S)]
                merged = torch.cat(parts, dim=dim)
                if name == "down_proj":
                    merged = merged * 2  # cancels sigmoid(0) = 0.5 of the zero gate; exact
                out[f"{prefix}.mlp.shared_expert.{name}.weight"] = merged.contiguous()
            dtype = out[f"{prefix}.mlp.gate.weight"].dtype
            out[f"{prefix}.mlp.shared_expert_gate.weight"] = torch.zeros(1, H, dtype=dtype)
            for proj, width in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads),
                                ("v_proj", config.num_key_value_heads)):
                out[f"{prefix}.self_attn.{proj}.bias"] = torch.zeros(width * config.head_dim, dtype=dtype)
    return out


def _tokenizer_settings(tokenizer_dir: Union[str, Path], config: MiniMindConfig) -> tuple[Path, dict]:
    """(tokenizer.json path, tokenizer_config dict for transformers), checked against the model config."""
    from tokenizers import Tokenizer

    source = Path(tokenizer_dir).expanduser()
    file = source / "tokenizer.json" if source.is_dir() else source
    if not file.is_file():
        raise ValueError(f"tokenizer not found: {file} does not exist; pass --tokenizer DIR holding tokenizer.json")
    tokenizer = Tokenizer.from_file(str(file))
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"tokenizer {file} has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; export with the tokenizer the model was trained with")
    tokens = {}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id")
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"{role}_token_id={token_id} is not in tokenizer {file}; use the model's own tokenizer")
        tokens[f"{role}_token"] = token
    settings: dict = {}
    source_config = file.parent / "tokenizer_config.json"
    if source_config.is_file():  # keep chat_template, added_tokens_decoder, ...
        settings = json.loads(source_config.read_text(encoding="utf-8"))
    settings.update(tokens, tokenizer_class="PreTrainedTokenizerFast")
    settings.setdefault("unk_token", tokens["pad_token"])
    settings.setdefault("model_max_length", config.max_position_embeddings)
    settings.setdefault("clean_up_tokenization_spaces", False)
    return file, settings


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(weights: Union[dict, torch.nn.Module], config: MiniMindConfig, out_dir: Union[str, Path],
              tokenizer_dir: Union[str, Path, None] = None, dtype: Union[str, torch.dtype, None] = None) -> Path:
    """Write a transformers-loadable directory for our model (or its state dict) and `config`.

    dtype: None keeps the weights' floating dtype; "float32" | "bfloat16" | "float16" casts.
    Returns out_dir. Raises ValueError when the config has no exact stock counterpart.
    """
    from safetensors.torch import save_file

    from .hf_import import validate_state_dict

    state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    state_dict = validate_state_dict(state_dict, config, source="export")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    tokenizer = _tokenizer_settings(tokenizer_dir, config) if tokenizer_dir is not None else None
    tensors = to_hf_state_dict(state_dict, config)  # everything is checked before anything is written
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    stored = next(v.dtype for v in tensors.values() if v.is_floating_point())
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", to_hf_config(config, stored))
    _write_json(out / "generation_config.json", {"bos_token_id": config.bos_token_id,
                                                 "eos_token_id": config.eos_token_id,
                                                 "pad_token_id": config.pad_token_id})
    if tokenizer is not None:
        file, settings = tokenizer
        shutil.copyfile(file, out / "tokenizer.json")
        _write_json(out / "tokenizer_config.json", settings)
        _write_json(out / "special_tokens_map.json",
                    {k: settings[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
    return out
