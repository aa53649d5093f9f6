"""`metrics.step_flops`: the MFU numerator counts what each setting really runs."""

from __future__ import annotations

from cepe.training import load_config
from cepe.training.metrics import step_flops

PARAMS = {"decoder_params": 100, "encoder_params": 10, "cross_attn_params": 7}


def _flops(*overrides: str, teacher_tok: float = 0.0) -> float:
    return step_flops(PARAMS, load_config(None, ["data.train=synthetic", *overrides]), 3.0, 40.0, teacher_tok)


def test_base_count_is_4n_decoder_3n_cross_attention_6n_encoder():
    assert _flops() == 4 * 100 * 3 + 6 * 7 * (3 + 40) / 2 + 6 * 10 * 40


def test_checkpointing_recomputes_one_forward_of_the_checkpointed_part():
    base = _flops()
    assert _flops("train.encoder_checkpointing=true") - base == 2 * 10 * 40
    assert _flops("train.gradient_checkpointing=true") - base == 2 * 100 * 3


def test_a_frozen_encoder_runs_forward_only_even_when_checkpointed():
    frozen = _flops("model.encoder_frozen=all")
    assert _flops() - frozen == 4 * 10 * 40
    assert _flops("model.encoder_frozen=all", "train.encoder_checkpointing=true") == frozen


def test_the_teacher_reads_its_tokens_forward_only():
    assert _flops(teacher_tok=5.0) - _flops() == 2 * 100 * 5
