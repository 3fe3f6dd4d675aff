"""jinfer: a JAX/XLA inference engine for large language models.

`from jinfer import LLM, SamplingParams`. `LLM` (and with it the engine and JAX) loads on first
use, so the host-only parts (`jinfer.scheduler`, `jinfer.sampling_params`, ...) import without
JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jinfer.outputs import CompletionOutput, Logprob, RequestOutput
from jinfer.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from jinfer.llm import LLM

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from jinfer.llm import LLM

        return LLM
    raise AttributeError(f"module 'jinfer' has no attribute {name!r}")
