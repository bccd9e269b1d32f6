"""Config files (safefs/settings.py), mount(8)'s -o syntax (safefs/options.py) and `safefs config`.

Invariants protected:
- site file, then user file, then the command line (and -o): later wins, key by key;
- `cache_root` makes the project's cache dir under it; cache_dir and cache_root replace each other;
- a bad file is one line naming the file, the line and the key, exit code 2;
- every `safefs mount` long option has an -o spelling; mount(8)'s own options are ignored;
  `ro` is a follower; an unknown option is a one-line usage error;
- the test suite itself reads no config file of the developer's.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
from pathlib import Path

import pytest

from safefs import cli, cli_launcher, cli_options, config, options, settings
from safefs.errors import ExitCode


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    site, user = tmp_path / "site.toml", tmp_path / "user.toml"
    monkeypatch.setenv("SAFEFS_SITE_CONFIG", str(site))
    monkeypatch.setenv("SAFEFS_CONFIG", str(user))
    return site, user


def test_the_suite_reads_no_developer_config() -> None:
    paths = settings.config_files(os.environ)
    assert all(not p.exists() and "nonexistent" in str(p) for p in paths), paths


def test_user_file_is_under_xdg_config_home() -> None:
    env = {"XDG_CONFIG_HOME": "/x/conf", "HOME": "/home/ann"}
    assert settings.config_files(env) == [settings.SITE_CONFIG, Path("/x/conf/safefs/config.toml")]
    assert settings.config_files({"HOME": "/home/ann"})[1] == Path("/home/ann/.config/safefs/config.toml")


def test_site_then_user_then_command_line(files: tuple[Path, Path], tmp_path: Path) -> None:
    site, user = files
    site.write_text('[mount]\ncache_root = "/scratch/c"\nwriteback_delay = 9\ncache_size = "2G"\nlock_delay = 3\n')
    user.write_text("[mount]\nwriteback_delay = 7.5\nlog_level = \"warning\"\n")
    (tmp_path / "proj").mkdir()
    args = cli.build_parser().parse_args(
        ["mount", str(tmp_path / "proj"), str(tmp_path / "m"), "--cache-size", "1G"]
    )
    conf = cli.mount_config(args)
    assert conf.writeback_delay == 7.5  # user over site
    assert conf.cache_size == 1 << 30  # command line over both
    assert conf.lease.lock_delay == 3.0 and conf.log_level == "warning"
    assert conf.cache_dir == Path("/scratch/c") / config.default_cache_dir(tmp_path / "proj", os.environ).name


def test_a_user_cache_dir_replaces_a_site_cache_root(files: tuple[Path, Path], tmp_path: Path) -> None:
    site, user = files
    site.write_text('[mount]\ncache_root = "/scratch/c"\n')
    user.write_text(f'[mount]\ncache_dir = "{tmp_path}/mine"\n')
    assert settings.load(os.environ).keys() == {"cache_dir"}
    args = cli.build_parser().parse_args(["mount", str(tmp_path), str(tmp_path / "m"), "--cache-root", "/r"])
    conf = cli.mount_config(args)
    assert conf.cache_dir.parent == Path("/r")  # the command line's cache root beats the file's cache dir


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[mount]\nwriteback_delay = 1\ncache_sise = 3\n", r"user.toml:3: unknown key 'cache_sise' in [mount]"),
        ("[mount]\n\nwriteback_delay = -2\n", "user.toml:3: writeback_delay: seconds must be a non-negative"),
        ('[mount]\ncache_size = "lots"\n', "user.toml:2: cache_size: invalid size 'lots'"),
        ("[mount]\nwriteback_delay = \n", "user.toml: Invalid value (at line 2, column 19) (key 'writeback_delay')"),
        ("[mounts]\nwriteback_delay = 1\n", "user.toml:1: unknown table or key 'mounts'"),
        ('[mount]\nlog_level = "loud"\n', "user.toml:2: log_level: expected one of debug, info, warning, error"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_line_and_key(
    files: tuple[Path, Path], text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files[1].write_text(text)
    with pytest.raises(settings.SettingsError) as caught:
        settings.load(os.environ)
    assert expected in caught.value.message and "\n" not in caught.value.message
    assert str(files[1]) in caught.value.message
    (tmp_path / "proj").mkdir()
    assert cli.main(["mount", str(tmp_path / "proj"), str(tmp_path / "m")]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_config_prints_each_setting_and_its_source(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    site, user = files
    site.write_text('# site\n[mount]\ncache_root = "/scratch/c"\n')
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert f"cache_root       /scratch/c  ({site}:3)" in out
    assert "writeback_delay  5 s  (default)" in out
    assert f"{user} (none)" in out
    assert cli.main(["config", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["cache_root"] == {"value": "/scratch/c", "source": f"{site}:3"}
    assert data["settings"]["cache_size"] == {"value": 10 << 30, "source": "default"}


# ---- -o ----------------------------------------------------------------------------------------


def test_every_mount_long_option_has_an_o_spelling(tmp_path: Path) -> None:
    table = options.spellings()
    for name in ("cache_dir", "writeback_delay", "cache_size", "allow_other", "foreground", "host_id",
                 "debug", "cache_root", "follower", "log_file", "log_level", "lease_renew", "lease_break",
                 "lease_epsilon", "lock_delay", "lease_poll", "follower_poll", "backing_timeout",
                 "wait_lease"):  # fmt: skip
        assert name in table, name
    assert "ready_fd" not in table


def test_mount8_form_becomes_safefs_mount(tmp_path: Path) -> None:
    argv = ["/nfs/p", "/mnt/p", "-o", "rw,cache_dir=/scratch/c,writeback_delay=5,allow_other,_netdev,nofail,"
            "x-systemd.automount,defaults,noauto,user,comment=x", "-t", "fuse.safefs", "-n"]  # fmt: skip
    out = options.translate(argv, cli.COMMANDS)
    assert out == ["mount", "/nfs/p", "/mnt/p", "--cache-dir", "/scratch/c", "--writeback-delay", "5", "--allow-other"]
    assert options.translate(["/a", "/b", "-oro"], cli.COMMANDS)[3:] == ["--follower"]
    conf = cli.mount_config(cli.build_parser().parse_args(options.translate(argv, cli.COMMANDS)))
    assert conf.cache_dir == Path("/scratch/c") and conf.writeback_delay == 5.0 and conf.allow_other


def test_other_command_lines_pass_through() -> None:
    for argv in (["status"], ["sync", "/m", "--timeout", "3"], ["--version"], [], ["stauts", "/m"]):
        assert options.translate(argv, cli.COMMANDS) == argv
    out = options.translate(["mount", "/a", "/b", "-o", "cache_size=2G", "--debug"], cli.COMMANDS)
    assert out == ["mount", "/a", "/b", "--cache-size", "2G", "--debug"]


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        ("bogus", "unknown mount option 'bogus'"),
        ("cache_dir", "mount option 'cache_dir' needs a value"),
        ("allow_other=1", "mount option 'allow_other' takes no value"),
    ],
)
def test_a_bad_o_option_is_one_line(opts: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["/a", "/b", "-o", opts]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err == f"safefs: error: {err.split('error: ', 1)[1]}" and err.count("\n") == 1 and expected in err


# ---- one declaration per option ------------------------------------------------------------------


def test_every_declared_option_reaches_the_parser_the_config_keys_o_and_mount_config() -> None:
    """options.MOUNT_OPTIONS is the only list: each surface is made from it, nothing is added beside it."""
    declared = options.MOUNT_OPTIONS
    (commands,) = (a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    mount = commands.choices["mount"]
    parsed = {s for action in mount._actions for s in action.option_strings if s.startswith("--")}
    assert parsed - {"--help"} == {o.flag for o in declared}
    assert set(settings.KEYS) == {o.name for o in declared if o.config}
    assert set(options.spellings()) == {o.name for o in declared if o.o}
    fields = {f.name for f in dataclasses.fields(config.MountConfig)} - {"lease"}
    fields |= {f"lease.{f.name}" for f in dataclasses.fields(config.LeaseTimings)}
    set_by = [o.field for o in declared if o.field is not None]
    assert len(set_by) == len(set(set_by)) and set(set_by) <= fields
    # src and mnt are positional; the rest are tuned in code, not by users.
    assert fields - set(set_by) == {"src", "mnt", "free_space_floor", "publish_threshold", "lease.rho"}


def test_the_code_that_uses_options_spells_none_of_them() -> None:
    # mount_config resolves the cache dir from two of them by name: that rule is code, not a spelling.
    resolving = {"cache_dir", "cache_root"}
    for code in (cli.mount_config, cli_launcher.daemon_argv, cli.setting_defaults, cli_options.add_mount_options):
        source = inspect.getsource(code)
        for option in options.MOUNT_OPTIONS:
            assert f'"{option.flag}"' not in source, (code, option.name)
            if option.name not in resolving or code is not cli.mount_config:
                assert f"args.{option.name}" not in source, (code, option.name)


def test_daemon_argv_passes_every_field_the_options_set(tmp_path: Path) -> None:
    changed = {"writeback_delay": 0.25, "cache_size": 3 << 30, "allow_other": True, "host_id": "h",
               "follower": True, "log_level": "debug", "log_file": tmp_path / "log", "metrics_port": 9999,
               "follower_poll": 0.5, "backing_timeout": 7.0, "wait_for_lease": True}  # fmt: skip
    lease = config.LeaseTimings(renew=0.5, t_break=4.0, epsilon=0.25, lock_delay=1.0, poll=0.2)
    conf = config.MountConfig(src=tmp_path / "s", mnt=tmp_path / "m", cache_dir=tmp_path / "c", lease=lease, **changed)
    default = config.MountConfig(src=conf.src, mnt=conf.mnt, cache_dir=conf.cache_dir)
    for option in options.MOUNT_OPTIONS:
        if option.field is not None and option.field != "cache_dir":
            assert cli_options.field_value(conf, option) != cli_options.field_value(default, option), option.name
    argv = cli_launcher.daemon_argv(conf, ready_fd=3, debug=False)
    assert cli.mount_config(cli.build_parser().parse_args(argv[3:])) == conf
