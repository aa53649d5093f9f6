"""Encoder trainability has one owner, `model.encoder_frozen`: an adapter trained with any setting
saves, records the setting, and loads back to the same logits."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from train_helpers import state, tiny_config

from cepe import CepeForCausalLM
from cepe.training import Trainer
from cepe.training.build import tiny_encoder

SETTINGS = {
    "trained": ((), None),
    "embeddings": (("model.encoder_frozen=embeddings",), "embeddings"),
    "all": (("model.encoder_frozen=all",), "all"),
    "train.freeze_encoder": (("train.freeze_encoder=true",), "all"),  # the old spelling
    "decoder-derived, trained": (("model.encoder=decoder", "model.encoder_num_layers=1"), None),
    "decoder-derived, all": (
        ("model.encoder=decoder", "model.encoder_num_layers=1", "model.encoder_frozen=all"),
        "all",
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_adapter_trained_with_each_encoder_setting_reloads_to_the_same_logits(tmp_path, name):
    overrides, recorded = SETTINGS[name]
    out = tmp_path / "run"
    with (
        pytest.warns(FutureWarning, match="model.encoder_frozen=all") if "freeze" in name else contextlib.nullcontext()
    ):
        cfg = tiny_config(out, "max_steps=2", "train.batch_size=4", "train.eval_samples=4", *overrides)
    trainer = Trainer(cfg, progress=False)
    model = trainer.unwrapped
    before = state(model.encoder)
    trainer.fit()
    model.eval()
    after = state(model.encoder)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if recorded == "all":
        assert not changed
        assert trainer.description["trainable_params"] == sum(p.numel() for p in model.cross_attn.parameters())
    else:
        assert changed and not (recorded == "embeddings" and any("embed" in k for k in changed))
    saved = json.loads((out / "adapter" / "config.json").read_text())
    assert saved["encoder_frozen"] == recorded

    hf = model.config.encoder_type == "hf"
    # frozen weights are not in the adapter: they come from the base encoder, built afresh
    base_encoder = tiny_encoder(cfg.model.tiny, model.decoder.config.vocab_size, cfg.model.chunk_size) if hf else None
    loaded = CepeForCausalLM.from_pretrained(out / "adapter", decoder=model.decoder, encoder=base_encoder).eval()
    ids = torch.tensor([[2, 5, 30, 2, 7]])
    ctx = torch.randint(3, 35, (1, 8, 2))
    with torch.no_grad():
        assert torch.equal(loaded(ids, context_input_ids=ctx).logits, model(ids, context_input_ids=ctx).logits)


def test_adapter_trained_with_topk_records_it_and_reloads_to_the_same_logits(tmp_path):
    """model.cross_attn_topk trains through top-k cross-attention (gradients reach the
    cross-attention through the k keys read) and the saved adapter runs that way by default."""
    out = tmp_path / "run"
    cfg = tiny_config(out, "max_steps=2", "train.batch_size=4", "train.eval_samples=4", "model.cross_attn_topk=3")
    trainer = Trainer(cfg, progress=False)
    model = trainer.unwrapped
    assert model.config.cross_attn_topk == 3
    before = state(model.cross_attn)
    trainer.fit()
    model.eval()
    after = state(model.cross_attn)
    assert any(not torch.equal(before[k], after[k]) for k in before if "k_proj" in k)
    assert json.loads((out / "adapter" / "config.json").read_text())["cross_attn_topk"] == 3
    base_encoder = tiny_encoder(cfg.model.tiny, model.decoder.config.vocab_size, cfg.model.chunk_size)
    loaded = CepeForCausalLM.from_pretrained(out / "adapter", decoder=model.decoder, encoder=base_encoder).eval()
    assert loaded.config.cross_attn_topk == 3
    ids = torch.tensor([[2, 5, 30, 2, 7]])
    ctx = torch.randint(3, 35, (1, 8, 2))
    with torch.no_grad():
        assert torch.equal(loaded(ids, context_input_ids=ctx).logits, model(ids, context_input_ids=ctx).logits)
        loaded.config.cross_attn_topk = None
        assert not torch.equal(loaded(ids, context_input_ids=ctx).logits, model(ids, context_input_ids=ctx).logits)
