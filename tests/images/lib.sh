# lib.sh - what the root-file-system builders in tests/images share (sourced, not run):
# build_mpi_image.sh, build_release_images.sh and build_musl_rootfs.sh.
#
#   source "$here/lib.sh"
#   images_init DEFAULT_WORKDIR "$@"   say/die (prefixed with the script's name), force,
#                                      OUTDIR, W (WORKDIR or DEFAULT_WORKDIR),
#                                      SOURCE_DATE_EPOCH, CHROOT_ENV and APT
#   need_root WHY                      die unless root ("run as root (WHY)")
#   need_debootstrap                   die unless debootstrap is on PATH
#   make_stamp FILE...                 stamp: the hash of lib.sh, the script and FILEs
#   is_built TAR                       TAR.built-by holds the stamp (and not --force)
#   use_mirror                         MIRROR: $MIRROR, else the host's (detect_mirror)
#   slim TREE, apt_in TREE LOG PKG..., pack TREE NAME, publish OUT
#
# Stamps: a tarball is rebuilt when what builds it changes. SAME_AS (set by a script before
# is_built) lists the stamps of its earlier texts whose builds this version reproduces
# (the text moved into lib.sh unchanged): their tarballs count as built. Empty it when the
# recipe changes.

# images_init DEFAULT_WORKDIR "$@": the command line every builder takes: [--force] [OUTDIR]
images_init() {
    local workdir=$1; shift
    force=0
    if [[ ${1:-} == --force ]]; then force=1; shift; fi
    OUTDIR=${1:-/var/cache/udocker-test}
    W=${WORKDIR:-$workdir}
    export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}   # 2024-01-01T00:00:00Z
    CHROOT_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C TZ=UTC
                DEBIAN_FRONTEND=noninteractive SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH")
    APT=(apt-get -o APT::Sandbox::User=root -o Acquire::Check-Valid-Until=false -q -y)
}

_images_name=$(basename "$0" .sh)
say() { echo "$_images_name: $*" >&2; }
die() { say "error: $*"; exit 1; }

need_root() {
    [[ $(id -u) == 0 ]] || die "run as root ($1)"
}

need_debootstrap() {
    command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
}

# make_stamp FILE...: stamp=16 hex digits of the sha256 of lib.sh, the script and FILEs
make_stamp() {
    stamp=$(cat "${BASH_SOURCE[0]}" "$0" "$@" | sha256sum | cut -c1-16)
}

# is_built TAR: true when TAR exists and TAR.built-by holds the stamp or one of SAME_AS;
# false with --force
is_built() {
    local tar=$1 have s
    [[ $force == 0 && -f $tar ]] || return 1
    have=$(cat "$tar.built-by" 2>/dev/null) || return 1
    for s in "$stamp" ${SAME_AS:-}; do
        [[ $have == "$s" ]] && return 0
    done
    return 1
}

# detect_mirror: the one in tools/build_tarball.sh (that script ships inside the tools
# tarball and stays self-contained, so the function is read from it rather than shared)
use_mirror() {
    eval "$(sed -n '/^detect_mirror() {$/,/^}$/p' "$(dirname "${BASH_SOURCE[0]}")/../../tools/build_tarball.sh")"
    declare -F detect_mirror >/dev/null || die "no detect_mirror() in tools/build_tarball.sh"
    MIRROR=${MIRROR:-$(detect_mirror)}
    [[ -n $MIRROR ]] || die "cannot find the Debian mirror (set MIRROR=...)"
}

# slim TREE: what every image loses before it is packed
slim() {
    local R=$1
    chroot "$R" "${CHROOT_ENV[@]}" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/cache/debconf/*-old \
        "$R"/var/lib/dpkg/*-old "$R"/var/cache/ldconfig/aux-cache "$R"/usr/share/doc/* \
        "$R"/usr/share/man/* "$R"/usr/share/info/* "$R"/usr/share/locale/* \
        "$R"/usr/share/lintian/* "$R"/tmp/* "$R"/var/tmp/* "$R"/root/.bash_history \
        "$R"/usr/sbin/policy-rc.d
    find "$R/var/log" -type f -delete
    : >"$R/etc/machine-id"
    echo "$SUITE" >"$R/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
    : >"$R/etc/resolv.conf"
}

# publish OUT: OUT.tmp (a finished tarball) becomes OUT, readable by everyone, with the stamp
# in OUT.built-by
publish() {
    chmod 644 "$1.tmp"
    mv -f "$1.tmp" "$1"
    echo "$stamp" >"$1.built-by"
}

# pack TREE NAME: OUTDIR/NAME.tar (+ .built-by), atomically
pack() {
    local R=$1 out=$OUTDIR/$2.tar
    mkdir -p "$OUTDIR"
    (cd "$R" && ls -A) >"$W/members"
    tar -C "$R" --format=gnu --sort=name --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
        --anchored --exclude='dev/*' --exclude='proc/*' --exclude='sys/*' \
        -cf "$out.tmp" -T "$W/members"
    publish "$out"
    say "$out: $(du -m "$out" | cut -f1) MB"
}

# apt_in TREE LOG PACKAGES...: apt-get install in the chroot, no services started
apt_in() {
    local R=$1 log=$2; shift 2
    printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"      # start no services
    chmod 755 "$R/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
    cp /etc/hosts "$R/etc/hosts"
    chroot "$R" "${CHROOT_ENV[@]}" "${APT[@]}" update >"$log" 2>&1 ||
        { tail -n 30 "$log" >&2; die "apt-get update failed"; }
    chroot "$R" "${CHROOT_ENV[@]}" "${APT[@]}" install --no-install-recommends "$@" >>"$log" 2>&1 ||
        { tail -n 30 "$log" >&2; die "apt-get install failed"; }
}
