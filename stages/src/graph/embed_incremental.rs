//! Incremental re-embedding: when edges or node features of a graph change, only the nodes
//! whose receptive field changed are recomputed, and the result equals a full recomputation.
//!
//! Which nodes? A message-passing GNN of `L` layers computes node `v`'s output from the
//! features of the nodes within `L` in-hops of `v` and from the structure among them (for a
//! GCN also their in-degrees). A change touches *seed* nodes: both endpoints of an inserted or
//! deleted edge (their degrees and aggregations change) and every node whose features change.
//! By induction over the layers, node `v`'s layer-`l` value can only change if `v` is within
//! `l` out-hops of a seed **in the new graph**: a non-seed keeps its in-edges and degree, so
//! its value changes only through an in-neighbour whose previous-layer value (or degree)
//! changed. The affected set is therefore the `L`-hop out-ball of the seeds in the new graph.
//!
//! [`AffectedNodes`] computes that set with differential dataflow (crate
//! `differential-dataflow` 0.26, built on the workspace's timely 0.32): the graph is a
//! collection of edges updated by `(edge, +1)` / `(edge, −1)`, the seeds a collection replaced
//! at every update, and the ball `L` rounds of `reach ∪ (reach ⋈ edges)`, each round a join
//! against one shared arrangement of the edges by source, then `distinct`. Differential
//! dataflow maintains the arrangement and the rounds under the updates, so an update costs
//! work in the size of what changed, not of the graph; the affected set is read back as the
//! changes of the output collection.
//!
//! How are they recomputed? An affected node's output is exact from the subgraph induced by
//! its `(L + 1)`-hop in-ball ([`super::embed`] explains the `+ 1`: degrees at the border).
//! [`recompute_pieces`] takes the subgraph induced by the joint ball of all affected nodes
//! (one breadth-first search from all of them), or, when that exceeds the call size, groups
//! of affected nodes whose balls together fit (many groups per call, as a disjoint union);
//! only the affected rows are taken from each. When the joint ball covers half of the graph or
//! more, one run of the whole graph is cheaper and is used instead.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use differential_dataflow::input::{Input, InputSession};
use ndarray::Array2;
use timely::communication::allocator::thread::Thread;
use timely::communication::Allocator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::worker::Worker;
use timely::WorkerConfig;

use super::embed::{GnnEmbedder, GnnGraph};
use super::subgraph::{Adjacency, Direction, Scratch};

/// The nodes within `hops` out-hops of changed nodes, maintained by differential dataflow
/// over a changing edge collection.
///
/// The computation runs on a timely worker of its own (one thread, the caller's), stepped by
/// [`update`](Self::update) until the update's time is complete. It is `!Send`: keep it on the
/// thread that made it.
pub struct AffectedNodes {
    worker: Worker,
    edges: InputSession<u64, (u32, u32), isize>,
    seeds: InputSession<u64, u32, isize>,
    probe: ProbeHandle<u64>,
    /// Output changes not yet read.
    changes: Rc<RefCell<Vec<(u32, isize)>>>,
    /// The output collection so far (node → multiplicity, always 1 after `distinct`).
    current: HashMap<u32, isize>,
    /// Seeds of the last update, retracted at the next one.
    last_seeds: Vec<u32>,
    num_nodes: usize,
    time: u64,
}

impl AffectedNodes {
    /// The computation for a graph of `num_nodes` nodes with `edges` (source, target),
    /// expanding `hops` rounds from the seeds.
    pub fn new(num_nodes: usize, edges: &[(usize, usize)], hops: usize) -> Self {
        let alloc = Allocator::Thread(Thread::default());
        let mut worker = Worker::new(WorkerConfig::default(), alloc, None);
        let changes: Rc<RefCell<Vec<(u32, isize)>>> = Rc::default();
        let sink = changes.clone();
        let probe = ProbeHandle::new();
        let (mut edge_input, seed_input) = worker.dataflow::<u64, _, _>(|scope| {
            let (edge_input, edges) = scope.new_collection::<(u32, u32), isize>();
            let (seed_input, seeds) = scope.new_collection::<u32, isize>();
            // One arrangement of the edges by source, shared by every round.
            let by_source = edges.arrange_by_key();
            let mut reach = seeds.distinct();
            for _ in 0..hops {
                let next = reach
                    .clone()
                    .map(|v| (v, ()))
                    .join_core(by_source.clone(), |_, _, &target| Some(target));
                reach = reach.concat(next).distinct();
            }
            reach
                .inspect(move |(v, _, diff)| sink.borrow_mut().push((*v, *diff)))
                .probe_with(&probe);
            (edge_input, seed_input)
        });
        for &(s, t) in edges {
            edge_input.insert((s as u32, t as u32));
        }
        let mut this = AffectedNodes {
            worker,
            edges: edge_input,
            seeds: seed_input,
            probe,
            changes,
            current: HashMap::new(),
            last_seeds: Vec::new(),
            num_nodes,
            time: 0,
        };
        this.advance();
        this
    }

    /// Moves both inputs to the next time and runs the dataflow until everything before it is
    /// done.
    fn advance(&mut self) {
        self.time += 1;
        self.edges.advance_to(self.time);
        self.seeds.advance_to(self.time);
        self.edges.flush();
        self.seeds.flush();
        let (probe, time) = (&self.probe, self.time);
        self.worker.step_while(|| probe.less_than(&time));
        for (v, diff) in self.changes.borrow_mut().drain(..) {
            let c = self.current.entry(v).or_insert(0);
            *c += diff;
            if *c == 0 {
                self.current.remove(&v);
            }
        }
    }

    /// Applies edge insertions and deletions, and returns the nodes within `hops` out-hops (in
    /// the new graph) of the seeds: the endpoints of every inserted or deleted edge and the
    /// `changed_nodes`. Sorted. A deleted edge must be present (once per deletion).
    pub fn update(
        &mut self,
        inserted: &[(usize, usize)],
        deleted: &[(usize, usize)],
        changed_nodes: &[usize],
    ) -> Vec<usize> {
        for &(s, t) in inserted {
            self.edges.insert((s as u32, t as u32));
        }
        for &(s, t) in deleted {
            self.edges.remove((s as u32, t as u32));
        }
        for v in self.last_seeds.drain(..) {
            self.seeds.remove(v);
        }
        let mut seeds: Vec<u32> = inserted
            .iter()
            .chain(deleted)
            .flat_map(|&(s, t)| [s as u32, t as u32])
            .chain(changed_nodes.iter().map(|&v| v as u32))
            .collect();
        seeds.sort_unstable();
        seeds.dedup();
        for &v in &seeds {
            self.seeds.insert(v);
        }
        self.last_seeds = seeds;
        self.advance();
        let mut out: Vec<usize> = self.current.keys().map(|&v| v as usize).collect();
        out.sort_unstable();
        debug_assert!(out.iter().all(|&v| v < self.num_nodes));
        out
    }
}

/// The same set as [`AffectedNodes::update`] by a plain breadth-first search: the nodes
/// within `hops` out-hops of `seeds` in the graph of `adj`. Sorted.
pub fn affected_by_search(adj: &Adjacency, seeds: &[usize], hops: usize) -> Vec<usize> {
    let mut scratch = Scratch::new(adj.num_nodes());
    let mut nodes = scratch.ball(adj, seeds, hops, Direction::Out, None).nodes;
    nodes.sort_unstable();
    nodes
}

/// One group of affected nodes to recompute: the subgraph induced by `nodes` (global ids),
/// whose rows `keep` (local positions) are exact, belonging to the global nodes `targets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecomputePiece {
    /// The nodes of the induced subgraph.
    pub nodes: Vec<usize>,
    /// Positions in `nodes` of the rows to take.
    pub keep: Vec<usize>,
}

/// The induced subgraphs that recompute `affected` nodes exactly: each piece holds the union of
/// its nodes' `hops`-hop in-balls. Decisions, in order:
/// - the joint ball of all affected nodes holds at least `whole_share` of the graph's nodes:
///   `None`, one whole-graph run is cheaper;
/// - it holds at most `max_nodes`: it is the one piece;
/// - otherwise groups of affected nodes whose balls together hold at most `max_nodes` (a
///   single node's ball may exceed it), many groups per call — unless, balls overlapping, the
///   groups together would run `whole_share` of the graph: then the joint ball is the one
///   piece after all (one call above `max_nodes`, but smaller than the whole graph).
pub fn recompute_pieces(
    adj: &Adjacency,
    affected: &[usize],
    hops: usize,
    max_nodes: usize,
    whole_share: f64,
) -> Option<Vec<RecomputePiece>> {
    let n = adj.num_nodes();
    let mut scratch = Scratch::new(n);
    let budget = (whole_share * n as f64).ceil() as usize;
    // The joint ball first: one breadth-first search from all affected nodes. Its seeds come
    // first, so the affected rows are its first rows.
    let joint = scratch.ball(adj, affected, hops, Direction::In, None).nodes;
    if joint.len() >= budget {
        return None;
    }
    if joint.len() <= max_nodes {
        return Some(vec![RecomputePiece {
            keep: (0..affected.len()).collect(),
            nodes: joint,
        }]);
    }
    // Too large for one call: groups of nodes whose balls together fit.
    // Position of a node in the current group's node list, u32::MAX when absent.
    let mut pos = vec![u32::MAX; n];
    let mut pieces = Vec::new();
    let mut total = 0usize;
    let mut current = RecomputePiece {
        nodes: Vec::new(),
        keep: Vec::new(),
    };
    for &a in affected {
        let ball = scratch.ball(adj, &[a], hops, Direction::In, None).nodes;
        let new = ball.iter().filter(|&&v| pos[v] == u32::MAX).count();
        if !current.keep.is_empty() && current.nodes.len() + new > max_nodes {
            for &v in &current.nodes {
                pos[v] = u32::MAX;
            }
            total += current.nodes.len();
            pieces.push(std::mem::replace(
                &mut current,
                RecomputePiece {
                    nodes: Vec::new(),
                    keep: Vec::new(),
                },
            ));
        }
        for v in ball {
            if pos[v] == u32::MAX {
                pos[v] = current.nodes.len() as u32;
                current.nodes.push(v);
            }
        }
        current.keep.push(pos[a] as usize);
        if total + current.nodes.len() >= budget {
            return Some(vec![RecomputePiece {
                keep: (0..affected.len()).collect(),
                nodes: joint,
            }]);
        }
    }
    if !current.keep.is_empty() {
        pieces.push(current);
    }
    Some(pieces)
}

/// A change to a graph: edges inserted and deleted, and new feature rows.
#[derive(Clone, Debug, Default)]
pub struct GraphDelta {
    /// Edges (source, target) added; each must be absent before.
    pub inserted: Vec<(usize, usize)>,
    /// Edges removed; each must be present before.
    pub deleted: Vec<(usize, usize)>,
    /// New features for some nodes: (node, row of the feature width).
    pub features: Vec<(usize, Vec<f32>)>,
}

/// What one incremental update did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateReport {
    /// Nodes whose embedding was recomputed (the affected set), sorted.
    pub nodes: Vec<usize>,
    /// How many: `nodes.len()`.
    pub affected: usize,
    /// Nodes that went through the GNN to recompute them (subgraph nodes, or the whole graph).
    pub computed: usize,
    /// Whether the whole graph was run instead of subgraphs.
    pub whole: bool,
}

/// A graph, its embeddings, and the differential computation that keeps them current under
/// changes: [`apply`](Self::apply) recomputes only the affected nodes.
pub struct IncrementalEmbedder<'a> {
    embedder: &'a GnnEmbedder,
    layers: usize,
    graph: GnnGraph,
    edges: BTreeSet<(usize, usize)>,
    h: Array2<f32>,
    affected: AffectedNodes,
    /// Above this share of the graph's nodes, a whole-graph run replaces the subgraphs.
    pub whole_share: f64,
}

impl<'a> IncrementalEmbedder<'a> {
    /// Embeds `graph` once in full and sets up the differential computation for a GNN of
    /// `layers` message-passing layers. Repeated edges are merged (the edges are a set).
    pub fn new(embedder: &'a GnnEmbedder, graph: &GnnGraph, layers: usize) -> Result<Self, String> {
        let edges: BTreeSet<(usize, usize)> = graph.edges().iter().copied().collect();
        let list: Vec<(usize, usize)> = edges.iter().copied().collect();
        let graph = GnnGraph::new(graph.x().clone(), list.clone())?;
        let h = embedder.embed(&graph)?.h;
        let affected = AffectedNodes::new(graph.num_nodes(), &list, layers);
        Ok(IncrementalEmbedder {
            embedder,
            layers,
            graph,
            edges,
            h,
            affected,
            whole_share: 0.5,
        })
    }

    /// The current graph.
    pub fn graph(&self) -> &GnnGraph {
        &self.graph
    }

    /// The current embeddings `[nodes, D]`.
    pub fn embeddings(&self) -> &Array2<f32> {
        &self.h
    }

    /// Applies a change and recomputes the affected nodes' embeddings.
    pub fn apply(&mut self, delta: &GraphDelta) -> Result<UpdateReport, String> {
        let n = self.graph.num_nodes();
        let width = self.graph.x().ncols();
        let mut edges = self.edges.clone();
        let check = |&(s, t): &(usize, usize)| {
            if s >= n || t >= n {
                Err(format!("edge ({s} → {t}) names a node outside 0..{n}"))
            } else {
                Ok(())
            }
        };
        for e in &delta.deleted {
            check(e)?;
            if !edges.remove(e) {
                return Err(format!(
                    "deleted edge ({} → {}) is not in the graph",
                    e.0, e.1
                ));
            }
        }
        for e in &delta.inserted {
            check(e)?;
            if !edges.insert(*e) {
                return Err(format!(
                    "inserted edge ({} → {}) is already in the graph",
                    e.0, e.1
                ));
            }
        }
        let mut graph = self.graph.with_edges(edges.iter().copied().collect())?;
        if !delta.features.is_empty() {
            let mut x = self.graph.x().clone();
            for (v, row) in &delta.features {
                if *v >= n || row.len() != width {
                    return Err(format!(
                        "feature change of node {v}: {} values, expected {width} for a node in \
                         0..{n}",
                        row.len()
                    ));
                }
                x.row_mut(*v)
                    .assign(&ndarray::ArrayView1::from(row.as_slice()));
            }
            graph = graph.with_features(x)?;
        }
        let changed: Vec<usize> = delta.features.iter().map(|(v, _)| *v).collect();
        let affected = self
            .affected
            .update(&delta.inserted, &delta.deleted, &changed);
        let report = refresh(
            self.embedder,
            &graph,
            &mut self.h,
            &affected,
            self.layers + 1,
            self.whole_share,
        )?;
        self.graph = graph;
        self.edges = edges;
        Ok(report)
    }
}

/// Recomputes the rows `affected` of `h` for `graph`, from induced subgraphs of `hops`-hop
/// in-balls (or the whole graph when that is cheaper).
pub fn refresh(
    embedder: &GnnEmbedder,
    graph: &GnnGraph,
    h: &mut Array2<f32>,
    affected: &[usize],
    hops: usize,
    whole_share: f64,
) -> Result<UpdateReport, String> {
    if affected.is_empty() {
        return Ok(UpdateReport::default());
    }
    let adj = graph.adjacency();
    match recompute_pieces(adj, affected, hops, embedder.max_nodes(), whole_share) {
        Some(pieces) => {
            let computed = pieces.iter().map(|p| p.nodes.len()).sum();
            let outs = embedder.embed_node_sets(graph, &pieces)?;
            for (p, rows) in pieces.iter().zip(outs) {
                for (k, &local) in p.keep.iter().enumerate() {
                    h.row_mut(p.nodes[local]).assign(&rows.row(k));
                }
            }
            Ok(UpdateReport {
                nodes: affected.to_vec(),
                affected: affected.len(),
                computed,
                whole: false,
            })
        }
        None => {
            let full = embedder.embed(graph)?.h;
            for &v in affected {
                h.row_mut(v).assign(&full.row(v));
            }
            Ok(UpdateReport {
                nodes: affected.to_vec(),
                affected: affected.len(),
                computed: graph.num_nodes(),
                whole: true,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differential_matches_search_under_updates() {
        let mut rng = super::super::Rng::new(7);
        let n = 60;
        let mut edges: BTreeSet<(usize, usize)> = BTreeSet::new();
        while edges.len() < 90 {
            let (s, t) = (rng.below(n), rng.below(n));
            if s != t {
                edges.insert((s, t));
            }
        }
        let list: Vec<_> = edges.iter().copied().collect();
        let mut dd = AffectedNodes::new(n, &list, 2);
        for round in 0..20 {
            let mut inserted = Vec::new();
            let mut deleted = Vec::new();
            for _ in 0..3 {
                let (s, t) = (rng.below(n), rng.below(n));
                if s != t && !edges.contains(&(s, t)) && !inserted.contains(&(s, t)) {
                    inserted.push((s, t));
                }
            }
            let present: Vec<_> = edges.iter().copied().collect();
            if round % 2 == 0 {
                let e = present[rng.below(present.len())];
                deleted.push(e);
            }
            let changed = if round % 3 == 0 {
                vec![rng.below(n)]
            } else {
                vec![]
            };
            for e in &deleted {
                edges.remove(e);
            }
            edges.extend(inserted.iter().copied());
            let got = dd.update(&inserted, &deleted, &changed);
            let list: Vec<_> = edges.iter().copied().collect();
            let adj = Adjacency::new(n, &list);
            let seeds: Vec<usize> = inserted
                .iter()
                .chain(&deleted)
                .flat_map(|&(s, t)| [s, t])
                .chain(changed.iter().copied())
                .collect();
            assert_eq!(got, affected_by_search(&adj, &seeds, 2), "round {round}");
        }
        // No change: nothing affected.
        assert!(dd.update(&[], &[], &[]).is_empty());
    }
}
