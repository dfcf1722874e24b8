"""Every command line: a flag is spelt out in full (argparse's prefix matching would read the typo
--max-step as --max-steps), and --help or a bad flag answer before torch, Ray or MLflow load.

CLIS lists every `python -m` entry point of dcgan_dist/ and tuning/; a new one with an argparse
parser fails test_every_cli_is_listed until it is listed here.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcgan_dist import choices

REPO = Path(__file__).resolve().parents[1]

# module -> (valid argv with one optional flag in full, that flag, an abbreviation argparse would
# have taken for it); a required flag would not do: its absence is reported first
CLIS = {
    "dcgan_dist.train": (["--max-steps", "10"], "--max-steps", "--max-step"),
    "tuning.sweep": (["--sweep-name", "s", "--max-steps", "10"], "--sweep-name", "--sweep"),
    "dcgan_dist.shards": (["pack", "--source", "digits", "--out", "o", "--image-size", "32", "--shard-size", "9"], "--shard-size", "--shard"),
    "dcgan_dist.probe": (["--discriminator", "d", "--dataset", "digits", "--feature-dtype", "float32"], "--feature-dtype", "--feature"),
    "dcgan_dist.evaluate": (["--generator", "g", "--real", "digits", "--output-json", "o.json", "--samples", "10"], "--samples", "--sampl"),
    "dcgan_dist.explore": (["--generator", "g", "--output-dir", "d"], "--output-dir", "--output"),
    "dcgan_dist.register": (["--storage-path", "s", "--run-name", "r", "--tracking-uri", "u"], "--tracking-uri", "--tracking"),
    "dcgan_dist.import_authors": (["folder", "--stats-batches", "2"], "--stats-batches", "--stats-batch"),
    "dcgan_dist.authors": (["folder", "--stats-batches", "2"], "--stats-batches", "--stats-batch"),  # import_authors's own module
    "dcgan_dist.bench": (["--batch-size", "4"], "--batch-size", "--batch"),
}


def build_parser(module: str):
    """The entry point's own parser, built as `python -m` builds it."""
    if module == "dcgan_dist.train":
        from dcgan_dist import config

        return config.build_parser()
    package = importlib.import_module(module)
    entry = importlib.import_module(f"{module}.__main__") if hasattr(package, "__path__") else package
    return entry.build_parser()


def entry_points() -> set[str]:
    """Every module of ours that `python -m` runs: a package's __main__.py, or a module with an
    `if __name__ == "__main__":` block."""
    found = set()
    for package in ("dcgan_dist", "tuning"):
        for path in (REPO / package).rglob("*.py"):
            body = ast.parse(path.read_text()).body
            if path.name == "__main__.py" or any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in body):
                parts = path.relative_to(REPO).with_suffix("").parts
                found.add(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return found


def test_every_cli_is_listed():
    assert entry_points() == set(CLIS)


@pytest.mark.parametrize("module", CLIS)
def test_an_abbreviated_flag_exits_2_naming_it(module, capsys):
    argv, flag, abbreviation = CLIS[module]
    build_parser(module).parse_args(argv)  # the flag in full is a real one
    with pytest.raises(SystemExit) as exit_info:
        build_parser(module).parse_args([abbreviation if arg == flag else arg for arg in argv])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"unrecognized arguments: {abbreviation}" in lines[0]


def test_the_choice_names_are_the_tables_keys():
    """choices.py holds the names apart from the tables keyed by them (which load torch)."""
    from dcgan_dist import checkpoint_upload, models, step
    from dcgan_dist.authors import weights as authors
    from dcgan_dist.data import pack
    from dcgan_dist.probe import protocol as probe_protocol
    from dcgan_dist.probe import svm

    assert choices.PRESETS == tuple(models.PRESETS)
    assert choices.AUTHORS_PRESETS == authors.AUTHORS_PRESETS
    assert choices.BN_PLACEMENTS == tuple(models.BN_PLACEMENTS)
    assert choices.PRECISIONS == tuple(step.PRECISIONS)
    assert choices.FORMATS == tuple(pack.FORMATS)
    assert choices.FEATURE_DTYPES == tuple(probe_protocol.FEATURE_DTYPES)
    assert choices.SVM_SOLVERS == svm.SOLVERS
    assert choices.CHECKPOINT_UPLOADS == ("auto", *checkpoint_upload.MODES)


# Runs the entry point as `python -m` does, with --help and then with an unknown flag after valid
# arguments, and prints the exit codes, what went to stderr and which of torch, Ray and MLflow
# were loaded by then.
RUN_AS_MAIN = """
import contextlib, io, json, runpy, sys
module, argv = sys.argv[1], json.loads(sys.argv[2])
codes, errors = [], []
for args in (["--help"], [*argv, "--no-such-flag"]):
    sys.argv = [module, *args]
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            codes.append(e.code)
    errors.append(stderr.getvalue())
print(json.dumps({"codes": codes, "errors": errors, "loaded": [m for m in ("torch", "ray", "mlflow") if m in sys.modules]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", CLIS)
def test_help_and_a_bad_flag_answer_before_torch_ray_and_mlflow_load(module):
    argv, _, _ = CLIS[module]
    result = subprocess.run([sys.executable, "-c", RUN_AS_MAIN, module, json.dumps(argv)], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 2], report
    assert report["errors"][0] == "" and len(report["errors"][1].strip().splitlines()) == 1, report["errors"]
    assert "unrecognized arguments: --no-such-flag" in report["errors"][1]
    assert report["loaded"] == [], f"python -m {module} --help loaded {report['loaded']}"


def test_the_failure_summary_names_the_lowest_ranks_error_without_credentials():
    """What `python -m dcgan_dist.train` prints when fit() fails: one line, the lowest failed rank's
    error (or the controller's), with the tracking URI's credentials cut out."""
    import mlflow
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from dcgan_dist.train import failure_summary

    request = "API request to http://dcgan:s3cret@127.0.0.1:5000/api/2.0/mlflow/runs/update failed with exception {}"
    workers = WorkerGroupError("2 workers failed", {1: RuntimeError("rank 1 too"),
                                                    0: mlflow.exceptions.MlflowException(request.format("RetryError"))})
    assert failure_summary(workers) == f"rank 0: {request.format('RetryError').replace('dcgan:s3cret@', '')}"
    controller = ControllerError(RuntimeError("Traceback ...\n  File x\n" + request.format("timeout")))
    assert failure_summary(controller) == f"Ray Train's controller: {request.format('timeout').replace('dcgan:s3cret@', '')}"


def test_every_benchmark_script_refuses_abbreviated_flags():
    """The benchmark scripts are CLIs too: `--round 2` must not run as `--rounds 2`. Their parsers
    are plain argparse (they run on the GPU image, which may lack our package): each must set
    allow_abbrev=False."""
    allowing = []
    for path in sorted((REPO / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ArgumentParser":
                flag = next((k.value for k in node.keywords if k.arg == "allow_abbrev"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    allowing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not allowing, f"parsers that accept abbreviated flags: {allowing}"
