"""Decoders end to end: language modelling (--objective lm) and classification on tiny GPT-2 and LLaMA (GQA)
checkpoints, every method, reload, and generation that matches the masked model."""
import random

import pytest
import torch
from conftest import WORDS, random_kept, tiny_model, write_sentiment_csv, write_tiny_checkpoint

import vtrans
from vtrans.arch import Kept, MaskValues, adapter_for, detach_masks
from vtrans.methods import METHODS
from vtrans.surgery import cut_model, masked_values, save


def write_text(path, paragraphs: int = 60, seed: int = 0):
    """Paragraphs with a learnable pattern: each word is mostly followed by the next one in a fixed order."""
    rng = random.Random(seed)
    lines = []
    for _ in range(paragraphs):
        start = rng.randrange(len(WORDS))
        lines.append(" ".join(WORDS[(start + i + (rng.random() < 0.1)) % len(WORDS)] for i in range(24)))
    path.write_text("\n\n".join(lines) + "\n")
    return path


# every method on the GQA model; the other decoders with a trained and a one-shot method
RUNS = [("llama-gqa-lm", method) for method in METHODS] + [
    (family, method) for family in ("gpt2-lm", "llama-lm-tied") for method in ("vtrans", "optin")]


@pytest.mark.parametrize("family,method", RUNS)
def test_every_method_compresses_a_decoder_for_language_modelling(tmp_path, family, method):
    ckpt = write_tiny_checkpoint(tmp_path / "model", family)
    text = write_text(tmp_path / "train.txt")
    result = vtrans.compress(str(ckpt), str(text), target="flops=0.6", method=method, out=tmp_path / "out",
                             objective="lm", max_length=16, batch_size=8, prune_epochs=1, data_fraction=0.5)
    report = result.report
    assert report["budget"]["met"], report["budget"]
    dense, small = report["dense"]["metric"]["perplexity"], report["compressed"]["metric"]["perplexity"]
    assert 1 < dense < 200 and 1 < small < 1e4
    reloaded = vtrans.load(result.out)
    batch = {"input_ids": torch.randint(3, 20, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, result.model(**batch).logits, atol=1e-5)
    if family.endswith("tied"):  # the head is still the embedding, after the cut and after the reload
        assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["gpt2-lm", "llama-gqa-lm", "llama-lm-tied"])
def test_generate_gives_the_masked_models_greedy_tokens_before_and_after_reload(family, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model)
    kept = random_kept(adapter, seed=4)
    z, hidden_keep = masked_values(kept, adapter.dims())
    prompt = torch.randint(3, 100, (2, 5))
    values = MaskValues()
    handles = adapter.attach_masks(values)
    values.set(z, hidden_keep)
    try:
        masked = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    finally:
        detach_masks(handles)
    cut_model(adapter, kept)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), masked)
    save(model, None, tmp_path / "out")
    reloaded = vtrans.load(tmp_path / "out")
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), masked)


def test_gqa_keeps_query_heads_with_their_kv_head():
    model = tiny_model("llama-gqa-lm")
    adapter = adapter_for(model)
    dims = adapter.dims()
    assert (dims.heads, dims.query_group) == (2, 2)  # 4 query heads share 2 KV heads
    kept = Kept.dense(dims)
    kept.heads = [[1], [0], [0, 1]]
    cut_model(adapter, kept)
    attention = model.model.layers[0].self_attn
    head_dim = dims.head_dim
    assert attention.q_proj.out_features == 2 * head_dim and attention.k_proj.out_features == head_dim
    dense = tiny_model("llama-gqa-lm").model.layers[0].self_attn
    # KV head 1 serves query heads 2 and 3
    assert torch.equal(attention.q_proj.weight, dense.q_proj.weight[2 * head_dim:4 * head_dim])
    assert torch.equal(attention.k_proj.weight, dense.k_proj.weight[head_dim:2 * head_dim])


def test_gpt2_classifier_without_a_padding_token_compresses(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "model", "gpt2")
    data = write_sentiment_csv(tmp_path / "train.csv")
    result = vtrans.compress(str(ckpt), str(data), target="flops=0.5", method="fisher", out=tmp_path / "out",
                             max_length=16, teacher_epochs=1)
    assert result.report["budget"]["met"]
    assert "accuracy" in result.report["compressed"]["metric"]


def test_magnitude_reads_each_heads_rows_of_a_fused_projection():
    from vtrans.methods.baselines import magnitude_scores

    model = tiny_model("gpt2-lm")
    adapter = adapter_for(model)
    dims = adapter.dims()
    attention = model.transformer.h[0].attn
    hidden, head_dim, head = dims.hidden, dims.head_dim, 2
    columns = [section * hidden + head * head_dim + j for section in range(3) for j in range(head_dim)]
    by_hand = (attention.c_attn.weight[:, columns].square().sum() + attention.c_attn.bias[columns].square().sum()
               + attention.c_proj.weight[head * head_dim:(head + 1) * head_dim].square().sum())
    assert torch.allclose(magnitude_scores(adapter)["heads"][0, head], by_hand)


def test_probe_reads_a_gqa_models_kept_kv_heads_as_query_heads(tmp_path):
    from vtrans.probe import probe

    ckpt = write_tiny_checkpoint(tmp_path / "model", "llama-gqa-lm")
    text = write_text(tmp_path / "train.txt")
    result = vtrans.compress(str(ckpt), str(text), target="flops=0.8", method="magnitude", out=tmp_path / "out",
                             objective="lm", max_length=16)
    kv_heads = result.report["kept_units"]["heads"]
    probed = probe(str(ckpt), str(text), compressed=result.out, samples=8, examples=1, max_length=16,
                   say=lambda message: None)
    kept = torch.tensor(probed["kept_heads"])  # (layers, 4 query heads)
    assert kept.shape == (3, 4)
    for layer, units in enumerate(kv_heads):  # KV head u keeps query heads 2u and 2u + 1
        assert kept[layer].tolist() == [u in units for u in (0, 0, 1, 1)]
    assert 0 < kept.sum() < kept.numel()
