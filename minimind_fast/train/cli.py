"""Command line of `python -m minimind_fast.pretrain` (and `torchrun -m minimind_fast.pretrain`).

Flag names follow MiniMind's trainer/train_pretrain.py (--epochs --batch_size --learning_rate
--accumulation_steps --grad_clip --dtype --log_interval --save_interval --hidden_size
--num_hidden_layers --max_seq_len --use_moe --data_path --from_resume --use_wandb --use_compile
--save_dir --save_weight --from_weight); 0/1 switches also accept the bare flag (`--use_moe`).
Defaults that depend on the model size come from the preset: with no --preset, `demo` on CPU
(a few minutes on 2 cores) and `minimind2-small` on a GPU (MiniMind's own settings).
Invalid values end the program with one line naming the value and the fix, exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Optional

from ..config import PRESETS, MiniMindConfig

PROG = "python -m minimind_fast.pretrain"
# Training defaults per preset; "default" serves every preset but demo (MiniMind2's settings).
PRESET_DEFAULTS = {
    "demo": dict(batch_size=8, learning_rate=3e-3, accumulation_steps=1, max_seq_len=256,
                 log_interval=20, save_interval=100, eval_interval=100),
    "default": dict(batch_size=32, learning_rate=5e-4, accumulation_steps=8, max_seq_len=512,
                    log_interval=100, save_interval=1000, eval_interval=500),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show "(default: X)" only where the default is a value
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump, exit 2
        fail(message)


def fail(message: str) -> NoReturn:
    """Print `PROG: error: message` as one line and exit with code 2 (a user error)."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def _number(kind, low=None, low_open=False, high=None, high_open=False, fix=""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or value != value:
            lower = "" if low is None else f"{'>' if low_open else '>='} {low}"
            upper = "" if high is None else f"{'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"{text} must be {' and '.join(p for p in (lower, upper) if p)}{fix}")
        return value
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0.0, low_open=True)
non_negative_float = _number(float, 0.0)


def _switch(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Pretrain a MiniMind-family model (single process or torchrun DDP).",
                            formatter_class=HelpFormatter)

    def switch(group, name, default, text):
        group.add_argument(name, type=_switch, nargs="?", const=1, default=default, help=f"{text} (0/1)")

    group = parser.add_argument_group("model")
    group.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="model preset (default: demo on CPU, minimind2-small on a GPU)")
    group.add_argument("--hidden_size", type=positive_int, default=None, help="override the preset's hidden size")
    group.add_argument("--num_hidden_layers", type=positive_int, default=None, help="override the preset's layer count")
    group.add_argument("--vocab_size", type=positive_int, default=None,
                       help="model vocabulary (preset: 6400); must cover the tokenizer")
    group.add_argument("--dropout", type=_number(float, 0.0, high=1.0, high_open=True), default=None,
                       help="dropout probability (preset: 0.0)")
    switch(group, "--use_moe", None, "mixture-of-experts FFN (default: the preset's)")
    switch(group, "--grad_checkpointing", 0, "recompute block activations in backward to save memory")

    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=None,
                       help="JSONL ({\"text\": ...} per line) or .txt corpus (default: the corpus built from "
                            "Python's own documentation, cached on first use)")
    group.add_argument("--tokenizer_path", default=None,
                       help="directory with tokenizer.json (default: a 6400-token BPE trained on the default "
                            "corpus)")
    group.add_argument("--max_seq_len", type=_number(int, 2), default=None,
                       help="tokens per row (default: 256 for demo, 512 otherwise)")
    switch(group, "--packing", 1, "concatenate documents into full rows (0: MiniMind's one padded document per row)")
    group.add_argument("--num_workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    group.add_argument("--val_fraction", type=_number(float, 0.0, high=1.0, high_open=True), default=0.01,
                       help="fraction of documents held out for validation (0 disables evaluation)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=positive_int, default=1, help="passes over the training split")
    group.add_argument("--max_steps", type=positive_int, default=None,
                       help="stop after this many optimizer steps (overrides --epochs; data is cycled)")
    group.add_argument("--batch_size", type=positive_int, default=None,
                       help="rows per micro-batch per process (default: 8 for demo, 32 otherwise)")
    group.add_argument("--accumulation_steps", type=positive_int, default=None,
                       help="micro-batches per optimizer step (default: 1 for demo, 8 otherwise)")
    group.add_argument("--learning_rate", type=positive_float, default=None,
                       help="peak learning rate (default: 3e-3 for demo, 5e-4 otherwise)")
    group.add_argument("--min_lr", type=non_negative_float, default=None,
                       help="final learning rate of the cosine decay (default: learning_rate / 10)")
    group.add_argument("--warmup_steps", type=non_negative_int, default=None,
                       help="linear warmup steps (default: warmup_ratio * total steps)")
    group.add_argument("--warmup_ratio", type=_number(float, 0.0, high=1.0, high_open=True), default=0.02,
                       help="warmup as a fraction of the total steps, when --warmup_steps is not given")
    group.add_argument("--weight_decay", type=non_negative_float, default=0.1,
                       help="AdamW weight decay on weight matrices (never on norms, biases, embeddings)")
    group.add_argument("--grad_clip", type=non_negative_float, default=1.0,
                       help="clip the gradient norm to this (0: off)")
    group.add_argument("--seed", type=non_negative_int, default=42, help="base seed (rank r uses seed + r)")

    group = parser.add_argument_group("precision and speed")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="autocast dtype (default: float32 on CPU, bfloat16 on GPUs that have it, else float16)")
    group.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    switch(group, "--use_compile", 0, "torch.compile the model")
    group.add_argument("--ddp_timeout", type=positive_float, default=1800.0,
                       help="seconds a collective may wait for the other ranks before failing")

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--save_dir", default="out", help="run directory: checkpoints, metrics, weights")
    group.add_argument("--save_weight", default="pretrain",
                       help="name prefix of the MiniMind weights file {save_weight}_{hidden_size}[_moe].pth")
    group.add_argument("--save_interval", type=non_negative_int, default=None,
                       help="checkpoint every N optimizer steps, and at the end (0: only at the end; "
                            "default: 100 for demo, 1000 otherwise)")
    group.add_argument("--keep_checkpoints", type=positive_int, default=3, help="keep the newest K checkpoints")
    switch(group, "--from_resume", 0,
           "continue from the newest complete checkpoint in --save_dir (fresh start if none)")
    group.add_argument("--from_weight", default="none",
                       help="initial weights: a .safetensors/.pth file, a checkpoint or run directory, or a "
                            "MiniMind prefix resolved as {save_dir}/{from_weight}_{hidden_size}.pth "
                            "('none': random init)")
    group.add_argument("--log_interval", type=positive_int, default=None,
                       help="log every N optimizer steps (default: 20 for demo, 100 otherwise)")
    group.add_argument("--eval_interval", type=non_negative_int, default=None,
                       help="validation loss every N optimizer steps and at the end (0: only at the end; "
                            "default: 100 for demo, 500 otherwise)")
    group.add_argument("--eval_batches", type=positive_int, default=20,
                       help="validation batches per rank per evaluation")
    switch(group, "--use_wandb", 0, "log to Weights & Biases (WANDB_MODE=offline works without network)")
    group.add_argument("--wandb_project", default="minimind_fast", help="wandb project name")
    group.add_argument("--sample_prompt", default="The",
                       help="prompt of the sample printed at the end of training")
    group.add_argument("--sample_tokens", type=non_negative_int, default=48,
                       help="tokens generated for the final sample (0: no sample)")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse and check flags that need no device or data; exits 2 with one line on bad values."""
    args = build_parser().parse_args(argv)
    if args.min_lr is not None and args.learning_rate is not None and args.min_lr > args.learning_rate:
        fail(f"--min_lr {args.min_lr} exceeds --learning_rate {args.learning_rate}; use a smaller --min_lr")
    if args.use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--use_wandb 1 needs the wandb package: pip install wandb (WANDB_MODE=offline logs without network)")
    if not args.save_weight or any(c in args.save_weight for c in "/\\"):
        fail(f"--save_weight {args.save_weight!r} must be a plain file-name prefix such as 'pretrain'")
    return args


def apply_preset_defaults(args: argparse.Namespace, preset: str) -> argparse.Namespace:
    """Fill the flags left at None from the preset's training defaults."""
    defaults = PRESET_DEFAULTS.get(preset, PRESET_DEFAULTS["default"])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10
    elif args.min_lr > args.learning_rate:
        fail(f"--min_lr {args.min_lr} exceeds --learning_rate {args.learning_rate}; use a smaller --min_lr")
    return args


def check_model_flags(args: argparse.Namespace, preset: str) -> None:
    """ValueError when --hidden_size cannot be split into the preset's attention heads (there is
    no head-count flag: the fix is another --hidden_size)."""
    values = PRESETS[preset]
    heads = values.get("num_attention_heads", MiniMindConfig.num_attention_heads)
    if args.hidden_size is None or "head_dim" in values:
        return
    if args.hidden_size % (2 * heads):
        multiple = 2 * heads
        below, above = args.hidden_size // multiple * multiple, (args.hidden_size // multiple + 1) * multiple
        raise ValueError(f"--hidden_size {args.hidden_size} gives head_dim={args.hidden_size / heads:g} with the "
                         f"{preset} preset's {heads} attention heads, but head_dim must be a whole even number; "
                         f"use a multiple of {multiple} (e.g. --hidden_size "
                         f"{f'{below} or {above}' if below else above})")
