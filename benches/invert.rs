//! Images per second of the domain-regularised latent optimiser (`optimize` stage): the Rust
//! [`Inverter`] against a plain Python loop over ONNX Runtime doing the same optimisation
//! (`benches/invert_python.py`).
//!
//! Run with `cargo bench --bench invert` (add `-- --quick`, or set `LF_BENCH_QUICK=1`, for a
//! run of seconds with 10 steps; `-- --steps N`, `-- --threads N` for ONNX Runtime's intra-op
//! threads, default 1 like the stage; `-- --python PATH`, default `.venv/bin/python`). Prints a
//! table and one JSON line.
//!
//! Decisions:
//! - Both sides optimise faces `0..batch` of `data/faces/faces.npy` with face-dcgan and
//!   face-encoder, domain weight 2, Adam with the published settings (lr 0.01), for 100 steps,
//!   from the same starting codes `E(x)` (computed here once and handed to the script).
//! - Both run the same ONNX files: the generator's and encoder's `model.onnx` for forward
//!   passes, and for gradients the VJP models the Rust optimiser builds and caches in
//!   `models/<package>/.grad/` (their paths are passed to the script), on the CPU with the
//!   same intra-op thread count.
//! - Each side does its natural amount of work per step: the Python loop takes a step's loss
//!   from the forward passes its gradient needs (G, E, E's VJP, G's VJP: each VJP model runs
//!   its model's forward pass again). The Rust optimiser, like the `optimize` stage, runs the
//!   VJP model of the whole loss composed into one graph (one call per step, each forward pass
//!   once); the model-by-model Rust optimiser (a loss pass, then the gradient pass) is shown
//!   for reference.
//! - Images per second is `batch / seconds` of one whole optimisation of the batch, timed
//!   after a warm-up optimisation of 2 steps (first runs of a session at a batch size plan
//!   and allocate). Each figure is one run: the optimisation at batch 32 takes tens of seconds.
//! - The comparison is only fair if both did the same work: the bench fails when the mean
//!   final losses differ by more than [`LOSS_TOLERANCE`] (relative). They are not identical:
//!   float32 rounding differs between the two loops' sessions and compounds over the steps on
//!   a loss with many ReLU kinks.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use latentflow_engine::grad::vjp_model;
use latentflow_engine::inference::Device;
use latentflow_engine::model::ModelPackage;
use latentflow_engine::runtime;
use latentflow_stages::invert::{FusedLoss, GradientMode, Inverter, Net, OptimizeSettings};
use ndarray::{ArrayD, Axis, Ix2};
use serde_json::{json, Value as Json};

const BATCHES: [usize; 3] = [1, 8, 32];
const DOMAIN_WEIGHT: f64 = 2.0;
/// Largest accepted relative difference of the two mean final losses.
const LOSS_TOLERANCE: f64 = 0.02;
/// Goal: the Rust optimiser at least this many times the Python loop's images/s at batch 32.
const GOAL: f64 = 2.0;

fn usage() -> &'static str {
    "usage: cargo bench --bench invert [-- [--quick] [--steps N] [--threads N] [--python PATH]]\n  \
     --quick       10 steps instead of 100 (also LF_BENCH_QUICK=1)\n  \
     --steps N     Adam steps per optimisation (default 100)\n  \
     --threads N   ONNX Runtime intra-op threads on both sides (default 1)\n  \
     --python PATH the interpreter with onnxruntime and numpy (default .venv/bin/python)"
}

struct Options {
    quick: bool,
    steps: usize,
    threads: usize,
    python: PathBuf,
}

impl Options {
    fn parse(root: &Path) -> Result<Options> {
        let mut quick = std::env::var("LF_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut steps = None;
        let mut threads = 1;
        let mut python = root.join(".venv/bin/python");
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value"));
            match arg.as_str() {
                // Cargo passes `--bench` to every benchmark binary.
                "--bench" => {}
                "--quick" => quick = true,
                "--steps" => steps = Some(count(&value("--steps")?, "--steps")?),
                "--threads" => threads = count(&value("--threads")?, "--threads")?,
                "--python" => python = PathBuf::from(value("--python")?),
                "-h" | "--help" => {
                    println!("{}", usage());
                    std::process::exit(0);
                }
                other => bail!("unknown argument `{other}`\n{}", usage()),
            }
        }
        Ok(Options {
            quick,
            steps: steps.unwrap_or(if quick { 10 } else { 100 }),
            threads,
            python,
        })
    }
}

fn count(value: &str, name: &str) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{name} takes a whole number above 0, not `{value}`"),
    }
}

/// One side's figures at one batch size.
#[derive(Clone, Copy, Debug)]
struct Run {
    seconds: f64,
    loss_initial: f64,
    loss_final: f64,
    pixel_final: f64,
    domain_final: f64,
}

impl Run {
    fn images_per_second(&self, batch: usize) -> f64 {
        batch as f64 / self.seconds
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn main() -> ExitCode {
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<bool> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let opts = Options::parse(root)?;
    runtime::ensure_runtime().context("run `bash scripts/setup.sh` in the repository root")?;
    if !opts.python.exists() {
        bail!(
            "{} not found: run `bash scripts/setup.sh` in the repository root, or pass --python",
            opts.python.display()
        );
    }
    let gen_pkg = ModelPackage::load(root.join("models/face-dcgan"))?;
    let enc_pkg = ModelPackage::load(root.join("models/face-encoder"))?;
    let max = *BATCHES.iter().max().expect("batch sizes");
    let open = |p: &ModelPackage| {
        Net::open(p, None, GradientMode::Vjp, Device::Cpu, opts.threads, max)
            .map_err(|e| anyhow!(e))
    };
    let started = Instant::now();
    let mut inverter = Inverter {
        generator: open(&gen_pkg)?,
        encoder: Some(open(&enc_pkg)?),
        features: None,
        settings: OptimizeSettings {
            domain_weight: DOMAIN_WEIGHT,
            gradients: GradientMode::Vjp,
            ..Default::default()
        },
        fused: None,
    };
    eprintln!(
        "models opened (VJP models built or found) in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    // The files the Rust optimiser runs: found in the cache its nets were opened from.
    let g_vjp = vjp_model(&gen_pkg, "image", &["z".to_string()])?;
    let e_vjp = vjp_model(&enc_pkg, "z", &["image".to_string()])?;

    let faces: ArrayD<f32> =
        ndarray_npy::read_npy(root.join("data/faces/faces.npy")).context("data/faces/faces.npy")?;
    let faces = faces.slice_axis(Axis(0), (0..max).into()).to_owned();
    let encoder = inverter.encoder.as_ref().expect("an encoder");
    let z0 = encoder
        .forward(&faces)
        .map_err(|e| anyhow!(e))?
        .into_dimensionality::<Ix2>()?;

    let scratch = std::env::temp_dir().join(format!("lf-bench-invert-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let faces_path = scratch.join("faces.npy");
    let z0_path = scratch.join("z0.npy");
    ndarray_npy::write_npy(&faces_path, &faces)?;
    ndarray_npy::write_npy(&z0_path, &z0)?;

    // Rust: the stage's default (the composed loss graph, one VJP call per step), and the
    // model-by-model gradient for reference.
    let fused = FusedLoss::open(
        &gen_pkg,
        Some(&enc_pkg),
        DOMAIN_WEIGHT,
        Device::Cpu,
        opts.threads,
        max,
    )
    .map_err(|e| anyhow!(e))?;
    let mut fused = Some(fused);
    let mut rust = Vec::new();
    let mut separate = Vec::new();
    for composed in [true, false] {
        std::mem::swap(&mut inverter.fused, &mut fused);
        for batch in BATCHES {
            let x = faces.slice_axis(Axis(0), (0..batch).into()).to_owned();
            let z = z0.slice_axis(Axis(0), (0..batch).into()).to_owned();
            let t = inverter.targets(x, None).map_err(|e| anyhow!(e))?;
            inverter.settings.steps = 2;
            inverter.optimize(z.clone(), &t).map_err(|e| anyhow!(e))?;
            inverter.settings.steps = opts.steps;
            let began = Instant::now();
            let o = inverter.optimize(z, &t).map_err(|e| anyhow!(e))?;
            let seconds = began.elapsed().as_secs_f64();
            let run = Run {
                seconds,
                loss_initial: mean(&o.initial.total),
                loss_final: mean(&o.last.total),
                pixel_final: mean(&o.last.pixel),
                domain_final: mean(&o.last.domain),
            };
            let what = if composed { "composed" } else { "separate" };
            eprintln!(
                "rust {what} batch {batch:>2}: {seconds:.2}s, loss {:.5} -> {:.5}",
                run.loss_initial, run.loss_final
            );
            if composed {
                rust.push(run);
            } else {
                separate.push(run);
            }
        }
    }

    // Python.
    let script = root.join("benches/invert_python.py");
    let batches: Vec<String> = BATCHES.iter().map(|b| b.to_string()).collect();
    let mut child = Command::new(&opts.python);
    child
        .arg(&script)
        .arg("--generator")
        .arg(gen_pkg.onnx_path())
        .arg("--generator-vjp")
        .arg(&g_vjp)
        .arg("--encoder")
        .arg(enc_pkg.onnx_path())
        .arg("--encoder-vjp")
        .arg(&e_vjp)
        .arg("--faces")
        .arg(&faces_path)
        .arg("--z0")
        .arg(&z0_path)
        .arg("--batches")
        .arg(batches.join(","))
        .arg("--steps")
        .arg(opts.steps.to_string())
        .arg("--threads")
        .arg(opts.threads.to_string())
        .arg("--domain-weight")
        .arg(DOMAIN_WEIGHT.to_string())
        .arg("--lr")
        .arg(inverter.settings.lr.to_string());
    let out = child
        .output()
        .with_context(|| format!("running {}", opts.python.display()))?;
    let _ = std::fs::remove_dir_all(&scratch);
    if !out.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut python = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let j: Json = serde_json::from_str(line).with_context(|| format!("script said {line}"))?;
        let f = |k: &str| j[k].as_f64().ok_or_else(|| anyhow!("no `{k}` in {line}"));
        let run = Run {
            seconds: f("seconds")?,
            loss_initial: f("loss_initial")?,
            loss_final: f("loss_final")?,
            pixel_final: f("pixel_final")?,
            domain_final: f("domain_final")?,
        };
        eprintln!(
            "python batch {:>2}: {:.2}s, loss {:.5} -> {:.5}",
            f("batch")?,
            run.seconds,
            run.loss_initial,
            run.loss_final
        );
        python.push(run);
    }
    if python.len() != BATCHES.len() {
        bail!(
            "the script gave {} results, not {}",
            python.len(),
            BATCHES.len()
        );
    }

    println!(
        "\nlatent optimisation, face-dcgan + face-encoder, domain weight {DOMAIN_WEIGHT}, {} Adam \
         steps, CPU, {} intra-op thread(s)",
        opts.steps, opts.threads
    );
    println!(
        "{:>5}  {:>13}  {:>15}  {:>15}  {:>6}  {:>12}  {:>12}  {:>9}",
        "batch",
        "rust images/s",
        "(model by model)",
        "python images/s",
        "ratio",
        "rust loss",
        "python loss",
        "loss diff"
    );
    let mut fair = true;
    let mut rows = Vec::new();
    for (((batch, r), p), sep) in BATCHES.iter().zip(&rust).zip(&python).zip(&separate) {
        let ratio = p.seconds / r.seconds;
        let diff = (r.loss_final - p.loss_final).abs() / r.loss_final.abs().max(1e-12);
        let start_diff = (r.loss_initial - p.loss_initial).abs() / r.loss_initial.abs().max(1e-12);
        fair &= diff <= LOSS_TOLERANCE && start_diff <= 1e-4;
        println!(
            "{:>5}  {:>13.2}  {:>15.2}  {:>15.2}  {:>5.2}x  {:>12.5}  {:>12.5}  {:>8.2}%",
            batch,
            r.images_per_second(*batch),
            sep.images_per_second(*batch),
            p.images_per_second(*batch),
            ratio,
            r.loss_final,
            p.loss_final,
            diff * 100.0
        );
        rows.push(json!({
            "batch": batch,
            "rust_seconds": r.seconds,
            "python_seconds": p.seconds,
            "rust_images_per_s": r.images_per_second(*batch),
            "rust_model_by_model_images_per_s": sep.images_per_second(*batch),
            "python_images_per_s": p.images_per_second(*batch),
            "ratio": ratio,
            "rust_loss_initial": r.loss_initial,
            "python_loss_initial": p.loss_initial,
            "rust_loss_final": r.loss_final,
            "python_loss_final": p.loss_final,
            "rust_pixel_final": r.pixel_final,
            "python_pixel_final": p.pixel_final,
            "rust_domain_final": r.domain_final,
            "python_domain_final": p.domain_final,
        }));
    }
    let last = BATCHES.len() - 1;
    let ratio = python[last].seconds / rust[last].seconds;
    println!(
        "goal: rust >= {GOAL}x python at batch {} ({}); same starting loss (1e-4) and final loss \
         ({}%, relative): {}",
        BATCHES[last],
        if ratio >= GOAL { "met" } else { "NOT met" },
        LOSS_TOLERANCE * 100.0,
        if fair { "yes" } else { "NO" }
    );
    println!(
        "{}",
        json!({
            "bench": "invert",
            "quick": opts.quick,
            "steps": opts.steps,
            "threads": opts.threads,
            "domain_weight": DOMAIN_WEIGHT,
            "rows": rows,
            "goal_met": ratio >= GOAL,
            "same_loss": fair,
        })
    );
    if !fair {
        eprintln!(
            "error: the two optimisers did not reach the same loss; the comparison is not fair"
        );
    }
    Ok(fair)
}
