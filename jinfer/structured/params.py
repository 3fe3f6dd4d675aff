"""`StructuredOutputsParams`: the constraint a request puts on its output, by vLLM's names
(`structured_outputs` in a request; offline, `SamplingParams(structured_outputs=...)`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jinfer.sampling_params import ParamError

MAX_CHOICES = 1024
MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar: 1 MiB of text


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its text), `regex`, `choice` (the
    output is one of these strings), `grammar` (Lark, or llama.cpp's GBNF), `json_object`
    (any JSON object). `disable_any_whitespace`: JSON without whitespace between tokens
    (small models otherwise tend to pad it endlessly)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise _error(
                "give exactly one of json, regex, choice, grammar, json_object"
                + (f"; got {', '.join(given)}" if given else "")
            )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _error(f"{name} must be a non-empty string")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise _error("json must be a JSON schema (an object, or its text)")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise _error("choice must be a non-empty list of non-empty strings")
            if len(self.choice) > MAX_CHOICES:
                raise _error(f"choice may hold at most {MAX_CHOICES} strings")
        if len(self.spec_text) > MAX_SPEC_CHARS:
            raise _error(f"the constraint's text is longer than {MAX_SPEC_CHARS} characters")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, regex, choice, grammar or json_object."""
        for k in ("json", "regex", "choice", "grammar"):
            if getattr(self, k) is not None:
                return k
        return "json_object"

    @property
    def spec_text(self) -> str:
        """The constraint as one string (its cache key, with the whitespace rule)."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, dict):
            return json.dumps(value, sort_keys=True)
        if self.kind == "choice":
            return json.dumps(list(value))
        return "" if self.kind == "json_object" else value

    @property
    def cache_key(self) -> tuple[str, str, bool]:
        return (self.kind, self.spec_text, self.disable_any_whitespace)


def _error(message: str) -> ParamError:
    return ParamError("structured_outputs", f"structured_outputs: {message}")
