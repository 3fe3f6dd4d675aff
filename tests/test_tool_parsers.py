"""Tool-call formats: each parser reads back the calls its own format writes, finds them among
content the way models write them, refuses calls the request did not offer, never evaluates
what it reads, and streams only text that cannot be the start of a call; tool_choice's schemas
make required and named calls parse even from random logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jinfer import tool_parsers
from jinfer.sampling_params import ParamError
from jinfer.structured import bitmask
from jinfer.structured.grammar import GrammarCompiler
from jinfer.tokenizer.chat_template import GEMMA_CHAT_TEMPLATE
from jinfer.tool_parsers import choice, prompt

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 0, "maximum": 14},
        },
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}},
    {"name": "get_time", "arguments": {}},
]


def _called(extracted) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in extracted.tool_calls]


@pytest.mark.parametrize("name", sorted(tool_parsers.TOOL_PARSERS))
def test_each_format_reads_back_the_calls_it_writes(name):
    parser = tool_parsers.get(name)
    text = parser.format_calls(CALLS)
    extracted = parser.extract(text, TOOLS)
    assert _called(extracted) == [(c["name"], c["arguments"]) for c in CALLS]
    assert extracted.content is None
    assert all(c.id.startswith("call_") for c in extracted.tool_calls)
    assert len({c.id for c in extracted.tool_calls}) == 2


@pytest.mark.parametrize("name", sorted(tool_parsers.TOOL_PARSERS))
def test_plain_text_and_calls_to_unknown_tools_are_content(name):
    parser = tool_parsers.get(name)
    assert parser.extract("It is sunny in Paris.", TOOLS).tool_calls == []
    unknown = parser.format_calls([{"name": "rm_rf", "arguments": {"path": "/"}}])
    assert parser.extract(unknown, TOOLS) == tool_parsers.Extracted(unknown, [])


@pytest.mark.parametrize(
    ("name", "text", "content"),
    [
        ("xlam", 'Sure.\n<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>', "Sure."),
        ("xlam", '```json\n[{"name": "get_time", "arguments": {}}]\n```', None),
        ("xlam", '[{"name": "get_time", "arguments": {}}]', None),
        ("hermes", 'Let me see <tool_call>\n{"name": "get_time", "arguments": {}}', "Let me see"),
        ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}', None),
        ("mistral", 'ok [TOOL_CALLS] [{"name": "get_time", "arguments": "{}"}]', "ok"),
        ("pythonic", "[get_time()] and then some text", "and then some text"),
    ],
)  # fmt: skip
def test_calls_are_found_where_models_write_them(name, text, content):
    extracted = tool_parsers.get(name).extract(text, TOOLS)
    assert _called(extracted) == [("get_time", {})] and extracted.content == content


def test_pythonic_reads_literals_and_never_evaluates():
    parser = tool_parsers.get("pythonic")
    ok = parser.extract('[get_weather(city="Nice", days=3)]', TOOLS)
    assert _called(ok) == [("get_weather", {"city": "Nice", "days": 3})]
    lists = parser.extract('[get_time(a=[1, {"b": true, "c": null}])]', TOOLS)
    assert _called(lists) == [("get_time", {"a": [1, {"b": True, "c": None}]})]
    for hostile in (
        '[get_weather(city=__import__("os").system("true"))]',
        "[get_weather(city=open('/etc/passwd').read())]",
        '[get_weather("positional")]',
        "[" * 5000 + "]" * 5000,
    ):
        assert parser.extract(hostile, TOOLS).tool_calls == []


def test_arguments_must_be_a_json_object():
    for args in ('"a string"', "[1, 2]", "{not json"):
        text = f'<tool_call>[{{"name": "get_time", "arguments": {args}}}]</tool_call>'
        assert tool_parsers.get("xlam").extract(text, TOOLS).tool_calls == []


@pytest.mark.parametrize(
    ("name", "text", "streamable"),
    [
        ("xlam", "The weather is", "The weather is"),
        ("xlam", "Checking <tool_c", "Checking "),
        ("xlam", "  [", ""),
        ("hermes", "ok <tool_call>{", "ok "),
        ("pythonic", "[get_", ""),
        ("pythonic", "Paris is [nice]", "Paris is [nice]"),
        ("llama3_json", "", ""),
        ("mistral", "hi [TOOL", "hi "),
    ],
)
def test_streaming_holds_back_what_could_start_a_call(name, text, streamable):
    assert tool_parsers.get(name).content_prefix(text) == streamable


def test_tool_results_render_in_templates_that_need_alternating_roles(smollm2_tokenizer):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "1", "content": '{"temp_c": 18}'},
        {"role": "tool", "tool_call_id": "2", "content": "10:00"},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ]  # fmt: skip
    messages, extra = prompt.render(
        history, TOOLS, tool_parsers.get("pythonic"), GEMMA_CHAT_TEMPLATE
    )
    assert extra == {} and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    text = smollm2_tokenizer.apply_chat_template(messages, chat_template=GEMMA_CHAT_TEMPLATE)
    assert "[get_weather(city='Paris'), get_time()]" in text
    assert '```tool_output\n{"temp_c": 18}\n```\n```tool_output\n10:00\n```\n\nThanks.' in text
    assert "get_weather" in messages[0]["content"] and messages[0]["content"].startswith(
        "Be brief."
    )


def test_a_template_that_knows_tools_gets_them_itself():
    template = "{% for t in tools %}{{ t.function.name }}{% endfor %}"
    call = {"id": "1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    history = [{"role": "assistant", "content": "", "tool_calls": [call]}]
    messages, extra = prompt.render(history, TOOLS, tool_parsers.get("xlam"), template)
    assert extra == {"tools": TOOLS}
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == {}  # as HF templates expect


def test_tool_choice_resolves_and_names_what_is_wrong():
    assert choice.resolve(None, TOOLS) == "auto" and choice.resolve(None, None) == "none"
    named = {"type": "function", "function": {"name": "get_time"}}
    assert choice.resolve(named, TOOLS) == "function:get_time"
    for bad, message in [
        ({"type": "function", "function": {"name": "nope"}}, "not in tools"),
        ({"type": "tool"}, "must be"),
        ("always", "unknown tool_choice"),
    ]:
        with pytest.raises(ParamError, match=message):
            choice.resolve(bad, TOOLS)
    with pytest.raises(ParamError, match="needs tools"):
        choice.resolve("required", None)


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    c = GrammarCompiler(smollm2_tokenizer)
    yield c
    c.close()


@pytest.mark.parametrize("mode", ["required", "function:get_weather"])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_and_named_calls_parse_from_random_logits(compiler, mode, parallel):
    tok = compiler.tokenizer
    so = choice.constraint(mode, TOOLS, parallel)
    so = type(so)(json=so.json, disable_any_whitespace=True)
    filler, mask = bitmask.MaskFiller(), bitmask.allocate(1, tok.vocab_size)
    for seed in range(3):
        matcher, rng, out = compiler.compile(so).matcher(), np.random.default_rng(seed), []
        for _ in range(300):
            filler.fill(mask, [(matcher, 0)])
            logits = rng.standard_normal((1, tok.vocab_size)).astype(np.float32) * 4
            token = int(np.asarray(bitmask.apply_bitmask(logits, mask))[0].argmax())
            assert matcher.consume_token(token)
            if token in tok.stop_token_ids():
                break
            out.append(token)
            if matcher.is_stopped():
                break
        calls = choice.constrained_calls(mode, tok.decode(out), TOOLS)
        assert calls, tok.decode(out)
        if mode.startswith("function:"):
            assert [c.name for c in calls] == ["get_weather"]
            assert set(json.loads(calls[0].arguments)) <= {"city", "days"}
        elif not parallel:
            assert len(calls) == 1
