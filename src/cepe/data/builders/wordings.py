"""Question wordings composed from parts (`data.facts.question_styles`): an opener, a request and
a lead into the answer, hundreds of wordings per fact format.

Why parts and not a longer list: with three short question forms per format, stages 21-22 listed
71-75% of RULER multi-value's values after those forms and 40-54% after any other wording (RULER's,
one never trained on, and a longer form), on the same haystacks (docs/results_general_stage21.md).
A list's length was tied to the question's words. Users phrase questions their own way, so no one
wording may be what the answer hangs on. None of the parts copies an evaluation's template: the
probe's held-out wording (`scripts/question_wording.py`) stays unseen.

Placeholders: {k} key, {a} attribute, {v} value; the answer follows the lead as " {v}".
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np


@dataclass(frozen=True)
class Composed:
    """Wordings opener + request + lead; an opener ending in ", " lowers the request's first word."""

    openers: tuple[str, ...]
    requests: tuple[str, ...]
    leads: tuple[str, ...]

    def draw(self, rng: np.random.Generator) -> str:
        parts = [p[int(rng.integers(len(p)))] for p in (self.openers, self.requests, self.leads)]
        return _join(*parts)

    def all(self) -> list[str]:
        """Every wording, for tests and for checking that no evaluation template is among them."""
        return [_join(*parts) for parts in product(self.openers, self.requests, self.leads)]

    def __len__(self) -> int:
        return len(self.openers) * len(self.requests) * len(self.leads)


def _join(opener: str, request: str, lead: str) -> str:
    if opener.endswith(", ") and request[1:2].islower():  # "Based on the text above, what ..."; not "I need"
        request = request[0].lower() + request[1:]
    return opener + request + lead


OPENERS = ("", "Question: ", "Q: ", "Based on the text above, ", "According to the document, ",
           "Looking back over the document, ", "One more question. ", "Please read carefully. ")
# in every lead list: the answer after a line break or on the same line
ANSWER_LEADS = ("\nAnswer:", " Answer:", "\nA:")

SINGLE = Composed(
    OPENERS,
    ("What was the {a} of {k}?", "Which {a} was given for {k}?", "Tell me {k}'s {a}.", "Find the {a} that {k} has.",
     "What {a} does {k} use?", "Could you tell me the {a} given for {k}?",
     "I am looking for the {a} of {k} in the text above.", "Find the {a} associated with {k}."),
    ANSWER_LEADS + (" The {a} of {k} is", " It is", " {k}'s {a} is", " The {a} you are looking for is",
                    " Certainly. The {a} given for {k} is"),
)
MULTI = Composed(
    OPENERS,
    ("Which {a}s does the text give for {k}? Please include all of them.", "What {a}s were given for {k}?",
     "List all the {a}s that {k} has.", "What are the {a}s of {k}? Give each one.", "Tell me every {a} for {k}.",
     "How many {a}s does {k} have, and what are they?", "I need all of {k}'s {a}s, not just one.",
     "Find each {a} of {k} in the text.", "Collect every {a} of {k} stated anywhere above.",
     "What {a}s does {k} have?"),
    ANSWER_LEADS + (" The {a}s of {k} are", " {k} has the {a}s", " They are", " Here they are:", "\n{k}:",
                    " The {a}s given for {k} are"),
)
CHAIN = Composed(
    OPENERS,
    ("Which names end up holding the value {v}?", "What variables are assigned {v}, directly or through another one?",
     "List each variable whose value is {v}.", "Find all the names that hold {v}.",
     "Tell me every variable equal to {v}.", "Track the value {v} through the assignments: which names get it?",
     "Which variables have the value {v} in the end?"),
    ANSWER_LEADS + (" They are", " The names holding {v} are", " Here they are:", " It is held by",
                    " The variables are"),
)
