"""What the training loop does when the cluster changes under it (`--num-workers MIN:MAX`, spot nodes).

Ray Train restarts the whole worker group from the latest checkpoint whenever its size changes:
smaller after a lost node, larger when its monitor finds room for more workers (every
--resize-interval-s), smaller or the same after a preemption. The global batch, the learning rate
and the epoch's remaining samples carry over to any size (config.py, data/split.py). The loop's
part is here:

- A preemption notice (a node drained: SIGTERM to its `ray start --block`, as Kubernetes sends
  when it reclaims a spot pod, or Ray's drain API) reaches every rank through
  `ray.train.get_preemption_info()`: rank 0's view, broadcast, so every rank, called at the same
  steps (each --log-every window), decides the same even when the notice reached their nodes at
  different steps. Every rank then checkpoints at that step boundary and waits: Ray Train's
  controller restarts the group from that checkpoint once the drain deadline passes, so no step is
  redone. (Ray Train has no such hook for a resize to a larger group, which restarts from the
  latest --checkpoint-every checkpoint.)
- After a restart rank 0 logs what it cost, as per-event metrics at the step it resumes from:
  `faults/steps_lost`, the steps the previous attempt logged past that checkpoint (redone now; a
  step it took after its last --log-every window is not seen), and `faults/resize_s`, seconds
  from the previous attempt's last training metric to this attempt's first step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray.train

from dcgan_dist.tracking.run_logger import RunLogger

log = logging.getLogger(__name__)

# Without a deadline in the notice, Ray Train's controller waits this long before it restarts the
# group (ray.train.v2._internal.constants.DEFAULT_PREEMPTION_DEADLINE_S).
NO_DEADLINE_WAIT_S = 120.0
# Past the deadline, how long a worker waits for the restart before it trains on (a drain that
# never took the node: nothing else would end the wait).
RESTART_GRACE_S = 60.0
STEPS_LOST, RESIZE_S = "faults/steps_lost", "faults/resize_s"


@dataclass
class Preemption:
    """Every rank's watch for a preemption notice; each notice (by its deadline) is acted on once."""

    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    handled: set = field(default_factory=set)

    def notice(self):
        """The notice every rank agrees on (a Ray Train collective: every rank calls this at the
        same steps), or None; a notice already acted on is None."""
        info = ray.train.get_preemption_info()
        if info is None or info.deadline_ms in self.handled:
            return None
        self.handled.add(info.deadline_ms)
        return info

    def wait_for_restart(self, info, step: int) -> None:
        """After the checkpoint at `step`: wait for Ray Train to stop this worker and restart the
        group from it (at the drain deadline). If that never comes, train on."""
        deadline_s = info.deadline_ms / 1000 if info.deadline_ms else self.clock() + NO_DEADLINE_WAIT_S
        log.warning("Preemption notice for node(s) %s: checkpointed at step %d; waiting for Ray Train to restart the "
                    "workers (drain deadline in %.0f s)", ", ".join(info.preempted_node_ids), step, deadline_s - self.clock())
        until = deadline_s + RESTART_GRACE_S
        while (left := until - self.clock()) > 0:
            self.sleep(min(1.0, left))
        log.warning("No restart came %.0f s after the drain deadline; training on from step %d", RESTART_GRACE_S, step)


def log_restart(logger: RunLogger, start_step: int, first_step_done_ms: int) -> dict[str, float]:
    """Rank 0, after the first step of an attempt that continues a run with metrics: what the
    restart cost (see the module docstring), logged and returned; {} for a run's first attempt."""
    last_step = logger.logged_through.get("loss_d", 0)
    if not logger.last_logged_ms:
        return {}
    cost = {STEPS_LOST: float(max(0, last_step - start_step)), RESIZE_S: (first_step_done_ms - logger.last_logged_ms) / 1000}
    logger.log_event_metrics(start_step, cost)
    log.info("Restarted from the checkpoint of step %d: %d logged steps redone, %.1f s from the last metric to the first step",
             start_step, cost[STEPS_LOST], cost[RESIZE_S])
    return cost
