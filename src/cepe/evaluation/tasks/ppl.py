"""Long-document language modeling: perplexity of the last W tokens of a D-token decoder window,
with E more tokens of preceding text for the method to read, for a list of E.

Every method scores the very same tokens of the very same windows; windows end at the same
place for every E, so a row of the table changes only in how much context precedes the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..methods import Method
from ..report import Timer
from ..scoring import Request
from .common import NllTable, score_window


@dataclass
class PplSettings:
    decoder_tokens: int = 512  # D
    scored_tokens: int = 256  # W
    context_tokens: list[int] = field(default_factory=lambda: [0, 512, 1536, 3584, 7680])  # E
    windows_per_doc: int = 1

    def __post_init__(self):
        if not 1 <= self.scored_tokens < self.decoder_tokens:
            raise ValueError(f"scored tokens W={self.scored_tokens} must be in [1, D={self.decoder_tokens})")
        if any(e < 0 for e in self.context_tokens) or not self.context_tokens:
            raise ValueError(f"context tokens must be >= 0, got {self.context_tokens}")
        if self.windows_per_doc < 1:
            raise ValueError("windows_per_doc must be >= 1")
        self.context_tokens = sorted(set(self.context_tokens))


def window_ends(num_tokens: int, need: int, count: int) -> list[int]:
    """`count` window end positions spread evenly over [need, num_tokens] (the last at the end)."""
    if num_tokens < need:
        return []
    if count == 1:
        return [num_tokens]
    span = num_tokens - need
    return sorted({need + round(span * i / (count - 1)) for i in range(count)})


def make_request(ids: list[int], end: int, s: PplSettings, context_tokens: int) -> Request:
    """The window ids[end-D:end] scored on its last W tokens; the E tokens before it as context."""
    d = s.decoder_tokens
    start = end - d
    context = [ids[start - context_tokens : start]] if context_tokens else []
    return Request(tokens=ids[start:end], context=context, score_start=d - s.scored_tokens)


def run(methods: dict[str, Method], docs: list[tuple[str, list[int]]], s: PplSettings, timer: Timer | None = None,
        progress: bool = True) -> dict:
    """docs: (name, decoder ids). Returns per method and E: perplexity, tokens, per-window NLL."""
    timer = timer or Timer()
    need = s.decoder_tokens + max(s.context_tokens)
    windows = [(name, ids, end) for name, ids in docs for end in window_ends(len(ids), need, s.windows_per_doc)]
    skipped = [name for name, ids in docs if len(ids) < need]
    if not windows:
        raise ValueError(
            f"no document has the {need} tokens a window needs (D={s.decoder_tokens} + E={max(s.context_tokens)})"
        )
    table = NllTable()
    not_fit: dict[str, list[int]] = {}
    cepe_diff = 0.0  # CEPE at zero init must equal truncated exactly: a check of the bookkeeping
    bar = tqdm(total=len(windows) * len(s.context_tokens) * len(methods), desc="ppl", disable=not progress)
    for _doc, ids, end in windows:
        done: dict[str, object] = {}
        for e in s.context_tokens:
            req = make_request(ids, end, s, e)
            scored = {}
            for name, method in methods.items():
                bar.set_postfix_str(f"{name} E={e}")
                lp = score_window(name, method, req, done, timer, not_fit, e)
                if lp is not None:
                    scored[name] = lp
                    table.add(name, e, lp)
                bar.update()
            if "cepe" in scored and "truncated" in scored:
                cepe_diff = max(cepe_diff, float((scored["cepe"] - scored["truncated"]).abs().max()))
    bar.close()
    results = {
        name: {
            str(s.decoder_tokens + e): {
                "context_tokens": e,
                "total_tokens": s.decoder_tokens + e,
                **table.summary(name, e),
            }
            for e in s.context_tokens
        }
        for name in methods
    }
    checks = {}
    if "cepe" in methods and "truncated" in methods:
        checks["cepe_vs_truncated_max_abs_loglik_diff"] = cepe_diff
    return {
        "methods": results,
        "windows": [{"document": n, "end": end} for n, _, end in windows],
        "skipped_documents": skipped,
        "does_not_fit": {k: sorted(set(v)) for k, v in not_fit.items()},
        "checks": checks,
    }


def table(result: dict, s: PplSettings) -> tuple[list[str], list[list]]:
    totals = [str(s.decoder_tokens + e) for e in s.context_tokens]
    header = ["method \\ total tokens"] + totals
    rows = [[name] + [result["methods"][name][t]["ppl"] for t in totals] for name in result["methods"]]
    return header, rows
