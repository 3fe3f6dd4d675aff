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

    def extract(self, text: str, finish_reason: str | None) -> Extracted:
        """The calls of a finished choice, and its content; no calls unless it stopped."""
        if not self.active or finish_reason != "stop":
            return Extracted(text, [])
        if self.mode == "auto":
            return self.parser.extract(text, self.tools)
        calls = choice.constrained_calls(self.mode, text, self.tools)
        return Extracted(None, calls) if calls else Extracted(text, [])

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed choice of a request with tools: its content, sent up to where a call
    begins, and its calls as OpenAI's deltas, each call's id and name first, then its
    arguments as they are written. Calls written as JSON ({"name", "arguments" | "parameters"},
    alone or in a list: required and named choices, xlam, hermes, llama3_json, mistral) stream
    as they grow, once their name is an offered tool's; others (pythonic) when the choice ends.
    A call is presented as complete only by `finish_reason: "tool_calls"`."""

    ARG_KEYS = ("arguments", "parameters")

    def __init__(self, calling: ToolCalling) -> None:
        self.calling = calling
        self.named = choice.named(calling.mode)
        self.offered = {t["function"]["name"] for t in calling.tools}
        self.ids: list[str] = []
        self.sent: list[int] = []  # per call: argument characters sent

    def step(
        self, text: str, visible: str, done: bool, finish_reason: str | None
    ) -> tuple[str, list[dict[str, Any]], str | None]:
        """(content to have sent so far, this step's `tool_calls` delta entries, the finish
        reason to send, None: the choice's own) for the choice's `text` (`visible`: the part
        stop strings let out)."""
        c = self.calling
        if not c.active:  # tool_choice "none": plain text
            return visible, [], None
        if c.mode == "auto":
            content = c.parser.content_prefix(visible)
            region = len(content) if len(content) < len(text) else None
            calls = [] if region is None else _scan_calls(text, region, self.ARG_KEYS)
        else:
            content = ""
            calls = [(self.named, 0)] if self.named else _scan_calls(text, 0, self.ARG_KEYS)
        deltas = self._advance(text, calls)
        if not done:
            return content, deltas, None
        extracted = c.extract(text, finish_reason)
        if not extracted.tool_calls:
            return (text if c.mode == "auto" and not self.ids else content), deltas, None
        for i, call in enumerate(extracted.tool_calls[len(self.ids) :], start=len(self.ids)):
            head = {"name": call.name, "arguments": ""}
            deltas.append({"index": i, "id": call.id, "type": "function", "function": head})
            deltas.append({"index": i, "function": {"arguments": call.arguments}})
            self.ids.append(call.id)
        return (extracted.content or "") if c.mode == "auto" else "", deltas, "tool_calls"

    def _advance(self, text: str, calls: list[tuple[str, int]]) -> list[dict[str, Any]]:
        out = []
        for i, (name, start) in enumerate(calls):
            if name not in self.offered:
                break  # not a call this request offered: the end decides what the text is
            if i == len(self.ids):
                self.ids.append(call_id())
                self.sent.append(0)
                head = {"name": name, "arguments": ""}
                out.append({"index": i, "id": self.ids[i], "type": "function", "function": head})
            args = text[start:] if self.named else _value_so_far(text, start)
            if len(args) > self.sent[i]:
                out.append({"index": i, "function": {"arguments": args[self.sent[i] :]}})
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


def _scan_calls(text: str, start: int, arg_keys: tuple[str, ...]) -> list[tuple[str, int]]:
    """(name, where its arguments object starts) for each JSON object in `text[start:]` that
    holds a "name" string and then an arguments object (at any depth: alone, in a list, in
    tags), as far as the text goes."""
    out: list[tuple[str, int]] = []
    depth, i = 0, start
    key: dict[int, str | None] = {}  # per depth: the key just read in the object open there
    names: dict[int, str] = {}  # per depth: that object's "name"
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _string_end(text, i)
            rest = "" if end is None else text[end + 1 :].lstrip()
            if not rest:  # a string still being written, or not yet known as key or value
                break
            if rest.startswith(":"):
                key[depth] = text[i + 1 : end]
            elif key.get(depth) == "name":
                names[depth] = text[i + 1 : end]
            i = end + 1
            continue
        if c == "{" and key.get(depth) in arg_keys and depth in names:
            out.append((names[depth], i))
            i += len(_value_so_far(text, i))
            key[depth] = None
            continue
        if c in "{[":
            depth += 1
            key.pop(depth, None)
            names.pop(depth, None)
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
