from .cache import DecodeCache
from .moe import FeedForward, GroupedExperts, MoE, grouped_matmul
from .transformer import CausalLMOutput, YuanForCausalLM

__all__ = ["CausalLMOutput", "DecodeCache", "FeedForward", "GroupedExperts", "MoE", "YuanForCausalLM",
           "grouped_matmul"]
