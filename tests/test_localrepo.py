# -*- coding: utf-8 -*-
"""Local repository (section 5): upstream udocker 1.3.17 and udocker.py share one repository;
the work directories of killed commands (section 4's WorkDir) are swept, live ones never;
what killed pulls and rmi leave in layers/ is swept too (LocalRepository.sweep, rmi --prune,
verify's report); create, run and verify racing an rmi say so.

udocker 1.3.17 comes from PyPI, installed by .ci/run in a venv (UDOCKER_TEST_UPSTREAM
names its `udocker` command; default /opt/udocker-1.3.17/bin/udocker).
"""
from __future__ import print_function, absolute_import, division

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import udocker as ud
from support import (REPO_ROOT, UDOCKER_SCRIPT, UPSTREAM_UDOCKER, one_error_line,
                     required_file, wait_for)
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
    proc = udocker.start("create", ref)
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
    proc = udocker.start("load")
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


def test_killed_import_is_reported_and_swept_by_the_next_command(udocker, tmpdir):
    """A killed import's (or load's) staging in layers/ is a leftover verify names with its
    size, and the next command that sweeps (a dead writer: create) removes it; before,
    only the next load or import did, and verify said there were no leftovers."""
    no_grace(udocker)
    load_small(udocker, tmpdir)
    layers_dir = os.path.join(udocker.udocker_dir, "layers")
    data = build_tar(with_parents([f("etc/big", "x" * (1 << 20))]))
    proc = udocker.start("import", "-", "imp:1")
    proc.stdin.write(data[:len(data) // 2])          # half a tarball, stdin left open
    proc.stdin.flush()
    wait_for(lambda: any(os.listdir(os.path.join(layers_dir, n)) for n in
                         work_dirs(layers_dir, "import") if not n.endswith(".lock")),
             "import to stage the tarball")
    killed(proc)
    staging = [os.path.join(layers_dir, n) for n in work_dirs(layers_dir, "import")]
    res = udocker("-D", "verify")
    assert "leftovers of killed commands: " in res.err and "no leftovers" not in res.err, res
    assert "leftover: %s (" % staging[0] in res.err, res
    res = udocker("create", "small:1").check()
    assert SWEPT in res.err and staging[0] in res.err, res
    assert work_dirs(layers_dir, "import") == []
    assert_only_what_tags_use(udocker)


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


def test_atomic_file_appears_whole_or_not_at_all(tmpdir):
    """write_atomic, save and export write through AtomicFile: the file appears with its
    mode only when the writing ended well, and no temp file stays either way."""
    top = str(tmpdir)
    path = os.path.join(top, "out")
    with pytest.raises(ZeroDivisionError):
        with ud.AtomicFile(path) as handle:
            handle.write(b"half")
            1 / 0
    assert os.listdir(top) == []
    ud.write_atomic(path, u"whole", mode=0o600)
    assert open(path, "rb").read() == b"whole" and os.stat(path).st_mode & 0o777 == 0o600
    old = os.umask(0o027)
    try:
        with ud.AtomicFile(path, None, sync=False) as handle:
            handle.write(b"new")
    finally:
        os.umask(old)
    assert open(path, "rb").read() == b"new" and os.stat(path).st_mode & 0o777 == 0o640
    with pytest.raises(ud.UsageError):                  # save's: never replace a file
        with ud.AtomicFile(path, publish=ud._publish_new) as handle:
            handle.write(b"other")
    assert os.listdir(top) == ["out"] and open(path, "rb").read() == b"new"
    with ud.AtomicFile(os.path.join(top, "new"), publish=ud._publish_new) as handle:
        handle.write(b"linked")
    assert sorted(os.listdir(top)) == ["new", "out"]


def test_replace_with_and_its_users_leave_no_temp_name(tmpdir):
    """replace_with (symlink_atomic, store_blob, the tools' copy across file systems):
    the new content appears by rename; a stale temp name is cleared first; a failure
    leaves the old path as it was and no temp name."""
    top = str(tmpdir)
    link = os.path.join(top, "link")
    ud.symlink_atomic("one", link)
    ud.symlink_atomic("two", link)                     # replaces
    assert os.readlink(link) == "two" and os.listdir(top) == ["link"]

    def fail(tmp):
        os.symlink("three", tmp)
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        ud.replace_with(link, fail)
    assert os.readlink(link) == "two" and os.listdir(top) == ["link"]
    stale = os.path.join(top, "stale")
    with open(stale, "w") as handle:
        handle.write("left by a killed process")
    ud.replace_with(os.path.join(top, "file"), lambda tmp: os.symlink("x", tmp), stale)
    assert sorted(os.listdir(top)) == ["file", "link"]
    cfg = ud.Config.load({"UDOCKER_DIR": os.path.join(top, "ud"), "HOME": top,
                          "UDOCKER_NOSYSCONF": "1"}, {})
    repo = ud.LocalRepository(cfg)
    repo.create()
    source = os.path.join(top, "blob")
    with open(source, "wb") as handle:
        handle.write(b"data")
    digest = "sha256:" + "0" * 64
    assert repo.store_blob(source, digest) is True and repo.store_blob(source, digest) is False
    assert open(repo.blob_path(digest), "rb").read() == b"data"
    assert os.stat(repo.blob_path(digest)).st_mode & 0o777 == 0o644
    assert [n for n in os.listdir(repo.layersdir) if n.startswith(".")] == []
    shm = "/dev/shm"                                   # the tools' move across file systems
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and \
            os.stat(shm).st_dev != os.stat(top).st_dev:
        src = os.path.join(shm, "udocker-test-move-%d" % os.getpid())
        with open(src, "wb") as handle:
            handle.write(b"tool")
        try:
            dest = os.path.join(top, "bin", "tool")
            ud._move_into_place(src, dest)
        finally:
            ud.remove_quietly(src)
        assert open(dest, "rb").read() == b"tool" and os.listdir(os.path.dirname(dest)) == ["tool"]


KILL_OUTPUT = r"""
import signal
real_enter = ud.OutputFile.__enter__

def enter(self):
    handle = real_enter(self)
    handle.write(b"half an archive")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

ud.OutputFile.__enter__ = enter
sys.exit(ud.main(%r))
"""


@pytest.mark.parametrize("command", ["save", "export"])
def test_killed_save_or_export_partial_goes_with_the_next(udocker, tmpdir, command):
    """save -o and export -o write a temp file beside the output, outside the repository:
    a killed one left it for good (.tmp-XXXXXX); now the next command writing that file
    removes it, and never the partial output of one still writing."""
    load_small(udocker, tmpdir)
    out_dir = tmpdir.join("out").ensure(dir=True)
    output = str(out_dir.join("o.tar"))
    argv = ["save", "-o", output, "small:1"] if command == "save" else \
        ["export", "-o", output, udocker("create", "small:1").check().out.strip()]
    live = child("""
with ud.OutputFile(%r, None) as handle:
    sys.stdout.write("locked\\n")
    sys.stdout.flush()
    sys.stdin.read()
""" % str(out_dir.join("o.tar")))
    assert live.stdout.readline() == b"locked\n"
    held = os.listdir(str(out_dir))
    proc = child(KILL_OUTPUT % (argv,), env=udocker.environ())
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, err
    left = [n for n in os.listdir(str(out_dir)) if n not in held]
    assert len(left) == 1 and left[0].startswith(".o.tar.partial-"), left
    res = udocker(*argv).check()
    assert "removing the partial output of a killed command: %s" \
        % os.path.join(str(out_dir), left[0]) in res.err, res
    assert sorted(os.listdir(str(out_dir))) == sorted(held + ["o.tar"])
    live.communicate()                              # the live writer still publishes
    assert live.returncode == 0 and os.listdir(str(out_dir)) == ["o.tar"]


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


# -- what killed pulls, segmented pulls and rmi leave ---------------------------------------
# Each kill happens at a moment seen on the file system (polled, no sleeps) or at a chosen
# step (the process kills itself); then one ordinary command (create takes the repository
# lock) must leave exactly what the tags use.

SPLIT = "pull_split_size = 200000\npull_segment_size = 65536\npull_split_rate = inf\n"
LEFT = "left by killed commands"


def no_grace(run, extra=""):
    """udocker.conf with sweep_grace = 0: what killed commands left goes at once."""
    if not os.path.isdir(run.udocker_dir):
        os.makedirs(run.udocker_dir)
    with open(os.path.join(run.udocker_dir, "udocker.conf"), "w") as handle:
        handle.write("[DEFAULT]\nsweep_grace = 0\n" + extra)


def load_small(run, tmpdir):
    """small:1, a loaded one-layer image that shares no blob with the registry's."""
    path = str(tmpdir.join("small.tar"))
    with open(path, "wb") as handle:
        handle.write(build_tar(with_parents([f(n, v) for n, v in sorted(docker_archive_files(
            [(Image([Layer([f("etc/small", "s")])]), ["small:1"])]).items())])))
    run("load", "-i", path).check()


def tag_blobs(run):
    """{blob name: size} of what the tags under repos/ link to."""
    used = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(run.udocker_dir, "repos")):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]     # not tags
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                used[os.path.basename(os.readlink(path))] = os.path.getsize(path)
    return used


def assert_only_what_tags_use(run):
    """layers/ holds the tags' blobs and nothing else (its du is their size); no writer
    lock, work directory or record of a removed tag is left; verify says so."""
    top = run.udocker_dir
    used = tag_blobs(run)
    layers = os.path.join(top, "layers")
    assert sorted(os.listdir(layers)) == sorted(used)
    du = sum(os.lstat(os.path.join(d, n)).st_size
             for d, _, names in os.walk(layers) for n in names)
    assert du == sum(used.values())
    assert [n for n in os.listdir(os.path.join(top, ".locks")) if n.startswith(".")] == []
    for dirpath, dirnames, filenames in os.walk(os.path.join(top, "repos")):
        for name in dirnames + filenames:
            if name.startswith("."):                 # only the records of existing tags
                assert name.endswith(".json") and os.path.isfile(
                    os.path.join(dirpath, name[1:-5], "TAG")), os.path.join(dirpath, name)
    res = run("verify").check()
    assert "no leftovers of killed commands" in res.err and "Warning" not in res.err, res


def multilayer_blobs(registry):
    """The blobs of test/multilayer, the largest (the busybox layer) first."""
    info = registry.images["test/multilayer:latest"]
    return [l["digest"] for l in info["layers"]] + [info["config"]["digest"]]


@pytest.mark.parametrize("point", ["blobs-done", "mid-blob", "segments"])
def test_killed_pull_leaves_nothing_after_one_command(udocker, registry, fault_proxy,
                                                      tmpdir, point):
    no_grace(udocker, SPLIT if point == "segments" else "")
    load_small(udocker, tmpdir)
    layers = os.path.join(udocker.udocker_dir, "layers")
    digests = multilayer_blobs(registry)
    big = digests[0]
    partial = os.path.join(layers, "." + big + ".partial")
    if point == "blobs-done":                    # the others are in, the big one not begun
        fault_proxy.set(mode="stall", where="before", seconds=600, match=big)
    elif point == "mid-blob":
        fault_proxy.set(mode="stall", where="mid", after_bytes=200000, seconds=600,
                        match=big)
    else:                                        # two segments in, the others stalled
        fault_proxy.set(mode="stall", where="before", seconds=600, match=big, skip=2)
    proc = udocker.start("pull", "--registry=" + fault_proxy.url,
                         "test/multilayer")
    if point == "segments":      # (its segments take every connection: no small blob yet)
        wait_for(lambda: os.path.exists(partial + ".json"), "a segment record")
    else:
        wait_for(lambda: all(os.path.exists(os.path.join(layers, d)) for d in digests[1:]),
                 "the small blobs")
    if point == "mid-blob":      # (its bytes may still wait in a read buffer)
        wait_for(lambda: os.path.exists(partial), "the big blob's partial file")
    killed(proc)
    left = set(os.listdir(layers))
    if point != "segments":
        assert set(digests[1:]) <= left                  # complete blobs, no tag
    if point != "blobs-done":
        assert os.path.basename(partial) in left
    with open(os.path.join(layers, ".tmp-killed00"), "wb") as handle:
        handle.write(b"half a segment record")          # as a kill inside write_atomic
    res = udocker("create", "small:1").check()
    assert LEFT in res.err, res
    assert_only_what_tags_use(udocker)
    fault_proxy.reset()                                  # and the image still comes whole
    udocker("pull", "--registry=" + fault_proxy.url, "test/multilayer").check()
    udocker("verify", "test/multilayer").check()
    assert_only_what_tags_use(udocker)


KILL_RMI = r"""
import signal
point, layers = sys.argv[1], sys.argv[2]
real_rename, real_unlink = os.rename, os.unlink

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def rename(src, dst):
    real_rename(src, dst)
    if point == "tag-renamed" and "/.rmi-" in dst:
        kill()

def unlink(path, *args, **kw):
    blob = os.path.dirname(str(path)) == layers
    in_tag = "dir_fd" in kw or "/.rmi-" in str(path)       # rmtree of the renamed tag
    if blob and point == "first-blob":
        kill()
    real_unlink(path, *args, **kw)
    if (blob and point == "one-blob-gone") or (in_tag and point == "tag-half-gone"):
        kill()

for module in set([os, ud.os]):       # udocker.py's own os (LeanOs) and shutil's
    module.rename, module.unlink, module.remove = rename, unlink, unlink
sys.exit(ud.main(["rmi", "test/multilayer"]))
"""


@pytest.mark.parametrize("point", ["tag-renamed", "tag-half-gone", "first-blob",
                                   "one-blob-gone"])
def test_killed_rmi_leaves_nothing_after_one_command(udocker, registry, tmpdir, point):
    no_grace(udocker)
    load_small(udocker, tmpdir)
    for repo in ("test/multilayer", "test/busybox"):
        udocker("pull", "--registry=" + registry.url, repo).check()
    layers = os.path.join(udocker.udocker_dir, "layers")
    prelude = "import os, sys; sys.path.insert(0, %r); import udocker as ud\n" % REPO_ROOT
    proc = subprocess.Popen([sys.executable, "-c", prelude + KILL_RMI, point, layers],
                            env=udocker.environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, err
    assert not os.path.exists(os.path.join(udocker.udocker_dir, "repos", "test",
                                           "multilayer", "latest"))
    assert len(os.listdir(layers)) > len(tag_blobs(udocker))      # blobs were left
    res = udocker("create", "small:1").check()
    assert LEFT in res.err, res
    assert_only_what_tags_use(udocker)
    udocker("verify", "test/busybox").check()


def test_prune_frees_what_no_tag_uses_and_reports_it(udocker, registry, tmpdir):
    load_small(udocker, tmpdir)
    udocker("pull", "--registry=" + registry.url, "test/multilayer").check()
    layers = os.path.join(udocker.udocker_dir, "layers")
    shutil.rmtree(os.path.join(udocker.udocker_dir, "repos", "test", "multilayer", "latest"))
    orphans = sum(os.path.getsize(os.path.join(layers, d)) for d in multilayer_blobs(registry))
    record = os.path.join(udocker.udocker_dir, "repos", "test", "multilayer", ".latest.json")
    total = orphans + os.path.getsize(record)
    res = udocker("verify").check()              # reported, with their size
    assert "leftovers of killed commands: 6 files, %s" % ud.human_size(total) in res.err, res
    res = udocker("rmi", "--prune").check()      # the blobs are younger than sweep_grace
    assert "kept 5 files younger than sweep_grace" in res.err, res
    assert res.err.count("Info: removed: ") == 1 and not os.path.exists(record)
    res = udocker("rmi", "--prune", "-f").check()
    assert res.err.count("Info: removed: ") == 5, res
    assert "freed %s" % ud.human_size(orphans) in res.err
    assert_only_what_tags_use(udocker)
    res = udocker("rmi", "--prune", "-f").check()
    assert "nothing to prune" in res.err
    res = udocker("rmi")
    assert res.rc == 1 and "missing argument: IMAGE" in res.err


def test_rmi_of_a_missing_image_is_one_error(udocker):
    udocker("images").check()
    res = udocker("rmi", "nosuch/image")
    assert res.rc == 1 and res.err == "Error: image not found: nosuch/image:latest\n", res


def test_sweep_keeps_a_live_pulls_files(udocker, registry, fault_proxy, tmpdir):
    no_grace(udocker)
    load_small(udocker, tmpdir)
    layers = os.path.join(udocker.udocker_dir, "layers")
    digests = multilayer_blobs(registry)
    partial = os.path.join(layers, "." + digests[0] + ".partial")
    fault_proxy.set(mode="stall", where="mid", after_bytes=200000, seconds=600,
                    match=digests[0])
    proc = udocker.start("pull", "--registry=" + fault_proxy.url,
                         "test/multilayer")
    try:
        wait_for(lambda: os.path.exists(partial), "the big blob's partial file")
        wait_for(lambda: all(os.path.exists(os.path.join(layers, d)) for d in digests[1:]),
                 "the small blobs")
        res = udocker("create", "small:1").check()     # sweeps: the live pull's files stay
        assert LEFT not in res.err
        res = udocker("rmi", "--prune", "-f")
        assert res.rc == 1 and "prune when it ends" in res.err
        assert os.path.exists(partial)
        assert all(os.path.exists(os.path.join(layers, d)) for d in digests[1:])
    finally:
        fault_proxy.stop()                             # the stalled answer ends now
    err = proc.communicate()[1]
    assert proc.returncode == 0, err
    udocker("verify", "test/multilayer").check()
    assert_only_what_tags_use(udocker)


# -- create, run and verify racing an rmi of their image ------------------------------------

RACE = r"""
import subprocess
command, ref, hook = sys.argv[1], sys.argv[2], sys.argv[3]

done = []

def rmi():                  # once, just before the hooked function runs
    if not done:
        done.append(subprocess.call([sys.executable, %r, "rmi", ref]))
        assert done == [0]

def before(obj, name):
    real = getattr(obj, name)
    def wrapper(*args, **kw):
        rmi()
        return real(*args, **kw)
    setattr(obj, name, wrapper)

if hook == "open_layers":
    before(ud, "open_layers")
elif hook == "verify":
    before(ud.LocalImage, "verify")
else:                       # LocalImage reads the tag's record, then its manifest
    before(ud, "read_json")
sys.exit(ud.main([command, ref] + (["true"] if command == "run" else [])))
""" % UDOCKER_SCRIPT


@pytest.mark.parametrize("command,hook", [("create", "open_layers"), ("run", "open_layers"),
                                          ("verify", "verify"), ("create", "manifest")])
def test_a_command_racing_rmi_says_the_image_was_removed(udocker, registry, command, hook):
    for repo in ("test/multilayer", "test/busybox"):    # they share the base layer
        udocker("pull", "--registry=" + registry.url, repo).check()
    prelude = "import os, sys; sys.path.insert(0, %r); import udocker as ud\n" % REPO_ROOT
    proc = subprocess.Popen([sys.executable, "-c", prelude + RACE, command, "test/multilayer",
                             hook], env=udocker.environ(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    err = proc.communicate()[1]
    assert proc.returncode == 1 and one_error_line(err) == \
        "Error: image test/multilayer:latest was removed while this command ran", err
    assert not os.listdir(os.path.join(udocker.udocker_dir, "containers"))
