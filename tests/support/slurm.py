# -*- coding: utf-8 -*-
"""A real single-node Slurm cluster on 127.0.0.1, run as the calling user.

    cluster = SlurmCluster(workdir).start()   # munged, mariadbd, slurmdbd,
                                              # slurmctld, slurmd: ~3 s
    cluster.env                 environment for sbatch/srun/sacct/... calls
    job = cluster.submit("#!/bin/sh\\nexit 42\\n", ["--array=1-4%2"])
    cluster.wait(job, timeout=120)            -> "FAILED" (see wait())
    cluster.sacct(job)          -> [{"JobID": "7", "State": "FAILED",
                                     "ExitCode": "42:0", "TotalCPU": ...}]
    cluster.output(job)         the job's stdout+stderr (default --output)
    cluster.run(["srun", "-n", "2", "hostname"]) -> (rc, out, err)
    cluster.scancel(job); cluster.job_pids(job); find_processes(marker);
    processes_left(marker)
    cluster.stop()
    SlurmCluster(workdir, gpus=2)   the node has two (fake) GPUs, see below

Everything is Debian 12's packages (slurm-wlm 22.05, slurmdbd, munge,
mariadb-server), run unprivileged; nothing outside workdir and a short
directory under /tmp (sockets and the slurmd spool: unix socket paths must
stay under 108 bytes) is written. What it takes to run them as a non-root
user (all found by trying, on Debian 12):

munged    `munged -F --force --socket=S --key-file=K --pid-file=P
          --seed-file=F --log-file=L --num-threads=10`: --force because munged
          wants every directory above the socket to be world-searchable and
          pytest's basetemp is 0700; the key is 1 KiB of /dev/urandom, 0400.
mariadbd  `mariadb-install-db --no-defaults --auth-root-authentication-
          method=normal --datadir=D --skip-test-db` (0.6 s), then `mariadbd
          --no-defaults --datadir=D --socket=S --skip-networking ...`: no TCP
          at all; root@localhost has no password.
slurmdbd  `slurmdbd -D`, slurmdbd.conf (0600, next to slurm.conf) with
          StorageHost=localhost StorageUser=root, and MYSQL_UNIX_PORT=S in its
          environment: the MariaDB client library takes the socket from there.
          CommunicationParameters=NoInAddrAny makes it bind the address the
          host name resolves to (127.0.0.1 on the test machines) instead of
          0.0.0.0.
slurmctld `slurmctld -D -i`; slurmd `slurmd -D -N localhost`. SlurmUser and
          SlurmdUser are the test user (the "Not running as root" notices are
          harmless); ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
          (cgroups need root); AuthInfo=socket=S for the daemons and the
          commands, AccountingStoragePass=S for the controller's and sacct's
          connection to slurmdbd (without it they use /run/munge);
          CommunicationParameters=NoInAddrAny,NoCtldInAddrAny binds slurmd,
          slurmctld and srun to 127.0.0.1 (NodeAddr / SlurmctldHost address).
          The cluster registers itself in slurmdbd; no sacctmgr call needed.
          jobacct_gather/linux plus slurmdbd gives sacct its ExitCode and
          TotalCPU (jobcomp/filetxt does not feed sacct in 22.05).
          KillWait=5: scancel and time limits send SIGTERM, then SIGKILL 5 s
          later. SchedulerParameters=sched_interval=1,batch_sched_delay=0:
          a job starts within a second of sbatch (3 s by default), and the
          next tasks of a throttled array within a second of the previous
          ones (2-3 s otherwise: their start waits for the periodic pass).
          sacct still lags the controller by up to ~5 s for array tasks.
          proctrack/linuxproc finds a job's processes by walking down the
          process tree from slurmstepd: a process whose parent died is
          re-parented to init and escapes the SIGKILL (the SIGTERM reached
          it, it reaches every process of the job at once). Real clusters
          use proctrack/cgroup, which misses nothing; a job that waits for
          its children (as udocker.py run must) is safe under both.
GPUs      gpus=N: GresTypes=gpu, the node's Gres=gpu:N and a gres.conf next
          to slurm.conf with AutoDetect=off and one `Name=gpu File=F` per
          GPU, F being WORKDIR/gpu/nvidiaK (cluster.gpu_files), a symlink to
          one of GPU_DEVICES. slurmd 22.05 wants a character or block device
          there: with a regular file it logs "error: F is not a valid
          character or block device, fix your gres.conf", still runs the
          jobs, and gives them no CUDA_VISIBLE_DEVICES. It follows symlinks,
          and any device will do: every user may stat /dev/zero and
          /dev/full. A job or step with --gres=gpu:K gets
          CUDA_VISIBLE_DEVICES, GPU_DEVICE_ORDINAL and SLURM_JOB_GPUS (srun:
          SLURM_STEP_GPUS) = the indexes of its GPUs in gres.conf order
          ("0", "1" or "0,1"; not the number in the file name); a job without
          --gres gets none of them. Nothing confines a job to its GPUs (that
          is the cgroup device controller's job: ConstrainDevices=yes).

Nothing survives a killed test run: every daemon runs under procs.Process
(a watchdog that stops it when this process disappears, and a timeout), and
a janitor process of the same kind kills, when it is stopped, every process
whose environment carries this cluster's marker (UDOCKER_TEST_SLURM=workdir;
the daemons, slurmstepd and the jobs have it) and every process in the same
session as one of those (a container that cleared its environment).
"""

from __future__ import print_function, absolute_import, division

import os
import re
import shutil
import socket
import sys
import tempfile
import time

from . import LOOPBACK, SupportError, free_port, run_in_session, to_text, which
from .procs import Process

MARKER_VAR = "UDOCKER_TEST_SLURM"
PACKAGES = ("slurm-wlm slurmdbd munge mariadb-server openmpi-bin "
            "libopenmpi-dev")
PROGRAMS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd",
           "slurmctld", "slurmd", "sbatch", "sacct")
TERMINAL_STATES = frozenset([
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED"])
SACCT_FIELDS = ("JobID", "JobIDRaw", "JobName", "State", "ExitCode",
                "DerivedExitCode", "TotalCPU", "UserCPU", "SystemCPU",
                "Elapsed", "Start", "End", "NTasks", "AllocCPUS", "NodeList")
KILL_WAIT = 5  # seconds between SIGTERM and SIGKILL (scancel, time limit)
GPU_DEVICES = ("/dev/zero", "/dev/full")  # what the fake GPUs' files point to
MAX_LIFETIME = 4 * 3600  # seconds the daemons may live (a whole test session)

_SLURM_CONF = """\
# generated by tests/support/slurm.py
ClusterName=%(cluster)s
SlurmctldHost=localhost(%(addr)s)
SlurmUser=%(user)s
SlurmdUser=%(user)s
SlurmctldPort=%(ctld_port)d
SlurmdPort=%(slurmd_port)d
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
AuthInfo=socket=%(munge_socket)s
CredType=cred/munge
StateSaveLocation=%(workdir)s/state
SlurmdSpoolDir=%(run)s/spool
SlurmctldPidFile=%(run)s/slurmctld.pid
SlurmdPidFile=%(run)s/slurmd.pid
SlurmctldLogFile=%(workdir)s/log/slurmctld.log
SlurmdLogFile=%(workdir)s/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
DebugFlags=NO_CONF_HASH
PlugStackConfig=%(workdir)s/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=%(dbd_port)d
AccountingStoragePass=%(munge_socket)s
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerParameters=sched_interval=1,batch_sched_delay=0
ReturnToService=2
KillWait=%(kill_wait)d
InactiveLimit=0
MinJobAge=600
MailProg=/bin/true
TmpFS=/tmp
%(gres_types)s%(node)s NodeAddr=%(addr)s State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

_SLURMDBD_CONF = """\
# generated by tests/support/slurm.py
AuthType=auth/munge
AuthInfo=socket=%(munge_socket)s
DbdHost=localhost
DbdAddr=%(addr)s
DbdPort=%(dbd_port)d
CommunicationParameters=NoInAddrAny
SlurmUser=%(user)s
PidFile=%(run)s/slurmdbd.pid
LogFile=%(workdir)s/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
"""

# Runs until SIGTERM, then kills what carries the marker (see the module
# docstring) and removes directories. Python 2.7 and 3;
# argv: MARKER_VAR=value [DIRECTORY...].
_JANITOR = r'''
import os, shutil, signal, sys, time
marker = sys.argv[1].encode()
uid = os.getuid()

def ancestors():
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (IOError, OSError, ValueError, IndexError):
            break
    return pids

def sweep():
    keep = ancestors()
    marked, sessions, ours = set(), {}, set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                sessions[pid] = int(f.read().rsplit(b")", 1)[1].split()[3])
            if pid in keep or os.stat("/proc/%d" % pid).st_uid != uid:
                continue
            ours.add(pid)
            with open("/proc/%d/environ" % pid, "rb") as f:
                if marker in f.read().split(b"\0"):
                    marked.add(pid)
        except (IOError, OSError, ValueError, IndexError):
            pass
    # the sessions of the marked processes, but never ours or our callers'
    doomed_sids = set(sessions[p] for p in marked) - set([0, 1])
    doomed_sids -= set(sessions.get(p) for p in keep)
    victims = marked | set(p for p in ours if sessions.get(p) in doomed_sids)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(victims)

def stop(signum, frame):
    sweep()
    time.sleep(0.2)
    sweep()
    for path in sys.argv[2:]:
        shutil.rmtree(path, ignore_errors=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGHUP, stop)
sys.stdout.write("janitor ready\n")
sys.stdout.flush()
while True:
    time.sleep(3600)
'''


def run_command(argv, env=None, cwd=None, timeout=120, input=None):
    """Run argv in its own session; return (rc, out, err) as text. On
    timeout the whole session is killed and SupportError is raised."""
    rc, out, err, expired = run_in_session(argv, input, timeout, env, cwd)
    out, err = to_text(out, errors="replace"), to_text(err, errors="replace")
    if expired:
        raise SupportError("%s: timed out after %s s\n%s%s"
                           % (" ".join(argv), timeout, out[-2000:],
                              err[-2000:]))
    return rc, out, err


def _proc_stat(pid):
    """(ppid, sid) of pid from /proc, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as statf:
            fields = statf.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[3])
    except (IOError, OSError, ValueError, IndexError):
        return None


def _proc_read(pid, name):
    try:
        with open("/proc/%d/%s" % (pid, name), "rb") as procf:
            return procf.read()
    except (IOError, OSError):
        return b""


def find_processes(marker, uid=None):
    """Processes of uid (default: ours) with marker (text) in their command
    line (arguments joined by spaces) or environment (NAME=VALUE entries
    separated by NULs): [(pid, command line text)], this process and its
    ancestors excluded."""
    uid = os.getuid() if uid is None else uid
    needle = marker.encode("utf-8")
    skip, pid = set(), os.getpid()
    while pid > 1:
        skip.add(pid)
        stat = _proc_stat(pid)
        if stat is None:
            break
        pid = stat[0]
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        pid = int(name)
        try:
            if os.stat("/proc/%d" % pid).st_uid != uid:
                continue
        except OSError:
            continue
        cmdline = _proc_read(pid, "cmdline").replace(b"\0", b" ").strip()
        if needle in cmdline or needle in _proc_read(pid, "environ"):
            found.append((pid, to_text(cmdline, errors="replace")))
    return sorted(found)


def processes_left(marker, timeout=15.0):
    """find_processes(marker) once it is empty, or what is still there after
    timeout seconds (a SIGKILLed process may take a moment to go)."""
    deadline = time.time() + timeout
    found = find_processes(marker)
    while found and time.time() < deadline:
        time.sleep(0.1)
        found = find_processes(marker)
    return found


def session_processes(sid):
    """Pids of the processes in session sid."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and stat[1] == sid:
                pids.append(int(name))
    return sorted(pids)


def missing_programs():
    """Names of the programs of the cluster that are not installed."""
    return [name for name in PROGRAMS if not which(name)]


def node_line():
    """'NodeName=localhost CPUs=.. Boards=.. ...' from `slurmd -C`."""
    rc, out, err = run_command([which("slurmd"), "-C"], timeout=30)
    for line in out.splitlines():
        if line.startswith("NodeName="):
            fields = [f for f in line.split()
                      if f.split("=")[0] in ("CPUs", "Boards",
                                             "SocketsPerBoard",
                                             "CoresPerSocket",
                                             "ThreadsPerCore")]
            return " ".join(["NodeName=localhost"] + fields)
    raise SupportError("slurmd -C printed no NodeName line (rc %d):\n%s%s"
                       % (rc, out, err))


def _connectable(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect((LOOPBACK, port))
        return True
    except (socket.error, OSError):
        return False
    finally:
        sock.close()


class SlurmCluster(object):
    """munged, mariadbd, slurmdbd, slurmctld and one slurmd; see the module
    docstring."""

    def __init__(self, workdir, cluster_name="udtest", gpus=0):
        if gpus > len(GPU_DEVICES):
            raise SupportError("at most %d fake GPUs" % len(GPU_DEVICES))
        self.workdir = os.path.abspath(workdir)
        self.cluster_name = cluster_name
        self.gpu_files = [os.path.join(self.workdir, "gpu", "nvidia%d" % i)
                          for i in range(gpus)]   # gres.conf File= (GPU i)
        self.user = _user_name()
        self.run_dir = None          # short directory: sockets, slurmd spool
        self.conf_path = os.path.join(self.workdir, "etc", "slurm.conf")
        self.log_dir = os.path.join(self.workdir, "log")
        self.jobs_dir = os.path.join(self.workdir, "jobs")
        self.env = None
        self.cpus = None
        self._procs = []             # [(name, Process)], start order
        self._janitor = None
        self._count = 0

    # -- start and stop ------------------------------------------------------

    def start(self, timeout=60.0):
        """Start the daemons, wait until the node is idle; return self.
        Raises SupportError (with the relevant log) on failure."""
        missing = missing_programs()
        if missing:
            raise SupportError(
                "Slurm test cluster: %s not found: apt-get install %s"
                % (", ".join(missing), PACKAGES))
        for sub in ("etc", "log", "state", "jobs", "db"):
            path = os.path.join(self.workdir, sub)
            if not os.path.isdir(path):
                os.makedirs(path)
        self.run_dir = tempfile.mkdtemp(prefix="udslurm-", dir="/tmp")
        os.makedirs(os.path.join(self.run_dir, "spool"))
        try:
            self._start(time.time() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline):
        base = {"workdir": self.workdir, "run": self.run_dir,
                "user": self.user, "addr": LOOPBACK,
                "cluster": self.cluster_name, "kill_wait": KILL_WAIT,
                "munge_socket": os.path.join(self.run_dir, "munge.socket"),
                "ctld_port": free_port(), "slurmd_port": free_port(),
                "dbd_port": free_port(), "node": node_line(),
                "gres_types": "GresTypes=gpu\n" if self.gpu_files else ""}
        if self.gpu_files:
            base["node"] += " Gres=gpu:%d" % len(self.gpu_files)
        self.cpus = int(re.search(r"CPUs=(\d+)", base["node"]).group(1))
        self.env = self._environ()
        self._janitor = janitor(self.workdir,
                                os.path.join(self.log_dir, "janitor.log"),
                                [self.run_dir])
        self._write_configs(base)
        self._start_munge(base["munge_socket"], deadline)
        mysql_socket = self._start_mariadb(deadline)
        self._spawn("slurmdbd", ["slurmdbd", "-D"],
                    {"MYSQL_UNIX_PORT": mysql_socket})
        self._wait(deadline, "slurmdbd", lambda: _connectable(base["dbd_port"]))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(deadline, "slurmctld",
                   lambda: _connectable(base["ctld_port"]))
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost"])
        self._wait(deadline, "slurmd", self._node_idle)

    def _environ(self):
        """The environment of the daemons and of every Slurm command: ours
        without SLURM_*, UDOCKER_*, MYSQL_*, PMI*, OMPI_* and *_proxy, plus
        SLURM_CONF, the marker, LC_ALL=C and the sbin directories in PATH."""
        env = {}
        for name, value in os.environ.items():
            if name.startswith(("SLURM_", "UDOCKER_", "MYSQL_", "PMI",
                                "OMPI_")) or name.lower().endswith("_proxy"):
                continue
            env[name] = value
        path = env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        for extra in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
            if extra not in path:
                path.append(extra)
        env.update({"PATH": os.pathsep.join(path), "SLURM_CONF": self.conf_path,
                    MARKER_VAR: self.workdir, "LC_ALL": "C"})
        return env

    def _write_configs(self, base):
        with open(self.conf_path, "w") as conf:
            conf.write(_SLURM_CONF % base)
        if self.gpu_files:
            os.makedirs(os.path.dirname(self.gpu_files[0]))
            with open(os.path.join(os.path.dirname(self.conf_path),
                                   "gres.conf"), "w") as conf:
                conf.write("# generated by tests/support/slurm.py\n"
                           "AutoDetect=off\n")
                for path, device in zip(self.gpu_files, GPU_DEVICES):
                    os.symlink(device, path)
                    conf.write("Name=gpu File=%s\n" % path)
        with open(os.path.join(self.workdir, "plugstack.conf"), "w"):
            pass
        dbd_conf = os.path.join(os.path.dirname(self.conf_path),
                                "slurmdbd.conf")
        with open(dbd_conf, "w") as conf:
            conf.write(_SLURMDBD_CONF % base)
        os.chmod(dbd_conf, 0o600)    # slurmdbd refuses a readable one

    def _start_munge(self, sock, deadline):
        keydir = os.path.join(self.workdir, "munge")
        os.makedirs(keydir)
        os.chmod(keydir, 0o700)
        key = os.path.join(keydir, "munge.key")
        with open("/dev/urandom", "rb") as rnd:
            data = rnd.read(1024)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as keyf:
            keyf.write(data)
        self._spawn("munged", [
            "munged", "-F", "--force", "--socket=" + sock,
            "--key-file=" + key, "--num-threads=10",
            "--pid-file=" + os.path.join(self.run_dir, "munged.pid"),
            "--seed-file=" + os.path.join(keydir, "munged.seed"),
            "--log-file=" + os.path.join(self.log_dir, "munged.log")])
        self._wait(deadline, "munged", lambda: os.path.exists(sock))

    def _start_mariadb(self, deadline):
        datadir = os.path.join(self.workdir, "db", "data")
        sock = os.path.join(self.run_dir, "mysql.sock")
        rc, out, err = run_command(
            [which("mariadb-install-db"), "--no-defaults",
             "--auth-root-authentication-method=normal",
             "--datadir=" + datadir, "--skip-test-db", "--skip-name-resolve",
             "--innodb-log-file-size=8M"],
            env=self.env, cwd=self.workdir, timeout=max(deadline - time.time(),
                                                        1))
        if rc != 0:
            raise SupportError("mariadb-install-db failed (rc %d):\n%s%s"
                               % (rc, out[-3000:], err[-3000:]))
        self._spawn("mariadbd", [
            "mariadbd", "--no-defaults", "--datadir=" + datadir,
            "--socket=" + sock, "--skip-networking", "--skip-name-resolve",
            "--pid-file=" + os.path.join(self.run_dir, "mariadbd.pid"),
            "--log-error=" + os.path.join(self.log_dir, "mariadbd.err"),
            "--innodb-log-file-size=8M", "--innodb-buffer-pool-size=128M",
            "--innodb-lock-wait-timeout=900", "--skip-log-bin"])
        self._wait(deadline, "mariadbd", lambda: os.path.exists(sock))
        return sock

    def _spawn(self, name, argv, extra_env=None):
        env = dict(self.env)
        env.update(extra_env or {})
        argv = [which(argv[0])] + list(argv[1:])
        proc = Process(argv, os.path.join(self.log_dir, name + ".out"),
                       cwd=self.workdir, env=env, max_lifetime=MAX_LIFETIME)
        self._procs.append((name, proc))
        return proc

    def _wait(self, deadline, name, ready):
        proc = dict(self._procs).get(name)
        while time.time() < deadline:
            if ready():
                return
            if proc is not None and not proc.alive():
                raise SupportError("%s exited during start-up:\n%s"
                                   % (name, self._logs(name)))
            time.sleep(0.05)
        raise SupportError("%s did not become ready:\n%s"
                           % (name, self._logs(name)))

    def _node_idle(self):
        rc, out, _ = run_command(["sinfo", "-h", "-N", "-o", "%T"],
                                 env=self.env, timeout=30)
        return rc == 0 and out.strip() == "idle"

    def _logs(self, name, size=3000):
        """The tail of name's console output and its log file."""
        text = ""
        for path in (os.path.join(self.log_dir, name + ".out"),
                     os.path.join(self.log_dir, name + ".log"),
                     os.path.join(self.log_dir, name + ".err")):
            try:
                with open(path, "rb") as logf:
                    logf.seek(0, os.SEEK_END)
                    logf.seek(max(0, logf.tell() - size))
                    text += "--- %s\n%s" % (path, to_text(logf.read(),
                                                          errors="replace"))
            except (IOError, OSError):
                pass
        return text

    def stop(self):
        """Cancel what is left, stop the daemons (last started first), then
        kill whatever still carries the marker. Safe to call twice."""
        if self.env is not None and self._procs and \
                dict(self._procs).get("slurmctld") is not None:
            try:
                self.cancel_all()
            except SupportError:
                pass
        while self._procs:
            self._procs.pop()[1].stop()
        if self._janitor is not None:
            self._janitor.stop()
            self._janitor = None
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def cancel_all(self, timeout=KILL_WAIT + 15):
        """scancel every job of the cluster and wait until none is left."""
        rc, out, _ = self.run(["squeue", "-h", "-o", "%i"], timeout=30)
        if rc != 0 or not out.strip():
            return
        self.run(["scancel", "--user=" + self.user], timeout=30)
        deadline = time.time() + timeout
        while time.time() < deadline:
            rc, out, _ = self.run(["squeue", "-h", "-o", "%i"], timeout=30)
            if rc != 0 or not out.strip():
                return
            time.sleep(0.2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- jobs -----------------------------------------------------------------

    def run(self, argv, env=None, cwd=None, timeout=120, input=None):
        """Run a command (sbatch, srun, ...) with self.env plus env (None
        values remove a variable); return (rc, out, err)."""
        return run_command([str(a) for a in argv], env=self.command_env(env),
                           cwd=cwd or self.jobs_dir, timeout=timeout,
                           input=input)

    def command_env(self, env=None):
        """self.env plus env (None values remove a variable)."""
        full = dict(self.env)
        for name, value in (env or {}).items():
            if value is None:
                full.pop(name, None)
            else:
                full[name] = str(value)
        return full

    def submit(self, script, args=(), env=None, cwd=None):
        """sbatch script (text, written to jobs/job-N.sh) with args; return
        the job id (text). The default --output is jobs/slurm-%j.out (one
        file per array task, %j being the task's own job id)."""
        self._count += 1
        path = os.path.join(self.jobs_dir, "job-%d.sh" % self._count)
        with open(path, "w") as scriptf:
            scriptf.write(script)
        os.chmod(path, 0o755)
        args = list(args)
        if not [a for a in args if a.startswith(("-o", "--output"))]:
            args.append("--output=" + os.path.join(self.jobs_dir,
                                                   "slurm-%j.out"))
        rc, out, err = self.run(["sbatch", "--parsable"] + args + [path],
                                    env=env, cwd=cwd)
        if rc != 0:
            raise SupportError("sbatch failed (rc %d): %s%s" % (rc, out, err))
        return out.strip().split(";")[0]

    def output(self, job_id):
        """The default output file's text of job (or array task) job_id."""
        path = os.path.join(self.jobs_dir, "slurm-%s.out" % job_id)
        try:
            with open(path, "rb") as outf:
                return to_text(outf.read(), errors="replace")
        except (IOError, OSError):
            return ""

    def sacct(self, job_id, steps=True):
        """Accounting records of job_id (array tasks included) as dicts of
        SACCT_FIELDS, allocations first; steps=False gives allocations only.
        """
        argv = ["sacct", "-n", "-P", "-j", str(job_id),
                "--format=" + ",".join(SACCT_FIELDS)]
        if not steps:
            argv.append("-X")
        rc, out, err = self.run(argv, timeout=60)
        if rc != 0:
            raise SupportError("sacct failed (rc %d): %s%s" % (rc, out, err))
        return [dict(zip(SACCT_FIELDS, line.split("|")))
                for line in out.splitlines() if line.strip()]

    def queue(self, job_id=None):
        """{job id: state} of the jobs squeue still shows."""
        argv = ["squeue", "-h", "-r", "-o", "%i|%T"]
        if job_id is not None:
            argv += ["-j", str(job_id)]
        rc, out, _ = self.run(argv, timeout=60)
        if rc != 0:     # squeue -j answers "Invalid job id" once it is gone
            return {}
        return dict(line.split("|", 1) for line in out.splitlines()
                    if "|" in line)

    def controller_states(self, job_id):
        """{job id: state} as slurmctld sees job_id (array tasks as
        "ARRAYID_TASK", a pending remainder as "ARRAYID_[3-4]"), or None
        once the controller has forgotten it (MinJobAge, 600 s here)."""
        rc, out, _ = self.run(["scontrol", "-o", "show", "job",
                                   str(job_id)], timeout=60)
        if rc != 0:
            return None
        states = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobId" not in fields:
                continue
            name = fields["JobId"]
            if fields.get("ArrayJobId") and fields.get("ArrayTaskId"):
                task = fields["ArrayTaskId"]
                name = "%s_%s" % (fields["ArrayJobId"],
                                  task if task.isdigit() else "[%s]" % task)
            states[name] = fields.get("JobState", "")
        return states

    def wait(self, job_id, timeout=300):
        """Wait until job_id (every task of an array, every step) has ended
        and its accounting is written; return its final state: the first
        word of the State (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) or,
        for an array whose tasks differ, the distinct states sorted and
        joined with ",". Raises SupportError on timeout.

        slurmctld says when the job has ended; sacct may lag behind it
        (slurmctld sends the records to slurmdbd asynchronously), so its
        answer counts only once it has every job or task the controller
        knows, each ended.
        """
        deadline = time.time() + timeout
        records, ctl = [], None
        while time.time() < deadline:
            ctl = self.controller_states(job_id)
            if ctl is None or (ctl and all(s in TERMINAL_STATES
                                           for s in ctl.values())):
                records = self.sacct(job_id)
                tops = dict((r["JobID"], r["State"].split()[0])
                            for r in records if "." not in r["JobID"])
                if tops and set(ctl or ()) <= set(tops) and all(
                        r["State"].split()[0] in TERMINAL_STATES and
                        r["End"] not in ("", "Unknown") for r in records):
                    return ",".join(sorted(set(tops.values())))
            time.sleep(0.25)
        raise SupportError("job %s did not end within %s s: controller %r, "
                           "sacct %r" % (job_id, timeout, ctl, records))

    def wait_running(self, job_id, timeout=120):
        """Wait until squeue shows job_id RUNNING; raise SupportError if it
        ends first or on timeout."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.queue(job_id).get(str(job_id))
            if state == "RUNNING":
                return
            if state is None and self.sacct(job_id, steps=False):
                raise SupportError("job %s ended before running: %r"
                                   % (job_id, self.sacct(job_id)))
            time.sleep(0.2)
        raise SupportError("job %s not running after %s s" % (job_id, timeout))

    def scancel(self, job_id, signal_name=None, extra=()):
        """scancel job_id (with --signal=signal_name if given)."""
        argv = ["scancel"] + list(extra)
        if signal_name:
            argv.append("--signal=" + signal_name)
        rc, out, err = self.run(argv + [str(job_id)], timeout=60)
        if rc != 0:
            raise SupportError("scancel failed (rc %d): %s%s" % (rc, out, err))

    def job_pids(self, job_id):
        """Pids Slurm tracks for a running job (`scontrol listpids`): the
        job's processes on the node (proctrack/linuxproc follows the process
        tree from slurmstepd, so a process that detaches is not listed)."""
        rc, out, _ = self.run(["scontrol", "listpids", str(job_id)],
                                  timeout=60)
        if rc != 0:
            return []
        return sorted(int(line.split()[0]) for line in out.splitlines()[1:]
                      if line.split() and line.split()[0].isdigit())

    def stepd_pids(self, job_id):
        """Pids of the slurmstepd processes of job_id (any step)."""
        pattern = re.compile(r"^slurmstepd: \[%s[.\]]" % re.escape(str(job_id)))
        return [pid for pid, cmd in find_processes("slurmstepd:")
                if pattern.match(cmd)]


def cpu_seconds(text):
    """Seconds of a sacct time such as "00:02.404", "01:02:03" or
    "1-02:03:04" (TotalCPU, Elapsed); 0.0 for an empty field."""
    text = text.strip()
    if not text:
        return 0.0
    days = 0
    if "-" in text:
        days, text = text.split("-", 1)
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return int(days) * 86400 + seconds


def janitor(marker_value, log_path, remove=()):
    """A started janitor Process for processes whose environment holds
    MARKER_VAR=marker_value (see the module docstring), returned once its
    signal handlers are set; when it is stopped it kills them, then removes
    the directories in remove."""
    env = dict(os.environ)
    env[MARKER_VAR] = marker_value
    proc = Process([sys.executable, "-c", _JANITOR,
                    "%s=%s" % (MARKER_VAR, marker_value)] + list(remove),
                   log_path, env=env, max_lifetime=MAX_LIFETIME)
    deadline = time.time() + 60
    while "janitor ready" not in proc.log_tail():    # its handlers are set
        if not proc.alive() or time.time() > deadline:
            proc.stop()
            raise SupportError("the janitor did not start:\n" + proc.log_tail())
        time.sleep(0.02)
    return proc


def _user_name():
    """The name of the effective user (for SlurmUser)."""
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name
