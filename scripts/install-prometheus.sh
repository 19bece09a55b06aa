#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's packages, for tests/integration.
#
# Idempotent: does nothing when both `prometheus` and `promtool` are already on PATH.
# Safe in containers and CI: no systemd needed, and the package's daemon is never started
# (a temporary policy-rc.d refuses service starts during the install), so port 9090 stays free.
# The integration tests start their own Prometheus on a free port in any case.
#
# Usage: scripts/install-prometheus.sh        (as root, or with sudo available)
set -euo pipefail

have_all() {
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1
}

if have_all; then
    echo "install-prometheus: already installed: $(promtool --version 2>&1 | head -n 1)"
    exit 0
fi

# shellcheck source=scripts/apt-common.sh
. "$(dirname "$0")/apt-common.sh"
apt_ready install-prometheus "install Prometheus (prometheus, promtool) by hand"

# Debian's maintainer scripts start services through invoke-rc.d / deb-systemd-invoke, which obey
# /usr/sbin/policy-rc.d: exit status 101 means "do not start". Put one in place for the install only,
# unless the machine already has its own (container images usually do).
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, from scripts/install-prometheus.sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    OWN_POLICY=1
fi
cleanup() {
    if [ "$OWN_POLICY" -eq 1 ]; then
        $SUDO rm -f "$POLICY"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
# --no-install-recommends: no node exporter and friends, only the server and promtool.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus

if ! have_all; then
    echo "install-prometheus: the prometheus package installed but prometheus/promtool are not on PATH" >&2
    exit 1
fi
echo "install-prometheus: installed $(promtool --version 2>&1 | head -n 1)"
