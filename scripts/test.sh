#!/bin/bash
# The whole test suite, as root on Debian 12: installs what it needs, checks format and
# lints, runs unit, property and end-to-end tests (real Podman, cgroups, netns), the
# packaging tests, and the ARM cross builds with their qemu smoke test.
#   usage: sudo scripts/test.sh            (everything)
#          CHUTED_SKIP_CROSS=1 scripts/test.sh   (skip the ARM builds, e.g. while iterating)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n==> %s\n' "$*"; }
FAILED=()
run() { local name=$1; shift; step "$name"; if "$@"; then echo "ok: $name"; else echo "FAILED: $name"; FAILED+=("$name"); fi; }

step "setup"
scripts/setup.sh
examples/hello-web/build-image.sh

run "cargo fmt --check" cargo fmt --all --check
run "chuted dependency check (no cloud stack in the router binary)" scripts/check-deps.sh
run "cargo clippy" cargo clippy --workspace --all-targets -q -- -D warnings
step "cargo build"
cargo build --workspace -q
# Root-needing tests (Podman, netns) are ordinary tests here: CI runs as root.
run "cargo test" cargo test --workspace --no-fail-fast -q -- --test-threads=4
# ARM builds first: the packaging tests put the real binaries into the .ipk and run them
# under qemu against the init script's command line.
if [ -z "${CHUTED_SKIP_CROSS:-}" ]; then
  run "cross build (aarch64 + armv7, static musl)" cross/build.sh --target all
  run "cross smoke (qemu-user)" cross/smoke.sh
fi
run "openwrt-pkg tests" openwrt-pkg/tests/run.sh
run "chute-cloud API fuzz (schemathesis, from its OpenAPI document)" scripts/fuzz-api.sh

step "summary"
if [ ${#FAILED[@]} -ne 0 ]; then
  printf 'failed steps: %s\n' "${FAILED[*]}"
  exit 1
fi
echo "all test steps passed"
