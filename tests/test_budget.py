"""Budget parsing, reachability and exact budget selection."""
from dataclasses import replace

import pytest
import torch
import transformers
from conftest import TINY, tiny_model

from vtrans.arch import Kept, adapter_for
from vtrans.budget import TOLERANCE, check_reachable, exact_cost, parse_target, select_kept
from vtrans.errors import UsageError
from vtrans.masks import VIBMask


@pytest.mark.parametrize("text,kind,value,absolute", [
    ("flops=0.4", "flops", 0.4, False), ("params=0.5", "params", 0.5, False),
    ("params=30M", "params", 30e6, True), ("PARAMS = 1500k", "params", 1.5e6, True), ("flops=1", "flops", 1.0, False),
    ("latency=2x", "latency", 0.5, False), ("latency=40ms", "latency", 40.0, True),
])
def test_parse_target(text, kind, value, absolute):
    budget = parse_target(text, seq_len=128)
    assert (budget.kind, budget.value, budget.absolute, budget.seq_len) == (kind, value, absolute, 128)


@pytest.mark.parametrize("text", ["flops=0", "flops=-0.2", "flops=2", "latency=0.5", "flops", "", "params=abc",
                                  "flops=0.4x", "flops=30M", "latency=0.5x", "latency=0ms"])
def test_parse_target_rejects_bad_budgets(text):
    with pytest.raises(UsageError, match="--target"):
        parse_target(text, seq_len=128)


@pytest.mark.parametrize("text", ["flops=0.4", "flops=0.7", "flops=0.15", "params=0.5", "params=0.8", "params=0.3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_meets_the_budget_within_tolerance(text, seed):
    model = tiny_model("bert")
    adapter = adapter_for(model)
    budget = parse_target(text, seq_len=16)
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.randn(shape, generator=g) for n, shape in adapter.dims().mask_shapes().items()}
    kept = select_kept(adapter, {n: s.sigmoid() for n, s in scores.items()}, budget,
                      {n: s > 0 for n, s in scores.items()})
    dense = exact_cost(adapter, Kept.dense(adapter.dims()), 16)
    achieved = exact_cost(adapter, kept, 16)[budget.kind] / dense[budget.kind]
    assert budget.value * (1 - TOLERANCE) <= achieved <= budget.value


def test_selection_keeps_the_highest_scores():
    adapter = adapter_for(tiny_model("bert"))
    shapes = adapter.dims().mask_shapes()
    scores = {n: torch.full(shape, 1e6) for n, shape in shapes.items()}  # worth far more than they cost
    scores["ffn"] = torch.ones(shapes["ffn"])
    scores["ffn"][0, :10] = 0.01  # the ten least useful neurons of layer 0
    kept = select_kept(adapter, scores, parse_target("flops=0.9", seq_len=16))  # needs more than ten gone
    assert not set(range(10)) & set(kept.ffn[0])


def test_absolute_params_budget():
    model = tiny_model("bert")
    adapter = adapter_for(model)
    total = sum(p.numel() for p in model.parameters())
    budget = parse_target(f"params={int(total * 0.6)}", seq_len=16)
    assert budget.absolute
    kept = select_kept(adapter, {n: torch.zeros(s) + 1 for n, s in adapter.dims().mask_shapes().items()}, budget)
    achieved = exact_cost(adapter, kept, 16)["params"]
    assert total * 0.6 * (1 - TOLERANCE) <= achieved <= total * 0.6


def test_unreachable_budget_is_refused():
    adapter = adapter_for(tiny_model("bert"))  # its embeddings alone are a large share of its parameters
    with pytest.raises(UsageError, match="cannot be met"):
        check_reachable(adapter, parse_target("params=0.001", seq_len=16))
    with pytest.raises(UsageError, match="larger than the dense"):
        check_reachable(adapter, parse_target("params=100M", seq_len=16))
    check_reachable(adapter, parse_target("flops=0.01", seq_len=16))  # FLOPs can go very low
    # reachable only by pruning the hidden width (the CLI names the methods that do: test_compress.py)
    check_reachable(adapter, parse_target("params=0.2", seq_len=16))
    with pytest.raises(UsageError, match="and method allow"):
        check_reachable(adapter, parse_target("params=0.2", seq_len=16), keep_hidden=True)


def test_vib_mask_keep_rule_and_kl():
    mask = VIBMask((3,))
    with torch.no_grad():
        mask.mu.copy_(torch.tensor([1.0, 0.1, -2.0]))
        mask.log_sigma2.copy_(torch.log(torch.tensor([0.5, 0.5, 1.0])))
    assert mask.keep().tolist() == [True, False, True]  # mu^2 > sigma^2
    alpha = torch.tensor([1 / 0.5, 0.01 / 0.5, 4.0])
    assert torch.allclose(mask.kl(), 0.5 * torch.log1p(alpha).sum())
    samples = mask.sample(20000)
    assert samples.shape == (20000, 3)
    assert torch.allclose(samples.std(0), torch.tensor([0.5, 0.5, 1.0]).sqrt(), rtol=0.05)


@pytest.mark.parametrize("target", ["flops=0.5", "params=0.6"])
def test_round_to_keeps_multiples_of_the_best_units_within_the_budget(target):
    # wide enough that 8 neurons are finer than the 1% tolerance, as 64 are in real models
    config = transformers.BertConfig(**TINY | dict(hidden_size=64, intermediate_size=192))
    adapter = adapter_for(transformers.BertForSequenceClassification(config))
    generator = torch.Generator().manual_seed(0)
    worth = {name: torch.rand(shape, generator=generator) for name, shape in adapter.dims().mask_shapes().items()}
    budget = parse_target(target, seq_len=16)
    plain = select_kept(adapter, worth, budget)
    assert any(len(ffn) % 8 for ffn in plain.ffn)  # without the option, sizes fall anywhere
    rounded = select_kept(adapter, worth, replace(budget, multiple=8))
    dense = exact_cost(adapter, Kept.dense(adapter.dims()), 16)[budget.kind]
    achieved = exact_cost(adapter, rounded, 16)[budget.kind] / dense
    assert budget.value * (1 - TOLERANCE) <= achieved <= budget.value
    assert len(rounded.hidden) % 8 == 0 and all(len(ffn) % 8 == 0 for ffn in rounded.ffn), rounded.sizes()
    for layer, ffn in enumerate(rounded.ffn):  # the best neurons of each layer, not any multiple of them
        assert set(ffn) == set(worth["ffn"][layer].argsort(descending=True)[:len(ffn)].tolist())
