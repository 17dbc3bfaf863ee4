"""Latency budgets: a machine's latency model (what each structure costs in time) drives the selection as FLOPs do."""
import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model, write_sentiment_csv, write_tiny_checkpoint

import vtrans
from vtrans import api
from vtrans.arch import adapter_for
from vtrans.budget import dense_cost, exact_cost, parse_target, select_kept
from vtrans.latency import FEATURES, LatencyModel, fit_latency, random_batch


def hand_model(**coefficients) -> LatencyModel:
    return LatencyModel(intercept=1.0, coefficients={name: coefficients.get(name, 0.0) for name in FEATURES}, batch=2,
                        seq_len=8, machine="test", dense_measured_ms=0.0, fit_error=0.0)


def test_a_latency_budget_is_met_on_the_latency_model_and_follows_what_it_charges():
    """Where whole blocks cost time of their own, a 2x latency budget drops more blocks than where only FLOPs do."""
    adapter = adapter_for(tiny_model("bert"))
    worth = {name: torch.rand(shape, generator=torch.Generator().manual_seed(0)) + 1
             for name, shape in adapter.dims().mask_shapes().items()}
    dropped_blocks = []
    for latency in (hand_model(flops=1e-4, attention_blocks=10.0, mlp_blocks=10.0), hand_model(flops=1e-4)):
        budget = replace(parse_target("latency=2x", seq_len=8), latency=latency)
        kept = select_kept(adapter, worth, budget)
        ratio = budget.of(exact_cost(adapter, kept, 8)) / budget.of(dense_cost(adapter, 8))
        assert 0.5 * 0.99 <= ratio <= 0.5
        dropped_blocks.append((kept.attention + kept.ffn_block).count(False))
    assert dropped_blocks[0] > dropped_blocks[1], dropped_blocks


def test_compress_to_a_speedup_reports_the_predicted_and_the_measured_latency(tmp_path, monkeypatch):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "fit_latency", lambda *args, **kwargs: hand_model(flops=1e-4, mlp_blocks=2.0))
    ckpt = write_tiny_checkpoint(tmp_path / "model", "bert")
    data = write_sentiment_csv(tmp_path / "train.csv")
    result = vtrans.compress(str(ckpt), str(data), target="latency=1.5x", method="magnitude", out=tmp_path / "out",
                             say=lambda m: None, max_length=16, latency_batch=2, latency_seq_len=8,
                             teacher_epochs=1.0, batch_size=16)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["budget"]["met"] and report["target"]["seq_len"] == 8  # counted at the timed length
    predicted = report["latency_model"]["predicted_ms"]
    assert predicted["dense"] / predicted["compressed"] == pytest.approx(1.5, rel=0.011)
    assert report["compressed"]["latency_ms"] > 0 and "predicted" in vtrans.report.summary(report, result.out)


def test_the_latency_model_is_measured_once_per_machine_and_model(tmp_path):
    model = tiny_model("bert")
    inputs = random_batch(2, 8, 100)
    fitted = fit_latency(model, inputs, seq_len=8, cache=tmp_path, variants=4, repeats=1)
    assert all(value >= 0 for value in fitted.coefficients.values()) and fitted.intercept >= 0
    [cached] = (tmp_path / "latency").iterdir()  # one file, no temporary left beside it
    assert fit_latency(model, inputs, seq_len=8, cache=tmp_path, variants=4, repeats=1) == fitted
    cached.write_text(cached.read_text()[:20])  # cut short, as a killed writer without os.replace would leave it
    again = fit_latency(model, inputs, seq_len=8, cache=tmp_path, variants=4, repeats=1)
    assert again.dense_measured_ms > 0 and [p.name for p in (tmp_path / "latency").iterdir()] == [cached.name]
    assert fit_latency(model, inputs, seq_len=8, cache=tmp_path, variants=4, repeats=1) == again  # stored again


def test_a_cache_that_cannot_be_written_costs_a_measurement_not_the_run(tmp_path):
    (tmp_path / "latency").write_text("")  # the cache's folder is a file: nothing can be written under it
    fitted = fit_latency(tiny_model("bert"), random_batch(2, 8, 100), seq_len=8, cache=tmp_path, variants=4,
                         repeats=1)
    assert fitted.dense_measured_ms > 0 and (tmp_path / "latency").is_file()
