"""`python -m safefs` runs the command line (see safefs.cli)."""

from safefs.cli import main

raise SystemExit(main())
