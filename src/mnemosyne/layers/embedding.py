"""Vocab-parallel embedding and LM head. The vocabulary is padded to a multiple of 64 × tp so
every rank holds an equal slice; padded rows are zero and their logits are cut off."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnemosyne.distributed.comm import SINGLE, Group
from mnemosyne.layers.linear import _HAS_MM_OUT_DTYPE, matmul_float32

_PAD_MULTIPLE = 64


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, group: Group = SINGLE):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        multiple = _PAD_MULTIPLE * group.size
        self.padded_vocab_size = -(-vocab_size // multiple) * multiple
        self.shard_size = self.padded_vocab_size // group.size
        self.vocab_start = group.rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load  # type: ignore[attr-defined]

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int = 0) -> None:
        end = min(self.vocab_start + self.shard_size, self.vocab_size)
        param.data.zero_()
        if end > self.vocab_start:
            param.data[: end - self.vocab_start].copy_(loaded[self.vocab_start:end])

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] int64 -> [num_tokens, hidden]"""
        if self.group.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits = h E^T over this rank's vocab slice, gathered across the group."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, vocab_size] float32.

        On CUDA, half-precision inputs give float32 logits straight from the GEMM's float32
        accumulator: rounded to bf16, the logits of a 128K vocabulary tie exactly at a top-2 spacing
        of 2^-8 relative, and greedy decoding would pick between ties by index."""
        if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and _HAS_MM_OUT_DTYPE:
            local = matmul_float32(hidden, self.weight)
        else:
            local = F.linear(hidden, self.weight).float()
        return self.group.all_gather(local, dim=-1)[:, : self.vocab_size]
