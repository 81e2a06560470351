"""Host values onto the device without the host waiting for the device. A copy from pageable memory
(`torch.tensor(..., device="cuda")`, `.to("cuda")` of an ordinary CPU tensor, indexing a CUDA tensor
with a Python list) may hold the host until the stream has run every kernel queued before it
(`benchmarks/host_sync.py` times each idiom behind a busy device). From pinned memory the copy is
queued like a kernel. Pinned blocks come from torch's caching host allocator, which hands a block
out again only once the copies queued from it have run."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor's copy on `device`, queued behind the stream's work (pinned first on a GPU)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tensor_on(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` without the host waiting for the device."""
    return to_device(torch.tensor(values, dtype=dtype), device)
