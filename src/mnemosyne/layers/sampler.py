"""Token selection: greedy, temperature, top-k, top-p and min-p, each row drawing from its own
seeded generator so a request samples the same tokens whatever it is batched with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnemosyne.host_copy import tensor_on


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings of the requests that sample in this step, in batch order."""

    temperatures: tuple[float, ...]
    top_ks: tuple[int, ...]
    """-1 disables top-k for that row."""
    top_ps: tuple[float, ...]
    min_ps: tuple[float, ...]
    generators: tuple[torch.Generator | None, ...]
    """None for greedy rows."""
    num_logprobs: tuple[int | None, ...]
    """Top alternatives wanted per row; None for none (and no sampled-token logprob either)."""


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor
    """[B] int64"""
    logprobs: torch.Tensor | None
    """[B] float32, log p of the chosen token under the raw (untempered) distribution."""
    top_token_ids: torch.Tensor | None
    """[B, k] int64, the k most likely tokens, k = the largest request in the batch."""
    top_logprobs: torch.Tensor | None
    """[B, k] float32"""


def _is_filtered(batch: SamplingBatch, row: int) -> bool:
    return batch.top_ks[row] > 0 or batch.top_ps[row] < 1.0 or batch.min_ps[row] > 0.0


TOP_K_FAST_MAX = 1024
"""When every filtered row has a top-k at most this, they draw from torch.topk's candidates instead of
a sort of the whole vocabulary."""


def _draw(logits: torch.Tensor, batch: SamplingBatch, rows: list[int]) -> torch.Tensor:
    """One token for each of `rows` (all sampled, not greedy) from logits [R, V] float32 of those
    rows: temperature, then top-k (the k most likely), min-p and top-p (the smallest prefix whose
    mass reaches it, each filter on what the previous kept), then an inverse-CDF draw with one
    uniform number from each row's own generator. Batched over the rows: a few kernels a step, not
    a few a row. Rows with a filter draw over their distribution sorted, the others over the
    vocabulary's order, whatever their neighbours: a row's draw depends on its logits, its settings
    and its generator alone."""
    device, vocab = logits.device, logits.shape[-1]
    settings = tensor_on([[batch.temperatures[r], batch.top_ks[r], batch.top_ps[r], batch.min_ps[r]] for r in rows],
                         torch.float32, device)
    temperature, top_k, top_p, min_p = (settings[:, i, None] for i in range(4))
    probs = torch.softmax(logits / temperature, dim=-1)
    uniform = torch.stack([torch.rand((), generator=batch.generators[r], device=device) for r in rows])
    chosen = torch.empty(len(rows), dtype=torch.int64, device=device)
    is_filtered = [_is_filtered(batch, r) for r in rows]
    plain = [i for i, f in enumerate(is_filtered) if not f]
    filtered = [i for i, f in enumerate(is_filtered) if f]
    if plain:
        p = tensor_on(plain, torch.int64, device)
        chosen[p] = _inverse_cdf(probs[p], uniform[p])
    if filtered:
        f = tensor_on(filtered, torch.int64, device)
        ks = [batch.top_ks[rows[i]] for i in filtered]
        if all(0 < k <= TOP_K_FAST_MAX for k in ks):  # every row has a small top-k: its candidates suffice
            sorted_p, order = probs[f].topk(min(max(ks), vocab), dim=-1)
        else:
            sorted_p, order = probs[f].sort(dim=-1, descending=True)
        rank = torch.arange(sorted_p.shape[-1], device=device)
        keep = (rank < top_k[f]) | (top_k[f] <= 0)  # top-k
        keep &= sorted_p >= min_p[f] * sorted_p[:, :1]  # min-p: the scale cancels after top-k
        kept = sorted_p * keep
        mass_before = (kept.cumsum(-1) - kept) / kept.sum(-1, keepdim=True)
        kept = kept * ((mass_before < top_p[f]) | (top_p[f] >= 1.0))  # top-p over what is left
        chosen[f] = order.gather(1, _inverse_cdf(kept, uniform[f]).unsqueeze(1)).squeeze(1)
    return chosen


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the index whose share of the row's total weight [R, V] holds uniform [R] in [0, 1);
    a zero weight is never chosen."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    choice = torch.searchsorted(cdf, uniform.unsqueeze(1) * total, right=True)
    # u × total may round up to total: then the last index with weight, not a zero-weight tail
    return torch.minimum(choice, torch.searchsorted(cdf, total)).squeeze(1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits [B, V] float32 -> chosen tokens and, where asked, their logprobs."""
    token_ids = logits.argmax(dim=-1)
    rows = [row for row, generator in enumerate(batch.generators) if generator is not None]
    if rows:
        index = tensor_on(rows, torch.int64, logits.device)
        token_ids[index] = _draw(logits[index], batch, rows)
    wanted = [n for n in batch.num_logprobs if n is not None]
    if not wanted:
        return SamplerOutput(token_ids, None, None, None)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top = torch.topk(logprobs, max(wanted), dim=-1) if max(wanted) > 0 else None
    return SamplerOutput(token_ids, chosen, top.indices if top else None, top.values if top else None)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g

