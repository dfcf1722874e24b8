"""benchmarks/gpu/check.sh, the one-call GPU check: its command line, and part d's dry run here.

The whole dry run (parts a-e on this CPU, through Ray) takes minutes; it is run by hand
(`bash benchmarks/gpu/check.sh --dry-run`, docs/performance.md), not here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu" / "check.sh"

pytestmark = pytest.mark.slow  # each test runs check.sh: a bash process


def run_check(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": os.environ.get("PYTHON", "python")}
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_help_prints_the_parts_and_exits_0():
    result = run_check("--help")
    assert result.returncode == 0
    assert "--dry-run" in result.stdout and "--only" in result.stdout
    assert all(f"  {part}  " in result.stdout for part in "abcde")


@pytest.mark.parametrize(("args", "says"), [
    (("--only", "a,x"), "unknown part 'x'"),
    (("--frobnicate",), "unknown argument: --frobnicate"),
    (("--out",), "--out needs a folder"),
])
def test_bad_arguments_exit_2_with_one_line(args, says, tmp_path):
    result = run_check(*args, "--out", str(tmp_path)) if args != ("--out",) else run_check(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("check.sh: error: ") and says in lines[0], result.stderr
    assert not (tmp_path / "summary.md").exists()  # nothing ran


def test_dry_run_of_part_d_prints_one_summary_table(tmp_path):
    result = run_check("--dry-run", "--only", "d", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert summary in result.stdout  # printed, and written to OUT/summary.md
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert rows[0] == "| part | status | key figures |"
    assert len(rows) == 2 and rows[1].startswith("| d | ok (")
    assert "img/s per core" in rows[1]
    if not torch.cuda.is_available():
        assert "GPU: no CUDA" in rows[1]
    log = (tmp_path / "part-d.log").read_text()
    assert "| decoder | img/s | note |" in log
    assert not (tmp_path / "scratch").exists()  # removed unless --keep-scratch
