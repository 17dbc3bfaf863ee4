"""Measured latency: forward passes of several models on the same random batch, timed interleaved (model A,
model B, model A, ...) so that whatever else loads the machine slows all of them alike.

A model is a PyTorch model (a Hub name or checkpoint, or a directory written by vtrans) or an ONNX file run by
onnxruntime (a .onnx path, or a directory written by `vtrans export`).

Latency budgets (`--target latency=2x`) need what each structure costs in time on this machine. `fit_latency`
cuts the dense model at random to a dozen sizes, times each beside the dense model, and fits

    ms = intercept + a * FLOPs + b * attention blocks + c * MLP blocks + d * hidden width

by non-negative least squares (the terms of `Adapter.cost`): the lookup table, cached per machine, model and
shape. Linear in the kept counts, it serves the methods as FLOPs do, expected counts included.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vtrans.errors import UsageError
from vtrans.teacher import fingerprint

FEATURES = ("flops", "attention_blocks", "mlp_blocks", "hidden")  # terms of Adapter.cost

Runner = Callable[[dict[str, torch.Tensor]], object]  # one forward pass on a batch of model inputs


def torch_runner(model: torch.nn.Module) -> Runner:
    model.eval()

    @torch.inference_mode()
    def run(inputs):
        return model(**inputs)
    return run


def generate_runner(model: torch.nn.Module, new_tokens: int) -> Runner:
    """Greedy generation of exactly `new_tokens` tokens after the batch (prefill, then one step per token with
    the KV cache)."""
    if not model.can_generate():
        raise UsageError(f"--new-tokens: {type(model).__name__} does not generate text; time it without")
    model.eval()

    @torch.inference_mode()
    def run(inputs):
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=model.config.eos_token_id)
    return run


def onnx_runner(path: Path) -> Runner:
    from vtrans.deploy.onnx import onnx_session

    session = onnx_session(path)
    names = {node.name for node in session.get_inputs()}

    def run(inputs):
        return session.run(None, {name: tensor.numpy() for name, tensor in inputs.items() if name in names})
    return run


def random_batch(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def measure(runners: dict[str, Runner], inputs: dict[str, torch.Tensor], repeats: int = 10,
            warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per forward pass of each runner on `inputs`, `repeats` times each, interleaved, after
    `warmup` passes."""
    for run in runners.values():
        for _ in range(warmup):
            run(inputs)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(inputs)
            _finish(inputs)
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def _finish(inputs: dict[str, torch.Tensor]) -> None:
    """Wait for the GPU's queued work (a CUDA call returns before its kernels finish)."""
    if any(value.is_cuda for value in inputs.values()):
        torch.cuda.synchronize()


def load_runner(spec: str, new_tokens: int = 0) -> tuple[Runner, int]:
    """(runner, vocabulary size) for a model given as on the command line: one forward pass, or with
    `new_tokens` a greedy generation of that many tokens."""
    path = Path(spec)
    onnx_file = path if path.suffix == ".onnx" else path / "model.onnx"
    if onnx_file.is_file():
        config = onnx_file.parent / "config.json"
        if not config.is_file():
            raise UsageError(f"{spec}: no config.json beside {onnx_file.name}; export it with vtrans export")
        if new_tokens:
            raise UsageError(f"--new-tokens: {spec} is an ONNX graph of one forward pass (no KV cache); time a "
                             "PyTorch model for generation")
        return onnx_runner(onnx_file), json.loads(config.read_text())["vocab_size"]
    from vtrans.deploy.remote_code import is_compressed

    if is_compressed(path):
        from vtrans.surgery import load

        model = load(path)
    else:
        import transformers

        from vtrans.teacher import load_config

        config = load_config(spec)
        model = getattr(transformers, config.architectures[0]).from_pretrained(spec, dtype=torch.float32)
    runner = generate_runner(model, new_tokens) if new_tokens else torch_runner(model)
    return runner, model.config.vocab_size


def compare(specs: list[str], batch_sizes: list[int], seq_lens: list[int], repeats: int = 10,
            warmup: int = 2, new_tokens: int = 0) -> list[dict]:
    """One row per (batch size, sequence length): each model's median and range in ms, and its speedup over the
    first model; of a forward pass over the sequence, or with `new_tokens`, of generating that many tokens
    after it (prefill and decoding)."""
    if len(set(specs)) < len(specs):
        raise UsageError("the same model is named twice; compare different models")
    loaded = {spec: load_runner(spec, new_tokens) for spec in specs}
    runners = {spec: runner for spec, (runner, _) in loaded.items()}
    vocab_size = min(vocab for _, vocab in loaded.values())
    rows = []
    for batch_size in batch_sizes:
        for seq_len in seq_lens:
            times = measure(runners, random_batch(batch_size, seq_len, vocab_size), repeats, warmup)
            first = statistics.median(times[specs[0]])
            rows.append({"batch": batch_size, "seq_len": seq_len, "new_tokens": new_tokens,
                         "threads": torch.get_num_threads(), "models": {
                spec: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                       "speedup": first / statistics.median(t)} for spec, t in times.items()}})
    return rows


def markdown(rows: list[dict]) -> str:
    specs = list(rows[0]["models"])
    lines = ["| batch x tokens | " + " | ".join(f"{spec} ms" for spec in specs) + " |",
             "|---|" + "---|" * len(specs)]
    for row in rows:
        cells = [f"{m['median_ms']:.1f} ({m['min_ms']:.1f}-{m['max_ms']:.1f})"
                 + (f", {m['speedup']:.2f}x" if i else "") for i, m in enumerate(row["models"].values())]
        lines.append(f"| {row['batch']} x {row['seq_len']} | " + " | ".join(cells) + " |")
    what = (f"generating {rows[0]['new_tokens']} tokens greedily after each prompt (prefill and decoding, KV cache)"
            if rows[0]["new_tokens"] else "one forward pass")
    lines += ["", f"Time of {what}: median (min-max) over the repeats, models interleaved; {rows[0]['threads']} "
              "PyTorch threads; speedup against the first model."]
    return "\n".join(lines)


@dataclass(frozen=True)
class LatencyModel:
    """Predicted milliseconds of one forward pass at `batch` x `seq_len` tokens on `machine`."""

    intercept: float
    coefficients: dict[str, float]  # per FEATURES term
    batch: int
    seq_len: int
    machine: str
    dense_measured_ms: float
    fit_error: float  # largest relative error of the fit on the measured cut models

    def predict(self, costs: dict):
        return self.intercept + sum(self.coefficients[name] * costs[name] for name in FEATURES)


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} threads, torch {torch.__version__}"


def _random_kept(dims, fractions: dict[str, float], generator: torch.Generator):
    """Units kept at random: about `fractions[group]` of each group, every layer differently."""
    from vtrans.arch import Kept

    def some(n, fraction):
        k = max(1, round(fraction * n * float(0.8 + 0.4 * torch.rand((), generator=generator))))
        return sorted(torch.randperm(n, generator=generator)[:min(n, k)].tolist())

    return Kept(hidden=some(dims.hidden, fractions["hidden"]),
                heads=[some(dims.heads, fractions["heads"]) for _ in range(dims.layers)],
                ffn=[some(dims.ffn, fractions["ffn"]) for _ in range(dims.layers)],
                attention=(torch.rand(dims.layers, generator=generator) > fractions["drop"]).tolist(),
                ffn_block=(torch.rand(dims.layers, generator=generator) > fractions["drop"]).tolist())


def fit_latency(model: torch.nn.Module, inputs: dict[str, torch.Tensor], seq_len: int, cache: Path | None = None,
                variants: int = 12, repeats: int = 5, keep_hidden: bool = False) -> LatencyModel:
    """Measure this machine's latency model for `model` (dense) on `inputs` (a batch of `seq_len` tokens per
    example); cached in `cache`."""
    from vtrans.arch import Kept, adapter_for
    from vtrans.data import example_count
    from vtrans.surgery import cut_model, write_cache

    batch = example_count(inputs)

    weight = next(model.parameters())
    placement = [str(weight.dtype), torch.cuda.get_device_name(weight.device) if weight.is_cuda else "cpu"]
    identity = [model.config.to_dict(), machine(), placement, batch, seq_len, variants, keep_hidden]
    key = fingerprint(identity)  # the digest the teacher cache keys by (the same key as before it was shared)
    path = cache / "latency" / f"{key}.json" if cache is not None else None
    cached = _read_latency_model(path)
    if cached is not None:
        return cached
    adapter = adapter_for(model)
    dims = adapter.dims()
    generator = torch.Generator().manual_seed(0)
    dense_runner = torch_runner(model)
    rows, dense_times = [], []
    for i in tqdm(range(variants), desc="measuring latency on this machine", leave=False):
        share = 0.1 + 0.9 * i / max(1, variants - 1)  # from a tenth of each group to all of it
        fractions = {group: min(1.0, share * float(0.6 + 0.8 * torch.rand((), generator=generator)))
                     for group in ("hidden", "heads", "ffn")}
        fractions["drop"] = 0.3 * float(torch.rand((), generator=generator)) if i < variants - 1 else 0.0
        kept = Kept.dense(dims) if i == variants - 1 else _random_kept(dims, fractions, generator)
        if keep_hidden:
            kept.hidden = list(range(dims.hidden))
        variant = copy.deepcopy(model)
        cut_model(adapter_for(variant), kept)
        times = measure({"dense": dense_runner, "variant": torch_runner(variant)}, inputs, repeats, warmup=1)
        dense_times.append(statistics.median(times["dense"]))
        costs = adapter.cost(kept.size_tensors(), seq_len)
        rows.append(([float(costs[name]) for name in FEATURES], statistics.median(times["variant"]) / dense_times[-1]))
    dense_ms = statistics.median(dense_times)
    fitted = _nonnegative_fit([features for features, _ in rows], [ratio * dense_ms for _, ratio in rows])
    result = LatencyModel(intercept=fitted[0], coefficients=dict(zip(FEATURES, fitted[1:])), batch=batch,
                          seq_len=seq_len, machine=machine(), dense_measured_ms=dense_ms, fit_error=0.0)
    errors = [abs(float(result.predict(dict(zip(FEATURES, features)))) / (ratio * dense_ms) - 1)
              for features, ratio in rows]
    result = LatencyModel(**(asdict(result) | {"fit_error": max(errors)}))
    if path is not None:
        text = json.dumps(asdict(result), indent=2) + "\n"
        write_cache(path, lambda partial: partial.write_text(text, encoding="utf-8"))
    return result


def _read_latency_model(path: Path | None) -> LatencyModel | None:
    """The cached model at `path`, or None where there is none or it is unusable (written by another version):
    measuring again is always safe."""
    if path is None or not path.is_file():
        return None
    try:
        return LatencyModel(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _nonnegative_fit(features: list[list[float]], targets: list[float]) -> list[float]:
    """[intercept, coefficients...] >= 0 minimising the squared relative error (features scaled to unit size)."""
    from scipy.optimize import nnls

    x = torch.tensor([[1.0, *row] for row in features], dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64)
    scale = x.abs().amax(0).clamp(min=1e-12)
    weights = 1 / y  # relative error: small models count as much as big ones
    solution, _ = nnls(((x / scale) * weights[:, None]).numpy(), (y * weights).numpy())
    return (torch.from_numpy(solution) / scale).tolist()
