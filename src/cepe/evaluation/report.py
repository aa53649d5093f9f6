"""Result files: one JSON per run (config, data fingerprint, code version, timings, results),
a short printed table, and where the plot goes."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def code_version() -> str:
    """`git describe` of the checkout the package runs from, else the package version."""
    from .. import __version__

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def environment(device: str | torch.device) -> dict:
    import transformers

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": str(dev),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


class Timer:
    """Seconds spent per name (`with timer("cepe"): ...`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def summary(self) -> dict:
        return {
            "total_s": round(time.perf_counter() - self.start, 2),
            **{k: round(v, 2) for k, v in self.seconds.items()},
        }


def _clean(obj):
    """JSON-safe: NaN/inf become null, tensors become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(out_dir: str | Path, name: str, task: str, config: dict, data: dict, results: dict,
                  timings: dict, env: dict, extra: dict | None = None) -> Path:
    """Write `<out_dir>/<name>.json`; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": task,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "environment": env,
        "config": config,
        "data": data,
        "timings": timings,
        "results": results,
        **(extra or {}),
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(_clean(payload), indent=2) + "\n")
    return path


def format_table(header: list[str], rows: list[list]) -> str:
    """A small fixed-width table (floats with 3 significant decimals, None as '-')."""

    def cell(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).rjust(w) if i else str(h).ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def print_summary(header: list[str], rows: list[list], results_path: Path, note: str = "", plot=None) -> None:
    """The end of a run: its table, a note, where the results went, and the plot (`plot()` draws
    it and returns its path) once the results are safe on disk."""
    print(format_table(header, rows))
    if note:
        print(note)
    print(f"results: {results_path}")
    if plot is not None:
        print(f"plot:    {plot()}")
