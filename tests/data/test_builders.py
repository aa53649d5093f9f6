"""Variable windows, same-source retrieval, copying and demonstration samples on a small mix laid
out as `cepe data build` writes it (OUT/train/<category>/<source>.jsonl)."""

from __future__ import annotations

import json
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from cepe.data import Collator, DataConfig, build_data, byte_tokenizer
from cepe.data.builders import category_of, source_of
from cepe.data.builders.facts import SEPARATORS, _distractors, _repeated
from cepe.data.builders.demonstrations import label_words
from cepe.data.config import CopyingConfig, FactsConfig, RetrievalConfig

VOCAB = [f"{a}{b}{c}" for a in "bcdfglmnprstvz" for b in "aeiou" for c in ("n", "r", "st", "ll", "mo")]


def _doc(rng: np.random.Generator, n_words: int, records: bool) -> str:
    """Random words (no phrase repeats by chance), code-like `key = value` lines in some."""
    lines = []
    while sum(len(x.split()) for x in lines) < n_words:
        if records and rng.random() < 0.3:
            lines.append(f"{rng.choice(VOCAB)}_{rng.integers(1000)} = {' '.join(rng.choice(VOCAB, 3))}")
        else:
            lines.append(" ".join(rng.choice(VOCAB, int(rng.integers(6, 16)))) + ".")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    for category, sources in {
        "books": ["austen", "melville"],
        "code": ["python", "ruby"],
        "reference": ["wiki"],
    }.items():
        for source in sources:
            path = root / "train" / category / f"{source}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [
                {"source": source, "title": f"{source} {i}", "text": _doc(rng, 900, category == "code")}
                for i in range(3)
            ]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _data(tmp_path, mix, **kw):
    base = {"train": [str(mix / "train")], "cache_dir": str(tmp_path / "cache"), "context_tokens": 1024,
            "min_context_tokens": 64, "decoder_tokens": 256, "extensions": [".jsonl"]}
    base.update(kw)
    tok = byte_tokenizer()
    return build_data(DataConfig(**base), tok, tok, progress=False), tok


def test_names_give_source_and_category():
    assert source_of("train/books/austen.jsonl:3") == "train/books/austen.jsonl"
    assert category_of("train/books/austen.jsonl:3") == "books"
    assert source_of("austen/emma.txt") == "austen" and category_of("python3.11/json/decoder.py") == "python3.11"


def test_variable_windows_per_block_and_context_lengths(tmp_path, mix):
    data, _ = _data(tmp_path, mix, decoder_windows=[64, 128, 256], window_block=4, context_draw="uniform",
                    mixture={"long_document": 1.0})
    seen, ctx = set(), []
    for block in range(12):
        lens = {len(data.train[4 * block + j]["input_ids"]) for j in range(4)}
        assert len(lens) == 1 and lens <= {64, 128, 256}  # one window per block: no padding in a batch
        seen |= lens
        ctx += [len(data.train[4 * block + j]["context"][0]) for j in range(4)]
    assert seen == {64, 128, 256}
    assert 64 <= min(ctx) and max(ctx) <= 1024 and np.std(ctx) > 50  # drawn, not always the maximum
    assert data.train.window_of(5) == len(data.train[5]["input_ids"])


def test_block_context_draw_shares_the_length_within_a_micro_batch(tmp_path, mix):
    kw = {"decoder_windows": [64, 128], "window_block": 4, "mixture": {"long_document": 1.0, "facts": 1.0},
          "facts": FactsConfig(context_tokens=[64, 1024])}
    uniform, _ = _data(tmp_path, mix, context_draw="uniform", **kw)
    block, _ = _data(tmp_path, mix, context_draw="block", **kw)

    def spread(data):
        """Mean range of log context lengths within a block, and over all samples."""
        logs = np.log([[len(data.train[4 * b + j]["context"][0]) for j in range(4)] for b in range(40)])
        return np.mean(logs.max(1) - logs.min(1)), logs.max() - logs.min()

    (u_in, u_all), (b_in, b_all) = spread(uniform), spread(block)
    assert b_all > 0.5 * u_all  # blocks still range over short and long contexts ...
    assert b_in < 0.35 * u_in  # ... but a block's contexts are alike (only a document's start cuts one short)
    for i in (3, 17, 50):  # the window and everything drawn after the length stay where they were
        a, b = uniform.train[i], block.train[i]
        assert a["kind"] == b["kind"] and (a["input_ids"] == b["input_ids"]).all()
    with pytest.raises(ValueError, match="context_draw"):
        DataConfig(train=["x"], context_draw="blocks").validate()


def test_context_fill_reads_the_drawn_length_instead_of_cutting_it(tmp_path, mix):
    kw = {"decoder_windows": [64, 128], "window_block": 4, "context_draw": "uniform", "context_tokens": 4096,
          "mixture": {"long_document": 1.0, "facts": 1.0}, "facts": FactsConfig(context_tokens=[64, 4096])}
    cut, _ = _data(tmp_path, mix, **kw)
    fill, _ = _data(tmp_path, mix, context_fill=True, **kw)
    builder = fill.train.builders["long_document"]

    def lengths(data):
        return np.array([len(data.train[i]["context"][0]) for i in range(400)])

    short, full = lengths(cut), lengths(fill)
    # log-uniform in 64-4096: a sixth of the draws are >= 2048 tokens; filled, about that many are
    # read whole (these documents are short: a few hold less); cut where the window fell, fewer
    assert 0.12 < (full >= 2048).mean() < 0.22 and (full >= 2048).mean() > 1.3 * (short >= 2048).mean()
    assert full.max() <= 4096
    # every window of the table for 2,048 has at least that much text before it
    docs, first, cum = builder.table_for_context(64, 3000)
    rng = np.random.default_rng(0)
    for _ in range(20):
        doc, p = builder.pick_window(rng, 64, (docs, first, cum))
        before = builder.corpus.encoder.tokens_before(doc, builder.corpus.decoder.char_start(doc, p))
        assert before >= 2048


def test_collator_pads_variable_windows(tmp_path, mix):
    data, _ = _data(tmp_path, mix, decoder_windows=[64, 256], window_block=1, mixture={"long_document": 1.0})
    samples = [data.train[i] for i in range(8)]
    lens = [len(s["input_ids"]) for s in samples]
    assert set(lens) == {64, 256}
    batch = Collator(chunk_size=32, prefix=[], suffix=[], encoder_pad_id=0, decoder_pad_id=7)(samples)
    assert set(batch) == {"input_ids", "labels", "task_mask", "context_input_ids", "context_attention_mask",
                          "teacher_prefix_ids", "teacher_prefix_mask", "index"}
    assert not batch["task_mask"].any()  # plain text: no answers
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 256)
    for i, n in enumerate(lens):
        assert batch["input_ids"][i, :n].tolist() == samples[i]["input_ids"].tolist()
        assert (batch["input_ids"][i, n:] == 7).all() and (batch["labels"][i, n:] == -100).all()
        assert batch["labels"][i, :n].tolist() == samples[i]["labels"].tolist()


def test_stream_is_a_pure_function_of_the_index(tmp_path, mix):
    kw = {"decoder_windows": [64, 128, 256], "window_block": 4, "context_draw": "uniform",
          "mixture": {"long_document": 1, "copying": 1, "demonstrations": 1, "retrieval": 1, "warmup": 1}}
    data, _ = _data(tmp_path, mix, **kw)
    again, _ = _data(tmp_path, mix, **kw)
    # a resumed run reads from its step on, in another order, in another process: same samples
    for i in [37, 5, 1000, 6, 5]:
        a, b = data.train[i], again.train[i]
        assert (
            a["kind"] == b["kind"] and (a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()
        )
        assert all((x == y).all() for x, y in zip(a["context"], b["context"]))
    assert len({data.train[i]["kind"] for i in range(60)}) == 5


def _scored_runs(s: dict) -> list[tuple[int, int]]:
    """The task's answers: runs of `task_mask`, else labelled runs after the first unlabelled token."""
    if "task_mask" in s:
        lab, first = np.asarray(s["task_mask"], dtype=bool), 0
    else:
        lab = s["labels"] != -100
        first = int(np.argmin(lab[1:])) + 1
    runs, i = [], first
    while i < len(lab):
        if lab[i]:
            j = i
            while j < len(lab) and lab[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def test_copied_answers_are_only_in_the_context(tmp_path, mix):
    data, tok = _data(tmp_path, mix, decoder_windows=[128, 256], window_block=2, mixture={"copying": 1.0})
    formats = set()
    for i in range(60):
        s = data.train[i]
        assert len(s["input_ids"]) == data.train.window_of(i)
        if "copy_format" not in s:
            continue
        formats.add(s["copy_format"])
        context = " ".join(tok.decode(c.tolist()) for c in s["context"])
        runs = _scored_runs(s)
        assert runs and len(s["input_ids"]) - runs[0][0] <= 96 + 1
        for a, b in runs:
            answer = tok.decode(s["input_ids"][a:b].tolist()).strip()
            assert answer in context, (s["copy_format"], answer)
            assert answer not in tok.decode(s["input_ids"][:a].tolist())  # not readable in the decoder
    assert formats == {"continue", "lookup", "table"}


def test_demonstration_labels_scored_and_learnable_from_the_context(tmp_path, mix):
    data, tok = _data(tmp_path, mix, mixture={"demonstrations": 1.0})
    kinds, renamed = set(), 0
    for i in range(40):
        s = data.train[i]
        kinds.add(s["label_kind"])
        context = tok.decode(s["context"][0].tolist())
        runs = _scored_runs(s)
        assert runs
        for a, b in runs:
            label = tok.decode(s["input_ids"][a:b].tolist()).strip()
            assert label in s["shown_labels"] and label in context
        if s["renamed"]:
            renamed += 1
            a, b = runs[0]
            assert tok.decode(s["input_ids"][a:b].tolist()).strip() not in tok.decode(s["input_ids"][:a].tolist())
        else:
            names = {
                "category": {"books", "code", "reference"},
                "source": {"austen", "melville", "python", "ruby", "wiki"},
            }
            assert set(s["shown_labels"]) <= names[s["label_kind"]]
    assert kinds == {"category", "source"} and 5 < renamed < 35


def test_renamed_labels_are_fresh_made_up_words():
    """A fixed label list becomes a prior the model answers with; labels are drawn fresh per sample."""
    rng = np.random.default_rng(0)
    draws = [label_words(rng, 4) for _ in range(200)]
    assert all(len(set(d)) == 4 and all(w.isalpha() and w.islower() for w in d) for d in draws)
    seen = [w for d in draws for w in d]
    assert len(set(seen)) > 0.9 * len(seen)  # no word recurs often enough to be learnt as an answer


def test_retrieval_same_source(tmp_path, mix):
    data, _ = _data(tmp_path, mix, mixture={"retrieval": 1.0},
                    retrieval=RetrievalConfig(k=3, passage_tokens=64, scope="same_source"))
    b = data.train.builders["retrieval"]
    names = b.corpus.decoder.names
    doc, _ = b.pick_window(np.random.default_rng(0))
    hits = b.pool.search("ban ber", 3, exclude_doc=doc, source=source_of(names[doc]))
    assert len(hits) == 3
    for h in hits:
        d = int(b.pool.spans[h, 0])
        assert d != doc and source_of(names[d]) == source_of(names[doc])
    assert len(data.train[0]["context"]) == 3


def test_passage_questions_are_answered_by_one_retrieved_passage(tmp_path):
    import re

    from cepe.data.builders.passage_qa import BLANK, QUESTIONS
    from cepe.data.builders.text import one_line

    # prose with names and numbers to ask about (the shared fixture's words are all short)
    rng, prose = np.random.default_rng(1), tmp_path / "prose"
    for source in ("annals", "ledger"):
        rows = [{"text": " ".join(
            f"In {rng.integers(1200, 1999)} the {rng.choice(VOCAB)} of {rng.choice(VOCAB).title()} "
            f"{rng.choice(VOCAB).title()} carried {rng.integers(2, 999)} loads to the harbour." for _ in range(60))}
            for _ in range(3)]
        (prose / "train" / "books").mkdir(parents=True, exist_ok=True)
        (prose / "train" / "books" / f"{source}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, tok = _data(tmp_path, prose, mixture={"passage_qa": 1.0}, decoder_windows=[400], window_block=2,
                      copying=CopyingConfig(task_tokens=200), retrieval=RetrievalConfig(k=4, passage_tokens=128))
    forms = [re.compile(re.escape(q).replace(re.escape("{s}"), "(?P<s>.+)") + r"$") for q in QUESTIONS]
    asked, sources = 0, set()
    for i in range(16):
        s = data.train[i]
        if s.get("copy_format") != "passage_qa":  # no sentence to ask about: a plain retrieval window
            continue
        passages = [one_line(tok.decode(c.tolist())) for c in s["context"]]
        for a, b in _scored_runs(s):
            before = tok.decode(s["input_ids"][:a].tolist())
            answer = tok.decode(s["input_ids"][a : b - 1].tolist()).strip()
            assert tok.decode(s["input_ids"][b - 1 : b].tolist()) == "."  # where the answer ends, scored
            found = [m for f in forms if (m := f.search(before))]
            assert found, before[-200:]
            sentence = found[0]["s"]
            assert sentence.count(BLANK) == 1 and answer not in before
            # filled in, the quoted sentence is in exactly one of the passages the encoder reads
            assert sum(sentence.replace(BLANK, answer) in p for p in passages) == 1
            asked += 1
            sources.add(answer.isdigit())
    assert asked >= 12 and sources == {True, False}  # numbers and words alike


def test_decoder_bos_before_every_window(tmp_path, mix):
    data, tok = _data(
        tmp_path, mix, decoder_bos=True, decoder_windows=[64, 128], mixture={"long_document": 1, "copying": 1}
    )
    for i in range(10):
        s = data.train[i]
        assert s["input_ids"][0] == tok.bos_token_id and s["labels"][0] == -100
        assert len(s["input_ids"]) == data.train.window_of(i) + 1
        assert tok.bos_token_id not in s["input_ids"][1:].tolist()
    # the answer mask shifts with the window: a copying answer is still marked on its own tokens
    tasks = [data.train[i] for i in range(40) if "task_mask" in data.train[i]]
    assert tasks
    for s in tasks:
        assert len(s["task_mask"]) == len(s["input_ids"]) and not s["task_mask"][0]
        assert (s["labels"][s["task_mask"]] != -100).all() and s["task_mask"].any()
    batch = Collator(16, [], [], 0, 0)(tasks[:2])
    assert batch["task_mask"].sum() == sum(int(s["task_mask"].sum()) for s in tasks[:2])


def test_facts_are_random_values_read_only_from_the_context(tmp_path, mix):
    # bytes as tokens: a question takes ~60 of them, so the task gets 200
    data, tok = _data(tmp_path, mix, decoder_windows=[400, 512], window_block=2, mixture={"facts": 1.0},
                      copying=CopyingConfig(task_tokens=200))
    formats = set()
    for i in range(60):
        s = data.train[i]
        assert len(s["input_ids"]) == data.train.window_of(i)
        assert "copy_format" in s, "every window of the mix has room for a question"
        formats.add(s["copy_format"])
        (context,) = s["context"]
        context = tok.decode(context.tolist())
        assert len(s["context"][0]) <= 1024
        runs = _scored_runs(s)
        assert runs and len(s["input_ids"]) - runs[0][0] <= 200 + 1
        # the task mask marks exactly the answers
        assert np.flatnonzero(s["task_mask"]).tolist() == [j for a, b in runs for j in range(a, b)]
        for a, b in runs:
            answer = tok.decode(s["input_ids"][a : b - 1].tolist()).strip()
            assert tok.decode(s["input_ids"][b - 1 : b].tolist()) == "."  # where the answer ends, scored
            assert answer not in tok.decode(s["input_ids"][:a].tolist())  # not readable in the decoder
            # multi-value and chain answers list several items, each stated in the context
            for item in answer.replace(", ", " ").split(" ") if s["copy_format"] != "facts_single" else [answer]:
                assert item in context, (s["copy_format"], item)
    assert formats == {"facts_single", "facts_multi", "facts_chain"}


def test_facts_context_length_has_its_own_range(tmp_path, mix):
    # data.facts.context_tokens bounds the facts samples' contexts (the other builders keep 64-1,024)
    def lengths(**facts):
        data, _ = _data(tmp_path / str(facts), mix, decoder_windows=[400], window_block=2,
                        mixture={"facts": 1.0}, copying=CopyingConfig(task_tokens=200),
                        facts=FactsConfig(facts=[1, 2], repeat=0.0, formats={"single": 1.0}, **facts))
        return [len(data.train[i]["context"][0]) for i in range(40)]

    short, default = lengths(context_tokens=[200, 300]), lengths()
    assert max(short) <= 300 and sum(n >= 200 for n in short) >= 30, short
    assert max(default) > 300, default
    with pytest.raises(ValueError, match="facts.context_tokens"):
        DataConfig(train=[str(mix)], facts=FactsConfig(context_tokens=[300, 200])).validate()


def test_facts_list_lengths_follow_values_and_hops(tmp_path, mix):
    # RULER's multi-value asks for 4 values and its vt for 5 names: data.facts.values and
    # data.facts.hops set how long the asked lists are, so training can reach past them
    def lists(fmt, **facts):
        data, tok = _data(tmp_path / f"{fmt}{facts}", mix, decoder_windows=[800], window_block=2,
                          mixture={"facts": 1.0}, copying=CopyingConfig(task_tokens=500),
                          facts=FactsConfig(formats={fmt: 1.0}, repeat=0.0, **facts))
        out = []
        for i in range(12):
            s = data.train[i]
            context = tok.decode(s["context"][0].tolist())
            for a, b in _scored_runs(s):
                answer = tok.decode(s["input_ids"][a : b - 1].tolist()).strip()
                items = answer.split(", ") if fmt == "multi" else answer.split(" ")
                assert all(item in context for item in items), (answer, fmt)
                out.append(len(items))
        return out

    assert set(lists("multi", values=[6, 6])) == {6}
    assert max(lists("multi")) <= 4
    assert set(lists("chain", hops=[5, 5])) == {6}
    assert max(lists("chain")) <= 5
    with pytest.raises(ValueError, match="facts.hops"):
        DataConfig(train=[str(mix)], facts=FactsConfig(hops=[0, 3])).validate()


def test_listed_answers_may_use_any_separator(tmp_path, mix):
    # facts.separators: lists joined by "; ", ". ", new lines...; a list of sentences ends in its own
    # period, and then the scored end is the new line, not another "."
    data, tok = _data(tmp_path, mix, decoder_windows=[800], window_block=2, mixture={"facts": 1.0},
                      copying=CopyingConfig(task_tokens=500),
                      facts=FactsConfig(formats={"multi": 1.0}, repeat=0.0, values=[3, 3], separators=1.0))
    seps = set()
    for i in range(40):
        s = data.train[i]
        context = tok.decode(s["context"][0].tolist())
        for a, b in _scored_runs(s):
            answer = tok.decode(s["input_ids"][a : b - 1].tolist()).strip()
            end = tok.decode(s["input_ids"][b - 1 : b].tolist())
            sep = next(x for x in SEPARATORS if len(answer.rstrip(".").split(x)) == 3)
            items = answer.rstrip(".").split(sep)
            assert all(item in context for item in items), (answer, sep)
            assert end == ("\n" if sep == ". " else "."), (answer, end)
            assert answer.endswith(".") == (sep == ". ")
            seps.add(sep)
    assert seps == set(SEPARATORS)


def test_multi_answers_follow_the_context_or_any_order(tmp_path, mix):
    # chunks are encoded apart, so the context's order of values is unreadable: multi_order "random"
    # lists them shuffled and never asks for an order
    def orders(multi_order):
        data, tok = _data(tmp_path / multi_order, mix, decoder_windows=[800], window_block=2, mixture={"facts": 1.0},
                          copying=CopyingConfig(task_tokens=500),
                          facts=FactsConfig(formats={"multi": 1.0}, repeat=0.0, values=[4, 4], multi_order=multi_order))
        out = []
        for i in range(16):
            s = data.train[i]
            context = tok.decode(s["context"][0].tolist())
            (a, b), = _scored_runs(s)
            items = tok.decode(s["input_ids"][a : b - 1].tolist()).strip().split(", ")
            assert "order" not in tok.decode(s["input_ids"][:a].tolist())[-80:] or multi_order == "appearance"
            at = [context.index(item) for item in items]
            out.append(at == sorted(at))
        return out

    assert all(orders("appearance"))
    assert sum(orders("random")) <= 4  # 4 values in order by chance: 1 in 24
    with pytest.raises(ValueError, match="multi_order"):
        DataConfig(train=[str(mix)], facts=FactsConfig(multi_order="sorted")).validate()


def test_repeated_haystack_is_one_span_of_the_text():
    text = "Call me Ishmael. Some years ago I went to sea. It is a way I have. " * 3 + "The end came at last."
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = _repeated(rng, text)
        assert len(out) >= len(text)
        unit = out[: len(out) // 4]
        # a span repeated: the text is its first span again and again
        span = next(out[:n] for n in range(1, len(out)) if out[n:].startswith(" " + out[:n]) and
                    out.replace(out[:n], "").strip() == "")
        assert span in text and out.count(span) >= 2, unit


def test_facts_in_a_repeated_haystack_still_answer_from_the_context(tmp_path, mix):
    def squeezed(repeat):  # zlib's ratio on the contexts: a repeated span compresses far better than text
        data, tok = _data(tmp_path / str(repeat), mix, decoder_windows=[400], window_block=2, mixture={"facts": 1.0},
                          copying=CopyingConfig(task_tokens=200), facts=FactsConfig(repeat=repeat, same_attribute=1.0))
        ratios = []
        for i in range(20):
            s = data.train[i]
            context = tok.decode(s["context"][0].tolist())
            ratios.append(len(zlib.compress(context.encode())) / len(context.encode()))
            for a, b in _scored_runs(s):
                answer = tok.decode(s["input_ids"][a : b - 1].tolist()).strip()
                assert tok.decode(s["input_ids"][b - 1 : b].tolist()) == "."  # where the answer ends, scored
                for item in answer.replace(", ", " ").split(" ") if s["copy_format"] != "facts_single" else [answer]:
                    assert item in context
        return float(np.median(ratios))

    r1, r0 = squeezed(1.0), squeezed(0.0)
    assert r1 < 0.6 * r0


def test_a_repeated_haystack_may_go_on_through_the_window(tmp_path, mix):
    # as in the pass-key test, the window's own text is the haystack: its span is read in the context
    def continued(repeat_window):
        data, tok = _data(tmp_path / str(repeat_window), mix, decoder_windows=[400], window_block=2,
                          min_context_tokens=512, mixture={"facts": 1.0}, copying=CopyingConfig(task_tokens=200),
                          facts=FactsConfig(repeat=1.0, repeat_window=repeat_window, instruction=0.0))
        hits = 0
        for i in range(12):
            s = data.train[i]
            context = " ".join(tok.decode(s["context"][0].tolist()).split())
            head = " ".join(tok.decode(s["input_ids"][:40].tolist()).split()[1:-1])
            hits += len(head) > 10 and head in context
            for a, b in _scored_runs(s):  # the answers still come from the context alone
                answer = tok.decode(s["input_ids"][a : b - 1].tolist()).strip()
                assert answer not in tok.decode(s["input_ids"][:a].tolist())
        return hits

    assert continued(1.0) >= 10 and continued(0.0) <= 2


def test_variable_chains_come_with_several_distractor_chains():
    import re

    from cepe.data.builders.facts import ASSIGNMENTS, CHAIN_QUESTIONS, FactsBuilder

    rng, counts = np.random.default_rng(0), set()
    builder = SimpleNamespace(cfg=SimpleNamespace(facts=FactsConfig()))  # _chain reads only cfg.facts
    for _ in range(60):
        statements, [(question, answer)] = FactsBuilder._chain(builder, rng, ["river"])
        pairs = []  # (name, what it is assigned) of every statement, whatever its form
        for st in statements:
            for form in sorted(ASSIGNMENTS, key=len, reverse=True):  # "let x = y;" before "x = y"
                m = re.fullmatch(re.escape(form).replace(r"\{x\}", "(?P<x>.+?)").replace(r"\{y\}", "(?P<y>.+?)"), st)
                if m:
                    pairs.append((m["x"], m["y"]))
                    break
        assert len(pairs) == len(statements)
        values = [y for _, y in pairs if y.isdigit()]
        counts.add(len(values))
        # following the assignments from the asked value gives exactly the answer's names, in order
        v = next(v for v in values if any(q.format(v=v) == question for q in CHAIN_QUESTIONS))
        held, frontier = [], {v}
        for x, y in pairs:  # statements keep chain order: a hop follows its source
            if y in frontier:
                held.append(x)
                frontier.add(x)
        assert held == answer.split(" ")
    assert counts == {2, 3, 4, 5}  # 1-4 distractor chains besides the target


def test_facts_sharing_an_attribute_differ_only_in_their_keys():
    # RULER's multi-key needles: one template, one value type, keys differ; the hard negatives match
    import re
    from types import SimpleNamespace

    from cepe.data.builders.facts import STATEMENTS, FactsBuilder

    def forms(statement):
        return {f for f in STATEMENTS if re.fullmatch(re.sub(r"\\\{[kauv]\\\}", ".+?", re.escape(f)), statement)}

    builder = SimpleNamespace(cfg=SimpleNamespace(facts=FactsConfig(same_attribute=1.0, keyless=0.0, facts=(3, 6))))
    rng = np.random.default_rng(0)
    for _ in range(30):
        statements, _ = FactsBuilder._single(builder, rng, ["river", "lantern"])
        assert len(statements) >= 3
        assert set.intersection(*(forms(st) for st in statements)), statements


def test_fact_keys_come_in_several_shapes_that_differ_in_a_few_tokens():
    # RULER-like keys (two words joined by a hyphen, hex ids) besides made-up names and identifiers
    import re

    from cepe.data.builders.facts import _key

    rng = np.random.default_rng(0)
    keys = [_key(rng, ["river", "lantern", "copper"]) for _ in range(300)]
    shapes = {
        "name": r"[A-Z][a-z]+", "word-number": r"[a-z]+-\d+", "identifier": r"[a-z]+_\d+",
        "word-word": r"(river|lantern|copper)-(river|lantern|copper)", "hex": r"[0-9a-f]{6,12}",
    }
    seen = {name for k in keys for name, pattern in shapes.items() if re.fullmatch(pattern, k)}
    assert seen == set(shapes), seen
    assert all(any(re.fullmatch(p, k) for p in shapes.values()) for k in keys)


def test_keyless_facts_are_asked_by_their_attribute(tmp_path, mix):
    from cepe.data.builders.facts import ATTRIBUTES, KEYLESS_QUESTIONS

    data, tok = _data(tmp_path, mix, decoder_windows=[400], window_block=2, mixture={"facts": 1.0},
                      copying=CopyingConfig(task_tokens=200),
                      facts=FactsConfig(keyless=1.0, repeat=0.0, formats={"single": 1.0}))
    asked = 0
    for i in range(20):
        s = data.train[i]
        context = tok.decode(s["context"][0].tolist())
        for a, b in _scored_runs(s):
            before = tok.decode(s["input_ids"][:a].tolist())
            answer = tok.decode(s["input_ids"][a : b - 1].tolist()).strip()
            # the question names an attribute and nothing else; the context states that attribute's value
            found = [(q, at) for q in KEYLESS_QUESTIONS for at in ATTRIBUTES if before.endswith(q.format(a=at))]
            assert found, before[-80:]
            attribute = max((at for _, at in found), key=len)
            assert answer in context and attribute in context
            asked += 1
    assert asked >= 20


def test_facts_windows_may_open_with_an_unscored_instruction(tmp_path, mix):
    from cepe.data.builders.facts import INSTRUCTIONS

    data, tok = _data(tmp_path, mix, decoder_windows=[400], window_block=2, mixture={"facts": 1.0},
                      copying=CopyingConfig(task_tokens=200), facts=FactsConfig(instruction=1.0))
    opened = 0
    for i in range(16):
        s = data.train[i]
        text = tok.decode(s["input_ids"].tolist())
        first = [x for x in INSTRUCTIONS if text.startswith(x)]
        if first:
            opened += 1
            assert (s["labels"][: len(first[0])] == -100).all() and (s["labels"][len(first[0]) :] != -100).any()
        assert _scored_runs(s) and s["task_mask"].any()
    assert opened >= 14


def test_distractor_haystack_states_other_names_in_the_facts_forms():
    rng = np.random.default_rng(3)
    words = ["whale", "number", "harpoon", "code", "sea"]
    for _ in range(20):
        text = _distractors(rng, words)
        # keyless distractors never use an attribute a keyless question could ask ("the number is")
        assert not any(f"The {a} is" in text for a in ("number", "code"))
        hay = _repeated(rng, text, length=5000, whole=True)
        assert len(hay) >= 5000 and hay.count(text) >= 2
