"""The F modes on the glibc of each Debian release debootstrap reaches (issue 13): bullseye
(glibc 2.31, whose programs call __xstat, __lxstat, __fxstatat), bookworm (2.36) and trixie
(2.41), whose programs call stat, lstat, fstatat. Each root file system is a tarball from
tests/images/build_release_images.sh with /usr/local/bin/fsnames compiled inside that
release (tests/images/fsnames.c): it stats, opens, accesses, readlinks a path and execs
through the names its glibc's headers chose. Real engines from the tools tarball, as the
unprivileged user; P1 is the reference. Slow (a container per release and mode): tests/run
runs this module on the last interpreter only."""
from __future__ import print_function, absolute_import

import os
import re
import struct

import pytest

import udocker
from support import require_engine_tests
from support.images import TEST_IMAGE_CACHE
from support.runner import Udocker

RELEASES = {"bullseye": "2.31", "bookworm": "2.36", "trixie": "2.41"}
# P1 is the reference; UDOCKER_TEST_RELEASE_MODES="P1 P2 R1 R2 R3 F1 F2 F3 F4" runs every
# mode (with UDOCKER_TEST_TARBALL=upstream's englib: its tools on each release)
MODES = os.environ.get("UDOCKER_TEST_RELEASE_MODES", "P1 F1 F2 F3 F4").split()
# what a program of each generation imports for stat(), lstat(), fstatat()
OLD_NAMES = ("__xstat", "__lxstat", "__fxstatat")                # glibc < 2.33
NEW_NAMES = ("stat", "lstat", "fstatat")                          # glibc >= 2.33
INODE_CALLS = ("stat", "lstat", "fstatat", "stat64", "statx", "open", "openat",
               "fstatat-dirfd")
ACCESS_CALLS = ("access", "faccessat", "faccessat-eaccess")
FSNAMES = "/usr/local/bin/fsnames"
CASES = [(release, mode) for release in sorted(RELEASES) for mode in MODES]


@pytest.fixture(scope="module")
def releases(tmpdir_factory):
    tarball = require_engine_tests()
    return Releases(tmpdir_factory.mktemp("releases"), tarball)


class Releases(object):
    """One udocker directory (tools from the tarball); a container per (release, mode),
    imported from the release's tarball and set up for the mode on first use."""

    def __init__(self, top, tarball):
        self.udocker = Udocker(top)
        self.udocker.env["UDOCKER_TARBALL"] = tarball
        self.containers = {}

    def container(self, release, mode):
        """The container's name and its ROOT."""
        key = (release, mode)
        if key not in self.containers:
            tar = os.path.join(TEST_IMAGE_CACHE, "release-%s.tar" % release)
            if not os.path.isfile(tar):
                pytest.fail("%s not found: build it as root with tests/images/"
                            "build_release_images.sh (CI does this in .ci/run)" % tar,
                            pytrace=False)
            name = "%s-%s" % (release, mode.lower())
            res = self.udocker("import", "--tocontainer", "--name=" + name, tar).check()
            cid = res.out.strip().splitlines()[-1]
            self.udocker("setup", "--execmode=" + mode, name).check()
            root = os.path.join(self.udocker.udocker_dir, "containers", cid, "ROOT")
            self.containers[key] = (name, root)
        return self.containers[key]

    def upstream_tools(self):
        """Are the installed tools upstream's (libfakechroot-DISTRO-VERSION-ARCH.so)?"""
        lib = os.path.join(self.udocker.udocker_dir, "lib")
        return any(n.startswith("libfakechroot-") and "glibc" not in n and "musl" not in n
                   for n in os.listdir(lib)) if os.path.isdir(lib) else False

    def run(self, release, mode, argv, options=()):
        name = self.container(release, mode)[0]
        return self.udocker("run", "--nobanner", *(list(options) + [name] + list(argv)))


def imported_names(path):
    """The names of the undefined dynamic symbols of an x86_64 ELF file (its .dynsym), as
    objdump -T lists them (the programs' own strings do not count)."""
    with open(path, "rb") as handle:
        data = handle.read()
    shoff, = struct.unpack("<Q", data[40:48])
    shentsize, shnum = struct.unpack("<HH", data[58:62])
    sections = [struct.unpack("<IIQQQQIIQQ", data[shoff + i * shentsize:][:64])
                for i in range(shnum)]
    names = set()
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 11:                                             # SHT_DYNSYM
            continue
        strings = sections[link][4]
        for at in range(offset + entsize, offset + size, entsize):
            name, _, _, shndx = struct.unpack("<IBBH", data[at:at + 8])
            if shndx == 0:                                         # undefined: imported
                names.add(data[strings + name:data.index(b"\0", strings + name)].decode())
    return names


def fsnames_lines(out):
    """{call: value} of fsnames' "NAME VALUE" lines (the rest: what exec printed)."""
    found = {}
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        if name in INODE_CALLS + ACCESS_CALLS + ("readlink", "realpath", "getcwd"):
            found[name] = value
    return found


def expected_calls(inode, link_target, real, cwd):
    expected = dict((call, str(inode)) for call in INODE_CALLS)
    expected.update((call, "0") for call in ACCESS_CALLS)
    expected.update({"readlink": link_target, "realpath": real, "getcwd": cwd})
    return expected


def container_path(root, host_path):
    """The container path of a host path under root."""
    return "/" + os.path.relpath(host_path, root)


@pytest.mark.parametrize("release,mode", CASES)
def test_commands_run_on_the_release_glibc(releases, release, mode):
    """The release's own programs run on its own glibc; an F mode preloads a libfakechroot
    built for a glibc no newer than the container's."""
    script = ("getconf GNU_LIBC_VERSION; . /etc/os-release; echo $VERSION_CODENAME;"
              " ls -d /usr/bin /etc/apt; grep -o 'libfakechroot[^/]*[.]so' /proc/self/maps"
              " | sort -u")
    res = releases.run(release, mode, ["sh", "-c", script])
    assert res.rc == 0, res
    lines = res.out.splitlines()
    assert lines[:4] == ["glibc " + RELEASES[release], release, "/etc/apt", "/usr/bin"], res
    libraries = lines[4:]
    if not mode.startswith("F"):
        assert libraries == [], res
    else:
        assert len(libraries) == 1, res
        built_for = libraries[0].partition("glibc")[2].split("-")[0]
        if built_for:                                  # ours: libfakechroot-glibcX.Y-ARCH.so
            assert udocker.version_at_least(RELEASES[release], built_for), res


@pytest.mark.parametrize("release,mode", CASES)
def test_stat_names_of_the_release_reach_the_container_file(releases, release, mode, request):
    """fsnames, compiled in the release, calls the stat family by its glibc's names: each
    call on /etc/debian_version gives the container file's inode (not the host's), access
    says readable, readlink and realpath of the loader's link give container paths, getcwd
    the -w directory, and execve of the container's /bin/sh runs it (with argv[0] as given,
    but in F1 and F2 before glibc 2.33, and with upstream's libfakechroot). Upstream's
    libfakechroot wraps only the names before glibc 2.33 (__xstat ...): an expected failure
    after (udocker 1.3.17 too)."""
    name, root = releases.container(release, mode)
    if mode.startswith("F") and releases.upstream_tools() and \
            udocker.version_at_least(RELEASES[release], "2.33"):
        request.node.add_marker(pytest.mark.xfail(reason="upstream's libfakechroot wraps "
                                                  "__xstat, not stat", strict=False))
    imports = imported_names(os.path.join(root, "usr", "local", "bin", "fsnames"))
    imported = [n for n in OLD_NAMES + NEW_NAMES if n in imports]
    assert imported == list(NEW_NAMES if udocker.version_at_least(RELEASES[release], "2.33")
                            else OLD_NAMES)
    inode = os.stat(os.path.join(root, "etc", "debian_version")).st_ino
    assert inode != os.stat("/etc/debian_version").st_ino
    link = os.path.join(root, "lib64", "ld-linux-x86-64.so.2")
    target = os.readlink(link)
    target = target[len(root):] if target.startswith(root + "/") else target   # F setup
    real = container_path(root, udocker.resolve_in_root(root, "/lib64/ld-linux-x86-64.so.2"))
    res = releases.run(release, mode, [FSNAMES, "/etc/debian_version",
                                       "/lib64/ld-linux-x86-64.so.2", "/bin/sh", "-c",
                                       "echo execve $0"], ["-w", "/tmp"])
    assert res.rc == 0, res
    assert fsnames_lines(res.out) == expected_calls(inode, target, real, "/tmp"), res
    # F1 and F2 exec through ld.so, which sets argv[0] to the program's host path unless
    # given --argv0 (from glibc 2.33 on). libfakechroot 2.20.1 passes
    # FAKECHROOT_ELFLOADER_OPT_ARGV0 wrongly to a #! script's interpreter (the script as its
    # argv[0], its last two entries never set: execve.c); the tools tarball's does it right,
    # so F1 and F2 give it with that library; upstream's is not given it (udocker 1.3.17 does
    # not: the same bug in its fork).
    shown = "/bin/sh"
    if mode in ("F1", "F2") and (releases.upstream_tools() or not udocker.version_at_least(
            RELEASES[release], "2.33")):
        shown = root + "/bin/sh"
    assert res.out.splitlines()[-1] == "execve " + shown, res


@pytest.mark.parametrize("release,mode", CASES)
def test_volume_as_working_directory_with_relative_paths(releases, release, mode, tmpdir):
    """-v DIR:/data -w /data and relative names only: cat, cd into a subdirectory and `..`
    back, pwd, ls of `..`, and fsnames' calls on relative names (from /data and from
    /data/sub through ..) reach the host file, with getcwd and realpath at /data."""
    host = tmpdir.mkdir("vol")
    host.join("in").write("data in\n")
    host.mkdir("sub")
    os.symlink("in", str(host.join("link")))
    inode = os.stat(str(host.join("in"))).st_ino
    script = ("cat in; cd sub && cat ../in; pwd; ls ..; %s ../in ../link; cd .. && %s in link"
              " && cd .. && pwd && ls -d usr" % (FSNAMES, FSNAMES))
    res = releases.run(release, mode, ["sh", "-c", script],
                       ["-v", str(host) + ":/data", "-w", "/data"])
    assert res.rc == 0, res
    lines = res.out.splitlines()
    assert lines[:6] == ["data in", "data in", "/data/sub", "in", "link", "sub"], res
    from_sub, from_data = lines[6:20], lines[20:34]
    assert fsnames_lines("\n".join(from_sub)) == \
        expected_calls(inode, "in", "/data/in", "/data/sub"), res
    assert fsnames_lines("\n".join(from_data)) == \
        expected_calls(inode, "in", "/data/in", "/data"), res
    assert lines[34:] == ["/", "usr"], res
    assert sorted(os.listdir(str(host))) == ["in", "link", "sub"]


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_every_libfakechroot_that_loads_wraps_the_release_names(releases, release):
    """Each libfakechroot of the tools that a release's glibc can load (built for a glibc
    no newer) must wrap the names that release's programs call, whatever headers it was
    built with: udocker.py picks the newest one that loads, so a glibc 2.33-2.35 container
    (Ubuntu 22.04, Rocky 9) gets the one built on bullseye's 2.31 headers, and its stat(),
    lstat() are those of trixie's programs. fsnames in F3 with each library forced."""
    name, root = releases.container(release, "F3")
    if releases.upstream_tools():
        pytest.skip("upstream's tools: a libfakechroot per distribution, not per glibc")
    inode = os.stat(os.path.join(root, "etc", "debian_version")).st_ino
    libdir = os.path.join(releases.udocker.udocker_dir, "lib")
    tried = []
    for lib in sorted(os.listdir(libdir)):
        match = re.match(r"libfakechroot-glibc(\d+\.\d+)-x86_64\.so$", lib)
        if not match or not udocker.version_at_least(RELEASES[release], match.group(1)):
            continue
        res = releases.udocker("run", "--nobanner", name, FSNAMES, "/etc/debian_version",
                               "/etc/debian_version", env={"UDOCKER_FAKECHROOT_SO":
                                                           os.path.join(libdir, lib)})
        calls = fsnames_lines(res.out)
        tried.append((lib, res.rc, [c for c in INODE_CALLS if calls.get(c) != str(inode)]))
    assert tried and all(rc == 0 and not wrong for _, rc, wrong in tried), tried
