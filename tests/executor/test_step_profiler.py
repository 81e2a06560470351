"""The worker's opt-in profiling window (MNEMOSYNE_TORCH_PROFILE), on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from mnemosyne.executor.step_profiler import StepProfiler
from mnemosyne.plan import ScheduledChunk, StepPlan


def test_the_window_covers_the_chosen_steps_only(tmp_path):
    profiler = StepProfiler(3, torch.device("cpu"), f"{tmp_path}:2:3")
    marks = []
    for _ in range(8):
        profiler.before_step()
        torch.ones(64, 64).matmul(torch.ones(64, 64))
        marks.append(profiler._profiler is not None)
        profiler.after_step()
    assert marks == [False, False, True, True, True, False, False, False]
    text = (tmp_path / "rank3.txt").read_text()
    assert text.startswith("3 steps: wall ") and "aten::matmul" in text
    assert not (tmp_path / "rank3.json").exists()  # the Chrome trace is opt-in


def test_trace_writes_a_chrome_trace(tmp_path):
    profiler = StepProfiler(1, torch.device("cpu"), f"{tmp_path}:0:1:trace")
    profiler.before_step()
    torch.ones(8, 8).sum()
    profiler.after_step()
    assert json.loads((tmp_path / "rank1.json").read_text())["traceEvents"]


def test_unset_means_off(monkeypatch, tmp_path):
    monkeypatch.delenv("MNEMOSYNE_TORCH_PROFILE", raising=False)
    profiler = StepProfiler(0, torch.device("cpu"))
    for _ in range(60):
        profiler.before_step()
        profiler.after_step()
    assert profiler.out_dir is None and not list(tmp_path.iterdir())


def test_a_window_past_the_last_step_is_written_when_the_worker_stops(tmp_path):
    profiler = StepProfiler(0, torch.device("cpu"), f"{tmp_path}:1:10")
    for _ in range(4):  # steps 0-3: the window (1-10) is still open
        profiler.before_step()
        torch.ones(32, 32).matmul(torch.ones(32, 32))
        profiler.after_step()
    assert not (tmp_path / "rank0.txt").exists()
    profiler.close()
    text = (tmp_path / "rank0.txt").read_text()
    assert text.startswith("3 steps (the window of 10 was cut short when the worker stopped): wall ")
    assert "aten::matmul" in text
    profiler.close()  # nothing left open: nothing more written
    assert [f.name for f in tmp_path.iterdir()] == ["rank0.txt"]


def _plan(step_id: int, start: int) -> StepPlan:
    return StepPlan(step_id, (), (ScheduledChunk("r", start, 16, (), ()),), ())


def test_at_n_opens_the_window_at_the_first_chunk_that_starts_that_far_in(tmp_path):
    profiler = StepProfiler(0, torch.device("cpu"), f"{tmp_path}:@1000:2")
    marks = []
    for i, start in enumerate([0, 500, 999, 1000, 10, 2000, 3000]):
        profiler.before_step(_plan(i, start))
        torch.ones(16, 16).sum()
        marks.append(profiler._profiler is not None)
        profiler.after_step()
    assert marks == [False, False, False, True, True, False, False]  # steps 3 and 4, then closed for good
    assert (tmp_path / "rank0.txt").read_text().startswith("2 steps: wall ")


def test_unknown_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        StepProfiler(0, torch.device("cpu"), f"{tmp_path}:0:1:trace:cpu")
    # `cuda` on a CPU worker profiles the host, as without it
    assert StepProfiler(0, torch.device("cpu"), f"{tmp_path}:0:1:cuda").device_only is False
