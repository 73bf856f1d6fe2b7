"""Container creation (section 8): flattening layers into ROOT safely and faithfully, and the
container commands (create, ps, rm, name, rmname, rename, clone, export).

Images are built here with tarfile and written straight into a test repository; umoci
(`umoci unpack --rootless`) is the reference for what a flattened tree must contain.
"""
from __future__ import print_function, absolute_import

import gzip
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile

import pytest

import udocker
from support.runner import Udocker

MTIME = 1600000000
BUSYBOX = "/bin/busybox"
PY3 = sys.version_info[0] >= 3
ID_RE = re.compile(r"^[a-z0-9]+-[a-z0-9]+-[a-z0-9]+-[a-z0-9]+-[a-z0-9]+$")   # a container id


def have(program):
    return udocker.which(program, os.environ.get("PATH", "")) is not None


# -- building layers

def entry(name, kind="file", data=b"", mode=None, link="", uid=0, gid=0, mtime=MTIME):
    """(TarInfo, data) of one layer member; name is text (bytes allowed for odd names)."""
    if isinstance(name, bytes) and PY3:
        name = name.decode("utf-8", "surrogateescape")
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                 "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                 "chr": tarfile.CHRTYPE}[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    info.linkname = link
    info.uid, info.gid, info.mtime = uid, gid, mtime
    info.size = len(data) if kind == "file" else 0
    if kind == "chr":
        info.devmajor, info.devminor = 1, 3
    return info, data


def f(name, data=b"", mode=0o644, **kw):
    return entry(name, "file", data, mode, **kw)


def d(name, mode=0o755, **kw):
    return entry(name, "dir", mode=mode, **kw)


def sym(name, target):
    return entry(name, "sym", link=target, mode=0o777)


def hard(name, target):
    return entry(name, "hard", link=target)


def wh(path):
    parent, _, base = path.rpartition("/")
    return f((parent + "/" if parent else "") + ".wh." + base)


def tar_bytes(entries, fmt=tarfile.PAX_FORMAT if PY3 else tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    archive = tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                           errors="surrogateescape" if PY3 else "strict")
    for info, data in entries:
        archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    archive.close()
    return buf.getvalue()


def compress(raw, kind):
    if kind == "tar":
        return raw
    if kind == "gzip":
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as handle:
            handle.write(raw)
        return buf.getvalue()
    if kind == "bzip2":
        import bz2
        return bz2.compress(raw)
    program = {"xz": ["xz", "-c"], "zstd": ["zstd", "-q", "-c"]}[kind]
    proc = subprocess.Popen(program, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc.communicate(raw)[0]


MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "tar": "application/vnd.oci.image.layer.v1.tar",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
         "bzip2": "application/vnd.oci.image.layer.v1.tar+bzip2",
         "xz": "application/vnd.oci.image.layer.v1.tar+xz"}


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Image(object):
    """Blobs of one image: layers (raw tar bytes, compression), config, manifest."""

    def __init__(self, layers, compression="gzip", config=None, blobs=None):
        """layers: lists of entries or raw tar bytes; blobs: layer files as they are."""
        self.raw = [tar_bytes(l) if isinstance(l, list) else l for l in layers]
        kinds = compression if isinstance(compression, list) else [compression] * len(layers)
        self.kinds = kinds
        self.blobs = blobs or [compress(raw, kind) for raw, kind in zip(self.raw, kinds)]
        conf = {"architecture": "amd64", "os": "linux",
                "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
                "rootfs": {"type": "layers", "diff_ids": [sha(r) for r in self.raw]}}
        conf.update(config or {})
        self.config = json.dumps(conf, sort_keys=True).encode("utf-8")
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(self.config), "size": len(self.config)},
            "layers": [{"mediaType": MEDIA[k], "digest": sha(b), "size": len(b)}
                       for b, k in zip(self.blobs, kinds)]}, sort_keys=True).encode("utf-8")

    def oci_layout(self, path, tag="test"):
        """Write an OCI image layout directory (what umoci reads)."""
        blobs = os.path.join(path, "blobs", "sha256")
        os.makedirs(blobs)
        for data in self.blobs + [self.config, self.manifest]:
            with open(os.path.join(blobs, sha(data)[7:]), "wb") as handle:
                handle.write(data)
        with open(os.path.join(path, "oci-layout"), "w") as handle:
            handle.write('{"imageLayoutVersion": "1.0.0"}')
        with open(os.path.join(path, "index.json"), "w") as handle:
            json.dump({"schemaVersion": 2, "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha(self.manifest), "size": len(self.manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag}}]}, handle)


# -- a test repository with a sentinel beside it

def snapshot(top):
    """What can be seen of a tree: type, mode, content or target, mtime (not a symlink's)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as handle:
                    what = handle.read()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            else:
                what = None
            mtime = None if stat.S_ISLNK(st.st_mode) else int(st.st_mtime)  # 2.7: no lutimes
            found[os.path.relpath(path, top)] = (st.st_mode, what, mtime, st.st_nlink)
    return found


class Env(object):
    """tmp/ud (UDOCKER_DIR), tmp/home (HOME) and tmp/sentinel, which nothing may touch."""

    def __init__(self, tmpdir):
        self.top = str(tmpdir)
        self.ud = os.path.join(self.top, "ud")
        self.home = os.path.join(self.top, "home")
        self.sentinel = os.path.join(self.top, "sentinel")
        for path in (self.home, os.path.join(self.sentinel, "sub")):
            os.makedirs(path)
        for path in (os.path.join(self.home, ".bashrc"), os.path.join(self.sentinel, "file"),
                     os.path.join(self.sentinel, "sub", "file")):
            with open(path, "w") as handle:
                handle.write("sentinel\n")
        self.environ = {"UDOCKER_DIR": self.ud, "HOME": self.home, "UDOCKER_NOSYSCONF": "1",
                        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                        "UDOCKER_LOGLEVEL": "3"}
        os.makedirs(self.ud)
        with open(os.path.join(self.ud, "udocker.conf"), "w") as handle:
            handle.write("[DEFAULT]\npull_retries = 1\ntimeout = 2\nctimeout = 2\n")
        self.run = Udocker(tmpdir)            # udocker.py started the way every test does
        self.run.udocker_dir = self.ud
        self.run.env["UDOCKER_LOGLEVEL"] = "3"
        self.cfg = udocker.Config.load(self.environ, {})
        self.session = udocker.Session(self.cfg)
        self.session.repo.ensure()
        self.store = self.session.containers
        self.before = self.outside()

    def outside(self):
        return (snapshot(self.home), snapshot(self.sentinel))

    def add(self, name, image, tag="latest"):
        repo = self.session.repo
        digests = []
        for blob in [image.config] + image.blobs:
            digest = sha(blob)
            with open(repo.blob_path(digest), "wb") as handle:
                handle.write(blob)
            digests.append(digest)
        repo.commit_image_v2(name, tag, image.manifest, digests, {})
        return image

    def create(self, image_name, tag="latest", **kw):
        image = self.session.repo.image(image_name, tag)
        return udocker.create_container(self.store, image, **kw)

    def root(self, cid):
        return self.store.path(cid, "ROOT")

    def containers_dir_entries(self):
        return sorted(os.listdir(self.store.dir))

    def check_untouched(self):
        assert self.outside() == self.before


@pytest.fixture
def env(tmpdir):
    return Env(tmpdir)


def tree(root, umoci=False):
    """{path: (type, mode, content or target, hardlink group)} of a flattened tree.

    umoci=True maps umoci's modes (as in the tar) through udocker.py's rules first.
    """
    found = {}
    inodes = {}
    modes = {}                      # inode -> mode before this function made it readable
    umask = udocker.current_umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            mode = modes.setdefault(st.st_ino, stat.S_IMODE(st.st_mode))
            kind = stat.S_IFMT(st.st_mode)
            if umoci and not stat.S_ISLNK(st.st_mode):
                if mode & 0o700 != 0o700:                  # umoci keeps 0000, 0555 ...
                    os.chmod(path, mode | 0o700)
                mode = udocker.disk_mode(mode, stat.S_ISDIR(st.st_mode), umask)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as handle:
                    what = hashlib.sha256(handle.read()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                what, mode = os.readlink(path), 0
            else:
                what = None
            found[rel] = [kind, mode, what, st.st_ino]
    for rel, value in found.items():
        value[3] = tuple(sorted(inodes.get(value[3], []))) if value[0] == stat.S_IFREG \
            else ()
        found[rel] = tuple(value)
    return found


def umoci_tree(tmpdir, image):
    layout = os.path.join(str(tmpdir), "oci")
    bundle = os.path.join(str(tmpdir), "bundle")
    image.oci_layout(layout)
    subprocess.check_call(["umoci", "unpack", "--rootless", "--image", layout + ":test",
                           bundle], stdout=subprocess.PIPE)
    result = tree(os.path.join(bundle, "rootfs"), umoci=True)
    udocker.remove_tree(bundle)
    udocker.remove_tree(layout)
    return result


# -- test images

def busybox_layer():
    with open(BUSYBOX, "rb") as handle:
        data = handle.read()
    entries = [d("bin"), f("bin/busybox", data, 0o755), d("etc"), d("tmp", 0o1777),
               f("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"), d("root", 0o700),
               d("usr"), d("usr/bin"), sym("usr/bin/env", "../../bin/busybox")]
    entries += [hard("bin/" + applet, "bin/busybox") for applet in ("ls", "cat")]
    entries += [sym("bin/" + applet, "busybox") for applet in ("sh", "echo", "true")]
    return entries


def whiteout_layers():
    base = busybox_layer() + [
        d("top"), f("top/a", b"a"), d("gone"), f("gone/x", b"x"), f("toplevel", b"t"),
        d("etc/deep"), d("etc/deep/er"), f("etc/deep/er/file", b"f"), f("etc/deep/er/keep", b"k"),
        d("opq"), f("opq/old", b"o"), d("opq/sub"), f("opq/sub/old", b"o"),
        f("replaced", b"file"), d("dir2sym"), f("dir2sym/x", b"x"), sym("sym2dir", "top"),
        d("ro", 0o555), f("ro/inside", b"r", 0o444)]
    middle = [wh("toplevel"), wh("gone"), d("etc"), d("etc/deep"), d("etc/deep/er"),
              wh("etc/deep/er/file"), d("opq"), f("opq/.wh..wh..opq"), f("opq/new", b"n"),
              d("replaced"), f("replaced/now", b"dir"), sym("dir2sym", "top"),
              d("sym2dir"), f("sym2dir/real", b"real"), f("top/b", b"b")]
    top = [f("gone", b"back as a file"), wh("top/a"), f(".wh.nothing-here"),
           d("opq2"), f("opq2/.wh..wh..opq"), f("opq2/mine", b"m")]
    return [base, middle, top]


def hardlink_layers():
    one = [d("h"), f("h/orig", b"original", 0o755), hard("h/same", "h/orig"),
           f("h/later", b"v1"), f("h/hidden", b"hidden data"), hard("h/keeps", "h/hidden"),
           f("h/target", b"t1"), sym("h/sym", "orig"), hard("h/symlink-link", "h/sym")]
    two = [hard("h/cross", "h/orig"), hard("h/old-later", "h/later"), f("h/later", b"v2"),
           hard("h/cross-sym", "h/sym")]
    three = [wh("h/hidden"), f("h/target", b"t3")]
    return [one, two, three]


def odd_layers():
    return [[d("x"), entry("x/fifo", "fifo", mode=0o640), f("x/suid", b"s", 0o4755),
             f("x/sgid", b"g", 0o2711), f("x/none", b"n", 0o000), d("x/ro", 0o555),
             f("x/ro/file", b"r", 0o400), d("x/empty-ro", 0o500),
             sym("chain1", "chain2"), sym("chain2", "chain3"), sym("chain3", "/x/suid"),
             sym("dangling", "/does/not/exist"), sym("abs", "/etc/passwd"),
             f(u"x/caf\u00e9", b"utf8"), f(b"x/latin-\xe9", b"latin1"),
             f("x/" + "long" * 40, b"long name"), f("./dot/slash", b"ds"),
             f("/absolute/member", b"abs"), d("x/owned", uid=1000, gid=100)],
            [f("x/suid", b"s2", 0o4755), d("x/ro", 0o555), f("x/ro/file2", b"r2")]]


def glibc_layer():
    """A few host binaries and every library they load, at their real paths, plus the
    host's merged-/usr symlinks (bin -> usr/bin ...): what a distribution layer holds."""
    entries, seen = [], set()

    def add_dir(path):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            name = "/".join(parts[:i])
            if name and name not in seen:
                seen.add(name)
                entries.append(d(name))

    def add(path):
        real_dir = os.path.realpath(os.path.dirname(path))
        name = os.path.join(real_dir, os.path.basename(path)).lstrip("/")
        if name in seen:
            return
        add_dir(real_dir)
        seen.add(name)
        if os.path.islink(path):
            target = os.readlink(path)
            entries.append(sym(name, target))
            add(os.path.join(real_dir, target))
        else:
            with open(path, "rb") as handle:
                entries.append(f(name, handle.read(), 0o755))

    for top in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + top):
            seen.add(top)
            entries.append(sym(top, os.readlink("/" + top)))
    for program in ("/bin/ls", "/bin/cat", "/usr/bin/env"):
        out = subprocess.Popen(["ldd", program], stdout=subprocess.PIPE).communicate()[0]
        add(program)
        for line in out.decode().splitlines():
            for word in line.split():
                if word.startswith("/") and os.path.exists(word):
                    add(os.path.normpath(word))
    return entries


# ==== flattening: content against umoci

IMAGES = {
    "busybox": lambda: Image([busybox_layer()]),
    "whiteouts": lambda: Image(whiteout_layers()),
    "hardlinks": lambda: Image(hardlink_layers()),
    "odd": lambda: Image(odd_layers(), "tar"),
    "root-opaque": lambda: Image(whiteout_layers()[:2] + [[
        f(".wh..wh..opq"), f("new", b"n"), d("etc"), f("etc/passwd", b"new"),
        hard("again", "etc/passwd")]]),
    "glibc": lambda: Image([glibc_layer()]),
}


@pytest.mark.skipif(not have("umoci"), reason="umoci not installed")
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_tree_equals_umoci_unpack(env, tmpdir, name):
    image = env.add(name, IMAGES[name]())
    cid = env.create(name)
    assert tree(env.root(cid)) == umoci_tree(tmpdir, image)
    env.check_untouched()


def test_whiteouts_at_every_depth(env):
    env.add("wh", Image(whiteout_layers()))
    root = env.root(env.create("wh"))
    names = set(os.listdir(root))
    assert "toplevel" not in names and "nothing-here" not in names
    assert not any(n.startswith(".wh.") for _, _, fs in os.walk(root) for n in fs)
    with open(os.path.join(root, "gone"), "rb") as handle:
        assert handle.read() == b"back as a file"
    assert sorted(os.listdir(os.path.join(root, "etc/deep/er"))) == ["keep"]
    assert sorted(os.listdir(os.path.join(root, "opq"))) == ["new"]
    assert sorted(os.listdir(os.path.join(root, "opq2"))) == ["mine"]
    assert os.listdir(os.path.join(root, "top")) == ["b"]
    assert os.readlink(os.path.join(root, "dir2sym")) == "top"
    assert sorted(os.listdir(os.path.join(root, "sym2dir"))) == ["real"]


def test_hardlinks_within_and_across_layers(env):
    env.add("hl", Image(hardlink_layers()))
    root = env.root(env.create("hl"))

    def ino(name):
        return os.lstat(os.path.join(root, "h", name)).st_ino

    def content(name):
        with open(os.path.join(root, "h", name), "rb") as handle:
            return handle.read()

    assert ino("orig") == ino("same") == ino("cross")
    assert content("old-later") == b"v1" and content("later") == b"v2"
    assert content("keeps") == b"hidden data"
    assert not os.path.exists(os.path.join(root, "h", "hidden"))
    assert ino("sym") == ino("cross-sym") == ino("symlink-link")
    assert os.stat(os.path.join(root, "h", "orig")).st_mode & 0o777 == 0o755


def test_modes_times_and_recorded_attrs(env):
    env.add("odd", Image(odd_layers(), "tar"))
    cid = env.create("odd")
    root = env.root(cid)
    umask = udocker.current_umask()

    def mode(path):
        return stat.S_IMODE(os.lstat(os.path.join(root, path)).st_mode)

    assert mode("x/suid") == (0o755 & ~umask) | 0o700
    assert mode("x/none") == 0o600
    assert mode("x/ro") == (0o555 & ~umask) | 0o700
    assert stat.S_ISFIFO(os.lstat(os.path.join(root, "x/fifo")).st_mode)
    assert os.lstat(os.path.join(root, "x/ro/file")).st_mtime == MTIME
    assert os.lstat(os.path.join(root, "x")).st_mtime == MTIME
    assert os.path.exists(os.path.join(root, "absolute/member"))
    assert os.path.exists(os.path.join(root, "dot/slash"))
    assert os.readlink(os.path.join(root, "chain3")) == "/x/suid"
    attrs = udocker.read_attrs(env.store.path(cid, ".udocker-py", "attrs"))
    assert attrs[b"x/suid"] == (0, 0, 0o4755)
    assert attrs[b"x/none"] == (0, 0, 0)
    assert attrs[b"x/owned"] == (1000, 100, 0o755)
    assert b"x/ro/file2" not in attrs or attrs[b"x/ro/file2"][2] == 0o644


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_directories_keep_write_and_sticky_bits_unless_the_umask_hides_more(env, umask):
    """/tmp 1777 stays 1777 (a non-root uid inside R1 can write there) under the usual
    umasks; a umask that hides reading from others (077) still applies (issue 16)."""
    env.add("dirs", Image([busybox_layer() + [d("group", 0o775), d("open", 0o777),
                                              f("group/file", b"x", 0o666)]]))
    old = os.umask(umask)
    try:
        root = env.root(env.create("dirs"))
    finally:
        os.umask(old)

    def mode(path):
        return stat.S_IMODE(os.lstat(os.path.join(root, path)).st_mode)

    if umask & 0o055:
        assert (mode("tmp"), mode("group"), mode("open")) == (0o1700, 0o700, 0o700)
    else:
        assert (mode("tmp"), mode("group"), mode("open")) == (0o1777, 0o775, 0o777)
    assert mode("group/file") == 0o666 & ~umask             # files: the umask as before
    assert mode("root") == 0o700


@pytest.mark.parametrize("kind", ["tar", "gzip", "bzip2", "xz", "zstd"])
def test_every_compression_gives_the_same_tree(env, kind):
    if kind in ("xz", "zstd") and not have(kind):
        pytest.skip("%s not installed" % kind)
    layers = whiteout_layers()
    env.add("ref", Image(layers, "tar"))
    env.add("img", Image(layers, kind))
    assert tree(env.root(env.create("img"))) == tree(env.root(env.create("ref")))


@pytest.mark.skipif(udocker.buffered_decompressor("zstd") is not None or not have("zstd"),
                    reason="this Python decompresses zstd itself, or no zstd to make a layer")
def test_zstd_without_a_decompressor_names_the_layer(env):
    image = env.add("z", Image([busybox_layer()], "zstd"))
    rc, out, err = env.run("create", "z", env={"PATH": "/nonexistent"})
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert sha(image.blobs[0]) in err and "zstd" in err
    assert env.containers_dir_entries() == []


@pytest.mark.skipif(udocker.buffered_decompressor("zstd") is not None or not have("zstd"),
                    reason="this Python decompresses zstd itself, or no zstd to make a layer")
def test_the_decompressor_is_looked_up_on_the_sessions_path(env):
    """main(argv, environ): the session's PATH decides, whatever os.environ holds (it has
    zstd here); the command reads no os.environ."""
    env.add("z", Image([busybox_layer()], "zstd"))
    zstd_dir = os.path.dirname(udocker.which("zstd", os.environ["PATH"]))
    for path, rc in (("/nonexistent", 1), (zstd_dir, 0)):
        session = udocker.Session(env.cfg, dict(env.environ, PATH=path))
        assert session.repo.program_path == path
        if rc:
            with pytest.raises(udocker.LayerError) as info:
                udocker.create_container(session.containers, session.repo.image("z", "latest"))
            assert "no zstd program was found" in str(info.value)
        else:
            udocker.create_container(session.containers, session.repo.image("z", "latest"))
    assert len(env.containers_dir_entries()) == 1


def test_empty_layers(env):
    """Builders write empty layers (a tar of end blocks only, e.g. the 32-byte gzip blob
    sha256:4f4fb700...); Python < 3.8's tarfile cannot be asked for a member after that."""
    env.add("empty", Image([busybox_layer(), [], [f("after", b"a")], []], ["gzip", "tar",
                                                                          "gzip", "gzip"]))
    root = env.root(env.create("empty"))
    assert os.path.exists(os.path.join(root, "after"))
    assert os.path.exists(os.path.join(root, "bin/busybox"))


def test_concatenated_gzip_members_and_mixed_layers(env):
    layers = whiteout_layers()
    raw = tar_bytes(layers[0])
    half = len(raw) // 2
    two_members = compress(raw[:half], "gzip") + compress(raw[half:], "gzip") + b"\0" * 64
    others = [tar_bytes(l) for l in layers[1:]]
    env.add("multi", Image([raw] + others, ["gzip", "tar", "bzip2"], blobs=[
        two_members, others[0], compress(others[1], "bzip2")]))
    env.add("ref", Image(layers, "tar"))
    assert tree(env.root(env.create("multi"))) == tree(env.root(env.create("ref")))


# ==== flattening: hostile layers

def hostile_images(env):
    outside = env.sentinel
    up = "../" * 12
    return {
        "dotdot": [[f("../escape", b"x"), f("a/../../escape2", b"x"), f("ok", b"ok")]],
        "abs-symlink-then-write": [[sym("link", outside)], [f("link/evil", b"x")]],
        "rel-symlink-then-write": [[sym("up", up + outside.lstrip("/"))],
                                   [f("up/evil", b"x"), d("up/sub"), f("up/sub/file", b"x")]],
        "same-layer-symlink": [[sym("s", outside), f("s/evil", b"x"), d("s/sub"),
                                sym("s/sub2", "x")]],
        "symlink-chain": [[sym("a", "b"), sym("b", outside)], [f("a/evil", b"x")]],
        "dir-replaced-by-symlink": [[d("dir"), f("dir/x", b"x")], [sym("dir", outside)],
                                    [f("dir/evil", b"x")]],
        "same-layer-dir-to-symlink": [[d("dir"), sym("dir", outside), f("dir/evil", b"x")]],
        "hardlink-outside": [[hard("h1", outside + "/file"), hard("h2", up + "etc/passwd")]],
        "hardlink-through-symlink": [[sym("s", outside), hard("h", "s/file")]],
        "hardlink-to-symlink-dir": [[sym("s", outside)], [hard("h", "s/file")]],
        "whiteout-escape": [[f("keep", b"k")], [f("../.wh.sentinel", b""),
                                               f(".wh..", b""), f("x/.wh...", b"")]],
        "huge-names": [[f("a" * 300, b"x"), f("/".join(["d"] * 2100), b"x"),
                        f("fine", b"f")]],
        "nul-name": [[f("nul\0name", b"x"), f("fine", b"f")]],
        "device": [[entry("null", "chr"), f("fine", b"f")]],
        "symlink-over-parent-later": [[f("x/file", b"x")], [sym("x", outside)]],
    }


@pytest.mark.parametrize("case", sorted(hostile_images(type("E", (), {"sentinel": "/s"}))))
def test_hostile_layer_writes_nothing_outside_root(env, case, capsys):
    layers = hostile_images(env)[case]
    env.add("bad", Image(layers))
    try:
        cid = env.create("bad")
    except udocker.UdockerError:
        cid = None
    env.check_untouched()
    assert not [n for n in env.containers_dir_entries() if n.startswith(".")]
    if cid:
        root = env.root(cid)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    assert os.path.realpath(path).startswith(os.path.realpath(root) + "/")


def test_hostile_members_are_skipped_with_a_warning(env, capsys):
    env.add("bad", Image(hostile_images(env)["dotdot"]))
    root = env.root(env.create("bad"))
    assert os.listdir(root) == ["ok"]
    assert "hostile name" in capsys.readouterr().err


def test_tar_with_unsafe_member_on_the_cli_is_one_line(env):
    env.add("bad", Image(hostile_images(env)["abs-symlink-then-write"]))
    rc, out, err = env.run("create", "bad")
    assert rc == 0 and len(out.split()) == 1
    env.check_untouched()


# ==== names longer than the file system takes: skipped with one line each, as GNU tar does

LONG_TARGET = "x" * 5000                        # a symlink target longer than PATH_MAX
LONG_NAME = "n" * 300                           # a name longer than NAME_MAX
ODD = b"bin/odd-\xff\xfe"                        # not UTF-8


def long_name_entries():
    return [d("bin"), sym("bin/longlink", LONG_TARGET), f("bin/" + LONG_NAME, b"x"),
            sym(ODD, "y" * 5000), f(b"bin/\xff-ok", b"odd but fine"), f("bin/ok", b"ok")]


def assert_long_names_skipped(rc, out, err, root_of):
    assert rc == 0 and "Traceback" not in err and "Error" not in err, err
    warnings = [l for l in err.splitlines() if l.startswith("Warning")]
    assert len(warnings) == 3, err
    assert "bin/longlink -> xxxx" in warnings[0] and "(5000 bytes)" in warnings[0]
    assert "hostile name bin/nnnn" in warnings[1] and "(304 bytes)" in warnings[1]
    assert "bin/odd-\\xff\\xfe -> yyyy" in warnings[2]
    root = root_of(out.split()[-1])
    assert sorted(to_bytes(n) for n in os.listdir(to_bytes(os.path.join(root, "bin")))) == \
        [b"ok", b"\xff-ok"]


def to_bytes(name):
    return name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")


def test_long_names_in_a_layer_are_skipped_by_create(env):
    env.add("long", Image([long_name_entries()]))
    rc, out, err = env.run("create", "long")
    assert_long_names_skipped(rc, out, err, env.root)
    env.check_untouched()


def test_long_names_in_an_imported_tar_are_skipped(env):
    path = os.path.join(env.top, "long.tar")
    with open(path, "wb") as handle:
        handle.write(tar_bytes(long_name_entries()))
    rc, out, err = env.run("import", "--tocontainer", path)
    assert_long_names_skipped(rc, out, err, env.root)
    rc, out, err = env.run("import", path, "long:1")
    assert rc == 0, err
    rc, out, err = env.run("create", "long:1")
    assert_long_names_skipped(rc, out, err, env.root)


def test_file_names_in_messages_are_printable():
    show = udocker.show_name
    assert show(b"a/\xff\xfe") == "a/\\xff\\xfe"
    assert show(u"caf\u00e9".encode("utf-8")) == (u"caf\u00e9" if PY3 else b"caf\xc3\xa9")
    assert show("a\nb") == "a\\x0ab"
    assert show("z" * 1000, 10) == "zzzzzzzzzz... (1000 bytes)"
    if PY3:
        assert show(b"\xff".decode("utf-8", "surrogateescape")) == "\\xff"
    err = OSError(36, "File name too long", b"/x/\xff")
    assert udocker.show_name(err.filename) == "/x/\\xff"


# ==== bad input: one line, no container left behind

def corrupt_images():
    good = tar_bytes(busybox_layer())
    gz = compress(good, "gzip")
    half = len(gz) // 2
    return {
        "truncated-gzip": ([gz[:half]], "truncated"),
        "truncated-tar": ([good[:len(good) // 2]], "truncated"),
        "not-a-tar": ([b"this is not a tar archive" * 100], "not a tar"),
        "garbage-inside": ([good[:2048] + b"\x07" * 512 + good[2048:]], "corrupt"),
        "corrupt-gzip": ([gz[:half] + b"\xff" * 200 + gz[half + 200:]], "corrupt"),
        "empty": ([b""], "not a tar"),
    }


@pytest.mark.parametrize("case", sorted(corrupt_images()))
def test_bad_layer_fails_in_one_line_and_leaves_nothing(env, case):
    blobs, needle = corrupt_images()[case]
    env.add("bad", Image(blobs, "tar", blobs=blobs))
    rc, out, err = env.run("create", "bad")
    assert rc == 1 and out == ""
    assert err.strip().count("\n") == 0 and err.startswith("Error: "), err
    assert needle in err
    assert env.containers_dir_entries() == []


def test_missing_layer_file_fails_in_one_line(env):
    image = env.add("img", Image([busybox_layer()]))
    os.unlink(env.session.repo.blob_path(sha(image.blobs[0])))
    rc, out, err = env.run("create", "img")
    assert rc == 1 and "layer file missing" in err and err.count("\n") == 1
    assert env.containers_dir_entries() == []
    rc, out, err = env.run("-D", "create", "img")
    assert rc == 1 and "Traceback" in err


def test_missing_image_and_no_registry(env):
    rc, out, err = env.run("create", "localhost:1/nothing", env={"UDOCKER_LOGLEVEL": "1"})
    assert rc == 1 and out == "" and err.startswith("Error: ")
    assert env.containers_dir_entries() == []


# ==== the container commands

def test_create_prints_only_the_id_and_writes_metadata(env):
    image = env.add("busybox", Image([busybox_layer()]))
    rc, out, err = env.run("create", "--name=box", "busybox")
    assert rc == 0, err
    cid = str(out.strip())
    assert out == cid + "\n" and ID_RE.match(cid)
    with open(env.store.path(cid, "imagerepo.name")) as handle:
        assert handle.read() == "busybox:latest"
    with open(env.store.path(cid, "container.json"), "rb") as handle:
        assert handle.read() == image.config
    assert os.readlink(os.path.join(env.store.dir, "box")) == cid
    rc, out, err = env.run("inspect", "-p", "box")
    assert str(out.strip()) == env.root(cid)
    rc, out, err = env.run("create", "--name=box", "busybox")
    assert rc == 1 and "already exists" in err
    rc, out, err = env.run("create", "--name=box", "--force", "busybox")
    assert rc == 0 and os.readlink(os.path.join(env.store.dir, "box")) == str(out.strip())


def test_ps_columns(env):
    env.add("busybox", Image([busybox_layer()]))
    one = env.create("busybox", name="first")
    two = env.create("busybox")
    env.store.set_protected(two, True)
    rc, out, err = env.run("ps")
    lines = out.splitlines()
    assert lines[0] == "%-36s P M %-18s %-20s" % ("CONTAINER ID", "NAMES", "IMAGE")
    rows = dict((l[:36], l) for l in lines[1:])
    assert rows[one] == "%s . W %-18s %-20s" % (one, "['first']", "busybox:latest")
    assert rows[two] == "%s P W %-18s %-20s" % (two, "", "busybox:latest")
    rc, out, err = env.run("ps", "-m", "-s", "-p")
    lines = out.splitlines()
    assert lines[0].startswith("CONTAINER ID" + " " * 24 + " P M MOD SIZE PLATFORM    ")
    row = [l for l in lines if l.startswith(one)][0]
    assert row.startswith("%s . W P1     2 linux/amd64        ['first']" % one)
    os.chmod(env.root(two), 0o555)
    os.rename(env.root(one), env.root(one) + ".moved")
    rc, out, err = env.run("ps")
    rows = dict((l[:36], l) for l in out.splitlines()[1:])
    assert rows[one][37:40] == ". N" and rows[two][37:40] == "P R"
    os.chmod(env.root(two), 0o755)


def test_rm_names_protection_and_errors(env):
    env.add("busybox", Image([busybox_layer()]))
    cid = env.create("busybox", name="box")
    env.store.add_name(cid, "alias")
    assert env.run("protect", "box")[0] == 0
    rc, out, err = env.run("rm", "alias")
    assert rc == 1 and "protected" in err and os.path.isdir(env.store.path(cid))
    assert env.run("unprotect", cid)[0] == 0
    os.chmod(os.path.join(env.root(cid), "etc"), 0o500)
    rc, out, err = env.run("rm", "box", "nosuch")
    assert rc == 1 and "Info: deleting container: %s" % cid in err and "nosuch" in err
    assert env.containers_dir_entries() == []


def test_container_ids_are_told_from_names():
    """ContainerStore.is_id (no regular expression: run's start) accepts what ID_RE does."""
    texts = [udocker.ContainerStore.new_id("x") for _ in range(20)] + [
        "a-b-c-d-e", "0-1-2-3-4", "A-b-c-d-e", "a-b-c-d", "a-b-c-d-e-f", "a--c-d-e",
        "-a-b-c-d", "a-b-c-d-", u"a-b-c-d-\xe9", "a_b-c-d-e", "a b-c-d-e", "", "-", "----"]
    for text in texts:
        assert udocker.ContainerStore.is_id(text) == bool(ID_RE.match(text)), text


def test_name_rmname_rename(env):
    env.add("busybox", Image([busybox_layer()]))
    cid = env.create("busybox")
    assert env.run("name", cid, "one")[0] == 0
    rc, out, err = env.run("name", cid, "bad/name")
    assert rc == 1 and "invalid container name" in err
    assert env.run("name", cid, "one")[0] == 1
    assert env.run("rename", "one", "two")[0] == 0
    assert env.store.find("two") == cid and env.store.find("one") is None
    rc, out, err = env.run("rmname", "two")
    assert rc == 0 and "container name: two removed." in err
    assert env.run("rmname", "two")[0] == 1
    assert env.containers_dir_entries() == [cid]


def test_clone_copies_everything(env):
    env.add("hl", Image(hardlink_layers() + odd_layers()))
    cid = env.create("hl")
    env.store.set_protected(cid, True)
    rc, out, err = env.run("clone", "--name=copy", cid)
    assert rc == 0, err
    new = str(out.strip())
    assert new != cid and env.store.find("copy") == new
    assert tree(env.root(new)) == tree(env.root(cid))
    assert snapshot(env.store.path(new)) == snapshot(env.store.path(cid))


def export_members(data):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return dict((m.name, m) for m in archive.getmembers())


def test_export_restores_recorded_owners_and_modes(env, tmpdir):
    env.add("odd", Image(odd_layers(), "tar"))
    cid = env.create("odd", name="odd")
    res = env.run("export", "-", "odd").check()
    members = export_members(res.raw_out)
    assert members["./x/suid"].mode == 0o4755 and members["./x/none"].mode == 0
    assert (members["./x/owned"].uid, members["./x/owned"].gid) == (1000, 100)
    assert members["./x/ro/file"].uid == 0 and members["./x/fifo"].isfifo()
    assert members["./chain3"].linkname == "/x/suid"
    assert members["."].isdir()
    out_file = os.path.join(str(tmpdir), "out.tar")
    rc, out, err = env.run("export", "-o", out_file, "odd")
    assert rc == 0 and "exporting to file" in err and out == ""
    with open(out_file, "rb") as handle:
        assert sorted(export_members(handle.read())) == sorted(members)
    names = export_members(env.run("export", "--clone", "-o", "-", cid).check().raw_out)
    assert "./ROOT/x/suid" in names and "./container.json" in names
    assert "./imagerepo.name" in names


def test_export_keeps_hardlinks(env):
    env.add("hl", Image(hardlink_layers()))
    members = export_members(env.run("export", "-", env.create("hl")).check().raw_out)
    links = [m for m in members.values() if m.islnk()]
    assert links and all(members["./" + m.linkname[2:]].isreg() for m in links
                         if m.linkname.startswith("./"))


# ==== concurrency

def test_two_creates_of_one_image_at_once(env):
    env.add("busybox", Image(whiteout_layers()))
    procs = [env.run.start("create", "busybox") for _ in range(2)]
    ids = [str(p.communicate()[0].decode().strip()) for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and ids[0] != ids[1]
    assert env.containers_dir_entries() == sorted(ids)
    assert tree(env.root(ids[0])) == tree(env.root(ids[1]))


def test_rm_racing_clone_leaves_a_consistent_repository(env):
    env.add("busybox", Image(whiteout_layers()))
    cid = env.create("busybox", name="src")
    expected = tree(env.root(cid))
    procs = [env.run.start(*args) for args in (["clone", "--name=copy", "src"], ["rm", "src"])]
    results = [p.communicate() for p in procs]
    assert procs[1].returncode == 0
    entries = env.containers_dir_entries()
    assert not [e for e in entries if e.startswith(".")]
    if procs[0].returncode == 0:               # the clone won: it is complete
        new = str(results[0][0].decode().strip())
        assert entries == sorted([new, "copy"]) and tree(env.root(new)) == expected
    else:                                      # the rm won: nothing left
        assert "not found" in results[0][1].decode() and entries == []


# ==== create from a registry (the shared registry fixture)

def test_create_pulls_a_missing_image_and_matches_its_layers(udocker, registry):
    from support.images import standard_images
    ref = "%s/test/multilayer" % registry.host
    res = udocker("create", "--name=multi", ref).check()
    cid = str(res.out.strip())
    assert res.out == cid + "\n" and ID_RE.match(cid)
    root = os.path.join(udocker.udocker_dir, "containers", cid, "ROOT")
    expected = dict((str(path), entry) for path, entry in
                    standard_images()["multilayer"].files().items()
                    if entry["type"] not in ("chardev", "blockdev"))
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = os.lstat(path)
    assert sorted(found) == sorted(expected)
    for path, entry in expected.items():
        st, full = found[path], os.path.join(root, path)
        kind = entry["type"]
        if kind == "hardlink":
            assert st.st_ino == found[str(entry["target"])].st_ino, path
            entry = expected[str(entry["target"])]
            kind = "file"
        if kind == "file":
            with open(full, "rb") as handle:
                assert handle.read() == entry["data"], path
        elif kind == "symlink":
            assert os.readlink(full) == entry["target"], path
        else:
            assert {"dir": stat.S_ISDIR, "fifo": stat.S_ISFIFO}[kind](st.st_mode), path
    listing = udocker("ps").check().out
    assert "%s . W ['multi']" % cid in listing and ref + ":latest" in listing
    assert udocker("images").check().out.count(ref) == 1


def test_create_with_platform_pulls_that_platform(udocker, registry):
    ref = "%s/test/multiarch" % registry.host
    cid = str(udocker("create", "--platform=linux/arm64", ref).check().out.strip())
    marker = os.path.join(udocker.udocker_dir, "containers", cid, "ROOT", "etc",
                          "test-platform")
    with open(marker) as handle:
        assert handle.read() == "linux/arm64/v8\n"
    assert "linux/arm64" in udocker("ps", "-p").check().out


def test_rm_leaves_no_lock_file(env):
    env.add("busybox", Image([busybox_layer()]))
    cid = env.create("busybox", name="box")
    env.run("setup", "box")                          # takes no lock: the file comes from rm
    assert env.run("rm", "box")[0] == 0
    assert not os.path.exists(os.path.join(env.ud, ".locks", "container-%s.lock" % cid))
    assert env.containers_dir_entries() == []


def test_too_long_name_is_refused_naming_the_name(env):
    env.add("busybox", Image([busybox_layer()]))
    cid = env.create("busybox")
    for args in (["create", "--name=" + "n" * 300, "busybox"], ["name", cid, "n" * 300]):
        rc, out, err = env.run(*args)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and "too long (300 bytes, at most 255)" in err, err
        assert lines[0].startswith("Error: invalid container name: 'nnnn") and cid not in err
    assert env.containers_dir_entries() == [cid]
