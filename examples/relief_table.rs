//! The RELIEF results table: few-shot node classification on k-hop subgraphs of Cora and
//! CiteSeer and graph classification on MUTAG, with frozen pre-trained GNNs, comparing RELIEF
//! (reinforcement-learned feature prompts) with a linear probe, a full-feature prompt and
//! fine-tuning, over several seeds (mean ± standard deviation).
//!
//! ```text
//! cargo run --release --example relief_table -- [--seeds 5] [--shots 1,5,10]
//!     [--tasks cora,citeseer,mutag] [--out runs/relief-table] [--quick]
//!     [--rounds N] [--max-z Z] [--head-wd L2] [--refit] [--sample-nodes] [--relief-only]
//!     [--verbose]
//! ```
//!
//! It needs the shared data folder (`../shared/data`, or `LATENTFLOW_SHARED_DATA`). Settings
//! are those of `pipelines/relief-node.yaml` and `pipelines/relief-graph.yaml`; `--quick`
//! shrinks them for a smoke run. Writes `table.md` and `results.json` into the output folder
//! and prints the table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use latentflow_engine::inference::Device;
use latentflow_stages::graph::embed::{EmbedOptions, GnnEmbedder};
use latentflow_stages::graph::load::{load, Input, LoadOptions, SplitMode};
use latentflow_stages::graph::relief::{
    self, graph_task, node_task, HeadSettings, ReliefSettings, Scores,
};
use latentflow_stages::graph::relief_baselines::{
    default_finetune_weights, fine_tune, full_prompt, prompt_basis, GradSettings,
};
use serde_json::json;

struct Args {
    seeds: usize,
    shots: Vec<usize>,
    mutag_shots: Vec<usize>,
    tasks: Vec<String>,
    out: PathBuf,
    quick: bool,
    verbose: bool,
    head_wd: f64,
    rounds: Option<usize>,
    max_z: Option<f64>,
    sample_nodes: bool,
    refit: bool,
    relief_only: bool,
}

const USAGE: &str = "usage: relief_table [--seeds N] [--shots 1,5,10] [--mutag-shots 5,10] \
    [--tasks cora,citeseer,mutag] [--out DIR] [--quick] [--rounds N] [--max-z Z] [--head-wd L2] \
    [--refit] [--sample-nodes] [--relief-only] [--verbose]";

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seeds: 5,
        shots: vec![1, 5, 10],
        mutag_shots: vec![5, 10],
        tasks: vec!["cora".into(), "citeseer".into(), "mutag".into()],
        out: PathBuf::from("runs/relief-table"),
        quick: false,
        verbose: false,
        head_wd: HeadSettings::default().weight_decay,
        rounds: None,
        max_z: None,
        sample_nodes: false,
        refit: false,
        relief_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut value = || it.next().ok_or(format!("{k} needs a value\n{USAGE}"));
        fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{k}: `{v}` is not a valid number\n{USAGE}"))
        }
        let list = |k: &str, v: String| -> Result<Vec<usize>, String> {
            v.split(',').map(|x| num(k, x.trim())).collect()
        };
        match k.as_str() {
            "--seeds" => a.seeds = num(&k, &value()?)?,
            "--shots" => a.shots = list(&k, value()?)?,
            "--mutag-shots" => a.mutag_shots = list(&k, value()?)?,
            "--tasks" => a.tasks = value()?.split(',').map(String::from).collect(),
            "--out" => a.out = PathBuf::from(value()?),
            "--quick" => a.quick = true,
            "--verbose" => a.verbose = true,
            "--sample-nodes" => a.sample_nodes = true,
            "--refit" => a.refit = true,
            "--relief-only" => a.relief_only = true,
            "--head-wd" => a.head_wd = num(&k, &value()?)?,
            "--rounds" => a.rounds = Some(num(&k, &value()?)?),
            "--max-z" => a.max_z = Some(num(&k, &value()?)?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if let Some(t) = a
        .tasks
        .iter()
        .find(|t| !["cora", "citeseer", "mutag"].contains(&t.as_str()))
    {
        return Err(format!("unknown task `{t}` (cora, citeseer, mutag)"));
    }
    Ok(a)
}

fn data_dir() -> PathBuf {
    std::env::var_os("LATENTFLOW_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
        .join("graphs")
}

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

/// Settings of every task: those of `pipelines/relief-node.yaml` and
/// `pipelines/relief-graph.yaml`, which agree.
fn settings(quick: bool) -> (ReliefSettings, GradSettings) {
    let s = ReliefSettings {
        rounds: if quick { 3 } else { 30 },
        graphs_per_round: 16,
        max_z: 0.05,
        ..Default::default()
    };
    let g = GradSettings {
        epochs: if quick { 10 } else { 100 },
        lr: 0.01,
        head: HeadSettings::default(),
    };
    (s, g)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse()?;
    let dir = data_dir();
    if !dir.is_dir() {
        return Err(format!("{} not found", dir.display()));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    let options = EmbedOptions {
        device: Device::Cpu,
        threads: Some(1),
        max_nodes: 2048,
    };
    let methods = [
        "relief",
        "probe",
        "full_prompt",
        "fine_tune",
        "relief_sampled",
    ];
    let mut rows = Vec::new();
    let mut f1_rows = Vec::new();
    let mut results = Vec::new();
    let t_all = Instant::now();

    for task_name in &args.tasks {
        let (package, shots_list) = match task_name.as_str() {
            "cora" => ("gnn-cora-edgepred", args.shots.clone()),
            "citeseer" => ("gnn-citeseer-edgepred", args.shots.clone()),
            "mutag" => ("gin-mutag", args.mutag_shots.clone()),
            other => return Err(format!("unknown task {other}")),
        };
        let pkg = model(package);
        let embedder = GnnEmbedder::open(&pkg, &options)?;
        let basis = prompt_basis(&pkg)?.map(std::sync::Arc::new);
        let weights = default_finetune_weights(&pkg)?;
        let data = match task_name.as_str() {
            "mutag" => load(&Input::Tu(dir.join("MUTAG")), &LoadOptions::default()),
            name => load(
                &Input::Npz(dir.join(format!("{name}.planetoid.npz"))),
                &LoadOptions {
                    split: SplitMode::Standard,
                    ..Default::default()
                },
            ),
        }
        .map_err(|e| e.to_string())?;
        for &shots in &shots_list {
            let mut per: Vec<Vec<Scores>> = vec![Vec::new(); methods.len()];
            for seed in 0..args.seeds as u64 {
                let t0 = Instant::now();
                let (mut rs, mut gs) = settings(args.quick);
                rs.seed = seed;
                rs.head.weight_decay = args.head_wd;
                gs.head.weight_decay = args.head_wd;
                if let Some(r) = args.rounds {
                    rs.rounds = r;
                }
                rs.sample_nodes = args.sample_nodes;
                rs.refit_head = args.refit;
                if let Some(z) = args.max_z {
                    rs.max_z = z;
                }
                let task = if task_name == "mutag" {
                    graph_task(&data.graphs, shots, 0, seed)?
                } else {
                    let test_size = if args.quick { 100 } else { 300 };
                    node_task(
                        &data.graphs[0],
                        shots,
                        2,
                        30,
                        test_size,
                        seed,
                        basis.clone(),
                    )?
                };
                let verbose = args.verbose;
                let ck = relief::train(&embedder, &task, &rs, &mut |l| {
                    if verbose {
                        eprintln!(
                            "  round {:3}: reward {:+.4} loss {:.4} -> {:.4} head {:.4} cov {:.2} \
                             mag {:.3} kl {:.4} passes {} entropy {:.3} log_std {:.2} ({:.1} s)",
                            l.round,
                            l.reward,
                            l.start_loss,
                            l.final_loss,
                            l.head_loss,
                            l.coverage,
                            l.magnitude,
                            l.approx_kl,
                            l.passes,
                            l.entropy,
                            l.log_std,
                            l.seconds
                        );
                    }
                })?;
                let t_relief = t0.elapsed().as_secs_f64();
                let r = relief::evaluate(&embedder, &task, &ck)?;
                // The same agent with its nodes drawn from the policy (seeded) at test time.
                let mut sampled = ck.clone();
                sampled.settings.sample_nodes = !ck.settings.sample_nodes;
                let rsam = relief::evaluate(&embedder, &task, &sampled)?;
                let skipped = Scores {
                    accuracy: f64::NAN,
                    macro_f1: f64::NAN,
                    roc_auc: f64::NAN,
                    ..Default::default()
                };
                let (p, fp, ft) = if args.relief_only {
                    (skipped.clone(), skipped.clone(), skipped)
                } else {
                    (
                        relief::linear_probe(&embedder, &task, &rs.head)?,
                        full_prompt(&pkg, &task, &gs)?.scores,
                        fine_tune(&pkg, &task, &weights, &GradSettings { lr: 1e-3, ..gs })?.scores,
                    )
                };
                eprintln!(
                    "{task_name} {shots}-shot seed {seed}: relief acc {:.3} f1 {:.3} auc {:.3} \
                     cov {:.3} mag {:.3} | probe {:.3} | full {:.3} | finetune {:.3} \
                     ({:.0} s, relief training {:.0} s)",
                    r.accuracy,
                    r.macro_f1,
                    r.roc_auc,
                    r.coverage,
                    r.magnitude,
                    p.accuracy,
                    fp.accuracy,
                    ft.accuracy,
                    t0.elapsed().as_secs_f64(),
                    t_relief
                );
                for (k, s) in [r, p, fp, ft, rsam].into_iter().enumerate() {
                    results.push(json!({
                        "task": task_name, "shots": shots, "seed": seed, "method": methods[k],
                        "accuracy": s.accuracy, "macro_f1": s.macro_f1, "roc_auc": s.roc_auc,
                        "coverage": s.coverage, "magnitude": s.magnitude,
                    }));
                    per[k].push(s);
                }
            }
            let metric = |s: &Scores| {
                if task_name == "mutag" {
                    s.roc_auc
                } else {
                    s.accuracy
                }
            };
            let cell = |v: Vec<f64>| {
                if v.iter().all(|x| x.is_nan()) {
                    return "–".to_string();
                }
                let (m, sd) = mean_std(&v);
                format!("{:.3} ± {:.3}", m, sd)
            };
            let col = |k: usize, f: &dyn Fn(&Scores) -> f64| cell(per[k].iter().map(f).collect());
            let row = format!(
                "| {task_name} | {shots} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                col(0, &metric),
                col(0, &|s| s.coverage),
                col(0, &|s| s.magnitude),
                col(1, &metric),
                col(2, &metric),
                col(3, &metric),
                col(4, &metric),
                col(4, &|s| s.coverage),
                col(4, &|s| s.magnitude),
            );
            f1_rows.push(format!(
                "| {task_name} | {shots} | {} | {} | {} | {} | {} |",
                col(0, &|s| s.macro_f1),
                col(1, &|s| s.macro_f1),
                col(2, &|s| s.macro_f1),
                col(3, &|s| s.macro_f1),
                col(4, &|s| s.macro_f1),
            ));
            eprintln!("{row}");
            rows.push(row);
        }
    }
    let mut table = String::from(
        "| task | shots | RELIEF | coverage | magnitude | linear probe | full prompt | \
         fine-tuning | RELIEF, sampled nodes | coverage | magnitude |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        table += r;
        table.push('\n');
    }
    table += "\nMacro-F1:\n\n| task | shots | RELIEF | linear probe | full prompt | fine-tuning | \
              RELIEF, sampled nodes |\n|---|---|---|---|---|---|---|\n";
    for r in &f1_rows {
        table += r;
        table.push('\n');
    }
    table += &format!(
        "\nAccuracy (Cora, CiteSeer) or ROC-AUC (MUTAG) on the test graphs, mean ± std over {} \
         seeds; {:.0} s in all.\n",
        args.seeds,
        t_all.elapsed().as_secs_f64()
    );
    println!("{table}");
    std::fs::write(args.out.join("table.md"), &table).map_err(|e| e.to_string())?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}
