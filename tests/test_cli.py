"""Command line: the command table, the parser, help, and one-line errors."""
from __future__ import print_function, absolute_import

import json
import os
import re
import subprocess
import sys

import pytest

import udocker
from support import PY2, UDOCKER_SCRIPT as SCRIPT, one_error_line
from support.runner import Udocker

UPSTREAM_COMMANDS = ("pull images create run ps rm rmi inspect verify protect unprotect name "
                     "rmname rename clone export import load save login logout search setup "
                     "install mkrepo showconf version help manifest tag").split()


def test_every_upstream_command_is_in_the_table():
    for name in UPSTREAM_COMMANDS:
        assert name in udocker.COMMANDS, name


def test_run_options_cover_upstream():
    names = set(n for o in udocker.COMMANDS["run"].opts for n in o.names)
    for opt in ("--rm", "-w", "--workdir", "-u", "--user", "-v", "--volume", "--novol", "-e",
                "--env", "--env-file", "--hostauth", "--containerauth", "--nosysdirs",
                "--hostenv", "--bindhome", "--entrypoint", "--cpuset-cpus", "--location",
                "-i", "-t", "--nometa", "--dri", "--device", "--platform", "--pull",
                "--hostname", "--nobanner", "-p", "--publish", "--publish-all", "-k",
                "--kernel", "--name"):
        assert opt in names, opt


def test_option_forms():
    cmd = udocker.COMMANDS["run"]
    opts, args = cmd.parse(["-v", "/a:/b", "--volume=/c", "-e", "X=1", "--rm", "-it",
                            "img", "ls", "-l", "-v", "x"])
    assert opts["volume"] == ["/a:/b", "/c"]
    assert opts["env"] == ["X=1"]
    assert opts["rm"] and opts["interactive"] and opts["tty"]
    assert args == ["img", "ls", "-l", "-v", "x"]


def test_value_option_needs_value_and_flag_takes_none():
    with pytest.raises(udocker.UsageError):
        udocker.COMMANDS["pull"].parse(["--platform"])
    with pytest.raises(udocker.UsageError):
        udocker.COMMANDS["images"].parse(["-l=yes"])


def test_argument_counts_checked():
    with pytest.raises(udocker.UsageError):
        udocker.COMMANDS["pull"].parse([])
    with pytest.raises(udocker.UsageError):
        udocker.COMMANDS["pull"].parse(["a", "b"])
    assert udocker.COMMANDS["rm"].parse(["a", "b", "c"])[1] == ["a", "b", "c"]


def test_general_options_take_separate_values():
    opts, name, words = udocker.parse_general(["--config", "myconf", "-D", "images", "-l"])
    assert opts["config"] == "myconf" and opts["debug"]
    assert name == "images" and words == ["-l"]


@pytest.mark.parametrize("args,needle", [
    (["frobnicate"], "invalid command: frobnicate"),
    (["pull", "--bogus", "x"], "unknown option: --bogus"),
    (["--nope", "images"], "unknown general option: --nope"),
    (["pull"], "missing argument: IMAGE"),
    (["pull", "UPPER/Case"], "invalid repository name"),
    (["pull", "a:b:c:d"], "invalid"),
    (["pull", "--platform=linux", "busybox"], "invalid platform"),
    (["inspect", "nosuchimage"], "image not found: nosuchimage:latest"),
    (["verify", "nosuch:1"], "image not found: nosuch:1"),
    (["rmi", "nosuch"], "image not found"),
    (["--config=/", "images"], "cannot read config file /: Is a directory"),
    (["create", "--platform=foo", "x"], "invalid platform: 'foo'"),
])
def test_bad_input_is_one_line_error(tmpdir, args, needle, ud):
    rc, out, err = ud(*args)
    assert rc != 0
    assert needle in err
    assert "Traceback" not in err
    assert [l for l in err.splitlines() if l.startswith("Error:")] == \
        [err.strip().splitlines()[-1]]


def test_debug_shows_traceback(tmpdir, ud):
    args = ["-D", "inspect", "nosuchimage"]
    rc, out, err = ud(*args)
    assert rc == 1 and "Traceback" in err


def test_help_for_every_command_comes_from_the_table(tmpdir):
    for name in ("pull", "run", "images"):
        rc, out, err = Udocker(tmpdir)("help", name)
        rc2, out2, err2 = Udocker(tmpdir)(name, "--help")
        assert rc == rc2 == 0
        assert out == out2 == udocker.COMMANDS[name].usage() + "\n"
    for opt in udocker.COMMANDS["run"].opts:
        assert opt.names[-1] in udocker.COMMANDS["run"].usage()


def test_general_help_lists_commands(tmpdir):
    rc, out, err = Udocker(tmpdir)()
    assert rc == 0
    for name in UPSTREAM_COMMANDS:
        assert "  %s " % name in out


def test_version(tmpdir):
    rc, out, err = Udocker(tmpdir)("--version")
    assert rc == 0
    assert out.splitlines()[0] == "version: 1.3.17"
    assert "udocker.py: %s" % udocker.__version__ in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to test the root refusal")
def test_root_refused_without_allow_root(tmpdir):
    rc, out, err = Udocker(tmpdir)("images")
    assert rc == 1 and "do not run as root" in err


def test_unknown_option_rejected_before_anything_is_done(tmpdir, ud):
    args = ["pull", "--nope", "busybox"]
    rc, out, err = ud(*args)
    assert rc == 1
    assert not tmpdir.join("udocker").check()          # not even the repository was created


def test_start_up_imports_stay_lazy():
    """`version` must not pay for the heavy modules (start-up is a benchmark target)."""
    code = ("import sys; sys.path.insert(0, %r); import udocker; "
            "udocker.main(['--allow-root', 'version']); "
            "print('LOADED:' + ' '.join(m for m in ('re', 'json', 'ssl', 'socket', "
            "'http.client', 'tarfile', 'subprocess', 'threading', 'email', 'bz2', 'lzma', "
            "'__future__', 'fnmatch') "
            "if m in sys.modules))" % os.path.dirname(SCRIPT))
    proc = subprocess.Popen([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE)
    out = proc.communicate()[0].decode().splitlines()
    assert proc.returncode == 0
    assert out[-1] == "LOADED:", out


def test_no_future_import_is_needed():
    """udocker.py has no `from __future__ import` (importing __future__ costs every start
    ~0.3 ms): so Python 2 must see no print statement, and no / between two integers."""
    import tokenize
    with open(SCRIPT, "rb") as handle:
        tokens = list(tokenize.tokenize(handle.readline) if sys.version_info[0] >= 3
                      else tokenize.generate_tokens(handle.readline))
    names = [t for t in tokens if t[0] == tokenize.NAME]
    assert "__future__" not in [t[1] for t in names]
    assert [t[2] for t in names if t[1] == "print"] == []
    lines = {}
    for tok in tokens:
        lines.setdefault(tok[2][0], []).append(tok)
    for tok in tokens:
        if tok[0] == tokenize.OP and tok[1] in ("/", "/="):    # a float literal beside it
            line = lines[tok[2][0]]
            floats = [t for t in line if t[0] == tokenize.NUMBER and ("." in t[1] or
                                                                     "e" in t[1].lower())]
            assert floats, "integer division on Python 2? line %d" % tok[2][0]


def test_root_refused_without_allow_root_in_process(monkeypatch, capsys, tmpdir):
    monkeypatch.setattr(udocker.os, "geteuid", lambda: 0)
    env = {"HOME": str(tmpdir), "UDOCKER_NOSYSCONF": "1", "UDOCKER_DIR": str(tmpdir.join("u"))}
    assert udocker.main(["images"], env) == 1
    assert "do not run as root" in capsys.readouterr().err
    assert not tmpdir.join("u").check()                    # refused before anything
    assert udocker.main(["--allow-root", "images"], env) == 0


def test_showconf_prints_effective_typed_values(tmpdir):
    conf = tmpdir.join("c.conf")
    conf.write("[DEFAULT]\npull_parallel = 7\n")
    rc, out, err = Udocker(tmpdir)("--config=" + str(conf), "showconf",
                                   env={"UDOCKER_LOGLEVEL": "4"})
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == lines[2] == lines[-1] == "-" * 79
    assert "pull_parallel = 7    # %s" % conf in out
    assert 'sysdirs_list = ["/dev", "/proc"' in out
    assert "topdir = %s    # env UDOCKER_DIR" % tmpdir.join("udocker") in out


def test_table_of_contents_matches_the_banners():
    """The contents list at the top names every section banner, in order."""
    import re
    with open(SCRIPT) as handle:
        text = handle.read()
    listed = re.findall(r"^#\s+(\d+)\. (\S+(?: \S+)*?)\s{2,}", text, re.M)
    banners = re.findall(r"^# ==== (\d+)\. (.+?) ====$", text, re.M)
    assert banners and listed == banners
    # sub-sections (a long section's), listed under their section and in their section
    listed = re.findall(r"^#\s+(\d+)\.(\d+(?:\.\d+)?) (\S+(?: \S+)*?)(?:\s{2,}|$)", text, re.M)
    subs = re.findall(r"^# ---- (\d+)\.(\d+(?:\.\d+)?) (.+?) ----$", text, re.M)
    assert subs and listed == subs
    starts = dict((n, text.index("# ==== %s. " % n)) for n, _ in banners)
    for section, number, title in subs:
        at = text.index("# ---- %s.%s %s ----" % (section, number, title))
        following = [p for n, p in starts.items() if int(n) == int(section) + 1]
        assert starts[section] < at < (following[0] if following else len(text))


def test_run_in_process_leaves_the_garbage_collector_on(monkeypatch, capsys, tmpdir):
    """run turns the collector off while it loads and plans (3.7+: the objects it made are
    frozen first), and back on as main returns, whatever the outcome, for a caller in the
    same process."""
    import gc
    environ = {"UDOCKER_DIR": str(tmpdir.join("ud")), "HOME": str(tmpdir),
               "UDOCKER_NOSYSCONF": "1", "PATH": os.environ.get("PATH", "")}
    during = []
    expect = udocker.ChapterLoader.expect
    monkeypatch.setattr(udocker.ChapterLoader, "expect", staticmethod(
        lambda namespace, name: during.append(gc.isenabled()) or expect(namespace, name)))
    assert gc.isenabled()
    assert udocker.main(["run", "--pull=never", "no-such-container-or-image:x", "true"],
                        environ) != 0
    assert during == [not hasattr(gc, "freeze")]           # off while run works (3.7+)
    assert gc.isenabled()
    gc.disable()
    try:                           # a caller that had it off keeps it off
        udocker.main(["run", "--pull=never", "no-such-container-or-image:x", "true"], environ)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_internal_error_is_one_line(monkeypatch, capsys, tmpdir):
    def broken(session, opts, args):
        raise KeyError("boom")
    monkeypatch.setattr(udocker.COMMANDS["images"], "func", broken)
    env = {"HOME": str(tmpdir), "UDOCKER_NOSYSCONF": "1", "UDOCKER_DIR": str(tmpdir.join("u"))}
    assert udocker.main(["--allow-root", "images"], env) == 1
    errors = [l for l in capsys.readouterr().err.splitlines() if not l.startswith("Info:")]
    assert len(errors) == 1 and errors[0].startswith("Error: internal error: KeyError")
    assert udocker.main(["--allow-root", "-D", "images"], env) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("launcher", ["python", "sh"])
def test_closed_stdout_ends_quietly_with_sigpipe_status(tmpdir, launcher):
    """`udocker.py images | head -1` with a reader gone: no "Error: Broken pipe", status
    141 as for a tool ended by SIGPIPE (the launcher's os._exit path too)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    argv = ([sys.executable, SCRIPT] if launcher == "python" else [SCRIPT]) + ["help"]
    proc = subprocess.Popen(argv, stdout=write_end, stderr=subprocess.PIPE,
                            env=Udocker(tmpdir).environ())
    os.close(write_end)
    err = proc.communicate()[1]
    assert proc.returncode == 141 and err == b"", err


@pytest.mark.parametrize("launcher", ["python", "sh"])
def test_closed_standard_streams_are_no_error(tmpdir, launcher):
    """`udocker.py images >&-`: Python 3 makes sys.stdout None (an AttributeError traceback
    at exit before); the output is dropped, an error still gets its one line."""
    argv = ([sys.executable, SCRIPT] if launcher == "python" else [SCRIPT])
    env = Udocker(tmpdir).environ()
    for words, closing, status in ((["help"], ">&-", 0), (["images"], "<&- >&-", 0),
                                   (["nosuch"], ">&-", 1), (["ps"], "2>&- >&-", 0)):
        proc = subprocess.Popen(["sh", "-c", 'exec "$@" ' + closing, "sh"] + argv + words,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out, err = proc.communicate()
        assert proc.returncode == status and out == b"", (words, err)
        errors = [l for l in err.splitlines() if not l.startswith(b"Info:")]
        assert errors == ([b"Error: invalid command: nosuch (see: udocker.py help)"]
                          if status else []), err


@pytest.mark.parametrize("option,needle", [
    ("-e=BAD NAME=1", "invalid environment variable in -e: 'BAD NAME=1'"),
    ("-v=relative:/x", "invalid volume: relative:/x"),
    ("-v=/nonexistent-host-dir:/x", "host path does not exist"),
    ("--mount=type=bind,target=/x", "--mount"),
    ("-w=relative", "invalid working directory: relative")])
def test_run_refuses_bad_options_before_pulling(registry, ud, option, needle):
    # before: the image was pulled, the tools installed and a container made, then refused
    rc, out, err = ud("run", option, "%s/test/busybox" % registry.host, "true")
    assert rc == 1 and one_error_line(err, needle), err
    assert "pulling" not in err and ud("images", "-q")[1] == "" and ud("ps", "-q")[1] == ""


def test_bytes_that_are_not_utf8_show_as_xnn_on_every_python(ud):
    # 3.x showed the surrogate escapes its argv decoding makes (a\udcff), 2.7 raw bytes
    for args, line in ((["inspect", b"a\xff"], "Error: invalid image reference: 'a\\xff'"),
                       (["rm", b"\xc3\xa9\xff"], "Error: container not found: \\xc3\\xa9\\xff"),
                       ([b"a\xff"], "Error: invalid command: a\\xff (see: udocker.py help)")):
        rc, out, err = ud(*[a if isinstance(a, str) or PY2 else
                            a.decode("utf-8", "surrogateescape") for a in args])
        assert rc == 1 and [l for l in err.splitlines() if not l.startswith("Info:")] == [line]


def test_rmi_checks_before_it_says_deleting(tmpdir, ud):
    args = ["rmi", "nosuch:1"]
    rc, out, err = ud(*args)
    assert rc == 1 and err.splitlines()[-1] == "Error: image not found: nosuch:1", err
    assert "deleting" not in err, err


@pytest.mark.parametrize("name", ["udocker-0.1.py", "udocker.v2.py", "1st.py", "ud", "my_ud.py"])
def test_renamed_file_still_runs_as_a_command(tmpdir, name):
    """The shell launcher imports the file as a module (cached bytecode) when its name is a
    module name, and runs it as a script otherwise (was: a traceback from __import__)."""
    path = str(tmpdir.join("bin", name))
    os.makedirs(os.path.dirname(path))
    with open(SCRIPT, "rb") as source, open(path, "wb") as target:
        target.write(source.read())
    os.chmod(path, 0o755)
    proc = subprocess.Popen(["./" + name, "version"], cwd=os.path.dirname(path),
                            env=Udocker(tmpdir).environ(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    assert proc.returncode == 0 and b"udocker.py: " in out and err == b"", err
    cached = os.path.isdir(os.path.join(os.path.dirname(path), "__pycache__"))
    assert cached == (name == "my_ud.py")       # the fast path stays for module names


def test_help_says_what_the_options_do():
    """rm -f changes nothing (rm always makes files removable), --device works in every
    mode (F modes at the device's own path), --cpuset-cpus sets the affinity itself."""
    helps = dict((o.names[-1], o.help) for o in udocker.COMMANDS["run"].opts)
    assert "R modes" not in helps["--device"] and "own path" in helps["--device"]
    assert "numactl" not in helps["--cpuset-cpus"] and "affinity" in helps["--cpuset-cpus"]
    assert "fix permissions" not in udocker.COMMANDS["rm"].opts[0].help
    assert not hasattr(udocker, "cmd_not_yet")


# -- docker habits: -q lists, ps -a, rm $(ps -q), rmi $(images -q), inspect -f

def test_quiet_lists_feed_rm_and_rmi(tmpdir, ud):
    tree = tmpdir.join("tree").ensure(dir=True)
    tree.join("etc", "hello").write("hi\n", ensure=True)
    tarball = str(tmpdir.join("t.tar"))
    subprocess.check_call(["tar", "-C", str(tree), "-cf", tarball, "."])
    for name in ("one:1", "two:2"):
        assert ud("import", tarball, name)[0] == 0
    rc, out, err = ud("images", "-q")
    assert rc == 0 and out.splitlines() == ["one:1", "two:2"], err
    cids = sorted(ud("create", "one:1")[1].strip() for _ in range(2))
    rc, out, err = ud("ps", "-q")
    assert rc == 0 and out.splitlines() == cids, err
    rc, out, err = ud("ps", "-a")
    assert rc == 0 and out == ud("ps")[1] and len(out.splitlines()) == 3
    assert ud("rm", *ud("ps", "-q")[1].split())[0] == 0
    assert ud("ps", "-q")[1] == ""
    rc, out, err = ud("rmi", *ud("images", "-q")[1].split())
    assert rc == 0 and ud("images", "-q")[1] == "", err


def test_quiet_images_name_a_by_digest_pull_so_rmi_takes_it(registry, ud):
    # a by-digest pull's tag directory is the digest: images, images -q and rmi's message
    # spell it NAME@sha256:..., which every command accepts (NAME:sha256:... none does)
    ref = "%s/test/busybox@%s" % (registry.host, registry.images["test/busybox:latest"]["digest"])
    assert ud("pull", ref)[0] == 0
    assert ud("images", "-q")[1].splitlines() == [ref]
    assert ud("images")[1].splitlines()[1].split() == [ref, "."]
    rc, out, err = ud("rmi", *ud("images", "-q")[1].split())
    assert rc == 0 and "deleting image: %s\n" % ref in err, err
    assert ud("images", "-q")[1] == ""


def test_inspect_format_simple_templates(tmpdir, ud):
    doc = {"architecture": "amd64", "config": {"Env": ["A=1", "B=2"], "Cmd": None,
                                               "Labels": {"k": "v", "a": True}}}
    fill = udocker.fill_template
    assert fill("{{.Architecture}}/{{.config.Env}}", doc, {}) == "amd64/[A=1 B=2]"
    assert fill("{{ .Config.Cmd }} {{.Nope.X}} {{.Config.Labels}}", doc, {}) == \
        "<no value> <no value> map[a:true k:v]"
    assert fill("{{json .Config.Env}}", doc, {}) == '["A=1","B=2"]'
    assert json.loads(fill("{{json .}}", doc, {})) == doc
    assert fill("id={{.Id}}", doc, {"Id": "sha256:x"}) == "id=sha256:x"
    for bad in ("{{range .Config.Env}}{{.}}{{end}}", "{{index .Config 0}}", "{{.A | x}}"):
        with pytest.raises(udocker.UsageError) as info:
            udocker.parse_template(bad)
        assert "only {{.Field.Sub}} and {{json .Field}} are supported" in str(info.value)
    tarball = str(tmpdir.join("t.tar"))
    tmpdir.join("tree").ensure(dir=True)
    subprocess.check_call(["tar", "-C", str(tmpdir.join("tree")), "-cf", tarball, "."])
    assert ud("import", tarball, "img:1")[0] == 0
    rc, out, err = ud("inspect", "-f", "{{.Id}} {{.Os}} {{.RepoTags}}", "img:1")
    assert rc == 0 and re.match(r"^sha256:[0-9a-f]{64} linux \[img:1\]\n$", out), err
    cid = ud("create", "img:1")[1].strip()
    rc, out, err = ud("inspect", "--format={{.Id}} {{json .rootfs.type}}", cid)
    assert rc == 0 and out == cid + ' "layers"\n', err
    rc, out, err = ud("inspect", "-f", "{{range .X}}{{end}}", cid)
    assert rc == 1 and out == "" and err.splitlines()[-1].startswith("Error: inspect -f:")


def test_utf8_arguments_show_as_themselves_without_a_locale(ud):
    """LANG and LC_ALL unset (the C locale): Python 3.6 decodes a UTF-8 argument to
    surrogates and its stderr is ASCII, so messages showed /\\udcc3\\udca9; the bytes as given,
    as on 2.7 and 3.7+ (which take UTF-8 in the C locale)."""
    env = dict((name, None) for name in os.environ if name.startswith("LC_"))
    env.update({"LANG": None, "LANGUAGE": None, "PYTHONIOENCODING": None, "PYTHONUTF8": None})
    arg = b"/\xc3\xa9:/x" if PY2 else os.fsdecode(b"/\xc3\xa9:/x")   # whatever our locale
    result = ud("run", "-v", arg, "c", "true", env=env)
    assert result.rc == 1
    assert u"Error: invalid volume: /\u00e9:/x (host path does not exist)" in result.err, \
        result.err
