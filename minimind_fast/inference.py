"""Load a trained model for inference and sample text from it (used by generate and pretrain).

`load_for_inference(ckpt, device)` reads a run directory (its newest complete checkpoint), a
checkpoint directory, an exported HF directory or a weights file through interop.load_weights
(every tensor checked: floating point, finite, the config's shapes). `sample_text(model,
tokenizer, prompt)` encodes the prompt as MiniMind's pretraining documents begin (BOS, then the
text), fits it to the context window (`fit_to_context`) and decodes the continuation. Follows
MiniMind's eval_llm.py, minus chat.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoints import resolve_checkpoint_path
from .config import PRESETS, MiniMindConfig, get_preset
from .constants import BOS_TOKEN_ID, EOS_TOKEN_ID
from .data.tokenizer import default_tokenizer_path, load_tokenizer
from .dtypes import inference_dtype
from .interop import load_weights
from .model import MiniMindForCausalLM
from .weights import validate_state_dict

PRESET_FIX = (f"pass the --preset the weights were trained with (one of {', '.join(PRESETS)}) or "
              "put the training run's config.json beside them")


def _with_preset_hint(message: str, path: Path, state: Optional[dict] = None) -> str:
    """`message`, plus the presets a bare weights file (no config.json beside it) fits."""
    if path.is_dir() or (path.parent / "config.json").is_file():
        return message
    if state is None:
        try:
            _, state = load_weights(path)  # unvalidated: only the dtype and finiteness checks
        except ValueError:
            return message
    matches = []
    for name in PRESETS:
        try:
            validate_state_dict(state, get_preset(name), source=name)
        except ValueError:
            continue
        matches.append(name)
    if not matches:
        return message
    return f"{message}; these weights fit --preset {' or --preset '.join(matches)}"


def _load_model_weights(path: Path, preset: Optional[str]) -> tuple[MiniMindConfig, dict]:
    config = get_preset(preset) if preset is not None else None
    try:
        found, state = load_weights(path, config, fix=PRESET_FIX)
    except ValueError as error:
        raise ValueError(_with_preset_hint(str(error), path)) from None
    config = config if config is not None else found
    if config is None:
        message = f"no config.json next to {path}: {PRESET_FIX}"
        raise ValueError(_with_preset_hint(message, path, state))
    return config, state


def load_for_inference(ckpt, device: torch.device, preset: Optional[str] = None,
                       tokenizer_path=None):
    """(model in eval mode on `device`, tokenizers.Tokenizer) for a run dir, checkpoint dir,
    exported HF dir or weights file. ValueError (one line) for anything that cannot be loaded."""
    path = resolve_checkpoint_path(ckpt)
    config, state = _load_model_weights(path, preset)
    model = MiniMindForCausalLM(config)
    model.load_state_dict(state)
    model.to(device).eval()
    if tokenizer_path is None:
        beside = (path if path.is_dir() else path.parent) / "tokenizer.json"
        tokenizer_path = beside if beside.is_file() else default_tokenizer_path(config.vocab_size)
    return model, load_tokenizer(tokenizer_path)


def fit_to_context(ids: list[int], max_new_tokens: int,
                   window: int) -> tuple[list[int], int, list[str]]:
    """(prompt ids, new tokens, notes) that fit a `window`-token context.

    The prompt keeps all of itself when it fits beside `max_new_tokens`; else its most recent
    tokens after the leading BOS, but at least half the window, so that a huge --max_new_tokens
    cannot push the prompt out. Then the new tokens are capped to what is left. Each change is
    one note for the user."""
    notes = []
    keep = min(len(ids), max(window - max_new_tokens, window // 2, 1))
    new = min(max_new_tokens, window - keep)
    if keep < len(ids):
        notes.append(f"the prompt is {len(ids)} tokens (with BOS) and the {window}-token context "
                     f"window holds {keep} of them beside {new} new tokens: keeping its most "
                     f"recent {keep - 1} after BOS")
        ids = ids[:1] + ids[len(ids) - keep + 1:]
    if new < max_new_tokens:
        notes.append(f"--max_new_tokens {max_new_tokens} does not fit the {window}-token context "
                     f"window after the prompt's {keep} tokens: generating at most {new}")
    return ids, new, notes


def check_prompt(prompt: str) -> None:
    """ValueError unless `prompt` is text the tokenizer can take: bytes that are not UTF-8 reach
    Python (argv, surrogateescape) as lone surrogates, which cannot be encoded."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the prompt (--prompt) is not valid UTF-8 (undecodable byte(s) at "
                         f"character {error.start}); pass UTF-8 text") from None


def print_note(note: str) -> None:
    """The default `note` of sample_text: one `note:` line on stderr."""
    print(f"note: {note}", file=sys.stderr, flush=True)


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                top_k: Optional[int] = 40, top_p: Optional[float] = None,
                repetition_penalty: float = 1.1, seed: int = 0,
                note: Callable[[str], None] = print_note) -> str:
    """The prompt (its most recent context window) followed by a sampled continuation, decoded
    (special tokens dropped). Whatever did not fit the context window is reported via `note`."""
    device = next(model.parameters()).device
    check_prompt(prompt)
    ids = [BOS_TOKEN_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids
    window = model.config.max_position_embeddings
    ids, max_new_tokens, notes = fit_to_context(ids, max_new_tokens, window)
    for line in notes:
        note(line)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        dtype = inference_dtype(device)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            tokens = model.generate(torch.tensor([ids], device=device),
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty,
                                    eos_token_id=EOS_TOKEN_ID, generator=generator)
    finally:
        model.train(was_training)
    return tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)
