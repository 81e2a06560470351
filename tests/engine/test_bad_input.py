"""Bad input gets a clear ValueError at once, queues nothing, and the engine keeps serving."""

from __future__ import annotations

import shutil
from array import array

import pytest

from mnemosyne import LLM, SamplingParams
from tests.reference import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny(path, "llama-gqa-untied")
    return path


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(str(tiny), device="cpu", dtype="float32", max_model_len=128, kv_cache_memory=0.01)


GOOD = [5, 6, 7, 8]


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    (list(range(3, 3 + 129)), "max_model_len"),
    ([5, 6, 100000], "token ids"),
    ([5, -1, 6], "token ids"),
    ([5, 6.0, 7], "integers"),  # not rounded into some other token
    ([5, 2**40], "integers"),
    (array("i", [5, 6, 100000]), "token ids"),  # the engine core's form, checked without a copy
])
def test_bad_prompts_are_rejected_and_nothing_is_queued(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([GOOD, prompt], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.pool.num_free_blocks == llm.engine.scheduler.pool.num_blocks
    out = llm.generate(GOOD, SamplingParams(max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_an_int_array_prompt_is_kept_as_it_is(llm):
    ids = array("i", GOOD)
    assert llm.engine.tokenize(ids) is ids
    assert llm.engine.tokenize(GOOD) == ids  # a list becomes the same array


def test_text_prompt_without_tokenizer_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello")


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unknown_model_string():
    with pytest.raises(ValueError, match="no-such-model"):
        LLM("no-such-model", device="cpu")


@pytest.mark.parametrize("flag, value", [("tensor_parallel_size", 0), ("dtype", "fp8"), ("device", "tpu"),
                                         ("max_num_batched_tokens", -1), ("triton_chunk_rows", -1)])
def test_invalid_engine_flags_name_the_flag(flag, value):
    with pytest.raises(ValueError, match=flag.replace("_", "-")):
        LLM("dummy:tiny", **{flag: value})


def test_truncated_safetensors(tmp_path, tiny):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        LLM(str(broken), device="cpu")


@pytest.mark.slow
def test_truncated_gguf(tmp_path, default_gguf):
    broken = tmp_path / "broken.gguf"
    with open(default_gguf, "rb") as f:
        broken.write_bytes(f.read(40 << 20))
    with pytest.raises(ValueError, match=r"broken\.gguf"):
        LLM(str(broken), device="cpu")
