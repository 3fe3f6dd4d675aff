"""Tools into a chat prompt. A chat template that knows tools (it reads `tools`) gets them, and
the history's calls, as Hugging Face templates expect; any other template (SmolLM2's and
Gemma 3's GGUF templates among them) gets plain messages in the parser's format: a system
message listing the tools, assistant calls written as the model writes them, and tool results
as user turns (next to another user turn, merged into one: templates such as Gemma's need
roles to alternate)."""

from __future__ import annotations

from typing import Any

from jinfer.tool_parsers.base import ToolParser, argument_text


def template_has_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def render(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    parser: ToolParser,
    template: str | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) for `apply_chat_template`. Each message is
    {"role", "content" (text)} plus, for assistants, "tool_calls" (OpenAI's shape) and, for
    tool results, "tool_call_id" and "name"."""
    if template_has_tools(template):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [_hf_call(c) for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out: list[dict[str, Any]] = []
    from_tool: list[bool] = []  # per message of `out`: a user turn holding tool results
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [_call(c) for c in m["tool_calls"]]
            content = (content + "\n" if content else "") + parser.format_calls(calls)
        if role == "tool":
            role, content = "user", parser.format_result(content, m.get("name"))
            if out and out[-1]["role"] == "user":
                out[-1]["content"] += "\n" + content
                from_tool[-1] = True
                continue
        elif role == "user" and out and from_tool[-1]:
            out[-1]["content"] += "\n\n" + content
            continue
        out.append({"role": role, "content": content})
        from_tool.append(m["role"] == "tool")
    if tools:
        prompt = parser.system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _call(call: dict[str, Any]) -> dict[str, Any]:
    f = call["function"]
    return {"name": f["name"], "arguments": argument_text(f.get("arguments"))}


def _hf_call(call: dict[str, Any]) -> dict[str, Any]:
    return {**call, "function": _call(call)}
