"""Configuration: layering, typing, UDOCKER_NOSYSCONF, showconf."""
from __future__ import print_function, absolute_import

import os

import pytest

import udocker


def load(tmpdir, env=None, **options):
    environ = {"HOME": str(tmpdir), "UDOCKER_NOSYSCONF": "1"}
    environ.update(env or {})
    return udocker.Config.load(environ, options)


def test_defaults(tmpdir):
    cfg = load(tmpdir)
    assert cfg.topdir == os.path.join(str(tmpdir), ".udocker")
    assert cfg.reposdir == os.path.join(cfg.topdir, "repos")
    assert cfg.keystore == os.path.join(str(tmpdir), ".udocker", "keystore")
    assert cfg.verbose_level == 3 and cfg.pull_parallel == 4


def test_layering_order(tmpdir):
    home = tmpdir.join(".udocker").ensure(dir=True)
    home.join("udocker.conf").write("[DEFAULT]\ntimeout = 11\npull_parallel = 2\n"
                                    "http_agent = home\n")
    top = tmpdir.join("top").ensure(dir=True)
    top.join("udocker.conf").write("[DEFAULT]\ntimeout = 22\nhttp_agent = top\n")
    extra = tmpdir.join("extra.conf")
    extra.write("[DEFAULT]\nhttp_agent = extra\nsysdirs_list = /proc /dev\n")
    cfg = load(tmpdir, {"UDOCKER_DIR": str(top), "UDOCKER_LOGLEVEL": "5"},
               config=str(extra), quiet=True)
    assert cfg.pull_parallel == 2                  # home file
    assert cfg.timeout == 22.0                     # $UDOCKER_DIR/udocker.conf beats home
    assert cfg.http_agent == "extra"               # --config beats both
    assert cfg.sysdirs_list == ["/proc", "/dev"]   # typed as a list
    assert cfg.verbose_level == 1                  # -q beats UDOCKER_LOGLEVEL
    assert cfg.topdir == str(top)


def test_values_are_typed_never_executed(tmpdir):
    conf = tmpdir.join("c.conf")
    conf.write("[DEFAULT]\ntimeout = __import__('os').system('touch %s')\n"
               % tmpdir.join("pwned"))
    with pytest.raises(udocker.ConfigurationError):
        load(tmpdir, config=str(conf))
    assert not tmpdir.join("pwned").check()


def test_interpolation_syntax_is_plain_text(tmpdir):
    conf = tmpdir.join("c.conf")
    conf.write("[DEFAULT]\nhttp_agent = %(topdir)s/x\n")
    assert load(tmpdir, config=str(conf)).http_agent == "%(topdir)s/x"


def test_nosysconf(tmpdir, monkeypatch):
    seen = []
    real = udocker.Config._read_file
    monkeypatch.setattr(udocker.Config, "_read_file", staticmethod(
        lambda path, *a, **k: seen.append(path) or real(path, *a, **k)))
    load(tmpdir)
    assert "/etc/udocker.conf" not in seen
    udocker.Config.load({"HOME": str(tmpdir)}, {})
    assert "/etc/udocker.conf" in seen


def test_missing_config_file_is_an_error(tmpdir):
    with pytest.raises(udocker.ConfigurationError):
        load(tmpdir, config=str(tmpdir.join("nope.conf")))


def test_bad_boolean(tmpdir):
    with pytest.raises(udocker.ConfigurationError):
        load(tmpdir, {"UDOCKER_AUTOINSTALL": "maybe"})


def test_config_is_read_only(tmpdir):
    cfg = load(tmpdir)
    with pytest.raises(AttributeError):
        cfg.topdir = "/x"


def test_unreadable_config_option_is_an_error(tmpdir):
    with pytest.raises(udocker.ConfigurationError) as info:
        load(tmpdir, config=str(tmpdir))                       # a directory
    assert "cannot read config file %s: Is a directory" % tmpdir in str(info.value)
    locked = tmpdir.join("locked.conf")
    locked.write("[DEFAULT]\ntimeout = 1\n")
    locked.chmod(0)
    try:
        if os.access(str(locked), os.R_OK):
            return                                             # root reads anything
        with pytest.raises(udocker.ConfigurationError) as info:
            load(tmpdir, config=str(locked))
        assert "Permission denied" in str(info.value)
    finally:
        locked.chmod(0o644)


@pytest.mark.parametrize("env,file_line", [({"UDOCKER_PULL_PARALLEL": "-1"}, ""),
                                           ({"UDOCKER_PULL_PARALLEL": "0"}, ""),
                                           ({}, "pull_parallel = 0"),
                                           ({}, "timeout = -5")])
def test_numbers_out_of_range_are_errors(tmpdir, env, file_line):
    tmpdir.join(".udocker").ensure(dir=True).join("udocker.conf").write(
        "[DEFAULT]\n%s\n" % file_line)
    with pytest.raises(udocker.ConfigurationError) as info:
        load(tmpdir, env)
    assert "below the minimum" in str(info.value)
