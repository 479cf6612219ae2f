#!/usr/bin/env python3
"""Train and export the digits-mlp model package, reproducibly.

Run from anywhere:  .venv/bin/python models/digits-mlp/make.py

Writes (paths relative to the repository root):
  models/digits-mlp/model.onnx          64 -> 32 (ReLU) -> 10 MLP, opset 17, IR 9
  models/digits-mlp/manifest.json       tensor names, dtypes, shapes, sha256
  models/digits-mlp/reference/          the first 32 test pixels (inputs/pixels.npy) and
                                        ONNX Runtime's (CPU) outputs on them (outputs/*.npy)
  data/digits/test-pixels.npy           float32 [360, 64], raw 0..16 pixel values
  data/digits/test-labels.npy           int64 [360]

Data: scikit-learn's bundled copy of the UCI optical digits test set
(sklearn.datasets.load_digits; ships inside the package, nothing is downloaded).
"""

import os

# Single-threaded BLAS so that the float64 training arithmetic, and with it the
# exported weights, is the same from run to run. Must precede the numpy import.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DATA = ROOT / "data" / "digits"
REF = HERE / "reference"
N_REF = 32  # reference rows kept with the package (tests/models.rs)

SEED = 20240601
N_TEST = 360
HIDDEN = 32
STEPS = 1000  # full-batch Adam steps
LR = 0.01
WEIGHT_DECAY = 1e-3
OPSET = 17
IR_VERSION = 9  # onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.31 refuses
SCALE = np.float32(1.0 / 16.0)  # exact in float32
MIN_ACCURACY = 0.95


def load_split():
    digits = load_digits()
    x = digits.data.astype(np.float32)  # [1797, 64], integers 0..16
    y = digits.target.astype(np.int64)  # [1797]
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert x.min() == 0.0 and x.max() == 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=N_TEST, random_state=SEED, stratify=y
    )
    assert x_tr.shape == (1437, 64) and x_te.shape == (N_TEST, 64)
    return (
        np.ascontiguousarray(x_tr),
        np.ascontiguousarray(y_tr),
        np.ascontiguousarray(x_te),
        np.ascontiguousarray(y_te),
    )


def train(x, y):
    """Full-batch Adam on softmax cross-entropy, float64; returns float32 weights."""
    rng = np.random.default_rng(SEED)
    n, d = x.shape
    xs = x.astype(np.float64) * float(SCALE)
    onehot = np.eye(10)[y]
    params = {
        "w1": rng.normal(0.0, np.sqrt(2.0 / d), (d, HIDDEN)),
        "b1": np.zeros(HIDDEN),
        "w2": rng.normal(0.0, np.sqrt(2.0 / HIDDEN), (HIDDEN, 10)),
        "b2": np.zeros(10),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    for t in range(1, STEPS + 1):
        h_pre = xs @ params["w1"] + params["b1"]
        h = np.maximum(h_pre, 0.0)
        logits = h @ params["w2"] + params["b2"]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g_logits = (p - onehot) / n
        grads = {
            "w2": h.T @ g_logits + WEIGHT_DECAY * params["w2"],
            "b2": g_logits.sum(axis=0),
        }
        g_h = (g_logits @ params["w2"].T) * (h_pre > 0)
        grads["w1"] = xs.T @ g_h + WEIGHT_DECAY * params["w1"]
        grads["b1"] = g_h.sum(axis=0)
        for k in params:
            m[k] = b1_ * m[k] + (1 - b1_) * grads[k]
            v[k] = b2_ * v[k] + (1 - b2_) * grads[k] ** 2
            mhat = m[k] / (1 - b1_**t)
            vhat = v[k] / (1 - b2_**t)
            params[k] -= LR * mhat / (np.sqrt(vhat) + eps)
        if t % 500 == 0:
            loss = -np.log(p[np.arange(n), y] + 1e-12).mean()
            print(f"step {t:5d}  train loss {loss:.4f}", file=sys.stderr)
    return {k: np.ascontiguousarray(p, dtype=np.float32) for k, p in params.items()}


def forward_numpy(w, pixels):
    """The exported graph, in float32 numpy."""
    x = pixels.astype(np.float32) * SCALE
    h = np.maximum(x @ w["w1"] + w["b1"], np.float32(0))
    logits = h @ w["w2"] + w["b2"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, e / e.sum(axis=1, keepdims=True)


def build_onnx(w):
    inits = [
        numpy_helper.from_array(np.array([SCALE], dtype=np.float32), "scale"),
        numpy_helper.from_array(w["w1"], "fc1.weight"),
        numpy_helper.from_array(w["b1"], "fc1.bias"),
        numpy_helper.from_array(w["w2"], "fc2.weight"),
        numpy_helper.from_array(w["b2"], "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Mul", ["pixels", "scale"], ["scaled"], name="scale"),
        helper.make_node("Gemm", ["scaled", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["hidden"], name="relu"),
        helper.make_node("Gemm", ["hidden", "fc2.weight", "fc2.bias"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="latentflow models/digits-mlp/make.py",
        doc_string="8x8 handwritten digit classifier: raw pixels 0..16 -> logits, probs",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def manifest_json(manifest):
    """JSON with one line per tensor entry (readable diffs), ending in a newline."""
    lines = []
    for key, value in manifest.items():
        if key in ("inputs", "outputs"):
            items = ",\n".join("    " + json.dumps(t) for t in value)
            lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    assert json.loads(text) == manifest
    return text


def save_npy(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr, allow_pickle=False)


def main():
    np.seterr(over="raise", divide="raise", invalid="raise", under="ignore")
    x_tr, y_tr, x_te, y_te = load_split()
    w = train(x_tr, y_tr)

    model = build_onnx(w)
    model_path = HERE / "model.onnx"
    model_bytes = model.SerializeToString(deterministic=True)
    model_path.write_bytes(model_bytes)
    sha = hashlib.sha256(model_bytes).hexdigest()

    # ONNX Runtime must agree with the numpy forward pass.
    sess = ort_session(model_path)
    ort_logits, ort_probs = sess.run(["logits", "probs"], {"pixels": x_te})
    np_logits, np_probs = forward_numpy(w, x_te)
    assert ort_logits.dtype == np.float32 and ort_logits.shape == (N_TEST, 10)
    assert ort_probs.dtype == np.float32 and ort_probs.shape == (N_TEST, 10)
    dl = float(np.abs(ort_logits - np_logits).max())
    dp = float(np.abs(ort_probs - np_probs).max())
    assert dl <= 1e-5 and dp <= 1e-5, f"ORT vs numpy mismatch: logits {dl:.3g}, probs {dp:.3g}"
    # The batch axis is dynamic: batch 1 gives the same rows.
    for i in (0, N_TEST - 1):
        one = sess.run(["logits"], {"pixels": x_te[i : i + 1]})[0]
        assert np.abs(one - ort_logits[i : i + 1]).max() <= 1e-5

    train_acc = float((forward_numpy(w, x_tr)[0].argmax(1) == y_tr).mean())
    test_acc = float((ort_logits.argmax(1) == y_te).mean())
    assert test_acc >= MIN_ACCURACY, f"test accuracy {test_acc:.4f} < {MIN_ACCURACY}"

    save_npy(DATA / "test-pixels.npy", x_te.astype(np.float32))
    save_npy(DATA / "test-labels.npy", y_te.astype(np.int64))
    save_npy(REF / "inputs" / "pixels.npy", x_te[:N_REF].astype(np.float32))
    save_npy(REF / "outputs" / "logits.npy", ort_logits[:N_REF])
    save_npy(REF / "outputs" / "probs.npy", ort_probs[:N_REF])

    manifest = {
        "name": "digits-mlp",
        "description": "Two-layer MLP (64 -> 32 ReLU -> 10) that classifies 8x8 "
        "handwritten digit images given as raw pixel values 0..16.",
        "file": "model.onnx",
        "sha256": sha,
        "origin": "Trained from scratch in numpy (full-batch Adam, cross-entropy, "
        f"seed {SEED}) and exported with the onnx helper API (opset {OPSET}, IR "
        f"{IR_VERSION}) by models/digits-mlp/make.py, on a stratified 1437-sample "
        "training split of scikit-learn's bundled digits dataset "
        "(sklearn.datasets.load_digits, a copy of the UCI Optical Recognition of "
        "Handwritten Digits test set); the other 360 samples are data/digits/.",
        "licence": "Model: made in this project from scratch. Data: UCI Optical "
        "Recognition of Handwritten Digits (E. Alpaydin, C. Kaynak, 1998), as "
        "shipped in scikit-learn (BSD-3-Clause); UCI lists the dataset under "
        "CC BY 4.0. See data/digits/README.md.",
        "inputs": [
            {"name": "pixels", "dtype": "f32", "shape": ["batch", 64], "range": [0.0, 16.0]}
        ],
        "outputs": [
            {"name": "logits", "dtype": "f32", "shape": ["batch", 10]},
            {"name": "probs", "dtype": "f32", "shape": ["batch", 10], "range": [0.0, 1.0]},
        ],
    }
    (HERE / "manifest.json").write_text(manifest_json(manifest))

    print(f"train accuracy {train_acc:.4f}")
    print(f"test accuracy  {test_acc:.4f} ({int(round(test_acc * N_TEST))}/{N_TEST})")
    print(f"ORT vs numpy   max |d logits| {dl:.2e}, max |d probs| {dp:.2e}")
    print(f"model.onnx     {len(model_bytes)} bytes, sha256 {sha}")


if __name__ == "__main__":
    main()
