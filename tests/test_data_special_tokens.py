"""BOS/EOS in the token cache (add_special_tokens auto/always/never), special-token strings written
inside a text (split or keep), and padded rows that are MiniMind's exactly."""

import json

import numpy as np
import pytest
import torch
from test_data import make_texts, write_jsonl

from minimind_fast.constants import BOS_TOKEN_ID, EOS_TOKEN_ID, IGNORE_INDEX, PAD_TOKEN_ID
from minimind_fast.data import DataError, PackedDataset, PaddedDataset, build_token_cache
from minimind_fast.data.encoding import split_at_special_tokens
from minimind_fast.data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_tokenizer([write_jsonl(root / "train.jsonl", make_texts(200))], 300, root / "tok")


BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
MARKED = f"{BOS}the model reads tokens and predicts the next one{EOS}"  # MiniMind2's pretrain_hq
# One pretrain_hq line often joins several marked texts.
JOINED = f"{BOS}the model reads tokens{EOS} {BOS}gradients flow back through every layer{EOS}"
SCRAPED = f"the model reads {EOS} tokens and {PAD} predicts the next one"


def build(tmp_path, tok_dir, texts, name="data.jsonl", **modes):
    return build_token_cache(
        write_jsonl(tmp_path / name, texts), tok_dir, tmp_path / "cache", progress=False, **modes
    )


def ids(tok_dir, text):
    return load_tokenizer(tok_dir).encode(text, add_special_tokens=False).ids


def docs(cache):
    return [cache.doc(d).tolist() for d in range(cache.num_docs)]


def test_marked_text_is_not_wrapped_twice_by_default(tmp_path, tok_dir):
    body = ids(tok_dir, "the model reads tokens and predicts the next one")
    plain = "gradients flow back"
    cache = build(tmp_path, tok_dir, [MARKED, plain, f"{BOS}{plain}", f"{plain}{EOS}"])
    wrapped = [BOS_TOKEN_ID] + ids(tok_dir, plain) + [EOS_TOKEN_ID]
    assert docs(cache) == [[BOS_TOKEN_ID] + body + [EOS_TOKEN_ID], wrapped, wrapped, wrapped]
    for T in (4, 9, 64):
        rows = [PaddedDataset(cache, None, T)[i]["input_ids"].tolist() for i in range(4)]
        packed = PackedDataset(cache, None, 4)
        rows += [packed[i]["input_ids"].tolist() for i in range(len(packed))]
        stream = [t for row in rows for t in row]
        assert all(row[0] == BOS_TOKEN_ID != row[1] for row in rows[:4])
        for a, b in zip(stream[:-1], stream[1:], strict=True):
            assert (a, b) not in ((BOS_TOKEN_ID, BOS_TOKEN_ID), (EOS_TOKEN_ID, EOS_TOKEN_ID))


def test_always_and_never(tmp_path, tok_dir):
    body = ids(tok_dir, "the model reads tokens and predicts the next one")
    plain = ids(tok_dir, "gradients flow back")
    always = build(tmp_path, tok_dir, [MARKED, "gradients flow back"], add_special_tokens="always")
    assert docs(always) == [
        [BOS_TOKEN_ID, BOS_TOKEN_ID] + body + [EOS_TOKEN_ID, EOS_TOKEN_ID],
        [BOS_TOKEN_ID] + plain + [EOS_TOKEN_ID],
    ]
    never = build(tmp_path, tok_dir, [MARKED, "gradients flow back"], add_special_tokens="never")
    assert docs(never) == [[BOS_TOKEN_ID] + body + [EOS_TOKEN_ID], plain]
    assert never.meta["add_special_tokens"] == "never"


def test_the_modes_are_part_of_the_fingerprint(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [MARKED, SCRAPED])
    modes = [
        (mode, literal) for mode in ("auto", "always", "never") for literal in ("split", "keep")
    ]
    built = {
        (mode, literal): build_token_cache(
            data,
            tok_dir,
            tmp_path / "cache",
            progress=False,
            add_special_tokens=mode,
            literal_special_tokens=literal,
        )
        for mode, literal in modes
    }
    assert len({cache.path for cache in built.values()}) == 6
    assert all(c.path.is_dir() for c in built.values()), "a cache of another mode was deleted"
    again = build_token_cache(
        data, tok_dir, tmp_path / "cache", progress=False, add_special_tokens="always"
    )
    assert again.path == built["always", "split"].path

    write_jsonl(data, [MARKED, SCRAPED, "one more document"])  # a new version of the data file
    changed = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)
    assert [p.name for p in changed.path.parent.iterdir() if p.is_dir()] == [changed.path.name], (
        "caches of the old data file are never valid again"
    )


@pytest.mark.parametrize(
    "modes, message",
    [
        (
            dict(add_special_tokens="sometimes"),
            "add_special_tokens='sometimes': use one of auto, always",
        ),
        (
            dict(literal_special_tokens="drop"),
            "literal_special_tokens='drop': use one of split, keep",
        ),
    ],
)
def test_bad_mode(tmp_path, tok_dir, modes, message):
    with pytest.raises(ValueError, match=message):
        build(tmp_path, tok_dir, ["some text here"], **modes)


def test_split_at_special_tokens():
    assert split_at_special_tokens("no markers at all ") == ["no markers at all "]
    assert split_at_special_tokens(JOINED) == [
        f"{BOS}the model reads tokens{EOS}",
        f"{BOS}gradients flow back through every layer{EOS}",
    ]
    assert split_at_special_tokens(SCRAPED) == [
        f"the model reads {EOS}",
        "tokens and",
        "predicts the next one",
    ]
    assert split_at_special_tokens(f"a{BOS}b{BOS}c") == ["a", f"{BOS}b", f"{BOS}c"]
    assert split_at_special_tokens(f"{PAD}{PAD} \n{EOS}") == [EOS]


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_literal_markers_split_documents_and_pad_never_enters_the_cache(tmp_path, tok_dir, mode):
    cache = build(
        tmp_path,
        tok_dir,
        [SCRAPED, JOINED, f"text {PAD}{PAD} and more text"],
        add_special_tokens=mode,
    )
    assert PAD_TOKEN_ID not in cache.tokens.tolist() and cache.docs_with_pad_id == 0
    for doc in docs(cache):  # BOS/EOS ids only at the edges of a document
        start, end = 0, len(doc)
        while start < end and doc[start] == BOS_TOKEN_ID:
            start += 1
        while end > start and doc[end - 1] == EOS_TOKEN_ID:
            end -= 1
        assert BOS_TOKEN_ID not in doc[start:end] and EOS_TOKEN_ID not in doc[start:end]
    if mode == "auto":
        expected = [
            "the model reads ",
            "tokens and",
            "predicts the next one",
            "the model reads tokens",
            "gradients flow back through every layer",
            "text",
            "and more text",
        ]
        assert docs(cache) == [[BOS_TOKEN_ID] + ids(tok_dir, t) + [EOS_TOKEN_ID] for t in expected]
    packed = PackedDataset(cache, None, 5)
    assert not any((packed[i]["input_ids"] == PAD_TOKEN_ID).any() for i in range(len(packed)))


def test_keep_reads_markers_as_the_tokenizer_does(tmp_path, tok_dir):
    texts = [SCRAPED, JOINED]
    cache = build(tmp_path, tok_dir, texts, literal_special_tokens="keep")
    tok = load_tokenizer(tok_dir)
    assert docs(cache) == [
        [BOS_TOKEN_ID] + tok.encode(SCRAPED).ids + [EOS_TOKEN_ID],
        tok.encode(JOINED).ids,
    ]
    assert cache.docs_with_pad_id == 1 and PAD_TOKEN_ID in cache.doc(0).tolist()
    with pytest.raises(
        DataError,
        match=r"data.jsonl: 1 documents spell the pad token.*"
        r"literal_special_tokens='split' or use padded rows",
    ):
        PackedDataset(cache, None, 4)
    item = PaddedDataset(cache, None, 64)[0]  # MiniMind masks the pad id inside the text too
    inside = (item["input_ids"] == PAD_TOKEN_ID).nonzero()[0, 0]
    assert inside < len(cache.doc(0)) and item["labels"][inside] == IGNORE_INDEX


def minimind_row(hf, text, T):
    """MiniMind's current PretrainDataset.__getitem__ (dataset/lm_dataset.py), verbatim."""
    tokens = hf(str(text), add_special_tokens=False, max_length=T - 2, truncation=True).input_ids
    tokens = [hf.bos_token_id] + tokens + [hf.eos_token_id]
    input_ids = tokens + [hf.pad_token_id] * (T - len(tokens))
    input_ids = torch.tensor(input_ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[input_ids == hf.pad_token_id] = -100
    return input_ids, labels


@pytest.mark.parametrize("T", [2, 5, 12, 40, 200])
def test_always_keep_padded_rows_are_minimind_exactly(tmp_path, tok_dir, T):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [
        MARKED,
        JOINED,
        SCRAPED,
        f"{PAD} leading pad and a trailing one {PAD}",
        f"ends with a marker {EOS}",
    ] + make_texts(10, seed=5)
    cache = build(
        tmp_path, tok_dir, texts, add_special_tokens="always", literal_special_tokens="keep"
    )
    dataset = PaddedDataset(cache, None, T)
    assert len(dataset) == len(texts)
    for i, text in enumerate(texts):
        input_ids, labels = minimind_row(hf, text, T)
        item = dataset[i]
        assert torch.equal(item["input_ids"], input_ids), (text, T)
        assert torch.equal(item["labels"], labels), (text, T)


def test_padded_rows_keep_the_eos_when_cut(tmp_path, tok_dir):
    cache = build(
        tmp_path,
        tok_dir,
        [MARKED, "gradients flow back through every layer"],
        add_special_tokens="never",
    )
    marked, plain = (PaddedDataset(cache, None, 4)[i]["input_ids"].tolist() for i in range(2))
    assert marked == cache.doc(0)[:3].tolist() + [EOS_TOKEN_ID]
    assert plain == cache.doc(1)[:4].tolist(), "a document without EOS is cut, not given one"
    assert np.array_equal(cache.doc(0)[[0, -1]], [BOS_TOKEN_ID, EOS_TOKEN_ID])


def test_meta_records_the_modes(tmp_path, tok_dir):
    cache = build(
        tmp_path, tok_dir, [MARKED], add_special_tokens="always", literal_special_tokens="keep"
    )
    meta = json.loads((cache.path / "meta.json").read_text())
    assert (meta["add_special_tokens"], meta["literal_special_tokens"]) == ("always", "keep")
    assert meta["fingerprint"]["add_special_tokens"] == "always"
