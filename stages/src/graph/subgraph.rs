//! Neighbourhoods in a graph: adjacency lists in both directions, k-hop balls, and induced
//! subgraphs, for the `gnn-embed` stage ([`super::embed`]) and incremental re-embedding
//! ([`super::embed_incremental`]).
//!
//! Direction matters: messages flow from source to target, so the nodes that can influence
//! node `t` through `k` layers of message passing are those with a path of at most `k` edges
//! *to* `t` — the in-ball, found by following edges backwards ([`Direction::In`]). The nodes
//! that a change at `v` can influence are those reachable *from* `v` — the out-ball
//! ([`Direction::Out`]). On an undirected (symmetric) graph the two coincide.

/// Which way a ball follows edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Backwards, from targets to sources: the nodes whose messages reach the seeds.
    In,
    /// Forwards, from sources to targets: the nodes the seeds' messages reach.
    Out,
}

/// Adjacency lists of a directed graph in both directions (compressed rows). Duplicate edges
/// and self loops are kept as given: the model sees them too.
#[derive(Clone, Debug)]
pub struct Adjacency {
    num_nodes: usize,
    in_ptr: Vec<usize>,
    in_src: Vec<u32>,
    out_ptr: Vec<usize>,
    out_dst: Vec<u32>,
}

fn compressed(
    num_nodes: usize,
    pairs: impl Iterator<Item = (usize, usize)> + Clone,
) -> (Vec<usize>, Vec<u32>) {
    let mut ptr = vec![0usize; num_nodes + 1];
    for (row, _) in pairs.clone() {
        ptr[row + 1] += 1;
    }
    for i in 0..num_nodes {
        ptr[i + 1] += ptr[i];
    }
    let mut next = ptr.clone();
    let mut cols = vec![0u32; ptr[num_nodes]];
    for (row, col) in pairs {
        cols[next[row]] = col as u32;
        next[row] += 1;
    }
    (ptr, cols)
}

impl Adjacency {
    /// Adjacency of `edges` (source, target) over `num_nodes` nodes. Every node id must be
    /// below `num_nodes`.
    pub fn new(num_nodes: usize, edges: &[(usize, usize)]) -> Self {
        let (in_ptr, in_src) = compressed(num_nodes, edges.iter().map(|&(s, t)| (t, s)));
        let (out_ptr, out_dst) = compressed(num_nodes, edges.iter().copied());
        Adjacency {
            num_nodes,
            in_ptr,
            in_src,
            out_ptr,
            out_dst,
        }
    }

    /// Number of nodes.
    pub fn num_nodes(&self) -> usize {
        self.num_nodes
    }

    /// Sources of the edges into `v` (with repeats for repeated edges).
    pub fn in_neighbours(&self, v: usize) -> &[u32] {
        &self.in_src[self.in_ptr[v]..self.in_ptr[v + 1]]
    }

    /// Targets of the edges out of `v`.
    pub fn out_neighbours(&self, v: usize) -> &[u32] {
        &self.out_dst[self.out_ptr[v]..self.out_ptr[v + 1]]
    }

    fn neighbours(&self, v: usize, dir: Direction) -> &[u32] {
        match dir {
            Direction::In => self.in_neighbours(v),
            Direction::Out => self.out_neighbours(v),
        }
    }
}

/// The nodes within some distance of seed nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ball {
    /// The nodes: the seeds first (in the order given, without repeats), then by distance, and
    /// within one distance in the order found.
    pub nodes: Vec<usize>,
    /// `nodes[..layer_ends[d]]` are the nodes at distance at most `d`; one entry per distance
    /// reached, `0..=hops`.
    pub layer_ends: Vec<usize>,
    /// Whether the ball was cut at a node limit (then it is not the whole ball).
    pub truncated: bool,
    /// Whether the ball is closed: no node outside it is one step from it, so it holds every
    /// node that any distance reaches (a whole connected component, for undirected graphs).
    pub closed: bool,
}

/// Reusable work space for balls and induced subgraphs over one graph: a visit stamp and a
/// local numbering per node, so that each ball costs time in its own size, not the graph's.
#[derive(Clone, Debug)]
pub struct Scratch {
    stamp: Vec<u32>,
    epoch: u32,
    local: Vec<u32>,
}

impl Scratch {
    /// Work space for graphs of `num_nodes` nodes.
    pub fn new(num_nodes: usize) -> Self {
        Scratch {
            stamp: vec![0; num_nodes],
            epoch: 0,
            local: vec![u32::MAX; num_nodes],
        }
    }

    fn next_epoch(&mut self) -> u32 {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.epoch = 1;
        }
        self.epoch
    }

    /// The nodes within `hops` steps of `seeds` along `dir`, at most `limit` of them (nearest
    /// first; the seeds are always kept).
    pub fn ball(
        &mut self,
        adj: &Adjacency,
        seeds: &[usize],
        hops: usize,
        dir: Direction,
        limit: Option<usize>,
    ) -> Ball {
        let epoch = self.next_epoch();
        let mut nodes = Vec::with_capacity(seeds.len());
        for &s in seeds {
            if self.stamp[s] != epoch {
                self.stamp[s] = epoch;
                nodes.push(s);
            }
        }
        let limit = limit.unwrap_or(usize::MAX).max(nodes.len());
        let mut layer_ends = vec![nodes.len()];
        let mut start = 0;
        let mut truncated = false;
        for _ in 0..hops {
            let end = nodes.len();
            'layer: for i in start..end {
                for &u in adj.neighbours(nodes[i], dir) {
                    let u = u as usize;
                    if self.stamp[u] != epoch {
                        if nodes.len() == limit {
                            truncated = true;
                            break 'layer;
                        }
                        self.stamp[u] = epoch;
                        nodes.push(u);
                    }
                }
            }
            start = end;
            layer_ends.push(nodes.len());
            if truncated || start == nodes.len() {
                break;
            }
        }
        // Closed when one more step finds nothing new.
        let closed = !truncated
            && nodes[start..].iter().all(|&v| {
                adj.neighbours(v, dir)
                    .iter()
                    .all(|&u| self.stamp[u as usize] == epoch)
            });
        Ball {
            nodes,
            layer_ends,
            truncated,
            closed,
        }
    }

    /// The edges among `nodes` (the subgraph they induce), renumbered by position in
    /// `nodes`, grouped by target in the order of `nodes`. `nodes` must not repeat.
    pub fn induced_edges(&mut self, adj: &Adjacency, nodes: &[usize]) -> Vec<(u32, u32)> {
        for (i, &v) in nodes.iter().enumerate() {
            self.local[v] = i as u32;
        }
        let mut edges = Vec::new();
        for (j, &v) in nodes.iter().enumerate() {
            for &u in adj.in_neighbours(v) {
                let i = self.local[u as usize];
                if i != u32::MAX {
                    edges.push((i, j as u32));
                }
            }
        }
        for &v in nodes {
            self.local[v] = u32::MAX;
        }
        edges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(n: usize) -> Vec<(usize, usize)> {
        (0..n - 1).flat_map(|i| [(i, i + 1), (i + 1, i)]).collect()
    }

    #[test]
    fn balls_on_a_path() {
        let adj = Adjacency::new(6, &path(6));
        let mut s = Scratch::new(6);
        let b = s.ball(&adj, &[2], 2, Direction::In, None);
        assert_eq!(b.nodes, vec![2, 1, 3, 0, 4]);
        assert_eq!(b.layer_ends, vec![1, 3, 5]);
        assert!(!b.closed && !b.truncated);
        let b = s.ball(&adj, &[2], 3, Direction::In, None);
        assert_eq!(b.nodes.len(), 6);
        assert!(b.closed);
        let b = s.ball(&adj, &[2], 3, Direction::In, Some(4));
        assert_eq!(b.nodes, vec![2, 1, 3, 0]);
        assert!(b.truncated);
        let e = s.induced_edges(&adj, &[2, 1, 3]);
        assert_eq!(e, vec![(1, 0), (2, 0), (0, 1), (0, 2)]);
    }

    #[test]
    fn directions_differ_on_directed_edges() {
        // 0 -> 1 -> 2
        let adj = Adjacency::new(3, &[(0, 1), (1, 2)]);
        let mut s = Scratch::new(3);
        assert_eq!(s.ball(&adj, &[1], 1, Direction::In, None).nodes, vec![1, 0]);
        assert_eq!(
            s.ball(&adj, &[1], 1, Direction::Out, None).nodes,
            vec![1, 2]
        );
        assert_eq!(
            s.ball(&adj, &[0, 2, 0], 0, Direction::Out, None).nodes,
            vec![0, 2]
        );
    }
}
