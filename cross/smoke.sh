#!/bin/sh
# Smoke-test the cross-built ARM binaries under qemu-user (no Podman, no root needed).
#
#   cross/smoke.sh [aarch64|armv7 ...]      (default: both; binaries from cross/build.sh)
#
# For each binary: it is a static ELF for the right machine; `--version` names the
# workspace version; `--help` lists the subcommands; `validate examples/hello-web` accepts
# the example chute and prints it; broken manifests are rejected with an error that names
# what is wrong; `selftest` signs and verifies a command. Prints `N passed, M failed` last
# and exits non-zero on any failure.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=${CHUTED_CROSS_DIR:-$ROOT/target/cross}
EXAMPLE=$ROOT/examples/hello-web
ARCHES=${*:-aarch64 armv7}
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")

. "$ROOT/scripts/lib/check.sh"
checks_begin chuted-smoke

# run ARCH ARGS...: runs the binary under qemu; stdout in $TMP/out, stderr in $TMP/err,
# exit status in RC. A timeout keeps a hung emulated binary from wedging CI.
run() {
    _q=$QEMU
    RC=0
    timeout 60 "$_q" "$BIN" "$@" >"$TMP/out" 2>"$TMP/err" </dev/null || RC=$?
}

# A manifest that is broken in exactly one way, so the error has one thing to name.
broken() {
    mkdir -p "$TMP/$1"
    sed "$2" "$EXAMPLE/chute.toml" >"$TMP/$1/chute.toml"
    if cmp -s "$EXAMPLE/chute.toml" "$TMP/$1/chute.toml"; then
        echo "smoke.sh: sed '$2' did not change the example manifest" >&2
        exit 2
    fi
}
broken bad-name 's/^name = .*/name = "Hello_Web!"/'
broken bad-memory 's/^memory = .*/memory = "lots"/'
broken bad-restart 's/^policy = .*/policy = "sometimes"/'
printf 'this is = not [toml\n' >"$TMP/garbage.toml"
mkdir -p "$TMP/garbage" && cp "$TMP/garbage.toml" "$TMP/garbage/chute.toml"

for arch in $ARCHES; do
    case "$arch" in
        aarch64) QEMU=qemu-aarch64-static MACHINE=AArch64 ;;
        armv7) QEMU=qemu-arm-static MACHINE=ARM ;;
        *) echo "smoke.sh: unknown arch '$arch' (aarch64, armv7)" >&2; exit 2 ;;
    esac
    BIN=$BIN_DIR/chuted-$arch
    if [ ! -x "$BIN" ]; then
        bad "$arch: $BIN missing (run cross/build.sh --target $arch first)"
        continue
    fi
    command -v "$QEMU" >/dev/null || { bad "$arch: $QEMU not installed (apt-get install qemu-user-static)"; continue; }

    # Static and for the right machine: a router has no musl loader at /lib/ld-musl-*.
    readelf -h "$BIN" >"$TMP/elf" 2>&1
    readelf -l "$BIN" >>"$TMP/elf" 2>&1
    if grep -q "Machine: *$MACHINE\$" "$TMP/elf" && ! grep -q INTERP "$TMP/elf" &&
        ! grep -q DYNAMIC "$TMP/elf"; then
        ok "$arch: static $MACHINE ELF ($(stat -c %s "$BIN") bytes)"
    else
        bad "$arch: not a static $MACHINE executable" "$TMP/elf"
    fi

    run --version
    if [ "$RC" = 0 ] && grep -q "$VERSION" "$TMP/out"; then
        ok "$arch: --version -> $(head -n1 "$TMP/out")"
    else
        bad "$arch: --version (exit $RC, want one naming $VERSION)" "$TMP/out" "$TMP/err"
    fi

    run --help
    missing=""
    for sub in run validate selftest; do
        grep -qw "$sub" "$TMP/out" || missing="$missing $sub"
    done
    if [ "$RC" = 0 ] && [ -z "$missing" ]; then
        ok "$arch: --help lists run, validate, selftest"
    else
        bad "$arch: --help (exit $RC, missing:${missing:- none})" "$TMP/out" "$TMP/err"
    fi

    run validate "$EXAMPLE"
    # The validated chute is printed: its name, image and caps must show.
    if [ "$RC" = 0 ] && grep -q hello-web "$TMP/out" && grep -q 'chuted-hello-web:1' "$TMP/out"; then
        ok "$arch: validate examples/hello-web prints the chute"
    else
        bad "$arch: validate examples/hello-web (exit $RC)" "$TMP/out" "$TMP/err"
    fi

    # Each broken manifest must fail, and say which value is wrong.
    for case in "bad-name:Hello_Web!" "bad-memory:lots" "bad-restart:sometimes" "garbage:"; do
        dir=${case%%:*}
        want=${case#*:}
        run validate "$TMP/$dir"
        cat "$TMP/out" "$TMP/err" >"$TMP/all"
        if [ "$RC" != 0 ] && [ -s "$TMP/err" ] && { [ -z "$want" ] || grep -qF "$want" "$TMP/all"; }; then
            ok "$arch: validate rejects $dir: $(head -n1 "$TMP/err")"
        else
            bad "$arch: validate $dir should fail naming '${want:-the syntax error}' (exit $RC)" \
                "$TMP/out" "$TMP/err"
        fi
    done

    run validate "$TMP/does-not-exist"
    if [ "$RC" != 0 ] && grep -q does-not-exist "$TMP/err"; then
        ok "$arch: validate of a missing directory names it"
    else
        bad "$arch: validate of a missing directory (exit $RC)" "$TMP/out" "$TMP/err"
    fi

    run selftest
    if [ "$RC" = 0 ]; then
        ok "$arch: selftest -> $(tail -n1 "$TMP/out")"
    else
        bad "$arch: selftest (exit $RC)" "$TMP/out" "$TMP/err"
    fi

    run no-such-subcommand
    if [ "$RC" != 0 ]; then
        ok "$arch: unknown subcommand exits $RC"
    else
        bad "$arch: unknown subcommand exited 0" "$TMP/out" "$TMP/err"
    fi
done

checks_end
