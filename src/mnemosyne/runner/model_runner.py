"""The worker-side half of a step: keep replicated request state, apply the plan's diff, build
flat inputs and attention metadata, run the model, sample."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from mnemosyne.attention.backend import AttentionBackend, AttentionMetadata
from mnemosyne.layers.sampler import SamplingBatch, make_generator, sample
from mnemosyne.models.llama import LlamaForCausalLM
from mnemosyne.plan import NewRequest, StepPlan, StepResult, TokenLogprobs
from mnemosyne.request import SamplingParams


class BlockTable:
    """A request's block ids on the device, grown by appends (amortised doubling), so building a
    step never re-sends or rebuilds the whole table."""

    def __init__(self, device: torch.device):
        self.ids = torch.empty(16, dtype=torch.int64, device=device)
        self.num_blocks = 0

    def extend(self, block_ids: tuple[int, ...]) -> None:
        if not block_ids:
            return
        end = self.num_blocks + len(block_ids)
        if end > self.ids.numel():
            grown = torch.empty(max(end, 2 * self.ids.numel()), dtype=torch.int64, device=self.ids.device)
            grown[: self.num_blocks] = self.ids[: self.num_blocks]
            self.ids = grown
        self.ids[self.num_blocks:end] = torch.tensor(block_ids, dtype=torch.int64)
        self.num_blocks = end

    def slots(self, start: int, end: int, block_size: int) -> torch.Tensor:
        """[end - start] int64 cache slots of positions [start, end)."""
        positions = torch.arange(start, end, device=self.ids.device)
        return self.ids[positions // block_size] * block_size + positions % block_size


@dataclass
class CachedRequest:
    token_ids: array
    params: SamplingParams
    block_table: BlockTable
    generator: torch.Generator | None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 backend: AttentionBackend, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        """Per layer of this stage: [2, num_slots, kv_heads, head_dim]."""
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.requests: dict[str, CachedRequest] = {}

    def apply_plan(self, plan: StepPlan) -> None:
        """Bring the replicated request state up to date with the plan's diff."""
        for request_id in plan.freed_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            self.requests[new.request_id] = self._cached(new)
        for chunk in plan.chunks:
            state = self.requests[chunk.request_id]
            state.token_ids.extend(chunk.new_token_ids)
            state.block_table.extend(chunk.new_block_ids)

    def _cached(self, new: NewRequest) -> CachedRequest:
        generator = None if new.params.is_greedy else make_generator(new.seed, self.device)
        return CachedRequest(array("i", new.token_ids), new.params, BlockTable(self.device), generator)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        self.apply_plan(plan)
        token_ids, positions, meta, sample_rows, sample_ids = self._prepare(plan)
        hidden = self.model(token_ids, positions, self.kv_caches, meta, self.backend)
        if not sample_ids:
            return StepResult(plan.step_id, (), (), ())
        logits = self.model.compute_logits(hidden[sample_rows])
        states = [self.requests[r] for r in sample_ids]
        out = sample(logits, _sampling_batch(states))
        return StepResult(plan.step_id, tuple(sample_ids), tuple(out.token_ids.tolist()),
                          _logprobs(out, [s.params.logprobs for s in states]))

    def _prepare(self, plan: StepPlan):
        tokens: list[int] = []
        positions: list[torch.Tensor] = []
        query_start, seq_lens, kv_slots, new_slots = [0], [], [], []
        sample_rows, sample_ids = [], []
        for chunk in plan.chunks:
            state = self.requests[chunk.request_id]
            end = chunk.start + chunk.num_new_tokens
            tokens.extend(state.token_ids[chunk.start:end])
            positions.append(torch.arange(chunk.start, end))
            slots = state.block_table.slots(0, end, self.block_size)
            kv_slots.append(slots)
            new_slots.append(slots[chunk.start:])
            query_start.append(query_start[-1] + chunk.num_new_tokens)
            seq_lens.append(end)
            if end == len(state.token_ids):  # the chunk reaches the last known token: sample
                sample_rows.append(query_start[-1] - 1)
                sample_ids.append(chunk.request_id)
        meta = AttentionMetadata(tuple(query_start), tuple(seq_lens), torch.cat(new_slots), tuple(kv_slots))
        token_tensor = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        return token_tensor, torch.cat(positions).to(self.device), meta, sample_rows, sample_ids


def _sampling_batch(states: list[CachedRequest]) -> SamplingBatch:
    params = [s.params for s in states]
    return SamplingBatch(
        temperatures=tuple(p.temperature for p in params),
        top_ks=tuple(p.top_k for p in params),
        top_ps=tuple(p.top_p for p in params),
        min_ps=tuple(p.min_p for p in params),
        generators=tuple(s.generator for s in states),
        num_logprobs=tuple(p.logprobs for p in params),
    )


def _logprobs(out, wanted: list[int | None]) -> tuple[TokenLogprobs | None, ...]:
    if out.logprobs is None:
        return tuple(None for _ in wanted)
    chosen = out.logprobs.tolist()
    top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    result = []
    for row, n in enumerate(wanted):
        if n is None:
            result.append(None)
        else:
            ids = tuple(top_ids[row][:n]) if top_ids else ()
            lps = tuple(top_lps[row][:n]) if top_lps else ()
            result.append(TokenLogprobs(chosen[row], ids, lps))
    return tuple(result)
