"""`model.init_adapter` from an adapter with cross-attention in fewer layers: the run grows it."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_config

from cepe.training.build import build_model


def _model(tmp_path, layers: str, *extra: str):
    return build_model(tiny_config(tmp_path / "run", f"model.cross_attn_layers={layers}", "model.cross_attn_init=zero",
                                   "model.tiny.num_layers=4", *extra))


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[2, 5, 30, 2, 7, 9]])
    ctx = torch.randint(3, 35, (1, 4, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids, context_input_ids=ctx).logits


def test_a_run_may_add_cross_attention_layers_and_starts_where_the_saved_adapter_ended(tmp_path):
    narrow = _model(tmp_path, "every:2")
    with torch.no_grad():  # as if trained: every adapter tensor moved off its init
        for p in narrow.adapter_parameters():
            p.add_(0.05 * torch.randn_like(p))
    narrow.save_pretrained(tmp_path / "narrow")
    wide = _model(tmp_path, "all", f"model.init_adapter={tmp_path / 'narrow'}")
    assert sorted(wide.cross_attn) == ["0", "1", "2", "3"] and sorted(narrow.cross_attn) == ["1", "3"]
    saved, grown = narrow.adapter_state_dict(), wide.adapter_state_dict()
    for k, v in saved.items():
        assert torch.equal(grown[k], v), k
    for i in ("0", "2"):  # the new layers: zero output projection, so the model is the narrow one
        assert not wide.cross_attn[i].o_proj.weight.any()
    torch.testing.assert_close(_logits(wide), _logits(narrow))


def test_a_run_may_not_drop_cross_attention_layers(tmp_path):
    _model(tmp_path, "all").save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"layers \[0, 2\] that this run .* lacks"):
        _model(tmp_path, "every:2", f"model.init_adapter={tmp_path / 'wide'}")


def test_grown_layers_train_at_their_own_learning_rate(tmp_path):
    from cepe.training import Trainer

    _model(tmp_path, "every:2").save_pretrained(tmp_path / "narrow")
    cfg = tiny_config(tmp_path / "grown", "model.cross_attn_layers=all", "model.cross_attn_init=zero",
                      "model.tiny.num_layers=4", f"model.init_adapter={tmp_path / 'narrow'}",
                      "train.grown_lr_scale=0.1", "train.lr=1e-3")
    trainer = Trainer(cfg, progress=False)
    model = trainer.unwrapped
    new = {id(p) for i in ("0", "2") for p in model.cross_attn[i].parameters()}
    lrs = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            lrs[id(p)] = round(group["initial_lr"], 12)  # the peak; the schedule scales every group alike
    assert new and {lrs[i] for i in new} == {1e-4}
    assert {v for k, v in lrs.items() if k not in new} == {1e-3}
    plain = Trainer(tiny_config(tmp_path / "plain"), progress=False)  # nothing grown: the two groups as before
    assert len(plain.optimizer.param_groups) == 2
