//! Throughput of the `gnn-embed` machinery on Cora with `models/gnn-cora-edgepred` (2 GCN
//! layers, 1433 → 128): whole graphs per second, k-hop subgraphs per second batched as
//! disjoint unions (against one call per subgraph), and prompted graphs per second — RELIEF's
//! "prompted graphs per second through the GNN" — both for prompted copies of the whole graph
//! and for prompted 2-hop subgraphs (RELIEF's node-level tasks), batched against one call each.
//! Also one incremental update against a full recomputation.
//!
//! Run with `cargo bench --bench embed` (`-- --quick` for a run of seconds). Needs
//! `../shared/data/graphs/cora.planetoid.npz` (or `LATENTFLOW_SHARED_DATA`); says so and exits
//! successfully without it. Prints a table and one JSON line.
//!
//! Decisions:
//! - A plain binary (no criterion): the figures are seconds of whole batches.
//! - Each figure is the best of 3 runs after a warm-up (1 with `--quick`), the least disturbed
//!   one on a shared machine. ONNX Runtime uses its default threads, on the CPU.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use latentflow_engine::inference::Device;
use latentflow_engine::runtime;
use latentflow_stages::graph::embed::{EmbedOptions, GnnEmbedder, GnnGraph, Prompt};
use latentflow_stages::graph::embed_incremental::{GraphDelta, IncrementalEmbedder};
use latentflow_stages::graph::load::{load, Input, LoadOptions};
use latentflow_stages::graph::Rng;
use ndarray::Array2;
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

/// A dense prompt on a random `share` of the nodes, values in [-0.1, 0.1).
fn prompt(rng: &mut Rng, nodes: usize, width: usize, share: f32) -> Array2<f32> {
    let mut p = Array2::zeros((nodes, width));
    for mut row in p.rows_mut() {
        if rng.uniform() < share {
            row.iter_mut()
                .for_each(|v| *v = 0.2 * (rng.uniform() - 0.5));
        }
    }
    p
}

fn main() -> ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    if let Err(e) = runtime::ensure_runtime() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = std::env::var_os("LATENTFLOW_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data"))
        .join("graphs/cora.planetoid.npz");
    if !data.is_file() {
        eprintln!("skipped: {} not found", data.display());
        return ExitCode::SUCCESS;
    }
    match run(&root, &data, quick) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(root: &std::path::Path, data: &std::path::Path, quick: bool) -> Result<(), String> {
    let reps = if quick { 1 } else { 3 };
    let mut d = load(&Input::Npz(data.to_path_buf()), &LoadOptions::default())
        .map_err(|e| e.to_string())?;
    let cora = GnnGraph::from_graph(&d.graphs.remove(0));
    let (n, width) = cora.x().dim();
    let open = |max_nodes: usize| {
        GnnEmbedder::open(
            root.join("models/gnn-cora-edgepred"),
            &EmbedOptions {
                device: Device::Cpu,
                threads: None,
                max_nodes,
            },
        )
    };
    // The default call size (1024 nodes).
    let batched = open(EmbedOptions::default().max_nodes)?;
    let mut rows: Vec<(String, f64, String)> = Vec::new();
    let mut figures = serde_json::Map::new();

    // Whole graph, one call.
    let (t, _) = best_of(reps, || batched.embed(&cora));
    rows.push(("whole Cora, one call".into(), 1.0 / t, "graphs/s".into()));
    figures.insert("whole_graphs_per_s".into(), json!(1.0 / t));

    // k-hop subgraphs of every node (200 random ones with --quick), batched as disjoint unions.
    let mut rng = Rng::new(1);
    let targets_n = if quick { 200 } else { n };
    let targets: Vec<usize> = if quick {
        (0..targets_n).map(|_| rng.below(n)).collect()
    } else {
        (0..n).collect()
    };
    for hops in [2usize, 3] {
        let (t, sub) = best_of(reps, || {
            batched.embed_subgraphs(&cora, &targets, hops, None, None)
        });
        let sub = sub?;
        let mean = sub.sizes.iter().sum::<usize>() as f64 / sub.sizes.len() as f64;
        rows.push((
            format!("{hops}-hop subgraphs, batched (mean {mean:.0} nodes)"),
            targets.len() as f64 / t,
            "subgraphs/s".into(),
        ));
        figures.insert(
            format!("subgraphs{hops}_batched_per_s"),
            json!(targets.len() as f64 / t),
        );
    }
    // The same 2-hop subgraphs at other call sizes: ONNX Runtime's CPU kernels for this
    // package (ScatterElements with an [edges, width] index) slow down per edge on large calls.
    let single = open(1)?;
    let few: Vec<usize> = targets
        .iter()
        .copied()
        .take(if quick { 100 } else { 500 })
        .collect();
    for max_nodes in [1usize, 256, 1024, 4096, 16384] {
        let e = if max_nodes == 1 {
            single.clone()
        } else {
            open(max_nodes)?
        };
        let (t, _) = best_of(reps, || e.embed_subgraphs(&cora, &few, 2, None, None));
        let what = if max_nodes == 1 {
            "2-hop subgraphs, one call each".to_string()
        } else {
            format!("2-hop subgraphs, calls of up to {max_nodes} nodes")
        };
        rows.push((what, few.len() as f64 / t, "subgraphs/s".into()));
        figures.insert(
            format!("subgraphs2_max{max_nodes}_per_s"),
            json!(few.len() as f64 / t),
        );
    }

    // Prompted copies of the whole graph (5% of nodes prompted): all in one call as one union,
    // and one per call (what the default call size gives for a graph of 2708 nodes).
    let copies = if quick { 4 } else { 8 };
    let prompts: Vec<Array2<f32>> = (0..copies)
        .map(|_| prompt(&mut rng, n, width, 0.05))
        .collect();
    let union = open(copies * n)?;
    let (t, _) = best_of(reps, || union.embed_prompted(&cora, &prompts));
    rows.push((
        format!("prompted whole Cora, {copies} per call (one union)"),
        copies as f64 / t,
        "graphs/s".into(),
    ));
    figures.insert(
        "prompted_whole_batched_per_s".into(),
        json!(copies as f64 / t),
    );
    let (t, _) = best_of(reps, || {
        prompts
            .iter()
            .map(|p| single.embed_prompted(&cora, std::slice::from_ref(p)))
            .collect::<Vec<_>>()
    });
    rows.push((
        "prompted whole Cora, one per call".into(),
        copies as f64 / t,
        "graphs/s".into(),
    ));
    figures.insert(
        "prompted_whole_single_per_s".into(),
        json!(copies as f64 / t),
    );

    // RELIEF's node-level graphs: each target's 2-hop subgraph (at most 200 nodes) with a
    // prompt on a quarter of its nodes.
    let sub_n = if quick { 64 } else { 512 };
    let items: Vec<(GnnGraph, Option<Prompt>)> = (0..sub_n)
        .map(|_| {
            let (g, _) = cora.k_hop(rng.below(n), 2, Some(200));
            let p = prompt(&mut rng, g.num_nodes(), width, 0.25);
            (g, Some(Prompt::Dense(p)))
        })
        .collect();
    let mean = items.iter().map(|(g, _)| g.num_nodes()).sum::<usize>() as f64 / sub_n as f64;
    let (t, out) = best_of(reps, || batched.embed_many_prompted(&items));
    out?;
    rows.push((
        format!("prompted 2-hop subgraphs (mean {mean:.0} nodes), batched"),
        sub_n as f64 / t,
        "graphs/s".into(),
    ));
    figures.insert(
        "prompted_subgraphs_batched_per_s".into(),
        json!(sub_n as f64 / t),
    );
    let few_items = &items[..sub_n / 4];
    let (t, _) = best_of(reps, || {
        few_items
            .iter()
            .map(|it| single.embed_many_prompted(std::slice::from_ref(it)))
            .collect::<Vec<_>>()
    });
    rows.push((
        "prompted 2-hop subgraphs, one call each".into(),
        few_items.len() as f64 / t,
        "graphs/s".into(),
    ));
    figures.insert(
        "prompted_subgraphs_single_per_s".into(),
        json!(few_items.len() as f64 / t),
    );

    // One incremental update (one undirected edge inserted) against a full recomputation.
    let mut inc = IncrementalEmbedder::new(&batched, &cora, 2)?;
    let mut times = Vec::new();
    let mut affected = Vec::new();
    for _ in 0..reps.max(3) {
        let (a, b) = loop {
            let (a, b) = (rng.below(n), rng.below(n));
            if a != b && !inc.graph().edges().contains(&(a, b)) {
                break (a, b);
            }
        };
        let delta = GraphDelta {
            inserted: vec![(a, b), (b, a)],
            ..Default::default()
        };
        let t = Instant::now();
        let report = inc.apply(&delta)?;
        times.push(t.elapsed().as_secs_f64());
        affected.push((report.affected, report.computed));
    }
    let (t_full, _) = best_of(reps, || batched.embed(inc.graph()));
    let t_inc = times.iter().copied().fold(f64::INFINITY, f64::min);
    rows.push((
        format!("incremental update, 1 edge (affected, computed: {affected:?})"),
        1.0 / t_inc,
        "updates/s".into(),
    ));
    rows.push((
        "full recomputation".into(),
        1.0 / t_full,
        "updates/s".into(),
    ));
    figures.insert("incremental_update_s".into(), json!(t_inc));
    figures.insert("full_update_s".into(), json!(t_full));

    println!("gnn-embed on Cora ({n} nodes), gnn-cora-edgepred, CPU, best of {reps}:");
    for (what, rate, unit) in &rows {
        println!("  {what:<62} {rate:>9.1} {unit}");
    }
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}
