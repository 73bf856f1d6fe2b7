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
#   (slim and pack of lib.sh: no documentation, no apt lists, an empty /dev, sorted
#   members owned by numeric ids, mtime SOURCE_DATE_EPOCH).
#
# CACHING
#   release-SUITE.tar is rebuilt only when this script, lib.sh or fsnames.c changes:
#   release-SUITE.tar.built-by holds the hash of the three (see lib.sh for SAME_AS).
#   --force rebuilds.
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
source "$here/lib.sh"
images_init /var/tmp/udocker-test-releases "$@"
RELEASES=${RELEASES:-"bullseye bookworm trixie"}

need_root "debootstrap and chroot need it"
need_debootstrap

make_stamp "$here/fsnames.c"
SAME_AS=ed19da87643fd3a7        # this script before lib.sh (see lib.sh)

todo=""
for SUITE in $RELEASES; do
    tar=$OUTDIR/release-$SUITE.tar
    if is_built "$tar"; then
        say "up to date: $tar"
    else
        todo="$todo $SUITE"
    fi
done
[[ -n $todo ]] || exit 0

use_mirror

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
