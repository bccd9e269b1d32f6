"""No module reads another module's private names (issue 13: one owner for each piece of state).

A name with a leading underscore belongs to the module that defines it (nor may another
module of the package import it: `from safefs.x import _name`). Reading `x._name` is
fine on `self`/`cls`, and on any object of the same module (an Inode's `_present` inside
inodes.py, say: the module is the owner); anywhere else it reaches into someone else's state,
which must go through a public method instead. The check reads the code (`ast`), not the
text, so docstrings and comments that name a private do not count.

The second check holds the inode table to being the one owner of inode state: outside
inodes.py (and inode.py, the record it changes) no code assigns an Inode's cache,
write-back or backing-view fields (present, dirty, attr_dirty, new, blinks, origin,
publishing, low_size, unclean, and a directory's `stale` mark) or edits its `blinks` list;
plain attributes (size, times, mode) stay plain assignments.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

# Private names of other libraries that their own documentation tells callers to use.
ALLOWED = {
    # argparse: the parser's list of actions, the documented way to walk its options (cli.py,
    # options.py); argparse offers no public accessor.
    "_actions",
    "_SubParsersAction",  # argparse: the type of that list's subcommand entry (cli.py)
    # sys._getframe and os._exit are the stdlib's public API despite the underscore.
    "_getframe",
    "_exit",
}


def _defined_privates(tree: ast.Module) -> set[str]:
    """Every private name the module itself defines: functions, classes, attributes assigned
    anywhere in it, class-level names and `__slots__` entries."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            names.update(
                e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return {n for n in names if n.startswith("_")}


def offenders(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _defined_privates(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safefs"):
            found += [
                f"{path.relative_to(root)}:{node.lineno}: from {node.module} import {alias.name}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
            continue
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")) or name in ALLOWED:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if name in own:
            continue  # the module's own private, on another object of its own kind
        found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reads_another_modules_privates() -> None:
    found = [line for path in sorted((REPO / "safefs").rglob("*.py")) for line in offenders(path)]
    assert not found, "private names read across modules (add a public method instead):\n" + "\n".join(found)


# The state whose changes the inode table owns (inodes.py): what is cached, what waits for
# write-back, what is on the backing tree and where. Other modules change it only through
# InodeTable methods (mark_changed, drop_present, mark_published, add_blink, ...).
# `stale` is memory only: a directory to compare with the backing tree again (set_stale, set_fresh).
OWNED_FIELDS = {
    "present",
    "dirty",
    "attr_dirty",
    "new",
    "blinks",
    "origin",
    "publishing",
    "low_size",
    "unclean",
    "stale",
}
OWNERS = {"inodes.py", "inode.py"}  # the table, and the Inode record it changes them in
LIST_CHANGES = {"append", "remove", "insert", "clear", "pop", "extend"}


def inode_state_writes(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LIST_CHANGES
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "blinks"
        ):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and t.attr in OWNED_FIELDS and isinstance(t.ctx, (ast.Store, ast.Del)):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(t)} = ...")
    return found


def test_only_the_inode_table_changes_inode_state() -> None:
    found = [
        line
        for path in sorted((REPO / "safefs").rglob("*.py"))
        if path.name not in OWNERS
        for line in inode_state_writes(path)
    ]
    assert not found, "inode state changed outside inodes.py (use an InodeTable method):\n" + "\n".join(found)


def test_the_check_sees_a_reach_through(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        '"""A docstring may name fs._by_backing_ino."""\n'
        "class Own:\n    def __init__(self):\n        self._mine = 1\n"
        "def f(fs, other):\n    return other._mine, fs._by_backing_ino, Filesystem._copy_stat, self._x\n"
        "from safefs.writeback import _utc\n"
    )
    found = {line.split(": ", 1)[1] for line in offenders(planted, tmp_path)}
    assert found == {"fs._by_backing_ino", "Filesystem._copy_stat", "from safefs.writeback import _utc"}


def test_the_state_check_sees_a_direct_write(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def f(inode, d):\n    inode.dirty = ()\n    inode.blinks.append((1, b'x'))\n"
        "    inode.size = 0\n    d.attr_dirty, inode.new = True, False\n    d.stale = True\n"
    )
    found = {line.split(": ", 1)[1] for line in inode_state_writes(planted, tmp_path)}
    assert found == {
        "inode.dirty = ...",
        "inode.blinks.append((1, b'x'))",
        "d.attr_dirty = ...",
        "inode.new = ...",
        "d.stale = ...",
    }
