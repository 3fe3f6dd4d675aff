"""Batch generation past one machine on Ray Data (`pip install 'jinfer[ray]'`).

`build_processor(model, num_actors=2, **engine_options)` returns a function from a Ray Dataset
to a Ray Dataset. Each of `num_actors` actors holds one `LLM` (its devices: a GPU, a TPU host,
or CPU threads) and generates for the rows `map_batches` hands it, with continuous batching
inside; rows keep their other columns, so their identity survives any reordering.

Input columns: exactly one of `prompt` (text), `messages` (a chat, as JSON text) or
`prompt_token_ids` (a list, or its JSON text; the others empty), and `sampling_params` (JSON
text of `SamplingParams` fields; may be empty).
Output columns, ray.data.llm's names: `generated_text`, `generated_token_ids`, `finish_reason`
(lists of `n` entries, as JSON text), `num_input_tokens`, `num_generated_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np


class _Generator:
    """One actor: an `LLM`, built once, and `__call__` per batch of rows."""

    def __init__(self, model: str, engine_options: dict[str, Any]) -> None:
        from jinfer import LLM

        self.llm = LLM(model, **engine_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from jinfer import SamplingParams

        tokenizer = self.llm.get_tokenizer()
        rows = len(next(iter(batch.values())))
        prompts, params = [], []
        for i in range(rows):
            prompts.append(_prompt(batch, i, tokenizer))
            raw = batch["sampling_params"][i] if "sampling_params" in batch else ""
            params.append(SamplingParams(**(json.loads(raw) if raw else {})))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        done = [sorted(o.outputs, key=lambda c: c.index) for o in outs]
        return {
            **batch,
            "generated_text": np.array([json.dumps([c.text for c in cs]) for cs in done]),
            "generated_token_ids": np.array(
                [json.dumps([list(c.token_ids) for c in cs]) for cs in done]
            ),
            "finish_reason": np.array([json.dumps([c.finish_reason for c in cs]) for cs in done]),
            "num_input_tokens": np.array([len(o.prompt_token_ids) for o in outs]),
            "num_generated_tokens": np.array([sum(len(c.token_ids) for c in cs) for cs in done]),
        }


def _prompt(batch: dict[str, np.ndarray], i: int, tokenizer: Any) -> dict[str, Any]:
    def cell(name: str) -> Any:
        if name not in batch:
            return None
        value = batch[name][i]
        return None if value is None or (isinstance(value, float) and np.isnan(value)) else value

    ids = cell("prompt_token_ids")
    if isinstance(ids, str):  # as JSON text (a column of lists of several lengths)
        ids = json.loads(ids) if ids else None
    if ids is not None and len(ids):
        return {"prompt_token_ids": [int(t) for t in ids]}
    if (messages := cell("messages")) is not None and messages != "":
        conv = json.loads(messages)
        ids = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        return {"prompt_token_ids": list(ids)}
    return {"prompt": str(cell("prompt"))}


def build_processor(
    model: str,
    num_actors: int = 1,
    batch_size: int = 64,
    num_cpus_per_actor: float = 1.0,
    **engine_options: Any,
) -> Callable[[Any], Any]:
    """A Dataset -> Dataset function generating for every row on `num_actors` jinfer actors
    (`engine_options`: `LLM`'s); call it on a Dataset, then read or write the result."""

    def process(ds: Any) -> Any:
        return ds.map_batches(
            _Generator,
            fn_constructor_kwargs={"model": model, "engine_options": engine_options},
            batch_size=batch_size,
            concurrency=num_actors,
            num_cpus=num_cpus_per_actor,
            batch_format="numpy",
        )

    return process
