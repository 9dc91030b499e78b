"""Export a MiniMind model to a Hugging Face directory that loads as a stock architecture.

`export_hf(state_dict_or_model, config, out_dir, tokenizer_dir=None, dtype=None)` writes
config.json, generation_config.json, model.safetensors and (given a tokenizer) tokenizer.json +
tokenizer_config.json + special_tokens_map.json, so that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` needs no `trust_remote_code`.
tokenizer_config.json keeps the source's settings and gains the ChatML chat template when it
has none, so `apply_chat_template` renders conversations as SFT trained on them.
Which architecture, and why each mapping is exact: see hf_config.

Writing is all or nothing: the files go into a temp directory beside out_dir, which is renamed
into place once complete (a previous export there is swapped out and then deleted). out_dir
must be new, empty or a previous export; a training run or checkpoint directory, any other
non-empty directory, a file, or the directory the weights are read from is refused before
anything is written (`check_export_target`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from tokenizers import Tokenizer

from ..config import MiniMindConfig
from ..data.tokenizer import CHAT_TEMPLATE
from ..dtypes import DTYPES
from ..fileio import describe_write_error
from ..weights import save_safetensors, validate_state_dict
from .hf_config import HF_ARCHITECTURES, hf_architecture, to_hf_config

PathLike = Union[str, Path]
EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)
_CHECKPOINT_FILES = ("COMPLETE", "resume.pt")  # what a training checkpoint directory holds


class ExportWriteError(OSError):
    """Writing the export failed (disk full, permissions); nothing was left at out_dir."""


def to_hf_state_dict(state_dict: dict, config: MiniMindConfig) -> dict[str, torch.Tensor]:
    """Our (MiniMind-named) state dict -> the HF checkpoint's tensors (contiguous, none shared)."""
    arch = hf_architecture(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # HF re-ties lm_head to embed_tokens on load
        if arch == "mixtral" and ".mlp." in key:
            key = (
                key.replace(".mlp.", ".block_sparse_moe.")
                .replace(".gate_proj.", ".w1.")
                .replace(".down_proj.", ".w2.")
                .replace(".up_proj.", ".w3.")
            )
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
            for proj, heads in (
                ("q_proj", config.num_attention_heads),
                ("k_proj", config.num_key_value_heads),
                ("v_proj", config.num_key_value_heads),
            ):
                bias = torch.zeros(heads * config.head_dim, dtype=dtype)
                out[f"{prefix}.self_attn.{proj}.bias"] = bias
    return out


def _tokenizer_settings(tokenizer_dir: PathLike, config: MiniMindConfig) -> tuple[bytes, dict]:
    """(tokenizer.json bytes, tokenizer_config dict for transformers), checked against the model
    config. Read here, before anything is written: the source may be the export being replaced."""
    source = Path(tokenizer_dir).expanduser()
    file = source / "tokenizer.json" if source.is_dir() else source
    try:
        data = file.read_bytes()
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"tokenizer not found: {file} does not exist; pass --tokenizer DIR "
            "holding tokenizer.json"
        ) from None
    except Exception as error:  # tokenizers raises a bare Exception on parse errors
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"cannot read tokenizer {file}: {first}; pass the tokenizer.json the "
            "model was trained with"
        ) from None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(
            f"tokenizer {file} has {tokenizer.get_vocab_size()} tokens but the "
            f"model's vocab_size is {config.vocab_size}; export with the tokenizer "
            "the model was trained with"
        )
    tokens = {}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id")
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(
                f"{role}_token_id={token_id} is not in tokenizer {file}; use the "
                "model's own tokenizer"
            )
        tokens[f"{role}_token"] = token
    settings: dict = {}
    source_config = file.parent / "tokenizer_config.json"
    if source_config.is_file():  # keep chat_template, added_tokens_decoder, ...
        settings = json.loads(source_config.read_text(encoding="utf-8"))
    settings.update(tokens, tokenizer_class="PreTrainedTokenizerFast")
    settings.setdefault("chat_template", CHAT_TEMPLATE)  # the ChatML that SFT trains on
    settings.setdefault("unk_token", tokens["pad_token"])
    settings.setdefault("model_max_length", config.max_position_embeddings)
    settings.setdefault("clean_up_tokenization_spaces", False)
    return data, settings


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_hf_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") in HF_ARCHITECTURES
    except (OSError, ValueError, AttributeError):
        return False


def check_export_target(out: Path, weights_path: Optional[PathLike] = None) -> None:
    """ValueError unless `out` is a new path, an empty directory or a previous export, and is not
    where the weights (`weights_path`) are read from."""
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; pass the directory it points to")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(
            f"--out {out} is a file; pass a directory path (new, empty, or a previous export)"
        )
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    kind = None
    if any(name in names for name in _CHECKPOINT_FILES):
        kind = "a checkpoint directory"
    elif "checkpoints" in names or (
        "config.json" in names and not _is_hf_config(out / "config.json")
    ):
        kind = "a training run directory (it has a minimind_fast config.json or checkpoints/)"
    if kind is not None:
        raise ValueError(
            f"--out {out} is {kind}; exporting there would overwrite its files: pass "
            "a new directory"
        )
    if weights_path is not None:
        source = Path(weights_path).expanduser().resolve()
        if out.resolve() in (source, source.parent if source.is_file() else source):
            raise ValueError(
                f"--out {out} is where the weights are read from ({weights_path}); "
                "export to another directory"
            )
    foreign = [name for name in names if name not in EXPORT_FILES]
    if foreign or "model.safetensors" not in names or not _is_hf_config(out / "config.json"):
        what = f"it holds {foreign[0]}" if foreign else "it is not a complete export"
        raise ValueError(
            f"--out {out} is not empty and not a previous export ({what}); pass a "
            "new or empty directory"
        )


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk. Not every platform opens or fsyncs directories; that
    only weakens durability after a power cut, so it is not an error."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(descriptor)


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Call write(temp directory beside `out`), then rename it into place; on any failure remove
    the temp directory and every parent directory created for it, and leave `out` as it was."""
    created = [parent for parent in out.parents if not parent.exists()]  # innermost first
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
        write(tmp)
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if out.exists():  # a previous export (or an empty directory): swap it out, then delete it
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _export_dtype(tensors: dict, dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """The dtype to store: `dtype` when given, else the weights' own (float32 when they mix)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype is not None:
        return dtype
    found = {tensor.dtype for tensor in tensors.values()}
    return found.pop() if len(found) == 1 else torch.float32


def export_hf(
    weights: Union[dict, torch.nn.Module],
    config: MiniMindConfig,
    out_dir: PathLike,
    tokenizer_dir: Optional[PathLike] = None,
    dtype: Union[str, torch.dtype, None] = None,
    weights_path: Optional[PathLike] = None,
) -> Path:
    """Write a transformers-loadable directory for our model (or its state dict) and `config`.

    dtype: None keeps the weights' floating dtype; "float32" | "bfloat16" | "float16" casts.
    weights_path: where the weights were read from (refused as out_dir). Returns out_dir.
    Raises ValueError (nothing written) when the weights, config or out_dir are refused, and
    ExportWriteError (nothing left behind) when writing fails.
    """
    out = Path(out_dir).expanduser()
    check_export_target(out, weights_path)
    state_dict = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    state_dict = validate_state_dict(state_dict, config, source="export")
    tokenizer = _tokenizer_settings(tokenizer_dir, config) if tokenizer_dir is not None else None
    tensors = to_hf_state_dict(state_dict, config)  # everything is checked before writing
    stored = _export_dtype(tensors, dtype)
    tensors = {k: v.to("cpu", stored).contiguous() for k, v in tensors.items()}
    writing = None  # the file being written, for the error message

    def write(directory: Path) -> None:
        nonlocal writing
        writing = "model.safetensors"
        save_safetensors(tensors, directory / writing, metadata={"format": "pt"})
        files = {
            "config.json": to_hf_config(config, stored),
            "generation_config.json": {
                "bos_token_id": config.bos_token_id,
                "eos_token_id": config.eos_token_id,
                "pad_token_id": config.pad_token_id,
            },
        }
        if tokenizer is not None:
            writing = "tokenizer.json"
            (directory / writing).write_bytes(tokenizer[0])
            settings = tokenizer[1]
            files["tokenizer_config.json"] = settings
            roles = ("bos_token", "eos_token", "pad_token", "unk_token")
            files["special_tokens_map.json"] = {role: settings[role] for role in roles}
        for name, values in files.items():
            writing = name
            _write_json(directory / name, values)
        writing = None

    try:
        _write_atomically(out, write)
    except OSError as error:
        what = out / writing if writing else out
        failure = ExportWriteError(
            f"writing {what} failed: {describe_write_error(error, out.parent)}; {out} was "
            "left as it was (free disk space or pick another --out)"
        )
        failure.errno = error.errno
        raise failure from error
    return out
