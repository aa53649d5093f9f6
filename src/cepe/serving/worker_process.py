"""The model worker in a process of its own (`cepe serve --worker process`).

In the default `thread` worker, the model runs in a thread of the HTTP process. Every PyTorch
operator releases the GIL and takes it back, so the worker waits behind the HTTP thread after each
one: on the H200, eager prefills stalled for seconds under load (docs/serving.md). Here the
`Scheduler` and the model live in a child process with its own GIL. The HTTP process keeps
everything else (validation, tokenizers, the store, metrics, streaming) and talks to the child
through a pipe. `ProcessScheduler` has the `Scheduler` interface `Service` uses: start, stop,
submit, cancel, depth, running.

Wire format: frames of a JSON header plus binary blobs. Tensors travel as safetensors bytes, never
pickled. A job's contexts go once: both ends keep the same byte-bounded LRU of the context
objects sent, so a document asked about again is named by its key alone. The parent's sends are
ordered under one lock, and the child handles them in that order, so the two LRUs stay in step.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import multiprocessing as mp
import signal
import struct
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from ..model.context import ContextStates
from .engine import EncodeJob, GenerateJob, QueueFull, Runner, Sampling, Scheduler, ShuttingDown, states_nbytes

log = logging.getLogger("cepe.serving")
READY_TIMEOUT_S = 900.0  # loading a large model in the child
GAUGE_PERIOD_S = 0.05


# ---------------------------------------------------------------------- framing
def frame(header: dict, blobs: tuple[bytes, ...] | list[bytes] = ()) -> bytes:
    """A JSON header (with the blobs' lengths) and the blobs, in one message."""
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
    return b"".join([struct.pack("<I", len(head)), head, *blobs])


def send_frame(conn, lock: threading.Lock, header: dict, blobs: tuple[bytes, ...] = ()) -> None:
    data = frame(header, blobs)
    with lock:
        conn.send_bytes(data)


def recv_frame(conn) -> tuple[dict, list[bytes]]:
    data = conn.recv_bytes()
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4:4 + n])
    blobs, at = [], 4 + n
    for size in header.pop("blobs"):
        blobs.append(data[at:at + size])
        at += size
    return header, blobs


class KeyLRU:
    """Keys (with values on the child's side) within a byte budget; the oldest go first."""

    def __init__(self, budget_bytes: int):
        self.budget, self.total = budget_bytes, 0
        self.items: OrderedDict[int, tuple[int, Any]] = OrderedDict()

    def get(self, key: int):
        if key not in self.items:
            return None
        self.items.move_to_end(key)
        return self.items[key]

    def add(self, key: int, nbytes: int, value: Any = None) -> None:
        self.items[key] = (nbytes, value)
        self.total += nbytes
        while self.total > self.budget and len(self.items) > 1:
            _, (size, _) = self.items.popitem(last=False)
            self.total -= size


# ---------------------------------------------------------------------- the HTTP process's side
class ProcessScheduler:
    """`Scheduler`'s interface over a model worker in a child process. spec: what the child builds
    (see `child_main`); metrics: the HTTP process's `Metrics`, fed with the child's counters."""

    def __init__(self, spec: dict, metrics, context_budget_bytes: int = 2**30):
        self.spec, self.metrics = spec, metrics
        self.depth = self.running = 0
        self.stopping = False
        self._jobs: dict[int, Any] = {}
        self._keys = itertools.count(1)
        self._send_lock = threading.Lock()
        self._acks: dict[int, tuple[threading.Event, list]] = {}
        self._sent = KeyLRU(context_budget_bytes)
        self.spec["context_budget_bytes"] = context_budget_bytes
        self._ready = threading.Event()
        self._conn = self._proc = self._reader = None

    def start(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
        self._conn, child = ctx.Pipe()
        # the spec crosses as JSON text: plain data only
        self._proc = ctx.Process(target=child_main, args=(child, json.dumps(self.spec)), name="cepe-model-worker",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._reader = threading.Thread(target=self._read, name="cepe-worker-reader", daemon=True)
        self._reader.start()
        if not self._ready.wait(READY_TIMEOUT_S) or self.stopping:
            raise RuntimeError("the model worker process did not start (see its log)")

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None or self.stopping:
            return
        self.stopping = True
        try:
            send_frame(self._conn, self._send_lock, {"op": "stop"})
        except OSError:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
        self._fail_all(503, "server is shutting down")

    def submit(self, jobs: list) -> None:
        if self.stopping:
            raise ShuttingDown("server is shutting down")
        if not jobs:
            return
        done, result = threading.Event(), []
        with self._send_lock:  # keys, the context LRU and the pipe in one order
            wire, blobs = [], []
            for job in jobs:
                key = next(self._keys)
                self._jobs[key] = job
                job.wire_key = key
                wire.append(self._describe(job, key, blobs))
            self._acks[wire[0]["key"]] = (done, result)
            self._conn.send_bytes(frame({"op": "submit", "jobs": wire}, blobs))
        if not done.wait(30.0):
            result[:] = [False, "server_error", "the model worker did not answer"]
        ok, kind, message = result
        if not ok:
            for job in jobs:
                self._jobs.pop(job.wire_key, None)
            if kind == "reset":  # the child could not build the jobs and forgot every context: so do we
                with self._send_lock:
                    self._sent = KeyLRU(self._sent.budget)
            raise (QueueFull if kind == "queue_full" else ShuttingDown)(message)

    def _describe(self, job, key: int, blobs: list) -> dict:
        out = {"key": key, "index": job.index, "deadline_in": job.deadline - time.monotonic()}
        if isinstance(job, EncodeJob):
            return {**out, "kind": "encode", "documents": job.documents}
        refs = []
        for c in job.contexts:
            ckey = c.__dict__.setdefault("_wire_key", next(self._keys))
            if self._sent.get(ckey) is not None:
                refs.append({"key": ckey})
            else:
                self._sent.add(ckey, states_nbytes(c))
                refs.append({"key": ckey, "blob": len(blobs)})
                blobs.append(c.to_bytes())
        s = job.sampling
        return {**out, "kind": "generate", "prompt_ids": job.prompt_ids, "contexts": refs,
                "sampling": [s.max_tokens, s.temperature, s.top_p, list(s.stop), s.ignore_eos, s.seed]}

    def cancel(self, job, reason: str = "cancelled") -> None:
        if job.finished or job.cancelled.is_set():
            return
        job.cancelled.set()
        key = getattr(job, "wire_key", None)
        if key is not None and self._jobs.pop(key, None) is not None:
            try:
                send_frame(self._conn, self._send_lock, {"op": "cancel", "key": key, "reason": reason})
            except OSError:
                pass

    def _read(self) -> None:
        try:
            while True:
                header, blobs = recv_frame(self._conn)
                op = header["op"]
                if op == "event":
                    self._event(header, blobs)
                elif op == "ack":
                    done, result = self._acks.pop(header["key"])
                    result[:] = [header["ok"], header.get("kind"), header.get("message")]
                    done.set()
                elif op == "gauges":
                    self.depth, self.running = header["depth"], header["running"]
                    for name, value in header["counters"].items():
                        self.metrics.generated(value) if name == "generated" else self.metrics.add(name, value)
                elif op == "ready":
                    self._ready.set()
        except (EOFError, OSError):
            pass
        if not self.stopping:
            log.error("the model worker process exited", extra={"fields": {"event": "worker_exited"}})
        self.stopping = True
        self._ready.set()
        self._fail_all(503, "the model worker stopped")

    def _event(self, header: dict, blobs: list[bytes]) -> None:
        event = header["event"]
        job = self._jobs.get(header["key"]) if event[0] == "delta" else self._jobs.pop(header["key"], None)
        if job is None:
            return  # cancelled meanwhile
        if header.get("states"):
            event = ["done", ContextStates.from_bytes(blobs[0])]
        job.emit(*event)

    def _fail_all(self, status: int, message: str) -> None:
        for key in list(self._jobs):
            job = self._jobs.pop(key, None)
            if job is not None and not job.finished:
                job.emit("error", status, message, "server_error")


# ---------------------------------------------------------------------- the child process
class _Loop:
    """Stands in for a handler's event loop: the call runs now, on the worker's thread."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


class _Sink:
    """A job's event queue: each event goes to the HTTP process as one frame."""

    def __init__(self, conn, lock: threading.Lock, key: int):
        self.conn, self.lock, self.key = conn, lock, key

    def put_nowait(self, item) -> None:
        _, event = item
        if event[0] == "done" and isinstance(event[1], ContextStates):
            return send_frame(self.conn, self.lock, {"op": "event", "key": self.key, "event": ["done"], "states": 1},
                              (event[1].to_bytes(),))
        send_frame(self.conn, self.lock, {"op": "event", "key": self.key, "event": list(event)})


class _Counters:
    """The child's metrics: counts kept until the next gauges frame carries them over."""

    def __init__(self):
        self.lock, self.counts = threading.Lock(), {}

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + value

    def generated(self, n_tokens: int) -> None:
        self.add("generated", n_tokens)

    def take(self) -> dict:
        with self.lock:
            out, self.counts = self.counts, {}
        return out


def child_main(conn, spec_json: str) -> None:
    """Build the model (spec["factory"]: "module:function", called with spec["factory_kwargs"]) and a
    `Scheduler` (spec["scheduler"]), then serve frames until told to stop."""
    spec = json.loads(spec_json)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the HTTP process stops us
    sys.path[:0] = spec.get("sys_path", [])
    sys.setswitchinterval(spec.get("switch_interval_s", 1e-4))
    if spec.get("json_logs"):  # the server's log gets this process's events (joins, captures) too
        from .metrics import setup_json_logging

        setup_json_logging()
    module, name = spec["factory"].split(":")
    model = getattr(importlib.import_module(module), name)(**spec.get("factory_kwargs", {})).eval()
    from ..model.configuration import apply_runtime_settings

    apply_runtime_settings(model.config, spec.get("runtime_settings", {"encoder_compile": "never"}))
    lock, counters, loop = threading.Lock(), _Counters(), _Loop()
    sched = Scheduler(Runner(model, model.tokenizer, threading.Lock(), counters), metrics=counters, **spec["scheduler"])
    sched.start()
    held = KeyLRU(spec["context_budget_bytes"])
    jobs: dict[int, Any] = {}
    send_frame(conn, lock, {"op": "ready"})
    while True:
        if conn.poll(GAUGE_PERIOD_S):
            try:
                header, blobs = recv_frame(conn)
            except (EOFError, OSError):
                break
            if header["op"] == "stop":
                break
            if header["op"] == "cancel":
                job = jobs.pop(header["key"], None)
                if job is not None:
                    sched.cancel(job, header["reason"])
                continue
            try:
                built = [_job(w, blobs, held, model, conn, lock, loop) for w in header["jobs"]]
            except Exception as e:  # e.g. a context key this side does not hold: start both LRUs afresh
                log.exception("worker: could not build jobs")
                held = KeyLRU(spec["context_budget_bytes"])
                send_frame(conn, lock, {"op": "ack", "key": header["jobs"][0]["key"], "ok": False, "kind": "reset",
                                        "message": f"the model worker could not take the request "
                                                   f"({type(e).__name__}): retry"})
                continue
            try:
                sched.submit(built)
                jobs.update({w["key"]: j for w, j in zip(header["jobs"], built)})
                ack = {"ok": True}
            except QueueFull as e:
                ack = {"ok": False, "kind": "queue_full", "message": str(e)}
            except ShuttingDown as e:
                ack = {"ok": False, "kind": "shutting_down", "message": str(e)}
            send_frame(conn, lock, {"op": "ack", "key": header["jobs"][0]["key"], **ack})
        for key in [k for k, j in jobs.items() if j.finished]:
            del jobs[key]
        send_frame(conn, lock, {"op": "gauges", "depth": sched.depth, "running": sched.running,
                                "counters": counters.take()})
    sched.stop()


def _job(w: dict, blobs: list[bytes], held: KeyLRU, model, conn, lock, loop):
    kw = {"sink": _Sink(conn, lock, w["key"]), "loop": loop, "deadline": time.monotonic() + w["deadline_in"],
          "index": w["index"]}
    if w["kind"] == "encode":
        return EncodeJob(w["documents"], **kw)
    contexts = []
    for ref in w["contexts"]:
        if "blob" in ref:
            # kept on the CPU: this is the frame thread, and a device copy here could land while the
            # worker thread captures a CUDA graph, which fails the capture (AcceleratorError on the
            # H200). The runner moves contexts to the device on the worker thread when rows join.
            c = ContextStates.from_bytes(blobs[ref["blob"]])
            held.add(ref["key"], states_nbytes(c), c)
        else:
            c = held.get(ref["key"])[1]
        contexts.append(c)
    m, t, p, stop, ignore_eos, seed = w["sampling"]
    return GenerateJob(w["prompt_ids"], Sampling(m, t, p, tuple(stop), ignore_eos, seed), contexts, **kw)
