"""The generated documents in docs/ are current (issue 11 item 9).

scripts/gen-docs makes docs/safefs.1 (argparse-manpage) and docs/safefs.bash (shtab) from the
parser; this test regenerates them into a temporary directory and compares, ignoring only the
man page's date, so a changed option or help text without `scripts/gen-docs` fails here. It
also checks that the completion really completes: subcommands and a subcommand's options.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.timeout(120)

DOCS = ("safefs.1", "safefs.bash")


def without_date(text: str) -> str:
    return re.sub(r'^(\.TH \S+ "\d+") "[^"]*"', r"\1 DATE", text, count=1, flags=re.M)


def test_generated_docs_are_current(tmp_path):
    done = subprocess.run([REPO / "scripts" / "gen-docs", tmp_path], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    for name in DOCS:
        committed = REPO / "docs" / name
        assert committed.exists(), f"docs/{name} missing: run scripts/gen-docs and commit it"
        fresh = (tmp_path / name).read_text()
        assert without_date(committed.read_text()) == without_date(fresh), (
            f"docs/{name} is out of date: run scripts/gen-docs and commit it"
        )


def complete(line: str) -> list[str]:
    words = line.split(" ")
    script = (
        f"source {REPO / 'docs' / 'safefs.bash'}\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'; COMP_POINT={len(line)}\n"
        "_shtab_safefs; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completion_completes_commands_and_options():
    assert "status" in complete("safefs st")
    assert "--prometheus" in complete("safefs status --pr")
    assert "--writeback-delay" in complete("safefs mount --wr")


def test_man_page_documents_every_command():
    page = (REPO / "docs" / "safefs.1").read_text()
    for command in ("mount", "umount", "sync", "status", "acquire", "recover", "config", "history"):
        assert f"\\fI\\,{command}\\/\\fR" in page, command


def test_readme_exit_code_table_is_the_one_errors_py_makes():
    """The README's exit codes are `ExitCode` as errors.py words them: a new or reworded code
    without the README edit fails here."""
    from safefs.errors import exit_code_table

    assert exit_code_table() in (REPO / "README.md").read_text()
