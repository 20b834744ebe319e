"""Weight-only quantization from outside the model: group-quantized linear and expert modules, the
official AutoGPTQ folders, this project's quantized folders and `yuan quantize`."""

from .formats import QuantConfig, read_quant_config
from .modules import QuantExperts, QuantLinear

__all__ = ["QuantConfig", "QuantExperts", "QuantLinear", "read_quant_config"]
