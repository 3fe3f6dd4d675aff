"""bench_serving.py's workloads: seeded sessions of turns that follow real traffic (see its
docstring for the shapes), and the structured workloads' schema and tools."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their can has been if more when will would "
    "who so no time people year way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot right "
    "study book eye job word business issue side kind head house service friend father power hour "
    "game line end member law car city community name president team minute idea kid body"
).split()
CODE_LINES = [
    "def {f}(self, {a}: int) -> int:", "    return self.{a} + {n}", "class {C}(Base):",
    "    if {a} is None:", "        raise ValueError('{a} missing')", "for {a} in range({n}):",
    "    total += {a} * {n}", "import {m}", "from {m} import {C}", "    # TODO: handle {a}",
    "    result = {f}({a}, {n})", "assert {f}({n}) == {n}",
]  # fmt: skip


@dataclass
class Turn:
    user: str  # this turn's new user content (a question, a tool result, ...)
    max_tokens: int
    think_s: float = 0.0  # pause before sending (multi-turn sessions)
    # Request fields beyond the messages: the structured workloads' response_format or tools.
    extra: dict = field(default_factory=dict)
    expect: str = ""  # "json": the answer must parse; "tool_call": a call must come back


@dataclass
class Session:
    system: str
    turns: list[Turn]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def _code(rng: random.Random, n_tokens: int) -> str:
    lines, chars = [], 0
    while chars < n_tokens * 3.2:  # ~3.2 characters per BPE token in code
        line = rng.choice(CODE_LINES).format(
            f=f"fn_{rng.randrange(999)}",
            a=f"x{rng.randrange(99)}",
            n=rng.randrange(1000),
            C=f"Cls{rng.randrange(99)}",
            m=f"mod{rng.randrange(50)}",
        )
        lines.append(line)
        chars += len(line) + 1
    return "\n".join(lines)


def _length(rng: random.Random, lo: int, hi: int, scale: float) -> int:
    return max(1, int(rng.randint(lo, hi) * scale))


def make_sessions(name: str, num: int, seed: int, scale: float) -> list[Session]:
    rng = random.Random(f"{name}:{seed}")
    sessions = []
    if name == "coding-agent":
        repos = [_code(rng, _length(rng, 10_000, 30_000, scale)) for _ in range(3)]
    for _ in range(num):
        if name == "chat":
            sessions.append(
                Session(
                    "You are a helpful assistant.",
                    [Turn(_words(rng, _length(rng, 50, 800, scale)), _length(rng, 30, 300, scale))],
                )
            )
        elif name == "coding-agent":
            question = f"Find the bug in fn_{rng.randrange(999)} and propose a fix."
            sessions.append(
                Session(
                    "You are a coding agent. Repository:\n" + rng.choice(repos),
                    [Turn(question, _length(rng, 20, 200, 1.0))],
                )
            )
        elif name == "summarization":
            text = _words(rng, _length(rng, 2000, 8000, scale))
            sessions.append(
                Session(
                    "Summarize the user's document.",
                    [Turn(text, _length(rng, 200, 500, scale))],
                )
            )
        elif name == "agentic-multi-turn":
            turns = [
                Turn(_words(rng, _length(rng, 200, 1500, scale)), _length(rng, 30, 200, scale))
            ]
            for _ in range(rng.randint(3, 10) - 1):
                tool = "Tool result:\n" + _code(rng, _length(rng, 100, 800, scale))
                turns.append(Turn(tool, _length(rng, 20, 200, scale), rng.uniform(0.5, 3.0)))
            sessions.append(Session("You are an autonomous agent using tools.", turns))
        elif name == "json-schema":
            person = _words(rng, 3)
            ask = f"Write the staff record of {person} as JSON. " + _words(
                rng, _length(rng, 20, 200, scale)
            )
            fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD}}
            extra = {"response_format": fmt}
            sessions.append(Session("You answer in JSON.", [Turn(ask, 300, 0.0, extra, "json")]))
        elif name == "tool-call":
            city = rng.choice(["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth"])
            ask = f"What is the weather in {city}? " + _words(rng, _length(rng, 20, 200, scale))
            extra = {"tools": TOOLS, "tool_choice": "required"}
            sessions.append(
                Session("You are an agent using tools.", [Turn(ask, 200, 0.0, extra, "tool_call")])
            )
        else:
            raise ValueError(f"unknown workload {name!r}")
    return sessions


# The structured workloads' schema and tools (bench_serving.py --structured).
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "team": {"enum": ["infra", "research", "product", "sales"]},
        "remote": {"type": "boolean"},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    },
    "required": ["name", "age", "team", "remote", "skills"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 80}}, "required": ["query"]}}},
]  # fmt: skip


# --------------------------------------------------------------------- client


WORKLOADS = ("chat", "coding-agent", "summarization", "agentic-multi-turn")
# Constrained traffic (--structured): JSON-schema answers and forced tool calls, each checked.
STRUCTURED = ("json-schema", "tool-call")
