//! Class-balanced reinforced active learning (`stages/src/graph/`: `state`, `pagerank`,
//! `policy`, `retrain`, `oracle`, `agent`, `gcbr`): the state features and PageRank against a
//! direct numpy computation, the actor and critic gradients against finite differences, the
//! restricted classifier step against the whole-graph GCN, labelling runs (seeded, within the
//! pool, the budget spent, baselines doing what they say), labelling with a person's answers
//! from files (the truth oracle's runs when the answers are true, resumed after a stop),
//! training that gives the same policy for any thread count and after a resume, and both
//! pipelines end to end.
//!
//! Tests on Cora and CiteSeer need the shared data (`../shared/data`, or
//! `LATENTFLOW_SHARED_DATA`); without it they say so and pass without checking anything.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use latentflow_stages::graph::agent::{
    count_std, imbalance_ratio, label, Agent, Checkpoint, EpisodeSplit, LabelOracle, LabelRun,
    LabelSettings, Problem, TrainSettings, Trainer, Variant,
};
use latentflow_stages::graph::gcn::{self, GcnInput, GcnParams};
use latentflow_stages::graph::load::{load, Input, LoadOptions, SplitMode};
use latentflow_stages::graph::oracle::FileOracle;
use latentflow_stages::graph::pagerank::{pagerank, pagerank_feature};
use latentflow_stages::graph::policy::{
    actor_loss_and_grad, critic_loss_and_grad, pool_softmax, ActorSample, PolicyNet,
};
use latentflow_stages::graph::retrain::{self, ClassifierSettings, Retrainer};
use latentflow_stages::graph::state::{node_state, StateInputs};
use latentflow_stages::graph::{gcn_adjacency, Csr, Graph, Rng};
use ndarray::{Array2, ArrayD};
use serde_json::Value as Json;

use common::{graphs_dir, latentflow, root, run_python, scratch, text, write_pipeline};

// ---------------------------------------------------------------------------------------------
// Helpers.

fn planetoid(dir: &Path, name: &str) -> Graph {
    let opts = LoadOptions {
        normalise_features: true,
        split: SplitMode::Standard,
        ..Default::default()
    };
    let mut d = load(
        &Input::Npz(dir.join(format!("{name}.planetoid.npz"))),
        &opts,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    d.graphs.remove(0)
}

fn write_npy<T: ndarray_npy::WritableElement>(path: &Path, a: ArrayD<T>) {
    let f = std::fs::File::create(path).unwrap();
    ndarray_npy::WriteNpyExt::write_npy(&a, f).unwrap();
}

/// A random undirected graph with `n` nodes, some of them isolated.
fn random_graph(n: usize, edges: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = Rng::new(seed);
    let mut e = Vec::new();
    for _ in 0..edges {
        let (s, t) = (rng.below(n - 3), rng.below(n - 3));
        if s != t {
            e.extend([(s, t), (t, s)]);
        }
    }
    e.sort_unstable();
    e.dedup();
    e
}

// ---------------------------------------------------------------------------------------------
// PageRank and the state against numpy.

/// numpy: PageRank as the solution of its linear system (dangling nodes spread uniformly).
const PAGERANK_EXACT: &str = r#"
import json, sys
import numpy as np
n, edges = json.load(open(sys.argv[1]))
A = np.zeros((n, n))
for s, t in edges:
    A[t, s] += 1.0
out = A.sum(axis=0)
M = np.where(out > 0, A / np.maximum(out, 1), 1.0 / n)
x = np.linalg.solve(np.eye(n) - 0.85 * M, np.full(n, 0.15 / n))
print(json.dumps(list(x)))
"#;

/// numpy: power iteration over an edge list, and the feature (divided by its maximum).
const PAGERANK_POWER: &str = r#"
import json, sys
import numpy as np
z = np.load(sys.argv[1])
n, src, dst = int(z["n"]), z["src"], z["dst"]
out = np.bincount(src, minlength=n).astype(float)
x = np.full(n, 1.0 / n)
for _ in range(1000):
    nxt = np.full(n, 0.15 / n + 0.85 * x[out == 0].sum() / n)
    np.add.at(nxt, dst, 0.85 * x[src] / out[src])
    done = np.abs(nxt - x).sum() < 1e-13
    x = nxt
    if done:
        break
print(json.dumps(list(x / x.max())))
"#;

#[test]
fn pagerank_matches_numpy() {
    let dir = scratch("gcbr-pagerank");
    // A small graph with isolated (dangling) nodes and a one-way edge, solved exactly.
    let n = 40;
    let mut edges = random_graph(n, 50, 3);
    edges.push((n - 3, 0));
    edges.sort_unstable();
    let path = dir.join("small.json");
    std::fs::write(&path, serde_json::to_string(&(n, &edges)).unwrap()).unwrap();
    let want: Vec<f64> =
        serde_json::from_value(run_python(PAGERANK_EXACT, &[path.to_str().unwrap()])).unwrap();
    let got = pagerank(n, &edges, 0.85, 1e-14, 10_000);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-12, "largest difference {worst}");

    let Some(graphs) = graphs_dir() else { return };
    let g = planetoid(&graphs, "cora");
    let npz = dir.join("cora-edges.npz");
    {
        let f = std::fs::File::create(&npz).unwrap();
        let mut w = ndarray_npy::NpzWriter::new(f);
        let src: Vec<i64> = g.edges.iter().map(|e| e.0 as i64).collect();
        let dst: Vec<i64> = g.edges.iter().map(|e| e.1 as i64).collect();
        w.add_array("n", &ndarray::arr0(g.num_nodes as i64))
            .unwrap();
        w.add_array("src", &ndarray::Array1::from(src)).unwrap();
        w.add_array("dst", &ndarray::Array1::from(dst)).unwrap();
        w.finish().unwrap();
    }
    let want: Vec<f64> =
        serde_json::from_value(run_python(PAGERANK_POWER, &[npz.to_str().unwrap()])).unwrap();
    let got = pagerank_feature(g.num_nodes, &g.edges);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-6, "largest difference {worst} on Cora");
}

/// numpy: the six state features from the classifier's outputs, the answers and PageRank.
const STATE_REFERENCE: &str = r#"
import json, sys
import numpy as np
d = sys.argv[1]
P = np.load(d + "/probs.npy").astype(np.float64)
E = np.load(d + "/emb.npy").astype(np.float64)
a = np.load(d + "/answers.npy")
pr = np.load(d + "/pagerank.npy").astype(np.float64)
cap = int(sys.argv[2])
n, C = P.shape
lab = a >= 0
counts = np.bincount(a[lab], minlength=C)
with np.errstate(divide="ignore", invalid="ignore"):
    ent = -np.where(P > 0, P * np.log(P), 0.0).sum(1) / np.log(C)
cd = np.where(lab, 1.0 / np.maximum(counts[np.where(lab, a, 0)], 1), P @ (1.0 / (counts + 1)))
L = E[lab]
dist = np.sqrt(((E[:, None, :] - L[None, :, :]) ** 2).sum(-1)).min(1)
dist = dist / dist.max()
over = counts > cap
mass = np.where(lab, over[np.where(lab, a, 0)].astype(float), P @ over.astype(float))
S = np.stack([ent, lab.astype(float), pr, cd, dist, mass], 1)
got = np.load(d + "/state.npy").astype(np.float64)
print(json.dumps({"max_abs": list(np.abs(S - got).max(0)), "over": int(over.sum()),
                  "labelled": int(lab.sum())}))
"#;

#[test]
fn state_features_match_numpy() {
    let Some(graphs) = graphs_dir() else { return };
    let dir = scratch("gcbr-state");
    let g = planetoid(&graphs, "cora");
    let p = Problem::new(&g).unwrap();
    // A classifier trained a little on 40 random nodes, whose answers the state reads.
    let mut rng = Rng::new(5);
    let mut nodes: Vec<usize> = (0..g.num_nodes).collect();
    rng.shuffle(&mut nodes);
    let picked = &nodes[..40];
    let mut answers = vec![-1i64; g.num_nodes];
    picked.iter().for_each(|&i| answers[i] = p.truth[i]);
    let mut clf = Retrainer::new(g.features.cols, 7, &ClassifierSettings::labelling(), 3);
    clf.fit(&p.input, &answers, picked, 30);
    let (probs, emb) = clf.predict(&p.input);
    let cap = 5;
    let state = node_state(&StateInputs {
        probs: &probs,
        embeddings: &emb,
        answers: &answers,
        pagerank: &p.pagerank,
        cap: Some(cap),
    });
    let five = node_state(&StateInputs {
        cap: None,
        probs: &probs,
        embeddings: &emb,
        answers: &answers,
        pagerank: &p.pagerank,
    });
    assert_eq!(five.ncols(), 5);
    assert_eq!(five, state.slice(ndarray::s![.., ..5]).to_owned());

    write_npy(&dir.join("probs.npy"), probs.into_dyn());
    write_npy(&dir.join("emb.npy"), emb.into_dyn());
    write_npy(
        &dir.join("answers.npy"),
        ndarray::Array1::from(answers).into_dyn(),
    );
    write_npy(
        &dir.join("pagerank.npy"),
        ndarray::Array1::from(p.pagerank.clone()).into_dyn(),
    );
    write_npy(&dir.join("state.npy"), state.into_dyn());
    let r = run_python(STATE_REFERENCE, &[dir.to_str().unwrap(), &cap.to_string()]);
    assert_eq!(r["labelled"], 40);
    assert!(
        r["over"].as_u64().unwrap() >= 1,
        "some class should exceed the cap: {r}"
    );
    let diffs: Vec<f64> = serde_json::from_value(r["max_abs"].clone()).unwrap();
    for (k, d) in diffs.iter().enumerate() {
        assert!(*d < 2e-5, "column {k} differs by {d}: {r}");
    }
}

// ---------------------------------------------------------------------------------------------
// Gradients.

fn small_policy_problem(features: usize) -> (Csr, Vec<Array2<f32>>, Vec<Vec<usize>>) {
    let n = 25;
    let adj = gcn_adjacency(n, &random_graph(n, 40, 8));
    let mut rng = Rng::new(12);
    let states: Vec<Array2<f32>> = (0..4)
        .map(|_| {
            Array2::from_shape_simple_fn((n, features), || {
                if rng.uniform() < 0.2 {
                    0.0
                } else {
                    rng.uniform()
                }
            })
        })
        .collect();
    let pools: Vec<Vec<usize>> = (0..4)
        .map(|k| (0..n).filter(|i| (i + k) % 3 != 0).collect())
        .collect();
    (adj, states, pools)
}

/// Central differences of `loss` at every weight, against `grad`; a coordinate whose one-sided
/// differences disagree sits on a ReLU kink and is skipped.
fn check_gradient(net: &PolicyNet, loss: &dyn Fn(&PolicyNet) -> f64, grad: &[f64], what: &str) {
    let h = 1e-6;
    let base = loss(net);
    let (mut worst, mut checked) = (0f64, 0);
    for (k, &an) in grad.iter().enumerate() {
        let mut plus = net.clone();
        plus.theta[k] += h;
        let mut minus = net.clone();
        minus.theta[k] -= h;
        let (lp, lm) = (loss(&plus), loss(&minus));
        if ((lp - base) / h - (base - lm) / h).abs() > 1e-4 * (1.0 + an.abs()) {
            continue;
        }
        let fd = (lp - lm) / (2.0 * h);
        worst = worst.max((fd - an).abs() / (1e-4 + an.abs()));
        checked += 1;
    }
    assert!(
        checked * 10 >= net.len() * 9,
        "{what}: only {checked} of {} checked",
        net.len()
    );
    assert!(worst < 1e-5, "{what}: largest relative error {worst}");
    assert!(
        grad.iter().any(|&g| g.abs() > 1e-6),
        "{what}: a zero gradient checks nothing"
    );
}

#[test]
fn a2c_gradients_match_finite_differences() {
    for features in [5, 6] {
        let (adj, states, pools) = small_policy_problem(features);
        let mut rng = Rng::new(features as u64);
        let actor = PolicyNet::new(features, [8, 8], &mut rng);
        let critic = PolicyNet::new(features, [8, 8], &mut rng);
        let samples: Vec<ActorSample> = states
            .iter()
            .zip(&pools)
            .enumerate()
            .map(|(k, (s, pool))| ActorSample {
                state: s,
                pool,
                action: pool[(3 * k + 1) % pool.len()],
                advantage: [1.3, -0.7, 0.4, -2.0][k],
            })
            .collect();
        let (_, g) = actor_loss_and_grad(&actor, &adj, &samples, 2);
        let loss = |net: &PolicyNet| actor_loss_and_grad(net, &adj, &samples, 2).0;
        check_gradient(&actor, &loss, &g, "actor");

        // The actor loss is −(1/B) Σ A log π(a|s), computed directly.
        let direct: f64 = samples
            .iter()
            .map(|s| {
                let f = actor.forward(&adj, s.state);
                let p = pool_softmax(&f.out, s.pool);
                let k = s.pool.iter().position(|&i| i == s.action).unwrap();
                -s.advantage * p[k].ln() / 2.0
            })
            .sum();
        assert!((direct - loss(&actor)).abs() < 1e-12);

        let pairs: Vec<(&Array2<f32>, f64)> = states.iter().zip([0.5, -1.0, 2.0, 0.1]).collect();
        let (_, g) = critic_loss_and_grad(&critic, &adj, &pairs);
        let loss = |net: &PolicyNet| critic_loss_and_grad(net, &adj, &pairs).0;
        check_gradient(&critic, &loss, &g, "critic");
    }
}

#[test]
fn restricted_classifier_step_equals_the_whole_graph_gcn_on_cora() {
    let Some(graphs) = graphs_dir() else { return };
    let g = planetoid(&graphs, "cora");
    let input = GcnInput::new(&g);
    let labels = g.labels.clone().unwrap();
    let mut rng = Rng::new(9);
    let p = GcnParams::init(g.features.cols, 64, 7, &mut rng);
    for size in [1, 35, 140] {
        let mut nodes: Vec<usize> = (0..g.num_nodes).collect();
        rng.shuffle(&mut nodes);
        let train = &nodes[..size];
        let (l0, g0) = gcn::loss_and_grad(&p, &input, &labels, train, 5e-4, None);
        let (l1, g1) = retrain::loss_and_grad(&p, &input, &labels, train, 5e-4, None);
        assert!(
            (l0 - l1).abs() < 1e-5 * l0.abs(),
            "{size} nodes: loss {l0} vs {l1}"
        );
        for (a, b) in g0.slices().iter().zip(g1.slices()) {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-4 * scale,
                "{size} nodes: gradient differs by {worst} (scale {scale})"
            );
        }
    }
    let mut whole = gcn::Gcn::new(g.features.cols, 7, &Default::default());
    whole.params = p.clone();
    let (pa, ha) = whole.predict(&input);
    let (pb, hb) = retrain::predict(&p, &input);
    assert!(pa.iter().zip(&pb).all(|(x, y)| (x - y).abs() < 1e-5));
    assert!(ha.iter().zip(&hb).all(|(x, y)| (x - y).abs() < 1e-4));
}

// ---------------------------------------------------------------------------------------------
// Labelling.

#[test]
fn labelling_runs_are_seeded_and_spend_the_budget() {
    let Some(graphs) = graphs_dir() else { return };
    let g = planetoid(&graphs, "cora");
    let p = Problem::new(&g).unwrap();
    let split = EpisodeSplit::standard(&p).unwrap();
    assert_eq!(
        (split.val.len(), split.test.len(), split.pool.len()),
        (500, 1000, 1208)
    );
    let settings = LabelSettings {
        budget: 30,
        ..Default::default()
    };
    let mut rng = Rng::new(1);
    let actor = PolicyNet::new(6, [8, 8], &mut rng);
    let agents = [
        Agent::Random,
        Agent::Entropy,
        Agent::PageRank,
        Agent::Policy {
            actor: &actor,
            sample: false,
        },
    ];
    for agent in &agents {
        let a = label(&p, &split, agent, &settings, 4).unwrap();
        let b = label(&p, &split, agent, &settings, 4).unwrap();
        assert_eq!(a.picks, b.picks, "{agent:?}: same seed, same picks");
        assert_eq!(a.curve, b.curve);
        assert_eq!(a.picks.len(), 30);
        let mut unique = a.picks.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 30, "{agent:?} picked a node twice");
        assert!(a.picks.iter().all(|i| split.pool.binary_search(i).is_ok()));
        assert_eq!(a.counts.iter().sum::<usize>(), 30);
        assert_eq!((a.queries, a.cost), (30, 30.0));
        assert_eq!(a.curve.len(), 30);
        assert!((a.imbalance - imbalance_ratio(&a.counts)).abs() < 1e-12);
        assert!((a.label_std - count_std(&a.counts)).abs() < 1e-12);
        if !matches!(agent, Agent::Policy { .. }) {
            // An untrained policy may pick one class only; the baselines do not.
            assert!(a.micro_f1 > 0.4 && a.macro_f1 > 0.3, "{agent:?}: {a:?}");
        }
    }
    // The PageRank baseline takes the pool's most central nodes, in order.
    let pr = label(&p, &split, &Agent::PageRank, &settings, 0).unwrap();
    let mut by_rank = split.pool.clone();
    by_rank.sort_by(|&a, &b| p.pagerank[b].total_cmp(&p.pagerank[a]).then(a.cmp(&b)));
    assert_eq!(pr.picks, by_rank[..30].to_vec());
    // Other seeds give the random agent other nodes.
    let r0 = label(&p, &split, &Agent::Random, &settings, 0).unwrap();
    let r1 = label(&p, &split, &Agent::Random, &settings, 1).unwrap();
    assert_ne!(r0.picks, r1.picks);
    // A noisy oracle still answers every query, with a valid class.
    let noisy = LabelSettings {
        oracle_noise: 0.5,
        oracle_cost: 2.5,
        ..settings
    };
    let n = label(&p, &split, &Agent::Random, &noisy, 0).unwrap();
    assert_eq!(
        n.picks, r0.picks,
        "noise changes answers, not the random picks"
    );
    assert_eq!((n.queries, n.cost), (30, 75.0));
    assert_ne!(n.counts, r0.counts);
}

// ---------------------------------------------------------------------------------------------
// Labelling with answers from files.

/// The nodes of a file oracle's queries, in order.
fn queried(o: &FileOracle) -> Vec<usize> {
    std::fs::read_to_string(o.queries_file())
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let q: Json = serde_json::from_str(l).unwrap();
            q["node"].as_u64().unwrap() as usize
        })
        .collect()
}

/// Answers every query of `o` not answered yet with the true label, as a careful person
/// would; the number of answers written.
fn answer_from_truth(o: &FileOracle, truth: &[i64], done: &mut HashSet<usize>) -> usize {
    let mut lines = String::new();
    for node in queried(o) {
        if done.insert(node) {
            lines.push_str(&format!("{node},{}\n", truth[node]));
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(o.answers_file())
        .unwrap();
    std::io::Write::write_all(&mut f, lines.as_bytes()).unwrap();
    lines.lines().count()
}

/// Everything of a labelling run but its wall time.
fn outcome(r: &LabelRun) -> Json {
    let mut j = serde_json::to_value(r).unwrap();
    j.as_object_mut().unwrap().remove("seconds");
    j
}

#[test]
fn a_file_oracle_answered_with_the_truth_repeats_the_truth_runs() {
    let Some(graphs) = graphs_dir() else { return };
    let g = planetoid(&graphs, "cora");
    let p = Problem::new(&g).unwrap();
    let split = EpisodeSplit::standard(&p).unwrap();
    let truth = LabelSettings {
        budget: 12,
        oracle_cost: 0.5,
        ..Default::default()
    };
    let dir = scratch("gcbr-file-oracle");
    let oracle = FileOracle::open(&dir, p.classes)
        .unwrap()
        .with_timeout(Duration::from_secs(120))
        .with_poll(Duration::from_millis(5))
        .with_cost(0.5);
    let by_file = LabelSettings {
        oracle: LabelOracle::File(oracle.clone()),
        ..truth.clone()
    };

    // A person answering every query as it appears, on a thread of their own.
    let stop = AtomicBool::new(false);
    let (expected, got) = std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut done = HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                answer_from_truth(&oracle, &p.truth, &mut done);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for agent in [Agent::Entropy, Agent::Random] {
            expected.push(label(&p, &split, &agent, &truth, 7).unwrap());
            got.push(label(&p, &split, &agent, &by_file, 7));
        }
        stop.store(true, Ordering::Relaxed);
        (expected, got)
    });
    let mut picked = HashSet::new();
    for (e, g) in expected.iter().zip(got) {
        let g = g.unwrap();
        assert_eq!(outcome(e), outcome(&g), "same answers, same run");
        assert_eq!((g.queries, g.cost), (12, 6.0));
        picked.extend(g.picks);
    }
    // Each node was asked once, though both agents needed some of them.
    let asked = queried(&oracle);
    assert_eq!(asked.len(), picked.len());
    assert_eq!(asked.iter().copied().collect::<HashSet<_>>(), picked);
}

#[test]
fn a_labelling_run_stopped_for_an_answer_resumes_when_rerun() {
    let Some(graphs) = graphs_dir() else { return };
    let g = planetoid(&graphs, "cora");
    let p = Problem::new(&g).unwrap();
    let split = EpisodeSplit::standard(&p).unwrap();
    let truth = LabelSettings {
        budget: 8,
        ..Default::default()
    };
    let expected = label(&p, &split, &Agent::Entropy, &truth, 2).unwrap();

    let dir = scratch("gcbr-file-oracle-resume");
    let mut done = HashSet::new();
    let mut attempts = 0;
    let run = loop {
        attempts += 1;
        assert!(attempts <= 20, "the runs do not get further");
        // Each attempt opens the folder afresh, as a rerun of the pipeline does.
        let oracle = FileOracle::open(&dir, p.classes)
            .unwrap()
            .with_timeout(Duration::ZERO);
        let settings = LabelSettings {
            oracle: LabelOracle::File(oracle.clone()),
            ..truth.clone()
        };
        match label(&p, &split, &Agent::Entropy, &settings, 2) {
            Ok(run) => break run,
            Err(e) => {
                // The run stopped at the node asked last, and says where to answer it.
                let node = *queried(&oracle).last().unwrap();
                let file = oracle.answers_file().display().to_string();
                assert!(
                    e.contains(&format!("node {node} has no label")) && e.contains(&file),
                    "{e}"
                );
                assert!(e.contains("run again"), "{e}");
                assert_eq!(answer_from_truth(&oracle, &p.truth, &mut done), 1);
            }
        }
    };
    // One stop per pick, then the whole run, which is the truth oracle's.
    assert_eq!(attempts, 9);
    assert_eq!(outcome(&run), outcome(&expected));
    assert_eq!(done.len(), 8);
}

// ---------------------------------------------------------------------------------------------
// Training.

fn tiny_training(variant: Variant, episodes: usize) -> TrainSettings {
    TrainSettings {
        variant,
        episodes,
        parallel: 3,
        budget: 6,
        update_every: 4,
        lr_milestones: vec![1],
        classifier: ClassifierSettings {
            hidden: 16,
            final_epochs: 5,
            ..ClassifierSettings::training()
        },
        val_size: 200,
        test_size: 300,
        seed: 7,
        ..Default::default()
    }
}

/// The learned state of a checkpoint (everything but the wall times).
fn learned(c: &Checkpoint) -> Json {
    let mut j = serde_json::to_value(c).unwrap();
    for r in j["history"].as_array_mut().unwrap() {
        r["seconds"] = Json::Null;
    }
    j
}

/// Whether two JSON trees agree, numbers to a relative `tol` (serde_json's default parser may
/// read a number back one unit in the last place off).
fn same(a: &Json, b: &Json, tol: f64) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= tol * x.abs().max(y.abs()).max(1e-300)
        }
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y, tol))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same(v, w, tol)))
        }
        _ => a == b,
    }
}

#[test]
fn training_is_thread_invariant_and_resumes_exactly() {
    let Some(graphs) = graphs_dir() else { return };
    let g = planetoid(&graphs, "cora");
    let p = Problem::new(&g).unwrap();
    let dir = scratch("gcbr-resume");
    for variant in [Variant::Gcbr, Variant::GcbrPlusPlus] {
        let mut one = Trainer::new(tiny_training(variant, 2));
        one.round(&p, 1).unwrap();
        one.round(&p, 1).unwrap();
        assert_eq!(one.episodes_done(), 2);
        assert_eq!(
            one.checkpoint.history[1].lr,
            0.001 * 0.3,
            "decayed after round 1"
        );

        let mut two = Trainer::new(tiny_training(variant, 1));
        two.round(&p, 2).unwrap();
        let path = dir.join(format!("{}.json", variant.name()));
        two.checkpoint.save(&path).unwrap();
        let loaded = Checkpoint::load(&path).unwrap();
        assert!(
            same(&learned(&loaded), &learned(&two.checkpoint), 1e-15),
            "a policy file round-trips"
        );
        let mut resumed = Trainer::resume(loaded, tiny_training(variant, 2)).unwrap();
        resumed.round(&p, 3).unwrap();
        // Threads 1 on two rounds, against threads 2, a file, then threads 3.
        assert!(
            same(
                &learned(&resumed.checkpoint),
                &learned(&one.checkpoint),
                1e-9
            ),
            "{variant:?}: the resumed training went elsewhere"
        );
        assert_ne!(
            one.checkpoint.actor,
            Trainer::new(tiny_training(variant, 2)).checkpoint.actor
        );
        assert_eq!(one.checkpoint.actor.features, variant.features());

        let other = if variant == Variant::Gcbr {
            Variant::GcbrPlusPlus
        } else {
            Variant::Gcbr
        };
        assert!(Trainer::resume(one.checkpoint.clone(), tiny_training(other, 3)).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Pipelines.

/// A shipped pipeline pointed at the data, with some values replaced.
fn shipped(name: &str, graphs: &Path, replace: &[(&str, &str)]) -> String {
    let mut yaml = std::fs::read_to_string(root().join("pipelines").join(name)).unwrap();
    assert!(
        yaml.contains("../../shared/data/graphs/"),
        "{name} reads the shared data"
    );
    yaml = yaml.replace(
        "../../shared/data/graphs",
        graphs.to_str().expect("a UTF-8 path"),
    );
    yaml = yaml.replace("../models/", &format!("{}/models/", root().display()));
    for (from, to) in replace {
        assert!(yaml.contains(from), "{name} has `{from}`");
        yaml = yaml.replace(from, to);
    }
    yaml
}

fn json_file(path: &Path) -> Json {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&s).unwrap()
}

#[test]
fn label_pipeline_runs_the_shipped_policies_on_citeseer() {
    let Some(graphs) = graphs_dir() else { return };
    let dir = scratch("gcbr-label");
    let yaml = shipped(
        "gcbr-label.yaml",
        &graphs,
        &[("runs: 10", "runs: 1"), ("budget: 120", "budget: 24")],
    );
    let p = write_pipeline(&dir, "gcbr-label.yaml", &yaml);
    let o = latentflow(&["validate", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let out = dir.join("out");
    let o = latentflow(&["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    let m = json_file(&out.join("label/metrics.json"));
    assert_eq!(m["budget"], 24);
    assert_eq!(
        (m["val"].as_u64(), m["test"].as_u64()),
        (Some(500), Some(1000))
    );
    let agents = m["agents"].as_object().unwrap();
    let names: Vec<&str> = agents.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["gcbr", "gcbr_pp", "random", "entropy", "pagerank"]);
    for (name, a) in agents {
        let counts: Vec<f64> = serde_json::from_value(a["counts_mean"].clone()).unwrap();
        assert_eq!(counts.len(), 6, "{name}");
        assert!((counts.iter().sum::<f64>() - 24.0).abs() < 1e-9, "{name}");
        assert!(a["macro_f1"]["mean"].as_f64().unwrap() > 0.1, "{name}: {a}");
    }
    assert_eq!(agents["gcbr_pp"]["variant"], "gcbr++");
    assert!(out.join("label/curves.png").exists() && out.join("label/curves.json").exists());
    let summary = json_file(&out.join("summary.json"));
    let f = |k: &str| summary["fields"][k]["mean"].as_f64().unwrap();
    assert_eq!(
        f("gcbr_macro_f1"),
        agents["gcbr"]["macro_f1"]["mean"].as_f64().unwrap()
    );
}

#[test]
fn label_pipeline_with_a_person_answering_through_files() {
    let Some(graphs) = graphs_dir() else { return };
    let citeseer = planetoid(&graphs, "citeseer");
    let truth = citeseer.labels.clone().unwrap();
    let dir = scratch("gcbr-label-file");
    let small = [
        ("runs: 10", "runs: 2"),
        ("budget: 120", "budget: 4"),
        ("final_epochs: 100", "final_epochs: 10"),
        (
            "agents: [gcbr, gcbr_pp, random, entropy, pagerank]",
            "agents: [entropy, random]",
        ),
    ];
    let yaml = shipped("gcbr-label.yaml", &graphs, &small);
    // Only the two agents' fields for the summary.
    let cut = yaml.find("\nsinks:").unwrap();
    let sink = "\nsinks:\n  - name: summary\n    kind: summary\n    params: {path: summary.json, \
                fields: [entropy_micro_f1, random_micro_f1]}\n";
    let yaml = format!("{}{sink}", &yaml[..cut]);
    let by_file = yaml.replace(
        "      mode: label\n",
        "      mode: label\n      oracle: file\n      oracle_timeout_s: 0\n",
    );
    let p = write_pipeline(&dir, "truth.yaml", &yaml);
    let out = dir.join("truth");
    let o = latentflow(&["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let expected = json_file(&out.join("label/metrics.json"));

    let p = write_pipeline(&dir, "file.yaml", &by_file);
    let o = latentflow(&["validate", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let out = dir.join("file");
    let folder = out.join("label/oracle");
    let mut answered = HashSet::new();
    let mut attempts = 0;
    let metrics = loop {
        attempts += 1;
        assert!(attempts <= 10, "the runs do not get further");
        let o = latentflow(&["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        if o.status.success() {
            break json_file(&out.join("label/metrics.json"));
        }
        // The record failed, saying which node waits and where to answer.
        assert!(text(&o).contains("1 failed"), "{}", text(&o));
        let errors = std::fs::read_to_string(out.join("errors.jsonl")).unwrap();
        let answers = folder.join("answers.csv").display().to_string();
        assert!(
            errors.contains("has no label yet") && errors.contains(&answers),
            "{errors}"
        );
        // The person answers the batch of queries: each run's next node.
        let queries = std::fs::read_to_string(folder.join("queries.jsonl")).unwrap();
        let mut lines = String::from("# from the data set\n");
        for q in queries.lines() {
            let q: Json = serde_json::from_str(q).unwrap();
            let node = q["node"].as_u64().unwrap() as usize;
            assert!(q["degree"].is_u64() && q["predicted"].is_u64(), "{q}");
            if answered.insert(node) {
                lines.push_str(&format!("{node},{}\n", truth[node]));
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(folder.join("answers.csv"))
            .unwrap();
        std::io::Write::write_all(&mut f, lines.as_bytes()).unwrap();
    };
    assert!(attempts > 1 && attempts <= 5, "{attempts} attempts");
    assert_eq!(metrics["oracle_dir"], folder.display().to_string());
    for agent in ["entropy", "random"] {
        let (e, m) = (&expected["agents"][agent], &metrics["agents"][agent]);
        for (a, b) in e["runs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(m["runs"].as_array().unwrap())
        {
            assert_eq!(a["picks"], b["picks"], "{agent}");
            assert_eq!(a["counts"], b["counts"], "{agent}");
            assert_eq!(a["macro_f1"], b["macro_f1"], "{agent}");
        }
        assert_eq!(e["micro_f1"], m["micro_f1"], "{agent}");
    }
    assert!(answered.len() <= 4 * 4, "{answered:?}");
}

#[test]
fn train_pipeline_checkpoints_and_resumes() {
    let Some(graphs) = graphs_dir() else { return };
    let dir = scratch("gcbr-train");
    let small = [
        ("episodes: 500", "episodes: 2"),
        ("parallel: 5", "parallel: 2"),
        ("budget: 35 ", "budget: 5 "),
        ("final_epochs: 35", "final_epochs: 3"),
        ("checkpoint_every: 100", "checkpoint_every: 1"),
        ("validate_every: 25 ", "validate_every: 1 "),
        ("validate_budget: 140", "validate_budget: 5"),
    ];
    let yaml = shipped("gcbr-train.yaml", &graphs, &small);
    // The first entry (GCBR) is enough here: drop GCBR++ and its sinks.
    let cut = yaml.find("  - name: gcbr_pp").unwrap();
    let sink =
        "sinks:\n  - {name: curves, kind: curve, params: {fields: [gcbr_episode_macro_f1]}}\n";
    let yaml = format!("{}{sink}", &yaml[..cut]);
    let p = write_pipeline(&dir, "train.yaml", &yaml);
    let out = dir.join("out");
    let o = latentflow(&["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let first = Checkpoint::load(&out.join("gcbr/policy-000001.json")).unwrap();
    let last = Checkpoint::load(&out.join("gcbr/policy.json")).unwrap();
    assert_eq!((first.episodes_done, last.episodes_done), (1, 2));
    assert_eq!(last.settings.parallel, 2);
    let training = json_file(&out.join("gcbr/training.json"));
    assert_eq!(training["rounds"].as_array().unwrap().len(), 2);
    // Validated after each round; the best of the two is policy-best.json.
    let validations = last.validations.clone();
    assert_eq!(validations.len(), 2);
    let best = Checkpoint::load(&out.join("gcbr/policy-best.json")).unwrap();
    let top = if validations[1].score >= validations[0].score {
        1
    } else {
        0
    };
    assert_eq!(best.episodes_done, validations[top].episode);
    assert_eq!(training["best"]["episode"], validations[top].episode);
    for v in &validations {
        assert!((0.0..=1.0).contains(&v.val_macro_f1) && (0.0..=1.0).contains(&v.imbalance));
        assert!((v.score - 0.5 * v.val_macro_f1 - 0.5 * v.imbalance).abs() < 1e-12);
    }
    assert!(out.join("gcbr/training.png").exists() && out.join("curve.png").exists());

    // Going on from the first checkpoint gives the same second round.
    let resumed = yaml.replace(
        "      mode: train\n",
        &format!(
            "      mode: train\n      resume: {}\n",
            out.join("gcbr/policy-000001.json").display()
        ),
    );
    let p = write_pipeline(&dir, "resume.yaml", &resumed);
    let out2 = dir.join("out2");
    let o = latentflow(&["run", p.to_str().unwrap(), "--out", out2.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let again = Checkpoint::load(&out2.join("gcbr/policy.json")).unwrap();
    assert!(same(&learned(&again), &learned(&last), 1e-9));
}

#[test]
fn validation_names_unknown_agents_and_broken_policies() {
    let dir = scratch("gcbr-validate");
    std::fs::write(dir.join("broken.json"), "{\"format\": \"something else\"}").unwrap();
    let yaml = |agents: &str, policy: &str| {
        [
            "name: v",
            "sources:",
            "  - {name: g, kind: synthetic, params: {count: 1, shape: [3, 2]}}",
            "stages:",
            "  - name: label",
            "    kind: gcbr",
            &format!("    params: {{agents: {agents}, policies: {{mine: {policy}}}}}"),
            "sinks:",
            "  - {name: out, kind: jsonl, params: {fields: [x]}}",
            "",
        ]
        .join("\n")
    };
    let p = write_pipeline(&dir, "a.yaml", &yaml("[mine, randon]", "broken.json"));
    let o = latentflow(&["validate", "--no-models", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("no agent `randon`") && t.contains("random"),
        "{t}"
    );

    let p = write_pipeline(&dir, "b.yaml", &yaml("[mine]", "broken.json"));
    let o = latentflow(&["validate", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("broken.json") && t.contains("not a GCBR policy file"),
        "{t}"
    );
}

#[test]
fn validation_explains_the_oracle_parameters() {
    let dir = scratch("gcbr-validate-oracle");
    let yaml = |params: &str| {
        [
            "name: v",
            "sources:",
            "  - {name: g, kind: synthetic, params: {count: 1, shape: [3, 2]}}",
            "stages:",
            "  - name: label",
            "    kind: gcbr",
            &format!("    params: {{{params}}}"),
            "sinks:",
            "  - {name: out, kind: jsonl, params: {fields: [x]}}",
            "",
        ]
        .join("\n")
    };
    let cases = [
        (
            "agents: [random], oracle_dir: answers",
            "`oracle_dir` is for oracle: file",
        ),
        (
            "agents: [random], oracle_timeout_s: 10",
            "`oracle_timeout_s` is for oracle: file",
        ),
        (
            "mode: train, oracle: file",
            "the file oracle is for mode: label",
        ),
        (
            "agents: [random], oracle: file, oracle_noise: 0.1",
            "`oracle_noise` is for oracle: truth",
        ),
        (
            "agents: [random], oracle: file, oracle_poll_ms: 0",
            "`oracle_poll_ms` must be at least 1",
        ),
        (
            "agents: [random], oracle: file, oracle_timeout_s: -1",
            "`oracle_timeout_s` must lie in",
        ),
        ("agents: [random], oracle: person", "person"),
    ];
    for (i, (params, expected)) in cases.iter().enumerate() {
        let p = write_pipeline(&dir, &format!("{i}.yaml"), &yaml(params));
        let o = latentflow(&["validate", "--no-models", p.to_str().unwrap()]);
        assert!(!o.status.success(), "{params}");
        let t = text(&o);
        assert!(t.contains(expected), "{params}: {t}");
    }
}
