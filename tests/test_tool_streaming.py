"""Streamed tool calls, fed an output a character at a time as the engine grows it: content
goes out only up to where a call begins, each call's id and name come before its arguments,
JSON calls stream as they are written, and what the deltas add up to is what the finished
choice holds."""

from __future__ import annotations

import json

import pytest

from jinfer import tool_parsers
from jinfer.server.tool_calls import ToolCalling

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
CALLS = [
    {"name": "get_weather", "arguments": {"city": 'Pa"ris {x}', "days": [1, 2]}},
    {"name": "get_time", "arguments": {}},
]


def _replay(mode: str, parser: str, text: str, finish: str = "stop"):
    """(content sent, calls as the deltas add up, finish reason, argument fragments)."""
    stream = ToolCalling(mode, TOOLS, tool_parsers.get(parser)).stream()
    content, calls, fragments, reason = "", {}, 0, None
    for k in range(len(text) + 1):
        done = k == len(text)
        sent, deltas, finish_now = stream.step(text[:k], text[:k], done, finish if done else None)
        assert sent.startswith(content) or done, (content, sent)
        content = sent if len(sent) >= len(content) else content
        for d in deltas:
            entry = calls.setdefault(d["index"], {"name": None, "arguments": ""})
            if "id" in d:
                assert entry["name"] is None and not entry["arguments"]  # name first
                entry["name"] = d["function"]["name"]
            fragments += bool(d["function"]["arguments"])
            entry["arguments"] += d["function"]["arguments"]
        reason = finish_now if done else reason
    got = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    if reason == "tool_calls":  # complete: the arguments parse
        got = [(name, json.loads(args)) for name, args in got]
    return content, got, reason, fragments


EXPECTED = [(c["name"], c["arguments"]) for c in CALLS]


@pytest.mark.parametrize("parser", ["xlam", "hermes", "mistral", "llama3_json"])
def test_json_calls_stream_as_they_are_written_after_the_content(parser):
    p = tool_parsers.get(parser)
    prefix = "" if parser == "llama3_json" else "Let me look that up. "
    content, got, reason, fragments = _replay("auto", parser, prefix + p.format_calls(CALLS))
    assert got == EXPECTED and reason == "tool_calls"
    assert content.strip() == prefix.strip()
    assert fragments > 2 * len(CALLS)  # many pieces, not one per call at the end


def test_pythonic_calls_arrive_when_the_choice_ends():
    text = tool_parsers.get("pythonic").format_calls(CALLS)
    content, got, reason, _ = _replay("auto", "pythonic", text)
    assert got == EXPECTED and reason == "tool_calls" and content == ""


def test_text_that_is_no_call_is_all_content_in_the_end():
    for text in ("It is sunny.", '[{"name": "rm", "arguments": {}}]', "Use <tool_call> tags"):
        content, got, reason, _ = _replay("auto", "xlam", text)
        assert content == text and got == [] and reason is None


@pytest.mark.parametrize("mode", ["required", "function:get_weather"])
def test_constrained_calls_stream_as_they_grow(mode):
    if mode == "required":
        text = json.dumps([{"name": c["name"], "parameters": c["arguments"]} for c in CALLS])
        expected = EXPECTED
    else:
        text, expected = json.dumps(CALLS[0]["arguments"]), EXPECTED[:1]
    content, got, reason, fragments = _replay(mode, "xlam", text)
    assert got == expected and reason == "tool_calls" and content == ""
    assert fragments > len(expected)


def test_a_call_cut_short_is_not_finished_as_a_call():
    text = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Par'
    _, got, reason, _ = _replay("auto", "xlam", text, finish="length")
    assert reason is None  # the choice's own finish reason ("length") stands
    assert got == [("get_weather", '{"city": "Par')]  # what was streamed, no more


def test_tool_choice_none_streams_plain_text():
    text = tool_parsers.get("xlam").format_calls(CALLS)
    content, got, reason, _ = _replay("none", "xlam", text)
    assert content == text and got == [] and reason is None
