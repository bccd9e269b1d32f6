"""The control protocol and rule matching of tests/faultfs.py, without a mount."""

from __future__ import annotations

import errno
import json

import pytest
import trio
import trio.testing

from tests.faultfs import Faults


@pytest.fixture
def faults() -> Faults:
    return Faults(0.0, 0.0)


def test_commands_parse_and_report(faults: Faults) -> None:
    assert faults.command("ping") == "ok pong"
    assert faults.command("fail read,write EIO '/dir with space' times=2") == "ok"
    assert faults.command("hang getattr") == "ok"
    assert faults.command("latency 0.5 meta") == "ok"
    rules = json.loads(faults.command("counters")[3:])["rules"]
    assert rules[0] == {"action": "fail", "ops": ["read", "write"], "error": "EIO", "prefix": "/dir with space",
                        "times": 2}
    assert rules[1]["action"] == "hang" and rules[1]["ops"] == ["getattr"]
    assert faults.meta_latency == 0.0005 and faults.data_latency == 0.0
    assert faults.command("release") == "ok released=0"
    assert [r.action for r in faults.rules] == ["fail"]
    assert faults.command("clear") == "ok released=0"
    assert faults.rules == []


@pytest.mark.parametrize(
    "line",
    ["", "fail", "fail read", "fail read ENOTREAL", "fail nosuchop EIO", "fail read EIO relative/path",
     "hang read /a times=0", "latency -1", "latency 1 sideways", "explode"],
)
def test_bad_commands_answer_an_error(faults: Faults, line: str) -> None:
    assert faults.command(line).startswith("error ")
    assert faults.rules == []


async def test_prefixes_and_times_select_what_fails(faults: Faults) -> None:
    faults.command("fail read ESTALE /a times=1")
    await faults.gate("read", [b"/ab"])  # "/a" is a directory prefix, not a string prefix
    await faults.gate("write", [b"/a/f"])
    with pytest.raises(OSError) as caught:
        await faults.gate("read", [b"/a/f"])
    assert caught.value.errno == errno.ESTALE
    await faults.gate("read", [b"/a/f"])  # times=1 used up
    assert faults.failed == {"read": 1} and faults.calls["read"] == 3


async def test_hang_waits_for_release(faults: Faults) -> None:
    faults.command("hang * /slow")
    done = []

    async def op() -> None:
        await faults.gate("lookup", [b"/slow/x"])
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(op)
        await trio.testing.wait_all_tasks_blocked()
        assert faults.hung_now == 1 and not done
        await faults.gate("lookup", [b"/fast"])  # other paths pass
        assert faults.command("release") == "ok released=1"
    assert done == [True] and faults.hung_now == 0
