"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) over a flat batch of tokens from
many requests: no padding, positions and attention metadata say where each token belongs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mnemosyne.attention.backend import AttentionBackend, AttentionMetadata
from mnemosyne.config import ModelConfig
from mnemosyne.distributed.comm import SINGLE, Group
from mnemosyne.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mnemosyne.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mnemosyne.layers.norm import RMSNorm
from mnemosyne.layers.rotary import RotaryEmbedding
from mnemosyne.models.loaders import TensorSlices, read_whole


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, group: Group, reduce_float32: bool = True,
                 one_row_gemv: bool = False):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias, group=group, one_row_gemv=one_row_gemv)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, group, reduce_float32,
                                        one_row_gemv)
        self.rotary = rotary
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5

    def project(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> rotated q [T, heads, head_dim]; rotated k and v written into this layer's
        kv_cache [2, num_slots, kv_heads, head_dim] at slot_mapping [T]."""
        q, k, v = self.qkv_proj(x)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.rotary.rotate_and_store(positions, q, k, v, kv_cache[0], kv_cache[1], slot_mapping)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               backend: AttentionBackend) -> torch.Tensor:
        """Rotated q [T, heads, head_dim] over the cache -> attention output [T, heads × head_dim]."""
        out, _ = backend.forward(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return out.reshape(-1, self.num_heads * self.head_dim)


FUSED_SWIGLU_BLOCK = 128
"""`layers/triton_swiglu.py`'s BLOCK_N: with --fused-swiglu, the gate/up weight's gate and up rows alternate
in blocks of this many (where a rank's shard is a multiple of it), a GEMM tile's worth of each."""


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)). With fused_swiglu, the gate/up weight is laid out for the fused
    kernel, which inputs of at least FUSED_SWIGLU_MIN_ROWS rows take on a GPU with TMA."""

    def __init__(self, cfg: ModelConfig, group: Group, reduce_float32: bool = True, one_row_gemv: bool = False,
                 fused_swiglu: bool = False):
        super().__init__()
        shard = cfg.intermediate_size // group.size
        self.interleave = FUSED_SWIGLU_BLOCK if fused_swiglu and shard % FUSED_SWIGLU_BLOCK == 0 else None
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, group=group,
                                                 one_row_gemv=one_row_gemv, interleave=self.interleave)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, group, reduce_float32,
                                           one_row_gemv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from mnemosyne.layers import triton_swiglu
            from mnemosyne.layers.triton_ops import silu_and_mul

            weight = self.gate_up_proj.weight
            if (self.interleave and x.shape[0] >= triton_swiglu.FUSED_SWIGLU_MIN_ROWS
                    and triton_swiglu.supported(x, weight)):
                return self.down_proj(triton_swiglu.gate_up_silu(x, weight))
            return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.interleave))
        gate_up = self.gate_up_proj(x)
        blocks = gate_up.view(gate_up.shape[0], -1, 2, self.interleave or gate_up.shape[1] // 2)
        return self.down_proj((F.silu(blocks[:, :, 0]) * blocks[:, :, 1]).reshape(gate_up.shape[0], -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, group: Group, reduce_float32: bool = True,
                 one_row_gemv: bool = False, fused_swiglu: bool = False):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, group, reduce_float32, one_row_gemv)
        self.mlp = LlamaMLP(cfg, group, reduce_float32, one_row_gemv, fused_swiglu)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (h', residual'); the stream is h + residual, summed inside the next norm."""
        q, residual = self.before_attention(positions, h, residual, kv_cache, meta.slot_mapping)
        return self.after_attention(self.self_attn.attend(q, kv_cache, meta, backend), residual)

    # The layer's work on either side of attention: everything but attention treats each token on its
    # own, so a step may run these two halves for a padded batch (`runner/layer_graphs.py`).

    def before_attention(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                         kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (rotated q [T, heads, head_dim], residual'), this layer's K/V written."""
        x, residual = self.input_layernorm(h, residual)
        return self.self_attn.project(positions, x, kv_cache, slot_mapping), residual

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output [T, heads × head_dim], residual) -> (h', residual')."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn_out), residual)
        return self.mlp(x), residual


# HF checkpoint name fragment -> (our fused parameter, shard id)
_FUSED = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """Layers [layer_start, layer_end) of the model; the first stage embeds, the last one has
    the final norm and LM head (pipeline stages hold a slice, a single process holds all).
    one_row_gemv: the layers' linears send a one-row input (batch-1 decode) to the Triton GEMV;
    fused_swiglu: long inputs take the MLP's gate/up GEMM with SiLU × up fused (`LlamaMLP`)."""

    def __init__(self, cfg: ModelConfig, tp_group: Group = SINGLE,
                 layer_range: tuple[int, int] | None = None, tp_reduce_float32: bool = True,
                 one_row_gemv: bool = False, fused_swiglu: bool = False):
        super().__init__()
        self.config = cfg
        self.layer_start, self.layer_end = layer_range or (0, cfg.num_layers)
        self.is_first_pp_stage = self.layer_start == 0
        self.is_last_pp_stage = self.layer_end == cfg.num_layers
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group) \
            if self.is_first_pp_stage else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, tp_group, tp_reduce_float32, one_row_gemv,
                                                      fused_swiglu)
                                    for _ in range(self.layer_start, self.layer_end))
        if self.is_last_pp_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_group)

    def forward_stage(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                      meta: AttentionMetadata, backend: AttentionBackend,
                      hidden: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This stage's layers: (hidden, residual) [T, hidden] each, whose sum is the residual stream.

        kv_caches[i] is layer (layer_start + i)'s [2, num_slots, kv_heads, head_dim] cache. The first
        stage embeds token_ids; later pipeline stages pass the previous stage's hidden and residual.
        """
        h = self.embed_tokens(token_ids) if self.is_first_pp_stage else hidden
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(positions, h, residual, kv_cache, meta, backend)
        return h, residual

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, backend: AttentionBackend, hidden: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """A whole model, or the last pipeline stage given the previous stage's hidden and residual
        [T, hidden]: token_ids, positions [T] int64 -> final-normed hidden [T, hidden]."""
        h, residual = self.forward_stage(token_ids, positions, kv_caches, meta, backend, hidden, residual)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden [B, hidden] of the positions to sample -> logits [B, vocab] float32."""
        return self.lm_head.logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | TensorSlices]]) -> None:
        """Copy this rank's shard of each HF-named tensor (read lazily where the loader allows); raises
        ValueError on a missing or unknown one."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "model.embed_tokens.weight" and self.is_last_pp_stage and self.config.tie_word_embeddings:
                self.lm_head.weight.weight_loader(self.lm_head.weight, tensor)
                loaded.add("lm_head.weight")
            target = self._param_name(name)
            if target is None:
                continue
            target, shard = target
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target]
            param.weight_loader(param, tensor, shard) if hasattr(param, "weight_loader") \
                else param.data.copy_(read_whole(tensor))
            loaded.add(target)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def _param_name(self, hf_name: str) -> tuple[str, int | str] | None:
        """Our parameter and shard id for an HF tensor name, or None if this stage does not hold it."""
        name = hf_name.removeprefix("model.")
        if name.startswith("layers."):
            index = int(name.split(".")[1])
            if not self.layer_start <= index < self.layer_end:
                return None
            name = name.replace(f"layers.{index}.", f"layers.{index - self.layer_start}.", 1)
        elif (name.startswith("embed_tokens") and self.embed_tokens is None) or (name.startswith(("norm.", "lm_head.")) and not self.is_last_pp_stage):
            return None
        for part, (fused, shard) in _FUSED.items():
            if f".{part}." in name:
                return name.replace(part, fused), shard
        return name, 0
