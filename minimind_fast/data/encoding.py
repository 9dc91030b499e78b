"""Texts -> token ids of documents: where BOS/EOS go, what a special token written in a text
means, and tokenisation in bounded pieces.

BOS/EOS (`add_special_tokens`):
- "auto" (default): each document is [BOS] + text + [EOS], except that a text that already
  starts with `<|im_start|>` (BOS) or ends with `<|im_end|>` (EOS), as the texts of MiniMind2's
  pretrain_hq.jsonl do, keeps its own marker instead of getting a second one.
- "always": [BOS] + text + [EOS] whatever the text holds: MiniMind's current PretrainDataset
  (dataset/lm_dataset.py as MiniMind-3 ships it), which doubles the markers of marked texts.
- "never": the text's tokens only; documents run into each other unless the texts carry markers.

Special-token strings inside a text (`literal_special_tokens`):
- "split" (default): they are document boundaries, never tokens in the middle of a document. A
  literal `<|im_start|>` starts a new document and `<|im_end|>` ends one (each serving as that
  document's BOS/EOS); `<|endoftext|>` (the pad token) separates two documents and is dropped.
  The pieces lose the whitespace around the cut, and whitespace-only pieces are dropped. So no
  cached document holds a pad id, and BOS/EOS ids sit only at document edges.
- "keep": the text is tokenised as MiniMind's tokenizer reads it: each literal marker becomes its
  special id in place (`<|endoftext|>` included, so a document can hold the pad id: padded rows
  mask it from the loss as MiniMind does; packed rows refuse such a cache).

Tokenisation is bounded in memory: a text is handed to the tokenizer in pieces of at most
ENCODE_CHARS characters, cut just before a space or newline that precedes a non-space character
(a boundary of the byte-level pre-tokenizer, so the ids equal those of the whole text), or, with
no such place in the second half of a piece, at ENCODE_CHARS; and one `encode_batch` call gets at
most BATCH_CHARS characters.
"""

from __future__ import annotations

import itertools
import re
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from ..constants import BOS_TOKEN_ID, EOS_TOKEN_ID, SPECIAL_TOKENS

ADD_SPECIAL_TOKENS = ("auto", "always", "never")
LITERAL_SPECIAL_TOKENS = ("split", "keep")
ENCODE_CHARS = 1 << 16  # the longest piece of text one tokenizer call sees
BATCH_DOCS = 2048  # pieces per encode_batch call
BATCH_CHARS = 1 << 20  # ... or this many characters, whichever comes first

BOS_TEXT, EOS_TEXT = SPECIAL_TOKENS[BOS_TOKEN_ID], SPECIAL_TOKENS[EOS_TOKEN_ID]
_MARKER = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")
_LONGEST_MARKER = max(map(len, SPECIAL_TOKENS))


def check_modes(add_special_tokens: str, literal_special_tokens: str) -> None:
    """ValueError naming the bad value and the choices."""
    if add_special_tokens not in ADD_SPECIAL_TOKENS:
        raise ValueError(
            f"add_special_tokens={add_special_tokens!r}: use one of {', '.join(ADD_SPECIAL_TOKENS)}"
        )
    if literal_special_tokens not in LITERAL_SPECIAL_TOKENS:
        raise ValueError(
            f"literal_special_tokens={literal_special_tokens!r}: use one of "
            f"{', '.join(LITERAL_SPECIAL_TOKENS)}"
        )


def split_at_special_tokens(text: str) -> list[str]:
    """The documents of `text` for literal_special_tokens="split" (see the module docstring)."""
    if "<|" not in text:
        return [text]
    pieces: list[str] = []
    current: list[str] = []

    def close():
        piece = "".join(current).strip()
        if piece:
            pieces.append(piece)
        current.clear()

    for i, part in enumerate(_MARKER.split(text)):  # text, marker, text, marker, ...
        if i % 2 == 0:
            current.append(part)
        elif part == BOS_TEXT:
            close()
            current.append(part)
        elif part == EOS_TEXT:
            current.append(part)
            close()
        else:  # the pad token: a boundary
            close()
    close()
    return pieces


def _cut(text: str, start: int, end: int) -> int:
    """Where to end the piece text[start:end] (end < len(text)): before the last space/newline of
    its second half that precedes a non-space, else at the last edge of a special-token string
    there (the tokenizer splits those off first), else at `end`."""
    floor, i = start + (end - start) // 2, end
    while True:
        i = max(text.rfind(" ", floor, i), text.rfind("\n", floor, i))
        if i <= floor:
            break
        if not text[i + 1].isspace():
            return i
    edges = [
        edge
        for match in _MARKER.finditer(text, floor, end + _LONGEST_MARKER)
        for edge in match.span()
        if floor < edge <= end
    ]
    return max(edges, default=end)


def _chunks(text: str, size: int) -> list[str]:
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        end = _cut(text, start, start + size)
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


class Document:
    """One encoded document: line_number (of its text in the data file), text_ids (n,) (the
    text's own ids, a leading BOS / trailing EOS marker excluded) and the special ids around them
    (prefix, suffix)."""

    __slots__ = ("line_number", "prefix", "suffix", "parts", "text_ids")

    def __init__(self, line_number: int, prefix: tuple[int, ...], suffix: tuple[int, ...]):
        self.line_number, self.prefix, self.suffix = line_number, prefix, suffix
        self.parts: list[np.ndarray] = []  # ids of its pieces, until the last one is encoded
        self.text_ids: np.ndarray | None = None

    def finish(self) -> Document:
        self.text_ids = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        self.parts = []
        return self


def _edges(text: str, mode: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(text without its leading BOS / trailing EOS marker, prefix ids, suffix ids)."""
    lead, trail = text.startswith(BOS_TEXT), text.endswith(EOS_TEXT)
    body = (
        text[len(BOS_TEXT) if lead else 0 : len(text) - len(EOS_TEXT) if trail else len(text)]
        if lead or trail
        else text
    )
    own_bos, own_eos = (BOS_TOKEN_ID,) * lead, (EOS_TOKEN_ID,) * trail
    if mode == "always":
        return body, (BOS_TOKEN_ID,) + own_bos, own_eos + (EOS_TOKEN_ID,)
    if mode == "auto":
        return body, (BOS_TOKEN_ID,), (EOS_TOKEN_ID,)
    return body, own_bos, own_eos


def encode_documents(
    tokenizer: Tokenizer,
    texts: Iterable[tuple[int, str]],
    add_special_tokens: str,
    literal_special_tokens: str,
    dtype,
    batch_docs: int | None = None,
    batch_chars: int | None = None,
) -> Iterator[list[Document]]:
    """Encode `(line_number, text)` pairs; yield the finished documents in order, a list per
    tokenizer batch (a long document may take several batches and finish in a later one).
    batch_docs / batch_chars: bounds of one tokenizer call (default BATCH_DOCS / BATCH_CHARS)."""
    check_modes(add_special_tokens, literal_special_tokens)
    batch_docs, batch_chars = batch_docs or BATCH_DOCS, batch_chars or BATCH_CHARS
    piece_chars = ENCODE_CHARS
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets nobody here reads
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    units: list[tuple[Document, str, bool]] = []  # (document, piece of its text, last piece?)
    chars = 0

    def run() -> list[Document]:
        encodings = encode([piece for _, piece, _ in units], add_special_tokens=False)
        lengths = [len(e.ids) for e in encodings]
        flat = np.fromiter(
            itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype, count=sum(lengths)
        )
        finished, start = [], 0
        for (doc, _, last), length in zip(units, lengths, strict=True):
            doc.parts.append(flat[start : start + length])
            start += length
            if last:
                finished.append(doc.finish())
        units.clear()
        return finished

    for line_number, text in texts:
        pieces = split_at_special_tokens(text) if literal_special_tokens == "split" else [text]
        for piece in pieces:
            body, prefix, suffix = _edges(piece, add_special_tokens)
            doc = Document(line_number, prefix, suffix)
            chunks = _chunks(body, piece_chars)
            for i, chunk in enumerate(chunks):
                units.append((doc, chunk, i == len(chunks) - 1))
                chars += len(chunk)
                if len(units) >= batch_docs or chars >= batch_chars:
                    yield run()
                    chars = 0
    if units:
        yield run()


def join(documents: list[Document], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): the documents back to back with their special ids, and each length."""
    prefixes = np.fromiter(map(len, (d.prefix for d in documents)), np.int64, len(documents))
    suffixes = np.fromiter(map(len, (d.suffix for d in documents)), np.int64, len(documents))
    texts = [d.text_ids for d in documents]
    lengths = prefixes + suffixes + np.fromiter(map(len, texts), np.int64, len(documents))
    starts = np.cumsum(lengths) - lengths
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    is_text = np.ones(len(tokens), dtype=bool)
    ends = starts + lengths
    for counts, offsets, ids in (
        (prefixes, starts, (d.prefix for d in documents)),
        (suffixes, ends - suffixes, (d.suffix for d in documents)),
    ):
        # position j of document i's prefix (suffix) is offsets[i] + j
        first = np.repeat(offsets - (np.cumsum(counts) - counts), counts)
        where = first + np.arange(int(counts.sum()))
        tokens[where] = np.fromiter(itertools.chain.from_iterable(ids), dtype, len(where))
        is_text[where] = False
    tokens[is_text] = np.concatenate(texts) if texts else np.empty(0, dtype=dtype)
    return tokens, lengths
