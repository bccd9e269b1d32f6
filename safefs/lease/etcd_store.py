"""The lease on etcd (DESIGN.md section 3, second backend): the same LeaseStore interface as
`store.DirLeaseStore`, so the keeper and the pure model are unchanged.

Keys, all below the project's prefix P (from `.safefs/config.toml`):
  P/lease       the holder's EpochRecord, attached to an etcd lease with TTL = T_break. It is
                created only by a transaction whose compare is `create_revision(P/lease) == 0`;
                its create_revision is the epoch (the fencing token). Release deletes it; a dead
                holder's key goes when etcd expires its lease, never because another host judged it.
  P/last        a copy of the newest holder's record, written in the same transaction (its
                mod_revision is that epoch), without a lease: it outlives an expired holder.
  P/released    the epoch of the last clean release. An epoch in P/last that is not here ended by
                expiry: its successor is a takeover (lock delay, old staging to quarantine).
  P/generation  the newest generation record, written only by a transaction that checks
                `create_revision(P/lease) == epoch`: etcd itself refuses a fenced writer's record.

Timing: the holder's deadline is counted by the keeper from the send time of its last successful
keepalive (or of the claim, sent before the etcd lease is granted) on its own monotonic clock,
with budget T_break*(1-rho)-epsilon < TTL: etcd counts the TTL from when it received the grant
or keepalive, so the holder stops writing before etcd could expire its key (G6).

Invariants:
- One etcd lease per held epoch; its id lives here between claim and release (the only state).
- `observe` never lets an observer judge the holder dead: the heartbeat it reports changes at
  every poll, so the model's T_break watch never fires; the key's absence is the only way in.
- `pid_alive` always answers True, for the same reason.

Threading: every method blocks (HTTP with timeouts, or NFS for `quarantine`). The keeper calls
them from worker threads behind its "lease" limiter, one step at a time; the generation methods
may run concurrently with those (they touch no state here).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

from safefs.clock import Clock, SystemClock
from safefs.etcd import (
    Client,
    EtcdError,
    KeyValue,
    create_is_absent,
    create_revision_is,
    delete,
    get,
    mod_revision_is,
    put,
)
from safefs.lease.model import CorruptLease, EpochRecord, Heartbeat, Observation
from safefs.lease.store import DirLeaseStore

MAX_GENERATION_BYTES = 256 << 10  # a longer list of changed paths goes to etcd as "all" (etcd's limit is 1.5 MiB)


class EtcdLeaseStore:
    def __init__(self, project: Path, client: Client, prefix: str, ttl: float, clock: Clock | None = None) -> None:
        self.project = project
        self.clock = clock or SystemClock()
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.ttl = max(2, int(math.ceil(ttl)))  # etcd counts whole seconds; never shorter than T_break
        self.lease_key = f"{self.prefix}/lease".encode()
        self.last_key = f"{self.prefix}/last".encode()
        self.released_key = f"{self.prefix}/released".encode()
        self.generation_key = f"{self.prefix}/generation".encode()
        self._dir = DirLeaseStore(project)  # staging and quarantine stay on the project
        self._lease_id = 0
        self._epoch = 0
        self._polls = itertools.count(1)
        self._expires_at: float | None = None  # our clock: when the holder's etcd lease ends, as etcd last said

    def __repr__(self) -> str:
        return f"EtcdLeaseStore({','.join(self.client.endpoints)!r}, {self.prefix!r})"

    def describe(self) -> dict[str, Any]:
        return {"backend": "etcd", "endpoints": list(self.client.endpoints), "prefix": self.prefix,
                "ttl": self.ttl, "expires_in": self.expires_in(), "revision": self.client.revision,
                "etcd_requests": self.client.calls}  # fmt: skip

    def expires_in(self) -> float | None:
        """Seconds left on the holder's etcd lease, counted down from what etcd last said."""
        if self._expires_at is None:
            return None
        return max(0.0, self._expires_at - self.clock.monotonic())

    def _etcd_says(self, ttl: float | None, asked_at: float) -> None:
        self._expires_at = None if ttl is None or ttl <= 0 else asked_at + ttl

    @staticmethod
    def _record(kv: KeyValue, epoch: int) -> EpochRecord:
        return dataclasses.replace(EpochRecord.from_bytes(kv.value), epoch=epoch)

    # -- LeaseStore -------------------------------------------------------------------------

    def observe(self) -> Observation:
        kv = self.client.range(self.lease_key)
        if kv is None:
            self._expires_at = None
            last = self.client.range(self.last_key)
            if last is None:
                return Observation(0, None, False, None)
            # Free: released, or expired by etcd (claim() tells which, for the lock delay).
            return Observation(last.mod_revision, self._record(last, last.mod_revision), True, None)
        record = self._record(kv, kv.create_revision)
        asked_at = self.clock.monotonic()
        ttl = self.client.time_to_live(kv.lease) if kv.lease else -1
        self._etcd_says(ttl, asked_at)
        beat = Heartbeat(0, 0, 0, 0, f"{next(self._polls)} {ttl}".encode())  # never the same twice
        return Observation(kv.create_revision, record, False, beat)

    def claim(self, record: EpochRecord) -> EpochRecord:
        last = self.client.range(self.last_key)
        released = self.client.range(self.released_key)
        expired = last is not None and (released is None or released.value != str(last.mod_revision).encode())
        asked_at = self.clock.monotonic()
        lease_id = self.client.grant(self.ttl)
        value = record.to_bytes()
        result = self.client.txn(
            [create_is_absent(self.lease_key), mod_revision_is(self.last_key, last.mod_revision if last else 0)],
            [put(self.lease_key, value, lease_id), put(self.last_key, value)],
            [get(self.lease_key)],
        )
        if result.succeeded:
            self._lease_id, self._epoch = lease_id, result.revision
            self._etcd_says(self.ttl, asked_at)
            return dataclasses.replace(record, epoch=result.revision, kind="takeover" if expired else record.kind)
        self._revoke(lease_id)
        holder = result.ranges[0] if result.ranges else None
        if holder is None:
            raise EtcdError("the lease changed hands while claiming it; will look again")
        return self._record(holder, holder.create_revision)

    def renew(self, epoch: int, beat: bytes) -> bool:
        """One keepalive. True ("superseded") when etcd no longer has our lease: it expired."""
        if epoch != self._epoch or not self._lease_id:
            return True
        asked_at = self.clock.monotonic()
        ttl = self.client.keepalive(self._lease_id)
        self._etcd_says(ttl, asked_at)
        return ttl <= 0

    def release(self, epoch: int, note: bytes) -> None:
        self.client.txn(
            [create_revision_is(self.lease_key, epoch)],
            [delete(self.lease_key), put(self.released_key, str(epoch).encode())],
        )  # a failed compare: the key is gone already (expired), which counts as released
        if epoch == self._epoch and self._lease_id:
            self._revoke(self._lease_id)
            self._lease_id = 0
        self._expires_at = None

    def quarantine(self, epoch: int) -> int:
        return self._dir.quarantine(epoch)

    def pid_alive(self, pid: int, *args: Any) -> bool:
        return True  # takeover only by etcd's expiry, never by our judgement

    def _revoke(self, lease_id: int) -> None:
        try:
            self.client.revoke(lease_id)
        except EtcdError:
            pass  # it expires by itself after the TTL

    # -- generations ------------------------------------------------------------------------

    def publish_generation(self, epoch: int, record: dict[str, Any]) -> bool:
        """Put the generation record if `epoch` still holds the lease (etcd checks). False if not."""
        data = json.dumps(record).encode()
        if len(data) > MAX_GENERATION_BYTES:
            data = json.dumps({**record, "all": True, "changed": []}).encode()
        result = self.client.txn([create_revision_is(self.lease_key, epoch)], [put(self.generation_key, data)])
        return result.succeeded

    def read_generation(self) -> tuple[dict[str, Any] | None, int]:
        """The newest generation record and the store revision it was read at."""
        result = self.client.txn([], [get(self.generation_key)])  # a range that reports its revision
        return _generation(result.ranges[0] if result.ranges else None), result.revision

    def watch_generation(self, after_revision: int, wait: float) -> tuple[dict[str, Any] | None, int] | None:
        """Wait up to `wait` s for a generation newer than `after_revision`; None if none came."""
        kv = self.client.watch_once(self.generation_key, after_revision + 1, wait)
        if kv is False or kv is None or kv is True:
            return None
        return _generation(kv), kv.mod_revision


def _generation(kv: KeyValue | None) -> dict[str, Any] | None:
    if kv is None:
        return None
    try:
        record = json.loads(kv.value)
    except ValueError as e:
        raise CorruptLease(f"unreadable generation record in etcd: {e}") from e
    return record if isinstance(record, dict) else None
