//! The graph family (`stages/src/graph/`): `graph-load` on every format against the data
//! README and an independent numpy/SciPy reading, broken files and the errors they give, the
//! GCN against finite differences and against the paper's accuracy on Cora (and CiteSeer),
//! macro-F1 against scikit-learn, logistic regression on frozen GCN embeddings, and
//! `pipelines/gcn-cora.yaml` end to end.
//!
//! The real datasets live outside the repository, in `../shared/data` beside the checkout (or
//! wherever `LATENTFLOW_SHARED_DATA` points); tests that need them say so and pass without
//! checking anything when the folder is absent.

mod common;
#[path = "../fuzz/gzip.rs"]
mod gzip;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use latentflow_engine::{Params, SourceFactory, Value};
use latentflow_stages::graph::gcn::{self, GcnInput, GcnParams, GcnSettings};
use latentflow_stages::graph::load::{load, Dataset, Input, LoadError, LoadOptions, SplitMode};
use latentflow_stages::graph::logreg::{self, LogregSettings};
use latentflow_stages::graph::{Csr, Graph, GraphFields, GraphLoadSource, Rng, Split};
use ndarray::{Array1, Array2};
use serde_json::{json, Value as Json};

use common::{graphs_dir, latentflow, root, run_python, scratch, text, write_pipeline};
use gzip::gzip_stored;

// ---------------------------------------------------------------------------------------------
// Helpers.

fn load_ok(input: Input, opts: &LoadOptions) -> Dataset {
    load(&input, opts).unwrap_or_else(|e| panic!("{e}"))
}

fn node_graph(input: Input, opts: &LoadOptions) -> Graph {
    let mut d = load_ok(input, opts);
    assert_eq!(d.graphs.len(), 1);
    assert!(!d.graph_level);
    d.graphs.remove(0)
}

/// Cora or CiteSeer as the GCN paper prepares it: standard split, row-normalised features.
fn planetoid(dir: &Path, name: &str) -> Graph {
    let opts = LoadOptions {
        normalise_features: true,
        split: SplitMode::Standard,
        ..Default::default()
    };
    node_graph(Input::Npz(dir.join(format!("{name}.planetoid.npz"))), &opts)
}

fn label_counts(labels: &[i64]) -> Vec<u64> {
    let mut c = vec![0u64; labels.iter().copied().max().unwrap_or(-1).max(-1) as usize + 1];
    labels
        .iter()
        .filter(|&&l| l >= 0)
        .for_each(|&l| c[l as usize] += 1);
    c
}

fn as_u64s(v: &Json) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    (mean, var.sqrt())
}

/// Test accuracies of the GCN with the paper's settings over `seeds`.
fn gcn_accuracies(g: &Graph, seeds: std::ops::Range<u64>) -> Vec<f64> {
    let input = GcnInput::new(g);
    seeds
        .map(|seed| {
            let s = GcnSettings {
                seed,
                ..Default::default()
            };
            gcn::train_with(g, &input, &s).unwrap().test.accuracy
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Real datasets against the README and an independent reading.

/// numpy/SciPy: counts and checksums of each CSR .npz file after symmetrising the adjacency.
const NPZ_REFERENCE: &str = r#"
import json, sys
import numpy as np, scipy.sparse as sp
out = {}
for path in sys.argv[1:]:
    d = np.load(path)
    a = sp.csr_matrix((np.ones(len(d["adj_indices"])), d["adj_indices"], d["adj_indptr"]),
                      shape=tuple(d["adj_shape"]))
    a = ((a + a.T) > 0).tocoo()
    x = sp.csr_matrix((d["attr_data"], d["attr_indices"], d["attr_indptr"]),
                      shape=tuple(d["attr_shape"]))
    y = d["labels"].astype(np.int64)
    n = a.shape[0]
    out[path] = {
        "nodes": int(n), "features": int(x.shape[1]), "edges": int(a.nnz),
        "edge_checksum": int((a.row.astype(np.int64) * n + a.col).sum()),
        "feature_nnz": int(x.nnz), "feature_sum": float(x.sum()),
        "label_counts": np.bincount(y[y >= 0]).tolist(), "unlabelled": int((y < 0).sum()),
        "split": [len(d[k]) for k in ("idx_train", "idx_val", "idx_test")]
                 if "idx_train" in d else None,
        "train_head": d["idx_train"][:5].tolist() if "idx_train" in d else None,
    }
print(json.dumps(out))
"#;

#[test]
fn npz_graphs_match_the_readme_and_scipy() {
    let Some(dir) = graphs_dir() else { return };
    let files = [
        "cora.planetoid",
        "citeseer.planetoid",
        "cora.gnn-benchmark",
        "citeseer.gnn-benchmark",
    ];
    let paths: Vec<String> = files
        .iter()
        .map(|f| dir.join(format!("{f}.npz")).display().to_string())
        .collect();
    let reference = run_python(
        NPZ_REFERENCE,
        &paths.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // The data README: nodes, features, classes, unlabelled nodes.
    let readme = [
        (2708, 1433, 7, 0),
        (3327, 3703, 6, 15),
        (2708, 1433, 7, 0),
        (3312, 3703, 6, 0),
    ];
    for ((file, path), (nodes, features, classes, unlabelled)) in
        files.iter().zip(&paths).zip(readme)
    {
        let g = node_graph(Input::Npz(PathBuf::from(path)), &LoadOptions::default());
        let r = &reference[path];
        let labels = g.labels.as_ref().unwrap();
        assert_eq!(g.num_nodes, nodes, "{file}");
        assert_eq!(g.features.cols, features, "{file}");
        assert_eq!(g.num_classes(), classes, "{file}");
        assert_eq!(
            labels.iter().filter(|&&l| l < 0).count(),
            unlabelled,
            "{file}"
        );

        assert_eq!(g.num_nodes as u64, r["nodes"].as_u64().unwrap(), "{file}");
        assert_eq!(g.edges.len() as u64, r["edges"].as_u64().unwrap(), "{file}");
        let checksum: u64 = g
            .edges
            .iter()
            .map(|&(s, t)| (s * g.num_nodes + t) as u64)
            .sum();
        assert_eq!(checksum, r["edge_checksum"].as_u64().unwrap(), "{file}");
        assert_eq!(
            g.features.nnz() as u64,
            r["feature_nnz"].as_u64().unwrap(),
            "{file}"
        );
        let sum: f64 = g.features.data.iter().map(|&v| v as f64).sum();
        assert!(
            (sum - r["feature_sum"].as_f64().unwrap()).abs() < 1e-6,
            "{file}"
        );
        assert_eq!(label_counts(labels), as_u64s(&r["label_counts"]), "{file}");

        let split = g.split.as_ref().unwrap();
        let sizes = [split.train.len(), split.val.len(), split.test.len()];
        match r["split"].as_array() {
            // The standard split, exactly as stored.
            Some(s) => {
                let s: Vec<usize> = s.iter().map(|v| v.as_u64().unwrap() as usize).collect();
                assert_eq!(sizes.to_vec(), s, "{file}");
                assert_eq!(
                    split.train[..5]
                        .iter()
                        .map(|&i| i as u64)
                        .collect::<Vec<_>>(),
                    as_u64s(&r["train_head"]),
                    "{file}"
                );
            }
            // No standard split: `auto` drew Planetoid's random one.
            None => assert_eq!(sizes, [20 * classes, 500, 1000], "{file}"),
        }
        for c in 0..classes as i64 {
            let per_class = split.train.iter().filter(|&&i| labels[i] == c).count();
            assert_eq!(per_class, 20, "{file}: class {c}");
        }
    }

    // The README's entry count for Cora: 10556 directed entries, already symmetric.
    let cora = node_graph(
        Input::Npz(dir.join("cora.planetoid.npz")),
        &LoadOptions {
            symmetrise: false,
            ..Default::default()
        },
    );
    assert_eq!(cora.edges.len(), 10556);
    // The gnn-benchmark file stores one direction per link.
    let directed = node_graph(
        Input::Npz(dir.join("cora.gnn-benchmark.npz")),
        &LoadOptions {
            symmetrise: false,
            ..Default::default()
        },
    );
    assert!(directed.edges.len() < cora.edges.len());
}

#[test]
fn citeseer_unlabelled_nodes_stay_out_of_the_split() {
    let Some(dir) = graphs_dir() else { return };
    let g = planetoid(&dir, "citeseer");
    let labels = g.labels.as_ref().unwrap();
    let split = g.split.as_ref().unwrap();
    for part in [&split.train, &split.val, &split.test] {
        assert!(part.iter().all(|&i| labels[i] >= 0));
    }
    // A random split never picks them either.
    let opts = LoadOptions {
        split: SplitMode::Random,
        seed: 3,
        ..Default::default()
    };
    let r = node_graph(Input::Npz(dir.join("citeseer.planetoid.npz")), &opts);
    let rs = r.split.as_ref().unwrap();
    assert_eq!(
        [rs.train.len(), rs.val.len(), rs.test.len()],
        [120, 500, 1000]
    );
    assert!(rs.test.iter().chain(&rs.val).all(|&i| labels[i] >= 0));
    assert_ne!(rs, split);
}

/// numpy: per-graph node and (symmetrised) edge counts, label counts of MUTAG.
const TU_REFERENCE: &str = r#"
import json, sys
import numpy as np
d = sys.argv[1]
ind = np.loadtxt(f"{d}/MUTAG_graph_indicator.txt", dtype=np.int64)
a = np.loadtxt(f"{d}/MUTAG_A.txt", delimiter=",", dtype=np.int64)
gl = np.loadtxt(f"{d}/MUTAG_graph_labels.txt", dtype=np.int64)
nl = np.loadtxt(f"{d}/MUTAG_node_labels.txt", dtype=np.int64)
pairs = {(int(s), int(t)) for s, t in a} | {(int(t), int(s)) for s, t in a}
edges = np.zeros(ind.max(), dtype=np.int64)
for s, _ in pairs:
    edges[ind[s - 1] - 1] += 1
_, gl = np.unique(gl, return_inverse=True)
print(json.dumps({
    "graphs": int(ind.max()), "nodes": np.bincount(ind)[1:].tolist(), "edges": edges.tolist(),
    "graph_labels": np.bincount(gl).tolist(), "node_labels": np.bincount(nl - nl.min()).tolist(),
    "lines_a": int(len(a)),
}))
"#;

#[test]
fn mutag_matches_numpy() {
    let Some(dir) = graphs_dir() else { return };
    let mutag = dir.join("MUTAG");
    let r = run_python(TU_REFERENCE, &[mutag.to_str().unwrap()]);
    let d = load_ok(Input::Tu(mutag.clone()), &LoadOptions::default());
    assert!(d.graph_level);
    assert_eq!(d.name, "MUTAG");
    // The README: 188 graphs, 3371 nodes, 7 atom types, 2 classes.
    assert_eq!(d.graphs.len(), 188);
    assert_eq!(d.graphs.iter().map(|g| g.num_nodes).sum::<usize>(), 3371);
    assert!(d.graphs.iter().all(|g| g.features.cols == 7));
    assert_eq!(
        d.graphs
            .iter()
            .map(|g| g.num_nodes as u64)
            .collect::<Vec<_>>(),
        as_u64s(&r["nodes"])
    );
    assert_eq!(
        d.graphs
            .iter()
            .map(|g| g.edges.len() as u64)
            .collect::<Vec<_>>(),
        as_u64s(&r["edges"])
    );
    let graph_labels: Vec<i64> = d.graphs.iter().map(|g| g.graph_label.unwrap()).collect();
    assert_eq!(label_counts(&graph_labels), as_u64s(&r["graph_labels"]));
    assert_eq!(label_counts(&graph_labels), [63, 125]);
    // One-hot atom types: column sums are the node label counts, one 1 per row.
    let mut columns = vec![0u64; 7];
    for g in &d.graphs {
        assert_eq!(g.features.nnz(), g.num_nodes);
        g.features.indices.iter().for_each(|&j| columns[j] += 1);
    }
    assert_eq!(columns, as_u64s(&r["node_labels"]));
    // MUTAG_A.txt lists both directions already.
    let raw = load_ok(
        Input::Tu(mutag),
        &LoadOptions {
            symmetrise: false,
            ..Default::default()
        },
    );
    let stored: usize = raw.graphs.iter().map(|g| g.edges.len()).sum();
    assert_eq!(stored as u64, r["lines_a"].as_u64().unwrap());
}

#[test]
fn the_source_gives_one_record_per_graph() {
    let Some(dir) = graphs_dir() else { return };
    let params = |path: &Path| {
        let mut m = serde_json::Map::new();
        m.insert("path".into(), json!(path.display().to_string()));
        Params::new(m, "/").with_defaults(&GraphLoadSource.info().params)
    };

    // MUTAG: 188 records with an int label, read in two shares.
    let p = params(&dir.join("MUTAG"));
    let schema = GraphLoadSource.plan(&p).unwrap();
    assert_eq!(schema["y"].to_string(), "int");
    assert_eq!(schema["x"].to_string(), "tensor<f32>[nodes, 7]");
    assert!(!schema.contains_key("train_mask"));
    let src = GraphLoadSource.open(&p).unwrap();
    assert_eq!(src.len(), Some(188));
    let mut keys = Vec::new();
    for part in 0..2 {
        for r in src.read(part, 2) {
            let r = r.unwrap();
            assert!(matches!(r.get("y"), Some(Value::Int(0 | 1))));
            keys.push((r.seq, r.key.to_string()));
        }
    }
    keys.sort();
    assert_eq!(keys.len(), 188);
    assert_eq!(keys[0], (0, "MUTAG:000001".to_string()));

    // Cora: one record whose fields read back into the same graph.
    let p = params(&dir.join("cora.planetoid.npz"));
    let schema = GraphLoadSource.plan(&p).unwrap();
    assert_eq!(schema["train_mask"].to_string(), "tensor<i64>[nodes]");
    let src = GraphLoadSource.open(&p).unwrap();
    let records: Vec<_> = src.read(0, 1).map(|r| r.unwrap()).collect();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(&*r.key, "cora.planetoid");
    let edge_index = r.tensor("edge_index").unwrap();
    assert_eq!(edge_index.shape(), [2, 10556]);
    let mask = r.tensor("train_mask").unwrap().as_i64().unwrap();
    assert_eq!(mask.iter().sum::<i64>(), 140);
    let back = Graph::from_record(r, &GraphFields::default()).unwrap();
    let direct = node_graph(
        Input::Npz(dir.join("cora.planetoid.npz")),
        &LoadOptions::default(),
    );
    assert_eq!(back.edges, direct.edges);
    assert_eq!(back.features, direct.features);
    assert_eq!(back.labels, direct.labels);
    assert_eq!(back.split, direct.split);
    assert_eq!(src.read(1, 2).count(), 0);
}

// ---------------------------------------------------------------------------------------------
// CSV and broken files.

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn csv(dir: &Path, edges: &str, features: &str, labels: Option<&str>) -> Input {
    Input::Csv {
        edges: write(dir, "edges.csv", edges),
        features: write(dir, "features.csv", features),
        labels: labels.map(|l| write(dir, "labels.csv", l)),
    }
}

const FEATURES: &str = "id,f1,f2\na,1,0\nb,0,2\nc,3,3\nd,0,0\n";

#[test]
fn csv_graphs_read_with_headers_names_and_splits() {
    let dir = scratch("graph-csv");
    let input = csv(
        &dir,
        "source,target\na,b\nb,c\n# a comment\nc,a\nc,a\n",
        FEATURES,
        Some("node\tclass\nd\tcat\na\tdog\nb\tcat\nc\t\n"),
    );
    let opts = LoadOptions {
        train_per_class: 1,
        val_size: 1,
        test_size: 0,
        normalise_features: true,
        ..Default::default()
    };
    let g = node_graph(input.clone(), &opts);
    assert_eq!(g.num_nodes, 4);
    assert_eq!(
        g.features.to_dense(),
        ndarray::array![[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0]]
    );
    // a-b, b-c, c-a (the duplicate dropped), both directions.
    assert_eq!(
        g.edges,
        vec![(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    );
    // Class names in sorted order; c is unlabelled.
    assert_eq!(g.labels, Some(vec![1, 0, -1, 0]));
    let split = g.split.unwrap();
    assert_eq!(split.train.len(), 2);
    assert_eq!(split.val.len(), 1);
    assert!(!split.train.contains(&2) && !split.val.contains(&2));

    // Without labels there is no split; with `standard` there is none to use.
    let Input::Csv {
        edges, features, ..
    } = input
    else {
        unreachable!()
    };
    let unlabelled = Input::Csv {
        edges,
        features,
        labels: None,
    };
    let g = node_graph(unlabelled.clone(), &LoadOptions::default());
    assert!(g.labels.is_none() && g.split.is_none());
    let e = load(
        &unlabelled,
        &LoadOptions {
            split: SplitMode::Standard,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.message.contains("no standard split"), "{e}");
    let g = node_graph(
        unlabelled,
        &LoadOptions {
            self_loops: true,
            symmetrise: false,
            ..Default::default()
        },
    );
    assert_eq!(
        g.edges,
        vec![(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 2), (3, 3)]
    );
}

/// Loads `input`, expects an error about `file` (and `line`) whose message contains `needle`.
fn expect_error(input: &Input, file: &str, line: Option<usize>, needle: &str) -> LoadError {
    let e = match load(input, &LoadOptions::default()) {
        Ok(_) => panic!("expected an error containing `{needle}`"),
        Err(e) => e,
    };
    assert!(
        e.path.ends_with(file),
        "error about {}, expected {file}: {e}",
        e.path.display()
    );
    assert_eq!(e.line, line, "{e}");
    assert!(e.message.contains(needle), "`{needle}` not in: {e}");
    let shown = e.to_string();
    assert!(shown.contains(file), "{shown}");
    if let Some(l) = line {
        assert!(shown.contains(&format!("{file}:{l}:")), "{shown}");
    }
    e
}

#[test]
fn broken_csv_files_are_named_with_their_line() {
    let dir = scratch("graph-csv-broken");
    let edges = "a,b\n";
    let labels = "a,0\nb,1\nc,0\nd,1\n";
    let check = |edges: &str,
                 features: &str,
                 labels: Option<&str>,
                 file: &str,
                 line: Option<usize>,
                 needle: &str| {
        expect_error(&csv(&dir, edges, features, labels), file, line, needle);
    };
    let feature_error = |features: &str, line: usize, needle: &str| {
        check(edges, features, None, "features.csv", Some(line), needle)
    };
    feature_error(
        "a,1,0\nb,0\nc,1,1\n",
        2,
        "1 feature values, but line 1 has 2",
    );
    feature_error("a,1,0\nb,0,x\n", 2, "value `x` in column 3 is not a number");
    feature_error(
        "a,1\nb,2\na,3\n",
        3,
        "node `a` appears again (first on line 1)",
    );
    feature_error("a,1\nb\n", 2, "a node id without feature values");
    let edge_error =
        |edges: &str, needle: &str| check(edges, FEATURES, None, "edges.csv", Some(2), needle);
    edge_error("a,b\nb,z\n", "node `z` is not in");
    edge_error("a,b\nc\n", "expected `source,target`");
    let label_error = |labels: &str, line: Option<usize>, needle: &str| {
        check(edges, FEATURES, Some(labels), "labels.csv", line, needle)
    };
    label_error("a,0\nb,1\n", None, "2 nodes have no label (e.g. c, d)");
    label_error("a,0\nb,1\nq,1\n", Some(3), "node `q` is not in");
    label_error(
        "a,0\nb,1\nc,0\nd,1\na,1\n",
        Some(5),
        "node `a` has a second label (first on line 1)",
    );
    // A valid set for contrast.
    let ok = csv(&dir, edges, FEATURES, Some(labels));
    assert!(load(
        &ok,
        &LoadOptions {
            split: SplitMode::None,
            ..Default::default()
        }
    )
    .is_ok());
}

/// Writes a TU folder `dir/T` from the given files (name suffix → contents).
fn tu(dir: &Path, files: &[(&str, &str)]) -> Input {
    let d = dir.join("T");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for (part, text) in files {
        write(&d, &format!("T_{part}.txt"), text);
    }
    Input::Tu(d)
}

#[test]
fn broken_tu_files_are_named_with_their_line() {
    let dir = scratch("graph-tu-broken");
    let good: Vec<(&str, &str)> = vec![
        ("A", "1, 2\n2, 1\n3, 4\n"),
        ("graph_indicator", "1\n1\n2\n2\n"),
        ("graph_labels", "-1\n1\n"),
        ("node_labels", "0\n2\n1\n0\n"),
    ];
    let d = load_ok(tu(&dir, &good), &LoadOptions::default());
    assert_eq!(d.graphs.len(), 2);
    assert_eq!(d.graphs[0].graph_label, Some(0));
    assert_eq!(d.graphs[1].graph_label, Some(1));
    assert_eq!(d.graphs[1].edges, vec![(0, 1), (1, 0)]);
    assert_eq!(
        d.graphs[0].features.to_dense(),
        ndarray::array![[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    );

    let with = |part: &str, text: &'static str| {
        let mut f = good.clone();
        f.retain(|(p, _)| *p != part);
        if !text.is_empty() {
            f.push((Box::leak(part.to_string().into_boxed_str()) as &str, text));
        }
        tu(&dir, &f)
    };
    expect_error(
        &with("A", "1, 2\n2, 9\n"),
        "T_A.txt",
        Some(2),
        "node id 9 is outside 1..=4",
    );
    expect_error(
        &with("A", "1, 2\n2, 3\n"),
        "T_A.txt",
        Some(2),
        "joins graph 1 and graph 2",
    );
    expect_error(
        &with("A", "1, 2\n2, 1, 1\n"),
        "T_A.txt",
        Some(2),
        "expected two node ids",
    );
    expect_error(
        &with("A", "1, 2\nx, 1\n"),
        "T_A.txt",
        Some(2),
        "node id `x` is not an integer",
    );
    expect_error(
        &with("graph_labels", "1\n"),
        "T_graph_labels.txt",
        None,
        "1 labels, but",
    );
    expect_error(
        &with("graph_labels", ""),
        "T_graph_labels.txt",
        None,
        "missing",
    );
    expect_error(
        &with("graph_indicator", "1\n2\n1\n2\n"),
        "T_graph_indicator.txt",
        Some(3),
        "nodes of a graph are consecutive",
    );
    expect_error(
        &with("node_labels", "0\n2\n1\n"),
        "T_node_labels.txt",
        None,
        "3 labels for 4 nodes",
    );
    let mut ragged = good.clone();
    ragged.push(("node_attributes", "0.5, 1\n1, 2\n3\n4, 4\n"));
    expect_error(
        &tu(&dir, &ragged),
        "T_node_attributes.txt",
        Some(3),
        "1 values, but line 1 has 2",
    );
    let e = load(
        &tu(&dir, &good),
        &LoadOptions {
            split: SplitMode::Random,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.message.contains("graph classification"), "{e}");
}

/// Writes a CSR .npz (Planetoid layout) with the given arrays replaced or removed.
/// The arrays of a test .npz, by name.
type Arrays = BTreeMap<&'static str, Vec<i64>>;

/// A change made to the arrays before writing them.
type Change<'a> = &'a dyn Fn(&mut Arrays);

fn npz(dir: &Path, name: &str, change: Change) -> Input {
    // 3 nodes: 0 - 1, 1 - 2; 2 features.
    let mut ints = Arrays::new();
    ints.insert("adj_indptr", vec![0, 1, 3, 4]);
    ints.insert("adj_indices", vec![1, 0, 2, 1]);
    ints.insert("adj_shape", vec![3, 3]);
    ints.insert("attr_indptr", vec![0, 1, 2, 3]);
    ints.insert("attr_indices", vec![0, 1, 0]);
    ints.insert("attr_shape", vec![3, 2]);
    ints.insert("labels", vec![0, 1, 0]);
    ints.insert("idx_train", vec![0, 1]);
    ints.insert("idx_val", vec![2]);
    ints.insert("idx_test", vec![2]);
    change(&mut ints);
    let path = dir.join(name);
    let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&path).unwrap());
    for (k, v) in &ints {
        if k.ends_with("indices") {
            // The gnn-benchmark layout's i32 indices.
            let v: Array1<i32> = v.iter().map(|&x| x as i32).collect();
            w.add_array(*k, &v).unwrap();
        } else {
            w.add_array(*k, &Array1::from_vec(v.clone())).unwrap();
        }
    }
    if let Some(n) = ints.get("attr_indices").map(Vec::len) {
        w.add_array("attr_data", &Array1::from_elem(n, 1.0f32))
            .unwrap();
    }
    w.finish().unwrap();
    Input::Npz(path)
}

#[test]
fn broken_npz_files_are_named() {
    let dir = scratch("graph-npz-broken");
    let g = node_graph(npz(&dir, "ok.npz", &|_| {}), &LoadOptions::default());
    assert_eq!(g.edges, vec![(0, 1), (1, 0), (1, 2), (2, 1)]);
    assert_eq!(g.split.unwrap().train, vec![0, 1]);

    let cases: [(&str, Change, &str); 8] = [
        (
            "no-shape.npz",
            &|m| {
                m.remove("attr_shape");
            },
            "array `attr_shape` (the node features) is missing",
        ),
        (
            "bad-index.npz",
            &|m| {
                m.insert("adj_indices", vec![1, 0, 7, 1]);
            },
            "`adj_indices[2]` = 7 (row 1) is outside 0..3",
        ),
        (
            "bad-indptr.npz",
            &|m| {
                m.insert("adj_indptr", vec![0, 1, 3]);
            },
            "array `adj_indptr` has 3 entries, expected rows + 1 = 4",
        ),
        (
            "short-labels.npz",
            &|m| {
                m.insert("labels", vec![0, 1]);
            },
            "array `labels` has 2 entries for 3 nodes",
        ),
        (
            "bad-split.npz",
            &|m| {
                m.insert("idx_test", vec![3]);
            },
            "`idx_test[0]` = 3 is outside 0..3",
        ),
        (
            "unlabelled-train.npz",
            &|m| {
                m.insert("labels", vec![0, -1, 0]);
            },
            "training node 1 has no label",
        ),
        (
            "feature-rows.npz",
            &|m| {
                m.insert("attr_shape", vec![2, 2]);
                m.insert("attr_indptr", vec![0, 1, 3]);
            },
            "the features have 2 rows but the adjacency has 3 nodes",
        ),
        (
            "not-square.npz",
            &|m| {
                m.insert("adj_shape", vec![3, 4]);
            },
            "expected a square matrix",
        ),
    ];
    for (name, change, needle) in cases {
        expect_error(&npz(&dir, name, change), name, None, needle);
    }
    let not_npz = write(&dir, "text.npz", "not a zip file");
    expect_error(&Input::Npz(not_npz), "text.npz", None, "not a .npz file");
    let e = load(
        &npz(&dir, "no-split.npz", &|m| {
            m.remove("idx_train");
        }),
        &LoadOptions {
            split: SplitMode::Standard,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.message.contains("no standard split"), "{e}");
}

#[test]
fn broken_files_fail_validation_at_the_parameter() {
    let dir = scratch("graph-validate");
    let Input::Csv { features, .. } = csv(&dir, "a,b\n", "a,1,0\nb,0\n", None) else {
        unreachable!()
    };
    let p = write_pipeline(
        &dir,
        "broken.yaml",
        &format!(
            "name: broken\nsources:\n  - name: g\n    kind: graph-load\n    params:\n      \
             path: edges.csv\n      features: {}\nsinks:\n  - name: out\n    kind: jsonl\n",
            features.display()
        ),
    );
    let o = latentflow(&["validate", "--no-models", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("broken.yaml:7:17"), "{}", text(&o));
    assert!(
        err.contains("features.csv:2: 1 feature values, but line 1 has 2"),
        "{}",
        text(&o)
    );

    // A TU dataset's graph label cannot train a node classifier.
    let Some(graphs) = graphs_dir() else { return };
    let p = write_pipeline(
        &dir,
        "tu-classify.yaml",
        &format!(
            "name: tu\nsources:\n  - name: g\n    kind: graph-load\n    params: {{path: {}}}\n\
             stages:\n  - name: c\n    kind: classify\nsinks:\n  - name: out\n    kind: jsonl\n",
            graphs.join("MUTAG").display()
        ),
    );
    let o = latentflow(&["validate", "--no-models", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("`y`") || err.contains("field: y"),
        "{}",
        text(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// OGB folders.

/// A four-node OGB folder: two features, node 1 and 2 unlabelled (empty, `nan`), a duplicate
/// edge, the counts, and the standard split in `split/main/`.
const OGB_TINY: &[(&str, &str)] = &[
    ("raw/edge", "0,1\n1,2\n2,0\n2,0\n"),
    ("raw/node-feat", "1,0\n0,2\n0.5,0.5\n0,0\n"),
    ("raw/node-label", "1\n\nnan\n0\n"),
    ("raw/num-node-list", "4\n"),
    ("raw/num-edge-list", "4\n"),
    ("split/main/train", "0\n3\n"),
    ("split/main/valid", "1\n"),
    ("split/main/test", "2\n"),
];

/// Writes an OGB folder `dir/ogbn_tiny` from `(path without .csv, text)` pairs, each file as
/// `.csv` or (with `gzip`) as `.csv.gz`.
fn ogb_folder(dir: &Path, files: &[(&str, &str)], gzip: bool) -> PathBuf {
    let d = dir.join("ogbn_tiny");
    let _ = std::fs::remove_dir_all(&d);
    for (name, text) in files {
        let p = d.join(format!("{name}.csv{}", if gzip { ".gz" } else { "" }));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let bytes = if gzip {
            gzip_stored(text.as_bytes())
        } else {
            text.as_bytes().to_vec()
        };
        std::fs::write(p, bytes).unwrap();
    }
    d
}

/// `OGB_TINY` with the file `name` replaced by `text` (left out where `text` is `None`).
fn ogb_with(dir: &Path, name: &str, text: Option<&str>, gzip: bool) -> Input {
    let mut files: Vec<(&str, &str)> = OGB_TINY
        .iter()
        .filter(|(n, _)| *n != name)
        .copied()
        .collect();
    if let Some(t) = text {
        files.push((name, t));
    }
    Input::Ogb {
        dir: ogb_folder(dir, &files, gzip),
        split: None,
    }
}

/// numpy/SciPy: writes Cora's `.npz` as an OGB folder (every file gzipped by Python's gzip;
/// the standard split as `split/planetoid/`) and prints its counts.
const OGB_WRITER: &str = r#"
import gzip, json, os, sys
import numpy as np, scipy.sparse as sp
src, out = sys.argv[1], sys.argv[2]
d = np.load(src)
a = sp.csr_matrix((np.ones(len(d["adj_indices"])), d["adj_indices"], d["adj_indptr"]),
                  shape=tuple(d["adj_shape"])).tocoo()
x = sp.csr_matrix((d["attr_data"], d["attr_indices"], d["attr_indptr"]),
                  shape=tuple(d["attr_shape"])).toarray().astype(np.float32)
y = d["labels"].astype(np.int64)
def put(rel, lines):
    p = os.path.join(out, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with gzip.open(p, "wt") as f:
        f.write("".join(f"{l}\n" for l in lines))
put("raw/edge.csv.gz", [f"{s},{t}" for s, t in zip(a.row, a.col)])
np.savetxt(os.path.join(out, "raw/node-feat.csv.gz"), x, fmt="%.9g", delimiter=",")
put("raw/node-label.csv.gz", [str(v) if v >= 0 else "" for v in y])
put("raw/num-node-list.csv.gz", [x.shape[0]])
put("raw/num-edge-list.csv.gz", [len(a.row)])
for name, key in [("train", "idx_train"), ("valid", "idx_val"), ("test", "idx_test")]:
    put(f"split/planetoid/{name}.csv.gz", d[key].tolist())
print(json.dumps({"nodes": int(x.shape[0]), "edges": int(len(a.row)),
                  "feature_nnz": int((x != 0).sum()), "train": len(d["idx_train"])}))
"#;

#[test]
fn ogb_cora_matches_the_npz() {
    let Some(graphs) = graphs_dir() else { return };
    let dir = scratch("graph-ogb-cora").join("cora_ogb");
    let npz = graphs.join("cora.planetoid.npz");
    let r = run_python(OGB_WRITER, &[npz.to_str().unwrap(), dir.to_str().unwrap()]);
    assert!(dir.join("raw/edge.csv.gz").is_file());
    assert!(!dir.join("raw/edge.csv").exists());
    for symmetrise in [false, true] {
        let opts = LoadOptions {
            symmetrise,
            split: SplitMode::Standard,
            ..Default::default()
        };
        let want = node_graph(Input::Npz(npz.clone()), &opts);
        let ogb = Input::Ogb {
            dir: dir.clone(),
            split: None,
        };
        let d = load_ok(ogb, &opts);
        assert_eq!(d.name, "cora_ogb");
        let got = &d.graphs[0];
        assert_eq!(got.num_nodes, want.num_nodes);
        assert_eq!(got.num_nodes as u64, r["nodes"].as_u64().unwrap());
        assert_eq!(got.features, want.features, "symmetrise: {symmetrise}");
        assert_eq!(
            got.features.nnz() as u64,
            r["feature_nnz"].as_u64().unwrap()
        );
        assert_eq!(got.edges, want.edges, "symmetrise: {symmetrise}");
        assert_eq!(got.labels, want.labels);
        assert_eq!(got.split, want.split);
        assert_eq!(got.split.as_ref().unwrap().train.len(), 140);
    }
    // Stored as written: Cora's 10556 directed entries, one line each.
    assert_eq!(r["edges"].as_u64(), Some(10556));

    // The source detects the folder and gives the same record as for the .npz.
    let params = |path: &Path| {
        let mut m = serde_json::Map::new();
        m.insert("path".into(), json!(path.display().to_string()));
        Params::new(m, "/").with_defaults(&GraphLoadSource.info().params)
    };
    let p = params(&dir);
    let schema = GraphLoadSource.plan(&p).unwrap();
    assert_eq!(schema["x"].to_string(), "tensor<f32>[nodes, 1433]");
    assert_eq!(schema["train_mask"].to_string(), "tensor<i64>[nodes]");
    let src = GraphLoadSource.open(&p).unwrap();
    let records: Vec<_> = src.read(0, 1).map(|r| r.unwrap()).collect();
    assert_eq!(records.len(), 1);
    assert_eq!(&*records[0].key, "cora_ogb");
    let from_ogb = Graph::from_record(&records[0], &GraphFields::default()).unwrap();
    let from_npz = node_graph(Input::Npz(npz), &LoadOptions::default());
    assert_eq!(from_ogb.edges, from_npz.edges);
    assert_eq!(from_ogb.features, from_npz.features);
    assert_eq!(from_ogb.labels, from_npz.labels);
    assert_eq!(from_ogb.split, from_npz.split);
}

#[test]
fn ogb_folders_read_plain_and_gzipped() {
    let dir = scratch("graph-ogb");
    for gzip in [false, true] {
        let input = ogb_with(&dir, "", None, gzip);
        let g = node_graph(input.clone(), &LoadOptions::default());
        assert_eq!(g.num_nodes, 4, "gzip: {gzip}");
        assert_eq!(
            g.features.to_dense(),
            ndarray::array![[1.0, 0.0], [0.0, 2.0], [0.5, 0.5], [0.0, 0.0]]
        );
        assert_eq!(g.labels, Some(vec![1, -1, -1, 0]));
        // 0→1, 1→2, 2→0 (the duplicate dropped), both directions.
        assert_eq!(
            g.edges,
            vec![(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
        );
        assert_eq!(
            g.split,
            Some(Split {
                train: vec![0, 3],
                val: vec![1],
                test: vec![2],
            })
        );
        // OGB's direction as stored.
        let directed = node_graph(
            input,
            &LoadOptions {
                symmetrise: false,
                ..Default::default()
            },
        );
        assert_eq!(directed.edges, vec![(0, 1), (1, 2), (2, 0)]);
    }

    // Without node features every node gets the single feature 1.
    let g = node_graph(
        ogb_with(&dir, "raw/node-feat", None, true),
        &LoadOptions::default(),
    );
    assert_eq!(g.features.to_dense(), Array2::<f32>::ones((4, 1)));

    // An uncompressed file is read in preference to its gzipped twin.
    let d = ogb_folder(&dir, OGB_TINY, true);
    std::fs::write(d.join("raw/edge.csv"), "3,0\n").unwrap();
    std::fs::write(d.join("raw/num-edge-list.csv"), "1\n").unwrap();
    let opts = LoadOptions {
        symmetrise: false,
        ..Default::default()
    };
    let ogb = |split: Option<&str>| Input::Ogb {
        dir: d.clone(),
        split: split.map(String::from),
    };
    assert_eq!(node_graph(ogb(None), &opts).edges, vec![(3, 0)]);

    // Pandas' float labels (a column with missing values) read as classes.
    let g = node_graph(
        ogb_with(&dir, "raw/node-label", Some("1.0\nnan\n\n0.0\n"), false),
        &LoadOptions::default(),
    );
    assert_eq!(g.labels, Some(vec![1, -1, -1, 0]));

    // Two split folders: `ogb_split` picks one; without it `auto` and `standard` refuse.
    std::fs::create_dir_all(d.join("split/other")).unwrap();
    let g = node_graph(ogb(Some("main")), &opts);
    assert_eq!(g.split.unwrap().train, vec![0, 3]);
    let e = load(&ogb(None), &opts).unwrap_err();
    assert!(e.path.ends_with("split"), "{e}");
    assert!(
        e.message
            .contains("several splits (main, other); pick one with `ogb_split`"),
        "{e}"
    );
    let e = load(&ogb(Some("nope")), &opts).unwrap_err();
    assert!(
        e.message
            .contains("no split folder `nope` (ogb_split); the folder holds main, other"),
        "{e}"
    );
    // A random split reads no split folder.
    let random = LoadOptions {
        split: SplitMode::Random,
        train_per_class: 1,
        val_size: 0,
        test_size: 0,
        ..Default::default()
    };
    let g = node_graph(ogb(None), &random);
    let s = g.split.unwrap();
    assert_eq!(s.train, vec![0, 3]);
    assert!(s.val.is_empty() && s.test.is_empty());

    // No split folder: `auto` draws a random split, `standard` has none to use.
    let no_split: Vec<(&str, &str)> = OGB_TINY
        .iter()
        .filter(|(n, _)| !n.starts_with("split/"))
        .copied()
        .collect();
    let bare = Input::Ogb {
        dir: ogb_folder(&dir, &no_split, false),
        split: None,
    };
    let auto = LoadOptions {
        split: SplitMode::Auto,
        ..random.clone()
    };
    assert_eq!(
        node_graph(bare.clone(), &auto).split.unwrap().train,
        vec![0, 3]
    );
    let e = load(
        &bare,
        &LoadOptions {
            split: SplitMode::Standard,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.message.contains("no standard split"), "{e}");
}

#[test]
fn broken_ogb_folders_are_named_with_their_line() {
    let dir = scratch("graph-ogb-broken");
    for gzip in [false, true] {
        let gz = if gzip { ".csv.gz" } else { ".csv" };
        let file = |name: &str| format!("{name}{gz}");
        let check =
            |name: &str, text: Option<&str>, at: &str, line: Option<usize>, needle: &str| {
                expect_error(&ogb_with(&dir, name, text, gzip), &file(at), line, needle);
            };
        check(
            "raw/edge",
            Some("0,1\n1,4\n"),
            "raw/edge",
            Some(2),
            "node id 4 is outside 0..4 (the node count in",
        );
        check(
            "raw/edge",
            Some("0,1\n1\n"),
            "raw/edge",
            Some(2),
            "expected `source,target`",
        );
        check(
            "raw/edge",
            Some("0,1\n-1,2\n"),
            "raw/edge",
            Some(2),
            "node id -1 is outside",
        );
        check(
            "raw/node-feat",
            Some("1,0\n0\n0,0\n0,0\n"),
            "raw/node-feat",
            Some(2),
            "1 values, but line 1 has 2",
        );
        check(
            "raw/node-feat",
            Some("1,0\n0,x\n0,0\n0,0\n"),
            "raw/node-feat",
            Some(2),
            "value `x` in column 2 is not a number",
        );
        check(
            "raw/node-feat",
            Some("1,0\n0,0\n0,0\n0,0\n1,1\n"),
            "raw/node-feat",
            Some(5),
            "a feature row for node 4 but",
        );
        check(
            "raw/node-feat",
            Some("1,0\n0,0\n0,0\n"),
            "raw/num-node-list",
            Some(1),
            "4 nodes, but",
        );
        check(
            "raw/node-label",
            Some("1\ncat\n\n0\n"),
            "raw/node-label",
            Some(2),
            "label `cat` is not a class number",
        );
        check(
            "raw/node-label",
            Some("1\n-2\n\n0\n"),
            "raw/node-label",
            Some(2),
            "label `-2` is not a class number",
        );
        check(
            "raw/node-label",
            Some("1,0\n0,1\n1,1\n0,0\n"),
            "raw/node-label",
            Some(1),
            "2 label columns: multi-label node labels (as in ogbn-proteins) are not supported",
        );
        check(
            "raw/num-node-list",
            Some("5\n"),
            "raw/num-node-list",
            Some(1),
            "5 nodes, but",
        );
        check(
            "raw/num-node-list",
            Some("3\n"),
            "raw/node-label",
            Some(4),
            "a label for node 3 but",
        );
        check(
            "raw/num-node-list",
            Some("4\n7\n"),
            "raw/num-node-list",
            Some(2),
            "graph property datasets",
        );
        check(
            "raw/num-edge-list",
            Some("\n3\n"),
            "raw/num-edge-list",
            Some(2),
            "3 edges, but",
        );
        check(
            "split/main/test",
            Some("2\n9\n"),
            "split/main/test",
            Some(2),
            "node id 9 is outside 0..4",
        );
        expect_error(
            &ogb_with(&dir, "split/main/train", Some("0\n1\n"), gzip),
            "ogbn_tiny",
            None,
            "training node 1 has no label",
        );
        // A missing file is reported under the shipped (gzipped) name.
        expect_error(
            &ogb_with(&dir, "split/main/valid", None, gzip),
            "split/main/valid.csv.gz",
            None,
            "missing: a split folder holds train",
        );
        expect_error(
            &ogb_with(&dir, "raw/node-label", None, gzip),
            "raw/node-label.csv.gz",
            None,
            "missing: an OGB node property folder needs",
        );
        expect_error(
            &ogb_with(&dir, "raw/edge", None, gzip),
            "raw/edge.csv.gz",
            None,
            "missing: an OGB node property folder needs raw/edge.csv.gz",
        );
    }

    // Gzip streams: truncated, with a damaged checksum, or not gzip at all.
    let d = ogb_folder(&dir, OGB_TINY, true);
    let edge = d.join("raw/edge.csv.gz");
    let whole = gzip_stored(b"0,1\n1,2\n2,0\n2,0\n");
    let input = Input::Ogb {
        dir: d.clone(),
        split: None,
    };
    std::fs::write(&edge, &whole[..whole.len() - 12]).unwrap();
    expect_error(
        &input,
        "raw/edge.csv.gz",
        Some(4),
        "the gzip stream is corrupt or truncated",
    );
    let mut bad_crc = whole.clone();
    let at = bad_crc.len() - 8;
    bad_crc[at] ^= 1;
    std::fs::write(&edge, &bad_crc).unwrap();
    expect_error(
        &input,
        "raw/edge.csv.gz",
        Some(5),
        "the gzip stream is corrupt or truncated",
    );
    std::fs::write(&edge, "0,1\n").unwrap();
    expect_error(
        &input,
        "raw/edge.csv.gz",
        Some(1),
        "the gzip stream is corrupt or truncated",
    );
    std::fs::write(&edge, &whole).unwrap();
    assert!(load(&input, &LoadOptions::default()).is_ok());

    // 2^20 nodes of 257 features are more than graph stages hold densely (2^28 values): refused
    // at the first feature row, before any row is stored.
    let many = "\n".repeat(1 << 20);
    let wide = format!("{}\n", vec!["0"; 257].join(","));
    let mut files: Vec<(&str, &str)> = vec![
        ("raw/edge", "0,1\n"),
        ("raw/node-label", &many),
        ("raw/num-node-list", "1048576\n"),
        ("raw/node-feat", &wide),
    ];
    let big = |files: &[(&str, &str)]| Input::Ogb {
        dir: ogb_folder(&dir, files, true),
        split: None,
    };
    expect_error(
        &big(&files),
        "raw/node-feat.csv.gz",
        Some(1),
        "1048576 nodes x 257 features, 269484032 values, more than the 268435456",
    );
    // One feature per node fits; so does the constant feature without a feature file.
    let rows = "0.5\n".repeat(1 << 20);
    files[3] = ("raw/node-feat", &rows);
    let no_split = LoadOptions {
        split: SplitMode::None,
        ..Default::default()
    };
    let g = node_graph(big(&files), &no_split);
    assert_eq!(
        (g.num_nodes, g.features.cols, g.features.nnz()),
        (1 << 20, 1, 1 << 20)
    );
    let g = node_graph(big(&files[..3]), &no_split);
    assert_eq!((g.features.cols, g.features.nnz()), (1, 1 << 20));
}

#[test]
fn ogb_pipelines_validate() {
    let dir = scratch("graph-ogb-validate");
    let d = ogb_folder(&dir, OGB_TINY, true);
    let pipeline = |name: &str, params: &str| {
        write_pipeline(
            &dir,
            name,
            &format!(
                "name: ogb\nsources:\n  - name: g\n    kind: graph-load\n    params: {{path: {}, \
                 {params}}}\nstages:\n  - name: c\n    kind: classify\nsinks:\n  - name: out\n    \
                 kind: jsonl\n",
                d.display()
            ),
        )
    };
    // `format: ogb`, and a folder with raw/edge.csv.gz found by `auto`.
    for (name, params) in [
        ("ogb.yaml", "format: ogb"),
        ("auto.yaml", "split: standard"),
    ] {
        let p = pipeline(name, params);
        let o = latentflow(&["validate", "--no-models", p.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", text(&o));
    }
    // A split folder that is not there is reported at `ogb_split`.
    let p = pipeline("split.yaml", "format: ogb, ogb_split: nope");
    let o = latentflow(&["validate", "--no-models", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ogb_split"), "{}", text(&o));
    assert!(err.contains("no split folder `nope`"), "{}", text(&o));
    // A broken file is named with its line.
    std::fs::write(d.join("raw/edge.csv.gz"), gzip_stored(b"0,1\n1,9\n")).unwrap();
    let p = pipeline("broken.yaml", "format: ogb");
    let o = latentflow(&["validate", "--no-models", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("edge.csv.gz:2: node id 9 is outside 0..4"),
        "{}",
        text(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// Classifiers.

#[test]
fn gcn_gradients_match_finite_differences_on_cora() {
    let Some(dir) = graphs_dir() else { return };
    // The first 80 nodes of Cora and the edges among them, on 30 of the features (shifted so
    // that none is zero). Few nodes keep ReLU kinks rare along a finite-difference step.
    let full = planetoid(&dir, "cora");
    let n = 80;
    let f = 30;
    let dense = full.features.to_dense();
    let x = dense.slice(ndarray::s![..n, ..f]).to_owned() + 0.05;
    let g = Graph {
        num_nodes: n,
        edges: full
            .edges
            .iter()
            .copied()
            .filter(|&(s, t)| s < n && t < n)
            .collect(),
        features: Csr::from_dense(x.view()),
        labels: Some(full.labels.as_ref().unwrap()[..n].to_vec()),
        graph_label: None,
        split: Some(Split {
            train: (0..n).step_by(2).collect(),
            val: vec![],
            test: vec![],
        }),
    };
    let input = GcnInput::new(&g);
    let mut rng = Rng::new(5);
    let p = GcnParams::init(f, 8, 7, &mut rng);
    let labels = g.labels.as_ref().unwrap();
    let train = &g.split.as_ref().unwrap().train;
    let masks = Rng::new(9);
    let loss = |q: &GcnParams| {
        let mut m = masks.clone();
        gcn::loss_and_grad(q, &input, labels, train, 5e-4, Some((0.5, &mut m))).0
    };
    let mut m = masks.clone();
    let (base, grad) = gcn::loss_and_grad(&p, &input, labels, train, 5e-4, Some((0.5, &mut m)));
    assert!(
        (base - loss(&p)).abs() < 1e-12,
        "the same masks give the same loss"
    );

    // Directional derivatives along random unit directions, and single coordinates of each
    // tensor, by central differences. A step that crosses a ReLU kink (where the derivative is
    // undefined) shows as disagreement between steps h and h/2; those are skipped.
    let h = 1e-3f32;
    let derivative = |shifted: &dyn Fn(f32) -> f64| {
        let fd = |h: f32| (shifted(h) - shifted(-h)) / (2.0 * h as f64);
        let (coarse, fine) = (fd(h), fd(h / 2.0));
        ((coarse - fine).abs() <= 1e-6 + 1e-3 * fine.abs()).then_some(fine)
    };
    let close = |fd: f64, an: f64| (fd - an).abs() <= 1e-6 + 1e-3 * an.abs();

    let mut directions = 0;
    let mut dir_rng = Rng::new(77);
    for _ in 0..16 {
        let mut d = p.clone();
        for s in d.slices_mut() {
            s.iter_mut().for_each(|v| *v = dir_rng.uniform() - 0.5);
        }
        let norm = d
            .slices()
            .iter()
            .flat_map(|s| s.iter())
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt();
        let shifted = |t: f32| {
            let mut q = p.clone();
            for (qs, ds) in q.slices_mut().into_iter().zip(d.slices()) {
                qs.iter_mut()
                    .zip(ds)
                    .for_each(|(v, dv)| *v += t * dv / norm);
            }
            loss(&q)
        };
        let Some(fd) = derivative(&shifted) else {
            continue;
        };
        let an: f64 = grad
            .slices()
            .iter()
            .zip(d.slices())
            .map(|(g, d)| {
                g.iter()
                    .zip(d)
                    .map(|(a, b)| (a * b / norm) as f64)
                    .sum::<f64>()
            })
            .sum();
        assert!(
            close(fd, an),
            "direction: finite difference {fd}, gradient {an}"
        );
        directions += 1;
    }
    assert!(
        directions >= 8,
        "only {directions} directions without a kink"
    );

    let mut checked = 0;
    for k in 0..4 {
        let len = p.slices()[k].len();
        for i in (0..len).step_by((len / 12).max(1)) {
            let shifted = |t: f32| {
                let mut q = p.clone();
                q.slices_mut()[k][i] += t;
                loss(&q)
            };
            let Some(fd) = derivative(&shifted) else {
                continue;
            };
            let an = grad.slices()[k][i] as f64;
            assert!(
                close(fd, an),
                "tensor {k} entry {i}: finite difference {fd}, gradient {an}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "{checked} coordinates checked");
}

#[test]
fn gcn_reaches_the_papers_accuracy_on_cora() {
    let Some(dir) = graphs_dir() else { return };
    let g = planetoid(&dir, "cora");
    let acc = gcn_accuracies(&g, 0..5);
    let (mean, std) = mean_std(&acc);
    eprintln!(
        "GCN on Cora, 5 seeds: test accuracy {:.1} ± {:.1} % (Kipf & Welling: 81.5)",
        100.0 * mean,
        100.0 * std
    );
    assert!(mean >= 0.79, "mean test accuracy {mean:.4} over {acc:?}");
    assert!(acc.iter().all(|&a| a >= 0.77), "{acc:?}");
    // Seeded: the same seed gives the same result.
    assert_eq!(gcn_accuracies(&g, 0..1)[0], acc[0]);
}

#[test]
fn gcn_reaches_the_papers_accuracy_on_citeseer() {
    let Some(dir) = graphs_dir() else { return };
    let g = planetoid(&dir, "citeseer");
    let acc = gcn_accuracies(&g, 0..5);
    let (mean, std) = mean_std(&acc);
    eprintln!(
        "GCN on CiteSeer, 5 seeds: test accuracy {:.1} ± {:.1} % (Kipf & Welling: 70.3)",
        100.0 * mean,
        100.0 * std
    );
    assert!(mean >= 0.68, "mean test accuracy {mean:.4} over {acc:?}");
}

#[test]
fn f1_scores_match_scikit_learn() {
    let Some(dir) = graphs_dir() else { return };
    let g = planetoid(&dir, "cora");
    // Few epochs, so that classes are confused and macro differs from micro.
    let s = GcnSettings {
        epochs: 15,
        ..Default::default()
    };
    let r = gcn::train(&g, &s).unwrap();
    let labels = g.labels.as_ref().unwrap();
    let split = g.split.as_ref().unwrap();
    let pick = |nodes: &[usize], v: &[i64]| nodes.iter().map(|&i| v[i]).collect::<Vec<_>>();
    let payload = json!({
        "test": [pick(&split.test, labels), pick(&split.test, &r.predictions)],
        "val": [pick(&split.val, labels), pick(&split.val, &r.predictions)],
    });
    let path = scratch("graph-f1").join("preds.json");
    std::fs::write(&path, payload.to_string()).unwrap();
    let sk = run_python(
        r#"
import json, sys
from sklearn.metrics import accuracy_score, f1_score
d = json.load(open(sys.argv[1]))
print(json.dumps({k: [accuracy_score(t, p), f1_score(t, p, average="micro"),
                      f1_score(t, p, average="macro")] for k, (t, p) in d.items()}))
"#,
        &[path.to_str().unwrap()],
    );
    for (part, scores) in [("test", r.test), ("val", r.val)] {
        let want: Vec<f64> = sk[part]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = [scores.accuracy, scores.micro_f1, scores.macro_f1];
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-12,
                "{part}: ours {got:?}, scikit-learn {want:?}"
            );
        }
        assert!((scores.macro_f1 - scores.micro_f1).abs() > 1e-3);
    }
}

#[test]
fn logistic_regression_on_frozen_gcn_embeddings() {
    let Some(dir) = graphs_dir() else { return };
    let g = planetoid(&dir, "cora");
    let r = gcn::train(&g, &GcnSettings::default()).unwrap();
    let emb: Array2<f32> = r.embeddings.unwrap();
    assert_eq!(emb.dim(), (2708, 16));
    let probe = Graph {
        features: Csr::from_dense(emb.view()),
        ..g.clone()
    };
    let settings = LogregSettings {
        epochs: 300,
        lr: 0.05,
        weight_decay: 0.0,
    };
    let lr = logreg::train(&probe, &settings).unwrap();
    eprintln!(
        "logistic regression on frozen GCN embeddings: test accuracy {:.3} (GCN {:.3})",
        lr.test.accuracy, r.test.accuracy
    );
    assert!(lr.test.accuracy > 0.75, "{:?}", lr.test);
    // On the raw bag of words alone, a linear model is far weaker than the GCN.
    let raw = logreg::train(&g, &LogregSettings::default()).unwrap();
    assert!(raw.test.accuracy < r.test.accuracy - 0.1, "{:?}", raw.test);
}

// ---------------------------------------------------------------------------------------------
// The pipeline.

#[test]
fn gcn_cora_pipeline_validates_and_runs() {
    let Some(graphs) = graphs_dir() else { return };
    let dir = scratch("graph-pipeline");
    // The shipped file, pointed at wherever the data is.
    let yaml = std::fs::read_to_string(root().join("pipelines/gcn-cora.yaml")).unwrap();
    assert!(yaml.contains("../../shared/data/graphs/cora.planetoid.npz"));
    let yaml = yaml.replace(
        "../../shared/data/graphs",
        graphs.to_str().expect("a UTF-8 path"),
    );
    let p = write_pipeline(&dir, "gcn-cora.yaml", &yaml);
    let o = latentflow(&["validate", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    let out = dir.join("out");
    let o = latentflow(&["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let scores: Json =
        serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap()).unwrap();
    let mean = |f: &str| scores["fields"][f]["mean"].as_f64().unwrap_or(f64::NAN);
    let acc = mean("accuracy");
    eprintln!(
        "pipelines/gcn-cora.yaml: accuracy {:.4} ± {:.4}, macro-F1 {:.4}",
        acc,
        mean("accuracy_std"),
        mean("macro_f1")
    );
    assert!(acc >= 0.79, "{scores:#}");
    assert!(
        mean("accuracy_std") > 0.0 && mean("accuracy_std") < 0.03,
        "{scores:#}"
    );
    assert!((acc - mean("micro_f1")).abs() < 1e-9);

    // Seed 0 through the Rust API predicts the same classes.
    let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let line: Json = serde_json::from_str(preds.lines().next().unwrap()).unwrap();
    let piped: Vec<i64> = line["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let api = gcn::train(&planetoid(&graphs, "cora"), &GcnSettings::default()).unwrap();
    assert_eq!(piped, api.predictions);
    assert!(out.join("loss.png").exists() && out.join("metrics.json").exists());
}
