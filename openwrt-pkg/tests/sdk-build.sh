#!/bin/sh
# Builds the feed package the way the OpenWrt SDK does, on an x86_64 host, and compares
# the binary with the workspace's release profile.
#
#   openwrt-pkg/tests/sdk-build.sh [COMMIT]      (default HEAD; needs cargo, GNU make, git)
#
# 1. `openwrt-pkg/make-source.sh COMMIT` makes the source tarball; the package's
#    download step checks it against PKG_HASH, unpacks it as PKG_BUILD_DIR and checks
#    every PKG_LICENSE_FILES entry is in it.
# 2. Baseline: `cargo build --release` of chuted in that tree (the budget's profile).
# 3. GNU make evaluates chuted/Makefile in a feed tree (utils/chuted beside lang/rust)
#    and runs its Build/Compile: the exact `cargo install` command line and environment
#    rust-package.mk's Build/Compile/Cargo produces (echoed into compile.log), then its
#    Package/chuted/install.
# lang/rust is the real one when OPENWRT_RUST_DIR points at a packages feed's lang/rust,
# else the stand-in in tests/sdk/ (the SDK's profile overrides restated). rules.mk and
# package.mk are always stand-ins (tests/sdk/): host paths, the x86_64 target, the host cc.
# The baseline runs in the SDK's environment minus its CARGO_PROFILE_* variables, so
# cargo reuses its artifacts when the profiles agree: one release build, not two.
#
# Prints both sizes; fails if they differ by more than SIZE_TOLERANCE_PCT (default 2) or
# if rustc was asked for overflow checks. Work dir: target/sdk-equiv (CHUTED_SDK_WORK).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PKGROOT=$(cd "$HERE/.." && pwd)
ROOT=$(cd "$PKGROOT/.." && pwd)
COMMIT=${1:-HEAD}
W=${CHUTED_SDK_WORK:-$ROOT/target/sdk-equiv}
TOL=${SIZE_TOLERANCE_PCT:-2}
TRIPLE=x86_64-unknown-linux-gnu

rm -rf "$W/build" "$W/root" "$W/feed" "$W/include" "$W/dl"
mkdir -p "$W/include" "$W/dl" "$W/feed/utils" "$W/feed/lang/rust" "$W/staging" "$W/tmp"
cp "$HERE/sdk/rules.mk" "$W/rules.mk"
cp "$HERE/sdk/package.mk" "$W/include/package.mk"
if [ -n "${OPENWRT_RUST_DIR:-}" ]; then
    cp "$OPENWRT_RUST_DIR/rust-package.mk" "$OPENWRT_RUST_DIR/rust-values.mk" "$W/feed/lang/rust/"
    echo "lang/rust: $OPENWRT_RUST_DIR"
else
    cp "$HERE/sdk/rust-package.mk" "$HERE/sdk/rust-values.mk" "$W/feed/lang/rust/"
    echo "lang/rust: stand-in (openwrt-pkg/tests/sdk)"
fi
cp -r "$PKGROOT/chuted" "$W/feed/utils/chuted"
# The SDK's CARGO_HOME is $(DL_DIR)/cargo: point it at this host's registry cache.
ln -s "${CARGO_HOME:-$HOME/.cargo}" "$W/dl/cargo"

"$PKGROOT/make-source.sh" "$COMMIT" "$W/dl" >"$W/source.txt"
hash=$(sed -n 's/^PKG_HASH:=//p' "$W/source.txt")
mk() { make --no-print-directory -C "$W/feed/utils/chuted" TOPDIR="$W" W="$W" \
    CHUTED_SOURCE_URL="file://$W/dl/" PKG_HASH="$hash" "$@"; }
mk prepare
version=$(sed -n 's/^PKG_VERSION:=//p' "$PKGROOT/chuted/Makefile")
src=$W/build/chuted-$version

export CARGO_TARGET_DIR=$W/cargo-target
# The baseline gets the SDK's environment minus its CARGO_PROFILE_* overrides, so only
# the profile differs and cargo shares every artifact when the profiles agree.
vars=$(mk print-cargo-vars)
base_vars=$(printf '%s\n' "$vars" | sed 's/CARGO_PROFILE_[A-Z_]*=[^ ]*//g')
echo "baseline: cargo build --release --locked -p chuted ($(cargo --version)), SDK environment without CARGO_PROFILE_*"
(cd "$src" && eval "$base_vars cargo build -q --release --locked -p chuted --bin chuted")
base=$CARGO_TARGET_DIR/$TRIPLE/release/chuted
cp "$base" "$W/chuted.release"

mk compile >"$W/compile.log" 2>&1 || { tail -n 30 "$W/compile.log" >&2; exit 1; }
mk install >>"$W/compile.log" 2>&1 || { tail -n 30 "$W/compile.log" >&2; exit 1; }
grep -m1 'cargo install' "$W/compile.log" | sed 's/^/SDK command: /'
sdk=$src/ipkg-install/bin/chuted
[ -x "$W/root/usr/bin/chuted" ] && cmp -s "$sdk" "$W/root/usr/bin/chuted" ||
    { echo "Package/chuted/install did not install the built binary" >&2; exit 1; }

a=$(stat -c %s "$W/chuted.release")
b=$(stat -c %s "$sdk")
pct=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%+.2f", (b - a) * 100 / a }')
echo "release profile: $a bytes; SDK build: $b bytes ($pct%)"
if grep -q -- '-C overflow-checks=on' "$W/compile.log"; then
    echo "FAIL: the SDK build asked rustc for overflow checks" >&2
    exit 1
fi
if ! awk -v p="$pct" -v t="$TOL" 'BEGIN { exit !(p <= t && p >= -t) }'; then
    echo "FAIL: the SDK build differs from the release profile by $pct% (tolerance $TOL%)" >&2
    exit 1
fi
