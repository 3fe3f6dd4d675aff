"""The FastAPI app: routes, auth, body limits, errors, and the engine's lifecycle.

The HTTP server is up at once; the model loads and compiles on a background thread meanwhile
(`/health` says 503 until it is ready, then 200). Handlers only validate, submit and stream;
the engine runs on its own thread (`AsyncEngine`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import jinfer
from jinfer.distributed.multihost import EXIT_GRACE
from jinfer.engine.async_engine import AsyncEngine, EngineDeadError
from jinfer.server import protocol as P
from jinfer.server.errors import APIError, bad_request, validation_error
from jinfer.server.metrics import CONTENT_TYPE, ServerMetrics
from jinfer.server.serving import ClientGone, Serving

log = logging.getLogger(__name__)

# (engine, tokenizer): an `Engine` (or one with its methods) and a `Tokenizer`
Loader = Callable[[], tuple[Any, Any]]


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str
    model_root: str = ""  # what `model` was loaded from, shown by /v1/models
    api_key: str | None = None
    max_waiting_requests: int = 256  # beyond running + this many, 429
    max_body_bytes: int = 16 * 2**20
    shutdown_timeout: float = 10.0  # on SIGTERM, in-flight requests get this long, then abort
    # A dead engine loop ends the process (exit status 1) once its streams have ended, so that
    # a supervisor restarts it (vLLM's behaviour); off: it stays up, answering 503 (debugging).
    exit_on_engine_error: bool = True
    # Tool calling: the format models' calls are read in (`jinfer.tool_parsers`; None: no
    # "auto" tool choice), and whether "auto" is served (vLLM's --enable-auto-tool-choice).
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False


class ServerState:
    def __init__(self, config: ServerConfig, load: Loader) -> None:
        self.config = config
        self.load = load
        self.metrics = ServerMetrics(config.served_model_name)
        self.async_engine: AsyncEngine | None = None
        self.serving: Serving | None = None
        self.tokenizer: Any = None
        self.load_error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loader: threading.Thread | None = None
        self.created = int(time.time())
        # Set by whoever runs the HTTP server (serve.py): stops it, as a first SIGTERM does.
        self.request_exit: Callable[[], None] | None = None
        self.exit_code = 0  # what the process should exit with

    # -------------------------------------------------------------- lifecycle
    def start_loading(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.loader = threading.Thread(target=self._load, name="jinfer-load", daemon=True)
        self.loader.start()

    def _load(self) -> None:
        try:
            engine, tokenizer = self.load()
        except BaseException as e:  # noqa: BLE001 - reported by /health, logged here
            log.exception("loading the model failed")
            self.load_error = e
            self.loop.call_soon_threadsafe(self._on_engine_dead, e)  # exit 1 (or stay: 503)
            return
        self.loop.call_soon_threadsafe(self._on_loaded, engine, tokenizer)

    def _on_loaded(self, engine: Any, tokenizer: Any) -> None:
        async_engine = AsyncEngine(
            engine,
            max_waiting_requests=self.config.max_waiting_requests,
            on_output=self.metrics.observe,
            on_dead=self._on_engine_dead,
        )
        async_engine.start(self.loop)
        self.metrics.attach(engine)
        self.tokenizer = tokenizer
        self.serving = Serving(
            async_engine,
            tokenizer,
            self.config.served_model_name,
            tool_call_parser=self.config.tool_call_parser,
            enable_auto_tool_choice=self.config.enable_auto_tool_choice,
        )
        self.async_engine = async_engine
        group = getattr(engine, "group", None)
        if group is not None:  # a lost rank ends every request in flight, then the process
            group.on_lost.append(self._on_rank_lost)
        log.info("ready: serving %s", self.config.served_model_name)

    def _on_rank_lost(self, rank: int, reason: str) -> None:  # on the group's thread
        error = EngineDeadError(f"lost rank {rank} of the process group: {reason}")
        self.loop.call_soon_threadsafe(self.async_engine.fail, error)

    def _on_engine_dead(self, error: BaseException) -> None:
        """The engine loop died (logged there): exit non-zero once the failed streams are sent,
        unless told to stay up."""
        self.exit_code = 1
        if self.config.exit_on_engine_error and self.request_exit is not None:
            group = getattr(getattr(self.async_engine, "engine", None), "group", None)
            if group is not None:  # a collective failed: the group names the lost rank and
                # exits 1 itself (multihost.ProcessGroup.lost); exit here only if it does not
                log.error("the engine loop died: waiting for the process group to name the cause")
                self.loop.call_later(2 * EXIT_GRACE, self.request_exit)
                return
            log.error("the engine loop died: shutting down (exit status 1)")
            self.request_exit()

    def begin_shutdown(self) -> None:
        """Stops admitting; in-flight requests get `shutdown_timeout` s, then end with `abort`."""
        if self.async_engine is None:
            return
        self.async_engine.draining = True
        self.loop.call_later(self.config.shutdown_timeout, self.async_engine.abort_all)

    def close(self) -> None:
        if self.async_engine is not None:
            self.async_engine.stop()

    # ----------------------------------------------------------------- guards
    def health(self) -> tuple[int, dict[str, Any]]:
        if self.load_error is not None:
            return 503, {"status": "error", "error": f"loading failed: {self.load_error!r}"}
        if self.async_engine is None:
            return 503, {"status": "loading"}
        if self.async_engine.error is not None:
            return 503, {"status": "error", "error": repr(self.async_engine.error)}
        if self.async_engine.draining:
            return 503, {"status": "shutting_down"}
        return 200, {"status": "ok"}

    def require_ready(self) -> Serving:
        if self.serving is None:  # draining or a dead engine is refused at admission
            status = self.health()[1]["status"]
            raise APIError(503, f"the server is not ready: {status}", code="unavailable")
        return self.serving

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(
                404,
                f"The model {_quote(model)} does not exist; this server serves "
                f"{_quote(self.config.served_model_name)}.",
                param="model",
                code="model_not_found",
            )


MAX_JSON_DEPTH = 32  # nesting of the request body (a chat message's content parts: 4)


def _quote(text: str, limit: int = 80) -> str:
    """Client text inside an error message: escaped, and cut short."""
    shown = json.dumps(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + '..."'


async def parse_body(request: Request, cls: type[BaseModel]) -> Any:
    """Strict parsing with named errors: UTF-8, then JSON, its depth and text, then the schema."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer past Python's 4300 digits
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    return parse_object(obj, cls)


def parse_object(obj: Any, cls: type[BaseModel]) -> Any:
    """A decoded body as `cls`, or the API error the server answers it with (batch files'
    lines go through here too)."""
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    check_json(obj)
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def check_json(obj: Any) -> None:
    """400 for a body nested deeper than MAX_JSON_DEPTH, or holding text that is not valid
    Unicode (a lone surrogate such as "\\ud800" parses as JSON, and nothing downstream can
    encode it): checked once here, for every field of every endpoint, naming where."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    field = path.lstrip(".")
                    where = _quote(field) if field else "the body"
                    raise bad_request(
                        f"{where}: not valid Unicode text (a lone surrogate at {e.start})",
                        field.split(".")[0].split("[")[0].encode("ascii", "replace").decode()
                        or None,
                    ) from None
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, f"{path}.{k!s:.40}", depth + 1))
                stack.append((v, f"{path}.{k!s:.40}", depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is a 413, declared or streamed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> APIError:
        return APIError(
            413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large"
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._error().response()(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited, send)


def create_app(config: ServerConfig, load: Loader) -> FastAPI:
    state = ServerState(config, load)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        state.start_loading(asyncio.get_running_loop())
        yield
        state.close()

    app = FastAPI(title="jinfer", version=jinfer.__version__, lifespan=lifespan)
    app.state.jinfer = state
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    async def check_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        )
        if not ok:
            raise APIError(
                401,
                "a valid API key is required: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = state.health()
        return JSONResponse(body, status_code=status)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": jinfer.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "jinfer",
            "root": config.model_root or config.served_model_name,
        }
        if state.serving is not None:
            card["max_model_len"] = state.serving.max_model_len
        return {"object": "list", "data": [card]}

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, P.CompletionRequest)
        state.check_model(body.model)
        serving = state.require_ready()
        gen = await asyncio.to_thread(serving.completion, body)  # tokenizing: off the loop
        return await _respond(serving, gen, request, body.stream)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, P.ChatCompletionRequest)
        state.check_model(body.model)
        serving = state.require_ready()
        gen = await asyncio.to_thread(serving.chat, body)  # the template, tokenizing: off the loop
        return await _respond(serving, gen, request, body.stream)

    @app.post("/reset_prefix_cache", dependencies=[Depends(check_api_key)])
    async def reset_prefix_cache() -> Response:
        """vLLM's: forgets every cached prefix no running request holds (benchmarks use it to
        start cold; the KV events name the pages removed)."""
        serving = state.require_ready()
        try:
            await serving.engine.call(serving.engine.engine.reset_prefix_cache)
        except EngineDeadError as e:
            raise APIError(503, str(e), code="unavailable") from None
        return Response(status_code=200)

    @v1.post("/completions/render")
    async def render_completion(request: Request) -> list[dict[str, Any]]:
        body = await parse_body(request, P.CompletionRequest)
        state.check_model(body.model)
        serving = state.require_ready()
        prompts = await asyncio.to_thread(serving.render, body)  # tokenizing: off the loop
        return [{"token_ids": ids} for ids in prompts]

    @v1.post("/chat/completions/render")
    async def render_chat(request: Request) -> dict[str, Any]:
        body = await parse_body(request, P.ChatCompletionRequest)
        state.check_model(body.model)
        serving = state.require_ready()
        (ids,) = await asyncio.to_thread(serving.render, body)  # the template: off the loop
        return {"token_ids": ids}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, P.TokenizeRequest)
        state.check_model(body.model)
        serving = state.require_ready()
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages")

        def encode() -> list[int]:
            if body.prompt is not None:
                serving.check_length(body.prompt, "prompt")
                return state.tokenizer.encode(
                    body.prompt, add_special_tokens=body.add_special_tokens
                )
            tools = [t.model_dump() for t in body.tools] if body.tools else None
            return serving.chat_prompt_ids(body.messages, body.add_generation_prompt, tools)

        ids = await asyncio.to_thread(encode)  # off the event loop
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": list(ids)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, P.DetokenizeRequest)
        state.check_model(body.model)
        serving = state.require_ready()
        vocab = serving.engine.engine.cfg.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    app.include_router(v1)
    return app


async def _respond(serving: Serving, gen: Any, request: Request, stream: bool) -> Response:
    sub = serving.start(gen, request)
    if stream:
        return StreamingResponse(
            serving.stream(gen, sub),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        return JSONResponse(await serving.collect(gen, sub))
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the requests were aborted
