//! The `gnn-embed` stage: runs a pre-trained GNN package on graph records — whole graphs, many
//! graphs per call as a disjoint union, k-hop subgraphs in batches, prompted copies of a graph
//! (RELIEF), and incremental re-embedding after edge or feature changes.
//!
//! A GNN package is a model package with `"batch": false` whose inputs are node features
//! `x` f32 `[nodes, F]`, edges `edge_index` i64 `[2, edges]` and optionally a graph id per node
//! `batch` i64 `[nodes]`; its outputs are node embeddings `h` `[nodes, D]` and, with a `batch`
//! input, graph embeddings `g` `[graphs, D]` (`models/gnn-*`, `models/gin-mutag`). The inputs
//! and outputs are recognised by their shapes in the manifest, whatever their names.
//!
//! # Disjoint unions
//! Several graphs run in one model call as one graph: features concatenated, every graph's
//! edge ids offset by the nodes before it, and (for packages with a `batch` input) node `i`
//! of the `k`-th graph given graph id `k`. Each call holds at most `max_nodes` nodes (a larger
//! graph runs alone); the outputs are split back by the same offsets, and row `k` of `g` is
//! the `k`-th graph's. A package without a `batch` input is run on concatenations all the
//! same: it must be node-wise, with no operation across nodes other than message passing
//! along edges (no global pooling or normalisation), which holds for every node encoder here.
//!
//! # k-hop subgraphs, and when they are exact
//! `mode: subgraphs` embeds each target node from the subgraph induced by its `hops`-hop
//! in-ball (the nodes with a path of at most `hops` edges to it; [`super::subgraph`]), many
//! subgraphs per call as a disjoint union; the target's row is kept (and `g` of its subgraph).
//! For a GNN of `L` layers, node `t`'s output depends on the features of the nodes within `L`
//! hops and on the edges into the nodes within `L - 1` hops — and, when messages are
//! normalised by degree (GCN: `D^-1/2 (A + I) D^-1/2`, in-degrees), also on the in-degrees of
//! the nodes within `L` hops, which count edges from up to `L + 1` hops away. So:
//! - sum or mean aggregation without degree terms (GIN): the induced `k`-hop subgraph is exact
//!   for `k >= L`;
//! - degree-normalised (GCN): it is exact for `k >= L + 1`; for `k = L` exactly when no node at
//!   distance `L` has an in-neighbour outside the ball, that is when the ball is *closed*
//!   (`ball_{L+1}(t) = ball_L(t)`: it is the target's whole in-reachable set). The border
//!   nodes' degrees are otherwise too small and their messages too large.
//!
//! Any `k` is exact when the ball is closed; below those bounds with an open ball (GCN:
//! `k <= L`, GIN: `k < L`) the result generically differs.
//!
//! `tests/embed.rs` checks both statements on Cora with `gnn-cora-edgepred` (2 GCN layers):
//! `hops: 3` matches the whole-graph embedding for every target checked, `hops: 2` matches
//! for closed balls only. `max_subgraph_nodes` caps a subgraph (nearest nodes first); a cut
//! ball is approximate by construction, and the number cut is logged.
//!
//! # Prompts
//! RELIEF adds prompt vectors to the input features of chosen nodes before the frozen GNN
//! runs: `x_v + p_v`. A record's `prompt` field is dense `[nodes, F]` (zero rows for unprompted
//! nodes) or `[copies, nodes, F]` (one prompted copy of the graph per slice, run as disjoint
//! unions of up to `max_nodes` nodes; outputs get the `copies` axis), or sparse as `prompt_nodes` i64 `[P]` with
//! `prompt_values` f32 `[P, F]` (repeated nodes add up). In Rust,
//! [`GnnEmbedder::embed_prompted`] embeds many prompted copies of one graph per call.
//! Prompts apply in `subgraphs` mode too (each subgraph sees its nodes' prompts).
//!
//! # Incremental re-embedding
//! `mode: incremental` reads the new graph, the previous embeddings (`previous`) and what
//! changed (`changed_edges` i64 `[2, c]`, inserted or deleted, and/or `changed_nodes` i64
//! `[m]`, nodes whose features changed), finds the nodes whose `layers`-hop neighbourhood
//! changed with differential dataflow, and recomputes only those
//! ([`super::embed_incremental`]). Records are independent, so the stage runs the differential
//! computation afresh on each record's new edges with the changed nodes as seeds; in Rust,
//! [`super::embed_incremental::IncrementalEmbedder`] keeps one computation alive across many
//! updates of a graph, fed with edge insertions and deletions as `±1` updates. It writes the embeddings and two
//! ints: `<output>_affected` (rows recomputed) and `<output>_computed` (nodes run through the
//! GNN to recompute them).
//!
//! # Execution
//! Calls go to the process-wide inference service of the package (shared with `onnx` stages
//! of the same model). The stage does not block its worker: it submits at most two calls at a
//! time per batch of records (one running, one queued, which bounds the memory that unions of
//! subgraphs take) and is woken when one returns.
//!
//! Call size: `max_nodes` defaults to 1024. On a CPU the GCN packages cost about 16 µs per
//! edge in ONNX Runtime (message passing is `ScatterElements` over an `[edges, width]` index,
//! which dominates), with little fixed cost per call, and calls of many thousands of nodes
//! get slower per edge (`benches/embed.rs`: 2-hop subgraphs of Cora, best around 500–2000
//! nodes per call, about half as fast at 20 000). Unions pay where a call has a fixed cost
//! to amortise — a GPU — so raise `max_nodes` there.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use latentflow_engine::inference::{Device, InferenceService, ServiceConfig, Ticket};
use latentflow_engine::model::ModelPackage;
use latentflow_engine::{
    Completion, DType, Dim, Failure, FieldType, KindInfo, Outcome, ParamKind, ParamSpec, Params,
    PendingBatch, Plan, PlanIssue, Record, Schema, Shape, Stage, StageContext, StageFactory,
    Tensor, Value, Waker,
};
use ndarray::{s, Array1, Array2, Array3, ArrayD, Axis, Ix2, IxDyn};
use serde_json::json;

use super::embed_incremental::{recompute_pieces, AffectedNodes, RecomputePiece};
use super::subgraph::{Adjacency, Direction, Scratch};
use super::Graph;

// ---------------------------------------------------------------------------------------------
// Graphs and prompts.

/// A graph as a GNN package takes it: dense node features and directed edges. Cheap to clone
/// (the data are shared).
#[derive(Clone, Debug)]
pub struct GnnGraph {
    x: Arc<Array2<f32>>,
    edges: Arc<Vec<(usize, usize)>>,
    adj: Arc<OnceLock<Adjacency>>,
}

impl GnnGraph {
    /// A graph from features `[nodes, F]` and edges (source, target), kept as given (repeats
    /// and self loops included). Fails if an edge names a node outside `0..nodes`.
    pub fn new(x: Array2<f32>, edges: Vec<(usize, usize)>) -> Result<Self, String> {
        let n = x.nrows();
        if let Some(&(s, t)) = edges.iter().find(|&&(s, t)| s >= n || t >= n) {
            return Err(format!("edge ({s} → {t}) names a node outside 0..{n}"));
        }
        Ok(GnnGraph {
            x: Arc::new(x.as_standard_layout().into_owned()),
            edges: Arc::new(edges),
            adj: Arc::default(),
        })
    }

    /// The features (dense) and edges of a loaded [`Graph`].
    pub fn from_graph(g: &Graph) -> Self {
        GnnGraph {
            x: Arc::new(g.features.to_dense()),
            edges: Arc::new(g.edges.clone()),
            adj: Arc::default(),
        }
    }

    /// Reads features and edges from record fields.
    pub fn from_record(r: &Record, x: &str, edge_index: &str) -> Result<Self, String> {
        let xt = r.tensor(x)?;
        let xa = xt
            .as_f32()
            .ok_or_else(|| format!("field `{x}` is {}, expected f32", xt.dtype()))?;
        let xa = xa
            .view()
            .into_dimensionality::<Ix2>()
            .map_err(|_| {
                format!(
                    "field `{x}` has shape {:?}, expected [nodes, F]",
                    xa.shape()
                )
            })?
            .to_owned();
        let edges = edge_list(r, edge_index)?;
        GnnGraph::new(xa, edges).map_err(|e| format!("field `{edge_index}`: {e}"))
    }

    /// The same edges with other features (of the same number of nodes).
    pub fn with_features(&self, x: Array2<f32>) -> Result<Self, String> {
        if x.nrows() != self.num_nodes() {
            return Err(format!(
                "{} feature rows for a graph of {} nodes",
                x.nrows(),
                self.num_nodes()
            ));
        }
        Ok(GnnGraph {
            x: Arc::new(x.as_standard_layout().into_owned()),
            edges: self.edges.clone(),
            adj: self.adj.clone(),
        })
    }

    /// The same features with other edges.
    pub fn with_edges(&self, edges: Vec<(usize, usize)>) -> Result<Self, String> {
        let n = self.num_nodes();
        if let Some(&(s, t)) = edges.iter().find(|&&(s, t)| s >= n || t >= n) {
            return Err(format!("edge ({s} → {t}) names a node outside 0..{n}"));
        }
        Ok(GnnGraph {
            x: self.x.clone(),
            edges: Arc::new(edges),
            adj: Arc::default(),
        })
    }

    /// The subgraph induced by `nodes` (global ids, no repeats), renumbered by position.
    pub fn induced(&self, nodes: &[usize]) -> GnnGraph {
        let adj = self.adjacency();
        let edges = Scratch::new(self.num_nodes())
            .induced_edges(adj, nodes)
            .into_iter()
            .map(|(s, t)| (s as usize, t as usize))
            .collect();
        GnnGraph {
            x: Arc::new(self.x.select(Axis(0), nodes)),
            edges: Arc::new(edges),
            adj: Arc::default(),
        }
    }

    /// The subgraph induced by the `hops`-hop in-ball of `target` (at most `max_nodes` nodes,
    /// nearest first) as a graph of its own, with the global ids of its nodes; the target is
    /// node 0. RELIEF's node-level tasks treat each target's subgraph as one small graph.
    pub fn k_hop(
        &self,
        target: usize,
        hops: usize,
        max_nodes: Option<usize>,
    ) -> (GnnGraph, Vec<usize>) {
        let ball = Scratch::new(self.num_nodes()).ball(
            self.adjacency(),
            &[target],
            hops,
            Direction::In,
            max_nodes,
        );
        (self.induced(&ball.nodes), ball.nodes)
    }

    /// Number of nodes.
    pub fn num_nodes(&self) -> usize {
        self.x.nrows()
    }

    /// Node features `[nodes, F]`.
    pub fn x(&self) -> &Array2<f32> {
        &self.x
    }

    /// Edges (source, target).
    pub fn edges(&self) -> &[(usize, usize)] {
        &self.edges
    }

    /// Adjacency lists, built on first use.
    pub fn adjacency(&self) -> &Adjacency {
        self.adj
            .get_or_init(|| Adjacency::new(self.num_nodes(), &self.edges))
    }
}

/// Reads an `i64 [2, E]` field as (source, target) pairs (ids not yet range-checked).
fn edge_list(r: &Record, field: &str) -> Result<Vec<(usize, usize)>, String> {
    let t = r.tensor(field)?;
    let a = t
        .as_i64()
        .ok_or_else(|| format!("field `{field}` is {}, expected i64", t.dtype()))?;
    if a.ndim() != 2 || a.shape()[0] != 2 {
        return Err(format!(
            "field `{field}` has shape {:?}, expected [2, edges]",
            a.shape()
        ));
    }
    let a = a.view().into_dimensionality::<Ix2>().expect("2-D");
    a.columns()
        .into_iter()
        .enumerate()
        .map(|(k, c)| {
            if c[0] < 0 || c[1] < 0 {
                Err(format!("field `{field}`: edge {k} has a negative node id"))
            } else {
                Ok((c[0] as usize, c[1] as usize))
            }
        })
        .collect()
}

/// Reads an `i64 [n]` field as node ids below `num_nodes`.
fn node_list(r: &Record, field: &str, num_nodes: usize) -> Result<Vec<usize>, String> {
    let t = r.tensor(field)?;
    let a = t
        .as_i64()
        .ok_or_else(|| format!("field `{field}` is {}, expected i64", t.dtype()))?;
    if a.ndim() != 1 {
        return Err(format!(
            "field `{field}` has shape {:?}, expected [n]",
            a.shape()
        ));
    }
    a.iter()
        .map(|&v| {
            if v < 0 || v as usize >= num_nodes {
                Err(format!(
                    "field `{field}`: node {v} is outside 0..{num_nodes}"
                ))
            } else {
                Ok(v as usize)
            }
        })
        .collect()
}

/// Prompt vectors added to the input features of some nodes: `x_v + p_v`.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// One row per node `[nodes, F]` (zero rows for unprompted nodes).
    Dense(Array2<f32>),
    /// Rows for some nodes only.
    Rows(BTreeMap<usize, Vec<f32>>),
}

impl Prompt {
    /// A sparse prompt from node ids and their rows `[P, F]`; repeated nodes add up.
    pub fn sparse(nodes: &[usize], values: &Array2<f32>) -> Result<Prompt, String> {
        if nodes.len() != values.nrows() {
            return Err(format!(
                "{} prompted nodes but {} prompt rows",
                nodes.len(),
                values.nrows()
            ));
        }
        let mut rows: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
        for (&v, row) in nodes.iter().zip(values.rows()) {
            let r = rows.entry(v).or_insert_with(|| vec![0.0; values.ncols()]);
            r.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        Ok(Prompt::Rows(rows))
    }

    fn check(&self, num_nodes: usize, width: usize) -> Result<(), String> {
        match self {
            Prompt::Dense(p) if p.dim() != (num_nodes, width) => Err(format!(
                "prompt has shape {:?}, expected [{num_nodes}, {width}] (the graph's features)",
                p.shape()
            )),
            Prompt::Rows(rows) => {
                if let Some((v, r)) = rows
                    .iter()
                    .find(|(v, r)| **v >= num_nodes || r.len() != width)
                {
                    Err(format!(
                        "prompt row of node {v} has {} values (expected {width}) or names a node \
                         outside 0..{num_nodes}",
                        r.len()
                    ))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Adds node `v`'s prompt to `row`.
    fn add_to(&self, v: usize, row: &mut [f32]) {
        match self {
            Prompt::Dense(p) => row.iter_mut().zip(p.row(v)).for_each(|(a, b)| *a += b),
            Prompt::Rows(rows) => {
                if let Some(p) = rows.get(&v) {
                    row.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                }
            }
        }
    }
}

/// A graph's embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// Node embeddings `[nodes, D]`.
    pub h: Array2<f32>,
    /// The graph embedding `[D]`, for packages with a `batch` input.
    pub g: Option<Array1<f32>>,
}

/// Embeddings of target nodes from their k-hop subgraphs.
#[derive(Clone, Debug, PartialEq)]
pub struct SubgraphEmbedding {
    /// The targets' rows `[targets, D]`.
    pub h: Array2<f32>,
    /// Each target's subgraph embedding `[targets, D]`, for packages with a `batch` input.
    pub g: Option<Array2<f32>>,
    /// Nodes in each target's subgraph.
    pub sizes: Vec<usize>,
    /// Subgraphs cut at `max_subgraph_nodes`.
    pub truncated: usize,
}

// ---------------------------------------------------------------------------------------------
// The package's inputs and outputs.

/// Which model inputs and outputs play which part, found from the manifest's shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelIo {
    /// The package's name.
    pub name: String,
    /// Node features input, f32 `[nodes, F]`.
    pub x: String,
    /// Edges input, i64 `[2, edges]`.
    pub edge_index: String,
    /// Graph-id-per-node input, i64 `[nodes]`, if the package has one.
    pub batch: Option<String>,
    /// Node embeddings output `[nodes, D]`.
    pub h: String,
    /// Graph embeddings output `[graphs, D]`, if the package has one (and a `batch` input).
    pub g: Option<String>,
    /// Feature width, when the manifest fixes it.
    pub features: Option<usize>,
    /// Embedding width, when the manifest fixes it.
    pub dim: Option<usize>,
}

impl ModelIo {
    /// The roles of a package's tensors, or why it is not a GNN package.
    pub fn of(package: &ModelPackage) -> Result<ModelIo, String> {
        let m = package.manifest();
        let name = m.name.clone();
        if m.batch {
            return Err(format!(
                "model `{name}` batches along a first axis (`\"batch\": true`); a GNN package \
                 takes whole graphs (`\"batch\": false`)"
            ));
        }
        let fixed = |d: &Dim| match d {
            Dim::Fixed(n) => Some(*n),
            Dim::Named(_) => None,
        };
        let (mut x, mut ei, mut batch) = (None, None, None);
        for t in &m.inputs {
            match (t.dtype, t.shape.as_slice()) {
                (DType::F32, [_, _]) if x.is_none() => x = Some(t),
                (DType::I64, [Dim::Fixed(2), _]) if ei.is_none() => ei = Some(t),
                (DType::I64, [_]) if batch.is_none() => batch = Some(t),
                _ => {
                    return Err(format!(
                        "model `{name}` input `{}` {t} is not one of: node features f32[nodes, F], \
                         edge_index i64[2, edges], batch i64[nodes]",
                        t.name
                    ))
                }
            }
        }
        let (Some(x), Some(ei)) = (x, ei) else {
            return Err(format!(
                "model `{name}` needs inputs node features f32[nodes, F] and edge_index \
                 i64[2, edges]"
            ));
        };
        let node_axis = &x.shape[0];
        let mut h = None;
        let mut g = None;
        for t in &m.outputs {
            if t.dtype != DType::F32 || t.shape.len() != 2 {
                continue;
            }
            if &t.shape[0] == node_axis && h.is_none() {
                h = Some(t);
            } else if batch.is_some() && g.is_none() {
                g = Some(t);
            }
        }
        let Some(h) = h else {
            return Err(format!(
                "model `{name}` has no node-embedding output f32[{node_axis}, D]"
            ));
        };
        Ok(ModelIo {
            name,
            x: x.name.clone(),
            edge_index: ei.name.clone(),
            batch: batch.map(|t| t.name.clone()),
            h: h.name.clone(),
            g: g.map(|t| t.name.clone()),
            features: fixed(&x.shape[1]),
            dim: fixed(&h.shape[1]),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Work: graphs to run, packed into disjoint unions.

/// Which rows of a piece's output to keep.
#[derive(Clone, Debug)]
enum Keep {
    All,
    Rows(Vec<usize>),
}

/// One graph to run, before it is laid out.
#[derive(Clone, Debug)]
enum Spec {
    /// The whole graph, with prompt `prompt` (an index into the job's prompts).
    Whole { prompt: Option<usize>, keep: Keep },
    /// The induced k-hop in-ball of a target; its row is kept.
    Ball {
        target: usize,
        prompt: Option<usize>,
    },
    /// The subgraph induced by `sets[i].nodes`; rows `sets[i].keep` are kept.
    Set(usize),
}

/// What one piece returned.
#[derive(Clone, Debug)]
struct PieceOut {
    h: Array2<f32>,
    g: Option<Array1<f32>>,
    nodes: usize,
}

/// The pieces of one record (or one API call) and their outputs.
struct Job {
    graph: GnnGraph,
    prompts: Vec<Prompt>,
    hops: usize,
    limit: Option<usize>,
    sets: Vec<RecomputePiece>,
    specs: Vec<Spec>,
    outs: Vec<Option<PieceOut>>,
    error: Option<String>,
    scratch: Option<Scratch>,
    truncated: usize,
}

impl Job {
    fn new(graph: GnnGraph, specs: Vec<Spec>) -> Self {
        let n = specs.len();
        Job {
            graph,
            prompts: Vec::new(),
            hops: 0,
            limit: None,
            sets: Vec::new(),
            specs,
            outs: vec![None; n],
            error: None,
            scratch: None,
            truncated: 0,
        }
    }

    fn done(&self) -> bool {
        self.error.is_some() || self.outs.iter().all(Option::is_some)
    }

    fn result(&mut self) -> Result<Vec<PieceOut>, String> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(self
                .outs
                .iter_mut()
                .map(|o| o.take().expect("every piece done"))
                .collect()),
        }
    }
}

/// A piece laid out: which nodes (all, or a list of global ids), which local edges.
struct Layout {
    job: usize,
    spec: usize,
    nodes: Option<Vec<usize>>,
    edges: Option<Vec<(u32, u32)>>,
    prompt: Option<usize>,
    keep: Keep,
}

impl Layout {
    fn len(&self, g: &GnnGraph) -> usize {
        self.nodes.as_ref().map_or(g.num_nodes(), Vec::len)
    }
}

/// Where a piece's rows lie in a call's output.
struct Route {
    job: usize,
    spec: usize,
    offset: usize,
    len: usize,
    keep: Keep,
}

struct Call {
    ticket: Ticket,
    routes: Vec<Route>,
}

/// A call's model inputs and where its pieces lie.
type CallInputs = (Vec<(String, Tensor)>, Vec<Route>);

/// Model inputs of one disjoint union.
struct Union {
    width: usize,
    x: Vec<f32>,
    src: Vec<i64>,
    dst: Vec<i64>,
    batch: Vec<i64>,
    graphs: i64,
}

impl Union {
    fn new(width: usize) -> Self {
        Union {
            width,
            x: Vec::new(),
            src: Vec::new(),
            dst: Vec::new(),
            batch: Vec::new(),
            graphs: 0,
        }
    }

    fn nodes(&self) -> usize {
        self.batch.len()
    }

    /// Appends a piece; returns its node offset.
    fn push(&mut self, g: &GnnGraph, layout: &Layout, prompt: Option<&Prompt>) -> usize {
        let offset = self.nodes();
        let x = g.x();
        let xs = x.as_slice().expect("standard layout");
        let w = self.width;
        match &layout.nodes {
            None => {
                let start = self.x.len();
                self.x.extend_from_slice(xs);
                if let Some(p) = prompt {
                    for v in 0..g.num_nodes() {
                        let at = start + v * w;
                        p.add_to(v, &mut self.x[at..at + w]);
                    }
                }
            }
            Some(nodes) => {
                for &v in nodes {
                    let at = self.x.len();
                    self.x.extend_from_slice(&xs[v * w..(v + 1) * w]);
                    if let Some(p) = prompt {
                        p.add_to(v, &mut self.x[at..at + w]);
                    }
                }
            }
        }
        let off = offset as i64;
        match &layout.edges {
            None => {
                for &(s, t) in g.edges() {
                    self.src.push(s as i64 + off);
                    self.dst.push(t as i64 + off);
                }
            }
            Some(edges) => {
                for &(s, t) in edges {
                    self.src.push(s as i64 + off);
                    self.dst.push(t as i64 + off);
                }
            }
        }
        let n = layout.len(g);
        self.batch.extend(std::iter::repeat_n(self.graphs, n));
        self.graphs += 1;
        offset
    }

    fn into_inputs(self, io: &ModelIo) -> Vec<(String, Tensor)> {
        let n = self.nodes();
        let e = self.src.len();
        let x = ArrayD::from_shape_vec(IxDyn(&[n, self.width]), self.x).expect("x shape");
        let mut ei = self.src;
        ei.extend(self.dst);
        let ei = ArrayD::from_shape_vec(IxDyn(&[2, e]), ei).expect("edge shape");
        let mut inputs = vec![
            (io.x.clone(), Tensor::f32(x)),
            (io.edge_index.clone(), Tensor::i64(ei)),
        ];
        if let Some(b) = &io.batch {
            let batch = ArrayD::from_shape_vec(IxDyn(&[n]), self.batch).expect("batch shape");
            inputs.push((b.clone(), Tensor::i64(batch)));
        }
        inputs
    }
}

/// Packs the pieces of many jobs into calls of at most `max_nodes` nodes, keeps at most
/// `max_in_flight` calls submitted, and routes the outputs back.
struct Runner {
    service: InferenceService,
    io: Arc<ModelIo>,
    max_nodes: usize,
    max_in_flight: usize,
    jobs: Vec<Job>,
    cursor: (usize, usize),
    staged: Option<Layout>,
    in_flight: VecDeque<Call>,
}

impl Runner {
    fn new(embedder: &GnnEmbedder, jobs: Vec<Job>) -> Self {
        Runner {
            service: embedder.service.clone(),
            io: embedder.io.clone(),
            max_nodes: embedder.max_nodes,
            max_in_flight: 2,
            jobs,
            cursor: (0, 0),
            staged: None,
            in_flight: VecDeque::new(),
        }
    }

    /// Lays out the next piece, if any is left.
    fn next_layout(&mut self) -> Option<Layout> {
        loop {
            let (j, s) = self.cursor;
            let job = self.jobs.get_mut(j)?;
            if s >= job.specs.len() || job.error.is_some() {
                self.cursor = (j + 1, 0);
                continue;
            }
            self.cursor = (j, s + 1);
            let layout = match &job.specs[s] {
                Spec::Whole { prompt, keep } => Layout {
                    job: j,
                    spec: s,
                    nodes: None,
                    edges: None,
                    prompt: *prompt,
                    keep: keep.clone(),
                },
                Spec::Ball { target, prompt } => {
                    let adj = job.graph.adjacency();
                    let scratch = job
                        .scratch
                        .get_or_insert_with(|| Scratch::new(adj.num_nodes()));
                    let ball = scratch.ball(adj, &[*target], job.hops, Direction::In, job.limit);
                    job.truncated += ball.truncated as usize;
                    let edges = scratch.induced_edges(adj, &ball.nodes);
                    Layout {
                        job: j,
                        spec: s,
                        nodes: Some(ball.nodes),
                        edges: Some(edges),
                        prompt: *prompt,
                        keep: Keep::Rows(vec![0]),
                    }
                }
                Spec::Set(i) => {
                    let set = &job.sets[*i];
                    let adj = job.graph.adjacency();
                    let scratch = job
                        .scratch
                        .get_or_insert_with(|| Scratch::new(adj.num_nodes()));
                    let edges = scratch.induced_edges(adj, &set.nodes);
                    Layout {
                        job: j,
                        spec: s,
                        nodes: Some(set.nodes.clone()),
                        edges: Some(edges),
                        prompt: None,
                        keep: Keep::Rows(set.keep.clone()),
                    }
                }
            };
            return Some(layout);
        }
    }

    /// The inputs and routes of the next call, if any piece is left.
    fn next_call(&mut self) -> Option<CallInputs> {
        let mut union: Option<Union> = None;
        let mut routes = Vec::new();
        while let Some(layout) = self.staged.take().or_else(|| self.next_layout()) {
            let job = &mut self.jobs[layout.job];
            if job.error.is_some() {
                continue;
            }
            let len = layout.len(&job.graph);
            if len == 0 {
                let d = self.io.dim.unwrap_or(0);
                job.outs[layout.spec] = Some(PieceOut {
                    h: Array2::zeros((0, d)),
                    g: self.io.g.as_ref().map(|_| Array1::zeros(d)),
                    nodes: 0,
                });
                continue;
            }
            let width = job.graph.x().ncols();
            let u = union.get_or_insert_with(|| Union::new(width));
            // A package with a dynamic feature width may see graphs of several widths: those
            // cannot share a call.
            if u.nodes() > 0 && (u.nodes() + len > self.max_nodes || u.width != width) {
                self.staged = Some(layout);
                break;
            }
            let prompt = layout.prompt.map(|i| &job.prompts[i]);
            let offset = u.push(&job.graph, &layout, prompt);
            routes.push(Route {
                job: layout.job,
                spec: layout.spec,
                offset,
                len,
                keep: layout.keep,
            });
        }
        union.map(|u| (u.into_inputs(&self.io), routes))
    }

    /// Submits calls until `max_in_flight` are out or no piece is left.
    fn fill(&mut self, waker: Option<&Waker>) {
        while self.in_flight.len() < self.max_in_flight {
            let Some((inputs, routes)) = self.next_call() else {
                break;
            };
            let on_done: Box<dyn FnOnce() + Send> = match waker {
                Some(w) => {
                    let w = w.clone();
                    Box::new(move || w.wake())
                }
                None => Box::new(|| {}),
            };
            let ticket = self.service.submit(inputs, on_done);
            self.in_flight.push_back(Call { ticket, routes });
        }
    }

    fn finished(&self) -> bool {
        self.in_flight.is_empty()
            && self.staged.is_none()
            && self.cursor.0 >= self.jobs.len()
            && self.jobs.iter().all(Job::done)
    }

    /// Hands a call's outputs to its pieces.
    fn route(
        &mut self,
        routes: Vec<Route>,
        reply: Result<Vec<(String, Tensor)>, latentflow_engine::inference::InferenceError>,
    ) {
        let io = &self.io;
        let split = || -> Result<(Array2<f32>, Option<Array2<f32>>), String> {
            let outputs = reply.map_err(|e| format!("model `{}` failed: {e}", io.name))?;
            let get = |name: &str| -> Result<Array2<f32>, String> {
                let t = outputs
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| format!("model `{}` returned no `{name}`", io.name))?;
                t.as_f32()
                    .and_then(|a| a.view().into_dimensionality::<Ix2>().ok())
                    .map(|a| a.to_owned())
                    .ok_or_else(|| format!("model output `{name}` is not f32 [rows, D]"))
            };
            let h = get(&io.h)?;
            let g = io.g.as_deref().map(get).transpose()?;
            Ok((h, g))
        };
        let nodes: usize = routes.iter().map(|r| r.len).sum();
        let outputs = split().and_then(|(h, g)| {
            if h.nrows() != nodes {
                return Err(format!(
                    "model `{}` returned {} rows of `{}` for {nodes} nodes",
                    io.name,
                    h.nrows(),
                    io.h
                ));
            }
            if let Some(g) = &g {
                if g.nrows() != routes.len() {
                    return Err(format!(
                        "model `{}` returned {} graph rows for {} graphs",
                        io.name,
                        g.nrows(),
                        routes.len()
                    ));
                }
            }
            Ok((h, g))
        });
        match outputs {
            Err(e) => {
                for r in routes {
                    self.jobs[r.job].error.get_or_insert_with(|| e.clone());
                }
            }
            Ok((h, g)) => {
                for (k, r) in routes.into_iter().enumerate() {
                    let rows = h.slice(s![r.offset..r.offset + r.len, ..]);
                    let h = match &r.keep {
                        Keep::All => rows.to_owned(),
                        Keep::Rows(keep) => rows.select(Axis(0), keep),
                    };
                    let g = g.as_ref().map(|g| g.row(k).to_owned());
                    self.jobs[r.job].outs[r.spec] = Some(PieceOut { h, g, nodes: r.len });
                }
            }
        }
    }

    /// Takes the replies that have arrived, without blocking, and submits more.
    fn poll(&mut self, waker: &Waker) {
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < self.in_flight.len() {
                match self.in_flight[i].ticket.try_take() {
                    None => i += 1,
                    Some(reply) => {
                        let call = self.in_flight.remove(i).expect("index in range");
                        self.route(call.routes, reply);
                        progressed = true;
                    }
                }
            }
            let before = self.in_flight.len();
            self.fill(Some(waker));
            if !progressed || self.in_flight.len() == before {
                break;
            }
        }
    }

    /// Runs every call, blocking, until all jobs are done.
    fn drain(&mut self) {
        loop {
            self.fill(None);
            let Some(call) = self.in_flight.pop_front() else {
                break;
            };
            let reply = call.ticket.wait();
            self.route(call.routes, reply);
        }
    }

    /// Runs everything, blocking, and returns each job's piece outputs.
    fn run(mut self) -> Vec<Result<Vec<PieceOut>, String>> {
        self.drain();
        self.jobs.iter_mut().map(Job::result).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The Rust interface.

/// How a [`GnnEmbedder`] runs its package.
#[derive(Clone, Debug)]
pub struct EmbedOptions {
    /// Where the package runs.
    pub device: Device,
    /// ONNX Runtime intra-op threads (`None`: ONNX Runtime's choice).
    pub threads: Option<usize>,
    /// Most nodes per model call (a disjoint union of graphs up to this size; a larger graph
    /// runs alone). Default 1024: see the module docs, "Execution".
    pub max_nodes: usize,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        EmbedOptions {
            device: Device::Auto,
            threads: None,
            max_nodes: 1024,
        }
    }
}

/// A GNN package ready to embed graphs, through the process-wide inference service.
#[derive(Clone, Debug)]
pub struct GnnEmbedder {
    service: InferenceService,
    io: Arc<ModelIo>,
    max_nodes: usize,
}

impl GnnEmbedder {
    /// Opens the package in `dir`.
    pub fn open(dir: impl AsRef<Path>, options: &EmbedOptions) -> Result<Self, String> {
        let package = ModelPackage::load(dir.as_ref()).map_err(|e| e.to_string())?;
        let io = ModelIo::of(&package)?;
        let config = ServiceConfig {
            device: options.device,
            max_batch: 1,
            max_delay: Duration::ZERO,
            threads: options.threads,
        };
        let service = InferenceService::get(&package, &config).map_err(|e| e.to_string())?;
        Ok(GnnEmbedder {
            service,
            io: Arc::new(io),
            max_nodes: options.max_nodes.max(1),
        })
    }

    /// The package's inputs and outputs.
    pub fn io(&self) -> &ModelIo {
        &self.io
    }

    /// Most nodes per model call.
    pub fn max_nodes(&self) -> usize {
        self.max_nodes
    }

    /// The inference service (for its statistics).
    pub fn service(&self) -> &InferenceService {
        &self.service
    }

    fn check_width(&self, g: &GnnGraph) -> Result<(), String> {
        match self.io.features {
            Some(f) if g.x().ncols() != f => Err(format!(
                "the graph has {} features per node; model `{}` takes {f}",
                g.x().ncols(),
                self.io.name
            )),
            _ => Ok(()),
        }
    }

    fn run(&self, jobs: Vec<Job>) -> Vec<Result<Vec<PieceOut>, String>> {
        Runner::new(self, jobs).run()
    }

    /// Embeds one whole graph in one call.
    pub fn embed(&self, g: &GnnGraph) -> Result<Embedding, String> {
        Ok(self.embed_many(std::slice::from_ref(g))?.remove(0))
    }

    /// Embeds many graphs, as disjoint unions of up to `max_nodes` nodes per call.
    pub fn embed_many(&self, graphs: &[GnnGraph]) -> Result<Vec<Embedding>, String> {
        let items: Vec<(GnnGraph, Option<Prompt>)> =
            graphs.iter().map(|g| (g.clone(), None)).collect();
        self.embed_many_prompted(&items)
    }

    /// Embeds many graphs, each with its own optional prompt, as disjoint unions of up to
    /// `max_nodes` nodes per call (many RELIEF episodes' prompted subgraphs at once).
    pub fn embed_many_prompted(
        &self,
        items: &[(GnnGraph, Option<Prompt>)],
    ) -> Result<Vec<Embedding>, String> {
        let mut jobs = Vec::with_capacity(items.len());
        for (g, p) in items {
            self.check_width(g)?;
            if let Some(p) = p {
                p.check(g.num_nodes(), g.x().ncols())?;
            }
            let mut job = Job::new(
                g.clone(),
                vec![Spec::Whole {
                    prompt: p.as_ref().map(|_| 0),
                    keep: Keep::All,
                }],
            );
            job.prompts = p.iter().cloned().collect();
            jobs.push(job);
        }
        self.run(jobs)
            .into_iter()
            .map(|r| {
                let p = r?.remove(0);
                Ok(Embedding { h: p.h, g: p.g })
            })
            .collect()
    }

    /// Node embeddings of prompted copies of `graph`, one per dense prompt `[nodes, F]`
    /// (`x + p`), many copies per call as a disjoint union.
    pub fn embed_prompted(
        &self,
        graph: &GnnGraph,
        prompts: &[Array2<f32>],
    ) -> Result<Vec<Array2<f32>>, String> {
        let prompts: Vec<Prompt> = prompts.iter().cloned().map(Prompt::Dense).collect();
        Ok(self
            .embed_prompted_full(graph, prompts)?
            .into_iter()
            .map(|e| e.h)
            .collect())
    }

    /// Node and graph embeddings of prompted copies of `graph`, one per prompt.
    pub fn embed_prompted_full(
        &self,
        graph: &GnnGraph,
        prompts: Vec<Prompt>,
    ) -> Result<Vec<Embedding>, String> {
        self.check_width(graph)?;
        for p in &prompts {
            p.check(graph.num_nodes(), graph.x().ncols())?;
        }
        let specs = (0..prompts.len())
            .map(|i| Spec::Whole {
                prompt: Some(i),
                keep: Keep::All,
            })
            .collect();
        let mut job = Job::new(graph.clone(), specs);
        job.prompts = prompts;
        let outs = self.run(vec![job]).remove(0)?;
        Ok(outs
            .into_iter()
            .map(|p| Embedding { h: p.h, g: p.g })
            .collect())
    }

    /// Embeds each target node from the subgraph induced by its `hops`-hop in-ball (at most
    /// `max_subgraph_nodes` nodes, nearest first), with an optional prompt on the graph.
    pub fn embed_subgraphs(
        &self,
        graph: &GnnGraph,
        targets: &[usize],
        hops: usize,
        max_subgraph_nodes: Option<usize>,
        prompt: Option<Prompt>,
    ) -> Result<SubgraphEmbedding, String> {
        let job = self.subgraph_job(graph, targets, hops, max_subgraph_nodes, prompt)?;
        let mut runner = Runner::new(self, vec![job]);
        // Run it here to read the truncation count afterwards.
        runner.drain();
        let truncated = runner.jobs[0].truncated;
        let outs = runner.jobs[0].result()?;
        Ok(subgraph_result(outs, self.io.dim, truncated))
    }

    fn subgraph_job(
        &self,
        graph: &GnnGraph,
        targets: &[usize],
        hops: usize,
        max_subgraph_nodes: Option<usize>,
        prompt: Option<Prompt>,
    ) -> Result<Job, String> {
        self.check_width(graph)?;
        let n = graph.num_nodes();
        if let Some(&t) = targets.iter().find(|&&t| t >= n) {
            return Err(format!("target node {t} is outside 0..{n}"));
        }
        if let Some(p) = &prompt {
            p.check(n, graph.x().ncols())?;
        }
        let has_prompt = prompt.is_some().then_some(0);
        let specs = targets
            .iter()
            .map(|&target| Spec::Ball {
                target,
                prompt: has_prompt,
            })
            .collect();
        let mut job = Job::new(graph.clone(), specs);
        job.prompts = prompt.into_iter().collect();
        job.hops = hops;
        job.limit = max_subgraph_nodes;
        Ok(job)
    }

    /// Runs the subgraphs induced by each piece's nodes (many per call) and returns each
    /// piece's kept rows, in the order of `keep`.
    pub fn embed_node_sets(
        &self,
        graph: &GnnGraph,
        pieces: &[RecomputePiece],
    ) -> Result<Vec<Array2<f32>>, String> {
        self.check_width(graph)?;
        let mut job = Job::new(graph.clone(), (0..pieces.len()).map(Spec::Set).collect());
        job.sets = pieces.to_vec();
        let outs = self.run(vec![job]).remove(0)?;
        Ok(outs.into_iter().map(|p| p.h).collect())
    }
}

fn subgraph_result(outs: Vec<PieceOut>, dim: Option<usize>, truncated: usize) -> SubgraphEmbedding {
    let d = outs.first().map_or(dim.unwrap_or(0), |p| p.h.ncols());
    let mut h = Array2::zeros((outs.len(), d));
    let mut g = outs
        .first()
        .and_then(|p| p.g.as_ref())
        .map(|_| Array2::zeros((outs.len(), d)));
    let mut sizes = Vec::with_capacity(outs.len());
    for (i, p) in outs.iter().enumerate() {
        if p.h.nrows() == 1 {
            h.row_mut(i).assign(&p.h.row(0));
        }
        if let (Some(g), Some(pg)) = (g.as_mut(), p.g.as_ref()) {
            g.row_mut(i).assign(pg);
        }
        sizes.push(p.nodes);
    }
    SubgraphEmbedding {
        h,
        g,
        sizes,
        truncated,
    }
}

// ---------------------------------------------------------------------------------------------
// The stage.

/// Factory of the `gnn-embed` stage.
pub struct GnnEmbedStage;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Graph,
    Subgraphs,
    Incremental,
}

/// The stage's settings, read from its parameters.
#[derive(Clone, Debug)]
struct Settings {
    mode: Mode,
    x: String,
    edge_index: String,
    output: String,
    graph_output: String,
    prompt: Option<String>,
    prompt_nodes: Option<String>,
    prompt_values: Option<String>,
    hops: usize,
    targets: Option<String>,
    max_subgraph_nodes: Option<usize>,
    layers: usize,
    previous: String,
    changed_edges: Option<String>,
    changed_nodes: Option<String>,
    options: EmbedOptions,
}

fn settings(params: &Params) -> Result<Settings, Vec<PlanIssue>> {
    let mut issues = Vec::new();
    let mut count = |name: &str, default: i64, min: i64| {
        super::int_param(params, name, default, min, &mut issues)
    };
    let hops = count("hops", 2, 0);
    let layers = count("layers", 2, 1);
    let max_nodes = count("max_nodes", 1024, 1);
    let max_subgraph_nodes = params
        .int("max_subgraph_nodes")
        .map(|_| count("max_subgraph_nodes", 1, 1));
    let threads = params.int("threads").map(|_| count("threads", 1, 1));
    let device = match params.str("device").unwrap_or("auto").parse::<Device>() {
        Ok(d) => d,
        Err(e) => {
            issues.push(PlanIssue::param("device", e.0));
            Device::Auto
        }
    };
    let mode = match params.str("mode").unwrap_or("graph") {
        "subgraphs" => Mode::Subgraphs,
        "incremental" => Mode::Incremental,
        _ => Mode::Graph,
    };
    let field = |name: &str| params.str(name).map(String::from);
    let s = Settings {
        mode,
        x: field("x").unwrap_or_else(|| "x".into()),
        edge_index: field("edge_index").unwrap_or_else(|| "edge_index".into()),
        output: field("output").unwrap_or_else(|| "h".into()),
        graph_output: field("graph_output").unwrap_or_else(|| "g".into()),
        prompt: field("prompt"),
        prompt_nodes: field("prompt_nodes"),
        prompt_values: field("prompt_values"),
        hops,
        targets: field("targets"),
        max_subgraph_nodes,
        layers,
        previous: field("previous").unwrap_or_else(|| "h_prev".into()),
        changed_edges: field("changed_edges"),
        changed_nodes: field("changed_nodes"),
        options: EmbedOptions {
            device,
            threads,
            max_nodes,
        },
    };
    if s.prompt_nodes.is_some() != s.prompt_values.is_some() {
        issues.push(
            PlanIssue::param(
                if s.prompt_nodes.is_some() {
                    "prompt_nodes"
                } else {
                    "prompt_values"
                },
                "a sparse prompt needs both `prompt_nodes` and `prompt_values`",
            )
            .hint("or give a dense `prompt` field instead"),
        );
    }
    if s.prompt.is_some() && s.prompt_nodes.is_some() {
        issues.push(PlanIssue::param(
            "prompt",
            "give either a dense `prompt` or `prompt_nodes` with `prompt_values`, not both",
        ));
    }
    if s.mode == Mode::Incremental && (s.prompt.is_some() || s.prompt_nodes.is_some()) {
        issues.push(PlanIssue::param(
            if s.prompt.is_some() {
                "prompt"
            } else {
                "prompt_nodes"
            },
            "prompts are not taken in `mode: incremental`",
        ));
    }
    if s.mode == Mode::Incremental && s.changed_edges.is_none() && s.changed_nodes.is_none() {
        issues.push(
            PlanIssue::param(
                "mode",
                "`mode: incremental` needs `changed_edges` and/or `changed_nodes`",
            )
            .hint("name the fields that list inserted/deleted edges and changed nodes"),
        );
    }
    if s.targets.is_some() && s.mode != Mode::Subgraphs {
        issues.push(PlanIssue::param(
            "targets",
            "`targets` is only read in `mode: subgraphs`",
        ));
    }
    if issues.is_empty() {
        Ok(s)
    } else {
        Err(issues)
    }
}

fn load_io(params: &Params) -> Result<ModelIo, Vec<PlanIssue>> {
    let dir = params.path("model").unwrap_or_default();
    let package = ModelPackage::load(&dir).map_err(|e| {
        vec![PlanIssue::param("model", e.to_string())
            .hint("`model` names a package folder holding manifest.json and the .onnx file")]
    })?;
    ModelIo::of(&package).map_err(|e| {
        vec![PlanIssue::param("model", e)
            .hint("gnn-embed runs GNN packages: inputs x [nodes, F], edge_index [2, edges], optional batch [nodes]")]
    })
}

impl StageFactory for GnnEmbedStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "gnn-embed",
            doc: "Runs a GNN package (inputs x, edge_index, optional batch) on graph records: \
                  whole graphs (many per call as a disjoint union), k-hop subgraphs of target \
                  nodes in batches (mode: subgraphs), optionally with prompt vectors added to \
                  node features, or re-embedding only the nodes whose neighbourhood changed \
                  (mode: incremental, found with differential dataflow).",
            params: vec![
                ParamSpec::required("model", ParamKind::Path, "GNN package folder"),
                ParamSpec::optional(
                    "mode",
                    ParamKind::Choice(&["graph", "subgraphs", "incremental"]),
                    json!("graph"),
                    "graph: whole graphs; subgraphs: each target from its k-hop subgraph; \
                     incremental: recompute the nodes a change reaches",
                ),
                ParamSpec::optional(
                    "x",
                    ParamKind::Field,
                    json!("x"),
                    "node features f32[nodes, F]",
                ),
                ParamSpec::optional(
                    "edge_index",
                    ParamKind::Field,
                    json!("edge_index"),
                    "edges i64[2, edges] (source row, target row)",
                ),
                ParamSpec::optional(
                    "output",
                    ParamKind::String,
                    json!("h"),
                    "field for node embeddings: [nodes, D] (graph, incremental), [targets, D] \
                     (subgraphs), [copies, nodes, D] (3-D prompt)",
                ),
                ParamSpec::optional(
                    "graph_output",
                    ParamKind::String,
                    json!("g"),
                    "field for graph embeddings (packages with a batch input): [D] per graph, \
                     [targets, D] per subgraph, [copies, D] per prompted copy",
                ),
                ParamSpec::optional(
                    "prompt",
                    ParamKind::Field,
                    json!(null),
                    "dense prompt f32[nodes, F], or f32[copies, nodes, F] for many prompted \
                     copies (graph mode), added to x",
                ),
                ParamSpec::optional(
                    "prompt_nodes",
                    ParamKind::Field,
                    json!(null),
                    "sparse prompt: prompted node ids i64[P]",
                ),
                ParamSpec::optional(
                    "prompt_values",
                    ParamKind::Field,
                    json!(null),
                    "sparse prompt: their vectors f32[P, F]",
                ),
                ParamSpec::optional(
                    "hops",
                    ParamKind::Int,
                    json!(2),
                    "subgraphs: radius of each target's induced subgraph (exact for a GCN of L \
                     layers from L + 1, for sum aggregation from L)",
                ),
                ParamSpec::optional(
                    "targets",
                    ParamKind::Field,
                    json!(null),
                    "subgraphs: target node ids i64[targets] (default: every node)",
                ),
                ParamSpec::optional(
                    "max_subgraph_nodes",
                    ParamKind::Int,
                    json!(null),
                    "subgraphs: cut each subgraph to this many nodes, nearest first \
                     (approximate; default: no cut)",
                ),
                ParamSpec::optional(
                    "layers",
                    ParamKind::Int,
                    json!(2),
                    "incremental: message-passing layers of the package (its receptive field)",
                ),
                ParamSpec::optional(
                    "previous",
                    ParamKind::Field,
                    json!("h_prev"),
                    "incremental: embeddings before the change f32[nodes, D]",
                ),
                ParamSpec::optional(
                    "changed_edges",
                    ParamKind::Field,
                    json!(null),
                    "incremental: edges inserted or deleted i64[2, changes]",
                ),
                ParamSpec::optional(
                    "changed_nodes",
                    ParamKind::Field,
                    json!(null),
                    "incremental: nodes whose features changed i64[changed]",
                ),
                ParamSpec::optional(
                    "max_nodes",
                    ParamKind::Int,
                    json!(1024),
                    "most nodes per model call (a larger graph runs alone); about a thousand is \
                     fastest for the GCN packages on a CPU, a GPU wants more",
                ),
                ParamSpec::optional(
                    "device",
                    ParamKind::Choice(&["cpu", "cuda", "auto"]),
                    json!("auto"),
                    "cpu, cuda (fail if unusable) or auto (CUDA when usable, else CPU with a \
                     warning)",
                ),
                ParamSpec::optional(
                    "threads",
                    ParamKind::Int,
                    json!(null),
                    "ONNX Runtime intra-op threads (default: ONNX Runtime's choice)",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let s = settings(params)?;
        let io = load_io(params)?;
        let named = |n: &str| Dim::Named(n.into());
        let width = io.features.map_or_else(|| named("features"), Dim::Fixed);
        let dim = io.dim.map_or_else(|| named("embedding"), Dim::Fixed);
        let f32_of = |dims: Vec<Dim>| FieldType::f32(Shape(Some(dims)));
        let i64_of = |dims: Vec<Dim>| FieldType::Tensor {
            dtype: DType::I64,
            shape: Shape(Some(dims)),
        };
        let mut plan = Plan::default()
            .read(&s.x, f32_of(vec![named("nodes"), width.clone()]), &["x"])
            .read(
                &s.edge_index,
                i64_of(vec![Dim::Fixed(2), named("edges")]),
                &["edge_index"],
            );
        // A 3-D prompt gives every output a `copies` axis.
        let copies = s.prompt.as_ref().is_some_and(|p| {
            matches!(input.get(p), Some(FieldType::Tensor { shape: Shape(Some(d)), .. }) if d.len() == 3)
        });
        if copies && s.mode != Mode::Graph {
            return Err(vec![PlanIssue::param(
                "prompt",
                "a 3-D prompt (many copies) is only taken in `mode: graph`",
            )]);
        }
        if let Some(p) = &s.prompt {
            let mut dims = vec![named("nodes"), width.clone()];
            if copies {
                dims.insert(0, named("copies"));
            }
            plan = plan.read(p, f32_of(dims), &["prompt"]);
        }
        if let (Some(n), Some(v)) = (&s.prompt_nodes, &s.prompt_values) {
            plan = plan
                .read(n, i64_of(vec![named("prompted")]), &["prompt_nodes"])
                .read(
                    v,
                    f32_of(vec![named("prompted"), width.clone()]),
                    &["prompt_values"],
                );
        }
        let rows = match s.mode {
            Mode::Graph => named("nodes"),
            Mode::Subgraphs => named("targets"),
            Mode::Incremental => named("nodes"),
        };
        match s.mode {
            Mode::Graph | Mode::Subgraphs => {
                let mut h = vec![rows.clone(), dim.clone()];
                let mut g = vec![dim.clone()];
                if copies {
                    h.insert(0, named("copies"));
                    g.insert(0, named("copies"));
                }
                if s.mode == Mode::Subgraphs {
                    g.insert(0, named("targets"));
                    if let Some(t) = &s.targets {
                        plan = plan.read(t, i64_of(vec![named("targets")]), &["targets"]);
                    }
                }
                plan = plan.write(&s.output, f32_of(h));
                if io.g.is_some() {
                    plan = plan.write(&s.graph_output, f32_of(g));
                }
            }
            Mode::Incremental => {
                plan = plan.read(
                    &s.previous,
                    f32_of(vec![named("nodes"), dim.clone()]),
                    &["previous"],
                );
                if let Some(c) = &s.changed_edges {
                    plan = plan.read(
                        c,
                        i64_of(vec![Dim::Fixed(2), named("changes")]),
                        &["changed_edges"],
                    );
                }
                if let Some(c) = &s.changed_nodes {
                    plan = plan.read(c, i64_of(vec![named("changed")]), &["changed_nodes"]);
                }
                plan = plan
                    .write(&s.output, f32_of(vec![named("nodes"), dim]))
                    .write(&format!("{}_affected", s.output), FieldType::Int)
                    .write(&format!("{}_computed", s.output), FieldType::Int);
            }
        }
        Ok(plan)
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        if params.str("device") == Some("cuda") && !latentflow_engine::inference::cuda_compiled() {
            return Err(vec![PlanIssue::param(
                "device",
                "`device: cuda`, but this build has no CUDA support",
            )
            .hint(
                "rebuild with `--features cuda`, or use `auto` to fall back to the CPU",
            )]);
        }
        let dir = params.path("model").unwrap_or_default();
        let package =
            ModelPackage::load(&dir).map_err(|e| vec![PlanIssue::param("model", e.to_string())])?;
        package.check().map_err(|e| {
            vec![PlanIssue::param("model", e.to_string())
                .hint("run `latentflow models check <dir>` for details")]
        })
    }

    fn build(&self, params: &Params, cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let s = settings(params).map_err(|i| i[0].message.clone())?;
        let dir = params.path("model").unwrap_or_default();
        let embedder = GnnEmbedder::open(&dir, &s.options)?;
        tracing::debug!(stage = %cx.name, device = %embedder.service.device(), "gnn-embed ready");
        Ok(Box::new(EmbedRunner {
            settings: s,
            embedder,
        }))
    }
}

struct EmbedRunner {
    settings: Settings,
    embedder: GnnEmbedder,
}

/// How a record's outputs are put together from its pieces.
enum Assemble {
    Graph {
        copies: Option<usize>,
    },
    Subgraphs,
    Incremental {
        previous: Array2<f32>,
        affected: usize,
        computed: usize,
        whole_rows: Option<Vec<usize>>,
    },
}

impl EmbedRunner {
    /// The job for one record and how to assemble its result.
    fn job(&self, r: &Record) -> Result<(Job, Assemble), String> {
        let s = &self.settings;
        let graph = GnnGraph::from_record(r, &s.x, &s.edge_index)?;
        self.embedder.check_width(&graph)?;
        let (n, width) = graph.x().dim();
        let mut prompts: Vec<Prompt> = Vec::new();
        let mut copies = None;
        if let Some(p) = &s.prompt {
            let t = r.tensor(p)?;
            let a = t
                .as_f32()
                .ok_or_else(|| format!("field `{p}` is {}, expected f32", t.dtype()))?;
            match a.ndim() {
                2 => prompts.push(Prompt::Dense(
                    a.view()
                        .into_dimensionality::<Ix2>()
                        .expect("2-D")
                        .to_owned(),
                )),
                3 => {
                    let a3 = a.view().into_dimensionality::<ndarray::Ix3>().expect("3-D");
                    copies = Some(a3.shape()[0]);
                    prompts.extend(a3.outer_iter().map(|c| Prompt::Dense(c.to_owned())));
                }
                _ => {
                    return Err(format!(
                        "field `{p}` has shape {:?}, expected [nodes, F] or [copies, nodes, F]",
                        a.shape()
                    ))
                }
            }
        }
        if let (Some(nf), Some(vf)) = (&s.prompt_nodes, &s.prompt_values) {
            let nodes = node_list(r, nf, n)?;
            let t = r.tensor(vf)?;
            let values = t
                .as_f32()
                .and_then(|a| a.view().into_dimensionality::<Ix2>().ok())
                .ok_or_else(|| format!("field `{vf}` must be f32 [P, F]"))?
                .to_owned();
            prompts.push(Prompt::sparse(&nodes, &values)?);
        }
        for p in &prompts {
            p.check(n, width)?;
        }
        match s.mode {
            Mode::Graph => {
                let specs = if prompts.is_empty() {
                    vec![Spec::Whole {
                        prompt: None,
                        keep: Keep::All,
                    }]
                } else {
                    (0..prompts.len())
                        .map(|i| Spec::Whole {
                            prompt: Some(i),
                            keep: Keep::All,
                        })
                        .collect()
                };
                let mut job = Job::new(graph, specs);
                job.prompts = prompts;
                Ok((job, Assemble::Graph { copies }))
            }
            Mode::Subgraphs => {
                let targets = match &s.targets {
                    Some(f) => node_list(r, f, n)?,
                    None => (0..n).collect(),
                };
                let job = self.embedder.subgraph_job(
                    &graph,
                    &targets,
                    s.hops,
                    s.max_subgraph_nodes,
                    prompts.pop(),
                )?;
                Ok((job, Assemble::Subgraphs))
            }
            Mode::Incremental => {
                let prev = r.tensor(&s.previous)?;
                let previous = prev
                    .as_f32()
                    .and_then(|a| a.view().into_dimensionality::<Ix2>().ok())
                    .ok_or_else(|| format!("field `{}` must be f32 [nodes, D]", s.previous))?
                    .to_owned();
                if previous.nrows() != n {
                    return Err(format!(
                        "field `{}` has {} rows for a graph of {n} nodes",
                        s.previous,
                        previous.nrows()
                    ));
                }
                let mut seeds = Vec::new();
                if let Some(f) = &s.changed_edges {
                    for (a, b) in edge_list(r, f)? {
                        if a >= n || b >= n {
                            return Err(format!(
                                "field `{f}`: edge ({a} → {b}) names a node outside 0..{n}"
                            ));
                        }
                        seeds.extend([a, b]);
                    }
                }
                if let Some(f) = &s.changed_nodes {
                    seeds.extend(node_list(r, f, n)?);
                }
                let mut dd = AffectedNodes::new(n, graph.edges(), s.layers);
                let affected = dd.update(&[], &[], &seeds);
                let hops = s.layers + 1;
                let pieces = recompute_pieces(
                    graph.adjacency(),
                    &affected,
                    hops,
                    self.embedder.max_nodes,
                    0.5,
                );
                let (job, computed, whole_rows) = match pieces {
                    Some(pieces) => {
                        let computed = pieces.iter().map(|p| p.nodes.len()).sum();
                        let mut job = Job::new(graph, (0..pieces.len()).map(Spec::Set).collect());
                        job.sets = pieces;
                        (job, computed, None)
                    }
                    None => (
                        Job::new(
                            graph,
                            vec![Spec::Whole {
                                prompt: None,
                                keep: Keep::Rows(affected.clone()),
                            }],
                        ),
                        n,
                        Some(affected.clone()),
                    ),
                };
                Ok((
                    job,
                    Assemble::Incremental {
                        previous,
                        affected: affected.len(),
                        computed,
                        whole_rows,
                    },
                ))
            }
        }
    }

    fn assemble(&self, mut r: Record, how: Assemble, job: &Job, outs: Vec<PieceOut>) -> Record {
        let s = &self.settings;
        match how {
            Assemble::Graph { copies: None } => {
                let p = outs.into_iter().next().expect("one piece");
                r.set(&s.output, Value::Tensor(Tensor::f32(p.h.into_dyn())));
                if let Some(g) = p.g {
                    r.set(&s.graph_output, Value::Tensor(Tensor::f32(g.into_dyn())));
                }
            }
            Assemble::Graph { copies: Some(c) } => {
                let (n, d) = outs.first().map_or((0, 0), |p| p.h.dim());
                let mut h = Array3::zeros((c, n, d));
                let mut g = outs
                    .first()
                    .and_then(|p| p.g.as_ref())
                    .map(|_| Array2::zeros((c, d)));
                for (i, p) in outs.iter().enumerate() {
                    h.index_axis_mut(Axis(0), i).assign(&p.h);
                    if let (Some(g), Some(pg)) = (g.as_mut(), p.g.as_ref()) {
                        g.row_mut(i).assign(pg);
                    }
                }
                r.set(&s.output, Value::Tensor(Tensor::f32(h.into_dyn())));
                if let Some(g) = g {
                    r.set(&s.graph_output, Value::Tensor(Tensor::f32(g.into_dyn())));
                }
            }
            Assemble::Subgraphs => {
                if job.truncated > 0 {
                    tracing::debug!(key = %r.key, cut = job.truncated, "subgraphs cut at max_subgraph_nodes");
                }
                let e = subgraph_result(outs, self.embedder.io.dim, job.truncated);
                r.set(&s.output, Value::Tensor(Tensor::f32(e.h.into_dyn())));
                if let Some(g) = e.g {
                    r.set(&s.graph_output, Value::Tensor(Tensor::f32(g.into_dyn())));
                }
            }
            Assemble::Incremental {
                mut previous,
                affected,
                computed,
                whole_rows,
            } => {
                match whole_rows {
                    Some(rows) => {
                        let p = &outs[0];
                        for (k, &v) in rows.iter().enumerate() {
                            previous.row_mut(v).assign(&p.h.row(k));
                        }
                    }
                    None => {
                        for (piece, p) in job.sets.iter().zip(&outs) {
                            for (k, &local) in piece.keep.iter().enumerate() {
                                previous.row_mut(piece.nodes[local]).assign(&p.h.row(k));
                            }
                        }
                    }
                }
                r.set(&s.output, Value::Tensor(Tensor::f32(previous.into_dyn())));
                r.set(
                    &format!("{}_affected", s.output),
                    Value::Int(affected as i64),
                );
                r.set(
                    &format!("{}_computed", s.output),
                    Value::Int(computed as i64),
                );
            }
        }
        r
    }
}

struct InFlight {
    stage: String,
    runner: Runner,
    records: Vec<(Record, Assemble)>,
    failed: Vec<Outcome>,
    waker: Waker,
    settings: Settings,
    embedder: GnnEmbedder,
}

impl PendingBatch for InFlight {
    fn poll(&mut self) -> Option<Vec<Outcome>> {
        self.runner.poll(&self.waker);
        if !self.runner.finished() {
            return None;
        }
        let this = EmbedRunner {
            settings: self.settings.clone(),
            embedder: self.embedder.clone(),
        };
        let mut out = std::mem::take(&mut self.failed);
        for (k, (r, how)) in std::mem::take(&mut self.records).into_iter().enumerate() {
            let job = &mut self.runner.jobs[k];
            match job.result() {
                Ok(outs) => out.push(Ok(this.assemble(r, how, job, outs))),
                Err(e) => out.push(Err(Failure::of(&r, &self.stage, e))),
            }
        }
        Some(out)
    }
}

impl Stage for EmbedRunner {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        let mut failed = Vec::new();
        let mut jobs = Vec::new();
        let mut records = Vec::new();
        for r in batch {
            match self.job(&r) {
                Ok((job, how)) => {
                    jobs.push(job);
                    records.push((r, how));
                }
                Err(e) => failed.push(Err(Failure::of(&r, &cx.name, e))),
            }
        }
        if jobs.is_empty() {
            return Completion::Ready(failed);
        }
        let mut runner = Runner::new(&self.embedder, jobs);
        runner.fill(Some(&cx.waker));
        let mut pending = InFlight {
            stage: cx.name.clone(),
            runner,
            records,
            failed,
            waker: cx.waker.clone(),
            settings: self.settings.clone(),
            embedder: self.embedder.clone(),
        };
        // Records whose pieces are all empty need no call.
        match pending.poll() {
            Some(out) => Completion::Ready(out),
            None => Completion::Pending(Box::new(pending)),
        }
    }
}
