"""The worker flags' text, parsed: `--num-workers` (N, or MIN:MAX) and `--worker-resources` (JSON).

Pure and torch-free: config.validate turns a ValueError here into the one-line error naming the
flag; placement.py and train.py read the parsed values.
"""

from __future__ import annotations

import json
import math


def worker_range(num_workers: str) -> tuple[int, int]:
    """(MIN, MAX): "N" is (N, N), a fixed run; "MIN:MAX" an elastic one."""
    text = str(num_workers).strip()
    parts = text.split(":")
    if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"expected N or MIN:MAX, two whole numbers (got {text!r})")
    low, high = int(parts[0]), int(parts[-1])
    if low < 1:
        raise ValueError(f"at least 1 worker (got {text!r})")
    if low > high:
        raise ValueError(f"MIN must not exceed MAX (got {text!r})")
    return low, high


def worker_resources(text: str) -> dict[str, float]:
    """{name: amount} from a JSON object of positive numbers ("" = none). CPUs and GPUs have
    their own flags (--cpus-per-worker, --use-gpu)."""
    text = text.strip()
    if not text:
        return {}
    try:
        resources = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(resources, dict):
        raise ValueError(f"expected a JSON object such as '{{\"trainer_slot\": 1}}', got {text!r}")
    for name, amount in resources.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"{name} has its own flag ({'--cpus-per-worker' if name == 'CPU' else '--use-gpu'})")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not (amount > 0 and math.isfinite(amount)):
            raise ValueError(f"{name!r} must be a number > 0 (got {amount!r})")
    return {name: float(amount) for name, amount in resources.items()}
