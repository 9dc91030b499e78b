"""ChatML rendering straight to token ids, with MiniMind's SFT loss mask.

Each message renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`, the chat template that
ships in tokenizer_config.json (minimind_fast.data.tokenizer.CHAT_TEMPLATE). A `tokenizers` encoder
splits special tokens out of the text before anything else, so the pieces between markers
("{role}\\n{content}" and "\\n") are encoded independently; encoding them one by one and
joining them with the marker ids gives exactly the ids of
`PreTrainedTokenizerFast.apply_chat_template(messages, tokenize=True)`, without transformers.

Loss mask (MiniMind's SFTDataset.generate_labels): a token is scored when it lies in an assistant
message after its `<|im_start|>assistant\\n` header, up to and including the closing
`<|im_end|>` and the "\\n" that follows it; every other token (system and user messages,
all headers, the `<|im_start|>` markers) is not. When a reply begins with whitespace, the
byte-level pre-tokenizer can merge the header's "\\n" with it into one token; that token holds
reply text and is scored (MiniMind, which looks for the header's ids, would score nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from ..constants import BOS_TOKEN_ID, EOS_TOKEN_ID
from .sft_format import ROLES, Message, to_messages


@dataclass
class EncodedConversation:
    """ids: (L,) token ids; scored: (L,) bool, True where the label is the token itself;
    assistant_ends: positions just past each assistant message (after its closing "\\n"),
    the places where a too-long conversation can be cut at a turn boundary."""

    ids: np.ndarray
    scored: np.ndarray
    assistant_ends: list[int]


class ChatTemplateEncoder:
    """Encodes conversations (lists of (role, content)) to ids and loss masks with a tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self.newline = self._ids("\n")
        self.headers = {role: self._ids(f"{role}\n") for role in ROLES}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _header_length(self, role: str, content: str, ids: list[int]) -> int:
        """Tokens of `ids` (the encoding of "{role}\\n{content}") that hold header text only."""
        header = self.headers[role]
        if ids[: len(header)] == header:  # the usual case: the pre-tokenizer cut after "\n"
            return len(header)
        offsets = self.tokenizer.encode(f"{role}\n{content}", add_special_tokens=False).offsets
        return sum(1 for _, end in offsets if end <= len(role) + 1)

    def encode_batch(self, conversations: list[list[Message]]) -> list[EncodedConversation]:
        """Encode validated conversations (see sft_format.to_messages), one tokenizer call."""
        texts = [f"{role}\n{content}" for messages in conversations for role, content in messages]
        encoded = iter(e.ids for e in self._encode_batch(texts, add_special_tokens=False))
        newline = self.newline
        ids: list[int] = []  # the whole batch, split into conversations at the end
        scored: list[bool] = []
        starts, ends = [], []
        for messages in conversations:
            starts.append(len(ids))
            ends.append([])
            for role, content in messages:
                body = next(encoded)
                ids += [BOS_TOKEN_ID, *body, EOS_TOKEN_ID, *newline]
                if role == "assistant":
                    header = self._header_length(role, content, body)
                    scored += [False] * (1 + header)
                    scored += [True] * (len(body) - header + 1 + len(newline))
                    ends[-1].append(len(ids) - starts[-1])
                else:
                    scored += [False] * (len(body) + 2 + len(newline))
        all_ids = np.array(ids, dtype=np.int64)
        all_scored = np.array(scored, dtype=bool)
        bounds = starts[1:]
        return [
            EncodedConversation(i, m, e)
            for i, m, e in zip(
                np.split(all_ids, bounds), np.split(all_scored, bounds), ends, strict=True
            )
        ]

    def encode(self, messages) -> EncodedConversation:
        """One conversation: a list of {"role", "content"} dicts or (role, content) pairs."""
        if messages and isinstance(messages[0], tuple):
            messages = [{"role": role, "content": content} for role, content in messages]
        return self.encode_batch([to_messages(messages)])[0]

    def encode_prompt(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Ids of a chat prompt to generate from: the messages so far (no assistant turn needed),
        then `<|im_start|>assistant\\n` when add_generation_prompt, as the template renders it."""
        if messages and isinstance(messages[0], tuple):
            messages = [{"role": role, "content": content} for role, content in messages]
        pairs = to_messages(messages, require_assistant=False)
        texts = [f"{role}\n{content}" for role, content in pairs]
        ids: list[int] = []
        for encoding in self._encode_batch(texts, add_special_tokens=False):
            ids += [BOS_TOKEN_ID, *encoding.ids, EOS_TOKEN_ID, *self.newline]
        if add_generation_prompt:
            ids += [BOS_TOKEN_ID, *self.headers["assistant"]]
        return ids
