# -*- coding: utf-8 -*-
"""Self-tests of the test infrastructure (tests/support, conftest.py).

Real registries, a real token server and real sockets; no mocks.
"""

from __future__ import print_function, absolute_import, division

import bz2
import errno
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest

from support import httplib, run_in_session, to_bytes, to_text, which
from support.client import (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST,
                            OCI_INDEX, OCI_MANIFEST, RegistryClient,
                            parse_challenge, request, sha256_digest)
from support.images import (PLATFORM_FILE, Image, ImageIndex, Layer,
                            busybox_layer, d, docker_archive_files, f, fifo,
                            hard, multilayer_layers, opaque,
                            oci_layout_files, sym, whiteout, write_tar,
                            write_tree)
from support.runner import Udocker, UdockerTimeout

try:
    from urllib.request import Request, urlopen
except ImportError:  # Python 2.7
    from urllib2 import Request, urlopen


def decompress(data):
    """Undo gzip/bzip2/xz/zstd by magic number."""
    if data[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=io.BytesIO(data)).read()
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00" or data[:4] == b"\x28\xb5\x2f\xfd":
        tool = "xz" if data[:1] == b"\xfd" else "zstd"
        proc = subprocess.Popen([tool, "-d", "-c"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        return proc.communicate(data)[0]
    return data


def tar_members(data):
    """{name: TarInfo, name + "#data": bytes} of a tar archive."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            out[info.name] = info
            if info.isfile():
                out[info.name + "#data"] = tar.extractfile(info).read()
    return out


# ---------------------------------------------------------------------------
# anonymous registry: manifests, blobs, tags
# ---------------------------------------------------------------------------


def test_registry_serves_every_pushed_manifest(registry):
    assert registry.url == "http://" + registry.host
    expected = set(["library/busybox:latest", "library/busybox:1.0",
                    "test/busybox:latest", "test/busybox:1.0",
                    "test/busybox-oci:latest", "test/multilayer:latest",
                    "test/multiarch:latest", "test/multiarch-oci:latest"])
    assert expected <= set(registry.images)
    accept = ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST,
                        OCI_INDEX])
    for ref, info in sorted(registry.images.items()):
        req = Request("%s/v2/%s/manifests/%s" % (registry.url, info["repo"],
                                                 info["tag"]),
                      headers={"Accept": accept})
        resp = urlopen(req, timeout=30)
        body = resp.read()
        assert resp.info().get("Content-Type") == info["media_type"], ref
        assert resp.info().get("Docker-Content-Digest") == info["digest"]
        assert sha256_digest(body) == info["digest"]
        assert body == info["manifest"]
        assert json.loads(to_text(body))["mediaType"] == info["media_type"]


def test_media_types_of_the_standard_images(registry):
    images = registry.images
    assert images["test/busybox:latest"]["media_type"] == DOCKER_MANIFEST
    assert images["test/busybox-oci:latest"]["media_type"] == OCI_MANIFEST
    assert images["test/multiarch:latest"]["media_type"] == \
        DOCKER_MANIFEST_LIST
    assert images["test/multiarch-oci:latest"]["media_type"] == OCI_INDEX
    multi = images["test/multilayer:latest"]
    assert [l["compression"] for l in multi["layers"]] == \
        ["gzip", "gzip", "gzip", None]
    assert multi["layers"][3]["media_type"] == \
        "application/vnd.docker.image.rootfs.diff.tar"
    oci = json.loads(to_text(images["test/busybox-oci:latest"]["manifest"]))
    assert oci["config"]["mediaType"] == \
        "application/vnd.oci.image.config.v1+json"
    assert oci["layers"][0]["mediaType"] == \
        "application/vnd.oci.image.layer.v1.tar+gzip"
    # same image, same layer blob, different manifests
    assert images["test/busybox:latest"]["digest"] != \
        images["test/busybox-oci:latest"]["digest"]
    assert images["library/busybox:latest"]["digest"] == \
        images["test/busybox:1.0"]["digest"]


def test_blobs_hash_to_their_digests(registry):
    client = registry.client()
    for ref in ("test/multilayer:latest", "test/busybox-oci:latest"):
        info = registry.images[ref]
        config = client.get_blob(info["repo"], info["config"]["digest"])
        assert config.status == 200
        assert sha256_digest(config.body) == info["config"]["digest"]
        diff_ids = json.loads(to_text(config.body))["rootfs"]["diff_ids"]
        assert diff_ids == [l["diff_id"] for l in info["layers"]]
        for layer in info["layers"]:
            resp = client.get_blob(info["repo"], layer["digest"])
            assert resp.status == 200
            assert len(resp.body) == layer["size"]
            assert sha256_digest(resp.body) == layer["digest"]
            assert sha256_digest(decompress(resp.body)) == layer["diff_id"]


def test_busybox_layer_contents(registry):
    info = registry.images["test/busybox:latest"]
    blob = registry.client().get_blob("test/busybox", info["layers"][0]
                                      ["digest"]).body
    members = tar_members(decompress(blob))
    assert members["bin/busybox"].mode == 0o755
    with open("/bin/busybox", "rb") as binf:
        assert members["bin/busybox#data"] == binf.read()
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == \
        "busybox"
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    for name in ("etc/passwd", "etc/group", "etc/os-release"):
        assert members[name].isfile()
    for name in ("proc", "dev", "sys", "root", "home"):
        assert members[name].isdir()
    config = json.loads(to_text(info["config"]["data"]))
    assert config["config"]["Cmd"] == ["sh"]
    assert config["config"]["Env"][0].startswith("PATH=")
    assert config["os"] == "linux"


def test_multiarch_index_entries_and_markers(registry):
    client = registry.client()
    for ref in ("test/multiarch:latest", "test/multiarch-oci:latest"):
        info = registry.images[ref]
        index = client.get_manifest(info["repo"], "latest").json()
        platforms = []
        for entry in index["manifests"]:
            plat = entry["platform"]
            if plat["os"] == "unknown":  # the buildx attestation entry
                assert ref == "test/multiarch-oci:latest"
                continue
            name = "/".join([plat["os"], plat["architecture"]] +
                            ([plat["variant"]] if "variant" in plat else []))
            platforms.append(name)
            child = client.get_manifest(info["repo"], entry["digest"])
            assert child.status == 200
            assert sha256_digest(child.body) == entry["digest"]
            top = child.json()["layers"][-1]["digest"]
            members = tar_members(decompress(
                client.get_blob(info["repo"], top).body))
            assert members[PLATFORM_FILE + "#data"] == to_bytes(name + "\n")
            assert info["platforms"][name]["digest"] == entry["digest"]
        assert platforms == ["linux/arm/v7", "linux/arm64/v8", "linux/amd64"]


def test_tags_and_access_log_counts(registry):
    client = registry.client()
    assert sorted(client.tags("test/busybox")) == ["1.0", "latest"]
    mark = len(registry.access_log(settle=0.05))
    client.get_manifest("test/busybox", "latest")
    client.get_manifest("test/busybox", "1.0", method="HEAD")
    assert registry.count("GET", "/manifests/", since=mark) == 1
    assert registry.count("HEAD", "/manifests/", since=mark) == 1
    assert registry.count(since=mark) == 2


# ---------------------------------------------------------------------------
# basic and token auth
# ---------------------------------------------------------------------------


def test_basic_auth_refuses_anonymous_and_accepts_alice(registry_basic):
    resp = request("GET", registry_basic.url + "/v2/")
    assert resp.status == 401
    scheme, params = parse_challenge(resp.header("www-authenticate"))
    assert scheme == "basic" and "realm" in params
    anon = registry_basic.client(None)
    assert anon.get_manifest("test/busybox", "latest").status == 401
    alice = registry_basic.client("alice", "secret1")
    resp = alice.get_manifest("test/busybox", "latest")
    assert resp.status == 200
    assert resp.header("docker-content-digest") == \
        registry_basic.images["test/busybox:latest"]["digest"]
    wrong = registry_basic.client("alice", "wrong")
    assert wrong.get_manifest("test/busybox", "latest").status == 401


def test_token_anonymous_pull_of_public_repository(registry_token):
    info = registry_token.images["public/busybox:latest"]
    resp = request("GET", "%s/v2/public/busybox/manifests/latest"
                   % registry_token.url)
    assert resp.status == 401
    scheme, params = parse_challenge(resp.header("www-authenticate"))
    assert scheme == "bearer"
    assert params["realm"] == registry_token.tokens.realm
    assert params["service"] == registry_token.tokens.service
    assert params["scope"] == "repository:public/busybox:pull"
    anon = registry_token.client(None)
    resp = anon.get_manifest("public/busybox", "latest")
    assert resp.status == 200 and sha256_digest(resp.body) == info["digest"]
    blob = anon.get_blob("public/busybox", info["layers"][0]["digest"])
    assert sha256_digest(blob.body) == info["layers"][0]["digest"]
    assert anon.token_fetches == 1  # cached per repository by the client
    stats = registry_token.tokens.stats()
    assert stats["counts"] == {"/token": 1}
    req = stats["requests"][0]
    assert req["account"] == "" and not req["authorization"]
    assert req["access"] == [{"type": "repository", "name": "public/busybox",
                              "actions": ["pull"]}]


def test_token_anonymous_access_to_test_is_denied(registry_token):
    anon = registry_token.client(None)
    resp = anon.get_manifest("test/busybox", "latest")
    assert resp.status == 401
    _, params = parse_challenge(resp.header("www-authenticate"))
    assert params.get("error") == "insufficient_scope"
    assert registry_token.tokens.count(account="") == 1


def test_token_alice_can_pull_and_bad_password_is_refused(registry_token):
    alice = registry_token.client("alice", "secret1")
    resp = alice.get_manifest("test/busybox", "latest")
    assert resp.status == 200
    assert registry_token.tokens.count(account="alice") == 1
    reply = alice.fetch_token(registry_token.tokens.realm,
                              registry_token.tokens.service,
                              ["repository:test/busybox:pull,push",
                               "repository:test/other:pull"])
    assert set(reply) == set(["token", "access_token", "expires_in",
                              "issued_at"])
    assert reply["token"] == reply["access_token"]
    assert reply["expires_in"] == 300
    bad = registry_token.client("alice", "nope")
    with pytest.raises(Exception) as err:
        bad.get_manifest("test/busybox", "latest")
    assert "401" in str(err.value)


def _bearer_get(reg, path, token):
    return request("GET", reg.url + path,
                   headers={"Authorization": "Bearer " + token})


def test_token_expires_after_its_lifetime(registry_token):
    tokens = registry_token.tokens
    tokens.configure(lifetime=2)
    reply = RegistryClient(registry_token.url, "alice", "secret1") \
        .fetch_token(tokens.realm, tokens.service,
                     ["repository:test/busybox:pull"])
    assert reply["expires_in"] == 2
    path = "/v2/test/busybox/manifests/latest"
    assert _bearer_get(registry_token, path, reply["token"]).status == 200
    time.sleep(3.2)  # the lifetime plus the second "exp" may be rounded up
    resp = _bearer_get(registry_token, path, reply["token"])
    assert resp.status == 401
    _, params = parse_challenge(resp.header("www-authenticate"))
    assert params.get("error") == "invalid_token"


def test_token_kid_mode_and_custom_fields(registry_token):
    tokens = registry_token.tokens
    tokens.configure(key_mode="kid", fields=("access_token", "expires_in"))
    client = registry_token.client("alice", "secret1")
    reply = client.fetch_token(tokens.realm, tokens.service,
                               ["repository:test/busybox:pull"])
    assert set(reply) == set(["access_token", "expires_in"])
    header = json.loads(to_text(_b64url_decode(
        reply["access_token"].split(".")[0])))
    assert "kid" in header and "x5c" not in header
    assert len(header["kid"].split(":")) == 12
    assert _bearer_get(registry_token, "/v2/test/busybox/manifests/latest",
                       reply["access_token"]).status == 200


def _b64url_decode(text):
    import base64
    return base64.urlsafe_b64decode(to_bytes(text + "=" * (-len(text) % 4)))


def test_token_stats_endpoint_and_injected_failure(registry_token):
    tokens = registry_token.tokens
    tokens.configure(fail_status=503, fail_count=1)
    resp = request("GET", tokens.realm + "?service=x&scope=repository:a:pull")
    assert resp.status == 503
    resp = request("GET", tokens.realm + "?service=x&scope=repository:a:pull")
    assert resp.status == 200
    stats = request("GET", tokens.url + "/stats").json()
    assert stats["counts"] == {"/token": 2}
    assert [r["status"] for r in stats["requests"]] == [503, 200]


# ---------------------------------------------------------------------------
# the fault proxy
# ---------------------------------------------------------------------------


def _layer(registry):
    info = registry.images["test/busybox:latest"]
    return "/v2/test/busybox/blobs/" + info["layers"][0]["digest"], \
        info["layers"][0]


def _get(url, headers=None, timeout=30):
    """GET returning (status, headers, body) or the exception raised."""
    try:
        resp = request("GET", url, headers=headers, timeout=timeout)
        return resp.status, resp.headers, resp.body
    except (httplib.HTTPException, socket.error, IOError) as exc:
        return exc


def test_fault_proxy_passes_through(registry, fault_proxy):
    path, layer = _layer(registry)
    status, _, body = _get(fault_proxy.url + path)
    assert status == 200 and sha256_digest(body) == layer["digest"]
    resp = request("GET", fault_proxy.url + "/v2/")
    assert resp.status == 200
    recs = fault_proxy.requests
    assert [(r["method"], r["status"], r["fault"]) for r in recs] == \
        [("GET", 200, None), ("GET", 200, None)]
    assert recs[0]["sent"] == layer["size"]


def test_fault_proxy_reset_after_bytes_then_recovers(registry, fault_proxy):
    path, layer = _layer(registry)
    fault_proxy.set(mode="reset", after_bytes=1000, count=1)
    outcome = _get(fault_proxy.url + path)
    assert isinstance(outcome, Exception), outcome
    status, _, body = _get(fault_proxy.url + path)
    assert status == 200 and sha256_digest(body) == layer["digest"]
    recs = fault_proxy.blob_requests()
    assert [(r["fault"], r["sent"]) for r in recs] == \
        [("reset", 1000), (None, layer["size"])]


def test_fault_proxy_reset_is_a_tcp_reset(registry, fault_proxy):
    path, _ = _layer(registry)
    fault_proxy.set(mode="reset", after_bytes=10)
    sock = socket.create_connection(("127.0.0.1", fault_proxy.port), 10)
    sock.sendall(to_bytes("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n"
                          % (path, fault_proxy.host)))
    received = b""
    with pytest.raises(socket.error) as err:
        while True:
            chunk = sock.recv(65536)
            assert chunk, "connection closed with a FIN, not reset"
            received += chunk
    sock.close()
    assert err.value.errno == errno.ECONNRESET
    assert len(received.partition(b"\r\n\r\n")[2]) <= 10


def test_fault_proxy_truncate_gives_short_body(registry, fault_proxy):
    path, _ = _layer(registry)
    fault_proxy.set(mode="truncate", after_bytes=500)
    outcome = _get(fault_proxy.url + path)
    assert isinstance(outcome, httplib.IncompleteRead), outcome
    assert len(outcome.partial) == 500


def test_fault_proxy_status_codes_for_first_requests(registry, fault_proxy):
    path, layer = _layer(registry)
    fault_proxy.set(mode="status", status=500, count=2)
    assert _get(fault_proxy.url + path)[0] == 500
    assert _get(fault_proxy.url + path)[0] == 500
    assert _get(fault_proxy.url + path)[0] == 200
    fault_proxy.set(mode="status", status=429, retry_after=3, count=1)
    status, headers, _ = _get(fault_proxy.url + path)
    assert status == 429 and headers["retry-after"] == "3"
    # manifests are not blobs: never faulted by default
    fault_proxy.set(mode="status", status=500)
    resp = request("GET", fault_proxy.url +
                   "/v2/test/busybox/manifests/latest",
                   headers={"Accept": DOCKER_MANIFEST})
    assert resp.status == 200
    assert [r["status"] for r in fault_proxy.blob_requests()] == \
        [500, 500, 200, 429]


def test_fault_proxy_corrupts_one_byte(registry, fault_proxy):
    path, layer = _layer(registry)
    fault_proxy.set(mode="corrupt", offset=100, count=1)
    status, _, body = _get(fault_proxy.url + path)
    good = _get(fault_proxy.url + path)[2]
    assert status == 200 and len(body) == layer["size"]
    assert sha256_digest(body) != layer["digest"]
    assert sha256_digest(good) == layer["digest"]
    diff = [i for i in range(len(body)) if body[i:i + 1] != good[i:i + 1]]
    assert diff == [100]


def test_fault_proxy_honours_or_ignores_range(registry, fault_proxy):
    path, layer = _layer(registry)
    full = _get(fault_proxy.url + path)[2]
    status, headers, body = _get(fault_proxy.url + path,
                                 {"Range": "bytes=1000-"})
    assert status == 206
    assert headers["content-range"] == "bytes 1000-%d/%d" % (
        layer["size"] - 1, layer["size"])
    assert body == full[1000:]
    fault_proxy.set(range="ignore")
    status, headers, body = _get(fault_proxy.url + path,
                                 {"Range": "bytes=1000-"})
    assert status == 200 and body == full and "content-range" not in headers
    assert [(r["range"], r["status"]) for r in fault_proxy.blob_requests()] \
        == [(None, 200), ("bytes=1000-", 206), ("bytes=1000-", 200)]


def test_fault_proxy_resume_with_range_after_reset(registry, fault_proxy):
    path, layer = _layer(registry)
    fault_proxy.set(mode="reset", after_bytes=4096, count=1)
    assert isinstance(_get(fault_proxy.url + path), Exception)
    got = fault_proxy.blob_requests()[0]["sent"]
    status, _, rest = _get(fault_proxy.url + path,
                           {"Range": "bytes=%d-" % got})
    head = _get(registry.url + path, {"Range": "bytes=0-%d" % (got - 1)})[2]
    assert status == 206
    assert sha256_digest(head + rest) == layer["digest"]


def test_fault_proxy_stall_and_drop(registry, fault_proxy):
    path, layer = _layer(registry)
    fault_proxy.set(mode="stall", seconds=1.0, count=1)
    start = time.time()
    outcome = _get(fault_proxy.url + path, timeout=0.3)
    assert isinstance(outcome, Exception)  # the client timed out
    assert time.time() - start < 1.0
    fault_proxy.set(mode="stall", seconds=0.5, where="mid", after_bytes=100,
                    count=1)
    start = time.time()
    status, _, body = _get(fault_proxy.url + path)
    assert status == 200 and sha256_digest(body) == layer["digest"]
    assert time.time() - start >= 0.5
    fault_proxy.set(mode="drop", count=1)
    assert isinstance(_get(fault_proxy.url + path), Exception)


def test_fault_proxy_keepalive_connection(registry, fault_proxy):
    path, layer = _layer(registry)
    conn = httplib.HTTPConnection("127.0.0.1", fault_proxy.port, timeout=10)
    for _ in range(3):
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        assert sha256_digest(resp.read()) == layer["digest"]
        assert resp.getheader("Connection") != "close"
    conn.close()


# ---------------------------------------------------------------------------
# the image builder and the archive writers
# ---------------------------------------------------------------------------


def _spec():
    return [d("etc"), f("etc/hello", b"hello\n"), f("bin/tool", b"x", 0o755),
            sym("bin/t", "tool"), hard("bin/t2", "bin/tool"),
            fifo("run/fifo"), whiteout("var/old"), opaque("opt")]


def test_builder_is_deterministic():
    for compression in (None, "gzip", "bzip2", "xz", "zstd"):
        if compression == "zstd" and not which("zstd"):
            continue
        one, two = Layer(_spec(), compression), Layer(_spec(), compression)
        assert one.data == two.data and one.digest == two.digest
        assert one.diff_id == sha256_digest(one.tar)
        assert sha256_digest(decompress(one.data)) == one.diff_id
    img1 = Image([Layer(_spec())], {"Cmd": ["sh"]}, "amd64")
    img2 = Image([Layer(_spec())], {"Cmd": ["sh"]}, "amd64")
    for kind in ("docker", "oci"):
        assert img1.manifest(kind).digest == img2.manifest(kind).digest
    assert busybox_layer().digest == busybox_layer().digest
    assert [l.digest for l in multilayer_layers()] == \
        [l.digest for l in multilayer_layers()]
    idx = ImageIndex([img1, Image([Layer(_spec())], {}, "arm64", variant="v8")])
    assert idx.manifest("oci").digest == idx.manifest("oci").digest


def test_builder_tar_members():
    tar = Layer(_spec(), None).tar
    members = tar_members(tar)
    assert members["bin"].isdir()  # parent added automatically
    assert b"bin/\x00" in tar  # directories are written as "name/"
    assert members["bin/t"].issym() and members["bin/t"].linkname == "tool"
    assert members["bin/t2"].islnk() and members["bin/t2"].linkname == \
        "bin/tool"
    assert members["run/fifo"].isfifo()
    assert members["var/.wh.old"].isfile()
    assert members["opt/.wh..wh..opq"].isfile()
    assert members["bin/tool"].mode == 0o755
    assert members["etc/hello"].mtime == 1700000000


def test_flatten_applies_whiteouts(test_images):
    files = test_images["multilayer"].files()
    for gone in ("topfile-to-delete", "topdir-to-delete",
                 "topdir-to-delete/x", "etc/delete-me",
                 "data/sub/dir/gone.txt", "data/todelete/a.txt",
                 "data/todelete/sub", "data/opaque/a.txt",
                 "data/opaque/olddir"):
        assert gone not in files, gone
    for kept in ("data/sub/dir/kept.txt", "data/opaque/c.txt",
                 "data/todelete/new.txt", "data/uncompressed.txt",
                 "bin/busybox", "data/hardlink.txt"):
        assert kept in files, kept
    assert files["data/override.txt"]["data"] == b"layer 4\n"
    assert not [p for p in files if ".wh." in p]


def _run(argv):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate()
    assert proc.returncode == 0, (argv, out, err)
    return to_text(out)


@pytest.mark.skipif(not which("skopeo"), reason="skopeo not installed")
def test_archives_are_readable_by_skopeo(tmp_path, test_images):
    busybox = test_images["busybox"]
    legacy = write_tar(str(tmp_path / "legacy.tar"), docker_archive_files(
        [(busybox, ["test/busybox:latest"])]))
    out = json.loads(_run(["skopeo", "inspect", "docker-archive:" + legacy]))
    assert out["Layers"] == [busybox.layers[0].diff_id]
    modern = write_tar(str(tmp_path / "modern.tar"), docker_archive_files(
        [(busybox, ["test/busybox:latest"])], style="oci"))
    out = json.loads(_run(["skopeo", "inspect", "docker-archive:" + modern]))
    assert out["Layers"] == [busybox.layers[0].diff_id]
    layout = write_tree(str(tmp_path / "oci"), oci_layout_files(
        [(busybox, "latest"), (test_images["multiarch-oci"], "multi")]))
    out = json.loads(_run(["skopeo", "inspect", "--raw",
                           "oci:%s:latest" % layout]))
    assert out["mediaType"] == OCI_MANIFEST
    out = json.loads(_run(["skopeo", "inspect", "--override-arch", "arm64",
                           "oci:%s:multi" % layout]))
    assert out["Architecture"] == "arm64"


@pytest.mark.skipif(not which("umoci"), reason="umoci not installed")
def test_oci_layout_unpacks_like_flatten(tmp_path, test_images):
    multi = test_images["multilayer"]
    layout = write_tree(str(tmp_path / "oci"),
                        oci_layout_files([(multi, "latest")]))
    bundle = str(tmp_path / "bundle")
    _run(["umoci", "unpack", "--rootless", "--image", layout + ":latest",
          bundle])
    rootfs = os.path.join(bundle, "rootfs")
    found = set()
    for top, dirs, files in os.walk(rootfs):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(top, name), rootfs))
    assert found == set(multi.files())
    with open(os.path.join(rootfs, "data/override.txt"), "rb") as inf:
        assert inf.read() == b"layer 4\n"


@pytest.mark.skipif(not which("skopeo"), reason="skopeo not installed")
def test_skopeo_pulls_from_the_token_registry(registry_token):
    host = registry_token.host
    base = ["skopeo", "inspect", "--tls-verify=false", "--raw"]
    out = _run(base + ["docker://%s/public/busybox:latest" % host])
    assert sha256_digest(to_bytes(out)) == \
        registry_token.images["public/busybox:latest"]["digest"]
    out = _run(base + ["--creds", "alice:secret1",
                       "docker://%s/test/multilayer:latest" % host])
    assert sha256_digest(to_bytes(out)) == \
        registry_token.images["test/multilayer:latest"]["digest"]
    assert registry_token.tokens.count(account="alice") >= 1


# ---------------------------------------------------------------------------
# the udocker runner and process clean-up
# ---------------------------------------------------------------------------

FAKE_UDOCKER = r'''
import os, sys, time
if sys.argv[1:2] == ["sleep"]:
    time.sleep(60)
data = sys.stdin.read()
print("args=%s" % " ".join(sys.argv[1:]))
for name in ("HOME", "UDOCKER_DIR", "UDOCKER_NOSYSCONF", "EXTRA",
             "UDOCKER_LEAK", "http_proxy"):
    print("%s=%s" % (name, os.environ.get(name)))
print("stdin=%s" % data.strip())
sys.stderr.write("to stderr\n")
sys.exit(int(os.environ.get("RC", "0")))
'''


def test_runner_environment_and_results(tmp_path, monkeypatch):
    script = tmp_path / "fake.py"
    script.write_text(to_text(FAKE_UDOCKER))
    monkeypatch.setenv("UDOCKER_LEAK", "x")
    monkeypatch.setenv("http_proxy", "http://nowhere:1")
    run = Udocker(str(tmp_path / "t"), script=str(script))
    run.env["EXTRA"] = "e1"
    res = run("pull", "--insecure", "x", input="secret\n", env={"RC": "3"})
    assert res.rc == 3 and res.err == "to stderr\n"
    lines = dict(l.split("=", 1) for l in res.out.splitlines())
    assert lines["args"] == "pull --insecure x"
    assert lines["HOME"] == run.home and os.path.isdir(run.home)
    assert lines["UDOCKER_DIR"] == run.udocker_dir
    assert lines["UDOCKER_NOSYSCONF"] == "1"
    assert lines["EXTRA"] == "e1" and lines["stdin"] == "secret"
    assert lines["UDOCKER_LEAK"] == "None" and lines["http_proxy"] == "None"
    assert "rc=3" in repr(res)
    rc, out, err = res                              # the tuple of a plain subprocess
    assert (rc, out, err) == (res[0], res[1], res[2]) == (3, res.out, res.err)
    proc = run.start("started", env={"RC": "4"})   # not waited for; the same environment
    out, err = proc.communicate(b"in\n")
    assert proc.returncode == 4 and err == b"to stderr\n"
    assert dict(l.split("=", 1) for l in out.decode().splitlines()) == dict(
        lines, args="started", stdin="in")
    root = Udocker(str(tmp_path / "t"), script=str(script), allow_root=True)
    assert root("x").out.splitlines()[0] == "args=%sx" % (
        "--allow-root " if os.geteuid() == 0 else "")
    with pytest.raises(UdockerTimeout):
        run("sleep", timeout=0.5)


def test_udocker_fixture_points_at_the_repository(udocker):
    from support import REPO_ROOT
    assert udocker.script == os.path.join(REPO_ROOT, "udocker.py")
    assert udocker.python
    assert os.path.isdir(udocker.home)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def test_helper_processes_die_with_the_test_process(tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from support.procs import Process\n"
            "p = Process(['sleep', '300'], %r)\n"
            "print(p.pid); sys.stdout.flush(); time.sleep(300)\n"
            % (tests_dir, str(tmp_path / "log")))
    parent = subprocess.Popen([sys.executable, "-c", code],
                              stdout=subprocess.PIPE)
    pgid = int(parent.stdout.readline())
    assert _group_alive(pgid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    deadline = time.time() + 5
    while _group_alive(pgid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pgid)


def test_a_timeout_also_kills_what_left_the_session_holding_the_output():
    """A process that left the session (setsid) but keeps stdout open: the timeout kills it
    too, instead of communicate() waiting for it forever."""
    start = time.time()
    rc, out, err, expired = run_in_session(
        ["sh", "-c", "setsid sleep 600 & echo started; sleep 600"], timeout=2)
    assert expired and out == b"started\n" and time.time() - start < 30
