"""Training from scratch: the loop, the official optimizer recipe, metrics and checkpoints."""

from .optim import build_optimizer, learning_rate
from .trainer import TrainConfig, TrainingError, TrainResult, latest_checkpoint, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "build_optimizer", "latest_checkpoint", "learning_rate",
           "train"]
