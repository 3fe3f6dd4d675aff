"""The HTTP server over the echo engine (real engine, hand-computable model): API shapes, streaming,
every bad input, auth, admission control, disconnects, metrics and the engine's lifecycle.

The expected texts are computed by hand: the echo model repeats the prompt's tokens.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from server_util import LiveServer, echo_tokens, make_echo_engine, wait_until

from jinfer.server.app import ServerConfig, create_app

MODEL = "echo-model"


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def start(tok, config: ServerConfig | None = None, step_delay: float = 0.002, **engine_kw):
    engine = make_echo_engine(tok, step_delay=step_delay, **engine_kw)
    app = create_app(config or ServerConfig(MODEL), lambda: (engine, tok))
    server = LiveServer(app)
    server.engine = engine
    return server


@pytest.fixture(scope="module")
def server(tok):
    with start(tok) as s:
        s.wait_ready()
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def expected_text(tok, prompt: str, n: int) -> str:
    return tok.decode(echo_tokens(tok.encode(prompt), n))


def chat_prompt_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def assert_idle(server) -> None:
    engine = server.engine
    assert wait_until(lambda: not engine.has_unfinished_requests() and not engine.requests)
    assert engine.kv_cache_usage() == 0.0
    engine.check_invariants()


# ----------------------------------------------------------------- happy paths
def test_completion_text_usage_and_finish_reason(client, tok):
    prompt = "The quick brown fox jumps"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == expected_text(tok, prompt, 7)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(tok.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 7)
    assert r.usage.total_tokens == n_prompt + 7


def test_completion_accepts_token_ids_and_prompt_lists(client, tok):
    ids = tok.encode("Once upon a time")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5)
    assert r.choices[0].text == tok.decode(echo_tokens(ids, 5))
    r = client.completions.create(model=MODEL, prompt=["red green", "blue"], max_tokens=4, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts == [expected_text(tok, "red green", 4)] * 2 + [expected_text(tok, "blue", 4)] * 2
    assert r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == len(tok.encode("red green")) + len(tok.encode("blue"))


def test_completion_echo_prepends_prompt(client, tok):
    r = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, echo=True)
    assert r.choices[0].text == "Echo me" + expected_text(tok, "Echo me", 3)


def test_chat_completion(client, tok):
    messages = [{"role": "user", "content": "Say something nice"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == tok.decode(echo_tokens(chat_prompt_ids(tok, messages), 6))
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tok, messages))
    assert r.usage.completion_tokens == 6


def test_max_completion_tokens_is_honoured(client):
    messages = [{"role": "user", "content": "count"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_stop_string_spanning_tokens_is_cut_and_reported(client, tok):
    prompt = "alpha beta gamma delta"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stop=["mma de"])
    assert r.choices[0].text == "alpha beta ga"
    assert r.choices[0].finish_reason == "stop"


def test_streaming_completion_deltas_add_up_and_include_usage(client, tok):
    prompt = "Streaming tokens one at a time"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text(tok, prompt, 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_never_takes_text_back_before_a_stop_string(client, tok):
    prompt = "one two three four five six"
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, stop=["four five"], stream=True
    )
    text = "".join(c.choices[0].text for c in stream)
    assert text == "one two three "


def test_streaming_chat_role_first_then_content(client, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == tok.decode(echo_tokens(chat_prompt_ids(tok, messages), 5))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_logprobs_shapes(client, tok):
    r = client.completions.create(model=MODEL, prompt="log probs", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == [-0.5] * 3
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    messages = [{"role": "user", "content": "x"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 2 and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].top_logprobs[1].logprob == -1.5
    assert bytes(content[0].bytes).decode() == content[0].token


def test_models_version_health_tokenize(server, tok):
    r = httpx.get(server.url + "/v1/models").json()
    assert r["data"][0]["id"] == MODEL and r["data"][0]["max_model_len"] == 256
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").status_code == 200
    t = httpx.post(server.url + "/tokenize", json={"prompt": "hello there"}).json()
    assert t["tokens"] == tok.encode("hello there") and t["count"] == len(t["tokens"])
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == "hello there"
    messages = [{"role": "user", "content": "hey"}]
    t = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert t["tokens"] == chat_prompt_ids(tok, messages)


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
    (b'{"prompt": "x", "n": 100000}', 400, "n must be at most"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 300}', 400, "maximum context length"),
    (b'{"prompt": [1, 2, 99999999]}', 400, "outside the vocabulary"),
    (b'{"prompt": [-1]}', 400, "outside the vocabulary"),
    (json.dumps({"prompt": "x", "stop": [str(i) for i in range(17)]}).encode(), 400, "stop"),
    (b'{"prompt": "x", "logit_bias": {"5": 500}}', 400, "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"999999": 1}}', 400, "logit_bias"),
    (b'{"prompt": "x", "logprobs": 21}', 422, "logprobs"),
    (b'{"prompt": "x", "suffix": "y"}', 400, "suffix"),
    (b'{"prompt": "x", "response_format": {"type": "json_object"}}', 400, "response_format is not"),
    (b'{"prompt": "x", "guided_json": {"type": "object"}}', 400, "guided_json is not supported"),
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
            400,
            "tools is not supported: jinfer does not implement tool calling",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "a"}},
            },
            400,
            "response_format is not supported",
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


def test_fields_that_ask_for_nothing_and_unknown_fields_are_accepted(client, tok):
    messages = [{"role": "user", "content": "Say something nice"}]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=3,
        response_format={"type": "text"},
        tool_choice="none",
        extra_body={"tools": [], "some_future_field": {"x": 1}, "use_beam_search": False},
    )
    assert r.choices[0].message.content == tok.decode(
        echo_tokens(chat_prompt_ids(tok, messages), 3)
    )


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


def test_metrics_use_vllm_names_and_count(tok):
    with start(tok) as s:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        for _ in range(3):
            client.completions.create(model=MODEL, prompt="count me", max_tokens=4)
        text = httpx.get(s.url + "/metrics").text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        label = f'{{model_name="{MODEL}"}}'
        n_prompt = len(tok.encode("count me"))
        assert samples[f"vllm:prompt_tokens_total{label}"] == 3 * n_prompt
        assert samples[f"vllm:generation_tokens_total{label}"] == 12
        assert samples[f"vllm:time_to_first_token_seconds_count{label}"] == 3
        assert samples[f"vllm:e2e_request_latency_seconds_count{label}"] == 3
        assert samples[f"vllm:request_queue_time_seconds_count{label}"] == 3
        assert samples[f"vllm:inter_token_latency_seconds_count{label}"] == 9
        reason = f'{{finished_reason="length",model_name="{MODEL}"}}'
        assert samples[f"vllm:request_success_total{reason}"] == 3
        for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            assert samples[f"vllm:{gauge}{label}"] == 0
        assert f"jinfer:xla_compiles_total{label}" in samples


def test_health_is_503_while_loading_then_200(tok):
    release = threading.Event()
    engine = make_echo_engine(tok)

    def slow_load():
        release.wait(30)
        return engine, tok

    with LiveServer(create_app(ServerConfig(MODEL), slow_load)) as s:
        assert wait_until(lambda: _status(s.url + "/health") == 503)
        assert httpx.get(s.url + "/health").json()["status"] == "loading"
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]
        release.set()
        s.wait_ready(10)


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


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def test_prefix_cache_hits_show_in_metrics_and_salts_keep_tenants_apart(tok):
    with start(tok, page_size=4) as s:
        s.wait_ready()
        prompt = "a shared system prompt that is long enough to fill a few pages of the cache"
        n_prompt = len(tok.encode(prompt))
        body = {"prompt": prompt, "max_tokens": 2}
        first = httpx.post(s.url + "/v1/completions", json={**body, "cache_salt": "tenant-a"})
        assert first.status_code == 200
        other = httpx.post(s.url + "/v1/completions", json={**body, "cache_salt": "tenant-b"})
        assert other.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert _metric(s, "vllm:prefix_cache_hits_total") == 0  # different salts share nothing
        again = httpx.post(s.url + "/v1/completions", json={**body, "cache_salt": "tenant-a"})
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        hits = _metric(s, "vllm:prefix_cache_hits_total")
        assert 0 < hits < n_prompt and hits % 4 == 0  # whole pages, never the last token
        assert _metric(s, "vllm:prefix_cache_queries_total") == 3 * n_prompt
        assert _metric(s, "jinfer:prefix_cache_pages") > 0
        r = httpx.post(s.url + "/v1/completions", json={**body, "cache_salt": ""})
        assert r.status_code == 400 and "cache_salt" in r.json()["error"]["message"]


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
