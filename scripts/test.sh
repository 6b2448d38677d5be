#!/bin/bash
# The whole test suite, as root on Debian 12: installs what it needs, checks format and
# lints, runs unit, property and end-to-end tests (real Podman, cgroups, netns), the
# packaging tests, and the ARM cross builds with their qemu smoke test.
#   usage: sudo scripts/test.sh            (everything)
#          CHUTED_SKIP_CROSS=1 scripts/test.sh   (skip the ARM builds, e.g. while iterating)
#          CHUTED_SKIP_FRESH_SETUP=1 ...          (do not remove and reinstall iptables first)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n==> %s\n' "$*"; }
FAILED=()
run() { local name=$1; shift; step "$name"; if "$@"; then echo "ok: $name"; else echo "FAILED: $name"; FAILED+=("$name"); fi; }

step "setup"
# First prove setup works on a fresh machine: iptables removed, setup puts it back.
if [ -z "${CHUTED_SKIP_FRESH_SETUP:-}" ]; then
  scripts/tests/fresh-setup.sh
else
  scripts/setup.sh
fi
examples/hello-web/build-image.sh

run "cargo fmt --check" cargo fmt --all --check
run "chuted dependency check (no cloud stack in the router binary)" scripts/check-deps.sh
run "cargo clippy" cargo clippy --workspace --all-targets -q -- -D warnings
step "cargo build"
cargo build --workspace -q
# Root-needing tests (Podman, netns) are #[ignore]d so a plain `cargo test` passes as a
# normal user; CI runs as root and includes them.
run "cargo test" cargo test --workspace --no-fail-fast -q -- --include-ignored --test-threads=4 --skip crash_loop --skip console_browser
# The randomized crash loops (skipped above), alone so their kill timing is not skewed by
# parallel tests; they print their figures.
run "crash loops" scripts/tests/crash-loop.sh
# Every README set-up and packaging command as written: the demo (the main job), the ARM
# builds, their qemu smoke test, the size report and the .ipk. The ARM builds come before
# the packaging tests, which put the real binaries into the .ipk and run them under qemu.
run "README commands" scripts/readme-commands.sh
if [ -z "${CHUTED_SKIP_CROSS:-}" ]; then
  run "cross tests" cross/tests/run.sh
fi
run "openwrt-pkg tests" openwrt-pkg/tests/run.sh
run "chute-cloud API fuzz (schemathesis, from its OpenAPI document)" scripts/fuzz-api.sh
# The web console in headless Chromium (skipped above: it needs its Playwright venv).
run "web console (JS codec + headless Chromium end to end)" scripts/console-test.sh

step "summary"
if [ ${#FAILED[@]} -ne 0 ]; then
  printf 'failed steps: %s\n' "${FAILED[*]}"
  exit 1
fi
echo "all test steps passed"
