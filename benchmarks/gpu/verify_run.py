"""Checks on the training runs of benchmarks/gpu/check.sh: one line per check, exit 1 on a failure.

    python benchmarks/gpu/verify_run.py run --tracking-uri URI --experiment NAME --steps 20 \
        --resumed-at 12 --log-every 4 [--registered 2] [--gpu-metrics] [--bare-img-per-s 12345]
    python benchmarks/gpu/verify_run.py same-weights STORAGE/RUN_A STORAGE/RUN_B [--control STORAGE/RUN_C]

`run`: the experiment holds one run, finished, whose loss_d has steps 1..N each once (a resume
continued the run: no gap, no duplicate); `dcgan-generator` has at least K registered versions,
the latest from this run; `system/gpu_*` metrics (MLflow's system metrics through pynvml) are in
the run; its steady img/s (median of the logged img_per_s, leaving out the first window of each
segment, which holds start-up and compiles) against the bare step's.

`same-weights`: the latest checkpoints of two runs hold the same G and D (an interrupted and
resumed run against an uninterrupted one). With --control (a second uninterrupted run), the
tolerance is the control's own run-to-run difference (GPU kernels need not be bitwise
deterministic): a resume that lost the RNG or data position differs by far more than that.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

FAILURES: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILURES.append(what)
    return ok


def steady_img_per_s(history, log_every: int, resumed_at: int) -> list[float]:
    """img_per_s of every window but the first of the run and the first after the resume."""
    firsts = {log_every, resumed_at + log_every} if resumed_at else {log_every}
    return [m.value for m in sorted(history, key=lambda m: m.step) if m.step not in firsts]


def verify_run(args) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    if not check(len(runs) == 1, f"one MLflow run in experiment {args.experiment!r} (found {len(runs)})"):
        return
    run = runs[0]
    run_id = run.info.run_id
    check(run.info.status == "FINISHED", f"run {run_id} is {run.info.status}")
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss_d"))
    expected = list(range(1, args.steps + 1))
    gaps = sorted(set(expected) - set(steps))
    duplicates = len(steps) - len(set(steps))
    check(steps == expected, f"loss_d steps 1..{args.steps} each once ({len(steps)} logged, "
                             f"{len(gaps)} missing{f' e.g. {gaps[:3]}' if gaps else ''}, {duplicates} duplicated)")
    if args.registered:
        versions = client.search_model_versions("name='dcgan-generator'")
        latest = max(versions, key=lambda v: int(v.version)) if versions else None
        check(len(versions) >= args.registered and latest is not None and latest.run_id == run_id,
              f"dcgan-generator: {len(versions)} registered versions (want >= {args.registered}), "
              f"the latest from this run: {latest is not None and latest.run_id == run_id}")
    metrics = sorted(client.get_run(run_id).data.metrics)
    system = [name for name in metrics if name.startswith("system/")]
    gpu = [name for name in system if name.startswith("system/gpu_")]
    if args.gpu_metrics:
        check(bool(gpu), f"system/gpu_* metrics in the run: {', '.join(gpu[:4]) or 'none'} "
                         f"(of {len(system)} system metrics)")
    else:
        print(f"info {len(system)} system metrics in the run ({len(gpu)} system/gpu_*)")
    rates = steady_img_per_s(client.get_metric_history(run_id, "img_per_s"), args.log_every, args.resumed_at)
    if check(bool(rates), f"img_per_s logged after the first windows ({len(rates)} windows)"):
        steady = statistics.median(rates)
        against = f" = {steady / args.bare_img_per_s:.0%} of the bare step's {args.bare_img_per_s:,.0f}" if args.bare_img_per_s else ""
        print(f"info steady img/s {steady:,.0f}{against}")
        print(f"figures steady {steady:.1f} img/s{against}")


def latest_state(run_dir: Path) -> dict:
    import torch

    states = [torch.load(path, map_location="cpu", weights_only=True) for path in run_dir.glob("checkpoint_*/state.pt")]
    if not states:
        raise FileNotFoundError(f"no checkpoint_*/state.pt under {run_dir}")
    return max(states, key=lambda state: state["step"])


def max_difference(a: dict, b: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for network in ("generator", "discriminator"):
        for key, tensor in a[network].items():
            if not tensor.is_floating_point():
                continue
            difference = (tensor.float() - b[network][key].float()).abs().max().item()
            if difference > worst:
                worst, where = difference, f"{network}.{key}"
    return worst, where


def verify_same_weights(args) -> None:
    resumed, straight = latest_state(Path(args.resumed)), latest_state(Path(args.straight))
    check(resumed["step"] == straight["step"], f"both runs end at the same step ({resumed['step']}, {straight['step']})")
    difference, where = max_difference(resumed, straight)
    tolerance, basis = 1e-5, "atol 1e-5, as tests/test_train.py"
    if args.control:
        noise, _ = max_difference(straight, latest_state(Path(args.control)))
        tolerance, basis = max(1e-5, 10 * noise), f"10x the run-to-run difference of two uninterrupted runs ({noise:.2e})"
    check(difference <= tolerance, f"resumed run == uninterrupted run: max |difference| {difference:.2e} "
                                   f"(at {where or '-'}) within {tolerance:.2e} ({basis})")
    print(f"figures resumed vs straight max |dw| {difference:.1e} (tolerance {tolerance:.1e})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="verify_run.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="metrics, registered models, system metrics, steady img/s of one run")
    run.add_argument("--tracking-uri", required=True)
    run.add_argument("--experiment", required=True)
    run.add_argument("--steps", type=int, required=True, help="the run's last step")
    run.add_argument("--log-every", type=int, required=True)
    run.add_argument("--resumed-at", type=int, default=0, help="the step the run was resumed from (0: not resumed)")
    run.add_argument("--registered", type=int, default=0, help="at least this many dcgan-generator versions")
    run.add_argument("--gpu-metrics", action="store_true", help="require system/gpu_* metrics")
    run.add_argument("--bare-img-per-s", type=float, default=0.0, help="the bare step's img/s, to compare with")
    same = commands.add_parser("same-weights", help="the latest checkpoints of two runs hold the same weights")
    same.add_argument("resumed", help="STORAGE/RUN_NAME of the interrupted and resumed run")
    same.add_argument("straight", help="STORAGE/RUN_NAME of the uninterrupted run")
    same.add_argument("--control", help="STORAGE/RUN_NAME of a second uninterrupted run (the noise floor)")
    args = parser.parse_args(argv)
    try:
        verify_run(args) if args.command == "run" else verify_same_weights(args)
    except Exception as error:  # a check that cannot run is a failed check, reported in one line
        check(False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    print(f"{'FAILED' if FAILURES else 'passed'}: {len(FAILURES)} of the checks failed" if FAILURES else "passed: every check")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
