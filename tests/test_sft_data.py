"""SFT data: conversation validation, ChatML ids against transformers' chat template, the loss
mask against MiniMind's rule, and the SFT token cache (build, reuse, rebuild, races, bad lines)."""

import json
import logging
import pickle
import threading

import numpy as np
import pytest
from minimind_sft_oracle import minimind_labels
from sft_helpers import random_conversations, train_small_tokenizer, write_jsonl

from minimind_fast.constants import BOS_TOKEN_ID, EOS_TOKEN_ID
from minimind_fast.data import sft_cache as sft_cache_module
from minimind_fast.data.reader import DataError
from minimind_fast.data.sft_cache import build_sft_cache
from minimind_fast.data.sft_format import (
    EMPTY_CONTENT,
    EMPTY_CONVERSATION,
    MISSING_CONTENT,
    MISSING_ROLE,
    NO_ASSISTANT,
    NO_CONVERSATION,
    NON_STRING_CONTENT,
    NOT_AN_OBJECT,
    SPECIAL_IN_CONTENT,
    UNKNOWN_ROLE,
    conversation_problem,
    to_messages,
)
from minimind_fast.data.sft_template import ChatTemplateEncoder
from minimind_fast.data.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"


def chat(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


FIXED = {
    "single": chat((USER, "what does the function return ?"), (ASSISTANT, "it returns none .")),
    "system": chat((SYSTEM, "def x = y"), (USER, "数据 ?"), (ASSISTANT, "模型 🤖 returns 1")),
    "multi_turn": chat(
        (USER, "what"),
        (ASSISTANT, "none"),
        (USER, "the list ?"),
        (ASSISTANT, "it is empty"),
        (USER, "and ?"),
        (ASSISTANT, "an error ."),
    ),
    "newlines": chat((USER, "line one\nline two\n"), (ASSISTANT, "a\n\nb\n")),
    "user_last": chat((USER, "what"), (ASSISTANT, "none"), (USER, "unanswered")),
    "assistant_first": chat((ASSISTANT, "hello , what does the function return ?")),
}
LEADING_SPACE = {
    "spaces": chat((USER, "what ?"), (ASSISTANT, "  indented line")),
    "newline": chat((USER, "what ?"), (ASSISTANT, "\n  more")),
    "tab": chat((USER, "what ?"), (ASSISTANT, "\t returns")),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("sft_tok"))


@pytest.fixture(scope="module")
def encoder(tok_dir):
    return ChatTemplateEncoder(load_tokenizer(tok_dir))


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def hf_ids(hf_tokenizer, messages, add_generation_prompt=False):
    out = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def labels_of(encoded):
    return np.where(encoded.scored, encoded.ids, -100).tolist()


def oracle_labels(hf_tokenizer, ids):
    def ids_of(text):
        return hf_tokenizer(text, add_special_tokens=False)["input_ids"]

    return minimind_labels(ids, ids_of("<|im_start|>assistant\n"), ids_of("<|im_end|>\n"))


# ---------------------------------------------------------------------------------------------
# Rendering: exactly the ids of transformers' apply_chat_template.

ALL_CASES = {
    **FIXED,
    **LEADING_SPACE,
    **{f"random{i}": c["conversations"] for i, c in enumerate(random_conversations(12))},
}


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_ids_equal_hf_apply_chat_template(encoder, hf_tokenizer, name):
    messages = ALL_CASES[name]
    assert encoder.encode(messages).ids.tolist() == hf_ids(hf_tokenizer, messages)
    prompt = messages[:-1] if messages[-1]["role"] == ASSISTANT else messages
    for generation_prompt in (True, False) if prompt else ():
        assert encoder.encode_prompt(prompt, generation_prompt) == hf_ids(
            hf_tokenizer, prompt, generation_prompt
        )


def test_encode_batch_equals_one_by_one(encoder):
    conversations = [to_messages(c) for c in random_conversations(20, seed=3)]
    batch = encoder.encode_batch(conversations)
    for messages, encoded in zip(conversations, batch, strict=True):
        single = encoder.encode(messages)
        assert encoded.ids.tolist() == single.ids.tolist()
        assert encoded.scored.tolist() == single.scored.tolist()
        assert encoded.assistant_ends == single.assistant_ends


# ---------------------------------------------------------------------------------------------
# The loss mask: MiniMind's rule.


@pytest.mark.parametrize("name", sorted(set(ALL_CASES) - set(LEADING_SPACE)))
def test_mask_matches_minimind_rule(encoder, hf_tokenizer, name):
    encoded = encoder.encode(ALL_CASES[name])
    assert labels_of(encoded) == oracle_labels(hf_tokenizer, encoded.ids.tolist())


def test_mask_scores_reply_im_end_and_its_newline_only(encoder):
    messages = FIXED["multi_turn"]
    encoded = encoder.encode(messages)
    tokenizer = encoder.tokenizer
    newline = tokenizer.token_to_id("Ċ")  # byte-level "\n"
    ids, scored = encoded.ids.tolist(), encoded.scored.tolist()
    scored_runs, run = [], []
    for token, is_scored in zip(ids, scored, strict=True):
        if is_scored:
            run.append(token)
        elif run:
            scored_runs.append(run)
            run = []
    if run:
        scored_runs.append(run)
    replies = [m["content"] for m in messages if m["role"] == ASSISTANT]
    assert len(scored_runs) == len(replies)
    for run, reply in zip(scored_runs, replies, strict=True):
        assert run[-2:] == [EOS_TOKEN_ID, newline]  # "<|im_end|>" and the "\n" after it
        assert tokenizer.decode(run[:-2]) == reply
    assert encoded.assistant_ends == [
        i + 1 for i in range(len(ids)) if scored[i] and not (i + 1 < len(ids) and scored[i + 1])
    ]
    assert ids[0] == BOS_TOKEN_ID and not scored[0]


@pytest.mark.parametrize("name", sorted(LEADING_SPACE))
def test_reply_starting_with_whitespace_is_scored(encoder, hf_tokenizer, name):
    """The header's "\\n" and the reply's leading whitespace share a token here; MiniMind's rule
    (which looks for the header's ids) would not score the reply at all."""
    messages = LEADING_SPACE[name]
    encoded = encoder.encode(messages)
    body = encoder.tokenizer.encode(f"assistant\n{messages[-1]['content']}").ids
    header = encoder.headers[ASSISTANT]
    assert body[: len(header)] != header, "the tokenizer must merge across the header here"
    run = encoded.ids[encoded.scored].tolist()
    text = encoder.tokenizer.decode(run[:-2])
    assert text in (messages[-1]["content"], "\n" + messages[-1]["content"])
    assert run[-2] == EOS_TOKEN_ID
    assert not any(
        oracle_labels(hf_tokenizer, encoded.ids.tolist())[i] != -100
        for i in range(len(encoded.ids))
    )


# ---------------------------------------------------------------------------------------------
# Validation of conversations.


def msg(role="user", content="hi"):
    return {"role": role, "content": content}


BAD_RECORDS = [
    ({"text": "pretraining line"}, NO_CONVERSATION),
    ([msg(), msg("assistant")], None),  # a bare list is a valid conversation for the API
    ({"conversations": "user: hi"}, NO_CONVERSATION),
    ({"conversations": []}, EMPTY_CONVERSATION),
    ({"conversations": ["hi", msg("assistant")]}, NOT_AN_OBJECT),
    ({"conversations": [{"content": "hi"}, msg("assistant")]}, MISSING_ROLE),
    ({"conversations": [msg("tool"), msg("assistant")]}, UNKNOWN_ROLE),
    ({"conversations": [msg("User"), msg("assistant")]}, UNKNOWN_ROLE),
    ({"conversations": [msg(["user"]), msg("assistant")]}, UNKNOWN_ROLE),
    ({"conversations": [{"role": "user"}, msg("assistant")]}, MISSING_CONTENT),
    ({"conversations": [msg(content=None), msg("assistant")]}, NON_STRING_CONTENT),
    ({"conversations": [msg(content=["a"]), msg("assistant")]}, NON_STRING_CONTENT),
    ({"conversations": [msg(content=""), msg("assistant")]}, EMPTY_CONTENT),
    ({"conversations": [msg(), msg("assistant", " \n ")]}, EMPTY_CONTENT),
    ({"conversations": [msg(), msg("assistant", "a<|im_end|>b")]}, SPECIAL_IN_CONTENT),
    ({"conversations": [msg(content="<|im_start|>x")]}, SPECIAL_IN_CONTENT),
    ({"conversations": [msg("system"), msg()]}, NO_ASSISTANT),
    ({"messages": [msg(), msg("assistant")]}, None),
    (
        {"conversations": [msg(), {"role": "assistant", "content": "a", "reasoning_content": 1}]},
        None,
    ),
]


@pytest.mark.parametrize("record, problem", BAD_RECORDS)
def test_conversation_problem(record, problem):
    assert conversation_problem(record) == problem
    if problem is not None:
        with pytest.raises(ValueError, match="unusable conversation"):
            to_messages(record)


# ---------------------------------------------------------------------------------------------
# The SFT cache.


@pytest.fixture
def conversations():
    return random_conversations(40, seed=1)


@pytest.fixture
def data_file(tmp_path, conversations):
    return write_jsonl(tmp_path / "sft.jsonl", conversations)


@pytest.fixture
def build_counter(monkeypatch):
    calls = []
    original = sft_cache_module._write_cache
    monkeypatch.setattr(
        sft_cache_module, "_write_cache", lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    )
    return calls


def test_cache_holds_each_conversation_as_encoded(
    tmp_path, data_file, conversations, encoder, tok_dir
):
    cache = build_sft_cache(data_file, tok_dir, tmp_path / "cache", progress=False)
    assert cache.num_docs == len(conversations)
    assert cache.line_numbers.tolist() == list(range(1, len(conversations) + 1))
    assert cache.tokens.dtype == np.uint16
    total_scored = 0
    for index, record in enumerate(conversations):
        expected = encoder.encode(record["conversations"])
        ids, scored = cache.conversation(index)
        assert ids.tolist() == expected.ids.tolist()
        assert scored.astype(bool).tolist() == expected.scored.tolist()
        assert cache.turn_ends(index).tolist() == expected.assistant_ends
        total_scored += int(expected.scored.sum())
    assert cache.num_scored == total_scored


def test_cache_is_independent_of_batch_size(tmp_path, data_file, tok_dir):
    whole = build_sft_cache(data_file, tok_dir, tmp_path / "a", progress=False)
    pieces = build_sft_cache(
        data_file, tok_dir, tmp_path / "b", progress=False, batch_conversations=3
    )
    for name in (
        "tokens",
        "scored",
        "doc_offsets",
        "line_numbers",
        "assistant_ends",
        "assistant_index",
    ):
        assert np.array_equal(getattr(whole, name), getattr(pieces, name)), name


def test_cache_reused_then_rebuilt_on_data_or_tokenizer_change(
    tmp_path, data_file, tok_dir, build_counter
):
    first = build_sft_cache(data_file, tok_dir, tmp_path / "cache", progress=False)
    again = build_sft_cache(data_file, tok_dir, tmp_path / "cache", progress=False)
    assert len(build_counter) == 1 and again.path == first.path
    write_jsonl(data_file, random_conversations(41, seed=2))
    changed = build_sft_cache(data_file, tok_dir, tmp_path / "cache", progress=False)
    assert len(build_counter) == 2 and changed.num_docs == 41
    assert not first.path.exists()  # superseded: same file, same tokenizer
    other_tok = train_small_tokenizer(tmp_path / "other", vocab_size=340)
    build_sft_cache(data_file, other_tok, tmp_path / "cache", progress=False)
    assert len(build_counter) == 3 and changed.path.exists()  # another tokenizer's cache stays


def test_racing_builders_build_once(tmp_path, data_file, tok_dir, build_counter):
    results = [None] * 4

    def build(i):
        results[i] = build_sft_cache(data_file, tok_dir, tmp_path / "cache", progress=False)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(build_counter) == 1
    assert len({r.path for r in results}) == 1


def test_cache_pickles_as_its_path(tmp_path, data_file, tok_dir):
    cache = build_sft_cache(data_file, tok_dir, tmp_path / "cache", progress=False)
    assert len(pickle.dumps(cache)) < 1000
    clone = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(clone.tokens, cache.tokens) and clone.num_docs == cache.num_docs


def test_failed_build_leaves_nothing(tmp_path, data_file, tok_dir, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sft_cache_module.ChatTemplateEncoder, "encode_batch", disk_full)
    with pytest.raises(DataError, match="disk full: writing the SFT cache of sft.jsonl") as error:
        build_sft_cache(data_file, tok_dir, tmp_path / "cache", progress=False)
    assert "\n" not in str(error.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_bad_lines_are_skipped_and_reported(tmp_path, tok_dir, caplog):
    good = random_conversations(3, seed=4)
    lines = [
        json.dumps(good[0]),
        "{not json",
        json.dumps({"conversations": [msg("tool")]}),
        "",
        json.dumps(good[1]),
        json.dumps({"conversations": [msg(), msg("system")]}),
        json.dumps({"messages": [msg(), msg("assistant", 5)]}),
        json.dumps(good[2]),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="minimind_fast.data"):
        cache = build_sft_cache(path, tok_dir, tmp_path / "cache", progress=False)
    assert cache.line_numbers.tolist() == [1, 5, 8]
    assert cache.meta["skipped"] == {
        "malformed JSON": {"count": 1, "first_lines": [2]},
        UNKNOWN_ROLE: {"count": 1, "first_lines": [3]},
        NO_ASSISTANT: {"count": 1, "first_lines": [6]},
        NON_STRING_CONTENT: {"count": 1, "first_lines": [7]},
    }
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(path) in warning and "(line 3)" in warning and "(line 6)" in warning


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"conversations": [msg()]}] * 3, "no usable conversations in .*3 no assistant turn"),
        ([{"text": "a"}], 'no usable conversations in .*no "conversations"'),
    ],
)
def test_file_without_usable_conversation_is_one_line_error(tmp_path, tok_dir, records, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=message) as error:
        build_sft_cache(path, tok_dir, tmp_path / "cache", progress=False)
    assert "\n" not in str(error.value)
    assert not any((tmp_path / "cache").rglob("meta.json"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("chat.txt", "user: hi\n", "SFT data must be JSONL"),
        ("empty.jsonl", "", "empty"),
        ("missing.jsonl", None, "not found"),
    ],
)
def test_unusable_file_raises_before_tokenising(tmp_path, tok_dir, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        build_sft_cache(path, tok_dir, tmp_path / "cache", progress=False)
