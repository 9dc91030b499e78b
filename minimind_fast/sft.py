"""Supervised fine-tuning: `python -m minimind_fast.sft` or
`torchrun --nproc_per_node=N -m minimind_fast.sft`.

The pretraining loop (minimind_fast.pretrain: AMP + GradScaler, accumulation with no_sync,
warmup-cosine LR, DDP, atomic checkpoints, exact resume, health policy, signals) run on
conversations: MiniMind's SFT JSONL rendered with the ChatML template, loss on the assistant
replies only, conversations packed into rows that attend only within themselves (--packing 0:
one padded conversation per row). It starts from a pretrained model (--from_weight, default the
pretraining run directory `out`) and its tokenizer, with SFT's smaller learning rate, and ends
by answering a held-out question. Follows MiniMind's trainer/train_full_sft.py; the data side
is minimind_fast/train/sft_data.py. With no --data_path it trains on the default offline set
(questions about Python's standard library, answered from its documentation).
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from . import pretrain
from .data.sft_template import ChatTemplateEncoder
from .train import cli
from .train.sft_data import build_sft_data

PROG = "python -m minimind_fast.sft"
# A new run's defaults where SFT differs from pretraining (the flags typed always win): a smaller
# learning rate (MiniMind's SFT uses 1e-5 after 5e-4 pretraining), two epochs, one batch per step.
PRESET_DEFAULTS = {
    "demo": dict(
        learning_rate=2e-3, epochs=2, eval_interval=50, save_interval=100, log_interval=10
    ),
    "default": dict(learning_rate=1e-5, epochs=2, batch_size=16, accumulation_steps=1),
}
DEFAULTS = dict(
    save_dir="out_sft",
    save_weight="full_sft",
    from_weight="out",
    sample_prompt=None,
    sample_tokens=64,
)
HELP = {
    "data_path": 'SFT JSONL, one {"conversations": [{"role": "system"|"user"|"assistant", '
    '"content": ...}, ...]} per line ("messages" also works); default: questions '
    "about Python's standard library answered from its docs, with a held-out file",
    "tokenizer_path": "directory with tokenizer.json (default: the one saved with --from_weight)",
    "from_weight": "the pretrained model to fine-tune: a run directory (its newest checkpoint), a "
    "checkpoint or exported directory, a .safetensors/.pth file, or a MiniMind "
    "prefix {save_dir}/{from_weight}_{hidden_size}.pth ('none': random init)",
    "save_dir": "run directory of the fine-tuned model: checkpoints, metrics, weights",
    "save_weight": "name prefix of the MiniMind weights file {save_weight}_{hidden_size}[_moe].pth",
    "learning_rate": "peak learning rate (default: 2e-3 for demo, 1e-5 otherwise)",
    "epochs": "passes over the training conversations (default: 2)",
    "batch_size": "rows per micro-batch per process (default: 8 for demo, 16 otherwise)",
    "accumulation_steps": "micro-batches per optimizer step (default: 1)",
    "packing": "pack whole conversations into full rows, each attending only within itself (0: "
    "one conversation per row, padded, as MiniMind)",
    "val_fraction": "fraction of --data_path's conversations held out for the validation loss (0 "
    "disables it; the default set has its own held-out file)",
    "add_special_tokens": "not used by SFT: the chat template places <|im_start|>/<|im_end|>",
    "log_interval": "log every N optimizer steps (default: 10 for demo, 100 otherwise)",
    "eval_interval": "validation loss every N optimizer steps and at the end (0: only at the end; "
    "default: 50 for demo, 500 otherwise)",
    "sample_prompt": "question answered at the end of training (default: the first held-out one)",
    "sample_tokens": "tokens of the final answer (0: none)",
}


def build_parser() -> cli.ArgumentParser:
    parser = cli.build_parser(
        PROG,
        "Supervised fine-tuning of a MiniMind-family model on "
        "conversations (single process or torchrun DDP).",
    )
    for action in parser._actions:  # not set_defaults: parse_args must still see what was typed
        action.default = DEFAULTS.get(action.dest, action.default)
        action.help = HELP.get(action.dest, action.help)
    return parser


def fresh_defaults(args, explicit: set[str]) -> None:
    """SFT's defaults for a new run, over the pretraining ones the preset filled in."""
    for name, value in PRESET_DEFAULTS.get(args.preset, PRESET_DEFAULTS["default"]).items():
        if name not in explicit:
            setattr(args, name, value)
    if "min_lr" not in explicit:
        args.min_lr = args.learning_rate / 10
    elif args.min_lr > args.learning_rate:
        raise ValueError(
            f"--min_lr {args.min_lr} exceeds --learning_rate {args.learning_rate}; "
            "use a smaller --min_lr"
        )


def chat_prompt(tokenizer, question: str) -> list[int]:
    """Ids of `question` as a user message, then the assistant header to answer after."""
    return ChatTemplateEncoder(tokenizer).encode_prompt([("user", question)])


SFT = pretrain.Task(PROG, build_parser, build_sft_data, chat_prompt, fresh_defaults)


def main(argv=None) -> int:
    return pretrain.main(argv, SFT)


if __name__ == "__main__":
    sys.exit(record(main)())  # record: under torchrun a rank's traceback reaches the launcher
