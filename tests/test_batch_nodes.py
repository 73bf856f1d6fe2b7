# -*- coding: utf-8 -*-
"""udocker.py on a multi-node Slurm (issue 16): a head node and compute
nodes n1..n3, each in its own network, UTS and mount namespace (own address
on a private bridge, own hostname, own /tmp), all seeing one shared
directory (support.multinode, fixture `slurm_nodes`).

udocker.py is copied into the shared directory and UDOCKER_DIR is on it:
srun over three nodes, the first run's tool install raced from three nodes,
a job array spread over the nodes on one container, `run --rm IMAGE` from
every node at once, scancel of a 3-node job, MPI across two nodes in the
hybrid model (host `srun --mpi=pmix` launching `udocker.py run`).

The images come from the loopback registry, pulled here (the shared
directory has the same path here and on the nodes) or, by a job, through
the relay on the bridge. Skipped, with the reason printed, where the host
forbids unprivileged user namespaces, and like tests/test_batch.py without
the tools tarball. No test depends on timing.
"""

from __future__ import print_function, absolute_import, division

import os
import sys
import time

import pytest

from support import require_engine_tests
from support.slurm import find_processes, processes_left
from test_batch import (MPI_ENV, MPI_HELLO, MODES, Batch,
                        container_processes, marker_number)

NODES = ["n1", "n2", "n3"]


@pytest.fixture(scope="module")
def nodes(request):
    """A Batch on the multi-node cluster, its top in the shared directory;
    skipped with the reason printed like tests/test_batch.py's."""
    require_engine_tests()
    cluster = request.getfixturevalue("slurm_nodes")
    registry = request.getfixturevalue("registry")
    top = os.path.join(cluster.shared, "batch")
    os.makedirs(top)
    return Batch(cluster, registry, top)


@pytest.fixture(autouse=True)
def no_job_left(request):
    """A failed test leaves no job running into the next one."""
    yield
    if "nodes" in request.fixturenames:
        request.getfixturevalue("nodes").slurm.cancel_all()


def srun(batch, args, udocker_dir, env=None, timeout=600):
    """srun args on the head node from a new job directory (udocker.py in
    it): (rc, out, err)."""
    jobdir = batch.job_dir()
    return batch.slurm.run(["srun"] + list(args), cwd=jobdir,
                           env=batch.env(udocker_dir, env), timeout=timeout)


UD = [sys.executable, "./udocker.py"]


def mode_container(batch, mode):
    """Repository "modes" with container c-MODE (bookworm) set up for mode."""
    return batch.container("modes", "bookworm", "c-" + mode, mode)


# ---------------------------------------------------------------------------
# the cluster itself
# ---------------------------------------------------------------------------


def test_nodes_have_own_name_address_and_tmp_and_share_one_directory(
        slurm_nodes):
    cluster = slurm_nodes
    probe = os.path.join(cluster.shared, "probe")
    with open(probe, "w") as probef:
        probef.write("shared\n")
    rc, out, err = cluster.run(
        ["srun", "-N", "3", "sh", "-c",
         'echo "$(hostname) $SLURMD_NODENAME $(cat %s) '
         '$(ip -4 -o addr show eth0 | cut -d" " -f7)"; '
         'touch /tmp/mine-$(hostname); echo $(ls /tmp | grep mine-)' % probe])
    assert rc == 0, out + err
    lines = sorted(out.splitlines())
    assert lines[3:] == ["n1 n1 shared 10.199.0.1/24", "n2 n2 shared "
                         "10.199.0.2/24", "n3 n3 shared 10.199.0.3/24"], out
    assert lines[:3] == ["mine-n1", "mine-n2", "mine-n3"], "one /tmp? " + out
    assert not [n for n in os.listdir("/tmp") if n.startswith("mine-n")]


def test_cluster_ends_with_its_lifeline(tmp_path):
    """A process that started a cluster is SIGKILLed: everything of the
    cluster (a job step on every node included) is gone soon after."""
    script = tmp_path / "start.py"
    script.write_text(u'''
import os, sys, time
sys.path.insert(0, %r)
from support.multinode import MultiNodeCluster
cluster = MultiNodeCluster(%r, nodes=2).start()
print(cluster.submit("#!/bin/sh\\nsrun sleep 8765432\\n", ["-N", "2"]))
sys.stdout.flush()
while len(os.popen("pgrep -f 'sleep 8765432'").read().split()) < 2:
    time.sleep(0.1)
os.kill(os.getpid(), 9)
''' % (os.path.dirname(os.path.abspath(__file__)), str(tmp_path / "c")))
    from support.slurm import run_command
    rc, out, err = run_command([sys.executable, str(script)], timeout=300)
    if "does not let" in err and "NamespacesUnavailable" in err:
        pytest.skip(err.strip().splitlines()[-1])
    assert rc == -9, out + err
    assert processes_left("8765432") == []
    assert processes_left(str(tmp_path / "c")) == []


def test_cluster_ends_at_its_time_limit(tmp_path):
    from support.multinode import MultiNodeCluster, NamespacesUnavailable
    cluster = MultiNodeCluster(str(tmp_path / "c"), nodes=1, lifetime=1)
    try:
        cluster.start_namespaces()
    except NamespacesUnavailable as exc:
        pytest.skip(str(exc))
    try:
        deadline = time.time() + 30
        while cluster.alive() and time.time() < deadline:
            time.sleep(0.1)
        assert not cluster.alive()
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------
# srun over three nodes; the first run's tool install raced from all three
# ---------------------------------------------------------------------------


def _node_names(out):
    return sorted(line for line in out.splitlines() if line in NODES)


def test_first_run_on_three_nodes_installs_tools_once(nodes):
    """A repository without tools: `srun -N 3 udocker.py run C hostname`
    makes three nodes race to install them; one installs, all three run."""
    run = nodes.container("race", "busybox", "c")
    assert not os.path.exists(os.path.join(run.udocker_dir, "bin")) or \
        not os.listdir(os.path.join(run.udocker_dir, "bin"))
    rc, out, err = srun(nodes, ["-N", "3"] + UD + ["run", "c", "hostname"],
                        run.udocker_dir)
    assert rc == 0, out + err
    assert _node_names(out) == NODES, out + err
    assert (out + err).count("Info: tools installed:") == 1, out + err


@pytest.mark.parametrize("mode", MODES)
def test_srun_three_nodes_run_the_container(nodes, mode):
    run = mode_container(nodes, mode)
    rc, out, err = srun(nodes, ["-N", "3"] + UD + ["run", "c-" + mode,
                                                   "hostname"],
                        run.udocker_dir)
    assert rc == 0, out + err
    assert _node_names(out) == NODES, out + err


# ---------------------------------------------------------------------------
# one shared repository used from every node at once
# ---------------------------------------------------------------------------

ARRAY_TASK = r'''$UD run shared sh -c "echo task $SLURM_ARRAY_TASK_ID on \
$SLURMD_NODENAME ok" || exit $?
'''


def test_array_over_the_nodes_runs_one_container(nodes):
    """6 array tasks, each with a node of its own (--exclusive), run one
    container of one shared repository: 3 at a time, on every node."""
    run = nodes.udocker("array")
    ref = nodes.image("busybox")
    run("pull", ref).check()
    cid = run("create", "--name=shared", ref).check().out.strip()
    job, _ = nodes.submit(ARRAY_TASK, run.udocker_dir,
                          ["--array=1-6", "--exclusive"])
    nodes.slurm.wait(job, timeout=600)
    records = nodes.slurm.sacct(job, steps=False)
    assert len(records) == 6, records
    seen = set()
    for record in records:
        out = nodes.slurm.output(record["JobIDRaw"])
        task = record["JobID"].split("_")[1]
        assert record["State"] == "COMPLETED", (record, out)
        assert "task %s on %s ok" % (task, record["NodeList"]) in out, \
            (record, out)
        seen.add(record["NodeList"])
    assert sorted(seen) == NODES, records
    run("verify", ref).check()
    ps = run("ps").check().out
    assert ps.count(cid) == 1 and len(ps.strip().splitlines()) == 2, ps


def test_run_rm_image_from_every_node_at_once(nodes):
    """`run --rm IMAGE` on three nodes at once from one shared image cache;
    the image pulled by a job through the relay on the bridge."""
    run = nodes.udocker("rm")
    nodes.image("busybox")
    ref = nodes.slurm.registry_host(nodes.registry) + "/test/busybox:latest"
    rc, out, err = srun(nodes, UD + ["--insecure", "pull", ref],
                        run.udocker_dir)
    assert rc == 0, out + err
    rc, out, err = srun(nodes, ["-N", "3"] + UD + [
        "run", "--rm", ref, "sh", "-c", "echo ok $(hostname) $SLURMD_NODENAME"],
        run.udocker_dir)
    assert rc == 0, out + err
    assert sorted(l for l in out.splitlines() if l.startswith("ok ")) == \
        ["ok n1 n1", "ok n2 n2", "ok n3 n3"], out + err     # SLURMD_NODENAME passes
    run("verify", ref).check()
    ps = run("ps").check().out
    assert len(ps.strip().splitlines()) == 1, ps      # heading only
    assert "test/busybox" in run("images").check().out


# ---------------------------------------------------------------------------
# scancel of a job on three nodes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_scancel_of_a_3_node_job_leaves_no_container_process(nodes, mode):
    run = mode_container(nodes, mode)
    number = marker_number()
    job, _ = nodes.submit("srun $UD run c-%s sleep %s\n" % (mode, number),
                          run.udocker_dir, ["-N", "3"])
    nodes.slurm.wait_running(job)
    deadline = time.time() + 300
    running = []
    while time.time() < deadline and nodes.slurm.queue(job):
        running = [(pid, cmd) for pid, cmd in container_processes(
            find_processes("sleep " + number), number)
            if os.path.basename(cmd.split()[0]) != "srun"]
        if len(running) >= 3:
            break
        time.sleep(0.2)
    where = sorted(nodes.slurm.node_of(pid) for pid, _ in running)
    assert where == NODES, (running, nodes.slurm.output(job))
    nodes.slurm.scancel(job)
    assert nodes.slurm.wait(job, timeout=120) == "CANCELLED"
    # once Slurm has the job ended, nothing of it is left a second later
    assert processes_left(number, timeout=1.0) == [], \
        "left behind after scancel (%s)" % mode


# ---------------------------------------------------------------------------
# MPI across two nodes, hybrid model: host srun --mpi=pmix, Open MPI inside
# ---------------------------------------------------------------------------

# ranks on different nodes talk over TCP (shared memory cannot join them)
MPI_NODES_ENV = dict(MPI_ENV, OMPI_MCA_btl="self,tcp")


@pytest.mark.parametrize("mode", MODES)
def test_mpi_across_two_nodes(nodes, mode):
    """sbatch -N 2: srun --mpi=pmix starts `udocker.py run -u UID:GID C
    mpi_hello 6` on two nodes; both ranks run as the invoking user, meet in
    a barrier over TCP, and the exit code reaches sacct."""
    run = nodes.container("mpi", "mpi", "mpi-" + mode, mode)
    job, _ = nodes.submit(
        "srun --mpi=pmix $UD run -u $(id -u):$(id -g) mpi-%s sh -c "
        "'echo rank $PMIX_RANK uid $(id -u) on $(hostname); exec %s 6'\n"
        % (mode, MPI_HELLO), run.udocker_dir,
        ["-N", "2", "--ntasks-per-node=1", "--time=5"], MPI_NODES_ENV)
    output = nodes.finished(job, "FAILED")
    ranks = sorted(line for line in output.splitlines()
                   if line.startswith("mpi_hello rank "))
    assert [line.rsplit(" ", 1)[0] for line in ranks] == \
        ["mpi_hello rank 0 of 2 on", "mpi_hello rank 1 of 2 on"], output
    assert sorted(line.rsplit(" ", 1)[1] for line in ranks) == ["n1", "n2"]
    assert output.count("uid %d on " % os.getuid()) == 2, output
    records = dict((r["JobID"], r) for r in nodes.slurm.sacct(job))
    assert records[job]["ExitCode"] == "6:0", (records, output)
    assert records[job + ".0"]["ExitCode"] == "6:0", records
