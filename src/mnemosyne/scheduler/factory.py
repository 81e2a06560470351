"""Builds the scheduler an EngineConfig asks for: step-time model, policy, chunking, KVP boundaries.
The engine and the simulator both build theirs here, so they run the same scheduler."""

from __future__ import annotations

import time
from collections.abc import Callable

from mnemosyne.config import EngineConfig, ModelConfig
from mnemosyne.kv.kvp_placement import KvpPlacement
from mnemosyne.scheduler.chunking import make_chunking
from mnemosyne.scheduler.latency_model import LatencyModel, Layout, build_latency_model, detect_device
from mnemosyne.scheduler.policy import Deadlines, PolicyContext, make_policy
from mnemosyne.scheduler.scheduler import GroupBoundary, Scheduler, SchedulerLimits


def layout_of(config: EngineConfig) -> Layout:
    return Layout(config.tensor_parallel_size, config.pipeline_parallel_size, config.kv_parallel_size,
                  config.kvp_group_max_tokens)


def latency_model_for(config: EngineConfig, model: ModelConfig, device: str) -> LatencyModel:
    """The config's profile, or a roofline of --roofline-device (auto: found from `device`, e.g. cuda:0)."""
    roofline = detect_device(device) if config.roofline_device == "auto" else config.roofline_device
    return build_latency_model(model, layout_of(config), roofline, config.latency_profile)


def kvp_group_boundary(group_max_tokens: int) -> GroupBoundary:
    """Boundaries every group_max_tokens tokens: a chunk ends where the next KVP group starts."""

    def boundary(start: int) -> int:
        return (start // group_max_tokens + 1) * group_max_tokens

    return boundary


def build_scheduler(config: EngineConfig, model: ModelConfig, num_kv_blocks: int, max_model_len: int,
                    latency: LatencyModel, clock: Callable[[], float] = time.monotonic) -> Scheduler:
    ttft_slo_s = None if config.ttft_slo_ms is None else config.ttft_slo_ms / 1e3
    tbt_slo_s = None if config.tbt_slo_ms is None else config.tbt_slo_ms / 1e3
    deadlines = Deadlines(latency.prefill_work_s, ttft_slo_s, config.deadline_work_factor)
    policy = make_policy(config.scheduler, PolicyContext(deadlines, config.rho_max))
    chunking = make_chunking(config.chunking, latency, tbt_slo_s, config.max_num_batched_tokens, config.spp_stages,
                             slo_quantile=config.tbt_slo_quantile, live_yield=config.live_yield)
    placement = KvpPlacement(config.kv_parallel_size, num_kv_blocks, config.block_size, config.kvp_group_max_tokens,
                             config.enable_prefix_caching)
    boundary = kvp_group_boundary(placement.group_max_tokens) if placement.num_groups > 1 else None
    limits = SchedulerLimits(config.max_num_batched_tokens, config.max_num_seqs, max_model_len)
    return Scheduler(limits, placement, policy, clock, chunking, boundary)
