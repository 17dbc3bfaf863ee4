"""Resume after a real SIGKILL, unsafe files never unpickled, and fuzzed inputs never give a traceback."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import checkpointed_phase, kill_once_checkpointed, write_sentiment_csv, write_tiny_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import vtrans
from vtrans.budget import parse_target
from vtrans.cli import main
from vtrans.data import load_table
from vtrans.errors import UsageError

ARGS = ["--target", "flops=0.5", "--max-length", "16", "--batch-size", "16", "--prune-epochs", "15",
        "--recover-epochs", "2", "--checkpoint-every", "5", "--seed", "3"]


def command(model, data, out, *extra):
    return [sys.executable, "-m", "vtrans.cli", "compress", str(model), "--data", str(data), "--out", str(out),
            *ARGS, *extra]


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
                VTRANS_CACHE=str(tmp_path / "cache"))


@pytest.mark.parametrize("phase, method", [("prune", "vtrans"), ("recover", "vtrans"), ("recover", "fast-vtrans")])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, env, phase, method):
    """Killed after its first checkpoint of the mask search or of the recovery (which draws its batches on from
    where the search left the shuffle, and for fast-vtrans varied copies), the resumed run ends with the
    uninterrupted run's model, weight for weight."""
    model = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv")
    args = ["--method", method, "--data-fraction", "0.5"]
    if phase == "recover":  # many recovery checkpoints: one is caught before the run ends
        args += ["--prune-epochs", "3", "--recover-epochs", "40"]
    subprocess.run(command(model, data, tmp_path / "whole", *args), env=env, check=True, capture_output=True)

    out = tmp_path / "killed"
    state = tmp_path / ".killed.checkpoint" / "state.pt"
    process = subprocess.Popen(command(model, data, out, *args), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    kill_once_checkpointed(process, state, phase, marker=str(out))
    assert checkpointed_phase(state) == phase and not out.exists(), f"the run should die while {phase!r} runs"

    saved = torch.load(state, weights_only=True)
    refused = subprocess.run(command(model, data, out, *args), env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # no silent restart over a checkpoint
    subprocess.run(command(model, data, out, *args, "--resume"), env=env, check=True, capture_output=True)
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["kept"] == whole["kept"]
    assert resumed["compressed"]["metric"] == whole["compressed"]["metric"]
    # the seconds the killed run spent count: the report gives what the whole job cost
    assert resumed["compression_seconds"] == pytest.approx(sum(resumed["phase_seconds"].values()))
    assert resumed["compression_seconds"] > saved["elapsed"] > 0
    if phase == "recover":  # its choice was made by the killed run, in the seconds it recorded
        assert resumed["phase_seconds"]["choose"] == pytest.approx(saved["choose_seconds"])
    weights = [load_file(run / "model.safetensors") for run in (tmp_path / "whole", out)]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    targets = [[row["target"] for row in json.loads((run / "training_log.json").read_text()) if "target" in row]
               for run in (tmp_path / "whole", out)]
    assert targets[0] == targets[1]  # the resumed ramp goes on from where the run's started
    assert not state.parent.exists()  # a finished run leaves no checkpoint behind


class Payload:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_executed(tmp_path, env):
    model = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv")
    marker = tmp_path / "pwned"
    planted = tmp_path / ".out.checkpoint"
    planted.mkdir()
    (planted / "state.pt").write_bytes(pickle.dumps(Payload(marker)))
    result = subprocess.run(command(model, data, tmp_path / "out", "--resume"), env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "cannot be read safely" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()

    small = tmp_path / "small"
    vtrans.compress(str(model), str(data), target="flops=0.5", out=small, say=lambda m: None, max_length=16,
                    prune_epochs=0.2, recover_epochs=0.0, latency_batch=1, latency_seq_len=4)
    (small / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    (small / "training_args.bin").write_bytes(pickle.dumps(Payload(marker)))
    vtrans.load(small)
    assert not marker.exists()


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30))
def test_any_target_string_parses_or_is_refused_cleanly(text):
    try:
        budget = parse_target(text, seq_len=16)
    except UsageError as e:
        assert "--target" in str(e)
    else:
        assert budget.kind in ("flops", "params") and budget.value > 0


rows = st.lists(st.lists(st.text(max_size=12), max_size=4), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.sampled_from(["text", "label", "text_pair", "x", ""]), max_size=4), body=rows,
       junk=st.binary(max_size=40), suffix=st.sampled_from([".csv", ".jsonl", ".tsv", ".csv.gz", ".txt"]))
def test_malformed_data_files_are_refused_cleanly(tmp_path, header, body, junk, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        lines = [json.dumps(dict(zip(header, r))) for r in body] + [junk.decode("latin-1")]
        path.write_text("\n".join(lines))
    else:
        text = "\n".join(",".join(r) for r in [header] + body).encode() + junk
        path.write_bytes(text)
    try:
        table = load_table(str(path))
    except UsageError as e:
        assert str(path) in str(e) or "--data" in str(e)
    else:
        assert len(table) > 0 and len(table.text) == len(table.labels)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=20))
def test_the_command_never_shows_a_traceback_for_a_bad_target(tmp_path, capsys, text):
    busy = tmp_path / "busy"
    busy.mkdir(exist_ok=True)
    (busy / "f").write_text("x")
    code = main(["compress", f"--target={text}", "--out", str(busy)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vtrans: error: ") and "Traceback" not in err
