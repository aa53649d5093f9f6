"""The one loader (`load_model`) and the shared CLI model flags: one spelling per choice, the old
spellings still working for one release with a FutureWarning."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, tiny_decoder

from cepe.cli import build_parser
from cepe.cli_options import add_model_arguments, model_choice, model_from_args
from cepe.model.loading import adapter_and_init, dtype_name, encoder_name, load_model

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[3, 4, 5, 6, 7, 8]])
CONTEXT = [[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "decoder"
    tiny_decoder("llama").save_pretrained(path)
    return str(path)


def _logits(model) -> torch.Tensor:
    ctx = model.encode_context(CONTEXT)
    with torch.no_grad():
        return model(input_ids=IDS, context=ctx).logits


def test_spelling_helpers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spellings never warn
        assert (
            dtype_name("bfloat16") == "bfloat16" and dtype_name(torch.float16) == "float16" and dtype_name(None) is None
        )
        assert (
            encoder_name("decoder") == "decoder"
            and encoder_name("minilm-l6") == "minilm-l6"
            and encoder_name(None) is None
        )
        assert adapter_and_init(None, "copy") == (None, "copy") and adapter_and_init("released", None) == (
            "released",
            None,
        )
    for old, new in (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")):
        with pytest.warns(FutureWarning, match=f"'{new}'"):
            assert dtype_name(old) == new
    for old in ("none", "null", "None", ""):
        with pytest.warns(FutureWarning, match="'decoder'"):
            assert encoder_name(old) == "decoder"
    with pytest.warns(FutureWarning, match="adapter 'none'"):
        assert adapter_and_init("none", None) == (None, "zero")
    with pytest.warns(FutureWarning, match="adapter 'none'"):
        assert adapter_and_init("none", "copy") == (None, "copy")
    with pytest.warns(FutureWarning, match="adapter 'zero'"):
        assert adapter_and_init("zero", None) == (None, "zero")
    for adapter, init in (("dir", "zero"), (None, None), (None, "random")):
        with pytest.raises(ValueError):
            adapter_and_init(adapter, init)
    with pytest.raises(ValueError, match="dtype"):
        dtype_name("int8")


def test_decoder_derived_encoder_spellings_build_the_same_model(decoder_dir):
    new = load_model(decoder_dir, "decoder", init="copy", chunk_size=8, encoder_num_layers=2)
    assert new.config.encoder_type == "decoder" and not new.training
    for old in ("none", "null", None):
        with pytest.warns(FutureWarning):
            model = load_model(decoder_dir, old, init="copy", chunk_size=8, encoder_num_layers=2)
        assert model.config.encoder_type == "decoder"
        assert torch.equal(_logits(model), _logits(new))


def test_untrained_model_spellings_and_dtype(decoder_dir):
    zero = load_model(decoder_dir, "decoder", init="zero", chunk_size=8, encoder_num_layers=2)
    with torch.no_grad():
        base = zero.decoder(input_ids=IDS).logits
    assert torch.equal(_logits(zero), base)  # zero init: exactly the base decoder
    for adapter, init in (("zero", None), ("none", "zero"), ("none", None)):
        with pytest.warns(FutureWarning):
            model = load_model(decoder_dir, "decoder", adapter, init, chunk_size=8, encoder_num_layers=2)
        assert model.config.cross_attn_init == "zero" and torch.equal(_logits(model), base)
    with pytest.warns(FutureWarning, match="'bfloat16'"):
        half = load_model(decoder_dir, "decoder", init="zero", dtype="bf16", chunk_size=8, encoder_num_layers=2)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_adapter_round_trip_and_encoder_checks(decoder_dir, tmp_path):
    enc = tiny_bert()
    model = load_model(tiny_decoder("llama"), enc, init="copy", chunk_size=8)
    model.save_pretrained(tmp_path / "hf")
    again = load_model(decoder_dir, None, tmp_path / "hf")  # encoder None: the adapter's own
    assert torch.equal(_logits(again), _logits(model))
    with pytest.raises(ValueError, match="HF encoder"):
        load_model(decoder_dir, "decoder", tmp_path / "hf")
    with pytest.warns(FutureWarning):  # the old `--encoder none` beside an adapter: its own encoder
        assert torch.equal(_logits(load_model(decoder_dir, "none", tmp_path / "hf")), _logits(model))
    derived = load_model(decoder_dir, "decoder", init="copy", chunk_size=8, encoder_num_layers=2)
    derived.save_pretrained(tmp_path / "derived")
    assert torch.equal(_logits(load_model(decoder_dir, "decoder", tmp_path / "derived")), _logits(derived))
    with pytest.raises(ValueError, match="not both"):
        load_model(decoder_dir, None, tmp_path / "derived", "zero")
    # an HF encoder beside a decoder-derived adapter would be ignored: refused instead
    with pytest.raises(ValueError, match="its own decoder-derived encoder"):
        load_model(decoder_dir, enc, tmp_path / "derived")


@pytest.mark.parametrize("command", ["eval ppl --data x", "serve", "demo"])
def test_every_command_shares_the_flags(command):
    parse = lambda *a: build_parser().parse_args([*command.split(), *a])  # noqa: E731
    new = model_choice(parse("--init", "zero", "--encoder", "decoder", "--dtype", "bfloat16"))
    assert new == {"decoder": None, "encoder": "decoder", "adapter": None, "init": "zero", "dtype": "bfloat16",
                   "chunk_size": 256, "encoder_layers": 4}
    with pytest.warns(FutureWarning):
        assert model_choice(parse("--adapter", "none", "--encoder", "none", "--dtype", "bf16")) == new
    with pytest.warns(FutureWarning):
        assert model_choice(parse("--adapter", "zero", "--encoder", "null", "--dtype", "bf16")) == new
    assert model_choice(parse("--init", "copy"))["encoder"] == "minilm-l6"  # the default encoder of --init
    default = model_choice(parse())
    assert default["adapter"] == (None if command.startswith("eval") else "released") and default["init"] is None
    assert model_choice(parse("--adapter", "/a/b"))["encoder"] is None  # the adapter's own
    with pytest.raises(SystemExit):
        parse("--dtype", "int8")


def test_bench_shares_dtype_and_device():
    args = build_parser().parse_args(["bench", "--smoke"])
    assert args.dtype == "bfloat16" and args.device == "cuda"
    with pytest.warns(FutureWarning):
        assert build_parser().parse_args(["bench", "--dtype", "fp16"]).dtype == "float16"


def test_model_from_args_old_and_new_spellings(decoder_dir):
    p = argparse.ArgumentParser()
    add_model_arguments(p, default_adapter="released", device_default="cpu")
    common = ["--decoder", decoder_dir, "--chunk-size", "8", "--encoder-layers", "2"]
    new = model_from_args(p.parse_args([*common, "--init", "zero", "--encoder", "decoder"]))
    with pytest.warns(FutureWarning):
        old = model_from_args(p.parse_args([*common, "--adapter", "none", "--encoder", "none"]))
    assert new.config.to_dict() == old.config.to_dict() and torch.equal(_logits(new), _logits(old))


def test_training_config_spellings():
    from cepe.training import load_config
    from cepe.training.build import build_model
    from cepe.training.config import fingerprint

    recipe = ROOT / "configs/tiny_cpu.yaml"
    small = ["model.encoder_num_layers=2", "model.chunk_size=8"]
    new = load_config(recipe, ["model.encoder=decoder", "model.dtype=float32", *small])
    with pytest.warns(FutureWarning, match="'float32'"):
        old = load_config(recipe, ["model.encoder=null", "model.dtype=fp32", *small])
    assert old.model.dtype == "float32"
    assert fingerprint(new) == fingerprint(old)  # checkpoints written with the old spellings still resume
    assert build_model(new).config.encoder_type == "decoder"
    with pytest.warns(FutureWarning, match="model.encoder=null"):
        assert build_model(old).config.encoder_type == "decoder"
