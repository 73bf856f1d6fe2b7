# -*- coding: utf-8 -*-
"""Shared pieces of the benchmarks (run by hand, never by the test suite).

- the benchmark image: a ~400 MB multi-layer image, deterministic from a seed, cached on disk
- a loopback docker-registry with the image pushed
- a WAN-like loopback proxy (latency per request, bandwidth cap per connection)
- udocker 1.3.17 from PyPI in a venv on the same interpreter
- timing of commands (wall, peak RSS) and a table of medians and ratios
"""

from __future__ import print_function, division

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
UDOCKER_PY = os.path.join(REPO_ROOT, "udocker.py")
CACHE = os.environ.get("BENCH_CACHE", os.path.join(REPO_ROOT, ".cache", "bench"))
PYTHON = os.environ.get("BENCH_PYTHON", "/usr/bin/python3")
UPSTREAM_VERSION = "1.3.17"
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

from support import registry as support_registry     # noqa: E402
from support import images as support_images         # noqa: E402


def log(text):
    sys.stderr.write("bench: %s\n" % text)
    sys.stderr.flush()


# -- the benchmark image --------------------------------------------------------------------

def _tar(entries):
    """entries: (name, kind, data_or_target, mode) -> uncompressed tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, payload, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            info.mode = mode
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = payload
                tar.addfile(info)
            elif kind == "hard":
                info.type = tarfile.LNKTYPE
                info.linkname = payload
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _gzip(data, level=6):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=level, mtime=0) as handle:
        handle.write(data)
    return buf.getvalue()


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega container layer image registry").split()


def bench_layers(seed=42, text_files=15000, blobs=6, blob_mib=64):
    """[(tar bytes, gzip level)] of the benchmark image, base layer first."""
    rng = random.Random(seed)
    layers = [(support_images.build_tar(support_images.with_parents(
        support_images.busybox_layer().entries)), 6)]
    entries = [("data", "dir", None, 0o755)]
    for i in range(text_files):
        directory = "data/d%03d" % (i // 100)
        if i % 100 == 0:
            entries.append((directory, "dir", None, 0o755))
        words = [rng.choice(WORDS) for _ in range(rng.randint(50, 600))]
        entries.append(("%s/f%05d.txt" % (directory, i), "file",
                        (" ".join(words) + "\n").encode("ascii"), 0o644))
    layers.append((_tar(entries), 6))
    for b in range(blobs):                      # incompressible, deterministic from the seed
        size = blob_mib << 20
        block = random.Random(seed * 1000 + b).getrandbits(8 * size).to_bytes(size, "little")
        layers.append((_tar([("blobs", "dir", None, 0o755),
                             ("blobs/blob%d.bin" % b, "file", block, 0o644)]), 1))
    links = [("links", "dir", None, 0o755)]
    for i in range(200):
        links.append(("links/s%03d" % i, "sym", "../data/d%03d/f%05d.txt" % (i % 150, i * 7),
                      0o777))
        links.append(("links/h%03d" % i, "hard", "data/d%03d/f%05d.txt" % (i % 150, i * 7 + 1),
                      0o644))
    layers.append((_tar(links), 6))
    wh = [("data", "dir", None, 0o755), ("data/d001", "dir", None, 0o755),
          ("data/d001/.wh..wh..opq", "file", b"", 0o644),
          ("data/d001/new.txt", "file", b"replaced\n", 0o644),
          ("data/d002/.wh.f00200.txt", "file", b"", 0o644),
          ("blobs/.wh.blob0.bin", "file", b"", 0o644)]
    layers.append((_tar(wh), 6))
    return layers


def bench_image(seed=42):
    """The benchmark image as a support.images.Image, cached under CACHE (first build ~1 min)."""
    directory = os.path.join(CACHE, "image-%d" % seed)
    index_path = os.path.join(directory, "layers.json")
    if not os.path.exists(index_path):
        log("building the benchmark image (seed %d) ..." % seed)
        tmp = directory + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        names = []
        for i, (tar, level) in enumerate(bench_layers(seed)):
            name = "layer%02d.tar.gz" % i
            with open(os.path.join(tmp, name), "wb") as handle:
                handle.write(_gzip(tar, level))
            with open(os.path.join(tmp, name + ".diffid"), "w") as handle:
                handle.write("sha256:" + hashlib.sha256(tar).hexdigest())
            names.append(name)
        with open(os.path.join(tmp, "layers.json"), "w") as handle:
            json.dump(names, handle)
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(tmp, directory)
    layers = []
    for name in json.load(open(index_path)):
        layer = PrebuiltLayer(os.path.join(directory, name))
        layers.append(layer)
    return support_images.Image(layers, config={"Cmd": ["sh"], "Env": ["PATH=/bin"]},
                                name="bench/big")


def big_layer_image(mib=1024, seed=7):
    """A one-layer image whose layer is one incompressible file of `mib` MiB (gzip level 1),
    cached under CACHE; built streaming, so the bench never holds the tar in memory."""
    directory = os.path.join(CACHE, "one-%dm-%d" % (mib, seed))
    path = os.path.join(directory, "layer00.tar.gz")
    if not os.path.exists(path + ".diffid"):
        log("building the %d MiB one-layer image ..." % mib)
        makedirs_quietly(directory)
        rng = random.Random(seed)
        tar_hash = hashlib.sha256()

        class Tee(object):                          # gzip writes here; tar bytes hashed
            def __init__(self, gz):
                self.gz = gz

            def write(self, data):
                tar_hash.update(data)
                self.gz.write(data)

        class Random(object):                       # the file's content, read by tarfile
            left = mib << 20

            def read(self, size):
                size = min(size, self.left, 16 << 20)
                self.left -= size
                return rng.getrandbits(8 * size).to_bytes(size, "little") if size else b""

        with gzip.GzipFile(path + ".tmp", mode="wb", compresslevel=1, mtime=0) as gz:
            tee = Tee(gz)
            with tarfile.open(fileobj=tee, mode="w|", format=tarfile.GNU_FORMAT) as tar:
                info = tarfile.TarInfo("big.bin")
                info.size, info.mtime, info.mode = mib << 20, 1700000000, 0o644
                tar.addfile(info, Random())
        os.rename(path + ".tmp", path)
        with open(path + ".diffid", "w") as handle:
            handle.write("sha256:" + tar_hash.hexdigest())
    return support_images.Image([PrebuiltLayer(path)], config={"Cmd": ["sh"]}, name="bench/one")


def makedirs_quietly(path):
    if not os.path.isdir(path):
        os.makedirs(path)


class PrebuiltLayer(object):
    """A gzip layer read from disk, with the attributes support.images expects of a Layer."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as handle:
            self.data = handle.read()
        self.diff_id = open(path + ".diffid").read().strip()
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        self.size = len(self.data)
        self.compression = "gzip"
        self.comment = os.path.basename(path)

    def media_type(self, kind):
        if kind == "oci":
            return "application/vnd.oci.image.layer.v1.tar+gzip"
        return "application/vnd.docker.image.rootfs.diff.tar.gzip"

    def blob(self, kind):
        return support_images.Blob(self.data, self.media_type(kind), self.digest)


def start_registry_with_image(workdir, seed=42, one_mib=0):
    """A loopback docker-registry holding bench/big:latest (and bench/one:latest, a single
    layer of one_mib MiB, when one_mib); returns (registry, image[, one-layer image])."""
    image = bench_image(seed)
    reg = support_registry.start_registry(workdir, "anonymous")
    log("pushing bench/big (%d MB) to %s" % (sum(l.size for l in image.layers) >> 20, reg.url))
    support_images.push_image(reg.client(), "bench/big", ["latest"], image)
    if not one_mib:
        return reg, image
    one = big_layer_image(one_mib)
    log("pushing bench/one (%d MB) to %s" % (one.layers[0].size >> 20, reg.url))
    support_images.push_image(reg.client(), "bench/one", ["latest"], one)
    one.layers[0].data = None                                 # 1 GB the bench need not keep
    return reg, image, one


# -- a WAN-like link ------------------------------------------------------------------------

class SlowProxy(object):
    """A loopback reverse proxy that adds `latency` seconds per request and caps each
    connection at `rate` bytes per second (both directions of the body it relays)."""

    def __init__(self, upstream, latency=0.040, rate=25e6):
        self.upstream = upstream            # "127.0.0.1:PORT"
        self.latency = latency
        self.rate = rate
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.host = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.url = "http://" + self.host
        self.stopped = False
        thread = threading.Thread(target=self._accept)
        thread.daemon = True
        thread.start()

    def _accept(self):
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,))
            thread.daemon = True
            thread.start()

    def _serve(self, client):
        """Relay bytes both ways; each new request head from the client waits `latency`."""
        host, port = self.upstream.split(":")
        upstream = socket.create_connection((host, int(port)))
        done = threading.Event()

        def pump(src, dst, throttle, delay_requests):
            sent, start = 0, time.time()
            try:
                while True:
                    data = src.recv(1 << 16)
                    if not data:
                        break
                    if delay_requests and (data.startswith(b"GET ") or
                                           data.startswith(b"HEAD ") or
                                           data.startswith(b"POST ") or
                                           data.startswith(b"PUT ")):
                        time.sleep(self.latency)
                    dst.sendall(data)
                    if throttle:
                        sent += len(data)
                        ahead = sent / self.rate - (time.time() - start)
                        if ahead > 0:
                            time.sleep(ahead)
            except OSError:
                pass
            finally:
                done.set()
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        up = threading.Thread(target=pump, args=(client, upstream, False, True))
        down = threading.Thread(target=pump, args=(upstream, client, True, False))
        for t in (up, down):
            t.daemon = True
            t.start()
        for t in (up, down):
            t.join()
        client.close()
        upstream.close()

    def stop(self):
        self.stopped = True
        self.sock.close()


# -- udocker 1.3.17 -------------------------------------------------------------------------

def upstream_udocker():
    """argv prefix running udocker 1.3.17: $BENCH_UPSTREAM, else the copy CI installs in
    /opt/udocker-1.3.17, else one from PyPI in a venv on PYTHON (installed once)."""
    for exe in (os.environ.get("BENCH_UPSTREAM"), "/opt/udocker-%s/bin/udocker" % UPSTREAM_VERSION):
        if exe and os.access(exe, os.X_OK):
            return [exe]
    venv = os.path.join(CACHE, "venv-udocker-%s" % UPSTREAM_VERSION)
    exe = os.path.join(venv, "bin", "udocker")
    if not os.path.exists(exe):
        log("installing udocker %s from PyPI into %s" % (UPSTREAM_VERSION, venv))
        subprocess.check_call([PYTHON, "-m", "venv", venv])
        subprocess.check_call([os.path.join(venv, "bin", "pip"), "install", "-q",
                               "udocker==%s" % UPSTREAM_VERSION])
    return [os.path.join(venv, "bin", "python"), exe]      # the venv's python is PYTHON


# -- measuring ------------------------------------------------------------------------------

def timed(argv, env=None, cwd=None, stdin=None):
    """(seconds, peak RSS in MB, exit code) of one command, via GNU time's %M."""
    seconds, _, rss, code = measured(argv, env, cwd, stdin)
    return seconds, rss, code


def measured(argv, env=None, cwd=None, stdin=None):
    """(wall seconds, CPU seconds user+sys, peak RSS in MB, exit code) of one command and
    the children it waited for, via GNU time (%M is the largest single process)."""
    out = os.path.join(CACHE, ".time.%d" % os.getpid())
    start = time.time()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M %U %S", "-o", out] + list(argv),
                            env=env, cwd=cwd, stdin=stdin, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, err = proc.communicate()
    seconds = time.time() - start
    try:
        fields = open(out).read().strip().splitlines()[-1].split()
        rss, cpu = int(fields[0]) / 1024.0, float(fields[1]) + float(fields[2])
    except (IOError, ValueError, IndexError):
        rss = cpu = float("nan")
    if proc.returncode != 0:
        log("command failed (%d): %s\n%s" % (proc.returncode, " ".join(argv),
                                             err.decode(errors="replace")[-2000:]))
    return seconds, cpu, rss, proc.returncode


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2.0


def table(title, rows, reference):
    """Print medians and ratios: rows = [(label, [seconds...], [rss...])]."""
    ref = median(dict((r[0], r[1]) for r in rows)[reference])
    print("\n%s" % title)
    print("  %-34s %10s %8s %10s %6s" % ("", "median", "ratio", "peak RSS", "runs"))
    for label, secs, rss in rows:
        med = median(secs)
        print("  %-34s %9.3fs %7.2fx %8.1f MB %6d" % (label, med, med / ref,
                                                       max(rss) if rss else float("nan"),
                                                       len(secs)))
    sys.stdout.flush()


def clean_env(udocker_dir, extra=None):
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
           "UDOCKER_DIR": udocker_dir, "UDOCKER_TARBALL": "", "UDOCKER_NOSYSCONF": "1",
           "LANG": "C.UTF-8"}
    env.update(extra or {})
    return env


def remove_later(path):
    """Delete a tree in the background (ext4 is slow to create files right after rm -rf)."""
    if os.path.exists(path):
        trash = path + ".trash.%d" % int(time.time() * 1000)
        os.rename(path, trash)
        subprocess.Popen(["rm", "-rf", trash])
