"""A compressed directory loads where vtrans is not installed (`trust_remote_code=True`), and only so."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import (
    FAMILIES,
    WORDS,
    random_kept,
    tiny_batch,
    tiny_model,
    write_sentiment_csv,
    write_tiny_checkpoint,
)

import vtrans
from vtrans import load, load_tokenizer
from vtrans.arch import adapter_for
from vtrans.cli import main
from vtrans.deploy.onnx import export, onnx_session
from vtrans.objectives.features import mean_pool
from vtrans.surgery import cut_model, save

# Runs in a fresh interpreter where `import vtrans` fails: torch, transformers and the directory's own code only.
WITHOUT_VTRANS = """
import sys
sys.modules["vtrans"] = None
import json, torch, transformers
"""

LOAD_EACH = WITHOUT_VTRANS + """
batch = torch.load(sys.argv[1])
for directory in sys.argv[2:]:
    auto_map = json.load(open(f"{directory}/config.json"))["auto_map"]
    auto_class = next(name for name in auto_map if name != "AutoConfig")
    model = getattr(transformers, auto_class).from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(**batch).logits, f"{directory}.logits.pt")
"""

PIPELINES = WITHOUT_VTRANS + """
classifier = transformers.pipeline("text-classification", model=sys.argv[1], trust_remote_code=True, top_k=None)
generator = transformers.pipeline("text-generation", model=sys.argv[2], trust_remote_code=True)
scores = {row["label"]: row["score"] for row in classifier(["the plot was good"])[0]}
text = generator("the movie was", max_new_tokens=5, do_sample=False)[0]["generated_text"]
print(json.dumps({"scores": scores, "text": text}))
"""


def run_without_vtrans(script: str, *args, tmp_path) -> str:
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def compress_tiny(family: str, out, source=None):
    """A tiny model cut to different sizes per layer, one attention and one MLP block dropped, saved to `out`
    (with its tokenizer when it comes from a `source` checkpoint)."""
    if source is None:
        model, tokenizer = tiny_model(family), None
    else:
        model = getattr(transformers, FAMILIES[family][0]).from_pretrained(source).eval()
        tokenizer = load_tokenizer(source)
    adapter = adapter_for(model)
    cut_model(adapter, random_kept(adapter))
    return save(model, tokenizer, out)


@pytest.fixture(scope="module")
def reloaded_without_vtrans(tmp_path_factory):
    """Per family: the logits of vtrans.load(DIR) and of from_pretrained(DIR, trust_remote_code=True)."""
    tmp_path = tmp_path_factory.mktemp("remote")
    torch.save(tiny_batch(), tmp_path / "batch.pt")
    directories = {family: compress_tiny(family, tmp_path / family) for family in FAMILIES}
    run_without_vtrans(LOAD_EACH, tmp_path / "batch.pt", *directories.values(), tmp_path=tmp_path)
    logits = {}
    for family, directory in directories.items():
        with torch.no_grad():
            ours = load(directory)(**tiny_batch()).logits
        logits[family] = (ours, torch.load(f"{directory}.logits.pt"))
    return logits


def test_every_family_reloads_with_trust_remote_code_where_vtrans_is_not_installed(reloaded_without_vtrans, family):
    ours, theirs = reloaded_without_vtrans[family]
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_pipelines_run_the_compressed_model_without_vtrans(tmp_path):
    classifier = compress_tiny("bert", tmp_path / "classifier", write_tiny_checkpoint(tmp_path / "bert", "bert"))
    generator = compress_tiny("gpt2-lm", tmp_path / "generator", write_tiny_checkpoint(tmp_path / "gpt2", "gpt2-lm"))
    result = json.loads(run_without_vtrans(PIPELINES, classifier, generator, tmp_path=tmp_path).splitlines()[-1])

    tokenizer = load_tokenizer(classifier)
    with torch.no_grad():
        probabilities = load(classifier)(**tokenizer("the plot was good", return_tensors="pt")).logits.softmax(-1)[0]
    expected = {f"LABEL_{i}": float(p) for i, p in enumerate(probabilities)}
    assert result["scores"] == pytest.approx(expected, abs=1e-4)

    tokenizer = load_tokenizer(generator)
    prompt = tokenizer("the movie was", return_tensors="pt")
    tokens = load(generator).generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert result["text"] == tokenizer.decode(tokens[0], skip_special_tokens=True)


@pytest.mark.parametrize("options", [{}, {"ignore_mismatched_sizes": True}])
def test_a_plain_load_without_trust_remote_code_refuses_rather_than_loading_random_weights(tmp_path, options):
    directory = compress_tiny("bert", tmp_path / "out")
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForSequenceClassification.from_pretrained(directory, **options)


SENTENCE_EMBEDDER = WITHOUT_VTRANS + """
from sentence_transformers import SentenceTransformer
embedder = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
print(json.dumps(embedder.encode(["the movie was good", "the plot was very poor"]).tolist()))
"""


def test_a_compressed_sentence_embedder_loads_in_sentence_transformers_with_its_pooling(tmp_path):
    pytest.importorskip("sentence_transformers")
    source = write_tiny_checkpoint(tmp_path / "model", "bert", with_head=False)
    (source / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                   "pooling_mode_mean_tokens": True}))
    (source / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(6)) for i in range(40)))
    result = vtrans.compress(str(source), str(text), target="flops=0.6", method="magnitude", out=tmp_path / "out",
                             objective="features", max_length=16, batch_size=8)

    embeddings = torch.tensor(json.loads(run_without_vtrans(SENTENCE_EMBEDDER, result.out, tmp_path=tmp_path)))
    tokenizer = load_tokenizer(result.out)
    batch = tokenizer(["the movie was good", "the plot was very poor"], padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = mean_pool(load(result.out)(**batch).last_hidden_state, batch["attention_mask"])
    assert torch.allclose(embeddings, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2-lm", "llama-gqa"])
def test_onnx_export_runs_in_onnxruntime_with_the_pytorch_outputs(tmp_path, family):
    onnx = pytest.importorskip("onnx")
    directory = compress_tiny(family, tmp_path / "out")
    export(directory, tmp_path / "onnx", quantize="int8")
    inputs = tiny_batch(seed=3, batch=3, seq=7)  # not the traced shape: batch and sequence are dynamic
    with torch.no_grad():
        expected = load(directory)(**inputs).logits
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    fp32 = torch.from_numpy(onnx_session(tmp_path / "onnx" / "model.onnx").run(None, feeds)[0])
    assert torch.allclose(fp32, expected, atol=1e-4), (fp32 - expected).abs().max()

    int8 = torch.from_numpy(onnx_session(tmp_path / "onnx" / "model_int8.onnx").run(None, feeds)[0])
    # int8 weights: on random tiny weights the error is large; its accuracy is measured on the real model
    assert int8.shape == expected.shape and int8.isfinite().all()
    operators = {node.op_type for node in onnx.load(tmp_path / "onnx" / "model_int8.onnx").graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators, operators


def test_vtrans_latency_times_dense_compressed_and_onnx_side_by_side(tmp_path, capsys):
    dense = write_tiny_checkpoint(tmp_path / "dense", "gpt2-lm")
    compressed = compress_tiny("gpt2-lm", tmp_path / "small", dense)
    export(compressed, tmp_path / "onnx")
    out = tmp_path / "latency.json"
    argv = ["latency", str(dense), "--compare", str(compressed), "--compare", str(tmp_path / "onnx"),
            "--batch-sizes", "1,2", "--seq-lens", "8", "--repeats", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(row["batch"], row["seq_len"]) for row in rows] == [(1, 8), (2, 8)]
    assert all(len(row["models"]) == 3 and row["models"][str(dense)]["speedup"] == 1 for row in rows)
    assert "| 2 x 8 |" in capsys.readouterr().out

    assert main(["latency", str(dense), "--compare", str(compressed), "--batch-sizes", "1", "--seq-lens", "4",
                 "--repeats", "1", "--new-tokens", "3"]) == 0
    assert "generating 3 tokens" in capsys.readouterr().out
    assert main(["latency", str(dense), "--compare", str(tmp_path / "onnx"), "--new-tokens", "3"]) == 2
    assert "ONNX graph of one forward pass" in capsys.readouterr().err


def test_compress_with_quantize_reports_the_int8_copy_and_ships_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path / "cache"))
    source = write_tiny_checkpoint(tmp_path / "model", "bert")
    data = write_sentiment_csv(tmp_path / "train.csv")
    result = vtrans.compress(str(source), str(data), target="flops=0.6", method="magnitude", out=tmp_path / "out",
                             quantize="int8", say=lambda m: None, max_length=16, batch_size=16, teacher_epochs=1.0,
                             latency_batch=2, latency_seq_len=8)
    int8 = result.report["int8"]
    assert int8["file"] == "onnx/model_int8.onnx" and (result.out / int8["file"]).is_file()
    assert 0 <= int8["metric"]["accuracy"] <= 1 and int8["size_mb"] > 0 and int8["latency_ms"] > 0
    # both files ship, and the int8 one runs in onnxruntime on the directory's own tokenizer
    assert (result.out / "onnx" / "model.onnx").is_file()
    tokenizer = load_tokenizer(result.out)
    session = onnx_session(result.out / int8["file"])
    texts = [line.split(",")[0] for line in data.read_text().splitlines()[1:5]]
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    logits = session.run(None, {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})[0]
    assert logits.shape == (4, result.model.config.num_labels)
