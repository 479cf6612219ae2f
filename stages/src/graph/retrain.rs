//! The classifier of active learning: the two-layer GCN of [`super::gcn`] (same weights, same
//! loss), retrained after every pick, with a training step that touches only the part of the
//! graph the loss depends on.
//!
//! The loss reads the logits of the labelled nodes `L`. Those depend on the hidden rows of
//! `N1` (the labelled nodes and their neighbours in `Â`), which depend on the input rows of
//! `N2` (`N1` and its neighbours). [`loss_and_grad`] computes the forward and backward passes
//! on those rows only: the result equals [`super::gcn::loss_and_grad`] on the whole graph (a
//! test checks it), at a cost that grows with the labelled set's two-hop neighbourhood rather
//! than with the graph. Dropout masks are drawn over the touched entries only.
//!
//! As in the published GCBR, the classifier is not retrained from scratch after a pick: it
//! trains `epochs_per_pick` more epochs \[1\], continuing from its weights and Adam state, and
//! `final_epochs` more after the last pick [35 while training the policy, 100 when labelling].
//! [`ClassifierSettings::training`] and [`ClassifierSettings::labelling`] keep the two
//! published configurations apart (hidden 128 and 64).
//!
//! Decisions:
//! - The published classifier scales its loss by `min(labelled, 10) / 10`; under Adam that
//!   scale changes only the relative weight of the L2 term in the first steps, and is left out.
//! - Weight decay applies to the first layer only, as in [`super::gcn`].

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::gcn::{GcnInput, GcnParams};
use super::{softmax_rows, Adam, Rng};

/// Hyper-parameters of the classifier retrained during an episode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierSettings {
    /// Hidden units.
    pub hidden: usize,
    /// Dropout on the input features and the hidden layer.
    pub dropout: f32,
    /// Adam learning rate.
    pub lr: f32,
    /// L2 penalty on the first layer's weights.
    pub weight_decay: f32,
    /// Epochs trained after each pick, continuing from the current weights.
    pub epochs_per_pick: usize,
    /// Epochs trained after the last pick, before the final scores.
    pub final_epochs: usize,
}

impl ClassifierSettings {
    /// The published settings for episodes that train the policy: hidden 128, 35 final epochs.
    pub fn training() -> Self {
        ClassifierSettings {
            hidden: 128,
            dropout: 0.5,
            lr: 0.01,
            weight_decay: 5e-4,
            epochs_per_pick: 1,
            final_epochs: 35,
        }
    }

    /// The published settings for labelling a graph with a trained policy (and for the
    /// baselines): hidden 64, 100 final epochs.
    pub fn labelling() -> Self {
        ClassifierSettings {
            hidden: 64,
            final_epochs: 100,
            ..Self::training()
        }
    }
}

/// The rows a loss on `train` depends on, with the pieces of `Â` and `X` it reads, in local
/// numbering.
struct Field {
    /// Hidden rows needed, sorted.
    n1: Vec<usize>,
    /// Input rows needed, sorted.
    n2: Vec<usize>,
    /// Per labelled node: entries `(position in n1, Â value)` of its row.
    rows_l: Vec<Vec<(u32, f32)>>,
    /// Per node of `n1`: entries `(position in n2, Â value)` of its row.
    rows_1: Vec<Vec<(u32, f32)>>,
    /// Input rows of `n2` in compressed rows: offsets, columns, values.
    x_ptr: Vec<usize>,
    x_col: Vec<u32>,
    x_val: Vec<f32>,
}

impl Field {
    fn new(input: &GcnInput, train: &[usize]) -> Field {
        let a = &input.adjacency;
        let n = a.rows;
        let neighbours = |nodes: &[usize]| -> Vec<usize> {
            let mut seen = vec![false; n];
            for &t in nodes {
                for &s in a.row(t).0 {
                    seen[s] = true;
                }
                seen[t] = true;
            }
            (0..n).filter(|&i| seen[i]).collect()
        };
        let n1 = neighbours(train);
        let n2 = neighbours(&n1);
        let position = |nodes: &[usize]| {
            let mut pos = vec![u32::MAX; n];
            for (k, &i) in nodes.iter().enumerate() {
                pos[i] = k as u32;
            }
            pos
        };
        let (pos1, pos2) = (position(&n1), position(&n2));
        let local_rows = |nodes: &[usize], pos: &[u32]| -> Vec<Vec<(u32, f32)>> {
            nodes
                .iter()
                .map(|&t| {
                    let (cols, vals) = a.row(t);
                    cols.iter().zip(vals).map(|(&s, &v)| (pos[s], v)).collect()
                })
                .collect()
        };
        let rows_l = local_rows(train, &pos1);
        let rows_1 = local_rows(&n1, &pos2);
        let (mut x_ptr, mut x_col, mut x_val) = (vec![0], Vec::new(), Vec::new());
        for &u in &n2 {
            let (cols, vals) = input.features.row(u);
            x_col.extend(cols.iter().map(|&j| j as u32));
            x_val.extend_from_slice(vals);
            x_ptr.push(x_col.len());
        }
        Field {
            n1,
            n2,
            rows_l,
            rows_1,
            x_ptr,
            x_col,
            x_val,
        }
    }
}

/// `out += v · x`.
#[inline]
fn axpy(out: &mut [f32], v: f32, x: &[f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o += v * x;
    }
}

/// `a · b` in eight independent sums, so that the loop vectorises.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

fn slice(a: &Array2<f32>) -> &[f32] {
    a.as_slice().expect("standard layout")
}

fn field_loss_and_grad(
    f: &Field,
    p: &GcnParams,
    labels: &[i64],
    train: &[usize],
    weight_decay: f32,
    mut dropout: Option<(f32, &mut Rng)>,
) -> (f64, GcnParams) {
    let hidden = p.b1.len();
    let classes = p.b2.len();
    let (w1, w2) = (slice(&p.w1), slice(&p.w2));
    let b1 = p.b1.as_slice().expect("contiguous");
    let b2 = p.b2.as_slice().expect("contiguous");

    // Input dropout on the touched entries.
    let x_val: Vec<f32> = match &mut dropout {
        Some((rate, rng)) if *rate > 0.0 => {
            let s = rng.dropout_scales(f.x_val.len(), *rate);
            f.x_val.iter().zip(&s).map(|(v, s)| v * s).collect()
        }
        _ => f.x_val.clone(),
    };

    // xw = X[n2] · W1.
    let mut xw = vec![0f32; f.n2.len() * hidden];
    for (k, out) in xw.chunks_exact_mut(hidden).enumerate() {
        let r = f.x_ptr[k]..f.x_ptr[k + 1];
        for (&j, &v) in f.x_col[r.clone()].iter().zip(&x_val[r]) {
            let j = j as usize;
            axpy(out, v, &w1[j * hidden..(j + 1) * hidden]);
        }
    }
    // z1 = Â[n1] · xw + b1; h = dropout(relu(z1)).
    let mut z1 = vec![0f32; f.n1.len() * hidden];
    for (a, out) in z1.chunks_exact_mut(hidden).enumerate() {
        out.copy_from_slice(b1);
        for &(u, v) in &f.rows_1[a] {
            let u = u as usize;
            axpy(out, v, &xw[u * hidden..(u + 1) * hidden]);
        }
    }
    let mut h: Vec<f32> = z1.iter().map(|&z| z.max(0.0)).collect();
    let h_scale = match &mut dropout {
        Some((rate, rng)) if *rate > 0.0 => {
            let s = rng.dropout_scales(h.len(), *rate);
            h.iter_mut().zip(&s).for_each(|(h, s)| *h *= s);
            Some(s)
        }
        _ => None,
    };
    // hw = h · W2 (W2 transposed for contiguous dot products).
    let w2t: Vec<f32> = (0..classes)
        .flat_map(|c| (0..hidden).map(move |k| w2[k * classes + c]))
        .collect();
    let mut hw = vec![0f32; f.n1.len() * classes];
    for (a, out) in hw.chunks_exact_mut(classes).enumerate() {
        let row = &h[a * hidden..(a + 1) * hidden];
        for (c, o) in out.iter_mut().enumerate() {
            *o = dot(row, &w2t[c * hidden..(c + 1) * hidden]);
        }
    }
    // logits of the labelled nodes, softmax cross-entropy, and its gradient.
    let count = train.len().max(1) as f64;
    let mut loss = 0f64;
    let mut g_logits = vec![0f32; train.len() * classes];
    for (l, &t) in train.iter().enumerate() {
        let mut z = b2.to_vec();
        for &(s, v) in &f.rows_l[l] {
            let s = s as usize;
            axpy(&mut z, v, &hw[s * classes..(s + 1) * classes]);
        }
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = z.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let y = labels[t] as usize;
        loss += sum.ln() + max as f64 - z[y] as f64;
        let g = &mut g_logits[l * classes..(l + 1) * classes];
        for (g, &v) in g.iter_mut().zip(&z) {
            *g = ((((v - max) as f64).exp() / sum) / count) as f32;
        }
        g[y] -= (1.0 / count) as f32;
    }
    let penalty = 0.5 * weight_decay as f64 * w1.iter().map(|&w| (w as f64).powi(2)).sum::<f64>();

    // Backward.
    let mut gb2 = vec![0f32; classes];
    let mut g_hw = vec![0f32; f.n1.len() * classes];
    for (l, g) in g_logits.chunks_exact(classes).enumerate() {
        axpy(&mut gb2, 1.0, g);
        for &(s, v) in &f.rows_l[l] {
            let s = s as usize;
            axpy(&mut g_hw[s * classes..(s + 1) * classes], v, g);
        }
    }
    let mut gw2 = vec![0f32; hidden * classes];
    let mut g_h = vec![0f32; f.n1.len() * hidden];
    for a in 0..f.n1.len() {
        let g = &g_hw[a * classes..(a + 1) * classes];
        if g.iter().all(|&v| v == 0.0) {
            continue;
        }
        let row = &h[a * hidden..(a + 1) * hidden];
        for (k, &hv) in row.iter().enumerate() {
            if hv != 0.0 {
                axpy(&mut gw2[k * classes..(k + 1) * classes], hv, g);
            }
        }
        let gh = &mut g_h[a * hidden..(a + 1) * hidden];
        for (c, &gc) in g.iter().enumerate() {
            axpy(gh, gc, &w2t[c * hidden..(c + 1) * hidden]);
        }
    }
    if let Some(s) = &h_scale {
        g_h.iter_mut().zip(s).for_each(|(g, s)| *g *= s);
    }
    g_h.iter_mut()
        .zip(&z1)
        .for_each(|(g, &z)| *g = if z > 0.0 { *g } else { 0.0 });
    let mut gb1 = vec![0f32; hidden];
    let mut g_xw = vec![0f32; f.n2.len() * hidden];
    for (a, g) in g_h.chunks_exact(hidden).enumerate() {
        axpy(&mut gb1, 1.0, g);
        for &(u, v) in &f.rows_1[a] {
            let u = u as usize;
            axpy(&mut g_xw[u * hidden..(u + 1) * hidden], v, g);
        }
    }
    let mut gw1: Vec<f32> = w1.iter().map(|&w| weight_decay * w).collect();
    for (k, g) in g_xw.chunks_exact(hidden).enumerate() {
        let r = f.x_ptr[k]..f.x_ptr[k + 1];
        for (&j, &v) in f.x_col[r.clone()].iter().zip(&x_val[r]) {
            let j = j as usize;
            axpy(&mut gw1[j * hidden..(j + 1) * hidden], v, g);
        }
    }

    let grads = GcnParams {
        w1: Array2::from_shape_vec(p.w1.raw_dim(), gw1).expect("shape"),
        b1: gb1.into(),
        w2: Array2::from_shape_vec(p.w2.raw_dim(), gw2).expect("shape"),
        b2: gb2.into(),
    };
    (loss / count + penalty, grads)
}

/// The GCN training loss on `train` (mean cross-entropy plus `weight_decay / 2 · ‖W1‖²`) and
/// its gradient, computed on the two-hop neighbourhood of `train` only. Without dropout it
/// equals [`super::gcn::loss_and_grad`].
pub fn loss_and_grad(
    p: &GcnParams,
    input: &GcnInput,
    labels: &[i64],
    train: &[usize],
    weight_decay: f32,
    dropout: Option<(f32, &mut Rng)>,
) -> (f64, GcnParams) {
    let f = Field::new(input, train);
    field_loss_and_grad(&f, p, labels, train, weight_decay, dropout)
}

/// A GCN classifier retrained as labels arrive: weights, Adam state, dropout generator.
#[derive(Clone, Debug)]
pub struct Retrainer {
    /// The current weights.
    pub params: GcnParams,
    settings: ClassifierSettings,
    adam: Adam,
    rng: Rng,
}

impl Retrainer {
    /// A freshly initialised classifier (Glorot weights from `seed`).
    pub fn new(features: usize, classes: usize, settings: &ClassifierSettings, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let params = GcnParams::init(features, settings.hidden, classes, &mut rng);
        let sizes = params.slices().map(|s| s.len());
        Retrainer {
            adam: Adam::new(settings.lr, &sizes),
            params,
            settings: settings.clone(),
            rng,
        }
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &ClassifierSettings {
        &self.settings
    }

    /// Trains `epochs` more epochs on the labels of `train` (indexed by node); returns the
    /// last epoch's loss (`NaN` when `epochs` or `train` is empty, which trains nothing).
    pub fn fit(&mut self, input: &GcnInput, labels: &[i64], train: &[usize], epochs: usize) -> f64 {
        if train.is_empty() || epochs == 0 {
            return f64::NAN;
        }
        let f = Field::new(input, train);
        let mut loss = f64::NAN;
        for _ in 0..epochs {
            let (l, g) = field_loss_and_grad(
                &f,
                &self.params,
                labels,
                train,
                self.settings.weight_decay,
                Some((self.settings.dropout, &mut self.rng)),
            );
            self.adam.step(&mut self.params.slices_mut(), &g.slices());
            loss = l;
        }
        loss
    }

    /// Class probabilities `[nodes, classes]` and hidden-layer embeddings `[nodes, hidden]`
    /// of every node, without dropout.
    pub fn predict(&self, input: &GcnInput) -> (Array2<f32>, Array2<f32>) {
        predict(&self.params, input)
    }
}

/// The GCN's forward pass on the whole graph without dropout: probabilities and hidden layer.
pub fn predict(p: &GcnParams, input: &GcnInput) -> (Array2<f32>, Array2<f32>) {
    let (hidden, classes) = p.w2.dim();
    let mut h = input.adjacency.matmul(&input.features.matmul(&p.w1));
    for mut row in h.rows_mut() {
        row.zip_mut_with(&p.b1, |v, &b| *v = (*v + b).max(0.0));
    }
    let w2 = slice(&p.w2);
    let w2t: Vec<f32> = (0..classes)
        .flat_map(|c| (0..hidden).map(move |k| w2[k * classes + c]))
        .collect();
    let hs = slice(&h);
    let hw = Array2::from_shape_fn((h.nrows(), classes), |(i, c)| {
        dot(
            &hs[i * hidden..(i + 1) * hidden],
            &w2t[c * hidden..(c + 1) * hidden],
        )
    });
    let mut logits = input.adjacency.matmul(&hw);
    logits += &p.b2;
    (softmax_rows(&logits), h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{gcn, Graph};

    fn toy() -> Graph {
        crate::graph::random_graph(4, 40, 9, 50, 0.4)
    }

    #[test]
    fn equals_the_whole_graph_gradient() {
        let g = toy();
        let input = GcnInput::new(&g);
        let mut rng = Rng::new(2);
        let p = GcnParams::init(9, 6, 3, &mut rng);
        let labels = g.labels.as_ref().unwrap();
        let train = [3, 17, 25, 30];
        let (l0, g0) = gcn::loss_and_grad(&p, &input, labels, &train, 0.01, None);
        let (l1, g1) = loss_and_grad(&p, &input, labels, &train, 0.01, None);
        assert!((l0 - l1).abs() < 1e-6, "{l0} vs {l1}");
        for (a, b) in g0.slices().iter().zip(g1.slices()) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
            }
        }
        let mut whole = gcn::Gcn::new(9, 3, &gcn::GcnSettings::default());
        whole.params = p.clone();
        let (pa, ha) = whole.predict(&input);
        let (pb, hb) = predict(&p, &input);
        assert!(pa.iter().zip(&pb).all(|(x, y)| (x - y).abs() < 1e-5));
        assert!(ha.iter().zip(&hb).all(|(x, y)| (x - y).abs() < 1e-5));
    }

    #[test]
    fn retraining_fits_the_labelled_nodes() {
        let g = toy();
        let input = GcnInput::new(&g);
        let s = ClassifierSettings {
            hidden: 16,
            dropout: 0.0,
            ..ClassifierSettings::training()
        };
        let mut r = Retrainer::new(9, 3, &s, 1);
        let labels = g.labels.as_ref().unwrap();
        let train: Vec<usize> = (0..12).collect();
        let first = r.fit(&input, labels, &train, 1);
        let last = r.fit(&input, labels, &train, 200);
        assert!(last < first * 0.5, "{first} -> {last}");
        let (probs, _) = r.predict(&input);
        let right = train
            .iter()
            .filter(|&&i| {
                let row = probs.row(i);
                let best = (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
                best as i64 == labels[i]
            })
            .count();
        assert!(right >= 10, "{right} of 12");
    }
}
