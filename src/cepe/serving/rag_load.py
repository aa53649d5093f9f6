"""RAG load on `cepe serve`: NQ questions, each with its BM25 passages, and a fault run.

    python -m cepe.serving.rag_load --data /work/shared/data/qa/nq --adapter released \\
        --modes continuous static decoder --concurrency 1 8 32 128 --fault --out runs/rag_load

For each question, the `--k` best BM25 passages (the `bm25s` library, as `cepe eval qa`) of the NQ
pool. Modes, each a fresh `cepe serve` on the same store folder:
- `continuous` / `static`: CEPE, `--batching continuous|static`; every passage is uploaded once
  (`POST /v1/contexts`) and a request names its passages by id (`context`), served from the store;
- `eager`: as `continuous`, with `--cuda-graphs off` (each decoding step eager, not a captured
  graph; the other modes run with `--cuda-graphs` as given, by default `auto`: captured on a GPU);
- `decoder`: the same server (continuous), the passages in the decoder's own window (in the chat
  message before the question, no `context`): SmolLM2 reading them itself.
At each concurrency level, that many clients stream greedy answers (`ignore_eos`: exact lengths,
by default 1/4, 7/4, 1/2, 3/2 x `--max-tokens` in turn, as real answers vary), taking questions in
turn until `--requests` are done or `--level-seconds` have passed. Reported: requests/s, tokens/s,
p50/p99 time to first token and inter-token latency.

`--fault`: a continuous server under load, with documents being uploaded, gets `kill -9`; then a
restart on the same store. Checked: every request ended with an answer or an error it was told
(HTTP status, SSE error event, or a broken connection; none hung), and every acknowledged
document is listed, whole, and gives the same greedy answer as before the crash.

Writes `rag_load.json`, `rag_load.png` to `--out` and prints a table. `--write-subset DIR` writes
instead the questions used, with their rankings over the full pool, and the passages they name
(xz-compressed, about 0.5 MB for 128 questions): a `--data` small enough to travel to the GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import lzma
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from .loadtest import conditions, join_summary, launch_server, model_flags, percentile, stop_server, stream_chat


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cepe.serving.rag_load", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/qa/nq",
                   help="folder with questions.jsonl and passages.jsonl (or .jsonl.xz, as --write-subset writes)")
    p.add_argument("--decoder", default="smollm2-135m")
    p.add_argument("--encoder", default="minilm-l6", help="encoder of an --adapter none model (an adapter has its own)")
    p.add_argument("--adapter", default="released", help="adapter folder, 'released', or 'none' (then --init)")
    p.add_argument("--init", default="zero", choices=["zero", "copy"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    p.add_argument("--modes", nargs="+", default=["continuous", "static", "decoder"],
                   choices=["continuous", "eager", "unpaced", "flash", "process", "static", "decoder"],
                   help="unpaced: continuous as before paced joins, --prefill-share 1 --switch-interval-ms 5; "
                        "flash: continuous with --sdpa decode-order; process: continuous with --worker process")
    p.add_argument("--worker", default="thread", choices=["thread", "process"],
                   help="the servers' --worker, for every mode and the fault run (mode `process` always uses process)")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="the servers' --cuda-graphs (mode `eager`: always off)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--questions", type=int, default=256, help="NQ questions used (the first ones)")
    p.add_argument("--k", type=int, default=20, help="BM25 passages per question")
    p.add_argument("--requests", type=int, default=512, help="most requests per level")
    p.add_argument("--level-seconds", type=float, default=15.0, help="no new request after this long in a level")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length (mean, under --lengths mixed)")
    p.add_argument(
        "--lengths",
        choices=["mixed", "fixed"],
        default="mixed",
        help="mixed: answers of 1/4, 7/4, 1/2 and 3/2 x --max-tokens in turn (as real answers vary; a static "
        "batch runs until its longest row ends); fixed: all --max-tokens",
    )
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--batch-memory-mb", type=float, default=40960.0)
    p.add_argument("--fault", action="store_true", help="also the kill -9 run")
    p.add_argument("--fault-clients", type=int, default=32)
    p.add_argument("--out", default="runs/rag_load")
    p.add_argument("--note", default="")
    p.add_argument("--write-subset", metavar="DIR", default=None,
                   help="only write the first --questions questions with their --k BM25 ids and those passages "
                        "(xz) to DIR, a --data for the GPU machine (~0.5 MB for 128 questions instead of 10 MB)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[dict]:
    """The records of `path`, or of `path`.xz when only that is there (the set sent to the GPU machine)."""
    xz = path.with_name(path.name + ".xz")
    text = lzma.open(xz, "rt").read() if not path.exists() and xz.exists() else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def retrieve(data: Path, n_questions: int, k: int) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """The first `n_questions` NQ questions, each with its top-`k` BM25 passage ids; passage texts.

    A question that carries its ranking (`bm25`: ids, best first, as `write_subset` stores it) keeps
    it: BM25 over a subset of the pool would rank differently (the IDF changes)."""
    rows = read_jsonl(data / "questions.jsonl")[:n_questions]
    pool = read_jsonl(data / "passages.jsonl")
    texts = {p["id"]: p["text"] for p in pool}
    questions = [r["question"] for r in rows]
    if any("bm25" in r for r in rows):
        short = [len(r.get("bm25", ())) for r in rows if len(r.get("bm25", ())) < k]
        if short:
            raise ValueError(f"{data}: a question carries {min(short)} ranked passages, fewer than k = {k}")
        return questions, [r["bm25"][:k] for r in rows], texts
    from ..evaluation.retrieval import BM25Retriever

    bm25 = BM25Retriever([p["text"] for p in pool])
    ranked = [[pool[i]["id"] for i, _ in bm25.search(q, k)] for q in tqdm(questions, desc="BM25", unit="q")]
    return questions, ranked, texts


def write_subset(data: Path, out: Path, n_questions: int, k: int, extra: int = 520) -> dict:
    """What the GPU run needs, small enough to travel with the checkout: the first `n_questions`
    questions, each with its top-`k` ids over the FULL pool (`bm25`), and only the passages they
    name, plus the pool's first `extra` ids (the fault run's fresh uploads are the first ids not yet
    stored: the same as from the full pool, for up to 128 --fault-clients), xz-compressed."""
    questions, ranked, texts = retrieve(data, n_questions, k)
    rows = read_jsonl(data / "questions.jsonl")[:n_questions]
    named = {p for ids in ranked for p in ids}
    keep = named | set(sorted(texts)[:extra])
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("questions.jsonl", [{**r, "bm25": ids} for r, ids in zip(rows, ranked)]),
                          ("passages.jsonl", [{"id": p, "text": texts[p]} for p in sorted(keep)])):
        (out / name).unlink(missing_ok=True)  # `retrieve` would read it before the .xz
        with lzma.open(out / f"{name}.xz", "wt", preset=9) as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)
    return {"questions": len(rows), "k": k, "passages": len(keep), "named": len(named),
            "bytes": sum(f.stat().st_size for f in out.glob("*.xz"))}


def server_flags(args, store: Path, batching: str, graphs: str = "auto", paced: bool = True,
                 sdpa: str = "auto", worker: str = "thread") -> list[str]:
    """`cepe serve` flags of one mode. paced=False: the server before paced joins and the short
    GIL switch interval (docs/serving.md), for comparison; sdpa, worker: its `--sdpa`, `--worker`."""
    extra = [f for flag, v in (("--dtype", args.dtype), ("--device", args.device), ("--threads", args.threads))
             if v is not None for f in (flag, str(v))]
    return [*model_flags(args), *extra, "--store", str(store), "--store-budget-mb", "65536",
            "--memory-cache-mb", "16384",
            "--batching", batching, "--max-batch", str(args.max_batch), "--batch-memory-mb", str(args.batch_memory_mb),
            "--cuda-graphs", graphs,
            "--max-queue", str(max(256, 2 * max(args.concurrency + [args.fault_clients]))), "--timeout", "600",
            "--max-tokens", str(max(512, 2 * args.max_tokens)),
            *([] if paced else ["--prefill-share", "1", "--switch-interval-ms", "5"]), "--sdpa", sdpa,
            "--worker", worker]


async def upload(http: httpx.AsyncClient, texts: dict[str, str], ids: list[str], parallel: int = 16) -> dict:
    """Store each passage once; returns passage id -> context id (only acknowledged ones)."""
    stored, sem = {}, asyncio.Semaphore(parallel)

    async def one(pid: str):
        async with sem:
            r = await http.post("/v1/contexts", json={"text": texts[pid], "name": pid})
            if r.status_code in (200, 201):
                stored[pid] = r.json()["id"]

    await asyncio.gather(*(one(p) for p in ids))
    return stored


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def answer_length(args, i: int) -> int:
    """Tokens the i-th question's answer gets (exactly: `ignore_eos`)."""
    if args.lengths == "fixed":
        return args.max_tokens
    return max(1, int(args.max_tokens * (0.25, 1.75, 0.5, 1.5)[i % 4]))


def request_body(
    model: str, mode: str, question: str, passages: list[str], ctx_ids: list[str], max_tokens: int
) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if mode == "decoder":
        docs = "\n\n".join(f"Passage {i + 1}: {t}" for i, t in enumerate(passages))
        body["messages"] = [{"role": "user", "content": f"{docs}\n\nAnswer the question using the passages above.\n"
                                                        f"Question: {question}"}]
    else:
        body["messages"] = [{"role": "user", "content": f"Answer the question.\nQuestion: {question}"}]
        body["context"] = ctx_ids
    return body


async def level(http, bodies: list[dict], clients: int, args, bar) -> dict:
    """`clients` concurrent clients take requests in turn until done or out of time."""
    todo = asyncio.Queue()
    for i in range(args.requests):
        todo.put_nowait(bodies[i % len(bodies)])
    results, t0 = [], time.perf_counter()

    async def client():
        while not todo.empty() and time.perf_counter() - t0 < args.level_seconds:
            body = todo.get_nowait()
            try:
                results.append(await stream_chat(http, body))
            except httpx.HTTPError as e:
                results.append({"status": 0, "error": f"{type(e).__name__}: {e}"})
            bar.update(1)

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    gaps = [g for r in ok for g in r["gaps_s"]]
    pct = lambda v, q: percentile(v, q) if v else None  # noqa: E731
    return {"clients": clients, "requests": len(results), "ok": len(ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(gaps, 50),
            "itl_p99_s": pct(gaps, 99), "latency_p50_s": pct([r["latency_s"] for r in ok], 50),
            "errors": sorted({r.get("error", "")[:120] for r in results if r["status"] != 200})[:5]}


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"cepe_{name} "))


async def run_mode(args, url: str, mode: str, data) -> dict:
    questions, ranked, texts = data
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=512)) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        ctx, upload_s = {}, 0.0
        if mode != "decoder":
            unique = sorted({p for ids in ranked for p in ids})
            t0 = time.perf_counter()
            ctx = await upload(http, texts, unique)
            upload_s = time.perf_counter() - t0
            if len(ctx) != len(unique):
                raise RuntimeError(f"only {len(ctx)} of {len(unique)} passages stored")
        bodies = [
            request_body(model, mode, q, [texts[p] for p in ids], [ctx.get(p) for p in ids], answer_length(args, i))
            for i, (q, ids) in enumerate(zip(questions, ranked))
        ]
        await asyncio.gather(*(stream_chat(http, b) for b in bodies[:8]))  # warm-up, not measured
        rows = []
        bar = tqdm(total=len(args.concurrency) * args.requests, desc=mode, unit="req")
        for c in args.concurrency:
            rows.append(await level(http, bodies, c, args, bar))
        bar.close()
        metrics = (await http.get("/metrics")).text
    steps = _metric(metrics, "batches_total")
    return {"mode": mode, "upload_s": upload_s, "passages_stored": len(ctx), "levels": rows,
            "mean_batch_size": _metric(metrics, "batched_requests_total") / steps if steps else None,
            "graph_captures": _metric(metrics, "graph_captures_total"),
            "graph_capture_s": _metric(metrics, "graph_capture_seconds_total")}


# ---------------------------------------------------------------------------- fault
async def fault_run(args, flags: list[str], log: Path, data) -> dict:
    """kill -9 under load (requests and uploads in flight), restart, check (see the module doc)."""
    questions, ranked, texts = data
    proc, url = launch_server(flags, log)
    port = int(url.rsplit(":", 1)[1])
    outcomes = {"answered": 0, "http_error": 0, "sse_error": 0, "connection_broken": 0, "hung": 0}
    acked, before = {}, {}
    probe_ids = sorted({p for ids in ranked[:4] for p in ids})[:8]
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, connect=5)) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        acked.update(await upload(http, texts, probe_ids))
        for pid in probe_ids:  # the greedy answer each stored document gives now, to compare after the crash
            r = await http.post("/v1/completions", json={"model": model, "prompt": "The passage says", "max_tokens": 8,
                                                         "temperature": 0, "context": [acked[pid]]})
            before[pid] = r.json()["choices"][0]["text"]
        fresh = [p for p in sorted(texts) if p not in acked][: 4 * args.fault_clients]
        stop = asyncio.Event()

        async def asker(i: int):
            while not stop.is_set():
                ctx_ids = [acked[p] for p in ranked[i % len(ranked)] if p in acked] or [acked[probe_ids[0]]]
                body = request_body(model, "continuous", questions[i % len(questions)], [], ctx_ids, args.max_tokens)
                try:
                    r = await asyncio.wait_for(stream_chat(http, body), 120)
                    kind = "answered" if r["status"] == 200 else ("sse_error" if r["status"] == 500 else "http_error")
                except (httpx.HTTPError, ConnectionError):
                    kind = "connection_broken"
                except TimeoutError:
                    kind = "hung"
                outcomes[kind] += 1
                if kind == "connection_broken":
                    return

        async def uploader(chunk: list[str]):
            for pid in chunk:
                try:
                    r = await http.post("/v1/contexts", json={"text": texts[pid], "name": pid})
                except (httpx.HTTPError, ConnectionError):
                    return
                if r.status_code in (200, 201):
                    acked[pid] = r.json()["id"]

        tasks = [asyncio.create_task(asker(i)) for i in range(args.fault_clients)]
        tasks += [asyncio.create_task(uploader(fresh[i::4])) for i in range(4)]
        await asyncio.sleep(max(3.0, args.level_seconds / 2))
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        stop.set()
        await asyncio.wait(tasks, timeout=150)
        settle_s = time.perf_counter() - killed_at
    proc.wait()
    t0 = time.perf_counter()
    proc, url = launch_server(flags, log, port=port)
    restart_s = time.perf_counter() - t0
    bad, same = [], 0
    try:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            listed = {d["id"] for d in (await http.get("/v1/contexts")).json()["data"]}
            for pid, cid in acked.items():
                meta = await http.get(f"/v1/contexts/{cid}")
                if meta.status_code != 200 or cid not in listed:
                    bad.append((pid, meta.status_code))
            for pid, text in before.items():
                r = await http.post(
                    "/v1/completions",
                    json={"model": model, "prompt": "The passage says", "max_tokens": 8, "temperature": 0,
                          "context": [acked[pid]]},
                )
                same += r.status_code == 200 and r.json()["choices"][0]["text"] == text
    finally:
        stop_server(proc)
    return {"clients": args.fault_clients, "outcomes": outcomes, "requests": sum(outcomes.values()),
            "acknowledged_documents": len(acked), "documents_missing_or_corrupt": bad,
            "same_answer_after_restart": f"{same}/{len(before)}", "settle_s": settle_s, "restart_s": restart_s,
            "passed": not bad and outcomes["hung"] == 0 and same == len(before)}


# ---------------------------------------------------------------------------- report
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"continuous": "o-", "eager": "D-.", "unpaced": "v-.", "flash": "P-", "process": "X-", "static": "s--",
              "decoder": "^:"}
    labels = {"continuous": "CEPE, continuous", "eager": "CEPE, continuous, eager steps", "static": "CEPE, static",
              "unpaced": "CEPE, continuous, unpaced joins", "flash": "CEPE, continuous, FlashAttention first",
              "process": "CEPE, continuous, worker process",
              "decoder": "SmolLM2, passages in window"}
    for m in result["modes"]:
        xs = [r["clients"] for r in m["levels"]]
        st, lab = styles[m["mode"]], labels[m["mode"]]
        axes[0].plot(xs, [r["tokens_per_s"] for r in m["levels"]], st, label=lab)
        axes[1].plot(xs, [r["ttft_p99_s"] or float("nan") for r in m["levels"]], st, label=f"{lab} p99")
        axes[1].plot(xs, [r["ttft_p50_s"] or float("nan") for r in m["levels"]], st, alpha=0.4, label=f"{lab} p50")
        axes[2].plot(xs, [1000 * (r["itl_p99_s"] or float("nan")) for r in m["levels"]], st, label=f"{lab} p99")
        axes[2].plot(
            xs, [1000 * (r["itl_p50_s"] or float("nan")) for r in m["levels"]], st, alpha=0.4, label=f"{lab} p50"
        )
    for ax, title, unit in zip(axes, ["throughput", "time to first token", "inter-token latency"],
                               ["generated tokens / s", "seconds", "ms"]):
        ax.set_xscale("log", base=2)
        if ax is not axes[0] and any(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")  # not on an axis with nothing to show (one-token answers have no gaps)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=7)
    c = result["conditions"]
    fig.suptitle(
        f"NQ RAG load, {result['k']} BM25 passages, {c['lengths']} answers of {c['max_tokens']} tokens (mean); "
        f"{c.get('device_name') or c['cpu']}{'; model in its own process' if c.get('worker') == 'process' else ''}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    head = f"{'mode':<11} {'clients':>7} {'ok/req':>9} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} " \
           f"{'ITL p50 ms':>10} {'ITL p99 ms':>10}"
    lines = [head]
    f = lambda v, k=1.0: "-" if v is None else f"{k * v:.2f}"  # noqa: E731
    for m in result["modes"]:
        for r in m["levels"]:
            lines.append(
                f"{m['mode']:<11} {r['clients']:>7} {r['ok']:>4}/{r['requests']:<4} {r['requests_per_s']:>7.2f} "
                f"{r['tokens_per_s']:>8.1f} {f(r['ttft_p50_s']):>9} {f(r['ttft_p99_s']):>9} "
                f"{f(r['itl_p50_s'], 1000):>10} {f(r['itl_p99_s'], 1000):>10}"
            )
    if result.get("fault"):
        fr = result["fault"]
        lines.append(f"fault: {fr['requests']} requests {fr['outcomes']}; {fr['acknowledged_documents']} acknowledged "
                     f"documents, {len(fr['documents_missing_or_corrupt'])} missing/corrupt, same answers "
                     f"{fr['same_answer_after_restart']}, restart {fr['restart_s']:.1f} s: "
                     f"{'PASSED' if fr['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_subset:
        print(json.dumps(write_subset(Path(args.data), Path(args.write_subset), args.questions, args.k)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cond = conditions(argparse.Namespace(**{**vars(args), "threads": args.threads, "max_batch": args.max_batch}))
    import torch

    cond["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cond["lengths"] = args.lengths
    cond["cuda_graphs"] = args.cuda_graphs
    cond["worker"] = args.worker
    data = retrieve(Path(args.data), args.questions, args.k)
    work = Path(tempfile.mkdtemp(prefix="cepe-rag-load-"))
    print(f"server log: {work / 'server.log'}", flush=True)
    result = {"k": args.k, "questions": len(data[0]), "conditions": cond, "modes": [], "fault": None,
              "server_log": str(work / "server.log")}
    for mode in args.modes:
        flags = server_flags(args, work / "store", "static" if mode == "static" else "continuous",
                             "off" if mode == "eager" else args.cuda_graphs, paced=mode != "unpaced",
                             sdpa="decode-order" if mode == "flash" else "auto",
                             worker="process" if mode == "process" else args.worker)
        t0, log_at = time.perf_counter(), log_size(work / "server.log")
        proc, url = launch_server(flags, work / "server.log")
        try:
            start_s = time.perf_counter() - t0
            result["modes"].append({**asyncio.run(run_mode(args, url, mode, data)), "server_start_s": start_s})
        finally:
            stop_server(proc)
        result["modes"][-1]["join_log"] = join_summary(work / "server.log", log_at)  # this mode's joins
        (out / "rag_load.json").write_text(json.dumps(result, indent=2))  # what is done so far survives a later failure
    if args.fault:
        flags = server_flags(args, work / "fault_store", "continuous", args.cuda_graphs, worker=args.worker)
        result["fault"] = asyncio.run(fault_run(args, flags, work / "server.log", data))
    (out / "rag_load.json").write_text(json.dumps(result, indent=2))
    if result["modes"]:
        plot(result, out / "rag_load.png")
    print("\n" + table(result))
    print(f"results: {out / 'rag_load.json'}, {out / 'rag_load.png'}; server log: {work / 'server.log'}")
    return 0 if not result["fault"] or result["fault"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
