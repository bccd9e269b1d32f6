"""ThreadLane: calls run in order on one thread, errors come back, a cancelled caller still
waits for its call to finish (nothing half-done behind its back)."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from safefs.lanes import ThreadLane

pytestmark = pytest.mark.timeout(30)


async def test_calls_run_in_order_on_one_thread_and_return_their_results() -> None:
    lane = ThreadLane("test")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * 2

    results: list[int] = []

    async def call(i: int) -> None:
        results.append(await lane.run(record, i))

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(call, i)
            await trio.sleep(0)  # submit in this order
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"safefs-test"}
    assert sorted(results) == [i * 2 for i in range(50)]
    assert threading.current_thread().name != "safefs-test"
    lane.close()


async def test_errors_are_raised_in_the_caller_and_the_lane_goes_on() -> None:
    lane = ThreadLane("test")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        await lane.run(fail)
    assert info.value.errno == 28
    assert await lane.run(lambda: "still serving") == "still serving"
    lane.close()


async def test_a_cancelled_caller_waits_for_its_call_to_finish() -> None:
    lane = ThreadLane("test")
    done = threading.Event()

    def slow() -> str:
        time.sleep(0.3)
        done.set()
        return "finished"

    got: list[str] = []
    with trio.move_on_after(0.05) as scope:
        got.append(await lane.run(slow))
        await trio.sleep(0)  # the postponed cancellation is delivered here
    assert scope.cancelled_caught
    assert done.is_set(), "the caller left before its call ended"
    assert got == ["finished"]
    lane.close()
