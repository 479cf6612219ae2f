//! Cost of exact gradients through the face generator (`models/face-dcgan`): one forward pass,
//! one vector-Jacobian product, and the full gradient with respect to the 100-dimensional
//! latent by batched central finite differences against one VJP.
//!
//! Run with `cargo bench --bench grad` (add `-- --quick`, or set `LF_BENCH_QUICK=1`, for a run
//! of seconds; `-- --device cuda` on a CUDA build; `-- --threads N` for ONNX Runtime's
//! intra-op threads). Prints a table and one JSON line.
//!
//! Decisions:
//! - A plain binary (no criterion): the figures are milliseconds of whole model calls, and
//!   the ratios between them are what matters.
//! - The gradient is that of `⟨c, G(z)⟩` for a fixed cotangent `c`, for every example of the
//!   batch. By VJP it is one call of the VJP model. By finite differences it is the Jacobian
//!   of each example, `2 × 100` forward rows stacked in one call, contracted with `c`; the two
//!   results are compared, so the table also says how far finite differences are from exact.
//! - Each timing is the best of several repetitions after a warm-up call (the least disturbed
//!   figure on a shared machine); the median is in the JSON line too.
//! - In quick mode the finite-difference gradient of a batch of 32 is timed on 2 examples and
//!   scaled to 32 (it is 32 independent Jacobians); the table marks it as estimated.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use latentflow_engine::grad::{Differentiable, GradOptions, JacobianMethod, DEFAULT_STEP};
use latentflow_engine::inference::Device;
use latentflow_engine::model::ModelPackage;
use latentflow_engine::{runtime, Tensor};
use ndarray::{Array1, ArrayD, Axis, IxDyn};
use serde_json::json;

const LATENT: usize = 100;
const BATCHES: [usize; 2] = [1, 32];

fn usage() -> &'static str {
    "usage: cargo bench --bench grad [-- [--quick] [--reps N] [--threads N] [--device D]]\n  \
     --quick      a run of seconds (also LF_BENCH_QUICK=1)\n  \
     --reps N     timed repetitions of forward and VJP calls (default 10, or 3 with --quick)\n  \
     --threads N  ONNX Runtime intra-op threads (default: ONNX Runtime's choice)\n  \
     --device D   cpu (default), cuda or auto"
}

struct Options {
    quick: bool,
    reps: usize,
    threads: Option<usize>,
    device: Device,
}

impl Options {
    fn parse() -> Result<Options> {
        let mut quick = std::env::var("LF_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut reps = None;
        let mut threads = None;
        let mut device = Device::Cpu;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value"));
            match arg.as_str() {
                // Cargo passes `--bench` to every benchmark binary.
                "--bench" => {}
                "--quick" => quick = true,
                "--reps" => reps = Some(count(&value("--reps")?, "--reps")?),
                "--threads" => threads = Some(count(&value("--threads")?, "--threads")?),
                "--device" => {
                    device = match value("--device")?.as_str() {
                        "cpu" => Device::Cpu,
                        "cuda" => Device::Cuda,
                        "auto" => Device::Auto,
                        other => bail!("--device takes cpu, cuda or auto, not `{other}`"),
                    }
                }
                "-h" | "--help" => {
                    println!("{}", usage());
                    std::process::exit(0);
                }
                other => bail!("unknown argument `{other}`\n{}", usage()),
            }
        }
        Ok(Options {
            quick,
            reps: reps.unwrap_or(if quick { 3 } else { 10 }),
            threads,
            device,
        })
    }
}

fn count(value: &str, name: &str) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{name} takes a whole number above 0, not `{value}`"),
    }
}

/// Best and median seconds of `reps` calls of `f`, after one warm-up call.
fn time<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, f64)> {
    f()?;
    let mut secs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        secs.push(start.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    Ok((secs[0], secs[secs.len() / 2]))
}

/// Deterministic latents and cotangents, so every run measures the same work.
fn latents(batch: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[batch, LATENT]), |i| {
        ((i[0] * LATENT + i[1]) as f32 * 0.618).sin() * 1.5
    })
}

fn cotangent(shape: &[usize]) -> ArrayD<f32> {
    let mut k = 0u32;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        k = k.wrapping_add(1);
        (k as f32 * 0.7).sin()
    })
}

/// The gradient of `⟨c, G(z)⟩` with respect to the latents of `examples` rows of `z`, by
/// batched central differences: one Jacobian per example.
fn fd_gradient(
    diff: &Differentiable,
    z: &ArrayD<f32>,
    cot: &ArrayD<f32>,
    examples: usize,
) -> Result<Vec<f64>> {
    let mut grad = Vec::with_capacity(examples * LATENT);
    for b in 0..examples {
        let zb = z.slice_axis(Axis(0), (b..b + 1).into()).to_owned();
        let jac = diff.jacobian_with(
            &[("z", Tensor::f32(zb))],
            JacobianMethod::FiniteDifference { step: DEFAULT_STEP },
        )?;
        let c: Array1<f64> = cot
            .index_axis(Axis(0), b)
            .iter()
            .map(|&v| v as f64)
            .collect();
        grad.extend(jac.mapv(|v| v as f64).t().dot(&c));
    }
    Ok(grad)
}

fn l2_relative(got: &[f64], want: &[f64]) -> f64 {
    let d: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let n: f64 = want.iter().map(|b| b * b).sum();
    (d / n.max(1e-300)).sqrt()
}

struct Row {
    batch: usize,
    forward: (f64, f64),
    vjp: (f64, f64),
    fd: f64,
    fd_estimated: bool,
    fd_error: f64,
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    let opts = Options::parse()?;
    runtime::ensure_runtime().context("run `bash scripts/setup.sh` in the repository root")?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/face-dcgan");
    let package = ModelPackage::load(&dir)?;
    let cache = std::env::temp_dir().join(format!("lf-bench-grad-{}", std::process::id()));
    let options = GradOptions {
        device: opts.device,
        threads: opts.threads,
        // One example's whole Jacobian (2 × 100 rows) in one call.
        max_batch: 2 * LATENT,
        cache_dir: Some(cache.clone()),
    };
    let started = Instant::now();
    let diff = Differentiable::with_options(&package, "image", &["z"], &options)?;
    let build_s = started.elapsed().as_secs_f64();
    eprintln!(
        "face-dcgan: VJP model built and opened in {build_s:.2}s on {:?}",
        diff.device()
    );

    let mut rows = Vec::new();
    for batch in BATCHES {
        let z = latents(batch);
        let cot = cotangent(&[batch, 3, 64, 64]);
        let inputs = [("z", Tensor::f32(z.clone()))];
        let forward = time(opts.reps, || Ok(diff.forward(&inputs)?))?;
        let vjp = time(opts.reps, || Ok(diff.vjp(&inputs, &cot)?))?;
        let exact: Vec<f64> = diff.vjp(&inputs, &cot)?.iter().map(|&v| v as f64).collect();

        let examples = if opts.quick { batch.min(2) } else { batch };
        let start = Instant::now();
        let fd = fd_gradient(&diff, &z, &cot, examples)?;
        let fd_s = start.elapsed().as_secs_f64() * batch as f64 / examples as f64;
        let fd_error = l2_relative(&fd, &exact[..examples * LATENT]);
        eprintln!("batch {batch}: done");
        rows.push(Row {
            batch,
            forward,
            vjp,
            fd: fd_s,
            fd_estimated: examples < batch,
            fd_error,
        });
    }
    let _ = std::fs::remove_dir_all(&cache);

    println!(
        "\nface-dcgan gradients, device {:?}, {} repetitions (best of)",
        diff.device(),
        opts.reps
    );
    println!(
        "{:>5}  {:>10}  {:>8}  {:>11}  {:>14}  {:>9}  {:>9}",
        "batch", "forward ms", "VJP ms", "VJP/forward", "FD gradient ms", "speed-up", "FD error"
    );
    for r in &rows {
        println!(
            "{:>5}  {:>10.2}  {:>8.2}  {:>11.2}  {:>13.0}{}  {:>8.0}x  {:>9.1e}",
            r.batch,
            r.forward.0 * 1e3,
            r.vjp.0 * 1e3,
            r.vjp.0 / r.forward.0,
            r.fd * 1e3,
            if r.fd_estimated { "*" } else { " " },
            r.fd / r.vjp.0,
            r.fd_error
        );
    }
    if rows.iter().any(|r| r.fd_estimated) {
        println!("* timed on 2 examples and scaled to the batch (--quick)");
    }
    println!(
        "goals: VJP/forward <= 3, speed-up of the VJP over finite differences >= 30 \
         (FD error: L2 distance of the FD gradient from the VJP, relative)"
    );
    let json = json!({
        "bench": "grad",
        "model": "face-dcgan",
        "device": format!("{:?}", diff.device()).to_lowercase(),
        "quick": opts.quick,
        "reps": opts.reps,
        "threads": opts.threads,
        "vjp_build_s": build_s,
        "rows": rows.iter().map(|r| json!({
            "batch": r.batch,
            "forward_ms": r.forward.0 * 1e3,
            "forward_median_ms": r.forward.1 * 1e3,
            "vjp_ms": r.vjp.0 * 1e3,
            "vjp_median_ms": r.vjp.1 * 1e3,
            "vjp_over_forward": r.vjp.0 / r.forward.0,
            "fd_gradient_ms": r.fd * 1e3,
            "fd_gradient_estimated": r.fd_estimated,
            "vjp_speedup_over_fd": r.fd / r.vjp.0,
            "fd_relative_error": r.fd_error,
        })).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}
