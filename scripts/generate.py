"""Offline batch generation with jinfer: a few prompts on the command line, or a JSONL file.

Quick look (what ``make generate`` runs)::

    .venv/bin/python scripts/generate.py --model smollm2-135m-instruct \\
        --chat "Write a haiku about the sea."
    .venv/bin/python scripts/generate.py --prompt "The capital of France is" --temperature 0

``--chat`` applies the model's chat template, ``--prompt`` continues raw text; both repeat and
mix, and each answer is printed to stdout in command-line order.

Batch mode::

    .venv/bin/python scripts/generate.py --input in.jsonl --output out.jsonl --max-tokens 128

The input is either an OpenAI batch file (its first line has a ``custom_id``) or jinfer's own
record format.

OpenAI batch files (what ``vllm run-batch`` and OpenAI's Batch API read): each line is
``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"}``,
the body as the server takes it (``response_format``, ``tools``, ... included), validated and
answered by the server's own code in this process. Each output line is ``{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}``: the server's response body
(``usage`` included), or its error body with ``error: {"code", "message"}`` for a line that
failed -- malformed, a duplicate ``custom_id``, a request the server refuses; the run goes on.
Up to ``--batch-size`` requests run at once; each result is written as it finishes, and a rerun
skips the ``custom_id``s already in the output. A summary (ok, failed, tokens, tok/s) ends it.

jinfer's record format: each input line is one JSON object with an ``id`` (string or integer,
unique; ``1`` and ``"1"`` count as the same id; absent: the line number) and exactly one of
``prompt`` (text), ``prompt_token_ids`` (list of ints) or ``messages`` (a chat:
``[{"role": "user", "content": "..."}]``). A record may also set any of
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
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import _openai_batch
import _ray_batch
from _records import (
    SEED_RANGE,
    InputError,
    Record,
    check_prompts,
    encode_record,
    load_records,
    output_record,
    prepare_output,
)

import jinfer
from jinfer.config.cli import add_engine_args, check_engine_args, engine_options
from jinfer.distributed.multihost import GroupError

log = logging.getLogger("generate")


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
        if _openai_batch.is_batch_file(in_path):
            if args.ray_actors:
                log.error("--ray-actors runs jinfer's record format; OpenAI batch files run here")
                return 2
            return _openai_batch.run_file(args, in_path, out_path, build_llm, SetupError)
    except OSError as e:
        log.error("%s", e)
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
    if args.ray_actors:
        return _ray_batch.run_file(args, records, pending, out_path)

    written = tokens_in = tokens_out = 0
    t0 = time.perf_counter()
    try:
        llm = build_llm(args)
        t0 = time.perf_counter()  # (generation, not loading)
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
                tokens_in += sum(len(o.prompt_token_ids) for o in results)
                tokens_out += sum(len(c.token_ids) for o in results for c in o.outputs)
                bar.set_postfix(tok_s=f"{tokens_out / (time.perf_counter() - t0):.1f}")
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
    wall = time.perf_counter() - t0
    log.info(
        "wrote %d record(s) to %s: %d prompt and %d completion tokens in %.1f s (%.1f tok/s)",
        written, out_path, tokens_in, tokens_out, wall, tokens_out / max(wall, 1e-9),
    )  # fmt: skip
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the record formats (the epilog) as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Offline generation with jinfer: --chat/--prompt, or --input/--output JSONL.",
        epilog=__doc__.split("\n", 1)[1],  # the formats, in full
        formatter_class=_HelpFormatter,
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
    src.add_argument(
        "--ray-actors",
        type=int,
        default=0,
        help="run a record file on this many Ray Data actors, one LLM each (jinfer[ray])",
    )
    src.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (default: a local one)"
    )

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
    check_engine_args(parser, args)
    if args.node_rank > 0:
        return args  # a follower: it runs rank 0's steps; the work is rank 0's to read
    if args.items and (args.input or args.output):
        parser.error("--chat/--prompt and --input/--output are separate modes: pick one")
    if not args.items and not args.input:
        parser.error("nothing to do: give --chat/--prompt TEXT, or --input and --output")
    if bool(args.input) != bool(args.output):
        parser.error("--input and --output go together")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
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
        if args.node_rank > 0:
            # Every host runs the same command; a follower serves rank 0's steps inside LLM()
            # and exits when rank 0 does (SystemExit 0), or is lost (1).
            build_llm(args)
        return run_file(args) if args.input else run_inline(args)
    except GroupError as e:
        log.error("%s", e)
        return 1
    except SetupError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:  # outside the guarded sections, e.g. during imports or parsing
        log.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
