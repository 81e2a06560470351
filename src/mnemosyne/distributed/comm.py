"""Collectives over one process group. The only module that calls torch.distributed.

A `Group` of size 1 turns every collective into the identity, so single-process code paths are
the same code with no branches at the call sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Group:
    """One process group as a layer sees it: its rank, its size, and the handle for collectives."""

    rank: int = 0
    size: int = 1
    handle: Any = None
    """torch.distributed ProcessGroup, or None for a group of one."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; returns x."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.handle)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate each rank's x along dim, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.handle)
        return torch.cat(parts, dim=dim)


SINGLE = Group()
