"""What a run reports: metrics.jsonl + TensorBoard while it runs, a plot and a table at the end."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


def whole_answers(correct: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(answers, answers with every token right), 0-d tensors on `task`'s device (no host sync), over
    the runs of `task`; both inputs (B, T) bool.

    Teacher-forced, an answer whose tokens are all the argmax is exactly what greedy decoding writes
    (its end marker included), so this is generation's exact match at the cost of one forward."""
    start = task & ~torch.nn.functional.pad(task[:, :-1], (1, 0))
    run = torch.cumsum(start.long(), 1) * task  # 1, 2, ... on each row's answers, 0 elsewhere
    wrong = torch.zeros(task.shape[0], task.shape[1] + 1, device=task.device)
    wrong.scatter_add_(1, run, (task & ~correct).float())
    n = start.sum()
    return n, n - (wrong[:, 1:] > 0).sum()


# held-out exact match per kind of answer: a mixture's overall figure hides which skill moves (stage
# 11's 36% held a 4-key lookup at chance, docs/results_binding_probe.md)
# (passage_qa_in_window: the answer may be in the window's passage, `data.retrieval.in_window`)
ANSWER_GROUPS = ("facts_single", "facts_multi", "facts_chain", "copying", "passage_qa", "passage_qa_in_window",
                 "demonstrations")


def answer_group(sample: dict) -> int:
    """Index in ANSWER_GROUPS of a sample's answers (copying's formats are one group), -1 for none."""
    name = sample.get("copy_format", "")
    name = name if name in ANSWER_GROUPS else sample.get("kind", "")
    return ANSWER_GROUPS.index(name) if name in ANSWER_GROUPS else -1


def whole_answers_by_group(correct: torch.Tensor, task: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(len(ANSWER_GROUPS), 2) answers and answers with every token right, per group; `groups`
    (B,) long, -1 for rows outside every group. Other rows are masked out, not indexed away: no
    host sync."""
    return torch.stack([torch.stack(whole_answers(correct, task & (groups == g)[:, None]))
                        for g in range(len(ANSWER_GROUPS))]).double()


def answer_texts(pred: torch.Tensor, labels: torch.Tensor, task: torch.Tensor, groups: torch.Tensor,
                 decode: Callable[[list[int]], str], taken: list[int], per_group: int = 2) -> list[dict]:
    """Held-out answers as text, at most `per_group` rows per kind (`taken`: rows already kept per
    index of ANSWER_GROUPS, updated in place across batches). Per row: its kind and, per answer (a
    run of `task`), the gold text and the teacher-forced argmax text: up to its first wrong token,
    what greedy decoding writes. A miss's form (one value of a list, a haystack word, an invented
    name) is what the exact-match figures cannot show. pred, labels, task (B, T); groups (B,)."""
    rows = []
    pred, labels, task = pred.cpu(), labels.cpu(), task.cpu()
    for b, g in enumerate(groups.tolist()):
        if g < 0 or taken[g] >= per_group or not task[b].any():
            continue
        taken[g] += 1
        idx = task[b].nonzero().flatten()
        runs = torch.tensor_split(idx, (torch.diff(idx) > 1).nonzero().flatten() + 1)
        rows.append({"kind": ANSWER_GROUPS[g], "answers": [
            {"gold": decode(labels[b, r].tolist()), "predicted": decode(pred[b, r].tolist())} for r in runs]})
    return rows


def step_flops(description: dict[str, int], cfg: Any, dec_tok: float, ctx_tok: float, teacher_tok: float) -> float:
    """Matmul FLOPs of one optimizer step (attention scores left out; a lower bound) at `dec_tok`
    decoder, `ctx_tok` context and `teacher_tok` teacher tokens per step (`cfg`: a `RunConfig`,
    `description`: the model's parameter counts): frozen decoder forward + input-gradient backward
    4N per token, trainable parts 6N, the teacher's forward 2N per token it reads."""
    d = description
    # a frozen encoder runs forward only (2N); a trained one forward and backward (6N), and a
    # checkpointed one runs its layers' forward a second time in the backward pass (+2N)
    if cfg.model.encoder_frozen == "all":
        enc_factor = 2
    else:
        enc_factor = 6 + (2 if cfg.train.encoder_checkpointing else 0)
    dec_factor = 4 + (2 if cfg.train.gradient_checkpointing else 0)  # the same for the decoder's layers
    return (dec_factor * d["decoder_params"] * dec_tok + 6 * d["cross_attn_params"] * (dec_tok + ctx_tok) / 2
            + enc_factor * d["encoder_params"] * ctx_tok + 2 * d["decoder_params"] * teacher_tok)


class Meter:
    """Progress bar and throughput of a run (decoder tokens per second, since the last step and
    since the run started or resumed), and its last loss."""

    def __init__(self, step: int, max_steps: int, counters: dict[str, int], enabled: bool):
        self.bar = tqdm(total=max_steps, initial=step, desc="train", disable=not enabled, dynamic_ncols=True)
        self.start_time, self.start_step, self.start_tokens = time.time(), step, counters["decoder_tokens"]
        self.last_time, self.last_tokens = self.start_time, self.start_tokens
        self.last_loss: float | None = None
        self.end_time: float | None = None

    def update(self, step: int, values: dict[str, float], counters: dict[str, int]) -> None:
        """Add `tokens_per_s`, `step_s` (and on CUDA `peak_memory_gb`) to this step's `values`; show them."""
        now = time.time()
        values["tokens_per_s"] = (counters["decoder_tokens"] - self.last_tokens) / max(now - self.last_time, 1e-9)
        values["step_s"] = now - self.last_time
        if torch.cuda.is_available():  # how much room a larger batch or window has (no host sync)
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        self.last_time, self.last_tokens, self.last_loss = now, counters["decoder_tokens"], values["loss"]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}")

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.end_time = time.time()

    def elapsed(self) -> float:
        return (self.end_time or time.time()) - self.start_time

    def steps_run(self, step: int) -> int:
        return step - self.start_step

    def tokens_run(self, counters: dict[str, int]) -> int:
        return counters["decoder_tokens"] - self.start_tokens


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard, main process only."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():  # resuming: forget what was logged after the checkpoint
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= start_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but the JSON log is what matters
            self.tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_metrics(run_dir: Path) -> None:
    """metrics.png next to metrics.jsonl: training loss, held-out perplexity with and without context."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [
        (r["step"], r["eval/ppl_with_context"], r["eval/ppl_without_context"])
        for r in rows
        if "eval/ppl_with_context" in r
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
        axes[0].plot(*zip(*train), label="train loss")
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss")
    if evals:
        s, w, wo = zip(*evals)
        axes[1].plot(s, w, "o-", label="with context")
        axes[1].plot(s, wo, "s--", label="without context")
        axes[1].legend()
        axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out perplexity")
    fig.tight_layout()
    fig.savefig(run_dir / "metrics.png", dpi=100)
    plt.close(fig)


def print_table(summary: dict[str, Any]) -> None:
    rows = [("steps", summary["steps"]), ("seconds", summary["seconds"]),
            ("decoder tokens/s", f"{summary['tokens_per_s']:,.0f}"),
            ("final train loss", _fmt(summary.get("final_loss")))]
    for tag in ("with_context", "without_context"):
        if f"ppl_{tag}" in summary:
            rows.append((f"held-out ppl {tag.replace('_', ' ')}", _fmt(summary[f"ppl_{tag}"])))
            rows.append((f"held-out accuracy {tag.replace('_', ' ')}", _fmt(summary[f"accuracy_{tag}"])))
        if f"task_accuracy_{tag}" in summary:
            rows.append((f"held-out answer accuracy {tag.replace('_', ' ')}", _fmt(summary[f"task_accuracy_{tag}"])))
        if f"task_exact_{tag}" in summary:
            rows.append((f"held-out answers exact {tag.replace('_', ' ')}", _fmt(summary[f"task_exact_{tag}"])))
        if tag == "with_context":  # per kind of answer, with the context only (without it they are guesses)
            rows += [(f"  {g.replace('_', ' ')}", _fmt(summary[f"task_exact_{g}_{tag}"]))
                     for g in ANSWER_GROUPS if f"task_exact_{g}_{tag}" in summary]
    if "chance" in summary:
        rows.append(("chance accuracy", _fmt(summary["chance"])))
    if "mfu" in summary:
        rows.append(("MFU", f"{summary['mfu']:.1%}"))
    rows.append(("adapter", summary["adapter"]))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
