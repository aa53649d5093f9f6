"""Average adapters of one architecture weight by weight (a "model soup"), e.g. two training stages
whose strengths differ (docs/results.md: stages 4 and 5 of the general adapter).

    python3 scripts/average_adapters.py A B [C ...] --out DIR [--weights 0.5,0.5]

The result is an ordinary adapter folder: `cepe eval ... --adapter DIR`.
"""

from __future__ import annotations

import argparse

from cepe.model.adapter_io import average_adapters


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", nargs="+", help="adapter folders (two or more, one config)")
    ap.add_argument("--out", required=True, help="folder for the averaged adapter")
    ap.add_argument("--weights", help="comma-separated weights summing to 1 (default: equal)")
    a = ap.parse_args(argv)
    weights = [float(w) for w in a.weights.split(",")] if a.weights else None
    try:
        out = average_adapters(a.adapters, a.out, weights)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"average_adapters: {e}") from None
    print(f"averaged {len(a.adapters)} adapters -> {out}")


if __name__ == "__main__":
    main()
