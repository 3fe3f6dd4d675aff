"""The OpenAI-compatible wire format: request bodies in, response bodies out.

Request models check types and ranges (pydantic); what depends on the model (vocabulary,
context length) is checked by the handlers. Unknown fields are ignored, as OpenAI's own server
and vLLM's do, so newer clients keep working -- except the known ones that would change the
output and that jinfer does not implement (`UNSUPPORTED`): those get a 400 naming the field,
never an answer that silently ignores what was asked. Response builders return plain dicts in
exactly the shape the `openai` package parses.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jinfer.outputs import CompletionOutput, Logprob
from jinfer.sampling_params import (
    MAX_LOGPROBS,
    ParamError,
    SamplingParams,
    StructuredOutputsParams,
)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    include_usage: bool = False


def _absent(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


def _no_tool_choice(value: Any) -> bool:
    return _absent(value) or value == "none"


# Fields of OpenAI's and vLLM's APIs that change what is generated, and jinfer does not implement:
# field -> (the values that ask for nothing, what the field would need). Anything else is a 400.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "guided_whitespace_pattern": (_absent, "whitespace patterns (see disable_any_whitespace)"),
    "functions": (_absent, "the deprecated functions field (use tools)"),
    "function_call": (_no_tool_choice, "the deprecated function_call field (use tool_choice)"),
    "use_beam_search": (_absent, "beam search"),
    "prompt_logprobs": (_absent, "prompt logprobs"),
    "continue_final_message": (_absent, "continuing the final message"),
    "chat_template": (_absent, "per-request chat templates"),
    "chat_template_kwargs": (_absent, "chat template arguments"),
    "documents": (_absent, "chat template documents"),
    "modalities": (lambda v: _absent(v) or v == ["text"], "non-text output"),
    "audio": (_absent, "audio output"),
    "prediction": (_absent, "predicted outputs"),
    "return_tokens_as_token_ids": (_absent, "tokens as token ids"),
    "spaces_between_special_tokens": (lambda v: v is None or v is True, "that detokenization"),
}


class JsonSchema(BaseModel):
    """`response_format.json_schema` (OpenAI): the schema, and names the output ignores."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # a constraint here is always enforced


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


# vLLM's older names for the fields of `structured_outputs`.
GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


class _SamplingFields(BaseModel):
    """Fields both endpoints share: OpenAI's, then vLLM's extras."""

    model_config = ConfigDict(extra="allow")  # kept (in model_extra) to refuse `UNSUPPORTED`

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field asking for what jinfer does not implement."""
        for name, value in (self.model_extra or {}).items():
            accepts, feature = UNSUPPORTED.get(name, (None, ""))
            if accepts is not None and not accepts(value):
                return name, f"{name} is not supported: jinfer does not implement {feature}"
        return None

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs, and the guided_*
    # fields before it (at most one of the three ways)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # one backend here (llguidance): ignored
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: context)

    def structured_field(self) -> str:
        """The body's field that asks for structured output (where its errors point)."""
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        guided = [name for name in GUIDED if getattr(self, name) is not None]
        return guided[0] if guided and self.structured_outputs is None else "structured_outputs"

    def structured(self) -> StructuredOutputsParams | None:
        """The constraint the body asks for, from whichever field; ParamError (naming
        structured_outputs: `structured_field` says which field that was) if it asks twice or
        wrongly."""
        ways = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            ways.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise ParamError(
                    "structured_outputs", "response_format: json_schema needs a json_schema object"
                )
            schema = fmt.json_schema.schema_
            ways.append(("response_format", {"json": schema if schema is not None else {}}))
        if self.structured_outputs is not None:
            ways.append(("structured_outputs", dict(self.structured_outputs)))
        guided = {GUIDED[k]: getattr(self, k) for k in GUIDED if getattr(self, k) is not None}
        if guided:
            ways.append(("guided_*", guided))
        if not ways:
            return None
        if len(ways) > 1:
            raise ParamError(
                "structured_outputs",
                f"ask for structured output in one way; got {' and '.join(w for w, _ in ways)}",
            )
        return StructuredOutputsParams.from_dict(ways[0][1])

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        tool_constraint: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """Raises ValueError (from SamplingParams) for out-of-range values. `tool_constraint`:
        the schema a required or named tool choice decodes under."""
        structured = self.structured()
        if tool_constraint is not None:
            if structured is not None:
                raise ParamError(
                    "tool_choice",
                    "a required or named tool_choice constrains the output itself: it cannot be "
                    "combined with response_format or structured_outputs",
                )
            structured = tool_constraint
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.logit_bias,
            cache_salt=self.cache_salt,
            structured_outputs=structured,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return [list(x) for x in p]


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # a constrained call always follows its parameters


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class CalledFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(BaseModel):
    """A call in an assistant message of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool's result: the call it answers

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat template reads it: role, text content, and its calls or the
        call it answers."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            m["name"] = self.name
        return m

    def text(self) -> str:
        """The content as text; list content may only hold text parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------ responses
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage, with `prompt_tokens_details.cached_tokens`: the prompt tokens whose KV
    came from the prefix cache (what a router's and a client's hit rates are read from)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def without_usage(body: dict[str, Any]) -> dict[str, Any]:
    """A chunk for a client that did not ask for usage (OpenAI sends no `usage` key then)."""
    return {k: v for k, v in body.items() if k != "usage"}


def completion_logprobs(
    entries: list[dict[int, Logprob]],
    token_ids: list[int],
    token_text: Any,
    num: int,
    offset: int,
) -> dict[str, Any]:
    """Legacy completions logprobs: parallel lists, `text_offset` counted from `offset`."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for tok, entry in zip(token_ids, entries, strict=True):
        text = token_text(tok)
        tokens.append(text)
        token_logprobs.append(entry[tok].logprob)
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:num] if num else []
        top.append({token_text(t): lp.logprob for t, lp in ranked})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(
    entries: list[dict[int, Logprob]], token_ids: list[int], token_text: Any, num: int
) -> dict[str, Any]:
    """Chat logprobs: one object per token with its bytes and the top `num` alternatives."""

    def item(tok: int, lp: float) -> dict[str, Any]:
        text = token_text(tok)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for tok, entry in zip(token_ids, entries, strict=True):
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:num] if num else []
        content.append(
            {
                **item(tok, entry[tok].logprob),
                "top_logprobs": [item(t, v.logprob) for t, v in ranked],
            }
        )
    return {"content": content}


def response_body(
    kind: str,  # "completion" | "chat"
    request_id: str,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict | None,
    chunk: bool,
) -> dict[str, Any]:
    """A response or stream chunk; only chat names its chunks differently."""
    if kind == "completion":
        obj = "text_completion"
    else:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    return {
        "id": request_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def finish_fields(out: CompletionOutput) -> dict[str, Any]:
    return {"finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
