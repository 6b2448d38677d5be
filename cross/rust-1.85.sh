#!/bin/sh
# Unpack Debian bookworm's Rust 1.85 (rustc-web/cargo-web 1.85.0+dfsg3-1~deb12u3) into
# target/rust-1.85 and print the path of an env file that puts it first on PATH.
#
#   . "$(cross/rust-1.85.sh)" && cargo --version     # cargo 1.85.0
#
# Why: 1.85 is the Rust of the OpenWrt 23.05 packages feed and chuted's declared
# rust-version; building with it is how CI proves that claim. The .debs are fetched with
# `apt-get download` and unpacked with `dpkg -x` (nothing installed, so the system's
# rustc-web, which cross/build.sh upgrades to the security suite's newer release, is
# left alone). Idempotent: a second run only prints the path.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${CHUTED_RUST185_DIR:-$ROOT/target/rust-1.85}
V=1.85.0+dfsg3-1~deb12u3
# rustc needs LLVM 19's shared library, cargo a few libraries bookworm's base lacks.
PKGS="rustc-web=$V cargo-web=$V libstd-rust-web-1.85=$V libstd-rust-web-dev=$V libllvm19
      libpcre3 libhttp-parser2.9 libssh2-1"
ENVF=$DEST/env.sh
if [ ! -x "$DEST/usr/bin/rustc" ] || [ ! -f "$ENVF" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -qq $PKGS >&2) || {
        apt-get update -qq >&2 || true
        (cd "$tmp" && apt-get download -qq $PKGS >&2)
    }
    mkdir -p "$DEST"
    for d in "$tmp"/*.deb; do dpkg -x "$d" "$DEST"; done
    cat >"$ENVF" <<ENV
# Debian's Rust 1.85, unpacked by cross/rust-1.85.sh.
export PATH="$DEST/usr/bin:\$PATH"
export LD_LIBRARY_PATH="$DEST/usr/lib/x86_64-linux-gnu:$DEST/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export RUSTC="$DEST/usr/bin/rustc" RUSTDOC="$DEST/usr/bin/rustdoc" CARGO="$DEST/usr/bin/cargo"
ENV
fi
. "$ENVF"
rustc --version | grep -q '^rustc 1\.85\.' || { echo "rust-1.85.sh: $DEST holds $(rustc --version)" >&2; exit 1; }
echo "$ENVF"
