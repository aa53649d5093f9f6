"""The document store: contexts encoded once, kept on disk, reused by every later request.

A document is stored as the encoder's output (`ContextStates.save`, safetensors) plus a small JSON
sidecar. Its id is the sha256 of the encoder fingerprint and the text, so the same text under the
same encoder is stored once, and a stored encoding can never be paired with the wrong encoder.
Ids are `ctx-` + 64 hex digits and are checked before they touch the file system: nothing a
client sends can name a path outside the store folder.

Least-recently-used eviction keeps the folder under a byte budget. "Used" is recorded in the
safetensors file's mtime, so the order survives a restart along with the documents.

Recently used documents also stay in memory (a second, smaller LRU budget) as the very
`ContextStates` objects the model ran on: the cross-attention keys/values the model caches inside
them (`kv_policy` "cache"/"auto") then serve the next question too, so a hot document costs
neither a disk read nor a key/value projection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.context import ContextStates

log = logging.getLogger("cepe.serving")

ID_PREFIX = "ctx-"
_ID_RE = re.compile(r"ctx-([0-9a-f]{64})")


class InvalidContextId(ValueError):
    """An id that is not `ctx-` + 64 lowercase hex digits (e.g. one that tries to name a path)."""


def parse_id(doc_id: str) -> str:
    """`ctx-<hex>` -> `<hex>`; anything else raises `InvalidContextId`."""
    m = _ID_RE.fullmatch(doc_id) if isinstance(doc_id, str) else None
    if m is None:
        shown = doc_id if isinstance(doc_id, str) and len(doc_id) <= 80 else f"{str(doc_id)[:80]}..."
        raise InvalidContextId(f"invalid context id {shown!r}: expected 'ctx-' followed by 64 hex digits")
    return m.group(1)


@dataclass
class DocumentInfo:
    id: str
    name: str | None
    tokens: int
    bytes: int
    created: float
    last_used: float

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "object": "context",
            "name": self.name,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "created_at": int(self.created),
            "last_used_at": int(self.last_used),
        }


class DocumentStore:
    """Encoded documents in `root`, at most `budget_bytes` of them (least recently used go first).

    Only documents encoded by the encoder with `fingerprint` are indexed; files another encoder
    wrote into the same folder are left alone. Thread-safe.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, budget_bytes: int, memory_budget_bytes: int = 0):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.budget_bytes = int(budget_bytes)
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.evictions = 0
        self._lock = threading.RLock()
        self._docs: OrderedDict[str, DocumentInfo] = OrderedDict()  # least recently used first
        self._hot: OrderedDict[str, ContextStates] = OrderedDict()  # in memory, least recently used first
        self._scan()

    # ------------------------------------------------------------------ paths and ids
    def content_id(self, text: str) -> str:
        h = hashlib.sha256(self.fingerprint.encode() + b"\0" + text.encode("utf-8", "surrogatepass"))
        return ID_PREFIX + h.hexdigest()

    def _paths(self, hex_id: str) -> tuple[Path, Path]:
        # parse_id already allows only hex; the check below keeps that true if it ever changes
        states, meta = self.root / f"{hex_id}.safetensors", self.root / f"{hex_id}.json"
        if states.parent != self.root:
            raise InvalidContextId(f"context id {hex_id!r} escapes the store")
        return states, meta

    def _scan(self) -> None:
        """Rebuild the index from the folder (a restart loses nothing but half-written files)."""
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        found = []
        for meta_path in self.root.glob("*.json"):
            hex_id = meta_path.stem
            if not re.fullmatch(r"[0-9a-f]{64}", hex_id):
                continue
            states_path, _ = self._paths(hex_id)
            try:
                meta = json.loads(meta_path.read_text())
                stat = states_path.stat()
            except (OSError, json.JSONDecodeError) as e:
                log.warning("store: skipping %s (%s)", meta_path.name, e)
                continue
            if meta.get("fingerprint") != self.fingerprint:
                continue
            found.append(DocumentInfo(ID_PREFIX + hex_id, meta.get("name"), int(meta.get("tokens", 0)), stat.st_size,
                                      float(meta.get("created", stat.st_mtime)), stat.st_mtime))
        for info in sorted(found, key=lambda d: d.last_used):
            self._docs[parse_id(info.id)] = info

    # ------------------------------------------------------------------ queries
    def __contains__(self, doc_id: str) -> bool:
        with self._lock:
            return parse_id(doc_id) in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(d.bytes for d in self._docs.values())

    def list(self) -> list[DocumentInfo]:
        """Most recently used first."""
        with self._lock:
            return list(reversed(self._docs.values()))

    def info(self, doc_id: str) -> DocumentInfo:
        hex_id = parse_id(doc_id)
        with self._lock:
            if hex_id not in self._docs:
                raise KeyError(f"no stored context {doc_id}")
            return self._docs[hex_id]

    def get(self, doc_id: str) -> ContextStates:
        """A document's encoded states (1, S, He), from memory or disk; marks it used. The object
        may be shared with other requests: treat it as read-only (the model's key/value cache aside)."""
        hex_id = parse_id(doc_id)
        with self._lock:
            info = self._docs.get(hex_id)
            if info is None:
                raise KeyError(f"no stored context {doc_id}")
            states_path, _ = self._paths(hex_id)
            states = self._hot.get(hex_id)
            if states is None:
                states = ContextStates.load(states_path)
                if states.fingerprint != self.fingerprint:
                    raise ValueError(f"{states_path}: encoded by another encoder ({states.fingerprint})")
            self._keep_hot(hex_id, states)
            now = time.time()
            os.utime(states_path, (now, now))
            info.last_used = now
            self._docs.move_to_end(hex_id)
        return states

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return sum(_nbytes(s) for s in self._hot.values())

    def _keep_hot(self, hex_id: str, states: ContextStates) -> None:
        if self.memory_budget_bytes <= 0:
            return
        self._hot[hex_id] = states
        self._hot.move_to_end(hex_id)
        # sizes are re-read each time: the model adds cached keys/values to these objects as it uses them
        while len(self._hot) > 1 and sum(_nbytes(s) for s in self._hot.values()) > self.memory_budget_bytes:
            self._hot.popitem(last=False)

    # ------------------------------------------------------------------ changes
    def put(self, doc_id: str, states: ContextStates, name: str | None = None) -> tuple[DocumentInfo, list[str]]:
        """Write a document (atomically: a crash leaves either the old state or the new one), then
        evict least-recently-used others until the store fits its budget. Returns the new entry
        and the evicted ids."""
        hex_id = parse_id(doc_id)
        if states.batch_size != 1:
            raise ValueError("a stored context holds one document (batch size 1)")
        states_path, meta_path = self._paths(hex_id)
        now = time.time()
        meta = {"id": doc_id, "name": name, "tokens": states.num_tokens, "fingerprint": self.fingerprint, "created": now}
        with self._lock:
            tmp_states, tmp_meta = states_path.with_suffix(".safetensors.tmp"), meta_path.with_suffix(".json.tmp")
            states.save(tmp_states)
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_states, states_path)
            os.replace(tmp_meta, meta_path)
            info = DocumentInfo(doc_id, name, states.num_tokens, states_path.stat().st_size, now, now)
            self._docs[hex_id] = info
            self._docs.move_to_end(hex_id)
            self._hot.pop(hex_id, None)  # the next get loads the padding-free copy just written
            evicted = []
            while sum(d.bytes for d in self._docs.values()) > self.budget_bytes and len(self._docs) > 1:
                old = next(iter(self._docs))
                evicted.append(self._docs[old].id)
                self._remove(old)
                self.evictions += 1
        for e in evicted:
            log.info("context evicted", extra={"fields": {"event": "context_evicted", "id": e}})
        return info, evicted

    def delete(self, doc_id: str) -> bool:
        hex_id = parse_id(doc_id)
        with self._lock:
            if hex_id not in self._docs:
                return False
            self._remove(hex_id)
            return True

    def _remove(self, hex_id: str) -> None:
        self._docs.pop(hex_id, None)
        self._hot.pop(hex_id, None)
        for p in self._paths(hex_id):
            p.unlink(missing_ok=True)


def _nbytes(obj) -> int:
    """Bytes held by a `ContextStates`, including whatever the model cached inside it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, ContextStates):
        return obj.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(x) for x in obj)
    return 0
