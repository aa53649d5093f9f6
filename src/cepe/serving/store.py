"""The document store: contexts encoded once, kept on disk, reused by every later request.

A document is stored as the encoder's output (`ContextStates.save` in `state_format`: the model's
dtype or 8 bits a value) plus a JSON sidecar holding the file's sha256. Its id is the sha256 of the
encoder fingerprint and the text, so the same text under the same encoder is stored once, and a
stored encoding never meets the wrong encoder. Ids are `ctx-` + 64 hex digits and are checked
before they touch the file system: nothing a client sends can name a path outside the store folder.

Least-recently-used eviction keeps the folder under a byte budget. "Used" is recorded in the
safetensors file's mtime, so the order survives a restart along with the documents.

Faults. Every read from disk checks the file against its sha256: a corrupt document is moved to
`quarantine/`, unlisted, and reported (never served). A read-only folder still serves reads. Writes
(uploads, deletes, evictions, start-up cleanup) hold an exclusive `fcntl` lock on `.lock` and
publish with atomic renames, so several server processes (replicas) can share one folder; the
folder, not a process's memory, is the truth, and each process re-reads it before it changes it.

Recently used documents also stay in memory (a second, smaller LRU budget) as the very
`ContextStates` objects the model ran on: the cross-attention keys/values the model caches inside
them (`kv_policy` "cache"/"auto") then serve the next question too. That budget counts those
keys/values, predicted from `kv_bytes_per_token` before the model has filled them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.context import ContextStates
from .hot_cache import HotCache

log = logging.getLogger("cepe.serving")

ID_PREFIX = "ctx-"
_ID_RE = re.compile(r"ctx-([0-9a-f]{64})")


_HEX_RE = re.compile(r"[0-9a-f]{64}")
QUARANTINE = "quarantine"


class InvalidContextId(ValueError):
    """An id that is not `ctx-` + 64 lowercase hex digits (e.g. one that tries to name a path)."""


def parse_id(doc_id: str) -> str:
    """`ctx-<hex>` -> `<hex>`; anything else raises `InvalidContextId`."""
    m = _ID_RE.fullmatch(doc_id) if isinstance(doc_id, str) else None
    if m is None:
        shown = doc_id if isinstance(doc_id, str) and len(doc_id) <= 80 else f"{str(doc_id)[:80]}..."
        raise InvalidContextId(f"invalid context id {shown!r}: expected 'ctx-' followed by 64 hex digits")
    return m.group(1)


class CorruptContext(Exception):
    """A stored document failed its checksum or could not be read: it has been quarantined."""


class StoreWriteError(Exception):
    """The store folder cannot be written: full (`full`) or read-only / not permitted. The message
    names no path."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


def _write_error(e: OSError) -> StoreWriteError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreWriteError("the document store has no space left on its disk: free space or lower "
                               "--store-budget-mb", full=True)
    return StoreWriteError(f"the document store cannot be written ({e.strerror or type(e).__name__}): "
                           "its folder is read-only or not permitted")


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
    wrote into the same folder are left alone. Thread-safe, and safe across processes sharing
    `root` (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str, budget_bytes: int, memory_budget_bytes: int = 0,
                 kv_bytes_per_token: int = 0, state_format: str | None = None):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.budget_bytes = int(budget_bytes)
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.kv_bytes_per_token = int(kv_bytes_per_token)  # cross-attention keys/values the model caches per token
        self.state_format = state_format  # new files: `ContextStates.save` format (None: the states' dtype)
        self.evictions = 0
        self._lock = threading.RLock()
        self._docs: OrderedDict[str, DocumentInfo] = OrderedDict()  # least recently used first
        self._hot = HotCache(self.memory_budget_bytes, self._memory_cost)  # in memory, least recently used first
        self._foreign: set[str] = set()  # sidecars of other encoders: not ours to index
        self._bad: set[str] = set()  # corrupt but could not be moved (read-only folder): never listed
        try:
            with self._writing():
                self._clean()
                self._refresh()
                self._trim(keep=None)
        except StoreWriteError as e:
            log.warning("store: %s; serving it read-only", e)
            self._refresh()

    # ------------------------------------------------------------------ paths, ids, locking
    def content_id(self, text: str) -> str:
        h = hashlib.sha256(self.fingerprint.encode() + b"\0" + text.encode("utf-8", "surrogatepass"))
        return ID_PREFIX + h.hexdigest()

    def _paths(self, hex_id: str) -> tuple[Path, Path]:
        # parse_id already allows only hex; the check below keeps that true if it ever changes
        states, meta = self.root / f"{hex_id}.safetensors", self.root / f"{hex_id}.json"
        if states.parent != self.root:
            raise InvalidContextId(f"context id {hex_id!r} escapes the store")
        return states, meta

    @contextmanager
    def _writing(self):
        """Exclusive right to change the folder: this process's threads and every other process."""
        with self._lock:
            try:
                fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise _write_error(e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _read_meta(self, hex_id: str) -> dict | None:
        """Our sidecar's content; None for another encoder's document. Raises on a broken sidecar."""
        meta = json.loads(self._paths(hex_id)[1].read_text())
        if not isinstance(meta, dict):
            raise ValueError("sidecar is not a JSON object")
        return meta if meta.get("fingerprint") == self.fingerprint else None

    def _clean(self) -> None:
        """At start (under the lock, so no write is half done): drop half-written files and orphans
        (states without a sidecar: a crash between the two renames), quarantine broken sidecars."""
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        sidecars = {p.stem for p in self.root.glob("*.json") if _HEX_RE.fullmatch(p.stem)}
        for states in self.root.glob("*.safetensors"):
            if _HEX_RE.fullmatch(states.stem) and states.stem not in sidecars:
                log.warning("store: removing orphan %s", states.name)
                states.unlink(missing_ok=True)
        for hex_id in sidecars:
            states, meta = self._paths(hex_id)
            try:
                self._read_meta(hex_id)
            except (OSError, ValueError) as e:
                log.warning("store: quarantining %s (%s)", meta.name, e)
                self._quarantine(hex_id)
                continue
            if not states.exists():  # a delete stopped between its two unlinks
                meta.unlink(missing_ok=True)

    def _refresh(self) -> None:
        """Re-read the folder into the index: another replica may have added, used or removed documents."""
        seen: dict[str, DocumentInfo] = {}
        for meta_path in self.root.glob("*.json"):
            hex_id = meta_path.stem
            if not _HEX_RE.fullmatch(hex_id) or hex_id in self._foreign or hex_id in self._bad:
                continue
            states_path, _ = self._paths(hex_id)
            try:
                stat = states_path.stat()
                info = self._docs.get(hex_id)
                if info is None:
                    meta = self._read_meta(hex_id)
                    if meta is None:
                        self._foreign.add(hex_id)
                        continue
                    info = DocumentInfo(ID_PREFIX + hex_id, meta.get("name"), int(meta.get("tokens", 0)), stat.st_size,
                                        float(meta.get("created", stat.st_mtime)), stat.st_mtime)
            except (OSError, ValueError):  # being written or removed by another process, or broken
                continue
            info.bytes, info.last_used = stat.st_size, stat.st_mtime
            seen[hex_id] = info
        self._docs = OrderedDict(sorted(seen.items(), key=lambda kv: kv[1].last_used))
        self._hot.keep_only(seen)

    def _lookup(self, hex_id: str) -> DocumentInfo | None:
        """The entry for `hex_id` if its files are in the folder now (indexing one another replica wrote)."""
        states_path, meta_path = self._paths(hex_id)
        if hex_id in self._bad or not (states_path.exists() and meta_path.exists()):
            self._docs.pop(hex_id, None)
            self._hot.pop(hex_id, None)
            return None
        if hex_id not in self._docs:
            self._refresh()
        return self._docs.get(hex_id)

    # ------------------------------------------------------------------ queries
    def __contains__(self, doc_id: str) -> bool:
        hex_id = parse_id(doc_id)
        with self._lock:
            return self._lookup(hex_id) is not None

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            self._refresh()
            return sum(d.bytes for d in self._docs.values())

    def list(self) -> list[DocumentInfo]:
        """Most recently used first."""
        with self._lock:
            self._refresh()
            return list(reversed(self._docs.values()))

    def info(self, doc_id: str) -> DocumentInfo:
        hex_id = parse_id(doc_id)
        with self._lock:
            info = self._lookup(hex_id)
        if info is None:
            raise KeyError(f"no stored context {doc_id}")
        return info

    def get(self, doc_id: str) -> ContextStates:
        """A document's encoded states (1, S, He), from memory or disk (checksum verified); marks it
        used. The object may be shared with other requests: treat it as read-only (the model's
        key/value cache aside). Raises KeyError if absent, CorruptContext if it failed its check."""
        hex_id = parse_id(doc_id)
        with self._lock:
            info = self._lookup(hex_id)
            if info is None:
                raise KeyError(f"no stored context {doc_id}")
            states = self._hot.get(hex_id)
        if states is None:
            states = self._load_verified(hex_id)
        with self._lock:
            self._hot.keep(hex_id, states)
            now = time.time()
            try:
                os.utime(self._paths(hex_id)[0], (now, now))
            except FileNotFoundError:
                pass  # removed meanwhile by another replica: this request still has its copy
            except OSError:
                pass  # a read-only folder: the LRU order is then kept in memory only
            info.last_used = now
            if hex_id in self._docs:
                self._docs.move_to_end(hex_id)
        return states

    def _load_verified(self, hex_id: str) -> ContextStates:
        states, problem = self._try_load(hex_id)
        if problem is not None:
            with self._lock:
                try:
                    with self._writing():  # writers hold this lock: a rewrite in progress is now complete
                        states, problem = self._try_load(hex_id)
                        if problem is not None:
                            self._quarantine(hex_id)
                except StoreWriteError:
                    self._bad.add(hex_id)
                    self._docs.pop(hex_id, None)
        if problem is not None:
            log.error("store: corrupt document quarantined", extra={"fields": {
                "event": "context_corrupt", "id": ID_PREFIX + hex_id, "problem": problem}})
            raise CorruptContext(f"stored context {ID_PREFIX + hex_id} was corrupt ({problem}) and has been "
                                 "removed: upload it again")
        return states

    def _try_load(self, hex_id: str) -> tuple[ContextStates | None, str | None]:
        """(states, None) if the files are whole, else (None, what is wrong). KeyError if they are gone."""
        states_path, _ = self._paths(hex_id)
        try:
            meta = self._read_meta(hex_id)
            with open(states_path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError as e:  # removed by another replica meanwhile
            raise KeyError(f"no stored context {ID_PREFIX + hex_id}") from e
        except (OSError, ValueError):
            return None, "unreadable sidecar or file"
        if meta is None or meta.get("sha256") not in (None, digest):  # None: written before checksums
            return None, "checksum mismatch"
        try:
            states = ContextStates.load(states_path)
        except FileNotFoundError as e:  # removed by another replica between the checksum and the read
            raise KeyError(f"no stored context {ID_PREFIX + hex_id}") from e
        except (OSError, ValueError):
            return None, "unreadable file"
        if states.fingerprint != self.fingerprint:
            return None, "encoded by another encoder"
        return states, None

    def _quarantine(self, hex_id: str) -> None:
        """Move a document's files to `quarantine/` (kept for inspection, never listed). Under `_writing`."""
        self._docs.pop(hex_id, None)
        self._hot.pop(hex_id, None)
        try:
            (self.root / QUARANTINE).mkdir(exist_ok=True)
            for p in self._paths(hex_id):
                if p.exists():
                    os.replace(p, self.root / QUARANTINE / p.name)
        except OSError:
            self._bad.add(hex_id)

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return self._hot.nbytes()

    def _memory_cost(self, states: ContextStates) -> int:
        """Bytes a kept document holds, counting the cross-attention keys/values the model will cache in it."""
        predicted = _nbytes(states.hidden_states) + _nbytes(states.attention_mask)
        predicted += states.hidden_states.shape[0] * states.hidden_states.shape[1] * self.kv_bytes_per_token
        return max(_nbytes(states), predicted)

    # ------------------------------------------------------------------ changes
    def put(self, doc_id: str, states: ContextStates, name: str | None = None) -> tuple[DocumentInfo, list[str], bool]:
        """Write a document (atomically: a crash leaves either the old state or the new one), then
        evict least-recently-used others until the store fits its budget. Returns the entry, the
        evicted ids, and whether it was created (False: already stored, by this or another process)."""
        hex_id = parse_id(doc_id)
        if states.batch_size != 1:
            raise ValueError("a stored context holds one document (batch size 1)")
        states_path, meta_path = self._paths(hex_id)
        tmp_states, tmp_meta = states_path.with_suffix(".safetensors.tmp"), meta_path.with_suffix(".json.tmp")
        with self._writing():
            self._refresh()
            if hex_id in self._docs:
                return self._docs[hex_id], [], False
            now = time.time()
            try:
                states.save(tmp_states, self.state_format)
                with open(tmp_states, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                meta = {"id": doc_id, "name": name, "tokens": states.num_tokens, "fingerprint": self.fingerprint,
                        "created": now, "sha256": digest}
                tmp_meta.write_text(json.dumps(meta))
                os.replace(tmp_states, states_path)
                os.replace(tmp_meta, meta_path)  # the sidecar last: a document is listed only once whole
            except OSError as e:
                for p in (tmp_states, tmp_meta):
                    try:
                        p.unlink(missing_ok=True)
                    except OSError:
                        pass
                if not meta_path.exists():
                    try:
                        states_path.unlink(missing_ok=True)
                    except OSError:
                        pass  # an orphan: removed at the next start
                raise _write_error(e) from e
            info = DocumentInfo(doc_id, name, states.num_tokens, states_path.stat().st_size, now, now)
            self._docs[hex_id] = info
            self._docs.move_to_end(hex_id)
            self._hot.pop(hex_id, None)  # the next get loads the padding-free copy just written
            evicted = self._trim(keep=hex_id)
        for e in evicted:
            log.info("context evicted", extra={"fields": {"event": "context_evicted", "id": e}})
        return info, evicted, True

    def _trim(self, keep: str | None) -> list[str]:
        """Evict least recently used documents until the store fits its budget (never `keep`). Under `_writing`."""
        evicted = []
        while sum(d.bytes for d in self._docs.values()) > self.budget_bytes:
            old = next((h for h in self._docs if h != keep), None)
            if old is None:
                break
            evicted.append(self._docs[old].id)
            self._remove(old)
            self.evictions += 1
        return evicted

    def delete(self, doc_id: str) -> bool:
        hex_id = parse_id(doc_id)
        with self._writing():
            if self._lookup(hex_id) is None:
                return False
            self._remove(hex_id)
            return True

    def _remove(self, hex_id: str) -> None:
        """Sidecar first: once it is gone no process lists the document; if removing it fails, nothing
        changed. A states file left behind is an orphan, removed at the next start. Under `_writing`."""
        states_path, meta_path = self._paths(hex_id)
        try:
            meta_path.unlink(missing_ok=True)
        except OSError as e:
            raise _write_error(e) from e
        self._docs.pop(hex_id, None)
        self._hot.pop(hex_id, None)
        try:
            states_path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("store: could not remove %s (%s); removed at the next start", states_path.name, e.strerror)


def _nbytes(obj) -> int:
    """Bytes held by a `ContextStates`, including whatever the model cached inside it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, ContextStates):
        return obj.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(x) for x in obj)
    return 0
