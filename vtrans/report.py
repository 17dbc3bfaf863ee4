"""report.json for a compressed model, and the short summary printed at the end of a run."""
from __future__ import annotations

import platform

import torch

from vtrans.arch import Kept
from vtrans.budget import Budget


def build_report(*, method: str, model: str, data: str, eval_data: str, budget: Budget, dense_cost: dict,
                 compressed_cost: dict, dense_metric: dict, compressed_metric: dict, latency: dict,
                 latency_shape: tuple[int, int], kept: Kept, dense_kept: Kept, compression_seconds: float,
                 teacher_cache: str | None, seed: int, tolerance: float) -> dict:
    target = budget.fraction(dense_cost)
    achieved = compressed_cost[budget.kind] / dense_cost[budget.kind]
    return {
        "method": method,
        "model": model,
        "data": {"train": data, "eval": eval_data},
        "target": budget.to_dict(),
        "budget": {"kind": budget.kind, "target_fraction": target, "achieved_fraction": achieved,
                   "met": achieved <= target + 1e-12 and achieved >= target * (1 - tolerance),
                   "tolerance": tolerance},
        "dense": {"params": int(dense_cost["params"]), "flops": int(dense_cost["flops"]),
                  "metric": dense_metric, "latency_ms": latency["dense"]},
        "compressed": {"params": int(compressed_cost["params"]), "flops": int(compressed_cost["flops"]),
                       "metric": compressed_metric, "latency_ms": latency["compressed"]},
        "speedup": latency["dense"] / latency["compressed"],
        "latency_setting": {"batch": latency_shape[0], "seq_len": latency_shape[1],
                            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()},
        "kept": kept.sizes(),
        "dense_kept": dense_kept.sizes(),
        "kept_units": {"hidden": kept.hidden, "heads": kept.heads, "ffn": kept.ffn},  # dense indices (probe)
        "compression_seconds": compression_seconds,
        "teacher_fine_tuned_at": teacher_cache,
        "seed": seed,
    }


def summary(report: dict, out) -> str:
    dense, small = report["dense"], report["compressed"]
    metric = next(iter(dense["metric"]))
    budget = report["budget"]
    layers = report["kept"]["layers"]
    per_layer = " ".join(f"{l['heads'] if l['attention'] else '-'}/{l['ffn'] if l['ffn_block'] else '-'}"
                         for l in layers)
    return "\n".join([
        f"vtrans {report['method']}: {report['model']} -> {out}",
        f"  budget    {budget['kind']} <= {budget['target_fraction']:.4f} of dense: achieved "
        f"{budget['achieved_fraction']:.4f} ({'met' if budget['met'] else 'NOT met'})",
        f"  {metric:<9} {dense['metric'][metric]:.4f} dense -> {small['metric'][metric]:.4f} compressed",
        f"  params    {dense['params']:,} -> {small['params']:,}",
        f"  FLOPs     {dense['flops']:,} -> {small['flops']:,} (per {report['target']['seq_len']}-token sequence)",
        f"  latency   {dense['latency_ms']:.1f} ms -> {small['latency_ms']:.1f} ms "
        f"({report['speedup']:.2f}x, batch {report['latency_setting']['batch']} x "
        f"{report['latency_setting']['seq_len']} tokens, measured here)",
        f"  kept      hidden {report['kept']['hidden']}; heads/FFN per layer: {per_layer}",
        f"  time      {report['compression_seconds']:.0f} s",
        f"  load it:  vtrans.load('{out}')",
    ])
