#!/bin/bash
# The crash loops, with their figures:
#  1. in-process, against the fake engine: 300 rounds of random deploy/update/stop/start/
#     restart/remove on three chutes, the agent dropped between two polls of its tasks
#     (every Podman call is such a point) ~150 times; fast and deterministic (seed printed;
#     CHUTED_CRASH_SEED / CHUTED_CRASH_ROUNDS to vary it).
#  2. against the real agent and Podman: CHUTED_E2E_KILLS (default 100) kill -9 of
#     `chuted run` at a random instant of a random operation, each followed by a restart
#     and the invariants (no duplicate or unclaimed containers, pools equal to held
#     reservations, every acknowledged operation held, chutes that should run running).
# Root and Podman for the second; about 3 minutes in all on a 2-core machine.
#   scripts/tests/crash-loop.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# The e2e test runs target/debug/chuted.
cargo build -q -p chuted
cargo test -q -p chuted --lib crash_loop -- --nocapture
cargo test -q -p e2e --test crash -- --include-ignored --nocapture crash_loop
