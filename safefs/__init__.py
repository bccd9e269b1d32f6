"""safefs: an NFS project mounted through a host-local write-back cache, one writer at a time.

The package is layered; imports point down only (checked by import-linter, see pyproject.toml):

    core       errors, config, clock, ranges, lease.model        stdlib only, no I/O
    resources  journal (sole lmdb importer), cache, backing, lease.store
    services   inodes, fs, flusher, lease.keeper
    adapters   fuse_ops (sole pyfuse3 importer), control
    root       daemon (composition root)
    cli        imports none of trio, pyfuse3 or lmdb
"""

__version__ = "0.1.0"
