#!/bin/sh
# Installs what chuted, its tests and its demo need on Debian 12 (as root). Idempotent.
set -eu
PKGS="podman runc conmon netavark busybox-static iproute2 iperf3 ca-certificates openssl"
# chute-cloud tests and API fuzzing (scripts/fuzz-api.sh: schemathesis in a venv)
PKGS="$PKGS curl python3-venv"
missing=
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# crun (Debian's default runtime) refuses cgroup-v1 hybrid hosts; runc works. Explicit
# ulimits because the machine's hard nofile limit is below Podman's default.
mkdir -p /etc/containers/containers.conf.d
cat > /etc/containers/containers.conf.d/50-chuted.conf <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
CONF
command -v cargo >/dev/null || { echo "setup: cargo not found; install the Rust toolchain first" >&2; exit 1; }
