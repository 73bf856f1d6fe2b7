# -*- coding: utf-8 -*-
"""A fake NVIDIA driver for `setup --nvidia` / `run --nvidia` (the test
machines have no GPU), laid out as on a real host, and a snapshot of a
container tree to show that nothing of it was copied into ROOT.

    driver = FakeDriver(top)              # or FakeDriver(top, gpu_devices)
    udocker.py + driver.args              ["--config=TOP/nvidia.conf"]
    env: driver.env                       PATH with the nvidia-smi stub
    before = tree_state(root); ...; assert tree_state(root) == before

The tree: versioned libraries with their soname links in TOP/lib, found
through an `ldconfig -p` listing (TOP/ldconfig-p.txt, read by the
nvi_ldconfig of the config file; a 32-bit copy in TOP/lib32 must be
ignored, so must a library that is not NVIDIA's), an nvidia-smi stub in
TOP/bin printing SMI_TABLE, a Vulkan icd file under TOP/etc, and device
files TOP/dev/nvidia0, nvidiactl, nvidia-uvm (nvi_dev_list TOP/dev/nvidia).
The GPU device files are plain files, or, with gpu_devices (host paths),
TOP/dev/nvidiaK are symlinks to gpu_devices[K]: to the character devices
the Slurm test cluster gives its jobs as GPUs (support.slurm).
"""

from __future__ import print_function, absolute_import, division

import os
import stat

SMI_TABLE = ("| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   "
             "CUDA Version: 12.2 |")
DRIVER_LIBRARIES = ("libcuda.so.535.104.05", "libnvidia-ml.so.535.104.05",
                    "libnvidia-ptxjitcompiler.so.535.104.05",
                    "libGLX_nvidia.so.535.104.05")
# what `ls /.udocker/nvidia/lib` shows in the container: every library of
# DRIVER_LIBRARIES with its links, nothing of lib32, not libz
BOUND_LIBRARIES = ["libGLX_nvidia.so.0", "libGLX_nvidia.so.535.104.05",
                   "libcuda.so", "libcuda.so.1", "libcuda.so.535.104.05",
                   "libnvidia-ml.so.1", "libnvidia-ml.so.535.104.05",
                   "libnvidia-ptxjitcompiler.so.1",
                   "libnvidia-ptxjitcompiler.so.535.104.05"]


def _write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


class FakeDriver(object):
    """The fake driver tree under top (see the module docstring)."""

    def __init__(self, top, gpu_devices=None):
        self.top = top
        lib, lib32, self.bindir = [os.path.join(top, d)
                                   for d in ("lib", "lib32", "bin")]
        self.dev_dir = os.path.join(top, "dev")
        for path in (lib, lib32, self.bindir, self.dev_dir,
                     os.path.join(top, "etc", "vulkan", "icd.d")):
            os.makedirs(path)
        for name in DRIVER_LIBRARIES:
            _write(os.path.join(lib, name), "not really a library\n")
            soname = name.split(".so.")[0] + \
                (".so.0" if "GLX" in name else ".so.1")
            os.symlink(name, os.path.join(lib, soname))
        os.symlink("libcuda.so.1", os.path.join(lib, "libcuda.so"))
        _write(os.path.join(lib, "libz.so.1"), "x")          # not NVIDIA's
        _write(os.path.join(lib32, "libcuda.so.1"), "32-bit\n")
        listing = ["5 libs found in cache `/etc/ld.so.cache'"]
        for name, tags, directory in (
                ("libnvidia-ml.so.1", "libc6,x86-64", lib),
                ("libcuda.so.1", "libc6,x86-64", lib),
                ("libcuda.so", "libc6,x86-64", lib),
                ("libcuda.so.1", "libc6", lib32),
                ("libz.so.1", "libc6,x86-64", "/usr/lib/x86_64-linux-gnu")):
            listing.append("\t%s (%s) => %s/%s" % (name, tags, directory,
                                                    name))
        _write(os.path.join(top, "ldconfig-p.txt"), "\n".join(listing) + "\n")
        smi = os.path.join(self.bindir, "nvidia-smi")
        _write(smi, "#!/bin/sh\necho '+%s+'\necho '%s'\n"
               "echo '|   0  Tesla T4  On  |'\n" % ("-" * 71, SMI_TABLE))
        os.chmod(smi, 0o755)
        self.gpus = []
        for index, device in enumerate(gpu_devices or [None]):
            path = os.path.join(self.dev_dir, "nvidia%d" % index)
            if device is None:
                _write(path, "")
            else:
                os.symlink(device, path)
            self.gpus.append(path)
        for name in ("nvidiactl", "nvidia-uvm"):
            _write(os.path.join(self.dev_dir, name), "")
        _write(os.path.join(top, "etc", "vulkan", "icd.d", "nvidia_icd.json"),
               '{"ICD": {"library_path": "libGLX_nvidia.so.0"}}\n')
        self.config = os.path.join(top, "nvidia.conf")
        _write(self.config,
               "[DEFAULT]\nnvi_ldconfig = cat %s/ldconfig-p.txt\n"
               "nvi_dev_list = %s/nvidia\nnvi_etc_dir = %s/etc\n"
               % (top, self.dev_dir, top))
        self.args = ["--config=" + self.config]
        self.env = {"PATH": self.path(os.environ.get("PATH", "/usr/bin"))}

    def path(self, path):
        """PATH with the nvidia-smi stub's directory in front of path."""
        return self.bindir + ":" + path


def tree_state(root):
    """What is in a tree (type, size, link target per path), but
    /.udocker (where a run binds the driver)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root and ".udocker" in dirnames:
            dirnames.remove(".udocker")
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            state[path[len(root):]] = (
                stat.S_IFMT(info.st_mode),
                0 if stat.S_ISDIR(info.st_mode) else info.st_size,
                os.readlink(path) if stat.S_ISLNK(info.st_mode) else "")
    return state
