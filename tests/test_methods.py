"""Fast-VTrans, Faster-VTrans and OPTIN on tiny models: what each promises, and exact reload."""
import copy

import pytest
import torch
from conftest import TINY, tiny_model, write_sentiment_csv, write_tiny_checkpoint
from transformers import AutoTokenizer

import vtrans
from vtrans.arch import MaskValues, adapter_for, detach_masks
from vtrans.budget import parse_target
from vtrans.data import Encoded, load_table, stratified_indices
from vtrans.methods import METHODS, optin
from vtrans.methods import vtrans as vtrans_method
from vtrans.methods.base import Job
from vtrans.surgery import masked_values, save


@pytest.fixture
def job(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    table = load_table(str(write_sentiment_csv(tmp_path / "train.csv", rows=200)))
    train = Encoded(table, tokenizer, {"0": 0, "1": 1}, max_length=16)
    teacher = tiny_model("bert").requires_grad_(False)
    teacher.config.num_labels = TINY["num_labels"]
    student = copy.deepcopy(teacher)

    def make(method, **kw):
        return Job(method=method, model=student, adapter=adapter_for(student), teacher=teacher,
                   budget=parse_target("flops=0.5", 16), train=train, batch_size=16, **kw)
    return make


def masked_logits(model, kept, scale, batch):
    adapter = adapter_for(model)
    z, hidden_keep = masked_values(kept, adapter.dims(), scale)
    values = MaskValues()
    handles = adapter.attach_masks(values)
    values.set(z, hidden_keep)
    try:
        with torch.no_grad():
            return model.eval()(**batch).logits
    finally:
        detach_masks(handles)


@pytest.fixture
def spy_cut(monkeypatch):
    """Record, at the moment each method cuts, the masked logits and the cut model's logits."""
    from vtrans import surgery

    seen = {}
    batch = {"input_ids": torch.randint(5, 18, (3, 9), generator=torch.Generator().manual_seed(0))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])

    def spy(adapter, kept, scale=None):
        seen["masked"] = masked_logits(adapter.model, kept, scale, batch)
        surgery.cut_model(adapter, kept, scale)
        with torch.no_grad():
            seen["cut"] = adapter.model.eval()(**batch).logits
    for module in (vtrans_method, optin):
        monkeypatch.setattr(module, "cut_model", spy)
    seen["batch"] = batch
    return seen


@pytest.mark.parametrize("method", ["fast-vtrans", "faster-vtrans", "optin"])
def test_each_method_meets_budget_and_reloads_with_the_masked_logits(job, spy_cut, method, tmp_path):
    j = job(method, data_fraction=0.25, prune_epochs=2.0, recover_epochs=0.0)
    outcome = METHODS[method](j)
    assert (spy_cut["cut"] - spy_cut["masked"]).abs().max() <= 1e-4
    save(outcome.model, None, tmp_path / method)
    with torch.no_grad():
        assert torch.equal(vtrans.load(tmp_path / method)(**spy_cut["batch"]).logits, spy_cut["cut"])
    from vtrans.budget import exact_cost
    from vtrans.arch import Kept
    dense = exact_cost(j.adapter, Kept.dense(adapter_for(j.teacher).dims()), 16)["flops"]
    achieved = exact_cost(adapter_for(j.teacher), outcome.kept, 16)["flops"] / dense
    assert 0.5 * 0.99 <= achieved <= 0.5


def test_fast_vtrans_learns_from_the_requested_fraction(job, monkeypatch):
    j = job("fast-vtrans", data_fraction=0.1, prune_epochs=1.0, recover_epochs=1.0)
    sizes = []
    original = Job.loader

    def recording_loader(self, fraction=1.0):
        loader = original(self, fraction)
        sizes.append((fraction, len(loader.dataset)))
        return loader
    monkeypatch.setattr(Job, "loader", recording_loader)
    METHODS["fast-vtrans"](j)
    expected = len(stratified_indices(j.train.labels, 0.1, j.seed))
    assert sizes == [(0.1, expected)] and expected == 20  # 10% of 200 rows, 10 per label


def test_vtrans_trains_the_weights_with_the_masks(job):
    j = job("vtrans")
    before = {k: v.clone() for k, v in j.model.state_dict().items()}
    vtrans_method.prune(j, vtrans_method.VTransSettings(), j.loader(), epochs=1.0)
    changed = [k for k, v in j.model.state_dict().items() if not torch.equal(before[k], v)]
    assert any("attention.self.query.weight" in k for k in changed) and any("intermediate" in k for k in changed)


def test_faster_vtrans_leaves_the_weights_bit_identical_until_the_fold(job):
    j = job("faster-vtrans", data_fraction=0.5)
    before = {k: v.clone() for k, v in j.model.state_dict().items()}
    kept, mu, log = vtrans_method.prune(j, vtrans_method.VTransSettings(), j.loader(0.5), epochs=2.0,
                                        train_weights=False)
    after = j.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(log) >= 2 and all(p.requires_grad for p in j.model.parameters())  # nothing left frozen
    assert not torch.equal(mu["ffn"], torch.ones_like(mu["ffn"]))  # the masks did learn


def test_optin_never_calls_backward_and_ranks_a_useless_head_last(job, monkeypatch):
    def no_backward(*args, **kwargs):
        raise AssertionError("OPTIN must not call backward")
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    j = job("optin")
    head_dim = adapter_for(j.model).dims().head_dim
    useless_layer, useless_head = 1, 2
    with torch.no_grad():  # zero the head's output: it can change nothing downstream
        dense = j.model.bert.encoder.layer[useless_layer].attention.output.dense
        dense.weight[:, useless_head * head_dim:(useless_head + 1) * head_dim] = 0
    scores = optin.trajectory_scores(j, optin.OptinSettings(units_per_forward=5))
    flat = scores["heads"].flatten()
    assert int(flat.argmin()) == useless_layer * scores["heads"].shape[1] + useless_head
    assert float(flat.min()) < 1e-9 and float(flat.min()) < float(flat.sort().values[1])
    assert (scores["ffn"] >= 0).all() and scores["ffn"].std() > 0
    METHODS["optin"](j)
