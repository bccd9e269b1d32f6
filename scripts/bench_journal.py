"""scripts/bench-journal: the cost of recording a write, against the number of ranges a file has.

    scripts/bench-journal [--writes N] [--ranges N] [--runs N]

Random 4 KiB writes (the same offsets) into two 1 GiB files, through `Filesystem.write` (the
daemon's write path without the kernel: cache-file write and journal commit): one fresh, one
that already has 10,000 dirty ranges. Issue 10 wants the second at least 0.8x the first; before
format 2 of the journal (one record per inode holding every range) it was about 0.14x.
Prints both rates side by side, the median of --runs runs. Everything lives in a temp dir.
"""

from __future__ import annotations

import argparse
import os
import random
import stat
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safefs.backing import Backing  # noqa: E402
from safefs.cache import ContentCache  # noqa: E402
from safefs.clock import SystemClock  # noqa: E402
from safefs.config import MountConfig  # noqa: E402
from safefs.fs import Filesystem, Limiters  # noqa: E402
from safefs.inodes import ROOT_INO, InodeTable  # noqa: E402
from safefs.journal import Journal  # noqa: E402

GIB = 1 << 30
BLOCK = 4096


async def one_run(root: Path, writes: int, ranges: int, seed: int) -> tuple[float, float]:
    (root / "src").mkdir()
    (root / "cache").mkdir()
    config = MountConfig(src=root / "src", mnt=root, cache_dir=root / "cache", free_space_floor=0)
    journal = Journal.open(config.cache_dir)
    limiters = Limiters.create()
    table = InodeTable(journal, limiters.flush)
    table.load(journal.load())
    cache = ContentCache(config.cache_dir, 0)
    fs = Filesystem(table, cache, Backing(config.src), config, SystemClock(), limiters)
    await fs.start("bench")
    try:
        handles = {}
        for name in (b"fresh", b"busy"):
            fh, inode = await fs.create(ROOT_INO, name, stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
            await fs.setattr(inode.ino, size=GIB)
            handles[name] = fh
        step = GIB // ranges
        for i in range(ranges):  # separate dirty ranges, spread over the file
            await fs.write(handles[b"busy"], i * step, b"r" * BLOCK)
        rng = random.Random(seed)
        offsets = [rng.randrange(GIB // BLOCK) * BLOCK for _ in range(writes)]
        data = os.urandom(BLOCK)
        rates = []
        for name in (b"fresh", b"busy"):
            fh = handles[name]
            started = time.perf_counter()
            for offset in offsets:
                await fs.write(fh, offset, data)
            rates.append(writes / (time.perf_counter() - started))
        for fh in handles.values():
            await fs.release(fh)
        return rates[0], rates[1]
    finally:
        cache.close()
        journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=3000, help="timed writes per file (default 3000)")
    parser.add_argument("--ranges", type=int, default=10_000, help="dirty ranges the busy file starts with")
    parser.add_argument("--runs", type=int, default=3, help="runs; the median is shown (default 3)")
    args = parser.parse_args()
    fresh, busy = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="safefs-bench-journal-", dir="/var/tmp") as tmp:
            f, b = trio.run(one_run, Path(tmp), args.writes, args.ranges, run)
        fresh.append(f)
        busy.append(b)
    f, b = statistics.median(fresh), statistics.median(busy)
    print(f"| 4 KiB random writes, 1 GiB file         | writes/s | fresh file | {args.ranges:,} dirty ranges |")
    print("|------------------------------------------|----------|-----------:|------------------:|")
    print(f"| Filesystem.write (no kernel), median of {args.runs} | writes/s | {f:10,.0f} | "
          f"{b:10,.0f} ({b / f:.2f}x) |")


if __name__ == "__main__":
    main()
