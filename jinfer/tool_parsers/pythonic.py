"""The pythonic format (Llama 3.2 / 4, and Gemma 3 with a tools prompt): the answer is a Python
list of calls with keyword arguments, `[get_weather(city="Paris"), get_time()]`, read with the
`ast` module (literals only: nothing is ever evaluated); results come back as ```tool_output
blocks."""

from __future__ import annotations

import ast
import json
from typing import Any

from jinfer.tool_parsers.base import Extracted, ToolParser, functions, make_call

_JSON_NAMES = {"true": True, "false": False, "null": None}


class PythonicParser(ToolParser):
    name = "pythonic"
    at_start = ("[",)

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listed = json.dumps(functions(tools), ensure_ascii=False, indent=2)
        return (
            "You have access to functions. If you decide to invoke any of them, answer only "
            "with a Python list of calls, with keyword arguments and no other text:\n"
            "[func_name1(param_name1=value1, param_name2=value2), func_name2(param=value)]\n"
            f"The functions you can call:\n{listed}"
        )

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        def call(c: dict[str, Any]) -> str:
            args = c["arguments"] if isinstance(c["arguments"], dict) else {}
            return f"{c['name']}({', '.join(f'{k}={v!r}' for k, v in args.items())})"

        return "[" + ", ".join(call(c) for c in calls) + "]"

    def format_result(self, content: str, name: str | None) -> str:
        return f"```tool_output\n{content}\n```"

    def extract(self, text: str, tools: list[dict[str, Any]]) -> Extracted:
        """Calls from the list the output starts with; text after the list (a small model
        may not end its turn there) is content."""
        stripped = text.strip()
        if not stripped.startswith("["):
            return Extracted(text, [])
        for end in _list_ends(stripped):
            try:
                tree = ast.parse(stripped[:end], mode="eval").body
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
            calls = _calls(tree, tools)
            if calls is None:
                return Extracted(text, [])
            return Extracted(stripped[end:].strip() or None, calls)
        return Extracted(text, [])


def _list_ends(text: str, limit: int = 64) -> list[int]:
    """Where the leading list may end: after each "]" (the first `limit`), shortest first."""
    ends, i = [], text.find("]")
    while i >= 0 and len(ends) < limit:
        ends.append(i + 1)
        i = text.find("]", i + 1)
    return ends


def _calls(tree: ast.AST, tools: list[dict[str, Any]]) -> list | None:
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            args = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
        except ValueError:
            return None
        call = make_call(node.func.id, args, tools)
        if call is None:
            return None
        calls.append(call)
    return calls


def _literal(node: ast.AST) -> Any:
    """A literal's value (JSON's true/false/null read too); ValueError for anything else."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a literal")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise ValueError("not a literal") from None
