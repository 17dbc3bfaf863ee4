"""What a run reports: report.json for a compressed model, the summary printed at the end of a run, and the
HTML page of `vtrans report DIR`."""
from __future__ import annotations

import html
import json
import platform
import resource
from pathlib import Path

import torch

from vtrans.arch import Kept
from vtrans.budget import Budget
from vtrans.errors import UsageError
from vtrans.surgery import write_text


def build_report(*, method: str, objective: str, model: str, data: str, eval_data: str, budget: Budget,
                 dense_cost: dict,
                 compressed_cost: dict, dense_metric: dict, compressed_metric: dict, latency: dict,
                 latency_shape: tuple[int, int], kept: Kept, dense_kept: Kept, compression_seconds: float,
                 phase_seconds: dict[str, float], teacher_cache: str | None, seed: int, tolerance: float,
                 log: list, query_group: int = 1,
                 quantized: dict | None = None) -> dict:
    """`query_group`: query heads per KV head; with grouped-query attention a kept head is a KV head and its
    query heads, and each layer's record gives both counts."""
    target = budget.fraction(dense_cost)
    achieved = float(budget.of(compressed_cost) / budget.of(dense_cost))
    return {
        "method": method,
        "objective": objective,
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
        "kept": _with_query_heads(kept.sizes(), query_group),
        "dense_kept": _with_query_heads(dense_kept.sizes(), query_group),
        "kept_units": {"hidden": kept.hidden, "heads": kept.heads, "ffn": kept.ffn},  # dense indices (probe)
        "compression_seconds": compression_seconds,
        # of it, choosing the kept set (and cutting) and recovering; a resumed run counts from its resume
        "phase_seconds": phase_seconds,
        # units selection (the budget fix-up) added to / removed from the set mask training converged to (VIB
        # methods)
        "selection_fixup": next(({k: row[k] for k in ("added", "removed")} for row in log
                                 if row.get("phase") == "select"), None),
        "teacher_fine_tuned_at": teacher_cache,
        "seed": seed,
        # the process's peak resident memory (teacher, student and data included), from the OS
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # on a GPU, the most its tensors took at once (allocator slack excluded)
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None,
    } | _latency_model(budget, dense_cost, compressed_cost) | _quantized(quantized, latency)


def _quantized(quantized: dict | None, latency: dict) -> dict:
    """The int8 copy's metric, size and latency (measured beside dense and compressed)."""
    if quantized is None:
        return {}
    return {"int8": quantized | {"latency_ms": latency["int8"], "speedup": latency["dense"] / latency["int8"]}}


def _latency_model(budget: Budget, dense_cost: dict, compressed_cost: dict) -> dict:
    """For a latency budget: the latency this machine's fitted model predicted, to set beside the measured one."""
    if budget.latency is None:
        return {}
    return {"latency_model": {"predicted_ms": {"dense": float(budget.of(dense_cost)),
                                               "compressed": float(budget.of(compressed_cost))},
                              "predicted_speedup": float(budget.of(dense_cost) / budget.of(compressed_cost)),
                              "fit_error": budget.latency.fit_error,
                              "coefficients": budget.latency.coefficients,
                              "intercept": budget.latency.intercept}}


def _with_query_heads(sizes: dict, query_group: int) -> dict:
    if query_group > 1:
        sizes["query_heads_per_kv_head"] = query_group
        for layer in sizes["layers"]:
            layer["query_heads"] = layer["heads"] * query_group
    return sizes


def _predicted_line(latency_model: dict | None) -> list[str]:
    if latency_model is None:
        return []
    predicted = latency_model["predicted_ms"]
    return [f"  predicted {predicted['dense']:.1f} ms -> {predicted['compressed']:.1f} ms "
            f"({latency_model['predicted_speedup']:.2f}x) by this machine's latency model "
            f"(fit within {latency_model['fit_error']:.0%} on the cut models it timed)"]


def _int8_line(int8: dict | None, metric: str) -> list[str]:
    if int8 is None:
        return []
    return [f"  int8      {int8['file']}: {metric} {int8['metric'][metric]:.4f}, {int8['size_mb']:.1f} MB, "
            f"{int8['latency_ms']:.1f} ms ({int8['speedup']:.2f}x, onnxruntime)"]


def summary(report: dict, out) -> str:
    dense, small = report["dense"], report["compressed"]
    metric = next(iter(dense["metric"]))
    budget = report["budget"]
    layers = report["kept"]["layers"]
    group = report["kept"].get("query_heads_per_kv_head", 1)
    heads = f"KV heads (x{group} query heads)" if group > 1 else "heads"
    per_layer = " ".join(
        f"{layer['heads'] if layer['attention'] else '-'}/{layer['ffn'] if layer['ffn_block'] else '-'}"
        for layer in layers)
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
        *_predicted_line(report.get("latency_model")),
        *_int8_line(report.get("int8"), metric),
        f"  kept      hidden {report['kept']['hidden']}; {heads}/FFN per layer: {per_layer}",
        *_fixup_line(report.get("selection_fixup")),
        f"  time      {report['compression_seconds']:.0f} s{_phases(report.get('phase_seconds'))}; "
        f"peak memory {report.get('peak_memory_mb', 0) / 1024:.1f} GB",
        f"  load it:  vtrans.load('{out}')",
    ])


def _phases(seconds: dict | None) -> str:
    """' (choosing X s, recovering Y s)' where the report has them (reports before vtrans timed phases do not)."""
    if not seconds:
        return ""
    return f" (choosing {seconds['choose']:.0f} s, recovering {seconds['recover']:.0f} s)"


def _fixup_line(fixup: dict | None) -> list[str]:
    """How far selection (the budget fix-up) moved the kept set that mask training converged to (none: no such
    line)."""
    if fixup is None:
        return []
    moved = [f"+{fixup['added'][g]}/-{fixup['removed'][g]} {g}" for g in fixup["added"]
             if fixup["added"][g] or fixup["removed"][g]]
    return [f"  selection {', '.join(moved) if moved else 'as training left it'}"]


PIPELINE_TAGS = {"classification": "text-classification", "lm": "text-generation", "features": "feature-extraction",
                 "image": "image-classification"}
PROCESSORS = {"image": ("AutoImageProcessor", "processor")}  # what prepares inputs, if not a tokenizer


def model_card(report: dict, auto_class: str) -> str:
    """DIR/README.md: a Hugging Face Hub model card (YAML header, then what was compressed, to what budget, what it
    achieved and kept, and how to load it with `auto_class`)."""
    dense, small, budget = report["dense"], report["compressed"], report["budget"]
    metric = next(iter(dense["metric"]))
    setting = report["latency_setting"]
    base = report["model"]
    header = ["---", "library_name: transformers", "tags:", "- vtrans", "- pruned", "- structured-pruning",
              f"pipeline_tag: {PIPELINE_TAGS.get(report.get('objective', 'classification'))}"]
    if "/" in base and not Path(base).exists():  # a Hub name, not a local path
        header.append(f"base_model: {base}")
    processor_class, processor = PROCESSORS.get(report.get("objective"), ("AutoTokenizer", "tokenizer"))
    layers = [f"| {i} | {layer['heads'] if layer['attention'] else 0} / {d['heads']} | "
              f"{layer['ffn'] if layer['ffn_block'] else 0} / {d['ffn']} |"
              for i, (layer, d) in enumerate(zip(report["kept"]["layers"], report["dense_kept"]["layers"]))]
    return "\n".join([
        *header, "---", "",
        f"# {Path(base).name}, compressed by vtrans ({report['method']})", "",
        f"A structurally pruned copy of `{base}`: a smaller dense model, every layer with its own sizes. "
        f"Budget: {budget['kind']} at most {budget['target_fraction']:.4f} of the dense model; achieved "
        f"{budget['achieved_fraction']:.4f}.", "",
        "| | " + metric + " | parameters | FLOPs per " + f"{report['target']['seq_len']}-token sequence | "
        f"latency ms (batch {setting['batch']} x {setting['seq_len']}) |",
        "|---|---|---|---|---|",
        f"| dense | {dense['metric'][metric]:.4f} | {dense['params']:,} | {dense['flops']:,} | "
        f"{dense['latency_ms']:.1f} |",
        f"| compressed | {small['metric'][metric]:.4f} | {small['params']:,} | {small['flops']:,} | "
        f"{small['latency_ms']:.1f} ({report['speedup']:.2f}x) |", "",
        f"Evaluated on {report['data']['eval']}; latency measured on {setting['machine']} with "
        f"{setting['threads']} threads, dense and compressed interleaved.", "",
        f"Kept: hidden width {report['kept']['hidden']} of {report['dense_kept']['hidden']}; per layer:", "",
        "| layer | heads | FFN neurons |", "|---|---|---|", *layers, "",
        "## Load it", "",
        "With transformers alone (the directory carries its modeling code, `modeling_vtrans.py`, which resizes the",
        "dense architecture to the kept sizes in `config.json`):", "",
        "```python", f"from transformers import {processor_class}, {auto_class}", "",
        f"model = {auto_class}.from_pretrained(\"path/to/this/directory\", trust_remote_code=True)",
        f"{processor} = {processor_class}.from_pretrained(\"path/to/this/directory\", trust_remote_code=True)", "```",
        "",
        *_sentence_transformers_lines(report),
        "Or with vtrans installed, without running that code: `model = vtrans.load(\"path/to/this/directory\")`.", ""])


def _sentence_transformers_lines(report: dict) -> list[str]:
    if report.get("objective") != "features":
        return []
    return ["A sentence embedder keeps its pooling: "
            "`SentenceTransformer(\"path/to/this/directory\", trust_remote_code=True)`.", ""]


def write_html(out: str | Path) -> Path:
    """DIR/report.html: one self-contained page (no scripts, no network; PNGs beside it in DIR) on what the
    compression cost and kept, its training curves, and the attention probe if DIR/probe exists."""
    from vtrans import plots

    out = Path(out)
    path = out / "report.json"
    if not path.is_file():
        raise UsageError(f"{out}: no report.json; give a directory written by vtrans compress")
    report = json.loads(path.read_text())
    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else []
    kept_png = plots.kept_per_layer([(f"{report['method']} at {report['budget']['kind']}="
                                      f"{report['budget']['target_fraction']:.4g}", report["kept"],
                                      report["dense_kept"])], out / "report_kept.png")
    curves_png = plots.training_curves(log, out / "report_training.png")
    probe_path = out / "probe" / "probe.json"
    probe = json.loads(probe_path.read_text()) if probe_path.is_file() else None

    dense, small, budget = report["dense"], report["compressed"], report["budget"]
    metric = next(iter(dense["metric"]))
    setting = report["latency_setting"]
    parts = [f"<h1>vtrans: {e(report['method'])} on {e(report['model'])}</h1>",
             f"<p>Data: {e(report['data']['train'])}; evaluated on {e(report['data']['eval'])}. "
             f"Compression took {report['compression_seconds']:.0f} s{_phases(report.get('phase_seconds'))} "
             f"(seed {report['seed']}).</p>",
             "<h2>Budget</h2>",
             table(["kind", "target (fraction of dense)", "achieved", "met"],
                   [[budget["kind"], f"{budget['target_fraction']:.4f}", f"{budget['achieved_fraction']:.4f}",
                     "yes" if budget["met"] else f"NO (tolerance {budget['tolerance']:.0%})"]]),
             "<h2>Dense vs compressed</h2>",
             table(["", metric, "parameters", f"FLOPs per {report['target']['seq_len']}-token sequence",
                    f"latency (ms, batch {setting['batch']} x {setting['seq_len']}, {setting['threads']} threads)"],
                   [["dense", f"{dense['metric'][metric]:.4f}", f"{dense['params']:,}", f"{dense['flops']:,}",
                     f"{dense['latency_ms']:.1f}"],
                    ["compressed", f"{small['metric'][metric]:.4f}", f"{small['params']:,}", f"{small['flops']:,}",
                     f"{small['latency_ms']:.1f}"],
                    ["change", f"{small['metric'][metric] - dense['metric'][metric]:+.4f}",
                     f"{small['params'] / dense['params']:.3f}", f"{small['flops'] / dense['flops']:.3f}",
                     f"{report['speedup']:.2f}x faster"]]),
             f"<p>Latency is measured on this machine ({e(setting['machine'])}), dense and compressed "
             "interleaved in one process.</p>",
             "<h2>What was kept</h2>",
             f"<p>Hidden width {report['kept']['hidden']} of {report['dense_kept']['hidden']}.</p>",
             image(kept_png.name, "kept heads and FFN neurons per layer"),
             table(["layer", "heads", "FFN neurons", "attention block", "FFN block"],
                   [[i, f"{layer['heads']} / {d['heads']}", f"{layer['ffn']} / {d['ffn']}",
                     "kept" if layer["attention"] else "dropped", "kept" if layer["ffn_block"] else "dropped"]
                    for i, (layer, d) in enumerate(zip(report["kept"]["layers"], report["dense_kept"]["layers"]))]),
             "<h2>Training</h2>",
             image(curves_png.name, "training curves") if curves_png else
             "<p>This method does not train (one-shot): no curves.</p>"]
    if probe is not None:
        parts += probe_section(probe)
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>vtrans report: {e(report['method'])}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    html_path = out / "report.html"
    write_text(html_path, page)
    return html_path


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}"
         "img{max-width:100%;border:1px solid #eee;margin:0.4em 0}"
         ".grid{display:flex;flex-wrap:wrap;gap:4px}.grid img{width:49%}")


def e(value) -> str:
    return html.escape(str(value))


def table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def image(relative: str, alt: str) -> str:
    return f'<p><img src="{e(relative)}" alt="{e(alt)}"></p>'


def probe_section(probe: dict) -> list[str]:
    parts = ["<h2>Attention probe</h2>",
             f"<p>{probe['samples']} examples ({probe['query_tokens']} query tokens) of {e(probe['data'])}; "
             f"special tokens: {e(', '.join(probe['special_tokens']))}."
             + (" Red crosses mark pruned heads." if probe.get("kept_heads") else "") + "</p>"]
    claim = probe.get("claim")
    if claim:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        parts += ["<p>The paper's claim: pruned heads put more attention on special and current tokens than "
                  "kept heads. One-sided Mann-Whitney U test (pruned &gt; kept):</p>",
                  table(["measure", "pruned heads", "mean (pruned)", "kept heads", "mean (kept)", "U",
                         "P(pruned > kept)", "p-value"],
                        [[name, r["pruned_heads"], fmt(r["pruned_mean"], ".3f"), r["kept_heads"],
                          fmt(r["kept_mean"], ".3f"), fmt(r.get("u"), ".1f"), fmt(r.get("effect"), ".2f"),
                          fmt(r.get("p_value"), ".3g")] for name, r in claim.items()])]
    parts.append('<div class="grid">' + "".join(
        f'<img src="probe/{m}.png" alt="probe: {m}">' for m in ("special", "current", "previous", "rest", "entropy"))
        + "</div>")
    if probe.get("examples"):
        parts += ["<h3>Examples: most attended tokens</h3>",
                  table(["sentence", "kept heads", "pruned heads"],
                        [[v["text"][:100], ", ".join(f"{t} {m:.2f}" for t, m in v["kept_top"]),
                          ", ".join(f"{t} {m:.2f}" for t, m in v["pruned_top"])] for v in probe["examples"]]),
                  image("probe/examples.png", "attention received per token, kept vs pruned heads")]
    return parts
