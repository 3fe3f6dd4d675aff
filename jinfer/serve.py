"""`python -m jinfer.serve`: the OpenAI-compatible HTTP server.

    python -m jinfer.serve                    # smollm2-135m-instruct on 127.0.0.1:8000
    python -m jinfer.serve --model gemma3-270m --port 9000 --api-key secret

The port opens at once; `/health` answers 503 while the model loads and compiles, then 200.
One model over several processes (hosts), SGLang's flags: run the same command on every host
with `--nnodes N --node-rank R --dist-init-addr HOST:PORT` (rank 0's address) and a
`--tensor-parallel-size` that counts every host's devices; rank 0 serves HTTP, the others
run its steps (jinfer/distributed/multihost.py).

SIGTERM or Ctrl-C stops admitting, gives in-flight requests `--shutdown-timeout` seconds, ends
the rest with a final `abort` event, and exits 0. If the engine loop ever dies, its traceback is
logged, in-flight requests end with an error, and the server exits 1 for a supervisor to restart
it (`--no-exit-on-engine-error`: it stays up answering 503, for debugging).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import Any

import uvicorn

from jinfer import tool_parsers
from jinfer.config.cli import add_engine_args, check_engine_args, engine_options
from jinfer.distributed.multihost import GroupError
from jinfer.llm import LLM

log = logging.getLogger("jinfer.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jinfer.serve", description=__doc__.split("\n")[0])
    add_engine_args(p)
    p.add_argument(
        "--served-model-name", default=None, help="the name clients use (default: --model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("JINFER_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* (default: $JINFER_API_KEY)",
    )
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=256,
        help="requests queued beyond the running batch before answering 429",
    )
    p.add_argument("--max-request-body-bytes", type=int, default=16 * 2**20)
    p.add_argument("--shutdown-timeout", type=float, default=10.0)
    p.add_argument(
        "--exit-on-engine-error",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exit with status 1 when the engine loop dies, for a supervisor to restart the "
        "server (default on; off: stay up answering 503, for debugging)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=sorted(tool_parsers.TOOL_PARSERS),
        default=None,
        help="the format the model writes tool calls in (default: the named model's own: "
        + ", ".join(f"{m} {f}" for m, f in tool_parsers.DEFAULT_PARSERS.items())
        + "; else none, and tool_choice auto is refused)",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=None,
        help='serve tool_choice "auto", parsing calls from what the model writes (default: on '
        "when there is a tool call parser)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    check_engine_args(p, args)
    return args


def make_loader(args: argparse.Namespace) -> Any:
    def load() -> tuple[Any, Any]:
        llm = LLM(**engine_options(args))
        return llm.engine, llm.tokenizer

    return load


def main(argv: list[str] | None = None) -> int:
    from jinfer.server.app import ServerConfig, create_app

    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.node_rank > 0:
        # A follower of a process group: no HTTP server, only the leader's steps, until the
        # leader stops (exit 0) or is lost (exit 1).
        log.info("rank %d of %d: following %s", args.node_rank, args.nnodes, args.dist_init_addr)
        try:
            LLM(**engine_options(args))  # returns only by SystemExit
        except GroupError as e:
            log.error("%s", e)
            return 1
    parser = args.tool_call_parser or tool_parsers.DEFAULT_PARSERS.get(args.model)
    auto = args.enable_auto_tool_choice
    if auto and parser is None:
        log.error("--enable-auto-tool-choice needs a --tool-call-parser for %s", args.model)
        return 2
    config = ServerConfig(
        served_model_name=args.served_model_name or args.model,
        model_root=args.model,
        api_key=args.api_key or None,
        max_waiting_requests=args.max_waiting_requests,
        max_body_bytes=args.max_request_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        exit_on_engine_error=args.exit_on_engine_error,
        tool_call_parser=parser,
        enable_auto_tool_choice=auto if auto is not None else parser is not None,
    )
    app = create_app(config, make_loader(args))
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    server = GracefulServer(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(args.shutdown_timeout) + 5,
            timeout_keep_alive=5,
        )
    )
    log.info("listening on http://%s:%d (model %s)", args.host, sock.getsockname()[1], args.model)
    state = app.state.jinfer
    state.request_exit = lambda: setattr(server, "should_exit", True)  # as a first SIGTERM
    server.run(sockets=[sock])
    if state.loader is not None and state.loader.is_alive():
        # Still loading (compiling): nothing to drain, and a compile thread cannot be joined
        # quickly. Leave without running interpreter teardown under it.
        logging.shutdown()
        os._exit(0)
    return state.exit_code  # 1 after the engine loop died


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the app to drain when the first SIGTERM/SIGINT arrives.

    uvicorn re-raises a captured signal once it has shut down (so the process dies of it);
    a drained shutdown is a clean exit here, so the signal is consumed instead.
    """

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = self.config.app.state.jinfer
        if not self.should_exit and state.loop is not None:
            state.loop.call_soon_threadsafe(state.begin_shutdown)
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


if __name__ == "__main__":
    raise SystemExit(main())
