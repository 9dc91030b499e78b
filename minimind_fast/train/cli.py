"""Command line of the trainers (`python -m minimind_fast.pretrain`, also under torchrun): the
flags, their checks, and how a run's flags are resolved from preset, checkpoint and command line.

Flag names follow MiniMind's trainer/train_pretrain.py (--epochs --batch_size --learning_rate
--accumulation_steps --grad_clip --dtype --log_interval --save_interval --hidden_size
--num_hidden_layers --max_seq_len --use_moe --data_path --from_resume --use_wandb --use_compile
--save_dir --save_weight --from_weight); 0/1 switches also accept the bare flag (`--use_moe`).
Abbreviations are not accepted (`--max_step` is an error that suggests `--max_steps`).

Model: `--preset` picks a layout; MiniMind's own model flags (--hidden_size, --num_hidden_layers,
--use_moe) without --preset build MiniMind-3's model for that size (the `minimind3` /
`minimind3-moe` presets), as MiniMind's trainer does. `--recipe` picks the training procedure:
`default` (this project's) or `minimind` (MiniMind's optimizer, schedule, rows and data order).

Resolution: a fresh run fills every flag left unset from its preset's and its recipe's defaults.
A resumed run starts from the flags saved in its checkpoint; a flag given again on the command
line either applies (with one `note:` line, old -> new), applies with a warning that the run is
no longer bit-identical (the global batch), or is refused when it would change the model or the
data stream under the saved position (`RESUME_REFUSED`). Errors are one line, exit code 2.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import NoReturn, Optional

from ..config import PRESETS, MiniMindConfig

PROG = "python -m minimind_fast.pretrain"
# Training defaults per preset; "default" serves the MiniMind2 presets (MiniMind2's trainer
# settings), "minimind3" the MiniMind-3 ones (its trainer's shorter rows).
PRESET_DEFAULTS = {
    "demo": dict(batch_size=8, learning_rate=3e-3, accumulation_steps=1, max_seq_len=256,
                 log_interval=20, save_interval=100, eval_interval=100),
    "default": dict(batch_size=32, learning_rate=5e-4, accumulation_steps=8, max_seq_len=512,
                    log_interval=100, save_interval=1000, eval_interval=500),
}
PRESET_DEFAULTS["minimind3"] = PRESET_DEFAULTS["minimind3-moe"] = dict(PRESET_DEFAULTS["default"],
                                                                       max_seq_len=340)
# MiniMind's model flags: given without --preset they build MiniMind-3's model of that size.
MINIMIND_MODEL_FLAGS = ("hidden_size", "num_hidden_layers", "use_moe")
# Per recipe, the defaults of the flags it decides. "default": this project's recipe; "minimind":
# MiniMind's trainer/train_pretrain.py (AdamW(model.parameters()) at torch's defaults, no
# warmup, no held-out split, one padded document per row wrapped in BOS/EOS).
RECIPES = {
    "default": dict(adam_betas=(0.9, 0.95), weight_decay=0.1, weight_decay_on="matrices",
                    warmup_ratio=0.02, val_fraction=0.01, packing=1, add_special_tokens="auto"),
    "minimind": dict(adam_betas=(0.9, 0.999), weight_decay=0.01, weight_decay_on="all",
                     warmup_ratio=0.0, val_fraction=0.0, packing=0, add_special_tokens="always"),
}
# Flags that fix the model, the data stream or the optimizer's layout: changing one under a saved
# position is refused.
RESUME_REFUSED = ("preset", "hidden_size", "num_hidden_layers", "vocab_size", "use_moe", "dropout",
                  "data_path", "seed", "val_fraction", "packing", "max_seq_len", "add_special_tokens",
                  "save_weight", "recipe", "weight_decay_on")
# Sound to change on resume (the sampler counts samples, so the order is kept), but not bit-identical.
RESUME_REGROUPS = ("batch_size", "accumulation_steps")
NOT_SAVED = ("from_resume", "save_dir", "from_weight", "device")  # per invocation, never restored


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # show "(default: X)" only where the default is a value
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump, exit 2
        fail(message, self.prog)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            options = [o for action in self._actions for o in action.option_strings]
            word = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=")[0]
            close = difflib.get_close_matches(word, options, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; see {self.prog} --help"
            fail(f"unrecognized argument {word}{hint}", self.prog)
        return parsed


def fail(message, prog: str = PROG) -> NoReturn:
    """Print `prog: error: message` as one line and exit with code 2 (a user error)."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def _number(kind, low=None, low_open=False, high=None, high_open=False):
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
            raise argparse.ArgumentTypeError(f"{text} must be {' and '.join(p for p in (lower, upper) if p)}")
        return value
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0.0, low_open=True)
non_negative_float = _number(float, 0.0)
fraction = _number(float, 0.0, high=1.0, high_open=True)


def _switch(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or 1")
    return int(text)


def _compile_setting(text: str):
    if text not in ("0", "1", "auto"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0, 1 or auto")
    return text if text == "auto" else int(text)


def _betas(text: str) -> tuple[float, float]:
    try:
        betas = tuple(float(part) for part in text.split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise argparse.ArgumentTypeError(f"{text!r} must be two numbers in [0, 1) such as 0.9,0.95")
    return betas


def _resume_mode(text: str) -> str:
    if text not in ("0", "1", "auto"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0, 1 or auto")
    return text


def build_parser(prog: str = PROG, description: str = "Pretrain a MiniMind-family model "
                 "(single process or torchrun DDP).") -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, allow_abbrev=False)

    def switch(group, name, default, text):
        group.add_argument(name, type=_switch, nargs="?", const=1, default=default, help=f"{text} (0/1)")

    group = parser.add_argument_group("model")
    group.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="model preset (default: demo on CPU, minimind2-small on a GPU)")
    group.add_argument("--hidden_size", type=positive_int, default=None,
                       help="override the preset's hidden size (without --preset: MiniMind-3's "
                            "model of this size, as MiniMind's trainer builds it)")
    group.add_argument("--num_hidden_layers", type=positive_int, default=None,
                       help="override the preset's layer count (without --preset: MiniMind-3's "
                            "model)")
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
                       help="tokens per row (default: 256 for demo, 340 for minimind3*, 512 "
                            "otherwise)")
    switch(group, "--packing", None, "concatenate documents into full rows (0: MiniMind's "
           "one padded document per row; default: 1, recipe minimind: 0)")
    group.add_argument("--add_special_tokens", choices=("auto", "always", "never"), default=None,
                       help="wrap each document in BOS/EOS: auto = unless the text already "
                            "starts/ends with them (default: auto, recipe minimind: always)")
    group.add_argument("--num_workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    group.add_argument("--val_fraction", type=fraction, default=None,
                       help="fraction of documents held out for validation (0 disables evaluation; "
                            "default: 0.01, recipe minimind: 0)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                       help="training procedure: default (this project's) or minimind (MiniMind's "
                            "optimizer, LR formula and step index, padded rows, BOS/EOS rule "
                            "and data order; see the README)")
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
    group.add_argument("--warmup_ratio", type=fraction, default=None,
                       help="warmup as a fraction of the total steps, when --warmup_steps is "
                            "not given (default: 0.02, recipe minimind: no warmup)")
    group.add_argument("--weight_decay", type=non_negative_float, default=None,
                       help="AdamW weight decay (default: 0.1, recipe minimind: 0.01)")
    group.add_argument("--weight_decay_on", choices=("all", "matrices"), default=None,
                       help="tensors that decay: matrices = 2-D weights but the embedding "
                            "(never norms, biases, the tied embedding), all = every parameter, "
                            "as MiniMind's AdamW (default: matrices, recipe minimind: all)")
    group.add_argument("--adam_betas", type=_betas, default=None, metavar="B1,B2",
                       help="AdamW betas (default: 0.9,0.95, recipe minimind: 0.9,0.999)")
    group.add_argument("--grad_clip", type=non_negative_float, default=1.0,
                       help="clip the gradient norm to this (0: off)")
    group.add_argument("--seed", type=non_negative_int, default=42, help="base seed (rank r uses seed + r)")
    group.add_argument("--max_bad_steps", type=positive_int, default=5,
                       help="stop (exit 1) after this many consecutive optimizer steps with a NaN/inf loss or "
                            "skipped for non-finite gradients")

    group = parser.add_argument_group("precision and speed")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="autocast dtype (default: float32 on CPU, bfloat16 on GPUs that have it, else float16)")
    group.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    group.add_argument("--use_compile", type=_compile_setting, nargs="?", const=1, default="auto",
                       help="torch.compile the model: 1, 0, or auto = when the measured eager step "
                            "time x the steps left repays the compile time (see the log line)")
    group.add_argument("--ddp_timeout", type=positive_float, default=1800.0,
                       help="seconds a collective may wait for the other ranks before failing")

    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--save_dir", default="out", help="run directory: checkpoints, metrics, weights")
    group.add_argument("--save_weight", default="pretrain",
                       help="name prefix of the MiniMind weights file {save_weight}_{hidden_size}[_moe].pth")
    group.add_argument("--save_interval", type=non_negative_int, default=None,
                       help="checkpoint every N optimizer steps, and at the end (0: only at the end; "
                            "default: 100 for demo, 1000 otherwise)")
    group.add_argument("--keep_checkpoints", type=positive_int, default=3,
                       help="keep this run's newest K checkpoints (and always its newest healthy one)")
    group.add_argument("--from_resume", type=_resume_mode, nargs="?", const="1", default="0",
                       help="1: continue the run in --save_dir from its newest healthy checkpoint (an error if "
                            "there is none); auto: continue it if there is one, else start fresh; 0: start "
                            "fresh (an error if --save_dir already holds a run)")
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
    group.add_argument("--tracker", choices=("none", "wandb", "swanlab", "tensorboard"), default="none",
                       help="experiment tracker (TensorBoard also logs whenever it is installed)")
    switch(group, "--use_wandb", 0, "MiniMind's spelling of --tracker wandb")
    group.add_argument("--wandb_project", default="minimind_fast", help="tracker project name (wandb, swanlab)")
    group.add_argument("--run_name", default=None, help="tracker run name (default: the run id)")
    group.add_argument("--sample_prompt", default="The",
                       help="prompt of the sample printed at the end of training")
    group.add_argument("--sample_tokens", type=non_negative_int, default=48,
                       help="tokens generated for the final sample (0: no sample)")
    return parser


def parse_args(argv: Optional[list[str]] = None, make_parser=build_parser) -> tuple[argparse.Namespace, set[str]]:
    """(flags, names of the flags given on the command line). Checks what needs no device or
    data; exits 2 with one line on bad values."""
    parser = make_parser()
    args = parser.parse_args(argv)
    typed_only = make_parser()  # the same flags with no defaults: it sees only what was typed
    for action in typed_only._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(typed_only.parse_args(argv)))
    if args.use_wandb:
        args.tracker = "wandb"
    if args.preset is None and explicit & set(MINIMIND_MODEL_FLAGS):  # MiniMind's own model
        args.preset = "minimind3-moe" if args.use_moe else "minimind3"
    conflict = minimind_recipe_conflict(args, explicit)
    if conflict:
        fail(conflict, parser.prog)
    if args.min_lr is not None and args.learning_rate is not None and args.min_lr > args.learning_rate:
        fail(f"--min_lr {args.min_lr} exceeds --learning_rate {args.learning_rate}; use a smaller --min_lr", parser.prog)
    if args.tracker in ("wandb", "swanlab"):
        try:
            __import__(args.tracker)
        except ImportError:
            fail(f"--tracker {args.tracker} needs the {args.tracker} package: pip install {args.tracker}", parser.prog)
    if not args.save_weight or any(c in args.save_weight for c in "/\\"):
        fail(f"--save_weight {args.save_weight!r} must be a plain file-name prefix such as 'pretrain'", parser.prog)
    return args, explicit


def minimind_recipe_conflict(args: argparse.Namespace, explicit: set[str]) -> Optional[str]:
    """The error for a schedule flag given with --recipe minimind, else None: MiniMind's LR
    formula has no warmup and ends at learning_rate / 10, so these are refused, not half applied."""
    if args.recipe != "minimind":
        return None
    for name in ("warmup_steps", "warmup_ratio"):
        if name in explicit and getattr(args, name):
            return (f"--{name} {getattr(args, name)}: --recipe minimind uses MiniMind's schedule, "
                    "which has no warmup; drop the flag or use --recipe default")
    if "min_lr" in explicit:
        return (f"--min_lr {args.min_lr}: --recipe minimind decays to learning_rate / 10 as "
                "MiniMind does; drop the flag or use --recipe default")
    return None


def fill_recipe_defaults(args: argparse.Namespace, recipe: str) -> None:
    for name, value in RECIPES[recipe].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def apply_preset_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left at None from the preset's training defaults and the recipe's
    (args.preset is set)."""
    defaults = PRESET_DEFAULTS.get(args.preset, PRESET_DEFAULTS["default"])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    fill_recipe_defaults(args, args.recipe)
    if args.min_lr is None:
        args.min_lr = args.learning_rate / 10
    elif args.min_lr > args.learning_rate:
        raise ValueError(f"--min_lr {args.min_lr} exceeds --learning_rate {args.learning_rate}; use a smaller --min_lr")
    return args


def resume_flags(args: argparse.Namespace, explicit: set[str], saved: dict, source: str,
                 log=print) -> argparse.Namespace:
    """The flags of a resumed run: those saved in `source`, then each flag given again on the
    command line, applied with a note, or refused (ValueError) where it would change the model or
    the data stream under the saved position."""
    resolved = argparse.Namespace(**vars(args))
    # A checkpoint saved before a flag existed was trained with the default recipe's value.
    saved = {**RECIPES["default"], "recipe": "default", **saved}
    for name, value in saved.items():
        if hasattr(resolved, name) and name not in NOT_SAVED:
            setattr(resolved, name, value)
    if args.from_weight.lower() != "none" and "from_weight" in explicit:
        raise ValueError(f"--from_weight {args.from_weight} is not used when resuming (the run continues from "
                         f"{source}); drop it, or start a new run in another --save_dir to begin from those weights")
    for name in sorted(explicit - set(NOT_SAVED)):
        old, new = saved.get(name, getattr(args, name)), getattr(args, name)
        setattr(resolved, name, new)
        if name == "use_wandb" or old == new or (name == "data_path" and _same_path(old, new)):
            continue
        if name in RESUME_REFUSED:
            raise ValueError(f"--{name} {new}: {source} was trained with --{name} {old}, and "
                             "changing it would change the model, the data or the optimizer under "
                             "the saved position; drop the flag to resume, or start a new run "
                             "(another --save_dir) with --from_weight to begin from its weights")
        if name in RESUME_REGROUPS:
            log(f"warning: --{name} {old} -> {new}: the data order is kept but the global batch changes, "
                "so this run is no longer bit-identical to an uninterrupted one")
        else:
            log(f"note: --{name} {old} -> {new} (was {old} in {source})")
    conflict = minimind_recipe_conflict(resolved, explicit)
    if conflict:
        raise ValueError(conflict)
    if resolved.recipe == "minimind":  # MiniMind's floor follows the learning rate
        resolved.min_lr = resolved.learning_rate / 10
    if resolved.min_lr > resolved.learning_rate:
        raise ValueError(f"--min_lr {resolved.min_lr} exceeds --learning_rate {resolved.learning_rate}; "
                         "use a smaller --min_lr")
    return resolved


def _same_path(a, b) -> bool:
    return a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_model_flags(args: argparse.Namespace) -> None:
    """ValueError when --hidden_size cannot be split into the preset's attention heads (there is
    no head-count flag: the fix is another --hidden_size)."""
    values = PRESETS[args.preset]
    heads = values.get("num_attention_heads", MiniMindConfig.num_attention_heads)
    if args.hidden_size is None or "head_dim" in values:
        return
    if args.hidden_size % (2 * heads):
        multiple = 2 * heads
        below, above = args.hidden_size // multiple * multiple, (args.hidden_size // multiple + 1) * multiple
        raise ValueError(f"--hidden_size {args.hidden_size} gives head_dim={args.hidden_size / heads:g} with the "
                         f"{args.preset} preset's {heads} attention heads, but head_dim must be a whole even number; "
                         f"use a multiple of {multiple} (e.g. --hidden_size "
                         f"{f'{below} or {above}' if below else above})")
