#!/bin/bash
# A fresh Debian 12 has no `iptables`, which netavark runs for every container with a
# network. This removes it, runs scripts/setup.sh the way the README's two
# commands do, and checks that setup put it back and that a container with a network
# starts. Root only; it changes the machine's packages, and leaves them installed.
#
#   scripts/tests/fresh-setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/check.sh
checks_begin chuted-fresh-setup

[ "$(id -u)" = 0 ] || { echo "fresh-setup: needs root (it removes and reinstalls packages)" >&2; exit 2; }

for p in iptables; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    # Plain dpkg: it refuses rather than removing what depends on it (nothing does;
    # netavark cannot be removed this way, containers-common needs a network stack).
    DEBIAN_FRONTEND=noninteractive dpkg --remove "$p" >/dev/null
  fi
done
if [ -e /usr/sbin/iptables ]; then bad "iptables removed before setup"; else ok "iptables removed before setup"; fi

check "scripts/setup.sh on a machine without iptables" scripts/setup.sh
check "iptables is installed by setup" test -x /usr/sbin/iptables
check "netavark is installed by setup" test -x /usr/lib/podman/netavark

# What failed on the fresh machine: a container on Podman's default bridge network,
# here the example chute's image (built from busybox-static by its own script).
check "the example image builds" examples/hello-web/build-image.sh
if podman run --rm --network bridge localhost/chuted-hello-web:1 ip -4 addr show eth0 \
     >"$TMP/run.out" 2>&1 && grep -q 'inet 10\.88\.' "$TMP/run.out"; then
  ok "a container on the default bridge network starts and gets a 10.88/16 address"
else
  bad "a container on the default bridge network starts" "$TMP/run.out"
fi
checks_end
