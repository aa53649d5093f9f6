"""Issue 15's measure over `cepe eval ppl` result files: the share of full attention's gain that CEPE
recovers, (truncated - cepe) / (truncated - full), per domain and decoder window D, at one context
length; a Markdown table on stdout and a plot of the gain against D.

    python3 scripts/gain_recovered.py docs/results/h200/general_s2/ppl_smollm2_*_D*.json \
        --out docs/results/h200/general_s2/gain_recovered.png
File names give the domain and D (`ppl_<stage>_<domain>_D<D>.json`, as `scripts/gpu/general.sh eval`
writes them). `--baselines FILES` supplies the methods a run did not repeat (e.g. `--methods cepe`
runs reusing an earlier run's truncated and full rows), only where both files scored the same windows.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def read(paths: list[str], context: int, baselines: list[str] = ()) -> dict[str, dict[int, dict[str, float]]]:
    """{domain: {D: {method: ppl}}} at D + `context` total tokens; methods missing from a file come
    from the baseline file of the same domain and D, if its windows are the same."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    windows: dict[tuple[str, int], list] = {}
    for p in paths:
        domain, d, results = _load(p)
        total = str(d + context)
        windows[domain, d] = results.get("windows")
        out.setdefault(domain, {})[d] = {k: v[total]["ppl"] for k, v in results["methods"].items() if total in v}
    for p in baselines:
        domain, d, results = _load(p)
        if (domain, d) not in windows:
            continue
        if results.get("windows") != windows[domain, d]:
            raise SystemExit(f"{p}: other windows than the run it would complete")
        total = str(d + context)
        for k, v in results["methods"].items():
            if total in v:
                out[domain][d].setdefault(k, v[total]["ppl"])
    return out


def _load(path: str) -> tuple[str, int, dict]:
    m = re.search(r"_([A-Za-z0-9-]+)_D(\d+)\.json$", path)
    if not m:
        raise SystemExit(f"{path}: not named ppl_<stage>_<domain>_D<D>.json")
    return m.group(1), int(m.group(2)), json.loads(Path(path).read_text())["results"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--context", type=int, default=4096, help="context tokens before the window (default 4096)")
    ap.add_argument("--method", default="cepe")
    ap.add_argument("--baselines", nargs="*", default=[], help="result files supplying missing methods")
    ap.add_argument("--out", help="plot path (.png)")
    args = ap.parse_args()
    table = read(args.files, args.context, args.baselines)
    print(f"| domain | D | truncated | full | {args.method} | gain recovered |\n|---|---|---|---|---|---|")
    gains: dict[int, dict[str, float]] = {}
    for domain in sorted(table):
        for d in sorted(table[domain]):
            r = table[domain][d]
            t, f, c = r["truncated"], r["full"], r[args.method]
            g = (t - c) / (t - f) if t != f else float("nan")
            gains.setdefault(d, {})[domain] = g
            print(f"| {domain} | {d:,} | {t:.2f} | {f:.2f} | {c:.2f} | {g:.0%} |")
    for d in sorted(gains):
        vals = list(gains[d].values())
        print(f"| **mean of {len(vals)}** | {d:,} | | | | **{sum(vals) / len(vals):.0%}** |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for domain in sorted(table):
            ds = sorted(d for d in gains if domain in gains[d])
            ax.plot(ds, [100 * gains[d][domain] for d in ds], marker="o", label=domain)
        ds = sorted(gains)
        ax.plot(ds, [100 * sum(gains[d].values()) / len(gains[d]) for d in ds], "k--", marker="s", label="mean")
        ax.axhline(60, color="red", lw=0.8, label="target 60%")
        ax.axhline(100, color="gray", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ds, [str(d) for d in ds])
        ax.set_xlabel(f"decoder window D (after {args.context:,} context tokens)")
        ax.set_ylabel("gain of full attention recovered (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
