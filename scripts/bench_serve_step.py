"""Per-step overhead of the serving decode loop (docs/serving.md, "Per-step overhead").

Times, at each batch size B (rows with their own contexts, greedy, every row decoding):
  floor     one bare decoder forward of one token per row with its key/value cache: the compute;
  batch     one `decoding.Batch.step` of the CEPE model with a batched context, plus `decoding.pick`
            and one transfer of the tokens to the host: what the one decoding loop adds;
  static    the same on the server's bucketed static buffers (`StaticBatch.step`, `--cuda-graphs on`):
            on a CUDA device its step is a captured CUDA graph, replayed; on the CPU it runs eagerly;
  worker    one iteration of the continuous batcher (`ContinuousBatcher._step`): rows, detokenising,
            stop checks, events to an asyncio loop running in another thread, as the server does
            (`worker static`: the same with `--cuda-graphs on`).
loop = worker - batch (the serving loop's own cost); overhead = worker - floor. `--profile` prints
cProfile's hottest functions of the worker's steps. On a GPU every timed call ends with a device
synchronisation (`--device cuda --dtype bfloat16`).
`--count-ops` counts the aten operators of one step instead (each a kernel launch on a GPU; views, which
launch nothing, counted apart): the bare decoder step, the CEPE step with and without its context, and
the cross-attention's share per cross-attention layer.

    PYTHONPATH=src python3 scripts/bench_serve_step.py --model tiny --batch 1 8 32 128
    PYTHONPATH=src python3 scripts/bench_serve_step.py --model smollm2 --batch 1 8 32 128 --steps 8
    PYTHONPATH=src python3 scripts/bench_serve_step.py --model shape --batch 1 32 --count-ops
    PYTHONPATH=src python3 scripts/bench_serve_step.py --model smollm2 --device cuda --dtype bfloat16   # on the GPU
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "shape", "smollm2"],
                   help="tiny: the random test model (tests/serving); shape: SmolLM2-135M's 30 layers and the "
                        "released adapter's 15 cross-attention layers at tiny widths, with SmolLM2's tokenizer (the "
                        "per-operation cost a GPU step pays too, almost no compute); smollm2: the released adapter "
                        "on SmolLM2-135M")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--steps", type=int, default=16, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--context-tokens", type=int, default=256, help="context positions per row (several documents)")
    p.add_argument("--docs", type=int, default=4, help="documents per row (each its own ContextStates)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (captured steps need cuda)")
    p.add_argument("--dtype", default="float32", help="the model's dtype (the server's default on a GPU: bfloat16)")
    p.add_argument("--profile", action="store_true", help="cProfile the worker's steps at the largest batch")
    p.add_argument("--count-ops", action="store_true", help="count the aten operators of one step (no timing)")
    p.add_argument("--sdpa", default="default", choices=["default", "decode-order"],
                   help="decode-order: every step under the cross-attention's decoding kernel order (FlashAttention, "
                        "memory-efficient, then cuDNN), for the decoder's own attention too")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    return p.parse_args(argv)


def load(name: str, device: str = "cpu", dtype: str = "float32"):
    if name in ("tiny", "shape"):
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "serving")]
        from serving_harness import tiny_serving_model

        tiny = tiny_serving_model()
        model = tiny if name == "tiny" else smollm2_shape(tiny)
        return model.to(device=device, dtype=getattr(torch, dtype))
    from cepe.model.loading import load_model

    return load_model(adapter="released", dtype=dtype, device=device, kv_policy="cache")


def smollm2_shape(tiny):
    """SmolLM2-135M's layer count and vocabulary at widths of 64, cross-attention on every second
    layer as in the released adapter, the tiny BERT encoder; SmolLM2's own tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cepe import CepeForCausalLM
    from cepe.model.loading import resolve_path

    path = resolve_path("smollm2-135m")
    cfg = AutoConfig.from_pretrained(path)
    cfg.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    decoder = AutoModelForCausalLM.from_config(cfg).eval()
    model = CepeForCausalLM.from_base(decoder, tiny.encoder, chunk_size=8, cross_attn_layers="every:2",
                                      encoder_num_layers=2, kv_policy="cache")
    model.tokenizer, model.encoder_tokenizer = AutoTokenizer.from_pretrained(path), tiny.encoder_tokenizer
    return model


def contexts(model, rows: int, tokens: int, docs: int, seed: int = 0) -> list[list]:
    """Each row `docs` random documents of about tokens/docs encoder tokens, encoded."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.encoder_tokenizer.vocab_size
    per = max(1, tokens // docs - 2)
    out = []
    for _ in range(rows):
        ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (docs, per), generator=g).tolist()
        out.append([model.encode_context([d]) for d in ids])
    return out


def prompts(model, rows: int, tokens: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    return [torch.randint(4, vocab, (tokens - (i % 4),), generator=g).tolist() for i in range(rows)]


def timed(fn, steps: int) -> float:
    """Median seconds of one call over `steps` calls (each ended by a device synchronisation), after
    two untimed ones."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn(), fn()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def floor_step(model, prompt_ids, steps: int) -> float:
    """A bare decoder step: the decoder alone, one token per row after a prefilled cache."""
    from cepe.model import decoding

    batch = decoding.Batch(model.decoder, pad_id=0)
    logits = batch.prefill(prompt_ids)
    tokens = logits.argmax(-1)
    cache = batch.cache
    mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, steps + 3))], dim=-1)
    state = {"pos": batch.next_positions, "t": batch.length}

    def step():
        state["t"] += 1
        decoding.forward(model.decoder, tokens.view(-1, 1), cache, attention_mask=mask[:, : state["t"]],
                         position_ids=state["pos"])
        state["pos"] = state["pos"] + 1

    return timed(step, steps)


@torch.no_grad()
def batch_step(model, prompt_ids, ctxs, steps: int) -> float:
    """`decoding.Batch.step` with the batched CEPE context, `pick`, the tokens to the host."""
    from cepe.model import decoding
    from cepe.serving.batch_context import RowContexts

    rc = RowContexts.build(model, ctxs)
    batch = decoding.Batch(model, pad_id=0, context=rc.context)
    samplers = [decoding.Sampler() for _ in prompt_ids]
    state = {"tokens": decoding.pick(batch.prefill(prompt_ids), samplers)}

    def step():
        state["tokens"] = decoding.pick(batch.step(state["tokens"]), samplers)
        state["tokens"].tolist()

    return timed(step, steps)


@torch.no_grad()
def static_step(model, prompt_ids, ctxs, steps: int) -> float:
    """`batch_step` on the server's bucketed static buffers (`StaticBatch`): captured and replayed
    on a CUDA device (the capture in the untimed first call), eager on the CPU."""
    from cepe.model import decoding
    from cepe.serving.batch_context import RowContexts
    from cepe.serving.captured import StepGraphs
    from cepe.serving.static_batch import StaticBatch

    rc = RowContexts.build(model, ctxs)
    joiner = decoding.Batch(model, pad_id=0, context=rc.context)
    samplers = [decoding.Sampler() for _ in prompt_ids]
    state = {"tokens": decoding.pick(joiner.prefill(prompt_ids), samplers)}
    graphs = StepGraphs(capture_graphs=next(model.parameters()).is_cuda)
    batch = StaticBatch(model, len(prompt_ids), 2**40, graphs)
    batch.join(joiner, rc, joiner.length + steps + 4)

    def step():
        state["tokens"] = decoding.pick(batch.step(state["tokens"]), samplers)
        state["tokens"].tolist()

    seconds = timed(step, steps)
    if graphs.capture_graphs and not graphs.captures:
        print("warning: the step was not captured (see the log): timed eagerly", file=sys.stderr)
    return seconds


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it: `kernels` (each a kernel launch on a GPU) and
    `views` (metadata only, no launch: view, transpose, slice..., and `_unsafe_view`, which the
    schema does not mark as a view but which only reshapes the fresh output of a matmul)."""

    def __init__(self):
        super().__init__()
        self.kernels = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view or func is torch.ops.aten._unsafe_view.default:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def count_step(step) -> OpCounter:
    """The operators of one call of `step` (after one uncounted call: caches filled)."""
    step()
    with OpCounter() as counter:
        step()
    return counter


@torch.no_grad()
def count_ops(model, prompt_ids, ctxs) -> dict:
    """Operators of one decoding step: the bare decoder (`floor`), `decoding.Batch.step` of the CEPE
    model with the batched context (`cepe`) and without it (`nocontext`); `per_xattn_layer` = (cepe -
    nocontext) / cross-attention layers, the cross-attention's own operators."""
    from cepe.model import decoding
    from cepe.serving.batch_context import RowContexts

    out = {}
    for name, net, kwargs in (("floor", model.decoder, {}), ("nocontext", model, {}),
                              ("cepe", model, {"context": RowContexts.build(model, ctxs).context})):
        batch = decoding.Batch(net, pad_id=0, **kwargs)
        state = {"tokens": batch.prefill(prompt_ids).argmax(-1)}

        def step(batch=batch, state=state):  # bound now: called within this iteration
            state["tokens"] = batch.step(state["tokens"]).argmax(-1)

        counter = count_step(step)
        out[name] = {"kernels": counter.kernels, "views": counter.views}
    layers = len(model.cross_attn)
    out["per_xattn_layer"] = {k: (out["cepe"][k] - out["nocontext"][k]) / layers for k in ("kernels", "views")}
    return out


class _Sinks:
    """An asyncio loop in its own thread draining every job's queue, as the HTTP handlers do."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.events = 0
        self.drains = []

    def queue(self) -> asyncio.Queue:
        q = asyncio.run_coroutine_threadsafe(self._make(), self.loop).result()
        self.drains.append(asyncio.run_coroutine_threadsafe(self._drain(q), self.loop))
        return q

    async def _make(self):
        return asyncio.Queue()

    async def _drain(self, q):
        while True:
            await q.get()
            self.events += 1

    def close(self):
        for drain in self.drains:
            drain.cancel()
        for _ in range(2):  # let the cancellations run
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@torch.no_grad()
def worker_step(model, prompt_ids, ctxs, steps: int, sinks: _Sinks, profile: bool, graphs: str = "off") -> float:
    """One `ContinuousBatcher._step` with every row joined (greedy, ignore_eos, no stop), with
    `--cuda-graphs graphs`."""
    from cepe.serving.continuous import ContinuousBatcher
    from cepe.serving.engine import GenerateJob, Runner, Sampling, Scheduler
    from cepe.serving.metrics import Metrics

    metrics = Metrics()
    runner = Runner(model, model.tokenizer, threading.Lock(), metrics)
    scheduler = Scheduler(runner, max_queue=4096, max_batch=4096, metrics=metrics, batching="continuous")
    batcher = ContinuousBatcher(scheduler, runner, max_batch=len(prompt_ids), budget_bytes=2**40, cuda_graphs=graphs)
    # enough tokens for every timed step (static buffers hold what a row may generate: keep it small)
    jobs = [GenerateJob(p, Sampling(max_tokens=steps + 4, temperature=0.0, ignore_eos=True), c, sink=sinks.queue(),
                        loop=sinks.loop, deadline=time.monotonic() + 3600) for p, c in zip(prompt_ids, ctxs)]
    batcher._join(jobs)
    if not profile:
        return timed(batcher._step, steps)
    prof = cProfile.Profile()
    prof.enable()
    seconds = timed(batcher._step, steps)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    model = load(args.model, args.device, args.dtype).eval()
    if args.threads:  # after loading: the tiny model's test helpers set their own
        torch.set_num_threads(args.threads)
    if args.count_ops:
        return print_op_counts(model, args)
    if args.sdpa == "decode-order":  # is cuDNN's plan per new key length what an eager step pays for? (serving.md)
        from cepe.model.cross_attention import decode_kernels

        decode_kernels().__enter__()
    sinks = _Sinks()
    rows = []
    print(f"{'B':>5} {'floor ms':>9} {'batch ms':>9} {'static ms':>10} {'worker ms':>10} {'w.static ms':>12} "
          f"{'loop ms':>8} {'overhead ms':>12}")
    for b in args.batch:
        p, c = prompts(model, b, args.prompt_tokens), contexts(model, b, args.context_tokens, args.docs)
        floor = floor_step(model, p, args.steps)
        batch = batch_step(model, p, c, args.steps)
        static = static_step(model, p, c, args.steps)
        worker = worker_step(model, p, c, args.steps, sinks, args.profile and b == max(args.batch))
        wstatic = worker_step(model, p, c, args.steps, sinks, False, graphs="on")
        over = worker - floor
        rows.append({"batch": b, "floor_ms": 1e3 * floor, "batch_ms": 1e3 * batch, "static_ms": 1e3 * static,
                     "worker_ms": 1e3 * worker, "worker_static_ms": 1e3 * wstatic,
                     "loop_ms": 1e3 * (worker - batch), "overhead_ms": 1e3 * over})
        print(f"{b:>5} {1e3 * floor:>9.2f} {1e3 * batch:>9.2f} {1e3 * static:>10.2f} {1e3 * worker:>10.2f} "
              f"{1e3 * wstatic:>12.2f} {1e3 * (worker - batch):>8.2f} {1e3 * over:>12.2f}", flush=True)
    sinks.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": torch.get_num_threads(),
                                               "device": args.device, "dtype": args.dtype, "args": vars(args),
                                               "rows": rows}, indent=1))
    return 0


def print_op_counts(model, args) -> int:
    rows = []
    print(f"{'B':>5} {'floor':>13} {'cepe nocontext':>15} {'cepe':>13} {'per xattn layer':>16}   (kernels + views)")
    for b in args.batch:
        p, c = prompts(model, b, args.prompt_tokens), contexts(model, b, args.context_tokens, args.docs)
        n = count_ops(model, p, c)
        rows.append({"batch": b, **n})
        cell = {k: f"{v['kernels']:g} + {v['views']:g}" for k, v in n.items()}
        print(f"{b:>5} {cell['floor']:>13} {cell['nocontext']:>15} {cell['cepe']:>13} {cell['per_xattn_layer']:>16}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "args": vars(args), "op_counts": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
