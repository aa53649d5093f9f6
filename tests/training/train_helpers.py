"""Shared pieces of the training tests: short runs of the tiny CPU recipe."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def tiny_config(out: Path, *overrides: str):
    """The tiny recipe, shortened: a few steps, small batches, every step logged."""
    from cepe.training import load_config

    return load_config(TINY, [f"output_dir={out}", "max_steps=6", "train.batch_size=8", "train.log_every=1",
                              "train.eval_every=0", "train.eval_samples=32", *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
