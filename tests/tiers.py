"""The test tiers, checked (a pytest plugin; tests/conftest.py loads it).

`python -m pytest -m "not slow"` holds every test that starts no process: no Ray cluster, no
`mlflow server`, no subprocess, no multiprocessing or torch.multiprocessing, no DataLoader worker
processes, no training run (train.main, the loop and Tune all start Ray). `slow` marks exactly the
rest. Threads are fine (torch's pools, moto's ThreadedMotoServer).

The guard wraps the library entry points a process starts through: subprocess.Popen (and so
subprocess.run), multiprocessing's Process.start (torch.multiprocessing.spawn, DataLoader workers,
Pool and ProcessPoolExecutor go through it), os.fork, os.posix_spawn(p), os.system, and ray.init
(a driver that joins a running cluster starts no process of its own). The wrappers call the
originals: our code still runs for real. What a test starts is counted over its setup (fixtures
of any scope it sets up first), body and teardown, and against the fixture being set up then.

- A test not marked slow that starts a process fails there ("a fast-tier test started a
  process: mark it slow"), as does one that uses a fixture seen starting one (a session fixture
  an earlier test set up), since its Ray or server is a process all the same.
- A test marked slow that started nothing and used no such fixture is listed at the end of the
  session; `--check-tiers` makes that list a failure. A test that trains in this process for
  minutes, with no process, says so: `@pytest.mark.slow(trains="what and why it takes minutes")`.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing.process
import os
import subprocess
import sys

import pytest

# Library probes that are not the test's doing and do not count: MLflow tags every new run with
# the git commit of its entry script (pytest's, here) through GitPython, which runs `git version`
# when first imported and `git check-ignore` per run, where that script lies in a git checkout
# (a pyenv clone does; a pip-installed Python on CI does not).
# Likewise the machine probes some libraries run once, when first imported (so only in a test that
# happens to import them first): platform.uname's `uname -p` (MLflow's telemetry schema) and
# ctypes.util.find_library's `ldconfig -p` (CUDA's library finder, through torch), and
# matplotlib's font cache, built once per machine with `fc-list` by whichever test first draws text.
INCIDENTAL = {("mlflow.utils.git_utils", None), ("git", "refresh"), ("platform", None), ("ctypes.util", None),
              ("matplotlib.font_manager", None)}

CURRENT: list[pytest.Item] = []  # the test whose setup, body or teardown is running (none between tests)


@dataclasses.dataclass
class Tiers:
    """What one session saw (a session per config: pytester's inline runs keep theirs apart)."""

    fixtures: list[str] = dataclasses.field(default_factory=list)  # being set up, innermost last
    starts: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # test id -> what it started
    process_fixtures: dict[str, str] = dataclasses.field(default_factory=dict)  # fixture -> the first thing it started
    failed: set[str] = dataclasses.field(default_factory=set)  # fast tests already failed for what they started
    slow_ran: dict[str, pytest.Item] = dataclasses.field(default_factory=dict)  # slow tests whose body ran


TIERS = pytest.StashKey[Tiers]()


def pytest_addoption(parser):
    parser.addoption("--check-tiers", action="store_true",
                     help="fail the session if a test marked slow started no process, used no fixture that did and does not say it trains")


def is_slow(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None


def trains(item: pytest.Item) -> str | None:
    return item.get_closest_marker("slow").kwargs.get("trains")


def incidental() -> bool:
    frame = sys._getframe(2)  # the wrapper's caller and up
    while frame is not None:
        module = frame.f_globals.get("__name__")
        if (module, None) in INCIDENTAL or (module, frame.f_code.co_name) in INCIDENTAL:
            return True
        frame = frame.f_back
    return False


def started(what: str) -> None:
    """Called by each wrapper before the original runs."""
    if not CURRENT or incidental():
        return
    item = CURRENT[-1]
    tiers = item.config.stash[TIERS]
    if tiers.fixtures:
        tiers.process_fixtures.setdefault(tiers.fixtures[-1], what)
    tiers.starts.setdefault(item.nodeid, []).append(what)
    if not is_slow(item):
        pytest.fail(fast_tier_message(what), pytrace=False)


def fast_tier_message(what: str) -> str:
    return f"a fast-tier test started a process: mark it slow ({what}; see tests/tiers.py)"


def wrap(owner, name: str, describe) -> None:
    original = getattr(owner, name)
    if getattr(original, "_tier_guard", False):
        return

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        started(describe(*args, **kwargs))
        return original(*args, **kwargs)

    guarded._tier_guard = True
    setattr(owner, name, guarded)


def command(args) -> str:
    words = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    return " ".join(os.fsdecode(w) if isinstance(w, (bytes, os.PathLike)) else str(w) for w in words)[:120]


def wrap_ray_init() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and hasattr(ray, "init"):
        wrap(ray, "init", lambda *a, **k: f"ray.init(address={k.get('address', a[0] if a else None)!r})")


def pytest_configure(config):
    config.stash[TIERS] = Tiers()
    # Popen._execute_child, not Popen: subprocess.run and asyncio subprocesses come through it.
    wrap(subprocess.Popen, "_execute_child", lambda self, args, *a, **k: f"subprocess: {command(args)}")
    wrap(multiprocessing.process.BaseProcess, "start", lambda self: f"multiprocessing: {self.name}")
    wrap(os, "fork", lambda: "os.fork()")
    wrap(os, "system", lambda cmd: f"os.system: {command(cmd)}")
    for name in ("posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            wrap(os, name, lambda path, argv, *a, name=name, **k: f"os.{name}: {command(argv)}")
    wrap_ray_init()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wrap_ray_init()  # ray is imported by the first test module that needs it
    CURRENT.append(item)
    try:
        yield
    finally:
        CURRENT.pop()


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    fixtures = request.config.stash[TIERS].fixtures
    fixtures.append(fixturedef.argname)
    try:
        yield
    finally:
        fixtures.pop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    process_fixtures = item.config.stash[TIERS].process_fixtures
    used = sorted(set(item.fixturenames) & process_fixtures.keys())
    if used and not is_slow(item):
        pytest.fail(fast_tier_message(f"it uses fixture {used[0]}, which started {process_fixtures[used[0]]}"), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    tiers = item.config.stash[TIERS]
    if call.when == "call" and is_slow(item) and not report.skipped:
        tiers.slow_ran[item.nodeid] = item
    starts = tiers.starts.get(item.nodeid)
    if starts and not is_slow(item) and item.nodeid not in tiers.failed:
        tiers.failed.add(item.nodeid)  # one failure per test, in the phase that started something
        if report.passed:  # the code under test caught the guard's failure
            report.outcome = "failed"
            report.longrepr = fast_tier_message(starts[0])


def needless_slow(tiers: Tiers) -> list[str]:
    """Slow tests that ran and started nothing, neither themselves nor through a fixture, and do
    not say they train."""
    return [nodeid for nodeid, item in tiers.slow_ran.items()
            if not tiers.starts.get(nodeid) and not set(item.fixturenames) & tiers.process_fixtures.keys() and not trains(item)]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--check-tiers") and needless_slow(session.config.stash[TIERS]) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tiers = config.stash[TIERS]
    if not tiers.slow_ran:
        return
    needless = needless_slow(tiers)
    declared = [nodeid for nodeid, item in tiers.slow_ran.items() if trains(item) and not tiers.starts.get(nodeid)]
    if needless:
        terminalreporter.section("tiers: slow tests that started no process")
        for nodeid in needless:
            terminalreporter.write_line(nodeid)
    terminalreporter.write_line(
        f"tiers: of {len(tiers.slow_ran)} slow tests that ran, {len(tiers.slow_ran) - len(needless) - len(declared)} started a process "
        f"or used a fixture that did, {len(declared)} train in-process (slow(trains=...)), {len(needless)} did neither"
        + (": drop their slow mark" + ("" if config.getoption("--check-tiers") else " (--check-tiers fails the session)") if needless else ""))
