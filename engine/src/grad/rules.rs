//! The reverse-mode rule of each supported operator: given the gradients of a node's outputs,
//! the nodes that compute the gradients of its inputs.
//!
//! Each rule computes only the input gradients that are needed (`Ctx::need`), so asking for
//! the gradient with respect to a generator's latent input adds no weight-gradient
//! convolutions. A rule that cannot handle a node returns the reason, which the builder turns
//! into an error naming the node.
//!
//! Decisions, by operator family:
//! - Broadcasting element-wise operators sum their gradients over the broadcast axes
//!   ([`Emitter::unbroadcast`]).
//! - Convolutions: the input gradient of `Conv` is a `ConvTranspose` with the same weights and
//!   vice versa; weight gradients are convolutions of the input with the output gradient, with
//!   strides and dilations swapped and the batch axis as the reduction axis. Groups are folded
//!   into the batch axis so a grouped convolution needs a single node.
//! - Operators that only move or copy elements (`Gather`, `Slice`, `Pad`, `Tile`, nearest
//!   `Resize`, ...) share one rule: apply the operator to the tensor of element positions and
//!   scatter-add the output gradient back to where each element came from
//!   ([`Emitter::index_map_vjp`]). Slices and constant pads with known sizes use the cheaper
//!   `Pad` and `Slice` instead.
//! - Ties in `Max`, `Min`, `ReduceMax`, `ReduceMin` and the global max pool share the gradient
//!   equally among the tied elements.
//! - `BatchNormalization` is differentiated in inference mode only (running statistics as
//!   inputs); training mode is refused.

use super::emit::{Emitter, Part};
use super::onnx::{attr_int, attr_ints, attr_string, elem, is_float, NodeExt, NodeProto};
use super::shape::{broadcast, conv_pads, kernel_of, norm_axis, slice_bounds, Dim};

/// What a rule sees: the node, the gradients of its outputs and which input gradients to make.
pub(crate) struct Ctx<'e, 'a> {
    /// Where the new nodes go.
    pub em: &'e mut Emitter<'a>,
    /// The forward node.
    pub node: &'e NodeProto,
    /// Its index in the forward graph.
    pub index: usize,
    /// The gradient of each output, when it has one.
    pub gout: Vec<Option<String>>,
    /// Whether each input's gradient is wanted.
    pub need: Vec<bool>,
}

type Grads = Result<Vec<Option<String>>, String>;

impl Ctx<'_, '_> {
    fn x(&self, k: usize) -> String {
        self.node.input.get(k).cloned().unwrap_or_default()
    }

    fn has_input(&self, k: usize) -> bool {
        self.node.input_at(k).is_some()
    }

    fn y(&self, k: usize) -> String {
        self.node.output.get(k).cloned().unwrap_or_default()
    }

    fn need(&self, k: usize) -> bool {
        self.need.get(k).copied().unwrap_or(false)
    }

    /// The gradient of output 0; the other outputs must have none.
    fn g(&self) -> Result<String, String> {
        for (k, g) in self.gout.iter().enumerate().skip(1) {
            if g.is_some() {
                return Err(format!(
                    "the gradient through its output {k} (`{}`) is not supported",
                    self.y(k)
                ));
            }
        }
        self.gout
            .first()
            .cloned()
            .flatten()
            .ok_or_else(|| "its first output has no gradient".to_string())
    }

    /// Element type of the gradients (that of output 0).
    fn elem(&self) -> i32 {
        let e = self.em.shapes.elem(&self.y(0));
        if is_float(e) {
            e
        } else {
            elem::FLOAT
        }
    }

    fn dims(&self, name: &str) -> Option<Vec<Dim>> {
        self.em.shapes.dims(name).map(<[Dim]>::to_vec)
    }

    fn rank(&self, name: &str) -> Result<usize, String> {
        self.em
            .shapes
            .rank(name)
            .ok_or_else(|| format!("the rank of `{name}` is unknown"))
    }

    fn ints_input(&self, k: usize, what: &str) -> Result<Vec<i64>, String> {
        self.em.shapes.ints(&self.x(k)).ok_or_else(|| {
            format!(
                "its {what} (`{}`) must be known when the model is built; it is computed at \
                 run time",
                self.x(k)
            )
        })
    }

    fn scalar(&mut self, v: f64) -> String {
        let e = self.elem();
        self.em.scalar(v, e)
    }

    fn n(&self) -> usize {
        self.node.input.len()
    }

    /// Gradients for inputs of a binary broadcasting operator.
    fn unb(&mut self, g: &str, k: usize) -> Result<String, String> {
        let dims = self.dims(&self.y(0));
        let x = self.x(k);
        self.em.unbroadcast(g, dims.as_deref(), &x)
    }
}

/// Result slots for a node's inputs, all empty.
fn none(c: &Ctx<'_, '_>) -> Vec<Option<String>> {
    vec![None; c.n()]
}

/// Dispatches to the rule of the node's operator.
pub(crate) fn vjp(c: &mut Ctx<'_, '_>) -> Grads {
    if !c.node.domain_name().is_empty() {
        return Err(format!(
            "operators of domain `{}` are not supported",
            c.node.domain_name()
        ));
    }
    match c.node.op() {
        "Identity" => identity(c),
        "Dropout" => dropout(c),
        "Cast" | "CastLike" => cast(c),
        "Neg" => {
            let g = c.g()?;
            let dx = c.em.un("Neg", &g);
            Ok(first(c, dx))
        }
        "Relu" => relu(c),
        "LeakyRelu" => leaky_relu(c),
        "PRelu" => prelu(c),
        "Elu" | "Selu" => elu(c),
        "Tanh" | "Sigmoid" | "Exp" | "Log" | "Sqrt" | "Reciprocal" | "Abs" | "Softplus"
        | "Softsign" | "Erf" | "Sin" | "Cos" | "Atan" => unary(c),
        "HardSigmoid" | "HardSwish" => hard(c),
        "Clip" => clip(c),
        "Softmax" | "LogSoftmax" => softmax(c),
        "Add" | "Sub" => add_sub(c),
        "Mul" => mul(c),
        "Div" => div(c),
        "Pow" => pow(c),
        "Sum" | "Mean" => sum_mean(c),
        "Max" | "Min" => max_min(c),
        "Where" => where_(c),
        "MatMul" => matmul(c),
        "Gemm" => gemm(c),
        "Conv" => conv(c),
        "ConvTranspose" => conv_transpose(c),
        "MaxPool" => max_pool(c),
        "AveragePool" => average_pool(c),
        "GlobalAveragePool" | "GlobalMaxPool" => global_pool(c),
        "BatchNormalization" => batch_norm(c),
        "InstanceNormalization" => instance_norm(c),
        "LayerNormalization" => layer_norm(c),
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => reshape(c),
        "Transpose" => transpose(c),
        "Expand" => expand(c),
        "Concat" => concat(c),
        "Split" => split(c),
        "Slice" => slice(c),
        "Pad" => pad(c),
        "Gather" | "GatherElements" | "GatherND" | "Tile" | "DepthToSpace" | "SpaceToDepth" => {
            index_op(c)
        }
        "Resize" | "Upsample" => resize(c),
        "ScatterElements" | "ScatterND" => scatter(c),
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceSumSquare" | "ReduceL1"
        | "ReduceL2" | "ReduceLogSumExp" => reduce(c),
        "CumSum" => cumsum(c),
        "TopK" => top_k(c),
        op => Err(format!(
            "operator {op} has no gradient rule (supported: {})",
            SUPPORTED.join(", ")
        )),
    }
}

/// Operators with a gradient rule, for messages and documentation.
pub const SUPPORTED: &[&str] = &[
    "Abs",
    "Add",
    "Atan",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Clip",
    "Concat",
    "Conv",
    "ConvTranspose",
    "Cos",
    "CumSum",
    "DepthToSpace",
    "Div",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mul",
    "Neg",
    "PRelu",
    "Pad",
    "Pow",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Resize",
    "ScatterElements",
    "ScatterND",
    "Selu",
    "Sigmoid",
    "Sin",
    "Slice",
    "Softmax",
    "Softplus",
    "Softsign",
    "SpaceToDepth",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "TopK",
    "Transpose",
    "Unsqueeze",
    "Where",
];

/// Slots with only input 0's gradient.
fn first(c: &Ctx<'_, '_>, g: String) -> Vec<Option<String>> {
    let mut out = none(c);
    out[0] = Some(g);
    out
}

fn identity(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    Ok(first(c, g))
}

fn dropout(c: &mut Ctx<'_, '_>) -> Grads {
    if c.has_input(2) {
        let mode = c.em.shapes.ints(&c.x(2));
        if mode.as_deref() != Some(&[0]) {
            return Err("dropout in training mode (or with a mode computed at run time)".into());
        }
    }
    identity(c)
}

fn cast(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let to = c.em.shapes.elem(&c.x(0));
    if to == c.elem() {
        return Ok(first(c, g));
    }
    let cast = c.em.cast(&g, to);
    Ok(first(c, cast))
}

fn relu(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let zero = c.scalar(0.0);
    let pos = c.em.bin("Greater", &x, &zero);
    let dx = c.em.op("Where", &[&pos, &g, &zero], vec![]);
    Ok(first(c, dx))
}

fn leaky_relu(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let alpha = c.node.attr_f("alpha").unwrap_or(0.01) as f64;
    let zero = c.scalar(0.0);
    let a = c.scalar(alpha);
    let pos = c.em.bin("Greater", &x, &zero);
    let scaled = c.em.bin("Mul", &g, &a);
    let dx = c.em.op("Where", &[&pos, &g, &scaled], vec![]);
    Ok(first(c, dx))
}

fn prelu(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (x, slope) = (c.x(0), c.x(1));
    let zero = c.scalar(0.0);
    let pos = c.em.bin("Greater", &x, &zero);
    let mut out = none(c);
    if c.need(0) {
        let scaled = c.em.bin("Mul", &g, &slope);
        let dx = c.em.op("Where", &[&pos, &g, &scaled], vec![]);
        out[0] = Some(c.unb(&dx, 0)?);
    }
    if c.need(1) {
        let gx = c.em.bin("Mul", &g, &x);
        let ds = c.em.op("Where", &[&pos, &zero, &gx], vec![]);
        out[1] = Some(c.unb(&ds, 1)?);
    }
    Ok(out)
}

fn elu(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (x, y) = (c.x(0), c.y(0));
    let selu = c.node.op() == "Selu";
    let alpha = c
        .node
        .attr_f("alpha")
        .unwrap_or(if selu { 1.673_263_2 } else { 1.0 }) as f64;
    let gamma = if selu {
        c.node.attr_f("gamma").unwrap_or(1.050_701) as f64
    } else {
        1.0
    };
    let zero = c.scalar(0.0);
    let pos = c.em.bin("Greater", &x, &zero);
    // Below zero, dy/dx = y + gamma * alpha.
    let ga = c.scalar(gamma * alpha);
    let slope = c.em.bin("Add", &y, &ga);
    let neg = c.em.bin("Mul", &g, &slope);
    let posg = if selu {
        let gm = c.scalar(gamma);
        c.em.bin("Mul", &g, &gm)
    } else {
        g
    };
    let dx = c.em.op("Where", &[&pos, &posg, &neg], vec![]);
    Ok(first(c, dx))
}

fn unary(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (x, y) = (c.x(0), c.y(0));
    let dx = match c.node.op() {
        "Tanh" => {
            let yy = c.em.bin("Mul", &y, &y);
            let one = c.scalar(1.0);
            let d = c.em.bin("Sub", &one, &yy);
            c.em.bin("Mul", &g, &d)
        }
        "Sigmoid" => {
            let one = c.scalar(1.0);
            let om = c.em.bin("Sub", &one, &y);
            let d = c.em.bin("Mul", &y, &om);
            c.em.bin("Mul", &g, &d)
        }
        "Exp" => c.em.bin("Mul", &g, &y),
        "Log" => c.em.bin("Div", &g, &x),
        "Sqrt" => {
            let half = c.scalar(0.5);
            let h = c.em.bin("Mul", &g, &half);
            c.em.bin("Div", &h, &y)
        }
        "Reciprocal" => {
            let yy = c.em.bin("Mul", &y, &y);
            let d = c.em.bin("Mul", &g, &yy);
            c.em.un("Neg", &d)
        }
        "Abs" => {
            let s = c.em.un("Sign", &x);
            c.em.bin("Mul", &g, &s)
        }
        "Softplus" => {
            let s = c.em.un("Sigmoid", &x);
            c.em.bin("Mul", &g, &s)
        }
        "Softsign" => {
            let a = c.em.un("Abs", &x);
            let one = c.scalar(1.0);
            let d = c.em.bin("Add", &one, &a);
            let dd = c.em.bin("Mul", &d, &d);
            c.em.bin("Div", &g, &dd)
        }
        "Erf" => {
            let xx = c.em.bin("Mul", &x, &x);
            let n = c.em.un("Neg", &xx);
            let e = c.em.un("Exp", &n);
            let k = c.scalar(2.0 / std::f64::consts::PI.sqrt());
            let d = c.em.bin("Mul", &e, &k);
            c.em.bin("Mul", &g, &d)
        }
        "Sin" => {
            let d = c.em.un("Cos", &x);
            c.em.bin("Mul", &g, &d)
        }
        "Cos" => {
            let s = c.em.un("Sin", &x);
            let d = c.em.bin("Mul", &g, &s);
            c.em.un("Neg", &d)
        }
        "Atan" => {
            let xx = c.em.bin("Mul", &x, &x);
            let one = c.scalar(1.0);
            let d = c.em.bin("Add", &one, &xx);
            c.em.bin("Div", &g, &d)
        }
        op => unreachable!("{op} is not unary here"),
    };
    Ok(first(c, dx))
}

fn hard(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let zero = c.scalar(0.0);
    if c.node.op() == "HardSigmoid" {
        let alpha = c.node.attr_f("alpha").unwrap_or(0.2) as f64;
        let beta = c.node.attr_f("beta").unwrap_or(0.5) as f64;
        let a = c.scalar(alpha);
        let b = c.scalar(beta);
        let one = c.scalar(1.0);
        let ax = c.em.bin("Mul", &x, &a);
        let t = c.em.bin("Add", &ax, &b);
        let lo = c.em.bin("Greater", &t, &zero);
        let hi = c.em.bin("Less", &t, &one);
        let inside = c.em.bin("And", &lo, &hi);
        let ga = c.em.bin("Mul", &g, &a);
        let dx = c.em.op("Where", &[&inside, &ga, &zero], vec![]);
        return Ok(first(c, dx));
    }
    // HardSwish: x * clip(x / 6 + 1/2, 0, 1); slope x / 3 + 1/2 inside (-3, 3).
    let three = c.scalar(3.0);
    let m3 = c.scalar(-3.0);
    let half = c.scalar(0.5);
    let x3 = c.em.bin("Div", &x, &three);
    let slope = c.em.bin("Add", &x3, &half);
    let gs = c.em.bin("Mul", &g, &slope);
    let above = c.em.bin("Greater", &x, &three);
    let below = c.em.bin("Less", &x, &m3);
    let mid = c.em.op("Where", &[&above, &g, &gs], vec![]);
    let dx = c.em.op("Where", &[&below, &zero, &mid], vec![]);
    Ok(first(c, dx))
}

fn clip(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let mut inside: Option<String> = None;
    let bounds: Vec<(String, &str)> =
        if c.node.attr("min").is_some() || c.node.attr("max").is_some() {
            // Opset 6 style attributes cannot occur in opsets 13+, but cost nothing to read.
            let mut b = Vec::new();
            if let Some(m) = c.node.attr_f("min") {
                b.push((c.scalar(m as f64), "GreaterOrEqual"));
            }
            if let Some(m) = c.node.attr_f("max") {
                b.push((c.scalar(m as f64), "LessOrEqual"));
            }
            b
        } else {
            let mut b = Vec::new();
            if c.has_input(1) {
                b.push((c.x(1), "GreaterOrEqual"));
            }
            if c.has_input(2) {
                b.push((c.x(2), "LessOrEqual"));
            }
            b
        };
    for (bound, cmp) in bounds {
        let m = c.em.bin(cmp, &x, &bound);
        inside = Some(match inside {
            None => m,
            Some(prev) => c.em.bin("And", &prev, &m),
        });
    }
    let dx = match inside {
        None => g,
        Some(mask) => {
            let zero = c.scalar(0.0);
            c.em.op("Where", &[&mask, &g, &zero], vec![])
        }
    };
    Ok(first(c, dx))
}

fn softmax(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let y = c.y(0);
    let r = c.rank(&y)?;
    let axis = norm_axis(c.node.attr_i("axis").unwrap_or(-1), r) as i64;
    let dx = if c.node.op() == "Softmax" {
        // y * (g - sum(g * y))
        let gy = c.em.bin("Mul", &g, &y);
        let s = c.em.reduce_sum(&gy, &[axis], true);
        let d = c.em.bin("Sub", &g, &s);
        c.em.bin("Mul", &y, &d)
    } else {
        // g - exp(y) * sum(g)
        let s = c.em.reduce_sum(&g, &[axis], true);
        let p = c.em.un("Exp", &y);
        let ps = c.em.bin("Mul", &p, &s);
        c.em.bin("Sub", &g, &ps)
    };
    Ok(first(c, dx))
}

fn add_sub(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let mut out = none(c);
    if c.need(0) {
        out[0] = Some(c.unb(&g, 0)?);
    }
    if c.need(1) {
        let gb = if c.node.op() == "Sub" {
            c.em.un("Neg", &g)
        } else {
            g.clone()
        };
        out[1] = Some(c.unb(&gb, 1)?);
    }
    Ok(out)
}

fn mul(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (a, b) = (c.x(0), c.x(1));
    let mut out = none(c);
    if c.need(0) {
        let d = c.em.bin("Mul", &g, &b);
        out[0] = Some(c.unb(&d, 0)?);
    }
    if c.need(1) {
        let d = c.em.bin("Mul", &g, &a);
        out[1] = Some(c.unb(&d, 1)?);
    }
    Ok(out)
}

fn div(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (b, y) = (c.x(1), c.y(0));
    let gb = c.em.bin("Div", &g, &b);
    let mut out = none(c);
    if c.need(0) {
        out[0] = Some(c.unb(&gb, 0)?);
    }
    if c.need(1) {
        let t = c.em.bin("Mul", &gb, &y);
        let d = c.em.un("Neg", &t);
        out[1] = Some(c.unb(&d, 1)?);
    }
    Ok(out)
}

fn pow(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (a, b, y) = (c.x(0), c.x(1), c.y(0));
    let e = c.elem();
    let mut out = none(c);
    if c.need(0) {
        let d = match c.em.shapes.floats(&b).or(None) {
            Some([v]) => {
                // A constant exponent: b * a^(b - 1), with the common squares spelt out.
                let v = *v;
                if v == 2.0 {
                    let two = c.scalar(2.0);
                    let t = c.em.bin("Mul", &a, &two);
                    c.em.bin("Mul", &g, &t)
                } else if v == 1.0 {
                    g.clone()
                } else {
                    let bm1 = c.scalar(v - 1.0);
                    let p = c.em.bin("Pow", &a, &bm1);
                    let k = c.scalar(v);
                    let t = c.em.bin("Mul", &p, &k);
                    c.em.bin("Mul", &g, &t)
                }
            }
            _ => {
                let bf = if c.em.shapes.elem(&b) == e {
                    b.clone()
                } else {
                    c.em.cast(&b, e)
                };
                let one = c.scalar(1.0);
                let bm1 = c.em.bin("Sub", &bf, &one);
                let p = c.em.bin("Pow", &a, &bm1);
                let t = c.em.bin("Mul", &p, &bf);
                c.em.bin("Mul", &g, &t)
            }
        };
        out[0] = Some(c.unb(&d, 0)?);
    }
    if c.need(1) {
        let la = c.em.un("Log", &a);
        let t = c.em.bin("Mul", &y, &la);
        let d = c.em.bin("Mul", &g, &t);
        out[1] = Some(c.unb(&d, 1)?);
    }
    Ok(out)
}

fn sum_mean(c: &mut Ctx<'_, '_>) -> Grads {
    let mut g = c.g()?;
    if c.node.op() == "Mean" {
        let k = c.scalar(1.0 / c.n() as f64);
        g = c.em.bin("Mul", &g, &k);
    }
    let mut out = none(c);
    for (k, slot) in out.iter_mut().enumerate() {
        if c.need(k) {
            *slot = Some(c.unb(&g, k)?);
        }
    }
    Ok(out)
}

fn max_min(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let y = c.y(0);
    let e = c.elem();
    let masks: Vec<String> = (0..c.n())
        .map(|k| {
            let x = c.x(k);
            let eq = c.em.bin("Equal", &x, &y);
            c.em.cast(&eq, e)
        })
        .collect();
    let count = c.em.sum(masks.clone());
    let share = c.em.bin("Div", &g, &count);
    let mut out = none(c);
    for (k, mask) in masks.iter().enumerate() {
        if c.need(k) {
            let d = c.em.bin("Mul", &share, mask);
            out[k] = Some(c.unb(&d, k)?);
        }
    }
    Ok(out)
}

fn where_(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let cond = c.x(0);
    let zero = c.scalar(0.0);
    let mut out = none(c);
    if c.need(1) {
        let d = c.em.op("Where", &[&cond, &g, &zero], vec![]);
        out[1] = Some(c.unb(&d, 1)?);
    }
    if c.need(2) {
        let d = c.em.op("Where", &[&cond, &zero, &g], vec![]);
        out[2] = Some(c.unb(&d, 2)?);
    }
    Ok(out)
}

/// Swaps the last two axes of a tensor of rank `r` (at least 2).
fn swap_last(em: &mut Emitter<'_>, x: &str, r: usize) -> String {
    let mut perm: Vec<i64> = (0..r as i64).collect();
    perm.swap(r - 2, r - 1);
    em.transpose(x, &perm)
}

fn matmul(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (a, b) = (c.x(0), c.x(1));
    let (ra, rb) = (c.rank(&a)?, c.rank(&b)?);
    let (da, db) = (
        c.dims(&a).unwrap_or_default(),
        c.dims(&b).unwrap_or_default(),
    );
    // Promote vectors to matrices as MatMul does, and give the output gradient the promoted
    // axes back.
    let (a1, a1d) = if ra == 1 {
        (c.em.unsqueeze(&a, &[0]), vec![Dim::Known(1), da[0].clone()])
    } else {
        (a.clone(), da.clone())
    };
    let (b1, b1d) = if rb == 1 {
        (c.em.unsqueeze(&b, &[1]), vec![db[0].clone(), Dim::Known(1)])
    } else {
        (b.clone(), db.clone())
    };
    let batch = broadcast(&a1d[..a1d.len() - 2], &b1d[..b1d.len() - 2]);
    let rg = batch.len() + 2;
    let g1 = match (ra, rb) {
        (1, 1) => {
            let s = c.em.ints(&[1, 1]);
            c.em.reshape(&g, &s)
        }
        (1, _) => c.em.unsqueeze(&g, &[rg as i64 - 2]),
        (_, 1) => c.em.unsqueeze(&g, &[rg as i64 - 1]),
        _ => g.clone(),
    };
    let m = a1d[a1d.len() - 2].clone();
    let k = a1d[a1d.len() - 1].clone();
    let n = b1d[b1d.len() - 1].clone();
    let mut out = none(c);
    if c.need(0) {
        let bt = swap_last(c.em, &b1, b1d.len());
        let full = c.em.bin("MatMul", &g1, &bt);
        let mut fd = batch.clone();
        fd.extend([m.clone(), k.clone()]);
        if ra == 1 {
            // The promoted row axis is summed away with the batch axes.
            let r = c.em.unbroadcast(&full, Some(&fd), &a);
            out[0] = Some(r.map_err(|e| format!("{e} (MatMul input A)"))?);
        } else {
            out[0] = Some(c.em.unbroadcast(&full, Some(&fd), &a)?);
        }
    }
    if c.need(1) {
        let at = swap_last(c.em, &a1, a1d.len());
        let full = c.em.bin("MatMul", &at, &g1);
        let mut fd = batch.clone();
        fd.extend([k, n]);
        if rb == 1 {
            // [.., k, 1] summed over the batch axes, then reshaped to [k].
            let lead: Vec<i64> = (0..batch.len() as i64).collect();
            let r = if lead.is_empty() {
                full
            } else {
                c.em.reduce_sum(&full, &lead, false)
            };
            out[1] = Some(c.em.reshape_like(&r, &b));
        } else {
            out[1] = Some(c.em.unbroadcast(&full, Some(&fd), &b)?);
        }
    }
    Ok(out)
}

fn gemm(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (a, b) = (c.x(0), c.x(1));
    let alpha = c.node.attr_f("alpha").unwrap_or(1.0);
    let beta = c.node.attr_f("beta").unwrap_or(1.0);
    let ta = c.node.attr_i("transA").unwrap_or(0) != 0;
    let tb = c.node.attr_i("transB").unwrap_or(0) != 0;
    let gemm = |em: &mut Emitter<'_>, p: &str, q: &str, tp: bool, tq: bool| {
        let mut attrs = vec![attr_int("transA", tp as i64), attr_int("transB", tq as i64)];
        if alpha != 1.0 {
            attrs.push(super::onnx::attr_float("alpha", alpha));
        }
        em.op("Gemm", &[p, q], attrs)
    };
    let mut out = none(c);
    if c.need(0) {
        out[0] = Some(if ta {
            gemm(c.em, &b, &g, tb, true)
        } else {
            gemm(c.em, &g, &b, false, !tb)
        });
    }
    if c.need(1) {
        out[1] = Some(if tb {
            gemm(c.em, &g, &a, true, ta)
        } else {
            gemm(c.em, &a, &g, !ta, false)
        });
    }
    if c.need(2) {
        let gc = if beta != 1.0 {
            let k = c.scalar(beta as f64);
            c.em.bin("Mul", &g, &k)
        } else {
            g.clone()
        };
        out[2] = Some(c.unb(&gc, 2)?);
    }
    Ok(out)
}

/// Convolution attributes with defaults filled in.
struct ConvAttrs {
    k: usize,
    kernel: Vec<i64>,
    strides: Vec<i64>,
    dilations: Vec<i64>,
    pads: Vec<i64>,
    group: i64,
}

fn conv_attrs(c: &Ctx<'_, '_>, transpose: bool) -> Result<ConvAttrs, String> {
    let x = c.x(0);
    let r = match c.em.shapes.rank(&x) {
        Some(r) => r,
        None => c.rank(&c.x(1))?,
    };
    if r < 3 {
        return Err(format!(
            "`{x}` has rank {r}; convolutions need rank 3 or more"
        ));
    }
    let k = r - 2;
    let wd = c.dims(&c.x(1));
    let kernel = kernel_of(c.node, wd.as_deref())
        .ok_or_else(|| "the kernel size is unknown (weights of unknown shape)".to_string())?;
    let xd = c.dims(&x).unwrap_or_default();
    let pads = if transpose {
        if c.node.attr_ints("output_shape").is_some() {
            return Err(
                "`output_shape` is not supported; export with explicit `pads` and \
                 `output_padding`"
                    .into(),
            );
        }
        match c.node.attr_s("auto_pad").unwrap_or("NOTSET") {
            "NOTSET" | "" => c
                .node
                .attr_ints("pads")
                .map_or(vec![0; 2 * k], <[i64]>::to_vec),
            "VALID" => vec![0; 2 * k],
            other => {
                return Err(format!(
                    "auto_pad {other} is not supported; export with explicit `pads`"
                ))
            }
        }
    } else {
        conv_pads(c.node, &xd, &kernel, false).ok_or_else(|| {
            "auto_pad needs the spatial input size, which is not known statically".to_string()
        })?
    };
    Ok(ConvAttrs {
        k,
        strides: c
            .node
            .attr_ints("strides")
            .map_or(vec![1; k], <[i64]>::to_vec),
        dilations: c
            .node
            .attr_ints("dilations")
            .map_or(vec![1; k], <[i64]>::to_vec),
        kernel,
        pads,
        group: c.node.attr_i("group").unwrap_or(1),
    })
}

/// `dx` of a convolution with weights `w`: the transposed convolution of `g`, padded at the end
/// to `x`'s spatial size (which the forward convolution's rounding may have lost).
fn conv_input_grad(
    c: &mut Ctx<'_, '_>,
    g: &str,
    w: &str,
    a: &ConvAttrs,
    group: i64,
) -> Result<String, String> {
    let x = c.x(0);
    let y = c.y(0);
    let k = a.k;
    let xd = c.dims(&x);
    let yd = c.dims(&y);
    let mut attrs = vec![
        attr_ints("strides", &a.strides),
        attr_ints("dilations", &a.dilations),
        attr_ints("pads", &a.pads),
        attr_int("group", group),
        attr_ints("kernel_shape", &a.kernel),
    ];
    let statically: Option<Vec<i64>> = (0..k)
        .map(|i| {
            let n = xd.as_ref()?.get(2 + i)?.known()?;
            let o = yd.as_ref()?.get(2 + i)?.known()?;
            let eff = (a.kernel[i] - 1) * a.dilations[i] + 1;
            Some(n - ((o - 1) * a.strides[i] + eff - a.pads[i] - a.pads[i + k]))
        })
        .collect();
    match statically {
        Some(op) => {
            if op.iter().any(|&p| p < 0) {
                return Err("inconsistent convolution sizes".into());
            }
            if op.iter().any(|&p| p > 0) {
                attrs.push(attr_ints("output_padding", &op));
            }
            Ok(c.em.op("ConvTranspose", &[g, w], attrs))
        }
        None => {
            // Sizes known only at run time: pad the end of each spatial axis up to x's size.
            let ct = c.em.op("ConvTranspose", &[g, w], attrs);
            let xs = c.em.shape(&x);
            let cs = c.em.op("Shape", &[&ct], vec![]);
            let diff = c.em.bin("Sub", &xs, &cs);
            let start = c.em.ints(&[2]);
            let end = c.em.ints(&[i64::MAX]);
            let tail = c.em.op("Slice", &[&diff, &start, &end], vec![]);
            let zeros = c.em.ints(&vec![0; k + 4]);
            let pads =
                c.em.op("Concat", &[&zeros, &tail], vec![attr_int("axis", 0)]);
            Ok(c.em.op("Pad", &[&ct, &pads], vec![]))
        }
    }
}

/// The weight gradient of a convolution written as a convolution: `dW[o, i, κ] = Σ_n Σ_p
/// input[n, i, p·s + κ·d] · grad[n, o, p]`, with the batch axis as the reduction axis and the
/// groups folded into it. `input` is `[N, G·ci, ...]`, `grad` is `[N, G·co, ...]`; the result is
/// `[G·co, ci, kernel...]`.
#[allow(clippy::too_many_arguments)]
fn weight_grad(
    c: &mut Ctx<'_, '_>,
    input: &str,
    grad: &str,
    ci: i64,
    a: &ConvAttrs,
) -> Result<String, String> {
    let k = a.k;
    let g_count = a.group;
    let spatial_perm: Vec<i64> = (2..(k + 2) as i64).collect();
    let mut perm = vec![1, 0];
    perm.extend(&spatial_perm);
    let xin = if g_count == 1 {
        c.em.transpose(input, &perm)
    } else {
        let mut parts = vec![Part::Of(input, 0), Part::Fixed(g_count), Part::Fixed(ci)];
        parts.extend((0..k).map(|i| Part::Of(input, 2 + i)));
        let s = c.em.shape_vec(&parts);
        let r = c.em.reshape(input, &s);
        let mut p5 = vec![2, 1, 0];
        p5.extend((3..(k + 3) as i64).collect::<Vec<_>>());
        let t = c.em.transpose(&r, &p5);
        let mut parts = vec![Part::Fixed(ci), Part::Fixed(-1)];
        parts.extend((0..k).map(|i| Part::Of(input, 2 + i)));
        let s = c.em.shape_vec(&parts);
        c.em.reshape(&t, &s)
    };
    let gk = c.em.transpose(grad, &perm);
    let attrs = vec![
        attr_ints("strides", &a.dilations),
        attr_ints("dilations", &a.strides),
        attr_ints("pads", &a.pads),
        attr_int("group", g_count),
    ];
    let dw = c.em.op("Conv", &[&xin, &gk], attrs);
    let dw = c.em.transpose(&dw, &perm);
    // The correlation may reach past the kernel when the convolution's strides skipped the last
    // rows; keep the kernel's extent.
    let axes: Vec<i64> = (2..(k + 2) as i64).collect();
    let starts = c.em.ints(&vec![0; k]);
    let ends = c.em.ints(&a.kernel);
    let axes = c.em.ints(&axes);
    Ok(c.em.op("Slice", &[&dw, &starts, &ends, &axes], vec![]))
}

/// Bias gradient: the output gradient summed over all axes but the channel axis.
fn bias_grad(c: &mut Ctx<'_, '_>, g: &str, rank: usize) -> String {
    let mut axes = vec![0];
    axes.extend(2..rank as i64);
    c.em.reduce_sum(g, &axes, false)
}

fn conv(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let a = conv_attrs(c, false)?;
    let w = c.x(1);
    let mut out = none(c);
    if c.need(0) {
        out[0] = Some(conv_input_grad(c, &g, &w, &a, a.group)?);
    }
    if c.need(1) {
        let ci =
            c.em.known_dim(&w, 1)
                .ok_or_else(|| format!("the shape of the weights `{w}` is unknown"))?;
        let x = c.x(0);
        out[1] = Some(weight_grad(c, &x, &g, ci, &a)?);
    }
    if c.need(2) {
        out[2] = Some(bias_grad(c, &g, a.k + 2));
    }
    Ok(out)
}

fn conv_transpose(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let a = conv_attrs(c, true)?;
    let (x, w) = (c.x(0), c.x(1));
    let mut out = none(c);
    if c.need(0) {
        let attrs = vec![
            attr_ints("strides", &a.strides),
            attr_ints("dilations", &a.dilations),
            attr_ints("pads", &a.pads),
            attr_int("group", a.group),
            attr_ints("kernel_shape", &a.kernel),
        ];
        let dx = c.em.op("Conv", &[&g, &w], attrs);
        // With output_padding of a stride or more, the convolution sees extra rows; cut them.
        let op = c
            .node
            .attr_ints("output_padding")
            .map_or(vec![0; a.k], <[i64]>::to_vec);
        let exact = (0..a.k).all(|i| op[i] < a.strides[i]);
        out[0] = Some(if exact {
            dx
        } else {
            let starts = c.em.ints(&vec![0; a.k]);
            let xs = c.em.shape(&x);
            let s2 = c.em.ints(&[2]);
            let big = c.em.ints(&[i64::MAX]);
            let ends = c.em.op("Slice", &[&xs, &s2, &big], vec![]);
            let axes: Vec<i64> = (2..(a.k + 2) as i64).collect();
            let axes = c.em.ints(&axes);
            c.em.op("Slice", &[&dx, &starts, &ends, &axes], vec![])
        });
    }
    if c.need(1) {
        // Weights [C, M/G, kernel]: the convolution weight gradient with the roles of input and
        // output gradient exchanged.
        let mg =
            c.em.known_dim(&w, 1)
                .ok_or_else(|| format!("the shape of the weights `{w}` is unknown"))?;
        out[1] = Some(weight_grad(c, &g, &x, mg, &a)?);
    }
    if c.need(2) {
        out[2] = Some(bias_grad(c, &g, a.k + 2));
    }
    Ok(out)
}

fn max_pool(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    if c.node.attr_i("storage_order").unwrap_or(0) != 0 {
        return Err("storage_order 1 (column-major indices) is not supported".into());
    }
    let x = c.x(0);
    // The indices output gives, for every output element, the flat position it came from.
    let indices = match c.node.output.get(1).filter(|s| !s.is_empty()) {
        Some(i) => i.clone(),
        None => {
            let key = (c.index, 1);
            match c.em.extra_outputs.get(&key) {
                Some(n) => n.clone(),
                None => {
                    let n = c.em.fresh("maxpool_indices");
                    c.em.extra_outputs.insert(key, n.clone());
                    n
                }
            }
        }
    };
    let e = c.elem();
    let n = c.em.size(&x);
    let one = c.em.ints(&[1]);
    let n1 = c.em.reshape(&n, &one);
    let acc = c.em.zeros_of_shape(&n1, e);
    let fi = c.em.flatten(&indices);
    let fg = c.em.flatten(&g);
    let s = c.em.op(
        "ScatterElements",
        &[&acc, &fi, &fg],
        vec![attr_int("axis", 0), attr_string("reduction", "add")],
    );
    let dx = c.em.reshape_like(&s, &x);
    Ok(first(c, dx))
}

fn average_pool(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    if c.node.attr_i("ceil_mode").unwrap_or(0) != 0 {
        return Err("ceil_mode 1 is not supported".into());
    }
    let x = c.x(0);
    let r = c.rank(&x)?;
    let k = r - 2;
    let kernel = kernel_of(c.node, None).ok_or("kernel_shape is missing")?;
    let xd = c.dims(&x).unwrap_or_default();
    let pads = conv_pads(c.node, &xd, &kernel, false)
        .ok_or("auto_pad needs the spatial input size, which is not known statically")?;
    let channels =
        c.em.known_dim(&x, 1)
            .ok_or_else(|| format!("the channel count of `{x}` is unknown"))?;
    let a = ConvAttrs {
        k,
        strides: c
            .node
            .attr_ints("strides")
            .map_or(vec![1; k], <[i64]>::to_vec),
        dilations: c
            .node
            .attr_ints("dilations")
            .map_or(vec![1; k], <[i64]>::to_vec),
        kernel: kernel.clone(),
        pads: pads.clone(),
        group: channels,
    };
    let e = c.elem();
    let window: i64 = kernel.iter().product();
    let include = c.node.attr_i("count_include_pad").unwrap_or(0) != 0;
    let gs = if include || pads.iter().all(|&p| p == 0) {
        let s = c.scalar(1.0 / window as f64);
        c.em.bin("Mul", &g, &s)
    } else {
        // The divisor of each window is the number of real (not padding) elements in it.
        let ones = {
            let s = c.em.shape(&x);
            let v = super::onnx::float_tensor("value", e, &[1], &[1.0]);
            c.em.op(
                "ConstantOfShape",
                &[&s],
                vec![super::onnx::attr_tensor("value", v)],
            )
        };
        let mut attrs: Vec<_> = c
            .node
            .attribute
            .iter()
            .filter(|at| at.name.as_deref() != Some("count_include_pad"))
            .cloned()
            .collect();
        attrs.push(attr_int("count_include_pad", 1));
        let frac = c.em.op("AveragePool", &[&ones], attrs);
        let w = c.scalar(window as f64);
        let count = c.em.bin("Mul", &frac, &w);
        c.em.bin("Div", &g, &count)
    };
    let mut wdims = vec![channels, 1];
    wdims.extend(&kernel);
    let wcount: i64 = wdims.iter().product();
    let wones = c.em.float_array(&wdims, &vec![1.0; wcount as usize], e);
    let dx = conv_input_grad(c, &gs, &wones, &a, channels)?;
    Ok(first(c, dx))
}

fn global_pool(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (x, y) = (c.x(0), c.y(0));
    let e = c.elem();
    let dx = if c.node.op() == "GlobalAveragePool" {
        let k = c.em.size_ratio(&y, &x, e);
        let gk = c.em.bin("Mul", &g, &k);
        let s = c.em.shape(&x);
        c.em.op("Expand", &[&gk, &s], vec![])
    } else {
        let r = c.rank(&x)?;
        let axes: Vec<i64> = (2..r as i64).collect();
        let eq = c.em.bin("Equal", &x, &y);
        let mask = c.em.cast(&eq, e);
        let count = c.em.reduce_sum(&mask, &axes, true);
        let share = c.em.bin("Div", &g, &count);
        c.em.bin("Mul", &mask, &share)
    };
    Ok(first(c, dx))
}

/// A per-channel vector `[C]` shaped to broadcast against `[N, C, ...]` of rank `r`.
fn channel(c: &mut Ctx<'_, '_>, v: &str, r: usize) -> String {
    if r <= 2 {
        return v.to_string();
    }
    let axes: Vec<i64> = (1..(r - 1) as i64).collect();
    c.em.unsqueeze(v, &axes)
}

fn batch_norm(c: &mut Ctx<'_, '_>) -> Grads {
    if c.node.attr_i("training_mode").unwrap_or(0) != 0 {
        return Err(
            "training mode (batch statistics) is not supported; export in eval mode".into(),
        );
    }
    let g = c.g()?;
    let x = c.x(0);
    let (scale, mean, var) = (c.x(1), c.x(3), c.x(4));
    let r = c.rank(&x)?;
    let eps = c.node.attr_f("epsilon").unwrap_or(1e-5) as f64;
    let e = c.elem();
    let epsc = c.em.scalar(eps, e);
    let ve = c.em.bin("Add", &var, &epsc);
    let sd = c.em.un("Sqrt", &ve);
    let inv = c.em.un("Reciprocal", &sd);
    let mut axes = vec![0];
    axes.extend(2..r as i64);
    let mut out = none(c);
    if c.need(0) {
        let k = c.em.bin("Mul", &scale, &inv);
        let kc = channel(c, &k, r);
        out[0] = Some(c.em.bin("Mul", &g, &kc));
    }
    let need_centered = c.need(1) || c.need(4);
    let centered = if need_centered {
        let mc = channel(c, &mean, r);
        Some(c.em.bin("Sub", &x, &mc))
    } else {
        None
    };
    if c.need(1) {
        let ic = channel(c, &inv, r);
        let xhat = c.em.bin("Mul", centered.as_ref().expect("centred"), &ic);
        let gx = c.em.bin("Mul", &g, &xhat);
        out[1] = Some(c.em.reduce_sum(&gx, &axes, false));
    }
    let gsum = if c.need(2) || c.need(3) {
        Some(c.em.reduce_sum(&g, &axes, false))
    } else {
        None
    };
    if c.need(2) {
        out[2] = gsum.clone();
    }
    if c.need(3) {
        let k = c.em.bin("Mul", &scale, &inv);
        let t = c.em.bin("Mul", gsum.as_ref().expect("sum"), &k);
        out[3] = Some(c.em.un("Neg", &t));
    }
    if c.need(4) {
        let gx = c.em.bin("Mul", &g, centered.as_ref().expect("centred"));
        let s = c.em.reduce_sum(&gx, &axes, false);
        let inv2 = c.em.bin("Mul", &inv, &inv);
        let inv3 = c.em.bin("Mul", &inv2, &inv);
        let mh = c.em.scalar(-0.5, e);
        let k = c.em.bin("Mul", &scale, &inv3);
        let k = c.em.bin("Mul", &k, &mh);
        out[4] = Some(c.em.bin("Mul", &s, &k));
    }
    Ok(out)
}

/// The input gradient of a normalisation over `axes`: `rstd · (gh − mean(gh) − x̂ ·
/// mean(gh · x̂))`, where `gh` is the gradient of the normalised values `x̂`.
fn normalised_grad(
    c: &mut Ctx<'_, '_>,
    gh: &str,
    xhat: &str,
    rstd: &str,
    stat: &str,
    axes: &[i64],
) -> String {
    let e = c.elem();
    let x = c.x(0);
    let k = c.em.size_ratio(stat, &x, e);
    let m1 = c.em.reduce_sum(gh, axes, true);
    let m1 = c.em.bin("Mul", &m1, &k);
    let gx = c.em.bin("Mul", gh, xhat);
    let m2 = c.em.reduce_sum(&gx, axes, true);
    let m2 = c.em.bin("Mul", &m2, &k);
    let t = c.em.bin("Mul", xhat, &m2);
    let d = c.em.bin("Sub", gh, &m1);
    let d = c.em.bin("Sub", &d, &t);
    c.em.bin("Mul", &d, rstd)
}

fn instance_norm(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (x, scale) = (c.x(0), c.x(1));
    let r = c.rank(&x)?;
    let e = c.elem();
    let eps = c.node.attr_f("epsilon").unwrap_or(1e-5) as f64;
    let axes: Vec<i64> = (2..r as i64).collect();
    // Recompute the statistics: mean and variance over the spatial axes.
    let sum = c.em.reduce_sum(&x, &axes, true);
    let k = c.em.size_ratio(&sum, &x, e);
    let mu = c.em.bin("Mul", &sum, &k);
    let xc = c.em.bin("Sub", &x, &mu);
    let sq = c.em.bin("Mul", &xc, &xc);
    let vs = c.em.reduce_sum(&sq, &axes, true);
    let var = c.em.bin("Mul", &vs, &k);
    let epsc = c.em.scalar(eps, e);
    let ve = c.em.bin("Add", &var, &epsc);
    let sd = c.em.un("Sqrt", &ve);
    let rstd = c.em.un("Reciprocal", &sd);
    let xhat = c.em.bin("Mul", &xc, &rstd);
    let mut all = vec![0];
    all.extend(2..r as i64);
    let mut out = none(c);
    if c.need(0) {
        let sc = channel(c, &scale, r);
        let gh = c.em.bin("Mul", &g, &sc);
        out[0] = Some(normalised_grad(c, &gh, &xhat, &rstd, &sum, &axes));
    }
    if c.need(1) {
        let gx = c.em.bin("Mul", &g, &xhat);
        out[1] = Some(c.em.reduce_sum(&gx, &all, false));
    }
    if c.need(2) {
        out[2] = Some(c.em.reduce_sum(&g, &all, false));
    }
    Ok(out)
}

fn layer_norm(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (x, scale) = (c.x(0), c.x(1));
    let r = c.rank(&x)?;
    let axis = norm_axis(c.node.attr_i("axis").unwrap_or(-1), r);
    let axes: Vec<i64> = (axis as i64..r as i64).collect();
    // Mean and inverse standard deviation are optional outputs of the forward node.
    let stat = |c: &mut Ctx<'_, '_>, slot: usize| -> String {
        match c.node.output.get(slot).filter(|s| !s.is_empty()) {
            Some(n) => n.clone(),
            None => {
                let key = (c.index, slot);
                if let Some(n) = c.em.extra_outputs.get(&key) {
                    return n.clone();
                }
                let n = c.em.fresh("layernorm_stat");
                c.em.extra_outputs.insert(key, n.clone());
                n
            }
        }
    };
    let mean = stat(c, 1);
    let rstd = stat(c, 2);
    let e = c.elem();
    let stash = c.node.attr_i("stash_type").unwrap_or(1) as i32;
    let (mean, rstd) = if stash != e {
        (c.em.cast(&mean, e), c.em.cast(&rstd, e))
    } else {
        (mean, rstd)
    };
    let xc = c.em.bin("Sub", &x, &mean);
    let xhat = c.em.bin("Mul", &xc, &rstd);
    let ydims = c.dims(&c.y(0));
    let mut out = none(c);
    if c.need(0) {
        let gh = c.em.bin("Mul", &g, &scale);
        out[0] = Some(normalised_grad(c, &gh, &xhat, &rstd, &mean, &axes));
    }
    if c.need(1) {
        let gx = c.em.bin("Mul", &g, &xhat);
        out[1] = Some(c.em.unbroadcast(&gx, ydims.as_deref(), &scale)?);
    }
    if c.need(2) {
        let b = c.x(2);
        out[2] = Some(c.em.unbroadcast(&g, ydims.as_deref(), &b)?);
    }
    Ok(out)
}

fn reshape(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let dx = c.em.reshape_like(&g, &x);
    Ok(first(c, dx))
}

fn transpose(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let perm: Vec<usize> = match c.node.attr_ints("perm") {
        Some(p) => {
            let r = p.len();
            p.iter().map(|&k| norm_axis(k, r)).collect()
        }
        None => (0..c.rank(&x)?).rev().collect(),
    };
    let mut inverse = vec![0i64; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i as i64;
    }
    let dx = c.em.transpose(&g, &inverse);
    Ok(first(c, dx))
}

fn expand(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let dx = c.unb(&g, 0)?;
    Ok(first(c, dx))
}

fn concat(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let n = c.n();
    if n == 1 {
        return Ok(first(c, g));
    }
    let x0 = c.x(0);
    let r = c.rank(&x0)?;
    let axis = norm_axis(c.node.attr_i("axis").unwrap_or(0), r);
    let inputs: Vec<String> = (0..n).map(|k| c.x(k)).collect();
    let parts: Vec<Part<'_>> = inputs.iter().map(|x| Part::Of(x, axis)).collect();
    let sizes = c.em.shape_vec(&parts);
    let pieces = c.em.op_n(
        "Split",
        &[&g, &sizes],
        vec![attr_int("axis", axis as i64)],
        n,
    );
    let mut out = none(c);
    for (k, piece) in pieces.into_iter().enumerate() {
        if c.need(k) {
            out[k] = Some(piece);
        }
    }
    Ok(out)
}

fn split(c: &mut Ctx<'_, '_>) -> Grads {
    let x = c.x(0);
    let r = c.rank(&x)?;
    let axis = norm_axis(c.node.attr_i("axis").unwrap_or(0), r);
    let e = c.elem();
    let mut parts = Vec::new();
    for k in 0..c.node.output.len() {
        let part = match c.gout[k].clone() {
            Some(g) => g,
            None => {
                let y = c.y(k);
                c.em.zeros_like(&y, e)
            }
        };
        parts.push(part);
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let dx =
        c.em.op("Concat", &refs, vec![attr_int("axis", axis as i64)]);
    Ok(first(c, dx))
}

fn slice(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let e = c.elem();
    // With constant bounds, unit steps and known lengths along the sliced axes, the gradient is
    // the output gradient padded with zeros.
    let fast = (|| {
        let xd = c.dims(&x)?;
        let r = xd.len();
        let starts = c.em.shapes.ints(&c.x(1))?;
        let ends = c.em.shapes.ints(&c.x(2))?;
        let axes: Vec<usize> = if c.has_input(3) {
            c.em.shapes
                .ints(&c.x(3))?
                .iter()
                .map(|&a| norm_axis(a, r))
                .collect()
        } else {
            (0..starts.len()).collect()
        };
        if c.has_input(4) && c.em.shapes.ints(&c.x(4))?.iter().any(|&s| s != 1) {
            return None;
        }
        let mut pads = vec![0i64; 2 * r];
        for (k, &a) in axes.iter().enumerate() {
            let n = xd.get(a)?.known()?;
            let (s, en) = slice_bounds(n, starts[k], ends[k], 1);
            pads[a] = s;
            pads[a + r] = (n - en.max(s)).max(0);
        }
        Some(pads)
    })();
    let dx = match fast {
        Some(pads) if pads.iter().all(|&p| p == 0) => g,
        Some(pads) => {
            let p = c.em.ints(&pads);
            c.em.op("Pad", &[&g, &p], vec![])
        }
        None => {
            let node = c.node.clone();
            c.em.index_map_vjp(&x, &g, e, false, |em, positions, _| {
                let mut inputs: Vec<&str> = node.input.iter().map(String::as_str).collect();
                inputs[0] = positions;
                em.op("Slice", &inputs, vec![])
            })
        }
    };
    Ok(first(c, dx))
}

fn pad(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let e = c.elem();
    let mode = c.node.attr_s("mode").unwrap_or("constant").to_string();
    // A constant pad with known, non-negative pads and sizes: slice the gradient back out.
    if mode == "constant" && !c.has_input(3) {
        if let (Some(pads), Some(xd)) = (c.em.shapes.ints(&c.x(1)), c.dims(&x)) {
            let r = xd.len();
            let known: Option<Vec<i64>> = xd.iter().map(Dim::known).collect();
            if let (true, Some(known)) =
                (pads.len() == 2 * r && pads.iter().all(|&p| p >= 0), known)
            {
                let starts: Vec<i64> = pads[..r].to_vec();
                let ends: Vec<i64> = (0..r).map(|k| pads[k] + known[k]).collect();
                let s = c.em.ints(&starts);
                let en = c.em.ints(&ends);
                let dx = c.em.op("Slice", &[&g, &s, &en], vec![]);
                return Ok(first(c, dx));
            }
        }
    }
    let node = c.node.clone();
    let constant = mode == "constant";
    let dx = c.em.index_map_vjp(&x, &g, e, constant, |em, positions, n| {
        let mut inputs: Vec<String> = node.input.clone();
        inputs[0] = positions.to_string();
        if constant {
            // Padding reads position `size(x)`, the slot that is dropped.
            inputs.resize(inputs.len().max(3), String::new());
            inputs[2] = n.to_string();
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        em.op("Pad", &refs, node.attribute.clone())
    });
    Ok(first(c, dx))
}

/// Operators that move or copy elements of input 0, whatever their other inputs.
fn index_op(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let x = c.x(0);
    let e = c.elem();
    let node = c.node.clone();
    // ONNX Runtime moves only float tensors with DepthToSpace and SpaceToDepth; doubles hold
    // positions exactly up to 2^53.
    let via_double = matches!(node.op(), "DepthToSpace" | "SpaceToDepth");
    let dx = c.em.index_map_vjp(&x, &g, e, false, |em, positions, _| {
        let moved = if via_double {
            em.cast(positions, elem::DOUBLE)
        } else {
            positions.to_string()
        };
        let mut inputs: Vec<&str> = node.input.iter().map(String::as_str).collect();
        inputs[0] = &moved;
        let out = em.op(node.op(), &inputs, node.attribute.clone());
        if via_double {
            em.cast(&out, elem::INT64)
        } else {
            out
        }
    });
    Ok(first(c, dx))
}

fn resize(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let mode = c.node.attr_s("mode").unwrap_or("nearest");
    if mode != "nearest" {
        return Err(format!(
            "mode `{mode}` is not supported; only nearest-neighbour resizing is"
        ));
    }
    let x = c.x(0);
    let e = c.elem();
    let node = c.node.clone();
    // ONNX Runtime resizes int32 but not int64 tensors.
    let dx = c.em.index_map_vjp(&x, &g, e, false, |em, positions, _| {
        let p32 = em.cast(positions, elem::INT32);
        let mut inputs: Vec<&str> = node.input.iter().map(String::as_str).collect();
        inputs[0] = &p32;
        let r = em.op(node.op(), &inputs, node.attribute.clone());
        em.cast(&r, elem::INT64)
    });
    Ok(first(c, dx))
}

fn scatter(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let reduction = c.node.attr_s("reduction").unwrap_or("none").to_string();
    let elements = c.node.op() == "ScatterElements";
    let (indices, updates) = (c.x(1), c.x(2));
    let axis_attr = || vec![attr_int("axis", c.node.attr_i("axis").unwrap_or(0))];
    let gather = |c: &mut Ctx<'_, '_>| -> String {
        if elements {
            let attrs = axis_attr();
            c.em.op("GatherElements", &[&g, &indices], attrs)
        } else {
            c.em.op("GatherND", &[&g, &indices], vec![])
        }
    };
    let mut out = none(c);
    match reduction.as_str() {
        "none" => {
            if c.need(0) {
                // Overwritten elements get no gradient.
                let e = c.elem();
                let z = c.em.zeros_like(&updates, e);
                let attrs = if elements { axis_attr() } else { vec![] };
                out[0] = Some(c.em.op(c.node.op(), &[&g, &indices, &z], attrs));
            }
        }
        "add" => {
            if c.need(0) {
                out[0] = Some(g.clone());
            }
        }
        other => {
            return Err(format!(
                "reduction `{other}` is not supported (only `none` and `add` are)"
            ))
        }
    }
    if c.need(2) {
        out[2] = Some(gather(c));
    }
    Ok(out)
}

fn reduce(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (x, y) = (c.x(0), c.y(0));
    let r = c.rank(&x)?;
    let axes = if let Some(a) = c.node.attr_ints("axes") {
        a.to_vec()
    } else if c.has_input(1) {
        c.ints_input(1, "axes")?
    } else {
        Vec::new()
    };
    let keep = c.node.attr_i("keepdims").unwrap_or(1) != 0;
    let noop = c.node.attr_i("noop_with_empty_axes").unwrap_or(0) != 0;
    if axes.is_empty() && noop {
        return Ok(first(c, g));
    }
    let mut axes: Vec<i64> = if axes.is_empty() {
        (0..r as i64).collect()
    } else {
        axes.iter().map(|&a| norm_axis(a, r) as i64).collect()
    };
    axes.sort_unstable();
    axes.dedup();
    let (gk, yk) = if keep {
        (g.clone(), y.clone())
    } else {
        (c.em.unsqueeze(&g, &axes), c.em.unsqueeze(&y, &axes))
    };
    let e = c.elem();
    let dx = match c.node.op() {
        "ReduceSum" => {
            let s = c.em.shape(&x);
            c.em.op("Expand", &[&gk, &s], vec![])
        }
        "ReduceMean" => {
            let k = c.em.size_ratio(&y, &x, e);
            let gm = c.em.bin("Mul", &gk, &k);
            let s = c.em.shape(&x);
            c.em.op("Expand", &[&gm, &s], vec![])
        }
        "ReduceSumSquare" => {
            let two = c.scalar(2.0);
            let t = c.em.bin("Mul", &x, &two);
            c.em.bin("Mul", &t, &gk)
        }
        "ReduceL1" => {
            let s = c.em.un("Sign", &x);
            c.em.bin("Mul", &s, &gk)
        }
        "ReduceL2" => {
            let t = c.em.bin("Div", &x, &yk);
            c.em.bin("Mul", &t, &gk)
        }
        "ReduceLogSumExp" => {
            let d = c.em.bin("Sub", &x, &yk);
            let p = c.em.un("Exp", &d);
            c.em.bin("Mul", &p, &gk)
        }
        _ => {
            // ReduceMax / ReduceMin: the gradient goes to the extreme elements, shared by ties.
            let eq = c.em.bin("Equal", &x, &yk);
            let mask = c.em.cast(&eq, e);
            let count = c.em.reduce_sum(&mask, &axes, true);
            let share = c.em.bin("Div", &gk, &count);
            c.em.bin("Mul", &mask, &share)
        }
    };
    Ok(first(c, dx))
}

fn cumsum(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let axis = c.x(1);
    let reverse = c.node.attr_i("reverse").unwrap_or(0) != 0;
    let exclusive = c.node.attr_i("exclusive").unwrap_or(0);
    let dx = c.em.op(
        "CumSum",
        &[&g, &axis],
        vec![
            attr_int("reverse", (!reverse) as i64),
            attr_int("exclusive", exclusive),
        ],
    );
    Ok(first(c, dx))
}

fn top_k(c: &mut Ctx<'_, '_>) -> Grads {
    let g = c.g()?;
    let (x, indices) = (c.x(0), c.y(1));
    let e = c.elem();
    let z = c.em.zeros_like(&x, e);
    let axis = c.node.attr_i("axis").unwrap_or(-1);
    let dx = c.em.op(
        "ScatterElements",
        &[&z, &indices, &g],
        vec![attr_int("axis", axis), attr_string("reduction", "add")],
    );
    Ok(first(c, dx))
}
