"""Vision families (ViT, DINOv2): a patch Conv2d, a CLS token and position vectors write the hidden dims (DINOv2
adds LayerScale and a classifier over [CLS, mean patch]); the same invariants as every text family (cut =
masked, cost = real parameters, reload with and without vtrans)."""
import pytest
import torch
import transformers
from conftest import random_kept
from test_surgery import masked_logits, random_scale

from vtrans import load
from vtrans.arch import adapter_for
from vtrans.budget import exact_cost
from vtrans.surgery import cut_model, masked_values, save

VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=16,
           patch_size=4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VISION = {
    "vit": ("ViTForImageClassification", "ViTConfig", VIT),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config",
               {k: v for k, v in VIT.items() if k != "intermediate_size"} | dict(mlp_ratio=2, layerscale_value=0.5)),
}


@pytest.fixture(params=list(VISION))
def vit(request):
    model_class, config_class, config = VISION[request.param]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    return model, adapter_for(model), {"pixel_values": torch.randn(2, 3, 16, 16)}


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
