"""GPU transfer packs of a built mix, and a balanced subset of it.

The GPU machine has no network and takes at most 64 MiB per call, so a mix travels as
`part_NN.tar.xz` files of at most `max_bytes` each. Parts are split by file, not by byte, so each
part unpacks alone (`tar xJf part_03.tar.xz`) into the same `train/` / `heldout/` layout; every
part also carries `manifest.json`. `SHA256SUMS` (for `sha256sum -c`) and `parts.json` list them.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import multiprocessing
import tarfile
from pathlib import Path

from .build import format_table, totals

PRESET = 6
SAMPLE = 2_000_000  # bytes of each file compressed to estimate its ratio


def _estimate(path: Path) -> int:
    """Compressed size of a file, estimated from its first `SAMPLE` bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SAMPLE)
    return int(size * len(lzma.compress(head, preset=PRESET)) / max(1, len(head))) + 1


def plan_parts(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Group files (name -> estimated compressed bytes) into parts of at most `budget`, files in
    name order (held-out first), a new part when the next file would overflow."""
    parts: list[list[str]] = [[]]
    used = 0
    for name in sorted(sizes, key=lambda n: (not n.startswith("heldout/"), n)):
        if sizes[name] > budget:
            raise ValueError(f"{name}: about {sizes[name] / 2**20:.0f} MiB compressed, over one part's "
                             f"{budget / 2**20:.0f} MiB; rebuild with a smaller cap for that source")
        if parts[-1] and used + sizes[name] > budget:
            parts.append([])
            used = 0
        parts[-1].append(name)
        used += sizes[name]
    return parts


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: same files give the same tar
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tf.addfile(info, io.BytesIO(data))


def write_part(out: Path, files: list[str], dest: Path) -> dict:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, "manifest.json", (out / "manifest.json").read_bytes())
        for name in files:
            _add(tf, name, (out / name).read_bytes())
    data = lzma.compress(buf.getvalue(), preset=PRESET)
    dest.write_bytes(data)
    return {"name": dest.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "files": files}


def _write(job: tuple[Path, list[str], Path]) -> dict:
    return write_part(*job)


def pack_parts(out: Path, packs: Path, max_bytes: int = 60 * 2**20, jobs: int = 2) -> list[dict]:
    """Write `packs/part_NN.tar.xz` (each at most `max_bytes`), `SHA256SUMS` and `parts.json`."""
    out, packs = Path(out), Path(packs)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out}/manifest.json: not a built mix (run `cepe data build`)")
    names = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*.jsonl"))
    sizes = {n: _estimate(out / n) for n in names}
    packs.mkdir(parents=True, exist_ok=True)
    for old in packs.glob("part_*.tar.xz"):
        old.unlink()
    pending = plan_parts(sizes, int(max_bytes * 0.9))  # 10% margin for the estimate
    done: list[dict] = []
    with multiprocessing.get_context("fork").Pool(max(1, jobs)) as pool:
        while pending:
            jobs_ = [(out, files, packs / f"tmp_{i}.tar.xz") for i, files in enumerate(pending)]
            pending = []
            for part in pool.map(_write, jobs_):
                if part["bytes"] <= max_bytes:
                    done.append(part)
                    continue
                (packs / part["name"]).unlink()
                if len(part["files"]) == 1:
                    raise ValueError(f"{part['files'][0]} alone compresses to {part['bytes'] / 2**20:.1f} MiB")
                half = len(part["files"]) // 2  # the estimate was off: split the part and redo it
                pending += [part["files"][:half], part["files"][half:]]
    done.sort(key=lambda p: (not p["files"][0].startswith("heldout/"), p["files"][0]))
    for i, part in enumerate(done):
        final = f"part_{i:02d}.tar.xz"
        (packs / part["name"]).rename(packs / final)
        part["name"] = final
    (packs / "SHA256SUMS").write_text("".join(f"{p['sha256']}  {p['name']}\n" for p in done))
    (packs / "parts.json").write_text(json.dumps(done, indent=1) + "\n")
    return done


def _every_kth(n: int, keep: int) -> list[int]:
    """`keep` indices spread evenly over range(n) (all when keep >= n)."""
    if keep >= n:
        return list(range(n))
    return [(i * n) // keep for i in range(keep)]


def subset(out: Path, dest: Path, train_chars: int) -> dict:
    """A balanced subset: about `train_chars` of train text, an equal share per category and within
    a category per source (a source with less gives its rest to the others), documents taken evenly
    through each source; the held-out split is copied whole. Writes `dest/manifest.json`."""
    out, dest = Path(out), Path(dest)
    manifest = json.loads((out / "manifest.json").read_text())
    entries = manifest["sources"]
    train = [n for n in entries if entries[n]["split"] == "train"]
    cats = sorted({entries[n]["category"] for n in train})
    budget: dict[str, float] = {}
    left = float(train_chars)
    for ci, cat in enumerate(
        sorted(cats, key=lambda c: sum(entries[n]["characters"] for n in train if entries[n]["category"] == c))
    ):
        share = left / (len(cats) - ci)
        names = sorted((n for n in train if entries[n]["category"] == cat), key=lambda n: entries[n]["characters"])
        for si, name in enumerate(names):
            budget[name] = min(entries[name]["characters"], share / (len(names) - si))
            share -= budget[name]
            left -= budget[name]
    new = {}
    for name, e in entries.items():
        src, dst = out / e["path"], dest / e["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        lines = src.read_bytes().splitlines(keepends=True)
        if e["split"] == "train" and budget[name] < e["characters"]:
            avg = e["characters"] / max(1, len(lines))
            lines = [lines[i] for i in _every_kth(len(lines), max(1, round(budget[name] / avg)))]
        data = b"".join(lines)
        dst.write_bytes(data)
        chars = sum(len(json.loads(line)["text"]) for line in lines)
        new[name] = {**e, "documents": len(lines), "characters": chars, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}
    result = {**manifest, "subset_of": str(out), "subset_train_chars": train_chars, "sources": new,
              "totals": totals(new)}
    (dest / "manifest.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


__all__ = ["format_table", "pack_parts", "plan_parts", "subset"]
