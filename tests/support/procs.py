# -*- coding: utf-8 -*-
"""Helper processes that cannot outlive the test run.

Every server process is started as

    setsid sh -c WATCHDOG sh PARENT_PID timeout --foreground -k 5 MAX CMD...

so it is stopped (1) by Process.stop() (the whole process group gets SIGTERM,
then SIGKILL), (2) within about a second after the test process disappears,
even if it was killed with SIGKILL (the shell polls the parent pid), and
(3) in any case after MAX seconds (coreutils timeout).
"""

from __future__ import print_function, absolute_import, division

import os
import signal
import subprocess
import time

from . import LOOPBACK, SupportError, httplib, which

MAX_LIFETIME = 3600  # seconds a helper server may live at most

# Runs CMD in the background and polls the parent pid once a second.
_WATCHDOG = r'''
parent=$1; shift
"$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null; wait $child; exit 0' TERM INT HUP
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do
    sleep 1 &
    wait $!
done
kill -TERM $child 2>/dev/null
wait $child
'''


class Process(object):
    """A helper server process with its output going to a log file."""

    def __init__(self, argv, log_path, cwd=None, env=None,
                 max_lifetime=MAX_LIFETIME):
        self.argv = list(argv)
        self.log_path = log_path
        wrapped = ["sh", "-c", _WATCHDOG, "sh", str(os.getpid())]
        if which("timeout"):
            wrapped += ["timeout", "--foreground", "-k", "5",
                        str(int(max_lifetime))]
        wrapped += self.argv
        self._log = open(log_path, "ab")
        with open(os.devnull, "rb") as devnull:
            self._popen = subprocess.Popen(
                wrapped, stdin=devnull, stdout=self._log,
                stderr=subprocess.STDOUT, cwd=cwd, env=env, close_fds=True,
                preexec_fn=os.setsid)
        self.pid = self._popen.pid

    def alive(self):
        """Return True while the process (group leader) is running."""
        return self._popen.poll() is None

    def log_tail(self, size=4000):
        """Return the last size bytes of the log as text."""
        try:
            with open(self.log_path, "rb") as logf:
                logf.seek(0, os.SEEK_END)
                logf.seek(max(0, logf.tell() - size))
                return logf.read().decode("utf-8", "replace")
        except (IOError, OSError):
            return ""

    def stop(self, grace=5.0):
        """Stop the whole process group: SIGTERM, then SIGKILL after grace."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except OSError:
            pass
        deadline = time.time() + grace
        while self.alive() and time.time() < deadline:
            time.sleep(0.05)
        try:  # whatever is left of the group (the server if it hung)
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass
        self._popen.wait()
        self._log.close()


def http_status(url_host, port, path, timeout=2.0):
    """Return the HTTP status of GET path on host:port, or None on error."""
    conn = httplib.HTTPConnection(url_host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except Exception:  # pylint: disable=broad-except
        return None
    finally:
        conn.close()


def wait_http(port, path, statuses, process=None, timeout=30.0,
              host=LOOPBACK):
    """Poll until GET path answers with a status in statuses.

    Raises SupportError (with the log tail of process) on timeout or if
    process exits first.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = http_status(host, port, path)
        if status in statuses:
            return status
        if process is not None and not process.alive():
            raise SupportError("%s exited before answering on port %d:\n%s"
                               % (process.argv[0], port, process.log_tail()))
        time.sleep(0.05)
    tail = process.log_tail() if process is not None else ""
    raise SupportError("no answer on %s:%d%s within %.0f s\n%s"
                       % (host, port, path, timeout, tail))
