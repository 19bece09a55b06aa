#!/usr/bin/env bash
# Install nginx from Debian's packages, for tests/integration/test_scaling_signal.py (nginx in front
# of two real servers) and benchmarks/proxy.py.
#
# Idempotent: does nothing when `nginx` is already on PATH (or in /usr/sbin).
# Safe in containers and CI: no systemd needed, and the package's daemon is never started
# (a temporary policy-rc.d refuses service starts during the install), so port 80 stays free.
# The tests start their own nginx, with their own configuration, on a free port in any case.
#
# Usage: scripts/install-nginx.sh        (as root, or with sudo available)
set -euo pipefail

nginx_binary() {
    command -v nginx 2>/dev/null || echo /usr/sbin/nginx
}
have_nginx() {
    [ -x "$(nginx_binary)" ]
}

if have_nginx; then
    echo "install-nginx: already installed: $("$(nginx_binary)" -v 2>&1)"
    exit 0
fi

# shellcheck source=scripts/apt-common.sh
. "$(dirname "$0")/apt-common.sh"
apt_ready install-nginx "install nginx by hand"

# Debian's maintainer scripts start services through invoke-rc.d / deb-systemd-invoke, which obey
# /usr/sbin/policy-rc.d: exit status 101 means "do not start". Put one in place for the install only,
# unless the machine already has its own (container images usually do).
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, from scripts/install-nginx.sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
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
# nginx-light: the core with the upstream and proxy modules, none of the optional ones.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light

if ! have_nginx; then
    echo "install-nginx: the nginx-light package installed but nginx is not on PATH nor in /usr/sbin" >&2
    exit 1
fi
echo "install-nginx: installed $("$(nginx_binary)" -v 2>&1)"
