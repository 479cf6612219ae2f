#!/usr/bin/env python3
"""Linear probe of a committed graph-encoder package, through its ONNX file (no training).

  .venv-export/bin/python models/probe.py models/gnn-cora-edgepred [more packages...]

Node encoders (gnn-<dataset>-<objective>): runs model.onnx with ONNX Runtime (CPU, 1 thread)
on the whole Planetoid graph and scores the embeddings h with gnn_common.node_probe (logistic
regression fitted on the standard 20-per-class training nodes, L2 strength and
standardisation chosen on the 500 validation nodes, accuracy on the 1000 test nodes), beside
the same probe on the raw features.

gin-mutag: runs model.onnx on the whole MUTAG union and scores the graph embeddings g with
gnn_common.graph_probe_cv (10-fold stratified CV, nested L2 choice), beside summed one-hot
atom counts.

Edge-prediction packages: also the link-prediction ROC-AUC on the held-out edges, with the
held-out split redrawn exactly as the package's make.py drew it (its SEED and CFG; torch's
seeded CPU generator), the encoder seeing only the training edges.

Checks the sha256 in manifest.json first; prints one JSON object per package on stdout.
"""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gnn_common as gc  # noqa: E402


def probe(pkg):
    pkg = Path(pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    onnx_path = pkg / manifest["file"]
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if sha != manifest["sha256"]:
        sys.exit(f"{pkg}: sha256 of {onnx_path.name} does not match manifest.json")
    sess = gc.ort_session(onnx_path)
    name = manifest["name"]
    if name.startswith("gin-mutag"):
        g = gc.load_mutag()
        feeds = {"x": g["x"], "edge_index": g["edge_index"], "batch": g["batch"]}
        emb = sess.run(["g"], feeds)[0]
        raw = gc.np.zeros((g["num_graphs"], g["x"].shape[1]), dtype=gc.np.float64)
        gc.np.add.at(raw, g["batch"], g["x"])
        seed = manifest.get("extra", {}).get("probe_seed", 0)
        return {"package": name, "sha256": sha, "probe": "10-fold CV, graph embeddings g",
                "model": gc.graph_probe_cv(emb, g["y"], seed),
                "summed raw features": gc.graph_probe_cv(raw, g["y"], seed)}
    dataset = name.split("-")[1]
    data = gc.load_planetoid(dataset)
    h = sess.run(["h"], {"x": data["x"], "edge_index": data["edge_index"]})[0]
    out = {"package": name, "sha256": sha, "dataset": dataset,
           "probe": "standard split: fit on idx_train, choose on idx_val, score idx_test",
           "model": gc.node_probe(h, data), "raw features": gc.node_probe(data["x"], data)}
    if manifest.get("extra", {}).get("objective") == "edgepred":
        out["holdout_auc"] = holdout_auc(pkg, sess, data)
    return out


def holdout_auc(pkg, sess, data):
    """The held-out link-prediction AUC of gnn_common.train_edgepred, through ONNX Runtime."""
    spec = importlib.util.spec_from_file_location("package_make", pkg / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    gen = gc.torch.Generator().manual_seed(make.SEED)
    n = data["x"].shape[0]
    und = gc.undirected_edges(data["edge_index"])
    perm = gc.torch.randperm(und.shape[1], generator=gen)
    n_hold = int(make.CFG["holdout"] * und.shape[1])
    hold_pos, train_und = und[:, perm[:n_hold]], und[:, perm[n_hold:]]
    hold_neg = gc.sample_non_edges(n, n_hold, set(map(tuple, und.T.tolist())), gen)
    h = sess.run(["h"], {"x": data["x"],
                         "edge_index": gc.both_ways(train_und).numpy().copy()})[0]
    sp = (h[hold_pos[0]] * h[hold_pos[1]]).sum(-1)
    sn = (h[hold_neg[0]] * h[hold_neg[1]]).sum(-1)
    return {"auc": gc.auc(sp, sn), "held_out_edges": n_hold}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        print(json.dumps(probe(p)), flush=True)
