"""Image data: a folder of class subfolders (DIR/<label>/<image file>) or a `datasets` image dataset (an
`image` or `img` column and a `label` column), batched as the model's image processor prepares pixels.

Images are decoded when a batch is drawn, not all at once: a dataset of full-size photos would not fit in
memory as tensors. Resizing and normalisation use the PIL image processor of transformers, which needs no
torchvision.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vtrans.data import Examples, read_dataset
from vtrans.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "img")
# ImageNet statistics: what ViT and DINOv2 checkpoints were trained with, for a model saved without a
# preprocessor config
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageTable:
    """Labelled images: file paths, or images already decoded (from `datasets`)."""

    images: list  # Path or PIL.Image
    labels: list
    source: str

    def __len__(self):
        return len(self.images)

    def subset(self, rows: list[int]) -> "ImageTable":
        return ImageTable([self.images[i] for i in rows], [self.labels[i] for i in rows], self.source)

    def identity(self) -> list:
        """What the data is, for a cache key: the files' paths, or a digest of each decoded image's pixels."""
        names = [str(image) if isinstance(image, Path) else hashlib.sha256(image.tobytes()).hexdigest()[:16]
                 for image in self.images]
        return [names, self.labels]


def load_images(spec: str, split: str = "train") -> ImageTable:
    """Read `spec`: a directory of class subfolders, or a `datasets` name (optionally `name:config`)."""
    path = Path(spec)
    if path.is_dir():
        return _read_folder(path)
    if path.exists():
        raise UsageError(f"--data {spec}: a file; give a directory of class subfolders of images "
                         "(DIR/<label>/<image>) or a datasets name")
    rows = read_dataset(spec, split)
    column = next((name for name in IMAGE_COLUMNS if rows and name in rows[0]), None)
    if column is None or "label" not in rows[0]:
        found = ", ".join(sorted(map(str, rows[0]))) if rows else "no rows"
        raise UsageError(f"--data {spec}: needs an image (or img) column and a label column (found: {found})")
    return ImageTable([row[column] for row in rows], [row["label"] for row in rows], spec)


def _read_folder(root: Path) -> ImageTable:
    images, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(file)
                labels.append(folder.name)
    if not images:
        raise UsageError(f"--data {root}: no images in class subfolders; lay it out as {root}/<label>/<image>"
                         f" ({', '.join(IMAGE_SUFFIXES)})")
    if len(set(labels)) < 2:
        raise UsageError(f"--data {root}: one class ({labels[0]}); a classifier needs images in at least two "
                         "class subfolders")
    return ImageTable(images, labels, str(root))


def image_processor(name: str, image_size: int):
    """The model's image processor settings (mean, std, rescaling) at `image_size` pixels a side; ImageNet
    statistics when the model was saved without a preprocessor config."""
    from transformers import ViTImageProcessorPil

    try:
        saved = ViTImageProcessorPil.get_image_processor_dict(name)[0]
    except OSError:  # no preprocessor_config.json beside the model
        saved = {}
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=saved.get("rescale_factor", 1 / 255),
        do_normalize=True,
        image_mean=saved.get("image_mean", IMAGENET_MEAN),
        image_std=saved.get("image_std", IMAGENET_STD),
    )


def _open(image, source: str):
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image, Path):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"--data {source}: {image} cannot be read as an image ({e}); remove or replace it") from None


class Pictures(Examples):
    """Labelled images; a batch is {pixel_values (B, 3, H, W), labels (B,)}."""

    def __init__(self, table: ImageTable, processor, label_map: dict):
        self.table = table
        self.processor = processor
        self.labels = [label_map[str(v)] for v in table.labels]

    @property
    def strata(self) -> list:
        return self.labels

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return _open(self.table.images[i], self.table.source), self.labels[i]

    def collate(self, items):
        pixels = self.processor([image for image, _ in items], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([label for _, label in items])}
