"""The sd_notify protocol (sd_notify(3)): tell systemd the mount is ready, what it does, and that it stops.

With `Type=notify` (contrib/safefs@.service) systemd sets NOTIFY_SOCKET to a unix datagram
socket: a path, or `@name` for the abstract namespace. Each message is one datagram of
`KEY=VALUE` lines: READY=1 once the mount serves, STATUS=<one line for `systemctl status`>,
STOPPING=1 when the final write-back begins.

Invariants:
- Without NOTIFY_SOCKET every call is a no-op; a failed send is logged once and never raised:
  systemd's bookkeeping must not stop a mount.
- Sends never block (MSG_DONTWAIT on a local socket), so they run inline on the trio thread.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(env: Mapping[str, str]) -> str | None:
    """The address in NOTIFY_SOCKET (abstract names start with NUL), or None if unset."""
    address = env.get("NOTIFY_SOCKET") or None
    if address is not None and address.startswith("@"):
        address = "\0" + address[1:]
    return address


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.address = socket_address(os.environ if env is None else env)
        self._warned = False
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: object) -> bool:
        """Send `KEY=VALUE` lines (READY=1, STATUS=...); True if systemd got them."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("sdnotify: cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
                self._warned = True
            return False
        return True

    def status(self, text: str) -> None:
        """STATUS=text, unless it is what systemd already shows."""
        text = " ".join(text.split())  # one line
        if text != self._last_status and self.send(STATUS=text):
            self._last_status = text
