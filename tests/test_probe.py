"""Attention probing on hand-set attention and on a tiny model; the HTML report of a compressed model."""
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_sentiment_csv, write_tiny_checkpoint
from transformers import AutoModelForSequenceClassification

import vtrans
from vtrans.cli import main
from vtrans.probe import batch_measures, claim_test, probe

CLS, SEP, PAD = 2, 3, 0


def hand_set_attention():
    """One layer, 4 heads, two examples: [CLS a b c SEP] and [CLS a SEP PAD PAD] (pads get no attention)."""
    ids = torch.tensor([[CLS, 10, 11, 12, SEP], [CLS, 10, SEP, PAD, PAD]])
    mask = (ids != PAD).long()
    att = torch.zeros(2, 4, 5, 5)
    for b, n in enumerate(mask.sum(1).tolist()):
        att[b, 0, :, 0] = 1  # head 0: everything on [CLS]
        att[b, 1] = torch.eye(5)  # head 1: each token on itself
        att[b, 2, 0, 0] = 1  # head 2: each token on the one before it ([CLS] on itself)
        for q in range(1, 5):
            att[b, 2, q, q - 1] = 1
        att[b, 3, :, :n] = 1 / n  # head 3: uniform over real tokens
    return (att,), ids, mask


def test_measures_of_hand_set_attention():
    sums = batch_measures(*hand_set_attention(), special_ids=[CLS, SEP])
    assert int(sums["count"]) == 8  # 5 + 3 real query tokens; padding queries are not counted
    m = {k: v[0].numpy() / 8 for k, v in sums.items() if k != "count"}
    # head 0: all on [CLS]
    assert m["special"][0] == pytest.approx(1) and m["entropy"][0] == pytest.approx(0, abs=1e-6)
    # head 1: the diagonal; at [CLS]/[SEP] queries (4 of 8) the current token is special
    assert m["current"][1] == pytest.approx(4 / 8) and m["special"][1] == pytest.approx(4 / 8)
    # head 2: previous token; queries whose previous token is [CLS] (2) or themselves [CLS] (2) count as special
    assert m["previous"][2] == pytest.approx(4 / 8) and m["special"][2] == pytest.approx(4 / 8)
    # head 3: uniform over n real keys: special 2/n per query, current and previous 1/n on plain tokens
    assert m["special"][3] == pytest.approx((5 * 2 / 5 + 3 * 2 / 3) / 8)
    assert m["current"][3] == pytest.approx((3 / 5 + 1 / 3) / 8)
    assert m["entropy"][3] == pytest.approx((5 * math.log(5) + 3 * math.log(3)) / 8, rel=1e-5)
    total = m["special"] + m["current"] + m["previous"] + m["rest"]
    assert np.allclose(total, 1, atol=1e-6) and (m["rest"] >= -1e-6).all()


def test_claim_test_detects_pruned_heads_on_special_tokens():
    special = np.array([[0.9, 0.8, 0.1], [0.85, 0.2, 0.15]])
    current = np.zeros_like(special)
    kept = np.array([[False, False, True], [False, True, True]])
    claim = claim_test({"special": special, "current": current}, kept)
    row = claim["special+current"]
    assert row["pruned_heads"] == 3 and row["kept_heads"] == 3
    assert row["pruned_mean"] == pytest.approx(0.85) and row["kept_mean"] == pytest.approx(0.15)
    assert row["effect"] == 1.0 and row["p_value"] == pytest.approx(0.05)  # exact: 1 of C(6,3) = 20 orders
    flipped = claim_test({"special": special, "current": current}, ~kept)["special"]
    assert flipped["effect"] == 0.0 and flipped["p_value"] == pytest.approx(1.0)


@pytest.fixture
def compressed(tmp_path, monkeypatch):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path / "cache"))
    ckpt = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv")
    model = AutoModelForSequenceClassification.from_pretrained(ckpt)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():  # layer 0, head 1: no query -> equal scores -> uniform attention over real tokens
        model.bert.encoder.layer[0].attention.self.query.weight[head_dim:2 * head_dim] = 0
        model.bert.encoder.layer[0].attention.self.query.bias[head_dim:2 * head_dim] = 0
    model.save_pretrained(ckpt)
    vtrans.compress(str(ckpt), str(data), target="flops=0.5", method="faster-vtrans", out=tmp_path / "out",
                    say=lambda m: None, max_length=16, batch_size=16, prune_epochs=1.0, data_fraction=0.5,
                    latency_batch=2, latency_seq_len=8)
    return ckpt, data, tmp_path / "out"


def test_probe_on_a_tiny_model_with_a_uniform_head(compressed, tmp_path):
    ckpt, data, out = compressed
    result = probe(str(ckpt), str(data), compressed=out, samples=40, examples=2, max_length=16, say=lambda m: None)
    files = sorted(p.name for p in (out / "probe").iterdir())
    assert files == ["current.png", "entropy.png", "examples.png", "previous.png", "probe.json", "rest.png",
                     "special.png"]
    assert json.loads((out / "probe" / "probe.json").read_text()) == result
    # every sentence of the data has 5 words + [CLS] + [SEP] = 7 real tokens: the uniform head's entropy is log 7
    uniform = {k: np.array(v)[0, 1] for k, v in result["measures"].items()}
    assert uniform["entropy"] == pytest.approx(math.log(7), rel=1e-4)
    assert uniform["special"] == pytest.approx(2 / 7, rel=1e-4) and uniform["current"] == pytest.approx(
        5 / 7 / 7, rel=1e-4)
    report = json.loads((out / "report.json").read_text())
    kept = np.array(result["kept_heads"])
    assert kept.sum() == sum(len(h) for h in report["kept_units"]["heads"]) and 0 < kept.sum() < kept.size
    assert set(result["claim"]) == {"special", "current", "special+current"}
    assert len(result["examples"]) == 2 and result["examples"][0]["tokens"][0] == "[CLS]"
    assert len(result["examples"][0]["kept"]) == len(result["examples"][0]["tokens"])


class StrictHTML(HTMLParser):
    """Fails on a closing tag that does not match the open one; collects every src and href."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.links, self.doctype = [], [], False

    def handle_decl(self, decl):
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"</{tag}> does not close the open tag"


def test_report_html_is_valid_and_links_only_to_files_in_dir(compressed):
    ckpt, data, out = compressed
    probe(str(ckpt), str(data), compressed=out, samples=20, examples=1, max_length=16, say=lambda m: None)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    parser = StrictHTML()
    parser.feed(page)
    parser.close()
    assert parser.doctype and parser.stack == []
    assert {"report_kept.png", "report_training.png", "probe/special.png", "probe/examples.png"} <= set(parser.links)
    for link in parser.links:
        target = (out / link).resolve()
        assert not Path(link).is_absolute() and "://" not in link and out.resolve() in target.parents
        assert target.is_file()
    report = json.loads((out / "report.json").read_text())
    assert f"{report['budget']['achieved_fraction']:.4f}" in page and "Attention probe" in page
    assert "<script" not in page


def test_report_refuses_a_directory_without_a_report(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no report.json" in capsys.readouterr().err
