"""Vocab-parallel embedding and LM head: the vocabulary is padded to a multiple of 64 × tp and each
rank holds an equal, zero-padded slice. Other ranks are emulated by Group(rank, size); the test
performs the all-reduce / all-gather itself. Loads and lookups are exact."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mnemosyne.distributed.comm import Group
from mnemosyne.layers.embedding import ParallelLMHead, VocabParallelEmbedding

HIDDEN = 16


@dataclass(frozen=True)
class LocalGroup(Group):
    """A rank's view of a group whose collectives are left to the test."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x


def _table(vocab_size: int) -> torch.Tensor:
    return torch.randn(vocab_size, HIDDEN, generator=torch.Generator().manual_seed(vocab_size))


@pytest.mark.parametrize(("vocab_size", "tp_size", "padded"), [
    (100, 1, 128), (128, 1, 128), (129, 1, 192), (100, 2, 128), (129, 2, 256), (32000, 4, 32000),
    (128256, 8, 128512), (10, 2, 128),
])
def test_padding_and_shard_sizes(vocab_size: int, tp_size: int, padded: int) -> None:
    for rank in range(tp_size):
        emb = VocabParallelEmbedding(vocab_size, HIDDEN, group=Group(rank=rank, size=tp_size))
        assert emb.padded_vocab_size == padded
        assert emb.shard_size == padded // tp_size and emb.vocab_start == rank * padded // tp_size
        assert emb.weight.shape == (padded // tp_size, HIDDEN)


def test_single_rank_loads_and_looks_up() -> None:
    table = _table(100)
    emb = VocabParallelEmbedding(100, HIDDEN)
    emb.weight.weight_loader(emb.weight, table)
    assert torch.equal(emb.weight[:100], table) and torch.all(emb.weight[100:] == 0)
    ids = torch.tensor([0, 99, 5, 5, 42])
    assert torch.equal(emb(ids), table[ids])


@pytest.mark.parametrize(("vocab_size", "tp_size"), [(100, 2), (300, 2), (300, 4), (10, 2)])
def test_ranks_hold_zero_padded_slices_that_concatenate_to_the_table(vocab_size: int, tp_size: int) -> None:
    table = _table(vocab_size)
    shards = []
    for rank in range(tp_size):
        emb = VocabParallelEmbedding(vocab_size, HIDDEN, group=Group(rank=rank, size=tp_size))
        emb.weight.data.fill_(float("nan"))  # the loader must also clear stale padding rows
        emb.weight.weight_loader(emb.weight, table)
        shards.append(emb.weight.data)
    full = torch.cat(shards)
    assert torch.equal(full[:vocab_size], table)
    assert torch.all(full[vocab_size:] == 0)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_sum_over_ranks_of_lookups_is_the_full_lookup(tp_size: int) -> None:
    vocab_size = 300
    table = _table(vocab_size)
    ids = torch.tensor([0, 1, 63, 64, 127, 128, 150, 299, 299, 200])
    total = torch.zeros(len(ids), HIDDEN)
    for rank in range(tp_size):
        emb = VocabParallelEmbedding(vocab_size, HIDDEN, group=LocalGroup(rank=rank, size=tp_size))
        emb.weight.weight_loader(emb.weight, table)
        local = emb(ids)
        owned = (ids >= emb.vocab_start) & (ids < emb.vocab_start + emb.shard_size)
        assert torch.all(local[~owned] == 0)  # a rank contributes only the ids it holds
        total += local
    assert torch.equal(total, table[ids])


def test_lm_head_single_rank_logits() -> None:
    table = _table(100)
    head = ParallelLMHead(100, HIDDEN)
    head.weight.weight_loader(head.weight, table)
    hidden = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(1))
    logits = head.logits(hidden)
    assert logits.shape == (4, 100) and logits.dtype == torch.float32  # padding cut off
    torch.testing.assert_close(logits, hidden @ table.T)


def test_lm_head_bf16_returns_float32_logits() -> None:
    table = _table(70)
    head = ParallelLMHead(70, HIDDEN).to(torch.bfloat16)
    head.weight.weight_loader(head.weight, table)
    hidden = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(2)).bfloat16()
    logits = head.logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (2, 70)
    torch.testing.assert_close(logits, F.linear(hidden, table.bfloat16()).float())


@pytest.mark.parametrize("tp_size", [2, 4])
def test_lm_head_rank_logits_concatenate_to_the_full_logits(tp_size: int) -> None:
    vocab_size = 300
    table = _table(vocab_size)
    hidden = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(3))
    parts = []
    for rank in range(tp_size):
        head = ParallelLMHead(vocab_size, HIDDEN, group=LocalGroup(rank=rank, size=tp_size))
        head.weight.weight_loader(head.weight, table)
        parts.append(F.linear(hidden, head.weight))  # what each rank feeds the all-gather
    gathered = torch.cat(parts, dim=-1)
    assert gathered.shape[-1] == ParallelLMHead(vocab_size, HIDDEN, group=Group(size=tp_size)).padded_vocab_size
    torch.testing.assert_close(gathered[:, :vocab_size], hidden @ table.T)
    assert torch.all(gathered[:, vocab_size:] == 0)
