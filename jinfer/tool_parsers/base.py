"""What every tool-call format shares: the calls a model wrote, and a format's three faces --
the prompt that lists the tools, how a call and a tool's result read in the history, and how
calls are found in what the model wrote (`extract`).

A parser never trusts the text: a call whose name is not among the request's tools, or whose
arguments are not a JSON object, makes the whole output plain content (`extract` returns no
calls), so a client never receives a call it did not offer.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, ClassVar


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)
    id: str = dataclasses.field(default_factory=call_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclasses.dataclass(frozen=True)
class Extracted:
    """An output split into the content around its calls and the calls."""

    content: str | None
    tool_calls: list[ToolCall]


def functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI `tools` entries (name, description, parameters)."""
    return [t["function"] for t in tools]


def make_call(name: Any, arguments: Any, tools: list[dict[str, Any]]) -> ToolCall | None:
    """A call to one of `tools`, or None if the name is not theirs or the arguments are not a
    JSON object (given as one, or as its text)."""
    if not isinstance(name, str) or name not in {f["name"] for f in functions(tools)}:
        return None
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def calls_from_json(items: Any, tools: list[dict[str, Any]], key: str = "arguments") -> list | None:
    """Calls from decoded JSON: an object {"name", key} or a list of them; None if any item is
    not a call to one of `tools` (the text is then content, not calls)."""
    items = items if isinstance(items, list) else [items]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        call = make_call(item.get("name"), item.get(key, item.get("parameters")), tools)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def argument_text(arguments: Any) -> Any:
    """A history call's arguments as an object (clients send them as JSON text)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


class ToolParser:
    """One tool-call format. Subclasses set `name` and `markers` and implement the rest."""

    name: ClassVar[str]
    # Text that starts a call in this format: while streaming, content is sent only up to the
    # first place one could begin; `at_start` markers count only at the output's start.
    markers: ClassVar[tuple[str, ...]] = ()
    at_start: ClassVar[tuple[str, ...]] = ()

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        """The instructions listing `tools`, for a chat template that has no tools of its own."""
        raise NotImplementedError

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        """An assistant turn's calls ({"name", "arguments"} each) as the model writes them."""
        raise NotImplementedError

    def format_result(self, content: str, name: str | None) -> str:
        """A tool's result as the next user turn shows it."""
        return f"<tool_response>\n{content}\n</tool_response>"

    def extract(self, text: str, tools: list[dict[str, Any]]) -> Extracted:
        """The calls in a finished output, and the content around them."""
        raise NotImplementedError

    def content_prefix(self, text: str) -> str:
        """The longest prefix of `text` that is content whatever follows: it stops where a call
        could begin (a marker, or the start of one at the end of the text)."""
        stripped = text.lstrip()
        for m in self.at_start:
            if stripped.startswith(m) or (m.startswith(stripped) and len(stripped) < len(m)):
                return ""
        cut = len(text)
        for m in self.markers:
            i = text.find(m)
            if i >= 0:
                cut = min(cut, i)
            for k in range(min(len(m) - 1, len(text)), 0, -1):  # a marker's start at the end
                if text.endswith(m[:k]):
                    cut = min(cut, len(text) - k)
                    break
        return text[:cut]
