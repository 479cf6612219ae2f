//! The functions the fuzz targets call, one per target. Shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and by the stable test that replays the committed corpus
//! (`tests/fuzz_corpus.rs`), so a corpus file is checked the same way in both places.
//!
//! Every function takes arbitrary bytes, feeds them through the project's own public entry
//! points (the pipeline validator, and the sources as a run opens and reads them) and ignores
//! the outcome: errors are the expected answer to bad input; only a panic, an abort or a hang
//! is a finding. Loaders read files, so the bytes are written to a scratch folder first; a
//! leading option byte (or line) picks the loader's parameters where it has any.

#![allow(dead_code)]

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use latentflow_engine::{plan_text, DType, Params, PlanOptions, Registry, SourceFactory};
use latentflow_stages::graph::GraphLoadSource;
use latentflow_stages::image::ImageFolder;
use latentflow_stages::io::{JsonlSource, NpySource};
use latentflow_stages::npy::NpyFile;
use serde_json::{json, Map, Value as Json};

/// Records read from one source at most: a header may promise billions of rows, and reading
/// them all would only measure the disk.
const MAX_RECORDS: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
    static REGISTRY: Registry = latentflow_stages::builtin();
}

/// This thread's scratch folder (one per process and thread, created on first use).
pub fn scratch() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    SCRATCH.with(|s| {
        s.borrow_mut()
            .get_or_insert_with(|| {
                let d = std::env::temp_dir().join(format!(
                    "latentflow-fuzz-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&d).expect("scratch folder");
                d
            })
            .clone()
    })
}

/// Removes this thread's scratch folder.
pub fn cleanup() {
    SCRATCH.with(|s| {
        if let Some(d) = s.borrow_mut().take() {
            let _ = std::fs::remove_dir_all(d);
        }
    });
}

/// A fresh, empty folder `name` in the scratch folder.
fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("fuzz folder");
    d
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write a fuzz input file");
}

/// The repository's `pipelines/` folder: relative paths in fuzzed pipeline files resolve
/// against it, as they do for the committed pipelines, so planning reaches the real data.
fn pipelines_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for p in [here.join("pipelines"), here.join("../pipelines")] {
        if p.is_dir() {
            return p;
        }
    }
    here.to_path_buf()
}

/// Parameters as the planner hands them to a source: the given values, then the defaults.
fn params(factory: &dyn SourceFactory, values: Json, base: &Path) -> Params {
    let Json::Object(m) = values else {
        unreachable!("parameters are a mapping")
    };
    Params::new(m, base).with_defaults(&factory.info().params)
}

/// Plans a source, opens it and reads its first records, as a run does.
fn plan_open_read(factory: &dyn SourceFactory, p: &Params) {
    let _ = factory.plan(p);
    if let Ok(src) = factory.open(p) {
        let _ = src.len();
        for outcome in src.read(0, 1).take(MAX_RECORDS) {
            let _ = outcome.map(|r| r.fields.len());
        }
        // A second worker's share starts at record 1.
        for outcome in src.read(1, 2).take(2) {
            let _ = outcome;
        }
    }
}

/// `latentflow validate --no-models` on a pipeline file's text: YAML parsing, the schema,
/// every entry's parameters and field types, the sources' files (resolved against
/// `pipelines/`), and the printed diagnostics.
pub fn pipeline(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // the CLI reads the file as UTF-8 and stops there
    };
    let base = pipelines_dir();
    let file = base.join("fuzz.yaml");
    REGISTRY.with(|reg| {
        match plan_text(
            text,
            &file,
            &base,
            reg,
            PlanOptions {
                check_models: false,
            },
        ) {
            Ok(p) => {
                let _ = p.entry_names();
            }
            Err(d) => {
                let _ = d.to_string();
            }
        }
    });
}

/// A `.npy` file through the `npy` source (plan, open, read rows; byte 0 bit 0: `whole`,
/// bit 1: `limit: 3`) and through `NpyFile` directly (first and last row, both types).
pub fn npy(data: &[u8]) {
    let Some((&opts, file)) = data.split_first() else {
        return;
    };
    let dir = fresh_dir("npy");
    let path = dir.join("a.npy");
    write(&path, file);
    let mut values = json!({ "arrays": { "x": "a.npy" }, "whole": opts & 1 != 0 });
    if opts & 2 != 0 {
        values["limit"] = json!(3);
    }
    plan_open_read(&NpySource, &params(&NpySource, values, &dir));
    if let Ok(mut f) = NpyFile::open(&path) {
        let _ = (f.rows(), f.row_shape().len(), f.elem.dtype());
        if f.rows() > 0 {
            let last = f.rows() - 1;
            let _ = f.read_row(0, DType::F32);
            let _ = f.read_row(last, DType::I64);
        }
    }
}

/// A JSON-lines file through the `jsonl` source. The first line is the source's `fields`
/// mapping (field → type, e.g. `{"a": "int", "t": "f32[2, ..]"}`); the rest is the file.
pub fn jsonl(data: &[u8]) {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let fields = match serde_json::from_slice::<Json>(head) {
        Ok(Json::Object(m)) => Json::Object(m),
        _ => json!({ "a": "int", "b": "scalar", "c": "text", "d": "f32[..]", "e": "i64[2, n]" }),
    };
    let dir = fresh_dir("jsonl");
    write(&dir.join("in.jsonl"), body);
    let values = json!({ "path": "in.jsonl", "fields": fields });
    plan_open_read(&JsonlSource, &params(&JsonlSource, values, &dir));
}

/// An image file through the `images` source: decode, resize, conversion to a tensor.
/// Byte 0: bit 0 the file is `.jpg` (else `.png`), bit 1 `channels: 1`, bit 2 `fit: stretch`,
/// bit 3 an explicit `size` of (1 + byte 1 % 64) × (1 + byte 2 % 64), bit 4 `range: [-1, 1]`.
pub fn image(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (opts, h, w, file) = (data[0], data[1], data[2], &data[3..]);
    let dir = fresh_dir("images");
    let name = if opts & 1 != 0 { "x.jpg" } else { "x.png" };
    write(&dir.join(name), file);
    let mut values = json!({
        "path": ".",
        "channels": if opts & 2 != 0 { 1 } else { 3 },
        "fit": if opts & 4 != 0 { "stretch" } else { "crop" },
    });
    if opts & 8 != 0 {
        values["size"] = json!([1 + (h % 64) as u32, 1 + (w % 64) as u32]);
    }
    if opts & 16 != 0 {
        values["range"] = json!([-1.0, 1.0]);
    }
    plan_open_read(&ImageFolder, &params(&ImageFolder, values, &dir));
}

/// `graph-load` options from two bytes: byte 0 bit 0 `symmetrise`, bit 1 `self_loops`, bit 2
/// `normalise_features`, bits 3-4 `split` (auto, standard, random, none), bits 5-7
/// `train_per_class`; byte 1: `val_size` (low 4 bits) and `test_size` (high 4 bits).
fn graph_options(b0: u8, b1: u8) -> Map<String, Json> {
    let split = ["auto", "standard", "random", "none"][((b0 >> 3) & 3) as usize];
    let Json::Object(m) = json!({
        "symmetrise": b0 & 1 != 0,
        "self_loops": b0 & 2 != 0,
        "normalise_features": b0 & 4 != 0,
        "split": split,
        "train_per_class": (b0 >> 5) as i64,
        "val_size": (b1 & 15) as i64,
        "test_size": (b1 >> 4) as i64,
        "seed": 7,
    }) else {
        unreachable!()
    };
    m
}

fn graph_load(mut values: Map<String, Json>, options: Map<String, Json>, base: &Path) {
    values.extend(options);
    let p = params(&GraphLoadSource, Json::Object(values), base);
    plan_open_read(&GraphLoadSource, &p);
}

/// A CSR `.npz` file through the `graph-load` source (two option bytes, then the file).
pub fn graph_npz(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let dir = fresh_dir("npz");
    write(&dir.join("g.npz"), &data[2..]);
    let values = json!({ "path": "g.npz", "format": "npz" });
    let Json::Object(values) = values else {
        unreachable!()
    };
    graph_load(values, graph_options(data[0], data[1]), &dir);
}

/// The parts of a multi-file input, separated by NUL bytes.
fn parts(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == 0).collect()
}

/// A TU dataset folder through the `graph-load` source. Byte 0: bit 0 writes
/// `DS_node_labels.txt`, bit 1 `DS_node_attributes.txt`, bit 2 names the folder `DS` (else the
/// prefix is found from `*_A.txt`); then NUL-separated file texts, in the order `DS_A`,
/// `DS_graph_indicator`, `DS_graph_labels`, `DS_node_labels`, `DS_node_attributes`. A
/// missing part leaves its file out.
pub fn graph_tu(data: &[u8]) {
    let Some((&opts, rest)) = data.split_first() else {
        return;
    };
    let root = fresh_dir("tu");
    let dir = root.join(if opts & 4 != 0 { "DS" } else { "folder" });
    std::fs::create_dir_all(&dir).expect("TU folder");
    let names = [
        ("A", true),
        ("graph_indicator", true),
        ("graph_labels", true),
        ("node_labels", opts & 1 != 0),
        ("node_attributes", opts & 2 != 0),
    ];
    for ((name, wanted), text) in names.iter().zip(parts(rest)) {
        if *wanted {
            write(&dir.join(format!("DS_{name}.txt")), text);
        }
    }
    let values = json!({ "path": dir.file_name().unwrap().to_str().unwrap(), "format": "tu" });
    let Json::Object(values) = values else {
        unreachable!()
    };
    // Node splits do not apply to TU data; keep `split` at auto or none.
    graph_load(values, graph_options(opts & !(1 << 3), 0), &root);
}

/// An edge-list CSV with its feature and label files through the `graph-load` source: two
/// option bytes, then the edge list, the features and (if present) the labels, separated by
/// NUL bytes.
pub fn graph_csv(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let dir = fresh_dir("csv");
    let p = parts(&data[2..]);
    write(&dir.join("edges.csv"), p[0]);
    write(
        &dir.join("features.csv"),
        p.get(1).copied().unwrap_or_default(),
    );
    let mut values = Map::new();
    values.insert("path".into(), json!("edges.csv"));
    values.insert("format".into(), json!("csv"));
    values.insert("features".into(), json!("features.csv"));
    if let Some(labels) = p.get(2) {
        write(&dir.join("labels.csv"), labels);
        values.insert("labels".into(), json!("labels.csv"));
    }
    graph_load(values, graph_options(data[0], data[1]), &dir);
}

#[path = "gzip.rs"]
mod gzip;
pub use gzip::gzip_stored;

/// An OGB node property folder through the `graph-load` source. Bytes 0-1: graph options;
/// byte 2: bit 0 gzips every text file (`NAME.csv.gz`, stored blocks), bit 1 writes
/// `raw/node-feat`, bit 2 `raw/num-edge-list`, bit 3 the split files under `split/main/`, bit 4
/// adds an empty `split/extra/` folder, bit 5 sets `ogb_split: main`, bit 6 writes the edge
/// part verbatim as `raw/edge.csv.gz` (arbitrary, usually corrupt, gzip bytes), bit 7 leaves
/// `format` at auto. Then the texts of `node-feat`, `node-label`, `num-node-list`,
/// `num-edge-list`, `train`, `valid`, `test` and `edge`, separated by NUL bytes; the edge part
/// is last and runs to the end, so verbatim gzip bytes may hold NULs. A missing part leaves
/// its file out.
pub fn graph_ogb(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let opts = data[2];
    let root = fresh_dir("ogb");
    let dir = root.join("ogbn_fuzz");
    let raw = dir.join("raw");
    let main = dir.join("split").join("main");
    std::fs::create_dir_all(&raw).expect("OGB raw folder");
    let put = |folder: &Path, name: &str, text: &[u8], gzip: bool| {
        if gzip {
            write(&folder.join(format!("{name}.csv.gz")), &gzip_stored(text));
        } else {
            write(&folder.join(format!("{name}.csv")), text);
        }
    };
    let gzip = opts & 1 != 0;
    let p: Vec<&[u8]> = data[3..].splitn(8, |&b| b == 0).collect();
    let files = [
        (&raw, "node-feat", opts & 2 != 0),
        (&raw, "node-label", true),
        (&raw, "num-node-list", true),
        (&raw, "num-edge-list", opts & 4 != 0),
        (&main, "train", opts & 8 != 0),
        (&main, "valid", opts & 8 != 0),
        (&main, "test", opts & 8 != 0),
    ];
    for ((folder, name, wanted), text) in files.iter().zip(&p) {
        if *wanted {
            std::fs::create_dir_all(folder).expect("OGB folder");
            put(folder, name, text, gzip);
        }
    }
    if let Some(edges) = p.get(7) {
        if opts & 64 != 0 {
            write(&raw.join("edge.csv.gz"), edges);
        } else {
            put(&raw, "edge", edges, gzip);
        }
    }
    if opts & 16 != 0 {
        std::fs::create_dir_all(dir.join("split").join("extra")).expect("OGB split folder");
    }
    let mut values = Map::new();
    values.insert("path".into(), json!("ogbn_fuzz"));
    if opts & 128 == 0 {
        values.insert("format".into(), json!("ogb"));
    }
    if opts & 32 != 0 {
        values.insert("ogb_split".into(), json!("main"));
    }
    graph_load(values, graph_options(data[0], data[1]), &root);
}

/// A harness function: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name, as the corpus folders are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("pipeline", pipeline),
    ("npy", npy),
    ("jsonl", jsonl),
    ("image", image),
    ("graph_npz", graph_npz),
    ("graph_tu", graph_tu),
    ("graph_csv", graph_csv),
    ("graph_ogb", graph_ogb),
];
