# -*- coding: utf-8 -*-
"""A loopback reverse proxy in front of a registry that misbehaves on cue.

    proxy = FaultProxy(registry.url).start()     # proxy.url, proxy.host
    proxy.set(mode="reset", after_bytes=1000, count=1)
    ... pull through proxy.url ...
    proxy.requests          # [{"method", "path", "range", "status",
                            #   "sent", "length", "fault", "error"}, ...]
    proxy.reset()           # back to mode "pass", records cleared
    proxy.stop()

Faults apply to requests whose method is in `methods` (default GET) and
whose path contains `match` (default "/blobs/"); `skip` lets the first N
such requests pass unharmed, then `count` limits a fault to the next K
(None: all of them). Modes:

    pass      forward unchanged
    status    answer `status` (e.g. 500, 429, 503) without asking upstream,
              with Retry-After: `retry_after` if given (any text: "-1", a date)
    reset     send the headers and `after_bytes` body bytes, then reset the
              connection (TCP RST)
    truncate  the same but close normally (FIN): a short body
    drop      reset the connection before sending anything
    stall     sleep `seconds` before the response (where="before") or after
              `after_bytes` body bytes (where="mid"), then finish normally
    corrupt   flip one byte of the body (at `offset`, default the middle)

Range: with range="honour" (default) a client's Range header is forwarded
and the registry answers 206 with Content-Range; with range="ignore" the
proxy strips Range (and If-Range) from matching requests, so the answer is
200 with the full body. Both settings are independent of the fault mode.

Requests go upstream with the client's Host header, so URLs the registry
builds (upload Locations) point back at the proxy. Each upstream request
uses a fresh connection and the body is read completely before the reply.

Records: "range" is the client's Range header, "status" what the client was
sent (0 for drop), "length" the upstream body size, "sent" the body bytes
written to the client (set just before writing, so a test that has read
the reply sees final values), "error" a write error (client gone) or None.

Connections: HTTP/1.1 keep-alive by default (several requests per client
connection); FaultProxy(url, keepalive=False) answers "Connection: close"
and closes after every response. A faulted connection is always closed.
"""

from __future__ import print_function, absolute_import, division

import io
import json
import socket
import struct
import sys
import threading
import time

from . import (LOOPBACK, BaseHTTPRequestHandler, HTTPServer, ThreadingMixIn,
               httplib, to_bytes, urlsplit)

MODES = ("pass", "status", "reset", "truncate", "drop", "stall", "corrupt")
_DEFAULTS = {"mode": "pass", "count": None, "after_bytes": 0, "status": 500,
             "retry_after": None, "seconds": 0.0, "where": "before",
             "offset": None, "range": "honour", "match": "/blobs/",
             "methods": ("GET",), "skip": 0}
_HOP_BY_HOP = set(["connection", "keep-alive", "proxy-authenticate",
                   "proxy-authorization", "te", "trailer", "trailers",
                   "transfer-encoding", "upgrade", "proxy-connection"])


class _Server(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        """Clients that hang up are expected here; report anything else."""
        if not isinstance(sys.exc_info()[1], (IOError, OSError,
                                              socket.error)):
            HTTPServer.handle_error(self, request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "udocker-test-faultproxy/1.0"
    timeout = 120  # idle keep-alive connections end after this

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):  # noqa: N802
        self._proxy()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    # -- helpers -------------------------------------------------------

    def _read_body(self):
        length = self.headers.get("Content-Length")
        if length:
            return self.rfile.read(int(length))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return None

    def _abort(self, rst=True):
        """End the connection now: RST (linger 0) or a normal FIN."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except (IOError, OSError, socket.error):
            pass
        try:
            if rst:
                self.connection.setsockopt(socket.SOL_SOCKET,
                                           socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.rfile.close()
                self.wfile.close()
                self.connection.close()  # the last reference: RST now
                self.wfile = io.BytesIO()  # for the handler's final flush
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except (IOError, OSError, socket.error):
            pass

    def _send_head(self, status, headers, length):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        if not self.server.owner.keepalive:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    # -- the proxy -----------------------------------------------------

    def _proxy(self):
        owner = self.server.owner
        body = self._read_body()
        settings, fault = owner._take(self.command, self.path)
        record = {"time": time.time(), "method": self.command,
                  "path": self.path, "range": self.headers.get("Range"),
                  "status": None, "sent": 0, "length": None,
                  "fault": fault, "error": None}
        owner._record(record)
        try:
            self._respond(owner, settings, fault, body, record)
        except (IOError, OSError, socket.error) as exc:
            record["error"] = str(exc)  # the client went away
            self.close_connection = True
            self.wfile = io.BytesIO()  # drop what Python 2 still buffers

    def _respond(self, owner, settings, fault, body, record):
        """Reply to one request; record's fields are set before writing."""
        if fault == "drop":
            record["status"] = 0
            return self._abort()
        if fault == "status":
            payload = to_bytes(json.dumps({"errors": [{
                "code": "UNAVAILABLE", "message": "injected %d"
                % settings["status"]}]}))
            headers = [("Content-Type", "application/json")]
            if settings["retry_after"] is not None:
                headers.append(("Retry-After", str(settings["retry_after"])))
            record["status"] = settings["status"]
            if self.command == "HEAD":
                return self._send_head(settings["status"], headers, None)
            record["sent"] = len(payload)
            self._send_head(settings["status"], headers, len(payload))
            return self.wfile.write(payload)
        if fault == "stall" and settings["where"] == "before":
            owner._sleep(settings["seconds"])
        status, headers, data = self._forward(body, settings)
        record["status"] = status
        if data is None:  # HEAD: keep upstream's Content-Length
            return self._send_head(status, headers, None)
        record["length"] = len(data)
        if fault == "corrupt" and data:
            pos = settings["offset"]
            pos = len(data) // 2 if pos is None else min(pos, len(data) - 1)
            buf = bytearray(data)
            buf[pos] ^= 0xFF
            data = bytes(buf)
        cut = settings["after_bytes"]
        if fault in ("reset", "truncate"):
            record["sent"] = len(data[:cut])
            self._send_head(status, headers, len(data))
            self.wfile.write(data[:cut])
            return self._abort(rst=fault == "reset")
        record["sent"] = len(data)
        self._send_head(status, headers, len(data))
        if fault == "stall" and settings["where"] == "mid":
            self.wfile.write(data[:cut])
            self.wfile.flush()
            owner._sleep(settings["seconds"])
            data = data[cut:]
        return self.wfile.write(data)

    def _forward(self, body, settings):
        """Send the request upstream; return (status, headers, body)."""
        owner = self.server.owner
        headers = {}
        for name, value in self.headers.items():
            if name.lower() in _HOP_BY_HOP:
                continue
            if name.lower() in ("range", "if-range") and \
                    settings["range"] == "ignore" and \
                    owner._matches(settings, self.command, self.path):
                continue
            headers[name] = value
        if body is not None:
            headers["Content-Length"] = str(len(body))
        conn = httplib.HTTPConnection(owner.upstream_host,
                                      owner.upstream_port, timeout=300)
        try:
            conn.request(self.command, self.path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(n, v) for n, v in resp.getheaders()
                   if n.lower() not in _HOP_BY_HOP and
                   n.lower() not in ("content-length", "date", "server")]
            if self.command == "HEAD":
                length = resp.getheader("Content-Length")
                if length is not None:
                    out.append(("Content-Length", length))
                data = None
            return resp.status, out, data
        finally:
            conn.close()


class FaultProxy(object):
    """See the module docstring."""

    def __init__(self, upstream_url, keepalive=True):
        parts = urlsplit(upstream_url)
        self.upstream_url = upstream_url.rstrip("/")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.keepalive = keepalive
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._records = []
        self._settings = dict(_DEFAULTS)
        self._left = None
        self._skip = 0
        self._server = None
        self.url = self.host = self.port = None

    def start(self):
        """Listen on 127.0.0.1:<free port> in a daemon thread; return self."""
        self._server = _Server((LOOPBACK, 0), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self.host = "%s:%d" % (LOOPBACK, self.port)
        self.url = "http://" + self.host
        thread = threading.Thread(target=self._server.serve_forever,
                                  kwargs={"poll_interval": 0.1})
        thread.daemon = True
        thread.start()
        return self

    def stop(self):
        """Stop listening; stalled replies wake up and finish."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- configuration -------------------------------------------------

    def set(self, **settings):
        """Change the behaviour (names as in the module docstring); the
        settings not given return to their defaults."""
        unknown = set(settings) - set(_DEFAULTS)
        if unknown:
            raise TypeError("unknown fault proxy settings: %s"
                            % ", ".join(sorted(unknown)))
        new = dict(_DEFAULTS, **settings)
        if new["mode"] not in MODES:
            raise ValueError("mode must be one of %s" % (MODES,))
        if new["range"] not in ("honour", "ignore"):
            raise ValueError("range must be honour or ignore")
        with self._lock:
            self._settings = new
            self._left = new["count"]
            self._skip = new["skip"]

    def reset(self):
        """Mode "pass", default settings, records cleared."""
        self.set()
        self.clear()

    def clear(self):
        """Forget the recorded requests."""
        with self._lock:
            del self._records[:]

    @property
    def requests(self):
        """A copy of the recorded requests, oldest first."""
        with self._lock:
            return [dict(r) for r in self._records]

    def blob_requests(self, method="GET"):
        """Recorded requests for blobs with the given method."""
        return [r for r in self.requests
                if r["method"] == method and "/blobs/" in r["path"]]

    # -- used by the handler -------------------------------------------

    @staticmethod
    def _matches(settings, method, path):
        return method in settings["methods"] and settings["match"] in path

    def _take(self, method, path):
        """Return (settings, fault mode or None) for one request."""
        with self._lock:
            settings = dict(self._settings)
            if settings["mode"] == "pass" or \
                    not self._matches(settings, method, path):
                return settings, None
            if self._skip > 0:
                self._skip -= 1
                return settings, None
            if self._left is not None:
                if self._left <= 0:
                    return settings, None
                self._left -= 1
            return settings, settings["mode"]

    def _record(self, record):
        with self._lock:
            self._records.append(record)

    def _sleep(self, seconds):
        self._stopping.wait(seconds)
