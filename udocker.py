#!/bin/sh
# -*- coding: utf-8 -*-
# ./udocker.py starts here as a shell script that runs Python on this file, never recompiled
# at every start. Python 3 runs the start-up cache of section 13 (__pycache__/udocker.TAG.
# chapters, or under ~/.cache/udocker.py where this directory is not writable): the code
# every command runs at start, each section's functions and classes loaded on first use.
# Without a current cache it imports the module (its cached bytecode) and builds one;
# Python 2.7 always imports the module. The program tries the cache beside the file first;
# all else is a string it runs only when that fails (compiling it all at every start cost
# 0.83M instructions, ~0.2 ms). A file name that is no module name (udocker-0.1.py,
# udocker.v2.py) is run as a script instead. To Python the line is a string. Neither the
# working directory nor this file's directory is left on sys.path: a json.py or shutil.py
# there would be imported instead of the standard library's (and an extension module's
# first import would list a user's data directory).
# The cyclic garbage collector is off while the module loads and what it made is frozen
# (gc.freeze, 3.7+) before it is back on: otherwise it walks the module's new objects several
# times, ~15% of the import's instructions, and finds nothing to free.
''''true; for p in python3 python python2; do command -v "$p" >/dev/null 2>&1 && exec "$p" -S -c '
import gc,sys,posix as o;gc.disable();sys.dont_write_bytecode=False;p=sys.argv.pop(1);n=0;"" in sys.path and sys.path.remove("")
try:
 import marshal;a=p[:1]=="/" and p or o.getcwd()+"/"+p;d,f=a.rsplit("/",1);n=f[:-3];s=o.stat(a)
 r=open("%s/__pycache__/%s.%s.chapters"%(d,n,sys.implementation.cache_tag),"rb");k,b,t=marshal.loads(r.read(int(r.readline())))
 if k!=(s.st_mtime_ns,s.st_size,o.fstat(r.fileno()).st_size-r.tell()):raise OSError
 m=sys.modules[n]=type(sys)(n);m.__file__=a;m.__chapters__=(r,)+t;exec(b,m.__dict__)
except Exception:
 sys.modules.pop(n,None);exec("""q=[];c=h=0
for x in (p[:1]!="/" and o.getcwd()+"/"+p or p).split("/"):x==".." and q and q.pop() or x in("",".","..") or q.append(x)
p="/"+"/".join(q);d,f=p.rsplit("/",1);d=d or "/";n=f[:-3];w=o.access(d,2)
m=f.endswith(".py") and n.replace("_","a").isalnum() and not n[0].isdigit()
if m and sys.version_info[0]>2:h=(o.environ.get(b"HOME") or __import__("pwd").getpwuid(o.getuid()).pw_dir.encode()).decode(sys.getfilesystemencoding(),"surrogateescape").rstrip("/")+"/.cache/udocker.py";c="%s/%s.%s.chapters"%(w and d+"/__pycache__" or h+d,n,sys.implementation.cache_tag)
getattr(sys,"pycache_prefix",0) is None and not w and h and setattr(sys,"pycache_prefix",h)
try:
 import marshal;s=o.stat(p);r=open(c or "/","rb");k,b,t=marshal.loads(r.read(int(r.readline())))
 if k!=(s.st_mtime_ns,s.st_size,o.fstat(r.fileno()).st_size-r.tell()):raise OSError
 m=sys.modules[n]=type(sys)(n);m.__file__=p;m.__chapters__=(r,)+t;exec(b,m.__dict__)
except Exception:
 sys.modules.pop(n,None);sys.path.insert(0,d);m=m and __import__(n);sys.path.remove(d);c and m.ChapterCache.write(p,c)""")
getattr(gc,"freeze",int)();gc.enable();m.exit_now(m.main()) if m else __import__("runpy").run_path(p,run_name="__main__")
' "$0" "$@"; done; echo "udocker.py: no python found" >&2; exit 127 # '''  # noqa: E501
# udocker.py: pull Docker/OCI images and run them as an ordinary user.
#
# One file, standard library only, Python 2.7 and 3.6+. A drop-in for udocker 1.3:
# the same commands, options, environment, udocker.conf and ~/.udocker layout.
#
# Contents (each section opens with a banner "# ==== N. NAME ====", in data-flow order):
#   1. Compat                  one spelling of every name that differs between Python 2 and 3;
#                              os without importing os (LeanOs); modules and chapters
#                              (section 13) loaded on first use
#   2. Errors and messages     the exception tree and the message printer
#   3. Configuration           defaults, udocker.conf files, environment, options -> Config
#   4. Files, processes, host  atomic writes, locks, hashing, host platform
#      4.1 Reading files
#      4.2 Writing files atomically, removing trees
#      4.3 Locks and work directories
#      4.4 Programs, hashing, the host platform
#   5. Local repository        the ~/.udocker tree: image tags, layers, containers, keystore
#      5.1 Images
#      5.2 The repository
#      5.3 Containers
#      5.4 Credentials
#   6. Registry client         image references, HTTP, auth, manifests, parallel verified pulls
#   7. Image formats           docker-save and OCI layout archives
#   8. Container creation      safe flattening of layers into containers/ID/ROOT
#   9. Execution engines       P1/P2 proot, R1-R3 runc/crun, F1-F4 fakechroot, S1 singularity
#      9.1 Helpers             fast JSON, probe commands, prctl and seccomp, the process tree
#      9.2 Introspection       a container tree: paths, ELF files, C library, loader, users
#        9.2.1 Paths and users
#        9.2.2 ELF files, the C library, the loader
#      9.3 Run plan            what every mode shares -> RunPlan (Engine), applied in one place
#        9.3.1 Volumes, the container, its users
#        9.3.2 The host's NVIDIA driver
#        9.3.3 The plan, and what every engine shares (Engine)
#      9.4 Supervision         the engine as our child: signals, leftovers, exit status
#      9.5 Engines             one class per mode (ENGINES)
#        9.5.1 PRoot: P1, P2
#        9.5.2 runc and crun: R1, R2, R3
#        9.5.3 Fakechroot: F1, F3
#        9.5.4 Fakechroot's ELF patching, its own loader: F2, F4
#        9.5.5 Singularity: S1
#      9.6 Mode choice         setup --execmode, probes, fallback modes, engine_for
#  10. Tools installer         the tools tarball: fetch, verify, install
#      10.1 Fetching, verifying, unpacking
#      10.2 Finding the tools: probes, Tools
#  11. Command line            the command table, the parser and one function per command
#      11.1 Options, the command table, the session
#      11.2 Image and registry commands
#      11.3 run
#      11.4 Container and tools commands
#      11.5 General options and help
#  12. main                    argv -> exit code
#  13. Start-up cache          the launcher's cache: start-up code, and chapters loaded on use
#
# Bytes and text: registry bodies, digests being computed and tar member names are bytes
# until parsed; messages, JSON documents and paths are text (native str).

# No `from __future__ import`: it imports the __future__ module at every start (~0.3 ms), and
# none is needed: nothing prints with print (tests/test_cli.py checks), every / has a float
# operand, and a module outside a package imports absolutely on Python 2 too.

import errno
import fcntl
import gc
import sys
import time

__version__ = "0.1.0"           # udocker.py's own version
COMPAT_VERSION = "1.3.17"        # the udocker release whose interface we reproduce
__program__ = "udocker.py"
TOOLS_MIN_VERSION = "1.2.11"     # oldest tools tarball (lib/VERSION) we accept

# ==== 1. Compat ====
# Every Python 2/3 difference is decided here, once; the rest of the file uses these names.

PY3 = sys.version_info[0] >= 3


class LeanPath(type(sys)):
    """posixpath's functions that a start uses, as posixpath has them (text or bytes); any
    other name comes from posixpath itself (which imports os)."""

    def __getattr__(self, name):
        return getattr(__import__("posixpath"), name)

    @staticmethod
    def _sep(path):
        return b"/" if isinstance(path, bytes) else "/"

    @staticmethod
    def _dots(path):
        return (b".", b"..") if isinstance(path, bytes) else (".", "..")

    @staticmethod
    def join(a, *p):
        sep, path = LeanPath._sep(a), a
        for b in p:
            if b.startswith(sep):
                path = b
            elif not path or path.endswith(sep):
                path += b
            else:
                path += sep + b
        return path

    @staticmethod
    def split(p):
        sep = LeanPath._sep(p)
        i = p.rfind(sep) + 1
        head, tail = p[:i], p[i:]
        if head and head != sep * len(head):
            head = head.rstrip(sep)
        return head, tail

    @staticmethod
    def dirname(p):
        return LeanPath.split(p)[0]

    @staticmethod
    def basename(p):
        return p[p.rfind(LeanPath._sep(p)) + 1:]

    @staticmethod
    def isabs(p):
        return p.startswith(LeanPath._sep(p))

    @staticmethod
    def normpath(path):
        sep, (dot, dotdot) = LeanPath._sep(path), LeanPath._dots(path)
        if not path:
            return dot
        initial = 2 if path.startswith(sep * 2) and not path.startswith(sep * 3) else \
            1 if path.startswith(sep) else 0                 # POSIX keeps exactly two
        parts = []
        for part in path.split(sep):
            if not part or part == dot:
                continue
            if part != dotdot or (not initial and not parts) or (parts and parts[-1] == dotdot):
                parts.append(part)
            elif parts:
                parts.pop()
        return (sep * initial + sep.join(parts)) or dot

    @staticmethod
    def abspath(path):
        if not LeanPath.isabs(path):
            path = LeanPath.join(os.getcwdb() if isinstance(path, bytes) else os.getcwd(), path)
        return LeanPath.normpath(path)

    @staticmethod
    def _mode(path, follow=True):
        try:
            return (os.stat if follow else os.lstat)(path).st_mode
        except (OSError, ValueError):
            return None

    @staticmethod
    def exists(path):
        return LeanPath._mode(path) is not None

    @staticmethod
    def lexists(path):
        return LeanPath._mode(path, False) is not None

    @staticmethod
    def isdir(path):
        mode = LeanPath._mode(path)
        return mode is not None and stat.S_ISDIR(mode)

    @staticmethod
    def isfile(path):
        mode = LeanPath._mode(path)
        return mode is not None and stat.S_ISREG(mode)

    @staticmethod
    def islink(path):
        mode = LeanPath._mode(path, False)
        return mode is not None and stat.S_ISLNK(mode)

    @staticmethod
    def getsize(path):
        return os.stat(path).st_size

    @staticmethod
    def expanduser(path):
        if isinstance(path, bytes):
            return __import__("posixpath").expanduser(path)
        if not path.startswith("~"):
            return path
        i = path.find("/", 1)
        i = len(path) if i < 0 else i
        import pwd
        try:
            if i > 1:
                home = pwd.getpwnam(path[1:i]).pw_dir
            else:
                home = os.environ["HOME"] if "HOME" in os.environ else \
                    pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            return path
        return (home.rstrip("/") + path[i:]) or "/"

    @staticmethod
    def realpath(path):
        """Symbolic links resolved as far as they exist (posixpath.realpath, not strict)."""
        sep, (dot, dotdot) = LeanPath._sep(path), LeanPath._dots(path)
        seen = {}

        def resolve(path, rest):
            if rest.startswith(sep):
                rest, path = rest[1:], sep
            while rest:
                name, _, rest = rest.partition(sep)
                if not name or name == dot:
                    continue
                if name == dotdot:
                    if path:
                        path, name = LeanPath.split(path)
                        if name == dotdot:
                            path = LeanPath.join(path, dotdot, dotdot)
                    else:
                        path = name
                    continue
                newpath = LeanPath.join(path, name)
                if not LeanPath.islink(newpath):
                    path = newpath
                    continue
                if newpath in seen:
                    path = seen[newpath]
                    if path is not None:
                        continue
                    return LeanPath.join(newpath, rest), False         # a loop
                seen[newpath] = None
                path, ok = resolve(path, os.readlink(newpath))
                if not ok:
                    return LeanPath.join(path, rest), False
                seen[newpath] = path
            return path, True
        return LeanPath.abspath(resolve(path[:0], path)[0])


class LeanOs(type(sys)):
    """The os module as udocker.py uses it, without importing os: Python 3 with -S starts
    without it, and importing it imports posixpath, stat and _collections_abc (~1 ms, a
    quarter of what a run adds to Python's own start). posix's functions and constants,
    the names of os.py a start uses, LeanPath, and any other name from the real os,
    imported then. environ: the real os.environ where os is imported (a program or test
    that imports udocker.py), else the environment decoded as os.environ decodes it (a
    copy: udocker.py never changes its own environment)."""

    sep, curdir, pardir, pathsep, linesep, devnull = "/", ".", "..", ":", "\n", "/dev/null"
    SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2

    def __init__(self):
        type(sys).__init__(self, "os")
        import posix
        self._posix = posix
        self.path = LeanPath("posixpath")
        if "os" in sys.modules:
            self.environ = sys.modules["os"].environ
        else:
            codec = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
            self.environ = dict((k.decode(*codec), v.decode(*codec))
                                for k, v in posix.environ.items())

    def __getattr__(self, name):
        """os's name where os is imported (by a program that imports udocker.py, or before
        it: coverage's os._exit saves its data first), else posix's; kept, as a start uses
        32 of 315 in a run. Any other name comes from os, imported then."""
        value = getattr(sys.modules.get("os") or self._posix, name, self)
        if value is self:
            value = getattr(__import__("os"), name)
        setattr(self, name, value)
        return value


if PY3:
    import _stat as stat            # stat.py re-exports it, with Python stand-ins never used
    os = LeanOs()
else:                                                     # pragma: no cover (2.7)
    import os
    import stat


class LazyModule(object):
    """A module imported on first attribute access: start-up pays only for what a command
    uses (http.client alone, with the email package it pulls in, costs ~13 ms)."""

    def __init__(self, name):
        self.__dict__["_name"] = name

    def __getattr__(self, attr):
        module = __import__(self._name, fromlist=["_"])
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


class LazyRegex(object):
    """A regular expression compiled on first use (importing re alone costs ~4 ms)."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.compiled = None

    def __getattr__(self, attr):
        if self.compiled is None:
            self.compiled = re.compile(self.pattern)
        return getattr(self.compiled, attr)


class Deferred(tuple):
    """A function or class of a chapter the launcher has not loaded yet (section 13):
    calling it, or reading one of its attributes, loads the chapter, which replaces this
    stand-in by the real thing under its name. Tables built at start-up (ENGINES, COMMANDS)
    keep the stand-in and go through it."""

    __slots__ = ()                      # Deferred((NAME, LOADER)): no Python call to make

    def __call__(self, *args, **kwargs):
        return self[1].resolve(self[0])(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self[1].resolve(self[0]), attr)

    # (a tuple's own attributes, which __getattr__ would not see)
    count = property(lambda self: self.__getattr__("count"))
    index = property(lambda self: self.__getattr__("index"))


class Cold(tuple):
    """A function or method its chapter leaves out (ChapterCache.COLD: `run` does not call
    it as a rule): its def is loaded alone on first use. A method's stand-in replaces itself
    in its class; a function's, its global name. Made as Cold((QUALIFIED NAME, OFFSET,
    SIZE)): a tuple, with no Python call to make it."""

    __slots__ = ()

    def _real(self):
        name, offset, size = self
        owner, _, attr = name.rpartition(".")
        namespace = globals()
        where = vars(namespace[owner]) if owner else namespace
        value = where[attr]
        if value is self:               # (a table may hold the stand-in: loaded once)
            value = namespace["__chapters__"].warm(name, offset, size, {} if owner else None)
            if owner:
                setattr(namespace[owner], attr, value)
        return value

    def __get__(self, obj, owner=None):
        return self._real().__get__(obj, owner)

    def __call__(self, *args, **kwargs):
        return self._real()(*args, **kwargs)

    def __getattr__(self, attr):                # (__name__, __doc__ of a stored function)
        return getattr(self._real(), attr)


class ChapterLoader(object):
    """The chapters the launcher left out at start (section 13): each runs in the module's
    globals on first use of a name it defines, after the chapters its definitions need."""

    def __init__(self, namespace, stream, names, chapters, groups=None):
        self.namespace = namespace
        self.stream = stream            # the cache file, read up to its first chapter
        self.base = stream.tell()
        self.names = names              # {name a chapter defines: chapter}
        self.chapters = chapters        # {chapter: (chapters it needs, offset, size)}
        self.groups = groups or {}      # {command: [(offset, size)]}, ChapterCache.GROUPS
        self.loaded = []                # in load order (-D shows it, and the time it took)
        self.seconds = 0.0
        self.lock = __import__("_thread").RLock()   # pulls load chapters from threads

    @classmethod
    def install(cls, namespace):
        """Called by the launcher's start-up code: every deferred name gets its stand-in."""
        loader = cls(namespace, *namespace["__chapters__"])
        namespace["__chapters__"] = loader
        names = list(loader.names)
        namespace.update(zip(names, map(Deferred, zip(names, [loader] * len(names)))))

    @staticmethod
    def report(namespace):
        """For -D: whether this start ran from the cache, and which chapters it loaded."""
        loader = namespace.get("__chapters__")
        if not isinstance(loader, ChapterLoader):
            return "start-up cache: not used"
        return "start-up cache: chapters loaded: %s (%.1f ms)" % (" ".join(loader.loaded),
                                                                 loader.seconds * 1000)

    def resolve(self, name):
        value = self.namespace[name]
        if isinstance(value, Deferred):
            self.load(self.names[name])
            value = self.namespace[name]
            if isinstance(value, Deferred):     # its chapter failed as it loaded, earlier
                raise NameError("%s: its chapter %s did not load" % (name, self.names[name]))
        return value

    @staticmethod
    def expect(namespace, command):
        """Load the chapters command always uses at once (ChapterCache.GROUPS), if any."""
        loader = namespace.get("__chapters__")
        if isinstance(loader, ChapterLoader) and command in loader.groups:
            with loader.lock:
                for part in loader.groups.pop(command):
                    loader._load_group(*part)

    def load(self, chapter):
        with self.lock:
            entry = self.chapters.pop(chapter, None)
            if entry is None:           # loaded, or being loaded by this thread
                return
            needs, offset, size = entry
            for other in needs:
                self.load(other)
            started = time.time()
            exec(self._read(offset, size), self.namespace)
            self.loaded.append(chapter)
            self.seconds += time.time() - started

    def _load_group(self, offset, size):
        """Chapters from one blob: one read and one unmarshal (their strings shared) instead
        of a dozen; the ones loaded already are left."""
        started = time.time()
        for chapter, code in self._read(offset, size):
            entry = self.chapters.pop(chapter, None)
            if entry is not None:
                for other in entry[0]:      # (the builder put a group's own needs first)
                    self.load(other)
                exec(code, self.namespace)
                self.loaded.append(chapter)
        self.seconds += time.time() - started

    def warm(self, name, offset, size, scratch=None):
        """A Cold function or method: its def run in the module's globals (a method's into
        scratch, its class's stand-in replaced by the caller); the value it makes."""
        with self.lock:
            started = time.time()
            code = self._read(offset, size)
            if scratch is None:
                exec(code, self.namespace)
                value = self.namespace[name]
            else:
                exec(code, self.namespace, scratch)
                value = scratch[name.rsplit(".", 1)[1]]
            self.loaded.append(name + "()")
            self.seconds += time.time() - started
            return value

    def _read(self, offset, size):
        try:                # pread: a forked child (the watchdog) shares the file offset
            return __import__("marshal").loads(
                os.pread(self.stream.fileno(), size, self.base + offset))
        except (EOFError, ValueError, TypeError):
            try:                # (not remove_quietly: its chapter may be the damaged one)
                os.unlink(self.stream.name)         # the next start builds it again
            except OSError:
                pass
            raise UdockerError("the start-up cache %s was damaged (removed): run the "
                               "command again" % self.stream.name)


base64 = LazyModule("base64")
binascii = LazyModule("binascii")
csv = LazyModule("csv")
email_utils = LazyModule("email.utils")
hashlib = LazyModule("hashlib")
json = LazyModule("json")
re = LazyModule("re")
shutil = LazyModule("shutil")
signal = LazyModule("_signal" if PY3 else "signal")   # 3: the C module, no enum (~3 ms)
subprocess = LazyModule("subprocess")
random = LazyModule("random")
socket = LazyModule("socket")
ssl = LazyModule("ssl")
struct = LazyModule("_struct")      # struct.py only re-exports it (a module file less to find)
tempfile = LazyModule("tempfile")
threading = LazyModule("threading")
uuid = LazyModule("uuid")
io = LazyModule("io")
posixpath = LazyModule("posixpath")
tarfile = LazyModule("tarfile")
zlib = LazyModule("zlib")

if PY3:
    configparser = LazyModule("configparser")
    httplib = LazyModule("http.client")
    queue = LazyModule("queue")
    urllib_request = LazyModule("urllib.request")
    urllib_parse = urllib_quote = LazyModule("urllib.parse")
    text_type = str
    string_types = (str,)
    input_line = input
else:                                                     # pragma: no cover (2.7)
    configparser = LazyModule("ConfigParser")
    httplib = LazyModule("httplib")
    queue = LazyModule("Queue")
    urllib_request = urllib_quote = LazyModule("urllib")
    urllib_parse = LazyModule("urlparse")
    text_type = unicode                                   # noqa: F821
    string_types = (str, unicode)                         # noqa: F821
    input_line = raw_input                                # noqa: F821


def urlsplit(url):
    return urllib_parse.urlsplit(url)


def urljoin(base, url):
    return urllib_parse.urljoin(base, url)


def urlencode(query):
    return urllib_quote.urlencode(query)


def unquote(text):
    return urllib_quote.unquote(text)


def uint_at(data, start, size, order):
    """The unsigned integer in data[start:start + size], byte order "little" or "big",
    without struct (an F-mode start reads ELF headers; struct is a module to load); raises
    ValueError past the end of data."""
    chunk = data[start:start + size]
    if len(chunk) != size:
        raise ValueError("%d bytes at %d: past the end" % (size, start))
    if PY3:
        return int.from_bytes(chunk, order)
    return int(binascii.hexlify(chunk[::-1] if order == "little" else chunk), 16)


def to_bytes(value, encoding="utf-8"):
    """Text -> bytes (bytes pass through)."""
    if isinstance(value, bytes):
        return value
    return value.encode(encoding, "surrogateescape" if PY3 else "strict")


def to_text(value, encoding="utf-8"):
    """Bytes -> native str (text passes through)."""
    if isinstance(value, bytes):
        return value.decode(encoding, "surrogateescape" if PY3 else "replace") if PY3 \
            else value
    return value


def show_name(value, limit=300):
    """A file name (bytes or text, any bytes) for a message: a native str that prints on
    2.7 and 3.x, bytes that are not UTF-8 and control characters as \\xNN, at most limit
    characters (then '...' and the length in bytes)."""
    raw = to_bytes(value)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = u"".join(c if ord(c) < 0x80 else u"\\x%02x" % ord(c)
                        for c in raw.decode("latin-1"))
    text = u"".join(c if ord(c) >= 0x20 and ord(c) != 0x7f else u"\\x%02x" % ord(c)
                    for c in text)
    if len(text) > limit:
        text = u"%s... (%d bytes)" % (text[:limit], len(raw))
    return text if PY3 else text.encode("utf-8")


def json_loads(data):
    """Parse JSON from bytes or text; raises ValueError on bad input."""
    try:
        return json.loads(to_text(data))
    except RuntimeError:            # RecursionError: [[[[... nested past the stack
        raise ValueError("JSON nested too deeply")


def json_dumps(obj, pretty=False):
    """JSON text; pretty is upstream's inspect format (sorted, indent 4)."""
    if pretty:
        return json.dumps(obj, sort_keys=True, indent=4, separators=(",", ": "))
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class TransportError(IOError):
    """An HTTP protocol failure (bad status line, short read) raised as an IOError, so that
    NETWORK_ERRORS stays a plain tuple and http.client is imported only when used."""


# Everything the network can throw at us: socket, TLS and timeout errors are all IOErrors,
# and the HTTP client turns http.client's own exceptions into TransportError.
NETWORK_ERRORS = (EnvironmentError,)

# Files: what flattening layers and copying containers need.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
TAR_ERRORS = "surrogateescape" if PY3 else "strict"   # tar names round-trip to their bytes

if PY3:
    def buffered_decompressor(kind):
        """The decompressor class of 'bzip2', 'xz' or 'zstd' whose decompress() bounds its
        output (max_length), or None when this Python lacks the module."""
        module, name = {"bzip2": ("bz2", "BZ2Decompressor"),
                        "xz": ("lzma", "LZMADecompressor"),
                        "zstd": ("compression.zstd", "ZstdDecompressor")}[kind]  # zstd: 3.14+
        try:
            return getattr(__import__(module, fromlist=["_"]), name)
        except ImportError:
            return None

    def hardlink(source, target):
        """link(2) that links a symlink itself, never what it points to."""
        os.link(source, target, follow_symlinks=False)

    def set_times(path, mtime, fd=None, symlink=False):
        """Set atime and mtime; on the open fd if given, on a symlink itself if symlink."""
        try:
            if fd is not None:
                os.utime(fd, (mtime, mtime))
            else:
                os.utime(path, (mtime, mtime), follow_symlinks=not symlink)
        except (OverflowError, ValueError):
            pass
else:                                                     # pragma: no cover (2.7)
    def buffered_decompressor(kind):
        return None                     # 2.7's decompressors cannot bound their output

    hardlink = os.link                  # Linux link(2) does not follow a final symlink

    def set_times(path, mtime, fd=None, symlink=False):
        if not symlink:                 # 2.7 has no lutimes: symlinks keep their time
            try:
                os.utime(path, (mtime, mtime))
            except (OverflowError, ValueError):
                pass


# ==== 2. Errors and messages ====
# Code raises where something fails; main() prints one "Error: ..." line (-D adds the traceback).


class UdockerError(Exception):
    """Any failure reported to the user as one line; exit_code is the process status."""
    exit_code = 1

    def __init__(self, message, exit_code=None):
        Exception.__init__(self, message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(UdockerError):
    """Bad command line: unknown command or option, missing or malformed argument."""


class OutputClosed(UdockerError):
    """Whoever reads our stdout has gone (`udocker.py images | head -1`): no message, and
    status 141, as if SIGPIPE had ended us as it ends other Unix tools."""
    exit_code = 141


class ConfigurationError(UdockerError):
    """A configuration file or value that cannot be used."""


class RepositoryError(UdockerError):
    """The local repository is missing, unwritable, or has no such image/container."""


class RegistryError(UdockerError):
    """The registry refused, failed, or sent something unusable."""


class DigestMismatch(RegistryError):
    """Downloaded content does not hash to the digest that named it."""


class Unreachable(RegistryError):
    """Nothing answers at that address (connection refused), or the proxy failed: retrying
    will not help, and nothing was learnt from the registry."""


class EngineError(UdockerError):
    """An execution engine cannot run the container."""


class CannotStart(EngineError):
    """An execution mode cannot start here (this host, this container, these tools): mode,
    why (text), and tool_missing when what it lacks is an engine executable (the fix is to
    get the tools, not another mode)."""

    def __init__(self, mode, why, tool_missing=False):
        EngineError.__init__(self, why)
        self.mode, self.why, self.tool_missing = mode, why, tool_missing
        self.fallback_tools = ()     # tools a fallback mode lacked (choose_mode installs none)


SURROGATE_REPR_RE = LazyRegex(r"\\udc([89a-f][0-9a-f])")     # repr() of an argv byte on 3.x


class Messages(object):
    """Levelled messages to stderr; data output (what scripts parse) goes to stdout.

    Levels as upstream's UDOCKER_LOGLEVEL: 0 error, 1 msg, 2 warning, 3 info, 4 verbose, 5 debug.
    """
    ERR, MSG, WAR, INF, VER, DBG = 0, 1, 2, 3, 4, 5

    def __init__(self, level=3, stream=None):
        self.level = level
        self.stream = stream

    def _write(self, text):
        stream = self.stream or sys.stderr
        if "\n" in text or "\r" in text:        # a name with a newline: still one line
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        try:                       # argv bytes that are not UTF-8: \xNN on 2.7 and 3.x alike
            to_bytes(text).decode("utf-8")
        except UnicodeError:
            text = show_name(text, 1 << 20)
        if "\\udc" in text:        # the same bytes in a %r of 3.x, as 2.7's repr shows them
            text = SURROGATE_REPR_RE.sub(r"\\x\1", text)
        text += "\n"
        if PY3 and getattr(stream, "buffer", None) is not None:
            try:                   # 3.6 without a locale: stderr is ASCII, argv surrogates
                text.encode(stream.encoding or "ascii")
            except (UnicodeError, LookupError):     # UTF-8 text shown as its bytes
                stream.flush()
                stream.buffer.write(to_bytes(text))
                stream.buffer.flush()
                return
        stream.write(text)
        stream.flush()

    def error(self, text):
        self._write("Error: " + text)

    def warning(self, text):
        if self.level >= self.WAR:
            self._write("Warning: " + text)

    def info(self, text):
        if self.level >= self.INF:
            self._write("Info: " + text)

    def verbose(self, text):
        if self.level >= self.VER:
            self._write("Info: " + text)

    def debug(self, text):
        if self.level >= self.DBG:
            self._write("Debug: " + text)


MSG = Messages()        # the one message printer; main() sets its level from the Config


def out(text=""):
    """Print command output (the data a script reads) to stdout."""
    try:
        try:
            sys.stdout.write(text + "\n")
        except UnicodeEncodeError:      # a name that is not UTF-8: its bytes, as ls writes them
            sys.stdout.flush()
            getattr(sys.stdout, "buffer", sys.stdout).write(to_bytes(text + "\n"))
    except EnvironmentError as exc:
        if exc.errno == errno.EPIPE:
            raise OutputClosed("stdout closed")
        raise


# ==== 3. Configuration ====
# Defaults < /etc/udocker.conf < ~/.udocker/udocker.conf < $UDOCKER_DIR/udocker.conf < --config
# < environment < command-line options. Values are typed by their default; nothing is executed.

# Where the tools tarball is downloaded from when `tarball` is not set: upstream's published
# udocker tools 1.2.11 at the places udocker 1.3.17 fetches it from (the issue's and the
# installed 1.3.17's), each pinned by TOOLS_GITBLOB. Tests replace the list with the
# environment variable UDOCKER_TEST_DEFAULT_TARBALL (loopback URLs), keeping it a default.
DEFAULT_TARBALL_URLS = " ".join([
    "https://download.ncg.ingrid.pt/webdav/udocker/udocker-englib-1.2.11.tar.gz",
    "https://download.a.incd.pt/udocker/udocker-englib-1.2.11.tar.gz",
    "https://raw.githubusercontent.com/jorge-lip/udocker-builds/master/tarballs/"
    "udocker-englib-1.2.11.tar.gz"])

CONFIG_DEFAULTS = (
    # (key, default, environment variable or None)
    ("verbose_level", 3, "UDOCKER_LOGLEVEL"),
    ("topdir", "", "UDOCKER_DIR"),
    ("homedir", "", None),
    ("bindir", "", "UDOCKER_BIN"),
    ("libdir", "", "UDOCKER_LIB"),
    ("docdir", "", "UDOCKER_DOC"),
    ("reposdir", "", "UDOCKER_REPOS"),
    ("layersdir", "", "UDOCKER_LAYERS"),
    ("containersdir", "", "UDOCKER_CONTAINERS"),
    ("tmpdir", "", "UDOCKER_TMP"),
    ("keystore", "keystore", "UDOCKER_KEYSTORE"),
    ("tarball", DEFAULT_TARBALL_URLS, "UDOCKER_TARBALL"),
    ("tarball_sha256", "", "UDOCKER_TARBALL_SHA256"),
    ("tarball_release", TOOLS_MIN_VERSION, None),
    ("installretry", 3, None),
    ("autoinstall", True, "UDOCKER_AUTOINSTALL"),
    ("config", "udocker.conf", None),
    ("cmd", ["bash", "-i"], None),
    ("root_path", "/usr/sbin:/sbin:/usr/bin:/bin", None),
    ("user_path", "/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin", None),
    ("sysdirs_list", ["/dev", "/proc", "/sys", "/etc/resolv.conf", "/etc/host.conf",
                      "/lib/modules"], None),
    ("dri_list", ["/usr/lib64/dri", "/lib64/dri", "/usr/lib/dri", "/lib/dri"], None),
    ("override_default_execution_mode", "", "UDOCKER_DEFAULT_EXECUTION_MODE"),
    ("default_execution_mode", "P1", None),
    ("use_curl_executable", "", "UDOCKER_USE_CURL_EXECUTABLE"),
    ("use_proot_executable", "UDOCKER", "UDOCKER_USE_PROOT_EXECUTABLE"),
    ("use_runc_executable", "", "UDOCKER_USE_RUNC_EXECUTABLE"),
    ("use_singularity_executable", "", "UDOCKER_USE_SINGULARITY_EXECUTABLE"),
    ("use_patchelf_executable", "UDOCKER", "UDOCKER_USE_PATCHELF_EXECUTABLE"),
    ("fakechroot_so", "", "UDOCKER_FAKECHROOT_SO"),
    ("fakechroot_libc", "", "UDOCKER_FAKECHROOT_LIBC"),
    ("fakechroot_expand_symlinks", "", "UDOCKER_FAKECHROOT_EXPAND_SYMLINKS"),
    ("fakechroot_cmd_subst", "/sbin/ldconfig=/bin/true:/usr/sbin/ldconfig=/bin/true",
     "UDOCKER_FAKECHROOT_CMD_SUBST"),
    ("proot_noseccomp", False, None),
    ("proot_killonexit", True, None),
    ("proot_link2symlink", False, None),
    ("valid_host_env", ["TERM", "PATH", "PROOT_TMP_DIR"], None),
    ("invalid_host_env", ["VTE_VERSION"], None),
    ("cpu_affinity_exec_tools", [["numactl", "-C", "%s", "--"], ["taskset", "-c", "%s"]], None),
    ("http_proxy", "", None),
    ("timeout", 30.0, None),
    ("download_timeout", 1800.0, None),
    ("ctimeout", 10.0, None),
    ("http_agent", "", None),
    ("http_insecure", False, None),
    ("ca_bundle", "", "UDOCKER_CA_BUNDLE"),
    ("pull_parallel", 4, "UDOCKER_PULL_PARALLEL"),
    ("pull_retries", 5, None),
    ("pull_split_size", 48 << 20, None),      # blobs this large are fetched in segments
    ("pull_segment_size", 16 << 20, None),
    ("pull_split_rate", 50e6, None),          # ... once a connection proved slower than this
    ("pull_retry_after_max", 300.0, None),    # longest Retry-After wait before giving up
    ("sweep_grace", 3600.0, None),            # age (s) before what a killed command left goes
    ("dockerio_index_url", "https://hub.docker.com", "UDOCKER_INDEX"),
    ("dockerio_registry_url", "https://registry-1.docker.io", "UDOCKER_REGISTRY"),
    ("search_page_size", 25, None),
    ("runc_capabilities", ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER",
                           "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID",
                           "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                           "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"], None),
    ("singularity_options", ["-w"], None),
    ("runc_map_subids", "user", None),         # user, always or never (see RuncEngine)
    ("pass_host_env", ["OMPI_*", "PMI_*", "PMIX_*", "SLURM_*", "SLURMD_*", "SRUN_DEBUG",
                       "HYDRA_*", "I_MPI_*", "MPI_*",
                       "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
                       "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"], None),
    # the host's NVIDIA driver (setup --nvidia, run --nvidia): upstream's names and lists,
    # newer driver libraries added; where to look is configurable (nvi_ldconfig: the command
    # printing the `ldconfig -p` listing)
    ("nvi_lib_list", ["libOpenCL.", "libcuda.", "libnvcuvid.", "libnvidia-cfg.",
                      "libnvidia-compiler.", "libnvidia-encode.", "libnvidia-fatbinaryloader.",
                      "libnvidia-fbc.", "libnvidia-ifr.", "libnvidia-ml.", "libnvidia-opencl.",
                      "libnvidia-ptxjitcompiler.", "libnvidia-tls.", "tls/libnvidia-tls.",
                      "libcudadebugger.", "libnvidia-", "libnvoptix.", "libEGL_nvidia.",
                      "libGLX_nvidia.", "libGLESv1_CM_nvidia.", "libGLESv2_nvidia.",
                      "libvdpau_nvidia.", "vdpau/libvdpau_nvidia."], None),
    ("nvi_bin_list", ["nvidia-bug-report.sh", "nvidia-cuda-mps-control",
                      "nvidia-cuda-mps-server", "nvidia-debugdump", "nvidia-installer",
                      "nvidia-persistenced", "nvidia-settings", "nvidia-smi", "nvidia-uninstall",
                      "nvidia-xconfig"], None),
    ("nvi_etc_list", ["vulkan/icd.d/nvidia_icd.json", "OpenCL/vendors/nvidia.icd"], None),
    ("nvi_etc_dir", "/etc", None),
    ("nvi_dev_list", ["/dev/nvidia"], None),
    ("nvi_lib_dirs", [], None),
    ("nvi_ldconfig", ["ldconfig", "-p"], None),
    # tried in this order when the default mode cannot start on this host and no mode was
    # chosen (setup --execmode, UDOCKER_DEFAULT_EXECUTION_MODE, default_execution_mode)
    ("fallback_execution_modes", ["P1", "P2", "R1", "F3"], None),
)


# Numbers are never negative; these must be at least:
CONFIG_MINIMUM = {"pull_parallel": 1, "search_page_size": 1, "pull_split_size": 1,
                  "pull_segment_size": 1}


def _like(item, default):
    """True if item may be an element of the list-valued setting whose default is default:
    a string, or (cpu_affinity_exec_tools) a list of strings."""
    if default and isinstance(default[0], list):
        return isinstance(item, list) and all(isinstance(i, string_types) for i in item)
    return isinstance(item, string_types)


def _typed(key, raw, default):
    """Convert a config-file or environment string to the type of the key's default."""
    raw = raw.strip()
    if "\x00" in raw:                # no path, name or number holds one
        raise ConfigurationError("%s: a NUL character in %r" % (key, raw))
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", "", "none"):
            return False
        raise ConfigurationError("%s: not a boolean: %r" % (key, raw))
    if isinstance(default, (int, float)):
        try:
            value = type(default)(raw)
        except ValueError:
            raise ConfigurationError("%s: not a number: %r" % (key, raw))
        if value < CONFIG_MINIMUM.get(key, 0):
            raise ConfigurationError("%s: %r is below the minimum, %s"
                                     % (key, raw, CONFIG_MINIMUM.get(key, 0)))
        return value
    if isinstance(default, list):
        if raw.startswith("["):
            try:
                value = json_loads(raw)
            except ValueError:
                raise ConfigurationError("%s: not a JSON list: %r" % (key, raw))
            if not isinstance(value, list) or not all(_like(item, default) for item in value):
                raise ConfigurationError("%s: not a list of %s: %r" % (
                    key, "lists of strings" if default and isinstance(default[0], list)
                    else "strings", raw))
            return value
        return raw.split()
    return raw


class Config(object):
    """The effective configuration: built once in main(), read-only afterwards.

    Access values as attributes (cfg.topdir) or cfg.get("key"). `sources` tells where each
    value came from, for showconf.
    """

    def __init__(self, values, sources):
        self.__dict__["_values"] = values
        self.__dict__["sources"] = sources

    def __getattr__(self, key):
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key)

    def __setattr__(self, key, value):
        raise AttributeError("configuration is read-only")

    def get(self, key, default=None):
        return self._values.get(key, default)

    def items(self):
        return sorted(self._values.items())

    @classmethod
    def load(cls, environ, options):
        """Layer defaults, files, environment and general options; returns a Config.

        options: dict of the general options (config, repo, debug, quiet, insecure).
        """
        defaults = {key: default for key, default, _ in CONFIG_DEFAULTS}
        defaults["tarball"] = environ.get("UDOCKER_TEST_DEFAULT_TARBALL", DEFAULT_TARBALL_URLS)
        values, sources = dict(defaults), dict.fromkeys(defaults, "default")
        home = environ.get("HOME") or os.path.expanduser("~")
        homedir = os.path.join(home, ".udocker")
        files = []
        if not environ.get("UDOCKER_NOSYSCONF"):
            files.append("/etc/udocker.conf")
        files.append(os.path.join(homedir, "udocker.conf"))
        for path in files:
            cls._read_file(path, values, sources, defaults, required=False)
        topdir = options.get("repo") or environ.get("UDOCKER_DIR") or values["topdir"]
        conf = topdir and os.path.join(topdir, "udocker.conf")
        if conf and os.path.exists(conf) and os.path.realpath(topdir) != os.path.realpath(homedir):
            cls._read_file(conf, values, sources, defaults, required=False)
        if options.get("config") is not None:
            cls._read_file(options["config"], values, sources, defaults, required=True)
        present = set(environ)       # os.environ: a name it lacks costs two exceptions
        for key, default, env in CONFIG_DEFAULTS:
            if env and env in present:
                values[key] = _typed(key, environ[env], default)
                sources[key] = "env " + env
        cls._apply_options(options, values, sources)
        cls._derive_paths(values, homedir, environ)
        return cls(values, sources)

    @staticmethod
    def _read_file(path, values, sources, defaults, required):
        if not os.path.exists(path):
            if required:
                raise ConfigurationError("config file not found: %s" % path)
            return
        parser = configparser.RawConfigParser()
        try:
            open(path).close()                  # parser.read() skips what it cannot read
        except (IOError, OSError) as exc:
            if required:
                raise ConfigurationError("cannot read config file %s: %s"
                                         % (path, exc.strerror or exc))
            MSG.warning("cannot read config file %s: %s (ignored)" % (path, exc.strerror))
            return
        try:
            if PY3:                 # the locale's encoding would decide what a byte means
                with open(path, encoding="utf-8", errors="surrogateescape") as handle:
                    parser.read_file(handle, path)
            else:
                parser.read(path)
            items = parser.items("DEFAULT")
        except (configparser.Error, IOError, OSError) as exc:
            raise ConfigurationError("cannot read config file %s: %s"
                                     % (path, str(exc).splitlines()[0]))
        for key, raw in items:
            if key not in defaults:
                MSG.debug("config %s: unknown key ignored: %s" % (path, key))
                continue
            values[key] = _typed(key, raw, defaults[key])
            sources[key] = path

    @staticmethod
    def _apply_options(options, values, sources):
        if options.get("repo"):
            values["topdir"] = options["repo"]
            sources["topdir"] = "option --repo"
        if options.get("debug"):
            values["verbose_level"] = Messages.DBG
            sources["verbose_level"] = "option -D"
        elif options.get("quiet"):
            values["verbose_level"] = Messages.MSG
            sources["verbose_level"] = "option -q"
        if options.get("insecure"):
            values["http_insecure"] = True
            sources["http_insecure"] = "option --insecure"

    @staticmethod
    def _derive_paths(values, homedir, environ):
        values["homedir"] = homedir
        topdir = os.path.abspath(os.path.expanduser(values["topdir"] or homedir))
        values["topdir"] = topdir
        for key, sub in (("bindir", "bin"), ("libdir", "lib"), ("docdir", "doc"),
                         ("reposdir", "repos"), ("layersdir", "layers"),
                         ("containersdir", "containers")):
            values[key] = os.path.abspath(values[key] or os.path.join(topdir, sub))
        values["tmpdir"] = values["tmpdir"] or environ.get("TMPDIR") or "/tmp"
        keystore = os.path.expanduser(values["keystore"])
        if not os.path.isabs(keystore):
            keystore = os.path.join(homedir, keystore)     # upstream: relative to homedir
        values["keystore"] = keystore


# ==== 4. Files, processes, host ====
# Every write that another command may read goes through a temp file and a rename in the same
# directory; every read-modify-write of shared state holds a lock file (fcntl.flock, no daemon).


# ---- 4.1 Reading files ----


def read_bytes(path):
    """A file's bytes by the bare system calls (open() adds a buffer, an isatty and two
    seeks: 9 calls for a small file instead of 4, on every file a run reads)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_text(path):
    return to_text(read_bytes(path))


def path_stamp(path):
    """What changes when a file or directory is replaced, written or (a directory) gets
    or loses a name: inode, size and mtime to the sub-second; '-' when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return "%d:%d:%r" % (st.st_ino, st.st_size, st.st_mtime)


def settled(stamp):
    """Is what path_stamp gave unchanged for 2 s (or missing)? Changed again within the
    file system's mtime tick (to the tick, or to the second), a file could keep its stamp:
    a record of what was found is kept only once what it looked at has settled."""
    return stamp == "-" or float(stamp.split(":", 2)[2]) < time.time() - 2


def read_json(path):
    """Parsed JSON of a file; None if it does not exist or does not parse."""
    try:
        return json_loads(read_text(path))
    except (IOError, OSError, ValueError):
        return None


# ---- 4.2 Writing files atomically, removing trees ----


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicFile(object):
    """`with AtomicFile(path) as handle:` writes a temp file beside path (binary handle)
    that becomes path only when the block ends without an exception: never a half file.

    mode: the file's mode (None: 0666 less the umask, as open() makes it); sync=False skips
    the fsync, for a file whose loss after a crash costs only time; publish(tmp, path)
    gives the name (default os.rename; a tmp it does not consume it removes).
    """

    def __init__(self, path, mode=0o644, sync=True, publish=None):
        self.path, self.mode, self.sync = path, mode, sync
        self.publish = publish or os.rename
        self.tmp = self.handle = None

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(self.path) or ".")
        self.handle = os.fdopen(fd, "wb")
        return self.handle

    def __exit__(self, kind, value, trace):
        published = False
        try:
            if kind is None:
                if self.sync:
                    self.handle.flush()
                    os.fsync(self.handle.fileno())
                self.handle.close()
                os.chmod(self.tmp, 0o666 & ~current_umask() if self.mode is None
                         else self.mode)
                self.publish(self.tmp, self.path)
                published = True
        finally:
            self.handle.close()
            if not published:
                remove_quietly(self.tmp)


class OutputFile(AtomicFile):
    """AtomicFile for a file the user names (save -o, export -o): its temp file, beside it
    and outside the repository, is .NAME.partial-XXXXXX, flocked while it is written, so
    that the next command writing NAME removes those killed commands left (their lock is
    free); a file not yet locked after mkstemp is left alone (st_nlink check, as WorkDir)."""

    def __enter__(self):
        folder, name = os.path.split(self.path)
        prefix = "." + name + ".partial-"
        for entry in os.listdir(folder or "."):
            if entry.startswith(prefix):
                self._sweep(os.path.join(folder, entry))
        while True:
            fd, self.tmp = tempfile.mkstemp(prefix=prefix, dir=folder or ".")
            fcntl.flock(fd, fcntl.LOCK_EX)      # waits only for a sweep that got in first
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)
        self.handle = os.fdopen(fd, "wb")
        return self.handle

    @staticmethod
    def _sweep(path):
        try:
            fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), os.lstat(path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                MSG.info("removing the partial output of a killed command: %s" % path)
                os.unlink(path)
        except (IOError, OSError):
            pass                                  # its writer holds it, or it is gone
        finally:
            os.close(fd)


def write_atomic(path, data, mode=0o644, sync=True):
    """Write bytes or text to path via temp file + fsync + rename (see AtomicFile)."""
    with AtomicFile(path, mode, sync) as handle:
        handle.write(to_bytes(data))


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def write_all(fd, data, most=None):
    """os.write until all of data (bytes or a memoryview) is written, at most `most` bytes
    per call when given."""
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view[:most] if most else view):]


def makedirs(path, mode=0o755):
    try:
        os.makedirs(path, mode)
    except OSError as exc:
        if exc.errno != errno.EEXIST or not os.path.isdir(path):
            raise


def replace_with(path, make, tmp=None):
    """Create or replace path atomically with what make(tmp) puts at tmp (a file, a link):
    tmp is then renamed to path. tmp: default a name beside path unique to this process and
    thread; a stale one is removed first, and a failure removes it (AtomicFile does the
    same for data written through a handle)."""
    if tmp is None:
        tmp = "%s.tmp-%d-%d" % (path, os.getpid(), threading.current_thread().ident or 0)
    remove_quietly(tmp)
    try:
        make(tmp)
        os.rename(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def publish_download(partial, path):
    """A complete, verified download (partial) gets its name path, readable by everyone."""
    os.chmod(partial, 0o644)
    os.rename(partial, path)


def symlink_atomic(target, path):
    """Create or replace the symlink path -> target atomically."""
    replace_with(path, lambda tmp: os.symlink(target, tmp))


def make_tree_removable(top):
    """Give the owner rwx on every directory below top, so rmtree cannot be refused."""
    for dirpath, dirnames, _ in os.walk(top):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode) and (st.st_mode & 0o700) != 0o700:
                    os.chmod(path, st.st_mode | 0o700)
            except OSError:
                pass


def remove_tree(path):
    """Remove a directory tree, fixing permissions the tree may have set on itself."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    make_tree_removable(path)
    shutil.rmtree(path)


# ---- 4.3 Locks and work directories ----


class FileLock(object):
    """An exclusive advisory lock on a file (flock), usable as a context manager.

    Locks are held by open file descriptions, so they vanish with the process: a killed
    command never leaves a stale lock behind.
    """

    def __init__(self, path, description=None):
        self.path = path
        self.description = description or os.path.basename(path)
        self.fd = None

    def acquire(self, shared=False, wait=True):
        """Take the lock (waiting for it unless wait is False); returns self, or None when
        wait is False and another process holds it."""
        makedirs(os.path.dirname(self.path))
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            try:
                fcntl.flock(self.fd, kind | fcntl.LOCK_NB)
            except (IOError, OSError) as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if not wait:
                    os.close(self.fd)
                    self.fd = None
                    return None
                MSG.verbose("waiting for lock: %s" % self.description)
                fcntl.flock(self.fd, kind)
            if self._still_linked():
                return self
            os.close(self.fd)                 # its holder unlinked it (unlink): take anew

    def _still_linked(self):
        try:
            here = os.stat(self.path)
        except OSError:
            return False
        held = os.fstat(self.fd)
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def unlink(self):
        """Remove the lock file while holding it (what it guarded is gone); a process
        waiting on it notices and locks a new file (acquire)."""
        remove_quietly(self.path)

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


WORK_LOCK = ".lock"             # a work directory's lock file is its name + this, beside it
WORK_LOCK_RE = LazyRegex(r"^\.[a-z][a-z0-9-]*-[0-9a-f]{12}\.lock$")
WORK_NAME_RE = LazyRegex(r"^\.[a-z][a-z0-9-]*-[0-9a-f]{12}(\.lock)?$")   # dir or its lock


class WorkDir(object):
    """A hidden directory PARENT/.KIND-XXXXXXXXXXXX that a command builds and renames into
    place, or moves something into to delete it; a context manager that removes it.

    Its lock file beside it (the name + WORK_LOCK) is held under an exclusive flock for as
    long as the process uses the directory, and the lock dies with the process: a work
    directory whose lock can be taken belongs to a command that was killed, and
    sweep_work_dirs() removes it. Making one sweeps the parent first, so each command that
    can leave such directories cleans up after its killed predecessors.

    The lock file is made (O_EXCL) and locked before the directory exists, and removed after
    it is gone. Between open and flock a sweep may take the lock and delete the file: once
    locked, a file no longer linked means start over with another name.
    make: create the directory (else the caller renames something to .path).
    sweep: sweep the parent first (LocalRepository.writer keeps dead ones until it has
    swept what their owners left).
    """

    def __init__(self, parent, kind, make=True, sweep=True):
        if sweep:
            sweep_work_dirs(parent)
        while True:
            path = os.path.join(parent, ".%s-%s" % (kind, random_hex(6)))
            try:
                fd = os.open(path + WORK_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_CLOEXEC,
                             0o600)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    continue
                raise
            fcntl.flock(fd, fcntl.LOCK_EX)        # waits only for a sweep that got in first
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)
        self.path, self.fd = path, fd
        if make:
            try:
                os.mkdir(path, 0o700)
            except BaseException:
                self.close()
                raise

    def close(self):
        """Remove the directory (if it was not renamed away), then the lock file. When the
        directory cannot be removed (OSError), it is left without a lock: no sweep retries."""
        if self.fd is None:
            return
        try:
            remove_tree(self.path)
        finally:
            remove_quietly(self.path + WORK_LOCK)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _work_dir_paths(parent):
    """The paths of the work directories in parent that have a lock file (see WorkDir)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [os.path.join(parent, name[:-len(WORK_LOCK)]) for name in names
            if name.endswith(WORK_LOCK) and WORK_LOCK_RE.match(name)]


def sweep_work_dirs(parent):
    """Remove the work directories in parent left by killed commands (see WorkDir): those
    whose lock file can be locked without waiting. Never fails: a sweep is a courtesy."""
    for path in _work_dir_paths(parent):
        _sweep_work_dir(path)


def work_dir_owners(parent):
    """(live, dead): the paths of parent's work directories whose owner holds its lock, and
    of those whose owner was killed (its lock can be taken); nothing is removed."""
    live, dead = [], []
    for path in _work_dir_paths(parent):
        try:
            fd = os.open(path + WORK_LOCK, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        except OSError:
            continue                              # its owner or a sweep finished meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            dead.append(path)
        except (IOError, OSError):
            live.append(path)
        finally:
            os.close(fd)
    return live, dead


def _sweep_work_dir(path):
    try:
        fd = os.open(path + WORK_LOCK, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
    except OSError:
        return                                    # gone meanwhile, or not ours to open
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError):
            return                                # its owner (or another sweep) holds it
        try:
            now = os.lstat(path + WORK_LOCK)
        except OSError:
            return                                # its owner or a sweep finished meanwhile
        st = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return
        if os.path.lexists(path):        # else an owner (alive or not) had not made it yet
            MSG.info("removing the work directory of a killed command: %s" % path)
            try:
                remove_tree(path)
            except OSError as exc:
                MSG.warning("cannot remove %s: %s" % (path, exc.strerror or exc))
        remove_quietly(path + WORK_LOCK)
    finally:
        os.close(fd)


def _tree_bytes(path):
    """The bytes of the files under path (0 when it is gone)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


# ---- 4.4 Programs, hashing, the host platform ----


def random_hex(count):
    """count random bytes as hex text (the uuid module costs ~2 ms to import)."""
    return "".join("%02x" % b for b in bytearray(os.urandom(count)))


def which(name, path):
    """The first executable called name in path (a $PATH value: the session's, never read
    here from os.environ), or None."""
    if "/" in name:
        return name if is_executable(name) else None
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if is_executable(candidate):
            return candidate
    return None


def is_executable(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def sha256_file(path, chunk=1 << 20):
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            data = handle.read(chunk)
            if not data:
                break
            digest.update(data)
    return digest.hexdigest()


def human_size(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return ("%d %s" % (count, unit)) if unit == "B" else ("%.1f %s" % (count, unit))
        count /= 1024.0
    return "%.1f GB" % count


# The names Docker uses for machine architectures (uname -m -> (architecture, variant)).
HOST_ARCHES = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "i386": ("386", ""), "i486": ("386", ""), "i586": ("386", ""), "i686": ("386", ""),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"), "armv8l": ("arm", "v7"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
    "mips64": ("mips64le", ""), "loongarch64": ("loong64", ""),
}

# Docker architecture -> the suffix of tool names in the tools tarball (proot-x86_64, ...).
TOOL_ARCH = {"amd64": "x86_64", "386": "x86", "arm64": "arm64", "arm": "arm",
             "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


# Other names of Docker architectures (uname -m, Debian, config files written by hand).
ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64", "i386": "386"}

KNOWN_ARCHES = set(list(TOOL_ARCH) + list(TOOL_ARCH.values()) + list(ARCH_ALIASES))


def docker_arch(name):
    """The Docker name of an architecture: 'x86_64' -> 'amd64'; a Docker name stays."""
    return ARCH_ALIASES.get(name, name)


class Platform(object):
    """An image platform os/architecture[/variant], compared the way Docker does."""

    def __init__(self, os_name, arch, variant=""):
        self.os = os_name
        self.arch = arch
        self.variant = variant or ""

    @classmethod
    def parse(cls, text):
        """'linux/arm64/v8', 'linux/amd64', 'arm64' -> Platform; raises UsageError."""
        parts = [p for p in text.strip().lower().split("/")]
        if len(parts) == 1 and parts[0] in KNOWN_ARCHES:       # 'arm64' alone: linux/arm64
            parts.insert(0, "linux")
        if not 2 <= len(parts) <= 3 or not all(parts) or \
                not all(re.match(r"^[a-z0-9][a-z0-9_.-]*$", p) for p in parts):
            raise UsageError("invalid platform: %r (expected os/arch[/variant])" % text)
        return cls(parts[0], docker_arch(parts[1]), parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls):
        machine = os.uname()[4].lower()
        arch, variant = HOST_ARCHES.get(machine, (machine, ""))
        return cls("linux", arch, variant)

    def matches(self, other_os, other_arch, other_variant=""):
        """True if an index entry (os, arch, variant) can run as this platform."""
        if (other_os or "").lower() != self.os or (other_arch or "").lower() != self.arch:
            return False
        mine = self.variant or ""
        theirs = (other_variant or "").lower()
        if self.arch == "arm64":                  # arm64 images without a variant are v8
            mine, theirs = mine or "v8", theirs or "v8"
        return not mine or not theirs or mine == theirs

    def __str__(self):
        return "/".join(p for p in (self.os, self.arch, self.variant) if p)


def platform_text(doc, default="unknown/unknown"):
    """'os/arch[/variant]' of an image config, container.json or index entry's platform
    (a missing os or architecture is 'unknown'); default when it names neither."""
    doc = doc if isinstance(doc, dict) else {}
    os_name, arch, variant = [doc.get(k) for k in ("os", "architecture", "variant")]
    if not os_name and not arch:
        return default
    return "/".join(["%s" % (os_name or "unknown"), "%s" % (arch or "unknown")]
                    + (["%s" % variant] if variant else []))


# ==== 5. Local repository ====
# The layout of upstream udocker 1.3 (see README "On-disk layout"): repos/NAME/TAG/ with TAG,
# v1|v2, manifest, relative symlinks into layers/; containers/ID/; bin/, lib/, doc/.
# What upstream does not record (manifest digest, index digest, platform) goes to
# repos/NAME/.TAG.json, beside the tag directory, where upstream never looks.

LOCAL_NAME_RE = LazyRegex(r"^[a-zA-Z0-9][a-zA-Z0-9_.:/-]*$")
TAG_RE = LazyRegex(r"^([a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127}|sha256:[a-f0-9]{64})$")
DIGEST_RE = LazyRegex(r"^sha256:[a-f0-9]{64}$")
PROTECT = "PROTECT"     # marker file of a protected image tag or container (rmi/rm refuse)


# ---- 5.1 Images ----


def tag_ref(name, tag):
    """NAME:TAG, or NAME@sha256:... for a by-digest pull (its tag directory is named by the
    digest): a reference every command accepts, as `rmi $(images -q)` needs."""
    return "%s%s%s" % (name, "@" if DIGEST_RE.match(tag) else ":", tag)


def check_local_name(name):
    """Reject image names that would escape repos/ or that upstream could not read."""
    parts = name.split("/")
    if not LOCAL_NAME_RE.match(name) or any(p in ("", ".", "..") for p in parts) \
            or len(name) > 1024:
        raise UsageError("invalid image name: %r" % name)
    return name


class LocalImage(object):
    """One image tag in the local repository, as found on disk.

    layers: layer file paths, base layer first. config: the image config dict or {}.
    """
    V1_CONFIG = "container.json"    # a v1 image's config, in its tag directory

    def __init__(self, repo, name, tag):
        self.repo = repo
        self.name = name
        self.tag = tag
        self.dir = repo.tag_dir(name, tag)
        self.version = "v2" if os.path.exists(os.path.join(self.dir, "v2")) else "v1"
        self.manifest = None
        self.config_path = None
        self.layers = []
        self.record = read_json(repo.record_path(name, tag)) or {}
        if self.version == "v2":
            self._load_v2()
        else:
            self._load_v1()

    def _load_v2(self):
        self.manifest = read_json(os.path.join(self.dir, "manifest"))
        if not isinstance(self.manifest, dict):
            self.check_present()
            raise RepositoryError("image %s: manifest missing or not JSON" % self.ref)
        if "fsLayers" in self.manifest:                        # schema 1: top layer first
            digests = [l.get("blobSum") for l in reversed(self.manifest["fsLayers"])]
            self.layers = [os.path.join(self.dir, d) for d in digests]
            history = self.manifest.get("history") or [{}]
            try:
                self._config = json_loads(history[0].get("v1Compatibility", "{}"))
            except ValueError:
                self._config = {}
            return
        self.layers = [os.path.join(self.dir, l.get("digest", "?"))
                       for l in self.manifest.get("layers", [])]
        digest = (self.manifest.get("config") or {}).get("digest")
        self.config_path = os.path.join(self.dir, digest) if digest else None
        self._config = None

    def _load_v1(self):
        ancestry = read_json(os.path.join(self.dir, "ancestry")) or []
        self.layers = [os.path.join(self.dir, lid + ".layer") for lid in reversed(ancestry)]
        cjson = os.path.join(self.dir, self.V1_CONFIG)
        if os.path.exists(cjson):
            self.config_path = cjson
        elif ancestry:
            self.config_path = os.path.join(self.dir, ancestry[0] + ".json")
        self._config = None

    @property
    def ref(self):
        return tag_ref(self.name, self.tag)

    def check_present(self):
        """Raise RepositoryError when an rmi removed the tag while this command ran (what
        was missing is then no fault of the image)."""
        if not self.repo.has_image(self.name, self.tag):
            raise RepositoryError("image %s was removed while this command ran" % self.ref)

    @property
    def config(self):
        if self._config is None:
            self._config = (read_json(self.config_path) if self.config_path else None) or {}
        return self._config

    @property
    def protected(self):
        return os.path.exists(os.path.join(self.dir, PROTECT))

    @property
    def platform(self):
        return platform_text(self.config, self.record.get("platform", "unknown/unknown"))

    def links(self):
        """(name, path) of every layer/config symlink in the tag directory."""
        found = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if os.path.islink(path):
                found.append((name, path))
        return found

    def verify(self):
        """Re-hash every blob against its name and check the manifest's layers are present.

        Returns a list of problems (empty when the image is intact); reports progress by MSG.
        """
        problems = []
        wanted = [os.path.basename(p) for p in self.layers]
        if self.config_path and self.version == "v2":
            wanted.append(os.path.basename(self.config_path))
        for name in wanted:
            path = os.path.join(self.dir, name)
            if not os.path.islink(path) and not os.path.exists(path):
                problems.append("missing: %s" % name)
            elif not os.path.exists(path):
                problems.append("missing layer file: %s" % name)
        for name, path in self.links():
            if not os.path.exists(path):
                continue                                        # reported above or unused
            if DIGEST_RE.match(name):
                if sha256_file(path) != name.split(":", 1)[1]:
                    problems.append("corrupt (sha256 mismatch): %s" % name)
                    continue
            elif name.endswith(".layer") and not tar_is_readable(path):
                problems.append("corrupt (not a readable tar): %s" % name)
                continue
            MSG.info("layer ok: %s" % name)
        return problems


def tar_is_readable(path):
    import tarfile
    try:
        with tarfile.open(path, "r:*") as archive:
            for _ in archive:
                pass
        return True
    except (tarfile.TarError, IOError, OSError, EOFError, ValueError):
        return False


# ---- 5.2 The repository ----


class LocalRepository(object):
    """The udocker directory tree ($UDOCKER_DIR, default ~/.udocker)."""

    SUBDIRS = ("repos", "layers", "containers", "bin", "lib")

    def __init__(self, cfg, program_path=""):
        self.cfg = cfg
        self.program_path = program_path  # the session's $PATH, for xz/zstd/bzip2 -dc
        self.topdir = cfg.topdir
        self.reposdir = cfg.reposdir
        self.layersdir = cfg.layersdir
        self.containersdir = cfg.containersdir
        self.bindir = cfg.bindir
        self.libdir = cfg.libdir
        self.docdir = cfg.docdir
        self.locksdir = os.path.join(cfg.topdir, ".locks")    # lock files, writers' too

    # -- the tree itself

    def is_repo(self):
        return all(os.path.isdir(d) for d in (self.reposdir, self.layersdir,
                                              self.containersdir, self.bindir, self.libdir))

    def create(self):
        for path in (self.topdir, self.reposdir, self.layersdir, self.containersdir,
                     self.bindir, self.libdir, self.docdir):
            makedirs(path)

    def ensure(self, must_exist=False):
        """Make sure the repository exists (creating it on first use, as upstream)."""
        if self.is_repo():
            return
        if must_exist:
            raise RepositoryError("not a udocker repository: %s" % self.topdir)
        MSG.info("creating repo: %s" % self.topdir)
        try:
            self.create()
        except OSError as exc:
            raise RepositoryError("cannot create repository %s: %s"
                                  % (self.topdir, exc.strerror or exc))
        if not os.access(self.topdir, os.W_OK):
            raise RepositoryError("repository is not writable: %s" % self.topdir)

    def check_writable(self):
        for path in (self.topdir, self.reposdir, self.layersdir):
            if not os.access(path, os.W_OK | os.X_OK):
                raise RepositoryError("repository is not writable: %s" % path)

    def lock(self, name):
        """A lock file under topdir/.locks; name is a short identifier of what is guarded."""
        safe = re.sub(r"[^A-Za-z0-9_.:-]", "_", name)
        if len(safe) > 200:
            safe = hashlib.sha256(to_bytes(name)).hexdigest()
        return FileLock(os.path.join(self.locksdir, safe + ".lock"), name)

    # -- image tags

    def tag_dir(self, name, tag):
        return os.path.join(self.reposdir, name, tag)

    def record_path(self, name, tag):
        return os.path.join(self.reposdir, name, ".%s.json" % tag)

    def has_image(self, name, tag):
        return os.path.isfile(os.path.join(self.tag_dir(name, tag), "TAG"))

    def image(self, name, tag):
        """The LocalImage; raises RepositoryError if there is no such tag."""
        if not self.has_image(name, tag):
            raise RepositoryError("image not found: %s:%s" % (name, tag))
        return LocalImage(self, name, tag)

    def list_images(self):
        """Sorted (name, tag) of every image tag (directories holding a TAG file)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.reposdir):
            if "TAG" in filenames:
                rel = os.path.relpath(dirpath, self.reposdir)
                name, _, tag = rel.rpartition(os.sep)
                if name:
                    found.append((name.replace(os.sep, "/"), tag))
                dirnames[:] = []
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        return sorted(found)

    def set_protected(self, name, tag, protect):
        self.image(name, tag)
        marker = os.path.join(self.tag_dir(name, tag), PROTECT)
        if protect:
            write_atomic(marker, b"")
        else:
            remove_quietly(marker)

    # -- blobs in layers/

    def blob_path(self, digest):
        return os.path.join(self.layersdir, digest)

    def has_blob(self, digest):
        return os.path.isfile(self.blob_path(digest))

    def commit_image_v2(self, name, tag, manifest_bytes, digests, record):
        """Publish a pulled image tag: TAG, v2, manifest, one relative link per blob.

        The tag directory is built beside the old one and swapped in with renames, under the
        repository metadata lock, so readers see the old tag or the new one, never half.
        Raises RepositoryError naming any blob that is not (or no longer) in layers/.
        """
        check_local_name(name)
        parent = os.path.join(self.reposdir, name)
        with self.lock("metadata"):
            makedirs(parent)                    # under the lock: a sweep prunes empty ones
            missing = [d for d in digests if not self.has_blob(d)]
            if missing:
                raise RepositoryError("blob vanished before commit: %s" % missing[0])
            final = self.tag_dir(name, tag)
            with WorkDir(parent, "new") as work:
                build = work.path
                for digest in digests:
                    os.symlink(os.path.relpath(self.blob_path(digest), final),
                               os.path.join(build, digest))
                write_atomic(os.path.join(build, "manifest"), manifest_bytes)
                write_atomic(os.path.join(build, "v2"), b"")
                if os.path.exists(os.path.join(final, PROTECT)):
                    write_atomic(os.path.join(build, PROTECT), b"")
                write_atomic(os.path.join(build, "TAG"),
                             "%s:%s" % (os.path.join(self.reposdir, name), tag))
                os.chmod(build, 0o755)
                self._swap_in(build, final)
            write_atomic(self.record_path(name, tag), json_dumps(record, pretty=True))

    @staticmethod
    def _swap_in(new, final):
        """Rename the directory new to final; an old final goes to a work directory first
        (a tag directory left under another name would be listed as another tag)."""
        if not os.path.isdir(final):
            os.rename(new, final)
            return
        with WorkDir(os.path.dirname(final), "old", make=False) as old:
            os.rename(final, old.path)
            try:
                os.rename(new, final)
            except BaseException:
                os.rename(old.path, final)
                raise

    def copy_tag(self, src, name, tag):
        """Make name:tag a second tag of the LocalImage src (links re-made, files copied)."""
        check_local_name(name)
        if self.has_image(name, tag):
            raise RepositoryError("image already exists: %s:%s" % (name, tag))
        parent = os.path.join(self.reposdir, name)
        with self.lock("metadata"):
            self.sweep()
            makedirs(parent)
            final = self.tag_dir(name, tag)
            with WorkDir(parent, "new") as work:
                build = work.path
                for fname in os.listdir(src.dir):
                    path = os.path.join(src.dir, fname)
                    if fname in ("TAG", PROTECT):
                        continue
                    if os.path.islink(path):
                        os.symlink(os.path.relpath(os.path.realpath(path), final),
                                   os.path.join(build, fname))
                    elif os.path.isfile(path):
                        shutil.copyfile(path, os.path.join(build, fname))
                write_atomic(os.path.join(build, "TAG"), "%s:%s" % (parent, tag))
                os.chmod(build, 0o755)
                self._swap_in(build, final)
            if os.path.exists(self.record_path(src.name, src.tag)):
                shutil.copyfile(self.record_path(src.name, src.tag),
                                self.record_path(name, tag))

    def referenced_blobs(self):
        """Basenames of every layer-link target of the tags under repos/ (one walk for all).
        Work directories are not tags: under the metadata lock they are a killed command's."""
        return self._tag_walk()[0]

    def _tag_walk(self):
        """(blob names the tags link to, [(path, size)] of the records of tags that are gone,
        the directories holding work directories)."""
        used, records, work_parents = set(), [], []
        for dirpath, dirnames, filenames in os.walk(self.reposdir):
            work = [n for n in filenames if n.endswith(WORK_LOCK) and WORK_LOCK_RE.match(n)]
            if work:                           # a work directory has its lock beside it
                work_parents.append(dirpath)
                dirnames[:] = [n for n in dirnames if n + WORK_LOCK not in work]
            for name in filenames + dirnames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    used.add(os.path.basename(os.readlink(path)))
                elif name.startswith(".") and name.endswith(".json") and \
                        not os.path.isfile(os.path.join(dirpath, name[1:-5], "TAG")):
                    records.append((path, os.lstat(path).st_size))
        return used, records, work_parents

    def remove_image(self, name, tag, force=False):
        """Delete a tag and the blobs no other tag links to; refuses protected tags.

        The tag directory goes first, in one rename to a work directory, so a kill leaves
        the tag whole or gone; the blobs a killed rmi did not unlink are swept (see sweep).
        """
        with self.writer("rmi"), self.lock("metadata"):
            image = self.image(name, tag)
            if image.protected:
                raise RepositoryError("image is protected: %s" % image.ref)
            MSG.info("deleting image: %s" % image.ref)
            parent = os.path.dirname(image.dir)
            sweep_work_dirs(parent)                       # their links would keep blobs
            targets = set(os.path.basename(os.readlink(p)) for _, p in image.links())
            with WorkDir(parent, "rmi", make=False, sweep=False) as trash:
                os.rename(image.dir, trash.path)
                remove_quietly(self.record_path(name, tag))
            used = self.referenced_blobs()
            for blob in sorted(targets - used):
                try:
                    os.unlink(os.path.join(self.layersdir, blob))
                    MSG.verbose("removed layer: %s" % blob)
                except OSError as exc:
                    if not force and exc.errno != errno.ENOENT:
                        raise RepositoryError("cannot remove layer %s: %s"
                                              % (blob, exc.strerror))
            self._prune_empty(parent)

    # -- what killed commands leave

    def writer(self, kind):
        """A WorkDir lock file (no directory) in .locks/, held while a command adds blobs to
        layers/ or removes them (pull, load, import, rmi): once its owner is killed, a sweep
        knows that blobs no tag uses may be left. What earlier ones left is swept first."""
        with self.lock("metadata"):
            self.sweep()
            return WorkDir(self.locksdir, kind, make=False, sweep=False)

    def sweep(self, prune=False, grace=None):
        """Remove what killed commands left (call it under the metadata lock): the work files
        in layers/ and, once a writer died (or with prune), the blobs no tag links to, the
        records and work directories of removed tags and empty name directories. Only
        files older than grace seconds (default: config sweep_grace), and nothing while a
        writer runs (on another node of a shared file system: the grace protects it).
        Returns [(path, size)] removed; never fails, except prune while a writer runs."""
        grace = self.cfg.sweep_grace if grace is None else grace
        live, dead = work_dir_owners(self.locksdir)
        if live:
            if prune:
                raise RepositoryError("another command is adding or removing images "
                                      "(pull, load, import or rmi): prune when it ends")
            return []
        full = bool(dead) or prune
        try:
            found, kept = self.leftovers(grace, full, sweep=full)
        except OSError as exc:
            MSG.warning("cannot sweep %s: %s" % (self.layersdir, exc.strerror or exc))
            return []
        freed = []
        for path, size in found:
            try:
                os.unlink(path)
                (MSG.info if prune else MSG.verbose)("removed: %s (%s)"
                                                     % (path, human_size(size)))
                freed.append((path, size))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    MSG.warning("cannot remove %s: %s" % (path, exc.strerror or exc))
        if full and not kept:
            sweep_work_dirs(self.locksdir)            # their leftovers are gone: forget them
        if prune and kept:
            MSG.info("kept %d files younger than sweep_grace (%.0f s)" % (kept, grace))
        if freed:
            MSG.info("freed %s left by killed commands (%d files)"
                     % (human_size(sum(size for _, size in freed)), len(freed)))
        return freed

    def leftovers(self, grace=0.0, blobs=True, sweep=False):
        """([(path, size)], kept): the files killed commands left that are older than grace
        seconds (kept: how many younger ones): work files in layers/ (partial downloads,
        segment records, temporary files) and, with blobs, the blobs no tag links to and
        the records of tags that are gone. sweep (under the metadata lock): also remove the
        work directories under repos/ and the name directories left empty."""
        found, kept, used = [], 0, set()
        limit = time.time() - grace
        if blobs:
            used, records, work_parents = self._tag_walk()
            found.extend(records)
            if sweep:
                for parent in work_parents:
                    sweep_work_dirs(parent)
                    self._prune_empty(parent)
                self._prune_empty_names()
                sweep_work_dirs(self.layersdir)         # the staging of killed loads, imports
            else:
                found.extend((path, _tree_bytes(path))
                             for path in work_dir_owners(self.layersdir)[1])
        names = os.listdir(self.layersdir)
        work_dir = WORK_NAME_RE.match
        for name in names if blobs else [n for n in names if n[:1] == "."]:
            if name in used or work_dir(name):
                continue                     # work directories: sweep_work_dirs' business
            path = os.path.join(self.layersdir, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            if st.st_mtime > limit:
                kept += 1
                continue
            found.append((path, st.st_size))
        return found, kept

    def _prune_empty_names(self):
        for dirpath, dirnames, filenames in os.walk(self.reposdir, topdown=False):
            if not dirnames and not filenames:
                self._prune_empty(dirpath)

    def _prune_empty(self, path):
        while os.path.abspath(path) != os.path.abspath(self.reposdir):
            try:
                os.rmdir(path)
            except OSError:
                return
            path = os.path.dirname(path)

    def store_blob(self, path, digest, move=False):
        """Make layers/DIGEST hold the content of path, which the caller has verified.

        A hard link to path (a copy across file systems; move=True renames path instead),
        made durable and published by rename. Returns False if the blob was already there.
        """
        final = self.blob_path(digest)
        if os.path.isfile(final):
            return False

        def fill(tmp):
            try:
                (os.rename if move else os.link)(path, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(path, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)

        replace_with(final, fill, os.path.join(self.layersdir, ".%s.store-%d"
                                               % (digest, os.getpid())))
        return True


# ---- 5.3 Containers ----


META_DIR = ".udocker-py"        # udocker.py's own files in a container directory


EXEC_MODES = ("P1", "P2", "F1", "F2", "F3", "F4", "R1", "R2", "R3", "S1")


def default_execmode(cfg):
    mode = (cfg.override_default_execution_mode or cfg.default_execution_mode or "P1").upper()
    if mode not in EXEC_MODES:
        raise ConfigurationError("invalid default execution mode: %s (one of %s)"
                                 % (mode, " ".join(EXEC_MODES)))
    return mode


class ContainerDir(object):
    """The files of a container directory (containers/ID/) besides ROOT, each name defined
    here once, and the one answer to "which mode?" (execmode) that run, setup and ps give."""

    ROOT = "ROOT"                  # the container's root file system
    CONFIG = "container.json"      # the image's config, as created
    IMAGE = "imagerepo.name"       # NAME:TAG of the image it was created from
    ATTRS = META_DIR + "/attrs"    # owners and modes of ROOT's files, as in the layers
    EXECMODE = "execmode"          # the mode set by setup --execmode (none: the default)
    ROOT_PATH = "root.path"        # where ROOT was when its mode was set up (F: moved?)
    PATCH_PATH = "patch.path"      # where ROOT was when F3 patched its ELF files
    PATCH_RECORD = "patch.json"    # F3: each ELF file's interpreter and RUNPATH before
    NVIDIA = "nvidia"              # setup --nvidia: every run shows the host's driver
    MOUNTPOINTS = ".mountpoints"   # F modes: records of the volume symlinks made in ROOT
    RUN_DIR = ".run"               # what runs share: passwd copies, bind links, nvidia trees
    LIBC_RECORD = ".run/libc"      # the tree's C library, remembered (RunContainer.libc)
    LIB_DIRS_RECORD = ".run/libdirs"   # its library directories (RunContainer.lib_dirs)
    LOADER_RECORD = ".run/loader"  # its ELF loader (RunContainer.loader)
    CONFIG_RECORD = ".run/config"  # container.json parsed (read_json_twin)
    SPEC_RECORD = ".run/spec"      # R modes: the last run's OCI spec (RuncEngine._spec_text)
    RUN_BINDS = "binds"            # in .run: links to host paths that hold a ':'
    RUN_NVIDIA = "nvidia"          # in .run: link to the tree of the driver runs show
    RUN_NVIDIA_TREE = "nvidia-"    # in .run: one driver's tree of symlinks (+ a hash)
    LIBFAKECHROOT = "libfakechroot.so"     # the container's own library for F modes

    def __init__(self, path, cid):
        self.path = path
        self.cid = cid

    def file(self, name):
        return os.path.join(self.path, name)

    def read(self, name):
        """The text of a small state file, stripped, or '' if there is none."""
        try:
            return read_text(self.file(name)).strip()
        except (IOError, OSError):
            return ""

    def write(self, name, text):
        write_atomic(self.file(name), text)

    def has(self, name):
        return os.path.exists(self.file(name))

    def execmode(self, cfg=None, recorded=None):
        """The container's mode (upper case): recorded (the execmode file's text, read here
        when None), else the configured default (none without cfg); raises EngineError for a
        recorded mode that is no mode."""
        mode = (self.read(self.EXECMODE) if recorded is None else recorded).upper()
        if mode and mode not in EXEC_MODES:
            raise EngineError("container %s has an unknown execution mode: %s (setup "
                              "--execmode=MODE sets one of %s)"
                              % (self.cid, mode, " ".join(EXEC_MODES)))
        return mode or (default_execmode(cfg) if cfg is not None else "")


class ContainerStore(object):
    """containers/: one directory per container id, names as relative symlinks beside them.

    Layout (upstream 1.3): ID/ROOT, ID/container.json, ID/imagerepo.name, ID/PROTECT,
    ID/execmode; NAME -> ID. Ids are uuid3(uuid4(), image+time) strings.
    """
    ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
    NAME_RE = LazyRegex(r"^[^/. \[\]]+$")

    def __init__(self, repo):
        self.repo = repo
        self.dir = repo.containersdir

    @staticmethod
    def new_id(image_name):
        return str(uuid.uuid3(uuid.uuid4(), "%s%s" % (os.path.basename(image_name),
                                                      time.time())))

    def path(self, cid, *parts):
        return os.path.join(self.dir, cid, *parts)

    @classmethod
    def is_id(cls, text):
        """Whether text has the form of a container id: five dash-separated runs of [a-z0-9]
        (no regular expression: run starts with find(), and importing re costs ~4 ms)."""
        parts = text.split("-")
        return len(parts) == 5 and all(p and not set(p) - cls.ID_CHARS for p in parts)

    def find(self, id_or_name):
        """The container id for an id or a name, or None."""
        if not id_or_name or "/" in id_or_name or id_or_name in (".", ".."):
            return None
        path = os.path.join(self.dir, id_or_name)
        if os.path.islink(path):
            target = os.path.basename(os.readlink(path))
            return target if os.path.isdir(os.path.join(self.dir, target)) else None
        if self.is_id(id_or_name) and os.path.isdir(path):
            return id_or_name
        return None

    def get(self, id_or_name):
        """Like find(), but raises RepositoryError when there is no such container."""
        cid = self.find(id_or_name)
        if cid is None:
            raise RepositoryError("container not found: %s" % id_or_name)
        return cid

    def lock(self, cid):
        return self.repo.lock("container-" + cid)

    def list(self):
        """[(id, [names], image name)] of every container, sorted by id."""
        names = {}
        ids = []
        try:
            entries = sorted(os.listdir(self.dir))
        except OSError:
            return []
        for entry in entries:
            path = os.path.join(self.dir, entry)
            if os.path.islink(path):
                names.setdefault(os.path.basename(os.readlink(path)), []).append(entry)
            elif self.is_id(entry) and os.path.isdir(path):
                ids.append(entry)
        result = []
        for cid in ids:
            try:
                image = read_text(self.path(cid, ContainerDir.IMAGE)).strip()
            except (IOError, OSError):
                image = ""
            result.append((cid, sorted(names.get(cid, [])), image))
        return result

    def _links(self):
        """(name, id it points at) of every container name: a symlink in containers/."""
        if hasattr(os, "scandir"):      # 3.x: the directory's entry types, no lstat of each
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        yield entry.name, os.path.basename(os.readlink(entry.path))
            return
        for entry in os.listdir(self.dir):
            path = os.path.join(self.dir, entry)
            if os.path.islink(path):
                yield entry, os.path.basename(os.readlink(path))

    def names(self, cid):
        """The names of container cid, sorted."""
        return sorted(name for name, target in self._links() if target == cid)

    def check_name(self, name):
        if not self.NAME_RE.match(name or "") or self.is_id(name):
            raise UsageError("invalid container name: %r (no / . space [ ], not an id)" % name)
        if len(to_bytes(name)) > 255:                     # NAME_MAX: it names a symlink
            raise UsageError("invalid container name: %r...: too long (%d bytes, at most "
                             "255)" % (name[:40], len(to_bytes(name))))
        return name

    def add_name(self, cid, name, force=False):
        """Point NAME at cid; an existing name is an error unless force.

        The container is checked under the names lock: rm removes names under it too, so
        a name never outlives its container."""
        self.check_name(name)
        path = os.path.join(self.dir, name)
        with self.repo.lock("container-names"):
            if not os.path.isdir(self.path(cid)):
                raise RepositoryError("container not found: %s" % cid)
            if os.path.lexists(path) and not force:
                raise RepositoryError("container name already in use: %s" % name)
            symlink_atomic(cid, path)

    def remove_names_of(self, cid):
        """Remove every name pointing at cid."""
        with self.repo.lock("container-names"):
            for name in self.names(cid):
                os.unlink(os.path.join(self.dir, name))

    def _name_path(self, name):
        """containers/NAME of an existing name; raises RepositoryError (NAME with a '/' or
        '..' would reach a symlink outside the repository: rmname /tmp/link)."""
        path = os.path.join(self.dir, name)
        if not name or "/" in name or name in (".", "..") or not os.path.islink(path):
            raise RepositoryError("container name not found: %s" % name)
        return path

    def remove_name(self, name):
        with self.repo.lock("container-names"):
            os.unlink(self._name_path(name))

    def rename(self, name, new_name):
        self.check_name(new_name)
        with self.repo.lock("container-names"):
            old = self._name_path(name)
            new = os.path.join(self.dir, new_name)
            if os.path.lexists(new):
                raise RepositoryError("container name already in use: %s" % new_name)
            os.rename(old, new)

    def is_protected(self, cid):
        return os.path.exists(self.path(cid, PROTECT))

    def set_protected(self, cid, protect):
        marker = self.path(cid, PROTECT)
        if protect:
            write_atomic(marker, b"")
        else:
            remove_quietly(marker)


# ---- 5.4 Credentials ----


class Keystore(object):
    """Registry credentials, upstream's format: {URL: {"auth": base64(user:pw), "email": ""}}.

    Also reads ~/.docker/config.json "auths" (read-only), so a `docker login` is honoured.
    """

    def __init__(self, path, docker_config=None):
        self.path = path
        self.docker_config = docker_config

    def _load(self):
        if not os.path.exists(self.path):
            return {}
        st = os.stat(self.path)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise RepositoryError("keystore must be owned by you and mode 0600: %s"
                                  % self.path)
        data = read_json(self.path)
        if not isinstance(data, dict):
            raise RepositoryError("keystore is not valid JSON: %s" % self.path)
        return data

    def _save(self, data):
        makedirs(os.path.dirname(self.path), 0o700)
        write_atomic(self.path, json_dumps(data, pretty=True), mode=0o600)

    def store(self, url, username, password):
        auth = base64.b64encode(to_bytes("%s:%s" % (username, password)))
        with FileLock(self.path + ".lock"):
            data = self._load()
            data[url] = {"auth": to_text(auth), "email": ""}
            self._save(data)

    def erase(self, url=None):
        """Forget url's credentials (all of them when url is None); False if none stored."""
        with FileLock(self.path + ".lock"):
            if url is None:
                existed = os.path.exists(self.path)
                remove_quietly(self.path)
                return existed
            data = self._load()
            keys = [k for k in data if _same_registry(k, url)]
            for key in keys:
                del data[key]
            self._save(data)
            return bool(keys)

    def credentials(self, url):
        """(username, password) for a registry URL or host, or None."""
        for source in (self._load(), self._docker_auths()):
            for key, entry in source.items():
                if _same_registry(key, url) and isinstance(entry, dict) and entry.get("auth"):
                    try:
                        user, _, password = to_text(
                            base64.b64decode(to_bytes(entry["auth"]))).partition(":")
                    except (TypeError, ValueError, binascii.Error):
                        continue
                    return user, password
        return None

    def _docker_auths(self):
        if not self.docker_config:
            return {}
        data = read_json(self.docker_config)
        if isinstance(data, dict) and isinstance(data.get("auths"), dict):
            return data["auths"]
        return {}


def _registry_host(url):
    """'https://registry-1.docker.io/v2/' -> 'registry-1.docker.io'; docker.io aliases folded."""
    if "//" not in url:
        url = "https://" + url
    host = urlsplit(url).netloc.lower()
    if host in ("index.docker.io", "registry-1.docker.io", "docker.io",
                "registry.hub.docker.com"):
        return "docker.io"
    return host


def _same_registry(key, url):
    return _registry_host(key) == _registry_host(url)


# ==== 6. Registry client ====
# Docker Registry HTTP API v2 / OCI distribution over http.client: one pool of keep-alive
# connections, bearer tokens cached per scope, manifests and blobs verified by digest.

MT_DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
MT_DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_V2,
                  MT_DOCKER_V1_SIGNED, MT_DOCKER_V1)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
DOCKER_HUB = "docker.io"
MANIFEST_MAX = 4 << 20              # a manifest larger than this is refused, not parsed


class ImageRef(object):
    """A parsed image reference, the Docker way.

    name: the local image path as typed (minus tag/digest) - upstream's repos/ layout.
    host: the registry host ("docker.io" when none was named); remote: the repository path
    on the registry (library/ added for single-component Docker Hub names); tag, digest.
    """
    REF_RE = LazyRegex(r"^[a-zA-Z0-9][a-zA-Z0-9_.:/@-]*$")

    def __init__(self, name, host, remote, tag, digest):
        self.name, self.host, self.remote, self.tag, self.digest = \
            name, host, remote, tag, digest

    @classmethod
    def parse(cls, text):
        """Parse 'busybox', 'localhost:5000/x/y:1', 'ghcr.io/o/i@sha256:...'; raises UsageError."""
        if not text or not cls.REF_RE.match(text) or len(text) > 1024:
            raise UsageError("invalid image reference: %r" % (text,))
        digest = ""
        name = text
        if "@" in text:
            name, _, digest = text.partition("@")
            if not DIGEST_RE.match(digest):
                raise UsageError("invalid digest in image reference: %r" % text)
        tag = ""
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, _, tag = name.rpartition(":")
            if not TAG_RE.match(tag) or tag.startswith("sha256:"):
                raise UsageError("invalid tag in image reference: %r" % text)
        parts = name.split("/")
        host = DOCKER_HUB
        path = parts
        first = parts[0]
        if len(parts) > 1 and ("." in first or ":" in first or first == "localhost"):
            host = first.lower()
            path = parts[1:]
            if host in ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"):
                host = DOCKER_HUB
        for comp in path:
            if not re.match(r"^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$", comp):
                raise UsageError("invalid repository name in image reference: %r" % text)
        remote = "/".join(path)
        if host == DOCKER_HUB and len(path) == 1:
            remote = "library/" + remote
        check_local_name(name)
        return cls(name, host, remote, tag or ("" if digest else "latest"), digest)

    @property
    def local_tag(self):
        """The tag, or the digest of a by-digest reference: the tag directory's name, and
        what the registry is asked for."""
        return self.digest or self.tag

    def __str__(self):
        return self.name + ("@" + self.digest if self.digest else ":" + self.tag)


def _parse_www_authenticate(header):
    """'Bearer realm="x",service="y",scope="a:b:pull,push"' -> ('bearer', {params})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in re.finditer(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("((?:[^"\\]|\\.)*)"|[^,\s]*)',
                             rest):
        value = match.group(3) if match.group(3) is not None else match.group(2)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


class Response(object):
    """An HTTP response: status, lower-cased headers, and a body read in chunks or whole."""

    def __init__(self, client, key, conn, raw, url):
        self.client, self.key, self.conn, self.raw, self.url = client, key, conn, raw, url
        self.status = raw.status
        self.reason = raw.reason
        self.headers = dict((k.lower(), v) for k, v in raw.getheaders())

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def read(self, amount=None):
        data = self._body(self.raw.read, *([amount] if amount else []))
        if not data or amount is None:
            self.close()
        return data

    def readinto(self, view):
        """Read body bytes into the writable memoryview view (filled unless the body ends);
        returns how many, 0 at the end of the body."""
        if PY3:
            count = self._body(self.raw.readinto, view)
        else:                                             # pragma: no cover (2.7)
            data = self._body(self.raw.read, len(view))
            count = len(data)
            view[:count] = data
        if not count:
            self.close()
        return count

    def _body(self, call, *args):
        """call(*args) on the body: after any failure the connection is not reused, and
        http.client's own errors become TransportError."""
        try:
            return call(*args)
        except httplib.HTTPException as exc:
            self.close(reuse=False)
            raise TransportError("%s: %s" % (type(exc).__name__, exc))
        except BaseException:
            self.close(reuse=False)
            raise

    def read_all(self, limit=MANIFEST_MAX):
        chunks, total = [], 0
        while True:
            data = self.read(65536)
            if not data:
                break
            total += len(data)
            if total > limit:
                self.close(reuse=False)
                raise RegistryError("response from %s is larger than %d bytes"
                                    % (self.url, limit))
            chunks.append(data)
        return b"".join(chunks)

    def close(self, reuse=True):
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        reusable = reuse and self.raw.isclosed() and not self.raw.will_close
        self.client.release(self.key, conn, reusable)


def _without_password(url):
    parts = urlsplit(url if "//" in url else "http://" + url)
    return "%s://%s" % (parts.scheme, parts.netloc.rpartition("@")[2])


HOSTPORT_RE = LazyRegex(r"^(?:(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?|\[[0-9A-Fa-f:.]+\])"
                       r"(?::([0-9]{1,5}))?$")


def check_hostport(hostport, url):
    """Raises RegistryError unless hostport (of url) is HOST[:PORT]: http.client and the idna
    codec fail with other exceptions on what is no host name (' ', '.', 'a..b', :99999)."""
    match = HOSTPORT_RE.match(hostport)
    if not match or int(match.group(1) or 0) > 65535:
        raise RegistryError("invalid host in URL: %s" % show_name(url))


# SOCKS (RFC 1928, 1929; SOCKS4 and 4a): the proxy opens the TCP connection and then relays
# bytes, so http.client and TLS run over the socket unchanged (the SNI and certificate check
# are the registry's, as without a proxy).
SOCKS_SCHEMES = ("socks5h", "socks5", "socks4a", "socks4")     # h, a: the proxy resolves
SOCKS5_REPLIES = {1: "general failure", 2: "connection not allowed by its rules",
                  3: "network unreachable", 4: "host unreachable", 5: "connection refused",
                  6: "TTL expired", 7: "command not supported",
                  8: "address type not supported"}


class SocksError(IOError):
    """The SOCKS proxy refused or failed the connection: no byte reached the registry.
    next_address: the proxy could not reach that address; another of the host may do."""

    def __init__(self, message, next_address=False):
        IOError.__init__(self, message)
        self.next_address = next_address


def _socks_recv(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise SocksError("the proxy closed the connection (is it a SOCKS proxy?)")
        data += chunk
    return data


def _socks_targets(host, port, remote, family=None):
    """[(address type, packed address)] of host for SOCKS requests: an IP literal as is, a
    name as a name when the proxy resolves it (remote), else every address resolved here,
    to be tried in turn as a direct connection does."""
    for atyp, fam in ((1, socket.AF_INET), (4, socket.AF_INET6)):
        try:
            return [(atyp, socket.inet_pton(fam, host))]
        except (socket.error, ValueError):
            pass
    if remote:
        return [(3, to_bytes(host))]
    try:
        info = socket.getaddrinfo(host, port, family or socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.error as exc:
        raise SocksError("cannot resolve %s here (%s): with socks5h:// or socks4a:// the "
                         "proxy resolves it" % (host, exc))
    return [(1 if fam == socket.AF_INET else 4, socket.inet_pton(fam, addr[0]))
            for fam, _, _, _, addr in info]


def _socks5(sock, host, port, target, user, password):
    """RFC 1928 CONNECT to target (of _socks_targets) on sock, with RFC 1929 user/password
    authentication when user is not None; host names target in messages."""
    methods = b"\x00\x02" if user is not None else b"\x00"
    sock.sendall(struct.pack("BB", 5, len(methods)) + methods)
    version, method = struct.unpack("BB", _socks_recv(sock, 2))
    if version != 5:
        raise SocksError("not a SOCKS5 proxy (it answered version %d)" % version)
    if method == 2 and user is not None:
        user, password = to_bytes(user), to_bytes(password or "")
        if len(user) > 255 or len(password) > 255:
            raise SocksError("user name or password longer than 255 bytes")
        sock.sendall(struct.pack("BB", 1, len(user)) + user +
                     struct.pack("B", len(password)) + password)
        if _socks_recv(sock, 2)[1:] != b"\x00":
            raise SocksError("the proxy rejected the user name or password")
    elif method != 0:
        raise SocksError("the proxy accepts none of our authentication methods (%s)" % (
            "user name and password in the proxy URL, or none" if user is not None else
            "none: does it need a user name and password in the proxy URL?"))
    atyp, addr = target
    if atyp == 3:
        addr = struct.pack("B", len(addr)) + addr
    sock.sendall(struct.pack("BBBB", 5, 1, 0, atyp) + addr + struct.pack(">H", port))
    version, reply, _, atyp = struct.unpack("BBBB", _socks_recv(sock, 4))
    if reply:
        raise SocksError("it could not connect to %s:%d: %s (SOCKS5 reply %d)" % (
            host, port, SOCKS5_REPLIES.get(reply, "unknown error"), reply), reply in (3, 4, 5))
    size = {1: 4, 4: 16}.get(atyp) or struct.unpack("B", _socks_recv(sock, 1))[0]
    _socks_recv(sock, size + 2)            # the address the proxy bound: unused


def _socks4(sock, host, port, target, user):
    """SOCKS4 CONNECT to target (of _socks_targets), SOCKS4a for a name."""
    atyp, addr = target
    if atyp == 4:
        raise SocksError("SOCKS4 cannot connect to an IPv6 address (%s)" % host)
    name = addr + b"\x00" if atyp == 3 else b""
    sock.sendall(struct.pack(">BBH", 4, 1, port) + (b"\x00\x00\x00\x01" if name else addr) +
                 to_bytes(user or "") + b"\x00" + name)
    reply = struct.unpack("BB", _socks_recv(sock, 8)[:2])[1]
    if reply != 90:
        raise SocksError("it could not connect to %s:%d (SOCKS4 reply %d: %s)" % (
            host, port, reply, "rejected or failed" if reply == 91 else "identd check failed"),
            reply == 91)


def socks_connect(parts, address, timeout):
    """A socket to address (host, port) through the SOCKS proxy of urlsplit() parts.

    Raises SocksError when the proxy refuses, and socket errors when it cannot be reached.
    """
    user = password = None
    if "@" in parts.netloc:
        cred = parts.netloc.rpartition("@")[0]
        user, _, password = (unquote(x) for x in cred.partition(":"))
    host, port = address
    socks5 = parts.scheme.startswith("socks5")
    targets = _socks_targets(host, port, parts.scheme in ("socks5h", "socks4a"),
                             None if socks5 else socket.AF_INET)
    for number, target in enumerate(targets, 1):
        sock = socket.create_connection((parts.hostname, parts.port or 1080), timeout)
        try:
            if socks5:
                _socks5(sock, host, port, target, user, password)
            else:
                _socks4(sock, host, port, target, user)
            return sock
        except SocksError as exc:
            sock.close()
            if not exc.next_address or number == len(targets):
                raise
        except BaseException:
            sock.close()
            raise


class HttpClient(object):
    """http.client with a keep-alive pool, proxies, TLS options and redirects.

    Redirects are followed here (to blob storage), resolving relative Locations, and the
    Authorization header is dropped when the host changes.
    """
    REDIRECTS = (301, 302, 303, 307, 308)

    def __init__(self, cfg, proxy=None, insecure=None):
        self.timeout = cfg.timeout
        self.insecure = cfg.http_insecure if insecure is None else insecure
        self.ca_bundle = cfg.ca_bundle
        self.agent = cfg.http_agent or ("udocker.py/%s" % __version__)
        self.proxy = proxy or cfg.http_proxy
        self.pool = {}
        self.lock = threading.Lock()
        self._ssl = None

    def ssl_context(self):
        if self._ssl is None:
            if self.insecure:
                ctx = ssl.SSLContext(getattr(ssl, "PROTOCOL_TLS_CLIENT", ssl.PROTOCOL_SSLv23))
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx = ssl.create_default_context(cafile=self.ca_bundle or None)
            self._ssl = ctx
        return self._ssl

    def _proxy_for(self, scheme, host):
        if self.proxy:
            return self.proxy
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        try:
            if urllib_request.proxy_bypass(hostname):
                return None
        except (OSError, ValueError, socket.error):
            pass
        proxies = urllib_request.getproxies()
        return proxies.get(scheme) or proxies.get("all")      # all_proxy, as curl

    def _connect(self, scheme, host):
        proxy = self._proxy_for(scheme, host)
        parts = None
        if proxy:
            if "//" not in proxy:
                proxy = "http://" + proxy
            parts = urlsplit(proxy)
            if parts.scheme not in ("http", "https") + SOCKS_SCHEMES:
                raise RegistryError("unsupported proxy scheme: %s" % _without_password(proxy))
            proxy_host = parts.netloc.rpartition("@")[2]
            check_hostport(proxy_host, _without_password(proxy))
        if parts and parts.scheme in ("http", "https"):
            headers = {}
            if "@" in parts.netloc:
                cred = unquote(parts.netloc.rpartition("@")[0])
                headers["Proxy-Authorization"] = "Basic " + to_text(
                    base64.b64encode(to_bytes(cred)))
            if scheme == "https":
                conn = httplib.HTTPSConnection(proxy_host, timeout=self.timeout,
                                               context=self.ssl_context())
                conn.set_tunnel(host, headers=headers)
                return conn, False, {}
            return httplib.HTTPConnection(proxy_host, timeout=self.timeout), True, headers
        if scheme == "https":
            conn = httplib.HTTPSConnection(host, timeout=self.timeout, context=self.ssl_context())
        else:
            conn = httplib.HTTPConnection(host, timeout=self.timeout)
        if parts:               # SOCKS: http.client connects through it, TLS goes on top
            conn._create_connection = lambda address, timeout, source=None: \
                socks_connect(parts, address, timeout)
        return conn, False, {}

    def acquire(self, key):
        with self.lock:
            idle = self.pool.get(key)
            if idle:
                return idle.pop()
        return self._connect(*key)

    def release(self, key, conn, reusable):
        """Return a (connection, absolute, extra-headers) entry to the pool, or close it."""
        if not reusable:
            conn[0].close()
            return
        with self.lock:
            self.pool.setdefault(key, []).append(conn)

    def close(self):
        with self.lock:
            for conns in self.pool.values():
                for conn in conns:
                    conn[0].close()
            self.pool = {}

    def request(self, method, url, headers=None, body=None, follow=True):
        """Send one request (following redirects); returns a Response with the body unread.

        Raises the NETWORK_ERRORS of the transport; HTTP error statuses are returned.
        """
        headers = dict(headers or {})
        for _ in range(8):
            resp = self._send(method, url, headers, body)
            if not follow or resp.status not in self.REDIRECTS or not resp.header("location"):
                return resp
            resp.read_all(1 << 20)
            new_url = urljoin(url, resp.header("location"))
            if urlsplit(new_url).netloc != urlsplit(url).netloc:
                headers.pop("Authorization", None)
            if resp.status == 303:
                method, body = "GET", None
            MSG.debug("redirect %d -> %s" % (resp.status, new_url.split("?")[0]))
            url = new_url
        raise RegistryError("too many redirects from %s" % url)

    def _send(self, method, url, headers, body):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise RegistryError("unsupported URL scheme: %s" % url)
        check_hostport(parts.netloc, url)
        key = (parts.scheme, parts.netloc)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers.setdefault("User-Agent", self.agent)
        for attempt in (1, 2):
            entry = self.acquire(key)
            conn, absolute, extra = entry
            reused = attempt == 1 and getattr(conn, "sock", None) is not None
            try:
                all_headers = dict(headers)
                all_headers.update(extra)
                conn.request(method, url if absolute else path, body, all_headers)
                raw = conn.getresponse()
            except httplib.HTTPException as exc:
                conn.close()
                if reused:          # a kept-alive connection the server closed: retry once
                    continue
                raise TransportError("%s: %s" % (type(exc).__name__, exc))
            except NETWORK_ERRORS as exc:
                connected = getattr(conn, "sock", None) is not None
                conn.close()
                if reused:          # a kept-alive connection the server closed: retry once
                    continue
                proxy = self._proxy_for(*key)
                if proxy and not connected:       # no connection through it: its fault
                    raise Unreachable("proxy %s failed: %s (check --httpproxy, "
                                        "http_proxy, https_proxy and all_proxy)"
                                        % (_without_password(proxy), exc))
                raise
            return Response(self, key, entry, raw, url)
        raise RegistryError("connection to %s failed" % parts.netloc)


class TransientError(RegistryError):
    """A failure worth retrying: connection reset, timeout, 5xx, 429."""

    def __init__(self, message, retry_after=None):
        RegistryError.__init__(self, message)
        self.retry_after = retry_after


class RegistryClient(object):
    """Talks to one registry: authentication, manifests, blobs, tags, catalog.

    Thread-safe: blob downloads of one pull share it (and its token cache).
    """

    def __init__(self, cfg, url, keystore, proxy=None, insecure=None):
        self.cfg = cfg
        self.url = url.rstrip("/")
        self.insecure = cfg.http_insecure if insecure is None else insecure
        self.spoke = False          # a response came back: the scheme is settled
        self.http = HttpClient(cfg, proxy, self.insecure)
        self.keystore = keystore
        self.tokens = {}            # scope -> (header value, expiry time)
        self.basic = None           # "Basic ..." once the registry asked for it
        self.lock = threading.Lock()
        self.counts = {"manifest": 0, "blob": 0, "token": 0}

    @classmethod
    def for_host(cls, cfg, host, keystore, registry_url=None, proxy=None):
        """The client for an ImageRef host; --registry/UDOCKER_REGISTRY applied as upstream."""
        if registry_url:
            url, insecure = registry_url_of(registry_url, cfg)
            return cls(cfg, url, keystore, proxy, insecure)
        if host == DOCKER_HUB:
            return cls(cfg, cfg.dockerio_registry_url, keystore, proxy)
        return cls(cfg, "https://" + host, keystore, proxy, _insecure_host(host, cfg))

    # -- authentication

    def _credentials(self):
        try:
            return self.keystore.credentials(self.url) if self.keystore else None
        except RepositoryError as exc:
            MSG.warning(str(exc))
            return None

    def _auth_header(self, scope):
        with self.lock:
            entry = self.tokens.get(scope)
            if entry and entry[1] > time.time():
                return entry[0]
            return self.basic

    def _authenticate(self, challenge, scope):
        scheme, params = _parse_www_authenticate(challenge)
        creds = self._credentials()
        if scheme == "basic":
            if not creds:
                raise RegistryError("authentication required by %s: use `login`" % self.url)
            with self.lock:
                self.basic = "Basic " + to_text(base64.b64encode(to_bytes("%s:%s" % creds)))
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError("unsupported authentication challenge from %s: %s"
                                % (self.url, challenge[:80]))
        query = [("service", params["service"])] if params.get("service") else []
        for item in (params.get("scope") or scope or "").split(" "):
            if item:
                query.append(("scope", item))
        token_url = params["realm"] + ("&" if "?" in params["realm"] else "?") + \
            urlencode(query)
        headers = {}
        if creds:
            headers["Authorization"] = "Basic " + to_text(
                base64.b64encode(to_bytes("%s:%s" % creds)))
        self.counts["token"] += 1
        try:
            resp = self.http.request("GET", token_url, headers)
            body = resp.read_all()
        except NETWORK_ERRORS as exc:
            raise TransientError("token request to %s failed: %s"
                                 % (urlsplit(token_url).netloc, exc))
        if resp.status in (401, 403):
            raise RegistryError("authentication failed at %s: %s" % (
                self.url, "bad username or password" if creds else "login required"))
        if resp.status != 200:
            raise RegistryError("token server %s answered %d"
                                % (urlsplit(token_url).netloc, resp.status))
        try:
            answer = json_loads(body)
            token = answer.get("token") or answer.get("access_token")
            lifetime = float(answer.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token:
            raise RegistryError("token server of %s sent no token" % self.url)
        with self.lock:           # renew a little early: a request may take a while to arrive
            self.tokens[scope] = ("Bearer " + token,
                                  time.time() + lifetime - min(10.0, lifetime * 0.2))

    def request(self, method, path, scope, headers=None, stream=False):
        """An authenticated request to the registry; retries once after a 401 challenge.

        Returns the Response (body unread when stream, else read into .body).
        Raises TransientError for network errors, 5xx and 429.
        """
        url = path if "//" in path else self.url + path
        headers = dict(headers or {})
        auth_rounds = 0
        while True:
            auth = self._auth_header(scope)
            if auth:
                headers["Authorization"] = auth
            try:
                resp = self.http.request(method, url, headers)
                if resp.status in (401, 407) or not stream or resp.status >= 300:
                    resp.body = resp.read_all() if method != "HEAD" else b""
            except socket.gaierror as exc:
                raise RegistryError("cannot resolve the registry host %s: %s"
                                    % (urlsplit(url).netloc, exc.args[-1]))
            except (ssl.SSLError, ssl.CertificateError) as exc:
                if self._fall_back_to_http(url, exc):
                    url = "http://" + url.split("://", 1)[1]
                    continue
                if getattr(exc, "reason", None) in PLAIN_HTTP_REPLIES:
                    raise RegistryError("%s does not speak TLS (%s): use http://%s, or "
                                        "--insecure" % (urlsplit(url).netloc, exc.reason,
                                                        urlsplit(url).netloc))
                if "CERTIFICATE_VERIFY_FAILED" in str(exc) or \
                        isinstance(exc, ssl.CertificateError):
                    raise RegistryError("TLS certificate of %s is not trusted (%s): use "
                                        "--insecure, or set ca_bundle" % (
                                            urlsplit(url).netloc,
                                            getattr(exc, "reason", None) or exc))
                raise TransientError("%s %s: %s" % (method, url.split("?")[0], exc))
            except Unreachable as exc:            # the proxy failed (may refuse to tunnel)
                if self._fall_back_to_http(url, exc):
                    url = "http://" + url.split("://", 1)[1]
                    continue
                raise
            except NETWORK_ERRORS as exc:
                if self._fall_back_to_http(url, exc):
                    url = "http://" + url.split("://", 1)[1]
                    continue
                if getattr(exc, "errno", None) == errno.ECONNREFUSED:    # not worth a retry
                    raise Unreachable("%s refused the connection (no registry listens "
                                        "there)" % urlsplit(url).netloc)
                raise TransientError("%s %s: %s" % (method, url.split("?")[0],
                                                    exc or type(exc).__name__))
            self.spoke = True
            if resp.status == 401:
                challenge = resp.header("www-authenticate")
                if not challenge:
                    raise RegistryError("%s refused access without a challenge" % self.url)
                with self.lock:
                    self.tokens.pop(scope, None)
                if auth_rounds and challenge.lower().startswith("basic"):
                    raise RegistryError("authentication failed at %s: bad username or "
                                        "password" % self.url)
                # a second round renews an expired token; a third would loop forever
                if auth_rounds == 2 or (auth_rounds and "insufficient_scope" in challenge):
                    raise RegistryError("access denied by %s: %s (not found, or you are "
                                        "not authorised)" % (self.url, _scope_name(scope)))
                auth_rounds += 1
                self._authenticate(challenge, scope)
                continue
            if resp.status == 429 or resp.status >= 500:
                answer = "%s answered %d for %s" % (self.url, resp.status, path)
                wait = retry_after_seconds(resp.header("retry-after"))
                if wait is not None and wait > self.cfg.pull_retry_after_max:
                    raise RegistryError("%s and asks to retry after %.0f s (Retry-After: %s), "
                                        "longer than pull_retry_after_max (%g s)" % (
                                            answer, wait, resp.header("retry-after"),
                                            self.cfg.pull_retry_after_max))
                raise TransientError(answer, wait)
            return resp

    def _fall_back_to_http(self, url, exc):
        """An insecure registry that cannot be reached with TLS at first contact (its port
        speaks http, or a proxy refuses to tunnel): switch to http, once."""
        if self.spoke or not (self.insecure and url.startswith("https://") and
                              self.url.startswith("https:")):
            return False
        MSG.verbose("%s does not speak TLS (%s): using http" % (self.url, exc))
        self.url = "http://" + self.url.split("://", 1)[1]
        return True

    # -- manifests

    def get_manifest(self, remote, ref):
        """(body bytes, media type, digest) of a manifest; verified when ref is a digest."""
        scope = "repository:%s:pull" % remote
        resp = _retrying(self.cfg, lambda: self.request(
            "GET", "/v2/%s/manifests/%s" % (remote, ref), scope,
            {"Accept": ", ".join(MANIFEST_TYPES)}))
        self.counts["manifest"] += 1
        if resp.status == 404:
            raise RegistryError("image not found: %s:%s at %s" % (remote, ref, self.url))
        if resp.status != 200:
            raise RegistryError("manifest %s:%s: %s answered %d %s"
                                % (remote, ref, self.url, resp.status, _error_text(resp.body)))
        body = resp.body
        try:
            doc = json_loads(body)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError:
            raise RegistryError("manifest %s:%s from %s is not valid JSON" % (remote, ref,
                                                                             self.url))
        media = (resp.header("content-type") or "").split(";")[0].strip()
        if media not in MANIFEST_TYPES:
            media = doc.get("mediaType") or _guess_media_type(doc) or media
        if media not in MANIFEST_TYPES:
            raise RegistryError("unsupported manifest media type %r for %s:%s"
                                % (media, remote, ref))
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if media in (MT_DOCKER_V1_SIGNED, MT_DOCKER_V1):
            digest = resp.header("docker-content-digest") or digest   # JWS: hash of payload
        elif DIGEST_RE.match(ref) and digest != ref:
            raise DigestMismatch("manifest %s from %s has digest %s" % (ref, self.url, digest))
        return body, media, digest

    # -- blobs

    def open_blob(self, remote, digest, offset=0, end=None):
        """GET a blob from offset (to end, exclusive, when given); the body is unread."""
        headers = {}
        if offset or end:
            headers["Range"] = "bytes=%d-%s" % (offset, "" if end is None else end - 1)
        resp = self.request("GET", "/v2/%s/blobs/%s" % (remote, digest),
                            "repository:%s:pull" % remote, headers, stream=True)
        if resp.status == 404:
            raise RegistryError("blob not found: %s in %s" % (digest, remote))
        if resp.status not in (200, 206):
            raise RegistryError("blob %s: %s answered %d" % (digest, self.url, resp.status))
        self.counts["blob"] += 1
        return resp

    # -- listing

    def paged(self, path, scope, key):
        """Follow Link: rel=next pagination; yields the items under key of each page."""
        while path:
            resp = _retrying(self.cfg, lambda: self.request("GET", path, scope))
            if resp.status != 200:
                raise RegistryError("%s answered %d for %s %s" % (
                    self.url, resp.status, path.split("?")[0], _error_text(resp.body)))
            try:
                items = json_loads(resp.body).get(key) or []
            except (ValueError, AttributeError):
                raise RegistryError("%s sent an invalid listing" % self.url)
            for item in items:
                yield item
            link = resp.header("link") or ""
            match = re.search(r"<([^>]+)>\s*;\s*rel=\"?next\"?", link)
            path = urljoin(self.url + "/", match.group(1)) if match else None


def registry_url_of(text, cfg):
    """(URL, insecure) of a --registry value: a URL as given; a bare HOST[:PORT] is https,
    insecure (then http) by Docker's rule (_insecure_host), as `pull HOST:PORT/NAME` is."""
    if "//" in text:
        return text, cfg.http_insecure
    return "https://" + text, _insecure_host(text.split("/")[0], cfg)


# What an ssl.SSLError's reason is when the other end answered in plain http.
PLAIN_HTTP_REPLIES = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL",
                      "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG")


def _insecure_host(host, cfg):
    """Docker's rule: localhost registries, and any with --insecure, are tried with https
    without verifying the certificate, then with plain http."""
    hostname = host.rsplit(":", 1)[0].strip("[]")
    return cfg.http_insecure or hostname == "localhost" or hostname.startswith("127.") \
        or hostname == "::1"


def retry_after_seconds(value, now=None):
    """The wait a Retry-After header asks for, in seconds (RFC 9110 10.2.3: delay-seconds,
    digits only, or an HTTP-date; a date in the past is 0), or None when it is neither."""
    value = (value or "").strip()
    if re.match(r"^[0-9]+$", value):
        return float(value)
    parsed = email_utils.parsedate_tz(value) if value else None
    if not parsed:
        return None
    try:
        when = email_utils.mktime_tz(parsed[:9] + (parsed[9] or 0,))    # HTTP dates are GMT
    except (OverflowError, ValueError, TypeError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _scope_name(scope):
    return scope.split(":")[1] if scope and scope.count(":") >= 2 else scope


def _error_text(body):
    """The first error message of a registry JSON error body, or ''."""
    try:
        errors = json_loads(body).get("errors") or []
        return "(%s)" % errors[0].get("message", errors[0].get("code", ""))
    except (ValueError, AttributeError, IndexError, TypeError):
        return ""


def _guess_media_type(doc):
    if doc.get("schemaVersion") == 1:
        return MT_DOCKER_V1_SIGNED if doc.get("signatures") else MT_DOCKER_V1
    if "manifests" in doc:
        return MT_OCI_INDEX
    if "layers" in doc:
        return MT_OCI_MANIFEST
    return None


def _retrying(cfg, action, describe=None):
    """Run action(), retrying TransientError with exponential backoff (jittered)."""
    delay = 0.5
    for attempt in range(cfg.pull_retries + 1):
        try:
            return action()
        except TransientError as exc:
            if attempt >= cfg.pull_retries:
                raise RegistryError("%s (gave up after %d retries)" % (exc, attempt))
            wait = exc.retry_after if exc.retry_after is not None else delay
            MSG.verbose("retrying in %.1fs: %s" % (wait, exc))
            time.sleep(wait * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, 8.0)


class Progress(object):
    """Download progress: live lines on a terminal, one line per finished blob otherwise."""

    def __init__(self, quiet=False, stream=None):
        self.stream = stream or sys.stderr
        self.live = not quiet and MSG.level >= Messages.INF and self.stream.isatty()
        self.quiet = quiet or MSG.level < Messages.INF
        self.rows = []              # [digest, done, total, start time, finished]
        self.lock = threading.Lock()
        self.drawn = 0
        self.last = 0.0
        self.started = time.time()

    def add(self, digest, total):
        with self.lock:
            row = [digest, 0, total or 0, time.time(), False]
            self.rows.append(row)
            return row

    def update(self, row, count):
        with self.lock:
            row[1] += count
            if self.live and time.time() - self.last > 0.2:
                self._draw()

    def finish(self, row, note="downloaded"):
        with self.lock:
            row[4] = True
            if self.live:
                self._draw()
            elif not self.quiet:
                self.stream.write("Info: %s %s (%s)\n" % (note, row[0], human_size(row[1])))
                self.stream.flush()

    def close(self):
        with self.lock:
            if self.live and self.rows:
                self._draw()

    def _draw(self):
        self.last = time.time()
        lines = []
        done = total = 0
        for digest, got, size, start, finished in self.rows:
            rate = got / max(time.time() - start, 1e-3)
            state = "done" if finished else "%s/s" % human_size(rate)
            lines.append("%-19s %10s / %-10s %s" % (digest[:19], human_size(got),
                                                    human_size(size), state))
            done += got
            total += size
        lines.append("total %23s / %-10s %s/s" % (human_size(done), human_size(total),
                     human_size(done / max(time.time() - self.started, 1e-3))))
        up = "\x1b[%dA" % self.drawn if self.drawn else ""
        self.stream.write(up + "".join("\r\x1b[K" + l + "\n" for l in lines))
        self.stream.flush()
        self.drawn = len(lines)


class BlobDownloads(object):
    """Fetches the missing blobs of one pull into layers/ with a few worker threads.

    Every blob is verified by sha256 before it is renamed from layers/.DIGEST.partial to
    layers/DIGEST. A blob is a job, largest first; once a finished blob showed that one
    connection is slow, each further blob of SPLIT_MIN bytes or more becomes SEGMENT-sized
    Range jobs written in place into one pre-sized partial file (so a few large layers keep
    every connection busy on a slow link), and is hashed once all segments are in (config:
    pull_split_size, pull_segment_size). Whole
    blobs are hashed while they stream and resume with Range; split blobs resume by the
    segments listed in layers/.DIGEST.partial.json.

    Other processes: one lock file per digest stripe. A worker never waits on it: a blob
    that another pull is fetching goes back to the queue, so pulls cannot deadlock.
    """
    CHUNK = 1 << 19                      # bytes per read: ~1 recv/hash call each
    WRITE = 1 << 16                      # bytes per write call (see _stream)

    def __init__(self, repo, client, remote, progress, workers):
        self.repo, self.client, self.remote = repo, client, remote
        self.SPLIT_MIN = max(repo.cfg.pull_split_size, 1)
        self.SEGMENT = max(repo.cfg.pull_segment_size, 4096)
        self.split_rate = repo.cfg.pull_split_rate
        self.rate = None                 # bytes/s of the last whole blob of 1 MB or more
        self.progress, self.workers = progress, max(1, workers)
        self.jobs = []                   # [("blob", digest, size) | ("segment", split, i)]
        self.cond = threading.Condition()
        self.active = 0
        self.failures = []
        self.stripes = {}                # stripe -> [FileLock, holders in this process]
        self.streams = 0                 # bodies streaming now
        self.cpus = cpu_count()
        self.local = threading.local()   # .buffers: a worker's read buffers, kept for reuse

    # -- scheduling

    def run(self, blobs):
        """Download every missing (digest, size); raises the first failure."""
        self.jobs = [("blob", d, s) for d, s in sorted(blobs, key=lambda b: -b[1])
                     if not self.repo.has_blob(d)]       # largest first: balanced lanes
        threads = [threading.Thread(target=self._worker)
                   for _ in range(min(self.workers, max(1, len(self.jobs))))]
        for thread in threads:
            thread.daemon = True
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
        if self.failures:
            exc_info = self.failures[0]
            if PY3:
                raise exc_info[1].with_traceback(exc_info[2])
            raise exc_info[1]

    def _worker(self):
        while True:
            with self.cond:
                while not self.jobs and self.active and not self.failures:
                    self.cond.wait(0.5)
                if not self.jobs or self.failures:
                    self.cond.notify_all()
                    return
                job = self.jobs.pop(0)
                self.active += 1
            try:
                done = self._do(job)
            except BaseException:                       # the first one is re-raised by run
                with self.cond:
                    self.failures.append(sys.exc_info())
                    self.active -= 1
                    self.cond.notify_all()
                return
            with self.cond:
                self.active -= 1
                if not done:                            # busy in another process: later
                    self.jobs.append(job)
                self.cond.notify_all()
            if not done:
                time.sleep(0.05)

    def _do(self, job):
        """Run one job; False when the blob is being fetched by another process."""
        if job[0] == "segment":
            self._segment(job[1], job[2])
            return True
        digest, size = job[1], job[2]
        if self.repo.has_blob(digest):
            return True
        stripe = digest[7:9]
        if not self._hold(stripe):
            return False
        if self.repo.has_blob(digest):
            self._release(stripe)
            return True
        if size >= self.SPLIT_MIN and self.workers > 1 and self._slow_link():
            split = SplitBlob(self, digest, size, stripe)
            with self.cond:
                self.jobs[0:0] = [("segment", split, i) for i in split.todo[1:]]
                self.cond.notify_all()
            if split.todo:
                self._segment(split, split.todo[0])
            else:
                split.finish()
            return True
        try:
            self.whole(digest, size)
        finally:
            self._release(stripe)
        return True

    def _slow_link(self):
        """Split only where it pays: on a link where one connection proved slow (on a fast
        one, segments cost more in requests and re-reading than they save)."""
        if self.split_rate == float("inf"):
            return True
        return self.rate is not None and self.rate < self.split_rate

    def _hold(self, stripe):
        """Take the stripe's lock file without waiting (shared by this process's threads)."""
        with self.cond:
            entry = self.stripes.get(stripe)
            if entry:
                entry[1] += 1
                return True
            lock = self.repo.lock("blob-" + stripe)
            if not lock.acquire(wait=False):
                return False
            self.stripes[stripe] = [lock, 1]
            return True

    def _release(self, stripe):
        with self.cond:
            entry = self.stripes[stripe]
            entry[1] -= 1
            if not entry[1]:
                entry[0].release()
                del self.stripes[stripe]

    # -- whole blobs

    def partial(self, digest):
        return os.path.join(self.repo.layersdir, "." + digest + ".partial")

    def whole(self, digest, size):
        """Download one blob in one stream (resuming a partial file), verify, rename."""
        if os.path.exists(self.partial(digest) + ".json"):      # left by a split download
            remove_quietly(self.partial(digest))
            remove_quietly(self.partial(digest) + ".json")
        row = self.progress.add(digest, size)
        state = {"restarted": False}
        started = time.time()
        _retrying(self.repo.cfg, lambda: self._attempt(digest, size, row, state))
        if size >= (1 << 20):
            self.rate = size / max(time.time() - started, 1e-6)
        self.progress.finish(row)

    def _attempt(self, digest, size, row, state):
        partial = self.partial(digest)
        offset = os.path.getsize(partial) if os.path.exists(partial) else 0
        if size and offset > size:
            remove_quietly(partial)
            offset = 0
        hasher = hashlib.sha256()
        if offset:
            _feed(partial, hasher)
        row[1] = offset
        if not size or offset < size:
            resp = self.client.open_blob(self.remote, digest, offset)
            try:
                if offset and resp.status == 200:               # Range ignored: start over
                    MSG.verbose("server ignored Range, restarting %s" % digest[:19])
                    offset, hasher, row[1] = 0, hashlib.sha256(), 0
                elif offset and not _range_starts_at(resp.header("content-range"), offset):
                    remove_quietly(partial)
                    raise TransientError("bad Content-Range for %s" % digest[:19], 0)
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | O_CLOEXEC |
                             (os.O_APPEND if offset else os.O_TRUNC), 0o644)
                try:
                    self._stream(resp, fd, size - offset if size else 0, row, hasher)
                finally:
                    os.close(fd)
            except NETWORK_ERRORS as exc:
                raise TransientError("download of %s interrupted: %s" % (digest[:19], exc))
            finally:
                resp.close(reuse=False)
        got = os.path.getsize(partial) if os.path.exists(partial) else 0
        if size and got < size:
            raise TransientError("download of %s ended early (%d of %d bytes)"
                                 % (digest[:19], got, size))
        if "sha256:" + hasher.hexdigest() != digest:
            remove_quietly(partial)
            if offset and not state["restarted"]:      # a resumed file may be stale: once more
                state["restarted"] = True
                raise TransientError("digest mismatch after resume for %s" % digest[:19], 0)
            raise DigestMismatch("downloaded blob does not match its digest %s "
                                 "(corrupt data from the registry)" % digest)
        self.publish(digest)

    def _stream(self, resp, fd, limit, row, hasher=None, exact=False):
        """Copy the body to fd, hashing it when hasher is given; returns bytes copied.

        At most limit bytes when limit: a longer body raises DigestMismatch, unless exact
        (a Range segment), where copying stops at limit. The body is read into a buffer
        allocated once; a body of several chunks is hashed in a thread of its own while
        the next chunk is received and written, so a big blob costs max(receive + write,
        hash) rather than their sum (hashlib and os.write release the GIL). Each chunk
        is written WRITE bytes per call: writing a 1 GB blob to ext4 in 512 KiB writes
        cost 0.5-0.7 s more system CPU than in 64 KiB ones (measured on this project's
        2-core test host, cause not pinned down; 16 KiB calls cost more Python time, and
        on tmpfs the size makes no difference)."""
        pipe = None
        if hasher is not None and (not limit or limit > 4 * self.CHUNK) and self._spare_cpu():
            pipe = _HashPipe(hasher, self._buffers(3))
        buffers = self._buffers(1)
        copied = 0
        with self.cond:
            self.streams += 1
        try:
            while True:
                buf = buffers[0] if pipe is None else pipe.free_buffer()
                view = memoryview(buf)
                if limit and exact:
                    view = view[:min(self.CHUNK, limit - copied)]
                count = resp.readinto(view) if len(view) else 0
                if not count:
                    return copied
                copied += count
                if limit and copied > limit:
                    raise DigestMismatch("blob %s is larger than its manifest says"
                                         % resp.url.split("?")[0])
                view = view[:count]
                write_all(fd, view, self.WRITE)
                if pipe is not None:
                    pipe.hash(buf, count)
                elif hasher is not None:
                    hasher.update(view)
                self.progress.update(row, count)
        except BaseException:
            if pipe is not None:
                pipe.cancelled = True                # the rest need not be hashed
            raise
        finally:
            with self.cond:
                self.streams -= 1
            if pipe is not None:
                pipe.close()

    def _buffers(self, count):
        """count read buffers of this worker thread, allocated once: memory freed by one
        thread and allocated by another would stay in both threads' malloc arenas."""
        buffers = getattr(self.local, "buffers", None)
        if buffers is None:
            buffers = self.local.buffers = []
        while len(buffers) < count:
            buffers.append(bytearray(self.CHUNK))
        return buffers[:count]

    def _spare_cpu(self):
        """Whether a hash thread would have a CPU of its own: fewer bodies are streaming
        and big blobs waiting than there are CPUs (else the other downloads keep every CPU
        busy, and a hash thread only adds switches). Other programs' load is no reason to
        hash inline: measured on a host with load 13, the thread costs a lone 1 GB blob 5%
        more CPU but saves a quarter of its wall time."""
        with self.cond:
            waiting = len([j for j in self.jobs if j[0] == "blob" and j[2] > 4 * self.CHUNK])
            return self.streams + waiting < self.cpus

    def publish(self, digest):
        publish_download(self.partial(digest), self.repo.blob_path(digest))

    # -- segments of split blobs

    def _segment(self, split, index):
        _retrying(self.repo.cfg, lambda: self._segment_attempt(split, index))
        split.done_segment(index)

    def _segment_attempt(self, split, index):
        start, end = split.bounds(index)
        offset = start + split.written.get(index, 0)
        if split.whole or offset >= end:
            return
        resp = self.client.open_blob(self.remote, split.digest, offset, end)
        try:
            if resp.status == 200:                   # no Range support: one stream instead
                split.whole = True
                return
            if not _range_starts_at(resp.header("content-range"), offset):
                raise TransientError("bad Content-Range for %s" % split.digest[:19], 0)
            fd = os.open(self.partial(split.digest), os.O_WRONLY | O_CLOEXEC)
            count = 0
            try:
                os.lseek(fd, offset, os.SEEK_SET)
                count = self._stream(resp, fd, end - offset, split.row, exact=True)
            finally:                                 # a retry resumes where this one ended
                split.written[index] = offset + count - start
                os.close(fd)
        except NETWORK_ERRORS as exc:
            raise TransientError("download of %s interrupted: %s" % (split.digest[:19], exc))
        finally:
            resp.close(reuse=False)
        if split.written.get(index, 0) < end - start:
            raise TransientError("segment %d of %s ended early" % (index, split.digest[:19]))


class _HashPipe(object):
    """Hashes chunks in a thread of its own: hash(buf, count) queues one, free_buffer()
    gives back one of the buffers that the thread is done with, close() waits for the
    last. A failed hash thread cannot happen short of MemoryError; close() re-raises it."""

    def __init__(self, hasher, buffers):
        self.hasher = hasher
        self.todo = queue.Queue()
        self.free = queue.Queue()
        for buf in buffers:
            self.free.put(buf)
        self.failure = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._run)
        self.thread.daemon = True
        self.thread.start()

    def _run(self):
        while True:
            item = self.todo.get()
            if item is None:
                return
            try:
                if self.failure is None and not self.cancelled:
                    self.hasher.update(memoryview(item[0])[:item[1]])
            except BaseException as exc:             # reported by close()
                self.failure = exc
            self.free.put(item[0])

    def free_buffer(self):
        return self.free.get()

    def hash(self, buf, count):
        self.todo.put((buf, count))

    def close(self):
        self.todo.put(None)
        self.thread.join()
        if self.failure is not None and not self.cancelled:
            raise self.failure


class SplitBlob(object):
    """One large blob being fetched in segments, hashed in order as they come in (from the
    page cache, while the later ones download); the last segment in renames it."""

    def __init__(self, downloads, digest, size, stripe):
        self.dl, self.digest, self.size, self.stripe = downloads, digest, size, stripe
        self.lock = threading.Lock()
        self.whole = False
        self.written = {}
        self.row = downloads.progress.add(digest, size)
        self.count = (size + downloads.SEGMENT - 1) // downloads.SEGMENT
        partial = downloads.partial(digest)
        record = read_json(partial + ".json") or {}
        done = []
        if record.get("size") == size and record.get("segment") == downloads.SEGMENT and \
                os.path.exists(partial) and os.path.getsize(partial) == size:
            done = [i for i in record.get("done", []) if 0 <= i < self.count]
        else:
            with open(partial, "wb") as handle:
                handle.truncate(size)
        self.done = set(done)
        for i in done:
            self.row[1] += self.bounds(i)[1] - self.bounds(i)[0]
        self.todo = [i for i in range(self.count) if i not in self.done]
        self.pending = set(self.todo)
        self.hasher = hashlib.sha256()
        self.hashed = 0                  # segments 0 .. hashed-1 are in self.hasher
        self.hashing = threading.Lock()  # held by the one thread hashing

    def bounds(self, index):
        start = index * self.dl.SEGMENT
        return start, min(self.size, start + self.dl.SEGMENT)

    def done_segment(self, index):
        with self.lock:
            self.pending.discard(index)
            if not self.whole:
                self.done.add(index)
                write_atomic(self.dl.partial(self.digest) + ".json", json_dumps(
                    {"size": self.size, "segment": self.dl.SEGMENT,
                     "done": sorted(self.done)}), sync=False)    # a hint: finish() checks
            last = not self.pending
        if last:
            self.finish()
        else:
            self._hash_ready(False)

    def _hash_ready(self, wait):
        """Without wait, a thread that finds another one hashing (or finishing) leaves the
        work to it."""
        if not self.hashing.acquire(wait):
            return
        try:
            self._hash_in_order()
        finally:
            self.hashing.release()

    def _hash_in_order(self):
        """Hash the segments in, in order from the first not hashed yet (self.hashing held:
        the partial file is opened only while a segment waits, so never once finish() has
        renamed or removed it)."""
        handle = None
        try:
            while True:
                with self.lock:
                    if self.whole or self.hashed not in self.done:
                        return
                if handle is None:
                    handle = io.open(self.dl.partial(self.digest), "rb", buffering=0)
                start, end = self.bounds(self.hashed)
                handle.seek(start)
                _feed_range(handle, self.hasher, end - start, self.dl._buffers(1)[0])
                self.hashed += 1
        finally:
            if handle is not None:
                handle.close()

    def finish(self):
        """Hash the segments not hashed yet, check the digest, then publish the blob."""
        partial = self.dl.partial(self.digest)
        try:
            with self.hashing:
                if not self.whole:
                    self._hash_in_order()
                    if self.hashed == self.count and \
                            "sha256:" + self.hasher.hexdigest() == self.digest:
                        remove_quietly(partial + ".json")
                        self.dl.publish(self.digest)
                        self.dl.progress.finish(self.row)
                        return
                    MSG.verbose("segments of %s do not add up: downloading it whole"
                                % self.digest[:19])
                remove_quietly(partial + ".json")
                remove_quietly(partial)
                self.dl.whole(self.digest, self.size)
        finally:
            self.dl._release(self.stripe)


def _feed(path, *hashers):
    """Update each hasher with a file's content."""
    with open(path, "rb") as handle:
        while True:
            data = handle.read(1 << 20)
            if not data:
                return
            for hasher in hashers:
                hasher.update(data)


def _feed_range(handle, hasher, length, buf):
    """Update hasher with the next length bytes of an unbuffered file, read into buf."""
    view = memoryview(buf)
    while length > 0:
        count = handle.readinto(view[:min(length, len(view))])
        if not count:
            return
        hasher.update(view[:count])
        length -= count


def cpu_count():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):                     # 2.7
        pass
    try:
        return max(1, os.sysconf("SC_NPROCESSORS_ONLN"))
    except (AttributeError, OSError, ValueError):
        return 1


def _range_starts_at(content_range, offset):
    match = re.match(r"bytes\s+(\d+)-", content_range or "")
    return bool(match) and int(match.group(1)) == offset


def select_platform(index, wanted, ref):
    """The descriptor of an index/manifest list that matches the wanted Platform.

    An exact variant match wins over an entry without a variant; attestation entries
    (unknown/unknown) are never chosen. Raises RegistryError listing what is available.
    """
    best = None
    available = []
    for entry in index.get("manifests") or []:
        plat = entry.get("platform") or {}
        os_name, arch = plat.get("os", ""), plat.get("architecture", "")
        if os_name == "unknown" or not arch:
            continue
        available.append(platform_text(plat))
        if wanted.matches(os_name, arch, plat.get("variant", "")):
            exact = (plat.get("variant") or "") == (wanted.variant or "")
            if best is None or (exact and not best[0]):
                best = (exact, entry)
    if best is None:
        raise RegistryError("no image for platform %s in %s (available: %s)"
                            % (wanted, ref, ", ".join(available) or "none"))
    return best[1]


def manifest_blobs(manifest, media):
    """[(digest, size)] of a single-platform manifest: config first, then layers base-first."""
    try:
        if media in (MT_DOCKER_V1, MT_DOCKER_V1_SIGNED):
            blobs = [(l["blobSum"], 0) for l in reversed(manifest["fsLayers"])]
        else:
            blobs = [(manifest["config"]["digest"], int(manifest["config"].get("size", 0)))]
            blobs += [(l["digest"], int(l.get("size", 0))) for l in manifest["layers"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise RegistryError("malformed manifest (missing layers or config)")
    for digest, size in blobs:
        if not DIGEST_RE.match(str(digest)):
            raise RegistryError("unsupported or invalid blob digest in manifest: %r" % digest)
    seen = set()
    unique = []
    for item in blobs:
        if item[0] not in seen:
            seen.add(item[0])
            unique.append(item)
    return unique


class Puller(object):
    """Pulls one image reference into the local repository."""

    def __init__(self, cfg, repo, keystore, registry_url=None, proxy=None, quiet=False):
        self.cfg, self.repo, self.keystore = cfg, repo, keystore
        self.registry_url, self.proxy, self.quiet = registry_url, proxy, quiet

    def client(self, ref):
        return RegistryClient.for_host(self.cfg, ref.host, self.keystore, self.registry_url,
                                       self.proxy)

    def pull(self, ref, wanted=None):
        """Pull ref for the wanted Platform (default: the host's); returns the LocalImage."""
        wanted = wanted or Platform.host()
        client = self.client(ref)
        self.repo.ensure()
        self.repo.check_writable()
        record = read_json(self.repo.record_path(ref.name, ref.local_tag)) or {}
        writer = self.repo.writer("pull")
        try:
            body, media, digest, index_digest = self.resolve(client, ref, wanted, record)
            manifest = json_loads(body)
            blobs = manifest_blobs(manifest, media)
            if self._up_to_date(ref, record, digest, blobs):
                MSG.info("image is up to date: %s" % ref)
                return self.repo.image(ref.name, ref.local_tag)
            MSG.info("pulling %s (%s) from %s" % (ref, wanted, client.url))
            self._fetch_all(client, ref, blobs)
            new_record = {"reference": str(ref), "registry": client.url,
                          "repository": ref.remote, "manifest_digest": digest,
                          "media_type": media, "index_digest": index_digest,
                          "platform": self._platform_of(blobs, media, manifest, wanted),
                          "platform_wanted": str(wanted),
                          "pulled": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                self.repo.commit_image_v2(ref.name, ref.local_tag, body,
                                          [d for d, _ in blobs], new_record)
            except RepositoryError:            # an rmi removed a shared blob meanwhile
                self._fetch_all(client, ref, blobs)
                self.repo.commit_image_v2(ref.name, ref.local_tag, body,
                                          [d for d, _ in blobs], new_record)
            return self.repo.image(ref.name, ref.local_tag)
        finally:
            client.http.close()
            writer.close()

    def resolve(self, client, ref, wanted, record=None):
        """(body, media, digest, index digest or None) of the manifest for ref/platform.

        When the tag still points at what we pulled last time and it was for
        the same platform, use the stored manifest instead of fetching it again."""
        body, media, digest = client.get_manifest(ref.remote, ref.local_tag)
        if media not in INDEX_TYPES:
            return body, media, digest, None
        tag_manifest = os.path.join(self.repo.tag_dir(ref.name, ref.local_tag), "manifest")
        record = record or {}
        if record.get("index_digest") == digest and \
                record.get("platform_wanted", record.get("platform")) == str(wanted) and \
                os.path.exists(tag_manifest):
            with open(tag_manifest, "rb") as handle:
                stored = handle.read()
            return stored, record.get("media_type"), record.get("manifest_digest"), digest
        entry = select_platform(json_loads(body), wanted, str(ref))
        mbody, mmedia, mdigest = client.get_manifest(ref.remote, entry["digest"])
        if mmedia in INDEX_TYPES:
            raise RegistryError("nested image index in %s is not supported" % ref)
        return mbody, mmedia, mdigest, digest

    def _up_to_date(self, ref, record, digest, blobs):
        return (self.repo.has_image(ref.name, ref.local_tag)
                and record.get("manifest_digest") == digest
                and all(self.repo.has_blob(d) for d, _ in blobs))

    def _platform_of(self, blobs, media, manifest, wanted):
        if media in (MT_DOCKER_V1, MT_DOCKER_V1_SIGNED):
            return "%s/%s" % ("linux", manifest.get("architecture", wanted.arch))
        config = read_json(self.repo.blob_path(blobs[0][0])) or {}
        found = platform_text(config, "")
        if found and config.get("architecture") and \
                not wanted.matches(config.get("os", "linux"), config["architecture"],
                                   config.get("variant", "")):
            MSG.warning("image platform %s does not match the requested %s" % (found, wanted))
        return found or str(wanted)

    def _fetch_all(self, client, ref, blobs):
        """Download the missing blobs, pull_parallel connections at a time."""
        progress = Progress(self.quiet)
        try:
            BlobDownloads(self.repo, client, ref.remote, progress,
                          self.cfg.pull_parallel).run(blobs)
        finally:
            progress.close()


# ==== 7. Image formats ====
# docker-save archives of every vintage and OCI image layouts in (load), docker-save archives
# out (save), root file system tarballs in as one-layer images (import). An archive is read
# in one streaming pass (stdin cannot seek): every regular member is copied into a staging
# directory under layers/ while it is hashed; member names are dictionary keys, never paths
# on disk. Images are stored in the v2 layout (manifest + sha256 links), which upstream reads.

MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
IMAGE_MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_V2)
ARCHIVE_CHUNK = 1 << 20
LINK_HOPS = 16                  # a longer chain of links inside an archive is treated as broken
SAVE_MTIME = 0                  # mtime of every member save writes: the same images, same bytes
BLOB_NAME_RE = LazyRegex(r"^blobs/sha256/([a-f0-9]{64})$")
COMPRESSION_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                     (b"\x28\xb5\x2f\xfd", "zstd"))
LAYER_MEDIA_SUFFIX = {"": "", "gzip": "+gzip", "zstd": "+zstd"}
DECOMPRESS_PROGRAMS = {"gzip": "gzip", "bzip2": "bzip2", "xz": "xz", "zstd": "zstd"}
IN_CHUNK = 1 << 18              # compressed bytes read at a time
OUT_CHUNK = 1 << 20             # most decompressed bytes produced at a time (bounds memory)


class ArchiveError(UdockerError):
    """An image archive or tarball that cannot be used: not a tar, truncated, inconsistent."""


class LayerError(RepositoryError):
    """A layer that cannot be read (corrupt, truncated, not decompressable), raised where
    that is found: "layer LABEL: REASON". label and reason are kept, so that a reader of a
    tarball (import) can say it of the tarball instead (see _tarball_errors)."""

    def __init__(self, label, reason):
        RepositoryError.__init__(self, "layer %s: %s" % (label, reason))
        self.label, self.reason = label, reason


def binary_stdin():
    return getattr(sys.stdin, "buffer", sys.stdin)


def binary_stdout():
    return getattr(sys.stdout, "buffer", sys.stdout)


def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def compression_of(head):
    """'gzip', 'bzip2', 'xz', 'zstd' or '' (none) from the first bytes of a file."""
    for magic, kind in COMPRESSION_MAGIC:
        if head.startswith(magic):
            return kind
    return ""


# -- decompression: the bytes of a layer file or tarball as decompressed chunks, whatever
# the compression, for create (section 8), import and save

def layer_compression(handle):
    """'gzip', 'bzip2', 'xz', 'zstd' or 'tar', from the magic bytes (never the name)."""
    handle.seek(0)
    head = handle.read(6)
    handle.seek(0)
    return compression_of(head) or "tar"


class Rewindable(object):
    """A stream that cannot seek (a pipe, a download) made to go back to its start once,
    after its first bytes were read: what layer_compression needs to look at them. It has
    no fileno(), so a program decompressing it is fed through a pipe."""

    def __init__(self, stream):
        self.stream = stream
        self.head = b""         # the bytes read before the rewind
        self.pos = 0            # offset in head; None once past it for good
        self.rewound = False

    def seek(self, pos, whence=os.SEEK_SET):
        if pos != 0 or whence != os.SEEK_SET or self.pos is None:
            raise IOError(errno.ESPIPE, "cannot seek in a stream")
        self.rewound = self.rewound or self.pos > 0
        self.pos = 0
        return 0

    def read(self, size=-1):
        if self.pos is None:
            return self.stream.read(size)
        if self.pos < len(self.head):
            end = len(self.head) if size is None or size < 0 else self.pos + size
            data = self.head[self.pos:end]
            self.pos += len(data)
            return data
        data = self.stream.read(size)
        if self.rewound:
            self.pos = None
        else:
            self.head += data
            self.pos += len(data)
        return data


class TeeReader(object):
    """A stream whose every byte read is also given to sink(data): import stores and hashes
    a tarball as it comes while the same bytes are decompressed. It has no fileno(), so a
    program decompressing it is fed through a pipe (by read: sink still sees every byte)."""

    def __init__(self, stream, sink):
        self.stream, self.sink = stream, sink

    def read(self, size=-1):
        data = self.stream.read(size)
        self.sink(data)
        return data


def _file_chunks(handle):
    while True:
        data = handle.read(IN_CHUNK)
        if not data:
            return
        yield data


def _zlib_ended(dec):
    """True once a gzip member is complete (2.7's decompressobj has no eof: probe it)."""
    ended = getattr(dec, "eof", None)
    if ended is not None:
        return ended
    if dec.unused_data:
        return True
    try:
        dec.decompress(b"\0")        # an ended stream keeps the byte as unused data
    except zlib.error:
        return False
    return bool(dec.unused_data)


def _decompress(dec, data, kind, label):
    """dec.decompress(data, OUT_CHUNK); what a decompressor raises for bad data (zlib.error,
    LZMAError, bz2's OSError without errno ...) raised as RepositoryError naming the layer.
    Only here: an error of the stream being read (a download) stays what it is."""
    try:
        return dec.decompress(data, OUT_CHUNK)
    except Exception as exc:
        raise LayerError(label, "corrupt %s data (%s)" % (kind, exc))


def _inflate_gzip(handle, label):
    """Decompressed chunks of one or more concatenated gzip members."""
    dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for data in _file_chunks(handle):
        while data:
            out = _decompress(dec, data, "gzip", label)
            if out:
                yield out
            data = dec.unconsumed_tail
            if not data and dec.unused_data:        # a member ended; another may follow
                data = dec.unused_data
                if not data.strip(b"\0"):
                    break                           # zero padding after the last member
                dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
    while True:                  # output still held back by the OUT_CHUNK limit
        out = _decompress(dec, b"", "gzip", label)
        if not out:
            break
        yield out
    if not _zlib_ended(dec):
        raise LayerError(label, "truncated gzip data")


def _inflate_buffered(handle, factory, kind, label):
    """Decompressed chunks of concatenated bzip2/xz/zstd streams (Python 3 decompressors)."""
    dec = factory()
    for data in _file_chunks(handle):
        while True:
            if dec.eof:
                data = dec.unused_data + data
                if not data.strip(b"\0"):
                    break
                dec = factory()
            out = _decompress(dec, data, kind, label)
            data = b""
            if out:
                yield out
            if not dec.eof and dec.needs_input:
                break
    if not dec.eof:
        raise LayerError(label, "truncated %s data" % kind)


def _program_chunks(handle, program, kind, label):
    """Decompressed chunks from `program -dc` reading the layer file on its stdin (fed by a
    thread when the layer is a stream without a file descriptor)."""
    fileno = getattr(handle, "fileno", None)
    if fileno:
        os.lseek(fileno(), 0, os.SEEK_SET)
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen([program, "-dc"], stdin=fileno() if fileno else subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=errors, close_fds=True)
    if not fileno:
        feeder = threading.Thread(target=_feed_program, args=(handle, proc.stdin))
        feeder.daemon = True
        feeder.start()
    try:
        while True:
            data = proc.stdout.read(OUT_CHUNK)
            if not data:
                break
            yield data
        if proc.wait() != 0:
            errors.seek(0)
            lines = to_text(errors.read()).strip().splitlines() or ["exit status %d"
                                                                   % proc.returncode]
            raise LayerError(label, "%s -dc failed: %s" % (kind, lines[-1]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        errors.close()


def _feed_program(handle, pipe):
    """Copy a stream to a program's stdin (which may stop reading early: EPIPE)."""
    try:
        for data in _file_chunks(handle):
            pipe.write(data)
    except (IOError, OSError):
        pass
    finally:
        try:
            pipe.close()
        except (IOError, OSError):
            pass


def _prefetch(chunks, depth=4):
    """Chunks of a generator computed ahead in a thread: zlib and file reads release the
    GIL, so decompression runs on another core while files are written."""
    todo = queue.Queue(depth)
    stop = []

    def put(item):
        while not stop:
            try:
                todo.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work():
        try:
            for chunk in chunks:
                put((chunk, None))
                if stop:
                    return
            put((None, None))
        except BaseException:              # handed over to the reading thread
            put((None, sys.exc_info()))

    thread = threading.Thread(target=work)
    thread.daemon = True
    thread.start()
    try:
        while True:
            chunk, failure = todo.get()
            if chunk is None:
                break
            yield chunk
        if failure is not None:
            if PY3:
                raise failure[1].with_traceback(failure[2])
            raise failure[1]
    finally:
        stop.append(True)
        while thread.is_alive():
            try:
                todo.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
        chunks.close()


def layer_chunks(handle, label, kind=None, program_path=""):
    """Generator of the decompressed bytes of an open layer file or stream, whatever its
    compression (kind: what layer_compression says, which seeks to look; given, the handle
    is read from where it is).

    Raises LayerError for truncated or corrupt compressed data, or when neither Python nor
    a program on program_path (the session's $PATH) can decompress it.
    """
    kind = kind or layer_compression(handle)
    if kind == "tar":
        return _file_chunks(handle)
    if kind == "gzip":
        return _prefetch(_inflate_gzip(handle, label))
    factory = buffered_decompressor(kind)
    if factory is not None:
        return _prefetch(_inflate_buffered(handle, factory, kind, label))
    program = which(DECOMPRESS_PROGRAMS[kind], program_path)
    if program:
        return _prefetch(_program_chunks(handle, program, kind, label))
    raise LayerError(label, "%s-compressed data: this Python cannot decompress it and no %s "
                     "program was found" % (kind, DECOMPRESS_PROGRAMS[kind]))


def _tarball_errors(label, action, *args):
    """action(*args), a LayerError (the tarball read as a layer) raised as an ArchiveError
    naming the tarball LABEL instead."""
    try:
        return action(*args)
    except LayerError as exc:
        raise ArchiveError("%s: %s" % (label, exc.reason))


def uncompressed_digest(path, program_path):
    """sha256:HEX of a layer file's uncompressed content: its diff_id."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for data in layer_chunks(handle, os.path.basename(path), None, program_path):
            hasher.update(data)
    return "sha256:" + hasher.hexdigest()


def _reason(exc):
    """The first line of an exception's text (Python 3.13's tarfile writes several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _inside(path):
    """The normalised archive path, or None when it is absolute or leaves the archive."""
    if not path or path.startswith("/"):
        return None
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


def member_name(raw, label):
    """The canonical name of an archive member ('./a//b' -> 'a/b').

    Raises ArchiveError for absolute names and names with a '..' component: no docker or
    OCI tool writes them, so the archive is broken or hostile.
    """
    name = to_text(raw)
    if name.startswith("/") or ".." in name.split("/"):
        raise ArchiveError("%s: unsafe member name in archive: %s" % (label, show_name(name)))
    return posixpath.normpath(name)


class StagedFile(object):
    """A regular archive member copied to the staging directory: path, sha256 hex, size,
    first bytes (to tell the compression)."""
    __slots__ = ("name", "path", "hexdigest", "size", "head")

    def __init__(self, name, path, hexdigest, size, head):
        self.name, self.path, self.hexdigest, self.size, self.head = \
            name, path, hexdigest, size, head

    @property
    def digest(self):
        return "sha256:" + self.hexdigest


class ArchiveReader(object):
    """The members of an image archive, read in one pass into a staging directory.

    files: member name -> StagedFile; links: member name -> target member name (symlinks
    resolved against their directory, None when they point out of the archive).
    """

    def __init__(self, staging, label):
        self.staging, self.label = staging, label
        self.files, self.links = {}, {}
        self.count = 0

    def read(self, stream):
        """Copy every regular member of the tar stream; raises ArchiveError if unreadable."""
        try:
            archive = tarfile.open(fileobj=stream, mode="r|*")
            try:
                for member in archive:
                    self._take(archive, member)
            finally:
                archive.close()
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            if not self.count:
                raise ArchiveError("%s is not a tar archive (%s)" % (self.label, _reason(exc)))
            raise ArchiveError("%s is truncated or corrupt (%s)" % (self.label, _reason(exc)))
        if not self.count:
            raise ArchiveError("%s is empty or not a tar archive" % self.label)

    def _take(self, archive, member):
        name = member_name(member.name, self.label)
        self.count += 1
        if member.isreg():
            self._spool(archive.extractfile(member), member.size, name)
        elif member.issym():
            self._forget(name)
            self.links[name] = None if member.linkname.startswith("/") else \
                _inside(posixpath.join(posixpath.dirname(name), to_text(member.linkname)))
        elif member.islnk():
            self._forget(name)
            self.links[name] = _inside(to_text(member.linkname))

    def _forget(self, name):
        """A later member of the same name wins, as it would when extracting."""
        old = self.files.pop(name, None)
        if old is not None:
            remove_quietly(old.path)
        self.links.pop(name, None)

    def _spool(self, source, size, name):
        path = os.path.join(self.staging, "m%d" % self.count)
        hasher = hashlib.sha256()
        head, copied = b"", 0
        with open(path, "wb") as handle:
            while True:
                data = source.read(ARCHIVE_CHUNK)
                if not data:
                    break
                head = head or data[:8]
                hasher.update(data)
                handle.write(data)
                copied += len(data)
        if copied != size:               # Python 2 returns short data instead of raising
            raise ArchiveError("%s is truncated (in member %s)" % (self.label, name))
        self._forget(name)
        self.files[name] = StagedFile(name, path, hasher.hexdigest(), size, head)

    def find(self, name):
        """The StagedFile a member name leads to (following links), or None."""
        key = _inside(name or "")
        for _ in range(LINK_HOPS):
            if key is None:
                return None
            if key in self.files:
                return self.files[key]
            key = self.links.get(key)
        return None

    def entry(self, name, what="member"):
        """Like find(), but raises ArchiveError when it is missing, or when a blobs/sha256/HEX
        member (asked for, or reached through links) does not hash to HEX."""
        found = self.find(name)
        if found is None:
            raise ArchiveError("%s: %s %s is not in the archive" % (self.label, what, name))
        for path in (_inside(name), found.name):
            match = BLOB_NAME_RE.match(path or "")
            if match and match.group(1) != found.hexdigest:
                raise ArchiveError("%s: %s does not match its digest (corrupt archive)"
                                   % (self.label, path))
        return found

    def blob(self, descriptor, what="blob"):
        """The verified StagedFile an OCI descriptor names (digest and size checked)."""
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if not DIGEST_RE.match(str(digest)):
            raise ArchiveError("%s: unsupported or invalid digest %r" % (self.label, digest))
        found = self.entry("blobs/sha256/" + digest[7:], what)
        size = descriptor.get("size")
        if size is not None and size != found.size:
            raise ArchiveError("%s: %s %s has %d bytes, its descriptor says %s"
                               % (self.label, what, digest, found.size, size))
        return found

    def data(self, staged):
        if staged.size > MANIFEST_MAX:
            raise ArchiveError("%s: %s is too large for a JSON document" % (self.label,
                                                                          staged.name))
        with open(staged.path, "rb") as handle:
            return handle.read()

    def json(self, staged, kind=dict):
        """The parsed JSON of a staged member; raises ArchiveError unless it is a `kind`."""
        try:
            doc = json_loads(self.data(staged))
        except ValueError:
            doc = None
        if not isinstance(doc, kind):
            raise ArchiveError("%s: %s is not a valid JSON %s" % (
                self.label, staged.name, "list" if kind is list else "object"))
        return doc


class ArchiveImage(object):
    """One image found in an archive: its manifest (bytes as stored, or made for a classic
    docker-save), the staged config and layers, and its names [(name or None, tag)]."""

    def __init__(self, manifest, media, config, layers, names, config_doc):
        self.manifest, self.media, self.config, self.layers = manifest, media, config, layers
        self.names = list(names)
        self.config_doc = config_doc
        self.digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    def blobs(self):
        """[(digest, StagedFile)], config first, each digest once."""
        seen, found = set(), []
        for staged in [self.config] + self.layers:
            if staged.digest not in seen:
                seen.add(staged.digest)
                found.append((staged.digest, staged))
        return found

    @property
    def platform(self):
        return platform_text(self.config_doc)


def make_manifest(config, layers):
    """OCI manifest bytes for a config and layers given as (digest, size, compression)."""
    doc = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
           "config": {"mediaType": MT_OCI_CONFIG, "digest": config[0], "size": config[1]},
           "layers": [{"mediaType": MT_OCI_LAYER + LAYER_MEDIA_SUFFIX.get(kind, ""),
                       "digest": digest, "size": size} for digest, size, kind in layers]}
    return to_bytes(json_dumps(doc))


def _staged_blob(staged):
    return (staged.digest, staged.size, compression_of(staged.head))


def _check_layers(reader, config_doc, layers, what):
    """The config's diff_ids must list the layers: their number always, their digests when
    a layer is not compressed (a compressed one would have to be inflated to tell)."""
    diff_ids = (config_doc.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list):
        return
    if len(diff_ids) != len(layers):
        raise ArchiveError("%s: %s: the image config lists %d layers, the manifest %d"
                           % (reader.label, what, len(diff_ids), len(layers)))
    for diff_id, layer in zip(diff_ids, layers):
        if not compression_of(layer.head) and diff_id != layer.digest:
            raise ArchiveError("%s: layer %s does not match the image config (diff_id %s)"
                               % (reader.label, layer.name, diff_id))


def _archive_name(text, reader):
    """(name, tag) of an image name found in an archive; name is None for a bare tag (OCI
    ref.name "latest"). Raises ArchiveError for names that cannot be stored."""
    if not isinstance(text or "", (str, text_type)):
        raise ArchiveError("%s: invalid image name in archive: %r" % (reader.label, text))
    text = to_text(text or "").strip()
    if "/" not in text and ":" not in text and "@" not in text and TAG_RE.match(text):
        return (None, text)
    try:
        ref = ImageRef.parse(text)
    except UsageError:
        raise ArchiveError("%s: invalid image name in archive: %r" % (reader.label, text))
    return (ref.name, ref.local_tag)


def _familiar(name):
    """containerd's names are fully qualified, docker's are not: 'docker.io/library/x:1'
    -> 'x:1', 'docker.io/ns/x:1' -> 'ns/x:1'."""
    for prefix in ("docker.io/library/", "docker.io/"):
        rest = name[len(prefix):]
        if name.startswith(prefix) and (prefix == "docker.io/" or "/" not in rest):
            return rest
    return name


def _annotation_names(descriptor, reader):
    notes = descriptor.get("annotations") or {}
    if notes.get("io.containerd.image.name"):
        return [_archive_name(_familiar(notes["io.containerd.image.name"]), reader)]
    if notes.get("org.opencontainers.image.ref.name"):
        return [_archive_name(notes["org.opencontainers.image.ref.name"], reader)]
    return []


def _index_entries(doc, reader, what):
    entries = doc.get("manifests")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ArchiveError("%s: %s has no list of manifests" % (reader.label, what))
    return entries


def _descriptor_doc(reader, descriptor):
    """(bytes, media type, parsed document) of the manifest or index a descriptor names."""
    staged = reader.blob(descriptor, "manifest")
    body = reader.data(staged)
    doc = reader.json(staged)
    media = descriptor.get("mediaType") or doc.get("mediaType") or _guess_media_type(doc)
    return body, media, doc


def _pick_manifest(reader, descriptor, depth=0):
    """(bytes, media, doc) of the image manifest a descriptor leads to. In an image index:
    the host's platform, else the first platform whose manifest is in the archive."""
    body, media, doc = _descriptor_doc(reader, descriptor)
    if media in IMAGE_MANIFEST_TYPES:
        return body, media, doc
    if media not in INDEX_TYPES or depth > 4:
        raise ArchiveError("%s: unsupported manifest type %s" % (reader.label, media))
    present = [d for d in _index_entries(doc, reader, "image index")
               if DIGEST_RE.match(str(d.get("digest")))
               and reader.find("blobs/sha256/" + d["digest"][7:])]
    if not present:
        raise ArchiveError("%s: no manifest of image index %s is in the archive"
                           % (reader.label, descriptor.get("digest")))
    try:
        chosen = select_platform({"manifests": present}, Platform.host(), reader.label)
    except RegistryError:
        real = [d for d in present if (d.get("platform") or {}).get("os") != "unknown"]
        chosen = (real or present)[0]
        MSG.warning("%s: no manifest for this host (%s) in image index %s: loading %s"
                    % (reader.label, Platform.host(), descriptor.get("digest"),
                       chosen.get("digest")))
    return _pick_manifest(reader, chosen, depth + 1)


def _manifest_image(reader, body, media, doc, names):
    try:
        config_desc, layer_descs = doc["config"], list(doc["layers"])
    except (KeyError, TypeError):
        raise ArchiveError("%s: a manifest has no config or layers" % reader.label)
    config = reader.blob(config_desc, "image config")
    layers = [reader.blob(d, "layer") for d in layer_descs]
    config_doc = reader.json(config)
    _check_layers(reader, config_doc, layers, config.digest)
    return ArchiveImage(body, media, config, layers, names, config_doc)


def _oci_images(reader):
    """The images of an OCI layout: one per manifest index.json leads to, names from the
    annotations of its entries (an image several entries lead to gets all their names)."""
    index = reader.json(reader.entry("index.json"))
    images, by_digest = [], {}
    for descriptor in _index_entries(index, reader, "index.json"):
        names = _annotation_names(descriptor, reader)
        body, media, doc = _pick_manifest(reader, descriptor)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if digest in by_digest:
            by_digest[digest].names.extend(names)
            continue
        image = _manifest_image(reader, body, media, doc, names)
        by_digest[digest] = image
        images.append(image)
    if not images:
        raise ArchiveError("%s: index.json lists no images" % reader.label)
    return images


def _known_manifests(reader):
    """{(config hex, (layer hexes)): (manifest bytes, media)} of every manifest reachable from
    index.json whose blob is in the archive: a Docker 25 archive holds both an OCI layout and
    a manifest.json, and the stored manifest keeps the image's digest."""
    found, seen = {}, set()
    todo = list(_index_entries(reader.json(reader.entry("index.json")), reader, "index.json"))
    while todo:
        descriptor = todo.pop(0)
        digest = str(descriptor.get("digest"))
        if digest in seen or not DIGEST_RE.match(digest) or \
                not reader.find("blobs/sha256/" + digest[7:]):
            continue
        seen.add(digest)
        body, media, doc = _descriptor_doc(reader, descriptor)
        if media in INDEX_TYPES:
            todo.extend(_index_entries(doc, reader, "image index " + digest))
        elif media in IMAGE_MANIFEST_TYPES:
            try:
                key = (doc["config"]["digest"][7:],
                       tuple(l["digest"][7:] for l in doc["layers"]))
            except (KeyError, TypeError, AttributeError):
                continue
            found[key] = (body, media)
    return found


def _docker_images(reader):
    """The images of a docker-save manifest.json, layers in its Layers order (base first)."""
    entries = reader.json(reader.entry("manifest.json"), list)
    known = _known_manifests(reader) if reader.find("index.json") else {}
    images = []
    for item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("Config"), (str, text_type)) \
                or not isinstance(item.get("Layers"), list) or \
                not all(isinstance(name, (str, text_type)) for name in item["Layers"]):
            raise ArchiveError("%s: manifest.json: an entry has no Config or Layers"
                               % reader.label)
        if not isinstance(item.get("RepoTags") or [], list):
            raise ArchiveError("%s: manifest.json: RepoTags is not a list" % reader.label)
        config = reader.entry(item["Config"], "image config")
        layers = [reader.entry(name, "layer") for name in item["Layers"]]
        config_doc = reader.json(config)
        _check_layers(reader, config_doc, layers, item["Config"])
        key = (config.hexdigest, tuple(l.hexdigest for l in layers))
        if key in known:
            body, media = known[key]
        else:
            body = make_manifest(_staged_blob(config)[:2], [_staged_blob(l) for l in layers])
            media = MT_OCI_MANIFEST
        names = [_archive_name(tag, reader) for tag in item.get("RepoTags") or []]
        images.append(ArchiveImage(body, media, config, layers, names, config_doc))
    if not images:
        raise ArchiveError("%s: manifest.json lists no images" % reader.label)
    return images


def find_images(reader):
    """Every image in a read archive: docker-save (manifest.json) or OCI layout."""
    if reader.find("manifest.json"):
        return _docker_images(reader)
    if reader.find("index.json"):
        return _oci_images(reader)
    raise ArchiveError("%s is not a docker-save or OCI archive (no manifest.json or "
                       "index.json); a root file system tarball is loaded with: import"
                       % reader.label)


def _parse_rename(text):
    """load's NAME argument -> (name, tag or None when NAME has no tag)."""
    ref = ImageRef.parse(text)
    has_tag = ":" in text.rsplit("/", 1)[-1] or "@" in text
    return ref.name, (ref.local_tag if has_tag else None)


def name_targets(images, rename=None):
    """[(image, [(name, tag)])]: where each image goes. load NAME replaces the image name
    (tags kept), NAME:TAG names the one image. Raises, before anything is written, when two
    different images would get one name; an image with no name gets loaded-CONFIGID."""
    new_name, new_tag = _parse_rename(rename) if rename else (None, None)
    owner, targets = {}, []
    for image in images:
        if new_tag:
            names = [(new_name, new_tag)]
        elif new_name:
            names = [(new_name, tag) for _, tag in image.names] or [(new_name, "latest")]
        else:
            names = [(name, tag) for name, tag in image.names if name]
            if not names:
                names = [("loaded-" + image.config.hexdigest[:12],
                          ([t for _, t in image.names] or ["latest"])[0])]
                MSG.warning("an image in the archive has no name: loading it as %s:%s "
                            "(load NAME chooses one)" % names[0])
        unique = []
        for target in names:
            if owner.setdefault(target, image.digest) != image.digest:
                raise ArchiveError("the archive has two different images for %s:%s"
                                   % target + (" (NAME:TAG names only one)" if new_tag
                                               else ""))
            if target not in unique:
                unique.append(target)
        targets.append((image, unique))
    return targets


def store_images(repo, targets, label):
    """Put every image's blobs into layers/ and commit its tags (an existing tag is
    replaced, as docker does). Returns the stored 'name:tag's."""
    for _, names in targets:
        for name, tag in names:
            check_local_name(name)
            if os.path.exists(os.path.join(repo.tag_dir(name, tag), PROTECT)):
                raise RepositoryError("image is protected: %s:%s (unprotect it to replace it)"
                                      % (name, tag))
    stored = []
    for image, names in targets:
        record = {"source": "load", "archive": show_name(label, 4096),
                  "manifest_digest": image.digest,
                  "media_type": image.media, "platform": image.platform, "loaded": utc_now()}
        for name, tag in names:
            if repo.has_image(name, tag):
                MSG.info("replacing image: %s:%s" % (name, tag))
            commit_staged(repo, name, tag, image.manifest, image.blobs(), record)
            stored.append("%s:%s" % (name, tag))
    return stored


def commit_staged(repo, name, tag, manifest, blobs, record):
    """Link staged blobs [(digest, StagedFile)] into layers/ and commit the tag; once more
    if an rmi running meanwhile removed a blob another image shared with this one."""
    for attempt in (1, 2):
        for digest, staged in blobs:
            repo.store_blob(staged.path, digest)
        try:
            repo.commit_image_v2(name, tag, manifest, [d for d, _ in blobs], record)
            return
        except RepositoryError:
            if attempt == 2:
                raise


def load_archive(repo, source, rename=None):
    """Load every image of a docker-save or OCI archive (source: a path, '-' for stdin).

    Nothing is stored until the whole archive has been read and checked. Returns the
    'name:tag's stored; raises ArchiveError for unusable archives.
    """
    if rename:
        _parse_rename(rename)
    repo.check_writable()
    with repo.writer("load"), WorkDir(repo.layersdir, "load") as staging:
        if source == "-":
            reader = ArchiveReader(staging.path, "standard input")
            reader.read(binary_stdin())
        else:
            reader = ArchiveReader(staging.path, source)
            with open(source, "rb") as handle:
                reader.read(handle)
        targets = name_targets(find_images(reader), rename)
        return store_images(repo, targets, reader.label)


# -- save: docker-save archives (classic layout, which docker, skopeo, podman and upstream
# udocker load; upstream 1.3 would name images at random if an oci-layout were added)

def _save_config(image, program_path):
    """(config bytes, diff_ids) for saving an image. A pulled or loaded v2 image's config is
    kept byte for byte (its digest is the image id); v1 and schema 1 images get one built,
    with diff_ids computed from their layers."""
    raw = None
    if image.config_path and os.path.exists(image.config_path):
        with open(image.config_path, "rb") as handle:
            raw = handle.read()
    schema2 = image.version == "v2" and "layers" in (image.manifest or {})
    if schema2 and raw is None:
        raise RepositoryError("image %s is incomplete: its config blob is missing" % image.ref)
    try:
        doc = json_loads(raw) if raw else dict(image.config)
    except ValueError:
        raise RepositoryError("image %s: its config is not JSON" % image.ref)
    diff_ids = (doc.get("rootfs") or {}).get("diff_ids")
    if schema2 and isinstance(diff_ids, list) and len(diff_ids) == len(image.layers):
        return raw, diff_ids
    actual = [uncompressed_digest(path, program_path) for path in image.layers]
    if raw and diff_ids == actual:
        return raw, diff_ids
    for key in ("id", "parent", "Size", "size", "container", "throwaway"):
        doc.pop(key, None)
    doc["rootfs"] = {"type": "layers", "diff_ids": actual}
    MSG.verbose("image %s: config rebuilt with the layers' diff_ids" % image.ref)
    return to_bytes(json_dumps(doc)), actual


class SavePlan(object):
    """The members of a docker-save archive for some images, sources opened up front (an
    rmi running meanwhile cannot take a layer away from an open file).

    members: {name: bytes, an open file, or None for a directory}.
    """

    def __init__(self, images, program_path):
        self.program_path = program_path
        self.members, self.handles = {}, []
        self.manifest, self.repositories, self.entry_of = [], {}, {}
        try:
            for image in images:
                self._add(image)
        except BaseException:
            self.close()
            raise
        self.members["manifest.json"] = to_bytes(json_dumps(self.manifest))
        self.members["repositories"] = to_bytes(json_dumps(self.repositories))

    def _add(self, image):
        config, diff_ids = _save_config(image, self.program_path)
        config_doc = json_loads(config)
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        self.members[config_name] = config
        parent, layer_names = "", []
        for path, diff_id in zip(image.layers, diff_ids):
            layer_id = hashlib.sha256(to_bytes("%s %s %s" % (
                parent, os.path.basename(path), diff_id))).hexdigest()
            if layer_id + "/layer.tar" not in self.members:
                self._add_layer(image, path, layer_id, parent, config_doc)
            layer_names.append(layer_id + "/layer.tar")
            parent = layer_id
        if not layer_names:
            raise RepositoryError("image %s has no layers" % image.ref)
        key = (config_name, tuple(layer_names))
        if key not in self.entry_of:
            self.entry_of[key] = {"Config": config_name, "RepoTags": [],
                                  "Layers": layer_names}
            self.manifest.append(self.entry_of[key])
        if not DIGEST_RE.match(image.tag):      # a by-digest "tag" is no docker tag: unnamed
            self.repositories.setdefault(image.name, {})[image.tag] = parent
            self.entry_of[key]["RepoTags"].append(image.ref)

    def _add_layer(self, image, path, layer_id, parent, config_doc):
        try:
            handle = open(path, "rb")
        except (IOError, OSError) as exc:
            raise RepositoryError("image %s: cannot read layer %s: %s"
                                  % (image.ref, os.path.basename(path), exc.strerror))
        self.handles.append(handle)
        legacy = {"id": layer_id, "created": config_doc.get("created") or
                  "1970-01-01T00:00:00Z", "container_config": {}}
        for key in ("os", "architecture", "variant"):
            if config_doc.get(key):
                legacy[key] = config_doc[key]
        if parent:
            legacy["parent"] = parent
        self.members[layer_id] = None
        self.members[layer_id + "/VERSION"] = b"1.0"
        self.members[layer_id + "/json"] = to_bytes(json_dumps(legacy))
        self.members[layer_id + "/layer.tar"] = handle

    def write(self, stream):
        """The archive as a tar stream: members sorted, fixed times and owners."""
        archive = tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT)
        try:
            for name in sorted(self.members):
                source = self.members[name]
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = \
                    SAVE_MTIME, 0, 0, "", ""
                if source is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    archive.addfile(info)
                    continue
                info.mode = 0o644
                if isinstance(source, bytes):
                    info.size = len(source)
                    archive.addfile(info, io.BytesIO(source))
                else:
                    source.seek(0)
                    info.size = os.fstat(source.fileno()).st_size
                    archive.addfile(info, source)
        finally:
            archive.close()

    def close(self):
        for handle in self.handles:
            handle.close()
        self.handles = []


def _publish_new(tmp, output):
    """Give tmp the name output, refusing to replace a file that appeared meanwhile."""
    try:
        os.link(tmp, output)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise UsageError("output file already exists: %s" % output)
        if os.path.lexists(output):
            raise UsageError("output file already exists: %s" % output)
        os.rename(tmp, output)                   # no hard links on this file system
        return
    os.unlink(tmp)


def save_archive(repo, images, output):
    """Write LocalImages as one docker-save archive to output ('-': stdout)."""
    lock = repo.lock("metadata")
    lock.acquire(shared=True)
    try:
        plan = SavePlan(images, repo.program_path)
    finally:
        lock.release()
    try:
        if output == "-":
            sys.stdout.flush()
            stream = binary_stdout()
            plan.write(stream)
            stream.flush()
            return
        with OutputFile(os.path.abspath(output), None, publish=_publish_new) as handle:
            plan.write(handle)
    finally:
        plan.close()


# -- import: a root file system tarball becomes a one-layer image

def spool_layer(stream, path, label, program_path):
    """Copy a tar stream (plain, gzip, bzip2 or xz) to path while hashing it.

    gzip and plain tars are stored as they come; bzip2 and xz are stored inflated (layer
    media types have no name for them); zstd is refused. path None: only hash (the
    stream must then be plain or gzip). Returns (blob digest, size, diff_id, compression).
    Raises LayerError for corrupt compressed data.
    """
    source = Rewindable(stream)
    kind = layer_compression(source)
    if kind == "zstd":
        raise ArchiveError("%s: zstd-compressed tarballs are not supported" % label)
    keep = kind in ("tar", "gzip")
    blob, diff, size = hashlib.sha256(), hashlib.sha256(), [0]
    handle = open(path, "wb") if path else None

    def store(data):
        blob.update(data)
        size[0] += len(data)
        if handle:
            handle.write(data)

    try:
        raw = TeeReader(source, store) if keep else source
        for plain in layer_chunks(raw, label, kind, program_path):
            diff.update(plain)
            if not keep:
                store(plain)
    finally:
        if handle:
            handle.close()
    return ("sha256:" + blob.hexdigest(), size[0], "sha256:" + diff.hexdigest(),
            "gzip" if kind == "gzip" else "")


def check_tarball(path, kind, label):
    """Raise ArchiveError unless path is a tar archive (plain or gzip: kind) with a member."""
    try:
        archive = tarfile.open(path, "r:gz" if kind == "gzip" else "r:")
        try:
            if archive.next() is None:
                raise tarfile.ReadError("no members")
        finally:
            archive.close()
    except (tarfile.TarError, EOFError, zlib.error, IOError) as exc:
        raise ArchiveError("%s is not a tar archive, or is empty (%s)" % (label, _reason(exc)))


def _open_source(cfg, source):
    """(readable binary stream, HttpClient or None) for a path, an http(s) URL or '-'."""
    if source == "-":
        return binary_stdin(), None
    if re.match(r"^https?://", source):
        client = HttpClient(cfg)
        try:
            resp = client.request("GET", source)
        except NETWORK_ERRORS as exc:
            client.close()
            raise RegistryError("cannot download %s: %s" % (source, exc))
        if resp.status != 200:
            client.close()
            raise RegistryError("cannot download %s: HTTP %d %s" % (source, resp.status,
                                                                   resp.reason))
        return resp, client
    return open(source, "rb"), None


def close_source(stream, client):
    """Close what _open_source opened (standard input stays open)."""
    if client:
        client.close()
    elif stream is not binary_stdin():
        stream.close()


def import_config(platform, diff_id, created):
    """The config of an imported image: platform, one layer, a history line."""
    config = {"architecture": platform.arch, "os": platform.os, "created": created,
              "config": {}, "rootfs": {"type": "layers", "diff_ids": [diff_id]},
              "history": [{"created": created, "comment": "created by udocker.py import"}]}
    if platform.variant:
        config["variant"] = platform.variant
    return to_bytes(json_dumps(config))


def import_tarball(repo, cfg, source, name, tag, platform, move=False):
    """Store a root file system tarball (path, URL or '-') as the one-layer image name:tag.

    move: a local file is renamed into layers/ (or copied and then removed). An existing
    tag is replaced. Returns the image's config digest.
    """
    check_local_name(name)
    repo.check_writable()
    if os.path.exists(os.path.join(repo.tag_dir(name, tag), PROTECT)):
        raise RepositoryError("image is protected: %s:%s" % (name, tag))
    local = source != "-" and not re.match(r"^https?://", source)
    with repo.writer("import"), WorkDir(repo.layersdir, "import") as work:
        staging = work.path
        layer_path = os.path.join(staging, "layer")
        stream, client = _open_source(cfg, source)
        try:
            if move and local and compression_of(stream.read(8)) in ("", "gzip"):
                stream.seek(0)
                layer_path = source                     # hashed where it is, then renamed
                digest, size, diff_id, kind = _tarball_errors(source, spool_layer, stream,
                                                              None, source, repo.program_path)
            else:
                if local:
                    stream.seek(0)
                digest, size, diff_id, kind = _tarball_errors(
                    source, spool_layer, stream, layer_path, source, repo.program_path)
        except NETWORK_ERRORS as exc:
            if local or source == "-":
                raise
            raise RegistryError("download of %s failed: %s" % (source, exc))
        finally:
            close_source(stream, client)
        check_tarball(layer_path, kind, source)
        created = utc_now()
        config = import_config(platform, diff_id, created)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        config_path = os.path.join(staging, "config")
        write_atomic(config_path, config)
        manifest = make_manifest((config_digest, len(config)), [(digest, size, kind)])
        record = {"source": "import", "imported_from": show_name(source, 4096),  # JSON text
                  "platform": str(platform),
                  "manifest_digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                  "media_type": MT_OCI_MANIFEST, "imported": created}
        repo.store_blob(layer_path, digest, move=layer_path == source)
        if repo.has_image(name, tag):
            MSG.info("replacing image: %s:%s" % (name, tag))
        blobs = [(config_digest, StagedFile("config", config_path, config_digest[7:],
                                            len(config), b"{")),
                 (digest, StagedFile("layer", repo.blob_path(digest), digest[7:], size, b""))]
        commit_staged(repo, name, tag, manifest, blobs, record)
        if move and local and os.path.exists(source):
            os.unlink(source)
        return config_digest


# ==== 8. Container creation ====
# Flattening image layers into containers/ID/ROOT, and what the container commands do to a
# container directory as a whole (remove, clone, export, list).
#
# The flattener reads each layer once, newest layer first, and writes every path at most
# once: the newest layer that mentions a path decides it, so a file that a newer layer
# deletes or replaces is never written. What newer layers decided is an index in memory,
#     path -> (kind, layer)   kind: dir, implied dir, file, symlink, pending hardlink
# plus the whiteouts and opaque directories of the layers already done, which hide the
# entries of every older layer below them (OCI image-spec layer.md: a whiteout applies to
# lower layers only, whatever its place in its own tar). An older entry is skipped when its
# path, or a parent, was whited out, when a parent is opaque, or when a newer layer made a
# parent something other than a directory. An older directory entry still gives its mode and
# time to a directory that newer layers only implied (created as a parent of their files).
#
# Safety follows from the same index: ROOT is a fresh private directory that only this
# process writes, and every path in it was made here from the index, so a path is written
# only after each of its parents is known to be a directory this code made with mkdir().
# No path is ever resolved through a symlink: a member below a symlink of its own layer is
# skipped, a symlink an older layer puts where a newer layer implied a directory is dropped
# (both with a warning). Members are normalised first (leading '/' stripped, '.' dropped);
# '..', NUL, over-long names are skipped with a warning. Files are opened with
# O_CREAT|O_EXCL|O_NOFOLLOW and links made without following, as a second line of defence.
#
# Hardlinks name a path as it was when their layer was applied. Target earlier in the same
# layer: link to it. Target in an older layer: the link waits (reserved in the index) until
# the older layer's member goes by; it is linked to that file, or gets a copy of its data if
# a newer layer replaced the file meanwhile. A target earlier in the same layer that a newer
# layer hides has already gone by: that layer is read a second time, for those members only.
#
# Content: regular files, directories, symlinks (targets untouched), hardlinks, FIFOs; device
# nodes are skipped. Modes lose setuid/setgid, the owner always gets rw (rwx on directories
# and executables) and the umask applies (to directories only if it hides more than write
# bits: a 1777 /tmp stays 1777 under umask 022); what the tar said (owner, group, full mode) is kept
# in ID/.udocker-py/attrs where it differs from (0, 0, mode on disk), for export.

TAR_BLOCK = 512
MAX_NAME, MAX_PATH = 255, 4095
ATTRS_HEADER = b"# udocker.py attrs 1: UID GID MODE(octal) PATH (below ROOT)\n"

# Index kinds; an index value is layer << 3 | kind (small ints: no allocation per entry).
K_DIR, K_IMPLIED, K_FILE, K_SYMLINK, K_PENDING = 1, 2, 3, 4, 5


def _octal(field):
    return int(field.partition(b"\0")[0].strip() or b"0", 8)


def fast_tarinfo_class():
    """TarInfo with a quicker parser for the usual header (octal numbers, no old GNU sparse
    map, valid unsigned checksum); any other header goes to tarfile's own. Built on first
    use, so that importing udocker.py does not import tarfile."""
    cached = getattr(fast_tarinfo_class, "cls", None)
    if cached is not None:
        return cached

    class FastTarInfo(tarfile.TarInfo):
        __slots__ = ("buf",)

        @classmethod
        def frombuf(cls, buf, *names):           # names: (encoding, errors), none on 2.7
            try:
                if len(buf) != TAR_BLOCK or buf[156:157] == tarfile.GNUTYPE_SPARSE:
                    raise ValueError("not for the quick parser")
                chksum = _octal(buf[148:156])
                if chksum != 256 + sum(bytearray(buf)) - sum(bytearray(buf[148:156])):
                    raise ValueError("checksum")
                numbers = (_octal(buf[100:108]), _octal(buf[108:116]), _octal(buf[116:124]),
                           _octal(buf[124:136]), _octal(buf[136:148]))
                kind = buf[156:157]
                devices = (_octal(buf[329:337]), _octal(buf[337:345])) \
                    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) else (0, 0)
            except ValueError:
                return super(FastTarInfo, cls).frombuf(buf, *names)

            def text(start, end):
                raw = buf[start:end].partition(b"\0")[0]
                return raw.decode(*names) if names else raw

            obj = cls()
            obj.buf = buf
            obj.name = text(0, 100)
            obj.mode, obj.uid, obj.gid, obj.size, obj.mtime = numbers
            obj.devmajor, obj.devminor = devices
            obj.chksum = chksum
            obj.type = kind
            obj.linkname = text(157, 257) if buf[157:158] != b"\0" else obj.linkname
            obj.uname = obj.gname = obj.linkname[:0]            # unused here: not decoded
            prefix = text(345, 500) if buf[345:346] != b"\0" else ""
            if obj.type == tarfile.AREGTYPE and obj.name.endswith("/"):
                obj.type = tarfile.DIRTYPE
            if obj.isdir():
                obj.name = obj.name.rstrip("/")
            if prefix and obj.type not in tarfile.GNU_TYPES:
                obj.name = prefix + "/" + obj.name
            return obj

    fast_tarinfo_class.cls = FastTarInfo
    return FastTarInfo


class LayerStream(object):
    """The decompressed bytes of a layer as a file object for tarfile: read, tell, seek.

    Forward only, one decompressed chunk in memory; seeking back is possible into the last
    block of the previous chunk (tarfile may check the byte before a header). Reads inside
    the current chunk are plain slices: no buffer is ever rebuilt. hasher (optional) is fed
    every decompressed byte once (import records the diff_id of what it extracted).
    """

    def __init__(self, handle, label, hasher=None, program_path=""):
        self.label = label
        self._chunks = layer_chunks(handle, label, None, program_path)
        self._hasher = hasher
        self._buf = b""        # the current chunk
        self._off = 0          # stream offset of _buf[0]
        self._pos = 0          # current stream offset
        self._tail = b""       # the last bytes before _buf

    def tell(self):
        return self._pos

    def seek(self, pos, whence=os.SEEK_SET):
        if whence == os.SEEK_CUR:
            pos += self._pos
        elif whence != os.SEEK_SET:
            raise IOError(errno.ESPIPE, "layer stream: cannot seek from the end")
        if pos < self._off:
            if self._off - pos > len(self._tail):
                raise IOError(errno.ESPIPE, "layer stream: cannot seek backwards")
            self._buf, self._off, self._tail = (self._tail + self._buf,
                                                self._off - len(self._tail), b"")
        self._pos = pos
        return pos

    def _next_chunk(self):
        """Move on to the next chunk; False at the end of the data."""
        try:
            chunk = next(self._chunks)
        except StopIteration:
            return False
        self._tail = (self._tail + self._buf)[-TAR_BLOCK:]
        self._off += len(self._buf)
        self._buf = chunk
        if self._hasher is not None:
            self._hasher.update(chunk)
        return True

    def read(self, size=-1):
        if size is None or size < 0:
            parts = []
            while True:
                data = self.read(OUT_CHUNK)
                if not data:
                    return b"".join(parts)
                parts.append(data)
        start = self._pos - self._off
        if start + size <= len(self._buf):                 # the usual case
            self._pos += size
            return self._buf[start:start + size]
        parts = []
        while size > 0:
            start = self._pos - self._off
            if start >= len(self._buf):
                if not self._next_chunk():
                    break
                continue
            piece = self._buf[start:start + size]
            parts.append(piece)
            size -= len(piece)
            self._pos += len(piece)
        return b"".join(parts)

    def finish(self, offset):
        """Check what follows the last member (end blocks, not garbage), then drain.

        tarfile ends quietly at a header it cannot parse: a layer cut at a member boundary or
        with garbage inside would pass for complete without this.
        """
        self.seek(offset)
        block = self.read(TAR_BLOCK)
        if block and (len(block) < TAR_BLOCK or block.strip(b"\0")):
            raise LayerError(self.label, "corrupt or truncated tar data at offset %d" % offset)
        while self.read(OUT_CHUNK):       # lets the decompressor check the end of its data
            pass

    def close(self):
        close = getattr(self._chunks, "close", None)
        if close:
            close()


def clean_member_path(name):
    """A tar member name as a relative bytes path ('' for the top), or None if hostile.

    Leading '/' and '.' components are dropped; '..' anywhere, NUL, a component longer than
    255 bytes or a path longer than 4095 bytes make the name hostile.
    """
    raw = to_bytes(name)
    if b"\0" in raw or len(raw) > MAX_PATH:
        return None
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    for part in parts:
        if part == b".." or len(part) > MAX_NAME:
            return None
    return b"/".join(parts)


def disk_mode(mode, is_dir, umask):
    """The mode a tar entry gets on disk: no setuid/setgid, owner rw (rwx for directories
    and executables), then the umask (never taking the owner's bits). Directories keep the
    image's mode, group/other write and sticky bits too (a 1777 /tmp stays writable for a
    non-root uid inside), unless the umask also hides reading from group or other."""
    if is_dir:
        owner = 0o700
        mode &= 0o1777
        if not umask & 0o055:
            return mode | owner
    else:
        owner = 0o700 if mode & 0o111 else 0o600
        mode &= 0o777
    return (mode & ~umask) | owner


def escape_attr_path(path):
    return path.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")


def read_attrs(path):
    """{bytes path below ROOT: (uid, gid, mode)} from an attrs file ({} if there is none)."""
    found = {}
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (IOError, OSError):
        return found
    for line in data.split(b"\n"):
        if not line or line.startswith(b"#"):
            continue
        fields = line.split(b" ", 3)
        if len(fields) != 4:
            continue
        name = re.sub(b"\\\\(.)", lambda m: b"\n" if m.group(1) == b"n" else m.group(1),
                      fields[3])
        try:
            found[name] = (int(fields[0]), int(fields[1]), int(fields[2], 8))
        except ValueError:
            continue
    return found


class _LinkGroup(object):
    """Paths waiting to become hardlinks of one file (reserved in the index meanwhile);
    layer: the layer whose hardlink made the group (its own later members cannot serve)."""
    __slots__ = ("paths", "layer")

    def __init__(self, paths, layer):
        self.paths = paths
        self.layer = layer


class Flattener(object):
    """Builds one ROOT from layer files (base layer first), as described above section 8.

    run() raises RepositoryError for unreadable layers and OSError for write failures; it
    warns about and skips hostile or impossible members.
    """

    WARN_LIMIT = 20

    def __init__(self, root, umask):
        self.root = to_bytes(root).rstrip(b"/")
        self.umask = umask
        self.index = {}                 # path -> layer << 3 | kind
        self.gone = set()               # paths whited out by the layers done
        self.opaque = set()             # directories made opaque by the layers done
        self.dirs = {b"": (disk_mode(0o755, True, umask), None)}   # -> (mode, mtime)
        self.attrs = {}                 # path -> (uid, gid, mode) where the tar differs
        self.waiting = {}               # hardlink target -> _LinkGroup, for older layers
        self.reserved = {}              # path of a waiting hardlink -> its _LinkGroup
        self.rereads = {}               # layer -> [(hidden member, _LinkGroup)] to read again
        self.devices = []
        self.warnings = 0
        self.layer = 0
        self.title = "create"           # starts the warnings that concern no single layer
        self.label = self.title
        self.hasher = None              # fed the decompressed bytes of the first pass
        self.program_path = ""          # the session's $PATH (layer_chunks)

    # -- messages

    def warn(self, text):
        self.warnings += 1
        if self.warnings <= self.WARN_LIMIT:
            MSG.warning("%s: %s" % (self.label, text))

    @staticmethod
    def show(path):
        return show_name(path) or "/"

    # -- the passes

    def run(self, handles):
        """handles: [(open layer file, label)], base layer first."""
        total = len(handles)
        for number, (handle, label) in enumerate(reversed(handles)):
            self.layer, self.label = number, label
            MSG.verbose("flattening layer %d/%d: %s" % (total - number, total, label))
            self._pass(handle, self._member)
        self.label, self.hasher = self.title, None
        for target, group in sorted(self.waiting.items()):
            if group.paths:
                self.warn("hardlink target not found: %s -> %s"
                          % (self.show(group.paths[0]), self.show(target)))
        self.waiting.clear()
        for number, wanted in sorted(self.rereads.items()):
            handle, label = handles[total - 1 - number]
            self.layer, self.label = number, label
            MSG.verbose("reading layer %s again for hardlinked data" % label)
            self._reread(handle, wanted)
        self._finish_dirs()
        if self.devices:
            MSG.debug("skipped %d device node(s), e.g. %s"
                      % (len(self.devices), self.show(self.devices[0])))
        if self.warnings > self.WARN_LIMIT:
            MSG.warning("%d more warnings not shown" % (self.warnings - self.WARN_LIMIT))

    def _pass(self, handle, visit):
        label = self.label
        self.stream = LayerStream(handle, label, self.hasher, self.program_path)
        try:
            try:
                archive = tarfile.open(fileobj=self.stream, mode="r:", encoding="utf-8",
                                       errors=TAR_ERRORS, tarinfo=fast_tarinfo_class())
            except tarfile.TarError as exc:
                raise LayerError(label, "corrupt or not a tar archive (%s)" % exc)
            self.layer_gone, self.layer_opaque = set(), set()
            self.parents_ok = set()
            self.skipped = {}
            try:
                # A tar with no member (an empty layer) ends at open: asking again would
                # seek back before the stream's start under Python < 3.8.
                while archive.firstmember is not None or archive.offset:
                    member = archive.next()
                    if member is None:
                        break
                    del archive.members[:]          # tarfile keeps them all otherwise
                    visit(member, archive)
            except (tarfile.TarError, UnicodeError) as exc:
                raise LayerError(label, "corrupt tar data (%s)" % exc)
            self.stream.finish(archive.offset)
            self._end_layer()
        finally:
            self.stream.close()

    def _end_layer(self):
        """This layer's whiteouts now hide what older layers have; drop broken waiters."""
        for target in [t for t in self.waiting if self._hidden_here(t)]:
            group = self.waiting.pop(target)
            if group.paths:
                self.warn("hardlink target removed by a newer layer: %s -> %s"
                          % (self.show(group.paths[0]), self.show(target)))
            self._unreserve(group)
        self.gone |= self.layer_gone
        self.opaque |= self.layer_opaque

    def _hidden_here(self, path):
        """True if this layer's whiteouts or entries hide older content at path."""
        if path in self.layer_gone:
            return True
        value = self.index.get(path)
        if value is not None and value >> 3 == self.layer and value & 7 in (K_DIR, K_IMPLIED):
            return True
        prefix = path
        while prefix:
            prefix = prefix.rpartition(b"/")[0]
            if prefix in self.layer_gone or prefix in self.layer_opaque:
                return True
            value = self.index.get(prefix)
            if value is not None and value >> 3 == self.layer and \
                    value & 7 not in (K_DIR, K_IMPLIED):
                return True
        return False

    # -- one member

    def _member(self, member, archive):
        path = clean_member_path(member.name)
        if path is None:
            self.warn("skipped hostile name %s ('..', NUL, longer than %d bytes or a part "
                      "longer than %d)" % (show_name(member.name, 80), MAX_PATH, MAX_NAME))
            return
        try:
            self._place(path, member, archive)
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            self.warn("skipped %s%s: %s" % (self.show(path), (" -> " + show_name(
                member.linkname, 80)) if member.issym() else "", exc.strerror))

    def _place(self, path, member, archive):
        parent, _, base = path.rpartition(b"/")
        if base.startswith(b".wh."):
            self._whiteout(parent, base[4:])
            return
        if not path:
            if member.isdir() and b"" not in self.index:      # the newest "./" entry
                self.index[b""] = self.layer << 3 | K_DIR
                self._dir_attrs(b"", member)
            return
        group = self.waiting.get(path) if self.waiting else None
        if group is not None:
            if group.layer == self.layer:     # only older layers can serve the link
                group = None
            else:
                del self.waiting[path]
        state = self._parent_state(parent)
        made = False
        if state is True:
            made = self._decide(path, member, archive)
        elif state is not False:
            self.warn("skipped %s: its parent %s is not a directory in this layer"
                      % (self.show(path), self.show(state)))
        if group is not None:
            self._provide(group, path, member, archive, made, state is True or state is False)
        elif not made and (state is True or state is False) and not member.isdir():
            self.skipped[path] = member

    def _whiteout(self, parent, name):
        if name == b".wh..opq":
            self.layer_opaque.add(parent)
        elif name.startswith(b".wh.") or name in (b"", b".", b".."):
            MSG.debug("ignored whiteout meta file: %s/.wh.%s"
                      % (self.show(parent), show_name(name)))
        else:
            self.layer_gone.add(parent + b"/" + name if parent else name)

    def _parent_state(self, parent):
        """True: parent is a directory (made now if missing); False: hidden by a newer
        layer; a path: the ancestor that this layer made something other than a directory.
        """
        if parent in self.parents_ok:
            return True
        if b"" in self.opaque:                 # an opaque top: older layers add nothing
            return False
        index, gone, opaque, layer = self.index, self.gone, self.opaque, self.layer
        prefix = b""
        for part in parent.split(b"/") if parent else ():
            prefix = prefix + b"/" + part if prefix else part
            if prefix in gone or prefix in opaque:
                return False
            value = index.get(prefix)
            if value is None:
                os.mkdir(self.root + b"/" + prefix, 0o700)
                index[prefix] = layer << 3 | K_IMPLIED
                self.dirs[prefix] = (disk_mode(0o755, True, self.umask), None)
            elif value & 7 not in (K_DIR, K_IMPLIED):
                return False if value >> 3 != layer else prefix
        self.parents_ok.add(parent)
        return True

    def _decide(self, path, member, archive):
        """Create the member unless newer layers decided its path; True if created."""
        if path in self.gone:
            return False
        value = self.index.get(path)
        if value is not None:
            kind = value & 7
            if value >> 3 != self.layer:                         # a newer layer decided
                if kind == K_IMPLIED and member.isdir():         # older attributes apply
                    self.index[path] = value & ~7 | K_DIR
                    self._dir_attrs(path, member)
                elif kind == K_IMPLIED:
                    self.warn("dropped %s%s: a newer layer has a directory there"
                              % (self.show(path), (" -> " + show_name(member.linkname))
                                 if member.issym() else ""))
                return False
            if kind in (K_DIR, K_IMPLIED) and member.isdir():    # same layer: last wins
                self.index[path] = value & ~7 | K_DIR
                self._dir_attrs(path, member)
                return False
            self._replace(path, kind)                            # duplicate in one layer
        return self._create(path, member, archive)

    def _create(self, path, member, archive):
        full = self.root + b"/" + path
        layer = self.layer << 3
        if member.isreg():
            self._write_file(full, member, archive)
            self.index[path] = layer | K_FILE
        elif member.isdir():
            os.mkdir(full, 0o700)
            self.index[path] = layer | K_DIR
            self._dir_attrs(path, member)
            return True
        elif member.issym():
            os.symlink(to_bytes(member.linkname), full)
            set_times(full, member.mtime, symlink=True)
            self.index[path] = layer | K_SYMLINK
            return True
        elif member.islnk():
            target = clean_member_path(member.linkname)
            if not target or target == path:
                self.warn("skipped hardlink %s: bad target %s" % (self.show(path),
                                                                 show_name(member.linkname)))
                return False
            self.index[path] = layer | K_PENDING
            group = _LinkGroup([path], self.layer)
            self.reserved[path] = group
            self._link(group, target)
            return path in self.index
        elif member.isfifo():
            os.mkfifo(full, 0o600)
            os.chmod(full, disk_mode(member.mode, False, self.umask))
            set_times(full, member.mtime)
            self.index[path] = layer | K_FILE
        elif member.ischr() or member.isblk():
            self.devices.append(path)
            return False
        else:
            self.warn("skipped %s: unsupported tar member type %r" % (self.show(path),
                                                                      member.type))
            return False
        self._record(path, member)
        return True

    def _write_file(self, full, member, archive):
        mode = disk_mode(member.mode, False, self.umask)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                     mode)
        try:
            if mode & self.umask:                 # the umask took the owner's bits
                os.fchmod(fd, mode)
            if getattr(member, "sparse", None):
                source = archive.extractfile(member)
            else:
                self.stream.seek(member.offset_data)
                source = self.stream
            remaining = member.size
            while remaining > 0:
                data = source.read(min(remaining, OUT_CHUNK))
                if not data:
                    raise LayerError(self.label, "truncated data in %s"
                                     % show_name(member.name))
                remaining -= len(data)
                while data:
                    data = data[os.write(fd, data):]
            set_times(full, member.mtime, fd=fd)
        finally:
            os.close(fd)

    def _dir_attrs(self, path, member):
        self.dirs[path] = (disk_mode(member.mode, True, self.umask), member.mtime)
        self._record(path, member)

    def _record(self, path, member):
        """Remember owner and mode when the tar asked for more than the disk has."""
        mode = member.mode & 0o7777
        if member.uid or member.gid or mode != disk_mode(mode, member.isdir(), self.umask):
            self.attrs[path] = (member.uid, member.gid, mode)
        elif path in self.attrs:
            del self.attrs[path]

    def _replace(self, path, kind):
        """Remove what this layer already put at path (a duplicate member)."""
        full = self.root + b"/" + path
        if kind in (K_DIR, K_IMPLIED):
            remove_tree(full)
            below = path + b"/"
            for other in [p for p in self.index if p.startswith(below)]:
                del self.index[other]
                self.dirs.pop(other, None)
                self.attrs.pop(other, None)
                group = self.reserved.pop(other, None)
                if group is not None:
                    group.paths.remove(other)
            self.dirs.pop(path, None)
            self.parents_ok = set()
        elif kind == K_PENDING:
            self.reserved.pop(path).paths.remove(path)
        else:
            os.unlink(full)
        del self.index[path]
        self.attrs.pop(path, None)

    # -- hardlinks

    def _link(self, group, target):
        """Make the group's paths hardlinks of target as it is at this point of this layer."""
        for _ in range(64):                                  # bounds chains of links
            value = self.index.get(target)
            if value is not None and value >> 3 == self.layer:      # made by this layer
                kind = value & 7
                if kind in (K_FILE, K_SYMLINK):
                    return self._make_links(group, target)
                if kind == K_PENDING:
                    return self._merge(group, self.reserved[target])
                break
            done = self.skipped.get(target)      # a member of this layer that is hidden
            if done is None:                     # an older layer's: wait for it
                other = self.waiting.get(target)
                if other is not None:
                    return self._merge(group, other)
                self.waiting[target] = group
                return None
            if isinstance(done, bytes):                      # its data was copied there
                return self._make_links(group, done)
            if isinstance(done, _LinkGroup):                 # already to be read again
                return self._merge(group, done)
            if done.isreg():                                 # read this layer again later
                self.rereads.setdefault(self.layer, []).append((done, group))
                self.skipped[target] = group
                return None
            if done.issym() or done.isfifo():
                return self._copy_special(group, done)
            if not done.islnk():
                break
            target = clean_member_path(done.linkname)
            if not target:
                break
        self.warn("skipped hardlink %s: target %s is not a file"
                  % (self.show(group.paths[0]), self.show(target)))
        self._unreserve(group)
        return None

    def _provide(self, group, path, member, archive, made, visible):
        """An older layer's member at a path that waiting hardlinks name."""
        if not group.paths:
            return None
        if made:
            kind = self.index[path] & 7
            if kind in (K_FILE, K_SYMLINK):
                return self._make_links(group, path)
            if kind == K_PENDING:
                return self._merge(group, self.reserved[path])
        elif visible and member.isreg():                     # hidden now: copy its data
            self.skipped[path] = group.paths[0]
            return self._materialize(group, member, archive)
        elif visible and member.islnk():
            target = clean_member_path(member.linkname)
            if target:
                return self._link(group, target)
        elif visible and (member.issym() or member.isfifo()):
            return self._copy_special(group, member)
        self.warn("skipped hardlink %s: target %s is not a file"
                  % (self.show(group.paths[0]), self.show(path)))
        self._unreserve(group)
        return None

    def _materialize(self, group, member, archive):
        """Write the member's data to the group's first path and link the others to it."""
        first = group.paths[0]
        self._write_file(self.root + b"/" + first, member, archive)
        self.reserved.pop(first, None)
        self.index[first] = self.index[first] & ~7 | K_FILE
        self._record(first, member)
        return self._make_links(group, first)

    def _make_links(self, group, source):
        for path in group.paths:
            if path != source:
                hardlink(self.root + b"/" + source, self.root + b"/" + path)
                self.reserved.pop(path, None)
                self.index[path] = self.index[path] & ~7 | K_FILE
                if source in self.attrs:
                    self.attrs[path] = self.attrs[source]
        group.paths = []

    def _merge(self, group, into):
        into.paths.extend(group.paths)
        for path in group.paths:
            self.reserved[path] = into
        group.paths = []

    def _unreserve(self, group):
        for path in group.paths:
            self.reserved.pop(path, None)
            self.index.pop(path, None)
        group.paths = []

    def _copy_special(self, group, member):
        """A hardlink to a symlink or FIFO that a newer layer hides: make the same thing."""
        first = group.paths[0]
        full = self.root + b"/" + first
        if member.issym():
            os.symlink(to_bytes(member.linkname), full)
            kind = K_SYMLINK
        else:
            os.mkfifo(full, disk_mode(member.mode, False, self.umask))
            kind = K_FILE
        self.reserved.pop(first, None)
        self.index[first] = self.index[first] & ~7 | kind
        self._record(first, member)
        return self._make_links(group, first)

    def _reread(self, handle, wanted):
        """Second read of a layer: the data of hidden files that hardlinks still need.

        Only the stream is read, straight to each member's data (headers are not parsed
        again); old GNU sparse members need tarfile, so then the whole layer is parsed."""
        by_offset = dict((member.offset_data, (member, group)) for member, group in wanted)
        if any(getattr(member, "sparse", None) for member, _ in wanted):
            def visit(member, archive):
                found = by_offset.get(member.offset_data)
                if found and found[1].paths and member.isreg():
                    self._materialize(found[1], member, archive)
            return self._pass(handle, visit)
        self.stream = LayerStream(handle, self.label, None, self.program_path)
        try:
            for offset in sorted(by_offset):
                member, group = by_offset[offset]
                if group.paths:
                    self._materialize(group, member, None)
        finally:
            self.stream.close()

    # -- the end

    def _finish_dirs(self):
        """Directory modes and times last, deepest first: children no longer change them."""
        for path in sorted(self.dirs, key=lambda p: -p.count(b"/") - (1 if p else 0)):
            mode, mtime = self.dirs[path]
            full = self.root + b"/" + path if path else self.root
            if not stat.S_ISDIR(os.lstat(full).st_mode):
                continue
            os.chmod(full, mode)
            if mtime is not None:
                set_times(full, mtime)

    def write_attrs(self, path):
        """Write the owners and modes the tar asked for (see ATTRS_HEADER) to path."""
        lines = [ATTRS_HEADER]
        for name in sorted(self.attrs):
            uid, gid, mode = self.attrs[name]
            lines.append(b"%d %d %o %s\n" % (uid, gid, mode, escape_attr_path(name)))
        write_atomic(path, b"".join(lines))


def open_layers(repo, image):
    """[(open file, label)] of the image's layers, base first, opened under the repository
    lock so that an rmi running meanwhile cannot take a layer away from under create."""
    handles = []
    with repo.lock("metadata"):
        repo.sweep()
        try:
            for path in image.layers:
                label = os.path.basename(path)
                if not os.path.exists(path):
                    image.check_present()
                    raise RepositoryError("image %s: layer file missing: %s" % (image.ref,
                                                                                label))
                handles.append((open(path, "rb"), label))
        except BaseException:
            for handle, _ in handles:
                handle.close()
            raise
    return handles


def remove_container(store, id_or_name, quiet=False):
    """Delete a container and its names; refuses protected ones.

    Under the container's lock the directory is first renamed to a work directory (one
    atomic step: other commands see the container or nothing), then deleted; what a kill
    leaves of it is swept.
    """
    cid = store.get(id_or_name)
    with WorkDir(store.dir, "trash-" + cid, make=False) as trash:
        with store.lock(cid) as lock:
            if not os.path.isdir(store.path(cid)):
                raise RepositoryError("container not found: %s" % id_or_name)
            if store.is_protected(cid):
                raise RepositoryError("container is protected: %s" % id_or_name)
            if not quiet:
                MSG.info("deleting container: %s" % cid)
            os.rename(store.path(cid), trash.path)
            store.remove_names_of(cid)
            lock.unlink()
        try:
            trash.close()
        except OSError as exc:
            raise RepositoryError("container %s removed, but its files could not all be "
                                  "deleted (%s): %s" % (cid, exc.strerror or exc, trash.path))
    return cid


def check_new_name(store, name, force=False):
    """Before a container is made: a valid name that is free (or force)."""
    if name:
        store.check_name(name)
        if not force and store.find(name):
            raise RepositoryError("container name already exists: %s" % name)


def name_new_container(store, cid, name, force=False):
    """Give a container just made its name; if that fails the container goes too."""
    if name:
        try:
            store.add_name(cid, name, force=force)
        except BaseException:
            remove_container(store, cid, quiet=True)
            raise


def build_container(store, kind, make):
    """A new container made by make(directory), which fills the directory and returns the
    container's id. The directory is a work directory of containers/ (WorkDir: KIND),
    renamed into place only when complete, so a failure never leaves a half container under
    an id, and a kill leaves one that the next sweep removes."""
    with WorkDir(store.dir, kind) as work:
        cid = make(work.path)
        os.chmod(work.path, 0o755 & ~current_umask() | 0o700)
        os.rename(work.path, store.path(cid))
    return cid


def flatten_root(build, handles, program_path, title="create", hasher=None):
    """build/ROOT from [(open layer file, label)] (base first), and the attrs file beside
    it; hasher (optional) is fed the decompressed bytes of the layers."""
    root = os.path.join(build, ContainerDir.ROOT)
    os.mkdir(root, 0o700)
    flattener = Flattener(root, current_umask())
    flattener.title, flattener.hasher = title, hasher
    flattener.program_path = program_path
    flattener.run(handles)
    makedirs(os.path.join(build, META_DIR))
    flattener.write_attrs(os.path.join(build, ContainerDir.ATTRS))
    return root


def write_container_meta(build, config, image):
    """container.json (config: bytes) and imagerepo.name ('NAME:TAG')."""
    write_atomic(os.path.join(build, ContainerDir.CONFIG), config)
    write_atomic(os.path.join(build, ContainerDir.IMAGE), image)


def create_container(store, image, name=None, force=False):
    """Flatten image into a new container (see build_container); returns its id."""
    check_new_name(store, name, force)
    if not image.layers:
        raise RepositoryError("image %s has no layers" % image.ref)
    cid = store.new_id(image.name)
    handles = open_layers(store.repo, image)

    def make(build):
        flatten_root(build, handles, store.repo.program_path)
        config = b"{}"
        if image.config_path and os.path.exists(image.config_path):
            with open(image.config_path, "rb") as handle:
                config = handle.read()
        elif image.config:
            config = to_bytes(json_dumps(image.config))
        write_container_meta(build, config, image.ref)
        return cid

    try:
        build_container(store, "create", make)
    finally:
        for handle, _ in handles:
            handle.close()
    name_new_container(store, cid, name, force)
    return cid


def copy_tree(src, dst):
    """Copy a directory tree: hardlinks stay hardlinks, symlinks are copied as symlinks,
    modes and times kept, FIFOs re-made, sockets and devices skipped. dst must not exist."""
    seen = {}
    dirs = []
    stack = [(to_bytes(src), to_bytes(dst))]
    while stack:
        source, target = stack.pop()
        st = os.lstat(source)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o700)
            dirs.append((target, mode | 0o700, st.st_mtime))
            stack.extend((os.path.join(source, name), os.path.join(target, name))
                         for name in os.listdir(source))
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen:
            hardlink(seen[key], target)
            continue
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), target)
            set_times(target, st.st_mtime, symlink=True)
        elif stat.S_ISREG(st.st_mode):
            copy_file_data(source, target, mode)
            set_times(target, st.st_mtime)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(target, mode)
            set_times(target, st.st_mtime)
        else:
            continue
        if st.st_nlink > 1:
            seen[key] = target
    for path, mode, mtime in reversed(dirs):        # children before their parents
        os.chmod(path, mode)
        set_times(path, mtime)


def copy_file_data(source, target, mode):
    fdin = os.open(source, os.O_RDONLY | O_NOFOLLOW)
    try:
        fdout = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600)
        try:
            while True:
                data = os.read(fdin, OUT_CHUNK)
                if not data:
                    break
                while data:
                    data = data[os.write(fdout, data):]
            os.fchmod(fdout, mode)
        finally:
            os.close(fdout)
    finally:
        os.close(fdin)


def clone_container(store, id_or_name, name=None):
    """Copy a container to a new id (and name); returns the new id.

    The copy is made in a work directory (WorkDir) while the source is locked, then renamed
    into place: an rm of the source waits, and nobody sees a half clone.
    """
    check_new_name(store, name)
    cid = store.get(id_or_name)
    with WorkDir(store.dir, "clone-" + cid, make=False) as build, store.lock(cid):
        if not os.path.isdir(store.path(cid)):
            raise RepositoryError("container not found: %s" % id_or_name)
        image = ""
        try:
            image = read_text(store.path(cid, ContainerDir.IMAGE))
        except (IOError, OSError):
            pass
        new = store.new_id(image.partition(":")[0] or cid)
        copy_tree(store.path(cid), build.path)
        os.rename(build.path, store.path(new))
    name_new_container(store, new, name)
    note_moved_mode(store, new)
    return new


def note_moved_mode(store, cid):
    """Say so when a container that moved (clone, import --clone) will be set up again: F
    modes rewrite paths in ROOT, and a run redoes that where root.path is not ROOT."""
    mode = ContainerDir(store.path(cid), cid).read(ContainerDir.EXECMODE).upper()
    if mode.startswith("F"):
        MSG.info("container %s (mode %s) is set up for its new place on its first run"
                 % (cid, mode))


# -- import: a root file system tarball, or an `export --clone`, becomes a container

ROOTFS_TOP_NAMES = frozenset([b"bin", b"boot", b"dev", b"etc", b"home", b"lib", b"lib64",
                              b"media", b"mnt", b"opt", b"proc", b"root", b"sbin", b"srv",
                              b"sys", b"tmp", b"usr", b"var"])
IMPORTED_IMAGE = "IMPORTED:unknown"     # imagerepo.name of a container imported without one


class CloneFlattener(Flattener):
    """Extracts an `export --clone` tarball (a whole container directory: ROOT/ and the
    metadata beside it) as safely as create extracts a layer. Owners and modes are not
    recorded: the attrs file of the container travels in the tarball. A member a root file
    system has at its top (bin/, etc/, usr/ ...) stops the import: that is no clone."""

    def _member(self, member, archive):
        path = clean_member_path(member.name)
        if path and path.partition(b"/")[0] in ROOTFS_TOP_NAMES:
            raise ArchiveError("%s is a root file system tarball, not an `export --clone` of "
                               "a container (%s): use import --tocontainer"
                               % (self.label, show_name(member.name)))
        Flattener._member(self, member, archive)

    def _record(self, path, member):
        pass


def _drop_metadata_links(cdir):
    """Remove the symlinks of a container directory outside ROOT/ (the volume records in
    .mountpoints/ aside): its metadata is read and written by name, never through a link."""
    records = os.path.join(cdir, ContainerDir.MOUNTPOINTS)
    for dirpath, dirnames, filenames in os.walk(cdir):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and dirpath != records:
                MSG.warning("import --clone: skipped symlink outside ROOT: %s"
                            % os.path.relpath(path, cdir))
                os.unlink(path)
        dirnames[:] = [n for n in dirnames if os.path.isdir(os.path.join(dirpath, n)) and
                       not (dirpath == cdir and n == ContainerDir.ROOT)]


def _fill_from_rootfs(build, handle, label, image, platform, program_path):
    """import --tocontainer: ROOT from the tarball, metadata made up as upstream does."""
    hasher = hashlib.sha256()
    root = _tarball_errors(label, flatten_root, build, [(handle, label)], program_path,
                           "import", hasher)
    if not os.listdir(root):
        raise ArchiveError("%s: the tarball has no files" % label)
    write_container_meta(build, import_config(platform, "sha256:" + hasher.hexdigest(),
                                              utc_now()), image)
    if not [n for n in ("bin", "etc", "lib", "usr") if os.path.lexists(os.path.join(root, n))]:
        MSG.warning("check the container's content: %s has no /bin, /etc, /lib or /usr"
                    % label)
    return image


def _fill_from_clone(build, handle, label, program_path):
    """import --clone: the whole container directory from the tarball, checked."""
    flattener = CloneFlattener(build, current_umask())
    flattener.title, flattener.program_path = "import --clone", program_path
    _tarball_errors(label, flattener.run, [(handle, label)])
    root = os.path.join(build, ContainerDir.ROOT)
    if os.path.islink(root) or not os.path.isdir(root):
        raise ArchiveError("%s is not an `export --clone` tarball: it has no ROOT directory"
                           % label)
    _drop_metadata_links(build)
    name_file = os.path.join(build, ContainerDir.IMAGE)
    try:
        image = read_text(name_file).strip()
    except (IOError, OSError):
        image = ""
    if not image or not os.path.isfile(name_file):
        image = IMPORTED_IMAGE
        remove_tree(name_file)
        write_atomic(name_file, image)
    return image


def import_container(store, cfg, source, name=None, image=None, platform=None):
    """A new container from a tarball (path, http(s) URL or '-'); returns its id.

    image None: the tarball is an `export --clone` (ROOT/, container.json, execmode ...);
    else it is a root file system and the container records image ('NAME:TAG') and
    platform. It is extracted like a layer by create (nothing is ever written outside the
    container), in a hidden directory renamed into place once complete.
    """
    check_new_name(store, name)
    label = "standard input" if source == "-" else source
    stream, client = _open_source(cfg, source)
    local = source != "-" and client is None
    handle = stream if local else Rewindable(stream)

    def make(build):
        if image is None:
            made = _fill_from_clone(build, handle, label, store.repo.program_path)
        else:
            made = _fill_from_rootfs(build, handle, label, image, platform,
                                     store.repo.program_path)
        return store.new_id(made.partition(":")[0])

    try:
        cid = build_container(store, "import", make)
    finally:
        close_source(stream, client)
    name_new_container(store, cid, name)
    note_moved_mode(store, cid)
    return cid


def container_platform(store, cid):
    """os/arch[/variant] from the container's container.json, as upstream prints it."""
    return platform_text(read_json(store.path(cid, ContainerDir.CONFIG)))


def container_root_state(store, cid):
    """ps's M column: W writable ROOT, R read-only, N no ROOT, D ROOT not a directory."""
    root = store.path(cid, ContainerDir.ROOT)
    if not os.path.lexists(root):
        return "N"
    if not os.path.isdir(root):
        return "D"
    return "W" if os.access(root, os.W_OK) else "R"


def tree_size_mb(top):
    """Disk usage in MiB, rounded up, of a tree on one file system (du -s -m -x), or -1."""
    try:
        top_st = os.lstat(top)
    except OSError:
        return -1
    total = top_st.st_blocks * 512
    seen = set()
    for dirpath, dirnames, filenames in os.walk(to_bytes(top)):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_dev != top_st.st_dev:
                if name in dirnames:
                    dirnames.remove(name)
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return (total + (1 << 20) - 1) >> 20


def export_container(store, id_or_name, output, whole=False):
    """Write a tar of the container's ROOT (members ./...) with the owners and modes the
    image asked for, or of the whole container directory (whole=True) as it is on disk.

    output: a path, or a binary file object (stdout). A file is written beside its final
    name and renamed into place, so a failed export leaves no partial FILE.
    """
    cid = store.get(id_or_name)
    with store.lock(cid):
        top = store.path(cid) if whole else store.path(cid, ContainerDir.ROOT)
        if not os.path.isdir(top):
            raise RepositoryError("container %s has no ROOT directory" % cid)
        attrs = {} if whole else read_attrs(store.path(cid, ContainerDir.ATTRS))

        def write(handle):
            with tarfile.open(fileobj=handle, mode="w|", format=tarfile.GNU_FORMAT,
                              encoding="utf-8", errors=TAR_ERRORS) as archive:
                _export_tree(archive, to_bytes(top), attrs, whole)

        if hasattr(output, "write"):
            write(output)
        else:
            with OutputFile(output, None, sync=False) as handle:
                write(handle)
    return cid


def _export_tree(archive, top, attrs, whole):
    """Add the tree top to archive, depth first in name order. A directory or file of ours
    that its owner cannot read (made so inside the container) is opened up for the moment
    it is read: its mode is put back after its subtree, and in any case before returning."""
    seen = {}
    stack = [b""]
    restore = []                                # (path, mode) of what was opened up
    try:
        while stack:
            rel = stack.pop()
            if isinstance(rel, tuple):                  # a directory's subtree is done
                os.chmod(*rel)
                restore.remove(rel)
                continue
            full = top + b"/" + rel if rel else top
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            info = tarfile.TarInfo(to_text(b"./" + rel if rel else b"."))
            info.mtime = int(st.st_mtime)
            if whole:
                info.uid, info.gid, info.mode = st.st_uid, st.st_gid, mode
            else:
                info.uid, info.gid, info.mode = attrs.get(rel, (0, 0, mode))
            key = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
                if mode & 0o500 != 0o500 and st.st_uid == os.getuid():
                    os.chmod(full, mode | 0o500)
                    restore.append((full, mode))
                    stack.append(restore[-1])
                stack.extend(sorted((rel + b"/" + n if rel else n for n in os.listdir(full)),
                                    reverse=True))
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, to_text(os.readlink(full))
                archive.addfile(info)
            elif st.st_nlink > 1 and key in seen:
                info.type, info.linkname = tarfile.LNKTYPE, seen[key]
                archive.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.type, info.size = tarfile.REGTYPE, st.st_size
                _add_file(archive, info, full, mode, st.st_uid)
                if st.st_nlink > 1:
                    seen[key] = info.name
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                archive.addfile(info)
    finally:
        for path, mode in reversed(restore):
            os.chmod(path, mode)


def _add_file(archive, info, path, mode, uid):
    """Add a regular file, giving its owner (us) read permission while it is read."""
    opened = not mode & 0o400 and uid == os.getuid()
    if opened:
        os.chmod(path, mode | 0o400)
    try:
        with open(path, "rb") as handle:
            archive.addfile(info, handle)
    finally:
        if opened:
            os.chmod(path, mode)


# ==== 9. Execution engines ====
# A run: the container (or a --location tree) and the Engine class of its execution mode
# (ENGINES: mode -> class). The base class Engine decides what every mode shares: the command
# (Entrypoint + Cmd), the user, the environment, the working directory, the volumes and the
# passwd/group copies; each subclass turns that into its engine's command line. The engine
# runs as a child of udocker.py (Supervisor): stdio inherited, the terminating signals
# forwarded to the container, what the container leaves behind killed, its status returned.
# Tools (engine executables) are found by a section-10 object handed in by the command.

FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                     "SIGWINCH")
HOST_FILES = ("/etc/hosts",)     # bound like the sysdirs: the container shares the host network
USER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
ELF_MACHINES = {3: "386", 62: "amd64", 40: "arm", 183: "arm64", 21: "ppc64le", 22: "s390x",
                243: "riscv64"}
LIB_TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu",
                "386": "i386-linux-gnu", "arm": "arm-linux-gnueabihf",
                "ppc64le": "powerpc64le-linux-gnu", "s390x": "s390x-linux-gnu",
                "riscv64": "riscv64-linux-gnu"}
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


# ---- 9.1 Helpers ----


def name_matcher(patterns):
    """A function name -> True if name matches one of the shell-style patterns: NAME,
    PREFIX* (the common cases: a set and one startswith, without fnmatch and the re it
    imports) or any other glob. Sorted once, for the ~40 names of an environment."""
    exact, prefixes, globs = set(), [], []
    for pattern in patterns:
        special = [c for c in pattern if c in "*?["]
        if not special:
            exact.add(pattern)
        elif special == ["*"] and pattern.endswith("*"):
            prefixes.append(pattern[:-1])
        else:
            globs.append(pattern)
    prefixes = tuple(prefixes)

    def matches(name):
        if name in exact or name.startswith(prefixes):
            return True
        if globs:
            import fnmatch
            return any(fnmatch.fnmatchcase(name, g) for g in globs)
        return False
    return matches


class _JsonScanContext(object):
    """The attributes _json.make_scanner reads from a json.JSONDecoder."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo = None

    @staticmethod
    def parse_constant(name):
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


def read_json_fast(path):
    """read_json() for what every run reads (container.json, the probe cache): Python 3's C
    JSON scanner used directly, since importing json imports re (~5 ms of a ~20 ms start).
    Any doubt (Python 2, a parse error) goes through json. None if unreadable."""
    try:
        text = read_text(path)
    except (IOError, OSError):
        return None
    if PY3:
        try:
            import _json
            start = len(text) - len(text.lstrip(" \t\n\r"))
            value, end = _json.make_scanner(_JsonScanContext())(text, start)
            if not text[end:].strip(" \t\n\r"):
                return value
        except Exception:                 # noqa: B902 (any failure: let json decide)
            pass
    try:
        return json_loads(text)
    except ValueError:
        return None


def read_json_twin(path, twin):
    """(read_json_fast(path), the bytes to keep at twin, or None). Python 3 keeps what it
    parsed in a marshal copy (twin) with path's stamp: while path keeps that stamp, a run
    reads the copy and imports no JSON module (_json and its parse: 0.26M instructions of
    a P1 start, ~0.2 ms)."""
    if not PY3:
        return read_json_fast(path), None
    marshal = __import__("marshal")
    stamp = path_stamp(path)
    try:
        kept, value = marshal.loads(read_bytes(twin))
        if kept == stamp != "-":
            return value, None
    except Exception:                     # noqa: B902 (a cache: any doubt, the JSON decides)
        pass
    value = read_json_fast(path)
    if value is None or not settled(stamp) or path_stamp(path) != stamp:
        return value, None
    return value, marshal.dumps((stamp, value), 4)    # (4: every Python 3 reads it)


def private_dir(parent, prefix):
    """A new directory (mode 0700) in parent, like tempfile.mkdtemp (which costs ~5 ms to
    import on a run's start)."""
    while True:
        path = os.path.join(parent, prefix + random_hex(6))
        try:
            os.mkdir(path, 0o700)
            return path
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise


JSON_ESCAPES = dict((chr(c), "\\u%04x" % c) for c in range(32))
JSON_ESCAPES.update({'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r",
                     "\b": "\\b", "\f": "\\f"})


def json_text(value):
    """JSON for the plain values of an OCI spec (dict, list, text, int, bool, None), without
    the json module (it imports re: ~5 ms of an R-mode start). Keys sorted, as json_dumps."""
    if PY3:                             # json's own C encoder, given what json.dumps gives it
        import _json                    # (a spec in Python, value by value, was ~0.5M
        encode = _json.make_encoder(    # instructions of an R-mode start)
            None, _json_default, _json.encode_basestring, None, ":", ",", True, False, True)
        return "".join(encode(value, 0))
    return _json_text(value)


def _json_default(value):
    """What the C encoder cannot take itself: bytes, as text."""
    if isinstance(value, bytes):
        return to_text(value)
    raise TypeError("not JSON: %r" % (value,))


def _json_text(value):
    """json_text() in Python (2.7)."""
    if isinstance(value, dict):
        return "{%s}" % ",".join("%s:%s" % (_json_text(k), _json_text(value[k]))
                                 for k in sorted(value))
    if isinstance(value, (list, tuple)):
        return "[%s]" % ",".join(_json_text(v) for v in value)
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value)
    if not isinstance(value, string_types + (bytes,)):
        return "%d" % value                           # int (and Python 2's long)
    text = to_text(value)
    if text and (min(text) < " " or '"' in text or "\\" in text):   # rare: char by char
        text = "".join(JSON_ESCAPES.get(c, c) for c in text)
    return '"%s"' % text


def _native(value):
    """argv and environment strings as the native str of this Python."""
    return to_text(value) if PY3 else to_bytes(value)


def run_capture(argv, env=None, timeout=30.0):
    """Run a short probe command; returns (exit status, stdout + stderr as text).

    A command that cannot be started gives (127, reason); one that outlives timeout is
    killed (status -9).
    """
    import subprocess
    try:
        with open(os.devnull, "rb") as devnull:
            proc = subprocess.Popen([_native(a) for a in argv], stdin=devnull,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, close_fds=True)
    except OSError as exc:
        return 127, "%s: %s" % (argv[0], exc.strerror or exc)
    timer = threading.Timer(timeout, _kill_quietly, (proc.pid, signal.SIGKILL))
    timer.daemon = True
    timer.start()
    try:
        output = proc.communicate()[0]
    finally:
        timer.cancel()
        timer.join()                 # no thread left when an engine is forked
    return proc.returncode, to_text(output)


def _kill_quietly(pid, signum):
    try:
        os.kill(pid, signum)
        return True
    except OSError:
        return False


def prctl_function():
    """prctl(option, value) -> bool, through the _ctypes C module alone (importing ctypes
    costs ~2.5 ms, a tenth of a run's start), else ctypes, else a stand-in returning False
    where neither works. Loaded before a fork, so the child imports nothing."""
    try:
        import _ctypes
        c_int = type("c_int", (_ctypes._SimpleCData,), {"_type_": "i"})
        prototype = type("prctl", (_ctypes.CFuncPtr,), {
            "_flags_": _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO,
            "_restype_": c_int})
        call = prototype(_ctypes.dlsym(_ctypes.dlopen(None, 0), "prctl"))
    except Exception:                     # noqa: B902 (a private module: any failure)
        try:
            import ctypes
            call = ctypes.CDLL(None, use_errno=True).prctl
        except (ImportError, OSError, AttributeError):
            return lambda option, value: False
    return lambda option, value: call(option, value, 0, 0, 0) == 0


# host architecture -> the (AUDIT_ARCH, syscall number) pairs of statx it can run
STATX_SYSCALLS = {"amd64": ((0xC000003E, 332), (0x40000003, 383)), "386": ((0x40000003, 383),),
                  "arm64": ((0xC00000B7, 291), (0x40000028, 397)), "arm": ((0x40000028, 397),),
                  "ppc64le": ((0xC0000015, 383),), "s390x": ((0x80000016, 379),),
                  "riscv64": ((0xC00000F3, 291),)}
# faccessat2 (glibc 2.33+'s access with a directory fd or flags): one number everywhere; a
# proot that does not translate statx does not translate it either (5.1-era ones know neither)
FACCESSAT2 = 439
# host architecture -> the architectures of a runtime's seccomp filter (OCI spec): with the
# native one alone, libseccomp kills a process whose syscall number has x32's bit, such as
# the -1 by which proot cancels a syscall
SECCOMP_ARCHES = {"amd64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                  "386": ["SCMP_ARCH_X86"], "arm64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}


def untranslated_syscalls(arch):
    """The (AUDIT_ARCH, number) pairs of statx and faccessat2 on a host of arch: what a
    5.1-era proot passes to the kernel untranslated (relative to its real directory)."""
    pairs = STATX_SYSCALLS.get(arch, ())
    return pairs + tuple((audit, FACCESSAT2) for audit, _ in pairs)


def enosys_filter(syscalls):
    """A function that installs, in the engine process before exec, a seccomp filter under
    which the syscalls (AUDIT_ARCH, number) fail with ENOSYS, for it and every process it
    starts (a filter is inherited; stacked with proot's own, ERRNO wins over TRACE). Built
    before the fork, with the _ctypes C module alone (as prctl_function); it raises OSError
    when the kernel refuses. None where _ctypes does not work."""
    try:
        import _ctypes
        simple = lambda code: type("c_" + code, (_ctypes._SimpleCData,), {"_type_": code})
        c_int, c_ulong, c_char = simple("i"), simple("L"), simple("c")
        prctl = type("prctl", (_ctypes.CFuncPtr,), {
            "_flags_": _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO,
            "_restype_": c_int, "_argtypes_": (c_int,) + (c_ulong,) * 4})(
            _ctypes.dlsym(_ctypes.dlopen(None, 0), "prctl"))

        def buffer(data):
            buf = type("buf", (_ctypes.Array,), {"_type_": c_char, "_length_": len(data)})()
            buf.raw = data
            return buf
    except Exception:                     # noqa: B902 (a private module: any failure)
        return None
    code = []
    for audit_arch, number in syscalls:         # ld arch; jne next; ld nr; jne next; ENOSYS
        code += [(0x20, 0, 0, 4), (0x15, 0, 3, audit_arch), (0x20, 0, 0, 0),
                 (0x15, 0, 1, number), (0x06, 0, 0, 0x00050000 | errno.ENOSYS)]
    code.append((0x06, 0, 0, 0x7fff0000))                        # SECCOMP_RET_ALLOW
    insns = buffer(b"".join(struct.pack("=HBBI", *i) for i in code))
    prog = buffer(struct.pack("HP", len(code), _ctypes.addressof(insns)))

    def install():
        if prctl(38, 1, 0, 0, 0) != 0 or \
                prctl(22, 2, _ctypes.addressof(prog), 0, 0) != 0:   # NO_NEW_PRIVS, SECCOMP
            number = _ctypes.get_errno()
            raise OSError(number, "cannot install a seccomp filter (%s)" % os.strerror(number))
        return insns                                     # kept alive until here
    return install


def child_pids(pid):
    """Pids of the direct children of pid (from /proc)."""
    try:
        return [int(p) for p in read_text("/proc/%d/task/%d/children" % (pid, pid)).split()]
    except (IOError, OSError, ValueError):
        return _process_tree().get(pid, [])


def _process_tree():
    """{parent pid: [child pids]} of every process visible in /proc."""
    tree = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = read_text("/proc/%s/stat" % entry).rpartition(")")[2].split()
                tree.setdefault(int(fields[1]), []).append(int(entry))
            except (IOError, OSError, IndexError, ValueError):
                continue
    return tree


def only_pids_since(first, last):
    """True when the kernel gave out no pid since first but last (first or first + 1) in
    our pid namespace, as /proc/loadavg tells: no other process or thread was made."""
    try:
        given = int(read_text("/proc/loadavg").split()[4])
    except (IOError, OSError, IndexError, ValueError):
        return False
    return last - first in (0, 1) and given == last


def kill_marked(marker):
    """SIGKILL every process of ours whose environment holds marker (NAME=VALUE), until
    none is left: how a watchdog finds a container's processes once they are orphans."""
    wanted = to_bytes(marker)
    for _ in range(20):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open("/proc/%s/environ" % entry, "rb") as handle:
                        if wanted in handle.read().split(b"\0"):
                            found.append(int(entry))
                except (IOError, OSError):
                    continue
        if not found:
            return
        for pid in found:
            _kill_quietly(pid, signal.SIGKILL)
        time.sleep(0.05)


def descendants(pid):
    """Pids of every process below pid, parents before their children."""
    tree = _process_tree()
    found, todo = [], list(tree.get(pid, []))
    while todo:
        child = todo.pop(0)
        if child not in found:
            found.append(child)
            todo.extend(tree.get(child, []))
    return found


def _thread_children(pid):
    """Children of every thread of pid (a Go program such as runc forks from any)."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return []
    if not os.path.exists("/proc/%d/task/%d/children" % (pid, pid)):
        return child_pids(pid)                     # a kernel without these files
    found = []
    for tid in tasks:
        try:
            path = "/proc/%d/task/%s/children" % (pid, tid)
            found += [int(child) for child in read_text(path).split()]
        except (IOError, OSError, ValueError):
            continue                               # a thread that has just ended
    return found


def container_init(pid):
    """The host pid of pid 1 of the pid namespace a runtime (runc, crun: pid) started,
    or None while there is none yet."""
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        for child in _thread_children(parent):
            try:
                status = read_text("/proc/%d/status" % child)
            except (IOError, OSError):
                continue
            nspids = []
            for line in status.splitlines():
                if line.startswith("NSpid:"):
                    nspids = line.split()[1:]
            if len(nspids) > 1 and nspids[-1] == "1":
                return child
            todo.append(child)
    return None


def has_reaped(pid):
    """Has process pid waited for any child yet? The kernel adds a reaped child's page
    faults and times to its parent's (cminflt ... cstime of /proc/PID/stat), and a process
    that ran has faulted at least one page."""
    try:
        fields = read_text("/proc/%d/stat" % pid).rpartition(")")[2].split()
        return any(int(value) for value in fields[8:9] + fields[10:11] + fields[13:15])
    except (IOError, OSError, ValueError):
        return False


def process_argv(pid):
    """The argv of process pid (from /proc), None when it is gone or a zombie."""
    try:
        data = read_text("/proc/%d/cmdline" % pid)
    except (IOError, OSError):
        return None
    return data.split("\0")[:-1] or None


def signal_is_handled(pid, signum):
    """True if process pid catches or ignores signum (from /proc/PID/status)."""
    try:
        status = read_text("/proc/%d/status" % pid)
    except (IOError, OSError):
        return True
    bit = 1 << (signum - 1)
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("SigCgt", "SigIgn") and int(value.strip(), 16) & bit:
            return True
    return False


# ---- 9.2 Introspection ----


# ---- 9.2.1 Paths and users ----


def cont_path(path):
    """A container path normalised: absolute, no '.', '..' or '//' ('//x' stays '//x' in
    os.path.normpath)."""
    return "/" + os.path.normpath("/" + path).lstrip("/")


def resolve_in_root(root, path, follow_last=True):
    """The host path of a container path, following symlinks as the container sees them:
    absolute targets restart at root (a target already under root counts as inside) and
    '..' never climbs above it."""
    todo = [p for p in path.split("/") if p]
    done = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *(done + [part]))
        if (todo or follow_last) and os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise EngineError("too many levels of symbolic links: %s" % path)
            target = os.readlink(candidate)
            if target == root or target.startswith(root.rstrip("/") + "/"):
                target = target[len(root.rstrip("/")):] or "/"     # made by F-mode setup
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        done.append(part)
    return os.path.join(root, *done) if done else root


def read_identity_db(path):
    """Lines of a passwd/group file as lists of fields ([] if it cannot be read)."""
    try:
        text = read_text(path)
    except (IOError, OSError):
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def host_user(environ):
    """(name, uid, gid, home) of the user running udocker.py (home: environ's HOME where
    the user has no passwd entry; environ is the session's)."""
    import pwd
    uid, gid = os.getuid(), os.getgid()
    try:
        entry = pwd.getpwuid(uid)
        return entry.pw_name, uid, gid, entry.pw_dir
    except KeyError:
        return "udoc%d" % uid, uid, gid, environ.get("HOME", "/")


# ---- 9.2.2 ELF files, the C library, the loader ----


def elf_info(path):
    """None if path is not an ELF file; else a dict: bits, type (2 exec, 3 shared), machine
    (docker arch name), interp (container path or None), dynamic, rpath (has DT_RPATH or
    DT_RUNPATH)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF":
                return None
            is64 = head[4:5] == b"\x02"
            end = "little" if head[5:6] == b"\x01" else "big"
            e_type, e_machine = uint_at(head, 16, 2, end), uint_at(head, 18, 2, end)
            at = 54 if is64 else 42                      # e_phentsize, e_phnum
            phoff = uint_at(head, 32, 8, end) if is64 else uint_at(head, 28, 4, end)
            phentsize, phnum = uint_at(head, at, 2, end), uint_at(head, at + 2, 2, end)
            info = {"bits": 64 if is64 else 32, "type": e_type, "interp": None,
                    "machine": ELF_MACHINES.get(e_machine, str(e_machine)),
                    "dynamic": False, "rpath": False}
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
            interp, dynamic = _tag_bytes(3, 4, end), _tag_bytes(2, 4, end)
            for i in range(phnum):
                header = table[i * phentsize:(i + 1) * phentsize]
                if len(header) < (40 if is64 else 20):
                    raise ValueError("short program header")
                p_type = header[:4]              # compared as bytes: most are neither
                if p_type != interp and p_type != dynamic:
                    continue
                # Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz; Elf32: no flags there
                offset = uint_at(header, 8, 8, end) if is64 else uint_at(header, 4, 4, end)
                size = uint_at(header, 32, 8, end) if is64 else uint_at(header, 16, 4, end)
                if p_type == interp:                             # PT_INTERP
                    handle.seek(offset)
                    info["interp"] = to_text(handle.read(min(size, 4096)).rstrip(b"\0"))
                else:                                            # PT_DYNAMIC
                    info["dynamic"] = True
                    handle.seek(offset)
                    info["rpath"] = _dynamic_has_rpath(handle.read(min(size, 1 << 16)),
                                                       is64, end)
            return info
    except (IOError, OSError, ValueError):
        return None


def _dynamic_has_rpath(data, is64, end):
    half = 8 if is64 else 4                                      # d_tag, then d_val
    null, rpath, runpath = [_tag_bytes(tag, half, end) for tag in (0, 15, 29)]
    for pos in range(0, len(data) - 2 * half + 1, 2 * half):
        tag = data[pos:pos + half]
        if tag == null:
            return False
        if tag == rpath or tag == runpath:                       # DT_RPATH, DT_RUNPATH
            return True
    return False


def _tag_bytes(value, size, order):
    """value (< 256) as an unsigned integer of size bytes in that byte order."""
    raw = bytearray(size)
    raw[0 if order == "little" else size - 1] = value
    return bytes(raw)


def _after(text, key, stops, quoted):
    """The value after the first occurrence of key in text: up to a character of stops,
    past one opening quote when quoted; None when absent or empty (regex-free: `re` costs
    a run's start ~4 ms)."""
    at = text.find(key)
    if at < 0:
        return None
    value = text[at + len(key):]
    value = value[1:] if quoted and value.startswith('"') else value
    for index, char in enumerate(value):
        if char in stops:
            value = value[:index]
            break
    return value or None


def read_os_release(root):
    """(distribution, version) of a tree, found as upstream udocker finds them to pick its
    per-distribution libfakechroot: an etc/*-release "NAME release N" file (CentOS, Red,
    Rocky, AlmaLinux, Fedora), else etc/lsb-release (Ubuntu), else etc/os-release (Debian,
    Alpine); the first word of the name; the version as MAJOR, or MAJOR.MINOR when it has
    three parts (Alpine 3.19.1 -> 3.19). ('', '') if unknown."""
    try:
        names = sorted(n for n in os.listdir(resolve_in_root(root, "/etc"))
                       if n.find("-release") > 0)
    except OSError:
        names = []
    texts = {}
    for name in names:
        try:
            texts[name] = read_text(resolve_in_root(root, "/etc/" + name))
        except (IOError, OSError, ValueError):
            continue
    found = ("", "")
    for name in names:                 # ^([^=]+) release (\d+): "CentOS Linux release 7.9"
        text = texts.get(name, "")
        head = text.split("=")[0]
        at = head.rfind(" release ")
        while at > 0 and not text[at + 9:at + 10].isdigit():
            at = head.rfind(" release ", 0, at)
        if at > 0:
            number = text[at + 9:]
            found = (text[:at].split(" ")[0], number[:len(number) - len(number.lstrip(
                "0123456789"))])
            break
    for name, keys, stops, quoted in (
            ("lsb-release", ("DISTRIB_ID=", "DISTRIB_RELEASE="), ("\n", "\n"), False),
            ("os-release", ("NAME=", "VERSION_ID="), (" \n\".", " \n\""), True)):
        if found[0] or name not in texts:
            continue
        values = [_after(texts[name], k, s, quoted) for k, s in zip(keys, stops)]
        if all(values):
            found = (values[0].split(" ")[0], values[1])
    parts = found[1].split(".")
    return found[0], ".".join(parts[:2] if len(parts) > 2 else parts[:1])


def glibc_needed(path):
    """'2.14': the newest glibc symbol version (GLIBC_X.Y) a shared library refers to, ''
    if none (a musl library) or unreadable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (IOError, OSError):
        return ""
    found, at = [], data.find(b"\0GLIBC_")
    while at >= 0:                       # (without re: a run imports no costly module)
        word = data[at + 7:data.find(b"\0", at + 7)]
        if word and not word.strip(b"0123456789."):
            found.append(version_tuple(to_text(word)))
        at = data.find(b"\0GLIBC_", at + 1)
    return ".".join(str(n) for n in max(found)) if found else ""


def container_libc(root, arch):
    """('glibc', '2.36'), ('musl', '') or (None, '') for the C library of a tree."""
    kind, path = container_libc_file(root, arch)
    return kind, glibc_version(path) if kind == "glibc" else ""


def container_libc_file(root, arch):
    """('glibc', host path of libc.so.6), ('musl', path of its loader) or (None, None)."""
    musl = _names_like(resolve_in_root(root, "/lib"), "ld-musl-*.so.1")
    if musl:
        return "musl", musl[0]
    triplet = LIB_TRIPLETS.get(arch, "")
    for rel in ("lib/%s/libc.so.6" % triplet, "usr/lib/%s/libc.so.6" % triplet,
                "lib64/libc.so.6", "usr/lib64/libc.so.6", "lib/libc.so.6", "usr/lib/libc.so.6"):
        path = resolve_in_root(root, rel)
        if os.path.isfile(path):
            return "glibc", path
    return None, None


def glibc_version(path):
    """'2.36' for a glibc libc.so.6 (its file name libc-X.Y.so, else the "release version"
    string inside), '' if unknown."""
    name = os.path.basename(path)
    if name.startswith("libc-") and name.endswith(".so") and \
            len(version_tuple(name[5:-3])) == 2:
        return name[5:-3]
    with open(path, "rb") as handle:
        data = handle.read()
    at = data.find(b"release version ")
    if at < 0:
        return ""
    words = to_text(data[at + 16:at + 32]).split(".")
    numbers = [w for w in words[:2] if w.isdigit()]
    return ".".join(numbers) if len(numbers) == 2 else ""


def _names_like(directory, pattern):
    """Paths in directory whose names match pattern, sorted; PREFIX*SUFFIX patterns without
    glob (it imports re, ~4 ms of an F-mode start)."""
    prefix, star, suffix = pattern.partition("*")
    if not star or any(c in prefix + suffix for c in "*?["):
        return sorted(_glob(os.path.join(directory, pattern)))
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names
                  if n.startswith(prefix) and n.endswith(suffix) and
                  len(n) >= len(prefix) + len(suffix) and not n.startswith("."))


def container_loader(root, arch, watched=None):
    """(container path, host path) of the tree's ELF loader; raises EngineError. watched:
    as for container_lib_dirs."""
    watched = [] if watched is None else watched
    for probe in ("/bin/sh", "/usr/bin/env", "/bin/ls"):
        path = resolve_in_root(root, probe)
        watched.extend([path] + _dirs_on_the_way(root, probe, path))
        info = elf_info(path)
        if info and info["interp"]:
            interp = info["interp"]
            if interp.startswith(root.rstrip("/") + "/"):           # patched for F3
                interp = interp[len(root.rstrip("/")):]
            host = resolve_in_root(root, interp)
            watched.extend([host] + _dirs_on_the_way(root, interp, host))
            if os.path.isfile(host):
                return interp, host
    raise EngineError("cannot find the container's ELF loader (ld.so)")


def container_lib_dirs(root, arch, watched=None):
    """Host paths of the tree's library directories (ld.so.conf first, then the usual).
    watched: a list given gets the host paths whose stamps (path_stamp) stay the same while
    this answer does: the conf files read, the include directories, and the directories on
    the way to each name looked up (RunContainer.lib_dirs remembers the answer by them)."""
    watched = [] if watched is None else watched
    wanted = []
    pending = [("/etc/ld.so.conf", resolve_in_root(root, "/etc/ld.so.conf"))]
    seen_conf = set()
    while pending:
        name, conf = pending.pop(0)
        if conf in seen_conf:
            continue
        if not os.path.isfile(conf):
            watched.extend(_dirs_on_the_way(root, name, conf))      # made later: it counts
            continue
        seen_conf.add(conf)
        watched.append(conf)
        watched.extend(_dirs_on_the_way(root, os.path.dirname(name), os.path.dirname(conf)))
        for line in read_text(conf).splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("include "):
                pattern = line.split(None, 1)[1]
                directory = resolve_in_root(root, os.path.dirname(pattern))
                watched.append(directory)
                watched.extend(_dirs_on_the_way(root, os.path.dirname(pattern), directory))
                pending.extend((os.path.join(os.path.dirname(pattern), os.path.basename(p)), p)
                               for p in _names_like(directory, os.path.basename(pattern)))
            elif line.startswith("/"):
                wanted.append(line)
    triplet = LIB_TRIPLETS.get(arch, "")
    wanted += ["/lib/" + triplet, "/usr/lib/" + triplet, "/lib64", "/usr/lib64", "/lib",
               "/usr/lib"]
    found = []
    for path in wanted:
        host = resolve_in_root(root, path)
        watched.extend(_dirs_on_the_way(root, path, host))
        if os.path.isdir(host) and host not in found:
            found.append(host)
    return found


def _dirs_on_the_way(root, path, host):
    """The directories under root (root included) that list the names on the way to a
    container path, as written and as resolved (host): a name made, removed or replaced
    there changes one of their stamps."""
    dirs = []
    for end in (host, os.path.join(root, path.lstrip("/"))):
        while end.startswith(root) and len(end) > len(root):
            parent = os.path.dirname(end)
            if parent == end:
                break
            dirs.append(parent)
            end = parent
    return dirs


# ---- 9.3 Run plan ----


# ---- 9.3.1 Volumes, the container, its users ----
# A run is planned whole (Engine.plan: every check, nothing written), then applied
# (Engine.apply: the plan's Changes, the one place a run writes), then started.


PATH_MAX = 4096                         # Linux: a longer path cannot be bound or opened


class Volume(object):
    """A host path made visible at a container path (a bind, or its engine's equivalent)."""

    def __init__(self, host, cont, readonly=False, system=False, device=False):
        self.host = host
        self.cont = cont
        self.readonly = readonly
        self.system = system             # a default (sysdirs, host files): missing is no error
        self.device = device             # a device node (--device, /dev/nvidia*)
        for path in (host, cont):        # whatever the syntax: no bind is silently dropped
            if len(to_bytes(path)) >= PATH_MAX:
                raise UsageError("invalid volume: %s...: path too long (at most %d bytes)"
                                 % (path[:40], PATH_MAX - 1))

    @classmethod
    def parse(cls, spec):
        """'HOST[:CONT[:ro|rw]]' -> Volume; raises UsageError for a bad spec. HOST and CONT
        may hold ':' (cwltool binds such paths): of the ways to split spec, the one whose
        HOST exists and whose CONT is absolute is taken; two such ways are refused."""
        readonly = False
        rest = spec
        if spec[-3:] in (":ro", ":rw") and spec.count(":") > 1:
            rest, readonly = spec[:-3], spec[-3:] == ":ro"
        splits = [(rest, rest)] + [(rest[:i], rest[i + 1:]) for i in range(len(rest))
                                   if rest[i] == ":"]
        shaped = [(h, c) for h, c in splits if h.startswith("/") and c.startswith("/")]
        found = [(h, c) for h, c in shaped if os.path.exists(h)]
        if len(found) > 1:
            raise UsageError("ambiguous volume: %s (%s; use --mount type=bind,source=HOST,"
                             "target=CONT)" % (spec, " or ".join("%s -> %s" % hc
                                                                 for hc in found)))
        relative = [c for h, c in splits[1:] if h.startswith("/") and not c.startswith("/")
                    and os.path.exists(h)]
        if not found and relative:      # the host path is there: blame what is wrong
            raise UsageError("invalid volume: %s (container path %s is not absolute)"
                             % (spec, relative[0] or "''"))
        if not shaped:
            raise UsageError("invalid volume: %s (HOST[:CONT], both absolute paths)" % spec)
        if not found:
            raise UsageError("invalid volume: %s (host path does not exist)" % spec)
        return cls.checked(found[0][0], found[0][1], readonly, spec)

    @classmethod
    def parse_mount(cls, spec):
        """--mount 'type=bind,source=HOST,target=CONT[,readonly]' (Docker's CSV fields) ->
        Volume; raises UsageError for a bad spec."""
        try:
            fields = next(csv.reader([spec]))
        except (csv.Error, StopIteration):
            raise UsageError("invalid --mount: %s" % spec)
        kind, host, cont, readonly = "volume", None, None, False
        for field in fields:
            key, _, value = field.partition("=")
            key = key.strip().lower()
            if key == "type":
                kind = value
            elif key in ("source", "src"):
                host = value
            elif key in ("target", "destination", "dst"):
                cont = value
            elif key in ("readonly", "ro"):
                if value.lower() not in ("", "true", "1", "false", "0"):
                    raise UsageError("invalid --mount: %s (readonly=%s)" % (spec, value))
                readonly = value.lower() in ("", "true", "1")
            elif key not in ("bind-propagation", "consistency", "bind-recursive"):
                raise UsageError("invalid --mount: %s (unknown field %s)" % (spec, key))
        if kind != "bind":
            raise UsageError("invalid --mount: %s (only type=bind is supported)" % spec)
        if not host or not cont or not host.startswith("/") or not cont.startswith("/"):
            raise UsageError("invalid --mount: %s (source and target, both absolute paths)"
                             % spec)
        if not os.path.exists(host):
            raise UsageError("invalid --mount: %s (source does not exist)" % spec)
        return cls.checked(host, cont, readonly, spec)

    @classmethod
    def from_options(cls, opts):
        """The Volumes of run's -v and --mount options; raises UsageError."""
        return [cls.parse(spec) for spec in opts.get("volume") or []] + \
            [cls.parse_mount(spec) for spec in opts.get("mount") or []]

    @classmethod
    def checked(cls, host, cont, readonly, spec):
        cont = cont_path(cont)
        if cont == "/":
            raise UsageError("invalid volume: %s (cannot bind over /)" % spec)
        return cls(os.path.normpath(host), cont, readonly)

    def __repr__(self):
        return "Volume(%s:%s)" % (self.host, self.cont)


class RunContainer(object):
    """A container as run sees it: id, directory (None for --location), ROOT, image config."""

    def __init__(self, cid, cdir, root, config, names=()):
        self.cid = cid
        self.dir = cdir
        self.files = ContainerDir(cdir, cid) if cdir else None
        self.root = os.path.realpath(root)
        self.config = config if isinstance(config, dict) else {}
        self.names = list(names)
        self._libc = None              # (kind, version), see libc()
        self.records = []              # (path, text) of .run records to write: libc(), loader()...
        self._found = {}               # what found() computed: ROOT's loader, ...
        self._states = {}              # state file name -> text, see state()

    @classmethod
    def from_store(cls, store, cid):
        cdir = store.path(cid)
        root = os.path.join(cdir, ContainerDir.ROOT)
        if not os.path.isdir(root):
            raise RepositoryError("container %s has no ROOT directory" % cid)
        twin = os.path.join(cdir, ContainerDir.CONFIG_RECORD)
        config, kept = read_json_twin(os.path.join(cdir, ContainerDir.CONFIG), twin)
        container = cls(cid, cdir, root, config, store.names(cid))
        if kept is not None:                   # written by the run's plan, as the others
            container.records.append((twin, kept))
        return container

    @classmethod
    def from_location(cls, path):
        if not os.path.isdir(path):
            raise UsageError("invalid --location: %s is not a directory" % path)
        return cls("location", None, path, {})

    def image_config(self):
        """The image's run config (Env, Cmd, Entrypoint, WorkingDir, User, ...), or {}."""
        section = self.config.get("config") or self.config.get("container_config") or {}
        return section if isinstance(section, dict) else {}

    def arch(self):
        arch = self.config.get("architecture")
        if arch:
            return docker_arch(arch)
        info = elf_info(resolve_in_root(self.root, "/bin/sh"))
        return info["machine"] if info else Platform.host().arch

    def found(self, key, compute):
        """compute() the first time key is asked for in this command, then its answer: what
        a run looks up in ROOT before it starts, more than one step of it needs (an F mode
        checks, then plans; F2 and F4 add to F1's command) and nothing it plans changes."""
        if key not in self._found:
            self._found[key] = compute()
        return self._found[key]

    def loader(self):
        """container_loader() of ROOT, remembered in .run/loader as lib_dirs() is (~0.1 ms
        of an F1, F2 or F4 start)."""
        return self.found("loader", lambda: tuple(self._remembered(
            ContainerDir.LOADER_RECORD, container_loader)))

    def lib_dirs(self):
        """container_lib_dirs() of ROOT (a new list), remembered in .run/libdirs while the
        stamps of what it looked at are the same: finding them again takes ~50 stats and
        reads every ld.so.conf file (~0.25 ms of an F-mode start), checking them ~15 stats."""
        return list(self.found("lib_dirs", lambda: self._remembered(
            ContainerDir.LIB_DIRS_RECORD, container_lib_dirs)))

    def _remembered(self, name, find):
        """find(ROOT, arch, watched), a list of strings, remembered in a record (ContainerDir
        name) with the stamps of the paths it put in watched, while they are the same. A
        new record is only kept in records here: a run writes it (Engine.plan)."""
        record = self.files.file(name) if self.files else None
        head = "%s\n%s\n" % (self.root, self.arch())
        try:
            text = read_text(record) if record else ""
        except (IOError, OSError, ValueError):
            text = ""
        if text.startswith(head) and text.endswith("\n.\n"):     # D value, S stamp path
            values = []
            for line in text[len(head):-3].split("\n"):
                kind, _, rest = line.partition(" ")
                stamp, _, path = rest.partition(" ")
                if kind == "D":
                    values.append(rest)
                elif kind != "S" or path_stamp(path) != stamp:
                    break
            else:
                return values
        watched = []
        values = list(find(self.root, self.arch(), watched))
        stamps = dict((path, path_stamp(path)) for path in watched)
        if record and self._may_remember(stamps, [self.root] + values):
            self.records.append((record, head + "".join(["D %s\n" % v for v in values] + [
                "S %s %s\n" % (stamps[p], p) for p in sorted(stamps)]) + ".\n"))
        return values

    @staticmethod
    def _may_remember(stamps, texts):
        """Not when a path holds a new line, nor when something looked at has not settled."""
        return not any("\n" in text for text in list(stamps) + texts) and \
            all(settled(s) for s in stamps.values())

    def libc(self):
        """container_libc() of ROOT, remembered in .run/libc while that file is unchanged:
        finding the version reads the whole libc, the costliest part of an F-mode start.
        A new record is only kept in records here: a run writes it (Engine.apply)."""
        if self._libc is None:
            self._libc = self._remembered_libc()
        return self._libc

    def _remembered_libc(self):
        record = self.files.file(ContainerDir.LIBC_RECORD) if self.files else None
        if record:
            try:
                kind, version, path, stamp = read_text(record).split("\n")[:4]
                if kind in ("glibc", "musl") and path_stamp(path) == stamp:
                    return kind, version
            except (IOError, OSError, ValueError):
                pass
        kind, path = container_libc_file(self.root, self.arch())
        version = glibc_version(path) if kind == "glibc" else ""
        if record and kind:
            self.records.append((record, "%s\n%s\n%s\n%s\n" % (kind, version, path,
                                                               path_stamp(path))))
        return kind, version

    def state(self, name):
        """Contents of a small state file (ContainerDir name) of the container, or '': read
        once (a run's mode choice and plan ask for execmode 4 times) until set_state or
        reread, which the changes made under the container's lock take first."""
        if name not in self._states:
            self._states[name] = self.files.read(name) if self.files else ""
        return self._states[name]

    def reread(self):
        """Forget the state files read: state() reads them again (what another command
        changed before we took the container's lock)."""
        self._states = {}

    def set_state(self, name, text):
        self._states.pop(name, None)
        self.files.write(name, text)

    def execmode(self, cfg):
        """ContainerDir.execmode, or the default for a --location tree."""
        return self.files.execmode(cfg, self.state(ContainerDir.EXECMODE)) if self.files \
            else default_execmode(cfg)

    def run_dir(self, cfg):
        """The directory for files the runs of this container share (passwd copies, ...);
        made by the run that first needs it (Engine.run_dir)."""
        return self.files.file(ContainerDir.RUN_DIR) if self.files else \
            os.path.join(cfg.tmpdir, "udocker-%d-location" % os.getuid())


class RunUser(object):
    """Who runs inside: name, uid, gid, home and shell as the container will see them."""

    def __init__(self, name, uid, gid, home="/", shell="/bin/sh", known=True):
        self.name, self.uid, self.gid = name, uid, gid
        self.home, self.shell, self.known = home or "/", shell or "/bin/sh", known

    def passwd_line(self):
        return "%s:x:%d:%d:*UDOCKER*:%s:%s" % (self.name, self.uid, self.gid, self.home,
                                                self.shell)


MAX_ID = 4294967294                     # uid_t and gid_t: (uid_t)-1 means "no id"


def _lookup_user(passwd, groups, text):
    """RunUser for 'NAME', 'UID', 'NAME:GROUP' or 'UID:GID' given passwd/group rows."""
    who, colon, group = text.partition(":")
    if not (_user_word(who[:-1] if who.endswith("$") else who) and
            (not colon or _user_word(group))):
        raise UsageError("invalid user: %s (NAME or UID[:GID])" % text)
    if any(word.isdigit() and int(word) > MAX_ID for word in (who, group)):
        raise UsageError("invalid user: %s (ids go up to %d)" % (text, MAX_ID))
    group = group if colon else None
    entry = None
    for row in passwd:
        if len(row) >= 7 and (row[0] == who or (who.isdigit() and row[2] == who)):
            entry = row
            break
    if entry is None and not who.isdigit():
        raise EngineError("user %s not found in the container's /etc/passwd" % who)
    if entry is not None:
        user = RunUser(entry[0], int(entry[2]), int(entry[3] or 0), entry[5], entry[6])
    else:
        user = RunUser("udoc%s" % who, int(who), int(who), known=False)
    if group is not None:
        user.gid = _lookup_group(groups, group)
    return user


def _user_word(word):
    """A user or group name or number as --user takes it (no regex: re costs ~4 ms)."""
    return bool(word) and word[0] != "-" and all(c in USER_CHARS for c in word)


def _lookup_group(groups, group):
    if group.isdigit():
        return int(group)
    for row in groups:
        if len(row) >= 3 and row[0] == group:
            return int(row[2])
    raise EngineError("group %s not found in the container's /etc/group" % group)


# ---- 9.3.2 The host's NVIDIA driver ----

NVIDIA_DIR = "/.udocker/nvidia"          # where a run shows the host's NVIDIA driver
NVIDIA_MARKERS = ("libcuda.", "libnvidia-")    # library names that mean "a driver is here"
LDCONFIG_ARCH = {"amd64": "x86-64", "arm64": "AArch64", "ppc64le": "64bit", "s390x": "64bit",
                 "riscv64": "64bit"}
LDCONFIG_LINE_RE = LazyRegex(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(/.*?)\s*$")


class NvidiaDriver(object):
    """The host's NVIDIA driver as found now, on this host: libraries (in the directories
    where the ldconfig cache, LD_LIBRARY_PATH or nvi_lib_dirs show libcuda/libnvidia-*,
    the nvi_lib_list names), tools (nvi_bin_list in PATH), icd files (nvi_etc_list) and
    device files (nvi_dev_list*). A run binds them read-only under NVIDIA_DIR (lib, bin,
    etc) and at /dev: nothing is copied into the container, which so keeps working with
    another host's driver (upstream copies the files into ROOT at setup)."""

    def __init__(self, files, devices, lib_dirs):
        self.files = files            # [(host path, container path)], libraries, tools, icd
        self.devices = devices        # [(host path, container path)]
        self.lib_dirs = lib_dirs      # host directories the libraries came from

    @classmethod
    def find(cls, cfg, environ):
        """The driver, or None when no NVIDIA library is found."""
        lib_dirs = cls._library_dirs(cfg, environ)
        files, seen = [], set()
        for directory in lib_dirs:
            for prefix in cfg.nvi_lib_list:
                for path in sorted(_glob(os.path.join(directory, prefix) + "*")):
                    rel = path[len(directory) + 1:]
                    if rel not in seen and os.path.isfile(path):
                        seen.add(rel)
                        files.append((path, "%s/lib/%s" % (NVIDIA_DIR, rel)))
        if not any(os.path.basename(c).startswith(NVIDIA_MARKERS) for _, c in files):
            return None
        path = environ.get("PATH", "")
        for name in cfg.nvi_bin_list:
            found = which(name, path)
            if found:
                files.append((os.path.abspath(found), "%s/bin/%s" % (NVIDIA_DIR, name)))
        for rel in cfg.nvi_etc_list:
            host = os.path.join(cfg.nvi_etc_dir, rel)
            if os.path.isfile(host):
                files.append((host, "%s/etc/%s" % (NVIDIA_DIR, rel)))
        devices = []
        for pattern in cfg.nvi_dev_list:
            for host in sorted(_glob(pattern + "*")):
                devices.append((host, "/dev/" + host[len(os.path.dirname(pattern)) + 1:]))
        return cls(files, devices, lib_dirs)

    @staticmethod
    def _library_dirs(cfg, environ):
        """Directories holding NVIDIA libraries: from the ldconfig cache listing (entries
        of this host's architecture), then LD_LIBRARY_PATH and nvi_lib_dirs."""
        found = []
        argv = list(cfg.nvi_ldconfig)
        if argv and "/" not in argv[0]:
            argv[0] = which(argv[0], environ.get("PATH", "") + ":/sbin:/usr/sbin") or argv[0]
        status, text = run_capture(argv) if argv else (1, "")
        if status != 0:
            MSG.verbose("nvidia: %s failed: %s" % (" ".join(argv), text.strip()[:200]))
            text = ""
        tag = LDCONFIG_ARCH.get(Platform.host().arch)
        for line in text.splitlines():
            match = LDCONFIG_LINE_RE.match(line)
            if match and match.group(1).startswith(NVIDIA_MARKERS) and \
                    (tag is None or tag in match.group(2)):
                found.append(os.path.realpath(os.path.dirname(match.group(3))))
        for directory in environ.get("LD_LIBRARY_PATH", "").split(":") + list(cfg.nvi_lib_dirs):
            if directory.startswith("/") and any(
                    _glob(os.path.join(directory, m) + "*") for m in NVIDIA_MARKERS):
                found.append(os.path.realpath(directory))
        unique = []
        for directory in found:
            if directory not in unique:
                unique.append(directory)
        return unique

    def summary(self):
        counts = dict((part, len([c for _, c in self.files
                                  if c.startswith("%s/%s/" % (NVIDIA_DIR, part))]))
                      for part in ("lib", "bin", "etc"))
        return "%d libraries (from %s), %d tools, %d icd files, %d devices" % (
            counts["lib"], ", ".join(self.lib_dirs), counts["bin"], counts["etc"],
            len(self.devices))


def _glob(pattern):
    import glob
    return glob.glob(pattern)


NO_NVIDIA = ("no NVIDIA driver on this host (no libcuda or libnvidia-* in the ldconfig cache, "
             "LD_LIBRARY_PATH or nvi_lib_dirs)")


# ---- 9.3.3 The plan, and what every engine shares (Engine) ----


class Change(object):
    """One thing a run makes on disk before its engine starts (RunPlan.changes): kind, the
    host path, and a value. Kinds: dir (value: mode), file (value: text; written when it
    differs), touch (an empty file), symlink (value: target; an empty directory there is
    replaced), nested (value: (target, is a directory): a mount point inside a volume made
    a symlink for the run, put back after it), tree (value: [(host path, relative path)]: a
    directory of symlinks made whole or not at all), setup (value: the mode to set up),
    bundle (value: an OCI config.json for a new bundle directory), record (value: text of
    a cache file: failure to write it is no error), binary (value: bytes of an executable
    made when missing: F2's ld.so copy), patch (value: (patchelf, loader, library path):
    F4's patching of a program new since setup). what: how an error names it."""

    def __init__(self, kind, path, value=None, what=None):
        self.kind, self.path, self.value, self.what = kind, path, value, what

    def __repr__(self):
        value = self.value if self.kind in ("symlink", "setup", "dir") else \
            "%d entries" % len(self.value) if self.kind == "tree" else None
        return "%s %s%s" % (self.kind, self.path, "" if value is None else " (%s)" % value)


class RunPlan(object):
    """What a run would do, built without writing anything (Engine.plan): the engine's argv,
    environment, host working directory and executable (when the kernel starts another
    program than argv[0]); the container's command, working directory, user and binds;
    and the changes on disk that Engine.apply makes, in one place, before the start."""

    def __init__(self, mode, argv, env, cwd, executable, engine):
        self.mode = mode
        self.argv, self.env, self.cwd, self.executable = argv, env, cwd, executable
        self.command = list(engine.argv)          # as the container sees it
        self.workdir = engine.cwd
        self.user = engine.user
        self.binds = list(engine.volumes)
        self.changes = list(engine.changes)

    def describe(self):
        """Lines saying what would run (for -D, benchmarks and tests)."""
        lines = ["mode: %s" % self.mode, "engine: %s" % " ".join(self.argv),
                 "command: %s (in %s, as %s)" % (" ".join(self.command), self.workdir,
                                                 self.user and self.user.name)]
        lines += ["bind: %s -> %s%s" % (v.host, v.cont, " (ro)" if v.readonly else "")
                  for v in self.binds]
        return lines + ["change: %r" % c for c in self.changes]


class Engine(object):
    """What every execution mode shares; a subclass implements command() and may override
    the hooks below. Use: Engine(session, container, opts, command_args, tools).run()."""

    mode = None
    banner_char = "*"
    runs_as_host_user = False      # F and S modes: always the host uid/gid
    can_publish = False            # -p with another host port (proot -p)
    can_set_hostname = False       # --hostname (a UTS namespace)
    can_set_kernel = False         # -k/--kernel (proot -k)
    can_size_shm = False           # --shm-size (a private /dev/shm)
    can_bind_readonly = False      # -v HOST:CONT:ro enforced (a read-only bind)
    devices_at_own_path = False    # F: the host /dev is seen as it is, no device elsewhere
    probe_group = None             # modes whose host probe is the same share its result
    keeps_sysdirs = None           # None: every sysdirs_list entry; else the ones kept
    death_signal = "SIGKILL"       # what the engine gets if udocker.py dies (PDEATHSIG)
    slow_to_start = False          # ms pass before the container's first process runs
    own_pid_namespace = False      # the kernel kills what the container leaves at its end
    passed_fds = 0                 # fds 3..passed_fds handed to the container (runc)
    needs_tools = ()               # what it takes from the tools tarball (Tools.install)

    def __init__(self, session, container, opts, args, tools):
        self.session = session
        self.cfg = session.cfg
        self.container = container
        self.opts = opts
        self.args = list(args)
        self.tools = tools
        self.root = container.root
        self.volumes = []
        self.env = {}
        self.user = None
        self.cwd = "/"
        self.argv = []
        self.exe = None                # host path of argv[0]
        self.exe_path = None           # its container path, as found in PATH
        self.executable = None         # the program to start when not argv[0] (F3)
        self.passwd_rows = []
        self.group_rows = []
        self.signalled = None          # the last terminating signal forwarded
        self.nvidia = None             # the host's NvidiaDriver when the run shows it
        self.cannot_start = None       # an EngineError: why this mode cannot run here
        self.given_volumes = None      # Volume.from_options(opts), when the caller has them
        self.setup_mode = None         # a mode to set the container up for (F: first run)
        self.changes = []              # Change: what the run makes on disk (RunPlan)
        self.environ = session.environ        # the session's environment, not os.environ
        self._invoking = None                 # host_user(), see invoking_user()

    # -- the steps every mode takes, in order

    def run(self):
        """Plan (every check), apply the plan's changes, start the engine and wait;
        returns the container command's status."""
        plan = self.plan()
        supervisor = Supervisor(self)
        try:
            self.apply(plan)
            self.banner()
            if MSG.level >= Messages.DBG:
                for line in plan.describe():
                    MSG.debug("run plan: " + line)
            return supervisor.run(plan.argv, plan.env, plan.cwd)
        finally:
            self.cleanup()
            if supervisor.watchdog is not None:
                supervisor.watchdog.release()

    def plan(self):
        """The RunPlan of this run, complete and checked, with nothing written yet; raises
        UdockerError for whatever would stop the run."""
        self.changes = []
        if self.setup_mode:
            self.change("setup", self.container.dir, self.setup_mode)
        self.prepare()
        if self.cannot_start is not None:
            raise self.cannot_start
        argv, env, cwd = self.command()
        prefix = self.affinity(env)
        if prefix and self.executable:          # numactl/taskset start it by its path
            argv, self.executable = [self.executable] + argv[1:], None
        if self.container.records:
            self.run_dir()
            for record in self.container.records:
                self.change("record", *record)
            self.container.records = []
        return RunPlan(self.mode, prefix + argv, env, cwd, self.executable, self)

    def change(self, kind, path, value=None, what=None):
        """Add a Change to the plan (nothing is written until apply)."""
        self.changes.append(Change(kind, path, value, what))

    def planned(self, path):
        """True if the plan already makes something at path."""
        return any(c.path == path for c in self.changes)

    def apply(self, plan):
        """Make the plan's changes on disk, in order: the one place a run writes before its
        engine starts (what a mode undoes afterwards is undone by cleanup())."""
        for change in plan.changes:
            try:
                self._apply(change)
            except (IOError, OSError) as exc:
                if change.kind == "record":
                    continue                                # a cache: next run tries again
                if change.kind == "dir" and change.what is None:
                    MSG.verbose("cannot make %s: %s" % (change.path, exc.strerror or exc))
                    continue
                raise EngineError("cannot make %s: %s" % (change.what or change.path,
                                                          exc.strerror or exc))

    def _apply(self, change):
        kind, path, value = change.kind, change.path, change.value
        if kind == "setup":
            MSG.info("setting up container %s for mode %s" % (self.container.cid, value))
            set_execmode(self.session, self.container, value, self.tools)
        elif kind == "dir":
            if not os.path.isdir(path):
                makedirs(path, *([value] if value else []))
        elif kind in ("file", "record"):
            try:
                if read_text(path) == value:
                    return
            except (IOError, OSError, ValueError):
                pass
            makedirs(os.path.dirname(path))
            write_atomic(path, value, sync=kind == "file")
        elif kind == "binary":
            if not os.path.isfile(path):
                makedirs(os.path.dirname(path))
                write_atomic(path, value, mode=0o755)
        elif kind == "patch":
            ElfPatcher(value[0], self.container).patch_new(path, *value[1:])
        elif kind == "touch":
            makedirs(os.path.dirname(path))
            if not os.path.lexists(path):
                open(path, "a").close()
        elif kind in ("symlink", "nested"):
            target = value[0] if kind == "nested" else value
            if os.path.islink(path):
                pass                            # replaced below, unless it is the same
            elif os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
            elif kind == "nested" and os.path.isfile(path) and not os.path.getsize(path):
                os.unlink(path)
            makedirs(os.path.dirname(path))
            if not (os.path.islink(path) and os.readlink(path) == target):
                symlink_atomic(target, path)
            if kind == "nested":
                self.nested_links.append((path, value[1]))
        elif kind == "tree":
            if not os.path.isdir(path):
                staging = tempfile.mkdtemp(prefix=".tree-", dir=os.path.dirname(path))
                for host, rel in value:
                    makedirs(os.path.dirname(os.path.join(staging, rel)))
                    os.symlink(host, os.path.join(staging, rel))
                try:
                    os.rename(staging, path)
                except OSError:                        # another run made it first
                    remove_tree(staging)
        elif kind == "bundle":
            os.mkdir(path, 0o700)
            with open(os.path.join(path, "config.json"), "wb") as handle:
                handle.write(to_bytes(value))
        else:
            raise ValueError("unknown change: %r" % change)

    def run_dir(self):
        """The container's run directory, made by the plan when it is not there yet."""
        path = self.container.run_dir(self.cfg)
        if not os.path.isdir(path) and not self.planned(path):
            self.change("dir", path, 0o700, "the run directory %s" % path)
        return path

    def prepare(self):
        meta = {} if self.opts.get("nometa") else self.container.image_config()
        self.check_options()
        self.passwd_rows, self.group_rows = self.identity_sources()
        self.user = self.choose_user(meta)
        self.volumes = self.choose_volumes()
        for vol in self.volumes:
            if vol.readonly and not vol.system and not self.can_bind_readonly:
                raise UsageError("mode %s cannot make a volume read-only: -v %s:%s:ro (modes "
                                 "R1, R2, R3 and S1 can; without :ro it is bound writable)"
                                 % (self.mode, vol.host, vol.cont))
        self.make_mount_points()
        self.nvidia = self.find_nvidia()
        if self.nvidia:
            self.volumes += self.nvidia_volumes()
        self.arrange_identity()
        self.env = self.build_env(meta)
        if self.nvidia:
            self.env["PATH"] = NVIDIA_DIR + "/bin:" + self.env["PATH"]
            self.env["LD_LIBRARY_PATH"] = ":".join(
                [NVIDIA_DIR + "/lib"] + [d for d in self.env.get("LD_LIBRARY_PATH", "")
                                         .split(":") if d and d != NVIDIA_DIR + "/lib"])
            for name, rel in (("VK_ICD_FILENAMES", "vulkan/icd.d/nvidia_icd.json"),
                              ("OCL_ICD_VENDORS", "OpenCL/vendors")):
                path = "%s/etc/%s" % (NVIDIA_DIR, rel)
                if any(c == path or c.startswith(path + "/") for _, c in self.nvidia.files):
                    self.env.setdefault(name, path)
        self.cwd = self.choose_cwd(meta)
        self.argv = self.choose_command(meta)
        self.exe_path, self.exe = self.find_executable(self.argv[0])

    def check_options(self):
        """One line for each run option this mode cannot honour: an error where ignoring it
        would change what the container reaches (a port), a warning where it would not."""
        for spec in self.opts.get("publish") or []:
            host_port, cont_port = parse_publish(spec)
            if host_port != cont_port and not self.can_publish:
                raise UsageError("mode %s shares the host network and cannot map ports: -p %s "
                                 "(use a P mode, or the same port on both sides)"
                                 % (self.mode, spec))
        for option, able, what in (("hostname", self.can_set_hostname, "host name"),
                                   ("kernel", self.can_set_kernel, "kernel release"),
                                   ("shm_size", self.can_size_shm, "size of /dev/shm (the "
                                    "host's is shown; R modes can)")):
            if self.opts.get(option) and not able:
                MSG.warning("mode %s cannot set the %s: --%s ignored"
                            % (self.mode, what, option.replace("_", "-")))

    # -- user and identity

    def invoking_user(self):
        """host_user() of the session's environment, asked once a run (each getpwuid reads
        nsswitch.conf and the host's passwd again)."""
        if self._invoking is None:
            self._invoking = host_user(self.environ)
        return self._invoking

    def identity_sources(self):
        if self.opts.get("hostauth"):
            return read_identity_db("/etc/passwd"), read_identity_db("/etc/group")
        return (read_identity_db(resolve_in_root(self.root, "/etc/passwd")),
                read_identity_db(resolve_in_root(self.root, "/etc/group")))

    def choose_user(self, meta):
        wanted = self.opts.get("user") or meta.get("User") or ""
        if self.runs_as_host_user:
            return self._host_user(wanted)
        if not wanted:
            wanted = "0"
        user = _lookup_user(self.passwd_rows, self.group_rows, wanted)
        if user.uid == 0 and not user.known:
            user.name, user.home = "root", "/root"
        return user

    def _host_user(self, wanted):
        name, uid, gid, home = self.invoking_user()
        if wanted and wanted.split(":")[0] in ("root", "0"):
            MSG.warning("mode %s runs as your own user, not root" % self.mode)
        elif wanted:
            try:
                name = _lookup_user(self.passwd_rows, self.group_rows, wanted).name
            except EngineError:
                pass
        for row in self.passwd_rows:
            if len(row) >= 7 and row[2] == str(uid):
                return RunUser(row[0], uid, gid, row[5], row[6])
        home = home if self.opts.get("bindhome") else "/"
        return RunUser(name, uid, gid, home, "/bin/sh", known=False)

    def identity_files(self):
        """(passwd text, group text) for the run, or None when the container's own serve."""
        if self.opts.get("containerauth") or \
                any(v.cont in ("/etc/passwd", "/etc/group") for v in self.volumes):
            return None
        passwd = [":".join(row) for row in self.passwd_rows]
        group = [":".join(row) for row in self.group_rows]
        changed = self.opts.get("hostauth")
        if not any(len(r) > 2 and r[2] == str(self.user.uid) for r in self.passwd_rows):
            passwd.append(self.user.passwd_line())
            changed = True
        if not any(len(r) > 2 and r[2] == str(self.user.gid) for r in self.group_rows):
            group.append("%s:x:%d:" % (self.user.name, self.user.gid))
            changed = True
        if not changed:
            return None
        return "\n".join(passwd) + "\n", "\n".join(group) + "\n"

    def arrange_identity(self):
        """Default: copies bound over /etc/passwd and /etc/group (P, R, S modes)."""
        files = self.identity_files()
        if files is None:
            return
        run_dir = self.run_dir()
        for cont, text in zip(("/etc/passwd", "/etc/group"), files):
            digest = hashlib.sha256(to_bytes(text)).hexdigest()[:16]
            path = os.path.join(run_dir, "%s-%s" % (os.path.basename(cont), digest))
            if not os.path.exists(path):
                self.change("file", path, text)
            self.volumes.append(Volume(path, cont, readonly=True, system=True))

    # -- volumes

    def sysdirs(self):
        wanted = list(self.cfg.sysdirs_list) + list(HOST_FILES)
        if self.keeps_sysdirs is not None:
            wanted = [p for p in wanted if p in self.keeps_sysdirs]
        return wanted

    def choose_volumes(self):
        volumes = []
        if not self.opts.get("nosysdirs"):
            volumes += [Volume(p, p, system=True) for p in self.sysdirs() if os.path.exists(p)]
        if self.opts.get("dri"):
            volumes += [Volume(p, p, system=True) for p in self.cfg.dri_list
                        if os.path.exists(p)]
        if self.opts.get("bindhome"):
            home = self.invoking_user()[3]
            if os.path.isdir(home):
                volumes.append(Volume(home, home))
        volumes += Volume.from_options(self.opts) if self.given_volumes is None \
            else self.given_volumes
        volumes += self.device_volumes(volumes)
        novol = set(self.opts.get("novol") or [])
        kept = {}
        for vol in volumes:
            if vol.host in novol or vol.cont in novol or \
                    "%s:%s" % (vol.host, vol.cont) in novol:
                continue
            kept[vol.cont] = vol                        # the last one for a path wins
        return [v for v in volumes if kept.get(v.cont) is v]

    def outer_volume(self, vol):
        """The user volume whose container path holds vol's most closely, or None."""
        outer = None
        for other in self.volumes:
            if other is not vol and not other.system and \
                    vol.cont.startswith(other.cont.rstrip("/") + "/") and \
                    (outer is None or len(other.cont) > len(outer.cont)):
                outer = other
        return outer

    def make_mount_points(self):
        """A volume inside another, writable, one gets its mount point made in the outer
        volume's host directory, as Docker makes it: the missing directories, and an empty
        file for a file volume (cwltool relinks its outputs over them)."""
        for vol in sorted((v for v in self.volumes if not v.system), key=lambda v: len(v.cont)):
            outer = self.outer_volume(vol)
            if outer is None or outer.readonly or not os.path.isdir(outer.host):
                continue
            point = os.path.join(outer.host, vol.cont[len(outer.cont):].lstrip("/"))
            if os.path.lexists(point):
                continue
            self.change("dir" if os.path.isdir(vol.host) else "touch", point, None,
                        "the mount point of %s in %s" % (vol.cont, outer.host))

    def device_volumes(self, volumes):
        """--device HOST[:CONT[:PERMISSIONS]] as Volumes, but for a device a volume already
        shows at its own path (P and F modes bind the host /dev)."""
        found = []
        for spec in self.opts.get("device") or []:
            parts = spec.split(":")
            host = os.path.normpath(parts[0])
            cont = cont_path(parts[1]) if len(parts) > 1 and parts[1].startswith("/") else host
            try:
                st = os.stat(host)
            except OSError:
                raise UsageError("--device %s: no such device" % host)
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise UsageError("--device %s: not a device" % host)
            if self.devices_at_own_path and cont != host:
                raise UsageError("mode %s shows host devices only at their own path: --device "
                                 "%s (use a P or R mode)" % (self.mode, spec))
            if not any(v.host == v.cont and (host == v.host or host.startswith(v.host + "/"))
                       and host == cont for v in volumes):
                found.append(Volume(host, cont, system=True, device=True))
        return found

    def find_nvidia(self):
        """The host's NVIDIA driver when run --nvidia or setup --nvidia asks for it; a
        container set up for it on a host without one runs without (one warning)."""
        marked = bool(self.container.files) and \
            self.container.files.has(ContainerDir.NVIDIA)
        asked = "--nvidia" if self.opts.get("nvidia") else \
            "--gpus" if self.opts.get("gpus") and parse_gpus(self.opts["gpus"]) else None
        if not (asked or marked):
            return None
        driver = NvidiaDriver.find(self.cfg, self.environ)
        if driver is None:
            if asked:
                raise EngineError("run %s: %s" % (asked, NO_NVIDIA))
            MSG.warning("container %s is set up for NVIDIA but %s: running without it"
                        % (self.container.cid, NO_NVIDIA))
            return None
        MSG.verbose("nvidia: " + driver.summary())
        return driver

    def nvidia_volumes(self):
        """The driver's files bound one by one under NVIDIA_DIR, and its devices but those
        a /dev volume already shows (P modes; R and F override)."""
        volumes = [Volume(host, cont, readonly=True, system=True)
                   for host, cont in self.nvidia.files]
        for host, cont in self.nvidia.devices:
            if host == cont and any(v.host == v.cont and host.startswith(v.host + "/")
                                    for v in self.volumes):
                continue
            volumes.append(Volume(host, cont, system=True, device=True))
        return volumes

    def cont2host(self, path, follow_last=True):
        """The host path a container path reaches, through volumes and ROOT symlinks."""
        path = cont_path(path)
        best = None
        for vol in self.volumes:
            if path == vol.cont or path.startswith(vol.cont.rstrip("/") + "/"):
                if best is None or len(vol.cont) > len(best.cont):
                    best = vol
        if best is not None:
            rest = path[len(best.cont):].lstrip("/")
            return os.path.join(best.host, rest) if rest else best.host
        return resolve_in_root(self.root, path, follow_last)

    # -- environment

    def build_env(self, meta):
        env = {}
        host = self.environ
        if self.opts.get("hostenv"):
            env.update((k, v) for k, v in host.items()
                       if k not in self.cfg.invalid_host_env)
        else:                    # os.environ: names decoded once, only values passed read
            names = list(host)
            known = set(names)
            env.update((k, host[k]) for k in self.cfg.valid_host_env
                       if k in known and k != "PATH")
            passed = name_matcher(self.cfg.pass_host_env)
            env.update((k, host[k]) for k in names if passed(k))
        given = self._env_words(self.opts.get("env") or [], "-e", host)
        image = self._env_words(meta.get("Env") or [], "image Env", host)
        from_files = []
        for path in self.opts.get("env_file") or []:
            from_files += self._env_words(self._read_env_file(path), path, host)
        env.update(image)
        env.update(given)
        for name, value in from_files:
            if name not in dict(given) and name not in dict(image):
                env[name] = value
        if self.opts.get("bindhome") and "HOME" not in dict(given):
            env["HOME"] = self.invoking_user()[3]
        self._add_run_env(env)
        return env

    @staticmethod
    def _env_words(words, origin, environ):
        """(NAME, VALUE) pairs of NAME=VALUE words; a bare NAME takes environ's value."""
        pairs = []
        for word in words:
            name, has_value, value = word.partition("=")
            if not name or "=" in name or any(c.isspace() for c in name):
                raise UsageError("invalid environment variable in %s: %r" % (origin, word))
            if not has_value:
                if name not in environ:
                    continue
                value = environ[name]
            pairs.append((name, value))
        return pairs

    @staticmethod
    def _read_env_file(path):
        """The NAME=VALUE and NAME words of an env file, as docker reads them (blank lines
        and # comments skipped) and as a shell script writes them (`export NAME=VALUE`)."""
        try:
            text = read_text(path)
        except (IOError, OSError) as exc:
            raise UsageError("cannot read --env-file %s: %s" % (path, exc.strerror or exc))
        words = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("export") and line[6:7].isspace():
                line = line[6:].lstrip()
            if line and not line.startswith("#"):
                words.append(line)
        return words

    def _add_run_env(self, env):
        user = self.user
        if "PATH" not in env:
            env["PATH"] = self.cfg.root_path if user.uid == 0 else self.cfg.user_path
        env.setdefault("HOME", user.home)
        for name in ("USER", "LOGNAME", "USERNAME"):
            env[name] = user.name
        env.setdefault("SHLVL", "0")
        env["PS1"] = "%s$ " % self.container.cid[:8] if user.uid else \
            "%s# " % self.container.cid[:8]
        env["container_ruser"] = self.invoking_user()[0]
        env["container_root"] = self.root
        env["container_uuid"] = self.container.cid
        env["container_execmode"] = self.mode
        env["container_names"] = " ".join(self.container.names)
        env["container_run"] = random_hex(8)      # this run's processes carry it

    # -- working directory and command

    def choose_cwd(self, meta):
        wanted = self.opts.get("workdir")
        if wanted:
            if not wanted.startswith("/") or not os.path.isdir(self.cont2host(wanted)):
                raise EngineError("invalid working directory: %s" % wanted)
            return cont_path(wanted)
        wanted = meta.get("WorkingDir") or ""
        if wanted.startswith("/"):
            host = self.cont2host(wanted)
            if not os.path.isdir(host):
                MSG.verbose("creating the image's working directory %s" % wanted)
                self.change("dir", host, None, "the working directory %s" % wanted)
            return cont_path(wanted)
        home = self.env.get("HOME") or self.user.home
        if home.startswith("/") and os.path.isdir(self.cont2host(home)):
            return cont_path(home)
        return "/"

    def choose_command(self, meta):
        entrypoint = self.opts.get("entrypoint")
        if entrypoint is not None:
            argv = entrypoint.split() + self.args
        else:
            argv = _as_argv(meta.get("Entrypoint")) + (self.args or _as_argv(meta.get("Cmd")))
        if not argv:
            argv = list(self.cfg.cmd)
            MSG.warning("no command assuming: %s" % argv)
        return argv

    def find_executable(self, name):
        """(container path, host path) of the command, searched like execvp in the
        container's PATH."""
        name = _native(name)        # 2.7: argv bytes meet the image's JSON unicode here
        if "/" in name:
            candidates = [name if name.startswith("/") else
                          os.path.join(_native(self.cwd), name)]
        else:
            candidates = [os.path.join(d or ".", name) for d in
                          _native(self.env.get("PATH", "")).split(":") if d.startswith("/")]
        for candidate in candidates:
            host = self.cont2host(candidate)
            if os.path.isfile(host) and os.access(host, os.X_OK):
                return candidate, host
        raise EngineError("command not found or has no execute bit set: %s" % name)

    # -- start-up

    def affinity(self, env):
        """--cpuset-cpus: udocker.py binds itself to the CPUs (sched_setaffinity), which
        the engine inherits; where that call is missing, a command prefix from
        cpu_affinity_exec_tools (numactl, taskset), but not under fakechroot's LD_PRELOAD."""
        cpus = self.opts.get("cpuset_cpus")
        if cpus is None:
            return []
        wanted = parse_cpu_list(cpus)
        if set_cpu_affinity(wanted):
            return []
        if "LD_PRELOAD" in env:
            raise EngineError("--cpuset-cpus: this Python cannot set the CPU affinity and "
                              "mode %s cannot run numactl/taskset" % self.mode)
        for tool in self.cfg.cpu_affinity_exec_tools:
            found = tool and which(tool[0], self.environ.get("PATH", ""))
            if found:
                return [found] + [w.replace("%s", cpus) for w in tool[1:]]
        MSG.warning("--cpuset-cpus: neither numactl nor taskset found, ignored")
        return []

    def banner(self):
        if self.opts.get("nobanner") or MSG.level < Messages.INF:
            return
        char = self.banner_char
        lines = ["", char * 78, char + " " * 76 + char,
                 char + ("STARTING " + self.container.cid).center(76) + char,
                 char + " " * 76 + char, char * 78,
                 "executing: %s" % os.path.basename(self.argv[0])]
        sys.stderr.write("\n".join(" " + line for line in lines) + "\n")
        sys.stderr.flush()

    # -- hooks for the modes

    def command(self):
        """(argv, environment, host working directory) of the engine process."""
        raise NotImplementedError

    def forward_signal(self, pid, signum):
        """Deliver a signal udocker.py received to the container's processes, as a
        terminal does to a process group (default: the engine process and all below it).
        SIGWINCH only goes to the engine process."""
        targets = [pid] if signum == signal.SIGWINCH else [pid] + descendants(pid)
        for target in targets:
            _kill_quietly(target, signum)

    def exit_status(self, status):
        return status

    def watch(self, watchdog):
        """Add to watchdog what to do if udocker.py is killed during the run."""

    def orphan_marker(self):
        """NAME=VALUE in the environment of every process of the container, by which its
        orphans are found, or None."""
        return None

    def child_hook(self):
        """None, or a function (made before the fork) the engine process calls before exec."""
        return None

    def wait(self, pid, keep=()):
        """The engine's exit status (keep: our own helper processes, not the container's)."""
        return _wait_status(pid)

    def cleanup(self):
        pass

    @classmethod
    def host_probe(cls, session, tools):
        """(engine executable, function returning {"ok", "why"}) that tells whether this
        mode can start on this host, or None; raises EngineError when a tool is missing."""
        return None

    def _bind_host(self, host):
        """A host path as an engine's list syntax can carry it: proot -b and
        FAKECHROOT_VOLUMES split at ':', so a path with one is given as a symlink without
        (the kernel follows it)."""
        if ":" not in host:
            return host
        links = os.path.join(self.run_dir(), ContainerDir.RUN_BINDS)
        link = os.path.join(links, hashlib.sha256(to_bytes(host)).hexdigest()[:16])
        if not (os.path.islink(link) and os.readlink(link) == host):
            self.change("symlink", link, host)
        return link

    @classmethod
    def check_container(cls, container, tools):
        """Raises EngineError when this mode cannot run this container."""

    @classmethod
    def check_setup(cls, container, tools):
        """Raises EngineError when setup --execmode of this mode would prepare a container
        it cannot run (checked before the old mode's changes are undone)."""

    @classmethod
    def setup(cls, container, tools, force=False):
        """Prepare a container for this mode (setup --execmode); default: nothing to do."""

    @classmethod
    def leave(cls, container, tools):
        """Undo what setup() changed, before the container moves to another mode."""


MAX_CPUS = 1 << 16          # Linux's CONFIG_NR_CPUS is at most 8192: past this, a typo


def parse_cpu_list(text):
    """'0-3,8' -> set of CPU numbers; raises UsageError."""
    cpus = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or \
                int(last or first) >= MAX_CPUS:
            raise UsageError("invalid --cpuset-cpus: %s (e.g. 0-3,8)" % text)
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def set_cpu_affinity(cpus):
    """Bind this process (and so what it starts) to cpus; False if this Python has no way
    to; raises UsageError if the host refuses the set."""
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
            return True
        import ctypes
        mask = (ctypes.c_ulong * 16)()                     # cpu_set_t: 1024 bits
        for cpu in cpus:
            if cpu >= 1024:
                raise OSError(errno.EINVAL, "CPU number too large")
            mask[cpu // 64] |= 1 << (cpu % 64)
        setaffinity = ctypes.CDLL(None, use_errno=True).sched_setaffinity
        if setaffinity(0, ctypes.sizeof(mask), ctypes.byref(mask)) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        return True
    except (ImportError, AttributeError):
        return False
    except OSError as exc:
        raise UsageError("--cpuset-cpus %s: %s" % (",".join(str(c) for c in sorted(cpus)),
                                                    exc.strerror or exc))


def parse_publish(spec):
    """-p [IP:]HOST:CONT[/tcp] or CONT -> (host port, container port) as text."""
    match = re.match(r"^(?:[\d.]+:)?(\d+):(\d+)(?:/tcp)?$", spec) or \
        re.match(r"^()(\d+)(?:/tcp)?$", spec)
    if not match or not all(0 < int(port) < 65536 for port in match.groups() if port):
        raise UsageError("invalid port mapping: %s (HOST:CONT, ports 1-65535)" % spec)
    return match.group(1) or match.group(2), match.group(2)


def parse_gpus(spec):
    """run --gpus all|N|device=ID[,ID]|count=N[,capabilities=...] (Docker's spelling) ->
    True when it asks for GPUs (all of the host's NVIDIA devices are shown, as --nvidia
    shows them), False for 0; raises UsageError for another spec."""
    try:
        fields = next(csv.reader([spec]))
    except (csv.Error, StopIteration):
        fields = []
    wanted = None
    for field in fields:
        key, _, value = field.strip().partition("=")
        if not _:
            key, value = "count", key
        if key == "count" and (value == "all" or value.isdigit()):
            wanted = value != "0"
        elif key == "device" and value:
            wanted = True
        elif key == "driver" and value == "nvidia" or key == "capabilities":
            continue
        else:
            wanted = None
            break
    if wanted is None:
        raise UsageError("invalid --gpus: %s (all, a count, or device=ID[,ID...])" % spec)
    return wanted


def parse_size(spec, option):
    """A size as Docker writes it (--shm-size=64m): digits, then b, k, m or g -> bytes."""
    match = re.match(r"^(\d+)([bkmg]?)b?$", spec.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise UsageError("invalid %s: %s (a size such as 64m or 1g)" % (option, spec))
    return int(match.group(1)) * 1024 ** "bkmg".index(match.group(2) or "b")


def _as_argv(value):
    if not value:
        return []
    if isinstance(value, string_types):
        return ["/bin/sh", "-c", value]
    return [to_text(v) for v in value]


# ---- 9.4 Supervision ----


def sh_quote(word):
    """word as one word of a sh command line (shlex.quote without shlex, which imports
    re)."""
    return "'%s'" % word.replace("'", "'\\''")


class Watchdog(object):
    """A process that does its duties only if udocker.py dies (even by SIGKILL) before
    release(): for engines whose container would outlive it (runc/crun keep a pid-1
    process running when the runtime is killed; fakechroot's orphans have no common
    parent left), and to deliver the death signal to an engine started without PDEATHSIG
    (Supervisor). It learns of the death by EOF on a pipe. Its duties: signals to send
    (kill_first), programs to run (run_command), processes to find by a marker in their
    environment (kill_marked). The Supervisor starts it once the engine runs: /bin/sh by
    posix_spawn (Python 3.8+), else a fork of udocker.py, which copies every page
    udocker.py writes afterwards (F3: 0.23 ms slower a run, medians of 201 interleaved
    runs; started before the run's plan instead, the shell slowed the plan more than it
    saved)."""

    COMMAND_SECONDS = 10            # a runtime's kill or delete that hangs is killed

    def __init__(self):
        self.kills = []                 # (pid, signal name): first
        self.commands = []              # argv lists run after the kills
        self.markers = []               # NAME=VALUE: kill_marked, last
        self.pid = self.write_fd = None

    def kill_first(self, pid, name):
        self.kills.append((pid, name))

    def run_command(self, argv):
        """Run argv (a program by its path) if udocker.py dies."""
        self.commands.append(list(argv))

    def kill_marked(self, marker):
        self.markers.append(marker)

    def duties(self):
        return self.kills + self.commands + self.markers

    def start(self):
        read_fd, self.write_fd = os.pipe()
        for fd in (read_fd, self.write_fd):               # the engine must not hold them
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        if not (hasattr(os, "posix_spawn") and self._start_shell(read_fd)):
            self._fork(read_fd)
        os.close(read_fd)
        return self

    def script(self):
        """The duties as a sh script (kill_marked: GNU or BusyBox grep's -z)."""
        lines = ["kill -s %s %d" % (name[3:], pid) for pid, name in self.kills]
        if self.commands:          # each for COMMAND_SECONDS at most, where it can
            lines.append('t=; timeout 1 true 2>/dev/null && t="timeout -s KILL %d"'
                         % self.COMMAND_SECONDS)
        lines += ["$t " + " ".join(sh_quote(_native(word)) for word in argv)
                  for argv in self.commands]
        lines += ['m=%s; n=0; while [ $n -lt 20 ]; do p=$(grep -lzxFs -e "$m" '
                  '/proc/[0-9]*/environ); [ -n "$p" ] || break; for e in $p; do e=${e#/proc/}; '
                  'kill -s KILL ${e%%/environ}; done; n=$((n+1)); sleep 0.05; done'
                  % sh_quote(_native(marker)) for marker in self.markers]
        return "read x; [ -n \"$x\" ] || { %s; }" % "\n".join(lines + [":"])

    def _start_shell(self, read_fd):
        """The shell form; False if /bin/sh cannot start. The terminating signals are
        blocked in it, as a terminal sends them to udocker.py's whole process group."""
        blocked = [getattr(signal, n) for n in FORWARDED_SIGNALS if n != "SIGWINCH"]
        try:
            self.pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", self.script()], {},
                                      file_actions=[(os.POSIX_SPAWN_DUP2, read_fd, 0),
                                                    (os.POSIX_SPAWN_OPEN, 1, os.devnull,
                                                     os.O_WRONLY, 0),
                                                    (os.POSIX_SPAWN_DUP2, 1, 2)],
                                      setsigmask=blocked)
        except OSError:
            return False
        return True

    def _fork(self, read_fd):
        self.pid = os.fork()
        if self.pid == 0:                                 # pragma: no cover (child)
            status = 0
            try:
                os.close(self.write_fd)
                for name in FORWARDED_SIGNALS:
                    signal.signal(getattr(signal, name), signal.SIG_IGN)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                if not os.read(read_fd, 1):
                    duties = [lambda p=pid, n=name: os.kill(p, getattr(signal, n))
                              for pid, name in self.kills] + \
                        [lambda a=argv: run_capture(a, timeout=self.COMMAND_SECONDS)
                         for argv in self.commands] \
                        + [lambda m=marker: kill_marked(m) for marker in self.markers]
                    for duty in duties:
                        try:
                            duty()
                        except Exception:     # noqa: B902 (the next duty is done anyway)
                            status = 1
            except BaseException:
                status = 1
            os._exit(status)

    def release(self):
        """udocker.py is done with the container: the watchdog exits without working. It
        is not waited for (~1 ms): udocker.py exits next, and whoever reaps it reaps this."""
        if self.write_fd is not None:
            os.write(self.write_fd, b"x\n")
            os.close(self.write_fd)
            self.write_fd = None
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except OSError:
                pass


class Supervisor(object):
    """Runs an engine as udocker.py's child: stdin/stdout/stderr and other fds inherited,
    the terminating signals forwarded through Engine.forward_signal, and once the engine
    exits every process the container left behind (reparented to us: we are a child
    subreaper) killed, unless the container has a pid namespace of its own (R modes),
    where the kernel does it. run() returns the exit status (128+N when killed by signal
    N)."""

    # a container that starts at once (F modes) has this long before the watchdog and the
    # subreaper are made: a command that ends sooner needs neither (F3's `true`: 0.5 ms
    # less a run, medians of 201 interleaved runs)
    GRACE_SECONDS = 0.003

    def __init__(self, engine):
        self.engine = engine
        self.watchdog = None
        self.pid = None
        self.pending = []

    def run(self, argv, env, cwd):
        hook = self.engine.child_hook()
        at_once = hook is None and can_spawn_at_once(self.engine.executable or argv[0], cwd)
        # a subreaper only once the engine runs, where its start needs no guard: the
        # _ctypes import (~0.4 ms) is then done while the engine starts
        late = at_once and (self.engine.slow_to_start or self.engine.orphan_marker())
        grace = late and not self.engine.slow_to_start and hasattr(signal, "sigtimedwait")
        reaping = not self.engine.own_pid_namespace
        prctl = None
        if not late:
            prctl = prctl_function()
            if reaping:
                prctl(PR_SET_CHILD_SUBREAPER, 1)
        previous = {}
        for name in FORWARDED_SIGNALS:
            signum = getattr(signal, name)
            if signal.getsignal(signum) != signal.SIG_IGN:    # nohup & co: stays ignored
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            MSG.debug("engine started by %s" % ("posix_spawn" if at_once else "fork"))
            status = strays = None
            if grace:
                status, strays = self._spawn_with_grace(argv, env, cwd)
            elif at_once:
                self.pid = _spawn_at_once(argv, env, cwd, self.engine.executable,
                                          self.engine.passed_fds)
            else:
                self.pid = _spawn(argv, env, cwd, self.engine.executable,
                                  lambda: _engine_child_setup(prctl, self.engine.death_signal,
                                                              self.engine.passed_fds, hook))
            if status is None:                  # (not ended within a grace)
                self._watch(at_once)
                strays = late and reaping and self._late_subreaper()
                for signum in self.pending:
                    self.engine.forward_signal(self.pid, signum)
                keep = (self.watchdog.pid,) if self.watchdog else ()
                status = self.engine.wait(self.pid, keep)
                if reaping:
                    _reap_leftovers(keep=keep)
            if strays:
                kill_marked(self.engine.orphan_marker())
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.engine.exit_status(status)

    def _spawn_with_grace(self, argv, env, cwd):
        """Start the engine (posix_spawn) and give it GRACE_SECONDS: (its status, whether
        a process of the container may be left, adopted by another) if it ended by then,
        else (None, None). Unguarded meanwhile: killed then, udocker.py leaves the
        command running, as it would a moment before its watchdog."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
        try:
            self.pid = _spawn_at_once(argv, env, cwd, self.engine.executable,
                                      self.engine.passed_fds, mask)
            for signum in self.pending:
                self.engine.forward_signal(self.pid, signum)
            self.pending = []
            deadline = time.time() + self.GRACE_SECONDS
            while signal.sigtimedwait([signal.SIGCHLD], max(deadline - time.time(), 0)):
                done, status = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    MSG.debug("the command ended within %g s: no watchdog, no subreaper"
                              % self.GRACE_SECONDS)
                    # strays are possible unless no pid was given out since the engine's
                    return _status_code(status), not only_pids_since(self.pid, self.pid)
            return None, None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _late_subreaper(self):
        """Become the subreaper once the engine runs. True when a process of the container
        may have been orphaned before, and adopted by another: it is then found by its
        marker once the engine exits. False when the runtime takes ms before the
        container's first process (slow_to_start), or when the kernel gave out no pid
        after the engine's but the watchdog's (/proc/loadavg): no process was made."""
        prctl_function()(PR_SET_CHILD_SUBREAPER, 1)
        if self.engine.slow_to_start:
            return False
        if only_pids_since(self.pid, self.watchdog.pid if self.watchdog else self.pid):
            return False
        MSG.debug("processes were made before udocker.py became their subreaper: the "
                  "container's are looked for by their marker at the end")
        return True

    def _watch(self, at_once):
        """The watchdog, started while the engine starts, not before (~0.2 ms). Should
        udocker.py die before this, a forked engine dies too (PDEATHSIG), well before it
        has made a container that could outlive it; a spawned one is unguarded for the
        fraction of a millisecond until here."""
        watchdog = Watchdog()
        self.engine.watch(watchdog)
        if at_once:        # no PDEATHSIG without a step in the engine's process
            watchdog.kill_first(self.pid, self.engine.death_signal)
        if watchdog.duties():
            self.watchdog = watchdog.start()

    def _on_signal(self, signum, frame):
        if signum != signal.SIGWINCH:
            self.engine.signalled = signum
        if self.pid is None:
            self.pending.append(signum)
        else:
            self.engine.forward_signal(self.pid, signum)


def can_spawn_at_once(program, cwd):
    """Whether _spawn_at_once can start program: Python 3.8+ (os.posix_spawn), a path (not
    a name to look up in the engine's PATH), and no other thread that a moment in cwd
    could disturb."""
    if not hasattr(os, "posix_spawn") or "/" not in program:
        return False
    threading_module = sys.modules.get("threading")
    return not (cwd and threading_module and threading_module.active_count() > 1)


def _exec_args(argv, env, executable):
    """(program, argv, environment) as exec takes them."""
    return (_native(executable or argv[0]), [_native(a) for a in argv],
            dict((_native(k), _native(v)) for k, v in env.items()))


def _spawn_at_once(argv, env, cwd, executable, passed_fds=0, sigmask=None):
    """Start the engine by posix_spawn (vfork and exec: nothing of our ~10 MB is copied, and
    no Python runs in the new process: ~0.5 ms less than _spawn), with every fd inherited
    and SIGPIPE/SIGXFSZ back to their default; for an engine that needs no step of its own
    before exec. passed_fds: as for _engine_child_setup (the holes among fds 3..passed_fds,
    and our own close-on-exec ones, are /dev/null in the engine). posix_spawn has no
    working directory of its own: ours is cwd for the moment of the call. sigmask: the
    engine's blocked signals, if not ours. Returns the pid; raises EngineError if it cannot
    start."""
    program, args, envp = _exec_args(argv, env, executable)
    holes, here, null = fd_holes(passed_fds), None, None
    if holes:       # one /dev/null, above them, dup2'd into each (an open each cost more)
        first = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            null = fcntl.fcntl(first, fcntl.F_DUPFD_CLOEXEC, passed_fds + 1)
        finally:
            os.close(first)
        holes = [(os.POSIX_SPAWN_DUP2, null, fd) for fd in holes]
    try:
        if cwd:
            here = os.open(".", getattr(os, "O_PATH", os.O_RDONLY) | os.O_CLOEXEC)
            os.chdir(cwd)
        extra = {} if sigmask is None else {"setsigmask": sigmask}
        return os.posix_spawn(program, args, envp, file_actions=holes,
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), **extra)
    except OSError as exc:
        raise EngineError("cannot execute %s: %s" % (argv[0], exc.strerror or exc))
    finally:
        if here is not None:
            os.fchdir(here)
            os.close(here)
        if null is not None:
            os.close(null)


def _spawn(argv, env, cwd, executable, child_setup):
    """Start the engine with every fd inherited, by fork and exec (the subprocess module
    costs ~3 ms to import); returns its pid; raises EngineError if it cannot start (the
    child reports a failed exec through a close-on-exec pipe)."""
    program, args, envp = _exec_args(argv, env, executable)
    read_fd, write_fd = os.pipe()
    for fd in (read_fd, write_fd):
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    pid = os.fork()
    if pid == 0:                                          # pragma: no cover (child)
        try:
            os.close(read_fd)
            if cwd:
                os.chdir(cwd)
            child_setup()
            if "/" in program:
                os.execve(program, args, envp)
            os.execvpe(program, args, envp)
        except BaseException as exc:
            os.write(write_fd, to_bytes(getattr(exc, "strerror", None) or str(exc) or "?"))
        finally:
            os._exit(127)
    os.close(write_fd)
    failure = b""
    while True:
        try:
            chunk = os.read(read_fd, 512)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if not chunk:
            break
        failure += chunk
    os.close(read_fd)
    if failure:
        _wait_status(pid)
        raise EngineError("cannot execute %s: %s" % (argv[0], to_text(failure)))
    return pid


def _engine_child_setup(prctl, death_signal, passed_fds=0, hook=None):
    """In the engine process before exec: default SIGPIPE (Python ignores it), and a
    signal when udocker.py dies, whatever kills it. passed_fds: fds 3..passed_fds must all
    be open at exec (runc --preserve-fds): holes, and our own close-on-exec fds, become
    /dev/null. hook: the engine's own step (Engine.child_hook)."""
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    prctl(PR_SET_PDEATHSIG, getattr(signal, death_signal))
    if hook is not None:
        hook()
    holes = fd_holes(passed_fds)
    if holes:
        null = os.open(os.devnull, os.O_RDWR)     # (the lowest hole, if one is free)
        for fd in holes:
            if fd != null:
                os.dup2(null, fd)
        if null not in holes:
            os.close(null)
        elif hasattr(os, "set_inheritable"):    # Python 3 opens it close-on-exec
            os.set_inheritable(null, True)


def fd_holes(last):
    """The fds 3..last a program we start would not get (closed, or close-on-exec):
    runc --preserve-fds needs each open, so they become /dev/null in the engine. The open
    ones are listed first (an MPI launcher's fd can be in the hundreds: one listdir, not a
    fcntl for each fd below it). With fd 251 passed, R1 took 1.4 ms longer than without;
    0.7 ms with this and _spawn_at_once's dup2s (61 interleaved runs)."""
    if last < 3:
        return []
    try:
        open_fds = set(int(n) for n in os.listdir("/proc/self/fd") if n.isdigit())
    except OSError:
        open_fds = None
    return [fd for fd in range(3, last + 1)
            if (open_fds is not None and fd not in open_fds) or not inheritable_fd(fd)]


def inheritable_fd(fd):
    """True if fd is open without close-on-exec."""
    try:
        return not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    except (IOError, OSError):
        return False


def highest_inherited_fd():
    """The highest fd above 2 that a program we start inherits (0 if none): a launcher's
    PMI_FD, a `3<file` of the shell."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd") if n.isdigit()]
    except OSError:
        return 0
    return max([fd for fd in fds if fd > 2 and inheritable_fd(fd)] or [0])


def _wait_status(pid):
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
    return _status_code(status)


def _status_code(status):
    """A wait status as a shell does: the exit code, or 128+N when killed by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _wait_killing_strays(pid, strays):
    """The exit status of pid, polled; meanwhile what strays() returns is SIGKILLed with
    everything below it: kill-on-exit made up for where the engine has none. strays() is
    called often while it says "not yet" (None), then less often."""
    delay = 0.001
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if done:
            return _status_code(status)
        found = strays()
        for target in (found or []) + [p for o in found or [] for p in descendants(o)]:
            _kill_quietly(target, signal.SIGKILL)
        time.sleep(delay)
        delay = 0.001 if found is None else min(delay * 2, 0.05)


def _reap_leftovers(keep=()):
    """Kill and reap every remaining child (orphans of the container adopted by us)."""
    for _ in range(100):
        children = [p for p in child_pids(os.getpid()) if p not in keep]
        if not children:
            break
        for pid in children:
            _kill_quietly(pid, signal.SIGKILL)
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


# ---- 9.5 Engines ----
# One sub-section per engine; `run` loads only its own (section 13).


# ---- 9.5.1 PRoot: P1, P2 ----


class ProotEngine(Engine):
    """P1: PRoot with seccomp acceleration; every volume is a -b bind, nothing in ROOT
    changes. proot ignores SIGTERM/SIGINT/SIGHUP itself, so signals go to its first child
    (the container's main process); --kill-on-exit takes the rest down with it."""

    mode = "P1"
    banner_char = "*"
    noseccomp = False
    needs_tools = ("proot",)
    can_publish = True
    can_set_kernel = True
    death_signal = "SIGQUIT"       # proot kills all its tracees on SIGQUIT, not on SIGKILL
    slow_to_start = True           # proot: ~3 ms before its first tracee runs

    def command(self):
        proot, info = self.tools.proot()
        self.proot_info = info
        argv = [proot]
        self.kill_on_exit = self.cfg.proot_killonexit and info.get("kill_on_exit")
        if self.kill_on_exit:
            argv.append("--kill-on-exit")
        if self.cfg.proot_link2symlink:
            argv.append("--link2symlink")
        argv += ["-r", self.root, "-w", self.cwd]
        for vol in self.volumes:
            host = self._bind_host(vol.host)
            argv += ["-b", host if host == vol.cont else "%s:%s" % (host, vol.cont)]
        if self.user.uid == 0:
            argv.append("-0")
        else:
            argv += ["-i", "%d:%d" % (self.user.uid, self.user.gid)]
        if self.opts.get("kernel") and self._kernel_option_works(info):
            argv += ["-k", self.opts["kernel"]]
        argv += self._network_options(info)
        env = dict(self.env)
        env["PROOT_TMP_DIR"] = self._proot_tmp_dir()
        for name in ("PROOT_NO_SECCOMP", "PROOT_NEW_SECCOMP"):
            if name in self.environ:
                env[name] = self.environ[name]
        if self.noseccomp or self.cfg.proot_noseccomp:
            env["PROOT_NO_SECCOMP"] = "1"
        elif not info.get("seccomp"):
            MSG.verbose("this proot has no seccomp acceleration: P1 runs like P2")
        return argv + self.argv, env, None

    def _network_options(self, info):
        options = []
        for spec in self.opts.get("publish") or []:
            host_port, cont_port = parse_publish(spec)
            if host_port == cont_port:
                continue
            if not info.get("port"):
                raise EngineError("this proot cannot map ports (no --port): -p %s" % spec)
            options += ["-p", "%s:%s" % (cont_port, host_port)]
        if self.opts.get("publish_all"):
            if info.get("netcoop"):
                options.append("-n")
            else:
                MSG.warning("this proot has no network cooperation mode: -P ignored")
        return options

    def _proot_tmp_dir(self):
        return proot_tmp_dir(self.cfg, self.environ)

    def _kernel_option_works(self, info):
        """A proot older than statx (5.1-era) answers EINVAL under -k to the
        fstatat(fd, "", AT_EMPTY_PATH) by which glibc 2.33+ implements fstat."""
        kind, version = self.container.libc()
        if info.get("statx", True) or kind != "glibc" or not version_at_least(version, "2.33"):
            return True
        MSG.warning("--kernel ignored: this proot (%s) breaks glibc %s programs with -k"
                    % (info.get("version", "?"), version))
        return False

    def child_hook(self):
        """A proot that does not translate statx (5.1-era: upstream udocker's, Debian's
        5.1.0) would let it and faccessat2 reach host paths: they fail with ENOSYS
        instead, and glibc falls back to fstatat and faccessat, which proot translates."""
        if self.proot_info.get("statx", True):
            return None
        install = enosys_filter(untranslated_syscalls(Platform.host().arch))
        if install is None:
            MSG.warning("cannot hide statx from this proot (no _ctypes): stat may be wrong")
        return install

    def wait(self, pid, keep=()):
        """Without --kill-on-exit proot runs until the last process of the container exits:
        once the first one (the command) has exited, the others are killed here, as
        --kill-on-exit would (they are ours: orphans come to us, a child subreaper)."""
        if self.kill_on_exit:
            return Engine.wait(self, pid, keep)

        def strays():
            # the command is proot's only child; once it has exited, what it started is
            # ours (reparented), and then proot has no child left
            orphans = [p for p in child_pids(os.getpid()) if p != pid and p not in keep]
            return orphans if orphans and not child_pids(pid) else []
        return _wait_killing_strays(pid, strays)

    @classmethod
    def host_probe(cls, session, tools):
        proot = tools.proot()[0]
        env = {"PATH": "/usr/bin:/bin",
               "PROOT_TMP_DIR": proot_tmp_dir(session.cfg, session.environ)}
        if cls.noseccomp:
            env["PROOT_NO_SECCOMP"] = "1"
        program = ["/bin/true"] if is_executable("/bin/true") else ["/bin/sh", "-c", "true"]
        return proot, lambda: probe_command([proot, "-r", "/", "-w", "/"] + program, env)

    def forward_signal(self, pid, signum):
        if signum != signal.SIGWINCH:
            for target in descendants(pid):           # the tracees, not proot itself
                _kill_quietly(target, signum)

    def exit_status(self, status):
        return proot_status(status, self.signalled)


def proot_tmp_dir(cfg, environ):
    """An exec-able directory where proot unpacks its loader (PROOT_TMP_DIR of environ, the
    session's environment)."""
    for path in (environ.get("PROOT_TMP_DIR"), cfg.tmpdir):
        if path and os.path.isdir(path) and os.access(path, os.W_OK) and \
                not os.statvfs(path).f_flag & 8:                 # ST_NOEXEC
            return path
    path = os.path.join(cfg.topdir, "tmp")
    makedirs(path, 0o700)
    return path


def proot_status(status, signalled):
    """proot exits 255 when its first process dies of a signal: report 128+N for the
    signal we forwarded."""
    return 128 + signalled if status == 255 and signalled else status


class ProotNoSeccompEngine(ProotEngine):
    """P2: PRoot without seccomp (PROOT_NO_SECCOMP=1): slower, for kernels where P1 fails."""
    mode = "P2"
    noseccomp = True


# ---- 9.5.2 runc and crun: R1, R2, R3 ----


RUNC_MOUNTS = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=2g"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "none", "source": "/sys",
     "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]},
]
RUNC_MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
               "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
               "/proc/scsi"]
RUNC_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def oci_spec(root, args, cwd, env, user, caps, hostname, mounts):
    """A rootless OCI runtime spec: runc's `spec --rootless` template, edited (writable
    root, host network, our uid as root, a terminal only when there is one)."""
    uid, gid = os.getuid(), os.getgid()
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": sys.stdin.isatty() and sys.stdout.isatty(),
            "user": {"uid": user.uid, "gid": user.gid}, "args": args, "cwd": cwd, "env": env,
            "capabilities": dict((k, caps) for k in ("bounding", "effective", "inheritable",
                                                     "permitted", "ambient")),
            "noNewPrivileges": True},
        "root": {"path": root, "readonly": False},
        "hostname": hostname,
        "mounts": [dict(m) for m in RUNC_MOUNTS] + mounts,
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": uid, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": gid, "size": 1}],
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")],
            "maskedPaths": RUNC_MASKED, "readonlyPaths": RUNC_READONLY},
    }


def runtime_tmpdir(cfg, environ):
    """Where an R-mode run makes its bundle directory (removed when it ends): the tmpdir
    asked for (UDOCKER_TMP, tmpdir in udocker.conf, TMPDIR), else a tmpfs, $XDG_RUNTIME_DIR
    (runc's and crun's own place for their state) or /dev/shm, else /tmp. The run's dozen
    directory and file operations, ours and the runtime's, cost ~0.3-0.5 ms more (wall) on
    a disk's file system (ext4) than on a tmpfs, more when the disk is busy."""
    if cfg.sources.get("tmpdir") != "default" or environ.get("TMPDIR"):
        return cfg.tmpdir
    for path in (environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if path and path.startswith("/") and _is_shared_safely(path) and _has_room(path):
            return path
    return cfg.tmpdir


def _has_room(path, needed=1 << 20):
    """Has the file system of path room for a bundle and the runtime's state (~20 KB and
    a few files: a full /dev/shm, a small one in a container, would fail the run)?"""
    try:
        info = os.statvfs(path)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize >= needed and bool(info.f_favail or not info.f_files)


def _is_shared_safely(path):
    """Is path a directory we can make ours in that no other user can remove or replace
    (ours, or sticky as /tmp is)?"""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and os.access(path, os.W_OK | os.X_OK) and \
        (info.st_uid == os.getuid() or bool(info.st_mode & stat.S_ISVTX))


def runtime_command(runtime, flavour, rundir, *words):
    """argv of a runc/crun command with its state in the bundle directory rundir (as
    udocker 1.3 does: one directory fewer to make and remove at every run)."""
    argv = [runtime]
    if flavour == "crun":
        argv.append("--cgroup-manager=disabled")
    return argv + ["--root", rundir] + list(words)


def probe_command(argv, env=None):
    """{"ok": True} if argv succeeds, else {"ok": False, "why": its first line of output}."""
    status, text = run_capture(argv, env=env)
    if status == 0:
        return {"ok": True}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    return {"ok": False, "why": errors[0][:300] if errors else "exit status %d" % status}


def probe_runtime_start(runtime, flavour, tmpdir):
    """Can runc/crun start a rootless container here (user namespaces, mounts)? It runs the
    host's `true` in a root that holds the host's /usr, /bin, /lib* read-only."""
    rundir = tempfile.mkdtemp(prefix="udocker-probe-", dir=tmpdir)
    run_id = "udocker-probe-%s" % random_hex(6)
    try:
        rootfs = os.path.join(rundir, "rootfs")
        os.mkdir(rootfs)
        mounts = []
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr", "/nix"):
            if os.path.islink(top):
                os.symlink(os.readlink(top), rootfs + top)
            elif os.path.isdir(top):
                mounts.append({"destination": top, "type": "none", "source": top,
                               "options": ["rbind", "nosuid", "nodev", "ro"]})
        args = ["/bin/true"] if is_executable("/bin/true") else ["/bin/sh", "-c", "true"]
        spec = oci_spec(rootfs, args, "/", ["PATH=/usr/bin:/bin"], RunUser("root", 0, 0), [],
                        "probe", mounts)
        spec["process"]["terminal"] = False
        write_atomic(os.path.join(rundir, "config.json"), json_dumps(spec))
        return probe_command(runtime_command(runtime, flavour, rundir, "run", "--bundle",
                                             rundir, run_id))
    finally:
        run_capture(runtime_command(runtime, flavour, rundir, "delete", "--force", run_id),
                    timeout=10)
        remove_tree(rundir)


def path_without(path, names):
    """path (a $PATH value) without the directories that hold one of names (nor empty
    entries, which mean the working directory); one that finds nothing if none is left."""
    kept = [d for d in path.split(":")
            if d and not any(os.path.lexists(os.path.join(d, name)) for name in names)]
    return ":".join(kept) or "/dev/null"


def _is_invoking_user(user):
    """Is user (RunUser) the non-root user running udocker.py, uid and gid?"""
    return user.uid != 0 and user.uid == os.getuid() and user.gid == os.getgid()


class RuncEngine(Engine):
    """R1: runc, or crun with --cgroup-manager=disabled, rootless. Each run has its own
    bundle and state directory (removed afterwards), so runs of one container can overlap.
    The container's main process is pid 1 of its pid namespace, where the kernel drops a
    signal it has no handler for: such a signal becomes `runc kill KILL`, as it would
    have terminated the process outside a namespace."""

    mode = "R1"
    banner_char = "%"
    needs_tools = ("runc",)
    can_set_hostname = True
    can_size_shm = True
    can_bind_readonly = True
    slow_to_start = True           # the runtime makes the container first (~5 ms)
    own_pid_namespace = True       # (no subreaper needed: nothing escapes the namespace)
    probe_group = "R"              # R2/R3 start the same way
    keeps_sysdirs = ("/etc/resolv.conf", "/etc/host.conf") + HOST_FILES

    def __init__(self, *args):
        Engine.__init__(self, *args)
        self.runtime = None
        self.flavour = "runc"
        self.rundir = None
        self.run_id = None
        self.killed_by = None
        self.init_pid = None

    def choose_user(self, meta):
        user = Engine.choose_user(self, meta)
        if _is_invoking_user(user) and self.tools.runc()[1].get("flavour", "runc") == "runc":
            # runc makes its exec fifo owned by the container's root, so root must map to
            # our uid, which can be mapped once: crun can map it to itself, runc cannot
            MSG.warning("runc cannot run uid %d as itself: running as root, which is uid %d "
                        "outside" % (user.uid, user.uid))
            return _lookup_user(self.passwd_rows, self.group_rows, "0")
        if user.uid != 0 and not _is_invoking_user(user) and not self._subid_ranges():
            why = "runc_map_subids = never" if self.cfg.runc_map_subids == "never" else \
                "no newuidmap/newgidmap or no /etc/subuid and /etc/subgid range"
            MSG.warning("R modes run as root here (%s): --user %s ignored" % (why, user.name))
            return _lookup_user(self.passwd_rows, self.group_rows, "0")
        return user

    def _subid_ranges(self):
        """((uid start, count), (gid start, count)) of the user's /etc/subuid and
        /etc/subgid ranges when newuidmap/newgidmap can map them, else None."""
        if self.cfg.runc_map_subids not in ("user", "always", "never"):
            raise ConfigurationError("runc_map_subids: %r is not user, always or never"
                                     % self.cfg.runc_map_subids)
        if self.cfg.runc_map_subids == "never" or \
                not (which("newuidmap", self.environ.get("PATH", "")) and
                     which("newgidmap", self.environ.get("PATH", ""))):
            return None
        name, uid = self.invoking_user()[:2]
        ranges = []
        for path in ("/etc/subuid", "/etc/subgid"):
            found = [(int(row[1]), int(row[2])) for row in read_identity_db(path)
                     if len(row) == 3 and row[0] in (name, str(uid)) and row[1].isdigit()
                     and row[2].isdigit() and int(row[2]) > 0]
            if not found:
                return None
            ranges.append(found[0])
        return tuple(ranges)

    def _maps_subids(self):
        """Map the subordinate ids: always for another non-root user (else it could not run
        as that uid); for root only with runc_map_subids = always, since files a container
        gives to other uids can then only be removed from inside a container. The invoking
        user (-u $(id -u):$(id -g)) is mapped to itself instead (see spec())."""
        if (self.user.uid == 0 and self.cfg.runc_map_subids != "always") or \
                _is_invoking_user(self.user):
            return None
        return self._subid_ranges()

    def command(self):
        self.runtime, info = self.tools.runc()
        self.flavour = info.get("flavour", "runc")
        self.rundir = os.path.join(runtime_tmpdir(self.cfg, self.environ),
                                   "udocker-%s-%s" % (self.flavour, random_hex(6)))
        self.run_id = "udocker-%s" % random_hex(8)
        self.change("bundle", self.rundir, self._spec_text(), "the runtime bundle")
        self.passed_fds = highest_inherited_fd()     # what P and F modes pass as they are
        preserve = ["--preserve-fds", str(self.passed_fds - 2)] if self.passed_fds else []
        argv = self.runtime_argv("run", *(preserve + ["--bundle", self.rundir, self.run_id]))
        env = dict(self.environ)
        if self.flavour == "crun" and not self._maps_subids():
            # crun runs newgidmap and newuidmap (set-uid programs: ~2 ms of its ~7 ms
            # start) whenever it finds them, before it writes the maps itself; a map of
            # one id needs neither, and the container sees the same maps and setgroups
            # "deny" either way. Its PATH is for nothing else (the command is found in
            # the container's).
            env["PATH"] = path_without(env.get("PATH", ""), ("newuidmap", "newgidmap"))
        return argv, env, None

    def runtime_argv(self, *words):
        return runtime_command(self.runtime, self.flavour, self.rundir, *words)

    # where the spec's text (.run/spec) has its process's argv and environment
    SPEC_HOLES = ("args", "env")

    def _spec_text(self):
        """json_text(spec()). Python 3 keeps the text of the last run's spec less its
        process's argv and environment (.run/spec, a record), and a run whose spec is the
        same but for these (a job array's tasks: their arguments, their marker
        container_run) fills them in, encoded in Python (_json_text), and imports no JSON
        module (R1: 0.17M instructions fewer)."""
        spec = self.spec()
        files = self.container.files
        if not PY3 or files is None:
            return json_text(spec)
        marshal = __import__("marshal")
        holes = ['"@udocker-%s@"' % name for name in self.SPEC_HOLES]
        process = dict(spec["process"], **dict((name, hole[1:-1]) for name, hole
                                               in zip(self.SPEC_HOLES, holes)))
        blank = dict(spec, process=process)
        key = marshal.dumps(blank, 2)      # (2: no refs, the same bytes for the same spec)
        record = files.file(ContainerDir.SPEC_RECORD)
        try:
            kept, parts = marshal.loads(read_bytes(record))
            if kept != key or len(parts) != len(holes) + 1:
                parts = None
        except Exception:                   # noqa: B902 (a cache: any doubt, encode it)
            parts = None
        if parts is None:
            parts = self._spec_parts(json_text(blank), holes)
            if parts is None:              # a hole's text elsewhere too: not kept
                return json_text(spec)
            self.container.records.append((record, marshal.dumps((key, parts), 4)))
        filled = [_json_text(spec["process"][name]) for name in self.SPEC_HOLES]
        return "".join(sum(zip(parts, filled), ())) + parts[-1]

    @staticmethod
    def _spec_parts(text, holes):
        """text split at each of holes, in order, each found once; else None."""
        parts = []
        for hole in holes:
            if text.count(hole) != 1:
                return None
            head, text = text.split(hole)
            parts.append(head)
        return tuple(parts + [text])

    @classmethod
    def host_probe(cls, session, tools):
        runtime, info = tools.runc()
        return runtime, lambda: probe_runtime_start(
            runtime, info.get("flavour", "runc"), runtime_tmpdir(session.cfg, session.environ))

    def process_args(self):
        return list(self.argv)

    def spec(self):
        """The OCI runtime spec of this run (runc's rootless template, edited)."""
        spec = oci_spec(self.root, self.process_args(), self.cwd,
                        ["%s=%s" % kv for kv in sorted(self.env.items())], self.user,
                        list(self.cfg.runc_capabilities) if self.user.uid == 0 else [],
                        self._hostname(), self._nvidia_mounts() + self._volume_mounts())
        if self.opts.get("shm_size"):
            size = "size=%d" % parse_size(self.opts["shm_size"], "--shm-size")
            for mount in spec["mounts"]:
                if mount["destination"] == "/dev/shm":
                    mount["options"] = [o for o in mount.get("options", [])
                                        if not o.startswith("size=")] + [size]
        if _is_invoking_user(self.user):
            # the user is the user outside too: the PMIx server of srun/mpirun accepts
            # its MPI ranks, and no newuidmap is needed (there may be none: nested
            # user namespaces cannot use it)
            for key, own in (("uidMappings", self.user.uid), ("gidMappings", self.user.gid)):
                spec["linux"][key] = [{"containerID": own, "hostID": own, "size": 1}]
        subids = self._maps_subids()
        if subids:
            for key, (start, count) in zip(("uidMappings", "gidMappings"), subids):
                spec["linux"][key].append({"containerID": 1, "hostID": start,
                                           "size": count})
        return spec

    def _hostname(self):
        meta = {} if self.opts.get("nometa") else self.container.image_config()
        name = self.opts.get("hostname") or meta.get("Hostname") or ""
        if "." in name or self.opts.get("hostname"):
            return name
        return os.uname()[1]

    def _nvidia_mounts(self):
        """A tmpfs at NVIDIA_DIR holds the mount points of the driver's files, so only
        that directory is made in ROOT."""
        if not self.nvidia:
            return []
        return [{"destination": NVIDIA_DIR, "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "mode=755", "size=1m"]}]

    def _volume_mounts(self):
        """Volumes as bind mounts, devices too: a rootless runtime cannot mknod, it binds
        linux.devices entries itself, and crun refuses them outright here ("unshare
        CLONE_NEWNS: Operation not permitted"). A device bind has no nodev."""
        mounts = []
        for vol in self.volumes:
            if vol.cont in ("/dev", "/proc", "/sys"):
                raise UsageError("R modes cannot bind %s (the runtime provides it)" % vol.cont)
            options = ["rbind" if os.path.isdir(vol.host) else "bind", "nosuid"] + \
                ([] if vol.device else ["nodev"]) + ["ro" if vol.readonly else "rw"]
            mounts.append({"destination": vol.cont, "type": "none", "source": vol.host,
                           "options": options})
        return mounts

    def forward_signal(self, pid, signum):
        if signum == signal.SIGWINCH:
            _kill_quietly(pid, signum)              # runc/crun resize the container's tty
            return
        init = self._init_pid()
        if init and not signal_is_handled(init, signum):
            self.killed_by = signum
            run_capture(self.runtime_argv("kill", self.run_id, "KILL"), timeout=10)
            return
        for target in descendants(pid):             # the container's processes, not runc
            _kill_quietly(target, signum)

    def _init_pid(self):
        if self.init_pid is None and self.run_id:
            status, text = run_capture(self.runtime_argv("state", self.run_id), timeout=10)
            try:
                self.init_pid = int(json_loads(text).get("pid")) if status == 0 else None
            except (ValueError, TypeError, AttributeError):
                self.init_pid = None
        return self.init_pid

    def exit_status(self, status):
        if self.killed_by and status in (137, 255):
            return 128 + self.killed_by
        return status

    def watch(self, watchdog):
        """The container killed, the runtime's state deleted, the bundle removed."""
        for argv in (self.runtime_argv("kill", self.run_id, "KILL"),
                     self.runtime_argv("delete", "--force", self.run_id),
                     ["/bin/rm", "-rf", self.rundir]):
            watchdog.run_command(argv)

    def cleanup(self):
        if self.rundir and os.path.isdir(self.rundir):
            if os.path.lexists(os.path.join(self.rundir, self.run_id)):
                # left behind (runc/crun remove it when `run` ends normally)
                run_capture(self.runtime_argv("delete", "--force", self.run_id), timeout=10)
            try:                                  # what a normal run leaves, without shutil
                os.unlink(os.path.join(self.rundir, "config.json"))
                os.rmdir(self.rundir)
            except OSError:
                remove_tree(self.rundir)
            self.rundir = None


class RuncProotEngine(RuncEngine):
    """R2: runc with PRoot inside (bound at /.udocker/bin/proot) to emulate root for
    chown and friends; always root in the container."""

    mode = "R2"
    noseccomp = False
    needs_tools = ("runc", "proot")
    PROOT_IN = "/.udocker/bin/proot"

    def choose_user(self, meta):
        user = Engine.choose_user(self, meta)
        if user.uid != 0:
            MSG.warning("mode %s runs as root in the container: --user %s ignored"
                        % (self.mode, user.name))
            user = _lookup_user(self.passwd_rows, self.group_rows, "0")
        return user

    def prepare(self):
        RuncEngine.prepare(self)
        proot = self.tools.proot()[0]
        self.volumes.append(Volume(proot, self.PROOT_IN, readonly=True, system=True))
        self.env["PROOT_TMP_DIR"] = "/tmp"
        if self.noseccomp:
            self.env["PROOT_NO_SECCOMP"] = "1"

    def spec(self):
        """A proot that does not translate statx (5.1-era) would let a relative statx or
        faccessat2 resolve against its real working directory, not the one it shows (`cd /;
        ls -d usr` fails): they fail with ENOSYS in the container, as in P1/P2 (child_hook),
        so glibc falls back to fstatat and faccessat. By the runtime's seccomp filter: one
        of ours on runc would also stop newuidmap's setuid."""
        spec = RuncEngine.spec(self)
        if not self.tools.proot()[1].get("statx", True):
            spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["statx", "faccessat2"], "action": "SCMP_ACT_ERRNO",
                 "errnoRet": errno.ENOSYS}]}
            arches = SECCOMP_ARCHES.get(Platform.host().arch)
            if arches:
                spec["linux"]["seccomp"]["architectures"] = arches
        return spec

    def process_args(self):
        self.kill_on_exit = self.cfg.proot_killonexit and \
            self.tools.proot()[1].get("kill_on_exit")
        kill = ["--kill-on-exit"] if self.kill_on_exit else []
        return [self.PROOT_IN] + kill + ["-0", "-w", self.cwd] + list(self.argv)

    def exit_status(self, status):
        return proot_status(RuncEngine.exit_status(self, status), self.signalled)

    def wait(self, pid, keep=()):
        """Without --kill-on-exit proot, pid 1 of the container, runs until the last process
        in it exits: once its first child (the command) has gone, the others are killed
        here. Orphans are reparented to pid 1 after the command became its child, and the
        kernel lists children in that order (a zombie too, until proot reaps it). So when
        proot has reaped no child yet, its first child is the command; when it has, and its
        first child does not run the command's argv, the command exited before it was first
        seen, and every child of proot is a stray. (An orphan reaped while the command runs
        leaves the command first: it is told by its argv, unless it has already exec'd
        another program; it is then taken for gone.)"""
        if self.kill_on_exit:
            return RuncEngine.wait(self, pid, keep)
        seen = {}

        def strays():
            if "init" not in seen:
                init = container_init(pid)
                if init is None:
                    return None
                seen["init"] = init
            children = child_pids(seen["init"])
            if "command" not in seen:
                if not children:
                    return None
                first = children[0]
                gone = has_reaped(seen["init"]) and process_argv(first) != self.argv
                seen["command"] = None if gone else first
            return [] if seen["command"] in children else children
        return _wait_killing_strays(pid, strays)


class RuncProotNoSeccompEngine(RuncProotEngine):
    """R3: like R2 with PRoot's seccomp acceleration off."""
    mode = "R3"
    noseccomp = True


# ---- 9.5.3 Fakechroot: F1, F3 ----


class FakechrootEngine(Engine):
    """F1: libfakechroot preloaded, programs started through the container's own ld.so.
    Runs as the host user. A volume at its own path is in FAKECHROOT_EXCLUDE_PATH (with an
    empty mount point in ROOT); HOST:CONT with another CONT becomes a symlink CONT -> HOST
    in ROOT and an entry of FAKECHROOT_VOLUMES (fakechroot_volume_map). The host user is
    added to the container's passwd/group in place.
    Absolute symlinks in ROOT are made to point into ROOT (setup), else the kernel would
    follow them on the host."""

    mode = "F1"
    banner_char = "#"
    needs_tools = ("libfakechroot",)
    nested_links = ()              # (mount point, is a directory) of volumes in volumes
    dir_map = None                 # the library is upstream's fork (command sets it)
    runs_as_host_user = True
    uses_loader = True
    devices_at_own_path = True

    def arrange_identity(self):
        """The container's passwd and group extended in place (F modes cannot show a copy
        at another path); --hostauth: the host's files, seen at their own path."""
        if self.opts.get("hostauth"):
            if not any(v.cont in ("/etc/passwd", "/etc/group") for v in self.volumes):
                self.volumes += [Volume(p, p, readonly=True, system=True)
                                 for p in ("/etc/passwd", "/etc/group")]
            return
        files = self.identity_files()
        if files is None:
            return
        for cont, text in zip(("/etc/passwd", "/etc/group"), files):
            path = resolve_in_root(self.root, cont)
            if os.path.isdir(os.path.dirname(path)):
                self.change("file", path, text, "the container's %s" % cont)

    def command(self):
        arch = self.container.arch()
        kind, version = self.container.libc()
        fakechroot_libc_known(kind)
        library = self._library(arch, kind, version)
        loader = self.container.loader()[1] if self.uses_loader else None
        dirs = ([self.cont2host(NVIDIA_DIR + "/lib")] if self.nvidia else []) + \
            self.container.lib_dirs()
        # the container's own LD_LIBRARY_PATH (image ENV, -e) first, its directories in ROOT
        dirs = [self.cont2host(d) for d in self.env.get("LD_LIBRARY_PATH", "").split(":")
                if d.startswith("/")] + dirs
        libpath = ":".join(d for i, d in enumerate(dirs) if d not in dirs[:i])
        dir_map = self.dir_map = self._maps_volumes(library)
        excluded, mapped = [], {}
        self.nested_links = []
        for vol in self.volumes:
            if vol.host == vol.cont:
                excluded.append(vol.host)
                self._mountpoint_dir(vol)
            elif dir_map:
                # its list is ':'-separated (an entry cut in two crashes the fork): a volume
                # with ':' in a path is a symlink at its mount point to a container name the
                # map sends to the host, named by a link without ':' (the fork resolves
                # symlinks itself, under ROOT: one to a host path would not work)
                cont, host = vol.cont, os.path.realpath(vol.host)
                if ":" in cont + host:
                    cont = "/.udocker/volumes/" + hashlib.sha256(to_bytes(cont)).hexdigest()[:16]
                    link = Volume(cont, vol.cont)
                    if not self._nested_link(link):
                        self._symlink_volume(link)
                else:
                    self._mountpoint_dir(vol)        # ".." lists it, as for a bind mount
                mapped[cont] = self._bind_host(host) + "!" + cont
            elif not self._nested_link(vol):
                self._symlink_volume(vol)
        env = dict((k, v) for k, v in self.env.items() if not k.startswith("FAKECHROOT_"))
        if len(mapped) > 64:
            MSG.warning("upstream's libfakechroot maps at most 64 volumes (FAKECHROOT_DIR_MAP): "
                        "%d here, the shortest paths are not seen" % len(mapped))
        if mapped:                 # upstream udocker's fork: the longest container path first
            env["FAKECHROOT_DIR_MAP"] = ":".join(mapped[c] for c in sorted(mapped, reverse=True))
            env["FAKECHROOT_EXPAND_SYMLINKS"] = "true"
        env.update({"FAKECHROOT_BASE": self.root, "LD_PRELOAD": library,
                    "LD_LIBRARY_PATH": libpath, "FAKECHROOT_AF_UNIX_PATH": self.cfg.tmpdir,
                    "FAKECHROOT_CMD_SUBST": self.cfg.fakechroot_cmd_subst, "PWD": self.cwd})
        if excluded:           # an empty FAKECHROOT_EXCLUDE_PATH (or entry) excludes everything
            env["FAKECHROOT_EXCLUDE_PATH"] = ":".join(excluded)
        volume_map = fakechroot_volume_map(self.volumes, self._bind_host)
        if volume_map:
            env["FAKECHROOT_VOLUMES"] = volume_map
        if MSG.level >= Messages.DBG:
            env["FAKECHROOT_DEBUG"] = "true"
        program, argv = self._start_argv(self.exe, self.exe_path,
                                         self.argv[0], self.argv[1:])
        if not self.uses_loader and program.startswith(self.root.rstrip("/") + "/"):
            self.executable = program            # the kernel runs it; argv[0] stays as given
            return argv, env, self.cont2host(self.cwd)
        argv0 = ["--argv0", argv[0]] if kind == "musl" or version_at_least(version, "2.33") \
            else []
        if self.uses_loader:     # and so are the programs it starts, with our library
            env["FAKECHROOT_ELFLOADER"] = loader        # their container path as argv[0]
            if argv0 and self.tools.probe("libfakechroot", library).get("ours"):
                env["FAKECHROOT_ELFLOADER_OPT_ARGV0"] = "--argv0"
        else:   # F3, F4: a program in a volume was not patched, nor is it (not ROOT's): the
            # container's loader starts it, as in F1 (the programs it starts are ROOT's)
            loader = self.container.loader()[1]
        return [loader] + argv0 + [program] + argv[1:], env, self.cont2host(self.cwd)

    def _maps_volumes(self, library=None):
        """Is the library upstream's fork, which maps volumes itself (FAKECHROOT_DIR_MAP)?"""
        if library is None:
            library = self._library(self.container.arch(), *self.container.libc())
        return self.tools.probe("libfakechroot", library).get("dir_map")

    def _library(self, arch, kind, version):
        own = os.path.join(self.container.dir or "", ContainerDir.LIBFAKECHROOT)
        if self.container.dir and os.path.isfile(own) and not self.cfg.fakechroot_so:
            return own
        return fakechroot_library(self.container, self.tools, arch, kind, version)

    def _start_argv(self, host, cont, argv0, args, depth=0):
        """(host path of the ELF program to start, its argv). The first program must be an
        ELF: a #! script starts its interpreter (found in the container) with the script's
        container path."""
        info = elf_info(host)                   # most are ELF: one open, not two
        if info is None and depth < 4:
            with open(host, "rb") as handle:
                head = handle.read(256)
            if head[:2] == b"#!":
                words = to_text(head[2:].split(b"\n")[0]).strip().split(None, 1)
                if not words:
                    raise EngineError("bad #! line in %s" % cont)
                interp_host = self.cont2host(words[0])
                if not is_executable(interp_host):
                    raise EngineError("interpreter not found in the container: %s"
                                      % words[0])
                return self._start_argv(interp_host, words[0], words[0],
                                        words[1:] + [cont] + list(args), depth + 1)
        if info is None:
            raise EngineError("cannot execute %s: not an ELF program or #! script" % cont)
        if not info["interp"]:
            raise EngineError("%s is statically linked: fakechroot cannot confine it, use P1"
                              % cont)
        return host, [argv0] + list(args)

    def watch(self, watchdog):
        """If udocker.py is killed, the container's orphans are found by a marker in their
        environment (they have no common parent left to look under)."""
        watchdog.kill_marked(self.orphan_marker())

    def orphan_marker(self):
        return "container_run=%s" % self.env["container_run"]

    def nvidia_volumes(self):
        """The driver as one directory of symlinks to its host files (the kernel follows
        them, fakechroot does not see them), seen at NVIDIA_DIR like any volume elsewhere:
        through a symlink in ROOT. run_dir/nvidia points to the tree of this driver, so the
        link in ROOT stays the same when the driver changes. Devices: at their own path."""
        run_dir = self.run_dir()
        files = sorted(self.nvidia.files)
        tree = ContainerDir.RUN_NVIDIA_TREE + hashlib.sha256(to_bytes(repr(files))).hexdigest()[:16]
        if not os.path.isdir(os.path.join(run_dir, tree)):
            self.change("tree", os.path.join(run_dir, tree),
                        [(host, cont[len(NVIDIA_DIR) + 1:]) for host, cont in files])
        current = os.path.join(run_dir, ContainerDir.RUN_NVIDIA)
        if not os.path.islink(current) or os.readlink(current) != tree:
            self.change("symlink", current, tree)
        volumes = [Volume(current, NVIDIA_DIR, readonly=True, system=True)]
        if self._maps_volumes():     # the fork resolves the tree's symlinks itself, under
            # ROOT: each file is mapped to its host path too (the tree still lists them)
            volumes += [Volume(host, cont, readonly=True, system=True) for host, cont in files]
        for host, cont in self.nvidia.devices:
            if host != cont:
                MSG.verbose("nvidia: F modes show devices only at their own path: %s" % host)
            elif not any(v.host == v.cont and host.startswith(v.host + "/")
                         for v in self.volumes):
                volumes.append(Volume(host, cont, system=True, device=True))
        return volumes

    def _nested_link(self, vol):
        """A volume inside another, writable, one: a symlink at its mount point in the outer
        volume's host directory (the kernel follows it there), the empty mount point again
        after the run (cleanup). False when vol is not such a volume."""
        outer = self.outer_volume(vol)
        if outer is None or outer.readonly:
            return False
        point = os.path.join(outer.host, vol.cont[len(outer.cont):].lstrip("/"))
        if os.path.islink(point):
            if os.readlink(point) != vol.host:
                return False
        elif os.path.lexists(point) and not (
                (os.path.isdir(point) and not os.listdir(point)) or
                (os.path.isfile(point) and os.path.getsize(point) == 0)):
            return False                    # (a missing one is made by make_mount_points)
        self.change("nested", point, (vol.host, os.path.isdir(vol.host)),
                    "the mount point of %s in %s" % (vol.cont, outer.host))
        return True

    def cleanup(self):
        for point, isdir in self.nested_links:
            remove_quietly(point)
            try:
                if isdir:
                    makedirs(point)
                else:
                    open(point, "a").close()
            except (IOError, OSError) as exc:
                MSG.warning("cannot put back the mount point %s: %s" % (point, exc))
        self.nested_links = []

    def _mountpoint_dir(self, vol):
        """An empty directory in ROOT where a directory is seen at its own host path (the
        library sends the path itself to the host), as a bind mount has: ".." from inside
        the volume leads into the container's tree, where the volume is listed."""
        if vol.system:
            return
        path = resolve_in_root(self.root, vol.cont)
        if os.path.lexists(path) or not os.path.isdir(vol.host):
            return
        self.change("dir", path)                      # a failure: one verbose line

    def _symlink_volume(self, vol):
        link = resolve_in_root(self.root, vol.cont, follow_last=False)
        if os.path.islink(link) and os.readlink(link) == vol.host:
            return
        ours = os.path.islink(link) and link in mountpoint_links(self.container)
        if os.path.lexists(link) and not ours and \
                not (os.path.isdir(link) and not os.listdir(link)):
            raise EngineError("F modes can bind %s only at its own path or where the container "
                              "has nothing (-v %s:%s)" % (vol.host, vol.host, vol.host))
        self.change("symlink", link, vol.host, "the volume's symlink %s" % vol.cont)
        if self.container.dir:
            self.change("symlink", os.path.join(self.container.dir, ContainerDir.MOUNTPOINTS,
                                                vol.cont.replace("/", "#")), vol.host)

    @classmethod
    def check_container(cls, container, tools):
        arch = container.arch()
        kind, version = container.libc()
        fakechroot_libc_known(kind)
        own = os.path.join(container.dir or "", ContainerDir.LIBFAKECHROOT)
        if not (container.dir and os.path.isfile(own)):
            fakechroot_library(container, tools, arch, kind, version)

    @classmethod
    def check_setup(cls, container, tools):
        """The check run makes, before anything is patched: a musl tree, or a glibc older
        than every libfakechroot we have, is refused by setup, not by the first run."""
        cls.check_container(container, tools)

    @classmethod
    def setup(cls, container, tools, force=False):
        old_root = container.state(ContainerDir.ROOT_PATH)
        skip = mountpoint_links(container)
        if old_root and old_root != container.root:
            convert_symlinks(container.root, old_root, False, skip)
        convert_symlinks(container.root, container.root, True, skip)

    @classmethod
    def leave(cls, container, tools):
        convert_symlinks(container.root, container.state(ContainerDir.ROOT_PATH) or container.root,
                         False, mountpoint_links(container))


class FakechrootPatchedEngine(FakechrootEngine):
    """F3: as F1, but the container's ELF files carry the host path of the container's
    ld.so (PT_INTERP) and library directories (RUNPATH), set by patchelf at setup; the
    original values are kept in patch.json and put back when the container leaves F3.
    A program run starts from a volume (not ROOT's, so neither patched nor changed) is
    started by the container's loader, as in F1."""

    mode = "F3"
    uses_loader = False
    needs_tools = ("libfakechroot", "patchelf")
    patches_at_run = False         # F4: patchelf runs on programs made after setup

    @classmethod
    def check_container(cls, container, tools):
        """F1's checks, and patchelf, unless ROOT was patched where it is: a run of it does
        not use patchelf (finding it is ~60 us of an F3 start)."""
        super(FakechrootPatchedEngine, cls).check_container(container, tools)
        if cls.patches_at_run or container.state(ContainerDir.PATCH_PATH) != container.root:
            tools.patchelf()

    @classmethod
    def check_setup(cls, container, tools):
        """check_container's, and patchelf: setup --force patches again."""
        cls.check_container(container, tools)
        tools.patchelf()

    def prepare(self):
        FakechrootEngine.prepare(self)
        if self.container.state(ContainerDir.PATCH_PATH) != self.root and self.setup_mode is None:
            raise EngineError("container %s was moved since it was patched for F3: run "
                              "setup --execmode=F3 --force" % self.container.cid)

    @classmethod
    def setup(cls, container, tools, force=False):
        if container.state(ContainerDir.PATCH_PATH) == container.root and not force:
            FakechrootEngine.setup(container, tools, force)
            return
        cls.leave(container, tools)
        FakechrootEngine.setup(container, tools, force)
        arch = container.arch()
        loader = container_loader(container.root, arch)
        libpath = ":".join(container_lib_dirs(container.root, arch))
        patcher = ElfPatcher(tools.patchelf(), container)
        patcher.patch(loader[1], libpath)
        container.set_state(ContainerDir.PATCH_PATH, container.root)

    @classmethod
    def leave(cls, container, tools):
        if container.files.has(ContainerDir.PATCH_RECORD):
            ElfPatcher(tools.patchelf(), container).restore()
            remove_quietly(container.files.file(ContainerDir.PATCH_PATH))
        FakechrootEngine.leave(container, tools)


def fakechroot_library(container, tools, arch, kind, version):
    """Tools.fakechroot_so for the container, asked once a command (its mode's check and
    its plan both need it; it lists the tools' library directory)."""
    return container.found("libfakechroot", lambda: tools.fakechroot_so(
        arch, version, lambda: read_os_release(container.root), kind))


def fakechroot_libc_known(kind):
    """F modes run glibc and musl trees (a libfakechroot is built for each); others are
    refused in one line naming what was found."""
    if kind not in ("glibc", "musl"):
        raise EngineError("F modes need a glibc or musl container (this one: %s): use P1"
                          % (kind or "no C library found"))


def fakechroot_volume_map(volumes, bind_host=lambda host: host):
    """FAKECHROOT_VOLUMES for our libfakechroot: "CONT=HOST:..." for each volume the kernel
    names otherwise than the container does (bound elsewhere, or reached through a
    symlink). The library sends a path under CONT to the real HOST path, and shows a
    working directory or directory fd there, and resolves relative names and "..", under
    CONT. "" when there is none. Upstream's libfakechroot ignores the variable. A HOST
    with ':' is given as bind_host makes it; a CONT with ':' or '=' cannot be named, and
    is reached through its symlink in ROOT only (absolute paths work, a working directory
    inside it shows the host path)."""
    entries = []
    for vol in volumes:
        real = os.path.realpath(vol.host)
        if vol.device or real == vol.cont:
            continue
        if "=" in vol.cont or ":" in vol.cont:
            MSG.verbose("volume %s: its container path cannot be mapped (':' or '=')"
                        % vol.cont)
            continue
        entries.append("%s=%s" % (vol.cont, bind_host(real)))
    return ":".join(entries)


def mountpoint_links(container):
    """Host paths of the volume symlinks F modes made in ROOT (recorded in .mountpoints)."""
    records = os.path.join(container.dir or "", ContainerDir.MOUNTPOINTS)
    if not container.dir or not os.path.isdir(records):
        return set()
    return set(resolve_in_root(container.root, name.replace("#", "/"), follow_last=False)
               for name in os.listdir(records))


# ---- 9.5.4 Fakechroot's ELF patching, its own loader: F2, F4 ----
# What setup does to a tree for F3 and F4, and the modes that run through a copy of the
# container's loader (F2) or patch programs made after setup (F4): a plain F1 or F3 run
# loads none of it.


def convert_symlinks(root, prefix, to_host, skip=()):
    """to_host: make absolute symlinks in root (owned by us) point to prefix+target; else
    strip prefix from the targets that carry it. Links in skip stay. Returns the count."""
    prefix = prefix.rstrip("/")
    uid = os.getuid()
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                if path in skip or not os.path.islink(path) or os.lstat(path).st_uid != uid:
                    continue
                target = os.readlink(path)
            except OSError:
                continue
            has_prefix = target == prefix or target.startswith(prefix + "/")
            if to_host and target.startswith("/") and not has_prefix:
                symlink_atomic(prefix + target, path)
            elif not to_host and has_prefix:
                symlink_atomic(target[len(prefix):] or "/", path)
            else:
                continue
            changed += 1
    return changed


class ElfPatcher(object):
    """Sets (and puts back) the PT_INTERP and RUNPATH of a container's ELF files with
    patchelf, many files per call; what was there before is kept in patch.json."""

    BATCH = 200

    def __init__(self, patchelf, container):
        """patchelf: (path, probe info); one that takes a single FILENAME (0.9, upstream
        udocker's fork) would ignore the rest of a batch: it gets one file per call."""
        self.patchelf = patchelf[0]
        self.batch = self.BATCH if patchelf[1].get("many_files", True) else 1
        self.container = container
        self.record_path = container.files.file(ContainerDir.PATCH_RECORD)

    def _elf_files(self, loader):
        """(executables, libraries): host paths of the ELF files we own and may patch."""
        uid = os.getuid()
        loader_real = os.path.realpath(loader)
        executables, libraries = [], []
        for dirpath, dirnames, filenames in os.walk(self.container.root):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_size < 64 \
                        or path == loader_real:
                    continue
                info = elf_info(path)
                if info is None or not info["dynamic"]:
                    continue
                if info["interp"]:
                    executables.append((path, info))
                elif info["type"] == 3 and ".so" in name and not name.startswith("libc.so") \
                        and not name.startswith("ld-"):
                    libraries.append((path, info))
        return executables, libraries

    def patch(self, loader, libpath):
        executables, libraries = self._elf_files(loader)
        record = {}
        for path, info in executables + libraries:
            rpath = self._print_rpath(path) if info["rpath"] else None
            record[os.path.relpath(path, self.container.root)] = [info["interp"], rpath]
        write_atomic(self.record_path, json_dumps(record))
        # RUNPATH first, PT_INTERP in a second call: patchelf 0.18 given both at once (or
        # the interpreter first) writes a python3.11 (Debian 12) that dies of SIGSEGV
        failed = self._run(["--set-rpath", libpath], [p for p, _ in executables + libraries])
        failed += self._run(["--set-interpreter", loader], [p for p, _ in executables])
        os.utime(self.record_path, None)     # when patching ended: FAKECHROOT_PATCH_LAST_TIME
        MSG.info("patched %d executables and %d libraries%s"
                 % (len(executables), len(libraries),
                    (" (%d failed)" % len(failed)) if failed else ""))
        for path in failed[:5]:
            MSG.verbose("patchelf failed: %s" % path)

    def restore(self):
        record = read_json(self.record_path) or {}
        groups = {}                    # (option, value) -> paths; RUNPATH first (patch)
        for rel, (interp, rpath) in record.items():
            path = os.path.join(self.container.root, rel)
            groups.setdefault((0, "--set-rpath", rpath) if rpath else
                              (0, "--remove-rpath", None), []).append(path)
            if interp:
                groups.setdefault((1, "--set-interpreter", interp), []).append(path)
        for (_, option, value), paths in sorted(groups.items(), key=lambda kv: str(kv[0])):
            self._run([option] + ([value] if value else []),
                      [p for p in paths if os.path.isfile(p)])
        remove_quietly(self.record_path)

    @staticmethod
    def is_new(container, path, loader):
        """F4: True when the program run starts (host path) lies under ROOT, is ours and
        has another loader than loader (it came after setup): patch_new patches it."""
        root = container.root.rstrip("/") + "/"
        info = elf_info(path) if path and path.startswith(root) else None
        return bool(info and info["interp"] and info["interp"] != loader and
                    os.lstat(path).st_uid == os.getuid())

    def patch_new(self, path, loader, libpath):
        """F4: the program run starts, patched as patch() does, if is_new says so."""
        if not self.is_new(self.container, path, loader):
            return
        MSG.verbose("patching %s (new since setup)" % path)
        if self._run(["--set-rpath", libpath], [path]) or \
                self._run(["--set-interpreter", loader], [path]):
            MSG.verbose("patchelf failed: %s" % path)

    def restore_new(self):
        """F4: the programs patched when they started (not in patch.json) get their loader
        back at its container path, and no RUNPATH."""
        record = read_json(self.record_path) or {}
        root = self.container.root.rstrip("/")
        loader = container_loader(self.container.root, self.container.arch())[1]
        groups = {}                    # container path of the loader -> paths
        for path, info in self._elf_files(loader)[0]:
            if info["interp"].startswith(root + "/") and \
                    os.path.relpath(path, self.container.root) not in record:
                # upstream's libfakechroot patches with ROOT + "/" + the old path: ROOT//lib64
                groups.setdefault("/" + info["interp"][len(root):].lstrip("/"), []).append(path)
        for interp, paths in sorted(groups.items()):
            self._run(["--remove-rpath"], paths)
            self._run(["--set-interpreter", interp], paths)

    def _print_rpath(self, path):
        status, text = run_capture([self.patchelf, "--print-rpath", path])
        return text.strip() if status == 0 and text.strip() else None

    def _run(self, options, paths):
        """patchelf options on paths in batches; a failing batch is redone file by file.
        Returns the paths that could not be patched."""
        failed = []
        for start in range(0, len(paths), self.batch):
            batch = paths[start:start + self.batch]
            modes = _make_writable(batch)
            try:
                if run_capture([self.patchelf] + options + batch, timeout=300)[0] == 0:
                    continue
                for path in batch:
                    if run_capture([self.patchelf] + options + [path])[0] != 0:
                        failed.append(path)
            finally:
                for path, mode in modes:
                    os.chmod(path, mode)
        return failed


def _make_writable(paths):
    changed = []
    for path in paths:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        if not mode & stat.S_IWUSR:
            os.chmod(path, mode | stat.S_IWUSR)
            changed.append((path, mode))
    return changed


class FakechrootLoaderEngine(FakechrootEngine):
    """F2: F1 with a copy of the container's ld.so in which the host's ld.so.cache,
    ld.so.preload and default library directories are names that cannot exist (f2_loader),
    given the container's library directories as --library-path, which it takes instead of
    LD_LIBRARY_PATH: neither the host's LD_LIBRARY_PATH nor the host's libraries reach a
    program (the directories of the container's own LD_LIBRARY_PATH come first in it, in
    ROOT, as in the LD_LIBRARY_PATH of the other F modes). Our libfakechroot passes
    LD_LIBRARY_REAL (upstream's name) to the loader as --library-path at every exec. No ELF
    file is changed."""

    mode = "F2"

    def command(self):
        """Upstream's libfakechroot (dir_map) is driven as udocker 1.3.17 drives it: it
        starts FAKECHROOT_ELFLOADER with no --library-path, so the copy reads the library
        path from LD_LIBRARY_REAL instead of LD_LIBRARY_PATH (udocker 1.3.17 renames the
        variable in the container's ld.so itself), and no FAKECHROOT_ELFLOADER_OPT_ARGV0:
        with it the fork gives a #! script's interpreter a garbled argv (EFAULT)."""
        argv, env, cwd = FakechrootEngine.command(self)
        upstream = self.dir_map
        loader, data, record = f2_loader(self.container, self.cfg, library_real=upstream)
        if data is not None:                        # made by apply, with the rest
            self.change("binary", loader, data, what="F2's copy of ld.so")
        if record is not None:
            self.run_dir()
            self.change("record", *record)
        libpath = env["LD_LIBRARY_PATH"]
        env.update({"FAKECHROOT_ELFLOADER": loader, "LD_LIBRARY_REAL": libpath,
                    "FAKECHROOT_LIBRARY_ORIG": libpath})
        if upstream:
            return [loader] + argv[1:], env, cwd
        if argv[1:2] == ["--argv0"]:
            env["FAKECHROOT_ELFLOADER_OPT_ARGV0"] = "--argv0"
        return [loader, "--library-path", libpath] + argv[1:], env, cwd

    @classmethod
    def check_setup(cls, container, tools):
        """F1's checks, and an ld.so F2 can make its copy of."""
        FakechrootEngine.check_setup(container, tools)
        f2_loader(container, tools.cfg)           # raises if it cannot; a run makes it

    @classmethod
    def leave(cls, container, tools):
        for name in os.listdir(container.run_dir(tools.cfg)):
            if name.startswith("ld-f2-"):
                remove_quietly(os.path.join(container.run_dir(tools.cfg), name))
        FakechrootEngine.leave(container, tools)


# the host's loader files named in an ld.so, and the same length names that cannot exist
F2_LOADER_FILES = ((b"/etc/ld.so.cache\0", b"/dev/null/.cache\0"),
                   (b"/etc/ld.so.preload\0", b"/dev/null/.preload\0"))
# the variable ld.so takes its library path from, and upstream udocker's name for it
F2_LIBRARY_REAL = ((b"\0LD_LIBRARY_PATH\0", b"\0LD_LIBRARY_REAL\0"),)
# ld.so's default library directories: /lib/, /usr/lib64/, /usr/lib/x86_64-linux-gnu/ ...
F2_SYSTEM_DIR = LazyRegex(b"(?<![A-Za-z0-9_./-])/(?:usr/)?lib(?:32|64|x32)?/"
                          b"(?:[a-z0-9_]+-linux-gnu[a-z0-9_]*/)?\0")


F2_NAME_RECORD = "ld-f2-name"      # in the run directory: which copy serves which ld.so


def _f2_dir(match):
    """A directory name of the same length that cannot exist (under /dev/null, or a name of
    control characters when that is too long)."""
    size = len(match.group(0)) - 1
    if size >= 10:
        return b"/dev/null/" + b"/" * (size - 10) + b"\0"
    return b"/" + b"\x01" * (size - 2) + b"/\0"


def f2_loader(container, cfg, library_real=False):
    """(host path, contents, record) of F2's copy of the container's ld.so, contents None
    when the copy exists, record the (path, text) of F2_NAME_RECORD to write or None
    (nothing is written here: run's plan or setup writes it). In it the default
    library directories, ld.so.cache and ld.so.preload are names that cannot exist, so
    the loader finds libraries only in its --library-path. The copy is named by the
    original's CRC-32 and Adler-32 (in the container's run_dir): a libc upgrade in the
    container gives a new one, and every F2 run computes the name, which hashlib would make
    ~4 ms dearer (its import loads OpenSSL). library_real: the copy reads LD_LIBRARY_REAL
    where ld.so reads LD_LIBRARY_PATH (upstream's libfakechroot passes no --library-path).
    The name found is remembered in F2_NAME_RECORD with the ld.so's path, inode, mtime and
    size: while they are the same, a run reads neither that ld.so nor its copy (reading
    and checksumming ~200 kB was most of what F2 adds to F1's start).
    Raises EngineError when that ld.so does not name those files as expected."""
    source = container.loader()[1]
    run_dir = container.run_dir(cfg)
    record = os.path.join(run_dir, F2_NAME_RECORD)
    key = "%s %s %s" % (source, path_stamp(source), "real" if library_real else "path")
    try:
        remembered, name = read_text(record).split("\n")[:2]
    except (IOError, OSError, ValueError):
        remembered = name = ""
    if remembered == key and name.startswith("ld-f2-") and "/" not in name and \
            os.path.isfile(os.path.join(run_dir, name)):
        return os.path.join(run_dir, name), None, None
    with open(source, "rb") as handle:
        data = handle.read()
    name = "ld-f2-%08x%08x%s.so" % (zlib.crc32(data) & 0xffffffff,
                                    zlib.adler32(data) & 0xffffffff,
                                    "-real" if library_real else "")
    path = os.path.join(run_dir, name)
    record = (record, "%s\n%s\n" % (key, name))
    if os.path.isfile(path):
        return path, None, record
    data, dirs = F2_SYSTEM_DIR.subn(_f2_dir, data)
    for old, new in F2_LOADER_FILES + (F2_LIBRARY_REAL if library_real else ()):
        data = data.replace(old, new)
    if not dirs or F2_LOADER_FILES[0][0] in data or F2_LOADER_FILES[0][1] not in data:
        raise EngineError("F2 cannot use this container's ld.so (%s): its library directories "
                          "or ld.so.cache are not where glibc keeps them: use F1 or F3"
                          % source)
    return path, data, record


class FakechrootAutoPatchEngine(FakechrootPatchedEngine):
    """F4: F3, and a program made or installed in the container after setup (copied in,
    compiled there, pip-installed) is patched like the rest when it starts: our
    libfakechroot's execve() and posix_spawn() run the tarball's patchelf on it first, as
    FAKECHROOT_PATCH_PATCHELF, FAKECHROOT_PATCH_ELFLOADER and FAKECHROOT_LIBRARY_ORIG say
    (upstream's names), and so does run for the program it starts. Only files under ROOT
    that the user owns are changed, never a volume's. Leaving F4 gives those files the
    container's loader (at its container path) and no RUNPATH (ElfPatcher.restore_new)."""

    mode = "F4"
    patches_at_run = True

    def command(self):
        argv, env, cwd = FakechrootPatchedEngine.command(self)
        patchelf = self.tools.patchelf()
        loader = self.container.loader()[1]
        libpath = ":".join(self.container.lib_dirs())
        env.update({"FAKECHROOT_PATCH_PATCHELF": patchelf[0],
                    "FAKECHROOT_PATCH_ELFLOADER": loader, "FAKECHROOT_LIBRARY_ORIG": libpath})
        if self.dir_map:
            # upstream's libfakechroot runs `patchelf --set-root-prefix ROOT` on every
            # program it starts that is not older than this (udocker 1.3.17's patch.time)
            record = os.path.join(self.container.dir or "", ContainerDir.PATCH_RECORD)
            env.update({"LD_LIBRARY_REAL": libpath, "FAKECHROOT_PATCH_LAST_TIME":
                        str(int(os.stat(record).st_mtime)) if os.path.isfile(record) else "0"})
        if ElfPatcher.is_new(self.container, self.executable, loader):
            self.change("patch", self.executable, (patchelf, loader, libpath),
                        what="the program to start (F4 patches it)")
        return argv, env, cwd

    @classmethod
    def leave(cls, container, tools):
        if os.path.exists(os.path.join(container.dir, "patch.json")):
            ElfPatcher(tools.patchelf(), container).restore_new()
        FakechrootPatchedEngine.leave(container, tools)


# ---- 9.5.5 Singularity: S1 ----


class SingularityEngine(Engine):
    """S1: Singularity or Apptainer from the host (not shipped in the tools tarball); runs
    as the host user; the environment passes as SINGULARITYENV_/APPTAINERENV_ variables."""

    mode = "S1"
    banner_char = "/"
    runs_as_host_user = True
    can_bind_readonly = True
    keeps_sysdirs = ("/etc/resolv.conf", "/etc/host.conf", "/lib/modules") + HOST_FILES

    @classmethod
    def check_container(cls, container, tools):
        tools.singularity()

    def command(self):
        exe, info = self.tools.singularity()
        prefix = "APPTAINERENV_" if info.get("flavour") == "apptainer" else "SINGULARITYENV_"
        argv = [exe, "--quiet" if MSG.level < Messages.VER else "--verbose", "exec"]
        argv += list(self.cfg.singularity_options) + ["--pwd", self.cwd]
        bound = set(v.cont for v in self.volumes)
        for vol in self.volumes:
            argv += ["-B", "%s:%s%s" % (vol.host, vol.cont, ":ro" if vol.readonly else "")]
        for sub in ("tmp", "var/tmp", "root"):
            if not os.path.isdir(os.path.join(self.root, sub)):
                self.change("dir", os.path.join(self.root, sub), None, "/" + sub)
        if "/root" not in bound and self.user.home == "/root":
            argv += ["--home", "%s/root:/root" % self.root]
        for sub in ("/tmp", "/var/tmp"):
            if sub not in bound:
                argv += ["-B", "%s%s:%s" % (self.root, sub, sub)]
        env = dict((k, v) for k, v in self.environ.items() if not k.startswith(prefix))
        env.update((prefix + k, v) for k, v in self.env.items())
        return argv + [self.root] + self.argv, env, None


ENGINES = {
    "P1": ProotEngine, "P2": ProotNoSeccompEngine,
    "F1": FakechrootEngine, "F2": FakechrootLoaderEngine, "F3": FakechrootPatchedEngine,
    "F4": FakechrootAutoPatchEngine,
    "R1": RuncEngine, "R2": RuncProotEngine, "R3": RuncProotNoSeccompEngine,
    "S1": SingularityEngine,
}


# ---- 9.6 Mode choice ----


def set_execmode(session, container, mode, tools, force=False):
    """Move a container to an execution mode (setup --execmode): undo what the old mode
    changed in ROOT, do what the new one needs, record execmode and root.path. Runs under
    the container's lock; the same mode again is a no-op unless force."""
    mode = mode.upper()
    if mode not in ENGINES:
        raise UsageError("invalid execution mode: %s (one of %s)" % (mode, " ".join(EXEC_MODES)))
    new = ENGINES[mode]
    with session.containers.lock(container.cid):
        container.reread()
        current = container.state(ContainerDir.EXECMODE).upper() or default_execmode(session.cfg)
        same_place = container.state(ContainerDir.ROOT_PATH) in ("", container.root)
        if current == mode and same_place and not force and container.state(ContainerDir.EXECMODE):
            return False
        new.check_setup(container, tools)
        old = ENGINES.get(current)
        if old is not None and old is not new and container.state(ContainerDir.EXECMODE):
            old.leave(container, tools)
        new.setup(container, tools, force=force or not same_place)
        container.set_state(ContainerDir.EXECMODE, mode)
        container.set_state(ContainerDir.ROOT_PATH, container.root)
    return True


def check_mode(session, container, tools, mode, trust_failure=True):
    """Raises CannotStart when mode cannot run this container on this host. The host probe
    is cached per engine executable and kernel release (Tools.engine_probe); a cached
    failure is probed again unless trust_failure."""
    cls = ENGINES[mode]
    try:
        probe = cls.host_probe(session, tools)
    except EngineError as exc:
        raise CannotStart(mode, str(exc), tool_missing=True)
    if probe is not None:
        result = tools.engine_probe(cls.probe_group or mode, probe[0], probe[1], trust_failure)
        if not result.get("ok"):
            raise CannotStart(mode, result.get("why") or "probe failed")
    try:
        cls.check_container(container, tools)
    except EngineError as exc:
        raise CannotStart(mode, str(exc))


def choose_mode(session, container, tools):
    """The mode to run in: the container's mode (setup --execmode) or the configured default
    when it can start here. When neither was chosen (no execmode file, no
    UDOCKER_DEFAULT_EXECUTION_MODE, no default_execution_mode in a config file), the first
    of fallback_execution_modes that can, with one warning. Raises CannotStart (with the
    mode whose engine reports it) when none can; its fallback_tools names the tools the
    fallback modes lacked (installing them is the caller's step: choose_engine)."""
    cfg = session.cfg
    mode = container.execmode(cfg)
    explicit = bool(container.state(ContainerDir.EXECMODE) or
                    cfg.override_default_execution_mode or
                    cfg.sources.get("default_execution_mode", "default") != "default")
    try:
        check_mode(session, container, tools, mode, trust_failure=not explicit)
        return mode
    except CannotStart as exc:
        first = exc
    if first.tool_missing and explicit:
        raise first
    others = []
    for other in cfg.fallback_execution_modes:
        other = other.upper()
        if other not in ENGINES:
            raise ConfigurationError("fallback_execution_modes: invalid mode %s" % other)
        if other != mode and other not in others and \
                (container.dir or not other.startswith("F")):     # F needs a setup
            others.append(other)
    failed, lacking = [(mode, first.why)], []
    for other in others:
        try:
            check_mode(session, container, tools, other)
        except CannotStart as exc:
            failed.append((other, exc.why))
            if exc.tool_missing:
                lacking += [k for k in ENGINES[other].needs_tools if k not in lacking]
            continue
        if explicit:
            raise CannotStart(mode, "mode %s cannot run on this host: %s (%s can: setup "
                              "--execmode=%s)" % (mode, first.why, other, other))
        MSG.warning("%s cannot run on this host (%s): using %s"
                    % (", ".join(m for m, _ in failed), first.why, other))
        return other
    error = _none_can_start(mode, first, failed, explicit)
    error.fallback_tools = tuple(lacking)
    raise error


def _none_can_start(mode, first, failed, explicit):
    """choose_mode's CannotStart when no mode can: first, the chosen mode's."""
    if explicit:
        return CannotStart(mode, "mode %s cannot run on this host: %s" % (mode, first.why))
    if first.tool_missing:                      # say how to get the tools
        return first
    reasons = []
    for _, reason in failed:
        if reason not in reasons:
            reasons.append(reason)
    if len(reasons) == 1:
        return CannotStart(mode, reasons[0])
    return CannotStart(mode, "no execution mode can run here: " + "; ".join(
        "%s: %s" % (", ".join(m for m, r in failed if r == reason), reason)
        for reason in reasons))


def choose_engine(session, container, opts, args, tools):
    """engine_for after the explicit step that installs tools (run): those of the
    container's mode first; when that mode cannot start and the fallback modes lacked
    tools, theirs, then the choice once more."""
    tools.install(ENGINES[container.execmode(session.cfg)].needs_tools)
    engine = engine_for(session, container, opts, args, tools)
    lacking = engine.cannot_start is not None and engine.cannot_start.fallback_tools
    if lacking and tools.install_error is None and not tools_installed(session.cfg) and \
            tools.install(lacking):
        engine = engine_for(session, container, opts, args, tools)
    return engine


def engine_for(session, container, opts, args, tools):
    """The Engine that runs this container; F modes set up on first use (or after a move),
    as the first change of the run's plan. When no mode can start, the engine of the mode
    that cannot raises why after checking the options (Engine.plan)."""
    try:
        mode, cannot_start = choose_mode(session, container, tools), None
    except CannotStart as exc:
        mode, cannot_start = exc.mode, exc
    engine = ENGINES[mode](session, container, opts, args, tools)
    engine.cannot_start = cannot_start
    if container.dir and mode.startswith("F") and cannot_start is None and (
            container.state(ContainerDir.EXECMODE).upper() != mode or
            container.state(ContainerDir.ROOT_PATH) != container.root):
        engine.setup_mode = mode
    return engine


# ==== 10. Tools installer ====
# The tools tarball with the engine binaries: udocker_dir/{bin,lib,doc}/ (ours: proot-x86_64,
# runc-x86_64, crun-x86_64, patchelf-x86_64, lib/libfakechroot-glibc2.36-x86_64.so, lib/VERSION;
# upstream's 1.2.11 layout is accepted too). Sources, tried in order: a tarball beside
# udocker.py or in topdir (udocker-tools-*.tar.gz, udocker-englib-*.tar.gz, newest first),
# then `tarball` (UDOCKER_TARBALL, by default DEFAULT_TARBALL_URLS): local files or URLs.
# Each is checked against a pin (sha256, or the git blob id of a published file) or a
# .sha256 beside it, its lib/VERSION against `tarball_release`, then unpacked into a staging
# directory inside topdir and renamed into bin/ lib/ doc/ file by file (lib/VERSION last),
# under the repository lock "install" (concurrent first runs download and install once).

TOOLS_SHA256 = {
    # tarball file name -> sha256 of a release (tools/build_tarball.sh output), used when no
    # other sum is given
    "udocker-tools-2.0.0.tar.gz":
        "f5666aec06a9e6366d2ff545437c2a41fe834b48c596cb3f61f26dda5740e7c8",
}
TOOLS_GITBLOB = {
    # tarball file name -> git blob id of a published release: the SHA-1 of
    # b"blob SIZE\0" + bytes, as the git tree of the repository publishing it records it
    # (jorge-lip/udocker-builds, tarballs/)
    "udocker-englib-1.2.11.tar.gz": "17f7341a84ea7b25d072fcdb48c8b68570201020",
}
TOOLS_PARTS = ("bin", "lib", "doc")
SHA256_RE = LazyRegex(r"\b([a-fA-F0-9]{64})\b")
PIN_RE = LazyRegex(r"(?:\b(sha256|gitblob):)?\b([a-fA-F0-9]{40,64})\b")
PIN_NAMES = {"sha256": "sha256", "gitblob": "git blob id"}
FOUND_TARBALL_RE = LazyRegex(r"^udocker-(tools|englib)-(\d+(?:\.\d+)*)\.tar\.gz$")


def version_tuple(text):
    """'1.2.11' -> (1, 2, 11); reading stops at the first part that is not a number."""
    numbers = []
    for part in (text or "").strip().split("."):
        digits = len(part) - len(part.lstrip("0123456789"))
        if not digits:
            break
        numbers.append(int(part[:digits]))
        if digits != len(part):
            break
    return tuple(numbers)


def version_at_least(version, minimum):
    have, want = list(version_tuple(version)), list(version_tuple(minimum))
    width = max(len(have), len(want))
    return bool(have) and have + [0] * (width - len(have)) >= want + [0] * (width - len(want))


def installed_tools_version(cfg):
    """The installed tools' release (lib/VERSION), or None."""
    try:
        return read_text(os.path.join(cfg.libdir, "VERSION")).strip() or None
    except (IOError, OSError):
        return None


def tools_installed(cfg):
    """Whether tools at least as new as `tarball_release` are installed: what every run
    asks, answered without the installer's code (10.1)."""
    version = installed_tools_version(cfg)
    return bool(version) and version_at_least(version, cfg.tarball_release)


# ---- 10.1 Fetching, verifying, unpacking ----


def _is_url(source):
    return re.match(r"^(https?|file)://", source) is not None


def _local_path(source):
    return source[len("file://"):] if source.startswith("file://") else source


def parse_pins(text):
    """'sha256:HEX gitblob:ID HEX ...' -> [(kind, lower-case hex)]; a bare 64-digit value is
    a sha256, a git blob id needs its prefix."""
    pins = []
    for kind, value in PIN_RE.findall(text or ""):
        kind = kind or "sha256"
        if len(value) == {"sha256": 64, "gitblob": 40}[kind]:
            pins.append((kind, value.lower()))
    return pins


def tarball_digests(path):
    """{"sha256": hex, "gitblob": hex} of a file, read once."""
    sha256, gitblob = hashlib.sha256(), hashlib.sha1()
    gitblob.update(to_bytes("blob %d\0" % os.path.getsize(path)))
    _feed(path, sha256, gitblob)
    return {"sha256": sha256.hexdigest(), "gitblob": gitblob.hexdigest()}


def script_dir():
    """The directory of the running udocker.py (where a tools tarball may be shipped)."""
    return os.path.dirname(os.path.abspath(__file__))


def found_tarballs(topdir):
    """Tools tarballs beside udocker.py, then in topdir, each newest version first."""
    found, seen = [], set()
    for directory in (script_dir(), topdir):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        matches = [(version_tuple(m.group(2)), m.group(1) == "tools", name)
                   for name, m in ((n, FOUND_TARBALL_RE.match(n)) for n in names) if m]
        for _, _, name in sorted(matches, reverse=True):
            path = os.path.join(directory, name)
            if os.path.realpath(path) not in seen and os.path.isfile(path):
                seen.add(os.path.realpath(path))
                found.append(path)
    return found


class ToolsInstaller(object):
    """Fetches, verifies and installs the tools tarball into bindir, libdir and docdir.

    Sources, in order: a tarball found beside udocker.py or in topdir (found_tarballs), then
    the `tarball` setting (UDOCKER_TARBALL; by default DEFAULT_TARBALL_URLS). A download is
    kept as topdir/.NAME (topdir/.NAME.partial until it is verified, resumed with Range),
    so installing again from the same URL needs no network. One attempt per command: a failure
    is remembered (ensure() raises it again) instead of fetching once per engine lookup.
    """

    def __init__(self, cfg, repo):
        self.cfg = cfg
        self.repo = repo
        self.failure = None         # the EngineError of this command's failed installation
        self.wanted = {}            # source -> its pins (a remote .sha256 is fetched once)

    # -- state

    def installed_version(self):
        return installed_tools_version(self.cfg)

    def is_installed(self):
        return tools_installed(self.cfg)

    def sources(self):
        """[(source, origin)] in the order they are tried; origin is "found" (a tarball
        beside udocker.py or in topdir), "configured" (`tarball` set) or "default"."""
        if self.disabled():
            return []
        origin = "default" if self.cfg.sources.get("tarball", "default") == "default" \
            else "configured"
        return [(path, "found") for path in found_tarballs(self.cfg.topdir)] + \
            [(source, origin) for source in self.cfg.tarball.split()]

    def disabled(self):
        """An explicitly empty `tarball` (UDOCKER_TARBALL="") turns installation off."""
        return not self.cfg.tarball.split() and \
            self.cfg.sources.get("tarball", "default") != "default"

    def advice(self):
        """What a user without the tools can do, in one sentence."""
        urls = DEFAULT_TARBALL_URLS.split()
        return ("on a machine with Internet download %s (or %s), copy it beside udocker.py "
                "(%s) or into %s and run again, or set UDOCKER_TARBALL to a local copy: see "
                "udocker.py install --help" % (urls[0], urls[-1], script_dir(), self.cfg.topdir))

    # -- commands

    def ensure(self):
        """Install on first use (autoinstall); returns True when the tools are installed.

        Raises EngineError when an installation was tried and failed (the same one again
        on later calls: one attempt per command).
        """
        if self.failure is not None:
            raise self.failure
        if self.is_installed():
            return True
        if not self.cfg.autoinstall or self.disabled():
            MSG.verbose("tools not installed, installation skipped")
            return False
        try:
            return self.install(auto=True)
        except EngineError as exc:
            self.failure = exc
            raise

    def install(self, force=False, purge=False, auto=False):
        """Install (again with force or purge: purge also removes every installed file the
        new tarball lacks); returns True when the tools are installed after it."""
        if self.disabled():
            if purge:
                with self.repo.lock("install"):
                    self._purge(keep=())
            MSG.info("installation skipped (UDOCKER_TARBALL is empty)")
            return False
        sources = self.sources()
        if not sources:
            raise EngineError("no tools tarball configured: %s" % self.advice())
        with self.repo.lock("install"):
            if self.is_installed() and not (force or purge):
                (MSG.verbose if auto else MSG.info)("tools already installed: version %s"
                                                    % self.installed_version())
                return True
            makedirs(self.cfg.topdir)
            with WorkDir(self.cfg.topdir, "install") as staging:
                version, source = self._fetch_any(sources, staging.path)
                self._commit(os.path.join(staging.path, "tree"), purge)
        MSG.info("tools installed: version %s from %s" % (version, source))
        return True

    # -- fetching and checking

    def _fetch_any(self, sources, staging):
        """Try each source in order, saying in one line why one fails; returns (version,
        source) of the one unpacked. Raises one EngineError naming what was tried and what
        the user can do."""
        failed = []
        for source, origin in sources:
            try:
                return self._fetch_one(source, origin, staging), source
            except EngineError as exc:
                remove_tree(os.path.join(staging, "tree"))
                failed.append((source, str(exc)))
                if len(sources) > 1:
                    MSG.warning("tools tarball %s: %s" % (source, exc))
        if len(failed) == 1:
            raise EngineError("tools tarball %s: %s: %s" % (failed[0] + (self.advice(),)))
        raise EngineError("no tools tarball could be used (tried %s): %s"
                          % (", ".join(s for s, _ in failed), self.advice()))

    def _fetch_one(self, source, origin, staging):
        if _is_url(source) and not source.startswith("file://"):
            path = self._download(source, origin)
        else:
            path = os.path.abspath(os.path.expanduser(_local_path(source)))
            if not os.path.isfile(path):
                raise EngineError("not found: %s" % path)
            MSG.verbose("installing tools from %s" % path)
            self._verify(source, origin, path)
        tree = os.path.join(staging, "tree")
        version = unpack_tools(path, tree)
        if not version_at_least(version, self.cfg.tarball_release):
            raise EngineError("version %s, older than the required %s (tarball_release)"
                              % (version, self.cfg.tarball_release))
        return version

    def _download(self, url, origin):
        """The path of a verified copy of url: topdir/.NAME when it is there and verifies,
        else downloaded into topdir/.NAME.partial (resumed), verified, then renamed. Hidden,
        so that a download is reused only for its own URL: a found tarball is the user's."""
        name = re.sub(r"[^A-Za-z0-9_.+-]", "_", os.path.basename(urlsplit(url).path))
        name = name.lstrip(".") or "tools"
        if not name.endswith((".tar.gz", ".tgz")):     # never bin, repos, udocker.conf ...
            name += ".tar.gz"
        dest = os.path.join(self.cfg.topdir, "." + name)       # not a found_tarballs() name
        partial = dest + ".partial"
        if os.path.isfile(dest):
            try:
                self._verify(url, origin, dest)
                MSG.verbose("tools tarball %s: using the copy %s" % (url, dest))
                return dest
            except EngineError as exc:
                MSG.verbose("%s: %s: downloading again" % (dest, exc))
        for last in (False, True):
            resumed = self._fetch_url(url, partial)
            try:
                self._verify(url, origin, partial)
                break
            except EngineError:
                remove_quietly(partial)
                if last or not resumed:    # a resumed file may be stale: once from scratch
                    raise
        publish_download(partial, dest)
        return dest

    def _fetch_url(self, url, partial):
        """Download url into partial, resuming what is there with Range; returns whether
        it resumed. A connection that cannot be made (refused, no such host) fails at once;
        a transfer cut short is resumed up to installretry times."""
        attempts = max(1, self.cfg.installretry)
        progress = Progress()
        row = None
        resumed = False
        for attempt in range(1, attempts + 1):
            offset = os.path.getsize(partial) if os.path.exists(partial) else 0
            client = self._client()
            try:
                resp = self._open(client, url, offset)
                if resp is None:                # 416: partial is already whole
                    return True
                if offset and resp.status == 200:
                    MSG.verbose("%s: the server ignored Range, downloading again" % url)
                    offset = 0
                resumed = resumed or bool(offset)
                length = resp.header("content-length") or ""
                total = offset + int(length) if length.isdigit() else 0
                if row is None:
                    row = progress.add(os.path.basename(partial)[1:-len(".partial")], total)
                row[1], row[2] = offset, total
                with open(partial, "ab" if offset else "wb") as handle:
                    while True:
                        data = resp.read(1 << 16)
                        if not data:
                            break
                        handle.write(data)
                        progress.update(row, len(data))
                got = os.path.getsize(partial)
                if total and got < total:
                    raise TransportError("ended early (%d of %d bytes)" % (got, total))
                progress.finish(row)
                return resumed
            except NETWORK_ERRORS as exc:
                reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                if attempt >= attempts:
                    raise EngineError("download interrupted %d time(s), last: %s"
                                      % (attempts, reason))
                MSG.verbose("download of %s interrupted (%s), resuming" % (url, reason))
                time.sleep(0.2 * attempt)
            finally:
                client.close()

    def _client(self):
        """An HttpClient that gives up after ctimeout (10 s) without an answer, not the
        registry's 30 s: on a node whose firewall drops packets each URL costs that once."""
        client = HttpClient(self.cfg)
        client.timeout = min(self.cfg.ctimeout, self.cfg.timeout)
        return client

    @staticmethod
    def _open(client, url, offset):
        """GET url from offset; the Response (200 or 206), or None for a 416 at offset."""
        headers = {"Range": "bytes=%d-" % offset} if offset else {}
        try:
            resp = client.request("GET", url, headers)
        except NETWORK_ERRORS as exc:
            raise EngineError("cannot download: %s" % (getattr(exc, "strerror", None) or
                                                       str(exc) or type(exc).__name__))
        except RegistryError as exc:
            raise EngineError("cannot download: %s" % exc)
        if offset and resp.status == 416:
            resp.close(reuse=False)
            return None
        if resp.status not in (200, 206):
            resp.close(reuse=False)
            raise EngineError("cannot download: HTTP %d %s" % (resp.status, resp.reason))
        if resp.status == 206 and not _range_starts_at(resp.header("content-range"), offset):
            resp.close(reuse=False)
            raise EngineError("cannot download: the server answered Range bytes=%d- with %r"
                              % (offset, resp.header("content-range")))
        return resp

    def expected(self, source, origin, path):
        """The pins ([(kind, hex)], kind "sha256" or "gitblob") a source must match: the
        configured UDOCKER_TARBALL_SHA256 (not for a found file); else a pin by file name
        (TOOLS_SHA256, TOOLS_GITBLOB) and, for a local file, the .sha256 beside it; for a
        URL without a pin, the .sha256 published beside it."""
        pinned, configured = self.pins(source, origin)
        if configured:
            return pinned
        if not _is_url(source) or source.startswith("file://"):
            return pinned + self._read_sidecar(path + ".sha256")
        if pinned:
            return pinned
        if source not in self.wanted:
            self.wanted[source] = self._read_sidecar(source + ".sha256")
        return self.wanted[source]

    def pins(self, source, origin):
        """(pins, configured): the configured pins, else the pins by file name."""
        if origin != "found":
            configured = parse_pins(self.cfg.tarball_sha256)
            if configured:
                return configured, True
        name = os.path.basename(source.split("?")[0])
        pinned = [("sha256", TOOLS_SHA256[name])] if name in TOOLS_SHA256 else []
        pinned += [("gitblob", TOOLS_GITBLOB[name])] if name in TOOLS_GITBLOB else []
        return pinned, False

    def describe(self):
        """showconf: one line per source in the order tried, with what verifies it."""
        lines = []
        for source, origin in self.sources():
            pinned, configured = self.pins(source, origin)
            how = " or ".join("%s:%s" % pin for pin in pinned)
            local = not _is_url(source) or source.startswith("file://")
            if configured:
                how += " (tarball_sha256)"
            elif local:
                how = " or ".join(filter(None, [how, "the .sha256 beside it"]))
            elif not pinned:
                how = "the .sha256 published beside it"
            lines.append("%s  [%s; verified by %s]" % (source, origin, how))
        return lines

    def _read_sidecar(self, source):
        if not _is_url(source):
            try:
                match = SHA256_RE.search(read_text(source))
            except (IOError, OSError):
                return []
        else:
            client = self._client()
            try:            # none published (404...): no pins; a failed download: an error
                resp = client.request("GET", source)
                body = resp.read_all(1 << 16) if resp.status == 200 else b""
            except NETWORK_ERRORS + (RegistryError,) as exc:
                raise EngineError("cannot download %s: %s" % (source, exc))
            finally:
                client.close()
            match = SHA256_RE.search(to_text(body))
        return [("sha256", match.group(1).lower())] if match else []

    def _verify(self, source, origin, path):
        """Check path (the bytes of source) against its pins; returns its digests (None for
        an unchecked local file). Raises EngineError."""
        wanted = self.expected(source, origin, path)
        if not wanted:
            if origin == "configured" and not _is_url(source):
                MSG.warning("tools tarball %s: no sha256 to check it against" % source)
                return None
            name = os.path.basename(path)
            if origin == "found":
                raise EngineError("no sha256 to check it against: put its sha256 beside it "
                                  "(sha256sum %s > %s.sha256)" % (name, name))
            raise EngineError("no sha256 to check it against: set UDOCKER_TARBALL_SHA256 "
                              "(sha256:HEX or gitblob:ID) or publish %s.sha256 beside it"
                              % source)
        got = tarball_digests(path)
        if not [kind for kind, value in wanted if got[kind] == value]:
            kind, value = wanted[0]
            raise EngineError("%s mismatch (got %s, expected %s): the file is corrupt or not "
                              "the one published" % (PIN_NAMES[kind], got[kind][:16],
                                                     value[:16]))
        MSG.verbose("tools tarball %s: %s ok" % (source, ", ".join(
            "%s %s" % (PIN_NAMES[k], v[:16]) for k, v in wanted if got[k] == v)))
        return got

    # -- putting files in place

    def _destinations(self):
        return {"bin": self.cfg.bindir, "lib": self.cfg.libdir, "doc": self.cfg.docdir}

    def _commit(self, tree, purge):
        """Move every staged file into place; lib/VERSION last, so a reader never sees
        a new VERSION with old binaries."""
        dests = self._destinations()
        placed = []
        for part in TOOLS_PARTS:
            top = os.path.join(tree, part)
            for dirpath, _, filenames in os.walk(top):
                rel_dir = os.path.relpath(dirpath, top)
                for name in sorted(filenames):
                    rel = os.path.normpath(os.path.join(rel_dir, name))
                    if (part, rel) != ("lib", "VERSION"):
                        placed.append((part, rel))
        if purge:
            self._purge(keep=placed + [("lib", "VERSION")])
        for part, rel in placed + [("lib", "VERSION")]:
            _move_into_place(os.path.join(tree, part, rel), os.path.join(dests[part], rel))

    def _purge(self, keep):
        """Remove every file in bin/ lib/ doc/ except the (part, relpath) pairs in keep."""
        keep = set(keep)
        for part, top in sorted(self._destinations().items()):
            if not os.path.isdir(top):
                continue
            for name in os.listdir(top):
                if (part, name) in keep:
                    continue
                MSG.verbose("purging %s" % os.path.join(top, name))
                remove_tree(os.path.join(top, name))


def _move_into_place(src, dest):
    makedirs(os.path.dirname(dest))
    if os.path.isdir(dest) and not os.path.islink(dest):
        remove_tree(dest)
    try:
        os.rename(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise

    def copy(tmp):                                  # another file system: copy, then rename
        if os.path.islink(src):
            os.symlink(os.readlink(src), tmp)
        else:
            shutil.copy2(src, tmp)

    replace_with(dest, copy)


def _member_parts(name):
    """'udocker_dir/bin/x' -> ['bin', 'x']; None for members outside bin/ lib/ doc/.

    Raises EngineError for names that try to leave the tree.
    """
    name = to_text(name)
    while name.startswith("./"):
        name = name[2:]
    parts = name.rstrip("/").split("/")
    if name.startswith("/") or ".." in parts:
        raise EngineError("unsafe member: %s" % name)
    if len(parts) < 3 or parts[0] != "udocker_dir" or parts[1] not in TOOLS_PARTS:
        return None
    if any(p in ("", ".") for p in parts[2:]):
        raise EngineError("unsafe member: %s" % name)
    return parts[1:]


def _safe_link_target(parts, target):
    """A symlink member may only point inside its own bin/ lib/ or doc/ directory."""
    target = to_text(target)
    if not target or target.startswith("/"):
        return False
    resolved = os.path.normpath(os.path.join(os.path.join(*parts[:-1]), target))
    return resolved.split(os.sep)[0] == parts[0] and not resolved.startswith("..")


def unpack_tools(path, tree):
    """Extract the bin/ lib/ doc/ members of a tools tarball into tree; returns lib/VERSION.

    Only regular files and symlinks that stay inside are taken. Raises EngineError (the
    reason, without the file's name) for a file that is not a (complete) tar archive, an
    unsafe member or a missing VERSION.
    """
    import tarfile
    import zlib
    makedirs(tree)
    seen = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                parts = _member_parts(member.name)
                if parts is None or member.isdir():
                    continue
                dest = os.path.join(tree, *parts)
                makedirs(os.path.dirname(dest))
                if member.isreg():
                    _extract_file(archive, member, dest, parts[0] == "bin")
                elif member.issym() and _safe_link_target(parts, member.linkname):
                    remove_quietly(dest)
                    os.symlink(to_text(member.linkname), dest)
                elif member.islnk() and to_text(member.linkname) in seen:
                    shutil.copy2(seen[to_text(member.linkname)], dest)
                else:
                    MSG.verbose("tools tarball: skipped %s" % to_text(member.name))
                    continue
                seen[to_text(member.name).lstrip("./")] = dest
    except (tarfile.TarError, EOFError, zlib.error, IOError, OSError) as exc:
        if isinstance(exc, EnvironmentError) and exc.errno in (errno.ENOSPC, errno.EACCES,
                                                               errno.EDQUOT):
            raise
        reason = (str(exc) or type(exc).__name__).splitlines()[0].rstrip(":")
        raise EngineError("truncated or not a tar.gz file (%s)" % reason)
    version_file = os.path.join(tree, "lib", "VERSION")
    if not os.path.isfile(version_file):
        raise EngineError("not a udocker tools tarball (no udocker_dir/lib/VERSION)")
    version = read_text(version_file).strip()
    if not version_tuple(version):
        raise EngineError("unreadable lib/VERSION %r" % version)
    return version


def _extract_file(archive, member, dest, executable):
    source = archive.extractfile(member)
    try:
        with open(dest, "wb") as handle:
            shutil.copyfileobj(source, handle, 1 << 20)
    finally:
        source.close()
    mode = (member.mode & 0o755) | (0o700 if executable else 0o600)
    os.chmod(dest, mode)


# ---- 10.2 Finding the tools: probes, Tools ----


def probe_proot(path):
    """What a proot can do. A 5.1-era one (upstream udocker's fork, Debian's 5.1.0) is
    accepted: udocker.py makes up for what it lacks (statx translation:
    ProotEngine.child_hook; --kill-on-exit: ProotEngine.wait, RuncProotEngine.wait; a -k
    that breaks glibc 2.33+: ignored).
    A proot that translates statx has the name in its syscall name table."""
    _, help_text = run_capture([path, "--help"])
    status, version_text = run_capture([path, "-V"])
    found = re.search(r"\b(\d+\.\d+\.\d+)\b", version_text)
    try:
        with open(path, "rb") as handle:
            statx = b"\0statx\0" in handle.read()
    except (IOError, OSError):
        statx = False
    info = {"version": found.group(1) if found else "?",
            "kill_on_exit": "--kill-on-exit" in help_text, "statx": statx,
            "seccomp": "seccomp_filter = yes" in version_text,
            "port": "--port" in help_text, "netcoop": "--netcoop" in help_text}
    info["ok"] = status == 0 and found is not None
    if not info["ok"]:
        info["why"] = "`%s -V` does not give a proot version" % path
    return info


def probe_runtime(path):
    status, text = run_capture([path, "--version"])
    flavour = "crun" if "crun version" in text else "runc" if "runc version" in text else None
    info = {"ok": status == 0 and flavour is not None, "flavour": flavour,
            "version": (text.split("\n")[0].split() or ["?"])[-1]}
    if not info["ok"]:
        info["why"] = "`%s --version` does not say runc or crun" % path
    return info


def probe_version_word(word):
    def probe(path):
        status, text = run_capture([path, "--version"])
        info = {"ok": status == 0 and word in text.lower(), "flavour": word}
        if not info["ok"]:
            info["why"] = "`%s --version` failed or does not say %s" % (path, word)
        return info
    return probe


def probe_patchelf(path):
    """As probe_version_word, and many_files: its usage ends in FILENAME... (not 0.9)."""
    info = probe_version_word("patchelf")(path)
    info["many_files"] = "FILENAME..." in run_capture([path, "--help"])[1]
    return info


def probe_libfakechroot(path):
    """dir_map: upstream udocker's fork, which maps a volume to another container path
    itself (FAKECHROOT_DIR_MAP=HOST!CONT) where Debian's needs a symlink in ROOT. ours: the
    tools tarball's (FAKECHROOT_VOLUMES), whose execve passes FAKECHROOT_ELFLOADER_OPT_ARGV0
    right to a #! script's interpreter too (Debian's and the fork's drop arguments)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (IOError, OSError) as exc:
        return {"ok": False, "why": "cannot read %s: %s" % (path, exc.strerror or exc)}
    return {"ok": True, "dir_map": b"FAKECHROOT_DIR_MAP\0" in data,
            "ours": b"FAKECHROOT_VOLUMES\0" in data}


def probe_singularity(path):
    status, text = run_capture([path, "--version"])
    info = {"ok": status == 0,
            "flavour": "apptainer" if "apptainer" in text.lower() else "singularity"}
    if not info["ok"]:
        info["why"] = "`%s --version` failed" % path
    return info


PROBE_FORMAT = 3        # in the probe cache keys: results of older probes are not used
TOOL_PROBES = {"proot": probe_proot, "runc": probe_runtime, "crun": probe_runtime,
               "patchelf": probe_patchelf, "libfakechroot": probe_libfakechroot,
               "apptainer": probe_singularity, "singularity": probe_singularity}


class Tools(object):
    """Finds the engine executables. Per tool: the configured executable
    (UDOCKER_USE_*_EXECUTABLE: a path, or a program name), else the installed tools for
    this architecture (bin/NAME-ARCH; installed on first use), else a program on PATH that
    passes a capability probe. Probe results are cached per path, mtime and size in
    topdir/.probes.json, so runs stay fast. Finding installs nothing: install() does, a
    step of its own that run and setup take first."""

    def __init__(self, cfg, repo, environ):
        self.cfg = cfg
        self.environ = environ         # the session's: its PATH is searched
        self.repo = repo
        self._installer = None
        self.install_error = None      # why install() could not install, named by find()
        host = Platform.host().arch
        self.arch = TOOL_ARCH.get(host, host)
        self.cache_path = os.path.join(cfg.topdir, ".probes.json")
        self.cache = None
        self.found = {}

    def install(self, kinds=None):
        """Install the tools unless they are (autoinstall), or unless each tool of kinds
        (Engine.needs_tools) is configured as a path (UDOCKER_USE_*_EXECUTABLE,
        UDOCKER_FAKECHROOT_SO); True when they are installed. A failure is kept in
        install_error, not raised: an engine on PATH may still serve, and a lookup that
        finds none names it."""
        if tools_installed(self.cfg):
            return True
        settings = {"proot": self.cfg.use_proot_executable, "patchelf":
                    self.cfg.use_patchelf_executable, "runc": self.cfg.use_runc_executable,
                    "libfakechroot": self.cfg.fakechroot_so}
        if kinds is not None and all("/" in (settings.get(k) or "") for k in kinds):
            return False
        try:
            return self.installer.ensure()
        except EngineError as exc:
            self.install_error = exc
            return False

    @property
    def installer(self):
        """The ToolsInstaller, made when installing is asked for (not when it is done)."""
        if self._installer is None:
            self._installer = ToolsInstaller(self.cfg, self.repo)
        return self._installer

    def proot(self):
        return self.find("proot", self.cfg.use_proot_executable, ["proot"])

    def runc(self):
        """(path, info) of the R modes' runtime. Unless one was named
        (UDOCKER_USE_RUNC_EXECUTABLE), crun comes first: it starts a container in ~7 ms where
        runc takes ~21 (bench/run); when crun cannot start one on this host (its start probe,
        cached like the modes' own), runc is used."""
        setting = self.cfg.use_runc_executable
        if setting:
            return self.find("runc", setting, ["runc", "crun"])
        found = self.find("runc", "", ["crun", "runc"])
        if found[1].get("flavour", "runc") != "crun":
            return found
        path = found[0]
        probe = self.engine_probe("R", path, lambda: probe_runtime_start(
            path, "crun", runtime_tmpdir(self.cfg, self.environ)))
        if probe.get("ok"):
            return found
        try:
            runc = self.find("runc", "runc", ["runc"])
        except EngineError:
            return found                        # nothing better: its probe names the problem
        MSG.verbose("crun cannot start a container here (%s): using %s"
                    % (probe.get("why"), runc[0]))
        return runc

    def patchelf(self):
        return self.find("patchelf", self.cfg.use_patchelf_executable, ["patchelf"])

    def singularity(self):
        setting = self.cfg.use_singularity_executable
        if not setting or setting == "UDOCKER":
            for name in ("apptainer", "singularity"):
                path = self.which(name)
                if path:
                    return path, self.probe(name, path)
            raise EngineError("mode S1 needs apptainer or singularity, and neither is in PATH "
                              "(or set UDOCKER_USE_SINGULARITY_EXECUTABLE): use P1 or R1")
        return self.find("singularity", setting, ["apptainer", "singularity"])

    def which(self, name):
        return which(name, self.environ.get("PATH", ""))

    def find(self, kind, setting, names):
        """(path, probe info) of the tool to use (remembered); raises EngineError naming
        the fix."""
        key = (kind, setting)
        if key not in self.found:
            self.found[key] = self._find(kind, setting, names)
        return self.found[key]

    def _find(self, kind, setting, names):
        if setting and "/" in setting:
            path = os.path.abspath(os.path.expanduser(setting))
            if not is_executable(path):
                raise EngineError("%s executable not found: %s (UDOCKER_USE_%s_EXECUTABLE)"
                                  % (kind, path, kind.upper()))
            info = self.probe(self._kind_of(path, kind), path)
            if not info.get("ok"):
                MSG.warning("%s: %s (used anyway: you asked for it)" % (path, info.get("why")))
            return path, info
        if setting and setting != "UDOCKER":
            names = [setting]
        install_error = self.install_error
        newer = ["4_8_0"] if version_at_least(os.uname()[2], "4.8") else []  # upstream's proot
        for name in names:
            for candidate in ["-".join([name, self.arch] + newer), "%s-%s" % (name, self.arch),
                              name]:
                path = os.path.join(self.cfg.bindir, candidate)
                if is_executable(path):
                    return path, self.probe(name, path)
        rejected = []
        for name in names:
            path = self.which(name)
            if not path:
                continue
            info = self.probe(name, path)
            if info.get("ok"):
                if install_error is not None:
                    MSG.warning("%s (using %s from PATH)" % (install_error, path))
                return path, info
            rejected.append("%s: %s" % (path, info.get("why")))
        if install_error is not None:              # the one message: tried, what to do
            raise EngineError("%s (%s)" % (install_error, "; ".join(rejected) or
                                           "no %s on PATH" % "/".join(names)))
        if rejected:
            raise EngineError("no usable %s: %s; install the tools (udocker.py install, "
                              "UDOCKER_TARBALL)" % (kind, "; ".join(rejected)))
        raise EngineError("no %s found: install the tools (udocker.py install, with "
                          "UDOCKER_TARBALL set) or set UDOCKER_USE_%s_EXECUTABLE"
                          % ("/".join(names), kind.upper()))

    @staticmethod
    def _kind_of(path, kind):
        base = os.path.basename(path)
        for name in TOOL_PROBES:
            if base.startswith(name):
                return name
        return kind

    def probe(self, kind, path):
        """The probe result for path, from the cache when path has not changed."""
        try:
            st = os.stat(path)
        except OSError:
            return {"ok": False, "why": "cannot stat %s" % path}
        key = "%s|%s|%d|%d|%d" % (kind, path, int(st.st_mtime), st.st_size, PROBE_FORMAT)
        cache = self._cache()
        if key in cache:
            return cache[key]
        info = TOOL_PROBES.get(kind, probe_version_word(kind))(path)
        self._remember(key, info, lambda k: not k.startswith("mode ") and
                       k.split("|")[1] == path)
        return info

    def engine_probe(self, group, path, probe, trust_failure=True):
        """Whether an execution mode can start on this host: probe() ({"ok", "why"}) run
        once per engine executable (path, mtime, size) and kernel release, then cached
        (a failure is probed again unless trust_failure)."""
        try:
            st = os.stat(path)
        except OSError:
            return {"ok": False, "why": "cannot stat %s" % path}
        key = "mode %s|%s|%d|%d|%s" % (group, path, int(st.st_mtime), st.st_size,
                                       os.uname()[2])
        info = self._cache().get(key)
        if info is None or (not info.get("ok") and not trust_failure):
            info = probe()
            MSG.verbose("mode %s on this host: %s" % (group, "ok" if info.get("ok") else
                                                       info.get("why")))
            prefix = "mode %s|%s|" % (group, path)
            self._remember(key, info, lambda k: k.startswith(prefix) and
                           k.split("|")[2:4] != key.split("|")[2:4])
        return info

    def _cache(self):
        """The probe cache (topdir/.probes.json, and its parsed copy .probes.marshal), read
        once per command."""
        if self.cache is None:
            twin = self.cache_path[:-len(".json")] + ".marshal"
            cache, kept = read_json_twin(self.cache_path, twin)
            if kept is not None:
                try:
                    write_atomic(twin, kept, sync=False)
                except (IOError, OSError):
                    pass
            self.cache = cache if isinstance(cache, dict) else {}
        return self.cache

    def _remember(self, key, info, stale):
        """Add key to the cache file (as it is now on disk) and drop the keys stale(k)."""
        cache = read_json(self.cache_path)
        cache = dict((k, v) for k, v in (cache if isinstance(cache, dict) else {}).items()
                     if not stale(k))
        cache[key] = info
        self.cache = cache
        try:
            write_atomic(self.cache_path, json_dumps(cache, pretty=True))
        except (IOError, OSError) as exc:
            MSG.debug("cannot cache the probe result %s: %s" % (key, exc))

    def fakechroot_so(self, arch, glibc, distro, libc="glibc"):
        """The libfakechroot for a container (arch, glibc version, (distro, version), C
        library): UDOCKER_FAKECHROOT_SO, else ours for the newest glibc not newer than the
        container's (libfakechroot-glibcX.Y-ARCH.so) or for musl (libfakechroot-musl-ARCH.so),
        else upstream's per-distro names as udocker 1.3.17 picks them but not one needing a
        newer glibc than the container's, else upstream's glibc library that needs the newest
        glibc the container has. distro may be a function returning it, called only then
        (read_os_release lists ROOT/etc)."""
        setting = self.cfg.fakechroot_so
        if setting:
            path = setting if "/" in setting else os.path.join(self.cfg.libdir, setting)
            if not os.path.isfile(path):
                raise EngineError("libfakechroot not found: %s (UDOCKER_FAKECHROOT_SO)" % path)
            return path
        suffix = TOOL_ARCH.get(arch, arch)
        try:
            names = os.listdir(self.cfg.libdir)
        except OSError:
            names = []
        ours = []
        head, tail = "libfakechroot-glibc", "-%s.so" % suffix
        if libc == "musl":
            ours = [((), name) for name in names if name == "libfakechroot-musl" + tail]
        for name in names if libc == "glibc" else ():
            built_for = name[len(head):-len(tail)]
            if name.startswith(head) and name.endswith(tail) and \
                    len(version_tuple(built_for)) == 2 and "." in built_for and \
                    built_for.replace(".", "").isdigit() and \
                    (not glibc or version_at_least(glibc, built_for)):
                ours.append((version_tuple(built_for), name))
        if ours:
            return os.path.join(self.cfg.libdir, max(ours)[1])
        name, version = distro() if callable(distro) else distro   # Alpine-3.19, Debian-12
        version = version if "Alpine" in name else version.split(".")[0]
        need = lambda n: glibc_needed(os.path.join(self.cfg.libdir, n))
        fits = lambda n: not glibc or version_at_least(glibc, need(n) or "0")
        for candidate in ("libfakechroot-%s-%s-%s.so" % (name, version, suffix),
                          "libfakechroot-%s-%s.so" % (name, suffix),
                          "libfakechroot-%s.so" % suffix, "libfakechroot.so"):
            if candidate in names and fits(candidate):     # not one that cannot load
                return os.path.join(self.cfg.libdir, candidate)
        # none named for this distribution: the per-distribution glibc library that needs
        # the newest glibc this container has (Debian-12's for a Debian 13, ...)
        others = [(need(n), n) for n in names if glibc and n.startswith("libfakechroot-")
                  and n.endswith(tail) and n.count("-") == 3]
        others = [(version_tuple(v), n) for v, n in others if v and version_at_least(glibc, v)]
        if others:
            chosen = max(others)[1]
            MSG.verbose("no libfakechroot named for %s %s: using %s" % (name, version, chosen))
            return os.path.join(self.cfg.libdir, chosen)
        have = sorted(n for n in names if n.startswith("libfakechroot"))
        found = "glibc %s" % (glibc or "?") if libc == "glibc" else libc
        raise EngineError("no libfakechroot for this container (%s, %s; have: %s): use "
                          "P1, or set UDOCKER_FAKECHROOT_SO" % (suffix, found,
                                                               ", ".join(have) or "none"))


# ==== 11. Command line ====
# One table entry per command drives parsing, validation (before any side effect) and help.
# Option kinds: FLAG (bool), VALUE (last one wins), LIST (repeatable, accumulates).

# ---- 11.1 Options, the command table, the session ----

FLAG, VALUE, LIST = "flag", "value", "list"


class Opt(object):
    """One command option: its spellings, kind, destination and help text."""

    def __init__(self, names, kind=FLAG, dest=None, help="", metavar="VALUE"):
        self.names = names.split("|")
        self.kind = kind
        self.dest = dest or self.names[-1].lstrip("-").replace("-", "_")
        self.help = help
        self.metavar = metavar

    def usage(self):
        if self.kind == FLAG:
            return ", ".join(self.names)
        return ", ".join(n + ("=" if n.startswith("--") else " ") + self.metavar
                         for n in self.names)


def _o(names, kind=FLAG, help="", dest=None, metavar="VALUE"):
    """An option as the tables write it: its Opt is made only for a command that runs or
    shows its help (Command.opts), not the ~100 of every command at each start."""
    return (names, kind, dest, help, metavar)


PULL_OPTS = [
    _o("--index", VALUE, "registry index URL (search)", metavar="URL"),
    _o("--registry", VALUE, "registry URL, e.g. https://quay.io", metavar="URL"),
    _o("--httpproxy", VALUE, "proxy (http://, socks5[h]://, socks4[a]://) for this pull",
       metavar="URL"),
    _o("--platform", VALUE, "os/arch[/variant] to pull (default: this host)",
       metavar="OS/ARCH"),
]

RUN_OPTS = [
    _o("--rm", help="delete the container when it exits"),
    _o("-w|--workdir", VALUE, "working directory inside the container", metavar="DIR"),
    _o("-u|--user", VALUE, "user NAME or UID[:GID] inside the container", metavar="USER"),
    _o("-v|--volume", LIST, "bind HOST[:CONT] into the container", metavar="HOST[:CONT]"),
    _o("--mount", LIST, "bind as Docker does: type=bind,source=HOST,target=CONT[,readonly]",
       metavar="SPEC"),
    _o("--novol", LIST, "do not bind this default volume", metavar="PATH"),
    _o("-e|--env", LIST, "set NAME=VALUE (or NAME from the host)", metavar="NAME[=VAL]"),
    _o("--env-file", LIST, "read NAME=VALUE (or NAME, export NAME=VALUE) lines from FILE",
       metavar="FILE"),
    _o("--hostauth", help="use the host's passwd and group"),
    _o("--containerauth", help="use the container's passwd and group as they are"),
    _o("--nosysdirs", help="do not bind /dev /proc /sys ..."),
    _o("--nometa", help="ignore the image metadata (Env, Cmd, WorkingDir ...)"),
    _o("--dri", help="bind the host's DRI directories"),
    _o("--hostenv", help="pass the whole host environment"),
    _o("--cpuset-cpus", VALUE, "run on these CPUs (sets the CPU affinity)", metavar="LIST"),
    _o("--name", VALUE, "name the container", metavar="NAME"),
    _o("--bindhome", help="bind the host home directory"),
    _o("-k|--kernel", VALUE, "kernel release to report (P modes)", metavar="RELEASE"),
    _o("--device", LIST, "bind a host device (F modes: at its own path)",
       metavar="/dev/X[:CONT]"),
    _o("--location", VALUE, "run a bare directory tree", metavar="DIR"),
    _o("--nobanner", help="no start banner"),
    _o("--entrypoint", VALUE, "override the image entrypoint ('' clears it)",
       metavar="CMD"),
    _o("--platform", VALUE, "platform for an implicit pull", metavar="OS/ARCH"),
    _o("--pull", VALUE, "missing|never|always|reuse", metavar="WHEN"),
    _o("--httpproxy", VALUE, "proxy for an implicit pull", metavar="URL"),
    _o("--index", VALUE, "index for an implicit pull", metavar="URL"),
    _o("--registry", VALUE, "registry for an implicit pull", metavar="URL"),
    _o("-p|--publish", LIST, "map container port to host port (P modes)",
       metavar="HOST:CONT"),
    _o("-P|--publish-all|--netcoop", dest="publish_all",
       help="network cooperation mode (P modes)"),
    _o("--hostname", VALUE, "host name inside (R modes)", metavar="NAME"),
    _o("--nvidia", help="bind the host's NVIDIA driver (as setup --nvidia does)"),
    _o("--gpus", VALUE, "all, N or device=ID,...: the host's NVIDIA driver and all its "
       "devices (as --nvidia)", metavar="GPUS"),
    _o("--shm-size", VALUE, "size of a private /dev/shm (R modes)", metavar="SIZE"),
    _o("--volumes-from", LIST, "accepted, ignored", metavar="X"),
    _o("--dns", LIST, "accepted, ignored", metavar="X"),
    _o("--dns-search", LIST, "accepted, ignored", metavar="X"),
    _o("-i|--interactive", help="accepted for docker compatibility"),
    _o("-t|--tty", help="accepted for docker compatibility"),
    _o("-a|--attach", help="accepted for docker compatibility"),
]


class Command(object):
    """A command: its options, positional arguments and help; `func` does the work.

    args: names of positionals; "[X]" optional, "X..." one or more, "[X...]" any number.
    rest: the positional after which every word belongs to the container command (run).
    """

    def __init__(self, name, summary, args=(), opts=(), func=None, rest=None, needs_repo=True,
                 notes=""):
        self.name, self.summary, self.args = name, summary, list(args)
        self.func, self.rest, self.needs_repo = func, rest, needs_repo
        self.notes = notes          # text shown after the options by `help COMMAND`
        self._specs = opts          # _o() tuples (or Opts), made Opts by the opts property
        self._opts = None
        self._lookup = None

    @property
    def opts(self):
        """[Opt] of the command."""
        if self._opts is None:
            self._opts = [o if isinstance(o, Opt) else Opt(*o) for o in self._specs]
        return self._opts

    @property
    def lookup(self):
        """{option name: Opt}, built for the one command that runs, not the ~40 at import."""
        if self._lookup is None:
            self._lookup = dict((n, o) for o in self.opts for n in o.names)
        return self._lookup

    def usage(self):
        lines = ["%s: %s" % (self.name, self.summary), "",
                 "usage: %s %s%s %s" % (__program__, self.name,
                                        " [options]" if self.opts else "",
                                        " ".join(self.args))]
        if self.opts:
            lines.append("")
            width = max(len(o.usage()) for o in self.opts) + 2
            for opt in self.opts:
                lines.append("  %-*s %s" % (width, opt.usage(), opt.help))
        if self.notes:
            lines.extend(["", self.notes])
        return "\n".join(lines)

    def parse(self, words):
        """(options dict, positionals list); raises UsageError before anything is done."""
        opts = dict((o.dest, [] if o.kind == LIST else (False if o.kind == FLAG else None))
                    for o in self.opts)
        args = []
        i = 0
        while i < len(words):
            word = words[i]
            i += 1
            if self.rest is not None and len(args) > self.rest:
                args.append(word)
                continue
            if word == "--":
                args.extend(words[i:])
                break
            if word == "-" or not word.startswith("-"):
                args.append(word)
                continue
            name, has_value, value = word.partition("=")
            opt = self.lookup.get(name)
            if opt is None:
                flags = self._short_flags(word)
                if flags is None:
                    raise UsageError("%s: unknown option: %s" % (self.name, word))
                for flag in flags:
                    opts[flag.dest] = True
                continue
            if opt.kind == FLAG:
                if has_value:
                    raise UsageError("%s: option %s takes no value" % (self.name, name))
                opts[opt.dest] = True
                continue
            if not has_value:
                if i >= len(words) or (words[i].startswith("-") and words[i] != "-"):
                    raise UsageError("%s: option %s needs a value" % (self.name, name))
                value = words[i]
                i += 1
            if opt.kind == LIST:
                opts[opt.dest].append(value)
            else:
                opts[opt.dest] = value
        self._check_args(args)
        return opts, args

    def _short_flags(self, word):
        """'-it' -> [Opt(-i), Opt(-t)] when every letter is a short flag, else None."""
        if not re.match(r"^-[A-Za-z]{2,}$", word):
            return None
        flags = [self.lookup.get("-" + c) for c in word[1:]]
        if all(f is not None and f.kind == FLAG for f in flags):
            return flags
        return None

    def _check_args(self, args):
        required = [a for a in self.args if not a.startswith("[")]
        variadic = any(a.endswith("...") or a.endswith("...]") for a in self.args)
        if self.rest is not None:
            variadic = True
        if len(args) < len(required):
            raise UsageError("%s: missing argument: %s (see: %s %s --help)" % (
                self.name, required[len(args)].rstrip("."), __program__, self.name))
        if not variadic and len(args) > len(self.args):
            raise UsageError("%s: unexpected argument: %s" % (self.name, args[len(self.args)]))


class Session(object):
    """What a command works with: the Config, the repository and the keystore."""

    def __init__(self, cfg, environ=None):
        self.cfg = cfg
        self.environ = os.environ if environ is None else environ   # main()'s environment
        self.repo = LocalRepository(cfg, self.environ.get("PATH", ""))
        self.containers = ContainerStore(self.repo)
        self._keystore = None

    @property
    def keystore(self):
        """The Keystore, made by the commands that talk to registries (section 5.4)."""
        if self._keystore is None:
            self._keystore = Keystore(self.cfg.keystore, os.path.join(
                self.environ.get("HOME") or os.path.expanduser("~"), ".docker",
                "config.json"))
        return self._keystore

    def puller(self, opts):
        if opts.get("index") and not opts.get("registry"):
            MSG.debug("--index only affects search")
        return Puller(self.cfg, self.repo, self.keystore, opts.get("registry"),
                      opts.get("httpproxy"), quiet=MSG.level < Messages.INF)

    def platform(self, opts):
        if opts.get("platform") is None:
            return Platform.host()
        return Platform.parse(opts["platform"])

    def image_ref(self, text):
        """A local image by name[:tag] (default tag latest); raises if it is not there."""
        ref = ImageRef.parse(text)
        return self.repo.image(ref.name, ref.local_tag)


# ---- 11.2 Image and registry commands ----


def cmd_pull(session, opts, args):
    ref = ImageRef.parse(args[0])
    session.puller(opts).pull(ref, session.platform(opts))
    return 0


def cmd_images(session, opts, args):
    if opts["q"]:                                   # docker images -q: one name per line
        for name, tag in session.repo.list_images():
            out(tag_ref(name, tag))
        return 0
    if MSG.level >= Messages.INF:
        out("REPOSITORY")
    for name, tag in session.repo.list_images():
        try:
            image = session.repo.image(name, tag)
        except RepositoryError as exc:
            MSG.warning("%s:%s: %s" % (name, tag, exc))
            continue
        prot = "P" if image.protected else "."
        if opts["p"]:
            out("%-18.18s %c %s" % (image.platform, prot, image.ref))
        else:
            out("%s    %c" % (image.ref, prot))
        if opts["l"]:
            out(" %s" % image.dir)
            for lname, path in image.links():
                size = os.path.getsize(path) if os.path.exists(path) else 0
                mbytes = size // (1024 * 1024) or (1 if size else 0)
                out("    /%s (%d MB)" % (lname, mbytes))
    return 0


def cmd_inspect(session, opts, args):
    template = opts["format"]
    if template is not None:
        parse_template(template)                    # refused before anything is read
    container = session.containers.find(args[0])
    if container:
        return inspect_container(session, container, opts)
    if opts["p"]:
        raise RepositoryError("container not found: %s" % args[0])
    image = session.image_ref(args[0])
    if not image.config:
        raise RepositoryError("image %s has no readable config" % image.ref)
    if template is not None:
        digest = os.path.basename(image.config_path or "")
        out(fill_template(template, image.config, {
            "Id": digest if digest.startswith("sha256:") else None,
            "RepoTags": [image.ref]}))
        return 0
    out(json_dumps(image.config, pretty=True))
    return 0


TEMPLATE_RE = LazyRegex(r"\{\{-?\s*(.*?)\s*-?\}\}")
TEMPLATE_ACTION_RE = LazyRegex(r"^(json\s+)?(\.|(\.[A-Za-z_][A-Za-z0-9_]*)+)$")


def parse_template(template):
    """inspect -f: [(literal text, json?, [field names] or None)] of a Go template made of
    text, {{.A.B}} and {{json .A.B}}; raises UsageError for anything else (range, if ...)."""
    parts, pos = [], 0
    for match in TEMPLATE_RE.finditer(template):
        action = TEMPLATE_ACTION_RE.match(match.group(1))
        if not action:
            raise UsageError("inspect -f: only {{.Field.Sub}} and {{json .Field}} are "
                             "supported, not {{%s}}" % match.group(1))
        fields = [f for f in action.group(2).split(".") if f]
        parts.append((template[pos:match.start()], bool(action.group(1)), fields))
        pos = match.end()
    parts.append((template[pos:], False, None))
    return parts


def fill_template(template, doc, extra):
    """The text of inspect -f TEMPLATE for the JSON document doc (extra: derived top-level
    fields such as Id); names match keys as docker's do, or else case-insensitively
    (.Config.Env in an OCI config's "config")."""
    text = []
    for literal, as_json, fields in parse_template(template):
        text.append(literal)
        if fields is None:
            continue
        value = doc
        for i, name in enumerate(fields):
            if not isinstance(value, dict):
                value = None
                break
            keys = dict((k.lower(), k) for k in value)
            found = value.get(name, value.get(keys.get(name.lower()), None))
            value = extra.get(name) if found is None and i == 0 and name in extra else found
        text.append(json.dumps(value, sort_keys=True, separators=(",", ":")) if as_json
                    else _go_text(value))
    return "".join(text)


def _go_text(value):
    """A value as Go's text/template prints it: [a b], map[k:v], <no value>."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[%s]" % " ".join(_go_text(v) for v in value)
    if isinstance(value, dict):
        return "map[%s]" % " ".join("%s:%s" % (k, _go_text(value[k])) for k in sorted(value))
    return value if isinstance(value, string_types) else str(value)


def cmd_rmi(session, opts, args):
    if not args and not opts["prune"]:
        raise UsageError("rmi: missing argument: IMAGE (see: %s rmi --help)" % __program__)
    status = 0
    for arg in args:                                # rmi $(udocker.py images -q)
        try:
            ref = ImageRef.parse(arg)
            session.repo.remove_image(ref.name, ref.local_tag, force=opts["f"])
        except UdockerError as exc:
            if len(args) == 1:
                raise
            MSG.error(str(exc))
            status = exc.exit_code
    if opts["prune"]:
        with session.repo.lock("metadata"):
            freed = session.repo.sweep(prune=True, grace=0.0 if opts["f"] else None)
        if not freed:
            MSG.info("nothing to prune")
    return status


def cmd_tag(session, opts, args):
    src = session.image_ref(args[0])
    dst = ImageRef.parse(args[1])
    session.repo.copy_tag(src, dst.name, dst.local_tag)
    return 0


def cmd_verify(session, opts, args):
    repo = session.repo
    if args:
        images = [session.image_ref(args[0])]
    else:
        images = [(name, tag) for name, tag in repo.list_images()]
    failed = []
    for image in images:
        try:
            if not args:
                image = repo.image(*image)
            MSG.info("verifying: %s" % image.ref)
            problems = _verify_image(image)
        except RepositoryError as exc:
            if args:
                raise
            problems, image = [str(exc)], "%s:%s" % image
        for problem in problems:
            MSG.error(problem)
        if problems:
            failed.append(getattr(image, "ref", image))
    _report_leftovers(repo)
    if failed:
        raise RepositoryError("image verification failure: %s" % ", ".join(failed))
    MSG.info("image Ok" if args else "repository Ok")
    return 0


def _verify_image(image):
    """image.verify(), but an image that an rmi removed meanwhile is said to be so."""
    try:
        problems = image.verify()
    except EnvironmentError:
        image.check_present()
        raise
    if problems:
        image.check_present()
    return problems


def _report_leftovers(repo):
    """One line: what killed commands left in the repository, and its size (see sweep)."""
    found, _ = repo.leftovers()
    if not found:
        MSG.info("no leftovers of killed commands")
        return
    for path, size in found:
        MSG.verbose("leftover: %s (%s)" % (path, human_size(size)))
    running = " (a pull, load, import or rmi is running: its work files count)" \
        if work_dir_owners(repo.locksdir)[0] else ""
    MSG.warning("leftovers of killed commands: %d files, %s%s: %s rmi --prune frees them"
                % (len(found), human_size(sum(size for _, size in found)), running,
                   __program__))


def _protect(session, args, protect):
    container = session.containers.find(args[0])
    if container:
        session.containers.set_protected(container, protect)
        return 0
    ref = ImageRef.parse(args[0])
    session.repo.set_protected(ref.name, ref.local_tag, protect)
    return 0


def cmd_protect(session, opts, args):
    return _protect(session, args, True)


def cmd_unprotect(session, opts, args):
    return _protect(session, args, False)


def cmd_manifest(session, opts, args):
    if args[0] != "inspect":
        raise UsageError("manifest: unknown subcommand: %s (only: inspect)" % args[0])
    if len(args) != 2:
        raise UsageError("manifest: usage: manifest inspect IMAGE")
    ref = ImageRef.parse(args[1])
    puller = session.puller(opts)
    client = puller.client(ref)
    try:
        if opts.get("platform") is not None:
            body = puller.resolve(client, ref, session.platform(opts))[0]
        else:
            body = client.get_manifest(ref.remote, ref.local_tag)[0]
    finally:
        client.http.close()
    out(to_text(body).rstrip("\n"))
    return 0


# -- image format commands

def _check_input(what, source):
    if source == "-":
        if sys.stdin.isatty():
            raise UsageError("%s: standard input is a terminal: give a file or redirect "
                             "the input" % what)
    elif not re.match(r"^https?://", source) and not os.path.isfile(source):
        if not os.path.exists(source):
            raise UsageError("%s: file does not exist: %s" % (what, source))
        raise UsageError("%s: not a regular file: %s (%s; give a tar file, or - with the "
                         "input redirected)" % (what, source, _file_kind(source)))


def _file_kind(path):
    mode = os.stat(path).st_mode
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


def _check_output(what, output):
    """Before an archive is written to the file output: one line for what would fail (the
    temporary file beside it would otherwise be named in the error)."""
    if not output:
        raise UsageError("%s: empty output file name" % what)
    if os.path.isdir(output):
        raise UsageError("%s: output is a directory: %s (give a file name)" % (what, output))
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise UsageError("%s: %s: %s" % (what, "not a directory" if os.path.lexists(parent)
                                         else "no such directory", parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError("%s: directory not writable: %s" % (what, parent))


def cmd_load(session, opts, args):
    source = opts["input"]
    if args and args[0] == "-":
        source, args = source or "-", args[1:]
    source = source or "-"
    if len(args) > 1:
        raise UsageError("load: unexpected argument: %s" % args[1])
    _check_input("load", source)
    for ref in load_archive(session.repo, source, args[0] if args else None):
        out(ref)
    return 0


def cmd_save(session, opts, args):
    output = opts["output"]
    if args[0] == "-":
        output, args = "-" if output is None else output, args[1:]
    output = "-" if output is None else output
    if not args:
        raise UsageError("save: missing argument: IMAGE (see: %s save --help)" % __program__)
    if output == "-" and sys.stdout.isatty():
        raise UsageError("save: refusing to write an archive to a terminal (use -o FILE)")
    if output != "-" and os.path.lexists(output):
        raise UsageError("save: output file already exists: %s" % output)
    if output != "-":
        _check_output("save", output)
    images = [session.image_ref(text) for text in args]
    save_archive(session.repo, images, output)
    return 0


def cmd_import(session, opts, args):
    source = args[0]
    if opts["clone"] or opts["tocontainer"]:
        return _import_to_container(session, opts, args)
    if len(args) < 2:
        raise UsageError("import: missing argument: IMAGE[:TAG] (see: %s import --help)"
                         % __program__)
    ref = ImageRef.parse(args[1])
    platform = session.platform(opts)
    _check_input("import", source)
    if opts["name"]:
        MSG.warning("import: --name is for --tocontainer and --clone: ignored")
    digest = import_tarball(session.repo, session.cfg, source, ref.name, ref.local_tag,
                            platform, move=opts["mv"])
    MSG.info("imported %s:%s (%s, %s)" % (ref.name, ref.local_tag, platform, digest))
    return 0


def _import_to_container(session, opts, args):
    """import --tocontainer / --clone: prints the new container's id."""
    ignored = ["--mv"] if opts["mv"] else []
    if opts["clone"]:
        ignored += ["IMAGE"] if len(args) > 1 else []
        ignored += ["--platform"] if opts["platform"] else []
        image = platform = None
    else:
        image = IMPORTED_IMAGE
        if len(args) > 1:
            ref = ImageRef.parse(args[1])
            image = "%s:%s" % (ref.name, ref.local_tag)
        platform = session.platform(opts)
    _check_input("import", args[0])
    if ignored:
        MSG.warning("import %s: ignored: %s (the tarball is extracted, not stored%s)" % (
            "--clone" if opts["clone"] else "--tocontainer", " ".join(ignored),
            "; a clone keeps its image name and platform" if opts["clone"] else ""))
    out(import_container(session.containers, session.cfg, args[0], opts["name"], image,
                         platform))
    return 0


def cmd_search(session, opts, args):
    cfg = session.cfg
    term = args[0]
    if opts["list_tags"]:
        ref = ImageRef.parse(term)
        client = RegistryClient.for_host(cfg, ref.host, session.keystore, opts["registry"],
                                         opts["httpproxy"])
        for tag in client.paged("/v2/%s/tags/list?n=1000" % ref.remote,
                                "repository:%s:pull" % ref.remote, "tags"):
            out(tag)
        return 0
    if not opts["registry"]:
        index = opts["index"] or cfg.dockerio_index_url
        if _search_hub(session, index, term, opts):
            return 0
    url = opts["registry"] or index               # a registry: list its catalog
    client = RegistryClient.for_host(cfg, _registry_host(url), session.keystore, url,
                                     opts["httpproxy"])
    if MSG.level >= Messages.INF:
        out("NAME")
    for name in client.paged("/v2/_catalog?n=1000", "registry:catalog:*", "repositories"):
        if term in ("*", "") or _native(term).lower() in _native(name).lower():
            out(name)
    return 0


def _search_hub(session, index, term, opts):
    """Docker Hub's search API at index, page by page; False if the index has no such API."""
    http = HttpClient(session.cfg, opts["httpproxy"])
    page = 1
    fmt = "%-55.55s %8.8s %-70.70s %5.5s" if not opts["no_trunc"] else "%s %s %s %s"
    while True:
        url = "%s/v2/search/repositories?%s" % (index.rstrip("/"), urlencode(
            [("query", to_bytes(term)), ("page_size", session.cfg.search_page_size),
             ("page", page)]))
        try:
            resp = http.request("GET", url)
            body = resp.read_all()
        except NETWORK_ERRORS as exc:
            raise RegistryError("search at %s failed: %s" % (index, exc))
        if resp.status in (401, 404) and page == 1:
            return False
        if resp.status != 200:
            raise RegistryError("search at %s answered %d" % (index, resp.status))
        try:
            answer = json_loads(body)
            results = answer.get("results") or []
        except (ValueError, AttributeError):
            raise RegistryError("search at %s sent invalid JSON" % index)
        if page == 1 and MSG.level >= Messages.INF:
            out(fmt % ("NAME", "OFFICIAL", "DESCRIPTION", "STARS"))
        for item in results:
            out(fmt % (item.get("repo_name") or item.get("name", ""),
                       "[OK]" if item.get("is_official") else "----",
                       (item.get("short_description") or item.get("description") or "")
                       .replace("\n", " "), item.get("star_count", 0)))
        if not results or not answer.get("next"):
            return True
        if not opts["a"]:
            if not sys.stdin.isatty():
                return True
            sys.stdout.write("[return or q to quit]")
            sys.stdout.flush()
            if input_line().strip().lower().startswith("q"):
                return True
        page += 1


def _login_url(session, opts):
    """(registry URL, insecure) for login and logout (--registry, default Docker Hub)."""
    registry = opts.get("registry")
    if not registry:
        return session.cfg.dockerio_registry_url, session.cfg.http_insecure
    return registry_url_of(registry, session.cfg)


def cmd_login(session, opts, args):
    url, insecure = _login_url(session, opts)
    username = opts["username"]
    password = opts["password"]
    try:
        if not username:
            if sys.stdin.isatty():
                sys.stderr.write("username: ")
                sys.stderr.flush()
            username = input_line().strip()
        if opts["password_stdin"]:
            password = sys.stdin.readline().rstrip("\r\n")
        elif password is None:
            if not sys.stdin.isatty():
                raise EOFError()
            import getpass
            password = getpass.getpass("password: ")
    except EOFError:
        raise UsageError("login: no terminal to ask for the %s: give --username and "
                         "--password or --password-stdin"
                         % ("password" if username else "username"))
    if not username or not password:
        raise UsageError("login: username and password are required")
    if password.isupper():
        MSG.warning("password is all upper case: is caps lock on?")
    _check_login(session, url, insecure, username, password)
    session.keystore.store(url, username, password)
    MSG.info("credentials stored for %s" % url)
    return 0


def _check_login(session, url, insecure, username, password):
    """Ask the registry whether the credentials work (beyond upstream, which never checks).

    A registry that cannot be reached only earns a warning: credentials are stored anyway.
    """

    class Fixed(object):
        def credentials(self, _url):
            return (username, password)

    client = RegistryClient(session.cfg, url, Fixed(), insecure=insecure)
    try:
        resp = client.request("GET", "/v2/", "")
        if resp.status in (401, 403):
            raise RegistryError("login failed at %s: bad username or password" % url)
    except (TransientError, Unreachable) as exc:
        MSG.warning("could not check the credentials (%s); stored anyway" % exc)
    finally:
        client.http.close()


def cmd_logout(session, opts, args):
    if opts["a"]:
        session.keystore.erase()
        MSG.info("all credentials erased")
        return 0
    url = _login_url(session, opts)[0]
    if not session.keystore.erase(url):
        MSG.warning("no credentials stored for %s" % url)
    return 0


def cmd_mkrepo(session, opts, args):
    topdir = os.path.abspath(args[0])
    if os.path.exists(topdir) and (not os.path.isdir(topdir) or os.listdir(topdir)):
        raise RepositoryError("mkrepo: %s already exists and is not empty" % topdir)
    values = dict(session.cfg.items())
    for key, sub in (("topdir", ""), ("bindir", "bin"), ("libdir", "lib"), ("docdir", "doc"),
                     ("reposdir", "repos"), ("layersdir", "layers"),
                     ("containersdir", "containers")):
        values[key] = os.path.join(topdir, sub) if sub else topdir
    try:
        LocalRepository(Config(values, {})).create()
    except OSError as exc:
        raise RepositoryError("mkrepo: cannot create %s: %s" % (topdir, exc.strerror))
    return 0


# ---- 11.3 run ----


def local_image(session, text, opts, pull="missing"):
    """The LocalImage for an image reference, pulled first as `pull` says: missing (or
    reuse) pulls when it is not local, always pulls, never refuses a missing image."""
    ref = ImageRef.parse(text)
    wanted = session.platform(opts) if opts.get("platform") is not None else None
    present = session.repo.has_image(ref.name, ref.local_tag)
    if pull == "always" or (not present and pull != "never"):
        if not present:
            MSG.info("image not found locally, pulling: %s" % ref)
        session.puller(opts).pull(ref, wanted or Platform.host())
    elif not present:
        raise RepositoryError("image not found locally and --pull=never: %s" % ref)
    image = session.repo.image(ref.name, ref.local_tag)
    if wanted and not wanted.matches(*(image.platform.split("/", 2) + [""])[:3]):
        raise RepositoryError("the local image %s is %s, not %s (--platform): pull that "
                              "platform under another name, or leave out --platform"
                              % (ref, image.platform, wanted))
    return image


def _run_target(session, opts, target):
    """(container id, made now) for `run TARGET`: an existing container (or, with
    --pull=reuse, the one named --name), else a new one created from the image TARGET."""
    pull = opts.get("pull") or "missing"
    cid = session.containers.find(target)
    if cid is None and pull == "reuse" and opts.get("name"):
        cid = session.containers.find(opts["name"])
    if cid is not None:
        if opts.get("name") and opts["name"] not in session.containers.names(cid):
            session.containers.add_name(cid, opts["name"])
        return cid, False
    image = local_image(session, target, opts, pull)
    return create_container(session.containers, image, opts.get("name")), True


def cmd_run(session, opts, args):
    if opts.get("gpus") is not None:           # bad values refused before any pull
        parse_gpus(opts["gpus"])
    if opts.get("shm_size") is not None:
        parse_size(opts["shm_size"], "--shm-size")
    if opts.get("platform") is not None:       # even where no pull needs it
        session.platform(opts)
    if opts.get("pull") not in (None, "missing", "never", "always", "reuse"):
        raise UsageError("invalid --pull: %s (missing, never, always or reuse)" % opts["pull"])
    if opts.get("cpuset_cpus") is not None:
        parse_cpu_list(opts["cpuset_cpus"])
    volumes = Volume.from_options(opts)        # -v, --mount, -e, -w: a run that cannot
    # start pulls no image, makes no container (its plan takes these volumes, unless a pull
    # came between: then it looks at the host paths again)
    Engine._env_words(opts.get("env") or [], "-e", session.environ)
    if not (opts.get("workdir") or "/").startswith("/"):
        raise UsageError("invalid working directory: %s" % opts["workdir"])
    tools = Tools(session.cfg, session.repo, session.environ)
    if opts.get("location") is not None:
        container = RunContainer.from_location(opts["location"])
        return _run_engine(choose_engine(session, container, opts, args, tools), volumes)
    cid, made = _run_target(session, opts, args[0])
    try:
        container = RunContainer.from_store(session.containers, cid)
        status = _run_engine(choose_engine(session, container, opts, args[1:], tools),
                             None if made else volumes)
    except BaseException:
        if opts.get("rm") and made:            # a container this run made, that never ran
            _remove_after_run(session, cid)
        raise
    if opts.get("rm"):
        _remove_after_run(session, cid)
    return status


def _run_engine(engine, volumes):
    """engine.run(), given the volumes cmd_run parsed (None: it parses them itself)."""
    engine.given_volumes = volumes
    return engine.run()


def _remove_after_run(session, cid):
    """run --rm: delete the container as rm does (names too, unless it is protected); a
    failure is a warning, the run's own status stands."""
    try:
        remove_container(session.containers, cid, quiet=True)
    except UdockerError as exc:
        MSG.warning("run --rm: not removed: %s" % exc)


# ---- 11.4 Container and tools commands ----


def cmd_setup(session, opts, args):
    cid = session.containers.get(args[0])
    container = RunContainer.from_store(session.containers, cid)
    changing = opts["execmode"] is not None or opts["purge"] or opts["fixperm"] or \
        opts["nvidia"]
    if not changing:
        out("execmode: %s" % container.execmode(session.cfg))
        out("nvidiamode: %s" % container.files.has(ContainerDir.NVIDIA))
        return 0
    if session.containers.is_protected(cid):
        raise RepositoryError("container is protected: %s" % cid)
    if opts["purge"]:
        with session.containers.lock(cid):
            _purge_mountpoints(container)
    if opts["nvidia"]:
        _set_nvidia(session, container, opts["force"])
    if opts["fixperm"]:
        make_tree_removable(container.root)
    if opts["execmode"] is not None:
        tools = Tools(session.cfg, session.repo, session.environ)
        tools.install(getattr(ENGINES.get(opts["execmode"].upper()), "needs_tools", ()))
        set_execmode(session, container, opts["execmode"], tools, force=opts["force"])
    return 0


def _purge_mountpoints(container):
    """setup --purge: remove the mount points F modes made in ROOT (.mountpoints), the empty
    ones runtimes left under /.udocker, and the NVIDIA mode (marker and symlink trees)."""
    records = container.files.file(ContainerDir.MOUNTPOINTS)
    for link in mountpoint_links(container):
        if os.path.islink(link):
            os.unlink(link)
    remove_tree(records)
    own = os.path.join(container.root, ".udocker")
    if os.path.isdir(own) and not os.path.islink(own):
        for dirpath, dirnames, filenames in os.walk(own, topdown=False):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path) and os.path.getsize(path) == 0:
                    os.unlink(path)                       # a file's mount point
            if not os.listdir(dirpath):
                os.rmdir(dirpath)
    remove_quietly(container.files.file(ContainerDir.NVIDIA))
    run_dir = container.files.file(ContainerDir.RUN_DIR)
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if name == ContainerDir.RUN_NVIDIA or name.startswith(ContainerDir.RUN_NVIDIA_TREE):
            remove_tree(os.path.join(run_dir, name))


def _set_nvidia(session, container, force):
    """setup --nvidia: record that every run shows the host's NVIDIA driver (the `nvidia`
    file, as upstream); the driver must be here unless --force."""
    driver = NvidiaDriver.find(session.cfg, session.environ)
    if driver is None and not force:
        raise EngineError("setup --nvidia: %s (--force sets the mode anyway)" % NO_NVIDIA)
    with session.containers.lock(container.cid):
        container.set_state(ContainerDir.NVIDIA, "")
    MSG.info("nvidia mode set: every run binds the host's driver under %s%s"
             % (NVIDIA_DIR, " (here: %s)" % driver.summary() if driver else
                " (none on this host)"))


INSTALL_NOTES = """Where the tools come from, in this order (showconf lists their checksums):
  1. a tools tarball beside udocker.py or in the repository directory (~/.udocker):
     udocker-tools-*.tar.gz with its .sha256 beside it, or udocker-englib-*.tar.gz
  2. UDOCKER_TARBALL (`tarball` in udocker.conf): files or URLs, space-separated, checked
     against UDOCKER_TARBALL_SHA256 (sha256:HEX or gitblob:ID), a pin, or NAME.sha256
  3. when UDOCKER_TARBALL is not set, udocker's tools 1.2.11 (pinned by git blob id) from
     %s
  4. proot, runc or crun on PATH, when they pass a capability check
Without Internet: download one of the URLs above on a machine that has it, copy the file
beside udocker.py or into ~/.udocker, and run the command again.""" % "\n     ".join(
    DEFAULT_TARBALL_URLS.split())


def cmd_install(session, opts, args):
    ToolsInstaller(session.cfg, session.repo).install(force=opts["force"], purge=opts["purge"])
    return 0


def cmd_version(session, opts, args):
    out("version: %s" % COMPAT_VERSION)
    out("tarball: %s" % session.cfg.tarball)
    out("tarball_release: %s" % session.cfg.tarball_release)
    out("udocker.py: %s" % __version__)
    return 0


def cmd_showconf(session, opts, args):
    out("-" * 79)
    out("udocker.py configuration: key = value")
    out("-" * 79)
    for key, value in session.cfg.items():
        if isinstance(value, list):
            value = json.dumps(value)
        line = "%s = %s" % (key, value)
        if MSG.level >= Messages.VER:
            line += "    # " + session.cfg.sources.get(key, "derived")
        out(line)
    out("-" * 79)
    out("tools tarball sources, tried in this order (then engines on PATH):")
    for line in ToolsInstaller(session.cfg, None).describe() or ["none (installation off)"]:
        out("  " + line)
    out("-" * 79)
    return 0


def cmd_help(session, opts, args):
    if args:
        command = COMMANDS.get(args[0])
        if command is None:
            raise UsageError("help: no such command: %s" % args[0])
        out(command.usage())
        return 0
    out(general_help())
    return 0


# -- container commands

def cmd_create(session, opts, args):
    image = local_image(session, args[0], opts)
    out(create_container(session.containers, image, opts["name"], opts["force"]))
    return 0


def cmd_ps(session, opts, args):
    store = session.containers
    if opts["q"]:                                   # docker ps -q: one id per line
        for cid, _, _ in store.list():
            out(cid)
        return 0
    head = fmt = "%-36.36s %c %c "
    if opts["m"]:
        head, fmt = head + "MOD ", fmt + "%2.2s "
    if opts["s"]:
        head, fmt = head + "SIZE ", fmt + "%5.5s "
    if opts["p"]:
        head, fmt = head + "PLATFORM           ", fmt + "%-18.18s "
    out((head + "%-18s %-20.20s") % ("CONTAINER ID", "P", "M", "NAMES", "IMAGE"))
    fmt += "%-18.100s %-20.100s"
    for cid, names, image in store.list():
        row = [cid, "P" if store.is_protected(cid) else ".", container_root_state(store, cid)]
        if opts["m"]:
            row.append(_ps_execmode(store, cid, session.cfg))
        if opts["s"]:
            row.append(tree_size_mb(store.path(cid, ContainerDir.ROOT)))
        if opts["p"]:
            row.append(container_platform(store, cid))
        row += [str([str(n) for n in names]) if names else "", image]
        out(fmt % tuple(row))
    return 0


def _ps_execmode(store, cid, cfg):
    """The MOD column: the mode run and setup use; a mode that is no mode is shown as ??
    with the Warning line that run and setup give as their Error."""
    try:
        return ContainerDir(store.path(cid), cid).execmode(cfg)
    except EngineError as exc:
        MSG.warning(str(exc))
        return "??"


def cmd_rm(session, opts, args):
    status = 0
    for arg in args:
        try:
            remove_container(session.containers, arg)
        except UdockerError as exc:
            if len(args) == 1:
                raise
            MSG.error(str(exc))
            status = exc.exit_code
    return status


def cmd_name(session, opts, args):
    session.containers.add_name(session.containers.get(args[0]), args[1])
    return 0


def cmd_rmname(session, opts, args):
    session.containers.remove_name(args[0])
    MSG.info("container name: %s removed." % args[0])
    return 0


def cmd_rename(session, opts, args):
    session.containers.rename(args[0], args[1])
    return 0


def cmd_clone(session, opts, args):
    out(clone_container(session.containers, args[0], opts["name"]))
    return 0


def cmd_export(session, opts, args):
    output = opts["output"]
    if output is None and args[:1] == ["-"]:
        output, args = "-", args[1:]
    if len(args) != 1:
        raise UsageError("export: usage: export [-o FILE | -] [--clone] CONTAINER")
    if output in (None, "-"):
        if sys.stdout.isatty():
            raise UsageError("export: refusing to write a tar to a terminal (use -o FILE)")
        sys.stdout.flush()
        export_container(session.containers, args[0], binary_stdout(), opts["clone"])
        return 0
    _check_output("export", output)
    MSG.info("exporting to file %s" % output)
    export_container(session.containers, args[0], output, opts["clone"])
    return 0


def inspect_container(session, cid, opts):
    if opts["p"]:
        out(session.containers.path(cid, ContainerDir.ROOT))
        return 0
    data = read_json(session.containers.path(cid, ContainerDir.CONFIG))
    if data is None:
        raise RepositoryError("container %s has no readable container.json" % cid)
    if opts["format"] is not None:
        out(fill_template(opts["format"], data, {"Id": cid}))
        return 0
    out(json_dumps(data, pretty=True))
    return 0


COMMANDS = dict((c.name, c) for c in [
    Command("help", "show help for udocker.py or for a command", ["[COMMAND]"],
            func=cmd_help, needs_repo=False),
    Command("version", "show the version", func=cmd_version, needs_repo=False),
    Command("showconf", "show the effective configuration", func=cmd_showconf,
            needs_repo=False),
    Command("install", "install the engines (tools tarball)", opts=[
        _o("--force", help="reinstall even if installed"),
        _o("--purge", help="remove the installed tools and install again")],
        func=cmd_install, notes=INSTALL_NOTES),
    Command("search", "search a registry for images, or list an image's tags",
            ["EXPRESSION"], opts=[
                _o("-a", help="show all results without paging"),
                _o("--no-trunc", help="do not truncate columns"),
                _o("--list-tags", help="list the tags of the repository EXPRESSION")]
            + PULL_OPTS[:3], func=cmd_search),
    Command("pull", "pull an image from a registry", ["IMAGE"], PULL_OPTS, cmd_pull),
    Command("images", "list local images", opts=[
        _o("-l", help="long format: tag directory and layers"),
        _o("-p", help="show the platform"),
        _o("-q|--quiet", dest="q", help="only the image names (NAME:TAG), one a line"),
        _o("--no-trunc", help="accepted"), _o("-a|--all", dest="all", help="accepted")],
        func=cmd_images),
    Command("create", "create a container from an image", ["IMAGE"], [
        _o("--name", VALUE, "name the container", metavar="NAME"),
        _o("--force", help="allow a name that already exists")] + PULL_OPTS,
        func=cmd_create),
    Command("run", "run a command in a container (or image)",
            ["CONTAINER|IMAGE", "[COMMAND...]"], RUN_OPTS, cmd_run, rest=0),
    Command("ps", "list containers", opts=[
        _o("-m", help="show the execution mode"), _o("-s", help="show the size in MB"),
        _o("-p", help="show the platform"),
        _o("-q|--quiet", dest="q", help="only the container ids, one a line"),
        _o("-a|--all", dest="all", help="accepted (every container is listed: none runs "
           "in the background)")], func=cmd_ps),
    Command("rm", "remove containers", ["CONTAINER..."], [
        _o("-f", help="accepted (rm always makes the container's files removable)")],
        func=cmd_rm),
    Command("rmi", "remove images; --prune: the layers no image uses", ["[IMAGE...]"], [
        _o("-f", help="ignore errors removing layers; with --prune: ignore sweep_grace"),
        _o("--prune", help="remove what killed commands left: layers no image uses, "
                           "partial downloads (older than sweep_grace)")], func=cmd_rmi),
    Command("tag", "give an image another name", ["IMAGE", "NEWIMAGE"], func=cmd_tag),
    Command("inspect", "show the metadata of an image or container",
            ["IMAGE|CONTAINER"], [_o("-p", help="print the container's ROOT path"),
                                  _o("-f|--format", VALUE, "print {{.Field.Sub}} and {{json "
                                     ".Field}} of the JSON", metavar="TEMPLATE")],
            func=cmd_inspect),
    Command("verify", "check an image (default: all) against its digests; report leftovers",
            ["[IMAGE]"], func=cmd_verify),
    Command("protect", "protect an image or container from removal",
            ["IMAGE|CONTAINER"], func=cmd_protect),
    Command("unprotect", "remove the protection", ["IMAGE|CONTAINER"], func=cmd_unprotect),
    Command("manifest", "show an image's manifest as the registry sends it",
            ["inspect", "IMAGE"], PULL_OPTS, cmd_manifest),
    Command("name", "give a container a name", ["CONTAINER", "NAME"], func=cmd_name),
    Command("rmname", "remove a container name", ["NAME"], func=cmd_rmname),
    Command("rename", "rename a container", ["NAME", "NEWNAME"], func=cmd_rename),
    Command("clone", "duplicate a container", ["CONTAINER"], [
        _o("--name", VALUE, "name the new container", metavar="NAME")], func=cmd_clone),
    Command("export", "write a container's files as a tar archive", ["[-]", "[CONTAINER]"], [
        _o("-o|--output", VALUE, "output file ('-' for stdout)", metavar="FILE"),
        _o("--clone", help="export the whole container, metadata included")],
        func=cmd_export),
    Command("import", "import a rootfs tarball as an image or container",
            ["FILE|URL|-", "[IMAGE[:TAG]]"], [
                _o("--mv", help="move the tarball into the repository (image import)"),
                _o("--tocontainer", help="create a container (image name default "
                   "IMPORTED:unknown), no image"),
                _o("--clone", help="the tarball is an `export --clone` of a container"),
                _o("--name", VALUE, "name the new container", metavar="NAME"),
                _o("--platform", VALUE, "platform to record (default: this host)",
                   metavar="OS/ARCH")],
            func=cmd_import),
    Command("load", "load images from a docker-save or OCI archive", ["[-]", "[NAME]"], [
        _o("-i|--input", VALUE, "archive file ('-' or none: stdin)", metavar="FILE")],
        func=cmd_load),
    Command("save", "write images as a docker-save archive", ["IMAGE..."], [
        _o("-o|--output", VALUE, "archive file ('-' for stdout)", metavar="FILE")],
        func=cmd_save),
    Command("login", "store credentials for a registry", opts=[
        _o("--username", VALUE, metavar="NAME", help="user name"),
        _o("--password", VALUE, metavar="PASSWORD", help="password"),
        _o("--password-stdin", help="read the password from standard input"),
        _o("--registry", VALUE, "registry URL (default: Docker Hub)", metavar="URL")],
        func=cmd_login),
    Command("logout", "forget credentials", opts=[
        _o("-a", help="forget all credentials"),
        _o("--registry", VALUE, "registry URL (default: Docker Hub)", metavar="URL")],
        func=cmd_logout),
    Command("mkrepo", "create a new, empty repository", ["DIR"], func=cmd_mkrepo,
            needs_repo=False),
    Command("setup", "set a container's execution mode and options", ["CONTAINER"], [
        _o("--execmode", VALUE, "P1 P2 R1 R2 R3 F1 F2 F3 F4 S1", metavar="MODE"),
        _o("--force", help="redo the setup"), _o("--purge", help="undo mount points"),
        _o("--fixperm", help="make every file accessible again"),
        _o("--nvidia", help="make the host's NVIDIA libraries available")],
        func=cmd_setup),
])

GENERAL_OPTS = [Opt(*o) for o in [         # every start parses them
    _o("-D|--debug", help="debug messages (and tracebacks)"),
    _o("-q|--quiet", help="errors only"),
    _o("--repo", VALUE, "use this repository directory", metavar="DIR"),
    _o("--config", VALUE, "read this configuration file last", metavar="FILE"),
    _o("--allow-root", dest="allow_root", help="allow running as root"),
    _o("--insecure", help="allow http and unverified TLS"),
    _o("-V|--version", help="show the version"),
    _o("-h|--help", help="show this help"),
]]


# ---- 11.5 General options and help ----


def general_help():
    lines = ["%s %s: run Docker/OCI images as an ordinary user (udocker %s compatible)"
             % (__program__, __version__, COMPAT_VERSION), "",
             "usage: %s [general options] COMMAND [options] [arguments]" % __program__, "",
             "commands:"]
    for name in sorted(COMMANDS):
        lines.append("  %-10s %s" % (name, COMMANDS[name].summary))
    lines += ["", "general options:"]
    for opt in GENERAL_OPTS:
        lines.append("  %-24s %s" % (opt.usage(), opt.help))
    lines += ["", "%s COMMAND --help shows the options of a command." % __program__]
    return "\n".join(lines)


def parse_general(argv):
    """Split argv into (general options, command name or None, command words)."""
    lookup = dict((n, o) for o in GENERAL_OPTS for n in o.names)
    opts = dict((o.dest, None if o.kind == VALUE else False) for o in GENERAL_OPTS)
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if not word.startswith("-") or word == "-":
            return opts, word, argv[i:]
        name, has_value, value = word.partition("=")
        opt = lookup.get(name)
        if opt is None:
            raise UsageError("unknown general option: %s (see: %s --help)"
                             % (word, __program__))
        if opt.kind == FLAG:
            if has_value:
                raise UsageError("option %s takes no value" % name)
            opts[opt.dest] = True
        else:
            if not has_value:
                if i >= len(argv):
                    raise UsageError("option %s needs a value" % name)
                value = argv[i]
                i += 1
            opts[opt.dest] = value
    return opts, None, []


# ==== 12. main ====


def open_closed_standard_streams():
    """A standard descriptor the caller closed (`udocker.py images >&-`) is opened on
    /dev/null: otherwise the next file we open takes its number and an engine writes the
    container's output into it; Python 3 made the stream None. What goes there is dropped."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)      # the lowest free number: fd itself
            fcntl.fcntl(fd, fcntl.F_SETFD, 0)   # inherited, as a standard descriptor is
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))


def main(argv=None, environ=None):
    """Run one udocker.py command; returns the exit code (never raises, except exit)."""
    open_closed_standard_streams()
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    debug = "-D" in argv or "--debug" in argv
    collecting = gc.isenabled()
    try:
        general, name, words = parse_general(argv)
        debug = bool(general["debug"])
        if general["version"] and name is None:
            name, words = "version", []
        if general["help"] or name is None:
            name, words = "help", ([name] if name and general["help"] else [])
        command = COMMANDS.get(name)
        if command is None:
            raise UsageError("invalid command: %s (see: %s help)" % (name, __program__))
        if name == "run" and hasattr(gc, "freeze"):     # (3.7+) thousands of new objects
            gc.disable()    # as its chapters load, no cycle to free: ~10 collections walked
            # them (P1: 0.4M instructions); frozen before it is back on, not walked again
        ChapterLoader.expect(globals(), name)
        if "--help" in words[:len(words) if command.rest is None else 1] or \
                (words[:1] == ["-h"] and command.lookup.get("-h") is None):
            out(command.usage())
            return 0
        opts, args = command.parse(words)
        cfg = Config.load(environ, general)
        MSG.level = cfg.verbose_level
        if os.geteuid() == 0 and not general["allow_root"] and command.needs_repo:
            raise UdockerError("do not run as root ! (use --allow-root if you must)")
        session = Session(cfg, environ)
        if command.needs_repo:
            session.repo.ensure(must_exist=bool(general["repo"]))
        try:
            return command.func(session, opts, args)
        finally:
            if debug:
                MSG.debug(ChapterLoader.report(globals()))
    except OutputClosed as exc:
        return exc.exit_code
    except UdockerError as exc:
        if debug:
            import traceback
            traceback.print_exc()
        MSG.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        MSG.error("interrupted")
        return 130
    except EnvironmentError as exc:
        if debug:
            import traceback
            traceback.print_exc()
        MSG.error("%s%s" % (exc.strerror or exc, (": " + show_name(exc.filename))
                            if getattr(exc, "filename", None) else ""))
        return 1
    except Exception as exc:                   # a bug: still one line, -D shows where
        if debug:
            import traceback
            traceback.print_exc()
        MSG.error("internal error: %s: %s (run with -D for the traceback, and please "
                  "report it)" % (type(exc).__name__, exc))
        return 1
    finally:
        if collecting and not gc.isenabled():
            gc.freeze()
            gc.enable()


def exit_now(code):
    """Exit with code, skipping the interpreter's tear-down (freeing every module and
    object: a few ms at the end of every command); our files are closed by then, and only
    the standard streams need flushing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (IOError, OSError, ValueError) as exc:
            if stream is sys.stdout and getattr(exc, "errno", None) == errno.EPIPE:
                code = code or OutputClosed.exit_code
    os._exit(code)


# ==== 13. Start-up cache ====
# What the launcher (the sh line at the top) runs instead of the whole module, and how it is
# built: see ChapterCache.

class ChapterCache(object):
    """The launcher's cache of this file: the start-up code (every top-level statement, and
    the definitions start-up needs) and one chapter per section or sub-section with the rest
    of its functions and classes, each marshalled apart and loaded on first use
    (ChapterLoader): `run` reads and builds a fraction of the module. Built from the syntax
    tree once per version of the file and Python (the launcher checks the file's mtime and
    size, and the cache's own length).

    A definition stays in the start-up code where a Deferred could not stand in for it:
    named in an `except` clause or as isinstance's class (a Deferred is no class), bound
    twice, or used as the module loads (a base class, a decorator, a call), but not when only
    stored as a value in a table (ENGINES), which keeps the Deferred. A chapter first loads
    the chapters its definitions use as they are made (base classes); chapters that would
    need each other are refused (ValueError: no cache, the module is imported instead)."""

    BANNER = LazyRegex(r"# (?:====|----) (\d+(?:\.\d+)*)\.? ")
    # the loader itself, and what the launcher calls (a chapter that cannot load is then
    # one error line from main, as any other failure)
    ALWAYS = ("ChapterLoader", "Deferred", "Cold", "main", "exit_now",
              "open_closed_standard_streams")
    # command -> the chapters it loads whatever its options (`run`: in every mode), stored
    # once more together, loaded at once as main knows the command (~0.8M instructions
    # fewer than one by one)
    GROUPS = {"run": ("3", "11.1", "5.2", "5.3", "11.3", "9.3.1", "9.3.3", "10.2", "4.4", "9.1",
                      "1", "9.6", "4.1", "10", "9.2.1", "9.4")}
    # functions and methods that `run` does not call as a rule: their chapters hold a Cold
    # stand-in for each, loaded alone on first use (the P1, R1, F1 and F3 runs of a container
    # without options, -D or not, use none; those of 500 bytes or more the other commands,
    # options, first runs and other modes use; tests/test_run.py checks). F3: 0.8M
    # instructions fewer, 0.3 ms (201 interleaved runs)
    COLD = frozenset("""
        show_name _like which sha256_file Platform.parse Platform.matches platform_text
        LocalRepository.check_writable LocalRepository.lock LocalRepository.list_images
        LocalRepository.set_protected LocalRepository.commit_image_v2 LocalRepository._swap_in
        LocalRepository.copy_tag LocalRepository._tag_walk LocalRepository.remove_image
        LocalRepository.writer LocalRepository.sweep LocalRepository.leftovers
        LocalRepository._prune_empty_names LocalRepository._prune_empty
        LocalRepository.store_blob default_execmode ContainerStore.new_id ContainerStore.list
        ContainerStore.check_name ContainerStore.add_name ContainerStore.remove_names_of
        ContainerStore._name_path ContainerStore.remove_name ContainerStore.rename private_dir
        json_text run_capture untranslated_syscalls enosys_filter _process_tree kill_marked
        descendants _thread_children container_init has_reaped process_argv signal_is_handled
        _after read_os_release glibc_needed container_libc_file glibc_version _names_like
        Volume.parse Volume.parse_mount Volume.checked RunContainer.from_location
        RunContainer.run_dir _lookup_group Engine.planned Engine.run_dir Engine.outer_volume
        Engine.nvidia_volumes Engine._read_env_file Engine.forward_signal parse_cpu_list
        set_cpu_affinity parse_publish parse_gpus parse_size Watchdog._fork _spawn
        _engine_child_setup _wait_killing_strays ProotEngine._kernel_option_works probe_command
        probe_runtime_start RuncEngine._subid_ranges RuncEngine._spec_parts
        RuncEngine.forward_signal RuncEngine._init_pid RuncProotEngine.choose_user
        RuncProotEngine.prepare RuncProotEngine.spec RuncProotEngine.process_args
        RuncProotEngine.wait FakechrootEngine.nvidia_volumes FakechrootEngine._nested_link
        FakechrootEngine._symlink_volume FakechrootEngine.setup FakechrootEngine.leave
        FakechrootPatchedEngine.setup FakechrootPatchedEngine.leave mountpoint_links
        set_execmode _none_can_start probe_proot probe_runtime probe_version_word
        probe_libfakechroot probe_singularity Tools.singularity Tools._kind_of Tools._remember
        Session.puller local_image _remove_after_run general_help
    """.split())

    @classmethod
    def write(cls, source_path, cache_path):
        """Build and store the cache; quietly nothing where it cannot be stored (the next
        start imports the whole module, as Python 2.7 always does)."""
        try:
            folder = os.path.dirname(cache_path)
            if not os.path.isdir(folder):
                os.makedirs(folder)
            if not os.access(folder, os.W_OK):
                return False
            # one builder at a time: the ranks of a job started together from a new copy
            # do not all build it (the others run from the module, as this one does)
            with open(cache_path + ".lock", "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                cls._store(source_path, cache_path)
            return True
        except Exception:       # noqa: B902 (a cache: whatever fails, the module still runs)
            return False

    @classmethod
    def _store(cls, source_path, cache_path):
        st = os.stat(source_path)
        with open(source_path, "rb") as stream:
            source = stream.read()
        blobs = []                      # first the COLD functions' own code
        start, names, chapters = cls.build(source, source_path, blobs)
        marshal, index, offset = __import__("marshal"), {}, sum(len(b) for b in blobs)
        blobs.extend(code for _, code in chapters.values())
        for chapter, (needs, code) in chapters.items():
            index[chapter] = (needs, offset, len(code))
            offset += len(code)
        groups = {}
        for command in cls.GROUPS:
            groups[command] = []
            for part in cls.group_parts(cls.group_order(cls.GROUPS[command], chapters),
                                        chapters):
                blobs.append(marshal.dumps(tuple((c, marshal.loads(chapters[c][1]))
                                                 for c in part)))
                groups[command].append((offset, len(blobs[-1])))
                offset += len(blobs[-1])
        # the launcher's check: the source's mtime and size, and the chapters' length
        key = (st.st_mtime_ns, st.st_size, offset)
        header = marshal.dumps((key, start, (names, index, groups)))
        with AtomicFile(cache_path, sync=False) as stream:
            stream.write(b"%d\n" % len(header) + header)
            for blob in blobs:
                stream.write(blob)

    @staticmethod
    def group_order(group, chapters):
        """The chapters of group that exist, each after the chapters of the group it needs
        (as loading them one by one would)."""
        wanted, order = set(group) & set(chapters), []

        def visit(chapter):
            if chapter in wanted and chapter not in order:
                for other in chapters[chapter][0]:
                    visit(other)
                if chapter not in order:
                    order.append(chapter)
        for chapter in group:
            visit(chapter)
        return order

    # a blob read at once is below glibc malloc's mmap threshold (128 KiB): the next one
    # reuses its memory (freed once unmarshalled) instead of fresh pages, each a page
    # fault (~2.4 us on a VM): the run group in two, 45 faults fewer, F3 0.09 ms
    GROUP_PART_BYTES = 96 * 1024

    @classmethod
    def group_parts(cls, order, chapters):
        """order's chapters in runs of at most GROUP_PART_BYTES (a bigger chapter alone)."""
        parts, size = [[]], 0
        for chapter in order:
            if parts[-1] and size + len(chapters[chapter][1]) > cls.GROUP_PART_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(chapter)
            size += len(chapters[chapter][1])
        return parts

    @classmethod
    def stand_ins(cls, ast, body, filename, blobs):
        """body with a Cold stand-in for each def named in COLD (NAME or CLASS.NAME), whose
        own code is appended to blobs (the cache's first ones). A method stays if a
        stand-in cannot do as it: a special method, another decorator, a name bound twice."""
        def stand_in(node, name):
            if node.name.startswith("__") or not all(
                    isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod")
                    for d in node.decorator_list) or name not in cls.COLD:
                return node
            code = cls.marshalled(ast, [node], filename)
            blobs.append(code)
            made = ast.parse("%s = Cold((%r, %d, %d))" % (node.name, name, at[0],
                                                           len(code))).body[0]
            at[0] += len(code)
            for sub in ast.walk(made):
                ast.copy_location(sub, node)
            return made
        at, result = [sum(len(blob) for blob in blobs)], []
        for node in body:
            if isinstance(node, ast.FunctionDef) and not node.decorator_list:
                node = stand_in(node, node.name)
            elif isinstance(node, ast.ClassDef):
                defs = [sub.name for sub in node.body if isinstance(sub, ast.FunctionDef)]
                twice = set(n for n in defs if defs.count(n) > 1)
                changed = [stand_in(sub, node.name + "." + sub.name)
                           if isinstance(sub, ast.FunctionDef) and sub.name not in twice
                           else sub for sub in node.body]
                if any(new is not old for new, old in zip(changed, node.body)):
                    node = ast.copy_location(ast.ClassDef(**dict(
                        ast.iter_fields(node), body=changed)), node)
            result.append(node)
        return [ast.fix_missing_locations(node) for node in result]

    @classmethod
    def build(cls, source, filename, cold=None):
        """(start-up code, {name: chapter}, {chapter: (chapters it needs, marshalled
        code)}) for the launcher and ChapterLoader. With a list as cold, the chapters hold
        stand-ins for the COLD functions, whose code is appended to it (stand_ins)."""
        ast = __import__("ast")
        units = [node for node in ast.parse(source, filename).body
                 if not cls.is_main_guard(ast, node)]
        section = cls.sections(to_text(source).splitlines(), units)
        defines = {}
        for i, node in enumerate(units):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defines.setdefault(node.name, []).append(i)
        deferred = set(i for idx in defines.values() for i in idx if len(idx) == 1)
        bound, guarded = cls.bindings_and_guards(ast, units)
        for name in bound | guarded | set(cls.ALWAYS):
            deferred.difference_update(defines.get(name, ()))
        used = [cls.names_used_at_load(ast, node) for node in units]
        cls.keep_what_start_up_uses(ast, units, deferred, used, defines)
        names, chapters, start = {}, {}, []
        for i, node in enumerate(units):
            if i not in deferred:
                start.append(node)
                if getattr(node, "name", None) == "ChapterLoader":
                    start.append(ast.parse("ChapterLoader.install(globals())").body[0])
                continue
            names[node.name] = section[i]
            chapters.setdefault(section[i], ([], []))[1].append(node)
        for i in deferred:
            needs = chapters[section[i]][0]
            needs.extend(section[j] for name in used[i] for j in defines.get(name, ())
                         if j in deferred and section[j] != section[i]
                         and section[j] not in needs)
        cls.check_order(dict((chapter, needs) for chapter, (needs, _) in chapters.items()))
        if cold is not None:
            for chapter, (needs, body) in sorted(chapters.items()):
                chapters[chapter] = (needs, cls.stand_ins(ast, body, filename, cold))
        compiled = dict((chapter, (tuple(needs), cls.marshalled(ast, body, filename)))
                        for chapter, (needs, body) in chapters.items())
        return cls.compile(ast, start, filename), names, compiled

    @classmethod
    def sections(cls, lines, units):
        """The section (banner number) each top-level statement is in."""
        numbers, current = [], "0"
        banners = dict((n + 1, m.group(1)) for n, m in
                       ((n, cls.BANNER.match(line)) for n, line in enumerate(lines)) if m)
        line = 0
        for node in units:
            while line < node.lineno:
                current = banners.get(line, current)
                line += 1
            numbers.append(current)
        return numbers

    @staticmethod
    def bindings_and_guards(ast, units):
        """Names that statements other than a def or class bind at the top level, and the
        names used as a class in `except` or isinstance/issubclass anywhere (with what the
        top-level tuples they name hold, as NETWORK_ERRORS)."""
        bound, guarded, tables = set(), set(), {}
        for node in units:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    bound.add(sub.name)
                elif isinstance(sub, ast.Name) and not isinstance(sub.ctx, ast.Load):
                    bound.add(sub.id)
                elif isinstance(sub, ast.alias):
                    bound.add((sub.asname or sub.name).split(".")[0])
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        tables[target.id] = set(n.id for n in ast.walk(node.value)
                                                if isinstance(n, ast.Name))
        for sub in ast.walk(ast.Module(body=units)):
            classes = None
            if isinstance(sub, ast.ExceptHandler):
                classes = sub.type
            elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and \
                    sub.func.id in ("isinstance", "issubclass") and len(sub.args) == 2:
                classes = sub.args[1]
            if classes is not None:
                guarded.update(n.id for n in ast.walk(classes) if isinstance(n, ast.Name))
        todo = list(guarded)
        while todo:
            for name in tables.get(todo.pop(), ()):
                if name not in guarded:
                    guarded.add(name)
                    todo.append(name)
        return bound, guarded

    @staticmethod
    def names_used_at_load(ast, node):
        """The names a top-level statement uses as it runs (not in function bodies), less
        those it only stores as a value of a list, tuple, set, dict or call argument."""
        stored = set()
        for sub in ast.walk(node):
            if isinstance(sub, (ast.List, ast.Tuple, ast.Set)):
                stored.update(id(e) for e in sub.elts)
            elif isinstance(sub, ast.Dict):
                stored.update(id(e) for e in sub.values)
            elif isinstance(sub, ast.Call):
                stored.update(id(e) for e in sub.args)
            elif isinstance(sub, ast.keyword):
                stored.add(id(sub.value))
        used, todo = set(), [node]
        while todo:
            sub = todo.pop()
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                todo.extend(getattr(sub, "decorator_list", []))
                todo.extend(sub.args.defaults)
                todo.extend(d for d in getattr(sub.args, "kw_defaults", []) if d is not None)
                continue
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and \
                    id(sub) not in stored:
                used.add(sub.id)
            todo.extend(ast.iter_child_nodes(sub))
        return used

    @staticmethod
    def is_main_guard(ast, node):
        """`if __name__ == "__main__":`, which never runs under the launcher."""
        test = getattr(node, "test", None)
        return isinstance(node, ast.If) and isinstance(test, ast.Compare) and \
            isinstance(test.left, ast.Name) and test.left.id == "__name__"

    @classmethod
    def keep_what_start_up_uses(cls, ast, units, deferred, used, defines):
        """Whatever the start-up code uses as it runs is part of it: a function it calls with
        all that the function uses, a class it makes with what its __init__ uses."""
        todo = [i for i in range(len(units)) if i not in deferred]
        runs = [cls.names_used_when_called(ast, node) for node in units]
        while todo:
            i = todo.pop()
            for name in used[i]:
                for j in defines.get(name, ()):
                    if j in deferred:
                        deferred.discard(j)
                        used[j] = used[j] | runs[j]
                        todo.append(j)

    @staticmethod
    def names_used_when_called(ast, node):
        """Every name a function uses, or a class's __init__ and __new__."""
        if isinstance(node, ast.ClassDef):
            node = ast.Module(body=[sub for sub in node.body if getattr(sub, "name", "") in
                                    ("__init__", "__new__")])
        return set(sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name))

    @staticmethod
    def check_order(needs):
        """ValueError when chapters need each other as they load: no order would do."""
        done, path = set(), []

        def visit(chapter):
            if chapter in path:
                raise ValueError("chapters %s need each other" % " ".join(path))
            if chapter not in done:
                path.append(chapter)
                for other in needs[chapter]:
                    visit(other)
                path.pop()
                done.add(chapter)
        for chapter in needs:
            visit(chapter)

    @staticmethod
    def compile(ast, body, filename):
        """Code without docstrings (nothing reads them; 10% of the bytes to load)."""
        module = ast.Module(body=body, type_ignores=[])
        return compile(module, filename, "exec", dont_inherit=True, optimize=2)

    @classmethod
    def marshalled(cls, ast, body, filename):
        return __import__("marshal").dumps(cls.compile(ast, body, filename))


if __name__ == "__main__":
    exit_now(main())
