"""`--quantize int8`: weight-only int8 applied at load to an unquantized model (the gpt-fast recipe).

Decoding a few tokens at a time is bound by reading the weights, so storing them as int8 with one
scale per output channel reads 2x fewer bytes than bf16; activations stay in bf16. Every nn.Linear
becomes a quant.QuantLinear except the routers' (they read their weights directly, in fp32), and
the stacked experts become quant.QuantExperts (a shape the tiled layout cannot hold stays bf16). `yuan quantize` writes such weights (and int4) to a
folder instead, so they load without the bf16 copy first.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import GroupedExperts
from ..quant.modules import QuantExperts, QuantLinear, check_shape
from ..routers import Router


def quantize_int8(model: nn.Module) -> nn.Module:
    """Cast the model to bf16 and replace its linear layers and experts by int8 ones, in place."""
    model.to(torch.bfloat16)
    routers = {name for name, m in model.named_modules() if isinstance(m, Router)}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if any(full.startswith(r + ".") for r in routers):
                continue
            if isinstance(child, nn.Linear) and _fits(child.weight):
                setattr(module, child_name, QuantLinear.quantize(child, 8, 0))
            elif isinstance(child, GroupedExperts) and _fits(child.w1) and _fits(child.w2):
                setattr(module, child_name, QuantExperts.quantize(child.w1, child.w2, 8, 0))
    return model


def _fits(weight: torch.Tensor) -> bool:
    """Whether the tiled int8 layout holds this weight (others stay in bf16)."""
    try:
        check_shape(*weight.shape[-2:], 8, weight.shape[-1])
        return True
    except ValueError:
        return False
