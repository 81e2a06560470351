"""Token selection: greedy, temperature, top-k, top-p and min-p, each row drawing from its own
seeded generator so a request samples the same tokens whatever it is batched with."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """logits [V] float32 -> the same with excluded tokens at -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p: drop tokens whose preceding mass already does
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits [B, V] float32 -> chosen tokens and, where asked, their logprobs."""
    token_ids = logits.argmax(dim=-1)
    for row, generator in enumerate(batch.generators):
        if generator is None:
            continue
        scaled = _filter(logits[row] / batch.temperatures[row], batch.top_ks[row], batch.top_ps[row],
                         batch.min_ps[row])
        probs = torch.softmax(scaled, dim=-1)
        token_ids[row] = torch.multinomial(probs, 1, generator=generator)[0]
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

