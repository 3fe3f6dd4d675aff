"""xLAM's format, which SmolLM2-Instruct was trained on: the tools listed as JSON inside
`<tools>...</tools>` in the system prompt; the model answers with a JSON list of calls inside
`<tool_call>...</tool_call>` (or, as small models often do, the bare list or a ```json block);
results come back as `<tool_response>` user turns."""

from __future__ import annotations

import json
import re
from typing import Any

from jinfer.tool_parsers.base import Extracted, ToolParser, calls_from_json, functions

_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_FENCED = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.DOTALL)


class XLAMParser(ToolParser):
    name = "xlam"
    markers = ("<tool_call>", "```")
    at_start = ("[", "{")

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listed = json.dumps(functions(tools), ensure_ascii=False)
        return (
            "You are an expert in composing functions. You are given a question and a set of "
            "possible functions. Based on the question, make one or more function calls to "
            "achieve the purpose. If none of the functions can be used, say so and answer "
            "in plain text.\n"
            f"You have access to the following tools:\n<tools>{listed}</tools>\n"
            "To call functions, answer only with the calls in this format:\n"
            '<tool_call>[{"name": "func_name", "arguments": {"argument1": "value1"}}]'
            "</tool_call>"
        )

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        return f"<tool_call>{json.dumps(calls, ensure_ascii=False)}</tool_call>"

    def extract(self, text: str, tools: list[dict[str, Any]]) -> Extracted:
        for pattern in (_TAGGED, _FENCED):
            m = pattern.search(text)
            if m is not None:
                calls = _decode(m.group(1), tools)
                if calls:
                    return Extracted(text[: m.start()].strip() or None, calls)
        stripped = text.strip()
        if stripped[:1] in ("[", "{"):
            calls = _decode(stripped, tools)
            if calls:
                return Extracted(None, calls)
        return Extracted(text, [])


def _decode(payload: str, tools: list[dict[str, Any]]) -> list | None:
    try:
        return calls_from_json(json.loads(payload.strip()), tools)
    except ValueError:
        return None
