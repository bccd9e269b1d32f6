"""Test-suite wiring shared by every tier (unit, fs, fuse, multihost).

- Markers: `slow` tests are deselected unless `--run-slow` (or SAFEFS_RUN_SLOW=1) is given, the
  -m expression names `slow`, or the test is named by its node id. `fuse` tests (marked, under
  tests/fuse or tests/multihost, or using a mount fixture) need /dev/fuse and fusermount3:
  they skip without them, and fail instead when SAFEFS_REQUIRE_FUSE=1 (CI sets it).
- Mount hygiene: at session start and finish, safefs mounts left under pytest's temp dirs by
  dead sessions are lazily unmounted; at finish every daemon this session started is reaped.
- `mount_factory` (here, so tests/multihost can use it too) starts daemons; `mounted` lives in
  tests/fuse/conftest.py. On a failed test the daemon logs are attached to the report.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    LIVE_MOUNTS,
    MountFactory,
    fuse_required,
    fuse_unavailable_reason,
    require_fuse,
    sweep_stale_mounts,
)

# A developer's own /etc/safefs/config.toml or ~/.config/safefs/config.toml must never change
# what a test sees: every safefs the tests run (inheriting this environment) reads none.
os.environ["SAFEFS_SITE_CONFIG"] = "/nonexistent/safefs-tests/site-config.toml"
os.environ["SAFEFS_CONFIG"] = "/nonexistent/safefs-tests/user-config.toml"

MOUNT_FIXTURES = {"mount_factory", "mounted"}
FUSE_DIRS = {"fuse", "multihost"}  # tests/<dir>/ whose every test needs a real mount
FACTORY_KEY = pytest.StashKey[MountFactory]()
SWEEP_KEY = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=os.environ.get("SAFEFS_RUN_SLOW") == "1",
        help="also run tests marked slow (default: deselected; SAFEFS_RUN_SLOW=1 does the same)",
    )


# --- stale mounts --------------------------------------------------------------------------


def _pytest_user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (ImportError, OSError, KeyError):
        return "unknown"


def _temp_roots(config: pytest.Config) -> tuple[list[Path], list[Path]]:
    """(roots owned by this session, roots shared with other sessions), as pytest lays them out.

    Computed without asking pytest for its basetemp: creating that cleans old numbered dirs,
    which would walk into stale mounts before we unmount them.
    """
    owned = [Path(config.option.basetemp).resolve()] if config.option.basetemp else []
    temproot = Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()).resolve()
    return owned, [temproot / f"pytest-of-{_pytest_user()}", temproot / "pytest-of-unknown"]


def _sweep(config: pytest.Config) -> list[str]:
    owned, shared = _temp_roots(config)
    factory = getattr(config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if basetemp is not None:
        owned.append(Path(basetemp))
    return sweep_stale_mounts(owned, shared)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[SWEEP_KEY] = _sweep(session.config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    problems = []
    for mount in list(LIVE_MOUNTS):  # left by a fixture that never got to its teardown
        problems += mount.cleanup()
        LIVE_MOUNTS.remove(mount)
    problems += _sweep(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if problems and reporter is not None:
        reporter.write_line("")
        for line in problems:
            reporter.write_line(f"safefs cleanup: {line}", yellow=True)


# --- header, selection, FUSE gate ----------------------------------------------------------


def pytest_report_header(config: pytest.Config) -> list[str]:
    reason = fuse_unavailable_reason()
    if reason is None:
        lines = ["safefs: FUSE tiers enabled (/dev/fuse opens, fusermount3 found)"]
    elif fuse_required():
        lines = [f"safefs: FUSE tiers REQUIRED but unavailable, they will fail: {reason}"]
    else:
        lines = [f"safefs: FUSE tiers disabled, they will skip: {reason}"]
    if config.getoption("run_slow"):
        lines.append("safefs: slow tests included")
    else:
        lines.append("safefs: slow tests excluded (add --run-slow)")
    for line in config.stash.get(SWEEP_KEY, []):
        lines.append(f"safefs: {line}")
    return lines


def _needs_fuse(item: pytest.Item, tests_dir: Path) -> bool:
    if MOUNT_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    try:
        first = item.path.relative_to(tests_dir).parts[0]
    except (ValueError, IndexError):
        return False
    return first in FUSE_DIRS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        if _needs_fuse(item, tests_dir) and item.get_closest_marker("fuse") is None:
            item.add_marker(pytest.mark.fuse)

    if config.getoption("run_slow") or "slow" in (config.getoption("markexpr") or ""):
        return
    named = {arg for arg in config.args if "::" in arg}
    keep, drop = [], []
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        explicitly_named = any(item.nodeid == n or item.nodeid.startswith(n + "[") for n in named)
        (drop if slow and not explicitly_named else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") is not None:
        require_fuse()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # A failure while starting a mount already quotes the log; attach it to failed tests.
    factory = item.stash.get(FACTORY_KEY, None)
    if factory is not None and report.failed and report.when == "call":
        for mount in factory.mounts:
            report.sections.append((f"safefs daemon log {mount.log_path}", mount.log_tail()))
    return report


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def mount_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MountFactory]:
    """`mount(src=None, mnt=None, cache_dir=None, *extra_args, host_id=None, env=None,
    wait=True) -> Mount`: starts a safefs daemon in the foreground and waits until it is
    mounted and ready. See tests/helpers.py (`MountFactory`, `Mount`). Teardown always
    unmounts (fusermount3 -u -z) and reaps every daemon it started.
    """
    require_fuse()
    factory = MountFactory(tmp_path)
    request.node.stash[FACTORY_KEY] = factory
    try:
        yield factory
    finally:
        problems = factory.cleanup()
        if problems:
            text = "\n".join(problems)
            request.node.add_report_section("teardown", "safefs cleanup", text)
            warnings.warn(pytest.PytestWarning(f"safefs mount cleanup: {text}"), stacklevel=2)
