"""`cepe eval ppl|rag-lm|qa|icl|passkey|ruler`: argument parsing and the run -> JSON/table/plot flow.

Task logic lives in `cepe.evaluation.tasks.*`; this module only wires files, models and methods.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from ..cli_options import model_choice
from .cli_args import add_common, floats, ints, size

def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate long-context use: ppl, rag-lm, qa, icl, passkey, ruler",
                              description="Evaluate CEPE and its baselines on identical scored tokens.")
    sub = p.add_subparsers(dest="task", required=True)

    t = sub.add_parser("ppl", help="perplexity of the last W tokens of a D-token window vs. context length E")
    t.add_argument("--data", nargs="+", required=True,
                   help="folders of .txt/.py/.md, text files, or .jsonl (one document per row)")
    t.add_argument("--text-key", default="text", help="jsonl field holding the text (default text)")
    t.add_argument("--decoder-tokens", "-D", type=int, default=512, help="decoder window D (default 512)")
    t.add_argument("--scored-tokens", "-W", type=int, default=256,
                   help="scored tokens W at the end of the window (default 256)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--total-tokens", type=ints, default=None, help="total lengths D+E, e.g. 512,1K,2K,4K,8K (default)")
    g.add_argument("--context-tokens", "-E", type=ints, default=None,
                   help="context lengths E instead, e.g. 0,512,...,128K")
    t.add_argument("--windows-per-doc", type=int, default=1, help="windows per document, evenly spread (default 1)")
    t.add_argument("--max-docs", type=int, default=None)
    t.add_argument("--replug-chunk", type=int, default=None, help="REPLUG: context tokens per pass (default D)")
    add_common(t, "ppl")
    t.set_defaults(func=cmd_ppl)

    t = sub.add_parser("rag-lm", help="retrieval-augmented LM: perplexity vs. number of retrieved passages k")
    t.add_argument("--data", nargs="+", required=True, help="documents to score (as for ppl)")
    t.add_argument("--corpus", nargs="+", required=True,
                   help="retrieval corpus: folders/text files/.jsonl, cut into passages")
    t.add_argument("--text-key", default="text")
    t.add_argument("--passage-tokens", type=int, default=200, help="decoder tokens per corpus passage (default 200)")
    t.add_argument("--keep-same-source", action="store_true", help="allow passages from the scored document itself")
    t.add_argument("--decoder-tokens", "-D", type=int, default=512)
    t.add_argument("--scored-tokens", "-W", type=int, default=256)
    t.add_argument("--k", type=ints, default=[0, 1, 2, 4, 8, 16], help="numbers of passages (default 0,1,2,4,8,16)")
    t.add_argument("--retriever", choices=["bm25", "dense"], default="bm25")
    t.add_argument("--dense-encoder", default="minilm-l6", help="dense retriever's encoder (default minilm-l6)")
    t.add_argument("--windows-per-doc", type=int, default=1)
    t.add_argument("--max-docs", type=int, default=None)
    t.add_argument("--full-window", type=int, default=None,
                   help="token budget of 'full' (passages in the decoder); default its trained window")
    add_common(t, "rag-lm")
    t.set_defaults(func=cmd_rag_lm)

    t = sub.add_parser("qa", help="open-domain QA: retrieved passages in decoder + encoder; EM / F1 / substring match")
    t.add_argument("--questions", required=True, help="jsonl {question, answers, gold_passage?}")
    t.add_argument("--passages", required=True, help="jsonl {id, text}: the retrieval pool")
    t.add_argument("--retriever", choices=["bm25", "dense"], default="bm25")
    t.add_argument("--dense-encoder", default="minilm-l6")
    t.add_argument("--dense-cache", default=None, help="safetensors file to keep passage embeddings between runs")
    t.add_argument("--max-passages", type=int, default=None,
                   help="use only the first N passages of the pool (plus gold ones): a smoke-test knob")
    t.add_argument("--decoder-passages", "-m", type=int, default=1, help="top-m passages in the decoder (default 1)")
    t.add_argument("--encoder-passages", "-k", type=ints, default=[10],
                   help="the next k passages in the encoder, one per chunk; "
                        "a list (1,5,10,20) runs a sweep (default 10)")
    t.add_argument("--full-window", type=int, default=None,
                   help="token budget of 'full' (decoder-only); default its trained window")
    t.add_argument("--prompt", choices=["chat", "plain"], default="chat",
                   help="prompt format (default chat; see docs/evaluation.md)")
    t.add_argument("--max-new-tokens", type=int, default=16)
    t.add_argument("--max-examples", type=int, default=100)
    t.add_argument("--gen-batch", type=int, default=8, help="questions answered per generate call (default 8)")
    t.add_argument("--gen-batch-tokens", type=size, default=128 * 1024,
                   help="at most this many padded decoder tokens per generate call, "
                        "REPLUG's passes counted (default 128K)")
    t.add_argument("--keep-examples", type=int, default=50,
                   help="per-question rows kept in the JSON per k (default 50; -1: all)")
    add_common(t, "qa")
    t.set_defaults(func=cmd_qa)

    t = sub.add_parser("qa-merge",
                       help="merge QA sweeps run apart (e.g. k = 1,5 and k = 10,20) into one table and plot")
    t.add_argument("files", nargs="+", help="results JSON of `cepe eval qa -k ...` over the same questions")
    t.add_argument("--out", default="results", help="output folder (default results)")
    t.add_argument("--name", default="qa_merged", help="output name (default qa_merged)")
    t.set_defaults(func=cmd_qa_merge)

    t = sub.add_parser("icl",
                       help="in-context classification: demonstrations in encoder + decoder; label by log-likelihood")
    t.add_argument("--data", required=True, help="jsonl {text, label}")
    t.add_argument("--demos", type=ints, default=[32],
                   help="demonstrations in all (default 32); a list (8,32,64) runs a sweep on one test set")
    t.add_argument("--decoder-demos", type=int, default=2,
                   help="of which in the decoder (default 2); CEPE's encoder gets the rest")
    t.add_argument("--encoder-layout", choices=["packed", "per-demo"], default="packed",
                   help="CEPE's demonstrations: laid end to end and cut into chunks (default), or one per chunk")
    t.add_argument("--full-window", type=int, default=None,
                   help="token budget of 'full' (decoder alone); default its trained window")
    t.add_argument("--max-examples", type=int, default=100)
    t.add_argument("--demo-seeds", type=ints, default=None,
                   help="several demonstration sets (e.g. 0,1,2) on one test set; accuracies are their mean")
    add_common(t, "icl")
    t.set_defaults(func=cmd_icl)

    t = sub.add_parser("passkey",
                       help="find a number hidden at a depth of long filler text; accuracy vs. length and depth")
    t.add_argument("--lengths", type=ints, default=[512, 1024, 2048, 4096],
                   help="prompt lengths in tokens (default 512,1K,2K,4K)")
    t.add_argument("--depths", type=floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    t.add_argument("--trials", type=int, default=2, help="keys per (length, depth) (default 2)")
    t.add_argument("--decoder-tokens", "-D", type=int, default=256,
                   help="decoder window D of cepe/truncated (default 256)")
    t.add_argument("--filler", default=None, help="text file to use as filler (default: the usual repeated sentences)")
    t.add_argument("--same-start", action="store_true",
                   help="read a long --filler from its start at every trial (before 2026-12-02; default: each "
                        "trial from its own sentence, so that trials differ in more than the key)")
    t.add_argument("--replug-chunk", type=int, default=None, help="REPLUG: context tokens per pass (default D)")
    add_common(t, "passkey")
    t.set_defaults(func=cmd_passkey)

    t = sub.add_parser("ruler",
                       help="RULER's synthetic tasks (needles, variable tracking, common/frequent words) vs. length")
    t.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe",
                   help="comma-separated (default: the seven below); also niah_single_uuid, niah_multikey_needles, "
                        "niah_multikey_uuid")
    t.add_argument("--lengths", type=ints, default=[4096, 8192, 16384, 32768, 65536, 131072],
                   help="prompt + generation budget in decoder tokens (default 4K,8K,16K,32K,64K,128K)")
    t.add_argument("--samples", type=int, default=4, help="samples per task and length (default 4)")
    t.add_argument("--haystack", default=None, help="text file to hide needles in (default: RULER's noise sentences)")
    t.add_argument("--decoder-tokens", "-D", type=int, default=512,
                   help="decoder window D of cepe/truncated (default 512)")
    t.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on RULER's per-task answer budget (prompts unchanged)")
    t.add_argument("--gen-batch", type=int, default=4, help="prompts answered per generate call (default 4)")
    t.add_argument("--replug-chunk", type=int, default=None, help="REPLUG: context tokens per pass (default D)")
    add_common(t, "ruler")
    t.set_defaults(func=cmd_ruler)


# ---------------------------------------------------------------------------------- plumbing
def _setup(args):
    import torch

    from .methods import Cepe, build_methods
    from .models import add_adapter, load_eval_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise ValueError("--methods: give at least one method")
    extra = []
    for spec in args.compare_adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--compare-adapter wants NAME=DIR, got {spec!r}")
        extra.append((name, folder))
    c = model_choice(args)
    em = load_eval_model(c["decoder"], c["encoder"], c["adapter"], c["init"], c["chunk_size"], args.device, c["dtype"],
                         encoder_layers=c["encoder_layers"])
    window = args.stream_window or getattr(args, "decoder_tokens", None) or 512
    # long-text tasks split their one context document into REPLUG passes; passage tasks do not
    replug_chunk = (args.replug_chunk or args.decoder_tokens) if hasattr(args, "replug_chunk") else None
    from ..data.pipeline import tokenizer_bos

    bos = tokenizer_bos(em.tokenizer)  # Gemma reads <bos> first, as CEPE was trained (data.decoder_bos)
    methods = build_methods(
        names, em.cepe, em.decoder, window=window, num_sinks=args.sinks, rope_factor=args.rope_factor,
        full_max_length=getattr(args, "full_window", None), replug_weighting=args.replug_weighting,
        replug_chunk_tokens=replug_chunk, replug_batch_size=args.batch_size, pad_id=em.pad_id,
        bos=bos,
    )
    for name, folder in extra:
        if name in methods:
            raise ValueError(f"--compare-adapter name {name!r} is already a method")
        add_adapter(em, name, folder)
        methods[name] = Cepe(em.others[name], pad_id=em.pad_id, name=name).reading_bos(bos)
    for method in methods.values():
        if isinstance(method, Cepe):
            method.state_format = args.context_format
    if args.length_scaling is not None:
        from ..model.configuration import length_scaling

        value = length_scaling(
            None if args.length_scaling.lower() in ("off", "none", "0") else size(args.length_scaling)
        )
        for model in [em.cepe, *em.others.values()]:
            if model is not None:
                model.config.cross_attn_length_scaling = value
    if args.cross_attn_topk is not None:
        value = None if args.cross_attn_topk == "off" else args.cross_attn_topk
        for model in [em.cepe, *em.others.values()]:
            if model is not None:
                model.config.cross_attn_topk = value
    if em.cepe is not None:  # what ran, whether set here or by the adapter's own config
        em.description["cross_attn_topk"] = em.cepe.config.cross_attn_topk
        em.description["length_scaling"] = em.cepe.config.applied_length_scaling  # None under top-k
    if extra and "cepe" in methods:  # the adapters side by side in every table
        order = ["cepe", *(n for n, _ in extra)]
        methods = {**{n: methods[n] for n in order}, **{n: m for n, m in methods.items() if n not in order}}
    return em, methods


def _write(args, task: str, em, result: dict, data: dict, timer) -> Path:
    """`<out>/<name>.json` of a run (also a sweep's partial results)."""
    from .report import environment, write_results

    config = {k: v for k, v in vars(args).items() if k != "func"}
    return write_results(args.out, args.name, task, config, data, result, timer.summary(),
                         environment(em.device), {"model": em.description})


def _finish(args, task: str, em, header, rows, result: dict, data: dict, timer, plot=None, note: str = "") -> int:
    from .report import print_summary

    path = _write(args, task, em, result, data, timer)
    print()
    draw = (lambda: plot(Path(args.out) / f"{args.name}.png")) if plot is not None else None
    print_summary(header, rows, path, note, draw)
    return 0


def _tag(em) -> str:
    """Short model description for plot titles."""
    from .plotting import model_tag

    return model_tag(em.description)


# ---------------------------------------------------------------------------------- tasks
def cmd_ppl(args) -> int:
    from .data import fingerprint
    from .plotting import ppl_plot
    from .report import Timer
    from .tasks import ppl
    from .tasks.common import check_paths, tokenized_docs

    if args.context_tokens is not None:
        contexts = args.context_tokens
    else:
        totals = args.total_tokens or [512, 1024, 2048, 4096, 8192]
        if min(totals) < args.decoder_tokens:
            raise ValueError(f"--total-tokens {min(totals)} is shorter than the decoder window D={args.decoder_tokens}")
        contexts = [t - args.decoder_tokens for t in totals]
    settings = ppl.PplSettings(args.decoder_tokens, args.scored_tokens, contexts, args.windows_per_doc)
    check_paths(args.data)  # a missing input fails before the (slow) model load
    em, methods = _setup(args)
    timer = Timer()
    docs = tokenized_docs(args.data, args.text_key, em.tokenizer, args.max_docs)
    result = ppl.run(methods, docs, settings, timer, progress=not args.no_progress)
    header, rows = ppl.table(result, settings)
    data = {**fingerprint(args.data), "documents": len(docs), "windows": len(result["windows"])}
    checks = result["checks"]
    note = "".join(f"check {k}: {v:.3g}\n" for k, v in checks.items()) + (
        f"does not fit (skipped): {result['does_not_fit']}" if result["does_not_fit"] else "")
    plot = partial(ppl_plot, result=result, scored_tokens=settings.scored_tokens,
                   decoder_tokens=settings.decoder_tokens, tag=_tag(em))
    return _finish(args, "ppl", em, header, rows, result, data, timer, plot, note.rstrip())


def cmd_rag_lm(args) -> int:
    from .data import fingerprint, load_documents
    from .plotting import rag_lm_plot
    from .report import Timer
    from .retrieval import build_retriever
    from .tasks import rag_lm
    from .tasks.common import check_paths, encode, tokenized_docs

    settings = rag_lm.RagSettings(args.decoder_tokens, args.scored_tokens, args.k, args.windows_per_doc,
                                  not args.keep_same_source)
    check_paths(args.data + args.corpus)
    em, methods = _setup(args)
    timer = Timer()
    scored = load_documents(args.data, args.text_key, args.max_docs)
    docs = [(d.name, encode(em.tokenizer, d.text)) for d in scored]
    corpus = tokenized_docs(args.corpus, args.text_key, em.tokenizer, None, same_as=scored)
    passages = rag_lm.make_passages(corpus, em.tokenizer, args.passage_tokens)
    with timer("index"):
        retriever = build_retriever(
            args.retriever,
            [p.text for p in passages],
            **(
                {"encoder": args.dense_encoder, "device": args.device, "progress": not args.no_progress}
                if args.retriever == "dense"
                else {}
            ),
        )
    result = rag_lm.run(
        methods, docs, passages, retriever, settings, em.tokenizer, timer, progress=not args.no_progress
    )
    header, rows = rag_lm.table(result, settings)
    data = {"documents": fingerprint(args.data), "corpus": fingerprint(args.corpus), "windows": len(result["windows"])}
    plot = partial(rag_lm_plot, result=result, retriever=args.retriever, scored_tokens=settings.scored_tokens,
                   decoder_tokens=settings.decoder_tokens, tag=_tag(em))
    return _finish(args, "rag-lm", em, header, rows, result, data, timer, plot)


def cmd_qa(args) -> int:
    from .data import fingerprint, read_jsonl
    from .plotting import qa_sweep_plot
    from .report import Timer
    from .retrieval import build_retriever
    from .tasks import qa

    ks = args.encoder_passages
    settings = qa.QaSettings(args.decoder_passages, ks[0], args.prompt, args.max_new_tokens)
    for k in ks:
        qa.QaSettings(args.decoder_passages, k)  # validate every k before the model load
    questions = read_jsonl(args.questions, ("question", "answers"))[: args.max_examples]
    pool = read_jsonl(args.passages, ("id", "text"))
    if args.max_passages:
        gold = {q.get("gold_passage") for q in questions}
        pool = pool[: args.max_passages] + [p for p in pool[args.max_passages :] if p["id"] in gold]
    em, methods = _setup(args)
    timer = Timer()
    with timer("index"):
        retriever = build_retriever(args.retriever, [p["text"] for p in pool],
                                    **({"encoder": args.dense_encoder, "device": args.device, "cache": args.dense_cache,
                                        "progress": not args.no_progress} if args.retriever == "dense" else {}))
    keep = None if args.keep_examples < 0 else args.keep_examples
    common = dict(timer=timer, progress=not args.no_progress, batch_size=args.gen_batch, keep_examples=keep,
                  max_batch_tokens=args.gen_batch_tokens)
    data = {"questions": fingerprint([args.questions]), "passages": fingerprint([args.passages]),
            "examples": len(questions), "pool": len(pool)}
    if len(ks) == 1:
        result = qa.run(methods, questions, pool, retriever, settings, em.tokenizer, **common)
        header, rows = qa.table(result)
        note = "retrieval recall: " + ", ".join(f"{k} {v:.3f}" for k, v in result["retrieval_recall"].items())
        return _finish(args, "qa", em, header, rows, result, data, timer, note=note)
    def save_partial(so_far: dict) -> None:
        # a sweep can be long: what is done survives a crash or a time limit (merge with `qa-merge`)
        _write(args, "qa", em, so_far, {**data, "partial": True}, timer)

    result = qa.run_sweep(
        methods, questions, pool, retriever, settings, ks, em.tokenizer, after_k=save_partial, **common
    )
    header, rows = qa.table(result)
    plot = partial(qa_sweep_plot, result=result, tag=_tag(em), decoder_passages=args.decoder_passages,
                   questions=len(questions))
    return _finish(args, "qa", em, header, rows, result, data, timer, plot, note=qa.sweep_note(result))


def cmd_qa_merge(args) -> int:
    """Sweeps of one QA setting run apart (different k) into one result: JSON, table, plot."""
    from .plotting import model_tag, qa_sweep_plot
    from .report import print_summary, write_results
    from .tasks import qa

    m = qa.merge_files(args.files)
    path = write_results(args.out, args.name, "qa", m["config"], m["data"], m["results"], m["timings"],
                         m["environment"], {"model": m["model"]})
    partial = f"\nnote: partial inputs (a sweep that stopped early): {', '.join(m['partial'])}" if m["partial"] else ""
    print_summary(*qa.table(m["results"]), path, qa.sweep_note(m["results"]) + partial,
                  lambda: qa_sweep_plot(Path(args.out) / f"{args.name}.png", m["results"], model_tag(m["model"]),
                                        m["config"]["decoder_passages"], m["data"]["examples"]))
    return 0


def cmd_icl(args) -> int:
    from .data import fingerprint, read_jsonl
    from .plotting import icl_sweep_plot
    from .report import Timer
    from .tasks import icl

    for n in args.demos:  # validate every N before the model load
        icl.IclSettings(n, args.decoder_demos, args.seed, args.encoder_layout)
    settings = icl.IclSettings(args.demos[0], args.decoder_demos, args.seed, args.encoder_layout)
    rows = read_jsonl(args.data, ("text", "label"))
    em, methods = _setup(args)
    timer = Timer()
    common = dict(max_examples=args.max_examples, timer=timer, progress=not args.no_progress)
    if args.demo_seeds:
        result = icl.run_demo_seeds(methods, rows, settings, args.demos, args.demo_seeds, em.tokenizer, **common)
    elif len(args.demos) == 1:
        result = icl.run(methods, rows, settings, em.tokenizer, **common)
    else:
        result = icl.run_sweep(methods, rows, settings, args.demos, em.tokenizer, **common)
    first = next(iter(result["demos"].values())) if "demos" in result else result  # labels and test set: one for all N
    plot = None if len(args.demos) == 1 else partial(
        icl_sweep_plot, result=result, methods=methods, tag=_tag(em), data_name=Path(args.data).stem,
        decoder_demos=args.decoder_demos)
    header, table_rows = icl.table(result)
    data = {**fingerprint([args.data]), "examples": first["test_examples"]}
    note = f"labels: {len(first['labels'])}, majority-class accuracy {first['majority_baseline']:.3f}"
    return _finish(args, "icl", em, header, table_rows, result, data, timer, plot, note=note)


def cmd_passkey(args) -> int:
    from .data import fingerprint
    from .plotting import passkey_plot
    from .report import Timer
    from .tasks import passkey

    settings = passkey.PasskeySettings(args.lengths, args.depths, args.trials, args.decoder_tokens, seed=args.seed,
                                       vary_start=not args.same_start)
    filler = Path(args.filler).read_text(encoding="utf-8") if args.filler else passkey.FILLER
    em, methods = _setup(args)
    timer = Timer()
    result = passkey.run(methods, settings, em.tokenizer, filler, timer, progress=not args.no_progress)
    header, rows = passkey.table(result)
    data = fingerprint([args.filler]) if args.filler else {"filler": "built-in"}
    plot = partial(passkey_plot, result=result, decoder_tokens=settings.decoder_tokens, tag=_tag(em))
    return _finish(args, "passkey", em, header, rows, result, data, timer, plot)


def cmd_ruler(args) -> int:
    from ..model.configuration import apply_runtime_settings
    from .data import fingerprint
    from .plotting import ruler_plot
    from .report import Timer
    from .tasks import ruler

    settings = ruler.RulerSettings(args.tasks.split(","), args.lengths, args.samples, args.decoder_tokens, args.seed,
                                   args.max_new_tokens, args.gen_batch)
    haystack = ruler.Haystack.from_file(args.haystack) if args.haystack else None  # a bad path fails before the load
    em, methods = _setup(args)
    for model in filter(None, [em.cepe, *em.others.values()]):  # cross K/V once per answer, not per token: same tokens
        apply_runtime_settings(model.config, {"kv_policy": "auto"})
    em.description["kv_policy"] = "auto"
    timer = Timer()
    data = fingerprint([args.haystack]) if args.haystack else {"haystack": "RULER noise (built-in)"}
    # after each (task, length)
    save_partial = partial(_write, args, "ruler", em, data={**data, "partial": True}, timer=timer)
    result = ruler.run(methods, settings, em.tokenizer, haystack, timer, not args.no_progress, save_partial)
    plot = partial(ruler_plot, result=result, tag=_tag(em))
    return _finish(args, "ruler", em, *ruler.table(result), result, data, timer, plot, note=ruler.note(result))


def main(argv=None) -> int:  # `python -m cepe.evaluation.cli ppl ...`
    parser = argparse.ArgumentParser(prog="cepe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
