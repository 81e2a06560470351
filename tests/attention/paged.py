"""Shared helpers for the attention tests: a float64 attention written out longhand, and a paged
KV cache with scattered block tables holding a mixed batch (chunk over a prefix, prefill, decodes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mnemosyne.attention.backend import AttentionMetadata, build_metadata, store_kv

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 16
SCALE = 1.0 / math.sqrt(HEAD_DIM)


def attention_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  q_positions: torch.Tensor, k_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Lq, Hq, D], k/v [Lk, Hk, D] -> out [Lq, Hq, D] float64, lse [Lq, Hq] float64.

    A query sees keys whose position is <= its own. Rows that see no key get out 0, lse -inf.
    """
    group = q.shape[1] // k.shape[1]
    kf = k.double().repeat_interleave(group, dim=1)  # [Lk, Hq, D]
    vf = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->qhk", q.double(), kf) * scale  # [Lq, Hq, Lk]
    visible = (k_positions.unsqueeze(0) <= q_positions.unsqueeze(1)).unsqueeze(1)  # [Lq, 1, Lk]
    row_max = scores.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    exp = torch.exp(scores - row_max) * visible  # explicit softmax numerator, 0 where masked
    total = exp.sum(-1)  # [Lq, Hq]
    probs = exp / total.clamp_min(1e-300).unsqueeze(-1)
    out = torch.einsum("qhk,khd->qhd", probs, vf)
    lse = torch.log(total) + row_max.squeeze(-1)
    return out, lse


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, NUM_HEADS, HEAD_DIM]
    k_cache: torch.Tensor  # [num_slots, NUM_KV_HEADS, HEAD_DIM], this step's K/V already stored
    v_cache: torch.Tensor
    meta: AttentionMetadata
    keys: list[torch.Tensor]  # per request [seq_len, NUM_KV_HEADS, HEAD_DIM], position order
    values: list[torch.Tensor]
    num_new: list[int]


def slots_of(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    positions = torch.arange(start, end)
    return torch.tensor(block_table)[positions // block_size] * block_size + positions % block_size


def build_paged_batch(requests: list[tuple[int, int, list[int]]], block_size: int = 4, num_blocks: int = 32,
                      dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> PagedBatch:
    """requests: (seq_len, num_new, block_table). The prefix of each request is written straight
    into the cache (as earlier steps would have); the new tokens go through store_kv."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = num_blocks * block_size
    # NaN in every slot nobody owns: a backend reading a wrong slot cannot go unnoticed.
    k_cache = torch.full((num_slots, NUM_KV_HEADS, HEAD_DIM), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    query_start, seq_lens, kv_slots, new_slots, new_k, new_v, qs = [0], [], [], [], [], [], []
    keys, values, num_news = [], [], []
    for seq_len, num_new, block_table in requests:
        assert len(block_table) * block_size >= seq_len
        k = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        slots = slots_of(block_table, 0, seq_len, block_size)
        prefix = seq_len - num_new
        k_cache[slots[:prefix]] = k[:prefix]
        v_cache[slots[:prefix]] = v[:prefix]
        new_slots.append(slots[prefix:])
        new_k.append(k[prefix:])
        new_v.append(v[prefix:])
        qs.append(torch.randn(num_new, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype))
        query_start.append(query_start[-1] + num_new)
        seq_lens.append(seq_len)
        kv_slots.append(slots)
        keys.append(k)
        values.append(v)
        num_news.append(num_new)
    slot_mapping = torch.cat(new_slots)
    store_kv(torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, slot_mapping)
    meta = build_metadata(requests, block_size, device)
    assert torch.equal(meta.slot_mapping.cpu(), slot_mapping)
    return PagedBatch(torch.cat(qs).to(device), k_cache.to(device), v_cache.to(device), meta, keys, values,
                      num_news)


# Block tables are non-contiguous and out of order, and no two requests share a block.
MIXED_BATCH = [
    (22, 7, [9, 2, 30, 14, 5, 21]),  # a 7-token chunk over a 15-token prefix, starting mid-block
    (10, 10, [17, 3, 26]),  # a full prefill, last block partly used
    (19, 1, [0, 12, 28, 7, 19]),  # decode
    (1, 1, [31]),  # decode of the very first token
    (13, 1, [25, 10, 4, 22]),  # decode exactly at a block boundary's first slot
    (11, 3, [6, 29, 1]),  # a 3-token chunk whose first token starts a block
]
