"""Sample text from a trained checkpoint, or chat with a fine-tuned one.

    python -m minimind_fast.generate --ckpt PATH --prompt TEXT
    python -m minimind_fast.generate --ckpt PATH --chat [--prompt TEXT] [--system TEXT]
    python -m minimind_fast.generate --ckpt PATH --score default|FILE --temperature 0

PATH is a run directory (--save_dir of pretrain: its newest complete checkpoint), a checkpoint
directory, a directory written by minimind_fast.export, or a weights file (.safetensors, or
MiniMind's .pth). The model config comes from the config.json next to the weights (or --preset
for bare MiniMind files), the tokenizer from the tokenizer.json saved with the run (or
--tokenizer_path). A prompt longer than the context window keeps its most recent part, and
--max_new_tokens is capped to what the window holds; each is said in one `note:` line on stderr.

--chat renders the conversation with the ChatML template of SFT and streams each reply: the
user messages are --prompt (one turn), else the lines of standard input (a `> ` prompt on a
terminal; an empty line is skipped). A conversation that outgrows the context window
(--max_context, default the model's) loses its oldest exchanges. --score asks the model every
question of an SFT JSONL file (`default`: the held-out part of the default SFT set) and prints
the mean token F1 and ROUGE-L of its replies against the reference answers.
Loading, sampling and chat live in minimind_fast.inference; this module is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .config import PRESETS
from .corpus_sft import build_default_sft_set
from .dtypes import resolve_device
from .inference import (
    ChatSession,
    check_prompt,
    load_for_inference,
    print_note,
    sample_text,
    score_answers,
)
from .sampling import check_sampling

DEFAULT_PROMPT = "The"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minimind_fast.generate",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        help="run directory, checkpoint directory, or .safetensors/.pth file",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"text to continue (default: {DEFAULT_PROMPT!r}); with --chat, the "
        "one user message (default: read messages from standard input)",
    )
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=64,
        help="tokens to generate (capped to what the context window holds)",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument(
        "--top_k", type=int, default=40, help="keep the k most likely tokens (0: all)"
    )
    parser.add_argument(
        "--top_p", type=float, default=None, help="nucleus sampling threshold in (0, 1]"
    )
    parser.add_argument(
        "--repetition_penalty", type=float, default=1.1, help="> 1 discourages repeats"
    )
    parser.add_argument("--num_samples", type=int, default=1, help="samples to draw")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="model config for bare MiniMind .pth files",
    )
    parser.add_argument(
        "--tokenizer_path",
        default=None,
        help="tokenizer directory (default: the one saved with the run)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu or cuda[:N] (default: cuda if available)"
    )
    group = parser.add_argument_group("chat (models fine-tuned with minimind_fast.sft)")
    group.add_argument(
        "--chat",
        action="store_true",
        help="chat: the ChatML template, streamed replies, a kept conversation",
    )
    group.add_argument("--system", default=None, help="system prompt of the chat")
    group.add_argument(
        "--max_context",
        type=int,
        default=None,
        help="context window of the chat in tokens (default: the model's "
        "max_position_embeddings); older exchanges are dropped to fit",
    )
    group.add_argument(
        "--score",
        default=None,
        metavar="FILE",
        help="score replies to the questions of an SFT JSONL file against its "
        "answers (token F1, ROUGE-L); 'default': the default set's held-out "
        "part",
    )
    group.add_argument(
        "--score_limit", type=int, default=None, help="score at most this many questions"
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One-line ValueError for a flag that cannot work, before any weights are read."""
    for flag in ("max_new_tokens", "num_samples", "score_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)} must be >= 1")
    if args.chat and args.score:
        raise ValueError("--chat and --score are separate modes; pass one of them")
    for flag in ("system", "max_context"):
        if getattr(args, flag) is not None and not args.chat:
            raise ValueError(f"--{flag} is a chat setting; add --chat")
    check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    for text in (args.prompt, args.system):
        if text is not None:
            check_prompt(text)


def _quiet(note: str) -> None:
    """Notes are said once, for the first sample."""


def sampling(args: argparse.Namespace) -> dict:
    return dict(
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def read_messages(interactive: bool):
    """The lines of standard input, each after a `> ` prompt on a terminal."""
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def chat(model, tokenizer, args: argparse.Namespace, prog: str) -> int:
    """Answer each user message (--prompt, else stdin lines), streaming the reply. A message that
    cannot be answered is a one-line error and is left out; the exit code is then 2."""
    session = ChatSession(
        model,
        tokenizer,
        args.system,
        args.max_new_tokens,
        args.max_context,
        args.seed,
        **sampling(args),
    )
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        print("chat: type a message and press Enter; Ctrl-D ends", file=sys.stderr, flush=True)
    failed = False
    try:
        for user in [args.prompt] if args.prompt is not None else read_messages(interactive):
            if not user.strip():
                continue
            try:
                session.reply(user, write)
            except ValueError as error:
                print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
                failed = True
                continue
            write("\n")
    except KeyboardInterrupt:
        write("\n")
        return 130
    return 2 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        device = resolve_device(args.device)
        model, tokenizer = load_for_inference(args.ckpt, device, args.preset, args.tokenizer_path)
        if args.chat:
            return chat(model, tokenizer, args, parser.prog)
        if args.score:
            path = build_default_sft_set().val if args.score == "default" else args.score
            scores = score_answers(
                model,
                tokenizer,
                path,
                args.max_new_tokens,
                args.score_limit,
                args.seed,
                **sampling(args),
            )
            print(json.dumps({"file": str(path), **scores}), flush=True)
            return 0
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        for index in range(args.num_samples):
            text = sample_text(
                model,
                tokenizer,
                prompt,
                args.max_new_tokens,
                args.temperature,
                args.top_k or None,
                args.top_p,
                args.repetition_penalty,
                args.seed + index,
                note=print_note if index == 0 else _quiet,
            )
            print(text if args.num_samples == 1 else f"--- sample {index + 1}\n{text}", flush=True)
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
