"""Collectives over one process group, and process-group set-up. The only module that calls
torch.distributed. A `Group` of size 1 turns every collective into the identity, so single-process
code paths are the same code with no branches at the call sites."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
SPLIT_SUM_MIN_ELEMENTS = 1 << 20
"""`Group.sum_rounded` splits into reduce-scatter + all-gather from this many elements (256 tokens
of a 4096-wide hidden state): below, one collective's latency matters more than its bytes."""


@dataclass(frozen=True)
class Group:
    """One process group as a layer sees it: its rank, its size, and the handle for collectives."""

    rank: int = 0
    """This process's rank within the group."""
    size: int = 1
    handle: Any = None
    """torch.distributed ProcessGroup, or None for a group of one."""
    ranks: tuple[int, ...] = (0,)
    """Global ranks of the members, in group-rank order."""

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce (sum, min or max) over the group, in place; returns x."""
        if self.size > 1:
            dist.all_reduce(x, op=_REDUCE_OPS[op], group=self.handle)
        return x

    def sum_rounded(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The sum over the group of x (float32, contiguous; overwritten), rounded once to dtype, the
        same on every rank. Large tensors take a float32 reduce-scatter, each rank rounds its share,
        and a dtype all-gather: 6 bytes an element on the wire for bf16, against 8 for a float32
        all-reduce. Small ones (latency-bound; decode steps inside CUDA graphs) take one float32
        all-reduce."""
        if self.size == 1:
            return x.to(dtype)
        flat = x.view(-1)
        if flat.numel() < SPLIT_SUM_MIN_ELEMENTS or flat.numel() % self.size:
            dist.all_reduce(x, group=self.handle)
            return x.to(dtype)
        share = flat.new_empty(flat.numel() // self.size)
        dist.reduce_scatter_tensor(share, flat, group=self.handle)
        out = torch.empty(flat.numel(), dtype=dtype, device=x.device)
        dist.all_gather_into_tensor(out, share.to(dtype), group=self.handle)
        return out.view(x.shape)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate each rank's x along dim, in rank order."""
        if self.size == 1:
            return x
        return torch.cat(self.all_gather_stacked(x).unbind(0), dim=dim)

    def all_gather_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x stacked along a new first axis, in rank order: [size, *x.shape]. On NCCL one
        collective straight into the result (no per-rank copies, no concatenation)."""
        out = x.new_empty(self.size, *x.shape)
        if self.size == 1:
            out[0] = x
        elif x.is_cuda:
            dist.all_gather_into_tensor(out, x.contiguous(), group=self.handle)
        else:
            dist.all_gather(list(out.unbind(0)), x.contiguous(), group=self.handle)
        return out

    def send(self, x: torch.Tensor, dst_rank: int) -> Any:
        """Start sending x to group rank dst_rank. Returns the pending work: `wait()` on it before x
        is written again (on NCCL the transfer is ordered after the current stream's work)."""
        return dist.isend(x, dst=self.ranks[dst_rank], group=self.handle)

    def recv(self, x: torch.Tensor, src_rank: int) -> torch.Tensor:
        """Receive into x from group rank src_rank; returns x. Blocks the host on gloo; on NCCL only
        the current stream waits."""
        dist.recv(x, src=self.ranks[src_rank], group=self.handle)
        return x

    def broadcast_object(self, obj: Any, src_rank: int = 0, device: torch.device | None = None) -> Any:
        """`obj` as held by group rank src_rank, on every member (pickled: for set-up only, never per step)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src_rank], group=self.handle, device=device)
        return box[0]


SINGLE = Group()


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes; the rest of the code path is the same."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_world(backend: str, init_method: str, rank: int, world_size: int, timeout_s: float) -> Group:
    """Join the global process group. Every collective (including this rendezvous) fails after
    timeout_s instead of hanging on a dead peer."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return Group(rank, world_size, dist.group.WORLD, tuple(range(world_size)))


def new_groups(partition: Sequence[Sequence[int]], rank: int) -> Group:
    """Create one group per member list of `partition` (every rank must call this with the same
    partition, in the same order) and return the one that contains `rank`."""
    mine = SINGLE
    for ranks in partition:
        ranks = tuple(ranks)
        handle = dist.new_group(list(ranks)) if len(ranks) > 1 else None
        if rank in ranks:
            mine = Group(ranks.index(rank), len(ranks), handle, ranks)
    return mine


def destroy_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
