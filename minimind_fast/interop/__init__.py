"""Interop with MiniMind and Hugging Face transformers.

- `export_hf(weights, config, out_dir, tokenizer_dir=None, dtype=None)`: a directory that
  `AutoModelForCausalLM.from_pretrained` loads as a stock architecture (Llama, Qwen3, Qwen3-MoE,
  Qwen2-MoE, Mixtral: whichever computes exactly what the config does; see hf_config).
- `load_weights(path, config=None) -> (config_or_None, state_dict)`: safetensors files, MiniMind
  .pth files and exported HF directories, validated against the config (see hf_import).
- `patch_hf_model(model)`: a transformers Llama/Qwen3 model on our RMSNorm, RoPE and loss.

Imports run one way: hf_config (config translation) <- hf_export, hf_import; weight files and
their checks live in minimind_fast.weights. transformers is optional: nothing here imports it
(exporting writes plain JSON + safetensors).
"""

from ..weights import validate_state_dict
from .hf_config import HF_ARCHITECTURES, from_hf_config, hf_architecture, read_config, to_hf_config
from .hf_export import check_export_target, export_hf, to_hf_state_dict
from .hf_import import from_hf_state_dict, import_hf, load_minimind_pth, load_weights
from .patch import causal_lm_loss, patch_hf_model

__all__ = [
    "HF_ARCHITECTURES",
    "export_hf",
    "check_export_target",
    "hf_architecture",
    "to_hf_config",
    "to_hf_state_dict",
    "from_hf_config",
    "from_hf_state_dict",
    "import_hf",
    "load_minimind_pth",
    "load_weights",
    "read_config",
    "validate_state_dict",
    "causal_lm_loss",
    "patch_hf_model",
]
