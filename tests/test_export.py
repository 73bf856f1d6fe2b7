"""Containers in and out as tarballs: import --tocontainer (a root file system tarball),
export (ROOT with the owners and modes the image asked for), export --clone / import --clone
(a whole container directory), hostile and broken tarballs, and udocker 1.3.17 reading what
we write and the other way round.

Layers and the hostile corpus come from tests/test_create.py; udocker.py runs as a
subprocess (Env.run) or in process where only the extraction is under test.
"""
from __future__ import print_function, absolute_import

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile

import pytest

import udocker
from test_create import (Env, Image, busybox_layer, compress, d, entry, env, f, hard,  # noqa
                         hardlink_layers, have, hostile_images, odd_layers, sym, tar_bytes,
                         tree, whiteout_layers)

UPSTREAM = ([p for p in (os.environ.get("UDOCKER_TEST_UPSTREAM"),
                         "/opt/udocker-1.3.17/bin/udocker") if p and os.access(p, os.X_OK)]
            or [""])[0]
needs_upstream = pytest.mark.skipif(not UPSTREAM, reason="udocker 1.3.17 not installed "
                                    "(set UDOCKER_TEST_UPSTREAM)")
ID_RE = udocker.ContainerStore.ID_RE


# -- helpers

def ok(env, *args, **kw):
    rc, out, err = env.run(*args, **kw)
    assert rc == 0, err
    return out


def new_id(out):
    cid = out.decode().strip()
    assert out.decode() == cid + "\n" and ID_RE.match(cid), out
    return str(cid)


def one_line_error(result, needle):
    rc, out, err = result
    assert rc == 1 and out == b"", (rc, out, err)
    lines = [l for l in err.splitlines() if not l.startswith(("Info:", "Warning:"))]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], err


def write(path, data):
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


def members(data):
    """{name: (type, mode, uid, gid, payload)} of a tar; hardlinks resolved to their target
    (payload: sha256 of the data, the symlink target, or None)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        found, links = {}, {}
        for member in archive.getmembers():
            payload = None
            if member.isreg():
                payload = hashlib.sha256(archive.extractfile(member).read()).hexdigest()
            elif member.issym():
                payload = member.linkname
            elif member.islnk():
                links[member.name] = member.linkname
                continue
            found[member.name] = (member.type, member.mode, member.uid, member.gid, payload)
    for name, target in links.items():
        found[name] = found[target]
    return found



# ==== export

def test_export_of_unreadable_and_read_only_directories(env):
    env.add("bb", Image([busybox_layer() + [d("locked"), f("locked/in", b"in"),
                                            d("noexec"), f("noexec/in", b"in"),
                                            d("ro"), f("ro/in", b"in"), f("unreadable", b"u"),
                                            d("wonly")]]))
    cid = env.create("bb", name="bb")
    root = env.root(cid)
    modes = {"locked": 0o000, "noexec": 0o600, "ro": 0o555, "unreadable": 0o000,
             "wonly": 0o300}
    for name, mode in modes.items():
        os.chmod(os.path.join(root, name), mode)
    try:
        for args in (["export", "-", "bb"], ["export", "--clone", "-", "bb"]):
            found = members(ok(env, *args))
            prefix = "./ROOT/" if "--clone" in args else "./"
            for name, mode in modes.items():
                assert found[prefix + name][1] == mode, name
            assert found[prefix + "locked/in"][4] == hashlib.sha256(b"in").hexdigest()
            assert prefix + "noexec/in" in found and prefix + "ro/in" in found
            for name, mode in modes.items():                 # put back as they were
                assert stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode) == mode
    finally:
        for name in modes:
            os.chmod(os.path.join(root, name), 0o700)
