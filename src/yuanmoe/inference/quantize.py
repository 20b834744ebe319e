"""Weight-only int8 quantization for decoding (the gpt-fast recipe), applied from outside the model.

Decoding a few tokens at a time is bound by reading the weights, so storing them as int8 with one
scale per output channel reads 4x fewer bytes than fp32 (2x fewer than bf16). Activations stay in
bf16. The int8 kernel (`torch._weight_int8pack_mm`) is a matrix-vector kernel: fast for a few rows,
slow for many, so calls with more rows (a prefill) dequantize the weight and use a bf16 matmul.

Every nn.Linear is replaced except the routers' (they read their weights directly, in fp32), and
the stacked experts are replaced by int8 experts with the same interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import GroupedExperts
from ..routers import Router

# Up to this many rows the int8 matrix-vector kernel beats dequantize + bf16 matmul (measured on the
# project's 2-core AMX machine: 1 row 45 us vs 320 us, 16 rows 530 us vs 260 us, for 3072 x 512).
INT8_KERNEL_MAX_ROWS = 4


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ~ q * scale[..., None]. w [..., out, in]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [rows, in] bf16 @ (q * scale).T -> [rows, out] bf16."""
    if x.shape[0] <= INT8_KERNEL_MAX_ROWS and x.device.type == "cpu":
        return torch._weight_int8pack_mm(x.contiguous(), q, scale)
    return F.linear(x, q.to(x.dtype) * scale.unsqueeze(-1))


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                  requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x.reshape(-1, self.in_features).to(torch.bfloat16), self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8GroupedExperts(nn.Module):
    """GroupedExperts with int8 weights: rows sorted by expert, one matmul per expert that has rows."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.num_experts = experts.num_experts
        for name in ("w1", "w2"):
            q, scale = quantize_weight(getattr(experts, name))
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        out = x.new_empty(x.shape[0], self.w2_q.shape[1])
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = slice(start, start + n)
                a, b = int8_matmul(x[rows], self.w1_q[e], self.w1_scale[e]).chunk(2, dim=-1)
                out[rows] = int8_matmul(F.silu(a) * b, self.w2_q[e], self.w2_scale[e])
                start += n
        return out


def quantize_int8(model: nn.Module) -> nn.Module:
    """Cast the model to bf16 and replace its linear layers and experts by int8 ones, in place."""
    model.to(torch.bfloat16)
    routers = {name for name, m in model.named_modules() if isinstance(m, Router)}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if any(full.startswith(r + ".") for r in routers):
                continue
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
            elif isinstance(child, GroupedExperts):
                setattr(module, child_name, Int8GroupedExperts(child))
    return model
