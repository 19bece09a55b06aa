# Sourced by scripts/install-*.sh: `apt_ready NAME HINT` checks that apt-get can run and sets SUDO
# for it ("" as root, "sudo" otherwise), or exits with one line naming NAME and what to do (HINT).
apt_ready() {
    local name=$1 hint=$2
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$name: apt-get not found; $hint" >&2
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO="sudo"
        else
            echo "$name: must run as root (or with sudo available)" >&2
            exit 1
        fi
    fi
}
