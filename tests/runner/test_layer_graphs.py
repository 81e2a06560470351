"""Layer graphs: steps with prompt chunks run as pieces over padded static buffers, attention eagerly
between them, give the eager step's logits and K/V. On the CPU the pieces run eagerly (the same code,
uncaptured); on a GPU the captured graphs are compared with the eager step."""

from __future__ import annotations

from array import array

import pytest
import torch

from mnemosyne.config import EngineConfig
from mnemosyne.executor.worker import Worker
from mnemosyne.models.loaders import resolve_model
from mnemosyne.plan import NewRequest, ScheduledChunk, StepPlan
from mnemosyne.request import SamplingParams
from mnemosyne.runner.layer_graphs import LayerGraphs, token_buckets


def test_token_buckets():
    assert token_buckets(2048) == [16, 32, 64, *range(128, 2049, 128)]
    assert token_buckets(300) == [16, 32, 64, 128, 256, 300]
    assert token_buckets(64) == [16, 32, 64]
    assert token_buckets(20) == [16, 20]
    assert token_buckets(0) == []


def make_worker(device: str, dtype: str, **flags) -> Worker:
    config = EngineConfig(model="dummy:tiny", device=device, dtype=dtype, kv_cache_memory=0.05, max_num_seqs=8,
                          attention_backend="sdpa" if device == "cpu" else "auto", **flags)
    loader = resolve_model(config.model)
    return Worker(config, loader.load_config(), loader)


def mixed_plans(page_size: int) -> list[StepPlan]:
    """Three requests: a 70-token prompt in chunks beside a 20- and a 40-token one, whose decodes ride
    along its later chunks; then a decode-only step. Token counts 52, 73, 8, 3."""
    gen = torch.Generator().manual_seed(1)
    prompts = {r: torch.randint(3, 500, (n,), generator=gen).tolist() for r, n in (("a", 70), ("b", 20), ("c", 40))}
    pages = {"a": range(0, 10), "b": range(20, 30), "c": range(40, 50)}
    params = SamplingParams(max_tokens=8)
    done = dict.fromkeys(prompts, 0)

    def chunk(r: str, n: int, token: int | None = None) -> ScheduledChunk:
        start = done[r]
        first, last = -(-start // page_size), -(-(start + n) // page_size)
        done[r] += n
        return ScheduledChunk(r, start, n, tuple(pages[r][first:last]), () if token is None else (token,))

    new = tuple(NewRequest(r, array("i", p), params, 0) for r, p in prompts.items())
    return [
        StepPlan(1, new, (chunk("a", 32), chunk("b", 20)), ()),
        StepPlan(2, (), (chunk("b", 1, 7), chunk("a", 32), chunk("c", 40)), ()),
        StepPlan(3, (), (chunk("b", 1, 8), chunk("c", 1, 9), chunk("a", 6)), ()),
        StepPlan(4, (), (chunk("a", 1, 10), chunk("b", 1, 11), chunk("c", 1, 12)), ()),
    ]


def run_step(worker: Worker, plan: StepPlan) -> torch.Tensor:
    runner = worker.runner
    runner.apply_plan(plan)
    inputs = runner.prepare(plan)
    with torch.inference_mode():
        logits = runner._logits(inputs)
    return torch.empty(0) if logits is None else logits.float().cpu()


class Counting(LayerGraphs):
    """Counts the steps that ran through the layer graphs, by bucket."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used: list[int] = []

    def forward(self, inputs, bucket, backend):
        self.used.append(bucket)
        return super().forward(inputs, bucket, backend)


def test_layer_pieces_match_the_eager_step_on_cpu():
    eager, pieces = make_worker("cpu", "float32"), make_worker("cpu", "float32")
    runner = pieces.runner
    graphs = Counting(runner.model, runner.kv_caches, 128, runner.scratch_slot, pieces.device, capture=False)
    runner.layer_graphs = graphs
    page_size = eager.config.block_size
    for plan in mixed_plans(page_size):
        want, got = run_step(eager, plan), run_step(pieces, plan)
        assert want.shape == got.shape and want.numel()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert graphs.used == [64, 128, 16]  # the decode-only step ran eagerly
    scratch_page = runner.scratch_slot
    for want, got in zip(eager.runner.kv_caches, runner.kv_caches, strict=True):
        # every request's K/V alike; the padding rows wrote only to the scratch page past the pool
        torch.testing.assert_close(got[:, :scratch_page], want[:, :scratch_page], atol=1e-5, rtol=1e-5)


def test_a_step_past_the_largest_bucket_runs_eagerly():
    worker = make_worker("cpu", "float32")
    runner = worker.runner
    graphs = Counting(runner.model, runner.kv_caches, 64, runner.scratch_slot, worker.device, capture=False)
    runner.layer_graphs = graphs
    for plan in mixed_plans(worker.config.block_size):
        run_step(worker, plan)
    assert graphs.used == [64, 16]  # 73 tokens is past 64


def test_layer_graphs_refuse_a_pipeline_stage():
    worker = make_worker("cpu", "float32")
    model = worker.model
    model.is_last_pp_stage = False
    with pytest.raises(ValueError, match="one pipeline stage"):
        LayerGraphs(model, worker.runner.kv_caches, 64, worker.runner.scratch_slot, worker.device, capture=False)


def test_layer_graphs_default_to_one_device_only():
    assert EngineConfig(model="dummy:tiny").layer_graph_limit == 2048
    assert EngineConfig(model="dummy:tiny", max_num_batched_tokens=512).layer_graph_limit == 512
    assert EngineConfig(model="dummy:tiny", kv_parallel_size=4).layer_graph_limit == 0
    assert EngineConfig(model="dummy:tiny", kv_parallel_size=4, layer_graph_tokens=1024).layer_graph_limit == 1024
    assert EngineConfig(model="dummy:tiny", layer_graph_tokens=0).layer_graph_limit == 0


def test_negative_layer_graph_tokens_are_refused():
    with pytest.raises(ValueError, match="--layer-graph-tokens"):
        EngineConfig(model="dummy:tiny", layer_graph_tokens=-1)


@pytest.mark.gpu
def test_layer_graphs_match_the_eager_step_on_gpu():
    """Captured graphs against the same bf16 worker's eager step, at every bucket's padding."""
    graphs, eager = (make_worker("cuda", "bfloat16", enforce_eager=flag, max_num_batched_tokens=128)
                     for flag in (False, True))
    assert graphs.runner.layer_graphs is not None and eager.runner.layer_graphs is None
    assert graphs.runner.layer_graphs.buckets == [16, 32, 64, 128]
    for plan in mixed_plans(eager.config.block_size):
        want, got = run_step(eager, plan), run_step(graphs, plan)
        assert want.shape == got.shape and want.numel()
        torch.testing.assert_close(got, want, atol=0.1, rtol=0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    scratch = graphs.runner.scratch_slot
    for want, got in zip(eager.runner.kv_caches, graphs.runner.kv_caches, strict=True):
        torch.testing.assert_close(got[:, :scratch].float(), want[:, :scratch].float(), atol=0.02, rtol=0.02)
