"""`python3 -m cepe.training.cli` whose checkpoints hold the trainable weights only.

torch's `get_model_state_dict(..., ignore_frozen_params=True)` drops a frozen weight under the one
name `named_parameters()` lists for it, and keeps its other names: with a tied-embedding decoder
(SmolLM2, Gemma-3) and the decoder-derived encoder, `decoder.lm_head.weight` and
`encoder.model.embed_tokens.weight` (one tensor) stay in the dict and safetensors refuses to save
the pair, so the first checkpoint of `configs/general_*.yaml` fails. Until `Trainer.save_checkpoint`
filters frozen names itself (a trainer.py change, reported), this wraps the function it calls.

    python3 scripts/gpu/general_train.py --config configs/general_smollm2.yaml ...   # same arguments
"""

from __future__ import annotations

import sys

from cepe.training import trainer
from cepe.training.cli import main

_full_state_dict = trainer.get_model_state_dict


def trainable_state_dict(model, *args, **kwargs):
    state = _full_state_dict(model, *args, **kwargs)
    frozen = {name.removeprefix("module.") for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


if __name__ == "__main__":
    trainer.get_model_state_dict = trainable_state_dict
    sys.exit(main())
