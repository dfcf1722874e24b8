"""Scores computed from a backbone's outputs: the classifier score for digits."""

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
