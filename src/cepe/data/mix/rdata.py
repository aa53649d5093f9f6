"""Read the character vectors of an R lazy-load database (`data/Rdata.rdx` + `Rdata.rdb`).

Debian's `r-cran-janeaustenr` ships the six Austen novels this way: one character vector (a line
each) per novel. The index (`.rdx`, gzip) maps each name to (offset, length) in the `.rdb`, where
each object is a 4-byte length followed by a zlib stream of R's XDR serialization. Only the types
these files use are decoded; anything else is a clear error, not a wrong text.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

NILVALUE, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
NO_ATTR_NIL = (242, 253, 251)  # EMPTYENV, BASEENV, GLOBALENV: singletons without payload


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization (expected 'X\\n')")
        self.b, self.i, self.refs = data, 2, []
        version = self.int()
        self.i += 8  # writer's and minimal reader's R versions
        if version == 3:
            n = self.int()  # native encoding name
            self.i += n
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == NILVALUE or kind in NO_ATTR_NIL:
            return None
        if kind == REF:
            return self.refs[(flags >> 8) - 1]
        if kind == SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LIST:  # pairlist: attributes, tag, value, then the rest
            out = {}
            while kind == LIST:
                if has_attr:
                    self.item()  # pairlist attributes: not needed here
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != NILVALUE:
                raise ValueError(f"pairlist ends in type {kind}")
            return out
        if kind == CHAR:
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i : self.i + n].decode("utf-8", "replace")
            self.i += n
            return s
        n = self.int()
        if kind in (INT, LGL):
            value = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == REAL:
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (STR, VEC):
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R object type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            if isinstance(attrs, dict) and "names" in attrs and kind == VEC:
                return dict(zip(attrs["names"], value))
        return value


def unserialize(data: bytes):
    return _Reader(data).item()


def read_rdata(rdx: Path) -> dict[str, list[str]]:
    """{name: character vector} for every character vector in the lazy-load database `rdx`
    (its `.rdb` lies beside it)."""
    index = unserialize(gzip.decompress(Path(rdx).read_bytes()))
    blob = Path(rdx).with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        raw = blob[offset : offset + length]
        value = unserialize(zlib.decompress(raw[4:]))
        if isinstance(value, list) and all(isinstance(v, str) or v is None for v in value):
            out[name] = ["" if v is None else v for v in value]
    return out
