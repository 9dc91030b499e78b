"""Inputs that used to crash or lose data: lone surrogate escapes, .txt lines longer than the line
limit, texts encoded in bounded pieces, a full disk during the cache build, failed builds that
left empty folders, and dataset errors that named the cache instead of the data file."""

import builtins
import errno
import json
import logging
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_data import make_texts, write_jsonl

from minimind_fast.constants import BOS_TOKEN_ID, EOS_TOKEN_ID
from minimind_fast.data import (
    DataError,
    PackedDataset,
    PaddedDataset,
    SkipStats,
    build_token_cache,
    encoding,
    iter_documents,
    iter_jsonl_records,
    reader,
)
from minimind_fast.data import cache as cache_module
from minimind_fast.data import tokenizer as tokenizer_module
from minimind_fast.data.tokenizer import load_tokenizer, train_tokenizer
from minimind_fast.tokenizer import main


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_tokenizer([write_jsonl(root / "train.jsonl", make_texts(200))], 300, root / "tok")


GOOD = '{"text": "the model reads tokens"}\n'
LONE = '{"text": "emoji cut in half \\ud83d here"}\n'  # the JSON escape of a lone high surrogate
PAIR = '{"text": "a whole emoji \\ud83d\\ude00 here"}\n'
SURROGATE_REASON = "lone surrogate escape like \\ud83d (not Unicode text)"


# ---------------------------------------------------------------------------- lone surrogates


def test_lone_surrogate_line_is_skipped_and_counted(tmp_path, tok_dir, caplog):
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD + LONE + PAIR + GOOD, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="minimind_fast.data"):
        cache = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)
    assert cache.num_docs == 3
    summary = f"data.jsonl: skipped 1 line(s)/document(s): 1 {SURROGATE_REASON} (line 2)"
    assert summary in caplog.text
    assert cache.meta["skipped"] == {SURROGATE_REASON: {"count": 1, "first_lines": [2]}}
    tok = load_tokenizer(tok_dir)
    assert tok.decode(cache.doc(1)[1:-1].tolist()) == "a whole emoji \U0001f600 here"


def test_only_lone_surrogates_is_refused_with_file_and_line(tmp_path, tok_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(LONE * 2, encoding="utf-8")
    message = r"no usable documents in .*bad.jsonl: 2 lone surrogate .*\(lines 1, 2\)"
    with pytest.raises(DataError, match=message):
        build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)


def test_record_reader_skips_surrogates_anywhere(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(
        '{"conversations": [{"role": "user", "content": "x \\udc00"}]}\n'
        '{"k\\ud800": 1}\n{"conversations": []}\n',
        encoding="utf-8",
    )
    stats = SkipStats(data)
    assert list(iter_jsonl_records(data, stats)) == [(3, {"conversations": []})]
    assert stats.as_dict() == {SURROGATE_REASON: {"count": 2, "first_lines": [1, 2]}}


def test_tokenizer_training_skips_lone_surrogates(tmp_path, caplog):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, make_texts(100))
    with open(data, "a", encoding="utf-8") as file:
        file.write(LONE)
    with caplog.at_level(logging.WARNING, logger="minimind_fast.data"):
        out = train_tokenizer([data], 300, tmp_path / "tok")
    assert load_tokenizer(out).get_vocab_size() == 300
    assert f"skipped 1 line(s)/document(s): 1 {SURROGATE_REASON} (line 101)" in caplog.text


def test_tokenizer_cli_reports_skips_and_refuses_in_one_line(tmp_path):
    def cli(*files):
        command = [
            sys.executable,
            "-m",
            "minimind_fast.tokenizer",
            "--data",
            *map(str, files),
            "--vocab_size",
            "300",
            "--out",
            str(tmp_path / "tok"),
        ]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent
        )

    bad = tmp_path / "bad.jsonl"
    bad.write_text(LONE + '{"no": "text"}\n', encoding="utf-8")
    refused = cli(bad)
    assert refused.returncode == 2 and refused.stderr.startswith("error: no usable text in ")
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"bad.jsonl: 1 {SURROGATE_REASON} (line 1); 1 missing" in refused.stderr
    assert not (tmp_path / "tok").exists()

    good = write_jsonl(tmp_path / "good.jsonl", make_texts(100))
    with open(good, "a", encoding="utf-8") as file:
        file.write(LONE)
    done = cli(good)
    assert done.returncode == 0 and "wrote" in done.stdout
    summary = f"{good}: skipped 1 line(s)/document(s): 1 {SURROGATE_REASON} (line 101)\n"
    assert done.stderr == summary


# ------------------------------------------------------------------------------ long .txt lines


def read(path):
    stats = SkipStats(path)
    return list(iter_documents(path, stats)), stats


@pytest.mark.parametrize(
    "line",
    ["word " * 700, "数据训练模型🤖" * 300, "x" * 2500 + " tail"],
    ids=["spaces", "no-spaces-multibyte", "no-space-until-the-end"],
)
def test_txt_line_over_the_limit_is_cut_not_dropped(tmp_path, monkeypatch, line):
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "d.txt"
    path.write_text(f"first doc\n\n{line}\nsame paragraph\n\nlast doc\n", encoding="utf-8")
    documents, stats = read(path)
    assert stats.total == 0, stats.summary()
    texts = [text for _, text in documents]
    assert texts[0] == "first doc" and texts[-1] == "last doc"
    middle = texts[1:-1]
    assert len(middle) >= 3
    assert all(len(t.encode()) <= 1000 + len("same paragraph\n") for t in middle)
    assert "".join(middle) == line + "\nsame paragraph"  # nothing lost, nothing doubled
    assert [n for n, _ in documents] == [1] + [3] * len(middle) + [6]
    if " " in line[:1000]:
        assert all(t.endswith(" ") for t in middle[:-1]), "cut after a space"


def test_txt_line_over_the_limit_reaches_the_cache(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 1000)
    line = " ".join(make_texts(60))
    path = tmp_path / "one_line.txt"
    path.write_text(line, encoding="utf-8")  # no newline at all
    cache = build_token_cache(path, tok_dir, tmp_path / "cache", progress=False)
    tok = load_tokenizer(tok_dir)
    assert cache.num_docs == len(line.encode()) // 1000 + 1 and not cache.meta["skipped"]
    assert "".join(tok.decode(cache.doc(d)[1:-1].tolist()) for d in range(cache.num_docs)) == line


# ------------------------------------------------------------------------- bounded tokenisation


class CountingTokenizer:
    """A tokenizer that records the characters of every encode_batch call and its longest text."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def get_vocab_size(self):
        return self.inner.get_vocab_size()

    def encode_batch_fast(self, texts, add_special_tokens):
        self.calls.append((sum(map(len, texts)), max(map(len, texts))))
        return self.inner.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


LONG_TEXTS = [
    " ".join(make_texts(30, seed=3)),
    "\n".join(make_texts(20, seed=4)) + "  double  spaces \n\n and\tnewlines  ",
    "数据训练模型" * 120,  # no space: cut at the limit
    "tokens<|im_end|>tokens<|endoftext|>" * 30,  # hard cuts must not split a special token
]


@pytest.mark.parametrize("text", LONG_TEXTS, ids=["spaces", "newlines", "cjk", "markers"])
def test_long_texts_are_encoded_in_pieces_with_the_same_ids(tok_dir, monkeypatch, text):
    monkeypatch.setattr(encoding, "ENCODE_CHARS", 64)
    tok = CountingTokenizer(load_tokenizer(tok_dir))
    batches = list(
        encoding.encode_documents(tok, [(1, text)], "never", "keep", np.uint16, batch_chars=200)
    )
    (doc,) = [d for batch in batches for d in batch]
    whole = tok.inner.encode(text).ids
    if "数据" in text:  # a cut inside a run of letters may tokenise the cut differently
        assert tok.inner.decode(doc.text_ids.tolist()) == text
    else:
        assert doc.text_ids.tolist() == whole
    assert max(longest for _, longest in tok.calls) <= 64
    assert max(chars for chars, _ in tok.calls) < 200 + 64 and len(tok.calls) > 2


def test_cache_build_hands_the_tokenizer_bounded_batches(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(encoding, "ENCODE_CHARS", 100)
    monkeypatch.setattr(encoding, "BATCH_CHARS", 500)
    seen = []
    load = cache_module.load_tokenizer

    def counting_load(path):
        seen.append(CountingTokenizer(load(path)))
        return seen[-1]

    monkeypatch.setattr(cache_module, "load_tokenizer", counting_load)
    texts = make_texts(30) + [" ".join(make_texts(40, seed=9))]
    cache = build_token_cache(
        write_jsonl(tmp_path / "d.jsonl", texts), tok_dir, tmp_path / "cache", progress=False
    )
    tok = load(tok_dir)
    assert [cache.doc(d).tolist() for d in range(cache.num_docs)] == [
        [BOS_TOKEN_ID] + tok.encode(t).ids + [EOS_TOKEN_ID] for t in texts
    ]
    (counting,) = seen
    assert max(longest for _, longest in counting.calls) <= 100
    assert max(chars for chars, _ in counting.calls) < 600


# ---------------------------------------------------------------------------------- disk full


def failing_open(after_bytes):
    """open() for the cache module: files opened for writing take `after_bytes` bytes in all,
    then fail with ENOSPC, as on a full disk."""
    budget = [after_bytes]

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            data = data if isinstance(data, str) else memoryview(data).cast("B")
            room = min(budget[0], len(data))
            self.file.write(data[:room])
            budget[0] -= room
            if room < len(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, name):
            return getattr(self.file, name)

    def fake_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(file) if "w" in mode else file

    return fake_open


def assert_nothing_left(root):
    left = list(root.rglob("*"))
    assert not left, f"left behind: {left}"


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, tok_dir, monkeypatch):
    root = tmp_path / "cache"
    data = write_jsonl(tmp_path / "data.jsonl", make_texts(200))
    monkeypatch.setattr(cache_module, "open", failing_open(3000), raising=False)
    with pytest.raises(DataError) as caught:
        build_token_cache(data, tok_dir, root, progress=False, batch_docs=16)
    message = str(caught.value)
    assert message.startswith(f"disk full: writing the token cache of data.jsonl to {root} ")
    assert "\n" not in message and "No space left on device" in message
    assert "MINIMIND_FAST_CACHE" in message
    assert_nothing_left(root)


def test_disk_full_keeps_an_earlier_cache(tmp_path, tok_dir, monkeypatch):
    root = tmp_path / "cache"
    data = write_jsonl(tmp_path / "data.jsonl", make_texts(50))
    old = build_token_cache(data, tok_dir, root, progress=False)
    write_jsonl(data, make_texts(60))
    monkeypatch.setattr(cache_module, "open", failing_open(100), raising=False)
    with pytest.raises(DataError, match="disk full"):
        build_token_cache(data, tok_dir, root, progress=False, batch_docs=8)
    assert old.path.is_dir() and cache_module.TokenCache(old.path).num_docs == 50
    assert sorted(p.name for p in old.path.parent.iterdir()) == [".lock", old.path.name]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs the right to mount: root in most containers); skipped elsewhere."""
    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False, capture_output=True, timeout=30)


def test_real_full_disk(tmp_path, tok_dir, tiny_disk):
    data = write_jsonl(tmp_path / "big.jsonl", make_texts(8000, max_words=80))  # ~2 MB of tokens
    with pytest.raises(DataError) as caught:
        build_token_cache(data, tok_dir, tiny_disk / "token_cache", progress=False)
    assert str(caught.value).startswith("disk full: writing the token cache of big.jsonl to ")
    assert "\n" not in str(caught.value)
    assert_nothing_left(tiny_disk / "token_cache")


def test_tokenizer_on_a_full_disk_leaves_no_half_file(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", make_texts(100))
    out = tmp_path / "tok"
    monkeypatch.setattr(tokenizer_module, "open", failing_open(2000), raising=False)
    with pytest.raises(DataError) as caught:
        train_tokenizer([data], 300, out)
    assert str(caught.value).startswith(f"disk full: writing the tokenizer to {out} failed")
    assert not out.exists(), "no half-written tokenizer, no temp file, no empty directory"
    monkeypatch.undo()
    assert main(["--data", str(data), "--vocab_size", "300", "--out", str(out)]) == 0


def test_tokenizer_on_a_real_full_disk(tmp_path, tiny_disk):
    data = write_jsonl(tmp_path / "data.jsonl", make_texts(100))
    (tiny_disk / "filler").write_bytes(bytes((1 << 20) - (8 << 10)))  # 8 KiB left
    out = tiny_disk / "tok"
    with pytest.raises(DataError, match=rf"^disk full: writing the tokenizer to {out} failed"):
        train_tokenizer([data], 300, out)
    assert not out.exists()


# --------------------------------------------------------------------- no empty cache folders


def test_failed_builds_leave_no_empty_folder(tmp_path, tok_dir, monkeypatch):
    root = tmp_path / "cache"
    bad = tmp_path / "junk.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(DataError, match="no usable documents"):
        build_token_cache(bad, tok_dir, root, progress=False)
    assert_nothing_left(root)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(
            write_jsonl(tmp_path / "ok.jsonl", make_texts(5)), tok_dir, root, progress=False
        )
    assert_nothing_left(root)


@pytest.mark.skipif(cache_module.fcntl is None, reason="no fcntl locks on this platform")
def test_a_waiting_builder_survives_the_removal_of_an_empty_entry(tmp_path, tok_dir, monkeypatch):
    """A failed build removes its entry while another builder waits on the lock: the waiter holds
    the lock of a deleted file, notices, and builds under a fresh lock."""
    data = write_jsonl(tmp_path / "data.jsonl", make_texts(20))
    root = tmp_path / "cache"
    first = build_token_cache(data, tok_dir, root, progress=False)
    entry = first.path.parent
    shutil.rmtree(first.path)  # only the lock file is left in the entry
    waiting = threading.Event()
    real_fcntl = cache_module.fcntl

    class SignallingFcntl:  # tells the test when the waiter has opened the lock and takes it
        LOCK_EX = real_fcntl.LOCK_EX

        @staticmethod
        def flock(handle, operation):
            if threading.current_thread().name == "waiter":
                waiting.set()
            return real_fcntl.flock(handle, operation)

    monkeypatch.setattr(cache_module, "fcntl", SignallingFcntl)
    result = {}

    def wait_and_build():
        result["cache"] = build_token_cache(data, tok_dir, root, progress=False)

    waiter = threading.Thread(name="waiter", target=wait_and_build)
    with cache_module._locked_entry(entry, root, "a build that fails"):
        waiter.start()
        assert waiting.wait(timeout=60)
    waiter.join(timeout=300)
    assert result["cache"].num_docs == 20 and (entry / ".lock").is_file()


# ------------------------------------------------------------------ errors name the data file


def test_dataset_errors_name_the_data_file(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "tiny.jsonl", ["the model reads tokens"])
    cache = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)
    assert cache.data_path == data.resolve()
    with pytest.raises(DataError) as caught:
        PackedDataset(cache, None, 100000)
    assert str(caught.value).startswith(f"{data.resolve()}: the selected 1 documents hold only")
    assert str(cache.path) not in str(caught.value)
    with pytest.raises(DataError, match=rf"^{data.resolve()}: no documents selected"):
        PaddedDataset(cache, [], 8)
    assert pickle.loads(pickle.dumps(cache)).data_path == data.resolve()


def test_cache_meta_is_json_with_the_data_path(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ["the model reads tokens"])
    cache = build_token_cache(data, tok_dir, tmp_path / "cache", progress=False)
    assert json.loads((cache.path / "meta.json").read_text())["data_path"] == str(data.resolve())
