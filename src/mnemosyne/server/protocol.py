"""OpenAI request bodies (pydantic) and the OpenAI error shape.

Fields a client may send but this server does not implement are accepted only at their neutral
values; anything else is a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

PositiveInt = Annotated[StrictInt, Field(ge=1)]
BodyT = TypeVar("BodyT", bound=BaseModel)
MAX_PRIORITY = 10
"""`priority` lies in [-MAX_PRIORITY, MAX_PRIORITY]: it scales a deadline by 2 ** priority."""
MAX_DEADLINE_S = 1e6
"""Longest `deadline` accepted, so that the scaled deadline stays finite."""


class APIError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers commonly do, so newer clients still work.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _SamplingRequest(_Body):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: PositiveInt | None = None
    n: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions: vLLM-style sampling knobs, and scheduling hints for the deadline-aware policies.
    top_k: StrictInt = -1
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    priority: Annotated[StrictInt, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] | None = None
    """Lower is more urgent: each step below 0 halves the request's TTFT deadline, each above doubles it;
    None is 0."""
    deadline: Annotated[StrictFloat, Field(gt=0.0, le=MAX_DEADLINE_S, allow_inf_nan=False)] | None = None
    """Seconds after arrival by which the first token is due; None: from --ttft-slo-ms and predicted work."""

    def check_unsupported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise APIError(400, f"{param} is not supported; leave it at 0", param=param)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")


class CompletionRequest(_SamplingRequest):
    prompt: Annotated[str | list[StrictInt] | list[list[StrictInt]] | list[str], Field(union_mode="left_to_right")]
    """Text, token ids, or a batch of either. Tried in that order, and the first that fits is taken:
    pydantic's default ("smart") union validates every member in full, and a long token-id prompt
    then paid for one error per id under `list[str]` (77 ms for 196K ids on a CPU core, 14 ms now),
    all of it on the event loop that streams every other request."""
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (other than best_of == n)", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")


def parse_body(model: type[BodyT], raw: bytes) -> BodyT:
    """Validate a JSON body; raises APIError(400) naming the first bad field, never echoing input."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        first = e.errors(include_input=False, include_url=False)[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {first['msg']}") from None
        loc = [str(part) for part in first["loc"] if not _is_union_branch(part)]
        param = ".".join(loc) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def _is_union_branch(part: object) -> bool:
    # pydantic names the union member it tried ("list[int]", "str"); that is noise for a client.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)
