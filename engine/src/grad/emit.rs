//! Writing the nodes of the reverse graph: fresh names, constants, shape vectors, and the few
//! compound steps many rules share (undoing a broadcast, scattering through an index map).
//!
//! Decisions:
//! - Constants are initializers, created once per distinct value and element type.
//! - A shape vector whose lengths are all known statically is a constant; otherwise the unknown
//!   lengths are read at run time with `Shape` and the pieces concatenated. The same rule code
//!   thus serves fixed-size and dynamic (batch) axes, and the static case costs no extra nodes.
//! - Only operators whose signatures are the same from opset 13 to 21 are emitted (`ReduceSum`
//!   with axes as an input, never `ReduceMean`/`ReduceMax`, whose axes moved in opset 18), so
//!   the reverse graph is valid in the forward model's own opset.

use std::collections::{HashMap, HashSet};

use super::onnx::{
    attr_int, attr_ints, attr_tensor, elem, float_tensor, int_tensor, AttributeProto, NodeProto,
    TensorProto,
};
use super::shape::{Dim, Shapes};

/// One length of a shape vector being built.
#[derive(Clone, Debug)]
pub(crate) enum Part<'s> {
    /// A fixed length (or a `Reshape` code such as -1).
    Fixed(i64),
    /// The length of axis `.1` of tensor `.0`.
    Of(&'s str, usize),
}

/// Builds the nodes of the reverse graph.
pub(crate) struct Emitter<'a> {
    /// New nodes, in the order they must run.
    pub nodes: Vec<NodeProto>,
    /// New initializers (constants).
    pub initializers: Vec<TensorProto>,
    /// Types and shapes of the forward graph's tensors.
    pub shapes: &'a Shapes,
    /// Extra outputs requested from forward nodes: (node index, output slot) -> name.
    pub extra_outputs: HashMap<(usize, usize), String>,
    taken: HashSet<String>,
    counter: usize,
    consts: HashMap<(i32, Vec<i64>, Vec<u64>), String>,
    shape_cache: HashMap<String, String>,
    /// A short name for the node whose rule is running, used in new tensor names.
    pub scope: String,
}

impl<'a> Emitter<'a> {
    /// An emitter for a graph whose tensor names are `taken`.
    pub(crate) fn new(shapes: &'a Shapes, taken: HashSet<String>) -> Self {
        Emitter {
            nodes: Vec::new(),
            initializers: Vec::new(),
            shapes,
            extra_outputs: HashMap::new(),
            taken,
            counter: 0,
            consts: HashMap::new(),
            shape_cache: HashMap::new(),
            scope: String::new(),
        }
    }

    /// A tensor name not used anywhere in the graph.
    pub(crate) fn fresh(&mut self, hint: &str) -> String {
        loop {
            self.counter += 1;
            let name = if self.scope.is_empty() {
                format!("vjp/{hint}_{}", self.counter)
            } else {
                format!("vjp/{}/{hint}_{}", self.scope, self.counter)
            };
            if self.taken.insert(name.clone()) {
                return name;
            }
        }
    }

    /// Reserves a name chosen by the caller; false when it is already used.
    pub(crate) fn reserve(&mut self, name: &str) -> bool {
        self.taken.insert(name.to_string())
    }

    /// Adds a node with one output and returns the output's name.
    pub(crate) fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.op_n(op, inputs, attrs, 1).pop().expect("one output")
    }

    /// Adds a node with `n` outputs and returns their names.
    pub(crate) fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let outputs: Vec<String> = (0..n)
            .map(|_| self.fresh(&op.to_ascii_lowercase()))
            .collect();
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: Some(name),
            op_type: Some(op.to_string()),
            attribute: attrs,
            ..Default::default()
        });
        outputs
    }

    /// Adds a node writing to outputs named by the caller.
    pub(crate) fn op_into(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        outputs: &[&str],
    ) {
        let name = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: Some(name),
            op_type: Some(op.to_string()),
            attribute: attrs,
            ..Default::default()
        });
    }

    fn constant(&mut self, elem_type: i32, dims: &[i64], ints: &[i64], floats: &[f64]) -> String {
        let key = (
            elem_type,
            [dims, ints].concat(),
            floats.iter().map(|f| f.to_bits()).collect(),
        );
        if let Some(name) = self.consts.get(&key) {
            return name.clone();
        }
        let name = self.fresh("const");
        let t = if elem_type == elem::INT64 {
            int_tensor(&name, dims, ints)
        } else {
            float_tensor(&name, elem_type, dims, floats)
        };
        self.initializers.push(t);
        self.consts.insert(key, name.clone());
        name
    }

    /// A 1-D int64 constant.
    pub(crate) fn ints(&mut self, v: &[i64]) -> String {
        self.constant(elem::INT64, &[v.len() as i64], v, &[])
    }

    /// A 0-D int64 constant.
    pub(crate) fn int_scalar(&mut self, v: i64) -> String {
        self.constant(elem::INT64, &[], &[v], &[])
    }

    /// A 0-D float constant of element type `elem_type`.
    pub(crate) fn scalar(&mut self, v: f64, elem_type: i32) -> String {
        self.constant(elem_type, &[], &[], &[v])
    }

    /// A float constant of element type `elem_type` with the given shape and values.
    pub(crate) fn float_array(&mut self, dims: &[i64], v: &[f64], elem_type: i32) -> String {
        self.constant(elem_type, dims, &[], v)
    }

    /// The shape of forward tensor `x` as a 1-D int64 tensor: a constant when fully known.
    pub(crate) fn shape(&mut self, x: &str) -> String {
        if let Some(dims) = self.shapes.dims(x) {
            if let Some(fixed) = dims.iter().map(Dim::known).collect::<Option<Vec<i64>>>() {
                return self.ints(&fixed);
            }
        }
        if let Some(s) = self.shape_cache.get(x) {
            return s.clone();
        }
        let s = self.op("Shape", &[x], vec![]);
        self.shape_cache.insert(x.to_string(), s.clone());
        s
    }

    /// The length of axis `axis` of forward tensor `x`, when known statically.
    pub(crate) fn known_dim(&self, x: &str, axis: usize) -> Option<i64> {
        self.shapes.dims(x)?.get(axis)?.known()
    }

    /// A 1-D int64 shape vector made of fixed lengths and axes of other tensors.
    pub(crate) fn shape_vec(&mut self, parts: &[Part<'_>]) -> String {
        let mut pieces: Vec<String> = Vec::new();
        let mut run: Vec<i64> = Vec::new();
        for part in parts {
            let fixed = match part {
                Part::Fixed(n) => Some(*n),
                Part::Of(x, axis) => self.known_dim(x, *axis),
            };
            match (fixed, part) {
                (Some(n), _) => run.push(n),
                (None, Part::Of(x, axis)) => {
                    if !run.is_empty() {
                        let c = self.ints(&run);
                        pieces.push(c);
                        run.clear();
                    }
                    let s = self.shape(x);
                    let start = self.ints(&[*axis as i64]);
                    let end = self.ints(&[*axis as i64 + 1]);
                    pieces.push(self.op("Slice", &[&s, &start, &end], vec![]));
                }
                (None, Part::Fixed(_)) => unreachable!("a fixed part is known"),
            }
        }
        if !run.is_empty() {
            let c = self.ints(&run);
            pieces.push(c);
        }
        if pieces.len() == 1 {
            return pieces.pop().expect("one piece");
        }
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        self.op("Concat", &refs, vec![attr_int("axis", 0)])
    }

    /// `x` reshaped to the shape of forward tensor `like`.
    pub(crate) fn reshape_like(&mut self, x: &str, like: &str) -> String {
        let s = self.shape(like);
        self.op("Reshape", &[x, &s], vec![])
    }

    /// `x` reshaped to `shape`.
    pub(crate) fn reshape(&mut self, x: &str, shape: &str) -> String {
        self.op("Reshape", &[x, shape], vec![])
    }

    /// `x` flattened to one axis.
    pub(crate) fn flatten(&mut self, x: &str) -> String {
        let s = self.ints(&[-1]);
        self.op("Reshape", &[x, &s], vec![])
    }

    /// `x` with axes permuted.
    pub(crate) fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    /// `ReduceSum` over `axes`.
    pub(crate) fn reduce_sum(&mut self, x: &str, axes: &[i64], keep: bool) -> String {
        let a = self.ints(axes);
        self.op(
            "ReduceSum",
            &[x, &a],
            vec![attr_int("keepdims", keep as i64)],
        )
    }

    /// `x` with length-1 axes inserted at `axes` (of the result).
    pub(crate) fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.ints(axes);
        self.op("Unsqueeze", &[x, &a], vec![])
    }

    /// Element-wise binary operator.
    pub(crate) fn bin(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(op, &[a, b], vec![])
    }

    /// Element-wise unary operator.
    pub(crate) fn un(&mut self, op: &str, a: &str) -> String {
        self.op(op, &[a], vec![])
    }

    /// `x` converted to element type `to`.
    pub(crate) fn cast(&mut self, x: &str, to: i32) -> String {
        self.op("Cast", &[x], vec![attr_int("to", to as i64)])
    }

    /// The sum of several tensors of one shape.
    pub(crate) fn sum(&mut self, mut parts: Vec<String>) -> String {
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.op("Sum", &refs, vec![])
    }

    /// Zeros of the shape given by the 1-D int64 tensor `shape`.
    pub(crate) fn zeros_of_shape(&mut self, shape: &str, elem_type: i32) -> String {
        let value = float_tensor("value", elem_type, &[1], &[0.0]);
        self.op(
            "ConstantOfShape",
            &[shape],
            vec![attr_tensor("value", value)],
        )
    }

    /// Zeros shaped like forward tensor `x`.
    pub(crate) fn zeros_like(&mut self, x: &str, elem_type: i32) -> String {
        let s = self.shape(x);
        self.zeros_of_shape(&s, elem_type)
    }

    /// The element count of forward tensor `x` as a 0-D int64 tensor.
    pub(crate) fn size(&mut self, x: &str) -> String {
        if let Some(dims) = self.shapes.dims(x) {
            if let Some(fixed) = dims.iter().map(Dim::known).collect::<Option<Vec<i64>>>() {
                return self.int_scalar(fixed.iter().product());
            }
        }
        self.op("Size", &[x], vec![])
    }

    /// The ratio `size(small) / size(big)` as a 0-D float (1 / the count a mean divides by).
    pub(crate) fn size_ratio(&mut self, small: &str, big: &str, elem_type: i32) -> String {
        let known = |x: &str| -> Option<i64> {
            self.shapes
                .dims(x)?
                .iter()
                .map(Dim::known)
                .product::<Option<i64>>()
        };
        if let (Some(s), Some(b)) = (known(small), known(big)) {
            return self.scalar(s as f64 / b.max(1) as f64, elem_type);
        }
        let s = self.op("Size", &[small], vec![]);
        let b = self.op("Size", &[big], vec![]);
        let s = self.cast(&s, elem_type);
        let b = self.cast(&b, elem_type);
        self.bin("Div", &s, &b)
    }

    /// Sums `g`, whose axes are `g_dims`, over the axes along which forward tensor `target` was
    /// broadcast, and gives it `target`'s shape.
    ///
    /// Decided statically when the lengths allow; otherwise the axes are found at run time.
    pub(crate) fn unbroadcast(
        &mut self,
        g: &str,
        g_dims: Option<&[Dim]>,
        target: &str,
    ) -> Result<String, String> {
        let (Some(t_dims), Some(g_dims)) = (self.shapes.dims(target), g_dims) else {
            // A rank is unknown (an operator shape inference does not cover): decide it all at
            // run time.
            return Ok(self.unbroadcast_at_run_time(g, None, target));
        };
        let t_dims = t_dims.to_vec();
        let g_rank = g_dims.len();
        if g_rank < t_dims.len() {
            return Err(format!(
                "`{target}` has rank {} but the result it was broadcast into has rank {g_rank}",
                t_dims.len()
            ));
        }
        if g_dims == t_dims.as_slice() {
            return Ok(g.to_string());
        }
        let lead = g_rank - t_dims.len();
        let mut axes: Vec<i64> = (0..lead as i64).collect();
        let mut dynamic = false;
        for (k, td) in t_dims.iter().enumerate() {
            let gd = &g_dims[lead + k];
            match (td, gd) {
                (Dim::Known(1), Dim::Known(1)) => {}
                (Dim::Known(1), _) => axes.push((lead + k) as i64),
                (Dim::Known(_), _) => {}
                (a, b) if a == b => {}
                _ => dynamic = true,
            }
        }
        if dynamic {
            return Ok(self.unbroadcast_at_run_time(g, Some(lead), target));
        }
        if axes.is_empty() {
            return Ok(self.reshape_like(g, target));
        }
        let r = self.reduce_sum(g, &axes, true);
        Ok(self.reshape_like(&r, target))
    }

    /// [`Emitter::unbroadcast`] with the axes found at run time: `g` is summed over every axis
    /// where `target`'s shape, left-padded with ones to `g`'s rank, has length 1 (summing over
    /// an axis of length 1 on both sides changes nothing). `lead` is the rank difference when
    /// known statically.
    fn unbroadcast_at_run_time(&mut self, g: &str, lead: Option<usize>, target: &str) -> String {
        let tshape = self.shape(target);
        let padded = match lead {
            Some(0) => tshape,
            Some(lead) => {
                let ones = self.ints(&vec![1; lead]);
                self.op("Concat", &[&ones, &tshape], vec![attr_int("axis", 0)])
            }
            None => {
                let gshape = self.op("Shape", &[g], vec![]);
                let g_rank = self.op("Size", &[&gshape], vec![]);
                let t_rank = self.op("Size", &[&tshape], vec![]);
                let lead = self.bin("Sub", &g_rank, &t_rank);
                let one_d = self.ints(&[1]);
                let lead = self.reshape(&lead, &one_d);
                let value = int_tensor("value", &[1], &[1]);
                let ones = self.op(
                    "ConstantOfShape",
                    &[&lead],
                    vec![attr_tensor("value", value)],
                );
                self.op("Concat", &[&ones, &tshape], vec![attr_int("axis", 0)])
            }
        };
        let one = self.int_scalar(1);
        let mask = self.bin("Equal", &padded, &one);
        let nz = self.un("NonZero", &mask);
        let flat = self.flatten(&nz);
        let r = self.op(
            "ReduceSum",
            &[g, &flat],
            vec![attr_int("keepdims", 1), attr_int("noop_with_empty_axes", 1)],
        );
        self.reshape_like(&r, target)
    }

    /// The transpose of a linear operator that only moves or copies elements of forward tensor
    /// `x`: `map` applies the operator to a tensor of `x`'s element positions, and the output
    /// gradient `g` is scatter-added back to the positions it came from. With `dump`, position
    /// `size(x)` stands for "no element" (padding) and is dropped.
    pub(crate) fn index_map_vjp(
        &mut self,
        x: &str,
        g: &str,
        elem_type: i32,
        dump: bool,
        map: impl FnOnce(&mut Self, &str, &str) -> String,
    ) -> String {
        let shape = self.shape(x);
        let n = self.size(x);
        let zero = self.int_scalar(0);
        let one = self.int_scalar(1);
        let range = self.op("Range", &[&zero, &n, &one], vec![]);
        let positions = self.reshape(&range, &shape);
        let mapped = map(self, &positions, &n);
        let flat_positions = self.flatten(&mapped);
        let flat_g = self.flatten(g);
        let slots = if dump {
            self.bin("Add", &n, &one)
        } else {
            n.clone()
        };
        let one_d = self.ints(&[1]);
        let slots = self.reshape(&slots, &one_d);
        let acc = self.zeros_of_shape(&slots, elem_type);
        let mut out = self.op(
            "ScatterElements",
            &[&acc, &flat_positions, &flat_g],
            vec![
                attr_int("axis", 0),
                super::onnx::attr_string("reduction", "add"),
            ],
        );
        if dump {
            let start = self.ints(&[0]);
            let end = self.reshape(&n, &one_d);
            out = self.op("Slice", &[&out, &start, &end], vec![]);
        }
        self.reshape(&out, &shape)
    }
}
