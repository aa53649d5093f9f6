"""Can an adapter learn to bind a value to its key? A short, focused training experiment.

RULER's multi-key needles fail because the answer copies *a* needle's value, not the asked one's
(docs/results_general_stage11.md). This trains an adapter (from `--init`, in this process; written
only with `--save`) on `facts` samples only: `--facts` keyed facts that share one attribute and
differ only by key, contexts of `--context` tokens, and measures teacher-forced exact match (= greedy
exact match) on held-out documents before and after, with 2 and 4 facts at 1K and 4K tokens of
context (`--steps 0`: measure only). Results: docs/results_binding_probe.md.

`--lora R` adds trainable rank-R updates to the frozen decoder's self-attention projections
(`--lora-targets`), the hypothesis being that the answer position sees the asked key only through
the frozen self-attention. Zero-initialised, so step 0 is the adapter unchanged.

    python3 scripts/probe_binding.py --init weights/cepe-smollm2-135m --data TRAIN_DIR HELDOUT_DIR \\
        --steps 600 --lr 3e-4 [--lora 16] --device cuda --out probe.json

Chance is 1/2 with 2 facts and 1/4 with 4 facts for an answer that copies one of them exactly.
"""

import argparse
import contextlib
import json
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from cepe.data.pipeline import build_data
from cepe.data.samples import Collator
from cepe.model.loading import load_model
from cepe.training.config import load_config
from cepe.training.losses import cross_entropy
from cepe.training.metrics import whole_answers


class LowRank(nn.Module):
    """A frozen linear layer plus a trainable rank-r update: y = W x + (alpha / r) B A x, B = 0 at start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        dev, n_in = base.weight.device, base.in_features
        self.A = nn.Parameter(torch.randn(rank, n_in, device=dev) / math.sqrt(n_in))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.to(x.dtype).T @ self.B.to(x.dtype).T) * self.scale


def add_low_rank(model, rank: int, targets: list[str], alpha: float) -> list[nn.Parameter]:
    """Wrap `targets` of every decoder layer's self-attention; returns the new parameters."""
    params = []
    for layer in model.decoder.model.layers:
        for t in targets:
            wrapped = LowRank(getattr(layer.self_attn, t), rank, alpha)
            setattr(layer.self_attn, t, wrapped)
            params += [wrapped.A, wrapped.B]
    return params


def facts_config(data: list[str], n_facts: tuple[int, int], context: tuple[int, int], window: int, seed: int,
                 formats: str = "single: 1.0", keyless: float = 0.0, repeat: float = 0.0, overrides=()):
    return load_config("configs/general_smollm2.yaml", [
        f"data.train=[{','.join(data)}]", "data.heldout=[heldout/]", "data.mixture={facts: 1.0}",
        f"data.facts.facts=[{n_facts[0]},{n_facts[1]}]", "data.facts.same_attribute=1.0",
        f"data.facts.keyless={keyless}",
        f"data.facts.formats={{{formats}}}", "data.facts.queries=[1,1]", f"data.facts.repeat={repeat}",
        f"data.decoder_windows=[{window}]", f"data.context_tokens={context[1]}",
        f"data.min_context_tokens={context[0]}", "data.num_workers=0", f"data.seed={seed}", *overrides])


def batches(stream, collate, start: int, n: int, bs: int, device):
    for i in range(start, start + n, bs):
        b = collate([stream[j] for j in range(i, min(start + n, i + bs))])
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


@torch.no_grad()
def exact(model, stream, collate, n: int, bs: int, device, amp) -> float:
    model.eval()
    answers = right = 0
    for b in batches(stream, collate, 0, n, bs, device):
        with amp():
            logits = model(input_ids=b["input_ids"], context_input_ids=b["context_input_ids"],
                           context_attention_mask=b["context_attention_mask"], use_cache=False).logits[:, :-1]
        labels = b["labels"][:, 1:]
        a, w = whole_answers(logits.argmax(-1) == labels, b["task_mask"][:, 1:] & (labels != -100))
        answers, right = answers + int(a), right + int(w)
    model.train()
    return right / max(answers, 1)


def plot(files: list[str], out: str) -> None:
    """Exact match against training step, one panel per evaluation, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {f.rsplit("/", 1)[-1].removesuffix(".json"): json.load(open(f)) for f in files}
    panels = [k for k in next(iter(runs.values()))["history"][0] if k != "step"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), sharey=True)
    for ax, panel in zip(axes, panels):
        for name, run in runs.items():
            steps, exact_pct = zip(*[(r["step"], 100 * r[panel]) for r in run["history"]])
            ax.plot(steps, exact_pct, marker="o", label=name)
        chance = 50 if panel.startswith("2 ") else 25
        ax.axhline(chance, color="grey", lw=0.8, ls=":")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("training step")
    axes[0].set_ylabel("exact match, % (dotted: chance)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="only plot these results (to --out, a .png)")
    ap.add_argument("--init", help="adapter folder to start from")
    ap.add_argument("--data", nargs="+",
                    help="folders of .jsonl documents; paths with heldout/ are held out")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", default="256,1024", help="min,max encoder tokens of the training samples")
    ap.add_argument("--facts", default="2,4")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--formats", default="single: 1.0", help="training facts formats, YAML mapping body")
    ap.add_argument("--keyless", type=float, default=0.0, help="share of training facts without a key")
    ap.add_argument("--repeat", type=float, default=0.0,
                    help="share of training samples whose haystack is one span repeated (data.facts.repeat)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config overrides for the training samples, e.g. data.facts.multi_order=random")
    ap.add_argument("--eval-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for the held-out samples, e.g. data.facts.same_key_shape=1")
    ap.add_argument("--skip-initial-eval", action="store_true")
    ap.add_argument("--save", help="write the trained adapter here (bf16 shards; not with --lora)")
    ap.add_argument("--lora", type=int, default=0, help="rank of the decoder self-attention updates (0: none)")
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--lora-lr-scale", type=float, default=1.0)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot, args.out or "probe_binding.png")
    if not (args.init and args.data):
        ap.error("--init and --data are needed to train")
    if args.save and args.lora:
        ap.error("--save writes the adapter's own weights only; the --lora updates would be lost")

    device = torch.device(args.device)
    # bf16 autocast over fp32 weights on a GPU, as the trainer's `precision: bf16`
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    model = load_model(adapter=args.init, dtype=torch.float32, device=device)
    model.freeze_base()
    prefix, suffix, pad = model._chunk_specials()
    collate = Collator(model.config.chunk_size, prefix, suffix, pad, model.decoder.config.pad_token_id or 0)
    tok = (model.tokenizer, model.encoder_tokenizer)

    def stream(n_facts, context, heldout, seed=0, **kw):
        cfg = facts_config(args.data, n_facts, context, args.window, seed, **kw)
        data = build_data(cfg.data, *tok, progress=False)
        return data.heldout if heldout else data.train

    evals = {f"{f} facts, {c // 1024}K": stream((f, f), (c, c), True, overrides=args.eval_set)
             for f in (2, 4) for c in (1024, 4096)}
    history = []

    def evaluate(step):
        row = {"step": step}
        row.update({k: exact(model, s, collate, args.eval_samples, 8, device, amp) for k, s in evals.items()})
        history.append(row)
        print(" | ".join(f"{k} {v:.1%}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    if not args.skip_initial_eval or not args.steps:
        evaluate(0)
    result = {"args": vars(args), "history": history}
    if args.steps:
        result.update(train(args, model, stream, collate, device, amp, evaluate))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def train(args, model, stream, collate, device, amp, evaluate) -> dict:
    """`args.steps` optimizer steps from the adapter as loaded; evaluates on the way and at the end."""
    lo_hi = tuple(int(x) for x in args.facts.split(","))
    samples = stream(lo_hi, tuple(int(x) for x in args.context.split(",")), False, seed=1,
                   formats=args.formats, keyless=args.keyless, repeat=args.repeat, overrides=args.set)
    groups = [{"params": model.adapter_parameters(), "lr": args.lr}]
    if args.lora:
        lora = add_low_rank(model, args.lora, args.lora_targets.split(","), alpha=2.0 * args.lora)
        groups.append({"params": lora, "lr": args.lr * args.lora_lr_scale})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    model.train()
    t0, losses = time.time(), []
    bar = tqdm(total=args.steps, desc="train", dynamic_ncols=True)
    for step, b in enumerate(batches(samples, collate, 0, args.steps * args.batch, args.batch, device), 1):
        with amp():
            logits = model(input_ids=b["input_ids"], context_input_ids=b["context_input_ids"],
                           context_attention_mask=b["context_attention_mask"], use_cache=False).logits
        loss, _ = cross_entropy(logits, b["labels"], b["task_mask"], task_weight=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate(step)
    bar.close()
    evaluate(args.steps)
    if args.save:
        model.save_pretrained(args.save, dtype=torch.bfloat16, max_shard_size=15 * 2**20)
    return {"train_seconds": time.time() - t0, "loss_first_last_20": [sum(losses[:20]) / 20, sum(losses[-20:]) / 20]}


if __name__ == "__main__":
    main()
