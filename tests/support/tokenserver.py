# -*- coding: utf-8 -*-
"""A Docker registry token server (the "auth: token" realm), for tests.

Protocol: GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]
with optional Basic credentials. (POST /token with an OAuth2 form
grant_type=password&username=..&password=..&service=..&scope=.. works too.)
Reply: {"token": JWT, "access_token": JWT, "expires_in": N, "issued_at": T}.

Grants: a known user (alice/secret1, the pusher) gets every action asked
for; an anonymous client gets "pull" on repositories whose name starts with
"public/" and nothing else; wrong credentials get 401.

The JWT is RS256, signed by the openssl command line, with the self-signed
certificate (openssl req -x509) in the header as "x5c" (default) or as a
libtrust "kid". docker-registry 2.8 (registry/auth/token/token.go) accepts
both: x5c is verified against the rootcertbundle; kid is looked up among the
rootcertbundle keys by libtrust fingerprint. Distribution 3.x uses RFC 7638
thumbprints for kid instead, so x5c is the portable choice.

Distribution adds a leeway of 60 s to "exp". To make a token really expire
after `lifetime` seconds the claim is exp = iat + lifetime - leeway, while
"expires_in" says `lifetime`.

The server runs in a thread of the test process; it records every request
(see .requests, .count(), and GET /stats which returns the same as JSON).
"""

from __future__ import print_function, absolute_import, division

import base64
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

from . import (LOOPBACK, BaseHTTPRequestHandler, HTTPServer, SupportError,
               ThreadingMixIn, parse_qs, to_bytes, to_text, urlsplit, which)

DEFAULT_USERS = {"alice": "secret1", "pusher": "pushsecret"}
SERVICE = "udocker-test-registry"
ISSUER = "udocker-test-issuer"
REGISTRY_LEEWAY = 60  # seconds docker-registry adds to "exp" and "nbf"

_DEFAULTS = {
    "lifetime": 300,          # seconds the registry accepts a token
    "leeway": REGISTRY_LEEWAY,
    "key_mode": "x5c",        # "x5c" or "kid" (libtrust fingerprint)
    "fields": ("token", "access_token", "expires_in", "issued_at"),
    "public_prefixes": ("public/",),
    "fail_status": None,      # answer this status ...
    "fail_count": 0,          # ... to this many next requests
}


def b64url(data):
    """Base64url without padding (JOSE)."""
    return to_text(base64.urlsafe_b64encode(data)).rstrip("=")


def _pem_body(pem_text, kind):
    """Return the DER bytes of the first PEM block of the given kind."""
    begin = "-----BEGIN %s-----" % kind
    end = "-----END %s-----" % kind
    start = pem_text.index(begin) + len(begin)
    return base64.b64decode(pem_text[start:pem_text.index(end, start)])


def libtrust_key_id(spki_der):
    """libtrust KeyID: base32 of the first 240 bits of sha256(SPKI DER),
    in 12 groups of 4 characters joined with ":"."""
    b32 = to_text(base64.b32encode(hashlib.sha256(spki_der).digest()[:30]))
    b32 = b32.rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


class SigningKey(object):
    """An RSA key and self-signed certificate made with the openssl CLI."""

    def __init__(self, workdir):
        self.openssl = which("openssl")
        if not self.openssl:
            raise SupportError("the openssl command is needed for token auth")
        self.key_path = os.path.join(workdir, "token-key.pem")
        self.cert_path = os.path.join(workdir, "token-cert.pem")
        self._run(["req", "-x509", "-newkey", "rsa:2048", "-nodes",
                   "-keyout", self.key_path, "-out", self.cert_path,
                   "-days", "3650", "-sha256",
                   "-subj", "/CN=udocker test token issuer"])
        with open(self.cert_path) as certf:
            self.cert_der = _pem_body(certf.read(), "CERTIFICATE")
        pubkey_pem = to_text(self._run(["x509", "-in", self.cert_path,
                                        "-pubkey", "-noout"]))
        self.key_id = libtrust_key_id(_pem_body(pubkey_pem, "PUBLIC KEY"))

    def _run(self, args, data=None):
        proc = subprocess.Popen([self.openssl] + args, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        out, err = proc.communicate(data)
        if proc.returncode != 0:
            raise SupportError("openssl %s failed: %s"
                               % (args[0], to_text(err, errors="replace")))
        return out

    def sign(self, data):
        """Return the RS256 (PKCS#1 v1.5, SHA-256) signature of data."""
        return self._run(["dgst", "-sha256", "-sign", self.key_path], data)

    def jwt(self, claims, key_mode="x5c"):
        """Return a compact JWS of claims signed with this key."""
        header = {"typ": "JWT", "alg": "RS256"}
        if key_mode == "x5c":
            header["x5c"] = [to_text(base64.b64encode(self.cert_der))]
        else:
            header["kid"] = self.key_id
        signing_input = "%s.%s" % (
            b64url(to_bytes(json.dumps(header, sort_keys=True))),
            b64url(to_bytes(json.dumps(claims, sort_keys=True))))
        return signing_input + "." + b64url(self.sign(to_bytes(signing_input)))


def parse_scope(scope):
    """"repository:a/b:pull,push" -> ("repository", "a/b", ["pull","push"])."""
    parts = scope.split(":")
    if len(parts) < 3:
        return None
    # names may contain ":" only in the registry:catalog:* form
    return parts[0], ":".join(parts[1:-1]), [a for a in parts[-1].split(",")
                                             if a]


class _Server(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        """Clients that hang up are not errors; report anything else."""
        if not isinstance(sys.exc_info()[1], (IOError, OSError,
                                              socket.error)):
            HTTPServer.handle_error(self, request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "udocker-test-tokens/1.0"

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass

    def _reply(self, status, payload, headers=()):
        body = to_bytes(json.dumps(payload))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        parts = urlsplit(self.path)
        if parts.path == "/stats":
            return self._reply(200, self.server.owner.stats())
        query = parse_qs(parts.query, keep_blank_values=True)
        return self._token(parts.path, query)

    def do_POST(self):  # noqa: N802
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(to_text(self.rfile.read(length)),
                        keep_blank_values=True)
        return self._token(parts.path, form)

    def _token(self, path, query):
        owner = self.server.owner
        status, payload, headers = owner.handle(
            self.command, path, query, self.headers.get("Authorization"))
        self._reply(status, payload, headers)


class TokenServer(object):
    """The token server; start() binds 127.0.0.1 on a free port."""

    def __init__(self, workdir, users=None, service=SERVICE, issuer=ISSUER,
                 **settings):
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.service = service
        self.issuer = issuer
        self.key = SigningKey(workdir)
        self.cert_path = self.key.cert_path
        self._lock = threading.Lock()
        self.requests = []
        self.settings = {}
        self.configure(**dict(_DEFAULTS, **settings))
        self._server = None
        self._thread = None
        self.url = self.host = self.realm = None

    # -- life cycle ----------------------------------------------------

    def start(self):
        """Start serving in a daemon thread; return self."""
        self._server = _Server((LOOPBACK, 0), _Handler)
        self._server.owner = self
        port = self._server.server_address[1]
        self.host = "%s:%d" % (LOOPBACK, port)
        self.url = "http://" + self.host
        self.realm = self.url + "/token"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                         kwargs={"poll_interval": 0.1})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self):
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- settings and statistics ---------------------------------------

    def configure(self, **settings):
        """Change settings at run time (see _DEFAULTS for the names)."""
        unknown = set(settings) - set(_DEFAULTS)
        if unknown:
            raise TypeError("unknown token server settings: %s"
                            % ", ".join(sorted(unknown)))
        with self._lock:
            self.settings.update(settings)

    def reset(self):
        """Restore the default settings and forget recorded requests."""
        with self._lock:
            self.settings = dict(_DEFAULTS)
            del self.requests[:]

    def count(self, path="/token", account=None):
        """Number of recorded requests for path (and account if given;
        account "" means anonymous)."""
        with self._lock:
            return len([r for r in self.requests if r["path"] == path and
                        (account is None or r["account"] == account)])

    def stats(self):
        """Counts per path plus every recorded request (JSON-able)."""
        with self._lock:
            counts = {}
            for req in self.requests:
                counts[req["path"]] = counts.get(req["path"], 0) + 1
            return {"counts": counts, "requests": list(self.requests)}

    # -- the protocol --------------------------------------------------

    def _account(self, authorization, form):
        """Return (account or "", error): "" is anonymous."""
        user = password = None
        if authorization and authorization.lower().startswith("basic "):
            try:
                raw = to_text(base64.b64decode(authorization[6:].strip()))
            except (TypeError, ValueError):
                return None, "malformed basic credentials"
            user, _, password = raw.partition(":")
        elif form.get("username"):
            user = form["username"][0]
            password = (form.get("password") or [""])[0]
        if user is None:
            return "", None
        if self.users.get(user) != password:
            return None, "invalid username or password"
        return user, None

    def _grant(self, account, scopes):
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, actions = parsed
            if account:
                allowed = actions
            elif rtype == "repository" and name.startswith(
                    tuple(self.settings["public_prefixes"])):
                allowed = [a for a in actions if a == "pull"]
            else:
                allowed = []
            access.append({"type": rtype, "name": name, "actions": allowed})
        return access

    def handle(self, method, path, query, authorization):
        """Answer one request: return (status, JSON payload, headers)."""
        scopes = []
        for value in query.get("scope", []):
            scopes.extend(s for s in value.split(" ") if s)
        service = (query.get("service") or [None])[0]
        account, error = self._account(authorization, query)
        record = {"time": time.time(), "method": method, "path": path,
                  "service": service, "scopes": scopes,
                  "account": account if account is not None else "?",
                  "authorization": bool(authorization)}
        with self._lock:
            settings = dict(self.settings)
            if settings["fail_count"] > 0:
                self.settings["fail_count"] -= 1
                fail = settings["fail_status"] or 503
            else:
                fail = None
            self.requests.append(record)
        if fail:
            record["status"] = fail
            return fail, {"errors": [{"code": "UNAVAILABLE",
                                      "message": "injected failure"}]}, ()
        if path != "/token":
            record["status"] = 404
            return 404, {"errors": [{"code": "NOT_FOUND"}]}, ()
        if error:
            record["status"] = 401
            return 401, {"errors": [{"code": "UNAUTHORIZED",
                                     "message": error}]}, \
                (("WWW-Authenticate", 'Basic realm="udocker-test-tokens"'),)
        # whole seconds: "exp" is rounded up so that a token lives at least
        # `lifetime` seconds (at most one more), not 0 to `lifetime`
        clock = time.time()
        now = int(clock)
        claims = {"iss": self.issuer, "sub": account, "aud": service or "",
                  "iat": now, "nbf": now,
                  "exp": int(math.ceil(clock)) + settings["lifetime"]
                  - settings["leeway"],
                  "jti": uuid.uuid4().hex,
                  "access": self._grant(account, scopes)}
        record["access"] = claims["access"]
        token = self.key.jwt(claims, settings["key_mode"])
        full = {"token": token, "access_token": token,
                "expires_in": settings["lifetime"],
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                           time.gmtime(now))}
        record["status"] = 200
        return 200, dict((k, full[k]) for k in settings["fields"]), ()


def main():
    """Run a token server in the foreground (for manual debugging):
    cd tests && python -m support.tokenserver"""
    import tempfile
    workdir = tempfile.mkdtemp(prefix="tokenserver-")
    server = TokenServer(workdir).start()
    print("realm %s  rootcertbundle %s" % (server.realm, server.cert_path))
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
