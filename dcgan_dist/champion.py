"""The champion: rank 0's evaluation on schedule and the best snapshot by score, every rank's
collapse detector and rollback, and G and D registered at the end.

The loop calls it at fixed points and nothing else reaches into it. Rank 0 evaluates and keeps
the best snapshot; the collapse detector sees the same reduced losses on every rank, and a
rollback (rank 0's best G/D broadcast to every rank) happens on every rank together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dcgan_dist import evaluate
from dcgan_dist.checkpoint import unwrap
from dcgan_dist.config import Config
from dcgan_dist.evaluate.collapse import CollapseDetector
from dcgan_dist.models import Architecture
from dcgan_dist.tracking.run_logger import RunLogger

log = logging.getLogger(__name__)

REGISTERED_TAG = "registered.step"  # set last: the models of the end are logged (and registered)


@dataclass
class Champion:
    cfg: Config
    architecture: Architecture
    logger: RunLogger | None  # rank 0 only
    evaluator: evaluate.Evaluator | None = None  # rank 0 with --eval-every
    best: evaluate.Best | None = None  # rank 0: the best snapshot by eval score, kept in checkpoints
    detector: CollapseDetector = field(default_factory=CollapseDetector)
    rollback_requested: bool = False  # rank 0: the score rebounded; every rank rolls back at the next window
    last_eval: dict[str, float] = field(default_factory=dict)  # rank 0: the latest score, carried by every report

    @classmethod
    def build(cls, cfg: Config, rank: int, device: torch.device, logger: RunLogger | None,
              saved_best: dict[str, Any] | None) -> Champion:
        champion = cls(cfg, Architecture.of(cfg.model.preset, cfg.model.image_size, cfg.model.bn), logger)
        champion.detector = CollapseDetector(cfg.eval.collapse_d_loss, cfg.eval.collapse_steps)
        if rank == 0 and cfg.eval.eval_every:
            champion.evaluator = evaluate.build(cfg, device)
            champion.best = evaluate.Best.from_state(saved_best)
        return champion

    def due(self, step: int) -> bool:
        """Whether this rank evaluates at `step` (rank 0 with evaluation on; always at the end)."""
        return self.evaluator is not None and (step % self.cfg.eval.eval_every == 0 or step == self.cfg.loop.max_steps)

    def evaluate(self, step: int, generator: torch.nn.Module, discriminator: torch.nn.Module) -> None:
        """Rank 0: score G, log G and D as MLflow LoggedModels (every evaluation, or with
        --logged-models champion-and-last only the last: the champion is logged at the end), log
        the scores linked to them (with the backbone and counts they hold under), keep the best
        snapshot, and watch the score for a rebound. The other ranks wait at the next collective."""
        metrics = self.evaluator.evaluate(unwrap(generator))
        score = metrics[evaluate.SCORE]
        model_ids = {}
        if self.cfg.tracking.logged_models == "every-eval" or step == self.cfg.loop.max_steps:  # else the champion at the end
            model_ids = self.logger.log_checkpoint(self.architecture, unwrap(generator), unwrap(discriminator), step)
        self.logger.log_metrics([(step, metrics)], model_ids=tuple(model_ids.values()))
        self.logger.set_tags(self.evaluator.tags)
        events = self.detector.observe_score(score, self.best.score if self.best is not None else None)
        if evaluate.better(score, self.best):
            self.best = evaluate.Best.capture(step, score, unwrap(generator), unwrap(discriminator))
        self.last_eval = {evaluate.SCORE: score, "best_step": self.best.step if self.best else 0}
        log.info("step %d: %s (%s)%s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                 self.evaluator.backbone.name, f"; best so far at step {self.best.step}" if self.best else "")
        self.report_collapse(step, events)
        self.rollback_requested = bool(events) and self.cfg.eval.rollback_on_collapse

    def observe_window(self, step: int, losses_d: list[float], window_means: dict[str, float]) -> list[str]:
        """Every rank: the collapse events the window's (rank-averaged) D losses show."""
        events = self.detector.observe_window(losses_d, window_means)
        self.report_collapse(step, events)
        return events

    def report_collapse(self, step: int, events: list[str]) -> None:
        """Each event as a metric (1 at this step), a tag and a warning line, on rank 0."""
        if self.logger is None or not events:
            return
        self.logger.log_metrics([(step, {f"collapse/{event}": 1.0 for event in events})])
        self.logger.set_tags({f"collapse.{event}": f"step {step}" for event in events})
        log.warning("step %d: collapse detected: %s", step, ", ".join(events))

    def rollback(self, step: int, generator: torch.nn.Module, discriminator: torch.nn.Module,
                 optimizers: tuple[torch.optim.Optimizer, ...], world_size: int) -> None:
        """Every rank: reload rank 0's best G/D (broadcast to the others), restart both Adams."""
        if self.best is not None:
            unwrap(generator).load_state_dict(self.best.generator)
            unwrap(discriminator).load_state_dict(self.best.discriminator)
            log.warning("step %d: rolled back to the best snapshot, step %d (%s %.4g)", step, self.best.step, evaluate.SCORE,
                        self.best.score)
            self.logger.log_metrics([(step, {"collapse/rollback_to_step": float(self.best.step)})])
        if world_size > 1:
            for model in (generator, discriminator):
                for tensor in unwrap(model).state_dict().values():
                    dist.broadcast(tensor, src=0)
        for optimizer in optimizers:
            optimizer.state.clear()  # Adam's moments belong to the weights that collapsed
        self.rollback_requested = False
        self.detector = CollapseDetector(self.cfg.eval.collapse_d_loss, self.cfg.eval.collapse_steps)

    def finish(self, generator: torch.nn.Module, discriminator: torch.nn.Module) -> None:
        """Rank 0 at the end: the memorisation check, then G and D registered (see register_models)."""
        cfg, logger, last_step = self.cfg, self.logger, self.cfg.loop.max_steps
        best_models = self.best_models() if self.best is not None and self.best.step != last_step else None
        if self.evaluator is not None:
            metrics, pictures = self.evaluator.memorisation(best_models[0] if best_models else unwrap(generator))
            logger.log_metrics([(last_step, metrics)])
            for name, picture in pictures.items():
                logger.log_image(picture, key=f"memorisation_{name}", step=last_step)
        backbone = self.evaluator.backbone.name if self.evaluator is not None else ""
        log_final_models(logger, self.architecture, unwrap(generator), unwrap(discriminator), last_step, self.best, backbone,
                         register=cfg.tracking.register_models)

    def best_models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return best_models(self.architecture, self.best)


def best_models(architecture: Architecture, best: evaluate.Best) -> tuple[torch.nn.Module, torch.nn.Module]:
    generator, discriminator = architecture.build()
    generator.load_state_dict(best.generator)
    discriminator.load_state_dict(best.discriminator)
    return generator, discriminator


def log_final_models(logger: RunLogger, architecture: Architecture, generator: torch.nn.Module, discriminator: torch.nn.Module,
                     last_step: int, best: evaluate.Best | None, backbone: str, register: bool = True) -> dict[str, str]:
    """G and D of the last step logged into the run and (with `register`) registered as new
    versions; the best snapshot by evaluation score is registered before them (when it is not
    the last step) with the alias `champion`; the last step's go last, so MLflow's `@latest` is
    the last. Each is registered from the LoggedModel its evaluation logged (the best by score,
    champion.evaluate), or, where there is none (--logged-models champion-and-last, or the server
    away then), from one logged now at its step, to which MLflow links the run's metrics of that
    step. LoggedModels an outage left PENDING are marked FAILED. Ends with the tag
    `registered.step`, which tells a later resume (or `python -m dcgan_dist.register`) that
    nothing is left to do (`holds_final_models`). Without it, doing
    this again registers no model twice: the registry answers which versions of this run and
    step exist (registry.log_models). Returns {registered model name: version}."""
    champion = None
    if best is not None and best.step != last_step and register:
        champion = logger.log_models(architecture, *best_models(architecture, best), best.step, register=True)
    versions = logger.log_models(architecture, generator, discriminator, last_step, register=register)
    logger.set_tags({f"registered.{name}": version for name, version in versions.items()})
    if best is not None and register:
        for name, version in (champion or versions).items():
            logger.set_alias(name, version, "champion", {
                "champion.step": best.step, "champion.score": best.score,
                "champion.metric": evaluate.SCORE, "champion.backbone": backbone,
            })
        logger.set_tags({"champion.step": best.step, "champion.score": best.score})
    logger.fail_abandoned_models()
    logger.set_tags({REGISTERED_TAG: last_step})
    return versions


def holds_final_models(logger: RunLogger, step: int) -> bool:
    """Whether the run holds its final models of `step`, everything log_final_models does done:
    its last tag is there. A run without it (the server away before the buffered tags were sent)
    is given log_final_models again, which registers only what is missing."""
    return logger.tags().get(REGISTERED_TAG) == str(step)
