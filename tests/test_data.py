"""Data pipeline: token cache (build, reuse, rebuild, races), datasets, sampler, loader, bad
data."""

import json
import logging
import pickle
import random
import threading

import numpy as np
import pytest
import torch

from minimind_fast.constants import BOS_TOKEN_ID, EOS_TOKEN_ID, IGNORE_INDEX, PAD_TOKEN_ID
from minimind_fast.data import (
    DataError,
    PackedDataset,
    PaddedDataset,
    ResumableSampler,
    build_token_cache,
    count_tokens,
    make_dataloader,
    split_documents,
    token_dtype,
)
from minimind_fast.data import cache as cache_module
from minimind_fast.tokenizer import load_tokenizer, train_tokenizer

WORDS = (
    "the model reads tokens and predicts the next one while gradients flow back through "
    "every layer of the network 数据 训练 模型 def return x = y + 1 🤖"
).split()


def make_texts(n, seed=0, max_words=60):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, max_words))) for _ in range(n)]


def write_jsonl(path, texts):
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_tokenizer([write_jsonl(root / "train.jsonl", make_texts(200))], 300, root / "tok")


@pytest.fixture(scope="module")
def tok_dir_2(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok2")
    return train_tokenizer(
        [write_jsonl(root / "train.jsonl", make_texts(200, seed=1))], 280, root / "tok"
    )


@pytest.fixture
def texts():
    return make_texts(40)


@pytest.fixture
def cache(tmp_path, tok_dir, texts):
    return build_token_cache(
        write_jsonl(tmp_path / "data.jsonl", texts), tok_dir, tmp_path / "cache", progress=False
    )


@pytest.fixture
def build_counter(monkeypatch):
    calls = []
    original = cache_module._write_cache
    monkeypatch.setattr(
        cache_module, "_write_cache", lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    )
    return calls


# ---------------------------------------------------------------------------------------- cache


def test_cache_contents(cache, texts, tok_dir):
    tok = load_tokenizer(tok_dir)
    assert cache.num_docs == len(texts) and len(cache.doc_offsets) == len(texts) + 1
    assert cache.doc_offsets.dtype == np.int64 and cache.doc_offsets[0] == 0
    assert isinstance(cache.tokens, np.memmap) and cache.tokens.dtype == np.uint16
    assert cache.num_tokens == cache.doc_offsets[-1] == len(cache.tokens)
    assert cache.vocab_size == tok.get_vocab_size()
    for d, text in enumerate(texts):
        assert cache.doc(d).tolist() == [BOS_TOKEN_ID] + tok.encode(text).ids + [EOS_TOKEN_ID]


def test_token_dtype():
    assert (
        token_dtype(6400) == np.uint16
        and token_dtype(65535) == np.uint16
        and token_dtype(65536) == np.uint32
    )


def test_txt_documents_split_on_blank_lines(tmp_path, tok_dir):
    data = tmp_path / "d.txt"
    data.write_bytes(
        (
            "first doc line one\nline two of it\n\n\n\nsecond doc 数据\r\n\r\nthird doc 🤖 ends"
        ).encode()
    )
    cache = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)
    tok = load_tokenizer(tok_dir)
    decoded = [tok.decode(cache.doc(d)[1:-1].tolist()) for d in range(cache.num_docs)]
    assert decoded == ["first doc line one\nline two of it", "second doc 数据", "third doc 🤖 ends"]


def test_reused_then_rebuilt_on_data_or_tokenizer_change(
    tmp_path, tok_dir, tok_dir_2, texts, build_counter
):
    data = write_jsonl(tmp_path / "data.jsonl", texts)
    first = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)
    stamp = (first.path / "tokens.bin").stat().st_mtime_ns
    again = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)
    assert len(build_counter) == 1 and again.path == first.path
    assert (again.path / "tokens.bin").stat().st_mtime_ns == stamp

    write_jsonl(data, texts + ["one more document about the model"])  # data changed
    changed = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)
    assert (
        len(build_counter) == 2
        and changed.path != first.path
        and changed.num_docs == len(texts) + 1
    )
    assert not first.path.exists(), "the superseded cache of the same file should be removed"

    other = build_token_cache(
        data, tok_dir_2, tmp_path / "cache", progress=False
    )  # tokenizer changed
    assert len(build_counter) == 3 and other.path != changed.path
    assert other.vocab_size == load_tokenizer(tok_dir_2).get_vocab_size() != changed.vocab_size
    assert changed.path.exists(), "a cache for another tokenizer stays valid"
    assert not list(changed.path.parent.glob(".tmp-*"))


def test_a_given_digest_reopens_the_cache_without_reading_the_file(
    tmp_path, tok_dir, texts, cache, monkeypatch, build_counter
):
    """DDP ranks other than 0 pass rank 0's digest: same cache, and the data file is never
    hashed."""
    assert cache.data_digest == cache_module.file_digest(cache.meta["fingerprint"]["data_path"])

    def no_hashing(path, *args, **kwargs):
        raise AssertionError(f"{path} was hashed although its digest was given")

    monkeypatch.setattr(cache_module, "file_digest", no_hashing)
    again = build_token_cache(
        cache.meta["fingerprint"]["data_path"],
        tok_dir,
        tmp_path / "cache",
        progress=False,
        data_digest=cache.data_digest,
    )
    assert again.path == cache.path and not build_counter


def test_small_batches_give_identical_cache(tmp_path, tok_dir, texts, cache):
    other = build_token_cache(
        write_jsonl(tmp_path / "other.jsonl", texts),
        tok_dir,
        tmp_path / "c2",
        progress=False,
        batch_docs=3,
    )
    assert np.array_equal(other.tokens, cache.tokens) and np.array_equal(
        other.doc_offsets, cache.doc_offsets
    )


def test_racing_builders_build_once(tmp_path, tok_dir, texts, build_counter):
    data = write_jsonl(tmp_path / "data.jsonl", texts)
    results = [None, None]

    def build(i):
        results[i] = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(build_counter) == 1 and results[0].path == results[1].path
    assert np.array_equal(results[0].tokens, results[1].tokens)


def test_pickles_as_path(cache):
    blob = pickle.dumps(cache)
    assert len(blob) < 1000  # the tokens are not copied into DataLoader workers
    clone = pickle.loads(blob)
    assert isinstance(clone.tokens, np.memmap) and np.array_equal(clone.tokens, cache.tokens)


# ------------------------------------------------------------------------------------- datasets


def test_split_documents(cache):
    train, val = split_documents(cache, 0.1, seed=3)
    assert len(val) == 4 and len(train) == cache.num_docs - 4
    assert not set(train) & set(val) and sorted(set(train) | set(val)) == list(
        range(cache.num_docs)
    )
    again = split_documents(cache, 0.1, seed=3)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(split_documents(cache, 0.1, seed=4)[1], val)
    assert len(split_documents(cache, 0.0001, seed=0)[1]) == 1
    assert len(split_documents(cache, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction=1.5 must be in"):
        split_documents(cache, 1.5, seed=0)


@pytest.mark.parametrize(
    "doc_ids", [None, [5, 0, 3, 2, 7, 11, 12, 13, 1, 39]], ids=["all", "subset"]
)
def test_packed_rows_are_full_unpadded_slices_of_the_stream(cache, doc_ids):
    T = 17
    dataset = PackedDataset(cache, doc_ids, T)
    ids = range(cache.num_docs) if doc_ids is None else doc_ids
    stream = np.concatenate([cache.doc(d) for d in ids]).astype(np.int64)
    assert len(dataset) == len(stream) // T > 3
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (T,)
        assert torch.equal(item["input_ids"], torch.from_numpy(stream[i * T : (i + 1) * T]))
        assert torch.equal(item["labels"], item["input_ids"])
        assert not (item["input_ids"] == PAD_TOKEN_ID).any()
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_packed_too_little_data(cache):
    with pytest.raises(
        DataError, match="less than one row of max_seq_len=100000; lower --max_seq_len"
    ):
        PackedDataset(cache, [0], 100000)
    with pytest.raises(ValueError, match="max_seq_len=1 must be an integer >= 2"):
        PackedDataset(cache, None, 1)
    with pytest.raises(ValueError, match=r"doc_ids must lie in \[0, 40\)"):
        PackedDataset(cache, [40], 8)


@pytest.mark.parametrize("T", [2, 9, 40, 200])
def test_padded_rows_match_minimind(cache, texts, tok_dir, T):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    dataset = PaddedDataset(cache, None, T)
    assert len(dataset) == len(texts)
    for i, text in enumerate(texts):  # MiniMind's PretrainDataset.__getitem__, verbatim
        tokens = hf(text, add_special_tokens=False, max_length=T - 2, truncation=True).input_ids
        tokens = [hf.bos_token_id] + tokens + [hf.eos_token_id]
        input_ids = torch.tensor(tokens + [hf.pad_token_id] * (T - len(tokens)), dtype=torch.long)
        labels = input_ids.clone()
        labels[input_ids == hf.pad_token_id] = -100
        item = dataset[i]
        assert torch.equal(item["input_ids"], input_ids) and torch.equal(item["labels"], labels)


# ------------------------------------------------------------------------------ sampler, loader


def sampler_list(n, **kwargs):
    return list(ResumableSampler(n, seed=7, epoch=kwargs.pop("epoch", 0), **kwargs))


def test_sampler_order_is_deterministic_permutation():
    order = sampler_list(50)
    assert (
        sorted(order) == list(range(50)) and order == sampler_list(50) and order != list(range(50))
    )
    assert order != sampler_list(50, epoch=1)
    assert sampler_list(50, shuffle=False) == list(range(50))


def test_sampler_shards_disjoint_and_cover_global_prefix():
    full = sampler_list(103)
    shards = [sampler_list(103, rank=r, world_size=4) for r in range(4)]
    assert all(
        len(s) == 25 == len(ResumableSampler(103, 7, 0, rank=r, world_size=4))
        for r, s in enumerate(shards)
    )
    assert sum(map(len, shards)) == len(set().union(*shards)) == 100
    assert set().union(*shards) == set(full[:100])
    assert [shards[r][0] for r in range(4)] == full[:4]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("consumed", [0, 1, 6, 12, 29, 30])
def test_sampler_resume_continues_the_global_order(world_size, consumed):
    full = sampler_list(30)
    shards = [
        sampler_list(30, rank=r, world_size=world_size, consumed=consumed)
        for r in range(world_size)
    ]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(
        ResumableSampler(30, 7, 0, world_size=world_size, consumed=consumed)
    )
    interleaved = [i for step in zip(*shards) for i in step]
    assert interleaved == full[consumed : consumed + len(interleaved)]
    assert len(full) - consumed - len(interleaved) < world_size


def test_two_ranks_batch_b_equal_one_rank_batch_2b(cache):
    dataset = PackedDataset(cache, None, 8)
    B, n = 3, len(dataset)
    single = make_dataloader(dataset, 2 * B, ResumableSampler(n, 1, 0))
    ranks = [
        make_dataloader(dataset, B, ResumableSampler(n, 1, 0, rank=r, world_size=2))
        for r in range(2)
    ]
    steps = 0
    for big, small0, small1 in zip(single, *ranks):
        rows = lambda batch: sorted(map(tuple, batch["input_ids"].tolist()))  # noqa: E731
        assert rows(big) == sorted(rows(small0) + rows(small1))
        steps += 1
    assert steps == len(ranks[0]) > 2


def test_sampler_errors():
    with pytest.raises(ValueError, match="rank=2 must be < world_size=2"):
        ResumableSampler(10, 0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="consumed=11 exceeds the 10 samples"):
        ResumableSampler(10, 0, 0, consumed=11)
    with pytest.raises(ValueError, match="seed=-1 must be a non-negative integer"):
        ResumableSampler(10, -1, 0)


def test_dataloader_and_count_tokens(cache):
    padded = PaddedDataset(cache, None, 64)
    loader = make_dataloader(padded, 16, ResumableSampler(len(padded), 0, 0, shuffle=False))
    batches = list(loader)
    assert [b["input_ids"].shape for b in batches] == [(16, 64), (16, 64), (8, 64)]  # partial kept
    assert all(b["labels"].dtype == torch.int64 for b in batches)
    lengths = [min(len(cache.doc(d)), 64) for d in range(cache.num_docs)]
    assert sum(count_tokens(b) for b in batches) == sum(lengths)
    assert (batches[0]["labels"] == IGNORE_INDEX).any()

    packed = PackedDataset(cache, None, 16)
    worker_loader = make_dataloader(packed, 4, ResumableSampler(len(packed), 0, 0), num_workers=1)
    assert worker_loader.persistent_workers and not worker_loader.drop_last
    batch = next(iter(worker_loader))  # the cache travels to the worker and reopens its memmap
    assert batch["input_ids"].shape == (4, 16) and count_tokens(batch) == 64
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        make_dataloader(packed, 0, ResumableSampler(len(packed), 0, 0))


# ------------------------------------------------------------------------------------- bad data


def build(tmp_path, tok_dir, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return build_token_cache(path, tok_dir, tmp_path / "cache", progress=False)


GOOD = '{"text": "the model reads tokens"}\n'


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "unterminated\n', "1 malformed JSON (line 2)"),
        ('{"content": "no text key"}\n', '1 missing "text" field (line 2)'),
        ('["a", "list"]\n', '1 missing "text" field (line 2)'),
        ('{"text": 42}\n', '1 "text" is not a string (line 2)'),
        (b'{"text": "caf\xe9 latin-1"}\n', "1 not valid UTF-8 (line 2)"),
        ('{"text": "a"}\n', "1 too short (< 2 tokens) (line 2)"),
    ],
)
def test_bad_line_is_skipped_and_reported(tmp_path, tok_dir, caplog, bad_line, message):
    bad = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    with caplog.at_level(logging.WARNING, logger="minimind_fast.data"):
        cache = build(tmp_path, tok_dir, "data.jsonl", GOOD.encode() + bad + b"\n" + GOOD.encode())
    assert cache.num_docs == 2  # the blank line is silently ignored, the bad one skipped
    assert "data.jsonl: skipped 1 line(s)/document(s): " + message in caplog.text
    assert cache.meta["skipped"] and list(cache.meta["skipped"].values())[0]["first_lines"] == [2]


def test_summary_lists_first_lines_only(tmp_path, tok_dir, caplog):
    content = GOOD + "".join("oops\n" for _ in range(7)) + '{"x": 1}\n'
    with caplog.at_level(logging.WARNING, logger="minimind_fast.data"):
        build(tmp_path, tok_dir, "data.jsonl", content)
    assert (
        "skipped 8 line(s)/document(s): 7 malformed JSON (lines 2, 3, 4, 5, 6, ...); "
        '1 missing "text" field (line 9)' in caplog.text
    )


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "empty.jsonl",
            b"",
            r"data file is empty: .*empty.jsonl \(0 bytes\)\. Write one JSON object",
        ),
        (
            "short.jsonl",
            '{"text": "a"}\n{"text": ""}\n',
            r"no usable documents in .*short.jsonl: 2 too short \(< 2 tokens\) "
            r"\(lines 1, 2\)\..*at least 2 tokens",
        ),
        (
            "junk.jsonl",
            "not json\n{broken\n",
            r"no usable documents in .*junk.jsonl: 2 malformed JSON \(lines 1, 2\)",
        ),
        ("blank.txt", "\n\n   \n", r"no usable documents in .*blank.txt: no documents found"),
        ("data.csv", "a,b\n", r"unsupported data file extension '.csv' for .*data.csv: use .jsonl"),
    ],
)
def test_unusable_file_raises_before_training(tmp_path, tok_dir, name, content, message):
    with pytest.raises(DataError, match=message):
        build(tmp_path, tok_dir, name, content)
    assert not list((tmp_path / "cache").glob("*/*/meta.json")), (
        "no cache may be left for a failed build"
    )


def test_missing_path_directory_and_tokenizer(tmp_path, tok_dir):
    assert issubclass(DataError, ValueError)
    with pytest.raises(
        DataError,
        match=r"data file not found: .*nope.jsonl\. Pass an existing file .*omit --data_path",
    ):
        build_token_cache(tmp_path / "nope.jsonl", tok_dir, tmp_path / "cache")
    with pytest.raises(
        DataError, match=r"is a directory, not a data file\. Pass one file inside it"
    ):
        build_token_cache(tmp_path, tok_dir, tmp_path / "cache")
    data = write_jsonl(tmp_path / "ok.jsonl", ["some text here"])
    with pytest.raises(ValueError, match="tokenizer not found"):
        build_token_cache(data, tmp_path / "no_tokenizer", tmp_path / "cache")


def test_txt_non_utf8_line_skipped(tmp_path, tok_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="minimind_fast.data"):
        cache = build(
            tmp_path,
            tok_dir,
            "d.txt",
            b"good line one\n\xff\xfe bad\ngood line two\n\nsecond doc here\n",
        )
    assert (
        cache.num_docs == 2
        and "d.txt: skipped 1 line(s)/document(s): 1 not valid UTF-8 (line 2)" in caplog.text
    )
    tok = load_tokenizer(tok_dir)
    assert tok.decode(cache.doc(0)[1:-1].tolist()) == "good line one\ngood line two"
