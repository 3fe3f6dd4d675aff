"""Tool calling: the formats models write calls in, one file each, by vLLM's
`--tool-call-parser` names.

    base.py         ToolCall, Extracted, ToolParser (prompt, history, extraction)
    xlam.py         <tool_call>[{"name", "arguments"}]</tool_call>   (SmolLM2-Instruct)
    hermes.py       <tool_call>{"name", "arguments"}</tool_call> per call
    llama3_json.py  {"name", "parameters"}; ...
    mistral.py      [TOOL_CALLS][{"name", "arguments"}]
    pythonic.py     [func(a=1), g()]                                   (Gemma 3, Llama 3.2)
    prompt.py       tools into a chat: the model's template where it has tools, the parser's
                    prompt otherwise
    choice.py       tool_choice: the schema that makes `required` and named calls parse
"""

from __future__ import annotations

from jinfer.tool_parsers.base import Extracted, ToolCall, ToolParser
from jinfer.tool_parsers.hermes import HermesParser
from jinfer.tool_parsers.llama3_json import Llama3JsonParser
from jinfer.tool_parsers.mistral import MistralParser
from jinfer.tool_parsers.pythonic import PythonicParser
from jinfer.tool_parsers.xlam import XLAMParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (XLAMParser, HermesParser, Llama3JsonParser, MistralParser, PythonicParser)
}
# The format each named model was trained to call tools in.
DEFAULT_PARSERS = {"smollm2-135m-instruct": "xlam", "gemma3-270m": "pythonic"}

__all__ = ["TOOL_PARSERS", "DEFAULT_PARSERS", "Extracted", "ToolCall", "ToolParser", "get"]


def get(name: str) -> ToolParser:
    """The parser named `name`; ValueError naming the known ones otherwise."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()
