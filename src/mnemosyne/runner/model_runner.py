"""The worker-side half of a step: keep replicated request state, apply the plan's diff, build
flat inputs and attention metadata, run the model, sample. A step is launched (queued on the device)
and its samples fetched later, so the next step can be queued first; a decode scheduled ahead takes
its token from the previous step's samples on the device."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mnemosyne.attention.backend import AttentionBackend, AttentionMetadata
from mnemosyne.attention.kvp import KvpRows, gather_size
from mnemosyne.distributed.comm import SINGLE, Group
from mnemosyne.host_copy import to_device
from mnemosyne.layers.sampler import SamplerOutput, SamplingBatch, make_generator, sample
from mnemosyne.models.llama import LlamaForCausalLM
from mnemosyne.plan import NewRequest, StepPlan, StepResult, TokenLogprobs
from mnemosyne.request import SamplingParams

if TYPE_CHECKING:
    from mnemosyne.runner.cuda_graphs import DecodeGraphs, GraphKey
    from mnemosyne.runner.layer_graphs import LayerGraphs
from mnemosyne.runner.block_tables import BlockTables
from mnemosyne.runner.kvp_section import KvShards, SectionRow, plan_section
from mnemosyne.runner.stage_link import StageLink


@dataclass
class CachedRequest:
    token_ids: array
    params: SamplingParams
    generator: torch.Generator | None
    kv: KvShards = field(default_factory=KvShards)
    """Which KVP groups hold the request's KV, from its block ids."""


@dataclass(frozen=True)
class SampleShare:
    """How one KVP group's samples reach the others (async scheduling): a decode scheduled ahead of a
    multi-group request needs the token its first group is sampling, on every group that holds part of
    it. Each group writes the tokens it sampled at their rows' places in the KVP gather; one max
    all-reduce over the KVP group (-1 elsewhere) gives every group every one."""

    sampled_rows: torch.Tensor
    """[S] int64: rows of this group's sample output that belong to multi-group requests."""
    gather_rows: torch.Tensor
    """[S] int64: their places in the gather."""
    gather_row_of: dict[str, int]
    """Every multi-group request of this group's section -> the place of its last token."""


@dataclass(frozen=True)
class _Samples:
    """The latest step's sampled tokens, on the device: where a decode scheduled ahead reads its token."""

    token_ids: torch.Tensor
    """[N] int64"""
    row_of: dict[str, int]
    """Request id -> its token's row in token_ids."""


class PendingStep:
    """A launched step: its kernels are queued, and its samples are being copied to pinned host memory
    behind them, so the next step can be launched before this one's tokens reach the host."""

    def __init__(self, step_id: int, request_ids: tuple[str, ...] = (), out: SamplerOutput | None = None,
                 wanted: tuple[int | None, ...] = ()):
        self.step_id = step_id
        self.request_ids = request_ids
        self.wanted = wanted
        self._host = None if out is None else SamplerOutput(*(None if t is None else _to_host(t) for t in (
            out.token_ids, out.logprobs, out.top_token_ids, out.top_logprobs)))
        self._event = None
        if out is not None and out.token_ids.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def is_done(self) -> bool:
        """Whether `result` would return without waiting for the device."""
        return self._event is None or self._event.query()

    def result(self) -> StepResult:
        """The step's sampled tokens and logprobs; waits for its kernels (not for later steps')."""
        if self._host is None:
            return StepResult(self.step_id, (), (), ())
        if self._event is not None:
            self._event.synchronize()
        return StepResult(self.step_id, self.request_ids, tuple(self._host.token_ids.tolist()),
                          _logprobs(self._host, list(self.wanted)))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of t in host memory, queued on the stream (pinned, so the copy does not block the host)."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass(frozen=True)
class StepInputs:
    token_ids: torch.Tensor
    """[num_tokens] int64"""
    positions: torch.Tensor
    """[num_tokens] int64"""
    meta: AttentionMetadata
    sample_index: torch.Tensor
    """[len(sample_ids)] int64: rows of the flat batch whose logits are sampled, in the order of
    sample_ids, on the device (indexing with a Python list would copy it from pageable memory, and the
    host would wait for the step's kernels)."""
    sample_ids: list[str]
    share: SampleShare | None = None
    """Set when this step's samples must reach the other KVP groups (see `SampleShare`)."""


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], block_tables: BlockTables,
                 backend: AttentionBackend, device: torch.device, link: StageLink | None = None,
                 kvp_rank: int = 0, blocks_per_group: int = 1 << 62, scratch_slot: int = -1,
                 kvp_group: Group = SINGLE, shares_samples: bool = False):
        self.model = model
        self.kv_caches = kv_caches
        """Per layer of this stage: [2, num_slots, kv_heads, head_dim]."""
        self.block_tables = block_tables
        self.page_size = block_tables.page_size
        self.backend = backend
        self.device = device
        self.requests: dict[str, CachedRequest] = {}
        self.kvp_rank = kvp_rank
        """This rank's KVP group: its block table holds only the blocks that live there."""
        self.blocks_per_group = blocks_per_group
        """Global block id // blocks_per_group is the block's KVP group (see kv/kvp_placement.py)."""
        self.scratch_slot = scratch_slot
        """A cache slot no request owns: where rows that must not write their K/V point."""
        self.graphs: DecodeGraphs | None = None
        """Set by the worker on a GPU; replays decode-only steps."""
        self.layer_graphs: LayerGraphs | None = None
        """Set by the worker on a GPU (tp = pp = 1); replays the work outside attention of steps with
        prompt chunks."""
        self.link = link or StageLink(device=device)
        """Activations from the previous pipeline stage and to the next one."""
        self.kvp_group = kvp_group
        self.shares_samples = shares_samples and kvp_group.size > 1
        """Async scheduling under KVP: every step's multi-group samples reach every group (`SampleShare`)."""
        self._samples: _Samples | None = None

    def apply_plan(self, plan: StepPlan) -> None:
        """Bring the replicated request state up to date with the plan's diff."""
        for request_id in plan.freed_ids:
            if self.requests.pop(request_id, None) is not None:
                self.block_tables.remove(request_id)
        for new in plan.new_requests:
            self.requests[new.request_id] = self._cached(new)
        for chunk in plan.chunks:
            state = self.requests[chunk.request_id]
            state.token_ids.extend(chunk.new_token_ids)
            local = state.kv.add_blocks(chunk.new_block_ids, self.blocks_per_group, self.page_size, self.kvp_rank)
            if local and chunk.request_id not in self.block_tables.row:  # its first block on this group
                self.block_tables.add(chunk.request_id)
            self.block_tables.append(chunk.request_id, local)

    def _cached(self, new: NewRequest) -> CachedRequest:
        generator = None if new.params.is_greedy else make_generator(new.seed, self.device)
        return CachedRequest(array("i", new.token_ids), new.params, generator)

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        """Queue a step's work on the device without waiting for any of it."""
        self.apply_plan(plan)
        inputs = self.prepare(plan)
        meta = inputs.meta
        if meta.num_requests == 0 and meta.kvp is None:  # nothing of this step lives on this KVP group
            self._samples = None
            return PendingStep(plan.step_id)
        logits = self._logits(inputs)
        states = [self.requests[r] for r in inputs.sample_ids]
        out = None if logits is None else sample(logits, _sampling_batch(states))
        self._keep_samples(inputs, out)
        if out is None:
            return PendingStep(plan.step_id)
        return PendingStep(plan.step_id, tuple(inputs.sample_ids), out, tuple(s.params.logprobs for s in states))

    def _logits(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits of the rows this rank samples, or None when it samples none (not the last pipeline
        stage, or every row samples on another KVP group)."""
        meta = inputs.meta
        graph = self._graph_for(meta)
        if graph is not None:  # decode-only: the graph's logits are the batch's rows, in order
            logits = self.graphs.run(inputs, graph)
            if not inputs.sample_ids:
                return None
            return logits if len(inputs.sample_ids) == meta.num_requests else logits[inputs.sample_index]
        hidden = self._forward(inputs)
        if hidden is None or not inputs.sample_ids:
            return None
        return self.model.compute_logits(hidden[inputs.sample_index])

    def _keep_samples(self, inputs: StepInputs, out: SamplerOutput | None) -> None:
        """Keep this step's sampled tokens on the device for the next step's decodes scheduled ahead,
        and, where this group holds part of a multi-group request, the token its first group sampled."""
        token_ids = out.token_ids if out is not None else torch.empty(0, dtype=torch.int64, device=self.device)
        row_of = {request_id: i for i, request_id in enumerate(inputs.sample_ids)}
        share = inputs.share
        if share is not None:
            assert inputs.meta.kvp is not None
            shared = torch.full((inputs.meta.kvp.num_tokens,), -1, dtype=torch.int64, device=self.device)
            if out is not None:
                shared.index_copy_(0, share.gather_rows, token_ids.index_select(0, share.sampled_rows))
            self.kvp_group.all_reduce(shared, op="max")
            for request_id, row in share.gather_row_of.items():
                row_of.setdefault(request_id, len(token_ids) + row)
            token_ids = torch.cat((token_ids, shared))
        self._samples = _Samples(token_ids, row_of)

    def _sample_row(self, request_id: str) -> int:
        """Where the previous step's sample of a request lies in `_samples`."""
        if self._samples is None or request_id not in self._samples.row_of:
            raise RuntimeError(f"a decode of {request_id} was scheduled ahead, but the previous step on this "
                               "worker did not sample it")
        return self._samples.row_of[request_id]

    def _graph_for(self, meta: AttentionMetadata) -> GraphKey | None:
        """The CUDA graph that runs this step, or None to run it eagerly: only decode-only steps have one."""
        if self.graphs is None or meta.num_decodes != meta.num_requests:
            return None
        return self.graphs.bucket(meta.num_requests, max(meta.seq_lens, default=0),
                                  0 if meta.kvp is None else meta.kvp.num_tokens, sum(meta.seq_lens))

    def _forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """This stage's layers. The last stage returns the final-normed hidden [T, hidden]; the others
        hand (hidden, residual) to the next stage and return None."""
        meta = inputs.meta
        if self.layer_graphs is not None and meta.num_decodes < meta.num_requests:
            bucket = self.layer_graphs.bucket(len(inputs.token_ids))
            if bucket is not None:
                return self.layer_graphs.forward(inputs, bucket, self.backend)
        args = (inputs.token_ids, inputs.positions, self.kv_caches, meta, self.backend)
        hidden, residual = self.link.recv(len(inputs.token_ids))
        if self.model.is_last_pp_stage:
            return self.model(*args, hidden, residual)
        self.link.send(*self.model.forward_stage(*args, hidden, residual))
        return None

    def prepare(self, plan: StepPlan) -> StepInputs:
        """Flat inputs and metadata for this KVP group's section of the plan, single-token chunks first.
        Host work is proportional to the batch's new tokens, never to the requests' contexts; the
        inputs reach the device in one copy, and nothing here waits for the device."""
        rows, num_gathered = plan_section(plan.chunks, self.requests, self.kvp_rank)
        tokens, positions, slots, local_rows, gather_rows = (array("q") for _ in range(5))
        ahead_rows, ahead_sources, share_sampled, share_gather = (array("q") for _ in range(4))
        host_rows, seq_lens = array("i"), array("i")
        query_start, prefix_runs, sample_rows, sample_ids = [0], [], [], []
        gather_row_of: dict[str, int] = {}
        for r in rows:
            chunk, num_new = r.chunk, r.chunk.num_new_tokens
            end = chunk.start + num_new
            known = self.requests[chunk.request_id].token_ids[chunk.start:end].tolist()
            tokens.fromlist(known)
            if len(known) < num_new:  # a decode scheduled ahead: its token is the previous step's sample
                if num_new - len(known) != 1:
                    raise RuntimeError(f"chunk [{chunk.start}, {end}) of {chunk.request_id} is {num_new - len(known)} "
                                       "tokens past the ones known; a step ahead adds one")
                ahead_rows.append(query_start[-1] + num_new - 1)
                ahead_sources.append(self._sample_row(chunk.request_id))
                tokens.append(0)
            positions.extend(range(chunk.start, end))
            if r.is_writer:
                slots.extend(self.block_tables.slots(chunk.request_id, chunk.start - r.shard_start,
                                                     end - r.shard_start))
            else:  # a full earlier shard holds no page of the new tokens: they write to the scratch slot
                slots.extend([self.scratch_slot] * num_new)
            if r.gather_start >= 0:
                local_rows.extend(range(query_start[-1], query_start[-1] + num_new))
                gather_rows.extend(range(r.gather_start, r.gather_start + num_new))
            query_start.append(query_start[-1] + num_new)
            seq_lens.append(r.seq_len)
            host_rows.append(self.block_tables.row[chunk.request_id])
            prefix_runs.append(self._prefix_runs(r))
            if r.is_sampled:
                sample_rows.append(query_start[-1] - 1)
                sample_ids.append(chunk.request_id)
            if self.shares_samples and r.gather_start >= 0:
                gather_row_of[chunk.request_id] = r.gather_start + num_new - 1
                if r.is_sampled:
                    share_sampled.append(len(sample_ids) - 1)
                    share_gather.append(r.gather_start + num_new - 1)
        (token_tensor, position_tensor, slot_tensor, local_tensor, gather_tensor, row_tensor, seq_len_tensor,
         ahead_tensor, source_tensor, sampled_tensor, share_tensor, sample_tensor) = self._on_device(
            tokens, positions, slots, local_rows, gather_rows, host_rows, seq_lens,
            ahead_rows, ahead_sources, share_sampled, share_gather, array("q", sample_rows))
        if ahead_rows:
            assert self._samples is not None
            token_tensor.index_copy_(0, ahead_tensor, self._samples.token_ids.index_select(0, source_tensor))
        kvp = None if num_gathered == 0 else KvpRows(gather_size(num_gathered), local_tensor, gather_tensor)
        share = None if kvp is None or not self.shares_samples else SampleShare(sampled_tensor, share_tensor,
                                                                                gather_row_of)
        meta = AttentionMetadata(
            query_start_loc=tuple(query_start), seq_lens=tuple(seq_lens), slot_mapping=slot_tensor,
            block_tables=self.block_tables.ids, rows=row_tensor, seq_lens_tensor=seq_len_tensor,
            page_size=self.page_size, num_decodes=sum(1 for r in rows if r.chunk.num_new_tokens == 1),
            prefix_runs=tuple(prefix_runs), host_rows=tuple(host_rows),
            is_prefix_only=tuple(not r.is_writer for r in rows), kvp=kvp)
        return StepInputs(token_tensor, position_tensor, meta, sample_tensor, sample_ids, share)

    def _prefix_runs(self, row: SectionRow) -> tuple[tuple[int, int], ...]:
        """Cache slot runs of the keys a chunk's queries see non-causally: the shard's tokens before the
        chunk (the writer), or the whole shard (an earlier group). Decodes read pages instead."""
        if row.chunk.num_new_tokens == 1:
            return ()
        num_keys = row.chunk.start - row.shard_start if row.is_writer else row.seq_len
        return self.block_tables.slot_runs(row.chunk.request_id, num_keys)

    def _on_device(self, *parts: array) -> list[torch.Tensor]:
        """Host arrays ('q': int64, 'i': int32) as device tensors [len(part)] each, through one copy:
        packed into one buffer, pinned on a GPU so that the copy does not wait for the stream
        (`host_copy.to_device`). Pinned memory comes from torch's caching host allocator, which hands it
        out again only once the copy has run, so the next step may be prepared while this one still runs."""
        packed, offsets = bytearray(), []
        for part in parts:  # each part 16-byte aligned, as Triton kernels specialise on aligned pointers
            offsets.append(len(packed))
            packed += part
            packed += bytes(-len(packed) % 16)
        if not packed:  # frombuffer refuses an empty buffer
            packed = bytearray(16)
        flat = to_device(torch.frombuffer(packed, dtype=torch.uint8), self.device)
        dtypes = {"q": torch.int64, "i": torch.int32}
        return [flat[offset:offset + len(part) * part.itemsize].view(dtypes[part.typecode])
                for part, offset in zip(parts, offsets, strict=True)]


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
