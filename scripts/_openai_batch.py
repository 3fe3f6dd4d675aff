"""The OpenAI Batch API's file format for `generate.py` (what `vllm run-batch` reads and writes).

Input, one request per line::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

`url` is `/v1/chat/completions` or `/v1/completions`; `body` is what the server takes, and goes
through the server's own validation and response building in this process (the engine on its
thread, `jinfer.server.serving.Serving` in front of it, no HTTP), so a line's error is the 400 the
server would answer and its response is the server's body, `usage` included.

Output, one line per input line, in the order requests finish::

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A line that fails (malformed, a duplicate `custom_id`, a request the server refuses) gets
`response.status_code` with the server's error body, and `error: {"code", "message"}`; the run
goes on (a line whose custom_id cannot be read is named `"(line N)"`). Rerunning resumes:
`custom_id`s already in the output are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jinfer
from jinfer import tool_parsers
from jinfer.engine.async_engine import AsyncEngine
from jinfer.server import protocol as P
from jinfer.server.app import parse_object
from jinfer.server.errors import APIError
from jinfer.server.serving import Serving

log = logging.getLogger("generate")

URLS = {"/v1/chat/completions": P.ChatCompletionRequest, "/v1/completions": P.CompletionRequest}


@dataclasses.dataclass
class BatchLine:
    line: int  # 1-based
    custom_id: str
    url: str = ""
    body: dict[str, Any] | None = None
    error: APIError | None = None  # a line that cannot run at all


def is_batch_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file's first record is an OpenAI batch line (it has a `custom_id`)."""
    with open(path, encoding="utf-8") as f:
        for text in f:
            if text.strip():
                try:
                    obj = json.loads(text)
                except ValueError:
                    return False
                return isinstance(obj, dict) and "custom_id" in obj
    return False


def read_batch(path: str | os.PathLike[str]) -> list[BatchLine]:
    """Every non-blank line, checked as far as the file format goes (the body is checked when it
    runs); a line that fails carries its error, and the others still run."""
    lines: list[BatchLine] = []
    first: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if text.strip():
                lines.append(_read_line(n, text, first))
    return lines


def _read_line(n: int, text: str, first: dict[str, int]) -> BatchLine:
    def bad(message: str, custom_id: str | None = None) -> BatchLine:
        # A line without a readable custom_id is named by its number (so a rerun skips it too).
        custom_id = custom_id or f"(line {n})"
        return BatchLine(n, custom_id, error=APIError(400, message, code="invalid_batch_line"))

    try:
        obj = json.loads(text)
    except ValueError as e:
        return bad(f"line {n} is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return bad(f"line {n} must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad(f"line {n}: custom_id must be a non-empty string")
    if custom_id in first:
        message = f"duplicate custom_id {custom_id[:60]!r} (first on line {first[custom_id]})"
        return bad(message, custom_id)
    first[custom_id] = n
    if obj.get("method", "POST") != "POST":
        return bad(f"method must be POST, got {str(obj.get('method'))[:20]!r}", custom_id)
    url = obj.get("url")
    if url not in URLS:
        return bad(f"url must be one of {', '.join(URLS)}; got {str(url)[:60]!r}", custom_id)
    if not isinstance(obj.get("body"), dict):
        return bad("body must be a JSON object (the request the server takes)", custom_id)
    return BatchLine(n, custom_id, url, obj["body"])


def done_ids(path: Path) -> set[str]:
    """custom_ids already in an output file (a trailing partial line is truncated away)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: truncating a partial last line left by an interrupted run", path)
        with open(path, "r+b") as f:
            f.truncate(end)
    out = set()
    for raw in data[:end].splitlines():
        if raw.strip():
            custom_id = json.loads(raw).get("custom_id")
            if custom_id is not None:
                out.add(custom_id)
    return out


def _entry(line: BatchLine, status: int, body: dict[str, Any]) -> dict[str, Any]:
    error = None
    if status != 200:
        e = body.get("error", {})
        error = {"code": e.get("code") or e.get("type"), "message": e.get("message")}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": {
            "status_code": status,
            "request_id": body.get("id", f"req_{uuid.uuid4().hex}"),
            "body": body,
        },
        "error": error,
    }


class BatchRunner:
    """The server's request handling over an `LLM`'s engine, for batch lines."""

    def __init__(self, llm: jinfer.LLM, model_name: str, concurrency: int) -> None:
        self.llm = llm
        self.model_name = model_name
        self.concurrency = concurrency
        self.ok = self.failed = self.prompt_tokens = self.completion_tokens = 0

    async def run(self, lines: list[BatchLine], write: Any) -> None:
        """Runs `lines`, `concurrency` at a time; `write(entry)` gets each output line."""
        engine = AsyncEngine(self.llm.engine, max_waiting_requests=self.concurrency)
        engine.start(asyncio.get_running_loop())
        parser = tool_parsers.DEFAULT_PARSERS.get(self.model_name)
        serving = Serving(
            engine, self.llm.get_tokenizer(), self.model_name, parser, parser is not None
        )
        slots = asyncio.Semaphore(self.concurrency)

        async def one(line: BatchLine) -> None:
            async with slots:
                status, body = await self._answer(serving, line)
            if status == 200:
                self.ok += 1
                self.prompt_tokens += body["usage"]["prompt_tokens"]
                self.completion_tokens += body["usage"]["completion_tokens"]
            else:
                self.failed += 1
            write(_entry(line, status, body))

        try:
            await asyncio.gather(*(one(line) for line in lines))
        finally:
            await asyncio.to_thread(engine.stop)

    async def _answer(self, serving: Serving, line: BatchLine) -> tuple[int, dict[str, Any]]:
        try:
            if line.error is not None:
                raise line.error
            body = parse_object(line.body, URLS[line.url])
            if body.model is not None and body.model != self.model_name:
                raise APIError(
                    404,
                    f"model {body.model[:60]!r} is not the one loaded ({self.model_name!r})",
                    param="model",
                    code="model_not_found",
                )
            if body.stream:
                raise APIError(400, "stream is not supported in a batch file", param="stream")
            handle = serving.chat if line.url == "/v1/chat/completions" else serving.completion
            gen = await asyncio.to_thread(handle, body)
            return 200, await serving.collect(gen, serving.start(gen, None))
        except APIError as e:
            return e.status, e.body()


def run_file(
    args: argparse.Namespace, in_path: Path, out_path: Path, build_llm: Any, setup_error: type
) -> int:
    """generate.py's run of an OpenAI batch file (`build_llm(args)` loads the model, raising
    `setup_error` for a bad command line); returns the exit status."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    lines = read_batch(in_path)
    done = done_ids(out_path)
    pending = [b for b in lines if b.custom_id not in done]
    log.info(
        "%d requests in %s (OpenAI batch format): %d already in %s, %d to run",
        len(lines), in_path, len(lines) - len(pending), out_path, len(pending),
    )  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not pending:
        out_path.touch()
        return 0
    try:
        llm = build_llm(args)
    except setup_error as e:
        log.error("%s", e)
        return 2
    runner = BatchRunner(llm, args.model, args.batch_size)
    t0 = time.perf_counter()
    with (
        open(out_path, "a", encoding="utf-8") as out,
        logging_redirect_tqdm(),
        tqdm(
            total=len(lines), initial=len(lines) - len(pending), desc="requests", unit="req",
            file=sys.stderr, disable=args.no_progress,
        ) as bar,
    ):  # fmt: skip

        def write(entry: dict[str, Any]) -> None:
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(1)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(tok_s=f"{runner.completion_tokens / elapsed:.1f}", failed=runner.failed)

        try:
            asyncio.run(runner.run(pending, write))
        except KeyboardInterrupt:
            log.warning(
                "interrupted: %d request(s) written this run; rerun the same command to resume",
                runner.ok + runner.failed,
            )
            return 130
    wall = time.perf_counter() - t0
    log.info(
        "%d ok, %d failed; %d prompt and %d completion tokens in %.1f s (%.1f output tok/s); "
        "results in %s",
        runner.ok, runner.failed, runner.prompt_tokens, runner.completion_tokens, wall,
        runner.completion_tokens / wall, out_path,
    )  # fmt: skip
    return 0
