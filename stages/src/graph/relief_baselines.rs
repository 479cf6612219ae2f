//! Baselines of RELIEF that need gradients through the frozen GNN: a full-feature prompt and
//! fine-tuning of the GNN's weights, both through the reverse-mode (VJP) ONNX models of
//! [`latentflow_engine::grad`], and the prompt basis read from the package.
//!
//! - Full prompt (GPF): one prompt vector `z` shared by every node of every graph, added to
//!   the features (through the prompt basis, as RELIEF's prompts), trained jointly with the
//!   head by Adam on the exact gradient `∂L/∂x` from the VJP model, summed over the nodes.
//! - Fine-tuning: the GNN's weights (every trained initializer but the fixed SVD projection)
//!   and the head trained jointly, by Adam on the exact weight gradients of the VJP model,
//!   which takes the weights as inputs.
//!
//! Both run the training graphs as one disjoint union per epoch (a forward call for the
//! readouts, then a VJP call with the head's gradient as cotangent), and the test graphs as
//! unions of at most [`UNION_NODES`] nodes.

use std::path::Path;

use latentflow_engine::grad::Differentiable;
use latentflow_engine::inference::Device;
use latentflow_engine::model::ModelPackage;
use latentflow_engine::Tensor;
use ndarray::{Array1, Array2, ArrayD, Axis, IxDyn};
use serde::{Deserialize, Serialize};

use super::embed::ModelIo;
use super::relief::{score, Head, HeadSettings, Readout, ReliefTask, Scores};
use super::relief_policy::Adam;

/// Most nodes per test union.
pub const UNION_NODES: usize = 4096;

/// Name of the fixed projection initializer of the node encoders.
pub const PROJECTION: &str = "svd.proj";

/// Settings of the gradient baselines.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GradSettings {
    /// Full-batch epochs.
    pub epochs: usize,
    /// Adam learning rate of the prompt or the GNN weights.
    pub lr: f64,
    /// The head's settings (its `epochs` are ignored: the head trains along).
    pub head: HeadSettings,
}

/// The prompt basis of a package: `Bᵀ = (PᵀP)⁻¹ Pᵀ [K, F]` for its projection `P [F, K]`
/// (`svd.proj`), so that a prompt `z` moves the projected features by exactly `z`. `None`
/// when the package has no projection. Fails if the projection's columns are not orthogonal.
pub fn prompt_basis(dir: &Path) -> Result<Option<Array2<f32>>, String> {
    let names = initializer_names(dir, &[PROJECTION])?;
    if names.is_empty() {
        return Ok(None);
    }
    let package = ModelPackage::load(dir).map_err(|e| e.to_string())?;
    let io = ModelIo::of(&package)?;
    let d = Differentiable::new(&package, &io.h, &[PROJECTION], Device::Cpu)
        .map_err(|e| e.to_string())?;
    let p = d
        .parameter(PROJECTION)
        .ok_or("the projection is not a float32 initializer")?
        .clone()
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| format!("{PROJECTION}: {e}"))?;
    let (f, k) = p.dim();
    let mut gram = vec![0f64; k * k];
    for row in p.rows() {
        for a in 0..k {
            let ra = row[a] as f64;
            for b in 0..k {
                gram[a * k + b] += ra * row[b] as f64;
            }
        }
    }
    for a in 0..k {
        for b in 0..k {
            if a != b {
                let rel = gram[a * k + b].abs() / (gram[a * k + a] * gram[b * k + b]).sqrt();
                if rel > 1e-3 {
                    return Err(format!(
                        "{PROJECTION} of {}: columns {a} and {b} are not orthogonal ({rel:.1e})",
                        dir.display()
                    ));
                }
            }
        }
    }
    let mut basis = Array2::zeros((k, f));
    for j in 0..f {
        for a in 0..k {
            basis[[a, j]] = (p[[j, a]] as f64 / gram[a * k + a]) as f32;
        }
    }
    Ok(Some(basis))
}

/// Which of `candidates` name tensors of the package's ONNX file (looked up as names in the
/// file; a missing one is left out).
pub fn initializer_names(dir: &Path, candidates: &[&str]) -> Result<Vec<String>, String> {
    let package = ModelPackage::load(dir).map_err(|e| e.to_string())?;
    let path = package.onnx_path();
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(candidates
        .iter()
        .filter(|c| {
            let c = c.as_bytes();
            bytes.windows(c.len() + 1).any(|w| {
                // Names are length-prefixed protobuf strings: the byte before is the length.
                w[1..] == *c && w[0] as usize == c.len()
            })
        })
        .map(|c| c.to_string())
        .collect())
}

/// The trained weights of a GNN package (GCN layers `gcnL.{weight,bias,prelu}`, GIN layers
/// `ginL.{mlp1,mlp2}.{weight,bias}` and `ginL.bn.{scale,shift}`), without the projection.
pub fn default_finetune_weights(dir: &Path) -> Result<Vec<String>, String> {
    let mut c = Vec::new();
    for l in 1..=8 {
        for s in ["weight", "bias", "prelu"] {
            c.push(format!("gcn{l}.{s}"));
        }
        for s in [
            "mlp1.weight",
            "mlp1.bias",
            "mlp2.weight",
            "mlp2.bias",
            "bn.scale",
            "bn.shift",
        ] {
            c.push(format!("gin{l}.{s}"));
        }
    }
    let refs: Vec<&str> = c.iter().map(String::as_str).collect();
    initializer_names(dir, &refs)
}

/// A disjoint union of some of the task's graphs.
struct Union {
    x: Array2<f32>,
    edge_index: Vec<i64>,
    edges: usize,
    batch: Vec<i64>,
    offsets: Vec<usize>,
}

impl Union {
    fn new(task: &ReliefTask, graphs: &[usize], shared: Option<&[f32]>) -> Union {
        let n: usize = graphs.iter().map(|&g| task.graphs[g].num_nodes()).sum();
        let f = task.graphs[graphs[0]].x().ncols();
        let mut x = Array2::zeros((n, f));
        let (mut src, mut dst, mut batch, mut offsets) = (vec![], vec![], vec![], vec![]);
        let mut at = 0;
        for (k, &g) in graphs.iter().enumerate() {
            let gg = &task.graphs[g];
            let m = gg.num_nodes();
            x.slice_mut(ndarray::s![at..at + m, ..]).assign(gg.x());
            for &(s, t) in gg.edges() {
                src.push((s + at) as i64);
                dst.push((t + at) as i64);
            }
            batch.extend(std::iter::repeat_n(k as i64, m));
            offsets.push(at);
            at += m;
        }
        if let Some(p) = shared {
            for mut row in x.rows_mut() {
                row.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
        }
        let edges = src.len();
        src.extend(dst);
        Union {
            x,
            edge_index: src,
            edges,
            batch,
            offsets,
        }
    }

    fn inputs<'a>(&self, io: &'a ModelIo) -> Vec<(&'a str, Tensor)> {
        let mut v = vec![
            (io.x.as_str(), Tensor::f32(self.x.clone().into_dyn())),
            (
                io.edge_index.as_str(),
                Tensor::i64(
                    ArrayD::from_shape_vec(IxDyn(&[2, self.edges]), self.edge_index.clone())
                        .expect("shape"),
                ),
            ),
        ];
        if let Some(b) = &io.batch {
            v.push((
                b.as_str(),
                Tensor::i64(Array1::from_vec(self.batch.clone()).into_dyn()),
            ));
        }
        v
    }

    /// The readouts of the union's graphs from the differentiated output.
    fn readouts(&self, out: &ArrayD<f32>, readout: Readout) -> Vec<Array1<f32>> {
        let out = out
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .expect("2-D");
        match readout {
            Readout::Target => self
                .offsets
                .iter()
                .map(|&o| out.row(o).to_owned())
                .collect(),
            Readout::Graph => (0..self.offsets.len())
                .map(|k| out.row(k).to_owned())
                .collect(),
        }
    }

    /// A cotangent of the output shape with `grads[k]` at graph `k`'s readout.
    fn cotangent(&self, shape: &[usize], grads: &[Vec<f64>], readout: Readout) -> ArrayD<f32> {
        let mut c = ArrayD::zeros(IxDyn(shape));
        for (k, g) in grads.iter().enumerate() {
            let row = match readout {
                Readout::Target => self.offsets[k],
                Readout::Graph => k,
            };
            for (j, &v) in g.iter().enumerate() {
                c[[row, j]] = v as f32;
            }
        }
        c
    }
}

fn output_name(io: &ModelIo, readout: Readout) -> Result<&str, String> {
    match readout {
        Readout::Target => Ok(&io.h),
        Readout::Graph => {
            io.g.as_deref()
                .ok_or_else(|| "readout `graph` needs a graph embedding output".to_string())
        }
    }
}

/// Readouts of `graphs` in unions of at most [`UNION_NODES`] nodes, with extra inputs (weights).
fn forward_readouts(
    d: &Differentiable,
    io: &ModelIo,
    task: &ReliefTask,
    graphs: &[usize],
    shared: Option<&[f32]>,
    extra: &[(&str, Tensor)],
) -> Result<Vec<Array1<f32>>, String> {
    let mut out = Vec::with_capacity(graphs.len());
    let mut chunk: Vec<usize> = Vec::new();
    let mut nodes = 0;
    let flush = |chunk: &mut Vec<usize>, out: &mut Vec<Array1<f32>>| -> Result<(), String> {
        if chunk.is_empty() {
            return Ok(());
        }
        let u = Union::new(task, chunk, shared);
        let mut inputs = u.inputs(io);
        inputs.extend(extra.iter().cloned());
        let y = d.forward(&inputs).map_err(|e| e.to_string())?;
        out.extend(u.readouts(&y, task.readout));
        chunk.clear();
        Ok(())
    };
    for &g in graphs {
        let m = task.graphs[g].num_nodes();
        if nodes + m > UNION_NODES {
            flush(&mut chunk, &mut out)?;
            nodes = 0;
        }
        chunk.push(g);
        nodes += m;
    }
    flush(&mut chunk, &mut out)?;
    Ok(out)
}

fn test_scores(task: &ReliefTask, head: &Head, readouts: &[Array1<f32>]) -> Scores {
    let probs: Vec<Vec<f64>> = readouts.iter().map(|r| head.probs(r)).collect();
    let labels: Vec<usize> = task.test.iter().map(|&g| task.labels[g]).collect();
    score(&probs, &labels, task.classes)
}

/// The head's gradient step on the training readouts; returns the mean loss and the gradient
/// of the mean loss with respect to each readout.
fn head_step(
    head: &mut Head,
    task: &ReliefTask,
    readouts: &[Array1<f32>],
    s: &HeadSettings,
) -> (f64, Vec<Vec<f64>>) {
    let n = task.train.len().max(1) as f64;
    let mut grad = vec![0.0; head.theta.len()];
    let mut loss = 0.0;
    let mut dr = Vec::with_capacity(readouts.len());
    for (r, &g) in readouts.iter().zip(&task.train) {
        let (l, d) = head.loss_grad(r, task.labels[g], &mut grad);
        loss += l;
        dr.push(d.into_iter().map(|v| v / n).collect());
    }
    head.step(&mut grad, task.train.len(), s);
    (loss / n, dr)
}

/// What a gradient baseline returns.
#[derive(Clone, Debug, PartialEq)]
pub struct GradResult {
    /// Test scores.
    pub scores: Scores,
    /// Mean training loss per epoch.
    pub losses: Vec<f64>,
}

/// The full-feature prompt baseline.
pub fn full_prompt(dir: &Path, task: &ReliefTask, s: &GradSettings) -> Result<GradResult, String> {
    let package = ModelPackage::load(dir).map_err(|e| e.to_string())?;
    let io = ModelIo::of(&package)?;
    let out = output_name(&io, task.readout)?.to_string();
    let d = Differentiable::new(&package, &out, &[io.x.as_str()], Device::Cpu)
        .map_err(|e| e.to_string())?;
    let k = task.prompt_dim();
    let mut z = vec![0.0f64; k];
    let mut adam = Adam::new(s.lr, k);
    let start = forward_readouts(&d, &io, task, &task.train, None, &[])?;
    let mut head = Head::new(task.classes, &start.iter().collect::<Vec<_>>());
    let mut losses = Vec::with_capacity(s.epochs);
    for _ in 0..s.epochs {
        let raw = task.raw_prompt(&z);
        let u = Union::new(task, &task.train, Some(&raw));
        let inputs = u.inputs(&io);
        let y = d.forward(&inputs).map_err(|e| e.to_string())?;
        let readouts = u.readouts(&y, task.readout);
        let (loss, dr) = head_step(&mut head, task, &readouts, &s.head);
        losses.push(loss);
        let cot = u.cotangent(y.shape(), &dr, task.readout);
        let gx = d.vjp(&inputs, &cot).map_err(|e| e.to_string())?;
        let graw: Array1<f32> = gx
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| e.to_string())?
            .sum_axis(Axis(0));
        let gz: Vec<f64> = match &task.basis {
            None => graw.iter().map(|&v| v as f64).collect(),
            Some(b) => b
                .rows()
                .into_iter()
                .map(|r| {
                    r.iter()
                        .zip(&graw)
                        .map(|(&a, &g)| a as f64 * g as f64)
                        .sum()
                })
                .collect(),
        };
        adam.step(&mut z, &gz);
    }
    let raw = task.raw_prompt(&z);
    let test = forward_readouts(&d, &io, task, &task.test, Some(&raw), &[])?;
    let mut scores = test_scores(task, &head, &test);
    scores.coverage = 1.0;
    scores.magnitude = z.iter().map(|v| v * v).sum::<f64>().sqrt();
    Ok(GradResult { scores, losses })
}

/// Fine-tuning of the GNN's weights `weights` (initializer names) with the head.
pub fn fine_tune(
    dir: &Path,
    task: &ReliefTask,
    weights: &[String],
    s: &GradSettings,
) -> Result<GradResult, String> {
    let package = ModelPackage::load(dir).map_err(|e| e.to_string())?;
    let io = ModelIo::of(&package)?;
    let out = output_name(&io, task.readout)?.to_string();
    let wrt: Vec<&str> = weights.iter().map(String::as_str).collect();
    if wrt.is_empty() {
        return Err(format!("no weights to fine-tune in {}", dir.display()));
    }
    let d = Differentiable::new(&package, &out, &wrt, Device::Cpu).map_err(|e| e.to_string())?;
    let mut params: Vec<ArrayD<f32>> = wrt
        .iter()
        .map(|w| {
            d.parameter(w)
                .cloned()
                .ok_or_else(|| format!("`{w}` is not a float32 initializer"))
        })
        .collect::<Result<_, _>>()?;
    let sizes: Vec<usize> = params.iter().map(|p| p.len()).collect();
    let total: usize = sizes.iter().sum();
    let mut flat: Vec<f64> = params.iter().flatten().map(|&v| v as f64).collect();
    let mut adam = Adam::new(s.lr, total);
    let feed = |params: &[ArrayD<f32>]| -> Vec<(&str, Tensor)> {
        wrt.iter()
            .zip(params)
            .map(|(&w, p)| (w, Tensor::f32(p.clone())))
            .collect()
    };
    let start = forward_readouts(&d, &io, task, &task.train, None, &[])?;
    let mut head = Head::new(task.classes, &start.iter().collect::<Vec<_>>());
    let u = Union::new(task, &task.train, None);
    let mut losses = Vec::with_capacity(s.epochs);
    for _ in 0..s.epochs {
        let mut inputs = u.inputs(&io);
        inputs.extend(feed(&params));
        let y = d.forward(&inputs).map_err(|e| e.to_string())?;
        let readouts = u.readouts(&y, task.readout);
        let (loss, dr) = head_step(&mut head, task, &readouts, &s.head);
        losses.push(loss);
        let cot = u.cotangent(y.shape(), &dr, task.readout);
        let g = d.vjp_all(&inputs, &cot).map_err(|e| e.to_string())?;
        let grad: Vec<f64> = wrt
            .iter()
            .flat_map(|w| {
                g.get(w)
                    .map(|a| a.iter().map(|&v| v as f64).collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
        if grad.len() != total {
            return Err("the VJP model returned gradients of the wrong size".into());
        }
        adam.step(&mut flat, &grad);
        let mut at = 0;
        for p in params.iter_mut() {
            let n = p.len();
            for (a, &b) in p.iter_mut().zip(&flat[at..at + n]) {
                *a = b as f32;
            }
            at += n;
        }
    }
    let test = forward_readouts(&d, &io, task, &task.test, None, &feed(&params))?;
    Ok(GradResult {
        scores: test_scores(task, &head, &test),
        losses,
    })
}
