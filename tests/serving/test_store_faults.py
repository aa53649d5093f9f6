"""The document store under faults (issue 17): corrupt files, a read-only folder, failed deletes,
orphans, a smaller budget at restart, a full disk, concurrent uploads, and replicas (several
processes on one folder)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading
from pathlib import Path

import pytest
import torch
from test_store import FP, states

from cepe import ContextStates
from cepe.serving.store import CorruptContext, DocumentStore, StoreWriteError


def _files(root: Path, pattern: str) -> set[str]:
    return {p.name for p in root.glob(pattern)}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupt_file_is_detected_quarantined_and_unlisted(tmp_path, where):
    store = DocumentStore(tmp_path, FP, 2**20)
    doc, keep = store.content_id("doc"), store.content_id("keep")
    store.put(doc, states(10))
    store.put(keep, states(10, seed=1))
    path = tmp_path / f"{doc[4:]}.safetensors"
    _flip(path, -5 if where == "data" else 3)  # a flipped float / a broken header length
    cold = DocumentStore(tmp_path, FP, 2**20)  # a restart: nothing in memory
    with pytest.raises(CorruptContext) as e:
        cold.get(doc)
    assert str(tmp_path) not in str(e.value) and doc in str(e.value)
    assert doc not in cold and [d.id for d in cold.list()] == [keep]
    assert not path.exists() and (tmp_path / "quarantine" / path.name).exists()
    assert [d.id for d in DocumentStore(tmp_path, FP, 2**20).list()] == [keep]  # stays unlisted
    torch.testing.assert_close(cold.get(keep).hidden_states, states(10, seed=1).hidden_states)


def test_read_only_folder_still_serves_reads(tmp_path, monkeypatch):
    store = DocumentStore(tmp_path, FP, 2**20)
    doc = store.content_id("doc")
    store.put(doc, states(10))

    def refuse(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "utime", refuse)
    cold = DocumentStore(tmp_path, FP, 2**20)
    torch.testing.assert_close(cold.get(doc).hidden_states, states(10).hidden_states)
    # a delete that cannot remove the files changes nothing, and says why
    monkeypatch.setattr(os, "unlink", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(StoreWriteError, match="cannot be written"):
        cold.delete(doc)
    assert doc in cold and [d.id for d in DocumentStore(tmp_path, FP, 2**20).list()] == [doc]
    torch.testing.assert_close(cold.get(doc).hidden_states, states(10).hidden_states)


def test_orphans_removed_and_budget_enforced_at_start(tmp_path):
    store = DocumentStore(tmp_path, FP, 2**20)
    ids = [store.content_id(f"doc {i}") for i in range(4)]
    for i, doc_id in enumerate(ids):
        store.put(doc_id, states(10, seed=i))
    one = store.info(ids[0]).bytes
    (tmp_path / f"{ids[3][4:]}.json").unlink()  # a crash between the two renames: states without sidecar
    reopened = DocumentStore(tmp_path, FP, int(1.5 * one))
    assert not (tmp_path / f"{ids[3][4:]}.safetensors").exists()
    assert [d.id for d in reopened.list()] == [ids[2]] and reopened.total_bytes <= int(1.5 * one)
    assert _files(tmp_path, "*.safetensors") == {f"{ids[2][4:]}.safetensors"}


def test_full_disk_is_a_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    store = DocumentStore(tmp_path, FP, 2**20)
    kept = store.content_id("kept")
    store.put(kept, states(4))

    def full(self, path, state_format=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ContextStates, "save", full)
    with pytest.raises(StoreWriteError, match="no space") as e:
        store.put(store.content_id("new"), states(4, seed=1))
    assert e.value.full and str(tmp_path) not in str(e.value)
    assert [d.id for d in store.list()] == [kept] and _files(tmp_path, "*tmp*") == set()


def test_concurrent_puts_of_one_document_create_it_once(tmp_path):
    store = DocumentStore(tmp_path, FP, 2**20)
    doc = store.content_id("same")
    results, barrier = [], threading.Barrier(6)

    def put():
        barrier.wait()
        results.append(store.put(doc, states(8))[2])

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]


def test_memory_cache_is_a_bound_counting_cross_attention_cache(tmp_path):
    hidden = 10 * 6 * 4 + 10  # hidden states + mask of a 10-token document
    kv_per_token = 2 * 3 * 16 * 4  # keys and values of 3 layers, 16 floats each
    budget = hidden + 10 * kv_per_token + 100  # one document with its full cache fits, two do not
    store = DocumentStore(tmp_path, FP, 2**20, memory_budget_bytes=budget, kv_bytes_per_token=kv_per_token)
    small, big = store.content_id("small"), store.content_id("big")
    store.put(small, states(10))
    store.put(big, states(40, seed=1))
    store.get(small)
    assert 0 < store.memory_bytes <= budget  # counted with the cache it will hold, before it holds it
    store.get(big)  # larger than the whole budget: served, never kept
    assert store.memory_bytes <= budget and store.get(big) is not store.get(big)
    a = store.get(small)
    a.cross_cache.store(
        0, torch.zeros(1, 1, 10, 200), torch.zeros(1, 1, 10, 200), policy="cache"
    )  # more than predicted
    assert store.get(small) is a and store.memory_bytes <= budget  # served, then dropped: it no longer fits
    assert store.get(small) is not a


def _replica(root: str, seed: int, rounds: int, budget: int, out) -> None:
    """One server process's store: uploads, reads, deletes and (through the budget) evictions."""
    import random

    torch.set_num_threads(1)
    rng = random.Random(seed)
    store = DocumentStore(root, FP, budget)
    errors = []
    for _ in range(rounds):
        text = f"doc {rng.randrange(12)}"
        doc = store.content_id(text)
        action = rng.random()
        try:
            if action < 0.5:
                store.put(doc, states(8 + int(text[4:]), seed=int(text[4:])))
            elif action < 0.8:
                got = store.get(doc)
                if not torch.equal(got.hidden_states, states(8 + int(text[4:]), seed=int(text[4:])).hidden_states):
                    errors.append(f"{doc}: wrong states")
            else:
                store.delete(doc)
        except KeyError:
            pass  # deleted or evicted by the other replica: a clean 404
        except Exception as e:  # noqa: BLE001 - any other outcome is a consistency failure
            errors.append(f"{type(e).__name__}: {e}")
    out.put(errors)


def test_two_replicas_share_one_store_consistently(tmp_path):
    one = DocumentStore(tmp_path / "probe", FP, 2**20)
    one.put(one.content_id("x"), states(14))
    budget = 4 * one.info(one.content_id("x")).bytes  # room for ~4 of the 12 documents: evictions happen
    root = tmp_path / "shared"
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(str(root), seed, 120, budget, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    errors = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert errors == [[], []]
    # the folder is whole: every sidecar has its states and back, nothing half-written, under budget
    jsons = {p.stem for p in root.glob("*.json")}
    assert jsons == {p.stem for p in root.glob("*.safetensors")}
    assert _files(root, "*tmp*") == set() and not (root / "quarantine").exists()
    final = DocumentStore(root, FP, budget)
    assert {d.id[4:] for d in final.list()} == jsons and final.total_bytes <= budget
    for d in final.list():
        final.get(d.id)  # checksums verify
