//! Cost of class-balanced reinforced active learning on Cora (`stages/src/graph/agent.rs`):
//! one training round (5 parallel episodes of 35 labels, the classifier a GCN of hidden 128
//! retrained after every pick, 35 final epochs, A2C updates every 7 picks: what the published
//! code calls one training episode) and one labelling run (140 labels, hidden 64, 100 final
//! epochs) per agent: the shipped GCBR++ policy and the three baselines.
//!
//! Run with `cargo bench --bench gcbr` (`-- --quick` for a run of seconds: 2 rounds, 1 run per
//! agent). Prints a table and one JSON line. Needs the shared data (`../shared/data`, or
//! `LATENTFLOW_SHARED_DATA`).
//!
//! Decisions:
//! - A plain binary (no criterion): the figures are seconds of whole computations.
//! - Wall time and process CPU time (all threads, from `/proc/self/stat`) are both reported:
//!   the development machine is shared, and CPU time shows the work when other jobs take cores.
//! - Training rounds run on all cores (the stage's default); labelling runs on one thread each
//!   (the stage runs several runs side by side), reported as the median of the runs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use latentflow_stages::graph::agent::{
    label, Agent, Checkpoint, EpisodeSplit, LabelSettings, Problem, TrainSettings, Trainer, Variant,
};
use latentflow_stages::graph::load::{load, Input, LoadOptions, SplitMode};
use latentflow_stages::graph::policy::PolicyNet;
use latentflow_stages::graph::Rng;
use serde_json::json;

/// CPU seconds of this process so far (user + system, all threads), if `/proc` says.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = std::env::var_os("LATENTFLOW_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/data"));
    let path = data.join("graphs/cora.planetoid.npz");
    let opts = LoadOptions {
        normalise_features: true,
        split: SplitMode::Standard,
        ..Default::default()
    };
    let g = match load(&Input::Npz(path.clone()), &opts) {
        Ok(mut d) => d.graphs.remove(0),
        Err(e) => {
            eprintln!("error: {e} (the benchmark needs the shared data)");
            return ExitCode::FAILURE;
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (rounds, runs) = if quick { (2, 1) } else { (6, 5) };

    let run = || -> Result<serde_json::Value, String> {
        let problem = Problem::new(&g)?;

        // Training rounds, after one warm-up round.
        let mut trainer = Trainer::new(TrainSettings {
            variant: Variant::GcbrPlusPlus,
            ..Default::default()
        });
        trainer.round(&problem, threads)?;
        let (mut wall, mut cpu) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let c0 = cpu_seconds();
            let t = Instant::now();
            trainer.round(&problem, threads)?;
            wall.push(t.elapsed().as_secs_f64());
            if let (Some(a), Some(b)) = (c0, cpu_seconds()) {
                cpu.push(b - a);
            }
        }
        let round_wall = median(wall.clone());
        let round_cpu = median(cpu.clone());

        // Labelling runs, one thread each.
        let split = EpisodeSplit::standard(&problem)?;
        let settings = LabelSettings::default();
        let shipped = root.join("models/gcbr-policy/gcbr-pp.json");
        let (actor, policy_name) = match Checkpoint::load(&shipped) {
            Ok(c) => (c.actor, "gcbr++ (models/gcbr-policy/gcbr-pp.json)"),
            Err(_) => (
                PolicyNet::new(6, [8, 8], &mut Rng::new(0)),
                "gcbr++ (untrained: no shipped policy)",
            ),
        };
        let agents = [
            (
                policy_name,
                Agent::Policy {
                    actor: &actor,
                    sample: false,
                },
            ),
            ("random", Agent::Random),
            ("entropy", Agent::Entropy),
            ("pagerank", Agent::PageRank),
        ];
        let mut labelling = Vec::new();
        for (name, agent) in &agents {
            let (mut w, mut c) = (Vec::new(), Vec::new());
            for k in 0..runs {
                let c0 = cpu_seconds();
                let r = label(&problem, &split, agent, &settings, k as u64)?;
                w.push(r.seconds);
                if let (Some(a), Some(b)) = (c0, cpu_seconds()) {
                    c.push(b - a);
                }
            }
            labelling.push(json!({"agent": name, "wall_s": median(w), "cpu_s": median(c)}));
        }

        println!("GCBR on Cora (2708 nodes), {threads} cores");
        println!("| what | wall s | CPU s |");
        println!("|---|---:|---:|");
        println!(
            "| training round: 5 parallel episodes, budget 35, hidden 128 (median of {rounds}) | \
             {round_wall:.2} | {round_cpu:.2} |"
        );
        for l in &labelling {
            println!(
                "| labelling run, budget 140, hidden 64: {} (median of {runs}) | {:.2} | {:.2} |",
                l["agent"].as_str().unwrap_or(""),
                l["wall_s"].as_f64().unwrap_or(f64::NAN),
                l["cpu_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!(
            "4000 training rounds (the published schedule) at this rate: {:.1} h",
            4000.0 * round_wall / 3600.0
        );
        Ok(json!({
            "bench": "gcbr", "quick": quick, "threads": threads,
            "training_round": {"wall_s": round_wall, "cpu_s": round_cpu, "all_wall_s": wall,
                               "all_cpu_s": cpu},
            "labelling_run": labelling,
        }))
    };
    match run() {
        Ok(j) => {
            println!("{j}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
