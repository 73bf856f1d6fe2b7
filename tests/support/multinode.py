# -*- coding: utf-8 -*-
"""A multi-node Slurm cluster in namespaces, run as the calling user.

    cluster = MultiNodeCluster(workdir, nodes=3).start()    # ~2-3 s
    cluster.nodes                ["n1", "n2", "n3"]
    cluster.shared               WORKDIR/shared: the same path, the same
                                 files, on the head, every node and here
    cluster.run(["srun", "-N", "3", "hostname"])   (on the head node)
    cluster.on_node("n2", argv)  run argv on node n2
    cluster.registry_host(reg)   "head:PORT": the loopback registry reg as
                                 the nodes reach it (relayed, plain http)
    cluster.stop()
    and everything of support.slurm.SlurmCluster (submit, wait, sacct, ...)

One holder process (HOLDER below, Python 2.7 and 3, ctypes) makes a user
namespace with newuidmap/newgidmap (root inside is the first subordinate id,
the user is mapped to itself, so the daemons, the jobs and every file they
write belong to the user, here and inside) together with a pid, net, mount,
uts and ipc namespace; in the pid namespace its child, pid 1, is the head
node: /proc of the new pid namespace, /etc/hosts (head and the nodes) bound
over the host's, a bridge br0 at 10.199.0.254/24, loopback up. Each node
n1..nN is a process that unshares a net, uts and mount namespace of its own
from the head's: hostname nI, a veth pair into the bridge with 10.199.0.I,
its own tmpfs on /tmp (where slurmd keeps its spool), and WORKDIR bound back
at the same path on top of it, so WORKDIR (logs, sockets, the shared
directory) is the same everywhere. Nothing of the machine's network is
touched: the bridge and the addresses exist only in the namespace.

Daemons and commands enter with `nsenter -t PID -U -p -n -m -u -i
--preserve-credentials`, as the user: munged, mariadbd, slurmdbd and
slurmctld on the head, slurmd -N nI on node I. Not `ip netns exec`: it
remounts /sys, without the cgroup mount slurmd wants.

The cluster cannot outlive the test: pid 1 of the pid namespace reads the
lifeline pipe whose other end only this process holds (close-on-exec), and
exits when it closes (stop(), or this process dying) or after the time
limit; the kernel then kills every process of the namespace, whatever node
it is on, jobs and containers included.

The loopback registry reaches the nodes through two relays (RELAY below): one
here from a unix socket in WORKDIR to 127.0.0.1:PORT, one on the head from
head:PORT (the bridge) to that socket; a unix socket path crosses network
namespaces, a TCP connection does not.

Only hosts that forbid unprivileged user namespaces (or give the user no
subordinate id range) cannot run it: start() raises NamespacesUnavailable
then, with the reason.
"""

from __future__ import print_function, absolute_import, division

import fcntl
import os
import re
import select
import subprocess
import sys
import time

from . import SupportError, free_port, which
from .procs import Process
from .slurm import (_SLURM_CONF, _SLURMDBD_CONF, KILL_WAIT, MAX_LIFETIME,
                    SlurmCluster, node_line, run_command)

SUBNET = "10.199.0"           # the bridge's /24: head .254, node I .I
HEAD_ADDR = SUBNET + ".254"
NAMESPACE_PROGRAMS = ("nsenter", "newuidmap", "newgidmap", "ip")


class NamespacesUnavailable(SupportError):
    """The host does not let this user build the cluster's namespaces."""


# The holder: argv is one JSON document (see MultiNodeCluster._holder_config).
# stdin is the lifeline, stdout reports "holder PID" (pid 1's pid outside),
# "node NAME PID" (inside) and "ready", or "forbidden TEXT" (the host does not
# let the user make the user namespace or map its ids) or "error TEXT".
HOLDER = r'''
import ctypes, json, os, select, socket, subprocess, sys, time
cfg = json.loads(sys.argv[1])
NEWNS, NEWUTS, NEWIPC = 0x20000, 0x4000000, 0x8000000
NEWUSER, NEWPID, NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = \
    2, 4, 8, 4096, 16384, 1 << 18
libc = ctypes.CDLL(None, use_errno=True)

def report(line):
    os.write(1, (line + "\n").encode())

def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))

def unshare(flags):
    check(libc.unshare(flags), "unshare")

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)),
          "mount %s on %s" % (src, target))

def sethostname(name):
    check(libc.sethostname(name.encode(), len(name)), "sethostname")

def sh(*argv):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.communicate()[0]
    if proc.returncode != 0:
        raise OSError(0, "%s: %s" % (" ".join(argv), out.decode().strip()))

def map_ids(pid, go):
    """In a child: wait for go, write pid's uid and gid maps."""
    os.read(go, 1)
    try:
        for tool, own, sub in (("newuidmap", cfg["uid"], cfg["subuid"]),
                               ("newgidmap", cfg["gid"], cfg["subgid"])):
            sh(tool, str(pid), "0", str(sub), "1", str(own), str(own), "1")
    except OSError as exc:
        report("forbidden %s" % exc.strerror)
        os._exit(1)
    os._exit(0)

def node(index, ready):
    """A node: its own net, uts and mount namespace; /tmp its own."""
    unshare(NEWNET | NEWUTS | NEWNS)
    sethostname("n%d" % index)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep = os.open(cfg["workdir"], os.O_RDONLY)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.makedirs(cfg["workdir"])
    mount("/proc/self/fd/%d" % keep, cfg["workdir"], None, MS_BIND | MS_REC)
    os.close(keep)
    os.write(ready, b"x")
    while True:
        time.sleep(3600)

def head():
    """pid 1: mounts, the bridge, the nodes; then wait on the lifeline."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(cfg["hosts"], "/etc/hosts", None, MS_BIND)
    sethostname("head")
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "addr", "add", cfg["subnet"] + ".254/24", "dev", "br0")
    sh("ip", "link", "set", "br0", "up")
    for index in range(1, cfg["nodes"] + 1):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                node(index, wfd)
            except OSError as exc:
                report("error node %d: %s" % (index, exc.strerror))
            os._exit(1)
        os.close(wfd)
        if os.read(rfd, 1) != b"x":
            raise OSError(0, "node %d did not start" % index)
        os.close(rfd)
        veth = "v%d" % index
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
           "netns", str(pid))
        sh("ip", "link", "set", veth, "master", "br0", "up")
        inside = ["nsenter", "-t", str(pid), "-n", "ip"]
        sh(*(inside + ["addr", "add", "%s.%d/24" % (cfg["subnet"], index),
                       "dev", "eth0"]))
        sh(*(inside + ["link", "set", "eth0", "up"]))
        sh(*(inside + ["link", "set", "lo", "up"]))
        report("node n%d %d" % (index, pid))
    report("ready")
    deadline = time.time() + cfg["lifetime"]
    while time.time() < deadline:
        readable = select.select([0], [], [], min(1.0, deadline - time.time()))[0]
        if readable and not os.read(0, 4096):
            break                                       # lifeline closed
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:    # orphans come here
                pass
        except OSError:
            pass

try:
    go_r, go_w = os.pipe()
    mapper = os.fork()
    if mapper == 0:
        os.close(go_w)
        map_ids(os.getppid(), go_r)
    os.close(go_r)
    try:
        unshare(NEWUSER | NEWPID | NEWNET | NEWNS | NEWUTS | NEWIPC)
    except OSError as exc:
        report("forbidden %s" % exc.strerror)
        sys.exit(1)
    finally:
        os.write(go_w, b"x")
    if os.waitpid(mapper, 0)[1] != 0:
        sys.exit(1)
    os.setgroups([])
    os.setgid(0)
    os.setuid(0)
    libc.prctl(4, 1, 0, 0, 0)          # PR_SET_DUMPABLE, lost with setuid
    pid1 = os.fork()
    if pid1 == 0:
        try:
            head()
        except OSError as exc:
            report("error %s" % (exc.strerror or exc))
            os._exit(1)
        os._exit(0)
    report("holder %d" % pid1)
    sys.exit(os.waitpid(pid1, 0)[1] >> 8)
except OSError as exc:
    report("error %s" % (exc.strerror or exc))
    sys.exit(1)
'''

# A TCP or unix socket relay: argv LISTEN TARGET, each "tcp:HOST:PORT" or
# "unix:PATH"; prints "relay ready" once it listens.
RELAY = r'''
import os, socket, sys, threading

def address(spec):
    kind, rest = spec.split(":", 1)
    if kind == "unix":
        return socket.AF_UNIX, rest
    host, port = rest.rsplit(":", 1)
    return socket.AF_INET, (host, int(port))

def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except socket.error:
        pass
    for sock in (src, dst):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except socket.error:
            pass

def serve(conn):
    family, target = address(sys.argv[2])
    out = socket.socket(family, socket.SOCK_STREAM)
    try:
        out.connect(target)
    except socket.error:
        conn.close()
        return
    for src, dst in ((conn, out), (out, conn)):
        thread = threading.Thread(target=pump, args=(src, dst))
        thread.daemon = True
        thread.start()

family, listen = address(sys.argv[1])
server = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_INET:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(listen)
server.listen(64)
sys.stdout.write("relay ready\n")
sys.stdout.flush()
while True:
    serve(server.accept()[0])
'''


def _subordinate(path, name, uid):
    """The first id of the user's range in /etc/subuid or /etc/subgid."""
    try:
        with open(path) as idf:
            for line in idf:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[0] in (name, str(uid)) and \
                        fields[1].isdigit() and int(fields[2]) > 0:
                    return int(fields[1])
    except (IOError, OSError):
        pass
    raise NamespacesUnavailable("no range for %s in %s" % (name, path))


class MultiNodeCluster(SlurmCluster):
    """Slurm with a head node and `nodes` compute nodes in namespaces; see
    the module docstring."""

    def __init__(self, workdir, nodes=3, lifetime=MAX_LIFETIME):
        SlurmCluster.__init__(self, workdir, cluster_name="udmulti")
        self.nodes = ["n%d" % i for i in range(1, nodes + 1)]
        self.shared = os.path.join(self.workdir, "shared")
        self.lifetime = lifetime
        self.node_pids = {}          # name -> pid (outside) of its holder
        self.head_pid = None         # pid 1 of the namespace, outside
        self.start_seconds = None    # how long start() took
        self._holder = None
        self._lifeline = None
        self._relays = []

    # -- namespaces -----------------------------------------------------------

    def start(self, timeout=60.0):
        began = time.time()
        self._make_dirs()
        try:
            self._start(time.time() + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.time() - began
        return self

    def _make_dirs(self):
        self.run_dir = os.path.join(self.workdir, "run")   # sockets
        for sub in ("etc", "log", "state", "jobs", "db", "run", "shared"):
            path = os.path.join(self.workdir, sub)
            if not os.path.isdir(path):
                os.makedirs(path)

    def start_namespaces(self, timeout=60.0):
        """Only the namespaces (the nodes without Slurm); return self."""
        self._make_dirs()
        try:
            self._start_namespaces(time.time() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline):
        self._start_namespaces(deadline)
        base = {"workdir": self.workdir, "run": self.run_dir,
                "user": self.user, "addr": HEAD_ADDR,
                "cluster": self.cluster_name, "kill_wait": KILL_WAIT,
                "munge_socket": os.path.join(self.run_dir, "munge.socket"),
                "ctld_port": free_port(), "slurmd_port": free_port(),
                "dbd_port": free_port(), "node": node_line(),
                "gres_types": ""}
        self.cpus = int(re.search(r"CPUs=(\d+)", base["node"]).group(1))
        self.env = self._environ()
        self._write_configs(base)
        self._start_munge(base["munge_socket"], deadline)
        mysql_socket = self._start_mariadb(deadline)
        self._spawn("slurmdbd", ["slurmdbd", "-D"],
                    {"MYSQL_UNIX_PORT": mysql_socket})
        self._wait(deadline, "slurmdbd",
                   lambda: self._listening(base["dbd_port"]))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(deadline, "slurmctld",
                   lambda: self._listening(base["ctld_port"]))
        for name in self.nodes:
            self._spawn("slurmd-" + name, ["slurmd", "-D", "-N", name],
                        node=name)
        self._wait(deadline, "slurmd-" + self.nodes[-1], self._node_idle)

    def _holder_config(self):
        import json
        import pwd
        name = pwd.getpwuid(os.getuid()).pw_name
        hosts = os.path.join(self.workdir, "etc", "hosts")
        with open(hosts, "w") as hostsf:
            hostsf.write("127.0.0.1 localhost\n%s head\n" % HEAD_ADDR)
            for index, node in enumerate(self.nodes, 1):
                hostsf.write("%s.%d %s\n" % (SUBNET, index, node))
        return json.dumps({
            "uid": os.getuid(), "gid": os.getgid(),
            "subuid": _subordinate("/etc/subuid", name, os.getuid()),
            "subgid": _subordinate("/etc/subgid", name, os.getuid()),
            "nodes": len(self.nodes), "workdir": self.workdir,
            "hosts": hosts, "subnet": SUBNET, "lifetime": self.lifetime})

    def _start_namespaces(self, deadline):
        """Start the holder; fill head_pid and node_pids."""
        missing = [p for p in NAMESPACE_PROGRAMS if not which(p)]
        if missing:
            raise SupportError("%s not found: apt-get install util-linux uidmap "
                               "iproute2" % ", ".join(missing))
        config = self._holder_config()
        lifeline_r, lifeline_w = os.pipe()
        fcntl.fcntl(lifeline_w, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        log = open(os.path.join(self.log_dir, "holder.log"), "ab")
        self._holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, config], stdin=lifeline_r,
            stdout=subprocess.PIPE, stderr=log, close_fds=True,
            preexec_fn=os.setsid)
        os.close(lifeline_r)
        log.close()
        self._lifeline = lifeline_w
        inner = {}
        for line in self._holder_lines(deadline):
            words = line.split()
            if words and words[0] == "forbidden":
                raise NamespacesUnavailable(
                    "this host does not let %s make a user namespace with its "
                    "subordinate ids: %s" % (self.user, line.split(" ", 1)[-1]))
            if not words or words[0] == "error":
                raise SupportError("cannot build the cluster's namespaces: %s"
                                   % (line[6:] or "the holder exited (%s)"
                                      % self._logs("holder")))
            if words[0] == "holder":
                self.head_pid = int(words[1])
            elif words[0] == "node":
                inner[int(words[2])] = words[1]
            elif words[0] == "ready":
                break
        for pid in _children(self.head_pid):
            nspid = _nspid(pid)
            if nspid in inner:
                self.node_pids[inner[nspid]] = pid
        if sorted(self.node_pids) != sorted(self.nodes):
            raise SupportError("nodes not found: %r" % inner)

    def _holder_lines(self, deadline):
        """The holder's report lines (text) as they come; "" at its end."""
        fd, pending = self._holder.stdout.fileno(), b""
        while True:
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield line.decode("utf-8", "replace").strip()
            if not select.select([fd], [], [], max(deadline - time.time(),
                                                   0))[0]:
                raise SupportError("the namespace holder did not get ready")
            data = os.read(fd, 4096)
            if not data:
                yield ""
                return
            pending += data

    def enter(self, node=None, cwd=None):
        """The nsenter words that run a command on node (None: the head)
        as the user, in cwd (default: the jobs directory)."""
        pid = self.node_pids[node] if node else self.head_pid
        return [which("nsenter"), "-t", str(pid), "-U", "-p", "-n", "-m",
                "-u", "-i", "--preserve-credentials",
                "--wd=" + (cwd or self.jobs_dir)]

    def _listening(self, port):
        rc, out, _ = run_command(self.enter() + [
            sys.executable, "-c", "import socket; socket.create_connection("
            "(%r, %d), 1).close()" % (HEAD_ADDR, port)], timeout=30)
        return rc == 0

    # -- what SlurmCluster does, in the namespaces ---------------------------

    def _write_configs(self, base):
        text = _SLURM_CONF % base
        replace = {
            "SlurmctldHost": "head(%s)" % HEAD_ADDR,
            "CommunicationParameters": None,     # the network is private
            "SlurmdSpoolDir": "/tmp/slurmd-spool",        # the node's /tmp
            "SlurmdPidFile": "/tmp/slurmd.pid",
            "SlurmdLogFile": os.path.join(self.log_dir, "slurmd-%n.log"),
            "AccountingStorageHost": "head", "PartitionName": None,
            "NodeName": None}
        lines = []
        for line in text.splitlines():
            key = line.split("=", 1)[0]
            if key in replace:
                if replace[key] is not None:
                    lines.append("%s=%s" % (key, replace[key]))
                continue
            lines.append(line)
        fields = base["node"].split(None, 1)[1]
        for index, name in enumerate(self.nodes, 1):
            lines.append("NodeName=%s NodeAddr=%s.%d %s State=UNKNOWN"
                         % (name, SUBNET, index, fields))
        lines.append("PartitionName=debug Nodes=%s Default=YES "
                     "MaxTime=INFINITE State=UP" % ",".join(self.nodes))
        with open(self.conf_path, "w") as conf:
            conf.write("\n".join(lines) + "\n")
        with open(os.path.join(self.workdir, "plugstack.conf"), "w"):
            pass
        dbd_conf = os.path.join(os.path.dirname(self.conf_path),
                                "slurmdbd.conf")
        with open(dbd_conf, "w") as conf:
            conf.write(_SLURMDBD_CONF.replace("DbdHost=localhost",
                                              "DbdHost=head")
                       .replace("CommunicationParameters=NoInAddrAny\n", "")
                       % base)
        os.chmod(dbd_conf, 0o600)

    def _spawn(self, name, argv, extra_env=None, node=None):
        env = dict(self.env)
        env.update(extra_env or {})
        argv = self.enter(node, self.workdir) + [which(argv[0])] + \
            list(argv[1:])
        proc = Process(argv, os.path.join(self.log_dir, name + ".out"),
                       cwd=self.workdir, env=env, max_lifetime=self.lifetime)
        self._procs.append((name, proc))
        return proc

    def _node_idle(self):
        rc, out, _ = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=30)
        return rc == 0 and out.split() == ["idle"] * len(self.nodes)

    def run(self, argv, env=None, cwd=None, timeout=120, input=None):
        return self.on_node(None, argv, env, cwd, timeout, input)

    def on_node(self, node, argv, env=None, cwd=None, timeout=120,
                input=None):
        """Run argv on node (None: the head) with self.env plus env (None
        values remove a variable); return (rc, out, err)."""
        return run_command(self.enter(node, cwd) + [str(a) for a in argv],
                           env=self.command_env(env), timeout=timeout,
                           input=input)

    def registry_host(self, registry):
        """host:port under which the nodes reach registry (a loopback
        registry of this process): relays started on first use."""
        port = int(registry.host.rsplit(":", 1)[1])
        if not self._relays:
            sock = os.path.join(self.run_dir, "registry.sock")
            self._relay("relay-out", ["unix:" + sock,
                                      "tcp:127.0.0.1:%d" % port])
            self._relay("relay-in", ["tcp:%s:%d" % (HEAD_ADDR, port),
                                     "unix:" + sock], self.enter(None))
        return "head:%d" % port

    def _relay(self, name, args, prefix=()):
        proc = Process(list(prefix) + [sys.executable, "-c", RELAY] + args,
                       os.path.join(self.log_dir, name + ".log"),
                       max_lifetime=self.lifetime)
        self._relays.append(proc)
        deadline = time.time() + 30
        while "relay ready" not in proc.log_tail():
            if not proc.alive() or time.time() > deadline:
                raise SupportError("%s did not start:\n%s"
                                   % (name, proc.log_tail()))
            time.sleep(0.02)

    def node_of(self, pid):
        """The node (name, or "head") whose network namespace pid is in, or
        None if it is in none of them."""
        try:
            net = os.readlink("/proc/%d/ns/net" % pid)
        except OSError:
            return None
        for name, holder in list(self.node_pids.items()) + \
                [("head", self.head_pid)]:
            try:
                if os.readlink("/proc/%d/ns/net" % holder) == net:
                    return name
            except OSError:
                pass
        return None

    def stop(self):
        """Close the lifeline: pid 1 exits and the kernel kills every
        process of the cluster; then stop the watchdogs and relays."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._holder is not None:
            deadline = time.time() + 10
            while self._holder.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            if self._holder.poll() is None:
                os.killpg(self._holder.pid, 9)
                self._holder.wait()
            self._holder.stdout.close()
            self._holder = None
        while self._procs:
            self._procs.pop()[1].stop()
        while self._relays:
            self._relays.pop().stop()

    def alive(self):
        """True while pid 1 of the cluster runs."""
        return self._holder is not None and self._holder.poll() is None


def _children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as childf:
            return [int(p) for p in childf.read().split()]
    except (IOError, OSError):
        return []


def _nspid(pid):
    """pid's pid in its own (innermost) pid namespace."""
    try:
        with open("/proc/%d/status" % pid) as statusf:
            for line in statusf:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (IOError, OSError, ValueError):
        pass
    return None
