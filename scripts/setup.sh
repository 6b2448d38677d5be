#!/bin/sh
# Installs what chuted, its tests and its demo need on Debian 12 (as root). Idempotent.
#
# A package is installed when dpkg lacks it *or* when a program we rely on is missing from
# its place, and afterwards every such program is checked: a minimal Debian lacks
# `iptables`, which netavark (Podman's network backend) runs for every container with a
# network but only *suggests*, so without this check the first deploy fails with
# "netavark: No such file or directory".
set -eu
PKGS="podman runc conmon netavark iptables busybox-static iproute2 iperf3 ca-certificates openssl"
# chute-cloud tests and API fuzzing (scripts/fuzz-api.sh: schemathesis in a venv)
PKGS="$PKGS curl python3-venv"
# the web console's browser test (scripts/console-test.sh: Playwright drives Debian's chromium)
PKGS="$PKGS chromium"
# chute-cloud on PostgreSQL: its tests start private clusters (initdb + pg_ctl as the
# `postgres` user the package creates); the package's own cluster is not used.
PKGS="$PKGS postgresql"
# program|package: what Podman and the agent exec, and who ships it. Podman finds conmon
# and netavark in its helper directories, iptables on root's PATH (/usr/sbin).
NEEDED="
/usr/bin/podman|podman
/usr/bin/conmon|conmon
/usr/sbin/runc|runc
/usr/lib/podman/netavark|netavark
/usr/sbin/iptables|iptables
/bin/ip|iproute2
/bin/busybox|busybox-static
/usr/bin/iperf3|iperf3
/usr/bin/openssl|openssl
"
missing=
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
for entry in $NEEDED; do
  [ -x "${entry%%|*}" ] || missing="$missing ${entry#*|}"
done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  apt-get update -qq
  # --reinstall: a package dpkg calls installed whose program was deleted comes back too.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall --no-install-recommends $missing >/dev/null
fi
bad=
for entry in $NEEDED; do
  [ -x "${entry%%|*}" ] || bad="$bad ${entry%%|*} (package ${entry#*|})"
done
if [ -n "$bad" ]; then
  echo "setup: still missing after installing:$bad" >&2
  exit 1
fi
# crun (Debian's default runtime) refuses cgroup-v1 hybrid hosts; runc works. Explicit
# ulimits because the machine's hard nofile limit is below Podman's default. netavark is
# named so Podman never falls back to CNI, whose plugins are not installed.
mkdir -p /etc/containers/containers.conf.d
cat > /etc/containers/containers.conf.d/50-chuted.conf <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
[network]
network_backend = "netavark"
CONF
command -v cargo >/dev/null || { echo "setup: cargo not found; install the Rust toolchain first" >&2; exit 1; }
