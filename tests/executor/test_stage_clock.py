"""When a pipeline stage reports a micro-batch done: on a GPU without a trace, once its kernels are
queued and the previous micro-batch's have run, so the next plan arrives while the GPU still works."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.executor.worker_process import StageClock


def _queue_work(x: torch.Tensor) -> torch.cuda.Event:
    for _ in range(40):
        x = x @ x / x.shape[0] ** 0.5  # tens of ms of kernels, queued in a fraction of that
    return torch.cuda.current_stream().record_event()


def _idle_clock(is_timed: bool) -> tuple[torch.Tensor, StageClock]:
    """A matrix to multiply and a stage clock, with the GPU idle."""
    x = torch.randn(8192, 8192, device="cuda")
    clock = StageClock(torch.device("cuda"), is_timed=is_timed)
    torch.cuda.synchronize()
    return x, clock


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_a_stage_reports_once_queued_and_after_the_previous_micro_batch_ran():
    x, clock = _idle_clock(is_timed=False)
    first = _queue_work(x)
    clock.done_s()
    assert not first.query()  # reported while its kernels still run
    second = _queue_work(x)
    clock.done_s()
    assert first.query()  # the previous micro-batch has run
    assert not second.query()
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_with_a_trace_a_stage_reports_once_its_kernels_ran():
    x, clock = _idle_clock(is_timed=True)
    queued = _queue_work(x)
    clock.done_s()
    assert queued.query()
