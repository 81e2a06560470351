"""Rotary position embedding (neox / HF layout) with long-context scaling: linear, dynamic NTK,
YaRN and llama3. Cos/sin are computed from positions on the fly, so a 10M-token context costs
no table.

Dynamic NTK is applied statically for the extended length (max_position_embeddings × factor), as
vLLM does: the cached keys must not change frequency as the sequence grows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mnemosyne.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling,
                  max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] float32 and the cos/sin attention factor."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind, factor = scaling.rope_type, scaling.factor
    original = scaling.original_max_position_embeddings or max_position
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        seq_len = original * factor
        base = theta * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling, original), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling, original)
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling, original: int) -> torch.Tensor:
    low_freq_wavelen = original / s.low_freq_factor
    high_freq_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, s: RopeScaling, original: int) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    else:
        attention_factor = mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling, max_position: int):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(head_dim, theta, scaling, max_position)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64; q [T, Hq, D], k [T, Hk, D] -> rotated q, k in their dtype."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float().unsqueeze(0)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(q.dtype).unsqueeze(1)
        sin = (emb.sin() * self.attention_factor).to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def rotate_and_store(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rotate q and k, write k and v [T, Hkv, D] to the caches at slot_mapping [T]; returns rotated q.

        On a GPU this is one fused kernel, which returns q packed ([T, Hq, D] contiguous).
        """
        if q.is_cuda:
            from mnemosyne.layers.triton_ops import rotary_store_

            return rotary_store_(q, k, v, positions, self.inv_freq, self.attention_factor, k_cache, v_cache,
                                 slot_mapping)
        from mnemosyne.attention.backend import store_kv

        q, k = self(positions, q, k)
        store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q
