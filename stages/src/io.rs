//! Sources and sinks for arrays and JSON lines.
//!
//! Sources read lazily, one record at a time, so the executor's pacing bounds memory. Sinks
//! write to a temporary name and move the file into place when the run finishes, so a crashed
//! run never leaves a file that looks complete.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use latentflow_engine::stage::{FieldRead, KindInfo};
use latentflow_engine::{
    DType, Failure, FieldType, Outcome, ParamKind, ParamSpec, Params, Plan, PlanIssue, Record,
    Schema, Shape, Sink, SinkFactory, Source, SourceFactory, Tensor, Value,
};
use ndarray::{ArrayD, IxDyn};
use serde_json::{json, Value as Json};

use crate::npy::{NpyFile, NpyWriter};

fn tensor_type(dtype: DType, shape: &[usize]) -> FieldType {
    FieldType::Tensor {
        dtype,
        shape: Shape::fixed(shape),
    }
}

// ---------------------------------------------------------------------------------------------
// npy source

/// Rows of one or more `.npy` files; row `i` of every file makes record `i`.
pub struct NpySource;

struct NpyArrays {
    files: Vec<(String, PathBuf, FieldType)>,
    rows: usize,
    stem: String,
    /// One record holding every file whole, instead of one record per row.
    whole: bool,
}

fn open_arrays(params: &Params) -> Result<NpyArrays, Vec<PlanIssue>> {
    let mut files = Vec::new();
    let mut issues = Vec::new();
    let mut rows: Option<(usize, String)> = None;
    let arrays = params.name_map("arrays");
    let whole = params.bool("whole").unwrap_or(false);
    if arrays.is_empty() {
        issues.push(PlanIssue::param(
            "arrays",
            "`arrays` must name at least one field and its .npy file",
        ));
    }
    for (field, file) in &arrays {
        let path = params.resolve(file);
        match NpyFile::open(&path) {
            Ok(f) => {
                let ty = match (f.row_shape().is_empty(), f.elem.dtype()) {
                    _ if whole => tensor_type(f.elem.dtype(), &f.shape),
                    (true, DType::I64) => FieldType::Int,
                    (true, DType::F32) => FieldType::Scalar,
                    (false, d) => tensor_type(d, f.row_shape()),
                };
                match &rows {
                    _ if whole => {}
                    Some((n, first)) if *n != f.rows() => issues.push(
                        PlanIssue::param(
                            "arrays",
                            format!("`{file}` has {} rows but `{first}` has {n}", f.rows()),
                        )
                        .at_key(field)
                        .hint("every array of one source must have the same number of rows"),
                    ),
                    Some(_) => {}
                    None => rows = Some((f.rows(), file.clone())),
                }
                files.push((field.clone(), path, ty));
            }
            Err(e) => issues.push(PlanIssue::param("arrays", e).at_key(field)),
        }
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    if params.int("limit").is_some_and(|l| l < 0) {
        return Err(vec![PlanIssue::param(
            "limit",
            "`limit` must not be negative",
        )]);
    }
    let limit = params.int("limit").map(|l| l as usize);
    let rows = if whole {
        1
    } else {
        rows.map(|r| r.0).unwrap_or(0)
    };
    let stem = files
        .first()
        .and_then(|f| f.1.file_stem())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(NpyArrays {
        files,
        rows: limit.map_or(rows, |l| l.min(rows)),
        stem,
        whole,
    })
}

impl SourceFactory for NpySource {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "npy",
            doc: "Reads rows of .npy arrays (float32/64, int32/64, uint8; C order) lazily; row i \
                  of every listed file becomes record i. 1-D integer arrays give int fields.",
            params: vec![
                ParamSpec::required(
                    "arrays",
                    ParamKind::NameMap,
                    "field name → .npy file, relative to the pipeline file",
                ),
                ParamSpec::optional(
                    "limit",
                    ParamKind::Int,
                    Json::Null,
                    "read at most this many rows",
                ),
                ParamSpec::optional(
                    "whole",
                    ParamKind::Bool,
                    json!(false),
                    "one record holding each file whole (e.g. a graph's features and edges)",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params) -> Result<Schema, Vec<PlanIssue>> {
        let a = open_arrays(params)?;
        Ok(a.files.into_iter().map(|(f, _, t)| (f, t)).collect())
    }

    fn open(&self, params: &Params) -> Result<Box<dyn Source>, String> {
        let a = open_arrays(params).map_err(|i| {
            i.into_iter()
                .map(|i| i.message)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(Box::new(a))
    }
}

impl Source for NpyArrays {
    fn len(&self) -> Option<u64> {
        Some(self.rows as u64)
    }

    fn read(&self, part: usize, parts: usize) -> Box<dyn Iterator<Item = Outcome> + Send + '_> {
        let mut opened: Vec<Result<(String, NpyFile, FieldType), String>> = self
            .files
            .iter()
            .map(|(f, p, t)| NpyFile::open(p).map(|h| (f.clone(), h, t.clone())))
            .collect();
        let stem = self.stem.clone();
        Box::new((part..self.rows).step_by(parts.max(1)).map(move |row| {
            let key = format!("{stem}:{row:06}");
            let mut rec = Record::new(key.as_str(), row as u64);
            for f in opened.iter_mut() {
                let (field, file, ty) = match f {
                    Ok(x) => x,
                    Err(e) => {
                        return Err(Failure {
                            key: key.as_str().into(),
                            seq: row as u64,
                            stage: "npy".into(),
                            reason: e.clone(),
                        })
                    }
                };
                let want = match ty {
                    FieldType::Tensor { dtype, .. } => *dtype,
                    FieldType::Int => DType::I64,
                    _ => DType::F32,
                };
                let t = if self.whole {
                    file.read_all(want)
                } else {
                    file.read_row(row, want)
                };
                let t = t.map_err(|e| Failure {
                    key: key.as_str().into(),
                    seq: row as u64,
                    stage: "npy".into(),
                    reason: e,
                })?;
                let v = match (ty, &t) {
                    (FieldType::Int, Tensor::I64(a)) => {
                        Value::Int(a.iter().next().copied().unwrap_or(0))
                    }
                    (FieldType::Scalar, Tensor::F32(a)) => {
                        Value::Scalar(a.iter().next().copied().unwrap_or(0.0) as f64)
                    }
                    _ => Value::Tensor(t),
                };
                rec.set(field, v);
            }
            Ok(rec)
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// synthetic source

/// Seeded random tensors, generated on demand: for benchmarks, tests and inputs larger than
/// memory.
pub struct SyntheticSource;

#[derive(Clone)]
struct Synthetic {
    count: u64,
    field: String,
    shape: Vec<usize>,
    seed: u64,
    scale: f32,
    int_field: Option<String>,
    int_max: i64,
    nan_every: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Synthetic {
    fn from(params: &Params) -> Result<Self, Vec<PlanIssue>> {
        let shape: Vec<usize> = params.floats("shape").iter().map(|&d| d as usize).collect();
        if params
            .floats("shape")
            .iter()
            .any(|&d| d < 1.0 || d.fract() != 0.0)
        {
            return Err(vec![PlanIssue::param(
                "shape",
                "`shape` must list positive whole numbers",
            )]);
        }
        let count = params.int("count").unwrap_or(0);
        if count < 0 {
            return Err(vec![PlanIssue::param(
                "count",
                "`count` must not be negative",
            )]);
        }
        Ok(Synthetic {
            count: count as u64,
            field: params.str("field").unwrap_or("x").to_string(),
            shape,
            seed: params.int("seed").unwrap_or(0) as u64,
            scale: params.float("scale").unwrap_or(1.0) as f32,
            int_field: params.str("int_field").map(String::from),
            int_max: params.int("int_max").unwrap_or(0),
            nan_every: params.int("nan_every").unwrap_or(0).max(0) as u64,
        })
    }

    fn make(&self, seq: u64) -> Record {
        let n: usize = self.shape.iter().product();
        let mut state = splitmix(self.seed ^ splitmix(seq));
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = splitmix(state);
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * self.scale
            })
            .collect();
        let mut a = ArrayD::from_shape_vec(IxDyn(&self.shape), data).expect("shape");
        if self.nan_every > 0 && seq % self.nan_every == self.nan_every - 1 {
            if let Some(v) = a.iter_mut().next() {
                *v = f32::NAN;
            }
        }
        let mut r = Record::new(format!("synthetic:{seq:08}"), seq)
            .with(&self.field, Value::Tensor(Tensor::f32(a)));
        if let Some(f) = &self.int_field {
            r.set(
                f,
                Value::Int((seq % (self.int_max.max(0) as u64 + 1)) as i64),
            );
        }
        r
    }
}

impl SourceFactory for SyntheticSource {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "synthetic",
            doc: "Generates `count` records of seeded uniform noise in [-scale, scale], made on \
                  demand (any count fits in memory). Optionally an int field cycling 0..=int_max \
                  and a NaN in every `nan_every`-th record, for testing loops and error handling.",
            params: vec![
                ParamSpec::required("count", ParamKind::Int, "number of records"),
                ParamSpec::required(
                    "shape",
                    ParamKind::FloatList,
                    "shape of the tensor of each record",
                ),
                ParamSpec::optional(
                    "field",
                    ParamKind::String,
                    json!("x"),
                    "name of the tensor field",
                ),
                ParamSpec::optional("seed", ParamKind::Int, json!(0), "random seed"),
                ParamSpec::optional(
                    "scale",
                    ParamKind::Float,
                    json!(1.0),
                    "values lie in [-scale, scale]",
                ),
                ParamSpec::optional(
                    "int_field",
                    ParamKind::String,
                    Json::Null,
                    "also write an int field with this name",
                ),
                ParamSpec::optional(
                    "int_max",
                    ParamKind::Int,
                    json!(0),
                    "the int field cycles through 0..=int_max",
                ),
                ParamSpec::optional(
                    "nan_every",
                    ParamKind::Int,
                    json!(0),
                    "put a NaN into every n-th record (0: never)",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params) -> Result<Schema, Vec<PlanIssue>> {
        let s = Synthetic::from(params)?;
        let mut schema = Schema::new();
        schema.insert(s.field.clone(), tensor_type(DType::F32, &s.shape));
        if let Some(f) = &s.int_field {
            schema.insert(f.clone(), FieldType::Int);
        }
        Ok(schema)
    }

    fn open(&self, params: &Params) -> Result<Box<dyn Source>, String> {
        let s = Synthetic::from(params).map_err(|i| i[0].message.clone())?;
        Ok(Box::new(s))
    }
}

impl Source for Synthetic {
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
// jsonl source

/// One JSON object per line; the declared fields are read from each.
pub struct JsonlSource;

struct JsonlInput {
    path: PathBuf,
    fields: Vec<(String, FieldType)>,
    lines: u64,
}

fn json_to_value(v: &Json, ty: &FieldType) -> Result<Value, String> {
    match ty {
        FieldType::Int => v
            .as_i64()
            .map(Value::Int)
            .ok_or_else(|| format!("expected an integer, found {v}")),
        FieldType::Scalar => v
            .as_f64()
            .map(Value::Scalar)
            .ok_or_else(|| format!("expected a number, found {v}")),
        FieldType::Text => v
            .as_str()
            .map(|s| Value::Text(s.into()))
            .ok_or_else(|| format!("expected a string, found {v}")),
        FieldType::Tensor { dtype, shape } => {
            let mut dims = Vec::new();
            let mut cur = v;
            while let Json::Array(a) = cur {
                dims.push(a.len());
                match a.first() {
                    Some(x) => cur = x,
                    None => break,
                }
            }
            let mut flat = Vec::new();
            fn walk(v: &Json, out: &mut Vec<f64>) -> Result<(), String> {
                match v {
                    Json::Array(a) => a.iter().try_for_each(|x| walk(x, out)),
                    Json::Number(n) => {
                        out.push(n.as_f64().unwrap_or(f64::NAN));
                        Ok(())
                    }
                    other => Err(format!("expected numbers in the array, found {other}")),
                }
            }
            walk(v, &mut flat)?;
            if flat.len() != dims.iter().product::<usize>() {
                return Err("ragged array: rows have different lengths".into());
            }
            if !shape.accepts(&dims) {
                return Err(format!("array has shape {dims:?}, expected {shape}"));
            }
            Ok(Value::Tensor(match dtype {
                DType::F32 => Tensor::f32(
                    ArrayD::from_shape_vec(IxDyn(&dims), flat.iter().map(|&x| x as f32).collect())
                        .expect("shape"),
                ),
                DType::I64 => Tensor::i64(
                    ArrayD::from_shape_vec(IxDyn(&dims), flat.iter().map(|&x| x as i64).collect())
                        .expect("shape"),
                ),
            }))
        }
        FieldType::Graph => Err("graphs cannot be read from JSON lines".into()),
    }
}

impl JsonlInput {
    fn from(params: &Params) -> Result<Self, Vec<PlanIssue>> {
        let path = params.path("path").unwrap_or_default();
        let file = File::open(&path).map_err(|e| {
            vec![PlanIssue::param(
                "path",
                format!("cannot open {}: {e}", path.display()),
            )]
        })?;
        let lines = BufReader::new(file).lines().count() as u64;
        let mut fields = Vec::new();
        let mut issues = Vec::new();
        for (name, ty) in params.name_map("fields") {
            match ty.parse::<FieldType>() {
                Ok(t) => fields.push((name, t)),
                Err(e) => issues.push(PlanIssue::param("fields", e).at_key(&name)),
            }
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(JsonlInput {
            path,
            fields,
            lines,
        })
    }

    fn parse_line(&self, line: &str, seq: u64) -> Outcome {
        let fail = |reason: String| Failure {
            key: format!("{}:{}", self.path.display(), seq + 1).into(),
            seq,
            stage: "jsonl".into(),
            reason,
        };
        let obj: Json =
            serde_json::from_str(line).map_err(|e| fail(format!("line {}: {e}", seq + 1)))?;
        let key = obj
            .get("key")
            .and_then(|k| k.as_str())
            .map(String::from)
            .unwrap_or_else(|| format!("line:{:06}", seq + 1));
        let mut rec = Record::new(key.as_str(), seq);
        for (name, ty) in &self.fields {
            let v = obj
                .get(name)
                .ok_or_else(|| fail(format!("line {}: field `{name}` is missing", seq + 1)))?;
            let v = json_to_value(v, ty)
                .map_err(|e| fail(format!("line {}: field `{name}`: {e}", seq + 1)))?;
            rec.set(name, v);
        }
        Ok(rec)
    }
}

impl SourceFactory for JsonlSource {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "jsonl",
            doc: "Reads one JSON object per line. `fields` declares each field read and its type \
                  (int, scalar, text, f32[..], i64[3, 4], ...); a `key` property names the record.",
            params: vec![
                ParamSpec::required("path", ParamKind::Path, "the .jsonl file"),
                ParamSpec::required("fields", ParamKind::NameMap, "field name → type"),
            ],
        }
    }

    fn plan(&self, params: &Params) -> Result<Schema, Vec<PlanIssue>> {
        Ok(JsonlInput::from(params)?.fields.into_iter().collect())
    }

    fn open(&self, params: &Params) -> Result<Box<dyn Source>, String> {
        JsonlInput::from(params)
            .map(|j| Box::new(j) as Box<dyn Source>)
            .map_err(|i| i[0].message.clone())
    }
}

impl Source for JsonlInput {
    fn len(&self) -> Option<u64> {
        Some(self.lines)
    }

    fn read(&self, part: usize, parts: usize) -> Box<dyn Iterator<Item = Outcome> + Send + '_> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) => {
                let reason = format!("cannot open {}: {e}", self.path.display());
                return Box::new(std::iter::once(Err(Failure {
                    key: "jsonl".into(),
                    seq: 0,
                    stage: "jsonl".into(),
                    reason,
                })));
            }
        };
        Box::new(
            BufReader::new(file)
                .lines()
                .enumerate()
                .filter(move |(i, _)| i % parts.max(1) == part)
                .map(move |(i, l)| match l {
                    Ok(line) => self.parse_line(&line, i as u64),
                    Err(e) => Err(Failure {
                        key: format!("line:{:06}", i + 1).into(),
                        seq: i as u64,
                        stage: "jsonl".into(),
                        reason: e.to_string(),
                    }),
                }),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// sinks

fn tensor_json(t: &Tensor) -> Json {
    fn nest<T: Copy + Into<Json>>(data: &[T], shape: &[usize]) -> Json {
        match shape {
            [] => data.first().map(|&v| v.into()).unwrap_or(Json::Null),
            [_] => Json::Array(data.iter().map(|&v| v.into()).collect()),
            [n, rest @ ..] => {
                let step: usize = rest.iter().product();
                Json::Array(
                    (0..*n)
                        .map(|i| nest(&data[i * step..(i + 1) * step], rest))
                        .collect(),
                )
            }
        }
    }
    match t {
        Tensor::F32(a) => {
            let v: Vec<f64> = a.iter().map(|&x| x as f64).collect();
            let v: Vec<Json> = v
                .iter()
                .map(|&x| {
                    serde_json::Number::from_f64(x)
                        .map(Json::Number)
                        .unwrap_or(Json::Null)
                })
                .collect();
            fn nest_json(data: &[Json], shape: &[usize]) -> Json {
                match shape {
                    [] => data.first().cloned().unwrap_or(Json::Null),
                    [_] => Json::Array(data.to_vec()),
                    [n, rest @ ..] => {
                        let step: usize = rest.iter().product();
                        Json::Array(
                            (0..*n)
                                .map(|i| nest_json(&data[i * step..(i + 1) * step], rest))
                                .collect(),
                        )
                    }
                }
            }
            nest_json(&v, a.shape())
        }
        Tensor::I64(a) => {
            let v: Vec<i64> = a.iter().copied().collect();
            nest(&v, a.shape())
        }
    }
}

/// A value as JSON (graphs are summarised).
pub fn value_json(v: &Value) -> Json {
    match v {
        Value::Tensor(t) => tensor_json(t),
        Value::Scalar(x) => serde_json::Number::from_f64(*x)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        Value::Int(i) => json!(i),
        Value::Text(s) => json!(&**s),
        Value::Graph(g) => json!({"nodes": g.num_nodes, "edges": g.edge_index.shape().get(1)}),
    }
}

fn reads(params: &Params, input: &Schema, list: &str) -> Result<Plan, Vec<PlanIssue>> {
    let mut plan = Plan::default();
    for (i, f) in params.strings(list).iter().enumerate() {
        let ty = input.get(f).cloned().unwrap_or(FieldType::Scalar);
        plan.reads.push(FieldRead {
            field: f.clone(),
            ty,
            at: vec!["params".into(), list.into(), i.to_string()],
        });
    }
    Ok(plan)
}

/// Writes records as JSON lines.
pub struct JsonlSink;

struct JsonlWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    fields: Vec<String>,
}

fn output_path(params: &Params, out_dir: &Path, default: &str) -> PathBuf {
    let p = Path::new(params.str("path").unwrap_or(default));
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        out_dir.join(p)
    }
}

impl SinkFactory for JsonlSink {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "jsonl",
            doc: "Writes one JSON object per record ({key, seq, fields...}) in source order; \
                  tensors become nested lists.",
            params: vec![
                ParamSpec::optional(
                    "path",
                    ParamKind::String,
                    json!("records.jsonl"),
                    "output file, relative to the run folder",
                ),
                ParamSpec::optional(
                    "fields",
                    ParamKind::FieldList,
                    json!([]),
                    "fields to write (empty: all)",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        reads(params, input, "fields")
    }

    fn build(&self, params: &Params, out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        let path = output_path(params, out_dir, "records.jsonl");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let tmp = path.with_extension("jsonl.partial");
        let file =
            File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        Ok(Box::new(JsonlWriter {
            path,
            tmp,
            out: BufWriter::new(file),
            fields: params.strings("fields"),
        }))
    }
}

impl Sink for JsonlWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        for r in records {
            let mut obj = serde_json::Map::new();
            obj.insert("key".into(), json!(&*r.key));
            obj.insert("seq".into(), json!(r.seq));
            for (name, v) in &r.fields {
                if self.fields.is_empty() || self.fields.iter().any(|f| **f == **name) {
                    obj.insert(name.to_string(), value_json(v));
                }
            }
            serde_json::to_writer(&mut self.out, &obj).map_err(|e| e.to_string())?;
            self.out
                .write_all(b"\n")
                .map_err(|e| format!("cannot write {}: {e}", self.tmp.display()))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        self.out
            .flush()
            .map_err(|e| format!("cannot write {}: {e}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| format!("cannot move {} into place: {e}", self.path.display()))?;
        Ok(vec![self.path.clone()])
    }
}

/// Writes tensor fields as stacked `.npy` arrays, one file per field, rows in source order.
pub struct NpySink;

struct NpySinkWriter {
    dir: PathBuf,
    fields: Vec<String>,
    writers: Vec<Option<NpyWriter>>,
    keys: BufWriter<File>,
    keys_tmp: PathBuf,
}

impl SinkFactory for NpySink {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "npy",
            doc: "Stacks each listed tensor or number field over all records into \
                  `<dir>/<field>.npy` (rows in source order) and writes the keys to `keys.txt`.",
            params: vec![
                ParamSpec::required("fields", ParamKind::FieldList, "fields to write"),
                ParamSpec::optional(
                    "dir",
                    ParamKind::String,
                    json!("."),
                    "folder, relative to the run folder",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let mut plan = reads(params, input, "fields")?;
        for r in plan.reads.iter_mut() {
            if matches!(r.ty, FieldType::Text | FieldType::Graph) {
                return Err(vec![PlanIssue::param(
                    "fields",
                    format!(
                        "field `{}` is {}; only tensors and numbers can be written to .npy",
                        r.field, r.ty
                    ),
                )
                .at_key(&r.at[2])]);
            }
        }
        if plan.reads.is_empty() {
            return Err(vec![PlanIssue::param(
                "fields",
                "list at least one field to write",
            )]);
        }
        plan.reads
            .iter_mut()
            .for_each(|r| r.ty = input.get(&r.field).cloned().unwrap_or(FieldType::Scalar));
        Ok(plan)
    }

    fn build(&self, params: &Params, out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        let dir = match params.str("dir").unwrap_or(".") {
            "." | "" => out_dir.to_path_buf(),
            d => out_dir.join(d),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let fields = params.strings("fields");
        let keys_tmp = dir.join("keys.txt.partial");
        let keys = BufWriter::new(
            File::create(&keys_tmp)
                .map_err(|e| format!("cannot create {}: {e}", keys_tmp.display()))?,
        );
        Ok(Box::new(NpySinkWriter {
            writers: fields.iter().map(|_| None).collect(),
            dir,
            fields,
            keys,
            keys_tmp,
        }))
    }
}

impl Sink for NpySinkWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        for r in records {
            for (i, f) in self.fields.iter().enumerate() {
                let t = match r.get(f) {
                    Some(Value::Tensor(t)) => t.clone(),
                    Some(Value::Int(v)) => Tensor::i64(ArrayD::from_elem(IxDyn(&[]), *v)),
                    Some(Value::Scalar(v)) => Tensor::f32(ArrayD::from_elem(IxDyn(&[]), *v as f32)),
                    _ => return Err(format!("record `{}` has no tensor field `{f}`", r.key)),
                };
                if self.writers[i].is_none() {
                    self.writers[i] = Some(NpyWriter::create(
                        &self.dir.join(format!("{f}.npy")),
                        t.dtype(),
                        t.shape(),
                    )?);
                }
                self.writers[i].as_mut().expect("created").write_row(&t)?;
            }
            writeln!(self.keys, "{}", r.key).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        let mut files = Vec::new();
        for w in self.writers.iter_mut() {
            if let Some(w) = w.take() {
                files.push(w.finish()?);
            }
        }
        self.keys.flush().map_err(|e| e.to_string())?;
        let keys = self.dir.join("keys.txt");
        std::fs::rename(&self.keys_tmp, &keys).map_err(|e| e.to_string())?;
        files.push(keys);
        Ok(files)
    }
}

/// Accuracy, macro-F1 and the confusion matrix of integer predictions against labels.
pub struct ClassificationReport;

struct ReportWriter {
    path: PathBuf,
    label: String,
    predicted: String,
    pairs: Mutex<Vec<(i64, i64)>>,
}

impl SinkFactory for ClassificationReport {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "classification-report",
            doc: "Compares an int prediction field with an int label field and writes accuracy, \
                  macro-F1, per-class counts and the confusion matrix as JSON.",
            params: vec![
                ParamSpec::optional("label", ParamKind::Field, json!("label"), "the true class"),
                ParamSpec::optional(
                    "predicted",
                    ParamKind::Field,
                    json!("predicted"),
                    "the predicted class",
                ),
                ParamSpec::optional(
                    "path",
                    ParamKind::String,
                    json!("report.json"),
                    "output file, relative to the run folder",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        Ok(Plan::default()
            .read(params.str_req("label"), FieldType::Int, &["label"])
            .read(params.str_req("predicted"), FieldType::Int, &["predicted"]))
    }

    fn build(&self, params: &Params, out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        Ok(Box::new(ReportWriter {
            path: output_path(params, out_dir, "report.json"),
            label: params.str_req("label").into(),
            predicted: params.str_req("predicted").into(),
            pairs: Mutex::new(Vec::new()),
        }))
    }
}

/// Accuracy, macro-F1 and confusion matrix (rows: true class, columns: predicted).
pub fn classification_metrics(pairs: &[(i64, i64)]) -> Json {
    let classes = pairs
        .iter()
        .map(|&(a, b)| a.max(b))
        .max()
        .map_or(0, |m| m + 1)
        .max(0) as usize;
    let mut cm = vec![vec![0u64; classes]; classes];
    for &(t, p) in pairs {
        if t >= 0 && p >= 0 {
            cm[t as usize][p as usize] += 1;
        }
    }
    let correct: u64 = (0..classes).map(|c| cm[c][c]).sum();
    let mut f1s = Vec::new();
    for (c, row) in cm.iter().enumerate() {
        let tp = row[c] as f64;
        let fp: f64 = (0..classes)
            .filter(|&r| r != c)
            .map(|r| cm[r][c] as f64)
            .sum();
        let fneg: f64 = (0..classes)
            .filter(|&p| p != c)
            .map(|p| cm[c][p] as f64)
            .sum();
        let denom = 2.0 * tp + fp + fneg;
        f1s.push(if denom > 0.0 { 2.0 * tp / denom } else { 0.0 });
    }
    let n = pairs.len().max(1) as f64;
    json!({
        "records": pairs.len(),
        "accuracy": correct as f64 / n,
        "macro_f1": if classes > 0 { f1s.iter().sum::<f64>() / classes as f64 } else { 0.0 },
        "f1_per_class": f1s,
        "confusion": cm,
    })
}

impl Sink for ReportWriter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            match (r.get(&self.label), r.get(&self.predicted)) {
                (Some(Value::Int(t)), Some(Value::Int(p))) => pairs.push((*t, *p)),
                _ => {
                    return Err(format!(
                        "record `{}` lacks int fields `{}` and `{}`",
                        r.key, self.label, self.predicted
                    ))
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        let pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        let report = classification_metrics(&pairs);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let text = serde_json::to_string_pretty(&report).expect("json");
        latentflow_engine::exec::write_atomic(&self.path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        tracing::info!(
            accuracy = report["accuracy"].as_f64(),
            macro_f1 = report["macro_f1"].as_f64(),
            "classification report"
        );
        Ok(vec![self.path.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_a_hand_count() {
        // 3 classes; confusion [[2,0,0],[1,1,0],[0,0,1]]
        let pairs = [(0, 0), (0, 0), (1, 0), (1, 1), (2, 2)];
        let m = classification_metrics(&pairs);
        assert_eq!(m["accuracy"], 0.8);
        // F1: class0 = 2*2/(4+1+0)=0.8, class1 = 2/(2+0+1)=2/3, class2 = 1
        let want = (0.8 + 2.0 / 3.0 + 1.0) / 3.0;
        assert!((m["macro_f1"].as_f64().unwrap() - want).abs() < 1e-12);
        assert_eq!(m["confusion"][1][0], 1);
    }

    #[test]
    fn nested_json_tensors() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1i64, 2, 3, 4]).unwrap();
        assert_eq!(tensor_json(&Tensor::i64(a)), json!([[1, 2], [3, 4]]));
        let v = json_to_value(
            &json!([[1.5, 2.0], [3.0, 4.0]]),
            &"f32[2, 2]".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(v.as_tensor().unwrap().shape(), &[2, 2]);
        assert!(json_to_value(&json!([[1.0], [2.0, 3.0]]), &"f32[..]".parse().unwrap()).is_err());
    }
}
