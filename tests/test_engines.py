"""Execution engines (section 9) without running an engine: path resolution inside ROOT,
ELF reading, what a run is made of (command, user, environment, volumes, working
directory), the OCI spec for runc/crun, F-mode symlink conversion, and the setup/run
command-line errors. The engines themselves run in test_run.py."""
from __future__ import print_function, absolute_import

import os
import random
import shutil
import signal
import subprocess
import time

import pytest

import udocker
import rootfs
from support import UDOCKER_SCRIPT as SCRIPT, wait_for
from support.runner import Udocker
from support.toolserver import path_without_engines

CID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


@pytest.fixture(scope="module")
def glibc_tree(tmpdir_factory):
    root = str(tmpdir_factory.mktemp("glibc").join("ROOT"))
    rootfs.make_glibc_rootfs(root)
    return root


def session_for(tmpdir, **env):
    environ = {"HOME": str(tmpdir), "UDOCKER_NOSYSCONF": "1",
               "UDOCKER_DIR": str(tmpdir.join("udocker")), "UDOCKER_TARBALL": ""}
    environ.update(env)
    session = udocker.Session(udocker.Config.load(environ, {}))
    session.repo.create()
    return session


def engine_for(tmpdir, root, config=None, opts=None, args=(), mode="P1", **env):
    session = session_for(tmpdir, **env)
    container = udocker.RunContainer(CID, str(tmpdir.join("cdir").ensure(dir=True)), root,
                                     {"config": config or {}}, ["myname"])
    all_opts = dict((o.dest, [] if o.kind == udocker.LIST else None)
                    for o in udocker.COMMANDS["run"].opts)
    all_opts.update(opts or {})
    return udocker.ENGINES[mode](session, container, all_opts, list(args), None)


def plan_for(tmpdir, root, mode="P1", **kwargs):
    """(engine, engine.plan()): what engine_for's run would run ("what would run"), with a
    stand-in proot or runc (a plan starts nothing)."""
    from test_tools import fake_proot, fake_runtime
    if mode.startswith("P"):
        proot = str(tmpdir.join("stand-in", "proot"))
        if not os.path.exists(proot):
            fake_proot(tmpdir.join("stand-in"), "5.4.0", modern=True)
        kwargs.setdefault("UDOCKER_USE_PROOT_EXECUTABLE", proot)
    elif mode.startswith("R"):
        runc = str(tmpdir.join("stand-in", "runc-x86_64"))
        if not os.path.exists(runc):
            fake_runtime(tmpdir.join("stand-in"), "runc", True)
        kwargs.setdefault("UDOCKER_USE_RUNC_EXECUTABLE", runc)
    engine = engine_for(tmpdir, root, mode=mode, **kwargs)
    engine.tools = udocker.Tools(engine.cfg, engine.session.repo, engine.environ)
    return engine, engine.plan()


def bundle_spec(plan):
    """The OCI spec of an R mode's plan (the bundle it would write)."""
    import json
    (bundle,) = [c for c in plan.changes if c.kind == "bundle"]
    return json.loads(bundle.value)


# -- paths and ELF files

def test_resolve_in_root_stays_inside(tmpdir):
    root = tmpdir.join("R")
    root.join("usr", "bin").ensure(dir=True)
    root.join("usr", "bin", "dash").write("x")
    os.symlink("usr/bin", str(root.join("bin")))
    os.symlink("/usr/bin/dash", str(root.join("usr", "bin", "sh")))           # absolute
    os.symlink("../../../../../../etc", str(root.join("up")))                  # climbs out
    os.symlink("loop2", str(root.join("loop1")))
    os.symlink("loop1", str(root.join("loop2")))
    r = str(root)
    assert udocker.resolve_in_root(r, "/bin/sh") == os.path.join(r, "usr/bin/dash")
    assert udocker.resolve_in_root(r, "/bin/sh", follow_last=False) == \
        os.path.join(r, "usr/bin/sh")
    assert udocker.resolve_in_root(r, "/up/passwd") == os.path.join(r, "etc/passwd")
    assert udocker.resolve_in_root(r, "/../../etc") == os.path.join(r, "etc")
    os.symlink(r + "/usr/bin/dash", str(root.join("hostlink")))     # made by F-mode setup
    assert udocker.resolve_in_root(r, "/hostlink") == os.path.join(r, "usr/bin/dash")
    with pytest.raises(udocker.EngineError):
        udocker.resolve_in_root(r, "/loop1")


def test_elf_info_reads_interpreter_and_static():
    info = udocker.elf_info("/bin/ls")
    assert info["interp"].startswith("/lib") and info["dynamic"] and info["machine"] == "amd64"
    assert udocker.elf_info(SCRIPT) is None
    if rootfs.busybox_available():
        static = udocker.elf_info(rootfs.BUSYBOX)
        assert static["interp"] is None


def test_container_libc_loader_and_libraries(glibc_tree):
    kind, version = udocker.container_libc(glibc_tree, "amd64")
    assert kind == "glibc" and udocker.version_at_least(version, "2.31")
    cont, host = udocker.container_loader(glibc_tree, "amd64")
    assert cont == "/lib64/ld-linux-x86-64.so.2"
    assert host == os.path.join(glibc_tree, "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    dirs = udocker.container_lib_dirs(glibc_tree, "amd64")
    assert dirs[0] == os.path.join(glibc_tree, "usr/lib/x86_64-linux-gnu")
    assert all(d.startswith(glibc_tree) for d in dirs)


def _age(root, seconds=60):
    """Every directory and file of a tree last changed seconds ago (a record is kept only
    of what did not change in the last 2 s)."""
    when = os.path.getmtime(root) - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            if not os.path.islink(name):
                os.utime(name, (when, when))


def test_library_directories_and_loader_are_remembered_until_root_changes(tmpdir):
    cdir = str(tmpdir.join("c"))
    root = os.path.join(cdir, "ROOT")
    rootfs.make_glibc_rootfs(root)

    def found(cdir=cdir):
        container = udocker.RunContainer(CID, cdir, os.path.join(cdir, "ROOT"),
                                         {"architecture": "amd64"})
        dirs, loader = container.lib_dirs(), container.loader()
        for path, text in container.records:        # as a run's plan writes them
            udocker.makedirs(os.path.dirname(path))
            udocker.write_atomic(path, text)
        return dirs, loader, len(container.records)

    dirs, loader, written = found()
    assert written == 0                     # the tree was made just now: not remembered
    assert found() == (dirs, loader, 0)
    _age(root)
    assert found() == (dirs, loader, 2)     # library directories, loader
    assert found() == (dirs, loader, 0)     # read from the records
    copy = str(tmpdir.join("copy"))         # a copy's records name the original's ROOT
    shutil.copytree(cdir, copy, symlinks=True)
    assert found(copy)[:2] == ([d.replace(cdir, copy) for d in dirs],
                               (loader[0], loader[1].replace(cdir, copy)))
    os.makedirs(os.path.join(root, "opt", "lib"))
    with open(os.path.join(root, "etc", "ld.so.conf"), "w") as handle:
        handle.write("/opt/lib\n")
    assert found()[0] == [os.path.join(root, "opt/lib")] + dirs
    _age(root)
    found()
    os.makedirs(os.path.join(root, "usr", "lib64"))      # one of the usual, made later
    assert os.path.join(root, "usr/lib64") in found()[0]
    _age(root)
    found()
    os.remove(os.path.join(root, "usr", "lib", "x86_64-linux-gnu", "ld-linux-x86-64.so.2"))
    with pytest.raises(udocker.EngineError):             # no loader left: not remembered
        found()


def test_convert_symlinks_round_trip(tmpdir):
    root = tmpdir.join("R").ensure(dir=True)
    os.symlink("/usr/bin/dash", str(root.join("abs")))
    os.symlink("relative", str(root.join("rel")))
    r = str(root)
    assert udocker.convert_symlinks(r, r, True) == 1
    assert root.join("abs").readlink() == r + "/usr/bin/dash"
    assert root.join("rel").readlink() == "relative"
    assert udocker.convert_symlinks(r, r, True) == 0                    # idempotent
    assert udocker.convert_symlinks(r, r, False) == 1
    assert root.join("abs").readlink() == "/usr/bin/dash"


# -- what a run is made of

def test_volume_specs():
    vol = udocker.Volume.parse("/tmp:/data:ro")
    assert (vol.host, vol.cont, vol.readonly) == ("/tmp", "/data", True)
    assert udocker.Volume.parse("/tmp").cont == "/tmp"
    assert udocker.Volume.parse("/tmp:/a:/b:c").cont == "/a:/b:c"    # CONT may hold ':'
    for bad in ("tmp:/x", "/tmp:x", "/tmp:/", "/nonexistent-dir:/x"):
        with pytest.raises(udocker.UsageError):
            udocker.Volume.parse(bad)


def test_volume_with_colons_takes_the_split_whose_host_exists(tmpdir):
    host = tmpdir.join("A:Gln2Cys").ensure(dir=True)
    vol = udocker.Volume.parse("%s:/var/lib/cwl/stg/A:Gln2Cys" % host)
    assert (vol.host, vol.cont, vol.readonly) == (str(host), "/var/lib/cwl/stg/A:Gln2Cys", False)
    vol = udocker.Volume.parse("%s:/x:y:ro" % host)
    assert (vol.host, vol.cont, vol.readonly) == (str(host), "/x:y", True)
    assert udocker.Volume.parse(str(host)).cont == str(host)
    tmpdir.join("amb").ensure(dir=True)
    tmpdir.join("amb:", "c").ensure(dir=True)           # amb -> /c:/d or amb:/c -> /d
    with pytest.raises(udocker.UsageError) as info:
        udocker.Volume.parse("%s/amb:/c:/d" % tmpdir)
    assert "ambiguous volume" in str(info.value) and "--mount" in str(info.value)
    with pytest.raises(udocker.UsageError) as info:
        udocker.Volume.parse("%s/nothing:here:/x" % tmpdir)
    assert "host path does not exist" in str(info.value)


@pytest.mark.parametrize("spec,blamed", [("/tmp:relative", "relative"), ("/tmp:x:ro", "x"),
                                         ("/tmp:", "''")])
def test_volume_with_a_relative_container_path_says_so(spec, blamed):
    """The host path exists: the message names the container path, not the host's."""
    with pytest.raises(udocker.UsageError) as info:
        udocker.Volume.parse(spec)
    assert str(info.value) == "invalid volume: %s (container path %s is not absolute)" \
        % (spec, blamed)


def test_mount_specs(tmpdir):
    host = tmpdir.join("a,b:c").ensure(dir=True)
    vol = udocker.Volume.parse_mount('type=bind,"source=%s",target=/in:x,readonly' % host)
    assert (vol.host, vol.cont, vol.readonly) == (str(host), "/in:x", True)
    vol = udocker.Volume.parse_mount("type=bind,src=/tmp,dst=/t,readonly=false")
    assert (vol.host, vol.cont, vol.readonly) == ("/tmp", "/t", False)
    for bad, why in (("type=volume,src=/tmp,dst=/t", "only type=bind"),
                     ("type=bind,src=/tmp", "source and target"),
                     ("type=bind,src=/nonexistent-dir,dst=/t", "source does not exist"),
                     ("type=bind,src=/tmp,dst=/t,size=1", "unknown field size"),
                     ("type=bind,src=/tmp,dst=/", "cannot bind over /")):
        with pytest.raises(udocker.UsageError) as info:
            udocker.Volume.parse_mount(bad)
        assert why in str(info.value), bad


def test_gpus_and_size_specs():
    for spec in ("all", "1", "2", "device=0", '"device=0,1"', "all,capabilities=utility",
                 "count=2,driver=nvidia"):
        assert udocker.parse_gpus(spec) is True, spec
    assert udocker.parse_gpus("0") is False
    for bad in ("", "some", "device=", "-1", "all,foo=1"):
        with pytest.raises(udocker.UsageError):
            udocker.parse_gpus(bad)
    assert udocker.parse_size("64m", "--shm-size") == 64 * 1024 ** 2
    assert udocker.parse_size("1G", "--shm-size") == 1024 ** 3
    assert udocker.parse_size("4096", "--shm-size") == 4096
    for bad in ("0", "1t", "m", "-5m"):
        with pytest.raises(udocker.UsageError):
            udocker.parse_size(bad, "--shm-size")


def test_fakechroot_volume_map_names_real_host_paths(tmpdir):
    real = tmpdir.join("real").ensure(dir=True)
    os.symlink(str(real), str(tmpdir.join("via")))
    r, via = str(real), str(tmpdir.join("via"))
    Volume = udocker.Volume
    assert udocker.fakechroot_volume_map([
        Volume(r, "/data"),                          # elsewhere: mapped
        Volume(via, "/v"),                           # through a symlink: the real path
        Volume(r, r),                                # own path: excluded, not mapped
        Volume(via, via),                            # own path through a symlink: mapped
        Volume("/dev/null", "/dev/null2", device=True)]) == \
        "/data=%s:/v=%s:%s=%s" % (r, r, via, r)
    assert udocker.fakechroot_volume_map([Volume(r, r)]) == ""
    # a container path with '=' or ':' cannot be named (its symlink in ROOT serves); a host
    # path with ':' is given as the caller's colon-free alias
    assert udocker.fakechroot_volume_map([Volume(r, "/a=b"), Volume(r, "/c:d")]) == ""
    colon = tmpdir.join("x:y").ensure(dir=True)
    assert udocker.fakechroot_volume_map([Volume(str(colon), "/in")],
                                         lambda host: host.replace(":", "_")) == \
        "/in=%s" % str(colon).replace(":", "_")


def test_command_from_entrypoint_and_cmd(tmpdir, glibc_tree):
    """The container's command in the plan (what would run) from the image's Entrypoint
    and Cmd, the run's arguments and --entrypoint."""
    meta = {"Entrypoint": ["/bin/echo", "E"], "Cmd": ["c1", "c2"]}

    def command(config, **kwargs):
        return plan_for(tmpdir, glibc_tree, config=config, **kwargs)[1].command
    assert command(meta) == ["/bin/echo", "E", "c1", "c2"]
    assert command(meta, args=["x"]) == ["/bin/echo", "E", "x"]
    assert command(meta, opts={"entrypoint": ""}, args=["ls"]) == ["ls"]
    assert command(meta, opts={"entrypoint": "/bin/true"}) == ["/bin/true"]   # Cmd dropped
    assert command({"Cmd": "echo hi"}) == ["/bin/sh", "-c", "echo hi"]
    assert command({}) == ["bash", "-i"]


def test_environment_precedence(tmpdir, glibc_tree, monkeypatch):
    monkeypatch.setenv("FROM_HOST", "host-value")
    monkeypatch.setenv("TERM", "xterm-test")
    envfile = tmpdir.join("env.list")
    envfile.write("# comment\nA=file\nB=file\nC=file\n\nFROM_HOST\n")
    env = plan_for(tmpdir, glibc_tree, config={"Env": ["A=image", "B=image"]},
                   opts={"env": ["A=cli", "FROM_HOST", "MISSING_VAR"],
                         "env_file": [str(envfile)]})[1].env
    assert env["A"] == "cli" and env["B"] == "image" and env["C"] == "file"
    assert env["FROM_HOST"] == "host-value" and "MISSING_VAR" not in env
    assert env["TERM"] == "xterm-test"
    assert env["PATH"] == "/usr/sbin:/sbin:/usr/bin:/bin"          # root's default
    assert env["HOME"] == "/root" and env["USER"] == "root"
    assert env["container_uuid"] == CID and env["container_names"] == "myname"
    assert env["container_execmode"] == "P1" and env["container_root"] == glibc_tree
    with pytest.raises(udocker.UsageError):
        plan_for(tmpdir, glibc_tree, opts={"env": ["=bad"]})


def test_hostenv_and_nometa(tmpdir, glibc_tree, monkeypatch):
    monkeypatch.setenv("SOMETHING_ELSE", "1")
    plan = plan_for(tmpdir, glibc_tree, config={"Env": ["A=image"], "WorkingDir": "/etc"},
                    opts={"hostenv": True, "nometa": True})[1]
    assert plan.env["SOMETHING_ELSE"] == "1" and "A" not in plan.env
    assert plan.workdir == "/"                  # not /etc; the host HOME is not inside
    assert plan.argv[plan.argv.index("-w") + 1] == "/"


def test_users(tmpdir, glibc_tree):
    plan = plan_for(tmpdir, glibc_tree, opts={"user": "user"})[1]
    assert (plan.user.uid, plan.user.gid, plan.user.home) == (1000, 1000, "/home/user")
    assert plan.workdir == "/home/user" and plan.env["PATH"].startswith("/usr/sbin:/sbin:/usr/l")
    assert plan.argv[plan.argv.index("-i") + 1] == "1000:1000"
    assert plan.argv[plan.argv.index("-w") + 1] == "/home/user"        # what would run
    plan = plan_for(tmpdir, glibc_tree, opts={"user": "4321:nogroup"})[1]
    assert (plan.user.name, plan.user.uid, plan.user.gid) == ("udoc4321", 4321, 65534)
    passwd = [v for v in plan.binds if v.cont == "/etc/passwd"]
    assert passwd and not os.path.exists(passwd[0].host)         # planned, not yet written
    text = [c.value for c in plan.changes if c.kind == "file" and c.path == passwd[0].host]
    assert text and "udoc4321:x:4321:65534:*UDOCKER*:/:/bin/sh" in text[0]
    assert text[0].startswith("root:x:0:0:")                            # a copy, extended
    plan = plan_for(tmpdir, glibc_tree, config={"User": "nobody"})[1]
    assert plan.user.uid == 65534 and not [v for v in plan.binds if v.cont == "/etc/passwd"]
    with pytest.raises(udocker.EngineError):
        plan_for(tmpdir, glibc_tree, opts={"user": "ghost"})


def test_fakechroot_modes_run_as_the_host_user(tmpdir, glibc_tree):
    library = tmpdir.join("libfakechroot.so")
    library.write_binary(b"\x7fELF\0")
    plan = plan_for(tmpdir, glibc_tree, mode="F1", opts={"user": "root"}, args=["true"],
                    UDOCKER_FAKECHROOT_SO=str(library))[1]
    assert plan.user.uid == os.getuid() and plan.user.gid == os.getgid()


def test_f1_gives_argv0_to_the_programs_it_starts_with_our_libfakechroot(tmpdir, glibc_tree):
    """F1 starts the command through ld.so with --argv0 (glibc >= 2.33 here), and the
    programs it starts too (FAKECHROOT_ELFLOADER_OPT_ARGV0) with the tools tarball's
    libfakechroot (FAKECHROOT_VOLUMES in it), not with Debian's or upstream's, whose execve
    drops a #! script's last arguments with it."""
    for n, (marker, expected) in enumerate(((b"FAKECHROOT_VOLUMES\0", "--argv0"),
                                            (b"FAKECHROOT_DIR_MAP\0", None), (b"", None))):
        top = tmpdir.mkdir("lib%d" % n)
        library = top.join("libfakechroot.so")
        library.write_binary(b"\x7fELF\0" + marker)
        plan = plan_for(top, glibc_tree, mode="F1", args=["true"],
                        UDOCKER_FAKECHROOT_SO=str(library))[1]
        assert plan.argv[1:3] == ["--argv0", "true"]
        assert plan.env.get("FAKECHROOT_ELFLOADER_OPT_ARGV0") == expected, marker


def test_upstream_libfakechroot_dir_map_entries_stay_whole_with_colons(tmpdir, glibc_tree):
    """Upstream's libfakechroot fork maps volumes itself (FAKECHROOT_DIR_MAP=HOST!CONT:...)
    and crashes on an entry that a ':' in a path cut in two (cwltool stages inputs at
    paths such as A:Gln2Cys): each entry stays whole, and a volume with ':' is a symlink
    at its mount point to a name the map sends to the host."""
    root = str(tmpdir.join("ROOT"))
    subprocess.check_call(["cp", "-a", glibc_tree, root])
    library = tmpdir.join("libfakechroot-Debian-12-x86_64.so")
    library.write_binary(b"\x7fELF\0FAKECHROOT_DIR_MAP\0")
    plain, colon = tmpdir.join("plain").ensure(dir=True), tmpdir.join("A:Gln2Cys")
    colon.join("in.txt").write("staged\n", ensure=True)
    volumes = {"/spool": str(plain), "/stg/A:Gln2Cys": str(colon), "/m:x": str(plain),
               "/f.txt": str(colon.join("in.txt"))}
    engine = engine_for(tmpdir, root, mode="F1", args=["true"],
                        opts={"volume": ["%s:%s" % (h, c) for c, h in volumes.items()]},
                        UDOCKER_FAKECHROOT_SO=str(library))
    engine.tools = udocker.Tools(engine.cfg, engine.session.repo, engine.environ)
    plan = engine.plan()
    engine.apply(plan)                  # the symlinks in ROOT
    entries = plan.env["FAKECHROOT_DIR_MAP"].split(":")
    assert all(e.count("!") == 1 and e.startswith("/") and "!/" in e for e in entries), entries
    mapped = dict(reversed(e.split("!")) for e in entries)
    for cont, host in volumes.items():
        if cont not in mapped:          # the symlink in ROOT, to a name in the map
            cont = os.readlink(udocker.resolve_in_root(root, cont, follow_last=False))
        assert os.path.realpath(mapped[cont]) == os.path.realpath(host), cont
    assert mapped["/spool"] == str(plain)


def fakechroot_plan(tmpdir, root, mode, upstream):
    """F2 or F4's plan of `run /bin/true` with upstream's tools 1.2.11 (test_tools'
    stand-ins: a libfakechroot-DISTRO-VERSION-ARCH.so that has FAKECHROOT_DIR_MAP, a
    patchelf 0.9 with --set-root-prefix), or with our library (UDOCKER_FAKECHROOT_SO)."""
    from test_tools import upstream_tree
    upstream_tree(tmpdir)
    env = {}
    if not upstream:
        library = tmpdir.join("libfakechroot-glibc2.17-x86_64.so")
        library.write_binary(b"\x7fELF\0FAKECHROOT_VOLUMES\0")
        env["UDOCKER_FAKECHROOT_SO"] = str(library)
    engine = engine_for(tmpdir, root, mode=mode, args=["/bin/true"], **env)
    engine.tools = udocker.Tools(engine.cfg, engine.session.repo, engine.environ)
    if mode == "F4":                            # as setup left it
        engine.container.set_state(udocker.ContainerDir.PATCH_PATH, root)
        engine.container.files.write(udocker.ContainerDir.PATCH_RECORD, "{}")
    return engine.plan()


def test_plan_takes_the_volumes_run_parsed(tmpdir, glibc_tree):
    """cmd_run parses -v and --mount before any pull (Volume.from_options); the plan takes
    those Volumes (given_volumes) instead of parsing the options again."""
    data = tmpdir.join("data").ensure(dir=True)
    engine, plan = plan_for(tmpdir, glibc_tree, opts={"volume": ["%s:/data" % data]})
    assert [v.host for v in plan.binds if v.cont == "/data"] == [str(data)]
    assert [(v.host, v.cont) for v in udocker.Volume.from_options(engine.opts)] == \
        [(str(data), "/data")]
    engine.given_volumes = [udocker.Volume(str(data), "/given")]
    binds = [v.cont for v in engine.plan().binds]
    assert "/given" in binds and "/data" not in binds


def test_container_state_is_read_once_and_again_under_the_lock(tmpdir, glibc_tree):
    """A run asks for execmode 4 times: the file is read once; set_state and the changes
    made under the container's lock (set_execmode) see what another command wrote since."""
    engine = engine_for(tmpdir, glibc_tree)
    container = engine.container
    other = udocker.ContainerDir(container.dir, container.cid)        # another command
    mode = udocker.ContainerDir.EXECMODE
    assert container.state(mode) == "" and container.execmode(engine.cfg) == "P1"
    other.write(mode, "P2")
    assert container.state(mode) == "" and container.execmode(engine.cfg) == "P1"
    container.reread()
    assert container.state(mode) == "P2" and container.execmode(engine.cfg) == "P2"
    container.set_state(mode, "P1")
    assert container.state(mode) == "P1"
    other.write(mode, "P2")
    # under its lock set_execmode finds P2 already set: nothing to do (it read P1 before)
    assert udocker.set_execmode(engine.session, container, "P2", None) is False
    assert container.execmode(engine.cfg) == "P2"


@pytest.mark.skipif(udocker.Platform.host().arch != "amd64", reason="names of x86_64 tools")
def test_f2_remembers_its_ld_so_copy_while_ld_so_is_the_same(tmpdir):
    """F2's copy of ld.so is named by ld.so's checksums; the name is remembered with ld.so's
    path, inode, mtime and size, so the next run reads neither; another ld.so (a libc
    upgrade) is read again and gets a copy of its own."""
    root = str(tmpdir.join("ROOT"))
    rootfs.make_glibc_rootfs(root)
    first = fakechroot_plan(tmpdir, root, "F2", False)

    def plan():                                    # as fakechroot_plan, its tools in place
        engine = engine_for(tmpdir, root, mode="F2", args=["/bin/true"],
                            UDOCKER_FAKECHROOT_SO=first.env["LD_PRELOAD"])
        engine.tools = udocker.Tools(engine.cfg, engine.session.repo, engine.environ)
        return engine.plan()
    (copy,) = [c for c in first.changes if c.kind == "binary"]
    (name,) = [c for c in first.changes if c.path.endswith("/" + udocker.F2_NAME_RECORD)]
    assert name.kind == "record" and os.path.basename(copy.path) in name.value
    engine_for(tmpdir, root, mode="F2").apply(first)
    again = plan()
    assert again.argv[0] == copy.path
    assert not [c for c in again.changes if c.kind == "binary" or c.path == name.path]
    ld_so = udocker.container_loader(root, "amd64")[1]
    with open(ld_so, "rb") as handle:
        data = handle.read()
    with open(ld_so + ".new", "wb") as handle:          # a new file: the tree's own copy
        handle.write(data + b"\0")
    os.rename(ld_so + ".new", ld_so)
    upgraded = plan()
    (other,) = [c for c in upgraded.changes if c.kind == "binary"]
    assert other.path != copy.path and upgraded.argv[0] == other.path
    assert [c for c in upgraded.changes if c.path == name.path]


@pytest.mark.skipif(udocker.Platform.host().arch != "amd64", reason="names of x86_64 tools")
@pytest.mark.parametrize("upstream", [True, False])
def test_f2_drives_upstreams_libfakechroot_as_udocker_1_3_17(tmpdir, glibc_tree, upstream):
    """Upstream's libfakechroot starts FAKECHROOT_ELFLOADER with no --library-path and
    gives a #! script's interpreter a garbled argv with FAKECHROOT_ELFLOADER_OPT_ARGV0: F2
    starts its ld.so copy without them, the copy reading LD_LIBRARY_REAL (udocker 1.3.17's
    name) where ld.so reads LD_LIBRARY_PATH. Ours gets --library-path (and --argv0)."""
    plan = fakechroot_plan(tmpdir, glibc_tree, "F2", upstream)
    (copy,) = [c for c in plan.changes if c.kind == "binary"]
    libpath = plan.env["LD_LIBRARY_PATH"]
    assert plan.env["LD_LIBRARY_REAL"] == plan.env["FAKECHROOT_LIBRARY_ORIG"] == libpath
    assert plan.argv[0] == plan.env["FAKECHROOT_ELFLOADER"] == copy.path
    assert ("libfakechroot-glibc" not in plan.env["LD_PRELOAD"]) == upstream
    assert (b"\0LD_LIBRARY_REAL\0" in copy.value) == upstream
    assert (b"\0LD_LIBRARY_PATH\0" in copy.value) != upstream
    assert copy.path.endswith("-real.so") == upstream
    if upstream:
        assert "--library-path" not in plan.argv and \
            "FAKECHROOT_ELFLOADER_OPT_ARGV0" not in plan.env
    else:
        assert plan.argv[1:3] == ["--library-path", libpath]
    assert plan.argv[-1] == "/bin/true" or plan.argv[-1].endswith("/bin/true")


@pytest.mark.skipif(udocker.Platform.host().arch != "amd64", reason="names of x86_64 tools")
@pytest.mark.parametrize("upstream", [True, False])
def test_f4_tells_upstreams_libfakechroot_when_setup_patched(tmpdir, glibc_tree, upstream):
    """Upstream's libfakechroot runs `patchelf --set-root-prefix ROOT` on each program it
    starts that is not older than FAKECHROOT_PATCH_LAST_TIME (udocker 1.3.17's
    patch.time): F4 gives the end of setup's patching (patch.json's time)."""
    root = str(tmpdir.join("ROOT"))
    subprocess.check_call(["cp", "-a", glibc_tree, root])
    plan = fakechroot_plan(tmpdir, root, "F4", upstream)
    assert os.path.basename(plan.env["FAKECHROOT_PATCH_PATCHELF"]) == "patchelf-x86_64"
    record = os.path.join(str(tmpdir.join("cdir")), udocker.ContainerDir.PATCH_RECORD)
    if upstream:
        assert plan.env["FAKECHROOT_PATCH_LAST_TIME"] == str(int(os.stat(record).st_mtime))
        assert plan.env["LD_LIBRARY_REAL"] == plan.env["LD_LIBRARY_PATH"]
    else:
        assert "FAKECHROOT_PATCH_LAST_TIME" not in plan.env


@pytest.mark.parametrize("modern", [True, False])
def test_r2_hides_statx_from_a_proot_that_does_not_translate_it(tmpdir, glibc_tree, modern):
    """A 5.1-era proot (upstream's, Debian's) lets a relative statx or faccessat2 resolve
    against its real working directory (`cd /; ls -d usr` fails): in R2/R3 the runtime's
    seccomp filter makes them fail with ENOSYS, with x32's syscall numbers allowed (else libseccomp
    kills proot's cancelled syscalls, -1). A proot that translates statx gets no filter."""
    from test_tools import fake_proot
    proot = fake_proot(tmpdir.join("p"), "5.4.0" if modern else "5.1.0", modern=modern)
    plan = plan_for(tmpdir, glibc_tree, mode="R2", args=["/bin/true"],
                    UDOCKER_USE_PROOT_EXECUTABLE=proot)[1]
    seccomp = bundle_spec(plan)["linux"].get("seccomp")
    if modern:
        assert seccomp is None
        return
    assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"
    assert seccomp["syscalls"] == [{"names": ["statx", "faccessat2"],
                                    "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    if udocker.Platform.host().arch == "amd64":
        assert "SCMP_ARCH_X32" in seccomp["architectures"]


REAPED_SCRIPT = """
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import udocker
print(udocker.has_reaped(os.getpid()))
child = subprocess.Popen(["sleep", "30"])
print(any(udocker.process_argv(child.pid) == ["sleep", "30"] or time.sleep(0.01)
          for _ in range(1000)))                       # once it has run exec
child.kill()
while open("/proc/%d/stat" % child.pid).read().rpartition(")")[2].split()[0] != "Z":
    time.sleep(0.01)
print(udocker.process_argv(child.pid))                 # a zombie
child.wait()
print(udocker.has_reaped(os.getpid()))
"""


def test_has_reaped_and_process_argv_read_a_process_from_proc(tmpdir):
    """What R2/R3 tell a command that has exited from what it left by: whether proot has
    reaped a child (its children's faults added to its own) and a child's argv (None for
    a zombie). A fresh Python process has reaped nothing until it waits for a child."""
    import sys
    script = tmpdir.join("reaped.py")
    script.write(REAPED_SCRIPT)
    out = subprocess.check_output([sys.executable, "-S", str(script),
                                   os.path.dirname(SCRIPT)]).decode()
    assert out.split() == ["False", "True", "None", "True"]
    assert udocker.has_reaped(2 ** 22 + 1) is False and udocker.process_argv(2 ** 22 + 1) is None


needs_posix_spawn = pytest.mark.skipif(not hasattr(os, "posix_spawn"),
                                       reason="os.posix_spawn: Python 3.8+")


@needs_posix_spawn
def test_spawn_at_once_runs_in_cwd_and_leaves_ours_alone(tmpdir):
    """posix_spawn has no working directory of its own: udocker.py's is the engine's for the
    moment of the call, and is back afterwards; SIGPIPE is the default again."""
    here = os.getcwd()
    out = tmpdir.join("out")
    pid = udocker._spawn_at_once(
        ["/bin/sh", "-c", "pwd > %s; grep '^SigIgn' /proc/self/status >> %s" % (out, out)],
        {"PATH": "/usr/bin:/bin"}, str(tmpdir), None)
    assert os.waitpid(pid, 0)[1] == 0 and os.getcwd() == here
    where, ignored = out.read().splitlines()
    assert where == str(tmpdir)
    assert not int(ignored.split()[1], 16) & (1 << (13 - 1))           # SIGPIPE


@needs_posix_spawn
def test_spawn_at_once_fills_the_holes_below_passed_fds(tmpdir):
    """runc --preserve-fds N needs fds 3..N open: an inherited fd stays itself, a hole and
    our own close-on-exec fd are /dev/null in the engine, and ours are left as they were."""
    out = tmpdir.join("fds")
    read_end, write_end = os.pipe()
    fixed = [40, 41, 42]
    os.dup2(read_end, 42)                                  # inherited, like a PMI_FD
    ours = os.open(str(tmpdir), os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(ours, 41)
    os.set_inheritable(41, False)                          # ours, close-on-exec
    os.close(ours)
    try:
        pid = udocker._spawn_at_once(
            ["/bin/sh", "-c", "for fd in 40 41 42; do readlink /proc/self/fd/$fd; done > %s"
             % out], {"PATH": "/usr/bin:/bin"}, None, None, passed_fds=42)
        assert os.waitpid(pid, 0)[1] == 0
        assert out.read().splitlines()[:2] == ["/dev/null", "/dev/null"]
        assert out.read().splitlines()[2].startswith("pipe:")
        assert os.readlink("/proc/self/fd/41") == str(tmpdir)
        assert not os.path.exists("/proc/self/fd/40")
    finally:
        for fd in fixed[1:] + [read_end, write_end]:
            os.close(fd)


def test_fd_holes_are_the_fds_a_program_would_not_get(tmpdir):
    """fd_holes lists the open fds first; what it finds is what asking each fd finds:
    closed ones and close-on-exec ones, up to a high inherited fd."""
    high = 300
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.dup2(inherited, high)                               # inheritable: a PMI_FD
    ours = os.open(str(tmpdir), os.O_RDONLY)
    if hasattr(os, "set_inheritable"):
        os.set_inheritable(ours, False)
    else:                                                  # Python 2: fcntl
        import fcntl
        fcntl.fcntl(ours, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    try:
        holes = udocker.fd_holes(high)
        assert holes == [fd for fd in range(3, high + 1) if not udocker.inheritable_fd(fd)]
        assert ours in holes and high not in holes and high - 1 in holes
        assert udocker.fd_holes(2) == []
    finally:
        for fd in (inherited, high, ours):
            os.close(fd)


def test_the_fork_path_fills_every_hole_below_passed_fds(tmpdir):
    """Before 3.8 (and for a child hook) the engine's child fills the holes itself: the
    /dev/null it opens takes the lowest free fd, itself a hole, and must stay open at exec
    (Python 3 opens it close-on-exec)."""
    out = tmpdir.join("fds")
    read_end, write_end = os.pipe()
    os.dup2(read_end, 92)                                  # inherited, like a PMI_FD
    lowest = os.open(os.devnull, os.O_RDONLY)              # the first hole the child has
    os.close(lowest)
    try:
        pid = os.fork()
        if pid == 0:                                       # pragma: no cover (child)
            try:
                udocker._engine_child_setup(lambda option, value: True, "SIGKILL", 92)
                os.execv("/bin/sh", ["sh", "-c", "for fd in %d 91 92; do readlink "
                                     "/proc/self/fd/$fd; done > %s" % (lowest, out)])
            finally:
                os._exit(127)
        assert os.waitpid(pid, 0)[1] == 0
        lines = out.read().splitlines()
        assert lines[:2] == ["/dev/null", "/dev/null"] and lines[2].startswith("pipe:"), lines
    finally:
        for fd in (92, read_end, write_end):
            os.close(fd)


@needs_posix_spawn
@pytest.mark.parametrize("program,cwd", [("/nonexistent/engine", None),
                                         ("/bin/true", "/nonexistent/dir")])
def test_spawn_at_once_failures_are_engine_errors(program, cwd):
    here = os.getcwd()
    with pytest.raises(udocker.EngineError) as info:
        udocker._spawn_at_once([program], {}, cwd, None)
    assert str(info.value) == "cannot execute %s: No such file or directory" % program
    assert os.getcwd() == here


def _sleeper(env=None):
    """sleep 60, with the default action of every signal: the test runner may have been
    started with some ignored (a background job of a script ignores SIGINT and SIGQUIT),
    which a child inherits."""
    def default_signals():
        for name in ("SIGINT", "SIGQUIT", "SIGTERM", "SIGHUP"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    return subprocess.Popen(["sleep", "60"], env=env, preexec_fn=default_signals)


def _forked_watchdog():
    """A Watchdog whose start() forks, as on Pythons without os.posix_spawn."""
    watchdog = udocker.Watchdog()
    watchdog._start_shell = lambda read_fd: False
    return watchdog


def test_a_forked_watchdog_does_every_duty_when_we_die(tmpdir):
    """Its duties are done only on EOF of its pipe (udocker.py died: here its end is
    closed): the kills first, then the commands, then the marked processes; a failing one
    stops none."""
    out = tmpdir.join("out")
    engine, marked = _sleeper(), MarkedSleeper()
    watchdog = _forked_watchdog()
    watchdog.kill_first(2 ** 22 + 1, "SIGTERM")                        # no such process
    watchdog.kill_first(engine.pid, "SIGTERM")
    watchdog.run_command(["/bin/sh", "-c", 'echo done > "$1"', "sh", str(out)])
    watchdog.kill_marked(marked.marker)
    watchdog.start()
    assert udocker.process_argv(watchdog.pid) == udocker.process_argv(os.getpid())
    os.close(watchdog.write_fd)
    assert os.waitpid(watchdog.pid, 0)[1] >> 8 == 1                    # one duty failed
    assert engine.wait() == -15 and out.read() == "done\n" and marked.wait() == -9
    released = _forked_watchdog()
    released.run_command(["/bin/sh", "-c", 'echo never > "$1"', "sh", str(out)])
    released.start().release()
    os.waitpid(released.pid, 0)
    assert out.read() == "done\n"


class MarkedSleeper(object):
    """A process with a marker in its environment, as a fakechroot container's have."""

    def __init__(self):
        self.marker = "container_run=test-%d" % random.randint(0, 10 ** 9)
        name, value = self.marker.split("=")
        self.proc = _sleeper(dict(os.environ, **{name: value}))

    def wait(self):
        return self.proc.wait()

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@needs_posix_spawn
@pytest.mark.parametrize("dies", [True, False])
def test_a_shell_watchdog_does_every_duty_when_we_die(tmpdir, dies):
    """The shell form (3.8+; the fork form: test_a_forked_watchdog_does_every_duty...):
    kills, then commands, as words of their own whatever they hold (a newline, quotes, $,
    ;, %, \\, non-ASCII bytes), then processes found by their marker (fakechroot's
    orphans); nothing once released."""
    odd = tmpdir.join("a\nb %s \\n 'c' $dir; rm -rf x \xc3\xa9").ensure(dir=True)
    out = tmpdir.join("out")
    engine, marked = _sleeper(), MarkedSleeper()
    watchdog = udocker.Watchdog()
    try:
        watchdog.kill_first(engine.pid, "SIGQUIT")
        watchdog.run_command(["/bin/sh", "-c", 'printf "%s|" "$@" > "$0"', str(out), "100%",
                              "two\nlines", "\\t"])
        watchdog.run_command(["/bin/rm", "-rf", str(odd)])
        watchdog.kill_marked(marked.marker)
        watchdog.start()
        wait_for(lambda: udocker.process_argv(watchdog.pid), "the watchdog's exec")
        assert udocker.process_argv(watchdog.pid)[:2] == ["/bin/sh", "-c"]
        assert odd.check(dir=True)
        if dies:
            os.close(watchdog.write_fd)
        else:
            watchdog.release()
        os.waitpid(watchdog.pid, 0)
        if dies:
            assert engine.wait() == -3 and marked.wait() == -9
            assert out.read() == "100%|two\nlines|\\t|" and not odd.check()
        else:
            assert engine.poll() is None and marked.proc.poll() is None
            assert not out.check() and odd.check(dir=True)
    finally:
        engine.kill()
        engine.wait()
        marked.kill()


@pytest.mark.parametrize("shell", [True, False])
def test_a_watchdog_command_that_hangs_is_killed(tmpdir, shell):
    """A runtime's kill or delete that hangs does not keep the others from running: each
    command has COMMAND_SECONDS (timeout(1) in the shell form, where it is found)."""
    if shell and not (hasattr(os, "posix_spawn") and
                      subprocess.call(["sh", "-c", "timeout 1 true"]) == 0):
        pytest.skip("no os.posix_spawn (Python 3.8+) or no timeout(1)")
    out = tmpdir.join("out")
    watchdog = udocker.Watchdog() if shell else _forked_watchdog()
    watchdog.COMMAND_SECONDS = 1
    watchdog.run_command(["/bin/sleep", "60"])
    watchdog.run_command(["/bin/sh", "-c", 'echo after > "$1"', "sh", str(out)])
    watchdog.start()
    started = time.time()
    os.close(watchdog.write_fd)
    wait_for(lambda: out.check(), "the second command", 30)
    assert os.waitpid(watchdog.pid, 0)[1] >> 8 in (0, 1)
    assert time.time() - started < 30 and out.read() == "after\n"


def test_read_json_twin_keeps_what_it_parsed_while_the_file_is_the_same(tmpdir):
    """Python 3 keeps a parsed JSON file in a marshal copy with the file's stamp: used
    while the stamp is the same, made again when it changes, not made while the file is
    new (changed again within its mtime's tick it could keep its stamp)."""
    doc, twin = tmpdir.join("container.json"), str(tmpdir.join("twin"))
    old = time.time() - 10

    def write(text, mtime=old):
        doc.write(text)
        os.utime(str(doc), (mtime, mtime))
    write('{"config": {"Env": ["A=1"]}, "n": [1, 2.5, true, null]}')
    value, kept = udocker.read_json_twin(str(doc), twin)
    assert value == {"config": {"Env": ["A=1"]}, "n": [1, 2.5, True, None]}
    if not udocker.PY3:
        assert kept is None
        return
    with open(twin, "wb") as handle:
        handle.write(kept)
    write('{"config": {"Env": ["B=2"]}, "n": [1, 2.5, true, null]}')     # same size
    os.utime(str(doc), (old, old))
    assert udocker.read_json_twin(str(doc), twin) == (value, None)    # the copy, not read
    write('{"config": {}}')
    value, kept = udocker.read_json_twin(str(doc), twin)
    assert value == {"config": {}} and kept is not None
    write('{"config": {"new": 1}}', time.time())
    assert udocker.read_json_twin(str(doc), twin) == ({"config": {"new": 1}}, None)
    with open(twin, "wb") as handle:
        handle.write(b"\xffdamaged")
    write('{"config": {}}')
    assert udocker.read_json_twin(str(doc), twin)[0] == {"config": {}}
    doc.remove()
    assert udocker.read_json_twin(str(doc), twin) == (None, None)


def test_only_pids_since_sees_any_process_made_after_the_engine():
    """F modes become the subreaper after the engine's start, and look for strays at the
    end unless the kernel gave out no pid since the engine's but the watchdog's."""
    engine = _sleeper()
    other = _sleeper()
    try:
        assert not udocker.only_pids_since(engine.pid, engine.pid)   # other came after
        assert not udocker.only_pids_since(engine.pid, other.pid + 5)
        assert not udocker.only_pids_since(other.pid, other.pid - 1)
        last = lambda: int(open("/proc/loadavg").read().split()[4])
        # and yes when none was made since (retried: other work may make processes)
        assert any(udocker.only_pids_since(last(), last()) for _ in range(50))
    finally:
        for proc in (engine, other):
            proc.kill()
            proc.wait()


def test_volumes_sysdirs_novol_and_workdir(tmpdir, glibc_tree):
    data = tmpdir.join("data").ensure(dir=True)
    engine, plan = plan_for(tmpdir, glibc_tree, opts={
        "volume": ["%s:/data" % data], "novol": ["/sys"], "workdir": "/data"})
    conts = [v.cont for v in plan.binds]
    assert "/proc" in conts and "/sys" not in conts and "/data" in conts
    assert "%s:/data" % data in plan.argv and "/proc" in plan.argv and "/sys" not in plan.argv
    assert plan.workdir == "/data" and engine.cont2host("/data/x") == str(data.join("x"))
    plan = plan_for(tmpdir, glibc_tree, opts={"nosysdirs": True})[1]
    assert plan.binds == [] and "-b" not in plan.argv
    with pytest.raises(udocker.EngineError) as info:
        plan_for(tmpdir, glibc_tree, opts={"workdir": "/nonexistent"})
    assert "invalid working directory" in str(info.value)
    with pytest.raises(udocker.EngineError) as info:
        plan_for(tmpdir, glibc_tree, args=["no-such-program"])
    assert "command not found" in str(info.value)


def test_runc_spec(tmpdir, glibc_tree):
    data = tmpdir.join("data").ensure(dir=True)
    spec = bundle_spec(plan_for(tmpdir, glibc_tree, mode="R1", args=["ls", "-l"], opts={
        "volume": ["%s:/data:ro" % data], "hostname": "box.example"})[1])
    assert spec["root"] == {"path": glibc_tree, "readonly": False}
    assert spec["process"]["args"] == ["ls", "-l"] and spec["process"]["cwd"] == "/root"
    assert "PATH=/usr/sbin:/sbin:/usr/bin:/bin" in spec["process"]["env"]
    assert spec["hostname"] == "box.example"
    assert "network" not in [n["type"] for n in spec["linux"]["namespaces"]]
    assert spec["linux"]["uidMappings"][0] == {"containerID": 0, "hostID": os.getuid(),
                                               "size": 1}
    mounts = dict((m["destination"], m) for m in spec["mounts"])
    assert mounts["/data"]["source"] == str(data) and "ro" in mounts["/data"]["options"]
    assert "/proc" in mounts and mounts["/proc"]["type"] == "proc"
    assert "/dev/" not in [m["destination"] for m in spec["mounts"] if m["type"] == "none"]
    with pytest.raises(udocker.UsageError):
        plan_for(tmpdir, glibc_tree, mode="R1", opts={"volume": ["/proc"]})


def test_an_r_mode_spec_is_encoded_once_for_runs_that_differ_in_argv_and_environment(
        tmpdir, glibc_tree, monkeypatch):
    """Python 3 keeps the text of the last run's OCI spec less its process's argv and
    environment (.run/spec, a record the plan writes): a run whose spec differs only in
    these (its marker container_run, a job array task's arguments and variables) fills
    them in and encodes nothing with json_text; another spec is encoded again. Either way
    the bundle is json_text's."""
    encode = udocker.json_text

    def bundle_and_records(engine, plan):
        (bundle,) = [c.value for c in plan.changes if c.kind == "bundle"]
        assert bundle == encode(engine.spec())
        return [c for c in plan.changes if c.kind == "record" and c.path.endswith("/spec")]
    first = plan_for(tmpdir, glibc_tree, mode="R1", args=["/bin/sh", "-c", "echo 1"])
    records = bundle_and_records(*first)
    if not udocker.PY3:
        assert not records
        return
    tmpdir.join("cdir", ".run").ensure(dir=True)
    with open(records[0].path, "wb") as handle:
        handle.write(records[0].value)

    def no_encoding(value):
        raise AssertionError("encoded again")
    monkeypatch.setattr(udocker, "json_text", no_encoding)
    task = plan_for(tmpdir, glibc_tree, mode="R1", args=["/bin/sh", "-c", 'echo "2\\\n" \xe9'],
                    opts={"env": ["TASK=2", 'Q="quoted"\ttab']})
    assert not bundle_and_records(*task)
    assert task[0].env["container_run"] != first[0].env["container_run"]
    monkeypatch.setattr(udocker, "json_text", encode)
    other = plan_for(tmpdir, glibc_tree, mode="R1", args=["/bin/sh", "-c", "echo 1"],
                     opts={"hostname": "other"})
    assert len(bundle_and_records(*other)) == 1


def test_runtime_tmpdir_prefers_a_tmpfs_to_the_default_tmpdir(tmpdir):
    """Where R modes make their bundles: the tmpdir asked for (UDOCKER_TMP, udocker.conf,
    TMPDIR), else $XDG_RUNTIME_DIR when it is a directory of ours, else /dev/shm when it is
    sticky and writable, else the default tmpdir."""
    own = str(tmpdir.join("xdg").ensure(dir=True))
    base = {"HOME": str(tmpdir), "UDOCKER_NOSYSCONF": "1"}

    def where(options=None, **env):
        environ = dict(base, **env)
        return udocker.runtime_tmpdir(udocker.Config.load(environ, options or {}), environ)
    shm = "/dev/shm" if udocker._is_shared_safely("/dev/shm") and \
        udocker._has_room("/dev/shm") else "/tmp"
    assert where(XDG_RUNTIME_DIR=own) == own
    assert where() == where(XDG_RUNTIME_DIR="") == shm
    assert where(XDG_RUNTIME_DIR=own + "/gone") == where(XDG_RUNTIME_DIR="xdg") == shm
    assert where(XDG_RUNTIME_DIR=str(tmpdir.join("file").ensure())) == shm
    assert where(XDG_RUNTIME_DIR=own, UDOCKER_TMP="/var/tmp") == "/var/tmp"
    assert where(XDG_RUNTIME_DIR=own, TMPDIR="/var/tmp") == "/var/tmp"
    conf = tmpdir.join("udocker.conf")
    conf.write("[DEFAULT]\ntmpdir = /var/tmp\n")
    assert where({"config": str(conf)}, XDG_RUNTIME_DIR=own) == "/var/tmp"
    assert not udocker._is_shared_safely("/")            # not writable
    assert not udocker._is_shared_safely("/nonexistent")


class _FileSystem(object):
    def __init__(self, free, inodes_free, inodes):
        self.f_bavail, self.f_frsize = free // 4096, 4096
        self.f_favail, self.f_files = inodes_free, inodes


def test_runtime_tmpdir_passes_over_a_full_tmpfs(tmpdir, monkeypatch):
    """A tmpfs without room for a bundle (a full /dev/shm, a small one in a container) is
    passed over for the next place, rather than failing the run: 1 MB free and a free
    inode, or no inode count at all (a tmpfs with nr_inodes=0)."""
    own = str(tmpdir.join("xdg").ensure(dir=True))
    environ = {"HOME": str(tmpdir), "UDOCKER_NOSYSCONF": "1", "XDG_RUNTIME_DIR": own}
    cfg = udocker.Config.load(environ, {})
    sizes = {}
    real = udocker.os.statvfs
    monkeypatch.setattr(udocker.os, "statvfs", lambda path: sizes.get(path) or real(path))
    sizes[own] = _FileSystem(0, 100, 1000)                             # no space
    sizes["/dev/shm"] = _FileSystem(1 << 30, 0, 1000)                  # no inode
    assert udocker.runtime_tmpdir(cfg, environ) == cfg.tmpdir
    sizes["/dev/shm"] = _FileSystem(1 << 30, 0, 0)                     # no inode count
    if udocker._is_shared_safely("/dev/shm"):
        assert udocker.runtime_tmpdir(cfg, environ) == "/dev/shm"
    sizes[own] = _FileSystem(1 << 20, 1, 1000)
    assert udocker.runtime_tmpdir(cfg, environ) == own


def test_path_without(tmpdir):
    """crun's PATH without the id map helpers (RuncEngine.command)."""
    for name, where in (("newuidmap", "a"), ("newgidmap", "b")):
        tmpdir.join(where, name).ensure()
    a, b, c = (str(tmpdir.join(n).ensure(dir=True)) for n in "abc")
    names = ("newuidmap", "newgidmap")
    assert udocker.path_without("%s::%s:%s" % (a, c, b), names) == c
    assert udocker.path_without("%s:%s" % (a, b), names) == "/dev/null"    # finds nothing
    assert udocker.path_without("", names) == "/dev/null"


def test_proot_status_maps_signals():
    assert udocker.proot_status(255, 15) == 143
    assert udocker.proot_status(255, None) == 255
    assert udocker.proot_status(3, 15) == 3


# -- the command line, no engine needed

@pytest.fixture
def bb_container(tmpdir, glibc_tree):
    top = str(tmpdir.join("udocker"))
    os.makedirs(os.path.join(top, "containers"))
    rootfs.write_container(top, CID, glibc_tree, name="named")
    return tmpdir


@pytest.fixture
def bb_run(bb_container):
    """The udocker.py runner on bb_container's repository, with no tools tarball."""
    run = Udocker(bb_container, allow_root=True)
    run.env["UDOCKER_TARBALL"] = ""
    return run


def test_setup_shows_mode_and_refuses_what_cannot_work(bb_container, bb_run):
    rc, out, err = bb_run("setup", "named")
    assert rc == 0 and out == "execmode: P1\nnvidiamode: False\n"
    rc, out, err = bb_run("setup", CID, env={"UDOCKER_DEFAULT_EXECUTION_MODE": "R1"})
    assert out.startswith("execmode: R1\n")
    rc, out, err = bb_run("setup", "--execmode=Z1", "named")
    assert rc == 1 and "invalid execution mode" in err and "Traceback" not in err
    rc, out, err = bb_run("setup", "--execmode=R1", "named")
    assert rc == 0, err
    assert bb_run("setup", "named")[1].startswith("execmode: R1\n")
    bb_container.join("udocker", "containers", CID, "PROTECT").write("")
    rc, out, err = bb_run("setup", "--execmode=P2", "named")
    assert rc == 1 and "protected" in err


def test_ps_setup_and_run_give_one_answer_to_which_mode(bb_container, bb_run):
    """An execmode file in lower case is that mode everywhere; one holding no mode is the
    same message in ps (a warning, ?? in the column), setup and run (the error)."""
    def said(err):
        return [line for line in err.splitlines() if not line.startswith("Info:")]
    execmode = bb_container.join("udocker", "containers", CID, "execmode")
    execmode.write("p2\n")
    rc, out, err = bb_run("ps", "-m")
    assert rc == 0 and " P2 " in out.splitlines()[1] and said(err) == [], (out, err)
    assert bb_run("setup", "named")[1].startswith("execmode: P2\n")
    rc, out, err = bb_run("ps", "-m", env={"UDOCKER_DEFAULT_EXECUTION_MODE": "r1"})
    assert " P2 " in out.splitlines()[1]                     # recorded beats the default
    execmode.remove()
    rc, out, err = bb_run("ps", "-m", env={"UDOCKER_DEFAULT_EXECUTION_MODE": "r1"})
    assert rc == 0 and " R1 " in out.splitlines()[1], (out, err)
    execmode.write("Z9")
    message = "container %s has an unknown execution mode: Z9" % CID
    rc, out, err = bb_run("ps", "-m")
    assert rc == 0 and " ?? " in out.splitlines()[1], (out, err)
    assert len(said(err)) == 1 and said(err)[0].startswith("Warning: " + message), err
    for args in (["setup", "named"], ["run", "named", "true"]):
        rc, out, err = bb_run(*args)
        assert rc == 1 and len(said(err)) == 1, (args, err)
        assert said(err)[0].startswith("Error: " + message), (args, err)
    rc, out, err = bb_run("setup", "--execmode=P1", "named")   # the way out
    assert rc == 0 and execmode.read().strip() == "P1", err


@pytest.mark.parametrize("args,needle", [
    (["run", "--pull=never", "nosuch"], "image not found locally and --pull=never"),
    (["run", "-v", "/nonexistent-path:/x", "named", "true"], "invalid volume"),
    (["run", "-v", "relative:/x", "named", "true"], "invalid volume"),
    (["run", "-w", "/nonexistent", "named", "true"], "invalid working directory"),
    (["run", "named", "no-such-program"], "command not found"),
    (["run", "--user=ghost", "named", "true"], "ghost not found"),
    (["run", "--pull=sometimes", "named", "true"], "invalid --pull"),
    (["run", "--location=/nonexistent", "true"], "invalid --location"),
])
def test_run_errors_are_one_line(bb_container, args, needle, bb_run):
    rc, out, err = bb_run(*args)
    errors = [l for l in err.splitlines() if l.startswith("Error:")]
    assert rc == 1 and len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err


def test_run_without_tools_says_how_to_get_them(bb_container, bb_run):
    no_engines = path_without_engines(str(bb_container.join("path")))   # whatever the host has
    rc, out, err = bb_run("run", "named", "true", env={"PATH": no_engines})
    assert rc == 1 and "UDOCKER_TARBALL" in err and "Traceback" not in err
    rc, out, err = bb_run("run", "named", "true",    # no UDOCKER_TARBALL: the
                           env={"PATH": no_engines, "UDOCKER_TARBALL": None})  # default, refused
    assert rc == 1 and "set UDOCKER_TARBALL" in err
    assert "copy it beside udocker.py" in err and "install --help" in err


def test_name_patterns_cpu_lists_and_port_specs():
    assert udocker.name_matcher(["SLURM_*", "OMPI_*"])("OMPI_COMM_WORLD_RANK")
    assert udocker.name_matcher(["CUDA_VISIBLE_DEVICES"])("CUDA_VISIBLE_DEVICES")
    assert not udocker.name_matcher(["CUDA_VISIBLE_DEVICES"])("CUDA_VISIBLE_DEVICESX")
    assert udocker.name_matcher(["PM?_[FR]*"])("PMI_FD")
    assert not udocker.name_matcher(["OMPI_*"])("XOMPI_X")
    passed = udocker.name_matcher(["SRUN_DEBUG", "I_MPI_*", "*_RANK", "A*B", "[XY]Z"])
    assert [n for n in ("SRUN_DEBUG", "SRUN_DEBUGX", "I_MPI_X", "I_MPI", "LOCAL_RANK", "AxxB",
                        "AB", "ABx", "YZ", "Z", "") if passed(n)] == \
        ["SRUN_DEBUG", "I_MPI_X", "LOCAL_RANK", "AxxB", "AB", "YZ"]
    assert udocker.name_matcher(["*"])("ANY") and not udocker.name_matcher([])("ANY")
    assert udocker.parse_cpu_list("0-2,5") == set([0, 1, 2, 5])
    for bad in ("", "a", "1-", "-1", "1,,2"):
        with pytest.raises(udocker.UsageError):
            udocker.parse_cpu_list(bad)
    assert udocker.parse_publish("8080:80") == ("8080", "80")
    assert udocker.parse_publish("127.0.0.1:8080:80/tcp") == ("8080", "80")
    assert udocker.parse_publish("80") == ("80", "80")
    with pytest.raises(udocker.UsageError):
        udocker.parse_publish("80:80/udp")


def test_launcher_variables_pass_without_hostenv(tmpdir, glibc_tree, monkeypatch):
    for name, value in (("SLURM_JOB_ID", "7"), ("PMI_RANK", "1"), ("I_MPI_PIN", "0"),
                        ("NVIDIA_VISIBLE_DEVICES", "all"), ("GPU_DEVICE_ORDINAL", "1"),
                        ("SLURMD_NODENAME", "n2"), ("SRUN_DEBUG", "3"), ("NOT_PASSED", "x")):
        monkeypatch.setenv(name, value)
    env = plan_for(tmpdir, glibc_tree, config={"Env": ["SLURM_JOB_ID=image"]},
                   opts={"env": ["PMI_RANK=cli"]})[1].env
    assert env["SLURM_JOB_ID"] == "image" and env["PMI_RANK"] == "cli"
    assert env["I_MPI_PIN"] == "0" and env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["GPU_DEVICE_ORDINAL"] == "1" and "NOT_PASSED" not in env
    assert env["SLURMD_NODENAME"] == "n2" and env["SRUN_DEBUG"] == "3"   # Slurm's, too
    config = tmpdir.join("udocker").ensure(dir=True).join("udocker.conf")
    config.write("[DEFAULT]\npass_host_env = SLURM_*\n")
    env = plan_for(tmpdir, glibc_tree)[1].env
    assert "I_MPI_PIN" not in env and env["SLURM_JOB_ID"] == "7"


def test_devices_and_mode_limits(tmpdir, glibc_tree):
    plan = plan_for(tmpdir, glibc_tree, opts={"device": ["/dev/full", "/dev/zero:/dev/z"]})[1]
    devices = [(v.host, v.cont) for v in plan.binds if v.device]
    assert devices == [("/dev/zero", "/dev/z")]              # /dev/full: in the /dev bind
    assert "/dev/zero:/dev/z" in plan.argv
    plan = plan_for(tmpdir, glibc_tree, mode="R1", opts={"device": ["/dev/full"]})[1]
    mounts = dict((m["destination"], m) for m in bundle_spec(plan)["mounts"])
    assert mounts["/dev/full"]["source"] == "/dev/full"
    assert "nodev" not in mounts["/dev/full"]["options"]
    with pytest.raises(udocker.UsageError):
        plan_for(tmpdir, glibc_tree, mode="F1", opts={"device": ["/dev/zero:/dev/z"]})
    with pytest.raises(udocker.UsageError):
        plan_for(tmpdir, glibc_tree, mode="R1", opts={"publish": ["80:8080"]})


def test_json_text_is_json():
    import json
    value = {"b": [1, -2, 2 ** 40, True, False, None, 1.5], "a": {"k": u"q\"\\\n\t\x01 \u00e9",
                                                                  "r": u"\r\b\f\x1f\x7f/"},
             "process": {"env": ["A=b c", "E="]}}
    assert json.loads(udocker.json_text(value)) == value
    assert udocker.json_text(value) == json.dumps(value, sort_keys=True,
                                                  separators=(",", ":"), ensure_ascii=False)
    value["t"] = (b"bytes", u"/\u00e9")              # what json.dumps cannot take, but we do
    assert udocker.json_text(value) == udocker._json_text(value)     # 3.x: C encoder, 2.7: not


def test_env_file_lines_docker_and_shell_scripts_write(tmpdir, glibc_tree, monkeypatch):
    """udocker 1.3.17 and docker skip comments and blank lines and take a bare NAME from the
    host; shell-style `export NAME=VALUE` lines are read as NAME=VALUE."""
    monkeypatch.setenv("FROM_HOST", "host value")
    monkeypatch.delenv("NOT_ON_HOST", raising=False)
    envfile = tmpdir.join("vars.sh")
    envfile.write("#!/bin/sh\n# settings\n\n   \nexport A=1\nexport\tB=two words\n"
                  "  # indented comment\nFROM_HOST\nNOT_ON_HOST\nexported=yes\r\n")
    env = plan_for(tmpdir, glibc_tree, opts={"env_file": [str(envfile)]})[1].env
    assert env["A"] == "1" and env["B"] == "two words" and env["exported"] == "yes"
    assert env["FROM_HOST"] == "host value" and "NOT_ON_HOST" not in env
    assert not [name for name in env if " " in name or "\t" in name]


# -- a 5.1-era proot (upstream udocker's fork, Debian's 5.1.0): what P modes make up for

@pytest.mark.parametrize("kind", ["upstream", "debian", "modern"])
def test_proot_command_makes_up_for_what_the_proot_lacks(tmpdir, glibc_tree, kind):
    """Upstream's fork has --kill-on-exit but no statx translation and a -k that breaks
    glibc 2.33+ programs; Debian's 5.1.0 lacks --kill-on-exit too; 5.4 has everything."""
    from test_tools import fake_proot
    proot = fake_proot(tmpdir.join("p"), "5.4.0" if kind == "modern" else "5.1.0",
                       modern=kind == "modern", kill_on_exit=kind != "debian")
    engine = engine_for(tmpdir, glibc_tree, opts={"kernel": "9.9.9-fake"},
                        UDOCKER_USE_PROOT_EXECUTABLE=proot)
    engine.tools = udocker.Tools(engine.cfg, engine.session.repo, engine.environ)
    argv = engine.plan().argv                                   # what would run
    assert ("--kill-on-exit" in argv) is (kind != "debian")
    assert engine.kill_on_exit is (kind != "debian")            # else wait() kills the rest
    assert (engine.child_hook() is None) is (kind == "modern")  # the statx filter
    kind_of_libc, version = engine.container.libc()
    kernel_dropped = kind != "modern" and udocker.version_at_least(version, "2.33")
    assert ("-k" in argv) is not kernel_dropped


def test_the_run_plan_writes_nothing_and_apply_makes_its_changes(tmpdir, glibc_tree):
    """Engine.plan() says what would run (engine argv, binds, the changes on disk) without
    writing; apply() makes those changes; a failing check leaves no plan at all."""
    from test_tools import fake_proot
    proot = fake_proot(tmpdir.join("p"), "5.4.0", modern=True, kill_on_exit=True)
    outer = tmpdir.join("outer").ensure(dir=True)
    inner = tmpdir.join("inner").ensure(dir=True)
    opts = {"user": "4321", "volume": ["%s:/data" % outer, "%s:/data/sub/in" % inner]}
    engine = engine_for(tmpdir, glibc_tree, opts=opts, args=["/bin/true"],
                        UDOCKER_USE_PROOT_EXECUTABLE=proot)
    engine.tools = udocker.Tools(engine.cfg, engine.session.repo, engine.environ)
    cdir = engine.container.dir
    plan = engine.plan()
    assert os.listdir(cdir) == [] and os.listdir(str(outer)) == []
    assert plan.argv[0] == proot and plan.argv[-1] == "/bin/true" and plan.command == ["/bin/true"]
    assert "-i" in plan.argv and plan.user.uid == 4321
    kinds = dict((c.path, c.kind) for c in plan.changes)
    run_dir = os.path.join(cdir, ".run")
    assert kinds.pop(run_dir) == "dir" and kinds.pop(str(outer.join("sub", "in"))) == "dir"
    assert [k for k in kinds.values()] == ["file", "file"]          # passwd and group copies
    assert any(v.cont == "/etc/passwd" and v.host.startswith(run_dir) for v in plan.binds)
    assert "\n".join(plan.describe()).count("change: ") == 4
    engine.apply(plan)
    assert os.path.isdir(str(outer.join("sub", "in")))
    passwd = [v.host for v in plan.binds if v.cont == "/etc/passwd"][0]
    assert "udoc4321:x:4321:4321:" in open(passwd).read()
    engine = engine_for(tmpdir, glibc_tree, opts=dict(opts, workdir="/nonexistent"),
                        args=["/bin/true"], UDOCKER_USE_PROOT_EXECUTABLE=proot)
    with pytest.raises(udocker.EngineError):
        engine.plan()


def test_the_run_plan_uses_the_session_environment(tmpdir, glibc_tree, monkeypatch):
    """The environment a run passes on is the session's (main(argv, environ)), not
    os.environ: a program driving udocker.py needs not change its own. So are the PATH the
    engine is looked up in, the HOME of ~/.docker/config.json and the home of a user
    without a passwd entry."""
    import pwd
    from test_tools import fake_proot
    home = tmpdir.join("session-home").ensure(dir=True)
    proot = fake_proot(tmpdir.join("session-path"), "5.4.0", modern=True)
    monkeypatch.setenv("TERM", "from-os-environ")
    monkeypatch.setenv("HOME", str(tmpdir.join("os-home").ensure(dir=True)))
    monkeypatch.setenv("PATH", path_without_engines(str(tmpdir.join("os-path"))))
    environ = {"TERM": "from-session", "BARE": "bare-value", "HOME": str(home),
               "PATH": os.path.dirname(proot) + ":/usr/bin:/bin"}
    session = udocker.Session(session_for(tmpdir).cfg, environ)
    assert session.keystore.docker_config == str(home.join(".docker", "config.json"))

    def no_entry(uid):
        raise KeyError(uid)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    engine = engine_for(tmpdir, glibc_tree, opts={"env": ["BARE"], "bindhome": True},
                        args=["/bin/true"])
    engine = type(engine)(session, engine.container, engine.opts, ["/bin/true"],
                          udocker.Tools(session.cfg, session.repo, environ))
    plan = engine.plan()
    assert plan.argv[0] == proot                         # found on the session's PATH
    assert plan.env["TERM"] == "from-session" and plan.env["BARE"] == "bare-value"
    assert plan.env["HOME"] == str(home)                 # --bindhome, no passwd entry
    assert [v for v in plan.binds if v.host == v.cont == str(home)]
