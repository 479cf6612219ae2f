//! The `gnn-embed` stage (`stages/src/graph/embed.rs`): whole graphs against the packages'
//! reference outputs, disjoint unions split back per graph, k-hop subgraphs against the
//! whole-graph embedding (and the exact condition for GCN borders), prompts against ONNX
//! Runtime's Python API on `x + p`, incremental re-embedding (differential dataflow) against a
//! full recomputation, the stage's modes on records, and `pipelines/embed-cora.yaml`.
//!
//! Tests that need the real graphs (`../shared/data`, or `LATENTFLOW_SHARED_DATA`) say so and
//! pass without checking anything when the folder is absent.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use latentflow_engine::{
    Completion, Outcome, Params, Record, Schema, StageContext, StageFactory, Tensor, Value, Waker,
};
use latentflow_stages::graph::embed::{
    EmbedOptions, GnnEmbedStage, GnnEmbedder, GnnGraph, ModelIo, Prompt,
};
use latentflow_stages::graph::embed_incremental::{
    affected_by_search, AffectedNodes, GraphDelta, IncrementalEmbedder,
};
use latentflow_stages::graph::load::{load, Input, LoadOptions, SplitMode};
use latentflow_stages::graph::subgraph::{Adjacency, Direction, Scratch};
use latentflow_stages::graph::Rng;
use ndarray::{Array1, Array2, ArrayD, Axis, IxDyn};
use ndarray_npy::{read_npy, write_npy};
use serde_json::{json, Value as Json};

use common::{graphs_dir, latentflow, python, root, scratch, text, write_pipeline};

// ---------------------------------------------------------------------------------------------
// Helpers.

fn model(name: &str) -> PathBuf {
    root().join("models").join(name)
}

fn embedder(name: &str, max_nodes: usize) -> GnnEmbedder {
    let options = EmbedOptions {
        device: latentflow_engine::inference::Device::Cpu,
        max_nodes,
        ..Default::default()
    };
    GnnEmbedder::open(model(name), &options).unwrap_or_else(|e| panic!("{e}"))
}

fn max_abs(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn row_diff(a: &Array2<f32>, i: usize, b: &Array2<f32>, j: usize) -> f32 {
    a.row(i)
        .iter()
        .zip(b.row(j))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn reference(name: &str, file: &str) -> PathBuf {
    model(name).join("reference").join(file)
}

/// The reference graph of a package (a 2-hop subgraph of Cora for the GCNs).
fn reference_graph(name: &str) -> GnnGraph {
    let x: Array2<f32> = read_npy(reference(name, "inputs/x.npy")).unwrap();
    let ei: Array2<i64> = read_npy(reference(name, "inputs/edge_index.npy")).unwrap();
    let edges = ei
        .columns()
        .into_iter()
        .map(|c| (c[0] as usize, c[1] as usize))
        .collect();
    GnnGraph::new(x, edges).unwrap()
}

/// Cora with its raw binary features and both directions of every edge, as the encoders take it.
fn cora(dir: &Path) -> GnnGraph {
    let opts = LoadOptions {
        split: SplitMode::Standard,
        ..Default::default()
    };
    let mut d = load(&Input::Npz(dir.join("cora.planetoid.npz")), &opts).unwrap();
    GnnGraph::from_graph(&d.graphs.remove(0))
}

/// The graphs of gin-mutag's reference union (5 MUTAG molecules), each renumbered from 0.
fn mutag_reference_graphs() -> Vec<GnnGraph> {
    let x: Array2<f32> = read_npy(reference("gin-mutag", "inputs/x.npy")).unwrap();
    let ei: Array2<i64> = read_npy(reference("gin-mutag", "inputs/edge_index.npy")).unwrap();
    let batch: Array1<i64> = read_npy(reference("gin-mutag", "inputs/batch.npy")).unwrap();
    let graphs = batch.iter().copied().max().unwrap() as usize + 1;
    (0..graphs)
        .map(|k| {
            let nodes: Vec<usize> = (0..batch.len()).filter(|&i| batch[i] == k as i64).collect();
            let first = nodes[0];
            let xs = x.select(Axis(0), &nodes);
            let edges = ei
                .columns()
                .into_iter()
                .filter(|c| batch[c[0] as usize] == k as i64)
                .map(|c| (c[0] as usize - first, c[1] as usize - first))
                .collect();
            GnnGraph::new(xs, edges).unwrap()
        })
        .collect()
}

/// Runs the package with ONNX Runtime's Python API (CPU) on `<dir>/x.npy` and
/// `<dir>/edge_index.npy` (and `batch.npy` when present); writes `<dir>/<output>.npy`.
fn python_onnxruntime(package: &str, dir: &Path) {
    let script = r#"
import sys, os, numpy as np, onnxruntime as ort
onnx, d = sys.argv[1], sys.argv[2]
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(onnx, so, providers=["CPUExecutionProvider"])
feeds = {i.name: np.load(os.path.join(d, i.name + ".npy")) for i in s.get_inputs()}
for o, v in zip(s.get_outputs(), s.run(None, feeds)):
    np.save(os.path.join(d, o.name + ".npy"), v)
"#;
    let o = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(model(package).join("model.onnx"))
        .arg(dir)
        .output()
        .expect("the project's Python runs");
    assert!(o.status.success(), "{}", text(&o));
}

fn edge_array(edges: &[(usize, usize)]) -> Array2<i64> {
    let mut a = Array2::zeros((2, edges.len()));
    for (k, &(s, t)) in edges.iter().enumerate() {
        a[[0, k]] = s as i64;
        a[[1, k]] = t as i64;
    }
    a
}

fn graph_record(key: &str, g: &GnnGraph) -> Record {
    Record::new(key, 0)
        .with("x", Value::Tensor(Tensor::f32(g.x().clone().into_dyn())))
        .with(
            "edge_index",
            Value::Tensor(Tensor::i64(edge_array(g.edges()).into_dyn())),
        )
}

/// Builds the `gnn-embed` stage with `params` and runs it on `records` outside a dataflow.
fn run_stage(params: Json, records: Vec<Record>) -> Vec<Outcome> {
    let factory = GnnEmbedStage;
    let info = factory.info();
    let params =
        Params::new(params.as_object().unwrap().clone(), root()).with_defaults(&info.params);
    let cx = StageContext {
        name: "embed".into(),
        worker: 0,
        peers: 1,
        waker: Waker::noop(),
        out_dir: std::env::temp_dir(),
    };
    let mut stage = factory
        .build(&params, &cx)
        .unwrap_or_else(|e| panic!("{e}"));
    match stage.process(records, &cx) {
        Completion::Ready(out) => out,
        Completion::Pending(mut p) => loop {
            if let Some(out) = p.poll() {
                break out;
            }
            std::thread::sleep(Duration::from_millis(1));
        },
    }
}

fn plan_stage(params: Json, schema: &Schema) -> Result<Schema, String> {
    let factory = GnnEmbedStage;
    let params = Params::new(params.as_object().unwrap().clone(), root())
        .with_defaults(&factory.info().params);
    factory
        .plan(&params, schema)
        .map(|p| p.apply(schema))
        .map_err(|i| {
            i.iter()
                .map(|i| i.message.clone())
                .collect::<Vec<_>>()
                .join("; ")
        })
}

fn f32_field(r: &Record, name: &str) -> ArrayD<f32> {
    r.tensor(name)
        .unwrap_or_else(|e| panic!("{e}"))
        .as_f32()
        .unwrap()
        .clone()
}

fn as2(a: ArrayD<f32>) -> Array2<f32> {
    a.into_dimensionality().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Packages, whole graphs and unions.

#[test]
fn gnn_packages_are_recognised_by_their_shapes() {
    let io = embedder("gnn-cora-edgepred", 1000).io().clone();
    assert_eq!(
        io,
        ModelIo {
            name: "gnn-cora-edgepred".into(),
            x: "x".into(),
            edge_index: "edge_index".into(),
            batch: None,
            h: "h".into(),
            g: None,
            features: Some(1433),
            dim: Some(128),
        }
    );
    let io = embedder("gin-mutag", 1000).io().clone();
    assert_eq!(io.batch.as_deref(), Some("batch"));
    assert_eq!(io.g.as_deref(), Some("g"));
    assert_eq!((io.features, io.dim), (Some(7), Some(96)));
    // A model that is not a GNN package is refused, at planning, with the reason.
    let err = plan_stage(json!({"model": "models/digits-mlp"}), &Schema::new()).unwrap_err();
    assert!(err.contains("batch"), "{err}");
}

#[test]
fn whole_graph_matches_the_package_reference() {
    for name in [
        "gnn-cora-edgepred",
        "gnn-cora-graphcl",
        "gnn-citeseer-edgepred",
    ] {
        let e = embedder(name, 100_000);
        let g = reference_graph(name);
        let want: Array2<f32> = read_npy(reference(name, "outputs/h.npy")).unwrap();
        let got = e.embed(&g).unwrap();
        assert!(got.g.is_none());
        let d = max_abs(&got.h, &want);
        eprintln!("{name}: whole graph vs reference, max abs {d:.2e}");
        assert!(d <= 1e-5, "{name}: {d}");
    }
}

#[test]
fn disjoint_unions_split_back_per_graph() {
    // gin-mutag's reference is itself a union of 5 molecules: split it, embed the molecules as
    // one union (and as unions of at most 20 nodes, several calls), compare with the reference.
    let graphs = mutag_reference_graphs();
    let want_h: Array2<f32> = read_npy(reference("gin-mutag", "outputs/h.npy")).unwrap();
    let want_g: Array2<f32> = read_npy(reference("gin-mutag", "outputs/g.npy")).unwrap();
    for max_nodes in [10_000, 20] {
        let e = embedder("gin-mutag", max_nodes);
        let calls_before = e.service().stats().batches;
        let got = e.embed_many(&graphs).unwrap();
        let calls = e.service().stats().batches - calls_before;
        let mut row = 0;
        let mut worst = (0f32, 0f32);
        for (k, (emb, g)) in got.iter().zip(&graphs).enumerate() {
            let n = g.num_nodes();
            let want = want_h.slice(ndarray::s![row..row + n, ..]).to_owned();
            worst.0 = worst.0.max(max_abs(&emb.h, &want));
            let gk = emb.g.as_ref().expect("graph embedding");
            let scale = want_g.row(k).iter().fold(1f32, |m, v| m.max(v.abs()));
            let d = gk
                .iter()
                .zip(want_g.row(k))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            worst.1 = worst.1.max(d / scale);
            row += n;
        }
        eprintln!(
            "gin-mutag, max_nodes {max_nodes}: {calls} calls, h max abs {:.2e}, g max rel {:.2e}",
            worst.0, worst.1
        );
        assert!(worst.0 <= 1e-5 && worst.1 <= 1e-5, "{worst:?}");
        if max_nodes == 20 {
            assert!(calls >= 3, "{calls} calls");
        } else {
            assert_eq!(calls, 1);
        }
    }
    // Node-level packages (no batch input) run on concatenations: two copies of the reference
    // subgraph in one call give the same rows as one.
    let e = embedder("gnn-cora-edgepred", 100_000);
    let g = reference_graph("gnn-cora-edgepred");
    let one = e.embed(&g).unwrap().h;
    let two = e.embed_many(&[g.clone(), g]).unwrap();
    assert!(max_abs(&two[0].h, &one) <= 1e-6 && max_abs(&two[1].h, &one) <= 1e-6);
}

// ---------------------------------------------------------------------------------------------
// k-hop subgraphs.

/// Subgraph embeddings of `targets` against the whole-graph rows; returns per-target max abs.
fn subgraph_errors(
    e: &GnnEmbedder,
    g: &GnnGraph,
    whole: &Array2<f32>,
    targets: &[usize],
    hops: usize,
) -> Vec<f32> {
    let sub = e.embed_subgraphs(g, targets, hops, None, None).unwrap();
    assert_eq!(sub.h.nrows(), targets.len());
    assert_eq!(sub.truncated, 0);
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| row_diff(&sub.h, i, whole, t))
        .collect()
}

/// Whether each target's `hops`-ball is closed (holds its whole in-reachable set).
fn closed(g: &GnnGraph, targets: &[usize], hops: usize) -> Vec<bool> {
    let mut s = Scratch::new(g.num_nodes());
    targets
        .iter()
        .map(|&t| {
            s.ball(g.adjacency(), &[t], hops, Direction::In, None)
                .closed
        })
        .collect()
}

#[test]
fn subgraphs_of_the_reference_graph_are_exact_at_layers_plus_one() {
    // The 43-node reference subgraph, every node a target: 2 GCN layers, so 3 hops are exact;
    // at 2 hops exactly the targets with a closed ball are.
    let e = embedder("gnn-cora-edgepred", 2_000);
    let g = reference_graph("gnn-cora-edgepred");
    let whole = e.embed(&g).unwrap().h;
    let targets: Vec<usize> = (0..g.num_nodes()).collect();
    let err3 = subgraph_errors(&e, &g, &whole, &targets, 3);
    assert!(err3.iter().all(|&d| d <= 1e-5), "{err3:?}");
    let err2 = subgraph_errors(&e, &g, &whole, &targets, 2);
    for ((t, &d), c) in targets.iter().zip(&err2).zip(closed(&g, &targets, 2)) {
        assert_eq!(d <= 1e-5, c, "target {t}: closed {c}, error {d}");
    }
}

#[test]
fn subgraphs_on_cora_match_the_whole_graph() {
    let Some(dir) = graphs_dir() else { return };
    let g = cora(&dir);
    let e = embedder("gnn-cora-edgepred", 20_000);
    let whole = e.embed(&g).unwrap().h;
    // 300 seeded targets and the 5 nodes of highest in-degree (the largest balls).
    let mut rng = Rng::new(11);
    let mut targets: BTreeSet<usize> = (0..300).map(|_| rng.below(g.num_nodes())).collect();
    let mut by_degree: Vec<usize> = (0..g.num_nodes()).collect();
    by_degree.sort_by_key(|&v| std::cmp::Reverse(g.adjacency().in_neighbours(v).len()));
    targets.extend(&by_degree[..5]);
    let targets: Vec<usize> = targets.into_iter().collect();

    let t0 = Instant::now();
    let err3 = subgraph_errors(&e, &g, &whole, &targets, 3);
    let worst3 = err3.iter().copied().fold(0.0, f32::max);
    eprintln!(
        "cora, {} targets, hops 3: max abs {worst3:.2e} ({:.2}s)",
        targets.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(worst3 <= 1e-5, "hops = layers + 1 must be exact: {worst3}");

    // hops = layers: exact exactly where the 2-hop ball is closed.
    let err2 = subgraph_errors(&e, &g, &whole, &targets, 2);
    let closed2 = closed(&g, &targets, 2);
    let mut open_exact = 0;
    for ((t, &d), &c) in targets.iter().zip(&err2).zip(&closed2) {
        if c {
            assert!(d <= 1e-5, "closed ball of {t}: {d}");
        } else if d <= 1e-5 {
            open_exact += 1;
        }
    }
    let open = closed2.iter().filter(|&&c| !c).count();
    eprintln!(
        "cora, hops 2: {} closed balls exact; {open} open balls, {open_exact} of them within 1e-5, \
         largest error {:.2e}",
        targets.len() - open,
        err2.iter().copied().fold(0.0, f32::max)
    );
    assert_eq!(open_exact, 0, "an open 2-hop ball should not be exact");
    assert!(open > targets.len() / 2);
}

#[test]
fn gin_subgraphs_are_exact_at_layers() {
    // GIN sums messages without degree terms: 3 layers need 3 hops, not 4.
    let graphs = mutag_reference_graphs();
    let e = embedder("gin-mutag", 5_000);
    for g in &graphs {
        let whole = e.embed(g).unwrap().h;
        let targets: Vec<usize> = (0..g.num_nodes()).collect();
        let sub = e.embed_subgraphs(g, &targets, 3, None, None).unwrap();
        let d = max_abs(&sub.h, &whole);
        assert!(d <= 1e-5, "{d}");
        // Each target's subgraph also has a graph embedding.
        assert_eq!(sub.g.as_ref().unwrap().nrows(), targets.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Prompts.

/// A hand-built graph with Cora's feature width: 8 nodes, a path 0-1-2-3-4 plus a triangle
/// 4-5-6 and a node apart, binary features.
fn hand_built() -> GnnGraph {
    let mut rng = Rng::new(3);
    let mut x = Array2::<f32>::zeros((8, 1433));
    for v in x.iter_mut() {
        if rng.uniform() < 0.02 {
            *v = 1.0;
        }
    }
    let und = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 4)];
    let edges = und.iter().flat_map(|&(a, b)| [(a, b), (b, a)]).collect();
    GnnGraph::new(x, edges).unwrap()
}

#[test]
fn prompts_add_to_the_chosen_nodes_features() {
    let g = hand_built();
    let e = embedder("gnn-cora-edgepred", 10_000);
    let n = g.num_nodes();
    // Prompt node 1 only, then nodes 5 and 7 together, then nothing.
    let mut rng = Rng::new(5);
    let mut prompts = vec![Array2::<f32>::zeros((n, 1433)); 3];
    for (c, nodes) in [(0usize, vec![1usize]), (1, vec![5, 7])] {
        for &v in &nodes {
            for j in 0..1433 {
                prompts[c][[v, j]] = rng.uniform() - 0.5;
            }
        }
    }
    let got = e.embed_prompted(&g, &prompts).unwrap();
    assert_eq!(got.len(), 3);

    // ONNX Runtime's Python API on x + p, for each prompt.
    let dir = scratch("embed-prompt");
    write_npy(dir.join("edge_index.npy"), &edge_array(g.edges())).unwrap();
    let plain = e.embed(&g).unwrap().h;
    for (c, p) in prompts.iter().enumerate() {
        let xp = g.x() + p;
        write_npy(dir.join("x.npy"), &xp).unwrap();
        python_onnxruntime("gnn-cora-edgepred", &dir);
        let want: Array2<f32> = read_npy(dir.join("h.npy")).unwrap();
        let d = max_abs(&got[c], &want);
        assert!(d <= 1e-5, "prompt {c}: {d} from ONNX Runtime on x + p");
        // And the same as embedding the graph with features x + p.
        let direct = e.embed(&g.with_features(xp).unwrap()).unwrap().h;
        assert!(max_abs(&got[c], &direct) <= 1e-6);
    }
    // Prompting changes only what the prompted node reaches in 2 layers: node 1's prompt
    // reaches 0..=3, not 4..=7; nodes 5 and 7 reach 4, 5, 6 and 7 but not 0..=2.
    let changed = |c: usize| -> Vec<usize> {
        (0..n)
            .filter(|&v| row_diff(&got[c], v, &plain, v) > 1e-5)
            .collect()
    };
    assert_eq!(changed(0), vec![0, 1, 2, 3]);
    assert_eq!(changed(1), vec![3, 4, 5, 6, 7]);
    assert!(changed(2).is_empty());
}

#[test]
fn prompted_graph_embeddings_of_molecules() {
    // Graph-level outputs of prompted copies: one g per copy, equal to the molecule run alone
    // with x + p.
    let g = &mutag_reference_graphs()[0];
    let e = embedder("gin-mutag", 10_000);
    let mut rng = Rng::new(9);
    // Sparse prompts naming one node twice: the two rows add up.
    let prompts: Vec<Prompt> = (0..4)
        .map(|_| {
            let v = rng.below(g.num_nodes());
            let values = Array2::from_shape_fn((2, 7), |_| rng.uniform() - 0.5);
            Prompt::sparse(&[v, v], &values).unwrap()
        })
        .collect();
    let got = e.embed_prompted_full(g, prompts.clone()).unwrap();
    for (p, emb) in prompts.iter().zip(&got) {
        let mut x = g.x().clone();
        if let Prompt::Rows(rows) = p {
            for (&v, r) in rows {
                for (a, b) in x.row_mut(v).iter_mut().zip(r) {
                    *a += b;
                }
            }
        }
        let alone = e.embed(&g.with_features(x).unwrap()).unwrap();
        assert!(max_abs(&emb.h, &alone.h) <= 1e-5);
        let (a, b) = (emb.g.as_ref().unwrap(), alone.g.as_ref().unwrap());
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-4, "{d}");
    }
}

// ---------------------------------------------------------------------------------------------
// The stage on records.

#[test]
fn stage_modes_on_records() {
    let g = hand_built();
    let n = g.num_nodes();
    let e = embedder("gnn-cora-edgepred", 10_000);
    let plain = e.embed(&g).unwrap().h;

    // Graph mode, several records in one batch (one union), plus a record that fails alone.
    let mut bad = graph_record("bad", &g);
    bad.set(
        "edge_index",
        Value::Tensor(Tensor::i64(
            ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![0, 99]).unwrap(),
        )),
    );
    let out = run_stage(
        json!({"model": "models/gnn-cora-edgepred", "device": "cpu"}),
        vec![graph_record("a", &g), bad, graph_record("b", &g)],
    );
    assert_eq!(out.len(), 3);
    let failures: Vec<_> = out.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0].reason.contains("outside"),
        "{}",
        failures[0].reason
    );
    for r in out.iter().filter_map(|o| o.as_ref().ok()) {
        assert!(max_abs(&as2(f32_field(r, "h")), &plain) <= 1e-6);
    }

    // A 3-D prompt: one prompted copy per slice, outputs with a copies axis.
    let mut p = ndarray::Array3::<f32>::zeros((3, n, 1433));
    p[[1, 2, 10]] = 1.0;
    p[[2, 6, 20]] = -0.5;
    let rec = graph_record("p", &g).with("p", Value::Tensor(Tensor::f32(p.clone().into_dyn())));
    let out = run_stage(
        json!({"model": "models/gnn-cora-edgepred", "device": "cpu", "prompt": "p", "output": "hp"}),
        vec![rec],
    );
    let h = f32_field(out[0].as_ref().unwrap(), "hp");
    assert_eq!(h.shape(), &[3, n, 128]);
    let want = e
        .embed_prompted(
            &g,
            &p.outer_iter().map(|c| c.to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
    for (c, w) in want.iter().enumerate() {
        let got = h
            .index_axis(Axis(0), c)
            .to_owned()
            .into_dimensionality()
            .unwrap();
        assert!(max_abs(&got, w) <= 1e-6);
    }

    // A sparse prompt (node 2 twice: the rows add up) equals the dense one.
    let rec = graph_record("s", &g)
        .with(
            "pn",
            Value::Tensor(Tensor::i64(
                ArrayD::from_shape_vec(IxDyn(&[2]), vec![2, 2]).unwrap(),
            )),
        )
        .with("pv", {
            let mut v = ArrayD::<f32>::zeros(IxDyn(&[2, 1433]));
            v[[0, 10]] = 0.25;
            v[[1, 10]] = 0.75;
            Value::Tensor(Tensor::f32(v))
        });
    let out = run_stage(
        json!({"model": "models/gnn-cora-edgepred", "device": "cpu",
               "prompt_nodes": "pn", "prompt_values": "pv"}),
        vec![rec],
    );
    let got = as2(f32_field(out[0].as_ref().unwrap(), "h"));
    assert!(max_abs(&got, &want[1]) <= 1e-6);

    // Subgraphs of chosen targets.
    let rec = graph_record("t", &g).with(
        "targets",
        Value::Tensor(Tensor::i64(
            ArrayD::from_shape_vec(IxDyn(&[3]), vec![6, 0, 3]).unwrap(),
        )),
    );
    let out = run_stage(
        json!({"model": "models/gnn-cora-edgepred", "device": "cpu", "mode": "subgraphs",
               "hops": 3, "targets": "targets", "max_nodes": 6}),
        vec![rec],
    );
    let got = as2(f32_field(out[0].as_ref().unwrap(), "h"));
    for (i, t) in [6, 0, 3].into_iter().enumerate() {
        assert!(row_diff(&got, i, &plain, t) <= 1e-5);
    }

    // Incremental: delete edge 0-1 (both directions), change node 7's features.
    let mut edges: Vec<(usize, usize)> = g.edges().to_vec();
    edges.retain(|&e| e != (0, 1) && e != (1, 0));
    let mut x = g.x().clone();
    x[[7, 0]] = 1.0 - x[[7, 0]];
    let new = GnnGraph::new(x, edges).unwrap();
    let full = e.embed(&new).unwrap().h;
    let rec = graph_record("i", &new)
        .with(
            "h_prev",
            Value::Tensor(Tensor::f32(plain.clone().into_dyn())),
        )
        .with(
            "ce",
            Value::Tensor(Tensor::i64(
                ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![0, 1]).unwrap(),
            )),
        )
        .with(
            "cn",
            Value::Tensor(Tensor::i64(
                ArrayD::from_shape_vec(IxDyn(&[1]), vec![7]).unwrap(),
            )),
        );
    let out = run_stage(
        json!({"model": "models/gnn-cora-edgepred", "device": "cpu", "mode": "incremental",
               "layers": 2, "changed_edges": "ce", "changed_nodes": "cn"}),
        vec![rec],
    );
    let r = out[0].as_ref().unwrap();
    let got = as2(f32_field(r, "h"));
    assert!(max_abs(&got, &full) <= 1e-5);
    // Seeds 0, 1, 7; their 2-hop out-balls in the new graph: 0 (now alone), 1..=3, 7.
    assert!(matches!(r.get("h_affected"), Some(Value::Int(5))));
    assert!(matches!(r.get("h_computed"), Some(Value::Int(_))));
}

#[test]
fn stage_plans_name_their_fields() {
    let mut schema = Schema::new();
    let s = plan_stage(
        json!({"model": "models/gin-mutag", "mode": "subgraphs", "hops": 3}),
        &schema,
    )
    .unwrap();
    assert_eq!(s["h"].to_string(), "tensor<f32>[targets, 96]");
    assert_eq!(s["g"].to_string(), "tensor<f32>[targets, 96]");
    schema.insert(
        "p".into(),
        latentflow_engine::FieldType::f32(latentflow_engine::Shape(Some(vec![
            latentflow_engine::Dim::Named("copies".into()),
            latentflow_engine::Dim::Named("nodes".into()),
            latentflow_engine::Dim::Fixed(1433),
        ]))),
    );
    let s = plan_stage(
        json!({"model": "models/gnn-cora-graphcl", "prompt": "p"}),
        &schema,
    )
    .unwrap();
    assert_eq!(s["h"].to_string(), "tensor<f32>[copies, nodes, 128]");
    let err = plan_stage(
        json!({"model": "models/gnn-cora-graphcl", "mode": "incremental"}),
        &Schema::new(),
    )
    .unwrap_err();
    assert!(err.contains("changed_edges"), "{err}");
    let err = plan_stage(
        json!({"model": "models/gnn-cora-graphcl", "prompt_nodes": "pn"}),
        &Schema::new(),
    )
    .unwrap_err();
    assert!(err.contains("prompt_values"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Incremental re-embedding.

/// Both directions of `k` random undirected edges absent from `edges`.
fn random_new_edges(
    rng: &mut Rng,
    n: usize,
    edges: &BTreeSet<(usize, usize)>,
    k: usize,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    while out.len() < 2 * k {
        let (a, b) = (rng.below(n), rng.below(n));
        if a != b && !edges.contains(&(a, b)) && !out.contains(&(a, b)) {
            out.extend([(a, b), (b, a)]);
        }
    }
    out
}

#[test]
fn incremental_reembedding_on_cora_equals_full_recomputation() {
    let Some(dir) = graphs_dir() else { return };
    let g = cora(&dir);
    let n = g.num_nodes();
    // Calls of at most 512 nodes: a joint ball larger than that is split into groups.
    let e = embedder("gnn-cora-edgepred", 512);
    let mut inc = IncrementalEmbedder::new(&e, &g, 2).unwrap();
    let mut paths = (false, false);
    let mut rng = Rng::new(2024);
    let mut edges: BTreeSet<(usize, usize)> = g.edges().iter().copied().collect();
    // A differential computation of its own, checked against a plain search every round.
    let list: Vec<_> = edges.iter().copied().collect();
    let mut dd = AffectedNodes::new(n, &list, 2);
    let rounds: [(usize, usize, usize); 6] = [
        // (undirected insertions, undirected deletions, feature changes)
        (1, 0, 0),
        (0, 1, 0),
        (0, 0, 1),
        (3, 2, 2),
        (10, 10, 5),
        (40, 40, 20),
    ];
    for (round, &(ins, del, feat)) in rounds.iter().enumerate() {
        let inserted = random_new_edges(&mut rng, n, &edges, ins);
        let present: Vec<(usize, usize)> = edges.iter().copied().filter(|&(a, b)| a < b).collect();
        let mut deleted = Vec::new();
        while deleted.len() < 2 * del {
            let (a, b) = present[rng.below(present.len())];
            if !deleted.contains(&(a, b)) {
                deleted.extend([(a, b), (b, a)]);
            }
        }
        let features: Vec<(usize, Vec<f32>)> = (0..feat)
            .map(|_| {
                let v = rng.below(n);
                let mut row = inc.graph().x().row(v).to_vec();
                for _ in 0..5 {
                    let j = rng.below(row.len());
                    row[j] = 1.0 - row[j];
                }
                (v, row)
            })
            .collect();
        let delta = GraphDelta {
            inserted: inserted.clone(),
            deleted: deleted.clone(),
            features: features.clone(),
        };
        let t0 = Instant::now();
        let report = inc.apply(&delta).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        for d in &deleted {
            edges.remove(d);
        }
        edges.extend(inserted.iter().copied());

        // Against a full recomputation of the new graph.
        let t1 = Instant::now();
        let full = e.embed(inc.graph()).unwrap().h;
        let full_dt = t1.elapsed().as_secs_f64();
        let d = max_abs(inc.embeddings(), &full);
        eprintln!(
            "round {round}: +{} −{} edges, {feat} feature rows: recomputed {} of {n} nodes \
             ({} through the GNN{}), max abs {d:.2e}; {dt:.3}s vs full {full_dt:.3}s",
            inserted.len(),
            deleted.len(),
            report.affected,
            report.computed,
            if report.whole { ", whole graph" } else { "" }
        );
        assert!(d <= 1e-5, "round {round}: {d}");
        assert_eq!(report.nodes.len(), report.affected);
        if report.whole {
            paths.1 = true;
        } else {
            paths.0 = true;
        }
        assert!(report.affected < n);

        // The differential computation against a plain breadth-first search.
        let changed: Vec<usize> = features.iter().map(|(v, _)| *v).collect();
        let got = dd.update(&inserted, &deleted, &changed);
        let list: Vec<_> = edges.iter().copied().collect();
        let seeds: Vec<usize> = inserted
            .iter()
            .chain(&deleted)
            .flat_map(|&(a, b)| [a, b])
            .chain(changed.iter().copied())
            .collect();
        let want = affected_by_search(&Adjacency::new(n, &list), &seeds, 2);
        assert_eq!(got, want, "round {round}");
        assert_eq!(got, report.nodes, "round {round}");
    }
    assert!(
        paths.0 && paths.1,
        "both the subgraph and the whole-graph path ran"
    );
    // Deleting an edge that is not there is refused, and changes nothing.
    let err = inc
        .apply(&GraphDelta {
            deleted: vec![(0, 0)],
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.contains("not in the graph"), "{err}");
}

#[test]
fn incremental_groups_fit_small_calls() {
    // A path of 300 nodes and calls of at most 8 nodes: the affected nodes' balls are split
    // into groups, many groups per call, and the result still equals a full recomputation.
    let n = 300;
    let mut rng = Rng::new(17);
    let x = Array2::from_shape_fn((n, 1433), |_| (rng.uniform() < 0.02) as u8 as f32);
    let edges = (0..n - 1).flat_map(|i| [(i, i + 1), (i + 1, i)]).collect();
    let g = GnnGraph::new(x, edges).unwrap();
    let e = embedder("gnn-cora-edgepred", 8);
    let mut inc = IncrementalEmbedder::new(&e, &g, 2).unwrap();
    let calls_before = e.service().stats().batches;
    let features = [10usize, 100, 200]
        .iter()
        .map(|&v| {
            let mut row = g.x().row(v).to_vec();
            row[v] = 1.0 - row[v];
            (v, row)
        })
        .collect();
    let report = inc
        .apply(&GraphDelta {
            inserted: vec![(150, 152), (152, 150)],
            deleted: vec![(250, 251), (251, 250)],
            features,
        })
        .unwrap();
    let calls = e.service().stats().batches - calls_before;
    let full = e.embed(inc.graph()).unwrap().h;
    let d = max_abs(inc.embeddings(), &full);
    eprintln!(
        "path of {n}: recomputed {} nodes ({} through the GNN) in {calls} calls, max abs {d:.2e}",
        report.affected, report.computed
    );
    assert!(d <= 1e-5, "{d}");
    assert!(!report.whole && calls > 3, "{report:?}, {calls} calls");
    // Features of 10, 100, 200 reach 2 hops each way (5 nodes each); the new edge's ends 150
    // and 152 reach 148..=154 (7); the deleted edge's ends 250 and 251 reach 248..=253 (6).
    assert_eq!(report.affected, 5 * 3 + 7 + 6);
}

// ---------------------------------------------------------------------------------------------
// Pipelines.

#[test]
fn embed_cora_pipeline_validates_and_runs() {
    let Some(graphs) = graphs_dir() else { return };
    let out = scratch("embed-cora");
    // The shipped file, pointed at wherever the data is (and at this checkout's models).
    let yaml = std::fs::read_to_string(root().join("pipelines/embed-cora.yaml")).unwrap();
    assert!(yaml.contains("../../shared/data/graphs/cora.planetoid.npz"));
    let yaml = yaml
        .replace("../../shared/data/graphs", graphs.to_str().unwrap())
        .replace(
            "../models/",
            &format!("{}/", root().join("models").display()),
        );
    let p = write_pipeline(&out, "embed-cora.yaml", &yaml);
    let o = latentflow(&["validate", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = latentflow(&["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let scores: Json =
        serde_json::from_str(&std::fs::read_to_string(out.join("scores.json")).unwrap()).unwrap();
    let acc = scores["fields"]["accuracy"]["mean"].as_f64().unwrap();
    eprintln!("embed-cora: linear probe test accuracy {acc:.3}");
    // The package README's probe (scikit-learn-style, L2 chosen on validation) reaches 0.813.
    assert!(acc >= 0.78, "{acc}");
    let h: ndarray::Array3<f32> = read_npy(out.join("embeddings/h.npy")).unwrap();
    assert_eq!(h.shape(), &[1, 2708, 128]);
}

#[test]
fn incremental_mode_in_a_pipeline_matches_python() {
    let Some(dir) = graphs_dir() else { return };
    // Python writes Cora before and after a change (8 undirected edges deleted, 4 inserted, 5
    // nodes' features changed), the embeddings before (h_prev) and after (h_full) from ONNX
    // Runtime's Python API, and the change lists. The pipeline re-embeds incrementally, on two
    // workers (the differential computation runs inside a timely worker).
    let out = scratch("embed-incremental");
    let py = r#"
import sys, os, numpy as np, onnxruntime as ort
path, onnx, out = sys.argv[1], sys.argv[2], sys.argv[3]
d = np.load(path)
n, f = (int(v) for v in d["attr_shape"])
x = np.zeros((n, f), dtype=np.float32)
x[np.repeat(np.arange(n), np.diff(d["attr_indptr"])), d["attr_indices"]] = d["attr_data"]
ei = np.stack([np.repeat(np.arange(n), np.diff(d["adj_indptr"])), d["adj_indices"]]).astype(np.int64)
s = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
h_prev = s.run(None, {"x": x, "edge_index": ei})[0]
rng = np.random.default_rng(5)
und = ei[:, ei[0] < ei[1]]
gone = und[:, rng.choice(und.shape[1], 8, replace=False)]
edges = set(map(tuple, ei.T.tolist()))
for a, b in gone.T.tolist():
    edges.discard((a, b)); edges.discard((b, a))
new = []
while len(new) < 4:
    a, b = (int(v) for v in rng.choice(n, 2, replace=False))
    if (a, b) not in edges:
        edges.add((a, b)); edges.add((b, a)); new.append((a, b))
ei2 = np.array(sorted(edges), dtype=np.int64).T.copy()
cn = rng.choice(n, 5, replace=False).astype(np.int64)
x2 = x.copy()
x2[cn, :10] = 1.0 - x2[cn, :10]
ce = np.concatenate([gone, np.array(new, dtype=np.int64).T], axis=1)
h_full = s.run(None, {"x": x2, "edge_index": ei2})[0]
for name, a in [("x", x2), ("edge_index", ei2), ("h_prev", h_prev), ("ce", ce), ("cn", cn), ("h_full", h_full)]:
    np.save(os.path.join(out, name + ".npy"), np.ascontiguousarray(a))
"#;
    let o = Command::new(python())
        .arg("-c")
        .arg(py)
        .arg(dir.join("cora.planetoid.npz"))
        .arg(model("gnn-cora-edgepred").join("model.onnx"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let yaml = format!(
        r#"
name: embed-incremental
sources:
  - name: cora
    kind: npy
    params:
      whole: true
      arrays: {{x: x.npy, edge_index: edge_index.npy, h_prev: h_prev.npy, ce: ce.npy, cn: cn.npy}}
stages:
  - name: embed
    kind: gnn-embed
    params: {{model: {}, mode: incremental, layers: 2, changed_edges: ce, changed_nodes: cn,
              device: cpu}}
sinks:
  - {{name: h, kind: npy, params: {{fields: [h, h_affected, h_computed], dir: result}}}}
"#,
        model("gnn-cora-edgepred").display()
    );
    let p = write_pipeline(&out, "incremental.yaml", &yaml);
    let o = latentflow(&[
        "run",
        p.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--workers",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got: ndarray::Array3<f32> = read_npy(out.join("result/h.npy")).unwrap();
    let got = got.index_axis(Axis(0), 0).to_owned();
    let want: Array2<f32> = read_npy(out.join("h_full.npy")).unwrap();
    let prev: Array2<f32> = read_npy(out.join("h_prev.npy")).unwrap();
    let affected: Array1<i64> = read_npy(out.join("result/h_affected.npy")).unwrap();
    let computed: Array1<i64> = read_npy(out.join("result/h_computed.npy")).unwrap();
    let d = max_abs(&got, &want);
    let changed_rows = (0..want.nrows())
        .filter(|&v| row_diff(&prev, v, &want, v) > 0.0)
        .count();
    eprintln!(
        "pipeline, incremental: {} rows recomputed ({} nodes through the GNN), {changed_rows} \
         rows changed, max abs vs Python full {d:.2e}",
        affected[0], computed[0]
    );
    assert!(d <= 1e-5, "{d}");
    assert!(affected[0] as usize >= changed_rows && (affected[0] as usize) < want.nrows());
}

#[test]
fn mutag_records_run_as_unions_and_match_python() {
    let Some(dir) = graphs_dir() else { return };
    // graph-load gives one record per molecule; gnn-embed packs each batch of records into one
    // union with a batch vector; the graph embeddings come back one per record.
    let out = scratch("embed-mutag");
    let yaml = format!(
        r#"
name: embed-mutag
settings: {{epoch_size: 64, max_in_flight: 2}}
sources:
  - {{name: mutag, kind: graph-load, params: {{path: {}}}}}
stages:
  - {{name: embed, kind: gnn-embed, params: {{model: {}, device: cpu, max_nodes: 600}}}}
sinks:
  - {{name: g, kind: npy, params: {{fields: [g]}}}}
"#,
        dir.join("MUTAG").display(),
        model("gin-mutag").display()
    );
    let p = write_pipeline(&out, "embed-mutag.yaml", &yaml);
    let o = latentflow(&[
        "run",
        p.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--workers",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got: Array2<f32> = read_npy(out.join("g.npy")).unwrap();
    assert_eq!(got.shape(), &[188, 96]);

    // ONNX Runtime's Python API on all 188 molecules as one union (gnn_common.load_mutag).
    let py = r#"
import sys, os, numpy as np, onnxruntime as ort
root, onnx, out = sys.argv[1], sys.argv[2], sys.argv[3]
a = np.loadtxt(os.path.join(root, "MUTAG_A.txt"), delimiter=",", dtype=np.int64) - 1
gi = np.loadtxt(os.path.join(root, "MUTAG_graph_indicator.txt"), dtype=np.int64) - 1
nl = np.loadtxt(os.path.join(root, "MUTAG_node_labels.txt"), dtype=np.int64)
x = np.eye(7, dtype=np.float32)[nl]
s = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
h, g = s.run(None, {"x": x, "edge_index": np.ascontiguousarray(a.T), "batch": gi})
np.save(out, g)
"#;
    let want_path = out.join("want_g.npy");
    let o = Command::new(python())
        .arg("-c")
        .arg(py)
        .arg(dir.join("MUTAG"))
        .arg(model("gin-mutag").join("model.onnx"))
        .arg(&want_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let want: Array2<f32> = read_npy(&want_path).unwrap();
    let mut worst = 0f32;
    for (a, b) in got.rows().into_iter().zip(want.rows()) {
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        worst = worst.max(d / scale);
    }
    eprintln!("mutag: 188 graph embeddings vs one Python union, max rel {worst:.2e}");
    assert!(worst <= 1e-5, "{worst}");
}
