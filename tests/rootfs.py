"""Small container root filesystems for the engine tests, built from the host's own files:
a static busybox tree, and a glibc tree (Debian's dash, bash, coreutils, findutils and their
libraries, laid out like a merged-/usr Debian rootfs, with Debian's absolute ld.so link),
which can carry the host's C compiler (Debian's gcc packages, copied as dpkg lists them)."""
from __future__ import print_function, absolute_import

import json
import os
import re
import shutil
import subprocess

BUSYBOX = "/bin/busybox"
GLIBC_PROGRAMS = ["dash", "bash", "ls", "cat", "id", "env", "pwd", "sleep", "find", "echo",
                  "true", "false", "touch", "stat", "wc", "head", "mkdir", "rm", "uname",
                  "readlink", "chmod", "ln", "sort", "tr", "tail", "dd", "date", "basename",
                  "dirname", "xargs", "grep", "chown"]
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "user:x:1000:1000:user:/home/user:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n"


def busybox_available():
    return os.path.isfile(BUSYBOX) and b"statically linked" in _file_type(BUSYBOX)


def _file_type(path):
    try:
        return subprocess.check_output(["file", "-L", path])
    except (OSError, subprocess.CalledProcessError):
        with open(path, "rb") as handle:
            return b"statically linked" if b"ld-linux" not in handle.read() else b""


def _common(root):
    for sub in ("etc", "proc", "dev", "sys", "tmp", "root", "home/user", "var/tmp"):
        path = os.path.join(root, sub)
        if not os.path.isdir(path):
            os.makedirs(path)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    with open(os.path.join(root, "etc", "passwd"), "w") as handle:
        handle.write(PASSWD)
    with open(os.path.join(root, "etc", "group"), "w") as handle:
        handle.write(GROUP)


def make_busybox_rootfs(root):
    _common(root)
    bindir = os.path.join(root, "bin")
    os.makedirs(bindir)
    shutil.copy(BUSYBOX, os.path.join(bindir, "busybox"))
    applets = subprocess.check_output([BUSYBOX, "--list"]).decode("ascii").split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", os.path.join(bindir, applet))
    with open(os.path.join(root, "etc", "os-release"), "w") as handle:
        handle.write('NAME="BusyBox"\nID=busybox\n')


def _libraries(program):
    """Host paths of the shared libraries a program needs (ldd), loader included."""
    out = subprocess.check_output(["ldd", program]).decode("utf-8", "replace")
    found = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)", line.split("=>")[-1])
        if match and os.path.exists(match.group(1)):
            found.append(match.group(1))
    return found


def make_glibc_rootfs(root):
    """A merged-/usr glibc tree: usr/bin, usr/lib/TRIPLET; bin, lib, sbin -> usr/...;
    lib64/ld-linux-x86-64.so.2 an ABSOLUTE link, as in Debian images."""
    _common(root)
    triplet = "x86_64-linux-gnu"
    usr_bin = os.path.join(root, "usr", "bin")
    usr_lib = os.path.join(root, "usr", "lib", triplet)
    for path in (usr_bin, usr_lib, os.path.join(root, "usr", "sbin"),
                 os.path.join(root, "lib64")):
        os.makedirs(path)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("sbin", "usr/sbin")):
        os.symlink(target, os.path.join(root, link))
    libs = set()
    for name in GLIBC_PROGRAMS:
        host = shutil.which(name) if hasattr(shutil, "which") else _which(name)
        if not host:
            continue
        shutil.copy(os.path.realpath(host), os.path.join(usr_bin, name))
        libs.update(_libraries(host))
    for lib in libs:
        dest = os.path.join(usr_lib, os.path.basename(lib))
        if not os.path.exists(dest):
            shutil.copy(os.path.realpath(lib), dest)
    os.symlink("/lib/%s/ld-linux-x86-64.so.2" % triplet,
               os.path.join(root, "lib64", "ld-linux-x86-64.so.2"))
    os.symlink("dash", os.path.join(usr_bin, "sh"))
    os.symlink("/usr/bin/dash", os.path.join(usr_bin, "abs-sh"))   # absolute, as alternatives
    shutil.copy("/etc/os-release", os.path.join(root, "etc", "os-release"))


# the host files whose Debian packages make a C compiler (gcc, cc1, as, ld, crt files, headers)
GCC_FILES = ["/usr/bin/gcc", "/usr/bin/as", "/usr/include/stdio.h", "/usr/include/linux/limits.h"]
GCC_SKIP = re.compile(r"^/usr/share/|lto1$|lto-dump[^/]*$|cc1plus$|ld\.gold$|/gp-|gprofng|"
                      r"/lib(c|m-[0-9.]+|[a-z]*san|gomp|itm|quadmath|stdc\+\+|supc\+\+|mvec)\.a$")


def gcc_packages():
    """The Debian packages of the host's C compiler (gcc, gcc-N, cpp-N, binutils...,
    libgcc-N-dev, libc6-dev, linux-libc-dev), or [] when dpkg or gcc is missing."""
    names, pending = set(), [f for f in GCC_FILES if os.path.exists(f)]
    if len(pending) < len(GCC_FILES):
        return []
    pending += [os.path.realpath(f) for f in pending]
    try:
        gcc = subprocess.check_output(["gcc", "-print-prog-name=cc1"]).decode().strip()
        libgcc = subprocess.check_output(["gcc", "-print-libgcc-file-name"]).decode().strip()
        pending += [gcc, libgcc, os.path.realpath(_which("as") or "/usr/bin/as")]
        for line in subprocess.check_output(["dpkg", "-S"] + pending).decode().splitlines():
            names.update(n.strip() for n in line.split(": ", 1)[0].split(","))
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted(names)


def add_gcc(root):
    """The host's C compiler copied into a tree of make_glibc_rootfs (files as dpkg lists
    them, less documentation and the C++/LTO back ends, plus the libraries its programs
    need); `gcc -o x x.c` works in the tree. False when the host has none."""
    packages = gcc_packages()
    if not packages:
        return False
    listed = subprocess.check_output(["dpkg", "-L"] + packages).decode().splitlines()
    programs = []
    for path in sorted(set(listed)):
        if not path.startswith("/") or GCC_SKIP.search(path) or not os.path.lexists(path) or \
                os.path.isdir(path) and not os.path.islink(path):
            continue
        dest = os.path.join(root, os.path.realpath(os.path.dirname(path)).lstrip("/"),
                            os.path.basename(path))
        if os.path.lexists(dest):
            continue
        if not os.path.isdir(os.path.dirname(dest)):
            os.makedirs(os.path.dirname(dest))
        if os.path.islink(path):
            os.symlink(os.readlink(path), dest)
        else:
            shutil.copy2(path, dest)
            if os.access(path, os.X_OK) and b"ld-linux" in _file_type(path):
                programs.append(path)
    usr_lib = os.path.join(root, "usr", "lib", "x86_64-linux-gnu")
    for lib in set(lib for program in programs for lib in _libraries(program)):
        dest = os.path.join(usr_lib, os.path.basename(lib))
        if not os.path.exists(dest):
            shutil.copy(os.path.realpath(lib), dest)
    return True


def _which(name):
    for directory in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def write_container(topdir, cid, rootfs, config=None, execmode=None, name=None):
    """containers/CID/ROOT (a copy of rootfs), container.json, imagerepo.name [, execmode]."""
    cdir = os.path.join(topdir, "containers", cid)
    os.makedirs(cdir)
    subprocess.check_call(["cp", "-a", rootfs, os.path.join(cdir, "ROOT")])
    with open(os.path.join(cdir, "container.json"), "w") as handle:
        json.dump({"architecture": "amd64", "os": "linux",
                   "config": config or {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"]}}, handle)
    with open(os.path.join(cdir, "imagerepo.name"), "w") as handle:
        handle.write("test:latest")
    if execmode:
        with open(os.path.join(cdir, "execmode"), "w") as handle:
            handle.write(execmode)
    if name:
        os.symlink(cid, os.path.join(topdir, "containers", name))
    return cdir
