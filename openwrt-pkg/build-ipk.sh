#!/bin/sh
# Build an installable OpenWrt .ipk of chuted without the OpenWrt SDK.
#
#   openwrt-pkg/build-ipk.sh ARCH BINARY [OUTDIR]
#
# ARCH: aarch64 (= aarch64_cortex-a53), armv7 (= arm_cortex-a7_neon-vfpv4), or any opkg
# architecture name such as aarch64_generic. BINARY: a static chuted from cross/build.sh
# (its ELF machine must match ARCH). OUTDIR defaults to target/ipk.
#
# Layout matches OpenWrt's scripts/ipkg-build: the outer container is a gzipped tar (not
# an ar archive as in Debian's .deb) holding ./debian-binary, ./data.tar.gz and
# ./control.tar.gz, every tar in GNU format with numeric root ownership and sorted names.
# opkg accepts this form (and ar); it is what OpenWrt's own feeds ship. Output name:
# chuted_<version>-<release>_<arch>.ipk, version from the workspace Cargo.toml.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PKG=$HERE/chuted
FILES=$PKG/files

usage() { echo "usage: $0 ARCH BINARY [OUTDIR]" >&2; exit 2; }
[ $# -ge 2 ] || usage
ARCH=$1
BIN=$2
OUTDIR=${3:-$ROOT/target/ipk}

case "$ARCH" in
    aarch64) ARCH=aarch64_cortex-a53 ;;
    armv7) ARCH=arm_cortex-a7_neon-vfpv4 ;;
esac
case "$ARCH" in
    aarch64_*) MACHINE=AArch64 ;;
    arm_*) MACHINE=ARM ;;
    *) echo "build-ipk.sh: unsupported architecture '$ARCH' (aarch64_*, arm_*)" >&2; exit 2 ;;
esac

[ -f "$BIN" ] || { echo "build-ipk.sh: no binary at $BIN" >&2; exit 1; }
if ! readelf -h "$BIN" 2>/dev/null | grep -q "Machine: *$MACHINE\$"; then
    echo "build-ipk.sh: $BIN is not an $MACHINE ELF binary; it cannot go into an $ARCH package" >&2
    exit 1
fi
if readelf -l "$BIN" 2>/dev/null | grep -q INTERP; then
    echo "build-ipk.sh: $BIN is dynamically linked; OpenWrt packages need the static build" >&2
    exit 1
fi

mkvar() { sed -n "s/^$1:=\(.*\)/\1/p" "$PKG/Makefile" | head -n1; }
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
RELEASE=$(mkvar PKG_RELEASE)
MK_VERSION=$(mkvar PKG_VERSION)
if [ "$VERSION" != "$MK_VERSION" ]; then
    echo "build-ipk.sh: Cargo.toml says $VERSION but chuted/Makefile PKG_VERSION says $MK_VERSION" >&2
    exit 1
fi
# Runtime dependencies: the `+pkg` entries of the Makefile's DEPENDS, one source of truth.
DEPENDS=$(sed -n 's/^ *DEPENDS:=//p' "$PKG/Makefile" | tr ' ' '\n' | sed -n 's/^+//p' |
    paste -sd, - | sed 's/,/, /g')
LICENSE=$(mkvar PKG_LICENSE)
MAINTAINER=$(mkvar PKG_MAINTAINER)
: "${SOURCE_DATE_EPOCH:=$(stat -c %Y "$BIN")}"
MTIME="@$SOURCE_DATE_EPOCH"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/chuted-ipk.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
DATA=$WORK/data
CTRL=$WORK/control

# install(1) with explicit modes, so the package does not depend on the checkout's umask.
install -d -m 0755 "$DATA/usr/bin" "$DATA/usr/libexec" "$DATA/etc/init.d" "$DATA/etc/config" \
    "$DATA/lib/upgrade/keep.d"
install -m 0755 "$BIN" "$DATA/usr/bin/chuted"
install -m 0755 "$FILES/chuted-cgexec" "$DATA/usr/libexec/chuted-cgexec"
install -m 0755 "$FILES/chuted.init" "$DATA/etc/init.d/chuted"
# 0600 like the SDK's INSTALL_CONF: the owner key and cloud URL are root's business.
install -m 0600 "$FILES/chuted.config" "$DATA/etc/config/chuted"
install -m 0644 "$FILES/chuted.upgrade" "$DATA/lib/upgrade/keep.d/chuted"
chmod 0755 "$DATA" "$DATA/usr" "$DATA/etc" "$DATA/lib" "$DATA/lib/upgrade"

tarit() { # DIR OUT.tar.gz ENTRIES...
    dir=$1 out=$2
    shift 2
    (cd "$dir" && tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name \
        --mtime="$MTIME" -cf - "$@") | gzip -n -9 >"$out"
}

tarit "$DATA" "$WORK/data.tar.gz" .
INSTALLED_SIZE=$(gzip -dc "$WORK/data.tar.gz" | wc -c)

install -d -m 0755 "$CTRL"
cat >"$CTRL/control" <<EOF
Package: chuted
Version: $VERSION-$RELEASE
Depends: $DEPENDS
Source: feeds/packages/utils/chuted
SourceName: chuted
License: $LICENSE
Section: utils
SourceDateEpoch: $SOURCE_DATE_EPOCH
URL: https://example.invalid/chuted
Maintainer: $MAINTAINER
Architecture: $ARCH
Installed-Size: $INSTALLED_SIZE
Description:  chuted runs third-party containers ("chutes") on routers and gateways under
 Podman, caps each one's CPU, memory and pids with cgroups, shapes each one's bandwidth
 with tc, and takes signed orders from a cloud manager.
EOF
printf '/etc/config/chuted\n' >"$CTRL/conffiles"
# OpenWrt's stock maintainer scripts: enable and start the init script on install, stop
# and disable it on removal (lib/functions.sh does the work; skipped in image builds).
cat >"$CTRL/postinst" <<'EOF'
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
EOF
cat >"$CTRL/prerm" <<'EOF'
#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
EOF
chmod 0644 "$CTRL/control" "$CTRL/conffiles"
chmod 0755 "$CTRL/postinst" "$CTRL/prerm"
tarit "$CTRL" "$WORK/control.tar.gz" .

echo "2.0" >"$WORK/debian-binary"
mkdir -p "$OUTDIR"
OUT="$OUTDIR/chuted_${VERSION}-${RELEASE}_${ARCH}.ipk"
tarit "$WORK" "$OUT.tmp" ./debian-binary ./data.tar.gz ./control.tar.gz
mv -f "$OUT.tmp" "$OUT"
echo "$OUT ($(stat -c %s "$OUT") bytes)"
