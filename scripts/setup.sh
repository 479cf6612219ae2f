#!/usr/bin/env bash
# Idempotent set-up for a fresh clone of latentflow:
#   - ./.venv           Python virtual environment with scripts/requirements.txt
#   - ./.ort/libonnxruntime.so -> the ONNX Runtime library from the venv's
#                          onnxruntime wheel (opened at run time by `ort`'s
#                          load-dynamic feature)
# Silent when everything is already in place. Works from any directory.
# Environment: PYTHON (interpreter used to create the venv, default python3),
#              ORT_DYLIB_PATH (if it names an existing file, that library is used
#              instead of .ort/libonnxruntime.so).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
VENV=.venv
REQ=scripts/requirements.txt
STAMP=$VENV/.requirements.sha256
ORT_VERSION=1.31.1
ORT_DIR=.ort
ORT_LINK=$ORT_DIR/libonnxruntime.so

[ -f "$REQ" ] || die "$REQ not found"

# Serialise concurrent runs (e.g. several test binaries calling this at once).
mkdir -p "$ORT_DIR"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ORT_DIR/.setup.lock"
    flock 9
fi

# 1. Virtual environment.
if [ ! -x "$VENV/bin/python" ] || ! [ -f "$VENV/pyvenv.cfg" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python 3.11+ or set PYTHON"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "$("$PYTHON" --version 2>&1) is too old; Python 3.11+ is needed (set PYTHON)"
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (on Debian: apt-get install python3-venv)"
fi

# 2. Requirements, reinstalled only when scripts/requirements.txt changes.
want=$(sha256sum "$REQ" | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
    log "installing $REQ into $VENV"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ" \
        || die "pip install -r $REQ failed"
    printf '%s\n' "$want" >"$STAMP"
fi

# 3. The ONNX Runtime shared library.
override=
if [ -n "${ORT_DYLIB_PATH:-}" ]; then
    if [ -f "$ORT_DYLIB_PATH" ]; then
        override=1
        log "ORT_DYLIB_PATH is set: the override $ORT_DYLIB_PATH will be used instead of $ORT_LINK"
    else
        log "warning: ORT_DYLIB_PATH=$ORT_DYLIB_PATH is set but is not a file; unset it to use $ORT_LINK"
    fi
fi

shopt -s nullglob
libs=("$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so."$ORT_VERSION")
shopt -u nullglob
if [ "${#libs[@]}" -eq 0 ]; then
    [ -n "$override" ] && exit 0
    die "libonnxruntime.so.$ORT_VERSION not found under $VENV/lib/python3*/site-packages/onnxruntime/capi/ (is onnxruntime==$ORT_VERSION in $REQ? delete $STAMP to force a reinstall)"
fi
target=../${libs[0]}   # relative to $ORT_DIR
if [ "$(readlink "$ORT_LINK" 2>/dev/null || true)" != "$target" ] || [ ! -e "$ORT_LINK" ]; then
    log "linking $ORT_LINK -> ${libs[0]}"
    ln -sfn "$target" "$ORT_LINK"
fi
[ -f "$ORT_LINK" ] || die "$ORT_LINK does not resolve to a file"
