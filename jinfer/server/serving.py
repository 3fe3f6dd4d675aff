"""The two generation endpoints: validate, submit, then stream (SSE) or collect.

A request becomes one engine request per prompt (a chat is one prompt; `/v1/completions` may
send several); each asks for `n` choices. Everything that can be wrong with a request is
checked before anything is submitted, so a bad request costs nothing. While a response is open,
a watcher listens for the client going away and aborts the engine requests at once.

Streaming never takes text back: while stop strings could still match, the last
`max(len(stop)) - 1` characters are held back until they are safe to send.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from jinfer import tool_parsers
from jinfer.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    ShuttingDownError,
    TooLargeError,
)
from jinfer.outputs import CompletionOutput, RequestOutput
from jinfer.sampling_params import ParamError, SamplingParams, StructuredOutputsParams
from jinfer.server import protocol as P
from jinfer.server.errors import APIError, bad_request
from jinfer.server.tool_calls import ToolCalling, ToolStream
from jinfer.structured.grammar import CompiledGrammar
from jinfer.tool_parsers import choice as tool_choice
from jinfer.tool_parsers import prompt as tool_prompt

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed the connection."""


class Generation:
    """One validated API request: its engine prompts, sampling params and response shape."""

    def __init__(
        self,
        kind: str,  # "completion" | "chat"
        model: str,
        prompts: list[tuple[list[int], str | None]],
        params: SamplingParams,
        body: P.CompletionRequest | P.ChatCompletionRequest,
        grammar: CompiledGrammar | None = None,
        tools: ToolCalling | None = None,
    ) -> None:
        self.kind = kind
        self.model = model
        self.prompts = prompts
        self.params = params
        self.body = body
        self.grammar = grammar  # its structured-output constraint, compiled
        self.tools = tools  # chat with tools: how calls are read from its choices
        self.request_id = P.random_id("cmpl" if kind == "completion" else "chatcmpl")
        self.n = params.n
        self.num_logprobs = params.logprobs
        self.echo = kind == "completion" and body.echo
        self.hold_back = max((len(s) for s in params.stop), default=1) - 1

    def response(self, choices: list[dict[str, Any]], usage: dict | None, chunk: bool) -> dict:
        return P.response_body(self.kind, self.request_id, self.model, choices, usage, chunk)


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """The completion budget; a request that cannot fit the context is a 400."""
    if requested is not None and requested < 1:
        raise bad_request(f"max_tokens must be at least 1, got {requested}", "max_tokens")
    room = max_model_len - prompt_len
    if requested is None:
        if room < 1:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens, and the prompt "
                f"has {prompt_len}: no room to generate.",
                "messages",
            )
        return room
    if prompt_len + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or max_tokens.",
            "max_tokens",
        )
    return requested


class Submitted:
    """A request's engine streams, merged into one queue of (prompt index, newest output)."""

    def __init__(self, engine: AsyncEngine, streams: list[Any], request: Request | None) -> None:
        self.engine = engine
        self.streams = streams
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]
        if request is not None:  # (None: no client to watch, as in a batch file)
            self.tasks.append(asyncio.create_task(self._watch(request)))

    async def _pump(self, i: int, stream: Any) -> None:
        try:
            async for out in stream:
                self.queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - forwarded to the reader
            self.queue.put_nowait((i, e))

    async def _watch(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.close()
        self.queue.put_nowait((-1, ClientGone()))

    def close(self) -> None:
        """Aborts whatever is still running; idempotent."""
        for s in self.streams:
            if not s.finished:
                self.engine.abort(s.request_id)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        open_streams = len(self.streams)
        try:
            while open_streams:
                i, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    open_streams -= 1
                yield i, item
        finally:
            for t in self.tasks:
                t.cancel()
            self.close()


def _refuse_unsupported(body: P.CompletionRequest | P.ChatCompletionRequest) -> None:
    if refused := body.unsupported():
        field, message = refused
        raise bad_request(message, field)


class Serving:
    """Turns API bodies into engine requests and engine outputs into API responses."""

    def __init__(
        self,
        async_engine: AsyncEngine,
        tokenizer: Any,
        model_name: str,
        tool_call_parser: str | None = None,
        enable_auto_tool_choice: bool = False,
    ) -> None:
        self.engine = async_engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = async_engine.engine.config.max_model_len
        # Prompts list tools in the parser's format (hermes' without one: required and named
        # choices are constrained, so they parse whatever the format).
        self.tool_format = tool_parsers.get(tool_call_parser or "hermes")
        # "auto" needs a parser to read what the model wrote
        self.enable_auto_tool_choice = enable_auto_tool_choice and tool_call_parser is not None

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one Serving per server, bounded cache
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # ------------------------------------------------------------ validation
    def check_length(self, text: str, param: str) -> None:
        """A 400 for text too long to be max_model_len tokens, told by its length alone: a huge
        prompt is refused before anything tokenizes it."""
        limit = self.max_model_len * self.tokenizer.max_token_chars
        if len(text) > limit:
            raise bad_request(
                f"{param} has {len(text)} characters: more than this model's context of "
                f"{self.max_model_len} tokens can hold (at most {limit} characters)",
                param,
            )

    def _encode_prompt(
        self, prompt: str | list[int], param: str, truncate: int | None = None
    ) -> list[int]:
        """The prompt's token ids, checked; `truncate` (vLLM's truncate_prompt_tokens): keep
        only its last that many (-1: the last max_model_len)."""
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt is empty", param)
            self.check_length(prompt, param)
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if truncate is not None:
            ids = ids[-(self.max_model_len if truncate == -1 else truncate) :]
        try:
            return self.engine.engine.validate_prompt(ids)
        except ValueError as e:
            raise bad_request(str(e), param) from None

    def _truncation(self, body: Any) -> int | None:
        k = body.truncate_prompt_tokens
        if k is not None and (k == 0 or k < -1 or k > self.max_model_len):
            raise bad_request(
                f"truncate_prompt_tokens must be -1 (the context, {self.max_model_len}) or in "
                f"[1, {self.max_model_len}], got {k}",
                "truncate_prompt_tokens",
            )
        return k

    def _sampling_params(
        self,
        body: Any,
        max_tokens: int | None,
        logprobs: int | None,
        names: dict[str, str],
        tool_constraint: StructuredOutputsParams | None = None,
    ) -> tuple[SamplingParams, CompiledGrammar | None]:
        """The body's SamplingParams and its compiled constraint (compiling here: off the
        event loop and the engine's thread); a 400 naming the field for a value out of range
        or a constraint that does not compile (`names`: the body's name of a SamplingParams
        field, where the two differ)."""
        field = "tool_choice" if tool_constraint is not None else body.structured_field()
        names = {"structured_outputs": field, **names}
        try:
            params = body.sampling_params(max_tokens, logprobs, tool_constraint)
            grammar = self.engine.engine.validate_params(params)
        except ParamError as e:
            raise bad_request(str(e), names.get(e.param, e.param)) from None
        return params, grammar

    def chat_prompt_ids(
        self,
        messages: list[P.ChatMessage],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The chat template applied to `messages` (and `tools`, listed in the tool-call
        format: `tool_parsers/prompt.py`); a 400 for what the template rejects."""
        try:
            plain = [m.as_dict() for m in messages]
        except ValueError as e:  # a content part that is not text
            raise bad_request(f"messages: {e}", "messages") from None
        template = self.tokenizer.chat_template
        plain, extra = tool_prompt.render(plain, tools, self.tool_format, template)
        self.check_length("".join(m["content"] for m in plain), "messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                plain, add_generation_prompt=add_generation_prompt, tokenize=True, **extra
            )
        except Exception as e:  # a template's raise_exception or a bad content part
            raise bad_request(f"messages: {e}", "messages") from None
        return list(ids)

    def _tool_calling(self, body: P.ChatCompletionRequest) -> ToolCalling | None:
        """The request's tools and tool_choice, checked; None when it has no tools."""
        tools = [t.model_dump() for t in body.tools] if body.tools else None
        try:
            mode = tool_choice.resolve(body.tool_choice, tools)
        except ParamError as e:
            raise bad_request(str(e), e.param) from None
        if tools is None:
            return None
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise bad_request(f"tools: the function name {dup!r} appears twice", "tools")
        if mode == "auto" and not self.enable_auto_tool_choice:
            raise bad_request(
                'tool_choice "auto" needs a server started with --enable-auto-tool-choice and a '
                '--tool-call-parser; use "required" or a named function, or "none"',
                "tool_choice",
            )
        return ToolCalling(mode, tools, self.tool_format)

    def completion(self, body: P.CompletionRequest) -> Generation:
        _refuse_unsupported(body)
        if body.suffix is not None:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request("best_of is not supported (use n)", "best_of")
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported", "echo")
        prompts = self._completion_prompts(body)
        longest = max(len(ids) for ids, _ in prompts)
        max_tokens = resolve_max_tokens(body.max_tokens, longest, self.max_model_len)
        params, grammar = self._sampling_params(body, max_tokens, body.logprobs, {})
        return Generation("completion", self.model_name, prompts, params, body, grammar)

    def chat(self, body: P.ChatCompletionRequest) -> Generation:
        _refuse_unsupported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        tools = self._tool_calling(body)
        ids = self._chat_ids(body, tools)
        requested = body.max_completion_tokens or body.max_tokens
        if body.max_completion_tokens is not None and body.max_completion_tokens < 1:
            raise bad_request("max_completion_tokens must be at least 1", "max_completion_tokens")
        max_tokens = resolve_max_tokens(requested, len(ids), self.max_model_len)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        tokens = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        names = {"logprobs": "top_logprobs", "max_tokens": tokens}
        constraint = None
        if tools is not None:
            constraint = tool_choice.constraint(tools.mode, tools.tools, body.parallel_tool_calls)
        params, grammar = self._sampling_params(body, max_tokens, logprobs, names, constraint)
        return Generation("chat", self.model_name, [(ids, None)], params, body, grammar, tools)

    def _completion_prompts(self, body: P.CompletionRequest) -> list[tuple[list[int], str | None]]:
        truncate = self._truncation(body)
        raw = body.prompts()
        if not raw:
            raise bad_request("prompt is empty: give a string, strings or token ids", "prompt")
        return [
            (self._encode_prompt(p, "prompt", truncate), p if isinstance(p, str) else None)
            for p in raw
        ]

    def _chat_ids(self, body: P.ChatCompletionRequest, tools: Any) -> list[int]:
        if not body.messages:
            raise bad_request("messages is empty: give at least one message", "messages")
        listed = tools.tools if tools is not None and tools.active else None
        ids = self.chat_prompt_ids(body.messages, body.add_generation_prompt, listed)
        return self._encode_prompt(ids, "messages", self._truncation(body))

    def render(self, body: P.CompletionRequest | P.ChatCompletionRequest) -> list[list[int]]:
        """The prompt token ids a request would run, one list per prompt, without running it
        (vLLM's /render: a KV-aware router matches them against the replicas' KV events)."""
        if isinstance(body, P.ChatCompletionRequest):
            return [self._chat_ids(body, self._tool_calling(body))]
        return [ids for ids, _ in self._completion_prompts(body)]

    # ------------------------------------------------------------- submission
    def _submit(self, gen: Generation) -> list[Any]:
        try:
            self.engine.check_admission(len(gen.prompts))
            return [
                self.engine.submit(
                    f"{gen.request_id}-{i}", ids, gen.params, prompt=text, grammar=gen.grammar
                )
                for i, (ids, text) in enumerate(gen.prompts)
            ]
        except QueueFullError as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except TooLargeError as e:
            raise bad_request(str(e), "prompt") from None
        except (ShuttingDownError, EngineDeadError) as e:
            raise APIError(503, str(e), code="unavailable") from None

    def start(self, gen: Generation, request: Request | None) -> Submitted:
        """Submits every prompt of `gen` now (so admission errors are still a status code) and
        starts watching the connection: a client that leaves has its requests aborted at once,
        even before its response has begun."""
        return Submitted(self.engine, self._submit(gen), request)

    # --------------------------------------------------------------- respond
    async def collect(self, gen: Generation, sub: Submitted) -> dict[str, Any]:
        final: dict[int, RequestOutput] = {}
        try:
            async for i, out in sub.outputs():
                if out.finished:
                    final[i] = out
        except EngineDeadError as e:
            raise APIError(503, str(e), code="unavailable") from None
        choices = []
        completion_tokens = 0
        for i in range(len(gen.prompts)):
            out = final[i]
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                choices.append(self._choice(gen, i, out, o, o.text, o.token_ids, chunk=False))
        prompt_tokens = sum(len(ids) for ids, _ in gen.prompts)
        cached = sum(final[i].num_cached_tokens for i in range(len(gen.prompts)))
        return gen.response(choices, P.usage(prompt_tokens, completion_tokens, cached), chunk=False)

    async def stream(self, gen: Generation, sub: Submitted) -> AsyncIterator[str]:
        """SSE events: chunks in OpenAI's shape, an optional usage chunk, then `[DONE]`."""
        include_usage = gen.body.include_usage
        usage_field = {"usage": None} if include_usage else {}
        sent_text: dict[int, str] = {}
        sent_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        cached_tokens: dict[int, int] = {}  # prompt -> its tokens from the prefix cache
        tool_streams: dict[int, ToolStream] = {}  # with tools: content and calls, per choice

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            if gen.kind == "chat":
                first = [
                    {"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
                    for j in range(gen.n)
                ]  # fmt: skip
                body = gen.response(first, None, chunk=True)
                yield event({**body, **usage_field} if include_usage else P.without_usage(body))
            async for i, out in sub.outputs():
                cached_tokens[i] = out.num_cached_tokens
                choices = []
                for o in out.outputs:
                    key = i * gen.n + o.index
                    done = o.finish_reason is not None
                    text = o.text if done else o.text[: max(0, len(o.text) - gen.hold_back)]
                    call_deltas: list[dict[str, Any]] = []
                    finish = None  # the choice's own
                    if gen.tools is not None:  # content up to a call, the calls as deltas
                        tools = tool_streams.setdefault(key, gen.tools.stream())
                        text, call_deltas, finish = tools.step(o.text, text, done, o.finish_reason)
                    before = sent_text.get(key, "")
                    if len(text) < len(before) or not text.startswith(before):
                        text = before
                    start = sent_tokens.get(key, 0)
                    new_tokens = o.token_ids[start:]
                    quiet = text == before and (not new_tokens or gen.num_logprobs is None)
                    if quiet and not done and not call_deltas:
                        continue  # nothing the client can see yet
                    if gen.echo and key not in sent_text:
                        text_delta = self._echo_text(gen, i) + text[len(before) :]
                    else:
                        text_delta = text[len(before) :]
                    choice = self._choice(
                        gen, i, out, o, text_delta, new_tokens, chunk=True, token_start=start,
                        offset=len(before),
                    )  # fmt: skip
                    if call_deltas:
                        choice["delta"]["tool_calls"] = call_deltas
                    if finish is not None:
                        choice["finish_reason"] = finish
                    choices.append(choice)
                    sent_text[key] = text
                    sent_tokens[key] = len(o.token_ids)
                    completion_tokens[key] = len(o.token_ids)
                if choices:
                    body = gen.response(choices, None, chunk=True)
                    yield event({**body, **usage_field} if include_usage else P.without_usage(body))
            if include_usage:
                prompt_tokens = sum(len(ids) for ids, _ in gen.prompts)
                completion, cached = sum(completion_tokens.values()), sum(cached_tokens.values())
                usage = P.usage(prompt_tokens, completion, cached)
                yield event(gen.response([], usage, chunk=True))
        except ClientGone:
            return
        except EngineDeadError as e:
            yield event(APIError(503, str(e), code="unavailable").body())
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- shapes
    def _echo_text(self, gen: Generation, i: int) -> str:
        ids, text = gen.prompts[i]
        return text if text is not None else self.tokenizer.decode(ids)

    def _choice(
        self,
        gen: Generation,
        i: int,
        out: RequestOutput,
        o: CompletionOutput,
        text: str,
        token_ids: list[int],
        *,
        chunk: bool,
        token_start: int = 0,
        offset: int = 0,
    ) -> dict[str, Any]:
        index = i * gen.n + o.index
        logprobs = None
        if gen.num_logprobs is not None and o.logprobs is not None:
            entries = o.logprobs[token_start : token_start + len(token_ids)]
            if gen.kind == "completion":
                logprobs = P.completion_logprobs(
                    entries, token_ids, self.token_text, gen.num_logprobs, offset
                )
            else:
                logprobs = P.chat_logprobs(entries, token_ids, self.token_text, gen.num_logprobs)
        finish = P.finish_fields(o)
        if gen.kind == "completion":
            if gen.echo and not chunk:
                text = self._echo_text(gen, i) + text
            return {"index": index, "text": text, "logprobs": logprobs, **finish}
        if chunk:
            delta = {"content": text} if text else {}
            return {"index": index, "delta": delta, "logprobs": logprobs, **finish}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if gen.tools is not None:
            extracted = gen.tools.extract(text, o.finish_reason)
            if extracted.tool_calls:
                message["content"] = extracted.content
                message["tool_calls"] = [c.to_openai() for c in extracted.tool_calls]
                finish["finish_reason"] = "tool_calls"
        return {"index": index, "message": message, "logprobs": logprobs, **finish}
