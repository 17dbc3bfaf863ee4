"""compress() and the `vtrans compress` command end to end on tiny checkpoints written by the tests."""
import json

import pytest
import torch
from conftest import write_sentiment_csv, write_tiny_checkpoint

import vtrans
from vtrans.cli import main

FAST = dict(prune_epochs=1.0, recover_epochs=0.5, teacher_epochs=2.0, batch_size=16, max_length=16,
            latency_batch=2, latency_seq_len=8)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("target", ["flops=0.5", "params=0.6"])
def test_compress_meets_budget_and_reloads(tmp_path, family, target):
    ckpt = write_tiny_checkpoint(tmp_path / "model", family)
    data = write_sentiment_csv(tmp_path / "train.csv")
    result = vtrans.compress(str(ckpt), str(data), target=target, out=tmp_path / "out", say=lambda m: None, **FAST)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["budget"]["met"]
    kind, value = target.split("=")
    achieved = report["compressed"][kind] / report["dense"][kind]
    assert float(value) * 0.99 <= achieved <= float(value)
    assert report["compressed"]["params"] == sum(p.numel() for p in result.model.parameters())
    assert len(report["kept"]["layers"]) == 3 and report["compression_seconds"] > 0
    phases = report["phase_seconds"]  # where the time went: choosing, then recovering, within the total
    assert set(phases) == {"choose", "recover"} and phases["choose"] > 0 and phases["recover"] > 0
    assert sum(phases.values()) <= report["compression_seconds"]
    assert set(report["selection_fixup"]) == {"added", "removed"}  # how far selection moved the set
    assert {"task", "kl", "expected_cost", "target"} <= set(json.loads(
        (tmp_path / "out" / "training_log.json").read_text())[0])
    card = (tmp_path / "out" / "README.md").read_text()  # a Hub model card: YAML header, figures, how to load
    assert card.startswith("---\nlibrary_name: transformers\n") and "pipeline_tag: text-classification" in card
    assert f"{report['compressed']['params']:,}" in card and "trust_remote_code=True" in card

    reloaded = vtrans.load(tmp_path / "out")
    tokenizer = vtrans.load_tokenizer(tmp_path / "out")
    batch = tokenizer(["the movie was good", "the plot was awful very"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(result.model(**batch).logits, reloaded(**batch).logits)


def test_a_model_without_a_head_gets_a_cached_teacher(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "model", with_head=False)
    data = write_sentiment_csv(tmp_path / "train.csv")
    said = []
    options = FAST | dict(teacher_epochs=20.0, teacher_lr=2e-3)
    result = vtrans.compress(str(ckpt), str(data), target="flops=0.6", out=tmp_path / "a", say=said.append, **options)
    assert any("fine-tuning a teacher" in m for m in said)
    assert any("holding out" in m for m in said)
    assert result.report["dense"]["metric"]["accuracy"] > 0.8  # the teacher learned the toy task
    said.clear()
    vtrans.compress(str(ckpt), str(data), target="flops=0.6", out=tmp_path / "b", say=said.append, **options)
    assert any("fine-tuned earlier" in m for m in said) and not any("fine-tuning a teacher" in m for m in said)


def run_cli(args, capsys):
    code = main(["compress", "--max-length", "16", *map(str, args)])  # the tiny models have 64 positions
    return code, capsys.readouterr().err


def test_bad_inputs_give_one_line_and_exit_code_2(tmp_path, capsys):
    from transformers import DistilBertConfig, DistilBertModel

    ckpt = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv")
    out = tmp_path / "out"
    unsupported = tmp_path / "distilbert"
    DistilBertModel(DistilBertConfig(n_layers=1, dim=8, n_heads=2, hidden_dim=8, vocab_size=20)).save_pretrained(
        unsupported)
    no_label = write_sentiment_csv(tmp_path / "nolabel.csv", label_column="sentiment")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user's file")
    capsys.readouterr()  # the progress bars of writing these checkpoints are not the command's output
    cases = [
        ([unsupported, "--data", data, "--out", out], "model type 'distilbert' is not supported"),
        ([ckpt, "--data", data, "--target", "flops=0", "--out", out], "greater than 0"),
        ([ckpt, "--data", data, "--target", "params=0.0001", "--out", out], "cannot be met"),
        ([ckpt, "--data", no_label, "--out", out], "no 'label' column"),
        ([ckpt, "--data", data, "--out", busy], "--overwrite"),
        ([ckpt, "--data", tmp_path / "missing.csv", "--out", out], "--data"),
        ([ckpt, "--data", data, "--max-length", 1000, "--out", out], "positions"),
        ([ckpt, "--data", data, "--method", "optin", "--target", "params=0.2", "--out", out], "and method allow"),
        ([ckpt, "--data", data, "--method", "faster-vtrans", "--target", "params=0.2", "--out", out],
         "use --method vtrans: faster-vtrans keeps the hidden width"),
        ([ckpt, "--data", data, "--batch-size", 0, "--out", out], "--batch-size"),
        ([ckpt, "--data", data, "--augment", 1, "--out", out], "--augment 1.0 must be in [0, 1)"),
        ([ckpt, "--data", data, "--penalty", -1, "--out", out], "--penalty -1.0 must be 0 or more"),
    ]
    for args, message in cases:
        code, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert err.count("\n") == 1, err
        assert not out.exists()
    assert (busy / "keep.txt").read_text() == "user's file"


def test_string_labels_unknown_to_the_head_get_a_new_teacher(tmp_path):
    import csv

    ckpt = write_tiny_checkpoint(tmp_path / "model")  # its head knows LABEL_0..LABEL_2
    data = tmp_path / "named.csv"
    with open(write_sentiment_csv(tmp_path / "ids.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": ["neg", "pos"][int(r["label"])]} for r in rows)
    said = []
    result = vtrans.compress(str(ckpt), str(data), target="flops=0.6", out=tmp_path / "out", say=said.append, **FAST)
    assert any("fine-tuning a teacher" in m for m in said)
    assert result.model.config.id2label == {0: "neg", 1: "pos"}


def test_failure_while_saving_leaves_no_directory(tmp_path, monkeypatch):
    ckpt = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        vtrans.compress(str(ckpt), str(data), target="flops=0.5", out=tmp_path / "out", say=lambda m: None, **FAST)
    assert not [p.name for p in tmp_path.iterdir() if "out" in p.name]  # neither out/ nor a partial sibling

    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "report.json").write_text("an earlier result")
    with pytest.raises(RuntimeError, match="disk full"):
        vtrans.compress(str(ckpt), str(data), target="flops=0.5", out=previous, say=lambda m: None,
                        overwrite=True, **FAST)
    assert [p.name for p in previous.iterdir()] == ["report.json"]
    assert (previous / "report.json").read_text() == "an earlier result"
    assert not [p.name for p in tmp_path.iterdir() if "previous" in p.name and p != previous]


def test_every_mask_option_reaches_the_settings_the_search_reads():
    """Options and VTransSettings share their defaults, so a dropped line in api.mask_settings would go unseen:
    set every mask option away from its default and read it back."""
    from vtrans.api import MASK_OPTIONS, Options, mask_settings
    from vtrans.objectives.classification import Classification

    given = dict(mask_init="uniform", mask_lr=0.07, ramp=0.3, penalty=7.0, settle=0.2, rescale=True, kl_weight=3e-4,
                 mask_temperature=2.0, distill_layers="none")
    assert set(given) == set(MASK_OPTIONS)
    settings = mask_settings(Options(**given), Classification())
    read = dict(mask_init=settings.mask_init, mask_lr=settings.mask_lr, ramp=settings.ramp, penalty=settings.penalty,
                settle=settings.settle, rescale=settings.rescale, kl_weight=settings.kl_weight,
                mask_temperature=settings.temperature, distill_layers=settings.distill.layers)
    assert read == given
    assert settings.search_distill(rescales=True).layers == "none"  # an explicit choice holds for the search too
