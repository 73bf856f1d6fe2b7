"""`run` with the real engines from the real tools tarball (UDOCKER_TEST_TARBALL), as a
non-root user, on a glibc tree built from the host's own programs and on a static busybox
tree: identity, environment, working directory, volumes, exit codes, stdin, #! scripts, a
syscall-heavy walk of /usr, signals (nothing left behind), a terminal, concurrent runs.
Every mode that cannot be tested here says why in a skip."""
from __future__ import print_function, absolute_import

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import udocker
import rootfs
from support import one_error_line, require_engine_tests, wait_for
from support.runner import Udocker
from support.nvidia import BOUND_LIBRARIES, SMI_TABLE, FakeDriver, tree_state

try:
    from shlex import quote
except ImportError:                                              # Python 2.7
    from pipes import quote

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "udocker.py")
TARBALL = os.environ.get("UDOCKER_TEST_TARBALL", "")
# mode name in the tests -> (execmode, extra environment)
MODES = {"P1": ("P1", {}), "P2": ("P2", {}), "R1": ("R1", {}),
         "R1-runc": ("R1", {"UDOCKER_USE_RUNC_EXECUTABLE": "runc"}),
         "R2": ("R2", {}), "R3": ("R3", {}), "F1": ("F1", {}), "F2": ("F2", {}),
         "F3": ("F3", {}), "F4": ("F4", {})}
STATIC_MODES = ["P1", "P2", "R1", "R1-runc", "R2", "R3"]     # fakechroot cannot run static


needs_tools = require_engine_tests


def on_path(name):
    """The host has program name on this test's $PATH."""
    return udocker.which(name, os.environ.get("PATH", "")) is not None


@pytest.fixture(scope="module")
def world(tmpdir_factory):
    needs_tools()
    return World(tmpdir_factory.mktemp("run"))


class World(object):
    """A udocker directory with the tools installed (by the first run) and containers
    made on demand, one per (mode, tree)."""

    def __init__(self, top):
        self.top = str(top)
        self.ud_dir = os.path.join(self.top, "ud")
        self.trees = {}
        self.containers = {}
        self.runner = Udocker(self.top)       # udocker.py started the way every test does
        self.runner.udocker_dir = self.ud_dir
        self.runner.env["UDOCKER_TARBALL"] = TARBALL
        os.makedirs(os.path.join(self.ud_dir, "containers"))
        self.volume = os.path.join(self.top, "vol")
        os.makedirs(self.volume)

    def tree(self, kind):
        if kind not in self.trees:
            path = os.path.join(self.top, "tree-" + kind)
            if kind == "busybox":
                if not rootfs.busybox_available():
                    pytest.skip("no static /bin/busybox (busybox-static) on this host")
                rootfs.make_busybox_rootfs(path)
            elif kind == "musl":
                if not rootfs.musl_available():
                    pytest.skip("no %s: run tests/images/build_musl_rootfs.sh" % rootfs.MUSL_TAR)
                rootfs.make_musl_rootfs(path)
            else:
                rootfs.make_glibc_rootfs(path)
                if kind == "gcc" and not rootfs.add_gcc(path):
                    pytest.skip("no C compiler from Debian's packages on this host")
            self.trees[kind] = path
        return self.trees[kind]

    def container(self, mode, kind="glibc", config=None, fresh=False):
        """The name of a container of this tree set up for mode (created once)."""
        key = (mode, kind)
        if key in self.containers and not fresh:
            return self.containers[key]
        cid = "%08x-0000-4000-8000-%012x" % (random.getrandbits(32), random.getrandbits(48))
        config = config or {"Env": ["PATH=/usr/bin:/bin", "IMGVAR=fromimage"], "Cmd": ["sh"],
                            "WorkingDir": "/tmp"}
        rootfs.write_container(self.ud_dir, cid, self.tree(kind), config=config)
        rc, out, err = self.ud(["setup", "--execmode=" + MODES[mode][0], cid])
        assert rc == 0, err
        if not fresh:
            self.containers[key] = cid
        return cid

    def command(self, args, mode=None):
        """(argv, environment) of udocker.py args in mode, for a test that starts it itself
        (a terminal, inherited fds, a kill): the runner's."""
        return self.runner.argv(args), self.runner.environ(MODES[mode][1] if mode else None)

    def ud(self, args, mode=None, stdin=None, timeout=300, env=None):
        """Run udocker.py (env: extra environment); returns the runner's Result, also the
        tuple (exit code, stdout, stderr)."""
        extra = dict(MODES[mode][1] if mode else {}, **(env or {}))
        return self.runner(*args, env=extra, input=stdin, timeout=timeout)

    def run(self, mode, argv, options=(), kind="glibc", stdin=None, name=None, env=None):
        cid = name or self.container(mode, kind)
        return self.ud(["run", "--nobanner"] + list(options) + [cid] + list(argv), mode, stdin,
                       env=env)


def bundles(path):
    """The R-mode bundles in path (crun 1.8 also makes $XDG_RUNTIME_DIR/crun, and keeps it)."""
    return [name for name in os.listdir(path) if name.startswith("udocker-")]


def processes_matching(pattern):
    out = subprocess.Popen(["pgrep", "-f", pattern], stdout=subprocess.PIPE).communicate()[0]
    return out.decode("ascii").split()


# -- every mode, glibc tree

@pytest.mark.parametrize("mode", sorted(MODES))
def test_identity_env_workdir_and_volumes(world, mode):
    with open(os.path.join(world.volume, "in-" + mode), "w") as handle:
        handle.write("from-host\n")
    script = ('id -u; id -un; echo "$IMGVAR $CLIVAR"; pwd; cat /data/in-%s; '
              'echo written > /data/out-%s; cat /etc/os-release | head -n 1; '
              'test -s /etc/resolv.conf && echo resolv-ok' % (mode, mode))
    rc, out, err = world.run(mode, ["sh", "-c", script], ["-e", "CLIVAR=fromcli", "-v",
                                                         world.volume + ":/data"])
    assert rc == 0, err
    lines = out.splitlines()
    if mode.startswith("F"):
        assert lines[0] == str(os.getuid())                  # F modes: the host user
    else:
        assert lines[:2] == ["0", "root"]
    assert lines[2] == "fromimage fromcli"
    assert lines[3] == "/tmp"                                 # the image WorkingDir
    assert lines[4] == "from-host"
    assert "Debian" in lines[5] and lines[6] == "resolv-ok"
    with open(os.path.join(world.volume, "out-" + mode)) as handle:
        assert handle.read() == "written\n"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_exit_codes(world, mode):
    for code in (0, 1, 42):
        rc, out, err = world.run(mode, ["sh", "-c", "exit %d" % code])
        assert rc == code, err


@pytest.mark.parametrize("mode", sorted(MODES))
def test_stdin_passes_through(world, mode):
    data = b"".join(b"line %d\n" % i for i in range(20000))
    rc, out, err = world.run(mode, ["sh", "-c", "wc -c; echo done"], stdin=data)
    assert rc == 0, err
    assert out.split() == [str(len(data)), "done"]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_shebang_script_with_arguments(world, mode):
    cid = world.container(mode)
    path = os.path.join(world.ud_dir, "containers", cid, "ROOT", "usr", "bin", "hello-script")
    with open(path, "w") as handle:
        handle.write("#!/bin/sh -e\necho \"script $(basename $0): $*\"\n")
    os.chmod(path, 0o755)
    rc, out, err = world.run(mode, ["hello-script", "a", "b c"])
    assert rc == 0, err
    assert out == "script hello-script: a b c\n"
    rc, out, err = world.run(mode, ["sh", "-c", "hello-script x"])
    assert out == "script hello-script: x\n"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_syscall_heavy_walk_of_usr(world, mode):
    cid = world.container(mode)
    usr = os.path.join(world.ud_dir, "containers", cid, "ROOT", "usr")
    expected = sum(1 for d, _, files in os.walk(usr) for f in files
                   if not os.path.islink(os.path.join(d, f)))
    rc, out, err = world.run(mode, ["sh", "-c", "ls -lR /usr > /dev/null && "
                                                "find /usr -type f | wc -l && stat -c %U /usr"])
    assert rc == 0, err
    count, owner = out.split()
    assert int(count) == expected
    if not mode.startswith("F"):
        assert owner == "root"                     # files the user owns look root-owned


@pytest.mark.parametrize("mode", ["P1", "F1", "F3"])
def test_paths_under_directory_fds_stay_in_the_container(world, mode):
    """Programs walking trees (find, fts) use *at() calls relative to directory fds, which
    our libfakechroot passes to the kernel as they are when the name is one component:
    symlinks made in the container (absolute and relative) must still lead inside it, and
    `..` from the root must stay at the root. P1 is the reference."""
    script = ("mkdir -p /tmp/at/d && echo inside > /tmp/at/d/f && ln -s /tmp/at/d /tmp/at/abs"
              " && ln -s d /tmp/at/rel && find -L /tmp/at -type f | sort && cat /tmp/at/abs/f"
              " && readlink /tmp/at/abs && cd /tmp/at && find . -name f && cd / &&"
              " find .. -maxdepth 1 -name tmp && find -L /tmp/at/abs/.. -maxdepth 1 -name d;"
              " status=$?; rm -r /tmp/at; exit $status")
    rc, out, err = world.run(mode, ["sh", "-c", script])
    assert rc == 0, err
    assert out.split() == ["/tmp/at/abs/f", "/tmp/at/d/f", "/tmp/at/rel/f", "inside",
                           "/tmp/at/d", "./d/f", "../tmp", "/tmp/at/abs/../d"]


def _volume_workdir_script(cont):
    """A workflow runner's pattern (-v HOST:CONT -w CONT, then relative paths only) in the
    container path cont; prints the same lines in every mode (see the test below)."""
    name = os.path.basename(cont)
    return ("pwd; pwd -P; /usr/bin/pwd -P; cat in; stat -c %s in; test -e ./in && echo exists;"
            " mkdir -p sub/deeper && cd sub/deeper && pwd -P && cat ../../in &&"
            " echo made > ../../made && cd ../.. && cat made && printf '#!/bin/sh\\necho"
            " script in $(pwd -P)\\n' > sub/s.sh && chmod +x sub/s.sh && sub/s.sh &&"
            " (cd sub && ./s.sh && ../sub/s.sh) && find . -name made && readlink -f in &&"
            " ln -s in link && cat link && ls .. | grep -x -e " + name + " -e host-only -e usr;"
            " find .. -maxdepth 1 -name " + name + "; cd .. && pwd -P && cd " + name +
            " && /usr/bin/pwd -P && ls sub/deeper/../../made;"
            " rm -r made link sub")


@pytest.mark.parametrize("mode", ["P1", "F1", "F2", "F3", "F4"])
@pytest.mark.parametrize("where", ["elsewhere", "own-path"])
def test_volume_as_working_directory_with_relative_paths(world, mode, where):
    """`run -v HOST:CONT -w CONT` and relative names only: open, stat, mkdir, exec of a
    relative script, cd into nested directories and back with `..`, find (*at() calls),
    getcwd() showing CONT and `..` leading into the container's own tree (not to the
    volume's host parent, where host-only lies). F modes see the volume through our
    libfakechroot's FAKECHROOT_VOLUMES; P1 is the reference."""
    parent = os.path.join(world.top, "wd-%s-%s" % (mode, where))
    host = os.path.join(parent, "vol")
    os.makedirs(host)
    os.makedirs(os.path.join(parent, "host-only"))
    with open(os.path.join(host, "in"), "w") as handle:
        handle.write("data in\n")
    cont = "/wdir" if where == "elsewhere" else host
    rc, out, err = world.run(mode, ["sh", "-c", _volume_workdir_script(cont)],
                             ["-v", host + ":" + cont, "-w", cont])
    assert rc == 0, err
    name = os.path.basename(cont)
    top, listing = ("/", sorted([name, "usr"])) if where == "elsewhere" else (parent, [name])
    assert out.splitlines() == [cont, cont, cont, "data in", "8", "exists",
                                cont + "/sub/deeper", "data in", "made",
                                "script in " + cont, "script in " + cont + "/sub",
                                "script in " + cont + "/sub", "./made", cont + "/in",
                                "data in"] + listing + ["../" + name, top, cont,
                                                        "sub/deeper/../../made"], err
    assert sorted(os.listdir(host)) == ["in"]
    other = os.path.join(parent, "next-job")           # the next job: same CONT, new HOST
    os.makedirs(other)
    with open(os.path.join(other, "in"), "w") as handle:
        handle.write("next job\n")
    rc, out, err = world.run(mode, ["sh", "-c", "cat in; pwd -P"],
                             ["-v", other + ":" + cont, "-w", cont])
    assert (rc, out) == (0, "next job\n%s\n" % cont), err


@pytest.mark.parametrize("mode", ["F1", "F3"])
def test_the_glibc_2_17_libfakechroot_serves_a_new_glibc(world, mode):
    """The tools' libfakechroot-glibc2.17 (linked by zig) needs no glibc symbol version
    above 2.17, so it loads into every glibc from 2.17 on, and carries the wrappers of both
    generations: this host's programs (glibc >= 2.33) call stat/lstat/fstatat, not
    __xstat..., and volumes, relative paths and find work through it as through the
    library built for this glibc."""
    cid = world.container(mode)
    lib = os.path.join(world.ud_dir, "lib", "libfakechroot-glibc2.17-x86_64.so")
    if not os.path.exists(lib):
        pytest.skip("this tools tarball has no libfakechroot-glibc2.17 (udocker's own has)")
    with open(lib, "rb") as handle:
        data = handle.read()
    versions = set((int(a), int(b)) for a, b in re.findall(br"\0GLIBC_(\d+)\.(\d+)", data))
    assert versions and max(versions) <= (2, 17), sorted(versions)
    host = os.path.join(world.top, "wd217-" + mode, "vol")
    os.makedirs(host)
    with open(os.path.join(host, "in"), "w") as handle:
        handle.write("data in\n")
    script = ("grep -o 'libfakechroot-glibc[0-9.]*' /proc/self/maps | sort -u; "
              "find . -name in; stat -c %F /wdir; cd .. && pwd && ls -d wdir")
    rc, out, err = world.run(mode, ["sh", "-c", script], ["-v", host + ":/wdir", "-w", "/wdir"],
                             name=cid, env={"UDOCKER_FAKECHROOT_SO": lib})
    assert rc == 0, err
    assert out.splitlines() == ["libfakechroot-glibc2.17", "./in", "directory", "/", "wdir"]


def test_f2_keeps_the_hosts_library_path_and_cache_out(world):
    """F2 starts every program through a copy of the container's ld.so given the
    container's library directories as --library-path: an LD_LIBRARY_PATH naming broken
    copies of libc and libselinux (udocker's own with --hostenv, or one set in the
    container) reaches no program, and the host's ld.so.cache and library directories are
    names that cannot exist in the copy. (F1's loader takes LD_LIBRARY_PATH: ls fails.)"""
    cid = world.container("F2")
    broken, selinux_only = (os.path.join(world.top, n) for n in ("broken-libs", "broken-se"))
    for directory, names in ((broken, ("libc.so.6", "libselinux.so.1")),
                             (selinux_only, ("libselinux.so.1",))):
        os.makedirs(directory)
        for name in names:
            with open(os.path.join(directory, name), "w") as handle:
                handle.write("not a library\n")
    script = ("ls -d /usr; LD_LIBRARY_PATH=%s ls -d /etc; env -i LD_LIBRARY_PATH=%s "
              "/usr/bin/ls -d /tmp; grep -o '/[^ ]*/ld-[^ ]*' /proc/self/maps | sort -u"
              % (broken, broken))
    rc, out, err = world.run("F2", ["sh", "-c", script], ["--hostenv"], name=cid,
                             env={"LD_LIBRARY_PATH": selinux_only})
    assert rc == 0, err
    run_dir = os.path.join(world.ud_dir, "containers", cid, ".run")
    assert out.splitlines()[:3] == ["/usr", "/etc", "/tmp"], err
    assert re.match(re.escape(run_dir) + r"/ld-f2-[0-9a-f]{16}\.so$", out.splitlines()[3]), out
    with open(out.splitlines()[3], "rb") as handle:
        loader = handle.read()
    for name in (b"/etc/ld.so.cache\0", b"/etc/ld.so.preload\0", b"\0/lib/\0", b"\0/usr/lib/\0",
                 b"/usr/lib/x86_64-linux-gnu/\0"):
        assert name not in loader


def test_f4_patches_a_program_copied_in_after_setup(world):
    """F4 patches at exec time: a program copied into ROOT after setup (the host's loader
    path in its header) runs with the container's loader, started by a shell by a relative
    path from a volume working directory (libfakechroot's execve) or by run itself; leaving
    F4 puts its loader back. (In F3 the kernel would load the host's ld.so for it.)"""
    cid = world.container("F4", fresh=True)
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    for name in ("newcat", "newcat2"):
        shutil.copy(os.path.join(world.tree("glibc"), "usr", "bin", "cat"),
                    os.path.join(root, "tmp", name))
    assert udocker.elf_info(os.path.join(root, "tmp", "newcat"))["interp"] == \
        "/lib64/ld-linux-x86-64.so.2"
    loader = os.path.join(root, "usr", "lib", "x86_64-linux-gnu", "ld-linux-x86-64.so.2")
    volume = os.path.join(world.top, "f4-copied")
    os.makedirs(volume)
    rc, out, err = world.run("F4", ["sh", "-c", "../tmp/newcat /proc/self/maps | "
                                    "grep -o '/[^ ]*/ld-linux[^ ]*' | sort -u; pwd"],
                             ["-v", volume + ":/data", "-w", "/data"], name=cid)
    assert (rc, out) == (0, loader + "\n/data\n"), err
    rc, out, err = world.run("F4", ["/tmp/newcat2", "/proc/self/maps"], name=cid)
    assert rc == 0 and loader in out, err
    rc, out, err = world.ud(["setup", "--execmode=P1", cid])
    assert rc == 0, err
    info = udocker.elf_info(os.path.join(root, "tmp", "newcat"))
    # our libfakechroot gave it the container's loader, upstream's (--set-root-prefix)
    # ROOT + "/" + its own: either is a container path again
    assert info["interp"] in ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                              "/lib64/ld-linux-x86-64.so.2") and not info["rpath"], info
    rc, out, err = world.run("P1", ["/tmp/newcat", "/etc/os-release"], name=cid)
    assert rc == 0 and "NAME=" in out, err


@pytest.mark.parametrize("mode", ["F1", "F2"])
def test_programs_started_through_the_loader_see_their_argv0(world, mode):
    """F1 and F2 start every program through a loader (glibc >= 2.33 here: ld.so has
    --argv0): the programs a container's shell starts see their container path as argv[0],
    not their host path under ROOT (in bash's $0, in ls's error message)."""
    rc, out, err = world.run(mode, ["sh", "-c", "bash -c 'echo $0'; ls /nonexistent"])
    assert rc != 0 and out == "/usr/bin/bash\n", (out, err)
    assert err.startswith("/usr/bin/ls: "), err


@pytest.mark.parametrize("mode", ["F1", "F2", "F3"])
def test_the_containers_own_ld_library_path_reaches_the_loader(world, mode):
    """The container's own LD_LIBRARY_PATH (here -e) names container directories: F modes
    give them in ROOT, before the library directories, in LD_LIBRARY_PATH (F2: in the
    loader copy's --library-path, where F2 finds a library moved to /opt/lib), for the
    first program and the programs it starts."""
    cid = world.container(mode, fresh=True)
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    libdir = os.path.join(root, "usr", "lib", "x86_64-linux-gnu")
    moved = sorted(n for n in os.listdir(libdir) if n.startswith("libselinux.so"))
    if not moved:
        pytest.skip("ls of this host does not need libselinux")
    os.makedirs(os.path.join(root, "opt", "lib"))
    for name in moved:
        os.rename(os.path.join(libdir, name), os.path.join(root, "opt", "lib", name))
    if mode == "F2":   # (F1's and F3's ld.so would find the host's copy by ld.so.cache)
        rc, out, err = world.run(mode, ["ls", "-d", "/usr"], name=cid)
        assert rc != 0 and "libselinux" in err, (out, err)
    rc, out, err = world.run(mode, ["sh", "-c", "ls -d /usr; echo $LD_LIBRARY_PATH"],
                             ["-e", "LD_LIBRARY_PATH=/opt/lib"], name=cid)
    assert rc == 0, err
    assert out.splitlines()[0] == "/usr"
    assert out.splitlines()[1].split(":")[0] == os.path.join(root, "opt", "lib")


@pytest.mark.parametrize("mode", ["F3", "F4"])
def test_f3_f4_start_a_program_in_a_volume_through_the_containers_loader(world, mode):
    """A program in a volume (the host's loader path in its header, not ROOT's) is neither
    patched nor changed in F3 and F4: run starts it through the container's loader, as F1
    does (before, the kernel loaded the host's ld.so for it)."""
    cid = world.container(mode)
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    volume = os.path.join(world.top, "prog-in-volume-" + mode)
    os.makedirs(volume)
    program = os.path.join(volume, "mycat")
    shutil.copy(os.path.join(world.tree("glibc"), "usr", "bin", "cat"), program)
    with open(program, "rb") as handle:
        before = handle.read()
    loader = os.path.realpath(os.path.join(root, "usr", "lib", "x86_64-linux-gnu",
                                           "ld-linux-x86-64.so.2"))
    rc, out, err = world.run(mode, ["/data/mycat", "/proc/self/maps"],
                             ["-v", volume + ":/data"], name=cid)
    assert rc == 0, err
    assert set(re.findall(r"/\S*/ld-linux\S*", out)) == set([loader]), out
    with open(program, "rb") as handle:
        assert handle.read() == before
    rc, out, err = world.run(mode, ["sh", "-c", "cd /data && ./mycat /etc/os-release"],
                             ["-v", volume + ":/data"], name=cid)
    assert rc == 0 and "NAME=" in out, err


LOADER_OF_ITSELF_C = r"""#include <stdio.h>
#include <string.h>
int main(void)
{
    char line[4096];
    FILE *maps = fopen("/proc/self/maps", "r");
    while (maps != NULL && fgets(line, sizeof line, maps) != NULL)
        if (strstr(line, "/ld-linux") != NULL) {
            printf("%s", strchr(line, '/'));
            break;
        }
    printf("compiled in the container\n");
    return 0;
}
"""


def test_f4_runs_a_program_compiled_in_the_container(world):
    """gcc in an F4 container (the host's compiler copied into the glibc tree) compiles a
    program from a volume working directory; it runs at once, with the container's loader,
    by a relative path, with no other setup."""
    cid = world.container("F4", kind="gcc", fresh=True)
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    volume = os.path.join(world.top, "f4-gcc")
    os.makedirs(volume)
    with open(os.path.join(volume, "loader.c"), "w") as handle:
        handle.write(LOADER_OF_ITSELF_C)
    rc, out, err = world.run("F4", ["sh", "-c", "gcc -o /tmp/loader loader.c && ../tmp/loader"],
                             ["-v", volume + ":/data", "-w", "/data"], kind="gcc", name=cid)
    assert rc == 0, err
    assert out.splitlines() == [os.path.join(root, "usr", "lib", "x86_64-linux-gnu",
                                             "ld-linux-x86-64.so.2"),
                                "compiled in the container"], err
    assert sorted(os.listdir(volume)) == ["loader.c"]


SIGNAL_CASES = [(mode, "TERM", "shell") for mode in sorted(MODES)] + \
    [(mode, sig, form) for mode in ("P1", "R1", "R1-runc", "F1")
     for sig, form in (("INT", "shell"), ("HUP", "shell"), ("TERM", "direct"))]


def default_signals():
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)


@pytest.mark.parametrize("mode,sig,form", SIGNAL_CASES)
def test_signal_reaches_the_container_and_nothing_is_left(world, mode, sig, form):
    """A signal to udocker.py ends the container's command with 128+N, and no process of
    the container survives. 'direct': the sleep is the main process (pid 1 in R modes,
    where the kernel drops signals it has no handler for)."""
    cid = world.container(mode)
    marker = random.randint(800000, 899999)
    command = ["sleep", str(marker)] if form == "direct" else \
        ["sh", "-c", "sleep %d & sleep %d; echo after" % (marker + 1, marker)]
    argv, env = world.command(["run", "--nobanner", cid] + command, mode)
    # udocker.py keeps a signal ignored that it inherited ignored (nohup's SIGHUP, SIGINT in
    # a job started with &): the test must not inherit that from whatever started pytest
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_signals)
    try:
        wait_for(lambda: processes_matching("(^|/)sleep %d$" % marker), "the sleep to start")
        proc.send_signal(getattr(signal, "SIG" + sig))
        wait_for(lambda: proc.poll() is not None, "udocker.py to end after SIG" + sig, 60)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, "SIG" + sig), err
    assert b"after" not in out
    wait_for(lambda: not processes_matching("(^|/)sleep %d$" % marker) and
             not processes_matching("(^|/)sleep %d$" % (marker + 1)), "no process left", 30)


def proot_lacking_kill_on_exit(world):
    """The tarball's proot with its option --kill-on-exit renamed (same length: the binary
    still runs): a real proot without that option, as Debian's 5.1.0 is."""
    path = os.path.join(world.top, "proot-lacking-kill-on-exit")
    if not os.path.exists(path):
        assert world.run("P1", ["true"])[0] == 0                # the tools are installed
        with open(os.path.join(world.ud_dir, "bin", "proot-x86_64"), "rb") as handle:
            data = handle.read()
        assert data.count(b"--kill-on-exit\0") == 1
        with open(path + ".tmp", "wb") as handle:
            handle.write(data.replace(b"--kill-on-exit\0", b"--kill-on-exix\0"))
        os.chmod(path + ".tmp", 0o755)
        os.rename(path + ".tmp", path)
    proc = subprocess.Popen([path, "--kill-on-exit", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.communicate()[0]
    assert proc.returncode != 0 and b"unknown option '--kill-on-exit'" in out, out
    return path


@pytest.mark.parametrize("lacking", ["option", "config"])
@pytest.mark.parametrize("mode", ["P1", "P2", "R2", "R3"])
def test_without_kill_on_exit_the_run_still_ends_with_its_command(world, mode, lacking):
    """A proot without --kill-on-exit (Debian's 5.1.0), or told not to use it
    (proot_killonexit = False), would wait for every process of the container: udocker.py
    kills the others once the command has exited, and the command's exit status is the
    run's. In R2/R3 proot is pid 1 of the container's pid namespace."""
    cid = world.container(mode)
    conf = os.path.join(world.top, "no-kill-on-exit.conf")
    with open(conf, "w") as handle:
        handle.write("[DEFAULT]\nproot_killonexit = %s\n" % (lacking != "config"))
    env = {"UDOCKER_USE_PROOT_EXECUTABLE": proot_lacking_kill_on_exit(world)} \
        if lacking == "option" else {}
    marker = random.randint(600000, 699999)
    # the command exits at once, often before udocker.py first sees it (R2/R3: proot's
    # first child): what it leaves must not be taken for it
    rc, out, err = world.ud(["--config=" + conf, "run", "--nobanner", cid, "sh", "-c",
                             "sleep %d & echo started; exit 7" % marker], mode,
                            timeout=120, env=env)
    assert rc == 7 and out == "started\n", err
    wait_for(lambda: not processes_matching("(^|/)sleep %d$" % marker), "no process left", 30)


@pytest.mark.parametrize("mode", ["P1", "R1", "R2", "F3"])
def test_sigkilled_udocker_leaves_nothing(world, mode):
    """Even SIGKILL to udocker.py: proot gets SIGQUIT (PDEATHSIG) and kills its tracees; for
    runc a watchdog kills the container and removes the run's bundle (here in a runtime
    directory of its own); for fakechroot it finds the orphans, once the command has run
    longer than Supervisor.GRACE_SECONDS (3 ms)."""
    cid = world.container(mode)
    marker = random.randint(700000, 799999)
    argv, env = world.command(["run", "--nobanner", cid, "sh", "-c",
                               "sleep %d & sleep %d" % (marker + 1, marker)], mode)
    env["XDG_RUNTIME_DIR"] = runtime_dir = os.path.join(world.top, "xdg-killed-" + mode)
    os.mkdir(runtime_dir, 0o700)
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(argv, env=env, stdout=null, stderr=null)
        wait_for(lambda: processes_matching("(^|/)sleep %d$" % marker), "the sleep to start")
        if mode.startswith("R"):
            assert len(bundles(runtime_dir)) == 1
        # (an F-mode command is unguarded for its first Supervisor.GRACE_SECONDS)
        time.sleep(0.05)
        proc.kill()
        proc.wait()
    wait_for(lambda: not processes_matching("(^|/)sleep %d$" % marker) and
             not processes_matching("(^|/)sleep %d$" % (marker + 1)), "no process left", 30)
    wait_for(lambda: not bundles(runtime_dir), "the bundle removed", 30)


@pytest.mark.skipif(sys.version_info < (3, 8), reason="no posix_spawn: the engine is forked")
@pytest.mark.parametrize("mode", ["F1", "F3"])
def test_a_command_that_ends_at_once_needs_no_watchdog(world, mode):
    """F modes give the command Supervisor.GRACE_SECONDS before they make the watchdog and
    become the subreaper: `true` ends sooner (on a loaded machine it may not: then the
    usual guard is there); a command that runs longer is guarded (SIGKILL:
    test_sigkilled_udocker_leaves_nothing)."""
    within = "Debug: the command ended within"
    quick = [world.ud(["-D", "run", "--nobanner", world.container(mode), "true"], mode)
             for _ in range(5)]
    assert all(r.rc == 0 for r in quick) and any(within in r.err for r in quick), quick[-1]
    slow = world.ud(["-D", "run", "--nobanner", world.container(mode), "sh", "-c",
                     "sleep 0.2; exit 4"], mode)
    assert slow.rc == 4 and within not in slow.err, slow


@pytest.mark.parametrize("mode", ["P1", "R1", "F1", "F3"])
def test_what_the_command_leaves_running_is_gone_when_the_run_ends(world, mode):
    """A process the command leaves behind (a daemon: its parent, the command, has exited)
    is killed before udocker.py exits, whose status is the command's. F modes become its
    subreaper once the engine runs (or look for it by its marker, if a process was made
    before that); in R modes the kernel kills it with its pid namespace."""
    marker = random.randint(500000, 599999)
    rc, out, err = world.ud(["run", "--nobanner", world.container(mode), "sh", "-c",
                             "sleep %d & echo started; exit 7" % marker], mode)
    assert (rc, out) == (7, "started\n"), err
    assert not processes_matching("(^|/)sleep %d$" % marker)


@pytest.mark.parametrize("mode", ["P1", "R1", "F3"])
def test_the_engine_starts_by_posix_spawn_where_python_has_it(world, mode):
    """Python 3.8+ starts an engine that needs no step of its own in its process by
    posix_spawn (nothing of udocker.py's memory is copied; a watchdog stands in for
    PDEATHSIG); older Pythons fork. Either way the command runs in its directory and its
    status comes back (SIGKILL: test_sigkilled_udocker_leaves_nothing)."""
    rc, out, err = world.ud(["-D", "run", "--nobanner", world.container(mode), "sh", "-c",
                             "pwd; exit 3"], mode)
    assert (rc, out) == (3, "/tmp\n"), err
    started = [l for l in err.splitlines() if l.startswith("Debug: engine started by ")]
    assert started == ["Debug: engine started by %s" % (
        "posix_spawn" if sys.version_info >= (3, 8) else "fork")], err


@pytest.mark.parametrize("mode", sorted(MODES))
def test_exit_code_with_a_terminal(world, mode):
    if not on_path("script"):
        print("skipped: no `script` (util-linux) to make a terminal")
        pytest.skip("no script(1) to provide a pty")
    cid = world.container(mode)
    argv, env = world.command(["run", "--nobanner", cid, "sh", "-c", "test -t 0 && exit 42"],
                              mode)
    proc = subprocess.Popen(["script", "-qec", " ".join(quote(a) for a in argv), "/dev/null"],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate()
    assert proc.returncode == 42, (out, err)


# -- static busybox tree (P and R modes)

@pytest.mark.parametrize("mode", STATIC_MODES)
def test_busybox_tree(world, mode):
    rc, out, err = world.run(mode, ["sh", "-c", "id -u; cat; echo $IMGVAR; exit 3"],
                             kind="busybox", stdin=b"piped\n")
    assert rc == 3, err
    assert out.splitlines() == ["0", "piped", "fromimage"]


# -- musl tree (Alpine's layout: /lib/ld-musl-x86_64.so.1, busybox linked against it)

@pytest.mark.parametrize("mode", ["P1", "F1", "F3", "F4"])
def test_musl_tree_with_a_volume_as_working_directory(world, mode):
    """F modes run a musl container through the tools' libfakechroot-musl: commands found
    in PATH, the working directory in a volume, relative paths and `..` from it, pwd showing
    the container path, absolute paths in the container's tree; P1 is the reference."""
    host = os.path.join(world.top, "musl-wd-" + mode)
    os.makedirs(os.path.join(host, "sub"))
    with open(os.path.join(host, "in"), "w") as handle:
        handle.write("data in\n")
    script = ("cat in; cd sub && cat ../in; pwd; echo made > ../made; cd .. && cat made;"
              " find . -name made; stat -c %s in; readlink -f in; which cat;"
              " cat /etc/os-release | grep ^ID=; ls /data/sub/../in; rm made;"
              " grep -o 'libfakechroot-[a-z0-9._-]*' /proc/self/maps | sort -u")
    rc, out, err = world.run(mode, ["sh", "-c", script], ["-v", host + ":/data", "-w", "/data"],
                             kind="musl")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[:10] == ["data in", "data in", "/data/sub", "made", "./made", "8", "/data/in",
                          "/usr/bin/cat", "ID=musl-test", "/data/sub/../in"], err
    assert lines[10:] == ([] if mode == "P1" else ["libfakechroot-musl-x86_64.so"]), err
    assert sorted(os.listdir(host)) == ["in", "sub"]


def test_musl_tree_f4_patches_a_program_copied_in_after_setup(world):
    """F4 on the musl tree: a busybox copied into ROOT after setup (its header names
    /lib/ld-musl-x86_64.so.1, the host's path) is patched when a shell starts it by a
    relative path from a volume working directory, and when run starts it."""
    cid = world.container("F4", "musl", fresh=True)
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    for name in ("new", "new2"):          # busybox: its applets need that name in argv[0]
        os.makedirs(os.path.join(root, "tmp", name))
        shutil.copy(os.path.join(world.tree("musl"), "bin", "busybox"),
                    os.path.join(root, "tmp", name, "busybox"))
    assert udocker.elf_info(os.path.join(root, "tmp", "new", "busybox"))["interp"] == \
        "/lib/ld-musl-x86_64.so.1"
    loader = os.path.join(root, "lib", "ld-musl-x86_64.so.1")
    volume = os.path.join(world.top, "f4-musl")
    os.makedirs(volume)
    script = "../tmp/new/busybox pwd; ../tmp/new/busybox echo ran"
    rc, out, err = world.run("F4", ["sh", "-c", script], ["-v", volume + ":/data", "-w", "/data"],
                             name=cid, kind="musl")
    assert (rc, out) == (0, "/data\nran\n"), err
    assert udocker.elf_info(os.path.join(root, "tmp", "new", "busybox"))["interp"] == loader
    rc, out, err = world.run("F4", ["/tmp/new2/busybox", "echo", "ran too"], name=cid,
                             kind="musl")
    assert (rc, out) == (0, "ran too\n"), err
    assert udocker.elf_info(os.path.join(root, "tmp", "new2", "busybox"))["interp"] == loader


@pytest.mark.parametrize("mode", ["F1", "F3", "F4"])
def test_musl_tree_names_users_and_groups_from_the_containers_files(world, mode):
    """musl reads /etc/passwd and /etc/group inside libc, where LD_PRELOAD does not reach:
    our libfakechroot-musl answers getpwuid(), getgrgid(), getpwnam(), getgrouplist() and
    the others from ROOT's files, so id and stat show the container's names for the host
    user's ids (and a user the host lacks), not the host's."""
    cid = world.container(mode, "musl", fresh=True)
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    uid, gid = os.getuid(), os.getgid()
    with open(os.path.join(root, "etc", "passwd"), "a") as handle:
        handle.write("cuser:x:%d:%d:C User:/:/bin/sh\nctester:x:4321:4321::/:/bin/sh\n"
                     % (uid, gid))
    with open(os.path.join(root, "etc", "group"), "a") as handle:
        handle.write("cgrp:x:%d:\nctgroup:x:4321:\nextra:x:4322:ctester,other\n" % gid)
    script = "id -un; id -gn; stat -c %U:%G /etc/passwd; id ctester"
    rc, out, err = world.run(mode, ["sh", "-c", script], kind="musl", name=cid)
    assert rc == 0, err
    assert out.splitlines() == [
        "cuser", "cgrp", "cuser:cgrp",
        "uid=4321(ctester) gid=4321(ctgroup) groups=4321(ctgroup),4322(extra)"], (out, err)


def test_musl_tree_f3_setup_patches_for_the_musl_loader(world):
    """setup --execmode=F3 on the musl tree succeeds and sets the ELF interpreter to the
    host path of ROOT/lib/ld-musl-x86_64.so.1."""
    cid = world.container("F3", "musl")
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    info = udocker.elf_info(os.path.join(root, "bin", "busybox"))
    assert info["interp"] == os.path.join(root, "lib", "ld-musl-x86_64.so.1")
    rc, out, err = world.run("F3", ["sh", "-c", "echo $0; ls /lib"], kind="musl")
    assert (rc, sorted(out.split())) == (0, ["ld-musl-x86_64.so.1", "libc.musl-x86_64.so.1",
                                             "sh"]), err


def test_fakechroot_refuses_static_trees(world):
    cid = world.container("P1", "busybox")
    rc, out, err = world.ud(["setup", "--execmode=F1", cid])
    assert rc == 1 and "glibc" in err and "use P1" in err


@pytest.mark.parametrize("libc,needle", [
    ("glibc2.12", "no libfakechroot for this container (x86_64, glibc 2.12; have: "),
    ("musl", "no libfakechroot for this container (ppc64le, musl; have: ")])
def test_f3_setup_refuses_a_c_library_no_libfakechroot_fits(world, libc, needle):
    """setup makes the check run makes, before it patches anything: one line naming the
    C library found, the container untouched and still in its old mode. (A musl tree fits
    the tools' x86_64 musl library, so the musl case is a ppc64le one.)"""
    tree = os.path.join(world.top, "tree-fake-" + libc)
    subprocess.check_call(["cp", "-a", world.tree("glibc"), tree])
    libdir = os.path.join(tree, "usr", "lib", "x86_64-linux-gnu")
    if libc == "musl":                           # found by its loader, as in Alpine
        open(os.path.join(tree, "usr", "lib", "ld-musl-x86_64.so.1"), "w").close()
    else:                                        # glibc 2.12's file name (CentOS 6)
        os.rename(os.path.join(libdir, "libc.so.6"), os.path.join(libdir, "libc-2.12.so"))
        os.symlink("libc-2.12.so", os.path.join(libdir, "libc.so.6"))
    cid = "%08x-0000-4000-8000-%012x" % (random.getrandbits(32), random.getrandbits(48))
    cdir = rootfs.write_container(world.ud_dir, cid, tree, execmode="P1")
    if libc == "musl":               # the tools have a musl library for x86_64 and arm64
        with open(os.path.join(cdir, "container.json"), "w") as handle:
            json.dump({"architecture": "ppc64le", "os": "linux",
                       "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"]}}, handle)
    before = subprocess.check_output(["ls", "-lR", "--time-style=full-iso",
                                      os.path.join(cdir, "ROOT")])
    for mode in ("F3", "F1"):
        rc, out, err = world.ud(["setup", "--execmode=" + mode, cid])
        lines = [line for line in err.splitlines() if not line.startswith("Info: ")]
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("Error: "), err
        assert needle in lines[0]
        assert "patched" not in err and not os.path.exists(os.path.join(cdir, "patch.json"))
    with open(os.path.join(cdir, "execmode")) as handle:
        assert handle.read().strip() == "P1"
    assert subprocess.check_output(["ls", "-lR", "--time-style=full-iso",
                                    os.path.join(cdir, "ROOT")]) == before


# -- behaviour beyond one mode

def test_first_run_installs_the_tools(tmpdir):
    needs_tools()
    top = str(tmpdir.join("ud"))
    os.makedirs(os.path.join(top, "containers"))
    rootfs.make_glibc_rootfs(str(tmpdir.join("tree")))
    rootfs.write_container(top, "11111111-0000-4000-8000-000000000001", str(tmpdir.join("tree")),
                           name="first")
    run = Udocker(tmpdir)
    run.udocker_dir = top
    rc, out, err = run("run", "first", "echo", "hi", env={"UDOCKER_TARBALL": TARBALL})
    assert rc == 0, err
    assert out == "hi\n" and "tools installed" in err and "STARTING" in err
    assert os.path.isfile(os.path.join(top, "bin", "proot-x86_64"))


@pytest.mark.parametrize("mode", ["P1", "R1", "F3"])
def test_concurrent_runs_of_one_container(world, mode):
    cid = world.container(mode)
    flag = "conc-%s-%d" % (mode, random.getrandbits(32))
    procs = []
    for me, other in (("a", "b"), ("b", "a")):
        script = ("touch /data/%s.%s; while [ ! -e /data/%s.%s ]; do sleep 0.05; done; echo %s"
                  % (flag, me, flag, other, me))
        argv, env = world.command(["run", "--nobanner", "-v", world.volume + ":/data", cid,
                                   "sh", "-c", script], mode)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    timers = [threading.Timer(120, p.kill) for p in procs]
    for timer in timers:
        timer.start()
    results = [p.communicate() + (p.returncode,) for p in procs]
    for timer in timers:
        timer.cancel()
    assert [r[2] for r in results] == [0, 0], results
    assert [r[0] for r in results] == [b"a\n", b"b\n"]


def test_user_option_and_entrypoint(world):
    cid = world.container("P1", config={"Env": ["PATH=/usr/bin:/bin"],
                                        "Entrypoint": ["/bin/echo", "E"], "Cmd": ["c"]},
                          fresh=True)
    assert world.run("P1", [], name=cid)[1] == "E c\n"
    assert world.run("P1", ["x"], name=cid)[1] == "E x\n"
    assert world.run("P1", ["id", "-un"], ["--entrypoint="], name=cid)[1] == "root\n"
    rc, out, err = world.run("P1", ["sh", "-c", "id -u; id -un; echo $HOME; pwd"],
                             ["--entrypoint=", "-u", "user"], name=cid)
    assert out.splitlines() == ["1000", "user", "/home/user", "/home/user"], err


def test_rm_and_location(world):
    cid = world.container("P1", fresh=True)
    rc, out, err = world.run("P1", ["true"], ["--rm"], name=cid)
    assert rc == 0 and not os.path.exists(os.path.join(world.ud_dir, "containers", cid))
    rc, out, err = world.ud(["run", "--nobanner", "--location=" + world.tree("glibc"),
                             "sh", "-c", "echo $container_uuid"])
    assert rc == 0 and out == "location\n", err


def test_leaving_f3_restores_the_binaries(world):
    cid = world.container("F3", fresh=True)
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    assert udocker.elf_info(os.path.join(root, "usr/bin/ls"))["interp"].startswith(root)
    rc, out, err = world.ud(["setup", "--execmode=P1", cid])
    assert rc == 0, err
    assert udocker.elf_info(os.path.join(root, "usr/bin/ls"))["interp"] == \
        "/lib64/ld-linux-x86-64.so.2"
    assert os.readlink(os.path.join(root, "lib64/ld-linux-x86-64.so.2")) == \
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert not os.path.exists(os.path.join(root, "..", "patch.json"))
    rc, out, err = world.run("P1", ["ls", "/"], name=cid)
    assert rc == 0 and "usr" in out.split()


def test_a_patched_f3_container_runs_without_patchelf(world):
    """patchelf is needed to patch (setup, a moved container's first run) and by F4's runs,
    not by F3's once ROOT is patched where it is."""
    cid = world.container("F3", fresh=True)
    missing = {"UDOCKER_USE_PATCHELF_EXECUTABLE": os.path.join(world.top, "no-patchelf")}
    rc, out, err = world.run("F3", ["sh", "-c", "echo ok"], name=cid, env=missing)
    assert (rc, out) == (0, "ok\n"), err
    rc, out, err = world.ud(["setup", "--execmode=F3", "--force", cid], env=missing)
    assert rc != 0 and "patchelf executable not found" in err, err
    rc, out, err = world.run("F3", ["sh", "-c", "echo ok"], name=cid)
    assert (rc, out) == (0, "ok\n"), err


def test_moved_f_container_is_set_up_again(world):
    cid = world.container("F3", fresh=True)
    moved = "%08x-0000-4000-8000-%012x" % (random.getrandbits(32), random.getrandbits(48))
    containers = os.path.join(world.ud_dir, "containers")
    os.rename(os.path.join(containers, cid), os.path.join(containers, moved))
    rc, out, err = world.run("F3", ["sh", "-c", "ls -d /usr; readlink /lib64/ld-linux-*"],
                             name=moved)
    assert rc == 0 and "setting up container" in err, err
    assert out == "/usr\n/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n"
    interp = udocker.elf_info(os.path.join(containers, moved, "ROOT", "usr/bin/ls"))["interp"]
    assert interp.startswith(os.path.join(containers, moved, "ROOT") + "/")


def test_singularity_mode_explains_when_absent(world):
    if on_path("apptainer") or on_path("singularity"):
        pytest.skip("apptainer/singularity present: S1 not tested here")
    cid = world.container("P1", fresh=True)
    assert world.ud(["setup", "--execmode=S1", cid])[0] == 0
    rc, out, err = world.ud(["run", cid, "true"])
    assert rc == 1 and "apptainer or singularity" in err and "use P1 or R1" in err
    print("S1 not tested: Singularity/Apptainer is not installable on this host")


# -- run options in every mode

def _launcher_env(**extra):
    env = {"OMPI_COMM_WORLD_RANK": "3", "SLURM_JOB_ID": "77", "PMIX_RANK": "5",
           "CUDA_VISIBLE_DEVICES": "0,1", "HOSTENV_ONLY": "h"}
    env.update(extra)
    return env


@pytest.mark.parametrize("mode", sorted(MODES))
def test_options_that_work_in_every_mode(world, mode):
    """--env-file, --cpuset-cpus (taskset), --device at its own path, --hostauth,
    --bindhome, -i/-t, the launcher variables (MPI, Slurm, CUDA) without --hostenv."""
    import pwd
    me = pwd.getpwuid(os.getuid())
    envfile = os.path.join(world.top, "env-" + mode)
    with open(envfile, "w") as handle:
        handle.write("# a comment\nFILEVAR=fromfile\n")
    script = ('echo "$OMPI_COMM_WORLD_RANK $SLURM_JOB_ID $PMIX_RANK $CUDA_VISIBLE_DEVICES '
              '${HOSTENV_ONLY:-unset} $FILEVAR"; grep Cpus_allowed_list: /proc/self/status; '
              'test -c /dev/full && echo device; grep -c "^%s:" /etc/passwd; echo $HOME; '
              'test -d "$HOME" && echo home-is-there' % me.pw_name)
    rc, out, err = world.run(mode, ["sh", "-c", script],
                             ["--env-file=" + envfile, "--cpuset-cpus=0", "--device=/dev/full",
                              "--hostauth", "--bindhome", "-i", "-t"],
                             env=_launcher_env())
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "3 77 5 0,1 unset fromfile"
    assert lines[1].split() == ["Cpus_allowed_list:", "0"]
    assert lines[2:] == ["device", "1", me.pw_dir, "home-is-there"], err


@pytest.mark.parametrize("mode", sorted(MODES))
def test_hostenv_nosysdirs_novol_and_entrypoint(world, mode):
    script = ('echo ${HOSTENV_ONLY:-unset}; test -s /etc/resolv.conf && echo resolv || '
              'echo no-resolv; test -e /proc/self/status && echo proc || echo no-proc')
    rc, out, err = world.run(mode, ["-c", script], ["--hostenv", "--nosysdirs",
                                                    "--entrypoint=/bin/sh"],
                             env=_launcher_env())
    assert rc == 0, err
    runtime_proc = "proc" if mode.startswith("R") else "no-proc"   # runc/crun mount their own
    assert out.splitlines() == ["h", "no-resolv", runtime_proc]
    rc, out, err = world.run(mode, ["sh", "-c", "test -s /etc/resolv.conf || echo none"],
                             ["--novol=/etc/resolv.conf"])
    assert (rc, out) == (0, "none\n"), err


@pytest.mark.parametrize("mode", ["P1", "P2"])
def test_proot_kernel_and_port_options(world, mode):
    """-k: the release uname shows. A proot older than statx (upstream udocker's 5.1.0
    fork) fails every glibc 2.33+ program under -k (fstat answers EINVAL): udocker.py
    leaves -k out there, with a warning, and still passes it for a static tree."""
    rc, out, err = world.run(mode, ["uname", "-r"], ["-k", "9.9.9-fake", "-P"])
    bindir = os.path.join(world.ud_dir, "bin")
    if all(udocker.probe_proot(os.path.join(bindir, name))["statx"]
           for name in os.listdir(bindir) if name.startswith("proot")):
        assert (rc, out) == (0, "9.9.9-fake\n"), err
    else:
        assert (rc, out) == (0, os.uname()[2] + "\n") and "--kernel ignored" in err
        if rootfs.busybox_available():
            rc, out, err = world.run(mode, ["uname", "-r"], ["-k", "9.9.9-fake"],
                                     kind="busybox")
            assert (rc, out) == (0, "9.9.9-fake\n"), err


def _free_port():
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_publish_maps_a_port_in_p1(world):
    import socket
    if not rootfs.busybox_available():
        pytest.skip("no static busybox (nc)")
    cont_port, host_port = _free_port(), _free_port()
    cid = world.container("P1", "busybox")
    argv, env = world.command(["run", "--nobanner", "-p", "%d:%d" % (host_port, cont_port), cid,
                               "sh", "-c", "echo hello | nc -l -p %d" % cont_port], "P1")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        data = b""
        deadline = time.time() + 60
        while time.time() < deadline and not data:
            try:
                conn = socket.create_connection(("127.0.0.1", host_port), timeout=5)
            except socket.error:
                time.sleep(0.05)
                continue
            data = conn.recv(100)
            conn.close()
        assert data == b"hello\n"
    finally:
        out, err = proc.communicate()
    assert proc.returncode == 0, err


@pytest.mark.parametrize("mode", ["R1", "R1-runc", "R2"])
def test_r_mode_bundle_on_a_tmpfs_unless_a_tmpdir_is_set(world, mode):
    """The bundle, which holds the runtime's state too, is made in $XDG_RUNTIME_DIR (a tmpfs
    where it is set) unless a tmpdir is asked for, and removed when the run ends."""
    runtime_dir = os.path.join(world.top, "xdg-" + mode)
    tmp = os.path.join(world.top, "tmp-" + mode)
    os.mkdir(runtime_dir, 0o700)
    os.mkdir(tmp)
    for env, where in (({"XDG_RUNTIME_DIR": runtime_dir}, runtime_dir),
                       ({"XDG_RUNTIME_DIR": runtime_dir, "UDOCKER_TMP": tmp}, tmp)):
        rc, out, err = world.ud(["-D", "run", "--nobanner", world.container(mode), "sh", "-c",
                                 "echo ran; exit 5"], mode, env=env)
        assert (rc, out) == (5, "ran\n"), err
        engine = [line for line in err.splitlines() if "run plan: engine:" in line]
        assert len(engine) == 1 and " --root %s/udocker-" % where in engine[0], err
        assert bundles(runtime_dir) == bundles(tmp) == []


@pytest.mark.parametrize("mode", ["R1", "R1-runc", "R2"])
def test_hostname_in_r_modes(world, mode):
    rc, out, err = world.run(mode, ["uname", "-n"], ["--hostname=box.example"])
    assert (rc, out) == (0, "box.example\n"), err


@pytest.mark.parametrize("mode,options,needle", [
    ("R1", ["-p", "8080:80"], "Error: mode R1 shares the host network and cannot map ports"),
    ("F3", ["--device=/dev/full:/dev/myfull"], "Error: mode F3 shows host devices only at"),
    ("F3", ["-p", "8080:80"], "Error: mode F3 shares the host network"),
    ("P1", ["--device=/etc/passwd"], "Error: --device /etc/passwd: not a device"),
])
def test_options_a_mode_cannot_honour_are_one_error_line(world, mode, options, needle):
    rc, out, err = world.run(mode, ["true"], options)
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith(needle), err


@pytest.mark.parametrize("mode,options", [("P1", ["--hostname=x"]), ("R1", ["-k", "9.9"]),
                                          ("F3", ["--hostname=x", "-p", "8080:8080"])])
def test_cosmetic_options_a_mode_cannot_honour_warn(world, mode, options):
    rc, out, err = world.run(mode, ["true"], options)
    assert rc == 0 and err.count("Warning: mode %s cannot" % mode) == \
        len([o for o in options if o.startswith("--hostname") or o == "-k"]), err


# -- volumes, GPUs and /dev/shm as workflow engines ask for them (cwltool --udocker)

@pytest.mark.parametrize("mode", ["P1", "R1", "F3"])
def test_volumes_with_colons_and_mount_points_inside_a_writable_volume(world, mode):
    """cwltool binds OUTDIR read-write and files at OUTDIR/sub/file and at paths with ':'.
    Docker makes the mount point (sub/ and an empty file) in OUTDIR on the host."""
    top = os.path.join(world.top, "cwl-" + mode)
    outdir, staged = os.path.join(top, "out"), os.path.join(top, "A:Gln2Cys")
    os.makedirs(outdir)
    os.makedirs(staged)
    with open(os.path.join(staged, "in.txt"), "w") as handle:
        handle.write("staged\n")
    script = ("cat /spool/sub/file.txt /stg/A:Gln2Cys/in.txt /m:x/in.txt; ls /spool/sub; "
              "echo made > /spool/made.txt")
    rc, out, err = world.run(mode, ["sh", "-c", script], [
        "--volume=%s:/spool:rw" % outdir, "--volume=%s:/stg/A:Gln2Cys" % staged,
        "--volume=%s/in.txt:/spool/sub/file.txt" % staged,
        "--mount=type=bind,source=%s,target=/m:x" % staged])
    assert rc == 0, err
    assert out.split() == ["staged", "staged", "staged", "file.txt"], (out, err)
    assert sorted(os.listdir(outdir)) == ["made.txt", "sub"]
    point = os.path.join(outdir, "sub", "file.txt")            # the mount point, as Docker
    assert os.path.isfile(point) and not os.path.islink(point) and \
        os.path.getsize(point) == 0
    assert open(os.path.join(staged, "in.txt")).read() == "staged\n"


@pytest.mark.parametrize("mode", ["P1", "F3"])
def test_read_only_volume_where_a_mode_cannot_enforce_it(world, mode):
    for option in ["-v", world.volume + ":/data:ro"], \
            ["--mount=type=bind,src=%s,dst=/data,readonly" % world.volume]:
        rc, out, err = world.run(mode, ["true"], option)
        assert rc == 1 and len(err.splitlines()) == 1 and err.startswith(
            "Error: mode %s cannot make a volume read-only" % mode) and "R1" in err, err


@pytest.mark.parametrize("mode", ["R1", "R1-runc"])
def test_read_only_volume_in_r_modes(world, mode):
    probe = os.path.join(world.volume, "ro-probe")
    with open(probe, "w") as handle:
        handle.write("kept\n")
    rc, out, err = world.run(mode, ["sh", "-c", "cat /data/ro-probe; echo x > /data/ro-probe "
                                    "2>/dev/null && echo written || echo refused"],
                             ["-v", world.volume + ":/data:ro"])
    assert rc == 0 and out.splitlines() == ["kept", "refused"], (out, err)
    assert open(probe).read() == "kept\n"


@pytest.mark.parametrize("mode", ["R1", "R1-runc"])
def test_shm_size_in_r_modes(world, mode):
    rc, out, err = world.run(mode, ["grep", " /dev/shm ", "/proc/mounts"], ["--shm-size=64m"])
    assert rc == 0 and "size=65536k" in out, (out, err)


@pytest.mark.parametrize("mode", ["P1", "F3"])
def test_shm_size_elsewhere_is_one_warning(world, mode):
    rc, out, err = world.run(mode, ["true"], ["--shm-size=64m"])
    assert rc == 0 and err.startswith("Warning: mode %s cannot set the size of /dev/shm"
                                      % mode) and len(err.splitlines()) == 1, err
    rc, out, err = world.run(mode, ["true"], ["--shm-size=lots"])
    assert rc == 1 and err == "Error: invalid --shm-size: lots (a size such as 64m or 1g)\n"


@pytest.mark.parametrize("mode", ["P1", "R1", "R1-runc", "R2"])
def test_device_at_another_path(world, mode):
    rc, out, err = world.run(mode, ["sh", "-c", "test -c /dev/myfull && echo ok; "
                                    "echo x > /dev/myfull || echo full"],
                             ["--device=/dev/full:/dev/myfull"])
    assert rc == 0 and out.split() == ["ok", "full"], err


@pytest.mark.parametrize("mode", ["P1", "R1"])
def test_containerauth_uses_the_container_files_as_they_are(world, mode):
    rc, out, err = world.run(mode, ["sh", "-c", "id -u; grep -c udoc /etc/passwd"],
                             ["--containerauth", "-u", "4321"])
    assert out.splitlines() == ["4321", "0"], err


def test_dri_without_dri_dirs_is_a_quiet_no_op(world):
    dri_list = dict((k, d) for k, d, _ in udocker.CONFIG_DEFAULTS)["dri_list"]
    present = [p for p in dri_list if os.path.isdir(p)]
    rc, out, err = world.run("P1", ["sh", "-c", "for d in %s; do ls -d $d; done"
                                    % " ".join(present or ["/nonexistent"])], ["--dri"])
    if present:
        assert rc == 0 and out.split() == present, err
    else:
        assert rc != 0 and "Error" not in err and "Warning" not in err


@pytest.mark.parametrize("mode", ["P1", "R1"])
def test_image_user_and_workdir_applied(world, mode):
    cid = world.container(mode, config={"Env": ["PATH=/usr/bin:/bin"], "User": "user",
                                        "WorkingDir": "/srv/new", "Cmd": ["sh", "-c",
                                                                         "id -un; pwd"]},
                          fresh=True)
    rc, out, err = world.run(mode, [], name=cid)
    assert (rc, out) == (0, "user\n/srv/new\n"), err
    rc, out, err = world.run(mode, ["id", "-u"], ["-u", "root"], name=cid)
    assert out == "0\n", err


# -- R1 with other users: newuidmap and the /etc/subuid range

def test_r1_runs_as_another_user_through_subuid_ranges(world):
    if not (on_path("newuidmap") and on_path("newgidmap")):
        pytest.skip("no newuidmap/newgidmap (package uidmap)")
    rc, out, err = world.run("R1", ["sh", "-c", "id -u; id -g; wc -l < /proc/self/uid_map"],
                             ["--user=1000:1000"])
    assert (rc, out.split()) == (0, ["1000", "1000", "2"]), err
    rc, out, err = world.run("R1", ["sh", "-c", "touch /tmp/own; chown 123:456 /tmp/own"])
    assert rc != 0                                 # root's own uid only: chown cannot work
    config = os.path.join(world.top, "always.conf")
    with open(config, "w") as handle:
        handle.write("[DEFAULT]\nrunc_map_subids = always\n")
    rc, out, err = world.ud(["--config=" + config, "run", "--nobanner", world.container("R1"),
                             "sh", "-c", "touch /tmp/own; chown 123:456 /tmp/own; "
                             "stat -c %u:%g /tmp/own; rm /tmp/own"], "R1")
    assert (rc, out) == (0, "123:456\n"), err


def test_crun_runs_the_id_map_helpers_only_for_subid_ranges(world):
    """newuidmap/newgidmap (set-uid, ~2 ms of crun's start) are kept from crun where one id
    is mapped, which it then maps itself: the container sees the same maps; crun still
    finds them for the /etc/subuid ranges of another user."""
    real = [udocker.which(n, os.environ.get("PATH", "")) for n in ("newuidmap", "newgidmap")]
    if not all(real):
        pytest.skip("no newuidmap/newgidmap (package uidmap)")
    spy = os.path.join(world.top, "spy")
    log = os.path.join(world.top, "spy.log")
    os.mkdir(spy)
    for path in real:
        name = os.path.basename(path)
        with open(os.path.join(spy, name), "w") as handle:
            handle.write('#!/bin/sh\necho %s >> %s\nexec %s "$@"\n' % (name, log, path))
        os.chmod(os.path.join(spy, name), 0o755)
    env = {"PATH": spy + ":" + os.environ.get("PATH", "")}
    script = ["sh", "-c", "id -u; cat /proc/self/uid_map /proc/self/setgroups"]
    rc, out, err = world.run("R1", script, env=env)
    assert (rc, out.split()) == (0, ["0", "0", str(os.getuid()), "1", "deny"]), err
    assert not os.path.exists(log)
    rc, out, err = world.run("R1", script[:2] + ["id -u; wc -l < /proc/self/uid_map"],
                             ["--user=1000:1000"], env=env)
    assert (rc, out.split()) == (0, ["1000", "2"]), err
    with open(log) as handle:
        assert sorted(handle.read().split()) == ["newgidmap", "newuidmap"]


@pytest.mark.parametrize("mode", ["R1", "R1-runc"])
@pytest.mark.parametrize("path", [None, "/nonexistent"])
def test_r1_runs_the_invoking_user_as_itself(world, path, mode):
    """-u $(id -u):$(id -g) maps the user to itself, one id each (no newuidmap, which a
    nested user namespace cannot use): what it writes is its own outside, as an MPI
    launcher's PMIx server requires of the ranks (issue 16). runc cannot (it needs root
    mapped, to our uid: "no user mapping found"): there the user runs as root, which is
    the user outside, with one warning. R1 uses runc where crun cannot start."""
    uid, gid = os.getuid(), os.getgid()
    out_file = os.path.join(world.volume, "self-%s-%s" % (bool(path), mode))
    rc, out, err = world.run(mode, ["sh", "-c", "id -u; id -g; cat /proc/self/uid_map; "
                                    "touch /data/%s" % os.path.basename(out_file)],
                             ["--user=%d:%d" % (uid, gid), "-v", world.volume + ":/data"],
                             env={"PATH": path} if path else None)
    assert rc == 0, err
    if mode == "R1-runc" or "runc cannot" in err:
        assert err.splitlines() == ["Warning: runc cannot run uid %d as itself: running as "
                                    "root, which is uid %d outside" % (uid, uid)], err
        assert out.split() == ["0", "0", "0", str(uid), "1"], out
    else:
        assert "Warning" not in err, err
        assert out.split() == [str(uid), str(gid), str(uid), str(uid), "1"], out
    st = os.stat(out_file)
    assert (st.st_uid, st.st_gid) == (uid, gid)


def test_r1_without_newuidmap_runs_as_root_with_one_warning(world):
    rc, out, err = world.run("R1", ["id", "-u"], ["--user=1000:1000"],
                             env={"PATH": "/nonexistent"})
    assert (rc, out) == (0, "0\n"), err
    assert err.count("Warning:") == 1 and "--user user ignored" in err


# -- the host's NVIDIA driver (setup --nvidia, run --nvidia), from a fake driver tree

@pytest.fixture(scope="module")
def fake_nvidia(world):
    """A driver laid out as on a real host (support.nvidia.FakeDriver; device files are plain
    files here). Returns (udocker.py arguments that point at it, environment)."""
    driver = FakeDriver(os.path.join(world.top, "fake-nvidia"))
    return driver.args, driver.env


@pytest.mark.parametrize("mode", ["P1", "R1", "F3"])
def test_nvidia_driver_is_bound_at_run_time_not_copied(world, fake_nvidia, mode):
    args, env = fake_nvidia
    cid = world.container(mode, fresh=True)
    root = os.path.join(world.ud_dir, "containers", cid, "ROOT")
    assert world.run(mode, ["true"], name=cid)[0] == 0           # first-run mount points
    before = tree_state(root)
    rc, out, err = world.ud(args + ["setup", "--nvidia", cid], env=env)
    assert rc == 0 and "9 libraries" in err and "1 tools" in err and "lib32" not in err, err
    assert world.ud(["setup", cid])[1].endswith("nvidiamode: True\n")
    script = ("nvidia-smi; ls /.udocker/nvidia/lib; echo $LD_LIBRARY_PATH; echo $VK_ICD_FILENAMES;"
              " cat $VK_ICD_FILENAMES; test -e /dev/nvidia0 && echo device || echo none")
    rc, out, err = world.ud(args + ["run", "--nobanner", cid, "sh", "-c", script], mode, env=env)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1] == SMI_TABLE and "Tesla T4" in lines[2]
    assert lines[3:12] == BOUND_LIBRARIES
    assert lines[12].split(":")[0].endswith("nvidia/lib")          # the driver comes first
    assert lines[13] == "/.udocker/nvidia/etc/vulkan/icd.d/nvidia_icd.json"
    assert "libGLX_nvidia.so.0" in lines[14]
    assert lines[15] == ("none" if mode.startswith("F") else "device")   # F: at its path only
    assert tree_state(root) == before                 # nothing copied into ROOT
    leftover = os.path.join(root, ".udocker")
    if mode == "P1":
        assert not os.path.lexists(leftover)
    elif mode == "R1":                                 # the tmpfs mount point, empty
        assert os.listdir(leftover) == ["nvidia"] and not os.listdir(leftover + "/nvidia")
    rc, out, err = world.ud(["setup", "--purge", cid])
    assert rc == 0 and world.ud(["setup", cid])[1].endswith("nvidiamode: False\n"), err
    assert not os.path.lexists(leftover)
    rc, out, err = world.ud(args + ["run", "--nobanner", cid, "nvidia-smi"], mode, env=env)
    assert rc == 1 and "command not found" in err


def test_run_nvidia_option_and_hosts_without_a_driver(world, fake_nvidia):
    args, env = fake_nvidia
    rc, out, err = world.ud(args + ["run", "--nobanner", "--nvidia", world.container("P1"),
                                    "nvidia-smi"], "P1", env=env)
    assert rc == 0 and SMI_TABLE in out, err
    nothing = os.path.join(world.top, "no-nvidia.conf")
    with open(nothing, "w") as handle:
        handle.write("[DEFAULT]\nnvi_ldconfig = true\n")
    bare = dict(env, LD_LIBRARY_PATH="")
    cid = world.container("P1", fresh=True)
    rc, out, err = world.ud(["--config=" + nothing, "setup", "--nvidia", cid], env=bare)
    assert rc == 1 and err.startswith("Error: setup --nvidia: no NVIDIA driver on this host") \
        and len(err.splitlines()) == 1, err
    rc, out, err = world.ud(["--config=" + nothing, "run", "--nobanner", "--nvidia", cid, "true"],
                            env=bare)
    assert rc == 1 and err.startswith("Error: run --nvidia: no NVIDIA driver") and \
        len(err.splitlines()) == 1, err
    assert world.ud(["--config=" + nothing, "setup", "--nvidia", "--force", cid], env=bare)[0] == 0
    rc, out, err = world.ud(["--config=" + nothing, "run", "--nobanner", cid, "echo", "ran"],
                            env=bare)
    assert (rc, out) == (0, "ran\n") and err.startswith("Warning: container") and \
        "set up for NVIDIA" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("gpus", ["all", "1", "device=0"])
def test_gpus_option_asks_for_the_driver(world, fake_nvidia, gpus):
    """cwltool's CUDARequirement sends --gpus=N."""
    args, env = fake_nvidia
    rc, out, err = world.ud(args + ["run", "--nobanner", "--gpus=" + gpus,
                                    world.container("P1"), "nvidia-smi"], "P1", env=env)
    assert rc == 0 and SMI_TABLE in out, err
    nothing = os.path.join(world.top, "no-nvidia.conf")
    with open(nothing, "w") as handle:
        handle.write("[DEFAULT]\nnvi_ldconfig = true\n")
    rc, out, err = world.ud(["--config=" + nothing, "run", "--nobanner", "--gpus=" + gpus,
                             world.container("P1"), "true"], env=dict(env, LD_LIBRARY_PATH=""))
    assert rc == 1 and err.startswith("Error: run --gpus: no NVIDIA driver") and \
        len(err.splitlines()) == 1, err
    rc, out, err = world.ud(["run", "--gpus=many", world.container("P1"), "true"])
    assert rc == 1 and err.startswith("Error: invalid --gpus: many"), err


# -- a mode that cannot start here: automatic fallback unless the mode was chosen

def _failing_stub(world, name, real, message):
    """An engine executable that answers the tool probes (--help, -V, --version) as the real
    one does and fails like it does on a host that lacks what it needs; it logs its calls."""
    path = os.path.join(world.top, name)
    with open(path, "w") as handle:
        handle.write('#!/bin/sh\necho "$*" >> "%s.calls"\ncase "$1" in --help|-V|--version) '
                     'exec "%s" "$@";; esac\necho "%s" >&2\nexit 1\n' % (path, real, message))
    os.chmod(path, 0o755)
    return path


def _calls(stub):
    try:
        with open(stub + ".calls") as handle:
            return [line for line in handle.read().splitlines()
                    if line.split()[0] not in ("--help", "-V", "--version")]
    except IOError:
        return []


def _unset_container(world, kind="glibc"):
    cid = "%08x-0000-4000-8000-%012x" % (random.getrandbits(32), random.getrandbits(48))
    rootfs.write_container(world.ud_dir, cid, world.tree(kind))
    return cid


PTRACE_ERROR = "proot error: ptrace(TRACEME): Operation not permitted"
USERNS_ERROR = "rootless container requires user namespaces"


def test_default_mode_that_cannot_start_falls_back_with_one_line(world):
    assert world.run("P1", ["true"])[0] == 0                    # the tools are installed
    stub = _failing_stub(world, "proot-noptrace", os.path.join(world.ud_dir, "bin",
                                                               "proot-x86_64"), PTRACE_ERROR)
    env = {"UDOCKER_USE_PROOT_EXECUTABLE": stub}
    cid = _unset_container(world)
    rc, out, err = world.ud(["run", "--nobanner", cid, "sh", "-c", "echo $container_execmode"],
                            env=env)
    assert (rc, out) == (0, "R1\n"), err
    assert err.splitlines() == ["Warning: P1, P2 cannot run on this host (%s): using R1"
                                % PTRACE_ERROR]
    probes = len(_calls(stub))
    assert probes == 2                                          # P1, P2 probed once each
    rc, out, err = world.ud(["run", "--nobanner", cid, "true"], env=env)
    assert rc == 0 and len(err.splitlines()) == 1 and len(_calls(stub)) == probes  # cached
    assert not os.path.exists(os.path.join(world.ud_dir, "containers", cid, "execmode"))
    # a mode that was chosen fails in one line, naming one that works
    assert world.ud(["setup", "--execmode=P1", cid])[0] == 0
    rc, out, err = world.ud(["run", "--nobanner", cid, "true"], env=env)
    assert rc == 1 and err.splitlines() == [
        "Error: mode P1 cannot run on this host: %s (R1 can: setup --execmode=R1)"
        % PTRACE_ERROR], err
    rc, out, err = world.ud(["run", "--nobanner", _unset_container(world), "true"],
                            env=dict(env, UDOCKER_DEFAULT_EXECUTION_MODE="P2"))
    assert rc == 1 and err.startswith("Error: mode P2 cannot run on this host: " +
                                      PTRACE_ERROR) and len(err.splitlines()) == 1, err


def test_fallback_reaches_f3_for_glibc_and_stops_for_static_trees(world):
    assert world.run("R1", ["true"])[0] == 0
    bindir = os.path.join(world.ud_dir, "bin")
    env = {"UDOCKER_USE_PROOT_EXECUTABLE": _failing_stub(
               world, "proot-noptrace2", os.path.join(bindir, "proot-x86_64"), PTRACE_ERROR),
           "UDOCKER_USE_RUNC_EXECUTABLE": _failing_stub(
               world, "runc-nouserns", os.path.join(bindir, "runc-x86_64"), USERNS_ERROR)}
    cid = _unset_container(world)
    rc, out, err = world.ud(["run", "--nobanner", cid, "sh", "-c", "echo $container_execmode"],
                            env=env)
    assert (rc, out) == (0, "F3\n"), err
    assert [l for l in err.splitlines() if l.startswith("Warning")] == [
        "Warning: P1, P2, R1 cannot run on this host (%s): using F3" % PTRACE_ERROR]
    if rootfs.busybox_available():
        rc, out, err = world.ud(["run", "--nobanner", _unset_container(world, "busybox"),
                                 "true"], env=env)
        assert rc == 1 and len(err.splitlines()) == 1, err
        assert err.startswith("Error: no execution mode can run here: P1, P2: %s; R1: %s; "
                              "F3: F modes need a glibc or musl container" % (PTRACE_ERROR,
                                                                       USERNS_ERROR)), err


@pytest.mark.parametrize("mode", ["P1", "R1", "R1-runc", "F3"])
def test_inherited_fds_reach_the_container_as_mpi_launchers_need(world, mode):
    """MPICH's PMI_FD (and a shell's 3<file): fd numbers above 2 pass through (runc and
    crun get --preserve-fds), holes below them do not stop the run."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"pmi-hello\n")
    os.close(write_end)
    argv, env = world.command(["run", "--nobanner", world.container(mode), "sh", "-c",
                               "echo $PMI_FD; cat /proc/self/fd/$PMI_FD"], mode)
    fd = 57                                           # free in pytest; 3..56 mostly holes
    env["PMI_FD"] = str(fd)
    os.dup2(read_end, fd)                             # inheritable (dup2's default)
    os.close(read_end)
    try:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                close_fds=False)
        out, err = proc.communicate()
    finally:
        os.close(fd)
    assert proc.returncode == 0 and out == b"57\npmi-hello\n", err


@pytest.mark.parametrize("mode", ["P1", "F3", "R1"])
def test_run_start_up_stays_lean(world, mode):
    """Once probed and set up, `run` imports none of the costly modules (its start-up is a
    benchmark target: at most 20 ms over the engine alone)."""
    if sys.version_info[0] == 2:
        pytest.skip("the budget is for Python 3")
    cid = world.container(mode)
    assert world.run(mode, ["true"])[0] == 0                 # probes cached, libc noted
    settled = time.time() - 10       # the parsed copies are kept once their JSON is 2 s old
    for path in (os.path.join(world.ud_dir, "containers", cid, "container.json"),
                 os.path.join(world.ud_dir, ".probes.json")):
        os.utime(path, (settled, settled))
    assert world.run(mode, ["true"])[0] == 0                 # parsed copies kept
    code = ("import sys; sys.path.insert(0, %r); import udocker; "
            "status = udocker.main(['run', '--nobanner', %r, 'true']); "
            "print('LOADED:' + ' '.join(m for m in ('re', 'json', 'subprocess', 'uuid', 'enum', "
            "'glob', 'threading', 'tempfile', 'shutil', 'socket', 'hashlib', 'configparser', "
            "'ctypes', '__future__', 'fnmatch') "
            "if m in sys.modules)); sys.exit(status)" % (os.path.dirname(SCRIPT), cid))
    argv, env = world.command([], mode)
    proc = subprocess.Popen([sys.executable, "-S", "-c", code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().splitlines()[-1] == "LOADED:", err
    if sys.version_info >= (3, 7):          # as ./udocker.py starts (python -S): not even os
        argv, env = world.command(["run", "--nobanner", cid, "true"], mode)
        proc = subprocess.Popen(argv[:1] + ["-S", "-X", "importtime"] + argv[1:], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = proc.communicate()[1].decode()
        imported = [l.rsplit("|", 1)[1].strip() for l in err.splitlines()
                    if l.startswith("import time:") and "|" in l]
        assert proc.returncode == 0 and "fcntl" in imported, err
        # prctl: P1 becomes the subreaper; R1 needs none (its pid namespace), nor
        # PDEATHSIG when posix_spawn starts it (3.8+); F3's `true` usually ends within
        # Supervisor.GRACE_SECONDS
        if mode == "P1" or (mode == "R1" and sys.version_info < (3, 8)):
            assert "_ctypes" in imported, err
        elif mode == "R1":
            assert "_ctypes" not in imported, err
        assert not set(imported) & set(["os", "posixpath", "_collections_abc", "stat", "re",
                                         "json", "ctypes", "subprocess"]), imported
        assert "_json" not in imported, imported      # (parsed copies, the spec's text)


def _repository_state(top):
    """{path: (inode, mtime, size)} of everything under top (symlinks not followed); the
    directories of a ROOT by their inode only: proot itself (the engine alone too) makes
    an empty file at a bind target missing in ROOT (/etc/hosts...) and removes it at exit."""
    state = {}
    for parent, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            in_root = "%sROOT%s" % (os.sep, os.sep) in path + os.sep
            state[path] = (st.st_ino,) if in_root and name in dirs else \
                (st.st_ino, st.st_mtime, st.st_size)
    return state


@pytest.mark.parametrize("mode", ["P1", "F3", "R1"])
def test_a_second_run_writes_nothing_in_the_repository(world, mode):
    """Once a container ran, running it again probes nothing anew and rewrites nothing:
    no file of the repository (tools, probe cache, container directory, ROOT) is created,
    replaced, changed or removed."""
    cid = world.container(mode, fresh=True)
    assert world.run(mode, ["true"], name=cid)[0] == 0
    before = _repository_state(world.ud_dir)
    time.sleep(0.01)                                       # a rewrite shows in st_mtime
    rc, out, err = world.run(mode, ["true"], name=cid)
    assert rc == 0, err
    after = _repository_state(world.ud_dir)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert changed == []


# -- run --rm: a run that fails still cleans up (no engine needed: every case fails first)

def _imported_image(udocker, tmpdir, name="img:1"):
    """A small image imported from a tarball (a passwd with one user, /bin/true, no Cmd)."""
    tree = os.path.join(str(tmpdir), "tree")
    os.makedirs(os.path.join(tree, "etc"))
    os.makedirs(os.path.join(tree, "bin"))
    shutil.copy("/bin/true", os.path.join(tree, "bin", "true"))
    with open(os.path.join(tree, "etc", "passwd"), "w") as handle:
        handle.write("root:x:0:0:root:/root:/bin/sh\n")
    tarball = os.path.join(str(tmpdir), "tree.tar")
    subprocess.check_call(["tar", "-C", tree, "-cf", tarball, "."])
    udocker("import", tarball, name).check()
    return name


@pytest.mark.parametrize("options,command,needle", [
    (["-w", "relative"], ["/bin/true"], "invalid working directory"),
    (["-u", "nosuch"], ["/bin/true"], "user nosuch not found"),
    (["-v", "/nonexistent/dir:/data"], ["/bin/true"], "invalid volume"),
    (["--name=named", "-u", "nosuch"], ["/bin/true"], "user nosuch not found"),
    ([], [], "Error: "),                                  # no command, no image Cmd
    ([], ["/bin/true"], "proot executable not found"),    # the engine cannot start
])
def test_failed_run_rm_of_an_image_leaves_no_container(udocker, tmpdir, options, command,
                                                       needle):
    image = _imported_image(udocker, tmpdir)
    udocker.env.update({"UDOCKER_DEFAULT_EXECUTION_MODE": "P1",
                        "UDOCKER_USE_PROOT_EXECUTABLE": "/nonexistent/proot"})
    res = udocker("run", "--rm", "--nobanner", *(options + [image] + command))
    one_error_line(res, needle)
    containers = os.path.join(udocker.udocker_dir, "containers")
    assert os.listdir(containers) == [], res
    assert [l for l in os.listdir(os.path.join(udocker.udocker_dir, ".locks"))
            if l.startswith("container-") and l != "container-names.lock"] == []


def test_failed_run_rm_keeps_an_existing_container(udocker, tmpdir):
    image = _imported_image(udocker, tmpdir)
    cid = udocker("create", "--name=kept", image).check().out.strip()
    one_error_line(udocker("run", "--rm", "-u", "nosuch", "kept", "/bin/true"),
                   "user nosuch not found", rc=1)
    assert udocker("ps").out.count(cid) == 1


@pytest.mark.parametrize("options,needle", [
    (["-p", "99999:80"], "invalid port mapping: 99999:80"),
    (["-p", "0"], "invalid port mapping: 0"),
    (["-u", "4294967296"], "invalid user: 4294967296"),          # would wrap to root
    (["-u", "0:4294967296"], "invalid user: 0:4294967296"),
    (["-v", "/tmp:/" + "d" * 5000], "path too long"),             # the bind was dropped
    (["--platform=linux/s390x"], "the local image img:1 is linux/"),
    (["--platform=foo"], "invalid platform: 'foo'"),
])
def test_values_out_of_range_are_refused_before_a_run(udocker, tmpdir, options, needle):
    image = _imported_image(udocker, tmpdir)
    udocker.env.update({"UDOCKER_DEFAULT_EXECUTION_MODE": "P1",
                        "UDOCKER_USE_PROOT_EXECUTABLE": "/nonexistent/proot"})
    res = udocker("run", "--rm", "--nobanner", *(options + [image, "/bin/true"]))
    assert len(one_error_line(res, needle)) < 200


# -- nothing is written before a run can start (the run plan is complete and valid first)

def tree_digest(*tops):
    """Every entry under tops: path, kind, mode bits and contents (or link target)."""
    import hashlib
    found = {}
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [""] + dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if os.path.islink(path):
                    what = "link:" + os.readlink(path)
                elif os.path.isdir(path):
                    what = "dir"
                else:
                    with open(path, "rb") as handle:
                        what = hashlib.sha256(handle.read()).hexdigest()
                found[path] = (what, st.st_mode)
    return found


@pytest.mark.parametrize("mode", ["P1", "R1", "F1", "F3"])
def test_a_run_that_cannot_start_leaves_the_container_as_it_was(world, mode):
    """Each failing run (a bad -w, a missing command, a volume symlink F modes would make,
    a mount point inside a writable volume, an unknown user, an image WorkingDir to create)
    is refused with one Error line and changes no byte of the container directory."""
    cid = world.container(mode, config={"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"],
                                        "WorkingDir": "/made/by/run"}, fresh=True)
    cdir = os.path.join(world.ud_dir, "containers", cid)
    outer = os.path.join(world.top, "plan-" + mode)
    os.makedirs(os.path.join(outer, "inner"))
    notelf = os.path.join(outer, "notelf")
    with open(notelf, "w") as handle:
        handle.write("no #! line, no ELF header\n")
    os.chmod(notelf, 0o755)
    user = [] if mode.startswith("F") else ["-u", "4321"]      # F: always the host user
    cases = [
        (user + ["-w", "/nonexistent"], ["/bin/true"], "invalid working directory"),
        (user, ["no-such-command"], "command not found"),
        (["-v", outer + ":/data", "-v", outer + "/inner:/data/sub/inner",
          "-v", notelf + ":/data/file"], ["no-such-command"], "command not found"),
    ]
    if mode.startswith("F"):            # fails once the command is read: after the volumes
        cases.append((["-v", outer + ":/data"], ["/data/notelf"], "not an ELF program"))
    else:
        cases.append((["-u", "ghost"], ["/bin/true"], "user ghost not found"))
    before = tree_digest(cdir, outer)
    for options, command, needle in cases:
        rc, out, err = world.run(mode, command, options, name=cid)
        one_error_line(err, needle)
        assert rc != 0, err
        assert tree_digest(cdir, outer) == before, (options, err)
    rc, out, err = world.run(mode, ["sh", "-c", "pwd"], name=cid)   # and it still runs
    assert rc == 0 and out.strip() == "/made/by/run", err


def test_a_failed_first_run_does_not_set_the_container_up(world):
    """F modes set a container up on its first run (symlinks in ROOT made host paths): a
    first run that fails its checks leaves that to the next, and changes nothing."""
    cid = "%08x-0000-4000-8000-%012x" % (random.getrandbits(32), random.getrandbits(48))
    rootfs.write_container(world.ud_dir, cid, world.tree("glibc"),
                           config={"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"]})
    cdir = os.path.join(world.ud_dir, "containers", cid)
    before = tree_digest(cdir)
    env = {"UDOCKER_DEFAULT_EXECUTION_MODE": "F1"}
    rc, out, err = world.ud(["run", "--nobanner", "-w", "/nonexistent", cid, "true"], env=env)
    one_error_line(err, "invalid working directory")
    assert rc != 0 and tree_digest(cdir) == before
    rc, out, err = world.ud(["run", "--nobanner", cid, "sh", "-c", "echo $container_execmode"],
                            env=env)
    assert rc == 0 and out.strip() == "F1", err
    assert "setting up container %s for mode F1" % cid in err
    assert open(os.path.join(cdir, "execmode")).read().strip() == "F1"


@pytest.mark.skipif(sys.version_info[0] < 3, reason="Python 2.7 imports the whole module")
def test_the_chapters_grouped_for_run_are_what_every_run_loads(world, tmpdir, monkeypatch):
    """ChapterCache.GROUPS["run"] is loaded at once when main knows the command: each of its
    chapters must be one that `run` loads anyway, in every mode (seen from a cache built
    without groups, where chapters load one by one)."""
    script = str(tmpdir.join("udocker.py"))
    shutil.copy2(SCRIPT, script)
    monkeypatch.setattr(udocker.ChapterCache, "GROUPS", {})
    assert udocker.ChapterCache.write(script, os.path.join(
        str(tmpdir), "__pycache__", "udocker.%s.chapters" % sys.implementation.cache_tag))
    monkeypatch.undo()
    runner = Udocker(str(tmpdir.join("t")), script=script)
    for mode in ("P1", "R1", "F1", "F3"):
        result = runner("-D", "run", "--nobanner", world.container(mode), "true",
                        env=dict(MODES[mode][1], UDOCKER_DIR=world.ud_dir))
        lines = [l for l in result.err.splitlines() if "chapters loaded: " in l]
        assert result.rc == 0 and len(lines) == 1, result
        loaded = lines[0].split("chapters loaded: ")[1].rsplit(" (", 1)[0].split()
        assert set(udocker.ChapterCache.GROUPS["run"]) <= set(loaded), (mode, loaded)


@pytest.mark.skipif(sys.version_info[0] < 3, reason="Python 2.7 imports the whole module")
@pytest.mark.parametrize("mode", ["P1", "F3"])
def test_options_that_need_cold_functions_load_them_alone(world, tmpdir, mode):
    """A volume, an env file and a CPU list are the work of ChapterCache.COLD functions,
    loaded alone when a run is given them."""
    host = tmpdir.mkdir("data-" + mode)
    host.join("in").write("from the host\n")
    env_file = tmpdir.join("env-" + mode)
    env_file.write("# a comment\nexport FROM_FILE=yes\n")
    result = world.ud(["-D", "run", "--nobanner", "-v", "%s:/data" % host, "--env-file",
                       str(env_file), "--cpuset-cpus=0", world.container(mode), "sh", "-c",
                       "cat /data/in; echo $FROM_FILE"], mode)
    assert result.rc == 0 and result.out == "from the host\nyes\n", result
    lines = [l for l in result.err.splitlines() if "chapters loaded: " in l]
    loaded = lines[0].split("chapters loaded: ")[1].rsplit(" (", 1)[0].split()
    for name in ("Volume.parse()", "Engine._read_env_file()", "set_cpu_affinity()"):
        assert name in loaded, loaded


@pytest.mark.parametrize("mode", sorted(MODES))
def test_run_loads_only_the_chapters_it_needs(world, mode):
    """From the start-up cache (Python 3), `run` loads its own engine's sub-section and
    none of the registry client, image formats, container creation, the installer's
    fetching, the other commands or the cache builder (section 13). (A first run may probe
    other modes: the tools are probed once, then the probes are cached.)"""
    cid = world.container(mode)
    assert world.run(mode, ["true"])[0] == 0
    result = world.ud(["-D", "run", "--nobanner", cid, "true"], mode)
    assert result.rc == 0, result
    lines = [l for l in result.err.splitlines() if l.startswith("Debug: start-up cache: ")]
    assert len(lines) == 1, result
    if sys.version_info[0] < 3:
        assert lines[0].endswith("not used")
        return
    loaded = set(lines[0].split("chapters loaded: ")[1].rsplit(" (", 1)[0].split())
    assert not loaded & set(["6", "7", "8", "10.1", "11.2", "11.4", "13", "9.5.5"]), loaded
    if MODES[mode][0] in ("P1", "R1", "F1", "F3"):       # nor a ChapterCache.COLD function
        forks = ["Watchdog._fork()", "_spawn()"] if sys.version_info < (3, 8) else []
        assert not [n for n in loaded if n.endswith("()") and n not in forks], loaded
    family = {"P": "9.5.1", "R": "9.5.2", "F": "9.5.3"}[MODES[mode][0][0]]
    assert ("9.5.4" in loaded) == (MODES[mode][0] in ("F2", "F4")), loaded   # F3: patched
    assert family in loaded and not loaded & (set(["9.5.2", "9.5.3"]) - set([family])), \
        " ".join(sorted(loaded))
