"""CUDA graphs for decode-only steps: the whole forward (embedding to logits) captured once per
batch-size bucket and decode-split count, replayed with inputs copied into static buffers. Removes
the per-kernel launch cost that dominates small decode batches.

A graph's decode splits are fixed at capture. Each bucket has a few graphs: the splits its batch size
alone needs, the powers of two above, and the most any context may need
(`triton_decode.graph_split_variants`); a step replays the fewest that cover what an eager step would
choose, so a batch of short rows does not pay for the grid of a long one.

Padding rows of a bucket read a null block-table row with seq_len 0 (the kernel returns zeros for
them) and write their K/V into a scratch page that no request owns. The decode kernel was tuned on real
contexts before (`GpuBackend.warm_up`); the graph warm-up decodes empty rows, where every
configuration would time alike.

Under KV-cache parallelism a decode of a request that spans several groups merges its attention over
the KVP group in every layer. Those steps get graphs too, one per (batch bucket, gather size): the
gather takes every row of the batch, and a mask keeps the merge only for the multi-group rows
(`attention/kvp.py`). Every group captures the same graphs in the same order, so the collectives of
the warm-ups match; and since the gather's size comes from the plan alone, a group that runs a step
eagerly still meets the graphs of the others.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from mnemosyne.attention.backend import AttentionBackend, AttentionMetadata
from mnemosyne.attention.kvp import KvpRows
from mnemosyne.attention.triton_decode import decode_splits, graph_split_variants, graph_variant
from mnemosyne.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from mnemosyne.runner.model_runner import StepInputs

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
KVP_GATHERS = (2, 4, 8)
"""Gather sizes (`attention/kvp.gather_size`) captured under KVP: up to 7 decodes of multi-group
requests in one step. Steps with more run eagerly."""

GraphKey = tuple[int, int, int]
"""(batch bucket, KVP gather size, decode splits); gather size 0: no KVP merge."""


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], block_tables: torch.Tensor,
                 null_row: int, scratch_slot: int, page_size: int, backend: AttentionBackend,
                 max_batch: int, max_seq_len: int, device: torch.device, kvp_size: int = 1):
        self.model = model
        self.device = device
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        n = self.buckets[-1]
        self.token_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.rows = torch.full((n,), null_row, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.gather_rows = torch.zeros(n, dtype=torch.int64, device=device)
        self.is_multi = torch.zeros(n, dtype=torch.bool, device=device)
        self.logits = torch.zeros(n, model.config.vocab_size, dtype=torch.float32, device=device)
        """Every graph writes its logits here: one buffer, rather than one output per graph."""
        self.null_row, self.scratch_slot = null_row, scratch_slot
        self.gathers = (0,) + (KVP_GATHERS if kvp_size > 1 else ())
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.splits: dict[int, tuple[int, ...]] = {}
        """Each bucket's graphs' decode splits, fewest first (triton_decode.graph_split_variants)."""
        pool = torch.cuda.graph_pool_handle()
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        num_kv_heads = kv_caches[0].shape[2]
        self._num_sms, self._num_kv_heads = num_sms, num_kv_heads
        for b in self.buckets:
            self.splits[b] = graph_split_variants(b, num_kv_heads, max_seq_len, num_sms)
        for gather in self.gathers:
            for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
                kvp = None if gather == 0 else KvpRows(gather, None, self.gather_rows[:b], self.is_multi[:b])
                for splits in reversed(self.splits[b]):
                    meta = AttentionMetadata(
                        query_start_loc=tuple(range(b + 1)), seq_lens=(max_seq_len,) * b,
                        slot_mapping=self.slot_mapping[:b], block_tables=block_tables, rows=self.rows[:b],
                        seq_lens_tensor=self.seq_lens[:b], page_size=page_size, num_decodes=b,
                        decode_splits=splits, kvp=kvp)

                    def forward(b=b, meta=meta) -> None:
                        hidden = model(self.token_ids[:b], self.positions[:b], kv_caches, meta, backend)
                        self.logits[:b].copy_(model.compute_logits(hidden))

                    forward()  # warm up: Triton compiles, cuBLAS picks algorithms
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        forward()
                    self.graphs[b, gather, splits] = graph
        logger.info("captured %d decode CUDA graphs: batch sizes %s, decode splits %s, KVP gathers %s",
                    len(self.graphs), self.buckets, self.splits, self.gathers[1:] or "none")

    def bucket(self, batch: int, max_seq_len: int = 0, gather: int = 0, total: int | None = None) -> GraphKey | None:
        """The graph for this decode batch, whose rows hold `total` tokens of context and the longest
        max_seq_len (KVP gather size `gather`, 0 for none), or None to run it eagerly: too large a
        batch or gather, or a context too long for the graphs' fixed splits (eager steps size
        splits to the context)."""
        b = next((b for b in self.buckets if b >= batch), None)
        if b is None or gather not in self.gathers:
            return None
        wanted = decode_splits(b, self._num_kv_heads, max(1, max_seq_len), self._num_sms, total)
        splits = graph_variant(self.splits[b], wanted, max_seq_len)
        return None if splits is None else (b, gather, splits)

    def run(self, inputs: StepInputs, key: GraphKey) -> torch.Tensor:
        """Replay the graph `key` (from `bucket`) on a decode-only batch; returns logits [batch, vocab]
        float32, valid until the next replay."""
        meta = inputs.meta
        batch = meta.num_requests
        b, gather, _ = key
        self.token_ids[:batch].copy_(inputs.token_ids)
        self.positions[:batch].copy_(inputs.positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.rows[:batch].copy_(meta.rows)
        self.seq_lens[:batch].copy_(meta.seq_lens_tensor)
        if b > batch:
            self.token_ids[batch:b].zero_()
            self.positions[batch:b].zero_()
            self.slot_mapping[batch:b].fill_(self.scratch_slot)
            self.rows[batch:b].fill_(self.null_row)
            self.seq_lens[batch:b].zero_()
        if gather:
            kvp = meta.kvp
            assert kvp is not None and kvp.local_rows is not None and kvp.num_tokens == gather
            self.gather_rows[:b].fill_(gather - 1)  # the spare row
            self.gather_rows.index_copy_(0, kvp.local_rows, kvp.gather_rows)
            self.is_multi[:b].zero_()
            self.is_multi.index_fill_(0, kvp.local_rows, True)
        self.graphs[key].replay()
        return self.logits[:batch]
