"""The GPUs the planner knows: compute rates (the step-time model's `DeviceSpec`), power draw for
J/token, and a calibration of the roofline's efficiencies from a profile measured on a real device."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path

from mnemosyne.config import ModelConfig
from mnemosyne.scheduler.latency_model import DEVICES, DeviceSpec, Profile


@dataclass(frozen=True)
class PowerProfile:
    """Board power of one GPU in three states, in watts. Nominal figures unless loaded from a file of
    NVML measurements (`--power-profile`)."""

    idle_w: float
    """Nothing to run: pipeline fill and drain, KVP groups not onboarded yet."""
    prefill_w: float
    """Compute-bound work: prefill chunks."""
    decode_w: float
    """Bandwidth-bound work: decode steps."""
    source: str = "nominal"
    """Where the figures come from."""

    @classmethod
    def load(cls, path: str | Path) -> PowerProfile:
        """A JSON object with idle_w, prefill_w and decode_w (and an optional source)."""
        try:
            raw = json.loads(Path(path).read_text())
            known = {f.name for f in fields(cls)}
            profile = cls(**{"source": str(path), **{k: v for k, v in raw.items() if k in known}})
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--power-profile {str(path)!r} is not a power profile: {e}") from e
        if not 0 <= profile.idle_w <= min(profile.prefill_w, profile.decode_w):
            raise ValueError(f"--power-profile {str(path)!r}: need 0 <= idle_w <= prefill_w, decode_w")
        return profile


@dataclass(frozen=True)
class Gpu:
    """One GPU type: what the step-time model needs, plus what the planner adds."""

    key: str
    """The DEVICES key, e.g. h100."""
    device: DeviceSpec
    power: PowerProfile
    eager_layer_s: float
    """Launch overhead per layer of a decode step run eagerly instead of from a CUDA graph (pipeline
    stages and multi-group KVP steps are not captured)."""
    stage_dispatch_s: float = 0.3e-3
    """Host time between two micro-batches on a pipeline stage: stage 0 waits one control-plane round
    trip for the next plan (about 0.3 ms, docs/pipeline.md). The step's other fixed costs are taken to
    be kernel launches, which split across stages with the layers."""


# Power: both boards are 700 W parts. Compute-bound prefill runs close to the cap, a bandwidth-bound
# decode well below it; idle is an HGX board in persistence mode. Assumptions until NVML measures them.
_SXM_POWER = PowerProfile(idle_w=75.0, prefill_w=650.0, decode_w=420.0)
# The H200 profile's eager linear path at 16 tokens (6.58 ms) against its CUDA-graph decode step at no
# context (4.85 ms): 1.7 ms over 32 layers.
_EAGER_LAYER_S = 54e-6

GPUS: dict[str, Gpu] = {
    "h100": Gpu("h100", DEVICES["h100"], _SXM_POWER, _EAGER_LAYER_S),
    "h200": Gpu("h200", DEVICES["h200"], _SXM_POWER, _EAGER_LAYER_S),
}


def gpu_named(name: str) -> Gpu:
    key = name.lower().removesuffix("-sxm")
    if key not in GPUS:
        raise ValueError(f"--gpu must be one of {sorted(GPUS)}, got {name!r}")
    return GPUS[key]


@dataclass(frozen=True)
class Calibration:
    """Roofline efficiencies fitted to a measured profile, and where they came from."""

    flops_efficiency: float
    bandwidth_efficiency: float
    step_overhead_s: float
    source: str

    def apply(self, device: DeviceSpec) -> DeviceSpec:
        """The device with these efficiencies: its nominal rates stay, so a profile measured on one GPU
        calibrates another of the same architecture (an H200 profile for an H100)."""
        return replace(device, flops_efficiency=self.flops_efficiency,
                       bandwidth_efficiency=self.bandwidth_efficiency, step_overhead_s=self.step_overhead_s)


_MIN_CALIBRATION_CHUNK = 2048
_MIN_CALIBRATION_PREFIX = 16384


def calibrate(profile: Profile, model: ModelConfig, device: DeviceSpec, source: str = "") -> Calibration:
    """Efficiencies the profile's measurements imply for `device`'s nominal rates (the device the
    profile was measured on). Long-context work decides them:
    - FLOP efficiency: the median rate of chunk attention with chunks of at least 2048 tokens over at
      least 16K of prefix, where attention is compute-bound (that is most of a long prefill);
    - bandwidth efficiency: the growth of a one-request decode step from the shortest context measured
      to the longest, over the KV it adds;
    - step overhead: that step at the shortest context, less its weight and KV read.
    `model` must be the profiled model's shape."""
    if profile.tp != 1:
        raise ValueError(f"--calibrate needs a profile taken at tp=1, got tp={profile.tp}")
    b = device.dtype_bytes
    pair_flops = 4.0 * model.num_layers * model.num_heads * model.head_dim
    rates = [pair_flops * n * (prefix + (n + 1) / 2) / t
             for n, row in zip(profile.chunk_num_new, profile.chunk_s, strict=True)
             for prefix, t in zip(profile.chunk_num_prefix, row, strict=True)
             if n >= _MIN_CALIBRATION_CHUNK and prefix >= _MIN_CALIBRATION_PREFIX and t > 0]
    if not rates:
        raise ValueError("--calibrate: the profile has no chunks of >= 2048 tokens over >= 16K of prefix")
    weight_bytes = (model.num_params_non_embedding + model.vocab_size * model.hidden_size) * b
    kv_bytes_per_token = 2.0 * model.num_layers * model.num_kv_heads * model.head_dim * b
    one = profile.decode_num_decodes.index(1) if 1 in profile.decode_num_decodes else 0
    steps, contexts = profile.decode_step_s[one], profile.decode_prefix_tokens
    # Two points of a one-request decode step: its slope is the KV read, its intercept the weights' read
    # plus the fixed overhead.
    bandwidth = kv_bytes_per_token * (contexts[-1] - contexts[0]) / (steps[-1] - steps[0])
    overhead_s = max(0.0, steps[0] - (weight_bytes + kv_bytes_per_token * contexts[0]) / bandwidth)
    return Calibration(statistics.median(rates) / device.peak_flops, bandwidth / device.hbm_bytes_per_s, overhead_s,
                       source or f"{profile.model} on {profile.device_name}")
