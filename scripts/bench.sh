#!/bin/bash
# Agent benchmarks (issue #2 numbers): binary size, agent RSS at 0/10/100 chutes, agent CPU
# over 60 s with 100 chutes sampled every second, and stop/start/restart/deploy latency
# through chuted against the podman CLI doing the same in the same run.
#   usage: sudo scripts/bench.sh [--chutes N] [--cpu-secs S] [--rounds R] [--latency-cpu C]
#                                [--userns BASE]
# --userns BASE runs every chute in its own user namespace (agent config userns_base);
# compare its latency table with a run without it.
# --latency-cpu is the CPU cap (cores) of the chute whose stop/start/restart is timed
# (default 0.5). Under a tight cap the container's own start (runc init, the shell) is
# throttled and dominates both sides: at 0.05 a start takes ~600 ms either way.
set -euo pipefail
cd "$(dirname "$0")/.."
N=100; CPU_SECS=60; ROUNDS=5; LAT_CPU=0.5; USERNS=
usage() { echo "usage: $0 [--chutes N] [--cpu-secs S] [--rounds R] [--latency-cpu C]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || usage
  case "$1" in
    --chutes) N=$2 ;; --cpu-secs) CPU_SECS=$2 ;; --rounds) ROUNDS=$2 ;; --latency-cpu) LAT_CPU=$2 ;;
    --userns) USERNS=$2 ;;
    *) usage ;;
  esac; shift 2
done
LAT_QUOTA=$(awk "BEGIN{printf \"%d\", $LAT_CPU*100000}")
scripts/setup.sh >/dev/null
cargo build --release -q -p chuted
examples/hello-web/build-image.sh >/dev/null
BIN=$PWD/target/release/chuted
W=$(mktemp -d /tmp/chuted-bench.XXXX); chmod 700 "$W"
PS=$W/podman.sock; AS=$W/admin.sock
TAG=b$$
NAMES=()
cleanup() {
  # The agent first: alive, it would (rightly) restart the chutes we remove under it.
  [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null || true
  wait "${AGENT:-0}" 2>/dev/null || true
  for n in "${NAMES[@]}"; do podman rm -f -t 0 "chute-$n" >/dev/null 2>&1 || true; done
  podman rm -f -t 0 "ref-$TAG" >/dev/null 2>&1 || true
  [ -n "${PODMAN:-}" ] && kill "$PODMAN" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
podman system service --time=0 "unix://$PS" & PODMAN=$!
for _ in $(seq 50); do [ -S "$PS" ] && break; sleep 0.1; done
cat > "$W/agent.toml" <<CONF
instance = "bench-$$"
stop_timeout_secs = 5
allow_unpinned_images = true
${USERNS:+userns_base = $USERNS}
[pools]
cpu = 64.0
memory = "8GiB"
pids = 100000
CONF
"$BIN" --admin-socket "$AS" run --state-dir "$W/state" --podman-socket "$PS" --config "$W/agent.toml" --log-level info 2>"$W/agent.log" & AGENT=$!
for _ in $(seq 100); do "$BIN" --admin-socket "$AS" status >/dev/null 2>&1 && break; sleep 0.1; done
C() { "$BIN" --admin-socket "$AS" "$@"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$AGENT/status"; }
now() { date +%s%N; }
# A command that exits promptly on SIGTERM, so stop latency measures the machinery,
# not a stop timeout.
CMD='["sh", "-c", "trap \"exit 0\" TERM; while :; do sleep 0.1; done"]'
mkchute() {
  local n=$1 cpu=${2:-0.05} d=$W/c-$1
  mkdir -p "$d"
  printf 'name = "%s"\nversion = "1"\nimage = "localhost/chuted-hello-web:1"\ncommand = %s\n[resources]\ncpu = %s\nmemory = "8MiB"\npids = 16\n' "$n" "$CMD" "$cpu" > "$d/chute.toml"
  echo "$d"
}

SIZE=$(stat -c %s "$BIN")
echo "release binary (x86_64, stripped): $SIZE bytes ($(awk "BEGIN{printf \"%.2f\", $SIZE/1048576}") MiB)"
echo "agent RSS with 0 chutes: $(rss) KiB"

# --- latency: chuted vs podman CLI, same image, same caps, same command -------------
echo "latency chute: cpu $LAT_CPU, memory 8 MiB, pids 16 (same caps on the podman reference)"
n=lat$TAG; NAMES+=("$n"); d=$(mkchute "$n" "$LAT_CPU")
t0=$(now); C deploy "$d" >/dev/null 2>&1; t1=$(now); DEPLOY_AGENT=$(( (t1-t0)/1000000 ))
t0=$(now); podman run -d --name "ref-$TAG" --memory 8m --memory-swap 8m --cpu-quota "$LAT_QUOTA" --cpu-period 100000 --pids-limit 16 \
  --cap-drop ALL --security-opt no-new-privileges localhost/chuted-hello-web:1 sh -c 'trap "exit 0" TERM; while :; do sleep 0.1; done' >/dev/null; t1=$(now)
DEPLOY_PODMAN=$(( (t1-t0)/1000000 ))
declare -A A P
for op in stop start restart; do A[$op]=0; P[$op]=0; done
for _ in $(seq "$ROUNDS"); do
  for op in stop start restart; do
    [ "$op" = start ] || true
    t0=$(now); C "$op" "$n" >/dev/null || { echo "chuted $op failed; agent log tail:"; tail -5 "$W/agent.log"; exit 1; }; t1=$(now); A[$op]=$(( A[$op] + (t1-t0)/1000000 ))
    t0=$(now); podman "$op" -t 5 "ref-$TAG" >/dev/null 2>&1 || podman "$op" "ref-$TAG" >/dev/null; t1=$(now); P[$op]=$(( P[$op] + (t1-t0)/1000000 ))
  done
done
printf '%-8s %10s %10s %7s\n' op chuted_ms podman_ms ratio
for op in stop start restart; do
  a=$(( A[$op] / ROUNDS )); p=$(( P[$op] / ROUNDS ))
  printf '%-8s %10d %10d %7.2f\n' "$op" "$a" "$p" "$(awk "BEGIN{print $a/($p>0?$p:1)}")"
done
printf '%-8s %10d %10d %7.2f   (deploy = create+start; podman run)\n' deploy "$DEPLOY_AGENT" "$DEPLOY_PODMAN" "$(awk "BEGIN{print $DEPLOY_AGENT/($DEPLOY_PODMAN>0?$DEPLOY_PODMAN:1)}")"

# --- RSS at 10 and N chutes, CPU over CPU_SECS with N chutes ---------------------------
deploy_upto() {
  local target=$1
  while [ "${#NAMES[@]}" -lt "$target" ]; do
    local n=c${#NAMES[@]}$TAG; NAMES+=("$n")
    C deploy "$(mkchute "$n")" >/dev/null 2>&1
  done
}
deploy_upto 10; sleep 2; echo "agent RSS with 10 chutes: $(rss) KiB"
t0=$(now); deploy_upto "$N"; t1=$(now)
echo "deployed $N chutes in $(( (t1-t0)/1000000000 )) s"
sleep 2; echo "agent RSS with $N chutes: $(rss) KiB"
ticks() { awk '{print $14+$15}' "/proc/$AGENT/stat"; }
HZ=$(getconf CLK_TCK)
c0=$(ticks); sleep "$CPU_SECS"; c1=$(ticks)
echo "agent CPU with $N chutes sampled every 1 s over $CPU_SECS s: $(awk "BEGIN{printf \"%.3f\", ($c1-$c0)/$HZ/$CPU_SECS*100}")% of one core"
echo "agent RSS after the CPU run: $(rss) KiB"
echo "chutes running: $(C list --json | python3 -c 'import json,sys; print(sum(1 for c in json.load(sys.stdin) if c["state"]=="running"))')"

# --- after a crash: kill -9, restart, reconcile adopts every chute ----------------------
running() { C list --json | python3 -c 'import json,sys; print(sum(1 for c in json.load(sys.stdin) if c["state"]=="running"))'; }
kill -9 "$AGENT"; wait "$AGENT" 2>/dev/null || true
t0=$(now)
"$BIN" --admin-socket "$AS" run --state-dir "$W/state" --podman-socket "$PS" --config "$W/agent.toml" --log-level info 2>>"$W/agent.log" & AGENT=$!
for _ in $(seq 600); do "$BIN" --admin-socket "$AS" status >/dev/null 2>&1 && break; sleep 0.05; done
t1=$(now)
echo "agent back after kill -9 with $N chutes (reconciled, serving): $(( (t1-t0)/1000000 )) ms"
sleep 2
echo "agent RSS after kill -9 and restart with $N chutes: $(rss) KiB"
echo "chutes running after the restart: $(running) (adopted, not restarted)"
