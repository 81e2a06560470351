"""GPU specs, power profiles, and calibrating the roofline from a profile."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.planner.hardware import GPUS, PowerProfile, calibrate, gpu_named
from mnemosyne.scheduler.latency_model import Profile, Roofline

LLAMA_8B = PRESETS["llama-3-8b"]
PROFILE = Path(__file__).resolve().parents[2] / "benchmarks" / "profiles" / "h200-llama-3-8b.json"


def roofline_profile(device) -> Profile:
    """A profile whose tables are a roofline's: calibrating it must give that roofline's efficiencies."""
    r = Roofline(LLAMA_8B, device)
    news, prefixes = (32, 512, 2048, 8192), (0, 16384, 131072)
    decodes, contexts = (1, 16), (0, 131072, 524288)
    return Profile("dummy:llama-3-8b", device.name, "bfloat16", 1, (16, 4096), (0.01, 0.1), 0.0, news, prefixes,
                   tuple(tuple(r.chunk_attention_s(n, p) for p in prefixes) for n in news), decodes, contexts,
                   tuple(tuple(r.decode_attention_s(d, d * c, c) for c in contexts) for d in decodes),
                   tuple(tuple(r.decode_step_s(d, d * c, c) for c in contexts) for d in decodes))


def test_calibration_recovers_a_rooflines_efficiencies():
    device = replace(GPUS["h200"].device, flops_efficiency=0.6, bandwidth_efficiency=0.7, step_overhead_s=2e-3)
    cal = calibrate(roofline_profile(device), LLAMA_8B, GPUS["h200"].device)
    assert cal.flops_efficiency == pytest.approx(0.6, rel=1e-3)
    assert cal.bandwidth_efficiency == pytest.approx(0.7, rel=1e-3)
    assert cal.step_overhead_s == pytest.approx(2e-3, rel=1e-2)
    h100 = cal.apply(GPUS["h100"].device)
    assert (h100.flops_efficiency, h100.hbm_bytes_per_s) == (cal.flops_efficiency, GPUS["h100"].device.hbm_bytes_per_s)


def test_the_measured_h200_profile_calibrates_to_plausible_efficiencies():
    cal = calibrate(Profile.load(PROFILE), LLAMA_8B, GPUS["h200"].device)
    assert 0.5 < cal.flops_efficiency < 1 and 0.5 < cal.bandwidth_efficiency < 1
    assert 0 < cal.step_overhead_s < 5e-3


def test_gpu_names_and_power_profiles(tmp_path):
    assert gpu_named("H100-SXM") is GPUS["h100"]
    with pytest.raises(ValueError, match="--gpu"):
        gpu_named("mi300")
    path = tmp_path / "power.json"
    path.write_text(json.dumps({"idle_w": 80, "prefill_w": 690, "decode_w": 450}))
    power = PowerProfile.load(path)
    assert (power.idle_w, power.prefill_w, power.decode_w, power.source) == (80, 690, 450, str(path))
    path.write_text(json.dumps({"idle_w": 800, "prefill_w": 690, "decode_w": 450}))
    with pytest.raises(ValueError, match="idle_w"):
        PowerProfile.load(path)
    path.write_text(json.dumps({"idle_w": 80}))
    with pytest.raises(ValueError, match="not a power profile"):
        PowerProfile.load(path)
