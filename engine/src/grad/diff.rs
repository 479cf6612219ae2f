//! [`Differentiable`]: a model output made differentiable with respect to chosen inputs or
//! weights, with vector-Jacobian products, Jacobians and finite differences on ndarrays.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ndarray::{Array2, ArrayD, Axis, IxDyn};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;
use prost::Message;

use super::onnx::{self, elem, tensor_f32};
use super::{cached_vjp, check_checksum, fd, read_model, vjp, GradError, CACHE_DIR};
use crate::inference::Device;
use crate::model::ModelPackage;
use crate::runtime;
use crate::value::Tensor;

/// How [`Differentiable::jacobian_with`] computes a Jacobian.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum JacobianMethod {
    /// Whichever of the two below costs fewer forward-pass equivalents for the shapes at hand:
    /// VJP rows cost about three forward rows per output element, finite differences two per
    /// input element.
    Auto,
    /// One VJP per output element (exact).
    VjpRows,
    /// Central finite differences, one pair of forward rows per input element, with this step
    /// relative to `max(1, max |x|)`.
    FiniteDifference {
        /// The relative step.
        step: f32,
    },
}

/// The relative step [`JacobianMethod::Auto`] uses for finite differences.
///
/// On float32 networks with ReLUs, central differences are limited by rounding below about
/// this step and by activations crossing a kink within the step above it; element-wise they
/// then agree with exact gradients to a few 1e-3.
pub const DEFAULT_STEP: f32 = 3e-4;

/// How a [`Differentiable`] is built and run.
#[derive(Clone, Debug)]
pub struct GradOptions {
    /// Where the models run.
    pub device: Device,
    /// Threads ONNX Runtime uses inside one operator; `None` leaves its default.
    pub threads: Option<usize>,
    /// Most rows in one model call when a Jacobian stacks rows (finite differences, VJP rows).
    pub max_batch: usize,
    /// Where VJP models are cached; `None` means `.grad` beside the ONNX file.
    pub cache_dir: Option<PathBuf>,
}

impl Default for GradOptions {
    fn default() -> Self {
        GradOptions {
            device: Device::Auto,
            threads: None,
            max_batch: 128,
            cache_dir: None,
        }
    }
}

/// The value of the differentiated output and the gradient for every tensor differentiated
/// against, from one VJP call.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// The differentiated output's value.
    pub output: ArrayD<f32>,
    /// `(tensor, gradient)` in the order the tensors were named.
    pub grads: Vec<(String, ArrayD<f32>)>,
}

impl Gradients {
    /// The gradient for `name`.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.grads.iter().find(|(n, _)| n == name).map(|(_, g)| g)
    }
}

/// A model output that can be differentiated with respect to some of the model's inputs and
/// initializers (weights).
///
/// Holds two ONNX Runtime sessions: the VJP model and the forward model (with the
/// differentiated initializers exposed as optional inputs, so finite differences and
/// fine-tuning can change them). Calls are serialised per session; the type is `Send + Sync`.
pub struct Differentiable {
    source: PathBuf,
    vjp_path: PathBuf,
    output: String,
    wrt: Vec<String>,
    parameters: Vec<(String, ArrayD<f32>)>,
    inputs: Vec<(String, i32)>,
    batched: bool,
    device: Device,
    max_batch: usize,
    vjp_session: Mutex<Session>,
    forward_session: Mutex<Session>,
}

impl std::fmt::Debug for Differentiable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Differentiable")
            .field("source", &self.source)
            .field("vjp", &self.vjp_path)
            .field("output", &self.output)
            .field("wrt", &self.wrt)
            .field("device", &self.device)
            .finish()
    }
}

impl Differentiable {
    /// The output `output` of `package`, differentiable with respect to `wrt` (input or
    /// initializer names), on `device`.
    ///
    /// Builds the VJP model, or reuses the one cached in the package's `.grad` folder, and opens
    /// it.
    pub fn new(
        package: &ModelPackage,
        output: &str,
        wrt: &[&str],
        device: Device,
    ) -> Result<Self, GradError> {
        Self::with_options(
            package,
            output,
            wrt,
            &GradOptions {
                device,
                ..Default::default()
            },
        )
    }

    /// [`Differentiable::new`] with all options.
    pub fn with_options(
        package: &ModelPackage,
        output: &str,
        wrt: &[&str],
        options: &GradOptions,
    ) -> Result<Self, GradError> {
        let source = package.onnx_path();
        let (model, sha) = read_model(&source)?;
        check_checksum(package, &source, &sha)?;
        let options = GradOptions {
            cache_dir: options
                .cache_dir
                .clone()
                .or_else(|| Some(package.dir().join(CACHE_DIR))),
            ..options.clone()
        };
        Self::open(
            &source,
            model,
            &sha,
            output,
            wrt,
            package.manifest().batch,
            &options,
        )
    }

    /// An output of a plain ONNX file (no package), differentiable with respect to `wrt`.
    /// `batched` says whether the first axis of every input and output is a batch axis.
    pub fn from_onnx_file(
        path: &Path,
        output: &str,
        wrt: &[&str],
        batched: bool,
        options: &GradOptions,
    ) -> Result<Self, GradError> {
        let (model, sha) = read_model(path)?;
        Self::open(path, model, &sha, output, wrt, batched, options)
    }

    fn open(
        source: &Path,
        model: onnx::ModelProto,
        sha: &str,
        output: &str,
        wrt: &[&str],
        batched: bool,
        options: &GradOptions,
    ) -> Result<Self, GradError> {
        runtime::ensure_runtime()?;
        let wrt: Vec<String> = wrt.iter().map(|w| w.to_string()).collect();
        let dir = options.cache_dir.clone().unwrap_or_else(|| {
            source
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(CACHE_DIR)
        });
        let (vjp_path, _) = cached_vjp(&model, sha, output, &wrt, &dir)?;

        let graph = model.graph.as_ref().ok_or_else(|| GradError::Model {
            reason: "the model has no graph".into(),
        })?;
        let parameters: Vec<(String, ArrayD<f32>)> = graph
            .initializer
            .iter()
            .filter(|t| t.name.as_ref().is_some_and(|n| wrt.contains(n)))
            .map(|t| {
                let name = t.name.clone().unwrap_or_default();
                let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                let values = tensor_f32(t).ok_or_else(|| GradError::NotDifferentiable {
                    name: name.clone(),
                    reason: "only float32 weights can be differentiated through this API".into(),
                })?;
                let array = ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| {
                    GradError::Model {
                        reason: format!("initializer `{name}`: {e}"),
                    }
                })?;
                Ok((name, array))
            })
            .collect::<Result<_, GradError>>()?;
        let initializer_names: Vec<&str> = graph
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref())
            .collect();
        let inputs: Vec<(String, i32)> = graph
            .input
            .iter()
            .filter_map(|i| {
                let name = i.name.clone()?;
                if initializer_names.contains(&name.as_str()) {
                    return None;
                }
                let e = i
                    .r#type
                    .as_ref()
                    .and_then(onnx::tensor_type)
                    .map_or(elem::UNDEFINED, |(e, _)| e);
                Some((name, e))
            })
            .collect();
        let output_elem = super::shape::Shapes::infer(graph).elem(output);
        if output_elem != elem::FLOAT && output_elem != elem::UNDEFINED {
            return Err(GradError::NotDifferentiable {
                name: output.to_string(),
                reason: format!(
                    "this API runs float32 models; `{output}` is {}",
                    onnx::elem_name(output_elem)
                ),
            });
        }

        let what = format!("the VJP model {}", vjp_path.display());
        let (vjp_session, device) = open_session(SessionSource::File(&vjp_path), options, &what)?;
        let names: Vec<String> = parameters.iter().map(|(n, _)| n.clone()).collect();
        let forward_bytes = vjp::with_parameter_inputs(&model, &names).encode_to_vec();
        let forward_options = GradOptions {
            device,
            ..options.clone()
        };
        let what = format!("the forward model {}", source.display());
        let (forward_session, _) = open_session(
            SessionSource::Memory(&forward_bytes),
            &forward_options,
            &what,
        )?;

        Ok(Differentiable {
            source: source.to_path_buf(),
            vjp_path,
            output: output.to_string(),
            wrt,
            parameters,
            inputs,
            batched,
            device,
            max_batch: options.max_batch.max(2),
            vjp_session: Mutex::new(vjp_session),
            forward_session: Mutex::new(forward_session),
        })
    }

    /// The cached VJP model file.
    pub fn vjp_model_path(&self) -> &Path {
        &self.vjp_path
    }

    /// The differentiated output.
    pub fn output(&self) -> &str {
        &self.output
    }

    /// The tensors differentiated against, in the order given.
    pub fn wrt(&self) -> &[String] {
        &self.wrt
    }

    /// The device the models run on (`Cpu` or `Cuda`).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether the first axis of inputs and outputs is a batch axis.
    pub fn is_batched(&self) -> bool {
        self.batched
    }

    /// The model's value of a differentiated initializer (a starting point for fine-tuning).
    pub fn parameter(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.parameters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// The differentiated output for `inputs` (every model input by name; differentiated
    /// initializers may be given too, to override the model's weights).
    pub fn forward(&self, inputs: &[(&str, Tensor)]) -> Result<ArrayD<f32>, GradError> {
        self.check_inputs(inputs)?;
        let mut session = self
            .forward_session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let what = || format!("the forward model {}", self.source.display());
        let values = session_inputs(inputs, None).map_err(|e| GradError::Run {
            what: what(),
            reason: e.to_string(),
        })?;
        let outputs = session.run(values).map_err(|e| GradError::Run {
            what: what(),
            reason: e.to_string(),
        })?;
        extract(&outputs, &self.output).map_err(|reason| GradError::Run {
            what: what(),
            reason,
        })
    }

    /// The vector-Jacobian product for the first tensor differentiated against:
    /// `(d output / d wrt)ᵀ · cotangent`, shaped like that tensor.
    ///
    /// `cotangent` is shaped like the output (with its batch axis for batched models).
    pub fn vjp(
        &self,
        inputs: &[(&str, Tensor)],
        cotangent: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>, GradError> {
        let mut all = self.vjp_all(inputs, cotangent)?;
        Ok(all.grads.swap_remove(0).1)
    }

    /// The output value and the vector-Jacobian products for every tensor differentiated
    /// against, from one call of the VJP model.
    pub fn vjp_all(
        &self,
        inputs: &[(&str, Tensor)],
        cotangent: &ArrayD<f32>,
    ) -> Result<Gradients, GradError> {
        self.check_inputs(inputs)?;
        let cot_name = vjp::cotangent_name(&self.output);
        let what = || format!("the VJP model {}", self.vjp_path.display());
        let mut session = self
            .vjp_session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let values =
            session_inputs(inputs, Some((&cot_name, cotangent))).map_err(|e| GradError::Run {
                what: what(),
                reason: e.to_string(),
            })?;
        let outputs = session.run(values).map_err(|e| GradError::Run {
            what: what(),
            reason: e.to_string(),
        })?;
        let run_err = |reason| GradError::Run {
            what: what(),
            reason,
        };
        let output = extract(&outputs, &self.output).map_err(run_err)?;
        let mut grads = Vec::with_capacity(self.wrt.len());
        for w in &self.wrt {
            let g = extract(&outputs, &vjp::gradient_name(w)).map_err(run_err)?;
            grads.push((w.clone(), g));
        }
        Ok(Gradients { output, grads })
    }

    /// The Jacobian of the output with respect to the first tensor differentiated against, at
    /// one example, as `[output elements, input elements]`; computed by whichever of VJP rows
    /// and finite differences is cheaper for the shapes.
    ///
    /// `inputs` are the model's inputs for one example (a batch axis of length 1 for batched
    /// models). The first differentiated tensor must be a model input, not a weight.
    pub fn jacobian(&self, inputs: &[(&str, Tensor)]) -> Result<Array2<f32>, GradError> {
        self.jacobian_with(inputs, JacobianMethod::Auto)
    }

    /// The Jacobian of [`Differentiable::jacobian`] by central finite differences, with step
    /// `step × max(1, max |x|)`.
    pub fn finite_difference_jacobian(
        &self,
        inputs: &[(&str, Tensor)],
        step: f32,
    ) -> Result<Array2<f32>, GradError> {
        self.jacobian_with(inputs, JacobianMethod::FiniteDifference { step })
    }

    /// The Jacobian of [`Differentiable::jacobian`] by the given method.
    pub fn jacobian_with(
        &self,
        inputs: &[(&str, Tensor)],
        method: JacobianMethod,
    ) -> Result<Array2<f32>, GradError> {
        self.check_inputs(inputs)?;
        let wrt = self.wrt[0].clone();
        let bad = |reason: String| GradError::Request {
            model: self.source.display().to_string(),
            reason,
        };
        let x = match inputs.iter().find(|(n, _)| *n == wrt) {
            Some((_, t)) if !self.parameters.iter().any(|(p, _)| *p == wrt) => t
                .as_f32()
                .cloned()
                .ok_or_else(|| bad(format!("input `{wrt}` must be float32")))?,
            _ => {
                return Err(bad(format!(
                    "a Jacobian is taken with respect to a model input; `{wrt}` is a weight"
                )))
            }
        };
        if self.batched && x.shape().first() != Some(&1) {
            return Err(bad(format!(
                "a Jacobian is taken at one example: `{wrt}` needs a batch axis of length 1, \
                 got shape {:?}",
                x.shape()
            )));
        }
        let example = if self.batched {
            x.index_axis(Axis(0), 0).to_owned()
        } else {
            x.clone()
        };
        let y = self.forward(inputs)?;
        let n_out = y.len();
        let n_in = example.len();
        let method = match method {
            JacobianMethod::Auto if 3 * n_out <= 2 * n_in => JacobianMethod::VjpRows,
            JacobianMethod::Auto => JacobianMethod::FiniteDifference { step: DEFAULT_STEP },
            m => m,
        };
        match method {
            JacobianMethod::VjpRows => self.vjp_rows(inputs, &wrt, &y, n_in),
            JacobianMethod::FiniteDifference { step } => {
                let scale = example.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                let h = step * scale;
                let f = |batch: ArrayD<f32>| self.forward_rows(inputs, &wrt, batch);
                let j = fd::central_difference_jacobian(f, &example, h, self.max_batch)?;
                Ok(j.mapv(|v| v as f32))
            }
            JacobianMethod::Auto => unreachable!("resolved above"),
        }
    }

    /// The forward output for many values of input `wrt` (stacked on axis 0), the other inputs
    /// fixed: one call for batched models, one per row otherwise.
    fn forward_rows(
        &self,
        inputs: &[(&str, Tensor)],
        wrt: &str,
        rows: ArrayD<f32>,
    ) -> Result<ArrayD<f32>, GradError> {
        let n = rows.shape()[0];
        if self.batched {
            let stacked = self.repeat_inputs(inputs, wrt, Tensor::f32(rows), n)?;
            let refs: Vec<(&str, Tensor)> = stacked
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            return self.forward(&refs);
        }
        let mut outs = Vec::with_capacity(n);
        for r in 0..n {
            let row = rows.index_axis(Axis(0), r).to_owned();
            let call: Vec<(&str, Tensor)> = inputs
                .iter()
                .map(|(k, v)| {
                    if *k == wrt {
                        (*k, Tensor::f32(row.clone()))
                    } else {
                        (*k, v.clone())
                    }
                })
                .collect();
            outs.push(self.forward(&call)?);
        }
        let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
        ndarray::stack(Axis(0), &views).map_err(|e| GradError::Run {
            what: self.source.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// `inputs` with every batched input repeated `n` times along axis 0 (the rows of `wrt`
    /// replaced by `replacement`); weights are passed unchanged.
    fn repeat_inputs(
        &self,
        inputs: &[(&str, Tensor)],
        wrt: &str,
        replacement: Tensor,
        n: usize,
    ) -> Result<Vec<(String, Tensor)>, GradError> {
        let mut out = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            if *name == wrt {
                out.push((name.to_string(), replacement.clone()));
            } else if self.parameters.iter().any(|(p, _)| p == name) {
                out.push((name.to_string(), t.clone()));
            } else {
                let repeated = match t {
                    Tensor::F32(a) => Tensor::f32(repeat_rows(a, n)),
                    Tensor::I64(a) => Tensor::i64(repeat_rows(a, n)),
                };
                out.push((name.to_string(), repeated));
            }
        }
        Ok(out)
    }

    /// Jacobian rows by VJPs with one-hot cotangents, many per call for batched models.
    fn vjp_rows(
        &self,
        inputs: &[(&str, Tensor)],
        wrt: &str,
        y: &ArrayD<f32>,
        n_in: usize,
    ) -> Result<Array2<f32>, GradError> {
        let n_out = y.len();
        let mut jac = Array2::<f32>::zeros((n_out, n_in));
        if !self.batched {
            for o in 0..n_out {
                let mut cot = ArrayD::<f32>::zeros(y.raw_dim());
                if let Some(v) = cot.iter_mut().nth(o) {
                    *v = 1.0;
                }
                let g = self.vjp(inputs, &cot)?;
                for (i, v) in g.iter().enumerate() {
                    jac[[o, i]] = *v;
                }
            }
            return Ok(jac);
        }
        let x = inputs
            .iter()
            .find(|(n, _)| *n == wrt)
            .and_then(|(_, t)| t.as_f32())
            .expect("checked by the caller");
        let per_call = self.max_batch;
        for start in (0..n_out).step_by(per_call) {
            let count = per_call.min(n_out - start);
            let mut shape = y.shape().to_vec();
            shape[0] = count;
            let mut cot = ArrayD::<f32>::zeros(IxDyn(&shape));
            for (r, o) in (start..start + count).enumerate() {
                let mut row = cot.index_axis_mut(Axis(0), r);
                if let Some(v) = row.iter_mut().nth(o) {
                    *v = 1.0;
                }
            }
            let xs = Tensor::f32(repeat_rows(x, count));
            let stacked = self.repeat_inputs(inputs, wrt, xs, count)?;
            let refs: Vec<(&str, Tensor)> = stacked
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            let g = self.vjp(&refs, &cot)?;
            for r in 0..count {
                let row = g.index_axis(Axis(0), r);
                for (i, v) in row.iter().enumerate() {
                    jac[[start + r, i]] = *v;
                }
            }
        }
        Ok(jac)
    }

    /// The directional derivative of the output along `direction` by central differences:
    /// `(f(x + h·u) − f(x − h·u)) / 2h`, in float64. `direction` names inputs or differentiated
    /// weights and gives each a perturbation shaped like it; `step` is `h`.
    pub fn directional_derivative(
        &self,
        inputs: &[(&str, Tensor)],
        direction: &[(&str, ArrayD<f32>)],
        step: f32,
    ) -> Result<ArrayD<f64>, GradError> {
        let shifted = |sign: f32| -> Result<ArrayD<f32>, GradError> {
            let mut call: Vec<(&str, Tensor)> = inputs.to_vec();
            for (name, u) in direction {
                let base = match call.iter().find(|(n, _)| n == name) {
                    Some((_, t)) => t.as_f32().cloned(),
                    None => self.parameter(name).cloned(),
                };
                let base = base.ok_or_else(|| GradError::Request {
                    model: self.source.display().to_string(),
                    reason: format!("`{name}` is neither a float input given nor a weight"),
                })?;
                let moved = &base + &(u * (sign * step));
                call.retain(|(n, _)| n != name);
                call.push((name, Tensor::f32(moved)));
            }
            self.forward(&call)
        };
        let plus = shifted(1.0)?;
        let minus = shifted(-1.0)?;
        let h = 2.0 * step as f64;
        Ok(ndarray::Zip::from(&plus)
            .and(&minus)
            .map_collect(|&p, &m| (p as f64 - m as f64) / h))
    }

    /// Checks that `inputs` names every model input once and nothing unknown.
    fn check_inputs(&self, inputs: &[(&str, Tensor)]) -> Result<(), GradError> {
        let bad = |reason: String| GradError::Request {
            model: self.source.display().to_string(),
            reason,
        };
        let accepted = || {
            self.inputs
                .iter()
                .map(|(n, _)| format!("`{n}`"))
                .chain(
                    self.parameters
                        .iter()
                        .map(|(n, _)| format!("`{n}` (weight)")),
                )
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (k, (name, t)) in inputs.iter().enumerate() {
            if inputs[..k].iter().any(|(n, _)| n == name) {
                return Err(bad(format!("`{name}` is given twice")));
            }
            let known = self.inputs.iter().find(|(n, _)| n == name).map(|(_, e)| *e);
            let is_param = self.parameters.iter().any(|(n, _)| n == name);
            match (known, is_param) {
                (None, false) => {
                    return Err(bad(format!(
                        "unknown input `{name}`; the model takes {}",
                        accepted()
                    )))
                }
                (Some(e), _) => {
                    let fits = match t {
                        Tensor::F32(_) => e == elem::FLOAT || e == elem::UNDEFINED,
                        Tensor::I64(_) => e == elem::INT64 || e == elem::UNDEFINED,
                    };
                    if !fits {
                        return Err(bad(format!(
                            "input `{name}` is {}, the model wants {}",
                            t.dtype(),
                            onnx::elem_name(e)
                        )));
                    }
                }
                (None, true) => {
                    if t.as_f32().is_none() {
                        return Err(bad(format!("weight `{name}` must be float32")));
                    }
                }
            }
        }
        for (name, _) in &self.inputs {
            if !inputs.iter().any(|(n, _)| n == name) {
                return Err(bad(format!(
                    "input `{name}` is missing; the model takes {}",
                    accepted()
                )));
            }
        }
        Ok(())
    }
}

/// `a` repeated `n` times along axis 0 (whose length must be 1), or stacked `n` times when the
/// first axis is longer.
fn repeat_rows<T: Clone>(a: &ArrayD<T>, n: usize) -> ArrayD<T> {
    let views: Vec<_> = (0..n).map(|_| a.view()).collect();
    ndarray::concatenate(Axis(0), &views).expect("same shapes")
}

enum SessionSource<'a> {
    File(&'a Path),
    Memory(&'a [u8]),
}

/// Opens a session on the options' device: `cuda` fails loudly, `auto` falls back to CPU with a
/// warning (as inference services do).
fn open_session(
    source: SessionSource<'_>,
    options: &GradOptions,
    what: &str,
) -> Result<(Session, Device), GradError> {
    match options.device {
        Device::Cpu => Ok((
            session_on(&source, Device::Cpu, options, what)?,
            Device::Cpu,
        )),
        Device::Cuda => Ok((
            session_on(&source, Device::Cuda, options, what)?,
            Device::Cuda,
        )),
        Device::Auto => {
            if crate::inference::cuda_compiled() {
                match session_on(&source, Device::Cuda, options, what) {
                    Ok(s) => return Ok((s, Device::Cuda)),
                    Err(e) => tracing::warn!("CUDA cannot be used for {what} ({e}); using CPU"),
                }
            }
            Ok((
                session_on(&source, Device::Cpu, options, what)?,
                Device::Cpu,
            ))
        }
    }
}

fn session_on(
    source: &SessionSource<'_>,
    device: Device,
    options: &GradOptions,
    what: &str,
) -> Result<Session, GradError> {
    let fail = |reason: String| GradError::Session {
        what: what.to_string(),
        reason,
    };
    let env = runtime::environment()?;
    let mut builder = Session::builder(env)
        .map_err(|e| fail(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| fail(e.to_string()))?
        // Gradient graphs keep the weights as initializers that may be fed (for fine-tuning),
        // about which ONNX Runtime warns once per weight; that is intended here, so only
        // errors are logged.
        .with_log_level(ort::logging::LogLevel::Error)
        .map_err(|e| fail(e.to_string()))?;
    if let Some(n) = options.threads {
        builder = builder
            .with_intra_threads(n)
            .map_err(|e| fail(e.to_string()))?;
    }
    let providers = providers(device).map_err(fail)?;
    let mut builder = builder
        .with_execution_providers(providers)
        .map_err(|e| fail(e.to_string()))?;
    match source {
        SessionSource::File(p) => builder.commit_from_file(p),
        SessionSource::Memory(b) => builder.commit_from_memory(b),
    }
    .map_err(|e| fail(e.to_string()))
}

#[cfg(feature = "cuda")]
fn providers(device: Device) -> Result<Vec<ort::ep::ExecutionProviderDispatch>, String> {
    Ok(match device {
        Device::Cuda => vec![ort::ep::CUDA::default().build().error_on_failure()],
        _ => vec![ort::ep::CPU::default().build()],
    })
}

#[cfg(not(feature = "cuda"))]
fn providers(device: Device) -> Result<Vec<ort::ep::ExecutionProviderDispatch>, String> {
    match device {
        Device::Cuda => Err(
            "this build has no CUDA support; rebuild with `--features cuda`, or use device \
             `cpu` or `auto`"
                .into(),
        ),
        _ => Ok(vec![ort::ep::CPU::default().build()]),
    }
}

/// Session inputs borrowing the callers' arrays where their layout allows.
fn session_inputs<'a>(
    inputs: &'a [(&'a str, Tensor)],
    extra: Option<(&'a str, &'a ArrayD<f32>)>,
) -> ort::Result<Vec<(&'a str, SessionInputValue<'a>)>> {
    let mut values: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len() + 1);
    for (name, t) in inputs {
        let v: SessionInputValue<'_> = match t {
            Tensor::F32(a) => value_of(a)?,
            Tensor::I64(a) => value_of(a)?,
        };
        values.push((name, v));
    }
    if let Some((name, a)) = extra {
        values.push((name, value_of(a)?));
    }
    Ok(values)
}

fn value_of<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
    a: &ArrayD<T>,
) -> ort::Result<SessionInputValue<'_>> {
    if a.is_standard_layout() {
        Ok(TensorRef::from_array_view(a.view())?.into())
    } else {
        let data: Vec<T> = a.iter().cloned().collect();
        Ok(ort::value::Tensor::from_array((a.shape().to_vec(), data))?.into())
    }
}

fn extract(outputs: &ort::session::SessionOutputs<'_>, name: &str) -> Result<ArrayD<f32>, String> {
    let v = outputs
        .get(name)
        .ok_or_else(|| format!("the model returned no output `{name}`"))?;
    v.try_extract_array::<f32>()
        .map(|a| a.to_owned())
        .map_err(|e| format!("output `{name}`: {e}"))
}
