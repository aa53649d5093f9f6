"""Losses: next-token cross-entropy, and CEPE-Distilled's KL(teacher || student).

All losses are taken on decoder positions t whose next token t+1 has a label (labels != -100):
logits (B, D, V) at position t predict labels[:, t+1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, D) labels -> (B, D-1) bool: positions that predict a labelled token."""
    return labels[:, 1:] != -100


def task_weights(labels: torch.Tensor, task_mask: torch.Tensor, task_weight: float) -> torch.Tensor:
    """(B, D) labels and task mask -> (B, D-1) float weights of the loss positions.

    A copy or lookup answer is a handful of tokens after a window of up to 2,048 tokens of text:
    in a token mean its gradient all but vanishes. With `task_weight` w > 0 the answer tokens of
    each row together weigh w times its other labelled tokens (never less than 1 each); w = 0:
    every labelled token weighs 1."""
    valid = loss_mask(labels)
    weights = valid.float()
    if task_weight <= 0:
        return weights
    task = task_mask[:, 1:] & valid
    n_task, n_text = task.sum(-1, keepdim=True), (valid & ~task).sum(-1, keepdim=True)
    per_token = (task_weight * n_text / n_task.clamp(min=1)).clamp(min=1.0)
    return torch.where(task, per_token.expand_as(weights), weights)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, task_mask: torch.Tensor | None = None,
                  task_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy (weighted by `task_weights` when a task mask is given) and
    the number of labelled tokens."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    n = (lb != -100).sum()
    per = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none")
    if task_mask is None or task_weight <= 0:
        return per.sum() / n.clamp(min=1), n
    w = task_weights(labels, task_mask, task_weight).reshape(-1)
    return (per * w).sum() / w.sum().clamp(min=1), n


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean over loss positions of KL(p_teacher || p_student), both softened by `temperature`
    (scaled by T^2 so the gradient size does not depend on it). Logits (B, D, V)."""
    mask = loss_mask(labels)
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2


def distilled_positions(labels: torch.Tensor, task_mask: torch.Tensor | None, answers: bool) -> torch.Tensor:
    """The labels the KL term reads (B, D): all loss positions, or with `answers=False` only the
    ordinary text. A teacher that reads only the context's tail, in its own window, cannot see a
    fact or a label placed deeper in the context, so on those answers it would pull the student
    toward not knowing them; cross-entropy still trains them."""
    if answers or task_mask is None:
        return labels
    return labels.masked_fill(task_mask, -100)


def topk_kl_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor,
                       labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) from a teacher's top-k only: both distributions are coarsened to
    the k tokens plus one bucket for everything else, so it is still a true KL (zero when the
    student matches the teacher, positive otherwise). topk_ids, topk_probs: (B, D, k)."""
    mask = loss_mask(labels)
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    ids, p = topk_ids[:, :-1].long(), topk_probs[:, :-1].float()
    s_k = s.gather(-1, ids)
    eps = 1e-8
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - s_k.exp().sum(-1)).clamp(min=eps)
    kl = (p * (p.clamp(min=eps).log() - s_k)).sum(-1) + p_rest * (p_rest.clamp(min=eps).log() - q_rest.log())
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2


@torch.no_grad()
def online_teacher_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen base decoder reading the context's tail (`teacher_prefix_ids`, left-padded)
    then the decoder tokens, in one sequence. Called through the CEPE model *without* context,
    which is exactly the base decoder (same weights, no second copy; works under DDP/FSDP
    wrappers too). Returns logits (B, D, V) at the decoder positions."""
    ids = batch["input_ids"]
    prefix, pmask = batch["teacher_prefix_ids"], batch["teacher_prefix_mask"]
    seq = torch.cat([prefix, ids], dim=1)
    mask = torch.cat([pmask, torch.ones_like(ids)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=seq, attention_mask=mask, position_ids=position_ids, logits_to_keep=ids.shape[1], use_cache=False
    )
    return out.logits


class TeacherFile:
    """Precomputed top-k teacher probabilities (safetensors), for teachers too big to run
    alongside training. Rows are samples `first_index ... first_index + M - 1` of the training
    stream; `topk_ids` (M, D, k) int32 and `topk_probs` (M, D, k) fp16 are read lazily."""

    FORMAT = "cepe-teacher-topk"

    def __init__(self, path: str | Path, data_fingerprint: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"distill.teacher_file: {self.path} does not exist")
        try:
            self._f = safe_open(str(self.path), framework="pt")
            meta = self._f.metadata() or {}
            self.ids, self.probs = self._f.get_slice("topk_ids"), self._f.get_slice("topk_probs")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{self.path}: not a readable teacher file ({e})") from e
        if meta.get("format") != self.FORMAT:
            raise ValueError(f"{self.path}: not a CEPE teacher file (format {meta.get('format')!r})")
        if data_fingerprint is not None and meta.get("data") != data_fingerprint:
            raise ValueError(
                f"{self.path}: written for other data (fingerprint {meta.get('data')}, this run {data_fingerprint}); "
                "rewrite it with `cepe train --config ... --write-teacher`"
            )
        self.first = int(meta["first_index"])
        self.rows = self.ids.get_shape()[0]

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [int(i) - self.first for i in index.tolist()]
        bad = [r + self.first for r in rows if not 0 <= r < self.rows]
        if bad:
            raise ValueError(
                f"{self.path}: has samples {self.first}..{self.first + self.rows - 1}, training needs {bad[:3]}; "
                "write more with --teacher-samples"
            )
        ids = torch.stack([self.ids[r] for r in rows])
        probs = torch.stack([self.probs[r] for r in rows])
        return ids, probs


@torch.no_grad()
def teacher_topk(
    teacher, batch: dict[str, torch.Tensor], k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k token ids and probabilities of a teacher decoder at every decoder position."""
    logits = online_teacher_logits(teacher, batch).float()
    probs = F.softmax(logits / temperature, dim=-1)
    p, i = probs.topk(k, dim=-1)
    return i.to(torch.int32), p.to(torch.float16)
