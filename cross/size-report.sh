#!/bin/sh
# Where the bytes of the static ARM `chuted` go, by crate.
#
#   cross/size-report.sh [aarch64|armv7] [TOP]      (default armv7, top 20)
#
# Uses the symbols-kept binary cross/build.sh keeps beside the shipped one (building it
# if needed: seconds when the build is warm), then sums `nm --size-sort` symbol sizes per crate: the first
# path segment of each demangled Rust symbol (`core::ptr::drop_in_place<T>` counts for T's
# crate: it is T's drop glue), C symbols (musl libc, libunwind, compiler-rt) as "[C]",
# anonymous constants (string and table literals) as "[Rust constants]".
# With LTO and opt-level z much code is inlined into its callers, so this is attribution
# by where the surviving functions live, not exact cost; the per-section totals are exact.
# (`cargo bloat` gives the same view but wants rustup's targets.)
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARCH=${1:-armv7}
TOP=${2:-20}
case "$ARCH" in
    aarch64) GNU=aarch64-linux-gnu ;;
    armv7) GNU=arm-linux-gnueabihf ;;
    *) echo "size-report.sh: arch must be aarch64 or armv7, not '$ARCH'" >&2; exit 2 ;;
esac

"$ROOT/cross/build.sh" --target "$ARCH" >&2
BIN=$ROOT/target/cross/chuted-$ARCH.unstripped
STRIPPED=$ROOT/target/cross/chuted-$ARCH

echo "== chuted-$ARCH: size by section (unstripped build; strip removes only symbols) =="
[ -f "$STRIPPED" ] && echo "stripped binary: $(stat -c %s "$STRIPPED") bytes ($STRIPPED)"
"$GNU-size" -A -d "$BIN" | awk 'NR > 2 && $2 > 0 && $1 !~ /^\.(comment|symtab|strtab|debug)/ {
    printf "  %-22s %9d\n", $1, $2 }'

"$GNU-nm" --size-sort -S -C --radix=d "$BIN" | awk -v top="$TOP" '
    # aliases (pthread_create and __pthread_create) share an address: count it once
    $3 ~ /^[tTrRdDbBvVwW]$/ && !seen[$1]++ {
        size = $2 + 0
        name = $0
        sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name)
        n = name
        # drop glue: attribute to the dropped type
        if (n ~ /^core::ptr::drop_in_place</) { sub(/^core::ptr::drop_in_place</, "", n) }
        # <T as Trait>::f and &T, &mut T, dyn T: the implementing type decides
        while (n ~ /^(<|&|mut |dyn |\*const |\*mut |\()/) {
            sub(/^(<|&|mut |dyn |\*const |\*mut |\()/, "", n)
        }
        if (n ~ /^[A-Za-z_][A-Za-z0-9_]*::/) {
            crate = n; sub(/::.*/, "", crate)
        } else if (n ~ /^\.Lanon\./) {
            crate = "[Rust constants]"
        } else if (n ~ /^_?ZN/ || n ~ /^_R/) {
            crate = "[unmangled Rust]"
        } else {
            crate = "[C]"
        }
        bytes[crate] += size
        total += size
        sym[NR] = size "\t" crate "\t" name
    }
    END {
        printf "\n== symbol bytes by crate (top %d of %d bytes in symbols) ==\n", top, total
        for (c in bytes) printf "%d\t%s\n", bytes[c], c | "sort -rn | head -n " top " | awk -F\"\\t\" -v t=" total " \x27{ printf \"  %9d  %5.1f%%  %s\\n\", $1, 100*$1/t, $2 }\x27"
        close("sort -rn | head -n " top " | awk -F\"\\t\" -v t=" total " \x27{ printf \"  %9d  %5.1f%%  %s\\n\", $1, 100*$1/t, $2 }\x27")
    }'

echo
echo "== largest symbols =="
"$GNU-nm" --size-sort -S -C --radix=d "$BIN" | tail -n 15 | awk '{ size = $2 + 0; $1 = $2 = $3 = ""
    sub(/^ +/, ""); printf "  %9d  %s\n", size, substr($0, 1, 110) }'
