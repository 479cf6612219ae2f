//! Building the vector-Jacobian-product (reverse-mode) graph of an ONNX model.
//!
//! Given a forward model, one tensor `y` to differentiate and the tensors `x1..xk` to
//! differentiate it with respect to (graph inputs or initializers), the built model takes every
//! forward input plus a cotangent `grad_in__y` shaped like `y`, and returns `y` itself and, for
//! every `xi`, `grad__xi` = (dy/dxi)ᵀ · cotangent, shaped like `xi`.
//!
//! Decisions:
//! - The reverse graph is appended to the forward graph, which stays as it is (apart from
//!   optional outputs some rules ask of forward nodes, such as `MaxPool`'s indices), so
//!   activations are computed once and shared. Nodes the result does not need are dropped.
//! - Only nodes on a path from some `xi` to `y` get a rule: a node whose outputs do not depend on
//!   the differentiated tensors (shape computations, constant subgraphs, integer index
//!   arithmetic) is copied and run as it is. Integer and boolean tensors never carry gradients,
//!   and neither do the outputs of piecewise-constant operators (`Floor`, `Sign`, comparisons).
//! - A node on such a path whose operator has no rule, or whose rule cannot handle its
//!   attributes, is an error that names the operator and the node. The builder never guesses.
//! - Initializers differentiated against are also declared as graph inputs, with the
//!   initializer as their default value, so a caller can feed updated weights (fine-tuning)
//!   without rebuilding.
//! - Forward opsets 13 to 21 of the default domain are accepted; the model's opset is kept, and
//!   raised to 17 when lower, because the reverse graph needs `ScatterElements` with a
//!   reduction (opset 16). Opsets 13 to 16 differ from 17 by additions, except for the default
//!   coordinate mode of `RoiAlign`, which is written out on such nodes.

use std::collections::{HashMap, HashSet};

use super::emit::Emitter;
use super::onnx::{
    attr_string, elem, elem_name, is_external, is_float, make_tensor_type, proto, tensor_type,
    value_info, GraphProto, ModelProto, NodeExt, NodeProto,
};
use super::rules;
use super::shape::{Dim, Shapes};
use super::GradError;

/// The name of the cotangent input for output `y`.
pub fn cotangent_name(output: &str) -> String {
    format!("grad_in__{output}")
}

/// The name of the gradient output for tensor `x`.
pub fn gradient_name(wrt: &str) -> String {
    format!("grad__{x}", x = wrt)
}

/// The oldest and newest opsets of the default domain the builder reads.
pub const OPSETS: (i64, i64) = (13, 21);

/// The opset the reverse graph is written in when the forward model's is older.
const MIN_OUTPUT_OPSET: i64 = 17;

/// Version of the builder, written into the models it makes; cached models of another version
/// are rebuilt.
pub const BUILDER_VERSION: &str = "2";

/// Metadata key holding [`BUILDER_VERSION`].
pub const VERSION_KEY: &str = "latentflow.grad.version";

/// What a gradient is taken of and with respect to, found in a forward model.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// Tensors differentiated against, with whether each is an initializer.
    pub wrt: Vec<(String, bool)>,
}

/// A description of a node for error messages: its name, operator and first output.
pub(crate) fn node_label(node: &NodeProto, index: usize) -> String {
    let op = if node.domain_name().is_empty() {
        node.op().to_string()
    } else {
        format!("{}::{}", node.domain_name(), node.op())
    };
    match node.name.as_deref().filter(|n| !n.is_empty()) {
        Some(name) => format!("node `{name}` ({op})"),
        None => match node.output.first() {
            Some(out) => format!("node #{index} ({op}, output `{out}`)"),
            None => format!("node #{index} ({op})"),
        },
    }
}

/// Operators whose outputs carry no gradient (integer, boolean or piecewise constant).
fn blocks_gradient(op: &str) -> bool {
    matches!(
        op,
        "Shape"
            | "Size"
            | "Floor"
            | "Ceil"
            | "Round"
            | "Sign"
            | "Equal"
            | "Less"
            | "Greater"
            | "LessOrEqual"
            | "GreaterOrEqual"
            | "Not"
            | "And"
            | "Or"
            | "Xor"
            | "ArgMax"
            | "ArgMin"
            | "NonZero"
            | "IsNaN"
            | "IsInf"
            | "ConstantOfShape"
            | "Constant"
            | "Range"
            | "EyeLike"
            | "RandomNormalLike"
            | "RandomUniformLike"
            | "RandomNormal"
            | "RandomUniform"
            | "Bernoulli"
            | "Multinomial"
    )
}

/// Every tensor a node reads, including names its subgraphs take from the enclosing scope.
fn reads(node: &NodeProto) -> Vec<String> {
    let mut out: Vec<String> = node
        .input
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    for a in &node.attribute {
        for g in a.g.iter().chain(&a.graphs) {
            subgraph_reads(g, &mut out);
        }
    }
    out
}

fn subgraph_reads(g: &GraphProto, out: &mut Vec<String>) {
    for n in &g.node {
        out.extend(reads(n));
    }
}

/// Sorts the graph's nodes so every node comes after the producers of what it reads.
fn topological_order(graph: &GraphProto) -> Result<Vec<usize>, GradError> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for o in &n.output {
            if !o.is_empty() {
                producer.insert(o.as_str(), i);
            }
        }
    }
    let n = graph.node.len();
    let mut state = vec![0u8; n];
    let mut order = Vec::with_capacity(n);
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, Vec<usize>)> = Vec::new();
        let deps = |i: usize| -> Vec<usize> {
            reads(&graph.node[i])
                .iter()
                .filter_map(|t| producer.get(t.as_str()).copied())
                .filter(|&p| p != i)
                .collect()
        };
        state[start] = 1;
        stack.push((start, deps(start)));
        while let Some((node, pending)) = stack.last_mut() {
            match pending.pop() {
                Some(d) if state[d] == 0 => {
                    state[d] = 1;
                    let dd = deps(d);
                    stack.push((d, dd));
                }
                Some(d) if state[d] == 1 => {
                    return Err(GradError::Model {
                        reason: format!(
                            "the graph has a cycle through {}",
                            node_label(&graph.node[d], d)
                        ),
                    });
                }
                Some(_) => {}
                None => {
                    state[*node] = 2;
                    order.push(*node);
                    stack.pop();
                }
            }
        }
    }
    Ok(order)
}

/// The opset of the default domain.
pub(crate) fn default_opset(model: &ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
}

/// Finds `output` and `wrt` in the model and checks that they can be differentiated.
pub(crate) fn resolve(
    model: &ModelProto,
    shapes: &Shapes,
    output: &str,
    wrt: &[String],
) -> Result<Target, GradError> {
    let graph = model.graph.as_ref().ok_or_else(|| GradError::Model {
        reason: "the model has no graph".into(),
    })?;
    let produced = graph
        .node
        .iter()
        .any(|n| n.output.iter().any(|o| o == output));
    let is_input = graph
        .input
        .iter()
        .any(|i| i.name.as_deref() == Some(output));
    if !produced && !is_input {
        let outputs: Vec<String> = graph
            .output
            .iter()
            .filter_map(|o| o.name.clone())
            .map(|n| format!("`{n}`"))
            .collect();
        return Err(GradError::UnknownTensor {
            role: "output",
            name: output.to_string(),
            hint: format!("the model's outputs are {}", outputs.join(", ")),
        });
    }
    if !is_float(shapes.elem(output)) {
        return Err(GradError::NotDifferentiable {
            name: output.to_string(),
            reason: format!(
                "its element type is {}; only floating-point tensors have gradients",
                elem_name(shapes.elem(output))
            ),
        });
    }
    if wrt.is_empty() {
        return Err(GradError::Model {
            reason: "name at least one input or initializer to differentiate with respect to"
                .into(),
        });
    }
    let initializers: HashSet<&str> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let inputs: Vec<&str> = graph
        .input
        .iter()
        .filter_map(|i| i.name.as_deref())
        .filter(|n| !initializers.contains(n))
        .collect();
    let mut out = Vec::new();
    for (k, w) in wrt.iter().enumerate() {
        if wrt[..k].contains(w) {
            return Err(GradError::Model {
                reason: format!("`{w}` is named twice among the tensors to differentiate against"),
            });
        }
        let is_init = initializers.contains(w.as_str());
        if !is_init && !inputs.contains(&w.as_str()) {
            let float_inputs: Vec<String> = inputs
                .iter()
                .filter(|n| is_float(shapes.elem(n)))
                .map(|n| format!("`{n}`"))
                .collect();
            return Err(GradError::UnknownTensor {
                role: "input or initializer",
                name: w.clone(),
                hint: format!(
                    "it is neither a graph input nor an initializer; the float inputs are {}",
                    if float_inputs.is_empty() {
                        "none".to_string()
                    } else {
                        float_inputs.join(", ")
                    }
                ),
            });
        }
        if !is_float(shapes.elem(w)) {
            return Err(GradError::NotDifferentiable {
                name: w.clone(),
                reason: format!(
                    "its element type is {}; only floating-point tensors have gradients",
                    elem_name(shapes.elem(w))
                ),
            });
        }
        out.push((w.clone(), is_init));
    }
    Ok(Target { wrt: out })
}

/// Builds the VJP model of `model` for `output` with respect to `wrt`.
pub(crate) fn build(
    model: &ModelProto,
    output: &str,
    wrt: &[String],
) -> Result<ModelProto, GradError> {
    let opset = default_opset(model).ok_or_else(|| GradError::Model {
        reason: "the model imports no opset of the default ONNX domain".into(),
    })?;
    if opset < OPSETS.0 || opset > OPSETS.1 {
        return Err(GradError::Model {
            reason: format!(
                "the model uses opset {opset}; gradients are built for opsets {} to {} \
                 (re-export the model with opset 17)",
                OPSETS.0, OPSETS.1
            ),
        });
    }
    let graph = model.graph.as_ref().ok_or_else(|| GradError::Model {
        reason: "the model has no graph".into(),
    })?;
    if let Some(t) = graph.initializer.iter().find(|t| is_external(t)) {
        return Err(GradError::Model {
            reason: format!(
                "initializer `{}` keeps its data in an external file, which is not supported",
                t.name.as_deref().unwrap_or("")
            ),
        });
    }
    if !graph.sparse_initializer.is_empty() {
        return Err(GradError::Model {
            reason: "sparse initializers are not supported".into(),
        });
    }
    let shapes = Shapes::infer(graph);
    let target = resolve(model, &shapes, output, wrt)?;
    let order = topological_order(graph)?;

    // Which tensors depend on the differentiated ones (through float values)...
    let mut active: HashSet<String> = target.wrt.iter().map(|(w, _)| w.clone()).collect();
    for &i in &order {
        let node = &graph.node[i];
        if blocks_gradient(node.op()) && node.domain_name().is_empty() {
            continue;
        }
        if reads(node).iter().any(|t| active.contains(t)) {
            for o in &node.output {
                let e = shapes.elem(o);
                if !o.is_empty() && (is_float(e) || e == elem::UNDEFINED) {
                    active.insert(o.clone());
                }
            }
        }
    }
    // ...and which ones the output depends on.
    let mut useful: HashSet<String> = HashSet::from([output.to_string()]);
    for &i in order.iter().rev() {
        let node = &graph.node[i];
        if node.output.iter().any(|o| useful.contains(o)) {
            useful.extend(reads(node));
        }
    }

    let taken: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().chain(&n.input).cloned())
        .chain(graph.input.iter().filter_map(|i| i.name.clone()))
        .chain(graph.initializer.iter().filter_map(|t| t.name.clone()))
        .collect();
    let mut em = Emitter::new(&shapes, taken);

    let cotangent = cotangent_name(output);
    let grad_names: Vec<String> = target.wrt.iter().map(|(w, _)| gradient_name(w)).collect();
    for name in std::iter::once(&cotangent).chain(&grad_names) {
        if !em.reserve(name) {
            return Err(GradError::Model {
                reason: format!("the model already has a tensor called `{name}`"),
            });
        }
    }

    // The reverse sweep: gradient contributions per tensor, summed when first read.
    let mut contributions: HashMap<String, Vec<String>> = HashMap::new();
    contributions.insert(output.to_string(), vec![cotangent.clone()]);
    for &i in order.iter().rev() {
        let node = &graph.node[i];
        let relevant = |t: &String| active.contains(t) && useful.contains(t);
        if !node.output.iter().any(relevant) {
            continue;
        }
        let gout: Vec<Option<String>> = node
            .output
            .iter()
            .map(|o| contributions.remove(o).map(|parts| em.sum(parts)))
            .collect();
        if gout.iter().all(Option::is_none) {
            continue;
        }
        // `active` holds only float tensors and those of unknown type, so a tensor whose type
        // inference could not find still gets its gradient.
        let need: Vec<bool> = node
            .input
            .iter()
            .map(|t| !t.is_empty() && active.contains(t))
            .collect();
        if !need.iter().any(|&b| b) {
            continue;
        }
        let label = node_label(node, i);
        em.scope = node
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("n{i}"));
        let grads = {
            let mut ctx = rules::Ctx {
                em: &mut em,
                node,
                index: i,
                gout,
                need: need.clone(),
            };
            rules::vjp(&mut ctx).map_err(|reason| GradError::Unsupported {
                op: node.op().to_string(),
                node: label.clone(),
                reason,
            })?
        };
        for (k, needed) in need.iter().enumerate() {
            if !needed {
                continue;
            }
            match grads.get(k).cloned().flatten() {
                Some(g) => contributions
                    .entry(node.input[k].clone())
                    .or_default()
                    .push(g),
                None => {
                    return Err(GradError::Unsupported {
                        op: node.op().to_string(),
                        node: label,
                        reason: format!(
                            "the gradient with respect to its input {k} (`{}`) is not supported",
                            node.input[k]
                        ),
                    })
                }
            }
        }
    }
    em.scope.clear();

    // Gradients of the differentiated tensors, zeros where the output does not depend on them.
    let mut finals = Vec::new();
    for ((w, _), gname) in target.wrt.iter().zip(&grad_names) {
        let g = match contributions.remove(w) {
            Some(parts) => em.sum(parts),
            None => {
                let e = shapes.elem(w);
                em.zeros_like(w, e)
            }
        };
        finals.push((g, gname.clone()));
    }
    for (g, gname) in &finals {
        em.op_into("Identity", &[g], vec![], &[gname]);
    }

    assemble(
        model, graph, &order, &shapes, em, output, &cotangent, &target, opset,
    )
}

/// The new model: forward nodes (with any extra outputs), reverse nodes, inputs and outputs.
#[allow(clippy::too_many_arguments)]
fn assemble(
    model: &ModelProto,
    graph: &GraphProto,
    order: &[usize],
    shapes: &Shapes,
    em: Emitter<'_>,
    output: &str,
    cotangent: &str,
    target: &Target,
    opset: i64,
) -> Result<ModelProto, GradError> {
    let mut nodes: Vec<NodeProto> = graph.node.clone();
    for ((index, slot), name) in &em.extra_outputs {
        let node = &mut nodes[*index];
        if node.output.len() <= *slot {
            node.output.resize(*slot + 1, String::new());
        }
        node.output[*slot] = name.clone();
    }
    if opset < 16 {
        for node in nodes
            .iter_mut()
            .filter(|n| n.op() == "RoiAlign" && n.domain_name().is_empty())
        {
            if node.attr("coordinate_transformation_mode").is_none() {
                node.attribute.push(attr_string(
                    "coordinate_transformation_mode",
                    "output_half_pixel",
                ));
            }
        }
    }
    let mut nodes: Vec<NodeProto> = order.iter().map(|&i| nodes[i].clone()).collect();
    nodes.extend(em.nodes);

    let declared_type = |name: &str| -> Option<proto::TypeProto> {
        graph
            .input
            .iter()
            .chain(&graph.output)
            .chain(&graph.value_info)
            .find(|v| v.name.as_deref() == Some(name))
            .and_then(|v| v.r#type.clone())
    };
    let inferred_type = |name: &str| -> proto::TypeProto {
        let dims: Option<Vec<Option<Result<i64, String>>>> = shapes.dims(name).map(|d| {
            d.iter()
                .map(|d| match d {
                    Dim::Known(n) => Some(Ok(*n)),
                    Dim::Sym(s) => Some(Err(s.clone())),
                    Dim::Unknown => None,
                })
                .collect()
        });
        make_tensor_type(shapes.elem(name), dims.as_deref())
    };
    let type_of = |name: &str| declared_type(name).unwrap_or_else(|| inferred_type(name));

    let mut inputs = graph.input.clone();
    inputs.push(value_info(cotangent, type_of(output)));
    for (w, is_init) in &target.wrt {
        if *is_init && !inputs.iter().any(|i| i.name.as_deref() == Some(w)) {
            inputs.push(value_info(w, inferred_type(w)));
        }
    }
    let mut outputs = vec![value_info(output, type_of(output))];
    for (w, _) in &target.wrt {
        let ty = match declared_type(w) {
            Some(t) if tensor_type(&t).is_some() => t,
            _ => inferred_type(w),
        };
        outputs.push(value_info(&gradient_name(w), ty));
    }

    let mut initializers = graph.initializer.clone();
    initializers.extend(em.initializers);

    let mut new_graph = GraphProto {
        node: nodes,
        name: Some(format!("{}_vjp", graph.name.as_deref().unwrap_or("graph"))),
        initializer: initializers,
        doc_string: Some(format!(
            "Vector-Jacobian product of `{output}` built by latentflow from the graph `{}`",
            graph.name.as_deref().unwrap_or("")
        )),
        input: inputs,
        output: outputs,
        value_info: graph.value_info.clone(),
        ..Default::default()
    };
    prune(&mut new_graph);

    let mut model = ModelProto {
        graph: Some(new_graph),
        producer_name: Some("latentflow-grad".into()),
        producer_version: Some(BUILDER_VERSION.into()),
        ..model.clone()
    };
    model.training_info.clear();
    for o in &mut model.opset_import {
        if matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
            o.version = Some(opset.max(MIN_OUTPUT_OPSET));
        }
    }
    model
        .metadata_props
        .retain(|p| p.key.as_deref() != Some(VERSION_KEY));
    model.metadata_props.push(proto::StringStringEntryProto {
        key: Some(VERSION_KEY.into()),
        value: Some(BUILDER_VERSION.into()),
    });
    Ok(model)
}

/// Drops nodes, initializers and value infos the graph's outputs do not need.
fn prune(graph: &mut GraphProto) {
    let mut needed: HashSet<String> = graph.output.iter().filter_map(|o| o.name.clone()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(reads(node));
        }
    }
    let mut k = keep.iter();
    graph.node.retain(|_| *k.next().expect("one flag per node"));
    let inputs: HashSet<String> = graph.input.iter().filter_map(|i| i.name.clone()).collect();
    graph.initializer.retain(|t| {
        t.name
            .as_ref()
            .is_some_and(|n| needed.contains(n) || inputs.contains(n))
    });
    graph
        .value_info
        .retain(|v| v.name.as_ref().is_some_and(|n| needed.contains(n)));
}

/// The forward model with the initializers `names` also declared as graph inputs, so a caller
/// can override them (the weights being fine-tuned) while they keep their values by default.
pub(crate) fn with_parameter_inputs(model: &ModelProto, names: &[String]) -> ModelProto {
    let mut model = model.clone();
    if let Some(graph) = model.graph.as_mut() {
        let shapes = Shapes::infer(graph);
        for n in names {
            if !graph.input.iter().any(|i| i.name.as_deref() == Some(n)) {
                let dims: Option<Vec<Option<Result<i64, String>>>> = shapes
                    .dims(n)
                    .map(|d| d.iter().map(|d| d.known().map(Ok)).collect());
                graph.input.push(value_info(
                    n,
                    make_tensor_type(shapes.elem(n), dims.as_deref()),
                ));
            }
        }
    }
    model
}
