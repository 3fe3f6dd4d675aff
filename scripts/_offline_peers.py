"""bench_offline.py's peers: Hugging Face transformers (batched `generate`) and llama.cpp (one
sequence at a time), each timed on the same workload as jinfer.

Scripts run as `python scripts/NAME.py`, so `scripts/` is on the path and bench_offline imports
this as `_offline_peers`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from jinfer.config.model import ModelConfig

if TYPE_CHECKING:
    from bench_offline import Work


def load_hf(path: str | None, cfg: ModelConfig, device: str, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    if path is None:  # random weights of the same shape
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        with torch.device(device):
            return LlamaForCausalLM(hf_cfg).to(dtype).eval()
    d, f = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    return model.to(device).eval()


def run_hf(model, work: Work, batch_size: int, prefill_prompt: list[int], device: str) -> dict:
    import torch

    pad = 0

    def generate(prompts: list[list[int]], new: int) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        generate(work.prompts[:2], 2)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(work.prompts), batch_size):
            generate(work.prompts[i : i + batch_size], max(work.output_lens[i : i + batch_size]))
        wall = time.perf_counter() - t0
        generate([prefill_prompt[::-1]], 1)
        t1 = time.perf_counter()
        generate([prefill_prompt], 1)
        prefill = time.perf_counter() - t1
    return {
        "output_tok_s": work.num_output_tokens / wall,
        "wall_s": wall,
        "prefill_tok_s": len(prefill_prompt) / prefill,
    }


def run_llamacpp(path: str, work: Work, num_prompts: int, prefill_prompt: list[int]) -> dict:
    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    n_ctx = max(len(p) + o for p, o in zip(work.prompts, work.output_lens, strict=True))
    n_ctx = max(n_ctx, len(prefill_prompt)) + 8
    llm = Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=threads, verbose=False)
    prompts, output_lens = work.prompts[:num_prompts], work.output_lens[:num_prompts]
    t0 = time.perf_counter()
    for prompt, n in zip(prompts, output_lens, strict=True):
        for i, _ in enumerate(llm.generate(prompt, top_k=1, reset=True)):
            if i + 1 == n:
                break
    wall = time.perf_counter() - t0
    llm.reset()
    llm.eval(prefill_prompt[::-1])  # warm
    llm.reset()
    t1 = time.perf_counter()
    llm.eval(prefill_prompt)
    prefill = time.perf_counter() - t1
    return {
        "output_tok_s": sum(output_lens) / wall,
        "wall_s": wall,
        "prefill_tok_s": len(prefill_prompt) / prefill,
        "prompts": num_prompts,
    }
