"""tensor_parallel_size=4 on a simulated 8-device CPU mesh gives the same greedy tokens as 1.

The mesh needs XLA_FLAGS before jax starts, so the comparison runs in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    from jinfer import LLM, SamplingParams
    assert len(jax.devices()) == 8, jax.devices()
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    from jinfer.models.params import init_params
    from jinfer.tokenizer.tokenizer import load_tokenizer
    from jinfer.loader.named_models import resolve_model

    model = sys.argv[1]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land"]
    kw = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, num_pages=64)
    result = {}
    for tp in (1, 4):
        if model in ("tiny", "tiny-moe"):
            cfg = tiny_config("gemma3" if model == "tiny" else "moe")
            tok = load_tokenizer(str(resolve_model("smollm2-135m-instruct")))
            llm = LLM.from_params(cfg, init_params(cfg, seed=1, std=0.2), tok,
                                  tensor_parallel_size=tp, warmup=False, **kw)
        else:
            llm = LLM(model, tensor_parallel_size=tp, warmup=False, **kw)
        if tp == 4:
            sharded = llm.engine.runner.params.layers[0].w_up.sharding
            assert len(sharded.device_set) == 4, sharded
        outs = llm.generate(prompts, params, use_tqdm=False)
        result[tp] = [o.outputs[0].token_ids for o in outs]
    print("RESULT" + json.dumps(result))
    """
)


def run_on_8_devices(child: str, arg: str) -> dict:
    """Runs `child` (Python source) with `arg` in a process that sees 8 simulated CPU devices;
    the JSON it printed after "RESULT"."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", child, arg],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _run(model: str) -> dict:
    return run_on_8_devices(CHILD, model)


def test_tp4_equals_tp1_tiny_model():
    result = _run("tiny")
    assert result["1"] == result["4"]


def test_tp4_equals_tp1_mixture_of_experts():
    # Every device holds every expert, a quarter of each one's width, and the whole router:
    # the grouped products shard like the dense MLP's products.
    result = _run("tiny-moe")
    assert result["1"] == result["4"]


@pytest.mark.slow
def test_tp4_equals_tp1_smollm2():
    result = _run("smollm2-135m-instruct")
    assert result["1"] == result["4"]


SAMPLER_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from jinfer.sample.metadata import SamplingBatch
    from jinfer.sample.sampler import Sampler
    from jinfer.runner import packing
    from jinfer.sampling_params import SamplingParams
    from jinfer.scheduler.sequence import Sequence
    from jinfer.structured.bitmask import allocate

    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    vocab = 49152
    sampler = Sampler(history_len=64, max_rows=4)
    rng = np.random.default_rng(0)
    result = {}
    for rows in (4, 2, 1):
        logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
        split = jax.device_put(logits, NamedSharding(mesh, PartitionSpec(None, "tp")))
        params = SamplingParams(temperature=0.0)
        seqs = [Sequence(str(i), [1], params, seed=i, arrival=i) for i in range(rows)]
        batch = SamplingBatch.from_sequences(seqs, rows, 64, bitmask=allocate(rows, vocab))
        out, _ = sampler.run_packed(split, *packing.pack(batch))
        got = np.asarray(out)[:, 0].view(np.int32)
        result[rows] = [got.tolist(), logits.argmax(-1).tolist()]
    print("RESULT" + json.dumps(result))
    """
)


def test_the_sampler_reads_logits_split_over_the_vocabulary_whole():
    """A tensor-parallel step's logits come split over the vocabulary; the sampler gathers
    them. Partitioned over the split (before), a one-row batch with a token mask read token 0
    from the packed output, whatever it had drawn."""
    for rows, (got, want) in run_on_8_devices(SAMPLER_CHILD, "").items():
        assert got == want, rows
