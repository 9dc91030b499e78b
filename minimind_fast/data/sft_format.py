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
SFT_FORMAT_HINT = (
    'one JSON object {"conversations": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]} per line (.jsonl, UTF-8)'
)

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


def parse_conversation(
    record, require_assistant: bool = True
) -> tuple[list[Message] | None, str | None]:
    """(messages, None) for a usable record (a parsed JSON line, or a bare list of messages),
    else (None, the reason it is unusable)."""
    messages = record
    if isinstance(record, dict):
        key = next((k for k in CONVERSATION_KEYS if k in record), None)
        messages = record[key] if key is not None else None
    if not isinstance(messages, list):
        return None, NO_CONVERSATION
    if not messages:
        return None, EMPTY_CONVERSATION
    pairs = []
    for message in messages:
        if not isinstance(message, dict):
            return None, NOT_AN_OBJECT
        if "role" not in message:
            return None, MISSING_ROLE
        role = message["role"]
        if role not in ROLES:
            return None, UNKNOWN_ROLE
        if "content" not in message:
            return None, MISSING_CONTENT
        content = message["content"]
        if not isinstance(content, str):
            return None, NON_STRING_CONTENT
        if not content.strip():
            return None, EMPTY_CONTENT
        if "<|" in content and any(token in content for token in SPECIAL_TOKENS):
            return None, SPECIAL_IN_CONTENT
        pairs.append((role, content))
    if require_assistant and not any(role == "assistant" for role, _ in pairs):
        return None, NO_ASSISTANT
    return pairs, None


def conversation_problem(record, require_assistant: bool = True) -> str | None:
    """The reason `record` is unusable, or None (see parse_conversation)."""
    return parse_conversation(record, require_assistant)[1]


def to_messages(record, require_assistant: bool = True) -> list[Message]:
    """Validated (role, content) pairs of a record or a message list; ValueError if unusable."""
    messages, problem = parse_conversation(record, require_assistant)
    if problem is not None:
        raise ValueError(f"unusable conversation: {problem}. Pass {SFT_FORMAT_HINT}")
    return messages


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
        messages, problem = parse_conversation(record)
        if problem is not None:
            stats.add(problem, line_number)
            continue
        yield line_number, messages
