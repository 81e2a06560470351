"""Bad input gets a 4xx in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.harness import API_KEY, MAX_BODY_BYTES, MAX_MODEL_LEN, MODEL, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _post(server: Server, path: str, content: bytes | None = None, json: object = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    headers = {**server.headers, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, json=json, headers=headers, timeout=60)


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("path", "body", "param"), [
    (CHAT, {"model": MODEL, "messages": USER, "max_tokens": "ten"}, "max_tokens"),
    (CHAT, {"model": MODEL, "messages": USER, "max_tokens": True}, "max_tokens"),
    (CHAT, {"model": MODEL, "messages": USER, "temperature": "hot"}, "temperature"),
    (CHAT, {"model": MODEL, "messages": "hi"}, "messages"),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    (CHAT, {"model": MODEL, "messages": USER, "stream": "yes"}, "stream"),
    (COMPLETIONS, {"model": MODEL, "prompt": 42}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    (CHAT, {"model": MODEL, "messages": USER, "max_tokens": -5}, "max_tokens"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (CHAT, {"model": MODEL, "messages": USER, "max_tokens": 10**9}, "max_tokens"),
    (CHAT, {"model": MODEL, "messages": USER, "top_p": 0}, "top_p"),
    (CHAT, {"model": MODEL, "messages": []}, "messages"),
    (CHAT, {"messages": USER}, "model"),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, 2, 10**7]}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": ""}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, -1]}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, "two"]}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [[1, 2], []]}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [[1, 2], [3, 10**7]]}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [1.0, 2.0]}, "prompt"),
    (CHAT, {"model": MODEL, "messages": USER, "presence_penalty": 1.0}, "presence_penalty"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "priority": "high"}, "priority"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "priority": 1.5}, "priority"),
    (CHAT, {"model": MODEL, "messages": USER, "priority": 11}, "priority"),
    (CHAT, {"model": MODEL, "messages": USER, "priority": -11}, "priority"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "deadline": 0}, "deadline"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "deadline": -2.5}, "deadline"),
    (CHAT, {"model": MODEL, "messages": USER, "deadline": "soon"}, "deadline"),
    (CHAT, {"model": MODEL, "messages": USER, "deadline": True}, "deadline"),
    (CHAT, {"model": MODEL, "messages": USER, "deadline": 1e7}, "deadline"),
])
def test_bad_fields_are_400(server: Server, path: str, body: dict, param: str):
    _assert_error(_post(server, path, json=body), 400, param)


def test_unknown_model_is_404(server: Server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=USER)
    assert e.value.code == "model_not_found"


def test_malformed_json_and_bad_utf8(server: Server):
    assert "JSON" in _assert_error(_post(server, CHAT, content=b'{"model": "x", "messages": ['), 400)["message"]
    bad = b'{"model": "' + MODEL.encode() + b'", "prompt": "caf\xe9"}'
    assert "UTF-8" in _assert_error(_post(server, COMPLETIONS, content=bad), 400)["message"]


def test_prompt_over_the_limit(server: Server):
    r = _post(server, COMPLETIONS, json={"model": MODEL, "prompt": [7] * (MAX_MODEL_LEN + 10), "max_tokens": 1})
    error = _assert_error(r, 400, "prompt")
    assert str(MAX_MODEL_LEN + 10) in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    assert error["code"] == "context_length_exceeded"
    r = _post(server, COMPLETIONS, json={"model": MODEL, "prompt": [7] * 100, "max_tokens": MAX_MODEL_LEN})
    assert "100 in the prompt" in _assert_error(r, 400, "max_tokens")["message"]


def test_body_over_the_limit_is_413(server: Server):
    body = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    _assert_error(_post(server, COMPLETIONS, content=body), 413)


def test_auth(server: Server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    assert _assert_error(_post(server, COMPLETIONS, json=body, headers={"Authorization": ""}), 401)["code"] == \
        "invalid_api_key"
    _assert_error(_post(server, COMPLETIONS, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    _assert_error(httpx.get(f"{server.url}/v1/nowhere", headers=server.headers, timeout=10), 404)


def test_still_serving_after_bad_input(server: Server):
    r = _post(server, COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
