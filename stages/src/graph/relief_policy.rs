//! The RELIEF policy: a hybrid actor (a node to prompt, and a prompt increment for it) and a
//! critic sharing one trunk, with hand-written gradients of the hybrid PPO (H-PPO) loss.
//!
//! The state is the frozen GNN's node embeddings of the current prompted graph, `h [n, D]`.
//! A state may be padded to a maximum node count: only its first `n` rows (the valid nodes)
//! enter the networks, so padded rows are masked out of the node choice and the context, and
//! rollouts store just the valid rows. The networks, with `tanh` everywhere so that finite
//! differences check the gradients to many digits:
//!
//! - trunk, per node: `z_v = tanh(h_v W1 + b1)`, and the context `c = mean_v z_v` over the
//!   valid nodes;
//! - discrete actor: one logit per node, `l_v = u · tanh(z_v Wd + c Wdc + bd)`; the action is a
//!   node drawn from the softmax over the valid nodes (padded rows masked out);
//! - continuous actor, for the chosen node `a`: `q = tanh(z_a Wq + c Wqc + bq)`, mean
//!   `μ = max_z · tanh(q Wm + bm)`; the increment is drawn from `N(μ, σ² I)` where
//!   `log σ` is not learned but annealed by the trainer (from 0 towards −5);
//! - critic: `V = v · tanh(c Wv + bv) + v0`.
//!
//! H-PPO loss over a minibatch of `B` transitions (advantages `A` normalised within the
//! minibatch, returns `R` held fixed), with `r_d`, `r_c` the probability ratios of the discrete
//! and the continuous action against the policy that collected them:
//!
//! `L = mean[−min(r_d A, clip(r_d) A) − min(r_c A, clip(r_c) A) + c_v · ½ (V − R)²]
//!      − c_e · mean H(π_d)`
//!
//! (`clip` to `[1 − ε, 1 + ε]`). The Gaussian's entropy depends on `σ` only, so it has no
//! gradient here and is left out. The policy runs in `f64`.

use serde::{Deserialize, Serialize};

use super::Rng;

/// `ln √(2π)`.
const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

/// Sizes of the hybrid policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyShape {
    /// Node embedding width `D` (the GNN's output).
    pub embed: usize,
    /// Hidden units of every layer.
    pub hidden: usize,
    /// Prompt width `P` (the continuous action's dimension).
    pub prompt: usize,
}

/// Offsets of the weight blocks in the flat parameter vector.
#[derive(Clone, Copy, Debug)]
struct Layout {
    w1: usize,
    b1: usize,
    wd: usize,
    wdc: usize,
    bd: usize,
    u: usize,
    wq: usize,
    wqc: usize,
    bq: usize,
    wm: usize,
    bm: usize,
    wv: usize,
    bv: usize,
    v: usize,
    v0: usize,
    len: usize,
}

impl PolicyShape {
    fn layout(&self) -> Layout {
        let (d, h, p) = (self.embed, self.hidden, self.prompt);
        let mut at = 0;
        let mut take = |n: usize| {
            let o = at;
            at += n;
            o
        };
        let w1 = take(d * h);
        let b1 = take(h);
        let wd = take(h * h);
        let wdc = take(h * h);
        let bd = take(h);
        let u = take(h);
        let wq = take(h * h);
        let wqc = take(h * h);
        let bq = take(h);
        let wm = take(h * p);
        let bm = take(p);
        let wv = take(h * h);
        let bv = take(h);
        let v = take(h);
        let v0 = take(1);
        Layout {
            w1,
            b1,
            wd,
            wdc,
            bd,
            u,
            wq,
            wqc,
            bq,
            wm,
            bm,
            wv,
            bv,
            v,
            v0,
            len: at,
        }
    }

    /// Number of weights.
    pub fn num_weights(&self) -> usize {
        self.layout().len
    }
}

/// The policy's weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HybridPolicy {
    /// Sizes.
    pub shape: PolicyShape,
    /// Largest mean increment per prompt coordinate.
    pub max_z: f64,
    /// All weights in one vector (`W1, b1, Wd, Wdc, bd, u, Wq, Wqc, bq, Wm, bm, Wv, bv, v, v0`,
    /// matrices row-major `[in, out]`).
    pub theta: Vec<f64>,
}

/// The weight blocks of a policy, by name (matrices row-major `[in, out]`).
#[derive(Clone, Copy, Debug)]
pub struct Blocks<'a> {
    /// Trunk `W1 [D, H]`.
    pub w1: &'a [f64],
    /// Trunk bias `b1 [H]`.
    pub b1: &'a [f64],
    /// Discrete actor, node part `Wd [H, H]`.
    pub wd: &'a [f64],
    /// Discrete actor, context part `Wdc [H, H]`.
    pub wdc: &'a [f64],
    /// Discrete actor bias `bd [H]`.
    pub bd: &'a [f64],
    /// Discrete actor output `u [H]`.
    pub u: &'a [f64],
    /// Continuous actor, node part `Wq [H, H]`.
    pub wq: &'a [f64],
    /// Continuous actor, context part `Wqc [H, H]`.
    pub wqc: &'a [f64],
    /// Continuous actor bias `bq [H]`.
    pub bq: &'a [f64],
    /// Continuous actor output `Wm [H, P]`.
    pub wm: &'a [f64],
    /// Continuous actor output bias `bm [P]`.
    pub bm: &'a [f64],
    /// Critic `Wv [H, H]`.
    pub wv: &'a [f64],
    /// Critic bias `bv [H]`.
    pub bv: &'a [f64],
    /// Critic output `v [H]`.
    pub v: &'a [f64],
    /// Critic output bias `v0`.
    pub v0: f64,
}

/// What one forward pass over a state keeps for the backward pass.
#[derive(Clone, Debug)]
pub struct Forward {
    n: usize,
    z: Vec<f64>,
    c: Vec<f64>,
    r: Vec<f64>,
    /// Node logits (valid nodes only).
    pub logits: Vec<f64>,
    /// Log-probabilities of the valid nodes.
    pub log_probs: Vec<f64>,
    s: Vec<f64>,
    /// The critic's value.
    pub value: f64,
}

/// The continuous head's pass for one chosen node.
#[derive(Clone, Debug)]
pub struct MeanForward {
    node: usize,
    q: Vec<f64>,
    t: Vec<f64>,
    /// The mean increment `μ [P]`.
    pub mean: Vec<f64>,
}

/// Gradients flowing into the outputs of one state's forward pass.
#[derive(Clone, Debug, Default)]
pub struct OutputGrads {
    /// `∂L/∂l_v` for the valid nodes (empty: none).
    pub logits: Vec<f64>,
    /// `∂L/∂μ` of the continuous head (empty: none).
    pub mean: Vec<f64>,
    /// `∂L/∂V`.
    pub value: f64,
}

fn gauss(rng: &mut Rng) -> f64 {
    // Box–Muller; `u1` in (0, 1].
    let u1 = 1.0 - (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A standard normal draw (Box–Muller).
pub fn standard_normal(rng: &mut Rng) -> f64 {
    gauss(rng)
}

/// `y[o] += Σ_i x[i] w[i, o]` for `w [i, o]` row-major.
fn gemv_acc(x: &[f64], w: &[f64], y: &mut [f64]) {
    let o = y.len();
    for (i, &xv) in x.iter().enumerate() {
        if xv != 0.0 {
            for (yv, &wv) in y.iter_mut().zip(&w[i * o..(i + 1) * o]) {
                *yv += xv * wv;
            }
        }
    }
}

/// `dx[i] += Σ_o w[i, o] dy[o]` and `dw[i, o] += x[i] dy[o]`.
fn gemv_back(x: &[f64], w: &[f64], dy: &[f64], dx: Option<&mut [f64]>, dw: &mut [f64]) {
    let o = dy.len();
    for (i, &xv) in x.iter().enumerate() {
        let dwr = &mut dw[i * o..(i + 1) * o];
        for (g, &d) in dwr.iter_mut().zip(dy) {
            *g += xv * d;
        }
    }
    if let Some(dx) = dx {
        for (i, dxv) in dx.iter_mut().enumerate() {
            let wr = &w[i * o..(i + 1) * o];
            *dxv += wr.iter().zip(dy).map(|(a, b)| a * b).sum::<f64>();
        }
    }
}

fn log_softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + l.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
    l.iter().map(|&v| v - lse).collect()
}

impl HybridPolicy {
    /// A freshly initialised policy: weights uniform in `±1/√fan_in`, biases zero, the mean
    /// and value outputs scaled down (0.01 and 1) as PPO implementations do.
    pub fn new(shape: PolicyShape, max_z: f64, rng: &mut Rng) -> Self {
        let l = shape.layout();
        let mut theta = vec![0.0; l.len];
        let mut fill = |at: usize, n: usize, fan_in: usize, gain: f64| {
            let b = gain / (fan_in.max(1) as f64).sqrt();
            for t in &mut theta[at..at + n] {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                *t = (2.0 * u - 1.0) * b;
            }
        };
        let (d, h, p) = (shape.embed, shape.hidden, shape.prompt);
        fill(l.w1, d * h, d, 1.0);
        fill(l.wd, h * h, 2 * h, 1.0);
        fill(l.wdc, h * h, 2 * h, 1.0);
        fill(l.u, h, h, 1.0);
        fill(l.wq, h * h, 2 * h, 1.0);
        fill(l.wqc, h * h, 2 * h, 1.0);
        fill(l.wm, h * p, h, 0.01);
        fill(l.wv, h * h, h, 1.0);
        fill(l.v, h, h, 1.0);
        HybridPolicy {
            shape,
            max_z,
            theta,
        }
    }

    /// The weights by block.
    pub fn blocks(&self) -> Blocks<'_> {
        let l = self.shape.layout();
        let (d, h, p) = (self.shape.embed, self.shape.hidden, self.shape.prompt);
        let t = &self.theta;
        Blocks {
            w1: &t[l.w1..l.w1 + d * h],
            b1: &t[l.b1..l.b1 + h],
            wd: &t[l.wd..l.wd + h * h],
            wdc: &t[l.wdc..l.wdc + h * h],
            bd: &t[l.bd..l.bd + h],
            u: &t[l.u..l.u + h],
            wq: &t[l.wq..l.wq + h * h],
            wqc: &t[l.wqc..l.wqc + h * h],
            bq: &t[l.bq..l.bq + h],
            wm: &t[l.wm..l.wm + h * p],
            bm: &t[l.bm..l.bm + p],
            wv: &t[l.wv..l.wv + h * h],
            bv: &t[l.bv..l.bv + h],
            v: &t[l.v..l.v + h],
            v0: t[l.v0],
        }
    }

    /// Forward pass of the trunk, the discrete actor and the critic over the first `n` rows of
    /// `state` (row-major `[rows, D]`, `f32` as the GNN gives it).
    pub fn forward(&self, state: &[f32], n: usize) -> Forward {
        let l = self.shape.layout();
        let (d, h) = (self.shape.embed, self.shape.hidden);
        let th = &self.theta;
        assert!(
            n >= 1 && state.len() >= n * d,
            "a state of at least one node"
        );

        let mut z = vec![0.0; n * h];
        let mut hv = vec![0.0; d];
        for v in 0..n {
            for (a, &b) in hv.iter_mut().zip(&state[v * d..(v + 1) * d]) {
                *a = b as f64;
            }
            let zr = &mut z[v * h..(v + 1) * h];
            zr.copy_from_slice(&th[l.b1..l.b1 + h]);
            gemv_acc(&hv, &th[l.w1..l.w1 + d * h], zr);
            zr.iter_mut().for_each(|x| *x = x.tanh());
        }
        let mut c = vec![0.0; h];
        for v in 0..n {
            for (a, &b) in c.iter_mut().zip(&z[v * h..(v + 1) * h]) {
                *a += b;
            }
        }
        c.iter_mut().for_each(|x| *x /= n as f64);

        let mut cd = th[l.bd..l.bd + h].to_vec();
        gemv_acc(&c, &th[l.wdc..l.wdc + h * h], &mut cd);
        let mut r = vec![0.0; n * h];
        let mut logits = vec![0.0; n];
        for v in 0..n {
            let rr = &mut r[v * h..(v + 1) * h];
            rr.copy_from_slice(&cd);
            gemv_acc(&z[v * h..(v + 1) * h], &th[l.wd..l.wd + h * h], rr);
            rr.iter_mut().for_each(|x| *x = x.tanh());
            logits[v] = rr.iter().zip(&th[l.u..l.u + h]).map(|(a, b)| a * b).sum();
        }
        let log_probs = log_softmax(&logits);

        let mut s = th[l.bv..l.bv + h].to_vec();
        gemv_acc(&c, &th[l.wv..l.wv + h * h], &mut s);
        s.iter_mut().for_each(|x| *x = x.tanh());
        let value = s
            .iter()
            .zip(&th[l.v..l.v + h])
            .map(|(a, b)| a * b)
            .sum::<f64>()
            + th[l.v0];
        Forward {
            n,
            z,
            c,
            r,
            logits,
            log_probs,
            s,
            value,
        }
    }

    /// The continuous actor's mean increment for node `node`.
    pub fn mean(&self, f: &Forward, node: usize) -> MeanForward {
        let l = self.shape.layout();
        let (h, p) = (self.shape.hidden, self.shape.prompt);
        let th = &self.theta;
        let mut q = th[l.bq..l.bq + h].to_vec();
        gemv_acc(
            &f.z[node * h..(node + 1) * h],
            &th[l.wq..l.wq + h * h],
            &mut q,
        );
        gemv_acc(&f.c, &th[l.wqc..l.wqc + h * h], &mut q);
        q.iter_mut().for_each(|x| *x = x.tanh());
        let mut t = th[l.bm..l.bm + p].to_vec();
        gemv_acc(&q, &th[l.wm..l.wm + h * p], &mut t);
        t.iter_mut().for_each(|x| *x = x.tanh());
        let mean = t.iter().map(|&x| self.max_z * x).collect();
        MeanForward { node, q, t, mean }
    }

    /// Adds to `grad` the gradient of the weights given the gradients into the outputs of one
    /// forward pass (and of its continuous head, when `m` is given).
    pub fn backward(
        &self,
        state: &[f32],
        f: &Forward,
        m: Option<&MeanForward>,
        g: &OutputGrads,
        grad: &mut [f64],
    ) {
        let l = self.shape.layout();
        let (d, h, p) = (self.shape.embed, self.shape.hidden, self.shape.prompt);
        let th = &self.theta;
        let n = f.n;
        let mut dz = vec![0.0; n * h];
        let mut dc = vec![0.0; h];

        // Critic.
        if g.value != 0.0 {
            grad[l.v0] += g.value;
            let mut dpre = vec![0.0; h];
            for k in 0..h {
                grad[l.v + k] += g.value * f.s[k];
                dpre[k] = g.value * th[l.v + k] * (1.0 - f.s[k] * f.s[k]);
            }
            for (gb, &dp) in grad[l.bv..l.bv + h].iter_mut().zip(&dpre) {
                *gb += dp;
            }
            let (wv, gwv) = (&th[l.wv..l.wv + h * h], l.wv);
            gemv_back(&f.c, wv, &dpre, Some(&mut dc), &mut grad[gwv..gwv + h * h]);
        }

        // Continuous actor.
        if let (Some(m), false) = (m, g.mean.is_empty()) {
            let dt: Vec<f64> = g
                .mean
                .iter()
                .zip(&m.t)
                .map(|(&gm, &t)| gm * self.max_z * (1.0 - t * t))
                .collect();
            for (gb, &v) in grad[l.bm..l.bm + p].iter_mut().zip(&dt) {
                *gb += v;
            }
            let mut dq = vec![0.0; h];
            gemv_back(
                &m.q,
                &th[l.wm..l.wm + h * p],
                &dt,
                Some(&mut dq),
                &mut grad[l.wm..l.wm + h * p],
            );
            for (d, &q) in dq.iter_mut().zip(&m.q) {
                *d *= 1.0 - q * q;
            }
            for (gb, &v) in grad[l.bq..l.bq + h].iter_mut().zip(&dq) {
                *gb += v;
            }
            let a = m.node;
            gemv_back(
                &f.z[a * h..(a + 1) * h],
                &th[l.wq..l.wq + h * h],
                &dq,
                Some(&mut dz[a * h..(a + 1) * h]),
                &mut grad[l.wq..l.wq + h * h],
            );
            gemv_back(
                &f.c,
                &th[l.wqc..l.wqc + h * h],
                &dq,
                Some(&mut dc),
                &mut grad[l.wqc..l.wqc + h * h],
            );
        }

        // Discrete actor.
        if !g.logits.is_empty() {
            let mut dcd = vec![0.0; h];
            for v in 0..n {
                let dl = g.logits[v];
                if dl == 0.0 {
                    continue;
                }
                let rr = &f.r[v * h..(v + 1) * h];
                let mut dpre = vec![0.0; h];
                for k in 0..h {
                    grad[l.u + k] += dl * rr[k];
                    dpre[k] = dl * th[l.u + k] * (1.0 - rr[k] * rr[k]);
                    dcd[k] += dpre[k];
                }
                gemv_back(
                    &f.z[v * h..(v + 1) * h],
                    &th[l.wd..l.wd + h * h],
                    &dpre,
                    Some(&mut dz[v * h..(v + 1) * h]),
                    &mut grad[l.wd..l.wd + h * h],
                );
            }
            for (gb, &v) in grad[l.bd..l.bd + h].iter_mut().zip(&dcd) {
                *gb += v;
            }
            gemv_back(
                &f.c,
                &th[l.wdc..l.wdc + h * h],
                &dcd,
                Some(&mut dc),
                &mut grad[l.wdc..l.wdc + h * h],
            );
        }

        // Trunk: c is the mean of the z rows.
        let mut hv = vec![0.0; d];
        for v in 0..n {
            let zr = &f.z[v * h..(v + 1) * h];
            let mut dpre = vec![0.0; h];
            let mut any = false;
            for k in 0..h {
                let dzk = dz[v * h + k] + dc[k] / n as f64;
                dpre[k] = dzk * (1.0 - zr[k] * zr[k]);
                any |= dpre[k] != 0.0;
            }
            if !any {
                continue;
            }
            for (a, &b) in hv.iter_mut().zip(&state[v * d..(v + 1) * d]) {
                *a = b as f64;
            }
            for (gb, &v) in grad[l.b1..l.b1 + h].iter_mut().zip(&dpre) {
                *gb += v;
            }
            gemv_back(
                &hv,
                &th[l.w1..l.w1 + d * h],
                &dpre,
                None,
                &mut grad[l.w1..l.w1 + d * h],
            );
        }
    }

    /// Samples an action: a node and its (unclipped) increment, with the log-probabilities of
    /// both parts, given `log_std`. With `greedy`, the most probable node and the mean.
    pub fn act(
        &self,
        state: &[f32],
        n: usize,
        log_std: f64,
        greedy: bool,
        rng: &mut Rng,
    ) -> Action {
        self.act_with(state, n, log_std, greedy, greedy, rng)
    }

    /// [`HybridPolicy::act`] with the node (`greedy_node`) and the increment
    /// (`greedy_increment`: the mean) chosen greedily or sampled separately.
    pub fn act_with(
        &self,
        state: &[f32],
        n: usize,
        log_std: f64,
        greedy_node: bool,
        greedy_increment: bool,
        rng: &mut Rng,
    ) -> Action {
        let f = self.forward(state, n);
        let node = if greedy_node {
            argmax(&f.logits)
        } else {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let mut acc = 0.0;
            let mut pick = n - 1;
            for (v, lp) in f.log_probs.iter().enumerate() {
                acc += lp.exp();
                if u < acc {
                    pick = v;
                    break;
                }
            }
            pick
        };
        let m = self.mean(&f, node);
        let sigma = log_std.exp();
        let increment: Vec<f64> = if greedy_increment {
            m.mean.clone()
        } else {
            m.mean.iter().map(|&mu| mu + sigma * gauss(rng)).collect()
        };
        Action {
            node,
            log_prob_node: f.log_probs[node],
            log_prob_increment: gaussian_log_prob(&increment, &m.mean, log_std),
            increment,
            value: f.value,
        }
    }
}

/// The index of the largest value (the first of ties).
pub fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

/// `log N(x; μ, σ² I)` with `log σ = log_std`.
pub fn gaussian_log_prob(x: &[f64], mean: &[f64], log_std: f64) -> f64 {
    let var = (2.0 * log_std).exp();
    x.iter()
        .zip(mean)
        .map(|(&a, &m)| -(a - m) * (a - m) / (2.0 * var) - log_std - LN_SQRT_2PI)
        .sum()
}

/// A sampled hybrid action.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    /// The node to prompt.
    pub node: usize,
    /// The increment drawn for it (before clipping to `±max_z`).
    pub increment: Vec<f64>,
    /// `log π_d(node)`.
    pub log_prob_node: f64,
    /// `log π_c(increment | node)`.
    pub log_prob_increment: f64,
    /// The critic's value of the state.
    pub value: f64,
}

/// One transition as PPO needs it.
#[derive(Clone, Debug)]
pub struct Transition {
    /// The state `[n, D]` row-major.
    pub state: Vec<f32>,
    /// Valid nodes.
    pub n: usize,
    /// The node chosen.
    pub node: usize,
    /// The increment drawn (unclipped).
    pub increment: Vec<f64>,
    /// `log π_d` under the policy that collected it.
    pub log_prob_node: f64,
    /// `log π_c` under that policy.
    pub log_prob_increment: f64,
    /// `log σ` then.
    pub log_std: f64,
    /// GAE advantage.
    pub advantage: f64,
    /// Return target of the critic (`advantage + value`).
    pub ret: f64,
}

/// H-PPO coefficients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PpoCoefficients {
    /// Ratio clip `ε`.
    pub clip: f64,
    /// Value-loss coefficient.
    pub value: f64,
    /// Entropy-bonus coefficient (of the discrete actor).
    pub entropy: f64,
}

impl Default for PpoCoefficients {
    fn default() -> Self {
        PpoCoefficients {
            clip: 0.2,
            value: 0.5,
            entropy: 0.01,
        }
    }
}

/// What one minibatch's loss evaluation reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PpoStats {
    /// The total loss.
    pub loss: f64,
    /// Mean clipped surrogate of the discrete actor (as a loss, negated).
    pub policy_node: f64,
    /// Same for the continuous actor.
    pub policy_increment: f64,
    /// `½ mean (V − R)²`.
    pub value: f64,
    /// Mean entropy of the node distribution.
    pub entropy: f64,
    /// Approximate KL of the joint action, `mean((r − 1) − log r)`.
    pub approx_kl: f64,
}

/// `−min(r A, clip(r) A)` and its derivative with respect to `log π_new`.
fn clipped_surrogate(log_ratio: f64, adv: f64, clip: f64) -> (f64, f64) {
    let r = log_ratio.exp();
    let unclipped = r * adv;
    let clipped = r.clamp(1.0 - clip, 1.0 + clip) * adv;
    if unclipped <= clipped {
        (-unclipped, -unclipped)
    } else {
        (-clipped, 0.0)
    }
}

impl HybridPolicy {
    /// The H-PPO loss of a minibatch and, when `grad` is given, its gradient added into it.
    /// Advantages are normalised within the minibatch (when it has more than one transition).
    pub fn ppo_loss(
        &self,
        batch: &[&Transition],
        coef: &PpoCoefficients,
        mut grad: Option<&mut [f64]>,
    ) -> PpoStats {
        let b = batch.len().max(1) as f64;
        let advs: Vec<f64> = batch.iter().map(|t| t.advantage).collect();
        let advs = if batch.len() > 1 {
            let mean = advs.iter().sum::<f64>() / b;
            let var = advs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (b - 1.0);
            let sd = var.sqrt() + 1e-8;
            advs.iter().map(|a| (a - mean) / sd).collect()
        } else {
            advs
        };
        let mut st = PpoStats::default();
        for (t, &adv) in batch.iter().zip(&advs) {
            let f = self.forward(&t.state, t.n);
            let m = self.mean(&f, t.node);
            let lp_d = f.log_probs[t.node];
            let lp_c = gaussian_log_prob(&t.increment, &m.mean, t.log_std);
            let (sd_loss, sd_grad) = clipped_surrogate(lp_d - t.log_prob_node, adv, coef.clip);
            let (sc_loss, sc_grad) = clipped_surrogate(lp_c - t.log_prob_increment, adv, coef.clip);
            let probs: Vec<f64> = f.log_probs.iter().map(|l| l.exp()).collect();
            let entropy: f64 = -probs
                .iter()
                .zip(&f.log_probs)
                .map(|(p, l)| p * l)
                .sum::<f64>();
            let dv = f.value - t.ret;
            st.policy_node += sd_loss / b;
            st.policy_increment += sc_loss / b;
            st.value += 0.5 * dv * dv / b;
            st.entropy += entropy / b;
            let log_ratio = lp_d + lp_c - t.log_prob_node - t.log_prob_increment;
            st.approx_kl += (log_ratio.exp() - 1.0 - log_ratio) / b;

            if let Some(grad) = grad.as_deref_mut() {
                // ∂/∂l_v: the surrogate through log π_d (one-hot minus softmax), the entropy
                // bonus through −π_v (log π_v + H).
                let logits: Vec<f64> = (0..f.n)
                    .map(|v| {
                        let onehot = if v == t.node { 1.0 } else { 0.0 };
                        let d_sur = sd_grad * (onehot - probs[v]);
                        let d_ent = -probs[v] * (f.log_probs[v] + entropy);
                        (d_sur - coef.entropy * d_ent) / b
                    })
                    .collect();
                let var = (2.0 * t.log_std).exp();
                let mean: Vec<f64> = t
                    .increment
                    .iter()
                    .zip(&m.mean)
                    .map(|(&x, &mu)| sc_grad * (x - mu) / var / b)
                    .collect();
                let g = OutputGrads {
                    logits,
                    mean,
                    value: coef.value * dv / b,
                };
                self.backward(&t.state, &f, Some(&m), &g, grad);
            }
        }
        st.loss = st.policy_node + st.policy_increment + coef.value * st.value
            - coef.entropy * st.entropy;
        st
    }
}

/// Adam for the policy's `f64` weights: the GCBR policies' optimiser, with its epsilon set.
pub type Adam = super::policy::Adam64;

/// Scales `grad` so that its Euclidean norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grad: &mut [f64], max_norm: f64) -> f64 {
    let norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
    if norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        grad.iter_mut().for_each(|g| *g *= s);
    }
    norm
}

/// Generalised advantage estimates of one episode: `rewards[t]`, `values[t]` (the critic's
/// value of the state before step `t`); the episode ends after the last step (no bootstrap).
/// Returns `(advantages, returns)`.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next - values[t];
        last = delta + gamma * lambda * last;
        adv[t] = last;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Running mean and variance (Welford), for normalising rewards.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    /// Values seen.
    pub count: u64,
    /// Their mean.
    pub mean: f64,
    /// Sum of squared deviations.
    pub m2: f64,
}

impl RunningStats {
    /// Adds a value.
    pub fn push(&mut self, x: f64) {
        self.count += 1;
        let d = x - self.mean;
        self.mean += d / self.count as f64;
        self.m2 += d * (x - self.mean);
    }

    /// Standard deviation (1 before two values were seen).
    pub fn std(&self) -> f64 {
        if self.count < 2 {
            1.0
        } else {
            (self.m2 / (self.count - 1) as f64).sqrt()
        }
    }

    /// `(x − mean) / std`.
    pub fn normalise(&self, x: f64) -> f64 {
        (x - self.mean) / (self.std() + 1e-8)
    }
}
