"""PNG plots (matplotlib, Agg backend: no display needed): the generic line plot and heatmaps,
and each task's figure built from its result dict."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_STYLES = ("-", "--", "-.", ":")


def _short(x: float) -> str:
    return f"{x / 1024:g}K" if x >= 1024 and x % 256 == 0 else f"{x:g}"


def line_plot(path: str | Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
              title: str, logx: bool = False) -> Path:
    """One line per series name; points are (x, y), missing y (None/NaN) skipped. Styles vary
    (and earlier lines are drawn wider) so that coinciding methods stay visible."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = sorted({x for points in series.values() for x, _ in points})
    for i, (name, points) in enumerate(series.items()):
        pts = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker=_MARKERS[i % len(_MARKERS)],
                    linestyle=_STYLES[i % len(_STYLES)], linewidth=max(1.0, 3.5 - 0.6 * i), zorder=10 - i)
    if logx:
        ax.set_xscale("log", base=2)
    if xs and len(xs) <= 12:
        ax.set_xticks(xs, [_short(x) for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 70), fontsize=10)  # long titles wrap instead of running off the figure
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmaps(path: str | Path, grids: dict[str, list[list[float]]], xticks: list, yticks: list,
             xlabel: str, ylabel: str, title: str, vmax: float = 1.0) -> Path:
    """One heatmap (values in [0, vmax]) per name, side by side; grids are [row=y][col=x]."""
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.8, 3.2), squeeze=False)
    im = None
    for ax, (name, grid) in zip(axes[0], grids.items()):
        im = ax.imshow(grid, vmin=0, vmax=vmax, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(xticks)), [str(x) for x in xticks], rotation=45, fontsize=7)
        # rows are shared: labelled on the first panel only (long task names would run into the next)
        ax.set_yticks(range(len(yticks)), [str(y) for y in yticks] if ax is axes[0][0] else [], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None and math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}" if vmax <= 1 else f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="w" if v < 0.6 * vmax else "k")
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    fig.suptitle(textwrap.fill(title, 35 * n + 10), fontsize=10, y=1.03)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- per task
def model_tag(description: dict) -> str:
    """Short model description for plot titles, from `EvalModel.description` (the results JSON's `model`)."""
    d = description
    cepe = (
        f"adapter {Path(d['adapter']).name}"
        if d.get("adapter")
        else (f"{d['init']}-init CEPE" if d.get("init") else "")
    )
    return f"{d['decoder']}" + (f" + {cepe}" if cepe else "")


def ppl_plot(path, result: dict, scored_tokens: int, decoder_tokens: int, tag: str) -> Path:
    series = {m: [(r["total_tokens"], r["ppl"]) for r in result["methods"][m].values()] for m in result["methods"]}
    title = f"{tag}: last {scored_tokens} of a {decoder_tokens}-token window, {len(result['windows'])} windows"
    return line_plot(path, series, "total tokens read (D + E)", "perplexity", title, logx=True)


def rag_lm_plot(path, result: dict, retriever: str, scored_tokens: int, decoder_tokens: int, tag: str) -> Path:
    series = {m: [(r["k"], r["ppl"]) for r in result["methods"][m].values()] for m in result["methods"]}
    title = f"{tag}: {retriever} top-k passages, last {scored_tokens} of {decoder_tokens} tokens"
    return line_plot(path, series, "retrieved passages k", "perplexity", title)


def qa_sweep_plot(path, result: dict, tag: str, decoder_passages: int, questions: int) -> Path:
    title = f"{tag}: NQ-style QA, top {decoder_passages} in the decoder + k more, {questions} questions"
    names = dict.fromkeys(m for res in result["k"].values() for m in res["methods"])
    series = {m: [(int(k), res["methods"][m]["substring"]) for k, res in result["k"].items() if m in res["methods"]]
              for m in names}
    return line_plot(path, series, "passages k beyond the decoder's", "answer substring match", title)


def icl_sweep_plot(path, result: dict, methods, tag: str, data_name: str, decoder_demos: int) -> Path:
    first = next(iter(result["demos"].values()))
    series = {m: [(int(n), r["methods"][m]["accuracy_raw"]) for n, r in result["demos"].items()] for m in methods}
    for m in methods:  # calibrated beside raw: a gap between them is a label prior, not reading
        if all("accuracy_calibrated" in r["methods"][m] for r in result["demos"].values()):
            series[f"{m} (calibrated)"] = [(int(n), r["methods"][m]["accuracy_calibrated"])
                                           for n, r in result["demos"].items()]
    series["majority class"] = [(int(n), r["majority_baseline"]) for n, r in result["demos"].items()]
    title = f"{tag}: {data_name}, {first['test_examples']} examples, {decoder_demos} in the decoder"
    return line_plot(path, series, "demonstrations N", "accuracy (raw log-likelihood; calibrated)", title)


def passkey_plot(path, result: dict, decoder_tokens: int, tag: str) -> Path:
    grids = {m: r["grid_depth_by_length"] for m, r in result["methods"].items()}
    return heatmaps(path, grids, result["lengths"], result["depths"], "prompt tokens", "needle depth",
                    f"{tag}: passkey accuracy, decoder window D={decoder_tokens}")


def ruler_plot(path, result: dict, tag: str) -> Path:
    """A heatmap per method: RULER score (0-100) by task and length."""
    grids = {m: [[r["scores"][t][str(n)] for n in result["lengths"]] for t in result["tasks"]]
             for m, r in result["methods"].items()}
    grids = {m: [[float("nan") if v is None else v for v in row] for row in g] for m, g in grids.items()}
    lengths = [_short(n) for n in result["lengths"]]
    n = result["samples_per_cell"]
    title = (f"{tag}: RULER score (0-100), {n} sample{'s' if n != 1 else ''} per cell, "
             f"decoder window D={result['decoder_tokens']}")
    return heatmaps(path, grids, lengths, result["tasks"], "prompt tokens", "task", title, vmax=100)
