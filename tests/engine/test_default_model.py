"""End to end on the embedded default model: chat, stop strings, streaming deltas, seeded
sampling, logprobs and per-request metrics."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from mnemosyne import LLM, SamplingParams
from mnemosyne.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def test_chat_answers_paris_greedily(llm):
    [out] = llm.chat(QUESTION, SamplingParams(max_tokens=24))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # the model ended its turn with <|im_end|>
    assert out.outputs[0].token_ids[-1] in llm.engine.eos_token_ids


def test_stop_string_is_cut_from_the_text(llm):
    [out] = llm.chat(QUESTION, SamplingParams(max_tokens=24, stop=["Paris", "never-there"]))
    text = out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert "Paris" not in text and text.startswith("The capital of France is")


def _stream(engine: LLMEngine, prompt: str, params: SamplingParams) -> tuple[str, str]:
    engine.add_request(prompt, params)
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.outputs[0].new_text)
            final = out
    return "".join(pieces), final.outputs[0].text


def test_streamed_deltas_add_up_to_the_text_and_never_show_a_stop_string(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Count from one to ten in words."}])
    streamed, text = _stream(llm.engine, prompt, SamplingParams(max_tokens=40, stop=["5. 5"]))
    assert streamed == text and "4. 4" in streamed and "5. 5" not in streamed


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    prompt = llm.apply_chat_template([{"role": "user", "content": "Tell me a story."}])
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = llm.generate(prompt, params)[0].outputs[0].token_ids
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=99)
    batched = llm.generate([prompt, "Hello", prompt], [params, other, params])
    assert batched[0].outputs[0].token_ids == alone == batched[2].outputs[0].token_ids
    unseeded = llm.generate([prompt] * 2, SamplingParams(max_tokens=16, temperature=1.0))
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_logprobs_are_normalised_and_the_greedy_token_is_the_top_one(llm):
    [out] = llm.chat(QUESTION, SamplingParams(max_tokens=6, logprobs=3))
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids)
    for token, lp in zip(completion.token_ids, completion.logprobs, strict=True):
        assert lp.top_token_ids[0] == token and math.isclose(lp.top_logprobs[0], lp.logprob, abs_tol=1e-6)
        assert len(lp.top_token_ids) == 3 and list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        assert sum(math.exp(x) for x in lp.top_logprobs) <= 1.0 + 1e-5


def test_per_request_metrics(llm):
    [out] = llm.generate("The quick brown fox", SamplingParams(max_tokens=8, ignore_eos=True))
    m = out.metrics
    assert m.arrival_s <= m.first_scheduled_s <= m.first_token_s <= m.finished_s
    assert len(m.inter_token_s) == 7 and all(gap >= 0 for gap in m.inter_token_s)


def test_cli_generate_streams_an_answer():
    proc = subprocess.run([sys.executable, "-m", "mnemosyne", "generate", "--prompt", "What is the capital of France?",
                           "--max-tokens", "16", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_cli_reports_bad_flags_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "mnemosyne", "generate", "dummy:tiny", "--block-size", "0",
                           "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--block-size" in proc.stderr and "Traceback" not in proc.stderr
