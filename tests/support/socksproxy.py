# -*- coding: utf-8 -*-
"""A small threaded SOCKS5 (RFC 1928, 1929) and SOCKS4/4a proxy on 127.0.0.1.

It records every CONNECT it was asked for (version, address type, host, port, user), can
demand a user name and password, refuse every CONNECT (reply 2), or stall; it connects to
what it is asked for and relays bytes. It stops by itself after `lifetime` seconds.
"""

from __future__ import print_function, absolute_import, division

import socket
import struct
import threading

ATYP_NAMES = {1: "ipv4", 3: "domain", 4: "ipv6"}


def _recv(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("client went away")
        data += chunk
    return data


def _recv_until_nul(sock):
    data = b""
    while not data.endswith(b"\x00"):
        data += _recv(sock, 1)
    return data[:-1]


def accept_in_thread(listener, serve):
    """Call serve(connection) in a thread of its own for each connection to listener, until
    listener is closed."""
    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except (OSError, socket.error):
                return
            thread = threading.Thread(target=serve, args=(conn,))
            thread.daemon = True
            thread.start()
    thread = threading.Thread(target=accept)
    thread.daemon = True
    thread.start()


def relay(one, other):
    """Copy bytes both ways between two sockets until either side closes; closes both."""
    def pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, socket.error):
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, socket.error):
                pass

    thread = threading.Thread(target=pump, args=(other, one))
    thread.daemon = True
    thread.start()
    pump(one, other)
    thread.join(60)
    one.close()
    other.close()


class SocksProxy(object):
    """users: {name: password} to demand RFC 1929 authentication; refuse: answer every
    CONNECT with reply 2 (not allowed); stall: accept and never answer."""

    def __init__(self, users=None, refuse=False, stall=False, lifetime=600):
        self.users, self.refuse, self.stall = users, refuse, stall
        self.asked = []             # one dict per CONNECT request
        self.auth = []              # (user, password) as received, text
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.host = "127.0.0.1:%d" % self.port
        self.timer = threading.Timer(lifetime, self.stop)
        self.timer.daemon = True
        self.timer.start()
        accept_in_thread(self.sock, self._serve)

    def url(self, scheme="socks5h", cred=""):
        return "%s://%s%s" % (scheme, cred + "@" if cred else "", self.host)

    def stop(self):
        self.timer.cancel()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, socket.error):
            pass
        self.sock.close()

    def _serve(self, client):
        client.settimeout(60)
        try:
            if self.stall:
                client.recv(1024)
                threading.Event().wait(30)
                return
            version = struct.unpack("B", _recv(client, 1))[0]
            target = self._socks5(client) if version == 5 else self._socks4(client)
            if target is not None:
                client.settimeout(None)
                relay(client, target)
        except (EOFError, OSError, socket.error):
            pass
        finally:
            client.close()

    def _connect(self, host, port):
        """(socket or None, SOCKS5 reply code) of connecting to host:port."""
        if self.refuse:
            return None, 2
        try:
            return socket.create_connection((host, port), 10), 0
        except socket.gaierror:
            return None, 4
        except (OSError, socket.error) as exc:
            return None, 5 if "refused" in str(exc).lower() else 4

    def _socks5(self, client):
        methods = bytearray(_recv(client, struct.unpack("B", _recv(client, 1))[0]))
        wanted = 2 if self.users is not None else 0
        if wanted not in methods:
            client.sendall(b"\x05\xff")
            return None
        client.sendall(struct.pack("BB", 5, wanted))
        if wanted == 2:
            _recv(client, 1)
            user = _recv(client, struct.unpack("B", _recv(client, 1))[0]).decode("utf-8")
            password = _recv(client, struct.unpack("B", _recv(client, 1))[0]).decode("utf-8")
            self.auth.append((user, password))
            if self.users.get(user) != password:
                client.sendall(b"\x01\x01")
                return None
            client.sendall(b"\x01\x00")
        _, command, _, atyp = struct.unpack("BBBB", _recv(client, 4))
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, _recv(client, 4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, _recv(client, 16))
        else:
            host = _recv(client, struct.unpack("B", _recv(client, 1))[0]).decode("ascii")
        port = struct.unpack(">H", _recv(client, 2))[0]
        self.asked.append({"version": 5, "atyp": ATYP_NAMES.get(atyp), "host": host,
                           "port": port, "command": command})
        target, reply = self._connect(host, port) if command == 1 else (None, 7)
        client.sendall(struct.pack("BBBB", 5, reply, 0, 1) + b"\x7f\x00\x00\x01\x00\x00")
        return target

    def _socks4(self, client):
        command, port = struct.unpack(">BH", _recv(client, 3))
        addr = _recv(client, 4)
        user = _recv_until_nul(client).decode("utf-8")
        if addr[:3] == b"\x00\x00\x00" and addr[3:] != b"\x00":
            host, atyp = _recv_until_nul(client).decode("ascii"), "domain"      # 4a
        else:
            host, atyp = socket.inet_ntoa(addr), "ipv4"
        self.asked.append({"version": 4, "atyp": atyp, "host": host, "port": port,
                           "command": command, "user": user})
        target, reply = self._connect(host, port)
        client.sendall(struct.pack(">BBH", 0, 90 if target else 91, 0) + b"\x00" * 4)
        return target
