"""Answer-quality measures: token-level F1 and ROUGE-L against hand-computed values."""

import random

import pytest

from minimind_fast.data.sft_metrics import answer_scores, answer_tokens, rouge_l, token_f1


def test_tokens_ignore_case_and_punctuation():
    assert answer_tokens("Return `self.x`, or None!") == ["return", "self", "x", "or", "none"]


@pytest.mark.parametrize(
    "prediction, reference, f1, rouge",
    [
        ("a b c d", "a b e", 4 / 7, 4 / 7),  # precision 2/4, recall 2/3
        ("a b c d", "a c b d", 1.0, 0.75),  # same words, another order: only ROUGE-L notices
        ("the the cat", "the cat", 0.8, 0.8),  # precision 2/3, recall 1
        ("Return the hash.", "return the HASH", 1.0, 1.0),
        ("x y", "a b", 0.0, 0.0),
        ("", "", 1.0, 1.0),
        ("", "a", 0.0, 0.0),
        ("a", "", 0.0, 0.0),
        ("...", "a", 0.0, 0.0),
    ],
)
def test_known_values(prediction, reference, f1, rouge):
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert rouge_l(prediction, reference) == pytest.approx(rouge)


def random_answer(rng):
    return " ".join(rng.choice(["a", "b", "c", "d"]) for _ in range(rng.randint(0, 12)))


@pytest.mark.parametrize("seed", range(50))
def test_scores_are_symmetric_bounded_and_ordered(seed):
    rng = random.Random(seed)
    prediction, reference = random_answer(rng), random_answer(rng)
    f1, rouge = token_f1(prediction, reference), rouge_l(prediction, reference)
    assert 0.0 <= rouge <= f1 <= 1.0  # an LCS never exceeds the bag overlap
    assert f1 == pytest.approx(token_f1(reference, prediction))
    assert rouge == pytest.approx(rouge_l(reference, prediction))
    assert token_f1(reference, reference) == rouge_l(reference, reference) == 1.0


def test_answer_scores_averages_pairs():
    scores = answer_scores(["a b c d", "x"], ["a c b d", "x"])
    assert scores == {"token_f1": pytest.approx(1.0), "rouge_l": pytest.approx(0.875), "count": 2}
    assert answer_scores([], []) == {"token_f1": 0.0, "rouge_l": 0.0, "count": 0}
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        answer_scores(["a", "b"], ["a"])
