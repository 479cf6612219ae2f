"""The domain-regularised latent optimiser as a plain Python loop over ONNX Runtime.

The baseline of `cargo bench --bench invert` (benches/invert.rs), which runs this script with
the same VJP models the Rust optimiser builds (the cached files in `models/<package>/.grad/`),
the same faces and starting codes, the same loss, the same Adam settings and the same number of
intra-op threads, and compares images per second.

Per step, for all images of a batch together:

    x = G(z)                      forward session of the generator
    e = E(x)                      forward session of the encoder
    L = mean((x - target)^2) + w mean((z - e)^2)            per image
    gx = 2 (x - target) / P  +  E_vjp(x, -2 w (z - e) / D)  VJP session of the encoder
    gz = G_vjp(z, gx) + 2 w (z - e) / D                     VJP session of the generator
    Adam on z (moments in float64, like the Rust optimiser)

The loss of a step comes from the forward passes the gradient needs anyway. Prints one JSON
object per batch size on stdout: batch, steps, seconds (the optimisation alone, after a
warm-up), initial and final mean loss, final mean pixel error and domain gap.

Usage:
    invert_python.py --generator G.onnx --generator-vjp GV.onnx --encoder E.onnx
                     --encoder-vjp EV.onnx --faces faces.npy --z0 z0.npy
                     [--batches 1,8,32] [--steps 100] [--threads 1] [--domain-weight 2]
                     [--lr 0.01]
"""

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class Vjp:
    """A VJP model: forward inputs plus `grad_in__<output>` in, `grad__<input>` out."""

    def __init__(self, path, threads):
        self.session = session(path, threads)
        names = [i.name for i in self.session.get_inputs()]
        self.cotangent = next(n for n in names if n.startswith("grad_in__"))
        self.input = next(n for n in names if not n.startswith("grad_in__"))
        self.grad = next(
            o.name for o in self.session.get_outputs() if o.name.startswith("grad__")
        )

    def __call__(self, x, cotangent):
        feed = {self.input: x, self.cotangent: cotangent}
        return self.session.run([self.grad], feed)[0]


class Forward:
    def __init__(self, path, threads):
        self.session = session(path, threads)
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def __call__(self, x):
        return self.session.run([self.output], {self.input: x})[0]


def optimise(g, g_vjp, e, e_vjp, target, z0, steps, lr, w, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam from z0; returns the codes and the per-image loss terms at every step."""
    n, d = z0.shape
    per_image = target[0].size
    z = z0.astype(np.float32).copy()
    m1 = np.zeros((n, d))
    m2 = np.zeros((n, d))
    curve = []

    def terms(z):
        x = g(z)
        ez = e(x)
        diff = x - target
        r = z - ez
        pixel = np.mean(diff.astype(np.float64).reshape(n, -1) ** 2, axis=1)
        domain = np.mean(r.astype(np.float64) ** 2, axis=1)
        return x, diff, r, pixel, domain

    for step in range(steps):
        x, diff, r, pixel, domain = terms(z)
        curve.append(pixel + w * domain)
        gx = diff * np.float32(2.0 / per_image)
        k = np.float32(2.0 * w / d)
        if w != 0.0:
            gx = gx + e_vjp(x, -k * r)
        gz = g_vjp(z, gx)
        if w != 0.0:
            gz = gz + k * r
        t = step + 1
        gz = gz.astype(np.float64)
        m1 = beta1 * m1 + (1.0 - beta1) * gz
        m2 = beta2 * m2 + (1.0 - beta2) * gz * gz
        update = lr * (m1 / (1.0 - beta1**t)) / (np.sqrt(m2 / (1.0 - beta2**t)) + eps)
        z = (z.astype(np.float64) - update).astype(np.float32)
    _, _, _, pixel, domain = terms(z)
    curve.append(pixel + w * domain)
    return z, np.array(curve), pixel, domain


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", required=True)
    p.add_argument("--generator-vjp", required=True)
    p.add_argument("--encoder", required=True)
    p.add_argument("--encoder-vjp", required=True)
    p.add_argument("--faces", required=True, help="f32 [N, 3, 64, 64] targets")
    p.add_argument("--z0", required=True, help="f32 [N, 100] starting codes")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--domain-weight", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.01)
    a = p.parse_args()

    g = Forward(a.generator, a.threads)
    g_vjp = Vjp(a.generator_vjp, a.threads)
    e = Forward(a.encoder, a.threads)
    e_vjp = Vjp(a.encoder_vjp, a.threads)
    faces = np.load(a.faces).astype(np.float32)
    z0 = np.load(a.z0).astype(np.float32)
    for batch in [int(b) for b in a.batches.split(",")]:
        if batch > len(faces):
            sys.exit(f"batch {batch} needs {batch} faces, {a.faces} has {len(faces)}")
        target, start = faces[:batch], z0[:batch]
        # Warm-up: first runs of a session at a new batch size allocate and plan.
        optimise(g, g_vjp, e, e_vjp, target, start, 2, a.lr, a.domain_weight)
        began = time.perf_counter()
        _, curve, pixel, domain = optimise(
            g, g_vjp, e, e_vjp, target, start, a.steps, a.lr, a.domain_weight
        )
        seconds = time.perf_counter() - began
        print(
            json.dumps(
                {
                    "batch": batch,
                    "steps": a.steps,
                    "seconds": seconds,
                    "loss_initial": float(curve[0].mean()),
                    "loss_final": float(curve[-1].mean()),
                    "pixel_final": float(pixel.mean()),
                    "domain_final": float(domain.mean()),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
