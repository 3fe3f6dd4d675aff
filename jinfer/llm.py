"""`LLM`: the offline API, shaped like vLLM's.

from jinfer import LLM, SamplingParams
llm = LLM(model="smollm2-135m-instruct")
outs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=32))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jinfer.attention import check_cache_dtype, resolve_backend
from jinfer.attention.backend import AttentionBackend
from jinfer.attention.kv_cache import init_cache
from jinfer.config.model import ModelConfig
from jinfer.distributed.sharding import cache_sharding, make_mesh, place_params
from jinfer.engine.engine import Engine, EngineConfig
from jinfer.loader import named_models
from jinfer.loader.weights import load_weights
from jinfer.models.params import Params
from jinfer.outputs import RequestOutput
from jinfer.runner.compilation import bound_compiled_programs, enable_persistent_cache
from jinfer.sampling_params import SamplingParams
from jinfer.tokenizer.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

Prompt = str | dict[str, Any]


def resolve_kv_cache_dtype(kv_cache_dtype: str, dtype: Any, backend: AttentionBackend) -> Any:
    """`auto`: the model's dtype. A narrower cache (bfloat16 next to float32 weights) halves the
    KV memory and the bytes decode attention reads; the XLA path upcasts each key block."""
    if kv_cache_dtype == "auto":
        return dtype
    kv = resolve_dtype(kv_cache_dtype, option="kv_cache_dtype")
    check_cache_dtype(backend, kv, dtype)
    return kv


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPES = ("auto", *_DTYPES)  # the choices of `dtype` and `kv_cache_dtype`


def resolve_dtype(dtype: str, option: str = "dtype") -> Any:
    """`auto` is float32 on CPU and bfloat16 on accelerators. float32 keeps CPU runs token for
    token with a float32 reference; bfloat16 runs ~2x faster on CPUs with AVX512-BF16 or AMX
    (docs/benchmarks.md) at bfloat16's rounding. `option` names the setting in the error for an
    unknown dtype."""
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


class LLM:
    """Loads a model once, then generates for batches of prompts with continuous batching.

    `LLM(model, **options)`: `model` is a named model, a .gguf file, an HF directory or an orbax
    checkpoint. The options (dtype, max_model_len, tensor_parallel_size, max_num_seqs,
    max_num_batched_tokens, page_size, num_pages, kv_cache_memory_gb, kv_cache_dtype,
    attention_backend, compile_unit, seed, enable_prefix_caching, warmup) and their defaults are
    declared once, on `_setup`; an unknown one is a TypeError.
    """

    def __init__(self, model: str = named_models.DEFAULT_MODEL, **options: Any) -> None:
        t0 = time.perf_counter()
        path = named_models.resolve_model(model)
        cfg, host_params = load_weights(path)
        self._setup(cfg, host_params, load_tokenizer(str(path)), **options)
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
        llm._setup(cfg, params, tokenizer, **options)
        llm.load_time = 0.0
        return llm

    def _setup(
        self,
        cfg: ModelConfig,
        host_params: Params,
        tokenizer: Tokenizer,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 512,
        page_size: int | None = None,  # None: kv_cache.default_page_size (64 for XLA, 16 Pallas)
        num_pages: int | None = None,
        kv_cache_memory_gb: float = 2.0,
        kv_cache_dtype: str = "auto",
        attention_backend: str = "auto",
        compile_unit: str = "auto",
        seed: int = 0,
        enable_prefix_caching: bool = True,
        warmup: bool = True,
    ) -> None:
        enable_persistent_cache()
        bound_compiled_programs()  # before this engine compiles its own
        self.tokenizer = tokenizer
        self.model_config = cfg
        max_model_len = max_model_len or min(cfg.max_position_embeddings, 4096)
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        backend = resolve_backend(
            attention_backend, jax.default_backend(), cfg.head_dim, tensor_parallel_size
        )
        self.dtype = resolve_dtype(dtype)
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype, backend)
        self.mesh = make_mesh(tensor_parallel_size)
        params = place_params(host_params, cfg, self.mesh, self.dtype)
        config = EngineConfig(
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, 8),
            page_size=page_size,
            num_pages=num_pages,
            kv_cache_memory_gb=kv_cache_memory_gb,
            attention_backend=backend.name,
            compile_unit=compile_unit,
            seed=seed,
            enable_prefix_caching=enable_prefix_caching,
        )
        pages = config.resolve_num_pages(cfg, self.kv_cache_dtype)
        # EngineConfig resolves page_size=None to the backend's default.
        sharding = cache_sharding(cfg, self.mesh, pages, config.page_size, backend.layout)
        stored = backend.storage_dtype(self.kv_cache_dtype)
        cache = init_cache(cfg, pages, config.page_size, stored, sharding, layout=backend.layout)
        self.engine = Engine(cfg, params, cache, tokenizer, config)
        self.warmup_time = self.engine.runner.warmup() if warmup else 0.0
        self._ids = itertools.count()

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
        for params in params_list:
            self.engine.validate_params(params)
        ids_in_order = []
        for (ids, text), params in zip(encoded, params_list, strict=True):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, ids, params, prompt=text)
            ids_in_order.append(request_id)
        return self._run(ids_in_order, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conv in conversations:
            ids = self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, tokenize=True
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
