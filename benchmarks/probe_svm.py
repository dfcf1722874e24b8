"""The probe's L2-SVM solvers (dcgan_dist/probe/svm.py) at the sizes of Table 1: time and peak
memory of the torch solver on float16 features held once, beside liblinear (scikit-learn's
LinearSVC, which copies the features to float64) where it fits.

    PYTHONPATH=. nice python benchmarks/probe_svm.py                                   # 45,000 x 28,672 torch; 20,000 x 8,192 both
    PYTHONPATH=. python benchmarks/probe_svm.py --sizes 45000x28672 --solvers torch --device cuda   # the GPU check's part e

Each row runs in its own process (a fresh peak RSS): synthetic features (a random mean per class
under unit noise, 10 classes, float16) are made a chunk at a time, then one fit at --c. The
columns: the features' bytes, the process's peak RSS above the features and the interpreter
(`ru_maxrss` minus what the process held before the fit), the wall time of the fit, Newton
iterations, whether it converged, the objective (summed over the classifiers) and the held-out
accuracy on 2,000 more samples. On CUDA, the peak of torch's allocator is given too.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

HELD_OUT = 2000


def features(samples: int, dims: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Float16 features made 1,000 rows at a time (no float64 or float32 copy of the whole)."""
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (classes, dims)).astype(np.float32)
    labels = rng.integers(0, classes, samples)
    out = np.empty((samples, dims), dtype=np.float16)
    for start in range(0, samples, 1000):
        stop = min(samples, start + 1000)
        out[start:stop] = 0.15 * means[labels[start:stop]] + rng.standard_normal((stop - start, dims), dtype=np.float32)
    return out, labels


def one_row(size: str, solver: str, device: str, c: float, classes: int) -> dict:
    import torch

    from dcgan_dist.probe import svm

    samples, dims = (int(v) for v in size.split("x"))
    x, y = features(samples + HELD_OUT, dims, classes)
    train, held_out = (x[:samples], y[:samples]), (x[samples:], y[samples:])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    model = svm.fit_torch(*train, c, device) if solver == "torch" else svm.fit_liblinear(*train, c)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predicted = model.classes_[(held_out[0].astype(np.float32) @ model.coef_.T + model.intercept_).argmax(1)]
    return {"size": size, "solver": solver, "device": device, "feature_bytes": train[0].nbytes, "seconds": seconds,
            "rss_above_gb": (peak - before) / 1e9, "peak_rss_gb": peak / 1e9, "iterations": model.iterations,
            "converged": model.converged, "objective": float(svm.objective(*train, model, c).sum()),
            "accuracy": float((predicted == held_out[1]).mean()),
            "cuda_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--sizes", default="45000x28672,20000x8192", help="SAMPLESxDIMS,...")
    parser.add_argument("--solvers", default="torch,liblinear")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--c", type=float, default=1e-3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--liblinear-max-gb", type=float, default=12.0,
                        help="skip liblinear where its float64 copy and index pairs (about 20 bytes a value) pass this")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "SOLVER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_row(*args.one, args.device, args.c, args.classes)))
        return
    print("| size | solver | device | features GB | fit s | peak RSS above the start GB | Newton its | converged | objective "
          "| held-out acc | CUDA peak GB |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for size in args.sizes.split(","):
        samples, dims = (int(v) for v in size.split("x"))
        for solver in args.solvers.split(","):
            if solver == "liblinear" and samples * dims * 20 / 1e9 > args.liblinear_max_gb:
                print(f"| {size} | liblinear | cpu | {samples * dims * 2 / 1e9:.2f} | - | needs ~{samples * dims * 20 / 1e9:.0f} GB: "
                      "not run | | | | | |", flush=True)
                continue
            child = subprocess.run([sys.executable, __file__, "--one", size, solver, "--device", args.device if solver == "torch" else "cpu",
                                    "--c", str(args.c), "--classes", str(args.classes)], capture_output=True, text=True)
            if child.returncode != 0:
                print(f"| {size} | {solver} | failed: {child.stderr.strip().splitlines()[-1][:150]} |", flush=True)
                continue
            r = json.loads(child.stdout.strip().splitlines()[-1])
            cuda = f"{r['cuda_peak_gb']:.2f}" if r["cuda_peak_gb"] is not None else "-"
            print(f"| {size} | {solver} | {r['device']} | {r['feature_bytes'] / 1e9:.2f} | {r['seconds']:.1f} | {r['rss_above_gb']:.2f} "
                  f"| {r['iterations']} | {r['converged']} | {r['objective']:.6g} | {r['accuracy']:.4f} | {cuda} |", flush=True)


if __name__ == "__main__":
    main()
