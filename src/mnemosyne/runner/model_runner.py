"""The worker-side half of a step: keep replicated request state, apply the plan's diff, build
flat inputs and attention metadata, run the model, sample."""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mnemosyne.attention.backend import AttentionBackend, AttentionMetadata
from mnemosyne.layers.sampler import SamplingBatch, make_generator, sample
from mnemosyne.models.llama import LlamaForCausalLM
from mnemosyne.plan import NewRequest, StepPlan, StepResult, TokenLogprobs
from mnemosyne.request import SamplingParams

if TYPE_CHECKING:
    from mnemosyne.runner.cuda_graphs import DecodeGraphs
from mnemosyne.runner.block_tables import BlockTables


@dataclass
class CachedRequest:
    token_ids: array
    params: SamplingParams
    generator: torch.Generator | None


@dataclass(frozen=True)
class StepInputs:
    token_ids: torch.Tensor
    """[num_tokens] int64"""
    positions: torch.Tensor
    """[num_tokens] int64"""
    meta: AttentionMetadata
    sample_rows: list[int]
    """Rows of the flat batch whose logits are sampled, in the order of sample_ids."""
    sample_ids: list[str]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], block_tables: BlockTables,
                 backend: AttentionBackend, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        """Per layer of this stage: [2, num_slots, kv_heads, head_dim]."""
        self.block_tables = block_tables
        self.page_size = block_tables.page_size
        self.backend = backend
        self.device = device
        self.requests: dict[str, CachedRequest] = {}
        self.graphs: DecodeGraphs | None = None
        """Set by the worker on a GPU; replays decode-only steps."""

    def apply_plan(self, plan: StepPlan) -> None:
        """Bring the replicated request state up to date with the plan's diff."""
        for request_id in plan.freed_ids:
            if self.requests.pop(request_id, None) is not None:
                self.block_tables.remove(request_id)
        for new in plan.new_requests:
            self.requests[new.request_id] = self._cached(new)
            self.block_tables.add(new.request_id)
        for chunk in plan.chunks:
            self.requests[chunk.request_id].token_ids.extend(chunk.new_token_ids)
            self.block_tables.append(chunk.request_id, chunk.new_block_ids)

    def _cached(self, new: NewRequest) -> CachedRequest:
        generator = None if new.params.is_greedy else make_generator(new.seed, self.device)
        return CachedRequest(array("i", new.token_ids), new.params, generator)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        self.apply_plan(plan)
        inputs = self.prepare(plan)
        meta = inputs.meta
        if self.graphs is not None and meta.num_decodes == meta.num_requests and self.graphs.bucket(meta.num_decodes):
            logits = self.graphs.run(inputs)  # decode-only: every row samples, in batch order
        else:
            hidden = self.model(inputs.token_ids, inputs.positions, self.kv_caches, meta, self.backend)
            if not inputs.sample_ids:
                return StepResult(plan.step_id, (), (), ())
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
        states = [self.requests[r] for r in inputs.sample_ids]
        out = sample(logits, _sampling_batch(states))
        return StepResult(plan.step_id, tuple(inputs.sample_ids), tuple(out.token_ids.tolist()),
                          _logprobs(out, [s.params.logprobs for s in states]))

    def prepare(self, plan: StepPlan) -> StepInputs:
        """Flat inputs and metadata for the plan's chunks, single-token chunks first. Host work is
        proportional to the batch's new tokens, never to the requests' contexts."""
        chunks = sorted(plan.chunks, key=lambda c: c.num_new_tokens != 1)
        tokens: list[int] = []
        positions: list[int] = []
        token_rows: list[int] = []
        query_start, seq_lens, host_rows, prefix_runs = [0], [], [], []
        sample_rows, sample_ids = [], []
        for chunk in chunks:
            state = self.requests[chunk.request_id]
            row = self.block_tables.row[chunk.request_id]
            end = chunk.start + chunk.num_new_tokens
            tokens.extend(state.token_ids[chunk.start:end])
            positions.extend(range(chunk.start, end))
            token_rows.extend([row] * chunk.num_new_tokens)
            query_start.append(query_start[-1] + chunk.num_new_tokens)
            seq_lens.append(end)
            host_rows.append(row)
            prefix_runs.append(() if chunk.num_new_tokens == 1
                               else self.block_tables.slot_runs(chunk.request_id, chunk.start))
            if end == len(state.token_ids):  # the chunk reaches the last known token: sample
                sample_rows.append(query_start[-1] - 1)
                sample_ids.append(chunk.request_id)
        token_tensor = torch.tensor(tokens, dtype=torch.int64).to(self.device, non_blocking=True)
        position_tensor = torch.tensor(positions, dtype=torch.int64).to(self.device, non_blocking=True)
        row_tensor = torch.tensor(token_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        pages = self.block_tables.ids[row_tensor, position_tensor // self.page_size].long()
        meta = AttentionMetadata(
            query_start_loc=tuple(query_start), seq_lens=tuple(seq_lens),
            slot_mapping=pages * self.page_size + position_tensor % self.page_size,
            block_tables=self.block_tables.ids,
            rows=torch.tensor(host_rows, dtype=torch.int32).to(self.device, non_blocking=True),
            seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32).to(self.device, non_blocking=True),
            page_size=self.page_size, num_decodes=sum(1 for c in chunks if c.num_new_tokens == 1),
            prefix_runs=tuple(prefix_runs), host_rows=tuple(host_rows))
        return StepInputs(token_tensor, position_tensor, meta, sample_rows, sample_ids)


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
