"""Dynamic int8 matmul: int8 weights, activations quantized per tensor at run time.

`dynamic_quant_linear` computes in torch what ONNX `DynamicQuantizeLinear` + `MatMulInteger` + rescale
compute (ONNX Runtime fuses them into its DynamicQuantizeMatMul kernel), so the torch model and the
artifact agree: uint8 activations with scale `(max(x, 0) - min(x, 0)) / 255` and a rounded zero point,
int8 weights with one scale per output channel, int32 accumulation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dynamic_qparams(x: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero point of ONNX DynamicQuantizeLinear for `x` (uint8, range always holding 0)."""
    lo = x.detach().min().clamp(max=0).float()
    hi = x.detach().max().clamp(min=0).float()
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.round(-lo / scale).clamp(0, 255)
    return scale, zero_point


@torch.library.custom_op("modelpress::dynamic_quant_linear", mutates_args=())
def dynamic_quant_linear(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """`x @ W.T + bias` with W = qweight (N, K) int8 * weight_scale (N,), x quantized to uint8 now."""
    scale, zero_point = dynamic_qparams(x)
    xq = (torch.round(x.float() / scale) + zero_point).clamp(0, 255)
    # int32-exact products: |codes| <= 255 * 127 and K terms fit easily in float64's 53-bit mantissa
    acc = (xq - zero_point).double() @ qweight.double().T
    y = (acc * (scale.double() * weight_scale.double())).float()
    return y if bias is None else y + bias


@dynamic_quant_linear.register_fake
def _(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
