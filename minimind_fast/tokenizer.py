"""Train a byte-level BPE tokenizer with MiniMind's special tokens from the command line:

    python -m minimind_fast.tokenizer --data FILE [FILE ...] --vocab_size 6400 --out DIR

The library lives in `minimind_fast.data.tokenizer` (its names are re-exported here). Unusable
lines of the data files are skipped and reported per file with their line numbers; a user error
is one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .data.tokenizer import default_tokenizer_path, load_tokenizer, tokenizer_file, train_tokenizer

__all__ = ["default_tokenizer_path", "load_tokenizer", "main", "tokenizer_file", "train_tokenizer"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minimind_fast.tokenizer",
        description=__doc__.splitlines()[0].rstrip(":") + ".",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        type=Path,
        help='.jsonl files ({"text": ...} per line) or .txt files (blank-line separated)',
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=6400,
        help="vocabulary size incl. special tokens (MiniMind: 6400)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory for tokenizer.json + tokenizer_config.json",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")  # the reader's skipped-lines summary, one per file
    try:
        out = train_tokenizer(args.data, args.vocab_size, args.out)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    vocab = load_tokenizer(out).get_vocab_size()
    print(f"wrote {out / 'tokenizer.json'} ({vocab} tokens) and {out / 'tokenizer_config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
