# -*- coding: utf-8 -*-
"""Bad input: a seeded fuzzer over every command, option, UDOCKER_* variable and
udocker.conf (VERIFY.md, "bad input").

Each case runs udocker.main(argv, environ) in this process against a fresh copy of a small
repository (one image loaded from a local docker-save archive, one container), with the
standard streams replaced by ones that behave as the real ones do under a UTF-8 locale
(stdout strict, stderr backslashreplace; Python 2.7: byte streams that take only ASCII
unicode). For every case:
  - nothing escapes main(), no traceback, no "internal error";
  - a non-zero status comes with exactly one "Error:" line (Info:/Warning:/Debug: lines
    may come too, nothing else on stderr); status 0 with none;
  - a case marked ERROR (the input is wrong) must not exit 0.
No network: every registry, index and proxy is a loopback port that refuses, and `run`
stops where the engine would start (Supervisor.run raises WouldStart).
"""
from __future__ import print_function, absolute_import, division

import io
import json
import os
import random
import shutil
import signal
import sys
import tarfile
import tempfile

import pytest

import udocker
from support.images import Image, Layer, d, docker_archive_files, f, write_tar

PY2 = sys.version_info[0] == 2
SEED = 20261204
REFUSED = "http://127.0.0.1:1"          # nothing listens on port 1
ERROR, ANY = "error", "any"              # what a case expects: an error, or either outcome
CASE_TIMEOUT = 20                        # seconds before a case counts as hung
RANDOM_PER_COMMAND = 40


def native(data):
    """Bytes as argv and environ deliver them: str on 2.7, surrogate-escaped str on 3."""
    return data if PY2 else data.decode("utf-8", "surrogateescape")


class WouldStart(BaseException):
    """`run` got as far as starting the engine: its input was accepted."""


class Hang(BaseException):
    """A case took longer than CASE_TIMEOUT."""


class Py2Stream(object):
    """A 2.7 pipe: str bytes pass, unicode is encoded as ASCII (or fails, as it would)."""

    def __init__(self, data=b""):
        self.raw = io.BytesIO(data)

    def write(self, text):
        if not isinstance(text, bytes):
            text = text.encode("ascii")
        self.raw.write(text)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def isatty(self):
        return False


def streams(stdin=b""):
    """(stdin, stdout, stderr) as a UTF-8 locale gives them, stdin not a tty."""
    if PY2:
        return Py2Stream(stdin), Py2Stream(), Py2Stream()
    return (io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape"),
            io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict"),
            io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace"))


def text_of(stream):
    if not PY2:
        stream.flush()
        stream = stream.buffer
    return stream.getvalue().decode("utf-8", "replace")


# -- the shared world: a template repository, files of every kind, odd values

class World(object):
    pass


def _rmtree(path):
    def fix(func, name, _exc):
        try:
            os.chmod(os.path.dirname(name), 0o700)
            os.chmod(name, 0o700)
        except OSError:
            pass
        func(name)
    if os.path.lexists(path):
        shutil.rmtree(path, onerror=fix)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World()
    # thousands of repositories are copied and removed: on tmpfs where there is one (a
    # directory removed on a busy disk can take 5 ms)
    shm = "/dev/shm"
    base = tempfile.mkdtemp(prefix="badinput-", dir=shm) if os.path.isdir(shm) and \
        os.access(shm, os.W_OK | os.X_OK) else str(tmp_path_factory.mktemp("badinput"))
    w.base = base
    w.home = os.path.join(base, "home")
    os.makedirs(w.home)
    w.files = os.path.join(base, "files")
    w.env = {"HOME": w.home, "UDOCKER_NOSYSCONF": "1", "PATH": os.environ.get("PATH", ""),
             "UDOCKER_REGISTRY": REFUSED, "UDOCKER_INDEX": REFUSED,
             "UDOCKER_TEST_DEFAULT_TARBALL": REFUSED + "/udocker-englib-1.2.11.tar.gz"}
    image = Image([Layer([d("etc"), f("etc/hello", "hi\n"), d("bin"),
                          f("bin/sh", "#!/bin/false\n", mode=0o755)], compression=None)],
                  config={"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]})
    w.archive = write_tar(os.path.join(base, "image.tar"),
                          docker_archive_files([(image, ["fz:latest"])]))
    w.template = os.path.join(base, "template")
    env = dict(w.env, UDOCKER_DIR=w.template)
    assert call(["load", "-i", w.archive], env)[0] == 0
    rc, out, err = call(["create", "--name=fzc", "fz:latest"], env)
    assert rc == 0, err
    w.cid = str(out.strip())
    _make_files(w)
    yield w
    _rmtree(base)


def _make_files(w):
    """Files of every kind that commands read: w.paths[kind] -> path (made again when a
    case changed them: save -o FILE, rmname PATH ...)."""
    _rmtree(w.files)
    os.makedirs(w.files)

    def put(name, data, mode=None):
        path = os.path.join(w.files, name)
        with open(path, "wb") as handle:
            handle.write(data)
        if mode is not None:
            os.chmod(path, mode)
        return path
    tar_bytes = open(w.archive, "rb").read()
    paths = {
        "dir": w.files,
        "missing": os.path.join(w.files, "no-such-file"),
        "missing_dir": os.path.join(w.files, "no-such-dir", "x"),
        "empty": put("empty", b""),
        "garbage": put("garbage", bytes(bytearray(random.Random(SEED).getrandbits(8)
                                                  for _ in range(3000)))),
        "text": put("text", b"hello\nworld\n"),
        "truncated": put("truncated.tar", tar_bytes[:len(tar_bytes) // 2]),
        "gzip_garbage": put("bad.tar.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 50 + b"junk" * 40),
        "xz_garbage": put("bad.tar.xz", b"\xfd7zXZ\x00" + b"junk" * 40),
        "bzip2_garbage": put("bad.tar.bz2", b"BZh9" + b"junk" * 40),
        "unreadable": put("unreadable", b"[DEFAULT]\n", 0),
        "nonutf8": put("nonutf8", b"caf\xe9 \xff\xfe\n"),
        "long": os.path.join(w.files, "n" * 300),
        "deep": os.path.join(w.files, *(["d" * 200] * 25)),
        "nonascii": put(native(b"caf\xc3\xa9.tar"), tar_bytes),
        "nonutf8name": put(native(b"bad\xff.tar"), tar_bytes),
    }
    notimage = os.path.join(w.files, "notimage.tar")
    with tarfile.open(notimage, "w") as tar:
        tar.add(paths["text"], "text")
    paths["notimage"] = notimage
    paths["rootfs"] = notimage                   # a valid rootfs tarball for import
    fifo = os.path.join(w.files, "fifo")
    os.mkfifo(fifo)
    paths["fifo"] = fifo
    loop = os.path.join(w.files, "loop")
    os.symlink(loop, loop)
    paths["loop"] = loop
    dangling = os.path.join(w.files, "dangling")
    os.symlink(paths["missing"], dangling)
    paths["dangling"] = dangling
    paths["devnull"] = "/dev/null"
    w.paths = paths
    w.snapshot = _snapshot(w.files)


def _tree(top):
    """What tells whether a case changed a directory tree (a case that changed nothing,
    most of them, leaves the repository to the next one)."""
    found = []
    for path, dirs, files in os.walk(top):
        for name in dirs + files:
            st = os.lstat(os.path.join(path, name))
            found.append((path, name, st.st_mode, st.st_ino, st.st_size, st.st_mtime))
    return sorted(found)


def _snapshot(directory):
    stats = [(name, os.lstat(os.path.join(directory, name))) for name in os.listdir(directory)]
    return sorted((name, st.st_mode, st.st_ino, st.st_size, st.st_mtime) for name, st in stats)


def odd_values(w):
    """Odd strings for any argument or option value (native str)."""
    return [
        "", " ", "-", "--", "---", "=", "x" * 5000, "\t", "a\nb", "\r\n", ".", "..",
        "../../../../etc/passwd", "/", "//", "/etc/passwd", "a/../b", "a//b", "a/", "/a",
        native(b"caf\xc3\xa9"), native(b"\xff\xfe"), native(b"\xe2\x80\xae\xe2\x80\x8b"),
        native(b"\x01\x02\x7f"), "%s%n%d", "$(id)", "`id`", "'\"", "\\", "*", "?",
        "UPPER:Tag", "a:b:c", ":", "::", "@", "a@", "a@sha256:1234", "a@sha256:" + "0" * 64,
        "a@md5:" + "0" * 32, "x:" + "t" * 200, "a b", "localhost:99999/x", "[::1]/x",
        "-1", "0", "99999999999999999999", "1e999", "nan", "inf", "0x10", "1.5", "+1",
        "linux/amd64/v1/x", "LINUX/AMD64", "os/", "/arch", "linux//amd64", "sha256:",
        w.cid[:8], w.cid + "x", "fz:", "fz:latest:x", "FZ", "fzc/..", "../fzc",
    ] + sorted(w.paths.values())


# -- running one case

@pytest.fixture
def runner(world, monkeypatch):
    """run(argv, env_overrides, expect, allow_many=False) -> failure text or None."""
    for name in list(os.environ):
        if name.startswith("UDOCKER_") and name != "UDOCKER_TEST_DEFAULT_TARBALL" or \
                name.lower() in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", world.home)
    monkeypatch.setenv("http_proxy", REFUSED)
    monkeypatch.setenv("https_proxy", REFUSED)

    def would_start(self, argv, env, cwd):
        raise WouldStart()
    # run: mode P1 with a proot that can do everything, stopped where it would start; the
    # CPU affinity checked but not set on this process
    monkeypatch.setattr(udocker.Supervisor, "run", would_start)
    monkeypatch.setattr(udocker, "choose_mode", lambda session, container, tools: "P1")
    monkeypatch.setattr(udocker.Tools, "proot", lambda self: ("/bin/true", {
        "kill_on_exit": True, "seccomp": True, "port": True, "netcoop": True, "statx": True}))
    monkeypatch.setattr(udocker, "set_cpu_affinity", lambda cpus: True)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    cwd = os.getcwd()
    case = os.path.join(world.base, "case")         # the working directory of a case
    topdir = os.path.join(world.base, "ud")         # its repository, a copy of the template
    state = {"tree": None}

    def run(argv, env=None, expect=ANY, allow_many=False, fresh=False, stdin=b""):
        """fresh: the template changed (copy it even if the last case changed nothing)."""
        if fresh or state["tree"] is None or _tree(topdir) != state["tree"]:
            _rmtree(topdir)
            shutil.copytree(world.template, topdir, symlinks=True)
            state["tree"] = None if fresh else _tree(topdir)
        if not os.path.isdir(case) or os.listdir(case):
            _rmtree(case)
            os.makedirs(case)
        environ = dict(world.env, UDOCKER_DIR=topdir)
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value.replace("@TOPDIR@", topdir)
        argv = [a.replace("@TOPDIR@", topdir) for a in argv]
        os.chdir(case)
        try:
            rc, out, err = call(argv, environ, stdin)
        finally:
            os.chdir(cwd)
            if _snapshot(world.files) != world.snapshot:
                _make_files(world)
        return judge(argv, env, expect, allow_many, rc, err)

    yield run
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _on_alarm(signum, frame):
    raise Hang()


def call(argv, environ, stdin=b""):
    """(status, stdout, stderr) of main(argv, environ); status is a string when something
    escaped main()."""
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = streams(stdin)
    level = udocker.MSG.level
    if os.geteuid() == 0:                       # (CI runs the tests as a user)
        argv = ["--allow-root"] + list(argv)
    signal.alarm(CASE_TIMEOUT)
    try:
        rc = udocker.main(list(argv), environ)
    except WouldStart:
        rc = 0
    except Hang:
        rc = "hung (more than %d s)" % CASE_TIMEOUT
    except BaseException as exc:
        rc = "raised %s: %s" % (type(exc).__name__, exc)
    finally:
        signal.alarm(0)
        udocker.MSG.level = level
        out, err = text_of(sys.stdout), text_of(sys.stderr)
        sys.stdin, sys.stdout, sys.stderr = saved
    return rc, out, err


# commands that take several targets and say what failed for each (as docker rm/rmi do)
MANY_TARGETS = ("rm", "rmi")


def judge(argv, env, expect, allow_many, rc, err):
    """None when the case behaved, else one line saying how it did not."""
    lines = err.rstrip("\n").split("\n") if err else []
    errors = [l for l in lines if l.startswith("Error:")]
    others = [l for l in lines if not l.startswith(("Error:", "Info:", "Warning:", "Debug:"))]
    problem = None
    if not isinstance(rc, int):
        problem = rc
    elif "Traceback" in err or "internal error" in err:
        problem = "internal error or traceback"
    elif others and rc != 0:           # (a run that starts prints its banner)
        problem = "stray stderr line: %r" % others[0][:200]
    elif rc != 0 and (not errors or len(errors) > 1 and not allow_many):
        problem = "status %d with %d Error lines" % (rc, len(errors))
    elif rc == 0 and errors:
        problem = "status 0 with an Error line"
    elif rc == 0 and expect == ERROR:
        problem = "status 0 on bad input"
    if problem is None:
        return None
    return "%s: argv=%r env=%r stderr=%r" % (problem, [a[:80] for a in argv],
                                             dict((k, v[:80]) for k, v in (env or {}).items()
                                                  if v is not None), err[-600:])


def check(results, total):
    failures = [r for r in results if r]
    assert not failures, "%d of %d cases misbehaved:\n%s" % (
        len(failures), total, "\n".join(failures[:40]))


# -- the cases

def _required(command):
    return [a for a in command.args if not a.startswith("[")]


def _variadic(command):
    return command.rest is not None or any(a.endswith("...") or a.endswith("...]")
                                           for a in command.args)


def valid_args(w, name):
    """Positional arguments that make a valid command line (as far as its arguments go)."""
    return {
        "help": [], "search": ["fz"], "pull": ["fz"], "create": ["fz:latest"],
        "run": ["fzc"], "rm": ["fzc"], "rmi": ["fz:latest"], "tag": ["fz:latest", "fz:two"],
        "inspect": ["fz:latest"], "verify": ["fz:latest"], "protect": ["fzc"],
        "unprotect": ["fzc"], "manifest": ["inspect", "fz"], "name": ["fzc", "other"],
        "rmname": ["fzc"], "rename": ["fzc", "newname"], "clone": ["fzc"],
        "export": ["fzc"], "import": [w.paths["rootfs"], "imp:1"], "load": [],
        "save": ["fz:latest"], "mkrepo": ["newrepo"], "setup": ["fzc"],
    }.get(name, [])


def valid_opts(w, name):
    """Options that some commands need so that their valid form has no side effect we
    cannot allow here (output to a terminal, reading stdin)."""
    return {"export": ["-o", "out.tar"], "save": ["-o", "out.tar"],
            "load": ["-i", w.archive]}.get(name, [])


def command_line_cases(w, name):
    """[(argv, expect)] for one command: structure (arguments and options) and odd values."""
    command = udocker.COMMANDS[name]
    args, base = valid_args(w, name), valid_opts(w, name)
    cases = []
    required = _required(command)
    for k in range(len(required)):                      # missing arguments
        if name == "manifest" and k == 1:
            cases.append(([name, "inspect"], ERROR))
            continue
        cases.append(([name] + base + args[:k], ERROR))
    if not _variadic(command) and name not in ("load", "export"):
        cases.append(([name] + base + args + ["extra"] * (len(command.args) + 1 - len(args)),
                      ERROR))
    for bogus in ("--bogus", "--bogus=1", "-Z", "-ZZ", "--", "---x", "--=", "-=x",
                  native(b"--caf\xc3\xa9"), native(b"-\xff")):
        if bogus == "--":
            continue
        cases.append(([name] + base + [bogus] + args, ERROR))
    for opt in command.opts:
        for spelling in opt.names:
            if opt.kind == udocker.FLAG:
                cases.append(([name] + base + [spelling + "=1"] + args, ERROR))
                cases.append(([name] + base + [spelling + "="] + args, ERROR))
            else:
                if command.rest is None:
                    cases.append(([name] + base + args + [spelling], ERROR))
                cases.append(([name] + base + [spelling, "--bogus"] + args, ERROR))
    values = odd_values(w)
    for value in values:                                # odd positional values
        for i in range(len(args)):
            wrong = list(args)
            wrong[i] = value
            cases.append(([name] + base + wrong, positional_expect(w, name, i, value)))
    rnd = random.Random("%s-%s" % (SEED, name))
    for opt in command.opts:                            # odd option values, a sample
        if opt.kind != udocker.FLAG:
            for value in ["", " ", "x" * 5000, native(b"\xff")] + rnd.sample(values, 16):
                cases.append(([name] + base + [opt.names[-1], value] + args,
                              option_expect(w, opt.dest, value)))
    return cases


# values that name an existing object, or are valid wherever an odd value goes
_EXISTING = ("fzc", "fz:latest")


def positional_expect(w, name, index, value):
    """ERROR where the odd value cannot name what the argument must name, else ANY."""
    names_existing = {"rm": 0, "rmi": 0, "tag": 0, "inspect": 0, "verify": 0, "protect": 0,
                      "unprotect": 0, "name": 0, "rmname": 0, "rename": 0, "clone": 0,
                      "export": 0, "save": 0, "setup": 0, "run": 0, "create": 0, "pull": 0,
                      "manifest": 1, "help": 0, "import": 0}
    tars = [w.paths[k] for k in ("notimage", "nonascii", "nonutf8name", "truncated")]
    if name == "import" and value in tars or value == "--" and name == "verify":
        return ANY                       # a rootfs tarball; verify -- verifies every image
    if names_existing.get(name) == index:
        return ERROR
    if name == "manifest" and index == 0:
        return ERROR
    return ANY


# validators of option values: a value they refuse must be refused by the command
VALIDATORS = {
    "platform": udocker.Platform.parse, "gpus": udocker.parse_gpus,
    "shm_size": lambda v: udocker.parse_size(v, "--shm-size"),
    "cpuset_cpus": udocker.parse_cpu_list, "publish": udocker.parse_publish,
    "pull": lambda v: ["missing", "never", "always", "reuse"].index(v),
    "execmode": lambda v: udocker.ENGINES[v.upper()],
}


def option_expect(w, dest, value):
    if dest in VALIDATORS:
        try:
            VALIDATORS[dest](value)
        except (udocker.UsageError, ValueError, KeyError):
            return ERROR
        return ANY
    missing = [w.paths[k] for k in ("missing", "missing_dir", "loop", "dangling", "long",
                                     "deep")] + [""]
    if dest in ("env_file", "input", "location", "device") and value in missing:
        return ERROR
    return ANY


def environment_cases(w):
    """[(argv, env, expect)]: every UDOCKER_* variable the configuration reads, odd values."""
    pool = odd_values(w)
    common = ["", " ", "x" * 5000, native(b"\xff"), native(b"caf\xc3\xa9"), "-1",
              "99999999999999999999", "nan", "a\nb", "/", "/proc/self", "/dev/null"] + \
        [w.paths[k] for k in ("dir", "missing", "fifo", "unreadable", "garbage")]
    cases = []
    for key, default, env in udocker.CONFIG_DEFAULTS:
        if not env:
            continue
        typed = isinstance(default, (bool, int, float))
        for value in common + random.Random("%s-%s" % (SEED, env)).sample(pool, 3):
            if typed:
                expect = ERROR if not _valid_typed(default, value) else ANY
            else:
                expect = ANY
            for argv in (["images"], ["showconf"]) if typed else (["images"], ["run", "fzc"]):
                cases.append((argv, {env: value}, expect))
    for value in common:
        for var in ("HOME", "TMPDIR", "PATH"):
            cases.append((["images"], {var: value}, ANY))
    return cases


def _valid_typed(default, value):
    try:
        udocker._typed("x", value, default)
    except udocker.ConfigurationError:
        return False
    return True


BAD_CONF = [          # refused by every command: the file cannot be used
    b"garbage without a section\n", b"[DEFAULT\n", b"[DEFAULT]\nkey\n",
    b"\xff\xfe\x00b\x00i\x00n\n", b"[DEFAULT]\nverbose_level = \xc3\xa9\n",
    b"[DEFAULT]\npull_parallel = x\n", b"[DEFAULT]\npull_parallel = 0\n",
    b"[DEFAULT]\nverbose_level = 1.5\n", b"[DEFAULT]\nautoinstall = maybe\n",
    b"[DEFAULT]\ncmd = [1, 2\n", b"[DEFAULT]\nsysdirs_list = [1, 2]\n",
    b"[DEFAULT]\ncmd = " + b"[" * 10000 + b"\n",
    b"[DEFAULT]\nvalid_host_env = [[]]\n", b"[DEFAULT]\ncmd = [1, null, {}]\n",
    b"[DEFAULT]\ncpu_affinity_exec_tools = [\"a\"]\n",
]
ODD_CONF = [          # may be refused, or used
    b"[DEFAULT]\n[DEFAULT]\n", b"[DEFAULT]\n  indented = 1\n", b"[DEFAULT]\na = 1\na = 2\n",
    b"[DEFAULT]\ntopdir = \xff\xfe\n", b"[DEFAULT]\ntimeout = nan\n",
    b"[DEFAULT]\ntimeout = inf\n", b"[DEFAULT]\ntimeout = 1e400\n",
    b"[DEFAULT]\nverbose_level = 99999999999999999999999\n",
    b"[DEFAULT]\ncmd = {\"a\": 1}\n", b"[DEFAULT]\ndefault_execution_mode = Z9\n",
    b"[DEFAULT]\nfallback_execution_modes = Z9\n", b"[DEFAULT]\ntmpdir = a\x00b\n",
    b"[DEFAULT]\nkeystore = /\n", b"[DEFAULT]\nx = %(y)s\n",
    b"[DEFAULT]\nhttp_proxy = %(y)s\n", b"[DEFAULT]\nuser_path = \n",
    b"[DEFAULT]\nrunc_map_subids = sometimes\n",
    b"[DEFAULT]\nuse_proot_executable = /nonexistent\n", b"[other]\nverbose_level = 1\n",
    b"[DEFAULT]\n" + b"a" * 100000 + b" = 1\n", b"\n" * 1000, b"[DEFAULT]\n;comment\n#c\n",
    b"[DEFAULT]\nverbose_level = -1\n", b"[DEFAULT]\nverbose_level = 0\n",
    b"[DEFAULT]\ntopdir = \n", b"[DEFAULT]\ntopdir = /dev/null\n",
    b"[DEFAULT]\ncontainersdir = /proc/self\n", b"[DEFAULT]\nlayersdir = relative\n",
    b"[DEFAULT]\ncmd = []\n", b"[DEFAULT]\nnvi_ldconfig = []\n",
    b"[DEFAULT]\npass_host_env = [\"*\"]\n",
]


def conf_cases():
    """[(where, data, argv, expect)]: a udocker.conf at each place it is read."""
    cases = []
    for data in BAD_CONF + ODD_CONF:
        for where in ("--config", "topdir", "home"):
            for argv in (["images"], ["showconf"], ["run", "fzc"], ["setup", "fzc"],
                         ["inspect", "fzc"]):
                cases.append((where, data, argv, ERROR if data in BAD_CONF else ANY))
    return cases


@pytest.mark.parametrize("name", sorted(udocker.COMMANDS))
def test_command_lines(runner, world, name):
    cases = command_line_cases(world, name)
    check([runner(argv, expect=expect, allow_many=name in MANY_TARGETS)
           for argv, expect in cases], len(cases))


@pytest.mark.parametrize("name", sorted(udocker.COMMANDS))
def test_random_command_lines(runner, world, name):
    """Seeded random words: options of the command (with and without values), odd values
    and valid arguments, in any order; only the consistency of the outcome is checked."""
    rnd = random.Random("%s-%s" % (SEED, name))
    command = udocker.COMMANDS[name]
    pool = odd_values(world) + valid_args(world, name) + list(_EXISTING)
    spellings = [n for o in command.opts for n in o.names]
    cases = []
    for _ in range(RANDOM_PER_COMMAND):
        words = list(valid_opts(world, name))
        for _ in range(rnd.randint(0, 5)):
            pick = rnd.random()
            if spellings and pick < 0.5:
                spelling = rnd.choice(spellings)
                if rnd.random() < 0.3:
                    spelling += "=" + rnd.choice(pool)
                words.append(spelling)
            else:
                words.append(rnd.choice(pool))
        cases.append([name] + words)
    check([runner(argv, allow_many=name in MANY_TARGETS) for argv in cases], len(cases))


def test_general_options(runner, world):
    cases = [(["--bogus", "images"], ERROR), (["--repo"], ERROR), (["--config"], ERROR),
             (["-q=1", "images"], ERROR), (["--insecure=yes", "images"], ERROR),
             (["--repo=", "images"], ANY), (["-", "images"], ERROR), ([""], ERROR),
             ([" "], ERROR), ([native(b"\xff")], ERROR), (["x" * 5000], ERROR),
             (["--help=1"], ERROR), (["--version", "bogus"], ERROR)]
    for value in odd_values(world):
        cases.append((["--repo", value, "images"], ANY))
        if value != world.paths["fifo"]:         # blocks with no writer, as cat does
            valid = ["/dev/null", world.paths["empty"]] + \
                [world.paths["unreadable"]] * (os.geteuid() == 0)   # root reads it
            cases.append((["--config", value, "images"], ANY if value in valid else ERROR))
        cases.append(([value], ERROR if value not in udocker.COMMANDS else ANY))
    check([runner(argv, expect=expect) for argv, expect in cases], len(cases))


def test_environment_values(runner, world):
    cases = environment_cases(world)
    check([runner(argv, env, expect) for argv, env, expect in cases], len(cases))


def test_configuration_files(runner, world, tmp_path):
    results = []
    cases = conf_cases()
    home = os.path.join(str(tmp_path), "confhome")
    os.makedirs(os.path.join(home, ".udocker"))
    in_topdir = os.path.join(world.template, "udocker.conf")
    for n, (where, data, argv, expect) in enumerate(cases):
        path = {"--config": os.path.join(str(tmp_path), "conf%d" % n), "topdir": in_topdir,
                "home": os.path.join(home, ".udocker", "udocker.conf")}[where]
        with open(path, "wb") as handle:
            handle.write(data)
        env = {"HOME": home} if where == "home" else {}
        argv = (["--config", path] if where == "--config" else []) + argv
        try:
            results.append(runner(argv, env, expect, fresh=where == "topdir"))
        finally:
            os.remove(path)
    check(results, len(cases))


def test_names_are_not_paths(runner, world, tmp_path):
    """rmname and rename took a path for NAME: a symlink anywhere was removed or moved into
    the repository (found by the fuzzer; kept as a regression with what it did)."""
    link = os.path.join(str(tmp_path), "link")
    os.symlink(world.template, link)
    for argv in (["rmname", link], ["rename", link, "newname"], ["rmname", "../../x"]):
        assert runner(argv, expect=ERROR) is None
        assert os.path.islink(link)


def _archive_variants(image):
    """(name, {member: bytes}, expect): docker-save and OCI archives with one thing wrong."""
    good = docker_archive_files([(image, ["ar:1"])])
    oci = docker_archive_files([(image, ["ar:1"])], style="oci")
    config = [k for k in good if k.endswith(".json") and "/" not in k and k != "manifest.json"]
    layer = [k for k in good if k.endswith("layer.tar")][0]

    def manifest(**change):
        doc = {"Config": config[0], "RepoTags": ["ar:1"], "Layers": [layer]}
        doc.update(change)
        return json.dumps([doc]).encode("ascii")

    def variant(base, **members):
        files = dict(base)
        for name, data in members.items():
            name = name.replace("__", ".").replace("_SLASH_", "/")
            if data is None:
                files.pop(name, None)
            else:
                files[name] = data
        return files
    cases = [(b, ERROR) for b in (b"", b"{", b"null", b"{}", b"[]", b"[1]", b"\xff\xfe",
                                  b'[{"Config": 1}]', b'"x"', b"[" * 10000)]
    out = [("manifest %r" % m[:20], variant(good, manifest__json=m), e) for m, e in cases]
    for change, expect in (
            ({"Config": "../../../etc/passwd"}, ERROR), ({"Config": "/etc/passwd"}, ERROR),
            ({"Config": "missing.json"}, ERROR), ({"Config": layer}, ERROR),
            ({"Layers": ["../../../etc/passwd"]}, ERROR), ({"Layers": [123]}, ERROR),
            ({"Layers": "x"}, ERROR), ({"Layers": ["missing/layer.tar"]}, ERROR),
            ({"Layers": [config[0]]}, ERROR), ({"Layers": []}, ANY),
            ({"Layers": [layer, layer]}, ANY), ({"RepoTags": ["BAD NAME:1"]}, ERROR),
            ({"RepoTags": [1]}, ERROR), ({"RepoTags": "ar:1"}, ERROR),
            ({"RepoTags": ["ar:" + "t" * 300]}, ERROR), ({"RepoTags": ["../x:1"]}, ERROR),
            ({"RepoTags": []}, ANY), ({"RepoTags": None}, ANY)):
        out.append(("manifest %r" % change, variant(good, manifest__json=manifest(**change)),
                    expect))
    for data, expect in ((b"[]", ERROR), (b"{", ERROR), (b"\xff", ERROR), (b"{}", ANY),
                         (b'{"rootfs": {"diff_ids": ["sha256:00"]}}', ANY)):
        out.append(("config %r" % data, variant(good, **{config[0].replace(".", "__"): data}),
                    expect))
    out.append(("layer garbage", variant(good, **{layer.replace("/", "_SLASH_").replace(
        ".", "__"): b"\x1f\x8bgarbage" * 10}), ANY))      # (a compressed layer is
    # checked when a container is made from it: load does not inflate it to tell)
    out.append(("no repositories", variant(good, repositories=None), ANY))
    out.append(("bad repositories", variant(good, repositories=b"{"), ANY))
    out.append(("no manifest", variant(good, manifest__json=None), ERROR))
    for name, data, expect in (("index__json", b"{", ERROR), ("index__json", b"[]", ERROR),
                               ("oci-layout", b"{", ANY), ("index__json", None, ANY),
                               ("manifest__json", None, ANY)):
        out.append(("oci %s %r" % (name, data), variant(oci, **{name: data}), expect))
    out.append(("oci no blobs", dict((k, v) for k, v in oci.items()
                                     if not k.startswith("blobs/")), ERROR))
    return out


def test_malformed_archives(runner, world, tmp_path):
    """load -i of docker-save and OCI archives with a broken manifest, config, layer list,
    tags, or missing members."""
    image = Image([Layer([f("etc/x", "x\n")], compression=None)])
    results, variants = [], _archive_variants(image)
    for n, (what, files, expect) in enumerate(variants):
        path = write_tar(os.path.join(str(tmp_path), "a%d.tar" % n), files)
        failure = runner(["load", "-i", path], expect=expect)
        results.append(failure and "%s: %s" % (what, failure))
    check(results, len(variants))


ENV_FILES = [(b"=x\n", ERROR), (b"1A=2\n", ANY), (b"A B=1\n", ERROR), (b"\xff\xfe=1\n", ANY),
             (b"A=\xff\n", ANY), (b"export\n", ANY), (b"export A B\n", ANY), (b"A=1\r\n", ANY),
             (b"#c\n\n  \n", ANY), (b"A=" + b"x" * 200000 + b"\n", ANY), (b"\x00\x01", ANY),
             (b"A\n", ANY), (b"-A=1\n", ANY), (b"A-B=1\n", ANY)]


def test_malformed_env_files(runner, world, tmp_path):
    results = []
    for n, (data, expect) in enumerate(ENV_FILES):
        path = os.path.join(str(tmp_path), "env%d" % n)
        with open(path, "wb") as handle:
            handle.write(data)
        results.append(runner(["run", "--env-file", path, "fzc"], expect=expect))
    for data in (b"=x", b"1A=2", b"A B=1", native(b"\xff=1"), "A=" + "x" * 5000, "", "-e"):
        value = data if isinstance(data, str) else native(data)
        results.append(runner(["run", "-e", value, "fzc"], expect=ANY))
    check(results, len(results))


def test_standard_input(runner, world):
    """What load, import and login read from standard input."""
    tar = open(world.archive, "rb").read()
    inputs = [(b"", ERROR), (b"garbage" * 100, ERROR), (tar[:1000], ERROR),
              (tar[:len(tar) // 2], ERROR), (b"\x1f\x8b" + b"\x00" * 100, ERROR),
              (b"BZh9" + b"x" * 100, ERROR), (b"\xfd7zXZ\x00" + b"x" * 100, ERROR),
              (b"\x28\xb5\x2f\xfd" + b"x" * 100, ERROR), (tar, ANY)]
    cases = []
    for data, expect in inputs:
        cases += [(["load"], data, expect), (["load", "-"], data, expect),
                  (["load", "-i", "-"], data, expect),
                  # a truncated tar is imported: only its first member is checked
                  (["import", "-", "imp:1"], data, ANY if data[:4] == tar[:4] else expect),
                  (["import", "--tocontainer", "-"], data, ANY if data == tar else expect)]
    for data in (b"", b"\n", b"\xff\xfe\n", b"x" * 100000, b"\x00\n"):
        cases += [(["login", "--username", "u", "--password-stdin"], data, ANY),
                  (["login", "--password", "p"], data, ANY), (["login"], data, ERROR)]
    check([runner(argv, expect=expect, stdin=data) for argv, data, expect in cases],
          len(cases))
