# -*- coding: utf-8 -*-
"""Test infrastructure for udocker.py: real registries, images, faults.

Modules:
    procs        spawn helper processes that die with the test run
    client       a small HTTP client and a registry API v2 client
    tokenserver  a Docker token server (JWT signed with the openssl command)
    registry     start a real docker-registry (anonymous, basic, token)
    images       deterministic layers, configs, manifests; push; save/OCI
    faultproxy   a reverse proxy that misbehaves on blob downloads
    socksproxy   a SOCKS5/4/4a proxy that records what it is asked (and fails on
                 demand); the accept loop and byte relay other test servers use
    runner       run udocker.py as a subprocess with a private UDOCKER_DIR
    slurm        a real single-node Slurm cluster (munge, MariaDB, slurmdbd,
                 slurmctld, slurmd) on 127.0.0.1, run as the test user
    nvidia       a fake NVIDIA driver tree (setup/run --nvidia)
    toolserver   a loopback file server (Range, counts, faults) for the tools
                 installer; a refusing URL; a PATH without engines

Everything here runs on Python 2.7 and 3.6+, stdlib only, loopback only.
This file holds the few Python 2/3 differences and the shared paths.
"""

from __future__ import print_function, absolute_import, division

import os
import signal
import socket
import subprocess
import sys
import threading
import time

# ---------------------------------------------------------------------------
# compat
# ---------------------------------------------------------------------------

PY2 = sys.version_info[0] == 2

if PY2:  # pragma: no cover - exercised only on 2.7
    import httplib
    import BaseHTTPServer as _http_server
    import SocketServer as _socketserver
    from urlparse import urlsplit, parse_qs
    from urllib import urlencode, quote
    text_type = unicode  # noqa: F821
    binary_type = str
else:
    import http.client as httplib
    import http.server as _http_server
    import socketserver as _socketserver
    from urllib.parse import urlsplit, parse_qs, urlencode, quote
    text_type = str
    binary_type = bytes

HTTPServer = _http_server.HTTPServer
BaseHTTPRequestHandler = _http_server.BaseHTTPRequestHandler
ThreadingMixIn = _socketserver.ThreadingMixIn

__all__ = ["PY2", "httplib", "urlsplit", "parse_qs", "urlencode", "quote",
           "text_type", "binary_type", "HTTPServer",
           "BaseHTTPRequestHandler", "ThreadingMixIn", "to_bytes", "to_text",
           "native_str", "REPO_ROOT", "TESTS_DIR", "UDOCKER_SCRIPT", "launcher_code",
           "SupportError", "UPSTREAM_UDOCKER", "free_port", "which", "one_error_line",
           "wait_for", "require_engine_tests", "required_file"]


def to_bytes(value, encoding="utf-8"):
    """Return value as bytes (text is encoded, bytes returned as is)."""
    if isinstance(value, binary_type):
        return value
    return value.encode(encoding)


def to_text(value, encoding="utf-8", errors="strict"):
    """Return value as text (bytes are decoded, text returned as is)."""
    if isinstance(value, text_type):
        return value
    return value.decode(encoding, errors)


def native_str(value):
    """Return value as the native str type of this Python."""
    if PY2:
        return to_bytes(value)
    return to_text(value)


# ---------------------------------------------------------------------------
# paths and small helpers
# ---------------------------------------------------------------------------

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)
UDOCKER_SCRIPT = os.path.join(REPO_ROOT, "udocker.py")


def launcher_code(script):
    """The Python program that udocker.py's sh launcher (its first lines) runs with
    `python -S -c PROGRAM udocker.py ARGS`, or None for a file without one. Tests run
    udocker.py through it, with their own interpreter and without -S (coverage's .pth).
    Read again only when the file changed."""
    st = os.stat(script)
    key = (script, st.st_mtime, st.st_size)
    if key not in _LAUNCHERS:
        with open(script, "rb") as handle:
            head = handle.read(8192).decode("utf-8", "replace")
        start, end = head.find(" -S -c '"), head.find("' \"$0\" \"$@\"")
        _LAUNCHERS[key] = head[start + len(" -S -c '"):end] if 0 <= start < end else None
    return _LAUNCHERS[key]


_LAUNCHERS = {}


# udocker 1.3.17, the compatibility reference (.ci/run installs it and sets the variable)
UPSTREAM_UDOCKER = os.environ.get("UDOCKER_TEST_UPSTREAM") or "/opt/udocker-1.3.17/bin/udocker"

LOOPBACK = "127.0.0.1"


class SupportError(Exception):
    """A piece of test infrastructure could not be set up."""


def free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def which(name):
    """Return the path of executable name (PATH, then the usual
    directories), else None."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    for directory in dirs + ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]:
        path = os.path.join(directory, name)
        if directory and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def pipe_holders(*pipes):
    """The pids of the other processes that have one of these pipes open (from /proc)."""
    names = set("pipe:[%d]" % os.fstat(p.fileno()).st_ino for p in pipes if p is not None)
    found = set()
    for pid in (int(n) for n in os.listdir("/proc") if n.isdigit()):
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
            if pid != os.getpid() and any(os.readlink("/proc/%d/fd/%s" % (pid, fd)) in names
                                          for fd in fds):
                found.add(pid)
        except OSError:
            continue
    return sorted(found)


def run_in_session(argv, data=b"", timeout=300, env=None, cwd=None):
    """Run argv in its own session, data on stdin; (exit code, stdout bytes, stderr bytes,
    expired). After timeout seconds the whole session is killed and expired is True."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, close_fds=True,
                            preexec_fn=os.setsid)
    expired = []

    def kill():
        expired.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        # and what left the session but still holds the output pipes (a container's
        # processes in their own pid namespace): communicate() would wait for them forever
        for pid in pipe_holders(proc.stdout, proc.stderr):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        out, err = proc.communicate(data)
    finally:
        timer.cancel()
    return proc.returncode, out, err, bool(expired)


# ---------------------------------------------------------------------------
# assertions shared by the test modules
# ---------------------------------------------------------------------------

def one_error_line(err, needle=None, rc=None):
    """Assert that stderr text err (or a runner Result) holds exactly one `Error: ` line
    and no traceback (Info:/Warning: lines may come before it), containing needle when
    given, and that a Result's exit code is non-zero (rc when given); returns the line."""
    status = getattr(err, "rc", None)
    text = to_text(getattr(err, "err", err), errors="replace")
    if status is not None:
        assert status != 0 if rc is None else status == rc, err
    assert "Traceback" not in text, text
    lines = [l for l in text.splitlines() if not l.startswith(("Info:", "Warning:"))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    assert needle is None or needle in lines[0], (needle, text)
    return lines[0]


def wait_for(predicate, what, timeout=120.0, interval=0.02):
    """Poll predicate until it returns something true, and return that. The timeout only
    stops a broken test from hanging: it fails the test, naming what was awaited."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() >= deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def require_engine_tests():
    """Skip as root (the engines are tested as a non-root user), fail where
    UDOCKER_TEST_TARBALL is named but missing (required_file); returns the tarball."""
    import pytest
    if os.geteuid() == 0:
        print("skipped: the engines are tested as a non-root user (run: bash tests/run)")
        pytest.skip("the engines are tested as a non-root user (run: bash tests/run)")
    return required_file("UDOCKER_TEST_TARBALL")


def required_file(variable, default=None):
    """The path named by environment variable (else default) of something a test needs
    (the tools tarball, udocker 1.3.17). Where the variable is set (CI sets them all), a
    missing file fails the test; where it is not, the test is skipped with the reason
    printed."""
    import pytest
    path = os.environ.get(variable) or default
    if path and os.path.exists(path):
        return path
    if os.environ.get(variable):
        pytest.fail("%s=%s does not exist" % (variable, path), pytrace=False)
    reason = "%s not set%s" % (variable, " and %s missing" % default if default else "")
    print("skipped: " + reason)
    pytest.skip(reason)
