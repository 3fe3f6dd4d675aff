"""Fuzzing the server with request bodies built from its own schema and hostile values: type
swaps, extreme and non-finite numbers, huge and nested containers, text that is not Unicode.
Every answer is a 4xx naming the problem or a correct 200, never a 5xx, and the engine serves a
normal request afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_util import LiveServer

from jinfer.server import protocol as P
from jinfer.server.app import ServerConfig, create_app

ENDPOINTS = {
    "/v1/completions": P.CompletionRequest,
    "/v1/chat/completions": P.ChatCompletionRequest,
    "/tokenize": P.TokenizeRequest,
}

# Values that broke servers before, or would: past int32 and int64, non-finite and past float32,
# not Unicode, empty, huge, deep.
EXTREMES = st.sampled_from(
    [2**31, 2**40, -(2**40), 2**63, 2**70, float("nan"), float("inf"), -float("inf"), 1e300,
     -1e300, 1e-300, "\ud800", "a\udfffb", "", "x" * 20_000, [], {}, None, True, [[[[]]]],
     ["\ud800"], {"\ud800": 1}, [2**40]]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**31 - 1, 2**31, -(2**31) - 1, 2**63, 2**64, -1, 0, 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, -1e300, 1e-300, 3.5e38, 1e-6]),
    st.text(max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "", "x" * 20_000, "<|im_start|>", "{{ 7*7 }}"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "nobody"]),
         "content": VALUES}
    ),
    max_size=3,
)  # fmt: skip


# Hostile values of each JSON type: what passes the schema's type check and has to be held to
# its range further in.
OF_TYPE = {
    "integer": st.one_of(
        st.sampled_from([2**31 - 1, 2**31, -(2**31) - 1, 2**40, 2**63, 2**64, 2**70, -1, 0]),
        st.integers(min_value=-(2**70), max_value=2**70),
    ),
    "number": st.one_of(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -1e300, 1e-300, 3.5e38]),
        st.floats(allow_nan=True, allow_infinity=True),
    ),
    "string": st.one_of(
        st.sampled_from(["\ud800", "a\udfffb", "", "x" * 20_000, "<|im_start|>", "{{ 7*7 }}"]),
        st.text(max_size=40),
    ),
    "boolean": st.booleans(),
    "null": st.none(),
}


def _types(prop: dict) -> list[str]:
    """The JSON types a schema property takes (its anyOf alternatives' too)."""
    if "anyOf" in prop:
        return [t for alt in prop["anyOf"] for t in _types(alt)]
    kind = prop.get("type")
    return [kind] if isinstance(kind, str) else ["object"]


def _hostile_of(prop: dict) -> st.SearchStrategy:
    """Mostly a hostile value of a type the field takes, sometimes anything at all."""
    typed = []
    for kind in _types(prop):
        if kind in OF_TYPE:
            typed.append(OF_TYPE[kind])
        elif kind == "array":
            typed.append(st.lists(st.one_of(*OF_TYPE.values()), max_size=130))
        else:
            typed.append(
                st.dictionaries(st.one_of(OF_TYPE["string"], st.just("5")), VALUES, max_size=4)
            )
    return st.one_of(*typed, *typed, *typed, EXTREMES, VALUES)


VALID = {
    "/v1/completions": {"prompt": "The capital of France is", "max_tokens": 4},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4},
    "/tokenize": {"prompt": "The capital of France is"},
}


@st.composite
def bodies(draw) -> tuple[str, bytes]:
    """A valid body with one to three of its schema's fields set to hostile values (or, now
    and then, a whole hostile prompt or message list)."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    body = dict(VALID[path])
    if draw(st.integers(0, 5)) == 0:
        body["messages" if "chat" in path else "prompt"] = draw(
            MESSAGES if "chat" in path else VALUES
        )
    own = sorted(ENDPOINTS[path].model_json_schema()["properties"])
    fields = st.one_of(
        st.sampled_from(own), st.sampled_from(own), st.sampled_from(sorted(P.UNSUPPORTED))
    )
    hostile = st.one_of(EXTREMES, EXTREMES, SCALARS, VALUES)
    body.update(draw(st.dictionaries(fields, hostile, min_size=1, max_size=3)))
    return path, json.dumps(body, allow_nan=True).encode()  # NaN, Infinity, "\ud800" as sent


@pytest.fixture(scope="module")
def fuzz_server(tok, make_tiny_llm):
    """The server over a real engine (a tiny random-weight model): the sampler's batch packing,
    the runner and the kernels all see what the fuzzer sends."""
    llm = make_tiny_llm(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)
    with LiveServer(create_app(ServerConfig("tiny"), lambda: (llm.engine, tok))) as s:
        s.wait_ready()
        s.engine = llm.engine
        yield s


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=bodies())
def test_hostile_bodies_get_a_4xx_or_a_correct_200_never_a_5xx(fuzz_server, request):
    path, content = request
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as client:
        with client.stream("POST", path, content=content) as r:
            raw = r.read().decode("utf-8")
    assert r.status_code < 500, (path, content[:300], raw[:300])
    if r.status_code >= 400:
        assert isinstance(json.loads(raw)["error"]["message"], str)
    elif raw.startswith("data:"):  # a stream: chunks, then [DONE]
        assert raw.rstrip().endswith("data: [DONE]"), raw[-200:]
    elif path == "/tokenize":
        assert isinstance(json.loads(raw)["tokens"], list)
    else:
        assert json.loads(raw)["choices"]


def test_the_engine_serves_after_the_fuzzing(fuzz_server):
    r = httpx.post(fuzz_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert httpx.get(fuzz_server.url + "/health").status_code == 200
    engine = fuzz_server.engine
    engine.check_invariants()
