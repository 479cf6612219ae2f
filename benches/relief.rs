//! Throughput of RELIEF's two halves: policy steps per second (the hybrid actor and critic on
//! one state, the H-PPO gradient of a minibatch of 128 transitions) and prompted graphs per
//! second through the frozen GNN (`models/gnn-cora-edgepred` on 2-hop subgraphs of Cora of at
//! most 30 nodes, each prompted on a third of its nodes; batched as disjoint unions against
//! one call per graph), and whole RELIEF training rounds per second.
//!
//! Run with `cargo bench --bench relief` (`-- --quick` for a run of seconds). Needs
//! `../shared/data/graphs/cora.planetoid.npz` (or `LATENTFLOW_SHARED_DATA`); says so and exits
//! successfully without it. Prints a table and one JSON line.
//!
//! Each figure is the best of 3 runs after a warm-up (1 with `--quick`); ONNX Runtime runs on
//! the CPU with one intra-op thread, as the `relief` stage runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use latentflow_engine::inference::Device;
use latentflow_engine::runtime;
use latentflow_stages::graph::embed::{EmbedOptions, GnnEmbedder};
use latentflow_stages::graph::load::{load, Input, LoadOptions, SplitMode};
use latentflow_stages::graph::relief::{self, embed, node_task, PromptState, ReliefSettings};
use latentflow_stages::graph::relief_baselines::prompt_basis;
use latentflow_stages::graph::relief_policy::{
    HybridPolicy, PolicyShape, PpoCoefficients, Transition,
};
use latentflow_stages::graph::Rng;
use serde_json::json;

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut last = f();
    for _ in 0..reps {
        let t = Instant::now();
        last = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, last)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let quick = std::env::args().any(|a| a == "--quick");
    runtime::ensure_runtime().map_err(|e| e.to_string())?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = std::env::var_os("LATENTFLOW_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data"))
        .join("graphs/cora.planetoid.npz");
    if !data.exists() {
        eprintln!("skipped: {} not found", data.display());
        return Ok(());
    }
    let reps = if quick { 1 } else { 3 };
    let mut figures = serde_json::Map::new();
    let mut lines = Vec::new();

    // The policy alone: D = 128, hidden 32, prompts of 100, states of 30 nodes.
    let shape = PolicyShape {
        embed: 128,
        hidden: 32,
        prompt: 100,
    };
    let mut rng = Rng::new(1);
    let policy = HybridPolicy::new(shape, 0.05, &mut rng);
    let states: Vec<Vec<f32>> = (0..64)
        .map(|_| (0..30 * 128).map(|_| rng.uniform() - 0.5).collect())
        .collect();
    let steps = if quick { 200 } else { 2000 };
    let (t, _) = best_of(reps, || {
        let mut r = Rng::new(2);
        for k in 0..steps {
            std::hint::black_box(policy.act(&states[k % 64], 30, -1.0, false, &mut r));
        }
    });
    let rate = steps as f64 / t;
    figures.insert("policy_steps_per_s".into(), json!(rate));
    lines.push(("policy steps (act on a 30-node state)", rate, "steps/s"));

    let mut r = Rng::new(3);
    let batch: Vec<Transition> = (0..128)
        .map(|k| {
            let a = policy.act(&states[k % 64], 30, -1.0, false, &mut r);
            Transition {
                state: states[k % 64].clone(),
                n: 30,
                node: a.node,
                increment: a.increment,
                log_prob_node: a.log_prob_node,
                log_prob_increment: a.log_prob_increment,
                log_std: -1.0,
                advantage: r.uniform() as f64 - 0.5,
                ret: r.uniform() as f64,
            }
        })
        .collect();
    let refs: Vec<&Transition> = batch.iter().collect();
    let (t, _) = best_of(reps, || {
        let mut grad = vec![0.0; policy.theta.len()];
        policy.ppo_loss(&refs, &PpoCoefficients::default(), Some(&mut grad))
    });
    let rate = 128.0 / t;
    figures.insert("ppo_transitions_per_s".into(), json!(rate));
    lines.push((
        "H-PPO loss + gradient (minibatch of 128)",
        rate,
        "transitions/s",
    ));

    // Prompted subgraphs through the GNN.
    let opts = LoadOptions {
        split: SplitMode::Standard,
        ..Default::default()
    };
    let cora = load(&Input::Npz(data), &opts).map_err(|e| e.to_string())?;
    let model = root.join("models/gnn-cora-edgepred");
    let basis = prompt_basis(&model)?.map(Arc::new);
    let task = node_task(&cora.graphs[0], 10, 2, 30, 256, 0, basis)?;
    let graphs: Vec<usize> = task.test.clone();
    let k = task.prompt_dim();
    let prompts: Vec<PromptState> = graphs
        .iter()
        .map(|&g| {
            let n = task.graphs[g].num_nodes();
            let mut p = PromptState::zero(n, k);
            for v in (0..n).step_by(3) {
                let inc: Vec<f64> = (0..k).map(|_| 0.1 * (rng.uniform() as f64 - 0.5)).collect();
                p.add(&task, v, &inc);
            }
            p
        })
        .collect();
    let nodes: usize = graphs.iter().map(|&g| task.graphs[g].num_nodes()).sum();
    for max_nodes in [1024usize, 4096] {
        let e = GnnEmbedder::open(
            &model,
            &EmbedOptions {
                device: Device::Cpu,
                threads: Some(1),
                max_nodes,
            },
        )?;
        let items: Vec<(usize, Option<&PromptState>)> = graphs
            .iter()
            .zip(&prompts)
            .map(|(&g, p)| (g, Some(p)))
            .collect();
        let (t, _) = best_of(reps, || embed(&e, &task, &items).expect("embed"));
        let rate = graphs.len() as f64 / t;
        figures.insert(
            format!("prompted_graphs_per_s_union_{max_nodes}"),
            json!(rate),
        );
        lines.push((
            if max_nodes == 1024 {
                "prompted subgraphs, unions of <= 1024 nodes"
            } else {
                "prompted subgraphs, unions of <= 4096 nodes"
            },
            rate,
            "graphs/s",
        ));
    }
    let e = GnnEmbedder::open(
        &model,
        &EmbedOptions {
            device: Device::Cpu,
            threads: Some(1),
            max_nodes: 1024,
        },
    )?;
    let few = 32.min(graphs.len());
    let (t, _) = best_of(reps, || {
        for (&g, p) in graphs.iter().zip(&prompts).take(few) {
            embed(&e, &task, &[(g, Some(p))]).expect("embed");
        }
    });
    let rate = few as f64 / t;
    figures.insert("prompted_graphs_per_s_one_call_each".into(), json!(rate));
    lines.push(("prompted subgraphs, one call each", rate, "graphs/s"));

    // Whole training rounds (16 episodes of up to 30 steps, one H-PPO update, head epochs).
    let rounds = if quick { 2 } else { 5 };
    let settings = ReliefSettings {
        rounds,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut per_round = Vec::new();
    relief::train(&e, &task, &settings, &mut |l| per_round.push(l.seconds))?;
    let total = t0.elapsed().as_secs_f64();
    let best = per_round.iter().copied().fold(f64::INFINITY, f64::min);
    figures.insert("round_seconds_best".into(), json!(best));
    figures.insert("train_seconds".into(), json!(total));
    lines.push((
        "training round (16 episodes, 1 update)",
        1.0 / best,
        "rounds/s",
    ));

    println!(
        "RELIEF on Cora 2-hop subgraphs (<= 30 nodes, {} graphs, {nodes} nodes), \
         gnn-cora-edgepred, CPU, best of {reps}:",
        graphs.len()
    );
    for (what, rate, unit) in lines {
        println!("  {what:<48} {rate:>10.1} {unit}");
    }
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}
