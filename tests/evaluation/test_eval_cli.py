"""`cepe eval <task>` end to end from files: a tiny decoder folder with a character tokenizer."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_decoder
from eval_helpers import char_tokenizer, sentence_text

from cepe.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    dec = root / "decoder"
    tiny_decoder("llama").save_pretrained(dec)
    char_tokenizer().save_pretrained(dec)
    books = root / "books"
    books.mkdir()
    for i in range(3):
        (books / f"book{i}.txt").write_text(" ".join(sentence_text(10, 100 * i + j) for j in range(12)))
    passages = [{"id": f"p{i}", "text": sentence_text(10, 200 + i)} for i in range(6)]
    passages.append({"id": "g", "text": "The capital of Zorbia is Quux."})
    (root / "passages.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages))
    qs = [{"question": "What is the capital of Zorbia?", "answers": ["Quux"], "gold_passage": "g"}] * 2
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    rows = [{"text": sentence_text(3, 300 + i), "label": ["a_b", "c"][i % 2]} for i in range(20)]
    (root / "icl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(files, tmp_path, task: str, *extra: str) -> dict:
    common = ["--decoder", str(files / "decoder"), "--encoder", "decoder", "--init", "zero", "--chunk-size", "16",
              "--encoder-layers", "2", "--device", "cpu", "--out", str(tmp_path), "--name", "r", "--no-progress"]
    assert main(["eval", task, *extra, *common]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["task"] == task and out["data"] and out["timings"]["total_s"] >= 0
    assert out["code_version"] and out["environment"]["device"] == "cpu" and out["model"]["init"] == "zero"
    return out


def test_cli_ppl(files, tmp_path, capsys):
    out = _run(files, tmp_path, "ppl", "--data", str(files / "books"), "-D", "32", "-W", "16",
               "--total-tokens", "32,64,128", "--max-docs", "2", "--stream-window", "32")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert out["data"]["files"] == 3 and len(out["data"]["sha256"]) == 64 and out["data"]["documents"] == 2
    assert set(out["results"]["methods"]) == {"cepe", "truncated", "full", "streamingllm", "replug"}
    assert out["results"]["checks"]["cepe_vs_truncated_max_abs_loglik_diff"] == 0
    printed = capsys.readouterr().out
    assert "method \\ total tokens" in printed and "cepe_vs_truncated" in printed


def test_cli_rag_lm(files, tmp_path):
    out = _run(files, tmp_path, "rag-lm", "--data", str(files / "books" / "book0.txt"), "--corpus",
               str(files / "books"), "-D", "32", "-W", "16", "--k", "0,2", "--passage-tokens", "40")
    assert (tmp_path / "r.png").is_file()
    assert out["results"]["methods"]["cepe"]["2"]["passages_read"] == 2
    # the scored book is in the corpus folder too: its own passages are never retrieved for it
    windows = out["results"]["windows"]
    assert windows and all(w["document"] == "book0.txt" for w in windows)
    sources = {src for w in windows for _, _, src in w["passages"]}
    assert sources and "book0.txt" not in sources and sources <= {"books/book1.txt", "books/book2.txt"}


def test_cli_qa_icl_passkey(files, tmp_path):
    out = _run(files, tmp_path, "qa", "--questions", str(files / "questions.jsonl"), "--passages",
               str(files / "passages.jsonl"), "-m", "1", "-k", "2", "--max-new-tokens", "3", "--max-examples", "1")
    assert out["data"]["examples"] == 1 and set(out["results"]["methods"]["cepe"]) >= {"em", "f1", "substring"}
    out = _run(files, tmp_path, "icl", "--data", str(files / "icl.jsonl"), "--demos", "4", "--decoder-demos", "1",
               "--max-examples", "3")
    assert out["results"]["test_examples"] == 3
    out = _run(files, tmp_path, "icl", "--data", str(files / "icl.jsonl"), "--demos", "2,4", "--decoder-demos", "1",
               "--max-examples", "3")
    assert list(out["results"]["demos"]) == ["2", "4"] and (tmp_path / "r.png").stat().st_size > 1000
    out = _run(files, tmp_path, "icl", "--data", str(files / "icl.jsonl"), "--demos", "2,4", "--decoder-demos", "1",
               "--max-examples", "3", "--demo-seeds", "1,2")
    assert list(out["results"]["demo_seeds"]) == ["1", "2"]
    assert len(out["results"]["demos"]["4"]["methods"]["cepe"]["accuracy_raw_by_seed"]) == 2
    out = _run(files, tmp_path, "qa", "--questions", str(files / "questions.jsonl"), "--passages",
               str(files / "passages.jsonl"), "-m", "1", "-k", "1,2", "--max-new-tokens", "3", "--max-examples", "2")
    assert list(out["results"]["k"]) == ["1", "2"] and "best_decoder_only" in out["results"]["comparison"]
    assert out["model"]["cross_attn_topk"] is None  # recorded even when the adapter's own setting ran
    out = _run(files, tmp_path, "passkey", "--lengths", "300", "--depths", "0,1", "--trials", "1", "-D", "64",
               "--methods", "cepe,truncated", "--cross-attn-topk", "8")
    assert (tmp_path / "r.png").is_file() and len(out["results"]["methods"]["cepe"]["grid_depth_by_length"]) == 2
    assert out["model"]["cross_attn_topk"] == 8  # the run's setting is recorded with its results


def test_cli_qa_merge(files, tmp_path, capsys):
    """Sweeps run apart (k = 1,2 then k = 3) merge into what one sweep over k = 1,2,3 gives."""
    qa = ["--questions", str(files / "questions.jsonl"), "--passages", str(files / "passages.jsonl"), "-m", "1",
          "--max-new-tokens", "3", "--max-examples", "2"]
    whole = _run(files, tmp_path / "whole", "qa", *qa, "-k", "1,2,3")
    _run(files, tmp_path / "a", "qa", *qa, "-k", "1,2")
    _run(files, tmp_path / "b", "qa", *qa, "-k", "3,2", "--max-new-tokens", "3")
    # overlapping k's are refused
    args = ["eval", "qa-merge", str(tmp_path / "a" / "r.json"), str(tmp_path / "b" / "r.json"), "--out", str(tmp_path)]
    assert main(args) == 2 and "k = 2 is in more than one" in capsys.readouterr().err
    _run(files, tmp_path / "b", "qa", *qa, "-k", "3")
    assert main([*args, "--name", "m"]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert list(merged["results"]["k"]) == ["1", "2", "3"] and (tmp_path / "m.png").stat().st_size > 1000
    assert merged["results"]["k"] == whole["results"]["k"]
    assert merged["results"]["comparison"] == whole["results"]["comparison"]
    assert merged["config"]["encoder_passages"] == [1, 2, 3] and len(merged["config"]["merged_from"]) == 2
    assert "best decoder-only" in capsys.readouterr().out
    # different questions are refused, naming what differs
    _run(files, tmp_path / "c", "qa", *qa[:-1], "1", "-k", "5,6")
    assert (
        main(
            ["eval", "qa-merge", str(tmp_path / "a" / "r.json"), str(tmp_path / "c" / "r.json"), "--out", str(tmp_path)]
        )
        == 2
    )
    assert "number of questions" in capsys.readouterr().err


def test_cli_qa_partial(files, tmp_path, monkeypatch):
    """A sweep that stops part way leaves the k's it finished in its JSON, marked partial."""
    from cepe.evaluation.tasks import qa

    calls = []
    real = qa.run

    def stop_at_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(qa, "run", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        main(
            ["eval", "qa", "--questions", str(files / "questions.jsonl"), "--passages", str(files / "passages.jsonl"),
             "-k", "1,2,3", "--max-new-tokens", "3", "--max-examples", "2", "--decoder", str(files / "decoder"),
             "--encoder", "decoder", "--init", "zero", "--chunk-size", "16", "--encoder-layers", "2", "--device", "cpu",
             "--out", str(tmp_path), "--name", "r", "--no-progress"]
        )
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["data"]["partial"] is True and list(out["results"]["k"]) == ["1", "2"]
    assert "best_decoder_only" in out["results"]["comparison"]


def test_cli_errors(files, tmp_path, capsys):
    base = ["--decoder", str(files / "decoder"), "--out", str(tmp_path), "--no-progress"]
    assert main(["eval", "ppl", "--data", str(tmp_path / "missing"), *base]) == 2
    assert "missing" in capsys.readouterr().err
    # a plain decoder (no adapter, no --init) cannot run the cepe method, but runs the baselines
    assert main(["eval", "ppl", "--data", str(files / "books"), "--methods", "cepe", *base]) == 2
    assert "CEPE model" in capsys.readouterr().err
    assert main(["eval", "ppl", "--data", str(files / "books"), "--methods", "truncated,full", "-D", "32", "-W", "8",
                 "--total-tokens", "32,48", "--name", "plain", *base]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert main(["eval", "qa", "--questions", str(bad), "--passages", str(bad), *base]) == 2
    assert "bad.jsonl:1: missing field" in capsys.readouterr().err


def test_cli_adapter(files, tmp_path):
    """--adapter DIR loads a saved adapter onto its base decoder (recorded in the adapter, or --decoder)."""
    from cepe import CepeForCausalLM

    adapter = tmp_path / "adapter"
    model = CepeForCausalLM.from_base(str(files / "decoder"), None, chunk_size=16, cross_attn_init="zero",
                                      encoder_num_layers=2)
    model.save_pretrained(adapter)
    args = ["eval", "ppl", "--data", str(files / "books"), "-D", "32", "-W", "16", "--total-tokens", "32,64",
            "--methods", "cepe,truncated", "--out", str(tmp_path), "--name", "a", "--no-progress", "--adapter",
            str(adapter)]
    assert main(args) == 0
    out = json.loads((tmp_path / "a.json").read_text())
    assert out["model"]["adapter"] == str(adapter) and out["model"]["decoder"] == str(files / "decoder")
    assert out["results"]["checks"]["cepe_vs_truncated_max_abs_loglik_diff"] == 0
    assert main(args + ["--init", "zero"]) == 2  # one or the other


def test_cli_compare_adapter(files, tmp_path):
    """--compare-adapter NAME=DIR runs a second adapter on the same decoder instance: each
    adapter scores exactly what it scores alone (the other's hooks stay out of its way)."""
    import torch

    from cepe import CepeForCausalLM

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = CepeForCausalLM.from_base(str(files / "decoder"), None, chunk_size=16, cross_attn_init="copy",
                                          encoder_num_layers=2)
        with torch.no_grad():
            for p in model.adapter_parameters():
                p.add_(0.05 * torch.randn_like(p))
        folders.append(tmp_path / f"adapter{seed}")
        model.save_pretrained(folders[-1])
    base = ["eval", "ppl", "--data", str(files / "books"), "-D", "32", "-W", "16", "--total-tokens", "32,64",
            "--methods", "cepe", "--out", str(tmp_path), "--no-progress"]
    assert (
        main(base + ["--name", "both", "--adapter", str(folders[0]), "--compare-adapter", f"other={folders[1]}"]) == 0
    )
    assert main(base + ["--name", "one", "--adapter", str(folders[0])]) == 0
    assert main(base + ["--name", "two", "--adapter", str(folders[1])]) == 0
    res = {n: json.loads((tmp_path / f"{n}.json").read_text())["results"]["methods"] for n in ("both", "one", "two")}
    assert list(res["both"]) == ["cepe", "other"]
    assert res["both"]["cepe"]["32"]["ppl"] == res["both"]["other"]["32"]["ppl"]  # no context: the decoder alone
    assert res["both"]["cepe"]["32"]["ppl"] == res["one"]["cepe"]["32"]["ppl"]
    assert res["both"]["cepe"]["64"]["ppl"] == res["one"]["cepe"]["64"]["ppl"]
    assert res["both"]["other"]["64"]["ppl"] == res["two"]["cepe"]["64"]["ppl"]
    assert res["one"]["cepe"]["64"]["ppl"] != res["two"]["cepe"]["64"]["ppl"]
    assert main(base + ["--name", "x", "--adapter", str(folders[0]), "--compare-adapter", "nodir"]) == 2


def test_cli_ruler(files, tmp_path, capsys):
    """`cepe eval ruler`: every method, scores per task and length, a heatmap, effective lengths;
    `full` (a 512-token decoder) fits only the shortest prompt; --haystack takes a text file."""
    out = _run(files, tmp_path, "ruler", "--tasks", "niah_single,fwe", "--lengths", "700,1000", "--samples", "1",
               "-D", "64", "--max-new-tokens", "4", "--haystack", str(files / "books" / "book0.txt"))
    res = out["results"]
    assert (tmp_path / "r.png").stat().st_size > 1000 and out["data"]["files"] == 1 and "partial" not in out["data"]
    assert (
        set(res["methods"]) == {"cepe", "truncated", "full", "streamingllm", "replug"}
        and res["haystack"] == "book0.txt"
    )
    assert res["methods"]["full"]["average"] == {"700": None, "1000": None}
    assert res["does_not_fit"]["full"] == ["niah_single@1000", "fwe@700", "fwe@1000"]
    cepe, truncated = res["methods"]["cepe"], res["methods"]["truncated"]
    assert cepe["scores"] == truncated["scores"]  # zero init: CEPE is the truncated decoder
    assert all(0 <= v <= 100 for t in ("niah_single", "fwe") for v in cepe["scores"][t].values())
    assert res["max_new_tokens"] == {"niah_single": 4, "fwe": 4} and 600 < res["prompt_tokens"]["fwe"]["1000"] <= 950
    printed = capsys.readouterr().out
    assert "effective length" in printed and "full - (did not fit)" in printed and "average" in printed
    assert main(["eval", "ruler", "--tasks", "nope", "--decoder", str(files / "decoder"), "--out", str(tmp_path)]) == 2
