"""The OpenAI-compatible HTTP server (`python -m jinfer.serve`).

- `protocol`: request/response shapes
- `async_engine`: the engine on its own thread, fed and read from asyncio
- `serving`: completions and chat: validate, submit, stream or collect
- `metrics`: Prometheus, under vLLM's names
- `errors`: OpenAI-style error bodies
- `app`: the FastAPI app and the model's lifecycle
"""
