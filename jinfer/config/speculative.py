"""`--speculative-config`: vLLM's speculative decoding settings, parsed and checked at start-up.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
     "prompt_lookup_max": 4}

`ngram` (prompt lookup) drafts the tokens that followed the longest recent match of a request's
last n tokens (prompt_lookup_max >= n >= prompt_lookup_min) in its own prompt and output; the
step then verifies up to `num_speculative_tokens` of them at once (`jinfer/spec_decode/`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jinfer.config.json_option import json_object

METHODS = ("ngram",)  # (suffix decoding: issue 22, next)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str | None = None  # None: no speculation
    num_speculative_tokens: int = 0  # k: drafts verified per step, at most
    prompt_lookup_min: int = 2  # ngram: the shortest match that drafts
    prompt_lookup_max: int = 4  # ngram: the longest match tried first

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
            if key == "method":
                if value not in METHODS:
                    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if "method" not in raw:
            raise ValueError(f"needs a method ({', '.join(METHODS)})")
        if "num_speculative_tokens" not in raw:
            raise ValueError("needs num_speculative_tokens (drafts verified per step)")
        config = cls(**raw)
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min={config.prompt_lookup_min} exceeds prompt_lookup_max="
                f"{config.prompt_lookup_max}"
            )
        return config
