"""Which lease store a project uses: the one its `.safefs/config.toml` names (safefs.projectconf).

`open_store(project, conf, t_break)` builds it; the result is a `ProjectLeaseStore`, which
forwards every LeaseStore call to the backend and adds two things:
- before each claim it reads the project's config again and refuses (OSError) if the project
  names another backend now, and after a won claim it reads it once more and gives the epoch
  back if it changed meanwhile. `safefs init` writes the config and then checks the old backend
  is still free: either it sees our claim, or we see its config, so two backends never both
  grant a writer;
- counters of the requests made to the project (NFS) and to etcd, for `status` and the bench.

Threading: blocking, like the stores; the counters are plain ints bumped from worker threads
(GIL-atomic enough for statistics).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from safefs import projectconf
from safefs.etcd import Client
from safefs.lease.etcd_store import EtcdLeaseStore
from safefs.lease.model import EpochRecord, Observation
from safefs.lease.store import DirLeaseStore
from safefs.projectconf import ProjectConf

ETCD_TIMEOUT = 3.0  # one etcd request; a hung etcd is a failed call after this


def open_store(project: Path, conf: ProjectConf, t_break: float) -> ProjectLeaseStore:
    inner: Any
    if conf.lease_backend == "etcd":
        inner = EtcdLeaseStore(project, Client(conf.etcd_endpoints, timeout=ETCD_TIMEOUT), conf.etcd_prefix, t_break)
    else:
        inner = DirLeaseStore(project)
    return ProjectLeaseStore(inner, project, conf)


class ProjectLeaseStore:
    def __init__(self, inner: Any, project: Path, conf: ProjectConf) -> None:
        self.inner = inner
        self.project = project
        self.conf = conf
        self.project_requests = 0  # store calls that went to the project (NFS)

    def __repr__(self) -> str:
        return repr(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # anything else a backend offers

    @property
    def etcd(self) -> EtcdLeaseStore | None:
        return self.inner if isinstance(self.inner, EtcdLeaseStore) else None

    def describe(self) -> dict[str, Any]:
        if self.etcd is not None:
            return self.etcd.describe()
        return {"backend": "dir"}

    def _nfs(self, n: int = 1) -> None:
        self.project_requests += n

    def _check_conf(self) -> None:
        self._nfs()
        now = projectconf.read(self.project)
        if now != self.conf:
            raise OSError(errno.ESTALE, f"the project's lease backend is now {now.describe()}, not "
                          f"{self.conf.describe()}; remount to follow it")  # fmt: skip

    def observe(self) -> Observation:
        if self.etcd is None:
            self._nfs()
        return self.inner.observe()

    def claim(self, record: EpochRecord) -> EpochRecord:
        self._check_conf()
        if self.etcd is None:
            self._nfs()
        winner: EpochRecord = self.inner.claim(record)
        if winner.holder.nonce == record.holder.nonce:
            try:
                self._check_conf()
            except OSError:
                self.inner.release(winner.epoch, b'{"note": "backend changed while claiming"}\n')
                raise
        return winner

    def renew(self, epoch: int, beat: bytes) -> bool:
        if self.etcd is None:
            self._nfs()
        return self.inner.renew(epoch, beat)

    def release(self, epoch: int, note: bytes) -> None:
        if self.etcd is None:
            self._nfs()
        self.inner.release(epoch, note)

    def quarantine(self, epoch: int) -> int:
        self._nfs()
        return self.inner.quarantine(epoch)

    def pid_alive(self, pid: int, *args: Any) -> bool:
        return self.inner.pid_alive(pid, *args)
