"""`LLM`: the offline API, shaped like vLLM's.

from jinfer import LLM, SamplingParams
llm = LLM(model="smollm2-135m-instruct")
outs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=32))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from jinfer import tool_parsers
from jinfer.config.engine import EngineConfig
from jinfer.config.model import ModelConfig
from jinfer.distributed import multihost
from jinfer.engine.builder import build_engine
from jinfer.engine.kv_events import KVEventPublisher
from jinfer.engine.output_guard import load_guard
from jinfer.loader import load_weights, named_models
from jinfer.models.params import Params
from jinfer.outputs import RequestOutput
from jinfer.runner.mirror import follow
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer.tokenizer import Tokenizer, load_tokenizer
from jinfer.tool_parsers import prompt as tool_prompt

log = logging.getLogger(__name__)

Prompt = str | dict[str, Any]


def _engine_config(options: dict[str, Any]) -> EngineConfig:
    for name in ("kv_events_config", "speculative_config"):  # dicts, as vLLM's LLM takes them
        if isinstance(options.get(name), dict):
            options = {**options, name: json.dumps(options[name])}
    return EngineConfig(**options)


def _kv_events(config: EngineConfig) -> KVEventPublisher | None:
    """The leader's KV cache events publisher, if enabled (bound before anything loads)."""
    if config.kv_events.enabled and config.node_rank == 0:
        return KVEventPublisher(config.kv_events)
    return None


class LLM:
    """Loads a model once, then generates for batches of prompts with continuous batching.

    `LLM(model, **options)`: `model` is a named model, a .gguf file, an HF directory or an orbax
    checkpoint; the options are `EngineConfig`'s (config/engine.py: dtype, max_model_len,
    tensor_parallel_size, max_num_seqs, max_num_batched_tokens, page_size, num_pages,
    kv_cache_memory_gb, kv_cache_dtype, attention_backend, compile_unit, enable_prefix_caching,
    async_scheduling, seed, warmup), declared there once with their defaults. An unknown one is
    a TypeError, a value an option does not take a ValueError that names it.
    """

    def __init__(self, model: str = named_models.DEFAULT_MODEL, **options: Any) -> None:
        t0 = time.perf_counter()
        config = _engine_config(options)  # checked before anything loads
        load_guard(config.output_guard)  # (and the output guard it names)
        path = named_models.resolve_model(model)
        group = multihost.join(config, model) if config.nnodes > 1 else None
        # The leader announces its prefix cache (bound now: a taken port fails before loading).
        kv_events = _kv_events(config)
        cfg, host_params = load_weights(path)
        self._setup(cfg, host_params, load_tokenizer(str(path)), config, group, kv_events)
        self.tool_format = tool_parsers.DEFAULT_PARSERS.get(model, "hermes")
        self.load_time = time.perf_counter() - t0 - self.warmup_time
        log.info(
            "loaded %s (%s) in %.1f s, warm-up %.1f s",
            model,
            cfg.arch,
            self.load_time,
            self.warmup_time,
        )

    @classmethod
    def from_params(
        cls, cfg: ModelConfig, params: Params, tokenizer: Tokenizer, **options: Any
    ) -> LLM:
        """An LLM over weights already in memory (random-weight tests, research code)."""
        llm = cls.__new__(cls)
        config = _engine_config(options)
        llm._setup(cfg, params, tokenizer, config, None, _kv_events(config))
        llm.tool_format = "hermes"
        llm.load_time = 0.0
        return llm

    def _setup(
        self,
        cfg: ModelConfig,
        host_params: Params,
        tokenizer: Tokenizer,
        config: EngineConfig,
        group: multihost.ProcessGroup | None = None,
        kv_events: KVEventPublisher | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_config = cfg
        quiet = multihost.stdout_to_stderr() if group is not None else contextlib.nullcontext()
        with quiet:
            self.engine = build_engine(cfg, host_params, tokenizer, config, group, kv_events)
        self.warmup_time = self.engine.warmup_time
        self._ids = itertools.count()
        if group is not None and not group.is_leader:
            # The same script runs on every host: a follower serves the leader's steps here,
            # and its process ends when the leader's does (status 0 after a clean stop).
            log.info("rank %d: following rank 0's steps", group.rank)
            follow(self.engine.runner, self.engine.runner.mirror)
            raise SystemExit(0)

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (between `generate` calls nothing is in use, so all of
        them): the next prompts are prefilled from scratch."""
        self.engine.reset_prefix_cache()

    # ---------------------------------------------------------------- generate
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order. A prompt is a string or
        `{"prompt_token_ids": [...]}`."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        # Validate everything before queueing anything: a bad prompt costs no other prompt.
        encoded = [self._encode(p) for p in prompts]
        encoded = [(self.engine.validate_prompt(ids), text) for ids, text in encoded]
        grammars = [self.engine.validate_params(params) for params in params_list]
        ids_in_order = []
        for (ids, text), params, grammar in zip(encoded, params_list, grammars, strict=True):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, ids, params, prompt=text, grammar=grammar)
            ids_in_order.append(request_id)
        return self._run(ids_in_order, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        tool_call_parser: str | None = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them. `tools`
        (OpenAI's shape) are listed in the prompt, and messages may hold assistant
        `tool_calls` and `tool` results: by the template where it knows tools, else in the
        `tool_call_parser` format (default: the named model's own, else hermes). Read the
        calls from an output with `jinfer.tool_parsers.get(name).extract(text, tools)`."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        parser = tool_parsers.get(tool_call_parser or self.tool_format)
        prompts = []
        for conv in conversations:
            conv, extra = tool_prompt.render(
                [dict(m) for m in conv], tools, parser, self.tokenizer.chat_template
            )
            ids = self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, tokenize=True, **extra
            )
            prompts.append({"prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return [int(t) for t in prompt["prompt_token_ids"]], prompt.get("prompt")
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.tokenizer.encode(prompt["prompt"]), prompt["prompt"]
        raise ValueError(
            f"a prompt must be a string or a dict with 'prompt_token_ids'; got {type(prompt)}"
        )

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        pending = set(request_ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm)
        try:
            while pending:
                for out in self.engine.step(finished_only=True):
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in pending:  # never leave half-finished requests holding pages
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in request_ids]
