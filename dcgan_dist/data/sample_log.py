"""--sample-log DIR: which samples each step trained on, for auditing an epoch across restarts.

Every rank appends one JSON line per step, {"step", "rank", "keys"}, to a file of its own per
attempt (a worker group Ray Train started: a restart is a new attempt). A restart redoes the
steps after the checkpoint it resumes from, so a step may appear in two attempts; the later
attempt's is the one the run kept. `kept_keys` reads it back that way. DIR must be a filesystem
every node writes to (a shared volume); nothing is written without the flag.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path


class SampleLog:
    """One rank's file in `directory` for this attempt (no directory: nothing is written).
    `attempt`: the same on every rank of the attempt, later for later attempts (rank 0's clock
    at the start, broadcast)."""

    def __init__(self, directory: str | Path, attempt: int, rank: int):
        self.rank, self.file = rank, None
        if directory:
            path = Path(directory) / f"attempt-{attempt:020d}-rank-{rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a", buffering=1)  # a line at a time: a killed worker loses no whole step

    def write(self, step: int, keys: list[str]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "rank": self.rank, "keys": keys}) + "\n")


def new_attempt() -> int:
    return time.time_ns()


def kept_keys(directory: str | Path) -> dict[int, list[str]]:
    """{step: the keys every rank read at that step} as the run kept them: for each step, the
    latest attempt that took it."""
    by_attempt: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(directory).glob("attempt-*-rank-*.jsonl")):
        attempt = int(path.name.split("-")[1])
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # cut short as its worker was killed: a step a later attempt redid
                    continue
                raise
            by_attempt[attempt][row["step"]] += row["keys"]
    kept: dict[int, list[str]] = {}
    for attempt in sorted(by_attempt):  # later attempts overwrite the steps they redid
        kept.update(by_attempt[attempt])
    return kept
