#!/usr/bin/env python3
"""Pre-train the gnn-cora-graphcl node encoder (GCN, GraphCL/GRACE-style node contrast) and
package it.

Run from anywhere:
  bash scripts/setup-export.sh && .venv-export/bin/python models/gnn-cora-graphcl/make.py

Reads ../shared/data/graphs/cora.planetoid.npz (or $LATENTFLOW_DATA/cora.planetoid.npz).
Labels are read only after training, for the linear probe. Writes, beside this file:
  model.onnx, manifest.json, reference/inputs/{x,edge_index}.npy, reference/outputs/h.npy
and prints a JSON summary (training, probes, ONNX Runtime vs PyTorch) on stdout.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import gnn_common  # noqa: E402

SEED = 20240703
CFG = {
    "svd": 100,                 # raw features -> 100 by a fixed truncated SVD (in the graph)
    "dims": [256, 128],         # GCN widths: 100 -> 256 (ReLU) -> 128 (ReLU)
    "act": "relu",
    "last_act": True,           # h is the ReLU output of the second layer (as in GRACE)
    "epochs": 200,              # GRACE's Cora settings
    "lr": 0.0005,
    "weight_decay": 1e-5,
    "feat_mask": (0.3, 0.4),    # share of bag-of-words columns masked in view 1, view 2
    "edge_drop": (0.2, 0.4),    # share of undirected edges dropped in view 1, view 2
    "tau": 0.4,                 # NT-Xent temperature
    "proj_hidden": 128,         # projection head 128 -> 128 (ELU) -> 128, dropped after training
    "log_every": 25,
    "ref_hops": 2,
    "ref_nodes": (40, 80),
}

if __name__ == "__main__":
    gnn_common.make_node_package(
        HERE, dataset="cora", objective="graphcl", cfg=CFG, seed=SEED,
        description=("GCN node encoder for the Cora citation graph, pre-trained without labels "
                     "by GraphCL-style node contrast (two views by feature masking and edge "
                     "dropping, NT-Xent): raw bag-of-words features and edges -> a 128-d "
                     "embedding per node."))
