#!/usr/bin/env python3
"""Train and export the fashion-ccbn model package, reproducibly, on CPU.

    bash scripts/setup-export.sh && .venv-export/bin/python models/fashion-ccbn/make.py

A class-conditional GAN on Fashion-MNIST (28x28). The generator normalises every hidden layer with
class-conditional batch normalisation (CCBN): BatchNorm without affine parameters, then a per-class
gain and bias computed from the class vector `y` by bias-free linear maps,

    ccbn(h, y) = (1 + W_gain y) * BN(h) + W_bias y        (per channel)

so a one-hot `y` selects one class's gain and bias, and a mixture of one-hot vectors blends them.
The discriminator is a spectrally normalised CNN with a projection head (Miyato & Koyama 2018),
trained with the hinge loss.

Writes into models/fashion-ccbn/ (or --out DIR):
  model.onnx                       generator, opset 17, IR 9, dynamic batch axis
  manifest.json                    names, shapes, sha256, extra (latent size, classes, CCBN layers)
  reference/inputs/{z,y}.npy       8 inputs: 6 one-hot classes and 2 two-class blends
  reference/outputs/*.npy          ONNX Runtime (Python, CPU) outputs for them
  samples.png                      one row per class, 10 samples each, class names on the left

and prints training progress, the ONNX-vs-PyTorch difference and the class-recognition figures.
`--steps N --out DIR` makes a shortened run elsewhere (for checking determinism); the package uses
the defaults.

Data: Fashion-MNIST from Debian's dataset-fashion-mnist (Zalando SE, MIT/Expat licence).
"""

import os

# One thread, set before torch loads OpenMP: on this shared 2-core machine two OpenMP threads
# that busy-wait for each other ran a training step about 5x slower than one thread did. A fixed
# thread count also keeps the floating-point reductions, and so the weights, the same every run.
THREADS = 1
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import argparse  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import spectral_norm  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = Path("/usr/share/datasets/fashion-mnist")

SEED = 20240607
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
N_CLASSES = len(CLASSES)
Z = 64  # latent size
WIDTH = (128, 64, 32)  # generator channels at 7x7, 14x14, 28x28
D_WIDTH = (32, 64, 128)  # discriminator channels at 14x14, 7x7, 4x4
BATCH = 64
STEPS = 2000  # generator steps, one discriminator step each
LR_G, LR_D, BETAS = 2e-4, 2e-4, (0.0, 0.9)
AC_WEIGHT = 1.0  # auxiliary classification loss on the discriminator's features (AC-GAN)
EMA_DECAY, EMA_START = 0.999, 500  # exponential moving average of the generator's weights
STANDING_BATCHES = 200  # batches of 100 used to re-estimate the BatchNorm statistics
CLF_STEPS = 900  # evaluation classifier: about two epochs at batch 128
OPSET, IR_VERSION = 17, 9  # torch 1.13 writes IR 8; ONNX Runtime 1.31 wants 9 or 10 here
EXPORT_TOL = 1e-4
CHECK_BATCHES = (1, 5, 32)  # batch sizes of the ONNX Runtime vs PyTorch comparison


# ----------------------------------------------------------------------------------------------
# data


def read_idx(path):
    """The array in an IDX file (gzipped), as in the Fashion-MNIST distribution."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    assert raw[2] == 0x08, f"{path}: not unsigned bytes"
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split):
    images = read_idx(DATA / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(DATA / f"{split}-labels-idx1-ubyte.gz")
    assert images.shape[1:] == (28, 28) and len(images) == len(labels)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)  # [-1, 1]
    return x, torch.from_numpy(labels.astype(np.int64))


def one_hot(labels):
    return F.one_hot(labels, N_CLASSES).float()


# ----------------------------------------------------------------------------------------------
# models


class CCBN(nn.Module):
    """BatchNorm without affine parameters, modulated by a gain and a bias linear in `y`."""

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(N_CLASSES, channels, bias=False)
        self.bias = nn.Linear(N_CLASSES, channels, bias=False)
        nn.init.zeros_(self.gain.weight)  # starts as plain BatchNorm
        nn.init.zeros_(self.bias.weight)

    def forward(self, h, y):
        gain = (1.0 + self.gain(y)).unsqueeze(-1).unsqueeze(-1)
        bias = self.bias(y).unsqueeze(-1).unsqueeze(-1)
        return self.bn(h) * gain + bias


class Generator(nn.Module):
    """z [B, Z], y [B, 10] -> image [B, 1, 28, 28] in [-1, 1] and the three CCBN outputs.

    Upsampling is nearest-neighbour followed by a 3x3 convolution: Debian's PyTorch runs
    ConvTranspose2d and Linear on the reference BLAS, which is several times slower here than
    the oneDNN convolutions.
    """

    def __init__(self):
        super().__init__()
        c1, c2, c3 = WIDTH
        self.fc = nn.Linear(Z, c1 * 7 * 7)
        self.ccbn1 = CCBN(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)  # after 7 -> 14
        self.ccbn2 = CCBN(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)  # after 14 -> 28
        self.ccbn3 = CCBN(c3)
        self.out = nn.Conv2d(c3, 1, 3, padding=1)
        # Training computes the linear layer as a 1x1 convolution (same arithmetic, oneDNN
        # instead of the reference BLAS); the export sets this to False to get a plain Gemm.
        self.fc_as_conv = True

    def forward(self, z, y):
        if self.fc_as_conv:
            h = F.conv2d(z[:, :, None, None], self.fc.weight[:, :, None, None], self.fc.bias)
        else:
            h = self.fc(z)[:, :, None, None]
        # [B, C1*49, 1, 1] -> [B, C1, 7, 7] in the order of a reshape. Unlike a reshape to
        # [-1, C1, 7, 7], the exporter can infer the channel count of a DepthToSpace, which it
        # needs to export BatchNorm without affine parameters.
        a1 = self.ccbn1(F.pixel_shuffle(h, 7), y)
        a2 = self.ccbn2(self.conv2(F.interpolate(F.relu(a1), scale_factor=2.0)), y)
        a3 = self.ccbn3(self.conv3(F.interpolate(F.relu(a2), scale_factor=2.0)), y)
        image = torch.tanh(self.out(F.relu(a3)))
        return image, a1, a2, a3


class Discriminator(nn.Module):
    """Spectrally normalised CNN with a projection head: f(phi(x)) + <embed(y), phi(x)>."""

    def __init__(self):
        super().__init__()
        c1, c2, c3 = D_WIDTH
        self.conv1 = spectral_norm(nn.Conv2d(1, c1, 4, stride=2, padding=1))  # 28 -> 14
        self.conv2 = spectral_norm(nn.Conv2d(c1, c2, 4, stride=2, padding=1))  # 14 -> 7
        self.conv3 = spectral_norm(nn.Conv2d(c2, c3, 3, stride=2, padding=1))  # 7 -> 4
        self.linear = spectral_norm(nn.Linear(c3, 1))
        self.embed = spectral_norm(nn.Linear(N_CLASSES, c3, bias=False))
        self.classify = spectral_norm(nn.Linear(c3, N_CLASSES))

    def forward(self, x, y):
        """The projection score and the auxiliary class logits."""
        h = F.leaky_relu(self.conv1(x), 0.1)
        h = F.leaky_relu(self.conv2(h), 0.1)
        h = F.leaky_relu(self.conv3(h), 0.1)
        h = h.sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1), self.classify(h)


class Classifier(nn.Module):
    """Small CNN used only to measure whether samples look like their class (not exported)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, N_CLASSES)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))


# ----------------------------------------------------------------------------------------------
# training


def train_gan(x, labels, steps):
    gen = torch.Generator().manual_seed(SEED + 1)
    g, d = Generator(), Discriminator()
    g_ema = Generator()
    g_ema.load_state_dict(g.state_dict())
    g_ema.requires_grad_(False)
    opt_g = torch.optim.Adam(g.parameters(), LR_G, betas=BETAS)
    opt_d = torch.optim.Adam(d.parameters(), LR_D, betas=BETAS)
    n = len(x)
    perm, pos = torch.randperm(n, generator=gen), 0
    t0 = time.perf_counter()
    print(
        f"GAN: {steps} steps, batch {BATCH}, G {count(g)} / D {count(d)} parameters",
        flush=True,
    )
    for step in range(1, steps + 1):
        if pos + BATCH > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + BATCH]
        pos += BATCH
        real, y = x[idx], one_hot(labels[idx])
        z = torch.randn(BATCH, Z, generator=gen)

        fake = g(z, y)[0]
        (d_real, c_real), (d_fake, _) = d(real, y), d(fake.detach(), y)
        loss_d = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        loss_d = loss_d + AC_WEIGHT * F.cross_entropy(c_real, y)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        d_gen, c_gen = d(fake, y)
        loss_g = -d_gen.mean() + AC_WEIGHT * F.cross_entropy(c_gen, y)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        with torch.no_grad():
            decay = 0.0 if step < EMA_START else EMA_DECAY
            for pe, p in zip(g_ema.parameters(), g.parameters()):
                pe.mul_(decay).add_(p, alpha=1.0 - decay)

        if step % 100 == 0 or step == steps:
            print(
                f"step {step:5d}  loss D {loss_d.item():.3f}  loss G {loss_g.item():.3f}  "
                f"D(real) {d_real.mean().item():+.2f}  D(fake) {d_fake.mean().item():+.2f}  "
                f"{time.perf_counter() - t0:6.1f} s",
                flush=True,
            )
    return g_ema, time.perf_counter() - t0


@torch.no_grad()
def standing_statistics(g):
    """Re-estimate BatchNorm's running statistics for the final (EMA) weights.

    During training the running averages follow changing weights, and the EMA weights never ran
    in training mode at all; eval mode (and the export) uses these statistics, so they are
    recomputed as plain averages over class-balanced batches of the final generator.
    """
    gen = torch.Generator().manual_seed(SEED + 2)
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    g.train()
    labels = torch.arange(N_CLASSES).repeat(10)
    for _ in range(STANDING_BATCHES):
        g(torch.randn(len(labels), Z, generator=gen), one_hot(labels))
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    g.eval()


def train_classifier(x, labels, x_test, labels_test):
    gen = torch.Generator().manual_seed(SEED + 3)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), 1e-3)
    t0 = time.perf_counter()
    for step in range(1, CLF_STEPS + 1):
        idx = torch.randint(len(x), (128,), generator=gen)
        loss = F.cross_entropy(clf(x[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 300 == 0:
            print(f"classifier step {step:4d}  loss {loss.item():.3f}", flush=True)
    clf.eval()
    acc = accuracy(clf, x_test, labels_test)
    print(f"classifier: {time.perf_counter() - t0:.1f} s, test accuracy {acc:.4f}", flush=True)
    return clf, acc


@torch.no_grad()
def accuracy(clf, x, labels):
    pred = torch.cat([clf(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == labels).float().mean())


def count(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# export and checks


def export(g, path):
    g.eval()
    g.fc_as_conv = False
    names = ["image"] + [f"ccbn{i}" for i in (1, 2, 3)]
    # torch 1.13 warns that it cannot infer shapes through prim::Constant; the exported
    # shapes are checked below and by `latentflow models check`.
    warnings.filterwarnings("ignore", "The shape inference of prim::Constant", UserWarning)
    axes = {name: {0: "batch"} for name in ["z", "y"] + names}
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        g,
        (torch.zeros(2, Z), one_hot(torch.tensor([0, 1]))),
        str(tmp),
        input_names=["z", "y"],
        output_names=names,
        dynamic_axes=axes,
        opset_version=OPSET,
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL,
    )
    g.eval()  # export may leave the module in training mode
    g.fc_as_conv = True
    model = onnx.load(str(tmp))
    tmp.unlink()
    model.ir_version = IR_VERSION
    model.producer_name = "latentflow models/fashion-ccbn/make.py"
    model.doc_string = "Fashion-MNIST class-conditional generator with CCBN: z, y -> image, ccbn1..3"
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString(deterministic=True)
    path.write_bytes(data)
    return data, names


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_export(g, sess, names):
    """Max |ONNX Runtime - PyTorch (eval)| per output and batch size."""
    gen = torch.Generator().manual_seed(SEED + 4)
    worst = {}
    for b in CHECK_BATCHES:
        z = torch.randn(b, Z, generator=gen)
        w = torch.rand(b, N_CLASSES, generator=gen) ** 4  # one-hot-ish and blended vectors
        y = w / w.sum(1, keepdim=True)
        y[: b // 2 + 1] = one_hot(torch.randint(N_CLASSES, (b // 2 + 1,), generator=gen))
        want = g(z, y)
        got = sess.run(names, {"z": z.numpy(), "y": y.numpy()})
        for name, t, o in zip(names, want, got):
            assert o.shape == tuple(t.shape) and o.dtype == np.float32, (name, o.shape, t.shape)
            worst[(name, b)] = float(np.abs(o - t.numpy()).max())
    return worst


def generate(sess, labels, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((len(labels), Z)).astype(np.float32)
    y = np.eye(N_CLASSES, dtype=np.float32)[labels]
    return sess.run(["image"], {"z": z, "y": y})[0]


def sample_grid(images, path):
    """One row per class, class names on the left; images are [10, 10, 28, 28] in [-1, 1]."""
    scale, pad, label_w = 2, 2, 96
    cell = 28 * scale + pad
    grid = Image.new("L", (label_w + 10 * cell + pad, 10 * cell + pad), 255)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r in range(10):
        draw.text((4, pad + r * cell + cell // 2 - 6), CLASSES[r], fill=0, font=font)
        for c in range(10):
            px = np.clip((images[r, c] + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
            tile = Image.fromarray(px, "L").resize((28 * scale,) * 2, Image.NEAREST)
            grid.paste(tile, (label_w + pad + c * cell, pad + r * cell))
    grid.save(path, optimize=True)


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
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS, help="GAN steps (shortened runs only)")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()

    x, labels = load_split("train")
    x_test, labels_test = load_split("t10k")
    g, gan_s = train_gan(x, labels, args.steps)
    standing_statistics(g)

    # Export and compare with PyTorch in eval mode.
    model_bytes, names = export(g, out / "model.onnx")
    sha = hashlib.sha256(model_bytes).hexdigest()
    sess = ort_session(out / "model.onnx")
    worst = check_export(g, sess, names)
    assert max(worst.values()) <= EXPORT_TOL, f"ONNX vs PyTorch: {worst}"

    # Reference inputs and outputs: 6 one-hot classes and 2 blends of two classes.
    rng = np.random.default_rng(SEED + 5)
    z_ref = rng.standard_normal((8, Z)).astype(np.float32)
    y_ref = np.zeros((8, N_CLASSES), np.float32)
    for i, c in enumerate([0, 1, 3, 5, 8, 9]):
        y_ref[i, c] = 1.0
    y_ref[6, [0, 3]] = 0.5  # T-shirt/top + Dress
    y_ref[7, [5, 7]] = [0.3, 0.7]  # Sandal + Sneaker
    ref_out = sess.run(names, {"z": z_ref, "y": y_ref})
    for i in (0, 7):  # batch 1 gives the same rows as batch 8
        one = sess.run(names, {"z": z_ref[i : i + 1], "y": y_ref[i : i + 1]})
        for a, b in zip(one, ref_out):
            assert np.abs(a - b[i : i + 1]).max() <= EXPORT_TOL
    save_npy(out / "reference/inputs/z.npy", z_ref)
    save_npy(out / "reference/inputs/y.npy", y_ref)
    for name, arr in zip(names, ref_out):
        save_npy(out / f"reference/outputs/{name}.npy", arr)

    # Class recognition: a classifier trained on real data, on 100 samples per class.
    clf, real_acc = train_classifier(x, labels, x_test, labels_test)
    gen_labels = np.repeat(np.arange(N_CLASSES), 100)
    fake = torch.from_numpy(generate(sess, gen_labels, SEED + 6))
    with torch.no_grad():
        pred = clf(fake).argmax(1).numpy()
    gen_acc = float((pred == gen_labels).mean())
    per_class = [float((pred[gen_labels == c] == c).mean()) for c in range(N_CLASSES)]

    grid = generate(sess, np.repeat(np.arange(N_CLASSES), 10), SEED + 7)
    sample_grid(grid.reshape(10, 10, 28, 28), out / "samples.png")

    c1, c2, c3 = WIDTH
    shapes = {"ccbn1": [c1, 7, 7], "ccbn2": [c2, 14, 14], "ccbn3": [c3, 28, 28]}
    manifest = {
        "name": "fashion-ccbn",
        "description": "Class-conditional GAN generator for 28x28 Fashion-MNIST images with "
        "class-conditional batch normalisation (CCBN): latent z and a float class vector y "
        "(one-hot, or a mixture of one-hot vectors) give an image in [-1, 1] and the "
        "activations right after each CCBN layer.",
        "file": "model.onnx",
        "sha256": sha,
        "origin": f"Trained from scratch on CPU by models/fashion-ccbn/make.py (seed {SEED}): "
        f"{args.steps} hinge-loss GAN steps at batch {BATCH} on the 60,000 Fashion-MNIST "
        "training images against a spectrally normalised projection discriminator; the "
        "exported weights are an exponential moving average of the generator's, with "
        "BatchNorm statistics re-estimated afterwards; exported with torch.onnx "
        f"(PyTorch {torch.__version__}, opset {OPSET}, IR {IR_VERSION}) in eval mode; "
        f"ONNX Runtime matches PyTorch to {max(worst.values()):.1e} (max abs, every output, "
        f"batch {', '.join(map(str, CHECK_BATCHES))}).",
        "licence": "Model: trained in this project from scratch. Data: Fashion-MNIST, "
        "Copyright 2017 Zalando SE, MIT (Expat) licence, as packaged by Debian "
        "(dataset-fashion-mnist).",
        "inputs": [
            {"name": "z", "dtype": "f32", "shape": ["batch", Z]},
            {"name": "y", "dtype": "f32", "shape": ["batch", N_CLASSES], "range": [0.0, 1.0]},
        ],
        "outputs": [
            {"name": "image", "dtype": "f32", "shape": ["batch", 1, 28, 28], "range": [-1.0, 1.0]}
        ]
        + [{"name": n, "dtype": "f32", "shape": ["batch"] + s} for n, s in shapes.items()],
        "batch": True,
        "extra": {
            "latent_size": Z,
            "classes": CLASSES,
            "ccbn_outputs": [
                {"name": n, "channels": s[0], "height": s[1], "width": s[2]}
                for n, s in shapes.items()
            ],
            "ccbn_position": "after the class-conditional gain and bias, before ReLU",
            "image_range": [-1, 1],
        },
    }
    (out / "manifest.json").write_text(manifest_json(manifest))

    print(f"GAN training    {gan_s:.0f} s ({args.steps} steps); whole script "
          f"{time.perf_counter() - t_start:.0f} s")
    for (name, b), d in worst.items():
        print(f"ONNX vs PyTorch {name:6s} batch {b:2d}: max |diff| {d:.2e}")
    print(f"classifier      real test set accuracy {real_acc:.4f} (10,000 images)")
    print(f"                generated, intended class recognised {gen_acc:.4f} (1,000 samples)")
    for c in range(N_CLASSES):
        print(f"    {CLASSES[c]:12s} {per_class[c]:.2f}")
    print(f"model.onnx      {len(model_bytes)} bytes, sha256 {sha}")


if __name__ == "__main__":
    main()
