//! A two-layer graph convolutional network (Kipf & Welling, ICLR 2017) for node
//! classification, with hand-written forward and backward passes over sparse matrices.
//!
//! `logits = Â · dropout(relu(Â · dropout(X) · W1 + b1)) · W2 + b2`, with
//! `Â = D^-1/2 (A + I) D^-1/2` ([`super::gcn_adjacency`]), trained on the mean softmax
//! cross-entropy of the training nodes plus `weight_decay / 2 · ‖W1‖²`, by full-batch Adam.
//!
//! Defaults are the paper's: hidden 16, dropout 0.5 (on the input features and on the hidden
//! layer), Adam lr 0.01, weight decay 5e-4 on the first layer, 200 epochs, Glorot-uniform
//! weights and zero biases. The paper stops early on the validation loss (window 10); here all
//! epochs run and the last model is scored, as in PyTorch Geometric's example.
//!
//! Cost: features and adjacency stay sparse, so an epoch costs `O((nnz(X) + nnz(Â)) · hidden)`;
//! dropout on the input touches only the non-zeros. [`GcnInput`] holds the normalised
//! adjacency so that many trainings on one graph (active learning) build it once.

use std::borrow::Cow;

use ndarray::{Array1, Array2, Axis};

use super::{check_node_task, dense, gcn_adjacency, softmax_rows, softmax_xent};
use super::{Adam, Csr, Graph, NodeResult, Rng};

/// Hyper-parameters of [`train`].
#[derive(Clone, Debug, PartialEq)]
pub struct GcnSettings {
    /// Hidden units.
    pub hidden: usize,
    /// Probability of zeroing an input feature or a hidden unit while training.
    pub dropout: f32,
    /// Adam learning rate.
    pub lr: f32,
    /// L2 penalty on the first layer's weights (`weight_decay / 2 · ‖W1‖²`).
    pub weight_decay: f32,
    /// Full-batch training epochs.
    pub epochs: usize,
    /// Seed of the initial weights and of the dropout masks.
    pub seed: u64,
}

impl Default for GcnSettings {
    fn default() -> Self {
        GcnSettings {
            hidden: 16,
            dropout: 0.5,
            lr: 0.01,
            weight_decay: 5e-4,
            epochs: 200,
            seed: 0,
        }
    }
}

/// What the GCN reads of a graph, prepared once.
#[derive(Clone, Debug)]
pub struct GcnInput {
    /// The propagation matrix `Â`, rows = targets.
    pub adjacency: Csr,
    /// Node features `[nodes, features]`.
    pub features: Csr,
}

impl GcnInput {
    /// The normalised adjacency and features of a graph.
    pub fn new(g: &Graph) -> Self {
        GcnInput {
            adjacency: gcn_adjacency(g.num_nodes, &g.edges),
            features: g.features.clone(),
        }
    }
}

/// The GCN's weights (or gradients of the same shapes).
#[derive(Clone, Debug, PartialEq)]
pub struct GcnParams {
    /// First layer `[features, hidden]`.
    pub w1: Array2<f32>,
    /// First layer bias `[hidden]`.
    pub b1: Array1<f32>,
    /// Second layer `[hidden, classes]`.
    pub w2: Array2<f32>,
    /// Second layer bias `[classes]`.
    pub b2: Array1<f32>,
}

/// Glorot (Xavier) uniform initialisation of a `[fan_in, fan_out]` weight.
fn glorot(fan_in: usize, fan_out: usize, rng: &mut Rng) -> Array2<f32> {
    let r = (6.0 / (fan_in + fan_out) as f32).sqrt();
    Array2::from_shape_simple_fn((fan_in, fan_out), || (rng.uniform() * 2.0 - 1.0) * r)
}

impl GcnParams {
    /// Glorot-uniform weights and zero biases.
    pub fn init(features: usize, hidden: usize, classes: usize, rng: &mut Rng) -> Self {
        GcnParams {
            w1: glorot(features, hidden, rng),
            b1: Array1::zeros(hidden),
            w2: glorot(hidden, classes, rng),
            b2: Array1::zeros(classes),
        }
    }

    /// The tensors as flat slices, in a fixed order (w1, b1, w2, b2).
    pub fn slices(&self) -> [&[f32]; 4] {
        [
            self.w1.as_slice().expect("standard layout"),
            self.b1.as_slice().expect("standard layout"),
            self.w2.as_slice().expect("standard layout"),
            self.b2.as_slice().expect("standard layout"),
        ]
    }

    /// The tensors as mutable flat slices, in the order of [`GcnParams::slices`].
    pub fn slices_mut(&mut self) -> [&mut [f32]; 4] {
        [
            self.w1.as_slice_mut().expect("standard layout"),
            self.b1.as_slice_mut().expect("standard layout"),
            self.w2.as_slice_mut().expect("standard layout"),
            self.b2.as_slice_mut().expect("standard layout"),
        ]
    }
}

/// The values of a forward pass that the backward pass needs.
struct Forward<'a> {
    /// Input features after dropout.
    x: Cow<'a, Csr>,
    /// First-layer pre-activations.
    z1: Array2<f32>,
    /// Hidden layer after ReLU and dropout.
    h: Array2<f32>,
    /// Dropout scale of every hidden unit (0 or 1 / keep), when dropout ran.
    h_scale: Option<Array2<f32>>,
    /// Output logits.
    logits: Array2<f32>,
}

fn forward<'a>(
    p: &GcnParams,
    input: &'a GcnInput,
    mut dropout: Option<(f32, &mut Rng)>,
) -> Forward<'a> {
    let x = match &mut dropout {
        Some((rate, rng)) if *rate > 0.0 => {
            let scales = rng.dropout_scales(input.features.nnz(), *rate);
            let data = input
                .features
                .data
                .iter()
                .zip(&scales)
                .map(|(v, s)| v * s)
                .collect();
            Cow::Owned(input.features.with_data(data))
        }
        _ => Cow::Borrowed(&input.features),
    };
    let mut z1 = input.adjacency.matmul(&x.matmul(&p.w1));
    z1 += &p.b1;
    let mut h = z1.mapv(|v| v.max(0.0));
    let h_scale = match &mut dropout {
        Some((rate, rng)) if *rate > 0.0 => {
            let s = rng.dropout_scales(h.len(), *rate);
            let s = Array2::from_shape_vec(h.raw_dim(), s).expect("shape");
            h *= &s;
            Some(s)
        }
        _ => None,
    };
    let mut logits = input.adjacency.matmul(&dense::matmul(&h, &p.w2));
    logits += &p.b2;
    Forward {
        x,
        z1,
        h,
        h_scale,
        logits,
    }
}

/// The training loss (mean cross-entropy over `train` plus the weight penalty) and its
/// gradient. With `dropout`, the masks are drawn from the given generator, so a clone of one
/// generator gives the same masks twice (as the gradient check needs).
pub fn loss_and_grad(
    p: &GcnParams,
    input: &GcnInput,
    labels: &[i64],
    train: &[usize],
    weight_decay: f32,
    dropout: Option<(f32, &mut Rng)>,
) -> (f64, GcnParams) {
    let f = forward(p, input, dropout);
    let (xent, g_logits) = softmax_xent(&f.logits, labels, train);
    let penalty = 0.5 * weight_decay as f64 * p.w1.iter().map(|&w| (w as f64).powi(2)).sum::<f64>();

    let b2 = g_logits.sum_axis(Axis(0));
    let g_hw = input.adjacency.t_matmul(&g_logits);
    let w2 = dense::matmul_tn(&f.h, &g_hw);
    let mut g_h = dense::matmul_nt(&g_hw, &p.w2);
    if let Some(s) = &f.h_scale {
        g_h *= s;
    }
    ndarray::Zip::from(&mut g_h)
        .and(&f.z1)
        .for_each(|g, &z| *g = if z > 0.0 { *g } else { 0.0 });
    let b1 = g_h.sum_axis(Axis(0));
    let g_xw = input.adjacency.t_matmul(&g_h);
    let mut w1 = f.x.t_matmul(&g_xw);
    w1.scaled_add(weight_decay, &p.w1);
    (xent + penalty, GcnParams { w1, b1, w2, b2 })
}

/// A GCN being trained: weights, optimiser state and the dropout generator.
#[derive(Clone, Debug)]
pub struct Gcn {
    /// The current weights.
    pub params: GcnParams,
    settings: GcnSettings,
    adam: Adam,
    rng: Rng,
}

impl Gcn {
    /// A freshly initialised network for `features` inputs and `classes` outputs.
    pub fn new(features: usize, classes: usize, settings: &GcnSettings) -> Self {
        let mut rng = Rng::new(settings.seed);
        let params = GcnParams::init(features, settings.hidden, classes, &mut rng);
        let sizes = params.slices().map(|s| s.len());
        Gcn {
            adam: Adam::new(settings.lr, &sizes),
            params,
            settings: settings.clone(),
            rng,
        }
    }

    /// Trains `epochs` more epochs on the labels of `train`; returns the loss of each epoch.
    /// Optimiser state carries over between calls (extra epochs continue the same run).
    pub fn fit(
        &mut self,
        input: &GcnInput,
        labels: &[i64],
        train: &[usize],
        epochs: usize,
    ) -> Vec<f32> {
        let mut losses = Vec::with_capacity(epochs);
        for _ in 0..epochs {
            let (loss, g) = loss_and_grad(
                &self.params,
                input,
                labels,
                train,
                self.settings.weight_decay,
                Some((self.settings.dropout, &mut self.rng)),
            );
            self.adam.step(&mut self.params.slices_mut(), &g.slices());
            losses.push(loss as f32);
        }
        losses
    }

    /// Class probabilities `[nodes, classes]` and hidden-layer embeddings `[nodes, hidden]`,
    /// without dropout.
    pub fn predict(&self, input: &GcnInput) -> (Array2<f32>, Array2<f32>) {
        let f = forward(&self.params, input, None);
        (softmax_rows(&f.logits), f.h)
    }
}

/// Trains a GCN on the graph's training nodes and scores it on all three parts of its split.
pub fn train(g: &Graph, settings: &GcnSettings) -> Result<NodeResult, String> {
    train_with(g, &GcnInput::new(g), settings)
}

/// [`train`] with the adjacency already prepared.
pub fn train_with(
    g: &Graph,
    input: &GcnInput,
    settings: &GcnSettings,
) -> Result<NodeResult, String> {
    let (classes, labels, split) = check_node_task(g)?;
    if settings.hidden == 0 || !(0.0..1.0).contains(&settings.dropout) {
        return Err(format!(
            "hidden must be positive and dropout in [0, 1), got {} and {}",
            settings.hidden, settings.dropout
        ));
    }
    let mut gcn = Gcn::new(g.features.cols, classes, settings);
    let losses = gcn.fit(input, labels, &split.train, settings.epochs);
    if let Some(e) = losses.iter().position(|l| !l.is_finite()) {
        return Err(format!(
            "the training loss became {} at epoch {}; lower the learning rate",
            losses[e],
            e + 1
        ));
    }
    let (probs, hidden) = gcn.predict(input);
    Ok(NodeResult::new(probs, Some(hidden), losses, labels, split))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Split;

    /// A small random graph with 3 classes.
    fn toy(seed: u64) -> Graph {
        Graph {
            split: Some(Split {
                train: vec![0, 1, 2, 4, 5, 7],
                val: vec![8, 9],
                test: vec![10, 11],
            }),
            ..crate::graph::random_graph(seed, 12, 5, 20, 0.5)
        }
    }

    #[test]
    fn gradient_matches_central_differences() {
        let g = toy(1);
        let input = GcnInput::new(&g);
        let mut rng = Rng::new(7);
        let p = GcnParams::init(5, 4, 3, &mut rng);
        let labels = g.labels.as_ref().unwrap();
        let train = &g.split.as_ref().unwrap().train;
        let drop_rng = Rng::new(11);
        let loss = |q: &GcnParams| {
            let mut r = drop_rng.clone();
            loss_and_grad(q, &input, labels, train, 0.05, Some((0.3, &mut r))).0
        };
        let mut r = drop_rng.clone();
        let (_, grad) = loss_and_grad(&p, &input, labels, train, 0.05, Some((0.3, &mut r)));
        // Central differences in f32 arithmetic: a step of 1e-3 keeps rounding noise near
        // 1e-4. A coordinate whose step crosses a ReLU kink (one-sided differences disagree)
        // is skipped, as the derivative is not defined there.
        let eps = 1e-3f32;
        let base = loss(&p);
        let (mut worst, mut checked) = (0f64, 0);
        for k in 0..4 {
            for i in 0..p.slices()[k].len() {
                let mut plus = p.clone();
                plus.slices_mut()[k][i] += eps;
                let mut minus = p.clone();
                minus.slices_mut()[k][i] -= eps;
                let (lp, lm) = (loss(&plus), loss(&minus));
                let h = eps as f64;
                if ((lp - base) / h - (base - lm) / h).abs() > 1e-2 {
                    continue;
                }
                let fd = (lp - lm) / (2.0 * h);
                let an = grad.slices()[k][i] as f64;
                worst = worst.max((fd - an).abs() / (1e-2 + an.abs()));
                checked += 1;
            }
        }
        let total: usize = p.slices().iter().map(|s| s.len()).sum();
        assert!(
            checked * 10 >= total * 9,
            "only {checked} of {total} checked"
        );
        assert!(worst < 1e-3, "largest relative error {worst}");
    }

    #[test]
    fn learns_a_toy_graph() {
        let g = toy(2);
        let s = GcnSettings {
            dropout: 0.0,
            epochs: 300,
            ..Default::default()
        };
        let r = train(&g, &s).unwrap();
        assert!(r.losses.last().unwrap() < &r.losses[0]);
        assert!(r.train.accuracy > 0.8, "{:?}", r.train);
        assert_eq!(r.probs.dim(), (12, 3));
        assert_eq!(r.embeddings.unwrap().dim(), (12, 16));
    }
}
