# -*- coding: utf-8 -*-
"""udocker.py as a batch job under a real Slurm (issue 7): sbatch jobs that
bring nothing but udocker.py, exit codes and CPU time in sacct, scancel and
time limits leaving no container process, job arrays sharing one
UDOCKER_DIR, srun, MPI in the hybrid model (host mpirun or srun, Open MPI
of the same version inside the image), and GPUs: --gres=gpu with run
--nvidia / setup --nvidia and a fake driver (support.nvidia) whose device
files are the cluster's fake GPUs.

The cluster is support.slurm.SlurmCluster (fixture `slurm`); the images come
from the loopback registry: test/busybox (standard), test/bookworm and
test/mpi (tarballs from tests/images/build_mpi_image.sh, pushed here).
Jobs run `PYTHON ./udocker.py` with the interpreter of the test run, from a
copy of udocker.py in the job's directory, with UDOCKER_TARBALL set so the
first run installs the engines.

Skipped, with the reason printed, as root or where UDOCKER_TEST_TARBALL is not
set (where it is set, as in CI, a missing tarball fails). No test depends on
timing: states come from Slurm,
processes from /proc.
"""

from __future__ import print_function, absolute_import, division

import os
import random
import shutil
import sys
import time

import pytest

from support import TESTS_DIR, UDOCKER_SCRIPT, SupportError, require_engine_tests, which
from support.images import (TEST_IMAGE_CACHE, image_from_tarball,
                            push_image)
from support.nvidia import BOUND_LIBRARIES, SMI_TABLE, FakeDriver, tree_state
from support.runner import Udocker
from support.slurm import (cpu_seconds, find_processes, processes_left,
                           run_command)

TARBALL = os.environ.get("UDOCKER_TEST_TARBALL", "")
MODES = ("P1", "F3", "R1")
TARBALL_IMAGES = {"bookworm": "bookworm-minbase.tar",
                  "mpi": "mpi-bookworm.tar"}
MPI_HELLO = "/usr/local/bin/mpi_hello"


def marker_number():
    """A sleep duration no other process on the machine has in its argv."""
    return str(random.randint(9000000, 9999999))


ENGINE_PROGRAMS = ("python", "proot", "runc", "crun")


def container_processes(found, number):
    """The entries of found (find_processes) that are the container's
    `sleep NUMBER` itself, not udocker.py or an engine carrying the argv."""
    return [(pid, cmd) for pid, cmd in found
            if cmd.endswith("sleep " + number) and
            not os.path.basename(cmd.split()[0]).startswith(ENGINE_PROGRAMS)]


def wait_for(pattern, count=1, timeout=180.0):
    """Processes matching pattern once there are at least count of them."""
    deadline = time.time() + timeout
    found = find_processes(pattern)
    while len(found) < count and time.time() < deadline:
        time.sleep(0.2)
        found = find_processes(pattern)
    return found


class Batch(object):
    """What the tests share: the cluster, the registry, a place for job
    directories, shared repositories, pushed images, prepared containers."""

    def __init__(self, slurm, registry, top):
        self.slurm = slurm
        self.registry = registry
        self.top = top
        self.home = os.path.join(top, "home")
        self.scratch = os.path.join(top, "scratch")   # "node-local" TMPDIR
        for path in (self.home, self.scratch):
            os.makedirs(path)
        self.pushed = {}
        self.udockers = {}
        self.containers = {}
        self._jobs = 0

    # -- images and repositories

    def image(self, name):
        """The registry reference of test image name: "busybox" (standard)
        or a TARBALL_IMAGES key (pushed on first use)."""
        if name == "busybox":
            return self.registry.host + "/test/busybox:latest"
        if name not in self.pushed:
            path = os.path.join(TEST_IMAGE_CACHE, TARBALL_IMAGES[name])
            try:
                image = image_from_tarball(path)
            except SupportError as exc:
                pytest.fail(str(exc), pytrace=False)
            push_image(self.registry.client(), "test/" + name, "latest", image)
            self.pushed[name] = self.registry.host + "/test/%s:latest" % name
        return self.pushed[name]

    def env(self, udocker_dir, extra=None):
        """The environment a job gets on top of the cluster's."""
        env = {"UDOCKER_DIR": udocker_dir, "UDOCKER_TARBALL": TARBALL,
               "UDOCKER_NOSYSCONF": "1", "HOME": self.home,
               "TMPDIR": self.scratch}
        env.update(extra or {})
        return env

    def udocker(self, name):
        """A runner of udocker.py (in this process) for the shared
        repository `name`: top/NAME/udocker, tools from the tarball."""
        if name not in self.udockers:
            run = Udocker(os.path.join(self.top, name))
            run.env.update({"UDOCKER_TARBALL": TARBALL, "HOME": self.home,
                            "TMPDIR": self.scratch})
            self.udockers[name] = run
        return self.udockers[name]

    def container(self, repo, image, name, mode=None):
        """Pull image and create container `name` in shared repository repo
        (once), set up for mode if given; return the repository's runner."""
        run = self.udocker(repo)
        if (repo, name) not in self.containers:
            ref = self.image(image)
            run("pull", ref).check()
            run("create", "--name=" + name, ref).check()
            if mode:
                res = run("setup", "--execmode=" + mode, name)
                res.check()
                res = run("run", name, "true")
                res.check()
            self.containers[(repo, name)] = True
        return run

    # -- jobs

    def job_dir(self):
        """A new job directory holding nothing but a copy of udocker.py."""
        self._jobs += 1
        path = os.path.join(self.top, "job%d" % self._jobs)
        os.makedirs(path)
        shutil.copy2(UDOCKER_SCRIPT, os.path.join(path, "udocker.py"))
        return path

    def script(self, body):
        """A job script: cd to its directory, UD="PYTHON ./udocker.py"."""
        return ("#!/bin/sh\n"
                "# the job brings nothing but udocker.py, next to this script\n"
                "cd \"$SLURM_SUBMIT_DIR\" || exit 99\n"
                "UD=\"%s ./udocker.py\"\n%s" % (sys.executable, body))

    def submit(self, body, udocker_dir, args=(), env=None):
        """sbatch script(body) from a new job directory (time limit 10 min
        unless args has one); return (job id, job directory)."""
        jobdir = self.job_dir()
        args = list(args)
        if not [a for a in args if a.startswith(("-t", "--time"))]:
            args.append("--time=10")
        job = self.slurm.submit(self.script(body), args,
                                env=self.env(udocker_dir, env), cwd=jobdir)
        return job, jobdir

    def finished(self, job, state, timeout=600):
        """Wait for job; assert its final state; return its output."""
        final = self.slurm.wait(job, timeout=timeout)
        output = self.slurm.output(job)
        assert final == state, "job %s: %s, expected %s\n%s\n%r" % (
            job, final, state, output[-6000:], self.slurm.sacct(job))
        return output


@pytest.fixture(scope="module")
def batch(request, tmp_path_factory):
    """A Batch, or the whole module skipped with the reason printed."""
    top = str(tmp_path_factory.mktemp("batch"))
    require_engine_tests()
    slurm = request.getfixturevalue("slurm")
    registry = request.getfixturevalue("registry")
    return Batch(slurm, registry, top)


@pytest.fixture(autouse=True)
def no_job_left(batch):
    """A failed test leaves no job running into the next one."""
    yield
    batch.slurm.cancel_all()


def mode_container(batch, mode):
    """Runner of repository "modes", where container c-MODE (bookworm) is
    set up for mode (skipped if the mode is not available)."""
    return batch.container("modes", "bookworm", "c-" + mode, mode)


# ---------------------------------------------------------------------------
# one job: pull, create, run; the exit code reaches sacct
# ---------------------------------------------------------------------------

JOB_LOCAL = r'''# a job-local repository on node-local scratch, removed when the job ends
export UDOCKER_DIR="${TMPDIR:-/tmp}/udocker-$SLURM_JOB_ID"
trap 'chmod -R u+rwX "$UDOCKER_DIR" 2>/dev/null; rm -rf "$UDOCKER_DIR"' EXIT
'''

PULL_CREATE_RUN = r'''$UD pull %(ref)s || exit 90
$UD create --name=job %(ref)s || exit 91
$UD run job sh -c 'echo inside $(cat /etc/os-release | head -n 1); exit 7'
'''


@pytest.mark.parametrize("where", ["job-local", "shared"])
def test_job_pulls_creates_runs_and_reports_exit_code(batch, where):
    ref = batch.image("busybox")
    shared = os.path.join(batch.top, "shared-%s" % where)
    body = (JOB_LOCAL if where == "job-local" else "") + \
        PULL_CREATE_RUN % {"ref": ref}
    job, jobdir = batch.submit(body, shared)
    output = batch.finished(job, "FAILED")
    records = dict((r["JobID"], r) for r in batch.slurm.sacct(job))
    assert records[job]["ExitCode"] == "7:0", (records, output)
    assert records[job + ".batch"]["ExitCode"] == "7:0", records
    assert "inside NAME=" in output, output
    assert set(os.listdir(jobdir)) - set(["__pycache__"]) == \
        set(["udocker.py"])                    # the job brought nothing else
    if where == "job-local":
        assert os.listdir(batch.scratch) == [], "job-local repository left"
    else:
        assert os.path.isdir(os.path.join(shared, "containers"))


def test_exit_code_zero_is_completed(batch):
    run = batch.container("shared", "busybox", "c0")
    job, _ = batch.submit("$UD run c0 true\n", run.udocker_dir)
    batch.finished(job, "COMPLETED")
    assert batch.slurm.sacct(job, steps=False)[0]["ExitCode"] == "0:0"


# ---------------------------------------------------------------------------
# scancel and time limits: nothing of the container stays behind
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_scancel_leaves_no_container_process(batch, mode):
    run = mode_container(batch, mode)
    number = marker_number()
    job, _ = batch.submit("$UD run c-%s sleep %s\necho after run: $?\n"
                          % (mode, number), run.udocker_dir)
    batch.slurm.wait_running(job)
    running = wait_for("sleep " + number)
    deadline = time.time() + 180
    while not container_processes(running, number) and \
            time.time() < deadline and batch.slurm.queue(job):
        time.sleep(0.2)
        running = find_processes("sleep " + number)
    if not container_processes(running, number):
        pytest.fail("the container's sleep never started:\n%s\n%s"
                    % (running, batch.slurm.output(job)))
    tracked = set(batch.slurm.job_pids(job))
    outside = [(pid, cmd) for pid, cmd in running if pid not in tracked and
               os.path.exists("/proc/%d" % pid)]     # still there, untracked
    assert not outside, "processes of the container outside the job: %r, " \
        "job: %r" % (outside, sorted(tracked))
    batch.slurm.scancel(job)
    assert batch.slurm.wait(job, timeout=120) == "CANCELLED"
    assert processes_left(number) == [], \
        "left behind after scancel (%s)" % mode
    assert batch.slurm.stepd_pids(job) == []


@pytest.mark.slow
def test_time_limit_leaves_no_container_process(batch):
    """One job with --time=1 running a container of every available mode
    (one Slurm time limit takes 60 to 90 s, so the modes share it)."""
    modes, skipped = [], []
    for mode in MODES:
        try:
            mode_container(batch, mode)
            modes.append(mode)
        except pytest.skip.Exception as exc:
            skipped.append("%s: %s" % (mode, exc))
    if not modes:
        pytest.skip("; ".join(skipped))
    if skipped:
        print("modes skipped: " + "; ".join(skipped))
    numbers = dict((mode, marker_number()) for mode in modes)
    body = "".join("$UD run c-%s sleep %s &\n" % (mode, numbers[mode])
                   for mode in modes) + "wait\necho not reached\n"
    job, _ = batch.submit(body, batch.udocker("modes").udocker_dir,
                          ["--time=1"])
    batch.slurm.wait_running(job)
    for mode in modes:
        assert wait_for("sleep " + numbers[mode], 2), \
            "%s: container not started\n%s" % (mode, batch.slurm.output(job))
    output = batch.finished(job, "TIMEOUT", timeout=300)
    assert "not reached" not in output
    for mode in modes:
        assert processes_left(numbers[mode]) == [], \
            "left behind after the time limit (%s)" % mode


# ---------------------------------------------------------------------------
# job arrays on one shared repository
# ---------------------------------------------------------------------------

# the task number is expanded by the job, the hostname by the container
ARRAY_TASK = r'''$UD run %(target)s sh -c "echo task $SLURM_ARRAY_TASK_ID \
\$(cat /etc/hostname) ok" || exit $?
'''


def _check_array(batch, job, tasks=20):
    """Every task of job COMPLETED and printed its line from the container."""
    records = batch.slurm.sacct(job, steps=False)
    assert sorted(r["JobID"] for r in records) == \
        sorted("%s_%d" % (job, i) for i in range(1, tasks + 1)), records
    for record in records:
        out = batch.slurm.output(record["JobIDRaw"])
        task = record["JobID"].split("_")[1]
        assert record["State"] == "COMPLETED", (record, out)
        assert "task %s busybox ok" % task in out, (record, out)


@pytest.mark.slow
def test_array_of_20_runs_one_container(batch):
    """20 tasks, 2 at a time, run the same container of one shared
    UDOCKER_DIR; the first two also race to install the engines."""
    run = batch.udocker("array")
    ref = batch.image("busybox")
    run("pull", ref).check()
    cid = run("create", "--name=shared", ref).check().out.strip()
    job, _ = batch.submit(ARRAY_TASK % {"target": "shared"}, run.udocker_dir,
                          ["--array=1-20%2"])
    batch.slurm.wait(job, timeout=900)
    _check_array(batch, job)
    run("verify", ref).check()
    ps = run("ps").check().out
    assert ps.count(cid) == 1 and "shared" in ps, ps
    assert len(ps.strip().splitlines()) == 2, ps   # heading + one container
    run("run", "shared", "true").check()


@pytest.mark.slow
def test_array_of_20_run_rm_image(batch):
    """20 tasks, 2 at a time, each `run --rm IMAGE` from one shared image
    cache: every task creates, runs and removes its own container."""
    run = batch.udocker("rmarray")
    ref = batch.image("busybox")
    run("pull", ref).check()
    res = run("run", "--rm", ref, "true")         # engines installed here
    res.check()
    job, _ = batch.submit(ARRAY_TASK % {"target": "--rm " + ref},
                          run.udocker_dir, ["--array=1-20%2"])
    batch.slurm.wait(job, timeout=900)
    _check_array(batch, job)
    run("verify", ref).check()
    ps = run("ps").check().out
    assert len(ps.strip().splitlines()) == 1, ps   # heading only
    assert ref.split("/", 1)[1].split(":")[0] in run("images").check().out


# ---------------------------------------------------------------------------
# srun, MPI (hybrid model) and accounting
# ---------------------------------------------------------------------------


def test_srun_two_tasks_run_the_container(batch):
    run = batch.container("shared", "busybox", "c0")
    env = batch.env(run.udocker_dir)
    rc, out, err = batch.slurm.run(
        ["srun", "-n", "2", sys.executable, UDOCKER_SCRIPT, "run", "c0",
         "sh", "-c", "echo rank=$SLURM_PROCID of $SLURM_NTASKS"],
        env=env, timeout=300)
    assert rc == 0, out + err
    assert sorted(l for l in out.splitlines() if l.startswith("rank=")) == \
        ["rank=0 of 2", "rank=1 of 2"], \
        "SLURM_* must reach the container by default\n" + out + err
    rc, out, err = batch.slurm.run(
        ["srun", "-n", "2", sys.executable, UDOCKER_SCRIPT, "run", "c0",
         "sh", "-c", "exit 3"], env=env, timeout=300)
    assert rc == 3, out + err


def _mpi_check(output):
    for rank in (0, 1):
        assert "mpi_hello rank %d of 2" % rank in output, \
            "OMPI_*/PMIX_* must reach the container by default\n" + output


# The hybrid model needs two things of the user (docs/batch.md):
# - the ranks run as the invoking user (-u UID:GID): the PMIx server of
#   mpirun or slurmd accepts a client only if the uid it reports is the
#   job's, and udocker's default user inside is a fake root;
# - PMIX_MCA_gds=hash: PMIx's shared-memory store lives in the launcher's
#   session directory under the host's /tmp, which the container does not
#   see (without it the ranks print a "PMIX ERROR ... gds_ds12_lock" line
#   and fall back to it anyway).
MPI_ENV = {"PMIX_MCA_gds": "hash"}


def test_mpirun_hybrid(batch):
    """Host mpirun (Open MPI 4.1) starts `udocker.py run C mpi_hello` per
    rank; the image's Open MPI 4.1 joins the host's launcher."""
    run = batch.container("mpi", "mpi", "mpi")
    job, _ = batch.submit("mpirun -np 2 $UD run -u $(id -u):$(id -g) mpi "
                          "%s 5\n" % MPI_HELLO, run.udocker_dir,
                          ["--ntasks=2", "--time=3"], MPI_ENV)
    output = batch.finished(job, "FAILED")
    _mpi_check(output)
    record = batch.slurm.sacct(job, steps=False)[0]
    assert record["ExitCode"] == "5:0", (record, output)


def test_srun_mpi_pmix_hybrid(batch):
    """Direct launch: srun --mpi=pmix -n 2 udocker.py run C mpi_hello."""
    run = batch.container("mpi", "mpi", "mpi")
    env = batch.env(run.udocker_dir, MPI_ENV)
    rc, out, err = batch.slurm.run(
        ["srun", "--mpi=pmix", "-n", "2", "--time=3", sys.executable,
         UDOCKER_SCRIPT, "run", "-u", "%d:%d" % (os.getuid(), os.getgid()),
         "mpi", MPI_HELLO, "6"], env=env, timeout=300)
    assert rc == 6, out + err
    _mpi_check(out + err)


# Debian's Open MPI: libraries in the multiarch directory, components,
# help texts and settings at the paths it was built with
DEBIAN_OPENMPI = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu/openmpi",
                  "/usr/share/openmpi", "/etc/openmpi")


def test_mpirun_bind_model(batch):
    """Bind model: a program built on the host with the host's Open MPI,
    run in a bookworm image without MPI, the host's MPI bound in and found
    through LD_LIBRARY_PATH (host and image share the C library)."""
    if not which("mpicc") or \
            not all(os.path.isdir(path) for path in DEBIAN_OPENMPI):
        pytest.skip("the bind-model test knows Debian 12's Open MPI only")
    app = os.path.join(batch.top, "app")
    if not os.path.isdir(app):
        os.makedirs(app)
    rc, out, err = run_command([which("mpicc"), "-O2", "-o",
                                os.path.join(app, "mpi_hello"),
                                os.path.join(TESTS_DIR, "images",
                                             "mpi_hello.c")], timeout=120)
    assert rc == 0, out + err
    run = batch.container("bind", "bookworm", "plain")
    libdir = DEBIAN_OPENMPI[0]
    binds = ["-v %s:/host/lib" % libdir] + \
        ["-v %s" % path for path in DEBIAN_OPENMPI[1:]] + \
        ["-v %s:/opt/app" % app, "-e LD_LIBRARY_PATH=/host/lib"]
    job, _ = batch.submit("mpirun -np 2 $UD run -u $(id -u):$(id -g) %s "
                          "plain /opt/app/mpi_hello 4\n" % " ".join(binds),
                          run.udocker_dir, ["--ntasks=2", "--time=3"],
                          MPI_ENV)
    output = batch.finished(job, "FAILED")
    _mpi_check(output)
    record = batch.slurm.sacct(job, steps=False)[0]
    assert record["ExitCode"] == "4:0", (record, output)


# burns 1.5 s of its own CPU time, reading its counters without forking
BUSY = r'''while :; do read -r s < /proc/$$/stat; set -- $s; \
[ $((${14} + ${15})) -ge 150 ] && break; done; echo busy done'''


@pytest.mark.parametrize("mode", MODES)
def test_container_cpu_time_in_sacct(batch, mode):
    """The container's processes are children of the job step: their CPU
    time shows in sacct's TotalCPU."""
    run = mode_container(batch, mode)
    job, _ = batch.submit("$UD run c-%s sh -c '%s'\n" % (mode, BUSY),
                          run.udocker_dir)
    output = batch.finished(job, "COMPLETED")
    assert "busy done" in output
    records = dict((r["JobID"], r) for r in batch.slurm.sacct(job))
    assert cpu_seconds(records[job + ".batch"]["TotalCPU"]) >= 1.4, records
    assert cpu_seconds(records[job]["TotalCPU"]) >= 1.4, records


# ---------------------------------------------------------------------------
# GPUs: --gres=gpu reaches a container run with the host's (fake) driver
# ---------------------------------------------------------------------------

# run in the container: the driver's tool, libraries and search path, the
# GPU variables the job got, and the device files (name, type, major:minor;
# by name: in P1 a file bound into /dev is not in the listing of /dev)
NVIDIA_CHECK = (
    'nvidia-smi; echo "libs: $(ls /.udocker/nvidia/lib | tr "\\n" " ")"; '
    'echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; '
    'echo "container: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"; '
    'for d in /dev/nvidia0 /dev/nvidia1 /dev/nvidiactl /dev/nvidia-uvm; '
    'do test -e $d && '
    'stat -L -c "device: %n %F %t:%T" $d; done; exit 5')


@pytest.fixture(scope="module")
def nvidia(batch):
    """A fake NVIDIA driver (support.nvidia) whose /dev/nvidia0 and
    /dev/nvidia1 are the files the cluster's gres.conf names for its two
    GPUs, as on a real node."""
    return FakeDriver(os.path.join(batch.top, "fake-nvidia"),
                      batch.slurm.gpu_files)


def _device(path):
    """What `stat -L -c "%F %t:%T"` says of path."""
    st = os.stat(path)
    return "character special file %x:%x" % (os.major(st.st_rdev),
                                              os.minor(st.st_rdev))


def _check_nvidia(output, mode, visible):
    """The lines NVIDIA_CHECK printed show the driver and the GPU variable;
    visible is the CUDA_VISIBLE_DEVICES the job or step got from Slurm."""
    assert SMI_TABLE in output, output
    assert "libs: %s \n" % " ".join(BOUND_LIBRARIES) in output, output
    search = [line.split("=", 1)[1] for line in output.splitlines()
              if line.startswith("LD_LIBRARY_PATH=")]
    assert search and search[0].split(":")[0].endswith("/nvidia/lib"), output
    assert "container: CUDA_VISIBLE_DEVICES=%s\n" % visible in output, output
    devices = dict(line.split()[1:3] for line in output.splitlines()
                   if line.startswith("device: "))
    if mode.startswith("F"):        # F modes show devices at their own path
        assert devices == {}, output
        return
    assert devices == {"/dev/nvidia0": "character", "/dev/nvidia1":
                       "character", "/dev/nvidiactl": "regular",
                       "/dev/nvidia-uvm": "regular"}, output


@pytest.mark.parametrize("mode", MODES)
def test_sbatch_gres_gpu_reaches_run_nvidia(batch, nvidia, mode):
    """sbatch --gres=gpu:1, then `run --nvidia`: the container sees the
    (fake) driver bound at /.udocker/nvidia, the CUDA_VISIBLE_DEVICES Slurm
    gave the job, and the GPUs' device files; nothing is copied into ROOT,
    and the container command's exit code is the job's."""
    run = mode_container(batch, mode)
    root = run("inspect", "-p", "c-" + mode).check().out.strip()
    before = tree_state(root)
    body = ('echo "job: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"\n'
            "$UD %s run --nvidia c-%s sh -c '%s'\n"
            % (" ".join(nvidia.args), mode, NVIDIA_CHECK))
    job, _ = batch.submit(body, run.udocker_dir, ["--gres=gpu:1"],
                          {"PATH": nvidia.path(batch.slurm.env["PATH"])})
    output = batch.finished(job, "FAILED")
    assert "job: CUDA_VISIBLE_DEVICES=0\n" in output, output
    _check_nvidia(output, mode, "0")
    if not mode.startswith("F"):
        assert "device: /dev/nvidia0 %s\n" % _device(batch.slurm.gpu_files[0]) \
            in output, output
    assert batch.slurm.sacct(job, steps=False)[0]["ExitCode"] == "5:0"
    assert tree_state(root) == before, "copied into ROOT"


def test_srun_gres_gpu_reaches_a_container_set_up_for_nvidia(batch, nvidia):
    """A container set up once with `setup --nvidia` (no option at run
    time): srun --gres=gpu:1 while another job holds GPU 0 gives the
    container CUDA_VISIBLE_DEVICES=1; srun without --gres gives it none
    (the driver is still there). Nothing is copied into ROOT."""
    run = batch.container("gpu", "bookworm", "nv", "P1")
    root = run("inspect", "-p", "nv").check().out.strip()
    before = tree_state(root)
    env = batch.env(run.udocker_dir,
                    {"PATH": nvidia.path(batch.slurm.env["PATH"])})
    run(*(nvidia.args + ["setup", "--nvidia", "nv"]), env=env).check()
    holder = batch.slurm.submit("#!/bin/sh\nexec sleep 1000\n",
                                ["--gres=gpu:1", "--time=5"])
    batch.slurm.wait_running(holder)
    command = [sys.executable, UDOCKER_SCRIPT] + nvidia.args + \
        ["run", "nv", "sh", "-c", NVIDIA_CHECK]
    rc, out, err = batch.slurm.run(["srun", "--gres=gpu:1"] + command,
                                   env=env, timeout=300)
    assert rc == 5, out + err
    _check_nvidia(out, "P1", "1")
    assert "device: /dev/nvidia1 %s\n" % _device(batch.slurm.gpu_files[1]) \
        in out, out
    batch.slurm.scancel(holder)
    rc, out, err = batch.slurm.run(["srun"] + command, env=env, timeout=300)
    assert rc == 5, out + err
    _check_nvidia(out, "P1", "unset")
    assert tree_state(root) == before, "copied into ROOT"
