"""One device's worker: resolve device and dtype, build this rank's model shard, load weights,
size and allocate the KV cache, and run steps through the model runner."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mnemosyne.attention.backend import select_backend
from mnemosyne.attention.kvp import KvpAttention
from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.distributed.comm import SINGLE, Group
from mnemosyne.executor.compile_watch import CompileWatch
from mnemosyne.executor.step_profiler import StepProfiler
from mnemosyne.models.llama import LlamaForCausalLM
from mnemosyne.models.loaders import ModelLoader, expected_weight_shapes
from mnemosyne.plan import WARM_UP_REQUEST_ID, StepPlan, StepResult
from mnemosyne.runner.block_tables import BlockTables
from mnemosyne.runner.model_runner import ModelRunner, PendingStep
from mnemosyne.runner.stage_link import StageLink

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_KV_CAP_BYTES = 4 << 30


@dataclass(frozen=True)
class RuntimeInfo:
    """What a worker found at start-up; the engine sizes the scheduler from it."""

    device: str
    dtype: str
    num_kv_blocks: int
    kv_bytes_per_token: int
    weight_bytes: int = 0
    """This worker's model shard, for memory reports."""
    kv_cache_bytes: int = 0
    """This worker's KV-cache allocation, scratch page included."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created directly in the target dtype, so an 8B model never exists in fp32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Worker:
    """Builds this rank's shard of the model and its KV cache. `world_group` is the group over which
    the KV block count must agree (every rank takes the minimum, so no rank is over-committed);
    `pp_group` links this pipeline stage to its neighbours; `kvp_group` joins this rank to its peers in
    the other KV-parallel replicas, over which partial attention is merged."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, loader: ModelLoader,
                 tp_group: Group = SINGLE, layer_range: tuple[int, int] | None = None,
                 device: torch.device | None = None, world_group: Group = SINGLE, pp_group: Group = SINGLE,
                 kvp_group: Group = SINGLE):
        self.config = config
        self.device = device or resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.compile_watch = CompileWatch().install() if self.device.type == "cuda" else None
        """Triton compiles after start-up (armed by the first step of a served request), logged as the
        stalls they are."""
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = LlamaForCausalLM(model_config, tp_group, layer_range, config.tp_reduce_float32,
                                          config.triton_gemv, config.fused_swiglu)
        names = stage_weight_names(model_config, self.model)
        weights = loader.iter_weights(self.device, self.dtype, frozenset(names), lazy=True)
        self._profiler = StepProfiler(world_group.rank, self.device)
        """Off unless MNEMOSYNE_TORCH_PROFILE names a window of steps to profile."""
        show = world_group.rank == 0 and not os.environ.get("MNEMOSYNE_QUIET")
        self.model.load_weights(tqdm(weights, desc="loading weights", unit="tensor", leave=False,
                                     disable=not show, total=len(names)))
        self.model.eval()
        attn = self.model.layers[0].self_attn
        self.kv_bytes_per_token = (2 * len(self.model.layers) * attn.num_kv_heads * attn.head_dim
                                   * self.dtype.itemsize)
        local_blocks = torch.tensor([self._num_kv_blocks(world_group.size)], device=self.device)
        num_blocks = int(world_group.all_reduce(local_blocks, op="min").item())
        num_slots = num_blocks * config.block_size
        # One page past the scheduler's blocks is scratch: CUDA-graph padding rows write there.
        kv = torch.zeros(len(self.model.layers), 2, num_slots + config.block_size, attn.num_kv_heads,
                         attn.head_dim, dtype=self.dtype, device=self.device)
        max_len = min(config.max_model_len or model_config.max_position_embeddings, num_slots)
        # The last row stays empty: CUDA-graph padding rows read it.
        tables = BlockTables(config.max_num_seqs + 1, -(-max_len // config.block_size) + 1, config.block_size,
                             self.device, reserved_rows=1)
        if os.environ.get("MNEMOSYNE_RANDOM_KV_SEED"):  # benchmarks only: long-context decode without a prefill
            kv.normal_(generator=torch.Generator(self.device).manual_seed(int(os.environ["MNEMOSYNE_RANDOM_KV_SEED"])))
        if config.uses_cudnn_ragged:  # read once, at the process's first cuDNN attention call
            os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] = "1"
        backend = select_backend(config.attention_backend, self.device, self.dtype, config.chunk_rows_to_triton,
                                 config.uses_cudnn_ragged)
        if hasattr(backend, "warm_up"):
            # every cuDNN plan a long prompt's chunks can need, before any request
            backend.warm_up(kv[0, 0], kv[0, 1], attn.num_heads, config.block_size, attn.scale,
                            cudnn_plans=(config.long_prompt_chunks, max_len))
        if kvp_group.size > 1:
            backend = KvpAttention(backend, kvp_group)
            backend.warm_up_merge(attn.num_heads, attn.head_dim, self.dtype, self.device)
        link = StageLink(pp_group, tp_group, model_config.hidden_size, self.dtype, self.device,
                         config.pp_scatter_gather, is_timed=config.trace_file is not None)
        self.runner = ModelRunner(self.model, list(kv.unbind(0)), tables, backend, self.device, link,
                                  kvp_rank=kvp_group.rank, blocks_per_group=num_blocks, scratch_slot=num_slots,
                                  kvp_group=kvp_group,
                                  shares_samples=config.async_scheduling and pp_group.size == 1)
        # The graphs capture the whole model, embedding to logits: one pipeline stage runs eagerly.
        if getattr(backend, "supports_cuda_graphs", False) and not config.enforce_eager and pp_group.size == 1:
            from mnemosyne.runner.cuda_graphs import DecodeGraphs  # imports Triton

            self.runner.graphs = DecodeGraphs(
                self.model, self.runner.kv_caches, tables.ids, null_row=config.max_num_seqs,
                scratch_slot=num_slots, page_size=config.block_size, backend=backend,
                max_batch=config.max_num_seqs, max_seq_len=max_len, device=self.device, kvp_size=kvp_group.size)
            graph_tokens = config.layer_graph_limit
            if graph_tokens and tp_group.size == 1:
                from mnemosyne.runner.layer_graphs import LayerGraphs

                self.runner.layer_graphs = LayerGraphs(self.model, self.runner.kv_caches, graph_tokens, num_slots,
                                                       self.device, show_progress=show)
        self.info = RuntimeInfo(str(self.device), str(self.dtype).removeprefix("torch."), num_blocks,
                                self.kv_bytes_per_token,
                                weight_bytes=sum(t.nbytes for t in self.model.state_dict().values()),
                                kv_cache_bytes=kv.nbytes)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, config.block_size,
                    num_slots * self.kv_bytes_per_token / 2**30)

    def _num_kv_blocks(self, num_host_sharers: int = 1) -> int:
        block_bytes = self.kv_bytes_per_token * self.config.block_size
        if self.config.kv_cache_memory is not None:
            budget = self.config.kv_cache_memory * 2**30
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_memory_fraction
        else:  # CPU workers of one run share the host's memory
            budget = min(_CPU_KV_CAP_BYTES, _available_host_bytes() * 0.25) / num_host_sharers
        return int(budget // block_bytes)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    def close(self) -> None:
        """The worker is stopping: write a profiling window still open."""
        self._profiler.close()

    def launch(self, plan: StepPlan) -> PendingStep:
        """Queue the plan's work on the device; the result comes from the returned step."""
        watch = self.compile_watch
        if watch is not None and not watch.armed and any(c.request_id != WARM_UP_REQUEST_ID for c in plan.chunks):
            watch.arm()  # start-up is over: the worker's warm-up, its graphs and the engine's start-up prompt
        self._profiler.before_step(plan)
        step = self.runner.launch(plan)
        self._profiler.after_step()
        return step


def stage_weight_names(config: ModelConfig, model: LlamaForCausalLM) -> list[str]:
    """The checkpoint tensors this pipeline stage holds, so a rank never reads another stage's layers."""
    names = []
    for name in expected_weight_shapes(config):
        if name.startswith("model.layers."):
            keep = model.layer_start <= int(name.split(".")[2]) < model.layer_end
        elif name == "model.embed_tokens.weight":  # tied: the last stage's LM head reads it too
            keep = model.is_first_pp_stage or (model.is_last_pp_stage and config.tie_word_embeddings)
        else:  # final norm and untied LM head
            keep = model.is_last_pp_stage
        if keep:
            names.append(name)
    return names


def _available_host_bytes() -> int:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30
