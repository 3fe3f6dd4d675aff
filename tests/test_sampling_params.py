"""Invalid sampling settings fail when SamplingParams is built, naming the setting."""

from __future__ import annotations

import pytest

from jinfer import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"n": 0}, "n must"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"stop": [str(i) for i in range(17)]}, "at most 16 stop strings"),
        ({"stop_token_ids": list(range(129))}, "at most 128 stop_token_ids"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "at most 300"),
        ({"logit_bias": {5: 101.0}}, r"\[-100, 100\]"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias maps token ids"),
    ],
)
def test_invalid_sampling_params_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k == 0 and p.max_tokens == 16 and not p.greedy
    assert SamplingParams(temperature=0).greedy


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 10**400}, "temperature"),  # too large for a float
        ({"logit_bias": {1: 10**400}}, "logit_bias"),
        ({"top_k": 10**5000}, "top_k"),  # too long for a repr (Python's 4300-digit limit)
        ({"min_tokens": 10**5000, "max_tokens": None}, "min_tokens"),
    ],
)
def test_integers_past_float_or_repr_range_are_a_param_error_naming_the_field(kwargs, param):
    from jinfer.sampling_params import ParamError

    with pytest.raises(ParamError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
