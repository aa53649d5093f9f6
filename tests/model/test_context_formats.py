"""Encoded contexts stored in 8 bits (`ContextStates.save(path, state_format)`): half the bytes of
bf16, restored to the dtype they were saved from, close to the original."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cepe
from safetensors.torch import load_file, save_file

from cepe import ContextStates


def _context(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return model.encode_context([torch.randint(5, 60, (37,), generator=g).tolist(),
                                 torch.randint(5, 60, (21,), generator=g).tolist()])


@pytest.mark.parametrize("fmt, rel", [("int8", 0.01), ("fp8", 0.05)])
def test_eight_bit_files_are_half_the_bytes_and_load_close_to_the_states(tmp_path, fmt, rel):
    model = tiny_cepe("llama", "bert").to(torch.bfloat16)
    ctx = _context(model)
    ctx.save(tmp_path / "bf16.safetensors")
    ctx.save(tmp_path / "q.safetensors", fmt)
    raw = load_file(str(tmp_path / "q.safetensors"))
    s = ctx.hidden_states.shape[1]
    n = int(ctx.attention_mask.sum())
    assert raw["hidden_states"].element_size() == 1 and raw["hidden_scale"].shape == (1, n, 1)
    bf16_bytes = load_file(str(tmp_path / "bf16.safetensors"))["hidden_states"].nbytes
    assert raw["hidden_states"].nbytes + raw["hidden_scale"].nbytes == bf16_bytes // 2 + 4 * n

    back = ContextStates.load(tmp_path / "q.safetensors")
    real = ctx.attention_mask[0]  # a file keeps the real tokens only
    assert back.hidden_states.dtype == torch.bfloat16 and back.encoder_hash == ctx.encoder_hash
    assert back.attention_mask.all() and back.hidden_states.shape[1] == int(real.sum()) < s
    h, b = ctx.hidden_states[:, real].float(), back.hidden_states.float()
    assert 0 < ((b - h).norm() / h.norm()).item() < rel  # lossy, within the format's precision
    assert torch.equal(back.hidden_states, ctx.stored_as(fmt).hidden_states[:, real])  # stored_as = save + load

    ids = torch.randint(5, 60, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids, context=ctx).logits.float()
        got = model(ids, context=back).logits.float()
    assert ((got - want).norm() / want.norm()).item() < rel


def test_float_formats_cast_and_bad_formats_or_files_are_refused(tmp_path):
    model = tiny_cepe("llama", "bert")
    ctx = _context(model)  # float32
    ctx.save(tmp_path / "b.safetensors", "bfloat16")
    back = ContextStates.load(tmp_path / "b.safetensors")
    assert back.hidden_states.dtype == torch.bfloat16
    real = ctx.attention_mask[0]
    assert torch.equal(back.hidden_states.float(), ctx.stored_as("bfloat16").hidden_states[:, real])
    assert ctx.stored_as(None) is ctx
    for bad in ("int4", "bf16"):
        with pytest.raises(ValueError, match="state_format"):
            ctx.save(tmp_path / "x.safetensors", bad)
        with pytest.raises(ValueError, match="state_format"):
            ctx.stored_as(bad)
    # an 8-bit file that lost its scales is not a context file
    ctx.save(tmp_path / "q.safetensors", "int8")
    tensors = load_file(str(tmp_path / "q.safetensors"))
    meta = {"format": "cepe-context", "fingerprint": "", "batch_size": "1", "state_format": "int8", "dtype": "float32"}
    save_file({"hidden_states": tensors["hidden_states"], "attention_mask": tensors["attention_mask"]},
              str(tmp_path / "noscale.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="not a CEPE context file"):
        ContextStates.load(tmp_path / "noscale.safetensors")
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata={**meta, "state_format": "int4"})
    with pytest.raises(ValueError, match="not a CEPE context file"):
        ContextStates.load(tmp_path / "odd.safetensors")


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_bytes_hold_what_a_file_holds(tmp_path, fmt):
    """`to_bytes` / `from_bytes` (contexts crossing a pipe to the model process) give back what
    `save` / `load` give back, and refuse anything else with a ValueError."""
    model = tiny_cepe("llama", "bert")
    ctx = _context(model)
    one = ContextStates(ctx.hidden_states[:1], ctx.attention_mask[:1], ctx.encoder_hash)
    one.save(tmp_path / "c.safetensors", fmt)
    from_file = ContextStates.load(tmp_path / "c.safetensors")
    from_bytes = ContextStates.from_bytes(one.to_bytes(fmt))
    assert torch.equal(from_bytes.hidden_states, from_file.hidden_states)
    assert torch.equal(from_bytes.attention_mask, from_file.attention_mask)
    assert from_bytes.encoder_hash == ctx.encoder_hash
    for bad in (b"", b"\x05\x00", one.to_bytes(fmt)[:40], save_bytes_without_format()):
        with pytest.raises(ValueError):
            ContextStates.from_bytes(bad)


def save_bytes_without_format() -> bytes:
    from safetensors.torch import save

    return save({"hidden_states": torch.zeros(1, 2, 3), "attention_mask": torch.ones(1, 2, dtype=torch.uint8)})
