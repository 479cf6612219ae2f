#!/usr/bin/env python3
"""Convert generateme's pretrained DCGAN face generator to the face-dcgan model package.

Run from anywhere:
  bash scripts/setup-export.sh && .venv-export/bin/python models/face-dcgan/make.py

Reads (from the installed PyPI package generateme 0.1.2, MIT, nothing downloaded):
  generateme/static/Models/dcGanGeneratorModel.pt   a PyTorch state_dict (3,578,628 values)

Writes (relative to the repository root):
  models/face-dcgan/model.onnx          z [batch, 100] -> image [batch, 3, 64, 64] in [-1, 1]
  models/face-dcgan/manifest.json       names, dtypes, shapes, ranges, sha256
  models/face-dcgan/reference/inputs/z.npy        8 seeded latents, float32 [8, 100]
  models/face-dcgan/reference/outputs/image.npy   ONNX Runtime (CPU) images for them
  models/face-dcgan/samples.png         8 x 4 faces from seeded latents

generateme's modules load the weights (and Flask, matplotlib) when imported, so this
script never imports them: `Generator` below rebuilds the architecture from the layer
configuration in generateme/DCGan.py, with the same attribute names so that the
state_dict keys match and load with strict=True. Other scripts (models/face-encoder)
import this file for `load_generator()` and `FastGenerator`.
"""

import base64
import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REF = HERE / "reference"

DIST = "generateme"
DIST_VERSION = "0.1.2"
WEIGHTS = "generateme/static/Models/dcGanGeneratorModel.pt"
# From generateme 0.1.2's wheel RECORD (urlsafe base64 of the sha256, unpadded).
WEIGHTS_RECORD_SHA256 = "mDfbSbqm-KtcNrE4J4IYYD7OTA5p6nIC-3MINN0Jkug"

LATENT = 100
OPSET = 17
IR_VERSION = 9  # ONNX Runtime 1.31 loads IR 9 and 10
SEED_CHECK = 20240611  # latents for the PyTorch vs ONNX Runtime comparison
SEED_REFERENCE = 20240612  # the 8 reference latents
SEED_SAMPLES = 20240613  # the sample grid
CHECK_BATCHES = (1, 7, 32)
MAX_ABS_DIFF = 1e-4
N_REFERENCE = 8
GRID_COLS, GRID_ROWS = 8, 4


class Generator(nn.Module):
    """The DCGAN generator of generateme/DCGan.py (layer names and configuration as there).

    z [B, 100, 1, 1] -> 4x4x512 -> 8x8x256 -> 16x16x128 -> 32x32x64 -> 64x64x3, every
    ConvTranspose2d without bias, BatchNorm + ReLU between them, Tanh at the end.
    """

    def __init__(self):
        super().__init__()
        self.convTr1 = nn.ConvTranspose2d(100, 64 * 8, 4, 1, 0, bias=False)
        self.batchNorm1 = nn.BatchNorm2d(64 * 8)
        self.convTr2 = nn.ConvTranspose2d(64 * 8, 64 * 4, 4, 2, 1, bias=False)
        self.batchNorm2 = nn.BatchNorm2d(64 * 4)
        self.convTr3 = nn.ConvTranspose2d(64 * 4, 64 * 2, 4, 2, 1, bias=False)
        self.batchNorm3 = nn.BatchNorm2d(64 * 2)
        self.convTr4 = nn.ConvTranspose2d(64 * 2, 64, 4, 2, 1, bias=False)
        self.batchNorm4 = nn.BatchNorm2d(64)
        self.convTr5 = nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False)

    def forward(self, x):
        x = F.relu(self.batchNorm1(self.convTr1(x)))
        x = F.relu(self.batchNorm2(self.convTr2(x)))
        x = F.relu(self.batchNorm3(self.convTr3(x)))
        x = F.relu(self.batchNorm4(self.convTr4(x)))
        return torch.tanh(self.convTr5(x))


class ExportWrapper(nn.Module):
    """Takes plain latent vectors [B, 100]; the generator wants [B, 100, 1, 1]."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, z):
        return self.generator(z.unsqueeze(-1).unsqueeze(-1))


def _subpixel_weight(w):
    """ConvTranspose2d(k=4, s=2, p=1) weight [Cin, Cout, 4, 4] as a 3x3 Conv2d weight
    [4*Cout, Cin, 3, 3] whose output, pixel-shuffled by 2, is the transposed convolution.

    Output pixel (2i+a, 2j+b) sums input (i+dh, j+dw), dh, dw in {-1, 0, 1}, with kernel
    tap (a+1-2dh, b+1-2dw) where that lies inside the 4x4 kernel.
    """
    cin, cout = w.shape[:2]
    k = w.new_zeros(cout, 2, 2, cin, 3, 3)
    for a in range(2):
        for dh in (-1, 0, 1):
            kh = a + 1 - 2 * dh
            if not 0 <= kh < 4:
                continue
            for b in range(2):
                for dw in (-1, 0, 1):
                    kw = b + 1 - 2 * dw
                    if 0 <= kw < 4:
                        k[:, a, b, :, dh + 1, dw + 1] = w[:, :, kh, kw].t()
    return k.reshape(4 * cout, cin, 3, 3)


class FastGenerator(nn.Module):
    """The same function as `Generator` (eval mode), built from ordinary convolutions.

    Debian's CPU torch runs ConvTranspose2d through a generic BLAS, about 8x slower than
    its oneDNN Conv2d, which matters when an encoder is trained through the generator.
    Here the 1x1 -> 4x4 layer is a 1x1 convolution to 512*16 channels and each stride-2
    layer a 3x3 convolution plus pixel shuffle; BatchNorm uses the running statistics.
    All weights are frozen buffers. Agrees with `Generator` to float rounding.
    """

    def __init__(self, generator):
        super().__init__()
        g = generator
        w1 = g.convTr1.weight.detach()  # [100, 512, 4, 4]
        self.register_buffer("w1", w1.permute(1, 2, 3, 0).reshape(-1, w1.shape[0], 1, 1).clone())
        for i in (2, 3, 4, 5):
            w = getattr(g, f"convTr{i}").weight.detach()
            self.register_buffer(f"w{i}", _subpixel_weight(w).contiguous())
        for i in (1, 2, 3, 4):
            bn = getattr(g, f"batchNorm{i}")
            scale = bn.weight.detach() / torch.sqrt(bn.running_var.detach() + bn.eps)
            shift = bn.bias.detach() - bn.running_mean.detach() * scale
            self.register_buffer(f"s{i}", scale.reshape(1, -1, 1, 1).clone())
            self.register_buffer(f"t{i}", shift.reshape(1, -1, 1, 1).clone())

    def forward(self, z):
        x = F.conv2d(z.reshape(-1, LATENT, 1, 1), self.w1).reshape(-1, 512, 4, 4)
        x = F.relu(x * self.s1 + self.t1)
        for i in (2, 3, 4):
            x = F.pixel_shuffle(F.conv2d(x, getattr(self, f"w{i}"), padding=1), 2)
            x = F.relu(x * getattr(self, f"s{i}") + getattr(self, f"t{i}"))
        return torch.tanh(F.pixel_shuffle(F.conv2d(x, self.w5, padding=1), 2))


def generateme_metadata():
    dist = importlib.metadata.distribution(DIST)
    meta = dist.metadata
    if dist.version != DIST_VERSION:
        raise SystemExit(f"need {DIST}=={DIST_VERSION}, found {dist.version}: "
                         "run bash scripts/setup-export.sh")
    return {
        "version": dist.version,
        "author": meta["Author"],
        "author_email": meta["Author-email"],
        "home_page": meta["Home-page"],
        "license": meta["License"],
        "weights_path": Path(dist.locate_file(WEIGHTS)),
    }


def load_generator():
    """generateme's pretrained generator in eval mode, weights checked against the wheel."""
    meta = generateme_metadata()
    path = meta["weights_path"]
    raw = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode()
    if digest != WEIGHTS_RECORD_SHA256:
        raise SystemExit(f"{path}: sha256 differs from generateme {DIST_VERSION}'s RECORD")
    state = torch.load(path, map_location="cpu", weights_only=True)
    g = Generator()
    g.load_state_dict(state, strict=True)
    g.eval()
    for p in g.parameters():
        p.requires_grad_(False)
    return g, meta


def latents(seed, n):
    return np.random.default_rng(seed).standard_normal((n, LATENT)).astype(np.float32)


def ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def to_uint8(images):
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


def grid(images_u8, cols, pad=2, fill=255):
    """[N, H, W, C] uint8 -> one image with `cols` columns and `pad` pixels between tiles."""
    n, h, w, c = images_u8.shape
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, np.uint8)
    for i, im in enumerate(images_u8):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y:y + h, x:x + w] = im
    return out


def save_png(path, array):
    from PIL import Image

    Image.fromarray(array.squeeze()).save(path, optimize=True)


def manifest_json(manifest):
    """JSON with one line per tensor entry, ending in a newline."""
    parts = []
    for key, value in manifest.items():
        if key in ("inputs", "outputs"):
            body = ",\n".join("    " + json.dumps(t) for t in value)
            parts.append(f"  {json.dumps(key)}: [\n{body}\n  ]")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    text = "{\n" + ",\n".join(parts) + "\n}\n"
    assert json.loads(text) == manifest
    return text


def save_npy(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(arr), allow_pickle=False)


def export_onnx(generator, path):
    import onnx

    wrapper = ExportWrapper(generator).eval()
    torch.onnx.export(
        wrapper,
        torch.zeros(2, LATENT),
        str(path),
        input_names=["z"],
        output_names=["image"],
        dynamic_axes={"z": {0: "batch"}, "image": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL,
    )
    wrapper.eval()  # the exporter may leave modules in training mode
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    model.producer_name = "latentflow models/face-dcgan/make.py"
    model.doc_string = ("DCGAN face generator (generateme 0.1.2): latent z [batch, 100] "
                        "-> RGB image [batch, 3, 64, 64] in [-1, 1]")
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString(deterministic=True)
    path.write_bytes(data)
    return model, data


def check_shapes(model):
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, dims(inp)) == ("z", ["batch", LATENT]), dims(inp)
    assert (out.name, dims(out)) == ("image", ["batch", 3, 64, 64]), dims(out)


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    generator, meta = load_generator()

    model_path = HERE / "model.onnx"
    model, data = export_onnx(generator, model_path)
    check_shapes(model)
    sha = hashlib.sha256(data).hexdigest()
    ops = sorted({n.op_type for n in model.graph.node})

    # ONNX Runtime against the eval-mode PyTorch model (and the fast rewrite used for
    # encoder training) on the same latents, at several batch sizes including 1.
    sess = ort_session(model_path)
    fast = FastGenerator(generator).eval()
    diffs, fast_diffs = {}, {}
    for b in CHECK_BATCHES:
        z = latents(SEED_CHECK + b, b)
        with torch.no_grad():
            want = generator(torch.from_numpy(z)[:, :, None, None]).numpy()
            fast_out = fast(torch.from_numpy(z)).numpy()
        got = sess.run(["image"], {"z": z})[0]
        assert got.shape == (b, 3, 64, 64) and got.dtype == np.float32
        diffs[b] = float(np.abs(got - want).max())
        fast_diffs[b] = float(np.abs(fast_out - want).max())
    worst = max(diffs.values())
    assert worst <= MAX_ABS_DIFF, f"ONNX Runtime vs PyTorch: max |diff| {worst:.3g}"
    assert max(fast_diffs.values()) <= MAX_ABS_DIFF, fast_diffs

    z_ref = latents(SEED_REFERENCE, N_REFERENCE)
    img_ref = sess.run(["image"], {"z": z_ref})[0]
    for i in (0, N_REFERENCE - 1):  # batch 1 gives the same rows
        one = sess.run(["image"], {"z": z_ref[i:i + 1]})[0]
        assert np.abs(one - img_ref[i:i + 1]).max() <= MAX_ABS_DIFF
    save_npy(REF / "inputs" / "z.npy", z_ref)
    save_npy(REF / "outputs" / "image.npy", img_ref)

    z_grid = latents(SEED_SAMPLES, GRID_COLS * GRID_ROWS)
    samples = sess.run(["image"], {"z": z_grid})[0]
    save_png(HERE / "samples.png", grid(to_uint8(samples), GRID_COLS))

    manifest = {
        "name": "face-dcgan",
        "description": "Pretrained DCGAN face generator: a latent vector z of 100 standard "
        "normal values -> a 64x64 RGB face image with values in [-1, 1].",
        "file": "model.onnx",
        "sha256": sha,
        "origin": f"Weights: {WEIGHTS} from the PyPI package generateme {meta['version']} "
        f"by {meta['author']} ({meta['home_page']}), a Flask demo app. Converted by "
        "models/face-dcgan/make.py: the architecture of generateme/DCGan.py rebuilt, the "
        "state_dict loaded with strict=True, eval mode, z reshaped to [B, 100, 1, 1] inside "
        f"the graph, exported with torch.onnx (opset {OPSET}, IR {IR_VERSION}); ONNX "
        f"Runtime matches PyTorch to {worst:.1e} (max abs) at batch 1, 7 and 32. The "
        "package does not say what data the generator was trained on.",
        "licence": f"{meta['license']} (generateme {meta['version']} package metadata, "
        f"author {meta['author']}). The training data is not named by the package.",
        "inputs": [
            {"name": "z", "dtype": "f32", "shape": ["batch", LATENT]},
        ],
        "outputs": [
            {"name": "image", "dtype": "f32", "shape": ["batch", 3, 64, 64],
             "range": [-1.0, 1.0]},
        ],
        "batch": True,
        "extra": {"latent_size": LATENT, "image_range": [-1, 1]},
    }
    (HERE / "manifest.json").write_text(manifest_json(manifest))

    print(f"generateme {meta['version']} ({meta['license']}, {meta['author']}, "
          f"{meta['home_page']}): {meta['weights_path']}")
    print(f"parameters     {sum(p.numel() for p in generator.parameters()):,} "
          f"(+ BatchNorm running statistics)")
    print(f"ONNX ops       {', '.join(ops)}")
    for b in CHECK_BATCHES:
        print(f"batch {b:2d}       max |ORT - PyTorch| {diffs[b]:.2e}   "
              f"max |fast rewrite - PyTorch| {fast_diffs[b]:.2e}")
    print(f"reference      z {z_ref.shape} -> image {img_ref.shape}, "
          f"range [{img_ref.min():.3f}, {img_ref.max():.3f}]")
    print(f"samples.png    {(HERE / 'samples.png').stat().st_size} bytes")
    print(f"model.onnx     {len(data)} bytes, sha256 {sha}")


if __name__ == "__main__":
    sys.exit(main())
