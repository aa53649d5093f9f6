"""Adapter files: 8-bit weights (`save_pretrained(weight_format="int8")`, their loading) and averages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_cepe, tiny_decoder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cepe import CepeForCausalLM
from cepe.model.adapter_io import INT8_SCALE_SUFFIX, average_adapters, dequantize_weights, quantize_weights

SCRIPT = Path(__file__).resolve().parents[2] / "scripts/average_adapters.py"


def _trained_like(seed: int = 0):
    m = tiny_cepe("llama", "decoder", init="zero")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _logits(model) -> torch.Tensor:
    ids = torch.arange(3, 19).unsqueeze(0)
    ctx = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids, context_input_ids=ctx).logits


def _bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_int8_adapter_shrinks_the_files_and_loads_close_to_the_original(tmp_path):
    m = _trained_like()
    m.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    m.save_pretrained(tmp_path / "int8", weight_format="int8")
    assert _bytes(tmp_path / "int8") < 0.7 * _bytes(tmp_path / "bf16")  # tiny: headers and vectors weigh more
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["cepe_weight_format"] == "int8"
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    matrices = [k for k, t in m.adapter_state_dict().items() if t.dim() == 2]
    assert matrices and all(dtypes[k] == torch.int8 and dtypes[k + INT8_SCALE_SUFFIX] == torch.float32
                            for k in matrices)
    assert all(dtypes[k] != torch.int8 for k, t in m.adapter_state_dict().items() if t.dim() != 2)  # norms stay

    again = CepeForCausalLM.from_pretrained(tmp_path / "int8", decoder=tiny_decoder("llama"))
    restored = again.adapter_state_dict()
    for k, w in m.adapter_state_dict().items():
        if w.dim() == 2:  # each value within half a step of its row's scale
            step = w.abs().amax(dim=1, keepdim=True) / 127
            assert ((restored[k] - w).abs() <= step / 2 + 1e-7).all(), k
            assert not torch.equal(restored[k], w)
        else:
            assert torch.equal(restored[k], w)
    ref, got = _logits(m), _logits(again)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()


def test_quantize_round_trip_keeps_zero_rows_and_refuses_broken_pairs():
    w = torch.randn(6, 10)
    w[2] = 0.0  # a zero-initialised row (cross-attention's output projection starts at zero)
    q = quantize_weights({"a.weight": w, "a.norm": torch.ones(10)})
    back = dequantize_weights(q)
    assert torch.equal(back["a.weight"][2], torch.zeros(10)) and torch.equal(back["a.norm"], torch.ones(10))
    with pytest.raises(ValueError, match="without a matching int8 matrix"):
        dequantize_weights({"b.weight" + INT8_SCALE_SUFFIX: torch.ones(6)})
    with pytest.raises(ValueError, match="without their scales"):
        dequantize_weights({"b.weight": q["a.weight"]})


def test_damaged_int8_adapter_is_a_clear_error(tmp_path):
    m = _trained_like()
    m.save_pretrained(tmp_path, weight_format="int8")
    sd = load_file(str(tmp_path / "model.safetensors"))
    scale = next(k for k in sd if k.endswith(INT8_SCALE_SUFFIX))
    del sd[scale]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="without their scales"):
        CepeForCausalLM.from_pretrained(tmp_path, decoder=tiny_decoder("llama"))
    with pytest.raises(ValueError, match="weight_format"):
        m.save_pretrained(tmp_path / "x", weight_format="int4")


def test_average_of_two_adapters_is_their_midpoint_and_loads(tmp_path):
    a, b = _trained_like(0), _trained_like(1)
    a.save_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    b.save_pretrained(tmp_path / "b", weight_format="int8")  # int8 files are read back to floats
    average_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", weights=[0.25, 0.75])
    soup = CepeForCausalLM.from_pretrained(tmp_path / "ab", decoder=tiny_decoder("llama"))
    again_b = CepeForCausalLM.from_pretrained(tmp_path / "b", decoder=tiny_decoder("llama")).adapter_state_dict()
    sa, sb, got = a.adapter_state_dict(), again_b, soup.adapter_state_dict()
    for k in sa:
        want = (0.25 * sa[k].bfloat16().float() + 0.75 * sb[k].float()).bfloat16().float()
        assert torch.equal(got[k].float(), want), k
    with safe_open(str(tmp_path / "ab" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # an int8 adapter first: its bf16 norms, not its float32 row scales, give the stored dtype
    b.save_pretrained(tmp_path / "b8", dtype=torch.bfloat16, weight_format="int8")
    average_adapters([tmp_path / "b8", tmp_path / "a"], tmp_path / "ba")
    with safe_open(str(tmp_path / "ba" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # an adapter saved before a run-time setting existed, by another transformers version, still averages
    cfg_path = tmp_path / "b8" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("absorbed_states", "encoder_compile"):
        cfg.pop(key, None)
    cfg["transformers_version"] = "0.0.1"
    cfg_path.write_text(json.dumps(cfg))
    average_adapters([tmp_path / "a", tmp_path / "b8"], tmp_path / "ab8")
    assert (tmp_path / "ab8" / "model.safetensors").exists()
    # an adapter averaged with itself is itself
    average_adapters([tmp_path / "a", tmp_path / "a"], tmp_path / "aa")
    assert torch.equal(_logits(CepeForCausalLM.from_pretrained(tmp_path / "aa", decoder=tiny_decoder("llama"))),
                       _logits(CepeForCausalLM.from_pretrained(tmp_path / "a", decoder=tiny_decoder("llama"))))


def test_average_refuses_other_architectures_and_bad_weights(tmp_path):
    _trained_like(0).save_pretrained(tmp_path / "a")
    other = tiny_cepe("llama", "decoder", init="zero", cross_attn_layers="every:2")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="config differs"):
        average_adapters([tmp_path / "a", tmp_path / "other"], tmp_path / "x")
    with pytest.raises(ValueError, match="summing to 1"):
        average_adapters([tmp_path / "a", tmp_path / "a"], tmp_path / "x", weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="at least two"):
        average_adapters([tmp_path / "a"], tmp_path / "x")
    # the script says the error in one line instead of a traceback
    spec = importlib.util.spec_from_file_location("average_adapters", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match="config differs"):
        script.main([str(tmp_path / "a"), str(tmp_path / "other"), "--out", str(tmp_path / "y")])
    script.main([str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "y"), "--weights", "0.3,0.7"])
    assert (tmp_path / "y" / "config.json").is_file()
