"""Attention over the paged KV cache. Every backend returns (out, lse) so partial results from
KV shards (KVP) or from prefix and chunk can be merged exactly."""

from mnemosyne.attention.backend import AttentionBackend, AttentionMetadata, merge_attention, select_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "merge_attention", "select_backend"]
