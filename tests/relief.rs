//! RELIEF (`stages/src/graph/relief*.rs`): the hybrid policy's probabilities and H-PPO loss
//! against the formulas computed here by hand, its gradients against finite differences, GAE
//! and the reward statistics, prompts applied through the frozen GNN against graphs whose
//! features were prompted by hand, determinism under a seed, and short training runs end to
//! end (with a checkpoint that reloads and infers on new graphs).
//!
//! The GNN tests use the packages in `models/`; the MUTAG run needs the shared data
//! (`../shared/data`, or `LATENTFLOW_SHARED_DATA`) and passes without checking anything when
//! the folder is absent.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use latentflow_engine::inference::Device;
use latentflow_stages::graph::embed::{EmbedOptions, GnnEmbedder, GnnGraph};
use latentflow_stages::graph::load::{load, Input, LoadOptions};
use latentflow_stages::graph::relief::{
    self, embed, graph_task, roc_auc, Checkpoint, PromptState, Readout, ReliefSettings, ReliefTask,
};
use latentflow_stages::graph::relief_baselines::prompt_basis;
use latentflow_stages::graph::relief_policy::{
    gae, gaussian_log_prob, HybridPolicy, PolicyShape, PpoCoefficients, RunningStats, Transition,
};
use latentflow_stages::graph::Rng;
use ndarray::Array2;

use common::root;

// ---------------------------------------------------------------------------------------------
// Helpers.

fn model(name: &str) -> PathBuf {
    root().join("models").join(name)
}

fn embedder(name: &str) -> GnnEmbedder {
    let options = EmbedOptions {
        device: Device::Cpu,
        threads: Some(1),
        max_nodes: 1024,
    };
    GnnEmbedder::open(model(name), &options).expect("open the package")
}

fn small_policy(seed: u64) -> HybridPolicy {
    let shape = PolicyShape {
        embed: 3,
        hidden: 4,
        prompt: 2,
    };
    let mut p = HybridPolicy::new(shape, 0.5, &mut Rng::new(seed));
    // Larger weights than the initialisation, so every block matters in the checks.
    let mut rng = Rng::new(seed + 100);
    for t in &mut p.theta {
        *t = (rng.uniform() as f64 * 2.0 - 1.0) * 0.8;
    }
    p
}

fn state(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n * d).map(|_| rng.uniform() * 2.0 - 1.0).collect()
}

/// `x · W` for `x [i]`, `W [i, o]` row-major.
fn vm(x: &[f64], w: &[f64], o: usize) -> Vec<f64> {
    (0..o)
        .map(|k| x.iter().enumerate().map(|(i, &xv)| xv * w[i * o + k]).sum())
        .collect()
}

fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn tanh(a: Vec<f64>) -> Vec<f64> {
    a.into_iter().map(f64::tanh).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The policy's outputs straight from the formulas in the module docs: node logits, the mean
/// increment of every node, and the value.
fn by_hand(p: &HybridPolicy, s: &[f32], n: usize) -> (Vec<f64>, Vec<Vec<f64>>, f64) {
    let b = p.blocks();
    let (d, h, k) = (p.shape.embed, p.shape.hidden, p.shape.prompt);
    let z: Vec<Vec<f64>> = (0..n)
        .map(|v| {
            let hv: Vec<f64> = s[v * d..(v + 1) * d].iter().map(|&x| x as f64).collect();
            tanh(add(&vm(&hv, b.w1, h), b.b1))
        })
        .collect();
    let c: Vec<f64> = (0..h)
        .map(|j| z.iter().map(|zv| zv[j]).sum::<f64>() / n as f64)
        .collect();
    let logits = z
        .iter()
        .map(|zv| {
            let r = tanh(add(&add(&vm(zv, b.wd, h), &vm(&c, b.wdc, h)), b.bd));
            dot(&r, b.u)
        })
        .collect();
    let means = z
        .iter()
        .map(|zv| {
            let q = tanh(add(&add(&vm(zv, b.wq, h), &vm(&c, b.wqc, h)), b.bq));
            tanh(add(&vm(&q, b.wm, k), b.bm))
                .into_iter()
                .map(|t| p.max_z * t)
                .collect()
        })
        .collect();
    let sv = tanh(add(&vm(&c, b.wv, h), b.bv));
    (logits, means, dot(&sv, b.v) + b.v0)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

/// A few transitions of the small policy; `shift` moves the recorded old log-probabilities
/// away from the current ones, so that some ratios fall outside the clip range.
fn transitions(p: &HybridPolicy, shifts: &[(f64, f64)]) -> Vec<Transition> {
    let mut rng = Rng::new(9);
    shifts
        .iter()
        .enumerate()
        .map(|(i, &(sd, sc))| {
            let n = 3 + i % 3;
            let s = state(n, 3, 50 + i as u64);
            let a = p.act(&s, n, -0.5, false, &mut rng);
            Transition {
                state: s,
                n,
                node: a.node,
                increment: a.increment,
                log_prob_node: a.log_prob_node + sd,
                log_prob_increment: a.log_prob_increment + sc,
                log_std: -0.5,
                advantage: [1.3, -0.7, 0.4, -1.1, 2.0, 0.1][i % 6],
                ret: [0.5, -0.2, 1.0, 0.3, -0.8, 0.0][i % 6],
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The policy.

#[test]
fn log_probabilities_match_the_formulas() {
    let p = small_policy(1);
    let n = 4;
    let s = state(n, 3, 2);
    let (logits, means, value) = by_hand(&p, &s, n);
    let f = p.forward(&s, n);
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
    for v in 0..n {
        assert!(close(f.logits[v], logits[v], 1e-12), "logit {v}");
        assert!(
            close(f.log_probs[v], logits[v] - lse, 1e-12),
            "log π_d({v})"
        );
        let mf = p.mean(&f, v);
        for (a, b) in mf.mean.iter().zip(&means[v]) {
            assert!(close(*a, *b, 1e-12), "μ of node {v}");
            assert!(a.abs() <= p.max_z);
        }
    }
    assert!(close(f.value, value, 1e-12), "value");

    // A sampled action: its log-probabilities are those of the node and of a diagonal
    // Gaussian around the node's mean, written out here.
    let mut rng = Rng::new(3);
    let log_std = -0.3f64;
    let a = p.act(&s, n, log_std, false, &mut rng);
    assert!(close(a.log_prob_node, logits[a.node] - lse, 1e-12));
    let sigma = log_std.exp();
    let want: f64 = a
        .increment
        .iter()
        .zip(&means[a.node])
        .map(|(x, mu)| {
            -0.5 * ((x - mu) / sigma).powi(2) - sigma.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
        })
        .sum();
    assert!(close(a.log_prob_increment, want, 1e-12));
    assert_eq!(
        gaussian_log_prob(&a.increment, &means[a.node], log_std),
        a.log_prob_increment
    );

    // Greedy: the most probable node and its mean.
    let g = p.act(&s, n, log_std, true, &mut rng);
    let best = (0..n)
        .max_by(|&x, &y| logits[x].total_cmp(&logits[y]))
        .unwrap();
    assert_eq!(g.node, best);
    assert_eq!(g.increment, p.mean(&f, best).mean);
}

#[test]
fn padded_rows_do_not_change_the_policy() {
    let p = small_policy(4);
    let s = state(3, 3, 5);
    let mut padded = s.clone();
    padded.extend(state(2, 3, 6));
    let a = p.forward(&s, 3);
    let b = p.forward(&padded, 3);
    assert_eq!(a.logits, b.logits);
    assert_eq!(a.value, b.value);
}

#[test]
fn ppo_loss_matches_a_direct_computation() {
    let p = small_policy(7);
    let shifts = [
        (0.0, 0.0),
        (-0.6, 0.1),
        (0.5, -0.4),
        (0.05, 0.7),
        (-0.1, -0.9),
    ];
    let tr = transitions(&p, &shifts);
    let coef = PpoCoefficients {
        clip: 0.2,
        value: 0.5,
        entropy: 0.01,
    };
    let batch: Vec<&Transition> = tr.iter().collect();
    let got = p.ppo_loss(&batch, &coef, None);

    let b = tr.len() as f64;
    let mean = tr.iter().map(|t| t.advantage).sum::<f64>() / b;
    let sd = (tr.iter().map(|t| (t.advantage - mean).powi(2)).sum::<f64>() / (b - 1.0)).sqrt();
    let (mut pd, mut pc, mut vl, mut ent, mut clipped) = (0.0, 0.0, 0.0, 0.0, 0);
    for t in &tr {
        let (logits, means, value) = by_hand(&p, &t.state, t.n);
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        let lp_d = logits[t.node] - lse;
        let sigma = t.log_std.exp();
        let lp_c: f64 = t
            .increment
            .iter()
            .zip(&means[t.node])
            .map(|(x, mu)| {
                -0.5 * ((x - mu) / sigma).powi(2)
                    - t.log_std
                    - 0.5 * (2.0 * std::f64::consts::PI).ln()
            })
            .sum();
        let a = (t.advantage - mean) / (sd + 1e-8);
        let surrogate = |r: f64| (r * a).min(r.clamp(0.8, 1.2) * a);
        let rd = (lp_d - t.log_prob_node).exp();
        let rc = (lp_c - t.log_prob_increment).exp();
        clipped += [rd, rc]
            .iter()
            .filter(|r| !(0.8..=1.2).contains(*r))
            .count();
        pd -= surrogate(rd) / b;
        pc -= surrogate(rc) / b;
        vl += 0.5 * (value - t.ret).powi(2) / b;
        ent -= logits
            .iter()
            .map(|l| (l - lse).exp() * (l - lse))
            .sum::<f64>()
            / b;
    }
    assert!(
        clipped >= 3,
        "the batch exercises the clip ({clipped} ratios outside)"
    );
    let want = pd + pc + 0.5 * vl - 0.01 * ent;
    assert!(
        close(got.policy_node, pd, 1e-10),
        "{} vs {pd}",
        got.policy_node
    );
    assert!(close(got.policy_increment, pc, 1e-10));
    assert!(close(got.value, vl, 1e-10));
    assert!(close(got.entropy, ent, 1e-10));
    assert!(close(got.loss, want, 1e-10), "{} vs {want}", got.loss);
}

#[test]
fn ppo_gradient_matches_finite_differences() {
    let p = small_policy(11);
    // Ratios either well inside or well outside the clip range, so the loss is smooth around
    // the current weights.
    let shifts = [
        (0.0, 0.0),
        (-0.7, 0.02),
        (0.6, -0.8),
        (0.03, 0.9),
        (-0.05, -0.01),
    ];
    let tr = transitions(&p, &shifts);
    let batch: Vec<&Transition> = tr.iter().collect();
    let coef = PpoCoefficients {
        clip: 0.2,
        value: 0.5,
        entropy: 0.05,
    };
    let mut grad = vec![0.0; p.theta.len()];
    p.ppo_loss(&batch, &coef, Some(&mut grad));
    assert!(grad.iter().filter(|g| g.abs() > 1e-8).count() > p.theta.len() / 2);
    let h = 1e-6;
    let mut worst = 0f64;
    for (i, &g) in grad.iter().enumerate() {
        let mut a = p.clone();
        a.theta[i] += h;
        let mut b = p.clone();
        b.theta[i] -= h;
        let fd = (a.ppo_loss(&batch, &coef, None).loss - b.ppo_loss(&batch, &coef, None).loss)
            / (2.0 * h);
        let err = (fd - g).abs() / (1e-6 + fd.abs().max(g.abs()));
        worst = worst.max(if (fd - g).abs() < 1e-8 { 0.0 } else { err });
    }
    assert!(worst < 1e-4, "largest relative error {worst:.2e}");
}

#[test]
fn gae_and_running_statistics_match_their_definitions() {
    let r = [1.0, -0.5, 0.25];
    let v = [0.2, 0.4, -0.1];
    let (g, l) = (0.9, 0.8);
    let (adv, ret) = gae(&r, &v, g, l);
    let d2 = r[2] - v[2];
    let d1 = r[1] + g * v[2] - v[1];
    let d0 = r[0] + g * v[1] - v[0];
    let want = [d0 + g * l * (d1 + g * l * d2), d1 + g * l * d2, d2];
    for k in 0..3 {
        assert!(close(adv[k], want[k], 1e-14));
        assert!(close(ret[k], want[k] + v[k], 1e-14));
    }

    let xs = [0.3, -1.2, 4.0, 0.0, 2.5];
    let mut s = RunningStats::default();
    xs.iter().for_each(|&x| s.push(x));
    let mean = xs.iter().sum::<f64>() / 5.0;
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
    assert!(close(s.mean, mean, 1e-14) && close(s.std(), sd, 1e-14));
    assert!(close(s.normalise(1.0), (1.0 - mean) / sd, 1e-7));
}

#[test]
fn roc_auc_counts_ordered_pairs() {
    // Positives 0.9, 0.4, 0.4; negatives 0.4, 0.1: of the 6 pairs, 4 are ordered right and 2
    // are ties (one half each).
    let auc = roc_auc(
        &[0.9, 0.4, 0.4, 0.4, 0.1],
        &[true, true, true, false, false],
    );
    assert!(close(auc, 5.0 / 6.0, 1e-12), "{auc}");
    assert!(roc_auc(&[0.1, 0.2], &[true, true]).is_nan());
}

// ---------------------------------------------------------------------------------------------
// Prompts through the frozen GNN.

/// A small graph with Cora-wide binary features: a path 0 - 1 - 2 - 3 and a triangle 3 - 4 - 5.
fn cora_like_graph() -> GnnGraph {
    let mut rng = Rng::new(21);
    let mut x = Array2::zeros((6, 1433));
    for v in 0..6 {
        for _ in 0..15 {
            x[[v, rng.below(1433)]] = 1.0;
        }
    }
    let mut edges = Vec::new();
    for (a, b) in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 3)] {
        edges.push((a, b));
        edges.push((b, a));
    }
    GnnGraph::new(x, edges).unwrap()
}

#[test]
fn prompted_embedding_equals_embedding_of_hand_prompted_features() {
    let dir = model("gnn-cora-edgepred");
    let basis = prompt_basis(&dir)
        .unwrap()
        .expect("the package has an SVD projection");
    assert_eq!(basis.dim(), (100, 1433));
    let e = embedder("gnn-cora-edgepred");
    let g = cora_like_graph();
    let task = ReliefTask {
        graphs: vec![g.clone()],
        labels: vec![0],
        classes: 2,
        readout: Readout::Target,
        train: vec![0],
        test: vec![0],
        basis: Some(Arc::new(basis.clone())),
    };
    let mut p = PromptState::zero(6, 100);
    let mut rng = Rng::new(5);
    let inc = |rng: &mut Rng| -> Vec<f64> {
        (0..100)
            .map(|_| (rng.uniform() as f64 - 0.5) * 0.2)
            .collect()
    };
    let (a, b, c) = (inc(&mut rng), inc(&mut rng), inc(&mut rng));
    p.add(&task, 2, &a);
    p.add(&task, 4, &b);
    p.add(&task, 2, &c);
    assert!(close(p.coverage(), 2.0 / 6.0, 1e-12));

    // By hand: x_v + (Σ increments of v) · basis for the prompted nodes.
    let mut x = g.x().clone();
    for (node, z) in [(2, add(&a, &c)), (4, b.clone())] {
        for j in 0..1433 {
            let pj: f64 = (0..100).map(|k| z[k] * basis[[k, j]] as f64).sum();
            x[[node, j]] += pj as f32;
        }
    }
    let want = e.embed(&g.with_features(x).unwrap()).unwrap().h;
    let got = embed(&e, &task, &[(0, Some(&p)), (0, None)]).unwrap();
    let diff = (&got[0].h - &want)
        .mapv(f32::abs)
        .fold(0f32, |m, &v| m.max(v));
    let scale = want.mapv(f32::abs).fold(0f32, |m, &v| m.max(v));
    assert!(diff <= 1e-5 * scale.max(1.0), "max difference {diff}");
    assert_eq!(got[0].readout, got[0].h.row(0));
    // The prompt changes the embedding, and the unprompted copy is the plain graph's.
    let plain = e.embed(&g).unwrap().h;
    assert!((&got[0].h - &plain).mapv(f32::abs).sum() > 1e-3);
    assert!(
        (&got[1].h - &plain)
            .mapv(f32::abs)
            .fold(0f32, |m, &v| m.max(v))
            <= 1e-5
    );
}

// ---------------------------------------------------------------------------------------------
// Training.

/// Synthetic molecules for gin-mutag: rings and chains of 5 to 9 atoms; class 1 holds an
/// oxygen (atom type 2), class 0 only carbon and nitrogen.
fn molecules(count: usize, seed: u64) -> ReliefTask {
    let mut rng = Rng::new(seed);
    let mut graphs = Vec::new();
    let mut labels = Vec::new();
    for i in 0..count {
        let n = 5 + rng.below(5);
        let label = i % 2;
        let mut x = Array2::zeros((n, 7));
        for v in 0..n {
            x[[v, rng.below(2)]] = 1.0;
        }
        if label == 1 {
            let v = rng.below(n);
            x.row_mut(v).fill(0.0);
            x[[v, 2]] = 1.0;
        }
        let mut edges = Vec::new();
        for v in 0..n - 1 {
            edges.push((v, v + 1));
            edges.push((v + 1, v));
        }
        if rng.below(2) == 0 {
            edges.push((0, n - 1));
            edges.push((n - 1, 0));
        }
        graphs.push(GnnGraph::new(x, edges).unwrap());
        labels.push(label);
    }
    ReliefTask {
        graphs,
        labels,
        classes: 2,
        readout: Readout::Graph,
        train: (0..8).collect(),
        test: (8..count).collect(),
        basis: None,
    }
}

fn quick_settings(seed: u64) -> ReliefSettings {
    ReliefSettings {
        rounds: 3,
        graphs_per_round: 4,
        hidden: 8,
        max_z: 0.5,
        head_epochs: 10,
        head: relief::HeadSettings {
            epochs: 50,
            ..Default::default()
        },
        seed,
        ..Default::default()
    }
}

#[test]
fn training_is_deterministic_under_a_seed() {
    let e = embedder("gin-mutag");
    let task = molecules(14, 1);
    let run = |seed| {
        let ck = relief::train(&e, &task, &quick_settings(seed), &mut |_| {}).unwrap();
        let mut json = serde_json::to_value(&ck).unwrap();
        // Wall-clock seconds are the only figures allowed to differ.
        for l in json["log"].as_array_mut().unwrap() {
            l["seconds"] = 0.into();
        }
        let scores = relief::evaluate(&e, &task, &ck).unwrap();
        (serde_json::to_string(&json).unwrap(), format!("{scores:?}"))
    };
    let (a, sa) = run(3);
    let (b, sb) = run(3);
    assert_eq!(
        a, b,
        "two runs with one seed give byte-identical checkpoints"
    );
    assert_eq!(sa, sb);
    let (c, _) = run(4);
    assert_ne!(a, c, "another seed gives another run");
}

#[test]
fn a_short_training_run_prompts_and_reloads() {
    let e = embedder("gin-mutag");
    let task = molecules(16, 2);
    let s = quick_settings(0);
    let mut rounds = Vec::new();
    let ck = relief::train(&e, &task, &s, &mut |l| rounds.push(l.clone())).unwrap();
    assert_eq!(rounds.len(), 3);
    assert_eq!(ck.log, rounds);
    for l in &rounds {
        assert!(l.final_loss.is_finite() && l.start_loss.is_finite());
        assert!(l.coverage > 0.0 && l.coverage <= 1.0);
        assert!(l.passes >= 1 && l.passes <= s.update_epochs);
    }
    assert!(close(rounds[0].log_std, 0.0, 1e-12) && close(rounds[2].log_std, -5.0, 1e-12));

    // Greedy prompts on the test graphs: every step adds one clipped increment, so a node's
    // prompt is at most `steps · max_z · √P` long.
    let out = relief::infer(&e, &task, &ck, &task.test).unwrap();
    for ((probs, prompt), &g) in out.iter().zip(&task.test) {
        let n = task.graphs[g].num_nodes() as f64;
        assert!(close(probs.iter().sum::<f64>(), 1.0, 1e-9));
        assert!(prompt.coverage() > 0.0);
        assert!(prompt.magnitude() <= n * s.max_z * 7f64.sqrt() + 1e-9);
    }
    let scores = relief::evaluate(&e, &task, &ck).unwrap();
    assert!((0.0..=1.0).contains(&scores.accuracy) && (0.0..=1.0).contains(&scores.roc_auc));

    // The checkpoint reloads and infers the same on new graphs (to the last bits that
    // serde_json's float parsing may round).
    let dir = common::scratch("relief-checkpoint");
    let path = dir.join("policy.json");
    ck.save(&path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    let fresh = molecules(6, 99);
    let all: Vec<usize> = (0..6).collect();
    let a = relief::infer(&e, &fresh, &ck, &all).unwrap();
    let b = relief::infer(&e, &fresh, &back, &all).unwrap();
    assert_eq!(back.policy.theta.len(), ck.policy.theta.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.1.coverage(), y.1.coverage());
        for (p, q) in x.0.iter().zip(&y.0) {
            assert!(close(*p, *q, 1e-9), "{p} vs {q}");
        }
    }
}

#[test]
fn mutag_few_shot_runs_end_to_end() {
    let base = std::env::var_os("LATENTFLOW_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data"));
    let dir = base.join("graphs/MUTAG");
    if !dir.is_dir() {
        eprintln!("skipped: {} not found", dir.display());
        return;
    }
    let data = load(&Input::Tu(dir), &LoadOptions::default()).unwrap();
    assert_eq!(data.graphs.len(), 188);
    let task = graph_task(&data.graphs, 5, 60, 0).unwrap();
    assert_eq!(task.train.len(), 10);
    assert_eq!(task.test.len(), 60);
    assert!(task.train.iter().all(|g| !task.test.contains(g)));
    let e = embedder("gin-mutag");
    let ck = relief::train(&e, &task, &quick_settings(0), &mut |_| {}).unwrap();
    let r = relief::evaluate(&e, &task, &ck).unwrap();
    let p = relief::linear_probe(&e, &task, &quick_settings(0).head).unwrap();
    assert!(r.roc_auc.is_finite() && p.roc_auc.is_finite());
    assert!(r.coverage > 0.0 && r.coverage <= 1.0);
}
