"""Streaming reader for pretraining text: MiniMind's JSONL and plain .txt, with bad-line accounting.

Formats (chosen by file extension):
- `.jsonl` / `.json`: one `{"text": "..."}` object per line, MiniMind's pretraining format
  (extra keys are ignored, blank lines are skipped silently).
- `.txt` / `.text` / `.md`: documents separated by one or more blank lines.

The file is read line by line in binary mode, so a 1 GB file never lives in memory; a line longer
than MAX_LINE_BYTES (a whole JSON array on one line, a file without newlines) is skipped without
being held in memory, and a .txt document is cut into pieces of about that size. Bad lines
(malformed JSON, no "text" key, non-string text, bytes that are not UTF-8, over-long lines) are
skipped and counted in `SkipStats`, which logs one summary naming the file, the counts and the
first line numbers. Problems that make a file unusable (missing, a directory, empty, wrong
extension) raise `DataError` up front, before any training or DataLoader worker starts.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("minimind_fast.data")

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".text", ".md")
MAX_LINES_SHOWN = 5
MAX_LINE_BYTES = 8 << 20  # one JSONL line (one document) is at most 8 MiB; read at call time
FORMAT_HINT = ('one JSON object {"text": "..."} per line (.jsonl, UTF-8) or a .txt file with '
               "documents separated by blank lines")

BAD_JSON = "malformed JSON"
NO_TEXT = 'missing "text" field'
NOT_STRING = '"text" is not a string'
NOT_UTF8 = "not valid UTF-8"
TOO_SHORT = "too short"


def _too_long_reason() -> str:
    size = MAX_LINE_BYTES
    return f"line longer than {f'{size >> 20} MiB' if size >= 1 << 20 else f'{size} bytes'} (split it into documents)"


class DataError(ValueError):
    """A user-facing data problem; the message names the file (and line) and the fix."""


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
        return {reason: {"count": count, "first_lines": self.lines[reason]}
                for reason, count in self.counts.items()}

    def log(self) -> None:
        if self.total:
            logger.warning("%s: skipped %d line(s)/document(s): %s", self.path, self.total, self.summary())


def check_data_path(path) -> Path:
    """Validate that `path` is a readable, non-empty file of a known format; return it resolved."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}. Pass an existing file ({FORMAT_HINT}); "
                        "for pretraining, omit --data_path to use the built-in corpus.")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file. Pass one file inside it with "
                        f"--data_path ({FORMAT_HINT}).")
    if path.suffix.lower() not in JSONL_SUFFIXES + TEXT_SUFFIXES:
        raise DataError(f"unsupported data file extension {path.suffix!r} for {path}: use "
                        f"{', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} ({FORMAT_HINT}).")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror}. Check its permissions.") from None
    if size == 0:
        raise DataError(f"data file is empty: {path} (0 bytes). Write {FORMAT_HINT}.")
    return path.resolve()


def iter_documents(path, stats: SkipStats) -> Iterator[tuple[int, str]]:
    """Yield `(line_number, text)` per usable document of `path`, streaming; bad lines go to stats.

    line_number is 1-based: the document's line (JSONL) or its first line (.txt).
    """
    path = Path(path)
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, stats)
    else:
        yield from _iter_text(path, stats)


def _decode(raw: bytes, line_number: int, stats: SkipStats) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.add(NOT_UTF8, line_number)
        return None
    return line[1:] if line_number == 1 and line.startswith("\ufeff") else line  # drop a BOM


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


def _iter_jsonl(path: Path, stats: SkipStats) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as file:
        for line_number, raw in _raw_lines(file, stats):
            line = _decode(raw, line_number, stats)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # JSONDecodeError, and lone surrogates that are not valid text
                stats.add(BAD_JSON, line_number)
                continue
            if not isinstance(record, dict) or "text" not in record:
                stats.add(NO_TEXT, line_number)
                continue
            text = record["text"]
            if not isinstance(text, str):
                stats.add(NOT_STRING, line_number)
                continue
            yield line_number, text


def _iter_text(path: Path, stats: SkipStats) -> Iterator[tuple[int, str]]:
    lines: list[str] = []
    first_line = size = 0
    with open(path, "rb") as file:
        for line_number, raw in _raw_lines(file, stats):
            line = _decode(raw, line_number, stats)
            if line is None:
                continue
            if line.strip():
                if not lines:
                    first_line = line_number
                lines.append(line)
                size += len(raw)
                if size < MAX_LINE_BYTES:
                    continue
            if lines:  # a blank line, or a document that reached MAX_LINE_BYTES: cut it here
                yield first_line, "".join(lines).rstrip("\r\n")
                lines, size = [], 0
    if lines:
        yield first_line, "".join(lines).rstrip("\r\n")
