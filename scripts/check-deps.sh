#!/bin/bash
# The router binary stays tiny: the cloud's server stack (axum, sqlx, utoipa, a tokio
# runtime) must never reach `chuted`. tokio itself may appear only as hyper's `sync`
# dependency (no runtime, no `net`, no timers).
#   usage: scripts/check-deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(cargo tree -p chuted -e normal --prefix none --target all)
bad=$(grep -E '^(axum|axum-core|sqlx[a-z-]*|utoipa[a-z-]*|tokio-tungstenite|libsqlite3-sys|tower|ureq) ' <<<"$tree" | sort -u || true)
if [ -n "$bad" ]; then
  echo "chuted must not depend on the cloud's server stack, but its tree has:"
  echo "$bad"
  exit 1
fi
features=$(cargo tree -p chuted -e normal,features --prefix none --target all -i tokio 2>/dev/null \
  | grep -o 'tokio feature "[^"]*"' | sed 's/tokio feature "\(.*\)"/\1/' | sort -u || true)
for f in $features; do
  case "$f" in
    default|sync) ;;
    *) echo "chuted pulls tokio with feature \"$f\"; only \"sync\" (through hyper) is allowed"; exit 1 ;;
  esac
done
echo "ok: chuted has no axum/sqlx/utoipa; tokio features: ${features//$'\n'/ }"
