#!/usr/bin/env bash
# Install TorchServe 0.12 and torch-model-archiver, for the comparison in benchmarks/torchserve.py.
#
# They go into their own virtualenv (.torchserve-venv at the repo root, git-ignored), never into the
# project's .venv. That venv reuses the project's torch, torchvision, Pillow, numpy, ...: a .pth file
# puts the project venv's site-packages on its path (after its own), and the packages are installed
# with --no-deps, so pip never downloads a second (CUDA) torch. Only PyPI needs to be reachable.
# TorchServe's frontend is Java (11 or newer); Debian's openjdk-17-jre-headless is installed through
# apt when no such `java` is on PATH.
#
# Idempotent: does nothing when the venv already imports TorchServe 0.12 and the archiver.
#
# Usage: scripts/install-torchserve.sh
#   PROJECT_VENV     the project's virtualenv to reuse (default: .venv)
#   TORCHSERVE_VENV  where to create TorchServe's (default: .torchserve-venv)
set -euo pipefail
cd "$(dirname "$0")/.."

project_venv=${PROJECT_VENV:-.venv}
ts_venv=${TORCHSERVE_VENV:-.torchserve-venv}
# captum: TorchServe's stock vision handlers import it. wheel, enum-compat: declared requirements of
# torchserve and the archiver that the project venv lacks (so `pip check` stays clean).
packages=("torchserve==0.12.*" "torch-model-archiver==0.12.*" "captum" "wheel" "enum-compat")

java_major() {
    # `java -version` prints e.g. `openjdk version "17.0.15" 2025-04-15` (or "1.8.0_402" for Java 8).
    local version
    version=$(java -version 2>&1 | sed -n 's/.* version "\([^"]*\)".*/\1/p' | head -n 1)
    version=${version#1.}
    echo "${version%%[.+_-]*}"
}

if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 11 ]; then
    # shellcheck source=scripts/apt-common.sh
    . scripts/apt-common.sh
    apt_ready install-torchserve "install Java 11 or newer by hand (TorchServe's frontend needs it)"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openjdk-17-jre-headless
fi
echo "install-torchserve: java $(java_major) at $(command -v java)"

if [ ! -x "$project_venv/bin/python" ]; then
    echo "install-torchserve: no project venv at $project_venv; run scripts/bootstrap first (or set PROJECT_VENV)" >&2
    exit 1
fi
project_venv=$(cd "$project_venv" && pwd)

ts_ready() {
    [ -x "$ts_venv/bin/torchserve" ] && [ -x "$ts_venv/bin/torch-model-archiver" ] &&
        "$ts_venv/bin/python" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as metadata
import captum.attr, model_archiver, torch, torchvision, ts.torch_handler.image_classifier  # noqa
assert metadata.version("torchserve").startswith("0.12."), metadata.version("torchserve")
EOF
}

if ts_ready; then
    echo "install-torchserve: already installed: torchserve $("$ts_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torchserve"))') in $ts_venv"
    exit 0
fi

if [ ! -x "$ts_venv/bin/python" ]; then
    # `-m venv` from the project's interpreter: same Python version, so its site-packages fit.
    "$project_venv/bin/python" -m venv "$ts_venv"
    # The venv's own (older) setuptools would shadow the project's, which torch asks for.
    "$ts_venv/bin/python" -m pip uninstall --quiet --yes --disable-pip-version-check setuptools
fi
ts_site=$("$ts_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$project_venv/bin/python" -c '
import sysconfig
paths = sysconfig.get_paths()
print(paths["purelib"])
if paths["platlib"] != paths["purelib"]:
    print(paths["platlib"])
' >"$ts_site/resnet-serve-project-venv.pth"

"$ts_venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${packages[@]}"
"$ts_venv/bin/python" -m pip check --disable-pip-version-check >/dev/null ||
    echo "install-torchserve: warning: pip check reports missing requirements (see: $ts_venv/bin/python -m pip check)" >&2

if ! ts_ready; then
    echo "install-torchserve: installed, but $ts_venv cannot import TorchServe 0.12 with the project's torch" >&2
    exit 1
fi
echo "install-torchserve: installed torchserve $("$ts_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torchserve"))')"
echo "install-torchserve:   venv        $(cd "$ts_venv" && pwd) (torchserve, torch-model-archiver in its bin/)"
echo "install-torchserve:   torch from  $project_venv (through $ts_site/resnet-serve-project-venv.pth)"
