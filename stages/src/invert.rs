//! GAN inversion: images to latent codes and back.
//!
//! - `invert`: an encoder package maps images to initial codes through the shared inference
//!   service; extra encoder outputs (hierarchical features, padding maps) are kept as fields.
//! - `generate`: a generator package maps codes to images.
//! - `optimize`: the domain-regularised optimiser. Starting from `z = E(x)` it minimises, per
//!   image,
//!
//!   `L(z) = mean(m (x − G(z))²) / mean(m) + λ_feat mean((F(x) − F(G(z)))²)
//!          + λ_dom mean((z − E(G(z)))²)`
//!
//!   with Adam, all images of a batch together. `m` is an optional mask (the masked-blend
//!   variant, which usually sets `λ_dom = 0`), `F` an optional feature network package.
//!   Gradients come from the reverse-mode graphs of [`latentflow_engine::grad`]; central finite
//!   differences of the whole loss are used when asked, or, with a warning, when a model cannot
//!   be differentiated.
//! - `image-metrics`: MSE, PSNR and SSIM of reconstructions against the target image.
//!
//! Decisions:
//! - `invert` and `generate` are the generic `onnx` stage with the wiring filled in from the
//!   package's first input and output, so they batch across workers like any model stage.
//! - `optimize` owns its models per worker (plain sessions, one intra-op thread by default):
//!   every step needs the previous step's result, so cross-worker batching would only add
//!   waiting, while one session per worker keeps all cores busy.
//! - The domain gap reported is `mean((z − E(G(z)))²)`, the quantity the domain term
//!   penalises, before and after optimisation.

use std::time::Instant;

use latentflow_engine::grad::{Differentiable, GradOptions};
use latentflow_engine::inference::{Device, InferenceService, ServiceConfig};
use latentflow_engine::model::ModelPackage;
use latentflow_engine::value::stack;
use latentflow_engine::{
    Completion, Failure, FieldType, KindInfo, Outcome, ParamKind, ParamSpec, Params, Plan,
    PlanIssue, Record, Schema, Shape, Stage, StageContext, StageFactory, Tensor, Value,
};
use ndarray::{Array1, Array2, ArrayD, Axis, Ix2, IxDyn};
use serde_json::{json, Map, Value as Json};

use crate::onnx::{device_of, service_params, OnnxStage};

// ---------------------------------------------------------------------------------------------
// invert and generate: the onnx stage with the wiring filled in.

/// How a preset names its model and its two fields.
struct Preset {
    kind: &'static str,
    doc: &'static str,
    /// Parameter naming the package.
    model: &'static str,
    /// Parameter naming the field fed to the model's first input, and its default.
    input: (&'static str, &'static str),
    /// Parameter naming the field receiving the model's first output, and its default.
    output: (&'static str, &'static str),
    /// Whether the model's other outputs become fields by default.
    keep_extra: bool,
}

const INVERT: Preset = Preset {
    kind: "invert",
    doc: "Maps images to latent codes with an encoder package (the starting point of \
          inversion). The encoder's other outputs are kept as fields of the same name unless \
          `keep_extra` is false.",
    model: "encoder",
    input: ("image", "image"),
    output: ("z", "z"),
    keep_extra: true,
};

const GENERATE: Preset = Preset {
    kind: "generate",
    doc: "Maps latent codes to images with any generator package. The generator's other inputs \
          are read from fields of the same name (e.g. padding maps an encoder predicted).",
    model: "generator",
    input: ("z", "z"),
    output: ("image", "image"),
    keep_extra: false,
};

impl Preset {
    fn info(&self) -> KindInfo {
        let mut params = vec![
            ParamSpec::required(self.model, ParamKind::Path, "model package folder"),
            ParamSpec::optional(
                self.input.0,
                ParamKind::Field,
                json!(self.input.1),
                "field fed to the model's first input",
            ),
            ParamSpec::optional(
                self.output.0,
                ParamKind::Field,
                json!(self.output.1),
                "field receiving the model's first output",
            ),
            ParamSpec::optional(
                "keep_extra",
                ParamKind::Bool,
                json!(self.keep_extra),
                "also keep the model's other outputs, as fields of the same name",
            ),
        ];
        params.extend(service_params());
        KindInfo {
            name: self.kind,
            doc: self.doc,
            params,
        }
    }

    /// The parameters of the equivalent `onnx` stage.
    fn onnx_params(&self, params: &Params) -> Result<Params, Vec<PlanIssue>> {
        let dir = params.path(self.model).unwrap_or_default();
        let package = ModelPackage::load(&dir).map_err(|e| {
            vec![PlanIssue::param(self.model, e.to_string())
                .hint("name a package folder holding manifest.json and the .onnx file")]
        })?;
        let m = package.manifest();
        let field = |p: (&str, &str)| params.str(p.0).unwrap_or(p.1).to_string();
        let mut inputs = Map::new();
        inputs.insert(m.inputs[0].name.clone(), json!(field(self.input)));
        let mut outputs = Map::new();
        outputs.insert(m.outputs[0].name.clone(), json!(field(self.output)));
        if params.bool("keep_extra").unwrap_or(self.keep_extra) {
            for o in &m.outputs[1..] {
                outputs.insert(o.name.clone(), json!(o.name));
            }
        }
        let mut values = Map::new();
        values.insert(
            "model".into(),
            params.get(self.model).cloned().unwrap_or(Json::Null),
        );
        values.insert("inputs".into(), Json::Object(inputs));
        values.insert("outputs".into(), Json::Object(outputs));
        for p in ["device", "max_batch", "max_delay_ms", "threads"] {
            if let Some(v) = params.get(p).filter(|v| !v.is_null()) {
                values.insert(p.into(), v.clone());
            }
        }
        Ok(Params::new(values, params.base_dir()).with_defaults(&OnnxStage.info().params))
    }

    /// Moves issues about the `onnx` stage's parameters onto this stage's.
    fn rename(&self, issues: Vec<PlanIssue>) -> Vec<PlanIssue> {
        issues
            .into_iter()
            .map(|mut i| {
                if let Some(p) = i.at.get_mut(1) {
                    let renamed = match p.as_str() {
                        "model" => Some(self.model),
                        "inputs" => Some(self.input.0),
                        "outputs" => Some(self.output.0),
                        _ => None,
                    };
                    if let Some(r) = renamed {
                        *p = r.to_string();
                        i.at.truncate(2);
                        i.on_key = false;
                    }
                }
                i
            })
            .collect()
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let p = self.onnx_params(params)?;
        OnnxStage.plan(&p, input).map_err(|i| self.rename(i))
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        let p = self.onnx_params(params)?;
        OnnxStage.check(&p).map_err(|i| self.rename(i))
    }

    fn build(&self, params: &Params, cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let p = self.onnx_params(params).map_err(|i| i[0].message.clone())?;
        OnnxStage.build(&p, cx)
    }
}

/// Factory of the `invert` stage.
pub struct InvertStage;

/// Factory of the `generate` stage.
pub struct GenerateStage;

macro_rules! preset_factory {
    ($ty:ty, $preset:expr) => {
        impl StageFactory for $ty {
            fn info(&self) -> KindInfo {
                $preset.info()
            }
            fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
                $preset.plan(params, input)
            }
            fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
                $preset.check(params)
            }
            fn build(&self, params: &Params, cx: &StageContext) -> Result<Box<dyn Stage>, String> {
                $preset.build(params, cx)
            }
        }
    };
}

preset_factory!(InvertStage, INVERT);
preset_factory!(GenerateStage, GENERATE);

// ---------------------------------------------------------------------------------------------
// optimize

/// How gradients of the loss are obtained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GradientMode {
    /// Reverse-mode graphs; finite differences with a warning when a model cannot be
    /// differentiated.
    Auto,
    /// Reverse-mode graphs only; a model that cannot be differentiated is an error.
    Vjp,
    /// Central finite differences of the whole loss, one pair of forward rows per latent axis.
    FiniteDifference,
}

/// The optimiser's settings. Defaults are the published ones.
#[derive(Clone, Debug)]
pub struct OptimizeSettings {
    /// Adam steps.
    pub steps: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Weight of the feature loss (0 without a feature network).
    pub feature_weight: f64,
    /// Weight of the domain term (0 without an encoder).
    pub domain_weight: f64,
    /// How gradients are obtained.
    pub gradients: GradientMode,
    /// Finite-difference step on the latent.
    pub fd_step: f64,
}

impl Default for OptimizeSettings {
    fn default() -> Self {
        OptimizeSettings {
            steps: 100,
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            feature_weight: 5e-5,
            domain_weight: 2.0,
            gradients: GradientMode::Auto,
            fd_step: 1e-3,
        }
    }
}

/// A model used by the optimiser: its first input to one output, forward and (when it can be
/// differentiated) vector-Jacobian products.
pub struct Net {
    name: String,
    input: String,
    output: String,
    max_batch: usize,
    diff: Option<Differentiable>,
    service: Option<InferenceService>,
}

impl Net {
    /// Opens `package` (first input → `output`, or the first output), differentiable unless
    /// `gradients` is finite differences. In `Auto` mode a model that cannot be differentiated
    /// falls back to forward passes, with a warning.
    pub fn open(
        package: &ModelPackage,
        output: Option<&str>,
        gradients: GradientMode,
        device: Device,
        threads: usize,
        max_batch: usize,
    ) -> Result<Net, String> {
        let m = package.manifest();
        let input = m.inputs[0].name.clone();
        let output = output.unwrap_or(&m.outputs[0].name).to_string();
        let mut net = Net {
            name: m.name.clone(),
            input,
            output,
            max_batch: max_batch.max(1),
            diff: None,
            service: None,
        };
        if gradients != GradientMode::FiniteDifference {
            let options = GradOptions {
                device,
                threads: Some(threads.max(1)),
                max_batch: net.max_batch,
                cache_dir: None,
            };
            match Differentiable::with_options(package, &net.output, &[&net.input], &options) {
                Ok(d) => net.diff = Some(d),
                Err(e) if gradients == GradientMode::Auto => tracing::warn!(
                    model = %net.name,
                    "cannot differentiate the model ({e}); using finite differences, which \
                     cost two forward passes per latent axis"
                ),
                Err(e) => return Err(format!("cannot differentiate `{}`: {e}", net.name)),
            }
        }
        if net.diff.is_none() {
            let config = ServiceConfig {
                device,
                max_batch: net.max_batch,
                max_delay: std::time::Duration::ZERO,
                threads: Some(threads.max(1)),
            };
            net.service = Some(InferenceService::get(package, &config).map_err(|e| e.to_string())?);
        }
        Ok(net)
    }

    /// Whether vector-Jacobian products are available.
    pub fn differentiable(&self) -> bool {
        self.diff.is_some()
    }

    /// The output for a batch of inputs (rows along the first axis), in chunks of `max_batch`.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        self.chunked(x, None)
    }

    /// `(d output / d input)ᵀ · cotangent` for a batch.
    pub fn vjp(&self, x: &ArrayD<f32>, cotangent: &ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        self.chunked(x, Some(cotangent))
    }

    fn chunked(&self, x: &ArrayD<f32>, cot: Option<&ArrayD<f32>>) -> Result<ArrayD<f32>, String> {
        let n = x.shape()[0];
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + self.max_batch).min(n);
            let xs = x.slice_axis(Axis(0), (start..end).into()).to_owned();
            let input = [(self.input.as_str(), Tensor::f32(xs.clone()))];
            let out = match (cot, &self.diff, &self.service) {
                (Some(c), Some(d), _) => {
                    let cs = c.slice_axis(Axis(0), (start..end).into()).to_owned();
                    d.vjp(&input, &cs).map_err(|e| e.to_string())?
                }
                (Some(_), None, _) => {
                    return Err(format!("model `{}` cannot be differentiated", self.name))
                }
                (None, Some(d), _) => d.forward(&input).map_err(|e| e.to_string())?,
                (None, None, Some(s)) => {
                    let outs = s
                        .run(vec![(self.input.clone(), Tensor::f32(xs))])
                        .map_err(|e| e.to_string())?;
                    let (_, t) = outs
                        .into_iter()
                        .find(|(n, _)| *n == self.output)
                        .ok_or_else(|| {
                            format!("model `{}` gave no `{}`", self.name, self.output)
                        })?;
                    t.as_f32()
                        .ok_or("the model's output is not float32")?
                        .clone()
                }
                (None, None, None) => unreachable!("a net has a session"),
            };
            parts.push(out);
            start = end;
        }
        let views: Vec<&ArrayD<f32>> = parts.iter().collect();
        ndarray::concatenate(Axis(0), &views.iter().map(|a| a.view()).collect::<Vec<_>>())
            .map_err(|e| e.to_string())
    }
}

/// The models of the optimiser: a generator, and optionally an encoder (domain term) and a
/// feature network (feature loss).
pub struct Inverter {
    /// Latent → image.
    pub generator: Net,
    /// Image → latent.
    pub encoder: Option<Net>,
    /// Image → features.
    pub features: Option<Net>,
    /// Settings.
    pub settings: OptimizeSettings,
    /// The whole loss as one differentiable graph, used by [`Inverter::optimize`] when the
    /// loss has no mask and no feature term; `None` differentiates model by model.
    pub fused: Option<FusedLoss>,
}

/// The inversion loss `mean((G(z) − x)²) + w · mean((z − E(G(z)))²)` composed into one ONNX
/// graph (see [`latentflow_engine::grad::compose`]): one VJP call gives every image's loss and
/// its gradient, running each model's forward pass once instead of twice.
pub struct FusedLoss {
    diff: Differentiable,
    z: String,
    max_batch: usize,
}

impl FusedLoss {
    /// Builds (or finds in the generator's `.grad` cache) the loss graph and its VJP model.
    pub fn open(
        generator: &ModelPackage,
        encoder: Option<&ModelPackage>,
        domain_weight: f64,
        device: Device,
        threads: usize,
        max_batch: usize,
    ) -> Result<FusedLoss, String> {
        let path = latentflow_engine::grad::compose::inversion_loss_model(
            generator,
            encoder,
            domain_weight as f32,
        )
        .map_err(|e| e.to_string())?;
        let z = generator.manifest().inputs[0].name.clone();
        let options = GradOptions {
            device,
            threads: Some(threads.max(1)),
            max_batch,
            cache_dir: None,
        };
        let diff = Differentiable::from_onnx_file(
            &path,
            latentflow_engine::grad::compose::LOSS_OUTPUT,
            &[&z],
            true,
            &options,
        )
        .map_err(|e| format!("cannot differentiate the composed loss: {e}"))?;
        Ok(FusedLoss {
            diff,
            z,
            max_batch: max_batch.max(1),
        })
    }

    /// Every image's loss and its gradient with respect to its code.
    pub fn loss_and_gradient(
        &self,
        z: &Array2<f32>,
        target: &ArrayD<f32>,
    ) -> Result<(Vec<f64>, Array2<f32>), String> {
        let n = z.nrows();
        let mut losses = Vec::with_capacity(n);
        let mut grad = Array2::<f32>::zeros(z.dim());
        for start in (0..n).step_by(self.max_batch) {
            let end = (start + self.max_batch).min(n);
            let zs = z.slice(ndarray::s![start..end, ..]).to_owned().into_dyn();
            let ts = target.slice_axis(Axis(0), (start..end).into()).to_owned();
            let inputs = [
                (self.z.as_str(), Tensor::f32(zs)),
                (
                    latentflow_engine::grad::compose::TARGET_INPUT,
                    Tensor::f32(ts),
                ),
            ];
            let ones = ArrayD::<f32>::ones(IxDyn(&[end - start]));
            let out = self
                .diff
                .vjp_all(&inputs, &ones)
                .map_err(|e| e.to_string())?;
            losses.extend(out.output.iter().map(|&v| v as f64));
            let g = out.get(&self.z).ok_or("the loss model gave no gradient")?;
            let g = g
                .view()
                .into_dimensionality::<Ix2>()
                .map_err(|e| e.to_string())?;
            grad.slice_mut(ndarray::s![start..end, ..]).assign(&g);
        }
        Ok((losses, grad))
    }
}

/// Per-image loss terms.
#[derive(Clone, Debug, Default)]
pub struct LossTerms {
    /// Total loss.
    pub total: Vec<f64>,
    /// Pixel term (masked mean square error).
    pub pixel: Vec<f64>,
    /// Domain gap `mean((z − E(G(z)))²)` (0 without an encoder).
    pub domain: Vec<f64>,
}

/// The result of optimising a batch.
#[derive(Clone, Debug)]
pub struct Optimized {
    /// Optimised codes, `[batch, latent]`.
    pub z: Array2<f32>,
    /// `G(z)` of the optimised codes.
    pub image: ArrayD<f32>,
    /// Loss per image at every step, and after the last: `[batch, steps + 1]`.
    pub curve: Array2<f32>,
    /// Loss terms before the first step.
    pub initial: LossTerms,
    /// Loss terms after the last step.
    pub last: LossTerms,
}

/// The target images of a batch and what is fixed about them.
pub struct Targets {
    /// `[batch, C, H, W]`.
    pub image: ArrayD<f32>,
    /// Pixel weights, like `image`, or `None` for all ones.
    pub mask: Option<ArrayD<f32>>,
    /// `F(image)`, when a feature network is used.
    features: Option<ArrayD<f32>>,
}

fn row_means(a: &ArrayD<f32>) -> Vec<f64> {
    a.axis_iter(Axis(0))
        .map(|r| r.iter().map(|&v| v as f64).sum::<f64>() / r.len().max(1) as f64)
        .collect()
}

fn rows_of(a: &ArrayD<f32>, idx: &[usize]) -> ArrayD<f32> {
    a.select(Axis(0), idx)
}

impl Inverter {
    /// Prepares the targets of a batch (their features, when a feature network is used).
    pub fn targets(
        &self,
        image: ArrayD<f32>,
        mask: Option<ArrayD<f32>>,
    ) -> Result<Targets, String> {
        let features = match (&self.features, self.settings.feature_weight) {
            (Some(f), w) if w != 0.0 => Some(f.forward(&image)?),
            _ => None,
        };
        Ok(Targets {
            image,
            mask,
            features,
        })
    }

    fn use_domain(&self) -> bool {
        self.encoder.is_some() && self.settings.domain_weight != 0.0
    }

    /// Loss terms for codes `z` (`[n, latent]`) against target rows `rows` (one per code).
    pub fn loss(&self, z: &Array2<f32>, t: &Targets, rows: &[usize]) -> Result<LossTerms, String> {
        let zd = z.clone().into_dyn();
        let x = self.generator.forward(&zd)?;
        let target = rows_of(&t.image, rows);
        let diff = &x - &target;
        let pixel: Vec<f64> = match &t.mask {
            None => row_means(&diff.mapv(|v| v * v)),
            Some(m) => {
                let m = rows_of(m, rows);
                let num = row_means(&(&m * &diff.mapv(|v| v * v)));
                let den = row_means(&m);
                num.iter()
                    .zip(&den)
                    .map(|(n, d)| if *d > 0.0 { n / d } else { 0.0 })
                    .collect()
            }
        };
        let mut total = pixel.clone();
        if let (Some(f), Some(ft)) = (&self.features, &t.features) {
            let fx = f.forward(&x)?;
            let d = &fx - &rows_of(ft, rows);
            for (tot, v) in total.iter_mut().zip(row_means(&d.mapv(|v| v * v))) {
                *tot += self.settings.feature_weight * v;
            }
        }
        let mut domain = vec![0.0; rows.len()];
        if let Some(e) = &self.encoder {
            let ez = e.forward(&x)?;
            let r = &zd - &ez;
            domain = row_means(&r.mapv(|v| v * v));
            if self.use_domain() {
                for (tot, v) in total.iter_mut().zip(&domain) {
                    *tot += self.settings.domain_weight * v;
                }
            }
        }
        Ok(LossTerms {
            total,
            pixel,
            domain,
        })
    }

    /// The gradient of each image's loss with respect to its code, exactly (reverse mode).
    pub fn gradient_exact(&self, z: &Array2<f32>, t: &Targets) -> Result<Array2<f32>, String> {
        let n = z.nrows();
        let zd = z.clone().into_dyn();
        let x = self.generator.forward(&zd)?;
        let per_image = x.len() / n.max(1);
        let diff = &x - &t.image;
        // d pixel / d x = 2 m (x − target) / sum(m)
        let mut gx = match &t.mask {
            None => diff.mapv(|v| 2.0 * v / per_image as f32),
            Some(m) => {
                let sums = row_means(m);
                let mut g = m * &diff;
                for (mut row, s) in g.axis_iter_mut(Axis(0)).zip(sums) {
                    let k = if s > 0.0 {
                        2.0 / (s * per_image as f64)
                    } else {
                        0.0
                    };
                    row.mapv_inplace(|v| v * k as f32);
                }
                g
            }
        };
        if let (Some(f), Some(ft)) = (&self.features, &t.features) {
            let fx = f.forward(&x)?;
            let per = fx.len() / n.max(1);
            let k = (2.0 * self.settings.feature_weight / per as f64) as f32;
            let cot = (&fx - ft).mapv(|v| v * k);
            gx = gx + f.vjp(&x, &cot)?;
        }
        let mut gz_direct = None;
        if self.use_domain() {
            let e = self.encoder.as_ref().expect("domain term has an encoder");
            let ez = e.forward(&x)?;
            let k = (2.0 * self.settings.domain_weight / z.ncols() as f64) as f32;
            let r = (&zd - &ez).mapv(|v| v * k);
            gx = gx + e.vjp(&x, &r.mapv(|v| -v))?;
            gz_direct = Some(r);
        }
        let mut gz = self.generator.vjp(&zd, &gx)?;
        if let Some(d) = gz_direct {
            gz = gz + d;
        }
        gz.into_dimensionality::<Ix2>().map_err(|e| e.to_string())
    }

    /// The same gradient by central finite differences of the loss, all perturbations of the
    /// batch in one stacked call per model.
    pub fn gradient_fd(&self, z: &Array2<f32>, t: &Targets) -> Result<Array2<f32>, String> {
        let (n, d) = z.dim();
        let h = self.settings.fd_step as f32;
        let mut zs = Array2::zeros((2 * n * d, d));
        let mut rows = Vec::with_capacity(2 * n * d);
        for b in 0..n {
            for i in 0..d {
                for (s, sign) in [(0, 1.0f32), (1, -1.0)] {
                    let r = (b * d + i) * 2 + s;
                    zs.row_mut(r).assign(&z.row(b));
                    zs[[r, i]] += sign * h;
                    rows.push(b);
                }
            }
        }
        let l = self.loss(&zs, t, &rows)?.total;
        Ok(Array2::from_shape_fn((n, d), |(b, i)| {
            let r = (b * d + i) * 2;
            ((l[r] - l[r + 1]) / (2.0 * h as f64)) as f32
        }))
    }

    /// The gradient by the configured method.
    pub fn gradient(&self, z: &Array2<f32>, t: &Targets) -> Result<Array2<f32>, String> {
        let exact = self.settings.gradients != GradientMode::FiniteDifference
            && self.generator.differentiable()
            && (!self.use_domain() || self.encoder.as_ref().is_some_and(|e| e.differentiable()))
            && (self.settings.feature_weight == 0.0
                || self.features.as_ref().is_none_or(|f| f.differentiable()));
        if exact {
            self.gradient_exact(z, t)
        } else {
            self.gradient_fd(z, t)
        }
    }

    /// Runs Adam from `z0` for every image of the batch together.
    pub fn optimize(&self, z0: Array2<f32>, t: &Targets) -> Result<Optimized, String> {
        let s = &self.settings;
        let (n, d) = z0.dim();
        let all: Vec<usize> = (0..n).collect();
        let mut z = z0;
        let mut m1 = Array2::<f64>::zeros((n, d));
        let mut m2 = Array2::<f64>::zeros((n, d));
        let mut curve = Array2::zeros((n, s.steps + 1));
        let initial = self.loss(&z, t, &all)?;
        // The composed loss graph serves the plain loss: no mask, no feature term, exact
        // gradients.
        let fused = self.fused.as_ref().filter(|_| {
            t.mask.is_none()
                && t.features.is_none()
                && s.gradients != GradientMode::FiniteDifference
        });
        for step in 0..s.steps {
            let (l, g) = match fused {
                Some(f) => f.loss_and_gradient(&z, &t.image)?,
                None => {
                    let l = if step == 0 {
                        initial.total.clone()
                    } else {
                        self.loss(&z, t, &all)?.total
                    };
                    (l, self.gradient(&z, t)?)
                }
            };
            for (b, v) in l.iter().enumerate() {
                curve[[b, step]] = *v as f32;
            }
            let k = step as i32 + 1;
            let c1 = 1.0 - s.beta1.powi(k);
            let c2 = 1.0 - s.beta2.powi(k);
            ndarray::Zip::from(&mut z)
                .and(&mut m1)
                .and(&mut m2)
                .and(&g)
                .for_each(|z, m1, m2, &g| {
                    let g = g as f64;
                    *m1 = s.beta1 * *m1 + (1.0 - s.beta1) * g;
                    *m2 = s.beta2 * *m2 + (1.0 - s.beta2) * g * g;
                    let step = s.lr * (*m1 / c1) / ((*m2 / c2).sqrt() + s.eps);
                    *z = (*z as f64 - step) as f32;
                });
        }
        let last = self.loss(&z, t, &all)?;
        for (b, v) in last.total.iter().enumerate() {
            curve[[b, s.steps]] = *v as f32;
        }
        let image = self.generator.forward(&z.clone().into_dyn())?;
        Ok(Optimized {
            z,
            image,
            curve,
            initial,
            last,
        })
    }
}

/// Factory of the `optimize` stage.
pub struct OptimizeStage;

struct OptimizeWiring {
    generator: ModelPackage,
    encoder: Option<ModelPackage>,
    features: Option<(ModelPackage, String)>,
    image: String,
    z: String,
    mask: Option<String>,
    out_z: String,
    out_image: String,
    /// Prefix of the report fields (`loss`, `loss_curve`, `domain_gap`, ...).
    prefix: String,
    settings: OptimizeSettings,
}

fn load_package(params: &Params, name: &str) -> Result<Option<ModelPackage>, Vec<PlanIssue>> {
    match params.path(name) {
        None => Ok(None),
        Some(dir) => ModelPackage::load(&dir).map(Some).map_err(|e| {
            vec![PlanIssue::param(name, e.to_string())
                .hint("name a package folder holding manifest.json and the .onnx file")]
        }),
    }
}

fn optimize_wiring(params: &Params) -> Result<OptimizeWiring, Vec<PlanIssue>> {
    let mut issues = Vec::new();
    let positive = |name: &str, issues: &mut Vec<PlanIssue>| {
        if params.float(name).is_some_and(|v| v <= 0.0) {
            issues.push(PlanIssue::param(name, format!("`{name}` must be positive")));
        }
    };
    for p in ["lr", "fd_step"] {
        positive(p, &mut issues);
    }
    for p in ["feature_weight", "domain_weight"] {
        if params.float(p).is_some_and(|v| v < 0.0) {
            issues.push(PlanIssue::param(p, format!("`{p}` must not be negative")));
        }
    }
    for p in ["beta1", "beta2"] {
        if params.float(p).is_some_and(|v| !(0.0..1.0).contains(&v)) {
            issues.push(PlanIssue::param(p, format!("`{p}` must be in [0, 1)")));
        }
    }
    if params.int("steps").is_some_and(|v| v < 0) {
        issues.push(PlanIssue::param("steps", "`steps` must not be negative"));
    }
    if params.int("max_batch").is_some_and(|v| v < 1) {
        issues.push(PlanIssue::param(
            "max_batch",
            "`max_batch` must be at least 1",
        ));
    }
    if params.int("threads").is_some_and(|v| v < 1) {
        issues.push(PlanIssue::param("threads", "`threads` must be at least 1"));
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    let generator = load_package(params, "generator")?.expect("required parameter");
    let encoder = load_package(params, "encoder")?;
    let features = match load_package(params, "features")? {
        None => None,
        Some(f) => {
            let out = params
                .str("features_output")
                .unwrap_or(&f.manifest().outputs[0].name)
                .to_string();
            if f.output(&out).is_none() {
                return Err(vec![PlanIssue::param(
                    "features_output",
                    format!("model `{}` has no output `{out}`", f.manifest().name),
                )]);
            }
            Some((f, out))
        }
    };
    let gm = generator.manifest();
    if !gm.batch {
        return Err(vec![PlanIssue::param(
            "generator",
            "the generator must take a batch axis (`batch: true` in its manifest)",
        )]);
    }
    let z_type = gm.field_type(&gm.inputs[0]);
    let x_type = gm.field_type(&gm.outputs[0]);
    let mut settings = OptimizeSettings::default();
    settings.steps = params.int("steps").unwrap_or(100) as usize;
    settings.lr = params.float("lr").unwrap_or(settings.lr);
    settings.beta1 = params.float("beta1").unwrap_or(settings.beta1);
    settings.beta2 = params.float("beta2").unwrap_or(settings.beta2);
    settings.fd_step = params.float("fd_step").unwrap_or(settings.fd_step);
    settings.domain_weight = params
        .float("domain_weight")
        .unwrap_or(settings.domain_weight);
    settings.feature_weight = params
        .float("feature_weight")
        .unwrap_or(settings.feature_weight);
    settings.gradients = match params.str("gradients") {
        Some("vjp") => GradientMode::Vjp,
        Some("fd") => GradientMode::FiniteDifference,
        _ => GradientMode::Auto,
    };
    if features.is_none() {
        settings.feature_weight = 0.0;
    }
    match &encoder {
        None if settings.domain_weight != 0.0 => {
            return Err(vec![PlanIssue::param(
                "domain_weight",
                "the domain term needs an encoder",
            )
            .hint(
                "give `encoder`, or set `domain_weight: 0` for pixel-only optimisation",
            )]);
        }
        None => {}
        Some(e) => {
            let em = e.manifest();
            let (ein, eout) = (em.field_type(&em.inputs[0]), em.field_type(&em.outputs[0]));
            if !x_type.satisfies(&ein) || !eout.satisfies(&z_type) {
                return Err(vec![PlanIssue::param(
                    "encoder",
                    format!(
                        "encoder `{}` maps {ein} to {eout}, but generator `{}` maps {z_type} to \
                         {x_type}",
                        em.name, gm.name
                    ),
                )
                .hint("the encoder must invert this generator")]);
            }
        }
    }
    if let Some((f, _)) = &features {
        let fm = f.manifest();
        let fin = fm.field_type(&fm.inputs[0]);
        if !x_type.satisfies(&fin) {
            return Err(vec![PlanIssue::param(
                "features",
                format!(
                    "feature network `{}` takes {fin}, the generator makes {x_type}",
                    fm.name
                ),
            )]);
        }
    }
    let field = |p: &str, d: &str| params.str(p).unwrap_or(d).to_string();
    Ok(OptimizeWiring {
        generator,
        encoder,
        features,
        image: field("image", "image"),
        z: field("z", "z"),
        mask: params.str("mask").map(str::to_string),
        out_z: field("out_z", "z_opt"),
        out_image: field("out_image", "recon"),
        prefix: field("prefix", ""),
        settings,
    })
}

impl StageFactory for OptimizeStage {
    fn info(&self) -> KindInfo {
        let d = OptimizeSettings::default();
        KindInfo {
            name: "optimize",
            doc: "Domain-regularised latent optimisation: from the code in `z`, Adam minimises \
                  the pixel error of G(z) against `image`, plus `feature_weight` times a feature \
                  loss through `features`, plus `domain_weight` times mean((z - E(G(z)))^2) \
                  through `encoder`. All records of a batch are optimised together. Writes the \
                  code, its image, the loss curve and the domain gap before and after.",
            params: vec![
                ParamSpec::required("generator", ParamKind::Path, "generator package (z -> image)"),
                ParamSpec::optional("encoder", ParamKind::Path, Json::Null, "encoder package (image -> z) for the domain term"),
                ParamSpec::optional("features", ParamKind::Path, Json::Null, "feature network package for the feature loss"),
                ParamSpec::optional("features_output", ParamKind::String, Json::Null, "the feature network's output to compare (default: its first)"),
                ParamSpec::optional("image", ParamKind::Field, json!("image"), "target image field"),
                ParamSpec::optional("z", ParamKind::Field, json!("z"), "starting code field (e.g. from `invert`)"),
                ParamSpec::optional("mask", ParamKind::Field, Json::Null, "pixel weights field, shaped like the image (masked-blend variant)"),
                ParamSpec::optional("out_z", ParamKind::String, json!("z_opt"), "field for the optimised code"),
                ParamSpec::optional("out_image", ParamKind::String, json!("recon"), "field for G(optimised code)"),
                ParamSpec::optional("prefix", ParamKind::String, json!(""), "prefix of the report fields (loss, loss_init, loss_curve, domain_gap, domain_gap_init, optimize_ms), to run several optimisers in one pipeline"),
                ParamSpec::optional("steps", ParamKind::Int, json!(d.steps), "Adam steps"),
                ParamSpec::optional("lr", ParamKind::Float, json!(d.lr), "Adam learning rate"),
                ParamSpec::optional("beta1", ParamKind::Float, json!(d.beta1), "Adam beta1"),
                ParamSpec::optional("beta2", ParamKind::Float, json!(d.beta2), "Adam beta2"),
                ParamSpec::optional("feature_weight", ParamKind::Float, json!(d.feature_weight), "weight of the feature loss"),
                ParamSpec::optional("domain_weight", ParamKind::Float, json!(d.domain_weight), "weight of the domain term (0: pixel-only)"),
                ParamSpec::optional("gradients", ParamKind::Choice(&["auto", "vjp", "fd"]), json!("auto"), "reverse-mode graphs (vjp), finite differences (fd), or vjp with fd as fallback (auto)"),
                ParamSpec::optional("fd_step", ParamKind::Float, json!(d.fd_step), "finite-difference step on the code"),
                ParamSpec::optional("device", ParamKind::Choice(&["cpu", "cuda", "auto"]), json!("auto"), "where the models run"),
                ParamSpec::optional("threads", ParamKind::Int, json!(1), "ONNX Runtime intra-op threads per worker"),
                ParamSpec::optional("max_batch", ParamKind::Int, json!(32), "most images optimised together"),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let w = optimize_wiring(params)?;
        let gm = w.generator.manifest();
        let z_type = gm.field_type(&gm.inputs[0]);
        let x_type = gm.field_type(&gm.outputs[0]);
        let mut plan = Plan::default()
            .read(&w.image, x_type.clone(), &["image"])
            .read(&w.z, z_type.clone(), &["z"]);
        if let Some(m) = &w.mask {
            plan = plan.read(m, x_type.clone(), &["mask"]);
        }
        let p = &w.prefix;
        plan = plan
            .write(&w.out_z, z_type)
            .write(&w.out_image, x_type)
            .write(
                &format!("{p}loss_curve"),
                FieldType::f32(Shape::fixed(&[w.settings.steps + 1])),
            );
        let mut scalars = vec!["loss", "loss_init", "optimize_ms"];
        if w.encoder.is_some() {
            scalars.extend(["domain_gap", "domain_gap_init"]);
        }
        for f in scalars {
            plan = plan.write(&format!("{p}{f}"), FieldType::Scalar);
        }
        Ok(plan)
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        let w = optimize_wiring(params)?;
        let mut all = vec![("generator", &w.generator)];
        if let Some(e) = &w.encoder {
            all.push(("encoder", e));
        }
        if let Some((f, _)) = &w.features {
            all.push(("features", f));
        }
        for (p, pkg) in all {
            pkg.check().map_err(|e| {
                vec![PlanIssue::param(p, e.to_string())
                    .hint("run `latentflow models check <dir>` for details")]
            })?;
        }
        if params.str("device") == Some("cuda") && !latentflow_engine::inference::cuda_compiled() {
            return Err(vec![PlanIssue::param(
                "device",
                "`device: cuda`, but this build has no CUDA support",
            )
            .hint("rebuild with `--features cuda`, or use `auto`")]);
        }
        Ok(())
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let w = optimize_wiring(params).map_err(|i| i[0].message.clone())?;
        let device = device_of(params)?;
        let threads = params.int("threads").unwrap_or(1) as usize;
        let max_batch = params.int("max_batch").unwrap_or(32) as usize;
        let mode = w.settings.gradients;
        // Finite differences stack 2 × latent rows per image: allow bigger model calls.
        let rows = max_batch.max(64);
        let generator = Net::open(&w.generator, None, mode, device, threads, rows)?;
        let encoder = match &w.encoder {
            Some(e) => Some(Net::open(e, None, mode, device, threads, rows)?),
            None => None,
        };
        let features = match &w.features {
            Some((f, out)) => Some(Net::open(f, Some(out), mode, device, threads, rows)?),
            None => None,
        };
        let plain = w.features.is_none() || w.settings.feature_weight == 0.0;
        let fused = if plain && mode != GradientMode::FiniteDifference && generator.differentiable()
        {
            let encoder = w
                .encoder
                .as_ref()
                .filter(|_| w.settings.domain_weight != 0.0);
            match FusedLoss::open(
                &w.generator,
                encoder,
                w.settings.domain_weight,
                device,
                threads,
                max_batch,
            ) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!("differentiating model by model: {e}");
                    None
                }
            }
        } else {
            None
        };
        Ok(Box::new(OptimizeRunner {
            inverter: Inverter {
                generator,
                encoder,
                features,
                settings: w.settings.clone(),
                fused,
            },
            image: w.image,
            z: w.z,
            mask: w.mask,
            out_z: w.out_z,
            out_image: w.out_image,
            prefix: w.prefix,
            max_batch,
        }))
    }
}

struct OptimizeRunner {
    inverter: Inverter,
    image: String,
    z: String,
    mask: Option<String>,
    out_z: String,
    out_image: String,
    prefix: String,
    max_batch: usize,
}

impl OptimizeRunner {
    fn run_chunk(&self, records: Vec<Record>, stage: &str) -> Vec<Outcome> {
        let start = Instant::now();
        let gather = |field: &str| -> Result<ArrayD<f32>, String> {
            let rows: Vec<&ArrayD<f32>> = records
                .iter()
                .map(|r| {
                    r.tensor(field)?
                        .as_f32()
                        .ok_or(format!("`{field}` is not f32"))
                })
                .collect::<Result<_, _>>()?;
            stack(&rows).ok_or_else(|| format!("records' `{field}` shapes differ"))
        };
        let result = (|| {
            let x = gather(&self.image)?;
            let z0 = gather(&self.z)?
                .into_dimensionality::<Ix2>()
                .map_err(|e| e.to_string())?;
            let mask = match &self.mask {
                Some(m) => Some(gather(m)?),
                None => None,
            };
            let t = self.inverter.targets(x, mask)?;
            self.inverter.optimize(z0, &t)
        })();
        let o = match result {
            Ok(o) => o,
            Err(e) => {
                return records
                    .iter()
                    .map(|r| Err(Failure::of(r, stage, format!("optimisation failed: {e}"))))
                    .collect()
            }
        };
        let per_image_ms = start.elapsed().as_secs_f64() * 1e3 / records.len().max(1) as f64;
        let with_encoder = self.inverter.encoder.is_some();
        records
            .into_iter()
            .enumerate()
            .map(|(b, mut r)| {
                let bad = !o.curve.row(b).iter().all(|v| v.is_finite());
                if bad {
                    return Err(Failure::of(&r, stage, "the loss became NaN or infinite"));
                }
                r.set(
                    &self.out_z,
                    Value::Tensor(Tensor::f32(o.z.row(b).to_owned().into_dyn())),
                );
                r.set(
                    &self.out_image,
                    Value::Tensor(Tensor::f32(o.image.index_axis(Axis(0), b).to_owned())),
                );
                let curve: Array1<f32> = o.curve.row(b).to_owned();
                r.set(
                    &format!("{}loss_curve", self.prefix),
                    Value::Tensor(Tensor::f32(curve.into_dyn())),
                );
                r.set(
                    &format!("{}loss", self.prefix),
                    Value::Scalar(o.last.total[b]),
                );
                r.set(
                    &format!("{}loss_init", self.prefix),
                    Value::Scalar(o.initial.total[b]),
                );
                r.set(
                    &format!("{}optimize_ms", self.prefix),
                    Value::Scalar(per_image_ms),
                );
                if with_encoder {
                    r.set(
                        &format!("{}domain_gap", self.prefix),
                        Value::Scalar(o.last.domain[b]),
                    );
                    r.set(
                        &format!("{}domain_gap_init", self.prefix),
                        Value::Scalar(o.initial.domain[b]),
                    );
                }
                Ok(r)
            })
            .collect()
    }
}

impl Stage for OptimizeRunner {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        let mut out = Vec::with_capacity(batch.len());
        let mut rest = batch;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(self.max_batch));
            out.extend(self.run_chunk(rest, &cx.name));
            rest = tail;
        }
        Completion::Ready(out)
    }
}

// ---------------------------------------------------------------------------------------------
// image-metrics

/// Factory of the `image-metrics` stage.
pub struct ImageMetricsStage;

/// Mean square error and PSNR of two images whose values span `range` (mapped to [0, 1]).
pub fn mse_psnr(a: &ArrayD<f32>, b: &ArrayD<f32>, range: [f32; 2]) -> (f64, f64) {
    let span = (range[1] - range[0]) as f64;
    let mse = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| {
            let d = (*x - *y) as f64 / span;
            d * d
        })
        .sum::<f64>()
        / a.len().max(1) as f64;
    let psnr = if mse > 0.0 {
        -10.0 * mse.log10()
    } else {
        f64::INFINITY
    };
    (mse, psnr)
}

/// The 11-tap Gaussian window (σ = 1.5) of the standard SSIM.
fn gaussian_window() -> [f64; 11] {
    let mut w = [0.0; 11];
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - 5.0;
        *v = (-x * x / (2.0 * 1.5 * 1.5)).exp();
    }
    let s: f64 = w.iter().sum();
    w.map(|v| v / s)
}

/// Separable "valid" filtering of one channel with the window.
fn filter_valid(img: &Array2<f64>, w: &[f64; 11]) -> Array2<f64> {
    let (h, wd) = img.dim();
    let (oh, ow) = (h.saturating_sub(10), wd.saturating_sub(10));
    let mut rows = Array2::<f64>::zeros((h, ow));
    for y in 0..h {
        for x in 0..ow {
            rows[[y, x]] = (0..11).map(|k| w[k] * img[[y, x + k]]).sum();
        }
    }
    let mut out = Array2::<f64>::zeros((oh, ow));
    for y in 0..oh {
        for x in 0..ow {
            out[[y, x]] = (0..11).map(|k| w[k] * rows[[y + k, x]]).sum();
        }
    }
    out
}

/// Structural similarity (Wang et al. 2004: Gaussian window 11 × 11, σ = 1.5, K₁ = 0.01,
/// K₂ = 0.03) of two `[C, H, W]` (or `[H, W]`) images whose values span `range`, averaged over
/// channels and over the positions where the window fits inside the image.
pub fn ssim(a: &ArrayD<f32>, b: &ArrayD<f32>, range: [f32; 2]) -> Result<f64, String> {
    let (c, h, w) = match a.shape() {
        [c, h, w] => (*c, *h, *w),
        [h, w] => (1, *h, *w),
        s => return Err(format!("SSIM takes [C, H, W] or [H, W] images, got {s:?}")),
    };
    if a.shape() != b.shape() {
        return Err(format!("SSIM of {:?} against {:?}", a.shape(), b.shape()));
    }
    if h < 11 || w < 11 {
        return Err(format!(
            "SSIM needs images of at least 11 x 11, got {h} x {w}"
        ));
    }
    let span = (range[1] - range[0]) as f64;
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let win = gaussian_window();
    let a = a.to_shape(IxDyn(&[c, h, w])).map_err(|e| e.to_string())?;
    let b = b.to_shape(IxDyn(&[c, h, w])).map_err(|e| e.to_string())?;
    let mut total = 0.0;
    for ch in 0..c {
        let x = Array2::from_shape_fn((h, w), |(i, j)| (a[[ch, i, j]] - range[0]) as f64 / span);
        let y = Array2::from_shape_fn((h, w), |(i, j)| (b[[ch, i, j]] - range[0]) as f64 / span);
        let mx = filter_valid(&x, &win);
        let my = filter_valid(&y, &win);
        let sxx = filter_valid(&(&x * &x), &win);
        let syy = filter_valid(&(&y * &y), &win);
        let sxy = filter_valid(&(&x * &y), &win);
        let mut s = 0.0;
        for (((mx, my), (sxx, syy)), sxy) in mx
            .iter()
            .zip(my.iter())
            .zip(sxx.iter().zip(syy.iter()))
            .zip(sxy.iter())
        {
            let (vx, vy, cov) = (sxx - mx * mx, syy - my * my, sxy - mx * my);
            s += ((2.0 * mx * my + c1) * (2.0 * cov + c2))
                / ((mx * mx + my * my + c1) * (vx + vy + c2));
        }
        total += s / mx.len() as f64;
    }
    Ok(total / c as f64)
}

impl StageFactory for ImageMetricsStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "image-metrics",
            doc: "Compares reconstructions with a target image: writes `<field>_mse`, \
                  `<field>_psnr` (dB, values mapped from `range` to [0, 1]) and `<field>_ssim` \
                  (Gaussian window 11, sigma 1.5) for every listed field.",
            params: vec![
                ParamSpec::optional(
                    "target",
                    ParamKind::Field,
                    json!("image"),
                    "the reference image",
                ),
                ParamSpec::required("fields", ParamKind::FieldList, "reconstructions to score"),
                ParamSpec::optional(
                    "range",
                    ParamKind::FloatList,
                    json!([-1.0, 1.0]),
                    "values of black and white",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        metrics_range(params).map_err(|e| vec![e])?;
        let target = params.str("target").unwrap_or("image");
        let ty = input
            .get(target)
            .cloned()
            .unwrap_or(FieldType::f32(Shape::any()));
        let mut plan = Plan::default().read(target, FieldType::f32(Shape::any()), &["target"]);
        let fields = params.strings("fields");
        if fields.is_empty() {
            return Err(vec![PlanIssue::param("fields", "list at least one field")]);
        }
        for (i, f) in fields.iter().enumerate() {
            plan = plan.read(f, ty.clone(), &["fields", &i.to_string()]);
            for m in ["mse", "psnr", "ssim"] {
                plan = plan.write(&format!("{f}_{m}"), FieldType::Scalar);
            }
        }
        Ok(plan)
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        Ok(Box::new(ImageMetrics {
            target: params.str("target").unwrap_or("image").to_string(),
            fields: params.strings("fields"),
            range: metrics_range(params).map_err(|e| e.message)?,
        }))
    }
}

fn metrics_range(params: &Params) -> Result<[f32; 2], PlanIssue> {
    match params.floats("range").as_slice() {
        [] => Ok([-1.0, 1.0]),
        [lo, hi] if hi > lo => Ok([*lo as f32, *hi as f32]),
        _ => Err(PlanIssue::param(
            "range",
            "`range` must be [low, high] with low < high",
        )),
    }
}

struct ImageMetrics {
    target: String,
    fields: Vec<String>,
    range: [f32; 2],
}

impl ImageMetrics {
    fn score(&self, mut r: Record) -> Result<Record, String> {
        let t = r
            .tensor(&self.target)?
            .as_f32()
            .ok_or("target is not f32")?
            .clone();
        for f in &self.fields {
            let x = r
                .tensor(f)?
                .as_f32()
                .ok_or_else(|| format!("`{f}` is not f32"))?
                .clone();
            if x.shape() != t.shape() {
                return Err(format!(
                    "`{f}` is {:?}, the target `{}` is {:?}",
                    x.shape(),
                    self.target,
                    t.shape()
                ));
            }
            let (mse, psnr) = mse_psnr(&x, &t, self.range);
            let s = ssim(&x, &t, self.range)?;
            r.set(&format!("{f}_mse"), Value::Scalar(mse));
            r.set(&format!("{f}_psnr"), Value::Scalar(psnr));
            r.set(&format!("{f}_ssim"), Value::Scalar(s));
        }
        Ok(r)
    }
}

impl Stage for ImageMetrics {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        Completion::Ready(
            batch
                .into_iter()
                .map(|r| {
                    let key = (r.key.clone(), r.seq);
                    self.score(r).map_err(|reason| Failure {
                        key: key.0,
                        seq: key.1,
                        stage: cx.name.clone(),
                        reason,
                    })
                })
                .collect(),
        )
    }
}
