"""Cleaners of the broad mix on small inline fixtures (no network, no fetched data)."""

from __future__ import annotations

import gzip
import struct
import zlib

from cepe.data.mix import clean
from cepe.data.mix.rdata import read_rdata, unserialize


def test_normalize_newlines_controls_blank_runs():
    raw = "a\r\nb  \rc\x00d\x07\fe\n\n\n\n\n\nf\t \n"
    assert clean.normalize(raw) == "a\nb\ncd\ne\n\n\nf"


def test_gutenberg_header_and_footer_removed():
    raw = (b"licence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nCall me Ishmael.\n"
           b"*** END OF THE PROJECT\nfooter")
    [(title, text)] = clean.gutenberg("moby", raw)
    assert text.strip() == "Call me Ishmael." and title == "moby"


def test_html_skips_navigation_and_scripts_keeps_pre_lines():
    page = ('<html><head><title>T</title></head><body><div class="navheader"><a>Prev</a><div>Up<p>unclosed</div></div>'
            '<script>var x = 1;</script><h1>Heading</h1><p>Some   text\nacross lines.</p>'
            '<pre>line 1\n  line 2</pre><br><div class="navfooter">Next</div><p>After</p></body></html>')
    text = clean.html_to_text(page)
    assert (
        "Prev" not in text
        and "Up" not in text
        and "unclosed" not in text
        and "Next" not in text
        and "var x" not in text
    )
    assert "Heading" in text and "Some text across lines." in text and "line 1\n  line 2" in text
    assert text.rstrip().endswith("After")


def test_gcide_bible_quotations_dropped_other_quotations_kept():
    entry = ("Light \\Light\\, n.\n   1. That which makes things visible.\n\n"
             "         And God said, Let there be light: and there was light.\n         --Gen. i. 3.\n\n"
             "         But soft! what light through yonder window breaks?\n         --Shak.\n\n"
             "   2. Something that is not heavy.\n")
    kept = clean.drop_bible_quotes(entry)
    assert "Let there be light" not in kept
    assert "yonder window" in kept and "makes things visible" in kept and "not heavy" in kept
    for cited in ("--1 Cor. xiii. 12.", "obey him.        --Luke 8: 25.", "shall be abased. --Luke", "--Ps. xxiii"):
        assert clean.BIBLE_CITATION.search(cited), cited
    for author in ("--Milton.", "--Johnson.", "--Rom. of R.", "--John Ray.", "--Markham."):
        assert not clean.BIBLE_CITATION.search(author), author


def _b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def test_dictd_entries_in_file_order_without_metadata(tmp_path):
    entries = ["00-database-info\n  this file\n", "Apple\n  a fruit (café)\n", "Pear\n  another fruit\n"]
    text = "".join(entries)
    index, pos = [], 0
    for word, e in zip(["00-database-info", "apple", "pear"], entries):
        n = len(e.encode())
        index.append(f"{word}\t{_b64(pos)}\t{_b64(n)}")
        pos += n
    index.append(f"00-other-alias\t{_b64(0)}\t{_b64(len(entries[0].encode()))}")  # metadata alias
    index.append(
        f"fruit\t{_b64(len(entries[0].encode()))}\t{_b64(len(entries[1].encode()))}"
    )  # 2nd headword, same entry
    (tmp_path / "d.index").write_text("\n".join(sorted(index)) + "\n")
    got = clean.dict_entries((tmp_path / "d.index").read_text(), text.encode())
    assert [w for w, _ in got] == ["apple", "pear"]
    assert got[0][1].startswith("Apple") and "café" in got[0][1]
    [(title, piece)] = clean.dictd("d.dict.dz", text.encode(), tmp_path / "d.dict.dz")
    assert title == "apple .. pear" and "database" not in piece


def test_wordnet_glosses():
    data = b"  1 licence line | not a gloss\n00001740 03 n 02 entity 0 thing 1 001 @ 0 | that which is perceived\n"
    [(title, text)] = clean.wordnet("data.noun", data)
    assert text == "entity, thing (n): that which is perceived" and title == "data.noun:0"


def test_brown_tags_removed_and_punctuation_rejoined():
    [(_, text)] = clean.brown("ca01", b"\tThe/at jury/nn said/vbd ``/`` fine/jj ''/'' ./.\n\n\tNext/ap one/cd ./.")
    assert text == 'The jury said " fine ".\n\nNext one.'


def test_mail_subject_and_bodies_without_headers():
    raw = (b"From: a@b.c\nSubject: Hello there\nContent-Type: multipart/alternative; boundary=X\n\n--X\n"
           b"Content-Type: text/plain\n\nPlain body.\n--X\nContent-Type: text/html\n\n<p>Html <b>body</b></p>\n--X--\n")
    [(_, text)] = clean.mail("m1", raw)
    assert text.startswith("Subject: Hello there") and "Plain body." in text and "Html body" in text
    assert "a@b.c" not in text


def test_game_text_extractors():
    [(_, wml)] = clean.wesnoth("s.cfg", b'[message]\n speaker=Konrad\n message= _ "We must go ""now""."\n[/message]\n'
                                       b'description= _ "A long description of the scenario that matters."')
    assert 'Konrad: We must go "now".' in wml and "A long description" in wml
    [(_, cdda)] = clean.cataclysm("x.json", b'[{"id": "x", "description": "A rusty old car.", "name": "car"}]')
    assert cdda == "A rusty old car."


def _r_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">ii", 0x40009, len(b)) + b


def _r_strvec(items: list[str]) -> bytes:
    return struct.pack(">ii", 16, len(items)) + b"".join(_r_str(s) for s in items)


def _r_serialize(body: bytes) -> bytes:
    return b"X\n" + struct.pack(">iii", 3, 0x40202, 0x30500) + struct.pack(">i", 5) + b"UTF-8" + body


def test_rdata_reads_named_character_vectors(tmp_path):
    books = {"emma": ["Emma", "", "by Jane Austen"], "persuasion": ["Persuasion", "Chapter 1"]}
    blob, spans = b"", []
    for lines in books.values():
        obj = zlib.compress(_r_serialize(_r_strvec(lines)))
        spans.append((len(blob), 4 + len(obj)))
        blob += struct.pack(">i", 0) + obj
    names_attr = struct.pack(">i", 0x402) + struct.pack(">i", 1) + _r_str("names")

    def named_vec(values: list[bytes], names: list[str]) -> bytes:
        return (struct.pack(">ii", 0x213, len(values)) + b"".join(values) + names_attr + _r_strvec(names)
                + struct.pack(">i", 254))

    variables = named_vec([struct.pack(">ii", 13, 2) + struct.pack(">ii", *s) for s in spans], list(books))
    index = named_vec([variables], ["variables"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    assert read_rdata(tmp_path / "Rdata.rdx") == books
    pieces = list(clean.rdata("data/Rdata.rdx", b"", tmp_path / "Rdata.rdx"))
    assert pieces == [("emma.txt", "Emma\n\nby Jane Austen\n"), ("persuasion.txt", "Persuasion\nChapter 1\n")]
    assert unserialize(_r_serialize(struct.pack(">i", 254))) is None
