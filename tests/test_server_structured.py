"""Structured output through the API as agents use it: `python -m jinfer.serve` serving the real
SmolLM2, driven by the official `openai` client (response_format, `parse()`, vLLM's
structured_outputs and guided_* fields, streaming), with answers checked against their
constraint; a request cut short says so and is never parsed."""

from __future__ import annotations

import json
import re

import openai
import pydantic
import pytest
from server_util import serve_real_model

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Describe a user named Ann, aged 31, who is an admin, as JSON."}]


class User(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int
    admin: bool
    role: str = pydantic.Field(json_schema_extra={"enum": ["dev", "ops", "pm"]})


@pytest.fixture(scope="module")
def server():  # (conftest's `client` talks to it)
    yield from serve_real_model()


def test_chat_json_schema_answer_validates(client):
    schema = User.model_json_schema()
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        temperature=0,
        max_tokens=200,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "user", "schema": schema, "strict": True},
        },
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    user = User.model_validate_json(choice.message.content)
    assert user.role in ("dev", "ops", "pm")


def test_parse_with_a_pydantic_model_returns_the_model(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, temperature=0.7, seed=11, max_tokens=200, response_format=User
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, User) and parsed.role in ("dev", "ops", "pm")


def test_a_constrained_answer_cut_by_max_tokens_says_length_and_is_not_parsed(client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model=MODEL, messages=ASK, temperature=0, max_tokens=5, response_format=User
        )


def test_json_object_answer_parses(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        temperature=0,
        max_tokens=300,
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a small model may write an endless object; what it wrote is a JSON prefix
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_completion_regex_choice_and_grammar(client):
    prompt = "Call me at "
    cases = [
        ({"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}},
         lambda t: re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", t)),
        ({"guided_choice": ["home", "office", "no"]}, lambda t: t in ("home", "office", "no")),
        ({"structured_outputs": {"grammar": 'start: "ext " D D D\nD: /[0-9]/'}},
         lambda t: re.fullmatch(r"ext \d{3}", t)),
    ]  # fmt: skip
    for extra, ok in cases:
        r = client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=40, extra_body=extra
        )
        text = r.choices[0].text
        assert ok(text) and r.choices[0].finish_reason == "stop", (extra, text)


def test_streamed_constrained_chat_equals_collected(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "u", "schema": User.model_json_schema()}}
    kwargs = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=200, response_format=fmt)
    collected = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == collected
    User.model_validate_json(streamed)


def test_concurrent_constrained_and_free_requests(client):
    import concurrent.futures

    def constrained(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=200,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "u", "schema": User.model_json_schema()}},
        )  # fmt: skip
        return r.choices[0].message.content

    def free(seed: int) -> str:
        r = client.completions.create(
            model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=24, seed=seed
        )
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(constrained, s) for s in range(4)] + [
            pool.submit(free, s) for s in range(4)
        ]
        results = [j.result() for j in jobs]
    for text in results[:4]:
        User.model_validate_json(text)
    assert len(set(results[4:])) == 1  # greedy free requests beside them agree with each other
    alone = client.completions.create(
        model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=24
    )
    assert alone.choices[0].text == results[4]


def test_an_invalid_schema_is_a_400_naming_response_format(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "required": 3}},
            },
        )
    assert e.value.body["param"] == "response_format"
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


# ------------------------------------------------------------------ tool calling
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "the city", "maxLength": 30}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Get the local time in a time zone",
        "parameters": {"type": "object", "properties": {
            "timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"]}}},
]  # fmt: skip
WEATHER_Q = [{"role": "user", "content": "What is the weather like in Paris?"}]


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_required_tool_choice_always_calls_an_offered_tool(client):
    for parallel in (True, False):
        r = client.chat.completions.create(
            model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice="required",
            parallel_tool_calls=parallel, temperature=0, max_tokens=120,
        )  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = _calls(choice.message)
        assert calls and all(name in ("get_weather", "get_time") for name, _ in calls)
        assert parallel or len(calls) == 1
        assert all(
            c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls
        )
    assert calls[0] == ("get_weather", {"city": "Paris"})


def test_named_tool_choice_calls_that_tool_with_its_parameters(client):
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER_Q, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls"
    [(name, args)] = _calls(r.choices[0].message)
    assert name == "get_time" and set(args) == {"timezone"}


def test_auto_tool_choice_falls_back_to_content_when_the_model_answers(client):
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER_Q, tools=TOOLS, temperature=0, max_tokens=40
    )
    message = r.choices[0].message  # SmolLM2-135M answers in prose (its 1.7B sibling calls)
    assert message.tool_calls is None and message.content
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_streamed_tool_calls_arrive_as_deltas_that_add_up(client, tool_choice):
    kwargs = dict(model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice=tool_choice,
                  temperature=0, max_tokens=120)  # fmt: skip
    collected = client.chat.completions.create(**kwargs).choices[0].message
    calls: dict[int, dict] = {}
    finish, content, fragments = None, "", 0
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
                if d.id:
                    assert not entry["arguments"], "the name comes before the arguments"
                    entry["id"], entry["name"] = d.id, d.function.name
                fragments += bool(d.function.arguments)
                entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and content == ""
    streamed = [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
    assert streamed == _calls(collected)
    assert fragments > len(calls)  # the arguments came as they were written, not at the end


def test_a_tool_result_turn_is_rendered_and_answered(client, server):
    history = WEATHER_Q + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18, "sky": "cloudy"}'},
    ]  # fmt: skip
    r = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=30
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    import httpx

    ids = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": TOOLS}).json()[
        "tokens"
    ]
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert (
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>' in text
    )
    assert '<tool_response>\n{"temp_c": 18, "sky": "cloudy"}\n</tool_response>' in text
    assert "<tools>" in text and "get_time" in text


def test_a_tool_call_cut_by_max_tokens_says_length_and_has_no_calls(client):
    r = client.chat.completions.create(
        model=MODEL, messages=WEATHER_Q, tools=TOOLS, tool_choice="required", temperature=0,
        max_tokens=4,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
