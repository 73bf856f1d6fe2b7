#!/usr/bin/env bash
# build_mpi_image.sh - the Debian root file systems of the batch and CWL tests, as plain tarballs
#
# OUTPUTS (in OUTDIR, default /var/cache/udocker-test; all readable by everyone)
#   bookworm-minbase.tar  `debootstrap --variant=minbase bookworm`: a plain glibc system
#   mpi-bookworm.tar      the same plus Open MPI 4.1 (openmpi-bin and its libraries) and
#                         /usr/local/bin/mpi_hello, compiled inside the chroot from
#                         tests/images/mpi_hello.c (source kept in /usr/local/src); the
#                         compiler and the -dev packages are purged after the build
#   python-bookworm.tar   minbase plus python3 and python-is-python3 (`python` runs Python 3):
#                         the stand-in for python:3-slim in the CWL conformance tests
#   Both: no documentation, man pages or locales (a dpkg path-exclude file stays in
#   /etc/dpkg/dpkg.cfg.d so later installs stay small too), no apt lists, no logs, an empty
#   /dev, a neutral /etc/hosts, /etc/resolv.conf and /etc/hostname ("bookworm").
#   Members are named without a leading "./", sorted, owned by numeric ids, all with the
#   mtime SOURCE_DATE_EPOCH (default 2024-01-01): deterministic-ish (the package versions
#   are whatever the mirror serves today).
#
# CACHING
#   A tarball is rebuilt only when this script, lib.sh or mpi_hello.c changes: OUT.tar.built-by
#   holds the hash of the three (see lib.sh for SAME_AS). A bookworm-minbase.tar without that stamp file was made by
#   someone else and is left alone. --force rebuilds what this script made.
#
# SOURCES
#   Only the Debian mirror the host already uses (the first non-security "URIs:" of
#   /etc/apt/sources.list.d/debian.sources, else /etc/apt/sources.list, or $MIRROR).
#
# REQUIREMENTS
#   Debian 12, run as root (debootstrap and chroot), packages debootstrap and tar.
#
# TIME AND SIZE (2-core Debian 12 VM, mirror on a fast link)
#   35-95 s for both (depends on the load); bookworm-minbase.tar 73 MB (4,033 members),
#   mpi-bookworm.tar 193 MB (71 MB as a gzip -1 layer). A rebuild with --force gave
#   byte-identical tarballs (the mirror served the same packages).
#
# USAGE
#   tests/images/build_mpi_image.sh [--force] [OUTDIR]
#   Environment: MIRROR, SOURCE_DATE_EPOCH, WORKDIR (default /var/tmp/udocker-test-images,
#   removed after a successful build).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
images_init /var/tmp/udocker-test-images "$@"
SUITE=bookworm

need_root "debootstrap and chroot need it"
need_debootstrap

make_stamp "$here/mpi_hello.c"
SAME_AS=41bce1aa58eae841        # this script before lib.sh (see lib.sh)

# up_to_date NAME: true if OUTDIR/NAME.tar was built by this version of the script, or (for
# the minbase tarball) by someone else (no stamp file: left alone, even with --force)
up_to_date() {
    local tar=$OUTDIR/$1.tar
    [[ -f $tar ]] || return 1
    if [[ ! -f $tar.built-by ]]; then
        [[ $1 == "$SUITE-minbase" ]] || return 1
        say "$tar was made by someone else: kept"
        return 0
    fi
    is_built "$tar"
}

need_minbase=1; need_mpi=1; need_python=1
up_to_date "$SUITE-minbase" && need_minbase=0
up_to_date "mpi-$SUITE" && need_mpi=0
up_to_date "python-$SUITE" && need_python=0
if [[ $need_minbase == 0 && $need_mpi == 0 && $need_python == 0 ]]; then
    say "up to date: $OUTDIR/$SUITE-minbase.tar $OUTDIR/mpi-$SUITE.tar $OUTDIR/python-$SUITE.tar"
    exit 0
fi

use_mirror

start=$(date +%s)
rm -rf "$W"
mkdir -p "$W"
say "debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$W/minbase" "$MIRROR" >"$W/debootstrap.log" 2>&1 ||
    { tail -n 30 "$W/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
cat >"$W/minbase/etc/dpkg/dpkg.cfg.d/01-udocker-test-nodoc" <<'EOF'
# test images: no documentation, man pages or translations
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF

# copy before slimming: apt needs /dev/null and friends
[[ $need_mpi == 1 ]] && cp -a "$W/minbase" "$W/mpi"
[[ $need_python == 1 ]] && cp -a "$W/minbase" "$W/python"

if [[ $need_minbase == 1 ]]; then
    slim "$W/minbase"
    pack "$W/minbase" "$SUITE-minbase"
fi

if [[ $need_mpi == 1 ]]; then
    R=$W/mpi
    say "installing Open MPI and a compiler in the chroot"
    apt_in "$R" "$W/apt.log" openmpi-bin libopenmpi-dev gcc libc6-dev
    mkdir -p "$R/usr/local/src" "$R/usr/local/bin"
    install -m 644 "$here/mpi_hello.c" "$R/usr/local/src/mpi_hello.c"
    chroot "$R" "${CHROOT_ENV[@]}" mpicc -O2 -o /usr/local/bin/mpi_hello /usr/local/src/mpi_hello.c
    say "purging the compiler and the -dev packages"
    chroot "$R" "${CHROOT_ENV[@]}" "${APT[@]}" purge --auto-remove \
        libopenmpi-dev gcc libc6-dev >>"$W/apt.log" 2>&1 ||
        { tail -n 30 "$W/apt.log" >&2; die "apt-get purge failed"; }
    chroot "$R" "${CHROOT_ENV[@]}" ldd /usr/local/bin/mpi_hello | grep -q 'not found' &&
        die "mpi_hello misses libraries after the purge"
    slim "$R"
    pack "$R" "mpi-$SUITE"
fi

if [[ $need_python == 1 ]]; then
    say "installing python3 in the chroot"
    apt_in "$W/python" "$W/apt-python.log" python3 python-is-python3
    slim "$W/python"
    pack "$W/python" "python-$SUITE"
fi
rm -rf "$W"
say "done in $(( $(date +%s) - start )) s"
