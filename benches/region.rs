//! Cost of region editing on the face generator (`models/face-dcgan`): computing the
//! directions of one region from Jacobians at 5 codes (by finite differences, the default, and
//! by exact VJP rows), and editing 1000 latents along one direction at 5 strengths.
//!
//! Run with `cargo bench --bench region` (`-- --quick` for a run of seconds: 1 code, 100
//! latents). Prints a table and one JSON line.
//!
//! Decisions:
//! - A plain binary (no criterion): the figures are seconds of whole computations.
//! - Each figure is the best of 3 runs after a warm-up (1 with `--quick`), the least disturbed
//!   one on a shared machine.
//! - The edit figure is the generator's forward passes of `z + d·v` in batches of 64, which
//!   is what the `edit` stage does per record batch.

use std::process::ExitCode;
use std::time::Instant;

use latentflow_engine::inference::Device;
use latentflow_engine::model::ModelPackage;
use latentflow_engine::runtime;
use latentflow_stages::invert::{GradientMode, Net};
use latentflow_stages::region::{
    factorise, normal_codes, FactorSettings, JacobianSource, RegionMask,
};
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

fn main() -> ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    if let Err(e) = runtime::ensure_runtime() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let pkg = match ModelPackage::load(root.join("models/face-dcgan")) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (codes_n, latents_n, reps) = if quick { (1, 100, 1) } else { (5, 1000, 3) };
    let run = || -> Result<serde_json::Value, String> {
        let fd_net = Net::open(
            &pkg,
            None,
            GradientMode::FiniteDifference,
            Device::Cpu,
            0,
            128,
        )?;
        let vjp_net = Net::open(&pkg, None, GradientMode::Vjp, Device::Cpu, 0, 128)?;
        let region = RegionMask::from_box(64, 64, [18, 28, 46, 38])?;
        let codes = normal_codes(codes_n, 100, 0);
        let shape = [3, 64, 64];
        let fd = FactorSettings::default();
        let exact = FactorSettings {
            jacobian: JacobianSource::Vjp,
            ..FactorSettings::default()
        };
        let (t_fd, d) = best_of(reps, || {
            factorise(&fd_net, &codes, &shape, &region, &fd, 128)
        });
        let d = d?;
        let (t_vjp, _) = best_of(reps, || {
            factorise(&vjp_net, &codes, &shape, &region, &exact, 128)
        });
        let z = normal_codes(latents_n, 100, 1);
        let v = d.vectors.row(0).to_owned();
        let strengths = [-4.0f32, -2.0, 0.0, 2.0, 4.0];
        let (t_edit, images) = best_of(reps, || -> Result<usize, String> {
            let mut rows = Array2::<f32>::zeros((latents_n * strengths.len(), 100));
            for i in 0..latents_n {
                for (k, s) in strengths.iter().enumerate() {
                    let mut row = rows.row_mut(i * strengths.len() + k);
                    row.assign(&(&z.row(i) + &(&v * *s)));
                }
            }
            Ok(fd_net.forward(&rows.into_dyn())?.shape()[0])
        });
        let images = images?;
        println!("face-dcgan region editing, CPU, best of {reps}");
        println!("{:<58} {:>10}", "computation", "seconds");
        println!(
            "{:<58} {:>10.2}",
            format!("directions, one region, {codes_n} codes, finite differences"),
            t_fd
        );
        println!(
            "{:<58} {:>10.2}",
            format!("directions, one region, {codes_n} codes, VJP rows"),
            t_vjp
        );
        println!(
            "{:<58} {:>10.2}",
            format!("edit {latents_n} latents x 5 strengths ({images} images)"),
            t_edit
        );
        println!(
            "{:<58} {:>10.0}",
            "edited images per second",
            images as f64 / t_edit
        );
        Ok(json!({
            "bench": "region", "quick": quick, "codes": codes_n, "latents": latents_n,
            "directions_fd_s": t_fd, "directions_vjp_s": t_vjp, "edit_s": t_edit,
            "edited_images_per_s": images as f64 / t_edit,
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
