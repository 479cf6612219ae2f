#!/usr/bin/env python3
"""Prepare real face photographs in the input format of models/face-dcgan and face-encoder.

Run from anywhere:
  bash scripts/setup-export.sh && .venv-export/bin/python data/faces/make.py

Source: scikit-image's bundled `skimage.data.lfw_subset()` (the file
skimage/data/lfw_subset.npy ships inside the scikit-image 0.22.0 wheel, nothing is
downloaded; its sha256 is checked below): 200 greyscale 25x25 crops from Labeled Faces in
the Wild, of which only the first 100 are faces (the other 100 are non-face patches).

Writes:
  data/faces/faces.npy   float32 [64, 3, 64, 64] in [-1, 1]: faces 0..63 of lfw_subset
  data/faces/faces.png   contact sheet of them, 8 x 8

Faces 64..99 are not stored: models/face-encoder/make.py prepares them with
`prepare_faces()` below and uses them for training, so that these 64 stay held out.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent

# sha256 of skimage/data/lfw_subset.npy in scikit-image 0.22.0 (as in the wheel's RECORD).
LFW_SUBSET_SHA256 = "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c"
N_FACES = 100  # lfw_subset(): rows 0..99 are faces, 100..199 are not
EVAL = range(0, 64)  # stored here, held out from encoder training
TRAIN = range(64, 100)  # for models/face-encoder training only
SIZE = 64


def lfw_faces():
    """The 100 face crops of scikit-image's LFW subset, float64 [100, 25, 25] in [0, 1]."""
    import skimage
    from skimage import data

    raw = (Path(skimage.__file__).parent / "data" / "lfw_subset.npy").read_bytes()
    if hashlib.sha256(raw).hexdigest() != LFW_SUBSET_SHA256:
        raise SystemExit("skimage/data/lfw_subset.npy differs from scikit-image 0.22.0's: "
                         "run bash scripts/setup-export.sh")
    images = data.lfw_subset()
    assert images.shape == (200, 25, 25) and images.dtype == np.float64, images.dtype
    assert images.min() >= 0.0 and images.max() <= 1.0
    return images[:N_FACES]


def prepare_faces(indices):
    """Faces `indices` of the subset as float32 [N, 3, 64, 64] in [-1, 1].

    Each 25x25 crop is upsampled to 64x64 with a Lanczos filter (PIL, in 32-bit float, so
    nothing is rounded to 8 bits), clipped to [0, 1] (Lanczos overshoots at edges),
    mapped to [-1, 1] and repeated over the three colour channels.
    """
    faces = lfw_faces()
    out = np.empty((len(indices), 3, SIZE, SIZE), np.float32)
    for row, i in enumerate(indices):
        im = Image.fromarray(faces[i].astype(np.float32), mode="F")
        up = np.asarray(im.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)
        out[row] = np.clip(up, 0.0, 1.0)[None] * 2.0 - 1.0
    return out


def contact_sheet(images, cols=8, pad=2):
    """[N, 3, H, W] in [-1, 1] -> greyscale uint8 sheet (channel 0; all three are equal)."""
    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 255, np.uint8)
    u8 = np.rint(np.clip((images[:, 0] + 1.0) * 127.5, 0, 255)).astype(np.uint8)
    for k, im in enumerate(u8):
        r, c = divmod(k, cols)
        sheet[pad + r * (h + pad):pad + r * (h + pad) + h,
              pad + c * (w + pad):pad + c * (w + pad) + w] = im
    return sheet


def main():
    faces = prepare_faces(EVAL)
    assert faces.shape == (len(EVAL), 3, SIZE, SIZE) and faces.dtype == np.float32
    assert faces.min() >= -1.0 and faces.max() <= 1.0
    assert np.array_equal(faces[:, 0], faces[:, 1]) and np.array_equal(faces[:, 0], faces[:, 2])
    np.save(HERE / "faces.npy", faces, allow_pickle=False)
    Image.fromarray(contact_sheet(faces)).save(HERE / "faces.png", optimize=True)

    # The held-out faces are other crops than the training ones, and none is a copy of one.
    assert not set(EVAL) & set(TRAIN)
    crops = lfw_faces().reshape(N_FACES, -1)
    d = ((crops[list(EVAL), None] - crops[None, list(TRAIN)]) ** 2).mean(-1)
    assert d.min() > 0.005, d.min()

    raw = (HERE / "faces.npy").read_bytes()
    print(f"faces.npy  {faces.shape} float32, range [{faces.min():.3f}, {faces.max():.3f}], "
          f"mean {faces.mean():.3f}, {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}")
    print(f"faces.png  {(HERE / 'faces.png').stat().st_size} bytes")
    print(f"closest held-out/training pair of crops: MSE {d.min():.4f} "
          f"(median over pairs {np.median(d):.4f}, pixels in [0, 1])")


if __name__ == "__main__":
    sys.exit(main())
