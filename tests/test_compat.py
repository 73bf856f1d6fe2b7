# -*- coding: utf-8 -*-
"""Section 1, Compat: LeanOs and LeanPath, the os module udocker.py uses without importing
os (Python 3). Each function must give what os and posixpath give, for text and bytes."""

from __future__ import print_function, absolute_import

import os
import posixpath
import subprocess
import sys

import pytest

import udocker
from support import UDOCKER_SCRIPT

pytestmark = pytest.mark.skipif(sys.version_info[0] < 3, reason="Python 2.7 uses os itself")

PATHS = ["", "/", "//", "///", "a", "a/", "/a/b/", "a//b", "./a", "../a", "a/../..",
         "/../a", "//a/./b/../c", "a/b/./../c/.", "~", "~/x", ".", "..", "/a/b/c.tar.gz"]


@pytest.fixture
def lean():
    return udocker.LeanOs()


@pytest.mark.parametrize("kind", [str, bytes])
def test_lean_path_gives_what_posixpath_gives(lean, kind):
    paths = [p if kind is str else p.encode() for p in PATHS]
    for path in paths:
        for name in ("split", "dirname", "basename", "isabs", "normpath", "abspath"):
            assert getattr(lean.path, name)(path) == getattr(posixpath, name)(path), \
                (name, path)
        for other in paths:
            assert lean.path.join(path, other) == posixpath.join(path, other), (path, other)
            assert lean.path.join(path, other, path) == posixpath.join(path, other, path)


def _tree(tmpdir):
    """Files, directories and links of every kind, for the tests below."""
    top = tmpdir.mkdir("t")
    top.mkdir("dir").join("file").write("12345")
    os.symlink("dir", str(top.join("to-dir")))
    os.symlink("dir/file", str(top.join("to-file")))
    os.symlink("nowhere", str(top.join("dangling")))
    os.symlink("loop-b", str(top.join("loop-a")))
    os.symlink("loop-a", str(top.join("loop-b")))
    os.symlink("../t/to-dir/../to-dir", str(top.join("dir", "up")))
    os.symlink(str(top.join("to-dir")), str(top.join("absolute")))
    return str(top)


def test_lean_path_tests_files_as_posixpath_does(lean, tmpdir):
    top = _tree(tmpdir)
    names = ["dir", "dir/file", "to-dir", "to-file", "dangling", "loop-a", "missing",
             "dir/file/below", "dir/up", "absolute", "bad\0name"]
    for name in names:
        for path in (os.path.join(top, name), os.path.join(top, name).encode()):
            for test in ("exists", "lexists", "isdir", "isfile", "islink"):
                try:
                    expected = getattr(posixpath, test)(path)
                except ValueError:          # before 3.8, for a NUL: False since
                    expected = False
                assert getattr(lean.path, test)(path) == expected, (test, path)
    assert lean.path.getsize(os.path.join(top, "to-file")) == 5
    with pytest.raises(OSError):
        lean.path.getsize(os.path.join(top, "dangling"))


def test_lean_realpath_resolves_as_posixpath_does(lean, tmpdir, monkeypatch):
    top = _tree(tmpdir)
    monkeypatch.chdir(top)
    names = ["dir", "to-dir/file", "to-file", "dangling/x", "loop-a", "loop-a/x", "missing/..",
             "dir/up/up/file", "absolute/../to-file", "to-dir/../../t/to-file", "..", ".", "",
             "//" + top + "/to-dir", "to-dir/./file/", "../../x", "missing/../../../y"]
    for name in names:
        for path in (name, os.path.join(top, name)):
            for value in (path, path.encode()):
                assert lean.path.realpath(value) == posixpath.realpath(value), value


def test_lean_expanduser_as_posixpath_does(lean, monkeypatch, tmpdir):
    import pwd
    root_home = pwd.getpwuid(0).pw_dir
    for home in (str(tmpdir), str(tmpdir) + "/", "/", None):
        if home is None:
            monkeypatch.delenv("HOME", raising=False)
        else:
            monkeypatch.setenv("HOME", home)
        for path in ("~", "~/x", "~root", "~root/x/", "~nosuchuser-udocker/x", "x/~", "",
                     b"~/x"):
            assert lean.path.expanduser(path) == posixpath.expanduser(path), (home, path)
    assert lean.path.expanduser("~root/y") == root_home.rstrip("/") + "/y"


def test_lean_os_is_posix_and_the_rest_of_os_on_use(lean, monkeypatch):
    import posix
    assert lean.stat is posix.stat and lean.fork is posix.fork
    monkeypatch.setattr(os, "_exit", lambda code: None)     # as coverage's patch does
    assert lean._exit is os._exit                            # os is imported: its names
    assert lean.walk is os.walk and lean.makedirs is os.makedirs       # from os itself
    assert (lean.sep, lean.devnull, lean.SEEK_END) == (os.sep, os.devnull, os.SEEK_END)
    assert lean.environ is os.environ                    # os is imported: the real one


def test_without_os_the_environment_is_decoded_as_os_decodes_it(tmpdir):
    """In a start without os (python -S, as the launcher runs), udocker.py's own os is a
    LeanOs whose environ holds what os.environ would (surrogateescape for bytes that are
    not the file system encoding); os stays unimported."""
    code = ("import sys; sys.path.insert(0, %r); import udocker; "
            "print('os' in sys.modules, type(udocker.os).__name__); "
            "lean = dict(udocker.os.environ); import os; "
            "print(lean == dict(os.environ), repr(lean['UDOCKER_TEST_BYTES']))"
            % os.path.dirname(UDOCKER_SCRIPT))
    env = dict((k.encode(), v.encode()) for k, v in os.environ.items()
               if k in ("PATH", "HOME", "LANG", "LC_ALL"))
    env[b"UDOCKER_TEST_BYTES"] = b"caf\xc3\xa9-\xff"
    out = subprocess.check_output([sys.executable, "-S", "-c", code], env=env).decode()
    assert out.splitlines()[0] == "False LeanOs"
    assert out.splitlines()[1].startswith("True "), out
