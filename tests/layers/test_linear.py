"""Parallel linears on one process: each weight_loader must put this rank's slice of a full HF
tensor in its place. Ranks of a larger group are emulated by Group(rank, size) objects; only the
loaders and the local matmuls run, never a collective. Loads are copies, so checks are exact."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mnemosyne.distributed.comm import Group
from mnemosyne.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear

HIDDEN = 32


@dataclass(frozen=True)
class LocalGroup(Group):
    """A rank's view of a group whose all_reduce is left to the test (it sums the ranks itself)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _load(param: torch.nn.Parameter, loaded: torch.Tensor, *shard_id) -> None:
    param.weight_loader(param, loaded, *shard_id)


# --- ColumnParallelLinear ---------------------------------------------------------------------


def test_column_single_rank_places_each_fused_part() -> None:
    gate, up = _randn(24, HIDDEN, seed=1), _randn(40, HIDDEN, seed=2)
    gate_b, up_b = _randn(24, seed=3), _randn(40, seed=4)
    layer = ColumnParallelLinear(HIDDEN, [24, 40], bias=True)
    # Load out of order: each part must land at its own offset regardless.
    _load(layer.weight, up, 1)
    _load(layer.weight, gate, 0)
    _load(layer.bias, up_b, 1)
    _load(layer.bias, gate_b, 0)
    assert torch.equal(layer.weight, torch.cat([gate, up]))
    assert torch.equal(layer.bias, torch.cat([gate_b, up_b]))
    x = _randn(5, HIDDEN, seed=5)
    torch.testing.assert_close(layer(x), F.linear(x, torch.cat([gate, up]), torch.cat([gate_b, up_b])))


def test_column_single_part_default_shard_id() -> None:
    w = _randn(12, HIDDEN)
    layer = ColumnParallelLinear(HIDDEN, [12])
    _load(layer.weight, w)
    assert torch.equal(layer.weight, w) and layer.bias is None


@pytest.mark.parametrize("tp_size", [2, 4])
def test_column_ranks_hold_their_slice_of_each_part(tp_size: int) -> None:
    gate, up = _randn(24, HIDDEN, seed=1), _randn(40, HIDDEN, seed=2)
    gate_b, up_b = _randn(24, seed=3), _randn(40, seed=4)
    x = _randn(5, HIDDEN, seed=5)
    g, u = 24 // tp_size, 40 // tp_size
    gate_outs, up_outs = [], []
    for rank in range(tp_size):
        layer = ColumnParallelLinear(HIDDEN, [24, 40], bias=True, group=Group(rank=rank, size=tp_size))
        assert layer.weight.shape == (g + u, HIDDEN)
        _load(layer.weight, gate, 0)
        _load(layer.weight, up, 1)
        _load(layer.bias, gate_b, 0)
        _load(layer.bias, up_b, 1)
        # A rank holds [gate_shard; up_shard], each shard contiguous.
        assert torch.equal(layer.weight[:g], gate[rank * g:(rank + 1) * g])
        assert torch.equal(layer.weight[g:], up[rank * u:(rank + 1) * u])
        assert torch.equal(layer.bias, torch.cat([gate_b[rank * g:(rank + 1) * g], up_b[rank * u:(rank + 1) * u]]))
        y = layer(x)
        gate_outs.append(y[:, :g])
        up_outs.append(y[:, g:])
    # Concatenating the ranks' outputs per part gives the full layer's parts.
    torch.testing.assert_close(torch.cat(gate_outs, -1), F.linear(x, gate, gate_b))
    torch.testing.assert_close(torch.cat(up_outs, -1), F.linear(x, up, up_b))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_column_interleave_alternates_the_parts_in_blocks(tp_size: int) -> None:
    """interleave=4: a rank's gate and up shards alternate four rows at a time, whatever the load order."""
    gate, up = _randn(16, HIDDEN, seed=1), _randn(16, HIDDEN, seed=2)
    gate_b, up_b = _randn(16, seed=3), _randn(16, seed=4)
    shard = 16 // tp_size
    for rank in range(tp_size):
        layer = ColumnParallelLinear(HIDDEN, [16, 16], bias=True, group=Group(rank=rank, size=tp_size), interleave=4)
        _load(layer.weight, up, 1)
        _load(layer.weight, gate, 0)
        _load(layer.bias, gate_b, 0)
        _load(layer.bias, up_b, 1)
        mine = slice(rank * shard, (rank + 1) * shard)
        for block in range(shard // 4):
            rows = slice(block * 4, (block + 1) * 4)
            assert torch.equal(layer.weight[8 * block:8 * block + 4], gate[mine][rows])
            assert torch.equal(layer.weight[8 * block + 4:8 * block + 8], up[mine][rows])
            assert torch.equal(layer.bias[8 * block + 4:8 * block + 8], up_b[mine][rows])


def test_column_interleave_needs_equal_parts_in_whole_blocks() -> None:
    for sizes, tp_size in (([16, 8], 1), ([10, 10], 1), ([16, 16], 8)):
        with pytest.raises(ValueError, match="cannot interleave"):
            ColumnParallelLinear(HIDDEN, sizes, group=Group(rank=0, size=tp_size), interleave=4)


def test_column_rejects_indivisible_output() -> None:
    with pytest.raises(ValueError, match="output features"):
        ColumnParallelLinear(HIDDEN, [24, 30], group=Group(rank=0, size=4))


# --- QKVParallelLinear ------------------------------------------------------------------------

HEAD_DIM, NUM_HEADS = 8, 8


def _qkv_weights(num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (_randn(NUM_HEADS * HEAD_DIM, HIDDEN, seed=1), _randn(num_kv_heads * HEAD_DIM, HIDDEN, seed=2),
            _randn(num_kv_heads * HEAD_DIM, HIDDEN, seed=3))


def _load_qkv(layer: QKVParallelLinear, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              param: str = "weight") -> None:
    target = getattr(layer, param)
    for shard_id, w in (("v", v), ("q", q), ("k", k)):  # out of order on purpose
        _load(target, w, shard_id)


def _heads(w: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return w[start * HEAD_DIM:(start + count) * HEAD_DIM]


def test_qkv_single_rank_loads_q_k_v_in_order() -> None:
    q, k, v = _qkv_weights(2)
    qb, kb, vb = _randn(NUM_HEADS * HEAD_DIM, seed=4), _randn(2 * HEAD_DIM, seed=5), _randn(2 * HEAD_DIM, seed=6)
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, 2, bias=True)
    _load_qkv(layer, q, k, v)
    for shard_id, w in (("q", qb), ("k", kb), ("v", vb)):
        _load(layer.bias, w, shard_id)
    assert torch.equal(layer.weight, torch.cat([q, k, v]))
    assert torch.equal(layer.bias, torch.cat([qb, kb, vb]))
    x = _randn(3, HIDDEN, seed=7)
    q_out, k_out, v_out = layer(x)
    torch.testing.assert_close(q_out, F.linear(x, q, qb))
    torch.testing.assert_close(k_out, F.linear(x, k, kb))
    torch.testing.assert_close(v_out, F.linear(x, v, vb))


@pytest.mark.parametrize(("tp_size", "num_kv_heads"), [(2, 2), (2, 4), (4, 4), (2, 8)])
def test_qkv_shards_heads_when_kv_heads_divide(tp_size: int, num_kv_heads: int) -> None:
    q, k, v = _qkv_weights(num_kv_heads)
    q_per, kv_per = NUM_HEADS // tp_size, num_kv_heads // tp_size
    layers = []
    for rank in range(tp_size):
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv_heads, group=Group(rank=rank, size=tp_size))
        _load_qkv(layer, q, k, v)
        assert layer.num_heads == q_per and layer.num_kv_heads == kv_per
        q_rows, kv_rows = q_per * HEAD_DIM, kv_per * HEAD_DIM
        assert torch.equal(layer.weight[:q_rows], _heads(q, rank * q_per, q_per))
        assert torch.equal(layer.weight[q_rows:q_rows + kv_rows], _heads(k, rank * kv_per, kv_per))
        assert torch.equal(layer.weight[q_rows + kv_rows:], _heads(v, rank * kv_per, kv_per))
        layers.append(layer)
    # Ranks concatenated part by part give back the full weights.
    for index, full in enumerate((q, k, v)):
        parts = [layer.weight.split(layer.sizes)[index] for layer in layers]
        assert torch.equal(torch.cat(parts), full)


@pytest.mark.parametrize(("tp_size", "num_kv_heads"), [(4, 2), (8, 2), (8, 4), (4, 1)])
def test_qkv_replicates_kv_heads_over_consecutive_ranks(tp_size: int, num_kv_heads: int) -> None:
    q, k, v = _qkv_weights(num_kv_heads)
    q_per, replicas = NUM_HEADS // tp_size, tp_size // num_kv_heads
    group_size = NUM_HEADS // num_kv_heads  # q heads per kv head
    for rank in range(tp_size):
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv_heads, group=Group(rank=rank, size=tp_size))
        _load_qkv(layer, q, k, v)
        kv_head = rank // replicas
        assert layer.num_kv_heads == 1 and layer.sizes == (q_per * HEAD_DIM, HEAD_DIM, HEAD_DIM)
        w_q, w_k, w_v = layer.weight.split(layer.sizes)
        assert torch.equal(w_q, _heads(q, rank * q_per, q_per))
        assert torch.equal(w_k, _heads(k, kv_head, 1)) and torch.equal(w_v, _heads(v, kv_head, 1))
        # The kv head a rank holds is the one its q heads use under GQA.
        assert all(head // group_size == kv_head for head in range(rank * q_per, (rank + 1) * q_per))


def test_qkv_tp4_two_kv_heads_rank_by_rank() -> None:
    # The brief's case spelled out: ranks 0,1 hold kv head 0 and ranks 2,3 hold kv head 1.
    q, k, v = _qkv_weights(2)
    held = []
    for rank in range(4):
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, 2, group=Group(rank=rank, size=4))
        _load_qkv(layer, q, k, v)
        held.append(layer.weight.split(layer.sizes)[1])
    assert torch.equal(held[0], held[1]) and torch.equal(held[2], held[3])
    assert torch.equal(torch.cat([held[0], held[2]]), k)


@pytest.mark.parametrize(("tp_size", "num_heads", "num_kv_heads", "message"), [
    (2, 8, 3, "kv heads"),
    (4, 8, 3, "kv heads"),
    (3, 8, 1, "attention heads"),
])
def test_qkv_rejects_indivisible_heads(tp_size: int, num_heads: int, num_kv_heads: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QKVParallelLinear(HIDDEN, HEAD_DIM, num_heads, num_kv_heads, group=Group(rank=0, size=tp_size))


# --- RowParallelLinear ------------------------------------------------------------------------


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_row_ranks_sum_to_the_full_product(tp_size: int) -> None:
    w = _randn(HIDDEN, 48, seed=1)
    x = _randn(5, 48, seed=2)
    shard = 48 // tp_size
    total = torch.zeros(5, HIDDEN)
    for rank in range(tp_size):
        layer = RowParallelLinear(48, HIDDEN, group=LocalGroup(rank=rank, size=tp_size))
        _load(layer.weight, w)
        assert torch.equal(layer.weight, w[:, rank * shard:(rank + 1) * shard])
        total += layer(x[:, rank * shard:(rank + 1) * shard])
    torch.testing.assert_close(total, F.linear(x, w), atol=1e-5, rtol=1e-5)


class ThreadGroup:
    """all_reduce over `size` ranks played by threads: each waits for the others' parts, then sums in
    rank order, in the part's dtype (as NCCL does)."""

    def __init__(self, size: int):
        self.size = size
        self.parts: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size)

    def rank_view(self, rank: int) -> Group:
        shared = self

        @dataclass(frozen=True)
        class View(Group):
            def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
                shared.parts[self.rank] = x.clone()
                shared.barrier.wait(timeout=30)
                total = shared.parts[0].clone()
                for part in shared.parts[1:]:
                    total += part
                shared.barrier.wait(timeout=30)
                return x.copy_(total)

            def sum_rounded(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
                return self.all_reduce(x).to(dtype)  # the float32 sum, rounded once (comm.py's contract)

        return View(rank=rank, size=shared.size)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_row_reduce_in_float32_rounds_like_one_device(tp_size: int) -> None:
    """bf16: partial sums all-reduced in float32 and rounded once give one device's output almost
    everywhere (only float32 summation order differs); summed in bf16, a large share differs."""
    in_features, out_features = 1024, 256
    w = _randn(out_features, in_features, seed=1).to(torch.bfloat16)
    x = _randn(64, in_features, seed=2).to(torch.bfloat16)
    one_device = F.linear(x, w)
    shard = in_features // tp_size
    mismatch = {}
    for reduce_float32 in (True, False):
        group, outs = ThreadGroup(tp_size), [None] * tp_size

        def run(rank: int, group: ThreadGroup = group, outs: list = outs, reduce_float32: bool = reduce_float32):
            layer = RowParallelLinear(in_features, out_features, group.rank_view(rank), reduce_float32)
            _load(layer.weight, w)
            outs[rank] = layer.to(torch.bfloat16)(x[:, rank * shard:(rank + 1) * shard])

        threads = [threading.Thread(target=run, args=(r,)) for r in range(tp_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(torch.equal(out, outs[0]) for out in outs)  # every rank holds the same result
        assert outs[0].dtype == torch.bfloat16
        mismatch[reduce_float32] = (outs[0] != one_device).float().mean().item()
    assert mismatch[True] < 0.01 < 0.1 < mismatch[False]
