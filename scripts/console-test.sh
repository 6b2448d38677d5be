#!/bin/bash
# The web console's tests:
#  1. the browser's command codec against the Rust golden fixtures: its cases
#     (cloud/assets/codec.cases.mjs) run in Chromium at the start of the browser test,
#     and under `node --test` too when a Node >= 20 is installed;
#  2. the end-to-end browser test (tests/tests/console.rs + tests/console/console_test.py):
#     a real headless Chromium (Debian's chromium, from scripts/setup.sh) driven by
#     Playwright for Python (locked: tests/console/requirements.txt) in a venv made on
#     first use; a real chute-cloud and a real chuted on Podman. Screenshots of every page: target/console-test/.
# Needs root (Podman). usage: scripts/console-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CHUTE_CONSOLE_VENV:-/var/cache/chuted-test/playwright}
REQ=tests/console/requirements.txt
# (Re)made when the locked requirements change.
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # Only the Python packages: the browser is Debian's /usr/bin/chromium (no download).
  "$VENV/bin/pip" install -q --require-hashes -r "$REQ"
  echo "$want" >"$VENV/.requirements.sha256"
fi
[ -x /usr/bin/chromium ] || { echo "chromium missing: run scripts/setup.sh" >&2; exit 1; }
if command -v node >/dev/null && node -e 'process.exit(parseInt(process.versions.node) >= 20 ? 0 : 1)'; then
  node --test cloud/assets/
else
  echo "console-test: no Node >= 20 here; the codec cases run in Chromium only"
fi
cargo build -q -p chuted -p chute-cloud -p chutectl
CONSOLE_PYTHON="$VENV/bin/python" cargo test -q -p e2e --test console -- --include-ignored --nocapture
