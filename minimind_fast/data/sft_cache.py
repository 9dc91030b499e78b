"""One-time tokenisation of an SFT JSONL file into a memory-mapped cache, reused across runs.

Layout (the pretraining token cache's, plus the loss mask and the turn boundaries):

    <cache_dir>/<data stem>-<hash of data path>/<fingerprint>/
        tokens.bin            all conversations back to back, rendered with the chat template;
                              uint16 when the vocabulary fits, else uint32; shape (num_tokens,)
        scored.bin            uint8, shape (num_tokens,): 1 where the label is the token itself
        doc_offsets.npy       int64, (num_docs + 1,): conversation d is tokens[off[d]:off[d+1]]
        line_numbers.npy      int64, (num_docs,): the JSONL line each conversation came from
        assistant_ends.npy    int64: for each conversation, in order, the positions (relative
                              to its start) just past each assistant message
        assistant_index.npy   int64, (num_docs + 1,): conversation d's ends are
                              assistant_ends[index[d]:index[d+1]]
        meta.json             fingerprint, counts (conversations, tokens, scored tokens), dtype,
                              skipped-line summary (written last)

Conversations are stored whole, so one cache serves every max_seq_len; the datasets cut them.
The fingerprint covers the data file (path, size, mtime, BLAKE2b), tokenizer.json's sha256 and
SFT_CACHE_FORMAT_VERSION (bump it when the rendering or the mask rule changes). Building follows
the pretraining cache: under a file lock, into a temp directory renamed into place, so racing
ranks build once and nobody sees half a cache; superseded caches of the same file are removed.
"""

from __future__ import annotations

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

from ..paths import default_cache_dir
from . import reader
from .cache import _is_complete, _locked_entry, _remove_stale, file_digest, token_dtype
from .errors import writing
from .reader import DataError, SkipStats
from .sft_format import SFT_FORMAT_HINT, check_sft_data_path, iter_conversations
from .sft_template import ChatTemplateEncoder
from .tokenizer import load_tokenizer, tokenizer_file

logger = logging.getLogger("minimind_fast.data")

SFT_CACHE_FORMAT_VERSION = 1
BATCH_CONVERSATIONS = 1024  # conversations per tokenizer call
BATCH_CHARS = 8 << 20  # ... or this many characters of content, whichever comes first


class SFTCache:
    """A built SFT cache, opened cheaply (memmap) by every rank and DataLoader worker.

    tokens: (num_tokens,) uint16/uint32 memmap; scored: (num_tokens,) uint8 memmap;
    doc_offsets: (num_docs + 1,) int64; line_numbers: (num_docs,) int64.
    Pickles as its path (workers reopen the memmaps instead of copying them).
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
            num_tokens = int(self.meta["num_tokens"])
            self.num_scored = int(self.meta["num_scored"])
            self.tokens = np.memmap(
                self.path / "tokens.bin",
                dtype=np.dtype(self.meta["dtype"]),
                mode="r",
                shape=(num_tokens,),
            )
            self.scored = np.memmap(
                self.path / "scored.bin", dtype=np.uint8, mode="r", shape=(num_tokens,)
            )
            self.doc_offsets = np.load(self.path / "doc_offsets.npy")
            self.line_numbers = np.load(self.path / "line_numbers.npy")
            self.assistant_ends = np.load(self.path / "assistant_ends.npy")
            self.assistant_index = np.load(self.path / "assistant_index.npy")
            self.data_digest = self.meta["fingerprint"]["data_blake2b"]
            self.data_path = Path(self.meta["fingerprint"]["data_path"])
        except (OSError, ValueError, KeyError) as error:
            raise DataError(
                f"SFT cache {self.path} is missing or corrupt ({error}); delete that "
                "directory and rerun to rebuild it"
            ) from None
        self.vocab_size = int(self.meta["vocab_size"])
        self.num_docs = len(self.doc_offsets) - 1
        self.num_tokens = len(self.tokens)

    def conversation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scored) of conversation `index`: two (length,) views into the memmaps."""
        begin, end = self.doc_offsets[index], self.doc_offsets[index + 1]
        return self.tokens[begin:end], self.scored[begin:end]

    def turn_ends(self, index: int) -> np.ndarray:
        """Positions just past each assistant message of conversation `index` (ascending)."""
        return self.assistant_ends[self.assistant_index[index] : self.assistant_index[index + 1]]

    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self):
        return (
            f"SFTCache({str(self.path)!r}, num_docs={self.num_docs}, "
            f"num_tokens={self.num_tokens}, vocab_size={self.vocab_size})"
        )


def _batches(conversations, max_items: int, max_chars: int):
    batch, chars = [], 0
    for line_number, messages in conversations:
        batch.append((line_number, messages))
        chars += sum(len(content) for _, content in messages)
        if len(batch) >= max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_cache(
    out_dir: Path, data_path: Path, tokenizer, meta: dict, progress: bool, batch_conversations: int
) -> None:
    dtype = token_dtype(meta["vocab_size"])
    encoder = ChatTemplateEncoder(tokenizer)
    stats = SkipStats(data_path)
    offsets, line_numbers, ends, counts, num_scored = [0], [], [], [0], 0
    show = progress and sys.stderr.isatty()
    with (
        open(out_dir / "tokens.bin", "wb") as tokens_out,
        open(out_dir / "scored.bin", "wb") as scored_out,
        tqdm(
            total=data_path.stat().st_size,
            unit="B",
            unit_scale=True,
            disable=not show,
            desc=f"tokenising {data_path.name}",
        ) as bar,
    ):
        for batch in _batches(
            iter_conversations(data_path, stats), batch_conversations, BATCH_CHARS
        ):
            encoded = encoder.encode_batch([messages for _, messages in batch])
            np.concatenate([e.ids for e in encoded]).astype(dtype).tofile(tokens_out)
            scored = np.concatenate([e.scored for e in encoded])
            scored.astype(np.uint8).tofile(scored_out)
            num_scored += int(scored.sum())
            for (line_number, _), conversation in zip(batch, encoded, strict=True):
                offsets.append(offsets[-1] + len(conversation.ids))
                line_numbers.append(line_number)
                ends.extend(conversation.assistant_ends)
                counts.append(len(conversation.assistant_ends))
            bar.update(stats.bytes_read - bar.n)
    if not line_numbers:  # the error carries the skip summary: no separate warning line
        detail = stats.summary() or "no conversations found"
        raise DataError(
            f"no usable conversations in {data_path}: {detail}. Write {SFT_FORMAT_HINT}."
        )
    stats.log()
    np.save(out_dir / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(out_dir / "line_numbers.npy", np.asarray(line_numbers, dtype=np.int64))
    np.save(out_dir / "assistant_ends.npy", np.asarray(ends, dtype=np.int64))
    np.save(out_dir / "assistant_index.npy", np.cumsum(counts, dtype=np.int64))
    meta.update(
        num_docs=len(line_numbers),
        num_tokens=offsets[-1],
        num_scored=num_scored,
        dtype=dtype.name,
        skipped=stats.as_dict(),
    )
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def build_sft_cache(
    data_path,
    tokenizer_path,
    cache_dir=None,
    progress: bool = True,
    batch_conversations: int = BATCH_CONVERSATIONS,
    data_digest: Optional[str] = None,
) -> SFTCache:
    """Tokenise the SFT JSONL `data_path` with `tokenizer_path` once; reuse the cache afterwards.

    cache_dir: root of the caches (default: `default_cache_dir() / "sft_cache"`).
    data_digest: `SFTCache.data_digest` of rank 0's build, so other ranks skip hashing the file.
    Raises DataError for a missing/empty/unusable data file or a failed write (a full disk),
    ValueError for a bad tokenizer.
    """
    data_path = check_sft_data_path(data_path)
    tokenizer_json = tokenizer_file(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_json)
    stat = data_path.stat()
    fingerprint = {
        "kind": "sft",
        "format_version": SFT_CACHE_FORMAT_VERSION,
        "max_line_bytes": reader.MAX_LINE_BYTES,
        "data_path": str(data_path),
        "data_size": stat.st_size,
        "data_mtime_ns": stat.st_mtime_ns,
        "data_blake2b": data_digest or file_digest(data_path),
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.read_bytes()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "sft_cache"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_path.stem)[:40]
    entry = root / f"{stem}-{hashlib.sha256(str(data_path).encode()).hexdigest()[:10]}"
    final = entry / key
    if _is_complete(final):
        return SFTCache(final)
    what = f"the SFT cache of {data_path.name}"
    with _locked_entry(entry, root, what):  # removes `entry` again if the build fails
        if _is_complete(final):  # another process built it while we waited
            return SFTCache(final)
        with writing(root, what):
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=entry))
        try:
            meta = {
                "fingerprint": fingerprint,
                "key": key,
                "data_path": str(data_path),
                "vocab_size": tokenizer.get_vocab_size(),
                "tokenizer_path": str(tokenizer_json),
            }
            with writing(root, what):
                _write_cache(tmp, data_path, tokenizer, meta, progress, batch_conversations)
                os.chmod(tmp, 0o755)
                if final.exists() and not _is_complete(final):
                    shutil.rmtree(final)  # debris of an interrupted manual edit, never a live cache
                try:
                    os.rename(tmp, final)  # atomic: the cache appears whole or not at all
                except OSError:
                    if not _is_complete(final):  # only tolerate losing a race to a finished build
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_stale(entry, keep=final)
    cache = SFTCache(final)
    logger.info(
        "SFT cache: %d conversations, %d tokens (%d scored) from %s -> %s",
        cache.num_docs,
        cache.num_tokens,
        cache.num_scored,
        data_path,
        final,
    )
    return cache
