"""Sizes, durations and times for people: one copy, read by the CLI and the config file alike."""

from __future__ import annotations

import time

import pytest

from safefs import cli_options, human, settings


@pytest.mark.parametrize(
    ("text", "size"), [("512M", 512 << 20), ("1.5TiB", int(1.5 * (1 << 40))), ("64k", 64 << 10), (" 7 ", 7)]
)
def test_the_cli_and_the_config_file_read_sizes_alike(text: str, size: int) -> None:
    assert human.parse_size(text) == cli_options.parse_size(text) == settings.size(text) == size


def test_what_is_not_a_size_is_refused_by_both() -> None:
    assert human.parse_size("10 parsecs") is None
    with pytest.raises(ValueError, match="invalid size"):
        settings.size("10 parsecs")


def test_sizes_durations_and_times_as_written() -> None:
    assert [human.human_bytes(n) for n in (100, 1536, 5 << 30)] == ["100 B", "1.5 KiB", "5.0 GiB"]
    assert [human.human_seconds(s) for s in (5.0, 125, 7300)] == ["5.0 s", "2 min 5 s", "2 h 1 min"]
    assert [human.plural(n, "file") for n in (1, 2)] == ["1 file", "2 files"]
    assert human.wall_time(0) == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(0))
