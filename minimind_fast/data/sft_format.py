"""Reader for MiniMind's SFT JSONL: one conversation per line, validated, bad lines counted.

Format (MiniMind's dataset/lm_dataset.py SFTDataset; `messages` is accepted as the Hugging Face
name for the same list):

    {"conversations": [{"role": "system", "content": "..."},
                       {"role": "user", "content": "..."},
                       {"role": "assistant", "content": "..."}, ...]}

Roles are system, user and assistant; extra keys of a message (e.g. `reasoning_content`) are
ignored. A line is skipped and counted in `SkipStats` (file, reason, first line numbers) when it
is malformed JSON, has no conversation list, or any message lacks a role, has an unknown role,
lacks content, has non-string or empty content, or spells a special token in its content (the
template would read it as structure); a conversation without an assistant turn has nothing to
learn and is skipped too. Lines are read with the pretraining reader's JSONL reader, so
malformed JSON, not-UTF-8 and over-long lines are handled (and counted) the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..constants import SPECIAL_TOKENS
from .reader import JSONL_SUFFIXES, DataError, SkipStats, check_data_path, iter_jsonl_records

ROLES = ("system", "user", "assistant")
CONVERSATION_KEYS = ("conversations", "messages")
SFT_FORMAT_HINT = ('one JSON object {"conversations": [{"role": "user", "content": "..."}, '
                   '{"role": "assistant", "content": "..."}]} per line (.jsonl, UTF-8)')

NO_CONVERSATION = 'no "conversations" (or "messages") list'
EMPTY_CONVERSATION = "empty conversation"
NOT_AN_OBJECT = "message is not a JSON object"
MISSING_ROLE = 'message without "role"'
UNKNOWN_ROLE = "unknown role (use system, user or assistant)"
MISSING_CONTENT = 'message without "content"'
NON_STRING_CONTENT = '"content" is not a string'
EMPTY_CONTENT = 'empty "content"'
SPECIAL_IN_CONTENT = f"content spells a special token ({', '.join(SPECIAL_TOKENS)})"
NO_ASSISTANT = "no assistant turn"

Message = tuple[str, str]  # (role, content)


def conversation_problem(record, require_assistant: bool = True) -> str | None:
    """The reason `record` (a parsed JSON line, or a bare list of messages) is unusable, or None."""
    messages = record
    if isinstance(record, dict):
        key = next((k for k in CONVERSATION_KEYS if k in record), None)
        messages = record[key] if key is not None else None
    if not isinstance(messages, list):
        return NO_CONVERSATION
    if not messages:
        return EMPTY_CONVERSATION
    for message in messages:
        if not isinstance(message, dict):
            return NOT_AN_OBJECT
        if "role" not in message:
            return MISSING_ROLE
        if message["role"] not in ROLES:
            return UNKNOWN_ROLE
        if "content" not in message:
            return MISSING_CONTENT
        content = message["content"]
        if not isinstance(content, str):
            return NON_STRING_CONTENT
        if not content.strip():
            return EMPTY_CONTENT
        if any(token in content for token in SPECIAL_TOKENS):
            return SPECIAL_IN_CONTENT
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        return NO_ASSISTANT
    return None


def to_messages(record, require_assistant: bool = True) -> list[Message]:
    """Validated (role, content) pairs of a record or a message list; ValueError if unusable."""
    problem = conversation_problem(record, require_assistant)
    if problem is not None:
        raise ValueError(f"unusable conversation: {problem}. Pass {SFT_FORMAT_HINT}")
    messages = record
    if isinstance(record, dict):
        messages = record[next(k for k in CONVERSATION_KEYS if k in record)]
    return [(m["role"], m["content"]) for m in messages]


def check_sft_data_path(path) -> Path:
    """Like `check_data_path`, and the file must be JSONL: SFT has no plain-text format."""
    path = check_data_path(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(f"SFT data must be JSONL, got {path.name}: write {SFT_FORMAT_HINT}")
    return path


def iter_conversations(path, stats: SkipStats) -> Iterator[tuple[int, list[Message]]]:
    """Yield `(line_number, messages)` per usable line of `path`, streaming; bad lines go to stats.

    line_number is 1-based; blank lines are skipped silently, as in the pretraining reader.
    """
    for line_number, record in iter_jsonl_records(path, stats):
        problem = conversation_problem(record)
        if problem is not None:
            stats.add(problem, line_number)
            continue
        yield line_number, to_messages(record)
