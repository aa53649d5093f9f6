"""The RAG load's data: the small NQ set sent to the GPU machine (`--write-subset`) gives the same
questions, the same full-pool BM25 rankings and the same passage texts as the full set."""

from __future__ import annotations

import json
import lzma

import pytest

from cepe.serving.rag_load import read_jsonl, retrieve, write_subset

pytest.importorskip("bm25s")

TOPICS = ["river", "castle", "violin", "glacier", "volcano", "harbour", "orchard", "comet"]


def _nq(folder, n_passages: int = 60):
    """A toy NQ folder: passages about overlapping topics, questions naming two topics each."""
    folder.mkdir()
    passages = [
        {"id": f"p{i:03d}", "text": f"{TOPICS[i % 8]} {TOPICS[(i * 3) % 8]} story number {i} " + "filler " * (i % 5)}
        for i in range(n_passages)
    ]
    questions = [
        {"question": f"where is the {TOPICS[q]} near the {TOPICS[(q + 3) % 8]}?", "answers": ["x"]} for q in range(8)
    ]
    for name, rows in (("passages.jsonl", passages), ("questions.jsonl", questions)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_subset_keeps_full_pool_rankings_and_texts(tmp_path):
    full = _nq(tmp_path / "nq")
    questions, ranked, texts = retrieve(full, 5, 4)
    info = write_subset(full, tmp_path / "sub", 5, 4, extra=3)
    sub = tmp_path / "sub"
    assert sorted(p.name for p in sub.iterdir()) == ["passages.jsonl.xz", "questions.jsonl.xz"]
    q2, r2, t2 = retrieve(sub, 5, 4)
    assert (q2, r2) == (questions, ranked)
    named = {p for ids in ranked for p in ids}
    # only the named passages and the pool's first ids (the fault run's fresh uploads) travel
    assert set(t2) == named | set(sorted(texts)[:3]) and len(t2) < len(texts) == 60
    assert all(t2[p] == texts[p] for p in t2)
    assert info["passages"] == len(t2) and info["named"] == len(named)
    # fewer questions from the same subset: the first ones, same rankings
    assert retrieve(sub, 2, 3)[1] == [ids[:3] for ids in ranked[:2]]


def test_a_carried_ranking_is_used_as_is_and_must_be_long_enough(tmp_path):
    folder = _nq(tmp_path / "nq", n_passages=20)
    rows = read_jsonl(folder / "questions.jsonl")[:2]
    carried = [["p019", "p000", "p007"], ["p003", "p011", "p002"]]  # not what BM25 would return
    (folder / "questions.jsonl").write_text("".join(json.dumps({**r, "bm25": c}) + "\n" for r, c in zip(rows, carried)))
    assert retrieve(folder, 2, 3)[1] == carried
    assert retrieve(folder, 2, 2)[1] == [c[:2] for c in carried]
    with pytest.raises(ValueError, match="fewer than k = 4"):
        retrieve(folder, 2, 4)


def test_read_jsonl_prefers_the_plain_file_and_reads_xz(tmp_path):
    with lzma.open(tmp_path / "a.jsonl.xz", "wt") as f:
        f.write('{"id": 1}\n\n{"id": 2}\n')
    assert read_jsonl(tmp_path / "a.jsonl") == [{"id": 1}, {"id": 2}]
    (tmp_path / "a.jsonl").write_text('{"id": 3}\n')
    assert read_jsonl(tmp_path / "a.jsonl") == [{"id": 3}]


def test_eager_mode_runs_the_continuous_server_without_captured_steps(tmp_path):
    """Mode `eager` (continuous batching, `--cuda-graphs off`) against the captured default: the
    servers differ in that flag only, and `cepe serve` accepts what they are given."""
    from cepe.cli import build_parser
    from cepe.serving.rag_load import parse_args, server_flags

    args = parse_args(["--modes", "continuous", "eager", "--adapter", "none"])
    assert args.cuda_graphs == "auto"
    captured = server_flags(args, tmp_path, "continuous", args.cuda_graphs)
    eager = server_flags(args, tmp_path, "continuous", "off")
    assert len(captured) == len(eager) and [(a, b) for a, b in zip(captured, eager) if a != b] == [("auto", "off")]
    for flags, setting in ((captured, "auto"), (eager, "off")):
        served = build_parser().parse_args(["serve", *flags])
        assert served.cuda_graphs == setting and served.batching == "continuous"


def test_unpaced_mode_is_the_continuous_server_before_paced_joins(tmp_path):
    from cepe.cli import build_parser
    from cepe.serving.rag_load import parse_args, server_flags

    args = parse_args(["--modes", "continuous", "unpaced", "--adapter", "none"])
    paced = build_parser().parse_args(["serve", *server_flags(args, tmp_path, "continuous")])
    unpaced = build_parser().parse_args(["serve", *server_flags(args, tmp_path, "continuous", paced=False)])
    assert (paced.prefill_share, paced.switch_interval_ms) == (0.5, 0.1)  # the defaults
    assert (unpaced.prefill_share, unpaced.switch_interval_ms) == (1.0, 5.0)
    assert unpaced.batching == paced.batching == "continuous" and unpaced.cuda_graphs == paced.cuda_graphs
    flash = build_parser().parse_args(["serve", *server_flags(args, tmp_path, "continuous", sdpa="decode-order")])
    assert (paced.sdpa, unpaced.sdpa, flash.sdpa) == ("auto", "auto", "decode-order")
    process = build_parser().parse_args(["serve", *server_flags(args, tmp_path, "continuous", worker="process")])
    assert (paced.worker, process.worker) == ("thread", "process")


def test_the_plot_draws_levels_without_inter_token_gaps(tmp_path):
    """One-token answers have no gaps between tokens: the plot must still be written."""
    from cepe.serving.rag_load import plot

    level = {"clients": 1, "tokens_per_s": 3.0, "ttft_p50_s": 0.4, "ttft_p99_s": 0.5, "itl_p50_s": None,
             "itl_p99_s": None}
    result = {"k": 20, "conditions": {"lengths": "mixed", "max_tokens": 1, "cpu": "test", "device_name": None},
              "modes": [{"mode": "continuous", "levels": [level, {**level, "clients": 2}]}]}
    plot(result, tmp_path / "rag_load.png")
    assert (tmp_path / "rag_load.png").stat().st_size > 0


def test_join_summary_reads_one_modes_joins_from_its_offset(tmp_path):
    from cepe.serving.loadtest import join_summary

    log = tmp_path / "server.log"
    earlier = json.dumps({"event": "join", "size": 99, "prefill_ms": 999.0}) + "\n"
    log.write_text(earlier + "INFO: uvicorn running\n")
    offset = log.stat().st_size
    lines = [{"event": "join", "size": s, "prefill_ms": p, "wait_ms": w, "contexts_ms": 1.5}
             for s, p, w in ((1, 10.0, 0.0), (7, 30.0, 5.0), (3, 20.0, 2.0))]
    with open(log, "a") as f:
        f.write("\n".join(json.dumps(e) for e in lines) + '\n{"event": "leave", "size": 2}\n{"broken": \n')
    got = join_summary(log, offset)
    assert got["joins"] == 3  # the earlier mode's join and the other lines are not counted
    assert got["size"] == {"p50": 3, "p90": 7, "max": 7}
    assert got["prefill_ms"]["p50"] == 20.0 and got["wait_ms"]["max"] == 5.0
    assert "prefill_device_ms" not in got  # not logged: not invented
    assert join_summary(log, log.stat().st_size) is None
