"""The GPU path (bf16, Triton decode, cuDNN chunks, CUDA graphs) against the float32 CPU reference
on the same dummy weights, driven by identical step plans: chunked prefill over a prefix, then
decodes. Tolerances are bf16's: logits within 0.1 absolute (max |logit| is about 5 here)."""

from __future__ import annotations

from array import array

import pytest
import torch

from mnemosyne.config import EngineConfig
from mnemosyne.executor.worker import Worker
from mnemosyne.models.loaders import resolve_model
from mnemosyne.plan import NewRequest, ScheduledChunk, StepPlan
from mnemosyne.request import SamplingParams

pytestmark = pytest.mark.gpu
LOGIT_ATOL = 0.1


class CpuWeights:
    """The dummy weights as generated on the CPU, moved to any device: dummy weights drawn on a GPU
    come from its own random generator and would differ from the CPU reference's."""

    def __init__(self, model: str):
        self.inner = resolve_model(model)
        self.name = self.inner.name

    def load_config(self):
        return self.inner.load_config()

    def iter_weights(self, device, dtype, names=None, lazy=False):
        for name, tensor in self.inner.iter_weights(torch.device("cpu"), torch.float32, names):
            yield name, tensor.to(device, dtype)

    def load_tokenizer(self):
        return None


def make_worker(device: str, dtype: str, eager: bool) -> Worker:
    config = EngineConfig(model="dummy:tiny", device=device, dtype=dtype, kv_cache_memory=0.05,
                          max_num_seqs=8, enforce_eager=eager, attention_backend="auto" if device == "cuda"
                          else "reference")
    loader = CpuWeights(config.model)
    return Worker(config, loader.load_config(), loader)


def step_logits(worker: Worker, plan: StepPlan) -> torch.Tensor:
    runner = worker.runner
    runner.apply_plan(plan)
    inputs = runner.prepare(plan)
    with torch.inference_mode():
        logits = runner._logits(inputs)  # as a step runs it: decode graphs, layer graphs or eagerly
    if logits is None:
        return torch.empty(0, runner.model.config.vocab_size)
    return logits.float().cpu()


def plans(page_size: int, lengths: tuple[int, int] = (70, 33), chunk: int = 32) -> list[StepPlan]:
    """Two requests: 70- and 33-token prompts (or `lengths`) prefilled in chunks of 32 (or `chunk`), then
    5 decode steps."""
    gen = torch.Generator().manual_seed(0)
    prompts = {r: torch.randint(3, 500, (n,), generator=gen).tolist() for r, n in zip("ab", lengths, strict=True)}
    num_pages = [-(-(n + 5) // page_size) for n in lengths]  # the prompt and its 5 decodes
    # a's pages contiguous: one prefix run
    pages = {"a": list(range(num_pages[0])), "b": list(range(num_pages[0] + 10, num_pages[0] + 10 + num_pages[1]))}
    params = SamplingParams(max_tokens=8)
    out = [StepPlan(1, tuple(NewRequest(r, array("i", p), params, 0) for r, p in prompts.items()), (), ())]
    done = {r: 0 for r in prompts}
    step = 1
    while any(done[r] < len(p) for r, p in prompts.items()):
        chunks = []
        for r, p in prompts.items():
            n = min(chunk, len(p) - done[r])
            if n:
                need = -(-(done[r] + n) // page_size) - -(-done[r] // page_size)
                first = -(-done[r] // page_size)
                chunks.append(ScheduledChunk(r, done[r], n, tuple(pages[r][first:first + need]), ()))
                done[r] += n
        out.append(StepPlan(step, out[0].new_requests if step == 1 else (), tuple(chunks), ()))
        step += 1
    out = out[1:]
    for i in range(5):
        chunks = []
        for r in prompts:
            pos = done[r]
            new_page = (pages[r][pos // page_size],) if pos % page_size == 0 else ()
            chunks.append(ScheduledChunk(r, pos, 1, new_page, (7 + i,)))
            done[r] += 1
        out.append(StepPlan(step, (), tuple(chunks), ()))
        step += 1
    return out


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_bf16_gpu_logits_match_float32_cpu(eager):
    cpu = make_worker("cpu", "float32", eager=True)
    gpu = make_worker("cuda", "bfloat16", eager=eager)
    assert (gpu.runner.graphs is None) == eager
    assert (gpu.runner.layer_graphs is None) == eager
    compared = 0
    for plan in plans(cpu.config.block_size):
        want, got = step_logits(cpu, plan), step_logits(gpu, plan)
        assert want.shape == got.shape
        if want.numel():
            torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
            compared += want.shape[0]
    assert compared == 2 + 2 * 5  # each prompt's last chunk, then 5 decodes of 2 requests


def test_long_chunks_through_the_fused_mlp_match_float32_cpu(monkeypatch):
    """Chunks of 1,200 tokens and more take the MLP's fused gate/up GEMM (--fused-swiglu, the default)
    on a GPU with TMA; against the float32 CPU reference as above."""
    from mnemosyne.layers import triton_swiglu

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the fused kernel needs TMA (compute capability 9.0 or later)")
    cpu = make_worker("cpu", "float32", eager=True)
    gpu = make_worker("cuda", "bfloat16", eager=True)
    rows = []
    fused = triton_swiglu.gate_up_silu
    monkeypatch.setattr(triton_swiglu, "gate_up_silu", lambda x, w: rows.append(x.shape[0]) or fused(x, w))
    compared = 0
    for plan in plans(cpu.config.block_size, lengths=(1500, 1300), chunk=1200):
        want, got = step_logits(cpu, plan), step_logits(gpu, plan)
        if want.numel():
            torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
            compared += want.shape[0]
    assert compared == 2 + 2 * 5
    # the first step's two 1,200-token chunks, then 300 + 100 tokens, in every layer
    layers = len(gpu.model.layers)
    assert rows[:layers] == [2400] * layers and len(rows) == layers


def test_every_decode_graph_variant_matches_the_eager_step():
    """A bucket's graphs differ in their decode splits only: each gives the eager step's logits."""
    gpu = make_worker("cuda", "bfloat16", eager=False)
    runner = gpu.runner
    *prefix, last = plans(gpu.config.block_size)
    for plan in prefix:
        step_logits(gpu, plan)
    runner.apply_plan(last)
    inputs = runner.prepare(last)
    meta = inputs.meta
    with torch.inference_mode():
        hidden = runner.model(inputs.token_ids, inputs.positions, runner.kv_caches, meta, runner.backend)
        eager = runner.model.compute_logits(hidden[inputs.sample_index]).float().cpu()
        bucket, gather, _ = runner._graph_for(meta)
        variants = runner.graphs.splits[bucket]
        assert len(variants) > 1
        for splits in variants:
            got = runner.graphs.run(inputs, (bucket, gather, splits)).float().cpu()
            torch.testing.assert_close(got, eager, atol=LOGIT_ATOL, rtol=0)
