"""The services of one mount, each an object `safefs.daemon.Daemon` (the composition root) wires.

- following.py: the writer/follower role as the lease keeper tells it, and the writer's
  generations a follower watches (the project's `.safefs/generation`, or etcd) (Following,
  an object the root builds with its collaborators);
- orphan_marker.py: this cache's marker in the project's `.safefs/orphans/` (OrphanMarker,
  an object the root builds with its collaborators);
- reporting.py: the project's history, metrics, systemd status: objects of their own
  (HistoryRecorder, MetricsEndpoint, Reporting), built by the root with their collaborators;
- unwritten.py: what this cache holds that the project lacks (UnwrittenChanges), counted for
  the others;
- shutdown.py: signals, the mount watch and the final write-back; it owns the mount's state
  (mounted, unmounted, exiting) and the final write-back's outcome (Shutdown);
- handle.py: the control socket's handler (status, sync, acquire, recover, unmount)
  (MountHandle, which the root gives the control server).
- process.py: not a service: the ready message to `safefs mount`, the boot id, and the
  periodic journal sync the root runs.

Each part is an object the root builds with its collaborators, passed to its constructor (only
what it uses); it owns its own state and offers public methods and attributes to the others.
No part imports another or the daemon at run time (only for type annotations).

Invariants and threading: everything runs on the trio thread; calls into the project run in
worker threads behind the limiters the root made, with timeouts where a hung NFS server must
not hold up the mount (see each part).
"""
