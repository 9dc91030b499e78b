"""Shared by the SFT tests: a small tokenizer, random conversations, JSONL writers."""

from __future__ import annotations

import json
import random

from minimind_fast.data.tokenizer import train_tokenizer

WORDS = (
    "what does the function return when the list is empty ? it returns none and raises "
    "an error otherwise . 数据 模型 🤖 x = y + 1 def"
).split()
# Indented lines teach the tokenizer merges such as "\n " and "\n\n", so a reply that starts
# with whitespace can share a token with its header's "\n".
INDENTED = "system user assistant\n  indented line\n\n  more\n    deeper\n\t\ttabbed "
TOKENIZER_TEXTS = [INDENTED + " ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 8


def write_jsonl(path, records):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def train_small_tokenizer(root, vocab_size=360):
    root.mkdir(parents=True, exist_ok=True)
    texts = write_jsonl(root / "tokenizer_texts.jsonl", [{"text": t} for t in TOKENIZER_TEXTS])
    return train_tokenizer([texts], vocab_size, root / "tokenizer")


def sentence(rng, low=1, high=12):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def random_conversation(rng: random.Random, turns=None, system=None, reply_words=(1, 12)):
    """{"conversations": [system?, (user, assistant) * turns]} with random words."""
    turns = rng.randint(1, 3) if turns is None else turns
    system = rng.random() < 0.3 if system is None else system
    messages = [{"role": "system", "content": sentence(rng)}] if system else []
    for _ in range(turns):
        messages.append({"role": "user", "content": sentence(rng)})
        messages.append({"role": "assistant", "content": sentence(rng, *reply_words)})
    return {"conversations": messages}


def random_conversations(n, seed=0, **kwargs):
    rng = random.Random(seed)
    return [random_conversation(rng, **kwargs) for _ in range(n)]
