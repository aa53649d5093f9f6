"""Evaluation harness: CEPE and the paper's baselines on identical scored tokens.

`score(method, request)` is the one scoring function; methods (`build_methods`) differ only in how
they read a `Request`'s context. Tasks (`cepe.evaluation.tasks`): ppl, rag_lm, qa, icl, passkey.
"""

from .methods import METHODS, Cepe, DoesNotFit, Full, Method, Replug, StreamingLLM, Truncated, build_methods
from .models import EvalModel, load_eval_model
from .scoring import Request, greedy_generate, label_log_likelihoods, score

__all__ = [
    "METHODS", "Cepe", "DoesNotFit", "EvalModel", "Full", "Method", "Replug", "Request", "StreamingLLM",
    "Truncated", "build_methods", "greedy_generate", "label_log_likelihoods", "load_eval_model", "score",
]
