"""Cleaners: turn one input file of a package into pieces of plain text.

A cleaner takes `(title, data, path)` (the file's title, its bytes, and its path on disk, which only
readers of multi-file formats use) and yields `(title, text)` pieces in the file's natural order.
`build` then normalizes each piece (`normalize`) and concatenates pieces into long documents.
"""

from __future__ import annotations

import email
import email.policy
import html
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from .rdata import read_rdata

Piece = tuple[str, str]
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def decode(data: bytes) -> str:
    """UTF-8, or Latin-1 for the few old files that are not (never fails, same bytes → same text)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def normalize(text: str) -> str:
    """One newline convention, no control characters, no trailing blanks, at most 2 empty lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = _CONTROL.sub("", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip()


def plain(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    yield title, decode(data)


def gutenberg(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """Project Gutenberg text without the licence header and footer."""
    text = decode(data)
    start = re.search(r"\*\*\* ?START OF.*?\*\*\*", text)
    if start:
        text = text[start.end():]
    end = re.search(r"\*\*\* ?END OF", text)
    if end:
        text = text[: end.start()]
    yield title, text


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "nav", "head", "header", "footer"}
    # navigation bars, menus and sidebars (DocBook, Sphinx, Texinfo, mdBook, the SQLite and Django
    # sites), matched on class or id: the same links on every page, not text
    SKIP_MARKS = {"navheader", "navfooter", "sphinxsidebar", "related", "header", "footer", "nav-panel",
                  "navigation", "breadcrumbs", "toc-sidebar", "menu-bar", "menu", "mainmenu", "submenu",
                  "searchmenu", "sidebar", "global-nav", "nav", "hd", "ft", "nav-wide-wrapper",
                  "searchresults-outer"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "dt", "dd", "table",
             "section", "blockquote", "hr"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        # inside a skipped element: its tag and how deep in same-named tags (other tags may omit
        # their end tags, e.g. <p> and <li>, so only the skipped element's own tag is counted)
        self.hidden_tag, self.hidden = "", 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag in self.BLOCK and not self.hidden:
                self.parts.append("\n")
            return
        if self.hidden:
            self.hidden += tag == self.hidden_tag
            return
        a = dict(attrs)
        marks = set((a.get("class") or "").split()) | {a.get("id") or ""}
        if tag in self.SKIP or marks & self.SKIP_MARKS:
            self.hidden_tag, self.hidden = tag, 1
            return
        if tag in self.BLOCK:
            self.parts.append("\n")
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.hidden:
            self.hidden -= tag == self.hidden_tag
            return
        if tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if not self.hidden:
            if self.pre:
                self.parts.append(data)
                return
            # outside <pre>, source line breaks and indentation are layout, not text
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip()
            if data:
                self.parts.append(data)


def html_to_text(source: str) -> str:
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    text = "".join(parser.parts)
    return re.sub(r"\n{3,}", "\n\n", text)


def html_page(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    yield title, html_to_text(decode(data))


def mallard(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """GNOME help pages (Mallard XML): the text without the <info> block and the markup."""
    text = re.sub(r"<info>.*?</info>", "", decode(data), flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    yield title, html.unescape(re.sub(r"[ \t]+", " ", text))


def manpage(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """A man page rendered to plain text by groff (no bold/underline overstrikes, no colour)."""
    if shutil.which("groff") is None:
        raise RuntimeError("the man-page cleaner needs groff (apt-get install groff-base)")
    r = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou"], input=data, capture_output=True, timeout=60)
    yield title.removesuffix(".gz"), r.stdout.decode("utf-8", "replace")


_BIBLE_BOOKS = (
    "Gen|Ex|Exod|Lev|Num|Deut|Josh|Judg|Ruth|1 Sam|2 Sam|1 Kings|2 Kings|1 Chron|2 Chron|Ezra|Neh|Esth|Job"
    "|Ps|Psa|Prov|Eccl|Eccles|Cant|Isa|Jer|Lam|Ezek|Dan|Hos|Joel|Amos|Obad|Jonah|Mic|Nah|Hab|Zeph|Hag"
    "|Zech|Mal|Matt|Mark|Luke|John|Acts|Rom|1 Cor|2 Cor|Gal|Eph|Phil|Col|1 Thess|2 Thess|1 Tim|2 Tim"
    "|Tit|Philem|Heb|James|Jas|1 Pet|2 Pet|1 John|2 John|3 John|Jude|Rev|Apoc|Wisd|Ecclus|Tobit|Judith|Macc"
)
# a quotation ends in its citation, on its own or at the end of a line: "--Gen. i. 1.", "--Luke 2: 7.",
# "--Luke"; the line end keeps out authors and titles that start like a book ("--Johnson.", "--Rom. of R.")
BIBLE_CITATION = re.compile(rf"--\s*(?:{_BIBLE_BOOKS})\b\.?(?:\s*[ivxlc\d]+[.:,]?(?:\s*\d+)?\.?)?\s*$", re.I | re.M)


def drop_bible_quotes(entry: str) -> str:
    """Remove the quotation paragraphs of a dictionary entry that cite a book of the Bible.
    GCIDE entries separate definitions and quotations by blank lines; a cited block is dropped
    whole, the definitions around it stay."""
    blocks = re.split(r"(\n\s*\n)", entry)
    return "".join(b for b in blocks if not BIBLE_CITATION.search(b))


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dict_entries(index: str, raw: bytes) -> list[tuple[str, str]]:
    """(headword, entry) in file order from a dictd `.index` (headword TAB offset TAB length, base64
    numbers, counting bytes) and the uncompressed `.dict` bytes; the `00-database-*` metadata entries are left out."""
    spans: dict[tuple[int, int], str] = {}
    meta: set[tuple[int, int]] = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        key = (_b64(parts[1]), _b64(parts[2]))
        if parts[0].startswith(("00-", "00database")):  # metadata, under several aliases
            meta.add(key)
        else:
            spans.setdefault(key, parts[0])
    return [(spans[k], decode(raw[k[0]: k[0] + k[1]])) for k in sorted(spans) if k not in meta]


def dictd(title: str, data: bytes, path: Path | None = None, bible_filter: bool = False) -> Iterator[Piece]:
    """A dictd dictionary (`.dict.dz` is gzip, already unpacked into `data`) read entry by entry,
    grouped into pieces of about 8K characters titled by their first and last headword."""
    index = Path(str(path).removesuffix(".dict.dz").removesuffix(".dict") + ".index")
    entries = dict_entries(index.read_text("utf-8", "replace"), data)
    group: list[tuple[str, str]] = []
    size = 0
    for i, (word, entry) in enumerate(entries):
        if bible_filter:
            entry = drop_bible_quotes(entry)
        group.append((word, entry.strip()))
        size += len(entry)
        if size >= 8000 or i == len(entries) - 1:
            yield f"{group[0][0]} .. {group[-1][0]}", "\n\n".join(e for _, e in group)
            group, size = [], 0


def gcide(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    yield from dictd(title, data, path, bible_filter=True)


def wordnet(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """WordNet `data.<pos>` lines → "word, word (pos): gloss", 500 glosses a piece."""
    lines = []
    for line in decode(data).splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # licence header
        head, gloss = line.split("|", 1)
        fields = head.split()
        try:
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(int(fields[3], 16))]
        except (IndexError, ValueError):
            continue
        lines.append(f"{', '.join(words)} ({fields[2]}): {gloss.strip()}")
    for i in range(0, len(lines), 500):
        yield f"{title}:{i}", "\n".join(lines[i: i + 500])


def brown(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """Brown corpus `word/tag` tokens back to running text."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", decode(data)):
        words = [tok.rsplit("/", 1)[0] for tok in para.split()]
        text = " ".join(words).replace("``", '"').replace("''", '"')
        paragraphs.append(re.sub(r" ([,.;:!?')])", r"\1", text).replace("( ", "("))
    yield title, "\n\n".join(p for p in paragraphs if p)


def mail(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """An e-mail: its subject and its text/plain and text/html bodies; headers are left out."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    parts = []
    for part in msg.walk():
        kind = part.get_content_type()
        if kind not in ("text/plain", "text/html"):
            continue
        try:
            body = part.get_content()
        except (LookupError, ValueError, AssertionError):
            body = decode(part.get_payload(decode=True) or b"")
        parts.append(html_to_text(body) if kind == "text/html" else body)
    yield title, f"Subject: {msg.get('Subject', '')}\n\n" + "\n\n".join(parts)


def rdata(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """Each character vector of an R data file, one line per element (Austen: one novel each)."""
    for name, lines in sorted(read_rdata(path).items()):
        yield f"{name}.txt", "\n".join(lines) + "\n"


def wesnoth(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """Wesnoth WML: dialogue as "speaker: message" and the longer translatable strings."""
    lines, speaker = [], None
    for m in re.finditer(r'speaker\s*=\s*(\S+)|(\w+)\s*=\s*_\s*"((?:[^"]|"")*)"', decode(data)):
        if m.group(1):
            speaker = m.group(1).strip('"')
            continue
        s = m.group(3).replace('""', '"')
        if m.group(2) == "message" and speaker:
            lines.append(f"{speaker}: {s}")
        elif len(s) > 30:
            lines.append(s)
    yield title, "\n\n".join(lines)


_CDDA_KEYS = {"description", "dynamic_line", "text", "message", "msg", "info", "yes", "no", "u_message", "snippet"}


def _cdda_strings(node, out: list[str]) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, str):
            if " " in value and (key in _CDDA_KEYS or len(value) > 60):
                out.append(value)
        else:
            _cdda_strings(value, out)


def cataclysm(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """Cataclysm: DDA JSON: descriptions, dialogue lines and snippets, in file order."""
    try:
        tree = json.loads(decode(data))
    except json.JSONDecodeError:
        return
    out: list[str] = []
    _cdda_strings(tree, out)
    yield title, "\n\n".join(out)


def endless_sky(title: str, data: bytes, path: Path | None = None) -> Iterator[Piece]:
    """Endless Sky data files: the quoted conversation and description strings."""
    found = re.findall(r"`([^`]{20,})`|\"([^\"\n]{40,})\"", decode(data))
    yield title, "\n\n".join(a or b for a, b in found)


CLEANERS: dict[str, Callable[..., Iterator[Piece]]] = {
    f.__name__: f for f in (plain, gutenberg, html_page, mallard, manpage, dictd, gcide, wordnet, brown, mail,
                            rdata, wesnoth, cataclysm, endless_sky)
}
