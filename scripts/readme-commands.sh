#!/bin/bash
# Runs, as written, every command in the README's `sh` blocks under the headings
# "Set up and run" and "Packaging", so the README cannot drift from the scripts.
# One exception: `scripts/test.sh` is the suite that calls this (CI runs it as `.ci/run`).
#
#   scripts/readme-commands.sh [--list]      (--list: print the commands, run nothing)
#   CHUTED_SKIP_CROSS=1 ...                  skips the commands that need the ARM builds
#
# A block that is not meant to run here (an OpenWrt SDK step, say) is fenced as `console`
# or `text`, never `sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
LIST=0; [ "${1:-}" = "--list" ] && LIST=1

# Lines of ```sh blocks inside the two sections, comments and blanks dropped.
mapfile -t CMDS < <(awk '
  /^## / { section = ($0 ~ /^## (Set up and run|Packaging)/) }
  /^```/ { if (inblock) { inblock = 0 } else if (section && $0 ~ /^```sh *$/) { inblock = 1 }; next }
  inblock {
    line = $0; sub(/[ \t]+#.*$/, "", line); sub(/^[ \t]+/, "", line)
    if (line != "" && line !~ /^#/) print line
  }' README.md)

[ ${#CMDS[@]} -gt 0 ] || { echo "readme-commands: no sh commands found in README.md" >&2; exit 1; }
failed=0
for c in "${CMDS[@]}"; do
  if [ "$LIST" = 1 ]; then echo "$c"; continue; fi
  case "$c" in
    scripts/test.sh*) echo "skip: $c   (this suite itself)"; continue ;;
    cross/*|*target/cross/*)
      if [ -n "${CHUTED_SKIP_CROSS:-}" ]; then echo "skip: $c   (CHUTED_SKIP_CROSS)"; continue; fi ;;
  esac
  printf '\n$ %s\n' "$c"
  start=$(date +%s)
  if bash -c "$c"; then
    echo "ok: $c ($(( $(date +%s) - start )) s)"
  else
    echo "FAILED: $c"; failed=1
  fi
done
exit $failed
