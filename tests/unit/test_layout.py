"""The project's `.safefs/` layout is spelled in one module (safefs/layout.py), issue 13 item 5."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from safefs import layout

pytestmark = pytest.mark.timeout(30)

PACKAGE = Path(layout.__file__).parent
# ".safefs" as a name in code: a string that is the directory or starts a path in it.
SPELLED = re.compile(r"""b?["']\.safefs(["'/])""")


def test_only_layout_spells_the_control_directory() -> None:
    spelled = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py" and path.parent == PACKAGE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SPELLED.search(line) or "CONTROL_DIR_NAME" in line:
                spelled.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not spelled, "spell .safefs/ names through safefs.layout:\n" + "\n".join(spelled)


def test_the_docstring_draws_every_name_and_the_helpers_agree() -> None:
    doc = layout.__doc__ or ""
    names = ("DIR", "CONFIG", "GENERATION", "LEASE", "LEASE_TMP", "STAGING", "QUARANTINE", "ORPHANS", "HISTORY")
    for constant in names:
        assert re.search(rf"\b{constant}\b", doc), f"{constant} is not in the tree of layout's docstring"
        if constant != "DIR":
            value = getattr(layout, constant)
            assert "/" not in value and value in doc
    assert layout.path(Path("/p"), layout.ORPHANS) == Path("/p/.safefs/orphans")
    assert layout.backing_path(layout.STAGING, "7") == (b".safefs", b"staging", b"7")
    assert [layout.epoch_name(3), layout.hb_name(3), layout.released_name(3)] == [
        "epoch.000000000003",
        "hb.000000000003",
        "released.000000000003",
    ]
