#!/usr/bin/env python3
"""Make the gradient references for the committed model packages: tests/grad/packages/.

    bash scripts/setup-export.sh && .venv-export/bin/python scripts/grad_packages.py

For every package in PACKAGES this runs the package's ONNX graph in PyTorch (float64) with a
small interpreter of the operators the packages use, checks that it gives ONNX Runtime's output
for the same inputs, and writes
  tests/grad/packages/<package>.npz   input__<name>  the inputs (float32 or int64), a few rows
                                      cotangent      a random cotangent for the output (float32)
                                      torch__<k>     the gradient with respect to the k-th tensor
                                                     of `wrt` by PyTorch autograd (float32)
  tests/grad/packages/cases.json      package, output, wrt, and the sha256 of the ONNX file the
                                      references were made from
The interpreter reads the weights from the ONNX file itself, so the references follow the file;
rerun this script when a package's model changes. Seeds are fixed; CI never runs this.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "grad" / "packages"
RNG = np.random.default_rng(20240612)


def attrs(node):
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def as_torch(a):
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return torch.tensor(a, dtype=torch.float64)
    if a.dtype == np.bool_:
        return torch.tensor(a)
    return torch.tensor(a.astype(np.int64))


def unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    for a in sorted(int(a) % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def run_node(node, ins):
    """One ONNX node in PyTorch, for the operators of the committed packages."""
    op, at = node.op_type, attrs(node)
    x = ins[0] if ins else None
    if op == "Constant":
        return [as_torch(numpy_helper.to_array(at["value"]))]
    if op == "Gemm":
        a = x.T if at.get("transA", 0) else x
        b = ins[1].T if at.get("transB", 0) else ins[1]
        y = at.get("alpha", 1.0) * (a @ b)
        if len(ins) > 2 and ins[2] is not None:
            y = y + at.get("beta", 1.0) * ins[2]
        return [y]
    if op == "MatMul":
        return [x @ ins[1]]
    if op in ("Add", "Sub", "Mul", "Div"):
        return [{"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](
            x, ins[1])]
    if op == "Relu":
        return [torch.relu(x)]
    if op == "LeakyRelu":
        return [F.leaky_relu(x, at.get("alpha", 0.01))]
    if op == "Tanh":
        return [torch.tanh(x)]
    if op == "Sqrt":
        return [torch.sqrt(x)]
    if op == "Reciprocal":
        return [1.0 / x]
    if op == "Softmax":
        return [torch.softmax(x, at.get("axis", -1))]
    if op == "Flatten":
        axis = at.get("axis", 1)
        return [x.reshape(int(np.prod(x.shape[:axis])), -1)]
    if op == "Unsqueeze":
        return [unsqueeze(x, ins[1].tolist())]
    if op == "Conv":
        k = len(x.shape) - 2
        assert k == 2 and at.get("auto_pad", "NOTSET") == "NOTSET"
        p = at.get("pads", [0] * 4)
        x = F.pad(x, (p[1], p[3], p[0], p[2]))
        return [F.conv2d(x, ins[1], ins[2] if len(ins) > 2 else None, at.get("strides", 1),
                         0, at.get("dilations", 1), at.get("group", 1))]
    if op == "ConvTranspose":
        p = at.get("pads", [0, 0, 0, 0])
        assert p[0] == p[2] and p[1] == p[3]
        return [F.conv_transpose2d(x, ins[1], ins[2] if len(ins) > 2 else None,
                                   at.get("strides", 1), (p[0], p[1]),
                                   at.get("output_padding", 0), at.get("group", 1),
                                   at.get("dilations", 1))]
    if op == "BatchNormalization":
        assert not at.get("training_mode", 0)
        s, b, m, v = (t.reshape([1, -1] + [1] * (x.dim() - 2)) for t in ins[1:5])
        return [(x - m) / torch.sqrt(v + at.get("epsilon", 1e-5)) * s + b]
    if op == "Resize":
        assert at.get("mode") == "nearest"
        assert at.get("coordinate_transformation_mode") == "asymmetric"
        assert at.get("nearest_mode") == "floor"
        scales = ins[2].tolist()
        assert scales[:2] == [1.0, 1.0]
        return [F.interpolate(x, scale_factor=scales[2:], mode="nearest")]
    if op == "DepthToSpace":
        assert at.get("mode", "DCR") == "CRD"
        return [F.pixel_shuffle(x, at["blocksize"])]
    if op == "Shape":
        return [torch.tensor(list(x.shape), dtype=torch.int64)]
    if op == "Gather":
        axis = at.get("axis", 0)
        return [torch.index_select(x, axis, ins[1].reshape(-1)).reshape(
            x.shape[:axis] + ins[1].shape + x.shape[axis + 1:])]
    if op == "Range":
        return [torch.arange(int(x), int(ins[1]), int(ins[2]), dtype=torch.int64)]
    if op == "Equal":
        return [x == ins[1]]
    if op == "Not":
        return [~x]
    if op == "Compress":
        assert at.get("axis") == 0
        return [x[ins[1]]]
    if op == "Concat":
        return [torch.cat(ins, at.get("axis", 0))]
    if op == "ConstantOfShape":
        value = numpy_helper.to_array(at["value"]).reshape(())
        return [torch.full(ins[0].tolist(), float(value), dtype=torch.float64)]
    if op == "Expand":
        return [x.expand(*ins[1].tolist())]
    if op == "ScatterElements":
        assert at.get("reduction") == "add"
        return [x.scatter_add(at.get("axis", 0), ins[1], ins[2])]
    raise NotImplementedError(f"{op} (node {node.name})")


def run_graph(model, values):
    """Runs the graph on `values` (inputs and initializers by name) and returns every tensor."""
    env = dict(values)
    for node in model.graph.node:
        ins = [env[i] if i else None for i in node.input]
        for name, value in zip(node.output, run_node(node, ins)):
            env[name] = value
    return env


# package, inputs (name -> rows of the package's reference inputs, or an array), output,
# tensors differentiated against.
def gnn_graph():
    n = 7
    x = (RNG.random((n, 1433)) < 0.02).astype(np.float32)
    x[:, :3] = RNG.random((n, 3)).astype(np.float32)
    edges = np.array([[0, 1, 1, 2, 3, 4, 5, 5, 6, 2],
                      [1, 0, 2, 1, 4, 3, 6, 5, 5, 3]], dtype=np.int64)
    return {"x": x, "edge_index": edges}


def reference_rows(package, name, rows=2):
    return np.load(ROOT / "models" / package / "reference" / "inputs" / f"{name}.npy")[:rows]


PACKAGES = [
    ("digits-mlp", lambda: {"pixels": reference_rows("digits-mlp", "pixels")}, "probs",
     ["pixels", "fc1.weight", "fc2.bias"]),
    ("face-dcgan", lambda: {"z": reference_rows("face-dcgan", "z")}, "image",
     ["z", "generator.convTr5.weight", "generator.batchNorm4.weight",
      "generator.batchNorm2.bias"]),
    ("face-encoder", lambda: {"image": reference_rows("face-encoder", "image")}, "z",
     ["image", "blocks.0.0.weight", "head.bias"]),
    ("fashion-ccbn", lambda: {"z": reference_rows("fashion-ccbn", "z"),
                              "y": reference_rows("fashion-ccbn", "y")}, "image",
     ["z", "y", "onnx::MatMul_115", "out.weight"]),
    ("gnn-cora-edgepred", gnn_graph, "h", ["x", "gcn1.bias", "gcn2.bias"]),
]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    only = set(sys.argv[1:])
    for package, make_inputs, output, wrt in PACKAGES:
        if only and package not in only:
            continue
        path = ROOT / "models" / package / "model.onnx"
        if not path.exists():
            print(f"{package}: no model, skipped", file=sys.stderr)
            continue
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        model = onnx.load(path)
        inputs = make_inputs()
        inputs = {n: (a.astype(np.float32) if a.dtype.kind == "f" else a)
                  for n, a in inputs.items()}

        values = {t.name: as_torch(numpy_helper.to_array(t)) for t in model.graph.initializer}
        values.update({n: as_torch(a) for n, a in inputs.items()})
        for w in wrt:
            values[w].requires_grad_(True)
        y = run_graph(model, values)[output]

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        y_ort = sess.run([output], inputs)[0]
        y_np = y.detach().numpy()
        assert y_np.shape == y_ort.shape, (package, y_np.shape, y_ort.shape)
        err = np.abs(y_np - y_ort).max() / max(np.abs(y_np).max(), 1e-6)
        assert err < 1e-4, f"{package}: ONNX Runtime and PyTorch disagree ({err:.2e})"

        cot = RNG.standard_normal(y_np.shape).astype(np.float32)
        y.backward(torch.tensor(cot, dtype=torch.float64))
        npz = {f"input__{n}": a for n, a in inputs.items()}
        npz["cotangent"] = cot
        for k, w in enumerate(wrt):
            npz[f"torch__{k}"] = values[w].grad.numpy().astype(np.float32)
        np.savez(OUT / f"{package}.npz", **npz)
        index.append({"package": package, "output": output, "wrt": wrt, "sha256": sha})
        print(f"{package:20s} ok  output {output}, wrt {', '.join(wrt)} (forward error "
              f"{err:.1e})", file=sys.stderr)

    listing = OUT / "cases.json"
    if only and listing.exists():
        kept = [c for c in json.loads(listing.read_text()) if c["package"] not in only]
        index = sorted(kept + index, key=lambda c: [p[0] for p in PACKAGES].index(c["package"]))
    listing.write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
