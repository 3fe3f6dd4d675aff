"""The HTTP server over the echo engine (real engine, hand-computable model): API shapes,
streaming, logprobs, metrics and the engine's lifecycle (bad input, auth, admission control and
disconnects: test_server_errors.py).

The expected texts are computed by hand: the echo model repeats the prompt's tokens.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
from server_util import (
    MODEL,
    LiveServer,
    chat_prompt_ids,
    echo_tokens,
    expected_text,
    make_echo_engine,
    start,
    wait_until,
)

from jinfer.server.app import ServerConfig, create_app


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


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, server, tok):
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tok.encode(prompt)
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, extra_body={"truncate_prompt_tokens": 3}
    )
    assert r.usage.prompt_tokens == 3
    assert r.choices[0].text == tok.decode(echo_tokens(ids[-3:], 5))
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, extra_body={"truncate_prompt_tokens": 4}
    )
    assert chat.usage.prompt_tokens == 4
    assert chat.choices[0].message.content == tok.decode(
        echo_tokens(chat_prompt_ids(tok, messages)[-4:], 4)
    )
    for bad in (0, -2, 10**6):
        body = {"model": MODEL, "prompt": prompt, "truncate_prompt_tokens": bad}
        e = httpx.post(server.url + "/v1/completions", json=body)
        assert e.status_code == 400 and e.json()["error"]["param"] == "truncate_prompt_tokens"


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


def test_render_gives_the_prompt_tokens_a_request_would_run(server, tok):
    messages = [{"role": "user", "content": "Say something nice"}]
    r = httpx.post(server.url + "/v1/chat/completions/render", json={"messages": messages})
    assert r.status_code == 200 and r.json() == {"token_ids": chat_prompt_ids(tok, messages)}
    body = {"prompt": ["one two", "three"], "max_tokens": 2}
    r = httpx.post(server.url + "/v1/completions/render", json=body)
    assert r.json() == [{"token_ids": tok.encode("one two")}, {"token_ids": tok.encode("three")}]
    r = httpx.post(server.url + "/v1/chat/completions/render", json={"messages": []})
    assert r.status_code == 400 and "messages is empty" in r.json()["error"]["message"]


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
        info = [k for k in samples if k.startswith("vllm:cache_config_info{")]
        assert len(info) == 1 and 'block_size="' in info[0] and samples[info[0]] == 1
        assert samples[f"jinfer:kv_cache_pages_in_use{label}"] == 0  # all back when idle
        assert (
            samples[f"jinfer:kv_cache_pages_total{label}"]
            == s.state.async_engine.engine.blocks.num_usable_pages
        )
        assert samples["process_resident_memory_bytes"] > 2**20


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
        assert other.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        again = httpx.post(s.url + "/v1/completions", json={**body, "cache_salt": "tenant-a"})
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        hits = _metric(s, "vllm:prefix_cache_hits_total")
        assert 0 < hits < n_prompt and hits % 4 == 0  # whole pages, never the last token
        # The client sees its own hit in the usage (OpenAI's prompt_tokens_details), streamed too.
        assert again.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": hits}
        streamed = {**body, "cache_salt": "tenant-a", "stream": True}
        streamed["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=streamed) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": hits}
        # vLLM's /reset_prefix_cache: the next identical request starts cold.
        assert httpx.post(s.url + "/reset_prefix_cache").status_code == 200
        cold = httpx.post(s.url + "/v1/completions", json={**body, "cache_salt": "tenant-a"})
        assert cold.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert _metric(s, "vllm:prefix_cache_queries_total") == 5 * n_prompt
        assert _metric(s, "jinfer:prefix_cache_pages") > 0
        r = httpx.post(s.url + "/v1/completions", json={**body, "cache_salt": ""})
        assert r.status_code == 400 and "cache_salt" in r.json()["error"]["message"]


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
