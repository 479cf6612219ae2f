#!/usr/bin/env python3
"""Run an ONNX model with ONNX Runtime's Python API (CPU) and save its outputs.

Usage:
  ort_reference.py MODEL.onnx OUT_DIR name=path.npy [name=path.npy ...]

Each name=path pair feeds the .npy array at path to the model input `name`
(split at the first '='); every model input must be given exactly once. Each
model output is written to OUT_DIR/<output name>.npy ('/' and '\\' in an
output name become '_'). OUT_DIR is created if missing. One line per output
(name, dtype, shape, file) goes to stdout. Errors: a message on stderr and
exit status 1 (2 for usage errors).

Runs single-threaded with the CPU execution provider, for reproducible
reference values; use the project's venv: .venv/bin/python scripts/ort_reference.py
"""

import sys
from pathlib import Path


def fail(msg, code=1):
    print(f"ort_reference: error: {msg}", file=sys.stderr)
    sys.exit(code)


def usage():
    fail("usage: ort_reference.py MODEL.onnx OUT_DIR name=path.npy [name=path.npy ...]", 2)


def main(argv):
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        usage()
    model_path, out_dir, pairs = Path(argv[0]), Path(argv[1]), argv[2:]

    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        fail(f"{e}; run scripts/setup.sh and use .venv/bin/python")

    if not model_path.is_file():
        fail(f"model not found: {model_path}")

    feeds = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            fail(f"bad input argument {pair!r}: expected name=path.npy", 2)
        if name in feeds:
            fail(f"input {name!r} given more than once")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - report any load failure plainly
            fail(f"cannot load {path!r} for input {name!r}: {e}")

    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        fail(f"cannot load model {model_path}: {e}")

    model_inputs = {i.name: i for i in sess.get_inputs()}
    unknown = sorted(set(feeds) - set(model_inputs))
    missing = sorted(set(model_inputs) - set(feeds))
    if unknown or missing:
        expected = ", ".join(f"{i.name} {i.type} {i.shape}" for i in model_inputs.values())
        parts = []
        if unknown:
            parts.append(f"unknown input(s) {unknown}")
        if missing:
            parts.append(f"missing input(s) {missing}")
        fail(f"{'; '.join(parts)}; the model takes: {expected}")

    output_names = [o.name for o in sess.get_outputs()]
    try:
        results = sess.run(output_names, feeds)
    except Exception as e:  # noqa: BLE001
        got = ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in feeds.items())
        fail(f"inference failed: {e}\n  fed: {got}")

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create {out_dir}: {e}")
    for name, value in zip(output_names, results):
        if not isinstance(value, np.ndarray):
            fail(f"output {name!r} is not a tensor ({type(value).__name__}); only tensor outputs are supported")
        fname = name.replace("/", "_").replace("\\", "_")
        if fname in ("", ".", ".."):
            fname = f"_{fname}"
        path = out_dir / f"{fname}.npy"
        try:
            np.save(path, value, allow_pickle=False)
        except OSError as e:
            fail(f"cannot write {path}: {e}")
        print(f"{name}\t{value.dtype}\t{list(value.shape)}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
