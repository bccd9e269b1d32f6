"""The layering of DESIGN.md section 8 holds: imports point down only.

Three checks, because each alone has a hole:
- `lint-imports` keeps every contract in pyproject.toml, and breaks each one on a copy of the
  package with a planted violation (so a typo'd or optional-everything contract cannot pass
  by checking nothing);
- every module of the package has a layer (a new module cannot slip past the contract);
- at run time, importing the CLI or a core module loads none of trio, pyfuse3, lmdb (static
  analysis does not see package __init__ side effects or importlib).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

HEAVY = ("trio", "pyfuse3", "lmdb")
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {c["id"]: c for c in CONFIG["contracts"]}


def lint_imports(cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail(f"{exe} missing: run scripts/setup (import-linter is in the test extra)")
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def layer_modules() -> set[str]:
    (layers,) = [c for c in CONFIG["contracts"] if c["type"] == "layers"]
    names = set()
    for layer in layers["layers"]:
        for name in re.split(r"[:|]", layer):
            names.add(name.strip().strip("()").strip())
    return names


def package_modules() -> list[str]:
    """Dotted names of every module in safefs/ (a package counts as its own name)."""
    names = []
    for path in sorted((REPO / "safefs").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_contracts_are_kept() -> None:
    done = lint_imports(REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for contract in CONTRACTS.values():
        assert f"{contract['name']} KEPT" in output, f"contract not reported kept: {contract['name']}"
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in output, output


def test_each_contract_breaks_on_a_planted_violation(tmp_path: Path) -> None:
    pkg = tmp_path / "safefs"
    shutil.copytree(REPO / "safefs", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)

    def plant(module: str, line: str) -> None:
        path = pkg / f"{module}.py"
        text = path.read_text() if path.exists() else '"""Stand-in written by test_layering."""\n'
        path.write_text(text + f"\n{line}  # planted by test_layering\n")

    plant("cli", "import safefs.daemon")  # cli -> daemon is allowed; daemon needs to exist
    plant("daemon", "import trio")
    plant("config", "import safefs.daemon")  # layers: core imports the composition root
    plant("flusher", "import safefs.fs")  # layers: fs and the flusher are independent siblings
    plant("fs", "import safefs.replay")  # writeback-flusher-only
    plant("cli", "import trio")  # cli-light
    plant("clock", "import trio")  # core-pure
    plant("violation_lmdb", "import lmdb")  # lmdb-journal-only
    plant("violation_fuse", "import pyfuse3")  # pyfuse3-fuse-ops-only
    plant("violation_testing", "import safefs.testing")  # testing-daemon-only

    # PYTHONPATH puts the copy ahead of the editable install of the real package.
    done = lint_imports(tmp_path, {"PYTHONPATH": str(tmp_path)})
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    for contract in CONTRACTS.values():
        assert f"{contract['name']} BROKEN" in output, f"planted violation not caught by: {contract['name']}\n{output}"
    assert "safefs.flusher is not allowed to import safefs.fs" in output, output
    assert "violation_lmdb" in output and "violation_fuse" in output and "violation_testing" in output, output


def test_every_module_has_a_layer() -> None:
    layered = layer_modules()
    orphans = []
    for name in package_modules():
        if name == "safefs":
            continue
        covered = any(name == m or name.startswith(m + ".") for m in layered)
        # A package whose submodules sit in different layers (safefs.lease) has no layer of
        # its own; its __init__ must stay import-free, which the run-time check below sees.
        is_split_package = any(m.startswith(name + ".") for m in layered)
        if not covered and not is_split_package:
            orphans.append(name)
    assert not orphans, (
        f"modules with no layer in pyproject.toml [tool.importlinter] layers: {orphans}; "
        "add each to the layer it belongs to (DESIGN.md section 8)"
    )


# The CLI must start fast and work when the daemon side is broken: it and what it may import
# (errors, config, checks, control.client, control.protocol) must not load the heavy deps.
# The core is stdlib only.
MUST_EXIST = ["safefs.cli", "safefs.errors", "safefs.config", "safefs.clock", "safefs.ranges", "safefs.records",
              "safefs.procs", "safefs.lease.model"]
IF_PRESENT = ["safefs.checks", "safefs.control.client", "safefs.control.protocol"]


@pytest.mark.parametrize("module", MUST_EXIST + IF_PRESENT)
def test_light_modules_load_no_heavy_dependency(module: str) -> None:
    relative = Path(*module.split("."))
    exists = (REPO / relative).with_suffix(".py").exists() or (REPO / relative / "__init__.py").exists()
    if not exists:
        if module in IF_PRESENT:
            pytest.skip(f"{module} does not exist")
        pytest.fail(f"{module} does not exist (the layering contract names it)")
    probe = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], f"importing {module} loaded {done.stdout.strip()}"
