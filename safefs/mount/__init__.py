"""The services of one mount, each a part of `safefs.daemon.Daemon` (the composition root).

- following.py: the writer/follower role as the lease keeper tells it, and the writer's
  generations a follower watches (the project's `.safefs/generation`, or etcd) (Following,
  an object the root builds with its collaborators);
- orphan_marker.py: this cache's marker in the project's `.safefs/orphans/` (OrphanMarker,
  an object the root builds with its collaborators);
- reporting.py: the project's history, metrics, systemd status: objects of their own
  (HistoryRecorder, MetricsEndpoint, Reporting), built by the root with their collaborators;
- shutdown.py: signals, the mount watch and the final write-back;
- handle.py: the control socket's handler (status, sync, acquire, recover, unmount).

Each other part is still a mixin of `Daemon`. It sets up its own state in `_init_<part>()`, which
`Daemon.__init__` calls, and names, as class annotations, the state it shares with the root and
the other parts (built in `Daemon.__init__`/`serve`), and under TYPE_CHECKING the other parts'
methods it calls. No part imports another or the daemon at run time (only for type
annotations); the mixins reach each other and the objects through `self`.

Invariants and threading: everything runs on the trio thread; calls into the project run in
worker threads behind the limiters the root made, with timeouts where a hung NFS server must
not hold up the mount (see each part).
"""
