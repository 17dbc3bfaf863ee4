"""ONNX export of a compressed directory: torch.onnx's exporter (dynamo), checked against PyTorch with
onnxruntime, and optionally dynamic int8 quantization of the weights by onnxruntime's quantizer.

ONNX_DIR gets model.onnx (inputs input_ids and attention_mask, batch and sequence dynamic; one output, the
logits, or a bare encoder's last_hidden_state), model_int8.onnx when asked, the tokenizer and config files,
and export.json: what was checked and how close onnxruntime came to PyTorch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from vtrans.errors import UsageError
from vtrans.surgery import atomic_directory, load

QUANTIZE = ("int8",)
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
          "vocab.json", "merges.txt", "modeling_vtrans.py")
MAX_INLINE_BYTES = 2**30  # protobuf caps a file at 2 GiB: bigger weights go to a model.onnx.data file beside it
TRACE_SHAPE, CHECK_SHAPE = (2, 8), (3, 11)  # the check runs another shape than the trace: the axes are dynamic


class PrimaryOutput(nn.Module):
    """(input_ids, attention_mask) -> the model's main output: logits, or a bare encoder's token states. No
    KV cache: the graph is one full forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return output.logits if "logits" in output else output.last_hidden_state


def output_name(model: nn.Module) -> str:
    return "last_hidden_state" if model is model.base_model else "logits"


def sample_inputs(shape: tuple[int, int], vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (special ids below 5 avoided) and a mask with some padding in the first row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, shape, generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantizer's own warnings (optional torchvision ops, deprecations inside torch, advice to
    pre-process) say nothing about the user's model."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_available(quantize: str | None = None) -> None:
    """Fail early, in one line, when the ONNX tools are missing or the quantization is unknown."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as missing:
        raise UsageError(f"ONNX export needs {missing.name}: pip install 'vtrans[onnx]'") from None
    if quantize not in (None, *QUANTIZE):
        raise UsageError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE)}")


def write_onnx(model: nn.Module, out: Path, quantize: str | None = None) -> dict[str, str]:
    """`model` as out/model.onnx (and out/model_int8.onnx with quantize="int8"); returns {kind: file name}."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with _quiet():
        torch.onnx.export(
            PrimaryOutput(model).eval(),
            tuple(sample_inputs(TRACE_SHAPE, model.config.vocab_size).values()),
            str(out / "model.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=[output_name(model)],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            dynamo=True,
            external_data=_bytes(model) > MAX_INLINE_BYTES,
            verbose=False,
        )
    files = {"fp32": "model.onnx"}
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet():
            # per output channel: folding mask values into the weights leaves rows of very different scales,
            # and one scale per tensor cost a pruned MiniLM 3.3 points (per channel: 0.3)
            quantize_dynamic(out / "model.onnx", out / "model_int8.onnx", weight_type=QuantType.QInt8,
                             per_channel=True, nodes_to_exclude=_empty_matmuls(out / "model.onnx"))
        files["int8"] = "model_int8.onnx"
    return files


def _empty_matmuls(path: Path) -> list[str]:
    """Matrix products with an empty weight (a block that keeps no units): nothing to quantize, and the
    per-channel quantizer fails on them."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    empty = {tensor.name for tensor in graph.initializer if 0 in tensor.dims}
    return [node.name for node in graph.node
            if node.op_type in ("MatMul", "Gemm") and any(name in empty for name in node.input)]


def export(directory: str | Path, out: str | Path, quantize: str | None = None, overwrite: bool = False) -> dict:
    """Export the compressed (or any vtrans-loadable) model in `directory` to ONNX in `out`; returns export.json."""
    check_available(quantize)
    directory = Path(directory)
    model = load(directory)
    with atomic_directory(Path(out), overwrite) as tmp:
        files = write_onnx(model, tmp, quantize)
        for name in COPIED:
            if (directory / name).exists():
                shutil.copy(directory / name, tmp / name)
        record = {"source": str(directory), "output": output_name(model), "files": files,
                  "max_abs_difference": check(tmp, files, PrimaryOutput(model).eval(), model.config.vocab_size),
                  "size_mb": {kind: size_mb(tmp, name) for kind, name in files.items()}}
        (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


class OnnxModel(nn.Module):
    """An exported model run by onnxruntime behind the call the objectives evaluate: model(**batch) gives an
    output with the graph's one output (`.logits` or `.last_hidden_state`). Inputs the graph lacks (BERT's
    token types) are left out: token type 0, as for single texts."""

    def __init__(self, path: Path, output: str):
        super().__init__()
        self.session = onnx_session(path)
        self.inputs = {node.name for node in self.session.get_inputs()}
        self.output = output

    def forward(self, **batch):
        feeds = {name: tensor.numpy() for name, tensor in batch.items() if name in self.inputs}
        return SimpleNamespace(**{self.output: torch.from_numpy(self.session.run(None, feeds)[0])})


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def size_mb(directory: Path, name: str) -> float:
    """A model file's size with its external weights, if any."""
    paths = [directory / name, directory / f"{name}.data"]
    return round(sum(path.stat().st_size for path in paths if path.exists()) / 2**20, 2)


@torch.inference_mode()
def check(out: Path, files: dict[str, str], wrapped: nn.Module, vocab_size: int) -> dict[str, float]:
    """The largest absolute difference between onnxruntime's and PyTorch's outputs, per file, on a batch of
    another shape than the one traced."""
    inputs = sample_inputs(CHECK_SHAPE, vocab_size, seed=1)
    expected = wrapped(**inputs)
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    return {kind: float((torch.from_numpy(onnx_session(out / name).run(None, feeds)[0]) - expected).abs().max())
            for kind, name in files.items()}
