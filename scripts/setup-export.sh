#!/usr/bin/env bash
# Environment for the scripts that make model packages (models/*/make*.py): Debian's CPU
# PyTorch (python3-torch, python3-torchvision) and Fashion-MNIST (dataset-fashion-mnist), plus a
# virtual environment .venv-export that sees them and adds models/requirements-export.txt.
# Only needed to remake models; running pipelines and tests does not need it.
#
#   bash scripts/setup-export.sh && .venv-export/bin/python models/<package>/make.py
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

log() { printf 'setup-export: %s\n' "$*" >&2; }

missing=()
for pkg in python3-torch python3-torchvision python3-venv dataset-fashion-mnist; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-export: run as root, or install: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

VENV=.venv-export
REQ=models/requirements-export.txt
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV (with Debian's system packages)"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)" != "$want" ]; then
    log "installing $REQ"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ"
    echo "$want" >"$VENV/.requirements.sha256"
fi
