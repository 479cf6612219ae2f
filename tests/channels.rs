//! Channel awareness on the CCBN Fashion-MNIST generator: the gate rewrite against the original
//! model and against an independent rewrite made with the onnx Python package, the scores
//! against numpy on the same latents, blends against the class vector they stand for,
//! determinism and worker invariance, validation messages, and the committed pipeline end to
//! end.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use latentflow_engine::inference::{Device, InferenceService, ServiceConfig};
use latentflow_engine::model::ModelPackage;
use latentflow_engine::Tensor;
use latentflow_stages::channels::{
    blend_rows, class_swaps, latent, one_hot, CcbnGenerator, GatedGenerator, GatedOptions, Rows,
};
use ndarray::{Array2, ArrayD};

use common::{latentflow, max_abs_diff, python, read_npy, root, scratch, text, write_pipeline};

const MODEL: &str = "models/fashion-ccbn";

fn run_python(script: &str, args: &[&str]) {
    let o = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "python failed:\n{}", text(&o));
}

fn write_npy(path: &Path, a: &ArrayD<f32>) {
    let f = std::fs::File::create(path).unwrap();
    ndarray_npy::WriteNpyExt::write_npy(a, f).unwrap();
}

/// The generator with gates, cached in a scratch folder (not in the package).
fn gated(cache: &Path) -> GatedGenerator {
    let g = CcbnGenerator::load(&root().join(MODEL)).unwrap();
    let options = GatedOptions {
        device: Device::Cpu,
        threads: Some(1),
        max_batch: 64,
        cache_dir: Some(cache.to_path_buf()),
    };
    GatedGenerator::open(g, &options).unwrap()
}

fn latents(n: usize, seed: u64) -> Array2<f32> {
    let rows: Vec<f32> = (0..n as u64).flat_map(|s| latent(seed, s, 64)).collect();
    Array2::from_shape_vec((n, 64), rows).unwrap()
}

/// Class vectors: one-hot for every class, then two mixtures.
fn class_vectors(n: usize) -> Array2<f32> {
    let mut y = one_hot(&(0..n).map(|i| i % 10).collect::<Vec<_>>(), 10);
    if n >= 12 {
        y.row_mut(n - 1).fill(0.0);
        y[[n - 1, 0]] = 0.5;
        y[[n - 1, 3]] = 0.5;
        y.row_mut(n - 2).fill(0.0);
        y[[n - 2, 5]] = 0.3;
        y[[n - 2, 7]] = 0.7;
    }
    y
}

fn flat(a: &ArrayD<f32>) -> Vec<f64> {
    a.iter().map(|v| *v as f64).collect()
}

#[test]
fn neutral_gates_reproduce_the_original_model_exactly() {
    let cache = scratch("channels-identity");
    let net = gated(&cache);
    // The gated package is a valid package: its manifest describes its ONNX file exactly.
    net.package().check().unwrap();
    let m = net.package().manifest();
    assert!(m.inputs.iter().any(|i| i.name == "gate__ccbn2"));
    assert!(m.inputs.iter().any(|i| i.name == "shift__ccbn3"));

    let n = 16;
    let (z, y) = (latents(n, 3), class_vectors(n));
    let ours = net
        .run(
            &Rows::neutral(z.clone(), y.clone(), &net.generator.layers),
            true,
        )
        .unwrap();

    let original = ModelPackage::load(root().join(MODEL)).unwrap();
    let config = ServiceConfig {
        device: Device::Cpu,
        max_batch: 64,
        max_delay: Duration::ZERO,
        threads: Some(1),
    };
    let service = InferenceService::get(&original, &config).unwrap();
    let outs = service
        .run(vec![
            ("z".into(), Tensor::f32(z.into_dyn())),
            ("y".into(), Tensor::f32(y.into_dyn())),
        ])
        .unwrap();
    let get = |name: &str| {
        outs.iter()
            .find(|(o, _)| o == name)
            .and_then(|(_, t)| t.as_f32().cloned())
            .unwrap()
    };
    let image = max_abs_diff(&flat(&ours.image), &flat(&get("image")));
    assert!(image <= 1e-6, "image differs by {image:e}");
    for (l, layer) in net.generator.layers.iter().enumerate() {
        let d = max_abs_diff(&flat(&ours.layers[l]), &flat(&get(&layer.name)));
        assert!(d <= 1e-6, "{} differs by {d:e}", layer.name);
    }
    // And the gates act: a gate of 0 on one channel changes the image.
    let mut rows = Rows::neutral(latents(2, 3), class_vectors(2), &net.generator.layers);
    rows.gates[1][[0, 32]] = 0.0;
    let gated_out = net.run(&rows, false).unwrap();
    let base = ours
        .image
        .slice(ndarray::s![0..2, .., .., ..])
        .to_owned()
        .into_dyn();
    assert!(max_abs_diff(&flat(&gated_out.image), &flat(&base)) > 1e-3);
    let _ = std::fs::remove_dir_all(&cache);
}

/// Builds, with the onnx Python package, the original model with fixed per-channel gates and
/// shifts after ccbn2 and ccbn3 (`<dir>/<layer>_gate.npy`, `_shift.npy`), runs it with ONNX
/// Runtime on `<dir>/z.npy`, `<dir>/y.npy`, and saves every output as `<dir>/py_<name>.npy`.
const INDEPENDENT_REWRITE: &str = r#"
import sys, numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper
d, path = sys.argv[1], sys.argv[2]
m = onnx.load(path)
g = m.graph
for layer in ['ccbn2', 'ccbn3']:
    gate = np.load(f'{d}/{layer}_gate.npy').reshape(1, -1, 1, 1)
    shift = np.load(f'{d}/{layer}_shift.npy').reshape(1, -1, 1, 1)
    g.initializer.extend([numpy_helper.from_array(gate, f'py_{layer}_g'),
                          numpy_helper.from_array(shift, f'py_{layer}_s')])
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == layer:
                n.input[i] = f'py_{layer}_out'
    at = [i for i, n in enumerate(g.node) if layer in n.output][0]
    g.node.insert(at + 1, helper.make_node('Mul', [layer, f'py_{layer}_g'], [f'py_{layer}_mul']))
    g.node.insert(at + 2, helper.make_node('Add', [f'py_{layer}_mul', f'py_{layer}_s'], [f'py_{layer}_out']))
onnx.checker.check_model(m)
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(m.SerializeToString(), so, providers=['CPUExecutionProvider'])
outs = s.run(None, {'z': np.load(f'{d}/z.npy'), 'y': np.load(f'{d}/y.npy')})
for o, v in zip(s.get_outputs(), outs):
    np.save(f'{d}/py_{o.name}.npy', v)
"#;

#[test]
fn gates_match_an_independent_rewrite_with_onnx_python() {
    let dir = scratch("channels-python-gates");
    let net = gated(&dir.join("cache"));
    let layers = net.generator.layers.clone();
    let n = 12;
    let (z, y) = (latents(n, 5), class_vectors(n));
    // ccbn2: channel 32 suppressed (gate 0); ccbn3: arbitrary gates and shifts.
    let mut g2 = vec![1.0f32; 64];
    g2[32] = 0.0;
    let s2 = vec![0.0f32; 64];
    let g3: Vec<f32> = latent(9, 0, 32).iter().map(|v| 1.0 + 0.5 * v).collect();
    let s3: Vec<f32> = latent(9, 1, 32).iter().map(|v| 0.3 * v).collect();
    let mut rows = Rows::neutral(z.clone(), y.clone(), &layers);
    for r in 0..n {
        for k in 0..64 {
            rows.gates[1][[r, k]] = g2[k];
            rows.shifts[1][[r, k]] = s2[k];
        }
        for k in 0..32 {
            rows.gates[2][[r, k]] = g3[k];
            rows.shifts[2][[r, k]] = s3[k];
        }
    }
    let ours = net.run(&rows, true).unwrap();
    let arr = |v: &[f32]| ArrayD::from_shape_vec(ndarray::IxDyn(&[v.len()]), v.to_vec()).unwrap();
    write_npy(&dir.join("ccbn2_gate.npy"), &arr(&g2));
    write_npy(&dir.join("ccbn2_shift.npy"), &arr(&s2));
    write_npy(&dir.join("ccbn3_gate.npy"), &arr(&g3));
    write_npy(&dir.join("ccbn3_shift.npy"), &arr(&s3));
    write_npy(&dir.join("z.npy"), &z.into_dyn());
    write_npy(&dir.join("y.npy"), &y.into_dyn());
    let model = root().join(MODEL).join("model.onnx");
    run_python(
        INDEPENDENT_REWRITE,
        &[dir.to_str().unwrap(), model.to_str().unwrap()],
    );
    let (_, image) = read_npy(&dir.join("py_image.npy"));
    let d = max_abs_diff(&flat(&ours.image), &image);
    assert!(d <= 1e-5, "image: max |ours - onnx python| = {d:e}");
    for (l, layer) in layers.iter().enumerate() {
        let (_, theirs) = read_npy(&dir.join(format!("py_{}.npy", layer.name)));
        let d = max_abs_diff(&flat(&ours.layers[l]), &theirs);
        assert!(
            d <= 1e-5,
            "{}: max |ours - onnx python| = {d:e}",
            layer.name
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_blend_of_every_channel_is_the_class_vector_it_stands_for() {
    let cache = scratch("channels-blend");
    let net = gated(&cache);
    let g = net.generator.clone();
    let z = latents(4, 11);
    let (a, b) = (7, 9); // Sneaker -> Ankle boot
    let swaps = class_swaps(&net, &z, a, b).unwrap();
    for (layer, s) in g.layers.iter().zip(&swaps) {
        assert!(
            s.max_residual < 1e-5,
            "{}: the class-to-class map is not affine (residual {:e})",
            layer.name,
            s.max_residual
        );
    }
    let every: Vec<Vec<usize>> = g.layers.iter().map(|l| (0..l.channels).collect()).collect();
    for t in [1.0f32, 0.5] {
        let blended = net
            .run(&blend_rows(&g, &z, a, &swaps, &every, t), false)
            .unwrap();
        let mut y = Array2::<f32>::zeros((4, 10));
        y.column_mut(a).fill(1.0 - t);
        y.column_mut(b).fill(t);
        let direct = net
            .run(&Rows::neutral(z.clone(), y, &g.layers), false)
            .unwrap();
        let d = max_abs_diff(&flat(&blended.image), &flat(&direct.image));
        assert!(d <= 1e-4, "t = {t}: blend vs y = (1-t) e_a + t e_b: {d:e}");
    }
    // Blending nothing changes nothing; half the channels is in between.
    let none = vec![Vec::new(); g.layers.len()];
    let plain_a = net
        .run(&blend_rows(&g, &z, a, &swaps, &none, 1.0), false)
        .unwrap();
    let plain_b = net
        .run(
            &Rows::neutral(z.clone(), one_hot(&[b; 4], 10), &g.layers),
            false,
        )
        .unwrap();
    let half: Vec<Vec<usize>> = g
        .layers
        .iter()
        .map(|l| (0..l.channels / 2).collect())
        .collect();
    let partial = net
        .run(&blend_rows(&g, &z, a, &swaps, &half, 1.0), false)
        .unwrap();
    let (ia, ib, ip) = (
        flat(&plain_a.image),
        flat(&plain_b.image),
        flat(&partial.image),
    );
    let mean = |x: &[f64], y: &[f64]| {
        x.iter().zip(y).map(|(p, q)| (p - q).abs()).sum::<f64>() / x.len() as f64
    };
    assert!(
        mean(&ip, &ib) < mean(&ia, &ib),
        "half a blend is closer to the target"
    );
    assert!(mean(&ip, &ia) > 0.0);
    let _ = std::fs::remove_dir_all(&cache);
}

/// A small pipeline: `count` latents, the given layers, a report with one edit and one blend.
fn small_pipeline(dir: &Path, count: usize, seed: u64, layers: &str, suppression: bool) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let model = root().join(MODEL);
    let cache = dir.join("cache");
    let yaml = format!(
        r#"name: channels-small
settings: {{epoch_size: 2, max_in_flight: 2}}
sources:
  - name: latents
    kind: latents
    params: {{count: {count}, size: 64, seed: {seed}}}
stages:
  - name: measure
    kind: channel-awareness
    params:
      generator: {model}
      layers: {layers}
      suppression: {suppression}
      threads: 1
      cache_dir: {cache}
sinks:
  - name: report
    kind: channel-report
    params:
      generator: {model}
      layers: {layers}
      samples: 2
      scale: 1
      edit_classes: [Sneaker]
      blends: ["Sneaker -> Ankle boot"]
      threads: 1
      cache_dir: {cache}
  - name: codes
    kind: npy
    params: {{fields: [z]}}
"#,
        model = model.display(),
        cache = cache.display(),
    );
    write_pipeline(dir, "small.yaml", &yaml)
}

fn run_ok(pipeline: &Path, out: &Path, workers: &str) {
    let o = latentflow(&[
        "run",
        pipeline.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--workers",
        workers,
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

/// Computes the scores with numpy from the original model's CCBN outputs on `<run>/z.npy`,
/// and the suppression effect of a few channels with a model whose channel is zeroed by the
/// onnx Python package; writes `<run>/np_<layer>_{awareness,class_mean,class_std}.npy` and
/// `<run>/np_suppression.npy` (rows: layer index, class, channel, effect).
const NUMPY_SCORES: &str = r#"
import sys, numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper
run, path, layers = sys.argv[1], sys.argv[2], sys.argv[3].split(',')
so = ort.SessionOptions(); so.intra_op_num_threads = 1
def session(model):
    return ort.InferenceSession(model.SerializeToString(), so, providers=['CPUExecutionProvider'])
z = np.load(f'{run}/z.npy')
N, C = len(z), 10
s = session(onnx.load(path))
names = [o.name for o in s.get_outputs()]
acts = {l: [] for l in layers}
images = []
for c in range(C):
    y = np.zeros((N, C), np.float32); y[:, c] = 1
    out = dict(zip(names, s.run(None, {'z': z, 'y': y})))
    images.append(out['image'].astype(np.float64))
    for l in layers:
        acts[l].append(out[l].astype(np.float64))
for l in layers:
    a = np.stack(acts[l])                      # [C, N, K, H, W]
    m = a.mean(axis=(1, 3, 4))                 # [C, K]
    mbar = m.mean(axis=0)
    sigma = np.sqrt(((a - mbar[None, None, :, None, None]) ** 2).mean(axis=(0, 1, 3, 4)))
    np.save(f'{run}/np_{l}_awareness.npy', ((m - mbar) / sigma).astype(np.float32))
    np.save(f'{run}/np_{l}_class_mean.npy', m.astype(np.float32))
    np.save(f'{run}/np_{l}_class_std.npy', a.std(axis=(1, 3, 4)).astype(np.float32))
rows = []
for li, l in enumerate(layers):
    for (c, k) in [(7, 0), (9, 5), (2, 17)]:
        m = onnx.load(path); g = m.graph
        K = acts[l][0].shape[1]
        k = k % K
        mask = np.ones((1, K, 1, 1), np.float32); mask[0, k] = 0
        g.initializer.append(numpy_helper.from_array(mask, 'py_mask'))
        for n in g.node:
            for i, x in enumerate(n.input):
                if x == l:
                    n.input[i] = 'py_zeroed'
        at = [i for i, n in enumerate(g.node) if l in n.output][0]
        g.node.insert(at + 1, helper.make_node('Mul', [l, 'py_mask'], ['py_zeroed']))
        y = np.zeros((N, C), np.float32); y[:, c] = 1
        img = session(m).run(['image'], {'z': z, 'y': y})[0].astype(np.float64)
        rows.append([li, c, k, np.abs(img - images[c]).mean()])
np.save(f'{run}/np_suppression.npy', np.array(rows, np.float64).astype(np.float32))
"#;

#[test]
fn scores_match_numpy_on_the_same_latents() {
    let dir = scratch("channels-numpy");
    let pipeline = small_pipeline(&dir, 4, 21, "[ccbn2, ccbn3]", true);
    let out = dir.join("run");
    run_ok(&pipeline, &out, "2");
    let model = root().join(MODEL).join("model.onnx");
    run_python(
        NUMPY_SCORES,
        &[
            out.to_str().unwrap(),
            model.to_str().unwrap(),
            "ccbn2,ccbn3",
        ],
    );
    for layer in ["ccbn2", "ccbn3"] {
        for (what, tol) in [
            ("awareness", 1e-4),
            ("class_mean", 1e-5),
            ("class_std", 1e-5),
        ] {
            let (shape, ours) = read_npy(&out.join(format!("scores/{layer}_{what}.npy")));
            let (theirs_shape, theirs) = read_npy(&out.join(format!("np_{layer}_{what}.npy")));
            assert_eq!(shape, theirs_shape, "{layer} {what}");
            let d = max_abs_diff(&ours, &theirs);
            assert!(d <= tol, "{layer} {what}: max |ours - numpy| = {d:e}");
        }
    }
    // Suppression effects of a few channels against a model zeroed by the onnx package.
    let (_, rows) = read_npy(&out.join("np_suppression.npy"));
    for row in rows.chunks(4) {
        let (layer, c, k, theirs) = (
            ["ccbn2", "ccbn3"][row[0] as usize],
            row[1] as usize,
            row[2] as usize,
            row[3],
        );
        let (shape, ours) = read_npy(&out.join(format!("scores/{layer}_suppression.npy")));
        let v = ours[c * shape[1] + k];
        assert!(
            (v - theirs).abs() <= 1e-5,
            "{layer} class {c} channel {k}: suppression {v} vs numpy {theirs}"
        );
        assert!(
            theirs > 0.0,
            "{layer} {c} {k}: zeroing a channel changes nothing?"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("channels.json")).unwrap()).unwrap()
}

#[test]
fn results_depend_on_the_seed_only() {
    let dir = scratch("channels-determinism");
    let same = small_pipeline(&dir.join("a"), 2, 4, "[ccbn3]", true);
    // Another seed, and no suppression measurements: the report does without them.
    let other = small_pipeline(&dir.join("b"), 2, 5, "[ccbn3]", false);
    run_ok(&same, &dir.join("one"), "1");
    run_ok(&same, &dir.join("two"), "2");
    run_ok(&other, &dir.join("other"), "1");
    let files = [
        "scores/ccbn3_awareness.npy",
        "scores/ccbn3_suppression.npy",
        "edits/sneaker.png",
        "blends/sneaker-to-ankle-boot.png",
        "z.npy",
    ];
    for f in files {
        let a = std::fs::read(dir.join("one").join(f)).unwrap();
        let b = std::fs::read(dir.join("two").join(f)).unwrap();
        assert!(a == b, "{f} differs between runs with 1 and 2 workers");
    }
    let strip = |mut v: serde_json::Value| {
        v.as_object_mut().unwrap().remove("seconds");
        v
    };
    assert_eq!(
        strip(report(&dir.join("one"))),
        strip(report(&dir.join("two")))
    );
    let a = std::fs::read(dir.join("one/scores/ccbn3_awareness.npy")).unwrap();
    let c = std::fs::read(dir.join("other/scores/ccbn3_awareness.npy")).unwrap();
    assert!(a != c, "another seed gives other latents and other scores");
    assert!(!dir.join("other/scores/ccbn3_suppression.npy").exists());
    let r = report(&dir.join("other"));
    assert_eq!(r["suppression_latents"], 0);
    assert!(r["layers"]["ccbn3"]["classes"]["Bag"]["by_suppression"].is_null());
    assert!(r["layers"]["ccbn3"]["classes"]["Bag"]["by_awareness"].is_array());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_pipeline_runs_and_writes_its_report_and_pictures() {
    let v = latentflow(&["validate", "pipelines/channels.yaml"]);
    assert!(v.status.success(), "{}", text(&v));
    // The committed pipeline on 2 latents instead of 12, with its cache in a scratch folder.
    let dir = scratch("channels-pipeline");
    let original = std::fs::read_to_string(root().join("pipelines/channels.yaml")).unwrap();
    let model = root().join(MODEL);
    let cache = dir.join("cache");
    let shrunk = original.replace("count: 12,", "count: 2,");
    assert_ne!(
        shrunk, original,
        "the pipeline's latent count moved; update this test"
    );
    let yaml = shrunk.replace(
        "      generator: ../models/fashion-ccbn\n",
        &format!(
            "      generator: {}\n      cache_dir: {}\n",
            model.display(),
            cache.display()
        ),
    );
    assert_eq!(yaml.matches("cache_dir").count(), 2);
    let pipeline = write_pipeline(&dir, "channels.yaml", &yaml);
    let out = dir.join("run");
    run_ok(&pipeline, &out, "1");
    let r = report(&out);
    assert_eq!(r["latents"], 2);
    assert_eq!(r["suppression_latents"], 2);
    for layer in ["ccbn1", "ccbn2", "ccbn3"] {
        let l = &r["layers"][layer];
        for class in ["T-shirt/top", "Ankle boot"] {
            assert_eq!(
                l["classes"][class]["by_awareness"]
                    .as_array()
                    .unwrap()
                    .len(),
                5
            );
            assert_eq!(
                l["classes"][class]["by_suppression"]
                    .as_array()
                    .unwrap()
                    .len(),
                5
            );
        }
        for what in [
            "awareness",
            "suppression",
            "suppression_excess",
            "class_mean",
            "class_std",
        ] {
            let (shape, _) = read_npy(&out.join(format!("scores/{layer}_{what}.npy")));
            assert_eq!(shape[0], 10, "{layer} {what}");
        }
    }
    assert_eq!(r["most_aware"].as_array().unwrap().len(), 10);
    assert_eq!(r["edits"].as_array().unwrap().len(), 3);
    let blends = r["blends"].as_array().unwrap();
    assert_eq!(blends.len(), 3);
    for b in blends {
        let steps = b["steps"].as_array().unwrap();
        assert_eq!(
            steps[0]["fraction_of_the_way"], 0.0,
            "t = 0 is the source class"
        );
        let last = steps.last().unwrap()["fraction_of_the_way"]
            .as_f64()
            .unwrap();
        assert!(
            last > 0.2,
            "{}: a blend at t = 1 moved only {last}",
            b["from"]
        );
    }
    for f in [
        "awareness.png",
        "edits/trouser.png",
        "edits/sneaker.png",
        "edits/bag.png",
        "blends/sneaker-to-ankle-boot.png",
        "blends/t-shirt-top-to-dress.png",
        "blends/pullover-to-coat.png",
        "z.npy",
    ] {
        assert!(out.join(f).is_file(), "{f} was not written");
    }
    // Edit grids: one row per latent and layer, one column per factor (plus labels).
    let edit = image::open(out.join("edits/sneaker.png")).unwrap();
    assert!(
        edit.height() > 6 * 28 * 3 && edit.width() > 5 * 28 * 3,
        "{:?}",
        (edit.width(), edit.height())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `latentflow validate` says about a pipeline of the latents source, one stage and one
/// sink (given as YAML entries).
fn validate_text(dir: &Path, name: &str, stage: &str, sink: &str) -> String {
    let yaml = format!(
        "name: bad\nsources:\n  - name: latents\n    kind: latents\n    params: {{count: 2, size: 64}}\n\
         stages:\n  - name: measure\n    kind: channel-awareness\n    params: {stage}\n\
         sinks:\n  - name: report\n    kind: channel-report\n    params: {sink}\n"
    );
    let p = write_pipeline(dir, name, &yaml);
    let o = latentflow(&["validate", p.to_str().unwrap()]);
    assert!(!o.status.success(), "{name} validated:\n{yaml}");
    text(&o)
}

#[test]
fn bad_parameters_are_reported_with_what_to_do() {
    let dir = scratch("channels-validate");
    let model = root().join(MODEL).display().to_string();
    let faces = root().join("models/face-dcgan").display().to_string();
    let good = format!("{{generator: {model}}}");
    let cases = [
        (
            format!("{{generator: {model}, layers: [ccbn4]}}"),
            good.clone(),
            vec!["`ccbn4` is not a CCBN layer", "did you mean `ccbn1`?"],
        ),
        (
            format!("{{generator: {faces}}}"),
            good.clone(),
            vec!["lists no `classes`", "like models/fashion-ccbn"],
        ),
        (
            good.clone(),
            format!("{{generator: {model}, blend_channels: 1.5}}"),
            vec!["`blend_channels` must be in (0, 1]"],
        ),
        (
            good.clone(),
            format!("{{generator: {model}, blends: [\"Sneaker -> Anklet boot\"]}}"),
            vec!["no class `Anklet boot`; did you mean `Ankle boot`?"],
        ),
        (
            good.clone(),
            format!("{{generator: {model}, blends: [Bag]}}"),
            vec!["write each blend as"],
        ),
        (
            format!("{{generator: {model}, suppression: false}}"),
            format!("{{generator: {model}, edit_classes: [Bag], edit_by: suppression}}"),
            vec!["needs the suppression fields", "`suppression: true`"],
        ),
    ];
    for (i, (stage, sink, wants)) in cases.iter().enumerate() {
        let t = validate_text(&dir, &format!("bad{i}.yaml"), stage, sink);
        for want in wants {
            assert!(t.contains(want), "case {i}: missing {want:?} in:\n{t}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
