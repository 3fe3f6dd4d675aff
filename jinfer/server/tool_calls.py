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
