//! Region editing: latent directions that change one image region and little else, and the
//! stages that apply them.
//!
//! - `region-directions` (region-based semantic factorisation): Jacobians `J = dG(z)/dz` of
//!   the generator at a few codes, split by a region into rows inside (`J_f`) and outside
//!   (`J_b`); `M_f = J_fᵀJ_f / n_f`, `M_b = J_bᵀJ_b / n_b` averaged over the codes;
//!   `M_b += τ·trace(M_b)·I`; the directions solve `M_f v = λ M_b v`, sorted by `λ`, by
//!   Cholesky reduction to a symmetric eigenproblem. Also the top global direction (principal
//!   direction of `JᵀJ` over the whole image) and locality figures for both on fresh codes.
//! - `edit`: `G(z + d·v)` for chosen directions and strengths, and heat maps of the change.
//! - `resample`: redraws a named subset of latent axes (linked-axis control), optionally
//!   regenerating the images.
//!
//! Decisions:
//! - The factorisation is computed once per run and process, however many workers ask for it
//!   (a process-wide cache keyed by generator, region and settings), and attached to every
//!   record as a field, so `edit` can take directions from any upstream stage or file.
//! - Jacobians come from batched central differences by default: the latent has about 100
//!   axes and the image thousands of pixels, so `2·dim(z)` forward rows are far cheaper than
//!   one VJP per pixel. `jacobian: vjp` takes exact rows (one VJP per pixel, channels summed in
//!   the cotangent) for checking or for generators that finite differences treat badly.
//! - Channels are summed before the rows are split (`channels: sum`), as the method allows;
//!   `channels: all` keeps one row per channel and pixel.
//! - Everything linear-algebraic runs in f64 with nalgebra; eigenvectors are returned with
//!   unit length and the sign that makes their largest component positive, so results are
//!   reproducible.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use image::{Rgb, RgbImage};
use latentflow_engine::grad::fd::central_difference_jacobian;
use latentflow_engine::inference::Device;
use latentflow_engine::model::ModelPackage;
use latentflow_engine::value::stack;
use latentflow_engine::{
    Completion, Failure, FieldType, KindInfo, Outcome, ParamKind, ParamSpec, Params, Plan,
    PlanIssue, Record, Schema, Shape, Stage, StageContext, StageFactory, Tensor, Value,
};
use nalgebra::{Cholesky, DMatrix, SymmetricEigen};
use ndarray::{s, Array1, Array2, ArrayD, Axis, IxDyn};
use serde_json::{json, Value as Json};

use crate::image::{compose_grid, save_png, tensor_to_image};
use crate::invert::{GradientMode, Net};
use crate::onnx::device_of;

// ---------------------------------------------------------------------------------------------
// Regions

/// Which pixels of a `height × width` image belong to a region.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionMask {
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Row-major, `height × width`.
    pub inside: Vec<bool>,
    /// How the region was given, for reports.
    pub description: String,
}

impl RegionMask {
    /// The half-open box `[x0, x1) × [y0, y1)` in pixels.
    pub fn from_box(height: usize, width: usize, b: [usize; 4]) -> Result<RegionMask, String> {
        let [x0, y0, x1, y1] = b;
        if x0 >= x1 || y0 >= y1 || x1 > width || y1 > height {
            return Err(format!(
                "box [{x0}, {y0}, {x1}, {y1}] is not [x0, y0, x1, y1] with x0 < x1 <= {width} \
                 and y0 < y1 <= {height}"
            ));
        }
        let mut inside = vec![false; height * width];
        for y in y0..y1 {
            for x in x0..x1 {
                inside[y * width + x] = true;
            }
        }
        RegionMask::new(
            height,
            width,
            inside,
            format!("box [{x0}, {y0}, {x1}, {y1}]"),
        )
    }

    /// Pixels of a mask image that are not black, or, with `values`, pixels of a label map
    /// whose grey level is one of `values`; the image is resized (nearest) to the output size.
    pub fn from_image(
        path: &Path,
        values: Option<&[u8]>,
        height: usize,
        width: usize,
    ) -> Result<RegionMask, String> {
        let img = image::open(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .to_luma8();
        let img = if img.dimensions() != (width as u32, height as u32) {
            image::imageops::resize(
                &img,
                width as u32,
                height as u32,
                image::imageops::FilterType::Nearest,
            )
        } else {
            img
        };
        let inside = img
            .pixels()
            .map(|p| match values {
                Some(v) => v.contains(&p.0[0]),
                None => p.0[0] != 0,
            })
            .collect();
        let what = match values {
            Some(v) => format!("labels {v:?} of {}", path.display()),
            None => format!("mask {}", path.display()),
        };
        RegionMask::new(height, width, inside, what)
    }

    fn new(
        height: usize,
        width: usize,
        inside: Vec<bool>,
        description: String,
    ) -> Result<RegionMask, String> {
        let n = inside.iter().filter(|v| **v).count();
        if n == 0 || n == inside.len() {
            return Err(format!(
                "the region ({description}) must cover some pixels but not all of them"
            ));
        }
        Ok(RegionMask {
            height,
            width,
            inside,
            description,
        })
    }

    /// Pixels inside.
    pub fn count(&self) -> usize {
        self.inside.iter().filter(|v| **v).count()
    }
}

/// The region a stage's parameters name: exactly one of `box`, `mask`, `labels`.
fn region_of(params: &Params, height: usize, width: usize) -> Result<RegionMask, PlanIssue> {
    let given: Vec<&str> = ["box", "mask", "labels"]
        .into_iter()
        .filter(|p| params.get(p).is_some())
        .collect();
    match given.as_slice() {
        ["box"] => {
            let v = params.floats("box");
            if v.len() != 4 || v.iter().any(|x| *x < 0.0 || x.fract() != 0.0) {
                return Err(PlanIssue::param(
                    "box",
                    "`box` is four whole pixel coordinates [x0, y0, x1, y1]",
                ));
            }
            let b = [v[0] as usize, v[1] as usize, v[2] as usize, v[3] as usize];
            RegionMask::from_box(height, width, b).map_err(|e| {
                PlanIssue::param("box", e).hint(format!(
                    "the generator's images are {width} wide and {height} high"
                ))
            })
        }
        ["mask"] => {
            let path = params.path("mask").unwrap_or_default();
            RegionMask::from_image(&path, None, height, width)
                .map_err(|e| PlanIssue::param("mask", e))
        }
        ["labels"] => {
            let path = params.path("labels").unwrap_or_default();
            let values: Vec<u8> = params
                .floats("label_values")
                .iter()
                .map(|v| v.clamp(0.0, 255.0) as u8)
                .collect();
            if values.is_empty() {
                return Err(PlanIssue::param(
                    "label_values",
                    "a label map needs `label_values`: the grey levels that make the region",
                ));
            }
            RegionMask::from_image(&path, Some(&values), height, width)
                .map_err(|e| PlanIssue::param("labels", e))
        }
        [] => Err(PlanIssue::param("box", "no region given").hint(
            "give `box: [x0, y0, x1, y1]`, `mask: file.png`, or `labels: map.png` with \
             `label_values`",
        )),
        many => Err(PlanIssue::param(
            many[1],
            format!("give one region, not {}", many.join(" and ")),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Linear algebra

/// Solves `A v = λ B v` for symmetric `A` and symmetric positive definite `B` by Cholesky
/// reduction: with `B = L Lᵀ`, `C = L⁻¹ A L⁻ᵀ` is symmetric, `C u = λ u`, and `v = L⁻ᵀ u`.
/// Returns the eigenvalues in descending order and the eigenvectors as columns, normalised so
/// that `vᵀ B v = 1`.
pub fn generalized_symmetric_eigen(
    a: &DMatrix<f64>,
    b: &DMatrix<f64>,
) -> Result<(Vec<f64>, DMatrix<f64>), String> {
    let n = a.nrows();
    if a.ncols() != n || b.nrows() != n || b.ncols() != n {
        return Err("A and B must be square and of the same size".into());
    }
    let chol = Cholesky::new(b.clone())
        .ok_or("B is not positive definite (raise `tau`, the regularisation of M_b)")?;
    let l = chol.l();
    let la = l
        .solve_lower_triangular(a)
        .ok_or("the Cholesky factor of B is singular")?;
    let c = l
        .solve_lower_triangular(&la.transpose())
        .ok_or("the Cholesky factor of B is singular")?;
    let c = (&c + c.transpose()) * 0.5;
    let eig = SymmetricEigen::new(c);
    let v = l
        .transpose()
        .solve_upper_triangular(&eig.eigenvectors)
        .ok_or("the Cholesky factor of B is singular")?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    let values = order.iter().map(|&i| eig.eigenvalues[i]).collect();
    let mut vectors = DMatrix::zeros(n, n);
    for (k, &i) in order.iter().enumerate() {
        vectors.set_column(k, &v.column(i));
    }
    Ok((values, vectors))
}

/// `v / |v|`, with the sign that makes the largest-magnitude component positive.
fn unit_direction(v: &[f64]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
    let biggest = v
        .iter()
        .copied()
        .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
    let sign = if biggest < 0.0 { -1.0 } else { 1.0 };
    v.iter().map(|x| (sign * x / norm) as f32).collect()
}

fn to_dmatrix(m: &Array2<f64>) -> DMatrix<f64> {
    DMatrix::from_fn(m.nrows(), m.ncols(), |i, j| m[[i, j]])
}

// ---------------------------------------------------------------------------------------------
// Jacobians and the factorisation

/// How Jacobians of the generator are taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum JacobianSource {
    /// Batched central differences with this step, relative to `max(1, max |z|)`.
    FiniteDifference(f32),
    /// One VJP per pixel row (exact).
    Vjp,
}

/// Settings of a factorisation.
#[derive(Clone, Debug)]
pub struct FactorSettings {
    /// How Jacobians are taken.
    pub jacobian: JacobianSource,
    /// Sum the channels of each pixel before splitting rows by the region.
    pub sum_channels: bool,
    /// `M_b += tau · trace(M_b) · I`.
    pub tau: f64,
    /// Directions kept.
    pub top: usize,
}

impl Default for FactorSettings {
    fn default() -> Self {
        FactorSettings {
            jacobian: JacobianSource::FiniteDifference(1e-3),
            sum_channels: true,
            tau: 1e-3,
            top: 5,
        }
    }
}

/// The result of a factorisation.
#[derive(Clone, Debug)]
pub struct Directions {
    /// `[top, latent]`, unit rows, best first.
    pub vectors: Array2<f32>,
    /// The generalised eigenvalues of the rows of `vectors`.
    pub eigenvalues: Vec<f64>,
    /// The top principal direction of `JᵀJ` over the whole image (the global baseline).
    pub global: Array1<f32>,
    /// The codes the Jacobians were taken at.
    pub codes: usize,
    /// Seconds spent.
    pub seconds: f64,
}

/// The Jacobian of the generator's image at code `z` (one example, `[latent]`), as
/// `[rows, latent]` in f64: one row per pixel (channels summed) or per channel and pixel.
pub fn pixel_jacobian(
    net: &Net,
    z: &Array1<f32>,
    image_shape: &[usize],
    settings: &FactorSettings,
    max_batch: usize,
) -> Result<Array2<f64>, String> {
    let [c, h, w] = *image_shape else {
        return Err(format!(
            "the generator's image must be [C, H, W]; got {image_shape:?}"
        ));
    };
    let d = z.len();
    let full = match settings.jacobian {
        JacobianSource::FiniteDifference(step) => {
            let scale = z.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let f = |batch: ArrayD<f32>| net.forward(&batch);
            central_difference_jacobian(f, &z.clone().into_dyn(), step * scale, max_batch)?
        }
        JacobianSource::Vjp => {
            // Rows of the summed Jacobian come out directly from cotangents that are one on
            // every channel of a pixel.
            let rows = if settings.sum_channels {
                h * w
            } else {
                c * h * w
            };
            let mut jac = Array2::<f64>::zeros((rows, d));
            for start in (0..rows).step_by(max_batch.max(1)) {
                let count = max_batch.max(1).min(rows - start);
                let zs = z
                    .broadcast((count, d))
                    .expect("broadcast a row")
                    .to_owned()
                    .into_dyn();
                let mut cot = ArrayD::<f32>::zeros(IxDyn(&[count, c, h, w]));
                for r in 0..count {
                    let row = start + r;
                    if settings.sum_channels {
                        for ch in 0..c {
                            cot[[r, ch, row / w, row % w]] = 1.0;
                        }
                    } else {
                        let (ch, p) = (row / (h * w), row % (h * w));
                        cot[[r, ch, p / w, p % w]] = 1.0;
                    }
                }
                let g = net.vjp(&zs, &cot)?;
                for r in 0..count {
                    for k in 0..d {
                        jac[[start + r, k]] = g[[r, k]] as f64;
                    }
                }
            }
            return Ok(jac);
        }
    };
    if !settings.sum_channels {
        return Ok(full);
    }
    let mut summed = Array2::<f64>::zeros((h * w, d));
    for ch in 0..c {
        summed += &full.slice(s![ch * h * w..(ch + 1) * h * w, ..]);
    }
    Ok(summed)
}

/// `M_f`, `M_b` and `M` (whole image) of one Jacobian, each `Jᵀ J / rows`.
pub fn region_matrices(
    jac: &Array2<f64>,
    region: &RegionMask,
) -> (Array2<f64>, Array2<f64>, Array2<f64>) {
    let pixels = region.height * region.width;
    let inside = |row: usize| region.inside[row % pixels];
    let rows_in: Vec<usize> = (0..jac.nrows()).filter(|&r| inside(r)).collect();
    let rows_out: Vec<usize> = (0..jac.nrows()).filter(|&r| !inside(r)).collect();
    let gram = |rows: &[usize]| -> Array2<f64> {
        let j = jac.select(Axis(0), rows);
        j.t().dot(&j) / rows.len() as f64
    };
    let all = jac.t().dot(jac) / jac.nrows() as f64;
    (gram(&rows_in), gram(&rows_out), all)
}

/// Region directions from Jacobians at `codes` (`[n, latent]`).
pub fn factorise(
    net: &Net,
    codes: &Array2<f32>,
    image_shape: &[usize],
    region: &RegionMask,
    settings: &FactorSettings,
    max_batch: usize,
) -> Result<Directions, String> {
    let start = Instant::now();
    let d = codes.ncols();
    let (mut mf, mut mb, mut m) = (
        Array2::<f64>::zeros((d, d)),
        Array2::<f64>::zeros((d, d)),
        Array2::<f64>::zeros((d, d)),
    );
    for z in codes.rows() {
        let jac = pixel_jacobian(net, &z.to_owned(), image_shape, settings, max_batch)?;
        if jac.iter().any(|v| !v.is_finite()) {
            return Err("the generator's Jacobian has NaN or infinite entries".into());
        }
        let (f, b, a) = region_matrices(&jac, region);
        mf += &f;
        mb += &b;
        m += &a;
    }
    let n = codes.nrows().max(1) as f64;
    mf /= n;
    mb /= n;
    m /= n;
    let trace: f64 = mb.diag().sum();
    for i in 0..d {
        mb[[i, i]] += settings.tau * trace;
    }
    let (values, vectors) = generalized_symmetric_eigen(&to_dmatrix(&mf), &to_dmatrix(&mb))?;
    let top = settings.top.clamp(1, d);
    let mut out = Array2::<f32>::zeros((top, d));
    for k in 0..top {
        let col: Vec<f64> = vectors.column(k).iter().copied().collect();
        out.row_mut(k).assign(&Array1::from(unit_direction(&col)));
    }
    let global = SymmetricEigen::new(to_dmatrix(&m));
    let best = (0..d)
        .max_by(|&i, &j| global.eigenvalues[i].total_cmp(&global.eigenvalues[j]))
        .unwrap_or(0);
    let g: Vec<f64> = global.eigenvectors.column(best).iter().copied().collect();
    Ok(Directions {
        vectors: out,
        eigenvalues: values[..top].to_vec(),
        global: Array1::from(unit_direction(&g)),
        codes: codes.nrows(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// How much of an edit's change falls inside a region.
#[derive(Clone, Debug)]
pub struct Locality {
    /// Mean absolute change per pixel inside the region (channels summed).
    pub inside: f64,
    /// The same outside.
    pub outside: f64,
    /// Per-pixel mean absolute change, `[H, W]`.
    pub map: Array2<f64>,
}

impl Locality {
    /// `inside / outside`.
    pub fn ratio(&self) -> f64 {
        self.inside / self.outside.max(1e-300)
    }
}

/// The mean absolute change of `G(z ± strength·v) − G(z)` over `codes`.
pub fn locality(
    net: &Net,
    codes: &Array2<f32>,
    direction: &Array1<f32>,
    strength: f32,
    region: &RegionMask,
) -> Result<Locality, String> {
    let base = net.forward(&codes.clone().into_dyn())?;
    let (h, w) = (region.height, region.width);
    let mut map = Array2::<f64>::zeros((h, w));
    let mut count = 0.0;
    for sign in [1.0f32, -1.0] {
        let moved = codes + &(direction * (sign * strength));
        let out = net.forward(&moved.into_dyn())?;
        let diff = (&out - &base).mapv(|v| v.abs() as f64);
        // [n, C, H, W] -> sum over channels, mean over codes.
        for img in diff.outer_iter() {
            for ch in img.outer_iter() {
                let ch = ch
                    .into_dimensionality::<ndarray::Ix2>()
                    .map_err(|e| e.to_string())?;
                map += &ch;
            }
            count += 1.0;
        }
    }
    map /= count;
    let (mut sin, mut sout, mut nin, mut nout) = (0.0, 0.0, 0.0, 0.0);
    for (i, v) in map.iter().enumerate() {
        if region.inside[i] {
            sin += v;
            nin += 1.0;
        } else {
            sout += v;
            nout += 1.0;
        }
    }
    Ok(Locality {
        inside: sin / nin,
        outside: sout / nout,
        map,
    })
}

/// `n` codes of `dim` standard normal values from `seed` (SplitMix64 and Box–Muller), the same
/// on every machine.
pub fn normal_codes(n: usize, dim: usize, seed: u64) -> Array2<f32> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = state;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    Array2::from_shape_simple_fn((n, dim), || {
        let (u1, u2) = (next(), next());
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    })
}

/// A heat map of `map` (black → red → yellow → white, scaled to `max`) as an RGB image.
pub fn heat_image(map: &Array2<f64>, max: f64) -> RgbImage {
    let (h, w) = map.dim();
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let t = (map[[y as usize, x as usize]] / max.max(1e-300)).clamp(0.0, 1.0) * 3.0;
        let c = |v: f64| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        Rgb([c(t), c(t - 1.0), c(t - 2.0)])
    })
}

/// Draws the outline of `region` over `img` in `colour`.
fn outline(img: &mut RgbImage, region: &RegionMask, colour: [u8; 3]) {
    let (h, w) = (region.height, region.width);
    let at = |x: isize, y: isize| -> bool {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && region.inside[y as usize * w + x as usize]
    };
    for y in 0..h as isize {
        for x in 0..w as isize {
            if at(x, y) && !(at(x - 1, y) && at(x + 1, y) && at(x, y - 1) && at(x, y + 1)) {
                img.put_pixel(x as u32, y as u32, Rgb(colour));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// region-directions

/// Factory of the `region-directions` stage.
pub struct RegionDirectionsStage;

struct RegionWiring {
    generator: ModelPackage,
    /// `[C, H, W]` of one generated image.
    image_shape: Vec<usize>,
    latent: usize,
    region: RegionMask,
    settings: FactorSettings,
    samples: usize,
    seed: u64,
    codes: Option<PathBuf>,
    eval_samples: usize,
    eval_strength: f32,
    out: String,
}

fn fixed_dims(t: &latentflow_engine::model::TensorSpec) -> Option<Vec<usize>> {
    t.example_shape()
        .iter()
        .map(|d| match d {
            latentflow_engine::value::Dim::Fixed(n) => Some(*n),
            _ => None,
        })
        .collect()
}

/// The generator package named by `param`, with its latent size and image shape.
fn generator_of(
    params: &Params,
    param: &str,
) -> Result<(ModelPackage, usize, Vec<usize>), Vec<PlanIssue>> {
    let dir = params.path(param).unwrap_or_default();
    let g = ModelPackage::load(&dir).map_err(|e| {
        vec![PlanIssue::param(param, e.to_string())
            .hint("name a package folder holding manifest.json and the .onnx file")]
    })?;
    let m = g.manifest();
    let latent = fixed_dims(&m.inputs[0]).filter(|d| d.len() == 1);
    let image = fixed_dims(&m.outputs[0]).filter(|d| d.len() == 3);
    match (m.batch, latent, image) {
        (true, Some(l), Some(i)) => Ok((g, l[0], i)),
        _ => Err(vec![PlanIssue::param(
            param,
            format!(
                "`{}` is not a generator this stage can use: it needs a batch axis, a first \
                 input of fixed shape [latent] and a first output of fixed shape [C, H, W]",
                m.name
            ),
        )]),
    }
}

fn region_wiring(params: &Params) -> Result<RegionWiring, Vec<PlanIssue>> {
    let mut issues = Vec::new();
    for (p, min) in [
        ("samples", 1),
        ("top", 1),
        ("eval_samples", 0),
        ("max_batch", 2),
    ] {
        if params.int(p).is_some_and(|v| v < min) {
            issues.push(PlanIssue::param(p, format!("`{p}` must be at least {min}")));
        }
    }
    for p in ["tau", "fd_step"] {
        if params.float(p).is_some_and(|v| v <= 0.0) {
            issues.push(PlanIssue::param(p, format!("`{p}` must be positive")));
        }
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    let (generator, latent, image_shape) = generator_of(params, "generator")?;
    let region = region_of(params, image_shape[1], image_shape[2]).map_err(|issue| vec![issue])?;
    let settings = FactorSettings {
        jacobian: match params.str("jacobian") {
            Some("vjp") => JacobianSource::Vjp,
            _ => JacobianSource::FiniteDifference(params.float("fd_step").unwrap_or(1e-3) as f32),
        },
        sum_channels: params.str("channels") != Some("all"),
        tau: params.float("tau").unwrap_or(1e-3),
        top: (params.int("top").unwrap_or(5) as usize).min(latent),
    };
    Ok(RegionWiring {
        generator,
        image_shape,
        latent,
        region,
        settings,
        samples: params.int("samples").unwrap_or(5) as usize,
        seed: params.int("seed").unwrap_or(0) as u64,
        codes: params.path("codes"),
        eval_samples: params.int("eval_samples").unwrap_or(50) as usize,
        eval_strength: params.float("eval_strength").unwrap_or(3.0) as f32,
        out: params.str("out").unwrap_or("directions").to_string(),
    })
}

impl StageFactory for RegionDirectionsStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "region-directions",
            doc: "Region-based semantic factorisation: latent directions of a generator that \
                  change the given region (box, mask or label map) and as little else as \
                  possible, from Jacobians at a few codes; computed once per run and attached \
                  to every record. Writes <name>/ in the run folder: directions.npy, \
                  eigenvalues.npy, global.npy, region.json (settings, eigenvalues, locality \
                  against the top global direction on fresh codes) and locality.png.",
            params: vec![
                ParamSpec::required("generator", ParamKind::Path, "generator package (z -> image)"),
                ParamSpec::optional("box", ParamKind::FloatList, Json::Null, "region as [x0, y0, x1, y1] in output pixels (half-open)"),
                ParamSpec::optional("mask", ParamKind::Path, Json::Null, "region as an image: pixels that are not black (resized to the output)"),
                ParamSpec::optional("labels", ParamKind::Path, Json::Null, "region as a label map image, with `label_values`"),
                ParamSpec::optional("label_values", ParamKind::FloatList, Json::Null, "grey levels of the label map that make the region"),
                ParamSpec::optional("codes", ParamKind::Path, Json::Null, ".npy of codes [n, latent] to take Jacobians at (default: `samples` normal codes)"),
                ParamSpec::optional("samples", ParamKind::Int, json!(5), "normal codes to take Jacobians at"),
                ParamSpec::optional("seed", ParamKind::Int, json!(0), "seed of the sampled codes (evaluation codes use seed + 1)"),
                ParamSpec::optional("top", ParamKind::Int, json!(5), "directions kept, best first"),
                ParamSpec::optional("tau", ParamKind::Float, json!(1e-3), "regularisation: M_b += tau * trace(M_b) * I"),
                ParamSpec::optional("jacobian", ParamKind::Choice(&["fd", "vjp"]), json!("fd"), "batched central differences (2 x latent rows per code) or one exact VJP per pixel"),
                ParamSpec::optional("fd_step", ParamKind::Float, json!(1e-3), "finite-difference step, relative to max(1, max |z|)"),
                ParamSpec::optional("channels", ParamKind::Choice(&["sum", "all"]), json!("sum"), "sum the channels of each pixel, or keep a row per channel"),
                ParamSpec::optional("eval_samples", ParamKind::Int, json!(50), "fresh codes the locality figures are measured on (0: none)"),
                ParamSpec::optional("eval_strength", ParamKind::Float, json!(3.0), "edit strength of the locality figures (both signs)"),
                ParamSpec::optional("out", ParamKind::String, json!("directions"), "field for the directions [top, latent]; eigenvalues go to <out>_eigenvalues"),
                ParamSpec::optional("device", ParamKind::Choice(&["cpu", "cuda", "auto"]), json!("auto"), "where the generator runs"),
                ParamSpec::optional("threads", ParamKind::Int, json!(0), "ONNX Runtime intra-op threads (0: its default)"),
                ParamSpec::optional("max_batch", ParamKind::Int, json!(64), "rows per model call"),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let w = region_wiring(params)?;
        let top = w.settings.top;
        Ok(Plan::default()
            .write(&w.out, FieldType::f32(Shape::fixed(&[top, w.latent])))
            .write(
                &format!("{}_eigenvalues", w.out),
                FieldType::f32(Shape::fixed(&[top])),
            ))
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        let w = region_wiring(params)?;
        w.generator.check().map_err(|e| {
            vec![PlanIssue::param("generator", e.to_string())
                .hint("run `latentflow models check <dir>` for details")]
        })?;
        if let Some(p) = &w.codes {
            let codes = read_codes(p).map_err(|e| vec![PlanIssue::param("codes", e)])?;
            if codes.ncols() != w.latent {
                return Err(vec![PlanIssue::param(
                    "codes",
                    format!(
                        "{} holds codes of {} values; the generator takes {}",
                        p.display(),
                        codes.ncols(),
                        w.latent
                    ),
                )]);
            }
        }
        Ok(())
    }

    fn build(&self, params: &Params, cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let w = region_wiring(params).map_err(|i| i[0].message.clone())?;
        let key = format!(
            "{}|{}|{:?}|{}|{}|{:?}|{}|{}|{}|{}",
            w.generator.manifest().sha256,
            cx.out_dir.join(&cx.name).display(),
            w.settings,
            w.samples,
            w.seed,
            w.codes,
            w.eval_samples,
            w.eval_strength,
            w.region.description,
            w.region.count()
        );
        let cell = {
            static CACHE: OnceLock<Mutex<HashMap<String, Shared>>> = OnceLock::new();
            let mut map = CACHE
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            map.entry(key).or_default().clone()
        };
        let device = device_of(params)?;
        let threads = params.int("threads").unwrap_or(0) as usize;
        let max_batch = params.int("max_batch").unwrap_or(64) as usize;
        let factored = cell
            .get_or_init(|| {
                compute_and_save(&w, device, threads, max_batch, &cx.out_dir.join(&cx.name))
                    .map(Arc::new)
            })
            .clone()
            .map_err(|e| format!("region directions: {e}"))?;
        Ok(Box::new(AttachDirections {
            out: w.out,
            directions: Tensor::f32(factored.directions.vectors.clone().into_dyn()),
            eigenvalues: Tensor::f32(
                Array1::from_iter(factored.directions.eigenvalues.iter().map(|v| *v as f32))
                    .into_dyn(),
            ),
        }))
    }
}

fn read_codes(path: &Path) -> Result<Array2<f32>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let a: ArrayD<f32> = ndarray_npy::ReadNpyExt::read_npy(file)
        .map_err(|e| format!("{} is not an f32 .npy: {e}", path.display()))?;
    a.into_dimensionality::<ndarray::Ix2>()
        .map_err(|_| format!("{} must hold codes [n, latent]", path.display()))
}

/// One factorisation, computed by the first worker that asks and shared with the others.
type Shared = Arc<OnceLock<Result<Arc<Factored>, String>>>;

/// Edited images and heat maps of one record.
type EditOutputs = (ArrayD<f32>, ArrayD<f32>);

/// A factorisation with its evaluation.
struct Factored {
    directions: Directions,
}

fn compute_and_save(
    w: &RegionWiring,
    device: Device,
    threads: usize,
    max_batch: usize,
    dir: &Path,
) -> Result<Factored, String> {
    let mode = match w.settings.jacobian {
        JacobianSource::Vjp => GradientMode::Vjp,
        JacobianSource::FiniteDifference(_) => GradientMode::FiniteDifference,
    };
    let net = Net::open(&w.generator, None, mode, device, threads, max_batch)?;
    let codes = match &w.codes {
        Some(p) => read_codes(p)?,
        None => normal_codes(w.samples, w.latent, w.seed),
    };
    let directions = factorise(
        &net,
        &codes,
        &w.image_shape,
        &w.region,
        &w.settings,
        max_batch,
    )?;
    tracing::info!(
        region = %w.region.description,
        codes = codes.nrows(),
        seconds = directions.seconds,
        "region directions computed"
    );
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let save = |name: &str, a: ArrayD<f32>| -> Result<(), String> {
        let path = dir.join(name);
        let file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        ndarray_npy::WriteNpyExt::write_npy(&a, std::io::BufWriter::new(file))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    save("directions.npy", directions.vectors.clone().into_dyn())?;
    save(
        "eigenvalues.npy",
        Array1::from_iter(directions.eigenvalues.iter().map(|v| *v as f32)).into_dyn(),
    )?;
    save("global.npy", directions.global.clone().into_dyn())?;
    let mut report = json!({
        "generator": w.generator.manifest().name,
        "generator_sha256": w.generator.manifest().sha256,
        "region": w.region.description,
        "region_pixels": w.region.count(),
        "image_pixels": w.region.height * w.region.width,
        "codes": codes.nrows(),
        "jacobian": match w.settings.jacobian {
            JacobianSource::Vjp => "vjp".to_string(),
            JacobianSource::FiniteDifference(h) => format!("fd (step {h})"),
        },
        "channels": if w.settings.sum_channels { "sum" } else { "all" },
        "tau": w.settings.tau,
        "eigenvalues": directions.eigenvalues,
        "seconds": directions.seconds,
    });
    if w.eval_samples > 0 {
        let eval = normal_codes(w.eval_samples, w.latent, w.seed.wrapping_add(1));
        let top = directions.vectors.row(0).to_owned();
        let ours = locality(&net, &eval, &top, w.eval_strength, &w.region)?;
        let global = locality(&net, &eval, &directions.global, w.eval_strength, &w.region)?;
        report["locality"] = json!({
            "codes": w.eval_samples,
            "strength": w.eval_strength,
            "top_direction": {"inside": ours.inside, "outside": ours.outside, "ratio": ours.ratio()},
            "global_direction": {"inside": global.inside, "outside": global.outside, "ratio": global.ratio()},
            "gain_over_global": ours.ratio() / global.ratio().max(1e-300),
        });
        // Mean generated image with the region outlined | change by the top direction |
        // change by the global direction.
        let mean_image = net
            .forward(&eval.clone().into_dyn())?
            .mean_axis(Axis(0))
            .ok_or("no evaluation codes")?;
        let range = w.generator.manifest().outputs[0]
            .range
            .map(|r| [r[0] as f32, r[1] as f32])
            .unwrap_or([-1.0, 1.0]);
        let mut face = tensor_to_image(&mean_image, range)?;
        outline(&mut face, &w.region, [0, 255, 0]);
        // Each map on its own scale: the global direction changes far more in total.
        let peak = |m: &Array2<f64>| m.iter().fold(0.0f64, |a, v| a.max(*v));
        let mut heat_ours = heat_image(&ours.map, peak(&ours.map));
        let mut heat_global = heat_image(&global.map, peak(&global.map));
        outline(&mut heat_ours, &w.region, [0, 160, 255]);
        outline(&mut heat_global, &w.region, [0, 160, 255]);
        if let Some(sheet) = compose_grid(&[vec![face, heat_ours, heat_global]], 4) {
            save_png(&sheet, &dir.join("locality.png"))?;
        }
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("region.json"), text + "\n")
        .map_err(|e| format!("cannot write {}: {e}", dir.join("region.json").display()))?;
    Ok(Factored { directions })
}

struct AttachDirections {
    out: String,
    directions: Tensor,
    eigenvalues: Tensor,
}

impl Stage for AttachDirections {
    fn process(&mut self, batch: Vec<Record>, _cx: &StageContext) -> Completion {
        Completion::Ready(
            batch
                .into_iter()
                .map(|mut r| {
                    r.set(&self.out, Value::Tensor(self.directions.clone()));
                    r.set(
                        &format!("{}_eigenvalues", self.out),
                        Value::Tensor(self.eigenvalues.clone()),
                    );
                    Ok(r)
                })
                .collect(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// edit

/// Factory of the `edit` stage.
pub struct EditStage;

struct EditWiring {
    generator: ModelPackage,
    latent: usize,
    image_shape: Vec<usize>,
    z: String,
    directions: String,
    /// Ranks of the directions used.
    use_: Vec<usize>,
    strengths: Vec<f32>,
    out: String,
    heat: String,
}

fn edit_wiring(params: &Params) -> Result<EditWiring, Vec<PlanIssue>> {
    let (generator, latent, image_shape) = generator_of(params, "generator")?;
    let use_f = params.floats("use");
    if use_f.is_empty() || use_f.iter().any(|v| *v < 0.0 || v.fract() != 0.0) {
        return Err(vec![PlanIssue::param(
            "use",
            "`use` lists direction ranks: whole numbers from 0 (the best direction)",
        )]);
    }
    let strengths: Vec<f32> = params
        .floats("strengths")
        .iter()
        .map(|v| *v as f32)
        .collect();
    if strengths.is_empty() {
        return Err(vec![PlanIssue::param(
            "strengths",
            "list at least one edit strength, e.g. [-6, -3, 0, 3, 6]",
        )]);
    }
    let field = |p: &str, d: &str| params.str(p).unwrap_or(d).to_string();
    Ok(EditWiring {
        generator,
        latent,
        image_shape,
        z: field("z", "z"),
        directions: field("directions", "directions"),
        use_: use_f.iter().map(|v| *v as usize).collect(),
        strengths,
        out: field("out", "edits"),
        heat: field("heat", "edit_heat"),
    })
}

impl StageFactory for EditStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "edit",
            doc: "Moves codes along latent directions and regenerates: for each direction rank \
                  in `use` and each strength d, G(z + d v). Writes the edited images \
                  [len(use) x len(strengths), C, H, W] (direction-major) and, per direction, a \
                  heat map of where the strongest edit changed the image (black: no change, \
                  white: a quarter of the value range on every channel), in the generator's \
                  image range.",
            params: vec![
                ParamSpec::required(
                    "generator",
                    ParamKind::Path,
                    "generator package (z -> image)",
                ),
                ParamSpec::optional("z", ParamKind::Field, json!("z"), "code field"),
                ParamSpec::optional(
                    "directions",
                    ParamKind::Field,
                    json!("directions"),
                    "directions field [k, latent] (e.g. from region-directions)",
                ),
                ParamSpec::optional(
                    "use",
                    ParamKind::FloatList,
                    json!([0]),
                    "ranks of the directions applied",
                ),
                ParamSpec::optional(
                    "strengths",
                    ParamKind::FloatList,
                    json!([-6.0, -3.0, 0.0, 3.0, 6.0]),
                    "edit strengths d",
                ),
                ParamSpec::optional(
                    "out",
                    ParamKind::String,
                    json!("edits"),
                    "field for the edited images",
                ),
                ParamSpec::optional(
                    "heat",
                    ParamKind::String,
                    json!("edit_heat"),
                    "field for the change heat maps [len(use), 3, H, W]",
                ),
                ParamSpec::optional(
                    "device",
                    ParamKind::Choice(&["cpu", "cuda", "auto"]),
                    json!("auto"),
                    "where the generator runs",
                ),
                ParamSpec::optional(
                    "threads",
                    ParamKind::Int,
                    json!(1),
                    "ONNX Runtime intra-op threads per worker",
                ),
                ParamSpec::optional(
                    "max_batch",
                    ParamKind::Int,
                    json!(64),
                    "rows per model call",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let w = edit_wiring(params)?;
        let [c, h, wd] = w.image_shape[..] else {
            unreachable!("checked by generator_of")
        };
        let n = w.use_.len() * w.strengths.len();
        Ok(Plan::default()
            .read(&w.z, FieldType::f32(Shape::fixed(&[w.latent])), &["z"])
            .read(&w.directions, FieldType::f32(Shape::any()), &["directions"])
            .write(&w.out, FieldType::f32(Shape::fixed(&[n, c, h, wd])))
            .write(
                &w.heat,
                FieldType::f32(Shape::fixed(&[w.use_.len(), 3, h, wd])),
            ))
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        let w = edit_wiring(params)?;
        w.generator.check().map_err(|e| {
            vec![PlanIssue::param("generator", e.to_string())
                .hint("run `latentflow models check <dir>` for details")]
        })
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let w = edit_wiring(params).map_err(|i| i[0].message.clone())?;
        let device = device_of(params)?;
        let threads = params.int("threads").unwrap_or(1).max(1) as usize;
        let max_batch = params.int("max_batch").unwrap_or(64).max(1) as usize;
        let net = Net::open(
            &w.generator,
            None,
            GradientMode::FiniteDifference,
            device,
            threads,
            max_batch,
        )?;
        let range = w.generator.manifest().outputs[0]
            .range
            .map(|r| [r[0] as f32, r[1] as f32])
            .unwrap_or([-1.0, 1.0]);
        Ok(Box::new(EditRunner { w, net, range }))
    }
}

struct EditRunner {
    w: EditWiring,
    net: Net,
    range: [f32; 2],
}

impl EditRunner {
    /// Edited images and heat maps for a batch of records, in one model call per chunk.
    fn run(&self, records: &[Record]) -> Result<Vec<EditOutputs>, String> {
        let w = &self.w;
        let (k, s) = (w.use_.len(), w.strengths.len());
        let d = w.latent;
        let mut rows = Array2::<f32>::zeros((records.len() * k * s, d));
        for (i, r) in records.iter().enumerate() {
            let z = r.tensor(&w.z)?.as_f32().ok_or("codes are f32")?;
            let dirs = r
                .tensor(&w.directions)?
                .as_f32()
                .ok_or("directions are f32")?;
            let dirs = dirs
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|_| format!("`{}` must be [k, latent]", w.directions))?;
            if dirs.ncols() != d || z.len() != d {
                return Err(format!(
                    "codes and directions must have {d} values; got {} and {}",
                    z.len(),
                    dirs.ncols()
                ));
            }
            for (a, &rank) in w.use_.iter().enumerate() {
                if rank >= dirs.nrows() {
                    return Err(format!(
                        "direction rank {rank} asked for, but `{}` holds {}",
                        w.directions,
                        dirs.nrows()
                    ));
                }
                for (b, &st) in w.strengths.iter().enumerate() {
                    let mut row = rows.row_mut((i * k + a) * s + b);
                    for j in 0..d {
                        row[j] = z[[j]] + st * dirs[[rank, j]];
                    }
                }
            }
        }
        let images = self.net.forward(&rows.into_dyn())?;
        let base = {
            let zs: Vec<&ArrayD<f32>> = records
                .iter()
                .map(|r| r.tensor(&w.z).and_then(|t| t.as_f32().ok_or("f32".into())))
                .collect::<Result<_, _>>()?;
            let z = stack(&zs).ok_or("codes differ in shape")?;
            self.net.forward(&z)?
        };
        let strongest = w
            .strengths
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let [c, h, wd] = w.image_shape[..] else {
            unreachable!("checked by generator_of")
        };
        let mut out = Vec::with_capacity(records.len());
        for i in 0..records.len() {
            let edits = images
                .slice_axis(Axis(0), (i * k * s..(i + 1) * k * s).into())
                .to_owned();
            let mut heat = ArrayD::<f32>::zeros(IxDyn(&[k, 3, h, wd]));
            for a in 0..k {
                let edited = edits.index_axis(Axis(0), a * s + strongest);
                let diff = (&edited - &base.index_axis(Axis(0), i)).mapv(|v| v.abs() as f64);
                let map = diff.sum_axis(Axis(0));
                let map = map
                    .into_dimensionality::<ndarray::Ix2>()
                    .map_err(|e| e.to_string())?;
                // One fixed scale for every record and direction, so heat maps compare: white
                // is a change of a quarter of the value range on every channel.
                let max = 0.25 * c as f64 * (self.range[1] - self.range[0]) as f64;
                let img = heat_image(&map, max);
                for (x, y, p) in img.enumerate_pixels() {
                    for ch in 0..3 {
                        let u = p.0[ch] as f32 / 255.0;
                        heat[[a, ch, y as usize, x as usize]] =
                            self.range[0] + u * (self.range[1] - self.range[0]);
                    }
                }
            }
            out.push((edits, heat));
        }
        Ok(out)
    }
}

impl Stage for EditRunner {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        let result = self.run(&batch);
        Completion::Ready(match result {
            Ok(parts) => batch
                .into_iter()
                .zip(parts)
                .map(|(mut r, (edits, heat))| {
                    r.set(&self.w.out, Value::Tensor(Tensor::f32(edits)));
                    r.set(&self.w.heat, Value::Tensor(Tensor::f32(heat)));
                    Ok(r)
                })
                .collect(),
            Err(e) => batch
                .iter()
                .map(|r| Err(Failure::of(r, &cx.name, format!("edit failed: {e}"))))
                .collect(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// resample

/// Factory of the `resample` stage.
pub struct ResampleStage;

struct ResampleWiring {
    generator: Option<ModelPackage>,
    latent: Option<usize>,
    image_shape: Option<Vec<usize>>,
    z: String,
    axes: Vec<usize>,
    count: usize,
    seed: u64,
    out_z: String,
    out_image: String,
}

fn resample_wiring(params: &Params) -> Result<ResampleWiring, Vec<PlanIssue>> {
    let mut axes: Vec<usize> = Vec::new();
    for v in params.floats("axes") {
        if v < 0.0 || v.fract() != 0.0 {
            return Err(vec![PlanIssue::param(
                "axes",
                "`axes` lists latent axis indices: whole numbers from 0",
            )]);
        }
        axes.push(v as usize);
    }
    let span = params.floats("axes_range");
    if !span.is_empty() {
        if span.len() != 2 || span[0] < 0.0 || span[1] <= span[0] {
            return Err(vec![PlanIssue::param(
                "axes_range",
                "`axes_range` is [first, end) with first < end",
            )]);
        }
        axes.extend(span[0] as usize..span[1] as usize);
    }
    axes.sort_unstable();
    axes.dedup();
    if axes.is_empty() {
        return Err(vec![PlanIssue::param(
            "axes",
            "name the latent axes to redraw, with `axes: [..]` or `axes_range: [first, end)`",
        )]);
    }
    if params.int("count").is_some_and(|v| v < 1) {
        return Err(vec![PlanIssue::param(
            "count",
            "`count` must be at least 1",
        )]);
    }
    let (generator, latent, image_shape) = if params.get("generator").is_some() {
        let (g, l, i) = generator_of(params, "generator")?;
        if let Some(&bad) = axes.iter().find(|&&a| a >= l) {
            return Err(vec![PlanIssue::param(
                "axes",
                format!("axis {bad} is outside the generator's latent of {l} values"),
            )]);
        }
        (Some(g), Some(l), Some(i))
    } else {
        (None, None, None)
    };
    let field = |p: &str, d: &str| params.str(p).unwrap_or(d).to_string();
    Ok(ResampleWiring {
        generator,
        latent,
        image_shape,
        z: field("z", "z"),
        axes,
        count: params.int("count").unwrap_or(4) as usize,
        seed: params.int("seed").unwrap_or(0) as u64,
        out_z: field("out_z", "z_resampled"),
        out_image: field("out_image", "resampled"),
    })
}

impl StageFactory for ResampleStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "resample",
            doc: "Linked-axis control: redraws the named latent axes from a standard normal, \
                  `count` times per record (the other axes kept), seeded by `seed` and the \
                  record's key so results do not depend on workers. With a generator, also \
                  writes the images of the resampled codes.",
            params: vec![
                ParamSpec::optional(
                    "generator",
                    ParamKind::Path,
                    Json::Null,
                    "generator package; when given, the resampled codes are generated",
                ),
                ParamSpec::optional("z", ParamKind::Field, json!("z"), "code field"),
                ParamSpec::optional(
                    "axes",
                    ParamKind::FloatList,
                    json!([]),
                    "latent axes to redraw",
                ),
                ParamSpec::optional(
                    "axes_range",
                    ParamKind::FloatList,
                    json!([]),
                    "or a span of axes [first, end)",
                ),
                ParamSpec::optional("count", ParamKind::Int, json!(4), "resamples per record"),
                ParamSpec::optional("seed", ParamKind::Int, json!(0), "seed"),
                ParamSpec::optional(
                    "out_z",
                    ParamKind::String,
                    json!("z_resampled"),
                    "field for the codes [count, latent]",
                ),
                ParamSpec::optional(
                    "out_image",
                    ParamKind::String,
                    json!("resampled"),
                    "field for the images [count, C, H, W] (with a generator)",
                ),
                ParamSpec::optional(
                    "device",
                    ParamKind::Choice(&["cpu", "cuda", "auto"]),
                    json!("auto"),
                    "where the generator runs",
                ),
                ParamSpec::optional(
                    "threads",
                    ParamKind::Int,
                    json!(1),
                    "ONNX Runtime intra-op threads per worker",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let w = resample_wiring(params)?;
        let z_shape = match w.latent {
            Some(l) => Shape::fixed(&[l]),
            None => Shape::any(),
        };
        let mut plan = Plan::default().read(&w.z, FieldType::f32(z_shape), &["z"]);
        plan = match w.latent {
            Some(l) => plan.write(&w.out_z, FieldType::f32(Shape::fixed(&[w.count, l]))),
            None => plan.write(&w.out_z, FieldType::f32(Shape::any())),
        };
        if let Some(i) = &w.image_shape {
            plan = plan.write(
                &w.out_image,
                FieldType::f32(Shape::fixed(&[w.count, i[0], i[1], i[2]])),
            );
        }
        Ok(plan)
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        let w = resample_wiring(params)?;
        if let Some(g) = &w.generator {
            g.check()
                .map_err(|e| vec![PlanIssue::param("generator", e.to_string())])?;
        }
        Ok(())
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let w = resample_wiring(params).map_err(|i| i[0].message.clone())?;
        let device = device_of(params)?;
        let threads = params.int("threads").unwrap_or(1).max(1) as usize;
        let net = match &w.generator {
            Some(g) => Some(Net::open(
                g,
                None,
                GradientMode::FiniteDifference,
                device,
                threads,
                64,
            )?),
            None => None,
        };
        Ok(Box::new(ResampleRunner { w, net }))
    }
}

struct ResampleRunner {
    w: ResampleWiring,
    net: Option<Net>,
}

/// FNV-1a of a record key, to seed per-record draws.
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl ResampleRunner {
    fn one(&self, r: &Record) -> Result<(ArrayD<f32>, Option<ArrayD<f32>>), String> {
        let z = r.tensor(&self.w.z)?.as_f32().ok_or("codes are f32")?;
        let z = z.iter().copied().collect::<Array1<f32>>();
        if let Some(&bad) = self.w.axes.iter().find(|&&a| a >= z.len()) {
            return Err(format!(
                "axis {bad} is outside the code of {} values",
                z.len()
            ));
        }
        let draws = normal_codes(
            self.w.count,
            self.w.axes.len(),
            self.w.seed ^ key_hash(&r.key),
        );
        let mut codes = Array2::<f32>::zeros((self.w.count, z.len()));
        for (i, mut row) in codes.rows_mut().into_iter().enumerate() {
            row.assign(&z);
            for (j, &a) in self.w.axes.iter().enumerate() {
                row[a] = draws[[i, j]];
            }
        }
        let images = match &self.net {
            Some(n) => Some(n.forward(&codes.clone().into_dyn())?),
            None => None,
        };
        Ok((codes.into_dyn(), images))
    }
}

impl Stage for ResampleRunner {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        Completion::Ready(
            batch
                .into_iter()
                .map(|mut r| match self.one(&r) {
                    Ok((codes, images)) => {
                        r.set(&self.w.out_z, Value::Tensor(Tensor::f32(codes)));
                        if let Some(i) = images {
                            r.set(&self.w.out_image, Value::Tensor(Tensor::f32(i)));
                        }
                        Ok(r)
                    }
                    Err(e) => Err(Failure::of(&r, &cx.name, format!("resample failed: {e}"))),
                })
                .collect::<Vec<Outcome>>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_and_their_errors() {
        let m = RegionMask::from_box(4, 6, [1, 2, 3, 4]).unwrap();
        assert_eq!(m.count(), 4);
        assert!(m.inside[2 * 6 + 1] && m.inside[3 * 6 + 2] && !m.inside[6 + 1]);
        assert!(RegionMask::from_box(4, 6, [3, 0, 3, 2]).is_err());
        assert!(RegionMask::from_box(4, 6, [0, 0, 7, 2]).is_err());
        assert!(
            RegionMask::from_box(4, 6, [0, 0, 6, 4]).is_err(),
            "the whole image"
        );
    }

    #[test]
    fn normal_codes_are_standard_and_reproducible() {
        let a = normal_codes(200, 50, 7);
        assert_eq!(a, normal_codes(200, 50, 7));
        assert_ne!(a, normal_codes(200, 50, 8));
        let n = a.len() as f64;
        let mean = a.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = a.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn unit_directions_have_a_fixed_sign() {
        let v = unit_direction(&[0.5, -2.0, 1.0]);
        let w = unit_direction(&[-0.5, 2.0, -1.0]);
        assert_eq!(v, w);
        assert!(v[1] > 0.0);
        let norm: f32 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-6);
    }
}
