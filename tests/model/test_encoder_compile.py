"""The context encoder compiled where it pays (`encoder_compile`): which passes compile, that the
states do not change, and that a failed compilation falls back to the eager encoder."""

from __future__ import annotations

import copy

import pytest
import torch

from cepe.model.encoder_compile import AUTO_MIN_CHUNKS, EncoderRunner
from tests.conftest import tiny_cepe


class CountingCompile:
    """Stands in for `torch.compile`: records each compilation and each compiled call."""

    def __init__(self, fail: bool = False):
        self.compiled, self.calls, self.fail = 0, 0, fail

    def __call__(self, fn, dynamic):
        assert not dynamic  # fixed pass sizes: static graphs
        self.compiled += 1

        def run(*args):
            self.calls += 1
            if self.fail:
                raise RuntimeError("no C++ compiler")
            return fn(*args)
        return run


def _chunks(model, n: int, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.encoder.vocab_size, (1, n, length), generator=g)
    return ids, torch.ones_like(ids)


def test_auto_compiles_only_long_inference_passes_on_cuda():
    model = tiny_cepe("llama")
    runner = model.encoder_runner
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with torch.no_grad():
        assert runner.wants_compile("auto", AUTO_MIN_CHUNKS, cuda)
        assert not runner.wants_compile("auto", AUTO_MIN_CHUNKS - 1, cuda)  # too short to pay
        assert not runner.wants_compile("auto", 4 * AUTO_MIN_CHUNKS, cpu)
        assert not runner.wants_compile("never", 4 * AUTO_MIN_CHUNKS, cuda)
        assert runner.wants_compile("always", 1, cpu)
    assert not runner.wants_compile("auto", AUTO_MIN_CHUNKS, cuda)  # grad enabled: training
    with pytest.raises(ValueError, match="encoder_compile"):
        runner.wants_compile("sometimes", 8, cpu)


def test_compiled_passes_give_the_eager_states_and_compile_once():
    model = tiny_cepe("llama")
    model.config.encoder_chunks_per_pass = 3
    fake = CountingCompile()
    model.encoder_runner = EncoderRunner(model.encoder, compile_fn=fake)
    ids, mask = _chunks(model, 7)
    mask[0, 6] = 0  # an all-padding chunk is never run
    with torch.no_grad():
        eager = model.encode(ids, mask)
        assert fake.compiled == 0  # `auto` on the CPU stays eager
        model.config.encoder_compile = "always"
        assert model.encoder_runner.compile_pending("always", 3, ids.device)
        compiled = model.encode(ids, mask)
        model.encode(*_chunks(model, 2, seed=1))  # another chunk count: the same compiled function
    assert fake.compiled == 1 and fake.calls == 3  # slices of 3, 3 live chunks... then 2
    assert not model.encoder_runner.compile_pending("always", 3, ids.device)
    torch.testing.assert_close(compiled.hidden_states, eager.hidden_states, rtol=0, atol=0)
    assert torch.equal(compiled.attention_mask, eager.attention_mask)


def test_failed_compilation_warns_once_and_stays_eager():
    model = tiny_cepe("llama")
    fake = CountingCompile(fail=True)
    model.encoder_runner = EncoderRunner(model.encoder, compile_fn=fake)
    ids, mask = _chunks(model, 4)
    with torch.no_grad():
        model.config.encoder_compile = "never"
        eager = model.encode(ids, mask).hidden_states
        model.config.encoder_compile = "always"
        with pytest.warns(UserWarning, match="compiling the context encoder failed"):
            first = model.encode(ids, mask).hidden_states
        again = model.encode(ids, mask).hidden_states
    assert fake.calls == 1 and "no C++ compiler" in model.encoder_runner.failure
    assert torch.equal(first, eager) and torch.equal(again, eager)


def test_runner_follows_the_model_through_copies_and_swaps():
    model = tiny_cepe("llama")
    clone = copy.deepcopy(model)
    assert clone.encoder_runner.encoder is clone.encoder
    assert "encoder_runner" not in dict(model.named_children())  # not a module: nothing saved
    assert not any(k.startswith("encoder_runner") for k in model.state_dict())
    other = tiny_cepe("llama").encoder
    model.encoder = other
    with torch.no_grad():
        model.encode(*_chunks(model, 2))
    assert model.encoder_runner.encoder is other


def test_setting_is_validated_and_overridable(tmp_path):
    from cepe import CepeConfig, CepeForCausalLM

    with pytest.raises(ValueError, match="encoder_compile"):
        CepeConfig(encoder_compile="yes")
    model = tiny_cepe("llama")
    assert model.config.encoder_compile == "auto"
    model.save_pretrained(tmp_path)
    loaded = CepeForCausalLM.from_pretrained(tmp_path, decoder=model.decoder, encoder_compile="never")
    assert loaded.config.encoder_compile == "never"
    with pytest.raises(ValueError, match="encoder_compile"):
        CepeForCausalLM.from_pretrained(tmp_path, decoder=model.decoder, encoder_compile="fast")


def test_real_compilation_matches_the_eager_encoder():
    """torch.compile (inductor) on the CPU, decoder-derived encoder: the states agree to rounding."""
    model = tiny_cepe("llama", encoder=None)
    ids, mask = _chunks(model, 5)
    mask[0, 4, 5:] = 0  # a partly padded chunk
    with torch.no_grad():
        eager = model.encode(ids, mask).hidden_states
        model.config.encoder_compile = "always"
        compiled = model.encode(ids, mask).hidden_states
        longer = model.encode(*_chunks(model, 9, seed=2)).hidden_states  # a new chunk count
        model.config.encoder_compile = "never"
        longer_eager = model.encode(*_chunks(model, 9, seed=2)).hidden_states
    assert model.encoder_runner.failure is None
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(longer, longer_eager, rtol=1e-5, atol=1e-5)


def test_long_contexts_run_as_fixed_size_passes(monkeypatch):
    """`auto` cuts a context into passes of the compiled sizes (256 and 64 chunks, largest first)
    and runs the remainder eagerly; a very wide encoder gets smaller passes (32-bit indexing)."""
    import cepe.model.encoder_compile as ec

    assert ec.split_passes(1008, [256, 64]) == [256, 256, 256, 64, 64, 64, 48]
    assert ec.split_passes(512, [256, 64]) == [256, 256] and ec.split_passes(40, [256, 64]) == [40]

    class Wide(torch.nn.Module):
        hidden_size = 4096

        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(4096, 2**20, device="meta")
    assert ec.pass_sizes(Wide(), 256) == [4]  # (2**31 - 1) // (256 * 2**20) = 7 -> 4
    model = tiny_cepe("llama")
    fake = CountingCompile()
    model.encoder_runner = EncoderRunner(model.encoder, compile_fn=fake)
    monkeypatch.setattr(ec, "PASS_CHUNKS", (4, 2))
    seen = []
    real = model.encoder.forward
    model.encoder.forward = lambda ids, mask: seen.append(ids.shape[0]) or real(ids, mask)
    ids, mask = _chunks(model, 7)
    with torch.no_grad():
        eager = model.encoder(ids[0], mask[0])
        seen.clear()
        states = model.encoder_runner(ids[0], mask[0], "auto")  # `auto` on the CPU: one eager pass
        assert seen == [7]
        seen.clear()
        monkeypatch.setattr(model.encoder_runner, "wants_compile", lambda *a: True)  # as on a GPU
        states = model.encoder_runner(ids[0], mask[0], "auto")
    assert seen == [4, 2, 1] and fake.calls == 2  # 4 and 2 compiled, the last chunk eager
    torch.testing.assert_close(states, eager, rtol=1e-6, atol=1e-6)
