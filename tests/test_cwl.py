# -*- coding: utf-8 -*-
"""cwltool --udocker against udocker.py: the CWL v1.2 conformance tests that use Docker.

What a CWL user on a machine without Docker does: cwltool (its `--udocker` runs every
DockerRequirement step as `udocker --quiet run --nobanner --volume=... IMAGE ...`) with
udocker.py installed as `udocker` on PATH. The tests are the published CWL v1.2
conformance tests (../shared/cwl-v1.2, read from there, never copied here), run by cwltest;
they pick the tests whose tool (or a tool it runs) has a DockerRequirement, but
`networkaccess` (it needs the Internet): 57 of the 378.

The images they name (docker.io/debian:stable-slim, python:3-slim, bash:4.4,
alpine:latest) are stand-ins built from the Debian root file systems of
tests/images/build_mpi_image.sh (support.images.cwl_standin_images), served by a loopback
registry that UDOCKER_REGISTRY points at.

Needs: UDOCKER_TEST_TARBALL, UDOCKER_TEST_CWLTOOL (the bin directory of a virtualenv with
cwltool 3.3 and cwltest 2.7: .ci/run makes /opt/cwltool-3.3), the conformance tests
(UDOCKER_TEST_CWL_TESTS, else ../shared/cwl-v1.2 beside the repository), nodejs on PATH
(cwltool evaluates the tests' JavaScript with it).

CI runs a subset (CI_EXTRA and the tests tagged `docker`: 17) to stay within minutes; the
full run, by hand:  UDOCKER_TEST_CWL_ALL=1 PYTHONS=3.13 bash tests/run -q tests/test_cwl.py
"""
from __future__ import print_function, absolute_import, division

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import pytest

from support import REPO_ROOT, UDOCKER_SCRIPT, SupportError
from support.images import push_cwl_standins
from support.registry import start_registry
from support.runner import clean_environ

TARBALL = os.environ.get("UDOCKER_TEST_TARBALL", "")
CWLTOOL_BIN = os.environ.get("UDOCKER_TEST_CWLTOOL", "")
CWL_TESTS = os.environ.get("UDOCKER_TEST_CWL_TESTS") or \
    os.path.join(os.path.dirname(REPO_ROOT), "shared", "cwl-v1.2")
IMAGES = ["docker.io/debian:stable-slim", "docker.io/python:3-slim", "docker.io/bash:4.4",
          "docker.io/alpine:latest"]
EXCLUDED_TAGS = ("networkaccess",)         # needs the Internet

# CI runs the tests tagged `docker` and these (volumes with colons, mount points in a
# writable volume, staged and symlinked files); UDOCKER_TEST_CWL_ALL=1 runs all 57.
CI_EXTRA = ("colon_in_paths", "colon_in_output_path", "iwdr_dir_literal_real_file",
            "iwd-passthrough2", "writable_stagedfiles", "legal_symlink")

# Every mode must pass every selected test. (With the tools tarball before issue 13's
# libfakechroot, 31 of the 57 failed in F3 on a relative name in the volume working
# directory; F3_KNOWN held them as xfails until that library landed.)
F3_KNOWN = {}

# Run under the cwltool virtualenv's Python (it has ruamel.yaml): print the ids of the
# tests whose tool, or a file the tool runs or imports, names DockerRequirement.
_SELECT = r"""
import os, re, sys
from ruamel.yaml import YAML
yaml = YAML(typ="safe")
excluded = set(sys.argv[2].split(","))
def tests(path):
    for test in yaml.load(open(path)):
        if "$import" in test:
            for sub in tests(os.path.join(os.path.dirname(path), test["$import"])):
                yield sub
        else:
            yield test, os.path.dirname(path)
REF = re.compile(r'["\']?(?:run|\$import|\$include)["\']?\s*:\s*["\']?([^\s"\'#{},]+)')
def text(path, seen):
    path = os.path.normpath(path)
    if path in seen or not os.path.isfile(path):
        return ""
    seen.add(path)
    body = open(path).read()
    return body + "".join(text(os.path.join(os.path.dirname(path), ref), seen)
                          for ref in REF.findall(body))
for t, base in tests(sys.argv[1]):
    if "DockerRequirement" in text(os.path.join(base, t["tool"].split("#")[0]), set()) \
            and not excluded & set(t.get("tags", [])):
        print("%s %s" % (t["id"], ",".join(t.get("tags", []))))
"""


class CwlRun(object):
    """The pieces a conformance run needs: PATH with `udocker` (udocker.py) and cwltool,
    a private UDOCKER_DIR shared by the modes (the images are pulled once)."""

    def __init__(self, tmpdir, registry):
        self.tmpdir = tmpdir
        self.bindir = os.path.join(tmpdir, "bin")
        self.home = os.path.join(tmpdir, "home")
        for path in (self.bindir, self.home):
            os.makedirs(path)
        wrapper = os.path.join(self.bindir, "udocker")
        with open(wrapper, "w") as out:
            out.write('#!/bin/sh\nexec "%s" "%s" "$@"\n' % (sys.executable, UDOCKER_SCRIPT))
        os.chmod(wrapper, 0o755)
        env = clean_environ()
        env.update({"PATH": ":".join([self.bindir, CWLTOOL_BIN, "/usr/bin", "/bin"]),
                    "HOME": self.home, "UDOCKER_DIR": os.path.join(tmpdir, "udocker"),
                    "UDOCKER_NOSYSCONF": "1", "UDOCKER_TARBALL": TARBALL,
                    "UDOCKER_REGISTRY": registry.url, "TMPDIR": tmpdir})
        self.env = env
        self.selected = self.select()

    def select(self):
        out = subprocess.check_output(
            [os.path.join(CWLTOOL_BIN, "python"), "-c", _SELECT,
             os.path.join(CWL_TESTS, "conformance_tests.yaml"), ",".join(EXCLUDED_TAGS)])
        rows = [line.split(" ") for line in out.decode("utf-8").splitlines()]
        if os.environ.get("UDOCKER_TEST_CWL_ALL"):
            return [row[0] for row in rows]
        return [row[0] for row in rows if "docker" in row[1].split(",") or row[0] in CI_EXTRA]

    def numbers(self):
        """cwltest -n NUMBERS of the selected tests (its -s cannot name its first test)."""
        out = subprocess.check_output(
            [os.path.join(CWLTOOL_BIN, "cwltest"), "-l", "--test",
             os.path.join(CWL_TESTS, "conformance_tests.yaml")], env=self.env)
        found = {}
        for line in out.decode("utf-8").splitlines():
            if line.startswith("[") and "] " in line:
                number, rest = line[1:].split("] ", 1)
                found[rest.split(":")[0]] = number
        return ",".join(found[i] for i in self.selected)

    def udocker(self, *args, **kwargs):
        """Run `udocker ARGS` (udocker.py) in this environment; (status, output text)."""
        env = dict(self.env, **kwargs.get("env", {}))
        proc = subprocess.Popen(["udocker"] + list(args), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=self.tmpdir)
        out = proc.communicate()[0].decode("utf-8", "replace")
        return proc.returncode, out

    def cwltest(self, mode, junit):
        """Run the selected tests with cwltest -j2 in mode; {id: None | failure text},
        the seconds taken and cwltest's output."""
        env = dict(self.env, UDOCKER_DEFAULT_EXECUTION_MODE=mode)
        argv = [os.path.join(CWLTOOL_BIN, "cwltest"),
                "--test", os.path.join(CWL_TESTS, "conformance_tests.yaml"),
                "--tool", "cwltool", "-j2", "--timeout", "300",
                "--junit-xml", junit, "-n", self.numbers(), "--", "--udocker"]
        start = time.time()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=self.tmpdir)
        out = proc.communicate()[0].decode("utf-8", "replace")
        took = time.time() - start
        assert os.path.isfile(junit), "cwltest wrote no report:\n" + out[-5000:]
        results = {}
        # cwltest 2.7 labels the report's N-th case as the N-th test of the file, not the
        # N-th it ran: the cases come in the order of -n, which is self.selected's
        cases = list(ElementTree.parse(junit).getroot().iter("testcase"))
        assert len(cases) == len(self.selected), out[-5000:]
        for name, case in zip(self.selected, cases):
            bad = [e for e in case if e.tag in ("failure", "error", "skipped")]
            err = "".join(e.text or "" for e in case if e.tag == "system-err")
            results[name] = None if not bad else "%s: %s\n%s" % (
                bad[0].tag, bad[0].get("message") or "", err[-3000:])
        return results, took, out


@pytest.fixture(scope="module")
def cwl(tmp_path_factory):
    for what, ok in (("UDOCKER_TEST_TARBALL", os.path.isfile(TARBALL)),
                     ("UDOCKER_TEST_CWLTOOL (bin of a cwltool+cwltest venv: .ci/run makes it)",
                      os.path.isfile(os.path.join(CWLTOOL_BIN, "cwltest"))),
                     ("the CWL conformance tests (%s)" % CWL_TESTS,
                      os.path.isfile(os.path.join(CWL_TESTS, "conformance_tests.yaml")))):
        if not ok:
            pytest.skip("no %s" % what)
    tmpdir = str(tmp_path_factory.mktemp("cwl"))
    error = None
    try:
        registry = start_registry(os.path.join(tmpdir, "registry"))
    except SupportError as exc:
        error = "cannot start the registry: %s" % exc
    if error:
        pytest.fail(error, pytrace=False)
    try:
        push_cwl_standins(registry)
        run = CwlRun(tmpdir, registry)
        for image in IMAGES:
            status, out = run.udocker("pull", image)
            assert status == 0, out
        yield run
    finally:
        registry.stop()


@pytest.mark.parametrize("mode", ["P1", "F3", "R1"])
def test_cwl_conformance_docker_tests(cwl, mode):
    junit = os.path.join(cwl.tmpdir, "junit-%s.xml" % mode)
    results, took, out = cwl.cwltest(mode, junit)
    failed = dict((k, v) for k, v in results.items() if v)
    print("CWL v1.2 conformance, Docker tests, mode %s: %d of %d passed in %.0f s"
          % (mode, len(results) - len(failed), len(results), took))
    status, ps = cwl.udocker("ps")
    left = ps.splitlines()[1:]
    unexpected = sorted(k for k in failed if not (mode == "F3" and k in F3_KNOWN))
    assert not unexpected, "failed in %s: %s\n\n%s" % (
        mode, ", ".join(unexpected), "\n\n".join("== %s\n%s" % (k, failed[k])
                                                 for k in unexpected))
    assert status == 0 and not left, "containers left after the run:\n" + ps
    if failed:
        reason = "libfakechroot (issue 13): " + "; ".join(
            "%s: %s" % (k, F3_KNOWN[k]) for k in sorted(failed))
        print("%d xfail in %s: %s" % (len(failed), mode, reason))
        pytest.xfail(reason)
