"""The config system: YAML + typed dotted overrides; every recipe in configs/ loads."""

from __future__ import annotations

import pytest
import yaml
from train_helpers import ROOT

from cepe.training import load_config
from cepe.training.config import config_diff, fingerprint


def test_overrides_are_typed(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [
        "output_dir=runs/x", "max_steps=7", "train.lr=1e-4", "model.encoder=null", "data.train=/some/folder",
        "data.mixture.warmup=0.5", "data.heldout=[email/, json/]", "model.cross_attn_layers=[0, 1]",
        "train.gradient_checkpointing=true",
    ])
    assert cfg.output_dir == "runs/x" and cfg.train.max_steps == 7
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)  # YAML reads 1e-4 as text
    assert cfg.model.encoder is None
    assert cfg.data.train == ["/some/folder"] and cfg.data.heldout == ["email/", "json/"]
    assert cfg.data.mixture == {"warmup": 0.5}  # a mapping absent from the YAML starts empty
    assert cfg.model.cross_attn_layers == [0, 1] and cfg.train.gradient_checkpointing is True


def test_mapping_override_merges_into_the_recipe():
    cfg = load_config(ROOT / "configs/smollm2_long.yaml", ["data.train=/d", "data.mixture.retrieval=0.2"])
    assert cfg.data.mixture == {"long_document": 0.9, "warmup": 0.1, "retrieval": 0.2}


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr' \\(did you mean 'lr'\\?\\)"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("train.max_steps=many", "train.max_steps: expected an integer"),
    ("train.gradient_checkpointing=maybe", "expected true or false"),
    ("data.mixture.bogus=1", "unknown builder"),
    ("train.precision=fp8", "train.precision must be fp32 or bf16"),
    ("no_equals_sign", "expected key=value"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs/tiny_cpu.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match=f"{bad}: unknown config key 'train.max_stepz'"):
        load_config(bad)


def test_fingerprint_ignores_runtime_keys():
    a = load_config(ROOT / "configs/tiny_cpu.yaml")
    b = load_config(ROOT / "configs/tiny_cpu.yaml", ["output_dir=elsewhere", "train.log_every=3", "train.resume=none"])
    c = load_config(ROOT / "configs/tiny_cpu.yaml", ["train.lr=0.5"])
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert config_diff(a, c) == ["train.lr: 0.003 -> 0.5"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_loads(recipe):
    path = ROOT / "configs" / recipe
    header = path.read_text().split("\n\n")[0]
    assert "cepe train --config configs/" + recipe in header  # the header shows the command
    cfg = load_config(path, ["data.train=/data"] if "smollm2" in recipe or "general" in recipe else [])
    assert cfg.train.max_steps >= 1
    if recipe.startswith("smollm2"):
        assert cfg.model.decoder == "smollm2-135m" and cfg.model.encoder == "minilm-l6"
        assert cfg.data.heldout == ["persuasion.txt", "email/", "json/", "asyncio/"]
    if "distill" in recipe:
        assert cfg.distilling and cfg.model.init_adapter


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_accelerate_configs_parse(name):
    cfg = yaml.safe_load((ROOT / "configs/accelerate" / name).read_text())
    assert cfg["distributed_type"] in ("MULTI_GPU", "FSDP") and cfg["num_processes"] >= 2


def test_a_checkpoint_written_with_the_old_freeze_encoder_key_still_resumes():
    from cepe.training.config import to_dict

    with pytest.warns(FutureWarning, match="train.freeze_encoder is deprecated"):
        new = load_config(ROOT / "configs/tiny_cpu.yaml", ["train.freeze_encoder=true"])
    assert new.model.encoder_frozen == "all" and not new.train.freeze_encoder
    old = to_dict(load_config(ROOT / "configs/tiny_cpu.yaml"))  # as a checkpoint from before #13 saved it
    old["train"]["freeze_encoder"] = True
    assert fingerprint(old) == fingerprint(new)
    trained = load_config(ROOT / "configs/tiny_cpu.yaml")
    assert fingerprint(trained) != fingerprint(new)
