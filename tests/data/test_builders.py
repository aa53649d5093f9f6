"""Variable windows, same-source retrieval, copying and demonstration samples on the small mix of
`builder_helpers` (the facts builder: test_facts.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builder_helpers import VOCAB, data_of, scored_runs, write_mix

from cepe.data import Collator, DataConfig
from cepe.data.builders import category_of, source_of
from cepe.data.builders.demonstrations import label_words
from cepe.data.config import CopyingConfig, DemonstrationsConfig, FactsConfig, RetrievalConfig


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return write_mix(tmp_path_factory.mktemp("mix"))


def test_names_give_source_and_category():
    assert source_of("train/books/austen.jsonl:3") == "train/books/austen.jsonl"
    assert category_of("train/books/austen.jsonl:3") == "books"
    assert source_of("austen/emma.txt") == "austen" and category_of("python3.11/json/decoder.py") == "python3.11"


def test_variable_windows_per_block_and_context_lengths(tmp_path, mix):
    data, _ = data_of(tmp_path, mix, decoder_windows=[64, 128, 256], window_block=4, context_draw="uniform",
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
    uniform, _ = data_of(tmp_path, mix, context_draw="uniform", **kw)
    block, _ = data_of(tmp_path, mix, context_draw="block", **kw)

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
    cut, _ = data_of(tmp_path, mix, **kw)
    fill, _ = data_of(tmp_path, mix, context_fill=True, **kw)
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
    data, _ = data_of(tmp_path, mix, decoder_windows=[64, 256], window_block=1, mixture={"long_document": 1.0})
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
    data, _ = data_of(tmp_path, mix, **kw)
    again, _ = data_of(tmp_path, mix, **kw)
    # a resumed run reads from its step on, in another order, in another process: same samples
    for i in [37, 5, 1000, 6, 5]:
        a, b = data.train[i], again.train[i]
        assert (
            a["kind"] == b["kind"] and (a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()
        )
        assert all((x == y).all() for x, y in zip(a["context"], b["context"]))
    assert len({data.train[i]["kind"] for i in range(60)}) == 5


def test_copied_answers_are_only_in_the_context(tmp_path, mix):
    data, tok = data_of(tmp_path, mix, decoder_windows=[128, 256], window_block=2, mixture={"copying": 1.0})
    formats = set()
    for i in range(60):
        s = data.train[i]
        assert len(s["input_ids"]) == data.train.window_of(i)
        if "copy_format" not in s:
            continue
        formats.add(s["copy_format"])
        context = " ".join(tok.decode(c.tolist()) for c in s["context"])
        runs = scored_runs(s)
        assert runs and len(s["input_ids"]) - runs[0][0] <= 96 + 1
        for a, b in runs:
            answer = tok.decode(s["input_ids"][a:b].tolist()).strip()
            assert answer in context, (s["copy_format"], answer)
            assert answer not in tok.decode(s["input_ids"][:a].tolist())  # not readable in the decoder
    assert formats == {"continue", "lookup", "table"}


def test_demonstration_labels_scored_and_learnable_from_the_context(tmp_path, mix):
    data, tok = data_of(tmp_path, mix, mixture={"demonstrations": 1.0})
    kinds, renamed = set(), 0
    for i in range(40):
        s = data.train[i]
        kinds.add(s["label_kind"])
        context = tok.decode(s["context"][0].tolist())
        runs = scored_runs(s)
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
    data, _ = data_of(tmp_path, mix, mixture={"retrieval": 1.0},
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


def _prose(tmp_path):
    """Prose with names and numbers to ask about (the shared fixture's words are all short)."""
    rng, prose = np.random.default_rng(1), tmp_path / "prose"
    for source in ("annals", "ledger"):
        rows = [{"text": " ".join(
            f"In {rng.integers(1200, 1999)} the {rng.choice(VOCAB)} of {rng.choice(VOCAB).title()} "
            f"{rng.choice(VOCAB).title()} carried {rng.integers(2, 999)} loads to the harbour." for _ in range(60))}
            for _ in range(3)]
        (prose / "train" / "books").mkdir(parents=True, exist_ok=True)
        (prose / "train" / "books" / f"{source}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prose


def test_passage_questions_are_answered_by_one_retrieved_passage(tmp_path):
    import re

    from cepe.data.builders.passage_qa import BLANK, QUESTIONS
    from cepe.data.builders.text import one_line

    data, tok = data_of(tmp_path, _prose(tmp_path), mixture={"passage_qa": 1.0}, decoder_windows=[400], window_block=2,
                       copying=CopyingConfig(task_tokens=200), retrieval=RetrievalConfig(k=4, passage_tokens=128))
    forms = [re.compile(re.escape(q).replace(re.escape("{s}"), "(?P<s>.+)") + r"$") for q in QUESTIONS]
    asked, sources = 0, set()
    for i in range(16):
        s = data.train[i]
        if s.get("copy_format") != "passage_qa":  # no sentence to ask about: a plain retrieval window
            continue
        passages = [one_line(tok.decode(c.tolist())) for c in s["context"]]
        for a, b in scored_runs(s):
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
    data, tok = data_of(
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


def test_passage_questions_with_the_top_passage_in_the_window(tmp_path):
    # retrieval.in_window: the top passage moves from the encoder into the window before the
    # questions (open-domain QA's prompt); some answers are then in the window, the rest in the encoder
    from cepe.data.builders.text import one_line

    def build(share):
        return data_of(tmp_path / str(share), _prose(tmp_path / str(share)), mixture={"passage_qa": 1.0},
                       decoder_windows=[400], window_block=2, copying=CopyingConfig(task_tokens=120),
                       retrieval=RetrievalConfig(k=4, passage_tokens=128, in_window=share))

    data, tok = build(1.0)
    in_window = in_encoder = 0
    for i in range(24):
        s = data.train[i]
        if s.get("copy_format") != "passage_qa_in_window":
            continue
        assert len(s["context"]) == 3 and len(s["input_ids"]) == len(s["labels"]) == len(s["task_mask"]) == 400
        runs = scored_runs(s)
        a0 = runs[0][0]
        before = tok.decode(s["input_ids"][:a0].tolist())
        # the moved passage is whole in the window, after its text and before the first question
        window_passage = before.split("\n\n")[-2]  # text, passage, question, each after a blank line
        assert len(window_passage) > 100 and not any(window_passage in one_line(tok.decode(c.tolist()))
                                                     for c in s["context"])
        assert (s["labels"][s["task_mask"]] != -100).all()
        for a, e in runs:
            answer = tok.decode(s["input_ids"][a : e - 1].tolist()).strip()
            in_window += answer in window_passage
            in_encoder += any(answer in tok.decode(c.tolist()) for c in s["context"])
    assert in_window >= 4 and in_encoder >= 4  # both kinds of question are asked
    data0, _ = build(0.0)
    assert not any(data0.train[i].get("copy_format") == "passage_qa_in_window" for i in range(24))


TONES = {
    "positive": ["she was delighted and happy with the wonderful gift", "what a lovely and cheerful morning it was",
                 "they loved the beautiful garden and smiled with joy"],
    "negative": ["he was angry and miserable after the terrible loss", "the cruel storm destroyed their poor village",
                 "she hated the awful cold and wept in despair"],
    "neutral": ["the train leaves the station at the end of the road", "he walked to the house and opened the door",
                "the committee meets on the second floor of the building"],
}


def test_sentiment_labels_pair_inputs_with_their_tone(tmp_path):
    """Tone labels come from the snippet's own words (a lexicon), not its document; one naming per sample."""
    from cepe.data.builders.sentiment import NAMINGS, sentiment_of

    rng = np.random.default_rng(1)
    root = tmp_path / "mix" / "train" / "books"
    root.mkdir(parents=True)
    rows = [{"text": ". ".join(rng.choice(TONES[t]) for _ in range(120)) + "."} for t in TONES for _ in range(2)]
    (root / "tales.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tone = DemonstrationsConfig(labels=["sentiment"], sentiment_pool=600, renamed_labels=0.3)
    data, tok = data_of(tmp_path, tmp_path / "mix", mixture={"demonstrations": 1.0}, demonstrations=tone)
    keys, groups = data.train.builders["demonstrations"].labels["sentiment"]
    assert keys == ["positive", "negative", "neutral"]  # no snippet mixes tones here
    for k, g in zip(keys, groups):  # toned snippets come from documents of that tone
        vocab = set(" ".join(TONES[k]).split())
        assert all(sentiment_of(x) == k for x in g)
        assert k == "neutral" or all(set(x.replace(".", "").split()) <= vocab for x in g)
    seen, renamed = set(), 0
    for i in range(30):
        s = data.train[i]
        assert s["label_kind"] == "sentiment"
        context = tok.decode(s["context"][0].tolist())
        if s["renamed"]:
            renamed += 1
        else:
            assert any(set(s["shown_labels"]) <= set(n) for n in NAMINGS)  # one naming per sample
            seen |= set(s["shown_labels"])
        for a, b in scored_runs(s):
            assert tok.decode(s["input_ids"][a:b].tolist()).strip() in s["shown_labels"]
            assert tok.decode(s["input_ids"][a:b].tolist()).strip() in context
    assert len(seen) > 4 and 0 < renamed < 20  # several namings drawn; made-up words too
    tone.sentiment_categories = ["code"]  # tone is read only from the listed categories' documents
    with pytest.raises(ValueError, match="2 sentiment values"):
        data_of(tmp_path, tmp_path / "mix", mixture={"demonstrations": 1.0}, demonstrations=tone)
    assert sentiment_of("def f(x): return x + 1 if y else {}") is None  # code is not labelled neutral
    assert sentiment_of("she was delighted and happy with the wonderful gift") == "positive"
    assert sentiment_of("he was angry and miserable after the terrible loss") == "negative"
