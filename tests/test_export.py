"""Containers in and out as tarballs: import --tocontainer (a root file system tarball),
export (ROOT with the owners and modes the image asked for), export --clone / import --clone
(a whole container directory), hostile and broken tarballs, and udocker 1.3.17 reading what
we write and the other way round.

Layers and the hostile corpus come from tests/test_create.py; udocker.py runs as a
subprocess (Env.run) or in process where only the extraction is under test. The F3 test
uses tests/test_run.py's tools (UDOCKER_TEST_TARBALL) and is skipped without them.
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
from test_create import (ID_RE, Image, busybox_layer, compress, d, entry, env, f, hard,  # noqa
                         hardlink_layers, have, hostile_images, odd_layers, sym, tar_bytes,
                         tree, whiteout_layers)
from support import UPSTREAM_UDOCKER, one_error_line, to_text
from test_run import world  # noqa: F401  (module fixture: the tools installed once)

UPSTREAM = UPSTREAM_UDOCKER
needs_upstream = pytest.mark.usefixtures("upstream_udocker")


# -- helpers

def ok(env, *args, **kw):
    """stdout (bytes) of udocker.py args, which must succeed."""
    return env.run(*args, **kw).check().raw_out


def new_id(out):
    cid = to_text(out).strip()
    assert to_text(out) == cid + "\n" and ID_RE.match(cid), out
    return str(cid)


def one_line_error(result, needle):
    rc, out, err = result
    assert rc == 1 and out == "", (rc, out, err)
    one_error_line(err, needle)


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


def expected_members(layers):
    """members() of what the layers ask for: the newest layer decides (no whiteouts, every
    directory listed), names as export writes them."""
    found, links = {}, {}
    for entries in layers:
        for info, data in entries:
            name = "./" + info.name.strip("/")
            if info.islnk():
                links[name] = "./" + info.linkname.strip("/")
                continue
            payload = hashlib.sha256(data).hexdigest() if info.isreg() else \
                (info.linkname if info.issym() else None)
            found[name] = (info.type, info.mode, info.uid, info.gid, payload)
    for name, target in links.items():
        found[name] = found[target]
    return found


def container_files(env, cid):
    """The container directory's own files (ROOT aside) and their content."""
    top = env.store.path(cid)
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == top:
            dirnames.remove("ROOT")
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, top)] = read(path)
    return found


def no_leftovers(env):
    assert not [n for n in env.containers_dir_entries() if n.startswith(".")]


def inside(root):
    """Every path below root (symlinks as themselves) resolves below root."""
    real = os.path.realpath(root) + "/"
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                assert os.path.realpath(path).startswith(real), path
    return True


def rootfs_layers():
    """Two layers with odd owners and modes, every directory listed, no whiteouts."""
    one = [d("bin"), f("bin/tool", b"tool", 0o555), hard("bin/tool2", "bin/tool"),
           f("bin/suid", b"s", 0o4755), sym("bin/sh", "tool"), d("ro", 0o555),
           f("ro/file", b"r", 0o444), f("secret", b"0", 0o000), d("tmp", 0o1777),
           d("home"), d("home/u", 0o700, uid=1000, gid=100),
           f("home/u/f", b"u", 0o640, uid=1000, gid=100), entry("pipe", "fifo", mode=0o620),
           d("etc"), f("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"), sym("abs", "/etc/passwd")]
    two = [d("ro", 0o500), f("ro/file2", b"r2", 0o400), f("bin/suid", b"s2", 0o2751),
           f("home/u/g", b"g", 0o600, uid=1000, gid=100)]
    return [one, two]


def flat(layers):
    return [e for entries in layers for e in entries]


def one_tarball(layers, kind="gzip"):
    """The entries of every layer in one tarball (what docker export would write)."""
    return compress(tar_bytes(flat(layers)), kind)


# ==== import --tocontainer

def test_import_tocontainer_from_a_file_is_what_create_makes(env, tmpdir):
    layers = [whiteout_layers()[0]]
    env.add("ref", Image(layers))
    path = write(str(tmpdir.join("rootfs.tar.gz")), one_tarball(layers))
    cid = new_id(ok(env, "import", "--tocontainer", path))
    assert os.path.exists(path)
    assert tree(env.root(cid)) == tree(env.root(env.create("ref")))
    assert read(env.store.path(cid, "imagerepo.name")) == b"IMPORTED:unknown"
    config = json.loads(read(env.store.path(cid, "container.json")).decode())
    assert (config["os"], config["architecture"]) == ("linux", udocker.Platform.host().arch)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(
        tar_bytes(layers[0])).hexdigest()]
    assert "%s . W %-18s IMPORTED:unknown" % (cid, "") in ok(env, "ps").decode()
    no_leftovers(env)


@pytest.mark.parametrize("kind", ["tar", "gzip", "bzip2", "xz", "zstd"])
def test_import_tocontainer_from_stdin_with_name_image_and_platform(env, kind):
    if kind in ("xz", "zstd") and not have(kind):
        pytest.skip("%s not installed" % kind)
    layers = [busybox_layer()]
    rc, out, err = env.run("import", "--tocontainer", "--name=box", "--mv",
                           "--platform=linux/arm64/v8", "-", "some/img:2",
                           input=one_tarball(layers, kind))
    assert rc == 0 and "--mv" in err, err
    cid = new_id(out)
    assert env.store.find("box") == cid
    assert read(env.store.path(cid, "imagerepo.name")) == b"some/img:2"
    config = json.loads(read(env.store.path(cid, "container.json")).decode())
    assert (config["os"], config["architecture"], config["variant"]) == \
        ("linux", "arm64", "v8")
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(
        tar_bytes(layers[0])).hexdigest()]
    env.add("ref", Image(layers))
    assert tree(env.root(cid)) == tree(env.root(env.create("ref")))
    one_line_error(env.run("import", "--tocontainer", "--name=box", "-", input=b"x"),
                   "already exists")
    assert len(env.store.list()) == 2


def test_import_tocontainer_image_without_tag_is_latest(env, tmpdir):
    path = write(str(tmpdir.join("r.tar")), one_tarball([busybox_layer()], "tar"))
    cid = new_id(ok(env, "import", "--tocontainer", path, "myimg"))
    assert read(env.store.path(cid, "imagerepo.name")) == b"myimg:latest"


# ==== export: the owners and modes the image asked for

def test_export_gives_back_what_the_layers_asked_for(env, tmpdir):
    layers = rootfs_layers()
    env.add("odd", Image(layers))
    cid = env.create("odd", name="odd")
    root = env.root(cid)
    assert stat.S_IMODE(os.lstat(os.path.join(root, "bin/tool")).st_mode) & 0o700 == 0o700
    assert stat.S_IMODE(os.lstat(os.path.join(root, "ro")).st_mode) & 0o700 == 0o700
    out_file = str(tmpdir.join("out.tar"))
    rc, out, err = env.run("export", "-o", out_file, "odd")
    assert rc == 0 and out == "" and "Info: exporting to file %s" % out_file in err
    found = members(read(out_file))
    assert found.pop(".")[0] == tarfile.DIRTYPE
    assert found == expected_members(layers)
    assert found["./bin/tool"][1] == 0o555 and found["./ro"][1] == 0o500
    assert found["./home/u/g"][2:4] == (1000, 100) and found["./tmp"][1] == 0o1777
    # what export wrote imports to the same tree, and exports the same again
    again = new_id(ok(env, "import", "--tocontainer", out_file))
    assert tree(env.root(again)) == tree(root)
    assert members(ok(env, "export", "-", again)) == members(read(out_file))


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


# ==== export --clone / import --clone

def test_clone_round_trip_keeps_tree_metadata_and_mode(env, tmpdir):
    env.add("rt", Image(odd_layers() + hardlink_layers() + rootfs_layers()))
    cid = env.create("rt", name="orig")
    ok(env, "setup", "--execmode=P2", "orig")
    path = str(tmpdir.join("clone.tar"))
    ok(env, "export", "--clone", "-o", path, "orig")
    new = new_id(ok(env, "import", "--clone", "--name=copy", path))
    by_stdin = new_id(ok(env, "import", "--clone", "-", input=ok(env, "export", "--clone",
                                                                     "-", "orig")))
    old_files = container_files(env, cid)
    assert old_files["execmode"] == b"P2" and old_files[".udocker-py/attrs"].count(b"\n") > 5
    for other in (new, by_stdin):
        assert other != cid and env.store.find("copy") == new
        assert tree(env.root(other)) == tree(env.root(cid))
        assert container_files(env, other) == old_files
        assert members(ok(env, "export", "-", other)) == members(ok(env, "export", "-", cid))
    rows = [l for l in ok(env, "ps", "-m").decode().splitlines() if l.startswith(new)]
    assert rows[0].startswith("%s . W P2 ['copy']" % new) and "rt:latest" in rows[0]
    no_leftovers(env)


def test_clone_command_and_clone_tarball_agree(env, tmpdir):
    env.add("hl", Image(hardlink_layers()))
    cid = env.create("hl")
    copy = new_id(ok(env, "clone", cid))
    data = ok(env, "export", "--clone", "-", copy)
    imported = new_id(ok(env, "import", "--clone", "-", input=data))
    assert tree(env.root(imported)) == tree(env.root(cid)) == tree(env.root(copy))


# ==== bad input: one line, nothing left behind

def clone_tar(entries, meta=True):
    """An export --clone tarball: ROOT/ holding entries (names and hardlink targets moved
    below ROOT/), container.json and imagerepo.name."""
    moved = []
    for info, data in entries:
        info.name = "ROOT/" + info.name.lstrip("/")
        if info.islnk():
            info.linkname = "ROOT/" + info.linkname.lstrip("/")
        moved.append((info, data))
    extra = [f("container.json", b'{"architecture": "amd64", "os": "linux"}'),
             f("imagerepo.name", b"hostile:1")] if meta else []
    return tar_bytes([d("ROOT")] + moved + extra)


def bad_tarballs(how):
    good = clone_tar(busybox_layer()) if how == "--clone" else tar_bytes(busybox_layer())
    gz = compress(good, "gzip")
    return {
        "not-a-tar": (b"this is not a tar archive\n" * 100, "not a tar"),
        "empty-file": (b"", "not a tar"),
        "truncated-tar": (good[:len(good) // 2], "truncated"),
        "truncated-gzip": (gz[:len(gz) // 2], "truncated"),
        "corrupt-gzip": (gz[:100] + b"\xff" * 200 + gz[300:], "corrupt"),
        "no-members": (tar_bytes([]), "no ROOT" if how == "--clone" else "no files"),
    }


@pytest.mark.parametrize("how", ["--tocontainer", "--clone"])
@pytest.mark.parametrize("case", sorted(bad_tarballs("")))
def test_bad_tarball_fails_in_one_line_and_leaves_nothing(env, tmpdir, case, how):
    data, needle = bad_tarballs(how)[case]
    path = write(str(tmpdir.join("bad.tar")), data)
    one_line_error(env.run("import", how, "--name=bad", path), needle)
    if case in ("not-a-tar", "truncated-gzip"):
        one_line_error(env.run("import", how, "-", input=data), needle)
    assert env.containers_dir_entries() == []


@pytest.mark.parametrize("how", ["--tocontainer", "--clone"])
def test_undecompressable_tarball_is_an_archive_error_naming_it(env, tmpdir, how, monkeypatch):
    """A zstd tarball with nothing to decompress it (no zstd on PATH; before Python 3.14)
    fails as every other bad tarball does: ArchiveError, "Error: TARBALL: ...". (Its class
    was once chosen by matching the message text, which this one did not match.)"""
    path = write(str(tmpdir.join("z.tar.zst")), b"\x28\xb5\x2f\xfd" + b"\x00" * 600)
    line = one_error_line(env.run("import", how, "--name=z", path,
                                  env={"PATH": "/nonexistent"})[2])
    assert line.startswith("Error: %s: " % path) and "zstd" in line, line
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(udocker.ArchiveError) as caught:
        udocker.import_container(env.store, env.cfg, path, image=None if how == "--clone"
                                 else "z:1", platform=udocker.Platform.host())
    assert str(caught.value).startswith(path + ": ") and "zstd" in str(caught.value)
    assert env.containers_dir_entries() == []


def test_clone_refuses_what_is_not_a_container_directory(env, tmpdir):
    cases = [
        (one_tarball([busybox_layer()]), "root file system tarball"),
        (tar_bytes([f("container.json", b"{}"), f("imagerepo.name", b"x:1"),
                    d("other"), f("other/file", b"x")]), "no ROOT directory"),
        (tar_bytes([sym("ROOT", env.sentinel), f("ROOT/evil", b"x"),
                    f("container.json", b"{}")]), "no ROOT directory"),
        (tar_bytes([f("ROOT", b"a file"), f("container.json", b"{}")]), "no ROOT directory"),
    ]
    for data, needle in cases:
        path = write(str(tmpdir.join("c.tar")), data)
        one_line_error(env.run("import", "--clone", path), needle)
    one_line_error(env.run("import", "--clone", str(tmpdir.join("missing.tar"))),
                   "does not exist")
    assert env.containers_dir_entries() == []
    env.check_untouched()


# ==== hostile tarballs: nothing is written outside the container

@pytest.mark.parametrize("how", ["tocontainer", "clone"])
@pytest.mark.parametrize("case", sorted(hostile_images(type("E", (), {"sentinel": "/s"}))))
def test_hostile_tarball_writes_nothing_outside(env, tmpdir, case, how, capsys):
    entries = flat(hostile_images(env)[case])
    data = tar_bytes(entries) if how == "tocontainer" else clone_tar(entries)
    path = write(str(tmpdir.join("h.tar")), data)
    try:
        cid = udocker.import_container(env.store, env.cfg, path,
                                       image=None if how == "clone" else "h:1",
                                       platform=udocker.Platform.host())
    except udocker.UdockerError as exc:
        assert "\n" not in str(exc)
        cid = None
    env.check_untouched()
    no_leftovers(env)
    assert env.containers_dir_entries() == ([cid] if cid else [])
    if cid:
        assert inside(env.store.path(cid))
        assert udocker.RunContainer.from_store(env.store, cid).root == \
            os.path.realpath(env.root(cid))


def test_hostile_clone_metadata(env, tmpdir, capsys):
    target = os.path.join(env.sentinel, "file")
    data = tar_bytes([d("ROOT"), f("ROOT/ok", b"ok"), sym("container.json", target),
                      sym("execmode", target), sym(".mountpoints", env.sentinel),
                      d(".run"), sym(".run/passwd", target), sym("imagerepo.name", target),
                      f("../../escape", b"x"), f("/abs", b"x")])
    cid = udocker.import_container(env.store, env.cfg, write(str(tmpdir.join("m.tar")), data))
    err = capsys.readouterr().err
    assert "skipped symlink outside ROOT: container.json" in err and "hostile name" in err
    cdir = env.store.path(cid)
    links = [os.path.join(p, n) for p, ds, fs in os.walk(cdir) for n in ds + fs
             if os.path.islink(os.path.join(p, n))]
    assert links == []
    assert read(os.path.join(cdir, "imagerepo.name")) == b"IMPORTED:unknown"
    assert sorted(os.listdir(cdir)) == [".run", "ROOT", "abs", "imagerepo.name"]
    rc, out, err = env.run("inspect", cid)
    assert rc == 1 and "container.json" in err
    env.check_untouched()


# ==== udocker 1.3.17 imports our export --clone, and we import its own

def upstream(env, udocker_dir, *args):
    environ = dict(env.environ, UDOCKER_DIR=udocker_dir, UDOCKER_TARBALL="")
    proc = subprocess.Popen([UPSTREAM] + list(args), env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.communicate()[0].decode("utf-8", "replace")
    assert proc.returncode == 0, "udocker 1.3.17 %s:\n%s" % (" ".join(args), out)
    return out


def upstream_tree(root):
    """tree() without the special bits and the group/other write bits of directories:
    upstream's extraction (tar --no-same-permissions) applies the umask to them, we keep
    them (tmp/ is 1777 here, 755 there)."""
    return dict((k, v[:1] + (v[1] & (0o755 if stat.S_ISDIR(v[0]) else 0o777),) + v[2:])
                for k, v in tree(root).items())


@needs_upstream
def test_upstream_imports_our_clone(env, tmpdir):
    env.add("rt", Image(hardlink_layers() + rootfs_layers()))
    cid = env.create("rt", name="ours")
    ok(env, "setup", "--execmode=P2", "ours")
    path = str(tmpdir.join("ours.tar"))
    ok(env, "export", "--clone", "-o", path, "ours")
    other = str(tmpdir.join("up"))
    upstream(env, other, "import", "--clone", "--name=theirs", path)
    assert "P2 ['theirs']" in upstream(env, other, "ps", "-m")
    theirs = os.path.join(other, "containers", "theirs")
    assert upstream_tree(os.path.join(theirs, "ROOT")) == upstream_tree(env.root(cid))
    assert read(os.path.join(theirs, "imagerepo.name")) == b"rt:latest"
    assert read(os.path.join(theirs, "container.json")) == \
        read(env.store.path(cid, "container.json"))


@needs_upstream
def test_we_import_an_upstream_clone(env, tmpdir):
    other = str(tmpdir.join("up"))
    rootfs = write(str(tmpdir.join("r.tar")), one_tarball([busybox_layer() + [
        d("h"), f("h/a", b"a", 0o640), hard("h/b", "h/a"), d("h/ro", 0o555)]], "tar"))
    upstream(env, other, "import", "--tocontainer", "--name=theirs", rootfs, "upimg:3")
    upstream(env, other, "setup", "--execmode=P2", "theirs")
    path = str(tmpdir.join("theirs.tar"))
    upstream(env, other, "export", "--clone", "-o", path, "theirs")
    cid = new_id(ok(env, "import", "--clone", "--name=ours", path))
    rows = ok(env, "ps", "-m").decode()
    assert "%s . W P2 ['ours']" % cid in rows and "upimg:3" in rows
    theirs = os.path.join(other, "containers", "theirs")
    assert tree(env.root(cid)) == tree(os.path.join(theirs, "ROOT"))
    assert read(env.store.path(cid, "container.json")) == \
        read(os.path.join(theirs, "container.json"))
    found = members(ok(env, "export", "-", "ours"))
    assert found["./h/a"][1:4] == (0o640, 0, 0)


# ==== an F3 container moves by export --clone / import --clone (tools tarball needed)

def test_imported_f3_clone_is_set_up_again_on_its_first_run(world, tmpdir):
    cid = world.container("F3", fresh=True)
    path = str(tmpdir.join("f3.tar"))
    rc, out, err = world.ud(["export", "--clone", "-o", path, cid])
    assert rc == 0, err
    rc, out, err = world.ud(["import", "--clone", path])
    assert rc == 0 and "set up for its new place on its first run" in err, err
    new = out.strip()
    root = os.path.join(world.ud_dir, "containers", new, "ROOT")
    rc, out, err = world.run("F3", ["sh", "-c", "ls -d /usr; readlink /lib64/ld-linux-*"],
                             name=new)
    assert rc == 0 and "setting up container %s" % new in err, err
    assert out == "/usr\n/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n"
    assert udocker.elf_info(os.path.join(root, "usr/bin/ls"))["interp"].startswith(root + "/")
    rc, out, err = world.ud(["setup", new])
    assert "execmode: F3" in out
    rc, out, err = world.run("F3", ["true"], name=cid)          # the original still runs
    assert rc == 0 and "setting up" not in err, err


@pytest.mark.parametrize("target,needle", [
    (".", "output is a directory: ."), ("/nonexistent/x.tar", "no such directory: /nonexistent"),
    ("", "empty output file name"), ("sentinel/file/x.tar", "not a directory: "),
    ("/dev/null/x.tar", "not a directory: /dev/null")])
def test_export_output_errors_name_the_output_not_a_temp_file(env, target, needle):
    env.add("bb", Image([busybox_layer()]))
    env.create("bb", name="bb")
    rc, out, err = env.run("export", "-o", target, "bb")
    assert rc == 1 and one_error_line(err).startswith("Error: export: " + needle), err
