"""One-time tokenisation of a data file into a memory-mapped token cache, reused across runs and ranks.

Layout (nanoGPT's `train.bin` idea, with document boundaries kept):

    <cache_dir>/<data stem>-<hash of data path>/<fingerprint>/
        tokens.bin        all documents back to back, each [BOS] + ids + [EOS]; uint16 when
                          the vocabulary fits (<= 65535 ids), else uint32; shape (num_tokens,)
        doc_offsets.npy   int64, shape (num_docs + 1,): document d is tokens[off[d]:off[d+1]]
        meta.json         fingerprint, counts, dtype, skipped-line summary (written last)

The fingerprint covers the data file (path, size, mtime, BLAKE2b of its bytes), the sha256 of
tokenizer.json, the format version and the short-document and long-line rules; a cache with the
same fingerprint is reused, anything else is rebuilt (the superseded cache of the same file and
tokenizer is deleted; caches made with other tokenizers are kept). A build runs under an fcntl lock into a temp
directory that is renamed into place at the end, so a crash or a racing process (DDP ranks) never
sees a half cache and the loser of a race simply reuses the winner's result.

Encoding streams the file in batches through `Tokenizer.encode_batch_fast` (parallel in Rust) and
appends to tokens.bin, so memory stays bounded by one batch, not by the file.
Documents whose text encodes to fewer than `MIN_DOC_TOKENS` tokens (before BOS/EOS are added) are
skipped and counted: they hold nothing to learn beyond BOS -> EOS.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ..constants import BOS_TOKEN_ID, EOS_TOKEN_ID
from ..paths import default_cache_dir
from ..tokenizer import load_tokenizer, tokenizer_file
from . import reader
from .reader import FORMAT_HINT, TOO_SHORT, DataError, SkipStats, check_data_path, iter_documents

logger = logging.getLogger("minimind_fast.data")

CACHE_FORMAT_VERSION = 1
MIN_DOC_TOKENS = 2
BATCH_DOCS = 2048  # documents per encode_batch call
BATCH_CHARS = 8 << 20  # ... or this many characters, whichever comes first
try:
    import fcntl  # noqa: F401
    _HAS_FCNTL = True
except ImportError:  # Windows: no lock; build-to-temp-then-rename still keeps caches whole
    _HAS_FCNTL = False


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def file_digest(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """BLAKE2b hex digest of a file, streamed in 1 MiB chunks."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TokenCache:
    """A built token cache, opened cheaply (memmap) by every rank and DataLoader worker.

    tokens: np.memmap (num_tokens,) of uint16/uint32; doc_offsets: int64 (num_docs + 1,).
    Pickles as its path (workers reopen the memmap instead of copying the tokens).
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
            self.doc_offsets = np.load(self.path / "doc_offsets.npy")
            self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.dtype(self.meta["dtype"]),
                                    mode="r", shape=(int(self.meta["num_tokens"]),))
            self.data_digest = self.meta["fingerprint"]["data_blake2b"]  # BLAKE2b of the data file it was built from
        except (OSError, ValueError, KeyError) as error:
            raise DataError(f"token cache {self.path} is missing or corrupt ({error}); delete that "
                            "directory and rerun to rebuild it") from None
        self.vocab_size = int(self.meta["vocab_size"])
        self.num_docs = len(self.doc_offsets) - 1
        self.num_tokens = len(self.tokens)

    def doc(self, index: int) -> np.ndarray:
        """Tokens of document `index`, BOS and EOS included: (length,) view into the memmap."""
        return self.tokens[self.doc_offsets[index]:self.doc_offsets[index + 1]]

    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self):
        return (f"TokenCache({str(self.path)!r}, num_docs={self.num_docs}, num_tokens={self.num_tokens}, "
                f"vocab_size={self.vocab_size}, dtype={self.tokens.dtype})")


def _is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """An fcntl lock on `path` (no-op where fcntl does not exist; the rename keeps builds safe)."""
    if not _HAS_FCNTL:
        yield
        return
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _with_bos_eos(ids: np.ndarray, lengths: np.ndarray, dtype) -> np.ndarray:
    """Interleave BOS/EOS around each document: ids (sum(lengths),) -> (sum(lengths) + 2 * n,)."""
    ends = np.cumsum(lengths + 2)
    starts = ends - lengths - 2
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_text = np.ones(len(out), dtype=bool)
    out[starts], out[ends - 1] = BOS_TOKEN_ID, EOS_TOKEN_ID
    is_text[starts] = is_text[ends - 1] = False
    out[is_text] = ids
    return out


def _batches(documents, max_docs: int, max_chars: int):
    batch, chars = [], 0
    for line_number, text in documents:
        batch.append((line_number, text))
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_cache(out_dir: Path, data_path: Path, tokenizer, meta: dict, progress: bool,
                 batch_docs: int) -> None:
    dtype = token_dtype(meta["vocab_size"])
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    stats = SkipStats(data_path)
    offsets = [np.zeros(1, dtype=np.int64)]
    num_tokens = 0
    show = progress and sys.stderr.isatty()
    with open(out_dir / "tokens.bin", "wb") as out, tqdm(
            total=data_path.stat().st_size, unit="B", unit_scale=True, disable=not show,
            desc=f"tokenising {data_path.name}") as bar:
        for batch in _batches(iter_documents(data_path, stats), batch_docs, BATCH_CHARS):
            encodings = [e.ids for e in encode([text for _, text in batch], add_special_tokens=False)]
            lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
            keep = lengths >= MIN_DOC_TOKENS
            for (line_number, _), kept in zip(batch, keep):
                if not kept:
                    stats.add(f"{TOO_SHORT} (< {MIN_DOC_TOKENS} tokens)", line_number)
            lengths = lengths[keep]
            kept_ids = itertools.chain.from_iterable(itertools.compress(encodings, keep))
            ids = np.fromiter(kept_ids, dtype=dtype, count=int(lengths.sum()))
            _with_bos_eos(ids, lengths, dtype).tofile(out)
            offsets.append(num_tokens + np.cumsum(lengths + 2))
            num_tokens += int((lengths + 2).sum())
            bar.update(stats.bytes_read - bar.n)
    doc_offsets = np.concatenate(offsets)
    if len(doc_offsets) == 1:  # the error carries the skip summary: no separate warning line
        detail = stats.summary() or "no documents found"
        raise DataError(f"no usable documents in {data_path}: {detail}. Write {FORMAT_HINT}; "
                        f"each document needs at least {MIN_DOC_TOKENS} tokens.")
    stats.log()
    np.save(out_dir / "doc_offsets.npy", doc_offsets)
    meta.update(num_docs=len(doc_offsets) - 1, num_tokens=num_tokens, dtype=dtype.name,
                skipped=stats.as_dict())
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def build_token_cache(data_path, tokenizer_path, cache_dir=None, progress: bool = True,
                      batch_docs: int = BATCH_DOCS, data_digest: Optional[str] = None) -> TokenCache:
    """Tokenise `data_path` (JSONL or .txt) with `tokenizer_path` once; reuse the cache afterwards.

    cache_dir: root of the caches (default: `default_cache_dir() / "token_cache"`).
    data_digest: `file_digest(data_path)` when the caller has it already (DDP ranks take rank 0's,
    `TokenCache.data_digest`, instead of each reading the whole file); size and mtime still come
    from this machine's file.
    Raises DataError for a missing/empty/unusable data file, ValueError for a bad tokenizer.
    """
    data_path = check_data_path(data_path)
    tokenizer_json = tokenizer_file(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_json)
    stat = data_path.stat()
    fingerprint = {
        "format_version": CACHE_FORMAT_VERSION, "min_doc_tokens": MIN_DOC_TOKENS,
        "max_line_bytes": reader.MAX_LINE_BYTES,
        "data_path": str(data_path), "data_size": stat.st_size, "data_mtime_ns": stat.st_mtime_ns,
        "data_blake2b": data_digest or file_digest(data_path),
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.read_bytes()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "token_cache"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_path.stem)[:40]
    entry = root / f"{stem}-{hashlib.sha256(str(data_path).encode()).hexdigest()[:10]}"
    final = entry / key
    if _is_complete(final):
        return TokenCache(final)

    entry.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(entry / ".lock"):
        if _is_complete(final):  # another process built it while we waited
            return TokenCache(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=entry))
        try:
            meta = {"fingerprint": fingerprint, "key": key, "vocab_size": tokenizer.get_vocab_size(),
                    "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID,
                    "tokenizer_path": str(tokenizer_json)}
            _write_cache(tmp, data_path, tokenizer, meta, progress, batch_docs)
            os.chmod(tmp, 0o755)
            if final.exists() and not _is_complete(final):
                shutil.rmtree(final)  # debris of an interrupted manual edit; never a live cache
            try:
                os.rename(tmp, final)  # atomic: the cache appears whole or not at all
            except OSError:
                if not _is_complete(final):  # only tolerate losing a race to a finished build
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_stale(entry, keep=final)
    cache = TokenCache(final)
    logger.info("token cache: %d documents, %d tokens from %s -> %s",
                cache.num_docs, cache.num_tokens, data_path, final)
    return cache


def _remove_stale(entry: Path, keep: Path) -> None:
    """Under the build lock: drop leftovers of crashed builds and caches of older versions of the
    data file (same tokenizer, so never valid again). Caches for other tokenizers are kept."""
    def tokenizer_hash(cache_dir: Path) -> str:
        meta = json.loads((cache_dir / "meta.json").read_text(encoding="utf-8"))
        return meta["fingerprint"]["tokenizer_sha256"]

    ours = tokenizer_hash(keep)
    for other in entry.iterdir():
        if not other.is_dir() or other == keep:
            continue
        try:
            theirs = tokenizer_hash(other)
        except (OSError, ValueError, KeyError):
            theirs = None  # a crashed build's temp directory (a live one needs the lock we hold)
        if (theirs is None and _HAS_FCNTL) or theirs == ours:
            shutil.rmtree(other, ignore_errors=True)
