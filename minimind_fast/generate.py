"""Sample text from a trained checkpoint.

    python -m minimind_fast.generate --ckpt PATH --prompt TEXT

PATH is a run directory (--save_dir of pretrain: its newest complete checkpoint), a checkpoint
directory, a directory written by minimind_fast.export, or a weights file (.safetensors, or
MiniMind's .pth). The model config comes from the config.json next to the weights (or --preset
for bare MiniMind files), the tokenizer from the tokenizer.json saved with the run (or
--tokenizer_path). A prompt longer than the context window keeps its most recent part, and
--max_new_tokens is capped to what the window holds; each is said in one `note:` line on stderr.
Loading and sampling live in minimind_fast.inference; this module is the command line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .config import PRESETS
from .dtypes import resolve_device
from .inference import check_prompt, load_for_inference, print_note, sample_text
from .sampling import check_sampling


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minimind_fast.generate",
                                     description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--ckpt", required=True,
                        help="run directory, checkpoint directory, or .safetensors/.pth file")
    parser.add_argument("--prompt", default="The", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=64,
                        help="tokens to generate (capped to what the context window holds)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=40,
                        help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=None,
                        help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--repetition_penalty", type=float, default=1.1,
                        help="> 1 discourages repeats")
    parser.add_argument("--num_samples", type=int, default=1, help="samples to draw")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="model config for bare MiniMind .pth files")
    parser.add_argument("--tokenizer_path", default=None,
                        help="tokenizer directory (default: the one saved with the run)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:N] (default: cuda if available)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One-line ValueError for a flag that cannot work, before any weights are read."""
    for flag in ("max_new_tokens", "num_samples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)} must be >= 1")
    check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    check_prompt(args.prompt)


def _quiet(note: str) -> None:
    """Notes are said once, for the first sample."""


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        device = resolve_device(args.device)
        model, tokenizer = load_for_inference(args.ckpt, device, args.preset, args.tokenizer_path)
        for index in range(args.num_samples):
            text = sample_text(model, tokenizer, args.prompt, args.max_new_tokens,
                               args.temperature, args.top_k or None, args.top_p,
                               args.repetition_penalty, args.seed + index,
                               note=print_note if index == 0 else _quiet)
            print(text if args.num_samples == 1 else f"--- sample {index + 1}\n{text}", flush=True)
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
