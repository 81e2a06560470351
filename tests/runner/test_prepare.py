"""The runner's step inputs, packed on the host and copied to the device at once, are the tensors the
device-side construction gave (block-table lookups per token, one copy per list): on real scheduler
plans with preemption and recycled blocks, and under KVP with multi-group chunks and full earlier
shards, on every group."""

from __future__ import annotations

from array import array

import pytest
import torch

from mnemosyne.kv.block_pool import BlockPool
from mnemosyne.plan import StepPlan
from mnemosyne.request import Request, SamplingParams
from mnemosyne.runner.block_tables import BlockTables
from mnemosyne.runner.kvp_section import plan_section
from mnemosyne.runner.model_runner import ModelRunner, StepInputs
from mnemosyne.scheduler.policy import FCFS
from mnemosyne.scheduler.scheduler import Scheduler, SchedulerLimits
from tests.kv.test_kvp_placement import BLOCK, kvp_scheduler
from tests.scheduler.factories import FakeClock, land

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def runner_for(device: str, kvp_rank: int = 0, blocks_per_group: int = 1 << 62) -> ModelRunner:
    tables = BlockTables(17, 64, BLOCK, torch.device(device), reserved_rows=1)
    return ModelRunner(None, [], tables, None, torch.device(device), kvp_rank=kvp_rank,  # type: ignore[arg-type]
                       blocks_per_group=blocks_per_group, scratch_slot=999_999)


def reference_inputs(runner: ModelRunner, plan: StepPlan) -> dict[str, torch.Tensor]:
    """The inputs as the runner used to build them: each list copied on its own, slots looked up in
    the device block table."""
    device = runner.device
    rows, _ = plan_section(plan.chunks, runner.requests, runner.kvp_rank)
    tokens, positions, shard_positions, table_rows, writes, host_rows = [], [], [], [], [], []
    local_rows, gather_rows, start = [], [], 0
    for r in rows:
        chunk, num_new = r.chunk, r.chunk.num_new_tokens
        end = chunk.start + num_new
        tokens += runner.requests[chunk.request_id].token_ids[chunk.start:end].tolist()
        positions += range(chunk.start, end)
        shard_positions += range(chunk.start - r.shard_start, end - r.shard_start) if r.is_writer else [0] * num_new
        writes += [r.is_writer] * num_new
        table_rows += [runner.block_tables.row[chunk.request_id]] * num_new
        host_rows.append(runner.block_tables.row[chunk.request_id])
        if r.gather_start >= 0:
            local_rows += range(start, start + num_new)
            gather_rows += range(r.gather_start, r.gather_start + num_new)
        start += num_new
    shard = torch.tensor(shard_positions, dtype=torch.int64, device=device)
    pages = runner.block_tables.ids[torch.tensor(table_rows, dtype=torch.int64, device=device),
                                    shard // runner.page_size].long()
    slots = torch.where(torch.tensor(writes, dtype=torch.bool, device=device),
                        pages * runner.page_size + shard % runner.page_size, runner.scratch_slot)
    return {"token_ids": torch.tensor(tokens, dtype=torch.int64), "positions": torch.tensor(positions, dtype=torch.int64),
            "slot_mapping": slots, "rows": torch.tensor(host_rows, dtype=torch.int32),
            "seq_lens_tensor": torch.tensor([r.seq_len for r in rows], dtype=torch.int32),
            "local_rows": torch.tensor(local_rows, dtype=torch.int64),
            "gather_rows": torch.tensor(gather_rows, dtype=torch.int64)}


def assert_same_inputs(inputs: StepInputs, expected: dict[str, torch.Tensor], device: str) -> None:
    meta = inputs.meta
    got = {"token_ids": inputs.token_ids, "positions": inputs.positions, "slot_mapping": meta.slot_mapping,
           "rows": meta.rows, "seq_lens_tensor": meta.seq_lens_tensor}
    if meta.kvp is not None:
        got |= {"local_rows": meta.kvp.local_rows, "gather_rows": meta.kvp.gather_rows}
    else:
        assert len(expected["local_rows"]) == 0
    for name, tensor in got.items():
        assert tensor.device.type == device, name
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor.cpu(), expected[name].cpu()), name
        if device == "cuda":
            assert tensor.data_ptr() % 16 == 0, name  # Triton kernels specialise on aligned pointers
    assert meta.host_rows == tuple(expected["rows"].tolist())
    assert meta.seq_lens == tuple(expected["seq_lens_tensor"].tolist())


def drive(scheduler: Scheduler, runners: list[ModelRunner], device: str) -> int:
    """Run the scheduler to the end, every runner applying each plan and preparing its inputs, each
    compared with the reference; returns the number of non-empty sections compared."""
    num_compared = 0
    for _ in range(1000):
        if not scheduler.has_unfinished:
            return num_compared
        plan = scheduler.schedule()
        for runner in runners:
            runner.apply_plan(plan)
            inputs = runner.prepare(plan)
            assert_same_inputs(inputs, reference_inputs(runner, plan), device)
            num_compared += inputs.meta.num_requests > 0
        land(scheduler, plan)
    raise AssertionError("the scheduler did not finish")


def add(scheduler: Scheduler, request_id: str, prompt_len: int, max_tokens: int) -> None:
    prompt = [3 + (sum(map(ord, request_id)) + 7 * i) % 500 for i in range(prompt_len)]
    scheduler.add_request(Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                  arrival_s=0.0), seed=0)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_with_preemption_and_recycled_blocks(device):
    # 12 blocks for five requests that need up to 6 each: later arrivals are preempted and recomputed,
    # and freed blocks come back in another order, so page ids are not contiguous.
    scheduler = Scheduler(SchedulerLimits(24, 8, 1024), BlockPool(12, BLOCK), FCFS(), FakeClock())
    for i, prompt_len in enumerate((40, 7, 70, 1, 23)):
        add(scheduler, f"r{i}", prompt_len, max_tokens=20)
    assert drive(scheduler, [runner_for(device)], device) > 30
    assert scheduler.num_preemptions > 0


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_of_every_kvp_group(device):
    scheduler = kvp_scheduler(num_groups=3, blocks_per_group=16, budget=40)
    for request_id, prompt_len in (("long", 150), ("short", 9), ("longer", 170), ("one", 1)):
        add(scheduler, request_id, prompt_len, max_tokens=12)
    runners = [runner_for(device, group, scheduler.pool.blocks_per_group) for group in range(3)]
    assert drive(scheduler, runners, device) > 50


def test_slots_of_a_token_range_follow_the_pages():
    tables = BlockTables(3, 8, 4, torch.device("cpu"))
    tables.add("a")
    tables.append("a", (5, 6))
    tables.append("a", (2,))
    assert tables.slots("a", 3, 9) == array("q", [23, 24, 25, 26, 27, 8])
    assert tables.slots("a", 11, 12) == array("q", [11])
    assert tables.slots("a", 4, 4) == array("q")
