"""The in-process executor (world size 1)."""

from __future__ import annotations

import weakref

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine


def test_shutdown_frees_the_model_and_the_kv_cache():
    """A benchmark that runs two engines in one process needs the first one's memory back: on a GPU
    the second engine sizes its KV cache from what is free."""
    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32"))
    runner = engine.executor.worker.runner
    model, kv_cache = weakref.ref(runner.model), weakref.ref(runner.kv_caches[0])
    del runner
    engine.shutdown()
    assert model() is None and kv_cache() is None
    assert engine.executor.info.num_kv_blocks > 0  # what it found at start-up stays readable


def test_cudnn_ragged_is_set_before_the_first_attention_call(monkeypatch):
    """PyTorch reads TORCH_CUDNN_SDPA_AVOID_RECOMPILE once, at its first cuDNN attention call: the
    worker sets it before building its attention backend."""
    import os

    monkeypatch.delenv("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", raising=False)
    LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32")).shutdown()
    assert "TORCH_CUDNN_SDPA_AVOID_RECOMPILE" not in os.environ
    LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", cudnn_ragged=True)).shutdown()
    assert os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] == "1"


def test_the_triton_chunk_split_follows_the_tbt_slo_unless_set(monkeypatch):
    """Under a TBT SLO, chunks of up to 2048 tokens (group 4) go to the one Triton launch; otherwise
    only those up to 128; an explicit --triton-chunk-rows wins. The worker hands it to its backend."""
    from mnemosyne.attention import backend as attention_backend
    from mnemosyne.config import LONE_TRITON_CHUNK_ROWS, SERVING_TRITON_CHUNK_ROWS

    assert EngineConfig().chunk_rows_to_triton == LONE_TRITON_CHUNK_ROWS == 512
    assert EngineConfig(tbt_slo_ms=50).chunk_rows_to_triton == SERVING_TRITON_CHUNK_ROWS == 8192
    assert EngineConfig(tbt_slo_ms=50, triton_chunk_rows=1024).chunk_rows_to_triton == 1024
    seen = []
    select = attention_backend.select_backend
    monkeypatch.setattr("mnemosyne.executor.worker.select_backend",
                        lambda name, device, dtype, rows, ragged: seen.append((rows, ragged))
                        or select(name, device, dtype, rows, ragged))
    LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32", tbt_slo_ms=50)).shutdown()
    LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", dtype="float32")).shutdown()
    assert seen == [(8192, True), (512, False)]  # the backend also learns whether cuDNN's plans are exact
