"""RMSNorm with the residual add fused in, computed in float32 as the reference (HF) does, so
logits match to rounding. On a GPU one Triton kernel does add, norm and scale."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, hidden] -> (norm(x + residual) * weight, x + residual); residual None means 0."""
        if x.is_cuda:
            from mnemosyne.layers.triton_ops import add_rms_norm

            return add_rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype), x
