"""Training: the one loop (one process or torchrun), the official optimizer recipe, metrics."""

from .config import TrainConfig
from .optim import build_optimizer, learning_rate
from .trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "build_optimizer", "learning_rate", "train"]
