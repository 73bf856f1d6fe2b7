# -*- coding: utf-8 -*-
"""Registry client (section 6) against a real docker-registry on 127.0.0.1."""
from __future__ import print_function, absolute_import, division

import hashlib
import json
import os
import stat
import threading

import pytest

import udocker as ud
from support import images as support_images
from support import one_error_line


def layer_digests(info):
    return [l["digest"] for l in info["layers"]]


def tag_dir(run, name, tag="latest"):
    return os.path.join(run.udocker_dir, "repos", name, tag)


def assert_pulled(run, name, info, tag="latest"):
    """The tag directory has upstream's layout and the blobs hash to their names."""
    tdir = tag_dir(run, name, tag)
    with open(os.path.join(tdir, "TAG")) as handle:
        assert handle.read() == os.path.join(run.udocker_dir, "repos", name) + ":" + tag
    assert os.path.isfile(os.path.join(tdir, "v2"))
    with open(os.path.join(tdir, "manifest"), "rb") as handle:
        assert handle.read() == info["manifest"]
    wanted = layer_digests(info) + [info["config"]["digest"]]
    links = sorted(n for n in os.listdir(tdir) if os.path.islink(os.path.join(tdir, n)))
    assert links == sorted(set(wanted))
    for name_ in links:
        target = os.readlink(os.path.join(tdir, name_))
        assert not os.path.isabs(target)
        with open(os.path.join(tdir, name_), "rb") as handle:
            assert "sha256:" + hashlib.sha256(handle.read()).hexdigest() == name_


def leftovers(run):
    """Temporary files a pull may have left in layers/ or repos/."""
    found = []
    for top in ("layers", "repos"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(run.udocker_dir, top)):
            for name in filenames + dirnames:
                if ".partial" in name or ".tmp" in name or ".new-" in name or ".old-" in name:
                    found.append(os.path.join(dirpath, name))
    return found


# -- pulling ------------------------------------------------------------------------------

@pytest.mark.parametrize("repo", ["test/busybox", "test/busybox-oci", "test/multilayer"])
def test_pull_docker_and_oci_media_types(udocker, registry, repo):
    ref = "%s/%s" % (registry.host, repo)
    udocker("pull", ref).check()
    info = registry.images[repo + ":latest"]
    assert_pulled(udocker, "%s/%s" % (registry.host, repo), info)
    res = udocker("images", "-l").check()
    assert "%s:latest    ." % ref in res.out
    assert udocker("verify", ref).check()
    config = json.loads(udocker("inspect", ref).check().out)
    assert config["rootfs"]["diff_ids"] == [l["diff_id"] for l in info["layers"]]


def test_pull_record_keeps_digest_and_platform(udocker, registry):
    ref = "%s/test/busybox:1.0" % registry.host
    udocker("pull", ref).check()
    record = json.load(open(os.path.join(udocker.udocker_dir, "repos", registry.host,
                                         "test", "busybox", ".1.0.json")))
    assert record["manifest_digest"] == registry.images["test/busybox:1.0"]["digest"]
    assert record["platform"] == registry.images["test/busybox:1.0"]["platform"]
    res = udocker("images", "-p").check()
    assert "%-18.18s . %s" % (record["platform"], ref) in res.out


def test_repull_costs_one_manifest_request_and_no_blob(udocker, registry):
    ref = "%s/test/multilayer" % registry.host
    udocker("pull", ref).check()
    mark = len(registry.access_log())
    res = udocker("pull", ref).check()
    assert "up to date" in res.err
    new = registry.access_log()[mark:]
    assert [r for r in new if "/manifests/" in r["path"]] and \
        len([r for r in new if "/manifests/" in r["path"]]) == 1, new
    assert not [r for r in new if "/blobs/" in r["path"]], new


def test_repull_of_index_is_one_request(udocker, registry):
    ref = "%s/test/multiarch" % registry.host
    udocker("pull", ref).check()
    mark = len(registry.access_log())
    udocker("pull", ref).check()
    new = registry.access_log()[mark:]
    assert len(new) == 1 and "/manifests/latest" in new[0]["path"], new


def test_pull_by_digest(udocker, registry):
    info = registry.images["test/busybox:latest"]
    ref = "%s/test/busybox@%s" % (registry.host, info["digest"])
    udocker("pull", ref).check()
    assert_pulled(udocker, "%s/test/busybox" % registry.host, info, tag=info["digest"])
    udocker("verify", ref).check()


def read_platform_marker(run, name):
    """The /etc/test-platform marker from the pulled image's last layer."""
    import tarfile
    tdir = tag_dir(run, name)
    manifest = json.load(open(os.path.join(tdir, "manifest")))
    with tarfile.open(os.path.join(tdir, manifest["layers"][-1]["digest"])) as tar:
        return tar.extractfile(support_images.PLATFORM_FILE.lstrip("/")).read().decode()


@pytest.mark.parametrize("platform,expected", [
    (None, "linux/amd64"), ("linux/arm64", "linux/arm64/v8"), ("linux/arm64/v8",
                                                               "linux/arm64/v8"),
    ("linux/arm/v7", "linux/arm/v7"), ("LINUX/AMD64", "linux/amd64"), ("arm64",
                                                                     "linux/arm64/v8")])
@pytest.mark.parametrize("repo", ["test/multiarch", "test/multiarch-oci"])
def test_platform_selection(udocker, registry, repo, platform, expected):
    if platform is None and udocker_host_arch() != "amd64":
        pytest.skip("host is not amd64")
    args = ["pull"] + (["--platform=" + platform] if platform else []) + \
        ["%s/%s" % (registry.host, repo)]
    udocker(*args).check()
    assert read_platform_marker(udocker, "%s/%s" % (registry.host, repo)).strip() == expected


def udocker_host_arch():
    return ud.Platform.host().arch


def test_platform_not_in_index(udocker, registry):
    res = udocker("pull", "--platform=linux/s390x", "%s/test/multiarch" % registry.host)
    assert res.rc == 1
    assert "no image for platform linux/s390x" in res.err
    assert "linux/arm64/v8" in res.err and "unknown" not in res.err.split("available")[1]


def test_manifest_inspect(udocker, registry):
    ref = "%s/test/multiarch-oci" % registry.host
    res = udocker("manifest", "inspect", ref).check()
    doc = json.loads(res.out)
    assert doc["mediaType"] == ud.MT_OCI_INDEX
    res = udocker("manifest", "inspect", "--platform=linux/arm/v7", ref).check()
    assert json.loads(res.out)["mediaType"] == ud.MT_OCI_MANIFEST
    assert not os.path.exists(os.path.join(udocker.udocker_dir, "repos", registry.host))


def test_rmi_keeps_shared_layers(udocker, registry):
    udocker("pull", "%s/test/busybox" % registry.host).check()
    udocker("pull", "%s/test/multilayer" % registry.host).check()
    layers = os.path.join(udocker.udocker_dir, "layers")
    base = registry.images["test/busybox:latest"]["layers"][0]["digest"]
    only_multi = registry.images["test/multilayer:latest"]["layers"][-1]["digest"]
    udocker("rmi", "%s/test/multilayer" % registry.host).check()
    assert os.path.exists(os.path.join(layers, base))
    assert not os.path.exists(os.path.join(layers, only_multi))
    assert not os.path.exists(tag_dir(udocker, "%s/test/multilayer" % registry.host))
    udocker("verify", "%s/test/busybox" % registry.host).check()


def test_protect_blocks_rmi(udocker, registry):
    ref = "%s/test/busybox" % registry.host
    udocker("pull", ref).check()
    udocker("protect", ref).check()
    res = udocker("rmi", ref)
    assert res.rc == 1 and "protected" in res.err
    assert "%s:latest    P" % ref in udocker("images").out
    udocker("unprotect", ref).check()
    udocker("rmi", ref).check()


def test_tag_gives_second_name(udocker, registry):
    ref = "%s/test/busybox" % registry.host
    udocker("pull", ref).check()
    udocker("tag", ref, "mine/bb:v1").check()
    udocker("verify", "mine/bb:v1").check()
    udocker("rmi", ref).check()
    udocker("verify", "mine/bb:v1").check()


def test_verify_names_corrupt_and_missing_layers(udocker, registry):
    ref = "%s/test/multilayer" % registry.host
    udocker("pull", ref).check()
    info = registry.images["test/multilayer:latest"]
    layers = os.path.join(udocker.udocker_dir, "layers")
    bad, gone = info["layers"][1]["digest"], info["layers"][2]["digest"]
    with open(os.path.join(layers, bad), "r+b") as handle:
        handle.seek(10)
        handle.write(b"X")
    os.unlink(os.path.join(layers, gone))
    res = udocker("verify", ref)
    assert res.rc == 1
    assert "corrupt (sha256 mismatch): %s" % bad in res.err
    assert gone in res.err
    assert res.err.strip().splitlines()[-1].startswith("Error: image verification failure")
    udocker("pull", ref).check()                     # a pull repairs what is missing...
    assert os.path.exists(os.path.join(layers, gone))


def test_search_catalog_and_tags(udocker, registry):
    res = udocker("search", "--registry=http://" + registry.host, "busybox").check()
    names = res.out.split()
    assert "test/busybox" in names and "test/multilayer" not in names
    res = udocker("search", "--list-tags", "%s/test/busybox" % registry.host).check()
    assert sorted(res.out.split()) == ["1.0", "latest"]


# -- authentication -----------------------------------------------------------------------

def test_basic_auth(udocker, registry_basic):
    ref = "%s/test/busybox" % registry_basic.host
    res = udocker("pull", ref)
    assert res.rc == 1 and "login" in res.err and "Traceback" not in res.err
    res = udocker("login", "--registry=" + registry_basic.url, "--username=alice",
                  "--password=wrong")
    assert res.rc == 1 and "bad username or password" in res.err
    keystore = os.path.join(udocker.home, ".udocker", "keystore")
    assert not os.path.exists(keystore)
    udocker("login", "--registry=" + registry_basic.url, "--username=alice",
            "--password-stdin", input="secret1\n").check()
    assert stat.S_IMODE(os.stat(keystore).st_mode) == 0o600
    data = json.load(open(keystore))
    assert data[registry_basic.url]["auth"] == udocker_b64("alice:secret1")
    udocker("pull", ref).check()
    udocker("verify", ref).check()
    udocker("logout", "--registry=" + registry_basic.url).check()
    assert udocker("pull", "%s/test/multilayer" % registry_basic.host).rc == 1


def udocker_b64(text):
    import base64
    return base64.b64encode(text.encode()).decode()


def test_docker_config_json_credentials(udocker, registry_basic):
    cfgdir = os.path.join(udocker.home, ".docker")
    os.makedirs(cfgdir)
    with open(os.path.join(cfgdir, "config.json"), "w") as handle:
        json.dump({"auths": {registry_basic.host: {"auth": udocker_b64("alice:secret1")}}},
                  handle)
    udocker("pull", "%s/test/busybox" % registry_basic.host).check()


def test_token_auth_anonymous_public_and_denied(udocker, registry_token):
    udocker("pull", "%s/public/busybox" % registry_token.host).check()
    res = udocker("pull", "%s/test/busybox" % registry_token.host)
    assert res.rc == 1 and "Traceback" not in res.err
    assert "denied" in res.err or "login" in res.err


def test_token_auth_login_and_token_cached(udocker, registry_token):
    udocker("login", "--registry=" + registry_token.url, "--username=alice",
            "--password=secret1").check()
    before = registry_token.tokens.count()
    udocker("pull", "%s/test/multilayer" % registry_token.host).check()
    # one token for the whole pull (manifest + every blob), not one per request
    assert registry_token.tokens.count() - before == 1


def test_token_login_with_bad_password(udocker, registry_token):
    res = udocker("login", "--registry=" + registry_token.url, "--username=alice",
                  "--password=nope")
    assert res.rc == 1 and "bad username or password" in res.err


@pytest.fixture
def fault_proxy_token(registry_token):
    from support.faultproxy import FaultProxy
    proxy = FaultProxy(registry_token.url).start()
    yield proxy
    proxy.stop()


def test_token_expiry_refreshes(udocker, registry_token, fault_proxy_token):
    # tokens live 2 s; one blob is held back 3 s, so the next requests need a new token
    registry_token.tokens.configure(lifetime=2)
    fault_proxy_token.set(mode="stall", seconds=3, count=1)
    udocker("login", "--registry=" + fault_proxy_token.url, "--username=alice",
            "--password=secret1").check()
    udocker("pull", "--registry=" + fault_proxy_token.url, "test/multilayer").check()
    udocker("verify", "test/multilayer").check()
    assert registry_token.tokens.count() >= 2


# -- faults -------------------------------------------------------------------------------

def big_layer(registry, repo="test/multilayer"):
    """The digest of the busybox layer (~1 MB), so a fault hits a blob that is large."""
    return registry.images[repo + ":latest"]["layers"][0]["digest"]


def pull_via(udocker, proxy, repo="test/multilayer", *extra):
    return udocker("pull", "--registry=" + proxy.url, *(list(extra) + [repo]))


def test_reset_mid_blob_is_retried(udocker, fault_proxy, registry):
    # after an RST the kernel may drop bytes we had not read yet: retried, maybe resumed
    digest = big_layer(registry)
    fault_proxy.set(mode="reset", after_bytes=300000, count=2, match=digest)
    pull_via(udocker, fault_proxy).check()
    # both resets happened (two requests cut short) and a third one completed the blob
    assert len([r for r in fault_proxy.blob_requests() if digest in r["path"]]) >= 3
    udocker("verify", "test/multilayer").check()
    assert not leftovers(udocker)


def test_short_body_resumes_with_range(udocker, fault_proxy, registry):
    fault_proxy.set(mode="truncate", after_bytes=300000, count=2, match=big_layer(registry))
    pull_via(udocker, fault_proxy).check()
    ranged = [r for r in fault_proxy.blob_requests() if r["range"]]
    assert ranged and all(r["status"] == 206 for r in ranged), fault_proxy.requests
    udocker("verify", "test/multilayer").check()
    assert not leftovers(udocker)


def test_server_ignoring_range_restarts(udocker, fault_proxy, registry):
    fault_proxy.set(mode="truncate", after_bytes=300000, count=1, range="ignore",
                    match=big_layer(registry))
    pull_via(udocker, fault_proxy).check()
    assert [r["status"] for r in fault_proxy.blob_requests()
            if big_layer(registry) in r["path"]] == [200, 200]
    udocker("verify", "test/multilayer").check()


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_statuses_are_retried(udocker, fault_proxy, status):
    fault_proxy.set(mode="status", status=status, count=2, retry_after=1)
    pull_via(udocker, fault_proxy).check()
    udocker("verify", "test/multilayer").check()
    assert [r["status"] for r in fault_proxy.requests].count(status) == 2, fault_proxy.requests


# Retry-After (RFC 9110 10.2.3): delay-seconds or an HTTP-date; anything else is ignored
# (our own backoff), a date in the past means now, a wait above pull_retry_after_max ends
# the pull with one line naming the registry's wait.
PAST = "Wed, 21 Oct 2015 07:28:00 GMT"
FAR = "Fri, 31 Dec 9999 23:59:59 GMT"


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1.5", PAST, "0"])
def test_odd_retry_after_is_retried(udocker, fault_proxy, value):
    fault_proxy.set(mode="status", status=503, count=2, retry_after=value)
    res = pull_via(udocker, fault_proxy).check()
    assert "internal error" not in res.err
    # (parallel downloads: the two 503s need not be the first two requests recorded)
    assert [r["status"] for r in fault_proxy.blob_requests()].count(503) == 2
    udocker("verify", "test/multilayer").check()


@pytest.mark.parametrize("value,shown", [("100000", "100000 s"), (FAR, FAR)])
def test_too_long_retry_after_is_one_clear_error(udocker, fault_proxy, value, shown):
    fault_proxy.set(mode="status", status=429, count=1, retry_after=value)
    line = one_error_line(pull_via(udocker, fault_proxy), rc=1)
    assert shown in line and "pull_retry_after_max (300 s)" in line
    assert fault_proxy.url in line and "429" in line


def test_retry_after_maximum_is_configurable(udocker, fault_proxy):
    conf = os.path.join(udocker.udocker_dir + ".conf")
    with open(conf, "w") as handle:
        handle.write("[DEFAULT]\npull_retry_after_max = 0.5\n")
    fault_proxy.set(mode="status", status=503, count=1, retry_after="1")
    res = udocker("--config=" + conf, "pull", "--registry=" + fault_proxy.url,
                  "test/multilayer")
    assert res.rc == 1 and "(Retry-After: 1), longer than pull_retry_after_max (0.5 s)" \
        in res.err, res


def test_retry_after_parsing():
    now = 1700000000.0
    parse = ud.retry_after_seconds
    assert [parse(v, now) for v in ("-1", "nan", "inf", "1.5", "", None, "soon")] == \
        [None] * 7
    assert parse("120", now) == 120.0 and parse(" 7 ", now) == 7.0
    assert parse(PAST, now) == 0.0
    assert parse("Tue, 14 Nov 2023 22:15:00 GMT", now) == 100.0     # IMF-fixdate
    assert parse("Tue Nov 14 22:15:00 2023", now) == 100.0          # asctime
    assert parse(FAR, now) > 1e9


def test_persistent_500_gives_up_cleanly(udocker, fault_proxy):
    fault_proxy.set(mode="status", status=500)
    res = pull_via(udocker, fault_proxy)
    assert res.rc == 1 and "gave up" in res.err and "Traceback" not in res.err
    assert not os.path.exists(tag_dir(udocker, "test/multilayer"))
    assert not leftovers(udocker) or all(".partial" in p for p in leftovers(udocker))


def test_404_is_not_retried(udocker, registry):
    res = udocker("pull", "%s/test/nosuchimage" % registry.host)
    assert res.rc == 1 and "not found" in res.err
    assert len([l for l in res.err.splitlines() if l.startswith("Error")]) == 1


def test_corrupt_blob_fails_and_leaves_nothing(udocker, fault_proxy):
    fault_proxy.set(mode="corrupt")
    res = pull_via(udocker, fault_proxy)
    assert res.rc == 1 and "does not match its digest" in res.err
    assert not os.path.exists(tag_dir(udocker, "test/multilayer"))
    assert not leftovers(udocker)
    layers = os.path.join(udocker.udocker_dir, "layers")
    for name in os.listdir(layers):                 # whatever is there is intact
        with open(os.path.join(layers, name), "rb") as handle:
            assert "sha256:" + hashlib.sha256(handle.read()).hexdigest() == name


def test_stall_times_out_and_retries(udocker, fault_proxy, registry):
    conf = os.path.join(udocker.udocker_dir + ".conf")
    with open(conf, "w") as handle:
        handle.write("[DEFAULT]\ntimeout = 1.5\n")
    digest = big_layer(registry)
    fault_proxy.set(mode="stall", seconds=6, where="mid", after_bytes=200000, count=1,
                    match=digest)
    udocker("--config=" + conf, "pull", "--registry=" + fault_proxy.url,
            "test/multilayer").check()
    udocker("verify", "test/multilayer").check()
    # the stalled download was given up and asked for again: had the timeout been ignored,
    # the stall would have ended after 6 s and the first request would have completed
    asked = [r for r in fault_proxy.blob_requests() if digest in r["path"]]
    assert len(asked) >= 2, asked


def test_interrupted_pull_resumes_next_time(udocker, fault_proxy, registry):
    # the first pull dies in the middle of a blob; the partial file is kept and resumed
    conf = os.path.join(udocker.udocker_dir + ".conf")
    with open(conf, "w") as handle:
        handle.write("[DEFAULT]\npull_retries = 0\n")
    fault_proxy.set(mode="truncate", after_bytes=100000, count=1,
                    match=big_layer(registry, "test/busybox"))
    res = udocker("--config=" + conf, "pull", "--registry=" + fault_proxy.url,
                  "test/busybox")
    assert res.rc == 1
    assert [p for p in leftovers(udocker) if p.endswith(".partial")]
    fault_proxy.clear()
    pull_via(udocker, fault_proxy, "test/busybox").check()
    ranged = [r for r in fault_proxy.blob_requests() if r["range"]]
    assert ranged and ranged[0]["range"].startswith("bytes=")
    assert int(ranged[0]["range"][6:].rstrip("-")) > 0
    udocker("verify", "test/busybox").check()
    assert not leftovers(udocker)


# -- big blobs: hashed in a thread of their own while they stream ---------------------------

@pytest.fixture
def big_blob(registry):
    """test/bigblob: one uncompressed layer of 3 MiB of random bytes, more than the
    4 chunks from which a blob's sha256 is computed in a thread beside the download."""
    assert 3 << 20 > 4 * ud.BlobDownloads.CHUNK
    data = os.urandom(3 << 20)
    layer = support_images.Layer([support_images.f("big.bin", data)], compression=None)
    image = support_images.Image([layer], config={"Cmd": ["sh"]})
    support_images.push_image(registry.client(), "test/bigblob", ["latest"], image)
    return layer.digest


def test_big_blob_is_verified_and_resumed(udocker, fault_proxy, big_blob):
    fault_proxy.set(mode="truncate", after_bytes=1500000, count=1, match=big_blob)
    pull_via(udocker, fault_proxy, "test/bigblob").check()
    ranged = [r for r in fault_proxy.blob_requests() if r["range"]]
    assert ranged and ranged[0]["range"].startswith("bytes=")
    udocker("verify", "test/bigblob").check()
    assert not leftovers(udocker)


def test_big_corrupt_blob_fails_and_leaves_nothing(udocker, fault_proxy, big_blob):
    fault_proxy.set(mode="corrupt", match=big_blob)
    res = pull_via(udocker, fault_proxy, "test/bigblob")
    assert res.rc == 1 and "does not match its digest" in res.err, res.err
    assert not leftovers(udocker)
    assert not os.path.exists(os.path.join(udocker.udocker_dir, "layers", big_blob))


def test_big_blob_is_hashed_beside_its_download(monkeypatch, tmpdir, fault_proxy, big_blob):
    # in this process, to see that the blob, alone in its pull, is hashed by the helper
    # thread (and that a corrupt copy still fails there)
    pipes = []
    real_pipe = ud._HashPipe

    class CountedPipe(real_pipe):
        def __init__(self, *args):
            pipes.append(self)
            real_pipe.__init__(self, *args)

    monkeypatch.setattr(ud, "_HashPipe", CountedPipe)

    def pull(top):
        cfg = ud.Config.load({"HOME": str(tmpdir), "UDOCKER_DIR": top,
                              "UDOCKER_NOSYSCONF": "1"}, {})
        session = ud.Session(cfg)
        puller = ud.Puller(cfg, session.repo, session.keystore, fault_proxy.url, quiet=True)
        puller.pull(ud.ImageRef.parse("test/bigblob"))
        return os.path.join(top, "layers", big_blob)

    with open(pull(str(tmpdir.join("ok"))), "rb") as handle:
        assert "sha256:" + hashlib.sha256(handle.read()).hexdigest() == big_blob
    assert len(pipes) == 1
    fault_proxy.set(mode="corrupt", match=big_blob)
    with pytest.raises(ud.DigestMismatch):
        pull(str(tmpdir.join("corrupt")))
    assert len(pipes) == 2
    assert not [n for n in os.listdir(str(tmpdir.join("corrupt", "layers"))) if big_blob in n]


def test_big_blob_is_written_in_small_calls(monkeypatch, tmpdir, registry, big_blob):
    # read 512 KiB at a time, written WRITE bytes per call (cheaper on ext4 for big blobs)
    sizes = []
    real_write = os.write

    def write(fd, data):
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(ud.os, "write", write)
    cfg = ud.Config.load({"HOME": str(tmpdir), "UDOCKER_DIR": str(tmpdir.join("top")),
                          "UDOCKER_NOSYSCONF": "1"}, {})
    session = ud.Session(cfg)
    ud.Puller(cfg, session.repo, session.keystore, registry.url,
              quiet=True).pull(ud.ImageRef.parse("test/bigblob"))
    monkeypatch.undo()
    assert sum(sizes) > 3 << 20 and max(sizes) == ud.BlobDownloads.WRITE < ud.BlobDownloads.CHUNK
    with open(str(tmpdir.join("top", "layers", big_blob)), "rb") as handle:
        assert "sha256:" + hashlib.sha256(handle.read()).hexdigest() == big_blob


def test_write_all_writes_everything_in_pieces(tmpdir):
    data = os.urandom(200001)
    path = str(tmpdir.join("out"))
    for most in (None, 65536, 7):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            ud.write_all(fd, memoryview(data), most)
        finally:
            os.close(fd)
        with open(path, "rb") as handle:
            assert handle.read() == data


def test_hash_pipe_hashes_every_chunk_in_order():
    chunks = [os.urandom(n) for n in (1, 65536, 4096, 300000, 7, 65536, 1 << 19)]
    hasher = hashlib.sha256()
    pipe = ud._HashPipe(hasher, [bytearray(1 << 19) for _ in range(3)])
    for chunk in chunks:
        buf = pipe.free_buffer()
        buf[:len(chunk)] = chunk
        pipe.hash(buf, len(chunk))
    pipe.close()
    assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_feed_range_hashes_the_range_only(tmpdir):
    data = os.urandom(300000)
    path = str(tmpdir.join("blob"))
    with open(path, "wb") as handle:
        handle.write(data)
    hasher = hashlib.sha256()
    with ud.io.open(path, "rb", buffering=0) as handle:
        handle.seek(1000)
        ud._feed_range(handle, hasher, 200000, bytearray(65536))
        assert hasher.hexdigest() == hashlib.sha256(data[1000:201000]).hexdigest()
        assert handle.tell() == 201000
        ud._feed_range(handle, hasher, 10 ** 9, bytearray(65536))      # stops at the end
    assert hasher.hexdigest() == hashlib.sha256(data[1000:]).hexdigest()


# -- split (segmented) downloads of large blobs --------------------------------------------

def split_conf(udocker, extra=""):
    """A config that splits blobs of 200 KB and more into 64 KB segments, always."""
    conf = udocker.udocker_dir + ".conf"
    with open(conf, "w") as handle:
        handle.write("[DEFAULT]\npull_split_size = 200000\npull_segment_size = 65536\n"
                     "pull_split_rate = inf\n" + extra)
    return "--config=" + conf


def test_large_blobs_come_in_parallel_segments(udocker, fault_proxy, registry):
    udocker(split_conf(udocker), "pull", "--registry=" + fault_proxy.url,
            "test/multilayer").check()
    big = [r for r in fault_proxy.blob_requests() if big_layer(registry) in r["path"]]
    assert len(big) > 4 and all(r["range"] and r["status"] == 206 for r in big)
    udocker("verify", "test/multilayer").check()
    assert not leftovers(udocker)


def test_split_download_resumes_by_segments(udocker, fault_proxy, registry):
    # an interrupted split download: the first half of the segments are in, the rest holes
    conf = split_conf(udocker)
    udocker(conf, "pull", "--registry=" + fault_proxy.url, "test/busybox").check()
    digest = big_layer(registry, "test/busybox")
    layers = os.path.join(udocker.udocker_dir, "layers")
    partial = os.path.join(layers, "." + digest + ".partial")
    os.rename(os.path.join(layers, digest), partial)
    size = os.path.getsize(partial)
    segments = (size + 65535) // 65536
    half = segments // 2
    with open(partial, "r+b") as handle:
        handle.seek(half * 65536)
        handle.write(b"\0" * (size - half * 65536))
    with open(partial + ".json", "w") as handle:
        json.dump({"size": size, "segment": 65536, "done": list(range(half))}, handle)
    udocker("rmi", "test/busybox").check()
    fault_proxy.clear()
    udocker(conf, "pull", "--registry=" + fault_proxy.url, "test/busybox").check()
    ranges = sorted(int(r["range"][6:].split("-")[0]) for r in fault_proxy.blob_requests()
                    if digest in r["path"])
    assert ranges == [i * 65536 for i in range(half, segments)]
    udocker("verify", "test/busybox").check()
    assert not leftovers(udocker)


def test_split_download_falls_back_when_range_is_ignored(udocker, fault_proxy, registry):
    fault_proxy.set(range="ignore")
    udocker(split_conf(udocker), "pull", "--registry=" + fault_proxy.url,
            "test/multilayer").check()
    udocker("verify", "test/multilayer").check()
    assert not leftovers(udocker)


def test_split_download_with_corrupt_segment_fails_cleanly(udocker, fault_proxy, registry):
    fault_proxy.set(mode="corrupt", match=big_layer(registry))
    res = udocker(split_conf(udocker), "pull", "--registry=" + fault_proxy.url,
                  "test/multilayer")
    assert res.rc == 1 and "does not match its digest" in res.err
    assert not leftovers(udocker)
    assert not os.path.exists(os.path.join(udocker.udocker_dir, "layers",
                                           big_layer(registry)))


def test_concurrent_split_pulls(udocker, registry):
    conf = split_conf(udocker)
    results = []
    threads = [threading.Thread(target=lambda: results.append(udocker(
        conf, "pull", "%s/test/multilayer" % registry.host))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.rc for r in results] == [0, 0, 0], results
    udocker("verify", "%s/test/multilayer" % registry.host).check()
    assert not leftovers(udocker)


# -- concurrency --------------------------------------------------------------------------

def test_four_concurrent_pulls_of_one_image(udocker, registry):
    ref = "%s/test/multilayer" % registry.host
    results = []

    def pull():
        results.append(udocker("pull", ref))

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.rc for r in results] == [0, 0, 0, 0], results
    udocker("verify", ref).check()
    assert_pulled(udocker, "%s/test/multilayer" % registry.host,
                  registry.images["test/multilayer:latest"])
    assert not leftovers(udocker)


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["Busybox", "a//b", "x:", "x@sha256:abc", "-x", "a b",
                                 "/abs", "..", "x/../y"])
def test_malformed_references(udocker, ref):
    res = udocker("pull", ref)
    assert res.rc != 0 and "Traceback" not in res.err
    assert res.err.strip().startswith("Error:") or "Error:" in res.err.splitlines()[-1]


def test_unwritable_udocker_dir(udocker, registry, tmpdir):
    top = tmpdir.join("ro")
    top.ensure(dir=True)
    top.chmod(0o555)
    try:
        res = udocker("pull", "%s/test/busybox" % registry.host,
                      env={"UDOCKER_DIR": str(top.join("ud"))})
        assert res.rc == 1 and "Traceback" not in res.err
        assert "cannot create repository" in res.err or "not writable" in res.err
    finally:
        top.chmod(0o755)


def test_connection_refused_is_one_line(udocker):
    from support import free_port
    res = udocker("pull", "127.0.0.1:%d/x/y" % free_port(),
                  env={"UDOCKER_DIR": None}, timeout=120)
    one_error_line(res, rc=1)


class LoopbackServer(object):
    """An HTTP server with a handler class, serving on 127.0.0.1:<free port> in a thread."""

    def serve(self, handler, threaded=False):
        from support import HTTPServer, ThreadingMixIn

        class Server(ThreadingMixIn, HTTPServer):
            daemon_threads = True

        self.server = (Server if threaded else HTTPServer)(("127.0.0.1", 0), handler)
        self.host = "127.0.0.1:%d" % self.server.server_address[1]
        self.url = "http://" + self.host
        thread = threading.Thread(target=self.server.serve_forever)
        thread.daemon = True
        thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class FakeRegistry(LoopbackServer):
    """A registry that sends a chosen manifest body and content type."""

    def __init__(self, body, content_type, blobs=None):
        from support import BaseHTTPRequestHandler
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):                       # noqa: N802
                data = outer.body if "/manifests/" in self.path else \
                    (blobs or {}).get(self.path.rsplit("/", 1)[-1], b"{}")
                self.send_response(200)
                self.send_header("Content-Type", outer.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.body, self.content_type = body, content_type
        self.serve(Handler)


@pytest.mark.parametrize("body,ctype,needle", [
    (b"<html>not json</html>", "application/vnd.oci.image.manifest.v1+json",
     "not valid JSON"),
    (b'{"schemaVersion": 2, "mediaType": "application/x-weird"}', "application/x-weird",
     "unsupported manifest media type"),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}',
     "application/vnd.oci.image.manifest.v1+json", "malformed manifest"),
    (b'{"schemaVersion": 2, "config": {"digest": "md5:abc"}, "layers": []}',
     "application/vnd.oci.image.manifest.v1+json", "invalid blob digest"),
])
def test_bad_manifests(udocker, body, ctype, needle):
    fake = FakeRegistry(body, ctype)
    try:
        res = udocker("pull", "%s/x/y" % fake.host)
    finally:
        fake.stop()
    assert res.rc == 1 and needle in res.err and "Traceback" not in res.err


# -- unit: parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("text,name,host,remote,tag,digest", [
    ("busybox", "busybox", "docker.io", "library/busybox", "latest", ""),
    ("library/busybox:1.36", "library/busybox", "docker.io", "library/busybox", "1.36", ""),
    ("localhost:5000/x/y:tag", "localhost:5000/x/y", "localhost:5000", "x/y", "tag", ""),
    ("localhost/x", "localhost/x", "localhost", "x", "latest", ""),
    ("ghcr.io/o/i@sha256:" + "a" * 64, "ghcr.io/o/i", "ghcr.io", "o/i", "", "sha256:" + "a" * 64),
    ("docker.io/python", "docker.io/python", "docker.io", "library/python", "latest", ""),
    ("quay.io/org/name", "quay.io/org/name", "quay.io", "org/name", "latest", ""),
    ("user/repo:v1.2-x", "user/repo", "docker.io", "user/repo", "v1.2-x", ""),
])
def test_image_reference_parsing(text, name, host, remote, tag, digest):
    ref = ud.ImageRef.parse(text)
    assert (ref.name, ref.host, ref.remote, ref.tag, ref.digest) == \
        (name, host, remote, tag, digest)


def test_www_authenticate_parsing():
    scheme, params = ud._parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="reg",'
        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"')
    assert scheme == "bearer"
    assert params["scope"] == "repository:a/b:pull,push repository:c:pull"
    assert params["realm"] == "https://auth.example/token"


def test_platform_matching():
    arm64 = ud.Platform.parse("linux/arm64")
    assert arm64.matches("linux", "arm64", "") and arm64.matches("linux", "arm64", "v8")
    assert not ud.Platform.parse("linux/arm/v7").matches("linux", "arm", "v6")
    assert ud.Platform.parse("linux/arm").matches("linux", "arm", "v7")
    index = {"manifests": [
        {"digest": "a", "platform": {"os": "linux", "architecture": "arm"}},
        {"digest": "b", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
        {"digest": "c", "platform": {"os": "unknown", "architecture": "unknown"}}]}
    assert ud.select_platform(index, ud.Platform.parse("linux/arm/v7"),
                                   "x")["digest"] == "b"
    for alias, name in (("x86_64", "amd64"), ("aarch64", "arm64"), ("i386", "386")):
        assert ud.Platform.parse("linux/" + alias).arch == name
        assert ud.Platform.parse(alias).arch == name
        assert ud.RunContainer("c", None, "/", {"architecture": alias}).arch() == name


def test_platform_text_of_configs_and_index_entries():
    """One reading of os/arch/variant for images, ps, load and pull."""
    assert ud.platform_text({"os": "linux", "architecture": "arm", "variant": "v7"}) == \
        "linux/arm/v7"
    assert ud.platform_text({"architecture": "amd64"}) == "unknown/amd64"
    assert ud.platform_text({"os": "linux", "variant": ""}) == "linux/unknown"
    assert ud.platform_text({}) == ud.platform_text(None) == "unknown/unknown"
    assert ud.platform_text({"config": {}}, "") == ""
    assert ud.platform_text({"os": 5, "architecture": ["x"]}) == "5/['x']"


# -- proxies ------------------------------------------------------------------------------

class ForwardProxy(LoopbackServer):
    """An HTTP forward proxy: GET http://host/path from clients, fetched and relayed."""

    def __init__(self):
        from support import BaseHTTPRequestHandler, httplib, urlsplit
        outer = self
        self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):                       # noqa: N802
                outer.seen.append(self.path)
                parts = urlsplit(self.path)
                conn = httplib.HTTPConnection(parts.hostname, parts.port, timeout=30)
                headers = dict((k, v) for k, v in self.headers.items()
                               if k.lower() not in ("proxy-connection", "connection"))
                conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""),
                             headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection",
                                           "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                conn.close()

        self.serve(Handler, threaded=True)


@pytest.fixture
def forward_proxy():
    proxy = ForwardProxy()
    yield proxy
    proxy.stop()


def test_http_proxy_is_used(udocker, registry, forward_proxy):
    udocker("pull", "%s/test/busybox" % registry.host,
            env={"http_proxy": forward_proxy.url, "no_proxy": ""}).check()
    assert [p for p in forward_proxy.seen if "/manifests/" in p]
    assert [p for p in forward_proxy.seen if "/blobs/" in p]
    assert all(p.startswith("http://%s/" % registry.host) for p in forward_proxy.seen)
    udocker("verify", "%s/test/busybox" % registry.host).check()


def test_no_proxy_bypasses(udocker, registry, forward_proxy):
    udocker("pull", "%s/test/busybox" % registry.host,
            env={"http_proxy": forward_proxy.url, "no_proxy": "127.0.0.1"}).check()
    assert forward_proxy.seen == []


def test_httpproxy_option(udocker, registry, forward_proxy):
    udocker("pull", "--httpproxy=" + forward_proxy.url, "%s/test/busybox" % registry.host,
            env={"no_proxy": ""}).check()
    assert forward_proxy.seen


# -- progress, Docker Hub search, schema 1 ------------------------------------------------

def test_progress_is_live_on_a_terminal(udocker, registry):
    """On a tty: one line per layer redrawn in place, and a total line."""
    import pty
    import select
    import subprocess
    import sys
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, udocker.script, "pull",
                             "%s/test/multilayer" % registry.host],
                            stdin=slave, stdout=slave, stderr=slave,
                            env=udocker.environ(), close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready = select.select([master], [], [], 60)[0]
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert "total" in text and "\x1b[" in text            # redrawn in place
    assert "downloaded sha256:" not in text                # no per-line log on a tty


def test_progress_in_a_pipe_is_one_line_per_layer(udocker, registry):
    res = udocker("pull", "%s/test/multilayer" % registry.host).check()
    info = registry.images["test/multilayer:latest"]
    lines = [l for l in res.err.splitlines() if l.startswith("Info: downloaded")]
    assert len(lines) == len(info["layers"]) + 1            # layers and the config
    assert "\x1b[" not in res.err
    res = udocker("-q", "pull", "%s/test/busybox" % registry.host).check()
    assert res.err == ""


class FakeHub(LoopbackServer):
    """Docker Hub's search API: /v2/search/repositories?query=&page_size=&page=."""

    def __init__(self, pages):
        from support import BaseHTTPRequestHandler, parse_qs, urlsplit
        outer = self
        self.pages = pages
        self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):                       # noqa: N802
                query = parse_qs(urlsplit(self.path).query)
                outer.seen.append(query)
                page = int(query.get("page", ["1"])[0])
                body = json.dumps({
                    "count": sum(len(p) for p in outer.pages),
                    "next": "more" if page < len(outer.pages) else None,
                    "results": outer.pages[page - 1]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.serve(Handler)


def test_search_docker_hub_api(udocker):
    pages = [[{"repo_name": "busybox", "short_description": "Busybox base image.",
               "star_count": 3000, "is_official": True}],
             [{"repo_name": "someone/busybox-extra", "short_description": "x" * 200,
               "star_count": 2, "is_official": False}]]
    hub = FakeHub(pages)
    try:
        res = udocker("search", "-a", "busybox", env={"UDOCKER_INDEX": hub.url})
        first_page_only = udocker("search", "--index=" + hub.url, "busybox")
    finally:
        hub.stop()
    assert res.rc == 0, res
    lines = res.out.splitlines()
    assert lines[0].split() == ["NAME", "OFFICIAL", "DESCRIPTION", "STARS"]
    assert lines[1].startswith("busybox ") and "[OK]" in lines[1] and "3000" in lines[1]
    assert lines[2].startswith("someone/busybox-extra") and "----" in lines[2]
    assert len(lines[2]) < 150                               # descriptions truncated
    assert [q["page"] for q in hub.seen] == [["1"], ["2"], ["1"]]
    assert first_page_only.rc == 0 and "someone" not in first_page_only.out   # no tty: 1 page


def test_search_index_without_search_api_lists_catalog(udocker, registry):
    res = udocker("search", "--index=" + registry.url, "multi").check()
    assert res.out.split()[1:] == ["test/multiarch", "test/multiarch-oci", "test/multilayer"]


def test_schema1_manifest_is_pulled_read_only(udocker, test_images):
    layer = test_images["busybox"].layers[0]
    v1config = {"id": "a" * 64, "architecture": "amd64", "os": "linux",
                "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]}}
    manifest = json.dumps({
        "schemaVersion": 1, "name": "x/old", "tag": "latest", "architecture": "amd64",
        "fsLayers": [{"blobSum": layer.digest}],
        "history": [{"v1Compatibility": json.dumps(v1config)}]}).encode()
    fake = FakeRegistry(manifest, ud.MT_DOCKER_V1, {layer.digest: layer.data})
    try:
        udocker("pull", "%s/x/old" % fake.host).check()
    finally:
        fake.stop()
    name = "%s/x/old" % fake.host
    udocker("verify", name).check()
    config = json.loads(udocker("inspect", name).check().out)
    assert config["config"]["Cmd"] == ["sh"]
    assert "linux/amd64" in udocker("images", "-p").check().out


# -- TLS ----------------------------------------------------------------------------------

class TLSRelay(object):
    """A TLS front (self-signed certificate for 127.0.0.1) relaying bytes to a registry."""

    def __init__(self, upstream_host, workdir):
        import socket
        import ssl
        import subprocess
        self.cert = os.path.join(workdir, "cert.pem")
        key = os.path.join(workdir, "key.pem")
        subprocess.check_call(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
             "-out", self.cert, "-days", "1", "-subj", "/CN=localhost", "-addext",
             "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.context = ssl.SSLContext(getattr(ssl, "PROTOCOL_TLS_SERVER",
                                              ssl.PROTOCOL_SSLv23))
        self.context.load_cert_chain(self.cert, key)
        self.upstream = upstream_host.split(":")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.host = "127.0.0.1:%d" % self.sock.getsockname()[1]
        from support.socksproxy import accept_in_thread
        accept_in_thread(self.sock, self._serve)

    def _serve(self, client):
        import socket
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except Exception:                            # a client that gave up on the TLS
            client.close()
            return
        from support.socksproxy import relay
        relay(tls, socket.create_connection((self.upstream[0], int(self.upstream[1]))))

    def stop(self):
        self.sock.close()


@pytest.fixture
def tls_registry(registry, tmpdir):
    relay = TLSRelay(registry.host, str(tmpdir))
    yield relay
    relay.stop()


def test_tls_registry_needs_trust(udocker, tls_registry):
    url = "--registry=https://" + tls_registry.host
    res = udocker("pull", url, "test/busybox")
    assert res.rc == 1 and "not trusted" in res.err and "Traceback" not in res.err
    udocker("--insecure", "pull", url, "test/busybox").check()
    udocker("rmi", "test/busybox").check()
    by_name = "--registry=https://localhost:" + tls_registry.host.split(":")[1]
    udocker("pull", by_name, "test/busybox",
            env={"UDOCKER_CA_BUNDLE": tls_registry.cert}).check()
    udocker("verify", "test/busybox").check()


def test_localhost_registry_is_tried_with_tls_first(udocker, tls_registry):
    # like Docker: a localhost registry is insecure by default (unverified TLS, or http)
    udocker("pull", "%s/test/busybox" % tls_registry.host).check()
    record = json.load(open(os.path.join(udocker.udocker_dir, "repos", tls_registry.host,
                                         "test", "busybox", ".latest.json")))
    assert record["registry"] == "https://" + tls_registry.host


# -- redirects to blob storage --------------------------------------------------------------

class RedirectingRegistry(LoopbackServer):
    """Demands Basic auth, and redirects blob GETs to a storage server on another port (as
    registries do to S3); the storage server records the headers it receives."""

    def __init__(self, manifest, content_type, blobs, relative=False):
        from support import BaseHTTPRequestHandler
        outer = self
        self.storage_headers = []

        class Storage(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):                       # noqa: N802
                outer.storage_headers.append(dict((k.lower(), v)
                                                  for k, v in self.headers.items()))
                data = blobs[self.path.split("?")[0].rsplit("/", 1)[-1]]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Registry(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):                       # noqa: N802
                if self.headers.get("Authorization") != "Basic " + udocker_b64("alice:secret1"):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="test"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if "/blobs/" in self.path:
                    digest = self.path.rsplit("/", 1)[-1]
                    self.send_response(307)
                    self.send_header("Location", "%s/store/%s?Signature=x" % (
                        outer.storage.url, digest))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(manifest)))
                self.end_headers()
                self.wfile.write(manifest)

        self.storage = LoopbackServer()
        self.storage.serve(Storage, threaded=True)
        self.serve(Registry, threaded=True)

    def stop(self):
        LoopbackServer.stop(self)
        self.storage.stop()


def test_redirect_to_storage_drops_authorization(udocker, registry, test_images):
    info = registry.images["test/busybox:latest"]
    image = test_images["busybox"]
    blobs = dict((b.digest, b.data) for b in image.blobs("docker"))
    fake = RedirectingRegistry(info["manifest"], info["media_type"], blobs)
    try:
        udocker("login", "--registry=" + fake.url, "--username=alice",
                "--password=secret1").check()
        udocker("pull", "--registry=" + fake.url, "test/busybox").check()
    finally:
        fake.stop()
    assert len(fake.storage_headers) == len(blobs)
    assert not [h for h in fake.storage_headers if "authorization" in h]
    udocker("verify", "test/busybox").check()


def test_udocker_registry_replaces_docker_hub(udocker, registry):
    udocker("pull", "busybox", env={"UDOCKER_REGISTRY": registry.url}).check()
    assert registry.images["library/busybox:latest"]["digest"] in open(os.path.join(
        udocker.udocker_dir, "repos", "busybox", ".latest.json")).read()


# -- what a new user hit: login without a scheme, fast and telling network failures ---------

def test_login_host_port_without_scheme_checks_like_pull(udocker, registry_basic):
    """--registry=127.0.0.1:PORT: https first, then http, as `pull 127.0.0.1:PORT/...`
    does (Docker's insecure-registry rule); a wrong password is refused, not stored."""
    keystore = os.path.join(udocker.home, ".udocker", "keystore")
    res = udocker("login", "--registry=" + registry_basic.host, "--username=alice",
                  "--password=wrong")
    assert "bad username or password" in one_error_line(res) and "Warning" not in res.err
    assert not os.path.exists(keystore)
    res = udocker("login", "--registry=" + registry_basic.host, "--username=alice",
                  "--password=secret1").check()
    assert "Warning" not in res.err, res
    udocker("pull", "%s/test/busybox" % registry_basic.host).check()


def test_login_without_terminal_or_password_is_one_error_line(udocker, registry_basic):
    for args in (["--username=alice"], []):
        res = udocker("login", "--registry=" + registry_basic.host, *args, input="")
        line = one_error_line(res)
        assert "no terminal" in line and "EOFError" not in res.err, res
    assert not os.path.exists(os.path.join(udocker.home, ".udocker", "keystore"))


def test_login_to_an_unreachable_registry_stores_with_a_warning(udocker):
    from support import free_port
    host = "127.0.0.1:%d" % free_port()
    res = udocker("login", "--registry=" + host, "--username=alice", "--password=x").check()
    assert "Warning: could not check the credentials" in res.err and "refused" in res.err
    assert "https://" + host in json.load(open(os.path.join(udocker.home, ".udocker",
                                                            "keystore")))


def test_refused_connection_fails_at_once(udocker):
    from support import free_port
    res = udocker("pull", "127.0.0.1:%d/x/y" % free_port(), env={"UDOCKER_LOGLEVEL": "4"})
    assert "refused the connection" in one_error_line(res)
    assert "retrying" not in res.err, res


def test_https_to_an_http_registry_says_what_to_do(udocker, registry):
    res = udocker("pull", "--registry=https://" + registry.host, "test/busybox",
                  env={"UDOCKER_LOGLEVEL": "4"})
    line = one_error_line(res)
    assert "does not speak TLS" in line and "http://" + registry.host in line
    assert "--insecure" in line and "retrying" not in res.err, res


def test_a_proxy_that_fails_is_named(udocker, registry):
    from support import free_port
    proxy = "http://user:pw@127.0.0.1:%d" % free_port()
    res = udocker("pull", "--httpproxy=" + proxy, "%s/test/busybox" % registry.host,
                  env={"UDOCKER_LOGLEVEL": "4"})
    line = one_error_line(res)
    assert line.startswith("Error: proxy http://127.0.0.1:") and "pw" not in line, res
    assert "retrying" not in res.err, res


def test_search_with_non_ascii_term(udocker, registry):
    """Python 2.7 compared a byte string with the registry's text: an internal error."""
    res = udocker("search", "--registry=http://" + registry.host, "ünï").check()
    assert res.out.split() == ["NAME"] and "Error" not in res.err, res


# -- SOCKS proxies --------------------------------------------------------------------------

@pytest.fixture
def socks_proxy():
    from support.socksproxy import SocksProxy
    proxies = []

    def start(**kwargs):
        proxies.append(SocksProxy(**kwargs))
        return proxies[-1]
    yield start
    for proxy in proxies:
        proxy.stop()


def socks_env(url):
    return {"http_proxy": url, "https_proxy": url, "no_proxy": ""}


@pytest.mark.parametrize("scheme,atyp", [("socks5h", "domain"), ("socks5", "ipv4"),
                                         ("socks4a", "domain"), ("socks4", "ipv4")])
def test_pull_through_socks_proxy(udocker, registry, socks_proxy, scheme, atyp):
    """socks5h and socks4a hand the name to the proxy; socks5 and socks4 an address."""
    proxy = socks_proxy()
    name = "localhost:%s/test/busybox" % registry.host.split(":")[1]
    udocker("pull", name, env=socks_env(proxy.url(scheme))).check()
    udocker("verify", name).check()
    assert proxy.asked and all(a["atyp"] == atyp for a in proxy.asked), proxy.asked
    hosts = set(a["host"] for a in proxy.asked)
    assert hosts == ({"localhost"} if atyp == "domain" else {"127.0.0.1"}), proxy.asked
    assert set(a["version"] for a in proxy.asked) == {int(scheme[5])}


def test_socks_proxy_with_password_from_the_url(udocker, registry, socks_proxy):
    proxy = socks_proxy(users={"alice": "p@ss:w/rd"})
    res = udocker("pull", "--httpproxy=" + proxy.url(cred="alice:p%40ss%3Aw%2Frd"),
                  "%s/test/busybox" % registry.host, env={"no_proxy": ""}).check()
    assert proxy.asked and set(proxy.auth) == {("alice", "p@ss:w/rd")}, res
    udocker("verify", "%s/test/busybox" % registry.host).check()


def test_socks_all_proxy_and_no_proxy(udocker, registry, socks_proxy):
    proxy = socks_proxy()
    name = "%s/test/busybox" % registry.host
    udocker("pull", name, env={"all_proxy": proxy.url(), "no_proxy": "127.0.0.1"}).check()
    assert proxy.asked == []
    udocker("rmi", name).check()
    udocker("pull", name, env={"all_proxy": proxy.url(), "no_proxy": ""}).check()
    assert proxy.asked


def http_client(tmpdir, proxy):
    cfg = ud.Config.load({"HOME": str(tmpdir), "UDOCKER_DIR": str(tmpdir.join("u")),
                          "UDOCKER_NOSYSCONF": "1"}, {})
    return ud.HttpClient(cfg, proxy)


def test_socks5_tries_each_address_of_a_name(monkeypatch, tmpdir, registry, socks_proxy):
    """socks5:// resolves the name here and, as a direct connection does, tries each of its
    addresses in turn (the registry listens on 127.0.0.1 only, not on ::1)."""
    import socket
    port = int(registry.host.split(":")[1])
    real = socket.getaddrinfo

    def getaddrinfo(host, *args):
        if host == "registry.test":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    # udocker.py's lazy socket module holds a copy of the module's names once first used
    monkeypatch.setattr(ud.socket, "getaddrinfo", getaddrinfo)
    proxy = socks_proxy()
    http = http_client(tmpdir, proxy.url("socks5"))
    try:
        assert http.request("GET", "http://registry.test:%d/v2/" % port).status == 200
    finally:
        http.close()
    assert [(a["atyp"], a["host"]) for a in proxy.asked] == [("ipv6", "::1"),
                                                             ("ipv4", "127.0.0.1")]


def test_socks_connections_are_reused(tmpdir, registry, socks_proxy):
    proxy = socks_proxy()
    http = http_client(tmpdir, proxy.url())
    try:
        for _ in range(3):
            resp = http.request("GET", "%s/v2/" % registry.url)
            resp.read_all()
            assert resp.status == 200
    finally:
        http.close()
    assert len(proxy.asked) == 1, proxy.asked


@pytest.mark.parametrize("kind", ["bad password", "no password", "refuses", "unreachable",
                                  "not listening", "stalls"])
def test_socks_proxy_failure_is_one_line_naming_the_proxy(udocker, registry, socks_proxy,
                                                          kind):
    from support import free_port
    proxy = socks_proxy(users={"alice": "secret"} if "password" in kind else None,
                        refuse=kind == "refuses", stall=kind == "stalls")
    url = proxy.url(cred="alice:wrong" if kind == "bad password" else "")
    if kind == "not listening":
        url = "socks5h://alice:wrong@127.0.0.1:%d" % free_port()
    host = "127.0.0.1:%d" % free_port() if kind == "unreachable" else registry.host
    conf = os.path.join(udocker.udocker_dir + ".conf")
    with open(conf, "w") as handle:
        handle.write("[DEFAULT]\ntimeout = 2\n")
    res = udocker("--config=" + conf, "pull", "--httpproxy=" + url, "%s/test/busybox" % host,
                  env={"UDOCKER_LOGLEVEL": "4"})
    line = one_error_line(res, rc=1)
    assert line.startswith("Error: proxy " + url.replace("alice:wrong@", "")), line
    assert "wrong" not in line and "retrying" not in res.err, res
    assert {"bad password": "rejected the user name or password",
            "no password": "need a user name and password",
            "refuses": "not allowed by its rules (SOCKS5 reply 2)",
            "unreachable": "%s: connection refused (SOCKS5 reply 5)" % host,
            "not listening": "refused",
            "stalls": "timed out"}[kind] in line, line
    if kind in ("refuses", "unreachable"):
        assert proxy.asked and proxy.asked[0]["host"] == "127.0.0.1"


def test_https_registry_through_socks_proxy(udocker, tls_registry, socks_proxy):
    """TLS over the tunnel: the certificate is checked for the registry's name (SNI)."""
    proxy = socks_proxy()
    by_name = "--registry=https://localhost:" + tls_registry.host.split(":")[1]
    res = udocker("pull", by_name, "test/busybox", env=socks_env(proxy.url()))
    assert "not trusted" in one_error_line(res, rc=1)
    env = socks_env(proxy.url())
    env["UDOCKER_CA_BUNDLE"] = tls_registry.cert
    udocker("pull", by_name, "test/busybox", env=env).check()
    udocker("verify", "test/busybox").check()
    assert set(a["host"] for a in proxy.asked) == {"localhost"}, proxy.asked


def test_socks_request_bytes():
    """The requests on the wire (RFC 1928, 1929, SOCKS4a), against a scripted proxy."""
    import socket
    for scheme, answer, sent in [
            ("socks5h://u:p%20w@x", b"\x05\x02\x01\x00\x05\x00\x00\x01" + b"\x00" * 6,
             b"\x05\x02\x00\x02\x01\x01u\x03p w\x05\x01\x00\x03\x09localhost\x01\xbb"),
            ("socks5://x", b"\x05\x00\x05\x00\x00\x03\x01a\x00\x00",
             b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x01\xbb"),
            ("socks5h://[::1]", b"\x05\x00\x05\x00\x00\x01" + b"\x00" * 6,
             b"\x05\x01\x00\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x01\xbb"),
            ("socks4a://bob@x", b"\x00\x5a" + b"\x00" * 6,
             b"\x04\x01\x01\xbb\x00\x00\x00\x01bob\x00localhost\x00")]:
        ours, theirs = socket.socketpair()
        theirs.sendall(answer)
        if scheme.startswith("socks5h://["):
            ud._socks5(ours, "::1", 443, ud._socks_targets("::1", 443, True)[0], None, None)
        elif scheme.startswith("socks5h"):
            ud._socks5(ours, "localhost", 443, (3, b"localhost"), "u", "p w")
        elif scheme.startswith("socks5"):
            ud._socks5(ours, "localhost", 443, (1, b"\x7f\x00\x00\x01"), None, None)
        else:
            ud._socks4(ours, "localhost", 443, (3, b"localhost"), "bob")
        ours.close()
        got = b""
        while True:
            data = theirs.recv(4096)
            if not data:
                break
            got += data
        theirs.close()
        assert got == sent, (scheme, got)


@pytest.mark.parametrize("answer,call,needle", [
    (b"HTTP/1.0 400 Bad request\r\n\r\n", ("_socks5", None), "not a SOCKS5 proxy"),
    (b"\x05\x02", ("_socks5", "u" * 256), "longer than 255 bytes"),
    (b"\x05\x02", ("_socks5", None), "need a user name and password in the proxy URL"),
    (b"\x05\x00", ("_socks5", None), "the proxy closed the connection"),
    (b"\x05\x00\x05\x08\x00\x01" + b"\x00" * 6, ("_socks5", None),
     "address type not supported (SOCKS5 reply 8)"),
    (b"\x00\x5b" + b"\x00" * 6, ("_socks4", None), "SOCKS4 reply 91: rejected or failed"),
    (b"", ("_socks4", "::1"), "SOCKS4 cannot connect to an IPv6 address"),
])
def test_socks_failures_on_the_wire(answer, call, needle):
    """What a proxy answers (scripted on a socketpair) becomes one SocksError message."""
    import socket
    ours, theirs = socket.socketpair()
    theirs.sendall(answer)
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(ud.SocksError) as info:
        if call[0] == "_socks5":
            ud._socks5(ours, "localhost", 443, (3, b"localhost"), call[1], call[1] and "pw")
        else:
            host = call[1] or "localhost"
            ud._socks4(ours, host, 443, ud._socks_targets(host, 443, True)[0], None)
    assert needle in str(info.value)
    ours.close()
    theirs.close()
