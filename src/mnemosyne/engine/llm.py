"""`LLM`: offline batched generation over an in-process engine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from mnemosyne.config import EngineConfig
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.engine.outputs import RequestOutput
from mnemosyne.request import SamplingParams

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
    """Generate from a model. Arguments match `EngineConfig`; see its field docs."""

    def __init__(self, model: str = "smollm2-135m", tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, kv_parallel_size: int = 1,
                 kvp_group_max_tokens: int | None = None, max_model_len: int | None = None,
                 dtype: str = "auto", device: str = "auto", seed: int = 0, **kwargs: Any):
        self.config = EngineConfig(
            model=model, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, kv_parallel_size=kv_parallel_size,
            kvp_group_max_tokens=kvp_group_max_tokens, max_model_len=max_model_len, dtype=dtype,
            device=device, seed=seed, **kwargs)
        self.engine = LLMEngine(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A prompt is a string or a list of token ids. Invalid prompts or parameters raise ValueError
        before anything is queued.
        """
        batch = _as_batch(prompts)
        params = _as_params(sampling_params, len(batch))
        token_ids = [self.engine.tokenize(p) for p in batch]  # validate all before queueing any
        ids: list[str] = []
        try:
            for prompt, tokens, sp in zip(batch, token_ids, params, strict=True):
                ids.append(self.engine.add_request(prompt if isinstance(prompt, str) else tokens, sp))
        except ValueError:
            self.engine.abort_request(ids)  # all or nothing
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.engine.model_name} has no chat template")
        if not messages:
            raise ValueError("messages must not be empty")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def _run(self, request_ids: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        show = use_tqdm if use_tqdm is not None else (len(request_ids) > 1 and not os.environ.get("MNEMOSYNE_QUIET"))
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="generating", unit="req", disable=not show) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[r] for r in request_ids]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if len(prompts) and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    return list(prompts)


def _as_params(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return list(params)
