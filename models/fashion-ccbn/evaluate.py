#!/usr/bin/env python3
"""Measure the committed fashion-ccbn generator without retraining it (a few CPU-minutes).

    .venv-export/bin/python models/fashion-ccbn/evaluate.py

Uses make.py's own pieces: trains make.py's evaluation classifier (a small CNN, CLF_STEPS
steps on the 60,000 real training images; the generator is not touched), reports its accuracy
on the 10,000 real test images, then the share of 100 generated samples per class (ONNX
Runtime, committed model.onnx, make.py's sample seed) that it assigns to the intended class.
The classifier's initial weights come from torch's global generator seeded with make.py's
SEED here, not from the state make.py leaves it in after GAN training, so the figures can
differ from make.py's printout by a few tenths of a percent.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("fashion_ccbn_make", HERE / "make.py")
mk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mk)
np, torch = mk.np, mk.torch


def main():
    manifest = json.loads((HERE / "manifest.json").read_text())
    data = (HERE / "model.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"], "model.onnx != manifest"
    torch.set_num_threads(mk.THREADS)
    torch.manual_seed(mk.SEED)
    torch.use_deterministic_algorithms(True)
    x, labels = mk.load_split("train")
    x_test, labels_test = mk.load_split("t10k")
    clf, real_acc = mk.train_classifier(x, labels, x_test, labels_test)
    sess = mk.ort_session(HERE / "model.onnx")
    gen_labels = np.repeat(np.arange(mk.N_CLASSES), 100)
    fake = torch.from_numpy(mk.generate(sess, gen_labels, mk.SEED + 6))
    with torch.no_grad():
        pred = clf(fake).argmax(1).numpy()
    per_class = {mk.CLASSES[c]: float((pred[gen_labels == c] == c).mean())
                 for c in range(mk.N_CLASSES)}
    print(json.dumps({"classifier_real_test_accuracy": real_acc,
                      "generated_recognised": float((pred == gen_labels).mean()),
                      "per_class": per_class}, indent=1))


if __name__ == "__main__":
    main()
