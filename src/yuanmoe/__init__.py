"""Yuan 2.0-M32 in PyTorch: the model, its routers, training, inference and evaluation."""

from .config import ConfigError, YuanConfig, preset
from .model import CausalLMOutput, DecodeCache, YuanForCausalLM

__version__ = "0.1.0"
__all__ = ["CausalLMOutput", "ConfigError", "DecodeCache", "YuanConfig", "YuanForCausalLM", "preset"]
