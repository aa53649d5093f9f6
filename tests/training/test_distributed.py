"""Two CPU processes (gloo) train exactly like one process at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from train_helpers import TINY, losses, tiny_config

from cepe.training import Trainer


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    Trainer(tiny_config(one, "max_steps=4", "train.grad_accum=2"), progress=False).fit()
    # the same command a GPU host runs under `accelerate launch`; on CPU, torchrun starts the processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cepe.cli",
           "train", "--config", str(TINY), f"output_dir={two}", "max_steps=4", "train.batch_size=8",
           "train.log_every=1", "train.eval_every=0", "train.eval_samples=32", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": str(tmp_path / "err.json")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    summary_two = (two / "summary.json").read_text()
    assert '"processes": 2' in summary_two and '"global_batch": 16' in summary_two
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    w1, w2 = (
        load_file(str(one / "adapter" / "model.safetensors")),
        load_file(str(two / "adapter" / "model.safetensors")),
    )
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max() < 1e-5, k
