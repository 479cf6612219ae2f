//! Graphs for node and graph classification: the `graph-load` source and the `classify` stage,
//! with the classifiers behind it (a two-layer GCN and logistic regression) trained natively in
//! Rust.
//!
//! A graph travels through a pipeline as plain tensor fields of one record, so any stage can
//! read them and the planner can check them:
//!
//! | field | type | what |
//! |---|---|---|
//! | `x` | `f32[nodes, features]` | node features |
//! | `edge_index` | `i64[2, edges]` | source row, target row; sorted, no duplicates |
//! | `y` | `i64[nodes]` or `int` | node labels (−1: unlabelled), or the graph's label |
//! | `train_mask`, `val_mask`, `test_mask` | `i64[nodes]` | 1 for nodes in the split part |
//!
//! Class-balanced reinforced active learning (the `gcbr` stage) lives in [`gcbr`], [`agent`]
//! (episodes, agents, A2C training), [`state`], [`policy`], [`retrain`] (the GCN retrained after
//! every pick), [`oracle`] and [`pagerank`].
//!
//! Inside Rust a graph is a [`Graph`]: features in compressed sparse rows ([`Csr`]), since
//! citation graphs have bag-of-words features that are over 98% zeros, and training touches
//! only the non-zeros (dropout included); labels; and the split as node lists.
//!
//! Decisions:
//! - Edges are unweighted: a weighted adjacency on disk is read as its pattern.
//! - Message passing runs from source to target; the GCN's normalised adjacency uses in-degrees
//!   (with the self loop), which is the symmetric normalisation when the graph is undirected.
//! - Randomness (initialisation, dropout, random splits) comes from one seeded [`Rng`], so a
//!   seed fixes a result on every machine and for any number of workers.

pub mod agent;
pub mod classify;
pub mod embed;
pub mod embed_incremental;
pub mod gcbr;
pub mod gcn;
pub mod load;
pub mod logreg;
pub mod metrics;
pub mod oracle;
pub mod pagerank;
pub mod policy;
pub mod relief;
pub mod relief_baselines;
pub mod relief_policy;
pub mod relief_stage;
pub mod retrain;
pub mod state;
pub mod subgraph;

use latentflow_engine::{
    DType, Dim, FieldType, Params, Plan, PlanIssue, Record, Schema, Shape, Tensor, Value,
};
use ndarray::{Array1, Array2, ArrayD, ArrayView2, IxDyn};

pub use classify::ClassifyStage;
pub use gcbr::GcbrStage;
pub use load::GraphLoadSource;
pub use relief_stage::ReliefStage;

// ---------------------------------------------------------------------------------------------
// Sparse matrices.

/// A sparse `f32` matrix in compressed sparse rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Csr {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Row `i` holds entries `indptr[i]..indptr[i + 1]`; `rows + 1` long.
    pub indptr: Vec<usize>,
    /// Column of each entry, increasing within a row.
    pub indices: Vec<usize>,
    /// Value of each entry.
    pub data: Vec<f32>,
}

impl Csr {
    /// The non-zero entries of a dense matrix.
    pub fn from_dense(a: ArrayView2<f32>) -> Self {
        let (rows, cols) = a.dim();
        let mut indptr = Vec::with_capacity(rows + 1);
        let mut indices = Vec::new();
        let mut data = Vec::new();
        indptr.push(0);
        for row in a.rows() {
            for (j, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    indices.push(j);
                    data.push(v);
                }
            }
            indptr.push(indices.len());
        }
        Csr {
            rows,
            cols,
            indptr,
            indices,
            data,
        }
    }

    /// A matrix from `(row, column, value)` entries in any order; duplicates are summed.
    pub fn from_triplets(rows: usize, cols: usize, mut entries: Vec<(usize, usize, f32)>) -> Self {
        entries.sort_unstable_by_key(|&(i, j, _)| (i, j));
        let mut indptr = vec![0; rows + 1];
        let mut indices: Vec<usize> = Vec::with_capacity(entries.len());
        let mut data: Vec<f32> = Vec::with_capacity(entries.len());
        let mut last = None;
        for (i, j, v) in entries {
            if last == Some((i, j)) {
                *data.last_mut().expect("an entry") += v;
                continue;
            }
            last = Some((i, j));
            indices.push(j);
            data.push(v);
            indptr[i + 1] += 1;
        }
        for i in 0..rows {
            indptr[i + 1] += indptr[i];
        }
        Csr {
            rows,
            cols,
            indptr,
            indices,
            data,
        }
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.data.len()
    }

    /// Columns and values of row `i`.
    pub fn row(&self, i: usize) -> (&[usize], &[f32]) {
        let r = self.indptr[i]..self.indptr[i + 1];
        (&self.indices[r.clone()], &self.data[r])
    }

    /// The dense matrix.
    pub fn to_dense(&self) -> Array2<f32> {
        let mut out = Array2::zeros((self.rows, self.cols));
        for i in 0..self.rows {
            let (cols, vals) = self.row(i);
            for (&j, &v) in cols.iter().zip(vals) {
                out[[i, j]] = v;
            }
        }
        out
    }

    /// Divides every row by its sum (rows summing to zero are left alone), as Kipf and
    /// Welling preprocess bag-of-words features.
    pub fn row_normalise(&mut self) {
        for i in 0..self.rows {
            let r = self.indptr[i]..self.indptr[i + 1];
            let sum: f32 = self.data[r.clone()].iter().sum();
            if sum != 0.0 {
                self.data[r].iter_mut().for_each(|v| *v /= sum);
            }
        }
    }

    /// The same pattern with other values.
    pub fn with_data(&self, data: Vec<f32>) -> Csr {
        assert_eq!(data.len(), self.nnz(), "one value per stored entry");
        Csr {
            rows: self.rows,
            cols: self.cols,
            indptr: self.indptr.clone(),
            indices: self.indices.clone(),
            data,
        }
    }

    /// `self · b` for a dense `b` of `[cols, k]`.
    pub fn matmul(&self, b: &Array2<f32>) -> Array2<f32> {
        assert_eq!(b.nrows(), self.cols, "inner dimensions");
        let k = b.ncols();
        let b = b.as_standard_layout();
        let bs = b.as_slice().expect("standard layout");
        let mut out = vec![0f32; self.rows * k];
        for (i, out_row) in out.chunks_exact_mut(k.max(1)).enumerate().take(self.rows) {
            let (cols, vals) = self.row(i);
            for (&j, &v) in cols.iter().zip(vals) {
                let b_row = &bs[j * k..(j + 1) * k];
                for (o, &x) in out_row.iter_mut().zip(b_row) {
                    *o += v * x;
                }
            }
        }
        Array2::from_shape_vec((self.rows, k), out).expect("shape")
    }

    /// `selfᵀ · b` for a dense `b` of `[rows, k]`, without forming the transpose.
    pub fn t_matmul(&self, b: &Array2<f32>) -> Array2<f32> {
        assert_eq!(b.nrows(), self.rows, "inner dimensions");
        let k = b.ncols();
        let b = b.as_standard_layout();
        let bs = b.as_slice().expect("standard layout");
        let mut out = vec![0f32; self.cols * k];
        for i in 0..self.rows {
            let b_row = &bs[i * k..(i + 1) * k];
            let (cols, vals) = self.row(i);
            for (&j, &v) in cols.iter().zip(vals) {
                let out_row = &mut out[j * k..(j + 1) * k];
                for (o, &x) in out_row.iter_mut().zip(b_row) {
                    *o += v * x;
                }
            }
        }
        Array2::from_shape_vec((self.cols, k), out).expect("shape")
    }
}

/// Dense products for the small matrices of the classifiers (`[nodes, hidden] × [hidden,
/// classes]`), written as plain loops over rows: they are compiled with this crate, where
/// ndarray's general matrix product would run unoptimised in debug builds.
pub(crate) mod dense {
    use ndarray::Array2;

    fn rows(a: &Array2<f32>) -> std::borrow::Cow<'_, [f32]> {
        match a.as_slice() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(a.iter().copied().collect()),
        }
    }

    /// `a · b`.
    pub fn matmul(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f32> {
        let (n, k) = a.dim();
        let m = b.ncols();
        assert_eq!(b.nrows(), k, "inner dimensions");
        let (a, b) = (rows(a), rows(b));
        let mut out = vec![0f32; n * m];
        for i in 0..n {
            let o = &mut out[i * m..(i + 1) * m];
            for (p, &x) in a[i * k..(i + 1) * k].iter().enumerate() {
                for (o, &y) in o.iter_mut().zip(&b[p * m..(p + 1) * m]) {
                    *o += x * y;
                }
            }
        }
        Array2::from_shape_vec((n, m), out).expect("shape")
    }

    /// `aᵀ · b`.
    pub fn matmul_tn(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f32> {
        let (n, k) = a.dim();
        let m = b.ncols();
        assert_eq!(b.nrows(), n, "inner dimensions");
        let (a, b) = (rows(a), rows(b));
        let mut out = vec![0f32; k * m];
        for i in 0..n {
            let b_row = &b[i * m..(i + 1) * m];
            for (p, &x) in a[i * k..(i + 1) * k].iter().enumerate() {
                for (o, &y) in out[p * m..(p + 1) * m].iter_mut().zip(b_row) {
                    *o += x * y;
                }
            }
        }
        Array2::from_shape_vec((k, m), out).expect("shape")
    }

    /// `a · bᵀ`.
    pub fn matmul_nt(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f32> {
        let (n, k) = a.dim();
        let m = b.nrows();
        assert_eq!(b.ncols(), k, "inner dimensions");
        let (a, b) = (rows(a), rows(b));
        let mut out = vec![0f32; n * m];
        for i in 0..n {
            let a_row = &a[i * k..(i + 1) * k];
            for (j, o) in out[i * m..(i + 1) * m].iter_mut().enumerate() {
                *o = a_row
                    .iter()
                    .zip(&b[j * k..(j + 1) * k])
                    .map(|(x, y)| x * y)
                    .sum();
            }
        }
        Array2::from_shape_vec((n, m), out).expect("shape")
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness.

/// A small seeded generator (SplitMix64): initialisation, dropout masks and random splits.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * n as f64) as usize % n.max(1)
    }

    /// Dropout multipliers: each entry is 0 with probability `rate`, else `1 / (1 - rate)`.
    /// Four entries share one 64-bit draw (16 bits each, so `rate` is resolved to 1/65536):
    /// masks are drawn every epoch over every feature and hidden unit, and this is their cost.
    pub fn dropout_scales(&mut self, n: usize, rate: f32) -> Vec<f32> {
        let threshold = (rate.clamp(0.0, 1.0) * 65536.0).round() as u64;
        let keep = 1.0 / (1.0 - rate);
        let mut out = vec![0f32; n.div_ceil(4) * 4];
        for chunk in out.chunks_exact_mut(4) {
            let bits = self.next_u64();
            for (k, v) in chunk.iter_mut().enumerate() {
                // Branch-free: a coin flip per entry would defeat the branch predictor.
                let kept = ((bits >> (16 * k)) & 0xFFFF >= threshold) as u32 as f32;
                *v = kept * keep;
            }
        }
        out.truncate(n);
        out
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Graphs.

/// Which nodes train, select and test a node classifier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Split {
    /// Nodes whose labels train the classifier.
    pub train: Vec<usize>,
    /// Nodes for model selection (and the reward of active learning).
    pub val: Vec<usize>,
    /// Nodes for reporting.
    pub test: Vec<usize>,
}

/// One graph, ready for training: the Rust view of the fields a `graph-load` record carries.
#[derive(Clone, Debug)]
pub struct Graph {
    /// Number of nodes.
    pub num_nodes: usize,
    /// Directed edges `(source, target)`, sorted, without duplicates.
    pub edges: Vec<(usize, usize)>,
    /// Node features `[nodes, features]`.
    pub features: Csr,
    /// Node labels, −1 for unlabelled nodes (node classification).
    pub labels: Option<Vec<i64>>,
    /// The graph's own label (graph classification).
    pub graph_label: Option<i64>,
    /// The node split, for node classification.
    pub split: Option<Split>,
}

/// Names of the record fields a graph is read from and written to.
#[derive(Clone, Debug)]
pub struct GraphFields {
    /// Node features.
    pub x: String,
    /// Edges `[2, E]`.
    pub edge_index: String,
    /// Labels.
    pub y: String,
    /// The three split masks: train, validation, test.
    pub masks: [String; 3],
}

impl Default for GraphFields {
    fn default() -> Self {
        GraphFields {
            x: "x".into(),
            edge_index: "edge_index".into(),
            y: "y".into(),
            masks: ["train_mask".into(), "val_mask".into(), "test_mask".into()],
        }
    }
}

/// Integer parameter `name` (`default` when absent) as a count; below `min`, an issue is noted
/// and `min` is used.
pub(crate) fn int_param(
    params: &Params,
    name: &str,
    default: i64,
    min: i64,
    issues: &mut Vec<PlanIssue>,
) -> usize {
    let v = params.int(name).unwrap_or(default);
    if v < min {
        issues.push(PlanIssue::param(
            name,
            format!("`{name}` must be at least {min}"),
        ));
    }
    v.max(min) as usize
}

/// Float parameter `name` (`default` when absent); outside `[lo, hi]`, an issue is noted.
pub(crate) fn float_param(
    params: &Params,
    name: &str,
    default: f64,
    lo: f64,
    hi: f64,
    issues: &mut Vec<PlanIssue>,
) -> f64 {
    let v = params.float(name).unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        issues.push(PlanIssue::param(
            name,
            format!("`{name}` must lie in [{lo}, {hi}], got {v}"),
        ));
    }
    v
}

/// The parameters that name a graph stage's input fields, in the order of [`GraphFields`].
const FIELD_PARAMS: [&str; 6] = [
    "features",
    "edge_index",
    "y",
    "train_mask",
    "val_mask",
    "test_mask",
];

impl GraphFields {
    /// The field names a graph stage's parameters give (`features`, `edge_index`, `y`,
    /// `train_mask`, `val_mask`, `test_mask`), defaulting to the `graph-load` names.
    pub fn from_params(params: &Params) -> Self {
        let d = GraphFields::default();
        let field =
            |k: usize, default: &str| params.str(FIELD_PARAMS[k]).unwrap_or(default).to_string();
        GraphFields {
            x: field(0, &d.x),
            edge_index: field(1, &d.edge_index),
            y: field(2, &d.y),
            masks: [
                field(3, &d.masks[0]),
                field(4, &d.masks[1]),
                field(5, &d.masks[2]),
            ],
        }
    }

    /// Plans the read of the node features `f32[nodes, features]`.
    pub fn read_x(&self, plan: Plan) -> Plan {
        let named = |s: &str| Dim::Named(s.into());
        plan.read(
            &self.x,
            FieldType::f32(Shape(Some(vec![named("nodes"), named("features")]))),
            &[FIELD_PARAMS[0]],
        )
    }

    /// Plans the read of the edges `i64[2, edges]`.
    pub fn read_edges(&self, plan: Plan) -> Plan {
        let shape = Shape(Some(vec![Dim::Fixed(2), Dim::Named("edges".into())]));
        plan.read(
            &self.edge_index,
            FieldType::Tensor {
                dtype: DType::I64,
                shape,
            },
            &[FIELD_PARAMS[1]],
        )
    }

    /// Plans the read of the node labels `i64[nodes]`.
    pub fn read_node_labels(&self, plan: Plan) -> Plan {
        let shape = Shape(Some(vec![Dim::Named("nodes".into())]));
        plan.read(
            &self.y,
            FieldType::Tensor {
                dtype: DType::I64,
                shape,
            },
            &[FIELD_PARAMS[2]],
        )
    }

    /// Plans the reads of the split masks `[nodes]` for which `wanted(mask field)` holds, each
    /// as `f32` where the input has it so and as 0/1 `i64` otherwise.
    pub fn read_masks(
        &self,
        mut plan: Plan,
        input: &Schema,
        wanted: impl Fn(&str) -> bool,
    ) -> Plan {
        for (m, param) in self.masks.iter().zip(&FIELD_PARAMS[3..]) {
            if !wanted(m) {
                continue;
            }
            let dtype = match input.get(m) {
                Some(FieldType::Tensor {
                    dtype: DType::F32, ..
                }) => DType::F32,
                _ => DType::I64,
            };
            let shape = Shape(Some(vec![Dim::Named("nodes".into())]));
            plan = plan.read(m, FieldType::Tensor { dtype, shape }, &[param]);
        }
        plan
    }
}

impl Graph {
    /// Number of classes: one more than the largest node label (0 without labels).
    pub fn num_classes(&self) -> usize {
        self.labels
            .as_ref()
            .and_then(|l| l.iter().copied().max())
            .map_or(0, |m| (m + 1).max(0) as usize)
    }

    /// Adds the reverse of every edge.
    pub fn symmetrise(&mut self) {
        let reversed: Vec<(usize, usize)> = self.edges.iter().map(|&(s, t)| (t, s)).collect();
        self.edges.extend(reversed);
        self.edges.sort_unstable();
        self.edges.dedup();
    }

    /// Adds an edge from every node to itself where there is none.
    pub fn add_self_loops(&mut self) {
        self.edges.extend((0..self.num_nodes).map(|i| (i, i)));
        self.edges.sort_unstable();
        self.edges.dedup();
    }

    /// Writes the graph's fields into a record.
    pub fn to_record(&self, key: &str, seq: u64, fields: &GraphFields) -> Record {
        let mut r = Record::new(key, seq);
        let x = self.features.to_dense().into_dyn();
        r.set(&fields.x, Value::Tensor(Tensor::f32(x)));
        let mut ei = Vec::with_capacity(2 * self.edges.len());
        ei.extend(self.edges.iter().map(|e| e.0 as i64));
        ei.extend(self.edges.iter().map(|e| e.1 as i64));
        let ei = ArrayD::from_shape_vec(IxDyn(&[2, self.edges.len()]), ei).expect("shape");
        r.set(&fields.edge_index, Value::Tensor(Tensor::i64(ei)));
        if let Some(l) = &self.labels {
            let y = Array1::from_vec(l.clone()).into_dyn();
            r.set(&fields.y, Value::Tensor(Tensor::i64(y)));
        } else if let Some(l) = self.graph_label {
            r.set(&fields.y, Value::Int(l));
        }
        if let Some(split) = &self.split {
            for (name, nodes) in fields
                .masks
                .iter()
                .zip([&split.train, &split.val, &split.test])
            {
                let mut m = vec![0i64; self.num_nodes];
                nodes.iter().for_each(|&i| m[i] = 1);
                let m = Array1::from_vec(m).into_dyn();
                r.set(name, Value::Tensor(Tensor::i64(m)));
            }
        }
        r
    }

    /// Reads a graph from a record's fields. Labels and masks are read when present; features
    /// may come from another field than `fields.x` (e.g. frozen embeddings).
    pub fn from_record(r: &Record, fields: &GraphFields) -> Result<Graph, String> {
        let x = r.tensor(&fields.x)?;
        let x = x
            .as_f32()
            .ok_or_else(|| format!("field `{}` is {:?} i64, expected f32", fields.x, x.shape()))?;
        if x.ndim() != 2 {
            return Err(format!(
                "field `{}` has shape {:?}, expected [nodes, features]",
                fields.x,
                x.shape()
            ));
        }
        let x = x.view().into_dimensionality::<ndarray::Ix2>().expect("2-D");
        let num_nodes = x.nrows();
        let features = Csr::from_dense(x);

        // A classifier that ignores edges (logistic regression) runs without them.
        let empty = Tensor::i64(ArrayD::zeros(IxDyn(&[2, 0])));
        let ei = match r.get(&fields.edge_index) {
            None => &empty,
            Some(_) => r.tensor(&fields.edge_index)?,
        };
        let ei = ei
            .as_i64()
            .ok_or_else(|| format!("field `{}` must be i64", fields.edge_index))?;
        if ei.ndim() != 2 || ei.shape()[0] != 2 {
            return Err(format!(
                "field `{}` has shape {:?}, expected [2, edges]",
                fields.edge_index,
                ei.shape()
            ));
        }
        let ei = ei
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .expect("2-D");
        let mut edges = Vec::with_capacity(ei.ncols());
        for (k, col) in ei.columns().into_iter().enumerate() {
            let (s, t) = (col[0], col[1]);
            if s < 0 || t < 0 || s as usize >= num_nodes || t as usize >= num_nodes {
                return Err(format!(
                    "field `{}`: edge {k} ({s} → {t}) names a node outside 0..{num_nodes}",
                    fields.edge_index
                ));
            }
            edges.push((s as usize, t as usize));
        }
        edges.sort_unstable();
        edges.dedup();

        let (labels, graph_label) = match r.get(&fields.y) {
            Some(Value::Int(l)) => (None, Some(*l)),
            Some(Value::Tensor(Tensor::I64(y))) => {
                if y.shape() != [num_nodes] {
                    return Err(format!(
                        "field `{}` has shape {:?}, expected [{num_nodes}] (one label per node)",
                        fields.y,
                        y.shape()
                    ));
                }
                (Some(y.iter().copied().collect::<Vec<i64>>()), None)
            }
            Some(other) => {
                return Err(format!(
                    "field `{}` is {}, expected i64[nodes] or int",
                    fields.y,
                    other.describe()
                ))
            }
            None => (None, None),
        };

        let mut parts: Vec<Vec<usize>> = Vec::new();
        for name in &fields.masks {
            let Some(v) = r.get(name) else { break };
            let nodes = mask_nodes(v, num_nodes).map_err(|e| format!("field `{name}`: {e}"))?;
            parts.push(nodes);
        }
        let split = match parts.len() {
            3 => {
                let test = parts.pop().expect("three");
                let val = parts.pop().expect("three");
                let train = parts.pop().expect("three");
                Some(Split { train, val, test })
            }
            _ => None,
        };
        Ok(Graph {
            num_nodes,
            edges,
            features,
            labels,
            graph_label,
            split,
        })
    }
}

/// The nodes a 0/1 mask (i64 or f32) marks.
fn mask_nodes(v: &Value, num_nodes: usize) -> Result<Vec<usize>, String> {
    let flags: Vec<bool> = match v {
        Value::Tensor(Tensor::I64(m)) if m.shape() == [num_nodes] => {
            m.iter().map(|&x| x != 0).collect()
        }
        Value::Tensor(Tensor::F32(m)) if m.shape() == [num_nodes] => {
            m.iter().map(|&x| x != 0.0).collect()
        }
        other => {
            return Err(format!(
                "is {}, expected a 0/1 mask of [{num_nodes}]",
                other.describe()
            ))
        }
    };
    Ok(flags
        .iter()
        .enumerate()
        .filter_map(|(i, &f)| f.then_some(i))
        .collect())
}

/// The GCN propagation matrix `D^-1/2 (A + I) D^-1/2`, rows = targets: entry `(t, s)` carries
/// the message from `s` to `t`. Self loops are added where missing (an existing one is not
/// doubled); `D` holds in-degrees counted with the self loop.
pub fn gcn_adjacency(num_nodes: usize, edges: &[(usize, usize)]) -> Csr {
    let mut entries: Vec<(usize, usize, f32)> = edges.iter().map(|&(s, t)| (t, s, 1.0)).collect();
    entries.extend((0..num_nodes).map(|i| (i, i, 1.0)));
    entries.sort_unstable_by_key(|&(t, s, _)| (t, s));
    entries.dedup_by_key(|e| (e.0, e.1));
    let mut a = Csr::from_triplets(num_nodes, num_nodes, entries);
    let deg: Vec<f32> = (0..num_nodes)
        .map(|i| (a.indptr[i + 1] - a.indptr[i]) as f32)
        .collect();
    let inv: Vec<f32> = deg.iter().map(|&d| 1.0 / d.sqrt()).collect();
    for t in 0..num_nodes {
        for p in a.indptr[t]..a.indptr[t + 1] {
            a.data[p] = inv[t] * inv[a.indices[p]];
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------
// Training pieces shared by the classifiers.

/// Adam (Kingma & Ba) with bias correction, over a fixed list of parameter tensors.
#[derive(Clone, Debug)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
    t: i32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Adam {
    /// Adam for parameter tensors of the given sizes, with the usual betas (0.9, 0.999) and
    /// epsilon 1e-8.
    pub fn new(lr: f32, sizes: &[usize]) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One step: `params[k] -= lr · m̂ / (√v̂ + eps)` for gradients `grads[k]`.
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]]) {
        self.t += 1;
        let c1 = 1.0 - self.beta1.powi(self.t);
        let c2 = 1.0 - self.beta2.powi(self.t);
        for (k, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (m, v) = (&mut self.m[k], &mut self.v[k]);
            for (((p, &g), m), v) in p.iter_mut().zip(*g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = self.beta1 * *m + (1.0 - self.beta1) * g;
                *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
                *p -= self.lr * (*m / c1) / ((*v / c2).sqrt() + self.eps);
            }
        }
    }
}

/// Mean softmax cross-entropy of `logits` rows `nodes` against `labels`, and its gradient with
/// respect to all logits (zero outside `nodes`).
pub(crate) fn softmax_xent(
    logits: &Array2<f32>,
    labels: &[i64],
    nodes: &[usize],
) -> (f64, Array2<f32>) {
    let mut grad = Array2::zeros(logits.raw_dim());
    let n = nodes.len().max(1) as f32;
    let mut loss = 0f64;
    for &i in nodes {
        let row = logits.row(i);
        let max = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = row.iter().map(|&z| ((z - max) as f64).exp()).sum();
        let y = labels[i] as usize;
        loss += sum.ln() + max as f64 - row[y] as f64;
        let mut g = grad.row_mut(i);
        for (gc, &z) in g.iter_mut().zip(row) {
            *gc = ((((z - max) as f64).exp() / sum) as f32) / n;
        }
        g[y] -= 1.0 / n;
    }
    (loss / n as f64, grad)
}

/// Row-wise softmax.
pub(crate) fn softmax_rows(logits: &Array2<f32>) -> Array2<f32> {
    let mut p = logits.clone();
    for mut row in p.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.mapv_inplace(|z| (z - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|z| z / sum);
    }
    p
}

/// Checks that a graph can train a node classifier; returns the number of classes.
pub(crate) fn check_node_task(g: &Graph) -> Result<(usize, &[i64], &Split), String> {
    let labels = g
        .labels
        .as_deref()
        .ok_or("the graph has no node labels (field `y` of i64[nodes])")?;
    let split = g
        .split
        .as_ref()
        .ok_or("the graph has no split (train_mask, val_mask and test_mask)")?;
    if g.features.rows != g.num_nodes || labels.len() != g.num_nodes {
        return Err(format!(
            "{} nodes, but {} feature rows and {} labels",
            g.num_nodes,
            g.features.rows,
            labels.len()
        ));
    }
    if split.train.is_empty() {
        return Err("the train mask selects no node".into());
    }
    if let Some(&i) = split.train.iter().find(|&&i| labels[i] < 0) {
        return Err(format!(
            "training node {i} is unlabelled (label {})",
            labels[i]
        ));
    }
    let classes = g.num_classes();
    if classes == 0 {
        return Err("no node has a label".into());
    }
    Ok((classes, labels, split))
}

/// What a node classifier returns.
#[derive(Clone, Debug)]
pub struct NodeResult {
    /// Predicted class probabilities `[nodes, classes]`.
    pub probs: Array2<f32>,
    /// The most probable class of every node.
    pub predictions: Vec<i64>,
    /// The classifier's node embeddings (the GCN's hidden layer), when it has them.
    pub embeddings: Option<Array2<f32>>,
    /// Training loss per epoch.
    pub losses: Vec<f32>,
    /// Scores on the training nodes.
    pub train: metrics::Scores,
    /// Scores on the validation nodes.
    pub val: metrics::Scores,
    /// Scores on the test nodes.
    pub test: metrics::Scores,
}

impl NodeResult {
    /// Predictions and scores from probabilities.
    pub(crate) fn new(
        probs: Array2<f32>,
        embeddings: Option<Array2<f32>>,
        losses: Vec<f32>,
        labels: &[i64],
        split: &Split,
    ) -> Self {
        let predictions: Vec<i64> = probs
            .rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (c, &p)| {
                        if p > best.1 {
                            (c, p)
                        } else {
                            best
                        }
                    })
                    .0 as i64
            })
            .collect();
        let score = |nodes: &[usize]| metrics::Scores::of(labels, &predictions, nodes);
        NodeResult {
            train: score(&split.train),
            val: score(&split.val),
            test: score(&split.test),
            probs,
            predictions,
            embeddings,
            losses,
        }
    }
}

/// A random symmetric test graph: `edge_draws` random node pairs (both directions, duplicates
/// dropped), features that are non-zero with probability `density`, and labels `i % 3`.
#[cfg(test)]
pub(crate) fn random_graph(
    seed: u64,
    nodes: usize,
    features: usize,
    edge_draws: usize,
    density: f32,
) -> Graph {
    let mut rng = Rng::new(seed);
    let mut edges = Vec::new();
    for _ in 0..edge_draws {
        let (s, t) = (rng.below(nodes), rng.below(nodes));
        edges.extend([(s, t), (t, s)]);
    }
    edges.sort_unstable();
    edges.dedup();
    let dense = Array2::from_shape_simple_fn((nodes, features), || {
        if rng.uniform() < density {
            rng.uniform()
        } else {
            0.0
        }
    });
    Graph {
        num_nodes: nodes,
        edges,
        features: Csr::from_dense(dense.view()),
        labels: Some((0..nodes).map(|i| (i % 3) as i64).collect()),
        graph_label: None,
        split: Some(Split::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn csr_products_match_dense() {
        let a = array![[1.0f32, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]];
        let s = Csr::from_dense(a.view());
        assert_eq!(s.nnz(), 3);
        assert_eq!(s.to_dense(), a);
        let b = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
        assert_eq!(s.matmul(&b), a.dot(&b));
        assert_eq!(s.t_matmul(&b), a.t().dot(&b));
        let c = array![[1.0f32, -1.0], [0.5, 2.0]];
        assert_eq!(dense::matmul(&b, &c), b.dot(&c));
        assert_eq!(dense::matmul_tn(&b, &b), b.t().dot(&b));
        assert_eq!(dense::matmul_nt(&b, &b), b.dot(&b.t()));
    }

    #[test]
    fn triplets_sum_duplicates() {
        let s = Csr::from_triplets(2, 2, vec![(1, 0, 1.0), (0, 1, 2.0), (1, 0, 3.0)]);
        assert_eq!(s.to_dense(), array![[0.0, 2.0], [4.0, 0.0]]);
    }

    #[test]
    fn gcn_adjacency_is_symmetric_normalised() {
        // A path 0 - 1 - 2: degrees with self loops 2, 3, 2.
        let a = gcn_adjacency(3, &[(0, 1), (1, 0), (1, 2), (2, 1), (1, 1)]);
        let d = a.to_dense();
        assert!((d[[0, 0]] - 0.5).abs() < 1e-6);
        assert!((d[[1, 1]] - 1.0 / 3.0).abs() < 1e-6);
        assert!((d[[0, 1]] - 1.0 / 6f32.sqrt()).abs() < 1e-6);
        assert_eq!(d, d.t());
    }

    #[test]
    fn rng_is_seeded() {
        let mut a = Rng::new(3);
        let mut b = Rng::new(3);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut v: Vec<usize> = (0..10).collect();
        a.shuffle(&mut v);
        let mut w = v.clone();
        w.sort();
        assert_eq!(w, (0..10).collect::<Vec<_>>());
        assert!((0..1000).all(|_| a.below(7) < 7));
        let m = a.dropout_scales(10_001, 0.3);
        assert_eq!(m.len(), 10_001);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((dropped - 0.3).abs() < 0.02, "{dropped}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
    }
}
