"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/.

The fuzzers start from these (plus what is already in fuzz/corpus/<target>/); after a run the
corpus is minimised into fuzz/corpus/ with `cargo fuzz cmin` (see fuzz/README.md). Needs numpy
and Pillow (the project's .venv has both):

    .venv/bin/python fuzz/seeds.py

Each input starts with the option bytes the target's harness function reads
(fuzz/harness.rs); multi-file inputs separate their files with NUL bytes.
"""

import glob
import io
import os
import shutil
import struct
import zipfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "seeds")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def npy_bytes(a, version=None):
    b = io.BytesIO()
    if version is None:
        np.save(b, a, allow_pickle=False)
    else:
        np.lib.format.write_array(b, a, version=version, allow_pickle=False)
    return b.getvalue()


def pipelines():
    files = sorted(glob.glob(os.path.join(ROOT, "pipelines", "*.yaml")))
    files += sorted(glob.glob(os.path.join(ROOT, "tests", "broken", "*.yaml")))
    for f in files:
        kind = "broken-" if "broken" in f else ""
        with open(f, "rb") as h:
            put("pipeline", kind + os.path.basename(f), h.read())
    # Sources the committed pipelines do not use, pointing at the repository's data.
    put("pipeline", "jsonl-and-images.yaml", b"""name: sources
settings: {epoch_size: 4, max_in_flight: 2}
sources:
  - name: faces
    kind: images
    params: {path: ../data/faces, size: [16, 16], channels: 1, range: [-1, 1], limit: 2}
  - name: lines
    kind: jsonl
    params: {path: ../data/none.jsonl, fields: {a: int, t: "f32[2, ..]"}}
stages:
  - name: s
    kind: scale
    params: {field: image, factor: 2.0}
sinks:
  - name: out
    kind: jsonl
    params: {path: out.jsonl, fields: [image]}
""")
    put("pipeline", "anchors.yaml", b"""name: &n anchors
sources: &s
  - {name: syn, kind: synthetic, params: {field: x, shape: [4], count: 3}}
stages: []
sinks:
  - {name: o, kind: npy, params: {fields: [x]}}
extra: *n
""")


def npy():
    arrays = {
        "f4-2x3": np.arange(6, dtype="<f4").reshape(2, 3),
        "f8-4": np.array([1.5, -2.0, np.nan, np.inf], dtype="<f8"),
        "i4-2x2x2": np.arange(8, dtype="<i4").reshape(2, 2, 2),
        "i8-3": np.array([-1, 0, 2**40], dtype="<i8"),
        "u1-5x2": np.arange(10, dtype="u1").reshape(5, 2),
        "f4-0x3": np.zeros((0, 3), dtype="<f4"),
        "f4-scalar": np.array(3.0, dtype="<f4"),
        "f4-fortran": np.asfortranarray(np.arange(6, dtype="<f4").reshape(2, 3)),
        "f2-unsupported": np.zeros(3, dtype="<f2"),
        ">f4-big-endian": np.zeros(3, dtype=">f4"),
    }
    for i, (name, a) in enumerate(arrays.items()):
        put("npy", name + ".npy", bytes([i % 4]) + npy_bytes(a))
    put("npy", "f4-v2.npy", b"\x00" + npy_bytes(np.ones((2, 2), "<f4"), version=(2, 0)))
    put("npy", "f4-v3.npy", b"\x01" + npy_bytes(np.ones((3,), "<f4"), version=(3, 0)))
    good = npy_bytes(np.arange(12, dtype="<f4").reshape(3, 4))
    put("npy", "truncated.npy", b"\x00" + good[:-5])
    put("npy", "header-only.npy", b"\x00" + good[:20])
    with open(os.path.join(ROOT, "data", "digits", "test-labels.npy"), "rb") as f:
        put("npy", "digits-labels.npy", b"\x00" + f.read())
    # Crashes found by fuzzing, fixed in stages/src/npy.rs: shapes whose byte count overflows,
    # and billions of empty rows read whole (an endless loop).
    def raw(descr, shape, data=b"\0" * 64):
        h = ("{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape)).ljust(117)
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + h.encode() + b"\n" + data

    put("npy", "regress-overflow", b"\x00" + raw("<f4", "(4294967296, 4294967296, 2)"))
    put("npy", "regress-overflow2", b"\x00" + raw("<f8", "(2305843009213693952,)"))
    put("npy", "regress-zero-rows", b"\x00" + raw("<f4", "(18446744073709551615, 0)", b""))
    put("npy", "regress-zero-rows-whole", b"\x01" + raw("<f4", "(18446744073709551615, 0)", b""))
    put("npy", "regress-2e40-rows-whole", b"\x01" + raw("<f4", "(1099511627776, 0)", b""))
    put("npy", "regress-empty-row-overflow", b"\x00" + raw("<i8", "(18446744073709551615, 18446744073709551615, 0)", b""))


def jsonl():
    put("jsonl", "all-types.jsonl", b"""{"a": "int", "b": "scalar", "c": "text", "d": "f32[..]", "e": "i64[2, n]"}
{"key": "r1", "a": 1, "b": 2.5, "c": "x", "d": [[1, 2], [3, 4]], "e": [[1, 2, 3], [4, 5, 6]]}
{"a": -3, "b": 1e300, "c": "", "d": [], "e": [[], []]}
{"a": 1.5, "b": "no", "c": 3, "d": [[1], [2, 3]], "e": [1, 2]}
not json
{"a": 9223372036854775807, "b": -0.0, "c": "\\u00e9", "d": [[[1.0]]], "e": [[0], [1]]}
""")
    put("jsonl", "fixed-shape.jsonl", b"""{"x": "f32[2, 3]", "y": "i64[3]", "g": "graph"}
{"x": [[1, 2, 3], [4, 5, 6]], "y": [1, 2, 3], "g": 1}
{"x": [[1, 2, 3]], "y": [1, 2]}
""")
    put("jsonl", "bad-fields.jsonl", b"""{"x": "f32[", "y": "u8[3]", "z": "i64[-1]"}
{"x": 1}
""")
    put("jsonl", "default-fields.jsonl", b"""
{"a": 1, "b": 2, "c": "t", "d": [1], "e": [[1], [2]]}
""")


def image():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    imgs = {
        "rgb": Image.fromarray(rgb, "RGB"),
        "grey": Image.fromarray(rgb[:, :, 0], "L"),
        "rgba": Image.fromarray(np.dstack([rgb, rgb[:, :, :1]]), "RGBA"),
        "palette": Image.fromarray(rgb, "RGB").convert("P"),
        "grey16": Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257),
        "bilevel": Image.fromarray(rgb[:, :, 0] > 128),
    }
    n = 0
    for name, im in imgs.items():
        b = io.BytesIO()
        im.save(b, "PNG", optimize=False)
        # options: PNG; alternate channels / fit / explicit size / range.
        opts = [0x00, 0x0A, 0x1C, 0x08][n % 4]
        put("image", f"{name}.png", bytes([opts, 7, 30]) + b.getvalue())
        n += 1
    for name, im, kw in [
        ("rgb", imgs["rgb"], {}),
        ("grey", imgs["grey"], {}),
        ("progressive", imgs["rgb"], {"progressive": True}),
        ("subsampled", imgs["rgb"], {"subsampling": 2, "quality": 30}),
    ]:
        b = io.BytesIO()
        im.save(b, "JPEG", **kw)
        opts = [0x01, 0x0B, 0x1D, 0x09][n % 4]
        put("image", f"{name}.jpg", bytes([opts, 5, 9]) + b.getvalue())
        n += 1
    # A JPEG named .png, and a file that is neither.
    b = io.BytesIO()
    imgs["grey"].save(b, "JPEG")
    put("image", "jpeg-named-png", bytes([0x08, 3, 3]) + b.getvalue())
    put("image", "not-an-image", bytes([0x00, 1, 1]) + b"hello")


def npz_bytes(arrays):
    b = io.BytesIO()
    np.savez(b, **arrays)
    return b.getvalue()


def small_graph(index_dtype, label_dtype, split, names):
    n = 6
    adj = np.zeros((n, n), np.float32)
    for s, t in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0), (1, 4)]:
        adj[s, t] = adj[t, s] = 1
    attr = np.eye(n, 4, dtype=np.float32) + np.eye(n, 4, -2, dtype=np.float32)

    def csr(m, prefix):
        indptr, indices, data = [0], [], []
        for row in m:
            nz = np.nonzero(row)[0]
            indices += list(nz)
            data += list(row[nz])
            indptr.append(len(indices))
        return {
            f"{prefix}_data": np.array(data, np.float32),
            f"{prefix}_indices": np.array(indices, index_dtype),
            f"{prefix}_indptr": np.array(indptr, index_dtype),
            f"{prefix}_shape": np.array(m.shape, np.int64),
        }

    a = {**csr(adj, "adj"), **csr(attr, "attr")}
    a["labels"] = np.array([0, 1, 0, 1, 2, 2], label_dtype)
    if split:
        a["idx_train"] = np.array([0, 1, 4], np.int64)
        a["idx_val"] = np.array([2], np.int64)
        a["idx_test"] = np.array([3, 5], np.int64)
    if names:
        a["node_names"] = np.array([f"n{i}" for i in range(n)])
        a["class_names"] = np.array(["a", "bb", "ccc"])
    return a


def graph_npz():
    planetoid = small_graph(np.int64, np.int64, True, False)
    bench = small_graph(np.int32, np.int8, False, True)
    # options: symmetrise; split auto / standard / random (1 per class) / none.
    put("graph_npz", "planetoid-auto", bytes([0x01, 0x11]) + npz_bytes(planetoid))
    put("graph_npz", "planetoid-standard-loops", bytes([0x0B, 0x11]) + npz_bytes(planetoid))
    put("graph_npz", "bench-random", bytes([0x35, 0x11]) + npz_bytes(bench))
    put("graph_npz", "bench-none", bytes([0x18, 0x00]) + npz_bytes(bench))
    f64 = dict(planetoid)
    f64["adj_data"] = f64["adj_data"].astype(np.float64)
    f64["labels"] = f64["labels"].astype(np.uint16)
    del f64["idx_test"]
    put("graph_npz", "f64-data-u16-labels", bytes([0x00, 0x00]) + npz_bytes(f64))
    # A compressed archive (refused) and a zip that is not an npz.
    b = io.BytesIO()
    np.savez_compressed(b, **planetoid)
    put("graph_npz", "compressed", bytes([0x01, 0x11]) + b.getvalue())
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w") as z:
        z.writestr("adj_shape.npy", b"\x93NUMPY\x01\x00garbage")
    put("graph_npz", "bad-member", bytes([0x01, 0x00]) + b.getvalue())


def graph_tu():
    src = os.path.join(os.path.dirname(ROOT), "shared", "data", "graphs", "MUTAG")

    def read(part):
        p = os.path.join(src, f"MUTAG_{part}.txt")
        with open(p) as f:
            return f.read().splitlines()

    if os.path.isdir(src):
        ind = read("graph_indicator")
        keep = 2  # the first two graphs of MUTAG
        nodes = sum(1 for g in ind if int(g) <= keep)
        a = [l for l in read("A") if all(int(x) <= nodes for x in l.split(","))]
        files = [
            "\n".join(a) + "\n",
            "\n".join(ind[:nodes]) + "\n",
            "\n".join(read("graph_labels")[:keep]) + "\n",
            "\n".join(read("node_labels")[:nodes]) + "\n",
        ]
    else:
        files = ["1, 2\n2, 1\n3, 4\n4, 3\n", "1\n1\n2\n2\n", "1\n-1\n", "0\n2\n1\n0\n"]
    put("graph_tu", "mutag-2-graphs", bytes([0x05]) + "\0".join(files).encode())
    put("graph_tu", "mutag-no-node-labels", bytes([0x04]) + "\0".join(files[:3]).encode())
    small = [
        "1, 2\n2, 1\n2, 3\n4, 5\n",
        "1\n1\n1\n2\n2\n",
        "0\n1\n",
        "1,0\n0,3\n1,1\n2,2\n0,0\n",
        "0.5, 1\n1.5, -2\n0, 0\n1e3, 2\n3, 4\n",
    ]
    put("graph_tu", "attributes-and-labels", bytes([0x03]) + "\0".join(small).encode())
    put("graph_tu", "prefix-from-file", bytes([0x02]) + "\0".join(small).encode())
    put("graph_tu", "bad-indicator", bytes([0x04]) + "\0".join([small[0], "1\n3\n", "0\n"]).encode())


def graph_regressions():
    """Inputs of the graph loader crashes fixed so far: each is now an error."""
    for name, cols in [("regress-npz-overflow-cols", 2**62), ("regress-npz-huge-cols", 2**40)]:
        g = small_graph(np.int64, np.int64, True, False)
        g["attr_shape"] = np.array([g["attr_shape"][0], cols], np.int64)
        put("graph_npz", name, bytes([0x01, 0x00]) + npz_bytes(g))
    a = "1, 2\n2, 1\n"
    put("graph_tu", "regress-tu-indicator-zero", bytes([0x04]) + "\0".join([a, "0\n0\n", "1\n"]).encode())
    for name, labels in [
        ("regress-tu-label-width-overflow", "0\n9223372036854775807\n"),
        ("regress-tu-label-width-overflow2", "-9223372036854775808\n0\n"),
        ("regress-tu-label-width-huge", "0\n4000000000\n"),
    ]:
        put("graph_tu", name, bytes([0x05]) + "\0".join([a, "1\n1\n", "1\n", labels]).encode())


def graph_csv():
    edges = "source,target\na,b\nb,c\nc,d\nd,a\na,c\n"
    feats = "id,f1,f2,f3\na,1,0,0\nb,0,1,0\nc,0,0,1\nd,1,1,0\ne,0.5,0.5,0\n"
    labels = "id,label\na,x\nb,y\nc,x\nd,\ne,-1\n"
    put("graph_csv", "names", bytes([0x01, 0x00]) + "\0".join([edges, feats, labels]).encode())
    put("graph_csv", "random-split", bytes([0x31, 0x11]) + "\0".join([edges, feats, labels]).encode())
    tabs = "# comment\n1\t2\n2\t3\n3\t1\n"
    tfeat = "1\t0.1\t0.2\n2\t0.3\t0.4\n3\t0.5\t0.6\n"
    tlab = "1\t0\n2\t1\n3\t\n"
    put("graph_csv", "tabs", bytes([0x07, 0x00]) + "\0".join([tabs, tfeat, tlab]).encode())
    spaces = "1 2\n2 3 9.5\n"
    sfeat = "1 1\n2 2\n3 3\n"
    put("graph_csv", "spaces-no-labels", bytes([0x18, 0x00]) + "\0".join([spaces, sfeat]).encode())
    put("graph_csv", "unknown-node", bytes([0x01, 0x00]) + "\0".join(["1,9\n", sfeat]).encode())


def graph_ogb():
    """OGB folders: option bytes 0-1 as for the other graph targets, byte 2 the folder's
    layout (see harness.rs); then node-feat, node-label, num-node-list, num-edge-list, train,
    valid, test and (last, running to the end) edge."""
    import gzip

    def seed(name, b0, b1, layout, parts):
        data = [p if isinstance(p, bytes) else p.encode() for p in parts]
        put("graph_ogb", name, bytes([b0, b1, layout]) + b"\0".join(data))

    feat = "1.0,0.0,0.5\n0.0,2.0,0.0\n-1.5,0.0,0.0\n0.25,0.25,0.25\n0,0,1e-3\n3,4,5\n"
    label = "0\n1\n\n1\nnan\n0\n"
    edge = "0,1\n1,2\n2,3\n3,4\n4,5\n5,0\n1,3\n"
    split = ["0\n3\n", "1\n", "5\n"]
    full = [feat, label, "6\n", "7\n"] + split + [edge]
    # Every file, plain and gzipped (stored blocks), standard split through auto and standard.
    seed("plain", 0x01, 0x00, 0x0E, full)
    seed("gzip", 0x09, 0x00, 0x0F, full)
    seed("auto-format", 0x03, 0x00, 0x8E, full)
    seed("no-features", 0x01, 0x00, 0x0C, full)
    seed("random-split", 0x31, 0x11, 0x02, ["1,0\n0,1\n1,1\n0,0\n", "0\n1\n0\n1\n", "4\n",
                                           "", "", "", "", "0,1\n2,3\n"])
    seed("two-splits-picked", 0x09, 0x00, 0x3E, full)
    seed("two-splits-unpicked", 0x09, 0x00, 0x1E, full)
    # Pandas' float labels, a real deflate stream, its truncation, and a concatenation.
    seed("float-labels", 0x01, 0x00, 0x08, ["", "0.0\n2.0\n\n", "3\n", "", "0\n", "1\n", "1\n",
                                           "0,1\n1,2\n"])
    deflated = gzip.compress(edge.encode(), mtime=0)
    seed("deflate-edges", 0x01, 0x00, 0x4E, full[:7] + [deflated])
    seed("deflate-truncated", 0x01, 0x00, 0x4E, full[:7] + [deflated[: len(deflated) - 9]])
    seed("deflate-members", 0x01, 0x00, 0x4E, full[:7] + [deflated + gzip.compress(b"2,5\n")])
    # Broken files: each an error naming the file and line.
    seed("edge-out-of-range", 0x01, 0x00, 0x06, full[:7] + ["0,1\n1,6\n"])
    seed("ragged-features", 0x01, 0x00, 0x06, ["1,2\n3\n"] + full[1:])
    seed("multi-label", 0x01, 0x00, 0x04, ["", "0,1\n1,0\n", "2\n", "", "", "", "", "0,1\n"])
    seed("count-too-small", 0x01, 0x00, 0x0E, [feat, label, "4\n"] + full[3:])
    seed("count-huge", 0x01, 0x00, 0x00, ["", "0\n", "1000000000000\n", "", "", "", "", "0,0\n"])
    seed("split-out-of-range", 0x09, 0x00, 0x0E, full[:4] + ["0\n9\n"] + full[5:])
    seed("missing-edges", 0x01, 0x00, 0x0E, full[:7])


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    pipelines()
    npy()
    jsonl()
    image()
    graph_npz()
    graph_tu()
    graph_csv()
    graph_ogb()
    graph_regressions()
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        print(f"{t}: {len(files)} seeds, {size} bytes")
