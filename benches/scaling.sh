#!/usr/bin/env bash
# Scale-out and memory of the inversion pipeline: images per second with 1 and 2 workers
# (encoder, then the domain-regularised optimiser), and peak memory of the encoder and
# generator stages over the 64 embedded faces and over 10 times as many.
#
#   bash benches/scaling.sh            # 32 faces, 30 optimiser steps, 3 interleaved repetitions
#   QUICK=1 bash benches/scaling.sh    # 8 faces, 5 steps, 1 repetition
#
# Prints a table; figures come from each run's metrics.json (wall_seconds, peak_rss_mib).
# Decisions: runs are interleaved (1 worker, 2 workers, again...) so load on a shared machine
# hits both alike, the best repetition is kept, and the journal is off so that only the
# computation is timed.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
bash scripts/setup.sh
cargo build --quiet --release --bin latentflow
LF=target/release/latentflow
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FACES=${QUICK:+8}; FACES=${FACES:-32}
STEPS=${QUICK:+5}; STEPS=${STEPS:-30}
REPS=${QUICK:+1}; REPS=${REPS:-3}
ROOT=$(pwd)

cat >"$WORK/scale.yaml" <<YAML
name: scale
settings: {epoch_size: 8, max_in_flight: 4}
sources:
  - {name: faces, kind: npy, params: {arrays: {image: $ROOT/data/faces/faces.npy}, limit: $FACES}}
stages:
  - {name: encode, kind: invert, params: {encoder: $ROOT/models/face-encoder}}
  - name: refine
    kind: optimize
    params: {generator: $ROOT/models/face-dcgan, encoder: $ROOT/models/face-encoder, steps: $STEPS, device: cpu}
sinks:
  - {name: codes, kind: npy, params: {fields: [z_opt]}}
YAML

field() { .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

best1=1e9; best2=1e9
for rep in $(seq "$REPS"); do
    for w in 1 2; do
        out="$WORK/out$w"
        RUST_LOG=warn "$LF" run "$WORK/scale.yaml" --workers "$w" --out "$out" --no-journal >/dev/null
        s=$(field "$out/metrics.json" wall_seconds)
        if [ "$w" = 1 ]; then best1=$(python3 -c "print(min($best1, $s))"); else best2=$(python3 -c "print(min($best2, $s))"); fi
        echo "  repetition $rep, $w worker(s): ${s}s" >&2
    done
done
cmp "$WORK/out1/z_opt.npy" "$WORK/out2/z_opt.npy" && same=yes || same=no

# Memory: encoder + generator over 64 faces, 640 (the faces tiled 10 times) and 3840 (60
# times). Besides the peak (VmHWM, in metrics.json), the resident size is sampled every 0.2 s;
# the median over the second half of the run shows whether memory grows with the input.
.venv/bin/python -c "
import numpy as np
f = np.load('$ROOT/data/faces/faces.npy')
np.save('$WORK/faces10.npy', np.concatenate([f] * 10))
np.save('$WORK/faces60.npy', np.concatenate([f] * 60))"
mem() {
    cat >"$WORK/mem.yaml" <<YAML
name: mem
settings: {epoch_size: 16, max_in_flight: 2}
sources:
  - {name: faces, kind: npy, params: {arrays: {image: $1}}}
stages:
  - {name: encode, kind: invert, params: {encoder: $ROOT/models/face-encoder, device: cpu}}
  - {name: decode, kind: generate, params: {generator: $ROOT/models/face-dcgan, z: z, image: recon, device: cpu}}
sinks:
  - {name: codes, kind: npy, params: {fields: [z]}}
YAML
    RUST_LOG=warn "$LF" run "$WORK/mem.yaml" --workers 2 --out "$WORK/mem" --no-journal >/dev/null &
    local pid=$! samples=()
    while kill -0 "$pid" 2>/dev/null; do
        r=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        [ -n "$r" ] && samples+=("$r")
        sleep 0.2
    done
    wait "$pid"
    local median
    median=$(printf '%s\n' "${samples[@]}" | python3 -c "
import sys, statistics
s = [int(l) / 1024 for l in sys.stdin if l.strip()]
print(statistics.median(s[len(s) // 2:]) if s else 0)")
    echo "$(field "$WORK/mem/metrics.json" peak_rss_mib)/$median"
}
m1=$(mem "$ROOT/data/faces/faces.npy")
m10=$(mem "$WORK/faces10.npy")
m60=$(mem "$WORK/faces60.npy")

python3 - "$FACES" "$STEPS" "$best1" "$best2" "$same" "$m1" "$m10" "$m60" <<'PY'
import sys
faces, steps, t1, t2, same, m1, m10, m60 = sys.argv[1:]
faces, t1, t2 = int(faces), float(t1), float(t2)
print(f"inversion pipeline, {faces} faces, encoder + {steps} optimiser steps, CPU")
print(f"  1 worker : {t1:7.2f} s  {faces / t1:6.2f} images/s")
print(f"  2 workers: {t2:7.2f} s  {faces / t2:6.2f} images/s")
print(f"  speed-up 2 vs 1 workers: {t1 / t2:.2f}x (goal >= 1.7 on 2 cores); same codes: {same}")
print("memory, encoder + generator, 2 workers (goal: flat over 10x the input)")
print("  faces   peak MiB   median resident MiB, second half of the run")
for n, m in ((64, m1), (640, m10), (3840, m60)):
    peak, median = (float(v) for v in m.split("/"))
    print(f"  {n:5d}   {peak:8.0f}   {median:8.0f}")
PY
