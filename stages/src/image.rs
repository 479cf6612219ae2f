//! Images in and out: a folder-of-images source, a PNG-per-record sink, and contact sheets.
//!
//! Tensors hold images channel-first (`[C, H, W]`, C = 1 or 3), with values in a declared
//! `range` — the range a model's manifest gives (`[-1, 1]` for most generators). Reading maps
//! 8-bit pixels linearly onto that range; writing maps it back and clamps. Images are resized
//! by cropping the centre to the target aspect ratio and resampling with a Lanczos filter, so
//! faces are not stretched.

use std::path::{Path, PathBuf};

use image::{imageops, DynamicImage, ImageBuffer, Rgb, RgbImage};
use latentflow_engine::stage::KindInfo;
use latentflow_engine::{
    DType, Failure, FieldType, Outcome, ParamKind, ParamSpec, Params, Plan, PlanIssue, Record,
    Schema, Shape, Sink, SinkFactory, Source, SourceFactory, Tensor, Value,
};
use ndarray::{ArrayD, IxDyn};
use serde_json::{json, Value as Json};

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

fn range_of(params: &Params, default: [f64; 2]) -> Result<[f32; 2], PlanIssue> {
    let r = params.floats("range");
    match r.as_slice() {
        [] => Ok([default[0] as f32, default[1] as f32]),
        [lo, hi] if hi > lo => Ok([*lo as f32, *hi as f32]),
        _ => Err(PlanIssue::param(
            "range",
            "`range` must be two numbers [low, high] with low < high",
        )),
    }
}

/// Converts an 8-bit image to a `[C, H, W]` tensor with values in `range`.
pub fn image_to_tensor(img: &DynamicImage, channels: usize, range: [f32; 2]) -> ArrayD<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let scale = (range[1] - range[0]) / 255.0;
    let mut out = ArrayD::zeros(IxDyn(&[channels, h, w]));
    if channels == 1 {
        let g = img.to_luma8();
        for (x, y, p) in g.enumerate_pixels() {
            out[[0, y as usize, x as usize]] = range[0] + p[0] as f32 * scale;
        }
    } else {
        let rgb = img.to_rgb8();
        for (x, y, p) in rgb.enumerate_pixels() {
            for c in 0..3 {
                out[[c, y as usize, x as usize]] = range[0] + p[c] as f32 * scale;
            }
        }
    }
    out
}

/// Converts a `[C, H, W]` or `[H, W]` tensor with values in `range` to an 8-bit RGB image.
pub fn tensor_to_image(t: &ArrayD<f32>, range: [f32; 2]) -> Result<RgbImage, String> {
    let (c, h, w) = match t.shape() {
        [c @ (1 | 3), h, w] => (*c, *h, *w),
        [h, w] => (1, *h, *w),
        s => {
            return Err(format!(
                "an image tensor is [C, H, W] with C = 1 or 3, or [H, W]; got {s:?}"
            ))
        }
    };
    let flat = t.as_standard_layout();
    let data = flat.as_slice().expect("standard layout");
    let to8 = |v: f32| -> u8 {
        let u = (v - range[0]) / (range[1] - range[0]);
        (u.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    Ok(ImageBuffer::from_fn(w as u32, h as u32, |x, y| {
        let at = |ch: usize| data[ch * h * w + y as usize * w + x as usize];
        if c == 1 {
            let g = to8(at(0));
            Rgb([g, g, g])
        } else {
            Rgb([to8(at(0)), to8(at(1)), to8(at(2))])
        }
    }))
}

fn load_image(path: &Path, size: Option<(u32, u32)>, crop: bool) -> Result<DynamicImage, String> {
    let img = image::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(match size {
        None => img,
        Some((h, w)) if img.width() == w && img.height() == h => img,
        Some((h, w)) if crop => img.resize_to_fill(w, h, imageops::FilterType::Lanczos3),
        Some((h, w)) => img.resize_exact(w, h, imageops::FilterType::Lanczos3),
    })
}

/// A folder of PNG or JPEG images, one record per file (in file-name order).
pub struct ImageFolder;

struct Folder {
    files: Vec<PathBuf>,
    field: String,
    channels: usize,
    size: (u32, u32),
    crop: bool,
    range: [f32; 2],
}

fn open_folder(params: &Params) -> Result<Folder, Vec<PlanIssue>> {
    let dir = params.path("path").unwrap_or_default();
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        vec![
            PlanIssue::param("path", format!("cannot list {}: {e}", dir.display()))
                .hint("`path` names a folder of .png/.jpg files, relative to the pipeline file"),
        ]
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(vec![PlanIssue::param(
            "path",
            format!("{} holds no .png or .jpg files", dir.display()),
        )]);
    }
    let channels = params.int("channels").unwrap_or(3);
    if channels != 1 && channels != 3 {
        return Err(vec![PlanIssue::param(
            "channels",
            "`channels` must be 1 or 3",
        )]);
    }
    let range = range_of(params, [0.0, 1.0]).map_err(|e| vec![e])?;
    let size = match params.floats("size").as_slice() {
        [h, w] if *h >= 1.0 && *w >= 1.0 => (*h as u32, *w as u32),
        [] => {
            // Without `size`, the first image fixes the shape; others must match it.
            let first = image::image_dimensions(&files[0]).map_err(|e| {
                vec![PlanIssue::param(
                    "path",
                    format!("{}: {e}", files[0].display()),
                )]
            })?;
            (first.1, first.0)
        }
        _ => {
            return Err(vec![PlanIssue::param(
                "size",
                "`size` must be [height, width]",
            )])
        }
    };
    if let Some(l) = params.int("limit") {
        files.truncate(l.max(0) as usize);
    }
    Ok(Folder {
        files,
        field: params.str("field").unwrap_or("image").to_string(),
        channels: channels as usize,
        size,
        crop: params.str("fit") != Some("stretch"),
        range,
    })
}

impl SourceFactory for ImageFolder {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "images",
            doc: "Reads a folder of PNG/JPEG files (sorted by name) into [C, H, W] float tensors \
                  with values mapped onto `range`; resizes to `size` by centre-crop (or stretch). \
                  A file that cannot be decoded fails alone.",
            params: vec![
                ParamSpec::required("path", ParamKind::Path, "folder of images"),
                ParamSpec::optional("field", ParamKind::String, json!("image"), "field to write"),
                ParamSpec::optional(
                    "size",
                    ParamKind::FloatList,
                    Json::Null,
                    "[height, width] (default: the first image's)",
                ),
                ParamSpec::optional(
                    "channels",
                    ParamKind::Int,
                    json!(3),
                    "3 for RGB, 1 for grey",
                ),
                ParamSpec::optional(
                    "range",
                    ParamKind::FloatList,
                    json!([0.0, 1.0]),
                    "values of black and white, e.g. [-1, 1] for most generators",
                ),
                ParamSpec::optional(
                    "fit",
                    ParamKind::Choice(&["crop", "stretch"]),
                    json!("crop"),
                    "crop the centre to the aspect ratio, or stretch",
                ),
                ParamSpec::optional(
                    "limit",
                    ParamKind::Int,
                    Json::Null,
                    "read at most this many files",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params) -> Result<Schema, Vec<PlanIssue>> {
        let f = open_folder(params)?;
        let mut s = Schema::new();
        s.insert(
            f.field.clone(),
            FieldType::Tensor {
                dtype: DType::F32,
                shape: Shape::fixed(&[f.channels, f.size.0 as usize, f.size.1 as usize]),
            },
        );
        Ok(s)
    }

    fn open(&self, params: &Params) -> Result<Box<dyn Source>, String> {
        open_folder(params)
            .map(|f| Box::new(f) as Box<dyn Source>)
            .map_err(|i| i[0].message.clone())
    }
}

impl Source for Folder {
    fn len(&self) -> Option<u64> {
        Some(self.files.len() as u64)
    }

    fn read(&self, part: usize, parts: usize) -> Box<dyn Iterator<Item = Outcome> + Send + '_> {
        Box::new(
            (part..self.files.len())
                .step_by(parts.max(1))
                .map(move |i| {
                    let path = &self.files[i];
                    let key = path
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default();
                    let fail = |reason: String| Failure {
                        key: key.as_str().into(),
                        seq: i as u64,
                        stage: "images".into(),
                        reason,
                    };
                    let img = load_image(path, Some(self.size), self.crop).map_err(fail)?;
                    let t = image_to_tensor(&img, self.channels, self.range);
                    Ok(Record::new(key.as_str(), i as u64)
                        .with(&self.field, Value::Tensor(Tensor::f32(t))))
                }),
        )
    }
}

/// Writes one PNG per record from an image tensor field.
pub struct PngSink;

struct PngWriter {
    dir: PathBuf,
    field: String,
    range: [f32; 2],
    written: Vec<PathBuf>,
}

/// A file name made from a record key: path separators and odd characters become `_`.
pub fn file_stem_for(key: &str) -> String {
    let stem = key
        .rsplit_once('.')
        .map_or(key, |(s, ext)| if ext.len() <= 4 { s } else { key });
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl SinkFactory for PngSink {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "png",
            doc: "Writes an image tensor field of each record to `<dir>/<key>.png`.",
            params: vec![
                ParamSpec::required(
                    "field",
                    ParamKind::Field,
                    "[C, H, W] or [H, W] image tensor",
                ),
                ParamSpec::optional(
                    "range",
                    ParamKind::FloatList,
                    json!([0.0, 1.0]),
                    "values of black and white",
                ),
                ParamSpec::optional(
                    "dir",
                    ParamKind::String,
                    json!("images"),
                    "folder, relative to the run folder",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        range_of(params, [0.0, 1.0]).map_err(|e| vec![e])?;
        Ok(Plan::default().read(
            params.str_req("field"),
            FieldType::f32(Shape::any()),
            &["field"],
        ))
    }

    fn build(&self, params: &Params, out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        let dir = out_dir.join(params.str("dir").unwrap_or("images"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Box::new(PngWriter {
            dir,
            field: params.str_req("field").into(),
            range: range_of(params, [0.0, 1.0]).map_err(|e| e.message)?,
            written: Vec::new(),
        }))
    }
}

/// Saves a PNG atomically (temporary name, then rename).
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), String> {
    let tmp = path.with_extension("png.partial");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot move {} into place: {e}", path.display()))
}

impl Sink for PngWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        for r in records {
            let t = r
                .tensor(&self.field)?
                .as_f32()
                .ok_or("image tensors are f32")?;
            let img = tensor_to_image(t, self.range)?;
            let path = self.dir.join(format!("{}.png", file_stem_for(&r.key)));
            save_png(&img, &path)?;
            self.written.push(path);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        Ok(vec![self.dir.clone()])
    }
}

/// A contact sheet: one row per record, one column per image field.
pub struct GridSink;

struct GridWriter {
    path: PathBuf,
    fields: Vec<String>,
    range: [f32; 2],
    max_rows: usize,
    scale: u32,
    rows: Vec<Vec<RgbImage>>,
}

impl SinkFactory for GridSink {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "grid",
            doc:
                "A contact sheet PNG: one row per record (in source order, up to `max_rows`), one \
                  column per listed image field, e.g. input | reconstruction | edit; a field \
                  holding a stack of images [N, C, H, W] fills N columns.",
            params: vec![
                ParamSpec::required(
                    "fields",
                    ParamKind::FieldList,
                    "image fields, left to right",
                ),
                ParamSpec::optional(
                    "range",
                    ParamKind::FloatList,
                    json!([0.0, 1.0]),
                    "values of black and white",
                ),
                ParamSpec::optional(
                    "path",
                    ParamKind::String,
                    json!("grid.png"),
                    "output file, relative to the run folder",
                ),
                ParamSpec::optional("max_rows", ParamKind::Int, json!(16), "records shown"),
                ParamSpec::optional(
                    "scale",
                    ParamKind::Int,
                    json!(1),
                    "enlarge each image this many times (nearest)",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        range_of(params, [0.0, 1.0]).map_err(|e| vec![e])?;
        let mut plan = Plan::default();
        for (i, f) in params.strings("fields").iter().enumerate() {
            plan = plan.read(f, FieldType::f32(Shape::any()), &["fields", &i.to_string()]);
        }
        if plan.reads.is_empty() {
            return Err(vec![PlanIssue::param(
                "fields",
                "list at least one image field",
            )]);
        }
        Ok(plan)
    }

    fn build(&self, params: &Params, out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        Ok(Box::new(GridWriter {
            path: out_dir.join(params.str("path").unwrap_or("grid.png")),
            fields: params.strings("fields"),
            range: range_of(params, [0.0, 1.0]).map_err(|e| e.message)?,
            max_rows: params.int("max_rows").unwrap_or(16).max(1) as usize,
            scale: params.int("scale").unwrap_or(1).clamp(1, 16) as u32,
            rows: Vec::new(),
        }))
    }
}

/// Lays out rows of equally sized tiles with a 2-pixel white gutter.
pub fn compose_grid(rows: &[Vec<RgbImage>], scale: u32) -> Option<RgbImage> {
    let first = rows.first()?.first()?;
    let (tw, th) = (first.width() * scale, first.height() * scale);
    let cols = rows.iter().map(|r| r.len()).max()? as u32;
    let gap = 2;
    let mut sheet = RgbImage::from_pixel(
        cols * (tw + gap) + gap,
        rows.len() as u32 * (th + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let tile = if scale > 1 || tile.width() * scale != tw || tile.height() * scale != th {
                imageops::resize(tile, tw, th, imageops::FilterType::Nearest)
            } else {
                tile.clone()
            };
            imageops::replace(
                &mut sheet,
                &tile,
                (gap + c as u32 * (tw + gap)) as i64,
                (gap + r as u32 * (th + gap)) as i64,
            );
        }
    }
    Some(sheet)
}

impl Sink for GridWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        for r in records {
            if self.rows.len() >= self.max_rows {
                break;
            }
            let mut row = Vec::new();
            for f in &self.fields {
                let t = r.tensor(f)?.as_f32().ok_or("image tensors are f32")?;
                if t.ndim() == 4 {
                    // A stack of images (edits at several strengths): one tile each.
                    for one in t.outer_iter() {
                        row.push(tensor_to_image(&one.to_owned(), self.range)?);
                    }
                } else {
                    row.push(tensor_to_image(t, self.range)?);
                }
            }
            self.rows.push(row);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        let Some(sheet) = compose_grid(&self.rows, self.scale) else {
            return Ok(Vec::new());
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        save_png(&sheet, &self.path)?;
        Ok(vec![self.path.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_images_round_trip() {
        let t = ArrayD::from_shape_fn(IxDyn(&[3, 4, 5]), |ix| {
            -1.0 + 2.0 * ((ix[0] * 20 + ix[1] * 5 + ix[2]) as f32 / 59.0)
        });
        let img = tensor_to_image(&t, [-1.0, 1.0]).unwrap();
        assert_eq!((img.width(), img.height()), (5, 4));
        let back = image_to_tensor(&DynamicImage::ImageRgb8(img), 3, [-1.0, 1.0]);
        let worst = t
            .iter()
            .zip(back.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // 8 bits over a range of 2: half a step is 1/255.
        assert!(worst <= 1.0 / 255.0 + 1e-6, "{worst}");
        assert!(tensor_to_image(&ArrayD::zeros(IxDyn(&[2, 4, 4])), [0.0, 1.0]).is_err());
    }

    #[test]
    fn grids_have_a_cell_per_field_and_record() {
        let tile = RgbImage::from_pixel(8, 6, Rgb([10, 20, 30]));
        let rows = vec![
            vec![tile.clone(), tile.clone(), tile.clone()],
            vec![tile.clone(), tile],
        ];
        let g = compose_grid(&rows, 2).unwrap();
        assert_eq!(
            (g.width(), g.height()),
            (3 * (16 + 2) + 2, 2 * (12 + 2) + 2)
        );
        assert_eq!(g.get_pixel(2, 2), &Rgb([10, 20, 30]));
        assert_eq!(g.get_pixel(0, 0), &Rgb([255, 255, 255]));
    }

    #[test]
    fn keys_become_safe_file_names() {
        assert_eq!(file_stem_for("faces/0001.png"), "faces_0001");
        assert_eq!(file_stem_for("a b:c"), "a_b_c");
    }
}
