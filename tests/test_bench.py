"""`vtrans bench` on a tiny checkpoint: every method x target, one table, plots, a failed method isolated."""
import json
from pathlib import Path

import pytest
from conftest import write_sentiment_csv, write_tiny_checkpoint

import vtrans
from vtrans import methods
from vtrans.bench import bench
from vtrans.cli import main
from vtrans.errors import UsageError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VTRANS_CACHE", str(tmp_path / "cache"))


def test_bench_runs_every_method_at_every_target_and_isolates_a_failure(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("deliberately broken")
    monkeypatch.setitem(methods.METHODS, "broken", methods.Method(broken))
    ckpt = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv")
    out = tmp_path / "bench"
    names = ["random", "broken", "magnitude", "fisher", "fisher+recover", "faster-vtrans"]
    rows = bench(str(ckpt), str(data), names,
                 ["flops=0.7", "flops=0.5"], out, plot_method="faster-vtrans", say=lambda m: None,
                 max_length=16, batch_size=16, teacher_epochs=1.0, prune_epochs=1.0, data_fraction=0.5)
    assert [(r["method"], r["target"]) for r in rows] == [
        (m, t) for t in ("flops=0.7", "flops=0.5") for m in names]
    for r in rows:
        if r["method"] == "broken":
            assert r["status"] == "failed" and "deliberately broken" in r["error"]
            continue
        target = float(r["target"].split("=")[1])
        assert r["status"] == "ok" and r["budget_met"] and 0.99 * target <= r["achieved_flops"] <= target
        assert r["latency_ms"] > 0 and r["dense_latency_ms"] > 0 and r["compression_seconds"] > 0
        assert vtrans.load(r["out"]).num_parameters() == r["params"]  # every model is kept and reloads
    for r in rows:  # the +recover rows distil into the cut model; the plain one-shot rows do not
        phases = {row.get("phase") for row in json.loads((Path(r.get("out", ".")) / "training_log.json").read_text())} \
            if r["status"] == "ok" else set()
        assert ("recover" in phases) == (r["method"] == "fisher+recover"), (r["method"], phases)
    assert json.loads((out / "bench.json").read_text()) == rows
    table = (out / "bench.md").read_text()
    assert table.count("| broken |") == 2 and "failed: RuntimeError: deliberately broken" in table
    assert table.count("| fisher | flops=0.5 |") == 1 and "| dense |" in table
    for name in ("metric_vs_flops.png", "compression_time.png", "kept_faster-vtrans.png"):
        assert (out / name).read_bytes()[:8] == PNG and (out / name).stat().st_size > 5000


def test_bench_refuses_bad_methods_and_targets_before_any_run(tmp_path, capsys):
    for argv, said in ((["--methods", "vtrans,nonsense"], "--methods nonsense"),
                       (["--targets", "flops=0.5,speed=2"], "unknown kind 'speed'"),
                       (["--methods", "optin,random", "--plot-method", "vtrans"], "--plot-method vtrans")):
        assert main(["bench", "--out", str(tmp_path / "b"), *argv]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "b").exists()
    with pytest.raises(UsageError):
        bench(None, None, [], ["flops=0.5"], tmp_path / "c")
