//! The `graph-load` source: graphs from files, one record per graph.
//!
//! Formats:
//! - **CSR `.npz`** (one graph, node classification): adjacency as `adj_indptr`,
//!   `adj_indices`, `adj_shape` (and `adj_data`, read as a pattern), features as `attr_data`,
//!   `attr_indices`, `attr_indptr`, `attr_shape`, labels as `labels`. Indices may be any
//!   integer type, so both the Planetoid layout (i64, with the standard split in `idx_train`,
//!   `idx_val`, `idx_test`) and the gnn-benchmark layout (i32 indices, i8 labels, string
//!   arrays that are skipped) read. Uncompressed archives only (`np.savez`).
//! - **TU folder** (many graphs, graph classification): `DS_A.txt` (1-based node pairs),
//!   `DS_graph_indicator.txt`, `DS_graph_labels.txt`, and optionally `DS_node_labels.txt`
//!   (one-hot encoded, one block per column, after subtracting the column's minimum, as
//!   PyTorch Geometric does) and `DS_node_attributes.txt` (placed before the one-hot block).
//!   Without either, every node gets the single feature 1. Graph labels are mapped to
//!   `0..classes` in sorted order (MUTAG's −1/1 become 0/1). Edge labels are not read.
//! - **CSV** (one graph, node classification): an edge list (`source,target` per line, extra
//!   columns ignored), a feature file (`id,f1,...,fF` per line; its order numbers the nodes)
//!   and optionally a label file (`id,label`; integers, or class names mapped to `0..classes`
//!   in sorted order; `-1` or empty for an unlabelled node). Commas, tabs or spaces separate
//!   values; a first line that is not data is a header; `#` starts a comment line.
//! - **OGB folder** (one graph, node classification): an Open Graph Benchmark node property
//!   dataset as OGB ships it (`ogbn_arxiv/`). `raw/edge.csv.gz` holds one 0-based `src,dst`
//!   pair per line, `raw/num-node-list.csv.gz` the node count, `raw/node-label.csv.gz` one
//!   class per node (empty, `nan` or `-1`: unlabelled), and optionally `raw/node-feat.csv.gz`
//!   one row of floats per node (without it every node gets the single feature 1) and
//!   `raw/num-edge-list.csv.gz` the edge count, which is checked. The standard split is
//!   `split/<name>/{train,valid,test}.csv.gz` (node ids, one per line); `ogb_split` picks the
//!   folder when there are several. Every file may also be stored uncompressed (`edge.csv`);
//!   when both exist the uncompressed one is read. Multi-column labels (ogbn-proteins),
//!   heterogeneous graphs (ogbn-mag) and graph property datasets (ogbg-*) are refused.
//!
//! Records: node-classification graphs give `x`, `edge_index`, `y` (−1: unlabelled) and the
//! masks of the split; TU graphs give `x`, `edge_index` and `y` as an int. Every problem found
//! in a file is an error naming the file, the line (or array and position) and what is wrong.
//!
//! Decisions:
//! - The planner loads the data in full, so `latentflow validate` reports broken files with the
//!   pipeline position of the parameter that names them; the run loads it again when it reads.
//! - `symmetrise` (default on) adds reverse edges: citation data is often stored with one
//!   direction per link, and the GCN expects an undirected graph. Duplicate edges are dropped.
//! - `split: auto` uses the file's standard split when it has one and a seeded random split
//!   otherwise; the random split takes `train_per_class` nodes of every class, then
//!   `val_size` and `test_size` nodes from the remaining labelled ones (Planetoid's recipe).
//! - OGB text is read a line at a time (through a gzip decoder where the name ends in `.gz`),
//!   and every per-node array grows only as rows arrive: the node count is a single number
//!   that could promise billions of nodes, so nothing is allocated from it. The label file is
//!   required for the same reason (it holds one row per node, so the count is backed by data).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;
use latentflow_engine::{
    DType, Dim, Failure, FieldType, KindInfo, Outcome, ParamKind, ParamSpec, Params, PlanIssue,
    Schema, Shape, Source, SourceFactory,
};
use ndarray::ArrayD;
use ndarray_npy::{NpzReader, ReadNpyError, ReadNpzError};
use serde_json::json;

use super::{Csr, Graph, GraphFields, Rng, Split};

/// The most distinct values of one node-label column that the TU reader one-hot encodes.
const MAX_ONE_HOT: usize = 100_000;

/// The most feature values (nodes × features) a loaded graph may hold: graph stages keep
/// features as a dense `f32` matrix, and this is 1 GiB of it.
const MAX_DENSE_FEATURES: usize = 1 << 28;

/// A problem with an input file.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct LoadError {
    /// The file.
    pub path: PathBuf,
    /// The line, for text files (1-based).
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl LoadError {
    fn new(path: &Path, message: impl Into<String>) -> Self {
        LoadError {
            path: path.to_path_buf(),
            line: None,
            message: message.into(),
        }
    }

    fn at(path: &Path, line: usize, message: impl Into<String>) -> Self {
        LoadError {
            path: path.to_path_buf(),
            line: Some(line),
            message: message.into(),
        }
    }
}

/// How the nodes are split for node classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitMode {
    /// The file's standard split if it has one, otherwise a random one.
    Auto,
    /// The file's standard split (an error if it has none).
    Standard,
    /// A seeded random split.
    Random,
    /// No split (no mask fields).
    None,
}

/// Options applied after reading.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// Add the reverse of every edge.
    pub symmetrise: bool,
    /// Add an edge from every node to itself.
    pub self_loops: bool,
    /// Divide every feature row by its sum.
    pub normalise_features: bool,
    /// The node split.
    pub split: SplitMode,
    /// Random split: training nodes per class.
    pub train_per_class: usize,
    /// Random split: validation nodes.
    pub val_size: usize,
    /// Random split: test nodes.
    pub test_size: usize,
    /// Random split: seed.
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            symmetrise: true,
            self_loops: false,
            normalise_features: false,
            split: SplitMode::Auto,
            train_per_class: 20,
            val_size: 500,
            test_size: 1000,
            seed: 0,
        }
    }
}

/// Where a dataset is and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A CSR `.npz` file.
    Npz(PathBuf),
    /// A TU dataset folder.
    Tu(PathBuf),
    /// An edge list with a feature file and optionally a label file.
    Csv {
        /// The edge list.
        edges: PathBuf,
        /// Node features.
        features: PathBuf,
        /// Node labels.
        labels: Option<PathBuf>,
    },
    /// An OGB node property dataset folder (holding `raw/` and `split/`).
    Ogb {
        /// The dataset folder.
        dir: PathBuf,
        /// The folder under `split/` that holds the standard split; needed when there are
        /// several.
        split: Option<String>,
    },
}

/// The graphs of a dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The dataset's name (file stem or folder name); record keys start with it.
    pub name: String,
    /// One graph for node classification, one per example for graph classification.
    pub graphs: Vec<Graph>,
    /// Whether the graphs carry graph labels (TU) rather than node labels.
    pub graph_level: bool,
}

/// Loads a dataset.
pub fn load(input: &Input, opts: &LoadOptions) -> Result<Dataset, LoadError> {
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "graph".into())
    };
    let (name, mut graphs, graph_level) = match input {
        Input::Npz(p) => (stem(p), vec![read_npz(p, opts)?], false),
        Input::Tu(dir) => {
            if matches!(opts.split, SplitMode::Standard | SplitMode::Random) {
                return Err(LoadError::new(
                    dir,
                    "a TU dataset is for graph classification; node splits do not apply (use \
                     split: none or auto)",
                ));
            }
            let (name, graphs) = read_tu(dir)?;
            (name, graphs, true)
        }
        Input::Csv {
            edges,
            features,
            labels,
        } => (
            stem(edges),
            vec![read_csv(edges, features, labels.as_deref(), opts)?],
            false,
        ),
        Input::Ogb { dir, split } => (
            dir.file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "graph".into()),
            vec![read_ogb(dir, split.as_deref(), opts)?],
            false,
        ),
    };
    for g in &mut graphs {
        if opts.symmetrise {
            g.symmetrise();
        }
        if opts.self_loops {
            g.add_self_loops();
        }
        if opts.normalise_features {
            g.features.row_normalise();
        }
    }
    Ok(Dataset {
        name,
        graphs,
        graph_level,
    })
}

/// Picks the split of a node-classification graph: the standard one from the file when asked
/// for (or by `auto` when there is one), a seeded random one, or none.
fn choose_split(
    path: &Path,
    labels: Option<&[i64]>,
    standard: Option<Split>,
    opts: &LoadOptions,
) -> Result<Option<Split>, LoadError> {
    let split = match (opts.split, standard) {
        (SplitMode::None, _) => None,
        (SplitMode::Standard | SplitMode::Auto, Some(s)) => Some(s),
        (SplitMode::Standard, None) => {
            return Err(LoadError::new(
                path,
                "the data has no standard split; use split: random",
            ))
        }
        (SplitMode::Auto, None) if labels.is_none() => None,
        (SplitMode::Random | SplitMode::Auto, _) => {
            let labels = labels.ok_or_else(|| {
                LoadError::new(path, "a random split needs node labels, and there are none")
            })?;
            Some(random_split(labels, opts).map_err(|m| LoadError::new(path, m))?)
        }
    };
    if let (Some(s), Some(l)) = (&split, labels) {
        if let Some(&i) = s.train.iter().find(|&&i| l[i] < 0) {
            return Err(LoadError::new(
                path,
                format!("training node {i} has no label (label {})", l[i]),
            ));
        }
    }
    Ok(split)
}

/// Planetoid's random split: `train_per_class` nodes of every class, then `val_size` and
/// `test_size` nodes from the remaining labelled nodes; unlabelled nodes are never picked.
pub fn random_split(labels: &[i64], opts: &LoadOptions) -> Result<Split, String> {
    let mut rng = Rng::new(opts.seed);
    let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate().filter(|(_, &l)| l >= 0) {
        by_class.entry(l).or_default().push(i);
    }
    let mut train = Vec::new();
    let mut rest = Vec::new();
    for (class, mut nodes) in by_class {
        if nodes.len() < opts.train_per_class {
            return Err(format!(
                "class {class} has {} labelled nodes, fewer than train_per_class = {}",
                nodes.len(),
                opts.train_per_class
            ));
        }
        rng.shuffle(&mut nodes);
        train.extend_from_slice(&nodes[..opts.train_per_class]);
        rest.extend_from_slice(&nodes[opts.train_per_class..]);
    }
    rest.sort_unstable();
    rng.shuffle(&mut rest);
    if rest.len() < opts.val_size + opts.test_size {
        return Err(format!(
            "a random split wants {} validation and {} test nodes, but only {} labelled nodes \
             remain after the {} training nodes; lower val_size or test_size",
            opts.val_size,
            opts.test_size,
            rest.len(),
            train.len()
        ));
    }
    let mut val = rest[..opts.val_size].to_vec();
    let mut test = rest[opts.val_size..opts.val_size + opts.test_size].to_vec();
    train.sort_unstable();
    val.sort_unstable();
    test.sort_unstable();
    Ok(Split { train, val, test })
}

// ---------------------------------------------------------------------------------------------
// CSR .npz

struct Npz {
    path: PathBuf,
    reader: NpzReader<File>,
    names: BTreeSet<String>,
}

impl Npz {
    fn open(path: &Path) -> Result<Npz, LoadError> {
        let file =
            File::open(path).map_err(|e| LoadError::new(path, format!("cannot open: {e}")))?;
        let mut reader = NpzReader::new(file).map_err(|e| {
            LoadError::new(
                path,
                format!("not a .npz file (numpy's zip of .npy arrays): {e}"),
            )
        })?;
        let names = reader
            .names()
            .map_err(|e| LoadError::new(path, format!("cannot list the arrays: {e}")))?
            .into_iter()
            .collect();
        Ok(Npz {
            path: path.to_path_buf(),
            reader,
            names,
        })
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn missing(&self, name: &str, what: &str) -> LoadError {
        LoadError::new(
            &self.path,
            format!(
                "array `{name}` ({what}) is missing; the file holds {}",
                self.names.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    }

    fn error(&self, name: &str, e: ReadNpzError) -> LoadError {
        let detail = match &e {
            ReadNpzError::Zip(z) if z.to_string().contains("compression") => {
                "compressed archives are not supported; save with np.savez, not \
                 np.savez_compressed"
                    .to_string()
            }
            ReadNpzError::Npy(ReadNpyError::WrongDescriptor(d)) => {
                format!("unsupported element type {d}")
            }
            ReadNpzError::Npy(ReadNpyError::WrongNdim(want, got)) => {
                format!("has {got} axes, expected {}", want.unwrap_or(1))
            }
            _ => e.to_string(),
        };
        LoadError::new(&self.path, format!("array `{name}`: {detail}"))
    }

    /// A 1-D integer array of any integer element type.
    fn ints(&mut self, name: &str) -> Result<Vec<i64>, LoadError> {
        macro_rules! attempt {
            ($($t:ty),*) => {
                $(
                    match self.reader.by_name::<ndarray::OwnedRepr<$t>, ndarray::IxDyn>(name) {
                        Ok(a) => return self.flat(name, a.mapv(|v| v as i64)),
                        Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(_))) => {}
                        Err(e) => return Err(self.error(name, e)),
                    }
                )*
            };
        }
        attempt!(i64, i32, i16, i8, u8, u16, u32, u64);
        let e = self
            .reader
            .by_name::<ndarray::OwnedRepr<i64>, ndarray::IxDyn>(name)
            .expect_err("every integer type failed");
        Err(self.error(name, e))
    }

    /// A 1-D float array (f32 or f64).
    fn floats(&mut self, name: &str) -> Result<Vec<f32>, LoadError> {
        match self
            .reader
            .by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(name)
        {
            Ok(a) => return self.flat(name, a),
            Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(_))) => {}
            Err(e) => return Err(self.error(name, e)),
        }
        match self
            .reader
            .by_name::<ndarray::OwnedRepr<f64>, ndarray::IxDyn>(name)
        {
            Ok(a) => self.flat(name, a.mapv(|v| v as f32)),
            Err(e) => Err(self.error(name, e)),
        }
    }

    fn flat<T>(&self, name: &str, a: ArrayD<T>) -> Result<Vec<T>, LoadError> {
        if a.ndim() != 1 {
            return Err(LoadError::new(
                &self.path,
                format!(
                    "array `{name}` has shape {:?}, expected one axis",
                    a.shape()
                ),
            ));
        }
        Ok(a.into_raw_vec_and_offset().0)
    }

    /// A CSR matrix stored as `{prefix}_indptr`, `{prefix}_indices`, `{prefix}_shape` and
    /// (optionally, else ones) `{prefix}_data`, checked entry by entry.
    fn csr(&mut self, prefix: &str, what: &str) -> Result<Csr, LoadError> {
        let name = |s: &str| format!("{prefix}_{s}");
        for part in ["indptr", "indices", "shape"] {
            if !self.has(&name(part)) {
                return Err(self.missing(&name(part), what));
            }
        }
        let shape = self.ints(&name("shape"))?;
        let (rows, cols) = match shape[..] {
            [r, c] if r >= 0 && c >= 0 => (r as usize, c as usize),
            _ => {
                return Err(LoadError::new(
                    &self.path,
                    format!(
                        "array `{}` is {shape:?}, expected [rows, columns]",
                        name("shape")
                    ),
                ))
            }
        };
        let indptr = self.ints(&name("indptr"))?;
        let indices = self.ints(&name("indices"))?;
        let data = if self.has(&name("data")) {
            self.floats(&name("data"))?
        } else {
            vec![1.0; indices.len()]
        };
        let bad = |m: String| LoadError::new(&self.path, m);
        if indptr.len() != rows + 1 {
            return Err(bad(format!(
                "array `{}` has {} entries, expected rows + 1 = {} for the shape {shape:?} of \
                 `{}`",
                name("indptr"),
                indptr.len(),
                rows + 1,
                name("shape")
            )));
        }
        if data.len() != indices.len() {
            return Err(bad(format!(
                "arrays `{}` and `{}` differ in length ({} and {})",
                name("data"),
                name("indices"),
                data.len(),
                indices.len()
            )));
        }
        if indptr[0] != 0
            || indptr.windows(2).any(|w| w[1] < w[0])
            || indptr[rows] != indices.len() as i64
        {
            return Err(bad(format!(
                "array `{}` must start at 0, never decrease and end at the {} stored entries",
                name("indptr"),
                indices.len()
            )));
        }
        let mut entries = Vec::with_capacity(indices.len());
        for r in 0..rows {
            for k in indptr[r] as usize..indptr[r + 1] as usize {
                let c = indices[k];
                if c < 0 || c as usize >= cols {
                    return Err(bad(format!(
                        "`{}[{k}]` = {c} (row {r}) is outside 0..{cols}",
                        name("indices")
                    )));
                }
                entries.push((r, c as usize, data[k]));
            }
        }
        Ok(Csr::from_triplets(rows, cols, entries))
    }
}

fn read_npz(path: &Path, opts: &LoadOptions) -> Result<Graph, LoadError> {
    let mut npz = Npz::open(path)?;
    let adj = npz.csr("adj", "the adjacency")?;
    if adj.rows != adj.cols {
        return Err(LoadError::new(
            path,
            format!(
                "the adjacency is {} × {}, expected a square matrix",
                adj.rows, adj.cols
            ),
        ));
    }
    let n = adj.rows;
    let mut edges = Vec::with_capacity(adj.nnz());
    for s in 0..n {
        edges.extend(adj.row(s).0.iter().map(|&t| (s, t)));
    }
    let features = npz.csr("attr", "the node features")?;
    let dense = features.rows as u128 * features.cols as u128;
    if dense > MAX_DENSE_FEATURES as u128 {
        return Err(LoadError::new(
            path,
            format!(
                "the node features are {} x {}, {dense} values, more than the {MAX_DENSE_FEATURES} \
                 (1 GiB) that graph stages hold as a dense matrix; reduce the feature dimension \
                 first (for example with a truncated SVD)",
                features.rows, features.cols
            ),
        ));
    }
    if features.rows != n {
        return Err(LoadError::new(
            path,
            format!(
                "the features have {} rows but the adjacency has {n} nodes",
                features.rows
            ),
        ));
    }

    let labels = if npz.has("labels") {
        let l = npz.ints("labels")?;
        if l.len() != n {
            return Err(LoadError::new(
                path,
                format!("array `labels` has {} entries for {n} nodes", l.len()),
            ));
        }
        Some(l.into_iter().map(|v| v.max(-1)).collect::<Vec<i64>>())
    } else if npz.has("labels_indptr") {
        return Err(LoadError::new(
            path,
            "multi-label node labels (a CSR `labels_*`) are not supported",
        ));
    } else {
        None
    };

    let names = ["idx_train", "idx_val", "idx_test"];
    let standard = if names.iter().all(|s| npz.has(s)) {
        let mut parts = Vec::new();
        for s in names {
            let idx = npz.ints(s)?;
            if let Some((k, &i)) = idx
                .iter()
                .enumerate()
                .find(|(_, &i)| i < 0 || i as usize >= n)
            {
                return Err(LoadError::new(
                    path,
                    format!("`{s}[{k}]` = {i} is outside 0..{n}"),
                ));
            }
            parts.push(idx.into_iter().map(|i| i as usize).collect::<Vec<_>>());
        }
        let test = parts.pop().expect("three");
        let val = parts.pop().expect("three");
        let train = parts.pop().expect("three");
        Some(Split { train, val, test })
    } else {
        None
    };
    let split = choose_split(path, labels.as_deref(), standard, opts)?;
    Ok(Graph {
        num_nodes: n,
        edges,
        features,
        labels,
        graph_label: None,
        split,
    })
}

// ---------------------------------------------------------------------------------------------
// Text files

/// The non-empty, non-comment lines of a text file with their 1-based numbers.
fn lines(path: &Path) -> Result<Vec<(usize, String)>, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::new(path, format!("cannot read: {e}")))?;
    Ok(text
        .lines()
        .enumerate()
        // Tabs stay: a trailing tab ends an empty last value (an unlabelled node).
        .map(|(i, l)| (i + 1, l.trim_matches([' ', '\r']).to_string()))
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .collect())
}

/// The values of a line, split on commas, else tabs, else spaces.
fn fields(line: &str) -> Vec<&str> {
    if line.contains(',') {
        line.split(',').map(str::trim).collect()
    } else if line.contains('\t') {
        line.split('\t').map(str::trim).collect()
    } else {
        line.split_whitespace().collect()
    }
}

fn int_at(path: &Path, line: usize, s: &str, what: &str) -> Result<i64, LoadError> {
    s.parse()
        .map_err(|_| LoadError::at(path, line, format!("{what} `{s}` is not an integer")))
}

fn float_at(path: &Path, line: usize, col: usize, s: &str) -> Result<f32, LoadError> {
    s.parse().map_err(|_| {
        LoadError::at(
            path,
            line,
            format!("value `{s}` in column {col} is not a number"),
        )
    })
}

/// Rows of numbers that must all have the same length.
fn float_rows(path: &Path, rows: &[(usize, String)]) -> Result<Vec<Vec<f32>>, LoadError> {
    let mut out = Vec::with_capacity(rows.len());
    let mut width: Option<(usize, usize)> = None;
    for (line, text) in rows {
        let vals = fields(text)
            .iter()
            .enumerate()
            .map(|(c, s)| float_at(path, *line, c + 1, s))
            .collect::<Result<Vec<f32>, _>>()?;
        match width {
            Some((w, first)) if w != vals.len() => {
                return Err(LoadError::at(
                    path,
                    *line,
                    format!(
                        "{} values, but line {first} has {w}: every row needs the same number",
                        vals.len()
                    ),
                ))
            }
            None => width = Some((vals.len(), *line)),
            _ => {}
        }
        out.push(vals);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// TU folders

/// The file `{prefix}_{part}.txt` of a TU folder.
fn tu_file(dir: &Path, prefix: &str, part: &str) -> PathBuf {
    dir.join(format!("{prefix}_{part}.txt"))
}

/// The dataset prefix: the folder's name if `NAME_A.txt` exists, else the one `*_A.txt`.
fn tu_prefix(dir: &Path) -> Result<String, LoadError> {
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    if tu_file(dir, &name, "A").is_file() {
        return Ok(name);
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| LoadError::new(dir, format!("cannot list the folder: {e}")))?;
    let found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix("_A.txt")
                .map(String::from)
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(LoadError::new(
            dir,
            "no `*_A.txt` adjacency file: not a TU dataset folder",
        )),
        many => Err(LoadError::new(
            dir,
            format!("several TU datasets in one folder: {}", many.join(", ")),
        )),
    }
}

fn read_tu(dir: &Path) -> Result<(String, Vec<Graph>), LoadError> {
    let prefix = tu_prefix(dir)?;
    let file = |part: &str| tu_file(dir, &prefix, part);
    let required = |part: &str| {
        let p = file(part);
        if p.is_file() {
            Ok(p)
        } else {
            Err(LoadError::new(
                &p,
                "missing: a TU dataset needs DS_A.txt, DS_graph_indicator.txt and \
                 DS_graph_labels.txt",
            ))
        }
    };

    // Which graph each node belongs to; nodes of one graph are consecutive.
    let ind_path = required("graph_indicator")?;
    let ind = lines(&ind_path)?;
    let mut graph_of = Vec::with_capacity(ind.len());
    let mut starts: Vec<usize> = Vec::new();
    for (line, text) in &ind {
        let g = int_at(&ind_path, *line, text, "graph id")?;
        let expected_next = starts.len() as i64 + 1;
        if g == expected_next {
            starts.push(graph_of.len());
        } else if starts.is_empty() || g != expected_next - 1 {
            return Err(LoadError::at(
                &ind_path,
                *line,
                format!(
                    "graph id {g} where {} was expected: graph ids start at 1 and the nodes \
                     of a graph are consecutive",
                    if starts.is_empty() {
                        "1".to_string()
                    } else {
                        format!("{} or {expected_next}", expected_next - 1)
                    }
                ),
            ));
        }
        graph_of.push(starts.len() - 1);
    }
    let n = graph_of.len();
    let num_graphs = starts.len();
    if num_graphs == 0 {
        return Err(LoadError::new(&ind_path, "no nodes"));
    }
    let size = |g: usize| starts.get(g + 1).copied().unwrap_or(n) - starts[g];

    let gl_path = required("graph_labels")?;
    let gl = lines(&gl_path)?;
    if gl.len() != num_graphs {
        return Err(LoadError::new(
            &gl_path,
            format!(
                "{} labels, but {} names {num_graphs} graphs",
                gl.len(),
                ind_path.display()
            ),
        ));
    }
    let raw_labels = gl
        .iter()
        .map(|(line, text)| int_at(&gl_path, *line, text, "graph label"))
        .collect::<Result<Vec<i64>, _>>()?;
    let classes: BTreeSet<i64> = raw_labels.iter().copied().collect();
    let class_index: BTreeMap<i64, i64> = classes
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, i as i64))
        .collect();

    let a_path = required("A")?;
    let mut edges: Vec<Vec<(usize, usize)>> = vec![Vec::new(); num_graphs];
    for (line, text) in lines(&a_path)? {
        let f = fields(&text);
        if f.len() != 2 {
            return Err(LoadError::at(
                &a_path,
                line,
                format!("expected two node ids, found `{text}`"),
            ));
        }
        let mut ids = [0usize; 2];
        for (k, s) in f.iter().enumerate() {
            let id = int_at(&a_path, line, s, "node id")?;
            if id < 1 || id as usize > n {
                return Err(LoadError::at(
                    &a_path,
                    line,
                    format!(
                        "node id {id} is outside 1..={n} (the nodes of {})",
                        ind_path.display()
                    ),
                ));
            }
            ids[k] = id as usize - 1;
        }
        let (gs, gt) = (graph_of[ids[0]], graph_of[ids[1]]);
        if gs != gt {
            return Err(LoadError::at(
                &a_path,
                line,
                format!(
                    "edge {} - {} joins graph {} and graph {}",
                    ids[0] + 1,
                    ids[1] + 1,
                    gs + 1,
                    gt + 1
                ),
            ));
        }
        edges[gs].push((ids[0] - starts[gs], ids[1] - starts[gs]));
    }

    // Features: node attributes, then the one-hot node labels, else a constant.
    let mut columns: Vec<Vec<f32>> = vec![Vec::new(); n];
    let attr_path = file("node_attributes");
    if attr_path.is_file() {
        let rows = lines(&attr_path)?;
        if rows.len() != n {
            return Err(LoadError::new(
                &attr_path,
                format!("{} rows for {n} nodes", rows.len()),
            ));
        }
        for (c, r) in columns.iter_mut().zip(float_rows(&attr_path, &rows)?) {
            c.extend(r);
        }
    }
    let nl_path = file("node_labels");
    if nl_path.is_file() {
        let rows = lines(&nl_path)?;
        if rows.len() != n {
            return Err(LoadError::new(
                &nl_path,
                format!("{} labels for {n} nodes", rows.len()),
            ));
        }
        let mut parsed: Vec<Vec<i64>> = Vec::with_capacity(n);
        for (line, text) in &rows {
            let vals = fields(text)
                .iter()
                .map(|s| int_at(&nl_path, *line, s, "node label"))
                .collect::<Result<Vec<i64>, _>>()?;
            if let Some(first) = parsed.first() {
                if first.len() != vals.len() {
                    return Err(LoadError::at(
                        &nl_path,
                        *line,
                        format!(
                            "{} labels, but the first line has {}",
                            vals.len(),
                            first.len()
                        ),
                    ));
                }
            }
            parsed.push(vals);
        }
        for k in 0..parsed[0].len() {
            let min = parsed.iter().map(|v| v[k]).min().unwrap_or(0);
            let max = parsed.iter().map(|v| v[k]).max().unwrap_or(0);
            let width = (max as i128 - min as i128 + 1) as u128;
            if width > MAX_ONE_HOT as u128 {
                return Err(LoadError::new(
                    &nl_path,
                    format!(
                        "node labels of column {} span {min}..={max}, {width} values, too many to \
                         one-hot encode (at most {MAX_ONE_HOT}); renumber them from 0",
                        k + 1
                    ),
                ));
            }
            let width = width as usize;
            let total = (columns[0].len() + width) as u128 * n as u128;
            if total > MAX_DENSE_FEATURES as u128 {
                return Err(LoadError::new(
                    &nl_path,
                    format!(
                        "one-hot node labels would give {n} nodes x {} features, more than the \
                         {MAX_DENSE_FEATURES} values (1 GiB) graph stages hold densely",
                        columns[0].len() + width
                    ),
                ));
            }
            for (c, v) in columns.iter_mut().zip(&parsed) {
                let at = c.len();
                c.resize(at + width, 0.0);
                c[at + (v[k] - min) as usize] = 1.0;
            }
        }
    }
    if columns[0].is_empty() {
        columns.iter_mut().for_each(|c| c.push(1.0));
    }
    let width = columns[0].len();

    let mut graphs = Vec::with_capacity(num_graphs);
    for (g, mut e) in edges.into_iter().enumerate() {
        let nodes = size(g);
        let mut entries = Vec::new();
        for (i, row) in columns[starts[g]..starts[g] + nodes].iter().enumerate() {
            entries.extend(
                row.iter()
                    .enumerate()
                    .filter(|(_, &v)| v != 0.0)
                    .map(|(j, &v)| (i, j, v)),
            );
        }
        e.sort_unstable();
        e.dedup();
        graphs.push(Graph {
            num_nodes: nodes,
            edges: e,
            features: Csr::from_triplets(nodes, width, entries),
            labels: None,
            graph_label: Some(class_index[&raw_labels[g]]),
            split: None,
        });
    }
    Ok((prefix, graphs))
}

// ---------------------------------------------------------------------------------------------
// CSV

fn read_csv(
    edges_path: &Path,
    features_path: &Path,
    labels_path: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Graph, LoadError> {
    // Features: the file's order numbers the nodes.
    let rows = lines(features_path)?;
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut first_line: Vec<usize> = Vec::new();
    let mut feats: Vec<Vec<f32>> = Vec::new();
    let mut width: Option<(usize, usize)> = None;
    for (k, (line, text)) in rows.iter().enumerate() {
        let f = fields(text);
        if k == 0 && f.len() > 1 && f[1..].iter().all(|s| s.parse::<f32>().is_err()) {
            continue; // a header
        }
        let values = f[1..]
            .iter()
            .enumerate()
            .map(|(c, s)| float_at(features_path, *line, c + 2, s))
            .collect::<Result<Vec<f32>, _>>()?;
        if values.is_empty() {
            return Err(LoadError::at(
                features_path,
                *line,
                "a node id without feature values: expected `id,f1,...,fF`",
            ));
        }
        match width {
            Some((w, at)) if w != values.len() => {
                return Err(LoadError::at(
                    features_path,
                    *line,
                    format!(
                        "{} feature values, but line {at} has {w}: every node needs the same \
                         number",
                        values.len()
                    ),
                ))
            }
            None => width = Some((values.len(), *line)),
            _ => {}
        }
        let id = f[0].to_string();
        if let Some(&prev) = ids.get(&id) {
            return Err(LoadError::at(
                features_path,
                *line,
                format!(
                    "node `{id}` appears again (first on line {})",
                    first_line[prev]
                ),
            ));
        }
        ids.insert(id, feats.len());
        first_line.push(*line);
        feats.push(values);
    }
    let n = feats.len();
    if n == 0 {
        return Err(LoadError::new(features_path, "no nodes"));
    }
    let width = width.map_or(0, |w| w.0);
    let mut entries = Vec::new();
    for (i, row) in feats.iter().enumerate() {
        entries.extend(
            row.iter()
                .enumerate()
                .filter(|(_, &v)| v != 0.0)
                .map(|(j, &v)| (i, j, v)),
        );
    }
    let features = Csr::from_triplets(n, width, entries);

    // Edges between known nodes.
    let node = |path: &Path, line: usize, id: &str| {
        ids.get(id).copied().ok_or_else(|| {
            LoadError::at(
                path,
                line,
                format!(
                    "node `{id}` is not in {} ({n} nodes)",
                    features_path.display()
                ),
            )
        })
    };
    let mut edges = Vec::new();
    for (k, (line, text)) in lines(edges_path)?.iter().enumerate() {
        let f = fields(text);
        if f.len() < 2 {
            return Err(LoadError::at(
                edges_path,
                *line,
                format!("expected `source,target`, found `{text}`"),
            ));
        }
        if k == 0 && !ids.contains_key(f[0]) && !ids.contains_key(f[1]) {
            continue; // a header
        }
        edges.push((
            node(edges_path, *line, f[0])?,
            node(edges_path, *line, f[1])?,
        ));
    }
    edges.sort_unstable();
    edges.dedup();

    // Labels for every node.
    let labels = match labels_path {
        None => None,
        Some(path) => {
            let mut raw: Vec<Option<(usize, String)>> = vec![None; n];
            for (k, (line, text)) in lines(path)?.iter().enumerate() {
                let f = fields(text);
                if k == 0 && !ids.contains_key(f[0]) {
                    continue; // a header
                }
                if f.len() < 2 {
                    return Err(LoadError::at(
                        path,
                        *line,
                        format!("expected `id,label`, found `{text}`"),
                    ));
                }
                let i = node(path, *line, f[0])?;
                if let Some((prev, _)) = &raw[i] {
                    return Err(LoadError::at(
                        path,
                        *line,
                        format!("node `{}` has a second label (first on line {prev})", f[0]),
                    ));
                }
                raw[i] = Some((*line, f[1].to_string()));
            }
            let missing: Vec<&str> = ids
                .iter()
                .filter(|(_, &i)| raw[i].is_none())
                .map(|(id, _)| id.as_str())
                .collect();
            if !missing.is_empty() {
                let mut some: Vec<&str> = missing.clone();
                some.sort_unstable();
                some.truncate(5);
                return Err(LoadError::new(
                    path,
                    format!(
                        "{} nodes have no label (e.g. {}); give `-1` or an empty label for an \
                         unlabelled node",
                        missing.len(),
                        some.join(", ")
                    ),
                ));
            }
            Some(parse_labels(
                raw.into_iter().map(|r| r.expect("checked")).collect(),
            ))
        }
    };
    let split = choose_split(features_path, labels.as_deref(), None, opts)?;
    Ok(Graph {
        num_nodes: n,
        edges,
        features,
        labels,
        graph_label: None,
        split,
    })
}

/// Integer labels as they are, or class names numbered in sorted order; `-1` and empty are
/// unlabelled.
fn parse_labels(raw: Vec<(usize, String)>) -> Vec<i64> {
    let unlabelled = |s: &str| s.is_empty() || s == "-1";
    let ints: Option<Vec<i64>> = raw
        .iter()
        .map(|(_, s)| {
            if unlabelled(s) {
                Some(-1)
            } else {
                s.parse::<i64>().ok().filter(|&v| v >= 0)
            }
        })
        .collect();
    if let Some(v) = ints {
        return v;
    }
    let names: BTreeSet<&str> = raw
        .iter()
        .map(|(_, s)| s.as_str())
        .filter(|s| !unlabelled(s))
        .collect();
    let index: HashMap<&str, i64> = names
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, i as i64))
        .collect();
    raw.iter()
        .map(|(_, s)| index.get(s.as_str()).copied().unwrap_or(-1))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// OGB folders

/// A text file read one line at a time, through a gzip decoder when its name ends in `.gz`.
struct TextLines {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    /// The number of the line last returned (1-based).
    line: usize,
    buf: Vec<u8>,
}

impl TextLines {
    fn open(path: &Path) -> Result<TextLines, LoadError> {
        let file =
            File::open(path).map_err(|e| LoadError::new(path, format!("cannot open: {e}")))?;
        let gzip = path.extension().is_some_and(|e| e == "gz");
        let reader: Box<dyn BufRead> = if gzip {
            Box::new(BufReader::new(MultiGzDecoder::new(BufReader::new(file))))
        } else {
            Box::new(BufReader::new(file))
        };
        Ok(TextLines {
            path: path.to_path_buf(),
            reader,
            line: 0,
            buf: Vec::new(),
        })
    }

    /// The next line without its line ending and surrounding spaces, with its number; `None`
    /// at the end of the file.
    fn next_line(&mut self) -> Result<Option<(usize, &str)>, LoadError> {
        self.buf.clear();
        let at = self.line + 1;
        let read = self.reader.read_until(b'\n', &mut self.buf).map_err(|e| {
            let what = if self.path.extension().is_some_and(|e| e == "gz") {
                "the gzip stream is corrupt or truncated"
            } else {
                "cannot read"
            };
            LoadError::at(&self.path, at, format!("{what}: {e}"))
        })?;
        if read == 0 {
            return Ok(None);
        }
        self.line = at;
        let text = std::str::from_utf8(&self.buf)
            .map_err(|_| LoadError::at(&self.path, at, "not UTF-8 text"))?;
        Ok(Some((at, text.trim_matches([' ', '\t', '\r', '\n']))))
    }
}

/// `NAME.csv` in `dir` if it exists, else `NAME.csv.gz` (also the name a missing file is
/// reported under).
fn ogb_file(dir: &Path, name: &str) -> PathBuf {
    let plain = dir.join(format!("{name}.csv"));
    if plain.is_file() {
        plain
    } else {
        dir.join(format!("{name}.csv.gz"))
    }
}

/// Whether `dir` looks like an OGB dataset folder: it has `raw/edge.csv(.gz)`.
fn is_ogb_folder(dir: &Path) -> bool {
    ogb_file(&dir.join("raw"), "edge").is_file()
}

/// The single non-negative integer of a one-line count file (`num-node-list`, `num-edge-list`),
/// with its line.
fn ogb_count(path: &Path, what: &str) -> Result<(usize, usize), LoadError> {
    let mut text = TextLines::open(path)?;
    let mut found = None;
    while let Some((line, s)) = text.next_line()? {
        if s.is_empty() {
            continue;
        }
        if found.is_some() {
            return Err(LoadError::at(
                path,
                line,
                "a second count: a node property dataset holds one graph (graph property \
                 datasets, ogbg-*, are not supported)",
            ));
        }
        let v = int_at(path, line, s, what)?;
        let v = usize::try_from(v)
            .map_err(|_| LoadError::at(path, line, format!("{what} {v} is negative")))?;
        found = Some((v, line));
    }
    found.ok_or_else(|| LoadError::new(path, format!("empty: expected the {what}")))
}

/// A node label of an OGB label file: a class number, or −1 for an unlabelled node (empty,
/// `nan` or `-1`). Pandas writes a label column with missing values as floats (`3.0`).
fn ogb_label(path: &Path, line: usize, s: &str) -> Result<i64, LoadError> {
    if s.is_empty() || s.eq_ignore_ascii_case("nan") {
        return Ok(-1);
    }
    let columns = fields(s).len();
    if columns > 1 {
        return Err(LoadError::at(
            path,
            line,
            format!(
                "{columns} label columns: multi-label node labels (as in ogbn-proteins) are \
                 not supported; a node needs one class"
            ),
        ));
    }
    let v = match s.parse::<i64>() {
        Ok(v) => Some(v),
        Err(_) => s
            .parse::<f64>()
            .ok()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
            .map(|f| f as i64),
    };
    match v {
        Some(v) if v >= -1 => Ok(v),
        _ => Err(LoadError::at(
            path,
            line,
            format!(
                "label `{s}` is not a class number (0, 1, ...; empty, `nan` or -1 for an \
                 unlabelled node)"
            ),
        )),
    }
}

/// A node id of an OGB edge or split file, checked against the node count.
fn ogb_node(path: &Path, line: usize, s: &str, n: usize, count: &Path) -> Result<usize, LoadError> {
    let id = int_at(path, line, s, "node id")?;
    if id < 0 || id as u64 >= n as u64 {
        return Err(LoadError::at(
            path,
            line,
            format!(
                "node id {id} is outside 0..{n} (the node count in {})",
                count.display()
            ),
        ));
    }
    Ok(id as usize)
}

/// The split folder to read under `split/`: the one named, else the only one; `None` without
/// any.
fn ogb_split_dir(dir: &Path, name: Option<&str>) -> Result<Option<PathBuf>, LoadError> {
    let root = dir.join("split");
    let mut found: Vec<String> = match std::fs::read_dir(&root) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect(),
        Err(_) if !root.exists() => Vec::new(),
        Err(e) => {
            return Err(LoadError::new(
                &root,
                format!("cannot list the folder: {e}"),
            ))
        }
    };
    found.sort();
    match (name, found.as_slice()) {
        (Some(n), _) if found.iter().any(|f| f == n) => Ok(Some(root.join(n))),
        (Some(n), _) => Err(LoadError::new(
            &root,
            format!(
                "no split folder `{n}` (ogb_split); the folder holds {}",
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                }
            ),
        )),
        (None, []) => Ok(None),
        (None, [one]) => Ok(Some(root.join(one))),
        (None, many) => Err(LoadError::new(
            &root,
            format!(
                "several splits ({}); pick one with `ogb_split`",
                many.join(", ")
            ),
        )),
    }
}

fn read_ogb(dir: &Path, split_name: Option<&str>, opts: &LoadOptions) -> Result<Graph, LoadError> {
    let raw = dir.join("raw");
    let required = |name: &str| {
        let p = ogb_file(&raw, name);
        if p.is_file() {
            return Ok(p);
        }
        let mut message = "missing: an OGB node property folder needs raw/edge.csv.gz, \
                           raw/node-label.csv.gz and raw/num-node-list.csv.gz (or the same \
                           files uncompressed)"
            .to_string();
        if raw.join("relations").is_dir() || raw.join("node-feat").is_dir() {
            message += "; this looks like a heterogeneous dataset (ogbn-mag), which is not \
                        supported";
        }
        Err(LoadError::new(&p, message))
    };

    // The node count; no array is sized from it, since it is not data.
    let count_path = required("num-node-list")?;
    let (n, count_line) = ogb_count(&count_path, "node count")?;
    if n == 0 {
        return Err(LoadError::at(&count_path, count_line, "no nodes"));
    }
    let disagree = |file: &Path, rows: usize, what: &str| {
        LoadError::at(
            &count_path,
            count_line,
            format!(
                "{n} nodes, but {} has {rows} {what} (one per node)",
                file.display()
            ),
        )
    };

    // Labels: one line per node, so an empty line is an unlabelled node.
    let label_path = required("node-label")?;
    let mut labels = Vec::new();
    let mut text = TextLines::open(&label_path)?;
    while let Some((line, s)) = text.next_line()? {
        if labels.len() == n {
            return Err(LoadError::at(
                &label_path,
                line,
                format!(
                    "a label for node {} but {} names {n} nodes",
                    labels.len(),
                    count_path.display()
                ),
            ));
        }
        labels.push(ogb_label(&label_path, line, s)?);
    }
    if labels.len() != n {
        return Err(disagree(&label_path, labels.len(), "labels"));
    }

    // Features, row by row into CSR; the dense size is checked on the first row.
    let feat_path = ogb_file(&raw, "node-feat");
    let features = if feat_path.is_file() {
        let mut indptr = vec![0];
        let mut indices = Vec::new();
        let mut data = Vec::new();
        let mut width: Option<(usize, usize)> = None;
        let mut text = TextLines::open(&feat_path)?;
        while let Some((line, s)) = text.next_line()? {
            let row = indptr.len() - 1;
            if row == n {
                return Err(LoadError::at(
                    &feat_path,
                    line,
                    format!(
                        "a feature row for node {row} but {} names {n} nodes",
                        count_path.display()
                    ),
                ));
            }
            if s.is_empty() {
                return Err(LoadError::at(
                    &feat_path,
                    line,
                    "an empty row: every node needs its feature values",
                ));
            }
            let values = fields(s);
            match width {
                None => {
                    let dense = n as u128 * values.len() as u128;
                    if dense > MAX_DENSE_FEATURES as u128 {
                        return Err(LoadError::at(
                            &feat_path,
                            line,
                            format!(
                                "{n} nodes x {} features, {dense} values, more than the \
                                 {MAX_DENSE_FEATURES} (1 GiB) that graph stages hold as a dense \
                                 matrix; reduce the feature dimension first",
                                values.len()
                            ),
                        ));
                    }
                    width = Some((values.len(), line));
                }
                Some((w, first)) if w != values.len() => {
                    return Err(LoadError::at(
                        &feat_path,
                        line,
                        format!(
                            "{} values, but line {first} has {w}: every row needs the same \
                             number",
                            values.len()
                        ),
                    ))
                }
                Some(_) => {}
            }
            for (c, v) in values.iter().enumerate() {
                let v = float_at(&feat_path, line, c + 1, v)?;
                if v != 0.0 {
                    indices.push(c);
                    data.push(v);
                }
            }
            indptr.push(indices.len());
        }
        if indptr.len() - 1 != n {
            return Err(disagree(&feat_path, indptr.len() - 1, "feature rows"));
        }
        Csr {
            rows: n,
            cols: width.map_or(0, |w| w.0),
            indptr,
            indices,
            data,
        }
    } else {
        if n > MAX_DENSE_FEATURES {
            return Err(LoadError::at(
                &count_path,
                count_line,
                format!(
                    "{n} nodes with the constant feature are more than the {MAX_DENSE_FEATURES}                      values (1 GiB) that graph stages hold as a dense matrix"
                ),
            ));
        }
        Csr {
            rows: n,
            cols: 1,
            indptr: (0..=n).collect(),
            indices: vec![0; n],
            data: vec![1.0; n],
        }
    };

    // Edges as stored (directed); `symmetrise` adds the reverse ones later.
    let edge_path = required("edge")?;
    let mut edges = Vec::new();
    let mut text = TextLines::open(&edge_path)?;
    while let Some((line, s)) = text.next_line()? {
        if s.is_empty() {
            continue;
        }
        let f = fields(s);
        if f.len() != 2 {
            return Err(LoadError::at(
                &edge_path,
                line,
                format!("expected `source,target` (two node ids), found `{s}`"),
            ));
        }
        let src = ogb_node(&edge_path, line, f[0], n, &count_path)?;
        let dst = ogb_node(&edge_path, line, f[1], n, &count_path)?;
        edges.push((src, dst));
    }
    let num_edge_path = ogb_file(&raw, "num-edge-list");
    if num_edge_path.is_file() {
        let (m, line) = ogb_count(&num_edge_path, "edge count")?;
        if m != edges.len() {
            return Err(LoadError::at(
                &num_edge_path,
                line,
                format!("{m} edges, but {} has {}", edge_path.display(), edges.len()),
            ));
        }
    }
    edges.sort_unstable();
    edges.dedup();

    // The standard split, read only when it may be used.
    let standard = if matches!(opts.split, SplitMode::Standard | SplitMode::Auto) {
        match ogb_split_dir(dir, split_name)? {
            Some(folder) => {
                let mut parts = Vec::with_capacity(3);
                for name in ["train", "valid", "test"] {
                    let path = ogb_file(&folder, name);
                    if !path.is_file() {
                        return Err(LoadError::new(
                            &path,
                            "missing: a split folder holds train.csv.gz, valid.csv.gz and \
                             test.csv.gz (or the same files uncompressed)",
                        ));
                    }
                    let mut ids = Vec::new();
                    let mut text = TextLines::open(&path)?;
                    while let Some((line, s)) = text.next_line()? {
                        if !s.is_empty() {
                            ids.push(ogb_node(&path, line, s, n, &count_path)?);
                        }
                    }
                    parts.push(ids);
                }
                let test = parts.pop().expect("three");
                let val = parts.pop().expect("three");
                let train = parts.pop().expect("three");
                Some(Split { train, val, test })
            }
            None => None,
        }
    } else {
        None
    };
    let split = choose_split(dir, Some(&labels), standard, opts)?;
    Ok(Graph {
        num_nodes: n,
        edges,
        features,
        labels: Some(labels),
        graph_label: None,
        split,
    })
}

// ---------------------------------------------------------------------------------------------
// The source

/// Factory of the `graph-load` source.
pub struct GraphLoadSource;

/// What the source's parameters ask for.
#[derive(Clone, Debug)]
struct LoadRequest {
    input: Input,
    options: LoadOptions,
}

fn request(params: &Params) -> Result<LoadRequest, Vec<PlanIssue>> {
    let path = params.path("path").unwrap_or_default();
    let format = params.str("format").unwrap_or("auto");
    let format = match format {
        "auto" if path.is_dir() && is_ogb_folder(&path) => "ogb",
        "auto" if path.is_dir() => "tu",
        "auto" => match path.extension().and_then(|e| e.to_str()) {
            Some("npz") => "npz",
            Some("csv" | "tsv" | "txt") => "csv",
            _ => {
                return Err(vec![PlanIssue::param(
                    "path",
                    format!(
                        "cannot tell the format of {}: not a folder (OGB or TU), .npz or .csv",
                        path.display()
                    ),
                )
                .hint("set `format: npz | tu | csv | ogb`")])
            }
        },
        f => f,
    };
    let input = match format {
        "npz" => Input::Npz(path),
        "tu" => Input::Tu(path),
        "ogb" => Input::Ogb {
            dir: path,
            split: params.str("ogb_split").map(String::from),
        },
        _ => Input::Csv {
            edges: path,
            features: params.path("features").ok_or_else(|| {
                vec![PlanIssue::param(
                    "features",
                    "an edge-list CSV needs `features`: a CSV of `id,f1,...,fF` per node",
                )]
            })?,
            labels: params.path("labels"),
        },
    };
    let count = |name: &str, default: i64| -> Result<usize, Vec<PlanIssue>> {
        let v = params.int(name).unwrap_or(default);
        usize::try_from(v).map_err(|_| {
            vec![PlanIssue::param(
                name,
                format!("`{name}` must not be negative"),
            )]
        })
    };
    if let Some(name) = params.str("ogb_split") {
        if !matches!(input, Input::Ogb { .. }) {
            return Err(vec![PlanIssue::param(
                "ogb_split",
                "`ogb_split` names a split folder of an OGB dataset; this is not one",
            )]);
        }
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(vec![PlanIssue::param(
                "ogb_split",
                format!("`{name}` is not a folder name under `split/`"),
            )]);
        }
    }
    let options = LoadOptions {
        symmetrise: params.bool("symmetrise").unwrap_or(true),
        self_loops: params.bool("self_loops").unwrap_or(false),
        normalise_features: params.bool("normalise_features").unwrap_or(false),
        split: match params.str("split").unwrap_or("auto") {
            "standard" => SplitMode::Standard,
            "random" => SplitMode::Random,
            "none" => SplitMode::None,
            _ => SplitMode::Auto,
        },
        train_per_class: count("train_per_class", 20)?,
        val_size: count("val_size", 500)?,
        test_size: count("test_size", 1000)?,
        seed: params.int("seed").unwrap_or(0) as u64,
    };
    Ok(LoadRequest { input, options })
}

/// The parameter that names the file an error is about.
fn param_of(input: &Input, e: &LoadError) -> &'static str {
    match input {
        Input::Csv {
            features, labels, ..
        } => {
            if e.path == *features {
                "features"
            } else if labels.as_ref() == Some(&e.path) {
                "labels"
            } else {
                "path"
            }
        }
        Input::Ogb { dir, split } if split.is_some() && e.path == dir.join("split") => "ogb_split",
        _ => "path",
    }
}

impl SourceFactory for GraphLoadSource {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "graph-load",
            doc: "Reads graphs: a CSR .npz file (Planetoid or gnn-benchmark layout), an \
                  edge-list CSV with a feature CSV, or an OGB node property folder (raw/ and \
                  split/, gzipped or not) gives one node-classification record (x, \
                  edge_index, y, train/val/test masks); a TU dataset folder gives one record \
                  per graph (x from one-hot node labels, edge_index, y = graph label).",
            params: vec![
                ParamSpec::required(
                    "path",
                    ParamKind::Path,
                    "a .npz file, a TU or OGB dataset folder, or an edge-list CSV",
                ),
                ParamSpec::optional(
                    "format",
                    ParamKind::Choice(&["auto", "npz", "tu", "csv", "ogb"]),
                    json!("auto"),
                    "how `path` is stored (auto: a folder with raw/edge.csv(.gz) is OGB, \
                     another folder TU, else by extension)",
                ),
                ParamSpec::optional(
                    "features",
                    ParamKind::Path,
                    json!(null),
                    "CSV format: node features, `id,f1,...,fF` per line",
                ),
                ParamSpec::optional(
                    "labels",
                    ParamKind::Path,
                    json!(null),
                    "CSV format: node labels, `id,label` per line",
                ),
                ParamSpec::optional(
                    "ogb_split",
                    ParamKind::String,
                    json!(null),
                    "OGB format: the folder under split/ holding the standard split (needed \
                     when there are several)",
                ),
                ParamSpec::optional(
                    "symmetrise",
                    ParamKind::Bool,
                    json!(true),
                    "add the reverse of every edge",
                ),
                ParamSpec::optional(
                    "self_loops",
                    ParamKind::Bool,
                    json!(false),
                    "add an edge from every node to itself",
                ),
                ParamSpec::optional(
                    "normalise_features",
                    ParamKind::Bool,
                    json!(false),
                    "divide every feature row by its sum",
                ),
                ParamSpec::optional(
                    "split",
                    ParamKind::Choice(&["auto", "standard", "random", "none"]),
                    json!("auto"),
                    "node split: the data's standard one (idx_* arrays of a .npz, split/ of an \
                     OGB folder), a seeded random one, or none",
                ),
                ParamSpec::optional(
                    "train_per_class",
                    ParamKind::Int,
                    json!(20),
                    "random split: training nodes per class",
                ),
                ParamSpec::optional(
                    "val_size",
                    ParamKind::Int,
                    json!(500),
                    "random split: validation nodes",
                ),
                ParamSpec::optional(
                    "test_size",
                    ParamKind::Int,
                    json!(1000),
                    "random split: test nodes",
                ),
                ParamSpec::optional("seed", ParamKind::Int, json!(0), "random split: seed"),
            ],
        }
    }

    fn plan(&self, params: &Params) -> Result<Schema, Vec<PlanIssue>> {
        let req = request(params)?;
        let data = load(&req.input, &req.options)
            .map_err(|e| vec![PlanIssue::param(param_of(&req.input, &e), e.to_string())])?;
        let first = data
            .graphs
            .first()
            .ok_or_else(|| vec![PlanIssue::param("path", "the dataset holds no graph")])?;
        let fields = GraphFields::default();
        let named = |s: &str| Dim::Named(s.into());
        let mut schema = Schema::new();
        schema.insert(
            fields.x.clone(),
            FieldType::Tensor {
                dtype: DType::F32,
                shape: Shape(Some(vec![named("nodes"), Dim::Fixed(first.features.cols)])),
            },
        );
        schema.insert(
            fields.edge_index.clone(),
            FieldType::Tensor {
                dtype: DType::I64,
                shape: Shape(Some(vec![Dim::Fixed(2), named("edges")])),
            },
        );
        let per_node = FieldType::Tensor {
            dtype: DType::I64,
            shape: Shape(Some(vec![named("nodes")])),
        };
        if data.graph_level {
            schema.insert(fields.y.clone(), FieldType::Int);
        } else if first.labels.is_some() {
            schema.insert(fields.y.clone(), per_node.clone());
        }
        if first.split.is_some() {
            for m in &fields.masks {
                schema.insert(m.clone(), per_node.clone());
            }
        }
        Ok(schema)
    }

    fn open(&self, params: &Params) -> Result<Box<dyn Source>, String> {
        let req = request(params).map_err(|i| i[0].message.clone())?;
        let len = match &req.input {
            Input::Tu(dir) => {
                let prefix = tu_prefix(dir).map_err(|e| e.to_string())?;
                lines(&tu_file(dir, &prefix, "graph_labels"))
                    .map_err(|e| e.to_string())?
                    .len() as u64
            }
            _ => 1,
        };
        Ok(Box::new(GraphReader { req, len }))
    }
}

struct GraphReader {
    req: LoadRequest,
    len: u64,
}

impl Source for GraphReader {
    fn len(&self) -> Option<u64> {
        Some(self.len)
    }

    fn read(&self, part: usize, parts: usize) -> Box<dyn Iterator<Item = Outcome> + Send + '_> {
        if part as u64 >= self.len {
            return Box::new(std::iter::empty());
        }
        let data = match load(&self.req.input, &self.req.options) {
            Ok(d) => d,
            Err(e) => {
                let fail = Failure {
                    key: "graph-load".into(),
                    seq: part as u64,
                    stage: "graph-load".into(),
                    reason: e.to_string(),
                };
                return Box::new(std::iter::once(Err(fail)));
            }
        };
        let fields = GraphFields::default();
        let single = !data.graph_level;
        Box::new(
            (part..data.graphs.len())
                .step_by(parts.max(1))
                .map(move |i| {
                    let key = if single {
                        data.name.clone()
                    } else {
                        format!("{}:{:06}", data.name, i + 1)
                    };
                    Ok(data.graphs[i].to_record(&key, i as u64, &fields))
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_split_is_per_class_and_disjoint() {
        let labels: Vec<i64> = (0..100)
            .map(|i| if i % 10 == 9 { -1 } else { i % 3 })
            .collect();
        let opts = LoadOptions {
            train_per_class: 5,
            val_size: 20,
            test_size: 30,
            seed: 4,
            ..Default::default()
        };
        let s = random_split(&labels, &opts).unwrap();
        assert_eq!(s.train.len(), 15);
        for c in 0..3 {
            assert_eq!(s.train.iter().filter(|&&i| labels[i] == c).count(), 5);
        }
        let all: BTreeSet<usize> = s
            .train
            .iter()
            .chain(&s.val)
            .chain(&s.test)
            .copied()
            .collect();
        assert_eq!(all.len(), 65);
        assert!(all.iter().all(|&i| labels[i] >= 0));
        assert_eq!(random_split(&labels, &opts).unwrap(), s);
        let too_many = LoadOptions {
            test_size: 100,
            ..opts
        };
        assert!(random_split(&labels, &too_many)
            .unwrap_err()
            .contains("lower val_size"));
    }

    #[test]
    fn labels_may_be_class_names() {
        let raw = |v: &[&str]| v.iter().map(|s| (1, s.to_string())).collect::<Vec<_>>();
        assert_eq!(parse_labels(raw(&["2", "0", "-1", ""])), vec![2, 0, -1, -1]);
        assert_eq!(parse_labels(raw(&["b", "a", "", "b"])), vec![1, 0, -1, 1]);
    }

    /// A fresh folder under the system's temporary folder.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lf-load-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A two-node, one-graph TU folder with the given indicator and node-label texts.
    fn tu(name: &str, indicator: &str, node_labels: Option<&str>) -> Result<usize, LoadError> {
        let d = scratch(name);
        std::fs::write(d.join("DS_A.txt"), "1, 2\n2, 1\n").unwrap();
        std::fs::write(d.join("DS_graph_indicator.txt"), indicator).unwrap();
        std::fs::write(d.join("DS_graph_labels.txt"), "1\n").unwrap();
        if let Some(l) = node_labels {
            std::fs::write(d.join("DS_node_labels.txt"), l).unwrap();
        }
        let r = read_tu(&d).map(|(_, g)| g[0].features.cols);
        let _ = std::fs::remove_dir_all(&d);
        r
    }

    #[test]
    fn tu_graph_ids_must_start_at_one() {
        assert_eq!(tu("ok", "1\n1\n", None).unwrap(), 1);
        let e = tu("zero", "0\n0\n", None).unwrap_err().to_string();
        assert!(e.contains("graph id 0 where 1 was expected"), "{e}");
        assert!(e.contains("DS_graph_indicator.txt"), "{e}");
    }

    #[test]
    fn tu_node_labels_too_wide_to_one_hot_are_errors() {
        assert_eq!(tu("narrow", "1\n1\n", Some("3\n5\n")).unwrap(), 3);
        for labels in [
            "0\n9223372036854775807\n",
            "-9223372036854775808\n0\n",
            "0\n4000000000\n",
        ] {
            let e = tu("wide", "1\n1\n", Some(labels)).unwrap_err().to_string();
            assert!(e.contains("too many to one-hot encode"), "{labels}: {e}");
        }
    }

    #[test]
    fn npz_features_too_large_to_hold_densely_are_errors() {
        let d = scratch("npz");
        let path = d.join("g.npz");
        let write = |cols: i64| {
            let mut w = ndarray_npy::NpzWriter::new(File::create(&path).unwrap());
            let i = |v: Vec<i64>| ndarray::Array1::from_vec(v);
            w.add_array("adj_indptr", &i(vec![0, 1, 2])).unwrap();
            w.add_array("adj_indices", &i(vec![1, 0])).unwrap();
            w.add_array("adj_shape", &i(vec![2, 2])).unwrap();
            w.add_array("attr_indptr", &i(vec![0, 1, 1])).unwrap();
            w.add_array("attr_indices", &i(vec![0])).unwrap();
            w.add_array("attr_data", &ndarray::Array1::from_vec(vec![1.0f32]))
                .unwrap();
            w.add_array("attr_shape", &i(vec![2, cols])).unwrap();
            w.finish().unwrap();
        };
        write(3);
        assert_eq!(
            read_npz(&path, &LoadOptions::default())
                .unwrap()
                .features
                .cols,
            3
        );
        for cols in [1i64 << 40, 1 << 62] {
            write(cols);
            let e = read_npz(&path, &LoadOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("reduce the feature dimension"), "{cols}: {e}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
