"""Tool calls in chat responses: what a request's tool settings make of a finished choice, and
what of its text may be streamed while a call could still be coming.

Only a choice that ended by itself (`finish_reason` "stop") is read for calls; one cut by
`max_tokens` is returned as the text it is, never as a call (a constrained call is complete
only at its grammar's end). A choice with calls says `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jinfer.tool_parsers import Extracted, ToolParser, choice
from jinfer.tool_parsers.base import call_id


@dataclasses.dataclass
class ToolCalling:
    mode: str  # "none" | "auto" | "required" | "function:NAME" (`tool_parsers.choice`)
    tools: list[dict[str, Any]]
    parser: ToolParser

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def constrained(self) -> bool:
        """A required or named choice: calls stream as they are written (`CallStream`)."""
        return self.mode == "required" or choice.named(self.mode) is not None

    def extract(self, text: str, finish_reason: str | None) -> Extracted:
        """The calls of a finished choice, and its content; no calls unless it stopped."""
        if not self.active or finish_reason != "stop":
            return Extracted(text, [])
        if self.mode == "auto":
            return self.parser.extract(text, self.tools)
        calls = choice.constrained_calls(self.mode, text, self.tools)
        return Extracted(None, calls) if calls else Extracted(text, [])

    def streamable(self, text: str) -> str:
        """The part of an unfinished choice's text that is content whatever comes next."""
        if not self.active:
            return text
        return self.parser.content_prefix(text) if self.mode == "auto" else ""

    @staticmethod
    def deltas(extracted: Extracted) -> list[list[dict[str, Any]]]:
        """OpenAI's streamed tool calls: per call, its id and name first, then its arguments
        (one `tool_calls` list per chunk)."""
        out = []
        for i, call in enumerate(extracted.tool_calls):
            head = {"name": call.name, "arguments": ""}
            out.append([{"index": i, "id": call.id, "type": "function", "function": head}])
            out.append([{"index": i, "function": {"arguments": call.arguments}}])
        return out


class CallStream:
    """One streamed choice of a required or named tool choice: its calls' deltas as the
    constrained JSON grows (named: the text is the arguments object; required: a list of
    {"name", "parameters"}), each call's id and name first, then its arguments as they come."""

    def __init__(self, mode: str) -> None:
        self.name = choice.named(mode)  # None: "required"
        self.ids: list[str] = []
        self.sent: list[int] = []  # per call: argument characters sent

    def advance(self, text: str) -> list[dict[str, Any]]:
        """The `tool_calls` delta entries `text` adds to what was sent."""
        calls = [(self.name, 0)] if self.name is not None else _scan_required(text)
        out = []
        for i, (name, start) in enumerate(calls):
            if name is None:
                break
            if i == len(self.ids):
                self.ids.append(call_id())
                self.sent.append(0)
                head = {"name": name, "arguments": ""}
                out.append({"index": i, "id": self.ids[i], "type": "function", "function": head})
            args = _value_so_far(text, start)
            if len(args) > self.sent[i]:
                piece = args[self.sent[i] :]
                out.append({"index": i, "function": {"arguments": piece}})
                self.sent[i] = len(args)
        return out


def _value_so_far(text: str, start: int) -> str:
    """The JSON value that begins at `start` (an object), as far as `text` holds it."""
    depth, in_string, escaped = 0, False, False
    for j in range(start, len(text)):
        c = text[j]
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return text[start : j + 1]
    return text[start:]


def _scan_required(text: str) -> list[tuple[str | None, int]]:
    """(name, where its "parameters" value starts) for each item of a "required" answer's list
    so far; an item whose name or parameters have not begun yet is (None, 0)."""
    out: list[tuple[str | None, int]] = []
    depth, i, key, name = 0, 0, None, None
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _string_end(text, i)
            if end is None:
                break
            s = text[i + 1 : end]
            rest = text[end + 1 :].lstrip()
            if depth == 2 and rest.startswith(":"):
                key = s
            elif depth == 2 and key == "name":
                name = s
            i = end + 1
            continue
        if c == "{" and depth == 2 and key == "parameters":
            if name is None:
                break
            out.append((name, i))
            end = len(_value_so_far(text, i)) + i
            i, key = end, None
            continue
        if c in "{[":
            depth += 1
            if depth == 2:
                key = name = None
        elif c in "}]":
            depth -= 1
        i += 1
    return out


def _string_end(text: str, start: int) -> int | None:
    """Index of the quote closing the JSON string opened at `start`; None if not yet."""
    j = start + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j
        j += 1
    return None
