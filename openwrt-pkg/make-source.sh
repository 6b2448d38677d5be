#!/bin/sh
# The source tarball the feed Makefile expects, and its PKG_HASH line.
#
#   openwrt-pkg/make-source.sh [COMMIT] [OUTDIR]
#
# Writes OUTDIR/chuted-<version>.tar.gz (default target/openwrt-src): `git archive` of
# COMMIT (default HEAD) under the prefix chuted-<version>/, which is where the SDK's
# PKG_BUILD_DIR expects it, gzip'd without a name or timestamp (same commit, same git and
# gzip: same bytes). Publish the file, then set in the feed's copy of chuted/Makefile the
# two lines this prints. The version comes from that commit's Cargo.toml and must equal
# its Makefile's PKG_VERSION.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMMIT=${1:-HEAD}
OUTDIR=${2:-$ROOT/target/openwrt-src}

full=$(git -C "$ROOT" rev-parse --verify --quiet "$COMMIT^{commit}") ||
    { echo "make-source.sh: '$COMMIT' is not a commit in $ROOT" >&2; exit 2; }
version=$(git -C "$ROOT" show "$full:Cargo.toml" |
    sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p')
mk_version=$(git -C "$ROOT" show "$full:openwrt-pkg/chuted/Makefile" | sed -n 's/^PKG_VERSION:=//p')
if [ -z "$version" ] || [ "$version" != "$mk_version" ]; then
    echo "make-source.sh: $full: Cargo.toml version '$version' != Makefile PKG_VERSION '$mk_version'" >&2
    exit 1
fi

mkdir -p "$OUTDIR"
out=$OUTDIR/chuted-$version.tar.gz
git -C "$ROOT" archive --format=tar --prefix="chuted-$version/" "$full" | gzip -n -9 >"$out.tmp"
mv -f "$out.tmp" "$out"
hash=$(sha256sum "$out" | cut -d' ' -f1)
echo "# $out: git archive of $full"
echo "CHUTED_SOURCE_URL:=<the URL of the directory you publish $(basename "$out") in>/"
echo "PKG_HASH:=$hash"
