"""Collapse detectors, fed the per-step stats the training loop already reduces across ranks
once per window (the same values on every rank, so every rank sees the same events).

Three signs that a GAN run has gone wrong (each reported once when it starts, and again only
after it has cleared):
- d_loss_vanished: the median of D's loss over the last `patience_steps` steps below
  `d_loss_floor`: D separates real from fake perfectly and G gets no useful gradient. A median,
  because a collapsed run still has single steps where D's loss spikes (at lr 0.1, most steps
  are exactly 0 and a few are 1-200).
- grad_exploded: a gradient norm (D's or G's) not finite, or more than `grad_factor` (100) times
  the median of the windows before it. Healthy runs move by well over 10x: D's norm sits near 1
  while D wins early on the digits and rises to 30-60 once G catches up.
- score_rebound: the evaluation score (lower is better) more than `score_factor` times its best:
  training has walked away from its best point.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

GRAD_NAMES = ("grad_norm_d", "grad_norm_g")
EVENTS = ("d_loss_vanished", "grad_exploded", "score_rebound")


@dataclass
class CollapseDetector:
    d_loss_floor: float = 1e-3
    patience_steps: int = 50
    grad_factor: float = 100.0
    score_factor: float = 1.5
    warmup_windows: int = 3  # windows of gradient norms before the median is trusted
    recent_loss_d: deque = field(default_factory=deque)  # the last patience_steps values of D's loss
    grad_history: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in GRAD_NAMES})
    active: set[str] = field(default_factory=set)  # events under way: not reported again

    def observe_window(self, loss_d: list[float], means: dict[str, float]) -> list[str]:
        """The events a closed window raises: D's loss at each of its steps, and its means
        (of the gradient norms)."""
        found = []
        self.recent_loss_d.extend(loss_d)
        while len(self.recent_loss_d) > self.patience_steps:
            self.recent_loss_d.popleft()
        vanished = len(self.recent_loss_d) == self.patience_steps and statistics.median(self.recent_loss_d) < self.d_loss_floor
        found += self._edge("d_loss_vanished", vanished)
        exploded = False
        for name in GRAD_NAMES:
            value, history = means[name], self.grad_history[name]
            if not math.isfinite(value):
                exploded = True
                continue
            if len(history) >= self.warmup_windows and value > self.grad_factor * statistics.median(history):
                exploded = True
            else:  # an exploded window would raise the baseline it is judged by
                history.append(value)
        found += self._edge("grad_exploded", exploded)
        return found

    def observe_score(self, score: float, best_score: float | None) -> list[str]:
        rebound = not math.isfinite(score) or (best_score is not None and score > self.score_factor * best_score)
        return self._edge("score_rebound", rebound)

    def _edge(self, event: str, present: bool) -> list[str]:
        if present and event not in self.active:
            self.active.add(event)
            return [event]
        if not present:
            self.active.discard(event)
        return []
