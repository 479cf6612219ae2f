"""Shared helpers for the graph-encoder model packages (models/gnn-*/, models/gin-mutag/).

Each package's make.py imports this module, trains an encoder without labels in plain
PyTorch, writes the ONNX graph by hand with the onnx helper API (so that message passing is
exactly Gather + ScatterElements(reduction="add") with dynamic node and edge counts), checks ONNX
Runtime against the PyTorch forward pass on graphs of several sizes, scores the embeddings
with a linear probe, and writes the package files.

Data: the Planetoid npz files and the MUTAG TU files under $LATENTFLOW_DATA (default
../shared/data/graphs beside the repository root). Nothing is downloaded.

Determinism: BLAS and torch run on one thread and every random draw comes from a seeded
generator, so a rerun on the same machine writes byte-identical files.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.linalg.blas  # noqa: E402
import scipy.sparse  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

MODELS = Path(__file__).resolve().parent
ROOT = MODELS.parent
DATA = Path(os.environ.get("LATENTFLOW_DATA", ROOT.parent / "shared" / "data" / "graphs"))

OPSET = 17
IR_VERSION = 9  # onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.31 refuses
ATOL = 1e-4  # ONNX Runtime vs PyTorch, float32, absolute (relative to unit-scale outputs)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def load_planetoid(name):
    """Dense raw features, symmetric edge_index (both directions), labels and the standard split.

    Self-loops present in the file (CiteSeer has 124) are kept in `edge_index`; the encoders
    drop them and add exactly one self-loop per node themselves.
    """
    path = DATA / f"{name}.planetoid.npz"
    if not path.is_file():
        sys.exit(f"missing {path}: set LATENTFLOW_DATA to the folder holding the graph data")
    d = np.load(path, allow_pickle=False)
    n, f = (int(v) for v in d["attr_shape"])
    x = np.zeros((n, f), dtype=np.float32)
    rows = np.repeat(np.arange(n), np.diff(d["attr_indptr"]))
    x[rows, d["attr_indices"]] = d["attr_data"]
    arows = np.repeat(np.arange(n), np.diff(d["adj_indptr"]))
    edge_index = np.stack([arows, d["adj_indices"]]).astype(np.int64)
    return {
        "name": name,
        "x": x,
        "edge_index": edge_index,
        "labels": d["labels"].astype(np.int64),
        "idx_train": d["idx_train"].astype(np.int64),
        "idx_val": d["idx_val"].astype(np.int64),
        "idx_test": d["idx_test"].astype(np.int64),
    }


MUTAG_ATOMS = ["C", "N", "O", "F", "I", "Cl", "Br"]


def load_mutag():
    """MUTAG as one disjoint union: one-hot atom features, 0-based edges, batch vector, labels.

    Graph labels in the TU file are -1/1; they become 0/1 (1 = mutagenic).
    """
    root = DATA / "MUTAG"
    if not root.is_dir():
        sys.exit(f"missing {root}: set LATENTFLOW_DATA to the folder holding the graph data")
    a = np.loadtxt(root / "MUTAG_A.txt", delimiter=",", dtype=np.int64) - 1
    gi = np.loadtxt(root / "MUTAG_graph_indicator.txt", dtype=np.int64) - 1
    nl = np.loadtxt(root / "MUTAG_node_labels.txt", dtype=np.int64)
    gl = np.loadtxt(root / "MUTAG_graph_labels.txt", dtype=np.int64)
    assert np.all(np.diff(gi) >= 0), "graph_indicator must be sorted"
    x = np.eye(len(MUTAG_ATOMS), dtype=np.float32)[nl]
    edge_index = np.ascontiguousarray(a.T)
    assert np.all(gi[edge_index[0]] == gi[edge_index[1]])
    y = (gl > 0).astype(np.int64)
    return {"x": x, "edge_index": edge_index, "batch": gi, "y": y, "num_graphs": len(gl)}


def graph_slice(g, graph_ids):
    """The sub-union of the given (sorted, 0-based) graphs of a load_mutag() dict, relabelled."""
    graph_ids = np.asarray(graph_ids, dtype=np.int64)
    keep = np.isin(g["batch"], graph_ids)
    new_id = -np.ones(len(keep), dtype=np.int64)
    new_id[keep] = np.arange(keep.sum())
    ek = keep[g["edge_index"][0]]
    ei = new_id[g["edge_index"][:, ek]]
    remap = -np.ones(g["num_graphs"], dtype=np.int64)
    remap[graph_ids] = np.arange(len(graph_ids))
    return {
        "x": g["x"][keep],
        "edge_index": np.ascontiguousarray(ei),
        "batch": remap[g["batch"][keep]],
        "y": g["y"][graph_ids],
        "num_graphs": len(graph_ids),
    }


def k_hop_subgraph(edge_index, n, center, hops):
    """Nodes within `hops` of `center` (sorted) and the induced edge_index, relabelled."""
    adj = [[] for _ in range(n)]
    for s, t in edge_index.T:
        adj[s].append(t)
    seen = {int(center)}
    frontier = [int(center)]
    for _ in range(hops):
        nxt = []
        for u in frontier:
            for v in adj[u]:
                if v not in seen:
                    seen.add(int(v))
                    nxt.append(int(v))
        frontier = nxt
    nodes = np.array(sorted(seen), dtype=np.int64)
    new_id = -np.ones(n, dtype=np.int64)
    new_id[nodes] = np.arange(len(nodes))
    m = (new_id[edge_index[0]] >= 0) & (new_id[edge_index[1]] >= 0)
    return nodes, np.ascontiguousarray(new_id[edge_index[:, m]])


def pick_subgraph(data, hops, lo, hi):
    """The 2-hop (or k-hop) subgraph of the first test node whose size lies in [lo, hi]."""
    n = data["x"].shape[0]
    for c in data["idx_test"]:
        nodes, ei = k_hop_subgraph(data["edge_index"], n, c, hops)
        if lo <= len(nodes) <= hi:
            return int(c), nodes, ei
    raise RuntimeError(f"no {hops}-hop subgraph with {lo}..{hi} nodes")


def svd_projection(x, k):
    """Fixed truncated-SVD projection P [F, k] (no centring: x @ P = U_k S_k), scaled so that
    x @ P has unit mean row norm. Computed from the top-k eigenvectors of the smaller Gram
    matrix (float64, LAPACK evr, deterministic); signs fixed so that each column's
    largest-magnitude entry is positive. Returns P and the top k singular values."""
    xs = scipy.sparse.csr_matrix(x.astype(np.float64))
    n, f = xs.shape
    gram = (xs.T @ xs if f <= n else xs @ xs.T).toarray()
    m = gram.shape[0]
    evals, vecs = scipy.linalg.eigh(gram, subset_by_index=[m - k, m - 1], driver="evr")
    evals, vecs = evals[::-1], vecs[:, ::-1]
    s = np.sqrt(np.maximum(evals, 0.0))
    v = vecs if f <= n else np.asarray(xs.T @ vecs) / s
    sign = np.sign(v[np.abs(v).argmax(axis=0), np.arange(k)])
    v = v * sign
    scale = np.linalg.norm(np.asarray(xs @ v), axis=1).mean()
    return np.ascontiguousarray(v / scale, dtype=np.float32), s


# ---------------------------------------------------------------------------------------------
# Matrix products through OpenBLAS
#
# Debian's PyTorch (and numpy) call the reference BLAS, which multiplies float32 matrices about
# ten times slower than OpenBLAS. scipy's wheel bundles OpenBLAS, so the large products of
# training go through scipy.linalg.blas.sgemm (one thread, OPENBLAS_NUM_THREADS=1 above).


def _sgemm(a, b):
    """a [N, K] @ b [K, M] for float32 numpy arrays; C-contiguous result."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.shape[0] == 0 or b.shape[1] == 0 or a.shape[1] == 0:
        return np.zeros((a.shape[0], b.shape[1]), dtype=np.float32)
    # (a @ b)^T = b^T a^T: both transposes are Fortran-ordered views, so sgemm copies nothing
    # and its Fortran-ordered result, transposed back, is C-contiguous.
    return scipy.linalg.blas.sgemm(1.0, b.T, a.T).T


class _MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.from_numpy(_sgemm(a.detach().numpy(), b.detach().numpy()))

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = g.detach().numpy()
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = torch.from_numpy(_sgemm(g, b.detach().numpy().T))
        if ctx.needs_input_grad[1]:
            gb = torch.from_numpy(_sgemm(a.detach().numpy().T, g))
        return ga, gb


def mm(a, b):
    """a @ b for float32 2-D tensors, differentiable, through OpenBLAS."""
    return _MatMul.apply(a, b)


def linear(h, lin):
    return mm(h, lin.weight.T) + lin.bias


# ---------------------------------------------------------------------------------------------
# PyTorch encoders (the ONNX graphs below compute exactly these forward passes)


def gcn_edges(edge_index, n):
    """Drop self-loops, add one per node, and the symmetric GCN weight of every edge."""
    src, dst = edge_index[0], edge_index[1]
    keep = src != dst
    loop = torch.arange(n, dtype=torch.long)
    src = torch.cat([src[keep], loop])
    dst = torch.cat([dst[keep], loop])
    deg = torch.zeros(n).index_add_(0, dst, torch.ones(dst.shape[0]))
    dinv = deg.rsqrt()
    return src, dst, dinv[src] * dinv[dst]


class GCNEncoder(torch.nn.Module):
    """x [N, F] -> (fixed projection P) -> GCN layers -> h [N, D].

    Layer: H' = act(D^-1/2 (A + I) D^-1/2 H W + b); `last_act` applies act to the output too.
    `dropout` (training only) drops entries of each layer's input.
    """

    def __init__(self, proj, dims, act="relu", last_act=False, dropout=0.0):
        super().__init__()
        self.register_buffer("proj", torch.as_tensor(proj))
        self.lins = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])
        )
        for lin in self.lins:
            torch.nn.init.xavier_uniform_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
        self.act_name = act
        self.prelus = torch.nn.ModuleList(
            torch.nn.PReLU(b, init=0.25) for b in dims[1:]
        ) if act == "prelu" else None
        self.last_act = last_act
        self.dropout = dropout

    def act(self, i, h):
        if self.act_name == "relu":
            return F.relu(h)
        return self.prelus[i](h)

    def forward_reduced(self, z, edge_index, edges=None):
        n = z.shape[0]
        src, dst, w = edges if edges is not None else gcn_edges(edge_index, n)
        h = z
        for i, lin in enumerate(self.lins):
            if self.training and self.dropout > 0:
                h = F.dropout(h, self.dropout, True)
            hw = mm(h, lin.weight.T)
            h = torch.zeros(n, hw.shape[1]).index_add_(0, dst, hw[src] * w[:, None]) + lin.bias
            if i < len(self.lins) - 1 or self.last_act:
                h = self.act(i, h)
        return h

    def forward(self, x, edge_index):
        return self.forward_reduced(mm(x, self.proj), edge_index)


class GINEncoder(torch.nn.Module):
    """GIN (eps = 0) as in GraphCL: per layer h' = BN(ReLU(MLP(h + sum of neighbours))),
    MLP = Linear-ReLU-Linear. Node embedding = concat of all layer outputs; graph embedding =
    sum of its node embeddings."""

    def __init__(self, in_dim, hidden, layers):
        super().__init__()
        self.mlps = torch.nn.ModuleList()
        self.bns = torch.nn.ModuleList()
        for i in range(layers):
            a = in_dim if i == 0 else hidden
            self.mlps.append(torch.nn.Sequential(
                torch.nn.Linear(a, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden)))
            self.bns.append(torch.nn.BatchNorm1d(hidden))

    def forward(self, x, edge_index, batch, num_graphs=None):
        n = x.shape[0]
        src, dst = edge_index[0], edge_index[1]
        h, outs = x, []
        for mlp, bn in zip(self.mlps, self.bns):
            agg = torch.zeros(n, h.shape[1]).index_add_(0, dst, h[src])
            h = bn(F.relu(mlp(h + agg)))
            outs.append(h)
        node = torch.cat(outs, dim=1)
        g = int(batch.max()) + 1 if num_graphs is None else num_graphs
        graph = torch.zeros(g, node.shape[1]).index_add_(0, batch, node)
        return node, graph


# ---------------------------------------------------------------------------------------------
# Self-supervised objectives (no labels are read)


def undirected_edges(edge_index):
    """Unique undirected edges (i < j) of a symmetric edge_index, self-loops dropped, sorted."""
    ei = edge_index[:, edge_index[0] < edge_index[1]]
    return torch.as_tensor(np.unique(ei.T, axis=0).T.copy(), dtype=torch.long)


def both_ways(und):
    return torch.cat([und, und.flip(0)], dim=1)


def auc(pos, neg):
    """ROC-AUC of scores (ties count half)."""
    s = np.concatenate([pos, neg])
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    # average ranks over ties
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.zeros(len(cnt))
    np.add.at(sums, inv, ranks)
    ranks = (sums / cnt)[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def sample_non_edges(n, count, forbidden, gen):
    """`count` node pairs (i < j) that are not in the set `forbidden` of (i, j) tuples."""
    out = set()
    while len(out) < count:
        a = torch.randint(0, n, (2, count), generator=gen).numpy()
        for i, j in zip(a[0].tolist(), a[1].tolist()):
            if i == j:
                continue
            e = (min(i, j), max(i, j))
            if e not in forbidden and e not in out:
                out.add(e)
                if len(out) == count:
                    break
    return torch.as_tensor(sorted(out), dtype=torch.long).T


def train_edgepred(enc, z, edge_index, cfg, seed):
    """Masked edge prediction (a graph auto-encoder trained on held-out edges).

    A fixed share `holdout` of the undirected edges (and as many non-edges) is set aside for
    a link-prediction AUC and never used. Every epoch a random share `mask_ratio` of the
    remaining edges is masked: the encoder sees the graph without them and a dot-product
    decoder sigmoid(h_u . h_v) must score them above uniformly sampled node pairs
    (`neg_ratio` negatives per positive; binary cross-entropy). Full batch, Adam.
    """
    gen = torch.Generator().manual_seed(seed)
    n = z.shape[0]
    und = undirected_edges(edge_index)
    perm = torch.randperm(und.shape[1], generator=gen)
    n_hold = int(cfg["holdout"] * und.shape[1])
    hold_pos, train_und = und[:, perm[:n_hold]], und[:, perm[n_hold:]]
    all_edges = set(map(tuple, und.T.tolist()))
    hold_neg = sample_non_edges(n, n_hold, all_edges, gen)
    opt = torch.optim.Adam(enc.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    m = int(cfg["mask_ratio"] * train_und.shape[1])
    for epoch in range(1, cfg["epochs"] + 1):
        enc.train()
        p = torch.randperm(train_und.shape[1], generator=gen)
        pos, vis = train_und[:, p[:m]], train_und[:, p[m:]]
        neg = torch.randint(0, n, (2, m * cfg["neg_ratio"]), generator=gen)
        h = enc.forward_reduced(z, both_ways(vis))
        lp = (h[pos[0]] * h[pos[1]]).sum(-1)
        ln = (h[neg[0]] * h[neg[1]]).sum(-1)
        loss = F.binary_cross_entropy_with_logits(lp, torch.ones_like(lp)) + \
            F.binary_cross_entropy_with_logits(ln, torch.zeros_like(ln))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if epoch % cfg.get("log_every", 100) == 0:
            log(f"  epoch {epoch:4d}  loss {loss.item():.4f}")
    enc.eval()
    with torch.no_grad():
        h = enc.forward_reduced(z, both_ways(train_und))
        sp = (h[hold_pos[0]] * h[hold_pos[1]]).sum(-1).numpy()
        sn = (h[hold_neg[0]] * h[hold_neg[1]]).sum(-1).numpy()
    return {"final_loss": float(loss.item()), "holdout_auc": auc(sp, sn),
            "holdout_edges": int(n_hold)}


class ProjectionHead(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)

    def forward(self, h):
        return linear(F.elu(linear(h, self.fc1)), self.fc2)


def nt_xent(u, v, tau):
    """Symmetric NT-Xent (GRACE form): each row's positive is the same row of the other view;
    negatives are all other rows of both views."""
    u, v = F.normalize(u, dim=1), F.normalize(v, dim=1)

    def half(a, b):
        refl = torch.exp(mm(a, a.T) / tau)
        betw = torch.exp(mm(a, b.T) / tau)
        return -torch.log(betw.diag() / (refl.sum(1) + betw.sum(1) - refl.diag()))

    return 0.5 * (half(u, v) + half(v, u)).mean()


def train_graphcl(enc, x, edge_index, cfg, seed):
    """GraphCL/GRACE-style node contrast. Each epoch draws two views of the graph: words of
    the raw bag-of-words features masked (one random mask over feature columns per view,
    share `feat_mask`), undirected edges dropped (share `edge_drop`); both go through the
    encoder and a projection head, and NT-Xent (temperature `tau`) pulls each node's two
    views together against all other nodes. Full batch, Adam."""
    gen = torch.Generator().manual_seed(seed)
    n, f = x.shape
    und = undirected_edges(edge_index)
    head = ProjectionHead(enc.lins[-1].out_features, cfg["proj_hidden"])
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    xt = torch.as_tensor(x)
    proj = enc.proj

    def view(pf, pe):
        keep_f = (torch.rand(f, generator=gen) >= pf).float()
        zv = mm(xt, proj * keep_f[:, None])
        keep_e = torch.rand(und.shape[1], generator=gen) >= pe
        return zv, both_ways(und[:, keep_e])

    for epoch in range(1, cfg["epochs"] + 1):
        enc.train()
        head.train()
        z1, e1 = view(cfg["feat_mask"][0], cfg["edge_drop"][0])
        z2, e2 = view(cfg["feat_mask"][1], cfg["edge_drop"][1])
        loss = nt_xent(head(enc.forward_reduced(z1, e1)), head(enc.forward_reduced(z2, e2)),
                       cfg["tau"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if epoch % cfg.get("log_every", 100) == 0:
            log(f"  epoch {epoch:4d}  loss {loss.item():.4f}")
    enc.eval()
    return {"final_loss": float(loss.item())}


# ---------------------------------------------------------------------------------------------
# ONNX graphs


class _Builder:
    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type, inputs, out=None, **attrs):
        self._n += 1
        out = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}_op", **attrs))
        return out

    def model(self, name, inputs, outputs, doc):
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="latentflow models/gnn_common.py",
            doc_string=doc,
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def _f32(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def gcn_onnx(enc, name, doc):
    """Hand-written ONNX graph of GCNEncoder.forward: x [N, F] f32, edge_index [2, E] i64 ->
    h [N, D] f32, with N and E dynamic."""
    b = _Builder()
    f_in = enc.proj.shape[0]
    b.const("zero_i", np.array(0, dtype=np.int64))
    b.const("one_i", np.array(1, dtype=np.int64))
    b.const("axis0", np.array([0], dtype=np.int64))
    b.const("axis1", np.array([1], dtype=np.int64))
    b.const("svd.proj", _f32(enc.proj.numpy()))
    z = b.op("MatMul", ["x", "svd.proj"], "reduced")

    # Edges: drop self-loops from the input, add one per node, GCN normalisation.
    n = b.op("Gather", [b.op("Shape", ["x"], "x_shape"), "zero_i"], "num_nodes", axis=0)
    n_vec = b.op("Unsqueeze", [n, "axis0"], "num_nodes_vec")
    loop = b.op("Range", ["zero_i", n, "one_i"], "self_loops")
    src0 = b.op("Gather", ["edge_index", "zero_i"], "src_in", axis=0)
    dst0 = b.op("Gather", ["edge_index", "one_i"], "dst_in", axis=0)
    keep = b.op("Not", [b.op("Equal", [src0, dst0], "is_loop")], "not_loop")
    src = b.op("Concat", [b.op("Compress", [src0, keep], "src_nl", axis=0), loop], "src", axis=0)
    dst = b.op("Concat", [b.op("Compress", [dst0, keep], "dst_nl", axis=0), loop], "dst", axis=0)
    ones_e = b.op("ConstantOfShape", [b.op("Shape", [dst], "num_edges_vec")], "ones_e",
                  value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    zeros_n = b.op("ConstantOfShape", [n_vec], "zeros_n",
                   value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    deg = b.op("ScatterElements", [zeros_n, dst, ones_e], "degree", axis=0, reduction="add")
    dinv = b.op("Reciprocal", [b.op("Sqrt", [deg], "sqrt_degree")], "dinv")
    w = b.op("Mul", [b.op("Gather", [dinv, src], "dinv_src", axis=0),
                     b.op("Gather", [dinv, dst], "dinv_dst", axis=0)], "edge_weight")
    w_col = b.op("Unsqueeze", [w, "axis1"], "edge_weight_col")
    dst_col = b.op("Unsqueeze", [dst, "axis1"], "dst_col")

    h = z
    nl = len(enc.lins)
    for i, lin in enumerate(enc.lins):
        p = f"gcn{i + 1}"
        wt = b.const(f"{p}.weight", _f32(lin.weight.detach().numpy().T))
        bias = b.const(f"{p}.bias", _f32(lin.bias.detach().numpy()))
        width = b.const(f"{p}.width", np.array([lin.out_features], dtype=np.int64))
        hw = b.op("MatMul", [h, wt], f"{p}_xw")
        msg = b.op("Mul", [b.op("Gather", [hw, src], f"{p}_gather", axis=0), w_col], f"{p}_msg")
        zeros = b.op("ConstantOfShape", [b.op("Concat", [n_vec, width], f"{p}_shape", axis=0)],
                     f"{p}_zeros",
                     value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        idx = b.op("Expand", [dst_col, b.op("Shape", [msg], f"{p}_msg_shape")], f"{p}_index")
        agg = b.op("ScatterElements", [zeros, idx, msg], f"{p}_agg", axis=0, reduction="add")
        last = i == nl - 1
        out = "h" if last and not enc.last_act else f"{p}_pre"
        h = b.op("Add", [agg, bias], out)
        if not last or enc.last_act:
            out = "h" if last else f"{p}_act"
            if enc.act_name == "relu":
                h = b.op("Relu", [h], out)
            else:
                slope = b.const(f"{p}.prelu", _f32(enc.prelus[i].weight.detach().numpy()))
                h = b.op("PRelu", [h, slope], out)
    d = enc.lins[-1].out_features
    return b.model(
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["nodes", f_in]),
         helper.make_tensor_value_info("edge_index", TensorProto.INT64, [2, "edges"])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["nodes", d])],
        doc,
    )


def gin_onnx(enc, name, doc):
    """Hand-written ONNX graph of GINEncoder.forward (eval mode, BatchNorm folded into a
    per-channel scale and shift): x [N, 7], edge_index [2, E], batch [N] ->
    h [N, D] node embeddings, g [G, D] graph embeddings with G = max(batch) + 1."""
    b = _Builder()
    in_dim = enc.mlps[0][0].in_features
    b.const("zero_i", np.array(0, dtype=np.int64))
    b.const("one_i", np.array(1, dtype=np.int64))
    b.const("one_vec", np.array([1], dtype=np.int64))
    b.const("axis1", np.array([1], dtype=np.int64))
    n = b.op("Gather", [b.op("Shape", ["x"], "x_shape"), "zero_i"], "num_nodes", axis=0)
    n_vec = b.op("Unsqueeze", [n, b.const("axis0", np.array([0], dtype=np.int64))],
                 "num_nodes_vec")
    src = b.op("Gather", ["edge_index", "zero_i"], "src", axis=0)
    dst = b.op("Gather", ["edge_index", "one_i"], "dst", axis=0)
    dst_col = b.op("Unsqueeze", [dst, "axis1"], "dst_col")
    h, outs = "x", []
    for i, (mlp, bn) in enumerate(zip(enc.mlps, enc.bns)):
        p = f"gin{i + 1}"
        width = mlp[0].in_features
        wc = b.const(f"{p}.in_width", np.array([width], dtype=np.int64))
        zeros = b.op("ConstantOfShape", [b.op("Concat", [n_vec, wc], f"{p}_shape", axis=0)],
                     f"{p}_zeros",
                     value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        msg = b.op("Gather", [h, src], f"{p}_gather", axis=0)
        idx = b.op("Expand", [dst_col, b.op("Shape", [msg], f"{p}_msg_shape")], f"{p}_index")
        agg = b.op("ScatterElements", [zeros, idx, msg], f"{p}_agg", axis=0, reduction="add")
        s = b.op("Add", [h, agg], f"{p}_sum")
        l1, l2 = mlp[0], mlp[2]
        t = b.op("Add", [b.op("MatMul", [s, b.const(f"{p}.mlp1.weight",
                                                      _f32(l1.weight.detach().numpy().T))]),
                         b.const(f"{p}.mlp1.bias", _f32(l1.bias.detach().numpy()))], f"{p}_mlp1")
        t = b.op("Relu", [t], f"{p}_mlp_relu")
        t = b.op("Add", [b.op("MatMul", [t, b.const(f"{p}.mlp2.weight",
                                                      _f32(l2.weight.detach().numpy().T))]),
                         b.const(f"{p}.mlp2.bias", _f32(l2.bias.detach().numpy()))], f"{p}_mlp2")
        t = b.op("Relu", [t], f"{p}_relu")
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        shift = (bn.bias - bn.running_mean * scale).detach()
        t = b.op("Mul", [t, b.const(f"{p}.bn.scale", _f32(scale.numpy()))], f"{p}_bn_scaled")
        h = b.op("Add", [t, b.const(f"{p}.bn.shift", _f32(shift.numpy()))], f"{p}_out")
        outs.append(h)
    node = b.op("Concat", outs, "h", axis=1)
    d = sum(m[2].out_features for m in enc.mlps)
    g = b.op("Add", [b.op("ReduceMax", ["batch"], "max_batch", keepdims=1), "one_vec"],
             "num_graphs_vec")
    zeros = b.op("ConstantOfShape",
                 [b.op("Concat", [g, b.const("emb_width", np.array([d], dtype=np.int64))],
                       "pool_shape", axis=0)],
                 "pool_zeros", value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    idx = b.op("Expand", [b.op("Unsqueeze", ["batch", "axis1"], "batch_col"),
                          b.op("Shape", [node], "node_shape")], "pool_index")
    b.op("ScatterElements", [zeros, idx, node], "g", axis=0, reduction="add")
    return b.model(
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["nodes", in_dim]),
         helper.make_tensor_value_info("edge_index", TensorProto.INT64, [2, "edges"]),
         helper.make_tensor_value_info("batch", TensorProto.INT64, ["nodes"])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["nodes", d]),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, ["graphs", d])],
        doc,
    )


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def max_abs_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---------------------------------------------------------------------------------------------
# Linear probes (multinomial logistic regression, float64, L-BFGS; deterministic)

PROBE_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def standardise(emb, ref=None):
    """Columns to zero mean, unit variance, with statistics from `ref` rows (default all)."""
    e = np.asarray(emb, dtype=np.float64)
    r = e if ref is None else e[ref]
    mu, sd = r.mean(axis=0), r.std(axis=0)
    return (e - mu) / np.where(sd > 1e-12, sd, 1.0)


def fit_logreg(x, y, l2, classes):
    """Mean cross-entropy + l2/2 * |W|^2 (bias unpenalised), minimised by L-BFGS."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach().numpy(), b.detach().numpy()
    return lambda z: (np.asarray(z, dtype=np.float64) @ w + b).argmax(axis=1)


def node_probe(emb, data):
    """Linear probe on frozen node embeddings: multinomial logistic regression fitted on
    idx_train (20 labels per class); the L2 strength (PROBE_L2) and whether to standardise
    the columns are chosen by accuracy on idx_val; accuracy on idx_test is reported (CiteSeer's
    label -1 test nodes are skipped)."""
    y = data["labels"]
    classes = int(y.max()) + 1
    tr, va = data["idx_train"], data["idx_val"]
    te = data["idx_test"][y[data["idx_test"]] >= 0]
    best = None
    for std in (True, False):
        e = standardise(emb) if std else np.asarray(emb, dtype=np.float64)
        for l2 in PROBE_L2:
            pred = fit_logreg(e[tr], y[tr], l2, classes)
            val = float((pred(e[va]) == y[va]).mean())
            if best is None or val > best["val"]:
                test = float((pred(e[te]) == y[te]).mean())
                best = {"val": val, "test": test, "l2": l2, "standardised": std}
    return best


def stratified_folds(y, k, seed):
    """k stratified folds (lists of test indices), shuffled with a seeded generator."""
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(k)]
    j = 0  # dealt round-robin across classes, so fold sizes differ by at most one
    for c in np.unique(y):
        for i in rng.permutation(np.flatnonzero(y == c)):
            folds[j % k].append(int(i))
            j += 1
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def graph_probe_cv(emb, y, seed, k=10, inner=5):
    """10-fold stratified CV accuracy of logistic regression on graph embeddings.

    Within each outer training fold the L2 strength is chosen by an inner 5-fold CV on that
    training fold only (nested, so the test fold never steers the choice); standardisation
    statistics also come from the training fold. Returns mean, std over folds, fold scores.
    """
    e = np.asarray(emb, dtype=np.float64)
    classes = int(y.max()) + 1
    n = len(y)
    accs = []
    for fold in stratified_folds(y, k, seed):
        tr = np.setdiff1d(np.arange(n), fold)
        inner_folds = stratified_folds(y[tr], inner, seed + 1)
        scores = []
        for l2 in PROBE_L2:
            s = []
            for f in inner_folds:
                itr = tr[np.setdiff1d(np.arange(len(tr)), f)]
                ite = tr[f]
                z = standardise(e, itr)
                s.append((fit_logreg(z[itr], y[itr], l2, classes)(z[ite]) == y[ite]).mean())
            scores.append(float(np.mean(s)))
        l2 = PROBE_L2[int(np.argmax(scores))]
        z = standardise(e, tr)
        accs.append(float((fit_logreg(z[tr], y[tr], l2, classes)(z[fold]) == y[fold]).mean()))
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "folds": accs}


# ---------------------------------------------------------------------------------------------
# Package files


def manifest_json(manifest):
    """JSON with one line per tensor entry (readable diffs), ending in a newline."""
    lines = []
    for key, value in manifest.items():
        if key in ("inputs", "outputs"):
            items = ",\n".join("    " + json.dumps(t) for t in value)
            lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    assert json.loads(text) == manifest
    return text


def save_npy(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr, allow_pickle=False)


def write_model(here, model):
    """Writes model.onnx deterministically; returns (bytes, sha256)."""
    data = model.SerializeToString(deterministic=True)
    (here / "model.onnx").write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------
# Package drivers (each package's make.py calls one of these with its own settings)


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def induced_subgraph(edge_index, n, nodes):
    """The subgraph induced by `nodes` (sorted), relabelled 0..len(nodes)-1."""
    nodes = np.asarray(nodes, dtype=np.int64)
    new_id = -np.ones(n, dtype=np.int64)
    new_id[nodes] = np.arange(len(nodes))
    m = (new_id[edge_index[0]] >= 0) & (new_id[edge_index[1]] >= 0)
    return np.ascontiguousarray(new_id[edge_index[:, m]])


def _ort_vs_torch(sess, torch_fn, cases):
    """Runs every case through ONNX Runtime and PyTorch; returns one row per case and output."""
    rows = []
    for label, feeds in cases:
        got = sess.run(None, feeds)
        with torch.no_grad():
            want = torch_fn(feeds)
        for out, g, w in zip(sess.get_outputs(), got, want):
            w = w.numpy()
            assert g.shape == w.shape, (label, out.name, g.shape, w.shape)
            d = max_abs_diff(g, w) if g.size else 0.0
            rows.append({"case": label, "output": out.name,
                         "nodes": int(feeds["x"].shape[0]),
                         "edges": int(feeds["edge_index"].shape[1]),
                         "shape": list(g.shape), "max_abs": d,
                         "max_abs_output": float(np.abs(w).max()) if w.size else 0.0})
            log(f"  onnx vs torch  {label:<34} {out.name}{list(g.shape)}  max abs diff {d:.2e}")
            assert d <= ATOL * max(1.0, rows[-1]["max_abs_output"]), rows[-1]
    return rows


def make_node_package(here, *, dataset, objective, cfg, seed, description):
    """Trains a GCN node encoder on a Planetoid graph without labels and writes the package.

    cfg: svd (reduced width), dims (GCN widths after the SVD), act, last_act, ref_hops,
    ref_nodes (lo, hi), and the objective's own settings (see train_edgepred, train_graphcl).
    Returns a summary dict (also printed as JSON on stdout).
    """
    here = Path(here)
    name = here.name
    t_start = time.perf_counter()
    data = load_planetoid(dataset)
    x, ei = data["x"], data["edge_index"]
    n, f = x.shape
    log(f"{name}: {dataset} {n} nodes, {f} features, {ei.shape[1]} directed edges")

    with Timer() as t_svd:
        proj, sing = svd_projection(x, cfg["svd"])
    seed_all(seed)
    enc = GCNEncoder(proj, [cfg["svd"]] + list(cfg["dims"]), act=cfg["act"],
                     last_act=cfg["last_act"], dropout=cfg.get("dropout", 0.0))
    untrained = GCNEncoder(proj, [cfg["svd"]] + list(cfg["dims"]), act=cfg["act"],
                           last_act=cfg["last_act"])
    untrained.load_state_dict(enc.state_dict())
    untrained.eval()
    z = mm(torch.as_tensor(x), enc.proj)
    log(f"{name}: training ({objective})")
    with Timer() as t_train:
        if objective == "edgepred":
            train_info = train_edgepred(enc, z, ei, cfg, seed)
        elif objective == "graphcl":
            train_info = train_graphcl(enc, x, ei, cfg, seed)
        else:
            raise ValueError(objective)
    enc.eval()
    log(f"{name}: trained in {t_train.seconds:.1f}s: {train_info}")

    doc = (f"{name}: {description} Inputs x f32[nodes, {f}] (raw node features), "
           f"edge_index i64[2, edges] (row 0 source, row 1 target, both directions of every "
           f"undirected edge); output h f32[nodes, {cfg['dims'][-1]}].")
    model = gcn_onnx(enc, name, doc)
    onnx_bytes, sha = write_model(here, model)
    sess = ort_session(here / "model.onnx")

    # ONNX Runtime vs PyTorch on graphs of several sizes.
    def torch_fn(feeds):
        return [enc(torch.as_tensor(feeds["x"]), torch.as_tensor(feeds["edge_index"]))]

    lo, hi = cfg["ref_nodes"]
    center, ref_nodes, ref_ei = pick_subgraph(data, cfg["ref_hops"], lo, hi)
    c3, nodes3, ei3 = pick_subgraph(data, 3, 200, 1500)
    rng = np.random.default_rng(seed)
    rand_nodes = np.sort(rng.choice(n, size=n // 4, replace=False))
    loops = np.concatenate([ei, np.stack([np.arange(n), np.arange(n)])], axis=1)
    cases = [
        (f"whole graph", {"x": x, "edge_index": ei}),
        (f"whole graph + a self-loop per node", {"x": x, "edge_index": loops}),
        (f"random induced subgraph ({len(rand_nodes)} nodes)",
         {"x": x[rand_nodes], "edge_index": induced_subgraph(ei, n, rand_nodes)}),
        (f"3-hop subgraph of node {c3}", {"x": x[nodes3], "edge_index": ei3}),
        (f"{cfg['ref_hops']}-hop subgraph of node {center} (reference)",
         {"x": x[ref_nodes], "edge_index": ref_ei}),
        (f"1 node, 0 edges", {"x": x[center:center + 1],
                              "edge_index": np.zeros((2, 0), dtype=np.int64)}),
    ]
    checks = _ort_vs_torch(sess, torch_fn, cases)

    # Reference files: the small subgraph, and what ONNX Runtime returns for it.
    ref_feeds = cases[4][1]
    ref_h = sess.run(["h"], ref_feeds)[0]
    for k, v in ref_feeds.items():
        save_npy(here / "reference" / "inputs" / f"{k}.npy", np.ascontiguousarray(v))
    save_npy(here / "reference" / "outputs" / "h.npy", ref_h)

    # Linear probes (labels are read only here, after training).
    log(f"{name}: linear probes")
    h_full = sess.run(["h"], {"x": x, "edge_index": ei})[0]
    with torch.no_grad():
        h_untrained = untrained(torch.as_tensor(x), torch.as_tensor(ei)).numpy()
    probes = {
        "raw features": node_probe(x, data),
        f"SVD-{cfg['svd']} features (the model's first step)": node_probe(z.numpy(), data),
        "same encoder, untrained (initial weights)": node_probe(h_untrained, data),
        "pre-trained encoder (h)": node_probe(h_full, data),
    }
    for k, v in probes.items():
        log(f"  probe  {k:<52} val {v['val']:.3f}  test {v['test']:.3f}  "
            f"(l2 {v['l2']:g}, standardised {v['standardised']})")

    params = sum(p.numel() for p in enc.parameters())
    manifest = {
        "name": name,
        "description": description,
        "file": "model.onnx",
        "sha256": sha,
        "origin": (
            f"Trained from scratch without labels in PyTorch by models/{name}/make.py "
            f"(objective: {objective}, seed {seed}) on the {dataset} graph of the Planetoid "
            f"citation data (../shared/data/graphs/{dataset}.planetoid.npz); ONNX graph written "
            f"with the onnx helper API (opset {OPSET}, IR {IR_VERSION}), message passing as "
            f"Gather + ScatterElements(add); ONNX Runtime matches PyTorch to "
            f"{max(r['max_abs'] for r in checks):.1e} (max abs) on the whole graph, subgraphs "
            f"and a 1-node graph."),
        "licence": ("Model: made in this project from scratch. Data: Planetoid (Yang, Cohen, "
                    "Salakhutdinov 2016) Cora/CiteSeer files, MIT licence."),
        "inputs": [
            {"name": "x", "dtype": "f32", "shape": ["nodes", f], "range": [0.0, 1.0]},
            {"name": "edge_index", "dtype": "i64", "shape": [2, "edges"]},
        ],
        "outputs": [
            {"name": "h", "dtype": "f32", "shape": ["nodes", cfg["dims"][-1]]},
        ],
        "batch": False,
        "extra": {"embedding_size": cfg["dims"][-1], "feature_size": f,
                  "encoder": f"SVD-{cfg['svd']} projection, then GCN "
                             + " -> ".join(str(d) for d in cfg["dims"]),
                  "objective": objective, "self_loops": "added inside; input self-loops dropped"},
    }
    (here / "manifest.json").write_text(manifest_json(manifest))
    summary = {
        "name": name, "dataset": dataset, "objective": objective, "seed": seed,
        "parameters_trained": int(params), "onnx_bytes": len(onnx_bytes), "sha256": sha,
        "svd_seconds": round(t_svd.seconds, 2), "train_seconds": round(t_train.seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "train": train_info, "probes": probes, "checks": checks,
        "reference": {"center": center, "hops": cfg["ref_hops"], "nodes": len(ref_nodes),
                      "edges": int(ref_ei.shape[1])},
        "versions": versions(),
    }
    print(json.dumps(summary, indent=1))
    return summary


def versions():
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
