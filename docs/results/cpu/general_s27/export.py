"""Adapter folder from a run's last checkpoint (the run's final held-out eval skipped)."""
import sys
from pathlib import Path
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from cepe.training.build import build_model
from cepe.training.config import load_config
run = Path(sys.argv[1])
cfg = load_config(run / "config.yaml")
model = build_model(cfg)
state = load_file(str(next((run / "checkpoints").glob("*/adapter.safetensors"))))
set_model_state_dict(model, state, options=StateDictOptions(strict=False))
model.save_pretrained(run / "adapter")
print("saved", run / "adapter", len(state), "tensors")
