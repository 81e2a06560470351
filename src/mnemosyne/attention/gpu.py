"""GPU attention: decodes go to the Triton paged decode kernel and short chunks to the Triton chunk
kernel, one launch each for the whole batch; longer chunks run cuDNN over their cached prefix, read
as strided views of contiguous page runs, plus a causal pass over the chunk itself, all merged by LSE.

cuDNN takes the kv heads as they are (GQA natively), so K/V are never expanded, nor q copied: on an
H200, over a 64K prefix, it ran as fast as or faster than folding each kv head's q heads into the
query axis ([1, kv_heads, group × C, D], the path before) at every chunk of 512 to 16K tokens
(609-674 against 605-667 TFLOP/s, `benchmarks/prefill_anatomy.py`, call40).
"""

from __future__ import annotations

import logging

import torch

from mnemosyne.attention.backend import AttentionMetadata
from mnemosyne.attention.routing import CUDNN_MIN_ROWS, routes_to_triton
from mnemosyne.attention.triton_chunk import ShortChunks, chunk_splits, paged_chunks, short_chunks
from mnemosyne.attention.triton_decode import MAX_SPLITS, decode_min_span, decode_splits, paged_decode
from mnemosyne.attention.triton_merge import merge_parts
from mnemosyne.config import LONE_TRITON_CHUNK_ROWS

logger = logging.getLogger(__name__)

SMALL_CHUNK_ROWS = LONE_TRITON_CHUNK_ROWS
"""Query rows per kv head (GQA group × new tokens: 128 tokens at Llama-3-8B's group of 4) up to which
a chunk goes to the split Triton kernel rather than cuDNN, by default; the engine sets it per run
(EngineConfig.triton_chunk_rows: 8192 when serving under a TBT SLO, where steps are launch-bound).
cuDNN gives each kv head one program per 128-row query tile whatever the context: the H200 profile measured the same 24 ms (32 layers, 64K
prefix) for 32- and 128-token chunks, 8 and 32 programs on 132 SMs, against a 2 ms bandwidth floor
for the first. The Triton kernel splits the context instead. Up to about 200 rows it is bound by
reading K/V (an H200 does about 200 FLOP per byte read); beyond, by its tensor-core throughput, which
needs to beat cuDNN's at 4 tiles per kv head (about 180 TFLOP/s in that profile). Measured with
`benchmarks/gpu_kernels.py --only short` on an H200: 1.5-11x faster than cuDNN up to 128 tokens
(prefixes of 16K-256K), 0.8x at 256 tokens over 64K and more. Under a raised split (serving), a chunk
still goes to cuDNN where it measured faster there (`routing.py`)."""


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, H, Lq, D], k/v [1, H, Lk, D] (strided views allowed) -> out [1, H, Lq, D], lse [1, H, Lq]."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, is_causal, False, scale=scale)[:2]
    return out, lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2]).float()


PIECE_MIN_KEYS = 1024
"""With exact cuDNN plans, prefix runs are cut into pieces of power-of-two lengths down to this, and a
last piece of the rest (`run_pieces`)."""


def run_pieces(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) as pieces of power-of-two lengths, longest first, while at least PIECE_MIN_KEYS
    remain, then one piece of the rest. PyTorch builds a cuDNN plan for every new shape, 40-100 ms of
    host time with the GPU idle (`benchmarks/cudnn_replan.py`), and a prompt prefilled in 16K chunks
    meets a new prefix length at every chunk: as pieces, a 1M-token prompt's prefixes need about 8
    plan shapes instead of 64, which the warm-up builds before the first request. The price is an LSE
    merge per extra piece, a pass over the chunk's output (about 0.1 ms a layer for 16K tokens)."""
    pieces = []
    while end - start >= PIECE_MIN_KEYS:
        length = 1 << ((end - start).bit_length() - 1)
        pieces.append((start, start + length))
        start += length
    if end > start:
        pieces.append((start, end))
    return pieces


def piece_lengths(max_keys: int) -> list[int]:
    """Every power-of-two piece length of `run_pieces` in a prefix of at most max_keys tokens."""
    return [1 << i for i in range((PIECE_MIN_KEYS - 1).bit_length(), max_keys.bit_length())]


def chunk_attention(q: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_runs: tuple[tuple[int, int], ...],
                    scale: float, split_runs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's chunk: q [C, Hq, D] with its own k/v [C, Hkv, D], over prefix runs in the cache.
    k_new = v_new = None: no causal part (a KVP group's earlier shard, all in prefix_runs).
    split_runs: cut the runs into `run_pieces` (with exact cuDNN plans, not on the ragged path).

    Every tensor handed to cuDNN is stored sequence-major (BSHD) and packed, the layout its ragged
    path (TORCH_CUDNN_SDPA_AVOID_RECOMPILE) needs; K/V of the prefix are strided views of the cache.
    Returns out [C, Hq, D], lse [C, Hq] float32.
    """
    q = q.contiguous()  # the rotary kernel's output already is
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, C, D]
    parts = []
    if k_new is not None and v_new is not None:
        # the causal part over the chunk itself, each kv head shared by its group of q heads
        k_new, v_new = (t.contiguous().transpose(0, 1).unsqueeze(0) for t in (k_new, v_new))  # gathered: packed
        out, lse = _cudnn(qh, k_new, v_new, scale, True)
        parts.append((out[0].transpose(0, 1), lse[0].transpose(0, 1)))
    runs = [piece for run in prefix_runs for piece in (run_pieces(*run) if split_runs else (run,))]
    for start, end in runs:
        k = k_cache[start:end].permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, L, D], a view
        v = v_cache[start:end].permute(1, 0, 2).unsqueeze(0)
        out, lse = _cudnn(qh, k, v, scale, False)
        parts.append((out[0].transpose(0, 1), lse[0].transpose(0, 1)))
    if len(parts) == 1:
        out, lse = parts[0]
        return out.to(q.dtype), lse
    # one pass over every part, summed in float32 and rounded to the model's dtype once
    return merge_parts([o for o, _ in parts], [lse for _, lse in parts], q.dtype)


def cudnn_plan_classes(group: int, small_chunk_rows: int, max_chunk: int,
                       max_keys: int) -> tuple[list[int], list[int]]:
    """The chunk and run lengths whose cuDNN calls build every plan of the ragged path that serving
    can need: chunks of each power of two from the smallest that `GpuBackend` sends to cuDNN (both
    its parts are keyed on the chunk's length) up to the one that holds max_chunk; prefix runs (any
    length: a prefix may end mid-page) of each power of two up to max_keys, and max_keys itself for
    the class above the last power."""
    smallest = -(-min(CUDNN_MIN_ROWS, small_chunk_rows + 1) // group)
    chunks = [1 << i for i in range((smallest - 1).bit_length(), (max_chunk - 1).bit_length() + 1)]
    runs = [1 << i for i in range(max_keys.bit_length()) if 1 << i <= max_keys]
    if runs[-1] < max_keys:
        runs.append(max_keys)
    return chunks, runs


class GpuBackend:
    supports_cuda_graphs = True

    def __init__(self, num_sms: int | None = None, small_chunk_rows: int = SMALL_CHUNK_ROWS,
                 cudnn_ragged: bool = False) -> None:
        """num_sms: streaming multiprocessors that context splits fill; None reads the device's.
        small_chunk_rows: query rows per kv head up to which a chunk goes to the Triton chunk kernel.
        cudnn_ragged: the process runs cuDNN's ragged path (plans keyed on power-of-two classes of
        length); otherwise plans are exact, and prefix runs are cut into `run_pieces`."""
        self._num_sms = num_sms
        self.small_chunk_rows = small_chunk_rows
        self.cudnn_ragged = cudnn_ragged
        self._short: tuple[AttentionMetadata, ShortChunks] | None = None
        """The last step's short chunks, built by its first layer and reused by the others."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        nd = meta.num_decodes
        if meta.num_requests == nd:  # decode-only (eager: past the graphs' limits, or graphs off)
            return self._decodes(q, k_cache, v_cache, meta, scale)
        short = self._short_chunks(meta, q.shape[1] // k_cache.shape[1])
        outs, lses = [], []
        if nd and short.requests[:1] != (0,):  # else the decodes ride in the chunk launch (`_short_chunks`)
            o, lse = self._decodes(q, k_cache, v_cache, meta, scale)
            outs.append(o)
            lses.append(lse)
        chunk_outs, chunk_lses = self._chunks(q, k_cache, v_cache, meta, scale, short)
        outs += chunk_outs
        lses += chunk_lses
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs), torch.cat(lses)

    def _decodes(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's decodes (its first num_decodes requests) on the paged decode kernel."""
        nd, num_kv_heads = meta.num_decodes, k_cache.shape[1]
        lens = meta.seq_lens[:nd]
        splits = meta.decode_splits or decode_splits(nd, num_kv_heads, max(lens), self._num_sms, sum(lens))
        return paged_decode(q[:nd], k_cache, v_cache, meta.block_tables, meta.rows[:nd], meta.seq_lens_tensor[:nd],
                            meta.page_size, scale, splits, decode_min_span(nd, num_kv_heads, self._num_sms))

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, page_size: int,
                scale: float, context: int = 16384, cudnn_plans: tuple[tuple[int, ...], int] | None = None) -> None:
        """Tune both Triton kernels for every shape class they can meet, on real contexts, before any
        request arrives: the decode kernel for each split class, the chunk kernel for each tile
        height. The autotuner would otherwise compile and time its configurations the first time a
        step met one, seconds in the middle of serving. Then one cuDNN chunk call, for cuDNN's own
        set-up, and with `cudnn_plans` = (a long prompt's chunk lengths, most keys in a prefix run), a
        call for every plan cuDNN's ragged path can build (`_warm_cudnn_classes`, up to the longest
        chunk), or with exact plans, for every piece those chunks can meet (`_warm_cudnn_pieces`)."""
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(k_cache.device).multi_processor_count
        # 1, 2, 4, … 64 splits tune the classes, each on the batch that fills the SMs with them; 128 and
        # 256 share the last class and compile the merge for their power-of-two padding
        for splits in (1 << i for i in range(MAX_SPLITS.bit_length())):
            batch = min(256, max(1, -(-4 * self._num_sms // (splits * k_cache.shape[1]))))
            tune_decode(k_cache, v_cache, num_heads, page_size, batch, splits, scale)
        num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        num_pages = min(context, k_cache.shape[0] - page_size) // page_size  # not the scratch page
        if num_pages == 0:
            return
        tables = torch.arange(num_pages, dtype=torch.int32, device=k_cache.device)[None]
        num_keys = num_pages * page_size
        for num_new in sorted({max(1, rows // group) for rows in (16, 32, 64, 128)}):  # each tile height
            q = torch.randn(num_new, num_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
            table = torch.tensor([[0, num_keys, num_keys - num_new, 0, num_new, 0]], dtype=torch.int32,
                                 device=k_cache.device)
            chunks = ShortChunks((0,), table, num_new, num_new, num_keys)
            splits = chunk_splits(chunks, num_heads, num_kv_heads, self._num_sms)
            paged_chunks(q, k_cache, v_cache, tables, chunks, page_size, scale, splits)
        # cuDNN's first attention call in a process takes about 2 s (an H200, call26 of
        # benchmarks/cudnn_replan.py --sweep): here, not in the first step with a long chunk
        if k_cache.device.type == "cuda":  # (the Triton interpreter's tests run this on the CPU)
            num_new = min(256, num_keys // 2)
            q = torch.randn(num_new, num_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
            k_new = torch.randn(num_new, num_kv_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
            chunk_attention(q, k_new, torch.randn_like(k_new), k_cache, v_cache, ((0, num_keys - num_new),), scale)
            if cudnn_plans is not None:
                chunk_lengths, max_keys = cudnn_plans
                if self.cudnn_ragged:
                    self._warm_cudnn_classes(k_cache, v_cache, num_heads, page_size, scale, max(chunk_lengths),
                                             max_keys)
                else:
                    self._warm_cudnn_pieces(k_cache, v_cache, num_heads, page_size, scale, chunk_lengths, max_keys)

    def _warm_cudnn_pieces(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, page_size: int,
                           scale: float, chunk_lengths: tuple[int, ...], max_keys: int) -> None:
        """With exact plans, a long prompt's chunks (of chunk_lengths tokens) meet a causal part of
        their length and prefix pieces (`run_pieces`) of each power of two from PIECE_MIN_KEYS: one
        call per (chunk, piece) length builds every plan they need, 40-100 ms each, here rather than
        in a prefill. (A prompt's last chunk, of another length, still builds its own.)"""
        num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        max_keys = min(max_keys, k_cache.shape[0] - page_size)
        chunks = [n for n in chunk_lengths if not self._routes_to_triton(n, group, max_keys)]
        pieces = piece_lengths(max_keys)
        if not chunks or not pieces:
            return  # such chunks go to the Triton kernel, or no prefix reaches a piece
        q = torch.randn(max(chunks), num_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
        k_new = torch.randn(max(chunks), num_kv_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
        for num_new in chunks:
            for piece in pieces:
                chunk_attention(q[:num_new], k_new[:num_new], k_new[:num_new], k_cache, v_cache, ((0, piece),),
                                scale, split_runs=True)
        logger.info("cuDNN plans built: chunks of %s tokens over pieces of %d to %d keys", chunks, pieces[0],
                    pieces[-1])

    def _warm_cudnn_classes(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, page_size: int,
                            scale: float, max_chunk: int, max_keys: int) -> None:
        """cuDNN's ragged path (TORCH_CUDNN_SDPA_AVOID_RECOMPILE) keys its plans on lengths rounded up
        to powers of two, and builds each plan at its first call: 40-100 ms on an H200 (`cudnn_replan.py
        --sweep`). Serving met a new class every few steps early on, each a step of 80-130 ms against
        a 50 ms budget (call31's long+short run, all in its first 3.4 s). One call per (chunk, run)
        class of `cudnn_plan_classes` builds them all here."""
        num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
        chunks, runs = cudnn_plan_classes(num_heads // num_kv_heads, self.small_chunk_rows, max_chunk,
                                          min(max_keys, k_cache.shape[0] - page_size))
        q = torch.randn(chunks[-1], num_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
        k_new = torch.randn(chunks[-1], num_kv_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
        for num_new in chunks:
            for run in runs:
                chunk_attention(q[:num_new], k_new[:num_new], k_new[:num_new], k_cache, v_cache, ((0, run),), scale)
        logger.info("cuDNN ragged plans built: chunks of %s tokens over runs of %d to %d keys", chunks, runs[0],
                    runs[-1])

    def _chunks(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, short: ShortChunks) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """out [C, Hq, D] and lse [C, Hq] of each chunk after the decodes, in batch order, and first those
        of the decodes when they ride in the short chunks' launch; the short chunks' come from that one
        Triton launch, stacked in that same order (the whole step's, when it holds every request)."""
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
        nd = meta.num_decodes
        outs, lses, short_row = [], [], 0
        if short.requests:
            splits = chunk_splits(short, num_heads, num_kv_heads, self._num_sms)
            short_out, short_lse = paged_chunks(q, k_cache, v_cache, meta.block_tables, short, meta.page_size,
                                                scale, splits)
            folded = nd > 0 and short.requests[0] == 0  # the decodes rode along: their rows come first
            if len(short.requests) - (nd if folded else 0) == meta.num_requests - nd:
                return [short_out], [short_lse]  # every chunk is in the launch: its rows are in batch order
            if folded:
                short_row = nd
                outs.append(short_out[:nd])
                lses.append(short_lse[:nd])
        group = num_heads // num_kv_heads
        for i in range(nd, meta.num_requests):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if self._is_short(meta, i, group):
                outs.append(short_out[short_row:short_row + end - start])
                lses.append(short_lse[short_row:short_row + end - start])
                short_row += end - start
                continue
            new_slots = meta.slot_mapping[start:end]
            has_own_keys = not (meta.is_prefix_only and meta.is_prefix_only[i])
            o, lse = chunk_attention(q[start:end], k_cache[new_slots] if has_own_keys else None,
                                     v_cache[new_slots] if has_own_keys else None, k_cache, v_cache,
                                     meta.prefix_runs[i], scale, split_runs=not self.cudnn_ragged)
            outs.append(o)
            lses.append(lse)
        return outs, lses

    def _is_short(self, meta: AttentionMetadata, i: int, group: int) -> bool:
        """Whether request i's chunk goes to the Triton launch."""
        num_new = meta.query_start_loc[i + 1] - meta.query_start_loc[i]
        return self._routes_to_triton(num_new, group, meta.seq_lens[i] - num_new)

    def _routes_to_triton(self, num_new: int, group: int, num_prefix: int) -> bool:
        """Whether a chunk of num_new tokens over num_prefix cached ones goes to the Triton launch."""
        return routes_to_triton(num_new, group, num_prefix, self.small_chunk_rows)

    def _short_chunks(self, meta: AttentionMetadata, group: int) -> ShortChunks:
        """The step's short chunks, built once per step (one host-to-device copy), and its decodes in the
        same launch when there is one and every context in it is at most FOLD_DECODE_MAX_KEYS: the decode
        kernel's launch, its split merge and the concatenation of both outputs, each layer, cost host
        time that a mixed step is bound by (`benchmarks/mixed_step_host.py`)."""
        if self._short is None or self._short[0] is not meta:
            nd = meta.num_decodes
            requests = [i for i in range(nd, meta.num_requests) if self._is_short(meta, i, group)]
            if requests and nd and max(meta.seq_lens[i] for i in (*range(nd), *requests)) <= FOLD_DECODE_MAX_KEYS:
                requests = list(range(nd)) + requests
            self._short = (meta, short_chunks(meta, requests))
        return self._short[1]


FOLD_DECODE_MAX_KEYS = 8192
"""Longest context of any request in a step's short-chunk launch for its decodes to ride in it. There a
decode's 4 query rows (at a GQA group of 4) fill a tile of up to 128 rows, so the kernel computes up
to 32 times the decode's own work: over the contexts of chat requests that is about a microsecond a
decode a layer on an H200, but over a long context it would cost what the decode kernel saves. A
chunk over a long context makes the launch bound by the device, not the host, and counted as chunks
the decodes cut its splits (15 of them: 7 instead of 17 over 100K keys). On an H200, 15 decodes of
2-4K keys beside a 128-token chunk over 64K and 128K took 0.84 and 1.35 ms a layer in the launch, 0.55
and 1.07 ms on their own kernel, against 0.49 and 1.01 ms for the chunk alone
(`benchmarks/launch_splits.py`, call103). So a long prompt's chunk keeps the decodes out."""


TUNE_TOKENS_PER_SPLIT = 2048
"""Context per split that the decode kernel is tuned on: 128K for one request over 64 splits, 4K
each for a batch with one split."""


def tune_decode(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, page_size: int, batch: int,
                splits: int, scale: float) -> None:
    """Run the decode kernel once on real work of this shape, so that its autotuner picks a
    configuration for the split class on a realistic context (on empty rows, as a CUDA graph's
    warm-up decodes them, every configuration times alike and the pick is noise)."""
    num_slots, head_dim = k_cache.shape[0], k_cache.shape[2]
    num_pages = (num_slots - page_size) // page_size  # not the scratch page
    context = min(max(splits * TUNE_TOKENS_PER_SPLIT, 4096), num_pages * page_size)
    pages_per_request = -(-context // page_size)
    if pages_per_request == 0:
        return
    device = k_cache.device
    first_page = torch.arange(batch, device=device)[:, None] * pages_per_request
    tables = ((first_page + torch.arange(pages_per_request, device=device)) % num_pages).to(torch.int32)
    q = torch.randn(batch, num_heads, head_dim, dtype=k_cache.dtype, device=device)
    paged_decode(q, k_cache, v_cache, tables, torch.arange(batch, dtype=torch.int32, device=device),
                 torch.full((batch,), context, dtype=torch.int32, device=device), page_size, scale, splits)
