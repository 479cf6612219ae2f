//! GAN inversion on real faces (`stages/src/invert.rs`): the domain-regularised optimiser's
//! gradient against its loss, the loss against an independent ONNX Runtime computation, the
//! optimisation itself and the method's central claim on the faces of `data/faces`, determinism
//! across workers, `image-metrics` against scikit-image, and a shortened
//! `pipelines/invert-faces.yaml` end to end.
//!
//! Models: `models/face-dcgan` (z [batch, 100] -> image [batch, 3, 64, 64] in [-1, 1]) and
//! `models/face-encoder` (image -> z). The encoder also serves as the feature network where the
//! feature loss is exercised: any image network will do, and no other one ships.

mod common;

use std::path::Path;
use std::process::Command;

use latentflow_engine::inference::Device;
use latentflow_engine::model::ModelPackage;
use latentflow_stages::invert::{
    mse_psnr, ssim, FusedLoss, GradientMode, Inverter, Net, OptimizeSettings, Targets,
};
use ndarray::{Array1, Array2, ArrayD, Axis, Ix2, IxDyn};
use serde_json::Value as Json;

use common::{latentflow, python, read_npy, root, run_python, scratch, text, write_pipeline};

const LATENT: usize = 100;

// ---------------------------------------------------------------------------------------------
// Helpers.

fn package(name: &str) -> ModelPackage {
    ModelPackage::load(root().join("models").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A net of a committed package with reverse-mode gradients, on the CPU, one intra-op thread.
fn net(name: &str, output: Option<&str>) -> Net {
    Net::open(
        &package(name),
        output,
        GradientMode::Vjp,
        Device::Cpu,
        1,
        256,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The first `n` faces of `data/faces/faces.npy`, `[n, 3, 64, 64]` in [-1, 1].
fn faces(n: usize) -> ArrayD<f32> {
    let all: ArrayD<f32> =
        ndarray_npy::read_npy(root().join("data/faces/faces.npy")).expect("data/faces/faces.npy");
    assert_eq!(all.shape(), [64, 3, 64, 64]);
    all.slice_axis(Axis(0), (0..n).into()).to_owned()
}

/// face-dcgan with face-encoder for the domain term, and the encoder again as the feature
/// network when `feature_weight` is not 0.
fn inverter(domain_weight: f64, feature_weight: f64, steps: usize) -> Inverter {
    Inverter {
        generator: net("face-dcgan", None),
        encoder: Some(net("face-encoder", None)),
        features: (feature_weight != 0.0).then(|| net("face-encoder", Some("z"))),
        settings: OptimizeSettings {
            steps,
            domain_weight,
            feature_weight,
            gradients: GradientMode::Vjp,
            ..Default::default()
        },
        fused: None,
    }
}

/// `E(x)`, the optimiser's starting point.
fn encode(inv: &Inverter, x: &ArrayD<f32>) -> Array2<f32> {
    inv.encoder
        .as_ref()
        .expect("an encoder")
        .forward(x)
        .unwrap()
        .into_dimensionality::<Ix2>()
        .unwrap()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Deterministic uniform numbers in [-1, 1) (a 64-bit LCG), so every run checks the same
/// directions.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

fn read_json(path: &Path) -> Json {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn floats(v: &Json) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The gradient and the loss.

/// Largest accepted error of the exact gradient, relative to `|∇L(z)| |Δz|` (see below).
const GRADIENT_TOLERANCE: f64 = 1e-3;
/// Half-length of the segments along which the gradient is checked.
const SEGMENT: f32 = 1e-3;
/// Points along each segment (both ends included).
const POINTS: usize = 33;

/// Checks `gradient_exact` against central differences of `loss` for every face of `x`.
///
/// Both networks are piecewise linear (ReLU, LeakyReLU) up to the final tanh, so the loss has a
/// kink wherever a unit switches; along a direction on these models the directional derivative
/// jumps by up to 10% within 2e-4. A central difference `L(z + h u) − L(z − h u)` therefore does
/// not estimate `∇L(z)·u` to better than a few 1e-3 at any step: float32 rounding of the loss
/// dominates below h ≈ 3e-5, kinks above. What it does equal, exactly, is the integral of the
/// exact gradient along the segment (the gradient theorem holds across kinks). So the check
/// is: the central difference over `[z − h u, z + h u]` against the trapezoidal integral of
/// `gradient_exact` at `POINTS` points of the segment (the float32 points as realised, so the
/// polygon through them is the path), error relative to `|∇L(z)| |Δz|`. Measured: ≤ 3e-4
/// on these faces; a wrong factor or sign in any term is off by far more than 1e-3.
fn check_gradient(inv: &Inverter, x: &ArrayD<f32>, mask: Option<&ArrayD<f32>>, z: &Array2<f32>) {
    let n = z.nrows();
    let rows = |k: usize| -> Vec<usize> { (0..n).flat_map(|b| vec![b; k]).collect() };
    let t = inv.targets(x.clone(), mask.cloned()).unwrap();
    let g0 = inv.gradient_exact(z, &t).unwrap();
    assert!(g0.iter().all(|v| v.is_finite()));

    // Directions per face: the gradient itself, and a random one.
    let mut rng = Lcg(20240620);
    let directions: Vec<Vec<Array1<f32>>> = (0..n)
        .map(|b| {
            let random = Array1::from_shape_fn(LATENT, |_| rng.next() as f32);
            [g0.row(b).to_owned(), random]
                .into_iter()
                .map(|v| {
                    let norm = v.mapv(|a| a * a).sum().sqrt();
                    v / norm
                })
                .collect()
        })
        .collect();
    let k = directions[0].len();

    // Every point of every segment, as rows: face b, direction j, point p.
    let per_face = k * POINTS;
    let mut zs = Array2::<f32>::zeros((n * per_face, LATENT));
    for (b, face) in directions.iter().enumerate() {
        for (j, u) in face.iter().enumerate() {
            for p in 0..POINTS {
                let s = -SEGMENT + 2.0 * SEGMENT * p as f32 / (POINTS - 1) as f32;
                let r = b * per_face + j * POINTS + p;
                zs.row_mut(r).assign(&(&z.row(b) + &(u * s)));
            }
        }
    }
    let idx = rows(per_face);
    let tx = t.image.select(Axis(0), &idx);
    let tm = t.mask.as_ref().map(|m| m.select(Axis(0), &idx));
    let stacked: Targets = inv.targets(tx, tm).unwrap();
    let grads = inv.gradient_exact(&zs, &stacked).unwrap();
    let loss = inv.loss(&zs, &t, &idx).unwrap().total;

    let mut worst: f64 = 0.0;
    for b in 0..n {
        let gnorm = g0
            .row(b)
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            gnorm > 1e-3,
            "face {b}: |grad| = {gnorm}, too small to check"
        );
        for j in 0..k {
            let first = b * per_face + j * POINTS;
            let last = first + POINTS - 1;
            let delta = loss[last] - loss[first];
            let mut integral = 0.0;
            for p in first..last {
                for i in 0..LATENT {
                    let dz = zs[[p + 1, i]] as f64 - zs[[p, i]] as f64;
                    integral += 0.5 * (grads[[p, i]] as f64 + grads[[p + 1, i]] as f64) * dz;
                }
            }
            let length = (0..LATENT)
                .map(|i| (zs[[last, i]] as f64 - zs[[first, i]] as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let err = (delta - integral).abs() / (gnorm * length);
            worst = worst.max(err);
            assert!(
                err <= GRADIENT_TOLERANCE,
                "face {b}, direction {j}: central difference {:.6e}, integral of the exact \
                 gradient {:.6e}: relative error {err:.2e}",
                delta / length,
                integral / length
            );
            if j == 0 {
                // Along the gradient, the directional derivative is |grad| (to kinks).
                let slope = delta / length;
                assert!(
                    (slope - gnorm).abs() <= 0.05 * gnorm,
                    "face {b}: slope {slope} along the gradient, |grad| {gnorm}"
                );
            }
        }
    }
    eprintln!("largest relative error of the exact gradient: {worst:.2e}");
}

#[test]
fn the_exact_gradient_is_the_derivative_of_the_loss() {
    let x = faces(2);

    // The published loss: pixels + 2 × domain term.
    let mut published = inverter(2.0, 0.0, 0);
    let z = encode(&published, &x);
    check_gradient(&published, &x, None, &z);

    // The finite-difference fallback (one pair of forward rows per latent axis, step 1e-3)
    // agrees too, to what kinks allow at that step (measured 9e-3, relative L2).
    let x1 = faces(1);
    let z1 = z.slice_axis(Axis(0), (0..1).into()).to_owned();
    let t = published.targets(x1, None).unwrap();
    let exact = published.gradient_exact(&z1, &t).unwrap();
    let fd = published.gradient_fd(&z1, &t).unwrap();
    let rel = (&fd - &exact).mapv(|v| v * v).sum().sqrt() / exact.mapv(|v| v * v).sum().sqrt();
    assert!(
        rel < 5e-2,
        "gradient_fd differs from gradient_exact by {rel:.2e}"
    );
    // `gradient` picks the exact one when every model is differentiable, unless told not to.
    assert_eq!(published.gradient(&z1, &t).unwrap(), exact);
    published.settings.gradients = GradientMode::FiniteDifference;
    assert_eq!(published.gradient(&z1, &t).unwrap(), fd);
    drop(published);

    // Every term at once: a soft mask on the pixels, a feature loss, the domain term, away from
    // the encoder's codes.
    let inv = inverter(0.5, 0.5, 0);
    let mask = ArrayD::from_shape_fn(x.raw_dim(), |i| {
        if i[2] < 32 {
            1.0
        } else {
            0.25 + 0.5 * ((i[3] % 7) as f32 / 6.0)
        }
    });
    let mut rng = Lcg(7);
    let z = encode(&inv, &x).mapv(|v| v + 0.3 * rng.next() as f32);
    check_gradient(&inv, &x, Some(&mask), &z);
}

/// The loss by ONNX Runtime's Python API on the packages' own `model.onnx` files and numpy in
/// float64: `sum(m (G(z) − x)²) / sum(m) + fw mean((E(G(z)) − E(x))²) + dw mean((z − E(G(z)))²)`.
const LOSS_REFERENCE: &str = r#"
import json, sys
import numpy as np
import onnxruntime as ort

g_path, e_path, d = sys.argv[1:4]
spec = json.load(open(d + "/spec.json"))
o = ort.SessionOptions()
o.intra_op_num_threads = 1
G = ort.InferenceSession(g_path, o, providers=["CPUExecutionProvider"])
E = ort.InferenceSession(e_path, o, providers=["CPUExecutionProvider"])
z, x, m = (np.load(d + f"/{n}.npy") for n in ("z", "x", "mask"))
img = G.run(None, {"z": z})[0]
ez = E.run(None, {"image": img})[0]
ex = E.run(None, {"image": x})[0]
f64 = lambda a: a.astype(np.float64).reshape(len(a), -1)
pixel = (f64(m) * (f64(img) - f64(x)) ** 2).sum(1) / f64(m).sum(1)
feature = ((f64(ez) - f64(ex)) ** 2).mean(1)
domain = ((f64(z) - f64(ez)) ** 2).mean(1)
total = pixel + spec["feature_weight"] * feature + spec["domain_weight"] * domain
print(json.dumps({"total": total.tolist(), "pixel": pixel.tolist(), "domain": domain.tolist()}))
"#;

#[test]
fn the_composed_loss_graph_gives_the_loss_and_gradient_of_the_separate_models() {
    // One VJP call of the composed graph against the model-by-model computation, at codes
    // moved away from E(x) so that both terms matter.
    let x = faces(3);
    for w in [2.0, 0.0] {
        let inv = inverter(w, 0.0, 0);
        let mut z = encode(&inv, &x);
        let mut rng = Lcg(5);
        z.mapv_inplace(|v| v + 0.3 * rng.next() as f32);
        let fused = FusedLoss::open(
            &package("face-dcgan"),
            Some(&package("face-encoder")),
            w,
            Device::Cpu,
            1,
            256,
        )
        .unwrap();
        let (loss, grad) = fused.loss_and_gradient(&z, &x).unwrap();
        let t = inv.targets(x.clone(), None).unwrap();
        let want = inv.loss(&z, &t, &[0, 1, 2]).unwrap().total;
        let want_grad = inv.gradient_exact(&z, &t).unwrap();
        for (a, b) in loss.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "domain weight {w}: loss {a} vs {b}"
            );
        }
        let num: f64 = grad
            .iter()
            .zip(want_grad.iter())
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = want_grad.iter().map(|b| (*b as f64).powi(2)).sum();
        let err = (num / den).sqrt();
        assert!(
            err <= 1e-4,
            "domain weight {w}: gradients differ by {err:.2e} (relative L2)"
        );
    }
}

#[test]
fn the_loss_matches_an_independent_onnxruntime_computation() {
    let (dw, fw) = (2.0, 0.5);
    let inv = inverter(dw, fw, 0);
    let x = faces(3);
    let mask = ArrayD::from_shape_fn(x.raw_dim(), |i| ((i[0] + i[2] + 2 * i[3]) % 5) as f32 / 4.0);
    let mut rng = Lcg(11);
    let z = encode(&inv, &x).mapv(|v| v + 0.5 * rng.next() as f32);
    let t = inv.targets(x.clone(), Some(mask.clone())).unwrap();
    let ours = inv.loss(&z, &t, &[0, 1, 2]).unwrap();

    let dir = scratch("invert-loss");
    ndarray_npy::write_npy(dir.join("z.npy"), &z).unwrap();
    ndarray_npy::write_npy(dir.join("x.npy"), &x).unwrap();
    ndarray_npy::write_npy(dir.join("mask.npy"), &mask).unwrap();
    std::fs::write(
        dir.join("spec.json"),
        format!("{{\"domain_weight\": {dw}, \"feature_weight\": {fw}}}"),
    )
    .unwrap();
    let r = run_python(
        LOSS_REFERENCE,
        &[
            &package("face-dcgan").onnx_path(),
            &package("face-encoder").onnx_path(),
            &dir,
        ],
    );
    for (name, got) in [
        ("total", &ours.total),
        ("pixel", &ours.pixel),
        ("domain", &ours.domain),
    ] {
        let want = floats(&r[name]);
        assert_eq!(want.len(), 3);
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            let rel = (g - w).abs() / w.abs();
            assert!(
                rel <= 1e-5,
                "{name} of face {b}: {g} here, {w} by onnxruntime/numpy"
            );
        }
    }
    // The feature term is really in the total (the weights are not ignored).
    for b in 0..3 {
        assert!(ours.total[b] > ours.pixel[b] + dw * ours.domain[b] + 1e-4);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Optimisation on real faces.

#[test]
fn optimising_lowers_the_loss_steadily() {
    let steps = 40;
    let inv = inverter(2.0, 0.0, steps);
    let x = faces(4);
    let z0 = encode(&inv, &x);
    let t = inv.targets(x, None).unwrap();
    let o = inv.optimize(z0.clone(), &t).unwrap();

    assert_eq!(o.curve.dim(), (4, steps + 1));
    assert_eq!(o.z.dim(), (4, LATENT));
    assert!(o.curve.iter().all(|v| v.is_finite()));
    // The curve starts at the loss of E(x) and ends at that of the result.
    for b in 0..4 {
        assert_eq!(o.curve[[b, 0]], o.initial.total[b] as f32);
        assert_eq!(o.curve[[b, steps]], o.last.total[b] as f32);
    }
    let again = inv.loss(&z0, &t, &[0, 1, 2, 3]).unwrap();
    assert_eq!(again.total, o.initial.total);
    let last = inv.loss(&o.z, &t, &[0, 1, 2, 3]).unwrap();
    assert_eq!(last.total, o.last.total);
    // The image returned is G of the codes returned.
    let image = inv.generator.forward(&o.z.clone().into_dyn()).unwrap();
    assert_eq!(image, o.image);

    // The batch-mean loss falls over every window of 5 steps, and by well over a third.
    let curve = o.curve.mean_axis(Axis(0)).unwrap();
    let windows: Vec<f32> = curve
        .as_slice()
        .unwrap()
        .chunks(5)
        .map(|w| w.iter().sum::<f32>() / w.len() as f32)
        .collect();
    for w in windows.windows(2) {
        assert!(w[1] < w[0], "window means {windows:?}");
    }
    let (first, end) = (curve[0], curve[steps]);
    assert!(end < 0.6 * first, "mean loss {first} -> {end}");
    for b in 0..4 {
        assert!(
            o.last.total[b] < 0.8 * o.initial.total[b],
            "face {b}: {} -> {}",
            o.initial.total[b],
            o.last.total[b]
        );
    }
}

/// The optimisation of `benches/invert_python.py` (numpy Adam over ONNX Runtime sessions of
/// the packages' `model.onnx` and of the VJP models the Rust nets run), on the codes and faces
/// saved by the test; prints the codes and loss curve it reaches.
const ADAM_REFERENCE: &str = r#"
import json, sys
import numpy as np

bench, g, gv, e, ev, d = sys.argv[1:7]
sys.path.insert(0, bench)
from invert_python import Forward, Vjp, optimise

spec = json.load(open(d + "/spec.json"))
z, curve, _, _ = optimise(
    Forward(g, 1), Vjp(gv, 1), Forward(e, 1), Vjp(ev, 1),
    np.load(d + "/x.npy"), np.load(d + "/z0.npy"),
    spec["steps"], spec["lr"], spec["domain_weight"],
)
print(json.dumps({"z": z.astype(np.float64).ravel().tolist(), "curve": curve.T.ravel().tolist()}))
"#;

#[test]
fn adam_steps_match_the_python_reference() {
    // Same steps as the Python loop the benchmark compares against: the update rule (moments,
    // bias corrections, learning rate) and the loss, step by step.
    let (n, steps) = (2, 5);
    let inv = inverter(2.0, 0.0, steps);
    let x = faces(n);
    let z0 = encode(&inv, &x);
    let t = inv.targets(x.clone(), None).unwrap();
    let o = inv.optimize(z0.clone(), &t).unwrap();

    let dir = scratch("invert-adam");
    ndarray_npy::write_npy(dir.join("x.npy"), &x).unwrap();
    ndarray_npy::write_npy(dir.join("z0.npy"), &z0).unwrap();
    std::fs::write(
        dir.join("spec.json"),
        format!(
            "{{\"steps\": {steps}, \"lr\": {}, \"domain_weight\": 2.0}}",
            inv.settings.lr
        ),
    )
    .unwrap();
    let vjp = |pkg: &str, output: &str, wrt: &str| {
        latentflow_engine::grad::vjp_model(&package(pkg), output, &[wrt.to_string()]).unwrap()
    };
    let r = run_python(
        ADAM_REFERENCE,
        &[
            &root().join("benches"),
            &package("face-dcgan").onnx_path(),
            &vjp("face-dcgan", "image", "z"),
            &package("face-encoder").onnx_path(),
            &vjp("face-encoder", "z", "image"),
            &dir,
        ],
    );
    let z = floats(&r["z"]);
    let curve = floats(&r["curve"]);
    assert_eq!((z.len(), curve.len()), (n * LATENT, n * (steps + 1)));
    let dz =
        o.z.iter()
            .zip(&z)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
    eprintln!("largest difference of the codes after {steps} steps: {dz:.2e}");
    // Each step moves every coordinate by about lr = 0.01; the two differ by float32 rounding
    // of the gradients (measured 1.2e-7).
    assert!(dz <= 1e-5, "codes differ from the Python loop's by {dz}");
    for (i, (a, b)) in o.curve.iter().zip(&curve).enumerate() {
        assert!(
            (*a as f64 - b).abs() <= 1e-5 * b.abs(),
            "loss at step {} of face {}: {a} here, {b} in Python",
            i % (steps + 1),
            i / (steps + 1)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_the_domain_term_pixels_fit_better_but_codes_leave_the_domain() {
    // The method's claim (in-domain inversion): the domain term trades a little pixel
    // accuracy for codes whose generated image the encoder maps back to them.
    let (n, steps) = (8, 30);
    let x = faces(n);
    let with = inverter(2.0, 0.0, steps);
    let without = inverter(0.0, 0.0, steps);
    let z0 = encode(&with, &x);
    let t = with.targets(x, None).unwrap();
    let a = with.optimize(z0.clone(), &t).unwrap();
    let b = without.optimize(z0, &t).unwrap();
    // Both start from the same codes.
    assert_eq!(a.initial.pixel, b.initial.pixel);
    assert_eq!(a.initial.domain, b.initial.domain);

    let (pix_with, pix_without) = (mean(&a.last.pixel), mean(&b.last.pixel));
    let (gap_with, gap_without) = (mean(&a.last.domain), mean(&b.last.domain));
    let (pix0, gap0) = (mean(&a.initial.pixel), mean(&a.initial.domain));
    eprintln!(
        "pixel MSE: start {pix0:.4}, domain weight 2 {pix_with:.4}, 0 {pix_without:.4}; \
         domain gap: start {gap0:.4}, weight 2 {gap_with:.4}, 0 {gap_without:.4}"
    );
    // Pixel-only optimisation reconstructs better (lower MSE)...
    assert!(pix_without < 0.9 * pix_with, "{pix_without} vs {pix_with}");
    assert!(
        pix_without < 0.8 * pix0,
        "{pix_without} vs {pix0} at the start"
    );
    // ...but its codes are much further from E(G(z)).
    assert!(gap_without > 2.0 * gap_with, "{gap_without} vs {gap_with}");
    assert!(gap_with < 0.5 * gap0, "{gap_with} vs {gap0} at the start");
    // Face by face too.
    for i in 0..n {
        assert!(b.last.pixel[i] < a.last.pixel[i], "face {i}");
        assert!(b.last.domain[i] > a.last.domain[i], "face {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Through the CLI.

fn faces_path() -> String {
    root().join("data/faces/faces.npy").display().to_string()
}

fn model_path(name: &str) -> String {
    root().join("models").join(name).display().to_string()
}

fn stage_batches(out: &Path, stage: &str) -> u64 {
    let m = read_json(&out.join("metrics.json"));
    m["entries"][stage]["batches"]
        .as_u64()
        .unwrap_or_else(|| panic!("no batches of `{stage}` in metrics.json"))
}

#[test]
fn one_and_two_workers_give_identical_codes() {
    let dir = scratch("invert-workers");
    let yaml = format!(
        "name: invert-workers
settings:
  epoch_size: 6
sources:
  - name: faces
    kind: npy
    params:
      arrays: {{image: {faces}}}
      limit: 6
stages:
  - name: encode
    kind: invert
    params: {{encoder: {enc}}}
  - name: refine
    kind: optimize
    params: {{generator: {gen}, encoder: {enc}, domain_weight: 2.0, steps: 8}}
sinks:
  - {{name: codes, kind: npy, params: {{fields: [z_opt, recon, loss, domain_gap]}}}}
",
        faces = faces_path(),
        enc = model_path("face-encoder"),
        gen = model_path("face-dcgan"),
    );
    let file = write_pipeline(&dir, "workers.yaml", &yaml);
    let mut outs = Vec::new();
    for w in ["1", "2"] {
        let out = dir.join(format!("out{w}"));
        let o = latentflow(&[
            "run",
            file.to_str().unwrap(),
            "-w",
            w,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        outs.push(out);
    }
    // One worker optimises the 6 faces as one batch, two workers in at least two (how the
    // records are shared out varies from run to run): results that depended on who else is in
    // the batch would differ.
    assert_eq!(stage_batches(&outs[0], "refine"), 1);
    assert!(stage_batches(&outs[1], "refine") >= 2);
    for f in [
        "z_opt.npy",
        "recon.npy",
        "loss.npy",
        "domain_gap.npy",
        "keys.txt",
    ] {
        let a = std::fs::read(outs[0].join(f)).unwrap();
        let b = std::fs::read(outs[1].join(f)).unwrap();
        assert!(a == b, "{f} differs between 1 and 2 workers");
    }
    let (shape, z) = read_npy(&outs[0].join("z_opt.npy"));
    assert_eq!(shape, [6, LATENT]);
    assert!(z.iter().all(|v| v.is_finite()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// SSIM, PSNR and MSE by scikit-image, for stacks of image pairs: argv is the folder, then
/// `name:low:high` for each pair of stacks `<name>_a.npy`, `<name>_b.npy` whose values span
/// [low, high]; images are mapped to [0, 1] in float64 first, like `image-metrics` does.
const SKIMAGE_REFERENCE: &str = r#"
import json, sys
import numpy as np
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

d = sys.argv[1]
out = {}
for spec in sys.argv[2:]:
    name, lo, hi = spec.split(":")
    lo, hi = float(lo), float(hi)
    a, b = ((np.load(f"{d}/{name}_{s}.npy").astype(np.float64) - lo) / (hi - lo) for s in "ab")
    rows = []
    for x, y in zip(a, b):
        rows.append({
            "ssim": structural_similarity(
                x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                data_range=1.0, channel_axis=0 if x.ndim == 3 else None),
            "psnr": peak_signal_noise_ratio(x, y, data_range=1.0),
            "mse": mean_squared_error(x, y),
        })
    out[name] = rows
print(json.dumps(out))
"#;

#[test]
fn image_metrics_match_scikit_image() {
    let dir = scratch("invert-metrics");
    let mut rng = Lcg(3);
    // Faces against other faces, a noisy copy, a low-contrast copy and a shifted copy.
    let x = faces(7);
    let target = x.slice_axis(Axis(0), (0..5).into()).to_owned();
    let mut recon = target.clone();
    recon
        .index_axis_mut(Axis(0), 0)
        .assign(&x.index_axis(Axis(0), 5));
    recon
        .index_axis_mut(Axis(0), 1)
        .assign(&x.index_axis(Axis(0), 6));
    recon
        .index_axis_mut(Axis(0), 2)
        .mapv_inplace(|v| (v + 0.2 * rng.next() as f32).clamp(-1.0, 1.0));
    recon
        .index_axis_mut(Axis(0), 3)
        .mapv_inplace(|v| 0.5 * v + 0.2);
    let shifted = ArrayD::from_shape_fn(IxDyn(&[3, 64, 64]), |i| {
        target[[4, i[0], (i[1] + 2) % 64, (i[2] + 63) % 64]]
    });
    recon.index_axis_mut(Axis(0), 4).assign(&shifted);
    ndarray_npy::write_npy(dir.join("faces_a.npy"), &target).unwrap();
    ndarray_npy::write_npy(dir.join("faces_b.npy"), &recon).unwrap();

    // The stage, through the CLI.
    let yaml = format!(
        "name: invert-metrics
sources:
  - name: pairs
    kind: npy
    params:
      arrays: {{image: {a}, recon: {b}}}
stages:
  - name: score
    kind: image-metrics
    params: {{target: image, fields: [recon], range: [-1, 1]}}
sinks:
  - {{name: scores, kind: jsonl, params: {{fields: [recon_mse, recon_psnr, recon_ssim]}}}}
",
        a = dir.join("faces_a.npy").display(),
        b = dir.join("faces_b.npy").display(),
    );
    let file = write_pipeline(&dir, "metrics.yaml", &yaml);
    let out = dir.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stage: Vec<Json> = std::fs::read_to_string(out.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(stage.len(), 5);

    // The functions directly, on shapes the stage never sees here: non-square colour images in
    // [0, 255] and grey [H, W] images in [0, 1].
    let a = ArrayD::from_shape_fn(IxDyn(&[2, 3, 20, 33]), |i| {
        (127.5 + 127.5 * ((i[1] * 7 + i[2] * 3 + i[3]) as f32 * 0.37).sin()).round()
    });
    let b = a.mapv(|v| (v + 40.0 * rng.next() as f32).clamp(0.0, 255.0));
    let c = ArrayD::from_shape_fn(IxDyn(&[2, 17, 12]), |i| {
        0.5 + 0.4 * ((i[0] + i[1] * 2) as f32 * 0.5).cos() * (i[2] as f32 * 0.3).sin()
    });
    let d = c.mapv(|v| (v + 0.1 * rng.next() as f32).clamp(0.0, 1.0));
    ndarray_npy::write_npy(dir.join("wide_a.npy"), &a).unwrap();
    ndarray_npy::write_npy(dir.join("wide_b.npy"), &b).unwrap();
    ndarray_npy::write_npy(dir.join("grey_a.npy"), &c).unwrap();
    ndarray_npy::write_npy(dir.join("grey_b.npy"), &d).unwrap();

    let r = Command::new(python())
        .arg("-c")
        .arg(SKIMAGE_REFERENCE)
        .arg(&dir)
        .args(["faces:-1:1", "wide:0:255", "grey:0:1"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", text(&r));
    let sk: Json = serde_json::from_slice(&r.stdout).unwrap();

    let close = |what: &str, ours: f64, theirs: &Json, tol: f64| {
        let theirs = theirs
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: {theirs}"));
        assert!(
            (ours - theirs).abs() <= tol,
            "{what}: {ours} here, {theirs} by scikit-image"
        );
    };
    for (i, rec) in stage.iter().enumerate() {
        let want = &sk["faces"][i];
        close(
            &format!("face pair {i} SSIM"),
            rec["recon_ssim"].as_f64().unwrap(),
            &want["ssim"],
            1e-6,
        );
        close(
            &format!("face pair {i} PSNR"),
            rec["recon_psnr"].as_f64().unwrap(),
            &want["psnr"],
            1e-6,
        );
        close(
            &format!("face pair {i} MSE"),
            rec["recon_mse"].as_f64().unwrap(),
            &want["mse"],
            1e-9,
        );
    }
    // The pairs differ enough to tell metrics apart.
    let ssims: Vec<f64> = stage
        .iter()
        .map(|r| r["recon_ssim"].as_f64().unwrap())
        .collect();
    assert!(ssims.iter().all(|s| (-1.0..0.99).contains(s)), "{ssims:?}");
    for (name, p, q, range) in [("wide", &a, &b, [0.0, 255.0]), ("grey", &c, &d, [0.0, 1.0])] {
        for i in 0..2 {
            let (x, y) = (
                p.index_axis(Axis(0), i).to_owned(),
                q.index_axis(Axis(0), i).to_owned(),
            );
            let want = &sk[name][i];
            close(
                &format!("{name} {i} SSIM"),
                ssim(&x, &y, range).unwrap(),
                &want["ssim"],
                1e-6,
            );
            let (mse, psnr) = mse_psnr(&x, &y, range);
            close(&format!("{name} {i} PSNR"), psnr, &want["psnr"], 1e-6);
            close(&format!("{name} {i} MSE"), mse, &want["mse"], 1e-9);
        }
    }
    // An image against itself.
    let same = ssim(
        &c.index_axis(Axis(0), 0).to_owned(),
        &c.index_axis(Axis(0), 0).to_owned(),
        [0.0, 1.0],
    );
    assert!((same.unwrap() - 1.0).abs() < 1e-12);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pipelines/invert-faces.yaml` on its first 6 faces with 12 Adam steps instead of 100, run
/// from a scratch folder with 2 workers.
#[test]
fn a_shortened_invert_faces_run_writes_every_report() {
    let dir = scratch("invert-faces");
    let original = std::fs::read_to_string(root().join("pipelines/invert-faces.yaml")).unwrap();
    let mut yaml = String::new();
    let (mut limited, mut shortened) = (false, 0);
    for line in original.lines() {
        if line.contains("../data/faces/faces.npy") {
            yaml.push_str(&line.replace("../data/faces/faces.npy", &faces_path()));
            yaml.push_str("\n      limit: 6\n");
            limited = true;
        } else if line.trim() == "steps: 100" {
            yaml.push_str(&line.replace("100", "12"));
            yaml.push('\n');
            shortened += 1;
        } else {
            let models = format!("{}/", root().join("models").display());
            yaml.push_str(&line.replace("../models/", &models));
            yaml.push('\n');
        }
    }
    assert!(
        limited && shortened == 2,
        "pipelines/invert-faces.yaml changed shape"
    );
    let file = write_pipeline(&dir, "invert-faces.yaml", &yaml);
    let out = dir.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "-w",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.join("errors.jsonl").exists());

    // summary.json: every field of every face, finite.
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["records"], 6);
    let fields = summary["fields"].as_object().unwrap();
    assert_eq!(fields.len(), 14);
    for (name, f) in fields {
        assert_eq!(f["count"], 6, "{name}");
        assert_eq!(f["non_finite_or_missing"], 0, "{name}");
    }
    let m = |f: &str| {
        summary["fields"][f]["mean"]
            .as_f64()
            .unwrap_or_else(|| panic!("{f}"))
    };
    eprintln!(
        "PSNR: encoder {:.2}, optimised {:.2}, pixels only {:.2}; domain gap {:.4} -> {:.4} \
         (pixels only {:.4})",
        m("recon_enc_psnr"),
        m("recon_psnr"),
        m("recon_pix_psnr"),
        m("domain_gap_init"),
        m("domain_gap"),
        m("pix_domain_gap")
    );
    assert!(m("recon_psnr") >= m("recon_enc_psnr"));
    assert!(m("recon_pix_psnr") > m("recon_psnr") + 0.5);
    assert!(m("recon_pix_ssim") > m("recon_enc_ssim"));
    assert!(m("recon_pix_mse") < m("recon_enc_mse"));
    assert!(m("domain_gap") < 0.8 * m("domain_gap_init"));
    assert!(m("pix_domain_gap") > m("domain_gap"));
    for f in ["recon_enc_ssim", "recon_ssim", "recon_pix_ssim"] {
        assert!((0.0..1.0).contains(&m(f)), "{f}");
    }
    for f in ["recon_enc_psnr", "recon_psnr", "recon_pix_psnr"] {
        assert!((10.0..40.0).contains(&m(f)), "{f}");
    }
    assert!(m("optimize_ms") > 0.0 && m("pix_optimize_ms") > 0.0);

    // loss.json and loss.png: two curves of 13 points, falling.
    let curves = read_json(&out.join("loss.json"));
    for f in ["loss_curve", "pix_loss_curve"] {
        let c = floats(&curves[f]["mean"]);
        assert_eq!(c.len(), 13, "{f}");
        assert!(c[12] < c[0], "{f}: {c:?}");
    }
    let with_domain = floats(&curves["loss_curve"]["mean"]);
    assert!(with_domain[12] < 0.7 * with_domain[0], "{with_domain:?}");
    let plot = image::open(out.join("loss.png")).unwrap().to_rgb8();
    assert!(plot.width() > 100 && plot.height() > 100);
    let first = *plot.get_pixel(0, 0);
    assert!(plot.pixels().any(|p| *p != first), "loss.png is blank");

    // sheet.png: 6 rows of input | encoder | optimised | pixels only, 64-pixel tiles with
    // 2-pixel gutters.
    let sheet = image::open(out.join("sheet.png")).unwrap().to_rgb8();
    assert_eq!(sheet.dimensions(), (4 * 66 + 2, 6 * 66 + 2));

    // z_opt.npy and keys.txt, in source order.
    let (shape, z) = read_npy(&out.join("z_opt.npy"));
    assert_eq!(shape, [6, LATENT]);
    assert!(z.iter().all(|v| v.is_finite()));
    let keys = std::fs::read_to_string(out.join("keys.txt")).unwrap();
    let want: Vec<String> = (0..6).map(|i| format!("faces:{i:06}")).collect();
    assert_eq!(keys.lines().collect::<Vec<_>>(), want);

    // recon/: one 64 x 64 PNG per face, G(z_opt) to 8-bit rounding.
    let z = Array2::from_shape_vec((6, LATENT), z.iter().map(|&v| v as f32).collect()).unwrap();
    let g = net("face-dcgan", None).forward(&z.into_dyn()).unwrap();
    let mut pngs: Vec<_> = std::fs::read_dir(out.join("recon"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), 6);
    for (i, p) in pngs.iter().enumerate() {
        assert_eq!(
            p.file_name().unwrap().to_str().unwrap(),
            format!("faces_{i:06}.png")
        );
        let img = image::open(p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        let mut worst: f32 = 0.0;
        for (x, y, px) in img.enumerate_pixels() {
            for c in 0..3 {
                let v = px[c] as f32 / 255.0 * 2.0 - 1.0;
                worst = worst.max((v - g[[i, c, y as usize, x as usize]]).abs());
            }
        }
        assert!(worst <= 1.0 / 255.0 + 1e-4, "{}: {worst}", p.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
