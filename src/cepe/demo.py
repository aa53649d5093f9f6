"""`cepe demo`: the README's main job on a real document, in a couple of minutes on a laptop CPU.

Loads SmolLM2-135M-Instruct + the released CEPE adapter (its encoder included), reads a long document
(bundled: the first three chapters of Jane Austen's *Persuasion*, public domain; or your own file),
prints the perplexity of its last part with the decoder alone and with the rest of the document
read by the encoder, then answers a question about the document.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib import resources
from pathlib import Path

import torch

from .cli_options import add_model_arguments
from .model import decoding

DEFAULT_QUESTION = "What is the name of Sir Walter Elliot's estate?"


def bundled_document() -> str:
    return resources.files("cepe").joinpath("resources/persuasion_ch1-3.txt").read_text(encoding="utf-8")


def load_model(args: argparse.Namespace):
    """The model the shared flags describe (default: the released adapter; without one in this
    checkout, a zero-initialised untrained model), and a label for it."""
    from cepe.cli_options import model_choice, model_from_args

    c = model_choice(args)
    if c["adapter"] == "released":
        from cepe.release import released_adapter_path

        try:
            released_adapter_path()
        except FileNotFoundError:
            print("[cepe demo] no released adapter in this checkout: using a zero-initialised (untrained) model")
            args.adapter, args.init = None, "zero"
            c = model_choice(args)
    if c["init"] is not None:
        label = f"{c['init']}-init (untrained)"
    else:
        from cepe.model.loading import resolve_adapter

        label = str(resolve_adapter(c["adapter"]))
    return model_from_args(args), label


def window_perplexity(model, ids: torch.Tensor, window: int, scored: int, context_tokens: int) -> float:
    """Perplexity of the last `scored` tokens of a decoder window of `window` tokens ending the
    document; the encoder reads up to `context_tokens` tokens preceding the window (0: none).
    Goes through the evaluation harness's one scoring function, as every method there does."""
    from cepe.evaluation.methods import Cepe
    from cepe.evaluation.scoring import Request, score

    ids = ids.tolist()
    tokens = ids[-window:]
    context = [ids[-window - context_tokens : -window]] if context_tokens else []
    loglik = score(Cepe(model), Request(tokens=tokens, context=context, score_start=window - scored))
    return math.exp(-loglik.mean().item())


def answer(model, question: str, context) -> str:
    tok = model.tokenizer
    prompt = f"Answer the question about the story in a few words.\nQuestion: {question}\nAnswer:"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    eos = model.generation_config.eos_token_id
    stop = set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}
    out = decoding.greedy(model, [ids[0].tolist()], 16, stop, pad_id=tok.eos_token_id, context=context)[0]
    return tok.decode(out, skip_special_tokens=True).strip().split("\n")[0]


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    text = Path(args.file).read_text(encoding="utf-8", errors="replace") if args.file else bundled_document()
    model, label = load_model(args)
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < args.window + 256:
        raise ValueError(f"document has {ids.numel()} tokens; the demo needs at least {args.window + 256}")
    ctx_tokens = min(args.max_context, ids.numel() - args.window)
    encoder = (
        "decoder-derived encoder" if model.config.encoder_type == "decoder" else f"encoder {model.config.base_encoder}"
    )
    print(f"[cepe demo] model: {Path(str(model.config.base_decoder)).name} + {encoder} + adapter {label}")
    print(f"[cepe demo] document: {args.file or 'bundled Persuasion ch. 1-3'} ({ids.numel():,} tokens)")
    ppl_alone = window_perplexity(model, ids, args.window, args.scored, 0)
    ppl_ctx = window_perplexity(model, ids, args.window, args.scored, ctx_tokens)
    context = model.encode_context([text])
    reply = answer(model, args.question, context)
    elapsed = time.perf_counter() - t0
    rows = [
        ("decoder alone", args.window, f"{ppl_alone:.2f}"),
        ("+ encoder context", args.window + ctx_tokens, f"{ppl_ctx:.2f}"),
    ]
    print(f"\nPerplexity of the last {args.scored} tokens (decoder window {args.window} tokens):")
    print(f"{'method':<20}{'tokens read':>12}{'perplexity':>12}")
    for r in rows:
        print(f"{r[0]:<20}{r[1]:>12,}{r[2]:>12}")
    change = 100 * (ppl_ctx / ppl_alone - 1)
    print(f"change with context: {change:+.1f}%")
    print(f"\nQ: {args.question}\nA: {reply}")
    print(f"\n[cepe demo] done in {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"adapter": label, "ppl_decoder_alone": ppl_alone, "ppl_with_context": ppl_ctx,
                 "context_tokens": ctx_tokens, "question": args.question, "answer": reply, "seconds": elapsed},
                indent=2,
            )
        )
    return 0 if math.isfinite(ppl_ctx) else 1


def register(sub) -> None:
    p = sub.add_parser("demo", help="perplexity with/without context and a question on a long document")
    p.add_argument("file", nargs="?", help="a text file (default: bundled Persuasion, chapters 1-3)")
    add_model_arguments(p.add_argument_group("model"), default_adapter="released", device_default="cpu")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--window", type=int, default=512, help="decoder window D")
    p.add_argument("--scored", type=int, default=256, help="tokens scored at the end of the window")
    p.add_argument("--max-context", type=int, default=16384, help="most tokens the encoder reads")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=run)
