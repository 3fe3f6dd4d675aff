"""jinfer: a JAX/XLA inference engine for large language models."""

from jinfer.llm import LLM
from jinfer.outputs import CompletionOutput, Logprob, RequestOutput
from jinfer.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
