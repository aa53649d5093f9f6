"""`kv_policy="absorbed"` against `cache` through the whole model in bf16 (issue 16): greedy tokens,
every step's logits teacher-forced on the `cache` run's tokens (relative error, argmax agreement),
peak memory, for one prompt over a long context.

    PYTHONPATH=src python3 scripts/gpu/check_absorbed_policy.py --preset llama2-7b --context 128K --out $OUT
    PYTHONPATH=src python3 scripts/gpu/check_absorbed_policy.py --preset tiny --context 512 --device cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cepe.benchmarks.cli import _lengths
from cepe.benchmarks.presets import build_model, get_spec
from cepe.benchmarks.scoring import make_inputs
from cepe.model import decoding


@torch.no_grad()
def teacher_forced_logits(model, policy: str, prompt: torch.Tensor, sequence: torch.Tensor, ctx) -> torch.Tensor:
    """(steps, V) float32 next-token logits under `policy` along `sequence` (1, prompt + new): the
    prefill's, then one decoding step per token of `sequence` after the prompt."""
    model.config.kv_policy = policy
    batch = decoding.Batch(model, 0, context=ctx)
    logits = [batch.prefill([prompt[0].tolist()])]
    for token in sequence[0, prompt.shape[1] : -1]:
        logits.append(batch.step(token.view(1)))
    return torch.cat(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-7b")
    ap.add_argument("--context", type=_lengths, default=(131072,), help="context tokens, e.g. 128K")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(get_spec(args.preset), args.device, dtype)
    rows = []
    for context in args.context:
        inputs = make_inputs(model, context + args.prompt, args.prompt, args.device)
        # a fresh context per run: one filled under `cache` keeps its keys/values, which a later run would read
        def fresh(inputs=inputs):
            return model.encode(inputs.context_ids, inputs.context_mask)

        # free-running greedy tokens under each policy, then every step's logits teacher-forced on the
        # `cache` run's tokens: after a first differing token a free run compares different prefixes
        out = {}
        for policy in ("cache", "absorbed"):
            model.config.kv_policy = policy
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            gen = model.generate(inputs.decoder_ids, context=fresh(), max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=0)
            peak = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else None
            out[policy] = (gen, peak)
        (ts, pc), (ta, pa) = out["cache"], out["absorbed"]
        forced = {p: teacher_forced_logits(model, p, inputs.decoder_ids, ts, fresh()) for p in ("cache", "absorbed")}
        lc, la = forced["cache"], forced["absorbed"]
        rel = (la - lc).norm(dim=-1) / lc.norm(dim=-1)  # (steps,)
        prompt_len = inputs.decoder_ids.shape[1]
        agree = int((ts == ta).all(dim=0).long().cumprod(0).sum()) - prompt_len
        rows.append(dict(preset=args.preset, context=context, dtype=str(dtype), new_tokens=args.new_tokens,
                         same_tokens=bool(torch.equal(ts, ta)), tokens_agreeing=agree,
                         prefill_rel_err=float(rel[0]), max_step_rel_err=float(rel.max()),
                         forced_argmax_agree=int((la.argmax(-1) == lc.argmax(-1)).sum()), forced_steps=len(rel),
                         peak_gb_cache=pc, peak_gb_absorbed=pa))
        print(json.dumps(rows[-1]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "check_absorbed_policy.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
