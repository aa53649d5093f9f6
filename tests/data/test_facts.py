"""The facts builder: random values placed in the context, asked after the window; list answers,
noise haystacks, keys and distractors."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from builder_helpers import data_of, scored_runs, write_mix

from cepe.data import DataConfig
from cepe.data.builders.facts import SEPARATORS, _distractors, _repeated
from cepe.data.config import CopyingConfig, FactsConfig


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return write_mix(tmp_path_factory.mktemp("mix"))


def test_facts_are_random_values_read_only_from_the_context(tmp_path, mix):
    # bytes as tokens: a question takes ~60 of them, so the task gets 200
    data, tok = data_of(tmp_path, mix, decoder_windows=[400, 512], window_block=2, mixture={"facts": 1.0},
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
        runs = scored_runs(s)
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
        data, _ = data_of(tmp_path / str(facts), mix, decoder_windows=[400], window_block=2,
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
        data, tok = data_of(tmp_path / f"{fmt}{facts}", mix, decoder_windows=[800], window_block=2,
                           mixture={"facts": 1.0}, copying=CopyingConfig(task_tokens=500),
                           facts=FactsConfig(formats={fmt: 1.0}, repeat=0.0, **facts))
        out = []
        for i in range(12):
            s = data.train[i]
            context = tok.decode(s["context"][0].tolist())
            for a, b in scored_runs(s):
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
    data, tok = data_of(tmp_path, mix, decoder_windows=[800], window_block=2, mixture={"facts": 1.0},
                       copying=CopyingConfig(task_tokens=500),
                       facts=FactsConfig(formats={"multi": 1.0}, repeat=0.0, values=[3, 3], separators=1.0))
    seps = set()
    for i in range(40):
        s = data.train[i]
        context = tok.decode(s["context"][0].tolist())
        for a, b in scored_runs(s):
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
        facts = FactsConfig(formats={"multi": 1.0}, repeat=0.0, values=[4, 4], multi_order=multi_order)
        data, tok = data_of(tmp_path / multi_order, mix, decoder_windows=[800], window_block=2, mixture={"facts": 1.0},
                            copying=CopyingConfig(task_tokens=500), facts=facts)
        out = []
        for i in range(16):
            s = data.train[i]
            context = tok.decode(s["context"][0].tolist())
            (a, b), = scored_runs(s)
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
        data, tok = data_of(tmp_path / str(repeat), mix, decoder_windows=[400], window_block=2, mixture={"facts": 1.0},
                           copying=CopyingConfig(task_tokens=200), facts=FactsConfig(repeat=repeat, same_attribute=1.0))
        ratios = []
        for i in range(20):
            s = data.train[i]
            context = tok.decode(s["context"][0].tolist())
            ratios.append(len(zlib.compress(context.encode())) / len(context.encode()))
            for a, b in scored_runs(s):
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
        data, tok = data_of(tmp_path / str(repeat_window), mix, decoder_windows=[400], window_block=2,
                           min_context_tokens=512, mixture={"facts": 1.0}, copying=CopyingConfig(task_tokens=200),
                           facts=FactsConfig(repeat=1.0, repeat_window=repeat_window, instruction=0.0))
        hits = 0
        for i in range(12):
            s = data.train[i]
            context = " ".join(tok.decode(s["context"][0].tolist()).split())
            head = " ".join(tok.decode(s["input_ids"][:40].tolist()).split()[1:-1])
            hits += len(head) > 10 and head in context
            for a, b in scored_runs(s):  # the answers still come from the context alone
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


def test_same_shape_keys_share_one_shape():
    # facts.same_key_shape: RULER's four keys are all two hyphenated words; mixed shapes (a hex id
    # beside a name) can be told apart by shape alone
    import re

    from cepe.data.builders.facts import STATEMENTS, FactsBuilder

    words = ["river", "lantern", "copper"]
    shapes = [r"[A-Z][a-z]+", r"[a-z]+-\d+", r"[a-z]+_\d+", r"(river|lantern|copper)-(river|lantern|copper)",
              r"[0-9a-f]{6,12}"]

    def key_shapes(statement):  # the shapes the statement's key may have, over the forms it may take
        out = set()
        for form in STATEMENTS:
            pattern = re.escape(form).replace(r"\{k\}", "(?P<k>.+?)")
            m = re.fullmatch(re.sub(r"\\\{[auv]\\\}", ".+?", pattern), statement)
            if m:
                out |= {i for i, p in enumerate(shapes) if re.fullmatch(p, m["k"])}
        return out

    def common_shape(same_key_shape):
        facts = FactsConfig(same_attribute=1.0, keyless=0.0, facts=(4, 4), same_key_shape=same_key_shape)
        builder = SimpleNamespace(cfg=SimpleNamespace(facts=facts))
        rng = np.random.default_rng(0)
        return [bool(set.intersection(*(key_shapes(st) for st in FactsBuilder._single(builder, rng, words)[0])))
                for _ in range(30)]

    assert all(common_shape(1.0))
    assert sum(common_shape(0.0)) < 10  # 4 keys of 5 shapes drawn apart share one in 1 of 125


def test_keyless_facts_are_asked_by_their_attribute(tmp_path, mix):
    from cepe.data.builders.facts import ATTRIBUTES, KEYLESS_QUESTIONS

    data, tok = data_of(tmp_path, mix, decoder_windows=[400], window_block=2, mixture={"facts": 1.0},
                       copying=CopyingConfig(task_tokens=200),
                       facts=FactsConfig(keyless=1.0, repeat=0.0, formats={"single": 1.0}))
    asked = 0
    for i in range(20):
        s = data.train[i]
        context = tok.decode(s["context"][0].tolist())
        for a, b in scored_runs(s):
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

    data, tok = data_of(tmp_path, mix, decoder_windows=[400], window_block=2, mixture={"facts": 1.0},
                       copying=CopyingConfig(task_tokens=200), facts=FactsConfig(instruction=1.0))
    opened = 0
    for i in range(16):
        s = data.train[i]
        text = tok.decode(s["input_ids"].tolist())
        first = [x for x in INSTRUCTIONS if text.startswith(x)]
        if first:
            opened += 1
            assert (s["labels"][: len(first[0])] == -100).all() and (s["labels"][len(first[0]) :] != -100).any()
        assert scored_runs(s) and s["task_mask"].any()
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


def test_question_styles_ask_in_composed_wordings(tmp_path, mix):
    # facts.question_styles: a share of the questions are composed from parts (the short forms alone
    # tied a list's length to their wording); share 0 never draws them
    import re

    from cepe.data.builders import wordings

    more = {"facts_single": wordings.SINGLE, "facts_multi": wordings.MULTI, "facts_chain": wordings.CHAIN}
    ending = {kind: re.compile("(?:" + "|".join(re.sub(r"\\\{[kav]\\\}", ".+?", re.escape(f)) for f in c.all()) + ")$",
                               re.S) for kind, c in more.items()}

    def asked(share):
        facts = FactsConfig(keyless=0.0, repeat=0.0, question_styles=share,
                            formats={"single": 1.0, "multi": 1.0, "chain": 1.0})
        data, tok = data_of(tmp_path / str(share), mix, decoder_windows=[800], window_block=2,
                            mixture={"facts": 1.0}, copying=CopyingConfig(task_tokens=500), facts=facts)
        longer, kinds, seen = [], set(), set()
        for i in range(30):
            s = data.train[i]
            for a, _ in scored_runs(s):
                before = tok.decode(s["input_ids"][:a].tolist())[-300:]
                longer.append(bool(ending[s["copy_format"]].search(before)))
                kinds.add(s["copy_format"])
                seen.add(before[-60:])
        return longer, kinds, seen

    longer, kinds, seen = asked(1.0)
    assert kinds == set(more) and len(longer) >= 30 and all(longer)
    assert len(seen) >= 0.8 * len(longer)  # composed: hardly a wording twice
    longer, _, _ = asked(0.0)
    assert longer and not any(longer)


def test_composed_wordings_are_many_read_well_and_copy_no_evaluation():
    from cepe.data.builders import wordings

    from cepe.data.builders.facts import CHAIN_QUESTIONS, MULTI_QUESTIONS, QUESTIONS

    rng = np.random.default_rng(0)
    pairs = ((wordings.SINGLE, QUESTIONS), (wordings.MULTI, MULTI_QUESTIONS), (wordings.CHAIN, CHAIN_QUESTIONS))
    for c, short in pairs:
        forms = c.all()
        assert len(forms) == len(c) == len(set(forms)) >= 300 and not set(forms) & set(short)
        assert len({c.draw(rng) for _ in range(300)}) > 150
        # after "..., " the request goes on in lower case, except "I"
        after_comma = [f.split(", ", 1)[1] for f in forms if f.startswith(("Based on", "According to"))]
        assert all(f[0].islower() or f[0] in "{I" for f in after_comma)
    asked = [f.format(k="Ann", a="special magic number", v="42") for f in wordings.MULTI.all()]
    # neither RULER's multi-value question nor the wording probe's held-out one
    assert not any("mentioned in the provided text" in f or f.startswith("Name every") for f in asked)
