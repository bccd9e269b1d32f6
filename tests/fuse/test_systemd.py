"""systemd: `safefs mount --foreground` speaks sd_notify, and SIGTERM writes back, then exits.

Invariants protected (issue 11 item 3):
- with NOTIFY_SOCKET set (here an abstract `@name`, as systemd may use) the daemon sends
  READY=1 only once the mount serves, STATUS= lines naming its role and its unwritten data,
  and STOPPING=1 when the final write-back starts;
- SIGTERM (systemctl stop) writes every change back to the project, unmounts and exits 0;
- contrib/safefs@.service is a Type=notify unit that runs exactly that.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import pytest

from tests.helpers import REPO, MountFactory, is_mounted

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]


class NotifySocket:
    def __init__(self) -> None:
        self.name = f"safefs-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60) -> dict[str, str]:
        """The first message (old or new) with `key` (and `value` inside it, if given)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if key in message and (value is None or value in message[key]):
                    return message
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}{'~' + value if value else ''} in {self.messages}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_status_stopping_and_sigterm_writes_back(mount_factory: MountFactory) -> None:
    notify = NotifySocket()
    try:
        mount = mount_factory(None, None, None, "--writeback-delay", "600", env={"NOTIFY_SOCKET": "@" + notify.name})
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1"
        assert is_mounted(mount.mnt)
        assert "writer" in ready["STATUS"] and "nothing unwritten" in ready["STATUS"], ready

        data = os.urandom(100_000)
        (mount.mnt / "report.dat").write_bytes(data)
        status = notify.wait_for("STATUS", "unwritten: ")
        assert status["STATUS"].startswith("writer of "), status
        assert not (mount.src / "report.dat").exists()

        mount.proc.send_signal(signal.SIGTERM)  # what `systemctl stop` does
        stopping = notify.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1" and "unmounted; writing back" in stopping["STATUS"], stopping
        assert mount.proc.wait(timeout=120) == 0, mount.log_tail()
        assert (mount.src / "report.dat").read_bytes() == data
        assert not is_mounted(mount.mnt)
        assert notify.messages.index(ready) < notify.messages.index(stopping)
    finally:
        notify.close()


def test_the_unit_template_is_type_notify_and_runs_the_foreground_daemon() -> None:
    unit = (REPO / "contrib" / "safefs@.service").read_text()
    assert "\nType=notify\n" in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "safefs mount --foreground" in exec_start and "%f" in exec_start
    assert "TimeoutStopSec=" in unit
