"""`vtrans plan`: what a run needs, from the model's config alone (no weights are read).

Parameters and FLOPs come from the family adapter on an empty-weights skeleton, exactly as a run counts them.
Peak memory is an estimate, per process, of the largest things a run holds at once:

    runtime      Python, torch and transformers (measured: about 0.3 GB)
    weights      the dense teacher and the student: 2 x 4 P bytes (P parameters) in float32; with
                 --dtype bfloat16 the frozen ones take 2 P (the teacher, and the student unless its weights train)
    training     gradients and Adam's two moments of the student when weights train (vtrans, fast-vtrans, and
                 any recovery): 3 x 4 P
    activations  what backpropagation keeps, per layer and token: the residual stream and its norms, query, key,
                 value, context and output (about 18 h floats), the MLP's input and output of width f (3 f),
                 attention scores and probabilities (2 x query heads x S): L x B x S x (18 h + 3 f + 2 n S) x 4
                 bytes, B being the process's share of the batch (data parallel: batch / processes);
                 forward-only methods (magnitude, random, the evaluation) keep one layer's worth; with gradient
                 checkpointing, while weights train, each layer keeps only its input (h) and one layer is
                 recomputed at a time
    head         logits of student and teacher, their log-softmax and gradient: 4 x tokens x outputs x 4 bytes,
                 where a language model's head reads all B x S tokens and a classifier's one per sequence
    OPTIN        forward only, but on its calibration sequences times the units it ablates per forward (8 x 32):
                 one layer's activations and the head's logits for that many sequences
    rescale      the least-squares rescaling (methods/rescale.py: fisher, fast- and faster-vtrans), after training has
                 let go of its activations: its 512 examples' residual streams, the process's share of them, at
                 the current layer (the student's, the dense model's and the dense stream after each group's
                 add) and the next while it advances: 5 x 512 x S x h floats; the layers' recorded attention
                 masks, at most 512 x S x S floats; and one group's normal equations, the widest being the
                 FFN's (n = f units; n = query heads x head width for the heads): the units' inputs' Gram
                 matrix, the weights' and their product in float64, 24 n^2 bytes. A run's peak is the larger
                 of this and training's activations and head.

It leaves out the allocator's slack and short-lived copies, so a measured peak runs above it (see README).
"""
from __future__ import annotations

from dataclasses import dataclass

from accelerate import init_empty_weights

from vtrans.arch import adapter_for
from vtrans.budget import check_reachable, dense_cost, parse_target
from vtrans.methods import METHODS
from vtrans.methods.rescale import RescaleSettings
from vtrans.objectives import objective_for
from vtrans.teacher import load_config

RUNTIME_BYTES = 0.3 * 2**30
FLOAT = 4  # bytes, float32


@dataclass(frozen=True)
class Estimate:
    method: str
    weights: float  # bytes
    training: float
    activations: float
    head: float
    rescale: float = 0.0  # the least-squares rescaling's stored streams and normal equations, after training

    @property
    def peak(self) -> float:
        return RUNTIME_BYTES + self.weights + self.training + max(self.activations + self.head, self.rescale)


@dataclass(frozen=True)
class Lean:
    """The memory options of a run (see `compress --help`)."""

    frozen_bytes: int = FLOAT  # bytes per frozen weight: 4 (float32) or 2 (bfloat16)
    gradient_checkpointing: bool = False
    processes: int = 1  # data-parallel processes sharing the batch


def rescale_bytes(dims, seq_len: int, processes: int) -> float:
    examples = -(-RescaleSettings().samples // processes)
    streams = 5 * examples * seq_len * dims.hidden * FLOAT
    attention_masks = examples * seq_len * seq_len * FLOAT
    widest = max(dims.ffn, dims.heads * dims.query_group * dims.head_dim)  # the readers' input widths
    return streams + attention_masks + 24 * widest * widest


def estimate(method: str, params: float, dims, outputs: int, head_all_tokens: bool, batch: int,
             seq_len: int, lean: Lean = Lean(), rescales: bool = False) -> Estimate:
    spec = METHODS[method]
    trains = spec.trains
    backprop = spec.backprop
    if spec.forward_sequences is not None:  # the method's own batch, on every process (OPTIN)
        batch = spec.forward_sequences
    else:  # data parallel: each process its share of the batch
        batch = -(-batch // lean.processes)
    per_token = 18 * dims.hidden + 3 * dims.ffn + 2 * dims.heads * dims.query_group * seq_len
    if backprop and trains and lean.gradient_checkpointing:  # layer inputs kept, one layer recomputed at a time
        activations = (dims.layers * dims.hidden + per_token) * batch * seq_len * FLOAT
    else:
        activations = (dims.layers if backprop else 1) * batch * seq_len * per_token * FLOAT
    head_tokens = batch * seq_len if head_all_tokens else batch
    student_bytes = FLOAT if trains else lean.frozen_bytes
    return Estimate(method=method, weights=(lean.frozen_bytes + student_bytes) * params,
                    training=3 * FLOAT * params if trains else 0.0, activations=activations,
                    head=4 * head_tokens * outputs * FLOAT,
                    rescale=rescale_bytes(dims, seq_len, lean.processes) if rescales else 0.0)


def plan(model: str, target: str, methods: list[str], objective: str = "classification", batch: int = 32,
         seq_len: int = 128, lean: Lean = Lean()) -> dict:
    """Parameters, FLOPs (dense and at the target) and each method's estimated peak memory."""
    config = load_config(model)
    auto_class = objective_for(objective).auto_class()
    with init_empty_weights():
        adapter = adapter_for(auto_class.from_config(config))
    budget = parse_target(target, seq_len)
    if budget.kind == "latency":
        from vtrans.errors import UsageError

        raise UsageError("--target latency=...: plan reads no weights and times nothing; give flops= or params=")
    check_reachable(adapter, budget)
    dense = dense_cost(adapter, seq_len)
    fraction = budget.fraction(dense)
    dims = adapter.dims()
    head_all_tokens = adapter.traits.head_tokens == "all" and objective == "lm"
    outputs = adapter.head_outputs()
    peak_gb = {}
    for method in methods:
        estimated = estimate(method, dense["params"], dims, outputs, head_all_tokens, batch, seq_len, lean,
                             rescales=METHODS[method].rescales(adapter))
        peak_gb[method] = estimated.peak / 2**30
    return {
        "model": model,
        "target": target,
        "batch": batch,
        "seq_len": seq_len,
        "dense": {"params": dense["params"], "flops": dense["flops"]},
        "budget": {"kind": budget.kind, "fraction": fraction, "value": fraction * dense[budget.kind]},
        "lean": vars(lean),
        "peak_gb": peak_gb,
    }


def markdown(result: dict) -> str:
    dense, budget = result["dense"], result["budget"]
    lines = [f"{result['model']}: {dense['params'] / 1e6:,.1f}M parameters, {dense['flops'] / 1e9:,.2f} GFLOPs per "
             f"{result['seq_len']}-token sequence",
             f"target {result['target']}: {budget['kind']} at most {budget['value']:,.0f} "
             f"({budget['fraction']:.3f} of dense)", "",
             f"| method | estimated peak memory per process, batch {result['batch']} x {result['seq_len']} "
             f"({_lean_label(result['lean'])}), GB |",
             "|---|---|"]
    lines += [f"| {method} | {gb:.1f} |" for method, gb in result["peak_gb"].items()]
    lines += ["", "An estimate from the config alone (vtrans/plan.py says what it counts); a run's measured peak is "
              "in its report.json."]
    return "\n".join(lines)


def _lean_label(lean: dict) -> str:
    parts = ["frozen weights in bfloat16" if lean["frozen_bytes"] == 2 else "float32"]
    if lean["gradient_checkpointing"]:
        parts.append("gradient checkpointing")
    if lean["processes"] > 1:
        parts.append(f"{lean['processes']} processes")
    return ", ".join(parts)
