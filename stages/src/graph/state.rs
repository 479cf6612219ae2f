//! The GCBR node state: one row of features per node, the input of the policy's actor and
//! critic GCNs.
//!
//! | column | feature |
//! |---|---|
//! | 0 | entropy of the classifier's predicted class distribution, divided by `ln(classes)` |
//! | 1 | 1 if the node is labelled, else 0 |
//! | 2 | PageRank (damping 0.85), divided by the graph's largest PageRank |
//! | 3 | class diversity: `1 / count(class)` for a labelled node, `Σ_c p_c / (count_c + 1)` else |
//! | 4 | distance to the nearest labelled node in the classifier's embedding, over the largest |
//! | 5 | GCBR++: predicted mass on classes with more labels than the cap (labelled: own class) |
//!
//! Column 4 is the smallest Euclidean distance, in the classifier's hidden layer, to a
//! labelled node, divided by the largest such distance over the graph. Column 5 is, for an
//! unlabelled node, the sum of its predicted probabilities over the classes whose labelled
//! count exceeds the cap; for a labelled node, 1 if its own class does, else 0.
//!
//! Decisions:
//! - Counts are of the labels the oracle gave (the agent knows nothing else).
//! - The distance is measured in the classifier's embedding alone, so the labelled flag adds no
//!   offset to it, and it is divided by its maximum: embedding scales differ between graphs
//!   and classifier widths, and the policy must transfer. Before any node is labelled it is 0.
//! - PageRank is divided by its maximum for the same reason: raw scores shrink as 1 / nodes.
//! - `0 · ln 0` is taken as 0 in the entropy.

use ndarray::Array2;

/// Names of the state columns, in order.
pub const FEATURES: [&str; 6] = [
    "entropy",
    "labelled",
    "pagerank",
    "class_diversity",
    "distance",
    "over_cap_mass",
];

/// What the state is computed from.
#[derive(Clone, Copy, Debug)]
pub struct StateInputs<'a> {
    /// The classifier's class probabilities `[nodes, classes]`.
    pub probs: &'a Array2<f32>,
    /// The classifier's node embeddings `[nodes, hidden]`.
    pub embeddings: &'a Array2<f32>,
    /// The oracle's answer for every labelled node, −1 for the others.
    pub answers: &'a [i64],
    /// PageRank feature of every node (see [`super::pagerank::pagerank_feature`]).
    pub pagerank: &'a [f32],
    /// The GCBR++ cap on labels per class; `None` for GCBR's five features.
    pub cap: Option<usize>,
}

/// Labelled nodes per class among `answers` (negative answers are not counted).
pub fn class_counts(answers: &[i64], classes: usize) -> Vec<usize> {
    let mut c = vec![0; classes];
    for &a in answers {
        if a >= 0 && (a as usize) < classes {
            c[a as usize] += 1;
        }
    }
    c
}

/// Entropy of each row of `probs`, divided by `ln(classes)` (so in `\[0, 1\]`).
pub fn normalised_entropy(probs: &Array2<f32>) -> Vec<f32> {
    let classes = probs.ncols();
    let max = (classes.max(2) as f64).ln();
    probs
        .rows()
        .into_iter()
        .map(|r| {
            let h: f64 = r
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| -(p as f64) * (p as f64).ln())
                .sum();
            (h / max) as f32
        })
        .collect()
}

/// Smallest Euclidean distance from every row of `embeddings` to the rows `targets`
/// (0 for every row when `targets` is empty).
pub fn min_distances(embeddings: &Array2<f32>, targets: &[usize]) -> Vec<f32> {
    let (n, h) = embeddings.dim();
    if targets.is_empty() {
        return vec![0.0; n];
    }
    let e = embeddings.as_standard_layout();
    let e = e.as_slice().expect("standard layout");
    let gathered: Vec<f32> = targets
        .iter()
        .flat_map(|&t| e[t * h..(t + 1) * h].iter().copied())
        .collect();
    (0..n)
        .map(|i| {
            let a = &e[i * h..(i + 1) * h];
            let best = gathered
                .chunks_exact(h.max(1))
                .map(|b| squared_distance(a, b))
                .fold(f32::INFINITY, f32::min);
            best.max(0.0).sqrt()
        })
        .collect()
}

/// `Σ (a − b)²`, in eight independent sums so that the loop vectorises.
fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            let d = x[k] - y[k];
            acc[k] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += (x - y) * (x - y);
    }
    s
}

/// The state `[nodes, 5]` (or `[nodes, 6]` with a cap), as the module documentation lists.
pub fn node_state(inp: &StateInputs) -> Array2<f32> {
    let (n, classes) = inp.probs.dim();
    assert_eq!(inp.answers.len(), n, "one answer slot per node");
    assert_eq!(inp.pagerank.len(), n, "one PageRank per node");
    let width = if inp.cap.is_some() { 6 } else { 5 };
    let counts = class_counts(inp.answers, classes);
    let labelled: Vec<usize> = (0..n).filter(|&i| inp.answers[i] >= 0).collect();
    let entropy = normalised_entropy(inp.probs);
    let dist = min_distances(inp.embeddings, &labelled);
    let max_dist = dist.iter().copied().fold(0.0, f32::max);
    let inv_plus_one: Vec<f32> = counts.iter().map(|&c| 1.0 / (c as f32 + 1.0)).collect();
    let over: Vec<bool> = counts
        .iter()
        .map(|&c| inp.cap.is_some_and(|cap| c > cap))
        .collect();

    let mut s = Array2::zeros((n, width));
    for (i, mut row) in s.rows_mut().into_iter().enumerate() {
        let p = inp.probs.row(i);
        let answer = inp.answers[i];
        row[0] = entropy[i];
        row[1] = if answer >= 0 { 1.0 } else { 0.0 };
        row[2] = inp.pagerank[i];
        row[3] = if answer >= 0 {
            1.0 / counts[answer as usize] as f32
        } else {
            p.iter().zip(&inv_plus_one).map(|(p, w)| p * w).sum()
        };
        row[4] = if max_dist > 0.0 {
            dist[i] / max_dist
        } else {
            0.0
        };
        if width == 6 {
            row[5] = if answer >= 0 {
                if over[answer as usize] {
                    1.0
                } else {
                    0.0
                }
            } else {
                p.iter()
                    .zip(&over)
                    .filter(|(_, &o)| o)
                    .map(|(p, _)| p)
                    .sum()
            };
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn small_state_by_hand() {
        let probs = array![[1.0f32, 0.0], [0.5, 0.5], [0.25, 0.75]];
        let emb = array![[0.0f32, 0.0], [3.0, 4.0], [0.0, 1.0]];
        let answers = [0i64, -1, -1];
        let pr = [1.0f32, 0.5, 0.25];
        let s = node_state(&StateInputs {
            probs: &probs,
            embeddings: &emb,
            answers: &answers,
            pagerank: &pr,
            cap: Some(0),
        });
        assert_eq!(s.dim(), (3, 6));
        assert_eq!(s.row(0).to_vec(), vec![0.0, 1.0, 1.0, 1.0, 0.0, 1.0]);
        assert!((s[[1, 0]] - 1.0).abs() < 1e-6);
        // Class 0 has one label: 0.5 / 2 + 0.5 / 1.
        assert!((s[[1, 3]] - 0.75).abs() < 1e-6);
        // Distances 5 and 1, over the largest (5).
        assert!((s[[1, 4]] - 1.0).abs() < 1e-6 && (s[[2, 4]] - 0.2).abs() < 1e-6);
        // Class 0 exceeds a cap of 0: its predicted mass.
        assert!((s[[2, 5]] - 0.25).abs() < 1e-6);
    }
}
