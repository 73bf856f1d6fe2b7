# -*- coding: utf-8 -*-
"""What the tools installer's tests need from the network and the host.

    srv = ToolServer()                       # threaded HTTP server on 127.0.0.1
    srv.files["/t/udocker-tools-9.tar.gz"] = data
    srv.url + "/t/udocker-tools-9.tar.gz"
    srv.gets("/t/udocker-tools-9.tar.gz")    # how many GETs that path had
    srv.ranges                               # the Range headers received, in order
    srv.faults["/path"] = ["close-at:1000", "corrupt", "hangup", "delay:0.5"]
                                             # one fault per GET, in order, then normal
    srv.stop()

    refused_url("x.tar.gz")    # a loopback URL whose port refuses connections (held,
                               # bound, never listening: no other server can take it)
    path_without_engines(dir)  # a PATH of symlinks to the host's programs, minus every
                               # engine (proot, runc, crun, patchelf, fakechroot, ...)
"""

from __future__ import print_function, absolute_import, division

import os
import socket
import threading
import time

from . import BaseHTTPRequestHandler, HTTPServer, ThreadingMixIn

__all__ = ["ToolServer", "refused_url", "path_without_engines", "ENGINE_NAMES"]

# program names (and prefixes) that udocker.py could take from PATH as an engine
ENGINE_NAMES = ("proot", "runc", "crun", "patchelf", "fakechroot", "libfakechroot",
                "singularity", "apptainer")

_REFUSING = []


def refused_url(name):
    """http://127.0.0.1:PORT/NAME where PORT refuses every connection (ECONNREFUSED)."""
    if not _REFUSING:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))             # bound, not listening: the kernel refuses
        _REFUSING.append(sock)
    return "http://127.0.0.1:%d/%s" % (_REFUSING[0].getsockname()[1], name)


def path_without_engines(directory):
    """A directory of symlinks to the programs of /usr/local/bin, /usr/bin, /bin, /usr/sbin
    and /sbin except the engines; returns it (use it as the whole PATH)."""
    if not os.path.isdir(directory):
        os.makedirs(directory)
    for source in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        try:
            names = os.listdir(source)
        except OSError:
            continue
        for name in names:
            link = os.path.join(directory, name)
            if name.startswith(ENGINE_NAMES) or os.path.lexists(link):
                continue
            os.symlink(os.path.join(source, name), link)
    return directory


class _Threading(ThreadingMixIn, HTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass                        # a client that gave up (the tests' point), not news


class ToolServer(object):
    """A loopback HTTP server of files with Range support, request counts and faults."""

    def __init__(self):
        self.files = {}
        self.faults = {}
        self.requests = []          # (method, path) in order
        self.ranges = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server._serve(self)

            def log_message(self, *args):
                pass

        self.httpd = _Threading(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever)
        self.thread.daemon = True
        self.thread.start()

    def gets(self, path):
        with self.lock:
            return sum(1 for method, p in self.requests if method == "GET" and p == path)

    def _next_fault(self, path):
        with self.lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else ""

    def _serve(self, handler):
        path = handler.path
        with self.lock:
            self.requests.append(("GET", path))
        fault = self._next_fault(path)
        if fault.startswith("delay:"):
            time.sleep(float(fault.split(":")[1]))
        if fault == "hangup":                   # close without an answer
            handler.close_connection = True
            return
        body = self.files.get(path)
        if body is None:
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if fault == "corrupt":
            damaged = bytearray(body)
            damaged[len(body) // 2] ^= 0xff
            body = bytes(damaged)
        start = 0
        wanted = handler.headers.get("Range")
        with self.lock:
            self.ranges.append(wanted)
        if wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[len("bytes="):-1])
            if start >= len(body):
                handler.send_response(416)
                handler.send_header("Content-Range", "bytes */%d" % len(body))
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", "bytes %d-%d/%d"
                                % (start, len(body) - 1, len(body)))
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(len(body) - start))
        handler.end_headers()
        if fault.startswith("close-at:"):       # a transfer cut short
            handler.wfile.write(body[start:int(fault.split(":")[1])])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(body[start:])

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
