"""safefs/sdnotify.py: datagrams to NOTIFY_SOCKET, path or abstract `@name`; never raises."""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path

import pytest

from safefs import sdnotify


def test_unset_notify_socket_is_a_no_op() -> None:
    notifier = sdnotify.Notifier({})
    assert not notifier.enabled and notifier.send(READY=1) is False


def test_abstract_and_path_sockets_get_key_value_lines(tmp_path: Path) -> None:
    name = f"safefs-unit-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path:  # fmt: skip
        abstract.bind("\0" + name)
        by_path.bind(str(tmp_path / "notify"))
        assert sdnotify.Notifier({"NOTIFY_SOCKET": "@" + name}).send(READY=1, STATUS="writer of /p")
        assert abstract.recv(4096) == b"READY=1\nSTATUS=writer of /p"
        notifier = sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        notifier.status("writer,\n epoch 2")
        notifier.status("writer, epoch 2")  # unchanged: not sent again
        notifier.status("follower")
        by_path.settimeout(5)
        assert [by_path.recv(4096), by_path.recv(4096)] == [b"STATUS=writer, epoch 2", b"STATUS=follower"]


def test_a_dead_socket_warns_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, "safefs.sdnotify"):
        assert notifier.send(READY=1) is False
        assert notifier.send(STOPPING=1) is False
    assert len(caplog.records) == 1 and "cannot notify systemd" in caplog.records[0].getMessage()
