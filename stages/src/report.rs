//! Run-level reports: `summary` (statistics of scalar fields over all records, as JSON) and
//! `curve` (vector fields such as loss curves averaged over records, as a PNG chart and JSON).

use std::path::{Path, PathBuf};

use latentflow_engine::exec::write_atomic;
use latentflow_engine::{
    FieldType, KindInfo, ParamKind, ParamSpec, Params, Plan, PlanIssue, Record, Schema, Shape,
    Sink, SinkFactory, Value,
};
use serde_json::{json, Map, Value as Json};

use crate::image::save_png;
use crate::plot::{labelled_chart, Labels, Series, PALETTE};

/// Running mean and variance (Welford), with extremes.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    n: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Stats {
    /// Adds a value.
    pub fn push(&mut self, v: f64) {
        if self.n == 0 {
            (self.min, self.max) = (v, v);
        }
        self.n += 1;
        let d = v - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (v - self.mean);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Values added.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// The mean (0 when empty).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// The population standard deviation.
    pub fn std(&self) -> f64 {
        if self.n > 0 {
            (self.m2 / self.n as f64).sqrt()
        } else {
            0.0
        }
    }

    fn json(&self) -> Json {
        if self.n == 0 {
            return json!({"count": 0});
        }
        json!({"count": self.n, "mean": self.mean, "std": self.std(), "min": self.min, "max": self.max})
    }
}

fn scalar(r: &Record, f: &str) -> Option<f64> {
    match r.get(f)? {
        Value::Scalar(v) => Some(*v),
        Value::Int(v) => Some(*v as f64),
        Value::Tensor(t) if t.shape().iter().product::<usize>() == 1 => {
            t.as_f32().and_then(|a| a.iter().next().map(|v| *v as f64))
        }
        _ => None,
    }
}

/// Factory of the `summary` sink.
pub struct SummarySink;

struct SummaryWriter {
    path: PathBuf,
    fields: Vec<String>,
    stats: Vec<Stats>,
    records: u64,
}

impl SinkFactory for SummarySink {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "summary",
            doc: "Count, mean, standard deviation, minimum and maximum of scalar fields over all \
                  records, written as JSON (non-finite values are counted apart).",
            params: vec![
                ParamSpec::required("fields", ParamKind::FieldList, "scalar fields"),
                ParamSpec::optional(
                    "path",
                    ParamKind::String,
                    json!("summary.json"),
                    "output file, relative to the run folder",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let fields = params.strings("fields");
        if fields.is_empty() {
            return Err(vec![PlanIssue::param("fields", "list at least one field")]);
        }
        let mut plan = Plan::default();
        for (i, f) in fields.iter().enumerate() {
            plan = plan.read(f, FieldType::Scalar, &["fields", &i.to_string()]);
        }
        Ok(plan)
    }

    fn build(&self, params: &Params, out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        let fields = params.strings("fields");
        Ok(Box::new(SummaryWriter {
            path: out_dir.join(params.str("path").unwrap_or("summary.json")),
            stats: vec![Stats::default(); fields.len()],
            fields,
            records: 0,
        }))
    }
}

impl Sink for SummaryWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        for r in records {
            self.records += 1;
            for (f, s) in self.fields.iter().zip(&mut self.stats) {
                if let Some(v) = scalar(r, f).filter(|v| v.is_finite()) {
                    s.push(v);
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        let mut fields = Map::new();
        for (f, s) in self.fields.iter().zip(&self.stats) {
            let mut j = s.json();
            j["non_finite_or_missing"] = json!(self.records - s.count());
            fields.insert(f.clone(), j);
        }
        let doc = json!({"records": self.records, "fields": fields});
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())? + "\n";
        write_atomic(&self.path, text.as_bytes()).map_err(|e| e.to_string())?;
        Ok(vec![self.path.clone()])
    }
}

/// Factory of the `curve` sink.
pub struct CurveSink;

struct CurveWriter {
    path: PathBuf,
    labels: Labels,
    fields: Vec<String>,
    /// Per field, per position.
    stats: Vec<Vec<Stats>>,
}

impl SinkFactory for CurveSink {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "curve",
            doc: "Plots vector fields (e.g. `loss_curve` from `optimize`) against their index: \
                  the mean over records as a line, mean ± standard deviation shaded, one colour \
                  per field in the order listed. Writes the PNG and a JSON of the same numbers.",
            params: vec![
                ParamSpec::required("fields", ParamKind::FieldList, "1-D float fields"),
                ParamSpec::optional(
                    "path",
                    ParamKind::String,
                    json!("curve.png"),
                    "PNG file, relative to the run folder (the JSON goes beside it)",
                ),
                ParamSpec::optional(
                    "x_label",
                    ParamKind::String,
                    json!("index"),
                    "title of the x axis",
                ),
                ParamSpec::optional(
                    "y_label",
                    ParamKind::String,
                    json!("mean over records, std band"),
                    "title of the y axis",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let fields = params.strings("fields");
        if fields.is_empty() {
            return Err(vec![PlanIssue::param("fields", "list at least one field")]);
        }
        let mut plan = Plan::default();
        for (i, f) in fields.iter().enumerate() {
            plan = plan.read(f, FieldType::f32(Shape::any()), &["fields", &i.to_string()]);
        }
        Ok(plan)
    }

    fn build(&self, params: &Params, out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        let fields = params.strings("fields");
        Ok(Box::new(CurveWriter {
            path: out_dir.join(params.str("path").unwrap_or("curve.png")),
            labels: Labels {
                x: params.str("x_label").unwrap_or("index").to_string(),
                y: params
                    .str("y_label")
                    .unwrap_or("mean over records, std band")
                    .to_string(),
                names: fields.clone(),
            },
            stats: vec![Vec::new(); fields.len()],
            fields,
        }))
    }
}

impl Sink for CurveWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        for r in records {
            for (f, stats) in self.fields.iter().zip(&mut self.stats) {
                let t = r
                    .tensor(f)?
                    .as_f32()
                    .ok_or_else(|| format!("`{f}` is not f32"))?;
                if stats.len() < t.len() {
                    stats.resize(t.len(), Stats::default());
                }
                for (s, v) in stats.iter_mut().zip(t.iter()) {
                    if v.is_finite() {
                        s.push(*v as f64);
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        let series: Vec<Series> = self
            .stats
            .iter()
            .enumerate()
            .map(|(i, st)| Series {
                points: st
                    .iter()
                    .enumerate()
                    .map(|(k, s)| (k as f64, s.mean()))
                    .collect(),
                band: Some(st.iter().map(Stats::std).collect()),
                colour: PALETTE[i % PALETTE.len()],
            })
            .collect();
        let mut written = Vec::new();
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        if let Some(img) = labelled_chart(&series, &self.labels) {
            save_png(&img, &self.path)?;
            written.push(self.path.clone());
        }
        let mut doc = Map::new();
        for (f, st) in self.fields.iter().zip(&self.stats) {
            doc.insert(
                f.clone(),
                json!({
                    "count": st.first().map_or(0, Stats::count),
                    "mean": st.iter().map(Stats::mean).collect::<Vec<_>>(),
                    "std": st.iter().map(Stats::std).collect::<Vec<_>>(),
                }),
            );
        }
        let json_path = self.path.with_extension("json");
        let text = serde_json::to_string_pretty(&Json::Object(doc)).map_err(|e| e.to_string())?;
        write_atomic(&json_path, (text + "\n").as_bytes()).map_err(|e| e.to_string())?;
        written.push(json_path);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_statistics_match_a_direct_computation() {
        let v = [3.0, -1.5, 8.25, 0.0, 2.0];
        let mut s = Stats::default();
        v.iter().for_each(|x| s.push(*x));
        let mean = v.iter().sum::<f64>() / 5.0;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 5.0;
        assert!((s.mean() - mean).abs() < 1e-12);
        assert!((s.std() - var.sqrt()).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.count()), (-1.5, 8.25, 5));
    }
}
