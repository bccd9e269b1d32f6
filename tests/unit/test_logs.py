"""safefs/logs.py: the rotated log file, journal priorities, and recent problems for `status`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from safefs import cli, logs
from safefs.control import protocol


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def test_a_log_file_is_rotated_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.setattr(logs, "ROTATE_BYTES", 2000)
    path = tmp_path / "daemon.log"
    where = logs.setup("warning", path)
    assert str(path) in where and "rotated" in where
    log = logging.getLogger("safefs.test")
    log.info("not at warning level")
    for n in range(100):
        log.warning("line %d %s", n, "x" * 40)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "daemon.log.1").exists() and (tmp_path / f"daemon.log.{logs.ROTATE_KEEP}").exists()
    assert not (tmp_path / f"daemon.log.{logs.ROTATE_KEEP + 1}").exists()
    assert path.stat().st_size <= 2000 and "line 99" in path.read_text()
    assert "not at warning level" not in "".join(p.read_text() for p in tmp_path.glob("daemon.log*"))


def test_recent_problems_fold_repeats_for_status(restore_logging: None) -> None:
    logs.setup("info", None)
    log = logging.getLogger("safefs.test")
    log.info("fine")
    for _ in range(3):
        log.warning("renewing epoch %d failed: %s", 4, "EIO")
    log.error("cache disk nearly full")
    recent = logs.recent()
    assert [(r["level"], r["message"], r["count"]) for r in recent[-2:]] == [
        ("warning", "renewing epoch 4 failed: EIO", 3),
        ("error", "cache disk nearly full", 1),
    ]
    assert all(r["message"] != "fine" for r in recent)
    text = cli.format_status(protocol.from_wire(protocol.Status, {"mnt": "/m", "warnings": recent[-2:]}))
    assert "warnings: 2" in text and "  warning: renewing epoch 4 failed: EIO (3 times, last at " in text
    assert "  error: cache disk nearly full at " in text


def test_under_systemd_lines_carry_the_syslog_priority(tmp_path: Path) -> None:
    code = (
        "import logging, os; from safefs import logs; st = os.fstat(2); "
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'; print(logs.setup('info')); "
        "logging.getLogger('safefs.x').error('nfs failed'); logging.getLogger('safefs.x').info('ok')"
    )
    with open(tmp_path / "stderr", "wb") as err:
        done = subprocess.run([sys.executable, "-c", code], stderr=err, stdout=subprocess.PIPE, text=True,
                              timeout=60, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "the systemd journal"
    assert (tmp_path / "stderr").read_text().splitlines() == ["<3>ERROR safefs.x: nfs failed", "<6>INFO safefs.x: ok"]
