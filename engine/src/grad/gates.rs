//! Channel gates: a model rewritten so that chosen activations are scaled and shifted per
//! channel by extra inputs, before the rest of the network sees them.
//!
//! For every gated tensor `t` of shape `[batch, K, ...]` the rewritten model takes two more
//! inputs, [`gate_input`]`(t)` = `gate__t` and [`shift_input`]`(t)` = `shift__t`, both
//! `[batch, K]`, and computes
//!
//! `t' = gate ⊙ t + shift`   (per row and channel, broadcast over the remaining axes);
//!
//! every node that read `t` reads `t'` instead. With all gates 1 and all shifts 0 the model
//! computes exactly what the original does (a multiplication by 1 and an addition of 0 are
//! exact in floating point). A gate of 0 suppresses a channel; any other gate scales it; the
//! shift moves it (used to move a channel's statistics towards another class's).
//!
//! Decisions:
//! - The gated model is a model package of its own (`model.onnx` + `manifest.json`, the
//!   manifest of the original with the gate and shift inputs added), so it runs through the
//!   ordinary batching [`crate::inference::InferenceService`] and can be named by any stage.
//!   Its outputs are the original's, with the original meaning: a gated tensor that is also a
//!   graph output is still reported *before* its gate (the activation the layer computed), and
//!   every later output sees the gated value.
//! - Gate and shift are required inputs, not optional ones with stored defaults: ONNX Runtime
//!   does not list inputs that have defaults (overridable initializers) among a session's
//!   inputs, so the package manifest, which is checked against the session, could not name
//!   them. Callers feed ones and zeros for "no change".
//! - Only tensors the manifest lists as outputs can be gated: the manifest gives their channel
//!   count and rank, so no shape inference is needed.
//! - Packages are cached like VJP models: in `<package>/.grad/<sha256>-gated-<tensors>/` (or
//!   under the cache folder given), keyed by the original file's SHA-256 and the gated tensors,
//!   and rebuilt when the builder version ([`GATES_VERSION`]) changes.

use std::path::{Path, PathBuf};

use prost::Message;

use super::onnx::{self, elem, int_tensor, make_tensor_type, value_info};
use super::{
    cache_file_name, check_checksum, prepare_cache_dir, read_model, write_atomically, GradError,
    CACHE_DIR,
};
use crate::model::{Manifest, ModelPackage, TensorSpec, MANIFEST_FILE};
use crate::value::{DType, Dim};

/// Version of the rewrite; stored in the model's metadata so stale caches are rebuilt.
pub const GATES_VERSION: &str = "1";

/// Metadata key holding [`GATES_VERSION`].
pub const GATES_VERSION_KEY: &str = "latentflow.gates.version";

/// The gate input of gated tensor `tensor`.
pub fn gate_input(tensor: &str) -> String {
    format!("gate__{tensor}")
}

/// The shift input of gated tensor `tensor`.
pub fn shift_input(tensor: &str) -> String {
    format!("shift__{tensor}")
}

/// One tensor to gate: its name, channel count (axis 1) and rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatedTensor {
    /// The tensor's name in the graph.
    pub name: String,
    /// Length of axis 1.
    pub channels: usize,
    /// Number of axes, batch included (at least 2).
    pub rank: usize,
}

fn model_err(reason: impl Into<String>) -> GradError {
    GradError::Model {
        reason: reason.into(),
    }
}

/// The ONNX model `model` with per-channel gates and shifts on `tensors`; `batch` is the
/// symbolic name of the batch axis the new inputs share with the model's own inputs.
pub(crate) fn add_gates(
    model: &onnx::ModelProto,
    tensors: &[GatedTensor],
    batch: &Dim,
    outputs: Option<&[&str]>,
) -> Result<onnx::ModelProto, GradError> {
    let mut model = model.clone();
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .unwrap_or(0);
    if opset < 7 {
        return Err(model_err(format!(
            "channel gates need opset 7 or later (broadcasting Mul and Add); the model has {opset}"
        )));
    }
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| model_err("the model has no graph"))?;
    if let Some(n) = graph.node.iter().find(|n| {
        n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    }) {
        return Err(model_err(format!(
            "channel gates cannot be added to a model with subgraphs (node `{}`, {})",
            n.name.as_deref().unwrap_or("?"),
            n.op_type.as_deref().unwrap_or("?")
        )));
    }
    let mut taken: std::collections::HashSet<String> = graph
        .input
        .iter()
        .filter_map(|i| i.name.clone())
        .chain(graph.initializer.iter().filter_map(|t| t.name.clone()))
        .chain(graph.node.iter().flat_map(|n| n.output.iter().cloned()))
        .collect();
    let batch_dim = match batch {
        Dim::Fixed(n) => Ok(*n as i64),
        Dim::Named(s) => Err(s.clone()),
    };

    // (index of the producing node, nodes to insert after it)
    let mut inserts: Vec<(usize, Vec<onnx::NodeProto>)> = Vec::new();
    for t in tensors {
        if t.rank < 2 || t.channels == 0 {
            return Err(model_err(format!(
                "`{}` must have a channel axis (axis 1) to be gated",
                t.name
            )));
        }
        let producer = graph
            .node
            .iter()
            .position(|n| n.output.contains(&t.name))
            .ok_or_else(|| {
                model_err(format!(
                    "`{}` is not computed by a node (a graph input or a constant cannot be gated)",
                    t.name
                ))
            })?;
        let gate = gate_input(&t.name);
        let shift = shift_input(&t.name);
        let prefix = format!("gates/{}/", t.name);
        let shape_name = format!("{prefix}shape");
        let names = [
            gate.clone(),
            shift.clone(),
            shape_name.clone(),
            format!("{prefix}gate"),
            format!("{prefix}shift"),
            format!("{prefix}scaled"),
            format!("{prefix}out"),
        ];
        if let Some(clash) = names.iter().find(|n| taken.contains(*n)) {
            return Err(model_err(format!(
                "the model already has a tensor called `{clash}`"
            )));
        }
        taken.extend(names.iter().cloned());
        let out = names[6].clone();
        // Every reader of `t` now reads the gated value; graph outputs keep `t` itself.
        for n in graph.node.iter_mut() {
            for i in n.input.iter_mut() {
                if *i == t.name {
                    *i = out.clone();
                }
            }
        }
        // [batch, K] -> [batch, K, 1, ...] for broadcasting over the other axes.
        let mut dims = vec![-1i64, t.channels as i64];
        dims.extend(std::iter::repeat_n(1i64, t.rank - 2));
        graph
            .initializer
            .push(int_tensor(&shape_name, &[dims.len() as i64], &dims));
        let row = vec![Some(batch_dim.clone()), Some(Ok(t.channels as i64))];
        graph
            .input
            .push(value_info(&gate, make_tensor_type(elem::FLOAT, Some(&row))));
        graph.input.push(value_info(
            &shift,
            make_tensor_type(elem::FLOAT, Some(&row)),
        ));
        let node = |op: &str, inputs: [&str; 2], output: &str| onnx::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(format!("{output}:{op}")),
            op_type: Some(op.into()),
            ..Default::default()
        };
        inserts.push((
            producer,
            vec![
                node("Reshape", [&gate, &shape_name], &names[3]),
                node("Reshape", [&shift, &shape_name], &names[4]),
                node("Mul", [&t.name, &names[3]], &names[5]),
                node("Add", [&names[5], &names[4]], &out),
            ],
        ));
    }
    if let Some(keep) = outputs {
        graph
            .output
            .retain(|o| o.name.as_deref().is_some_and(|n| keep.contains(&n)));
    }
    // Insert each group right after the node that produces its tensor, keeping the graph's
    // topological order.
    let old = std::mem::take(&mut graph.node);
    for (i, n) in old.into_iter().enumerate() {
        graph.node.push(n);
        for (_, group) in inserts.iter().filter(|(p, _)| *p == i) {
            graph.node.extend(group.iter().cloned());
        }
    }
    model
        .metadata_props
        .retain(|p| p.key.as_deref() != Some(GATES_VERSION_KEY));
    model
        .metadata_props
        .push(onnx::proto::StringStringEntryProto {
            key: Some(GATES_VERSION_KEY.into()),
            value: Some(GATES_VERSION.into()),
        });
    Ok(model)
}

/// The tensors of `package` to gate, resolved against its manifest's outputs.
fn resolve(package: &ModelPackage, names: &[&str]) -> Result<Vec<GatedTensor>, GradError> {
    let m = package.manifest();
    if names.is_empty() {
        return Err(model_err("name at least one tensor to gate"));
    }
    let mut out = Vec::with_capacity(names.len());
    for (i, &name) in names.iter().enumerate() {
        if names[..i].contains(&name) {
            return Err(model_err(format!("`{name}` is named twice")));
        }
        let spec = package
            .output(name)
            .ok_or_else(|| GradError::UnknownTensor {
                role: "output",
                name: name.to_string(),
                hint: format!(
                    "gates go on outputs listed in the manifest: {}",
                    m.outputs
                        .iter()
                        .map(|o| format!("`{}`", o.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        if spec.dtype != DType::F32 {
            return Err(model_err(format!("`{name}` is not float32")));
        }
        let channels = match spec.shape.get(1) {
            Some(Dim::Fixed(k)) if m.batch => *k,
            _ => {
                return Err(model_err(format!(
                    "`{name}` needs a batch axis and a fixed channel axis (axis 1) to be gated; \
                     its manifest shape is {:?}",
                    spec.shape
                )))
            }
        };
        out.push(GatedTensor {
            name: name.to_string(),
            channels,
            rank: spec.shape.len(),
        });
    }
    Ok(out)
}

/// The manifest of the gated package.
fn gated_manifest(
    package: &ModelPackage,
    source_sha: &str,
    sha: &str,
    tensors: &[GatedTensor],
    batch: &Dim,
    outputs: Option<&[&str]>,
) -> Manifest {
    let m = package.manifest();
    let mut inputs = m.inputs.clone();
    for t in tensors {
        for name in [gate_input(&t.name), shift_input(&t.name)] {
            inputs.push(TensorSpec {
                name,
                dtype: DType::F32,
                shape: vec![batch.clone(), Dim::Fixed(t.channels)],
                range: None,
            });
        }
    }
    let mut extra = m.extra.clone();
    extra.insert(
        "gated_from".into(),
        serde_json::json!({"package": package.dir().display().to_string(), "sha256": source_sha}),
    );
    extra.insert(
        "gates".into(),
        serde_json::Value::Array(
            tensors
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "tensor": t.name,
                        "gate": gate_input(&t.name),
                        "shift": shift_input(&t.name),
                        "channels": t.channels,
                    })
                })
                .collect(),
        ),
    );
    Manifest {
        name: format!("{}+gates", m.name),
        description: format!(
            "{} With per-channel gates: for each gated tensor t, inputs gate__t and shift__t \
             [batch, channels] make the rest of the network see gate * t + shift (ones and \
             zeros reproduce the original exactly); the outputs are the original's{}.",
            m.description,
            if outputs.is_some() { " (a subset)" } else { "" }
        ),
        file: "model.onnx".into(),
        sha256: sha.to_string(),
        origin: format!(
            "Made by latentflow (channel gates, version {GATES_VERSION}) from {} (sha256 {source_sha}), \
             gating {}.",
            package.onnx_path().display(),
            tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        licence: m.licence.clone(),
        inputs,
        outputs: m
            .outputs
            .iter()
            .filter(|o| outputs.is_none_or(|keep| keep.contains(&o.name.as_str())))
            .cloned()
            .collect(),
        batch: m.batch,
        extra,
    }
}

/// Whether `dir` holds a gated package built by this version from the model with SHA-256
/// `source_sha`.
fn cached_package_is_current(dir: &Path, source_sha: &str) -> Option<ModelPackage> {
    let package = ModelPackage::load(dir).ok()?;
    let from = package.manifest().extra.get("gated_from")?.get("sha256")?;
    if from.as_str() != Some(source_sha) {
        return None;
    }
    let (model, sha) = read_model(&package.onnx_path()).ok()?;
    let current = model.metadata_props.iter().any(|p| {
        p.key.as_deref() == Some(GATES_VERSION_KEY) && p.value.as_deref() == Some(GATES_VERSION)
    });
    (current && sha.eq_ignore_ascii_case(&package.manifest().sha256)).then_some(package)
}

/// The package of `package` with per-channel gates on the outputs `tensors` (see the module
/// documentation): found in the cache when current, built and cached otherwise. `outputs`
/// keeps only those graph outputs (all when `None`): a caller that needs only the image saves
/// ONNX Runtime writing out, and the service copying, the other outputs. `cache_dir` defaults
/// to the package's `.grad` folder.
pub fn gated_package(
    package: &ModelPackage,
    tensors: &[&str],
    outputs: Option<&[&str]>,
    cache_dir: Option<&Path>,
) -> Result<ModelPackage, GradError> {
    let source = package.onnx_path();
    let (model, sha) = read_model(&source)?;
    check_checksum(package, &source, &sha)?;
    let gated = resolve(package, tensors)?;
    if let Some(keep) = outputs {
        if keep.is_empty() {
            return Err(model_err("keep at least one output"));
        }
        if let Some(bad) = keep.iter().find(|o| package.output(o).is_none()) {
            return Err(GradError::UnknownTensor {
                role: "output",
                name: bad.to_string(),
                hint: "name outputs listed in the manifest".into(),
            });
        }
    }
    let batch = package
        .manifest()
        .inputs
        .first()
        .and_then(|i| i.batch_axis())
        .cloned()
        .unwrap_or_else(|| Dim::Named("batch".into()));
    let root = cache_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| package.dir().join(CACHE_DIR));
    let mut names: Vec<String> = gated.iter().map(|t| t.name.clone()).collect();
    if let Some(keep) = outputs {
        names.push(format!("out={}", keep.join("+")));
    }
    let folder = cache_file_name(&sha, "gated", &names);
    let dir: PathBuf = root.join(folder.trim_end_matches(".onnx"));
    if let Some(p) = cached_package_is_current(&dir, &sha) {
        tracing::debug!(path = %dir.display(), "using cached gated model");
        return Ok(p);
    }
    let started = std::time::Instant::now();
    let rewritten = add_gates(&model, &gated, &batch, outputs)?;
    let bytes = rewritten.encode_to_vec();
    let new_sha: String = {
        use sha2::{Digest, Sha256};
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    prepare_cache_dir(&root)?;
    write_atomically(&dir.join("model.onnx"), &bytes)?;
    let manifest = gated_manifest(package, &sha, &new_sha, &gated, &batch, outputs);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| model_err(e.to_string()))?;
    write_atomically(&dir.join(MANIFEST_FILE), (text + "\n").as_bytes())?;
    tracing::info!(
        path = %dir.display(),
        seconds = started.elapsed().as_secs_f64(),
        "built gated model"
    );
    Ok(ModelPackage::from_manifest(dir, manifest)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> onnx::ModelProto {
        // x [b, 2, 3] -> Relu -> a (output) -> Neg -> y (output)
        let node = |op: &str, i: &str, o: &str| onnx::NodeProto {
            input: vec![i.into()],
            output: vec![o.into()],
            op_type: Some(op.into()),
            ..Default::default()
        };
        let ty = make_tensor_type(
            elem::FLOAT,
            Some(&[Some(Err("batch".into())), Some(Ok(2)), Some(Ok(3))]),
        );
        onnx::ModelProto {
            ir_version: Some(9),
            opset_import: vec![onnx::proto::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(onnx::GraphProto {
                node: vec![node("Relu", "x", "a"), node("Neg", "a", "y")],
                input: vec![value_info("x", ty.clone())],
                output: vec![value_info("a", ty.clone()), value_info("y", ty)],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn gates_sit_between_the_producer_and_its_readers() {
        let t = GatedTensor {
            name: "a".into(),
            channels: 2,
            rank: 3,
        };
        let m = add_gates(
            &tiny(),
            std::slice::from_ref(&t),
            &Dim::Named("batch".into()),
            None,
        )
        .unwrap();
        let g = m.graph.unwrap();
        let ops: Vec<&str> = g
            .node
            .iter()
            .map(|n| n.op_type.as_deref().unwrap())
            .collect();
        assert_eq!(ops, ["Relu", "Reshape", "Reshape", "Mul", "Add", "Neg"]);
        assert_eq!(g.node[5].input, ["gates/a/out"]);
        assert_eq!(g.node[3].input, ["a", "gates/a/gate"]);
        let inputs: Vec<&str> = g.input.iter().filter_map(|i| i.name.as_deref()).collect();
        assert_eq!(inputs, ["x", "gate__a", "shift__a"]);
        // The output keeps the activation before the gate.
        assert_eq!(g.output[0].name.as_deref(), Some("a"));
        let shape = onnx::tensor_ints(&g.initializer[0]).unwrap();
        assert_eq!(shape, [-1, 2, 1]);
        // Gating twice clashes with the names of the first rewrite.
        let again = add_gates(
            &onnx::ModelProto {
                graph: Some(g),
                ..m
            },
            &[t],
            &Dim::Named("batch".into()),
            None,
        );
        assert!(again.unwrap_err().to_string().contains("already has"));
    }

    #[test]
    fn inputs_cannot_be_gated() {
        let t = GatedTensor {
            name: "x".into(),
            channels: 2,
            rank: 3,
        };
        let err = add_gates(&tiny(), &[t], &Dim::Named("batch".into()), None).unwrap_err();
        assert!(err.to_string().contains("not computed by a node"), "{err}");
    }

    #[test]
    fn outputs_can_be_dropped() {
        let t = GatedTensor {
            name: "a".into(),
            channels: 2,
            rank: 3,
        };
        let m = add_gates(&tiny(), &[t], &Dim::Named("batch".into()), Some(&["y"])).unwrap();
        let g = m.graph.unwrap();
        let outs: Vec<&str> = g.output.iter().filter_map(|o| o.name.as_deref()).collect();
        assert_eq!(outs, ["y"]);
        assert_eq!(g.node.len(), 6, "the gated tensor is still computed");
    }
}
