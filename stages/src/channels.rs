//! Channel awareness in class-conditional generators: which feature channels of a generator
//! with class-conditional batch normalisation (CCBN) respond to which class, what suppressing
//! them does to the image, and edits and class blends made by changing them.
//!
//! A generator package qualifies when its manifest's `extra` lists `classes` (the class names,
//! in the order of the class vector `y`) and `ccbn_outputs` (outputs of shape
//! `[batch, channels, height, width]` holding the activations right after each CCBN layer); its
//! first input is the latent `z`, another input the float class vector `y`, its first output the
//! image. `models/fashion-ccbn` is one.
//!
//! Kinds:
//! - `latents` (source): `count` records of seeded standard-normal latents `[size]`; record `i`
//!   depends only on `seed` and `i`, so any worker count reads the same latents.
//! - `channel-awareness` (stage): per latent `z`, runs the generator once per class (one-hot
//!   `y = e_c`) and writes, per CCBN layer `L`, the per-class channel moments
//!   `L_mean[c, k]`, `L_var[c, k]` (mean and variance of channel `k` over its positions), and,
//!   with `suppression: true`, `L_suppression[c, k] = mean_pixels |G(z, e_c) − G_{k→0}(z, e_c)|`,
//!   the change of the image when channel `k` of layer `L` alone is gated to zero.
//! - `channel-report` (sink): aggregates those fields over all records into awareness and
//!   suppression scores, and writes the JSON report, the score matrices (`.npy`), a heat map,
//!   single-channel edit grids and two-class blend grids.
//!
//! Scores, for latents `z_1..z_N` (the records), classes `c = 1..C`, a layer's activations
//! `a(z, y)[k, p]` at channel `k` and position `p` (P positions), one-hot `e_c`:
//!
//! - class mean `m[c, k] = 1/(N·P) Σ_i Σ_p a(z_i, e_c)[k, p]`;
//! - channel mean over classes `m̄[k] = 1/C Σ_c m[c, k]`;
//! - channel spread `σ[k]² = 1/(C·N·P) Σ_c Σ_i Σ_p (a(z_i, e_c)[k, p] − m̄[k])²` (all classes,
//!   latents and positions together);
//! - **awareness** `A[c, k] = (m[c, k] − m̄[k]) / σ[k]` (0 when `σ[k] = 0`): how far class `c`
//!   moves the channel from its all-class mean, in units of the channel's spread. Signed; a
//!   channel is "aware" of class `c` when `|A[c, k]|` is large. The latents are shared by all
//!   classes, so `A` measures the class's effect, not sampling differences.
//! - **suppression** `S[c, k] = 1/(N·D) Σ_i Σ_d |G(z_i, e_c)_d − G_{k→0}(z_i, e_c)_d|` over the D
//!   image values, where `G_{k→0}` gates channel `k` of the layer to zero (the rest of the
//!   network sees the zeroed channel); **suppression excess** `S[c, k] − 1/C Σ_c' S[c', k]`: how
//!   much more class `c` depends on the channel than the average class does. Channels that matter
//!   to every class have a large `S` but a small excess; the report ranks by the excess.
//!
//! Edits and blends use the generator rewritten with per-channel gates
//! ([`latentflow_engine::grad::gates`]): after each CCBN output `t` the network sees
//! `gate ⊙ t + shift`, per row and channel.
//! - A **single-channel edit** of class `c` scales the layer's most class-aware channel by a
//!   factor (`gate[k] = f`, 0 suppresses it, 1 is the original).
//! - A **two-class blend** `A -> B` keeps `y = e_A` and gives the channels that distinguish `B`
//!   from `A` class `B`'s modulation, by strength `t`. CCBN is affine in `y` for a fixed layer
//!   input (`out = (1 + W_g y) ⊙ BN(h) + W_b y`), so for the same input the outputs for `A` and
//!   `B` are related per channel by `out_B = r·out_A + o` (`r` the ratio of the class gains, `o`
//!   an offset). [`class_swaps`] finds `r` and `o` by least squares, with the layer's input made
//!   the same for both classes through the gates (the previous CCBN layer gated to 0 and
//!   shifted to fixed values; the first layer's input depends on `z` only). The blend then sets
//!   `gate[k] = 1 + t·(r[k] − 1)`, `shift[k] = t·o[k]` on the chosen channels, which is exactly
//!   what the class vector `(1 − t)·e_A + t·e_B` does to those channels alone; with every
//!   channel chosen and `t = 1` the image is `G(z, e_B)` (tested). The channels moved are the
//!   top `blend_channels` fraction of each scored layer by `|A[B, k] − A[A, k]|`
//!   (`blend_by: contrast`: the channels whose class statistics differ most between the two) or
//!   by `|A[B, k]|` (`blend_by: target`: the channels aware of B).
//!
//! Decisions:
//! - A stage and a sink: the per-latent measurements are a map over records (batched through the
//!   inference service, spread over workers, and available to other sinks, e.g. `npy`), while
//!   the scores need every record and the edits need the scores, so they are computed where all
//!   records meet, in the sink, in source order (results do not depend on the worker count).
//! - The stage writes per-latent moments (mean and variance over positions), not scores: sums of
//!   those give the exact scores above, whatever the number of records.
//! - Everything runs on the gated model (gates on every CCBN output; with ones and zeros it
//!   computes exactly what the original does, tested). Two cached packages: one with every
//!   output, for the moments, and one with the image alone, for the suppression, edit and blend
//!   images, so the large activations are not copied out for them.
//! - Suppression costs `classes × channels` images per latent (2240 for fashion-ccbn), the
//!   moments `classes`; `suppression: false` or a subset of `layers` makes a run cheaper.
//! - Grids show the first `samples` latents of the source as rows.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::{imageops, Rgb, RgbImage};
use latentflow_engine::exec::write_atomic;
use latentflow_engine::grad::gates::{gate_input, gated_package, shift_input};
use latentflow_engine::inference::{Device, InferenceService, ServiceConfig};
use latentflow_engine::model::ModelPackage;
use latentflow_engine::plan::nearest;
use latentflow_engine::{
    Completion, DType, Dim, Failure, FieldType, KindInfo, Outcome, ParamKind, ParamSpec, Params,
    Plan, PlanIssue, Record, Schema, Shape, Sink, SinkFactory, Source, SourceFactory, Stage,
    StageContext, StageFactory, Tensor, Value,
};
use ndarray::{Array1, Array2, ArrayD, ArrayView2, Axis, IxDyn};
use serde_json::{json, Map, Value as Json};

use crate::image::{save_png, tensor_to_image};

// ---------------------------------------------------------------------------------------------
// latents source

/// Factory of the `latents` source.
pub struct LatentsSource;

#[derive(Clone, Debug)]
struct Latents {
    count: u64,
    size: usize,
    seed: u64,
    field: String,
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The latent of record `seq`: `size` standard normal values (Box–Muller on SplitMix64) that
/// depend only on `seed` and `seq`, the same on every machine and for any worker count.
pub fn latent(seed: u64, seq: u64, size: usize) -> Vec<f32> {
    let mut state = splitmix(seed ^ splitmix(seq.wrapping_add(0x5eed)));
    let mut uniform = move || {
        state = splitmix(state);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(size + 1);
    while out.len() < size {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(size);
    out
}

impl Latents {
    fn from(params: &Params) -> Result<Self, Vec<PlanIssue>> {
        let mut issues = Vec::new();
        let count = params.int("count").unwrap_or(0);
        if count < 1 {
            issues.push(PlanIssue::param("count", "`count` must be at least 1"));
        }
        let size = params.int("size").unwrap_or(0);
        if size < 1 {
            issues.push(
                PlanIssue::param("size", "`size` must be at least 1")
                    .hint("the generator's latent size: `extra.latent_size` in its manifest"),
            );
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Latents {
            count: count as u64,
            size: size as usize,
            seed: params.int("seed").unwrap_or(0) as u64,
            field: params.str("field").unwrap_or("z").to_string(),
        })
    }

    fn make(&self, seq: u64) -> Record {
        let z = ArrayD::from_shape_vec(IxDyn(&[self.size]), latent(self.seed, seq, self.size))
            .expect("length matches");
        Record::new(format!("latent:{seq:06}"), seq)
            .with(&self.field, Value::Tensor(Tensor::f32(z)))
    }
}

impl SourceFactory for LatentsSource {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "latents",
            doc: "Seeded standard-normal latent codes: `count` records with a float tensor \
                  [size]; record i depends only on `seed` and i (keys `latent:000000`, ...), so \
                  any number of workers reads the same codes.",
            params: vec![
                ParamSpec::required("count", ParamKind::Int, "number of records"),
                ParamSpec::required("size", ParamKind::Int, "values per latent"),
                ParamSpec::optional("seed", ParamKind::Int, json!(0), "random seed"),
                ParamSpec::optional("field", ParamKind::String, json!("z"), "name of the field"),
            ],
        }
    }

    fn plan(&self, params: &Params) -> Result<Schema, Vec<PlanIssue>> {
        let l = Latents::from(params)?;
        let mut schema = Schema::new();
        schema.insert(l.field.clone(), FieldType::f32(Shape::fixed(&[l.size])));
        Ok(schema)
    }

    fn open(&self, params: &Params) -> Result<Box<dyn Source>, String> {
        let l = Latents::from(params).map_err(|i| i[0].message.clone())?;
        Ok(Box::new(l))
    }
}

impl Source for Latents {
    fn len(&self) -> Option<u64> {
        Some(self.count)
    }

    fn read(&self, part: usize, parts: usize) -> Box<dyn Iterator<Item = Outcome> + Send + '_> {
        Box::new(
            (part as u64..self.count)
                .step_by(parts.max(1))
                .map(|seq| Ok(self.make(seq))),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// the generator

/// One CCBN layer of a generator, as its manifest describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct CcbnLayer {
    /// The output holding the layer's activations.
    pub name: String,
    /// Channels.
    pub channels: usize,
    /// Height of each channel's map.
    pub height: usize,
    /// Width of each channel's map.
    pub width: usize,
}

/// A class-conditional generator package with CCBN outputs.
#[derive(Clone, Debug)]
pub struct CcbnGenerator {
    /// The package.
    pub package: ModelPackage,
    /// Class names, in the order of the class vector.
    pub classes: Vec<String>,
    /// The CCBN layers, in manifest order.
    pub layers: Vec<CcbnLayer>,
    /// Latent size.
    pub latent: usize,
    /// The latent input.
    pub z_input: String,
    /// The class-vector input.
    pub y_input: String,
    /// The image output.
    pub image_output: String,
    /// Shape of one image, `[C, H, W]`.
    pub image_shape: Vec<usize>,
    /// Values of black and white.
    pub image_range: [f32; 2],
}

fn fixed(dims: &[Dim]) -> Option<Vec<usize>> {
    dims.iter()
        .map(|d| match d {
            Dim::Fixed(n) => Some(*n),
            Dim::Named(_) => None,
        })
        .collect()
}

impl CcbnGenerator {
    /// Reads the package in `dir` and checks that its manifest describes a class-conditional
    /// generator with CCBN outputs.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let package = ModelPackage::load(dir).map_err(|e| e.to_string())?;
        Self::from_package(package)
    }

    /// [`CcbnGenerator::load`] for a package already loaded.
    pub fn from_package(package: ModelPackage) -> Result<Self, String> {
        let m = package.manifest();
        let name = &m.name;
        let need = "the manifest's `extra` must list `classes` (class names in the order of the \
                    class vector) and `ccbn_outputs` ([{name, channels, height, width}, ...])";
        let classes: Vec<String> = m
            .extra
            .get("classes")
            .and_then(|c| c.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .filter(|c: &Vec<String>| c.len() >= 2)
            .ok_or_else(|| format!("`{name}` lists no `classes` (two or more); {need}"))?;
        let list = m
            .extra
            .get("ccbn_outputs")
            .and_then(|c| c.as_array())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| format!("`{name}` lists no `ccbn_outputs`; {need}"))?;
        let mut layers = Vec::new();
        for entry in list {
            let field = |k: &str| entry.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
            let lname = entry.get("name").and_then(|v| v.as_str());
            let (Some(lname), Some(channels), Some(height), Some(width)) =
                (lname, field("channels"), field("height"), field("width"))
            else {
                return Err(format!(
                    "`{name}`: every entry of `ccbn_outputs` needs `name`, `channels`, `height` \
                     and `width`; got {entry}"
                ));
            };
            let spec = package.output(lname).ok_or_else(|| {
                format!("`{name}`: `ccbn_outputs` names `{lname}`, which is not a model output")
            })?;
            if !m.batch || fixed(spec.example_shape()) != Some(vec![channels, height, width]) {
                return Err(format!(
                    "`{name}`: output `{lname}` is {spec}, but `ccbn_outputs` says \
                     [batch, {channels}, {height}, {width}]"
                ));
            }
            layers.push(CcbnLayer {
                name: lname.to_string(),
                channels,
                height,
                width,
            });
        }
        if !m.batch || m.inputs.len() < 2 {
            return Err(format!(
                "`{name}` must be batched and take a latent and a class vector"
            ));
        }
        let z = &m.inputs[0];
        let latent = fixed(z.example_shape())
            .filter(|d| d.len() == 1 && z.dtype == DType::F32)
            .ok_or_else(|| {
                format!("`{name}`: the first input must be a float latent [batch, n]")
            })?[0];
        let y = m.inputs[1..]
            .iter()
            .find(|t| {
                t.dtype == DType::F32 && fixed(t.example_shape()) == Some(vec![classes.len()])
            })
            .ok_or_else(|| {
                format!(
                    "`{name}`: no float input of shape [batch, {}] for the class vector",
                    classes.len()
                )
            })?;
        if m.inputs.len() != 2 {
            return Err(format!(
                "`{name}` takes inputs besides the latent and the class vector; this stage feeds \
                 only those two"
            ));
        }
        let image = &m.outputs[0];
        let image_shape = fixed(image.example_shape())
            .filter(|d| d.len() == 3 && (d[0] == 1 || d[0] == 3))
            .ok_or_else(|| {
                format!("`{name}`: the first output must be an image [batch, 1 or 3, H, W]")
            })?;
        let image_range = image
            .range
            .map(|r| [r[0] as f32, r[1] as f32])
            .unwrap_or([-1.0, 1.0]);
        Ok(CcbnGenerator {
            z_input: z.name.clone(),
            y_input: y.name.clone(),
            image_output: image.name.clone(),
            package,
            classes,
            layers,
            latent,
            image_shape,
            image_range,
        })
    }

    /// The index of a class given by name (exact, or ignoring case) or by number.
    pub fn class_index(&self, given: &str) -> Result<usize, String> {
        let g = given.trim();
        if let Some(i) = self.classes.iter().position(|c| c == g) {
            return Ok(i);
        }
        if let Some(i) = self.classes.iter().position(|c| c.eq_ignore_ascii_case(g)) {
            return Ok(i);
        }
        if let Ok(i) = g.parse::<usize>() {
            if i < self.classes.len() {
                return Ok(i);
            }
        }
        let all = self.classes.join(", ");
        Err(match nearest(g, self.classes.iter().map(String::as_str)) {
            Some(n) => format!("no class `{g}`; did you mean `{n}`? classes: {all}"),
            None => format!("no class `{g}`; classes (or their numbers from 0): {all}"),
        })
    }

    /// The index of a CCBN layer.
    pub fn layer_index(&self, name: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.name == name)
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.image_shape.iter().product()
    }
}

// ---------------------------------------------------------------------------------------------
// the gated generator

/// How the gated generator runs.
#[derive(Clone, Debug)]
pub struct GatedOptions {
    /// Where the model runs.
    pub device: Device,
    /// ONNX Runtime intra-op threads (`None`: its default).
    pub threads: Option<usize>,
    /// Most rows per model call.
    pub max_batch: usize,
    /// Where the gated package is cached (`None`: `.grad` in the generator's package).
    pub cache_dir: Option<PathBuf>,
}

impl Default for GatedOptions {
    fn default() -> Self {
        GatedOptions {
            device: Device::Auto,
            threads: None,
            max_batch: 256,
            cache_dir: None,
        }
    }
}

/// Inputs of the gated generator, one row per image: latent, class vector, and a gate and a
/// shift per channel of every CCBN layer (in [`CcbnGenerator::layers`] order).
#[derive(Clone, Debug)]
pub struct Rows {
    /// `[n, latent]`.
    pub z: Array2<f32>,
    /// `[n, classes]`.
    pub y: Array2<f32>,
    /// Per layer, `[n, channels]`.
    pub gates: Vec<Array2<f32>>,
    /// Per layer, `[n, channels]`.
    pub shifts: Vec<Array2<f32>>,
}

impl Rows {
    /// Rows that change nothing: gates 1, shifts 0.
    pub fn neutral(z: Array2<f32>, y: Array2<f32>, layers: &[CcbnLayer]) -> Rows {
        let n = z.nrows();
        Rows {
            gates: layers
                .iter()
                .map(|l| Array2::ones((n, l.channels)))
                .collect(),
            shifts: layers
                .iter()
                .map(|l| Array2::zeros((n, l.channels)))
                .collect(),
            z,
            y,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.z.nrows()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One-hot class vectors.
pub fn one_hot(classes: &[usize], count: usize) -> Array2<f32> {
    let mut y = Array2::zeros((classes.len(), count));
    for (r, &c) in classes.iter().enumerate() {
        y[[r, c]] = 1.0;
    }
    y
}

/// What the gated generator returns.
#[derive(Clone, Debug)]
pub struct Generated {
    /// `[n, C, H, W]`.
    pub image: ArrayD<f32>,
    /// Per CCBN layer `[n, K, H, W]` (the activations before their gates), when asked for.
    pub layers: Vec<ArrayD<f32>>,
}

/// A CCBN generator with per-channel gates on every CCBN output, run through the inference
/// service.
pub struct GatedGenerator {
    /// The generator.
    pub generator: CcbnGenerator,
    gated: ModelPackage,
    /// Every output.
    service: InferenceService,
    /// The image alone (the other outputs are not copied out).
    image_service: InferenceService,
    max_batch: usize,
}

impl GatedGenerator {
    /// Builds (or finds cached) the gated package of `generator` and starts its service.
    pub fn open(generator: CcbnGenerator, options: &GatedOptions) -> Result<Self, String> {
        let names: Vec<&str> = generator.layers.iter().map(|l| l.name.as_str()).collect();
        let fail = |e| {
            format!(
                "cannot add channel gates to `{}`: {e}",
                generator.package.manifest().name
            )
        };
        let cache = options.cache_dir.as_deref();
        let gated = gated_package(&generator.package, &names, None, cache).map_err(fail)?;
        let image_only = gated_package(
            &generator.package,
            &names,
            Some(&[generator.image_output.as_str()]),
            cache,
        )
        .map_err(fail)?;
        let config = ServiceConfig {
            device: options.device,
            max_batch: options.max_batch.max(1),
            max_delay: Duration::ZERO,
            threads: options.threads.filter(|t| *t > 0),
        };
        let service = InferenceService::get(&gated, &config).map_err(|e| e.to_string())?;
        let image_service =
            InferenceService::get(&image_only, &config).map_err(|e| e.to_string())?;
        Ok(GatedGenerator {
            generator,
            gated,
            service,
            image_service,
            max_batch: options.max_batch.max(1),
        })
    }

    /// The gated package.
    pub fn package(&self) -> &ModelPackage {
        &self.gated
    }

    /// Runs `rows` in calls of at most `max_batch` rows; `keep_layers` also returns the CCBN
    /// activations.
    pub fn run(&self, rows: &Rows, keep_layers: bool) -> Result<Generated, String> {
        let g = &self.generator;
        let n = rows.len();
        if rows.z.ncols() != g.latent || rows.y.ncols() != g.classes.len() {
            return Err(format!(
                "rows must have {} latent and {} class values; got {} and {}",
                g.latent,
                g.classes.len(),
                rows.z.ncols(),
                rows.y.ncols()
            ));
        }
        let mut images = Vec::new();
        let mut layers: Vec<Vec<ArrayD<f32>>> = vec![Vec::new(); g.layers.len()];
        let mut start = 0;
        while start < n {
            let end = (start + self.max_batch).min(n);
            let part = |a: &Array2<f32>| {
                Tensor::f32(a.slice(ndarray::s![start..end, ..]).to_owned().into_dyn())
            };
            let mut inputs = vec![
                (g.z_input.clone(), part(&rows.z)),
                (g.y_input.clone(), part(&rows.y)),
            ];
            for (l, layer) in g.layers.iter().enumerate() {
                inputs.push((gate_input(&layer.name), part(&rows.gates[l])));
                inputs.push((shift_input(&layer.name), part(&rows.shifts[l])));
            }
            let service = if keep_layers {
                &self.service
            } else {
                &self.image_service
            };
            let mut outputs = service.run(inputs).map_err(|e| e.to_string())?;
            let mut take = |name: &str| -> Result<ArrayD<f32>, String> {
                let at = outputs.iter().position(|(o, _)| o == name);
                match at.map(|i| outputs.swap_remove(i).1) {
                    Some(Tensor::F32(a)) => Ok(std::sync::Arc::unwrap_or_clone(a)),
                    _ => Err(format!("the gated model gave no float output `{name}`")),
                }
            };
            images.push(take(&g.image_output)?);
            if keep_layers {
                for (l, layer) in g.layers.iter().enumerate() {
                    layers[l].push(take(&layer.name)?);
                }
            }
            start = end;
        }
        let cat = |parts: &[ArrayD<f32>]| -> Result<ArrayD<f32>, String> {
            let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
            ndarray::concatenate(Axis(0), &views).map_err(|e| e.to_string())
        };
        if images.is_empty() {
            let mut shape = vec![0];
            shape.extend(&g.image_shape);
            return Ok(Generated {
                image: ArrayD::zeros(IxDyn(&shape)),
                layers: Vec::new(),
            });
        }
        Ok(Generated {
            image: cat(&images)?,
            layers: if keep_layers {
                layers.iter().map(|p| cat(p)).collect::<Result<_, _>>()?
            } else {
                Vec::new()
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// statistics and scores

/// Mean and variance over positions of every row and channel of `acts` (`[rows, K, ...]`), in
/// float64: two `[rows, K]` arrays.
pub fn position_moments(acts: &ArrayD<f32>) -> (Array2<f64>, Array2<f64>) {
    let (n, k) = (acts.shape()[0], acts.shape()[1]);
    let p: usize = acts.shape()[2..].iter().product::<usize>().max(1);
    let flat = acts.as_standard_layout();
    let data = flat.as_slice().expect("standard layout");
    let mut mean = Array2::zeros((n, k));
    let mut var = Array2::zeros((n, k));
    for r in 0..n {
        for c in 0..k {
            let s = &data[(r * k + c) * p..(r * k + c + 1) * p];
            let m = s.iter().map(|v| *v as f64).sum::<f64>() / p as f64;
            let v = s.iter().map(|v| (*v as f64 - m).powi(2)).sum::<f64>() / p as f64;
            mean[[r, c]] = m;
            var[[r, c]] = v;
        }
    }
    (mean, var)
}

/// Mean absolute difference between two equally long slices.
fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len().max(1) as f64
}

/// Sums over latents of one layer's per-latent statistics (all `[classes, channels]`).
#[derive(Clone, Debug)]
pub struct LayerSums {
    /// Σ over latents of the mean over positions.
    pub mean: Array2<f64>,
    /// Σ of its square.
    pub mean_sq: Array2<f64>,
    /// Σ of the variance over positions.
    pub var: Array2<f64>,
    /// Latents added.
    pub latents: usize,
    /// Σ of the suppression effects.
    pub suppression: Array2<f64>,
    /// Latents whose suppression effects were added.
    pub suppression_latents: usize,
}

/// The scores of one layer (see the module documentation); arrays are `[classes, channels]`
/// unless said otherwise.
#[derive(Clone, Debug)]
pub struct LayerScores {
    /// `m[c, k]`.
    pub class_mean: Array2<f64>,
    /// Within-class standard deviation over latents and positions.
    pub class_std: Array2<f64>,
    /// `σ[k]`, `[channels]`.
    pub channel_std: Array1<f64>,
    /// `A[c, k]`.
    pub awareness: Array2<f64>,
    /// `S[c, k]`, when measured.
    pub suppression: Option<Array2<f64>>,
    /// `S[c, k] − mean over classes`, when measured.
    pub suppression_excess: Option<Array2<f64>>,
}

impl LayerSums {
    /// Empty sums for `classes × channels`.
    pub fn new(classes: usize, channels: usize) -> Self {
        LayerSums {
            mean: Array2::zeros((classes, channels)),
            mean_sq: Array2::zeros((classes, channels)),
            var: Array2::zeros((classes, channels)),
            latents: 0,
            suppression: Array2::zeros((classes, channels)),
            suppression_latents: 0,
        }
    }

    /// Adds one latent's moments (and suppression effects).
    pub fn add(
        &mut self,
        mean: ArrayView2<f32>,
        var: ArrayView2<f32>,
        suppression: Option<ArrayView2<f32>>,
    ) {
        let m = mean.mapv(|v| v as f64);
        self.mean_sq += &(&m * &m);
        self.mean += &m;
        self.var += &var.mapv(|v| v as f64);
        self.latents += 1;
        if let Some(s) = suppression {
            self.suppression += &s.mapv(|v| v as f64);
            self.suppression_latents += 1;
        }
    }

    /// The scores.
    pub fn scores(&self) -> LayerScores {
        let n = self.latents.max(1) as f64;
        let class_mean = &self.mean / n;
        // E[a² | c] − m², over latents and positions: per latent E_p[a²] = var + mean².
        let second = (&self.var + &self.mean_sq) / n;
        let within = (&second - &(&class_mean * &class_mean)).mapv(|v| v.max(0.0));
        let channel_mean = class_mean.mean_axis(Axis(0)).expect("classes");
        // σ² = mean over classes of (within-class variance + (m − m̄)²): equal counts per class.
        let dev = &class_mean - &channel_mean.view().insert_axis(Axis(0));
        let total = (&within + &(&dev * &dev))
            .mean_axis(Axis(0))
            .expect("classes");
        let channel_std = total.mapv(f64::sqrt);
        let mut awareness = dev.clone();
        for (k, mut col) in awareness.columns_mut().into_iter().enumerate() {
            let s = channel_std[k];
            col.mapv_inplace(|v| if s > 0.0 { v / s } else { 0.0 });
        }
        let (suppression, suppression_excess) = if self.suppression_latents > 0 {
            let s = &self.suppression / self.suppression_latents as f64;
            let avg = s.mean_axis(Axis(0)).expect("classes");
            let excess = &s - &avg.view().insert_axis(Axis(0));
            (Some(s), Some(excess))
        } else {
            (None, None)
        };
        LayerScores {
            class_mean,
            class_std: within.mapv(f64::sqrt),
            channel_std,
            awareness,
            suppression,
            suppression_excess,
        }
    }
}

/// Channels of one row ordered by a key, largest first (ties by channel number).
fn ranked(values: impl Iterator<Item = f64>) -> Vec<usize> {
    let v: Vec<f64> = values.collect();
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    order
}

// ---------------------------------------------------------------------------------------------
// parameters shared by the stage and the sink

fn field_name(prefix: &str, layer: &str, what: &str) -> String {
    format!("{prefix}{layer}_{what}")
}

fn generator_param(params: &Params) -> Result<CcbnGenerator, Vec<PlanIssue>> {
    let dir = params.path("generator").unwrap_or_default();
    let package = ModelPackage::load(&dir).map_err(|e| {
        vec![PlanIssue::param("generator", e.to_string())
            .hint("name a package folder holding manifest.json and the .onnx file")]
    })?;
    CcbnGenerator::from_package(package).map_err(|e| {
        vec![PlanIssue::param("generator", e).hint(
            "this stage needs a class-conditional generator whose manifest lists `classes` and \
             `ccbn_outputs` under `extra`, like models/fashion-ccbn",
        )]
    })
}

/// The scored layers: `layers` (names), or every CCBN layer when empty.
fn layers_param(params: &Params, g: &CcbnGenerator) -> Result<Vec<usize>, Vec<PlanIssue>> {
    let names = params.strings("layers");
    if names.is_empty() {
        return Ok((0..g.layers.len()).collect());
    }
    let all: Vec<&str> = g.layers.iter().map(|l| l.name.as_str()).collect();
    let mut out = Vec::new();
    let mut issues = Vec::new();
    for (i, n) in names.iter().enumerate() {
        match g.layer_index(n) {
            Some(l) if out.contains(&l) => issues.push(
                PlanIssue::param("layers", format!("layer `{n}` is listed twice"))
                    .at_key(&i.to_string()),
            ),
            Some(l) => out.push(l),
            None => {
                let hint = match nearest(n, all.iter().copied()) {
                    Some(m) => format!("did you mean `{m}`? CCBN layers: {}", all.join(", ")),
                    None => format!("the generator's CCBN layers: {}", all.join(", ")),
                };
                issues.push(
                    PlanIssue::param(
                        "layers",
                        format!("`{n}` is not a CCBN layer of the generator"),
                    )
                    .at_key(&i.to_string())
                    .hint(hint),
                );
            }
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

fn gated_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::optional(
            "device",
            ParamKind::Choice(&["cpu", "cuda", "auto"]),
            json!("auto"),
            "where the generator runs",
        ),
        ParamSpec::optional(
            "threads",
            ParamKind::Int,
            Json::Null,
            "ONNX Runtime intra-op threads (default: ONNX Runtime's choice)",
        ),
        ParamSpec::optional(
            "max_batch",
            ParamKind::Int,
            json!(256),
            "most images per model call",
        ),
        ParamSpec::optional(
            "cache_dir",
            ParamKind::Path,
            Json::Null,
            "where the generator with channel gates is cached (default: .grad in its package)",
        ),
    ]
}

fn gated_options(params: &Params) -> Result<GatedOptions, String> {
    let device = crate::onnx::device_of(params)?;
    Ok(GatedOptions {
        device,
        threads: params.int("threads").filter(|t| *t > 0).map(|t| t as usize),
        max_batch: params.int("max_batch").unwrap_or(256).max(1) as usize,
        cache_dir: params.path("cache_dir"),
    })
}

fn bounds(params: &Params, ints: &[(&str, i64)]) -> Vec<PlanIssue> {
    let mut issues = Vec::new();
    for &(p, min) in ints {
        if params.int(p).is_some_and(|v| v < min) {
            issues.push(PlanIssue::param(p, format!("`{p}` must be at least {min}")));
        }
    }
    if params.int("threads").is_some_and(|t| t < 1) {
        issues.push(PlanIssue::param(
            "threads",
            "`threads` must be at least 1 (or left out)",
        ));
    }
    issues
}

fn check_generator(params: &Params) -> Result<(), Vec<PlanIssue>> {
    if params.str("device") == Some("cuda") && !latentflow_engine::inference::cuda_compiled() {
        return Err(vec![PlanIssue::param(
            "device",
            "`device: cuda`, but this build has no CUDA support",
        )
        .hint("rebuild with `--features cuda`, or use `auto`")]);
    }
    let g = generator_param(params)?;
    g.package.check().map_err(|e| {
        vec![PlanIssue::param("generator", e.to_string())
            .hint("run `latentflow models check <dir>` for details")]
    })
}

// ---------------------------------------------------------------------------------------------
// channel-awareness

/// Factory of the `channel-awareness` stage.
pub struct ChannelAwarenessStage;

struct AwarenessWiring {
    generator: CcbnGenerator,
    layers: Vec<usize>,
    z: String,
    prefix: String,
    suppression: bool,
}

fn awareness_wiring(params: &Params) -> Result<AwarenessWiring, Vec<PlanIssue>> {
    let issues = bounds(params, &[("max_batch", 1)]);
    if !issues.is_empty() {
        return Err(issues);
    }
    let generator = generator_param(params)?;
    let layers = layers_param(params, &generator)?;
    Ok(AwarenessWiring {
        generator,
        layers,
        z: params.str("z").unwrap_or("z").to_string(),
        prefix: params.str("prefix").unwrap_or("").to_string(),
        suppression: params.bool("suppression").unwrap_or(true),
    })
}

impl StageFactory for ChannelAwarenessStage {
    fn info(&self) -> KindInfo {
        let mut params = vec![
            ParamSpec::required(
                "generator",
                ParamKind::Path,
                "class-conditional generator package whose manifest lists `classes` and \
                 `ccbn_outputs`",
            ),
            ParamSpec::optional("z", ParamKind::Field, json!("z"), "latent field"),
            ParamSpec::optional(
                "layers",
                ParamKind::FieldList,
                json!([]),
                "CCBN outputs to measure (default: all of them)",
            ),
            ParamSpec::optional(
                "suppression",
                ParamKind::Bool,
                json!(true),
                "also measure the image change when each channel alone is gated to zero \
                 (classes x channels extra images per latent)",
            ),
            ParamSpec::optional(
                "prefix",
                ParamKind::String,
                json!(""),
                "prefix of the fields written",
            ),
        ];
        params.extend(gated_params());
        KindInfo {
            name: "channel-awareness",
            doc: "Per latent, runs a class-conditional generator once per class and writes, per \
                  CCBN layer L, the class-by-channel moments L_mean and L_var (over positions) \
                  and, with `suppression`, L_suppression: mean |image change| when that channel \
                  alone is gated to zero. The `channel-report` sink turns them into awareness \
                  scores, a heat map, edits and blends.",
            params,
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let w = awareness_wiring(params)?;
        let g = &w.generator;
        let mut plan =
            Plan::default().read(&w.z, FieldType::f32(Shape::fixed(&[g.latent])), &["z"]);
        let c = g.classes.len();
        for &l in &w.layers {
            let layer = &g.layers[l];
            let ty = FieldType::f32(Shape::fixed(&[c, layer.channels]));
            plan = plan
                .write(&field_name(&w.prefix, &layer.name, "mean"), ty.clone())
                .write(&field_name(&w.prefix, &layer.name, "var"), ty.clone());
            if w.suppression {
                plan = plan.write(&field_name(&w.prefix, &layer.name, "suppression"), ty);
            }
        }
        Ok(plan)
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        check_generator(params)
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let w = awareness_wiring(params).map_err(|i| i[0].message.clone())?;
        let options = gated_options(params)?;
        let net = GatedGenerator::open(w.generator.clone(), &options)?;
        Ok(Box::new(AwarenessRunner { w, net }))
    }
}

struct AwarenessRunner {
    w: AwarenessWiring,
    net: GatedGenerator,
}

/// The per-latent measurements of one layer.
struct Measured {
    mean: Array2<f64>,
    var: Array2<f64>,
    suppression: Option<Array2<f64>>,
}

impl AwarenessRunner {
    /// Measurements for the latents `z` (`[n, latent]`): per latent, per scored layer.
    fn measure(&self, z: &Array2<f32>) -> Result<Vec<Vec<Measured>>, String> {
        let g = &self.net.generator;
        let (n, c) = (z.nrows(), g.classes.len());
        // Row i·C + c: latent i with class c.
        let zs = Array2::from_shape_fn((n * c, g.latent), |(r, j)| z[[r / c, j]]);
        let classes: Vec<usize> = (0..n * c).map(|r| r % c).collect();
        let base = self
            .net
            .run(&Rows::neutral(zs, one_hot(&classes, c), &g.layers), true)?;
        let mut out: Vec<Vec<Measured>> = (0..n).map(|_| Vec::new()).collect();
        for &l in &self.w.layers {
            let (mean, var) = position_moments(&base.layers[l]);
            for (i, o) in out.iter_mut().enumerate() {
                o.push(Measured {
                    mean: mean.slice(ndarray::s![i * c..(i + 1) * c, ..]).to_owned(),
                    var: var.slice(ndarray::s![i * c..(i + 1) * c, ..]).to_owned(),
                    suppression: None,
                });
            }
        }
        if !self.w.suppression {
            return Ok(out);
        }
        let img_len = g.image_len();
        let base_img = base.image.as_standard_layout();
        let base_img = base_img.as_slice().expect("standard layout");
        for (i, per_layer) in out.iter_mut().enumerate() {
            // Rows: for each class, each scored layer, each channel of it: that channel gated
            // to zero.
            let mut which = Vec::new();
            for cls in 0..c {
                for (s, &l) in self.w.layers.iter().enumerate() {
                    for k in 0..g.layers[l].channels {
                        which.push((cls, s, l, k));
                    }
                }
            }
            let m = which.len();
            let zs = Array2::from_shape_fn((m, g.latent), |(_, j)| z[[i, j]]);
            let classes: Vec<usize> = which.iter().map(|w| w.0).collect();
            let mut rows = Rows::neutral(zs, one_hot(&classes, c), &g.layers);
            for (r, &(_, _, l, k)) in which.iter().enumerate() {
                rows.gates[l][[r, k]] = 0.0;
            }
            let gated = self.net.run(&rows, false)?;
            let imgs = gated.image.as_standard_layout();
            let imgs = imgs.as_slice().expect("standard layout");
            let mut effects: Vec<Array2<f64>> = self
                .w
                .layers
                .iter()
                .map(|&l| Array2::zeros((c, g.layers[l].channels)))
                .collect();
            for (r, &(cls, s, _, k)) in which.iter().enumerate() {
                let b = (i * c + cls) * img_len;
                effects[s][[cls, k]] = mean_abs_diff(
                    &imgs[r * img_len..(r + 1) * img_len],
                    &base_img[b..b + img_len],
                );
            }
            for (s, e) in effects.into_iter().enumerate() {
                per_layer[s].suppression = Some(e);
            }
        }
        Ok(out)
    }
}

impl Stage for AwarenessRunner {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        let latent = self.net.generator.latent;
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        let mut good: Vec<(usize, Record, Vec<f32>)> = Vec::new();
        for (idx, r) in batch.into_iter().enumerate() {
            let z = r
                .tensor(&self.w.z)
                .and_then(|t| t.as_f32().cloned().ok_or_else(|| "not f32".to_string()));
            match z {
                Ok(z) if z.len() == latent && z.iter().all(|v| v.is_finite()) => {
                    good.push((idx, r, z.iter().copied().collect()));
                    outcomes.push(None);
                }
                Ok(z) => outcomes.push(Some(Err(Failure::of(
                    &r,
                    &cx.name,
                    format!(
                        "`{}` must hold {latent} finite values; got {} values",
                        self.w.z,
                        z.len()
                    ),
                )))),
                Err(e) => outcomes.push(Some(Err(Failure::of(&r, &cx.name, e)))),
            }
        }
        if !good.is_empty() {
            let z = Array2::from_shape_fn((good.len(), latent), |(i, j)| good[i].2[j]);
            match self.measure(&z) {
                Ok(per_latent) => {
                    let g = &self.net.generator;
                    for ((idx, mut r, _), layers) in good.into_iter().zip(per_latent) {
                        for (&l, m) in self.w.layers.iter().zip(layers) {
                            let name = &g.layers[l].name;
                            let put = |r: &mut Record, what: &str, a: Array2<f64>| {
                                r.set(
                                    &field_name(&self.w.prefix, name, what),
                                    Value::Tensor(Tensor::f32(a.mapv(|v| v as f32).into_dyn())),
                                );
                            };
                            put(&mut r, "mean", m.mean);
                            put(&mut r, "var", m.var);
                            if let Some(s) = m.suppression {
                                put(&mut r, "suppression", s);
                            }
                        }
                        outcomes[idx] = Some(Ok(r));
                    }
                }
                Err(e) => {
                    for (idx, r, _) in good {
                        outcomes[idx] = Some(Err(Failure::of(
                            &r,
                            &cx.name,
                            format!("channel awareness failed: {e}"),
                        )));
                    }
                }
            }
        }
        Completion::Ready(
            outcomes
                .into_iter()
                .map(|o| o.expect("every record"))
                .collect(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// pictures: a 3x5 pixel font, colour maps, labelled sheets

/// The shared 3×5 glyph of `c`, in capitals.
fn glyph(c: char) -> Option<u16> {
    crate::plot::glyph(c.to_ascii_uppercase())
}

/// Font pixels are `SCALE` image pixels; a character advances `4·SCALE`.
const FONT: u32 = 2;
const LINE: u32 = 5 * FONT + 6;

fn text_width(text: &str) -> u32 {
    (text.chars().count() as u32 * 4 * FONT).saturating_sub(FONT)
}

fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, colour: [u8; 3]) {
    for (i, ch) in text.chars().enumerate() {
        let Some(g) = glyph(ch) else { continue };
        for row in 0..5u32 {
            for col in 0..3u32 {
                if g >> (14 - (row * 3 + col)) & 1 == 1 {
                    for dy in 0..FONT {
                        for dx in 0..FONT {
                            let (px, py) =
                                (x + (i as u32 * 4 + col) * FONT + dx, y + row * FONT + dy);
                            if px < img.width() && py < img.height() {
                                img.put_pixel(px, py, Rgb(colour));
                            }
                        }
                    }
                }
            }
        }
    }
}

fn lerp(a: [u8; 3], b: [u8; 3], t: f64) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0);
    Rgb([0, 1, 2].map(|i| (a[i] as f64 + (b[i] as f64 - a[i] as f64) * t).round() as u8))
}

/// Blue (−1) – white (0) – red (+1).
pub fn diverging(v: f64) -> Rgb<u8> {
    if v < 0.0 {
        lerp([255, 255, 255], [33, 102, 172], -v)
    } else {
        lerp([255, 255, 255], [178, 24, 43], v)
    }
}

/// White (0) – orange – dark red (1).
pub fn sequential(v: f64) -> Rgb<u8> {
    let v = v.clamp(0.0, 1.0);
    if v < 0.5 {
        lerp([255, 255, 255], [253, 141, 60], v * 2.0)
    } else {
        lerp([253, 141, 60], [128, 0, 38], v * 2.0 - 1.0)
    }
}

/// A tile grid with a title, column labels above and row labels at the left.
pub fn labelled_sheet(
    title: &str,
    col_labels: &[String],
    rows: &[(String, Vec<RgbImage>)],
    scale: u32,
) -> Option<RgbImage> {
    let first = rows.iter().find_map(|(_, r)| r.first())?;
    let (tw, th) = (first.width() * scale, first.height() * scale);
    let cols = rows.iter().map(|(_, r)| r.len()).max()? as u32;
    let gap = 2;
    let left = rows
        .iter()
        .map(|(l, _)| text_width(l))
        .max()
        .unwrap_or(0)
        .max(1)
        + 8;
    let top = 2 * LINE;
    let width = (left + cols * (tw + gap) + gap).max(text_width(title) + 8);
    let height = top + rows.len() as u32 * (th + gap) + gap;
    let mut sheet = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    draw_text(&mut sheet, title, 4, 4, [0, 0, 0]);
    for (c, label) in col_labels.iter().enumerate() {
        let cx = left + gap + c as u32 * (tw + gap) + tw / 2;
        draw_text(
            &mut sheet,
            label,
            cx.saturating_sub(text_width(label) / 2),
            LINE + 3,
            [60, 60, 60],
        );
    }
    for (r, (label, tiles)) in rows.iter().enumerate() {
        let y = top + gap + r as u32 * (th + gap);
        draw_text(&mut sheet, label, 4, y + th / 2 - 5, [0, 0, 0]);
        for (c, tile) in tiles.iter().enumerate() {
            let tile = imageops::resize(tile, tw, th, imageops::FilterType::Nearest);
            imageops::replace(
                &mut sheet,
                &tile,
                (left + gap + c as u32 * (tw + gap)) as i64,
                y as i64,
            );
        }
    }
    Some(sheet)
}

/// One panel of the heat map: classes × channels, coloured by `colour(value / max)`.
fn heat_panel(
    title: &str,
    classes: &[String],
    values: &Array2<f64>,
    max: f64,
    colour: fn(f64) -> Rgb<u8>,
    label_w: u32,
) -> RgbImage {
    let (c, k) = values.dim();
    let cw = (768 / k.max(1) as u32).clamp(2, 12);
    let chh = 13;
    let width = label_w + k as u32 * cw + 8;
    let height = LINE + c as u32 * chh + LINE + 2;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    draw_text(&mut img, title, 4, 3, [0, 0, 0]);
    for (ci, name) in classes.iter().enumerate() {
        draw_text(&mut img, name, 4, LINE + ci as u32 * chh + 1, [0, 0, 0]);
        for ki in 0..k {
            let v = values[[ci, ki]] / max.max(1e-300);
            let col = colour(v);
            for dy in 0..chh - 1 {
                for dx in 0..cw {
                    img.put_pixel(
                        label_w + ki as u32 * cw + dx,
                        LINE + ci as u32 * chh + dy,
                        col,
                    );
                }
            }
        }
    }
    // Channel numbers along the bottom.
    let step = [1usize, 2, 4, 8, 16, 32, 64]
        .into_iter()
        .find(|s| *s as u32 * cw >= 40)
        .unwrap_or(64);
    for ki in (0..k).step_by(step) {
        let label = ki.to_string();
        draw_text(
            &mut img,
            &label,
            label_w + ki as u32 * cw,
            LINE + c as u32 * chh + 2,
            [80, 80, 80],
        );
    }
    img
}

fn stack_vertically(parts: &[RgbImage]) -> RgbImage {
    let w = parts.iter().map(|p| p.width()).max().unwrap_or(1);
    let h: u32 = parts.iter().map(|p| p.height() + 4).sum::<u32>().max(1);
    let mut out = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let mut y = 0;
    for p in parts {
        imageops::replace(&mut out, p, 0, y as i64);
        y += p.height() + 4;
    }
    out
}

/// A file-name-safe, lower-case form of a class name (`T-shirt/top` → `t-shirt-top`).
pub fn slug(name: &str) -> String {
    let mut s = String::new();
    for ch in name.chars() {
        if ch.is_ascii_alphanumeric() {
            s.push(ch.to_ascii_lowercase());
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    s.trim_matches('-').to_string()
}

// ---------------------------------------------------------------------------------------------
// channel-report

/// Factory of the `channel-report` sink.
pub struct ChannelReportSink;

/// How a blend chooses the channels it moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BlendBy {
    /// `|A[B, k] − A[A, k]|`.
    Contrast,
    /// `|A[B, k]|`.
    Target,
}

struct ReportWiring {
    generator: CcbnGenerator,
    layers: Vec<usize>,
    z: String,
    prefix: String,
    suppression: bool,
    top: usize,
    dir: String,
    samples: usize,
    scale: u32,
    edit_classes: Vec<usize>,
    edit_factors: Vec<f32>,
    edit_by_suppression: bool,
    blends: Vec<(usize, usize)>,
    blend_steps: Vec<f32>,
    blend_channels: f64,
    blend_by: BlendBy,
}

fn report_wiring(params: &Params, input: Option<&Schema>) -> Result<ReportWiring, Vec<PlanIssue>> {
    let mut issues = bounds(
        params,
        &[("top", 1), ("samples", 1), ("scale", 1), ("max_batch", 1)],
    );
    let frac = params.float("blend_channels").unwrap_or(0.5);
    if !(frac > 0.0 && frac <= 1.0) {
        issues.push(
            PlanIssue::param("blend_channels", "`blend_channels` must be in (0, 1]")
                .hint("the fraction of each layer's channels a blend moves, e.g. 0.5"),
        );
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    let generator = generator_param(params)?;
    let layers = layers_param(params, &generator)?;
    let prefix = params.str("prefix").unwrap_or("").to_string();
    // Suppression scores are read when the input carries them (the plan knows the schema).
    let suppression = match input {
        Some(schema) => layers.iter().all(|&l| {
            schema.contains_key(&field_name(
                &prefix,
                &generator.layers[l].name,
                "suppression",
            ))
        }),
        None => true,
    };
    let mut edit_classes = Vec::new();
    for (i, c) in params.strings("edit_classes").iter().enumerate() {
        match generator.class_index(c) {
            Ok(k) => edit_classes.push(k),
            Err(e) => issues.push(PlanIssue::param("edit_classes", e).at_key(&i.to_string())),
        }
    }
    let mut blends = Vec::new();
    for (i, b) in params.strings("blends").iter().enumerate() {
        let parts: Vec<&str> = b.split("->").collect();
        if parts.len() != 2 {
            issues.push(
                PlanIssue::param("blends", format!("`{b}` is not a blend"))
                    .at_key(&i.to_string())
                    .hint("write each blend as \"<from class> -> <to class>\", e.g. \"Sneaker -> Ankle boot\""),
            );
            continue;
        }
        match (
            generator.class_index(parts[0]),
            generator.class_index(parts[1]),
        ) {
            (Ok(a), Ok(b)) if a != b => blends.push((a, b)),
            (Ok(_), Ok(_)) => issues.push(
                PlanIssue::param("blends", format!("`{b}` blends a class with itself"))
                    .at_key(&i.to_string()),
            ),
            (Err(e), _) | (_, Err(e)) => {
                issues.push(PlanIssue::param("blends", e).at_key(&i.to_string()))
            }
        }
    }
    let edit_factors: Vec<f32> = params
        .floats("edit_factors")
        .iter()
        .map(|v| *v as f32)
        .collect();
    if !edit_classes.is_empty() && edit_factors.is_empty() {
        issues.push(PlanIssue::param(
            "edit_factors",
            "list the factors to scale the edited channel by, e.g. [0, 0.5, 1, 2, 3]",
        ));
    }
    let blend_steps: Vec<f32> = params
        .floats("blend_steps")
        .iter()
        .map(|v| *v as f32)
        .collect();
    if !blends.is_empty() && blend_steps.is_empty() {
        issues.push(PlanIssue::param(
            "blend_steps",
            "list the blend strengths, e.g. [0, 0.25, 0.5, 0.75, 1]",
        ));
    }
    let edit_by_suppression = params.str("edit_by") == Some("suppression");
    if edit_by_suppression && !suppression && !edit_classes.is_empty() {
        issues.push(
            PlanIssue::param(
                "edit_by",
                "`edit_by: suppression` needs the suppression fields, which the input lacks",
            )
            .hint("set `suppression: true` on the channel-awareness stage, or use `edit_by: awareness`"),
        );
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(ReportWiring {
        generator,
        layers,
        z: params.str("z").unwrap_or("z").to_string(),
        prefix,
        suppression,
        top: params.int("top").unwrap_or(5) as usize,
        dir: params.str("dir").unwrap_or("").to_string(),
        samples: params.int("samples").unwrap_or(6) as usize,
        scale: params.int("scale").unwrap_or(3).clamp(1, 16) as u32,
        edit_classes,
        edit_factors,
        edit_by_suppression,
        blends,
        blend_steps,
        blend_channels: frac,
        blend_by: if params.str("blend_by") == Some("target") {
            BlendBy::Target
        } else {
            BlendBy::Contrast
        },
    })
}

impl SinkFactory for ChannelReportSink {
    fn info(&self) -> KindInfo {
        let mut params = vec![
            ParamSpec::required(
                "generator",
                ParamKind::Path,
                "the generator `channel-awareness` measured",
            ),
            ParamSpec::optional(
                "layers",
                ParamKind::FieldList,
                json!([]),
                "CCBN layers to report (default: all)",
            ),
            ParamSpec::optional(
                "z",
                ParamKind::Field,
                json!("z"),
                "latent field (the first `samples` latents are the grids' rows)",
            ),
            ParamSpec::optional(
                "prefix",
                ParamKind::String,
                json!(""),
                "prefix of the fields `channel-awareness` wrote",
            ),
            ParamSpec::optional(
                "dir",
                ParamKind::String,
                json!(""),
                "folder for everything written, relative to the run folder",
            ),
            ParamSpec::optional(
                "top",
                ParamKind::Int,
                json!(5),
                "channels listed per class and layer",
            ),
            ParamSpec::optional(
                "samples",
                ParamKind::Int,
                json!(6),
                "latents shown (rows of the edit and blend grids)",
            ),
            ParamSpec::optional(
                "scale",
                ParamKind::Int,
                json!(3),
                "enlarge each image this many times in grids",
            ),
            ParamSpec::optional(
                "edit_classes",
                ParamKind::FieldList,
                json!([]),
                "classes (names or numbers) whose most aware channel per layer is scaled",
            ),
            ParamSpec::optional(
                "edit_factors",
                ParamKind::FloatList,
                json!([0.0, 0.5, 1.0, 2.0, 3.0]),
                "factors the edited channel is scaled by (grid columns)",
            ),
            ParamSpec::optional(
                "edit_by",
                ParamKind::Choice(&["awareness", "suppression"]),
                json!("awareness"),
                "which channel an edit scales: largest |awareness|, or largest suppression excess",
            ),
            ParamSpec::optional(
                "blends",
                ParamKind::FieldList,
                json!([]),
                "two-class blends, each \"<from class> -> <to class>\"",
            ),
            ParamSpec::optional(
                "blend_steps",
                ParamKind::FloatList,
                json!([0.0, 0.25, 0.5, 0.75, 1.0]),
                "blend strengths (grid columns; a last column shows the target class)",
            ),
            ParamSpec::optional(
                "blend_channels",
                ParamKind::Float,
                json!(0.5),
                "fraction of each layer's channels a blend moves",
            ),
            ParamSpec::optional(
                "blend_by",
                ParamKind::Choice(&["contrast", "target"]),
                json!("contrast"),
                "channels moved: largest |A[to] - A[from]|, or largest |A[to]|",
            ),
        ];
        params.extend(gated_params());
        KindInfo {
            name: "channel-report",
            doc: "Aggregates `channel-awareness` fields over all records: awareness A[c,k] = \
                  (class mean - mean over classes) / channel spread, suppression effects and \
                  their excess over the class average; writes channels.json (most class-aware \
                  channels per class and layer), awareness.png (heat map), scores/*.npy, \
                  single-channel edit grids (edits/) and two-class blend grids (blends/).",
            params,
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let w = report_wiring(params, Some(input))?;
        let g = &w.generator;
        let mut plan =
            Plan::default().read(&w.z, FieldType::f32(Shape::fixed(&[g.latent])), &["z"]);
        let c = g.classes.len();
        let mut whats = vec!["mean", "var"];
        if w.suppression {
            whats.push("suppression");
        }
        for &l in &w.layers {
            let layer = &g.layers[l];
            for what in &whats {
                plan = plan.read(
                    &field_name(&w.prefix, &layer.name, what),
                    FieldType::f32(Shape::fixed(&[c, layer.channels])),
                    &["layers"],
                );
            }
        }
        Ok(plan)
    }

    fn build(&self, params: &Params, out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        let w = report_wiring(params, None).map_err(|i| i[0].message.clone())?;
        let options = gated_options(params)?;
        let sums = w
            .layers
            .iter()
            .map(|&l| LayerSums::new(w.generator.classes.len(), w.generator.layers[l].channels))
            .collect();
        Ok(Box::new(ReportWriter {
            dir: out_dir.join(&w.dir),
            options,
            sums,
            latents: Vec::new(),
            records: 0,
            w,
        }))
    }
}

struct ReportWriter {
    w: ReportWiring,
    dir: PathBuf,
    options: GatedOptions,
    sums: Vec<LayerSums>,
    latents: Vec<Vec<f32>>,
    records: usize,
}

fn f32_matrix<'a>(r: &'a Record, field: &str) -> Result<ArrayView2<'a, f32>, String> {
    r.tensor(field)?
        .as_f32()
        .ok_or_else(|| format!("`{field}` is not f32"))?
        .view()
        .into_dimensionality()
        .map_err(|_| format!("`{field}` must be [classes, channels]"))
}

fn save_npy(path: &Path, a: &Array2<f64>) -> Result<(), String> {
    let tmp = path.with_extension("npy.partial");
    let file =
        std::fs::File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    ndarray_npy::WriteNpyExt::write_npy(&a.mapv(|v| v as f32), std::io::BufWriter::new(file))
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot move {} into place: {e}", path.display()))
}

fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

impl Sink for ReportWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        for r in records {
            for (s, &l) in self.w.layers.iter().enumerate() {
                let name = &self.w.generator.layers[l].name;
                let mean = f32_matrix(r, &field_name(&self.w.prefix, name, "mean"))?;
                let var = f32_matrix(r, &field_name(&self.w.prefix, name, "var"))?;
                // Read when the records carry it (the plan checked the schema; the writer is
                // built without it).
                let supp_field = field_name(&self.w.prefix, name, "suppression");
                let supp = match r.get(&supp_field) {
                    Some(_) if self.w.suppression => Some(f32_matrix(r, &supp_field)?),
                    _ => None,
                };
                let expected = self.sums[s].mean.dim();
                if mean.dim() != expected
                    || var.dim() != expected
                    || supp.is_some_and(|s| s.dim() != expected)
                {
                    return Err(format!(
                        "record `{}`: the `{name}` fields must be {expected:?}",
                        r.key
                    ));
                }
                self.sums[s].add(mean, var, supp);
            }
            if self.latents.len() < self.w.samples {
                let z = r.tensor(&self.w.z)?.as_f32().ok_or("latents are f32")?;
                self.latents.push(z.iter().copied().collect());
            }
            self.records += 1;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        if self.records == 0 {
            return Err("no records reached the channel report (did every record fail?)".into());
        }
        let started = Instant::now();
        std::fs::create_dir_all(self.dir.join("scores"))
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let w = &self.w;
        let g = &w.generator;
        let scores: Vec<LayerScores> = self.sums.iter().map(LayerSums::scores).collect();
        let mut files = Vec::new();

        // Score matrices.
        for (s, &l) in w.layers.iter().enumerate() {
            let name = &g.layers[l].name;
            let sc = &scores[s];
            let mut arrays = vec![
                ("awareness", &sc.awareness),
                ("class_mean", &sc.class_mean),
                ("class_std", &sc.class_std),
            ];
            if let (Some(sup), Some(ex)) = (&sc.suppression, &sc.suppression_excess) {
                arrays.push(("suppression", sup));
                arrays.push(("suppression_excess", ex));
            }
            for (what, a) in arrays {
                let path = self.dir.join("scores").join(format!("{name}_{what}.npy"));
                save_npy(&path, a)?;
                files.push(path);
            }
        }

        // Heat map.
        let label_w = g.classes.iter().map(|c| text_width(c)).max().unwrap_or(0) + 12;
        let mut panels = Vec::new();
        for (s, &l) in w.layers.iter().enumerate() {
            let name = g.layers[l].name.to_uppercase();
            let sc = &scores[s];
            let amax = sc.awareness.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            panels.push(heat_panel(
                &format!("{name} AWARENESS A (BLUE - / RED +, MAX {amax:.2})"),
                &g.classes,
                &sc.awareness,
                amax,
                diverging,
                label_w,
            ));
            if let Some(sup) = &sc.suppression {
                let smax = sup.iter().fold(0.0f64, |m, v| m.max(*v));
                panels.push(heat_panel(
                    &format!("{name} SUPPRESSION S (MAX {smax:.3})"),
                    &g.classes,
                    sup,
                    smax,
                    sequential,
                    label_w,
                ));
            }
        }
        let heat = stack_vertically(&panels);
        let heat_path = self.dir.join("awareness.png");
        save_png(&heat, &heat_path)?;
        files.push(heat_path);

        // The report's rankings.
        let entry = |sc: &LayerScores, c: usize, k: usize| -> Json {
            let mut e = json!({"channel": k, "awareness": round4(sc.awareness[[c, k]])});
            if let (Some(sup), Some(ex)) = (&sc.suppression, &sc.suppression_excess) {
                e["suppression"] = json!(round4(sup[[c, k]]));
                e["suppression_excess"] = json!(round4(ex[[c, k]]));
            }
            e
        };
        let mut layers_json = Map::new();
        let mut overall: Vec<(f64, usize, usize, usize)> = Vec::new();
        for (s, &l) in w.layers.iter().enumerate() {
            let layer = &g.layers[l];
            let sc = &scores[s];
            let mut classes_json = Map::new();
            for (c, cname) in g.classes.iter().enumerate() {
                let by_a = ranked(sc.awareness.row(c).iter().map(|v| v.abs()));
                let mut cj = json!({
                    "by_awareness": by_a.iter().take(w.top).map(|&k| entry(sc, c, k)).collect::<Vec<_>>(),
                });
                if let Some(ex) = &sc.suppression_excess {
                    let by_s = ranked(ex.row(c).iter().copied());
                    cj["by_suppression"] = json!(by_s
                        .iter()
                        .take(w.top)
                        .map(|&k| entry(sc, c, k))
                        .collect::<Vec<_>>());
                    let a: std::collections::HashSet<usize> =
                        by_a.iter().take(w.top).copied().collect();
                    cj["top_overlap"] =
                        json!(by_s.iter().take(w.top).filter(|k| a.contains(k)).count());
                }
                classes_json.insert(cname.clone(), cj);
                for k in 0..layer.channels {
                    overall.push((sc.awareness[[c, k]].abs(), c, s, k));
                }
            }
            let abs: Vec<f64> = sc.awareness.iter().map(|v| v.abs()).collect();
            let mut lj = json!({
                "channels": layer.channels,
                "positions": layer.height * layer.width,
                "max_abs_awareness": round4(abs.iter().fold(0.0f64, |m, v| m.max(*v))),
                "mean_abs_awareness": round4(abs.iter().sum::<f64>() / abs.len().max(1) as f64),
                "classes": classes_json,
            });
            if let (Some(sup), Some(ex)) = (&sc.suppression, &sc.suppression_excess) {
                lj["mean_suppression"] = json!(round4(sup.mean().unwrap_or(0.0)));
                lj["max_suppression"] = json!(round4(sup.iter().fold(0.0f64, |m, v| m.max(*v))));
                lj["correlation_abs_awareness_vs_suppression_excess"] = json!(round4(pearson(
                    &abs,
                    &ex.iter().copied().collect::<Vec<_>>()
                )));
            }
            layers_json.insert(layer.name.clone(), lj);
        }
        overall.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
        });
        let most_aware: Vec<Json> = overall
            .iter()
            .take(10)
            .map(|&(_, c, s, k)| {
                let mut e = entry(&scores[s], c, k);
                e["class"] = json!(g.classes[c]);
                e["layer"] = json!(g.layers[w.layers[s]].name);
                e
            })
            .collect();

        // Edits and blends run the gated generator on the first latents.
        let mut edits_json = Vec::new();
        let mut blends_json = Vec::new();
        if !w.edit_classes.is_empty() || !w.blends.is_empty() {
            let net = GatedGenerator::open(g.clone(), &self.options)?;
            let z =
                Array2::from_shape_fn((self.latents.len(), g.latent), |(i, j)| self.latents[i][j]);
            for &c in &w.edit_classes {
                let (j, path) = self.edit(&net, &z, c, &scores)?;
                edits_json.push(j);
                files.push(path);
            }
            for &(a, b) in &w.blends {
                let (j, path) = self.blend(&net, &z, a, b, &scores)?;
                blends_json.push(j);
                files.push(path);
            }
        }

        let report = json!({
            "generator": g.package.manifest().name,
            "generator_sha256": g.package.manifest().sha256,
            "latents": self.records,
            "suppression_latents": self.sums.first().map(|s| s.suppression_latents).unwrap_or(0),
            "classes": g.classes,
            "definitions": {
                "awareness": "A[c,k] = (m[c,k] - mean_c m[c,k]) / sigma[k]: m[c,k] is channel k's mean over latents and positions with the one-hot class c; sigma[k] its standard deviation over all classes, latents and positions",
                "suppression": "S[c,k] = mean over latents and image values of |G(z, e_c) - G(z, e_c) with channel k gated to 0|",
                "suppression_excess": "S[c,k] - mean over classes of S[., k]: how much more class c needs channel k than the average class",
                "top_overlap": "channels shared by the top lists by awareness and by suppression excess",
            },
            "layers": layers_json,
            "most_aware": most_aware,
            "edits": edits_json,
            "blends": blends_json,
            "seconds": round4(started.elapsed().as_secs_f64()),
        });
        let path = self.dir.join("channels.json");
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n";
        write_atomic(&path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        files.insert(0, path);
        Ok(files)
    }
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    if saa > 0.0 && sbb > 0.0 {
        sab / (saa * sbb).sqrt()
    } else {
        0.0
    }
}

fn format_factor(f: f32) -> String {
    let s = format!("{f:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl ReportWriter {
    fn tiles(&self, images: &ArrayD<f32>) -> Result<Vec<RgbImage>, String> {
        images
            .outer_iter()
            .map(|i| tensor_to_image(&i.to_owned(), self.w.generator.image_range))
            .collect()
    }

    /// Scales the most aware channel of class `c` in each layer by the edit factors.
    fn edit(
        &self,
        net: &GatedGenerator,
        z: &Array2<f32>,
        c: usize,
        scores: &[LayerScores],
    ) -> Result<(Json, PathBuf), String> {
        let w = &self.w;
        let g = &w.generator;
        let (n, f) = (z.nrows(), w.edit_factors.len());
        let base = net.run(
            &Rows::neutral(z.clone(), one_hot(&vec![c; n], g.classes.len()), &g.layers),
            false,
        )?;
        let base_img = base.image.as_standard_layout().to_owned();
        let img_len = g.image_len();
        let mut rows = Vec::new();
        let mut layers_json = Vec::new();
        for (s, &l) in w.layers.iter().enumerate() {
            let sc = &scores[s];
            let key: Vec<f64> = match (&sc.suppression_excess, w.edit_by_suppression) {
                (Some(ex), true) => ex.row(c).to_vec(),
                _ => sc.awareness.row(c).iter().map(|v| v.abs()).collect(),
            };
            let k = ranked(key.into_iter())[0];
            // Row i·F + j: latent i, factor j.
            let zs = Array2::from_shape_fn((n * f, g.latent), |(r, j)| z[[r / f, j]]);
            let mut batch = Rows::neutral(zs, one_hot(&vec![c; n * f], g.classes.len()), &g.layers);
            for r in 0..n * f {
                batch.gates[l][[r, k]] = w.edit_factors[r % f];
            }
            let out = net.run(&batch, false)?;
            let imgs = out.image.as_standard_layout().to_owned();
            let flat = imgs.as_slice().expect("standard layout");
            let bflat = base_img.as_slice().expect("standard layout");
            let change: Vec<f64> = (0..f)
                .map(|j| {
                    (0..n)
                        .map(|i| {
                            let r = i * f + j;
                            mean_abs_diff(
                                &flat[r * img_len..(r + 1) * img_len],
                                &bflat[i * img_len..(i + 1) * img_len],
                            )
                        })
                        .sum::<f64>()
                        / n as f64
                })
                .collect();
            let tiles = self.tiles(&imgs)?;
            for i in 0..n {
                let label = if i == 0 {
                    format!("{} CH {k}", g.layers[l].name)
                } else {
                    String::new()
                };
                rows.push((label, tiles[i * f..(i + 1) * f].to_vec()));
            }
            let mut lj = json!({
                "layer": g.layers[l].name,
                "channel": k,
                "awareness": round4(sc.awareness[[c, k]]),
                "mean_abs_change": change.iter().map(|v| round4(*v)).collect::<Vec<_>>(),
            });
            if let Some(ex) = &sc.suppression_excess {
                lj["suppression_excess"] = json!(round4(ex[[c, k]]));
            }
            layers_json.push(lj);
        }
        let cols: Vec<String> = w
            .edit_factors
            .iter()
            .map(|v| format!("X{}", format_factor(*v)))
            .collect();
        let title = format!(
            "{}: ONE CHANNEL PER LAYER SCALED (BY {})",
            g.classes[c],
            if w.edit_by_suppression {
                "SUPPRESSION"
            } else {
                "AWARENESS"
            }
        );
        let sheet = labelled_sheet(&title, &cols, &rows, w.scale).ok_or("nothing to draw")?;
        let dir = self.dir.join("edits");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(format!("{}.png", slug(&g.classes[c])));
        save_png(&sheet, &path)?;
        Ok((
            json!({
                "class": g.classes[c],
                "chosen_by": if w.edit_by_suppression { "suppression_excess" } else { "abs_awareness" },
                "factors": w.edit_factors,
                "layers": layers_json,
                "file": path.strip_prefix(&self.dir).unwrap_or(&path).display().to_string(),
            }),
            path,
        ))
    }

    /// The channels a blend `a -> b` moves in each scored layer (by layer index).
    fn blend_channels(&self, a: usize, b: usize, scores: &[LayerScores]) -> Vec<Vec<usize>> {
        let w = &self.w;
        let mut out = vec![Vec::new(); w.generator.layers.len()];
        for (s, &l) in w.layers.iter().enumerate() {
            let sc = &scores[s];
            let kk = w.generator.layers[l].channels;
            let key = (0..kk).map(|k| match w.blend_by {
                BlendBy::Contrast => (sc.awareness[[b, k]] - sc.awareness[[a, k]]).abs(),
                BlendBy::Target => sc.awareness[[b, k]].abs(),
            });
            let count = ((w.blend_channels * kk as f64).round() as usize).clamp(1, kk);
            let mut chosen: Vec<usize> = ranked(key).into_iter().take(count).collect();
            chosen.sort_unstable();
            out[l] = chosen;
        }
        out
    }

    /// Blends class `a` towards `b` by giving the channels that tell them apart class `b`'s
    /// modulation.
    fn blend(
        &self,
        net: &GatedGenerator,
        z: &Array2<f32>,
        a: usize,
        b: usize,
        scores: &[LayerScores],
    ) -> Result<(Json, PathBuf), String> {
        let w = &self.w;
        let g = &w.generator;
        let (n, t) = (z.nrows(), w.blend_steps.len());
        let swaps = class_swaps(net, z, a, b)?;
        let channels = self.blend_channels(a, b, scores);
        // Columns: the steps, then the plain images of both classes.
        let mut parts: Vec<Rows> = w
            .blend_steps
            .iter()
            .map(|&step| blend_rows(g, z, a, &swaps, &channels, step))
            .collect();
        for c in [a, b] {
            parts.push(Rows::neutral(
                z.clone(),
                one_hot(&vec![c; n], g.classes.len()),
                &g.layers,
            ));
        }
        let cols = parts.len();
        // Row i·cols + j: latent i, column j.
        let order: Vec<(usize, usize)> = (0..n * cols).map(|r| (r % cols, r / cols)).collect();
        let batch = Rows {
            z: Array2::from_shape_fn((n * cols, g.latent), |(r, k)| {
                let (j, i) = order[r];
                parts[j].z[[i, k]]
            }),
            y: Array2::from_shape_fn((n * cols, g.classes.len()), |(r, k)| {
                let (j, i) = order[r];
                parts[j].y[[i, k]]
            }),
            gates: (0..g.layers.len())
                .map(|l| {
                    Array2::from_shape_fn((n * cols, g.layers[l].channels), |(r, k)| {
                        let (j, i) = order[r];
                        parts[j].gates[l][[i, k]]
                    })
                })
                .collect(),
            shifts: (0..g.layers.len())
                .map(|l| {
                    Array2::from_shape_fn((n * cols, g.layers[l].channels), |(r, k)| {
                        let (j, i) = order[r];
                        parts[j].shifts[l][[i, k]]
                    })
                })
                .collect(),
        };
        let out = net.run(&batch, false)?;
        let imgs = out.image.as_standard_layout().to_owned();
        let flat = imgs.as_slice().expect("standard layout");
        let img_len = g.image_len();
        let image = |i: usize, j: usize| {
            let r = i * cols + j;
            &flat[r * img_len..(r + 1) * img_len]
        };
        let dist = |j: usize, other: usize| -> f64 {
            (0..n)
                .map(|i| mean_abs_diff(image(i, j), image(i, other)))
                .sum::<f64>()
                / n as f64
        };
        let (col_a, col_b) = (t, t + 1);
        let baseline = dist(col_a, col_b);
        let tiles = self.tiles(&imgs)?;
        // Shown: the steps and the target class (the step t = 0 is class a itself).
        let rows: Vec<(String, Vec<RgbImage>)> = (0..n)
            .map(|i| {
                let mut row = tiles[i * cols..i * cols + t].to_vec();
                row.push(tiles[i * cols + col_b].clone());
                (String::new(), row)
            })
            .collect();
        let mut col_labels: Vec<String> = w
            .blend_steps
            .iter()
            .map(|v| format!("T={}", format_factor(*v)))
            .collect();
        col_labels.push(g.classes[b].to_uppercase());
        let title = format!(
            "{} -> {}: {}% OF CHANNELS GIVEN {}'S MODULATION",
            g.classes[a],
            g.classes[b],
            (w.blend_channels * 100.0).round(),
            g.classes[b]
        );
        let sheet = labelled_sheet(&title, &col_labels, &rows, w.scale).ok_or("nothing to draw")?;
        let dir = self.dir.join("blends");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(format!(
            "{}-to-{}.png",
            slug(&g.classes[a]),
            slug(&g.classes[b])
        ));
        save_png(&sheet, &path)?;
        let steps: Vec<Json> = (0..t)
            .map(|j| {
                let (da, db) = (dist(j, col_a), dist(j, col_b));
                json!({
                    "t": w.blend_steps[j],
                    "mean_abs_diff_to_from_class": round4(da),
                    "mean_abs_diff_to_target_class": round4(db),
                    "fraction_of_the_way": round4(1.0 - db / baseline.max(1e-12)),
                })
            })
            .collect();
        let moved: Map<String, Json> = w
            .layers
            .iter()
            .map(|&l| (g.layers[l].name.clone(), json!(channels[l])))
            .collect();
        let fit: Map<String, Json> = g
            .layers
            .iter()
            .zip(&swaps)
            .map(|(l, s)| (l.name.clone(), json!(s.max_residual)))
            .collect();
        Ok((
            json!({
                "from": g.classes[a],
                "to": g.classes[b],
                "chosen_by": match w.blend_by { BlendBy::Contrast => "contrast", BlendBy::Target => "target" },
                "channels": moved,
                "swap_fit_max_relative_residual": fit,
                "mean_abs_diff_between_classes": round4(baseline),
                "steps": steps,
                "file": path.strip_prefix(&self.dir).unwrap_or(&path).display().to_string(),
            }),
            path,
        ))
    }
}

/// The per-channel affine map between two classes' outputs of one CCBN layer, for one and the
/// same layer input: `output(b) = gain · output(a) + offset`.
#[derive(Clone, Debug)]
pub struct ClassSwap {
    /// Per channel.
    pub gain: Vec<f64>,
    /// Per channel.
    pub offset: Vec<f64>,
    /// Largest `|output(b) − (gain · output(a) + offset)|` over the fitted values, relative to
    /// the largest `|output(b)|`: about 1e-6 when the layer is CCBN as the manifest says.
    pub max_residual: f64,
}

/// Shift values of the layer before layer `l` that pin layer `l`'s input, one set per pin.
const PINS: usize = 3;

/// Per CCBN layer, the [`ClassSwap`] from class `a` to class `b`.
///
/// CCBN is affine in the class vector for a fixed input: `out = (1 + W_g y) ⊙ BN(h) + W_b y`, so
/// for the same `h` the outputs for two classes are related channel by channel by an affine map
/// (the ratio of the class gains, and an offset), which this finds by least squares over
/// positions and inputs. The input is made the same for both classes with the gates: the
/// first layer's input depends on `z` alone (the rows of `z` give several inputs); a later
/// layer's input is pinned by gating the previous CCBN layer to zero and shifting it by fixed
/// values (`PINS` sets of seeded standard-normal values), which cuts the class's influence
/// upstream. This assumes `ccbn_outputs` lists the layers in network order, each layer's input
/// depending on the previous CCBN output only; `max_residual` shows whether it holds.
pub fn class_swaps(
    net: &GatedGenerator,
    z: &Array2<f32>,
    a: usize,
    b: usize,
) -> Result<Vec<ClassSwap>, String> {
    let g = &net.generator;
    let c = g.classes.len();
    let mut out = Vec::with_capacity(g.layers.len());
    for (l, layer) in g.layers.iter().enumerate() {
        // Rows 2·i (class a) and 2·i + 1 (class b) share their layer input.
        let inputs = if l == 0 { z.nrows() } else { PINS };
        let zs = Array2::from_shape_fn((2 * inputs, g.latent), |(r, j)| {
            if l == 0 {
                z[[r / 2, j]]
            } else {
                z[[0, j]]
            }
        });
        let classes: Vec<usize> = (0..2 * inputs)
            .map(|r| if r % 2 == 0 { a } else { b })
            .collect();
        let mut rows = Rows::neutral(zs, one_hot(&classes, c), &g.layers);
        if l > 0 {
            let prev = g.layers[l - 1].channels;
            for p in 0..inputs {
                let pin = latent(0x9a7e, p as u64, prev);
                for r in [2 * p, 2 * p + 1] {
                    rows.gates[l - 1].row_mut(r).fill(0.0);
                    for (k, v) in pin.iter().enumerate() {
                        rows.shifts[l - 1][[r, k]] = *v;
                    }
                }
            }
        }
        let acts = net.run(&rows, true)?.layers.swap_remove(l);
        let acts = acts.as_standard_layout();
        let data = acts.as_slice().expect("standard layout");
        let (kk, p) = (layer.channels, layer.height * layer.width);
        let mut swap = ClassSwap {
            gain: vec![1.0; kk],
            offset: vec![0.0; kk],
            max_residual: 0.0,
        };
        let mut worst = 0.0f64;
        let mut scale = 0.0f64;
        for k in 0..kk {
            let pairs: Vec<(f64, f64)> = (0..inputs)
                .flat_map(|i| {
                    let xa = &data[((2 * i) * kk + k) * p..((2 * i) * kk + k + 1) * p];
                    let xb = &data[((2 * i + 1) * kk + k) * p..((2 * i + 1) * kk + k + 1) * p];
                    xa.iter().zip(xb).map(|(x, y)| (*x as f64, *y as f64))
                })
                .collect();
            let m = pairs.len() as f64;
            let (mx, my) = (
                pairs.iter().map(|v| v.0).sum::<f64>() / m,
                pairs.iter().map(|v| v.1).sum::<f64>() / m,
            );
            let sxx: f64 = pairs.iter().map(|v| (v.0 - mx).powi(2)).sum();
            let sxy: f64 = pairs.iter().map(|v| (v.0 - mx) * (v.1 - my)).sum();
            let r = if sxx > 1e-12 * m { sxy / sxx } else { 1.0 };
            let o = my - r * mx;
            for (x, y) in &pairs {
                worst = worst.max((y - (r * x + o)).abs());
                scale = scale.max(y.abs());
            }
            swap.gain[k] = r;
            swap.offset[k] = o;
        }
        swap.max_residual = worst / scale.max(1e-12);
        out.push(swap);
    }
    Ok(out)
}

/// Rows of a blend `a -> b` at strength `t` for the latents `z`: `y = e_a`, and on the channels
/// `channels[l]` of every layer `l`, `gate = 1 + t·(gain − 1)`, `shift = t·offset`, which is
/// what the class vector `(1 − t)·e_a + t·e_b` does to those channels (CCBN is linear in `y`).
pub fn blend_rows(
    g: &CcbnGenerator,
    z: &Array2<f32>,
    a: usize,
    swaps: &[ClassSwap],
    channels: &[Vec<usize>],
    t: f32,
) -> Rows {
    let n = z.nrows();
    let mut rows = Rows::neutral(z.clone(), one_hot(&vec![a; n], g.classes.len()), &g.layers);
    let t = t as f64;
    for (l, chosen) in channels.iter().enumerate() {
        for &k in chosen {
            let (gain, offset) = (swaps[l].gain[k], swaps[l].offset[k]);
            for r in 0..n {
                rows.gates[l][[r, k]] = (1.0 + t * (gain - 1.0)) as f32;
                rows.shifts[l][[r, k]] = (t * offset) as f32;
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latents_are_standard_normal_and_reproducible() {
        let a: Vec<f32> = (0..400).flat_map(|s| latent(7, s, 63)).collect();
        let b: Vec<f32> = (0..400).flat_map(|s| latent(7, s, 63)).collect();
        assert_eq!(a, b);
        assert_ne!(latent(7, 0, 63), latent(8, 0, 63));
        assert_ne!(latent(7, 0, 63), latent(7, 1, 63));
        let n = a.len() as f64;
        let mean = a.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = a.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 1.0).abs() < 0.03, "{var}");
    }

    #[test]
    fn sums_give_the_pooled_scores() {
        // Two classes, one channel, two latents, two positions each.
        // class 0: latent values [1, 3] and [5, 7]; class 1: [0, 0] and [2, 2].
        let acts0 = ArrayD::from_shape_vec(IxDyn(&[2, 1, 2]), vec![1.0f32, 3.0, 0.0, 0.0]).unwrap();
        let acts1 = ArrayD::from_shape_vec(IxDyn(&[2, 1, 2]), vec![5.0f32, 7.0, 2.0, 2.0]).unwrap();
        let mut sums = LayerSums::new(2, 1);
        for acts in [&acts0, &acts1] {
            let (m, v) = position_moments(acts);
            sums.add(
                m.mapv(|x| x as f32).view(),
                v.mapv(|x| x as f32).view(),
                None,
            );
        }
        let s = sums.scores();
        let all = [1.0, 3.0, 5.0, 7.0, 0.0, 0.0, 2.0, 2.0f64];
        let mean = all.iter().sum::<f64>() / 8.0;
        let sd = (all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0).sqrt();
        assert!((s.class_mean[[0, 0]] - 4.0).abs() < 1e-12);
        assert!((s.channel_std[0] - sd).abs() < 1e-12);
        assert!((s.awareness[[0, 0]] - (4.0 - mean) / sd).abs() < 1e-12);
        assert!((s.awareness[[1, 0]] + (4.0 - mean) / sd).abs() < 1e-12);
        let within0 = ([1.0, 3.0, 5.0, 7.0f64]
            .iter()
            .map(|v| (v - 4.0).powi(2))
            .sum::<f64>()
            / 4.0)
            .sqrt();
        assert!((s.class_std[[0, 0]] - within0).abs() < 1e-12);
        assert!(s.suppression.is_none());
    }

    #[test]
    fn slugs_and_font() {
        assert_eq!(slug("T-shirt/top"), "t-shirt-top");
        assert_eq!(slug("Ankle boot"), "ankle-boot");
        for c in "T-SHIRT/TOP ANKLE BOOT'S 0.5 X3 -> 25% ABCDEFGHIJKLMNOPQRSTUVWXYZ".chars() {
            assert!(glyph(c).is_some(), "{c}");
        }
    }
}
