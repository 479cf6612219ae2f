//! Region editing: the generalised eigensolver against SciPy, directions from exact VJP rows
//! against finite differences, locality on the face generator, and the `edit` and `resample`
//! stages through the CLI.

mod common;

use std::path::Path;
use std::process::Command;

use latentflow_engine::inference::Device;
use latentflow_engine::model::ModelPackage;
use latentflow_stages::invert::{GradientMode, Net};
use latentflow_stages::region::{
    factorise, generalized_symmetric_eigen, locality, normal_codes, FactorSettings, JacobianSource,
    RegionMask,
};
use nalgebra::DMatrix;
use ndarray::{Array2, ArrayD, IxDyn};

use common::{latentflow, max_abs_diff, python, read_npy, root, scratch, text, write_pipeline};

/// The eye and mouth boxes of `pipelines/edit-region.yaml`.
const EYES: [usize; 4] = [18, 28, 46, 38];
const MOUTH: [usize; 4] = [24, 43, 40, 52];

fn write_f64_npy(path: &Path, m: &DMatrix<f64>) {
    let a = ndarray::Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)]);
    let f = std::fs::File::create(path).unwrap();
    ndarray_npy::WriteNpyExt::write_npy(&a, f).unwrap();
}

fn write_f32_npy(path: &Path, a: &ArrayD<f32>) {
    let f = std::fs::File::create(path).unwrap();
    ndarray_npy::WriteNpyExt::write_npy(a, f).unwrap();
}

/// A deterministic pseudo-random matrix with entries in [-1, 1).
fn matrix(n: usize, m: usize, seed: u64) -> DMatrix<f64> {
    let mut s = seed;
    DMatrix::from_fn(n, m, |_, _| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    })
}

#[test]
fn generalized_eigenpairs_satisfy_the_equation_and_match_scipy() {
    let n = 40;
    let x = matrix(n, n, 0x1234_5678);
    let a = (&x + x.transpose()) * 0.5;
    let y = matrix(3 * n, n, 0x8765_4321);
    // SPD and badly scaled, like M_b.
    let b = y.transpose() * &y / (3 * n) as f64 + DMatrix::identity(n, n) * 1e-3;
    let (values, vectors) = generalized_symmetric_eigen(&a, &b).unwrap();
    assert!(
        values.windows(2).all(|w| w[0] >= w[1]),
        "sorted, descending"
    );
    for (k, value) in values.iter().enumerate() {
        let v = vectors.column(k);
        let residual = (&a * v - &b * v * *value).norm() / (a.norm() * v.norm());
        assert!(residual <= 1e-6, "pair {k}: residual {residual:.2e}");
        let bnorm = (v.transpose() * &b * v)[(0, 0)];
        assert!((bnorm - 1.0).abs() < 1e-9, "pair {k}: vᵀBv = {bnorm}");
    }
    // A dense reference: scipy.linalg.eigh(A, B).
    let dir = scratch("region-eigh");
    write_f64_npy(&dir.join("a.npy"), &a);
    write_f64_npy(&dir.join("b.npy"), &b);
    let script = "import sys, numpy as np, scipy.linalg as sl\n\
                  d = sys.argv[1]\n\
                  w, v = sl.eigh(np.load(d + '/a.npy'), np.load(d + '/b.npy'))\n\
                  np.save(d + '/w.npy', w[::-1].astype(np.float32))\n\
                  np.save(d + '/v.npy', np.ascontiguousarray(v[:, ::-1], dtype=np.float32))\n";
    let o = Command::new(python())
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let (_, w) = read_npy(&dir.join("w.npy"));
    let (_, v) = read_npy(&dir.join("v.npy"));
    for k in 0..n {
        let scale = values[0].abs().max(1.0);
        assert!(
            (values[k] - w[k]).abs() <= 1e-5 * scale,
            "eigenvalue {k}: {} vs scipy {}",
            values[k],
            w[k]
        );
        // Eigenvectors agree up to sign (all eigenvalues of this matrix are distinct).
        let ours: Vec<f64> = vectors.column(k).iter().copied().collect();
        let theirs: Vec<f64> = (0..n).map(|i| v[i * n + k]).collect();
        let dot: f64 = ours.iter().zip(&theirs).map(|(a, b)| a * b).sum();
        let norms = ours.iter().map(|a| a * a).sum::<f64>().sqrt()
            * theirs.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(
            (dot / norms).abs() > 1.0 - 1e-4,
            "eigenvector {k}: cosine {}",
            dot / norms
        );
    }
    // Not positive definite: a clear error, not a wrong answer.
    let err = generalized_symmetric_eigen(&a, &(-&b)).unwrap_err();
    assert!(err.contains("positive definite"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn generator(mode: GradientMode) -> (Net, Vec<usize>) {
    let pkg = ModelPackage::load(root().join("models/face-dcgan")).unwrap();
    let net = Net::open(&pkg, None, mode, Device::Cpu, 2, 128).unwrap();
    (net, vec![3, 64, 64])
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn directions_from_vjp_rows_and_finite_differences_agree() {
    let (net, shape) = generator(GradientMode::Vjp);
    let region = RegionMask::from_box(64, 64, EYES).unwrap();
    // One code: 4096 VJP rows (channels summed in the cotangent) against 200 forward rows.
    let codes = normal_codes(1, 100, 11);
    let exact = FactorSettings {
        jacobian: JacobianSource::Vjp,
        ..FactorSettings::default()
    };
    let fd = FactorSettings::default();
    let a = factorise(&net, &codes, &shape, &region, &exact, 128).unwrap();
    let b = factorise(&net, &codes, &shape, &region, &fd, 128).unwrap();
    for k in 0..3 {
        let c = cosine(
            a.vectors.row(k).as_slice().unwrap(),
            b.vectors.row(k).as_slice().unwrap(),
        );
        assert!(c >= 0.99, "direction {k}: cosine {c:.4} between VJP and FD");
        let rel = (a.eigenvalues[k] - b.eigenvalues[k]).abs() / a.eigenvalues[k];
        assert!(
            rel < 1e-2,
            "eigenvalue {k}: {} vs {}",
            a.eigenvalues[k],
            b.eigenvalues[k]
        );
    }
    assert!(a.eigenvalues[0] > a.eigenvalues[1] && a.eigenvalues[1] > a.eigenvalues[2]);
}

#[test]
fn region_directions_are_local_on_the_face_generator() {
    // The method's claim, as the pipeline measures it: directions from 5 codes, evaluated on
    // 50 fresh codes at strength 3, against the top direction of JᵀJ over the whole image.
    let (net, shape) = generator(GradientMode::FiniteDifference);
    let codes = normal_codes(5, 100, 0);
    let eval = normal_codes(50, 100, 1);
    for (name, b) in [("eyes", EYES), ("mouth", MOUTH)] {
        let region = RegionMask::from_box(64, 64, b).unwrap();
        let d = factorise(
            &net,
            &codes,
            &shape,
            &region,
            &FactorSettings::default(),
            128,
        )
        .unwrap();
        let ours = locality(&net, &eval, &d.vectors.row(0).to_owned(), 3.0, &region).unwrap();
        let global = locality(&net, &eval, &d.global, 3.0, &region).unwrap();
        let gain = ours.ratio() / global.ratio();
        assert!(
            gain >= 6.0,
            "{name}: in/out ratio {:.2} against the global direction's {:.2}: gain {gain:.2}",
            ours.ratio(),
            global.ratio()
        );
        // And the region's own direction changes the region more than the outside.
        assert!(ours.ratio() > 1.0, "{name}: ratio {:.2}", ours.ratio());
    }
}

/// `n` codes and the top-2 eye directions, as files for a pipeline.
fn edit_inputs(dir: &Path, n: usize) -> (Array2<f32>, Array2<f32>) {
    let (net, shape) = generator(GradientMode::FiniteDifference);
    let region = RegionMask::from_box(64, 64, EYES).unwrap();
    let settings = FactorSettings {
        top: 2,
        ..FactorSettings::default()
    };
    let d = factorise(
        &net,
        &normal_codes(2, 100, 3),
        &shape,
        &region,
        &settings,
        128,
    )
    .unwrap();
    let z = normal_codes(n, 100, 4);
    let dirs = ArrayD::from_shape_fn(IxDyn(&[n, 2, 100]), |i| d.vectors[[i[1], i[2]]]);
    write_f32_npy(&dir.join("z.npy"), &z.clone().into_dyn());
    write_f32_npy(&dir.join("dirs.npy"), &dirs);
    (z, d.vectors)
}

#[test]
fn edit_generates_codes_moved_along_directions() {
    let dir = scratch("region-edit");
    let (z, v) = edit_inputs(&dir, 3);
    let model = root().join("models/face-dcgan");
    let yaml = format!(
        "name: edit-test\n\
         sources:\n  - name: codes\n    kind: npy\n    params:\n      arrays: {{z: {z}, directions: {d}}}\n\
         stages:\n  - name: edit\n    kind: edit\n    params:\n      generator: {m}\n      use: [1, 0]\n      strengths: [-3, 0, 2]\n\
         sinks:\n  - name: out\n    kind: npy\n    params: {{fields: [edits, edit_heat]}}\n",
        z = dir.join("z.npy").display(),
        d = dir.join("dirs.npy").display(),
        m = model.display()
    );
    let file = write_pipeline(&dir, "edit.yaml", &yaml);
    let out = dir.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let (shape, edits) = read_npy(&out.join("edits.npy"));
    assert_eq!(shape, vec![3, 6, 3, 64, 64]);
    let (hshape, heat) = read_npy(&out.join("edit_heat.npy"));
    assert_eq!(hshape, vec![3, 2, 3, 64, 64]);
    assert!(heat.iter().all(|v| (-1.0..=1.0).contains(v)));
    // The reference: ONNX Runtime's Python API on z + d·v, direction-major.
    let mut moved = Vec::new();
    for i in 0..3 {
        for rank in [1usize, 0] {
            for d in [-3.0f32, 0.0, 2.0] {
                moved.extend((0..100).map(|j| z[[i, j]] + d * v[[rank, j]]));
            }
        }
    }
    let moved = ArrayD::from_shape_vec(IxDyn(&[18, 100]), moved).unwrap();
    write_f32_npy(&dir.join("moved.npy"), &moved);
    let script = "import sys, numpy as np, onnxruntime as ort\n\
                  m, d = sys.argv[1], sys.argv[2]\n\
                  s = ort.InferenceSession(m + '/model.onnx', providers=['CPUExecutionProvider'])\n\
                  x = s.run(None, {s.get_inputs()[0].name: np.load(d + '/moved.npy')})[0]\n\
                  np.save(d + '/want.npy', x.astype(np.float32))\n";
    let o = Command::new(python())
        .args(["-c", script, model.to_str().unwrap(), dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let (_, want) = read_npy(&dir.join("want.npy"));
    let diff = max_abs_diff(&edits, &want);
    assert!(diff <= 1e-4, "edits differ from ONNX Runtime by {diff:.2e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resample_redraws_only_the_named_axes_whatever_the_workers() {
    let dir = scratch("region-resample");
    let z = normal_codes(6, 100, 9);
    write_f32_npy(&dir.join("z.npy"), &z.clone().into_dyn());
    let yaml = format!(
        "name: resample-test\n\
         sources:\n  - name: codes\n    kind: npy\n    params:\n      arrays: {{z: {z}}}\n\
         stages:\n  - name: linked\n    kind: resample\n    params: {{axes: [3, 97], axes_range: [10, 20], count: 5, seed: 7}}\n\
         sinks:\n  - name: out\n    kind: npy\n    params: {{fields: [z_resampled]}}\n",
        z = dir.join("z.npy").display()
    );
    let file = write_pipeline(&dir, "resample.yaml", &yaml);
    let mut runs = Vec::new();
    for workers in ["1", "2"] {
        let out = dir.join(format!("out{workers}"));
        let o = latentflow(&[
            "run",
            file.to_str().unwrap(),
            "--workers",
            workers,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        runs.push(read_npy(&out.join("z_resampled.npy")));
    }
    assert_eq!(runs[0], runs[1], "1 and 2 workers differ");
    let (shape, r) = &runs[0];
    assert_eq!(shape, &vec![6, 5, 100]);
    let linked: Vec<usize> = [3, 97].into_iter().chain(10..20).collect();
    for i in 0..6 {
        for c in 0..5 {
            for j in 0..100 {
                let v = r[(i * 5 + c) * 100 + j];
                if linked.contains(&j) {
                    assert_ne!(v, z[[i, j]] as f64, "axis {j} was not redrawn");
                } else {
                    assert_eq!(v, z[[i, j]] as f64, "axis {j} changed");
                }
            }
        }
        // Different draws for different resamples of one record.
        assert_ne!(r[(i * 5) * 100 + 3], r[(i * 5 + 1) * 100 + 3]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn region_parameters_are_checked_before_running() {
    let dir = scratch("region-errors");
    let model = root().join("models/face-dcgan");
    let case = |region: &str| -> String {
        let yaml = format!(
            "name: bad\n\
             sources:\n  - name: codes\n    kind: npy\n    params:\n      arrays: {{z: {z}}}\n\
             stages:\n  - name: dirs\n    kind: region-directions\n    params:\n      generator: {m}\n{region}\
             sinks:\n  - name: out\n    kind: npy\n    params: {{fields: [directions]}}\n",
            z = root().join("models/face-dcgan/reference/inputs/z.npy").display(),
            m = model.display()
        );
        let file = write_pipeline(&dir, "bad.yaml", &yaml);
        let o = latentflow(&["validate", file.to_str().unwrap()]);
        assert!(!o.status.success(), "{}", text(&o));
        text(&o)
    };
    let t = case("      box: [10, 10, 80, 20]\n");
    assert!(
        t.contains("bad.yaml:12:12") && t.contains("x1 <= 64"),
        "{t}"
    );
    assert!(t.contains("64 wide and 64 high"), "{t}");
    let t = case("");
    assert!(t.contains("no region given") && t.contains("mask:"), "{t}");
    let t = case("      box: [10, 10, 20, 20]\n      labels: map.png\n");
    assert!(t.contains("give one region, not box and labels"), "{t}");
    let t = case("      mask: missing.png\n");
    assert!(
        t.contains("cannot read") && t.contains("missing.png"),
        "{t}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn edit_region_pipeline_writes_its_pictures_and_figures() {
    // The shipped pipeline, shortened: 2 faces, 5 optimiser steps, 5 evaluation codes.
    let dir = scratch("region-pipeline");
    let text_in = std::fs::read_to_string(root().join("pipelines/edit-region.yaml")).unwrap();
    let short = text_in
        .replace("limit: 12", "limit: 2")
        .replace("steps: 100", "steps: 5")
        .replace("samples: 5", "samples: 2\n      eval_samples: 5")
        .replace("../", &format!("{}/", root().display()));
    assert_ne!(short, text_in);
    let file = write_pipeline(&dir, "edit-region.yaml", &short);
    let out = dir.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for f in ["eyes.png", "mouth.png", "resampled.png", "z_opt.npy"] {
        assert!(out.join(f).exists(), "{f} missing\n{}", text(&o));
    }
    let sheet = image::open(out.join("eyes.png")).unwrap();
    // 2 rows; photo, reconstruction, 5 edits, 1 heat map; tiles of 128 with 2-pixel gutters.
    assert_eq!((sheet.width(), sheet.height()), (8 * 130 + 2, 2 * 130 + 2));
    for region in ["eyes", "mouth"] {
        let (shape, _) = read_npy(&out.join(region).join("directions.npy"));
        assert_eq!(shape, vec![5, 100]);
        assert!(out.join(region).join("locality.png").exists());
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(region).join("region.json")).unwrap(),
        )
        .unwrap();
        let gain = report["locality"]["gain_over_global"].as_f64().unwrap();
        assert!(gain > 1.0, "{region}: gain {gain}");
        assert_eq!(report["codes"], 2);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
