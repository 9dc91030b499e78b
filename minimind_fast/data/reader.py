"""Streaming reader for pretraining text: MiniMind's JSONL and plain .txt, with bad-line accounting.

Formats (chosen by file extension):
- `.jsonl` / `.json`: one `{"text": "..."}` object per line, MiniMind's pretraining format
  (extra keys are ignored, blank lines are skipped silently).
- `.txt` / `.text` / `.md`: documents separated by one or more blank lines.

The file is read line by line in binary mode, so a 1 GB file never lives in memory. A JSONL line
longer than MAX_LINE_BYTES (a whole JSON array on one line) is skipped without being held in
memory; a .txt document is cut into pieces of about MAX_LINE_BYTES, and a .txt line longer than
that (a file without newlines) is cut too, after a space where there is one, else on a UTF-8
character boundary. Bad lines (malformed JSON, no "text" key, non-string text, bytes that are not
UTF-8, JSON escapes of lone surrogates that are no Unicode text, over-long JSONL lines) are
skipped and counted in `SkipStats`, which logs one summary naming the file, the counts and the
first line numbers. Problems that make a file unusable (missing, a directory, empty, wrong
extension) raise `DataError` up front, before any training or DataLoader worker starts.

`iter_jsonl_records` is the JSONL line reader for any record format (UTF-8, blank lines, JSON,
lone surrogates and over-long lines handled and counted); `iter_documents` builds on it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError

logger = logging.getLogger("minimind_fast.data")

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md")
MAX_LINES_SHOWN = 5
MAX_LINE_BYTES = 8 << 20  # one JSONL line (one document) is at most 8 MiB; read at call time
# A JSON escape of a UTF-16 surrogate; json.loads pairs valid ones and leaves lone ones in the str.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
FORMAT_HINT = (
    'one JSON object {"text": "..."} per line (.jsonl, UTF-8) or a .txt file with '
    "documents separated by blank lines"
)

BAD_JSON = "malformed JSON"
NO_TEXT = 'missing "text" field'
NOT_STRING = '"text" is not a string'
NOT_UTF8 = "not valid UTF-8"
LONE_SURROGATE = "lone surrogate escape like \\ud83d (not Unicode text)"
TOO_SHORT = "too short"


def _too_long_reason() -> str:
    size = MAX_LINE_BYTES
    shown = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size} bytes"
    return f"line longer than {shown} (split it into documents)"


class SkipStats:
    """Counts of skipped lines/documents per reason, with the first few line numbers of each."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.counts: dict[str, int] = defaultdict(int)
        self.lines: dict[str, list[int]] = defaultdict(list)
        self.bytes_read = 0  # progress of the reader through the file, in bytes

    def add(self, reason: str, line_number: int) -> None:
        self.counts[reason] += 1
        if len(self.lines[reason]) < MAX_LINES_SHOWN:
            self.lines[reason].append(int(line_number))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """E.g. `2 malformed JSON (lines 3, 9); 1 missing "text" field (line 4)`."""
        parts = []
        for reason, count in self.counts.items():
            shown = self.lines[reason]
            where = ("line " if len(shown) == 1 else "lines ") + ", ".join(map(str, shown))
            more = ", ..." if count > len(shown) else ""
            parts.append(f"{count} {reason} ({where}{more})")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {
            reason: {"count": count, "first_lines": self.lines[reason]}
            for reason, count in self.counts.items()
        }

    def log(self) -> None:
        if self.total:
            logger.warning(
                "%s: skipped %d line(s)/document(s): %s", self.path, self.total, self.summary()
            )


def check_data_path(path) -> Path:
    """Validate that `path` is a readable, non-empty file of a known format; return it resolved."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"data file not found: {path}. Pass an existing file ({FORMAT_HINT}); "
            "for pretraining, omit --data_path to use the built-in corpus."
        )
    if path.is_dir():
        raise DataError(
            f"{path} is a directory, not a data file. Pass one file inside it with "
            f"--data_path ({FORMAT_HINT})."
        )
    if path.suffix.lower() not in JSONL_SUFFIXES + TEXT_SUFFIXES:
        raise DataError(
            f"unsupported data file extension {path.suffix!r} for {path}: use "
            f"{', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} ({FORMAT_HINT})."
        )
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as error:
        raise DataError(
            f"cannot read data file {path}: {error.strerror}. Check its permissions."
        ) from None
    if size == 0:
        raise DataError(f"data file is empty: {path} (0 bytes). Write {FORMAT_HINT}.")
    return path.resolve()


def _decode(
    raw: bytes, line_number: int, stats: SkipStats, strip_bom: bool | None = None
) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.add(NOT_UTF8, line_number)
        return None
    if strip_bom is None:
        strip_bom = line_number == 1
    return line[1:] if strip_bom and line.startswith("\ufeff") else line


def _raw_lines(file, stats: SkipStats) -> Iterator[tuple[int, bytes]]:
    """(line_number, bytes) of each line of a binary file; a line longer than MAX_LINE_BYTES is
    drained in 1 MiB pieces, counted in stats and not yielded."""
    limit = MAX_LINE_BYTES
    line_number = 0
    while True:
        raw = file.readline(limit + 1)
        if not raw:
            return
        line_number += 1
        stats.bytes_read += len(raw)
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = file.readline(1 << 20)
                stats.bytes_read += len(raw)
            stats.add(_too_long_reason(), line_number)
            continue
        yield line_number, raw


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_has_surrogate, value))
    return False


def iter_jsonl_records(path, stats: SkipStats) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, record)` per parsed JSON line of `path`, streaming.

    Blank lines are skipped silently; lines that are not UTF-8, not JSON, longer than
    MAX_LINE_BYTES, or hold a lone surrogate escape anywhere (no tokenizer can encode it) are
    skipped and counted in stats. line_number is 1-based. The record's shape is the caller's
    to check.
    """
    with open(path, "rb") as file:
        for line_number, raw in _raw_lines(file, stats):
            line = _decode(raw, line_number, stats)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                stats.add(BAD_JSON, line_number)
                continue
            if _SURROGATE_ESCAPE.search(line) and _has_surrogate(record):
                stats.add(LONE_SURROGATE, line_number)
                continue
            yield line_number, record


def iter_documents(path, stats: SkipStats) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, text)` per usable document of `path`, streaming; bad lines go to stats.

    line_number is 1-based: the document's line (JSONL) or its first line (.txt).
    """
    path = Path(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, stats)
    else:
        yield from _iter_text(path, stats)


def _iter_jsonl(path: Path, stats: SkipStats) -> Iterator[tuple[int, str]]:
    for line_number, record in iter_jsonl_records(path, stats):
        if not isinstance(record, dict) or "text" not in record:
            stats.add(NO_TEXT, line_number)
            continue
        text = record["text"]
        if not isinstance(text, str):
            stats.add(NOT_STRING, line_number)
            continue
        yield line_number, text


def _cut_point(raw: bytes, limit: int) -> int:
    """Where to cut the first `limit` bytes of an over-long line: after the last space or tab
    of their second half, else on the last UTF-8 character boundary (the cut is >= 1)."""
    cut = max(raw.rfind(b" ", limit // 2, limit), raw.rfind(b"\t", limit // 2, limit))
    if cut >= 0:
        return cut + 1
    cut = limit
    while cut > max(1, limit - 3) and raw[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    return cut


def _text_lines(file, stats: SkipStats) -> Iterator[tuple[int, bytes, bool]]:
    """(line_number, bytes, cut) per line of a binary file; a line longer than MAX_LINE_BYTES comes
    in pieces of at most that size, all but its last with cut=True."""
    limit = MAX_LINE_BYTES
    line_number, rest = 0, b""
    while True:
        raw = rest + file.readline(limit + 1 - len(rest))
        if not raw:
            return
        stats.bytes_read += len(raw) - len(rest)
        line_number += not rest
        rest = b""
        if len(raw) > limit and not raw.endswith(b"\n"):
            cut = _cut_point(raw, limit)
            raw, rest = raw[:cut], raw[cut:]
        yield line_number, raw, bool(rest)


def _iter_text(path: Path, stats: SkipStats) -> Iterator[tuple[int, str]]:
    lines: list[str] = []
    first_line = size = 0
    piece_of_line = False  # this piece continues a line that was cut
    with open(path, "rb") as file:
        for line_number, raw, cut in _text_lines(file, stats):
            first = line_number == 1 and not piece_of_line
            line = _decode(raw, line_number, stats, strip_bom=first)
            piece_of_line = cut
            if line is None:
                continue
            if line.strip():
                if not lines:
                    first_line = line_number
                lines.append(line)
                size += len(raw)
                if size < MAX_LINE_BYTES and not cut:
                    continue
            if lines:  # a blank line, a document that reached MAX_LINE_BYTES, a cut line: end it
                yield first_line, "".join(lines).rstrip("\r\n")
                lines, size = [], 0
    if lines:
        yield first_line, "".join(lines).rstrip("\r\n")
