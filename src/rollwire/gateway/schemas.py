"""Request bodies of the OpenAI routes, validated up front (pydantic): an unknown field, a wrong
type or a value out of range is a 400 naming the parameter, before anything reaches a server.

Accepted but only at OpenAI's neutral value (anything else is ``unsupported_parameter``, never
silently ignored): ``presence_penalty``/``frequency_penalty`` 0, ``logit_bias`` empty,
``response_format`` text, ``tool_choice`` none/auto, ``top_logprobs`` 0 (the engines report the
sampled token's logprob only), ``echo`` false, ``best_of`` 1, ``suffix`` none. rollwire's own
sampling fields come as extra body fields: ``top_k``, ``min_p``, ``ignore_eos`` (also: do not end
at the end-of-turn token), ``stop_token_ids``, ``return_token_ids`` (token ids in the response),
``session_id`` (as the ``X-Session-ID`` header). A completions request asks for at most
``MAX_CHOICES`` choices (prompts x n).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from rollwire.engines.validation import MAX_N, MAX_SEED
from rollwire.gateway.errors import APIError, bad_request, unsupported

MAX_STOP = 4  # OpenAI's limit on stop sequences
# choices one completions request may ask for (prompts x n): each is a request to a server and a
# task here, made on the event loop, so a 1 MB body of 200,000 tiny prompts must not stall the gateway
MAX_CHOICES = 256
MAX_STOP_CHARS = 1024  # per stop sequence: they are tokenized on the event loop (a longer one stops nothing real)
MAX_TOP_K = (1 << 31) - 1
# a session id travels back in a header and in the trajectory routes' paths: URL-safe ASCII only
SESSION_ID_PATTERN = r"^[A-Za-z0-9._~:@+=-]{1,256}$"
_TYPE_ERRORS = ("_type", "_parsing", "is_instance_of", "union_tag_invalid")  # pydantic: the wrong kind of value


class _Strict(BaseModel):
    # strict: a JSON value of the wrong kind is a 400, never coerced ("4" or true is not 4; 1.0 or
    # true is not a token id); a JSON integer still fills a float field
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str | dict[str, Any]


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    """One chat message. Fields OpenAI's own responses carry (refusal, annotations, audio...) are
    ignored, so an agent may send back the message object it received."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1  # strict: "2" is a client's bug, not 2
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED - MAX_N)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # rollwire's own (extra_body)
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] = -1
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    return_token_ids: bool = False
    session_id: Annotated[str, Field(pattern=SESSION_ID_PATTERN)] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"stop: at most {MAX_STOP} sequences", "stop")
        if any(not s for s in stops):
            raise bad_request("stop: a stop sequence may not be empty", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise bad_request(f"stop: a stop sequence may have at most {MAX_STOP_CHARS} characters", "stop")
        return stops

    def check_neutral(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise unsupported(name, "penalties are not supported by rollwire's engines (only 0)")
        if self.logit_bias:
            raise unsupported("logit_bias", "not supported by rollwire's engines")
        if self.top_k == 0:
            raise bad_request("top_k must be -1 (all) or >= 1", "top_k")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    def check(self) -> None:
        self.check_neutral()
        if self.top_logprobs:
            raise unsupported("top_logprobs", "the engine reports only the sampled token's logprob; "
                                              "use logprobs=true with top_logprobs 0 or unset")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens disagree: send one", "max_tokens")
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            raise unsupported("tool_choice", "only 'none' and 'auto' (no constrained decoding here)")
        if self.response_format not in (None, {"type": "text"}):
            raise unsupported("response_format", "only {'type': 'text'}")
        if self.store:
            raise unsupported("store", "rollwire stores no completions")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] \
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_neutral()
        if (choices := self.n * self.prompt_count()) > MAX_CHOICES:
            raise bad_request(f"prompt: {self.prompt_count()} prompts x n={self.n} ask for {choices} choices, "
                              f"at most {MAX_CHOICES} per request", "prompt")
        if self.logprobs:
            raise unsupported("logprobs", "the engine reports only the sampled token's logprob: use logprobs=0")
        if self.echo:
            raise unsupported("echo", "prompt logprobs are not available")
        if self.best_of not in (None, 1, self.n) or (self.best_of or 1) > self.n:
            raise unsupported("best_of", "only best_of = n")
        if self.suffix:
            raise unsupported("suffix", "insertion is not supported")

    def prompt_count(self) -> int:
        p = self.prompt
        return 1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# parts of a pydantic error location that name a branch of a union, not something the caller wrote
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "bytes", "dict", "list"})
_MODEL_NAMES = frozenset({"TextPart", "FunctionCall", "ToolCall", "Message", "FunctionDef", "Tool", "StreamOptions"})


def _names_a_field(part: Any) -> bool:
    """A part of a pydantic error location that the caller wrote (a field name, as written,
    "maxTokens" included, or a list index), not one naming a branch of a union ("str",
    "list[int]", "function-after[...]", "constrained-str", "TextPart")."""
    if isinstance(part, int):
        return True
    return not (part in _TYPE_NAMES or part in _MODEL_NAMES or "[" in part
                or part.startswith(("function-", "constrained-", "json-or-python", "lax-or-strict")))


def parse(model: type[_Sampling], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its parameter."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"] if _names_a_field(x))
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter") from None
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}", param=param,
                       code="invalid_type" if err["type"].endswith(_TYPE_ERRORS) else "invalid_value") from None
    req.check()  # type: ignore[attr-defined]
    return req


def decode_json(buf: bytes | bytearray) -> Any:
    try:
        return json.loads(buf)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
