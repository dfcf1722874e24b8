"""Scores from a backbone's class probabilities: the classifier score (digits), the Inception Score."""

from __future__ import annotations

import numpy as np

CONFIDENT = 0.9  # a sample counts as recognised when the classifier gives one class this much


def classifier_score(probabilities: np.ndarray) -> dict[str, float]:
    """confident_share: the share of samples the classifier recognises (max softmax >= 0.9);
    class_balance: the entropy of the predicted-class histogram over its maximum, log(classes)
    (1 = every class equally often, 0 = one class only: the classic sign of mode collapse)."""
    predicted = probabilities.argmax(axis=1)
    counts = np.bincount(predicted, minlength=probabilities.shape[1]).astype(np.float64)
    shares = counts / counts.sum()
    entropy = -(shares[shares > 0] * np.log(shares[shares > 0])).sum()
    return {
        "confident_share": float((probabilities.max(axis=1) >= CONFIDENT).mean()),
        "class_balance": float(entropy / np.log(probabilities.shape[1])),
    }


def inception_score(probabilities: np.ndarray, splits: int = 10) -> dict[str, float]:
    """The Inception Score (Salimans et al. 2016), exp(E_x KL(p(y|x) || p(y))), as the original
    code computes it: the samples in `splits` consecutive parts (torch-fidelity shuffles them
    first; the samples are independent draws either way), p(y) the mean over each part, the mean
    and (population) std of the parts' scores. Higher is better."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    scores = []
    for part in np.array_split(probabilities, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # p log(p / p(y)) is 0 where p is 0 (a class no sample of the part gives any mass)
        terms = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1)) - np.log(np.where(marginal > 0, marginal, 1))), 0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return {"inception_score": float(np.mean(scores)), "inception_score_std": float(np.std(scores))}
