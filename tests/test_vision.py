"""Vision families (ViT, DINOv2): a patch Conv2d, a CLS token and position vectors write the hidden dims (DINOv2
adds LayerScale and a classifier over [CLS, mean patch]); the same invariants as every text family (cut =
masked, cost = real parameters, reload with and without vtrans)."""
import copy
import json
import re
import shutil

import pytest
import torch
import transformers
from conftest import random_kept, tiny_model
from PIL import Image
from test_methods import assert_each_fit_is_stationary
from test_surgery import masked_logits, random_scale

from vtrans import compress, load
from vtrans.arch import adapter_for
from vtrans.budget import exact_cost, parse_target
from vtrans.data import Examples
from vtrans.errors import UsageError
from vtrans.images import load_images
from vtrans.methods.base import Job
from vtrans.methods.rescale import RescaleSettings, rescale
from vtrans.methods.vtrans import VTransSettings
from vtrans.objectives import objective_for
from vtrans.objectives.image_classification import ImageClassification
from vtrans.surgery import cut_model, masked_values, save
from vtrans.training import TeacherOutputs

VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=16,
           patch_size=4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VISION = {
    "vit": ("ViTForImageClassification", "ViTConfig", VIT),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config",
               {k: v for k, v in VIT.items() if k != "intermediate_size"} | dict(mlp_ratio=2, layerscale_value=0.5)),
}


def vit_model(kind: str):
    model_class, config_class, config = VISION[kind]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    return model, adapter_for(model), {"pixel_values": torch.randn(2, 3, 16, 16)}


@pytest.fixture(params=list(VISION))
def vit(request):
    return vit_model(request.param)


def test_a_cut_vit_gives_the_masked_logits_and_counts_its_real_parameters(vit):
    model, adapter, images = vit
    kept, scale = random_kept(adapter), random_scale(adapter)
    z, hidden_keep = masked_values(kept, adapter.dims(), scale)
    masked = masked_logits(model, adapter, z, hidden_keep, images)
    cost = exact_cost(adapter, kept, seq_len=17)
    cut_model(adapter, kept, scale)
    with torch.no_grad():
        cut = model(**images).logits
    assert torch.allclose(cut, masked, atol=1e-5), (cut - masked).abs().max()
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    assert model.base_model.embeddings.cls_token.shape[-1] == len(kept.hidden)


def test_a_cut_vit_reloads_with_vtrans_and_with_trust_remote_code(vit, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model, adapter, images = vit
    cut_model(adapter, random_kept(adapter))
    save(model, None, tmp_path / "out")
    with torch.no_grad():
        expected = model(**images).logits
        ours = load(tmp_path / "out")(**images).logits
        remote = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out", trust_remote_code=True)
        theirs = remote.eval()(**images).logits
    assert torch.allclose(ours, expected, atol=1e-5) and torch.allclose(theirs, expected, atol=1e-5)


def test_vit_flops_count_the_patch_projection_on_every_patch():
    adapter = adapter_for(transformers.ViTForImageClassification(transformers.ViTConfig(**VIT)))
    minimal = adapter.minimal_kept()  # one hidden dim, no blocks: the projection on each patch, the head on the CLS
    patches, weights_per_dim = 16, 3 * 4 * 4 + 1  # a 4 x 4 patch of 3 channels, and the bias
    assert exact_cost(adapter, minimal, seq_len=17)["flops"] == 2 * patches * weights_per_dim + 2 * VIT["num_labels"]


# --- the image objective: a folder of class subfolders, end to end -------------------------------------------

BRIGHTNESS = {"dark": 40, "mid": 120, "light": 200}  # three classes a tiny model can tell apart


def write_image_folder(root, per_class: int = 24, side: int = 12):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label, level in BRIGHTNESS.items():
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = (level + 30 * torch.randn(side, side, 3, generator=generator)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """A DINOv2 backbone without a head (so vtrans fine-tunes a teacher) and a folder of 3 x 24 images."""
    root = tmp_path_factory.mktemp("images")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(**{k: v for k, v in VISION["dinov2"][2].items() if k != "num_labels"})
    transformers.Dinov2Model(config).save_pretrained(root / "backbone")
    return root / "backbone", write_image_folder(root / "data")


IMAGE_RUN = dict(objective="image", batch_size=8, teacher_epochs=6, teacher_lr=1e-3, latency_batch=2,
                 checkpoint_every=0, say=lambda message: None)


@pytest.mark.parametrize("method", ["vtrans", "fast-vtrans", "faster-vtrans", "optin", "fisher", "magnitude",
                                    "random"])
def test_every_method_compresses_a_vision_model_on_an_image_folder(image_data, tmp_path, monkeypatch, method):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path.parent / "vision-cache"))  # one teacher for every method
    backbone, folder = image_data
    result = compress(str(backbone), str(folder), target="flops=0.5", method=method, out=tmp_path / "out",
                      prune_epochs=1, **IMAGE_RUN)
    report = result.report
    # images were read with their labels: the fine-tuned teacher tells the brightness classes apart
    assert report["dense"]["metric"]["accuracy"] == 1.0
    assert report["budget"]["met"] and report["target"]["seq_len"] == 17  # 4 x 4 patches of 4 pixels + CLS
    assert report["compressed"]["flops"] <= 0.5 * report["dense"]["flops"]
    saved = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 16, "width": 16}


def test_a_compressed_vision_model_reloads_with_its_image_processor(image_data, tmp_path, monkeypatch):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path.parent / "vision-cache"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    backbone, folder = image_data
    compress(str(backbone), str(folder), target="flops=0.5", method="fisher", out=tmp_path / "out", **IMAGE_RUN)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
    images = [Image.open(path).convert("RGB") for path in sorted((folder / "light").iterdir())[:3]]
    inputs = processor(images, return_tensors="pt")
    remote = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out", trust_remote_code=True)
    with torch.no_grad():
        ours = load(tmp_path / "out")(**inputs).logits
        theirs = remote.eval()(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    light = remote.config.label2id["light"]
    assert (theirs.argmax(-1) == light).all()


def test_the_teacher_remembers_an_image_by_its_pixels():
    model, _, _ = vit_model("vit")
    teacher = TeacherOutputs(model, objective_for("image"), max_bytes=1 << 20)
    images = {"pixel_values": torch.randn(3, 3, 16, 16)}
    first = teacher(dict(images))
    again = teacher(dict(images))
    other = teacher({"pixel_values": images["pixel_values"].flip(0)})
    assert teacher.forwards == 1  # the second and the reordered batch came from memory
    assert torch.equal(first.outputs, again.outputs) and torch.equal(other.outputs, first.outputs.flip(0))
    assert all(torch.allclose(a, b) for a, b in zip(first.hidden_states, again.hidden_states))


@pytest.mark.parametrize("model_kind, options, message", [
    ("vit", dict(image_size=32), "position embeddings are for 16-pixel images; use --image-size 16"),
    ("dinov2", dict(image_size=18), "not a multiple of the model's 4-pixel patches; use 16"),
    ("bert", {}, "--objective image needs a vision model"),
    ("dinov2", dict(quantize="int8"), "--quantize: the ONNX export takes token inputs"),
])
def test_image_runs_that_cannot_work_are_refused_before_training(tmp_path, model_kind, options, message):
    if model_kind == "bert":
        model = tiny_model("bert")
    else:
        model, _, _ = vit_model(model_kind)
    model.save_pretrained(tmp_path / "model")
    write_image_folder(tmp_path / "data", per_class=2)
    with pytest.raises(UsageError, match=re.escape(message)):
        compress(str(tmp_path / "model"), str(tmp_path / "data"), out=tmp_path / "out", **IMAGE_RUN | options)


def test_image_folders_without_classes_are_refused(tmp_path):
    write_image_folder(tmp_path / "data", per_class=1)
    with pytest.raises(UsageError, match="no images in class subfolders"):
        load_images(str(tmp_path / "data" / "dark"))  # images, but no class subfolders
    for label in ("mid", "light"):
        shutil.rmtree(tmp_path / "data" / label)
    with pytest.raises(UsageError, match="one class"):
        load_images(str(tmp_path / "data"))


def test_a_datasets_image_dataset_is_read_by_its_image_and_label_columns(monkeypatch):
    pictures = [Image.new("RGB", (8, 8), color=(level, level, level)) for level in (10, 200)]
    rows = [{"img": picture, "label": label} for picture, label in zip(pictures, (0, 1))]
    monkeypatch.setattr("vtrans.images.read_dataset", lambda name, split: rows)
    table = load_images("some/cifar-like-dataset")
    assert table.images == pictures and table.labels == [0, 1]
    monkeypatch.setattr("vtrans.images.read_dataset", lambda name, split: [{"pixels": pictures[0], "label": 0}])
    with pytest.raises(UsageError, match="needs an image \\(or img\\) column and a label column"):
        load_images("some/other-dataset")


class RandomImages(Examples):
    """Random pixels, one label: what a least-squares fit needs (inputs), nothing more."""

    def __init__(self, count: int, side: int = 16):
        self.pixels = torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(0))
        self.strata = [0] * count

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        return self.pixels[index]

    def collate(self, items) -> dict:
        return {"pixel_values": torch.stack(items), "labels": torch.zeros(len(items), dtype=torch.long)}


def test_least_squares_values_minimise_the_stream_error_through_layerscale():
    """DINOv2 scales each output by a LayerScale gamma before the add: the fit weighs each unit's contribution by
    gamma, so at its values the stream error after every add is stationary (a fit blind to gamma, or of the
    output alone, leaves a large gradient). LayerScale values spread over [0.1, 2] per dim, so it matters."""
    teacher, adapter, _ = vit_model("dinov2")
    generator = torch.Generator().manual_seed(1)
    for path in adapter.layer_parts.output_scales:
        for layer in adapter.layer_modules():
            layer.get_parameter(path).data = 0.1 + 1.9 * torch.rand(VIT["hidden_size"], generator=generator)
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    student_adapter = adapter_for(student)
    j = Job(method="fisher", model=student, adapter=student_adapter, teacher=teacher,
            budget=parse_target("flops=0.5", 17), train=RandomImages(48), batch_size=16,
            objective=ImageClassification())
    kept = random_kept(student_adapter, drop_blocks=False)
    assert student_adapter.output_scale(0, "heads") is not None
    # faster-vtrans keeps its trained mu through LayerScale by default (measured better on DINOv2); ViT rescales
    assert not VTransSettings().rescales(False, student_adapter)
    assert VTransSettings().rescales(False, vit_model("vit")[1])
    scale, log = rescale(j, kept, RescaleSettings(samples=48), loader=j.loader())
    assert sum(row["rescaled"] for row in log) >= len(log) - 1, log
    assert_each_fit_is_stationary(j, kept, scale, log, j.loader())
