"""Human output reads like a person wrote it (issue 11 item 9), without a mount.

Checks: `format_status` shows no Python values (True/False/None, dicts, quotes, 60.0) even for
keys it does not know; an unexpected daemon failure is described as words, exception groups
flattened; `recover --help` has a description; the lease store is named by its path.
"""

from __future__ import annotations

import re
import subprocess
import sys

from safefs import cli
from safefs.control import protocol
from safefs.errors import describe_exception
from safefs.lease.store import DirLeaseStore

PYTHON_VALUES = re.compile(r"\b(True|False|None)\b|[{}\[\]']|\b\d+\.0\b(?! ?(s|KiB|MiB|GiB|TiB)\b)")


def test_format_status_has_no_python_values():
    status = {
        "mnt": "/m", "src": "/p", "role": "follower", "pid": 3, "dirty_bytes": 0, "dirty_files": 0,
        "oldest_dirty_age": None, "pending_ops": 1, "flushing": False, "writeback_delay": 60.0,
        "internal_errors": 0, "errors": [], "conflicts": [], "warnings": [],
        "lease": {"epoch": 2, "holder": None, "deadline": None, "last_error": None, "writable": False},
        "some_new_field": {"nested": True, "ratio": 0.25, "items": []}, "unknown_none": None,
    }  # fmt: skip
    text = cli.format_status(protocol.from_wire(protocol.Status, status))
    bad = [line for line in text.splitlines() if PYTHON_VALUES.search(line)]
    assert not bad, text
    assert "writeback delay:" in text and "1 min 0 s" in text, text
    assert "flushing:" in text and re.search(r"flushing:\s+no$", text, re.M), text
    assert re.search(r"pending ops:\s+1$", text, re.M), text


def test_unexpected_failures_are_described_as_words():
    group = ExceptionGroup("Exceptions from Trio nursery", [RuntimeError("fuse_session_mount failed")])
    assert describe_exception(group) == "RuntimeError: fuse_session_mount failed"
    assert describe_exception(KeyError()) == "KeyError"


def test_recover_help_has_a_description():
    done = subprocess.run(
        [sys.executable, "-m", "safefs", "recover", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    body = done.stdout.split("\n\n", 1)[1]  # after the usage block
    assert "Write back the changes" in body, done.stdout


def test_lease_store_is_named_by_its_path(tmp_path):
    assert str(DirLeaseStore(tmp_path)) == str(tmp_path / ".safefs" / "lease")
