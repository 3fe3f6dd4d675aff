"""jinfer's JSONL record format for `generate.py`: validation, resume bookkeeping, output lines.

The format itself is documented in `generate.py`'s docstring (its --help points there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinfer

log = logging.getLogger("generate")

PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")

# Per-record sampling fields and the JSON types each accepts (None: may be null).
_INT = "an integer"
_NUM = "a number"
SAMPLING_FIELDS: dict[str, tuple[str, bool]] = {
    "max_tokens": (_INT, True),
    "temperature": (_NUM, False),
    "top_p": (_NUM, False),
    "top_k": (_INT, False),
    "min_p": (_NUM, False),
    "seed": (_INT, True),
    "stop": ("a string or a list of strings", True),
    "stop_token_ids": ("a list of integers", True),
    "ignore_eos": ("a boolean", False),
    "min_tokens": (_INT, False),
    "logprobs": (_INT, True),
    "repetition_penalty": (_NUM, False),
    "presence_penalty": (_NUM, False),
    "frequency_penalty": (_NUM, False),
    "n": (_INT, False),
}

SEED_RANGE = 2**62  # leaves room for the engine's seed + i over n samples below 2**63

MAX_ERRORS_SHOWN = 20


class InputError(ValueError):
    """The input file cannot be processed; `errors` holds (1-based line, problem) pairs."""

    def __init__(self, path: str | os.PathLike[str], errors: Sequence[tuple[int, str]]) -> None:
        self.path = str(path)
        self.errors = list(errors)
        shown = [f"  {self.path}:{line}: {problem}" for line, problem in errors[:MAX_ERRORS_SHOWN]]
        if len(errors) > MAX_ERRORS_SHOWN:
            shown.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
        noun = "error" if len(errors) == 1 else "errors"
        super().__init__(f"{len(errors)} {noun} in {self.path}:\n" + "\n".join(shown))


@dataclasses.dataclass
class Record:
    """One validated input line."""

    line: int  # 1-based line number in the input file
    id: str | int
    params: jinfer.SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(record_id: str | int) -> str:
    """Ids compare as strings: `1` and `"1"` are the same record."""
    return str(record_id)


def derive_seed(base: int, record_id: str | int) -> int:
    """A stable per-record seed from the run's `--seed` and the record's id."""
    digest = hashlib.sha256(f"{base}:{id_key(record_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_RANGE


# ------------------------------------------------------------------------------- validation
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_sampling_type(name: str, value: Any) -> None:
    kind, nullable = SAMPLING_FIELDS[name]
    if value is None:
        if not nullable:
            raise ValueError(f"{name} must be {kind}, got null")
        return
    if name == "stop":
        ok = isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(s, str) for s in value)
        )
    elif name == "stop_token_ids":
        ok = isinstance(value, list) and all(_is_int(t) for t in value)
    elif name == "ignore_eos":
        ok = isinstance(value, bool)
    elif kind == _INT:
        ok = _is_int(value)
    else:
        ok = _is_num(value)
    if not ok:
        raise ValueError(f"{name} must be {kind}, got {json.dumps(value)}")


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object, got {json.dumps(message)}")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise ValueError(f"messages[{i}] needs a non-empty string 'role'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] needs a string 'content'")
    return messages


def parse_record(
    obj: Any, line: int, defaults: Mapping[str, Any] | None = None, seed: int | None = None
) -> Record:
    """Validates one decoded input line; raises ValueError naming the problem (not the line).

    `defaults` are sampling settings that the record's own fields override; `seed`, when given,
    derives a per-record seed for records that bring none."""
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
    record_id = obj.get("id", line)  # absent: the line number
    if not (isinstance(record_id, str) or _is_int(record_id)):
        raise ValueError(f"'id' must be a string or an integer, got {json.dumps(record_id)}")
    if isinstance(record_id, str) and not record_id:
        raise ValueError("'id' must not be empty")
    unknown = sorted(set(obj) - {"id", *PROMPT_FIELDS, *SAMPLING_FIELDS})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    present = [f for f in PROMPT_FIELDS if f in obj]
    if not present:
        raise ValueError("needs one of 'prompt', 'prompt_token_ids' or 'messages'")
    if len(present) > 1:
        raise ValueError(f"has {' and '.join(map(repr, present))}: give exactly one")
    record = Record(line=line, id=record_id, params=jinfer.SamplingParams())
    field = present[0]
    value = obj[field]
    if field == "prompt":
        if not isinstance(value, str) or not value:
            raise ValueError("'prompt' must be a non-empty string")
        record.prompt = value
    elif field == "prompt_token_ids":
        if not isinstance(value, list) or not value or not all(_is_int(t) for t in value):
            raise ValueError("'prompt_token_ids' must be a non-empty list of integers")
        if any(t < 0 for t in value):
            raise ValueError("'prompt_token_ids' must not be negative")
        record.prompt_token_ids = value
    else:
        record.messages = _check_messages(value)
    settings = dict(defaults or {})
    for name in SAMPLING_FIELDS:
        if name in obj:
            _check_sampling_type(name, obj[name])
            settings[name] = obj[name]
    if seed is not None and settings.get("seed") is None:
        settings["seed"] = derive_seed(seed, record_id)
    try:
        record.params = jinfer.SamplingParams(**settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid sampling settings: {e}") from None
    return record


def load_records(
    path: str | os.PathLike[str],
    defaults: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> list[Record]:
    """Reads and validates a whole JSONL input file; raises InputError listing every bad line.

    Checks, per line: valid JSON, a string/int `id` unique in the file, exactly one prompt field
    of the right type, known keys, and sampling values that `SamplingParams` accepts."""
    records: list[Record] = []
    errors: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append((line_no, f"invalid JSON: {e}"))
                continue
            try:
                record = parse_record(obj, line_no, defaults, seed)
            except ValueError as e:
                errors.append((line_no, str(e)))
                continue
            if record.key in first_line:
                errors.append(
                    (
                        line_no,
                        f"duplicate id {json.dumps(record.id)} (first on line "
                        f"{first_line[record.key]})",
                    )
                )
                continue
            first_line[record.key] = line_no
            records.append(record)
    if errors:
        raise InputError(path, errors)
    return records


# ---------------------------------------------------------------------------------- output
def prepare_output(path: str | os.PathLike[str]) -> list[str]:
    """Ids already in the output file (in file order), after truncating away a trailing partial
    line left by a crash. A missing file has none; a corrupt line before the last is an error."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last complete line
    if end < len(data):
        log.warning(
            "%s: truncating a partial last line (%d bytes) left by an interrupted run",
            path,
            len(data) - end,
        )
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    done: list[str] = []
    for line_no, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            done.append(id_key(obj["id"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise InputError(path, [(line_no, f"existing output line is unreadable: {e}")]) from e
    return done


def _logprobs_json(logprobs: Iterable[Mapping[int, jinfer.Logprob]]) -> list[list[dict[str, Any]]]:
    return [
        [
            {"token_id": tid, "logprob": lp.logprob, "rank": lp.rank, "token": lp.decoded_token}
            for tid, lp in entry.items()
        ]
        for entry in logprobs
    ]


def output_record(record: Record, out: jinfer.RequestOutput) -> dict[str, Any]:
    """The JSON object written for one finished record."""
    completions = sorted(out.outputs, key=lambda c: c.index)
    result: dict[str, Any] = {"id": record.id}
    if record.params.n == 1:
        (c,) = completions
        result["text"] = c.text
        result["token_ids"] = list(c.token_ids)
        result["finish_reason"] = c.finish_reason
    else:
        result["texts"] = [c.text for c in completions]
        result["token_ids"] = [list(c.token_ids) for c in completions]
        result["finish_reason"] = [c.finish_reason for c in completions]
    result["prompt_tokens"] = len(out.prompt_token_ids)
    result["completion_tokens"] = sum(len(c.token_ids) for c in completions)
    if record.params.logprobs is not None:
        per = [_logprobs_json(c.logprobs or []) for c in completions]
        result["logprobs"] = per[0] if record.params.n == 1 else per
    return result


# --------------------------------------------------------------------------------- prompts
def encode_record(tokenizer: Any, record: Record) -> list[int]:
    if record.prompt_token_ids is not None:
        return list(record.prompt_token_ids)
    if record.messages is not None:
        return list(
            tokenizer.apply_chat_template(
                record.messages, add_generation_prompt=True, tokenize=True
            )
        )
    assert record.prompt is not None
    return list(tokenizer.encode(record.prompt))


def check_prompts(llm: jinfer.LLM, records: Sequence[Record], path: str) -> None:
    """Tokenizes every record (without keeping the ids) and checks it fits the engine; raises
    InputError naming the lines that do not."""
    max_len = llm.engine.config.max_model_len
    vocab = llm.model_config.vocab_size
    errors: list[tuple[int, str]] = []
    for record in records:
        try:
            ids = encode_record(llm.get_tokenizer(), record)
        except Exception as e:  # a chat template may reject a conversation in any way
            errors.append((record.line, f"cannot build the prompt: {e}"))
            continue
        if not ids:
            errors.append((record.line, "the prompt encodes to no tokens"))
        elif len(ids) > max_len:
            errors.append(
                (record.line, f"prompt has {len(ids)} tokens, more than --max-model-len={max_len}")
            )
        elif any(t >= vocab for t in ids):
            bad = next(t for t in ids if t >= vocab)
            errors.append((record.line, f"token id {bad} is outside the vocabulary [0, {vocab})"))
    if errors:
        raise InputError(path, errors)
