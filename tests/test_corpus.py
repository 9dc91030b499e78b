"""Embedded default corpus and default tokenizer: built once per module into a temp cache."""

import json
from pathlib import Path

import pytest

from minimind_fast import corpus, paths
from minimind_fast.tokenizer import default_tokenizer_path, load_tokenizer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmf_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINIMIND_FAST_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def corpus_path(cache_dir):
    return corpus.build_default_corpus()


@pytest.fixture(scope="module")
def documents(corpus_path):
    with open(corpus_path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMIND_FAST_CACHE", str(tmp_path / "x"))
    assert paths.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("MINIMIND_FAST_CACHE")
    assert paths.default_cache_dir() == Path.home() / ".cache" / "minimind_fast"


def test_written_to_cache_keyed_by_python_version(cache_dir, corpus_path):
    import sys

    assert corpus_path.parent == cache_dir
    assert f"{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}" in corpus_path.name
    assert corpus_path.suffix == ".jsonl"
    assert not list(cache_dir.glob("*.tmp")), "temp file left behind"


def test_several_megabytes_of_valid_unique_prose(corpus_path, documents):
    assert corpus_path.stat().st_size > 2_000_000
    texts = [doc["text"] for doc in documents]
    assert all(set(doc) == {"text"} and isinstance(doc["text"], str) for doc in documents)
    assert len(texts) > 2000
    assert len(set(texts)) == len(texts), "duplicates survived"
    assert min(map(len, texts)) >= corpus.MIN_DOC_CHARS
    assert all(text == text.strip() for text in texts)
    letters = sum(sum(map(str.isalpha, t)) for t in texts) / sum(map(len, texts))
    assert letters > 0.6, f"only {letters:.0%} letters: not prose"
    joined = "\n".join(texts)
    assert 'The "assert" statement' in joined  # pydoc topics
    assert (
        "Return a new list containing all items from the iterable in ascending order." in joined
    )  # C (sorted)
    assert "Serialize ``obj`` to a JSON formatted ``str``" in joined  # pure-Python docstring
    assert texts[0].startswith('The "assert" statement')  # topics first, sorted


def test_reused_not_rebuilt(corpus_path):
    before = corpus_path.stat().st_mtime_ns
    assert corpus.build_default_corpus() == corpus_path
    assert corpus_path.stat().st_mtime_ns == before


def test_deterministic_and_silent(corpus_path, tmp_path, capfd):
    again = corpus.build_default_corpus(tmp_path / "again.jsonl")
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), "importing the stdlib leaked output"
    assert again.read_bytes() == corpus_path.read_bytes()


def test_failure_is_reported(tmp_path, monkeypatch):
    broken = tmp_path / "broken_collector.py"
    broken.write_text("import sys\nsys.stderr.write('boom: cannot collect\\n')\nsys.exit(3)\n")
    monkeypatch.setattr(corpus, "__file__", str(broken))  # the child runs this instead
    out = tmp_path / "out" / "c.jsonl"
    with pytest.raises(
        RuntimeError, match=r"default corpus failed \(exit 3.*boom: cannot collect.*--data_path"
    ):
        corpus.build_default_corpus(out)
    assert list(out.parent.iterdir()) == [], "a failed build must leave nothing behind"


def test_default_tokenizer(cache_dir, documents):
    path = default_tokenizer_path(vocab_size=1024)
    assert path.parent == cache_dir and (path / "tokenizer_config.json").is_file()
    stamp = (path / "tokenizer.json").stat().st_mtime_ns
    assert default_tokenizer_path(vocab_size=1024) == path
    assert (path / "tokenizer.json").stat().st_mtime_ns == stamp, "retrained instead of reused"
    tok = load_tokenizer(path)
    assert tok.get_vocab_size() == 1024
    for doc in documents[::500]:
        assert tok.decode(tok.encode(doc["text"]).ids) == doc["text"]
    # trained on English prose: common words are single tokens
    assert len(tok.encode(" the").ids) == 1 and len(tok.encode(" return").ids) == 1
