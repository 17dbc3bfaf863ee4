"""Objectives as plug-ins: representation distillation for an encoder without labels (--objective features)."""
import pytest
import torch
from conftest import WORDS, write_tiny_checkpoint

import vtrans
from vtrans.arch import adapter_for
from vtrans.methods.baselines import fisher_scores
from vtrans.objectives import objective_for


def write_sentences(path, rows: int = 80):
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 5)) for i in range(rows)]
    path.write_text("\n\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("method", ["vtrans", "faster-vtrans", "optin", "fisher", "magnitude"])
def test_a_sentence_encoder_compresses_without_labels(tmp_path, method):
    ckpt = write_tiny_checkpoint(tmp_path / "model", "bert", with_head=False)
    text = write_sentences(tmp_path / "train.txt")
    result = vtrans.compress(str(ckpt), str(text), target="flops=0.6", method=method, out=tmp_path / "out",
                             objective="features", max_length=16, batch_size=8, prune_epochs=1)
    report = result.report
    assert report["budget"]["met"], report["budget"]
    assert report["dense"]["metric"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= report["compressed"]["metric"]["cosine"] < 1
    assert report["kept"]["hidden"] == report["dense_kept"]["hidden"]  # embeddings keep their size and space
    reloaded = vtrans.load(result.out)
    batch = {"input_ids": torch.randint(5, 18, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).last_hidden_state, result.model(**batch).last_hidden_state,
                              atol=1e-5)


def test_features_fisher_information_is_not_zero_at_the_dense_model(job):
    """The distillation loss has zero gradient at the dense model; the random-projection loss must not."""
    j = job("fisher")
    j.objective = objective_for("features")
    j.model = j.model.base_model  # the bare encoder
    j.adapter = adapter_for(j.model)
    loader = j.train.loader(8)
    scores = fisher_scores(j, loader, ("heads", "ffn"), limit=16)
    assert (scores["heads"] > 0).all() and (scores["ffn"] > 0).float().mean() > 0.5
