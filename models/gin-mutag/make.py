#!/usr/bin/env python3
"""Pre-train the gin-mutag graph encoder (GIN, GraphCL graph-level contrast) and package it.

Run from anywhere:
  bash scripts/setup-export.sh && .venv-export/bin/python models/gin-mutag/make.py

Reads ../shared/data/graphs/MUTAG/ (or $LATENTFLOW_DATA/MUTAG/), the TU-format MUTAG data: 188
molecules, atoms one-hot over C, N, O, F, I, Cl, Br. The graph labels (mutagenic or not) are
read only after training, for the linear probe. Writes, beside this file:
  model.onnx, manifest.json, reference/inputs/{x,edge_index,batch}.npy,
  reference/outputs/{h,g}.npy
and prints a JSON summary (training, probes, ONNX Runtime vs PyTorch) on stdout.

Pre-training (GraphCL, You et al. 2020, unsupervised TU set-up): every step takes a minibatch
of graphs and draws two augmented views of each; each view applies one augmentation picked at
random per view and minibatch: node dropping (each node with its edges removed with
probability `ratio`, at least one node kept per graph), edge dropping (each undirected edge
removed with probability `ratio`) or attribute masking (each node's one-hot row zeroed with
probability `ratio`). Both views go through the GIN and a projection head on the sum-pooled
graph embedding; NT-Xent (temperature `tau`) pulls the two views of a graph together against
the other graphs of the minibatch. Adam, BatchNorm in training mode; the ONNX graph uses the
running statistics.
"""

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import gnn_common as gc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SEED = 20240705
CFG = {
    "hidden": 32,               # GIN width per layer (GraphCL's TU setting)
    "layers": 3,                # node embedding = concat of the 3 layer outputs: 96
    "epochs": 60,
    "batch_graphs": 64,         # graphs per minibatch (188 graphs: 3 steps per epoch)
    "lr": 0.001,
    "ratio": 0.2,               # augmentation strength
    "tau": 0.5,                 # NT-Xent temperature
    "proj_hidden": 96,          # projection head 96 -> 96 (ELU) -> 96, dropped after training
    "log_every": 10,
    "probe_seed": 0,            # fold shuffling of the 10-fold CV probe
    "ref_graphs": [0, 1, 2, 3, 4],   # the union in reference/inputs
}


# ---------------------------------------------------------------------------------------------
# Augmentations on a disjoint union (x, undirected edges as a [2, U] i<j tensor, batch)


def to_torch(g):
    return {"x": torch.as_tensor(g["x"]), "und": gc.undirected_edges(g["edge_index"]),
            "batch": torch.as_tensor(g["batch"]), "num_graphs": g["num_graphs"]}


def drop_nodes(g, ratio, gen):
    n = g["x"].shape[0]
    keep = torch.rand(n, generator=gen) >= ratio
    # keep at least one node per graph: the first node of any graph that lost all of them
    kept_per_graph = torch.zeros(g["num_graphs"], dtype=torch.long).index_add_(
        0, g["batch"], keep.long())
    first = torch.searchsorted(g["batch"], torch.arange(g["num_graphs"]))  # batch is sorted
    empty = kept_per_graph == 0
    keep[first[empty]] = True
    new_id = torch.cumsum(keep.long(), 0) - 1
    und = g["und"]
    ke = keep[und[0]] & keep[und[1]]
    return {"x": g["x"][keep], "und": new_id[und[:, ke]], "batch": g["batch"][keep],
            "num_graphs": g["num_graphs"]}


def drop_edges(g, ratio, gen):
    keep = torch.rand(g["und"].shape[1], generator=gen) >= ratio
    return dict(g, und=g["und"][:, keep])


def mask_attributes(g, ratio, gen):
    keep = (torch.rand(g["x"].shape[0], generator=gen) >= ratio).float()
    return dict(g, x=g["x"] * keep[:, None])


AUGMENTATIONS = [drop_nodes, drop_edges, mask_attributes]


def augment(g, ratio, gen):
    k = int(torch.randint(0, len(AUGMENTATIONS), (1,), generator=gen))
    return AUGMENTATIONS[k](g, ratio, gen)


def encode(enc, v):
    _, graph = enc(v["x"], gc.both_ways(v["und"]), v["batch"], v["num_graphs"])
    return graph


def train_graphcl_graphs(enc, data, cfg, seed, on_log=None):
    gen = torch.Generator().manual_seed(seed)
    d = cfg["hidden"] * cfg["layers"]
    head = gc.ProjectionHead(d, cfg["proj_hidden"])
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=cfg["lr"])
    ng = data["num_graphs"]
    steps = 0
    for epoch in range(1, cfg["epochs"] + 1):
        enc.train()
        head.train()
        perm = torch.randperm(ng, generator=gen).numpy()
        losses = []
        for i in range(0, ng, cfg["batch_graphs"]):
            ids = np.sort(perm[i:i + cfg["batch_graphs"]])
            if len(ids) < 2:
                continue
            g = to_torch(gc.graph_slice(data, ids))
            v1, v2 = augment(g, cfg["ratio"], gen), augment(g, cfg["ratio"], gen)
            loss = gc.nt_xent(head(encode(enc, v1)), head(encode(enc, v2)), cfg["tau"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
        if epoch % cfg.get("log_every", 10) == 0:
            gc.log(f"  epoch {epoch:4d}  loss {np.mean(losses):.4f}")
            if on_log is not None:
                on_log(epoch)
    enc.eval()
    return {"final_loss": float(np.mean(losses)), "steps": steps}


# ---------------------------------------------------------------------------------------------


def main():
    name = HERE.name
    t_start = time.perf_counter()
    data = gc.load_mutag()
    n, f = data["x"].shape
    log = gc.log
    log(f"{name}: MUTAG {data['num_graphs']} graphs, {n} nodes, {f} atom types, "
        f"{data['edge_index'].shape[1]} directed edges")
    gc.seed_all(SEED)
    enc = gc.GINEncoder(f, CFG["hidden"], CFG["layers"])
    untrained = gc.GINEncoder(f, CFG["hidden"], CFG["layers"])
    untrained.load_state_dict(enc.state_dict())
    untrained.eval()
    log(f"{name}: training (graphcl)")
    with gc.Timer() as t_train:
        train_info = train_graphcl_graphs(enc, data, CFG, SEED)
    enc.eval()
    log(f"{name}: trained in {t_train.seconds:.1f}s: {train_info}")
    d = CFG["hidden"] * CFG["layers"]

    doc = (f"{name}: GIN graph encoder for MUTAG molecules, pre-trained without labels by "
           f"GraphCL. Inputs x f32[nodes, {f}] (one-hot atom type: "
           f"{', '.join(gc.MUTAG_ATOMS)}), edge_index i64[2, edges] (both directions of every "
           f"bond), batch i64[nodes] (graph id of each node, 0..graphs-1); outputs "
           f"h f32[nodes, {d}] (node embeddings) and g f32[graphs, {d}] (sum of each graph's "
           f"node embeddings), graphs = max(batch) + 1.")
    model = gc.gin_onnx(enc, name, doc)
    onnx_bytes, sha = gc.write_model(HERE, model)
    sess = gc.ort_session(HERE / "model.onnx")

    def torch_fn(feeds):
        return list(enc(torch.as_tensor(feeds["x"]), torch.as_tensor(feeds["edge_index"]),
                        torch.as_tensor(feeds["batch"])))

    def feeds_of(ids):
        s = gc.graph_slice(data, ids)
        return {"x": s["x"], "edge_index": s["edge_index"], "batch": s["batch"]}

    ref_ids = CFG["ref_graphs"]
    one = feeds_of([7])
    # A union whose edges are listed in a shuffled order (message passing must not care).
    shuffled = feeds_of([11, 50, 120, 187])
    order = np.random.default_rng(SEED).permutation(shuffled["edge_index"].shape[1])
    shuffled["edge_index"] = np.ascontiguousarray(shuffled["edge_index"][:, order])
    cases = [
        ("whole MUTAG union (188 graphs)", {"x": data["x"], "edge_index": data["edge_index"],
                                            "batch": data["batch"]}),
        ("union of graphs 0..4 (reference)", feeds_of(ref_ids)),
        ("union of 9 graphs 3,14,15,92,65,35,89,79,32",
         feeds_of(sorted([3, 14, 15, 92, 65, 35, 89, 79, 32]))),
        ("union of 4 graphs, edges shuffled", shuffled),
        ("one graph (7)", one),
        ("one graph (7), no edges", dict(one, edge_index=np.zeros((2, 0), dtype=np.int64))),
    ]
    checks = gc._ort_vs_torch(sess, torch_fn, cases)

    # Graph embeddings of a union equal those of the graphs run one by one.
    ref_feeds = cases[1][1]
    ref_h, ref_g = sess.run(["h", "g"], ref_feeds)
    single = np.concatenate([sess.run(["g"], feeds_of([i]))[0] for i in ref_ids])
    union_vs_single = gc.max_abs_diff(ref_g, single)
    log(f"  union vs one graph per call: g max abs diff {union_vs_single:.2e}")
    assert union_vs_single <= gc.ATOL * max(1.0, float(np.abs(single).max()))

    for k, v in ref_feeds.items():
        gc.save_npy(HERE / "reference" / "inputs" / f"{k}.npy", np.ascontiguousarray(v))
    gc.save_npy(HERE / "reference" / "outputs" / "h.npy", ref_h)
    gc.save_npy(HERE / "reference" / "outputs" / "g.npy", ref_g)

    # Linear probes (labels are read only here, after training).
    log(f"{name}: 10-fold CV linear probes")
    whole = cases[0][1]
    g_full = sess.run(["g"], whole)[0]
    with torch.no_grad():
        g_untrained = untrained(torch.as_tensor(data["x"]), torch.as_tensor(data["edge_index"]),
                                torch.as_tensor(data["batch"]))[1].numpy()
    raw = np.zeros((data["num_graphs"], f))
    np.add.at(raw, data["batch"], data["x"])
    ps = CFG["probe_seed"]
    probes = {
        "summed raw features (atom counts)": gc.graph_probe_cv(raw, data["y"], ps),
        "same encoder, untrained (initial weights)": gc.graph_probe_cv(g_untrained, data["y"], ps),
        "pre-trained encoder (g)": gc.graph_probe_cv(g_full, data["y"], ps),
    }
    for k, v in probes.items():
        log(f"  probe  {k:<44} {v['mean']:.3f} +- {v['std']:.3f}")

    params = sum(p.numel() for p in enc.parameters())
    pm = probes["pre-trained encoder (g)"]
    pr = probes["summed raw features (atom counts)"]
    manifest = {
        "name": name,
        "description": ("GIN graph encoder for MUTAG molecules, pre-trained without labels by "
                        "GraphCL (graph-level contrast of augmented views): one-hot atoms and "
                        f"bonds of a disjoint union of molecules -> a {d}-d embedding per atom "
                        f"and per molecule."),
        "file": "model.onnx",
        "sha256": sha,
        "origin": (
            f"Trained from scratch without labels in PyTorch by models/{name}/make.py "
            f"(GraphCL: node dropping / edge dropping / attribute masking at "
            f"{CFG['ratio']}, NT-Xent tau {CFG['tau']}, {CFG['epochs']} epochs, seed {SEED}) "
            f"on the 188 graphs of MUTAG (TU format, ../shared/data/graphs/MUTAG); ONNX graph "
            f"written with the onnx helper API (opset {gc.OPSET}, IR {gc.IR_VERSION}), message "
            f"passing and pooling as Gather + ScatterElements(add), BatchNorm folded; ONNX "
            f"Runtime matches PyTorch to {max(r['max_abs'] for r in checks):.1e} (max abs; "
            f"{max(r['max_abs'] / r['max_abs_output'] for r in checks):.1e} relative to the "
            f"largest output) on unions of 1 to 188 graphs. 10-fold CV logistic-regression "
            f"accuracy on g: {pm['mean']:.3f} +- {pm['std']:.3f} (summed one-hot atoms: "
            f"{pr['mean']:.3f} +- "
            f"{pr['std']:.3f})."),
        "licence": ("Model: made in this project from scratch. Data: MUTAG (Debnath et al. 1991) "
                    "in the TU Dortmund graph kernel benchmark format (Morris et al. 2020), as "
                    "shipped in the grakel package (BSD-3-Clause); the data themselves carry no "
                    "licence of their own."),
        "inputs": [
            {"name": "x", "dtype": "f32", "shape": ["nodes", f], "range": [0.0, 1.0]},
            {"name": "edge_index", "dtype": "i64", "shape": [2, "edges"]},
            {"name": "batch", "dtype": "i64", "shape": ["nodes"]},
        ],
        "outputs": [
            {"name": "h", "dtype": "f32", "shape": ["nodes", d]},
            {"name": "g", "dtype": "f32", "shape": ["graphs", d]},
        ],
        "batch": False,
        "extra": {
            "embedding_size": d, "feature_size": f, "atom_types": gc.MUTAG_ATOMS,
            "encoder": (f"GIN (eps 0), {CFG['layers']} layers of width {CFG['hidden']}: "
                        "h' = BatchNorm(ReLU(MLP(h + sum of in-neighbours))); h = concat of "
                        "the layer outputs"),
            "pooling": "g[k] = sum of h over the nodes with batch == k (ScatterElements add)",
            "num_graphs": ("derived inside the graph as ReduceMax(batch) + 1: graph ids must be "
                           "0..graphs-1 (a missing id gives a zero row), and at least one node "
                           "is required"),
            "edges": "directed as given: list both directions of every bond; no self-loops "
                     "are added (GIN adds the node itself)",
            "objective": "graphcl", "probe_seed": ps,
        },
    }
    (HERE / "manifest.json").write_text(gc.manifest_json(manifest))
    summary = {
        "name": name, "seed": SEED, "cfg": CFG, "parameters_trained": int(params),
        "onnx_bytes": len(onnx_bytes), "sha256": sha,
        "train_seconds": round(t_train.seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "train": train_info, "probes": probes, "checks": checks,
        "union_vs_single_max_abs": union_vs_single,
        "versions": gc.versions(),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
