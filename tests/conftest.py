# -*- coding: utf-8 -*-
"""Shared pytest fixtures: real registries, a fault proxy, a udocker runner.

Fixtures (see tests/support/ for the details):
    registry         session: anonymous docker-registry, standard images
    registry_basic   session: htpasswd registry (alice/secret1), same images
    registry_token   token-auth registry (+ public/busybox); its token server
                     (registry_token.tokens) is reset before every test
    fault_proxy      per test: a FaultProxy in front of `registry`
    fault_proxy_factory  per test: make(url) -> FaultProxy in front of url
    test_images      session: the standard Image objects (for save/load)
    udocker, ud      per test: runner of udocker.py with a private
                     UDOCKER_DIR and HOME; udocker("pull", ...) -> Result
    slurm            session: a single-node Slurm cluster on 127.0.0.1
                     (support.slurm.SlurmCluster) with two fake GPUs, run as
                     the test user
    slurm_nodes      session: a head node and three compute nodes n1..n3 in
                     namespaces (support.multinode.MultiNodeCluster), run as
                     the test user; skipped (reason printed) only where the
                     host forbids unprivileged user namespaces
Registries start only when a test asks for them. A missing docker-registry
(or Slurm) is an error, not a skip.

Also importable: REPO_ROOT, UDOCKER_SCRIPT (and `import udocker` works, the
repository root is put on sys.path).
"""

from __future__ import print_function, absolute_import, division

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (TESTS_DIR, os.path.dirname(TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from support import (REPO_ROOT, UDOCKER_SCRIPT, UPSTREAM_UDOCKER, SupportError,  # noqa: E402
                     required_file)
from support.faultproxy import FaultProxy  # noqa: E402
from support.images import push_standard_images, standard_images  # noqa
from support.registry import start_registry  # noqa: E402
from support.runner import Udocker  # noqa: E402
from support.slurm import SlurmCluster  # noqa: E402
from support.toolserver import refused_url  # noqa: E402
from support.multinode import MultiNodeCluster, NamespacesUnavailable  # noqa

# udocker.py's default tools download (DEFAULT_TARBALL_URLS) points at a loopback port that
# refuses connections in every test: tests use no network but loopback.
os.environ.setdefault("UDOCKER_TEST_DEFAULT_TARBALL", refused_url("udocker-englib-1.2.11.tar.gz"))

__all__ = ["REPO_ROOT", "UDOCKER_SCRIPT"]


def _start(tmp_path_factory, flavour):
    workdir = str(tmp_path_factory.mktemp("registry-" + flavour))
    error = None
    try:
        reg = start_registry(workdir, flavour)
    except SupportError as exc:
        error = "cannot start the %s registry: %s" % (flavour, exc)
    if error:
        pytest.fail(error, pytrace=False)
    try:
        push_standard_images(reg)
    except Exception:
        reg.stop()
        raise
    return reg


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """Anonymous registry with the standard images (reg.images)."""
    reg = _start(tmp_path_factory, "anonymous")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def registry_basic(tmp_path_factory):
    """Basic-auth registry: users alice/secret1 and pusher/pushsecret."""
    reg = _start(tmp_path_factory, "basic")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def registry_token_session(tmp_path_factory):
    """Token-auth registry, shared by the session (see registry_token)."""
    reg = _start(tmp_path_factory, "token")
    yield reg
    reg.stop()


@pytest.fixture
def registry_token(registry_token_session):
    """Token-auth registry whose token server has default settings and no
    recorded requests at the start of the test."""
    registry_token_session.tokens.reset()
    yield registry_token_session
    registry_token_session.tokens.reset()


@pytest.fixture
def fault_proxy(registry):
    """A FaultProxy (mode "pass") in front of the anonymous registry."""
    proxy = FaultProxy(registry.url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fault_proxy_factory():
    """make(upstream_url, keepalive=True) -> a started FaultProxy; all are
    stopped after the test (for proxies in front of registry_basic, ...)."""
    proxies = []

    def make(upstream_url, keepalive=True):
        proxy = FaultProxy(upstream_url, keepalive).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture(scope="session")
def test_images():
    """The standard images as objects: busybox, multilayer, multiarch,
    multiarch-oci (see support.images.standard_images)."""
    error = None
    try:
        return standard_images()
    except SupportError as exc:
        error = str(exc)
    pytest.fail(error, pytrace=False)


@pytest.fixture
def udocker(tmp_path):
    """Runner of udocker.py: udocker(*args, env=, input=, timeout=) ->
    Result(rc, out, err). udocker.udocker_dir / .home / .env / .tmpdir."""
    return Udocker(str(tmp_path), allow_root=True)


@pytest.fixture
def ud(udocker):
    """The `udocker` runner, for test modules where `udocker` names udocker.py itself."""
    return udocker


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A started SlurmCluster (munged, mariadbd, slurmdbd, slurmctld, one
    slurmd with all the host's CPUs and two fake GPUs: --gres=gpu:N), stopped
    at the end of the session."""
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")), gpus=2)
    error = None
    try:
        cluster.start()
    except SupportError as exc:
        error = "cannot start the Slurm test cluster: %s" % exc
    if error:
        pytest.fail(error, pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def upstream_udocker():
    """udocker 1.3.17's command (skipped where UDOCKER_TEST_UPSTREAM is not set and it is
    not installed; where the variable is set, as in CI, its absence fails the test)."""
    return required_file("UDOCKER_TEST_UPSTREAM", UPSTREAM_UDOCKER)


@pytest.fixture(scope="session")
def slurm_nodes(tmp_path_factory):
    """A started MultiNodeCluster of three compute nodes, stopped at the end
    of the session (and by the kernel if this process dies)."""
    cluster = MultiNodeCluster(str(tmp_path_factory.mktemp("nodes")))
    error = None
    try:
        cluster.start()
    except NamespacesUnavailable as exc:
        print("skipped: %s" % exc)
        pytest.skip(str(exc))
    except SupportError as exc:
        error = "cannot start the multi-node Slurm cluster: %s" % exc
    if error:
        pytest.fail(error, pytrace=False)
    print("multi-node cluster started in %.1f s" % cluster.start_seconds)
    yield cluster
    cluster.stop()


# What upstream's tools (udocker-englib 1.2.11 as UDOCKER_TEST_TARBALL) cannot do in test_run.py's
# F modes on a glibc 2.33+ tree (the host's): their libfakechroot wraps __xstat, __lxstat,
# __fxstatat, not the stat, lstat, fstatat that glibc 2.33+ programs call, so a stat reaches
# the host's path. udocker 1.3.17 fails the same way on bookworm and passes on bullseye (2.31),
# where tests/test_releases.py runs every mode with these tools (UDOCKER_TEST_RELEASE_MODES).
UPSTREAM_LIMITS = {
    "test_shebang_script_with_arguments": "dash's PATH search stats the host's path",
    "test_paths_under_directory_fds_stay_in_the_container": "find's fstatat reaches the host",
    "test_concurrent_runs_of_one_container": "`[ -e /data/FLAG ]` stats the host's /data",
    "test_hostenv_nosysdirs_novol_and_entrypoint": "`test -s`, `test -e` stat the host's files",
    "test_nvidia_driver_is_bound_at_run_time_not_copied": "sh's PATH search stats the host",
    "test_f4_runs_a_program_compiled_in_the_container":
        "ld stats its output before chmod +x: the host's path, so it stays 0644",
    "test_f2_keeps_the_hosts_library_path_and_cache_out":
        "glibc 2.36's ld.so compares LD_LIBRARY_PATH inline: renaming it LD_LIBRARY_REAL in the "
        "copy (udocker 1.3.17's way) has no effect, and upstream's execve gives no --library-path",
    "test_programs_started_through_the_loader_see_their_argv0":
        "upstream's execve garbles a #! script's argv with FAKECHROOT_ELFLOADER_OPT_ARGV0, so "
        "it is not given it (udocker 1.3.17 neither): ld.so shows the host path",
}


def _upstream_libraries(path):
    """The libfakechroot names of path when it is upstream's tools tarball (one per
    distribution: libfakechroot-Debian-12-x86_64.so, not ours per glibc: ...-glibc2.36-...)."""
    import re
    import tarfile
    if not path or not os.path.isfile(path):
        return []
    with tarfile.open(path) as tar:
        names = [n.rpartition("/")[2] for n in tar.getnames() if "/lib/libfakechroot-" in n]
    return names if any(re.match(r"libfakechroot-[A-Z]", n) for n in names) else []


def pytest_collection_modifyitems(config, items):
    """test_run.py's UPSTREAM_LIMITS are expected failures in F modes with upstream's tools
    on a glibc 2.33+ host (not strict: one that passes is reported, not failed), and so are
    the musl tree's F modes with a build of them that has no Alpine library."""
    names = [item for item in items if item.name.split("[")[0] in UPSTREAM_LIMITS or
             item.name.startswith("test_musl_tree_")]
    libraries = names and _upstream_libraries(os.environ.get("UDOCKER_TEST_TARBALL", ""))
    if not libraries:
        return
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION").split()[-1].split(".")
    except (ValueError, AttributeError, IndexError):           # Python 2.7 lacks the name
        import platform
        glibc = (platform.libc_ver()[1] or "0").split(".")
    for item in names:
        params = item.name.partition("[")[2].rstrip("]").split("-")
        if params[0] and not any(p.startswith("F") for p in params):
            continue
        if item.name.startswith("test_musl_tree_"):
            if not any("Alpine" in n for n in libraries):
                item.add_marker(pytest.mark.xfail(reason="this build of upstream's tools has "
                                                  "no libfakechroot-Alpine", strict=False))
        elif [int(part) for part in glibc[:2]] >= [2, 33]:
            item.add_marker(pytest.mark.xfail(reason="upstream's tools: " +
                                              UPSTREAM_LIMITS[item.name.split("[")[0]],
                                              strict=False))
