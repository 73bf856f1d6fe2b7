# -*- coding: utf-8 -*-
"""Self-tests of the Slurm test cluster (tests/support/slurm.py) with plain
host commands: exit codes and CPU time in sacct, scancel, job arrays, srun,
GPUs (--gres=gpu) and Open MPI's mpirun inside an allocation. No udocker.py here; the tests
that run containers under Slurm are in tests/test_batch.py.

None of them depends on timing: the cluster is asked for states, and the
order of events comes from the jobs' own records.
"""

from __future__ import print_function, absolute_import, division

import binascii
import os
import subprocess
import sys
import time

import pytest

from support import TESTS_DIR, which
from support.slurm import (MARKER_VAR, cpu_seconds, find_processes,
                           janitor, processes_left, run_command,
                           session_processes)

MPI_HELLO_C = os.path.join(TESTS_DIR, "images", "mpi_hello.c")


def marker(name):
    """A string no other process on the machine carries."""
    return "%s-%d-%s" % (name, os.getpid(),
                         binascii.hexlify(os.urandom(4)).decode("ascii"))


def test_exit_code_reaches_sacct(slurm):
    job = slurm.submit("#!/bin/sh\necho on $(hostname)\nexit 42\n")
    assert slurm.wait(job, timeout=120) == "FAILED"
    records = dict((r["JobID"], r) for r in slurm.sacct(job))
    assert records[job]["ExitCode"] == "42:0", records
    assert records[job + ".batch"]["ExitCode"] == "42:0", records
    assert records[job]["NodeList"] == "localhost"
    assert "on " in slurm.output(job)


def test_zero_exit_is_completed(slurm):
    job = slurm.submit("#!/bin/sh\ntrue\n")
    assert slurm.wait(job, timeout=120) == "COMPLETED"
    assert slurm.sacct(job, steps=False)[0]["ExitCode"] == "0:0"


@pytest.mark.parametrize("ignore_term", [False, True],
                         ids=["sigterm", "sigterm-ignored-sigkill"])
def test_scancel_leaves_no_process(slurm, ignore_term):
    """scancel of a running job: SIGTERM to every process of the job, then
    SIGKILL after KillWait. In the second case the script and its children
    ignore SIGTERM, so only SIGKILL ends them."""
    mark = marker("scancel")
    trap = "trap '' TERM\n" if ignore_term else ""
    job = slurm.submit("#!/bin/sh\n%ssh -c 'sleep 1000'\n" % trap,
                       env={"BATCH_TEST_MARKER": mark})
    slurm.wait_running(job)
    deadline = time.time() + 60
    while len(find_processes(mark)) < 3 and time.time() < deadline:
        time.sleep(0.1)             # the script, sh -c and sleep
    running = find_processes(mark)
    assert [cmd for _, cmd in running if cmd == "sleep 1000"], running
    assert set(pid for pid, _ in running) <= set(slurm.job_pids(job))
    slurm.scancel(job)
    assert slurm.wait(job, timeout=120) == "CANCELLED"
    assert processes_left(mark) == []
    assert slurm.stepd_pids(job) == []


def test_job_array_two_at_a_time(slurm):
    """4 tasks with %2: all COMPLETED, never more than two at once (from the
    tasks' own start and end stamps)."""
    stamps = os.path.join(slurm.jobs_dir, marker("array"))
    os.makedirs(stamps)
    script = ("#!/bin/sh\n"
              "f=%s/$SLURM_ARRAY_TASK_ID\n"
              "date +%%s.%%N > $f.start\n"
              "sleep 1\n"
              "date +%%s.%%N > $f.end\n" % stamps)
    job = slurm.submit(script, ["--array=1-4%2"])
    assert slurm.wait(job, timeout=180) == "COMPLETED"
    tasks = [r for r in slurm.sacct(job, steps=False)]
    assert sorted(r["JobID"] for r in tasks) == \
        ["%s_%d" % (job, i) for i in range(1, 5)], tasks
    spans = []
    for task in range(1, 5):
        with open(os.path.join(stamps, "%d.start" % task)) as startf:
            start = float(startf.read())
        with open(os.path.join(stamps, "%d.end" % task)) as endf:
            spans.append((start, float(endf.read())))
    for start, _ in spans:
        running = [s for s in spans if s[0] <= start < s[1]]
        assert len(running) <= 2, spans


def test_srun_two_tasks(slurm):
    rc, out, err = slurm.run(["srun", "-n", "2", "hostname"], timeout=120)
    assert rc == 0, err
    assert len(out.split()) == 2, out
    rc, out, err = slurm.run(["srun", "-n", "2", "sh", "-c",
                              "echo $SLURM_PROCID/$SLURM_NTASKS"], timeout=120)
    assert rc == 0, err
    assert sorted(out.split()) == ["0/2", "1/2"], out


def test_srun_exit_code(slurm):
    rc, out, err = slurm.run(["srun", "-n", "1", "sh", "-c", "exit 3"],
                             timeout=120)
    assert rc == 3, (out, err)


GPU_ENV = ("#!/bin/sh\necho CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} "
           "SLURM_JOB_GPUS=${SLURM_JOB_GPUS-unset}\n")


def test_gres_gpus_set_cuda_visible_devices(slurm):
    """The node's two fake GPUs (gres.conf File= symlinks to character
    devices): a job or step that asks for GPUs gets the indexes of its own
    in CUDA_VISIBLE_DEVICES, the second GPU while a job holds the first; a
    job that asks for none gets no CUDA_VISIBLE_DEVICES."""
    assert len(slurm.gpu_files) == 2
    job = slurm.submit(GPU_ENV + "exec sleep 1000\n",
                       ["--gres=gpu:1", "--time=5"])
    slurm.wait_running(job)
    rc, out, err = slurm.run(["srun", "--gres=gpu:1", "sh", "-c",
                              "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
                              " SLURM_STEP_GPUS=$SLURM_STEP_GPUS"], timeout=120)
    assert (rc, out) == (0, "CUDA_VISIBLE_DEVICES=1 SLURM_STEP_GPUS=1\n"), err
    slurm.scancel(job)
    assert slurm.wait(job, timeout=120) == "CANCELLED"
    assert slurm.output(job).startswith(
        "CUDA_VISIBLE_DEVICES=0 SLURM_JOB_GPUS=0\n"), slurm.output(job)
    for args, expected in ((["--gres=gpu:2"], "0,1"), ([], "unset")):
        job = slurm.submit(GPU_ENV, args)
        assert slurm.wait(job, timeout=120) == "COMPLETED"
        assert slurm.output(job) == \
            "CUDA_VISIBLE_DEVICES=%s SLURM_JOB_GPUS=%s\n" % (expected, expected)


@pytest.fixture(scope="module")
def host_mpi_hello(tmp_path_factory):
    """mpi_hello compiled on the host with mpicc."""
    if not which("mpicc"):
        pytest.fail("mpicc not found: apt-get install libopenmpi-dev "
                    "openmpi-bin", pytrace=False)
    binary = str(tmp_path_factory.mktemp("mpi").joinpath("mpi_hello"))
    rc, out, err = run_command([which("mpicc"), "-O2", "-o", binary,
                                MPI_HELLO_C], timeout=120)
    assert rc == 0, out + err
    return binary


def test_mpirun_in_allocation(slurm, host_mpi_hello):
    """mpirun -np 2 inside sbatch -n 2: Open MPI finds the allocation by
    itself (two slots, no --oversubscribe, no MCA settings needed), both
    ranks report, the ranks' exit code is the job's."""
    job = slurm.submit("#!/bin/sh\nmpirun -np 2 %s 7\n" % host_mpi_hello,
                       ["--ntasks=2"])
    assert slurm.wait(job, timeout=120) == "FAILED"
    out = slurm.output(job)
    assert "mpi_hello rank 0 of 2" in out and "mpi_hello rank 1 of 2" in out, \
        out
    record = slurm.sacct(job, steps=False)[0]
    assert record["ExitCode"] == "7:0", record
    assert record["AllocCPUS"] == "2"


def test_srun_mpi_pmix(slurm, host_mpi_hello):
    """Direct launch: srun --mpi=pmix starts the ranks (Slurm's PMIx plugin
    and Open MPI's PMIx agree)."""
    rc, out, err = slurm.run(["srun", "--mpi=pmix", "-n", "2",
                              host_mpi_hello], timeout=120)
    assert rc == 0, out + err
    assert "rank 0 of 2" in out and "rank 1 of 2" in out, out


BUSY = ("import os\n"
        "while sum(os.times()[:2]) < 1.5:\n"
        "    pass\n")


def test_cpu_time_in_sacct(slurm):
    """A job that burns 1.5 s of CPU in a child process: TotalCPU shows it
    (children reaped by the job step count)."""
    job = slurm.submit("#!/bin/sh\n'%s' -c '%s'\n" % (sys.executable, BUSY))
    assert slurm.wait(job, timeout=180) == "COMPLETED"
    records = dict((r["JobID"], r) for r in slurm.sacct(job))
    assert cpu_seconds(records[job]["TotalCPU"]) >= 1.4, records
    assert cpu_seconds(records[job + ".batch"]["TotalCPU"]) >= 1.4, records


def test_cpu_seconds():
    assert cpu_seconds("00:02.404") == pytest.approx(2.404)
    assert cpu_seconds("01:02:03") == 3723
    assert cpu_seconds("1-00:00:01") == 86401
    assert cpu_seconds("") == 0.0


def _start_time(pid):
    """The start time of pid (clock ticks since boot), or None if it is gone
    or a zombie: a pid and its start time name one process even if the pid
    is reused (pid_max is 32768 on the test machines)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as statf:
            fields = statf.read().rsplit(b")", 1)[1].split()
    except (IOError, OSError):
        return None
    return None if fields[0] == b"Z" else int(fields[19])


def test_janitor_kills_marked_processes(tmp_path):
    """What the cluster's janitor does when it is stopped: it kills
    processes carrying the marker and their sessions."""
    value = marker("janitor")
    env = dict(os.environ)
    env[MARKER_VAR] = value
    sweeper = janitor(value, str(tmp_path / "janitor.log"))
    # a marked shell, and in its session a child that dropped its environment
    proc = subprocess.Popen(["sh", "-c", "env -i sleep 1000 & wait"],
                            env=env, preexec_fn=os.setsid)
    try:
        deadline = time.time() + 10
        while len(session_processes(proc.pid)) < 2 and \
                time.time() < deadline:
            time.sleep(0.05)
        victims = [(pid, _start_time(pid))
                   for pid in session_processes(proc.pid)]
        assert len(victims) == 2, victims        # sh and sleep
        sweeper.stop()
        proc.wait()

        def alive():
            return [v for v in victims if _start_time(v[0]) == v[1]]
        deadline = time.time() + 10
        while alive() and time.time() < deadline:
            time.sleep(0.05)
        assert alive() == [], open(str(tmp_path / "janitor.log")).read()
    finally:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            pass
