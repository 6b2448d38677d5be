#!/bin/sh
# Tests for cross/build.sh and cross/smoke.sh themselves (the ARM binaries are tested by
# smoke.sh). Needs the toolchain build.sh installs; the budget test reuses the warm
# armv7 build (seconds when target/cross-build is warm, a full build otherwise).
#
#   cross/tests/run.sh
#
# Last line: `N passed, M failed`; exit status non-zero on failure.
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
CROSS=$(cd "$HERE/.." && pwd)
ROOT=$(cd "$CROSS/.." && pwd)
. "$ROOT/scripts/lib/check.sh"
checks_begin chuted-cross-test

for f in build.sh smoke.sh size-report.sh; do
    check "sh -n $f" sh -n "$CROSS/$f"
done

"$CROSS/build.sh" --target mips >"$TMP/out" 2>&1
rc=$?
if [ "$rc" = 2 ] && grep -q "aarch64, armv7 or all" "$TMP/out"; then
    ok "build.sh --target mips is refused with the allowed targets"
else
    bad "build.sh --target mips (exit $rc)" "$TMP/out"
fi

# The README's positional form: `build.sh all`, `build.sh armv7`; unknown names refused.
"$CROSS/build.sh" mips >"$TMP/out" 2>&1
rc=$?
if [ "$rc" = 2 ] && grep -q "unknown argument 'mips'" "$TMP/out"; then
    ok "build.sh mips (positional) is refused"
else
    bad "build.sh mips (exit $rc)" "$TMP/out"
fi
for form in all armv7 aarch64; do
    check "build.sh $form --install-only (positional target accepted)" \
        "$CROSS/build.sh" "$form" --install-only
done

# Installation is idempotent: a second run finds everything and installs nothing.
"$CROSS/build.sh" --install-only >"$TMP/out" 2>&1
rc=$?
if [ "$rc" = 0 ] && ! grep -q '^==> installing' "$TMP/out"; then
    ok "build.sh --install-only on a prepared machine installs nothing"
else
    bad "build.sh --install-only (exit $rc)" "$TMP/out"
fi

for a in aarch64 armv7; do
    s=$ROOT/target/cross/sysroots/$a/musl-gcc.specs
    check "$a specs file links static-pie without an interpreter" \
        grep -q 'static-pie:-static -pie --no-dynamic-linker' "$s"
    check "$a specs file uses musl's crt objects" grep -q "linux-musl[a-z]*/crti.o" "$s"
    check "$a libunwind.a unpacked" test -s "$ROOT/target/cross/sysroots/$a/lib/libunwind.a"
done

# The build never uses rustup's toolchain: Debian's rustc is the one in the binary.
# (.comment records the rustc that compiled the code; rustup's says "rustc version 1.95".)
if [ -f "$ROOT/target/cross/chuted-armv7" ]; then
    want=$(/usr/bin/rustc --version | awk '{ print $2 }')
    check "armv7 binary built by Debian rustc $want" \
        sh -c 'readelf -p .comment "$1" 2>/dev/null | grep -q "rustc version $2" ||
               ! readelf -S "$1" | grep -q "\.comment"' _ "$ROOT/target/cross/chuted-armv7" "$want"
fi

# The budget is enforced: an impossible budget fails the build's exit status.
BUDGET_BYTES=1000 "$CROSS/build.sh" --target armv7 >"$TMP/out" 2>&1
rc=$?
if [ "$rc" != 0 ] && grep -q 'OVER the 1000-byte budget' "$TMP/out"; then
    ok "build.sh exits non-zero when armv7 is over budget"
else
    bad "build.sh with BUDGET_BYTES=1000 (exit $rc)" "$TMP/out"
fi
"$CROSS/build.sh" --target armv7 >"$TMP/out" 2>&1
rc=$?
if [ "$rc" = 0 ] && grep -q 'within the 2500000-byte budget' "$TMP/out"; then
    ok "armv7 within the 2.5 MB budget: $(grep '  armv7' "$TMP/out" | awk '{ print $2 }') bytes"
else
    bad "build.sh --target armv7 (exit $rc)" "$TMP/out"
fi

# smoke.sh reports a missing binary as a failure, not a pass.
CHUTED_CROSS_DIR=$TMP/empty "$CROSS/smoke.sh" armv7 >"$TMP/out" 2>&1
rc=$?
if [ "$rc" != 0 ] && tail -n1 "$TMP/out" | grep -qx '0 passed, 1 failed'; then
    ok "smoke.sh fails when the binary is missing"
else
    bad "smoke.sh without binaries (exit $rc)" "$TMP/out"
fi

checks_end
