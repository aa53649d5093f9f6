"""The load figure of docs/serving.md, in one command:

    python -m cepe.serving.loadtest --adapter none --init zero      # zero-init CEPE (= SmolLM2)
    python -m cepe.serving.loadtest --adapter released              # the released adapter

It starts `cepe serve` in a subprocess on a free loopback port (or uses `--url`), then measures
1. throughput and latency at 1, 4 and 16 concurrent clients: each client streams short answers
   (`--max-tokens`, every answer exactly that long) to questions about one stored passage until
   the level's requests are done; latency is request sent -> last token, TTFT -> first token;
2. reuse: a `--doc-tokens` slice of an Austen novel asked `--questions` questions, once sending
   the text with every question and once by its stored id (plus a no-context baseline).
Writes `load.json` and `load.png` to `--out` and prints a table. The RAG load (NQ questions with
BM25 passages from the store, static vs continuous batching vs the decoder reading the passages)
and the fault run are `python -m cepe.serving.rag_load` (same server helpers).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

QUESTIONS = [
    "Who is the main character of this passage?",
    "Summarise the passage in one sentence.",
    "What is the mood of the passage?",
    "Name one person mentioned in the passage.",
    "What happens at the end of the passage?",
    "Who speaks first in the passage?",
]
BOOKS = "/work/shared/data/books/austen/*.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cepe.serving.loadtest", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--decoder", default="smollm2-135m")
    p.add_argument("--encoder", default="minilm-l6", help="encoder of an --adapter none model (an adapter has its own)")
    p.add_argument("--adapter", default="none", help="adapter folder, 'released', or 'none'")
    p.add_argument("--init", default="zero", choices=["zero", "copy"])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the server")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--url", default=None, help="measure a running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("CEPE_API_KEY"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least 2 per client)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--passage-tokens", type=int, default=512, help="stored passage for the concurrency runs")
    p.add_argument("--doc-tokens", type=int, default=10_000, help="document for the reuse run")
    p.add_argument("--questions", type=int, default=4)
    p.add_argument(
        "--book", default=None, help="a plain-text book (default: the first Austen novel of the shared data)"
    )
    p.add_argument("--out", default="runs/serve_load")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_flags(args) -> list[str]:
    """`cepe serve`'s model flags from a load script's: an adapter reads through its own encoder."""
    own = ["--encoder", args.encoder, "--init", args.init] if args.adapter == "none" else ["--adapter", args.adapter]
    return ["--decoder", args.decoder, *own]


def start_server(args, work: Path) -> tuple[subprocess.Popen, str]:
    """`cepe serve` in a subprocess, its store and log in `work`."""
    return launch_server([*model_flags(args), "--store", str(work / "store"), "--threads", str(args.threads),
                          "--max-batch", str(args.max_batch), "--max-queue", "256",
                          "--max-context-tokens", str(max(65536, 2 * args.doc_tokens)), "--timeout", "900"],
                         work / "server.log", _auth(args))


def launch_server(flags: list[str], log_path: Path, headers: dict | None = None,
                  port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`cepe serve FLAGS` on a free (or the given) loopback port, its output in `log_path`
    (appended); returns once /health answers."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "cepe.cli", "serve", *flags, "--port", str(port)]
    with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2, headers=headers or {}).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server did not come up within 600 s")


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _auth(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


# ---------------------------------------------------------------------------- text
def document_slices(args) -> tuple[str, str, str]:
    """(passage of --passage-tokens, document of --doc-tokens, book name), cut at token boundaries
    of the encoder's tokenizer, from the middle of the book (past any front matter)."""
    from ..model.loading import load_tokenizer, resolve_path

    book = args.book or (sorted(glob.glob(BOOKS)) or [None])[0]
    if book is None or not Path(book).is_file():
        raise FileNotFoundError(f"no book found ({BOOKS}); pass --book FILE")
    text = Path(book).read_text(encoding="utf-8", errors="replace")
    tok = load_tokenizer(resolve_path(args.encoder))  # a whole book, only sliced here
    start = len(text) // 5
    enc = tok(text[start:], add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    need = args.doc_tokens + args.passage_tokens
    if len(offsets) < need:
        raise ValueError(f"{book}: only {len(offsets)} tokens after the first fifth, need {need}")
    doc = text[start + offsets[0][0] : start + offsets[args.doc_tokens - 1][1]]
    p0 = args.doc_tokens
    passage = text[start + offsets[p0][0] : start + offsets[p0 + args.passage_tokens - 1][1]]
    return passage, doc, Path(book).name


# ---------------------------------------------------------------------------- requests
async def ask(http: httpx.AsyncClient, model: str, question: str, context: list, max_tokens: int) -> dict:
    """One streamed chat completion; returns latency, time to first token, tokens, status."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "context": context}
    return await stream_chat(http, body)


async def stream_chat(http: httpx.AsyncClient, body: dict) -> dict:
    """POST a streaming chat completion; returns status, latency, time to first token, the gaps
    between successive text chunks (inter-token latency; a chunk is usually one token), tokens,
    and `error` when the server answered with one (status or SSE error event)."""
    t0 = time.perf_counter()
    ttft, last, gaps, tokens, status = None, None, [], 0, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        status = r.status_code
        if status != 200:
            await r.aread()
            return {"status": status, "latency_s": time.perf_counter() - t0, "error": r.text[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "latency_s": time.perf_counter() - t0, "error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
    return {"status": status, "latency_s": time.perf_counter() - t0, "ttft_s": ttft, "tokens": tokens, "gaps_s": gaps}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); with few samples p99 is the maximum."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 100)) - 1))]


def join_summary(log_path: Path, offset: int = 0) -> dict | None:
    """The continuous batcher's `join` lines in a server log from byte `offset` on: how many, and
    the median / p90 / max of each field (rows, wall prefill, and its parts where logged)."""
    joins = []
    with open(log_path, "rb") as f:
        f.seek(offset)
        for line in f:
            if line.startswith(b"{") and b'"join"' in line:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "join":
                    joins.append(event)
    if not joins:
        return None
    out = {"joins": len(joins)}
    for field in ("size", "prefill_ms", "wait_ms", "contexts_ms", "prefill_device_ms", "context_len"):
        values = [e[field] for e in joins if isinstance(e.get(field), (int, float))]
        if values:
            out[field] = {"p50": percentile(values, 50), "p90": percentile(values, 90), "max": max(values)}
    return out


async def concurrency_level(http, model, clients: int, total: int, context: list, max_tokens: int, bar) -> dict:
    queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(QUESTIONS[i % len(QUESTIONS)])
    results = []

    async def client():
        while not queue.empty():
            q = queue.get_nowait()
            results.append(await ask(http, model, q, context, max_tokens))
            bar.update(1)

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    return {"clients": clients, "requests": total, "ok": len(ok), "wall_s": wall, "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "p50_s": percentile(lat, 50),
            "p99_s": percentile(lat, 99),
            "ttft_p50_s": percentile([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 50),
            "loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0]}


async def measure(args, url: str) -> dict:
    passage, doc, book = document_slices(args)
    levels = [max(args.requests, 2 * c) for c in args.concurrency]
    total = sum(levels) + 2 * args.questions + 3 + 3
    async with httpx.AsyncClient(base_url=url, headers=_auth(args), timeout=900,
                                 limits=httpx.Limits(max_connections=64)) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        bar = tqdm(total=total, desc="load test", unit="req")
        # reuse: the document's text sent with every question vs stored once and asked by id
        reuse = {"book": book, "doc_tokens": args.doc_tokens, "doc_chars": len(doc)}
        await ask(http, model, QUESTIONS[-1], [], args.max_tokens)  # warm-up: first forward passes are slower
        baseline = [await ask(http, model, QUESTIONS[i], [], args.max_tokens) for i in range(2)]
        bar.update(3)
        as_text = []
        for i in range(args.questions):
            as_text.append(await ask(http, model, QUESTIONS[i % len(QUESTIONS)], [doc], args.max_tokens))
            bar.update(1)
        t0 = time.perf_counter()
        stored = (
            await http.post("/v1/contexts", json={"text": doc, "name": f"{book} ({args.doc_tokens} tokens)"})
        ).json()
        store_s = time.perf_counter() - t0
        as_id = []
        for i in range(args.questions):
            as_id.append(await ask(http, model, QUESTIONS[i % len(QUESTIONS)], [stored["id"]], args.max_tokens))
            bar.update(1)
        for name, rs in [("no_context", baseline), ("text", as_text), ("stored", as_id)]:
            bad = [r for r in rs if r["status"] != 200]
            if bad:
                raise RuntimeError(f"reuse run '{name}' failed: {bad[0]}")
        mean = lambda rs: sum(r["latency_s"] for r in rs) / len(rs)  # noqa: E731
        reuse.update({
            "store_s": store_s, "stored_id": stored["id"], "stored_tokens": stored.get("tokens"),
            "no_context_s": mean(baseline), "text_s": [r["latency_s"] for r in as_text],
            "stored_s": [r["latency_s"] for r in as_id], "text_mean_s": mean(as_text),
            "stored_first_s": as_id[0]["latency_s"], "stored_hot_mean_s": mean(as_id[1:]) if len(as_id) > 1 else None,
        })
        hot = reuse["stored_hot_mean_s"] or reuse["stored_first_s"]
        reuse["saved_per_question_s"] = reuse["text_mean_s"] - hot
        reuse["saved_first_question_s"] = reuse["text_mean_s"] - reuse["stored_first_s"]
        reuse["break_even_questions"] = store_s / max(1e-9, reuse["saved_per_question_s"])

        # concurrency: everyone asks about one stored passage
        pid = (await http.post("/v1/contexts", json={"text": passage, "name": "passage"})).json()["id"]
        # warm-up (not measured): the passage's first use, then one full batch (new batch shapes
        # and the passage's keys/values for that batch size are computed once)
        await ask(http, model, QUESTIONS[0], [pid], args.max_tokens)
        await asyncio.gather(*(ask(http, model, QUESTIONS[0], [pid], args.max_tokens) for _ in range(args.max_batch)))
        bar.update(3)
        rows = [
            await concurrency_level(http, model, c, n, [pid], args.max_tokens, bar)
            for c, n in zip(args.concurrency, levels)
        ]
        bar.close()
        metrics = (await http.get("/metrics")).text
    batches = _metric(metrics, "batches_total")
    return {"model": model, "reuse": reuse, "concurrency": rows, "passage_tokens": args.passage_tokens,
            "mean_batch_size": _metric(metrics, "batched_requests_total") / batches if batches else None}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"cepe_{name} "):
            return float(line.split()[-1])
    return 0.0


def conditions(args) -> dict:
    import torch
    import transformers

    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "cpu_count": os.cpu_count(),
            "server_threads": args.threads, "loadavg_before": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "decoder": args.decoder,
            "encoder": args.encoder if args.adapter == "none" else "the adapter's own", "adapter": args.adapter,
            "init": args.init if args.adapter == "none" else None,
            "max_tokens": args.max_tokens, "max_batch": args.max_batch, "note": args.note}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, reuse = result["concurrency"], result["reuse"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["clients"] for r in rows]
    a.plot(xs, [r["p50_s"] for r in rows], "o-", label="p50 latency")
    a.plot(xs, [r["p99_s"] for r in rows], "s--", label="p99 latency")
    a.set_xscale("log", base=2)
    a.set_xticks(xs, [str(x) for x in xs])
    a.set_xlabel("concurrent clients")
    a.set_ylabel("seconds per request")
    a2 = a.twinx()
    a2.bar(xs, [r["requests_per_s"] for r in rows], width=[x * 0.3 for x in xs], alpha=0.25, color="tab:green")
    a2.set_ylabel("requests / s (bars)")
    a.legend(loc="upper left")
    a.set_title(f"{result['conditions']['max_tokens']}-token answers, stored {result['passage_tokens']}-token passage")
    labels = ["no context", "text sent\nevery time", "stored id\n(1st question)", "stored id\n(later)"]
    values = [reuse["no_context_s"], reuse["text_mean_s"], reuse["stored_first_s"], reuse["stored_hot_mean_s"] or 0]
    b.bar(labels, values, color=["grey", "tab:red", "tab:orange", "tab:blue"])
    for i, v in enumerate(values):
        b.text(i, v, f"{v:.2f}s", ha="center", va="bottom")
    b.set_ylabel("seconds per question")
    b.set_title(f"{reuse['doc_tokens']}-token document ({reuse['book']})")
    fig.suptitle(f"cepe serve, {result['model']}, {result['conditions']['cpu_count']} CPU cores "
                 f"(load avg {result['conditions']['loadavg_before'][0]:.1f} at start)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cond = conditions(args)
    proc, work = None, Path(tempfile.mkdtemp(prefix="cepe-loadtest-"))
    try:
        if args.url:
            url = args.url
        else:
            t0 = time.perf_counter()
            proc, url = start_server(args, work)
            cond["server_start_s"] = time.perf_counter() - t0
        result = asyncio.run(measure(args, url))
    finally:
        stop_server(proc)
        shutil.rmtree(work / "store", ignore_errors=True)
        print(f"server log: {work / 'server.log'}")
    cond["loadavg_after"] = os.getloadavg()
    result["conditions"] = cond
    (out / "load.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "load.png")
    print(
        f"\n{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
        f"{'TTFT p50':>9} {'load1m':>7}"
    )
    for r in result["concurrency"]:
        print(
            f"{r['clients']:>7} {r['ok']:>4}/{r['requests']:<3} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>7.1f} "
            f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {r['ttft_p50_s']:>9.2f} {r['loadavg_1m_end']:>7.1f}"
        )
    u = result["reuse"]
    print(f"\n{u['doc_tokens']}-token document, {args.max_tokens}-token answers (mean s per question):")
    print(
        f"  no context {u['no_context_s']:.2f} | text every time {u['text_mean_s']:.2f} | stored: encode+store once "
        f"{u['store_s']:.2f}, 1st question {u['stored_first_s']:.2f}, "
        f"later {u['stored_hot_mean_s'] or float('nan'):.2f}"
    )
    print(
        f"  saved per question {u['saved_per_question_s']:.2f} s (first question {u['saved_first_question_s']:.2f} s); "
        f"storing pays off after {u['break_even_questions']:.1f} questions"
    )
    print(f"results: {out / 'load.json'}, {out / 'load.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
