"""Test-only oracle: MiniMind's SFT row (jingyaogong/minimind, dataset/lm_dataset.py SFTDataset),
restated from its rule, minus its random system prompts and think-tag edits.

MiniMind renders the conversation with the tokenizer's chat template, tokenises the text, cuts it
to max_length tokens, right-pads with the pad id, and labels it by scanning the ids: after every
occurrence of the ids of "<|im_start|>assistant\\n", each token up to and including the next
occurrence of the ids of "<|im_end|>\\n" keeps its id as label; everything else is -100.
"""

from __future__ import annotations

IGNORE = -100


def _find(ids, pattern, start):
    """First index >= start where `pattern` occurs in ids, or len(ids)."""
    for i in range(start, len(ids) - len(pattern) + 1):
        if ids[i : i + len(pattern)] == pattern:
            return i
    return len(ids)


def minimind_labels(ids, reply_start, reply_end, max_length=None):
    """Labels of `ids` under MiniMind's rule; reply_start/reply_end are the id lists of
    "<|im_start|>assistant\\n" and "<|im_end|>\\n"."""
    ids = list(ids)
    limit = len(ids) if max_length is None else max_length
    labels = [IGNORE] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i : i + len(reply_start)] != reply_start:
            i += 1
            continue
        begin = i + len(reply_start)
        end = _find(ids, reply_end, begin)
        for j in range(begin, min(end + len(reply_end), limit, len(ids))):
            labels[j] = ids[j]
        i = end + len(reply_end) if end < len(ids) else len(ids)
    return labels


def minimind_row(hf_tokenizer, messages, max_length):
    """(input_ids, labels), each a list of max_length ints, as MiniMind's SFTDataset builds them."""
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = hf_tokenizer(text)["input_ids"][:max_length]
    ids = ids + [hf_tokenizer.pad_token_id] * (max_length - len(ids))

    def ids_of(text):
        return hf_tokenizer(text, add_special_tokens=False)["input_ids"]

    start = ids_of(f"{hf_tokenizer.bos_token}assistant\n")
    end = ids_of(f"{hf_tokenizer.eos_token}\n")
    return ids, minimind_labels(ids, start, end, max_length)
