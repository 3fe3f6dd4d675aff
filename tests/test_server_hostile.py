"""What a hostile client sends costs it a 4xx that names the problem, and costs nobody else
anything: the engine keeps serving, other clients keep being answered, nothing is a 500."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from server_util import start

from jinfer.sampling_params import INT32_MAX


def _post(server, path: str, body: bytes | dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=60)


def _assert_serves(server) -> None:
    """The engine is alive and answers a normal request."""
    r = _post(server, "/v1/completions", {"prompt": "hello there", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"top_k": 2**40}, "top_k"),
        ({"top_k": INT32_MAX + 1}, "top_k"),
        ({"n": 2**40}, "n"),
        ({"seed": 2**70}, "seed"),
        ({"min_tokens": 2**40, "max_tokens": None}, "min_tokens"),
        ({"stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"logit_bias": {str(2**40): 1}}, "logit_bias"),
        ({"temperature": 1e300}, "temperature"),  # finite, but not as a float32
        ({"repetition_penalty": 1e-30}, "repetition_penalty"),
        ({"stop": ["x" * 5000]}, "stop"),
    ],
)
def test_a_value_past_its_consumers_range_is_a_400_and_the_engine_lives(server, fields, param):
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 4, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    _assert_serves(server)


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_a_400(server, token):
    body = b'{"prompt": "x", "max_tokens": 2, "temperature": ' + token + b"}"
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    _assert_serves(server)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', "prompt"),
        ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
        ("/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', "model"),
        ("/v1/completions", b'{"prompt": "x", "user": "\\ud800"}', "user"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
         "messages"),
        ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", b'{"prompt": "x", "\\ud800": 1}', None),  # a key, not a value
    ],
)  # fmt: skip
def test_text_that_is_not_unicode_is_a_400_wherever_it_comes(server, path, body, param):
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "not valid Unicode" in error["message"]
    if param is not None:
        assert error["param"] == param


def test_an_unknown_model_name_is_echoed_escaped(server):
    r = _post(server, "/v1/completions", {"prompt": "x", "model": 'gpt-4"\n<b>'})
    assert r.status_code == 404
    assert '"gpt-4\\"\\n<b>"' in r.json()["error"]["message"]


@pytest.mark.parametrize("depth", [40, 10_000])
def test_deeply_nested_json_is_a_400(server, depth):
    body = b'{"prompt": "x", "deep": ' + b"[" * depth + b"]" * depth + b"}"
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 400 and "nests deeper than" in r.json()["error"]["message"]
    _assert_serves(server)


@pytest.mark.parametrize("field", ["top_k", "temperature", "max_tokens"])
def test_an_integer_past_pythons_digit_limit_is_a_400(server, field):
    body = b'{"prompt": "x", "%s": %s}' % (field.encode(), b"9" * 5000)
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    _assert_serves(server)


def test_a_huge_prompt_is_refused_by_its_length_before_tokenizing(server, tok):
    limit = server.state.serving.max_model_len * tok.max_token_chars
    r = _post(server, "/v1/completions", {"prompt": "word " * (limit // 5 + 1000)})
    assert r.status_code == 400, r.text
    assert "characters" in r.json()["error"]["message"]  # the bound, not a token count
    long_chat = {"messages": [{"role": "user", "content": "x" * (limit + 1)}]}
    r = _post(server, "/v1/chat/completions", long_chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


class _RecordingTokenizer:
    """The real tokenizer, noting whether each encode ran on a thread with an event loop."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.on_loop: list[bool] = []

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def _note(self) -> None:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)

    def encode(self, *args, **kwargs):
        self._note()
        return self._tok.encode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self._note()
        return self._tok.apply_chat_template(*args, **kwargs)


def test_tokenizing_and_chat_templates_run_off_the_event_loop(tok):
    """CPU-heavy request work runs on a worker thread, so the event loop (every other client,
    /health) is never held up by one request's prompt."""
    recording = _RecordingTokenizer(tok)
    with start(recording) as s:
        s.wait_ready()
        assert _post(s, "/v1/completions", {"prompt": "a b c", "max_tokens": 2}).status_code == 200
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert _post(s, "/v1/chat/completions", chat).status_code == 200
        assert _post(s, "/tokenize", {"prompt": "a b c"}).status_code == 200
    assert len(recording.on_loop) >= 3 and not any(recording.on_loop)


def test_a_request_that_can_never_fit_is_a_400_not_a_429(tok):
    with start(tok, max_num_seqs=4) as s:
        s.wait_ready()
        capacity = 4 + s.state.config.max_waiting_requests
        r = _post(s, "/v1/completions", {"prompt": ["x"] * (capacity + 1), "max_tokens": 1})
        assert r.status_code == 400, r.text
        assert str(capacity) in r.json()["error"]["message"]
        r = _post(s, "/v1/completions", {"prompt": ["x"] * 3, "max_tokens": 1})
        assert r.status_code == 200


@pytest.mark.parametrize(
    "path, fields, param",
    [
        ("/v1/completions", {"stop": [str(i) for i in range(17)]}, "stop"),
        ("/v1/completions", {"logit_bias": {"5": 500}}, "logit_bias"),
        ("/v1/completions", {"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 5, "n": 0}, "n"),
        ("/v1/chat/completions", {"max_completion_tokens": 2, "min_tokens": 5}, "min_tokens"),
        ("/v1/chat/completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ],
)
def test_error_param_is_the_field_that_was_refused(server, path, fields, param):
    chat = {"messages": [{"role": "user", "content": "x"}]}
    base = chat if "chat" in path else {"prompt": "x"}
    r = _post(server, path, {**base, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
