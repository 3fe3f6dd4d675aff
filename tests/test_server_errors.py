"""The HTTP server over the echo engine against what goes wrong: every bad input gets an
OpenAI-style error and costs no other request anything; auth, admission control (429),
oversized bodies (413), disconnects that abort at once, and an engine that dies.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from server_util import (
    MODEL,
    assert_idle,
    expected_text,
    start,
    wait_until,
)

from jinfer.server.app import ServerConfig

# ------------------------------------------------------------------ bad inputs
BAD_COMPLETIONS = [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe\x00", 400, "not valid UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"prompt": 12}', 422, "prompt"),
    (b'{"prompt": "x", "max_tokens": "many"}', 422, "max_tokens"),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "gpt-4"),
    (b'{"prompt": ""}', 400, "prompt is empty"),
    (b'{"prompt": []}', 400, "prompt is empty"),
    (b'{"prompt": "x", "temperature": -0.5}', 400, "temperature"),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "x", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "x", "n": 0}', 400, "n must"),
    (b'{"prompt": "x", "n": 100000}', 400, "n must be in [1, 128]"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 300}', 400, "maximum context length"),
    (b'{"prompt": [1, 2, 99999999]}', 400, "outside the vocabulary"),
    (b'{"prompt": [-1]}', 400, "outside the vocabulary"),
    (json.dumps({"prompt": "x", "stop": [str(i) for i in range(17)]}).encode(), 400, "stop"),
    (b'{"prompt": "x", "logit_bias": {"5": 500}}', 400, "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"999999": 1}}', 400, "logit_bias"),
    (b'{"prompt": "x", "logprobs": 21}', 422, "logprobs"),
    (b'{"prompt": "x", "suffix": "y"}', 400, "suffix"),
    (b'{"prompt": "x", "response_format": {"type": "xml"}}', 422, "response_format"),
    (b'{"prompt": "x", "response_format": {"type": "json_schema"}}', 400, "needs a json_schema"),
    (b'{"prompt": "x", "guided_json": {"type": "nosuch"}}', 400, "json constraint is invalid"),
    (b'{"prompt": "x", "guided_regex": "(a"}', 400, "regex constraint"),
    (b'{"prompt": "x", "structured_outputs": {"jsn": {}}}', 400, "unknown field 'jsn'"),
    (b'{"prompt": "x", "structured_outputs": {}}', 400, "exactly one of"),
    (b'{"prompt": "x", "structured_outputs": {"choice": []}}', 400, "choice must be"),
    (b'{"prompt": "x", "structured_outputs": {"grammar": "start: nope"}}', 400, "grammar"),
    (
        b'{"prompt": "x", "guided_choice": ["a"], "response_format": {"type": "json_object"}}',
        400,
        "in one way; got response_format and guided_*",
    ),
    (b'{"prompt": "x", "guided_whitespace_pattern": " "}', 400, "whitespace patterns"),
    (b'{"prompt": "x", "use_beam_search": true}', 400, "beam search"),
    (b'{"prompt": "x", "prompt_logprobs": 1}', 400, "prompt_logprobs is not supported"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_COMPLETIONS)
def test_bad_completion_request_gets_openai_error_and_server_goes_on(
    server, client, tok, body, status, message
):
    r = httpx.post(server.url + "/v1/completions", content=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    ok = client.completions.create(model=MODEL, prompt="still fine", max_tokens=2)
    assert ok.choices[0].text == expected_text(tok, "still fine", 2)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"messages": []}, 400, "messages is empty"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages"),
        ({"messages": "hello"}, 422, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400, "max"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            422,
            "tools.0.function",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
            400,
            "functions is not supported",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "a",
                        "schema": {"type": "object", "minProperties": "x"},
                    },
                },
            },
            400,
            "json constraint",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "text content",
        ),
    ],
)
def test_bad_chat_request(server, client, body, status, message):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    messages = [{"role": "user", "content": "ok"}]
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).choices


def test_unknown_route_and_method_are_openai_errors(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_bad_tokenize_requests(server):
    assert httpx.post(server.url + "/tokenize", json={}).status_code == 400
    r = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_oversized_body_is_413_declared_or_streamed(tok):
    with start(tok, ServerConfig(MODEL, max_body_bytes=1000)) as s:
        s.wait_ready()
        big = json.dumps({"prompt": "x" * 2000}).encode()
        r = httpx.post(s.url + "/v1/completions", content=big)
        assert r.status_code == 413 and "exceeds 1000 bytes" in r.json()["error"]["message"]

        def chunks():
            for i in range(0, len(big), 100):
                yield big[i : i + 100]

        r = httpx.post(s.url + "/v1/completions", content=chunks())  # no Content-Length
        assert r.status_code == 413
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "fine", "max_tokens": 1})
        assert ok.status_code == 200


def test_api_key_guards_v1_only(tok):
    with start(tok, ServerConfig(MODEL, api_key="s3cret")) as s:
        s.wait_ready()
        body = {"prompt": "hi", "max_tokens": 1}
        r = httpx.post(s.url + "/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(s.url + "/v1/completions", json=body, headers=wrong).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 200


# --------------------------------------------------------- load and lifecycle
def test_queue_limit_answers_429_with_retry_after(tok):
    config = ServerConfig(MODEL, max_waiting_requests=1)
    with start(tok, config, step_delay=0.02, max_num_seqs=1) as s:
        s.wait_ready()
        body = {"prompt": "long running", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", s.url + "/v1/completions", json=body) as first:
                with c.stream("POST", s.url + "/v1/completions", json=body) as second:
                    assert first.status_code == second.status_code == 200
                    r = httpx.post(s.url + "/v1/completions", json=body)
                    assert r.status_code == 429 and r.headers["retry-after"] == "1"
                    assert "in flight" in r.json()["error"]["message"]
        assert_idle(s)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "after", "max_tokens": 2})
        assert r.status_code == 200


def test_disconnect_aborts_within_a_step_and_frees_pages(tok):
    with start(tok, step_delay=0.05) as s:
        s.wait_ready()
        body = {"prompt": "never finishes", "max_tokens": 200, "stream": True}
        with (
            httpx.Client(timeout=30) as c,
            c.stream("POST", s.url + "/v1/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            assert s.engine.num_running() == 1
        closed = time.monotonic()
        assert wait_until(lambda: not s.engine.requests, timeout=5)
        assert time.monotonic() - closed < 0.5  # a few 50 ms steps at most
        assert_idle(s)
        metrics = httpx.get(s.url + "/metrics").text
        assert (
            f'vllm:request_success_total{{finished_reason="abort",model_name="{MODEL}"}} 1.0'
            in metrics
        )
        assert not s.state.metrics._progress


def test_disconnect_of_a_non_streaming_request_aborts_it(tok):
    with start(tok, step_delay=0.05) as s:
        s.wait_ready()
        body = {"prompt": "slow", "max_tokens": 200}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.3)
        assert wait_until(lambda: not s.engine.requests, timeout=5)
        assert_idle(s)


def test_64_concurrent_streams_with_16_disconnecting(tok):
    with start(tok, step_delay=0.002, max_num_seqs=16, num_pages=400) as s:
        s.wait_ready()
        prompts = [f"Client number {i} asks about topic {i * 7 % 13}" for i in range(64)]
        leaving = set(range(0, 64, 4))

        async def one(client: httpx.AsyncClient, i: int) -> str | None:
            body = {"prompt": prompts[i], "max_tokens": 24, "stream": True, "temperature": 0}
            text = ""
            async with client.stream("POST", s.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if i in leaving and len(text) > 5:
                        return None
            return text

        async def main() -> list[str | None]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(*(one(client, i) for i in range(64)))

        texts = asyncio.run(main())
        for i, text in enumerate(texts):
            if i in leaving:
                assert text is None
            else:
                assert text == expected_text(tok, prompts[i], 24), i
        alone = httpx.post(
            s.url + "/v1/completions", json={"prompt": prompts[1], "max_tokens": 24}
        ).json()
        assert alone["choices"][0]["text"] == texts[1]
        assert_idle(s)


def test_a_dying_engine_ends_streams_with_an_error_and_health_says_503(tok):
    with start(tok, step_delay=0.02) as s:
        s.wait_ready()
        body = {"prompt": "doomed", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            s.engine.runner.fail = True
            rest = [line for line in lines if line.startswith("data:")]
        assert "injected engine failure" in rest[-2] and rest[-1] == "data: [DONE]"
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503
        assert httpx.post(s.url + "/reset_prefix_cache").status_code == 503  # no hang either


@pytest.mark.parametrize("exit_on_engine_error", [True, False])
def test_a_dying_engine_ends_the_server_with_exit_status_1_unless_told_to_stay(
    tok, exit_on_engine_error
):
    config = ServerConfig(MODEL, exit_on_engine_error=exit_on_engine_error)
    with start(tok, config=config, step_delay=0.02) as s:
        s.wait_ready()
        s.state.request_exit = lambda: setattr(s.server, "should_exit", True)  # as serve.py
        s.engine.runner.fail = True
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "doomed"}, timeout=30)
        assert r.status_code == 503 and "injected engine failure" in r.json()["error"]["message"]
        assert s.state.exit_code == 1
        stopped = wait_until(lambda: not s.thread.is_alive(), timeout=10)
        assert stopped == exit_on_engine_error
        if not exit_on_engine_error:
            assert httpx.get(s.url + "/health").status_code == 503  # up, saying what happened


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
         "response_format"),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs"),
        ({"guided_json": {"type": "nosuch"}}, "guided_json"),
        ({"guided_grammar": "start: nope"}, "guided_grammar"),
    ],
)  # fmt: skip
def test_a_constraint_that_does_not_compile_names_the_field_it_came_in(server, extra, param):
    body = {"messages": [{"role": "user", "content": "x"}], **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}}]


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "'nope', which is not in tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "unknown tool_choice"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS}, "tool_choice", "--enable-auto-tool-choice"),  # this server has none
        ({"tools": TOOLS * 2, "tool_choice": "required"}, "tools", "appears twice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice", "cannot be combined"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
          "tool_choice": "required"}, "tool_choice", "constraint"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s_naming_the_field(server, client, extra, param, message):
    body = {"messages": [{"role": "user", "content": "x"}], **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    messages = [{"role": "user", "content": "ok"}]
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).choices
