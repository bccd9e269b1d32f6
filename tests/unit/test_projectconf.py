"""`.safefs/config.toml` (safefs.projectconf) and `safefs init`, which writes it only while the
lease is free under the old and the new backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from safefs import projectconf
from safefs.cli import main
from safefs.config import LeaseTimings
from safefs.errors import ExitCode, Refused
from safefs.lease.model import EpochRecord
from safefs.lease.store import DirLeaseStore, local_identity
from safefs.projectconf import ProjectConf

pytestmark = pytest.mark.timeout(60)


def test_no_file_means_the_directory_backend(tmp_path: Path) -> None:
    assert projectconf.read(tmp_path) == ProjectConf()
    (tmp_path / ".safefs").mkdir()
    assert projectconf.read(tmp_path).lease_backend == "dir"


def test_written_config_reads_back(tmp_path: Path) -> None:
    conf = projectconf.make("etcd", "http://a:2379, http://b:2379", 'odd"prefix\\')
    projectconf.write(tmp_path, conf)
    assert projectconf.read(tmp_path) == conf
    assert conf.etcd_endpoints == ("http://a:2379", "http://b:2379")
    assert projectconf.make("etcd", "http://a:2379", None).etcd_prefix.startswith("safefs/")


@pytest.mark.parametrize(
    "text",
    ['lease_backend = "zookeeper"\n', 'lease_backend = "etcd"\n', "lease_backend = \n",
     'lease_backend = "etcd"\netcd_endpoints = "http://a"\netcd_prefix = "p"\n'],
)  # fmt: skip
def test_a_config_safefs_cannot_read_is_refused_not_ignored(tmp_path: Path, text: str) -> None:
    (tmp_path / ".safefs").mkdir()
    (tmp_path / ".safefs" / "config.toml").write_text(text)
    with pytest.raises(Refused):
        projectconf.read(tmp_path)


def test_bad_init_options_are_refused() -> None:
    with pytest.raises(Refused):
        projectconf.make("etcd", None, None)
    with pytest.raises(Refused):
        projectconf.make("etcd", "etcd1:2379", None)
    with pytest.raises(Refused):
        projectconf.make("dir", "http://a:2379", None)


def test_init_is_refused_while_the_lease_is_held_and_allowed_once_released(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = DirLeaseStore(tmp_path)
    won = store.claim(EpochRecord(1, "acquire", local_identity("holder"), LeaseTimings()))
    argv = ["init", str(tmp_path), "--lease-backend", "etcd", "--etcd-endpoints", "http://127.0.0.1:1"]
    assert main(argv) == ExitCode.LEASE_HELD
    assert "holder" in capsys.readouterr().err
    assert not (tmp_path / ".safefs" / "config.toml").exists()
    store.release(won.epoch, b"")
    # Free under the directory backend, but the new backend (etcd) does not answer: refused too.
    assert main(argv) == ExitCode.BACKING_FAILED
    assert projectconf.read(tmp_path) == ProjectConf()
    assert main(["init", str(tmp_path)]) == ExitCode.OK  # dir again, unchanged: fine


def test_human_status_shows_the_etcd_backend() -> None:
    from safefs.cli import format_status
    from safefs.control import protocol

    lease = {"epoch": 7, "backend": "etcd", "endpoints": ["http://e1:2379"], "prefix": "safefs/x", "ttl": 180,
             "expires_in": 170.0, "revision": 42}  # fmt: skip
    text = format_status(protocol.from_wire(protocol.Status, {"mnt": "/m", "role": "writer", "lease": lease}))
    line = next(line for line in text.splitlines() if line.startswith("lease backend:"))
    assert "etcd http://e1:2379" in line and "TTL 180 s" in line and "expires in" in line and "revision 42" in line
