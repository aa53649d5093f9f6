"""Held-out loss against decoder tokens trained, from a run folder (metrics.jsonl + config.yaml),
and beside it the held-out answer accuracy (copy, facts and label answers only) where it was logged.

Tokens per step follow from the config alone (the windows are a pure function of the sample
index, `cepe.data.samples.block_window`), so this also works on a metrics file brought back here.

    python3 scripts/gpu/general_curve.py RUN_DIR [RUN_DIR ...] --out curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cepe.data.samples import block_window
from cepe.training.config import load_config
from cepe.training.metrics import ANSWER_GROUPS


def tokens_through(cfg, steps: int) -> np.ndarray:
    """Decoder tokens trained after each step 1..steps (padded tokens counted, BOS not)."""
    d, t = cfg.data, cfg.train
    g = t.batch_size * t.grad_accum  # one process; several processes read g x W per step
    if not d.decoder_windows:
        return np.arange(1, steps + 1) * g * d.decoder_tokens
    per_step = np.zeros(steps, dtype=np.int64)
    for s in range(steps):
        for b in range(s * g, (s + 1) * g, t.batch_size):  # a micro-batch pads to its longest block
            blocks = range(b // d.window_block, (b + t.batch_size - 1) // d.window_block + 1)
            per_step[s] += t.batch_size * max(block_window(d.seed, 0, d.decoder_windows, k) for k in blocks)
    return np.cumsum(per_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("curve.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_task) = plt.subplots(1, 2, figsize=(12, 4))
    table = {}
    for run in args.runs:
        cfg = load_config(str(run / "config.yaml"), [])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        evals = [
            (r["step"], r["eval/loss_with_context"], r.get("eval/loss_without_context"))
            for r in rows
            if "eval/loss_with_context" in r
        ]
        if not evals:
            print(f"{run}: no held-out evaluation yet")
            continue
        tok = tokens_through(cfg, max(s for s, _, _ in evals))
        x = [tok[s - 1] / 1e6 for s, _, _ in evals]
        ax.plot(x, [e for _, e, _ in evals], marker="o", label=f"{run.name} with context")
        if evals[0][2] is not None:
            ax.axhline(evals[0][2], ls="--", color="gray", lw=0.8)
        task = {r["step"]: (r["eval/task_accuracy_with_context"], r.get("eval/task_accuracy_without_context"))
                for r in rows if "eval/task_accuracy_with_context" in r}
        if task:
            steps = sorted(task)
            ax_task.plot([tok[s - 1] / 1e6 for s in steps], [100 * task[s][0] for s in steps], marker="o",
                         label=f"{run.name} with context")
            if task[steps[0]][1] is not None:
                ax_task.axhline(100 * task[steps[0]][1], ls="--", color="gray", lw=0.8)
        exact = {r["step"]: r["eval/task_exact_with_context"] for r in rows if "eval/task_exact_with_context" in r}
        # loss on ordinary text only (the perplexity targets), where the run logs it
        text = {r["step"]: r["eval/text_loss_with_context"] for r in rows if "eval/text_loss_with_context" in r}
        if text:
            steps = sorted(text)
            ax.plot([tok[s - 1] / 1e6 for s in steps], [text[s] for s in steps], marker="^", ls=":",
                    label=f"{run.name} text only, with context")
        if exact:  # whole answers right = greedy exact match (end marker included)
            steps = sorted(exact)
            ax_task.plot([tok[s - 1] / 1e6 for s in steps], [100 * exact[s] for s in steps], marker="s", ls=":",
                         label=f"{run.name} whole answers")
        by_kind = {g: {r["step"]: r[f"eval/task_exact_{g}_with_context"] for r in rows
                       if f"eval/task_exact_{g}_with_context" in r} for g in ANSWER_GROUPS}
        for g, kind in by_kind.items():  # which skill moves (runs since 2026-12-03 log these)
            if kind:
                steps = sorted(kind)
                ax_task.plot([tok[s - 1] / 1e6 for s in steps], [100 * kind[s] for s in steps], lw=0.8, alpha=0.7,
                             label=f"{run.name} exact, {g.replace('_', ' ')}")
        table[run.name] = [
            {"step": s, "tokens": int(tok[s - 1]), "loss_with_context": e, "loss_without_context": n,
             **({"answer_accuracy_with_context": task[s][0]} if s in task else {}),
             **({"answers_exact_with_context": exact[s]} if s in exact else {}),
             **({"text_loss_with_context": text[s]} if s in text else {}),
             **{f"exact_{g}_with_context": kind[s] for g, kind in by_kind.items() if s in kind}}
            for s, e, n in evals
        ]
        for s, e, n in evals:
            answers = f"  answers {100 * task[s][0]:.1f}%" if s in task else ""
            answers += f" (exact {100 * exact[s]:.1f}%)" if s in exact else ""
            answers += f"  text {text[s]:.4f}" if s in text else ""
            print(
                f"{run.name:<24} step {s:>6}  {tok[s - 1] / 1e6:9.1f}M tokens  "
                f"held-out loss {e:.4f}  (no context {n:.4f}){answers}"
            )
    ax.set_xlabel("decoder tokens trained (M)")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss vs tokens trained (dashed: the decoder without context)")
    ax.legend()
    ax_task.set_xlabel("decoder tokens trained (M)")
    ax_task.set_ylabel("held-out answer accuracy (%)")
    ax_task.set_title("answers read from the context (dashed: without context)")
    if ax_task.lines:
        ax_task.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
