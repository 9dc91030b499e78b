"""Shared fixtures of the training-loop tests: a tiny synthetic corpus, a tiny tokenizer, and the
flags of a tiny model (hidden 32, 2 layers, seq 32) so a pretrain run takes seconds on 2 cores."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

WORDS = ("the model reads a token and writes the next one while the loss falls slowly over many steps "
         "because gradients point downhill so small networks learn short patterns from plain english text "
         "every document starts with a marker and ends with another marker").split()
VOCAB_SIZE = 320


def write_corpus(path: Path, num_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(num_docs):
            sentences = []
            for _ in range(rng.randint(2, 6)):
                start = rng.randrange(len(WORDS) - 8)
                sentences.append(" ".join(WORDS[start:start + rng.randint(4, 8)]).capitalize() + ".")
            handle.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def make_assets(root: Path) -> dict[str, Path]:
    """Corpus + tokenizer under `root` (the token cache goes to $MINIMIND_FAST_CACHE)."""
    from minimind_fast.tokenizer import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    data = write_corpus(root / "tiny.jsonl")
    tokenizer = train_tokenizer([data], VOCAB_SIZE, root / "tokenizer")
    return {"data": data, "tokenizer": tokenizer, "cache": root / "cache"}


def tiny_flags(assets: dict[str, Path], save_dir: Path, **overrides) -> list[str]:
    """argv for minimind_fast.pretrain: a tiny model on the tiny corpus; overrides win."""
    flags = dict(preset="demo", hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB_SIZE, max_seq_len=32,
                 batch_size=4, accumulation_steps=1, learning_rate=1e-2, warmup_steps=2,
                 data_path=assets["data"], tokenizer_path=assets["tokenizer"], save_dir=save_dir,
                 log_interval=1, save_interval=0, eval_interval=0, sample_tokens=0, device="cpu", seed=3)
    flags.update(overrides)
    argv = []
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny corpus and tokenizer; token caches go to a temp $MINIMIND_FAST_CACHE, not ~/.cache."""
    root = tmp_path_factory.mktemp("pretrain_assets")
    previous = os.environ.get("MINIMIND_FAST_CACHE")
    os.environ["MINIMIND_FAST_CACHE"] = str(root / "cache")
    try:
        yield make_assets(root)
    finally:
        if previous is None:
            os.environ.pop("MINIMIND_FAST_CACHE", None)
        else:
            os.environ["MINIMIND_FAST_CACHE"] = previous
