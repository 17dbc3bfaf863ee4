"""Past one process: data parallel under torchrun (gloo on the CPU), --device and --dtype."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import checkpointed_phase, kill_once_checkpointed, write_sentiment_csv, write_tiny_checkpoint
from safetensors.torch import load_file

import vtrans
from vtrans.errors import UsageError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BERT without a head (so the teacher is fine-tuned: data parallel too) and a toy task whose
    sentences all have the same length (so every rank's share of a batch has as many tokens)."""
    root = tmp_path_factory.mktemp("distributed")
    write_tiny_checkpoint(root / "model", with_head=False)
    write_sentiment_csv(root / "train.csv", rows=96)
    write_sentiment_csv(root / "test.csv", rows=32, seed=1)
    return root


def _command(root, method: str, processes: int, cache: str, out: str, *extra: str,
             model: str = "model") -> tuple[list[str], dict]:
    """`vtrans compress` in `processes` processes (torchrun, gloo), with the teacher cache `cache`, and its
    environment."""
    command = [sys.executable, "-m", "vtrans"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "vtrans"]
    args = ["compress", model, "--data", "train.csv", "--eval-data", "test.csv", "--method", method,
            "--target", "flops=0.5", "--batch-size", "7", "--max-length", "16", "--device", "cpu",
            "--teacher-lr", "1e-3", "--out", out, *extra]
    env = os.environ | {"VTRANS_CACHE": str(root / cache), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return command + args, env


def _compress(root, method: str, processes: int, cache: str, out: str | None = None, *extra: str,
              model: str = "model") -> str:
    """Run that command to its end; the DIR."""
    out = out or f"{method}-{processes}"
    command, env = _command(root, method, processes, cache, out, *extra, model=model)
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", ["vtrans", "fisher", "optin"])
def test_two_processes_give_what_one_gives(files, method):
    """The same global batch and seed in 1 and 2 processes: the same kept set and the same model. Batches of 7
    split 4 + 3 (and the last, of 5, 3 + 2): each rank's loss is weighed by its share. vtrans covers
    the teacher fine-tuned in 2 processes, averaged weight and mask gradients, the mask noise and the summed
    Fisher scores of its warm start and fix-up (without the gradient average the logits differ by about
    2e-3); fisher the summed least-squares systems; optin the units split over ranks. Those two share the
    1-process teacher: the tiny model's OPTIN scores are ~1e-8 apart, so the last-bit differences of a teacher
    fine-tuned in 2 processes would reorder them. OPTIN's 2-process run gets a copy of that teacher in a cache
    of its own, so that it scores (its scores are cached too) rather than reading the 1-process scores."""
    caches = {1: "cache-1", 2: "cache-2" if method == "vtrans" else f"cache-2-{method}"}
    one = files / _compress(files, method, 1, caches[1])
    if method != "vtrans":
        shutil.copytree(files / caches[1] / "teachers", files / caches[2] / "teachers", dirs_exist_ok=True)
    two = files / _compress(files, method, 2, caches[2])
    if method == "optin":
        assert len(list((files / caches[2] / "optin").glob("*.safetensors"))) == 1  # scored, not read
    kept_one = json.loads((one / "report.json").read_text())["kept_units"]
    kept_two = json.loads((two / "report.json").read_text())["kept_units"]
    assert kept_two == kept_one
    ids = torch.randint(5, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_one = vtrans.load(one)(input_ids=ids).logits
        logits_two = vtrans.load(two)(input_ids=ids).logits
    assert logits_one.abs().max() > 1e-2  # a trained head, not a model whose outputs are all ~0
    torch.testing.assert_close(logits_two, logits_one, atol=1e-4, rtol=0)
    # rank 0 alone wrote: one DIR, no checkpoint or scratch directory left beside it
    written = sorted(p.name for p in files.iterdir() if p.name.startswith((f"{method}-", f".{method}-")))
    assert written == [f"{method}-1", f"{method}-2"]


def test_device_cuda_without_a_gpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="--device cuda: PyTorch sees no CUDA GPU"):
        vtrans.compress(str(tmp_path / "none"), str(tmp_path / "none.csv"), device="cuda", out=tmp_path / "out")


def test_bfloat16_frozen_models(tmp_path):
    """--dtype bfloat16 with frozen weights: teacher and student in bfloat16, the budget met, and the saved
    model reloads as the model compress returned."""
    model = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv", rows=64)
    result = vtrans.compress(str(model), str(data), target="flops=0.5", method="faster-vtrans", out=tmp_path / "out",
                             dtype="bfloat16", max_length=16, batch_size=8, say=lambda *_: None)
    assert next(result.model.parameters()).dtype == torch.bfloat16
    assert result.report["budget"]["met"]
    ids = torch.randint(5, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reloaded = vtrans.load(result.out)
        assert next(reloaded.parameters()).dtype == torch.bfloat16
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compress_on_the_gpu(tmp_path):
    """On a GPU: the run stays there, and the saved model, reloaded on the CPU, gives the same logits."""
    model = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv", rows=64)
    result = vtrans.compress(str(model), str(data), target="flops=0.5", method="vtrans", out=tmp_path / "out",
                             device="cuda", max_length=16, batch_size=8, say=lambda *_: None)
    assert next(result.model.parameters()).is_cuda
    assert result.report["peak_gpu_memory_mb"] > 0
    ids = torch.randint(5, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_gpu = result.model(input_ids=ids.cuda()).logits.cpu()
        torch.testing.assert_close(vtrans.load(result.out)(input_ids=ids).logits, on_gpu, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    """Recomputed activations give the same gradients: the same kept set and weights as a run that keeps them.
    The checkpointed run must actually recompute (transformers does so only in training mode)."""
    model = write_tiny_checkpoint(tmp_path / "model")
    data = write_sentiment_csv(tmp_path / "train.csv", rows=64)
    recomputed = []
    original = transformers.modeling_utils.checkpoint

    def counting(*args, **kwargs):
        recomputed.append(1)
        return original(*args, **kwargs)

    runs = {}
    for lean in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(transformers.modeling_utils, "checkpoint", counting)
            runs[lean] = vtrans.compress(str(model), str(data), target="flops=0.5", method="vtrans",
                                         out=tmp_path / f"out-{lean}", gradient_checkpointing=lean, max_length=16,
                                         batch_size=8, say=lambda *_: None)
        if not lean:
            assert not recomputed
    assert recomputed
    assert runs[True].report["kept_units"] == runs[False].report["kept_units"]
    ids = torch.randint(5, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(runs[True].model(input_ids=ids).logits, runs[False].model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_a_two_process_run_killed_while_recovering_resumes_to_the_uninterrupted_model(files):
    """fast-vtrans recovers on varied copies of its sample, each rank varying its rows with a generator of its
    own, and here with dropout over uneven shares (batches of 7: 4 + 3 rows), so each rank's global generator
    moves on differently. The one checkpoint rank 0 writes holds every rank's generators, so both ranks resume
    where the uninterrupted run had them. Killed (the launcher and its workers) after a checkpoint of the
    recovery, the resumed run ends with the uninterrupted model, weight for weight."""
    model = files / "model-dropout"
    shutil.copytree(files / "model", model, dirs_exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"hidden_dropout_prob": 0.1}))
    extra = ("--data-fraction", "0.5", "--prune-epochs", "2", "--recover-epochs", "30", "--checkpoint-every", "5")
    whole = _compress(files, "fast-vtrans", 2, "cache-resume", "resume-whole", *extra, model=model.name)
    killed = str(files / "resume-killed")  # absolute: the marker that finds this run's processes, and only them
    command, env = _command(files, "fast-vtrans", 2, "cache-resume", killed, *extra, model=model.name)
    state = files / ".resume-killed.checkpoint" / "state.pt"
    process = subprocess.Popen(command, cwd=files, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_once_checkpointed(process, state, "recover", marker=killed)
    assert checkpointed_phase(state) == "recover" and not (files / "resume-killed").exists()
    resumed = _compress(files, "fast-vtrans", 2, "cache-resume", killed, *extra, "--resume", model=model.name)
    weights = [load_file(files / run / "model.safetensors") for run in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
