#!/bin/bash
# The swarm benchmark (issue 14): starts chute-cloud (release build) on SQLite, on
# PostgreSQL, and as two replicas on one PostgreSQL, runs `chute-cloud swarm` against
# each and prints its summary table. A benchmark, not a test: scripts/test.sh does not
# run it.
#   usage: scripts/swarm-bench.sh [AGENTS] [HEARTBEAT_SECS] [DURATION_SECS] [MODES]
#          MODES: any of "sqlite postgres replicas" (default: all three)
#          SWARM_EXTRA="--reconnect-storm" adds swarm flags.
# As root, PostgreSQL runs as the `postgres` user in a private cluster under a temp dir
# (the `postgresql` package, scripts/setup.sh), removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${1:-1000}
HB=${2:-30}
DURATION=${3:-30}
MODES=${4:-sqlite postgres replicas}
BIN=target/release/chute-cloud
[ -x "$BIN" ] || cargo build --release -p chute-cloud
# Each side holds one socket per agent (plus the database's).
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((AGENTS + 200)) ]; then
  echo "swarm-bench: open files limit $(ulimit -n) < $AGENTS agents" >&2
  exit 1
fi
WORK=$(mktemp -d /tmp/swarm-bench-XXXXXX)
PIDS=()
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGPORT=
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$PGPORT" ]; then pg stop -m immediate -D "$WORK/pg" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
pg() { # pg_ctl as the postgres user when root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$PGBIN/pg_ctl" "$@"; else "$PGBIN/pg_ctl" "$@"; fi
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_pg() {
  [ -n "$PGPORT" ] && return
  PGPORT=$(free_port)
  mkdir -p "$WORK/pg"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK" "$WORK/pg"
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=trust --no-sync -E UTF8 >/dev/null
  else
    "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=trust --no-sync -E UTF8 >/dev/null
  fi
  pg -D "$WORK/pg" -l "$WORK/pg.log" -w start \
    -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=128MB -c synchronous_commit=off" >/dev/null
}
new_db() {
  "$PGBIN/psql" -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE DATABASE $1" >/dev/null
  echo "postgres://postgres@127.0.0.1:$PGPORT/$1"
}
serve() { # serve NAME DATA_DIR [DATABASE] -> sets PORT and PID
  PORT=$(free_port)
  # Every simulated agent comes from 127.0.0.1: lift the per-address connection cap
  # (1024 by default) above the swarm's size.
  local args=(serve --data-dir "$2" --listen "127.0.0.1:$PORT" --log-level warn
              --max-connections-per-ip $((AGENTS + 1000)) --max-connections $((AGENTS + 1000)))
  [ -n "${3:-}" ] && args+=(--database "$3")
  "$BIN" "${args[@]}" >"$WORK/$1.out" 2>"$WORK/$1.log" &
  PID=$!
  PIDS+=("$PID")
  for _ in $(seq 100); do
    [ -s "$2/admin.token" ] && (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return
    sleep 0.1
  done
  echo "swarm-bench: $1 did not start:" >&2; cat "$WORK/$1.log" >&2; exit 1
}
swarm() { # swarm TOKEN "ws-args" "pid-args"
  # shellcheck disable=SC2086
  "$BIN" swarm $2 --token "$1" --agents "$AGENTS" --heartbeat-secs "$HB" \
    --duration-secs "$DURATION" $3 ${SWARM_EXTRA:-}
}
for mode in $MODES; do
  echo
  echo "### $mode: $AGENTS agents, heartbeat every $HB s, $DURATION s"
  echo
  case $mode in
    sqlite)
      serve sqlite "$WORK/sqlite"
      swarm "$(cat "$WORK/sqlite/admin.token")" "--cloud ws://127.0.0.1:$PORT/agent" "--server-pid $PID"
      kill "$PID";;
    postgres)
      start_pg
      serve postgres "$WORK/postgres" "$(new_db single)"
      swarm "$(cat "$WORK/postgres/admin.token")" "--cloud ws://127.0.0.1:$PORT/agent" "--server-pid $PID"
      kill "$PID";;
    replicas)
      start_pg
      db=$(new_db replicas)
      # Replicas share the database and the data dir (image blobs).
      serve replica-a "$WORK/replicas" "$db"; pa=$PORT; ida=$PID
      serve replica-b "$WORK/replicas" "$db"; pb=$PORT; idb=$PID
      swarm "$(cat "$WORK/replicas/admin.token")" \
        "--cloud ws://127.0.0.1:$pa/agent --cloud ws://127.0.0.1:$pb/agent" \
        "--server-pid $ida --server-pid $idb"
      kill "$ida" "$idb";;
    *) echo "swarm-bench: unknown mode $mode" >&2; exit 2;;
  esac
done
