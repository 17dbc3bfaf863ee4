"""Image classification (ViT, DINOv2): labelled images, cross-entropy and accuracy as for text, with pixels
for inputs. Images are resized to --image-size (default: the model's) and cut into the model's patches; FLOPs
count the patch tokens plus the CLS token. A model without a trained head for the labels gets a fine-tuned
teacher first (vtrans.teacher), as for text."""
from __future__ import annotations

import torch
from transformers import AutoModelForImageClassification

from vtrans.arch import adapter_class_for
from vtrans.errors import UsageError
from vtrans.images import Pictures, image_processor, load_images
from vtrans.objectives.classification import Classification


class ImageClassification(Classification):
    name = "image"
    examples = "images"
    exports_onnx = False  # the ONNX export traces token inputs
    data_wanted = "a directory of class subfolders of images (DIR/<label>/<image>), or a datasets name"

    def auto_class(self):
        return AutoModelForImageClassification

    def files_beside(self, name):
        return {}

    def image_size(self, config, options) -> int:
        """Pixels a side: --image-size, checked against the model's patches and position embeddings."""
        family = adapter_class_for(config.model_type)
        if not family.vision:
            raise UsageError(f"--objective image needs a vision model (ViT, DINOv2); MODEL is a "
                             f"{config.model_type} model: use --objective classification for text")
        size = options.image_size or config.image_size
        if size % config.patch_size:
            raise UsageError(f"--image-size {size} is not a multiple of the model's {config.patch_size}-pixel "
                             f"patches; use {max(1, size // config.patch_size) * config.patch_size}")
        if not family.resizes_images and size != config.image_size:
            raise UsageError(f"--image-size {size}: this {config.model_type} model's position embeddings are for "
                             f"{config.image_size}-pixel images; use --image-size {config.image_size}")
        return size

    def load_processor(self, name, config, options):
        return image_processor(name, self.image_size(config, options))

    def head_settings(self, processor):
        return {}

    def tokens(self, config, options):
        return adapter_class_for(config.model_type).image_tokens(config, self.image_size(config, options))

    def latency_tokens(self, config, options):
        return self.tokens(config, options)  # an image has one size

    def random_inputs(self, config, options):
        side = self.image_size(config, options)
        generator = torch.Generator().manual_seed(0)
        shape = (options.latency_batch, config.num_channels, side, side)
        return {"pixel_values": torch.randn(shape, generator=generator)}

    def read(self, spec, split="train"):
        return load_images(spec, split)

    def encode(self, data, teacher, max_length):
        return Pictures(data, teacher.processor, teacher.label_map)
