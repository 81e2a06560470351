"""The step-time model's online correction: a device whose steps run longer than predicted gets
smaller chunks, so that the measured steps, not the predicted ones, fit the TBT budget."""

from __future__ import annotations

import pytest

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.models.loaders.dummy import PRESETS
from mnemosyne.request import SamplingParams
from mnemosyne.scheduler.chunking import AdaptiveChunking
from mnemosyne.scheduler.factory import build_scheduler
from mnemosyne.scheduler.feedback import BOUNDS, MIN_STEPS, NEAR_BUDGET, StepTimeFeedback, judged_ratio
from mnemosyne.scheduler.latency_model import DEVICES, LatencyModel, Profile, Profiled
from tests.scheduler.factories import add, land, make_scheduler, shapes, synthetic_model

BUDGET_S = 0.05


def test_the_factor_is_a_high_quantile_of_recent_ratios_and_ignores_a_rare_stall():
    feedback = StepTimeFeedback(window=100, quantile=0.95, min_steps=MIN_STEPS)
    for _ in range(MIN_STEPS - 1):
        feedback.observe(0.05, 0.10)
    assert feedback.factor == 1.0  # too few steps yet
    feedback.observe(0.05, 0.10)
    assert feedback.factor == 2.0
    for i in range(100):  # the window forgets the slow steps; two stalls among 100 move nothing
        feedback.observe(0.05, 4.4 if i in (10, 60) else 0.06)
    assert abs(feedback.factor - 1.2) < 1e-9
    for _ in range(100):
        feedback.observe(0.05, 50.0)
    assert feedback.factor == BOUNDS[1]
    for _ in range(100):
        feedback.observe(0.05, 0.001)
    assert feedback.factor == BOUNDS[0]
    feedback.observe(0.0, 1.0)  # nothing predicted: no ratio
    assert feedback.num_observed == 100


def test_before_its_own_steps_the_factor_is_the_profile_checks():
    feedback = StepTimeFeedback(prior=[1.0] * 18 + [1.1, 1.3])  # rank 0.95 x 19 = 18: 1.1
    assert abs(feedback.factor - 1.1) < 1e-9
    for _ in range(MIN_STEPS - 1):
        feedback.observe(0.05, 0.06)
    assert abs(feedback.factor - 1.1) < 1e-9
    feedback.observe(0.05, 0.06)
    assert abs(feedback.factor - 1.2) < 1e-9
    assert StepTimeFeedback().factor == 1.0  # no profile check: the model as it is


def test_the_slo_quantile_reaches_the_factor():
    """--tbt-slo-quantile is the rank the factor is read at: at 0.99 of 20 ratios, the second largest."""
    ratios = [1.0] * 18 + [1.1, 1.3]
    assert abs(StepTimeFeedback(quantile=0.99, prior=ratios).factor - 1.1) < 1e-9  # rank 0.99 x 19 = 18
    assert abs(StepTimeFeedback(quantile=0.5, prior=ratios).factor - 1.0) < 1e-9
    config = EngineConfig(model="dummy:tiny", tbt_slo_ms=50, tbt_slo_quantile=0.99)
    scheduler = build_scheduler(config, PRESETS["tiny"], 1024, 4096, synthetic_model())
    assert scheduler.chunking.feedback.quantile == 0.99
    with pytest.raises(ValueError, match="--tbt-slo-quantile"):
        EngineConfig(model="dummy:tiny", tbt_slo_quantile=1.0)


def test_one_stall_among_the_first_steps_moves_nothing():
    feedback = StepTimeFeedback()
    for i in range(MIN_STEPS):
        feedback.observe(0.05, 2.0 if i == 3 else 0.055)
    assert abs(feedback.factor - 1.1) < 1e-9


def test_adaptive_chunking_starts_from_its_profiles_check(tmp_path):
    profile = Profile("dummy:tiny", "cpu", "float32", 1, (16, 1024), (0.001, 0.01), 0.0, (32, 1024), (0, 4096),
                      ((0.001, 0.002), (0.01, 0.02)), (1, 8), (0, 4096), ((0.001, 0.002), (0.002, 0.004)),
                      ((0.002, 0.003), (0.003, 0.005)))
    batches = [{"kind": kind, "measured_s": m, "predicted_s": 0.01}
               for kind, m in (("decode", 0.03), ("chunks", 0.011), ("mixed", 0.012), ("mixed", 0.01))]
    path = tmp_path / "p.json"
    profile.save(path, {"check": {"batches": batches}})
    loaded = Profile.load(path)
    assert loaded.check_ratios == pytest.approx((1.1, 1.2, 1.0))  # decode batches are left out
    model = LatencyModel(Profiled(loaded), PRESETS["tiny"], DEVICES["cpu"])
    chunking = AdaptiveChunking(model, BUDGET_S, 1 << 20)
    assert abs(chunking.feedback.factor - 1.1) < 1e-9  # rank 0.95 x 2 = 1 of (1.0, 1.1, 1.2)
    assert abs(chunking.new_step().budget_s - BUDGET_S / 1.1) < 1e-12


def run(chunking, model, slowdown: float, num_steps: int = 400, long_tokens: int = 30_000):
    """16 chats decoding, then a long prompt; every step 'measures' slowdown × its predicted time."""
    sched, clock = make_scheduler(chunking=chunking)
    for i in range(16):
        add(sched, f"chat{i}", 200, 0.0, max_tokens=600)
    plans = []
    for step in range(num_steps):
        if step == 2:
            add(sched, "long", long_tokens, clock.now_s, max_tokens=1)
        plan = sched.schedule()
        if not plan.chunks:
            break
        measured_s = slowdown * model.step_time_s(shapes(plan))
        clock.now_s += measured_s
        land(sched, plan)
        sched.observe_step(plan, measured_s)
        plans.append((plan, measured_s))
    return plans


def test_steps_that_run_long_get_smaller_chunks_until_measured_steps_fit_the_budget():
    model = synthetic_model()
    plans = run(AdaptiveChunking(model, BUDGET_S, 1 << 20), model, slowdown=1.5, long_tokens=60_000)
    mixed = [(p, s) for p, s in plans if any(c.num_new_tokens > 1 for c in p.chunks)
             and any(c.num_new_tokens == 1 for c in p.chunks)]
    assert len(mixed) > MIN_STEPS + 20
    # the chats' prefill was the first step observed: MIN_STEPS - 1 mixed steps are sized to the model
    # alone, and run over budget as measured; every one after is sized to the measured steps
    assert all(s > BUDGET_S * 1.2 for _, s in mixed[:MIN_STEPS - 1])
    assert all(s <= BUDGET_S * 1.0001 for _, s in mixed[MIN_STEPS - 1:])


def test_a_model_that_is_right_leaves_the_chunks_alone():
    model = synthetic_model()
    corrected = run(AdaptiveChunking(model, BUDGET_S, 1 << 20), model, slowdown=1.0)
    plain = []
    chunking = AdaptiveChunking(model, BUDGET_S, 1 << 20)
    sched, clock = make_scheduler(chunking=chunking)
    for i in range(16):
        add(sched, f"chat{i}", 200, 0.0, max_tokens=600)
    for step in range(len(corrected)):
        if step == 2:
            add(sched, "long", 30_000, clock.now_s, max_tokens=1)
        plan = sched.schedule()
        clock.now_s += model.step_time_s(shapes(plan))
        land(sched, plan)  # never observed
        plain.append(plan)
    assert [p.chunks for p, _ in corrected] == [p.chunks for p in plain]


def test_only_measured_steps_with_a_prefill_chunk_are_observed():
    model = synthetic_model()
    chunking = AdaptiveChunking(model, BUDGET_S, 1 << 20)
    sched, _ = make_scheduler(chunking=chunking)
    add(sched, "a", 100, 0.0, max_tokens=4)
    prefill = sched.schedule()
    land(sched, prefill)
    sched.observe_step(prefill, None)  # not measured (pipeline stages): nothing learnt
    decode = sched.schedule()
    land(sched, decode)
    sched.observe_step(decode, 0.5)  # decodes only: the chunking sized nothing
    assert chunking.feedback.num_observed == 0
    add(sched, "b", 100, 0.0, max_tokens=4)
    small = sched.schedule()  # predicted far under the budget: its ratio is host time, not the model's
    land(sched, small)
    sched.observe_step(small, 0.5)
    assert chunking.feedback.num_observed == 0
    add(sched, "c", 20_000, 0.0, max_tokens=4)
    full = sched.schedule()  # a chunk sized to the budget
    land(sched, full)
    sched.observe_step(full, 0.06)
    assert chunking.feedback.num_observed == 1


def test_the_engine_reports_its_steps_under_a_tbt_slo():
    # a budget the roofline fills with a 64-token chunk, so that every prefill step is observed
    engine = LLMEngine(EngineConfig(model="dummy:tiny", device="cpu", tbt_slo_ms=0.01, max_num_batched_tokens=64,
                                    kv_cache_memory=0.05))
    engine.add_request([5] * 300, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.chunking.feedback.num_observed >= 300 // 64


def test_the_factor_comes_down_once_the_steps_it_shrank_run_as_predicted():
    """Steps sized to the budget over the factor are the ones observed: after a slow spell the factor
    returns, instead of freezing where no step is predicted near the raw budget any more."""
    chunking = AdaptiveChunking(synthetic_model(), BUDGET_S, 1 << 20)
    for _ in range(MIN_STEPS):
        chunking.observe(BUDGET_S, BUDGET_S * 10)
    assert chunking.feedback.factor == BOUNDS[1]
    for _ in range(300):  # now sized to a quarter of the budget, and as long as predicted
        chunking.observe(BUDGET_S / BOUNDS[1], BUDGET_S / BOUNDS[1])
        if chunking.feedback.factor == 1.0:
            break
    assert chunking.feedback.factor == 1.0


def test_steps_far_over_their_prediction_are_warned_about_at_most_every_ten_seconds(caplog):
    now = [0.0]
    feedback = StepTimeFeedback(clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="mnemosyne.scheduler.feedback"):
        feedback.observe(0.04, 0.05)  # within bounds: silent
        assert not caplog.records
        feedback.observe(0.04, 0.40)
        feedback.observe(0.04, 0.50)  # within 10 s of the first warning: counted, not logged
        now[0] = 11.0
        feedback.observe(0.04, 0.30)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "40.0 ms took 400.0 ms (1 such" in messages[0] and "300.0 ms (2 such" in messages[1]


def test_fixed_time_on_small_steps_does_not_run_the_factor_to_its_bound():
    """Each step sized to the smallest that is still observed, and running a fixed 30% of the budget
    over its prediction (as a KVP gather or host time does): as plain ratios, 1 + 0.3 × budget / its
    prediction, which grows as the factor shrinks the chunks, up to BOUNDS[1] (call56's kvp=4 run).
    Judged against half the budget, the ratios approach f = 1 / f + 0.6 (1.34), from above and below
    in turn, and the factor, their high quantile, settles just over it."""
    chunking = AdaptiveChunking(synthetic_model(), BUDGET_S, 1 << 20)
    for _ in range(600):
        predicted_s = NEAR_BUDGET * BUDGET_S / chunking.feedback.factor
        chunking.observe(predicted_s, predicted_s + 0.3 * BUDGET_S)
    assert 1.3 < chunking.feedback.factor < 1.4


def test_a_small_step_that_runs_as_predicted_or_faster_is_judged_as_it_ran():
    assert judged_ratio(0.01, 0.01, 0.025) == 1.0
    assert judged_ratio(0.01, 0.008, 0.025) == pytest.approx(0.8)  # the model over-predicts: evidence kept
    assert judged_ratio(0.01, 0.03, 0.025) == pytest.approx(1.2)  # slow: by its excess over 25 ms
    assert judged_ratio(0.03, 0.06, 0.025) == 2.0  # near the budget: the plain ratio


def test_a_factor_of_two_or_more_is_warned_about_with_its_ratios_at_most_every_ten_seconds(caplog):
    now = [0.0]
    feedback = StepTimeFeedback(clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="mnemosyne.scheduler.feedback"):
        for _ in range(MIN_STEPS):
            feedback.observe(0.02, 0.03)  # 1.5: under the threshold
        assert feedback.factor == pytest.approx(1.5) and not caplog.records
        for _ in range(MIN_STEPS):
            feedback.observe(0.02, 0.05)  # 2.5
        assert feedback.factor == pytest.approx(2.5)
        now[0] = 9.0
        feedback.observe(0.02, 0.05)  # within 10 s of the warning: silent
        now[0] = 12.0
        feedback.observe(0.02, 0.05)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "correction is 2.50: steps are sized to 40% of the TBT budget" in messages[0]
    assert messages[0].endswith("2.50")
