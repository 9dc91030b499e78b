"""Answer quality against a reference answer: token-level F1 (SQuAD's) and ROUGE-L (LCS F1).

Both compare lower-cased word tokens (runs of letters, digits and underscores, so punctuation
and markup do not count) and return a score in [0, 1]; two empty answers score 1, one empty
answer scores 0.
- token_f1: harmonic mean of precision and recall of the bag of tokens (SQuAD v1.1 evaluation).
- rouge_l: F1 from the longest common subsequence of the two token sequences (Lin, 2004, with
  beta = 1), so word order counts, unlike token_f1.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"\w+")


def answer_tokens(text: str) -> list[str]:
    """Lower-cased word tokens of `text`."""
    return _WORD.findall(text.lower())


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if predicted == 0 or reference == 0:
        return float(predicted == reference)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between a generated answer and the reference answer."""
    predicted, wanted = answer_tokens(prediction), answer_tokens(reference)
    overlap = sum((Counter(predicted) & Counter(wanted)).values())
    return _f1(overlap, len(predicted), len(wanted))


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between a generated answer and the reference answer."""
    predicted, wanted = answer_tokens(prediction), answer_tokens(reference)
    return _f1(_lcs_length(predicted, wanted), len(predicted), len(wanted))


def answer_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean token_f1 and rouge_l over pairs: {"token_f1": ..., "rouge_l": ..., "count": n}."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references; "
            "pass one generated answer per reference"
        )
    count = len(references)
    if count == 0:
        return {"token_f1": 0.0, "rouge_l": 0.0, "count": 0}
    return {
        "token_f1": sum(map(token_f1, predictions, references)) / count,
        "rouge_l": sum(map(rouge_l, predictions, references)) / count,
        "count": count,
    }
