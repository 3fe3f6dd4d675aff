"""`SamplingParams`: what a request asks of generation, validated on construction (as vLLM).

Every field is held to the range its consumer can hold: counts and token ids to int32 (the
device arrays they are packed into), floats to finite float32 values, and the rest to the limits
below. A value outside raises `ParamError`, which names the field (`param`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any

MAX_N = 128  # completions per request (OpenAI's limit)
MAX_LOGPROBS = 20  # top-N logprobs per token, like OpenAI's limit
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024  # each is searched for in the new text of every token
MAX_STOP_TOKEN_IDS = 128
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit; each value in [-100, 100]
MAX_BAD_WORDS = 128  # each tokenized at admission, and matched against the output each step
MAX_BAD_WORD_CHARS = 256
MAX_ALLOWED_TOKEN_IDS = 1 << 20  # (a vocabulary's worth: duplicates are harmless)
INT32_MAX = 2**31 - 1  # counts and token ids are packed into int32 arrays
FLOAT32_MAX = 3.4028234663852886e38  # and floats into float32 ones
# Temperatures below this sample greedily (vLLM's rule): dividing logits by a smaller one would
# overflow float32.
SAMPLING_EPS = 1e-5
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # logits are divided or multiplied by it in float32


class ParamError(ValueError):
    """A sampling setting out of range; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _show(value: object, limit: int = 60) -> str:
    """A client's value in an error message: escaped (repr), and cut short. (An int past
    Python's 4300-digit limit has no repr: it is shown by its size.)"""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits"  # type: ignore[attr-defined]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_real(x: object) -> bool:
    """A number a float32 array holds as itself (no inf, no NaN)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x) and abs(x) <= FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings. Invalid values raise ValueError on construction.

    temperature 0 is greedy. top_k 0 or -1 disables top-k; top_p 1 disables nucleus sampling;
    min_p 0 disables min-p. A `seed` makes the request's samples reproducible whatever else is in
    the batch. `logprobs=N` returns the top-N logprobs (plus the sampled token's) per token.
    `cache_salt` keeps the request's KV pages apart in the prefix cache: only requests with the
    same salt (or all without one) share cached pages, so tenants cannot time each other's hits.
    `structured_outputs` constrains the output to a JSON schema, a regex, a choice or a grammar
    (`StructuredOutputsParams`, below, or a dict of its fields); `allowed_token_ids` and
    `bad_words` narrow what may be generated through the same token mask.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    cache_salt: str | None = None
    structured_outputs: StructuredOutputsParams | None = None
    allowed_token_ids: list[int] | None = None  # only these may be generated
    bad_words: list[str] | None = None  # never generated (as words: with and without a space)

    def __post_init__(self) -> None:
        self.structured_outputs = _structured(self.structured_outputs)
        if self.bad_words is not None:
            self.bad_words = (
                list(self.bad_words)
                if isinstance(self.bad_words, (list, tuple))
                else [self.bad_words]
            )
        if self.allowed_token_ids is not None and isinstance(self.allowed_token_ids, (list, tuple)):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = _token_map(self.logit_bias)
        for param, ok, message in self._checks():
            if not ok():
                raise ParamError(param, message)
        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < SAMPLING_EPS:
            self.temperature = 0.0

    def _checks(self) -> list[tuple[str, object, str]]:
        """(field, predicate, message), each predicate evaluated only once the ones above it
        hold (so a value of the wrong type is named, never compared)."""
        rep_lo, rep_hi = REPETITION_PENALTY_RANGE

        def count(name: str, lo: int, hi: int = INT32_MAX, optional: bool = False) -> list:
            v = getattr(self, name)
            is_int = lambda: (optional and v is None) or _is_int(v)  # noqa: E731
            in_range = lambda: v is None or lo <= v <= hi  # noqa: E731
            return [
                (name, is_int, f"{name} must be an integer, got {_show(v)}"),
                (name, in_range, f"{name} must be in [{lo}, {hi}], got {_show(v)}"),
            ]

        def real(name: str, ok, rule: str) -> list:
            v = getattr(self, name)
            return [
                (name, lambda: _is_real(v), f"{name} must be a finite number, got {_show(v)}"),
                (name, lambda: ok(v), f"{name} must be {rule}, got {_show(v)}"),
            ]

        return [
            *count("n", 1, MAX_N),
            *real("temperature", lambda v: v >= 0, ">= 0"),
            *real("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
            *count("top_k", -1),
            *real("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
            *real(
                "repetition_penalty",
                lambda v: rep_lo <= v <= rep_hi,
                f"in [{rep_lo}, {rep_hi}] (1 is off)",
            ),
            *real("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
            *real("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]"),
            *count("max_tokens", 1, optional=True),
            *count("min_tokens", 0),
            (
                "min_tokens",
                lambda: self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({_show(self.min_tokens)}) must not exceed max_tokens "
                f"({_show(self.max_tokens)})",
            ),
            *count("logprobs", 0, MAX_LOGPROBS, optional=True),
            *count("seed", 0, 2**63 - 1, optional=True),
            (
                "stop",
                lambda: all(isinstance(s, str) and s for s in self.stop),
                "stop strings must be non-empty strings",
            ),
            (
                "stop",
                lambda: len(self.stop) <= MAX_STOP_STRINGS,
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}",
            ),
            (
                "stop",
                lambda: all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
                f"a stop string may hold at most {MAX_STOP_STRING_CHARS} characters",
            ),
            (
                "stop_token_ids",
                lambda: len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
                f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, "
                f"got {len(self.stop_token_ids)}",
            ),
            (
                "stop_token_ids",
                lambda: all(_is_int(t) and 0 <= t <= INT32_MAX for t in self.stop_token_ids),
                f"stop_token_ids must be integers in [0, {INT32_MAX}]",
            ),
            (
                "logit_bias",
                lambda: len(self.logit_bias) <= MAX_LOGIT_BIAS,
                f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}",
            ),
            (
                "logit_bias",
                lambda: all(
                    0 <= t <= INT32_MAX and _is_real(b) and -100 <= b <= 100
                    for t, b in self.logit_bias.items()
                ),
                f"logit_bias maps token ids in [0, {INT32_MAX}] to numbers in [-100, 100]",
            ),
            (
                "allowed_token_ids",
                lambda: (
                    self.allowed_token_ids is None
                    or (
                        isinstance(self.allowed_token_ids, list)
                        and 0 < len(self.allowed_token_ids) <= MAX_ALLOWED_TOKEN_IDS
                    )
                ),
                "allowed_token_ids must be a non-empty list of token ids",
            ),
            (
                "allowed_token_ids",
                lambda: (
                    self.allowed_token_ids is None
                    or all(_is_int(t) and 0 <= t <= INT32_MAX for t in self.allowed_token_ids)
                ),
                f"allowed_token_ids must be integers in [0, {INT32_MAX}]",
            ),
            (
                "bad_words",
                lambda: (
                    self.bad_words is None
                    or (
                        len(self.bad_words) <= MAX_BAD_WORDS
                        and all(
                            isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS
                            for w in self.bad_words
                        )
                    )
                ),
                f"bad_words must be at most {MAX_BAD_WORDS} non-blank strings of at most "
                f"{MAX_BAD_WORD_CHARS} characters",
            ),
            (
                "cache_salt",
                lambda: (
                    self.cache_salt is None
                    or (isinstance(self.cache_salt, str) and self.cache_salt)
                ),
                f"cache_salt must be a non-empty string if provided, got {_show(self.cache_salt)}",
            ),
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _structured(value: Any) -> StructuredOutputsParams | None:
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    return StructuredOutputsParams.from_dict(value)


def _token_map(bias: dict | None) -> dict[int, float]:
    """logit_bias keys arrive as ints or (from JSON) strings of ints."""
    out = {}
    for k, v in (bias or {}).items():
        try:
            out[int(k)] = float(v)
        except (TypeError, ValueError, OverflowError):
            raise ParamError(
                "logit_bias", f"logit_bias maps token ids to numbers; got {_show(k)}: {_show(v)}"
            ) from None
    return out


# ------------------------------------------------------------ structured output
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

    @classmethod
    def from_dict(cls, value: Any) -> StructuredOutputsParams:
        """From a request's `structured_outputs` object; ParamError naming a field it lacks."""
        if not isinstance(value, dict):
            raise _error(
                f"must be a StructuredOutputsParams or an object, got {type(value).__name__}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(value) - fields)
        if unknown:
            raise _error(f"unknown field {unknown[0][:40]!r} (fields: {', '.join(sorted(fields))})")
        return cls(**value)

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
