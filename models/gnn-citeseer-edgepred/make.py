#!/usr/bin/env python3
"""Pre-train the gnn-citeseer-edgepred node encoder (GCN, masked edge prediction) and package it.

Run from anywhere:
  bash scripts/setup-export.sh && .venv-export/bin/python models/gnn-citeseer-edgepred/make.py

Reads ../shared/data/graphs/citeseer.planetoid.npz (or $LATENTFLOW_DATA/citeseer.planetoid.npz).
Labels are read only after training, for the linear probe. Writes, beside this file:
  model.onnx, manifest.json, reference/inputs/{x,edge_index}.npy, reference/outputs/h.npy
and prints a JSON summary (training, probes, ONNX Runtime vs PyTorch) on stdout.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import gnn_common  # noqa: E402

SEED = 20240704
CFG = {
    "svd": 100,                 # raw features -> 100 by a fixed truncated SVD (in the graph)
    "dims": [256, 128],         # GCN widths: 100 -> 256 (ReLU) -> 128
    "act": "relu",
    "last_act": False,          # h is the linear output of the second layer
    "epochs": 100,              # CiteSeer's probe validation accuracy falls with longer
    "lr": 0.01,                 # training (the encoder specialises in links), so fewer
    "weight_decay": 5e-4,       # epochs and some weight decay than gnn-cora-edgepred
    "holdout": 0.05,            # share of edges never trained on (link-prediction AUC)
    "mask_ratio": 0.3,          # share of training edges hidden and predicted each epoch
    "neg_ratio": 1,             # sampled node pairs per hidden edge
    "log_every": 25,
    "ref_hops": 2,
    "ref_nodes": (40, 80),
}

if __name__ == "__main__":
    gnn_common.make_node_package(
        HERE, dataset="citeseer", objective="edgepred", cfg=CFG, seed=SEED,
        description=("GCN node encoder for the CiteSeer citation graph, pre-trained without "
                     "labels by masked edge prediction: raw bag-of-words features and edges -> "
                     "a 128-d embedding per node."))
