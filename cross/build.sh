#!/bin/sh
# Build static `chuted` binaries for ARM routers and SBCs on a stock Debian 12 (root).
#
#   cross/build.sh [aarch64|armv7|all] [--install-only]
#   cross/build.sh --target aarch64|armv7|all ...      (the same, as an option)
#
# Why this shape: rustup may not serve the musl ARM std on CI machines, so std is rebuilt
# from Debian's own sources (rustc-web 1.96 + rust-web-src, -Zbuild-std, RUSTC_BOOTSTRAP=1)
# and linked with Debian's gcc cross linkers against multiarch musl through a musl specs
# file. LLVM's libunwind.a for each target comes from libunwind-14-dev of that architecture;
# the two architectures' packages conflict, so they are unpacked with `dpkg -x` instead of
# installed. Only these builds use the Debian rustc; the workspace's rustup toolchain is
# left alone.
#
# Outputs target/cross/chuted-<arch> (release profile of the root Cargo.toml) and exits
# non-zero if the armv7 binary exceeds the 2.5 MB budget (BUDGET_BYTES overrides).
# Also keeps target/cross/chuted-<arch>.unstripped for size-report.sh: cargo links with
# symbols and the cross `strip --strip-all` makes the shipped file, so one LTO build
# serves both (a profile with strip=true would need a second full build-std build).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# CHUTED_SRC: the workspace to build (default: this checkout), e.g. a `git archive` export.
SRC=${CHUTED_SRC:-$ROOT}
OUT="$ROOT/target/cross"
# The committed Cargo.lock is what ships; override only to build a scratch copy.
CARGO_FLAGS=${CHUTED_CARGO_FLAGS---locked}
SYSROOTS="$OUT/sysroots"
# Features std is rebuilt with. optimize_for_size picks std's smaller algorithms, and
# naming features drops cargo's defaults (backtrace symbolization, panic-unwind), which a
# stripped panic=abort binary cannot use anyway: -140 KB (-12%) on armv7, panic messages
# kept. `cargo-default` restores cargo's set.
STD_FEATURES=${CHUTED_STD_FEATURES:-optimize_for_size}
: "${CARGO_TARGET_DIR:=$ROOT/target/cross-build}"
# 2.5 MB = 2.5 * 1000 * 1000 bytes (the issue's budget is in decimal megabytes).
: "${BUDGET_BYTES:=2500000}"
export CARGO_TARGET_DIR

TARGETS=all
INSTALL_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --target) TARGETS=${2:?--target needs aarch64, armv7 or all}; shift 2 ;;
        --target=*) TARGETS=${1#--target=}; shift ;;
        all|aarch64|armv7) TARGETS=$1; shift ;;
        --install-only) INSTALL_ONLY=1; shift ;;
        # Accepted for old callers: the unstripped binary is now always kept.
        --unstripped) shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
case "$TARGETS" in
    all) TARGETS="aarch64 armv7" ;;
    aarch64|armv7) ;;
    *) echo "build.sh: --target must be aarch64, armv7 or all, not '$TARGETS'" >&2; exit 2 ;;
esac

log() { printf '==> %s\n' "$*" >&2; }

# --- per-architecture facts -------------------------------------------------------------
arch_facts() {
    case "$1" in
        aarch64)
            TRIPLE=aarch64-unknown-linux-musl
            DEBARCH=arm64
            GNU=aarch64-linux-gnu
            MUSLDIR=/usr/lib/aarch64-linux-musl
            QEMU=qemu-aarch64-static
            LDSO=/lib/ld-musl-aarch64.so.1
            ;;
        armv7)
            TRIPLE=armv7-unknown-linux-musleabihf
            DEBARCH=armhf
            GNU=arm-linux-gnueabihf
            MUSLDIR=/usr/lib/arm-linux-musleabihf
            QEMU=qemu-arm-static
            LDSO=/lib/ld-musl-armhf.so.1
            ;;
    esac
    ENVTRIPLE=$(echo "$TRIPLE" | tr 'a-z-' 'A-Z_')
}

# --- installation (idempotent) ----------------------------------------------------------
have_pkg() {
    dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed
}

install_deps() {
    need_arch=""
    for a in arm64 armhf; do
        dpkg --print-foreign-architectures | grep -qx "$a" || need_arch="$need_arch $a"
    done
    for a in $need_arch; do
        log "adding dpkg architecture $a"
        dpkg --add-architecture "$a"
    done
    # binutils: readelf for smoke.sh and build-ipk.sh.
    pkgs="rustc-web cargo-web rust-web-src gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
          musl-dev:arm64 musl-dev:armhf qemu-user-static binutils binutils-aarch64-linux-gnu \
          binutils-arm-linux-gnueabihf"
    missing=""
    for p in $pkgs; do have_pkg "$p" || missing="$missing $p"; done
    if [ -n "$missing" ]; then
        log "installing:$missing"
        # A mirror mid-sync can fail one index (seen for bookworm-security armhf); the
        # packages needed here come from the main suite, so retry once and carry on.
        apt-get update -qq || { sleep 5; apt-get update -qq; } ||
            log "apt-get update reported errors; trying the install anyway"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
    fi
    for a in aarch64 armv7; do
        arch_facts "$a"
        dir="$SYSROOTS/$a"
        if [ ! -f "$dir/lib/libunwind.a" ]; then
            log "fetching libunwind-14-dev:$DEBARCH (unpacked, not installed)"
            tmp=$(mktemp -d)
            (cd "$tmp" && apt-get download -qq "libunwind-14-dev:$DEBARCH" >&2)
            dpkg -x "$tmp"/libunwind-14-dev_*.deb "$tmp/x"
            ua=$(find "$tmp/x" -name libunwind.a | head -n1)
            [ -n "$ua" ] || { echo "build.sh: no libunwind.a in libunwind-14-dev:$DEBARCH" >&2; exit 1; }
            mkdir -p "$dir/lib"
            cp "$ua" "$dir/lib/libunwind.a"
            rm -rf "$tmp"
        fi
        write_specs "$a"
    done
}

# A gcc specs file that makes the glibc cross gcc link against multiarch musl: musl's crt
# objects and libc instead of glibc's, musl headers first (for cc-rs builds). It is
# Debian's musl-gcc.specs plus the static-pie case rustc asks for on musl targets
# (-static-pie: rcrt1.o, no interpreter); Debian's file would silently link a dynamic
# PIE that needs /lib/ld-musl-*.so.1.
write_specs() {
    arch_facts "$1"
    dir="$SYSROOTS/$1"
    mkdir -p "$dir"
    inc=/usr/include/$(basename "$MUSLDIR")
    cat >"$dir/musl-gcc.specs.new" <<EOF
%rename cpp_options old_cpp_options

*cpp_options:
-nostdinc -isystem $inc -isystem include%s %(old_cpp_options)

*cc1:
%(cc1_cpu) -nostdinc -isystem $inc -isystem include%s

*link_libgcc:
-L$MUSLDIR -L .%s

*libgcc:
libgcc.a%s %:if-exists(libgcc_eh.a%s)

*startfile:
%{static-pie:$MUSLDIR/rcrt1.o;!shared:$MUSLDIR/Scrt1.o} $MUSLDIR/crti.o crtbeginS.o%s

*endfile:
crtendS.o%s $MUSLDIR/crtn.o

*link:
%{!static:%{!static-pie:-dynamic-linker $LDSO}} -nostdlib %{shared:-shared} %{static:-static} %{static-pie:-static -pie --no-dynamic-linker -z text} %{rdynamic:-export-dynamic}

*esp_link:


*esp_options:


*esp_cpp_options:


EOF
    mv "$dir/musl-gcc.specs.new" "$dir/musl-gcc.specs"
    # The linker rustc calls: the cross gcc driven by the specs above.
    cat >"$dir/cc.new" <<EOF
#!/bin/sh
exec $GNU-gcc "\$@" -specs $dir/musl-gcc.specs
EOF
    chmod 0755 "$dir/cc.new"
    mv "$dir/cc.new" "$dir/cc"
}

# --- build --------------------------------------------------------------------------------
build_one() {
    arch_facts "$1"
    dir="$SYSROOTS/$1"
    log "building chuted for $TRIPLE"
    # Debian's toolchain only for these builds; never rustup's proxies on PATH.
    # /usr/bin first so build scripts that run `rustc`/`cargo` by name get Debian's too.
    export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
    export PATH="/usr/bin:$PATH"
    eval "export CARGO_TARGET_${ENVTRIPLE}_LINKER=\"$dir/cc\""
    eval "export CC_$(echo "$TRIPLE" | tr - _)=\"$dir/cc\""
    eval "export AR_$(echo "$TRIPLE" | tr - _)=$GNU-ar"
    # Static, no self-contained crt (build-std has none): the specs file supplies musl's.
    # libunwind.a: std's unwinder on musl, even with panic=abort (backtraces).
    eval "export CARGO_TARGET_${ENVTRIPLE}_RUSTFLAGS=\"-C target-feature=+crt-static -C link-self-contained=no -L native=$dir/lib -L native=$MUSLDIR\""
    # Symbols kept at link time; stripped below (see the header).
    export CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=false
    std_features=""
    [ "$STD_FEATURES" = cargo-default ] || std_features="-Zbuild-std-features=$STD_FEATURES"
    (cd "$SRC" && /usr/bin/cargo build $CARGO_FLAGS --release -p chuted --bin chuted \
        --target "$TRIPLE" -Zbuild-std=std,panic_abort $std_features)
    mkdir -p "$OUT"
    cp "$CARGO_TARGET_DIR/$TRIPLE/release/chuted" "$OUT/chuted-$1.unstripped"
    "$GNU-strip" --strip-all -o "$OUT/chuted-$1" "$OUT/chuted-$1.unstripped"
}

install_deps
[ "$INSTALL_ONLY" = 1 ] && exit 0

for t in $TARGETS; do build_one "$t"; done

status=0
echo "static chuted binaries (release profile):"
for t in $TARGETS; do
    f="$OUT/chuted-$t"
    size=$(stat -c %s "$f")
    line=$(printf '  %-8s %9d bytes  %s' "$t" "$size" "$f")
    if [ "$t" = armv7 ]; then
        if [ "$size" -le "$BUDGET_BYTES" ]; then
            line="$line  (within the $BUDGET_BYTES-byte budget)"
        else
            line="$line  (OVER the $BUDGET_BYTES-byte budget)"
            status=1
        fi
    fi
    echo "$line"
done
exit $status
