"""Activations between pipeline stages: the (hidden, residual) pair a stage hands to the next one,
point to point over the pp group. Every stage knows the micro-batch's token count from the plan,
so only the tensor crosses, never a shape."""

from __future__ import annotations

import time
from typing import Any

import torch

from mnemosyne.distributed.comm import SINGLE, Group


class StageLink:
    """This rank's ends of the pipeline: receive from the previous stage, send to the next.

    With `scatter_gather` (tp > 1), tp rank t sends only slice t of the hidden dimension and the
    receiving stage all-gathers the slices over its tp group: 1/tp of the inter-stage traffic per
    rank, for one all-gather on the faster tp links. A one-stage pipeline is the identity.
    """

    def __init__(self, pp_group: Group = SINGLE, tp_group: Group = SINGLE, hidden_size: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 scatter_gather: bool = False, is_timed: bool = False):
        self.pp_group = pp_group
        self.tp_group = tp_group
        self.is_first_stage = pp_group.rank == 0
        self.is_last_stage = pp_group.rank == pp_group.size - 1
        self.num_slices = tp_group.size if scatter_gather else 1
        if hidden_size % self.num_slices:
            raise ValueError(f"--pp-scatter-gather: hidden size {hidden_size} is not divisible by tp {tp_group.size}")
        self.slice_width = hidden_size // self.num_slices
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        self.is_timed = is_timed
        """Synchronise the device once the inputs are here, so `received_s` is when the stage could start."""
        self.received_s = 0.0
        """time.time() when the latest micro-batch's inputs were ready on this stage."""
        self._pending: tuple[Any, torch.Tensor] | None = None
        """The send in progress and its buffer, which must live until it completes."""

    def recv(self, num_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden, residual) [num_tokens, hidden] each from the previous stage; (None, None) on the first."""
        if self.is_first_stage:
            self._mark_received()
            return None, None
        # [2, num_tokens, hidden / num_slices]: hidden and residual travel as one message.
        buffer = torch.empty(2, num_tokens, self.slice_width, dtype=self.dtype, device=self.device)
        self.pp_group.recv(buffer, self.pp_group.rank - 1)
        if self.num_slices > 1:
            buffer = self.tp_group.all_gather(buffer, dim=-1)
        self._mark_received()
        return buffer[0], buffer[1]

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Start sending (hidden, residual) [T, hidden] to the next stage; returns before it arrives."""
        self.wait()
        packed = torch.stack((hidden, residual))  # [2, T, hidden]
        if self.num_slices > 1:
            start = self.tp_group.rank * self.slice_width
            packed = packed[..., start:start + self.slice_width].contiguous()
        self._pending = (self.pp_group.send(packed, self.pp_group.rank + 1), packed)

    def wait(self) -> None:
        """Block until the last send has completed (its buffer may then be freed)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def _mark_received(self) -> None:
        if self.is_timed and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.received_s = time.time()
