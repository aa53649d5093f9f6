"""How much a busy Python thread slows the serving worker's eager work (issue 17, docs/serving.md,
"Why the H200 server stalls").

`cepe serve` runs the model in a worker thread of the HTTP process. Every PyTorch operator releases
the GIL and takes it back, so while another thread of the process runs Python (the event loop
parsing requests and writing streamed tokens, the threads resolving contexts), each operator can
wait for that thread's switch interval (`sys.getswitchinterval()`, 5 ms by default) before it runs.
An eager forward of SmolLM2 with its cross-attention is ~1,300 operators.

This times, with 0, 1 and 4 threads running pure Python beside it, under several switch intervals:
- **join**: what `ContinuousBatcher._join` does for newcomers: their contexts batched and
  keys/values projected (`RowContexts.build`) and their prompts prefilled (`decoding.Batch.prefill`);
- **step**: one eager decoding step of that batch (`decoding.Batch.step` + `pick` + `tolist`).

    PYTHONPATH=src python3 scripts/bench_gil_contention.py --model shape --rows 4
    PYTHONPATH=src python3 scripts/bench_gil_contention.py --model tiny --intervals 5 0.2 --busy 0 1 --json /tmp/g.json

Median of `--reps` calls (after two untimed ones) per cell; ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve_step import contexts, load, prompts, timed  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape", choices=["tiny", "shape", "smollm2"])
    p.add_argument("--rows", type=int, default=4, help="rows joining / in the batch")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 4], help="threads running pure Python beside it")
    p.add_argument("--intervals", type=float, nargs="+", default=[5.0, 1.0, 0.2], help="switch intervals, ms")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


class Busy:
    """`n` threads spinning in Python (each a stand-in for an event loop that always has work)."""

    def __init__(self, n: int):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._spin, daemon=True) for _ in range(n)]

    def _spin(self) -> None:
        while not self.stop.is_set():
            sum(range(200))

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


@torch.no_grad()
def work(model, rows: int):
    """(join, step): the two eager pieces of the continuous batcher, on fixed inputs."""
    from cepe.model import decoding
    from cepe.serving.batch_context import RowContexts

    ctxs = contexts(model, rows, 256, 4)
    ids = prompts(model, rows, 24)
    samplers = [decoding.Sampler() for _ in ids]

    def join():
        rc = RowContexts.build(model, ctxs)
        batch = decoding.Batch(model, pad_id=0, context=rc.context)
        return batch, decoding.pick(batch.prefill(ids), samplers)

    batch, first = join()
    state = {"tokens": first}

    def step():
        state["tokens"] = decoding.pick(batch.step(state["tokens"]), samplers)
        state["tokens"].tolist()

    return join, step


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args.model, args.device, args.dtype).eval()
    join, step = work(model, args.rows)
    default = sys.getswitchinterval()
    rows = []
    try:
        for interval in args.intervals:
            sys.setswitchinterval(interval / 1e3)
            for busy in args.busy:
                with Busy(busy):
                    row = {"interval_ms": interval, "busy_threads": busy,
                           "join_ms": 1e3 * timed(join, args.reps), "step_ms": 1e3 * timed(step, max(args.reps, 8))}
                rows.append(row)
                print(f"interval {interval:5.2f} ms, {busy} busy: join {row['join_ms']:8.1f} ms, "
                      f"step {row['step_ms']:7.1f} ms", file=sys.stderr, flush=True)
    finally:
        sys.setswitchinterval(default)
    alone = {r["interval_ms"]: r for r in rows if r["busy_threads"] == 0}
    print(f"\n{args.model}, {args.rows} rows, {args.device} {args.dtype}, torch threads {args.threads}")
    print(f"{'interval ms':>11} {'busy':>4} {'join ms':>9} {'x alone':>8} {'step ms':>9} {'x alone':>8}")
    for r in rows:
        base = alone.get(r["interval_ms"])
        jx = f"{r['join_ms'] / base['join_ms']:.1f}" if base else "-"
        sx = f"{r['step_ms'] / base['step_ms']:.1f}" if base else "-"
        print(f"{r['interval_ms']:>11.2f} {r['busy_threads']:>4} {r['join_ms']:>9.1f} {jx:>8} "
              f"{r['step_ms']:>9.1f} {sx:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
