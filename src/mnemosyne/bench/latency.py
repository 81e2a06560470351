"""`mnemosyne bench latency`: TTFT of one prompt of L tokens and TBT at context C with batch B,
each with its floor (from ceilings measured in the same run) and, with --compare hf, HF
transformers on the same weights in the same process."""

from __future__ import annotations

import gc
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mnemosyne.bench.floors import Ceilings, decode_bytes, measure_ceilings, prefill_flops
from mnemosyne.config import EngineConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    engine: str
    kind: str
    """prefill or decode"""
    context: int
    batch: int
    seconds: float
    """TTFT for prefill, median step time (TBT) for decode."""
    floor_seconds: float
    error: str | None = None
    """Why there is no time (the HF peer out of memory); seconds is then NaN."""

    @property
    def efficiency(self) -> float:
        """MFU for prefill, MBU for decode."""
        return self.floor_seconds / self.seconds


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def _prefill_prompt(vocab: int, length: int, index: int) -> list[int]:
    """The index-th prefill's prompt: one of its own, so that a length timed twice does not hit the
    prefix cache (call96-97's did; torch's CPU generator keeps 32 bits of a seed)."""
    return _prompt(vocab, length, (length + index * 1_000_003) % 2**32)


def bench_engine(config: EngineConfig, prefill_lens: list[int], decode_shapes: list[tuple[int, int]],
                 num_decode_steps: int, ceilings: Ceilings) -> tuple[list[Row], ModelConfig]:
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.request import SamplingParams

    engine = LLMEngine(config)
    cfg = engine.model_config
    rows = []
    engine.add_request(_prompt(cfg.vocab_size, 512, 0), SamplingParams(max_tokens=4, ignore_eos=True))
    _drain(engine)  # warm-up
    for i, length in enumerate(prefill_lens):
        engine.add_request(_prefill_prompt(cfg.vocab_size, length, i), SamplingParams(max_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        start = time.perf_counter()
        _drain(engine)
        rows.append(Row("mnemosyne", "prefill", length, 1, time.perf_counter() - start,
                        prefill_flops(cfg, length) / ceilings.matmul_flops_per_s))
    for context, batch in decode_shapes:
        for i in range(batch):
            engine.add_request(_prompt(cfg.vocab_size, context, 7 * i + context),
                               SamplingParams(max_tokens=num_decode_steps + 2, ignore_eos=True))
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
            engine.step()
        engine.step()  # first decode step
        gaps = []
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            if engine.step():  # token to token: with pipeline stages some steps only submit
                gaps.append(time.perf_counter() - start)
                start = time.perf_counter()
        rows.append(Row("mnemosyne", "decode", context, batch, statistics.median(gaps),
                        decode_bytes(cfg, batch, context) / ceilings.copy_bytes_per_s))
    engine.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return rows, cfg


def _drain(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def bench_hf(config: EngineConfig, cfg: ModelConfig, prefill_lens: list[int], decode_shapes: list[tuple[int, int]],
             num_decode_steps: int, ceilings: Ceilings) -> list[Row]:
    """HF transformers' LlamaForCausalLM (SDPA attention) with the same weights, from the same loader."""
    import transformers

    from mnemosyne.models.loaders import resolve_model

    device = torch.device("cuda")
    _grow_segments_in_place()
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=max([*prefill_lens, 8192]),
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")
    if cfg.rope_scaling.rope_type != "default":
        raise ValueError("the HF peer is built for unscaled RoPE; bench a preset such as dummy:llama-3-8b")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(previous)
    params = dict(model.named_parameters())
    loader = resolve_model(config.model, seed=config.seed)
    for name, tensor in loader.iter_weights(device, torch.bfloat16):
        params[name].data.copy_(tensor)
    rows = []
    with torch.inference_mode():
        model(torch.tensor([_prompt(cfg.vocab_size, 512, 0)], device=device), logits_to_keep=1)
        for i, length in enumerate(prefill_lens):
            floor_s = prefill_flops(cfg, length) / ceilings.matmul_flops_per_s
            try:
                ids = torch.tensor([_prefill_prompt(cfg.vocab_size, length, i)], device=device)  # the engine's prompts
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(ids, logits_to_keep=1)
                torch.cuda.synchronize()
                rows.append(Row("hf", "prefill", length, 1, time.perf_counter() - start, floor_s))
            except torch.OutOfMemoryError:
                rows.append(_out_of_memory("prefill", length, 1, floor_s))
        for context, batch in decode_shapes:
            floor_s = decode_bytes(cfg, batch, context) / ceilings.copy_bytes_per_s
            try:
                rows.append(Row("hf", "decode", context, batch, _hf_decode_s(model, cfg, context, batch,
                                                                             num_decode_steps), floor_s))
            except torch.OutOfMemoryError:
                rows.append(_out_of_memory("decode", context, batch, floor_s))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def _grow_segments_in_place() -> None:
    """Expandable segments for the peer's allocations from here on. At 128K on an 80 GB H100, HF's
    MLP asked for 7 GiB with 14.6 GiB reserved but unallocated, in blocks too small (call94)."""
    for name in ("_accelerator_setAllocatorSettings", "_cuda_cudaCachingAllocator_set_allocator_settings"):
        setter = getattr(torch._C, name, None)
        if setter is not None:
            setter("expandable_segments:True")
            return
    logger.info("this torch cannot switch the CUDA allocator to expandable segments; the HF peer runs without")


def _hf_decode_s(model: torch.nn.Module, cfg: ModelConfig, context: int, batch: int, num_steps: int) -> float:
    """The HF peer's median decode step after a prefill of `batch` prompts of `context` tokens."""
    ids = torch.tensor([_prompt(cfg.vocab_size, context, 7 * i + context) for i in range(batch)], device="cuda")
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    gaps = []
    for _ in range(num_steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        token.tolist()
        gaps.append(time.perf_counter() - start)
    return statistics.median(gaps)


def _out_of_memory(kind: str, context: int, batch: int, floor_s: float) -> Row:
    """The peer's row for a shape it has no memory for (HF at 128K on an 80 GB H100: call94); the
    allocator's cache is emptied so that the shapes after it still run."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    logger.warning("HF transformers ran out of memory at %s context %d batch %d (%.1f of %.1f GiB free after)",
                   kind, context, batch, free / 2**30, total / 2**30)
    return Row("hf", kind, context, batch, math.nan, floor_s, error="out of memory")


def report(rows: list[Row], ceilings: Ceilings, out_dir: Path | None, device_name: str) -> str:
    lines = [f"device: {device_name}; measured in this run: bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.0f} "
             f"TFLOP/s, copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s",
             f"{'engine':<10} {'kind':<8} {'context':>8} {'batch':>5} {'time':>10} {'floor':>10} "
             f"{'x floor':>8} {'MFU/MBU':>8}"]
    for r in rows:
        if r.error is not None:
            lines.append(f"{r.engine:<10} {r.kind:<8} {r.context:>8} {r.batch:>5} {r.error:>10} "
                         f"{r.floor_seconds * 1e3:>8.1f}ms")
            continue
        lines.append(f"{r.engine:<10} {r.kind:<8} {r.context:>8} {r.batch:>5} {r.seconds * 1e3:>8.1f}ms "
                     f"{r.floor_seconds * 1e3:>8.1f}ms {r.seconds / r.floor_seconds:>8.2f} {r.efficiency:>8.2f}")
    ours = {(r.kind, r.context, r.batch): r for r in rows if r.engine == "mnemosyne"}
    for r in rows:
        if r.engine == "hf" and r.error is None and (r.kind, r.context, r.batch) in ours:
            mine = ours[(r.kind, r.context, r.batch)]
            lines.append(f"speed-up over hf, {r.kind} context {r.context} batch {r.batch}: "
                         f"{r.seconds / mine.seconds:.2f}x")
    text = "\n".join(lines)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "latency.json").write_text(json.dumps(
            {"device": device_name, "ceilings": asdict(ceilings),
             "rows": [_json_row(r) for r in rows]}, indent=2))
        (out_dir / "latency.txt").write_text(text + "\n")
        _plot(rows, out_dir / "latency.png")
    return text


def _json_row(row: Row) -> dict:
    """The row with its efficiency; no time (a peer out of memory) is null, not NaN, which JSON lacks."""
    d = dict(asdict(row), efficiency=row.efficiency)
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, label in ((axes[0], "prefill", "TTFT (s)"), (axes[1], "decode", "TBT at batch 1 (ms)")):
        scale = 1.0 if kind == "prefill" else 1e3
        for engine, style in (("mnemosyne", "o-"), ("hf", "s--")):
            pts = sorted((r.context, r.seconds * scale) for r in rows
                         if r.engine == engine and r.kind == kind and r.batch == 1 and r.error is None)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=engine)
        floor = sorted({(r.context, r.floor_seconds * scale) for r in rows if r.kind == kind and r.batch == 1})
        if floor:
            ax.plot(*zip(*floor, strict=True), "k:", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(config: EngineConfig, prefill_lens: list[int], decode_shapes: list[tuple[int, int]], num_decode_steps: int,
        compare_hf: bool, out_dir: Path | None) -> str:
    if not torch.cuda.is_available():
        raise ValueError("mnemosyne bench latency needs a CUDA device")
    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    rows, cfg = bench_engine(config, prefill_lens, decode_shapes, num_decode_steps, ceilings)
    device_name = torch.cuda.get_device_name(device)
    if compare_hf:
        # The engine's figures first, to the terminal and the folder: the peer's run can still fail.
        print(report(rows, ceilings, out_dir, device_name), flush=True)
        rows += bench_hf(config, cfg, prefill_lens, decode_shapes, num_decode_steps, ceilings)
    return report(rows, ceilings, out_dir, device_name)
