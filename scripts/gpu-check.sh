#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, install the onnxruntime-gpu wheel and its CUDA
# libraries, build latentflow with CUDA support, run the same pipeline with `device: cpu`
# and `device: cuda`, and print both throughputs. Takes a few minutes; needs no GPU to read.
#
#   bash scripts/gpu-check.sh                 # installs from the package index
#   WHEELS=/path/to/wheels bash scripts/gpu-check.sh   # offline: pip --no-index --find-links
#
# Output: a table on stdout, and target/gpu-check/{cpu,cuda}/metrics.json.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

log() { printf 'gpu-check: %s\n' "$*" >&2; }
die() { printf 'gpu-check: error: %s\n' "$*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this machine has no NVIDIA driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2

bash scripts/setup.sh   # CPU venv: numpy and onnx for the model script

VENV=.venv-gpu
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [ -n "${WHEELS:-}" ]; then
    PIP+=(--no-index --find-links "$WHEELS")
fi
if ! "$VENV/bin/python" -c 'import onnxruntime' 2>/dev/null; then
    log "installing onnxruntime-gpu 1.31.1 with its CUDA and cuDNN libraries"
    "${PIP[@]}" "onnxruntime-gpu[cuda,cudnn]==1.31.1"
fi
SITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
LIB=$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so.* | head -n 1)
[ -f "$LIB" ] || die "libonnxruntime.so not found in $SITE/onnxruntime/capi"
export ORT_DYLIB_PATH=$LIB
# The CUDA provider loads libcudart, libcublas and libcudnn from the nvidia-* wheels.
NV=$(find "$SITE/nvidia" -maxdepth 2 -name lib -type d 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${NV}${LD_LIBRARY_PATH:-}"

log "building with --features cuda"
cargo build --release --features cuda --bin latentflow

MODEL=target/bench-models/conv
if [ ! -f "$MODEL/manifest.json" ]; then
    .venv/bin/python benches/make_model.py
fi

OUT=target/gpu-check
mkdir -p "$OUT"
COUNT=${COUNT:-20000}
for dev in cpu cuda; do
    cat >"$OUT/$dev.yaml" <<YAML
name: gpu-check-$dev
settings: {epoch_size: 256, max_in_flight: 8}
sources:
  - {name: images, kind: synthetic, params: {count: $COUNT, shape: [3, 32, 32], seed: 1}}
stages:
  - {name: net, kind: onnx, params: {model: ../bench-models/conv, device: $dev, max_batch: 256}}
sinks:
  - {name: out, kind: npy, params: {fields: [logits]}}
YAML
    log "running on $dev"
    target/release/latentflow run "$OUT/$dev.yaml" --workers 2 --out "$OUT/$dev" >&2
done
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys, numpy as np
out = sys.argv[1]
m = {d: json.load(open(f"{out}/{d}/metrics.json")) for d in ("cpu", "cuda")}
a, b = (np.load(f"{out}/{d}/logits.npy") for d in ("cpu", "cuda"))
print(f"{'device':<8}{'records':>10}{'seconds':>10}{'records/s':>12}")
for d in ("cpu", "cuda"):
    r, s = m[d]["records_read"], m[d]["wall_seconds"]
    print(f"{d:<8}{r:>10}{s:>10.2f}{r / s:>12.0f}")
print(f"speed-up cuda/cpu: {m['cpu']['wall_seconds'] / m['cuda']['wall_seconds']:.2f}x")
print(f"max |cpu - cuda| over all logits: {np.abs(a - b).max():.2e}")
PY
