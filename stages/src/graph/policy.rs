//! The GCBR policy: actor and critic, two small GCNs over the graph whose node features are
//! the GCBR state rows, with hand-written gradients of the advantage actor-critic losses.
//!
//! Both networks are `out = relu(Â · (relu(Â · (S W1 + b1)) W2 + b2)) · head` with `Â` the
//! GCN propagation matrix ([`super::gcn_adjacency`]), `S` the state `[nodes, features]`,
//! 8 hidden units per layer \[8\] and a bias-free linear head. The actor reads `out` as one logit
//! per node; the action distribution is the softmax over the candidate pool (labelled nodes
//! and the validation and test nodes masked out). The critic mean-pools: `V = mean(out)` (the
//! mean of a linear head equals the head of the mean-pooled hidden layer). Weights start
//! uniform in `±1/√fan_out` (layers) and `±1/√fan_in` (head), biases at zero, as in the
//! published code.
//!
//! Losses, over a batch of transitions of `B` parallel episodes:
//! - actor: `−(1/B) Σ A · log π(a | s)`, with the advantage `A` held fixed;
//! - critic: `mean (V(s) − y)²`, with the TD target `y` held fixed.
//!
//! The policy is small (a few hundred weights) and runs in `f64`, so finite differences
//! check its gradients to many digits.

use std::ops::Range;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::{Csr, Rng};

/// One of the two networks: weights in one flat vector (`w1`, `b1`, `w2`, `b2`, `head`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyNet {
    /// State features per node (input width).
    pub features: usize,
    /// Hidden units of the two layers.
    pub hidden: [usize; 2],
    /// All weights, in the order `w1 [features × h1]`, `b1 [h1]`, `w2 [h1 × h2]`, `b2 [h2]`,
    /// `head [h2]`, row-major.
    pub theta: Vec<f64>,
}

/// What a forward pass keeps for the backward pass.
#[derive(Clone, Debug)]
pub struct Forward {
    z1: Vec<f64>,
    h1: Vec<f64>,
    z2: Vec<f64>,
    h2: Vec<f64>,
    /// One output per node: the actor's logits.
    pub out: Vec<f64>,
}

impl Forward {
    /// The critic's value: the mean output.
    pub fn value(&self) -> f64 {
        self.out.iter().sum::<f64>() / self.out.len().max(1) as f64
    }
}

/// `y = Â · x` for `x` of `[nodes, k]` row-major, in `f64`.
fn propagate(a: &Csr, x: &[f64], k: usize) -> Vec<f64> {
    let mut y = vec![0.0; a.rows * k];
    for (t, out) in y.chunks_exact_mut(k).enumerate() {
        let (cols, vals) = a.row(t);
        for (&s, &v) in cols.iter().zip(vals) {
            let v = v as f64;
            for (o, &xv) in out.iter_mut().zip(&x[s * k..(s + 1) * k]) {
                *o += v * xv;
            }
        }
    }
    y
}

/// `y = Âᵀ · x`.
fn propagate_t(a: &Csr, x: &[f64], k: usize) -> Vec<f64> {
    let mut y = vec![0.0; a.cols * k];
    for t in 0..a.rows {
        let (cols, vals) = a.row(t);
        let xt = &x[t * k..(t + 1) * k];
        for (&s, &v) in cols.iter().zip(vals) {
            let v = v as f64;
            for (o, &xv) in y[s * k..(s + 1) * k].iter_mut().zip(xt) {
                *o += v * xv;
            }
        }
    }
    y
}

/// `x · w + b` for `x [n, i]`, `w [i, o]`, `b [o]`.
fn affine(x: &[f64], w: &[f64], b: &[f64], i: usize, o: usize) -> Vec<f64> {
    let n = x.len() / i.max(1);
    let mut y = Vec::with_capacity(n * o);
    for r in 0..n {
        y.extend_from_slice(b);
        let row = &mut y[r * o..(r + 1) * o];
        for (p, &xv) in x[r * i..(r + 1) * i].iter().enumerate() {
            if xv != 0.0 {
                for (yv, &wv) in row.iter_mut().zip(&w[p * o..(p + 1) * o]) {
                    *yv += xv * wv;
                }
            }
        }
    }
    y
}

impl PolicyNet {
    /// A freshly initialised network.
    pub fn new(features: usize, hidden: [usize; 2], rng: &mut Rng) -> Self {
        let mut net = PolicyNet {
            features,
            hidden,
            theta: Vec::new(),
        };
        let [h1, h2] = hidden;
        let mut uniform = |n: usize, bound: f64| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    (2.0 * u - 1.0) * bound
                })
                .collect()
        };
        let mut theta = uniform(features * h1, 1.0 / (h1 as f64).sqrt());
        theta.extend(vec![0.0; h1]);
        theta.extend(uniform(h1 * h2, 1.0 / (h2 as f64).sqrt()));
        theta.extend(vec![0.0; h2]);
        theta.extend(uniform(h2, 1.0 / (h2 as f64).sqrt()));
        net.theta = theta;
        net
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.theta.len()
    }

    /// Whether the network has no weights.
    pub fn is_empty(&self) -> bool {
        self.theta.is_empty()
    }

    fn ranges(&self) -> [Range<usize>; 5] {
        let [h1, h2] = self.hidden;
        let a = self.features * h1;
        let b = a + h1;
        let c = b + h1 * h2;
        let d = c + h2;
        [0..a, a..b, b..c, c..d, d..d + h2]
    }

    /// Checks that the weights fit the declared shape.
    pub fn validate(&self) -> Result<(), String> {
        let want = self.ranges()[4].end;
        if self.theta.len() != want {
            return Err(format!(
                "a policy network of {} features and hidden {:?} has {want} weights, not {}",
                self.features,
                self.hidden,
                self.theta.len()
            ));
        }
        if self.theta.iter().any(|v| !v.is_finite()) {
            return Err("the policy network has non-finite weights".into());
        }
        Ok(())
    }

    /// The forward pass on `state [nodes, features]`.
    pub fn forward(&self, adj: &Csr, state: &Array2<f32>) -> Forward {
        assert_eq!(state.ncols(), self.features, "state width");
        assert_eq!(state.nrows(), adj.rows, "one state row per node");
        let [h1, h2] = self.hidden;
        let [rw1, rb1, rw2, rb2, rhead] = self.ranges();
        let s: Vec<f64> = state.iter().map(|&v| v as f64).collect();
        let u1 = affine(&s, &self.theta[rw1], &self.theta[rb1], self.features, h1);
        let z1 = propagate(adj, &u1, h1);
        let h1v: Vec<f64> = z1.iter().map(|&z| z.max(0.0)).collect();
        let u2 = affine(&h1v, &self.theta[rw2], &self.theta[rb2], h1, h2);
        let z2 = propagate(adj, &u2, h2);
        let h2v: Vec<f64> = z2.iter().map(|&z| z.max(0.0)).collect();
        let head = &self.theta[rhead];
        let out = h2v
            .chunks_exact(h2)
            .map(|r| r.iter().zip(head).map(|(a, b)| a * b).sum())
            .collect();
        Forward {
            z1,
            h1: h1v,
            z2,
            h2: h2v,
            out,
        }
    }

    /// Gradient of a loss with respect to the weights, given the loss's gradient `d_out` with
    /// respect to the outputs of the forward pass `f` on `state`; added into `grad`.
    pub fn backward(
        &self,
        adj: &Csr,
        state: &Array2<f32>,
        f: &Forward,
        d_out: &[f64],
        grad: &mut [f64],
    ) {
        let [h1, h2] = self.hidden;
        let [rw1, rb1, rw2, rb2, rhead] = self.ranges();
        let head = &self.theta[rhead.clone()];
        let w2 = &self.theta[rw2.clone()];

        // head and the second layer.
        let mut d_z2 = vec![0.0; f.h2.len()];
        for (i, &g) in d_out.iter().enumerate() {
            if g == 0.0 {
                continue;
            }
            for k in 0..h2 {
                grad[rhead.start + k] += g * f.h2[i * h2 + k];
                if f.z2[i * h2 + k] > 0.0 {
                    d_z2[i * h2 + k] = g * head[k];
                }
            }
        }
        let d_u2 = propagate_t(adj, &d_z2, h2);
        let mut d_z1 = vec![0.0; f.h1.len()];
        for (i, du) in d_u2.chunks_exact(h2).enumerate() {
            if du.iter().all(|&v| v == 0.0) {
                continue;
            }
            for (k, &dv) in du.iter().enumerate() {
                grad[rb2.start + k] += dv;
            }
            for p in 0..h1 {
                let hv = f.h1[i * h1 + p];
                let mut back = 0.0;
                for (k, &dv) in du.iter().enumerate() {
                    grad[rw2.start + p * h2 + k] += hv * dv;
                    back += dv * w2[p * h2 + k];
                }
                if f.z1[i * h1 + p] > 0.0 {
                    d_z1[i * h1 + p] = back;
                }
            }
        }

        // The first layer.
        let d_u1 = propagate_t(adj, &d_z1, h1);
        let s = state.as_standard_layout();
        let s = s.as_slice().expect("standard layout");
        for (i, du) in d_u1.chunks_exact(h1).enumerate() {
            for (k, &dv) in du.iter().enumerate() {
                grad[rb1.start + k] += dv;
            }
            for (p, &sv) in s[i * self.features..(i + 1) * self.features]
                .iter()
                .enumerate()
            {
                if sv == 0.0 {
                    continue;
                }
                for (k, &dv) in du.iter().enumerate() {
                    grad[rw1.start + p * h1 + k] += sv as f64 * dv;
                }
            }
        }
    }
}

/// The softmax of `logits` over the candidate nodes `pool`, in pool order.
pub fn pool_softmax(logits: &[f64], pool: &[usize]) -> Vec<f64> {
    let max = pool
        .iter()
        .map(|&i| logits[i])
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = pool.iter().map(|&i| (logits[i] - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// One decision to learn from, for the actor.
#[derive(Clone, Copy, Debug)]
pub struct ActorSample<'a> {
    /// The state `[nodes, features]`.
    pub state: &'a Array2<f32>,
    /// The candidate nodes.
    pub pool: &'a [usize],
    /// The picked node (a member of `pool`).
    pub action: usize,
    /// The advantage, held fixed.
    pub advantage: f64,
}

/// The actor loss `−(1/episodes) Σ A · log π(a | s)` and its gradient.
pub fn actor_loss_and_grad(
    net: &PolicyNet,
    adj: &Csr,
    samples: &[ActorSample],
    episodes: usize,
) -> (f64, Vec<f64>) {
    let mut grad = vec![0.0; net.len()];
    let scale = 1.0 / episodes.max(1) as f64;
    let mut loss = 0.0;
    for s in samples {
        let f = net.forward(adj, s.state);
        let p = pool_softmax(&f.out, s.pool);
        let k = s
            .pool
            .iter()
            .position(|&i| i == s.action)
            .expect("the action is in the pool");
        loss -= scale * s.advantage * p[k].max(1e-300).ln();
        let mut d_out = vec![0.0; f.out.len()];
        for (j, &i) in s.pool.iter().enumerate() {
            let onehot = if j == k { 1.0 } else { 0.0 };
            d_out[i] = -scale * s.advantage * (onehot - p[j]);
        }
        net.backward(adj, s.state, &f, &d_out, &mut grad);
    }
    (loss, grad)
}

/// The critic loss `mean (V(s) − y)²` over `(state, target)` pairs and its gradient.
pub fn critic_loss_and_grad(
    net: &PolicyNet,
    adj: &Csr,
    samples: &[(&Array2<f32>, f64)],
) -> (f64, Vec<f64>) {
    let mut grad = vec![0.0; net.len()];
    let m = samples.len().max(1) as f64;
    let mut loss = 0.0;
    for &(state, target) in samples {
        let f = net.forward(adj, state);
        let v = f.value();
        loss += (v - target).powi(2) / m;
        let dv = 2.0 * (v - target) / m;
        let d_out = vec![dv / f.out.len() as f64; f.out.len()];
        net.backward(adj, state, &f, &d_out, &mut grad);
    }
    (loss, grad)
}

fn default_eps() -> f64 {
    1e-8
}

/// Adam in `f64` over one flat weight vector, with the state a checkpoint keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adam64 {
    /// Learning rate.
    pub lr: f64,
    /// Added to the root of the second moment (1e-8 in checkpoints written without it).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Steps taken.
    pub t: i32,
    /// First moments.
    pub m: Vec<f64>,
    /// Second moments.
    pub v: Vec<f64>,
}

impl Adam64 {
    /// Adam for `n` weights (betas 0.9 and 0.999, epsilon 1e-8).
    pub fn new(lr: f64, n: usize) -> Self {
        Adam64::with_eps(lr, default_eps(), n)
    }

    /// Adam for `n` weights with betas 0.9 and 0.999 and the given epsilon.
    pub fn with_eps(lr: f64, eps: f64, n: usize) -> Self {
        Adam64 {
            lr,
            eps,
            t: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One step down `grad`.
    pub fn step(&mut self, theta: &mut [f64], grad: &[f64]) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, self.eps);
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        for (((p, &g), m), v) in theta
            .iter_mut()
            .zip(grad)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= self.lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
    }
}
