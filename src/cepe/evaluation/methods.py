"""Methods under comparison: CEPE and the paper's baselines, all on the same frozen decoder.

Each method turns a `Request` into next-token log-probabilities for the last positions of
`request.tokens` (`log_probs`); `scoring.score` is the only place that turns those into scored
log-likelihoods. Base-decoder methods take `model.decoder` of a CEPE model (or any plain
`*ForCausalLM`), so CEPE and its baselines share the very same weights.

| method          | decoder input                        | context goes                          |
|-----------------|--------------------------------------|---------------------------------------|
| `cepe`          | prefix + tokens                      | encoder, each document its own chunks |
| `truncated`     | prefix + tokens                      | nowhere                               |
| `full[-rope]`   | prefix + context + tokens            | the window (RoPE scaled beyond it)    |
| `streamingllm`  | prefix + context + tokens            | 4 sinks + recent tokens, within window|
| `replug`        | prefix + document_i + tokens, each i | one pass per document, mixed          |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..model import decoding
from ..model.decoding import left_pad
from .rope import ROPE_TYPES, native_window, scaled_rope
from .scoring import Request, greedy_generate
from .streaming import sink_attention


class DoesNotFit(ValueError):
    """The method cannot read this request (e.g. longer than the decoder's window)."""


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def decoder_log_probs(
    decoder: nn.Module,
    ids: torch.Tensor,
    last: int,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """(B, T) ids -> (B, last, V) float32 log-probs after each of the last `last` positions.

    With left padding (`attention_mask`), positions restart at 0 on each row's first real token."""
    dev = _device(decoder)
    ids = ids.to(dev)
    if attention_mask is not None:
        attention_mask = attention_mask.to(dev)
        kwargs["position_ids"] = decoding.positions(attention_mask)
    out = decoder(input_ids=ids, attention_mask=attention_mask, logits_to_keep=last, use_cache=False, **kwargs)
    return out.logits[:, -last:].float().log_softmax(-1)


def _greedy(model: nn.Module, rows: list[list[int]], max_new_tokens: int, stop_ids, pad_id: int,
            mix=None, **kwargs) -> list[list[int]]:
    """Greedy continuations of several prompts decoded together (`model.decoding`: rows
    left-padded, positions restarting at each row's first real token)."""
    return decoding.greedy(model, rows, max_new_tokens, stop_ids, pad_id, mix=mix, **kwargs)


class Method:
    """Base class. `log_probs(request, last) -> (last, V)`: log-probabilities of the next token
    after each of the last `last` positions of `request.tokens`."""

    name: str = "method"
    reads_context: bool = True
    bos: tuple[int, ...] = ()  # read before everything (build_methods(bos=...)): Gemma's <bos>

    def head(self, request: Request) -> list[int]:
        """The ids every layout starts with: the decoder's <bos> if it reads one (as CEPE's
        training put it before each window: `data.decoder_bos`), then the request's prefix."""
        return [*self.bos, *request.prefix]

    def reading_bos(self, bos: int | None) -> Method:
        """This method, reading `bos` first (None: nothing) -> self."""
        self.bos = () if bos is None else (int(bos),)
        return self

    def log_probs(self, request: Request, last: int) -> torch.Tensor:
        raise NotImplementedError

    def log_probs_batch(self, requests: list[Request], last: int) -> torch.Tensor:
        """(B, last, V): `log_probs` of several requests; methods with a batched path run them
        as one left-padded forward."""
        return torch.stack([self.log_probs(r, last) for r in requests])

    def generate(self, request: Request, max_new_tokens: int, stop_ids=frozenset()) -> list[int]:
        """Greedy continuation of `request.tokens` (same tokens as `scoring.greedy_generate`)."""
        return greedy_generate(self, request, max_new_tokens, stop_ids)

    def generate_batch(self, requests: list[Request], max_new_tokens: int, stop_ids=frozenset()) -> list[list[int]]:
        """`generate` for several requests; methods with a batched path run them in one call
        (same tokens as one at a time, up to the float rounding that padding may change)."""
        return [self.generate(r, max_new_tokens, stop_ids) for r in requests]

    def decoder_length(self, request: Request) -> int:
        """Longest sequence the decoder runs on for this request."""
        return len(self.head(request)) + len(request.tokens)

    def decoder_rows(self, request: Request) -> int:
        """Decoder sequences one request takes in a batch (REPLUG: one per pass)."""
        return 1

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Truncated(Method):
    """The base decoder on its window alone (`prefix + tokens`); the context is ignored."""

    reads_context = False

    def __init__(self, decoder: nn.Module, pad_id: int = 0, name: str = "truncated"):
        self.decoder, self.pad_id, self.name = decoder, pad_id, name

    def log_probs(self, request: Request, last: int) -> torch.Tensor:
        ids = torch.tensor([self.head(request) + request.tokens])
        return decoder_log_probs(self.decoder, ids, last)[0]

    def log_probs_batch(self, requests: list[Request], last: int) -> torch.Tensor:
        return _padded_log_probs(self.decoder, [self.head(r) + r.tokens for r in requests], last, self.pad_id)

    def generate(self, request: Request, max_new_tokens: int, stop_ids=frozenset()) -> list[int]:
        return _greedy(self.decoder, [self.head(request) + request.tokens], max_new_tokens, stop_ids, self.pad_id)[0]

    def generate_batch(self, requests: list[Request], max_new_tokens: int, stop_ids=frozenset()) -> list[list[int]]:
        rows = [self.head(r) + r.tokens for r in requests]
        return _greedy(self.decoder, rows, max_new_tokens, stop_ids, self.pad_id)


class Full(Method):
    """The base decoder with the whole context in its window: `prefix + context + tokens`.

    `rope`: None (plain; raises `DoesNotFit` beyond `max_length`, default the trained window) or
    `linear` / `dynamic` / `yarn` scaling by `rope_factor` (None: length / trained window, at
    least 1, so a sequence that fits runs unscaled)."""

    def __init__(self, decoder: nn.Module, rope: str | None = None, rope_factor: float | None = None,
                 max_length: int | None = None, pad_id: int = 0):
        if rope is not None and rope not in ROPE_TYPES:
            raise ValueError(f"rope must be one of {ROPE_TYPES} or None, got {rope!r}")
        self.decoder, self.rope, self.rope_factor, self.pad_id = decoder, rope, rope_factor, pad_id
        self.window = native_window(decoder)
        self.max_length = max_length or (self.window if rope is None else math.inf)
        self._prefix = SharedPrefix()
        self.name = "full" if rope is None else f"full-{rope}"

    def ids(self, request: Request) -> list[int]:
        ids = self.head(request) + request.context_ids() + request.tokens
        if len(ids) > self.max_length:
            raise DoesNotFit(f"{self.name}: {len(ids)} tokens exceed its window of {self.max_length}")
        return ids

    def factor(self, length: int) -> float:
        return self.rope_factor if self.rope_factor is not None else max(1.0, length / self.window)

    def decoder_length(self, request: Request) -> int:
        return len(self.head(request)) + len(request.context_ids()) + len(request.tokens)

    def log_probs(self, request: Request, last: int) -> torch.Tensor:
        ids = self.ids(request)
        with scaled_rope(self.decoder, self.rope, self.factor(len(ids))):
            return decoder_log_probs(self.decoder, torch.tensor([ids]), last)[0]

    def log_probs_batch(self, requests: list[Request], last: int) -> torch.Tensor:
        if self.rope is not None:  # the scaling factor depends on each request's length
            return super().log_probs_batch(requests, last)
        rows = [self.ids(r) for r in requests]  # also refuses a request over the window (DoesNotFit)
        shared = self.head(requests[0]) + requests[0].context_ids()
        same = all(self.head(r) + r.context_ids() == shared and len(r.tokens) >= last for r in requests)
        if len(shared) >= 64 and same:
            # candidates of one prompt (and, in ICL, every prompt) share the long context: its
            # keys/values are computed once and kept, only each row's own tokens run
            return self._prefix.log_probs(self.decoder, shared, [r.tokens for r in requests], last)
        return _padded_log_probs(self.decoder, rows, last, self.pad_id)

    def generate(self, request: Request, max_new_tokens: int, stop_ids=frozenset()) -> list[int]:
        ids = self.ids(request)
        with scaled_rope(self.decoder, self.rope, self.factor(len(ids) + max_new_tokens)):
            return _greedy(self.decoder, [ids], max_new_tokens, stop_ids, self.pad_id)[0]

    def generate_batch(self, requests: list[Request], max_new_tokens: int, stop_ids=frozenset()) -> list[list[int]]:
        if self.rope is not None:  # the scaling factor depends on each request's length
            return super().generate_batch(requests, max_new_tokens, stop_ids)
        rows = [self.ids(r) for r in requests]
        return _greedy(self.decoder, rows, max_new_tokens, stop_ids, self.pad_id)


class StreamingLLM(Method):
    """`prefix + context + tokens` read with `num_sinks` attention sinks and the most recent
    tokens, at most `window` keys per query (see `streaming.py`: exact, in one pass)."""

    def __init__(self, decoder: nn.Module, window: int, num_sinks: int = 4, block: int = 256):
        self.decoder, self.window, self.num_sinks, self.block = decoder, window, num_sinks, block
        self.name = "streamingllm"

    def decoder_length(self, request: Request) -> int:
        return min(self.window, len(self.head(request)) + len(request.context_ids()) + len(request.tokens))

    def log_probs(self, request: Request, last: int) -> torch.Tensor:
        ids = torch.tensor([self.head(request) + request.context_ids() + request.tokens])
        if ids.shape[1] <= self.window:  # nothing evicted yet: the plain causal decoder
            return decoder_log_probs(self.decoder, ids, last)[0]
        with sink_attention(self.decoder, self.num_sinks, self.window, self.block):
            return decoder_log_probs(self.decoder, ids, last)[0]


class _Mixture:
    """Replace every row's next-token scores by the weighted mixture of the distributions of its
    group's rows (REPLUG: one group of passes per request), so greedy decoding appends the same
    token to every pass of a request. `sizes`: rows per group, consecutive (default: one group)."""

    def __init__(self, log_weights: torch.Tensor, sizes: list[int] | None = None):
        self.log_weights = log_weights
        self.sizes = sizes or [len(log_weights)]

    def __call__(self, scores):
        lp = scores.float().log_softmax(-1) + self.log_weights.to(scores.device)[:, None]
        mixed = [torch.logsumexp(part, dim=0, keepdim=True).expand_as(part) for part in lp.split(self.sizes)]
        return torch.cat(mixed).to(scores.dtype)


class Replug(Method):
    """REPLUG (Shi et al., 2023): one pass per context document, `prefix + document_i + tokens`,
    next-token distributions mixed uniformly or by softmax(retrieval score / temperature).

    `chunk_tokens`: split the context (laid end to end) into chunks of that many tokens, one pass
    each (long-document LM), instead of one pass per document (retrieved passages). No context:
    the plain decoder on `prefix + tokens`."""

    def __init__(self, decoder: nn.Module, weighting: str = "uniform", temperature: float = 1.0,
                 chunk_tokens: int | None = None, batch_size: int = 4, pad_id: int = 0):
        if weighting not in ("uniform", "score"):
            raise ValueError(f"REPLUG weighting must be 'uniform' or 'score', got {weighting!r}")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"REPLUG chunk_tokens must be positive, got {chunk_tokens}")
        self.decoder, self.weighting, self.temperature = decoder, weighting, temperature
        self.chunk_tokens, self.batch_size, self.pad_id, self.name = chunk_tokens, batch_size, pad_id, "replug"

    def documents(self, request: Request) -> list[list[int]]:
        if self.chunk_tokens is None:
            return [list(d) for d in request.context]
        ids = request.context_ids()
        return [ids[i : i + self.chunk_tokens] for i in range(0, len(ids), self.chunk_tokens)]

    def log_weights(self, request: Request) -> torch.Tensor:
        n = max(1, len(self.documents(request)))
        if self.weighting == "score" and self.chunk_tokens is None and request.weights is not None and request.context:
            return torch.tensor(request.weights, dtype=torch.float32).div(self.temperature).log_softmax(-1)
        return torch.full((n,), -math.log(n))

    def passes(self, request: Request) -> list[list[int]]:
        docs = self.documents(request) or [[]]
        return [self.head(request) + doc + request.tokens for doc in docs]

    def decoder_length(self, request: Request) -> int:
        return max(len(p) for p in self.passes(request))

    def decoder_rows(self, request: Request) -> int:
        return len(self.passes(request))

    def log_probs(self, request: Request, last: int) -> torch.Tensor:
        passes, logw = self.passes(request), self.log_weights(request)
        mix = None
        for i in range(0, len(passes), self.batch_size):
            ids, mask = left_pad(passes[i : i + self.batch_size], self.pad_id)
            lp = decoder_log_probs(self.decoder, ids, last, attention_mask=mask if mask.eq(0).any() else None)
            part = torch.logsumexp(lp + logw[i : i + len(ids)].to(lp.device)[:, None, None], dim=0)
            mix = part if mix is None else torch.logaddexp(mix, part)
        return mix

    def generate(self, request: Request, max_new_tokens: int, stop_ids=frozenset()) -> list[int]:
        return self.generate_batch([request], max_new_tokens, stop_ids)[0]

    def generate_batch(self, requests: list[Request], max_new_tokens: int, stop_ids=frozenset()) -> list[list[int]]:
        """All passes of all requests in one `generate` call; each request's passes are mixed
        among themselves only (they stay in step: every pass appends the mixture's token)."""
        passes = [self.passes(r) for r in requests]
        rows = [p for group in passes for p in group]
        mix = _Mixture(torch.cat([self.log_weights(r) for r in requests]), [len(g) for g in passes])
        out = _greedy(self.decoder, rows, max_new_tokens, stop_ids, self.pad_id, mix=mix)
        firsts = [sum(len(g) for g in passes[:i]) for i in range(len(passes))]
        return [out[i] for i in firsts]


class SharedPrefix:
    """Keys/values of the last shared prefix a decoder read (`transformers` `DynamicCache`), so
    that rows continuing it run only their own tokens. The kept cache is never written to: each
    call works on a copy, repeated over the batch."""

    def __init__(self):
        self.key: tuple[int, ...] | None = None
        self.cache = None

    def log_probs(self, decoder: nn.Module, shared: list[int], suffixes: list[list[int]], last: int) -> torch.Tensor:
        """(B, last, V): log-probs after the last `last` tokens of each `shared + suffixes[i]`;
        every suffix has at least `last` tokens."""
        import copy

        from transformers import DynamicCache

        dev = _device(decoder)
        cache_kw = decoding.cache_keyword(decoder)
        if self.key != tuple(shared):
            cache = DynamicCache(config=decoder.config)
            decoder(input_ids=torch.tensor([shared], device=dev), use_cache=True, logits_to_keep=1, **{cache_kw: cache})
            self.key, self.cache = tuple(shared), cache
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(suffixes))
        width = max(len(x) for x in suffixes)
        # right padding: causal attention keeps every real token blind to the pads after it
        ids = torch.tensor([x + [x[-1]] * (width - len(x)) for x in suffixes], device=dev)
        logits = decoder(input_ids=ids, use_cache=True, **{cache_kw: cache}).logits
        rows = [logits[i, len(x) - last : len(x)] for i, x in enumerate(suffixes)]
        return torch.stack(rows).float().log_softmax(-1)


def _padded_log_probs(model: nn.Module, rows: list[list[int]], last: int, pad_id: int, **kwargs) -> torch.Tensor:
    """(B, last, V) log-probs after the last `last` tokens of each row, rows left-padded."""
    ids, mask = left_pad(rows, pad_id)
    return decoder_log_probs(model, ids, last, attention_mask=mask if mask.eq(0).any() else None, **kwargs)


class Cepe(Method):
    """CEPE: `prefix + tokens` in the decoder; each context document is re-tokenized for the
    encoder and split into its own chunks. `to_encoder` maps a document's decoder ids to the
    encoder's input (default: decode to text with `model.tokenizer`, which `tokenize_context`
    re-tokenizes with `model.encoder_tokenizer`; the decoder-derived encoder takes the ids).
    `state_format`: read the context as stored in that format (`ContextStates.stored_as`: int8, fp8...)."""

    state_format: str | None = None

    def __init__(self, model: Any, to_encoder: Callable[[list[int]], Any] | None = None, pad_id: int = 0,
                 name: str = "cepe"):
        self.model, self.pad_id, self.name = model, pad_id, name
        if to_encoder is None:
            if model.config.encoder_type == "decoder":
                to_encoder = list
            elif model.tokenizer is None:
                raise ValueError("CEPE with an HF encoder needs model.tokenizer to turn decoder ids back into text")
            else:
                to_encoder = lambda ids: model.tokenizer.decode(ids)  # noqa: E731
        self.to_encoder = to_encoder
        self._cache: tuple[Any, Any] | None = None

    def context(self, request: Request):
        """Encoded context (`ContextStates`) of the request, reused while the documents repeat."""
        docs = [d for d in request.context if len(d)]
        if not docs:
            return None
        key = tuple(tuple(d) for d in docs)
        if self._cache is None or self._cache[0] != key:
            states = self.model.encode_context([self.to_encoder(list(d)) for d in docs]).stored_as(self.state_format)
            self._cache = (key, states)
        return self._cache[1]

    def log_probs(self, request: Request, last: int) -> torch.Tensor:
        ids = torch.tensor([self.head(request) + request.tokens], device=_device(self.model))
        out = self.model(input_ids=ids, context=self.context(request), logits_to_keep=last, use_cache=False)
        return out.logits[0, -last:].float().log_softmax(-1)

    def log_probs_batch(self, requests: list[Request], last: int) -> torch.Tensor:
        same = all(r.context == requests[0].context for r in requests)
        # one shared context (label candidates of one prompt) is encoded once and expanded
        ctx = self.context(requests[0]) if same else self.batch_context(requests)
        return _padded_log_probs(self.model, [self.head(r) + r.tokens for r in requests], last, self.pad_id,
                                 **({"context": ctx} if ctx is not None else {}))

    def generate(self, request: Request, max_new_tokens: int, stop_ids=frozenset()) -> list[int]:
        ctx = self.context(request)
        return _greedy(self.model, [self.head(request) + request.tokens], max_new_tokens, stop_ids, self.pad_id,
                       **({"context": ctx} if ctx is not None else {}))[0]

    def batch_context(self, requests: list[Request]):
        """Encoded contexts of several requests as one batch: every request's chunks go through
        the encoder together; requests with fewer chunks are padded with empty chunks (masked;
        a request with no context at all gets a zero cross-attention delta)."""
        if not any(len(d) for r in requests for d in r.context):
            return None
        # tokenize_context_batch drops empty documents itself
        ids, mask = self.model.tokenize_context_batch([[self.to_encoder(list(d)) for d in r.context] for r in requests])
        dev = _device(self.model)
        return self.model.encode(ids.to(dev), mask.to(dev)).stored_as(self.state_format)

    def generate_batch(self, requests: list[Request], max_new_tokens: int, stop_ids=frozenset()) -> list[list[int]]:
        ctx = self.batch_context(requests)
        rows = [self.head(r) + r.tokens for r in requests]
        return _greedy(self.model, rows, max_new_tokens, stop_ids, self.pad_id,
                       **({"context": ctx} if ctx is not None else {}))


METHODS = ("cepe", "truncated", "full", "full-linear", "full-dynamic", "full-yarn", "streamingllm", "replug")


def build_methods(
    names: list[str],
    model: Any = None,
    decoder: nn.Module | None = None,
    *,
    window: int = 512,
    num_sinks: int = 4,
    rope_factor: float | None = None,
    full_max_length: int | None = None,
    replug_weighting: str = "uniform",
    replug_chunk_tokens: int | None = None,
    replug_batch_size: int = 4,
    pad_id: int = 0,
    to_encoder: Callable | None = None,
    bos: int | None = None,
) -> dict[str, Method]:
    """Methods by name. `model` is a `CepeForCausalLM` (needed for `cepe`); base-decoder methods
    use `decoder` or else `model.decoder`. `window` is StreamingLLM's cache (default: the
    decoder window D of the task). `bos`: put before every method's decoder input (Gemma)."""
    decoder = decoder if decoder is not None else getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError("no decoder: pass a CEPE model or a base decoder")
    out: dict[str, Method] = {}
    for name in names:
        if name == "cepe":
            if model is None or not hasattr(model, "encode_context"):
                raise ValueError("method 'cepe' needs a CEPE model (give --adapter DIR or --init zero|copy)")
            out[name] = Cepe(model, to_encoder=to_encoder, pad_id=pad_id)
        elif name == "truncated":
            out[name] = Truncated(decoder, pad_id=pad_id)
        elif name == "full" or name.startswith("full-"):
            rope = None if name == "full" else name.split("-", 1)[1]
            out[name] = Full(decoder, rope=rope, rope_factor=rope_factor, max_length=full_max_length, pad_id=pad_id)
        elif name == "streamingllm":
            out[name] = StreamingLLM(decoder, window=window, num_sinks=num_sinks)
        elif name == "replug":
            out[name] = Replug(decoder, weighting=replug_weighting, chunk_tokens=replug_chunk_tokens,
                               batch_size=replug_batch_size, pad_id=pad_id)
        else:
            raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
        out[name].reading_bos(bos)
    return out

