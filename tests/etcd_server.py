"""A real etcd for the tests of the etcd lease backend (Debian's `etcd-server`, installed by
scripts/setup): one single-member cluster per test, on 127.0.0.1, on free ports, with a
temporary data dir; always stopped after the test, even when it fails.

Use it by importing the fixture into a test module: `from tests.etcd_server import etcd_server`.
Without the etcd binary the tests skip, or fail when SAFEFS_REQUIRE_FUSE=1 (CI: everything the
suite needs must be there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import fuse_required, log_tail

START_TIMEOUT = 30.0


def etcd_binary() -> str | None:
    found = shutil.which("etcd")
    if found:
        return found
    return "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.data_dir = root / "etcd-data"
        self.log_path = root / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self.binary, "--name", "test", "--data-dir", os.fspath(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"etcd did not start\n{log_tail(self.log_path)}")
            time.sleep(0.1)
        return self

    def healthy(self) -> bool:
        try:
            request = urllib.request.Request(self.url + "/v3/kv/range", data=json.dumps({"key": "AA=="}).encode())
            with urllib.request.urlopen(request, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Kill it (the data dir stays: `start` again is a restart)."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    binary = etcd_binary()
    if binary is None:
        if fuse_required():
            pytest.fail("etcd is not installed (the Debian package etcd-server; run scripts/setup)")
        pytest.skip("etcd is not installed (the Debian package etcd-server; run scripts/setup)")
    server = EtcdServer(binary, tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
