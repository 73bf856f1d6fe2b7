# -*- coding: utf-8 -*-
"""The whole path a user takes: a registry image pulled, created and run, tools installed
on first use (tools tarball from UDOCKER_TEST_TARBALL)."""
from __future__ import print_function, absolute_import, division

import os

import pytest

from support import required_file


@pytest.fixture
def ud(udocker):
    udocker.env["UDOCKER_TARBALL"] = required_file("UDOCKER_TEST_TARBALL")
    return udocker


def test_run_image_pulls_creates_runs_and_removes(ud, registry):
    image = "%s/test/busybox" % registry.host
    res = ud("run", "--rm", image, "sh", "-c", "echo hello from $(cat /etc/os-release | "
             "head -1); exit 42")
    assert res.rc == 42, res
    assert "hello from NAME=\"udocker test busybox\"" in res.out
    assert ud("ps").check().out.splitlines()[1:] == []       # --rm removed it
    ud("verify", image).check()


def test_image_metadata_applied(ud, registry):
    image = "%s/test/multilayer" % registry.host
    res = ud("run", "--rm", "--nobanner", image).check()       # Cmd: cat /data/file1.txt
    assert res.out.strip()
    res = ud("run", "--rm", "--nobanner", image, "sh", "-c", "pwd; echo $MULTI").check()
    assert res.out.split() == ["/data", "1"]


def test_named_container_is_reused(ud, registry):
    image = "%s/test/busybox" % registry.host
    cid = ud("create", "--name=box", image).check().out.strip()
    ud("run", "box", "sh", "-c", "echo kept > /tmp/state").check()
    assert ud("run", "--nobanner", "box", "cat", "/tmp/state").check().out == "kept\n"
    ud("run", "--pull=reuse", "--name=box", image, "true").check()
    assert ud("ps").check().out.count(cid) == 1              # no second container
    ud("rm", "box").check()


def test_first_run_installs_tools_once(ud, registry):
    image = "%s/test/busybox" % registry.host
    ud("run", "--rm", image, "true").check()
    bindir = os.path.join(ud.udocker_dir, "bin")
    assert [n for n in os.listdir(bindir) if n.startswith("proot")]
    res = ud("run", "--rm", image, "true").check()
    assert "install" not in res.err.lower()


def test_run_image_with_a_name_and_pull_policies(ud, registry):
    """--name names the container run IMAGE creates; --pull=never runs a local image
    without the registry, refuses a missing one; --pull=always pulls and still makes one
    container (upstream leaked a second one)."""
    image = "%s/test/busybox" % registry.host
    ud("pull", image).check()
    res = ud("run", "--pull=never", "--name=named-run", "--nobanner", "-it", image,
             "echo", "one").check()
    assert res.out == "one\n"
    assert ud("run", "--nobanner", "named-run", "echo", "again").check().out == "again\n"
    res = ud("run", "--pull=never", "--nobanner", "%s/test/nosuch" % registry.host, "true")
    assert res.rc == 1 and "--pull=never" in res.err
    before = ud("ps").check().out.splitlines()[1:]
    res = ud("run", "--pull=always", "--rm", "--nobanner", image, "echo", "fresh").check()
    assert res.out == "fresh\n" and "up to date" in res.err
    assert ud("ps").check().out.splitlines()[1:] == before


def test_location_runs_a_bare_tree_in_r1(ud, registry, tmpdir):
    image = "%s/test/busybox" % registry.host
    cid = ud("create", image).check().out.strip()
    root = ud("inspect", "-p", cid).check().out.strip()
    res = ud("run", "--nobanner", "--location=" + root, "sh", "-c",
             "echo $container_execmode $container_uuid",
             env={"UDOCKER_DEFAULT_EXECUTION_MODE": "R1"}).check()
    assert res.out == "R1 location\n"
