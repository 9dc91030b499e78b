"""The default SFT set: size, format, the held-out split by question, reuse, failed builds."""

import json
import os
import subprocess
import sys

import pytest
from sft_helpers import train_small_tokenizer

from minimind_fast import corpus_sft
from minimind_fast.corpus_sft import (
    QUESTIONS,
    SYSTEM_PROMPT,
    build_default_sft_set,
    conversation,
    first_paragraph,
    is_validation,
)
from minimind_fast.data.reader import DataError
from minimind_fast.data.sft_cache import build_sft_cache
from minimind_fast.data.sft_datasets import SFTPackedDataset
from minimind_fast.data.sft_format import conversation_problem


@pytest.fixture(scope="module")
def sft_set(tmp_path_factory):
    return build_default_sft_set(tmp_path_factory.mktemp("sft_set") / "set")


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_size_and_format(sft_set):
    train, val = records(sft_set.train), records(sft_set.val)
    assert 1000 <= len(train) <= 10000 and 50 <= len(val) <= len(train) // 5
    meta = json.loads((sft_set.directory / "meta.json").read_text())
    assert (meta["train"], meta["val"]) == (len(train), len(val))
    with_system = 0
    for record in train + val:
        assert conversation_problem(record) is None
        roles = [m["role"] for m in record["conversations"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        with_system += roles[0] == "system"
    assert 0.1 < with_system / len(train + val) < 0.3
    questions = {m["content"] for r in train for m in r["conversations"] if m["role"] == "user"}
    assert any(
        "`len`" in q for q in questions | {m["content"] for r in val for m in r["conversations"]}
    )


def test_held_out_questions_and_answers_never_appear_in_training(sft_set):
    def contents(path, role):
        return [
            m["content"] for r in records(path) for m in r["conversations"] if m["role"] == role
        ]

    for role in ("user", "assistant"):
        train, val = contents(sft_set.train, role), contents(sft_set.val, role)
        assert not set(train) & set(val)
        assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert all(is_validation(a) for a in contents(sft_set.val, "assistant"))
    assert not any(is_validation(a) for a in contents(sft_set.train, "assistant"))


def test_tokenises_within_one_row(sft_set, tmp_path):
    cache = build_sft_cache(
        sft_set.train, train_small_tokenizer(tmp_path), tmp_path / "cache", progress=False
    )
    packed = SFTPackedDataset(cache, None, 512)
    assert len(packed.doc_ids) == cache.num_docs  # no conversation is cut away
    assert cache.num_scored > cache.num_tokens // 4


def test_reused_once_built(sft_set, monkeypatch):
    monkeypatch.setattr(corpus_sft, "_write_set", lambda directory: pytest.fail("rebuilt"))
    assert build_default_sft_set(sft_set.directory) == sft_set


@pytest.mark.parametrize(
    "failure, error, message",
    [
        (
            OSError(28, "No space left on device"),
            DataError,
            "disk full: writing the default SFT set",
        ),
        ([], RuntimeError, "the default SFT set came out empty"),
    ],
)
def test_failed_build_leaves_nothing(tmp_path, monkeypatch, failure, error, message):
    def collect():
        if isinstance(failure, Exception):
            raise failure
        return failure

    monkeypatch.setattr(corpus_sft, "collect_pairs", collect)
    with pytest.raises(error, match=message):
        build_default_sft_set(tmp_path / "set")
    assert list(tmp_path.iterdir()) == []


def test_first_paragraph():
    assert (
        first_paragraph("Return the\n    number of items.\n\nMore.")
        == "Return the number of items."
    )
    assert (
        first_paragraph("int([x]) -> integer\nint(x, base=10) -> integer\n\nConvert x.")
        == "Convert x."
    )
    assert first_paragraph("zip(*iterables) --> Yield tuples.\n\nMore.") == "More."
    assert first_paragraph("Split a path:\n\n  a/b") == "Split a path."
    assert first_paragraph("  \n\n") is None


SUBJECTS = [("function", f"json.f{i}", f"Answer number {i} of the set.") for i in range(30)]
CHOICES = (
    "from minimind_fast.corpus_sft import conversation, is_validation\n"
    "print(repr([(conversation(*s), is_validation(s[2])) for s in {subjects!r}]))"
)


def test_choices_are_the_same_in_every_process():
    """Questions, system prompts and the split come from a stable hash, not Python's hash()."""
    here = [(conversation(*s), is_validation(s[2])) for s in SUBJECTS]
    code = CHOICES.format(subjects=SUBJECTS)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    there = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert repr(here) == there.strip()
    questions = {c["conversations"][-2]["content"] for c, _ in here}
    assert len(questions) > 1 and questions <= {
        q.format(s[1]) for s in SUBJECTS for q in QUESTIONS["function"]
    }
    assert {len(c["conversations"]) for c, _ in here} == {2, 3}
    assert all(
        c["conversations"][0]["content"] == SYSTEM_PROMPT
        for c, _ in here
        if len(c["conversations"]) == 3
    )
