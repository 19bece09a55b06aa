#!/usr/bin/env bash
# Install Debian's Chromium, the browser tests/browser drives through Python playwright.
#
# Playwright's own browser download (`playwright install`) needs the internet; Debian's package
# comes from the same mirror as everything else. The tests find it at /usr/bin/chromium
# (override with RESNET_SERVE_CHROMIUM).
#
# Idempotent: does nothing when `chromium` is already on PATH. Non-interactive, safe in CI.
#
# Usage: scripts/install-chromium.sh        (as root, or with sudo available)
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "install-chromium: already installed: $(chromium --version 2>/dev/null | head -n 1)"
    exit 0
fi

# shellcheck source=scripts/apt-common.sh
. "$(dirname "$0")/apt-common.sh"
apt_ready install-chromium "install Chromium by hand and set RESNET_SERVE_CHROMIUM"

$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
# --no-install-recommends: the browser and the libraries it links, not desktop extras.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

if ! command -v chromium >/dev/null 2>&1; then
    echo "install-chromium: the chromium package installed but chromium is not on PATH" >&2
    exit 1
fi
echo "install-chromium: installed $(chromium --version 2>/dev/null | head -n 1)"
