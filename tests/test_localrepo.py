# -*- coding: utf-8 -*-
"""Local repository (section 5): upstream udocker 1.3.17 and udocker.py share one repository.

udocker 1.3.17 comes from PyPI, installed by .ci/run in a venv (UDOCKER_TEST_UPSTREAM
names its `udocker` command; default /opt/udocker-1.3.17/bin/udocker).
"""
from __future__ import print_function, absolute_import, division

import json
import os
import subprocess

import pytest

UPSTREAM = os.environ.get("UDOCKER_TEST_UPSTREAM") or "/opt/udocker-1.3.17/bin/udocker"


@pytest.fixture
def upstream(udocker):
    """Run udocker 1.3.17 on the same UDOCKER_DIR/HOME as the `udocker` fixture."""
    if not os.access(UPSTREAM, os.X_OK):
        pytest.skip("udocker 1.3.17 not installed at %s (set UDOCKER_TEST_UPSTREAM)"
                    % UPSTREAM)

    if not os.path.isdir(udocker.home):
        os.makedirs(udocker.home)

    def run(*args):
        env = udocker.environ({"UDOCKER_TARBALL": ""})
        proc = subprocess.Popen([UPSTREAM] + list(args), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        out = proc.communicate()[0].decode("utf-8", "replace")
        return proc.returncode, out
    return run


def test_upstream_reads_what_we_pull(udocker, upstream, registry):
    udocker("pull", "--registry=http://" + registry.host, "test/multilayer").check()
    udocker("pull", "--registry=http://" + registry.host, "test/busybox-oci").check()
    rc, out = upstream("images", "-l")
    assert rc == 0 and "test/multilayer:latest" in out and "test/busybox-oci:latest" in out
    for name in ("test/multilayer", "test/busybox-oci"):
        rc, out = upstream("verify", name)
        assert rc == 0 and "image Ok" in out, out
        assert "Warning" not in out                     # our extra files are invisible
    rc, out = upstream("inspect", "test/multilayer")
    assert rc == 0 and json.loads(out[out.index("{"):])["config"]["WorkingDir"] == "/data"
    rc, out = upstream("rmi", "test/busybox-oci")
    assert rc == 0
    udocker("verify", "test/multilayer").check()


def test_we_read_what_upstream_pulls(udocker, upstream, registry):
    rc, out = upstream("pull", "--registry=http://" + registry.host, "test/multilayer")
    assert rc == 0, out
    res = udocker("images", "-l").check()
    assert "test/multilayer:latest    ." in res.out
    udocker("verify", "test/multilayer").check()
    config = json.loads(udocker("inspect", "test/multilayer").check().out)
    assert config["config"]["WorkingDir"] == "/data"
    mark = len(registry.access_log())
    udocker("pull", "--registry=http://" + registry.host, "test/multilayer").check()
    assert not [r for r in registry.access_log()[mark:] if "/blobs/" in r["path"]]
    udocker("verify", "test/multilayer").check()
    udocker("rmi", "test/multilayer").check()
    rc, out = upstream("images")
    assert "test/multilayer" not in out


def test_keystore_is_shared(udocker, upstream, registry_basic):
    rc, out = upstream("login", "--registry=" + registry_basic.url, "--username=alice",
                       "--password=secret1")
    assert rc == 0, out
    udocker("pull", "--registry=" + registry_basic.url, "test/busybox").check()
    udocker("logout", "--registry=" + registry_basic.url).check()
    udocker("login", "--registry=" + registry_basic.url, "--username=alice",
            "--password=secret1").check()
    rc, out = upstream("pull", "--registry=" + registry_basic.url, "test/multilayer")
    assert rc == 0, out


def test_upstream_protect_marker_is_ours(udocker, upstream, registry):
    udocker("pull", "--registry=http://" + registry.host, "test/busybox").check()
    rc, out = upstream("protect", "test/busybox")
    assert rc == 0
    res = udocker("rmi", "test/busybox")
    assert res.rc == 1 and "protected" in res.err
    udocker("unprotect", "test/busybox").check()
    rc, out = upstream("images")
    assert "test/busybox:latest    ." in out


def test_mkrepo_and_repo_option(udocker, tmpdir):
    target = str(tmpdir.join("newrepo"))
    udocker("mkrepo", target).check()
    for sub in ("repos", "layers", "containers", "bin", "lib", "doc"):
        assert os.path.isdir(os.path.join(target, sub))
    udocker("--repo=" + target, "images").check()
    res = udocker("mkrepo", target)
    assert res.rc == 1 and "not empty" in res.err
    res = udocker("--repo=" + str(tmpdir.join("nothere")), "images")
    assert res.rc == 1 and "not a udocker repository" in res.err
