"""Export a checkpoint to a Hugging Face directory that transformers loads as is.

    python -m minimind_fast.export --ckpt PATH --out DIR [--config JSON | --preset NAME]
        [--tokenizer DIR] [--dtype auto|float32|bfloat16|float16] [--verify]

transformers then needs no trust_remote_code.

PATH is a weights file (.safetensors, or a MiniMind .pth: a state dict or a resume checkpoint
holding one under "model") or a directory holding one weights file. The model config comes from,
in order: --config (a MiniMindConfig / MiniMind config.json, or an HF config.json), --preset
(for MiniMind's bare .pth files, e.g. pretrain_512.pth -> minimind2-small), or the config.json
next to the weights (inside PATH when it is a directory): a training run directory works as is.
The tokenizer comes from --tokenizer, else from a tokenizer.json next to the weights; without
one only the model is written (AutoTokenizer will then not load DIR).
DIR must be new, empty or a previous export (replaced whole); the export is written into a temp
directory and renamed into place, so a failure leaves DIR as it was.
The architecture is chosen by minimind_fast.interop.hf_config (Llama, Qwen3, Qwen3-MoE,
Qwen2-MoE, Mixtral); a config with no exact stock counterpart is refused with the reason.
--verify (needs `pip install transformers`) reloads DIR with AutoModelForCausalLM and compares
its logits with ours on random tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from .config import PRESETS, MiniMindConfig, get_preset
from .dtypes import DTYPES
from .interop import (
    check_export_target,
    export_hf,
    import_hf,
    load_weights,
    read_config,
    to_hf_config,
)
from .model import MiniMindForCausalLM

FIX = (
    "pass --config JSON (the model config the weights were trained with) or the matching "
    "--preset NAME"
)


def resolve_config(config_path: Optional[Path], preset: Optional[str]) -> Optional[MiniMindConfig]:
    """--config, else --preset, else None (load_weights then reads the config.json beside the
    weights)."""
    if config_path is not None:
        return read_config(config_path)
    if preset is not None:
        return get_preset(preset)
    return None


def verify(out: Path, tokens: int = 32) -> float:
    """Max |logits difference| between `out` loaded by transformers and by us (its weights, in
    fp32)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ValueError(
            "--verify needs transformers: pip install transformers (or pip install -e .[hf])"
        ) from None

    config, state_dict = import_hf(out)
    ours = MiniMindForCausalLM(config).eval()
    ours.load_state_dict(state_dict)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, min(tokens, config.max_position_embeddings)))
    with torch.no_grad():
        return (ours(ids).logits - theirs(ids).logits).abs().max().item()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minimind_fast.export",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
    )
    parser.add_argument(
        "--ckpt",
        type=Path,
        required=True,
        help="weights: .safetensors / MiniMind .pth file, or a directory holding one",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory: new, empty, or a previous export (replaced whole)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="model config JSON (default: config.json beside the weights)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="use a named preset as the config (for bare MiniMind .pth files)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="directory with tokenizer.json (+ tokenizer_config.json); default: beside the weights",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="weights dtype in the export (auto: as stored in the checkpoint)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="reload with transformers and compare logits (needs transformers)",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None and args.preset is not None:
        parser.error("pass --config or --preset, not both")
    try:
        out = args.out.expanduser()
        check_export_target(out, args.ckpt)  # before reading gigabytes of weights
        config = resolve_config(args.config, args.preset)
        found, state_dict = load_weights(args.ckpt, config, fix=FIX)
        config = config if config is not None else found
        if config is None:
            raise ValueError(
                f"no config for {args.ckpt}: pass --config JSON or --preset NAME, or "
                "put the training run's config.json beside the weights"
            )
        tokenizer = args.tokenizer
        if tokenizer is None:
            beside = (args.ckpt if args.ckpt.is_dir() else args.ckpt.parent) / "tokenizer.json"
            tokenizer = beside.parent if beside.is_file() else None
        export_hf(
            state_dict,
            config,
            out,
            tokenizer,
            None if args.dtype == "auto" else args.dtype,
            weights_path=args.ckpt,
        )
        difference = verify(out) if args.verify else None
    except ValueError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except OSError as error:  # a failed write (ExportWriteError): the message names the path
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    architecture = to_hf_config(config)["architectures"][0]
    has_tokenizer = "yes" if tokenizer else "no: pass --tokenizer DIR"
    print(f"wrote {out} ({architecture}; tokenizer: {has_tokenizer})")
    if difference is not None:
        print(f"verify: max |logits difference| vs transformers = {difference:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
