"""`mnemosyne profile` on CPU with a tiny model: the tables come from real forwards, load back into
the step-time model, and --check reports errors on held-out batches. Accuracy targets are for the
GPU; here the timings are only required to be there and positive."""

from __future__ import annotations

import json

from mnemosyne.bench.profile import QUICK_GRID, held_out_batches, recheck
from mnemosyne.cli import main
from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.scheduler.latency_model import DEVICES, LatencyModel, Profile, Profiled


def test_quick_cpu_profile_and_check(tmp_path, capsys):
    path = tmp_path / "profile.json"
    assert main(["profile", "dummy:tiny", "--device", "cpu", "--quick", "-o", str(path), "--check"]) == 0
    profile = Profile.load(path)
    assert profile.model == "dummy:tiny" and profile.tp == 1
    assert all(t > 0 for t in profile.linear_s)
    assert len(profile.chunk_s) == len(profile.chunk_num_new)
    assert all(len(row) == len(profile.chunk_num_prefix) for row in profile.chunk_s)
    for table in (profile.decode_step_s, profile.skewed_step_s, profile.uneven_step_s, profile.uneven_attention_s):
        assert len(table) == len(profile.decode_num_decodes)
    report = json.loads(path.read_text())["check"]
    assert report["all"]["num_batches"] == QUICK_GRID.num_check
    # the feedback's prior: measured / predicted of the checked batches that held a prefill chunk
    assert profile.check_ratios == tuple(b["measured_s"] / b["predicted_s"] for b in report["batches"]
                                         if b["kind"] != "decode")
    assert len(profile.check_ratios) == 2 * QUICK_GRID.num_check // 3
    assert "median" in capsys.readouterr().out
    model = LatencyModel(Profiled(profile), PRESETS["tiny"], DEVICES["cpu"])
    assert model.step_time_s([(1, 100), (64, 500)]) > 0
    # checking an existing profile needs no -o
    assert main(["profile", "dummy:tiny", "--device", "cpu", "--quick", "--check",
                 "--latency-profile", str(path)]) == 0
    # the saved check, predicted again by the same model: the same predictions and errors
    checked = LatencyModel(Profiled(profile), PRESETS["tiny"], DEVICES["cpu"])
    again = recheck(profile, report["batches"], checked, num_check=QUICK_GRID.num_check)
    assert [r["predicted_s"] for r in again["batches"]] == [r["predicted_s"] for r in report["batches"]]
    assert again["all"] == report["all"]


def test_held_out_batches_stay_inside_the_measured_ranges():
    for kind, shapes in held_out_batches(QUICK_GRID):
        assert shapes and kind in ("decode", "chunks", "mixed")
        assert sum(n for n, _ in shapes) <= QUICK_GRID.linear_num_tokens[-1]
        assert all(p <= QUICK_GRID.chunk_num_prefix[-1] for n, p in shapes if n > 1)
        assert sum(p for n, p in shapes if n == 1) <= QUICK_GRID.decode_prefix_tokens[-1]
        assert (kind == "decode") == all(n == 1 for n, _ in shapes)


def test_step_timer_frees_requests_the_engine_left_on_the_worker():
    """The GPU warm-up prompt's request stays on the worker until the next scheduled plan frees it,
    which the profile never sends: its block-table row is one the largest timed batch needs."""
    from mnemosyne.bench.profile import StepTimer
    from mnemosyne.config import EngineConfig
    from mnemosyne.engine.llm_engine import LLMEngine
    from mnemosyne.request import SamplingParams

    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", max_num_seqs=4, max_model_len=256))
    try:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        runner = engine.executor.worker.runner
        assert len(runner.requests) == 1  # finished, its release waiting for a plan
        timer = StepTimer(engine.executor, engine.config.block_size, repeats=1)
        assert timer.time_s([(1, 8)] * 4) > 0  # every row of max_num_seqs
        assert len(runner.requests) == 4
    finally:
        engine.shutdown()
