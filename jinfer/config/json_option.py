"""Options that take a JSON object (`--kv-events-config`, `--speculative-config`), or a dict
from Python (`LLM(kv_events_config={...})`, as vLLM's LLM takes them)."""

from __future__ import annotations

import json
from typing import Any


def json_object(text: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The option's keys and values; None when unset. ValueError saying what is wrong."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ValueError(f"is not JSON ({e})") from None
    else:
        raw = text
    if not isinstance(raw, dict):
        raise ValueError(f"must be a JSON object, got {type(raw).__name__}")
    return raw
