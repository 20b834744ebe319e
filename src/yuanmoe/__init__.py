"""Yuan 2.0-M32 in PyTorch: the model, its routers, training, inference and evaluation."""

from .config import ConfigError, YuanConfig, preset
from .model import CausalLMOutput, DecodeCache, YuanForCausalLM
from .checkpoint import from_pretrained, save_pretrained
from .tokenizer import BPETokenizer, YuanTokenizer, load_tokenizer
from .inference.generate import generate

__version__ = "0.1.0"
__all__ = ["BPETokenizer", "CausalLMOutput", "ConfigError", "DecodeCache", "YuanConfig", "YuanForCausalLM",
           "YuanTokenizer", "from_pretrained", "generate", "load_tokenizer", "preset", "save_pretrained"]
