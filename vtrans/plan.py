"""`vtrans plan`: what a run needs, from the model's config alone (no weights are read).

Parameters and FLOPs come from the family adapter on an empty-weights skeleton, exactly as a run counts them.
Peak memory is an estimate, in float32, of the largest things a run holds at once:

    runtime      Python, torch and transformers (measured: about 0.3 GB)
    weights      the dense teacher and the student: 2 x 4 P bytes (P parameters)
    training     gradients and Adam's two moments of the student when weights train (vtrans, fast-vtrans, and
                 any recovery): 3 x 4 P
    activations  what backpropagation keeps, per layer and token: the residual stream and its norms, query, key,
                 value, context and output (about 18 h floats), the MLP's input and output of width f (3 f),
                 attention scores and probabilities (2 x query heads x S): L x B x S x (18 h + 3 f + 2 n S) x 4
                 bytes; forward-only methods (magnitude, random, the evaluation) keep one layer's worth
    head         logits of student and teacher, their log-softmax and gradient: 4 x tokens x outputs x 4 bytes,
                 where a language model's head reads all B x S tokens and a classifier's one per sequence
    OPTIN        forward only, but on its calibration sequences times the units it ablates per forward (8 x 32):
                 one layer's activations and the head's logits for that many sequences

It leaves out the allocator's slack and short-lived copies, so a measured peak runs above it (see README).
"""
from __future__ import annotations

from dataclasses import dataclass

from accelerate import init_empty_weights

from vtrans.arch import adapter_for
from vtrans.budget import check_reachable, dense_cost, parse_target
from vtrans.methods import METHODS
from vtrans.methods.optin import OptinSettings
from vtrans.objectives import objective_for
from vtrans.teacher import load_config

RUNTIME_BYTES = 0.3 * 2**30
FLOAT = 4  # bytes, float32
OPTIN_BATCH = OptinSettings().calibration_samples * OptinSettings().units_per_forward  # sequences per forward


@dataclass(frozen=True)
class Estimate:
    method: str
    weights: float  # bytes
    training: float
    activations: float
    head: float

    @property
    def peak(self) -> float:
        return RUNTIME_BYTES + self.weights + self.training + self.activations + self.head


def estimate(method: str, params: float, dims, outputs: int, head_all_tokens: bool, batch: int,
             seq_len: int) -> Estimate:
    trains = METHODS[method].trains
    backprop = method not in ("magnitude", "random", "optin")  # masks (or weights) get gradients
    if method == "optin":
        batch = OPTIN_BATCH
    per_token = 18 * dims.hidden + 3 * dims.ffn + 2 * dims.heads * dims.query_group * seq_len
    layers = dims.layers if backprop else 1
    activations = layers * batch * seq_len * per_token * FLOAT
    head_tokens = batch * seq_len if head_all_tokens else batch
    return Estimate(method=method, weights=2 * FLOAT * params, training=3 * FLOAT * params if trains else 0.0,
                    activations=activations, head=4 * head_tokens * outputs * FLOAT)


def plan(model: str, target: str, methods: list[str], objective: str = "classification", batch: int = 32,
         seq_len: int = 128) -> dict:
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
    return {
        "model": model,
        "target": target,
        "batch": batch,
        "seq_len": seq_len,
        "dense": {"params": dense["params"], "flops": dense["flops"]},
        "budget": {"kind": budget.kind, "fraction": fraction, "value": fraction * dense[budget.kind]},
        "peak_gb": {m: estimate(m, dense["params"], dims, outputs, head_all_tokens, batch, seq_len).peak / 2**30
                    for m in methods},
    }


def markdown(result: dict) -> str:
    dense, budget = result["dense"], result["budget"]
    lines = [f"{result['model']}: {dense['params'] / 1e6:,.1f}M parameters, {dense['flops'] / 1e9:,.2f} GFLOPs per "
             f"{result['seq_len']}-token sequence",
             f"target {result['target']}: {budget['kind']} at most {budget['value']:,.0f} "
             f"({budget['fraction']:.3f} of dense)", "",
             f"| method | estimated peak memory, batch {result['batch']} x {result['seq_len']} (GB, float32) |",
             "|---|---|"]
    lines += [f"| {method} | {gb:.1f} |" for method, gb in result["peak_gb"].items()]
    lines += ["", "An estimate from the config alone (vtrans/plan.py says what it counts); a run's measured peak is "
              "in its report.json."]
    return "\n".join(lines)
