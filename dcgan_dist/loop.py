"""The per-worker training loop that Ray Train runs on every rank.

`train_loop` wires the parts together and does nothing else: `setup` builds models (DDP through
`prepare_model`), optimizers and the data stream, restoring all of it from Ray Train's latest
checkpoint when there is one; `run` takes the GAN steps, reduces the training stats across
ranks once every --log-every steps, logs sample grids and checkpoints on schedule, and on
rank 0 writes everything to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from tqdm import tqdm

from dcgan_dist import checkpoint, config, data, elastic, sync_bn
from dcgan_dist.champion import Champion, holds_final_models, log_final_models
from dcgan_dist.checkpoint import unwrap
from dcgan_dist.checkpoint_upload import CheckpointUploads
from dcgan_dist.config import Config
from dcgan_dist.data.sample_log import SampleLog, new_attempt
from dcgan_dist.data.split import rank_batches
from dcgan_dist.data.stream import COUNT_NAMES, check_corrupt_share
from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.replicas import replica_spread
from dcgan_dist.restore import restore_checkpoint
from dcgan_dist.step import compile_models, compile_stats, gan_step, load_optimizer_state, make_optimizers
from dcgan_dist.tracking import store, training_run
from dcgan_dist.tracking.run_logger import RunLogger
from dcgan_dist.tracking.store import TRACKING_FAILURES
from dcgan_dist.util import first_line, grid_uint8, redact, redact_exception

# Ray Train V2 sends print() both to the log and to stdout; a named logger prints once.
log = logging.getLogger(__name__)

STAT_NAMES = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g")
LOGGED_COUNTS = ("corrupt_samples", "bad_shards", "s3_retries", "repeated_samples")  # of the reader's COUNT_NAMES
SAMPLE_GRID_SIZE = 64  # an 8x8 grid
PROGRESS_EVERY_S = 10.0


@dataclass
class Worker:
    """What one rank trains with."""

    cfg: Config
    rank: int
    world_size: int
    rank_batch: int  # this rank's share of the global batch
    loss_weight: float  # rank_batch x world_size / global batch: weights its gradients in DDP's average (step.gan_step)
    device: torch.device
    generator: torch.nn.Module
    discriminator: torch.nn.Module
    discriminator_local: torch.nn.Module  # D's replica-local module for G's pass (compiled with --compile)
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    batches: Iterator[torch.Tensor]  # with .counts(): what the data pipeline skipped
    z_fixed: torch.Tensor  # the latent batch behind every sample grid, the same across resumes
    start_step: int
    logger: RunLogger | None  # rank 0 only
    champion: Champion  # evaluation, the best snapshot, collapse detection and rollback
    sample_log: SampleLog  # --sample-log (writes nothing without it)
    uploads: CheckpointUploads  # where checkpoints are staged, reported and uploaded; the waits they cost
    preemption: elastic.Preemption = field(default_factory=elastic.Preemption)
    report_windows: bool = False  # each window's means to Ray Train (a sweep's scheduler reads them)
    last_progress: float = 0.0  # rank 0: when the last progress line was printed


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker. A failure leaves without the credentials a URI in
    its message may carry: Ray prints its traceback to the driver's console and keeps it."""
    try:
        train_worker(loop_config)
    except BaseException as e:
        redact_exception(e)
        raise


def train_worker(loop_config: dict[str, Any]) -> None:
    os.environ.update(loop_config.get("env", {}))  # the driver's AWS_* settings (and quiet MLflow), for this process
    cfg = config.from_flat(loop_config["config"])
    if not cfg.loop.verbose:
        quiet_worker_logs()
    worker = setup(cfg, loop_config)
    logger = worker.logger
    trained = worker.start_step < cfg.loop.max_steps
    if trained:
        try:
            run(worker)
        except BaseException:
            if logger is not None:
                logger.finish("FAILED")
            raise
    elif logger is not None:
        log.info("Run %s finished at step %d%s: nothing to train", cfg.tracking.run_name, worker.start_step,
                 f" (--max-steps {cfg.loop.max_steps} is below it)" if worker.start_step > cfg.loop.max_steps else "")
    if logger is not None:
        finish_run(worker, trained)


def finish_run(w: Worker, trained: bool) -> None:
    """Rank 0 at the end: the last evaluation's extras, the final models logged and registered,
    the run closed. A tracking server that is away now costs no work: the last step's models
    are in the final checkpoint, and re-running the command, or `python -m dcgan_dist.register`,
    logs and registers them later. Training itself succeeds.

    A run that trained nothing (it had reached --max-steps, or a step past a lower one) has the
    models of the step its checkpoint holds, not of --max-steps: those are logged, when the run
    does not hold them yet, and nothing else is changed."""
    cfg, logger = w.cfg, w.logger
    uri = cfg.tracking.tracking_uri
    last_step = cfg.loop.max_steps if trained else w.start_step
    later = (f"the models of step {last_step} are in the last checkpoint; log and register them when it is "
             f"back: python -m dcgan_dist.register --storage-path {cfg.tracking.storage_path} --run-name {cfg.tracking.run_name}")
    try:
        store.check_reachable(uri)
        if trained:
            if cfg.perf.compile != "off":
                logger.set_tags(compile_stats())
            w.champion.finish(w.generator, w.discriminator)
        elif not holds_final_models(logger, last_step):
            # An earlier attempt trained to the end, but the tracking server was away then.
            log.info("Logging the models of step %d, which the run does not hold yet", last_step)
            log_final_models(logger, w.champion.architecture, unwrap(w.generator), unwrap(w.discriminator), last_step,
                             w.champion.best, logger.tags().get("eval.backbone", ""), register=cfg.tracking.register_models)
    except TRACKING_FAILURES as e:
        log.warning("MLflow %s failed at the end of training (%s): %s", redact(uri), first_line(e), later)
        logger.abandon()
        return
    logger.finish()


def quiet_worker_logs() -> None:
    """Without --verbose: MLflow's INFO lines, and Ray Train's line per report, drown the progress
    bar. RunConfig's LoggingConfig quiets the `ray.train` loggers, but Ray 2.60 names the report
    logger by its file path (`logging.getLogger(__file__)` in ray/train/v2/_internal/execution/
    context.py), so that one is quieted by name."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: its report lines stay
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def setup(cfg: Config, launch: dict[str, Any]) -> Worker:
    """`launch`: what the driver hands every worker (build_trainer's train_loop_config): the
    run's lineage tags, source tags and dataset."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.loop.seed + rank)  # before building: initial weights follow the seed
    generator, discriminator = build_models(cfg.model.preset, cfg.model.image_size, cfg.model.bn)
    state, start_step, mlflow_run_id = None, 0, None
    restored = restore_checkpoint(rank, world_size, device)
    if restored is not None:
        state, rng = restored
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        start_step, mlflow_run_id = state["step"], state["mlflow_run_id"]
        if rng is not None:
            checkpoint.set_rng_state(rng, device)
        else:  # a rank the checkpointed run did not have
            torch.manual_seed(cfg.loop.seed + rank + 7919 * start_step)

    generator, discriminator, discriminator_local = wrap_models(generator, discriminator, cfg, device)
    opt_g, opt_d = make_optimizers(generator, discriminator, cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2)
    if state is not None:
        load_optimizer_state(opt_g, state["opt_g"])
        load_optimizer_state(opt_d, state["opt_d"])

    batches = data.open_batches(cfg, rank, world_size, start_step, state.get("data_position") if state is not None else None,
                                device=device)
    z_fixed = sample_latent(SAMPLE_GRID_SIZE, cfg.model.preset, rng=torch.Generator().manual_seed(cfg.loop.seed))

    node_of_rank = nodes_of_ranks(world_size)
    logger = training_run.open_run(cfg, launch, mlflow_run_id, start_step, node_of_rank) if rank == 0 else None
    if logger is not None and state is not None and state.get("unreadable_checkpoints"):  # resumed from an older one
        logger.set_tags({"train.unreadable_checkpoints": "; ".join(state["unreadable_checkpoints"])})
    champion = Champion.build(cfg, rank, device, logger, state.get("best") if state is not None else None)
    rank_batch = rank_batches(cfg.loop.batch_size, world_size)[rank]
    return Worker(cfg, rank, world_size, rank_batch, rank_batch * world_size / cfg.loop.batch_size, device, generator,
                  discriminator, discriminator_local, opt_g, opt_d, batches, z_fixed.to(device), start_step, logger, champion,
                  open_sample_log(cfg.data.sample_log, rank, world_size, device),
                  CheckpointUploads.for_worker(cfg.loop.checkpoint_upload, rank, world_size), report_windows=launch.get("report_windows", False))


def open_sample_log(directory: str, rank: int, world_size: int, device: torch.device) -> SampleLog:
    """--sample-log: this rank's file for this attempt (rank 0's attempt id, on every rank)."""
    if not directory:
        return SampleLog("", 0, rank)
    attempt = [new_attempt()]
    if world_size > 1:
        dist.broadcast_object_list(attempt, src=0, device=device)
    return SampleLog(directory, attempt[0], rank)


def wrap_models(generator: torch.nn.Module, discriminator: torch.nn.Module, cfg: Config, device: torch.device,
                prepare_model: Callable[..., torch.nn.Module] = ray.train.torch.prepare_model,
                ) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(G, D, D's local module for G's pass) as the loop trains them, wrapped in the order that
    matters: BatchNorm synced (--bn-sync) and the memory layout set on the plain modules, then
    DDP (`prepare_model`: Ray Train's, which wraps when there is more than one worker), then
    torch.compile around DDP (compile_models says why that order)."""
    if cfg.cluster.bn_sync:  # statistics over the global batch; running stats then agree on every rank
        generator = sync_bn.to_sync(generator, cfg.cluster.use_gpu)
        discriminator = sync_bn.to_sync(discriminator, cfg.cluster.use_gpu)
    generator, discriminator = (speed_up(model, cfg.perf, device) for model in (generator, discriminator))
    # Default: per-worker BatchNorm statistics, as single-GPU DCGAN has them: no buffer broadcast.
    ddp_options = {"parallel_strategy_kwargs": {"broadcast_buffers": False}}
    generator = prepare_model(generator, **ddp_options)
    discriminator = prepare_model(discriminator, **ddp_options)
    return compile_models(generator, discriminator, cfg.perf.compile)


def speed_up(model: torch.nn.Module, perf: config.PerfConfig, device: torch.device) -> torch.nn.Module:
    """The --channels-last setting applied to one network (before DDP wraps it)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its kernels once
    if perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def nodes_of_ranks(world_size: int) -> list[str]:
    """The Ray node id each rank runs on, indexed by rank (one all-gather, every rank takes part)."""
    node_id = ray.get_runtime_context().get_node_id()
    if world_size == 1 or not dist.is_initialized():
        return [node_id]
    node_of_rank: list[str] = [""] * world_size
    dist.all_gather_object(node_of_rank, node_id)
    return node_of_rank


class StepClock:
    """Seconds spent taking steps since the stats window opened. The grid, evaluation and
    checkpoint work between steps is left out, so img/s measures training, not the side work
    (which would otherwise be charged to the next window)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.run_start = self.window_start = clock()

    def window_seconds(self) -> float:
        return self.clock() - self.window_start

    @contextlib.contextmanager
    def side_work(self, window_closed: bool) -> Iterator[None]:
        start = self.clock()
        yield
        if window_closed:
            self.window_start = self.clock()  # the next window opens after this work
        else:
            self.window_start += self.clock() - start


def run(w: Worker) -> None:
    cfg = w.cfg
    window: list[torch.Tensor] = []  # per-step stats, kept on the device until the window closes
    clock = StepClock()
    latest: dict[str, float] = {}  # the last closed window's means, carried by every report
    memory_format = torch.channels_last if cfg.perf.channels_last else torch.contiguous_format
    if w.logger is not None and w.start_step == 0:  # the image slider opens on the untrained G, not on an empty step
        w.logger.log_image(sample_grid(w.generator, w.z_fixed), key="samples", step=0)
    for step in range(w.start_step + 1, cfg.loop.max_steps + 1):
        if cfg.perf.compile != "off":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's CUDA-graph outputs may be overwritten
        real = next(w.batches).to(w.device, non_blocking=True, memory_format=memory_format)
        w.sample_log.write(step, w.batches.keys)  # --sample-log
        z = sample_latent(w.rank_batch, cfg.model.preset, w.device)
        stats = gan_step(w.generator, w.discriminator, w.opt_g, w.opt_d, real, z, cfg.perf.precision, w.discriminator_local,
                         w.loss_weight)
        if step == w.start_step + 1 and w.logger is not None:  # after a restart: what it cost
            elastic.log_restart(w.logger, w.start_step, int(time.time() * 1000))
        window.append(torch.stack([stats[name] for name in STAT_NAMES]))
        last_step = step == cfg.loop.max_steps
        window_closed = step % cfg.loop.log_every == 0 or last_step
        if window_closed:
            latest = close_window(w, step, window, clock)
            window = []
        with clock.side_work(window_closed):
            if w.logger is not None and (step % cfg.loop.sample_every == 0 or last_step):
                w.logger.log_image(sample_grid(w.generator, w.z_fixed), key="samples", step=step)
            if w.champion.due(step):
                w.champion.evaluate(step, w.generator, w.discriminator)  # rank 0 only; the others wait at the next collective
            # Every rank asks and reports at the same steps (both are barriers across workers).
            notice = w.preemption.notice() if window_closed and not last_step else None
            if step % cfg.loop.checkpoint_every == 0 or last_step or notice:
                save_checkpoint(w, step, {"step": step} | latest | w.champion.last_eval, wait=notice is not None)
            elif window_closed and w.report_windows:
                w.uploads.report_metrics(with_run_id({"step": step} | latest | w.champion.last_eval, w.logger))
            if notice:  # checkpointed at this step: nothing is redone when Ray Train restarts the group from it
                w.preemption.wait_for_restart(notice, step)


def close_window(w: Worker, step: int, window: list[torch.Tensor], clock: StepClock) -> dict[str, float]:
    """Every rank, every --log-every steps: reduce the window's stats across ranks (rank 0 logs
    them per step), watch for a collapse, roll back if asked, check the corrupt-data share.
    Returns the window's means, which every report carries."""
    cfg, champion = w.cfg, w.champion
    # Rank 0's rollback request and whether it has a best snapshot ride along, so that every
    # rank decides on a rollback together.
    counts = [w.batches.counts()[name] for name in COUNT_NAMES] + [float(champion.rollback_requested), float(champion.best is not None)]
    rows, totals = reduce_window(window, w.world_size, counts, w.loss_weight)  # every rank takes part
    data_counts = dict(zip(COUNT_NAMES, totals))
    img_per_s = len(window) * cfg.loop.batch_size / clock.window_seconds()
    # Window means go to Ray Train (and so to Tune's schedulers); per-step values to MLflow.
    latest = {"img_per_s": img_per_s} | {name: sum(column) / len(column) for name, column in zip(STAT_NAMES, zip(*rows))}
    if w.logger is not None:
        first = step - len(window) + 1
        w.logger.log_metrics(
            [(first + i, dict(zip(STAT_NAMES, row))) for i, row in enumerate(rows)]
            + [(step, {"img_per_s": img_per_s, "epoch": w.batches.position.epochs_done, "world_size": w.world_size}
                | {f"data/{name}": data_counts[name] for name in LOGGED_COUNTS if data_counts[name]})]  # charts once non-zero
        )
        now = clock.clock()
        if now - w.last_progress >= PROGRESS_EVERY_S or step == cfg.loop.max_steps:
            log.info(progress_line(step, w.start_step, cfg.loop.max_steps, now - clock.run_start, img_per_s, rows[-1]))
            w.last_progress = now
    events = champion.observe_window(step, [row[0] for row in rows], latest)  # the same on every rank
    requested, best_exists = totals[len(COUNT_NAMES):]
    if cfg.eval.rollback_on_collapse and best_exists and (events or requested):
        champion.rollback(step, w.generator, w.discriminator, (w.opt_g, w.opt_d), w.world_size)
    # the same summed counts on every rank, so all ranks stop together
    check_corrupt_share(data_counts["corrupt_samples"], data_counts["samples"], cfg.data.max_corrupt_fraction)
    return latest


def reduce_window(window: list[torch.Tensor], world_size: int, counts: list[float],
                  loss_weight: float = 1.0) -> tuple[list[list[float]], list[float]]:
    """Per-step stats of the last window averaged over ranks, each weighted by its share of the
    global batch (`loss_weight`, 1 when the ranks' batches are equal): the means over the global
    batch; and the data counters summed over ranks. One all-reduce, one host read."""
    stats = torch.stack(window)  # (steps, len(STAT_NAMES))
    if loss_weight != 1.0:
        stats = stats * loss_weight
    packed = torch.cat([stats.flatten(), torch.tensor(counts, dtype=stats.dtype, device=stats.device)])
    if world_size > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed = packed.cpu()
    rows = (packed[: stats.numel()].view_as(stats) / world_size).tolist()
    return rows, packed[stats.numel():].tolist()


def progress_line(step: int, start_step: int, max_steps: int, elapsed: float, img_per_s: float, last: list[float]) -> str:
    """A tqdm bar as one log line (Ray forwards worker output line by line, so no \\r redraws)."""
    stats = " ".join(f"{name}={value:.3f}" for name, value in zip(STAT_NAMES, last))
    return tqdm.format_meter(
        step, max_steps, elapsed, ncols=130, unit="step", initial=start_step,
        rate=(step - start_step) / elapsed, postfix=f"{img_per_s:.0f} img/s {stats}",
    )


def sample_grid(generator: torch.nn.Module, z_fixed: torch.Tensor) -> np.ndarray:
    """G(z_fixed) as one HxWx3 uint8 image. Eval mode: BatchNorm uses its running statistics,
    as the registered model does when it is used later."""
    model = unwrap(generator)
    model.eval()
    with torch.no_grad():
        images = model(z_fixed)
    model.train()
    return grid_uint8(images, nrow=8)


def with_run_id(metrics: dict[str, Any], logger: RunLogger | None) -> dict[str, Any]:
    """Rank 0's reports carry the MLflow run id, so the driver (or a sweep) can name the run."""
    return metrics | ({"mlflow_run_id": logger.run_id} if logger is not None else {})


def save_checkpoint(w: Worker, step: int, metrics: dict[str, Any], wait: bool = False) -> None:
    """Every rank writes its part and reports it (checkpoint_upload: uploaded, verified, in the
    background to remote storage); Ray Train merges the parts into one. The last one, and one
    written on a preemption notice (`wait`), are waited for."""
    spread = replica_spread((w.generator, w.discriminator), w.world_size, w.cfg.cluster.bn_sync, step)
    run_id = w.logger.run_id if w.logger is not None else None
    directory = w.uploads.stage(step)  # waits only while the previous checkpoint still uploads
    checkpoint.save(
        directory, rank=w.rank, device=w.device, step=step, generator=w.generator, discriminator=w.discriminator,
        opt_g=w.opt_g, opt_d=w.opt_d, mlflow_run_id=run_id, config=config.flatten(w.cfg), architecture=w.champion.architecture,
        best=w.champion.best.state() if w.champion.best is not None else None, data_position=w.batches.data_position(),
    )
    w.uploads.report(with_run_id(metrics, w.logger), directory, wait=wait or step == w.cfg.loop.max_steps)
    if w.logger is not None:
        w.logger.log_metrics([(step, w.uploads.metrics() | ({"ddp/replica_spread": spread} if w.world_size > 1 else {}))])
