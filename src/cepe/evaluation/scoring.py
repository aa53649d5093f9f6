"""The one scoring function every method goes through, and greedy decoding on top of it.

A `Request` lays out one example the same way for every method: decoder tokens that are always
in the window (`tokens`, ending with the tokens to score), and `context` documents that each
method reads in its own way (CEPE's encoder, the decoder's window, one REPLUG pass each, ...).
`score(method, request)` returns the log-likelihood of exactly `tokens[score_start:]`, whatever
the method: differences between methods come from the method, not from the bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ..model.decoding import Row, pick

if TYPE_CHECKING:
    from .methods import Method


@dataclass
class Request:
    """One example, in decoder token ids.

    tokens: ids always in the decoder window; the scored ones are `tokens[score_start:]`.
    context: documents (lists of decoder ids) the method may read besides `tokens`, in reading
        order (for one long text: the text that precedes `tokens`).
    prefix: ids placed before the context in layouts that put context in the window (a chat
        header, an instruction); kept in the window by every method.
    score_start: first scored index in `tokens` (>= 1: the first token has no prediction).
    weights: optional retrieval scores of the context documents (REPLUG's weighting).
    """

    tokens: list[int]
    context: list[list[int]] = field(default_factory=list)
    prefix: list[int] = field(default_factory=list)
    score_start: int = 1
    weights: list[float] | None = None

    def __post_init__(self):
        if not 1 <= self.score_start <= len(self.tokens):
            raise ValueError(f"score_start must be in [1, {len(self.tokens)}], got {self.score_start}")
        if self.weights is not None and len(self.weights) != len(self.context):
            raise ValueError(f"{len(self.weights)} weights for {len(self.context)} context documents")

    @property
    def num_scored(self) -> int:
        return len(self.tokens) - self.score_start

    def context_ids(self) -> list[int]:
        """All context documents laid end to end."""
        return [t for doc in self.context for t in doc]


@torch.no_grad()
def score(method: Method, request: Request) -> torch.Tensor:
    """Per-token log-likelihoods (num_scored,) float32 of `request.tokens[score_start:]` under `method`."""
    n = request.num_scored
    if n == 0:
        return torch.zeros(0)
    # log-probs after each of the last n+1 tokens; the last one predicts past the end: dropped
    logp = method.log_probs(request, n + 1)[:-1]
    targets = torch.tensor(request.tokens[request.score_start :], device=logp.device)
    out = logp.gather(-1, targets[:, None]).squeeze(-1).float().cpu()
    if out.shape != (n,):
        raise RuntimeError(f"{method.name}: scored {tuple(out.shape)} positions, expected ({n},)")
    return out


@torch.no_grad()
def greedy_generate(
    method: Method, request: Request, max_new_tokens: int, stop_ids: set[int] | frozenset = frozenset()
) -> list[int]:
    """Greedy continuation of `request.tokens`, one full forward per new token (any method).

    Methods with a cached fast path (`Method.generate`) must return the same tokens."""
    if max_new_tokens < 1:
        return []
    # the decoding module's row keeps the stop and length rules; only the forward differs (no cache)
    row = Row(list(request.tokens), max_new_tokens, stop_ids=frozenset(stop_ids))
    while not row.done:
        tokens = row.prompt + row.tokens
        step = replace(request, tokens=tokens, score_start=len(tokens))
        row.push(int(pick(method.log_probs(step, 1)[0][None].float(), [row.sampler])[0]))
    return row.tokens


def label_log_likelihoods(method: Method, prompt: Request, candidates: list[list[int]]) -> list[tuple[float, int]]:
    """(sum of log-likelihood, number of tokens) of each candidate continuation of `prompt.tokens`,
    all candidates in one batch (`Method.log_probs_batch`, left-padded so that every row ends
    with its candidate); equal to scoring each candidate on its own."""
    if any(not cand for cand in candidates):
        raise ValueError("empty candidate continuation")
    if not candidates:
        return []
    reqs = [replace(prompt, tokens=list(prompt.tokens) + list(c), score_start=len(prompt.tokens)) for c in candidates]
    last = max(len(c) for c in candidates) + 1
    with torch.no_grad():
        logp = method.log_probs_batch(reqs, last)  # (C, last, V)
    out = []
    for row, cand in zip(logp, candidates):
        # the position before the candidate's first token, up to the one before its last
        lp = row[-len(cand) - 1 : -1]
        ll = lp.gather(-1, torch.tensor(cand, device=lp.device)[:, None]).sum()
        out.append((float(ll), len(cand)))
    return out
