"""The start-up prompt (`EngineConfig.warm_up`, GPU only): run here on the CPU by hand."""

from __future__ import annotations

from mnemosyne import LLM, SamplingParams


def test_the_warm_up_prompt_runs_to_the_end_and_its_steps_are_not_observed():
    # a budget so small that every step with a chunk is near it, so every such step is observed
    llm = LLM("dummy:tiny", device="cpu", max_model_len=4096, kv_cache_memory=0.05, tbt_slo_ms=1,
              max_num_batched_tokens=256, warm_up=True)  # on, but the engine runs it on GPUs only
    engine = llm.engine
    feedback = engine.scheduler.chunking.feedback
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda *a, **k: plans.append(schedule(*a, **k)) or plans[-1]
    engine._warm_up()
    engine.scheduler.schedule = schedule
    chunks = [c for plan in plans for c in plan.chunks]
    assert sum(c.num_new_tokens for c in chunks if c.num_new_tokens > 1) == 256  # the token cap's prefill
    assert [c.num_new_tokens for c in chunks][-1] == 1  # and one decode, eager under pipeline stages
    assert not engine.has_unfinished_requests() and not engine._tracked
    assert feedback.num_observed == 0  # the first steps' one-time costs set no budget
    out = llm.generate(list(range(5, 261)), SamplingParams(max_tokens=3))  # the same length, served
    assert len(out[0].outputs[0].token_ids) == 3
    assert feedback.num_observed > 0  # observed as before


def test_a_kv_cache_too_small_for_the_warm_up_prompt_skips_it():
    llm = LLM("dummy:tiny", device="cpu", max_model_len=4096, kv_cache_memory=0.0002, max_num_batched_tokens=4000)
    capacity = llm.engine.scheduler.pool.num_blocks * llm.engine.config.block_size
    assert capacity < 4000  # the prompt could never run
    llm.engine._warm_up()
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=2))
    assert len(out[0].outputs[0].token_ids) == 2
