# Reporters shared by the shell test scripts (cross/smoke.sh, cross/tests/run.sh,
# openwrt-pkg/tests/run.sh): pass/fail counters, a private temp dir removed on exit, and
# one line per check. POSIX sh (busybox ash too). Use:
#
#   . "$ROOT/scripts/lib/check.sh"
#   checks_begin chuted-smoke          # sets PASS, FAIL and TMP
#   check "name" command args...       # passes when the command succeeds
#   checks_end                         # `N passed, M failed`; status non-zero on failure
#
# Checks that decide for themselves call `ok NAME` or `bad NAME [FILE...]`, which shows
# the tail of each FILE under the failure.

checks_begin() {
    PASS=0
    FAIL=0
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/$1.$$.XXXXXX") || exit 2
    trap 'rm -rf "$TMP"' EXIT INT TERM
}

ok() {
    PASS=$((PASS + 1))
    printf 'ok    %s\n' "$1"
}

bad() {
    FAIL=$((FAIL + 1))
    printf 'FAIL  %s\n' "$1"
    shift
    for _f in "$@"; do [ -s "$_f" ] && sed 's/^/      | /' "$_f" | tail -n 40; done
    return 0
}

# check NAME COMMAND...: passes when COMMAND succeeds; its output is shown if not.
check() {
    _name=$1
    shift
    if "$@" >"$TMP/check.out" 2>&1; then ok "$_name"; else bad "$_name" "$TMP/check.out"; fi
}

# same NAME EXPECTED_FILE ACTUAL_FILE: passes when the files are identical.
same() {
    if diff -u "$2" "$3" >"$TMP/diff" 2>&1; then ok "$1"; else bad "$1" "$TMP/diff"; fi
}

checks_end() {
    echo "$PASS passed, $FAIL failed"
    [ "$FAIL" = 0 ]
}
