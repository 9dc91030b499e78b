"""Map-style SFT datasets over an SFTCache: `packed` (default) and MiniMind-style `padded` rows.

Both return labels aligned with input_ids (labels[t] is input_ids[t] where scored, else
IGNORE_INDEX); the model shifts inside, so position t is trained to predict labels[t + 1].

Truncation, for a conversation longer than T = max_seq_len: it is cut just after the last
assistant message that ends within T tokens (a turn boundary). If no assistant message fits
whole, it is cut at T tokens (as MiniMind cuts), keeping the reply's first part; if that leaves
no scored token, the conversation is skipped and counted (warning with its line numbers).

- SFTPaddedDataset: one conversation per row, right-padded with pad_id; pad labels are
  IGNORE_INDEX. Row: {"input_ids": (T,), "labels": (T,)}, int64.
- SFTPackedDataset: conversations packed whole into rows of T tokens, never split across rows
  (a split-off reply would be trained without its question). Rows are filled best-fit
  decreasing (longest conversation first, into the row with the least room that holds it),
  which leaves little padding; the tail of a row that nothing fits is padded as above.
  Row: {"input_ids": (T,), "labels": (T,), "segment_ids": (T,)}, int64. segment_ids numbers
  the conversations of the row 0, 1, ... in order; the padded tail forms one last segment.
  The model turns segment_ids into a document mask (`layers.document_causal_mask`), so a token
  attends only within its own conversation. Without it attention would cross conversations,
  but no loss would: every conversation starts with an unscored `<|im_start|>`, so no position
  is trained to predict the next conversation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import IGNORE_INDEX, PAD_TOKEN_ID
from .datasets import _check_doc_ids, _check_seq_len
from .reader import DataError, SkipStats
from .sft_cache import SFTCache


def kept_lengths(
    cache: SFTCache, doc_ids: np.ndarray, max_seq_len: int, stats: SkipStats | None = None
) -> np.ndarray:
    """Tokens kept of each conversation in doc_ids after truncation: (n,) int64, 0 = skipped.

    Skipped conversations (no scored token within max_seq_len) are counted in `stats`.
    """
    offsets = cache.doc_offsets
    lengths = offsets[doc_ids + 1] - offsets[doc_ids]
    for j in np.flatnonzero(lengths > max_seq_len):
        doc = int(doc_ids[j])
        ends = cache.turn_ends(doc)
        fitting = ends[ends <= max_seq_len]
        if len(fitting):
            lengths[j] = fitting[-1]
        elif cache.conversation(doc)[1][:max_seq_len].any():
            lengths[j] = max_seq_len
        else:
            lengths[j] = 0
            if stats is not None:
                stats.add(
                    f"no assistant token within max_seq_len={max_seq_len}",
                    int(cache.line_numbers[doc]),
                )
    return lengths


def pack_best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of `lengths` (each <= capacity) into rows of `capacity`.

    Longest first, each into the row with the least room that still holds it, else a new row.
    Returns one list of indices into `lengths` per row, in creation order; every index of a
    length > 0 appears exactly once (zeros are left out). Deterministic."""
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(
            f"a length of {int(lengths.max())} exceeds the row capacity {capacity}; "
            "truncate first (kept_lengths)"
        )
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    rows_with_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # by free tokens
    has_room = 0  # bit c set <=> some row has exactly c free tokens
    for index in order.tolist():
        length = int(lengths[index])
        if length <= 0:
            break  # sorted: only skipped conversations remain
        larger = has_room >> length
        if larger:  # the smallest room >= length: lowest set bit at or above `length`
            room = length + (larger & -larger).bit_length() - 1
            row = rows_with_room[room].pop()
            if not rows_with_room[room]:
                has_room &= ~(1 << room)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        left = room - length
        if left:
            rows_with_room[left].append(row)
            has_room |= 1 << left
    return rows


class _SFTRows(Dataset):
    """Shared set-up. doc_ids: the conversations to use (None: all; e.g. from split_documents).
    After truncation, `doc_ids` and `lengths` hold the kept conversations and their kept token
    counts, `skipped` (SkipStats) the ones dropped, with their line numbers."""

    def __init__(self, cache: SFTCache, doc_ids, max_seq_len: int, pad_id: int = PAD_TOKEN_ID):
        self.cache = cache
        self.max_seq_len = _check_seq_len(max_seq_len)
        doc_ids = _check_doc_ids(cache, doc_ids)
        if not 0 <= pad_id < cache.vocab_size:
            raise ValueError(
                f"pad_id={pad_id} is outside the vocabulary [0, {cache.vocab_size})"
                f"; use {PAD_TOKEN_ID} (<|endoftext|>)"
            )
        self.pad_id = int(pad_id)
        self.skipped = SkipStats(cache.data_path)
        lengths = kept_lengths(cache, doc_ids, self.max_seq_len, self.skipped)
        self.skipped.log()
        kept = lengths > 0
        if not kept.any():
            raise DataError(
                f"{cache.data_path}: none of the {len(doc_ids)} selected "
                f"conversations has an assistant token within max_seq_len="
                f"{self.max_seq_len}; raise --max_seq_len"
            )
        self.doc_ids, self.lengths = doc_ids[kept], lengths[kept]

    def _fill(self, input_ids: np.ndarray, labels: np.ndarray, position: int, j: int) -> int:
        """Copy kept conversation j into the row at `position`; returns the position after it."""
        length = int(self.lengths[j])
        ids, scored = self.cache.conversation(int(self.doc_ids[j]))
        end = position + length
        input_ids[position:end] = ids[:length]
        labels[position:end] = np.where(scored[:length] != 0, input_ids[position:end], IGNORE_INDEX)
        return end

    def _empty_row(self) -> tuple[np.ndarray, np.ndarray]:
        T = self.max_seq_len
        return np.full(T, self.pad_id, dtype=np.int64), np.full(T, IGNORE_INDEX, dtype=np.int64)


class SFTPaddedDataset(_SFTRows):
    """One conversation per row, right-padded: {"input_ids": (T,), "labels": (T,)} int64."""

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        input_ids, labels = self._empty_row()
        self._fill(input_ids, labels, 0, index)
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


class SFTPackedDataset(_SFTRows):
    """Whole conversations packed into rows of T tokens (best fit decreasing):
    {"input_ids": (T,), "labels": (T,), "segment_ids": (T,)} int64."""

    def __init__(self, cache: SFTCache, doc_ids, max_seq_len: int, pad_id: int = PAD_TOKEN_ID):
        super().__init__(cache, doc_ids, max_seq_len, pad_id)
        rows = pack_best_fit(self.lengths, self.max_seq_len)
        # row r holds kept conversations members[row_starts[r]:row_starts[r + 1]], in order
        self.members = np.fromiter(
            (j for row in rows for j in row), dtype=np.int64, count=len(self.lengths)
        )
        self.row_starts = np.cumsum([0] + [len(row) for row in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    @property
    def pad_fraction(self) -> float:
        """Share of all row tokens that are padding."""
        return 1.0 - float(self.lengths.sum()) / (len(self) * self.max_seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        input_ids, labels = self._empty_row()
        segment_ids = np.empty(self.max_seq_len, dtype=np.int64)
        position = 0
        members = self.members[self.row_starts[index] : self.row_starts[index + 1]]
        for segment, j in enumerate(members.tolist()):
            end = self._fill(input_ids, labels, position, j)
            segment_ids[position:end] = segment
            position = end
        segment_ids[position:] = len(members)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "segment_ids": torch.from_numpy(segment_ids),
        }
