"""`vtrans plan`: a run's needs from the config alone."""
import pytest
from conftest import tiny_model, write_tiny_checkpoint

from vtrans.arch import adapter_for
from vtrans.cli import main
from vtrans.plan import Lean, plan


def test_plan_counts_the_real_parameters_and_orders_methods_by_what_they_hold(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "model", "gpt2-lm")
    # a batch whose activations outweigh the least-squares rescaling's 512 examples (see the last test)
    result = plan(str(ckpt), "params=0.5", ["vtrans", "faster-vtrans", "magnitude"], objective="lm", batch=64,
                  seq_len=16)
    assert result["dense"]["params"] == sum(p.numel() for p in tiny_model("gpt2-lm").parameters())
    assert result["budget"]["value"] == pytest.approx(0.5 * result["dense"]["params"])
    peak = result["peak_gb"]
    assert peak["vtrans"] > peak["faster-vtrans"] > peak["magnitude"]  # weights train > masks train > neither
    longer = plan(str(ckpt), "params=0.5", ["vtrans"], objective="lm", batch=64, seq_len=32)["peak_gb"]["vtrans"]
    assert longer > peak["vtrans"]


def test_plan_counts_what_the_lean_options_save(tmp_path):
    """bfloat16 halves the frozen weights only; checkpointing cuts activations only where weights train; N
    processes each hold a share of the batch."""
    ckpt = write_tiny_checkpoint(tmp_path / "model", "gpt2-lm")
    params = sum(p.numel() for p in tiny_model("gpt2-lm").parameters())

    def peak(method, **lean):
        return plan(str(ckpt), "params=0.5", [method], objective="lm", batch=8, seq_len=16,
                    lean=Lean(**lean))["peak_gb"][method] * 2**30

    assert peak("faster-vtrans") - peak("faster-vtrans", frozen_bytes=2) == pytest.approx(2 * 2 * params)
    assert peak("vtrans") - peak("vtrans", frozen_bytes=2) == pytest.approx(2 * params)  # its student trains
    assert peak("vtrans", gradient_checkpointing=True) < peak("vtrans")
    assert peak("faster-vtrans", gradient_checkpointing=True) == peak("faster-vtrans")
    assert peak("vtrans", processes=2) < peak("vtrans")


def test_plan_refuses_unknown_methods_and_unreachable_targets(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "model", "bert")
    assert main(["plan", str(ckpt), "--methods", "vtrans,nonsense"]) == 2
    assert "--methods nonsense" in capsys.readouterr().err
    assert main(["plan", str(ckpt), "--target", "params=1G"]) == 2
    assert "larger than the dense model" in capsys.readouterr().err


def test_plan_counts_the_rescalings_streams_where_a_method_rescales(tmp_path):
    """The least-squares rescaling holds 512 examples' streams whatever the batch: with a batch of one they set
    fisher's and faster-vtrans's peak, and neither vtrans's (it does not rescale) nor a share's per process."""
    from vtrans.methods import METHODS
    from vtrans.plan import RUNTIME_BYTES, rescale_bytes

    ckpt = write_tiny_checkpoint(tmp_path / "model", "bert")
    result = plan(str(ckpt), "flops=0.5", ["fisher", "faster-vtrans", "vtrans"], batch=1, seq_len=16)
    params = result["dense"]["params"]
    adapter = adapter_for(tiny_model("bert"))
    dims = adapter.dims()
    assert [METHODS[m].rescales(adapter) for m in ("fisher", "faster-vtrans", "vtrans", "optin")] == [
        True, True, False, False]
    streams = rescale_bytes(dims, 16, processes=1)
    assert streams > 5 * 512 * 16 * dims.hidden * 4 + 512 * 16 * 16 * 4  # streams and attention masks
    for method in ("fisher", "faster-vtrans"):
        assert result["peak_gb"][method] * 2**30 == pytest.approx(RUNTIME_BYTES + 2 * 4 * params + streams)
    assert result["peak_gb"]["vtrans"] * 2**30 < RUNTIME_BYTES + 5 * 4 * params + streams / 2
    shared = plan(str(ckpt), "flops=0.5", ["fisher"], batch=1, seq_len=16, lean=Lean(processes=2))["peak_gb"]
    assert shared["fisher"] < result["peak_gb"]["fisher"]


def test_optin_forwards_its_own_batch_on_every_process_and_the_backprop_methods_share_theirs(tmp_path):
    """OPTIN's forwards carry its calibration sequences times the units ablated at once, whatever the run's
    batch or processes; a method that backpropagates holds its share of the batch per process."""
    ckpt = write_tiny_checkpoint(tmp_path / "model", "bert")

    def peaks(batch, processes):
        lean = Lean(processes=processes)
        return plan(str(ckpt), "flops=0.5", ["optin", "fisher", "vtrans"], batch=batch, seq_len=16,
                    lean=lean)["peak_gb"]

    small, large, shared = peaks(1, 1), peaks(512, 1), peaks(512, 2)
    assert small["optin"] == large["optin"] == shared["optin"]
    assert large["vtrans"] > shared["vtrans"] > small["vtrans"]
