#!/usr/bin/env bash
# build_musl_rootfs.sh - the musl root file system of the F-mode tests, as a plain tarball
#
# OUTPUT (in OUTDIR, default /var/cache/udocker-test; readable by everyone)
#   musl-busybox.tar  a musl system as Alpine lays it out: /lib/ld-musl-x86_64.so.1 (Debian's
#                     musl libc.so, which is its own loader) and busybox built from Debian's
#                     source, DYNAMICALLY linked with Debian's musl-gcc (interpreter
#                     /lib/ld-musl-x86_64.so.1), its applets as symlinks in /bin and
#                     /usr/bin (sh, cat, ls, find, stat, pwd, readlink ...), /etc/os-release
#                     (ID=musl-test), /etc/passwd and /etc/group. Members sorted, owned by
#                     0:0, mtime SOURCE_DATE_EPOCH.
#
# CACHING
#   Rebuilt only when this script or lib.sh changes: OUT.tar.built-by holds the hash of
#   both (see lib.sh for SAME_AS); --force rebuilds.
#
# SOURCES
#   busybox/bookworm from the Debian mirror the host uses (use_mirror of lib.sh, or
#   $MIRROR), through a private deb-src list (the system's apt
#   configuration is not touched); Debian's musl, musl-dev and musl-tools (installed with
#   apt-get when missing); the kernel headers of linux-libc-dev (busybox needs a few).
#
# REQUIREMENTS
#   Debian 12 x86_64, run as root (apt-get).
#
# TIME AND SIZE (2-core Debian 12 VM at load 9-11): 86-116 s (apt-get source and the busybox
#   build, ~60 applets); musl-busybox.tar 870 kB. A re-run with the same script: no work.
#
# USAGE
#   tests/images/build_musl_rootfs.sh [--force] [OUTDIR]
#   Environment: MIRROR, SOURCE_DATE_EPOCH, WORKDIR (default /var/tmp/udocker-test-musl,
#   removed after a successful build).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
images_init /var/tmp/udocker-test-musl "$@"
NAME=musl-busybox
export LC_ALL=C TZ=UTC DEBIAN_FRONTEND=noninteractive

need_root "apt-get needs it"
[[ $(uname -m) == x86_64 ]] || die "the host must be x86_64"

make_stamp
SAME_AS=38fa01b03de154e3        # this script before lib.sh (see lib.sh)
out=$OUTDIR/$NAME.tar
if is_built "$out"; then
    say "up to date: $out"
    exit 0
fi

use_mirror

start=$(date +%s)
missing=()
for p in musl musl-dev musl-tools linux-libc-dev make bzip2 xz-utils; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] ||
        missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 -q -y install --no-install-recommends "${missing[@]}" \
        >/dev/null || die "apt-get install ${missing[*]} failed"
fi

rm -rf "$W"
mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/src"
keyring=""
[[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] &&
    keyring="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
echo "deb-src ${keyring}$MIRROR bookworm main" >"$W/apt/sources.list"
APT=(apt-get -q -o "Dir::Etc::SourceList=$W/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache"
     -o APT::Sandbox::User=root)
"${APT[@]}" update >"$W/apt.log" 2>&1 || { tail -n 20 "$W/apt.log" >&2; die "apt-get update failed"; }
(cd "$W/src" && "${APT[@]}" source --only-source --download-only busybox/bookworm) \
    >>"$W/apt.log" 2>&1 || true
orig=$(ls "$W"/src/busybox_*.orig.tar.* 2>/dev/null | head -n 1)
[[ -n $orig ]] || { tail -n 20 "$W/apt.log" >&2; die "busybox source not downloaded"; }
say "building $(basename "$orig") with musl-gcc"

B=$W/busybox
mkdir -p "$B"
tar -xf "$orig" -C "$B" --strip-components=1 --no-same-owner
# the kernel headers musl-gcc's include path lacks (Alpine has them in linux-headers)
mkdir -p "$W/kinc"
ln -s /usr/include/linux /usr/include/asm-generic "$W/kinc/"
ln -s /usr/include/x86_64-linux-gnu/asm "$W/kinc/asm"
APPLETS="BUSYBOX ASH SH_IS_ASH ASH_ECHO ASH_PRINTF ASH_TEST ASH_GETOPTS ASH_CMDCMD ASH_ALIAS
  ASH_BASH_COMPAT CAT CP CUT DATE DIRNAME BASENAME ECHO ENV EXPR FALSE TRUE FIND
  FEATURE_FIND_PRINT0 FEATURE_FIND_MAXDEPTH FEATURE_FIND_TYPE FEATURE_FIND_NAME
  FEATURE_FIND_PATH FEATURE_FIND_NOT FEATURE_FIND_PAREN FEATURE_FIND_EXEC GREP HEAD
  TAIL ID LN LS FEATURE_LS_FILETYPES FEATURE_LS_RECURSIVE MKDIR MV PRINTF PWD READLINK
  FEATURE_READLINK_FOLLOW REALPATH RM RMDIR SED SLEEP SORT STAT FEATURE_STAT_FORMAT
  TEST TEST1 TEST2 TOUCH TR UNAME WC WHICH CHMOD XARGS"
(
    cd "$B"
    make allnoconfig >"$W/make.log" 2>&1
    for a in $APPLETS; do
        sed -i "s/^# CONFIG_$a is not set\$/CONFIG_$a=y/" .config
    done
    make oldconfig </dev/null >>"$W/make.log" 2>&1 || yes '' | make oldconfig >>"$W/make.log" 2>&1
    make -j"$(nproc)" CC=musl-gcc HOSTCC=gcc EXTRA_CFLAGS="-idirafter $W/kinc" \
        EXTRA_LDFLAGS="" busybox >>"$W/make.log" 2>&1
) || { tail -n 30 "$W/make.log" >&2; die "busybox build failed"; }
file -b "$B/busybox" | grep -q 'interpreter /lib/ld-musl-x86_64.so.1' ||
    die "busybox is not linked dynamically against musl: $(file -b "$B/busybox")"

R=$W/root
mkdir -p "$R"/{bin,lib,usr/bin,usr/sbin,sbin,etc,tmp,root,proc,dev,sys,home/user,var/tmp}
chmod 1777 "$R/tmp"
install -m 0755 "$(musl-gcc -print-file-name=libc.so 2>/dev/null | grep musl ||
                   echo /usr/lib/x86_64-linux-musl/libc.so)" "$R/lib/ld-musl-x86_64.so.1"
ln -s ld-musl-x86_64.so.1 "$R/lib/libc.musl-x86_64.so.1"          # Alpine's second name
install -m 0755 "$B/busybox" "$R/bin/busybox"
for a in $("$R/lib/ld-musl-x86_64.so.1" "$R/bin/busybox" --list); do
    [[ $a == busybox ]] || ln -s busybox "$R/bin/$a"
    [[ $a == busybox ]] || ln -s ../../bin/busybox "$R/usr/bin/$a"
done
printf 'NAME="musl test"\nID=musl-test\nVERSION_ID=1\n' >"$R/etc/os-release"
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\nuser:x:1000:\n' >"$R/etc/group"
[[ -x $R/bin/sh && -x $R/bin/cat && -x $R/bin/find ]] || die "applets missing in busybox"

mkdir -p "$OUTDIR"
tar -C "$R" --format=gnu --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@$SOURCE_DATE_EPOCH" -cf "$out.tmp" .
publish "$out"
rm -rf "$W"
say "$out: $(du -k "$out" | cut -f1) kB, done in $(( $(date +%s) - start )) s"
