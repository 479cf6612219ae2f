#!/usr/bin/env python3
"""Make the gradient test fixtures in tests/grad/: one tiny ONNX graph per operator case, with
inputs, a cotangent and two independent references for the vector-Jacobian product.

    bash scripts/setup-export.sh && .venv-export/bin/python scripts/grad_reference.py

For every case in CASES this writes
  tests/grad/<case>.onnx   the float32 graph (opset 17, IR 9), as the Rust tests load it
  tests/grad/<case>.npz    input__<name>   the inputs (float32 or int64)
                           cotangent       the output cotangent (float32)
                           torch__<x>      d<output,cotangent>/dx by PyTorch autograd, float64
                           fd__<x>         the same by central finite differences in float64,
                                           evaluated with onnx's reference evaluator on a float64
                                           copy of the graph
and tests/grad/cases.json lists the cases (output, tensors differentiated against, notes).

The script checks before writing that ONNX Runtime's float32 output matches PyTorch's float64
output for the same inputs (so the PyTorch function really is the ONNX graph), and that the two
references agree to 1e-6. Seeds are fixed; the files are small and committed. CI never runs this.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops._op import OpRunUnaryNum

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "grad"
OPSET = 17
IR = 9
RNG = np.random.default_rng(20240611)


def rnd(*shape, lo=None, away=0.0):
    """Standard normal values; `away` keeps them at least that far from 0 (kinks), `lo` makes
    them positive and at least `lo`."""
    a = RNG.standard_normal(shape)
    if lo is not None:
        a = lo + np.abs(a)
    elif away:
        a = np.sign(a) * (away + np.abs(a))
    return a


def ints(values, shape=None):
    a = np.array(values, dtype=np.int64)
    return a.reshape(shape) if shape is not None else a


class Case:
    """One fixture: nodes, inputs (fed), initializers (constants, some differentiated), the
    output, the tensors differentiated against and the PyTorch function of the same graph."""

    def __init__(self, name, nodes, inputs, inits, output, wrt, torch_fn, dims=None, note="",
                 opset=OPSET):
        self.name, self.nodes, self.inputs, self.inits = name, nodes, inputs, inits
        self.output, self.wrt, self.torch_fn = output, wrt, torch_fn
        self.dims = dims or {}
        self.note = note
        self.opset = opset

    def model(self, float_type):
        np_float = np.float64 if float_type == TensorProto.DOUBLE else np.float32

        def elem(a):
            if a.dtype.kind == "f":
                return float_type
            if a.dtype == np.bool_:
                return TensorProto.BOOL
            return TensorProto.INT64

        def conv(a):
            return a.astype(np_float) if a.dtype.kind == "f" else a

        vis = [
            helper.make_tensor_value_info(n, elem(a), self.dims.get(n, list(a.shape)))
            for n, a in self.inputs.items()
        ]
        inits = [onnx.numpy_helper.from_array(conv(a), n) for n, a in self.inits.items()]
        out = [helper.make_tensor_value_info(self.output, float_type, None)]
        graph = helper.make_graph(self.nodes, self.name, vis, out, inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                              ir_version=IR)
        # Declare the output's shape as ONNX's shape inference sees it (symbolic where the
        # inputs are).
        inferred = onnx.shape_inference.infer_shapes(m)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.name == self.output and vi.type.tensor_type.HasField("shape"):
                m.graph.output[0].type.CopyFrom(vi.type)
        if not m.graph.output[0].type.tensor_type.HasField("shape"):
            rank = self.rank
            m.graph.output[0].type.tensor_type.shape.dim.extend(
                [onnx.TensorShapeProto.Dimension() for _ in range(rank)])
        return m


def node(op, inputs, outputs, name=None, **attrs):
    return helper.make_node(op, inputs, outputs, name=name or f"{op.lower()}_{outputs[0]}", **attrs)


def unary(name, op, fn, x, **attrs):
    return Case(name, [node(op, ["x"], ["y"], **attrs)], {"x": x}, {}, "y", ["x"], lambda t: fn(t["x"]))


def binary(name, op, fn, a, b, a_init=False, b_init=True, dims=None):
    inputs, inits = {}, {}
    (inits if a_init else inputs)["a"] = a
    (inits if b_init else inputs)["b"] = b
    return Case(name, [node(op, ["a", "b"], ["y"])], inputs, inits, "y", ["a", "b"],
                lambda t: fn(t["a"], t["b"]), dims=dims)


def bn(x, s, b, m, v, eps):
    """Inference-mode batch normalisation written out, so autograd reaches the statistics."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    r = lambda a: a.reshape(shape)
    return (x - r(m)) / torch.sqrt(r(v) + eps) * r(s) + r(b)


def cases():
    c = []
    x25 = lambda: rnd(2, 5, away=0.1)

    # Element-wise unary operators.
    c.append(unary("relu", "Relu", torch.relu, x25()))
    c.append(unary("leaky_relu", "LeakyRelu", lambda x: F.leaky_relu(x, 0.2), x25(), alpha=0.2))
    c.append(unary("tanh", "Tanh", torch.tanh, rnd(2, 5)))
    c.append(unary("sigmoid", "Sigmoid", torch.sigmoid, rnd(2, 5)))
    c.append(unary("exp", "Exp", torch.exp, rnd(2, 5)))
    c.append(unary("log", "Log", torch.log, rnd(2, 5, lo=0.2)))
    c.append(unary("sqrt", "Sqrt", torch.sqrt, rnd(2, 5, lo=0.2)))
    c.append(unary("reciprocal", "Reciprocal", torch.reciprocal, rnd(2, 5, away=0.3)))
    c.append(unary("neg", "Neg", torch.neg, rnd(2, 5)))
    c.append(unary("abs", "Abs", torch.abs, x25()))
    c.append(unary("softplus", "Softplus", F.softplus, rnd(2, 5)))
    c.append(unary("softsign", "Softsign", F.softsign, rnd(2, 5)))
    c.append(unary("erf", "Erf", torch.erf, rnd(2, 5)))
    c.append(unary("sin", "Sin", torch.sin, rnd(2, 5)))
    c.append(unary("cos", "Cos", torch.cos, rnd(2, 5)))
    c.append(unary("elu", "Elu", lambda x: F.elu(x, 0.7), x25(), alpha=0.7))
    c.append(unary("selu", "Selu", F.selu, x25()))
    c.append(unary("hard_sigmoid", "HardSigmoid", lambda x: torch.clamp(x * 0.3 + 0.4, 0, 1),
                   rnd(2, 5, away=0.1) * 2, alpha=0.3, beta=0.4))
    c.append(unary("softmax", "Softmax", lambda x: torch.softmax(x, -1), rnd(2, 3, 5), axis=-1))
    c.append(unary("log_softmax", "LogSoftmax", lambda x: torch.log_softmax(x, 1), rnd(2, 3, 5),
                   axis=1))
    c.append(Case("identity_dropout", [node("Identity", ["x"], ["h"]),
                                       node("Dropout", ["h"], ["y"])],
                  {"x": rnd(2, 3)}, {}, "y", ["x"], lambda t: t["x"]))
    c.append(Case("clip", [node("Clip", ["x", "lo", "hi"], ["y"])], {"x": rnd(3, 4, away=0.05)},
                  {"lo": np.array(-0.5), "hi": np.array(0.7)}, "y", ["x"],
                  lambda t: torch.clamp(t["x"], -0.5, 0.7)))

    # Broadcasting binary operators (b is an initializer: a weight gradient too).
    c.append(binary("add_broadcast", "Add", torch.add, rnd(2, 3, 4), rnd(3, 1)))
    c.append(binary("sub_broadcast", "Sub", torch.sub, rnd(2, 3, 4), rnd(4)))
    c.append(binary("mul_broadcast_both", "Mul", torch.mul, rnd(2, 1, 4), rnd(3, 1)))
    c.append(binary("div_broadcast", "Div", torch.div, rnd(2, 3), rnd(1, 3, away=0.5)))
    c.append(binary("pow", "Pow", torch.pow, rnd(2, 3, lo=0.5), rnd(3)))
    c.append(Case("pow_square_sqrt",
                  [node("Pow", ["x", "two"], ["s"], name="square"),
                   node("Pow", ["s", "half"], ["y"], name="root")],
                  {"x": rnd(2, 3, away=0.2)}, {"two": np.array(2.0), "half": np.array(0.5)}, "y",
                  ["x"], lambda t: torch.pow(torch.pow(t["x"], 2.0), 0.5)))
    c.append(binary("add_symbolic_batch", "Add", torch.add, rnd(2, 3, 4), rnd(3, 1),
                    dims={"a": ["batch", 3, 4]}))
    c.append(Case("add_both_inputs_symbolic", [node("Add", ["a", "b"], ["y"])],
                  {"a": rnd(2, 3), "b": rnd(1, 3)}, {}, "y", ["a", "b"],
                  lambda t: t["a"] + t["b"], dims={"a": ["n", 3], "b": ["m", 3]},
                  note="broadcast decided at run time (two different symbolic axes)"))
    c.append(Case("where", [node("Greater", ["a", "b"], ["m"]), node("Where", ["m", "a", "b"], ["y"])],
                  {"a": rnd(3, 4)}, {"b": rnd(4)}, "y", ["a", "b"],
                  lambda t: torch.where(t["a"] > t["b"], t["a"], t["b"].expand(3, 4))))
    c.append(Case("max_min", [node("Max", ["a", "b"], ["m"]), node("Min", ["m", "c"], ["y"])],
                  {"a": rnd(3, 4)}, {"b": rnd(4), "c": rnd(3, 1)}, "y", ["a", "b", "c"],
                  lambda t: torch.minimum(torch.maximum(t["a"], t["b"]), t["c"])))
    c.append(Case("sum_mean", [node("Sum", ["a", "b", "c"], ["s"]), node("Mean", ["s", "a"], ["y"])],
                  {"a": rnd(2, 3)}, {"b": rnd(3), "c": rnd(2, 1)}, "y", ["a", "b", "c"],
                  lambda t: ((t["a"] + t["b"] + t["c"]) + t["a"]) / 2))
    c.append(Case("prelu", [node("PRelu", ["x", "slope"], ["y"])], {"x": rnd(2, 3, 4, 4, away=0.1)},
                  {"slope": rnd(3, 1, 1)}, "y", ["x", "slope"],
                  lambda t: F.prelu(t["x"], t["slope"].reshape(3))))

    # Matrix products.
    c.append(binary("matmul", "MatMul", torch.matmul, rnd(2, 3, 4), rnd(4, 5)))
    c.append(binary("matmul_batch_broadcast", "MatMul", torch.matmul, rnd(2, 1, 3, 4), rnd(3, 4, 5)))
    c.append(binary("matmul_vector_left", "MatMul", torch.matmul, rnd(4), rnd(2, 4, 5), b_init=False))
    c.append(binary("matmul_vector_right", "MatMul", torch.matmul, rnd(2, 3, 4), rnd(4)))
    c.append(Case("gemm_transb", [node("Gemm", ["a", "b", "c"], ["y"], alpha=0.5, beta=2.0, transB=1)],
                  {"a": rnd(3, 4)}, {"b": rnd(5, 4), "c": rnd(5)}, "y", ["a", "b", "c"],
                  lambda t: 0.5 * t["a"] @ t["b"].T + 2.0 * t["c"], dims={"a": ["batch", 4]}))
    c.append(Case("gemm_transa", [node("Gemm", ["a", "b", "c"], ["y"], transA=1)],
                  {"a": rnd(4, 3)}, {"b": rnd(4, 5), "c": rnd(3, 1)}, "y", ["a", "b", "c"],
                  lambda t: t["a"].T @ t["b"] + t["c"]))

    # Convolutions: strides, asymmetric padding, dilation, groups, 1-D, auto_pad.
    def conv_case(name, x, w, b, torch_fn, dims=None, **attrs):
        inputs = ["x", "w"] + (["b"] if b is not None else [])
        inits = {"w": w}
        if b is not None:
            inits["b"] = b
        return Case(name, [node("Conv", inputs, ["y"], **attrs)], {"x": x}, inits, "y",
                    ["x"] + list(inits), lambda t: torch_fn(t, t.get("b")), dims=dims)

    c.append(conv_case(
        "conv_stride_asym_pad", rnd(2, 3, 7, 7), rnd(4, 3, 3, 3), rnd(4),
        lambda t, b: F.conv2d(F.pad(t["x"], (0, 2, 1, 1)), t["w"], b, stride=2),
        strides=[2, 2], pads=[1, 0, 1, 2]))
    c.append(conv_case(
        "conv_dilated", rnd(1, 2, 8, 8), rnd(3, 2, 3, 3), None,
        lambda t, b: F.conv2d(t["x"], t["w"], None, padding=2, dilation=2),
        dilations=[2, 2], pads=[2, 2, 2, 2]))
    c.append(conv_case(
        "conv_groups", rnd(2, 4, 6, 6), rnd(6, 2, 3, 3), rnd(6),
        lambda t, b: F.conv2d(t["x"], t["w"], b, stride=2, padding=1, groups=2),
        dims={"x": ["batch", 4, 6, 6]}, group=2, strides=[2, 2], pads=[1, 1, 1, 1]))
    c.append(conv_case(
        "conv_depthwise_dynamic", rnd(2, 4, 5, 5), rnd(4, 1, 3, 3), None,
        lambda t, b: F.conv2d(t["x"], t["w"], None, padding=1, groups=4),
        dims={"x": ["batch", 4, "h", "w"]}, group=4, pads=[1, 1, 1, 1]))
    c.append(conv_case(
        "conv1d_stride_skips_tail", rnd(2, 3, 9), rnd(2, 3, 4), rnd(2),
        lambda t, b: F.conv1d(t["x"], t["w"], b, stride=3), strides=[3]))
    c.append(conv_case(
        "conv_same_upper", rnd(1, 2, 7, 7), rnd(2, 2, 3, 3), None,
        lambda t, b: F.conv2d(F.pad(t["x"], (1, 1, 1, 1)), t["w"], None, stride=2),
        auto_pad="SAME_UPPER", strides=[2, 2]))

    def convt_case(name, x, w, b, torch_fn, dims=None, **attrs):
        inputs = ["x", "w"] + (["b"] if b is not None else [])
        inits = {"w": w}
        if b is not None:
            inits["b"] = b
        return Case(name, [node("ConvTranspose", inputs, ["y"], **attrs)], {"x": x}, inits, "y",
                    ["x"] + list(inits), lambda t: torch_fn(t, t.get("b")), dims=dims)

    c.append(convt_case(
        "conv_transpose_dcgan", rnd(2, 4, 3, 3), rnd(4, 3, 4, 4), rnd(3),
        lambda t, b: F.conv_transpose2d(t["x"], t["w"], b, stride=2, padding=1),
        dims={"x": ["batch", 4, 3, 3]}, strides=[2, 2], pads=[1, 1, 1, 1]))
    c.append(convt_case(
        "conv_transpose_groups_outpad", rnd(2, 4, 3, 3), rnd(4, 2, 3, 3), None,
        lambda t, b: F.conv_transpose2d(t["x"], t["w"], None, stride=2, padding=1,
                                        output_padding=1, groups=2),
        group=2, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]))
    c.append(convt_case(
        "conv_transpose_dilated", rnd(1, 2, 4, 4), rnd(2, 3, 3, 3), rnd(3),
        lambda t, b: F.conv_transpose2d(t["x"], t["w"], b, dilation=2),
        dilations=[2, 2]))
    c.append(convt_case(
        "conv_transpose_1x1_latent", rnd(3, 5, 1, 1), rnd(5, 4, 4, 4), None,
        lambda t, b: F.conv_transpose2d(t["x"], t["w"], None),
        dims={"x": ["batch", 5, 1, 1]}))

    # Normalisation.
    c.append(Case("batch_norm", [node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                                      epsilon=1e-3)],
                  {"x": rnd(2, 3, 4, 4)},
                  {"s": rnd(3), "b": rnd(3), "m": rnd(3), "v": rnd(3, lo=0.5)}, "y",
                  ["x", "s", "b", "m", "v"],
                  lambda t: bn(t["x"], t["s"], t["b"], t["m"], t["v"], 1e-3)))
    c.append(Case("batch_norm_rank2", [node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
                  {"x": rnd(4, 3)}, {"s": rnd(3), "b": rnd(3), "m": rnd(3), "v": rnd(3, lo=0.5)},
                  "y", ["x", "s", "b"],
                  lambda t: bn(t["x"], t["s"], t["b"], t["m"], t["v"], 1e-5)))
    c.append(Case("instance_norm", [node("InstanceNormalization", ["x", "s", "b"], ["y"])],
                  {"x": rnd(2, 3, 4, 5)}, {"s": rnd(3), "b": rnd(3)}, "y", ["x", "s", "b"],
                  lambda t: F.instance_norm(t["x"], weight=t["s"], bias=t["b"], eps=1e-5)))
    c.append(Case("layer_norm", [node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1)],
                  {"x": rnd(2, 3, 6)}, {"s": rnd(6), "b": rnd(6)}, "y", ["x", "s", "b"],
                  lambda t: F.layer_norm(t["x"], (6,), t["s"], t["b"], 1e-5),
                  dims={"x": ["batch", 3, 6]}))
    c.append(Case("layer_norm_axis1", [node("LayerNormalization", ["x", "s"], ["y"], axis=1)],
                  {"x": rnd(2, 3, 4)}, {"s": rnd(3, 4)}, "y", ["x", "s"],
                  lambda t: F.layer_norm(t["x"], (3, 4), t["s"], None, 1e-5)))

    # Shapes and data movement.
    c.append(Case("reshape_shape_subgraph",
                  [node("Shape", ["x"], ["shp"]),
                   node("Gather", ["shp", "zero"], ["n"], axis=0),
                   node("Unsqueeze", ["n", "zero1"], ["n1"]),
                   node("Concat", ["n1", "minus1"], ["target"], axis=0),
                   node("Reshape", ["x", "target"], ["flat"]),
                   node("MatMul", ["flat", "w"], ["y"])],
                  {"x": rnd(2, 3, 2, 2)},
                  {"zero": np.array(0, dtype=np.int64), "zero1": ints([0]),
                   "minus1": ints([-1]), "w": rnd(12, 4)},
                  "y", ["x", "w"], lambda t: t["x"].reshape(t["x"].shape[0], -1) @ t["w"],
                  dims={"x": ["batch", 3, 2, 2]}, note="a PyTorch-style flatten"))
    c.append(Case("flatten_transpose",
                  [node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                   node("Flatten", ["t"], ["y"], axis=2)],
                  {"x": rnd(2, 3, 4, 5)}, {}, "y", ["x"],
                  lambda t: t["x"].permute(0, 2, 3, 1).reshape(8, 15)))
    c.append(Case("squeeze_unsqueeze",
                  [node("Unsqueeze", ["x", "ax"], ["u"]),
                   node("Mul", ["u", "w"], ["m"]),
                   node("Squeeze", ["m", "ax"], ["y"])],
                  {"x": rnd(2, 3)}, {"ax": ints([1]), "w": rnd(1, 3)}, "y", ["x", "w"],
                  lambda t: (t["x"].unsqueeze(1) * t["w"]).squeeze(1)))
    c.append(Case("expand_tile",
                  [node("Expand", ["x", "shape"], ["e"]),
                   node("Tile", ["e", "reps"], ["y"])],
                  {"x": rnd(3, 1)}, {"shape": ints([2, 3, 4]), "reps": ints([1, 2, 3])}, "y",
                  ["x"], lambda t: t["x"].expand(2, 3, 4).repeat(1, 2, 3)))
    c.append(Case("concat_split",
                  [node("Concat", ["a", "b", "c"], ["cat"], axis=1),
                   node("Split", ["cat", "sizes"], ["s0", "s1", "s2"], axis=1),
                   node("Mul", ["s0", "s2"], ["y"])],
                  {"a": rnd(2, 2, 3)}, {"b": rnd(2, 3, 3), "c": rnd(2, 1, 3),
                                        "sizes": ints([2, 2, 2])}, "y", ["a", "b", "c"],
                  lambda t: (lambda cat: cat[:, 0:2] * cat[:, 4:6])(
                      torch.cat([t["a"], t["b"], t["c"]], 1))))
    c.append(Case("concat_dynamic", [node("Concat", ["a", "b"], ["y"], axis=1)],
                  {"a": rnd(2, 2), "b": rnd(2, 3)}, {}, "y", ["a", "b"],
                  lambda t: torch.cat([t["a"], t["b"]], 1), dims={"a": ["n", "k"], "b": ["n", "m"]}))
    c.append(Case("slice_static", [node("Slice", ["x", "st", "en", "ax"], ["y"])],
                  {"x": rnd(3, 6, 5)}, {"st": ints([1, -4]), "en": ints([3, 100]),
                                        "ax": ints([1, 2])}, "y", ["x"],
                  lambda t: t["x"][:, 1:3, 1:]))
    c.append(Case("slice_steps", [node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
                  {"x": rnd(3, 7, 6)},
                  {"st": ints([0, -1]), "en": ints([7, 0]), "ax": ints([1, 2]), "sp": ints([2, -2])},
                  "y", ["x"], lambda t: torch.flip(t["x"], [2])[:, 0:7:2, 0::2]))
    c.append(Case("slice_dynamic_ends",
                  [node("Shape", ["x"], ["shp"]), node("Slice", ["shp", "one", "two"], ["n"]),
                   node("Slice", ["x", "zero1", "n", "zero1"], ["y"])],
                  {"x": rnd(4, 3)}, {"one": ints([1]), "two": ints([2]), "zero1": ints([0])},
                  "y", ["x"], lambda t: t["x"][:3], dims={"x": ["n", "k"]},
                  note="slice bounds computed at run time"))
    c.append(Case("pad_constant", [node("Pad", ["x", "pads", "v"], ["y"], mode="constant")],
                  {"x": rnd(2, 3, 4)}, {"pads": ints([0, 1, 2, 0, 2, 1]), "v": np.array(0.5)},
                  "y", ["x"], lambda t: F.pad(t["x"], (2, 1, 1, 2), value=0.5)))
    c.append(Case("pad_reflect", [node("Pad", ["x", "pads"], ["y"], mode="reflect")],
                  {"x": rnd(1, 2, 4, 5)}, {"pads": ints([0, 0, 1, 2, 0, 0, 2, 1])}, "y", ["x"],
                  lambda t: F.pad(t["x"], (2, 1, 1, 2), mode="reflect")))
    c.append(Case("pad_edge_negative", [node("Pad", ["x", "pads"], ["y"], mode="edge")],
                  {"x": rnd(2, 3, 5)}, {"pads": ints([0, 2, -1, 0, -1, 3])}, "y", ["x"],
                  lambda t: t["x"][:, [0, 0, 0, 1]][:, :, [1, 2, 3, 4, 4, 4, 4]],
                  note="edge padding with negative pads (crops)"))
    c.append(Case("depth_to_space_space_to_depth",
                  [node("DepthToSpace", ["x"], ["d"], blocksize=2, mode="CRD"),
                   node("Mul", ["d", "w"], ["dw"]),
                   node("SpaceToDepth", ["dw"], ["y"], blocksize=2)],
                  {"x": rnd(2, 8, 2, 3)}, {"w": rnd(2, 4, 6)}, "y", ["x", "w"],
                  lambda t: F.pixel_unshuffle(F.pixel_shuffle(t["x"], 2) * t["w"], 2)
                  .reshape(2, 2, 2, 2, 2, 3).permute(0, 2, 3, 1, 4, 5).reshape(2, 8, 2, 3)))
    c.append(Case("resize_nearest_x2",
                  [node("Resize", ["x", "", "scales"], ["y"], mode="nearest",
                        coordinate_transformation_mode="asymmetric", nearest_mode="floor")],
                  {"x": rnd(2, 3, 3, 4)}, {"scales": np.array([1, 1, 2, 2], dtype=np.float32)},
                  "y", ["x"], lambda t: F.interpolate(t["x"], scale_factor=2, mode="nearest")))
    c.append(Case("resize_nearest_sizes",
                  [node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
                        coordinate_transformation_mode="asymmetric", nearest_mode="floor")],
                  {"x": rnd(1, 2, 3, 4)}, {"sizes": ints([1, 2, 5, 7])},
                  "y", ["x"], lambda t: F.interpolate(t["x"], size=(5, 7), mode="nearest")))
    c.append(Case("resize_nearest_half_pixel",
                  [node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
                        coordinate_transformation_mode="half_pixel",
                        nearest_mode="round_prefer_ceil")],
                  {"x": rnd(2, 2, 4, 3)}, {"sizes": ints([2, 2, 6, 7])},
                  "y", ["x"], lambda t: F.interpolate(t["x"], size=(6, 7), mode="nearest-exact"),
                  dims={"x": ["batch", 2, 4, 3]}))
    c.append(Case("upsample_as_exported",
                  [node("Constant", [], ["scales"], name="scales",
                        value=onnx.numpy_helper.from_array(
                            np.array([1, 1, 2, 2], dtype=np.float32), "scales")),
                   node("Resize", ["x", "", "scales"], ["up"], name="upsample", mode="nearest",
                        coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                   node("Conv", ["up", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                  {"x": rnd(2, 3, 3, 3)}, {"w": rnd(2, 3, 3, 3)}, "y", ["x", "w"],
                  lambda t: F.conv2d(F.interpolate(t["x"], scale_factor=2, mode="nearest"),
                                     t["w"], padding=1),
                  dims={"x": ["batch", 3, 3, 3]},
                  note="nn.Upsample(scale_factor=2) as PyTorch exports it, then a convolution"))

    # Reductions.
    c.append(Case("reduce_mean", [node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=1)],
                  {"x": rnd(2, 3, 4, 5)}, {}, "y", ["x"], lambda t: t["x"].mean((2, 3), keepdim=True),
                  dims={"x": ["batch", 3, "h", "w"]}))
    c.append(Case("reduce_sum_nokeep", [node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
                  {"x": rnd(2, 3, 4)}, {"axes": ints([0, -1])}, "y", ["x"],
                  lambda t: t["x"].sum((0, 2))))
    c.append(Case("reduce_max_min", [node("ReduceMax", ["x"], ["m"], axes=[1], keepdims=0),
                                     node("ReduceMin", ["x"], ["n"], axes=[1], keepdims=1),
                                     node("Unsqueeze", ["m", "one"], ["m1"]),
                                     node("Add", ["m1", "n"], ["y"])],
                  {"x": rnd(2, 5, 3)}, {"one": ints([1])}, "y", ["x"],
                  lambda t: t["x"].amax(1, keepdim=True) + t["x"].amin(1, keepdim=True)))
    c.append(Case("reduce_l2_lse_sq", [node("ReduceL2", ["x"], ["a"], axes=[1]),
                                       node("ReduceLogSumExp", ["x"], ["b"], axes=[1]),
                                       node("ReduceSumSquare", ["x"], ["c"], axes=[0], keepdims=0),
                                       node("Add", ["a", "b"], ["ab"]),
                                       node("Mul", ["ab", "c"], ["y"])],
                  {"x": rnd(3, 4)}, {}, "y", ["x"],
                  lambda t: (t["x"].norm(dim=1, keepdim=True)
                             + torch.logsumexp(t["x"], 1, keepdim=True)) * (t["x"] ** 2).sum(0)))
    c.append(Case("reduce_mean_opset18_axes_input",
                  [node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)],
                  {"x": rnd(2, 3, 4)}, {"axes": ints([1])}, "y", ["x"],
                  lambda t: t["x"].mean(1), dims={"x": ["batch", 3, 4]}, opset=18,
                  note="opset 18 moved ReduceMean's axes to an input"))
    c.append(Case("reduce_mean_all", [node("ReduceMean", ["x"], ["y"], keepdims=0)],
                  {"x": rnd(3, 4)}, {}, "y", ["x"], lambda t: t["x"].mean()))
    c.append(Case("reduce_sum_keep_opset13",
                  [node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
                   node("Squeeze", ["s", "axes"], ["y"])],
                  {"x": rnd(2, 3, 4)}, {"axes": ints([2])}, "y", ["x"],
                  lambda t: t["x"].sum(2), opset=13, note="an opset 13 model"))
    c.append(Case("cumsum", [node("CumSum", ["x", "axis"], ["y"], reverse=1)],
                  {"x": rnd(2, 5)}, {"axis": np.array(1, dtype=np.int64)}, "y", ["x"],
                  lambda t: torch.flip(torch.cumsum(torch.flip(t["x"], [1]), 1), [1])))

    # Indexing, gathering and scattering (GNN message passing).
    c.append(Case("gather_rows_duplicates", [node("Gather", ["emb", "idx"], ["y"], axis=0)],
                  {"idx": ints([[0, 2], [2, 3], [0, 0]])}, {"emb": rnd(4, 3)}, "y", ["emb"],
                  lambda t: t["emb"][torch.tensor([[0, 2], [2, 3], [0, 0]])]))
    c.append(Case("gather_axis1_negative", [node("Gather", ["x", "idx"], ["y"], axis=1)],
                  {"x": rnd(2, 5, 3)}, {"idx": ints([-1, 1, 1])}, "y", ["x"],
                  lambda t: t["x"][:, [4, 1, 1]]))
    c.append(Case("gather_elements", [node("GatherElements", ["x", "idx"], ["y"], axis=1)],
                  {"x": rnd(3, 4)}, {"idx": ints([[0, 0], [3, 1], [2, 2]])}, "y", ["x"],
                  lambda t: torch.gather(t["x"], 1, torch.tensor([[0, 0], [3, 1], [2, 2]]))))
    src, dst = [0, 1, 2, 3, 3, 1], [1, 0, 3, 2, 1, 1]
    c.append(Case("gnn_scatter_add",
                  [node("MatMul", ["x", "w"], ["h"]),
                   node("Gather", ["h", "src"], ["msg"], axis=0),
                   node("Unsqueeze", ["dst", "one"], ["d1"]),
                   node("Expand", ["d1", "eshape"], ["dst_e"]),
                   node("Mul", ["msg", "ew"], ["wmsg"]),
                   node("ScatterElements", ["zeros", "dst_e", "wmsg"], ["agg"], axis=0,
                        reduction="add"),
                   node("Relu", ["agg"], ["y"])],
                  {"x": rnd(4, 3), "ew": rnd(6, 1, lo=0.1)},
                  {"w": rnd(3, 2), "src": ints(src), "dst": ints(dst), "one": ints([1]),
                   "eshape": ints([6, 2]), "zeros": np.zeros((4, 2))},
                  "y", ["x", "ew", "w"],
                  lambda t: torch.relu(torch.zeros(4, 2, dtype=torch.float64).index_add(
                      0, torch.tensor(dst), (t["x"] @ t["w"])[torch.tensor(src)] * t["ew"])),
                  note="x W gathered by source node, scaled by edge weight, scatter-added by target"))
    c.append(Case("scatter_elements_none", [node("ScatterElements", ["d", "idx", "u"], ["y"], axis=1)],
                  {"d": rnd(3, 4), "u": rnd(3, 2)}, {"idx": ints([[0, 2], [1, 3], [3, 0]])}, "y",
                  ["d", "u"],
                  lambda t: t["d"].scatter(1, torch.tensor([[0, 2], [1, 3], [3, 0]]), t["u"])))
    c.append(Case("scatter_nd_add", [node("ScatterND", ["d", "idx", "u"], ["y"], reduction="add")],
                  {"d": rnd(4, 3), "u": rnd(3, 3)}, {"idx": ints([[1], [3], [1]])}, "y", ["d", "u"],
                  lambda t: t["d"].index_add(0, torch.tensor([1, 3, 1]), t["u"])))
    c.append(Case("scatter_elements_add_duplicates",
                  [node("ScatterElements", ["d", "idx", "u"], ["y"], axis=0, reduction="add")],
                  {"d": rnd(4, 3), "u": rnd(5, 3)},
                  {"idx": ints([[0, 1, 2], [3, 3, 3], [0, 0, 1], [1, 2, 0], [0, 1, 2]])}, "y",
                  ["d", "u"],
                  lambda t: t["d"].scatter_add(0, torch.tensor([[0, 1, 2], [3, 3, 3], [0, 0, 1],
                                                                [1, 2, 0], [0, 1, 2]]), t["u"])))
    c.append(Case("constant_folding",
                  [node("Constant", [], ["target"], name="target_shape",
                        value=onnx.numpy_helper.from_array(ints([-1, 6]), "target")),
                   node("Constant", [], ["k"], name="k", value_float=0.5),
                   node("ConstantOfShape", ["six"], ["ones"], name="ones",
                        value=onnx.numpy_helper.from_array(np.array([1.0], dtype=np.float32))),
                   node("Reshape", ["x", "target"], ["r"]),
                   node("Mul", ["r", "k"], ["rk"]),
                   node("Add", ["rk", "ones"], ["y"])],
                  {"x": rnd(2, 3, 2)}, {"six": ints([6])}, "y", ["x"],
                  lambda t: t["x"].reshape(-1, 6) * 0.5 + 1.0,
                  note="Constant and ConstantOfShape nodes feeding the differentiated path"))
    c.append(Case("topk", [node("TopK", ["x", "k"], ["v", "i"], axis=1)],
                  {"x": rnd(2, 6)}, {"k": ints([3])}, "v", ["x"],
                  lambda t: torch.topk(t["x"], 3, 1).values))

    # Pooling.
    c.append(Case("max_pool", [node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                    pads=[1, 1, 1, 1])],
                  {"x": rnd(2, 2, 5, 5)}, {}, "y", ["x"],
                  lambda t: F.max_pool2d(t["x"], 3, 2, 1), dims={"x": ["batch", 2, 5, 5]}))
    c.append(Case("average_pool_exclude_pad",
                  [node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                        pads=[1, 1, 1, 1], count_include_pad=0)],
                  {"x": rnd(2, 2, 5, 6)}, {}, "y", ["x"],
                  lambda t: F.avg_pool2d(t["x"], 3, 2, 1, count_include_pad=False)))
    c.append(Case("average_pool_2x2", [node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2],
                                            strides=[2, 2])],
                  {"x": rnd(1, 3, 4, 4)}, {}, "y", ["x"], lambda t: F.avg_pool2d(t["x"], 2)))
    c.append(Case("global_pools", [node("GlobalAveragePool", ["x"], ["a"]),
                                   node("GlobalMaxPool", ["x"], ["m"]),
                                   node("Add", ["a", "m"], ["y"])],
                  {"x": rnd(2, 3, 4, 4)}, {}, "y", ["x"],
                  lambda t: t["x"].mean((2, 3), keepdim=True) + t["x"].amax((2, 3), keepdim=True),
                  dims={"x": ["batch", 3, "h", "w"]}))

    # Small networks.
    c.append(Case("dcgan_block",
                  [node("ConvTranspose", ["z", "w1"], ["h1"], name="up1"),
                   node("BatchNormalization", ["h1", "s1", "b1", "m1", "v1"], ["n1"], name="bn1"),
                   node("Relu", ["n1"], ["a1"], name="relu1"),
                   node("ConvTranspose", ["a1", "w2"], ["h2"], name="up2", strides=[2, 2],
                        pads=[1, 1, 1, 1]),
                   node("Tanh", ["h2"], ["image"], name="tanh")],
                  {"z": rnd(2, 6, 1, 1)},
                  {"w1": rnd(6, 4, 4, 4) * 0.5, "s1": rnd(4), "b1": rnd(4), "m1": rnd(4) * 0.1,
                   "v1": rnd(4, lo=0.5), "w2": rnd(4, 2, 4, 4) * 0.3},
                  "image", ["z", "w1", "s1", "b1", "w2"],
                  lambda t: torch.tanh(F.conv_transpose2d(torch.relu(F.batch_norm(
                      F.conv_transpose2d(t["z"], t["w1"]), t["m1"], t["v1"], t["s1"], t["b1"],
                      False, 0.0, 1e-5)), t["w2"], stride=2, padding=1)),
                  dims={"z": ["batch", 6, 1, 1]}))
    c.append(Case("encoder_block",
                  [node("Conv", ["x", "w1", "c1"], ["h1"], name="conv1", strides=[2, 2],
                        pads=[1, 1, 1, 1]),
                   node("LeakyRelu", ["h1"], ["a1"], name="lrelu", alpha=0.2),
                   node("Flatten", ["a1"], ["f"], name="flatten"),
                   node("Gemm", ["f", "w2", "c2"], ["z"], name="fc", transB=1)],
                  {"x": rnd(2, 1, 6, 6)},
                  {"w1": rnd(3, 1, 3, 3), "c1": rnd(3), "w2": rnd(4, 27) * 0.3, "c2": rnd(4)},
                  "z", ["x", "w1", "c1", "w2", "c2"],
                  lambda t: F.linear(torch.flatten(F.leaky_relu(
                      F.conv2d(t["x"], t["w1"], t["c1"], 2, 1), 0.2), 1), t["w2"], t["c2"]),
                  dims={"x": ["batch", 1, 6, 6]}))
    c.append(Case("inactive_branch_unsupported_op",
                  [node("Einsum", ["c", "c"], ["cc"], name="einsum_on_constant_path",
                        equation="ij,ij->ij"),
                   node("ArgMax", ["x"], ["am"], name="argmax", axis=1, keepdims=1),
                   node("Cast", ["am"], ["amf"], name="cast", to=TensorProto.FLOAT),
                   node("Relu", ["x"], ["r"]),
                   node("Mul", ["r", "cc"], ["rc"]),
                   node("Add", ["rc", "amf"], ["y"])],
                  {"x": rnd(2, 3, away=0.1), "c": rnd(2, 3)}, {}, "y", ["x"],
                  lambda t: torch.relu(t["x"]) * t["c"] * t["c"]
                  + torch.argmax(t["x"], 1, keepdim=True).double(),
                  note="Einsum has no rule but does not depend on x; ArgMax and Cast carry none"))
    return c


def torch_reference(case, arrays):
    tensors = {}
    for n, a in arrays.items():
        t = torch.tensor(a, dtype=torch.float64 if a.dtype.kind == "f" else None)
        if n in case.wrt:
            t.requires_grad_(True)
        tensors[n] = t
    y = case.torch_fn(tensors)
    return y, tensors


class Erf(OpRunUnaryNum):
    """onnx's reference Erf rounds to float32; finite differences in float64 need better."""

    op_domain = ""

    def _run(self, x):
        import math

        return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)


def evaluator(model):
    return ReferenceEvaluator(model, new_ops=[Erf])


def fd_reference(case, arrays, cot):
    """Central differences in float64 of <cotangent, output> for every element of every tensor
    differentiated against. The forward passes run in onnx's reference evaluator on a float64
    copy of the graph; where the evaluator cannot run the graph (its grouped ConvTranspose is
    broken), PyTorch's float64 forward function is used instead. Returns the gradients and which
    evaluator ran."""
    m64 = case.model(TensorProto.DOUBLE)
    feeds = {n: arrays[n] for n in case.inputs}

    def run_onnx(values):
        mm = onnx.ModelProto()
        mm.CopyFrom(m64)
        for t in mm.graph.initializer:
            if t.name in values and t.name in case.inits:
                t.CopyFrom(onnx.numpy_helper.from_array(values[t.name], t.name))
        return evaluator(mm).run(None, {n: values[n] for n in feeds})[0]

    def run_torch(values):
        with torch.no_grad():
            t = {n: torch.tensor(a) for n, a in values.items()}
            return case.torch_fn(t).numpy()

    try:
        run_onnx(arrays)
        run, source = run_onnx, "onnx-reference"
    except Exception as e:  # noqa: BLE001 - any evaluator failure means: use the fallback
        print(f"  {case.name}: reference evaluator failed ({type(e).__name__}: {e}); "
              "using PyTorch's forward", file=sys.stderr)
        run, source = run_torch, "torch-forward"

    out = {}
    h = 1e-6
    for w in case.wrt:
        base = arrays[w].astype(np.float64)
        g = np.zeros(base.size)
        for i in range(base.size):
            vals = []
            for sign in (1, -1):
                p = base.copy().reshape(-1)
                p[i] += sign * h
                vals.append(run({**arrays, w: p.reshape(base.shape)}))
            g[i] = np.sum(cot * (vals[0] - vals[1])) / (2 * h)
        out[w] = g.reshape(base.shape)
    return out, source


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    for case in cases():
        arrays = {**case.inputs, **case.inits}
        # Float values as the float32 model holds them, so all references see the same point.
        arrays = {n: (a.astype(np.float32).astype(np.float64) if a.dtype.kind == "f" else a)
                  for n, a in arrays.items()}
        case.inputs = {n: arrays[n] for n in case.inputs}
        case.inits = {n: arrays[n] for n in case.inits}
        y, tensors = torch_reference(case, arrays)
        case.rank = y.dim()
        m32 = case.model(TensorProto.FLOAT)
        onnx.checker.check_model(m32)
        sess = ort.InferenceSession(m32.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {n: (a.astype(np.float32) if a.dtype.kind == "f" else a)
                 for n, a in case.inputs.items()}
        y_ort = sess.run([case.output], feeds)[0]
        y_np = y.detach().numpy()
        assert y_np.shape == y_ort.shape, (case.name, y_np.shape, y_ort.shape)
        err = np.abs(y_np - y_ort).max() / max(np.abs(y_np).max(), 1e-6)
        assert err < 1e-5, f"{case.name}: ONNX Runtime and PyTorch disagree ({err:.2e})"

        cot = RNG.standard_normal(y_np.shape).astype(np.float32).astype(np.float64)
        y.backward(torch.tensor(cot))
        torch_grads = {w: tensors[w].grad.numpy() for w in case.wrt}
        fd_grads, fd_source = fd_reference(case, arrays, cot)
        for w in case.wrt:
            t, f = torch_grads[w], fd_grads[w]
            e = np.abs(t - f).max() / max(np.abs(t).max(), 1e-6)
            assert e < 1e-6, f"{case.name}: autograd and finite differences disagree on {w} ({e:.2e})"

        onnx.save(m32, OUT / f"{case.name}.onnx")
        npz = {f"input__{n}": feeds[n] for n in feeds}
        npz["cotangent"] = cot.astype(np.float32)
        for w in case.wrt:
            npz[f"torch__{w}"] = torch_grads[w]
            npz[f"fd__{w}"] = fd_grads[w]
        np.savez(OUT / f"{case.name}.npz", **npz)
        index.append({"name": case.name, "output": case.output, "wrt": case.wrt,
                      "ops": sorted({n.op_type for n in case.nodes}), "fd": fd_source,
                      "note": case.note})
        print(f"{case.name:34s} ok  wrt {', '.join(case.wrt)}", file=sys.stderr)

    # Graphs that must be refused: an operator without a rule on the differentiated path.
    refused = [
        ("refused_einsum", [node("Einsum", ["x", "w"], ["y"], name="mix", equation="ij,jk->ik")],
         "mix", "Einsum"),
        ("refused_resize_linear",
         [node("Resize", ["x", "", "scales"], ["y"], name="upsample", mode="linear")], "upsample",
         "Resize"),
    ]
    for name, nodes, node_name, op in refused:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 2, 2] if op ==
                                                "Resize" else [2, 3])]
        inits = ([onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")]
                 if op == "Resize" else
                 [onnx.numpy_helper.from_array(rnd(3, 4).astype(np.float32), "w")])
        graph = helper.make_graph(nodes, name, inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                 [None] * (4 if op == "Resize" else 2))],
                                  inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)
        onnx.checker.check_model(m)
        onnx.save(m, OUT / f"{name}.onnx")
        index.append({"name": name, "output": "y", "wrt": ["x"], "ops": [op],
                      "refused": {"op": op, "node": node_name}, "note": "must be refused"})
    (OUT / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"{len(index)} cases written to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
