"""tests/tiers.py, the tier guard, run inline on small test files (pytester: no process).

Nothing here starts a process: each would-be start is a fast-tier test the guard stops first."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

HEADER = """
import subprocess
import pytest
"""


@pytest.fixture
def run(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # installed plugins may run git at start-up (pytest-benchmark does)
    pytester.makeini("[pytest]\nmarkers =\n    slow: a process or minutes of training\n")
    pytester.makeconftest('pytest_plugins = ["tests.tiers"]\n')

    def run(source: str, *args: str):
        pytester.makepyfile(test_sample=HEADER + source)
        return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", *args)

    return run


def test_a_fast_test_that_starts_a_process_fails_before_it_starts(run):
    result = run("""
def test_runs_true():
    subprocess.run(["true"], check=True)

def test_swallows_the_failure():
    try:
        subprocess.run(["true"])
    except BaseException:
        pass

def test_pure():
    assert 1 + 1 == 2
""")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*a fast-tier test started a process: mark it slow (subprocess: true;*"])


# Every other entry point tiers.py wraps: (the test's imports, a body that starts a process and
# reaps it, what the failure names). Were the guard to miss one, the process would start for real.
OTHER_STARTS = {
    "multiprocessing-process": ("import multiprocessing", "multiprocessing.Process(target=print).start()", "multiprocessing: Process-*"),
    "multiprocessing-pool": ("import multiprocessing", "multiprocessing.Pool(1).terminate()", "multiprocessing: *PoolWorker-*"),
    "process-pool-executor": ("import concurrent.futures", "concurrent.futures.ProcessPoolExecutor(1).submit(print).result(timeout=30)",
                              "multiprocessing: *"),
    "os-fork": ("import os", "pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)", "os.fork()"),
    "os-posix-spawn": ("import os", 'os.waitpid(os.posix_spawn("/bin/true", ["true"], os.environ), 0)', "os.posix_spawn: true"),
    "os-posix-spawnp": ("import os", 'os.waitpid(os.posix_spawnp("true", ["true"], os.environ), 0)', "os.posix_spawnp: true"),
    "os-system": ("import os", 'os.system("true")', "os.system: true"),
    # a local Ray would start its GCS through subprocess, which names no ray.init
    "ray-init": ("import ray", 'ray.init(address="local", num_cpus=1, include_dashboard=False)', "ray.init(address='local')"),
}


@pytest.mark.parametrize("case", OTHER_STARTS)
def test_every_other_way_to_start_a_process_fails_a_fast_test_before_it_starts(run, case):
    imports, body, named = OTHER_STARTS[case]
    if case == "ray-init":
        import ray  # noqa: F401 - here, not in the inline run: pytester drops the modules a run imported, and ray's do not re-import
    result = run(f"""
{imports}

def test_starts():
    {body}

def test_pure():
    assert 1 + 1 == 2
""")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"*a fast-tier test started a process: mark it slow ({named};*"])


def test_a_slow_test_that_starts_nothing_is_listed_and_fails_the_session_under_check_tiers(run):
    source = """
@pytest.mark.slow
def test_needs_nothing():
    pass

@pytest.mark.slow(trains="minutes of updates in this process")
def test_trains_in_process():
    pass
"""
    listed = run(source)
    listed.assert_outcomes(passed=2)
    assert listed.ret == 0
    listed.stdout.fnmatch_lines(["*slow tests that started no process*", "test_sample.py::test_needs_nothing",
                                 "tiers: of 2 slow tests that ran, 0 started a process or used a fixture that did, 1 train in-process*"])
    assert "test_sample.py::test_trains_in_process" not in listed.stdout.str()
    assert run(source, "--check-tiers").ret == pytest.ExitCode.TESTS_FAILED
