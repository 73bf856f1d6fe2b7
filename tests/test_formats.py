"""Image formats: load (docker-save of every vintage, OCI layouts), save, import.

Archives come from tests/support/images (deterministic docker-save and OCI layout files),
are altered here for the odd vintages and the broken cases, or are made by real tools
(skopeo, upstream udocker 1.3.17). udocker.py runs as a subprocess with a private
repository; what lands on disk is checked, and so is what the other tools make of it.
"""
from __future__ import print_function, absolute_import

import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import pytest

from support import (UPSTREAM_UDOCKER, BaseHTTPRequestHandler, HTTPServer,
                     one_error_line, to_bytes, to_text, which)
from support.client import sha256_digest
from support.images import (Blob, Image, ImageIndex, Layer, build_tar, compress,
                            docker_archive_files, f, oci_layout_files, sym, with_parents,
                            write_tar, write_tree)
from support.runner import Udocker

UPSTREAM = UPSTREAM_UDOCKER

needs_skopeo = pytest.mark.skipif(not which("skopeo"), reason="no skopeo")
needs_upstream = pytest.mark.usefixtures("upstream_udocker")


# -- helpers

def layer(name, compression=None):
    return Layer([f("etc/" + name, "content of %s\n" % name)], compression=compression,
                 comment=name)


def archive(path, files, compression=None):
    """Write {member: bytes} as a tar file; returns its path as text."""
    return write_tar(str(path), files, compression)


def ok(run, *args, **kw):
    res = run(*args, **kw)
    assert res.rc == 0, res
    return res.out


class Upstream(object):
    """Runs udocker 1.3.17 on the repository and home of a udocker.py runner."""

    def __init__(self, run):
        self.run = run
        self.udocker_dir = run.udocker_dir

    def __call__(self, *args):
        env = self.run.environ({"UDOCKER_TARBALL": ""})
        proc = subprocess.Popen([UPSTREAM] + list(args), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=self.run.tmpdir)
        out = to_text(proc.communicate()[0], errors="replace")
        assert proc.returncode == 0, "udocker 1.3.17 %s:\n%s" % (" ".join(args), out)
        return out


def skopeo(*args):
    proc = subprocess.Popen(["skopeo", "--insecure-policy"] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return to_text(out)


def tag_dir(run, ref):
    name, _, tag = ref.rpartition(":")
    return os.path.join(run.udocker_dir, "repos", name, tag)


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


def stored_manifest(run, ref):
    return json.loads(to_text(read(os.path.join(tag_dir(run, ref), "manifest"))))


def stored_config(run, ref):
    digest = stored_manifest(run, ref)["config"]["digest"]
    return read(os.path.join(tag_dir(run, ref), digest))


def stored_layers(run, ref):
    return [l["digest"] for l in stored_manifest(run, ref)["layers"]]


def layer_files(run):
    path = os.path.join(run.udocker_dir, "layers")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def images(run):
    return [l.split()[0] for l in ok(run, "images").splitlines()[1:]]


def verifies(run, ref):
    res = run("verify", ref)
    assert res.rc == 0, res
    return True


def tar_diff_ids(image):
    return [l.diff_id for l in image.layers]


# -- load: docker-save archives

def test_load_classic_archive(udocker, tmpdir):
    image = Image([layer("base"), layer("top", "gzip")])
    path = archive(tmpdir.join("a.tar"), docker_archive_files([(image, ["myimg:1.0"])]))
    assert ok(udocker, "load", "-i", path) == "myimg:1.0\n"
    manifest = stored_manifest(udocker, "myimg:1.0")
    assert manifest["config"]["digest"] == sha256_digest(image.config_data)
    assert stored_layers(udocker, "myimg:1.0") == tar_diff_ids(image)  # docker save: plain
    assert stored_config(udocker, "myimg:1.0") == image.config_data
    assert os.path.exists(os.path.join(tag_dir(udocker, "myimg:1.0"), "v2"))
    assert verifies(udocker, "myimg:1.0")
    assert all(name.startswith("sha256:") for name in layer_files(udocker))


def test_load_gzipped_archive_from_stdin_every_spelling(udocker, tmpdir):
    image = Image([layer("one", "gzip")])
    data = read(archive(tmpdir.join("a.tar.gz"), docker_archive_files(
        [(image, ["piped:latest"])], compressed=True), "gzip"))
    assert ok(udocker, "load", input=data) == "piped:latest\n"
    assert ok(udocker, "load", "-", "other", input=data) == "other:latest\n"
    assert ok(udocker, "load", "--input=-", input=data) == "piped:latest\n"
    assert stored_layers(udocker, "other:latest") == [image.layers[0].digest]


def test_load_follows_manifest_layers_not_parent_links(udocker, tmpdir):
    image = Image([layer("a"), layer("b"), layer("c")])
    files = docker_archive_files([(image, ["order:1"])])
    ids = [name.split("/")[0] for name in json.loads(to_text(files["manifest.json"]))[0]
           ["Layers"]]
    for num, lid in enumerate(ids):                     # the parent chain now lies
        meta = {"id": lid}
        if num < len(ids) - 1:
            meta["parent"] = ids[num + 1]
        files[lid + "/json"] = to_bytes(json.dumps(meta))
    ok(udocker, "load", "-i", archive(tmpdir.join("a.tar"), files))
    assert stored_layers(udocker, "order:1") == tar_diff_ids(image)


def test_load_symlinked_layers(udocker, tmpdir):
    """Layers stored once as <hex>.tar, <id>/layer.tar symlinks to them (skopeo's way)."""
    image = Image([layer("a"), layer("b")])
    files = docker_archive_files([(image, ["linked:2"])])
    entries = []
    for name in sorted(files):
        if name.endswith("/layer.tar"):
            blob = sha256_digest(files[name])[7:] + ".tar"
            entries += [f(blob, files[name]), sym(name, "../" + blob)]
        else:
            entries.append(f(name, files[name]))
    tmpdir.join("s.tar").write_binary(build_tar(with_parents(entries)))
    assert ok(udocker, "load", "-i", str(tmpdir.join("s.tar"))) == "linked:2\n"
    assert stored_layers(udocker, "linked:2") == tar_diff_ids(image)
    assert verifies(udocker, "linked:2")


def test_load_multi_image_archive_keeps_every_name(udocker, tmpdir):
    base = layer("base")
    first = Image([base, layer("first")])
    second = Image([base, layer("second")])
    path = archive(tmpdir.join("m.tar"), docker_archive_files(
        [(first, ["one:a", "one:b"]), (second, ["reg.example.com/ns/two:c"])]))
    names = ["one:a", "one:b", "reg.example.com/ns/two:c"]
    assert ok(udocker, "load", "-i", path).split() == names
    assert sorted(images(udocker)) == names
    assert stored_layers(udocker, "reg.example.com/ns/two:c") == tar_diff_ids(second)
    assert len(layer_files(udocker)) == 5           # 2 configs, the shared base once
    assert all(verifies(udocker, ref) for ref in names)


def test_load_untagged_image_and_rename(udocker, tmpdir):
    image = Image([layer("x")])
    path = archive(tmpdir.join("u.tar"), docker_archive_files([(image, [])]))
    res = udocker("load", "-i", path)
    assert res.rc == 0 and "no name" in res.err
    assert res.out == "loaded-%s:latest\n" % image.config_blob("docker").hex[:12]
    assert ok(udocker, "load", "-i", path, "named") == "named:latest\n"
    assert ok(udocker, "load", "-i", path, "named:v2") == "named:v2\n"


def test_load_name_cannot_merge_two_images(udocker, tmpdir):
    path = archive(tmpdir.join("m.tar"), docker_archive_files(
        [(Image([layer("a")]), ["a:1"]), (Image([layer("b")]), ["b:1"])]))
    assert "names only one" in one_error_line(udocker("load", "-i", path, "both:1"))
    assert "two different images for both:1" in \
        one_error_line(udocker("load", "-i", path, "both"))
    assert images(udocker) == [] and layer_files(udocker) == []


def test_load_replaces_existing_tag(udocker, tmpdir):
    old, new = Image([layer("old")]), Image([layer("new")])
    ok(udocker, "load", "-i", archive(tmpdir.join("o.tar"),
                                      docker_archive_files([(old, ["img:1"])])))
    res = udocker("load", "-i", archive(tmpdir.join("n.tar"),
                                        docker_archive_files([(new, ["img:1"])])))
    assert res.rc == 0 and "replacing image: img:1" in res.err
    assert stored_config(udocker, "img:1") == new.config_data
    assert verifies(udocker, "img:1")


def test_load_refuses_to_replace_a_protected_tag(udocker, tmpdir):
    ok(udocker, "load", "-i", archive(tmpdir.join("o.tar"), docker_archive_files(
        [(Image([layer("old")]), ["img:1"])])))
    ok(udocker, "protect", "img:1")
    res = udocker("load", "-i", archive(tmpdir.join("n.tar"), docker_archive_files(
        [(Image([layer("new")]), ["img:1"])])))
    assert "protected" in one_error_line(res)
    assert len(layer_files(udocker)) == 2


# -- load: OCI layouts and Docker 25

def test_load_oci_layout_with_nested_index(udocker, tmpdir):
    mine = Image([layer("host", "gzip")])
    other_arch = "arm64" if mine.architecture != "arm64" else "amd64"
    theirs = Image([layer("other", "gzip")], architecture=other_arch)
    attestation = Blob(b'{"schemaVersion":2,"config":{},"layers":[]}',
                       "application/vnd.oci.image.manifest.v1+json")
    index = ImageIndex([theirs, mine], extra=[
        (attestation, {"platform": {"os": "unknown", "architecture": "unknown"}})])
    path = archive(tmpdir.join("o.tar"), oci_layout_files([(index, "3.1")]))
    assert ok(udocker, "load", "-i", path, "multi") == "multi:3.1\n"
    assert read(os.path.join(tag_dir(udocker, "multi:3.1"), "manifest")) == \
        mine.manifest("oci").data
    assert verifies(udocker, "multi:3.1")


def test_load_oci_layout_names(udocker, tmpdir):
    a, b = Image([layer("a", "gzip")]), Image([layer("b", "gzip")])
    path = archive(tmpdir.join("o.tar"), oci_layout_files([
        (a, "example.com/ns/app:2"), (a, "example.com/ns/app:latest"),
        (b, {"io.containerd.image.name": "docker.io/library/busybox:1.36",
             "org.opencontainers.image.ref.name": "1.36"})]))
    assert ok(udocker, "load", "-i", path).split() == \
        ["example.com/ns/app:2", "example.com/ns/app:latest", "busybox:1.36"]
    assert stored_layers(udocker, "busybox:1.36") == [b.layers[0].digest]


def test_load_docker25_archive(udocker, tmpdir):
    a = Image([layer("a"), layer("b")])
    b = Image([layer("a"), layer("c")])
    files = docker_archive_files([(a, ["first:1"]), (b, ["second:2"])], style="oci")
    assert ok(udocker, "load", "-i", archive(tmpdir.join("d.tar"), files)).split() == \
        ["first:1", "second:2"]
    index = json.loads(to_text(files["index.json"]))
    for ref, entry in zip(("first:1", "second:2"), index["manifests"]):
        # the OCI manifest docker stored is kept, so is the image's digest
        assert sha256_digest(read(os.path.join(tag_dir(udocker, ref), "manifest"))) == \
            entry["digest"]
    assert stored_layers(udocker, "second:2") == tar_diff_ids(b)
    assert len(layer_files(udocker)) == 5


# -- load: bad input is refused and changes nothing

def _bad_archives():
    good = docker_archive_files([(Image([layer("good")]), ["bad:1"])])
    full = build_tar(with_parents([f(n, good[n]) for n in sorted(good)]))
    no_layer = dict((n, v) for n, v in good.items() if not n.endswith("layer.tar"))
    corrupt = oci_layout_files([(Image([layer("corrupt", "gzip")]), "1")])
    for name in corrupt:
        if corrupt[name][:2] == b"\x1f\x8b":
            corrupt[name] += b"\0" * 512
    lying = docker_archive_files([(Image([layer("lying")]), ["lying:1"])])
    for name in lying:
        if name.endswith("layer.tar"):
            lying[name] = layer("other").tar
    tarred = lambda files: build_tar(with_parents([f(n, files[n]) for n in sorted(files)]))
    return [
        ("truncated", full[:len(full) // 2 + 100], "truncated"),
        ("not a tar", b"this is not an archive\n" * 100, "not a tar archive"),
        ("empty", b"", "not a tar archive"),
        ("no manifest", tarred({"etc/passwd": b"root:x:0:0::/root:/bin/sh\n"}),
         "not a docker-save or OCI archive"),
        ("missing layer", tarred(no_layer), "is not in the archive"),
        ("blob digest", tarred(corrupt), "does not match its digest"),
        ("diff_id", tarred(lying), "does not match the image config"),
        ("unsafe name", build_tar([f("manifest.json", b"[]"), f("../evil", b"x")]),
         "unsafe member name"),
    ]


@pytest.mark.parametrize("what,data,message", _bad_archives(),
                         ids=[case[0] for case in _bad_archives()])
def test_load_bad_input_leaves_nothing_behind(udocker, tmpdir, what, data, message):
    ok(udocker, "load", "-i", archive(tmpdir.join("keep.tar"), docker_archive_files(
        [(Image([layer("keep")]), ["keep:1"])])))
    before = layer_files(udocker)
    tmpdir.join("bad.tar").write_binary(data)
    for args, data_in in ((["-i", str(tmpdir.join("bad.tar"))], None), ([], data)):
        res = udocker("load", *args, input=data_in)
        assert message in one_error_line(res) and res.out == ""
        assert images(udocker) == ["keep:1"]
        assert layer_files(udocker) == before
        assert verifies(udocker, "keep:1")
    assert not tmpdir.join("evil").check() and not os.path.exists(
        os.path.join(udocker.udocker_dir, "evil"))


def test_load_usage_errors(udocker, tmpdir):
    res = udocker("load", "-i", str(tmpdir.join("nope.tar")))
    assert "does not exist" in one_error_line(res)
    path = archive(tmpdir.join("a.tar"), docker_archive_files([(Image([layer("a")]),
                                                                ["a:1"])]))
    assert "invalid image reference" in one_error_line(udocker("load", "-i", path, "Bad Name"))
    assert "unexpected argument" in one_error_line(udocker("load", "-i", path, "x", "y"))
    assert images(udocker) == [] and layer_files(udocker) == []


# -- save

def _load_sample(run, tmpdir):
    image = Image([layer("base"), layer("top", "gzip")])
    files = docker_archive_files([(image, ["sample:1"])], compressed=True)
    ok(run, "load", "-i", archive(tmpdir.join("in.tar"), files))
    return image


def test_save_round_trip_is_exact_and_deterministic(udocker, tmpdir):
    image = _load_sample(udocker, tmpdir)
    ok(udocker, "tag", "sample:1", "sample:2")
    first, second = str(tmpdir.join("s1.tar")), str(tmpdir.join("s2.tar"))
    ok(udocker, "save", "-o", first, "sample:1", "sample:2")
    ok(udocker, "save", "--output=" + second, "sample:1", "sample:2")
    assert read(first) == read(second)
    saved = tarfile.open(first)
    names = saved.getnames()
    assert names == sorted(names) and all(m.mtime == 0 for m in saved)
    manifest = json.loads(to_text(saved.extractfile("manifest.json").read()))
    assert len(manifest) == 1 and manifest[0]["RepoTags"] == ["sample:1", "sample:2"]
    assert saved.extractfile(manifest[0]["Config"]).read() == image.config_data
    repositories = json.loads(to_text(saved.extractfile("repositories").read()))
    assert repositories["sample"]["1"] == manifest[0]["Layers"][-1].split("/")[0]
    for name in manifest[0]["Layers"]:
        assert saved.extractfile(name.split("/")[0] + "/VERSION").read() == b"1.0"
    back = Udocker(str(tmpdir.join("back")))
    assert ok(back, "load", "-i", first).split() == ["sample:1", "sample:2"]
    assert stored_manifest(back, "sample:1") == stored_manifest(udocker, "sample:1")
    assert stored_config(back, "sample:2") == image.config_data


def test_save_to_stdout_and_refusals(udocker, tmpdir):
    _load_sample(udocker, tmpdir)
    data = udocker("save", "sample:1").check().raw_out
    assert udocker("save", "-o", "-", "sample:1").check().raw_out == data
    assert tarfile.open(fileobj=io.BytesIO(data)).getmember("manifest.json")
    tmpdir.join("exists.tar").write_binary(b"keep me")
    res = udocker("save", "-o", str(tmpdir.join("exists.tar")), "sample:1")
    assert "already exists" in one_error_line(res)
    assert tmpdir.join("exists.tar").read_binary() == b"keep me"
    res = udocker("save", "-o", str(tmpdir.join("x.tar")), "sample:1", "nosuch:1")
    assert "not found" in one_error_line(res)
    assert not tmpdir.join("x.tar").check()
    assert [n for n in os.listdir(str(tmpdir)) if n.startswith(".udocker-save")] == []


def test_save_by_digest_tag_writes_an_unnamed_image(udocker, tmpdir):
    image = _load_sample(udocker, tmpdir)
    by_digest = "sample@" + sha256_digest(b"any")
    ok(udocker, "tag", "sample:1", by_digest)
    path = str(tmpdir.join("d.tar"))
    ok(udocker, "save", "-o", path, by_digest)
    saved = tarfile.open(path)
    assert json.loads(to_text(saved.extractfile("manifest.json").read()))[0]["RepoTags"] == []
    assert json.loads(to_text(saved.extractfile("repositories").read())) == {}
    back = Udocker(str(tmpdir.join("back")))
    assert ok(back, "load", "-i", path, "again") == "again:latest\n"
    assert stored_config(back, "again:latest") == image.config_data


@needs_skopeo
def test_save_is_read_by_skopeo(udocker, tmpdir):
    image = _load_sample(udocker, tmpdir)
    path = str(tmpdir.join("s.tar"))
    ok(udocker, "save", "-o", path, "sample:1")
    info = json.loads(skopeo("inspect", "docker-archive:" + path + ":sample:1"))
    assert info["Layers"] == tar_diff_ids(image)
    skopeo("copy", "docker-archive:" + path, "oci:" + str(tmpdir.join("oci")) + ":t")
    blobs = tmpdir.join("oci", "blobs", "sha256")
    index = json.loads(tmpdir.join("oci", "index.json").read())
    manifest = json.loads(blobs.join(index["manifests"][0]["digest"][7:]).read())
    config = json.loads(blobs.join(manifest["config"]["digest"][7:]).read())
    assert config["rootfs"]["diff_ids"] == tar_diff_ids(image)


@needs_skopeo
def test_load_archives_made_by_skopeo(udocker, tmpdir):
    image = Image([layer("one"), layer("two", "gzip")])
    layout = write_tree(str(tmpdir.mkdir("layout")), oci_layout_files([(image, "v1")]))
    docker_archive, oci_archive = str(tmpdir.join("d.tar")), str(tmpdir.join("o.tar"))
    skopeo("copy", "oci:%s:v1" % layout, "docker-archive:%s:example.com/sk/img:3"
           % docker_archive)
    skopeo("copy", "oci:%s:v1" % layout, "oci-archive:%s:example.com/sk/img:4" % oci_archive)
    assert ok(udocker, "load", "-i", docker_archive) == "example.com/sk/img:3\n"
    assert ok(udocker, "load", "-i", oci_archive) == "example.com/sk/img:4\n"
    for ref in ("example.com/sk/img:3", "example.com/sk/img:4"):
        config = json.loads(to_text(stored_config(udocker, ref)))
        assert config["rootfs"]["diff_ids"] == tar_diff_ids(image)
        assert verifies(udocker, ref)


# -- upstream udocker 1.3.17 reads what we write, and we read what it writes

@needs_upstream
def test_upstream_reads_loaded_images(udocker, tmpdir):
    _load_sample(udocker, tmpdir)
    old = Upstream(udocker)
    assert "sample:1" in old("images")
    out = old("verify", "sample:1")
    assert "image Ok" in out and "Warning" not in out     # our extra files are invisible
    old("create", "--name=c1", "sample:1")
    root = os.path.join(udocker.udocker_dir, "containers", "c1", "ROOT", "etc")
    assert read(os.path.join(root, "base")) == b"content of base\n"
    assert read(os.path.join(root, "top")) == b"content of top\n"


@needs_upstream
def test_upstream_loads_our_save(udocker, tmpdir):
    _load_sample(udocker, tmpdir)
    path = str(tmpdir.join("s.tar"))
    ok(udocker, "save", "-o", path, "sample:1")
    old = Upstream(Udocker(str(tmpdir.join("up"))))
    assert "sample:1" in old("load", "-i", path)
    assert "sample:1" in old("images")
    assert "image Ok" in old("verify", "sample:1")
    old("create", "--name=c2", "sample:1")
    assert os.path.exists(os.path.join(old.udocker_dir, "containers", "c2", "ROOT", "etc",
                                       "top"))


@needs_upstream
def test_we_load_upstream_save_and_save_its_v1_images(udocker, tmpdir):
    rootfs = layer("imported", "gzip")
    tarball = str(tmpdir.join("root.tar.gz"))
    tmpdir.join("root.tar.gz").write_binary(rootfs.data)
    other = Udocker(str(tmpdir.join("up")))
    old = Upstream(other)
    old("import", tarball, "upimg:7")
    path = str(tmpdir.join("up.tar"))
    old("save", "-o", path, "upimg:7")
    assert ok(udocker, "load", "-i", path) == "upimg:7\n"
    assert verifies(udocker, "upimg:7")
    # our save of upstream's v1 image: its config gets the real diff_ids
    again = str(tmpdir.join("again.tar"))
    ok(other, "save", "-o", again, "upimg:7")
    saved = tarfile.open(again)
    manifest = json.loads(to_text(saved.extractfile("manifest.json").read()))
    config = json.loads(to_text(saved.extractfile(manifest[0]["Config"]).read()))
    assert config["rootfs"]["diff_ids"] == [rootfs.diff_id]


# -- import

def test_import_plain_and_gzip(udocker, tmpdir):
    rootfs = layer("imp")
    for tag, data in (("p", rootfs.tar), ("g", compress(rootfs.tar, "gzip"))):
        tmpdir.join(tag).write_binary(data)
        ok(udocker, "import", str(tmpdir.join(tag)), "imp:" + tag)
        assert tmpdir.join(tag).check()
        assert stored_layers(udocker, "imp:" + tag) == [sha256_digest(data)]
        config = json.loads(to_text(stored_config(udocker, "imp:" + tag)))
        assert config["rootfs"]["diff_ids"] == [rootfs.diff_id]
        assert (config["os"], config["architecture"]) == ("linux", Image([]).architecture)
        assert config["history"][0]["comment"] == "created by udocker.py import"
        assert verifies(udocker, "imp:" + tag)


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_import_bzip2_and_xz_are_stored_inflated(udocker, tmpdir, kind):
    """Decompressed by the decompressor create uses (under 2.7 by the bzip2/xz program),
    from a file and from a pipe."""
    if kind == "xz" and sys.version_info[0] < 3 and not which("xz"):
        pytest.skip("no xz program (Python 2.7 has no lzma)")
    rootfs = layer("inflated")
    data = compress(rootfs.tar, kind)
    tmpdir.join("r").write_binary(data)
    for tag, args, data_in in (("file", [str(tmpdir.join("r"))], None), ("pipe", ["-"], data)):
        ok(udocker, "import", *(args + ["imp:" + tag]), input=data_in)
        assert stored_layers(udocker, "imp:" + tag) == [rootfs.diff_id]
        config = json.loads(to_text(stored_config(udocker, "imp:" + tag)))
        assert config["rootfs"]["diff_ids"] == [rootfs.diff_id]
        assert stored_manifest(udocker, "imp:" + tag)["layers"][0]["mediaType"] == \
            "application/vnd.oci.image.layer.v1.tar"
        assert verifies(udocker, "imp:" + tag)


def test_import_truncated_or_corrupt_gzip_names_the_tarball(udocker, tmpdir):
    data = compress(layer("cut").tar + b"\0" * 4096, "gzip")
    for how, bad, needle in (("truncated", data[:len(data) // 2], "truncated gzip data"),
                             ("corrupt", data[:40] + b"\xff" * 64 + data[104:],
                              "corrupt gzip data")):
        path = str(tmpdir.join(how + ".tar.gz"))
        with open(path, "wb") as handle:
            handle.write(bad)
        for args, data_in, label in (([path], None, path), (["-"], bad, "-")):
            line = one_error_line(udocker("import", *(args + ["cut:1"]), input=data_in))
            assert line.startswith("Error: %s: " % label) and needle in line, line
    assert images(udocker) == [] and layer_files(udocker) == []


def test_import_mv_stdin_platform_and_replace(udocker, tmpdir):
    path = tmpdir.join("m.tar.gz")
    path.write_binary(layer("moved", "gzip").data)
    ok(udocker, "import", "--mv", "--platform=linux/arm64/v8", str(path), "moved:1")
    assert not path.check()
    config = json.loads(to_text(stored_config(udocker, "moved:1")))
    assert (config["os"], config["architecture"], config["variant"]) == \
        ("linux", "arm64", "v8")
    res = udocker("import", "-", "moved:1", input=layer("stdin").tar)
    assert res.rc == 0 and "replacing image: moved:1" in res.err
    config = json.loads(to_text(stored_config(udocker, "moved:1")))
    assert config["rootfs"]["diff_ids"] == [layer("stdin").diff_id]
    assert verifies(udocker, "moved:1")


def test_import_from_url(udocker):
    body = layer("web", "gzip").data

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
        ok(udocker, "import", base + "rootfs.tar.gz", "web:1")
        assert stored_layers(udocker, "web:1") == [sha256_digest(body)]
        cid = ok(udocker, "import", "--tocontainer", base + "rootfs.tar.gz").strip()
        assert read(os.path.join(udocker.udocker_dir, "containers", cid, "ROOT", "etc",
                                 "web")) == b"content of web\n"
        assert "404" in one_error_line(udocker("import", "--clone", base + "missing"))
        assert "404" in one_error_line(udocker("import", base + "missing", "web:2"))
    finally:
        server.shutdown()
        server.server_close()


def test_import_bad_input_leaves_nothing_behind(udocker, tmpdir):
    path = tmpdir.join("bad.tar")
    for data in (b"not a tarball at all\n" * 50,
                 compress(b"not a tarball at all\n" * 50, "gzip"), b""):
        path.write_binary(data)
        res = udocker("import", "--mv", str(path), "bad:1")
        assert "not a tar archive" in one_error_line(res)
        assert path.check()
        assert images(udocker) == [] and layer_files(udocker) == []
    res = udocker("import", str(tmpdir.join("nope.tar")), "bad:1")
    assert "does not exist" in one_error_line(res)
    assert "missing argument" in one_error_line(udocker("import", str(path)))


def test_import_and_save_errors_name_what_is_wrong(udocker, tmpdir):
    """Not 'file does not exist' for /dev/null, no temporary file name, no silent stdout."""
    line = one_error_line(udocker("import", "/dev/null", "x:1"))
    assert "not a regular file: /dev/null (a character device" in line
    line = one_error_line(udocker("import", str(tmpdir), "x:1"))
    assert "not a regular file: %s (a directory" % tmpdir in line
    _load_sample(udocker, tmpdir)
    for target, needle in (("/nonexistent/x.tar", "no such directory: /nonexistent"),
                           ("", "empty output file name"),
                           (str(tmpdir.join("sub", "x.tar")), "no such directory: ")):
        res = udocker("save", "-o", target, "sample:1")
        assert one_error_line(res).startswith("Error: save: " + needle), res
        assert res.out == "" and ".udocker-save" not in res.err, res
