//! Exact gradients through the committed model packages.
//!
//! For each package listed in `tests/grad/packages/cases.json` (made by
//! `scripts/grad_packages.py`), the VJP model built from the package's ONNX file and run by
//! ONNX Runtime must give the gradients PyTorch autograd gives for the same graph, with respect
//! to inputs and weights. Independently of PyTorch, the VJPs must agree with central finite
//! differences computed by the same crate: Jacobians stacked in batches of perturbations, and
//! directional derivatives along random directions in input and weight space.

mod common;

use std::fs::File;
use std::path::PathBuf;

use latentflow_engine::grad::{Differentiable, GradOptions, JacobianMethod};
use latentflow_engine::inference::Device;
use latentflow_engine::model::{sha256_file, ModelPackage};
use latentflow_engine::Tensor;
use ndarray::{Array2, ArrayD, Axis, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;
use serde_json::Value as Json;

use common::{root, scratch};

/// Largest accepted relative error.
const TOLERANCE: f64 = 1e-3;

/// Largest accepted relative error of a directional derivative through a whole package by
/// central differences. The forward graph runs in float32 and every ReLU whose input crosses
/// zero inside the step bends the quotient, so on these networks the quotient itself wanders
/// by about 1e-3 between steps; the exact comparison is the one with PyTorch's float64
/// autograd above, at `TOLERANCE`.
const FD_TOLERANCE: f64 = 2e-3;

fn listing() -> Vec<Json> {
    let path = root().join("tests/grad/packages/cases.json");
    let text = std::fs::read_to_string(&path).expect("tests/grad/packages/cases.json");
    serde_json::from_str::<Json>(&text)
        .expect("JSON")
        .as_array()
        .expect("a list")
        .clone()
}

/// A package with its saved inputs, cotangent and PyTorch gradients.
struct Fixture {
    name: String,
    package: ModelPackage,
    output: String,
    wrt: Vec<String>,
    inputs: Vec<(String, Tensor)>,
    cotangent: ArrayD<f32>,
    torch: Vec<ArrayD<f32>>,
    cache: PathBuf,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let spec = listing()
            .into_iter()
            .find(|c| c["package"] == name)
            .unwrap_or_else(|| panic!("no `{name}` in tests/grad/packages/cases.json"));
        let dir = root().join("models").join(name);
        let package = ModelPackage::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let sha = sha256_file(&package.onnx_path()).expect("model file");
        assert_eq!(
            spec["sha256"].as_str(),
            Some(sha.as_str()),
            "{name}: the model changed since its gradient references were made; rerun \
             `.venv-export/bin/python scripts/grad_packages.py {name}`"
        );
        let wrt: Vec<String> = spec["wrt"]
            .as_array()
            .expect("wrt")
            .iter()
            .map(|w| w.as_str().expect("a name").to_string())
            .collect();

        let path = root().join(format!("tests/grad/packages/{name}.npz"));
        let mut npz = NpzReader::new(File::open(&path).expect("npz")).expect("an npz file");
        let mut inputs = Vec::new();
        for n in npz.names().expect("names") {
            let Some(input) = n.strip_prefix("input__") else {
                continue;
            };
            let t = match npz.by_name::<OwnedRepr<f32>, IxDyn>(&n) {
                Ok(a) => Tensor::f32(a),
                Err(_) => Tensor::i64(npz.by_name::<OwnedRepr<i64>, IxDyn>(&n).expect(&n)),
            };
            inputs.push((input.to_string(), t));
        }
        let cotangent = npz
            .by_name::<OwnedRepr<f32>, IxDyn>("cotangent")
            .expect("cotangent");
        let torch = (0..wrt.len())
            .map(|k| {
                npz.by_name::<OwnedRepr<f32>, IxDyn>(&format!("torch__{k}"))
                    .expect("reference gradient")
            })
            .collect();
        Fixture {
            name: name.to_string(),
            package,
            output: spec["output"].as_str().expect("output").to_string(),
            wrt,
            inputs,
            cotangent,
            torch,
            cache: scratch(&format!("grad-pkg-{name}")),
        }
    }

    /// The output differentiable with respect to `wrt`.
    fn differentiable(&self, wrt: &[&str]) -> Differentiable {
        let options = GradOptions {
            device: Device::Cpu,
            cache_dir: Some(self.cache.clone()),
            max_batch: 256,
            ..Default::default()
        };
        Differentiable::with_options(&self.package, &self.output, wrt, &options)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn inputs(&self) -> Vec<(&str, Tensor)> {
        self.inputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect()
    }

    /// The inputs of the first example only (batch axis of length 1), for batched models.
    fn first_example(&self) -> Vec<(&str, Tensor)> {
        if !self.package.manifest().batch {
            return self.inputs();
        }
        self.inputs
            .iter()
            .map(|(n, t)| {
                let t = match t {
                    Tensor::F32(a) => Tensor::f32(a.slice_axis(Axis(0), (0..1).into()).to_owned()),
                    Tensor::I64(a) => Tensor::i64(a.slice_axis(Axis(0), (0..1).into()).to_owned()),
                };
                (n.as_str(), t)
            })
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.cache);
    }
}

/// `max |got − want| / max |want|`.
fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    diff / scale
}

fn f64s(a: &ArrayD<f32>) -> Vec<f64> {
    a.iter().map(|&v| v as f64).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A small deterministic generator of values in [-1, 1) (xorshift), so the tests need no
/// random-number crate and always see the same directions.
struct Uniform(u64);

impl Uniform {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn array(&mut self, shape: &[usize]) -> ArrayD<f32> {
        ArrayD::from_shape_simple_fn(IxDyn(shape), || self.next())
    }
}

/// The VJP model gives PyTorch's gradients for every tensor of the listing, inputs and weights.
fn matches_pytorch(name: &str) {
    let fx = Fixture::load(name);
    let wrt: Vec<&str> = fx.wrt.iter().map(String::as_str).collect();
    let diff = fx.differentiable(&wrt);
    let got = diff
        .vjp_all(&fx.inputs(), &fx.cotangent)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    for (w, want) in fx.wrt.iter().zip(&fx.torch) {
        let g = got.get(w).expect("a gradient per tensor");
        assert_eq!(g.shape(), want.shape(), "{name}: gradient shape of `{w}`");
        let err = relative_error(&f64s(g), &f64s(want));
        assert!(
            err <= TOLERANCE,
            "{name}: `{w}` differs from PyTorch by {err:.2e}"
        );
    }
}

/// The value of input or weight `name`.
fn value_of(fx: &Fixture, diff: &Differentiable, name: &str) -> ArrayD<f32> {
    match fx.inputs.iter().find(|(n, _)| n == name) {
        Some((_, t)) => t.as_f32().expect("a float input").clone(),
        None => diff.parameter(name).expect("a weight").clone(),
    }
}

/// The directional derivative of the output along `u` for input or weight `name` by central
/// differences with step `h`, in float64, and the direction actually taken once `x ± h·u` is
/// rounded to float32.
fn central_difference(
    fx: &Fixture,
    diff: &Differentiable,
    name: &str,
    u: &ArrayD<f32>,
    h: f32,
) -> (Vec<f64>, Vec<f64>) {
    let x = value_of(fx, diff, name);
    let run = |moved: ArrayD<f32>| -> ArrayD<f32> {
        let mut call: Vec<(&str, Tensor)> = fx
            .inputs()
            .into_iter()
            .filter(|(n, _)| *n != name)
            .collect();
        call.push((name, Tensor::f32(moved)));
        diff.forward(&call)
            .unwrap_or_else(|e| panic!("{}: {e}", fx.name))
    };
    let plus = &x + &(u * h);
    let minus = &x - &(u * h);
    let two_h = 2.0 * h as f64;
    let taken: Vec<f64> = plus
        .iter()
        .zip(minus.iter())
        .map(|(&p, &m)| (p as f64 - m as f64) / two_h)
        .collect();
    let (yp, ym) = (run(plus), run(minus));
    let d = yp
        .iter()
        .zip(ym.iter())
        .map(|(&p, &m)| (p as f64 - m as f64) / two_h)
        .collect();
    (d, taken)
}

/// For inputs and weights `wrt` and random directions `u` (as large as the tensor's values, so
/// `h` is a relative step): with `d` the directional derivative along `u` by central
/// differences, `⟨vjp(d), u⟩ = dᵀ·J·u` must equal `dᵀd`.
///
/// Element-wise, central differences on these float32 ReLU networks agree with exact
/// derivatives only to about 1e-2, whatever the step: below it rounding dominates, above it
/// activations cross a kink within the step (float64 differences of the same graphs in
/// PyTorch do no better). So the check is a scalar over the whole output, with the output's
/// own difference quotient as the cotangent (no cancellation), leaving out the outputs whose
/// quotient changes between steps `h` and `h/2` (a kink was crossed).
fn directions_agree(name: &str, wrt: &[&str], h: f32) {
    let fx = Fixture::load(name);
    let diff = fx.differentiable(wrt);
    let mut rng = Uniform(0x9e37_79b9_7f4a_7c15);
    for w in wrt {
        for round in 0..2 {
            // Directions as large as the tensor's values, so `h` is a relative step.
            let x = value_of(&fx, &diff, w);
            let rms = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64)
                .sqrt()
                .max(1e-3) as f32;
            let u = rng.array(x.shape()) * rms;
            let (full, taken_full) = central_difference(&fx, &diff, w, &u, h);
            let (half, taken_half) = central_difference(&fx, &diff, w, &u, h / 2.0);
            // Richardson extrapolation of the two quotients cancels the O(h²) term; the
            // direction actually taken combines the same way.
            let richardson = |a: &[f64], b: &[f64]| -> Vec<f64> {
                a.iter()
                    .zip(b)
                    .map(|(&a, &b)| (4.0 * b - a) / 3.0)
                    .collect()
            };
            let d = richardson(&full, &half);
            let taken = richardson(&taken_full, &taken_half);
            // Outputs whose difference quotient changes with the step saw an activation cross
            // a kink (or rounding dominate) between the two steps: leave them out.
            let scale = (dot(&d, &d) / d.len() as f64).sqrt();
            let kept: Vec<f64> = d
                .iter()
                .zip(full.iter().zip(&half))
                .map(|(&a, (&f, &b))| {
                    if (f - b).abs() <= 1e-2 * scale {
                        a
                    } else {
                        0.0
                    }
                })
                .collect();
            let share = kept.iter().filter(|v| **v != 0.0).count() as f64 / d.len() as f64;
            let cot = ArrayD::from_shape_vec(
                fx.cotangent.raw_dim(),
                kept.iter().map(|&v| v as f32).collect(),
            )
            .expect("output shape");
            let grads = diff
                .vjp_all(&fx.inputs(), &cot)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let exact = dot(&f64s(grads.get(w).expect("gradient")), &taken);
            let fd = dot(&f64s(&cot), &d);
            let err = (exact - fd).abs() / fd.abs().max(1e-30);
            assert!(
                share >= 0.25,
                "{name}: `{w}`: only {share:.2} of the outputs have a stable difference quotient"
            );
            assert!(
                err <= FD_TOLERANCE,
                "{name}: `{w}`, round {round}: <vjp(d), u> = {exact:.6e} but <d, d> = {fd:.6e} \
                 (relative error {err:.2e})"
            );
        }
    }
}

/// `Jᵀc` with the Jacobian by batched central differences (`step` relative to the input's
/// scale) equals the VJP for random cotangents `c`, to `tolerance` in the Euclidean norm; and
/// for `c = J·u` (no cancellation), `⟨vjp(c), u⟩ = |c|²` to 1e-3.
fn jacobian_transpose_agrees(name: &str, input: &str, step: f32, tolerance: f64) {
    let fx = Fixture::load(name);
    let diff = fx.differentiable(&[input]);
    let inputs = fx.first_example();
    let jac = diff
        .jacobian_with(&inputs, JacobianMethod::FiniteDifference { step })
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .mapv(|v| v as f64);
    let y = diff.forward(&inputs).expect("forward");
    assert_eq!(jac.nrows(), y.len());
    let mut rng = Uniform(0x2545_f491_4f6c_dd1d);
    for _ in 0..3 {
        let cot = rng.array(y.shape());
        let exact = f64s(&diff.vjp(&inputs, &cot).expect("vjp"));
        let from_fd = jac.t().dot(&ndarray::Array1::from(f64s(&cot))).to_vec();
        let err = l2_relative_error(&from_fd, &exact);
        assert!(
            err <= tolerance,
            "{name}: Jᵀc by finite differences differs by {err:.2e}"
        );

        let u = rng.array(&[jac.ncols()]);
        let ju = jac.dot(&ndarray::Array1::from(f64s(&u)));
        let cot = ArrayD::from_shape_vec(y.raw_dim(), ju.iter().map(|&v| v as f32).collect())
            .expect("output shape");
        let exact = dot(&f64s(&diff.vjp(&inputs, &cot).expect("vjp")), &f64s(&u));
        let fd = dot(&f64s(&cot), &ju.to_vec());
        let err = (exact - fd).abs() / fd.abs();
        assert!(
            err <= TOLERANCE,
            "{name}: <vjp(Ju), u> vs |Ju|²: relative error {err:.2e}"
        );
    }
}

/// `|got − want| / |want|` in the Euclidean norm.
fn l2_relative_error(got: &[f64], want: &[f64]) -> f64 {
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm.max(1e-300)).sqrt()
}

fn max_relative(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    relative_error(
        &a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    )
}

mod pytorch {
    use super::matches_pytorch;

    #[test]
    fn digits_mlp() {
        matches_pytorch("digits-mlp");
    }

    #[test]
    fn face_dcgan() {
        matches_pytorch("face-dcgan");
    }

    #[test]
    fn face_encoder() {
        matches_pytorch("face-encoder");
    }

    #[test]
    fn fashion_ccbn() {
        matches_pytorch("fashion-ccbn");
    }

    #[test]
    fn gnn_cora_edgepred() {
        matches_pytorch("gnn-cora-edgepred");
    }

    /// Every package in the listing has a test here.
    #[test]
    fn every_listed_package_is_tested() {
        let tested = [
            "digits-mlp",
            "face-dcgan",
            "face-encoder",
            "fashion-ccbn",
            "gnn-cora-edgepred",
        ];
        for c in super::listing() {
            let name = c["package"].as_str().expect("package");
            assert!(
                tested.contains(&name),
                "`{name}` has no test in tests/grad_packages.rs"
            );
        }
    }
}

mod finite_differences {
    use super::*;

    #[test]
    fn digits_mlp_jacobian_both_ways() {
        let fx = Fixture::load("digits-mlp");
        let diff = fx.differentiable(&["pixels"]);
        let inputs = fx.first_example();
        let rows = diff
            .jacobian_with(&inputs, JacobianMethod::VjpRows)
            .expect("VJP rows");
        // Pixels go up to 16: the step is 16 × 3e-3.
        let fd = diff
            .jacobian_with(&inputs, JacobianMethod::FiniteDifference { step: 3e-3 })
            .expect("finite differences");
        assert_eq!(rows.dim(), (10, 64));
        let err = max_relative(&fd, &rows);
        assert!(err <= TOLERANCE, "Jacobians differ by {err:.2e}");
        // 10 outputs, 64 inputs: rows are cheaper, and `jacobian` picks them.
        let auto = diff.jacobian(&inputs).expect("jacobian");
        assert_eq!(max_relative(&auto, &rows), 0.0);
    }

    #[test]
    fn digits_mlp_directions() {
        directions_agree("digits-mlp", &["pixels", "fc1.weight", "fc2.bias"], 1e-2);
    }

    #[test]
    fn face_dcgan_jacobian_transpose() {
        // Element-wise, central differences on this float32 ReLU network are good to a few
        // 1e-3 at best (rounding below the step, kinks crossed above it); see `directions_agree`.
        jacobian_transpose_agrees("face-dcgan", "z", 1e-4, 1e-2);
    }

    #[test]
    fn face_dcgan_jacobian_is_by_finite_differences() {
        // 100 latent inputs, 12288 outputs: `jacobian` takes finite differences.
        let fx = Fixture::load("face-dcgan");
        let diff = fx.differentiable(&["z"]);
        let inputs = fx.first_example();
        let auto = diff.jacobian(&inputs).expect("jacobian");
        let fd = diff
            .jacobian_with(
                &inputs,
                JacobianMethod::FiniteDifference {
                    step: latentflow_engine::grad::DEFAULT_STEP,
                },
            )
            .expect("finite differences");
        assert_eq!(auto.dim(), (3 * 64 * 64, 100));
        assert_eq!(max_relative(&auto, &fd), 0.0);
    }

    #[test]
    fn face_dcgan_directions() {
        directions_agree(
            "face-dcgan",
            &[
                "z",
                "generator.convTr1.weight",
                "generator.batchNorm3.weight",
                "generator.convTr5.weight",
            ],
            3e-4,
        );
    }

    #[test]
    fn face_encoder_jacobian_rows() {
        // 100 outputs, 12288 inputs: `jacobian` takes VJP rows. With `d` the directional
        // derivative along `u` by central differences, dᵀ·(J·u) must equal dᵀd.
        let fx = Fixture::load("face-encoder");
        let diff = fx.differentiable(&["image"]);
        let inputs = fx.first_example();
        let jac = diff.jacobian(&inputs).expect("jacobian").mapv(|v| v as f64);
        assert_eq!(jac.dim(), (100, 3 * 64 * 64));
        let mut rng = Uniform(0x1234_5678_9abc_def1);
        for _ in 0..3 {
            let u = rng.array(&[1, 3, 64, 64]);
            let d = diff
                .directional_derivative(&inputs, &[("image", u.clone())], 1e-4)
                .expect("directional derivative");
            let d: Vec<f64> = d.iter().copied().collect();
            let ju = jac.dot(&ndarray::Array1::from(f64s(&u))).to_vec();
            let err = (dot(&d, &ju) - dot(&d, &d)).abs() / dot(&d, &d);
            assert!(err <= TOLERANCE, "dᵀJu vs dᵀd: relative error {err:.2e}");
            let err = l2_relative_error(&d, &ju);
            assert!(
                err <= 5e-2,
                "J·u vs finite differences: relative error {err:.2e}"
            );
        }
    }

    #[test]
    fn face_encoder_directions() {
        directions_agree(
            "face-encoder",
            &["image", "blocks.0.0.weight", "head.weight"],
            3e-4,
        );
    }

    #[test]
    fn fashion_ccbn_directions() {
        directions_agree(
            "fashion-ccbn",
            &["z", "y", "fc.weight", "onnx::MatMul_110"],
            3e-4,
        );
    }

    #[test]
    fn gnn_cora_edgepred_directions() {
        directions_agree(
            "gnn-cora-edgepred",
            &["x", "gcn1.weight", "gcn2.bias"],
            1e-3,
        );
    }
}
