"""Steps with prompt chunks: each layer's work outside attention (norms, projections, rotary with the
K/V write, the MLP) replayed from CUDA graphs captured per token-count bucket, and only attention,
whose kernels and grids follow the step's requests and contexts, launched eagerly between them.

Why: launched eagerly, such a step costs about 0.4-1.1 ms of host time a layer on an H200 (eight
launches through torch's dispatcher, cuBLAS and Triton's launcher, plus attention's), and a chat
prompt's step beside decodes was bound by it: 36 ms of launch against 21 ms of kernels
(`benchmarks/mixed_step_host.py`, call84). Replayed, a layer's non-attention part is one launch.

A model of L layers has L + 1 graphs per bucket. Graph 0 embeds and runs layer 0 up to its attention;
graph i (0 < i < L) finishes layer i - 1 after its attention and runs layer i up to its own; graph L
finishes the last layer and applies the final norm. Between graphs i and i + 1, layer i's attention
runs eagerly on the static q and its output is copied into the static attention buffer. What crosses
from one graph to the next lives in static buffers: token ids, positions, cache slots, q, the
attention output, the residual stream and the final hidden state. All graphs share one memory pool:
one runs at a time, and nothing in the pool outlives its graph's replay.

Padding: a step of T tokens replays the smallest bucket b ≥ T. Rows T to b are padding: whatever
token ids and positions earlier steps left there, and the scratch cache slot, so their K/V writes land
on a page no request owns. Attention never sees them (it reads q[:T]) and nothing samples them.
Every op in the graphs treats each row on its own, so padding changes a real row's arithmetic only
where cuBLAS picks another GEMM kernel for b rows than for T (bf16 rounding; the GPU tests compare
against the eager step).

Built for one whole model on one device (tp = pp = 1; KVP groups each hold the whole model), and on by
default with one device only (`EngineConfig.layer_graph_tokens`: under kvp=4 serving, steps stalled
with them, cause not found). Decode-only steps keep their own graphs (`cuda_graphs.py`), or run
eagerly where those do not reach, one-row decodes on the Triton GEMV.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from mnemosyne.attention.backend import AttentionBackend
from mnemosyne.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from mnemosyne.runner.model_runner import StepInputs

logger = logging.getLogger(__name__)


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts captured for steps of up to max_tokens: 16, 32, 64, then every multiple of 128, and
    max_tokens itself. cuBLAS tiles a GEMM's rows by 128 (or 256) anyway, so padding to the next
    multiple of 128 adds next to no work; below 128 rows, reading the weights takes the same time
    whatever the row count."""
    if max_tokens <= 0:
        return []
    buckets = [b for b in (16, 32, 64) if b < max_tokens]
    buckets += range(128, max_tokens, 128)
    return [*buckets, max_tokens]


class LayerGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], max_tokens: int,
                 scratch_slot: int, device: torch.device, capture: bool = True, show_progress: bool = False):
        """capture=False runs the same pieces eagerly on the padded buffers (the CPU tests' form)."""
        if not (model.is_first_pp_stage and model.is_last_pp_stage):
            raise ValueError("layer graphs hold a whole model: one pipeline stage")
        if model.embed_tokens.group.size > 1:
            raise ValueError("layer graphs are built for tp = 1")
        self.model = model
        self.kv_caches = kv_caches
        self.scratch_slot = scratch_slot
        self.buckets = token_buckets(max_tokens)
        n = self.buckets[-1]
        attn = model.layers[0].self_attn
        dtype = model.embed_tokens.weight.dtype
        hidden_size = model.config.hidden_size
        self.token_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.q = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
        self.attn_out = torch.zeros(n, attn.num_heads * attn.head_dim, dtype=dtype, device=device)
        self.residual = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self._graphs: list[torch.cuda.CUDAGraph] = []
        self._pieces: dict[int, list[Callable[[], None]]] = {}
        """Each bucket's L + 1 pieces, in order: a graph's replay, or the eager piece itself."""
        pool = torch.cuda.graph_pool_handle() if capture else None
        num_layers = len(model.layers)
        with torch.inference_mode(), tqdm(total=len(self.buckets) * (num_layers + 1), desc="capturing layer graphs",
                                          unit="graph", leave=False, disable=not (capture and show_progress)) as bar:
            for b in reversed(self.buckets):  # largest first: its temporaries size the shared pool
                pieces = []
                for i in range(num_layers + 1):
                    def piece(i: int = i, b: int = b) -> None:
                        self._piece(i, b)

                    if capture:
                        piece()  # warm-up: cuBLAS picks its kernels for b rows, Triton compiles
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool):
                            piece()
                        self._graphs.append(graph)
                        piece = graph.replay
                    pieces.append(piece)
                    bar.update()
                self._pieces[b] = pieces
        if capture:
            logger.info("captured %d layer CUDA graphs: token buckets %s", len(self._graphs), self.buckets)

    def bucket(self, num_tokens: int) -> int | None:
        """The bucket that runs a step of num_tokens tokens, or None (none, or more than the largest)."""
        if num_tokens == 0:
            return None
        return next((b for b in self.buckets if b >= num_tokens), None)

    def forward(self, inputs: StepInputs, bucket: int, backend: AttentionBackend) -> torch.Tensor:
        """The model over the step's tokens: final-normed hidden [T, hidden], valid until the next step."""
        meta = inputs.meta
        num_tokens = len(inputs.token_ids)
        self.token_ids[:num_tokens].copy_(inputs.token_ids)
        self.positions[:num_tokens].copy_(inputs.positions)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping)
        self.slot_mapping[num_tokens:bucket].fill_(self.scratch_slot)
        pieces = self._pieces[bucket]
        q, attn_out = self.q[:num_tokens], self.attn_out[:num_tokens]
        pieces[0]()
        for i, layer in enumerate(self.model.layers):
            attn_out.copy_(layer.self_attn.attend(q, self.kv_caches[i], meta, backend))
            pieces[i + 1]()
        return self.hidden[:num_tokens]

    def _piece(self, i: int, b: int) -> None:
        """Piece i of bucket b: finish layer i - 1 after its attention (piece 0: embed), then run layer
        i up to its attention (the last piece: the final norm)."""
        model, layers = self.model, self.model.layers
        if i == 0:
            h, residual = model.embed_tokens(self.token_ids[:b]), None
        else:
            h, residual = layers[i - 1].after_attention(self.attn_out[:b], self.residual[:b])
        if i == len(layers):
            self.hidden[:b].copy_(model.norm(h, residual)[0])
            return
        q, residual = layers[i].before_attention(self.positions[:b], h, residual, self.kv_caches[i],
                                                 self.slot_mapping[:b])
        self.q[:b].copy_(q)
        self.residual[:b].copy_(residual)
