"""Offline batch generation with jinfer: a few prompts on the command line, or a JSONL file.

Quick look (what ``make generate`` runs)::

    .venv/bin/python scripts/generate.py --model smollm2-135m-instruct \\
        --chat "Write a haiku about the sea."
    .venv/bin/python scripts/generate.py --prompt "The capital of France is" --temperature 0

``--chat`` applies the model's chat template, ``--prompt`` continues raw text; both repeat and
mix, and each answer is printed to stdout in command-line order.

Batch mode::

    .venv/bin/python scripts/generate.py --input in.jsonl --output out.jsonl --max-tokens 128

Each input line is one JSON object with a unique ``id`` (string or integer; ``1`` and ``"1"``
count as the same id) and exactly one of ``prompt`` (text), ``prompt_token_ids`` (list of ints)
or ``messages`` (a chat: ``[{"role": "user", "content": "..."}]``). A record may also set any of
``max_tokens temperature top_p top_k min_p seed stop stop_token_ids ignore_eos min_tokens logprobs
repetition_penalty presence_penalty frequency_penalty n``, overriding the command-line defaults;
any other key is an error (so a typo is not silently ignored). Blank lines are skipped.

Each output line is ``{"id", "text", "token_ids", "finish_reason", "prompt_tokens",
"completion_tokens"}`` (plus ``logprobs`` when asked for). With ``n > 1`` the record has
``texts`` instead of ``text``, and ``token_ids`` and ``finish_reason`` are lists with one entry
per sample; ``completion_tokens`` is then the total over the samples.

The whole input is validated (JSON, ids, prompt fields, sampling values, then -- once the model is
loaded -- prompt lengths) before anything is generated; errors name their 1-based line numbers and
the script exits with status 2. Records are generated ``--batch-size`` at a time, in input order,
and each finished batch is appended to the output and fsync'ed. Rerunning the same command resumes:
ids already in the output are skipped, and a trailing partial line (from a crash) is truncated
away. Ctrl-C loses at most the batch in flight and exits with status 130.

``--seed S`` gives every record without its own ``seed`` one derived from ``S`` and its id, so a
record's samples do not depend on batching or resumption. Without it, records that bring no seed
are sampled from the engine's random stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinfer
from jinfer.config.cli import add_engine_args, check_engine_args, engine_options

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
    if "id" not in obj:
        raise ValueError("missing 'id'")
    record_id = obj["id"]
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


# ------------------------------------------------------------------------------ generation
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


class SetupError(Exception):
    """The engine could not be built from the command line (bad model name, lengths, ...)."""


def build_llm(args: argparse.Namespace) -> jinfer.LLM:
    """Loads the model; raises SetupError for a problem with the command line's settings."""
    try:
        return jinfer.LLM(**engine_options(args))
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(str(e)) from e


def default_sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
    }


def _batches(items: Sequence[Record], size: int) -> Iterable[Sequence[Record]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_file(args: argparse.Namespace) -> int:
    """Batch mode; returns the exit status."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    in_path, out_path = Path(args.input), Path(args.output)
    if out_path.exists() and in_path.resolve() == out_path.resolve():
        log.error("--output must differ from --input")
        return 2
    try:
        records = load_records(in_path, default_sampling(args), args.seed)
        done_list = prepare_output(out_path)
    except InputError as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        log.error("%s", e)
        return 2
    done = set(done_list)
    keys = {r.key for r in records}
    strays = len(done - keys)
    if strays:
        log.warning("%s has %d id(s) that are not in %s", out_path, strays, in_path)
    pending = [r for r in records if r.key not in done]
    log.info(
        "%d records in %s: %d already in %s, %d to generate",
        len(records),
        in_path,
        len(records) - len(pending),
        out_path,
        len(pending),
    )
    if not pending:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.touch()
        return 0

    written = 0
    try:
        llm = build_llm(args)
        try:
            check_prompts(llm, pending, str(in_path))
        except InputError as e:
            log.error("%s", e)
            return 2
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = llm.get_tokenizer()
        with (
            open(out_path, "a", encoding="utf-8") as out,
            logging_redirect_tqdm(),
            tqdm(
                total=len(records),
                initial=len(records) - len(pending),
                desc="records",
                unit="rec",
                file=sys.stderr,
                disable=args.no_progress,
            ) as bar,
        ):
            for batch in _batches(pending, args.batch_size):
                prompts = [
                    {"prompt_token_ids": encode_record(tokenizer, r), "prompt": r.prompt}
                    for r in batch
                ]
                results = llm.generate(prompts, [r.params for r in batch], use_tqdm=False)
                lines = "".join(
                    json.dumps(output_record(r, o), ensure_ascii=False) + "\n"
                    for r, o in zip(batch, results, strict=True)
                )
                out.write(lines)
                out.flush()
                os.fsync(out.fileno())
                written += len(batch)
                bar.update(len(batch))
    except KeyboardInterrupt:
        log.warning(
            "interrupted: %d record(s) written this run, %d of %d now in %s; "
            "rerun the same command to resume",
            written,
            len(records) - len(pending) + written,
            len(records),
            out_path,
        )
        return 130
    log.info("wrote %d record(s) to %s", written, out_path)
    return 0


def run_inline(args: argparse.Namespace) -> int:
    """`--chat` / `--prompt` mode: prints each answer to stdout; returns the exit status."""
    settings = default_sampling(args)
    if args.seed is not None:
        settings["seed"] = args.seed
    params = jinfer.SamplingParams(**settings)  # parse_args has validated these
    try:
        llm = build_llm(args)
        prompts: list[str | dict[str, Any]] = []
        for kind, text in args.items:
            if kind == "chat":
                conv = [{"role": "user", "content": text}]
                ids = llm.get_tokenizer().apply_chat_template(conv, tokenize=True)
                prompts.append({"prompt_token_ids": ids, "prompt": text})
            else:
                prompts.append(text)
        results = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    for i, ((kind, text), out) in enumerate(zip(args.items, results, strict=True)):
        if len(results) > 1:
            print(f"--- [{i + 1}] {kind}: {text}")
        for c in out.outputs:
            print(c.text.strip() if kind == "chat" else c.text)
        if len(results) > 1:
            print()
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------------------------- CLI
class _AppendItem(argparse.Action):
    """Collects --chat and --prompt into one list, keeping their command-line order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = list(getattr(namespace, "items", None) or [])
        items.append((self.const, values))
        namespace.items = items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Offline generation with jinfer: --chat/--prompt, or --input/--output JSONL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.set_defaults(items=[])
    src = p.add_argument_group("what to generate")
    src.add_argument(
        "--chat",
        action=_AppendItem,
        default=argparse.SUPPRESS,
        const="chat",
        metavar="TEXT",
        help="a user message, chat template applied (repeatable)",
    )
    src.add_argument(
        "--prompt",
        action=_AppendItem,
        default=argparse.SUPPRESS,
        const="prompt",
        metavar="TEXT",
        help="raw text to continue (repeatable)",
    )
    src.add_argument("--input", metavar="IN.jsonl", help="JSONL records to generate for")
    src.add_argument(
        "--output", metavar="OUT.jsonl", help="JSONL results, appended to (resumes a run)"
    )
    src.add_argument(
        "--batch-size", type=int, default=64, help="records per generate call and per fsync"
    )
    src.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = p.add_argument_group("sampling defaults (a JSONL record may override them)")
    s.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    s.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="1 disables nucleus sampling")
    s.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    s.add_argument(
        "--seed",
        type=int,
        default=None,
        help="makes sampling reproducible (per record: derived from this and the record's id)",
    )

    e = p.add_argument_group("engine")
    add_engine_args(e, exclude=("seed",))  # --seed above: the records' sampling seeds
    p.set_defaults(max_model_len=2048)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.items and (args.input or args.output):
        parser.error("--chat/--prompt and --input/--output are separate modes: pick one")
    if not args.items and not args.input:
        parser.error("nothing to do: give --chat/--prompt TEXT, or --input and --output")
    if bool(args.input) != bool(args.output):
        parser.error("--input and --output go together")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    check_engine_args(parser, args)
    if args.seed is not None and not 0 <= args.seed < SEED_RANGE:
        parser.error(f"--seed must be in [0, 2**62), got {args.seed}")
    try:
        jinfer.SamplingParams(**default_sampling(args))
    except ValueError as e:
        parser.error(f"invalid sampling default: {e}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    args = parse_args(argv)
    try:
        return run_file(args) if args.input else run_inline(args)
    except SetupError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:  # outside the guarded sections, e.g. during imports or parsing
        log.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
