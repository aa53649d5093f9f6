"""Training CEPE adapters: config, model building, losses (incl. distillation), checkpoints, the loop."""

from .config import DistillConfig, ModelConfig, RunConfig, TrainConfig, load_config
from .trainer import Trainer, train

__all__ = ["DistillConfig", "ModelConfig", "RunConfig", "TrainConfig", "Trainer", "load_config", "train"]
