"""`--speculative-config`: vLLM's speculative decoding settings, parsed and checked at start-up.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
     "prompt_lookup_max": 4}
    {"method": "suffix", "num_speculative_tokens": 16, "suffix_decoding_max_tree_depth": 24,
     "suffix_decoding_max_cached_requests": 10000, "suffix_decoding_max_spec_factor": 1.0,
     "suffix_decoding_min_token_prob": 0.1}

`ngram` (prompt lookup) drafts the tokens that followed the longest recent match of a request's
last n tokens (prompt_lookup_max >= n >= prompt_lookup_min) in its own prompt and output.
`suffix` (suffix decoding) matches up to max_tree_depth of them in the request's own tokens and
in earlier requests' outputs of the same `cache_salt`, and drafts the most frequent continuation
while its estimated probability holds, at most max_spec_factor tokens per matched token
(`jinfer/spec_decode/suffix.py`). Either way the step verifies up to `num_speculative_tokens`
drafts at once (`jinfer/spec_decode/`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jinfer.config.json_option import json_object

METHODS = ("ngram", "suffix")
_OWN_KEYS = {  # keys that only one method reads
    "ngram": ("prompt_lookup_min", "prompt_lookup_max"),
    "suffix": (
        "suffix_decoding_max_tree_depth",
        "suffix_decoding_max_cached_requests",
        "suffix_decoding_max_spec_factor",
        "suffix_decoding_min_token_prob",
    ),
}


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str | None = None  # None: no speculation
    num_speculative_tokens: int = 0  # k: drafts verified per step, at most
    prompt_lookup_min: int = 2  # ngram: the shortest match that drafts
    prompt_lookup_max: int = 4  # ngram: the longest match tried first
    suffix_decoding_max_tree_depth: int = 24  # suffix: the longest match looked for
    # suffix: earlier requests' outputs kept to draft from (least recently used leave first;
    # 0: a request drafts from its own tokens only)
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0  # suffix: drafts per matched token, at most
    suffix_decoding_min_token_prob: float = 0.1  # suffix: a draft's estimated chance, at least

    @property
    def enabled(self) -> bool:
        return self.method is not None and self.num_speculative_tokens > 0

    @classmethod
    def parse(cls, text: str | dict[str, Any] | None) -> SpeculativeConfig:
        """From JSON (the flag) or a dict (`LLM(speculative_config=...)`); ValueError naming
        the first key or value it does not take."""
        raw = json_object(text)
        if raw is None:
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key not in fields:
                raise ValueError(f"has no key {key!r} (it takes {', '.join(sorted(fields))})")
            _check(key, value)
        method = raw.get("method")
        if method is None:
            raise ValueError(f"needs a method ({', '.join(METHODS)})")
        for other, keys in _OWN_KEYS.items():
            stray = [key for key in keys if key in raw and other != method]
            if stray:
                raise ValueError(f"{stray[0]} is a setting of method {other!r}, not {method!r}")
        if method == "suffix":  # (vLLM's default: as many drafts as the tree is deep)
            depth = raw.get("suffix_decoding_max_tree_depth", cls.suffix_decoding_max_tree_depth)
            raw = {"num_speculative_tokens": depth, **raw}
        if "num_speculative_tokens" not in raw:
            raise ValueError("needs num_speculative_tokens (drafts verified per step)")
        config = cls(**raw)
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min={config.prompt_lookup_min} exceeds prompt_lookup_max="
                f"{config.prompt_lookup_max}"
            )
        return config


def _check(key: str, value: Any) -> None:
    if key == "method":
        if value not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {value!r}")
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    integer = number and isinstance(value, int)
    if key == "suffix_decoding_min_token_prob":
        if not number or not 0 <= value <= 1:
            raise ValueError(f"{key} must be a probability in [0, 1], got {value!r}")
    elif key == "suffix_decoding_max_spec_factor":
        if not number or value <= 0:
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    elif key == "suffix_decoding_max_cached_requests":
        if not integer or value < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    elif not integer or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
