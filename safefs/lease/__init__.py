"""The project's write lease (DESIGN.md section 3): one writer at a time, on the project itself.

- `model`  (core)      the pure state machine: every rule about lease transitions lives there.
- `store`  (resource)  blocking, NFS-safe file operations in `<project>/.safefs/lease/` (its
                       in-memory twin for tests is tests/doubles.py).
- `keeper` (service)   the trio task that acquires, renews or watches, and fences itself on time.
- `etcd_store` (resource) the same store interface on etcd (safefs.etcd), for clusters.
- `backends` (resource)   picks the store the project's `.safefs/config.toml` names.

This package __init__ imports nothing: its modules sit in different layers, and importing the
pure model must not load trio.
"""
