"""The official openai client against the server: completions and chat, streaming and not, n, seeds,
usage and logprobs; plus prefill progress comments and client-disconnect aborts."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.server.harness import API_KEY, MODEL, SECRET, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from mnemosyne.models.loaders import resolve_model

    return resolve_model(MODEL).load_tokenizer()


def test_models(client: openai.OpenAI):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion_stream_matches_non_stream(client: openai.OpenAI, tokenizer):
    prompt = f"{SECRET}. The capital of France is"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == full.choices[0].text
    assert full.choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and not chunks[-1].choices
    num_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    for usage in (full.usage, chunks[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (num_prompt, 10, num_prompt + 10)


def test_chat_stream_matches_non_stream(client: openai.OpenAI, tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content and streamed
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    num_prompt = len(tokenizer.encode(text, add_special_tokens=False))
    assert full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == num_prompt
    assert full.usage.completion_tokens == chunks[-1].usage.completion_tokens <= 12
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]


def test_n_with_seed_is_reproducible(client: openai.OpenAI):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
                  temperature=1.0, n=2, seed=1234)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.usage.completion_tokens == second.usage.completion_tokens
    streamed = client.chat.completions.create(**kwargs, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in first.choices]


def test_stop_and_logprobs(client: openai.OpenAI):
    prompt = "Count: 1, 2, 3, 4,"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = base.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == base.usage.completion_tokens
    assert all(len(top) <= 2 and lp.token_logprobs[i] <= 0 for i, top in enumerate(lp.top_logprobs))
    assert "".join(lp.tokens).startswith(base.choices[0].text[:3])
    stop = base.choices[0].text.strip()[:2]
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode()) for t in content)


def test_prefill_progress_comments(server: Server, tokenizer):
    """A prompt prefilled over many steps streams `: prefill N/M` comments before its first token."""
    prompt = " ".join(f"item{i}" for i in range(160))
    num_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert 512 < num_prompt < 1024  # three 256-token chunks
    comments, data = [], []
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(": prefill"):
                comments.append(line)
            elif line.startswith("data:"):
                data.append(line)
    assert data[-1] == "data: [DONE]"
    assert comments, "no prefill progress during a multi-step prefill"
    done, total = map(int, comments[-1].removeprefix(": prefill ").split("/"))
    assert total == num_prompt and 0 <= done < total


def _wait_idle(server: Server, timeout_s: float = 30) -> float:
    """Seconds until the engine runs nothing and the KV cache is empty."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        m = server.metrics()
        if m["mnemosyne_kv_cache_usage_ratio"] == 0 and m["mnemosyne_num_requests_running"] == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"KV cache still in use after {timeout_s} s: {server.metrics()}")


def test_disconnect_aborts_and_frees_kv(server: Server):
    aborted_before = server.metrics().get('mnemosyne_requests_finished_total{finish_reason="abort"}', 0)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator would close the connection itself
        while not next(lines).startswith("data:"):
            pass
        assert server.metrics()["mnemosyne_kv_cache_usage_ratio"] > 0
    # Leaving the block closed the connection mid-stream. The core frees the blocks before its next
    # step; the bound is loose only because a loaded 2-core CI box can take seconds per step.
    freed_s = _wait_idle(server)
    print(f"\nKV freed {freed_s * 1e3:.0f} ms after a streaming client disconnected")
    assert freed_s < 10
    m = server.metrics()
    assert m['mnemosyne_requests_finished_total{finish_reason="abort"}'] == aborted_before + 1

    # A non-streaming client that times out is aborted too.
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=1.5)
    assert _wait_idle(server) < 10
    assert server.metrics()['mnemosyne_requests_finished_total{finish_reason="abort"}'] == aborted_before + 2


def test_several_prompts_as_text_and_token_ids(client: openai.OpenAI, tokenizer):
    texts = ["The sky is", "Two plus two is"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    by_text = client.completions.create(model=MODEL, prompt=texts, max_tokens=3, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == sum(map(len, ids))
    assert by_text.usage.completion_tokens == 6
