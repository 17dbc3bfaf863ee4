"""`vtrans bench`: every method at every target on the same model, split, seed and machine, side by side.

Each run is an ordinary `compress` into DIR/models/METHOD-TARGET (so every model can be loaded and
probed). `METHOD+recover` runs METHOD followed by the recovery VTrans gets by default (`--recover-epochs`,
or as many epochs as `--prune-epochs`, 1 by default), on all the training data (`--recover-fraction`, also for
the sampled variants): one-shot and sampled choices then compare with VTrans like for like. After each run
DIR/bench.json and DIR/bench.md are rewritten, so an interrupted bench keeps what finished; the plots are
drawn at the end. A method that fails is a failed row; the others still run.
"""
from __future__ import annotations

import json
import re
import traceback
from pathlib import Path

from tqdm.auto import tqdm

from vtrans import plots
from vtrans.api import compress
from vtrans.budget import parse_target
from vtrans.errors import UsageError
from vtrans.methods import METHODS
from vtrans.surgery import check_output_dir, write_text

COLUMNS = (
    "method",
    "target",
    "FLOPs kept",
    "params",
    "metric",
    "compression s (choose + recover)",
    "latency ms (dense -> ours)",
    "speedup",
)


RECOVER = "+recover"


def method_options(name: str, options: dict) -> tuple[str, dict]:
    """The method a bench row runs, and its options: `METHOD+recover` gets VTrans's default recovery."""
    if not name.endswith(RECOVER):
        return name, options
    epochs = options.get("recover_epochs") or options.get("prune_epochs") or 1.0
    fraction = options.get("recover_fraction") or 1.0
    return name.removesuffix(RECOVER), options | {"recover_epochs": epochs, "recover_fraction": fraction}


def run_name(method: str, target: str) -> str:
    return f"{method}-{re.sub(r'[^A-Za-z0-9.]+', '', target)}"


def row_of(method: str, target: str, result=None, error: str | None = None) -> dict:
    if result is None:
        return {"method": method, "target": target, "status": "failed", "error": error}
    report = result.report
    dense, small = report["dense"], report["compressed"]
    metric = next(iter(dense["metric"]))
    return {"method": method, "target": target, "status": "ok", "out": str(result.out),
            "achieved_flops": small["flops"] / dense["flops"], "achieved_params": small["params"] / dense["params"],
            "budget_met": report["budget"]["met"], "flops": small["flops"], "params": small["params"],
            "dense_flops": dense["flops"], "dense_params": dense["params"],
            "metric": metric, "value": small["metric"][metric], "dense_value": dense["metric"][metric],
            "compression_seconds": report["compression_seconds"], "phase_seconds": report["phase_seconds"],
            "latency_ms": small["latency_ms"], "dense_latency_ms": dense["latency_ms"], "speedup": report["speedup"],
            "latency_setting": report["latency_setting"], "kept": report["kept"], "dense_kept": report["dense_kept"]}


def _seconds(row: dict) -> str:
    """The compression time and its parts: 'total (choose + recover)'."""
    phases = row["phase_seconds"]
    return f"{row['compression_seconds']:.0f} ({phases['choose']:.0f} + {phases['recover']:.0f})"


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r["status"] != "ok":
            error = " ".join(str(r["error"]).split()).replace("|", "/")  # one table cell
            lines.append(f"| {r['method']} | {r['target']} | failed: {error} |" + " |" * (len(COLUMNS) - 3))
            continue
        lines.append(f"| {r['method']} | {r['target']} | {r['achieved_flops']:.4f} | {r['params'] / 1e6:.2f}M | "
                     f"{r['metric']} {r['value']:.4f} | {_seconds(r)} | "
                     f"{r['dense_latency_ms']:.1f} -> {r['latency_ms']:.1f} | {r['speedup']:.2f}x |")
    done = [r for r in rows if r["status"] == "ok"]
    if done:
        r, setting = done[0], done[0]["latency_setting"]
        lines.append(f"| dense | - | 1.0000 | {r['dense_params'] / 1e6:.2f}M | {r['metric']} {r['dense_value']:.4f} "
                     f"| - | {r['dense_latency_ms']:.1f} | 1.00x |")
        lines.append(f"\nLatency: median forward time, batch {setting['batch']} x {setting['seq_len']} tokens, "
                     f"{setting['threads']} threads, dense and compressed interleaved in the same process.")
    return "\n".join(lines)


def write_results(rows: list[dict], out: Path) -> None:
    write_text(out / "bench.json", json.dumps(rows, indent=2))
    write_text(out / "bench.md", markdown(rows) + "\n")


def draw(rows: list[dict], out: Path, plot_method: str) -> list[Path]:
    done = [r for r in rows if r["status"] == "ok"]
    if not done:
        return []
    paths = [plots.metric_vs_flops(rows, out / "metric_vs_flops.png"),
             plots.compression_time(rows, out / "compression_time.png")]
    chosen = [r for r in done if r["method"] == plot_method]
    if chosen:
        panels = [(f"{r['method']} at {r['target']}", r["kept"], r["dense_kept"]) for r in chosen]
        paths.append(plots.kept_per_layer(panels, out / f"kept_{plot_method}.png"))
    return paths


def bench(model: str | None, data: str | None, methods: list[str], targets: list[str], out: str | Path,
          plot_method: str | None = None, overwrite: bool = False, say=print, **options) -> list[dict]:
    """Run `compress` for every method x target; write DIR/bench.json, bench.md and the PNG plots."""
    methods, targets = list(dict.fromkeys(methods)), list(dict.fromkeys(targets))  # each run once
    unknown = [m for m in methods if m.removesuffix(RECOVER) not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods {','.join(unknown) or '(none)'}: choose from {', '.join(METHODS)}, each "
                         f"optionally with {RECOVER} (e.g. fisher{RECOVER})")
    if not targets:
        raise UsageError("--targets: give at least one, e.g. flops=0.6,flops=0.4")
    for target in targets:
        parse_target(target, 2)  # syntax errors now, not after an hour of runs
    plot_method = plot_method or methods[0]
    if plot_method not in methods:
        raise UsageError(f"--plot-method {plot_method} is not one of --methods {','.join(methods)}")
    out = Path(out)
    check_output_dir(out, overwrite)
    (out / "models").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    runs = [(m, t) for t in targets for m in methods]
    for method, target in tqdm(runs, desc="bench", unit="run", dynamic_ncols=True):
        say(f"vtrans bench: {method} at {target}")
        try:
            base, run_options = method_options(method, options)
            result = compress(model, data, target=target, method=base, out=out / "models" / run_name(method, target),
                              overwrite=True, say=say, **run_options)
            rows.append(row_of(method, target, result))
        except UsageError as e:  # bad input for this method (e.g. a budget below its floor): a failed row
            rows.append(row_of(method, target, error=str(e)))
        except Exception as e:  # noqa: BLE001 - one failed method must not stop the others
            traceback.print_exc()
            rows.append(row_of(method, target, error=f"{type(e).__name__}: {e}"))
        write_results(rows, out)
    draw(rows, out, plot_method)
    return rows
