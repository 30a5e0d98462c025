#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium is at /usr/bin/chromium (the UI check drives it).
# Installs the `chromium` package with apt-get when it is missing (CI and developers run as root here);
# never downloads a browser build of its own. Prints the executable's path.
set -euo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
        echo "ensure-chromium: $CHROMIUM is missing; install Debian's chromium package (apt-get install chromium)" >&2
        exit 1
    fi
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt/dpkg run may hold the lock: wait for it rather than fail.
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
fi
echo "$CHROMIUM"
