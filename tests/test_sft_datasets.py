"""SFT datasets: truncation at turn boundaries, padded rows against MiniMind's, packing (whole
conversations, boundaries, no scored prediction across them), the loader."""

import logging
import pickle
import random

import numpy as np
import pytest
import torch
from minimind_sft_oracle import minimind_labels, minimind_row
from sft_helpers import random_conversations, train_small_tokenizer, write_jsonl

from minimind_fast.constants import BOS_TOKEN_ID, EOS_TOKEN_ID, IGNORE_INDEX, PAD_TOKEN_ID
from minimind_fast.data.datasets import split_documents
from minimind_fast.data.reader import DataError
from minimind_fast.data.sampler import ResumableSampler, count_tokens, make_dataloader
from minimind_fast.data.sft_cache import build_sft_cache
from minimind_fast.data.sft_datasets import SFTPackedDataset, SFTPaddedDataset, pack_best_fit

transformers = pytest.importorskip("transformers")
T = 64


def chat(*pairs):
    return {"conversations": [{"role": r, "content": c} for r, c in pairs]}


def long_text(words):
    return " ".join(["the model"] * (words // 2))


# Shapes relative to T = 64 tokens (the small tokenizer spends about a token per word).
SHAPES = {
    "fits": chat(("user", "what ?"), ("assistant", "none .")),
    "system_fits": chat(("system", "def x"), ("user", "what ?"), ("assistant", "it returns 1")),
    "cut_after_first_turn": chat(
        ("user", "what ?"),
        ("assistant", "none ."),
        ("user", "and the list ?"),
        ("assistant", long_text(120)),
    ),
    "cut_inside_reply": chat(("user", "what ?"), ("assistant", long_text(120))),
    "reply_beyond_limit": chat(("user", long_text(120)), ("assistant", "none .")),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("sft_ds_tok"))


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("shapes")
    return build_sft_cache(
        write_jsonl(root / "shapes.jsonl", list(SHAPES.values())),
        tok_dir,
        root / "cache",
        progress=False,
    )


@pytest.fixture(scope="module")
def random_cache(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("random")
    records = random_conversations(150, seed=5, reply_words=(1, 30))
    return build_sft_cache(
        write_jsonl(root / "random.jsonl", records), tok_dir, root / "cache", progress=False
    )


def full_ids(hf_tokenizer, record):
    out = hf_tokenizer.apply_chat_template(record["conversations"], tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def oracle(hf_tokenizer, ids):
    def ids_of(text):
        return hf_tokenizer(text, add_special_tokens=False)["input_ids"]

    return minimind_labels(ids, ids_of("<|im_start|>assistant\n"), ids_of("<|im_end|>\n"))


def test_shapes_need_what_their_names_say(hf_tokenizer):
    lengths = {name: len(full_ids(hf_tokenizer, record)) for name, record in SHAPES.items()}
    assert lengths["fits"] <= T and lengths["system_fits"] <= T
    assert all(
        lengths[name] > T
        for name in ("cut_after_first_turn", "cut_inside_reply", "reply_beyond_limit")
    )


def padded_rows(dataset):
    return {int(d): dataset[i] for i, d in enumerate(dataset.doc_ids)}


def test_padded_rows_follow_minimind_and_cut_at_turn_boundaries(shapes_cache, hf_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="minimind_fast.data"):
        dataset = SFTPaddedDataset(shapes_cache, None, T)
    names = list(SHAPES)
    rows = padded_rows(dataset)
    skipped = names.index("reply_beyond_limit")
    assert skipped not in rows and len(rows) == len(SHAPES) - 1
    assert dataset.skipped.as_dict() == {
        f"no assistant token within max_seq_len={T}": {"count": 1, "first_lines": [skipped + 1]}
    }
    assert f"line {skipped + 1}" in caplog.text
    for name in ("fits", "system_fits", "cut_inside_reply"):  # MiniMind's row exactly
        ids, labels = minimind_row(hf_tokenizer, SHAPES[name]["conversations"], T)
        row = rows[names.index(name)]
        assert row["input_ids"].tolist() == ids
        assert row["labels"].tolist() == labels
    # MiniMind would cut inside the second reply; the turn boundary keeps the first turn whole.
    row = rows[names.index("cut_after_first_turn")]
    ids = full_ids(hf_tokenizer, SHAPES["cut_after_first_turn"])
    first_turn = ids.index(EOS_TOKEN_ID, ids.index(EOS_TOKEN_ID) + 1) + 2  # after "<|im_end|>\n"
    assert row["input_ids"][:first_turn].tolist() == ids[:first_turn]
    assert (row["input_ids"][first_turn:] == PAD_TOKEN_ID).all()
    assert row["labels"][:first_turn].tolist() == oracle(hf_tokenizer, ids[:first_turn])
    assert (row["labels"][first_turn:] == IGNORE_INDEX).all()


def test_labels_are_aligned_for_the_model_shift(shapes_cache, hf_tokenizer):
    """Position t is trained on labels[t + 1]: the scored targets are the reply, <|im_end|> and
    "\\n"; the first is predicted from the header's "\\n"."""
    row = SFTPaddedDataset(shapes_cache, [0], T)[0]
    inputs, targets = row["input_ids"][:-1], row["labels"][1:]
    scored = targets != IGNORE_INDEX
    newline = hf_tokenizer("\n", add_special_tokens=False)["input_ids"]
    reply = hf_tokenizer("none .", add_special_tokens=False)["input_ids"]
    assert targets[scored].tolist() == reply + [EOS_TOKEN_ID] + newline
    first = int(torch.nonzero(scored)[0])
    assert inputs[first].item() == newline[0] and inputs[first - 1].item() != BOS_TOKEN_ID
    assert (targets[scored] == row["input_ids"][1:][scored]).all()


def segments_of(row):
    """[(ids, labels)] of each conversation in a packed row, and the padded tail's length."""
    segment_ids = row["segment_ids"]
    parts = []
    for segment in torch.unique_consecutive(segment_ids).tolist():
        where = segment_ids == segment
        parts.append((row["input_ids"][where].tolist(), row["labels"][where].tolist()))
    if (row["labels"][segment_ids == segment_ids[-1]] == IGNORE_INDEX).all() and (
        row["input_ids"][segment_ids == segment_ids[-1]] == PAD_TOKEN_ID
    ).all():
        return parts[:-1], len(parts[-1][0])
    return parts, 0


@pytest.mark.parametrize("max_seq_len", [T, 200])
def test_packed_rows_hold_every_conversation_once_and_whole(random_cache, max_seq_len):
    packed = SFTPackedDataset(random_cache, None, max_seq_len)
    padded = SFTPaddedDataset(random_cache, None, max_seq_len)
    expected = []
    for row in padded:
        length = int((row["input_ids"] != PAD_TOKEN_ID).sum())
        expected.append((row["input_ids"][:length].tolist(), row["labels"][:length].tolist()))
    found = []
    for index in range(len(packed)):
        row = packed[index]
        assert (
            row["input_ids"].shape
            == row["labels"].shape
            == row["segment_ids"].shape
            == (max_seq_len,)
        )
        assert all(v.dtype == torch.int64 for v in row.values())
        parts, pad = segments_of(row)
        assert sum(len(ids) for ids, _ in parts) + pad == max_seq_len
        assert row["segment_ids"].tolist() == sorted(row["segment_ids"].tolist())
        for ids, labels in parts:
            assert ids[0] == BOS_TOKEN_ID and labels[0] == IGNORE_INDEX
        found.extend(parts)
    assert sorted(found) == sorted(expected)
    assert len(packed) < len(padded)


def test_no_scored_prediction_crosses_a_conversation_boundary(random_cache):
    packed = SFTPackedDataset(random_cache, None, T)
    for index in range(len(packed)):
        row = packed[index]
        targets, segments = row["labels"], row["segment_ids"]
        scored = targets[1:] != IGNORE_INDEX
        assert (segments[:-1][scored] == segments[1:][scored]).all()
        assert ((targets == IGNORE_INDEX) | (targets == row["input_ids"])).all()


def test_packing_pads_less_than_filling_rows_in_order(random_cache):
    packed = SFTPackedDataset(random_cache, None, 200)
    in_order, room = 0, 0  # rows when each conversation goes to the last row or a new one
    for length in packed.lengths.tolist():
        if length > room:
            in_order, room = in_order + 1, 200
        room -= length
    assert int(np.ceil(packed.lengths.sum() / 200)) <= len(packed) < in_order
    assert packed.pad_fraction == pytest.approx(1 - packed.lengths.sum() / (len(packed) * 200))


def test_pack_best_fit_example():
    rows = pack_best_fit(np.array([3, 5, 1, 4, 3, 2, 0]), 6)
    lengths = [[[3, 5, 1, 4, 3, 2, 0][i] for i in row] for row in rows]
    assert lengths == [[5, 1], [4, 2], [3, 3]]
    with pytest.raises(ValueError, match="a length of 7 exceeds the row capacity 6"):
        pack_best_fit(np.array([3, 7]), 6)


@pytest.mark.parametrize("seed", range(40))
def test_pack_best_fit_properties(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(1, 41))
    lengths = rng.integers(0, capacity + 1, size=int(rng.integers(0, 61)))
    rows = pack_best_fit(lengths, capacity)
    placed = sorted(i for row in rows for i in row)
    assert placed == [i for i in range(len(lengths)) if lengths[i] > 0]
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # A new row is opened only when no open row has room for the conversation at that moment.
    rank = {int(i): r for r, i in enumerate(np.argsort(-lengths, kind="stable"))}
    for later in range(1, len(rows)):
        opener = rows[later][0]
        for row in rows[:later]:
            load = sum(lengths[i] for i in row if rank[i] < rank[opener])
            assert load + lengths[opener] > capacity


def test_loader_batches_and_counts_scored_tokens(random_cache):
    packed = SFTPackedDataset(random_cache, None, T)
    sampler = ResumableSampler(len(packed), seed=0, epoch=0)
    batches = list(make_dataloader(packed, 4, sampler))
    assert set(batches[0]) == {"input_ids", "labels", "segment_ids"}
    assert batches[0]["segment_ids"].shape == (4, T)
    scored = sum(count_tokens(batch) for batch in batches)
    expected = sum(
        int(random_cache.conversation(int(d))[1][:length].sum())
        for d, length in zip(packed.doc_ids, packed.lengths, strict=True)
    )
    assert scored == expected


def test_split_and_pickle(random_cache):
    train_ids, val_ids = split_documents(random_cache, 0.1, seed=0)
    assert len(val_ids) == 15 and not set(train_ids) & set(val_ids)
    for dataset_class in (SFTPackedDataset, SFTPaddedDataset):
        dataset = dataset_class(random_cache, val_ids, T)
        clone = pickle.loads(pickle.dumps(dataset))
        assert all(torch.equal(clone[0][k], dataset[0][k]) for k in dataset[0])
        assert set(dataset.doc_ids.tolist()) <= set(val_ids.tolist())


def test_bad_arguments(shapes_cache):
    names = list(SHAPES)
    with pytest.raises(ValueError, match="max_seq_len=1"):
        SFTPackedDataset(shapes_cache, None, 1)
    with pytest.raises(ValueError, match="pad_id=100000"):
        SFTPaddedDataset(shapes_cache, None, T, pad_id=100000)
    with pytest.raises(ValueError, match="doc_ids must lie in"):
        SFTPackedDataset(shapes_cache, [len(names)], T)
    with pytest.raises(DataError, match="none of the 1 selected conversations"):
        SFTPackedDataset(shapes_cache, [names.index("reply_beyond_limit")], T)
    with pytest.raises(IndexError):
        SFTPaddedDataset(shapes_cache, None, T)[len(names)]


def test_random_conversations_round_trip(random_cache, hf_tokenizer):
    """Every padded row of a conversation that fits equals MiniMind's row."""
    rng = random.Random(0)
    records = random_conversations(150, seed=5, reply_words=(1, 30))
    dataset = SFTPaddedDataset(random_cache, None, 200)
    for index in rng.sample(range(len(dataset)), 20):
        doc = int(dataset.doc_ids[index])
        messages = records[doc]["conversations"]
        if len(full_ids(hf_tokenizer, records[doc])) <= 200:
            ids, labels = minimind_row(hf_tokenizer, messages, 200)
            assert dataset[index]["input_ids"].tolist() == ids
            assert dataset[index]["labels"].tolist() == labels
