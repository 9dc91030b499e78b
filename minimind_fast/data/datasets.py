"""Map-style datasets over a TokenCache: `packed` (default) and MiniMind-compatible `padded` rows.

- PackedDataset: the documents of `doc_ids` (each as cached, with its BOS/EOS) are concatenated
  in that order and cut into full rows of T = max_seq_len tokens; the trailing partial row is
  dropped, so no row holds a pad token. Rows are located with cumsum/searchsorted over document
  lengths and sliced from the memmap; the stream is never materialised. A cache whose documents
  hold the pad id (built with literal_special_tokens="keep" from texts that spell
  `<|endoftext|>`) is refused.
- PaddedDataset: one document per row, as MiniMind's current PretrainDataset builds it
  (dataset/lm_dataset.py as MiniMind-3 ships it): a document longer than T keeps its first T - 1
  tokens and its final EOS (MiniMind: BOS + text[:T - 2] + EOS), shorter ones are right-padded
  with pad_id; labels are the input ids with every pad id set to IGNORE_INDEX (MiniMind's rule,
  which also masks a pad id inside a document). With a cache built with
  add_special_tokens="always" and literal_special_tokens="keep" the rows are MiniMind's exactly,
  row for row, as long as no text is shorter than MIN_DOC_TOKENS tokens (the cache skips those).
  (MiniMind2's PretrainDataset added no BOS/EOS itself, its corpus carried them, and cut rows at
  T without keeping the EOS.)

Both return `{"input_ids": LongTensor (T,), "labels": LongTensor (T,)}`; the model shifts labels
internally, so labels are aligned with input_ids, not shifted here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import EOS_TOKEN_ID, IGNORE_INDEX, PAD_TOKEN_ID
from .cache import TokenCache
from .errors import DataError


def split_documents(
    cache: TokenCache, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split of the document ids of `cache`.

    Returns (train_ids, val_ids), both sorted int64, disjoint, together all documents. Validation
    gets round(num_docs * val_fraction) documents, at least 1 when val_fraction > 0 and there
    are >= 2 documents, and never all of them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1), e.g. 0.01")
    num_docs = cache.num_docs
    num_val = int(round(num_docs * val_fraction))
    if val_fraction > 0 and num_docs >= 2:
        num_val = min(max(num_val, 1), num_docs - 1)
    else:
        num_val = 0
    order = np.random.default_rng(seed).permutation(num_docs)
    return np.sort(order[num_val:]).astype(np.int64), np.sort(order[:num_val]).astype(np.int64)


def _check_doc_ids(cache: TokenCache, doc_ids) -> np.ndarray:
    if doc_ids is None:
        return np.arange(cache.num_docs, dtype=np.int64)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if doc_ids.ndim != 1:
        raise ValueError(f"doc_ids must be 1-D, got shape {doc_ids.shape}")
    if len(doc_ids) and (doc_ids.min() < 0 or doc_ids.max() >= cache.num_docs):
        raise ValueError(
            f"doc_ids must lie in [0, {cache.num_docs}) for {cache.data_path}, got "
            f"[{doc_ids.min()}, {doc_ids.max()}]; use split_documents(cache, ...)"
        )
    return doc_ids


def _check_seq_len(max_seq_len) -> int:
    if (
        isinstance(max_seq_len, bool)
        or not isinstance(max_seq_len, (int, np.integer))
        or max_seq_len < 2
    ):
        raise ValueError(
            f"max_seq_len={max_seq_len!r} must be an integer >= 2 (MiniMind uses 512 or 340)"
        )
    return int(max_seq_len)


class PackedDataset(Dataset):
    """Full rows of max_seq_len tokens cut from the concatenated documents; no padding.

    Row i is stream[i*T:(i+1)*T] where stream = concat(cache.doc(d) for d in doc_ids).
    """

    def __init__(self, cache: TokenCache, doc_ids, max_seq_len: int):
        self.cache = cache
        self.max_seq_len = _check_seq_len(max_seq_len)
        self.doc_ids = _check_doc_ids(cache, doc_ids)
        if cache.docs_with_pad_id:
            raise DataError(
                f"{cache.data_path}: {cache.docs_with_pad_id} documents spell the pad "
                f"token <|endoftext|>, which this token cache keeps as the pad id "
                "(literal_special_tokens='keep'); packed rows never hold pad ids: "
                "rebuild it with literal_special_tokens='split' or use padded rows"
            )
        offsets = cache.doc_offsets
        lengths = offsets[self.doc_ids + 1] - offsets[self.doc_ids]
        # stream_starts[j]: position in the stream where document doc_ids[j] begins; (n + 1,)
        self.stream_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_rows = int(self.stream_starts[-1] // self.max_seq_len)
        if self.num_rows == 0:
            raise DataError(
                f"{cache.data_path}: the selected {len(self.doc_ids)} documents hold "
                f"only {int(self.stream_starts[-1])} tokens, less than one row of "
                f"max_seq_len={self.max_seq_len}; lower --max_seq_len or add data"
            )
        # Consecutive ids (e.g. the whole file) are one contiguous slice of the memmap.
        self.contiguous = bool(np.all(np.diff(self.doc_ids) == 1))
        self.base = int(offsets[self.doc_ids[0]]) if len(self.doc_ids) else 0

    def __len__(self) -> int:
        return self.num_rows

    def row(self, index: int) -> np.ndarray:
        """Tokens of row `index` as int64, shape (T,)."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range [0, {self.num_rows})")
        T, start = self.max_seq_len, index * self.max_seq_len
        tokens, offsets = self.cache.tokens, self.cache.doc_offsets
        if self.contiguous:
            return tokens[self.base + start : self.base + start + T].astype(np.int64)
        j = int(np.searchsorted(self.stream_starts, start, side="right")) - 1
        position, pieces, needed = start - int(self.stream_starts[j]), [], T
        while needed > 0:
            doc = self.doc_ids[j]
            begin = int(offsets[doc]) + position
            end = min(int(offsets[doc + 1]), begin + needed)
            pieces.append(tokens[begin:end])
            needed -= end - begin
            j, position = j + 1, 0
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(self.row(index))
        return {"input_ids": input_ids, "labels": input_ids.clone()}


class PaddedDataset(Dataset):
    """One document per row, MiniMind's PretrainDataset format: (T,) ids and (T,) labels."""

    def __init__(self, cache: TokenCache, doc_ids, max_seq_len: int, pad_id: int = PAD_TOKEN_ID):
        self.cache = cache
        self.max_seq_len = _check_seq_len(max_seq_len)
        self.doc_ids = _check_doc_ids(cache, doc_ids)
        if len(self.doc_ids) == 0:
            raise DataError(
                f"{cache.data_path}: no documents selected for the padded dataset; "
                "add data or lower the validation fraction"
            )
        if not 0 <= pad_id < cache.vocab_size:
            raise ValueError(
                f"pad_id={pad_id} is outside the vocabulary [0, {cache.vocab_size}); "
                f"use {PAD_TOKEN_ID} (<|endoftext|>)"
            )
        self.pad_id = int(pad_id)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        T = self.max_seq_len
        doc = self.cache.doc(self.doc_ids[index])
        input_ids = np.full(T, self.pad_id, dtype=np.int64)
        if len(doc) <= T:
            input_ids[: len(doc)] = doc
        elif doc[-1] == EOS_TOKEN_ID:  # cut, keeping the EOS as MiniMind's max_length - 2 does
            input_ids[: T - 1], input_ids[T - 1] = doc[: T - 1], EOS_TOKEN_ID
        else:
            input_ids[:] = doc[:T]
        labels = input_ids.copy()
        labels[input_ids == self.pad_id] = IGNORE_INDEX
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
