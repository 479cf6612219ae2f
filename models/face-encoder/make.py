#!/usr/bin/env python3
"""Train and export the face-encoder model package: a domain-guided encoder for face-dcgan.

Run from anywhere (about 20-25 minutes of one CPU core):
  bash scripts/setup-export.sh && .venv-export/bin/python models/face-encoder/make.py
Measure the committed model only (ONNX Runtime, no training, well under a minute):
  .venv-export/bin/python models/face-encoder/make.py --evaluate

The encoder E maps an image [B, 3, 64, 64] in [-1, 1] to a latent z [B, 100] such that the
frozen generator G of models/face-dcgan reconstructs it: G(E(x)) ~ x. It is the starting
point of in-domain inversion. Training (PyTorch, CPU, one thread, fixed seeds):

  pool     N_POOL latents z ~ N(0, I) and their faces G(z), made once;
  phase A  latent regression only: |E(G(z)) - z|^2 on the pool (EPOCHS_A passes);
  phase B  all terms, STEPS_B steps on batches made of
             generated faces G(z) from the pool: pixel MSE of G(E(x)) vs x + feature
               loss + latent regression |E(x) - z|^2,
             degraded copies of generated faces (grey, zoomed in, down to 25 px and back
               up, like the prepared LFW faces): pixel + feature loss,
             real faces 64..99 of scikit-image's LFW subset (random flip, shift, contrast):
               pixel + feature loss.

The feature network F is a frozen copy of the encoder's first three blocks as they are at
the end of phase A (eval mode, never updated afterwards): it has learned on generated
faces which local structures carry the latent code. The feature loss is, for each of its
three activations (32x32x32, 16x16x64, 8x8x128), the MSE of F(G(E(x))) vs F(x) divided by
the mean square of F(x), averaged over the three. The 64 real faces in data/faces/faces.npy
(LFW subset faces 0..63) are never trained on.

Writes:
  models/face-encoder/model.onnx, manifest.json, reference/inputs/image.npy (4 real faces
  from data/faces + 4 generated), reference/outputs/z.npy (ONNX Runtime, CPU),
  reconstructions.png.
"""

import argparse
import copy
import hashlib
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REF = HERE / "reference"
GEN_DIR = ROOT / "models" / "face-dcgan"
FACES_DIR = ROOT / "data" / "faces"


def _load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dcgan = _load_module("face_dcgan_make", GEN_DIR / "make.py")
faces_data = _load_module("faces_make", FACES_DIR / "make.py")

LATENT = 100
OPSET = 17
IR_VERSION = 9
MAX_ABS_DIFF = 1e-4
SEED_TRAIN = 20240620  # torch: pool latents, shuffling, augmentation, initial weights
SEED_EVAL = 20240621  # numpy: 256 held-out latents (and +1: the random-z baseline)
SEED_REFERENCE = 20240622  # numpy: the 4 generated reference inputs
SEED_PICTURE = 20240623  # numpy: the 8 generated faces in reconstructions.png
N_EVAL = 256

N_POOL = 12288  # generated training faces, made once
EPOCHS_A, BATCH_A, LR_A = 3, 64, 1e-3
STEPS_B, LR_B = 2000, 2.5e-4
BATCH_GEN, BATCH_GREY, BATCH_REAL = 10, 3, 3
WARMUP = 20
LAMBDA_FEAT = 0.05
LAMBDA_LATENT = 0.1
BN_MOMENTUM = 0.05


class Encoder(nn.Module):
    """64x64x3 -> 32x32x32 -> 16x16x64 -> 8x8x128 -> 4x4x256 -> 100.

    Four 4x4 stride-2 convolutions (BatchNorm after all but the first, LeakyReLU 0.2),
    then a 4x4 convolution without padding over the 4x4 map to 100 channels, which is a
    linear layer from the 4096 features (written as a convolution because Debian's CPU
    torch runs Linear through a slow generic BLAS and Conv2d through oneDNN).
    """

    def __init__(self):
        super().__init__()

        def block(cin, cout, bn):
            layers = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(cout, momentum=BN_MOMENTUM))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers)

        self.blocks = nn.ModuleList([
            block(3, 32, False), block(32, 64, True), block(64, 128, True), block(128, 256, True)
        ])
        self.head = nn.Conv2d(256, LATENT, 4, 1, 0)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x).flatten(1)


class FeatureNet(nn.Module):
    """A frozen copy of the encoder's first three blocks (eval mode): their activations at
    32x32, 16x16 and 8x8."""

    def __init__(self, enc):
        super().__init__()
        self.blocks = copy.deepcopy(enc.blocks[:3])
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode=True):  # stays in eval mode whatever its owner does
        return super().train(False)

    def forward(self, x):
        out = []
        for blk in self.blocks:
            x = blk(x)
            out.append(x)
        return out


def _phase_weight(w):
    """ConvTranspose2d(k=4, s=2, p=1) weight [Cin, Cout, 4, 4] as a 2x2 Conv2d weight
    [4*Cout, Cin, 2, 2], one group of Cout output channels per output phase (a, b).

    Output pixel (2i+a, 2j+b) sums inputs (i+dh, j+dw) with dh in {a-1, a}, dw in {b-1, b},
    through kernel tap (a+1-2dh, b+1-2dw). A 2x2 convolution over the input padded by 1
    gives, at position (p, q), the window of rows p-1..p and columns q-1..q; phase (a, b)
    reads it at (i+a, j+b).
    """
    cin, cout = w.shape[:2]
    k = w.new_zeros(2, 2, cout, cin, 2, 2)
    for a in range(2):
        for b in range(2):
            for u in range(2):
                for v in range(2):
                    dh, dw = u - 1 + a, v - 1 + b
                    k[a, b, :, :, u, v] = w[:, :, a + 1 - 2 * dh, b + 1 - 2 * dw].t()
    return k.reshape(4 * cout, cin, 2, 2).contiguous()


class PhaseGenerator(nn.Module):
    """face-dcgan's generator (eval mode) for training through it on a CPU.

    The same function as dcgan.FastGenerator, with each stride-2 transposed convolution
    written as one 2x2 convolution to 4x the channels followed by interleaving the four
    output phases: 16 multiply-adds per output value instead of the 36 of FastGenerator's
    3x3 sub-pixel form, about 1.5x faster here. Frozen buffers only; checked against
    FastGenerator before training.
    """

    def __init__(self, generator):
        super().__init__()
        fast = dcgan.FastGenerator(generator)
        self.register_buffer("w1", fast.w1.clone())
        for i in (1, 2, 3, 4):
            self.register_buffer(f"s{i}", getattr(fast, f"s{i}").clone())
            self.register_buffer(f"t{i}", getattr(fast, f"t{i}").clone())
        for i in (2, 3, 4, 5):
            w = getattr(generator, f"convTr{i}").weight.detach()
            self.register_buffer(f"w{i}", _phase_weight(w))

    @staticmethod
    def _up(x, w):
        y = F.conv2d(x, w, padding=1)  # [B, 4*C, H+1, W+1]
        b, c4, h1, w1 = y.shape
        h, wd, c = h1 - 1, w1 - 1, c4 // 4
        y = y.view(b, 2, 2, c, h1, w1)
        rows = [torch.stack([y[:, a, bb, :, a:a + h, bb:bb + wd] for bb in range(2)], -1)
                for a in range(2)]
        return torch.stack(rows, -3).reshape(b, c, 2 * h, 2 * wd)  # [B, C, H, a, W, b]

    def forward(self, z):
        x = F.conv2d(z.reshape(-1, LATENT, 1, 1), self.w1).reshape(-1, 512, 4, 4)
        x = F.relu(x * self.s1 + self.t1)
        for i in (2, 3, 4):
            x = F.relu(self._up(x, getattr(self, f"w{i}")) * getattr(self, f"s{i}")
                       + getattr(self, f"t{i}"))
        return torch.tanh(self._up(x, self.w5))


def feature_loss(fnet, recon, target):
    """Mean over the three layers of MSE(F(recon), F(target)) / mean square of F(target)."""
    with torch.no_grad():
        want = fnet(target)
    got = fnet(recon)
    return sum(F.mse_loss(g, w) / w.square().mean().clamp_min(1e-8)
               for g, w in zip(got, want)) / len(got)


def grey_degrade(x, gen):
    """Generated faces made to look like the prepared LFW faces, which are tighter crops
    (the face fills the frame), grey and blurred: grey, a square crop of 36..60 px near
    the centre (up to 4 px off), down to 25x25 (area) and back to 64x64 (bicubic)."""
    n = x.shape[0]
    y = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    sizes = torch.randint(36, 61, (n,), generator=gen)
    jitter = torch.randint(-4, 5, (n, 2), generator=gen)
    out = []
    for i in range(n):
        s = int(sizes[i])
        oy, ox = (min(max((64 - s) // 2 + int(j), 0), 64 - s) for j in jitter[i])
        crop = y[i:i + 1, :, oy:oy + s, ox:ox + s]
        small = F.interpolate(crop, size=(25, 25), mode="area")
        out.append(F.interpolate(small, size=(64, 64), mode="bicubic", align_corners=False))
    return torch.cat(out).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous()


def augment_real(x, gen):
    """Random horizontal flip, shift by up to 3 px (edge padding), contrast/brightness."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (3, 3, 3, 3), mode="replicate")
    shifts = torch.randint(0, 7, (n, 2), generator=gen)
    x = torch.stack([padded[i, :, sy:sy + 64, sx:sx + 64]
                     for i, (sy, sx) in enumerate(shifts.tolist())])
    gain = 0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen)
    bias = 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return (x * gain + bias).clamp(-1, 1)


def schedule(step, total, lr):
    """Linear warm-up over WARMUP steps, then cosine decay to 2% at `total`."""
    if step <= WARMUP:
        return lr * step / WARMUP
    t = (step - WARMUP) / max(1, total - WARMUP)
    return lr * (0.02 + 0.98 * 0.5 * (1.0 + np.cos(np.pi * t)))


def make_pool(gfast, gen, log):
    z = torch.randn(N_POOL, LATENT, generator=gen)
    x = torch.empty(N_POOL, 3, 64, 64)
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, N_POOL, 256):
            x[i:i + 256] = gfast(z[i:i + 256])
    log(f"pool: {N_POOL} generated faces in {time.time() - t0:.0f} s")
    return z, x


def train_phase_a(enc, pool_z, pool_x, gen, log):
    steps_per_epoch = N_POOL // BATCH_A
    total = EPOCHS_A * steps_per_epoch
    opt = torch.optim.Adam(enc.parameters(), lr=LR_A)
    enc.train()
    t0 = time.time()
    step = 0
    for epoch in range(EPOCHS_A):
        order = torch.randperm(N_POOL, generator=gen)
        run = 0.0
        for k in range(steps_per_epoch):
            step += 1
            for group in opt.param_groups:
                group["lr"] = schedule(step, total, LR_A)
            idx = order[k * BATCH_A:(k + 1) * BATCH_A]
            loss = F.mse_loss(enc(pool_x[idx]), pool_z[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += loss.item()
            if step % 48 == 0:
                log(f"A {step:4d}/{total}  latent {run / 48:.4f}  ({time.time() - t0:.0f} s)")
                run = 0.0
    return time.time() - t0


def train_phase_b(enc, gfast, pool_z, pool_x, real_train, gen, log):
    fnet = FeatureNet(enc)
    opt = torch.optim.Adam(enc.parameters(), lr=LR_B)
    enc.train()
    ng, nd, nr = BATCH_GEN, BATCH_GREY, BATCH_REAL
    t0 = time.time()
    acc = np.zeros(6)
    for step in range(1, STEPS_B + 1):
        for group in opt.param_groups:
            group["lr"] = schedule(step, STEPS_B, LR_B)
        idx = torch.randint(0, N_POOL, (ng + nd,), generator=gen)
        z = pool_z[idx[:ng]]
        with torch.no_grad():
            x_gen = pool_x[idx[:ng]]
            x_grey = grey_degrade(pool_x[idx[ng:]], gen)
            pick = torch.randint(0, real_train.shape[0], (nr,), generator=gen)
            x_real = augment_real(real_train[pick], gen)
        x = torch.cat([x_gen, x_grey, x_real])
        z_hat = enc(x)
        recon = gfast(z_hat)
        pix = F.mse_loss(recon, x)
        feat = feature_loss(fnet, recon, x)
        lat = F.mse_loss(z_hat[:ng], z)
        loss = pix + LAMBDA_FEAT * feat + LAMBDA_LATENT * lat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            se = (recon - x).square().mean(dim=(1, 2, 3))
        acc += [pix.item(), se[:ng].mean().item(), se[ng:ng + nd].mean().item(),
                se[ng + nd:].mean().item(), feat.item(), lat.item()]
        if step % 50 == 0:
            m = acc / 50
            acc[:] = 0
            log(f"B {step:4d}/{STEPS_B}  pixel {m[0]:.4f} (gen {m[1]:.4f} grey {m[2]:.4f} "
                f"real {m[3]:.4f})  feature {m[4]:.4f}  latent {m[5]:.4f}  "
                f"({time.time() - t0:.0f} s)")
    return time.time() - t0


def export_onnx(enc, path):
    import onnx

    enc.eval()
    torch.onnx.export(
        enc,
        torch.zeros(2, 3, 64, 64),
        str(path),
        input_names=["image"],
        output_names=["z"],
        dynamic_axes={"image": {0: "batch"}, "z": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL,
    )
    enc.eval()  # the exporter may leave modules in training mode
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    model.producer_name = "latentflow models/face-encoder/make.py"
    model.doc_string = ("Domain-guided encoder for face-dcgan: image [batch, 3, 64, 64] in "
                        "[-1, 1] -> latent z [batch, 100]")
    onnx.checker.check_model(model, full_check=True)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, dims(inp)) == ("image", ["batch", 3, 64, 64]), dims(inp)
    assert (out.name, dims(out)) == ("z", ["batch", LATENT]), dims(out)
    data = model.SerializeToString(deterministic=True)
    path.write_bytes(data)
    return model, data


def psnr(mse):
    return float(10.0 * np.log10(1.0 / mse))


def recon_stats(x, recon):
    """Images mapped from [-1, 1] to [0, 1]; MSE over all pixels and channels of the set,
    the PSNR of that MSE, and the mean of the per-image PSNRs."""
    se = (((recon - x) / 2.0) ** 2).reshape(len(x), -1).mean(axis=1)
    mse = float(se.mean())
    return {"mse": mse, "psnr": psnr(mse), "psnr_per_image": float(np.mean(10 * np.log10(1 / se)))}


def latent_stats(z_hat, z):
    dz = z_hat - z
    zn = np.linalg.norm(z, axis=1)
    hn = np.linalg.norm(z_hat, axis=1)
    cos = (z_hat * z).sum(1) / np.maximum(hn, 1e-12) / zn
    return {
        "mse": float((dz ** 2).mean()),
        "l2": float(np.linalg.norm(dz, axis=1).mean()),
        "l2_rel": float((np.linalg.norm(dz, axis=1) / zn).mean()),
        "cos": float(cos.mean()),
        "zhat_norm": float(hn.mean()),
        "z_norm": float(zn.mean()),
    }


def evaluate(enc_path, gen_path):
    """Figures for the README, from the ONNX files through ONNX Runtime (CPU)."""
    g = dcgan.ort_session(gen_path)
    e = dcgan.ort_session(enc_path)

    def G(z):
        return np.concatenate([g.run(["image"], {"z": z[i:i + 64]})[0]
                               for i in range(0, len(z), 64)])

    def E(x):
        return e.run(["z"], {"image": x})[0]

    z = dcgan.latents(SEED_EVAL, N_EVAL)
    x_gen = G(z)
    z_hat = E(x_gen)
    real = np.load(FACES_DIR / "faces.npy")
    z_real = E(real)
    mean_face = G(np.zeros((1, LATENT), np.float32))
    rand = G(dcgan.latents(SEED_EVAL + 1, len(real)))
    d = ((real[:, None] - x_gen[None]) ** 2).reshape(len(real), N_EVAL, -1).mean(-1)
    return {
        "generated": recon_stats(x_gen, G(z_hat)),
        "real": recon_stats(real, G(z_real)),
        "latent": latent_stats(z_hat, z),
        "real_zhat_norm": float(np.linalg.norm(z_real, axis=1).mean()),
        # Baselines: no encoder at all.
        "generated_zero_z": recon_stats(x_gen, np.broadcast_to(mean_face, x_gen.shape)),
        "real_zero_z": recon_stats(real, np.broadcast_to(mean_face, real.shape)),
        "real_random_z": recon_stats(real, rand),
        "real_nearest_of_256": recon_stats(real, x_gen[d.argmin(1)]),
        "latent_zero": latent_stats(np.zeros_like(z), z),
    }


def print_figures(fig, title):
    g, r, lat = fig["generated"], fig["real"], fig["latent"]
    print(f"== {title}")
    print(f"generated (256 held-out z): G(E(x)) MSE {g['mse']:.5f}  PSNR {g['psnr']:.2f} dB "
          f"(mean per image {g['psnr_per_image']:.2f} dB)")
    print(f"real (data/faces, 64):      G(E(x)) MSE {r['mse']:.5f}  PSNR {r['psnr']:.2f} dB "
          f"(mean per image {r['psnr_per_image']:.2f} dB)")
    print(f"latent |E(G(z)) - z|:       mean square per dim {lat['mse']:.4f}, mean L2 "
          f"{lat['l2']:.3f} (|z| {lat['z_norm']:.3f}, relative {lat['l2_rel']:.3f}), "
          f"cosine {lat['cos']:.3f}, |E(G(z))| {lat['zhat_norm']:.3f}")
    print(f"|E(x)| on real faces:       {fig['real_zhat_norm']:.3f}")
    for key in ("generated_zero_z", "real_zero_z", "real_random_z", "real_nearest_of_256"):
        s = fig[key]
        print(f"baseline {key:20s} MSE {s['mse']:.5f}  PSNR {s['psnr']:.2f} dB "
              f"(mean per image {s['psnr_per_image']:.2f} dB)")
    lz = fig["latent_zero"]
    print(f"baseline latent_zero          mean square per dim {lz['mse']:.4f}, "
          f"mean L2 {lz['l2']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evaluate", action="store_true",
                    help="only measure the committed model.onnx")
    ap.add_argument("--trial", type=int, nargs=3, metavar=("POOL", "EPOCHS_A", "STEPS_B"),
                    help="a short trial run (writes nothing but prints figures)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    enc_path = HERE / "model.onnx"
    gen_path = GEN_DIR / "model.onnx"
    if args.evaluate:
        print_figures(evaluate(enc_path, gen_path), "committed model.onnx (ONNX Runtime)")
        return
    if args.trial:
        global N_POOL, EPOCHS_A, STEPS_B
        N_POOL, EPOCHS_A, STEPS_B = args.trial

    def log(s):
        print(s, file=sys.stderr, flush=True)

    generator, _meta = dcgan.load_generator()
    gfast = PhaseGenerator(generator).eval()
    with torch.no_grad():
        zc = torch.from_numpy(dcgan.latents(SEED_EVAL + 7, 16))
        gdiff = float((gfast(zc) - dcgan.FastGenerator(generator)(zc)).abs().max())
    assert gdiff <= MAX_ABS_DIFF, gdiff
    real_train = torch.from_numpy(faces_data.prepare_faces(faces_data.TRAIN))
    held_out = np.load(FACES_DIR / "faces.npy")
    assert np.array_equal(held_out, faces_data.prepare_faces(faces_data.EVAL)), \
        "data/faces/faces.npy is stale: run data/faces/make.py"
    assert not set(faces_data.TRAIN) & set(faces_data.EVAL)

    gen = torch.Generator().manual_seed(SEED_TRAIN)
    torch.manual_seed(SEED_TRAIN)
    cpu0 = time.process_time()
    pool_z, pool_x = make_pool(gfast, gen, log)
    enc = Encoder()
    secs_a = train_phase_a(enc, pool_z, pool_x, gen, log)
    with tempfile.TemporaryDirectory() as tmp:
        path_a = Path(tmp) / "phase-a.onnx"
        export_onnx(copy.deepcopy(enc), path_a)
        fig_a = evaluate(path_a, gen_path)
    print_figures(fig_a, "after phase A (latent regression only), ONNX Runtime")
    secs_b = train_phase_b(enc, gfast, pool_z, pool_x, real_train, gen, log)
    cpu = time.process_time() - cpu0
    del pool_x
    enc.eval()
    log(f"training: phase A {secs_a:.0f} s, phase B {secs_b:.0f} s, "
        f"{cpu / 60:.1f} CPU-minutes in all")

    out_path = enc_path
    if args.trial:
        out_path = Path(tempfile.mkdtemp()) / "trial.onnx"
    model, data = export_onnx(enc, out_path)
    sha = hashlib.sha256(data).hexdigest()
    n_params = sum(p.numel() for p in enc.parameters())

    # ONNX Runtime against the eval-mode PyTorch encoder: generated faces at batch 32, the
    # real faces at batch 64, and batch 1.
    sess = dcgan.ort_session(out_path)
    g_sess = dcgan.ort_session(gen_path)
    x_check = np.concatenate([
        g_sess.run(["image"], {"z": dcgan.latents(SEED_EVAL + 7, 32)})[0], held_out])
    with torch.no_grad():
        want = enc(torch.from_numpy(x_check)).numpy()
    got = np.concatenate([sess.run(["z"], {"image": x_check[:32]})[0],
                          sess.run(["z"], {"image": x_check[32:]})[0]])
    one = sess.run(["z"], {"image": x_check[:1]})[0]
    diff = float(np.abs(got - want).max())
    diff1 = float(np.abs(one - want[:1]).max())
    if max(diff, diff1) > MAX_ABS_DIFF:
        raise SystemExit(f"ONNX Runtime vs PyTorch: max |diff| {diff:.3g} (batches 32, 64), "
                         f"{diff1:.3g} (batch 1) > {MAX_ABS_DIFF}")

    fig = evaluate(out_path, gen_path)
    print_figures(fig, "final model (ONNX Runtime)")
    print(f"ORT vs PyTorch max |diff| {diff:.2e} (batches 32 and 64), {diff1:.2e} (batch 1)")
    print(f"training {cpu / 60:.1f} CPU-minutes (phase A {secs_a:.0f} s, phase B "
          f"{secs_b:.0f} s wall), {n_params:,} parameters")
    if args.trial:
        return

    # Reference: 4 held-out real faces and 4 generated faces.
    x_ref = np.concatenate([held_out[:4], g_sess.run(
        ["image"], {"z": dcgan.latents(SEED_REFERENCE, 4)})[0]]).astype(np.float32)
    z_ref = sess.run(["z"], {"image": x_ref})[0]
    dcgan.save_npy(REF / "inputs" / "image.npy", x_ref)
    dcgan.save_npy(REF / "outputs" / "z.npy", z_ref)

    # Picture: rows of 8 held-out real faces and their reconstructions (faces 0..15), then
    # 8 generated faces (held-out latents) and theirs.
    x_gen8 = g_sess.run(["image"], {"z": dcgan.latents(SEED_PICTURE, 8)})[0]
    rows = []
    for x in (held_out[0:8], held_out[8:16], x_gen8):
        rec = g_sess.run(["image"], {"z": sess.run(["z"], {"image": x})[0]})[0]
        rows += [x, rec]
    dcgan.save_png(HERE / "reconstructions.png",
                   dcgan.grid(dcgan.to_uint8(np.concatenate(rows)), 8))

    g, r = fig["generated"], fig["real"]
    manifest = {
        "name": "face-encoder",
        "description": "Domain-guided encoder for face-dcgan: a 64x64 RGB image in [-1, 1] "
        "-> a latent z of 100 values whose generated face reconstructs it (the starting "
        "point of in-domain inversion).",
        "file": "model.onnx",
        "sha256": sha,
        "origin": "Trained from scratch in PyTorch on CPU by models/face-encoder/make.py "
        f"(seed {SEED_TRAIN}, {cpu / 60:.0f} CPU-minutes) against the frozen face-dcgan "
        f"generator: {EPOCHS_A} epochs of latent regression |E(G(z)) - z|^2 on {N_POOL} "
        f"generated faces, then {STEPS_B} steps of pixel MSE + feature loss (a frozen copy "
        "of the encoder's first three blocks) + latent regression, on generated faces, "
        "degraded grey copies of them and real faces 64..99 of scikit-image's LFW subset "
        f"(faces 0..63, data/faces, held out); exported with torch.onnx (opset {OPSET}, IR "
        f"{IR_VERSION}), ONNX Runtime matches PyTorch to {max(diff, diff1):.1e}. PSNR of "
        f"G(E(x)) (images in [0, 1]): {g['psnr']:.1f} dB on 256 held-out generated faces "
        f"(z = 0: {fig['generated_zero_z']['psnr']:.1f} dB), {r['psnr']:.1f} dB on the 64 "
        f"real faces of data/faces (z = 0: {fig['real_zero_z']['psnr']:.1f} dB); "
        f"|E(G(z)) - z|^2 per dimension {fig['latent']['mse']:.2f} (z = 0: "
        f"{fig['latent_zero']['mse']:.2f}).",
        "licence": "Model: made in this project. Trained through the face-dcgan generator "
        "(generateme 0.1.2, MIT) and on 36 LFW face crops shipped in scikit-image "
        "(BSD-3-Clause package; LFW photographs from news sites, no licence of their own, "
        "see data/faces/README.md).",
        "inputs": [
            {"name": "image", "dtype": "f32", "shape": ["batch", 3, 64, 64],
             "range": [-1.0, 1.0]},
        ],
        "outputs": [
            {"name": "z", "dtype": "f32", "shape": ["batch", LATENT]},
        ],
        "batch": True,
        "extra": {"latent_size": LATENT, "generator": "face-dcgan"},
    }
    (HERE / "manifest.json").write_text(dcgan.manifest_json(manifest))
    print(f"reconstructions.png {(HERE / 'reconstructions.png').stat().st_size} bytes")
    print(f"model.onnx     {len(data)} bytes, sha256 {sha}")


if __name__ == "__main__":
    sys.exit(main())
