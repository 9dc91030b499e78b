"""One-time tokenisation of a data file into a memory-mapped token cache, reused by runs and ranks.

Layout (nanoGPT's `train.bin` idea, with document boundaries kept):

    <cache_dir>/<data stem>-<hash of data path>/<fingerprint>/
        tokens.bin        all documents back to back, each with its BOS/EOS as chosen by
                          `add_special_tokens` (see encoding.py); uint16 when the vocabulary fits
                          (<= 65535 ids), else uint32; shape (num_tokens,)
        doc_offsets.npy   int64, shape (num_docs + 1,): document d is tokens[off[d]:off[d+1]]
        meta.json         fingerprint, the data file, counts, dtype, skipped-line summary (last)

The fingerprint covers the data file (path, size, mtime, BLAKE2b of its bytes), the sha256 of
tokenizer.json, the format version, the BOS/EOS and literal-special-token modes, and the
short-document, long-line and piece-size rules; a cache with the same fingerprint is reused,
anything else is rebuilt (the superseded cache of the same file and tokenizer is deleted;
caches made with other tokenizers are kept). A build runs under an fcntl lock into a temp
directory that is renamed into place at the end, so a crash or a racing process (DDP ranks)
never sees a half cache and the loser of a race simply reuses the winner's result. A failed
build (no usable documents, a full disk, an interrupt) leaves neither the temp directory nor an
empty `<data stem>-<hash>` folder behind; a failed write is one DataError line naming the cache
directory ("disk full" when it is).

Encoding streams the file in bounded batches (encoding.py), so memory stays bounded by one
batch, not by the file or its longest document. Documents whose text encodes to fewer than
`MIN_DOC_TOKENS` tokens (BOS/EOS not counted) are skipped and counted: they hold nothing to learn
beyond BOS -> EOS.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from ..constants import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID
from ..paths import default_cache_dir
from . import encoding, reader
from .encoding import BATCH_DOCS, check_modes, encode_documents, join
from .errors import DataError, writing
from .reader import FORMAT_HINT, TOO_SHORT, SkipStats, check_data_path, iter_documents
from .tokenizer import load_tokenizer, tokenizer_file

try:
    import fcntl
except ImportError:  # Windows: no lock; build-to-temp-then-rename still keeps caches whole
    fcntl = None

logger = logging.getLogger("minimind_fast.data")

CACHE_FORMAT_VERSION = 2
MIN_DOC_TOKENS = 2
LOCK_NAME = ".lock"


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

    tokens: np.memmap (num_tokens,) of uint16/uint32; doc_offsets: int64 (num_docs + 1,);
    data_path: the data file it was built from (for messages). Pickles as its path (workers
    reopen the memmap instead of copying the tokens).
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
            self.doc_offsets = np.load(self.path / "doc_offsets.npy")
            self.tokens = np.memmap(
                self.path / "tokens.bin",
                dtype=np.dtype(self.meta["dtype"]),
                mode="r",
                shape=(int(self.meta["num_tokens"]),),
            )
            # BLAKE2b of the data file it was built from
            self.data_digest = self.meta["fingerprint"]["data_blake2b"]
            self.data_path = Path(self.meta["data_path"])
            self.docs_with_pad_id = int(self.meta["docs_with_pad_id"])
        except (OSError, ValueError, KeyError) as error:
            raise DataError(
                f"token cache {self.path} is missing or corrupt ({error}); delete that "
                "directory and rerun to rebuild it"
            ) from None
        self.vocab_size = int(self.meta["vocab_size"])
        self.num_docs = len(self.doc_offsets) - 1
        self.num_tokens = len(self.tokens)

    def doc(self, index: int) -> np.ndarray:
        """Tokens of document `index` as stored, BOS/EOS included: (length,) memmap view."""
        return self.tokens[self.doc_offsets[index] : self.doc_offsets[index + 1]]

    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self):
        return (
            f"TokenCache({str(self.path)!r}, num_docs={self.num_docs}, "
            f"num_tokens={self.num_tokens}, vocab_size={self.vocab_size}, "
            f"dtype={self.tokens.dtype})"
        )


def _is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def _lock(entry: Path):
    """Create `entry` and take its build lock; returns the locked handle (None without fcntl).

    A failed build removes an entry that holds nothing but the lock file, so a builder that was
    waiting may hold the lock of a deleted file: it then starts over on a fresh one."""
    while True:
        entry.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return None
        try:
            handle = open(entry / LOCK_NAME, "a+b")
        except FileNotFoundError:  # removed between mkdir and open
            continue
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            on_disk = os.stat(entry / LOCK_NAME)
            mine = os.fstat(handle.fileno())
            if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
                return handle
        except FileNotFoundError:
            pass
        handle.close()


@contextlib.contextmanager
def _locked_entry(entry: Path, root: Path, what: str):
    """Hold `entry`'s build lock; on leaving, remove `entry` if nothing but the lock is left in it
    (a failed or interrupted build), while still holding the lock."""
    with writing(root, what):
        handle = _lock(entry)
    try:
        yield
    finally:
        try:
            if all(p.name == LOCK_NAME for p in entry.iterdir()):
                (entry / LOCK_NAME).unlink(missing_ok=True)
                entry.rmdir()
        except OSError:
            pass  # not empty after all (another builder without a lock): keep it
        if handle is not None:
            handle.close()  # releases the flock


def _docs_holding(tokens: np.ndarray, lengths: np.ndarray, token_id: int) -> int:
    """Number of documents (back to back in `tokens`, sizes `lengths`) that contain `token_id`."""
    positions = np.flatnonzero(tokens == token_id)
    if not len(positions):
        return 0
    return len(np.unique(np.searchsorted(np.cumsum(lengths), positions, side="right")))


def _write_cache(
    out_dir: Path,
    data_path: Path,
    tokenizer,
    meta: dict,
    progress: bool,
    batch_docs: int,
    root: Path,
) -> None:
    dtype = token_dtype(meta["vocab_size"])
    what = f"the token cache of {data_path.name}"
    stats = SkipStats(data_path)
    offsets = [np.zeros(1, dtype=np.int64)]
    num_tokens = docs_with_pad = 0
    batches = encode_documents(
        tokenizer,
        iter_documents(data_path, stats),
        meta["add_special_tokens"],
        meta["literal_special_tokens"],
        dtype,
        batch_docs,
    )
    show = progress and sys.stderr.isatty()
    with writing(root, what):
        out = open(out_dir / "tokens.bin", "wb")
    try:
        with tqdm(
            total=data_path.stat().st_size,
            unit="B",
            unit_scale=True,
            disable=not show,
            desc=f"tokenising {data_path.name}",
        ) as bar:
            for documents in batches:
                kept = []
                for doc in documents:
                    if len(doc.text_ids) < MIN_DOC_TOKENS:
                        stats.add(f"{TOO_SHORT} (< {MIN_DOC_TOKENS} tokens)", doc.line_number)
                    else:
                        kept.append(doc)
                tokens, lengths = join(kept, dtype)
                docs_with_pad += _docs_holding(tokens, lengths, PAD_TOKEN_ID)
                with writing(root, what):
                    out.write(tokens)
                offsets.append(num_tokens + np.cumsum(lengths))
                num_tokens += int(lengths.sum())
                bar.update(stats.bytes_read - bar.n)
    finally:
        with writing(root, what):
            out.close()
    doc_offsets = np.concatenate(offsets)
    if len(doc_offsets) == 1:  # the error carries the skip summary: no separate warning line
        detail = stats.summary() or "no documents found"
        raise DataError(
            f"no usable documents in {data_path}: {detail}. Write {FORMAT_HINT}; "
            f"each document needs at least {MIN_DOC_TOKENS} tokens."
        )
    stats.log()
    meta.update(
        num_docs=len(doc_offsets) - 1,
        num_tokens=num_tokens,
        dtype=dtype.name,
        docs_with_pad_id=docs_with_pad,
        skipped=stats.as_dict(),
    )
    with writing(root, what):
        np.save(out_dir / "doc_offsets.npy", doc_offsets)
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def build_token_cache(
    data_path,
    tokenizer_path,
    cache_dir=None,
    progress: bool = True,
    batch_docs: int = BATCH_DOCS,
    data_digest: Optional[str] = None,
    add_special_tokens: str = "auto",
    literal_special_tokens: str = "split",
) -> TokenCache:
    """Tokenise `data_path` (JSONL or .txt) with `tokenizer_path` once; reuse the cache afterwards.

    cache_dir: root of the caches (default: `default_cache_dir() / "token_cache"`).
    data_digest: `file_digest(data_path)` when the caller has it already (DDP ranks take rank 0's,
    `TokenCache.data_digest`, instead of each reading the whole file); size and mtime still come
    from this machine's file.
    add_special_tokens: "auto" | "always" | "never"; literal_special_tokens: "split" | "keep"
    (encoding.py; MiniMind's current PretrainDataset is "always" + "keep"). Both are part of the
    fingerprint: changing one builds another cache.
    Raises DataError for a missing/empty/unusable data file or a failed write (disk full),
    ValueError for a bad tokenizer or mode.
    """
    check_modes(add_special_tokens, literal_special_tokens)
    data_path = check_data_path(data_path)
    tokenizer_json = tokenizer_file(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_json)
    stat = data_path.stat()
    fingerprint = {
        "format_version": CACHE_FORMAT_VERSION,
        "min_doc_tokens": MIN_DOC_TOKENS,
        "max_line_bytes": reader.MAX_LINE_BYTES,
        "encode_chars": encoding.ENCODE_CHARS,
        "add_special_tokens": add_special_tokens,
        "literal_special_tokens": literal_special_tokens,
        "data_path": str(data_path),
        "data_size": stat.st_size,
        "data_mtime_ns": stat.st_mtime_ns,
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

    what = f"the token cache of {data_path.name}"
    with _locked_entry(entry, root, what):
        if _is_complete(final):  # another process built it while we waited
            return TokenCache(final)
        with writing(root, what):
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=entry))
        try:
            meta = {
                "fingerprint": fingerprint,
                "key": key,
                "data_path": str(data_path),
                "vocab_size": tokenizer.get_vocab_size(),
                "bos_token_id": BOS_TOKEN_ID,
                "eos_token_id": EOS_TOKEN_ID,
                "add_special_tokens": add_special_tokens,
                "literal_special_tokens": literal_special_tokens,
                "tokenizer_path": str(tokenizer_json),
            }
            _write_cache(tmp, data_path, tokenizer, meta, progress, batch_docs, root)
            with writing(root, what):
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
    logger.info(
        "token cache: %d documents, %d tokens from %s -> %s",
        cache.num_docs,
        cache.num_tokens,
        data_path,
        final,
    )
    return cache


def _remove_stale(entry: Path, keep: Path) -> None:
    """Under the build lock: drop leftovers of crashed builds, and caches that can never be valid
    again: of an older version of the data file, of an older format, or of the same tokenizer and
    modes. Caches of the same data for other tokenizers or BOS/EOS/literal modes are kept."""

    def identity(cache_dir: Path) -> tuple:
        found = json.loads((cache_dir / "meta.json").read_text(encoding="utf-8"))["fingerprint"]
        data = tuple(found[k] for k in ("data_size", "data_mtime_ns", "data_blake2b"))
        modes = (found.get("add_special_tokens"), found.get("literal_special_tokens"))
        return data, found["format_version"], found["tokenizer_sha256"], modes

    ours = identity(keep)
    for other in entry.iterdir():
        if not other.is_dir() or other == keep:
            continue
        try:
            theirs = identity(other)
        except (OSError, ValueError, KeyError):
            theirs = None  # a crashed build's temp directory (a live one needs the lock we hold)
        if theirs is None:
            stale = fcntl is not None
        else:
            stale = theirs[:2] != ours[:2] or theirs[2:] == ours[2:]
        if stale:
            shutil.rmtree(other, ignore_errors=True)
