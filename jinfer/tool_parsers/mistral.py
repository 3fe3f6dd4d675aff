"""Mistral's format: the calls as a JSON list of {"name", "arguments"} after `[TOOL_CALLS]`."""

from __future__ import annotations

import json
from typing import Any

from jinfer.tool_parsers.base import Extracted, ToolParser, calls_from_json, functions

TOOL_CALLS = "[TOOL_CALLS]"


class MistralParser(ToolParser):
    name = "mistral"
    markers = (TOOL_CALLS,)

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listed = json.dumps(
            [{"type": "function", "function": f} for f in functions(tools)], ensure_ascii=False
        )
        return (
            f"[AVAILABLE_TOOLS]{listed}[/AVAILABLE_TOOLS]\n"
            f'To call tools, answer with {TOOL_CALLS}[{{"name": ..., "arguments": {{...}}}}].'
        )

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        return TOOL_CALLS + json.dumps(calls, ensure_ascii=False)

    def format_result(self, content: str, name: str | None) -> str:
        return f"[TOOL_RESULTS]{content}[/TOOL_RESULTS]"

    def extract(self, text: str, tools: list[dict[str, Any]]) -> Extracted:
        i = text.find(TOOL_CALLS)
        if i < 0:
            return Extracted(text, [])
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[i + len(TOOL_CALLS) :].strip())
        except ValueError:
            return Extracted(text, [])
        calls = calls_from_json(obj, tools)
        if calls is None:
            return Extracted(text, [])
        return Extracted(text[:i].strip() or None, calls)
