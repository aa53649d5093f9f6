"""RULER's synthetic tasks: deterministic generators, prompts within their token budget that hold
their answers, and the scoring (an oracle that reads the needles scores 100, a constant ~0)."""

from __future__ import annotations

import re
from collections import Counter
from random import Random

import pytest
from eval_helpers import char_tokenizer

from cepe.evaluation.methods import DoesNotFit, Method
from cepe.evaluation.tasks import ruler
from cepe.evaluation.tasks.common import encode
from cepe.evaluation.tasks.ruler_data import DEPTHS, NOISE, TASKS, Haystack, bundled_words, generate

ALL = list(TASKS)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def solve(text: str) -> str:
    """Answer a RULER prompt by reading it, as a model that copies the needles would."""
    if m := re.search(r"for (.+) mentioned in the provided text\? The special", text):
        keys = re.split(r", and |, ", m.group(1))
        return " ".join(v for k in keys for v in re.findall(rf"for {re.escape(k)} is: ([\w-]+)\.", text))
    if values := re.findall(r"assigned the value (\d+) in the text above", text):
        found = {v for v, x in re.findall(r"VAR (\w+) = (\d+)", text) if x == values[-1]}
        links = re.findall(r"VAR (\w+) = VAR (\w+)", text)
        for _ in links:
            found |= {a for a, b in links if b in found}
        return " ".join(sorted(found))
    if "numbered list" in text:
        listed = text.split("most often.\n")[-1].split("\nQuestion")[0]
        return " ".join(w for w, _ in Counter(re.findall(r"\d+\. ([\w-]+)", listed)).most_common(10))
    coded = Counter(text.split("coded words. ")[-1].split("\nQuestion")[0].split())
    return " ".join(w for w, _ in coded.most_common(4) if w != "...")


class Fake(Method):
    """Answers from the whole prompt (`oracle`), or always the same text."""

    def __init__(self, tokenizer, answer=None, name="fake"):
        self.tok, self.answer, self.name = tokenizer, answer, name

    def generate(self, request, max_new_tokens, stop_ids=frozenset()):
        text = self.tok.decode(request.prefix + request.context_ids() + request.tokens)
        return encode(self.tok, self.answer if self.answer is not None else solve(text))


def test_generators_are_deterministic_under_a_seed(tok):
    def prompts(seed):
        b = ruler.PromptBuilder(tok, seed=seed)
        return [(p.prefix, p.body) for t in ALL for p in (b.prompt(t, 2000, 0), b.prompt(t, 2000, 1))]

    first = prompts(3)
    assert prompts(3) == first
    assert prompts(4) != first
    assert len({tuple(body) for _, body in first}) == len(first)  # samples differ from one another
    s = generate("niah_multivalue", Random(0), 50, 4096, Haystack())
    assert s == generate("niah_multivalue", Random(0), 50, 4096, Haystack())


@pytest.mark.parametrize("length", [2000, 12000])
def test_samples_fit_their_budget_and_hold_their_answers(tok, length):
    b = ruler.PromptBuilder(tok)
    for task in ALL:
        for i in range(2):
            p = b.prompt(task, length, i)
            assert p.budget_tokens <= length, (task, p.budget_tokens)
            assert p.budget_tokens > 0.85 * length, (task, p.budget_tokens)  # the largest haystack that fits
            body = tok.decode(p.body)
            assert p.sample.answers and all(a in tok.decode(p.body) for a in p.sample.answers), task
            assert body.endswith(p.sample.question.rstrip())
            req = ruler.window_request(p.prefix, p.body, 256)
            assert req.prefix == p.prefix and req.tokens == p.body[-256:] and req.context == [p.body[:-256]]


def test_task_definitions():
    words = bundled_words()
    assert len(words.nouns) > 5000 and len(words.adjectives) > 800 and len(words.verbs) > 900
    assert DEPTHS[0] == 0 and DEPTHS[-1] == 100 and len(DEPTHS) == 40
    s = generate("niah_single", Random(1), 100, 4096, Haystack())
    assert re.fullmatch(r"\d{7}", s.answers[0]) and f"is: {s.answers[0]}." in s.context
    assert s.context.count(NOISE) == 100 and s.intro.startswith("A special magic number is hidden")
    assert s.question.endswith("mentioned in the provided text is")
    s = generate("niah_multikey_uuid", Random(1), 30, 4096, Haystack())
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.answers[0])
    assert s.context.count("One of the special magic uuids for") == 31 and NOISE not in s.context
    s = generate("niah_multiquery", Random(1), 100, 4096, Haystack())
    assert (
        len(s.answers) == 4
        and s.question.count(", and ") == 2
        and "What are all the special magic numbers" in s.question
    )
    s = generate("niah_multivalue", Random(1), 100, 4096, Haystack())
    assert len(s.answers) == 4 and len(s.depths) == 4 and s.depths == sorted(s.depths)
    s = generate("vt", Random(1), 40, 4096, Haystack())
    assert len(s.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", a) for a in s.answers)
    assert f"VAR {s.answers[1]} = VAR {s.answers[0]}" in s.context
    assert len(re.findall(r"^VAR ", s.intro, re.MULTILINE)) == 5  # the worked example
    s = generate("cwe", Random(1), 60, 8192, Haystack())
    counts = Counter(re.findall(r"\d+\. ([\w-]+)", s.context))
    assert all(counts[a] == 30 for a in s.answers) and len(counts) == 60 and max(counts.values()) == 30
    assert sorted(counts.values())[:50] == [3] * 50
    s = generate("fwe", Random(1), 1000, 8192, Haystack())
    coded = Counter(s.context.split())
    assert [w for w, _ in coded.most_common(4)] == ["...", *s.answers] and all(len(a) == 6 for a in s.answers)
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate("qa_1", Random(0), 10, 4096, Haystack())


def test_haystack_from_text():
    h = Haystack("First one. Second one!  Third\none? Fourth.", "file.txt")
    assert h.units == ["First one.", "Second one!", "Third one?", "Fourth."] and h.take(5)[-1] == "First one."
    s = generate("niah_single", Random(0), 8, 4096, h)
    key = s.question.split(" for ")[1].split(" mentioned")[0]
    needle = f"One of the special magic numbers for {key} is: {s.answers[0]}."
    assert needle in s.context and s.context.replace(needle, "").split() == " ".join(h.take(8)).split()
    with pytest.raises(ValueError, match="no text"):
        Haystack("  \n", "empty.txt")


def test_scoring_and_effective_length():
    assert ruler.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert ruler.string_match_part("the answer: ABC", ["abc", "x"]) == 1.0
    assert ruler.string_match_part("nothing", ["abc"]) == 0.0
    assert ruler.effective_length({4096: 90.0, 8192: 86.0, 16384: 50.0}) == 8192
    assert ruler.effective_length({4096: 80.0, 8192: None}) is None


def test_run_oracle_scores_100_and_constant_about_0(tok):
    class TooLong(Fake):  # like `full`, refuses the longer prompts
        def generate(self, request, max_new_tokens, stop_ids=frozenset()):
            if len(request.prefix) + len(request.context_ids()) + len(request.tokens) > 3000:
                raise DoesNotFit("too long")
            return super().generate(request, max_new_tokens, stop_ids)

    methods = {"oracle": Fake(tok), "constant": Fake(tok, "1234567 the special magic number is ABCDE"),
               "short": TooLong(tok)}
    s = ruler.RulerSettings(tasks=ALL, lengths=[2000, 4000], samples=2, decoder_tokens=128, batch_size=2)
    out = ruler.run(methods, s, tok, progress=False)
    oracle, constant, short = (out["methods"][n] for n in ("oracle", "constant", "short"))
    assert all(v == 100 for t in ALL for v in oracle["scores"][t].values())
    assert oracle["effective_length"] == 4000 and oracle["average"]["4000"] == 100
    assert max(v for t in ALL for v in constant["scores"][t].values()) <= 10 and constant["effective_length"] is None
    assert all(short["scores"][t]["4000"] is None for t in ALL) and short["average"]["4000"] is None
    assert short["effective_length"] == 2000 and len(out["does_not_fit"]["short"]) == len(ALL)
    assert all(0 < out["prompt_tokens"][t][str(n)] <= n for t in ALL for n in (2000, 4000))
    # every answer is kept to read (those that fit), with its sample index and score
    kept = [(x["method"], x["task"], x["length"], x["index"]) for x in out["samples"]]
    assert len(kept) == len(set(kept)) == len(ALL) * 2 * (2 + 2 + 1)
    assert all(x["score"] == 100 for x in out["samples"] if x["method"] == "oracle")
    header, rows = ruler.table(out)
    assert header == ["method", "task", "2000", "4000"] and len(rows) == 3 * (len(ALL) + 1)
    assert "oracle 4000" in ruler.note(out) and "constant < 2000" in ruler.note(out)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.RulerSettings(tasks=["nope"])


def test_a_probe_rebuilds_a_results_samples_from_its_haystack_sizes(tok, monkeypatch):
    s = ruler.RulerSettings(tasks=["niah_multivalue", "vt"], lengths=[2000], samples=3, decoder_tokens=128)
    out = ruler.run({"oracle": Fake(tok)}, s, tok, progress=False)
    builder = ruler.PromptBuilder(tok)

    def no_search(task, length):
        raise AssertionError("the sizes come from the result, not a new search")

    monkeypatch.setattr(builder, "_largest", no_search)
    builder.reuse_sizes(out)
    assert builder.sizes == {("niah_multivalue", 2000): out["haystack_size"]["niah_multivalue@2000"],
                             ("vt", 2000): out["haystack_size"]["vt@2000"]}
    for row in out["samples"]:
        p = builder.prompt(row["task"], row["length"], row["index"])
        assert (p.sample.answers, p.sample.depths) == (row["answers"], row["depths"])


def test_progress_moves_after_every_batch_not_every_cell(tok, monkeypatch):
    """A CPU cell of 32 samples at 16K takes ~15 minutes: the bar must move per batch."""
    seen = []

    class Bar:
        def __init__(self, total, **kw):
            self.total = total

        def update(self, n):
            seen.append(n)

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    monkeypatch.setattr(ruler, "tqdm", Bar)
    s = ruler.RulerSettings(tasks=["niah_single"], lengths=[2000], samples=5, decoder_tokens=128, batch_size=2)
    ruler.run({"oracle": Fake(tok)}, s, tok)
    assert seen == [2, 2, 1]
