"""The write lease as a pure state machine: observations in, decisions out.

Rules, in the manner of h11's `_state.py`:
1. Every rule that decides a lease transition lives in this file: when the lease is free,
   when to claim the next epoch, when an observer may take over, until when the holder may
   write, the lock delay. `store.py` only reads and writes files; `keeper.py` only carries
   observations in and carries actions out.
2. No I/O, no clock reads, stdlib only. Time comes in as `now`: seconds on this host's
   monotonic clock (CLOCK_BOOTTIME in production). Wall times live in records for humans.
3. No decision compares a time taken on another host, or any wall time, with anything.

Theory of operation (research/lease.md sections 3 and 5):
- The lease is an append-only sequence of epochs. Epoch N+1 is claimed by link()ing a complete
  record to `epoch.N+1`; the server's EEXIST decides races, and N is the fencing token.
- The lease is free when N == 0 or `released.N` exists; then whoever wants it claims N+1.
- The holder renews by rewriting `hb.N` every R seconds. It may write only while
  `now < s + T_break*(1-rho) - epsilon`, where s is when its last *successful* renewal started
  (or when it sent the claim), on its own clock. Nothing else extends that deadline, and once it
  passes the holder is LOST for good (a renewal that lands late cannot revive it).
- An observer takes over only after seeing `hb.N` unchanged for T_break on its own clock, with
  every poll successful and on time. A failed poll, a gap of more than 2P between polls, or a
  poll that took longer than P restarts the wait. Why a slow poll must not count: a poll that
  started before the holder's renewal landed may return the old value late; bounding a poll
  by P <= rho*T_break + epsilon means such a renewal would have had to land after the holder's
  own deadline, which the holder never accepts (`timing_problems` enforces the bound).
- A holder on this machine (same machine id, boot id and pid namespace) whose pid is dead is
  taken over at once; a different boot id alone is not enough (cloned VMs). A zombie is dead,
  and a live pid whose start time differs from the one in the record is another process
  (safefs.procs).
- After a takeover the new holder moves the old epoch's staging files to quarantine and
  waits the lock delay D before it changes the project, so that late operations of the old
  holder land first. It accepts writes into its cache at once (`writable`): the lock delay
  protects the project from the old holder's late NFS requests, and the local cache is not on
  NFS. Changes reach the project only once `publishable`.
- A takeover of a dead holder on this machine (same machine id, boot id and pid namespace)
  needs no lock delay: every NFS request of the old holder was made by this host's kernel, a
  zombie is made only after all its threads left their system calls, and whatever it left in
  the page cache is in the very client cache our own requests go through. No request of it can
  land after ours out of order; the lock delay exists for another host's requests, still in
  flight in its client, and there is no other host here. (The boot id matters: after a reboot
  the same pid is another process; the pid namespace: a pid means a process only within it.)
- Release: the holder stops writing *before* it links `released.N` (others may start at once).

Threading: a LeaseMachine is not thread-safe; the keeper uses it from the trio thread only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, Literal

from safefs import human
from safefs.config import LeaseTimings
from safefs.errors import LeaseHeldElsewhere, LeaseLost, ReadOnly, Refused, SafefsError

RECORD_FORMAT = 1

ClaimKind = Literal["acquire", "takeover"]


class CorruptLease(SafefsError):
    """A lease file that safefs did not write, or cannot read back."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who holds (or wants) the lease: enough to tell apart two mounts on one host, and clones."""

    host: str  # human-readable: the host name, or --host-id
    machine_id: str  # /etc/machine-id
    boot_id: str  # changes at every boot
    pidns: int  # inode of /proc/self/ns/pid
    pid: int
    uid: int
    user: str
    nonce: str  # random, new for every mount: tells our record from anyone else's
    since: float = 0.0  # wall time the holder claimed its epoch; for humans only
    start_time: int = 0  # the process's start (clock ticks after boot): tells a reused pid; 0 unknown

    def shares_pid_space(self, other: Identity) -> bool:
        """True if a pid of `other` means the same process here (so its liveness can be checked)."""
        return (self.machine_id, self.boot_id, self.pidns) == (other.machine_id, other.boot_id, other.pidns)

    def describe(self) -> str:
        return f"{self.user}@{self.host} (pid {self.pid})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        return cls(
            host=str(data["host"]),
            machine_id=str(data["machine_id"]),
            boot_id=str(data["boot_id"]),
            pidns=int(data["pidns"]),
            pid=int(data["pid"]),
            uid=int(data["uid"]),
            user=str(data["user"]),
            nonce=str(data["nonce"]),
            since=float(data.get("since", 0.0)),
            start_time=int(data.get("start_time", 0)),
        )


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    """The immutable content of `epoch.N`."""

    epoch: int
    kind: ClaimKind
    holder: Identity
    timings: LeaseTimings

    def to_bytes(self) -> bytes:
        data = {
            "format": RECORD_FORMAT,
            "epoch": self.epoch,
            "kind": self.kind,
            "holder": self.holder.to_dict(),
            "timings": dataclasses.asdict(self.timings),
        }
        return json.dumps(data, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> EpochRecord:
        try:
            data = json.loads(raw)
            if data.get("format") != RECORD_FORMAT:
                raise ValueError(f"unknown record format {data.get('format')!r}")
            kind = data["kind"]
            if kind not in ("acquire", "takeover"):
                raise ValueError(f"unknown claim kind {kind!r}")
            fields = {f.name for f in dataclasses.fields(LeaseTimings)}
            timings = LeaseTimings(**{k: float(v) for k, v in data["timings"].items() if k in fields})
            return cls(int(data["epoch"]), kind, Identity.from_dict(data["holder"]), timings)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptLease(f"unreadable lease record: {e}") from e


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """`hb.N` as one poll saw it. Any difference between two samples means the holder moved."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    content: bytes


@dataclasses.dataclass(frozen=True)
class Observation:
    """One poll of the lease directory."""

    epoch: int  # highest epoch N found; 0 when nobody ever held the lease
    record: EpochRecord | None  # epoch.N's record; None when N == 0
    released: bool  # released.N exists
    heartbeat: Heartbeat | None  # hb.N; None while it does not exist (that too is a value)

    @property
    def free(self) -> bool:
        return self.epoch == 0 or self.released


@dataclasses.dataclass(frozen=True)
class Claim:
    """Action: link a record for `epoch` (the keeper builds it with `LeaseMachine.record_for`)."""

    epoch: int
    kind: ClaimKind
    lock_delay: bool = True  # False: a takeover of a dead holder on this host (see the docstring)


class State(enum.Enum):
    UNKNOWN = "unknown"  # the lease directory was not read yet
    FOLLOWER = "follower"  # someone else holds the lease, or it is free and we did not take it
    WRITER = "writer"  # we hold the current epoch (publishable once the lock delay is over)
    RELEASING = "releasing"  # we hold it but stopped writing, to link released.N
    LOST = "lost"  # we held it and could not renew in time, or were superseded


def timing_problems(t: LeaseTimings) -> list[str]:
    """Why these timings cannot keep one writer (empty if they can)."""
    problems = []
    for name in ("renew", "t_break", "poll"):
        if not getattr(t, name) > 0:
            problems.append(f"lease {name} must be positive (got {getattr(t, name)})")
    if not 0 <= t.rho < 1:
        problems.append(f"lease rho must be in [0, 1) (got {t.rho})")
    if t.epsilon < 0 or t.lock_delay < 0:
        problems.append("lease epsilon and lock delay must not be negative")
    if problems:
        return problems
    budget = t.holder_budget()
    if budget <= t.renew:
        problems.append(
            f"the holder's budget T_break*(1-rho)-epsilon = {budget:g} s must exceed the renewal "
            f"interval {t.renew:g} s"
        )
    # See "Theory of operation": a poll longer than this could hide a renewal.
    bound = t.rho * t.t_break + t.epsilon
    if t.poll > bound:
        problems.append(f"the lease poll interval {t.poll:g} s must not exceed rho*T_break+epsilon = {bound:g} s")
    return problems


@dataclasses.dataclass(frozen=True)
class _Watch:
    """What an observer has seen of the current epoch's heartbeat, on its own clock."""

    epoch: int
    heartbeat: Heartbeat | None
    since: float  # the first poll that saw this value; every poll since was on time and the same
    last_poll: float


class LeaseMachine:
    """The lease as seen by one mount. Feed it observations and results; ask it what to do."""

    def __init__(self, me: Identity, timings: LeaseTimings, *, want_write: bool = True) -> None:
        problems = timing_problems(timings)
        if problems:
            raise Refused("; ".join(problems), hint="pick lease timings that satisfy these bounds")
        self.me = me
        self.timings = timings
        self.want_write = want_write  # take the lease when it is free or its holder is dead
        self.state = State.UNKNOWN
        self.epoch = 0  # the epoch we hold, or the newest one we saw
        self.record: EpochRecord | None = None  # that epoch's record
        self.released = False  # that epoch was released
        self.deadline = -math.inf  # holding: we may write only before this
        self.writable_from = -math.inf  # holding: end of the lock delay (publishable from then)
        self.quarantine_pending = False  # holding after a takeover: old staging not moved yet
        self.last_renewal: float | None = None  # holding: start of the last successful renewal
        self.lost_reason: str | None = None
        self.lost_epoch = 0  # the epoch this mount held when it lost the lease
        self.last_error: str | None = None
        self._beats = 0
        self._watch: _Watch | None = None
        self._unconfirmed: tuple[int, float] | None = None  # (epoch, sent_at) of a claim that failed

    # -- queries --------------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        return self.state in (State.WRITER, State.RELEASING)

    @property
    def role(self) -> Literal["writer", "follower"]:
        return "writer" if self.holding else "follower"

    def writable(self, now: float) -> bool:
        """May this mount accept changes into its cache? (The lock delay does not concern it.)"""
        return self.state is State.WRITER and now < self.deadline

    def publishable(self, now: float) -> bool:
        """May this mount change the project? After a takeover, only once the old epoch's
        staging files are in quarantine and the lock delay is over."""
        return self.writable(now) and not self.quarantine_pending and self.writable_from <= now

    def check_writable(self, now: float) -> int:
        """The epoch to stamp a change with, or raise the error that says why this mount may not write."""
        if self.writable(now):
            return self.epoch
        self.expire(now)
        raise self.refusal(now)

    def check_publishable(self, now: float) -> int:
        """The epoch to change the project under, or raise the error that says why not yet."""
        if self.publishable(now):
            return self.epoch
        self.expire(now)
        raise self.refusal(now)

    def refusal(self, now: float) -> ReadOnly:
        """Why this mount may not write (or publish) now, naming the holder."""
        if self.state is State.LOST:
            holder = self.current_holder()
            now_held = "" if holder is None or self.epoch == self.lost_epoch else \
                f"; epoch {self.epoch} is held by {holder.describe()} since {_human_time(holder.since)}"
            return LeaseLost(
                f"this mount lost the write lease (epoch {self.lost_epoch}): {self.lost_reason}; "
                f"it stopped writing{now_held}",
                hint="dirty data stays in the cache; `safefs status` shows it, `safefs acquire MNT --wait` "
                "takes the lease again",
            )
        if self.state is State.WRITER:
            left = max(0.0, self.writable_from - now)
            what = "moving the old epoch's staging files aside" if self.quarantine_pending else "the lock delay"
            return ReadOnly(
                f"took over the lease (epoch {self.epoch}); changes reach the project after {what} "
                f"({left:.0f} s left)"
            )
        if self.state is State.RELEASING:
            return ReadOnly(f"releasing the lease (epoch {self.epoch})")
        holder = self.current_holder()
        if holder is not None:
            return LeaseHeldElsewhere(
                f"the project is held by {holder.describe()} since {_human_time(holder.since)} "
                f"(epoch {self.epoch}); this mount is read-only",
                hint="run `safefs sync --release` on that host, or `safefs acquire MNT --wait` here",
            )
        if self.state is State.UNKNOWN:
            return ReadOnly("the lease was not read yet; this mount is read-only for now")
        return ReadOnly("this mount is a follower and the lease is free", hint="run `safefs acquire MNT`")

    def current_holder(self) -> Identity | None:
        """Who holds the current epoch, as far as we know (None if free or unknown)."""
        if self.record is None or self.released or self.record.epoch != self.epoch:
            return None
        return self.record.holder

    def heartbeat_age(self, now: float) -> float | None:
        """Seconds since the holder's heartbeat last moved, as measured here."""
        if self.holding:
            return None if self.last_renewal is None else now - self.last_renewal
        if self._watch is None or self._watch.epoch != self.epoch:
            return None
        return now - self._watch.since

    def next_wakeup(self, now: float) -> float | None:
        """The next instant writable() or publishable() changes by itself (end of lock delay,
        deadline), if any."""
        if not self.holding:
            return None
        return self.writable_from if self.writable_from > now else self.deadline

    # -- observer side --------------------------------------------------------------------

    def pid_to_check(self, obs: Observation) -> int | None:
        """The holder's pid if its liveness would decide a takeover (it runs on our pid space)."""
        if not self.want_write or obs.free or obs.record is None or self.holding:
            return None
        holder = obs.record.holder
        if holder.nonce == self.me.nonce or not holder.shares_pid_space(self.me):
            return None
        return holder.pid

    def observed(
        self, obs: Observation, *, started: float, now: float, holder_alive: bool | None = None
    ) -> Claim | None:
        """A poll that started at `started` returned `obs` at `now`. Returns the claim to make, if any."""
        if self.holding:
            return None  # a holder learns about its lease from its renewals
        if self.state is State.UNKNOWN:
            self.state = State.FOLLOWER
        self.epoch, self.record, self.released = obs.epoch, obs.record, obs.released
        self.last_error = None
        if self._adopt_unconfirmed(obs, now):
            return None
        if now - started > self.timings.poll:
            # Late: it may have missed a renewal that landed while it ran (see the docstring).
            # What it says about who holds the lease is still true; its timing is not.
            self._watch = None
            self.last_error = f"reading the lease took {now - started:.1f} s"
        else:
            self._watch = self._next_watch(obs, now)
        if not self.want_write:
            return None
        if obs.free:
            return Claim(obs.epoch + 1, "acquire")
        if holder_alive is False and obs.record is not None and obs.record.holder.shares_pid_space(self.me):
            # Same machine, same boot, dead process: no lock delay (see the docstring).
            return Claim(obs.epoch + 1, "takeover", lock_delay=False)
        if self._watch is not None and now - self._watch.since >= self._t_break(obs.record):
            return Claim(obs.epoch + 1, "takeover")
        return None

    def poll_failed(self, now: float, error: str) -> None:
        """A poll failed: the observer starts its T_break wait again from scratch."""
        if self.state is State.UNKNOWN:
            self.state = State.FOLLOWER
        self._watch = None
        self.last_error = error

    def _next_watch(self, obs: Observation, now: float) -> _Watch:
        w = self._watch
        unchanged = (
            w is not None
            and w.epoch == obs.epoch
            and w.heartbeat == obs.heartbeat
            and now - w.last_poll <= 2 * self.timings.poll
        )
        return _Watch(obs.epoch, obs.heartbeat, w.since if unchanged and w else now, now)

    def _t_break(self, record: EpochRecord | None) -> float:
        # A holder configured with a longer T_break plans its deadline with it: honour the larger.
        theirs = record.timings.t_break if record is not None else 0.0
        return max(self.timings.t_break, theirs)

    # -- claiming -------------------------------------------------------------------------

    def record_for(self, claim: Claim, *, wall: float) -> EpochRecord:
        return EpochRecord(claim.epoch, claim.kind, dataclasses.replace(self.me, since=wall), self.timings)

    def claimed(self, winner: EpochRecord, *, sent_at: float, now: float, claim: Claim | None = None) -> bool:
        """The claim sent at `sent_at` found `winner` at its epoch. Returns True if it is ours.
        `claim`: the claim that was sent, if known (a takeover without a lock delay says so)."""
        self._unconfirmed = None
        if winner.holder.nonce != self.me.nonce:
            self.epoch, self.record, self.released = winner.epoch, winner, False
            self._watch = None
            return False
        self.state = State.WRITER
        self.epoch, self.record, self.released = winner.epoch, winner, False
        # The link cannot have landed before it was sent: the deadline counts from there.
        self.deadline = sent_at + self.timings.holder_budget()
        self.last_renewal = sent_at
        takeover = winner.kind == "takeover"
        delay = self.timings.lock_delay if claim is None or claim.lock_delay else 0.0
        self.writable_from = now + delay if takeover else -math.inf
        self.quarantine_pending = takeover
        self.lost_reason = None
        self.last_error = None
        self._beats = 0
        self._watch = None
        self.expire(now)
        return True

    def claim_failed(self, claim: Claim, *, sent_at: float, error: str) -> None:
        """The claim failed; its link may still have landed. If a later poll finds our record at
        that epoch, it is ours, with the deadline counted from this send."""
        self._unconfirmed = (claim.epoch, sent_at)
        self.last_error = error

    def _adopt_unconfirmed(self, obs: Observation, now: float) -> bool:
        if self._unconfirmed is None or obs.record is None or obs.released:
            return False
        epoch, sent_at = self._unconfirmed
        if obs.epoch != epoch:
            return False
        if obs.record.holder.nonce != self.me.nonce:
            self._unconfirmed = None
            return False
        return self.claimed(obs.record, sent_at=sent_at, now=now)

    # -- holder side ----------------------------------------------------------------------

    def next_beat(self) -> bytes:
        """Content for the next heartbeat write: it never repeats within an epoch."""
        self._beats += 1
        return f"{self._beats:020d} {self.me.nonce}\n".encode()

    def renewed(self, *, started: float, superseded: bool, now: float) -> None:
        """A renewal that started at `started` wrote its heartbeat; `superseded`: epoch N+1 exists."""
        if not self.holding or self.expire(now):
            return  # too late: a lost lease stays lost
        if superseded:
            self._lose(f"epoch {self.epoch + 1} was claimed by another mount")
            return
        self.deadline = max(self.deadline, started + self.timings.holder_budget())
        self.last_renewal = max(self.last_renewal or started, started)
        self.last_error = None

    def renew_failed(self, now: float, error: str) -> None:
        """A failed renewal never extends the deadline, even if its write lands later."""
        self.last_error = error
        self.expire(now)

    def quarantined(self) -> None:
        self.quarantine_pending = False

    def expire(self, now: float) -> bool:
        """Self-fencing: past the deadline the holder is LOST. Returns True if it just happened."""
        if self.holding and now >= self.deadline:
            self._lose(f"no successful renewal for {now - (self.last_renewal or now):.0f} s")
            return True
        return False

    def _lose(self, reason: str) -> None:
        self.state = State.LOST
        self.lost_epoch = self.epoch  # self.epoch moves on to the newest epoch seen
        self.lost_reason = reason
        self.deadline = -math.inf
        # A lost writer stays read-only until asked to acquire again: its dirty data belongs
        # to the lost epoch and is for `safefs recover`, not for an automatic comeback.
        self.want_write = False

    # -- release --------------------------------------------------------------------------

    def begin_release(self) -> None:
        """Stop writing now: once released.N lands, another mount may start at once."""
        if self.state is State.WRITER:
            self.state = State.RELEASING

    def release_note(self, *, wall: float) -> bytes:
        return json.dumps({"epoch": self.epoch, "holder": self.me.to_dict(), "released_at": wall}).encode() + b"\n"

    def release_done(self) -> None:
        self.state = State.FOLLOWER
        self.released = True
        self.want_write = False
        self.deadline = -math.inf
        self.quarantine_pending = False


def _human_time(wall: float) -> str:
    return human.wall_time(wall) if wall else "an unknown time"
