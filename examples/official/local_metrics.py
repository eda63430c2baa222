"""Offline stand-ins for the `evaluate` metrics the official scripts load from the Hub (`accuracy`, `rouge`).

`evaluate.load("accuracy")` and `evaluate.load("rouge")` download their code from the Hub; these compute the same
kind of number with numpy and plain Python, so the scripts run without a network.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Share of predictions equal to their reference, as `evaluate.load("accuracy").compute(...)` returns it."""
    return {"accuracy": float((np.asarray(predictions) == np.asarray(references)).mean())}


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(prediction: str, reference: str, n: int) -> float:
    pred, ref = _ngrams(prediction.lower().split(), n), _ngrams(reference.lower().split(), n)
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1 and ROUGE-2 F1 (whitespace tokens, lower-cased, no stemming), averaged over the pairs."""
    return {
        f"rouge{n}": float(np.mean([_f1(p, r, n) for p, r in zip(predictions, references)]))
        for n in (1, 2)
    }
