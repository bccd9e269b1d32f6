"""The project's history (safefs/history.py) and the lease keeper's on_event hook.

Invariants protected (issue 11 item 11):
- each host appends to its own file, one whole line per write: many processes appending at
  once (two hosts, and two mounts of one host) leave only whole records;
- the log is bounded: a full file is rotated to `.old.jsonl`, replacing the previous one;
- `read` merges every host's file sorted by time and skips what is not a record;
- the keeper tells on_event of acquire, release, takeover (naming the previous holder) and
  self-fence, with the epoch; a failing hook never breaks the lease.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import trio
import trio.testing

from safefs import cli, history
from safefs.history import Event, HistoryLog
from tests.doubles import MemoryLeaseStore, simulated_identity
from tests.unit.test_lease_keeper import BUDGET, Host, T, wait_role


def event(kind: str, host: str, epoch: int, when: float, detail: str = "") -> Event:
    return Event(kind, host, "ann", 42, epoch, "/mnt/p", detail, when)


def test_records_from_every_host_are_merged_by_time(tmp_path: Path) -> None:
    a, b = HistoryLog(tmp_path, "hosta", "m1"), HistoryLog(tmp_path, "hostb", "m2")
    a.append(event("acquire", "hosta", 1, 100.0))
    b.append(event("takeover", "hostb", 2, 300.0, "from ann@hosta (pid 42)"))
    a.append(event("self-fence", "hosta", 1, 200.0, "no successful renewal for 170 s"))
    assert a.path != b.path and a.path.parent == tmp_path / ".safefs" / "history"
    assert a.path.stat().st_mode & 0o777 == 0o644
    found = history.read(tmp_path)
    assert [(r["event"], r["host"], r["epoch"]) for r in found.records] == [
        ("acquire", "hosta", 1), ("self-fence", "hosta", 1), ("takeover", "hostb", 2),
    ]
    assert found.records[2]["detail"] == "from ann@hosta (pid 42)" and found.bad_lines == 0


def test_a_full_file_is_rotated_so_the_log_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "ROTATE_BYTES", 1000)
    log = HistoryLog(tmp_path, "hosta", "m1")
    for n in range(60):
        log.append(event("acquire", "hosta", n, float(n)))
    files = sorted(p.name for p in log.path.parent.iterdir())
    assert len(files) == 2 and any(f.endswith(".old.jsonl") for f in files)
    assert all(p.stat().st_size < 1000 + 300 for p in log.path.parent.iterdir())
    epochs = [r["epoch"] for r in history.read(tmp_path).records]
    assert epochs == sorted(epochs) and epochs[-1] == 59 and len(epochs) < 60


def _append_many(project: str, host: str, count: int) -> None:
    log = HistoryLog(Path(project), host, "m-" + host)
    for n in range(count):
        log.append(event("conflict", host, n, float(n), "x" * (n % 700)))


def test_concurrent_appends_never_tear_a_record(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), host, 200))
               for host in ("hosta", "hosta", "hostb")]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    found = history.read(tmp_path)
    assert found.bad_lines == 0 and len(found.records) == 600
    assert sum(r["host"] == "hosta" for r in found.records) == 400


def test_junk_is_skipped_and_symlinks_are_not_followed(tmp_path: Path) -> None:
    log = HistoryLog(tmp_path, "hosta", "m1")
    log.append(event("acquire", "hosta", 1, 1.0, "bell \x07 here"))
    with open(log.path, "ab") as f:
        f.write(b'{"v": 1, "time": 2.0, "event": "rele')  # a torn tail after a crash
    (log.path.parent / "evil.jsonl").symlink_to("/etc/passwd")
    found = history.read(tmp_path)
    assert len(found.records) == 1 and found.records[0]["detail"] == "bell ? here"
    assert found.bad_lines == 2  # the torn line, and the symlink


def test_no_history_yet_is_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert history.read(tmp_path).records == []
    assert cli.main(["history", str(tmp_path)]) == 0
    assert "no history recorded" in capsys.readouterr().out


def test_history_command_prints_text_and_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    HistoryLog(tmp_path, "hosta", "m1").append(event("acquire", "hosta", 3, 1_800_000_000.0))
    assert cli.main(["history", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith("acquire    epoch 3   ann@hosta") and line.startswith("20")
    assert cli.main(["history", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 3


# ---- the keeper's hook ---------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []

    def __call__(self, kind: str, epoch: int, detail: str) -> None:
        self.events.append((kind, epoch, detail))


def hooked(project: MemoryLeaseStore, name: str) -> tuple[Host, Recorder]:
    host, recorder = Host(project, name), Recorder()
    host.keeper._on_event = recorder  # noqa: SLF001 (Host builds the keeper; the hook is a constructor argument)
    return host, recorder


@pytest.mark.trio
async def test_the_keeper_reports_acquire_release_takeover_and_self_fence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    project = MemoryLeaseStore()
    (a, seen_a), (b, seen_b) = hooked(project, "a"), hooked(project, "b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await a.keeper.release()
        await wait_role(b, "writer", within=2 * T.poll + 1)
        assert seen_a.events == [("acquire", 1, ""), ("release", 1, "")]
        assert seen_b.events == [("acquire", 2, "")]
        b.store.fail()  # b's renewals fail: it fences itself at its deadline, a takes over
        with trio.fail_after(BUDGET + 1):
            await b.keeper.wait_lost()
        assert seen_b.events[-1][:2] == ("self-fence", 2) and "no successful renewal" in seen_b.events[-1][2]
        await a.keeper.acquire(wait=True)
        assert seen_a.events[-1][:2] == ("takeover", 3)
        assert seen_a.events[-1][2] == f"from {simulated_identity('b').user}@b (pid {b.identity.pid})"
        assert [e[0] for e in seen_b.events].count("self-fence") == 1
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_failing_hook_never_breaks_the_lease(autojump_clock: trio.testing.MockClock) -> None:
    project = MemoryLeaseStore()
    a = Host(project, "a")

    def broken(kind: str, epoch: int, detail: str) -> None:
        raise RuntimeError("history is down")

    a.keeper._on_event = broken  # noqa: SLF001
    async with trio.open_nursery() as nursery:
        assert await a.start(nursery) == "writer"
        await a.keeper.release()
        assert await a.keeper.acquire(wait=False) == 2
        nursery.cancel_scope.cancel()
