# -*- coding: utf-8 -*-
"""Local repository (section 5): upstream udocker 1.3.17 and udocker.py share one repository;
the work directories of killed commands (section 4's WorkDir) are swept, live ones never.

udocker 1.3.17 comes from PyPI, installed by .ci/run in a venv (UDOCKER_TEST_UPSTREAM
names its `udocker` command; default /opt/udocker-1.3.17/bin/udocker).
"""
from __future__ import print_function, absolute_import, division

import json
import os
import signal
import subprocess
import sys

import pytest

from support import REPO_ROOT, UDOCKER_SCRIPT, UPSTREAM_UDOCKER, required_file, wait_for
from support.images import Image, Layer, build_tar, docker_archive_files, f, with_parents

UPSTREAM = UPSTREAM_UDOCKER


@pytest.fixture
def upstream(udocker):
    """Run udocker 1.3.17 on the same UDOCKER_DIR/HOME as the `udocker` fixture."""
    required_file("UDOCKER_TEST_UPSTREAM", UPSTREAM_UDOCKER)

    if not os.path.isdir(udocker.home):
        os.makedirs(udocker.home)

    def run(*args):
        env = udocker.environ({"UDOCKER_TARBALL": ""})
        proc = subprocess.Popen([UPSTREAM] + list(args), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        out = proc.communicate()[0].decode("utf-8", "replace")
        return proc.returncode, out
    return run


def test_upstream_reads_what_we_pull(udocker, upstream, registry):
    udocker("pull", "--registry=http://" + registry.host, "test/multilayer").check()
    udocker("pull", "--registry=http://" + registry.host, "test/busybox-oci").check()
    rc, out = upstream("images", "-l")
    assert rc == 0 and "test/multilayer:latest" in out and "test/busybox-oci:latest" in out
    for name in ("test/multilayer", "test/busybox-oci"):
        rc, out = upstream("verify", name)
        assert rc == 0 and "image Ok" in out, out
        assert "Warning" not in out                     # our extra files are invisible
    rc, out = upstream("inspect", "test/multilayer")
    assert rc == 0 and json.loads(out[out.index("{"):])["config"]["WorkingDir"] == "/data"
    rc, out = upstream("rmi", "test/busybox-oci")
    assert rc == 0
    udocker("verify", "test/multilayer").check()


def test_we_read_what_upstream_pulls(udocker, upstream, registry):
    rc, out = upstream("pull", "--registry=http://" + registry.host, "test/multilayer")
    assert rc == 0, out
    res = udocker("images", "-l").check()
    assert "test/multilayer:latest    ." in res.out
    udocker("verify", "test/multilayer").check()
    config = json.loads(udocker("inspect", "test/multilayer").check().out)
    assert config["config"]["WorkingDir"] == "/data"
    mark = len(registry.access_log())
    udocker("pull", "--registry=http://" + registry.host, "test/multilayer").check()
    assert not [r for r in registry.access_log()[mark:] if "/blobs/" in r["path"]]
    udocker("verify", "test/multilayer").check()
    udocker("rmi", "test/multilayer").check()
    rc, out = upstream("images")
    assert "test/multilayer" not in out


def test_keystore_is_shared(udocker, upstream, registry_basic):
    rc, out = upstream("login", "--registry=" + registry_basic.url, "--username=alice",
                       "--password=secret1")
    assert rc == 0, out
    udocker("pull", "--registry=" + registry_basic.url, "test/busybox").check()
    udocker("logout", "--registry=" + registry_basic.url).check()
    udocker("login", "--registry=" + registry_basic.url, "--username=alice",
            "--password=secret1").check()
    rc, out = upstream("pull", "--registry=" + registry_basic.url, "test/multilayer")
    assert rc == 0, out


def test_upstream_protect_marker_is_ours(udocker, upstream, registry):
    udocker("pull", "--registry=http://" + registry.host, "test/busybox").check()
    rc, out = upstream("protect", "test/busybox")
    assert rc == 0
    res = udocker("rmi", "test/busybox")
    assert res.rc == 1 and "protected" in res.err
    udocker("unprotect", "test/busybox").check()
    rc, out = upstream("images")
    assert "test/busybox:latest    ." in out


def test_mkrepo_and_repo_option(udocker, tmpdir):
    target = str(tmpdir.join("newrepo"))
    udocker("mkrepo", target).check()
    for sub in ("repos", "layers", "containers", "bin", "lib", "doc"):
        assert os.path.isdir(os.path.join(target, sub))
    udocker("--repo=" + target, "images").check()
    res = udocker("mkrepo", target)
    assert res.rc == 1 and "not empty" in res.err
    res = udocker("--repo=" + str(tmpdir.join("nothere")), "images")
    assert res.rc == 1 and "not a udocker repository" in res.err


# -- work directories of killed commands ---------------------------------------------------

SWEPT = "removing the work directory of a killed command"


def child(code, **kw):
    """A Python process running code after `import udocker as ud` (the repository's)."""
    prelude = "import os, sys; sys.path.insert(0, %r); import udocker as ud\n" % REPO_ROOT
    return subprocess.Popen([sys.executable, "-c", prelude + code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def udocker_process(run, *args):
    """udocker.py ARGS started (not waited for), its stdin a pipe."""
    return subprocess.Popen([sys.executable, UDOCKER_SCRIPT] + list(args), env=run.environ(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def work_dirs(parent, kind):
    """Work directories (and lock files) of a kind in parent."""
    if not os.path.isdir(parent):
        return []
    return sorted(n for n in os.listdir(parent) if n.startswith("." + kind + "-"))


def killed(proc):
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def make_dead_work_dirs(parent, kind, count):
    """count work directories whose owner has exited without cleaning up (as if killed),
    each with a read-only directory inside; returns their paths."""
    proc = child("""
paths = []
for _ in range(%d):
    work = ud.WorkDir(%r, %r)
    os.makedirs(os.path.join(work.path, "ROOT", "ro", "sub"))
    open(os.path.join(work.path, "ROOT", "ro", "sub", "file"), "w").close()
    os.chmod(os.path.join(work.path, "ROOT", "ro", "sub"), 0o500)
    os.chmod(os.path.join(work.path, "ROOT", "ro"), 0o500)
    paths.append(work.path)
sys.stdout.write("\\n".join(paths))
sys.stdout.flush()
os._exit(0)
""" % (count, parent, kind))
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    paths = out.decode().split("\n")
    assert all(os.path.isdir(p) and os.path.isfile(p + ".lock") for p in paths)
    return paths


def live_work_dir(parent, kind):
    """(process, path): a process that holds a work directory until its stdin closes."""
    proc = child("""
work = ud.WorkDir(%r, %r)
open(os.path.join(work.path, "mine"), "w").close()
sys.stdout.write(work.path + "\\n")
sys.stdout.flush()
sys.stdin.read()
work.close()
""" % (parent, kind))
    return proc, proc.stdout.readline().decode().strip()


def test_killed_create_is_swept_by_the_next_create(udocker, registry):
    ref = "%s/test/multilayer" % registry.host
    udocker("pull", ref).check()
    containers = os.path.join(udocker.udocker_dir, "containers")
    config = os.path.join(udocker.udocker_dir, "layers",
                          registry.images["test/multilayer:latest"]["config"]["digest"])
    with open(config, "rb") as handle:
        saved = handle.read()
    os.unlink(config)
    os.mkfifo(config)              # create blocks reading it, after ROOT is complete
    proc = udocker_process(udocker, "create", ref)
    wait_for(lambda: any(os.path.exists(os.path.join(containers, n, ".udocker-py", "attrs"))
                         for n in work_dirs(containers, "create")), "create to flatten")
    killed(proc)
    left = work_dirs(containers, "create")
    assert len(left) == 2 and left[1] == left[0] + ".lock"
    os.chmod(os.path.join(containers, left[0], "ROOT"), 0o500)   # as a container may
    os.unlink(config)
    with open(config, "wb") as handle:
        handle.write(saved)
    res = udocker("create", ref).check()
    assert SWEPT in res.err and left[0] in res.err
    assert os.listdir(containers) == [res.out.strip()]


def test_killed_load_is_swept_and_a_live_one_is_not(udocker, tmpdir):
    layers_dir = os.path.join(udocker.udocker_dir, "layers")
    files = docker_archive_files([(Image([Layer([f("etc/big", "x" * (1 << 20))],
                                                compression=None)]), ["big:1"])])
    data = build_tar(with_parents([f(n, files[n]) for n in sorted(files)]))
    small = str(tmpdir.join("small.tar"))
    with open(small, "wb") as handle:
        handle.write(build_tar(with_parents([f(n, v) for n, v in sorted(docker_archive_files(
            [(Image([Layer([f("etc/small", "s")])]), ["small:1"])]).items())])))
    proc = udocker_process(udocker, "load")
    wait_for(lambda: work_dirs(layers_dir, "load"), "load to start")
    proc.stdin.write(data[:len(data) // 2])          # half an archive, stdin left open
    proc.stdin.flush()
    staging = os.path.join(layers_dir, work_dirs(layers_dir, "load")[0])
    wait_for(lambda: os.listdir(staging), "load to spool a member")
    res = udocker("load", "-i", small).check()       # sweeps layers/: the live one stays
    assert SWEPT not in res.err and os.listdir(staging)
    killed(proc)
    assert os.path.isdir(staging) and os.path.isfile(staging + ".lock")
    res = udocker("load", "-i", small).check()
    assert SWEPT in res.err and staging in res.err
    assert not work_dirs(layers_dir, "load") and not os.path.exists(staging + ".lock")
    assert sorted(res.out.split()) == ["small:1"]


def test_dead_owners_are_swept_by_rm_and_a_live_owner_never(udocker, registry):
    ref = "%s/test/busybox" % registry.host
    cid = udocker("create", ref).check().out.strip()
    containers = os.path.join(udocker.udocker_dir, "containers")
    holder, live = live_work_dir(containers, "create")
    dead = make_dead_work_dirs(containers, "clone-" + cid, 3)
    try:
        res = udocker("rm", cid).check()
        assert res.err.count(SWEPT) == 3 and live not in res.err
        assert not [p for p in dead if os.path.lexists(p) or os.path.lexists(p + ".lock")]
        assert os.listdir(live) == ["mine"]
        assert sorted(os.listdir(containers)) == [os.path.basename(live),
                                                  os.path.basename(live) + ".lock"]
    finally:
        holder.communicate()                         # the holder cleans up after itself
    assert holder.returncode == 0 and os.listdir(containers) == []


def test_concurrent_sweeps_and_owners(tmpdir):
    """Sweeps running at once remove each dead work directory exactly once, and never one
    whose owner is alive, even while owners come and go in the same directory."""
    parent = str(tmpdir.join("parent"))
    os.mkdir(parent)
    holder, live = live_work_dir(parent, "create")
    dead = make_dead_work_dirs(parent, "load", 40)
    owners = [child("""
for _ in range(150):
    with ud.WorkDir(%r, "import") as work:
        path = os.path.join(work.path, "data")
        with open(path, "w") as handle:
            handle.write("x")
        ud.sweep_work_dirs(os.path.dirname(work.path))
        assert os.path.isfile(path) and os.path.isfile(work.path + ".lock"), work.path
""" % parent) for _ in range(2)]
    sweepers = [child("""
for _ in range(150):
    ud.sweep_work_dirs(%r)
""" % parent) for _ in range(3)]
    results = [p.communicate() for p in owners + sweepers]
    errors = [e.decode() for _, e in results]
    assert [p.returncode for p in owners + sweepers] == [0] * 5, errors
    assert not [e for e in errors if "Warning" in e or "Traceback" in e], errors
    assert sum(e.count(SWEPT) for e in errors) == len(dead)
    for path in dead:
        assert sum(e.count(path + "\n") for e in errors) == 1, path
    assert sorted(os.listdir(parent)) == [os.path.basename(live),
                                          os.path.basename(live) + ".lock"]
    assert os.listdir(live) == ["mine"]
    holder.stdin.close()
    holder.wait()
    assert holder.returncode == 0 and os.listdir(parent) == []


def test_a_lock_file_unlinked_by_its_holder_is_taken_anew(tmpdir):
    """rm deletes .locks/container-ID.lock while holding it; a process that was waiting on
    it must then lock the file now at that path, not the unlinked one (or two processes
    would both hold 'the' lock)."""
    import threading
    import udocker
    path = os.path.join(str(tmpdir), "locks", "x.lock")
    holder = udocker.FileLock(path).acquire()
    waiter = udocker.FileLock(path)
    got = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire()))
    thread.daemon = True
    thread.start()
    inode = ":%d " % os.stat(path).st_ino           # /proc/locks: "-> FLOCK ... MAJ:MIN:INODE"
    wait_for(lambda: any(l.split()[1] == "->" and inode in l
                         for l in open("/proc/locks").read().splitlines()),
             "the waiter to block on the lock")
    holder.unlink()
    holder.release()
    thread.join(60)
    assert got == [waiter]
    held, there = os.fstat(waiter.fd), os.stat(path)
    assert (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)
    assert udocker.FileLock(path).acquire(wait=False) is None
    waiter.release()
