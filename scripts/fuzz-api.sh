#!/bin/bash
# Fuzzes every chute-cloud REST endpoint from its own OpenAPI document with schemathesis
# (installed into a venv on first use): no input may produce a 5xx or a crash.
#   usage: scripts/fuzz-api.sh [--max-examples N]
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES=30; [ "${1:-}" = "--max-examples" ] && EXAMPLES=$2
VENV=${CHUTE_FUZZ_VENV:-/var/cache/chuted-test/schemathesis}
if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'schemathesis>=4,<5'
fi
cargo build -q -p chute-cloud
DIR=$(mktemp -d /tmp/chute-cloud-fuzz.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/debug/chute-cloud serve --data-dir "$DIR/data" --listen "127.0.0.1:$PORT" --log-level warn \
  >"$DIR/out.log" 2>"$DIR/cloud.log" & CLOUD=$!
trap 'kill $CLOUD 2>/dev/null || true; wait $CLOUD 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do [ -s "$DIR/data/admin.token" ] && curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
TOKEN=$(cat "$DIR/data/admin.token")
# Run from the temp dir: schemathesis keeps a .schemathesis/ cache in its working dir.
(cd "$DIR" && "$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/api/v1/openapi.json" \
  -H "Authorization: Bearer $TOKEN" \
  --checks not_a_server_error \
  --max-examples "$EXAMPLES" --seed 1 \
  --suppress-health-check all \
  --request-timeout 20 \
  --workers 2)
# The server must have survived the whole run.
curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null
echo "ok: no 5xx, server alive"
