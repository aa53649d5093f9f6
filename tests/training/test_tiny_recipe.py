"""The CPU recipe learns a task that only the context can answer, with the decoder frozen."""

from __future__ import annotations

import json
import time

from train_helpers import TINY, same, state

from cepe.training import Trainer, load_config


def test_tiny_cpu_recipe_reads_the_context(tmp_path):
    t0 = time.time()
    trainer = Trainer(load_config(TINY, [f"output_dir={tmp_path / 'run'}", "train.eval_every=0"]), progress=False)
    decoder_before = state(trainer.unwrapped.decoder)
    trainer.fit()
    elapsed = time.time() - t0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 800
    assert summary["accuracy_with_context"] >= 0.9, summary
    # without the context the frozen decoder can only guess among the 16 values
    assert abs(summary["accuracy_without_context"] - summary["chance"]) < 0.05, summary
    assert same(decoder_before, state(trainer.unwrapped.decoder))
    assert elapsed < 120
