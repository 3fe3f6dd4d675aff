"""Llama 3.1-3.3's JSON format: the model answers with {"name", "parameters"} objects (after an
optional `<|python_tag|>`, several separated by `;`), and nothing else."""

from __future__ import annotations

import json
from typing import Any

from jinfer.tool_parsers.base import Extracted, ToolParser, calls_from_json, functions

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    at_start = ("{", PYTHON_TAG)

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listed = "\n\n".join(json.dumps(f, ensure_ascii=False, indent=2) for f in functions(tools))
        return (
            "Given the following functions, please respond with a JSON for a function call with "
            "its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument '
            "name and its value}. Do not use variables.\n\n" + listed
        )

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        return "; ".join(
            json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False)
            for c in calls
        )

    def format_result(self, content: str, name: str | None) -> str:
        return content

    def extract(self, text: str, tools: list[dict[str, Any]]) -> Extracted:
        rest = text.strip().removeprefix(PYTHON_TAG).strip()
        if not rest.startswith("{"):
            return Extracted(text, [])
        decoder = json.JSONDecoder()
        calls = []
        while rest:
            try:
                obj, end = decoder.raw_decode(rest)
            except ValueError:
                return Extracted(text, [])
            found = calls_from_json(obj, tools, key="parameters")
            if found is None:
                return Extracted(text, [])
            calls += found
            rest = rest[end:].strip().removeprefix(";").strip()
        return Extracted(None, calls)
