"""`SamplingParams`: what a request asks of generation, validated on construction (as vLLM)."""

from __future__ import annotations

import dataclasses

MAX_LOGPROBS = 20  # top-N logprobs per token, like OpenAI's limit
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 128
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit; each value in [-100, 100]


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings. Invalid values raise ValueError on construction.

    temperature 0 is greedy. top_k 0 or -1 disables top-k; top_p 1 disables nucleus sampling;
    min_p 0 disables min-p. A `seed` makes the request's samples reproducible whatever else is in
    the batch. `logprobs=N` returns the top-N logprobs (plus the sampled token's) per token.
    `cache_salt` keeps the request's KV pages apart in the prefix cache: only requests with the
    same salt (or all without one) share cached pages, so tenants cannot time each other's hits.
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = _token_map(self.logit_bias)
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1 (disabled) or >= 0, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            ),
            (
                self.seed is None or 0 <= self.seed < 2**63,
                f"seed must be a non-negative integer, got {self.seed}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (
                len(self.stop) <= MAX_STOP_STRINGS,
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}",
            ),
            (
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
                f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, "
                f"got {len(self.stop_token_ids)}",
            ),
            (
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}",
            ),
            (
                all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                "logit_bias maps non-negative token ids to values in [-100, 100]",
            ),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be non-negative integers",
            ),
            (
                self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt),
                f"cache_salt must be a non-empty string if provided, got {self.cache_salt!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.top_k == -1:
            self.top_k = 0

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


def _token_map(bias: dict | None) -> dict[int, float]:
    """logit_bias keys arrive as ints or (from JSON) strings of ints."""
    out = {}
    for k, v in (bias or {}).items():
        try:
            out[int(k)] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias maps token ids to numbers; got {k!r}: {v!r}") from None
    return out
