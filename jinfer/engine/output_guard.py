"""Output guards: a check on each request's text before any of it leaves the engine.

A guard is a callable `guard(text, done, request_id) -> Verdict`, called with a completion's
whole text after every token that added to it (`done`: the completion is about to finish). Its
verdict says how much of the text may be released to the caller (the rest is held back until a
later call releases it), or that the request must end: `finish_reason: "content_filter"`, with
the text cut where the guard says. Text held back never reaches a client, streamed or not.

Chosen with the `output_guard` option (`--output-guard`): `module:attr` names a guard (or a
class or function that makes one, called without arguments), and `regex:PATTERN` the built-in
`RegexDenyList`. Guards run on the engine's thread: their time is counted
(`EngineStats.guard_time`) and should stay a small share of a step.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable

HOLD_CHARS = 32  # RegexDenyList: text held back while a match could still be forming


@dataclasses.dataclass(frozen=True)
class Verdict:
    release: int  # characters of the text (from its start) that may reach the caller
    block: bool = False  # end the request (content_filter), its text cut at `release`


Guard = Callable[[str, bool, str], Verdict]


class RegexDenyList:
    """Ends a request whose text matches `pattern` (Python `re`, case-insensitive), cutting the
    text where the match begins. The last `hold` characters are held back while the text grows,
    so a match shorter than that is caught before any of it is released."""

    def __init__(self, pattern: str, hold: int = HOLD_CHARS) -> None:
        try:
            self.pattern = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"output_guard: the deny pattern does not compile: {e}") from None
        self.hold = hold

    def __call__(self, text: str, done: bool, request_id: str) -> Verdict:
        m = self.pattern.search(text)
        if m is not None:
            return Verdict(m.start(), block=True)
        return Verdict(len(text) if done else max(0, len(text) - self.hold))


def load_guard(spec: str) -> Guard | None:
    """The guard `spec` names ("" for none); ValueError naming what is wrong."""
    if not spec:
        return None
    if spec.startswith("regex:"):
        return RegexDenyList(spec.removeprefix("regex:"))
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"output_guard must be 'module:attr' or 'regex:PATTERN', got {spec!r}")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"output_guard {spec!r}: {e}") from None
    if isinstance(target, type):
        target = target()
    if not callable(target):
        raise ValueError(f"output_guard {spec!r} is not callable")
    return target
