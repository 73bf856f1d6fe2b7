# -*- coding: utf-8 -*-
"""A real docker-registry (CNCF distribution 2.8) on 127.0.0.1 for tests.

    reg = start_registry(workdir, "anonymous" | "basic" | "token")
    reg.url, reg.host          http://127.0.0.1:PORT, 127.0.0.1:PORT
    reg.client()               RegistryClient with the pusher's credentials
    reg.client(None)           anonymous RegistryClient
    reg.access_log()           requests the registry served, from its log
    reg.stop()

Flavours:
    anonymous  no auth at all
    basic      htpasswd (bcrypt): alice/secret1 and the pusher account
    token      auth: token, realm = a TokenServer (reg.tokens) in this
               process; alice and the pusher may pull and push anywhere,
               anonymous clients may pull public/* only

The binary is $UDOCKER_TEST_REGISTRY_BIN, else docker-registry or registry
on PATH; it is run as `BINARY serve CONFIG.yml`, storage in workdir/data,
its log (warn level plus access log) in workdir/registry.log.
"""

from __future__ import print_function, absolute_import, division

import os
import re
import subprocess
import time

from . import LOOPBACK, SupportError, free_port, to_text, which
from .client import RegistryClient
from .procs import Process, wait_http
from .tokenserver import DEFAULT_USERS, TokenServer

FLAVOURS = ("anonymous", "basic", "token")
PUSHER = ("pusher", DEFAULT_USERS["pusher"])
ALICE = ("alice", DEFAULT_USERS["alice"])

_CONFIG = """\
version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %(data)s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %(addr)s
  secret: udocker-test-secret
  headers:
    X-Content-Type-Options: [nosniff]
%(auth)s"""

_ACCESS_RE = re.compile(r'^(\S+) \S+ (\S+) \[([^\]]+)\] "(\S+) (\S+) [^"]*" '
                        r'(\d+) (\d+) "([^"]*)" "([^"]*)"')


def registry_binary():
    """Return the registry executable or raise SupportError."""
    override = os.environ.get("UDOCKER_TEST_REGISTRY_BIN")
    if override:
        if not os.access(override, os.X_OK):
            raise SupportError("UDOCKER_TEST_REGISTRY_BIN=%s is not an "
                               "executable file" % override)
        return override
    path = which("docker-registry") or which("registry")
    if not path:
        raise SupportError(
            "docker-registry not found: install the Debian package "
            "docker-registry (apt-get install docker-registry) or set "
            "UDOCKER_TEST_REGISTRY_BIN to a distribution 'registry' binary")
    return path


def htpasswd_line(user, password):
    """Return one bcrypt htpasswd line made by the htpasswd command."""
    htpasswd = which("htpasswd")
    if not htpasswd:
        raise SupportError("htpasswd not found: apt-get install "
                           "apache2-utils (needed by the basic registry)")
    out = subprocess.check_output([htpasswd, "-Bbn", user, password])
    return to_text(out).strip()


class Registry(object):
    """One docker-registry process; see the module docstring."""

    def __init__(self, workdir, flavour="anonymous", users=None,
                 token_settings=None):
        if flavour not in FLAVOURS:
            raise ValueError("flavour must be one of %s" % (FLAVOURS,))
        self.workdir = workdir
        self.flavour = flavour
        self.binary = registry_binary()
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.pusher = PUSHER if flavour != "anonymous" else (None, None)
        self.data_dir = os.path.join(workdir, "data")
        self.config_path = os.path.join(workdir, "config.yml")
        self.log_path = os.path.join(workdir, "registry.log")
        self.tokens = None
        self.images = {}  # filled by images.push_standard_images
        self._token_settings = token_settings or {}
        self._process = None
        self.port = self.url = self.host = None

    def _auth_section(self):
        if self.flavour == "basic":
            path = os.path.join(self.workdir, "htpasswd")
            with open(path, "w") as pwf:
                for user in sorted(self.users):
                    pwf.write(htpasswd_line(user, self.users[user]) + "\n")
            return ("auth:\n  htpasswd:\n    realm: udocker-test-basic\n"
                    "    path: %s\n" % path)
        if self.flavour == "token":
            if self.tokens is None:
                self.tokens = TokenServer(self.workdir, users=self.users,
                                          **self._token_settings).start()
            return ("auth:\n  token:\n    realm: %s\n    service: %s\n"
                    "    issuer: %s\n    rootcertbundle: %s\n"
                    % (self.tokens.realm, self.tokens.service,
                       self.tokens.issuer, self.tokens.cert_path))
        return ""

    def start(self, attempts=5):
        """Start the registry and wait until /v2/ answers; return self."""
        auth = self._auth_section()
        last_error = None
        for _ in range(attempts):
            self.port = free_port()
            with open(self.config_path, "w") as cfg:
                cfg.write(_CONFIG % {"data": self.data_dir, "auth": auth,
                                     "addr": "%s:%d" % (LOOPBACK, self.port)})
            self._process = Process([self.binary, "serve", self.config_path],
                                    self.log_path, cwd=self.workdir)
            try:
                wait_http(self.port, "/v2/", (200, 401), self._process)
            except SupportError as exc:  # maybe the port was taken
                last_error = exc
                self._process.stop()
                self._process = None
                if "address already in use" in str(exc):
                    continue
                raise
            self.host = "%s:%d" % (LOOPBACK, self.port)
            self.url = "http://" + self.host
            return self
        raise last_error

    def stop(self):
        """Stop the registry (and its token server)."""
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self.tokens is not None:
            self.tokens.stop()

    def alive(self):
        """True while the registry process runs."""
        return self._process is not None and self._process.alive()

    def client(self, username="pusher", password=None):
        """A RegistryClient; username None means anonymous, default is the
        pusher account (ignored by the anonymous flavour)."""
        if self.flavour == "anonymous" or username is None:
            return RegistryClient(self.url)
        if password is None:
            password = self.users[username]
        return RegistryClient(self.url, username, password)

    def access_log(self, settle=0.1):
        """Requests served so far, parsed from the access log: a list of
        dicts (method, path, status, size, user, agent), oldest first.

        The registry logs a request after answering it; settle is how long
        to wait for the log to stop growing.
        """
        size = -1
        deadline = time.time() + max(settle, 0) * 10
        while time.time() < deadline:
            new = os.path.getsize(self.log_path)
            if new == size:
                break
            size = new
            time.sleep(settle)
        entries = []
        with open(self.log_path, "rb") as logf:
            for line in logf:
                match = _ACCESS_RE.match(to_text(line, errors="replace"))
                if match:
                    entries.append({
                        "method": match.group(4), "path": match.group(5),
                        "status": int(match.group(6)),
                        "size": int(match.group(7)),
                        "user": match.group(2), "agent": match.group(9)})
        return entries

    def count(self, method=None, contains=None, since=0, settle=0.1):
        """Number of access-log entries matching method and substring
        contains, skipping the first `since` entries (use
        len(reg.access_log()) as a mark)."""
        return len([e for e in self.access_log(settle)[since:]
                    if (method is None or e["method"] == method) and
                    (contains is None or contains in e["path"])])

    def __repr__(self):
        return "<Registry %s %s>" % (self.flavour, self.url)


def start_registry(workdir, flavour="anonymous", **kwargs):
    """Create workdir if needed, start a Registry there, return it."""
    if not os.path.isdir(workdir):
        os.makedirs(workdir)
    return Registry(workdir, flavour, **kwargs).start()
