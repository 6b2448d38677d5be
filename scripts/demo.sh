#!/bin/bash
# The main job: builds chuted, builds the example chute's image locally, starts Podman's
# API service and the agent, and walks the example chute through its life, showing what
# the agent enforces. Leaves nothing running unless --keep is given.
#   usage: sudo scripts/demo.sh [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0; [ "${1:-}" = "--keep" ] && KEEP=1
RUN=/run/chuted-demo
STATE=/var/lib/chuted-demo
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

scripts/setup.sh
say "building chuted (release)"
cargo build --release -q -p chuted
BIN=$PWD/target/release/chuted
ls -l "$BIN" | awk '{printf "binary: %s bytes\n", $5}'
mkdir -p "$RUN"; chmod 700 "$RUN"
say "building the example image from busybox-static, and its archive"
# The agent creates a chute only from an image pinned by content (an archive with its
# sha256, or NAME@sha256:DIGEST), so the demo deploys the chute with its archive beside
# chute.toml, as a developer ships it.
CHUTE_DIR=$RUN/hello-web
examples/hello-web/build-image.sh --archive "$CHUTE_DIR"
cp examples/hello-web/chute.toml "$CHUTE_DIR/"
CLOUD_ARGS=()
PODMAN_SOCK=$RUN/podman.sock ADMIN=$RUN/admin.sock
cleanup() {
  if [ "$KEEP" = 1 ]; then
    echo "left running: agent (admin socket $ADMIN), podman service ($PODMAN_SOCK)"; return
  fi
  "$BIN" --admin-socket "$ADMIN" remove hello-web >/dev/null 2>&1 || true
  [ -n "${AGENT_PID:-}" ] && kill "$AGENT_PID" 2>/dev/null || true
  [ -n "${CLOUD_PID:-}" ] && kill "$CLOUD_PID" 2>/dev/null || true
  [ -n "${PODMAN_PID:-}" ] && kill "$PODMAN_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
podman system service --time=0 "unix://$PODMAN_SOCK" & PODMAN_PID=$!
for _ in $(seq 50); do [ -S "$PODMAN_SOCK" ] && break; sleep 0.1; done
# Its own ownership label: the demo's agent never adopts (or counts) containers of another
# agent sharing this Podman, such as a benchmark's.
printf 'instance = "chuted-demo"\n' > "$RUN/agent.toml"
# A fresh device each run (its key, snapshot and grants live here; the demo owns it).
rm -rf "$STATE"
start_agent() {
  "$BIN" --admin-socket "$ADMIN" run --state-dir "$STATE" --podman-socket "$PODMAN_SOCK" \
    --config "$RUN/agent.toml" "${CLOUD_ARGS[@]}" 2>>"$RUN/agent.log" & AGENT_PID=$!
  for _ in $(seq 100); do "$BIN" --admin-socket "$ADMIN" status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent did not come up; log:"; tail -20 "$RUN/agent.log"; exit 1
}
C() { echo "\$ chuted $*"; "$BIN" --admin-socket "$ADMIN" "$@"; }
say "starting the agent"
start_agent

say "deploying examples/hello-web (chute.toml + image.tar + image.tar.sha256)"
C validate "$CHUTE_DIR"
C deploy "$CHUTE_DIR"
C list
say "the chute serves http on port 18080"
# bash's /dev/tcp, not busybox wget: Debian's static busybox wget segfaults on this host.
http_get() { exec 3<>/dev/tcp/127.0.0.1/18080 && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && timeout 5 cat <&3; exec 3>&-; }
served=0
for _ in $(seq 50); do page=$(http_get 2>/dev/null) && [[ "$page" == *" 200 "* ]] && { served=1; echo "$page" | tail -n +1 | sed -n '/^\r\{0,1\}$/,$p' | sed 1d; break; }; sleep 0.2; done
[ "$served" = 1 ] || { echo "demo: the chute does not answer on port 18080"; exit 1; }
say "caps as the kernel sees them (inspect --json .cgroup_limits)"
"$BIN" --admin-socket "$ADMIN" inspect hello-web --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps(d["cgroup_limits"], indent=1)); print("usage:", d["usage"])'
say "killing the chute's process: on-failure brings it back"
PID=$(podman inspect -f '{{.State.Pid}}' chute-hello-web); kill -9 "$PID"; sleep 2.5
C list
say "kill -9 the agent, start it again: the chute is adopted, not restarted"
BEFORE=$(podman inspect -f '{{.State.StartedAt}}' chute-hello-web)
kill -9 "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
start_agent
AFTER=$(podman inspect -f '{{.State.StartedAt}}' chute-hello-web)
C list
if [ "$BEFORE" = "$AFTER" ]; then echo "adopted: container started at $AFTER, untouched"
else echo "demo: NOT adopted (started at $BEFORE, now $AFTER)"; exit 1; fi
say "stop, start, restart, logs"
C stop hello-web; C start hello-web; C restart hello-web
C logs hello-web --tail 5 || true
C status
say "removing"
C remove hello-web
C list

# ---- the same chute, pushed by a developer through chute-cloud ----
say "building chute-cloud and chutectl"
cargo build -q -p chute-cloud -p chutectl
CLOUD_BIN=$PWD/target/debug/chute-cloud CTL_BIN=$PWD/target/debug/chutectl
CLOUD_DATA=$RUN/cloud; rm -rf "$CLOUD_DATA"
CLOUD_PORT=${CHUTE_CLOUD_PORT:-18480}
"$CLOUD_BIN" serve --data-dir "$CLOUD_DATA" --listen "127.0.0.1:$CLOUD_PORT" 2>>"$RUN/cloud.log" & CLOUD_PID=$!
for _ in $(seq 100); do [ -s "$CLOUD_DATA/admin.token" ] && break; sleep 0.1; done
export HOME=$RUN/home CHUTECTL_CLOUD=http://127.0.0.1:$CLOUD_PORT
K() { local key=$1; shift; echo "\$ chutectl $*"; "$CTL_BIN" --key "$RUN/$key.key" "$@"; }
rm -f "$RUN/owner.key" "$RUN/dev.key"
say "the owner logs in with the admin token chute-cloud wrote, and registers the fleet key"
K owner login "$CHUTECTL_CLOUD" --token "$(cat "$CLOUD_DATA/admin.token")"
K owner keygen >/dev/null
K owner owner init
OWNER_HEX=$("$CTL_BIN" --key "$RUN/owner.key" pubkey)
C trust --state-dir "$STATE" --owner-key "$OWNER_HEX"
say "the agent connects to the cloud: it shows up pending"
kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
CLOUD_ARGS=(--cloud "ws://127.0.0.1:$CLOUD_PORT/agent")
start_agent
DEVICE=$("$BIN" id --state-dir "$STATE" | awk '/^device_id/ {print $2}')
for _ in $(seq 100); do "$CTL_BIN" device list --json | grep -q "$DEVICE" && break; sleep 0.1; done
K owner device list
K owner device accept "$DEVICE"
K owner device tag "$DEVICE" demo
say "the owner grants a developer key every procedure on chutes hello-*"
"$CTL_BIN" --key "$RUN/dev.key" keygen >/dev/null
DEV_HEX=$("$CTL_BIN" --key "$RUN/dev.key" pubkey)
K owner grant issue --to "$DEV_HEX" --procedures deploy,start,stop,restart,remove,logs,status --chutes 'hello-*' --expires 1d
say "the developer pushes examples/hello-web with its image archive: upload, transfer, deploy, verified result"
PUSH=$RUN/hello-web-push; rm -rf "$PUSH"; cp -r examples/hello-web "$PUSH"
podman save --format docker-archive -o "$PUSH/image.tar" localhost/chuted-hello-web:1 2>/dev/null
time K dev push "$PUSH" --tag demo
K dev list --device "$DEVICE"
busybox wget -q -O - http://127.0.0.1:18080/ || true
K dev stop --device "$DEVICE" hello-web
K dev start --device "$DEVICE" hello-web
K dev logs --device "$DEVICE" hello-web --tail 5
say "a command outside the grant is refused, with its reason"
K dev stop --device "$DEVICE" not-granted || true
K owner deployment list
K owner device list
K dev remove --device "$DEVICE" hello-web
echo; echo "demo complete (agent log: $RUN/agent.log, cloud log: $RUN/cloud.log)"
