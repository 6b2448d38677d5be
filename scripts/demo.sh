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
say "building the example image from busybox-static"
examples/hello-web/build-image.sh

mkdir -p "$RUN"; chmod 700 "$RUN"
PODMAN_SOCK=$RUN/podman.sock ADMIN=$RUN/admin.sock
cleanup() {
  if [ "$KEEP" = 1 ]; then
    echo "left running: agent (admin socket $ADMIN), podman service ($PODMAN_SOCK)"; return
  fi
  "$BIN" --admin-socket "$ADMIN" remove hello-web >/dev/null 2>&1 || true
  [ -n "${AGENT_PID:-}" ] && kill "$AGENT_PID" 2>/dev/null || true
  [ -n "${PODMAN_PID:-}" ] && kill "$PODMAN_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
podman system service --time=0 "unix://$PODMAN_SOCK" & PODMAN_PID=$!
for _ in $(seq 50); do [ -S "$PODMAN_SOCK" ] && break; sleep 0.1; done
start_agent() {
  "$BIN" --admin-socket "$ADMIN" run --state-dir "$STATE" --podman-socket "$PODMAN_SOCK" \
    2>>"$RUN/agent.log" & AGENT_PID=$!
  for _ in $(seq 100); do "$BIN" --admin-socket "$ADMIN" status >/dev/null 2>&1 && return; sleep 0.1; done
  echo "agent did not come up; log:"; tail -20 "$RUN/agent.log"; exit 1
}
C() { echo "\$ chuted $*"; "$BIN" --admin-socket "$ADMIN" "$@"; }
say "starting the agent"
start_agent

say "deploying examples/hello-web"
C validate examples/hello-web
C deploy examples/hello-web
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
echo; echo "demo complete (agent log: $RUN/agent.log)"
