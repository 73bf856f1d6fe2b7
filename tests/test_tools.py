"""Tools installer (section 10): fetch, verify, unpack and install the tools tarball; and
the engine lookup order (configured executable, installed tools, probed PATH)."""
from __future__ import print_function, absolute_import

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import time

import py
import pytest

import udocker
from support import UDOCKER_SCRIPT as SCRIPT, one_error_line, required_file
from support.runner import Udocker
from support.toolserver import ToolServer, path_without_engines, refused_url


def make_tarball(path, version="2.0.0", extra=(), proot_text="#!/bin/sh\necho fake proot\n"):
    """A small tools tarball: bin/proot-x86_64, lib/libfakechroot-glibc2.36-x86_64.so,
    lib/VERSION, doc/COPYING, plus extra (name, bytes or ('link', target)) members.
    Returns its sha256."""
    members = [("udocker_dir/bin/proot-x86_64", proot_text.encode("ascii"), 0o755),
               ("udocker_dir/lib/libfakechroot-glibc2.36-x86_64.so", b"\x7fELF fake", 0o644),
               ("udocker_dir/doc/COPYING", b"license text\n", 0o644),
               ("setup.py", b"# ignored\n", 0o644)]
    with tarfile.open(str(path), "w:gz") as archive:
        for name, data, mode in members + [(n, d, 0o644) for n, d in extra]:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                archive.addfile(info)
                continue
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
        if version is not None:
            data = (version + "\n").encode("ascii")
            info = tarfile.TarInfo("udocker_dir/lib/VERSION")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with open(str(path), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def write_sidecar(path, digest):
    with open(str(path) + ".sha256", "w") as handle:
        handle.write("%s  %s\n" % (digest, os.path.basename(str(path))))


def installed(tmpdir, *parts):
    return tmpdir.join("udocker", *parts)


@pytest.fixture
def good(tmpdir):
    path = tmpdir.join("udocker-tools-2.0.0.tar.gz")
    write_sidecar(path, make_tarball(path))
    return path


@pytest.fixture
def server():
    srv = ToolServer()
    yield srv
    srv.stop()


# -- versions

def test_version_compare_is_numeric():
    assert udocker.version_tuple("1.2.11") == (1, 2, 11)
    assert udocker.version_at_least("1.2.11", "1.2.9")
    assert udocker.version_at_least("2.0", "1.2.11")
    assert udocker.version_at_least("2.0.0", "2.0")
    assert not udocker.version_at_least("1.2.9", "1.2.11")
    assert not udocker.version_at_least("", "1.0")
    assert not udocker.version_at_least("garbage", "1.0")


# -- installing

def test_install_from_local_file(tmpdir, good, ud):
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": str(good)})
    assert rc == 0, err
    assert "tools installed: version 2.0.0" in err
    proot = installed(tmpdir, "bin", "proot-x86_64")
    assert proot.read() == "#!/bin/sh\necho fake proot\n"
    assert os.stat(str(proot)).st_mode & stat.S_IXUSR
    assert installed(tmpdir, "lib", "VERSION").read().strip() == "2.0.0"
    assert installed(tmpdir, "doc", "COPYING").check()
    assert not installed(tmpdir, "setup.py").check()
    assert not [p for p in tmpdir.join("udocker").listdir() if p.basename.startswith(".install-")]
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": str(good)})
    assert rc == 0 and "already installed" in err


def test_install_from_url(tmpdir, good, server, ud):
    server.files["/t/tools.tar.gz"] = good.read_binary()
    server.files["/t/tools.tar.gz.sha256"] = good.new(basename=good.basename + ".sha256") \
        .read_binary()
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": server.url + "/t/tools.tar.gz"})
    assert rc == 0, err
    assert installed(tmpdir, "lib", "VERSION").read().strip() == "2.0.0"


def test_url_without_any_checksum_is_refused(tmpdir, good, server, ud):
    server.files["/t.tar.gz"] = good.read_binary()
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": server.url + "/t.tar.gz"})
    assert rc != 0 and "no sha256" in one_error_line(err)
    assert not installed(tmpdir, "lib", "VERSION").check()
    digest = hashlib.sha256(good.read_binary()).hexdigest()
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": server.url + "/t.tar.gz",
                                                "UDOCKER_TARBALL_SHA256": digest})
    assert rc == 0, err


def test_sources_are_tried_in_order(tmpdir, good, server, ud):
    sources = "%s/missing.tar.gz %s" % (server.url, good)
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": sources})
    assert rc == 0, err
    assert installed(tmpdir, "lib", "VERSION").check()


def install_old(tmpdir, good):
    """Install the good tarball, then make it recognisable; returns the proot path."""
    assert Udocker(tmpdir, allow_root=True)("install", env={"UDOCKER_TARBALL": str(good)})[0] == 0
    return installed(tmpdir, "bin", "proot-x86_64")


def test_bad_checksum_keeps_previous_install(tmpdir, good, ud):
    proot = install_old(tmpdir, good)
    bad = tmpdir.join("bad.tar.gz")
    make_tarball(bad, proot_text="#!/bin/sh\necho NEW\n")
    write_sidecar(bad, "0" * 64)
    rc, out, err = ud("install", "--force", env={"UDOCKER_TARBALL": str(bad)})
    line = one_error_line(err)
    assert rc != 0 and "sha256 mismatch" in line and "UDOCKER_TARBALL" in line
    assert "fake proot" in proot.read()


def test_configured_checksum_wins(tmpdir, good, ud):
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": str(good),
                                                "UDOCKER_TARBALL_SHA256": "1" * 64})
    assert rc != 0 and "sha256 mismatch" in one_error_line(err)


@pytest.mark.parametrize("damage", ["truncated", "not-a-tar", "plain-tar-garbage"])
def test_broken_tarball_keeps_previous_install(tmpdir, good, damage, ud):
    proot = install_old(tmpdir, good)
    broken = tmpdir.join("broken.tar.gz")
    data = good.read_binary()
    if damage == "truncated":
        broken.write_binary(data[:len(data) // 2])
    elif damage == "not-a-tar":
        broken.write_binary(b"<html>this is an error page, not a tarball</html>\n" * 20)
    else:
        broken.write_binary(b"\x1f\x8b" + b"\0" * 100)
    rc, out, err = ud("install", "--force", env={"UDOCKER_TARBALL": str(broken)})
    line = one_error_line(err)
    assert rc != 0 and "truncated or not a tar.gz" in line, err
    assert "UDOCKER_TARBALL" in line
    assert "fake proot" in proot.read()
    assert installed(tmpdir, "lib", "VERSION").read().strip() == "2.0.0"


def test_missing_url_and_refused_connection(tmpdir, server, ud):
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": server.url + "/nope.tgz"})
    line = one_error_line(err)
    assert rc != 0 and "HTTP 404" in line and "set UDOCKER_TARBALL to a local" in line
    port = server.httpd.server_address[1]
    server.stop()
    server.stop = lambda: None
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": "http://127.0.0.1:%d/t.tgz" % port})
    line = one_error_line(err)
    assert rc != 0 and "cannot download" in line and "set UDOCKER_TARBALL" in line
    assert not installed(tmpdir, "lib", "VERSION").check()


def test_old_version_refused(tmpdir, good, ud):
    proot = install_old(tmpdir, good)
    old = tmpdir.join("old.tar.gz")
    write_sidecar(old, make_tarball(old, version="1.1.0", proot_text="#!/bin/sh\necho OLD\n"))
    rc, out, err = ud("install", "--force", env={"UDOCKER_TARBALL": str(old)})
    line = one_error_line(err)
    assert rc != 0 and "version 1.1.0, older than the required 1.2.11" in line
    assert "fake proot" in proot.read()


def test_no_version_file_refused(tmpdir, ud):
    path = tmpdir.join("nov.tar.gz")
    write_sidecar(path, make_tarball(path, version=None))
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": str(path)})
    assert rc != 0 and "not a udocker tools tarball" in one_error_line(err)


def test_empty_tarball_setting_skips_installation(tmpdir, ud):
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": ""})
    assert rc == 0 and "installation skipped" in err


def test_no_tarball_configured_says_what_to_set(tmpdir, ud):
    rc, out, err = ud("install")
    assert rc != 0 and "set UDOCKER_TARBALL" in one_error_line(err)


def test_unsafe_members_are_refused_or_skipped(tmpdir, ud):
    evil = tmpdir.join("evil.tar.gz")
    write_sidecar(evil, make_tarball(evil, extra=[("udocker_dir/bin/../../../escaped", b"x")]))
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": str(evil)})
    assert rc != 0 and "unsafe member" in one_error_line(err)
    assert not tmpdir.join("escaped").check()
    links = tmpdir.join("links.tar.gz")
    write_sidecar(links, make_tarball(links, extra=[
        ("udocker_dir/lib/libfakechroot-x86_64.so", ("link", "libfakechroot-glibc2.36-x86_64.so")),
        ("udocker_dir/lib/outside", ("link", "../../../../etc/passwd")),
        ("udocker_dir/lib/absolute", ("link", "/etc/passwd"))]))
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": str(links)})
    assert rc == 0, err
    lib = installed(tmpdir, "lib")
    assert lib.join("libfakechroot-x86_64.so").readlink() == "libfakechroot-glibc2.36-x86_64.so"
    assert not os.path.lexists(str(lib.join("outside")))
    assert not os.path.lexists(str(lib.join("absolute")))


def test_upstream_layout_accepted(tmpdir, ud):
    path = tmpdir.join("upstream-layout.tar.gz")
    make_tarball(path, version="1.2.11", extra=[
        ("udocker_dir/lib/libfakechroot-Ubuntu-22-x86_64.so", b"\x7fELF"),
        ("udocker_dir/lib/libfakechroot-Debian-12-x86_64.so",
         ("link", "libfakechroot-Ubuntu-22-x86_64.so")),
        ("udocker_dir/bin/runc-x86_64", b"#!/bin/sh\n")])
    pinned_name = tmpdir.join("udocker-englib-1.2.11.tar.gz")  # upstream's name is pinned
    path.copy(pinned_name)
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": str(pinned_name)})
    assert rc == 1 and "git blob id mismatch" in one_error_line(err)
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": str(path)})
    assert rc == 0, err
    assert "no sha256" in err                           # a local file: a warning only
    assert installed(tmpdir, "lib", "VERSION").read().strip() == "1.2.11"
    assert installed(tmpdir, "lib", "libfakechroot-Debian-12-x86_64.so").check()


def test_purge_removes_what_the_new_tarball_lacks(tmpdir, good, ud):
    install_old(tmpdir, good)
    stale = installed(tmpdir, "bin", "stale-tool")
    stale.write("x")
    rc, out, err = ud("install", "--force", "--purge", env={"UDOCKER_TARBALL": str(good)})
    assert rc == 0, err
    assert not stale.check() and installed(tmpdir, "bin", "proot-x86_64").check()


def test_concurrent_installs_install_once(ud, good):
    procs = [ud.start("install", env={"UDOCKER_TARBALL": str(good), "UDOCKER_LOGLEVEL": "4"})
             for _ in range(2)]
    errs = [p.communicate()[1].decode("utf-8") for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, errs)]
    assert [rc for rc, _ in results] == [0, 0], results
    errs = "".join(err for _, err in results)
    assert errs.count("tools installed: version 2.0.0") == 1, errs
    assert errs.count("already installed") == 1, errs


def test_real_tarball_installs(tmpdir, ud):
    path = required_file("UDOCKER_TEST_TARBALL")
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": path})
    assert rc == 0, err
    for tool in ("proot", "runc", "crun", "patchelf"):
        assert installed(tmpdir, "bin", tool + "-x86_64").check(), tool
    assert udocker.version_at_least(installed(tmpdir, "lib", "VERSION").read().strip(), "2.0")


def test_pinned_sha256_is_what_build_tarball_builds():
    """TOOLS_SHA256 pins the tarball that tools/build_tarball.sh builds (.ci/run builds it
    afresh whenever the script changes, and the build is reproducible): a change to the
    script, or a Debian source that moved, shows up here."""
    path = required_file("UDOCKER_TEST_TARBALL")
    name = os.path.basename(path)
    assert name in udocker.TOOLS_SHA256, (name, sorted(udocker.TOOLS_SHA256))
    assert udocker.sha256_file(path) == udocker.TOOLS_SHA256[name], \
        "%s is not the tarball pinned in udocker.py: update TOOLS_SHA256" % path


# -- sources with no configuration: beside udocker.py, in UDOCKER_DIR, the default download

ENGLIB = "udocker-englib-1.2.11.tar.gz"
CID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def sha256_of(path):
    return hashlib.sha256(path.read_binary()).hexdigest()


def git_blob_id(path):
    """The id `git hash-object` gives the file (the same formula when git is missing)."""
    try:
        return subprocess.check_output(["git", "hash-object", str(path)]).decode().strip()
    except OSError:
        data = path.read_binary()
        return hashlib.sha1(("blob %d\0" % len(data)).encode() + data).hexdigest()


def no_engines_env(tmpdir, **extra):
    """The environment of a new user: a PATH without engines, no UDOCKER_TARBALL."""
    env = {"PATH": path_without_engines(str(tmpdir.join("no-engines")))}
    env.update(extra)
    return env


def with_container(tmpdir):
    """A container "named" in tmpdir/ud (a copy of a small root file system)."""
    import rootfs
    tree = str(tmpdir.join("tree"))
    if rootfs.busybox_available():
        rootfs.make_busybox_rootfs(tree)
    else:
        rootfs.make_glibc_rootfs(tree)
    rootfs.write_container(str(tmpdir.join("udocker")), CID, tree, name="named")


def partials(tmpdir):
    return [n for n in os.listdir(str(tmpdir.join("udocker"))) if n.endswith(".partial")]


def test_pins_by_sha256_and_git_blob_id(tmpdir, good):
    blob = git_blob_id(good)
    assert udocker.tarball_digests(str(good)) == {"sha256": sha256_of(good), "gitblob": blob}
    assert udocker.parse_pins("gitblob:%s sha256:%s %s" % (blob, "a" * 64, "B" * 64)) == \
        [("gitblob", blob), ("sha256", "a" * 64), ("sha256", "b" * 64)]
    assert udocker.parse_pins(blob) == []               # a bare 40-digit value is no pin
    assert udocker.TOOLS_GITBLOB[ENGLIB] == "17f7341a84ea7b25d072fcdb48c8b68570201020"


def test_showconf_lists_the_default_sources_and_pins(tmpdir, ud):
    rc, out, err = ud("showconf", env={"UDOCKER_TEST_DEFAULT_TARBALL":
                                                 udocker.DEFAULT_TARBALL_URLS})
    assert rc == 0, err
    listed = out.split("tried in this order")[1]
    for url in ("https://download.ncg.ingrid.pt/webdav/udocker/" + ENGLIB,
                "https://raw.githubusercontent.com/jorge-lip/udocker-builds/master/tarballs/"
                + ENGLIB):
        assert "%s  [default; verified by gitblob:17f7341a84ea7b25d072fcdb48c8b68570201020]" \
            % url in listed


def test_default_download_is_verified_kept_and_reused(tmpdir, good, server, ud):
    server.files["/a/" + ENGLIB] = good.read_binary()
    env = {"UDOCKER_TEST_DEFAULT_TARBALL": server.url + "/a/" + ENGLIB}
    rc, out, err = ud("install", env=env)
    assert rc == 1 and "git blob id mismatch" in one_error_line(err)  # not upstream's bytes
    assert server.gets("/a/" + ENGLIB) == 1 and not installed(tmpdir, "lib", "VERSION").check()
    assert partials(tmpdir) == [] and not installed(tmpdir, "." + ENGLIB).check()
    name = "udocker-tools-9.9.9.tar.gz"
    server.files["/a/" + name] = good.read_binary()
    env = {"UDOCKER_TEST_DEFAULT_TARBALL": server.url + "/a/" + name,
           "UDOCKER_TARBALL_SHA256": "gitblob:" + git_blob_id(good)}
    rc, out, err = ud("install", env=env)
    assert rc == 0, err
    assert installed(tmpdir, "lib", "VERSION").read().strip() == "2.0.0"
    assert server.gets("/a/" + name) == 1 and partials(tmpdir) == []
    assert installed(tmpdir, "." + name).read_binary() == good.read_binary()     # kept
    stale = installed(tmpdir, "bin", "stale-tool")
    stale.write("x")
    rc, out, err = ud("install", "--purge", env=env)   # again, from the kept copy
    assert rc == 0 and "tools installed: version 2.0.0" in err, err
    assert not stale.check() and installed(tmpdir, "bin", "proot-x86_64").check()
    assert server.gets("/a/" + name) == 1
    installed(tmpdir, "." + name).write_binary(b"damaged")        # checked, fetched again
    rc, out, err = ud("install", "--force", env=env)
    assert rc == 0 and server.gets("/a/" + name) == 2, err


def test_tarball_beside_udocker_py_or_in_udocker_dir(tmpdir, good):
    app = tmpdir.join("app").ensure(dir=True)
    script = app.join("udocker.py")
    py.path.local(SCRIPT).copy(script)
    older = app.join("udocker-tools-1.1.0.tar.gz")
    write_sidecar(older, make_tarball(older, version="1.1.0"))
    newest = app.join("udocker-tools-2.1.0.tar.gz")
    good.copy(newest)
    run = Udocker(tmpdir, script=str(script), allow_root=True)     # no UDOCKER_TARBALL
    rc, out, err = run("install")
    assert rc == 1, err                       # no .sha256 beside the newest, 1.1.0 too old
    assert "tools tarball %s: no sha256" % newest in err
    assert "tools tarball %s: version 1.1.0, older" % older in err
    line = one_error_line(err)
    assert "tried %s, %s, " % (newest, older) in line and "beside udocker.py (%s)" % app in line
    newest.new(basename=newest.basename + ".sha256").write(
        "%s  %s\n" % (sha256_of(good), newest.basename))
    rc, out, err = run("install")
    assert rc == 0 and "from %s" % newest in err, err
    assert "Warning" not in err
    moved = tmpdir.join("udocker", newest.basename)     # the same file in UDOCKER_DIR
    newest.move(moved)
    newest.new(basename=newest.basename + ".sha256").move(moved.new(
        basename=moved.basename + ".sha256"))
    rc, out, err = run("install", "--force")
    assert rc == 0 and "from %s" % moved in err, err


def test_interrupted_download_resumes_with_range(tmpdir, good, server, ud):
    server.files["/t.tar.gz"] = good.read_binary()
    server.faults["/t.tar.gz"] = ["close-at:100"]
    env = {"UDOCKER_TARBALL": server.url + "/t.tar.gz", "UDOCKER_TARBALL_SHA256": sha256_of(good)}
    rc, out, err = ud("install", env=env)
    assert rc == 0, err
    assert server.ranges == [None, "bytes=100-"] and partials(tmpdir) == []
    assert err.count("Info: downloaded t.tar.gz") == 1          # one line in a pipe
    tmpdir.join("udocker", ".t.tar.gz").remove()
    tmpdir.join("udocker", ".t.tar.gz.partial").write_binary(b"stale bytes of another file")
    server.ranges[:] = []
    rc, out, err = ud("install", "--force", env=env)
    assert rc == 0, err                       # resumed, refused by its sha256, then whole
    assert server.ranges == ["bytes=27-", None] and partials(tmpdir) == []


def test_a_corrupt_download_is_refused_and_the_next_source_tried(tmpdir, good, server, ud):
    data = good.read_binary()
    server.files["/one.tar.gz"] = server.files["/two.tar.gz"] = data
    server.faults["/one.tar.gz"] = ["corrupt"]
    env = {"UDOCKER_TARBALL": "%s/one.tar.gz %s/two.tar.gz" % (server.url, server.url),
           "UDOCKER_TARBALL_SHA256": sha256_of(good)}
    rc, out, err = ud("install", env=env)
    assert rc == 0, err
    assert "Warning: tools tarball %s/one.tar.gz: sha256 mismatch" % server.url in err
    assert server.gets("/one.tar.gz") == 1 and server.gets("/two.tar.gz") == 1
    assert not installed(tmpdir, ".one.tar.gz").check() and partials(tmpdir) == []


def test_offline_run_fails_at_once_with_one_message(tmpdir, ud):
    with_container(tmpdir)
    urls = [refused_url(ENGLIB), refused_url("mirror/" + ENGLIB)]
    env = no_engines_env(tmpdir, UDOCKER_TEST_DEFAULT_TARBALL=" ".join(urls))
    started = time.time()
    rc, out, err = ud("run", "named", "true", env=env)
    elapsed = time.time() - started
    line = one_error_line(err)
    assert rc == 1 and elapsed < 10, (elapsed, err)
    assert "tried %s, %s" % tuple(urls) in line
    for words in ("https://download.ncg.ingrid.pt/webdav/udocker/" + ENGLIB,
                  "beside udocker.py", tmpdir.join("udocker"), "install --help",
                  "no proot on PATH"):
        assert str(words) in line, line
    assert [l for l in err.splitlines() if l.startswith("Warning: tools tarball")] == [
        "Warning: tools tarball %s: cannot download: Connection refused" % url for url in urls]


def test_one_download_per_command_and_no_retry_without_an_answer(tmpdir, good, server, ud):
    with_container(tmpdir)
    server.files["/a/" + ENGLIB] = good.read_binary()            # not upstream's: refused
    server.faults["/b/" + ENGLIB] = ["hangup"] * 5               # no answer at all
    env = no_engines_env(tmpdir, UDOCKER_TEST_DEFAULT_TARBALL="%s/a/%s %s/b/%s" % (
        server.url, ENGLIB, server.url, ENGLIB))
    rc, out, err = ud("run", "named", "true", env=env)
    assert rc == 1 and "no tools tarball could be used" in one_error_line(err), err
    assert server.gets("/a/" + ENGLIB) == 1 and server.gets("/b/" + ENGLIB) == 1
    assert server.gets("/a/%s.sha256" % ENGLIB) == 0                # pinned: no sidecar


def test_a_silent_server_costs_one_short_wait(tmpdir, good, server, ud):
    server.files["/t.tar.gz"] = good.read_binary()
    server.faults["/t.tar.gz"] = ["delay:5"] * 5          # answers after ctimeout, too late
    tmpdir.join("udocker").ensure(dir=True).join("udocker.conf").write("[DEFAULT]\nctimeout = 1\n")
    rc, out, err = ud("install", env={"UDOCKER_TARBALL": server.url + "/t.tar.gz",
                                                "UDOCKER_TARBALL_SHA256": sha256_of(good)})
    assert rc == 1 and "cannot download: timed out" in one_error_line(err), err
    assert server.gets("/t.tar.gz") == 1


def test_concurrent_first_runs_download_and_install_once(tmpdir, good, server, ud):
    with_container(tmpdir)
    name = "udocker-tools-9.9.9.tar.gz"
    server.files["/" + name] = good.read_binary()
    server.files["/%s.sha256" % name] = ("%s  %s\n" % (sha256_of(good), name)).encode()
    server.faults["/" + name] = ["delay:1"]          # the first download takes a while
    env = dict(no_engines_env(tmpdir), UDOCKER_TEST_DEFAULT_TARBALL=server.url + "/" + name)
    procs = [ud.start("run", "named", "true", env=env) for _ in range(3)]
    errs = "".join(p.communicate()[1].decode("utf-8") for p in procs)
    assert server.gets("/" + name) == 1, errs
    assert errs.count("tools installed: version 2.0.0") == 1, errs
    assert installed(tmpdir, "lib", "VERSION").read().strip() == "2.0.0"


# -- done means: a new user's first `run`, with two files copied or with nothing

def new_user(tmpdir, files):
    """A runner of a copy of udocker.py in tmpdir/app beside files, for a user with a PATH
    without engines and no UDOCKER_* variable (the tools go to ~/.udocker)."""
    from support.runner import Udocker
    app = tmpdir.join("app").ensure(dir=True)
    py.path.local(SCRIPT).copy(app.join("udocker.py"))
    for path in files:
        py.path.local(path).copy(app.join(os.path.basename(path)))
    run = Udocker(str(tmpdir.join("user")), script=str(app.join("udocker.py")))
    run.env.update(no_engines_env(tmpdir, UDOCKER_DIR=None, UDOCKER_NOSYSCONF=None))
    return run, app


def test_new_user_with_the_tarball_beside_udocker_py_runs_an_image(tmpdir, registry):
    tarball = os.environ.get("UDOCKER_TEST_TARBALL", "")
    if not os.path.isfile(tarball) or not os.path.isfile(tarball + ".sha256"):
        print("skipped: UDOCKER_TEST_TARBALL (and its .sha256) not found: %r" % tarball)
        pytest.skip("UDOCKER_TEST_TARBALL and its .sha256 (tools/build_tarball.sh) needed")
    if os.geteuid() == 0:
        pytest.skip("the engines are tested as a non-root user (run: bash tests/run)")
    run, app = new_user(tmpdir, [tarball, tarball + ".sha256"])
    res = run("run", "--rm", "%s/test/busybox" % registry.host, "echo", "hi")
    assert res.rc == 0 and "hi" in res.out.splitlines(), res
    assert "tools installed: version" in res.err and \
        "from %s" % app.join(os.path.basename(tarball)) in res.err, res
    assert os.path.isfile(os.path.join(run.home, ".udocker", "lib", "VERSION"))


def test_new_user_without_tarball_or_network_gets_one_message(tmpdir, registry):
    run, app = new_user(tmpdir, [])
    image = "%s/test/busybox" % registry.host
    run("pull", image).check()
    started = time.time()
    res = run("run", "--rm", image, "echo", "hi")
    elapsed = time.time() - started
    line = one_error_line(res.err)
    assert res.rc == 1 and "hi" not in res.out and elapsed < 10, (elapsed, res)
    assert "https://download.ncg.ingrid.pt/webdav/udocker/" + ENGLIB in line
    assert "beside udocker.py (%s)" % app in line and "install --help" in line


# -- finding the engines

def tools_for(tmpdir, **env):
    """Tools of a session whose environment is env (PATH: none unless given; the tests'
    own os.environ is not the session's)."""
    environ = {"HOME": str(tmpdir), "UDOCKER_NOSYSCONF": "1",
               "UDOCKER_DIR": str(tmpdir.join("udocker")), "PATH": ""}
    environ.update(env)
    cfg = udocker.Config.load(environ, {})
    repo = udocker.LocalRepository(cfg)
    repo.create()
    return udocker.Tools(cfg, repo, environ)


def fake_proot(directory, version, modern, kill_on_exit=None):
    """A shell script answering --help and -V like proot 5.1.0 (Debian's: no --kill-on-exit,
    no seccomp), upstream udocker's 5.1.0 fork (kill_on_exit=True) or 5.4.0 (modern). A proot
    that translates statx has the name in its syscall table: modern ones carry it after
    `exit`, where the shell never reads."""
    directory.ensure(dir=True)
    path = directory.join("proot")
    kill_on_exit = modern if kill_on_exit is None else kill_on_exit
    help_text = "  -r *path*\\n" + ("  --kill-on-exit\\n" if kill_on_exit else "") + \
        ("  -p *port*, --port\\n" if modern else "")
    path.write_binary(("#!/bin/sh\ncase \"$1\" in\n"
                       "  -V) printf ' proot %s\\n built-in accelerators: process_vm = yes, "
                       "seccomp_filter = %s\\n';;\n"
                       "  --help) printf '%s';;\nesac\nexit 0\n"
                       % (version, "yes" if modern or kill_on_exit else "no",
                          help_text)).encode("ascii") + (b"\0statx\0" if modern else b""))
    path.chmod(0o755)
    return str(path)


def test_5_1_era_proots_are_accepted_with_what_they_lack(tmpdir, monkeypatch):
    """Debian's 5.1.0 and upstream udocker's fork of it run: the P modes make up for the
    missing statx translation and --kill-on-exit (tests/test_run.py runs them)."""
    for kill_on_exit in (False, True):
        path = fake_proot(tmpdir.join("path%s" % kill_on_exit), "5.1.0", modern=False,
                          kill_on_exit=kill_on_exit)
        info = udocker.probe_proot(path)
        assert info["ok"] and info["version"] == "5.1.0" and not info["statx"]
        assert info["kill_on_exit"] is kill_on_exit and info["seccomp"] is kill_on_exit
    info = udocker.probe_proot(fake_proot(tmpdir.join("new"), "5.4.0", modern=True))
    assert info["ok"] and info["statx"] and info["kill_on_exit"]
    broken = tmpdir.join("broken", "proot")
    broken.write("#!/bin/sh\nexit 1\n", ensure=True)
    broken.chmod(0o755)
    info = udocker.probe_proot(str(broken))
    assert not info["ok"] and "-V" in info["why"]


def test_good_proot_on_path_is_used_and_the_probe_cached(tmpdir, monkeypatch):
    path = fake_proot(tmpdir.join("path"), "5.4.0", modern=True)
    monkeypatch.setenv("PATH", path_without_engines(str(tmpdir.join("no-engines"))))
    on_path = str(tmpdir.join("path")) + ":/usr/bin:/bin"      # the session's PATH
    tools = tools_for(tmpdir, UDOCKER_TARBALL="", PATH=on_path)
    found, info = tools.proot()
    assert found == path and info["ok"] and info["seccomp"] and info["port"]
    cache = udocker.read_json(tools.cache_path)
    (key,) = [k for k in cache if path in k]
    cache[key]["version"] = "from-cache"          # a later lookup reads the cache, not proot
    udocker.write_atomic(tools.cache_path, udocker.json_dumps(cache))
    assert tools_for(tmpdir, UDOCKER_TARBALL="", PATH=on_path).proot()[1]["version"] == \
        "from-cache"
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime - 100))   # a changed binary is probed again
    assert tools_for(tmpdir, UDOCKER_TARBALL="", PATH=on_path).proot()[1]["version"] == \
        "5.4.0"


def test_lookup_order_configured_then_installed_then_path(tmpdir, monkeypatch, good):
    on_path = fake_proot(tmpdir.join("path"), "5.4.0", modern=True)
    path = str(tmpdir.join("path")) + ":/usr/bin:/bin"
    mine = fake_proot(tmpdir.join("mine"), "5.4.0", modern=True)
    assert tools_for(tmpdir, UDOCKER_TARBALL="", PATH=path,
                     UDOCKER_USE_PROOT_EXECUTABLE=mine).proot()[0] == mine
    assert tools_for(tmpdir, UDOCKER_TARBALL="", PATH=path).proot()[0] == on_path
    tools = tools_for(tmpdir, UDOCKER_TARBALL=str(good), PATH=path)
    assert tools.proot()[0] == on_path                  # finding installs nothing
    assert tools.install()                               # a step of its own (run, setup)
    assert tools.proot()[0] == on_path                  # found before: remembered
    tools = tools_for(tmpdir, UDOCKER_TARBALL=str(good), PATH=path)
    assert tools.proot()[0] == str(installed(tmpdir, "bin", "proot-x86_64"))


def test_missing_configured_executable_is_one_clear_error(tmpdir):
    tools = tools_for(tmpdir, UDOCKER_USE_RUNC_EXECUTABLE="/nonexistent/runc")
    with pytest.raises(udocker.EngineError) as info:
        tools.runc()
    assert "UDOCKER_USE_RUNC_EXECUTABLE" in str(info.value)


def fake_runtime(directory, name, starts):
    """bin/NAME-x86_64 answering --version like runc/crun; `run` succeeds only if starts."""
    directory.ensure(dir=True)
    path = directory.join("%s-x86_64" % name)
    path.write("#!/bin/sh\nfor a in \"$@\"; do\n  case \"$a\" in\n"
               "    --version) echo '%s version 1.0'; exit 0;;\n"
               "    run) %s;;\n  esac\ndone\nexit 0\n"
               % (name, "exit 0" if starts else "echo 'error: cannot start here' >&2; exit 1"))
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("crun_starts", [True, False])
def test_r_modes_take_crun_first_and_runc_when_crun_cannot_start(tmpdir, crun_starts):
    bindir = tmpdir.join("udocker", "bin")
    crun = fake_runtime(bindir, "crun", crun_starts)
    runc = fake_runtime(bindir, "runc", True)
    tools = tools_for(tmpdir, UDOCKER_TARBALL="", TMPDIR=str(tmpdir))
    path, info = tools.runc()
    assert (path, info["flavour"]) == ((crun, "crun") if crun_starts else (runc, "runc"))
    named = tools_for(tmpdir, UDOCKER_TARBALL="", UDOCKER_USE_RUNC_EXECUTABLE="runc")
    assert named.runc()[0] == runc                      # a named runtime is used as named


def test_fakechroot_library_by_glibc_generation(tmpdir):
    tools = tools_for(tmpdir, UDOCKER_TARBALL="")
    lib = tmpdir.join("udocker", "lib")
    for name in ("libfakechroot-glibc2.31-x86_64.so", "libfakechroot-glibc2.36-x86_64.so",
                 "libfakechroot-glibc2.17-x86_64.so", "libfakechroot-glibc2.17-arm64.so",
                 "VERSION"):
        lib.join(name).write("2.0.0\n" if name == "VERSION" else "x")
    pick = lambda glibc, arch="amd64": os.path.basename(
        tools.fakechroot_so(arch, glibc, ("Debian", "")))
    assert pick("2.36") == "libfakechroot-glibc2.36-x86_64.so"
    assert pick("2.41") == "libfakechroot-glibc2.36-x86_64.so"
    assert pick("2.31") == "libfakechroot-glibc2.31-x86_64.so"
    assert pick("2.35") == "libfakechroot-glibc2.31-x86_64.so"
    assert pick("2.28") == "libfakechroot-glibc2.17-x86_64.so"       # RHEL/Rocky 8
    assert pick("2.17") == "libfakechroot-glibc2.17-x86_64.so"       # CentOS 7
    assert pick("2.36", "arm64") == "libfakechroot-glibc2.17-arm64.so"
    with pytest.raises(udocker.EngineError) as info:
        pick("2.12")
    assert "no libfakechroot" in str(info.value) and "P1" in str(info.value)


def test_fakechroot_library_for_musl(tmpdir):
    """A musl container gets libfakechroot-musl-ARCH.so, never a glibc one; without it the
    one error line names musl (and a glibc container never gets the musl library)."""
    tools = tools_for(tmpdir, UDOCKER_TARBALL="")
    lib = tmpdir.join("udocker", "lib")
    lib.join("VERSION").write("2.0.0\n")
    lib.join("libfakechroot-glibc2.17-x86_64.so").write("x")
    pick = lambda arch, libc, glibc="": os.path.basename(
        tools.fakechroot_so(arch, glibc, ("Alpine", "3.20"), libc))
    with pytest.raises(udocker.EngineError) as info:
        pick("amd64", "musl")
    assert "no libfakechroot for this container (x86_64, musl; have: " \
        "libfakechroot-glibc2.17-x86_64.so)" in str(info.value)
    lib.join("libfakechroot-musl-x86_64.so").write("x")
    assert pick("amd64", "musl") == "libfakechroot-musl-x86_64.so"
    assert pick("amd64", "glibc", "2.36") == "libfakechroot-glibc2.17-x86_64.so"
    with pytest.raises(udocker.EngineError) as info:
        pick("arm64", "musl")
    assert "(arm64, musl; have: " in str(info.value)


# -- upstream udocker's tools (udocker-englib-1.2.11): their names and what they lack

def upstream_tree(tmpdir):
    """udocker/bin and udocker/lib laid out as upstream's tools tarball 1.2.11 installs
    them (tiny stand-ins for the binaries); lib/VERSION 1.2.11."""
    bindir = tmpdir.ensure("udocker", "bin", dir=True)
    libdir = tmpdir.ensure("udocker", "lib", dir=True)
    fake_proot(tmpdir.join("p48"), "5.1.0", modern=False, kill_on_exit=True)
    tmpdir.join("p48", "proot").move(bindir.join("proot-x86_64-4_8_0"))
    fake_proot(tmpdir.join("p"), "5.1.0", modern=False, kill_on_exit=True)
    tmpdir.join("p", "proot").move(bindir.join("proot-x86_64"))
    patchelf = bindir.join("patchelf-x86_64")
    patchelf.write("#!/bin/sh\ncase \"$1\" in\n  --version) echo 'patchelf 0.9';;\n"
                   "  --help) printf 'syntax: patchelf\\n  [--set-root-prefix PATH_PREFIX]\\n"
                   "  FILENAME\\n';;\n  *) echo \"$@\" >> \"$0.log\";;\nesac\n")
    patchelf.chmod(0o755)
    for name in ("runc", "crun"):
        fake_runtime(bindir, name, starts=True)
    for name, target in (("CentOS-7", None), ("Ubuntu-22", None), ("Ubuntu-12", None),
                         ("Alpine-3.19", None), ("AlmaLinux-8", None),
                         ("Debian-12", "Ubuntu-22"), ("Debian", "Ubuntu-22"),
                         ("Red-7", "CentOS-7"), ("Rocky-8", "AlmaLinux-8"), ("", "Ubuntu-12")):
        path = libdir.join("libfakechroot-%sx86_64.so" % (name + "-" if name else ""))
        if target:
            path.mksymlinkto("libfakechroot-%s-x86_64.so" % target)
        else:
            path.write_binary(b"\x7fELF fake\0FAKECHROOT_DIR_MAP\0", ensure=True)
    libdir.join("VERSION").write("1.2.11\n")
    return tools_for(tmpdir, UDOCKER_TARBALL="")


@pytest.mark.skipif(udocker.Platform.host().arch != "amd64", reason="names of x86_64 tools")
def test_upstream_tool_names_are_found(tmpdir):
    tools = upstream_tree(tmpdir)
    path, info = tools.proot()
    newer = udocker.version_at_least(os.uname()[2], "4.8")
    assert os.path.basename(path) == ("proot-x86_64-4_8_0" if newer else "proot-x86_64")
    assert info["ok"] and info["kill_on_exit"] and not info["statx"]
    path, info = tools.patchelf()
    assert os.path.basename(path) == "patchelf-x86_64" and not info["many_files"]
    assert os.path.basename(tools.runc()[0]) == "crun-x86_64"


def release_tree(tmpdir, name, files):
    """A container tree with only etc/ (files: {name: text})."""
    root = tmpdir.join("trees", name)
    for rel, text in files.items():
        root.join("etc", rel).write(text, ensure=True)
    return str(root)


DEBIAN_12 = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
             'VERSION_ID="12"\nVERSION="12 (bookworm)"\nID=debian\n')
RELEASES = {   # tree -> (etc files, (distro, version) as upstream reads them, library)
    "centos7": ({"centos-release": "CentOS Linux release 7.9.2009 (Core)\n",
                 "redhat-release": "CentOS Linux release 7.9.2009 (Core)\n",
                 "os-release": 'NAME="CentOS Linux"\nVERSION_ID="7"\n'},
                ("CentOS", "7"), "libfakechroot-CentOS-7-x86_64.so"),
    "rhel7": ({"redhat-release": "Red Hat Enterprise Linux Server release 7.9 (Maipo)\n",
               "os-release": 'NAME="Red Hat Enterprise Linux Server"\nVERSION_ID="7.9"\n'},
              ("Red", "7"), "libfakechroot-Red-7-x86_64.so"),
    "rocky8": ({"rocky-release": "Rocky Linux release 8.9 (Green Obsidian)\n",
                "os-release": 'NAME="Rocky Linux"\nVERSION_ID="8.9"\n'},
               ("Rocky", "8"), "libfakechroot-Rocky-8-x86_64.so"),
    "ubuntu22": ({"lsb-release": "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=22.04\n"
                                 "DISTRIB_CODENAME=jammy\n",
                  "os-release": 'PRETTY_NAME="Ubuntu 22.04.3 LTS"\nNAME="Ubuntu"\n'
                                'VERSION_ID="22.04"\n'},
                 ("Ubuntu", "22"), "libfakechroot-Ubuntu-22-x86_64.so"),
    "debian12": ({"os-release": DEBIAN_12}, ("Debian", "12"),
                 "libfakechroot-Debian-12-x86_64.so"),
    "debian13": ({"os-release": DEBIAN_12.replace("12", "13")}, ("Debian", "13"),
                 "libfakechroot-Debian-x86_64.so"),
    "alpine": ({"alpine-release": "3.19.1\n",
                "os-release": 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.19.1\n'},
               ("Alpine", "3.19"), "libfakechroot-Alpine-3.19-x86_64.so"),
    "unknown": ({"os-release": 'NAME="Fedora Linux"\nVERSION_ID=40\n'}, ("Fedora", "40"),
                "libfakechroot-x86_64.so"),
    "none": ({"hostname": "x\n"}, ("", ""), "libfakechroot-x86_64.so"),
}


@pytest.mark.parametrize("tree", sorted(RELEASES))
def test_upstream_libfakechroot_is_picked_per_distribution_as_upstream_does(tmpdir, tree):
    """udocker 1.3.17's OSInfo.osdistribution and FakechrootEngine.select_fakechroot_so:
    NAME-VERSION-ARCH, NAME-ARCH, ARCH, then libfakechroot.so."""
    files, distro, library = RELEASES[tree]
    tools = upstream_tree(tmpdir)
    root = release_tree(tmpdir, tree, files)
    assert udocker.read_os_release(root) == distro
    assert os.path.basename(tools.fakechroot_so("amd64", "2.17", distro)) == library


def test_upstream_libfakechroot_that_needs_a_newer_glibc_is_not_picked(tmpdir):
    """The per-distribution library is taken only if the container's glibc has the symbol
    versions it refers to (else every program fails to load); without one named for the
    distribution, the glibc library needing the newest glibc the container has: Debian-12's
    (GLIBC_2.34, as built) for a Debian 13, Debian-11's (GLIBC_2.14) for a glibc 2.31 tree
    that says Debian 12."""
    tools = upstream_tree(tmpdir)
    libdir = tmpdir.join("udocker", "lib")
    for name in os.listdir(str(libdir)):
        if name.startswith("libfakechroot"):
            libdir.join(name).remove()
    for name, need in (("Debian-12", b"2.34"), ("Debian-11", b"2.14"), ("Alpine-3.19", None)):
        libdir.join("libfakechroot-%s-x86_64.so" % name).write_binary(
            b"\x7fELF\0GLIBC_%s\0GLIBC_2.2.5\0" % need if need else b"\x7fELF musl\0")
    pick = lambda glibc, distro: os.path.basename(tools.fakechroot_so("amd64", glibc, distro))
    assert pick("2.36", ("Debian", "12")) == "libfakechroot-Debian-12-x86_64.so"
    assert pick("", ("Debian", "12")) == "libfakechroot-Debian-12-x86_64.so"   # unknown glibc
    assert pick("2.41", ("Debian", "13")) == "libfakechroot-Debian-12-x86_64.so"
    assert pick("2.41", ("Arch", "")) == "libfakechroot-Debian-12-x86_64.so"
    assert pick("2.31", ("Debian", "12")) == "libfakechroot-Debian-11-x86_64.so"
    with pytest.raises(udocker.EngineError) as info:
        pick("2.12", ("Debian", "12"))
    assert "no libfakechroot for this container (x86_64, glibc 2.12; have: " in str(info.value)


def upstream_osdistribution(root):
    """udocker 1.3.17's OSInfo(root).osdistribution(), with its regular expressions (the
    *-release files in sorted order where it takes os.listdir's)."""
    import re
    texts = {}
    for name in sorted(os.listdir(os.path.join(root, "etc"))):
        if re.match(".+-release", name):
            with open(os.path.join(root, "etc", name)) as handle:
                texts[name] = handle.read()
    found = ("", "")
    for name in sorted(texts):
        match = re.match(r"([^=]+) release (\d+)", texts[name])
        if match and match.group(1):
            found = (match.group(1).split(" ")[0], match.group(2))
            break
    if not found[0] and "lsb-release" in texts:
        ident = re.search(r"DISTRIB_ID=(.+)(\n|$)", texts["lsb-release"], re.MULTILINE)
        rel = re.search(r"DISTRIB_RELEASE=(.+)(\n|$)", texts["lsb-release"], re.MULTILINE)
        if ident and rel:
            found = (ident.group(1).split(" ")[0], rel.group(1))
    if not found[0] and "os-release" in texts:
        ident = re.search(r"NAME=\"?([^ \n\"\.]+).*\"?(\n|$)", texts["os-release"],
                          re.MULTILINE)
        rel = re.search(r"VERSION_ID=\"?([^ \n\"]+).*\"?(\n|$)", texts["os-release"],
                        re.MULTILINE)
        if ident and rel:
            found = (ident.group(1).split(" ")[0], rel.group(1))
    version = found[1]
    version = ".".join(version.split(".")[0:2]) if version.count(".") >= 2 else \
        version.split(".")[0]
    return found[0], version


ODD_RELEASES = [
    {"system-release": "Amazon Linux release 2 (Karoo)\n"},
    {"fedora-release": "Fedora release 39 (Thirty Nine)\n", "os-release": "NAME=Fedora\n"},
    {"os-release": 'NAME="openSUSE Leap"\nVERSION_ID="15.5"\n'},
    {"os-release": 'NAME=".hidden"\nVERSION_ID="1"\n'},
    {"os-release": "ID=debian\n"},
    {"lsb-release": "DISTRIB_ID=Linux Mint\nDISTRIB_RELEASE=21.3\n"},
    {"lsb-release": "DISTRIB_ID=Ubuntu\n", "os-release": 'NAME="Ubuntu"\nVERSION_ID="20.04"'},
    {"a-release": "x = y release 5\n", "b-release": "Foo release x\nBar release 3 and 4"},
    {"oracle-release": "Oracle Linux Server release 8.9\n"},
]


def test_distribution_reading_is_upstreams(tmpdir):
    trees = [files for files, _, _ in RELEASES.values()] + ODD_RELEASES
    for index, files in enumerate(trees):
        root = release_tree(tmpdir, "t%d" % index, files)
        assert udocker.read_os_release(root) == upstream_osdistribution(root), files


def test_patchelf_that_takes_one_file_gets_one_per_call(tmpdir):
    """Upstream's patchelf 0.9 fork reads one FILENAME and ignores the rest silently: F3
    setup would leave all but one file of each batch unpatched."""
    tools = upstream_tree(tmpdir)
    patchelf = tools.patchelf()
    container = udocker.RunContainer("c", str(tmpdir.join("c")), str(tmpdir.join("c", "ROOT")),
                                     None)
    files = []
    for index in range(3):
        path = tmpdir.join("c", "ROOT", "f%d" % index)
        path.write("x", ensure=True)
        files.append(str(path))
    assert udocker.ElfPatcher(patchelf, container)._run(["--set-rpath", "/x"], files) == []
    calls = tmpdir.join("udocker", "bin", "patchelf-x86_64.log").read().splitlines()
    assert calls == ["--set-rpath /x %s" % path for path in files]


@pytest.mark.skipif(udocker.Platform.host().arch != "amd64", reason="statx number of x86_64")
def test_statx_filter_makes_statx_fail_with_enosys_in_the_engine_and_below(tmpdir):
    """What P modes do for a proot that does not translate statx: glibc then emulates statx
    with fstatat, which proot translates."""
    install = udocker.enosys_filter(udocker.STATX_SYSCALLS["amd64"])
    probe = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
             "buf = ctypes.create_string_buffer(256); "
             "r = libc.syscall(332, -100, b'/', 0, 0x7ff, buf); "
             "sys.stdout.write('%d %d %s' % (r, ctypes.get_errno(), os.stat('/').st_mode > 0))")
    plain = subprocess.check_output([sys.executable, "-c", probe]).decode().split()
    assert plain == ["0", "0", "True"]
    below = ["/bin/sh", "-c", '"$0" -c "$1"; true', sys.executable, probe]   # a grandchild
    filtered = subprocess.check_output(below, preexec_fn=install)
    assert filtered.decode().split() == ["-1", "38", "True"]       # ENOSYS; stat still works


def test_a_mode_that_cannot_start_raises_and_finding_installs_nothing(tmpdir, monkeypatch,
                                                                       good):
    """check_mode and choose_mode raise CannotStart (the mode, why, whether a tool is
    missing); looking for a tool installs nothing, Tools.install() does, once asked."""
    path = path_without_engines(str(tmpdir.join("path")))
    tools = tools_for(tmpdir, UDOCKER_TARBALL=str(good), UDOCKER_DEFAULT_EXECUTION_MODE="P1",
                      PATH=path)
    session = udocker.Session(tools.cfg, tools.environ)
    container = udocker.RunContainer("location", None, str(tmpdir), {})
    with pytest.raises(udocker.CannotStart) as info:
        udocker.check_mode(session, container, tools, "P1")
    assert info.value.mode == "P1" and info.value.tool_missing and "proot" in info.value.why
    assert not tools.installer.is_installed()           # finding did not install
    with pytest.raises(udocker.CannotStart) as info:
        udocker.check_mode(session, container, tools, "F2")
    assert info.value.mode == "F2" and not info.value.tool_missing
    with pytest.raises(udocker.CannotStart) as info:
        udocker.choose_mode(session, container, tools)
    assert info.value.mode == "P1" and info.value.tool_missing
    tools = tools_for(tmpdir, UDOCKER_TARBALL=str(good), UDOCKER_DEFAULT_EXECUTION_MODE="P1")
    assert tools.install() and tools.installer.is_installed()
    assert tools.proot()[0] == str(installed(tmpdir, "bin", "proot-x86_64"))


def test_fallback_modes_that_lack_tools_are_installed_by_run_not_by_choose_mode(tmpdir):
    """The default mode cannot start here (a proot that fails its host probe, configured as
    a path: nothing to install for P1) and the fallback modes lack their tools: choose_mode
    names them (fallback_tools) and installs nothing; run's install step (choose_engine)
    installs them and chooses again."""
    real = fake_proot(tmpdir.join("answers"), "5.4.0", modern=True)
    proot = tmpdir.join("proot-noptrace")
    proot.write('#!/bin/sh\ncase "$1" in --help|-V) exec "%s" "$@";; esac\n'
                'echo "proot error: ptrace(TRACEME): Operation not permitted" >&2\nexit 1\n'
                % real)
    proot.chmod(0o755)
    proot = str(proot)
    tarball = required_file("UDOCKER_TEST_TARBALL")           # with runc and crun
    tools = tools_for(tmpdir, UDOCKER_TARBALL=tarball, UDOCKER_USE_PROOT_EXECUTABLE=proot,
                      PATH=path_without_engines(str(tmpdir.join("path"))))
    session = udocker.Session(tools.cfg, tools.environ)
    container = udocker.RunContainer("location", None, str(tmpdir), {})
    with pytest.raises(udocker.CannotStart) as info:
        udocker.choose_mode(session, container, tools)
    assert info.value.mode == "P1" and not info.value.tool_missing
    assert info.value.fallback_tools == ("runc",)       # R1's (F modes need a container)
    assert not tools.installer.is_installed()           # choosing installed nothing
    engine = udocker.choose_engine(session, container, {}, [], tools)
    assert tools.installer.is_installed()
    assert engine.cannot_start is None or "install the tools" not in engine.cannot_start.why, \
        engine.cannot_start.why                         # R1 was checked with its runtime
