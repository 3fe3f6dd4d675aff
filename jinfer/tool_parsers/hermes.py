"""Hermes' format (NousResearch; Qwen 2.5 and many fine-tunes): the tools inside `<tools>` in the
system prompt; each call a JSON object {"name", "arguments"} in its own `<tool_call>` tags."""

from __future__ import annotations

import json
import re
from typing import Any

from jinfer.tool_parsers.base import Extracted, ToolParser, calls_from_json, functions

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listed = "\n".join(
            json.dumps({"type": "function", "function": f}) for f in functions(tools)
        )
        return (
            "You are a function calling AI model. You are provided with function signatures "
            f"within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n"
            "For each function call, return a JSON object with the function name and arguments "
            "within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        return "\n".join(
            f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls
        )

    def extract(self, text: str, tools: list[dict[str, Any]]) -> Extracted:
        blocks = list(_CALL.finditer(text))
        if not blocks:
            return Extracted(text, [])
        calls = []
        for m in blocks:
            try:
                found = calls_from_json(json.loads(m.group(1).strip()), tools)
            except ValueError:
                found = None
            if found is None:
                return Extracted(text, [])
            calls += found
        return Extracted(text[: blocks[0].start()].strip() or None, calls)
