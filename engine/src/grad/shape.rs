//! Static element-type and shape inference for the operators the gradient builder meets.
//!
//! The reverse-mode rules need ranks everywhere (a transpose of the last two axes, the axes a
//! reduction keeps) and sizes in a few places (which axes a broadcast operand was stretched
//! along, a transposed convolution's output padding). This module infers them from the graph's
//! declared input types and initializers, op by op, in the spirit of ONNX's own shape
//! inference but much smaller.
//!
//! Decisions:
//! - A dimension is a fixed length, a named symbolic length (`batch`), or unknown. Two equal
//!   symbols are the same length, which is what lets broadcasting between two `batch`-sized
//!   tensors be decided statically. Where a rule needs a length that is symbolic or unknown it
//!   either computes it in the graph at run time (`Shape` nodes) or reports an error naming the
//!   node; inference itself never fails, it only leaves things unknown.
//! - Small integer tensors (shape vectors, axes, starts and ends) also get their element values
//!   propagated, symbolically: `Shape(x)` of an `[batch, 64]` tensor is the value
//!   `[batch, 64]`, and `Concat`, `Gather`, `Unsqueeze`, `Slice`, `Cast` and integer arithmetic
//!   carry such values on. This is the constant folding of the shape subgraphs that exporters
//!   write before `Reshape` and `Expand`; the nodes themselves stay in the graph and run as
//!   they did.
//! - Types declared in the graph (`value_info`, outputs) fill in what inference leaves unknown.

use std::collections::HashMap;

use super::onnx::{
    elem, tensor_floats, tensor_ints, tensor_type, GraphProto, NodeExt, NodeProto, TensorProto,
};

/// Integer values longer than this are not propagated.
const MAX_VALUE_LEN: usize = 1024;

/// One axis length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Dim {
    /// A fixed length.
    Known(i64),
    /// A named symbolic length: equal names are equal lengths.
    Sym(String),
    /// Unknown.
    Unknown,
}

impl Dim {
    /// The fixed length, if known.
    pub(crate) fn known(&self) -> Option<i64> {
        match self {
            Dim::Known(n) => Some(*n),
            _ => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// What is known about one tensor.
#[derive(Clone, Debug, Default)]
pub(crate) struct Info {
    /// Element type (`TensorProto.DataType`), 0 when unknown.
    pub elem: i32,
    /// Axis lengths; `None` when even the rank is unknown.
    pub shape: Option<Vec<Dim>>,
    /// Flattened element values of a small integer tensor, when known.
    pub value: Option<Vec<Dim>>,
    /// Flattened element values of a small float constant, when known.
    pub fvalue: Option<Vec<f64>>,
}

impl Info {
    fn new(elem: i32, shape: Option<Vec<Dim>>) -> Self {
        Info {
            elem,
            shape,
            value: None,
            fvalue: None,
        }
    }

    fn with_value(mut self, value: Option<Vec<Dim>>) -> Self {
        self.value = value;
        self
    }
}

/// Inferred information for every tensor of a graph.
#[derive(Debug, Default)]
pub(crate) struct Shapes {
    map: HashMap<String, Info>,
}

impl Shapes {
    /// Infers types and shapes for every tensor of `graph`.
    pub(crate) fn infer(graph: &GraphProto) -> Self {
        let mut declared: HashMap<String, Info> = HashMap::new();
        for vi in graph
            .input
            .iter()
            .chain(&graph.value_info)
            .chain(&graph.output)
        {
            if let (Some(name), Some(ty)) = (&vi.name, &vi.r#type) {
                if let Some((elem_type, dims)) = tensor_type(ty) {
                    let shape = dims.map(|dims| dims.iter().map(dim_from_proto).collect());
                    declared.insert(name.clone(), Info::new(elem_type, shape));
                }
            }
        }

        let mut shapes = Shapes::default();
        for vi in &graph.input {
            if let Some(name) = &vi.name {
                if let Some(info) = declared.get(name) {
                    shapes.map.insert(name.clone(), info.clone());
                }
            }
        }
        for t in &graph.initializer {
            if let Some(name) = &t.name {
                shapes.map.insert(name.clone(), info_of_tensor(t));
            }
        }
        for node in &graph.node {
            let inputs: Vec<Option<Info>> = node
                .input
                .iter()
                .map(|i| {
                    if i.is_empty() {
                        None
                    } else {
                        shapes.map.get(i).cloned()
                    }
                })
                .collect();
            let mut outputs = infer_node(node, &inputs);
            outputs.resize_with(node.output.len(), Info::default);
            for (name, mut info) in node.output.iter().zip(outputs) {
                if name.is_empty() {
                    continue;
                }
                if let Some(d) = declared.get(name) {
                    merge(&mut info, d);
                }
                shapes.map.insert(name.clone(), info);
            }
        }
        shapes
    }

    /// The element type of `name` (0 when unknown).
    pub(crate) fn elem(&self, name: &str) -> i32 {
        self.map.get(name).map_or(elem::UNDEFINED, |i| i.elem)
    }

    /// The axes of `name`, when its rank is known.
    pub(crate) fn dims(&self, name: &str) -> Option<&[Dim]> {
        self.map.get(name).and_then(|i| i.shape.as_deref())
    }

    /// The rank of `name`, when known.
    pub(crate) fn rank(&self, name: &str) -> Option<usize> {
        self.dims(name).map(<[Dim]>::len)
    }

    /// The integer values of `name`, when all are known.
    pub(crate) fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.map
            .get(name)?
            .value
            .as_ref()?
            .iter()
            .map(Dim::known)
            .collect()
    }

    /// The float values of `name`, when it is a known float constant.
    pub(crate) fn floats(&self, name: &str) -> Option<&[f64]> {
        self.map.get(name)?.fvalue.as_deref()
    }
}

fn dim_from_proto(d: &super::onnx::proto::tensor_shape_proto::Dimension) -> Dim {
    use super::onnx::proto::tensor_shape_proto::dimension::Value;
    match &d.value {
        Some(Value::DimValue(n)) if *n >= 0 => Dim::Known(*n),
        Some(Value::DimParam(s)) if !s.is_empty() => Dim::Sym(s.clone()),
        _ => Dim::Unknown,
    }
}

/// Fills what `info` leaves unknown from a declared type.
fn merge(info: &mut Info, declared: &Info) {
    if info.elem == elem::UNDEFINED {
        info.elem = declared.elem;
    }
    match (&mut info.shape, &declared.shape) {
        (None, Some(d)) => info.shape = Some(d.clone()),
        (Some(s), Some(d)) if s.len() == d.len() => {
            for (a, b) in s.iter_mut().zip(d) {
                if *a == Dim::Unknown {
                    *a = b.clone();
                }
            }
        }
        _ => {}
    }
}

/// Type, shape and (for small constants) values of a constant tensor.
pub(crate) fn info_of_tensor(t: &TensorProto) -> Info {
    let elem_type = t.data_type.unwrap_or(elem::UNDEFINED);
    let shape = Some(t.dims.iter().map(|&d| Dim::Known(d)).collect());
    let n: i64 = t.dims.iter().product();
    let mut info = Info::new(elem_type, shape);
    if n as usize <= MAX_VALUE_LEN {
        info.value = tensor_ints(t).map(|v| v.into_iter().map(Dim::Known).collect());
        info.fvalue = tensor_floats(t);
    }
    info
}

/// Numpy-style broadcasting of two shapes.
pub(crate) fn broadcast(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    let rank = a.len().max(b.len());
    let at = |s: &[Dim], i: usize| -> Dim {
        let pad = rank - s.len();
        if i < pad {
            Dim::Known(1)
        } else {
            s[i - pad].clone()
        }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (Dim::Known(1), d) | (d, Dim::Known(1)) => d,
            (Dim::Known(x), Dim::Known(y)) => Dim::Known(x.max(y)),
            (Dim::Known(n), _) | (_, Dim::Known(n)) => Dim::Known(n),
            (Dim::Sym(x), Dim::Sym(y)) if x == y => Dim::Sym(x),
            _ => Dim::Unknown,
        })
        .collect()
}

/// Product of axis lengths: fixed when all are, a symbol when it is the only factor not 1.
pub(crate) fn product(dims: &[Dim]) -> Dim {
    let mut known = 1i64;
    let mut other: Option<&Dim> = None;
    for d in dims {
        match d {
            Dim::Known(n) => known *= n,
            d if other.is_none() => other = Some(d),
            _ => return Dim::Unknown,
        }
    }
    match other {
        None => Dim::Known(known),
        Some(Dim::Sym(s)) if known == 1 => Dim::Sym(s.clone()),
        _ => Dim::Unknown,
    }
}

/// An axis attribute or value made non-negative for a tensor of `rank`.
pub(crate) fn norm_axis(axis: i64, rank: usize) -> usize {
    if axis < 0 {
        (axis + rank as i64).max(0) as usize
    } else {
        axis as usize
    }
}

fn shape_of(i: &[Option<Info>], k: usize) -> Option<&[Dim]> {
    i.get(k)?.as_ref()?.shape.as_deref()
}

fn info_at(i: &[Option<Info>], k: usize) -> Option<&Info> {
    i.get(k)?.as_ref()
}

fn elem_at(i: &[Option<Info>], k: usize) -> i32 {
    info_at(i, k).map_or(elem::UNDEFINED, |x| x.elem)
}

fn ints_at(i: &[Option<Info>], k: usize) -> Option<Vec<i64>> {
    info_at(i, k)?
        .value
        .as_ref()?
        .iter()
        .map(Dim::known)
        .collect()
}

/// Axes of a reduction-like node: the `axes` attribute or, from the opsets that moved it there,
/// input 1. `Some(vec![])` means "none given".
pub(crate) fn axes_of(node: &NodeProto, ins: &[Option<Info>], input: usize) -> Option<Vec<i64>> {
    if let Some(a) = node.attr_ints("axes") {
        return Some(a.to_vec());
    }
    if node.input_at(input).is_some() {
        return ints_at(ins, input);
    }
    Some(Vec::new())
}

/// Output types and shapes of one node from its inputs'.
fn infer_node(node: &NodeProto, ins: &[Option<Info>]) -> Vec<Info> {
    if node.domain_name() != "" {
        return Vec::new();
    }
    let e0 = elem_at(ins, 0);
    let same = |k: usize| -> Info {
        let mut i = info_at(ins, k).cloned().unwrap_or_default();
        i.value = None;
        i.fvalue = None;
        i
    };
    let s0 = shape_of(ins, 0);
    match node.op() {
        "Identity" => vec![info_at(ins, 0).cloned().unwrap_or_default()],
        "Relu"
        | "LeakyRelu"
        | "Tanh"
        | "Sigmoid"
        | "Neg"
        | "Exp"
        | "Log"
        | "Abs"
        | "Sqrt"
        | "Reciprocal"
        | "Elu"
        | "Selu"
        | "Softplus"
        | "Softsign"
        | "Erf"
        | "Sin"
        | "Cos"
        | "Softmax"
        | "LogSoftmax"
        | "HardSigmoid"
        | "HardSwish"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Sign"
        | "Clip"
        | "CumSum"
        | "LpNormalization"
        | "Celu"
        | "Gelu"
        | "Mish"
        | "ThresholdedRelu"
        | "Shrink"
        | "InstanceNormalization"
        | "LRN"
        | "BatchNormalization"
        | "Tan"
        | "Atan"
        | "Asin"
        | "Acos"
        | "Sinh"
        | "Cosh" => {
            vec![same(0)]
        }
        "Dropout" => vec![same(0), Info::new(elem::BOOL, s0.map(<[Dim]>::to_vec))],
        "Not" | "IsNaN" | "IsInf" => vec![Info::new(elem::BOOL, s0.map(<[Dim]>::to_vec))],
        "Cast" => {
            let to = node.attr_i("to").unwrap_or(0) as i32;
            let mut out = Info::new(to, s0.map(<[Dim]>::to_vec));
            if matches!(to, elem::INT64 | elem::INT32) {
                out.value = info_at(ins, 0).and_then(|i| i.value.clone());
            }
            vec![out]
        }
        "CastLike" => vec![Info::new(elem_at(ins, 1), s0.map(<[Dim]>::to_vec))],
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "PRelu" => {
            let shape = match (s0, shape_of(ins, 1)) {
                (Some(a), Some(b)) => Some(broadcast(a, b)),
                _ => None,
            };
            let value = int_arith(node.op(), info_at(ins, 0), info_at(ins, 1));
            vec![Info::new(e0, shape).with_value(value)]
        }
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" => {
            let shape = match (s0, shape_of(ins, 1)) {
                (Some(a), Some(b)) => Some(broadcast(a, b)),
                _ => None,
            };
            vec![Info::new(elem::BOOL, shape)]
        }
        "Max" | "Min" | "Sum" | "Mean" => {
            let mut shape = s0.map(<[Dim]>::to_vec);
            for k in 1..ins.len() {
                shape = match (shape, shape_of(ins, k)) {
                    (Some(a), Some(b)) => Some(broadcast(&a, b)),
                    _ => None,
                };
            }
            vec![Info::new(e0, shape)]
        }
        "Where" => {
            let shape = match (s0, shape_of(ins, 1), shape_of(ins, 2)) {
                (Some(a), Some(b), Some(c)) => Some(broadcast(&broadcast(a, b), c)),
                _ => None,
            };
            vec![Info::new(elem_at(ins, 1), shape)]
        }
        "MatMul" => vec![Info::new(e0, matmul_shape(s0, shape_of(ins, 1)))],
        "Gemm" => {
            let shape = match (s0, shape_of(ins, 1)) {
                (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => {
                    let m = if node.attr_i("transA").unwrap_or(0) != 0 {
                        &a[1]
                    } else {
                        &a[0]
                    };
                    let n = if node.attr_i("transB").unwrap_or(0) != 0 {
                        &b[0]
                    } else {
                        &b[1]
                    };
                    Some(vec![m.clone(), n.clone()])
                }
                _ => None,
            };
            vec![Info::new(e0, shape)]
        }
        "Conv" | "MaxPool" | "AveragePool" | "LpPool" => {
            let shape = conv_shape(node, s0, shape_of(ins, 1));
            let mut out = vec![Info::new(e0, shape.clone())];
            if node.op() == "MaxPool" {
                out.push(Info::new(elem::INT64, shape));
            }
            out
        }
        "ConvTranspose" => vec![Info::new(
            e0,
            conv_transpose_shape(node, s0, shape_of(ins, 1)),
        )],
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            let shape = s0.map(|s| {
                s.iter()
                    .enumerate()
                    .map(|(k, d)| if k < 2 { d.clone() } else { Dim::Known(1) })
                    .collect()
            });
            vec![Info::new(e0, shape)]
        }
        "LayerNormalization" => {
            let mut out = vec![same(0)];
            let stash = match node.attr_i("stash_type") {
                Some(t) => t as i32,
                None => elem::FLOAT,
            };
            let stat = s0.map(|s| {
                let axis = norm_axis(node.attr_i("axis").unwrap_or(-1), s.len());
                s.iter()
                    .enumerate()
                    .map(|(k, d)| if k < axis { d.clone() } else { Dim::Known(1) })
                    .collect()
            });
            out.push(Info::new(stash, stat.clone()));
            out.push(Info::new(stash, stat));
            out
        }
        "Reshape" => vec![Info::new(e0, reshape_shape(node, s0, info_at(ins, 1)))
            .with_value(info_at(ins, 0).and_then(|i| i.value.clone()))],
        "Flatten" => {
            let shape = s0.map(|s| {
                let axis = norm_axis(node.attr_i("axis").unwrap_or(1), s.len());
                vec![product(&s[..axis]), product(&s[axis..])]
            });
            vec![Info::new(e0, shape)]
        }
        "Transpose" => {
            let shape = s0.map(|s| {
                let perm: Vec<usize> = match node.attr_ints("perm") {
                    Some(p) => p.iter().map(|&k| norm_axis(k, s.len())).collect(),
                    None => (0..s.len()).rev().collect(),
                };
                perm.iter()
                    .map(|&k| s.get(k).cloned().unwrap_or(Dim::Unknown))
                    .collect()
            });
            vec![Info::new(e0, shape)]
        }
        "Squeeze" => {
            let axes = axes_of(node, ins, 1);
            let shape = match (s0, axes) {
                (Some(s), Some(axes)) if !axes.is_empty() => {
                    let axes: Vec<usize> = axes.iter().map(|&a| norm_axis(a, s.len())).collect();
                    Some(
                        s.iter()
                            .enumerate()
                            .filter(|(k, _)| !axes.contains(k))
                            .map(|(_, d)| d.clone())
                            .collect(),
                    )
                }
                (Some(s), Some(_)) if s.iter().all(|d| d.known().is_some()) => {
                    Some(s.iter().filter(|d| **d != Dim::Known(1)).cloned().collect())
                }
                _ => None,
            };
            vec![Info::new(e0, shape).with_value(info_at(ins, 0).and_then(|i| i.value.clone()))]
        }
        "Unsqueeze" => {
            let shape = match (s0, axes_of(node, ins, 1)) {
                (Some(s), Some(axes)) => {
                    let rank = s.len() + axes.len();
                    let axes: Vec<usize> = axes.iter().map(|&a| norm_axis(a, rank)).collect();
                    let mut rest = s.iter();
                    Some(
                        (0..rank)
                            .map(|k| {
                                if axes.contains(&k) {
                                    Dim::Known(1)
                                } else {
                                    rest.next().cloned().unwrap_or(Dim::Unknown)
                                }
                            })
                            .collect(),
                    )
                }
                _ => None,
            };
            vec![Info::new(e0, shape).with_value(info_at(ins, 0).and_then(|i| i.value.clone()))]
        }
        "Concat" => {
            let mut shape: Option<Vec<Dim>> = None;
            let mut ok = true;
            let mut axis = 0;
            for k in 0..ins.len() {
                let Some(s) = shape_of(ins, k) else {
                    ok = false;
                    break;
                };
                axis = norm_axis(node.attr_i("axis").unwrap_or(0), s.len());
                shape = Some(match shape.take() {
                    None => s.to_vec(),
                    Some(mut acc) => {
                        if acc.len() != s.len() || axis >= s.len() {
                            ok = false;
                            break;
                        }
                        acc[axis] = match (&acc[axis], &s[axis]) {
                            (Dim::Known(a), Dim::Known(b)) => Dim::Known(a + b),
                            _ => Dim::Unknown,
                        };
                        for (j, d) in s.iter().enumerate() {
                            if j != axis && acc[j] == Dim::Unknown {
                                acc[j] = d.clone();
                            }
                        }
                        acc
                    }
                });
            }
            let _ = axis;
            let value = ins
                .iter()
                .map(|i| i.as_ref().and_then(|i| i.value.clone()))
                .collect::<Option<Vec<_>>>()
                .map(|parts| parts.concat())
                .filter(|_| shape.as_ref().is_some_and(|s| s.len() == 1));
            vec![Info::new(e0, if ok { shape } else { None }).with_value(value)]
        }
        "Shape" => {
            let dims = s0.map(|s| {
                let r = s.len() as i64;
                let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let start = clamp(node.attr_i("start").unwrap_or(0));
                let end = clamp(node.attr_i("end").unwrap_or(r));
                s[start..end.max(start)].to_vec()
            });
            let len = match &dims {
                Some(d) => Dim::Known(d.len() as i64),
                None => Dim::Unknown,
            };
            vec![Info::new(elem::INT64, Some(vec![len])).with_value(dims)]
        }
        "Size" => {
            let value = s0.map(|s| vec![product(s)]);
            vec![Info::new(elem::INT64, Some(vec![])).with_value(value)]
        }
        "Constant" => vec![constant_info(node)],
        "ConstantOfShape" => {
            let elem_type = node
                .attr_t("value")
                .and_then(|t| t.data_type)
                .unwrap_or(elem::FLOAT);
            let shape = info_at(ins, 0).and_then(|i| {
                i.value.clone().or_else(|| {
                    let len = i.shape.as_ref()?.first()?.known()?;
                    Some(vec![Dim::Unknown; len as usize])
                })
            });
            vec![Info::new(elem_type, shape)]
        }
        "Range" => vec![Info::new(e0, Some(vec![Dim::Unknown]))],
        "Gather" => {
            let shape = match (s0, shape_of(ins, 1)) {
                (Some(d), Some(i)) if !d.is_empty() => {
                    let axis = norm_axis(node.attr_i("axis").unwrap_or(0), d.len());
                    let mut s = d[..axis].to_vec();
                    s.extend_from_slice(i);
                    s.extend_from_slice(d.get(axis + 1..).unwrap_or_default());
                    Some(s)
                }
                _ => None,
            };
            let value = match (
                info_at(ins, 0).and_then(|i| i.value.as_ref()),
                ints_at(ins, 1),
                s0,
            ) {
                (Some(v), Some(idx), Some(d)) if d.len() == 1 => idx
                    .iter()
                    .map(|&k| {
                        let k = if k < 0 { k + v.len() as i64 } else { k };
                        v.get(k as usize).cloned()
                    })
                    .collect(),
                _ => None,
            };
            vec![Info::new(e0, shape).with_value(value)]
        }
        "GatherElements" => vec![Info::new(e0, shape_of(ins, 1).map(<[Dim]>::to_vec))],
        "GatherND" => vec![Info::new(e0, None)],
        "ScatterElements" | "ScatterND" | "Scatter" => vec![same(0)],
        "Expand" => {
            let shape = match (s0, info_at(ins, 1)) {
                (Some(s), Some(i)) => match &i.value {
                    Some(v) => Some(broadcast(s, v)),
                    None => i
                        .shape
                        .as_ref()
                        .and_then(|t| t.first()?.known())
                        .map(|len| vec![Dim::Unknown; (len as usize).max(s.len())]),
                },
                _ => None,
            };
            vec![Info::new(e0, shape)]
        }
        "Tile" => {
            let shape = match (s0, ints_at(ins, 1)) {
                (Some(s), Some(r)) if r.len() == s.len() => Some(
                    s.iter()
                        .zip(&r)
                        .map(|(d, &k)| match d {
                            Dim::Known(n) => Dim::Known(n * k),
                            d if k == 1 => d.clone(),
                            _ => Dim::Unknown,
                        })
                        .collect(),
                ),
                (Some(s), _) => Some(vec![Dim::Unknown; s.len()]),
                _ => None,
            };
            vec![Info::new(e0, shape)]
        }
        "Pad" => {
            let shape = s0.map(|s| {
                let r = s.len();
                let axes: Vec<usize> = match node.input_at(3) {
                    Some(_) => match ints_at(ins, 3) {
                        Some(a) => a.iter().map(|&a| norm_axis(a, r)).collect(),
                        None => return vec![Dim::Unknown; r],
                    },
                    None => (0..r).collect(),
                };
                let pads = node
                    .attr_ints("pads")
                    .map(<[i64]>::to_vec)
                    .or_else(|| ints_at(ins, 1));
                match pads {
                    Some(p) if p.len() == 2 * axes.len() => {
                        let mut out = s.to_vec();
                        for (k, &a) in axes.iter().enumerate() {
                            out[a] = match &s[a] {
                                Dim::Known(n) => Dim::Known(n + p[k] + p[k + axes.len()]),
                                d if p[k] == 0 && p[k + axes.len()] == 0 => d.clone(),
                                _ => Dim::Unknown,
                            };
                        }
                        out
                    }
                    _ => vec![Dim::Unknown; r],
                }
            });
            vec![Info::new(e0, shape)]
        }
        "Slice" => {
            let value = info_at(ins, 0).and_then(|i| i.value.clone());
            let (shape, value) = slice_shape(node, s0, ins, value);
            vec![Info::new(e0, shape).with_value(value)]
        }
        "Split" => split_shapes(node, s0, ins)
            .into_iter()
            .map(|s| Info::new(e0, s))
            .collect(),
        "Resize" | "Upsample" => vec![Info::new(e0, resize_shape(node, s0, ins))],
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
        | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" | "ArgMax"
        | "ArgMin" => {
            let arg = node.op().starts_with("Arg");
            let axes = if arg {
                Some(vec![node.attr_i("axis").unwrap_or(0)])
            } else {
                axes_of(node, ins, 1)
            };
            let keep = node.attr_i("keepdims").unwrap_or(1) != 0;
            let noop = node.attr_i("noop_with_empty_axes").unwrap_or(0) != 0;
            let shape = match (s0, axes) {
                (Some(s), Some(axes)) => {
                    let all = axes.is_empty() && !noop;
                    let axes: Vec<usize> = axes.iter().map(|&a| norm_axis(a, s.len())).collect();
                    Some(
                        s.iter()
                            .enumerate()
                            .filter_map(|(k, d)| {
                                if all || axes.contains(&k) {
                                    keep.then_some(Dim::Known(1))
                                } else {
                                    Some(d.clone())
                                }
                            })
                            .collect(),
                    )
                }
                _ => None,
            };
            vec![Info::new(if arg { elem::INT64 } else { e0 }, shape)]
        }
        "TopK" => {
            let shape = s0.map(|s| {
                let axis = norm_axis(node.attr_i("axis").unwrap_or(-1), s.len());
                let mut out = s.to_vec();
                if axis < out.len() {
                    out[axis] = match ints_at(ins, 1) {
                        Some(k) if k.len() == 1 => Dim::Known(k[0]),
                        _ => Dim::Unknown,
                    };
                }
                out
            });
            vec![Info::new(e0, shape.clone()), Info::new(elem::INT64, shape)]
        }
        "DepthToSpace" | "SpaceToDepth" => {
            let b = node.attr_i("blocksize").unwrap_or(1);
            let shape = s0.filter(|s| s.len() == 4).map(|s| {
                let (c, f) = if node.op() == "DepthToSpace" {
                    (s[1].known().map(|c| c / (b * b)), b)
                } else {
                    (s[1].known().map(|c| c * b * b), -1)
                };
                let scale = |d: &Dim| match d.known() {
                    Some(n) if f > 0 => Dim::Known(n * f),
                    Some(n) => Dim::Known(n / b),
                    None => Dim::Unknown,
                };
                vec![
                    s[0].clone(),
                    c.map_or(Dim::Unknown, Dim::Known),
                    scale(&s[2]),
                    scale(&s[3]),
                ]
            });
            vec![Info::new(e0, shape)]
        }
        "NonZero" => {
            let shape = s0.map(|s| vec![Dim::Known(s.len() as i64), Dim::Unknown]);
            vec![Info::new(elem::INT64, shape)]
        }
        _ => Vec::new(),
    }
}

/// The output of a `Constant` node.
fn constant_info(node: &NodeProto) -> Info {
    if let Some(t) = node.attr_t("value") {
        return info_of_tensor(t);
    }
    if let Some(v) = node.attr_i("value_int") {
        let mut i = Info::new(elem::INT64, Some(vec![]));
        i.value = Some(vec![Dim::Known(v)]);
        return i;
    }
    if let Some(v) = node.attr_ints("value_ints") {
        let mut i = Info::new(elem::INT64, Some(vec![Dim::Known(v.len() as i64)]));
        i.value = Some(v.iter().map(|&x| Dim::Known(x)).collect());
        return i;
    }
    if let Some(v) = node.attr_f("value_float") {
        let mut i = Info::new(elem::FLOAT, Some(vec![]));
        i.fvalue = Some(vec![v as f64]);
        return i;
    }
    if let Some(a) = node.attr("value_floats") {
        let mut i = Info::new(elem::FLOAT, Some(vec![Dim::Known(a.floats.len() as i64)]));
        i.fvalue = Some(a.floats.iter().map(|&x| x as f64).collect());
        return i;
    }
    Info::default()
}

/// Element-wise integer arithmetic on propagated values (shape computations).
fn int_arith(op: &str, a: Option<&Info>, b: Option<&Info>) -> Option<Vec<Dim>> {
    let (a, b) = (a?.value.as_ref()?, b?.value.as_ref()?);
    let n = a.len().max(b.len());
    if (a.len() != n && a.len() != 1) || (b.len() != n && b.len() != 1) {
        return None;
    }
    let get = |v: &Vec<Dim>, k: usize| v[if v.len() == 1 { 0 } else { k }].clone();
    Some(
        (0..n)
            .map(|k| match (op, get(a, k), get(b, k)) {
                ("Add", Dim::Known(x), Dim::Known(y)) => Dim::Known(x + y),
                ("Sub", Dim::Known(x), Dim::Known(y)) => Dim::Known(x - y),
                ("Mul", Dim::Known(x), Dim::Known(y)) => Dim::Known(x * y),
                ("Div", Dim::Known(x), Dim::Known(y)) if y != 0 => Dim::Known(x / y),
                ("Add" | "Sub", d, Dim::Known(0)) => d,
                ("Mul" | "Div", d, Dim::Known(1)) => d,
                ("Mul", Dim::Known(1), d) | ("Add", Dim::Known(0), d) => d,
                _ => Dim::Unknown,
            })
            .collect(),
    )
}

fn matmul_shape(a: Option<&[Dim]>, b: Option<&[Dim]>) -> Option<Vec<Dim>> {
    let (a, b) = (a?, b?);
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![Dim::Known(1), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0].clone(), Dim::Known(1)]
    } else {
        b.to_vec()
    };
    let batch = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let mut out = batch;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    Some(out)
}

/// Explicit begin and end paddings of a convolution or pooling node over `spatial` axes, given
/// its input lengths where needed (`auto_pad`).
pub(crate) fn conv_pads(
    node: &NodeProto,
    input: &[Dim],
    kernel: &[i64],
    transpose: bool,
) -> Option<Vec<i64>> {
    let k = kernel.len();
    let strides = node
        .attr_ints("strides")
        .map_or(vec![1; k], <[i64]>::to_vec);
    let dil = node
        .attr_ints("dilations")
        .map_or(vec![1; k], <[i64]>::to_vec);
    match node.attr_s("auto_pad").unwrap_or("NOTSET") {
        "NOTSET" | "" => Some(
            node.attr_ints("pads")
                .map_or(vec![0; 2 * k], <[i64]>::to_vec),
        ),
        "VALID" => Some(vec![0; 2 * k]),
        mode @ ("SAME_UPPER" | "SAME_LOWER") => {
            let mut pads = vec![0; 2 * k];
            for i in 0..k {
                let eff = (kernel[i] - 1) * dil[i] + 1;
                if transpose {
                    // ONNX and ONNX Runtime have disagreed over which side gets the odd
                    // padding of a transposed convolution; refuse rather than guess.
                    return None;
                }
                let n = input.get(2 + i)?.known()?;
                let out = (n + strides[i] - 1) / strides[i];
                let total = ((out - 1) * strides[i] + eff - n).max(0);
                let (small, big) = (total / 2, total - total / 2);
                if mode == "SAME_UPPER" {
                    pads[i] = small;
                    pads[i + k] = big;
                } else {
                    pads[i] = big;
                    pads[i + k] = small;
                }
            }
            Some(pads)
        }
        _ => None,
    }
}

/// Spatial kernel lengths of a convolution or pooling node.
pub(crate) fn kernel_of(node: &NodeProto, weight: Option<&[Dim]>) -> Option<Vec<i64>> {
    if let Some(k) = node.attr_ints("kernel_shape") {
        return Some(k.to_vec());
    }
    weight?.get(2..)?.iter().map(Dim::known).collect()
}

fn conv_shape(node: &NodeProto, x: Option<&[Dim]>, w: Option<&[Dim]>) -> Option<Vec<Dim>> {
    let x = x?;
    if x.len() < 3 {
        return None;
    }
    let k = x.len() - 2;
    let channels = if node.op() == "Conv" {
        w.and_then(|w| w.first().cloned()).unwrap_or(Dim::Unknown)
    } else {
        x[1].clone()
    };
    let mut out = vec![x[0].clone(), channels];
    let kernel = kernel_of(node, if node.op() == "Conv" { w } else { None });
    let strides = node
        .attr_ints("strides")
        .map_or(vec![1; k], <[i64]>::to_vec);
    let dil = node
        .attr_ints("dilations")
        .map_or(vec![1; k], <[i64]>::to_vec);
    let ceil = node.attr_i("ceil_mode").unwrap_or(0) != 0;
    let pads = kernel
        .as_ref()
        .and_then(|kern| conv_pads(node, x, kern, false));
    for i in 0..k {
        let d = match (&x[2 + i], &kernel, &pads) {
            (Dim::Known(n), Some(kern), Some(p)) => {
                let eff = (kern[i] - 1) * dil[i] + 1;
                let span = n + p[i] + p[i + k] - eff;
                if span < 0 {
                    Dim::Unknown
                } else if ceil {
                    let mut o = (span + strides[i] - 1) / strides[i] + 1;
                    // The last window must start inside the input or its begin padding.
                    if (o - 1) * strides[i] >= n + p[i] {
                        o -= 1;
                    }
                    Dim::Known(o)
                } else {
                    Dim::Known(span / strides[i] + 1)
                }
            }
            _ => Dim::Unknown,
        };
        out.push(d);
    }
    Some(out)
}

fn conv_transpose_shape(
    node: &NodeProto,
    x: Option<&[Dim]>,
    w: Option<&[Dim]>,
) -> Option<Vec<Dim>> {
    let x = x?;
    if x.len() < 3 {
        return None;
    }
    let k = x.len() - 2;
    let group = node.attr_i("group").unwrap_or(1);
    let channels = match w.and_then(|w| w.get(1)) {
        Some(Dim::Known(c)) => Dim::Known(c * group),
        _ => Dim::Unknown,
    };
    let mut out = vec![x[0].clone(), channels];
    if let Some(shape) = node.attr_ints("output_shape") {
        out.extend(shape.iter().rev().take(k).rev().map(|&n| Dim::Known(n)));
        return Some(out);
    }
    let kernel = kernel_of(node, w);
    let strides = node
        .attr_ints("strides")
        .map_or(vec![1; k], <[i64]>::to_vec);
    let dil = node
        .attr_ints("dilations")
        .map_or(vec![1; k], <[i64]>::to_vec);
    let opad = node
        .attr_ints("output_padding")
        .map_or(vec![0; k], <[i64]>::to_vec);
    let auto = node.attr_s("auto_pad").unwrap_or("NOTSET");
    let pads = node
        .attr_ints("pads")
        .map_or(vec![0; 2 * k], <[i64]>::to_vec);
    for i in 0..k {
        let d = match (&x[2 + i], &kernel) {
            (Dim::Known(n), _) if auto.starts_with("SAME") => Dim::Known(n * strides[i]),
            (Dim::Known(n), Some(kern)) => {
                let eff = (kern[i] - 1) * dil[i] + 1;
                let (pb, pe) = if auto == "VALID" {
                    (0, 0)
                } else {
                    (pads[i], pads[i + k])
                };
                Dim::Known(strides[i] * (n - 1) + opad[i] + eff - pb - pe)
            }
            _ => Dim::Unknown,
        };
        out.push(d);
    }
    Some(out)
}

fn reshape_shape(node: &NodeProto, x: Option<&[Dim]>, target: Option<&Info>) -> Option<Vec<Dim>> {
    let target = target?;
    let Some(value) = &target.value else {
        let len = target.shape.as_ref()?.first()?.known()?;
        return Some(vec![Dim::Unknown; len as usize]);
    };
    let allowzero = node.attr_i("allowzero").unwrap_or(0) != 0;
    let mut out: Vec<Dim> = value
        .iter()
        .enumerate()
        .map(|(k, d)| match d {
            Dim::Known(0) if !allowzero => {
                x.and_then(|x| x.get(k).cloned()).unwrap_or(Dim::Unknown)
            }
            d => d.clone(),
        })
        .collect();
    if let Some(at) = out.iter().position(|d| *d == Dim::Known(-1)) {
        out[at] = Dim::Unknown;
        if let Some(x) = x {
            let total = product(x);
            let others: Vec<Dim> = out
                .iter()
                .enumerate()
                .filter(|(k, _)| *k != at)
                .map(|(_, d)| d.clone())
                .collect();
            let rest = product(&others);
            out[at] = match (&total, &rest) {
                (Dim::Known(t), Dim::Known(r)) if *r > 0 => Dim::Known(t / r),
                (Dim::Sym(t), Dim::Known(1)) => Dim::Sym(t.clone()),
                (t, r) if t == r && *t != Dim::Unknown => Dim::Known(1),
                _ => {
                    // [batch, 8, 4] reshaped to [batch, -1]: the symbols cancel.
                    let mut xs: Vec<Dim> = x.to_vec();
                    let mut leftover = Vec::new();
                    for d in others {
                        if let Some(p) = xs.iter().position(|e| *e == d) {
                            xs.remove(p);
                        } else {
                            leftover.push(d);
                        }
                    }
                    if leftover.is_empty() {
                        product(&xs)
                    } else {
                        Dim::Unknown
                    }
                }
            };
        }
    }
    Some(out)
}

/// Start, end and step of a slice along one axis of length `n`, clamped as ONNX does.
pub(crate) fn slice_bounds(n: i64, start: i64, end: i64, step: i64) -> (i64, i64) {
    let fix = |v: i64| if v < 0 { v + n } else { v };
    let (s, e) = (fix(start), fix(end));
    if step > 0 {
        (s.clamp(0, n), e.clamp(0, n))
    } else {
        (s.clamp(-1, n - 1), e.clamp(-1, n - 1))
    }
}

/// Length of a slice along an axis.
pub(crate) fn slice_len(n: i64, start: i64, end: i64, step: i64) -> i64 {
    let (s, e) = slice_bounds(n, start, end, step);
    if step > 0 {
        ((e - s + step - 1) / step).max(0)
    } else {
        ((s - e + (-step) - 1) / (-step)).max(0)
    }
}

type SliceResult = (Option<Vec<Dim>>, Option<Vec<Dim>>);

fn slice_shape(
    node: &NodeProto,
    x: Option<&[Dim]>,
    ins: &[Option<Info>],
    value: Option<Vec<Dim>>,
) -> SliceResult {
    let Some(x) = x else {
        return (None, None);
    };
    let r = x.len();
    let starts = ints_at(ins, 1);
    let ends = ints_at(ins, 2);
    let axes: Option<Vec<usize>> = match node.input_at(3) {
        Some(_) => ints_at(ins, 3).map(|a| a.iter().map(|&a| norm_axis(a, r)).collect()),
        None => starts.as_ref().map(|s| (0..s.len()).collect()),
    };
    let steps = match node.input_at(4) {
        Some(_) => ints_at(ins, 4),
        None => starts.as_ref().map(|s| vec![1; s.len()]),
    };
    let (Some(starts), Some(ends), Some(axes), Some(steps)) = (starts, ends, axes, steps) else {
        return (Some(vec![Dim::Unknown; r]), None);
    };
    let mut out = x.to_vec();
    for (k, &a) in axes.iter().enumerate() {
        if a >= r {
            return (Some(vec![Dim::Unknown; r]), None);
        }
        out[a] = match &x[a] {
            Dim::Known(n) => Dim::Known(slice_len(*n, starts[k], ends[k], steps[k])),
            d if starts[k] == 0 && ends[k] >= i32::MAX as i64 && steps[k] == 1 => d.clone(),
            _ => Dim::Unknown,
        };
    }
    let value = match value {
        Some(v) if r == 1 && axes == [0] => {
            let n = v.len() as i64;
            let (s, e) = slice_bounds(n, starts[0], ends[0], steps[0]);
            let mut picked = Vec::new();
            let mut i = s;
            while (steps[0] > 0 && i < e) || (steps[0] < 0 && i > e) {
                picked.push(v[i as usize].clone());
                i += steps[0];
            }
            Some(picked)
        }
        _ => None,
    };
    (Some(out), value)
}

fn split_shapes(
    node: &NodeProto,
    x: Option<&[Dim]>,
    ins: &[Option<Info>],
) -> Vec<Option<Vec<Dim>>> {
    let n = node.output.len();
    let Some(x) = x else {
        return vec![None; n];
    };
    let axis = norm_axis(node.attr_i("axis").unwrap_or(0), x.len());
    let sizes: Option<Vec<i64>> = match node.attr_ints("split") {
        Some(s) => Some(s.to_vec()),
        None if node.input_at(1).is_some() => ints_at(ins, 1),
        None => x.get(axis).and_then(Dim::known).map(|len| {
            let chunk = (len + n as i64 - 1) / n as i64;
            (0..n as i64)
                .map(|k| (len - k * chunk).clamp(0, chunk))
                .collect()
        }),
    };
    (0..n)
        .map(|k| {
            let mut s = x.to_vec();
            if axis < s.len() {
                s[axis] = match &sizes {
                    Some(v) if v.len() == n => Dim::Known(v[k]),
                    _ => Dim::Unknown,
                };
            }
            Some(s)
        })
        .collect()
}

fn resize_shape(node: &NodeProto, x: Option<&[Dim]>, ins: &[Option<Info>]) -> Option<Vec<Dim>> {
    let x = x?;
    let r = x.len();
    let (scales_at, sizes_at) = if node.op() == "Upsample" {
        (1, usize::MAX)
    } else {
        (2, 3)
    };
    if let Some(sizes) = ints_at(ins, sizes_at).filter(|s| s.len() == r) {
        return Some(sizes.into_iter().map(Dim::Known).collect());
    }
    let scales = info_at(ins, scales_at)
        .and_then(|i| i.fvalue.clone())
        .filter(|s| s.len() == r);
    match scales {
        Some(sc) => Some(
            x.iter()
                .zip(&sc)
                .map(|(d, &s)| match d {
                    Dim::Known(n) => Dim::Known((*n as f64 * s).floor() as i64),
                    d if s == 1.0 => d.clone(),
                    _ => Dim::Unknown,
                })
                .collect(),
        ),
        None => Some(vec![Dim::Unknown; r]),
    }
}
