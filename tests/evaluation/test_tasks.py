"""Each task end to end on tiny random models (a character tokenizer): shapes, bookkeeping, layouts."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_cepe
from eval_helpers import char_tokenizer, random_ids, sentence_text

from cepe.evaluation.methods import build_methods
from cepe.evaluation.retrieval import BM25Retriever
from cepe.evaluation.tasks import icl, passkey, ppl, qa, rag_lm
from cepe.evaluation.tasks.common import fitting_prefix


@pytest.fixture(scope="module")
def model():
    return tiny_cepe("llama", "decoder", init="zero")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_window_ends_and_fitting():
    assert ppl.window_ends(100, 40, 1) == [100]
    assert ppl.window_ends(100, 40, 3) == [40, 70, 100]
    assert ppl.window_ends(30, 40, 2) == []
    assert fitting_prefix([[1, 2], [3], [4, 5, 6]], 3) == [[1, 2], [3]]
    assert fitting_prefix([[1, 2]], 1) == []


def test_ppl_run(model):
    methods = build_methods(["cepe", "truncated", "full", "streamingllm", "replug"], model, window=16,
                            full_max_length=40, replug_chunk_tokens=16)
    docs = [("a", random_ids(90, 1)), ("b", random_ids(70, 2)), ("short", random_ids(20, 3))]
    s = ppl.PplSettings(decoder_tokens=16, scored_tokens=8, context_tokens=[0, 8, 24, 48], windows_per_doc=2)
    out = ppl.run(methods, docs, s, progress=False)
    assert out["skipped_documents"] == ["short"]
    assert len(out["windows"]) == 4
    assert out["checks"]["cepe_vs_truncated_max_abs_loglik_diff"] == 0.0
    assert out["does_not_fit"] == {"full": [48]}  # 16 + 48 > 40
    res = out["methods"]
    for name in methods:
        for total, row in res[name].items():
            if name == "full" and total == "64":
                assert row["tokens"] == 0 and math.isnan(row["ppl"])
            else:
                assert row["tokens"] == 4 * 8 and row["ppl"] > 1
    # with no context every method is the truncated decoder on the same scored tokens
    for name in methods:
        assert res[name]["16"]["ppl"] == pytest.approx(res["truncated"]["16"]["ppl"], rel=1e-5)
    assert len({res["truncated"][t]["ppl"] for t in res["truncated"]}) == 1
    header, rows = ppl.table(out, s)
    assert header[1:] == ["16", "24", "40", "64"] and len(rows) == 5


def test_ppl_settings_errors():
    with pytest.raises(ValueError, match="scored tokens"):
        ppl.PplSettings(decoder_tokens=8, scored_tokens=8)
    with pytest.raises(ValueError, match="needs"):
        ppl.run({}, [("a", [1, 2, 3])], ppl.PplSettings(16, 8, [0]), progress=False)


def test_rag_lm_run(model, tok):
    corpus = [(f"c{i}", tok(sentence_text(40, 10 + i), add_special_tokens=False)["input_ids"]) for i in range(4)]
    docs = [("c0", tok(sentence_text(30, 10), add_special_tokens=False)["input_ids"])]
    passages = rag_lm.make_passages(corpus, tok, 50)
    retriever = BM25Retriever([p.text for p in passages])
    methods = build_methods(["cepe", "truncated", "full", "replug"], model, full_max_length=48 + 2 * 50 + 10)
    s = rag_lm.RagSettings(decoder_tokens=48, scored_tokens=16, ks=[0, 1, 3])
    out = rag_lm.run(methods, docs, passages, retriever, s, tok, progress=False)
    res = out["methods"]
    assert res["cepe"]["3"]["passages_read"] == 3 and res["replug"]["3"]["passages_read"] == 3
    assert res["full"]["3"]["passages_read"] == 2  # only two 50-token passages fit its budget
    assert res["truncated"]["3"]["passages_read"] == 0
    # the scored document's own passages are never retrieved
    assert all(src == passages[i].source != "c0" for w in out["windows"] for i, _, src in w["passages"])
    assert res["cepe"]["3"]["ppl"] == pytest.approx(res["truncated"]["3"]["ppl"], rel=1e-6)  # zero init
    for k in ("0", "1", "3"):
        assert res["full"][k]["tokens"] == 16


def _qa_data():
    passages = [{"id": f"p{i}", "text": sentence_text(12, 30 + i)} for i in range(8)]
    passages.append({"id": "gold", "text": "The capital of Zorbia is Quux city."})
    questions = [{"question": "What is the capital of Zorbia?", "answers": ["Quux"], "gold_passage": "gold"},
                 {"question": "Which river is silver?", "answers": ["apple river"], "gold_passage": "p1"}]
    return questions, passages


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_qa_run(model, tok, style):
    questions, passages = _qa_data()
    retriever = BM25Retriever([p["text"] for p in passages])
    methods = build_methods(["cepe", "truncated", "full", "replug", "streamingllm"], model, window=64,
                            full_max_length=200)
    s = qa.QaSettings(decoder_passages=1, encoder_passages=3, prompt=style, max_new_tokens=4)
    out = qa.run(methods, questions, passages, retriever, s, tok, progress=False)
    assert out["retrieval_recall"]["gold@1"] == 0.5 or out["retrieval_recall"]["gold@4"] >= 0.5
    for r in out["methods"].values():
        assert 0 <= r["em"] <= r["substring"] + 1e-9 or r["em"] <= 1
        assert 0 <= r["f1"] <= 1
    assert out["methods"]["cepe"]["passages_read"] == 4 and out["methods"]["truncated"]["passages_read"] == 1
    assert out["methods"]["replug"]["passages_read"] == 4
    # zero-init CEPE answers exactly like its decoder alone
    assert [e["cepe"] for e in out["examples"]] == [e["truncated"] for e in out["examples"]]
    assert len(out["examples"]) == 2


def test_qa_batched_sweep_equals_single_runs(model, tok):
    """A k sweep answered 3 questions per batch gives each k what a one-at-a-time run gives;
    the decoder-only `truncated` is answered once and reused; the comparison names the best
    decoder-only setting and a bootstrap interval around CEPE's difference from it."""
    questions, passages = _qa_data()
    questions = questions * 3  # 6 questions: two batches of 3
    retriever = BM25Retriever([p["text"] for p in passages])
    methods = build_methods(["cepe", "truncated", "full", "replug"], model, full_max_length=200)
    s = qa.QaSettings(decoder_passages=1, encoder_passages=0, prompt="plain", max_new_tokens=4)
    sweep = qa.run_sweep(methods, questions, passages, retriever, s, [1, 3], tok, progress=False, batch_size=3,
                         keep_examples=2)
    for k in (1, 3):
        single = qa.run(methods, questions, passages, retriever, qa.QaSettings(1, k, "plain", 4), tok, progress=False)
        got = sweep["k"][str(k)]
        assert got["methods"] == single["methods"]
        assert len(got["examples"]) == 2 and got["examples"] == single["examples"][:2]
        assert len(got["methods"]["cepe"]["substring_hits"]) == 6
    cmp = sweep["comparison"]
    assert cmp["best_decoder_only"]["setting"].split("@")[0] in ("truncated", "full")
    diff, lo, hi = cmp["cepe@k=3"]["minus_best"], *cmp["cepe@k=3"]["ci95"]
    assert lo <= diff <= hi


def test_batches_respect_count_and_token_budget():
    lengths, rows = [10, 50, 20, 40, 30], [1, 1, 4, 1, 1]
    assert qa.batches(lengths, rows, 2, None) == [[1, 3], [4, 2], [0]]  # longest first, 2 a batch
    # 100 padded tokens: 50 and 40 -> 2 x 50 fits, a third row would make 3 x 50; then 30 + the
    # 4-row (REPLUG-like) request would be 5 x 30; that request + the 10-token one is 5 x 20
    assert qa.batches(lengths, rows, 8, 100) == [[1, 3], [4], [2, 0]]
    assert qa.batches([500], [1], 8, 100) == [[0]]  # over budget on its own: still answered
    every = [i for b in qa.batches(lengths, rows, 3, 120) for i in b]
    assert sorted(every) == list(range(5))


def test_paired_difference():
    diff, lo, hi = qa.paired_difference("1111100000", "0000000000")
    assert diff == 0.5 and 0.1 <= lo <= 0.5 <= hi <= 0.9
    assert qa.paired_difference("1010", "1010") == (0.0, 0.0, 0.0)


def test_qa_prompt_parts(tok):
    head, tail = qa.prompt_parts(tok, "why?", "chat")
    assert head.startswith("<user>") and tail.endswith("</user>\n<assistant>") and "Question: why?" in tail
    assert qa.prompt_parts(tok, " why? ", "plain") == ("", "Question: why?\nAnswer:")


def test_icl_run(model, tok):
    rows = [{"text": sentence_text(4, 50 + i), "label": "pos_thing" if i % 2 else "neg"} for i in range(30)]
    methods = build_methods(["cepe", "truncated", "full", "replug"], model, full_max_length=150)
    s = icl.IclSettings(demos=8, decoder_demos=2, seed=1)
    out = icl.run(methods, rows, s, tok, max_examples=5, progress=False)
    assert out["test_examples"] == 5 and out["labels"] == ["neg", "pos_thing"]
    res = out["methods"]
    assert res["cepe"]["demos_read"] == 8 and res["truncated"]["demos_read"] == 2 and res["replug"]["demos_read"] == 8
    assert 0 < res["full"]["demos_read"] < 8  # only some fit 150 tokens
    assert out["predictions"]["cepe"] == out["predictions"]["truncated"]  # zero init
    for r in res.values():
        assert 0 <= r["accuracy_raw"] <= 1 and 0 <= r["accuracy_normalized"] <= 1
    test, demos = icl.split(rows, s, 5)
    assert not {id(r) for r in test} & {id(r) for r in demos}
    assert icl.format_demo({"text": "a  b", "label": "x_y"}) == "Input: a b\nLabel: x y\n\n"


def test_icl_calibration_removes_a_label_prior(model, tok, monkeypatch):
    """A method that reads the input but favours one label by a constant: raw accuracy is that
    label's share, calibrated accuracy (minus the content-free input's log-likelihoods) is 1."""
    rows = [{"text": ("alpha" if i % 3 else "beta") + f" {i}", "label": "a" if i % 3 else "b"} for i in range(30)]

    def fake(method, req, candidates):
        query = tok.decode(req.tokens).rsplit("Input: ", 1)[1]
        signal = [float(query.startswith(w)) for w in ("alpha", "beta")] if "N/A" not in query else [0.0, 0.0]
        return [(sig + (10.0 if label == "b" else 0.0), 1) for sig, label in zip(signal, ("a", "b"))]

    monkeypatch.setattr(icl, "label_log_likelihoods", fake)
    out = icl.run(build_methods(["truncated"], model), rows, icl.IclSettings(4, 2), tok, progress=False)
    r, gold = out["methods"]["truncated"], out["gold"]
    assert r["accuracy_raw"] == gold.count("b") / len(gold) < 0.5 and r["accuracy_calibrated"] == 1.0
    assert out["label_prior"]["truncated"] == [0.0, 10.0] and set(out["predictions"]["truncated"]) == {"b"}
    assert icl.table(out)[0][3] == "acc (calibrated)"


def test_icl_sweep_uses_one_test_set_and_nested_demos(model, tok):
    rows = [{"text": sentence_text(4, 80 + i), "label": "pos_thing" if i % 3 else "neg"} for i in range(30)]
    methods = build_methods(["cepe", "truncated"], model)
    s = icl.IclSettings(demos=4, decoder_demos=2, seed=3)
    out = icl.run_sweep(methods, rows, s, [6, 4], tok, max_examples=30, progress=False)
    assert list(out["demos"]) == ["4", "6"]
    assert out["demos"]["4"]["gold"] == out["demos"]["6"]["gold"] and len(out["demos"]["4"]["gold"]) == 24
    single = icl.run(methods, rows, s, tok, max_examples=30, progress=False, reserve=6)
    assert single["methods"] == out["demos"]["4"]["methods"]
    t4, d4 = icl.split(rows, s, 30, reserve=6)
    t6, d6 = icl.split(rows, icl.IclSettings(6, 2, 3), 30, reserve=6)
    assert t4 == t6 and d6[:4] == d4
    header, table_rows = icl.table(out)
    assert header[0] == "N" and len(table_rows) == 4


def test_icl_demo_seeds_draw_other_sets_for_one_test_set_and_average(model, tok):
    rows = [{"text": sentence_text(4, 120 + i), "label": "pos_thing" if i % 3 else "neg"} for i in range(30)]
    s = icl.IclSettings(demos=4, decoder_demos=2, seed=3)
    t0, d0 = icl.split(rows, s, 10, reserve=6)
    t1, d1 = icl.split(rows, icl.IclSettings(4, 2, 3, demo_seed=1), 10, reserve=6)
    t1_6, d1_6 = icl.split(rows, icl.IclSettings(6, 2, 3, demo_seed=1), 10, reserve=6)
    assert t0 == t1 == t1_6 and d0 != d1 and d1_6[:4] == d1  # same test set; another, still nested, set
    assert not {id(r) for r in t1} & {id(r) for r in d1_6}
    methods = build_methods(["cepe", "truncated"], model)
    out = icl.run_demo_seeds(methods, rows, s, [4, 6], [1, 2], tok, max_examples=10, progress=False)
    assert list(out["demo_seeds"]) == ["1", "2"] and list(out["demos"]) == ["4", "6"]
    for n in ("4", "6"):
        per = [out["demo_seeds"][k]["demos"][n]["methods"]["cepe"]["accuracy_raw"] for k in ("1", "2")]
        r = out["demos"][n]["methods"]["cepe"]
        assert r["accuracy_raw_by_seed"] == per and abs(r["accuracy_raw"] - sum(per) / 2) < 1e-12
        assert out["demos"][n]["gold"] == out["demo_seeds"]["1"]["demos"][n]["gold"]
    assert icl.table(out)[0][0] == "N"
    with pytest.raises(ValueError, match="empty"):
        icl.run_demo_seeds(methods, rows, s, [4], [], tok)


def test_icl_encoder_layouts(model):
    """packed: CEPE's encoder demonstrations as one running text; per-demo: one document each;
    both count every demonstration as read, and the decoder's part is the same."""
    cepe = build_methods(["cepe"], model)["cepe"]
    demos, query = [[3, 4], [5, 6, 7], [8], [9, 10]], [11, 12]
    packed, n_packed = icl.make_request(cepe, demos, query, icl.IclSettings(demos=4, decoder_demos=1), 2)
    each, n_each = icl.make_request(cepe, demos, query, icl.IclSettings(4, 1, encoder_layout="per-demo"), 2)
    assert packed.context == [[3, 4, 5, 6, 7, 8]] and each.context == [[3, 4], [5, 6, 7], [8]]
    assert packed.tokens == each.tokens == [9, 10, 11, 12] and n_packed == n_each == 4
    with pytest.raises(ValueError, match="encoder_layout"):
        icl.IclSettings(encoder_layout="nope")


def test_passkey_prompt_and_run(model, tok):
    intro, body = passkey.build_prompt(tok, 700, 0.5, "12345")
    text = tok.decode(body)
    assert tok.decode(intro) == passkey.INTRO
    assert "The pass key is 12345" in text and text.endswith("The pass key is")
    assert abs(len(intro) + len(body) - 700) < len(passkey.FILLER) + 1
    early, late = (tok.decode(passkey.build_prompt(tok, 700, d, "12345")[1]).index("12345") for d in (0.0, 1.0))
    assert early < late
    req = passkey.make_request(intro, body, passkey.PasskeySettings(decoder_tokens=64))
    assert req.prefix == intro and req.tokens == body[-64:] and req.context == [body[:-64]]
    methods = build_methods(["cepe", "truncated", "full", "streamingllm", "replug"], model, window=32,
                            full_max_length=200, replug_chunk_tokens=32)
    s = passkey.PasskeySettings(lengths=[150, 250], depths=[0.0, 1.0], trials=1, decoder_tokens=32, max_new_tokens=3)
    out = passkey.run(methods, s, tok, progress=False)
    for name, r in out["methods"].items():
        grid = r["grid_depth_by_length"]
        assert len(grid) == 2 and len(grid[0]) == 2
        if name == "full":
            assert math.isnan(grid[0][1])  # 250 tokens do not fit 200
    # every generated answer is kept (one per cell that fit, trials=1), scored as the grid counts it
    for name, r in out["methods"].items():
        kept = [x["correct"] for x in out["samples"] if x["method"] == name]
        assert len(kept) == sum(not math.isnan(v) for row in r["grid_depth_by_length"] for v in row)
        if kept:
            assert sum(kept) / len(kept) == r["accuracy"]
    assert sum(x["method"] == "cepe" for x in out["samples"]) == 4
    header, rows = passkey.table(out)
    assert header[-1] == "all" and len(rows) == 5


def test_passkey_long_filler_is_read_to_the_length_not_repeated_whole(tok):
    # a book as filler is longer than the prompt: it must be cut to the length, with the needle at
    # its depth (a whole-book unit once gave 0 units: the needle sat next to the question)
    book = " ".join(f"Sentence number {i} of the long book goes on." for i in range(400))
    for length in (900, 1500):  # bytes as tokens
        depths = []
        for d in (0.1, 0.5, 0.9):
            intro, body = passkey.build_prompt(tok, length, d, "12345", filler=book)
            assert abs(len(intro) + len(body) - length) <= 1
            text = tok.decode(body)
            assert text.endswith(passkey.QUESTION) and text.startswith("Sentence number 0")
            depths.append(text.index("The pass key is 12345") / len(text))
            assert text[: text.index("The pass key")].rstrip().endswith(".")  # starts a sentence
        assert depths[0] < 0.2 and 0.4 < depths[1] < 0.6 and depths[2] > 0.75, depths
    short = passkey.build_prompt(tok, 300, 0.5, "12345", filler="Tiny. ")
    assert tok.decode(short[1]).count("Tiny.") > 10  # a short filler still repeats in whole units


def test_passkey_book_trials_start_at_their_own_sentences(tok):
    # every trial read the book from its start: a length's trials shared one decoder window, and that
    # window's reading decided the column; now each starts at a sentence of its own, keys unchanged
    book = " ".join(f"Sentence number {i} of the long book goes on." for i in range(400))
    late = tok.decode(passkey.build_prompt(tok, 900, 0.5, "12345", filler=book, start=0.5)[1])
    assert late.lstrip().startswith("Sentence number 2") and "The pass key is 12345" in late  # ~half of 400
    assert len(passkey.build_prompt(tok, 900, 0.5, "12345", filler=book, start=0.99)[1]) == 900 - len(
        passkey.build_prompt(tok, 900, 0.5, "12345", filler=book)[0])  # cycles past the end to the length

    class Echo:  # answers with the first "Sentence number N" of its decoder window
        def generate(self, req, n, stops):
            first = tok.decode(req.tokens).split("Sentence number ")[1].split()[0]
            return tok(first, add_special_tokens=False)["input_ids"]

    s = passkey.PasskeySettings(lengths=[900], depths=[0.5], trials=4, decoder_tokens=200, max_new_tokens=3)
    varied = passkey.run({"echo": Echo()}, s, tok, filler=book, progress=False)["samples"]
    same = passkey.run({"echo": Echo()}, passkey.PasskeySettings(**{**vars(s), "vary_start": False}), tok,
                       filler=book, progress=False)["samples"]
    assert len({x["answer"] for x in varied}) == 4 and len({x["answer"] for x in same}) == 1
    assert [x["key"] for x in varied] == [x["key"] for x in same]


def test_cepe_on_hf_encoder_uses_text(tok):
    """With an HF encoder, CEPE decodes the context to text and re-tokenizes it with the encoder's
    tokenizer (here the same character tokenizer)."""
    from cepe.evaluation.methods import Cepe

    model = tiny_cepe("llama", "bert", init="copy")
    model.tokenizer, model.encoder_tokenizer = tok, tok
    seen = []
    cepe = Cepe(model)
    original = model.tokenize_context
    model.tokenize_context = lambda docs: (seen.extend(docs), original(docs))[1]
    from cepe.evaluation.scoring import Request, score

    ctx = tok("some context.", add_special_tokens=False)["input_ids"]
    out = score(cepe, Request(tokens=random_ids(10, 3, high=70), context=[ctx], score_start=5))
    assert seen == ["some context."] and torch.isfinite(out).all()
