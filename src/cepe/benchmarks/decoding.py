"""Decoding after a long input: time to first token and time per generated token, batch 1, greedy.

Two ways to run the decoding steps, both through the library's model object:

- `hf`: `model.generate` as a user calls it (dynamic cache, one Python round trip per token);
- `graph` (gpt-fast style): prefill once, move the self-attention keys/values into a Hugging Face
  `StaticCache`, then capture one decoding step (forward, greedy pick, bookkeeping) as a CUDA graph
  and replay it. A replay launches the same kernels as the eager step with no Python or launch
  gaps, and needs no host synchronisation, so 127 replays run back to back. Cross-attention keys
  and values follow the model's `kv_policy`: `cache` reuses the ones projected at prefill,
  `recompute` projects them from the encoder states inside every step, `absorbed` keeps none and
  attends over the encoder states with the projections absorbed (`cepe.model.absorbed`).

CPU runs the same step eagerly (`eager` mode), which is how tests check it against `generate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.generation.streamers import BaseStreamer

from ..model import CepeForCausalLM, ContextStates, decoding
from ..model.graphs import capture
from .timing import is_cuda, sync


@dataclass
class Prefilled:
    """State right after the prompt: a static cache holding it, the first generated token."""

    cache: StaticCache
    first_token: torch.Tensor  # (1,) long
    context: ContextStates | None
    prompt_len: int


def _forward(model: CepeForCausalLM, method: str, ids: torch.Tensor, context: ContextStates | None, cache):
    """One cached forward (`model.decoding.forward`): CEPE with its context, or the decoder alone."""
    if method == "cepe" and context is not None:
        return decoding.forward(model, ids, cache, context=context)
    return decoding.forward(model.decoder, ids, cache)


def to_static(dynamic: DynamicCache, config, max_cache_len: int) -> StaticCache:
    """Copy a filled dynamic cache into a static one of `max_cache_len` slots, layer by layer
    (each dynamic layer freed once copied, so both never coexist in full)."""
    static = StaticCache(config=config, max_cache_len=max_cache_len)
    for dst, src in zip(static.layers, dynamic.layers):
        n = src.keys.shape[-2]
        dst.lazy_initialization(src.keys, src.values)
        dst.keys[:, :, :n].copy_(src.keys)
        dst.values[:, :, :n].copy_(src.values)
        dst.cumulative_length.fill_(n)
        src.keys = src.values = None
    return static


@torch.no_grad()
def prefill(model: CepeForCausalLM, method: str, ids: torch.Tensor, context: ContextStates | None,
            new_tokens: int) -> Prefilled:
    """Run the prompt once (flash-friendly: a dynamic cache, no mask), keep its keys/values in a
    static cache with room for `new_tokens` more, and pick the first token."""
    dynamic = decoding.new_cache(model)
    out = _forward(model, method, ids, context, dynamic)
    first = out.logits[:, -1].argmax(-1)
    del out
    static = to_static(dynamic, model.decoder.config, ids.shape[1] + new_tokens)
    return Prefilled(static, first, context, ids.shape[1])


class DecodeStep:
    """One greedy decoding step with all state on the device, so that it can be captured and
    replayed: reads `token`, writes the next one into `token` and into `tokens[step]`."""

    def __init__(self, model: CepeForCausalLM, method: str, state: Prefilled, new_tokens: int):
        self.model, self.method, self.state = model, method, state
        dev = state.first_token.device
        self.token = state.first_token.view(1, 1).clone()
        self.tokens = torch.zeros(new_tokens, dtype=torch.long, device=dev)
        self.tokens[0] = state.first_token[0]
        self.step = torch.ones(1, dtype=torch.long, device=dev)

    def __call__(self) -> None:
        out = _forward(self.model, self.method, self.token, self.state.context, self.state.cache)
        self.logits = out.logits[:, -1]  # (1, V); in a graph, the buffer each replay rewrites
        nxt = self.logits.argmax(-1)
        self.token.copy_(nxt.view(1, 1))
        self.tokens.index_copy_(0, self.step, nxt)
        self.step.add_(1)

    def save(self) -> list[torch.Tensor]:
        lengths = [layer.cumulative_length.clone() for layer in self.state.cache.layers]
        return [self.token.clone(), self.step.clone()] + lengths

    def restore(self, saved: list[torch.Tensor]) -> None:
        self.token.copy_(saved[0])
        self.step.copy_(saved[1])
        for layer, n in zip(self.state.cache.layers, saved[2:]):
            layer.cumulative_length.copy_(n)


class CompiledStep:
    """`DecodeStep` under `torch.compile` (inductor fuses the decoder's norms, rotary and
    activations into fewer kernels; the graph then replays those). State and bookkeeping stay the
    step's own, so `save`/`restore` and the eager reference are unchanged."""

    def __init__(self, step: DecodeStep):
        self.inner = step
        self._run = torch.compile(step.__call__, dynamic=False)  # one shape: batch 1, one token

    def __call__(self) -> None:
        self._run()

    @property
    def tokens(self) -> torch.Tensor:
        return self.inner.tokens

    @property
    def logits(self) -> torch.Tensor:
        return self.inner.logits

    def save(self) -> list[torch.Tensor]:
        return self.inner.save()

    def restore(self, saved: list[torch.Tensor]) -> None:
        self.inner.restore(saved)


def timed(device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def decode_static(model: CepeForCausalLM, method: str, ids: torch.Tensor, context_ids: torch.Tensor | None,
                  context_mask: torch.Tensor | None, new_tokens: int, mode: str = "graph",
                  check_tokens: int = 8) -> dict:
    """Time to first token (encode + prefill) and seconds per token over `new_tokens - 1` steps.

    mode "graph": steps replayed from a CUDA graph; the first `check_tokens` are also run eagerly
    first and must be identical (same kernels, same order). mode "eager": the same step, eagerly.
    mode "compiled": the step under `torch.compile`, replayed from a CUDA graph (on the CPU: run
    compiled, eagerly); `compile_s` is its first call, `graph_matches_eager` compares its first
    tokens with the uncompiled step's."""
    device = ids.device
    result: dict = {}

    def first():
        ctx = model.encode(context_ids, context_mask) if (method == "cepe" and context_ids is not None) else None
        result["state"] = prefill(model, method, ids, ctx, new_tokens)

    result["ttft_first_s"] = timed(device, first)
    if is_cuda(device):
        # the process's first call at a shape pays cold costs (attention plans, allocator growth,
        # Triton compiles): 2.49 s against 0.84 warm at 128K in run 13. TTFT is the second call.
        result.pop("state")
        result["ttft_s"] = timed(device, first)
    else:
        result["ttft_s"] = result["ttft_first_s"]
    state = result.pop("state")
    result["policy_used"] = _policy_used(state.context)
    step = DecodeStep(model, method, state, new_tokens)
    n_steps = new_tokens - 1
    if mode == "compiled" and not is_cuda(device):
        return _compiled_on_cpu(step, n_steps, result)
    if mode == "eager" or not is_cuda(device):
        result["mode"] = "eager"
        dt = timed(device, lambda: [step() for _ in range(n_steps)])
        result["s_per_token"] = dt / max(n_steps, 1)
        result["tokens"] = step.tokens.tolist()
        return result
    # eager reference for the first few steps (also the eager static-cache speed)
    saved = step.save()
    step()
    eager_logits = step.logits.float().clone()
    step.restore(saved)
    step()
    result["eager_repeats_bitwise"] = bool(torch.equal(step.logits.float(), eager_logits))
    step.restore(saved)
    k = min(check_tokens, n_steps)
    dt = timed(device, lambda: [step() for _ in range(k)])
    result["eager_s_per_token"] = dt / max(k, 1)
    eager_tokens = step.tokens[: k + 1].clone()
    step.restore(saved)
    if mode == "compiled":
        step = CompiledStep(step)
        result["compile_s"] = timed(device, step)  # the first call compiles
        step.restore(saved)
    t0 = time.perf_counter()
    try:
        graph = capture(step, device)
    except Exception as e:  # a step that cannot be captured still decodes: eagerly, and says so
        result["capture_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        step.restore(saved)
        sync(device)
        dt = timed(device, lambda: [step() for _ in range(n_steps)])
        result.update(mode="eager", s_per_token=dt / max(n_steps, 1), tokens=step.tokens.tolist())
        return result
    sync(device)
    result["capture_s"] = time.perf_counter() - t0
    # the first step's logits, replayed twice, against the eager step's (bf16: ~1e-3..1e-2 apart
    # if the kernels differ; argmax over near-tied random-weight logits may then differ too)
    graph.replay()
    graph_logits = step.logits.float().clone()
    step.restore(saved)
    graph.replay()
    result["graph_repeats_bitwise"] = bool(torch.equal(step.logits.float(), graph_logits))
    result["graph_logits_rel_err"] = float((graph_logits - eager_logits).norm() / eager_logits.norm())
    step.restore(saved)
    dt = timed(device, lambda: [graph.replay() for _ in range(n_steps)])
    result["mode"] = "compiled" if mode == "compiled" else "graph"
    result["s_per_token"] = dt / max(n_steps, 1)
    result["tokens"] = step.tokens.tolist()
    result["graph_matches_eager"] = bool(torch.equal(step.tokens[: k + 1], eager_tokens))
    return result


def _compiled_on_cpu(step: DecodeStep, n_steps: int, result: dict) -> dict:
    """The compiled step without a graph (the CPU has none): its tokens and its logits' distance
    from the uncompiled step's, which tests check."""
    saved = step.save()
    step()
    eager_logits = step.logits.float().clone()
    step.restore(saved)
    compiled = CompiledStep(step)
    result["compile_s"] = timed(step.token.device, compiled)
    result["compiled_logits_rel_err"] = float((compiled.logits.float() - eager_logits).norm() / eager_logits.norm())
    step.restore(saved)
    dt = timed(step.token.device, lambda: [compiled() for _ in range(n_steps)])
    result.update(mode="compiled", s_per_token=dt / max(n_steps, 1), tokens=step.tokens.tolist())
    return result


def _policy_used(ctx: ContextStates | None) -> str:
    if ctx is None:
        return "none"
    return ctx.cross_cache.policy or ("cache" if ctx.cross_cache.filled else "recompute")  # auto: its choice


class _Clock(BaseStreamer):
    """Host time at which `generate` hands over each token (the prompt first)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.no_grad()
def decode_hf(model: CepeForCausalLM, method: str, ids: torch.Tensor, context_ids: torch.Tensor | None,
              context_mask: torch.Tensor | None, new_tokens: int) -> dict:
    """`generate` as a user calls it: greedy, exactly `new_tokens` new tokens."""
    device = ids.device
    clock = _Clock(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    sync(device)
    t0 = time.perf_counter()
    if method == "cepe" and context_ids is not None:
        out = model.generate(ids, context_input_ids=context_ids, context_attention_mask=context_mask, **kwargs)
    else:
        out = model.decoder.generate(ids, **kwargs)
    t = clock.times  # [prompt, token 1, ..., token n]
    return {
        "mode": "hf",
        "ttft_s": t[1] - t0,
        "s_per_token": (t[-1] - t[1]) / max(len(t) - 2, 1),
        "tokens": out[0, ids.shape[1]:].tolist(),
    }
