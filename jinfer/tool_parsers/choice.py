"""`tool_choice`, as OpenAI defines it: "none" (no calls), "auto" (the model decides; its output
is parsed), "required" (at least one call), or a named function (exactly that call). The last
two are constrained, by a JSON schema built from the tools' parameters, so the answer always
parses (as vLLM does): "required" writes a JSON list of {"name", "parameters"} (one item when
`parallel_tool_calls` is false), a named choice writes the arguments object itself. A
parameters object that does not say `additionalProperties` is closed: a call holds the arguments
its tool declares."""

from __future__ import annotations

import json
from typing import Any

from jinfer.sampling_params import ParamError, StructuredOutputsParams
from jinfer.tool_parsers.base import ToolCall, calls_from_json, functions, make_call


def resolve(tool_choice: Any, tools: list[dict[str, Any]] | None) -> str:
    """ "none", "auto", "required", or the named function's name; ParamError("tool_choice")."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ParamError(
                "tool_choice",
                'tool_choice must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}',
            )
        if name not in {f["name"] for f in functions(tools or [])}:
            raise ParamError(
                "tool_choice", f"tool_choice names {name[:64]!r}, which is not in tools"
            )
        return f"function:{name}"
    if tool_choice not in ("none", "auto", "required"):
        raise ParamError("tool_choice", f"unknown tool_choice {str(tool_choice)[:40]!r}")
    if tool_choice != "none" and not tools:
        raise ParamError("tool_choice", f"tool_choice {tool_choice!r} needs tools")
    return tool_choice


def named(mode: str) -> str | None:
    return mode.removeprefix("function:") if mode.startswith("function:") else None


def constraint(
    mode: str, tools: list[dict[str, Any]], parallel: bool
) -> StructuredOutputsParams | None:
    """The schema that "required" and named choices decode under; None for "none" / "auto"."""
    by_name = {f["name"]: f for f in functions(tools)}
    name = named(mode)
    if name is not None:
        return StructuredOutputsParams(json=_parameters(by_name[name]))
    if mode != "required":
        return None
    items = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": n}, "parameters": _parameters(f)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for n, f in by_name.items()
        ]
    }
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def constrained_calls(mode: str, text: str, tools: list[dict[str, Any]]) -> list[ToolCall] | None:
    """The calls a "required" or named answer holds (None if it does not parse: cut short)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    name = named(mode)
    if name is not None:
        call = make_call(name, obj, tools)
        return None if call is None else [call]
    return calls_from_json(obj, tools, key="parameters")


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters schema, closed where it does not say otherwise: a call holds
    the arguments its tool declares (left open, small models invent properties until
    max_tokens)."""
    schema = dict(function.get("parameters") or {"type": "object", "properties": {}})
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema
