"""Execution engines (section 9) without running an engine: path resolution inside ROOT,
ELF reading, what a run is made of (command, user, environment, volumes, working
directory), the OCI spec for runc/crun, F-mode symlink conversion, and the setup/run
command-line errors. The engines themselves run in test_run.py."""
from __future__ import print_function, absolute_import

import os
import subprocess
import sys

import pytest

import udocker
import rootfs
from support.toolserver import path_without_engines

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "udocker.py")
ROOT_ARGS = ["--allow-root"] if os.geteuid() == 0 else []
CID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


@pytest.fixture(scope="module")
def glibc_tree(tmpdir_factory):
    root = str(tmpdir_factory.mktemp("glibc").join("ROOT"))
    rootfs.make_glibc_rootfs(root)
    return root


def session_for(tmpdir, **env):
    environ = {"HOME": str(tmpdir), "UDOCKER_NOSYSCONF": "1",
               "UDOCKER_DIR": str(tmpdir.join("ud")), "UDOCKER_TARBALL": ""}
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


def run_ud(tmpdir, args, env=None):
    environ = dict(os.environ, UDOCKER_DIR=str(tmpdir.join("ud")), HOME=str(tmpdir),
                   UDOCKER_NOSYSCONF="1", UDOCKER_TARBALL="")
    environ.update(env or {})
    proc = subprocess.Popen([sys.executable, SCRIPT] + ROOT_ARGS + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ)
    out, err = proc.communicate()
    return proc.returncode, out.decode("utf-8"), err.decode("utf-8")


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
    meta = {"Entrypoint": ["/bin/echo", "E"], "Cmd": ["c1", "c2"]}
    assert engine_for(tmpdir, glibc_tree).choose_command(meta) == ["/bin/echo", "E", "c1", "c2"]
    assert engine_for(tmpdir, glibc_tree, args=["x"]).choose_command(meta) == \
        ["/bin/echo", "E", "x"]
    assert engine_for(tmpdir, glibc_tree, opts={"entrypoint": ""}, args=["ls"]) \
        .choose_command(meta) == ["ls"]
    assert engine_for(tmpdir, glibc_tree, opts={"entrypoint": "/bin/true"}) \
        .choose_command(meta) == ["/bin/true"]                   # the image Cmd is dropped
    assert engine_for(tmpdir, glibc_tree).choose_command({"Cmd": "echo hi"}) == \
        ["/bin/sh", "-c", "echo hi"]
    assert engine_for(tmpdir, glibc_tree).choose_command({}) == ["bash", "-i"]


def test_environment_precedence(tmpdir, glibc_tree, monkeypatch):
    monkeypatch.setenv("FROM_HOST", "host-value")
    monkeypatch.setenv("TERM", "xterm-test")
    envfile = tmpdir.join("env.list")
    envfile.write("# comment\nA=file\nB=file\nC=file\n\nFROM_HOST\n")
    engine = engine_for(tmpdir, glibc_tree, config={"Env": ["A=image", "B=image"]},
                        opts={"env": ["A=cli", "FROM_HOST", "MISSING_VAR"],
                              "env_file": [str(envfile)]})
    engine.prepare()
    env = engine.env
    assert env["A"] == "cli" and env["B"] == "image" and env["C"] == "file"
    assert env["FROM_HOST"] == "host-value" and "MISSING_VAR" not in env
    assert env["TERM"] == "xterm-test"
    assert env["PATH"] == "/usr/sbin:/sbin:/usr/bin:/bin"          # root's default
    assert env["HOME"] == "/root" and env["USER"] == "root"
    assert env["container_uuid"] == CID and env["container_names"] == "myname"
    assert env["container_execmode"] == "P1" and env["container_root"] == glibc_tree
    with pytest.raises(udocker.UsageError):
        engine_for(tmpdir, glibc_tree, opts={"env": ["=bad"]}).prepare()


def test_hostenv_and_nometa(tmpdir, glibc_tree, monkeypatch):
    monkeypatch.setenv("SOMETHING_ELSE", "1")
    engine = engine_for(tmpdir, glibc_tree, config={"Env": ["A=image"], "WorkingDir": "/etc"},
                        opts={"hostenv": True, "nometa": True})
    engine.prepare()
    assert engine.env["SOMETHING_ELSE"] == "1" and "A" not in engine.env
    assert engine.cwd == "/"                    # not /etc; the host HOME is not inside


def test_users(tmpdir, glibc_tree):
    engine = engine_for(tmpdir, glibc_tree, opts={"user": "user"})
    engine.prepare()
    assert (engine.user.uid, engine.user.gid, engine.user.home) == (1000, 1000, "/home/user")
    assert engine.cwd == "/home/user" and engine.env["PATH"].startswith("/usr/sbin:/sbin:/usr/l")
    engine = engine_for(tmpdir, glibc_tree, opts={"user": "4321:nogroup"})
    engine.prepare()
    assert (engine.user.name, engine.user.uid, engine.user.gid) == ("udoc4321", 4321, 65534)
    passwd = [v for v in engine.volumes if v.cont == "/etc/passwd"]
    assert passwd and "udoc4321:x:4321:65534:*UDOCKER*:/:/bin/sh" in open(passwd[0].host).read()
    assert open(passwd[0].host).read().startswith("root:x:0:0:")       # a copy, extended
    engine = engine_for(tmpdir, glibc_tree, config={"User": "nobody"})
    engine.prepare()
    assert engine.user.uid == 65534 and not [v for v in engine.volumes
                                             if v.cont == "/etc/passwd"]
    with pytest.raises(udocker.EngineError):
        engine_for(tmpdir, glibc_tree, opts={"user": "ghost"}).prepare()


def test_fakechroot_modes_run_as_the_host_user(tmpdir, glibc_tree):
    engine = engine_for(tmpdir, glibc_tree, mode="F1", opts={"user": "root"})
    engine.user = engine.choose_user({})
    assert engine.user.uid == os.getuid() and engine.user.gid == os.getgid()


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
    engine.tools = udocker.Tools(engine.cfg, engine.session.repo)
    engine.prepare()
    env = engine.command()[1]
    entries = env["FAKECHROOT_DIR_MAP"].split(":")
    assert all(e.count("!") == 1 and e.startswith("/") and "!/" in e for e in entries), entries
    mapped = dict(reversed(e.split("!")) for e in entries)
    for cont, host in volumes.items():
        if cont not in mapped:          # the symlink in ROOT, to a name in the map
            cont = os.readlink(udocker.resolve_in_root(root, cont, follow_last=False))
        assert os.path.realpath(mapped[cont]) == os.path.realpath(host), cont
    assert mapped["/spool"] == str(plain)


def test_volumes_sysdirs_novol_and_workdir(tmpdir, glibc_tree):
    data = tmpdir.join("data").ensure(dir=True)
    engine = engine_for(tmpdir, glibc_tree, opts={
        "volume": ["%s:/data" % data], "novol": ["/sys"], "workdir": "/data"})
    engine.prepare()
    conts = [v.cont for v in engine.volumes]
    assert "/proc" in conts and "/sys" not in conts and "/data" in conts
    assert engine.cwd == "/data" and engine.cont2host("/data/x") == str(data.join("x"))
    engine = engine_for(tmpdir, glibc_tree, opts={"nosysdirs": True})
    engine.prepare()
    assert engine.volumes == []
    with pytest.raises(udocker.EngineError) as info:
        engine_for(tmpdir, glibc_tree, opts={"workdir": "/nonexistent"}).prepare()
    assert "invalid working directory" in str(info.value)
    with pytest.raises(udocker.EngineError) as info:
        engine_for(tmpdir, glibc_tree, args=["no-such-program"]).prepare()
    assert "command not found" in str(info.value)


def test_runc_spec(tmpdir, glibc_tree):
    data = tmpdir.join("data").ensure(dir=True)
    engine = engine_for(tmpdir, glibc_tree, mode="R1", args=["ls", "-l"],
                        opts={"volume": ["%s:/data:ro" % data], "hostname": "box.example"})
    engine.prepare()
    spec = engine.spec()
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
        engine = engine_for(tmpdir, glibc_tree, mode="R1", opts={"volume": ["/proc"]})
        engine.prepare()
        engine.spec()


def test_proot_status_maps_signals():
    assert udocker.proot_status(255, 15) == 143
    assert udocker.proot_status(255, None) == 255
    assert udocker.proot_status(3, 15) == 3


# -- the command line, no engine needed

@pytest.fixture
def bb_container(tmpdir, glibc_tree):
    top = str(tmpdir.join("ud"))
    os.makedirs(os.path.join(top, "containers"))
    rootfs.write_container(top, CID, glibc_tree, name="named")
    return tmpdir


def test_setup_shows_mode_and_refuses_what_cannot_work(bb_container):
    rc, out, err = run_ud(bb_container, ["setup", "named"])
    assert rc == 0 and out == "execmode: P1\nnvidiamode: False\n"
    rc, out, err = run_ud(bb_container, ["setup", CID],
                          {"UDOCKER_DEFAULT_EXECUTION_MODE": "R1"})
    assert out.startswith("execmode: R1\n")
    rc, out, err = run_ud(bb_container, ["setup", "--execmode=Z1", "named"])
    assert rc == 1 and "invalid execution mode" in err and "Traceback" not in err
    rc, out, err = run_ud(bb_container, ["setup", "--execmode=R1", "named"])
    assert rc == 0, err
    assert run_ud(bb_container, ["setup", "named"])[1].startswith("execmode: R1\n")
    bb_container.join("ud", "containers", CID, "PROTECT").write("")
    rc, out, err = run_ud(bb_container, ["setup", "--execmode=P2", "named"])
    assert rc == 1 and "protected" in err


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
def test_run_errors_are_one_line(bb_container, args, needle):
    rc, out, err = run_ud(bb_container, args)
    errors = [l for l in err.splitlines() if l.startswith("Error:")]
    assert rc == 1 and len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err


def test_run_without_tools_says_how_to_get_them(bb_container):
    no_engines = path_without_engines(str(bb_container.join("path")))   # whatever the host has
    rc, out, err = run_ud(bb_container, ["run", "named", "true"],
                          {"PATH": no_engines, "UDOCKER_TARBALL": ""})
    assert rc == 1 and "UDOCKER_TARBALL" in err and "Traceback" not in err
    environ = dict((k, v) for k, v in os.environ.items() if k != "UDOCKER_TARBALL")
    proc = subprocess.Popen([sys.executable, SCRIPT] + ROOT_ARGS + ["run", "named", "true"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(environ, UDOCKER_DIR=str(bb_container.join("ud")),
                                     HOME=str(bb_container), UDOCKER_NOSYSCONF="1",
                                     PATH=no_engines))    # the default download: refused here
    err = proc.communicate()[1].decode("utf-8")
    assert proc.returncode == 1 and "set UDOCKER_TARBALL" in err
    assert "copy it beside udocker.py" in err and "install --help" in err


def test_name_patterns_cpu_lists_and_port_specs():
    assert udocker.name_matches("OMPI_COMM_WORLD_RANK", ["SLURM_*", "OMPI_*"])
    assert udocker.name_matches("CUDA_VISIBLE_DEVICES", ["CUDA_VISIBLE_DEVICES"])
    assert not udocker.name_matches("CUDA_VISIBLE_DEVICESX", ["CUDA_VISIBLE_DEVICES"])
    assert udocker.name_matches("PMI_FD", ["PM?_[FR]*"])
    assert not udocker.name_matches("XOMPI_X", ["OMPI_*"])
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
    engine = engine_for(tmpdir, glibc_tree, config={"Env": ["SLURM_JOB_ID=image"]},
                        opts={"env": ["PMI_RANK=cli"]})
    engine.prepare()
    env = engine.env
    assert env["SLURM_JOB_ID"] == "image" and env["PMI_RANK"] == "cli"
    assert env["I_MPI_PIN"] == "0" and env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["GPU_DEVICE_ORDINAL"] == "1" and "NOT_PASSED" not in env
    assert env["SLURMD_NODENAME"] == "n2" and env["SRUN_DEBUG"] == "3"   # Slurm's, too
    config = tmpdir.join("ud").ensure(dir=True).join("udocker.conf")
    config.write("[DEFAULT]\npass_host_env = SLURM_*\n")
    engine = engine_for(tmpdir, glibc_tree)
    engine.prepare()
    assert "I_MPI_PIN" not in engine.env and engine.env["SLURM_JOB_ID"] == "7"


def test_devices_and_mode_limits(tmpdir, glibc_tree):
    engine = engine_for(tmpdir, glibc_tree, opts={"device": ["/dev/full", "/dev/zero:/dev/z"]})
    engine.prepare()
    devices = [(v.host, v.cont) for v in engine.volumes if v.device]
    assert devices == [("/dev/zero", "/dev/z")]              # /dev/full: in the /dev bind
    engine = engine_for(tmpdir, glibc_tree, mode="R1", opts={"device": ["/dev/full"]})
    engine.prepare()
    mounts = dict((m["destination"], m) for m in engine.spec()["mounts"])
    assert mounts["/dev/full"]["source"] == "/dev/full"
    assert "nodev" not in mounts["/dev/full"]["options"]
    with pytest.raises(udocker.UsageError):
        engine_for(tmpdir, glibc_tree, mode="F1", opts={"device": ["/dev/zero:/dev/z"]}) \
            .prepare()
    with pytest.raises(udocker.UsageError):
        engine_for(tmpdir, glibc_tree, mode="R1", opts={"publish": ["80:8080"]}).prepare()


def test_json_text_is_json():
    import json
    value = {"b": [1, -2, 2 ** 40, True, False, None, 1.5], "a": {"k": u"q\"\\\n\t\x01 \u00e9"},
             "process": {"env": ["A=b c", "E="]}}
    assert json.loads(udocker.json_text(value)) == value
    assert udocker.json_text(value) == json.dumps(value, sort_keys=True,
                                                  separators=(",", ":"), ensure_ascii=False)


def test_env_file_lines_docker_and_shell_scripts_write(tmpdir, glibc_tree, monkeypatch):
    """udocker 1.3.17 and docker skip comments and blank lines and take a bare NAME from the
    host; shell-style `export NAME=VALUE` lines are read as NAME=VALUE."""
    monkeypatch.setenv("FROM_HOST", "host value")
    monkeypatch.delenv("NOT_ON_HOST", raising=False)
    envfile = tmpdir.join("vars.sh")
    envfile.write("#!/bin/sh\n# settings\n\n   \nexport A=1\nexport\tB=two words\n"
                  "  # indented comment\nFROM_HOST\nNOT_ON_HOST\nexported=yes\r\n")
    engine = engine_for(tmpdir, glibc_tree, opts={"env_file": [str(envfile)]})
    engine.prepare()
    env = engine.env
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
    engine.tools = udocker.Tools(engine.cfg, engine.session.repo)
    engine.prepare()
    argv = engine.command()[0]
    assert ("--kill-on-exit" in argv) is (kind != "debian")
    assert engine.kill_on_exit is (kind != "debian")            # else wait() kills the rest
    assert (engine.child_hook() is None) is (kind == "modern")  # the statx filter
    kind_of_libc, version = engine.container.libc()
    kernel_dropped = kind != "modern" and udocker.version_at_least(version, "2.33")
    assert ("-k" in argv) is not kernel_dropped
