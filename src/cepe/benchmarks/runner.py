"""The sweep: scoring and decoding at each total length, CEPE against full attention, one JSON.

Each measurement is one row. Out of memory is a row too (status "oom"); longer lengths of the
same series are then skipped (memory only grows with length). Rows are written to the JSON as
they come, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model import CepeForCausalLM
from ..model.encoder_compile import pass_sizes
from ..model.stored_states import storage_per_token
from . import flops as F
from .decoding import decode_hf, decode_static
from .kernels import kernel_rows
from .presets import ModelSpec, build_model, get_spec, parameter_bytes, parameter_count
from .scoring import cepe_scores, full_scores, make_inputs
from .stored import first_token_fn, load_time, store_document
from .timing import (GB, PeakMemory, Timing, device_ceilings, environment, free_memory, is_cuda, sdpa_backend,
                     time_until_stable)

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)
# full attention's prefill is quadratic: ~12 s at 128K, ~50 s at 256K and ~200 s at 512K on an H100/H200
FULL_MAX_LEN = 262144
# absorbed-fp8[-compiled]: `absorbed` reading an fp8 copy of the states (`absorbed_states`)
POLICIES = ("recompute", "cache", "absorbed", "absorbed-fp8", "absorbed-fp8-compiled", "auto")
DEFAULT_POLICIES = ("recompute", "cache", "auto")  # `auto` turns absorbed where the cache does not fit


@dataclass
class BenchConfig:
    """What to measure. Lengths are total tokens (context + decoder window)."""

    preset: str = "llama2-7b"
    config_path: str | None = None
    cross_kv_heads: int | None = None
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    score_tokens: int = 4096
    new_tokens: int = 128
    methods: tuple[str, ...] = ("cepe", "full")
    tasks: tuple[str, ...] = ("kernels", "score", "decode", "ttft")
    question_tokens: int = 512  # ttft: a question of this many tokens over a stored document
    full_max_len: int | None = FULL_MAX_LEN  # full attention is not run beyond this total length
    policies: tuple[str, ...] = DEFAULT_POLICIES
    decode_mode: str = "graph"  # graph | eager | compiled (CPU: eager, or compiled without a graph)
    hf_lengths: tuple[int, ...] = ()  # also time `generate` (dynamic cache, eager) at these lengths
    hf_policies: tuple[str, ...] = ("recompute", "cache")
    kv_budget_gb: float | str | None = (
        "free"  # `auto` policy budget: GB, "free" (fits in free memory), None (library's)
    )
    device: str = "cuda"
    dtype: str = "bfloat16"
    sdpa: str = "default"
    # the model's `encoder_compile`: auto (compiled on CUDA from 64 chunks up, the library's
    # default), always, never; compilation is timed apart (`encoder_compile_s`), never in a row
    encoder_compile: str = "auto"
    reps: int = 3
    seed: int = 0
    time_budget_s: float | None = None
    out: str | None = None
    command: str = field(default_factory=lambda: " ".join(["cepe bench"] + sys.argv[1:]))


class Bench:
    def __init__(self, cfg: BenchConfig, spec: ModelSpec | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        self.spec = spec or get_spec(cfg.preset, cfg.config_path, cross_kv_heads=cfg.cross_kv_heads)
        self.rows: list[dict] = []
        self.t_start = time.perf_counter()
        self.failed: dict[tuple, int] = {}  # series -> length that ran out of memory
        self.result: dict = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.env = environment(self.device, self.dtype, cfg.sdpa, cfg.command)
        self.ceilings = device_ceilings(self.device, self.dtype)
        t0 = time.perf_counter()
        self.model: CepeForCausalLM = build_model(self.spec, self.device, self.dtype, cfg.seed)
        self.model.config.encoder_compile = cfg.encoder_compile
        build_s = time.perf_counter() - t0
        compile_s = self._compile_encoder()
        m = self.model
        self.dec_shape = F.StackShape.from_config(m.decoder.config)
        enc_cfg = m.config.encoder_config
        self.enc_shape = (F.StackShape.from_config(enc_cfg) if enc_cfg is not None
                          else F.StackShape.from_config(m.decoder.config, layers=m.config.encoder_num_layers))
        self.cross_shape = F.CrossShape.from_model(m)
        self.full_weight_bytes = parameter_bytes(m.decoder)
        self.cepe_weight_bytes = parameter_bytes(m)
        self.result = {
            "env": self.env,
            "config": {k: v for k, v in asdict(cfg).items() if k != "command"},
            "model": {
                **self.spec.describe(),
                "params": {"decoder": parameter_count(m.decoder), "encoder": parameter_count(m.encoder) - _shared(m),
                           "cross_attention": parameter_count(m.cross_attn)},
                "weights_gb": {"full": self.full_weight_bytes / GB, "cepe": self.cepe_weight_bytes / GB},
                # stored states vs the cache policy's keys/values vs full attention's KV cache
                "bytes_per_context_token": storage_per_token(m.cross_attn.values(), cfg.dtype, self.dtype.itemsize,
                                                             m.decoder.config),
                "build_s": build_s,
                "encoder_compile_s": compile_s,  # None: the encoder runs eagerly at these lengths
            },
            "ceilings": self.ceilings,
            "rows": self.rows,
        }

    def _compile_encoder(self) -> float | None:
        """Compile the encoder before any row when the lengths will run it compiled (one graph per
        pass size), so no row's first call compiles. Returns the seconds, or None (eager)."""
        m, cfg = self.model, self.cfg
        if "cepe" not in cfg.methods or not (set(cfg.tasks) & {"score", "decode", "ttft"}):
            return None
        longest = max(cfg.lengths)
        chunks = _padded(longest - min(cfg.score_tokens, longest), m.config.chunk_size) // m.config.chunk_size
        per_pass = min(chunks, m.config.encoder_chunks_per_pass or chunks)
        with torch.no_grad():
            if not m.encoder_runner.compile_pending(cfg.encoder_compile, per_pass, self.device):
                return None
            # one pass of each compiled size the rows will use: no row's first call compiles
            n = min(per_pass, sum(pass_sizes(m.encoder, m.config.chunk_size)))
            ids = torch.randint(3, m.encoder.vocab_size, (1, n, m.config.chunk_size), device=self.device)
            t0 = time.perf_counter()
            m.encode(ids, torch.ones_like(ids))
            if is_cuda(self.device):
                torch.cuda.synchronize(self.device)
            return time.perf_counter() - t0

    # ------------------------------------------------------------------ helpers
    def _row(self, **kw) -> dict:
        row = {**self.env, "preset": self.spec.name, **kw}
        self.rows.append(row)
        self.save()
        return row

    def _over_budget(self) -> bool:
        b = self.cfg.time_budget_s
        return b is not None and time.perf_counter() - self.t_start > b

    def _guard(self, series: tuple, length: int, fn):
        """Run fn() unless this series already ran out of memory at a shorter length or the time
        budget is spent. Returns (result, status, error)."""
        if series in self.failed and length > self.failed[series]:
            return None, "skipped", f"out of memory at {self.failed[series]} tokens"
        cap = self.cfg.full_max_len
        if series[1] == "full" and cap is not None and length > cap:
            return None, "skipped", f"full attention is not run beyond {cap} tokens (quadratic prefill)"
        if self._over_budget():
            return None, "skipped", "time budget spent"
        status, err, out = "ok", None, None
        try:
            out = fn()
        except torch.OutOfMemoryError as e:
            status, err = "oom", str(e).splitlines()[0][:200]
        except Exception as e:  # a failed measurement is a row, never the end of the sweep
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            # e.g. a cuBLAS workspace that cannot be allocated is out of memory too
            status, err = ("oom" if "out of memory" in msg.lower() or "ALLOC_FAILED" in msg else "error"), msg
        if status == "oom":
            self.failed[series] = length
        free_memory(self.device)
        return out, status, err

    def _time(self, fn, compiled: bool = False) -> Timing:
        """Warm up until `reps` repeated calls agree within 5% (calls over 3 s: two), bounded;
        the row reports those calls' spread and the first call. A compiled model's first call
        (compilation) is never timed."""
        return time_until_stable(fn, self.device, reps=self.cfg.reps, untimed_first=compiled)

    # ------------------------------------------------------------------ scoring
    def score(self, method: str, total: int) -> None:
        cfg, m = self.cfg, self.model
        d = min(cfg.score_tokens, total)
        inputs = make_inputs(m, total, d, self.device, cfg.seed)
        chunk_len = inputs.context_ids.shape[-1] if inputs.context_ids is not None else m.config.chunk_size
        if method == "cepe":
            fn, weights = (lambda: cepe_scores(m, inputs)), self.cepe_weight_bytes
            work = F.cepe_scoring_flops(self.dec_shape, self.enc_shape, self.cross_shape, total, d, chunk_len)
        else:
            fn, weights = (lambda: full_scores(m, inputs)), self.full_weight_bytes
            work = F.full_scoring_flops(self.dec_shape, total, d)
        mem = PeakMemory(self.device, weights)

        def run():
            with mem:
                return self._time(fn)

        timing, status, err = self._guard(("score", method), total, run)
        row = dict(task="score", method=method, total_len=total, context_tokens=inputs.context_tokens,
                   decoder_tokens=d, status=status, error=err, flops=work)
        if status == "ok":
            t = timing.median
            tflops = work["total"] / t / 1e12
            peak = self.ceilings.get("matmul_tflops")
            row.update(**timing.row(), tokens_per_s=total / t, scored_tokens_per_s=d / t,
                       tflops_per_s=tflops, mfu=tflops / peak if peak else None,
                       peak_gb=_gb(mem.peak_bytes), raw_peak_gb=_gb(mem.raw_peak_bytes))
        self._row(**row)

    # ------------------------------------------------------------------ decoding
    def decode(self, method: str, total: int, policy: str, mode: str) -> None:
        cfg, m = self.cfg, self.model
        d = min(cfg.score_tokens, total)
        inputs = make_inputs(m, total, d, self.device, cfg.seed)
        context = inputs.context_tokens
        old = m.config.kv_policy, m.config.kv_cache_budget_bytes, m.config.absorbed_states
        if method == "cepe":
            m.config.kv_policy, _, states = policy.partition("-")
            m.config.absorbed_states = states or "native"
            if policy == "auto":
                m.config.kv_cache_budget_bytes = self._kv_budget(total, d, context)
            ids, cids, cmask, weights = (inputs.decoder_ids, inputs.context_ids, inputs.context_mask,
                                         self.cepe_weight_bytes)
        else:
            ids, cids, cmask, weights = inputs.full_ids, None, None, self.full_weight_bytes
        mem = PeakMemory(self.device, weights)

        def run():
            with mem:
                if mode == "hf":
                    return decode_hf(m, method, ids, cids, cmask, cfg.new_tokens)
                return decode_static(m, method, ids, cids, cmask, cfg.new_tokens, mode=cfg.decode_mode)

        series = ("decode", method, policy, mode)
        try:
            res, status, err = self._guard(series, total, run)
        finally:
            m.config.kv_policy, m.config.kv_cache_budget_bytes, m.config.absorbed_states = old
        row = dict(task="decode", method=method, policy=policy if method == "cepe" and context else "none",
                   total_len=total, context_tokens=context, decoder_tokens=ids.shape[1], new_tokens=cfg.new_tokens,
                   status=status, error=err)
        if method == "cepe" and policy == "auto" and context:
            row["kv_budget_gb"] = _gb(self._last_budget)
        if method == "cepe" and context:
            row["cross_kv_cache_gb"] = self.cross_shape.kv_bytes(_padded(context, m.config.chunk_size)) / GB
        if status == "ok":
            res.pop("tokens", None)
            used = res.get("policy_used", policy if method == "cepe" else "none")
            mid = ids.shape[1] + cfg.new_tokens // 2
            cost = F.decode_step_cost(self.dec_shape, mid, self.cross_shape if method == "cepe" else None,
                                      _padded(context, m.config.chunk_size) if method == "cepe" else 0, used)
            s = res["s_per_token"]
            bw = self.ceilings.get("copy_gbps")
            row.update(res, policy_used=used, ms_per_token=s * 1e3, tokens_per_s=1 / s, bytes_per_token=cost["bytes"],
                       gb_per_s=cost["bytes"] / s / GB, bandwidth_util=(cost["bytes"] / s / GB / bw) if bw else None,
                       flops_per_token=cost["flops"], peak_gb=_gb(mem.peak_bytes), raw_peak_gb=_gb(mem.raw_peak_bytes))
            if "eager_s_per_token" in row:
                row["eager_ms_per_token"] = row.pop("eager_s_per_token") * 1e3
        self._row(**row)

    _last_budget: int | None = None

    def _kv_budget(self, total: int, d: int, context: int) -> int:
        """Budget of the `auto` policy. "free": what is left on the device once the decoder's
        static cache, the encoded context and a 6 GiB workspace are set aside."""
        b = self.cfg.kv_budget_gb
        if b is None:
            budget = self.model.config.kv_cache_budget_bytes
        elif isinstance(b, str):
            if not is_cuda(self.device):
                budget = self.model.config.kv_cache_budget_bytes
            else:
                free, _ = torch.cuda.mem_get_info(self.device)
                self_kv = 2 * (d + self.cfg.new_tokens) * self.dec_shape.kv_bytes_per_token()
                states = _padded(context, self.model.config.chunk_size) * self.enc_shape.hidden * 2
                budget = max(0, free - self_kv - states - 6 * 2**30)
        else:
            budget = int(float(b) * GB)
        self._last_budget = budget
        return budget

    # ------------------------------------------------------------------ time to first token
    def ttft(self, method: str, total: int) -> None:
        """Time to the first token of a `question_tokens` question after total - question tokens
        of text. CEPE: the document was encoded and stored before (its states are on the device,
        as a document store holds them): prefill the question against them and pick a token; no
        encoder run. Also `load_s`: reading those states back from a safetensors file (from the
        page cache) onto the device. Full attention: prefill all `total` tokens, keep the cache."""
        cfg, m = self.cfg, self.model
        q = min(cfg.question_tokens, total)
        inputs = make_inputs(m, total, q, self.device, cfg.seed)
        old_policy = m.config.kv_policy
        m.config.kv_policy = "recompute"  # project the cross keys/values once inside the prefill, keep none
        extra: dict = {}

        def run():
            stored = store_document(m, inputs) if method == "cepe" else None
            held = self.full_weight_bytes if stored is None else self.cepe_weight_bytes + stored.hidden_states.nbytes
            extra["mem"] = mem = PeakMemory(self.device, held)  # a stored document's states count as held
            with mem:
                timing = self._time(first_token_fn(m, method, inputs, stored))
            if stored is not None:
                extra.update(
                    load_time(stored, self.device), stored_state_bytes_per_token=stored.hidden_states[0, 0].nbytes
                )
            return timing

        try:
            timing, status, err = self._guard(("ttft", method), total, run)
        finally:
            m.config.kv_policy = old_policy
        mem = extra.pop("mem", None)
        row = dict(task="ttft", method=method, total_len=total, context_tokens=inputs.context_tokens,
                   question_tokens=q, status=status, error=err, **extra)
        if status == "ok":
            row.update(**timing.row(), peak_gb=_gb(mem.peak_bytes), raw_peak_gb=_gb(mem.raw_peak_bytes))
        self._row(**row)

    # ------------------------------------------------------------------ attention kernels
    def kernels(self, total: int) -> None:
        """Cross-attention alone at `total` tokens under each SDPA kernel (`kernels.kernel_rows`)."""
        d = min(self.cfg.score_tokens, total)
        s = _padded(total - d, self.model.config.chunk_size)
        if is_cuda(self.device) and s > 0:
            for row in kernel_rows(self.cross_shape, s, d, total, self.device, self.dtype):
                self._row(**row)

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[tuple]:
        cfg = self.cfg
        items = []
        if "kernels" in cfg.tasks and is_cuda(self.device) and "cepe" in cfg.methods:
            items.append(("kernels", max(cfg.lengths)))
        if "score" in cfg.tasks:
            for method in cfg.methods:
                items += [("score", method, n) for n in cfg.lengths]
        if "decode" in cfg.tasks:
            for method in cfg.methods:
                for n in cfg.lengths:
                    if method == "full":
                        items.append(("decode", "full", n, "none", "graph"))
                    elif n <= cfg.score_tokens:  # no context: one row, policies do not apply
                        items.append(("decode", "cepe", n, "none", "graph"))
                    else:
                        items += [("decode", "cepe", n, p, "graph") for p in cfg.policies]
            for n in cfg.hf_lengths:
                if "full" in cfg.methods:
                    items.append(("decode", "full", n, "none", "hf"))
                if "cepe" in cfg.methods:
                    items += [("decode", "cepe", n, p, "hf") for p in cfg.hf_policies]
        if "ttft" in cfg.tasks:
            for method in cfg.methods:
                items += [("ttft", method, n) for n in cfg.lengths if n > cfg.question_tokens]
        return items

    def run(self) -> dict:
        self.setup()
        items = self.plan()
        with sdpa_backend(self.cfg.sdpa):
            for item in tqdm(items, desc=f"bench {self.spec.name}", mininterval=2.0, file=sys.stderr):
                if item[0] == "kernels":
                    self.kernels(item[1])
                elif item[0] == "score":
                    self.score(item[1], item[2])
                elif item[0] == "ttft":
                    self.ttft(item[1], item[2])
                else:
                    self.decode(item[1], item[2], item[3], item[4])
        self.result["wall_s"] = time.perf_counter() - self.t_start
        self.save(final=True)
        return self.result

    def save(self, final: bool = False) -> None:
        if not self.cfg.out:
            return
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"bench_{self.spec.name}.json"
        path.write_text(json.dumps(self.result, indent=1, default=str))
        if final:
            from .report import plot

            plot(self.result, out / f"bench_{self.spec.name}.png")


def _padded(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


def _gb(x: int | None) -> float | None:
    return None if x is None else x / GB


def _shared(m: CepeForCausalLM) -> int:
    dec = {id(p) for p in m.decoder.parameters()}
    return sum(p.numel() for p in m.encoder.parameters() if id(p) in dec)


def run_bench(cfg: BenchConfig, spec: ModelSpec | None = None) -> dict:
    """Python API: run the sweep described by `cfg`; returns (and writes, given `cfg.out`) the result."""
    return Bench(cfg, spec).run()
