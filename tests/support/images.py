# -*- coding: utf-8 -*-
"""Deterministic test images: layers, configs, manifests, push, save, OCI.

Build:
    layer = Layer([d("etc"), f("etc/hello", b"hi\\n"), sym("bin/sh", "busybox"),
                   hard("bin/ls", "bin/busybox"), fifo("run/fifo"),
                   whiteout("etc/old"), opaque("var/cache")],
                  compression="gzip")      # or None, "bzip2", "xz", "zstd"
    image = Image([base, layer], config={"Cmd": ["sh"]}, architecture="amd64")
    image.manifest("docker") / image.manifest("oci")   -> Blob (bytes, digest)
    index = ImageIndex([img_amd64, img_arm64])          -> .manifest(kind)
    image.files()   the flattened file system the layers describe

Same spec, same bytes: every member has a fixed mtime (EPOCH unless given),
uid/gid 0 unless given, gzip has mtime 0 and no file name, JSON is dumped
with sorted keys. Digests are stable within one interpreter on one host,
not across them: the busybox layer is the host's /bin/busybox, compressed
bytes depend on the zlib/bzip2/xz in use, and tarfile of newer Pythons
(3.13 here) leaves devmajor/devminor empty where 2.7/3.6 write "0000000".
Tests must compare with what was pushed (registry.images), not constants.

Push:  push_image(client, repo, tags, image, kind) / push_index(...)
       push_standard_images(registry) -> {"repo:tag": info}
Files: docker_archive_files(...) (docker save, legacy or Docker 25 style),
       oci_layout_files(...); write_tree(dir, files) / write_tar(path, files)
"""

from __future__ import print_function, absolute_import, division

import bz2
import gzip
import io
import json
import os
import platform
import posixpath
import subprocess
import tarfile

from . import (SupportError, binary_type, native_str, text_type, to_bytes,
               to_text, which)
from .client import (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX,
                     OCI_MANIFEST, sha256_digest)

EPOCH = 1700000000                 # default mtime of every tar member
CREATED = "2023-11-14T22:13:20Z"   # the same instant, for configs
BUSYBOX = "/bin/busybox"           # busybox-static on the test host
PLATFORM_FILE = "etc/test-platform"  # marker file in test/multiarch images
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_SUFFIX = {None: "", "gzip": ".gzip", "bzip2": ".bzip2", "xz": ".xz",
           "zstd": ".zstd"}
_OCI_SUFFIX = {None: "", "gzip": "+gzip", "bzip2": "+bzip2", "xz": "+xz",
               "zstd": "+zstd"}

# ---------------------------------------------------------------------------
# layer entries
# ---------------------------------------------------------------------------


def _clean(path):
    path = to_text(path)
    while path.startswith("/") or path.startswith("./"):
        path = path[1:] if path.startswith("/") else path[2:]
    return path.rstrip("/")


def _entry(kind, path, mode, **extra):
    entry = {"type": kind, "path": _clean(path), "mode": mode}
    entry.update(extra)
    return entry


def f(path, data=b"", mode=0o644, **extra):
    """A regular file (data is bytes or text)."""
    return _entry("file", path, mode, data=to_bytes(data), **extra)


def d(path, mode=0o755, **extra):
    """A directory."""
    return _entry("dir", path, mode, **extra)


def sym(path, target, **extra):
    """A symbolic link to target (relative or absolute)."""
    return _entry("symlink", path, 0o777, target=to_text(target), **extra)


def hard(path, target, **extra):
    """A hard link to target (a path inside the image, no leading /)."""
    return _entry("hardlink", path, 0o644, target=_clean(target), **extra)


def fifo(path, mode=0o644, **extra):
    """A named pipe."""
    return _entry("fifo", path, mode, **extra)


def chardev(path, major, minor, mode=0o666, **extra):
    """A character device (non-root extraction cannot create it)."""
    return _entry("chardev", path, mode, major=major, minor=minor, **extra)


def whiteout(path):
    """Delete path of the lower layers: writes DIR/.wh.NAME."""
    path = _clean(path)
    return _entry("whiteout", posixpath.join(posixpath.dirname(path),
                                             ".wh." + posixpath.basename(path)),
                  0, target=path)


def opaque(path):
    """Hide all lower-layer contents of directory path: DIR/.wh..wh..opq."""
    path = _clean(path)
    return _entry("opaque", posixpath.join(path, ".wh..wh..opq"), 0,
                  target=path)


_TAR_TYPES = {"file": tarfile.REGTYPE, "whiteout": tarfile.REGTYPE,
              "opaque": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
              "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
              "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE,
              "blockdev": tarfile.BLKTYPE}


def with_parents(entries):
    """Add the missing parent directories (mode 0755) before entries."""
    seen = set(e["path"] for e in entries if e["type"] == "dir")
    out = []
    for entry in entries:
        parent = posixpath.dirname(entry["path"])
        missing = []
        while parent and parent not in seen:
            missing.append(parent)
            seen.add(parent)
            parent = posixpath.dirname(parent)
        out.extend(d(p) for p in reversed(missing))
        out.append(entry)
    return out


def build_tar(entries, prefix="", tar_format=tarfile.GNU_FORMAT):
    """Return the bytes of a tar archive of entries (in the given order)."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=tar_format,
                       encoding="utf-8")
    for entry in entries:
        info = tarfile.TarInfo(native_str(prefix + entry["path"]))
        info.type = _TAR_TYPES[entry["type"]]
        info.mode = entry["mode"]
        info.mtime = entry.get("mtime", EPOCH)
        info.uid = entry.get("uid", 0)
        info.gid = entry.get("gid", 0)
        info.uname = native_str(entry.get("uname", "root" if info.uid == 0
                                          else ""))
        info.gname = native_str(entry.get("gname", "root" if info.gid == 0
                                          else ""))
        data = None
        if entry["type"] in ("symlink", "hardlink"):
            target = entry["target"]
            if entry["type"] == "hardlink":
                target = prefix + target
            info.linkname = native_str(target)
        elif entry["type"] in ("chardev", "blockdev"):
            info.devmajor = entry["major"]
            info.devminor = entry["minor"]
        elif entry["type"] == "file":
            data = entry["data"]
            info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    tar.close()
    return buf.getvalue()


def _pipe(argv, data):
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(data)
    if proc.returncode != 0:
        raise SupportError("%s failed: %s" % (argv[0], to_text(err)))
    return out


def compress(data, compression):
    """Compress bytes data: None, "gzip", "bzip2", "xz" or "zstd"."""
    if compression is None:
        return data
    if compression == "gzip":
        buf = io.BytesIO()
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=buf,
                           compresslevel=6, mtime=0)
        gz.write(data)
        gz.close()
        return buf.getvalue()
    if compression == "bzip2":
        return bz2.compress(data, 9)
    if compression == "xz":
        try:
            import lzma
            return lzma.compress(data, format=lzma.FORMAT_XZ)
        except ImportError:  # Python 2.7
            if not which("xz"):
                raise SupportError("xz compression needs lzma or xz")
            return _pipe([which("xz"), "-c", "-6"], data)
    if compression == "zstd":
        if not which("zstd"):
            raise SupportError("zstd compression needs the zstd command")
        return _pipe([which("zstd"), "-q", "-c", "-3", "--no-check"], data)
    raise ValueError("unknown compression %r" % (compression,))


# ---------------------------------------------------------------------------
# blobs, layers, images, indexes
# ---------------------------------------------------------------------------


def dump_json(obj, indent=None):
    """Deterministic JSON bytes (sorted keys, no trailing spaces)."""
    seps = (",", ": ") if indent else (",", ":")
    return to_bytes(json.dumps(obj, sort_keys=True, indent=indent,
                               separators=seps))


class Blob(object):
    """Bytes with their digest, size and media type."""

    def __init__(self, data, media_type, digest=None):
        self.data = data
        self.media_type = media_type
        self.digest = digest or sha256_digest(data)
        self.size = len(data)

    @property
    def hex(self):
        """The digest without "sha256:"."""
        return self.digest.split(":", 1)[1]

    def descriptor(self, **extra):
        """The OCI/Docker descriptor {mediaType, digest, size}."""
        desc = {"mediaType": self.media_type, "digest": self.digest,
                "size": self.size}
        desc.update(extra)
        return desc


class Layer(object):
    """A layer: entries -> tar -> compressed blob.

    .entries  the spec (with parents added unless auto_parents=False)
    .tar      uncompressed tar bytes; .diff_id = sha256 of it
    .data     the blob as pushed; .digest, .size
    """

    def __init__(self, entries, compression="gzip", comment="",
                 prefix="", auto_parents=True):
        self.entries = with_parents(entries) if auto_parents else \
            list(entries)
        self.compression = compression
        self.comment = comment or "layer"
        self.tar = build_tar(self.entries, prefix)
        self.diff_id = sha256_digest(self.tar)
        self.data = compress(self.tar, compression)
        self.digest = sha256_digest(self.data)
        self.size = len(self.data)

    def media_type(self, kind):
        """Layer media type for kind "docker" or "oci"."""
        if kind == "oci":
            return OCI_LAYER + _OCI_SUFFIX[self.compression]
        return DOCKER_LAYER + _SUFFIX[self.compression]

    def blob(self, kind):
        """This layer as a Blob of the given kind."""
        return Blob(self.data, self.media_type(kind), self.digest)


class Image(object):
    """A single-platform image: layers (base first) and a config."""

    def __init__(self, layers, config=None, architecture=None, os="linux",
                 variant=None, created=CREATED, history=None, name=""):
        self.layers = list(layers)
        self.container_config = dict(config or {})
        self.architecture = architecture or host_arch()[0]
        self.os = os
        self.variant = variant
        self.created = created
        self.name = name
        if history is None:
            history = [{"created": created, "created_by": l.comment}
                       for l in self.layers]
        self.history = history
        cfg = {"architecture": self.architecture, "os": os,
               "created": created, "config": self.container_config,
               "rootfs": {"type": "layers",
                          "diff_ids": [l.diff_id for l in self.layers]},
               "history": history}
        if variant:
            cfg["variant"] = variant
        self.config = cfg
        self.config_data = dump_json(cfg)

    @property
    def platform(self):
        """"os/arch" or "os/arch/variant"."""
        parts = [self.os, self.architecture] + \
            ([self.variant] if self.variant else [])
        return "/".join(parts)

    def platform_dict(self):
        """The platform object of an index entry."""
        plat = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            plat["variant"] = self.variant
        return plat

    def config_blob(self, kind):
        """The config as a Blob of the given kind."""
        return Blob(self.config_data,
                    OCI_CONFIG if kind == "oci" else DOCKER_CONFIG)

    def manifest(self, kind="docker", annotations=None):
        """The image manifest (Docker schema 2 or OCI) as a Blob."""
        media_type = OCI_MANIFEST if kind == "oci" else DOCKER_MANIFEST
        doc = {"schemaVersion": 2, "mediaType": media_type,
               "config": self.config_blob(kind).descriptor(),
               "layers": [l.blob(kind).descriptor() for l in self.layers]}
        if annotations:
            doc["annotations"] = annotations
        return Blob(dump_json(doc, indent=3), media_type)

    def blobs(self, kind):
        """Config and layer blobs, config first."""
        return [self.config_blob(kind)] + [l.blob(kind) for l in self.layers]

    def files(self):
        """The flattened file system: {path: entry}, whiteouts applied."""
        return flatten(self.layers)


class ImageIndex(object):
    """A multi-platform index of Images (plus extra raw entries)."""

    def __init__(self, images, extra=None):
        self.images = list(images)
        self.extra = list(extra or [])  # [(Blob manifest, descriptor extras)]

    def manifest(self, kind="docker"):
        """The manifest list (docker) or image index (oci) as a Blob."""
        media_type = OCI_INDEX if kind == "oci" else DOCKER_MANIFEST_LIST
        entries = [img.manifest(kind).descriptor(platform=img.platform_dict())
                   for img in self.images]
        entries += [blob.descriptor(**extra) for blob, extra in self.extra]
        doc = {"schemaVersion": 2, "mediaType": media_type,
               "manifests": entries}
        return Blob(dump_json(doc, indent=3), media_type)


def flatten(layers):
    """Apply layers in order; return {path: entry} of what remains.

    Whiteouts and opaque markers of a layer act on lower layers only.
    """
    state = {}

    def drop(path, keep_self=False):
        for key in list(state):
            if key.startswith(path + "/") or (key == path and not keep_self):
                del state[key]

    for layer in layers:
        for entry in layer.entries:
            if entry["type"] == "whiteout":
                drop(entry["target"])
            elif entry["type"] == "opaque":
                drop(entry["target"], keep_self=True)
        for entry in layer.entries:
            if entry["type"] in ("whiteout", "opaque"):
                continue
            old = state.get(entry["path"])
            if old is not None and old["type"] == "dir" and \
                    entry["type"] != "dir":
                drop(entry["path"])
            state[entry["path"]] = entry
    return state


def host_arch():
    """(docker architecture, variant or None) of this host."""
    machine = platform.machine().lower()
    table = {"x86_64": ("amd64", None), "amd64": ("amd64", None),
             "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
             "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
             "i386": ("386", None), "i686": ("386", None),
             "ppc64le": ("ppc64le", None), "s390x": ("s390x", None),
             "riscv64": ("riscv64", None)}
    return table.get(machine, (machine, None))


# ---------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------


def _info(repo, tag, manifest, kind):
    return {"repo": repo, "tag": tag, "ref": "%s:%s" % (repo, tag),
            "kind": kind, "media_type": manifest.media_type,
            "digest": manifest.digest, "size": manifest.size,
            "manifest": manifest.data}


def image_info(image, kind):
    """What a pushed single image looks like (no repo/tag)."""
    manifest = image.manifest(kind)
    config = image.config_blob(kind)
    return {"kind": kind, "media_type": manifest.media_type,
            "digest": manifest.digest, "size": manifest.size,
            "manifest": manifest.data, "platform": image.platform,
            "config": {"digest": config.digest, "size": config.size,
                       "media_type": config.media_type,
                       "data": config.data},
            "layers": [{"digest": l.digest, "size": l.size,
                        "diff_id": l.diff_id, "compression": l.compression,
                        "media_type": l.media_type(kind)}
                       for l in image.layers],
            "image": image}


def push_image(client, repo, tags, image, kind="docker"):
    """Push image to repo under each tag; return {"repo:tag": info}."""
    if isinstance(tags, (text_type, binary_type)):
        tags = [tags]
    for blob in image.blobs(kind):
        client.upload_blob(repo, blob.data, blob.digest)
    manifest = image.manifest(kind)
    pushed = {}
    for tag in tags:
        digest = client.put_manifest(repo, tag, manifest.data,
                                     manifest.media_type)
        if digest != manifest.digest:
            raise SupportError("registry digest %s != %s for %s:%s"
                               % (digest, manifest.digest, repo, tag))
        info = image_info(image, kind)
        info.update(_info(repo, tag, manifest, kind))
        pushed[info["ref"]] = info
    return pushed


def push_index(client, repo, tags, index, kind="docker"):
    """Push every image of index by digest, then the index under tags."""
    if isinstance(tags, (text_type, binary_type)):
        tags = [tags]
    platforms = {}
    for image in index.images:
        for blob in image.blobs(kind):
            client.upload_blob(repo, blob.data, blob.digest)
        manifest = image.manifest(kind)
        client.put_manifest(repo, manifest.digest, manifest.data,
                            manifest.media_type)
        platforms[image.platform] = image_info(image, kind)
    for blob, _ in index.extra:
        client.put_manifest(repo, blob.digest, blob.data, blob.media_type)
    manifest = index.manifest(kind)
    pushed = {}
    for tag in tags:
        digest = client.put_manifest(repo, tag, manifest.data,
                                     manifest.media_type)
        if digest != manifest.digest:
            raise SupportError("registry digest %s != %s for %s:%s"
                               % (digest, manifest.digest, repo, tag))
        info = _info(repo, tag, manifest, kind)
        info["platforms"] = platforms
        info["index"] = index
        pushed[info["ref"]] = info
    return pushed


# ---------------------------------------------------------------------------
# the standard test images
# ---------------------------------------------------------------------------

PASSWD = b"""root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
user:x:1000:1000:Test User:/home/user:/bin/sh
"""
GROUP = b"""root:x:0:
daemon:x:1:
nogroup:x:65534:
user:x:1000:
"""
OS_RELEASE = b"""NAME="udocker test busybox"
ID=udocker-test
VERSION_ID=1.0
PRETTY_NAME="udocker test image (busybox)"
"""


def busybox_applets(binary=BUSYBOX):
    """Applet names of the busybox binary (sorted)."""
    if not os.path.isfile(binary):
        raise SupportError("%s not found: apt-get install busybox-static"
                           % binary)
    out = subprocess.check_output([binary, "--list"])
    return sorted(set(to_text(out).split()) - set(["busybox"]))


def busybox_layer(binary=BUSYBOX):
    """One layer: /bin/busybox, a symlink per applet, /etc basics, dirs."""
    with open(binary, "rb") as binf:
        data = binf.read()
    entries = [d("bin"), f("bin/busybox", data, 0o755)]
    entries += [sym("bin/" + name, "busybox")
                for name in busybox_applets(binary) if "/" not in name]
    entries += [d("etc"), f("etc/passwd", PASSWD), f("etc/group", GROUP),
                f("etc/os-release", OS_RELEASE),
                f("etc/hostname", b"busybox\n"),
                d("tmp", 0o1777), d("proc", 0o555), d("dev"), d("sys", 0o555),
                d("root", 0o700), d("home"),
                d("home/user", 0o755, uid=1000, gid=1000),
                d("usr"), d("usr/bin"), d("usr/sbin"), d("var"),
                d("var/tmp", 0o1777)]
    return Layer(entries, comment="busybox base")


BUSYBOX_CONFIG = {"Env": ["PATH=" + DEFAULT_PATH], "Cmd": ["sh"]}


def multilayer_layers():
    """Layers 2-4 of test/multilayer (the base is the busybox layer)."""
    files = Layer([
        d("data"), f("data/file1.txt", b"one\n"),
        f("data/override.txt", b"layer 2\n"),
        f("data/exec.sh", b"#!/bin/sh\necho multilayer\n", 0o755),
        f("data/readonly.txt", b"read only\n", 0o444),
        d("data/sub/dir/deeper"),
        f("data/sub/dir/deeper/deep.txt", b"deep\n"),
        f("data/sub/dir/gone.txt", b"to be whited out\n"),
        f("data/sub/dir/kept.txt", b"kept\n"),
        hard("data/hardlink.txt", "data/file1.txt"),
        hard("data/sub/hardlink2.txt", "data/file1.txt"),
        sym("data/link1", "link2"), sym("data/link2", "link3"),
        sym("data/link3", "file1.txt"),
        sym("data/abslink", "/data/file1.txt"),
        sym("data/dirlink", "sub/dir"),
        sym("data/dangling", "/nonexistent/target"),
        fifo("data/fifo"),
        d("data/ro-dir", 0o555), f("data/ro-dir/inside.txt", b"inside\n"),
        d("data/todelete"), f("data/todelete/a.txt", b"a\n"),
        d("data/todelete/sub"), f("data/todelete/sub/b.txt", b"b\n"),
        d("data/opaque"), f("data/opaque/a.txt", b"a\n"),
        d("data/opaque/olddir"), f("data/opaque/olddir/b.txt", b"b\n"),
        f("etc/delete-me", b"delete me\n"),
        f("topfile-to-delete", b"top\n"),
        d("topdir-to-delete"), f("topdir-to-delete/x", b"x\n"),
        d("home/user", 0o755, uid=1000, gid=1000),
        f("home/user/.profile", b"export USERFILE=1\n", uid=1000, gid=1000),
        f("data/setuid-file", b"#!/bin/sh\n", 0o4755),
    ], comment="files, links, special files")
    whiteouts = Layer([
        whiteout("topfile-to-delete"), whiteout("topdir-to-delete"),
        whiteout("etc/delete-me"), whiteout("data/sub/dir/gone.txt"),
        whiteout("data/todelete"),
        opaque("data/opaque"), f("data/opaque/c.txt", b"c\n"),
        f("data/added-in-3.txt", b"three\n"),
    ], comment="whiteouts and an opaque dir")
    plain = Layer([
        f("data/override.txt", b"layer 4\n"),
        f("data/uncompressed.txt", b"plain tar layer\n"),
        d("data/todelete"), f("data/todelete/new.txt", b"recreated\n"),
    ], compression=None, comment="an uncompressed layer")
    return [files, whiteouts, plain]


MULTILAYER_CONFIG = {"Env": ["PATH=" + DEFAULT_PATH, "MULTI=1"],
                     "Cmd": ["sh", "-c", "cat /data/file1.txt"],
                     "WorkingDir": "/data", "User": "",
                     "Labels": {"org.udocker.test": "multilayer"}}

MULTIARCH_PLATFORMS = (("arm", "v7"), ("arm64", "v8"), ("amd64", None))


def multiarch_images(base):
    """One Image per MULTIARCH_PLATFORMS entry: base + a marker layer with
    /etc/test-platform = "linux/ARCH[/VARIANT]\\n"."""
    images = []
    for arch, variant in MULTIARCH_PLATFORMS:
        plat = "linux/" + arch + ("/" + variant if variant else "")
        marker = Layer([f(PLATFORM_FILE, plat + "\n")],
                       comment="platform marker " + plat)
        images.append(Image([base, marker], BUSYBOX_CONFIG, arch,
                            variant=variant, name=plat))
    return images


def attestation_manifest(image):
    """A buildx-style attestation manifest (platform unknown/unknown)
    referring to image; returns (Blob manifest, index entry extras, blobs).
    """
    statement = dump_json({"_type": "https://in-toto.io/Statement/v0.1",
                           "predicateType": "https://spdx.dev/Document",
                           "subject": [{"name": "test",
                                        "digest": {"sha256": image.manifest(
                                            "oci").hex}}],
                           "predicate": {}})
    layer = Blob(statement, "application/vnd.in-toto+json")
    config = Blob(dump_json({"architecture": "unknown", "os": "unknown",
                             "config": {}, "rootfs": {
                                 "type": "layers",
                                 "diff_ids": [layer.digest]}}), OCI_CONFIG)
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": config.descriptor(),
           "layers": [layer.descriptor(annotations={
               "in-toto.io/predicate-type": "https://spdx.dev/Document"})]}
    manifest = Blob(dump_json(doc, indent=3), OCI_MANIFEST)
    extras = {"platform": {"architecture": "unknown", "os": "unknown"},
              "annotations": {
                  "vnd.docker.reference.digest": image.manifest("oci").digest,
                  "vnd.docker.reference.type": "attestation-manifest"}}
    return manifest, extras, [config, layer]


_STANDARD = {}


def standard_images():
    """The standard test images, built once per process:
    {"busybox": Image, "multilayer": Image, "multiarch": ImageIndex,
     "multiarch-oci": ImageIndex (with an attestation entry),
     "attestation-blobs": [Blob]}."""
    if not _STANDARD:
        base = busybox_layer()
        busybox = Image([base], BUSYBOX_CONFIG, name="busybox")
        multi = Image([base] + multilayer_layers(), MULTILAYER_CONFIG,
                      name="multilayer")
        arches = multiarch_images(base)
        amd64 = [i for i in arches if i.architecture == "amd64"][0]
        att, extras, att_blobs = attestation_manifest(amd64)
        _STANDARD.update({
            "busybox": busybox, "multilayer": multi,
            "multiarch": ImageIndex(arches),
            "multiarch-oci": ImageIndex(arches, [(att, extras)]),
            "attestation-blobs": att_blobs})
    return _STANDARD


def push_standard_images(registry, public=None):
    """Push the standard images to a Registry (as its pusher account).

    Pushes library/busybox and test/busybox (latest, 1.0; Docker types),
    test/busybox-oci:latest (OCI types), test/multilayer:latest,
    test/multiarch:latest (Docker manifest list), test/multiarch-oci:latest
    (OCI index + attestation entry), and public/busybox:latest if public
    (default: only for the token flavour). Returns {"repo:tag": info} and
    stores it in registry.images.
    """
    if public is None:
        public = registry.flavour == "token"
    std = standard_images()
    client = registry.client()
    pushed = {}
    for repo in ("library/busybox", "test/busybox"):
        pushed.update(push_image(client, repo, ["latest", "1.0"],
                                 std["busybox"], "docker"))
    pushed.update(push_image(client, "test/busybox-oci", "latest",
                             std["busybox"], "oci"))
    pushed.update(push_image(client, "test/multilayer", "latest",
                             std["multilayer"], "docker"))
    pushed.update(push_index(client, "test/multiarch", "latest",
                             std["multiarch"], "docker"))
    for blob in std["attestation-blobs"]:
        client.upload_blob("test/multiarch-oci", blob.data, blob.digest)
    pushed.update(push_index(client, "test/multiarch-oci", "latest",
                             std["multiarch-oci"], "oci"))
    if public:
        pushed.update(push_image(client, "public/busybox", "latest",
                                 std["busybox"], "docker"))
    registry.images.update(pushed)
    return pushed


# ---------------------------------------------------------------------------
# docker save archives and OCI image layouts
# ---------------------------------------------------------------------------


def _v1_ids(image):
    """Synthetic, deterministic v1 layer ids (hex) for docker save."""
    ids, parent = [], ""
    for layer in image.layers:
        parent = sha256_digest(to_bytes(parent + " " + layer.diff_id))
        parent = parent.split(":", 1)[1]
        ids.append(parent)
    return ids


def docker_name(ref):
    """Docker's normalized name: "busybox:1" -> "docker.io/library/busybox:1"."""
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return ref
    if not rest:
        ref = "library/" + ref
    return "docker.io/" + ref


def docker_archive_files(items, style="legacy", compressed=False):
    """Files of a `docker save` archive: {relative path: bytes}.

    items: [(Image, ["repo:tag", ...]), ...].
    style "legacy" (Docker < 25): manifest.json, repositories,
    <config hex>.json and <v1 id>/{VERSION,json,layer.tar} per layer.
    style "oci" (Docker >= 25): an OCI layout (oci-layout, index.json with
    one entry per tag annotated io.containerd.image.name and
    org.opencontainers.image.ref.name, blobs/sha256/...) plus manifest.json
    and repositories pointing into blobs/.
    Layers are stored uncompressed (like docker save) unless compressed.
    """
    if style not in ("legacy", "oci"):
        raise ValueError("style must be legacy or oci")
    files, manifest, repositories, layout_items = {}, [], {}, []
    for image, tags in items:
        ids = _v1_ids(image)
        if style == "oci":
            layer_paths = ["blobs/sha256/" + sha256_digest(
                l.data if compressed else l.tar).split(":")[1]
                for l in image.layers]
            config_path = "blobs/sha256/" + image.config_blob("oci").hex
            for ref in tags or [None]:
                annotations = {}
                if ref:
                    annotations = {
                        "io.containerd.image.name": docker_name(ref),
                        "org.opencontainers.image.ref.name":
                            ref.rpartition(":")[2]}
                layout_items.append((image, annotations))
        else:
            layer_paths = []
            for num, (layer, v1id) in enumerate(zip(image.layers, ids)):
                meta = {"id": v1id, "created": image.created,
                        "container_config": {}, "os": image.os}
                if num:
                    meta["parent"] = ids[num - 1]
                if num == len(ids) - 1:
                    meta.update({"architecture": image.architecture,
                                 "config": image.container_config})
                files[v1id + "/VERSION"] = b"1.0"
                files[v1id + "/json"] = dump_json(meta)
                files[v1id + "/layer.tar"] = \
                    layer.data if compressed else layer.tar
                layer_paths.append(v1id + "/layer.tar")
            config_path = image.config_blob("docker").hex + ".json"
            files[config_path] = image.config_data
        manifest.append({"Config": config_path, "RepoTags": list(tags),
                         "Layers": layer_paths})
        for ref in tags:
            repo, _, tag = ref.rpartition(":")
            repositories.setdefault(repo, {})[tag] = ids[-1] if ids else ""
    if style == "oci":
        files.update(oci_layout_files(
            layout_items, None if compressed else "uncompressed"))
    files["manifest.json"] = dump_json(manifest)
    if repositories:
        files["repositories"] = dump_json(repositories)
    return files


def oci_layout_files(items, layer_mode=None):
    """Files of an OCI image layout: {relative path: bytes}.

    items: [(Image or ImageIndex, ref), ...]; ref is None, a string put in
    the annotation org.opencontainers.image.ref.name (a tag such as
    "latest", or a full name like "docker.io/library/busybox:latest"), or
    a dict of annotations for the index.json entry.
    layer_mode "uncompressed" stores image layers as plain tar blobs (as
    Docker 25 `docker save` does) instead of the layers' own blobs.
    """
    files = {"oci-layout": dump_json({"imageLayoutVersion": "1.0.0"})}
    entries = []

    def add_image(image):
        if layer_mode == "uncompressed":
            layers = [Blob(l.tar, OCI_LAYER, l.diff_id) for l in image.layers]
            config = image.config_blob("oci")
            doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                   "config": config.descriptor(),
                   "layers": [b.descriptor() for b in layers]}
            manifest = Blob(dump_json(doc, indent=3), OCI_MANIFEST)
            blobs = [config] + layers
        else:
            manifest = image.manifest("oci")
            blobs = image.blobs("oci")
        for blob in blobs + [manifest]:
            files["blobs/sha256/" + blob.hex] = blob.data
        return manifest

    for obj, ref in items:
        if isinstance(obj, ImageIndex):
            manifests = [add_image(image) for image in obj.images]
            for blob, _ in obj.extra:
                files["blobs/sha256/" + blob.hex] = blob.data
            doc = json.loads(to_text(obj.manifest("oci").data))
            for entry, manifest in zip(doc["manifests"], manifests):
                entry.update(manifest.descriptor())
            top = Blob(dump_json(doc, indent=3), OCI_INDEX)
            files["blobs/sha256/" + top.hex] = top.data
        else:
            top = add_image(obj)
        extra = {}
        if isinstance(ref, dict):
            if ref:
                extra["annotations"] = dict(ref)
        elif ref:
            extra["annotations"] = {"org.opencontainers.image.ref.name": ref}
        if isinstance(obj, Image):
            extra["platform"] = obj.platform_dict()
        entries.append(top.descriptor(**extra))
    files["index.json"] = dump_json({"schemaVersion": 2,
                                     "mediaType": OCI_INDEX,
                                     "manifests": entries})
    return files


def write_tree(directory, files):
    """Write {relative path: bytes} under directory; return directory."""
    for path in sorted(files):
        full = os.path.join(directory, path)
        if not os.path.isdir(os.path.dirname(full)):
            os.makedirs(os.path.dirname(full))
        with open(full, "wb") as out:
            out.write(files[path])
    return directory


def write_tar(path, files, compression=None, prefix=""):
    """Write {relative path: bytes} as a deterministic tar (members named
    prefix + path, e.g. prefix "./"); return path."""
    entries = with_parents([f(name, files[name]) for name in sorted(files)])
    with open(path, "wb") as out:
        out.write(compress(build_tar(entries, prefix), compression))
    return path


# ---------------------------------------------------------------------------
# layers from root file system tarballs (tests/images/build_mpi_image.sh)
# ---------------------------------------------------------------------------

# where the script writes them ($UDOCKER_TEST_IMAGES: another OUTDIR of the script)
TEST_IMAGE_CACHE = os.environ.get("UDOCKER_TEST_IMAGES") or "/var/cache/udocker-test"


class TarballLayer(object):
    """A layer made of an existing tar file, with the attributes a Layer has
    for building and pushing Images (no .entries: Image.files() is not
    available for it). .data is gzip (level given) or the tar itself."""

    def __init__(self, path, compression="gzip", level=1):
        if compression not in (None, "gzip"):
            raise ValueError("compression must be None or gzip")
        with open(path, "rb") as tarf:
            tar = tarf.read()
        self.path = path
        self.compression = compression
        self.comment = os.path.basename(path)
        self.diff_id = sha256_digest(tar)
        if compression == "gzip":
            buf = io.BytesIO()
            gz = gzip.GzipFile(filename="", mode="wb", fileobj=buf,
                               compresslevel=level, mtime=0)
            gz.write(tar)
            gz.close()
            self.data = buf.getvalue()
        else:
            self.data = tar
        self.digest = sha256_digest(self.data)
        self.size = len(self.data)

    media_type = Layer.__dict__["media_type"]
    blob = Layer.__dict__["blob"]


def layer_from_tarball(path, compression="gzip", level=1):
    """A TarballLayer of the tar file at path (a root file system such as
    /var/cache/udocker-test/mpi-bookworm.tar). Raises SupportError, naming
    the script that builds it, if the file is missing."""
    if not os.path.isfile(path):
        raise SupportError(
            "%s not found: build it as root with tests/images/"
            "build_mpi_image.sh (CI does this in .ci/run)" % path)
    return TarballLayer(path, compression, level)


DEBIAN_CONFIG = {"Env": ["PATH=" + DEFAULT_PATH], "Cmd": ["bash"]}


def image_from_tarball(path, config=None, name=""):
    """A one-layer Image of the root file system tarball at path (config:
    DEBIAN_CONFIG unless given)."""
    return Image([layer_from_tarball(path)],
                 DEBIAN_CONFIG if config is None else config,
                 name=name or os.path.basename(path))


# ---------------------------------------------------------------------------
# stand-ins for the images the CWL conformance tests name
# ---------------------------------------------------------------------------

# docker.io/bash's entrypoint: a first argument that is an option goes to bash
BASH_ENTRYPOINT = b"""#!/bin/sh
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then set -- bash "$@"; fi
exec "$@"
"""


def cwl_standin_images(cache=None):
    """{"library/NAME:TAG": Image} for the images the CWL v1.2 conformance tests pull
    (dockerPull docker.io/...): Debian bookworm root file systems built by
    tests/images/build_mpi_image.sh, with the Entrypoint/Cmd the real images have.
    debian:stable-slim, alpine:latest and bash:4.4 share the minbase layer; bash:4.4 adds
    docker-entrypoint.sh; python:3-slim is minbase plus python3 (`python` too)."""
    cache = cache or TEST_IMAGE_CACHE
    minbase = layer_from_tarball(os.path.join(cache, "bookworm-minbase.tar"))
    python = layer_from_tarball(os.path.join(cache, "python-bookworm.tar"))
    entry = Layer([f("usr/local/bin/docker-entrypoint.sh", BASH_ENTRYPOINT, 0o755)],
                  comment="docker-entrypoint.sh")
    env = ["PATH=" + DEFAULT_PATH]
    return {
        "library/debian:stable-slim": Image([minbase], {"Env": env, "Cmd": ["bash"]},
                                            name="debian"),
        "library/alpine:latest": Image([minbase], {"Env": env, "Cmd": ["/bin/sh"]},
                                       name="alpine"),
        "library/bash:4.4": Image([minbase, entry],
                                  {"Env": env, "Entrypoint": ["docker-entrypoint.sh"],
                                   "Cmd": ["bash"]}, name="bash"),
        "library/python:3-slim": Image([python], {"Env": env, "Cmd": ["python3"]},
                                       name="python"),
    }


def push_cwl_standins(registry, cache=None):
    """Push cwl_standin_images() to a Registry; returns {"repo:tag": info}."""
    client = registry.client()
    pushed = {}
    for ref, image in sorted(cwl_standin_images(cache).items()):
        repo, tag = ref.split(":")
        pushed.update(push_image(client, repo, tag, image, "docker"))
    registry.images.update(pushed)
    return pushed
