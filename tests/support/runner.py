# -*- coding: utf-8 -*-
"""Run udocker.py as a subprocess with a private repository and home.

    run = Udocker(tmpdir)                # what the `udocker` fixture gives
    res = run("pull", "--insecure", "127.0.0.1:5000/test/busybox")
    res.rc, res.out, res.err             # exit code, stdout, stderr (text)
    assert res.rc == 0, res              # repr shows argv, rc, out, err
    res = run("login", "--username=alice", "--password-stdin",
              input="secret1\\n", env={"UDOCKER_LOGLEVEL": "5"}, timeout=60)
    rc, out, err = run("images")         # a Result is also the tuple (rc, out, err)
    run("export", "-", cid).raw_out      # stdout as bytes (a tar, say)
    proc = run.start("rmi", "x")         # started, not waited for: a Popen with pipes
    run = Udocker(tmpdir, allow_root=True)   # --allow-root first when the test is root

Command: [python, UDOCKER_SCRIPT] + args, where python is sys.executable
unless $UDOCKER_TEST_PYTHON or python= says otherwise. Environment: the
test process's, minus every UDOCKER_* variable (but UDOCKER_TEST_PYTHON and
UDOCKER_TEST_DEFAULT_TARBALL, see conftest.py) and every *_proxy variable,
plus HOME=<tmp>/home, UDOCKER_DIR=<tmp>/udocker, UDOCKER_NOSYSCONF=1, plus
run.env (persistent per test), plus env= (None removes a variable). The
working directory is <tmp>.
The process runs in its own session; on timeout the whole group is killed
and UdockerTimeout (an AssertionError) is raised.
"""

from __future__ import print_function, absolute_import, division

import os
import subprocess
import sys
import time

from . import UDOCKER_SCRIPT, launcher_code, run_in_session, to_bytes, to_text

DEFAULT_TIMEOUT = 300


class UdockerTimeout(AssertionError):
    """udocker.py ran longer than its timeout (its group was killed)."""


class Result(object):
    """Outcome of one udocker.py run."""

    def __init__(self, argv, rc, out, err, duration, raw_out=None, script=None):
        self.argv = argv
        self.script = script            # argv's udocker.py (what follows is its arguments)
        self.rc = rc
        self.out = out
        self.raw_out = raw_out          # stdout as the process wrote it (bytes)
        self.err = err
        self.duration = duration

    @property
    def output(self):
        """stdout followed by stderr."""
        return self.out + self.err

    def __iter__(self):
        """rc, out, err: a Result is also the tuple a plain subprocess gives."""
        return iter((self.rc, self.out, self.err))

    def __getitem__(self, index):
        return (self.rc, self.out, self.err)[index]

    def check(self, rc=0):
        """Assert the exit code; return self (for chaining)."""
        assert self.rc == rc, "expected rc %d\n%r" % (rc, self)
        return self

    def __repr__(self):
        return ("<udocker %s\nrc=%s (%.1f s)\n--- stdout ---\n%s"
                "--- stderr ---\n%s>"
                % (" ".join(self.argv[self.argv.index(self.script) + 1:] if self.script in
                            self.argv else self.argv), self.rc, self.duration,
                   self.out[-6000:], self.err[-6000:]))


def clean_environ():
    """os.environ without UDOCKER_* and *_proxy variables."""
    env = {}
    for name, value in os.environ.items():
        if name.upper().startswith("UDOCKER_") and \
                name not in ("UDOCKER_TEST_PYTHON", "UDOCKER_TEST_DEFAULT_TARBALL"):
            continue
        if name.lower().endswith("_proxy"):
            continue
        env[name] = value
    return env


class Udocker(object):
    """A callable runner bound to one temporary directory."""

    def __init__(self, tmpdir, script=UDOCKER_SCRIPT, python=None, allow_root=False):
        self.tmpdir = str(tmpdir)
        self.home = os.path.join(self.tmpdir, "home")
        self.udocker_dir = os.path.join(self.tmpdir, "udocker")
        self.script = script
        # udocker.py refuses root without --allow-root (a test of that refusal leaves it out)
        self.prefix = ["--allow-root"] if allow_root and os.geteuid() == 0 else []
        self.python = python or os.environ.get("UDOCKER_TEST_PYTHON") or \
            sys.executable
        self.env = {}
        if not os.path.isdir(self.home):
            os.makedirs(self.home)

    def environ(self, extra=None):
        """The environment a run gets (see the module docstring)."""
        env = clean_environ()
        env.update({"HOME": self.home, "UDOCKER_DIR": self.udocker_dir,
                    "UDOCKER_NOSYSCONF": "1"})
        for source in (self.env, extra or {}):
            for name, value in source.items():
                if value is None:
                    env.pop(name, None)
                else:
                    env[name] = str(value)
        env.pop("UDOCKER_TEST_PYTHON", None)
        return env

    def argv(self, args, python=None):
        """The launcher's program (the chapter cache, as ./udocker.py starts) when the
        script has one, else `python SCRIPT`."""
        code = launcher_code(self.script)
        start = ["-c", code, self.script] if code else [self.script]
        return [python or self.python] + start + self.prefix + [str(a) for a in args]

    def start(self, *args, **kwargs):
        """udocker.py args started, not waited for: a Popen with stdin, stdout and
        stderr pipes. Keyword arguments: env (dict), cwd."""
        return subprocess.Popen(self.argv(args), env=self.environ(kwargs.get("env")),
                                cwd=kwargs.get("cwd") or self.tmpdir, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def __call__(self, *args, **kwargs):
        """Run udocker.py with args. Keyword arguments: env (dict),
        input (text or bytes for stdin), timeout (seconds, default 300),
        cwd, python (interpreter path)."""
        unknown = set(kwargs) - set(["env", "input", "timeout", "cwd",
                                     "python"])
        if unknown:
            raise TypeError("unknown arguments: %s" % ", ".join(unknown))
        argv = self.argv(args, kwargs.get("python"))
        timeout = kwargs.get("timeout") or DEFAULT_TIMEOUT
        data = kwargs.get("input")
        start = time.time()
        rc, out, err, expired = run_in_session(
            argv, to_bytes(data) if data is not None else b"", timeout,
            self.environ(kwargs.get("env")), kwargs.get("cwd") or self.tmpdir)
        result = Result(argv, rc,
                        to_text(out, errors="replace"),
                        to_text(err, errors="replace"), time.time() - start, out, self.script)
        if expired:
            raise UdockerTimeout("timed out after %s s\n%r"
                                 % (timeout, result))
        return result
