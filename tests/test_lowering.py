"""Every step program the runner builds for a GPU or a TPU, lowered here (no accelerator needed):
nothing the host can decide is left for the device to decide (`runner/lowering.py`)."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from jinfer.config.engine import EngineConfig
from jinfer.runner.lowering import LOWERING_PLATFORM, control_flow, runner_for

OPTIONS = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "moe"])  # moe: ragged_dot, no branch
def test_accelerator_step_programs_leave_no_decision_to_the_device(arch, platform):
    runner = runner_for(tiny_config(arch, vocab_size=512), EngineConfig(**OPTIONS), platform)
    lowered = runner.lower(LOWERING_PLATFORM[platform])
    assert sum("sampler" not in name for name in lowered) == len(runner.step_programs())
    assert sum("top_p" in name for name in lowered) >= 2  # every variant is there
    for name, program in lowered.items():
        flow = control_flow(program)
        assert flow.cases == flow.ifs == flow.dynamic_loops == 0, (name, flow)


def test_the_count_sees_what_cpu_programs_decide_on_the_device():
    """CPU's programs branch on the device on purpose (no host round trip there): the sampler's
    conditionals and the XLA attention's context-bounded key loops are counted."""
    runner = runner_for(tiny_config(vocab_size=512), EngineConfig(**OPTIONS), "cpu")
    flows = {name: control_flow(p) for name, p in runner.lower("cpu").items()}
    assert any(f.cases >= 4 for name, f in flows.items() if "sampler" in name)
    assert any(f.dynamic_loops > 0 for name, f in flows.items() if "layer" in name)
    assert any(f.static_loops > 0 for f in flows.values())  # e.g. the sampler's random draws
