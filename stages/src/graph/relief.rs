//! RELIEF: reinforcement-learned feature prompts on a frozen, pre-trained GNN.
//!
//! A few-shot task is a set of small graphs with one label each ([`ReliefTask`]): for node
//! classification, each target node's induced k-hop subgraph (the target is node 0 and its
//! embedding row is the readout); for graph classification, the molecules themselves (the
//! package's pooled graph embedding `g` is the readout). An agent ([`super::relief_policy`])
//! adds prompt vectors to the input features of nodes it picks, one node and one increment per
//! step, as many steps as the graph has nodes; the reward of a step is the decrease of the
//! downstream loss (softmax cross-entropy of a projection head on the readout; with two
//! classes that is the binary cross-entropy of the logit difference), clipped and normalised by
//! a running mean and standard deviation. Training alternates H-PPO updates of the policy with
//! epochs of the head on the prompted training graphs' readouts.
//!
//! Decisions:
//! - Prompt space. The node encoders start with a fixed truncated-SVD projection `P [F, K]`
//!   (`svd.proj`, orthogonal columns) of the raw features to `K = 100`, which is where the
//!   published method puts its prompts. A prompt `z ∈ R^K` is applied to the raw features as
//!   `p = z Bᵀ` with `B = P (PᵀP)⁻¹`, so the projected features move by exactly `z`; the frozen
//!   GNN still runs on `x + p` through [`GnnEmbedder`]. Packages without such a projection
//!   (`gin-mutag`) are prompted in their input space. Coverage and magnitude are measured on
//!   `z`.
//! - The applied increment is the sampled one clipped to `±max_z` per coordinate; the
//!   log-probability is that of the unclipped draw (as PPO implementations do).
//! - The head is multinomial logistic regression on the readout, centred by the mean of the
//!   unprompted training readouts and divided by their root-mean-square, trained full-batch
//!   with Adam and an L2 penalty ([`HeadSettings`]). It starts as the linear probe (the same
//!   head fitted on the unprompted readouts), then trains `head_epochs` more after every policy
//!   update on the latest prompted readouts of the training graphs, and that head is the one
//!   kept ([`ReliefSettings::refit_head`] refits it from scratch on the final prompts instead,
//!   which scored lower in our runs).
//! - After training, the policy acts greedily: the most probable node and the mean increment,
//!   for as many steps as the graph has nodes. [`ReliefSettings::sample_nodes`] draws the
//!   nodes from the policy instead (seeded), as during training; that prompts about as many
//!   nodes as training did (over half, the node distribution stays broad), where the greedy
//!   policy returns to a few nodes.
//! - Everything random comes from one seeded [`Rng`]; ONNX Runtime's CPU kernels are
//!   deterministic for these models, so a seed fixes the result.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use super::embed::{GnnEmbedder, GnnGraph, Prompt};
use super::relief_policy::{
    clip_grad_norm, gae, Adam, HybridPolicy, PolicyShape, PpoCoefficients, RunningStats, Transition,
};
use super::{Graph, Rng};

// ---------------------------------------------------------------------------------------------
// Tasks.

/// Which embedding of a small graph the head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Readout {
    /// Row 0 of the node embeddings (the target of a k-hop subgraph).
    Target,
    /// The package's graph embedding `g`.
    Graph,
}

/// A few-shot task: small graphs with one label each, split into training and test graphs.
#[derive(Clone, Debug)]
pub struct ReliefTask {
    /// Graphs.
    pub graphs: Vec<GnnGraph>,
    /// One label per graph, `0..classes`.
    pub labels: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
    /// What the head reads.
    pub readout: Readout,
    /// Training graphs (the labelled shots).
    pub train: Vec<usize>,
    /// Test graphs.
    pub test: Vec<usize>,
    /// Prompt basis `Bᵀ [K, F]`: a prompt `z [K]` adds `z · basis` to a node's raw features;
    /// `None`: prompts live in the input space (`K = F`).
    pub basis: Option<Arc<Array2<f32>>>,
}

impl ReliefTask {
    /// Width of the prompt vectors.
    pub fn prompt_dim(&self) -> usize {
        match &self.basis {
            Some(b) => b.nrows(),
            None => self.graphs.first().map_or(0, |g| g.x().ncols()),
        }
    }

    /// Raw feature row of prompt `z`.
    pub fn raw_prompt(&self, z: &[f64]) -> Vec<f32> {
        match &self.basis {
            None => z.iter().map(|&v| v as f32).collect(),
            Some(b) => {
                let mut out = vec![0f32; b.ncols()];
                for (k, &zk) in z.iter().enumerate() {
                    if zk != 0.0 {
                        let zk = zk as f32;
                        for (o, &bv) in out.iter_mut().zip(b.row(k)) {
                            *o += zk * bv;
                        }
                    }
                }
                out
            }
        }
    }
}

/// `shots` indices of every class drawn from `pool` (all of a class when it has fewer), in
/// pool order per class, classes in order.
pub fn few_shot(pool: &[usize], labels: &[i64], shots: usize, rng: &mut Rng) -> Vec<usize> {
    let classes = pool
        .iter()
        .map(|&i| labels[i])
        .filter(|&l| l >= 0)
        .max()
        .map_or(0, |m| m as usize + 1);
    let mut out = Vec::new();
    for c in 0..classes {
        let mut of: Vec<usize> = pool
            .iter()
            .copied()
            .filter(|&i| labels[i] == c as i64)
            .collect();
        rng.shuffle(&mut of);
        of.truncate(shots);
        of.sort_unstable();
        out.extend(of);
    }
    out
}

/// Node classification on k-hop subgraphs: `shots` training targets per class from the
/// graph's training part, and `test_size` targets (0: all) from its test part, both seeded;
/// each target's `hops`-hop in-ball of at most `max_nodes` nodes (nearest first) becomes one
/// small graph with the target as node 0. Unlabelled targets are skipped.
pub fn node_task(
    graph: &Graph,
    shots: usize,
    hops: usize,
    max_nodes: usize,
    test_size: usize,
    seed: u64,
    basis: Option<Arc<Array2<f32>>>,
) -> Result<ReliefTask, String> {
    let labels = graph
        .labels
        .as_ref()
        .ok_or("the graph has no node labels")?;
    let split = graph
        .split
        .as_ref()
        .ok_or("the graph has no split (train_mask, val_mask, test_mask)")?;
    let mut rng = Rng::new(seed);
    let train_nodes = few_shot(&split.train, labels, shots, &mut rng);
    let mut test_nodes: Vec<usize> = split
        .test
        .iter()
        .copied()
        .filter(|&i| labels[i] >= 0)
        .collect();
    if test_size > 0 && test_size < test_nodes.len() {
        rng.shuffle(&mut test_nodes);
        test_nodes.truncate(test_size);
        test_nodes.sort_unstable();
    }
    if train_nodes.is_empty() || test_nodes.is_empty() {
        return Err("no labelled training or test node".into());
    }
    let whole = GnnGraph::from_graph(graph);
    let mut graphs = Vec::new();
    let mut ys = Vec::new();
    for &t in train_nodes.iter().chain(&test_nodes) {
        let (g, _) = whole.k_hop(t, hops, Some(max_nodes.max(1)));
        graphs.push(g);
        ys.push(labels[t] as usize);
    }
    let classes = graph.num_classes();
    let train = (0..train_nodes.len()).collect();
    let test = (train_nodes.len()..graphs.len()).collect();
    Ok(ReliefTask {
        graphs,
        labels: ys,
        classes,
        readout: Readout::Target,
        train,
        test,
        basis,
    })
}

/// Graph classification: `shots` training graphs per class, seeded; the test graphs are the
/// rest (at most `test_size`, seeded; 0: all).
pub fn graph_task(
    graphs: &[Graph],
    shots: usize,
    test_size: usize,
    seed: u64,
) -> Result<ReliefTask, String> {
    let labels: Vec<i64> = graphs
        .iter()
        .map(|g| g.graph_label.ok_or("a graph has no graph label"))
        .collect::<Result<_, _>>()?;
    let mut rng = Rng::new(seed);
    let all: Vec<usize> = (0..graphs.len()).collect();
    let train = few_shot(&all, &labels, shots, &mut rng);
    let mut test: Vec<usize> = all.into_iter().filter(|i| !train.contains(i)).collect();
    if test_size > 0 && test_size < test.len() {
        rng.shuffle(&mut test);
        test.truncate(test_size);
        test.sort_unstable();
    }
    if train.is_empty() || test.is_empty() {
        return Err("no training or test graph".into());
    }
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    Ok(ReliefTask {
        graphs: graphs.iter().map(GnnGraph::from_graph).collect(),
        labels: labels.iter().map(|&l| l as usize).collect(),
        classes,
        readout: Readout::Graph,
        train,
        test,
        basis: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Prompts and embeddings.

/// The prompt of one graph: `z [n, K]` per node and the raw feature rows of the prompted
/// nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptState {
    /// Prompt per node in prompt space.
    pub z: Array2<f64>,
    /// Raw rows `z_v · basis` of the prompted nodes.
    pub raw: BTreeMap<usize, Vec<f32>>,
}

impl PromptState {
    /// No prompt on a graph of `n` nodes.
    pub fn zero(n: usize, k: usize) -> Self {
        PromptState {
            z: Array2::zeros((n, k)),
            raw: BTreeMap::new(),
        }
    }

    /// `p[node] += increment`.
    pub fn add(&mut self, task: &ReliefTask, node: usize, increment: &[f64]) {
        for (a, &b) in self.z.row_mut(node).iter_mut().zip(increment) {
            *a += b;
        }
        let d = task.raw_prompt(increment);
        let row = self.raw.entry(node).or_insert_with(|| vec![0.0; d.len()]);
        row.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
    }

    /// The prompt for [`GnnEmbedder`].
    pub fn prompt(&self) -> Option<Prompt> {
        (!self.raw.is_empty()).then(|| Prompt::Rows(self.raw.clone()))
    }

    /// Share of nodes with a non-zero prompt.
    pub fn coverage(&self) -> f64 {
        let n = self.z.nrows().max(1);
        self.prompted() as f64 / n as f64
    }

    fn prompted(&self) -> usize {
        self.z
            .rows()
            .into_iter()
            .filter(|r| r.iter().any(|&v| v != 0.0))
            .count()
    }

    /// Mean Euclidean norm of the non-zero prompts (0 without any).
    pub fn magnitude(&self) -> f64 {
        let norms: Vec<f64> = self
            .z
            .rows()
            .into_iter()
            .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
            .filter(|&n| n > 0.0)
            .collect();
        if norms.is_empty() {
            0.0
        } else {
            norms.iter().sum::<f64>() / norms.len() as f64
        }
    }
}

/// Node embeddings and readout of one (prompted) graph.
#[derive(Clone, Debug)]
pub struct Embedded {
    /// Node embeddings `[n, D]`.
    pub h: Array2<f32>,
    /// What the head reads.
    pub readout: Array1<f32>,
}

/// Embeds graphs of the task with optional prompts, many per call.
pub fn embed(
    embedder: &GnnEmbedder,
    task: &ReliefTask,
    items: &[(usize, Option<&PromptState>)],
) -> Result<Vec<Embedded>, String> {
    let jobs: Vec<(GnnGraph, Option<Prompt>)> = items
        .iter()
        .map(|&(g, p)| (task.graphs[g].clone(), p.and_then(PromptState::prompt)))
        .collect();
    let out = embedder.embed_many_prompted(&jobs)?;
    out.into_iter()
        .map(|e| {
            let readout = match task.readout {
                Readout::Target => e.h.row(0).to_owned(),
                Readout::Graph => {
                    e.g.clone()
                        .ok_or("readout `graph` needs a package with a graph embedding `g`")?
                }
            };
            Ok(Embedded { h: e.h, readout })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The projection head.

/// How a head is trained.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadSettings {
    /// Full-batch epochs.
    pub epochs: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// L2 penalty on the weights.
    pub weight_decay: f64,
}

impl Default for HeadSettings {
    fn default() -> Self {
        HeadSettings {
            epochs: 100,
            lr: 0.01,
            weight_decay: 0.01,
        }
    }
}

/// Multinomial logistic regression on standardised readouts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// Readout width.
    pub dim: usize,
    /// Classes.
    pub classes: usize,
    /// Column means subtracted from a readout.
    pub centre: Vec<f64>,
    /// Divides the centred readout.
    pub scale: f64,
    /// Weights `[dim, classes]` then biases `[classes]`.
    pub theta: Vec<f64>,
    #[serde(skip)]
    adam: Option<Adam>,
}

impl Head {
    /// A zero head standardised by the given readouts.
    pub fn new(classes: usize, readouts: &[&Array1<f32>]) -> Self {
        let dim = readouts.first().map_or(0, |r| r.len());
        let n = readouts.len().max(1) as f64;
        let mut centre = vec![0.0; dim];
        for r in readouts {
            for (c, &v) in centre.iter_mut().zip(r.iter()) {
                *c += v as f64 / n;
            }
        }
        let mut ss = 0.0;
        for r in readouts {
            for (c, &v) in centre.iter().zip(r.iter()) {
                ss += (v as f64 - c).powi(2);
            }
        }
        let rms = (ss / (n * dim.max(1) as f64)).sqrt();
        Head {
            dim,
            classes,
            centre,
            scale: if rms > 1e-12 { rms } else { 1.0 },
            theta: vec![0.0; dim * classes + classes],
            adam: None,
        }
    }

    fn input(&self, r: &Array1<f32>) -> Vec<f64> {
        r.iter()
            .zip(&self.centre)
            .map(|(&v, c)| (v as f64 - c) / self.scale)
            .collect()
    }

    /// Class logits of a readout.
    pub fn logits(&self, r: &Array1<f32>) -> Vec<f64> {
        let x = self.input(r);
        let c = self.classes;
        let mut out = self.theta[self.dim * c..].to_vec();
        for (i, &xv) in x.iter().enumerate() {
            for (o, &w) in out.iter_mut().zip(&self.theta[i * c..(i + 1) * c]) {
                *o += xv * w;
            }
        }
        out
    }

    /// Class probabilities.
    pub fn probs(&self, r: &Array1<f32>) -> Vec<f64> {
        softmax(&self.logits(r))
    }

    /// Cross-entropy of one readout against its label.
    pub fn loss(&self, r: &Array1<f32>, y: usize) -> f64 {
        -self.probs(r)[y].max(1e-300).ln()
    }

    /// The loss of one example and its gradients: with respect to the head's weights (added
    /// into `grad`) and to the readout (returned).
    pub fn loss_grad(&self, r: &Array1<f32>, y: usize, grad: &mut [f64]) -> (f64, Vec<f64>) {
        let x = self.input(r);
        let c = self.classes;
        let p = self.probs(r);
        let mut dl = p.clone();
        dl[y] -= 1.0;
        let mut dr = vec![0.0; self.dim];
        for (i, &xv) in x.iter().enumerate() {
            for k in 0..c {
                grad[i * c + k] += xv * dl[k];
                dr[i] += self.theta[i * c + k] * dl[k] / self.scale;
            }
        }
        for k in 0..c {
            grad[self.dim * c + k] += dl[k];
        }
        (-p[y].max(1e-300).ln(), dr)
    }

    /// One Adam step on the mean loss of the given gradient sum over `n` examples, with the
    /// L2 penalty.
    pub fn step(&mut self, grad: &mut [f64], n: usize, s: &HeadSettings) {
        let w = self.dim * self.classes;
        for (i, g) in grad.iter_mut().enumerate() {
            *g /= n.max(1) as f64;
            if i < w {
                *g += s.weight_decay * self.theta[i];
            }
        }
        let len = self.theta.len();
        let adam = self.adam.get_or_insert_with(|| Adam::new(s.lr, len));
        adam.lr = s.lr;
        adam.step(&mut self.theta, grad);
    }

    /// Trains on readouts and labels for `s.epochs` full-batch epochs; returns the last mean
    /// loss.
    pub fn train(&mut self, xs: &[&Array1<f32>], ys: &[usize], s: &HeadSettings) -> f64 {
        let mut last = f64::NAN;
        for _ in 0..s.epochs {
            let mut grad = vec![0.0; self.theta.len()];
            let mut loss = 0.0;
            for (x, &y) in xs.iter().zip(ys) {
                loss += self.loss_grad(x, y, &mut grad).0;
            }
            last = loss / xs.len().max(1) as f64;
            self.step(&mut grad, xs.len(), s);
        }
        last
    }
}

fn softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = l.iter().map(|&v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

// ---------------------------------------------------------------------------------------------
// Scores.

/// Test scores of one method on one task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Accuracy.
    pub accuracy: f64,
    /// Macro-F1.
    pub macro_f1: f64,
    /// ROC-AUC of class 1 (two classes only; NaN otherwise).
    pub roc_auc: f64,
    /// Share of prompted nodes, averaged over the test graphs (1 for full prompts, 0 without).
    pub coverage: f64,
    /// Mean norm of a non-zero prompt vector in prompt space, averaged over the test graphs.
    pub magnitude: f64,
}

/// Scores of class probabilities against labels.
pub fn score(probs: &[Vec<f64>], labels: &[usize], classes: usize) -> Scores {
    let pred: Vec<i64> = probs
        .iter()
        .map(|p| super::relief_policy::argmax(p) as i64)
        .collect();
    let truth: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let all: Vec<usize> = (0..labels.len()).collect();
    let s = super::metrics::Scores::of(&truth, &pred, &all);
    let roc_auc = if classes == 2 {
        roc_auc(
            &probs.iter().map(|p| p[1]).collect::<Vec<_>>(),
            &labels.iter().map(|&l| l == 1).collect::<Vec<_>>(),
        )
    } else {
        f64::NAN
    };
    Scores {
        accuracy: s.accuracy,
        macro_f1: s.macro_f1,
        roc_auc,
        coverage: 0.0,
        magnitude: 0.0,
    }
}

/// Area under the ROC curve (ties count one half); NaN with one class only.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Mid-ranks of tied scores.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    let np = positive.iter().filter(|&&p| p).count() as f64;
    let nn = positive.len() as f64 - np;
    if np == 0.0 || nn == 0.0 {
        return f64::NAN;
    }
    let sum: f64 = ranks
        .iter()
        .zip(positive)
        .filter(|(_, &p)| p)
        .map(|(r, _)| r)
        .sum();
    (sum - np * (np + 1.0) / 2.0) / (np * nn)
}

// ---------------------------------------------------------------------------------------------
// Training.

/// Settings of RELIEF training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReliefSettings {
    /// Policy updates (rounds of rollouts).
    pub rounds: usize,
    /// Training graphs rolled out per round (cycled through, seeded order).
    pub graphs_per_round: usize,
    /// Hidden units of the policy.
    pub hidden: usize,
    /// Largest mean increment per prompt coordinate.
    pub max_z: f64,
    /// `log σ` of the increments at the start and the end of training (linear in between).
    pub log_std: [f64; 2],
    /// Adam learning rate of the policy.
    pub lr: f64,
    /// Adam epsilon.
    pub adam_eps: f64,
    /// Passes over the round's transitions per update.
    pub update_epochs: usize,
    /// Minibatch size.
    pub minibatch: usize,
    /// Stop the passes of an update when the mean approximate KL of a pass exceeds this.
    pub target_kl: f64,
    /// Discount.
    pub gamma: f64,
    /// GAE λ.
    pub lambda: f64,
    /// Clip, value and (starting) entropy coefficients; the entropy one is annealed linearly
    /// to 0.
    pub coef: PpoCoefficientsDef,
    /// Largest gradient norm.
    pub max_grad_norm: f64,
    /// Raw rewards are clipped to `±reward_clip` before normalisation.
    pub reward_clip: f64,
    /// Head epochs after each policy update (warm start).
    pub head_epochs: usize,
    /// The head's settings (its final refit and the linear probe use all of them).
    pub head: HeadSettings,
    /// Seed.
    pub seed: u64,
    /// After training, nodes are drawn from the policy (seeded) rather than taken greedily;
    /// increments are always the mean.
    pub sample_nodes: bool,
    /// After training, the head is refitted from scratch on the training graphs' final prompts
    /// (otherwise the head trained alongside the policy is kept).
    pub refit_head: bool,
}

/// [`PpoCoefficients`] as stored in settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoCoefficientsDef {
    /// Ratio clip.
    pub clip: f64,
    /// Value-loss coefficient.
    pub value: f64,
    /// Entropy coefficient at the start.
    pub entropy: f64,
}

impl Default for ReliefSettings {
    fn default() -> Self {
        let c = PpoCoefficients::default();
        ReliefSettings {
            rounds: 20,
            graphs_per_round: 16,
            hidden: 32,
            max_z: 0.05,
            log_std: [0.0, -5.0],
            lr: 5e-4,
            adam_eps: 1e-5,
            update_epochs: 10,
            minibatch: 128,
            target_kl: 0.02,
            gamma: 0.99,
            lambda: 0.95,
            coef: PpoCoefficientsDef {
                clip: c.clip,
                value: c.value,
                entropy: c.entropy,
            },
            max_grad_norm: 0.5,
            reward_clip: 1.0,
            head_epochs: 50,
            head: HeadSettings::default(),
            seed: 0,
            sample_nodes: false,
            refit_head: false,
        }
    }
}

/// Figures of one training round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundLog {
    /// Round (from 1).
    pub round: usize,
    /// Mean raw reward per step (loss decrease).
    pub reward: f64,
    /// Mean downstream loss of the training graphs at the end of their episodes.
    pub final_loss: f64,
    /// Mean downstream loss of the same graphs unprompted (same head).
    pub start_loss: f64,
    /// Head training loss after the round.
    pub head_loss: f64,
    /// Mean prompt coverage at the end of the episodes.
    pub coverage: f64,
    /// Mean prompt magnitude at the end of the episodes.
    pub magnitude: f64,
    /// H-PPO loss of the last minibatch.
    pub ppo_loss: f64,
    /// Mean approximate KL of the last pass.
    pub approx_kl: f64,
    /// Passes run.
    pub passes: usize,
    /// Node entropy (mean over the last pass).
    pub entropy: f64,
    /// `log σ` of the round.
    pub log_std: f64,
    /// Seconds.
    pub seconds: f64,
}

/// A trained agent: its policy and head, and how it got there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The policy.
    pub policy: HybridPolicy,
    /// The head refitted on the training graphs' greedy prompts.
    pub head: Head,
    /// The settings it was trained with.
    pub settings: ReliefSettings,
    /// Readout.
    pub readout: Readout,
    /// Figures per round.
    pub log: Vec<RoundLog>,
}

impl Checkpoint {
    /// Writes the checkpoint as JSON (atomically).
    pub fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let text = serde_json::to_string(self).map_err(|e| e.to_string())? + "\n";
        latentflow_engine::exec::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Reads a checkpoint written by [`Checkpoint::save`].
    pub fn load(path: &std::path::Path) -> Result<Checkpoint, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// One running episode.
struct Episode {
    graph: usize,
    prompt: PromptState,
    state: Embedded,
    loss: f64,
    steps: usize,
    length: usize,
    transitions: Vec<Transition>,
    rewards: Vec<f64>,
    values: Vec<f64>,
}

/// What an episode leaves: the final prompt and embedding, and (when sampling) the
/// transitions, raw rewards and values.
type EpisodeOut = (PromptState, Embedded, Vec<Transition>, Vec<f64>, Vec<f64>);

/// Flattens node embeddings into the policy's state rows.
fn state_rows(h: &Array2<f32>) -> Vec<f32> {
    h.as_standard_layout().iter().copied().collect()
}

/// Runs the policy on `graphs` for as many steps as each has nodes, many graphs per GNN call;
/// returns the final prompts and embeddings, and (when sampling) the episodes' transitions,
/// raw rewards and values. `head` scores the rewards.
#[allow(clippy::too_many_arguments)]
fn rollout(
    embedder: &GnnEmbedder,
    task: &ReliefTask,
    policy: &HybridPolicy,
    head: &Head,
    graphs: &[usize],
    start: &[Embedded],
    log_std: f64,
    greedy: Greedy,
    max_z: f64,
    rng: &mut Rng,
) -> Result<Vec<EpisodeOut>, String> {
    let training = greedy == Greedy::No;
    let k = task.prompt_dim();
    let mut eps: Vec<Episode> = graphs
        .iter()
        .zip(start)
        .map(|(&g, e)| {
            let n = task.graphs[g].num_nodes();
            Episode {
                graph: g,
                prompt: PromptState::zero(n, k),
                state: e.clone(),
                loss: head.loss(&e.readout, task.labels[g]),
                steps: 0,
                length: n,
                transitions: Vec::new(),
                rewards: Vec::new(),
                values: Vec::new(),
            }
        })
        .collect();
    loop {
        let active: Vec<usize> = (0..eps.len())
            .filter(|&i| eps[i].steps < eps[i].length)
            .collect();
        if active.is_empty() {
            break;
        }
        for &i in &active {
            let e = &mut eps[i];
            let rows = state_rows(&e.state.h);
            let n = e.length;
            let a = policy.act_with(
                &rows,
                n,
                log_std,
                greedy == Greedy::Both,
                greedy != Greedy::No,
                rng,
            );
            let applied: Vec<f64> = a.increment.iter().map(|v| v.clamp(-max_z, max_z)).collect();
            e.prompt.add(task, a.node, &applied);
            e.values.push(a.value);
            if training {
                e.transitions.push(Transition {
                    state: rows,
                    n,
                    node: a.node,
                    increment: a.increment,
                    log_prob_node: a.log_prob_node,
                    log_prob_increment: a.log_prob_increment,
                    log_std,
                    advantage: 0.0,
                    ret: 0.0,
                });
            }
        }
        let items: Vec<(usize, Option<&PromptState>)> = active
            .iter()
            .map(|&i| (eps[i].graph, Some(&eps[i].prompt)))
            .collect();
        let out = embed(embedder, task, &items)?;
        for (&i, emb) in active.iter().zip(out) {
            let e = &mut eps[i];
            let loss = head.loss(&emb.readout, task.labels[e.graph]);
            e.rewards.push(e.loss - loss);
            e.loss = loss;
            e.state = emb;
            e.steps += 1;
        }
    }
    Ok(eps
        .into_iter()
        .map(|e| (e.prompt, e.state, e.transitions, e.rewards, e.values))
        .collect())
}

/// How a rollout acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Greedy {
    /// Samples nodes and increments (training).
    No,
    /// Samples nodes, takes the mean increment.
    Increment,
    /// The most probable node and the mean increment.
    Both,
}

impl Greedy {
    fn after_training(s: &ReliefSettings) -> Greedy {
        if s.sample_nodes {
            Greedy::Increment
        } else {
            Greedy::Both
        }
    }
}

/// Progress of a training run, for callers that report it.
pub type Progress<'a> = &'a mut dyn FnMut(&RoundLog);

/// Trains a RELIEF agent on the task's training graphs.
pub fn train(
    embedder: &GnnEmbedder,
    task: &ReliefTask,
    s: &ReliefSettings,
    progress: Progress<'_>,
) -> Result<Checkpoint, String> {
    let mut rng = Rng::new(s.seed ^ 0x2E11_EF00);
    let unprompted = embed(
        embedder,
        task,
        &task.train.iter().map(|&g| (g, None)).collect::<Vec<_>>(),
    )?;
    let dim = unprompted[0].h.ncols();
    let ys: Vec<usize> = task.train.iter().map(|&g| task.labels[g]).collect();
    let mut head = Head::new(
        task.classes,
        &unprompted.iter().map(|e| &e.readout).collect::<Vec<_>>(),
    );
    head.train(
        &unprompted.iter().map(|e| &e.readout).collect::<Vec<_>>(),
        &ys,
        &s.head,
    );
    let shape = PolicyShape {
        embed: dim,
        hidden: s.hidden,
        prompt: task.prompt_dim(),
    };
    let mut policy = HybridPolicy::new(shape, s.max_z, &mut rng);
    let mut adam = Adam::with_eps(s.lr, s.adam_eps, policy.theta.len());
    let mut stats = RunningStats::default();
    // The latest end-of-episode readout of every training graph, for the head.
    let mut latest: Vec<Array1<f32>> = unprompted.iter().map(|e| e.readout.clone()).collect();
    let mut order: Vec<usize> = (0..task.train.len()).collect();
    rng.shuffle(&mut order);
    let mut cursor = 0;
    let mut log = Vec::new();

    for round in 0..s.rounds {
        let t0 = Instant::now();
        let progress_frac = if s.rounds > 1 {
            round as f64 / (s.rounds - 1) as f64
        } else {
            0.0
        };
        let log_std = s.log_std[0] + (s.log_std[1] - s.log_std[0]) * progress_frac;
        let coef = PpoCoefficients {
            clip: s.coef.clip,
            value: s.coef.value,
            entropy: s.coef.entropy * (1.0 - round as f64 / s.rounds.max(1) as f64),
        };

        // Rollouts.
        let m = s.graphs_per_round.min(task.train.len()).max(1);
        let mut picks = Vec::with_capacity(m);
        for _ in 0..m {
            if cursor == order.len() {
                rng.shuffle(&mut order);
                cursor = 0;
            }
            picks.push(order[cursor]);
            cursor += 1;
        }
        let graphs: Vec<usize> = picks.iter().map(|&i| task.train[i]).collect();
        let start: Vec<Embedded> = picks.iter().map(|&i| unprompted[i].clone()).collect();
        let eps = rollout(
            embedder,
            task,
            &policy,
            &head,
            &graphs,
            &start,
            log_std,
            Greedy::No,
            s.max_z,
            &mut rng,
        )?;

        let mut transitions = Vec::new();
        let (mut reward_sum, mut steps) = (0.0, 0usize);
        let (mut cov, mut mag, mut fin, mut beg) = (0.0, 0.0, 0.0, 0.0);
        for (j, (prompt, state, mut tr, rewards, values)) in eps.into_iter().enumerate() {
            let clipped: Vec<f64> = rewards
                .iter()
                .map(|r| r.clamp(-s.reward_clip, s.reward_clip))
                .collect();
            clipped.iter().for_each(|&r| stats.push(r));
            reward_sum += rewards.iter().sum::<f64>();
            steps += rewards.len();
            let normed: Vec<f64> = clipped.iter().map(|&r| stats.normalise(r)).collect();
            let (adv, ret) = gae(&normed, &values, s.gamma, s.lambda);
            for ((t, a), r) in tr.iter_mut().zip(adv).zip(ret) {
                t.advantage = a;
                t.ret = r;
            }
            transitions.extend(tr);
            cov += prompt.coverage();
            mag += prompt.magnitude();
            let y = task.labels[graphs[j]];
            fin += head.loss(&state.readout, y);
            beg += head.loss(&start[j].readout, y);
            latest[picks[j]] = state.readout;
        }
        let mf = m as f64;

        // H-PPO update.
        let mut idx: Vec<usize> = (0..transitions.len()).collect();
        let (mut last_loss, mut last_kl, mut passes, mut entropy) = (0.0, 0.0, 0, 0.0);
        for _ in 0..s.update_epochs {
            rng.shuffle(&mut idx);
            let (mut kl, mut ent, mut batches) = (0.0, 0.0, 0usize);
            for chunk in idx.chunks(s.minibatch.max(1)) {
                let batch: Vec<&Transition> = chunk.iter().map(|&i| &transitions[i]).collect();
                let mut grad = vec![0.0; policy.theta.len()];
                let st = policy.ppo_loss(&batch, &coef, Some(&mut grad));
                clip_grad_norm(&mut grad, s.max_grad_norm);
                adam.step(&mut policy.theta, &grad);
                last_loss = st.loss;
                kl += st.approx_kl;
                ent += st.entropy;
                batches += 1;
            }
            passes += 1;
            last_kl = kl / batches.max(1) as f64;
            entropy = ent / batches.max(1) as f64;
            if last_kl > s.target_kl {
                break;
            }
        }

        // Head epochs on the latest prompted readouts of all training graphs.
        let head_loss = head.train(
            &latest.iter().collect::<Vec<_>>(),
            &ys,
            &HeadSettings {
                epochs: s.head_epochs,
                ..s.head
            },
        );

        let entry = RoundLog {
            round: round + 1,
            reward: reward_sum / steps.max(1) as f64,
            final_loss: fin / mf,
            start_loss: beg / mf,
            head_loss,
            coverage: cov / mf,
            magnitude: mag / mf,
            ppo_loss: last_loss,
            approx_kl: last_kl,
            passes,
            entropy,
            log_std,
            seconds: t0.elapsed().as_secs_f64(),
        };
        progress(&entry);
        log.push(entry);
    }

    // Refit the head from scratch on the final prompts of the training graphs.
    let final_head = if s.refit_head {
        let fin = rollout(
            embedder,
            task,
            &policy,
            &head,
            &task.train,
            &unprompted,
            s.log_std[1],
            Greedy::after_training(s),
            s.max_z,
            &mut rng,
        )?;
        let readouts: Vec<&Array1<f32>> = fin.iter().map(|g| &g.1.readout).collect();
        let mut h = Head::new(
            task.classes,
            &unprompted.iter().map(|e| &e.readout).collect::<Vec<_>>(),
        );
        h.train(&readouts, &ys, &s.head);
        h
    } else {
        head
    };
    Ok(Checkpoint {
        policy,
        head: final_head,
        settings: s.clone(),
        readout: task.readout,
        log,
    })
}

/// Prompts the given graphs with a trained agent (greedily) and classifies them; returns the
/// class probabilities and the prompts.
pub fn infer(
    embedder: &GnnEmbedder,
    task: &ReliefTask,
    ck: &Checkpoint,
    graphs: &[usize],
) -> Result<Vec<(Vec<f64>, PromptState)>, String> {
    let start = embed(
        embedder,
        task,
        &graphs.iter().map(|&g| (g, None)).collect::<Vec<_>>(),
    )?;
    let mut rng = Rng::new(ck.settings.seed);
    let out = rollout(
        embedder,
        task,
        &ck.policy,
        &ck.head,
        graphs,
        &start,
        ck.settings.log_std[1],
        Greedy::after_training(&ck.settings),
        ck.policy.max_z,
        &mut rng,
    )?;
    Ok(out
        .into_iter()
        .map(|(p, e, ..)| (ck.head.probs(&e.readout), p))
        .collect())
}

/// Test scores of a trained agent, with its coverage and prompt magnitude.
pub fn evaluate(
    embedder: &GnnEmbedder,
    task: &ReliefTask,
    ck: &Checkpoint,
) -> Result<Scores, String> {
    let out = infer(embedder, task, ck, &task.test)?;
    let probs: Vec<Vec<f64>> = out.iter().map(|o| o.0.clone()).collect();
    let labels: Vec<usize> = task.test.iter().map(|&g| task.labels[g]).collect();
    let mut s = score(&probs, &labels, task.classes);
    let n = out.len().max(1) as f64;
    s.coverage = out.iter().map(|o| o.1.coverage()).sum::<f64>() / n;
    s.magnitude = out.iter().map(|o| o.1.magnitude()).sum::<f64>() / n;
    Ok(s)
}

/// The linear probe: the head trained on unprompted readouts of the training graphs.
pub fn linear_probe(
    embedder: &GnnEmbedder,
    task: &ReliefTask,
    settings: &HeadSettings,
) -> Result<Scores, String> {
    let train = embed(
        embedder,
        task,
        &task.train.iter().map(|&g| (g, None)).collect::<Vec<_>>(),
    )?;
    let test = embed(
        embedder,
        task,
        &task.test.iter().map(|&g| (g, None)).collect::<Vec<_>>(),
    )?;
    let xs: Vec<&Array1<f32>> = train.iter().map(|e| &e.readout).collect();
    let ys: Vec<usize> = task.train.iter().map(|&g| task.labels[g]).collect();
    let mut head = Head::new(task.classes, &xs);
    head.train(&xs, &ys, settings);
    let probs: Vec<Vec<f64>> = test.iter().map(|e| head.probs(&e.readout)).collect();
    let labels: Vec<usize> = task.test.iter().map(|&g| task.labels[g]).collect();
    Ok(score(&probs, &labels, task.classes))
}
