"""Where the adapter released with this repository lives."""

from __future__ import annotations

import os
from pathlib import Path

RELEASED_NAME = "cepe-smollm2-135m"


def released_adapter_path() -> Path:
    """`weights/<name>` of the checkout (or `$CEPE_WEIGHTS`)."""
    root = Path(os.environ.get("CEPE_WEIGHTS", Path(__file__).resolve().parents[2] / "weights"))
    path = root / RELEASED_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"released adapter not found at {path} (set CEPE_WEIGHTS to the weights/ folder)")
    return path
