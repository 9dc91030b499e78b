"""Sample text from a trained checkpoint: `python -m minimind_fast.generate --ckpt PATH --prompt TEXT`.

PATH is a run directory (--save_dir of pretrain: its newest complete checkpoint), a checkpoint
directory, a directory written by minimind_fast.export, or a weights file (.safetensors, or
MiniMind's .pth), read by minimind_fast.interop.load_weights. The model config comes from the
config.json next to the weights (or --preset for bare MiniMind files), the tokenizer from the
tokenizer.json saved with the run (or --tokenizer_path). Prompts are encoded as MiniMind's
pretraining documents begin: BOS, then the text. Follows MiniMind's eval_llm.py, minus chat.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from .config import PRESETS, get_preset
from .constants import BOS_TOKEN_ID, EOS_TOKEN_ID
from .checkpoints import resolve_checkpoint_path
from .model import MiniMindForCausalLM


def load_for_inference(ckpt, device: torch.device, preset: Optional[str] = None, tokenizer_path=None):
    """(model in eval mode on `device`, tokenizers.Tokenizer) for a run dir, checkpoint dir, exported
    HF dir or weights file."""
    from .interop import load_weights
    from .tokenizer import default_tokenizer_path, load_tokenizer

    path = resolve_checkpoint_path(ckpt)
    config = get_preset(preset) if preset is not None else None
    found, state = load_weights(path, config)  # validated against config, else against the config found
    config = config if config is not None else found
    if config is None:
        raise ValueError(f"no config.json next to {path}; pass --preset (one of {', '.join(PRESETS)}) "
                         "describing the weights")
    model = MiniMindForCausalLM(config)
    model.load_state_dict(state)
    model.to(device).eval()
    if tokenizer_path is None:
        found_tokenizer = (path if path.is_dir() else path.parent) / "tokenizer.json"
        tokenizer_path = found_tokenizer if found_tokenizer.is_file() else default_tokenizer_path(config.vocab_size)
    return model, load_tokenizer(tokenizer_path)


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                top_k: Optional[int] = 40, top_p: Optional[float] = None, repetition_penalty: float = 1.1,
                seed: int = 0) -> str:
    """The prompt followed by a sampled continuation, decoded (special tokens dropped)."""
    device = next(model.parameters()).device
    ids = [BOS_TOKEN_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=device.type == "cuda"):
            tokens = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty, eos_token_id=EOS_TOKEN_ID,
                                    generator=generator)
    finally:
        model.train(was_training)
    return tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimind_fast.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="run directory, checkpoint directory, or .safetensors/.pth file")
    parser.add_argument("--prompt", default="The", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=40, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--repetition_penalty", type=float, default=1.1, help="> 1 discourages repeats")
    parser.add_argument("--num_samples", type=int, default=1, help="samples to draw")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="model config for bare MiniMind .pth files")
    parser.add_argument("--tokenizer_path", default=None,
                        help="tokenizer directory (default: the one saved with the run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 1 or args.num_samples < 1:
            raise ValueError("--max_new_tokens and --num_samples must be >= 1")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer = load_for_inference(args.ckpt, device, args.preset, args.tokenizer_path)
        for index in range(args.num_samples):
            text = sample_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                               args.top_k or None, args.top_p, args.repetition_penalty, args.seed + index)
            print(text if args.num_samples == 1 else f"--- sample {index + 1}\n{text}")
    except ValueError as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
