//! Exact gradients through ONNX graphs, operator by operator.
//!
//! Every fixture in `tests/grad/` (made by `scripts/grad_reference.py`) is a small ONNX graph
//! with inputs, a cotangent for its output and two references for the vector-Jacobian product
//! with respect to its inputs and weights: PyTorch autograd and central finite differences,
//! both in float64. The VJP model built by `latentflow_engine::grad` and run by ONNX Runtime
//! must match both. Graphs with an operator that has no gradient rule on the differentiated
//! path must be refused with an error naming the operator and the node.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use latentflow_engine::grad::{self, Differentiable, GradError, GradOptions};
use latentflow_engine::inference::Device;
use latentflow_engine::Tensor;
use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;
use serde_json::Value as Json;

use common::{latentflow, root, scratch, text};

/// Largest accepted `max |got − want| / max |want|`.
const TOLERANCE: f64 = 1e-3;

fn fixtures() -> PathBuf {
    root().join("tests").join("grad")
}

fn index() -> Vec<Json> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json");
    serde_json::from_str::<Json>(&text)
        .expect("cases.json is JSON")
        .as_array()
        .expect("a list of cases")
        .clone()
}

fn case(name: &str) -> Json {
    index()
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case `{name}` in tests/grad/cases.json"))
}

fn strings(v: &Json) -> Vec<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// The arrays of a fixture's `.npz` file.
struct Npz(NpzReader<File>);

impl Npz {
    fn open(path: &Path) -> Npz {
        let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Npz(NpzReader::new(file).expect("an npz file"))
    }

    fn names(&mut self) -> Vec<String> {
        self.0.names().expect("npz names")
    }

    fn f64(&mut self, name: &str) -> ArrayD<f64> {
        self.0
            .by_name::<OwnedRepr<f64>, IxDyn>(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn f32(&mut self, name: &str) -> ArrayD<f32> {
        self.0
            .by_name::<OwnedRepr<f32>, IxDyn>(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// A float32 or int64 array as a tensor.
    fn tensor(&mut self, name: &str) -> Tensor {
        match self.0.by_name::<OwnedRepr<f32>, IxDyn>(name) {
            Ok(a) => Tensor::f32(a),
            Err(_) => Tensor::i64(
                self.0
                    .by_name::<OwnedRepr<i64>, IxDyn>(name)
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            ),
        }
    }
}

/// `max |got − want| / max |want|` (the denominator at least 1e-6).
fn relative_error(got: &ArrayD<f32>, want: &ArrayD<f64>) -> f64 {
    assert_eq!(got.shape(), want.shape(), "gradient shape");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
    let diff = got
        .iter()
        .zip(want.iter())
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    diff / scale
}

fn options(cache: &Path) -> GradOptions {
    GradOptions {
        device: Device::Cpu,
        threads: Some(1),
        cache_dir: Some(cache.to_path_buf()),
        ..Default::default()
    }
}

/// Builds and runs the VJP model of fixture `name` and compares every gradient with both
/// references.
fn check_case(name: &str) {
    let spec = case(name);
    let output = spec["output"].as_str().expect("output");
    let wrt = strings(&spec["wrt"]);
    let wrt_refs: Vec<&str> = wrt.iter().map(String::as_str).collect();
    let cache = scratch(&format!("grad-{name}"));
    let model = fixtures().join(format!("{name}.onnx"));
    let diff = Differentiable::from_onnx_file(&model, output, &wrt_refs, false, &options(&cache))
        .unwrap_or_else(|e| panic!("{name}: {e}"));

    let mut npz = Npz::open(&fixtures().join(format!("{name}.npz")));
    let input_names: Vec<String> = npz
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("input__").map(String::from))
        .collect();
    let inputs: Vec<(String, Tensor)> = input_names
        .iter()
        .map(|n| (n.clone(), npz.tensor(&format!("input__{n}"))))
        .collect();
    let inputs: Vec<(&str, Tensor)> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    let cotangent = npz.f32("cotangent");

    let got = diff
        .vjp_all(&inputs, &cotangent)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        got.output.shape(),
        cotangent.shape(),
        "{name}: output shape"
    );
    let mut failures = Vec::new();
    for w in &wrt {
        let g = got
            .get(w)
            .unwrap_or_else(|| panic!("{name}: no gradient for `{w}`"));
        for reference in ["torch", "fd"] {
            let want = npz.f64(&format!("{reference}__{w}"));
            if g.shape() != want.shape() {
                failures.push(format!(
                    "`{w}`: shape {:?}, the {reference} reference has {:?}",
                    g.shape(),
                    want.shape()
                ));
                continue;
            }
            let err = relative_error(g, &want);
            if err.is_nan() || err > TOLERANCE {
                failures.push(format!(
                    "`{w}` vs {reference}: relative error {err:.2e}\n  got  {:?}\n  want {:?}",
                    g.iter().take(8).collect::<Vec<_>>(),
                    want.iter().take(8).collect::<Vec<_>>()
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

/// One test per fixture, named after it, so a failure names the operator case.
macro_rules! fixture_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_case(stringify!($name).trim_start_matches("r#"));
            }
        )*

        /// Every case the fixture script wrote has a test above, and every test has its files.
        #[test]
        fn every_fixture_has_a_test() {
            let tested: Vec<&str> =
                vec![$(stringify!($name).trim_start_matches("r#")),*];
            for c in index() {
                let name = c["name"].as_str().expect("name");
                if c.get("refused").is_some() {
                    continue;
                }
                assert!(tested.contains(&name), "fixture `{name}` has no test in tests/grad.rs");
            }
            for name in tested {
                assert!(fixtures().join(format!("{name}.onnx")).exists(), "{name}.onnx");
                assert!(fixtures().join(format!("{name}.npz")).exists(), "{name}.npz");
            }
        }
    };
}

mod ops {
    use super::{check_case, fixtures, index};

    fixture_tests!(
        relu,
        leaky_relu,
        tanh,
        sigmoid,
        exp,
        log,
        sqrt,
        reciprocal,
        neg,
        abs,
        softplus,
        softsign,
        erf,
        sin,
        cos,
        elu,
        selu,
        hard_sigmoid,
        softmax,
        log_softmax,
        identity_dropout,
        clip,
        add_broadcast,
        sub_broadcast,
        mul_broadcast_both,
        div_broadcast,
        pow,
        pow_square_sqrt,
        add_symbolic_batch,
        add_both_inputs_symbolic,
        r#where,
        max_min,
        sum_mean,
        prelu,
        matmul,
        matmul_batch_broadcast,
        matmul_vector_left,
        matmul_vector_right,
        gemm_transb,
        gemm_transa,
        conv_stride_asym_pad,
        conv_dilated,
        conv_groups,
        conv_depthwise_dynamic,
        conv1d_stride_skips_tail,
        conv_same_upper,
        conv_transpose_dcgan,
        conv_transpose_groups_outpad,
        conv_transpose_dilated,
        conv_transpose_1x1_latent,
        batch_norm,
        batch_norm_rank2,
        instance_norm,
        layer_norm,
        layer_norm_axis1,
        reshape_shape_subgraph,
        flatten_transpose,
        squeeze_unsqueeze,
        expand_tile,
        concat_split,
        concat_dynamic,
        slice_static,
        slice_steps,
        slice_dynamic_ends,
        pad_constant,
        pad_reflect,
        pad_edge_negative,
        depth_to_space_space_to_depth,
        resize_nearest_x2,
        resize_nearest_sizes,
        resize_nearest_half_pixel,
        upsample_as_exported,
        reduce_mean,
        reduce_sum_nokeep,
        reduce_max_min,
        reduce_l2_lse_sq,
        reduce_mean_opset18_axes_input,
        reduce_mean_all,
        reduce_sum_keep_opset13,
        cumsum,
        gather_rows_duplicates,
        gather_axis1_negative,
        gather_elements,
        gnn_scatter_add,
        scatter_elements_none,
        scatter_nd_add,
        scatter_elements_add_duplicates,
        constant_folding,
        topk,
        max_pool,
        average_pool_exclude_pad,
        average_pool_2x2,
        global_pools,
        dcgan_block,
        encoder_block,
        inactive_branch_unsupported_op,
    );
}

/// A graph with an operator that has no rule (or a mode its rule refuses) on the differentiated
/// path is refused, and the error names the operator and the node.
#[test]
fn unsupported_operators_are_refused_by_name() {
    let refused: Vec<Json> = index()
        .into_iter()
        .filter(|c| c.get("refused").is_some())
        .collect();
    assert!(!refused.is_empty(), "cases.json lists no refused graphs");
    for c in refused {
        let name = c["name"].as_str().expect("name");
        let op = c["refused"]["op"].as_str().expect("op");
        let node = c["refused"]["node"].as_str().expect("node");
        let model = fixtures().join(format!("{name}.onnx"));
        let out = scratch(&format!("grad-refused-{name}")).join("vjp.onnx");
        let err = grad::build_vjp_file(&model, "y", &["x".to_string()], &out)
            .expect_err("the graph must be refused");
        match &err {
            GradError::Unsupported { op: o, node: n, .. } => {
                assert_eq!(o, op, "{name}: {err}");
                assert!(n.contains(node), "{name}: {err}");
            }
            other => panic!("{name}: expected an unsupported-operator error, got: {other}"),
        }
        let message = err.to_string();
        assert!(message.contains(op) && message.contains(node), "{message}");
        assert!(!out.exists(), "{name}: nothing may be written");
    }
}

/// `latentflow models grad` writes the VJP model where asked, says so and lists its inputs and
/// outputs; the written model runs in ONNX Runtime and gives the gradients the API gives.
#[test]
fn cli_writes_the_vjp_model() {
    let dir = scratch("grad-cli-out");
    let out = dir.join("dcgan-vjp.onnx");
    let run = latentflow(&[
        "models",
        "grad",
        "models/face-dcgan",
        "--wrt",
        "z,generator.convTr5.weight",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", text(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains(&format!("wrote {}", out.display())),
        "{stdout}"
    );
    for line in [
        "in   z float [batch, 100]",
        "in   grad_in__image float [batch, 3, 64, 64]",
        "in   generator.convTr5.weight float [64, 3, 4, 4]  (optional",
        "out  image float [batch, 3, 64, 64]",
        "out  grad__z float [batch, 100]",
        "out  grad__generator.convTr5.weight float [64, 3, 4, 4]",
    ] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }

    // Run the written file directly and compare with the API's VJP.
    let z = ArrayD::from_shape_fn(IxDyn(&[2, 100]), |i| {
        ((i[0] * 100 + i[1]) as f32 * 0.37).sin()
    });
    let cot = ArrayD::from_shape_fn(IxDyn(&[2, 3, 64, 64]), |i| {
        ((i[1] * 4096 + i[2] * 64 + i[3]) as f32 * 0.11 + i[0] as f32).cos()
    });
    latentflow_engine::runtime::ensure_runtime().expect("ONNX Runtime");
    let env = latentflow_engine::runtime::environment().expect("environment");
    let mut session = ort::session::Session::builder(env)
        .expect("builder")
        .commit_from_file(&out)
        .expect("the written VJP model opens");
    let outputs = session
        .run(ort::inputs![
            "z" => ort::value::Tensor::from_array(z.clone()).unwrap(),
            "grad_in__image" => ort::value::Tensor::from_array(cot.clone()).unwrap(),
        ])
        .expect("the written VJP model runs");
    let from_file = outputs["grad__z"]
        .try_extract_array::<f32>()
        .expect("grad__z")
        .to_owned();

    let package = latentflow_engine::model::ModelPackage::load(root().join("models/face-dcgan"))
        .expect("package");
    let cache = dir.join("cache");
    let options = GradOptions {
        cache_dir: Some(cache),
        ..options(&dir)
    };
    let diff = Differentiable::with_options(&package, "image", &["z"], &options).expect("open");
    let from_api = diff
        .vjp(&[("z", Tensor::f32(z))], &cot)
        .expect("vjp")
        .mapv(|v| v as f64);
    let err = relative_error(&from_file, &from_api);
    assert!(
        err < 1e-5,
        "the written model and the API differ by {err:.2e}"
    );
}

/// Without `--out` the VJP model goes to the `.grad` cache beside the model, named after the
/// model's hash, and a second call finds it current.
#[test]
fn cli_caches_beside_the_model() {
    let dir = scratch("grad-cli-cache");
    let model = dir.join("net.onnx");
    std::fs::copy(fixtures().join("encoder_block.onnx"), &model).unwrap();
    let args = [
        "models",
        "grad",
        model.to_str().unwrap(),
        "--wrt",
        "x",
        "--wrt",
        "w1",
    ];
    let first = latentflow(&args);
    assert!(first.status.success(), "{}", text(&first));
    let sha = latentflow_engine::model::sha256_file(&model).unwrap();
    let cached = dir.join(grad::CACHE_DIR).join(grad::cache_file_name(
        &sha,
        "z",
        &["x".into(), "w1".into()],
    ));
    assert!(cached.exists(), "{}\n{}", cached.display(), text(&first));
    assert!(dir.join(grad::CACHE_DIR).join(".gitignore").exists());
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        stdout.contains(&format!("wrote {}", cached.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("gradient of `z` with respect to `x`, `w1`"),
        "{stdout}"
    );

    let second = latentflow(&args);
    assert!(second.status.success(), "{}", text(&second));
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        stdout.contains(&format!("found current {}", cached.display())),
        "{stdout}"
    );
}

/// The command fails with the operator and the node when the graph cannot be differentiated,
/// and names what exists when asked for a tensor that does not.
#[test]
fn cli_reports_what_cannot_be_differentiated() {
    let dir = scratch("grad-cli-errors");
    let out = dir.join("vjp.onnx");
    let model = fixtures().join("refused_einsum.onnx");
    let run = latentflow(&[
        "models",
        "grad",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("node `mix` (Einsum)"), "{stderr}");
    assert!(!out.exists());

    let run = latentflow(&["models", "grad", "models/digits-mlp", "--output", "prob"]);
    assert_eq!(run.status.code(), Some(1), "{}", text(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("no output `prob`") && stderr.contains("`probs`"),
        "{stderr}"
    );
}
