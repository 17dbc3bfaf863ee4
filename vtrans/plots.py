"""Every picture vtrans draws (PNG, matplotlib without a display): bench comparisons, what a compressed model
keeps per layer, training curves, probe heatmaps. Each function writes one file and returns its path."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def metric_vs_flops(rows: list[dict], path: Path) -> Path:
    """The task metric against the share of dense FLOPs kept: one line per method, dense as a reference."""
    done = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in dict.fromkeys(r["method"] for r in done):
        points = sorted((r["achieved_flops"], r["value"]) for r in done if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    if done:
        dense = done[0]["dense_value"]
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.4f})")
        ax.plot([1.0], [dense], marker="*", color="black", markersize=12)
        ax.set_ylabel(done[0]["metric"])
    ax.set_xlabel("FLOPs kept (fraction of dense)")
    ax.set_title("Metric vs FLOPs kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def compression_time(rows: list[dict], path: Path) -> Path:
    """Wall time of each method at each target, log scale."""
    done = [r for r in rows if r["status"] == "ok"]
    methods = list(dict.fromkeys(r["method"] for r in done))
    targets = list(dict.fromkeys(r["target"] for r in done))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    width = 0.8 / max(1, len(targets))
    for k, target in enumerate(targets):
        seconds = [next((r["compression_seconds"] for r in done if r["method"] == m and r["target"] == target),
                        np.nan) for m in methods]
        bars = ax.bar(np.arange(len(methods)) + k * width, seconds, width, label=target)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(np.arange(len(methods)) + width * (len(targets) - 1) / 2, methods, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("compression wall time (s, log scale)")
    ax.set_title("Compression time per method")
    ax.legend(fontsize=8)
    return _save(fig, path)


def draw_kept(ax, kept: dict, dense: dict, title: str) -> None:
    """Per layer: the share of heads and FFN neurons kept, counts on the bars, dropped blocks marked."""
    layers, dense_layers = kept["layers"], dense["layers"]
    x = np.arange(len(layers))
    heads = [layer["heads"] / d["heads"] for layer, d in zip(layers, dense_layers)]
    ffn = [layer["ffn"] / d["ffn"] for layer, d in zip(layers, dense_layers)]
    for offset, shares, key, block, label, color in (
            (-0.2, heads, "heads", "attention", "attention heads", "tab:blue"),
            (0.2, ffn, "ffn", "ffn_block", "FFN neurons", "tab:orange")):
        bars = ax.bar(x + offset, shares, 0.4, label=label, color=color)
        ax.bar_label(bars, labels=[str(layer[key]) if layer[block] else "" for layer in layers], fontsize=7)
        for i, layer in enumerate(layers):
            if not layer[block]:
                ax.text(i + offset, 0.02, "block\ndropped", ha="center", fontsize=6, color="tab:red")
    ax.set_xticks(x, [f"layer {i}" for i in x], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share kept")
    ax.set_title(f"{title}\nhidden width {kept['hidden']} of {dense['hidden']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")


def kept_per_layer(panels: list[tuple[str, dict, dict]], path: Path) -> Path:
    """One `draw_kept` panel per (title, kept sizes, dense sizes)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 3.8), squeeze=False)
    for ax, (title, kept, dense) in zip(axes[0], panels):
        draw_kept(ax, kept, dense, title)
    return _save(fig, path)


def training_curves(log: list[dict], path: Path) -> Path | None:
    """Task and distillation loss, KL, and the expected cost against its target over the pruning steps, and
    the loss while recovering. None when the method logs no training (one-shot methods)."""
    prune = [r for r in log if r.get("phase") == "prune"]
    recover = [r for r in log if r.get("phase") == "recover"]
    if not prune and not recover:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    if prune:
        steps = [r["step"] for r in prune]
        if any(r["task"] for r in prune):  # none where every batch was a varied copy without labels
            axes[0].plot(steps, [r["task"] for r in prune], color="tab:blue", label="task loss")
        axes[0].plot(steps, [r["distill"] for r in prune], color="tab:orange", label="distillation loss")
        axes[1].plot(steps, [r["kl"] for r in prune], color="tab:green", label="KL (mean per unit)")
        axes[2].plot(steps, [r["expected_cost"] for r in prune], label="expected cost")
        axes[2].plot(steps, [r["kept_cost"] for r in prune], label="cost of units kept now")
        axes[2].plot(steps, [r["target"] for r in prune], "--", color="black", label="target (ramped)")
    if recover:  # recovery steps continue the step axis after the cut
        after = [r["step"] + (prune[-1]["step"] + 1 if prune else 0) for r in recover]
        if any(r["task"] for r in recover):
            axes[0].plot(after, [r["task"] for r in recover], ":", color="tab:blue", label="task loss, recovering")
        axes[0].plot(after, [r["distill"] for r in recover], ":", color="tab:orange",
                     label="distillation loss, recovering")
        axes[0].axvline(after[0], color="gray", linewidth=0.8)
        axes[0].text(after[0], axes[0].get_ylim()[1], " cut", va="top", fontsize=7, color="gray")
    for ax, title in zip(axes, ("losses", "KL", "cost (fraction of dense)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def layer_head_heatmap(values: np.ndarray, title: str, path: Path, pruned: np.ndarray | None = None,
                       vmin: float | None = 0.0, vmax: float | None = None) -> Path:
    """A layer x head heatmap with the values written in; pruned heads crossed out."""
    layers, heads = values.shape
    fig, ax = plt.subplots(figsize=(0.55 * heads + 2.2, 0.45 * layers + 1.6))
    image = ax.imshow(values, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    for (i, h), v in np.ndenumerate(values):
        ax.text(h, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                color="white" if v < (np.nanmax(values) + np.nanmin(values)) / 2 else "black")
        if pruned is not None and pruned[i, h]:
            ax.plot([h - 0.45, h + 0.45], [i - 0.45, i + 0.45], color="red", linewidth=1.2)
            ax.plot([h - 0.45, h + 0.45], [i + 0.45, i - 0.45], color="red", linewidth=1.2)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title + ("\n(red cross: pruned)" if pruned is not None else ""), fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    return _save(fig, path)


def example_attention(views: list[dict], path: Path) -> Path:
    """Per example sentence: the attention each token receives from kept heads and from pruned heads."""
    fig, axes = plt.subplots(len(views), 1, figsize=(11, 2.6 * len(views)), squeeze=False)
    for ax, view in zip(axes[:, 0], views):
        x = np.arange(len(view["tokens"]))
        ax.bar(x - 0.2, view["kept"], 0.4, label="kept heads", color="tab:blue")
        ax.bar(x + 0.2, view["pruned"], 0.4, label="pruned heads", color="tab:red")
        ax.set_xticks(x, view["tokens"], rotation=60, fontsize=7)
        ax.set_ylabel("attention received", fontsize=8)
        ax.set_title(view["text"][:120], fontsize=8)
        ax.legend(fontsize=7)
    return _save(fig, path)
