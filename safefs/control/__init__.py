"""The control channel between the `safefs` command and a running daemon.

- `protocol`: message shapes and the error mapping, stdlib only (client and server share it).
- `client`: blocking stdlib client the CLI uses; imports no trio.
- `server`: the trio server the daemon runs.

This package imports nothing itself, so `import safefs.control.client` never pulls in trio.
"""
