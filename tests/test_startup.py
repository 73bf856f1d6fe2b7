# -*- coding: utf-8 -*-
"""Section 13, the start-up cache: what the launcher runs instead of the whole module.

udocker.py's launcher (its sh line) runs a cached start-up code and loads each section's
functions and classes (a chapter) on first use. These tests start udocker.py through the
launcher's own program with the test's interpreter (tests/support/runner.py does so for
every test); Python 2.7 always imports the whole module.
"""

from __future__ import print_function, absolute_import, division

import ast
import os
import shutil
import subprocess
import sys
import threading

import pytest

from support import UDOCKER_SCRIPT, launcher_code
from support.runner import Udocker

import udocker

PY3 = sys.version_info[0] >= 3
needs_cache = pytest.mark.skipif(not PY3, reason="Python 2.7 imports the whole module")


def cache_path(script):
    folder, name = os.path.split(script)
    return os.path.join(folder, "__pycache__", "%s.%s.chapters"
                        % (name[:-3], sys.implementation.cache_tag))


def start_report(result):
    """What -D said of the start: None (not used) or the chapters loaded, in order."""
    lines = [l for l in result.err.splitlines() if l.startswith("Debug: start-up cache: ")]
    assert len(lines) == 1, result
    text = lines[0].split(": ", 2)[2]
    if text == "not used":
        return None
    assert text.startswith("chapters loaded: ") and text.endswith(" ms)"), text
    return text[len("chapters loaded: "):].rsplit(" (", 1)[0].split()


@pytest.fixture
def copy(tmpdir):
    """A private copy of udocker.py (its own __pycache__) and a runner for it."""
    script = str(tmpdir.join("bin", "udocker.py"))
    os.makedirs(os.path.dirname(script))
    shutil.copy2(UDOCKER_SCRIPT, script)
    run = Udocker(str(tmpdir.join("t")), script=script, allow_root=True)
    return script, run


def test_the_launcher_program_is_found():
    code = launcher_code(UDOCKER_SCRIPT)
    assert code and "ChapterCache.write" in code and "exit_now" in code


@needs_cache
def test_the_first_start_builds_the_cache_and_the_next_runs_from_it(copy):
    script, run = copy
    assert not os.path.exists(cache_path(script))
    first = run("-D", "version")
    assert first.rc == 0 and start_report(first) is None, first
    assert os.path.isfile(cache_path(script))
    second = run("-D", "version")
    assert second.rc == 0 and second.out == first.out, second
    loaded = start_report(second)
    assert loaded is not None and "6" not in loaded and "8" not in loaded, second


def test_python_2_imports_the_whole_module(copy):
    if PY3:
        pytest.skip("Python 3 runs from the cache")
    script, run = copy
    for _ in range(2):
        result = run("-D", "version")
        assert result.rc == 0 and start_report(result) is None, result
    assert not os.path.exists(os.path.join(os.path.dirname(script), "__pycache__",
                                           "udocker.chapters"))


@pytest.mark.parametrize("where", ["working directory", "udocker.py's directory"])
def test_modules_beside_the_user_do_not_shadow_the_standard_library(copy, tmpdir, where):
    """A json.py or shutil.py in the directory a user works in, or beside udocker.py in
    ~/bin, is not what udocker.py imports: neither directory is on its sys.path."""
    script, run = copy
    folder = str(tmpdir.join("work")) if where == "working directory" else os.path.dirname(script)
    if not os.path.isdir(folder):
        os.makedirs(folder)
    for name in ("json", "_json", "shutil", "tarfile", "hashlib", "uuid", "random"):
        with open(os.path.join(folder, name + ".py"), "w") as handle:
            handle.write("raise SystemExit('shadowed: %s')\n" % name)
    for args in (("version",), ("version",), ("import", "/nonexistent.tar", "x:1"),
                 ("create", "--name=c1", "nosuch:1"), ("showconf",)):
        result = run(*args, cwd=folder)
        assert "shadowed" not in result.out + result.err, result
    assert run("version", cwd=folder).rc == 0


def test_a_renamed_copy_leaves_stdin_alone(tmpdir):
    """udocker-0.1.py (no module name: run as a script) reads nothing of its standard input
    before its command does (the launcher once opened fd 0 as its cache and read a line)."""
    script = str(tmpdir.join("udocker-0.1.py"))
    shutil.copy2(UDOCKER_SCRIPT, script)
    run = Udocker(str(tmpdir.join("t")), script=script, allow_root=True)
    data = tmpdir.join("stdin")
    data.write("12\nthe command's input\n")
    with open(str(data), "rb") as stdin:
        with open(os.devnull, "wb") as null:
            assert subprocess.call(run.argv(["version"]), env=run.environ(), stdin=stdin,
                                   stdout=null) == 0
        assert os.lseek(stdin.fileno(), 0, os.SEEK_CUR) == 0


@pytest.mark.skipif(sys.version_info < (3, 7), reason="-X importtime: 3.7+")
def test_a_start_imports_neither_os_nor_what_it_brings(copy):
    """python -S (as the launcher runs) starts without os; udocker.py's LeanOs keeps it so:
    os with posixpath, stat and _collections_abc is ~1 ms."""
    script, run = copy
    assert run("version").rc == 0                                   # the cache is built
    argv = run.argv(["version"])
    proc = subprocess.Popen(argv[:1] + ["-S", "-X", "importtime"] + argv[1:],
                            env=run.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = proc.communicate()[1].decode()
    imported = [l.rsplit("|", 1)[1].strip() for l in err.splitlines()
                if l.startswith("import time:") and "|" in l]
    assert proc.returncode == 0 and "marshal" in imported, err
    assert not set(imported) & set(["os", "posixpath", "stat", "_collections_abc"]), imported


@needs_cache
def test_a_path_with_dots_runs_from_the_cache_beside_the_file(copy, tmpdir):
    """The launcher's short way (the cache beside the file, the path as given) and its
    long way (the path made plain first) find the same cache."""
    script, run = copy
    assert run("version").rc == 0                                 # builds it
    built = os.stat(cache_path(script))
    folder = os.path.dirname(script)
    dotted = os.path.join(folder, "..", os.path.basename(folder), ".", "udocker.py")
    result = Udocker(str(tmpdir.join("t")), script=dotted, allow_root=True)("-D", "version")
    assert result.rc == 0 and start_report(result) is not None, result
    assert os.stat(cache_path(script)).st_mtime_ns == built.st_mtime_ns     # not rebuilt


@needs_cache
def test_a_changed_file_is_never_run_from_an_old_cache(copy):
    script, run = copy
    assert run("version").rc == 0 and run("version").rc == 0
    with open(script) as handle:
        text = handle.read()
    assert '__version__ = "' in text
    with open(script, "w") as handle:       # same size: the new mtime alone must tell
        handle.write(text.replace('__version__ = "', '__version__ = "9', 1)[:-1])
    result = run("-D", "version")
    assert result.rc == 0 and "udocker.py: 9" in result.out, result
    assert start_report(result) is None                  # rebuilt, not used
    result = run("-D", "version")
    assert "udocker.py: 9" in result.out and start_report(result) is not None, result


@needs_cache
@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "directory"])
def test_a_damaged_cache_is_rebuilt(copy, damage):
    script, run = copy
    assert run("version").rc == 0
    path = cache_path(script)
    with open(path, "rb") as handle:
        data = handle.read()
    os.remove(path)
    if damage == "directory":
        os.mkdir(path)
    else:
        with open(path, "wb") as handle:
            handle.write({"empty": b"", "garbage": b"12\nnot marshal data",
                          "truncated": data[:len(data) // 2]}[damage])
    result = run("-D", "images")
    assert result.rc == 0 and start_report(result) is None, result
    if damage != "directory":
        assert start_report(run("-D", "images")) is not None


@needs_cache
@pytest.mark.parametrize("damaged", ["a chapter", "run's group"])
def test_a_chapter_damaged_in_place_is_one_error_line_and_removed(copy, damaged):
    script, run = copy
    assert run("version").rc == 0
    path = cache_path(script)
    import marshal
    with open(path, "r+b") as handle:
        key, start, (names, index, groups) = marshal.loads(handle.read(int(handle.readline())))
        if damaged == "a chapter":
            offset, size = index[names["Config"]][1:]      # what every command loads
        else:
            offset, size = groups["run"][-1]                 # (its last part)
        handle.seek(handle.tell() + offset)
        handle.write(b"\xff" * size)                       # same size: the check passes
    result = run(*(["images"] if damaged == "a chapter" else ["run", "nosuch"]))
    assert result.rc == 1 and "Traceback" not in result.err, result
    assert result.err.startswith("Error: the start-up cache ") and "damaged" in result.err
    assert len(result.err.splitlines()) == 1 and not os.path.exists(path)
    assert run("version").rc == 0 and run("images").rc == 0     # rebuilt


@needs_cache
def test_a_read_only_directory_keeps_the_cache_in_home(copy):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    script, run = copy
    folder = os.path.dirname(script)
    os.chmod(folder, 0o555)
    try:
        assert run("version").rc == 0
        result = run("-D", "version")
    finally:
        os.chmod(folder, 0o755)
    assert start_report(result) is not None, result
    assert not os.path.exists(os.path.join(folder, "__pycache__"))
    assert os.path.isdir(os.path.join(run.home, ".cache", "udocker.py") + folder)


@needs_cache
def test_an_unwritable_cache_place_costs_no_build(copy, monkeypatch):
    """Nowhere to keep the cache: each start imports the module, without building one."""
    script, run = copy
    builds = []
    monkeypatch.setattr(udocker.ChapterCache, "build",
                        classmethod(lambda cls, *args: builds.append(args)))
    folder = os.path.dirname(cache_path(script))
    os.makedirs(folder)
    os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("root writes anywhere")
        assert udocker.ChapterCache.write(script, cache_path(script)) is False
    finally:
        os.chmod(folder, 0o755)
    assert builds == []
    assert udocker.ChapterCache.write(script, cache_path(script)) is False    # writable:
    assert len(builds) == 1                      # built (this stand-in's None fails after)


@needs_cache
def test_a_build_that_fails_anyhow_writes_nothing(tmpdir, monkeypatch):
    """Whatever goes wrong in building the cache (a bug, an interpreter we did not try),
    write() says False and leaves nothing: the start that tried runs from the module."""
    def broken(cls, *args):
        raise RuntimeError("boom")
    monkeypatch.setattr(udocker.ChapterCache, "build", classmethod(broken))
    path = str(tmpdir.join("c", "udocker.chapters"))
    assert udocker.ChapterCache.write(UDOCKER_SCRIPT, path) is False
    assert os.listdir(os.path.dirname(path)) == ["udocker.chapters.lock"]


@needs_cache
def test_start_up_code_that_fails_runs_the_command_from_the_module(copy):
    script, run = copy
    with open(script) as handle:
        text = handle.read()
    with open(script, "w") as handle:        # the start-up code's install() call now fails
        handle.write(text.replace("def install(cls, namespace):", "def install2(cls, ns):"))
    for _ in range(2):
        result = run("-D", "version")
        assert result.rc == 0 and "udocker.py: " in result.out, result
        assert start_report(result) is None


@needs_cache
def test_one_builder_at_a_time(copy):
    """While one start builds the cache, the others run from the module and build nothing."""
    import fcntl
    script, run = copy
    path = cache_path(script)
    os.makedirs(os.path.dirname(path))
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        result = run("-D", "version")
        assert result.rc == 0 and start_report(result) is None, result
        assert not os.path.exists(path)
    assert run("version").rc == 0 and os.path.isfile(path)


# -- the cache's content, in-process

def build(source=None):
    if source is None:
        with open(UDOCKER_SCRIPT, "rb") as handle:
            source = handle.read()
    return udocker.ChapterCache.build(source, UDOCKER_SCRIPT)


@needs_cache
def test_every_definition_is_in_the_start_code_or_in_one_chapter():
    start, names, chapters = build()
    with open(UDOCKER_SCRIPT, "rb") as handle:
        tree = ast.parse(handle.read())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    deferred = set(names)
    assert deferred < set(defined) and len(deferred) > len(defined) // 2
    assert set(names.values()) == set(chapters)
    start_names = set(start.co_names)
    for name in ("Deferred", "ChapterLoader", "UdockerError", "UsageError", "Messages"):
        assert name not in deferred and name in start_names
    for chapter, (needs, code) in chapters.items():
        assert chapter not in needs and set(needs) <= set(chapters)


@needs_cache
def test_loading_every_chapter_gives_the_module(tmpdir):
    """The start-up code, then every chapter: the same names, none left deferred, and the
    same behaviour for a few of them."""
    path = str(tmpdir.join("udocker.py"))
    shutil.copy2(UDOCKER_SCRIPT, path)
    assert udocker.ChapterCache.write(path, path + ".chapters")
    namespace = load_from_cache(path)
    loader = namespace["__chapters__"]
    assert isinstance(namespace["Flattener"], udocker_deferred(namespace))
    for chapter in list(loader.chapters):
        loader.load(chapter)
    assert not loader.chapters
    public = set(n for n in vars(udocker) if not n.startswith("__"))
    assert public == set(n for n in namespace if not n.startswith("__"))
    assert not [n for n, v in namespace.items() if isinstance(v, udocker_deferred(namespace))]
    assert namespace["version_tuple"]("1.2.11") == (1, 2, 11)
    assert namespace["ImageRef"].parse("busybox").tag == "latest"


def load_from_cache(path):
    """What the launcher does with a cache file: the module's namespace."""
    import marshal
    stream = open(path + ".chapters", "rb")
    key, start, table = marshal.loads(stream.read(int(stream.readline())))
    assert key[2] == os.path.getsize(path + ".chapters") - stream.tell()
    namespace = {"__name__": "udocker_cached", "__file__": path,
                 "__chapters__": (stream,) + table}
    exec(start, namespace)
    return namespace


def udocker_deferred(namespace):
    return namespace["Deferred"]


@needs_cache
def test_a_stored_deferred_works_and_threads_load_a_chapter_once(tmpdir):
    path = str(tmpdir.join("udocker.py"))
    shutil.copy2(UDOCKER_SCRIPT, path)
    assert udocker.ChapterCache.write(path, path + ".chapters")
    namespace = load_from_cache(path)
    loader = namespace["__chapters__"]
    engine = namespace["ENGINES"]["P1"]                   # stored at start-up: a Deferred
    assert isinstance(engine, namespace["Deferred"])
    with pytest.raises(AttributeError):                   # a tuple's own names go through
        engine.index
    assert engine.mode == "P1"                            # an attribute loads its chapter
    assert namespace["ProotEngine"].mode == "P1"          # and the name is the class now
    results, barrier = [], threading.Event()

    def parse():
        barrier.wait()
        results.append(namespace["ImageRef"].parse("a/b:c").tag)
    threads = [threading.Thread(target=parse) for _ in range(8)]
    for thread in threads:
        thread.start()
    barrier.set()
    for thread in threads:
        thread.join()
    assert results == ["c"] * 8
    assert len(loader.loaded) == len(set(loader.loaded))


@needs_cache
def test_a_cold_function_or_method_loads_alone_once_on_first_use(tmpdir, monkeypatch):
    """ChapterCache.COLD: the chapters hold a stand-in, which loads the def alone and
    replaces itself (in its class, or as the global name) whichever way it is reached: a
    classmethod, a staticmethod, a method through a subclass, a function called through a
    reference kept before; a special method or a property listed stays as it is."""
    path = str(tmpdir.join("udocker.py"))
    shutil.copy2(UDOCKER_SCRIPT, path)
    monkeypatch.setattr(udocker.ChapterCache, "COLD", frozenset([
        "version_tuple", "Platform.parse", "Platform.matches", "Platform.__str__",
        "ChapterCache.group_order", "LocalImage.ref"]))
    assert udocker.ChapterCache.write(path, path + ".chapters")
    namespace = load_from_cache(path)
    loader, cold = namespace["__chapters__"], namespace["Cold"]
    for name in ("Platform", "version_tuple", "LocalImage"):
        loader.load(loader.names[name])
    platform = namespace["Platform"]
    assert isinstance(vars(platform)["parse"], cold)
    assert isinstance(vars(platform)["matches"], cold)
    assert not isinstance(vars(platform)["__str__"], cold)
    assert isinstance(vars(namespace["LocalImage"])["ref"], property)
    kept = namespace["version_tuple"]
    assert isinstance(kept, cold)
    assert kept.__name__ == "version_tuple"
    assert kept("1.2.11") == (1, 2, 11) and kept("1.3") == (1, 3)
    assert namespace["version_tuple"] is not kept and \
        namespace["version_tuple"]("2.0") == (2, 0)
    host = platform.parse("linux/amd64")
    assert (host.os, host.arch) == ("linux", "amd64")

    class Sub(platform):
        pass
    assert Sub("linux", "arm64", "v8").matches("linux", "arm64", "v8")
    assert not Sub("linux", "arm64").matches("linux", "amd64")
    assert not isinstance(vars(platform)["matches"], cold)
    assert namespace["ChapterCache"].group_order(["2", "1"], {"1": ((), b""),
                                                              "2": (("1",), b"")}) == ["1", "2"]
    alone = [name for name in loader.loaded if name.endswith("()")]
    assert sorted(alone) == ["ChapterCache.group_order()", "Platform.matches()",
                             "Platform.parse()", "version_tuple()"]


def test_a_group_is_read_in_parts_under_the_malloc_mmap_threshold():
    chapters = {"1": ((), b"x" * 60000), "2": ((), b"x" * 50000), "3": ((), b"x" * 200000),
                "4": ((), b"x" * 10)}
    parts = udocker.ChapterCache.group_parts(["1", "2", "3", "4"], chapters)
    assert parts == [["1"], ["2"], ["3"], ["4"]]
    assert udocker.ChapterCache.group_parts(["4", "1", "2"], chapters) == [["4", "1"], ["2"]]


@needs_cache
def test_every_cold_name_is_a_def_a_stand_in_replaces():
    """No name in ChapterCache.COLD is stale (renamed, moved to the start-up code) or one a
    stand-in cannot replace: each has its own code in the cache."""
    with open(UDOCKER_SCRIPT, "rb") as handle:
        source = handle.read()
    cold = []
    udocker.ChapterCache.build(source, UDOCKER_SCRIPT, cold)
    assert len(cold) == len(udocker.ChapterCache.COLD)


@needs_cache
def test_what_cannot_be_deferred_stays_in_the_start_code():
    """Names used in `except`, as isinstance's class (directly or through a tuple bound at
    the top level), bound twice, or used while the module loads: never a Deferred."""
    source = b'''
# ==== 1. Compat ====
class Deferred(object):
    pass
class ChapterLoader(object):
    @classmethod
    def install(cls, namespace):
        pass
# ==== 2. Errors ====
class CaughtError(Exception):
    pass
class InTuple(Exception):
    pass
ERRORS = (InTuple, OSError)
class Checked(object):
    pass
def twice():
    pass
def twice():
    pass
def helper():
    return 1
def called_at_load():
    return helper()
VALUE = called_at_load()
class Base(object):
    pass
def stored():
    pass
TABLE = {"s": stored}
# ==== 3. Later ====
class Child(Base):
    pass
def user(x):
    try:
        return isinstance(x, Checked)
    except CaughtError:
        return None
    except ERRORS:
        return None
'''
    start, names, chapters = udocker.ChapterCache.build(source, "x.py")
    assert set(names) == set(["Base", "stored", "Child", "user"]), names
    assert names["Child"] == "3" and chapters["3"][0] == ("2",)   # its base, loaded first


@needs_cache
def test_chapters_that_need_each_other_are_refused():
    source = b'''
class Deferred(object):
    pass
class ChapterLoader(object):
    pass
# ==== 1. One ====
class A(object):
    pass
class B2(object):
    pass
# ==== 2. Two ====
class B(A):
    pass
class A2(B):
    pass
# ==== 3. Three ====
class C(B2, A2):
    pass
'''
    udocker.ChapterCache.build(source, "x.py")            # no cycle: 3 needs 1 and 2
    with pytest.raises(ValueError):
        udocker.ChapterCache.build(source.replace(b"class B2(object)", b"class B2(B)"), "x.py")
