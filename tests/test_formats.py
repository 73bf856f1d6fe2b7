"""Image formats: load (docker-save of every vintage, OCI layouts), save, import.

Archives are built here (tarfile + json, deterministic) or made by real tools (skopeo,
upstream udocker 1.3.17); the real script runs as a subprocess against a temporary
UDOCKER_DIR, and what lands on disk is checked.
"""
from __future__ import print_function, absolute_import

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import pytest

import udocker

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "udocker.py")
UPSTREAM = "/opt/udocker13/bin/udocker"
HOST = udocker.Platform.host()
ROOT_FLAG = ["--allow-root"] if os.geteuid() == 0 else []

needs_skopeo = pytest.mark.skipif(
    subprocess.call("command -v skopeo >/dev/null", shell=True) != 0, reason="no skopeo")
needs_upstream = pytest.mark.skipif(not os.path.exists(UPSTREAM), reason="no udocker 1.3.17")


# -- running things

def environ(tmpdir, udir="ud"):
    env = dict(os.environ, UDOCKER_DIR=str(tmpdir.join(udir)), HOME=str(tmpdir),
               UDOCKER_NOSYSCONF="1", UDOCKER_TARBALL="", no_proxy="127.0.0.1,localhost")
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        env.pop(key, None)
    return env


def run(tmpdir, *args, **kw):
    """(exit code, stdout bytes, stderr text) of udocker.py ARGS."""
    cmd = [sys.executable, SCRIPT] + ROOT_FLAG + list(args)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environ(tmpdir, kw.get("udir", "ud")))
    out, err = proc.communicate(kw.get("stdin"))
    return proc.returncode, out, err.decode("utf-8")


def ok(tmpdir, *args, **kw):
    code, out, err = run(tmpdir, *args, **kw)
    assert code == 0, err
    return out.decode("utf-8")


def upstream(tmpdir, *args, **kw):
    proc = subprocess.Popen([UPSTREAM] + ROOT_FLAG + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=environ(tmpdir, kw.get("udir", "ud")))
    out = proc.communicate()[0].decode("utf-8")
    return proc.returncode, out


def skopeo(*args):
    proc = subprocess.Popen(["skopeo", "--insecure-policy"] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return out.decode("utf-8")


def one_error_line(err):
    lines = [l for l in err.splitlines() if not l.startswith("Info:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


# -- building archives

def sha(data):
    return hashlib.sha256(data).hexdigest()


def gz(data):
    buf = io.BytesIO()
    handle = gzip.GzipFile(fileobj=buf, mode="wb", mtime=0)
    handle.write(data)
    handle.close()
    return buf.getvalue()


def tar_bytes(entries):
    """entries: (name, bytes) files, (name, ("sym"|"hard", target)) links, (name, None) dirs."""
    buf = io.BytesIO()
    archive = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT)
    for name, data in entries:
        info = tarfile.TarInfo(name)
        info.mtime = 0
        if data is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
        elif isinstance(data, tuple):
            info.type = tarfile.SYMTYPE if data[0] == "sym" else tarfile.LNKTYPE
            info.linkname = data[1]
            archive.addfile(info)
        else:
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    archive.close()
    return buf.getvalue()


def rootfs(tag, compress=False):
    """A small layer: etc/NAME with some content."""
    data = tar_bytes([("etc", None), ("etc/" + tag, ("content of %s\n" % tag).encode())])
    return gz(data) if compress else data


class Image(object):
    """An image made of layer tars: its config, digests and OCI manifest."""

    def __init__(self, layers, arch=None, variant=None):
        self.layers = layers
        self.diff_ids = ["sha256:" + sha(gzip.GzipFile(fileobj=io.BytesIO(l)).read()
                                         if l[:2] == b"\x1f\x8b" else l) for l in layers]
        config = {"architecture": arch or HOST.arch, "os": "linux",
                  "created": "2020-01-01T00:00:00Z", "config": {"Env": ["A=1"]},
                  "rootfs": {"type": "layers", "diff_ids": self.diff_ids}}
        if variant:
            config["variant"] = variant
        self.config = json.dumps(config, sort_keys=True).encode()
        self.config_digest = "sha256:" + sha(self.config)
        self.layer_digests = ["sha256:" + sha(l) for l in layers]
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.config_digest, "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar" +
                        ("+gzip" if l[:2] == b"\x1f\x8b" else ""),
                        "digest": d, "size": len(l)}
                       for l, d in zip(layers, self.layer_digests)]}, sort_keys=True).encode()
        self.digest = "sha256:" + sha(self.manifest)

    def descriptor(self, **annotations):
        desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.digest, "size": len(self.manifest)}
        if annotations:
            desc["annotations"] = dict((k.replace("_", "."), v)
                                       for k, v in annotations.items())
        return desc

    def blobs(self):
        return [(self.config_digest, self.config), (self.digest, self.manifest)] + \
            list(zip(self.layer_digests, self.layers))


def classic_archive(items, symlinked=False, parents_reversed=False):
    """A docker-save archive (Docker < 25): <id>/layer.tar, <id>/json, <id>/VERSION,
    <config>.json, manifest.json, repositories. symlinked: layers stored as <hex>.tar with
    <id>/layer.tar symlinks (as skopeo writes). parents_reversed: <id>/json parent links
    lie (only manifest.json's Layers order is right)."""
    entries, manifest, repositories = {}, [], {}
    for image, tags in items:
        entries[image.config_digest[7:] + ".json"] = image.config
        parent, names, ids = "", [], []
        for layer, digest in zip(image.layers, image.layer_digests):
            lid = sha((parent + digest).encode())
            ids.append(lid)
            parent = lid
        chain = list(reversed(ids)) if parents_reversed else ids
        for i, (lid, layer, digest) in enumerate(zip(ids, image.layers, image.layer_digests)):
            entries[lid] = None
            if symlinked:
                entries[digest[7:] + ".tar"] = layer
                entries[lid + "/layer.tar"] = ("sym", "../%s.tar" % digest[7:])
            else:
                entries[lid + "/layer.tar"] = layer
            meta = {"id": lid}
            pos = chain.index(lid)
            if pos:
                meta["parent"] = chain[pos - 1]
            entries[lid + "/json"] = json.dumps(meta).encode()
            entries[lid + "/VERSION"] = b"1.0"
            names.append(lid + "/layer.tar")
        for tag in tags:
            name, _, version = tag.rpartition(":")
            repositories.setdefault(name, {})[version] = ids[-1]
        manifest.append({"Config": image.config_digest[7:] + ".json",
                         "RepoTags": tags or None, "Layers": names})
    entries["manifest.json"] = json.dumps(manifest).encode()
    entries["repositories"] = json.dumps(repositories).encode()
    return tar_bytes(sorted(entries.items(), key=lambda kv: kv[0]))


def oci_entries(descriptors, images, extra_blobs=()):
    entries = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
               "index.json": json.dumps({"schemaVersion": 2, "manifests": descriptors}).encode()}
    for image in images:
        for digest, data in image.blobs():
            entries["blobs/sha256/" + digest[7:]] = data
    for digest, data in extra_blobs:
        entries["blobs/sha256/" + digest[7:]] = data
    return entries


def oci_archive(descriptors, images, extra_blobs=()):
    entries = oci_entries(descriptors, images, extra_blobs)
    return tar_bytes(sorted(entries.items(), key=lambda kv: kv[0]))


def docker25_archive(items):
    """What docker save writes since Docker 25: an OCI layout plus manifest.json whose
    Config and Layers point into blobs/sha256/."""
    descriptors, manifest, repositories = [], [], {}
    for image, tag in items:
        descriptors.append(image.descriptor(
            io_containerd_image_name="docker.io/library/" + tag,
            org_opencontainers_image_ref_name=tag.split(":")[1]))
        manifest.append({"Config": "blobs/sha256/" + image.config_digest[7:],
                         "RepoTags": [tag],
                         "Layers": ["blobs/sha256/" + d[7:] for d in image.layer_digests]})
        repositories.setdefault(tag.split(":")[0], {})[tag.split(":")[1]] = \
            image.layer_digests[-1][7:]
    entries = oci_entries(descriptors, [i for i, _ in items])
    entries["manifest.json"] = json.dumps(manifest).encode()
    entries["repositories"] = json.dumps(repositories).encode()
    return tar_bytes(sorted(entries.items(), key=lambda kv: kv[0]))


def write(tmpdir, name, data):
    path = tmpdir.join(name)
    path.write_binary(data)
    return str(path)


# -- looking at the repository

def tag_dir(tmpdir, ref, udir="ud"):
    name, _, tag = ref.rpartition(":")
    return tmpdir.join(udir, "repos", name, tag)


def stored_manifest(tmpdir, ref, udir="ud"):
    return json.loads(tag_dir(tmpdir, ref, udir).join("manifest").read_binary().decode())


def stored_config(tmpdir, ref, udir="ud"):
    digest = stored_manifest(tmpdir, ref, udir)["config"]["digest"]
    return tag_dir(tmpdir, ref, udir).join(digest).read_binary()


def layer_files(tmpdir, udir="ud"):
    layers = tmpdir.join(udir, "layers")
    return sorted(os.listdir(str(layers))) if layers.check() else []


def images(tmpdir, udir="ud"):
    out = ok(tmpdir, "images", udir=udir)
    return [l.split()[0] for l in out.splitlines()[1:]]


def assert_verifies(tmpdir, ref, udir="ud"):
    code, _, err = run(tmpdir, "verify", ref, udir=udir)
    assert code == 0, err


# -- load: docker-save archives

def test_load_classic_archive(tmpdir):
    image = Image([rootfs("base"), rootfs("top")])
    path = write(tmpdir, "a.tar", classic_archive([(image, ["myimg:1.0"])]))
    assert ok(tmpdir, "load", "-i", path) == "myimg:1.0\n"
    manifest = stored_manifest(tmpdir, "myimg:1.0")
    assert manifest["config"]["digest"] == image.config_digest
    assert [l["digest"] for l in manifest["layers"]] == image.layer_digests
    assert stored_config(tmpdir, "myimg:1.0") == image.config
    assert tag_dir(tmpdir, "myimg:1.0").join("v2").check()
    assert_verifies(tmpdir, "myimg:1.0")
    assert not [f for f in layer_files(tmpdir) if not f.startswith("sha256:")]


def test_load_gzipped_archive_from_stdin_both_spellings(tmpdir):
    image = Image([rootfs("one", compress=True)])
    data = gz(classic_archive([(image, ["piped:latest"])]))
    assert ok(tmpdir, "load", stdin=data) == "piped:latest\n"
    assert ok(tmpdir, "load", "-", "other", stdin=data) == "other:latest\n"
    assert ok(tmpdir, "load", "--input=-", stdin=data) == "piped:latest\n"
    assert [l["digest"] for l in stored_manifest(tmpdir, "other:latest")["layers"]] == \
        image.layer_digests


def test_load_follows_manifest_layers_not_parent_links(tmpdir):
    image = Image([rootfs("a"), rootfs("b"), rootfs("c")])
    path = write(tmpdir, "a.tar", classic_archive([(image, ["order:1"])],
                                                  parents_reversed=True))
    ok(tmpdir, "load", "-i", path)
    assert [l["digest"] for l in stored_manifest(tmpdir, "order:1")["layers"]] == \
        image.layer_digests


def test_load_symlinked_layers(tmpdir):
    image = Image([rootfs("a"), rootfs("b")])
    path = write(tmpdir, "a.tar", classic_archive([(image, ["linked:2"])], symlinked=True))
    assert ok(tmpdir, "load", "-i", path) == "linked:2\n"
    assert [l["digest"] for l in stored_manifest(tmpdir, "linked:2")["layers"]] == \
        image.layer_digests
    assert_verifies(tmpdir, "linked:2")


def test_load_multi_image_archive_keeps_every_name(tmpdir):
    base = rootfs("base")
    first = Image([base, rootfs("first")])
    second = Image([base, rootfs("second", compress=True)])
    path = write(tmpdir, "m.tar", classic_archive([(first, ["one:a", "one:b"]),
                                                   (second, ["reg.example.com/ns/two:c"])]))
    assert ok(tmpdir, "load", "-i", path).split() == \
        ["one:a", "one:b", "reg.example.com/ns/two:c"]
    assert sorted(images(tmpdir)) == ["one:a", "one:b", "reg.example.com/ns/two:c"]
    assert [l["digest"] for l in stored_manifest(tmpdir, "reg.example.com/ns/two:c")
            ["layers"]] == second.layer_digests
    # the shared base layer is stored once
    assert len(layer_files(tmpdir)) == 5
    for ref in ("one:a", "one:b", "reg.example.com/ns/two:c"):
        assert_verifies(tmpdir, ref)


def test_load_untagged_image_and_rename(tmpdir):
    image = Image([rootfs("x")])
    path = write(tmpdir, "u.tar", classic_archive([(image, [])]))
    code, out, err = run(tmpdir, "load", "-i", path)
    assert code == 0 and "no name" in err
    assert out.decode() == "loaded-%s:latest\n" % image.config_digest[7:19]
    assert ok(tmpdir, "load", "-i", path, "named") == "named:latest\n"
    assert ok(tmpdir, "load", "-i", path, "named:v2") == "named:v2\n"


def test_load_name_with_tag_refuses_several_images(tmpdir):
    path = write(tmpdir, "m.tar", classic_archive([(Image([rootfs("a")]), ["a:1"]),
                                                   (Image([rootfs("b")]), ["b:1"])]))
    code, _, err = run(tmpdir, "load", "-i", path, "both:1")
    assert code != 0 and "names only one" in one_error_line(err)
    assert images(tmpdir) == [] and layer_files(tmpdir) == []
    code, _, err = run(tmpdir, "load", "-i", path, "both")
    assert code != 0 and "two different images for both:1" in one_error_line(err)
    assert images(tmpdir) == [] and layer_files(tmpdir) == []


def test_load_replaces_existing_tag(tmpdir):
    old, new = Image([rootfs("old")]), Image([rootfs("new")])
    ok(tmpdir, "load", "-i", write(tmpdir, "o.tar", classic_archive([(old, ["img:1"])])))
    code, out, err = run(tmpdir, "load", "-i",
                         write(tmpdir, "n.tar", classic_archive([(new, ["img:1"])])))
    assert code == 0 and "replacing image: img:1" in err
    assert stored_config(tmpdir, "img:1") == new.config
    assert_verifies(tmpdir, "img:1")


def test_load_refuses_to_replace_protected_tag(tmpdir):
    path = write(tmpdir, "o.tar", classic_archive([(Image([rootfs("old")]), ["img:1"])]))
    ok(tmpdir, "load", "-i", path)
    ok(tmpdir, "protect", "img:1")
    new = write(tmpdir, "n.tar", classic_archive([(Image([rootfs("new")]), ["img:1"])]))
    code, _, err = run(tmpdir, "load", "-i", new)
    assert code != 0 and "protected" in one_error_line(err)
    assert len(layer_files(tmpdir)) == 2


# -- load: OCI layouts

def test_load_oci_layout_with_nested_index(tmpdir):
    other = "arm64" if HOST.arch != "arm64" else "amd64"
    mine = Image([rootfs("host", compress=True)])
    theirs = Image([rootfs("other")], arch=other)
    attestation = b'{"schemaVersion":2,"layers":[],"config":{}}'
    nested = json.dumps({"schemaVersion": 2,
                         "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [
                             dict(theirs.descriptor(), platform={"os": "linux",
                                                                 "architecture": other}),
                             dict(mine.descriptor(), platform={"os": "linux",
                                                               "architecture": HOST.arch}),
                             {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "digest": "sha256:" + sha(attestation),
                              "size": len(attestation),
                              "platform": {"os": "unknown", "architecture": "unknown"}}]
                         }).encode()
    index_desc = {"mediaType": "application/vnd.oci.image.index.v1+json",
                  "digest": "sha256:" + sha(nested), "size": len(nested),
                  "annotations": {"org.opencontainers.image.ref.name": "3.1"}}
    path = write(tmpdir, "o.tar", oci_archive([index_desc], [mine, theirs],
                                              [(index_desc["digest"], nested)]))
    assert ok(tmpdir, "load", "-i", path, "multi") == "multi:3.1\n"
    assert tag_dir(tmpdir, "multi:3.1").join("manifest").read_binary() == mine.manifest
    assert_verifies(tmpdir, "multi:3.1")


def test_load_oci_layout_names(tmpdir):
    a, b = Image([rootfs("a")]), Image([rootfs("b")])
    path = write(tmpdir, "o.tar", oci_archive([
        a.descriptor(org_opencontainers_image_ref_name="example.com/ns/app:2"),
        a.descriptor(org_opencontainers_image_ref_name="example.com/ns/app:latest"),
        b.descriptor(io_containerd_image_name="docker.io/library/busybox:1.36",
                     org_opencontainers_image_ref_name="1.36")], [a, b]))
    assert ok(tmpdir, "load", "-i", path).split() == \
        ["example.com/ns/app:2", "example.com/ns/app:latest", "busybox:1.36"]
    assert tag_dir(tmpdir, "busybox:1.36").join("manifest").read_binary() == b.manifest


def test_load_docker25_archive(tmpdir):
    a = Image([rootfs("a"), rootfs("b")])
    b = Image([rootfs("a"), rootfs("c")])
    path = write(tmpdir, "d.tar", docker25_archive([(a, "first:1"), (b, "second:2")]))
    assert ok(tmpdir, "load", "-i", path).split() == ["first:1", "second:2"]
    # the OCI manifest docker stored is kept (so is the image's digest)
    assert tag_dir(tmpdir, "first:1").join("manifest").read_binary() == a.manifest
    assert tag_dir(tmpdir, "second:2").join("manifest").read_binary() == b.manifest
    assert len(layer_files(tmpdir)) == 5


# -- load: bad input changes nothing

def _bad_archives():
    good = Image([rootfs("good")])
    full = classic_archive([(good, ["bad:1"])])
    entries = dict((m.name, m) for m in tarfile.open(fileobj=io.BytesIO(full)))
    missing_layer = tar_bytes([(n, (tarfile.open(fileobj=io.BytesIO(full))
                                    .extractfile(n).read()))
                               for n, m in sorted(entries.items())
                               if m.isreg() and not n.endswith("layer.tar")])
    no_manifest = tar_bytes([("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")])
    corrupt = Image([rootfs("corrupt")])
    blobs = [(d, data if not d == corrupt.layer_digests[0] else data + b"\0" * 512)
             for d, data in corrupt.blobs()]
    corrupt_blob = tar_bytes([("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                              ("index.json", json.dumps({"schemaVersion": 2, "manifests": [
                                  corrupt.descriptor()]}).encode())] +
                             [("blobs/sha256/" + d[7:], data) for d, data in blobs])
    evil = tar_bytes([("manifest.json", b"[]"), ("../evil", b"x")])
    lying = Image([rootfs("lying")])
    lying.layers = [rootfs("other")]
    lying.layer_digests = ["sha256:" + sha(lying.layers[0])]
    return [
        ("truncated", full[:len(full) // 2 + 100], "truncated"),
        ("not a tar", b"this is not an archive\n" * 100, "not a tar archive"),
        ("no manifest", no_manifest, "not a docker-save or OCI archive"),
        ("missing layer", missing_layer, "is not in the archive"),
        ("blob digest", corrupt_blob, "does not match its digest"),
        ("unsafe name", evil, "unsafe member name"),
        ("diff_id", classic_archive([(lying, ["lying:1"])]), "does not match the image config"),
        ("empty", b"", "not a tar archive"),
    ]


@pytest.mark.parametrize("what,data,message", _bad_archives(), ids=lambda v: str(v)[:12])
def test_load_bad_input_leaves_nothing_behind(tmpdir, what, data, message):
    keep = Image([rootfs("keep")])
    ok(tmpdir, "load", "-i", write(tmpdir, "keep.tar", classic_archive([(keep, ["keep:1"])])))
    before = layer_files(tmpdir)
    for args, stdin in ((["-i", write(tmpdir, "bad.tar", data)], None), ([], data)):
        code, out, err = run(tmpdir, "load", *args, stdin=stdin)
        assert code != 0 and out == b""
        assert message in one_error_line(err), err
        assert images(tmpdir) == ["keep:1"]
        assert layer_files(tmpdir) == before
        assert_verifies(tmpdir, "keep:1")
    assert not tmpdir.join("evil").check() and not tmpdir.join("ud", "evil").check()


def test_load_usage_errors(tmpdir):
    code, _, err = run(tmpdir, "load", "-i", str(tmpdir.join("nope.tar")))
    assert code != 0 and "does not exist" in one_error_line(err)
    path = write(tmpdir, "a.tar", classic_archive([(Image([rootfs("a")]), ["a:1"])]))
    code, _, err = run(tmpdir, "load", "-i", path, "Bad Name")
    assert code != 0 and "invalid image reference" in one_error_line(err)
    code, _, err = run(tmpdir, "load", "-i", path, "x", "y")
    assert code != 0 and "unexpected argument" in one_error_line(err)
    assert images(tmpdir) == [] and layer_files(tmpdir) == []


# -- save

def _load_sample(tmpdir, udir="ud"):
    image = Image([rootfs("base"), rootfs("top", compress=True)])
    ok(tmpdir, "load", "-i", write(tmpdir, "in.tar", classic_archive([(image, ["sample:1"])])),
       udir=udir)
    return image


def test_save_round_trip_is_exact_and_deterministic(tmpdir):
    image = _load_sample(tmpdir)
    ok(tmpdir, "tag", "sample:1", "sample:2")
    first, second = str(tmpdir.join("s1.tar")), str(tmpdir.join("s2.tar"))
    ok(tmpdir, "save", "-o", first, "sample:1", "sample:2")
    ok(tmpdir, "save", "--output=" + second, "sample:1", "sample:2")
    assert open(first, "rb").read() == open(second, "rb").read()
    archive = tarfile.open(first)
    names = archive.getnames()
    assert names == sorted(names) and all(m.mtime == 0 for m in archive)
    manifest = json.loads(archive.extractfile("manifest.json").read().decode())
    assert len(manifest) == 1 and manifest[0]["RepoTags"] == ["sample:1", "sample:2"]
    assert archive.extractfile(manifest[0]["Config"]).read() == image.config
    repositories = json.loads(archive.extractfile("repositories").read().decode())
    assert repositories["sample"]["1"] == manifest[0]["Layers"][-1].split("/")[0]
    for name in manifest[0]["Layers"]:
        layer_id = name.split("/")[0]
        assert archive.extractfile(layer_id + "/VERSION").read() == b"1.0"
    assert ok(tmpdir, "load", "-i", first, udir="back").split() == ["sample:1", "sample:2"]
    assert stored_manifest(tmpdir, "sample:1", "back") == stored_manifest(tmpdir, "sample:1")
    assert stored_config(tmpdir, "sample:2", "back") == image.config


def test_save_to_stdout_and_refusals(tmpdir):
    _load_sample(tmpdir)
    code, data, err = run(tmpdir, "save", "sample:1")
    assert code == 0, err
    code, dash, err = run(tmpdir, "save", "-o", "-", "sample:1")
    assert code == 0 and dash == data
    path = write(tmpdir, "exists.tar", b"keep me")
    code, _, err = run(tmpdir, "save", "-o", path, "sample:1")
    assert code != 0 and "already exists" in one_error_line(err)
    assert open(path, "rb").read() == b"keep me"
    code, _, err = run(tmpdir, "save", "-o", str(tmpdir.join("x.tar")), "nosuch:1")
    assert code != 0 and "not found" in one_error_line(err)
    assert not tmpdir.join("x.tar").check()
    assert [f for f in os.listdir(str(tmpdir)) if f.startswith(".udocker-save")] == []


@needs_skopeo
def test_save_is_read_by_skopeo(tmpdir):
    image = _load_sample(tmpdir)
    path = str(tmpdir.join("s.tar"))
    ok(tmpdir, "save", "-o", path, "sample:1")
    info = json.loads(skopeo("inspect", "docker-archive:" + path + ":sample:1"))
    assert info["Layers"] == image.diff_ids
    skopeo("copy", "docker-archive:" + path, "oci:" + str(tmpdir.join("oci")) + ":t")
    index = json.loads(tmpdir.join("oci", "index.json").read())
    blob = tmpdir.join("oci", "blobs", "sha256")
    manifest = json.loads(blob.join(index["manifests"][0]["digest"][7:]).read())
    config = json.loads(blob.join(manifest["config"]["digest"][7:]).read())
    assert config["rootfs"]["diff_ids"] == image.diff_ids


@needs_skopeo
def test_load_archives_made_by_skopeo(tmpdir):
    image = Image([rootfs("one"), rootfs("two", compress=True)])
    layout = tmpdir.mkdir("layout")
    for name, data in oci_entries([image.descriptor(org_opencontainers_image_ref_name="v1")],
                                  [image]).items():
        target = layout.join(*name.split("/"))
        target.dirpath().ensure(dir=True)
        target.write_binary(data)
    src = "oci:" + str(layout) + ":v1"
    docker_archive = str(tmpdir.join("d.tar"))
    oci_archive_path = str(tmpdir.join("o.tar"))
    skopeo("copy", src, "docker-archive:" + docker_archive + ":example.com/sk/img:3")
    skopeo("copy", src, "oci-archive:" + oci_archive_path + ":example.com/sk/img:4")
    assert ok(tmpdir, "load", "-i", docker_archive) == "example.com/sk/img:3\n"
    assert ok(tmpdir, "load", "-i", oci_archive_path) == "example.com/sk/img:4\n"
    for ref in ("example.com/sk/img:3", "example.com/sk/img:4"):
        config = json.loads(stored_config(tmpdir, ref).decode())
        assert config["rootfs"]["diff_ids"] == image.diff_ids
        assert_verifies(tmpdir, ref)


# -- upstream udocker 1.3.17 reads what we write, and we read what it writes

@needs_upstream
def test_upstream_reads_loaded_images(tmpdir):
    _load_sample(tmpdir)
    code, out = upstream(tmpdir, "images")
    assert code == 0 and "sample:1" in out
    code, out = upstream(tmpdir, "verify", "sample:1")
    assert code == 0 and "Ok" in out, out
    code, out = upstream(tmpdir, "create", "--name=c1", "sample:1")
    assert code == 0, out
    root = tmpdir.join("ud", "containers", "c1", "ROOT")
    assert root.join("etc", "base").read() == "content of base\n"
    assert root.join("etc", "top").read() == "content of top\n"


@needs_upstream
def test_upstream_loads_our_save(tmpdir):
    _load_sample(tmpdir)
    path = str(tmpdir.join("s.tar"))
    ok(tmpdir, "save", "-o", path, "sample:1")
    code, out = upstream(tmpdir, "load", "-i", path, udir="up")
    assert code == 0 and "sample:1" in out, out
    code, out = upstream(tmpdir, "images", udir="up")
    assert "sample:1" in out
    code, out = upstream(tmpdir, "verify", "sample:1", udir="up")
    assert code == 0 and "Ok" in out, out
    code, out = upstream(tmpdir, "create", "--name=c2", "sample:1", udir="up")
    assert code == 0, out
    assert tmpdir.join("up", "containers", "c2", "ROOT", "etc", "top").check()


@needs_upstream
def test_we_load_upstream_save_of_an_imported_image(tmpdir):
    tarball = write(tmpdir, "root.tar.gz", rootfs("imported", compress=True))
    code, out = upstream(tmpdir, "import", tarball, "upimg:7", udir="up")
    assert code == 0, out
    path = str(tmpdir.join("up.tar"))
    code, out = upstream(tmpdir, "save", "-o", path, "upimg:7", udir="up")
    assert code == 0, out
    assert ok(tmpdir, "load", "-i", path) == "upimg:7\n"
    assert_verifies(tmpdir, "upimg:7")
    # ... and we save upstream's v1 image (its config gets the real diff_ids)
    again = str(tmpdir.join("again.tar"))
    ok(tmpdir, "save", "-o", again, "upimg:7", udir="up")
    archive = tarfile.open(again)
    manifest = json.loads(archive.extractfile("manifest.json").read().decode())
    config = json.loads(archive.extractfile(manifest[0]["Config"]).read().decode())
    plain = gzip.GzipFile(fileobj=io.BytesIO(open(tarball, "rb").read())).read()
    assert config["rootfs"]["diff_ids"] == ["sha256:" + sha(plain)]


# -- import

def test_import_plain_and_gzip(tmpdir):
    plain = rootfs("imp")
    for name, data in (("p.tar", plain), ("g.tar.gz", gz(plain))):
        path = write(tmpdir, name, data)
        ok(tmpdir, "import", path, "imp:" + name[0])
        assert os.path.exists(path)
        manifest = stored_manifest(tmpdir, "imp:" + name[0])
        assert [l["digest"] for l in manifest["layers"]] == ["sha256:" + sha(data)]
        config = json.loads(stored_config(tmpdir, "imp:" + name[0]).decode())
        assert config["rootfs"]["diff_ids"] == ["sha256:" + sha(plain)]
        assert config["architecture"] == HOST.arch and config["os"] == "linux"
        assert config["history"][0]["comment"] == "created by udocker.py import"
        assert_verifies(tmpdir, "imp:" + name[0])


def test_import_mv_stdin_platform_and_replace(tmpdir):
    data = gz(rootfs("moved"))
    path = write(tmpdir, "m.tar.gz", data)
    ok(tmpdir, "import", "--mv", "--platform=linux/arm64/v8", path, "moved:1")
    assert not os.path.exists(path)
    config = json.loads(stored_config(tmpdir, "moved:1").decode())
    assert (config["os"], config["architecture"], config["variant"]) == \
        ("linux", "arm64", "v8")
    code, _, err = run(tmpdir, "import", "-", "moved:1", stdin=rootfs("stdin"))
    assert code == 0 and "replacing image: moved:1" in err
    assert json.loads(stored_config(tmpdir, "moved:1").decode())["rootfs"]["diff_ids"] == \
        ["sha256:" + sha(rootfs("stdin"))]
    assert_verifies(tmpdir, "moved:1")


def test_import_from_url(tmpdir):
    try:
        from http.server import HTTPServer, BaseHTTPRequestHandler
    except ImportError:                                   # Python 2
        from BaseHTTPServer import HTTPServer, BaseHTTPRequestHandler
    body = gz(rootfs("web"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            found = self.path == "/rootfs.tar.gz"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(body) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.daemon = True
    thread.start()
    try:
        base = "http://127.0.0.1:%d/" % server.server_address[1]
        ok(tmpdir, "import", base + "rootfs.tar.gz", "web:1")
        assert [l["digest"] for l in stored_manifest(tmpdir, "web:1")["layers"]] == \
            ["sha256:" + sha(body)]
        code, _, err = run(tmpdir, "import", base + "missing", "web:2")
        assert code != 0 and "404" in one_error_line(err)
    finally:
        server.shutdown()
        server.server_close()


def test_import_bad_input_leaves_nothing_behind(tmpdir):
    for data in (b"not a tarball at all\n" * 50, gz(b"not a tarball at all\n" * 50), b""):
        path = write(tmpdir, "bad.tar", data)
        code, _, err = run(tmpdir, "import", "--mv", path, "bad:1")
        assert code != 0 and "not a tar archive" in one_error_line(err)
        assert os.path.exists(path)
        assert images(tmpdir) == [] and layer_files(tmpdir) == []
    code, _, err = run(tmpdir, "import", str(tmpdir.join("nope.tar")), "bad:1")
    assert code != 0 and "does not exist" in one_error_line(err)
    code, _, err = run(tmpdir, "import", path)
    assert code != 0 and "missing argument" in one_error_line(err)
