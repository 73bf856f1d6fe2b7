#!/usr/bin/env bash
# build_release_images.sh - one glibc root file system per reachable Debian release, for the
# F-mode tests of each glibc generation (tests/test_releases.py)
#
# OUTPUTS (in OUTDIR, default /var/cache/udocker-test; all readable by everyone)
#   release-SUITE.tar for SUITE in RELEASES (default "bullseye bookworm trixie": glibc 2.31,
#   2.36, 2.41): `debootstrap --variant=minbase SUITE` plus /usr/local/bin/fsnames, compiled
#   inside a copy of that chroot (gcc and libc6-dev installed there, not in the image) from
#   tests/images/fsnames.c (source kept in /usr/local/src), so that it imports the names of
#   that glibc generation: __xstat/__lxstat/__fxstatat before 2.33, stat/lstat/fstatat from
#   2.33 on (checked here with objdump -T). Slimmed and packed as build_mpi_image.sh does
#   (its slim and pack functions: no documentation, no apt lists, an empty /dev, sorted
#   members owned by numeric ids, mtime SOURCE_DATE_EPOCH).
#
# CACHING
#   release-SUITE.tar is rebuilt only when this script or fsnames.c changes:
#   release-SUITE.tar.built-by holds the hash of both. --force rebuilds.
#
# SOURCES
#   Only the Debian mirror the host already uses (as build_mpi_image.sh finds it, or $MIRROR).
#
# REQUIREMENTS
#   Debian 12, run as root (debootstrap and chroot), packages debootstrap, tar.
#
# TIME AND SIZE (2-core Debian 12 VM, mirror on a fast link, measured at load 6-10 from
#   other builds: an idle CI machine is faster)
#   the three suites at the same time: 320 s wall (bullseye 320 s, bookworm 279 s, trixie
#   217 s); one after the other they took 147 + 238 + 210 = 595 s. release-bullseye.tar
#   79 MB, release-bookworm.tar 73 MB, release-trixie.tar 76 MB (each a minbase, whose
#   debootstrap is most of the time; gcc is installed in a copy only).
#
# USAGE
#   tests/images/build_release_images.sh [--force] [OUTDIR]
#   Environment: RELEASES, MIRROR, SOURCE_DATE_EPOCH, WORKDIR (default
#   /var/tmp/udocker-test-releases, removed after a successful build).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
force=0
if [[ ${1:-} == --force ]]; then force=1; shift; fi
OUTDIR=${1:-/var/cache/udocker-test}
W=${WORKDIR:-/var/tmp/udocker-test-releases}
RELEASES=${RELEASES:-"bullseye bookworm trixie"}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}   # 2024-01-01T00:00:00Z

say() { echo "build_release_images: $*" >&2; }
die() { say "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"

# detect_mirror (tools/build_tarball.sh), slim, pack and apt_in (build_mpi_image.sh): read
# from those scripts, which stay self-contained
eval "$(sed -n '/^detect_mirror() {$/,/^}$/p' "$here/../../tools/build_tarball.sh")"
for f in slim pack apt_in; do
    eval "$(sed -n "/^$f() {\$/,/^}\$/p" "$here/build_mpi_image.sh")"
    declare -F "$f" >/dev/null || die "no $f() in tests/images/build_mpi_image.sh"
done
declare -F detect_mirror >/dev/null || die "no detect_mirror() in tools/build_tarball.sh"

stamp=$(cat "$0" "$here/fsnames.c" | sha256sum | cut -c1-16)
CHROOT_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C TZ=UTC
            DEBIAN_FRONTEND=noninteractive SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH")
APT=(apt-get -o APT::Sandbox::User=root -o Acquire::Check-Valid-Until=false -q -y)

todo=""
for SUITE in $RELEASES; do
    tar=$OUTDIR/release-$SUITE.tar
    if [[ $force == 0 && -f $tar && $(cat "$tar.built-by" 2>/dev/null) == "$stamp" ]]; then
        say "up to date: $tar"
    else
        todo="$todo $SUITE"
    fi
done
[[ -n $todo ]] || exit 0

MIRROR=${MIRROR:-$(detect_mirror)}
[[ -n $MIRROR ]] || die "cannot find the Debian mirror (set MIRROR=...)"

# the names each generation's fsnames must import (objdump -T, in the build chroot)
names_of() {  # SUITE
    case $1 in
        bullseye) echo "__xstat __lxstat __fxstatat __xstat64 statx" ;;
        *) echo "stat lstat fstatat stat64 statx" ;;
    esac
}

# build SUITE: release-SUITE.tar from a minbase in $W/SUITE (the suites are built at the same
# time, each in a subshell of its own: debootstrap and apt mostly wait for the network and
# the disk)
build() {
    local SUITE=$1 W=$W/$1 t0 imports name
    t0=$(date +%s)
    mkdir -p "$W"
    say "debootstrap --variant=minbase $SUITE from $MIRROR"
    debootstrap --variant=minbase "$SUITE" "$W/minbase" "$MIRROR" >"$W/debootstrap.log" 2>&1 ||
        { tail -n 30 "$W/debootstrap.log" >&2; die "debootstrap $SUITE failed (log above)"; }
    cp -a "$W/minbase" "$W/build"
    say "compiling fsnames in the $SUITE chroot"
    apt_in "$W/build" "$W/apt.log" gcc libc6-dev binutils
    install -m 644 "$here/fsnames.c" "$W/build/fsnames.c"
    chroot "$W/build" "${CHROOT_ENV[@]}" gcc -O2 -Wall -Werror -o /fsnames /fsnames.c
    imports=$(chroot "$W/build" "${CHROOT_ENV[@]}" objdump -T /fsnames | awk '{print $NF}')
    for name in $(names_of "$SUITE"); do
        grep -qx "$name" <<<"$imports" || die "$SUITE's fsnames does not import $name"
    done
    mkdir -p "$W/minbase/usr/local/src" "$W/minbase/usr/local/bin"
    install -m 644 "$here/fsnames.c" "$W/minbase/usr/local/src/fsnames.c"
    install -m 755 "$W/build/fsnames" "$W/minbase/usr/local/bin/fsnames"
    slim "$W/minbase"
    pack "$W/minbase" "release-$SUITE"
    say "$SUITE in $(( $(date +%s) - t0 )) s"
}

start=$(date +%s)
rm -rf "$W"
pids=""
for SUITE in $todo; do
    build "$SUITE" &
    pids="$pids $!"
done
failed=0
for pid in $pids; do wait "$pid" || failed=1; done
[[ $failed == 0 ]] || die "a release failed to build (above); its workdir is kept in $W"
rm -rf "$W"
say "done in $(( $(date +%s) - start )) s"
