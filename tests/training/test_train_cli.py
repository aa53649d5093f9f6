"""`cepe train` on the command line."""

from __future__ import annotations

import json

from train_helpers import TINY

from cepe.cli import main


def test_print_config_with_overrides_and_trailing_options(capsys):
    assert main(["train", "--config", str(TINY), "max_steps=3", "--print-config", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "lr: 0.01" in out


def test_errors_are_reported_not_raised(capsys, tmp_path):
    assert main(["train", "--config", str(TINY), "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_train_and_dry_run(capsys, tmp_path):
    assert main(["train", "--config", str(TINY), f"output_dir={tmp_path}", "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["trainable_params"] > 0 and "synthetic" in report["data"]
    assert (
        main(
            ["train", "--config", str(TINY), f"output_dir={tmp_path}", "max_steps=2", "train.eval_samples=16",
             "--no-progress"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "held-out accuracy with context" in out and (tmp_path / "adapter" / "config.json").is_file()


def test_standalone_module_entry(capsys):
    from cepe.training.cli import main as train_main

    assert train_main(["--config", str(TINY), "max_steps=3", "--print-config"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out
    assert train_main(["--config", str(TINY), "train.nope=1"]) == 2
