"""Structured output through the engine: every constrained request's text is what its
constraint accepts, with any sampling setting, batch mix, preemption or step loop, and never a
compile after warm-up; free requests beside it are untouched; bad constraints cost nothing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jinfer import SamplingParams
from jinfer.sampling_params import ParamError
from jinfer.sampling_params import StructuredOutputsParams as SO

# Bounded in every field, so that even a random-weight model reaches the end in few tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "admin": {"type": "boolean"},
        "role": {"enum": ["dev", "ops", "pm"]},
    },
    "required": ["name", "age", "admin", "role"],
    "additionalProperties": False,
}
JSON = SO(json=SCHEMA, disable_any_whitespace=True)
PROMPTS = ["The user record:", "Here is some JSON", "def f(x):", "Once upon a time"]


def _follows_schema(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == set(SCHEMA["required"]), text
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    assert isinstance(obj["admin"], bool) and obj["role"] in ("dev", "ops", "pm")


@pytest.fixture(scope="module")
def llm(make_tiny_llm):
    return make_tiny_llm()


def _params(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    kw.setdefault("temperature", 0)
    return SamplingParams(**kw)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(temperature=1.0, seed=7),
        dict(temperature=0.9, top_k=20, top_p=0.9, seed=1),
        dict(temperature=1.0, min_p=0.1, repetition_penalty=1.3, seed=2),
        dict(n=3, temperature=1.0, seed=5, logprobs=2),
    ],
    ids=["greedy", "sampled", "top-k-top-p", "min-p-penalties", "n3-logprobs"],
)
def test_json_schema_output_follows_the_schema_with_any_sampling(llm, settings):
    outs = llm.generate(PROMPTS, _params(structured_outputs=JSON, **settings), use_tqdm=False)
    for out in outs:
        for o in out.outputs:
            assert o.finish_reason == "stop", o.text
            _follows_schema(o.text)
            if o.logprobs is not None:  # the model's own distribution: finite
                assert all(-1e9 < lp.logprob <= 0 for entry in o.logprobs for lp in entry.values())


def test_no_program_compiles_after_warm_up_whatever_the_mix(make_tiny_llm):
    # Its own engine, warmed up here: the suite may drop compiled programs between tests.
    llm = make_tiny_llm()
    compiles = llm.engine.num_compiles
    mix = [
        _params(structured_outputs=JSON),
        _params(structured_outputs=JSON, temperature=0.9, top_k=20, top_p=0.9, seed=1),
        _params(structured_outputs=JSON, temperature=1.0, repetition_penalty=1.3, seed=2),
        _params(max_tokens=20, ignore_eos=True),
        _params(max_tokens=20, temperature=1.0, top_p=0.5, seed=3, ignore_eos=True),
        _params(structured_outputs=JSON, n=2, temperature=1.0, seed=5, logprobs=2),
        _params(max_tokens=20, allowed_token_ids=list(range(100, 200)), temperature=1.0, seed=4),
        _params(max_tokens=20, presence_penalty=0.5, ignore_eos=True),
    ]
    llm.generate(PROMPTS * 2, mix, use_tqdm=False)
    llm.generate(PROMPTS, [mix[0], mix[3], mix[1], mix[6]], use_tqdm=False)
    assert llm.engine.num_compiles == compiles


def test_regex_and_choice_outputs_match(llm):
    regex = SO(regex=r"[a-z]{2,5}-\d{2}")
    choice = SO(choice=("alpha", "beta", "gamma delta"))
    for so, ok in [(regex, lambda t: re.fullmatch(r"[a-z]{2,5}-\d{2}", t)), (choice, None)]:
        for out in llm.generate(PROMPTS, _params(structured_outputs=so), use_tqdm=False):
            text = out.outputs[0].text
            assert ok(text) if ok else text in so.choice, text
            assert out.outputs[0].finish_reason == "stop"


def test_a_lark_grammar_constrains_the_output(llm):
    grammar = 'start: "x=" NUM (";" "x=" NUM)*\nNUM: /[0-9]{1,3}/'
    out = llm.generate(PROMPTS[0], _params(max_tokens=12, structured_outputs=SO(grammar=grammar)))
    o = out[0].outputs[0]
    # Cut by max_tokens or complete, what was written is a prefix the grammar allows.
    assert re.fullmatch(r"x=\d{1,3}(;x=\d{1,3})*(;(x(=\d{0,3})?)?)?", o.text), o.text


def test_free_requests_beside_constrained_ones_are_unchanged(llm):
    free = _params(max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS, free, use_tqdm=False)
    mixed = llm.generate(
        PROMPTS + PROMPTS, [free] * 4 + [_params(structured_outputs=JSON)] * 4, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in mixed[:4]] == [o.outputs[0].token_ids for o in alone]
    for out in mixed[4:]:
        _follows_schema(out.outputs[0].text)


def test_constrained_tokens_are_the_same_with_and_without_async_scheduling(make_tiny_llm, llm):
    sync = make_tiny_llm(async_scheduling=False)
    settings = [_params(structured_outputs=JSON), _params(temperature=1.0, seed=3)]
    settings += [_params(structured_outputs=JSON, temperature=1.0, seed=4)]
    settings += [_params(repetition_penalty=1.5, max_tokens=20, ignore_eos=True)]
    a = llm.generate(PROMPTS, settings, use_tqdm=False)
    b = sync.generate(PROMPTS, settings, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_a_request_cut_by_max_tokens_says_length(llm):
    out = llm.generate(PROMPTS[0], _params(max_tokens=3, structured_outputs=JSON))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith("{")


def test_the_grammar_ends_the_request_even_with_ignore_eos_and_min_tokens(llm):
    so = SO(choice=("yes", "no"))
    for extra in (dict(ignore_eos=True), dict(min_tokens=10)):
        out = llm.generate(PROMPTS[0], _params(structured_outputs=so, **extra))[0].outputs[0]
        assert out.text in ("yes", "no") and out.finish_reason == "stop", (extra, out)


def test_preempted_constrained_requests_still_follow_the_schema(make_tiny_llm):
    # 12 usable pages of 16 tokens for 8 requests: they preempt each other as they grow.
    llm = make_tiny_llm(num_pages=13, max_num_seqs=8, max_model_len=192)
    prompts = [p + " " + "word " * 20 for p in PROMPTS] * 2
    outs = llm.generate(prompts, _params(structured_outputs=JSON), use_tqdm=False)
    assert llm.engine.stats.num_preemptions > 0
    for out in outs:
        _follows_schema(out.outputs[0].text)


@pytest.mark.parametrize(
    "so, message",
    [
        (SO(json={"type": "object", "properties": {"a": {"type": "nosuchtype"}}}), "json"),
        (SO(regex="(unclosed"), "regex"),
        (SO(grammar="start: undefined_rule"), "grammar"),
    ],
)
def test_a_bad_constraint_is_a_param_error_and_costs_nothing(llm, so, message):
    with pytest.raises(ParamError, match=message) as e:
        llm.generate(PROMPTS, _params(structured_outputs=so), use_tqdm=False)
    assert e.value.param == "structured_outputs"
    assert not llm.engine.requests and llm.engine.num_waiting() == 0  # nothing was queued
    out = llm.generate(PROMPTS[0], _params(structured_outputs=JSON))[0].outputs[0]
    _follows_schema(out.text)


def test_structured_outputs_may_be_given_as_a_dict_and_bad_fields_are_named():
    p = SamplingParams(structured_outputs={"regex": "a+"})
    assert p.structured_outputs == SO(regex="a+")
    with pytest.raises(ParamError, match="unknown field 'jsn'"):
        SamplingParams(structured_outputs={"jsn": {}})
    with pytest.raises(ParamError, match="exactly one"):
        SamplingParams(structured_outputs={"regex": "a", "choice": ["b"]})
    with pytest.raises(ParamError, match="StructuredOutputsParams or an object"):
        SamplingParams(structured_outputs="json")


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def real_llm(request):
    from jinfer import LLM

    return request.param, LLM(
        request.param, max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=64
    )


@pytest.mark.slow
def test_real_models_answer_in_the_schema(real_llm):
    _, llm = real_llm
    ask = "Describe a user named Ann, aged 31, who is an admin and works in ops, as JSON."
    conversations = [[{"role": "user", "content": ask}]] * 3
    loose = SO(json=SCHEMA)  # with whitespace allowed, as a client would ask
    settings = [_params(max_tokens=200, structured_outputs=so) for so in (JSON, loose)]
    settings.append(_params(max_tokens=200, temperature=0.8, seed=1, structured_outputs=loose))
    for out in llm.chat(conversations, settings, use_tqdm=False):
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        _follows_schema(o.text)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip


def _asked(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather in {city}?"}]


def _called(city: str, temp: int) -> list[dict]:
    arguments = json.dumps({"city": city})
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }
    return [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": json.dumps({"temp_c": temp})},
        {"role": "assistant", "content": f"It is {temp} C in {city}."},
    ]


@pytest.mark.slow
def test_real_models_call_tools_offline_in_their_own_format(real_llm):
    from jinfer import tool_parsers
    from jinfer.tool_parsers import choice

    model, llm = real_llm
    parser = tool_parsers.get(tool_parsers.DEFAULT_PARSERS[model])
    # required: constrained, so it parses whatever the model
    so = choice.constraint("required", [WEATHER], parallel=False)
    out = llm.chat(_asked("Paris"), _params(structured_outputs=so), tools=[WEATHER])[0]
    calls = choice.constrained_calls("required", out.outputs[0].text, [WEATHER])
    assert [c.name for c in calls] == ["get_weather"]
    # auto, after two turns that called the tool and read its result, in the model's format
    history = _asked("Rome") + _called("Rome", 21) + _asked("Berlin") + _called("Berlin", 12)
    history += _asked("Paris")
    text = llm.chat(history, _params(max_tokens=60), tools=[WEATHER])[0].outputs[0].text
    extracted = parser.extract(text, [WEATHER])
    if model == "gemma3-270m":  # Gemma writes the call; SmolLM2-135M echoes a tool response
        assert [(c.name, json.loads(c.arguments)) for c in extracted.tool_calls] == [
            ("get_weather", {"city": "Paris"})
        ], text


def test_allowed_token_ids_are_the_only_tokens_generated(llm):
    allowed = list(range(1000, 1040))
    outs = llm.generate(
        PROMPTS, _params(max_tokens=24, temperature=1.0, seed=3, allowed_token_ids=allowed)
    )
    for out in outs:
        assert out.outputs[0].token_ids and set(out.outputs[0].token_ids) <= set(allowed)


def _at(ids: list[int], i: int, seq: list[int]) -> bool:
    return ids[i : i + len(seq)] == seq


def _contains(ids: list[int], seq: list[int]) -> bool:
    return any(_at(ids, i, seq) for i in range(len(ids)))


def test_bad_words_never_appear_and_nothing_changes_before_them(llm, smollm2_tokenizer):
    tok = smollm2_tokenizer
    free = llm.generate(PROMPTS[0], _params(max_tokens=24, ignore_eos=True))[0].outputs[0]
    ids = free.token_ids
    from jinfer.structured.guards import TokenGuards

    def bans(words: list[str]) -> TokenGuards:  # the token sequences `words` ban
        return TokenGuards.build(tok, tok.vocab_size, None, words)

    # a token of the free output that is a word of its own, and a two-token stretch after it
    k = next(i for i in range(2, len(ids) - 4) if ids[i] in bans([tok.decode([ids[i]])]).always)
    words = [tok.decode([ids[k]]), tok.decode(ids[k + 2 : k + 4])]
    out = llm.generate(PROMPTS[0], _params(max_tokens=24, ignore_eos=True, bad_words=words))
    got = out[0].outputs[0].token_ids
    guards = bans(words)
    assert not any(t in guards.always for t in got)
    assert not any(_contains(got, seq) for seq in guards.sequences)
    ends = [i + len(s) - 1 for s in guards.sequences for i in range(len(ids)) if _at(ids, i, s)]
    first_banned = min([i for i, t in enumerate(ids) if t in guards.always] + ends)
    assert got[:first_banned] == ids[:first_banned] and got != ids


def test_token_guards_mask_rows():
    from jinfer.structured import bitmask
    from jinfer.structured.guards import TokenGuards

    g = TokenGuards(100, allowed=[5, 31, 32, 63, 99], bad_words=[[31], [7, 8, 63]])
    row = bitmask.allocate(1, 100)[0]
    g.apply(row, [1, 7, 8])
    assert np.flatnonzero(bitmask.allowed_tokens(row, 100)).tolist() == [5, 32, 99]
    row = bitmask.allocate(1, 100)[0]
    g.apply(row, [7])
    assert np.flatnonzero(bitmask.allowed_tokens(row, 100)).tolist() == [5, 32, 63, 99]
    assert g.needs_history and not TokenGuards(100, [1], [[2]]).needs_history


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(allowed_token_ids=[-1]), "allowed_token_ids"),
        (dict(bad_words=[""]), "bad_words"),
        (dict(bad_words=["x" * 300]), "bad_words"),
        (dict(bad_words=["w"] * 200), "bad_words"),
    ],
)
def test_bad_guards_are_param_errors(kw, param):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_an_allowed_token_outside_the_vocabulary_is_refused(llm):
    with pytest.raises(ParamError, match="outside the vocabulary"):
        llm.generate(PROMPTS[0], _params(allowed_token_ids=[10**6]))


def test_a_prefix_cache_hit_changes_nothing_in_a_constrained_answer(llm):
    prompt = "Here is the user record you asked for, in JSON: " + "word " * 40
    first = llm.generate(prompt, _params(structured_outputs=JSON))[0]
    again = llm.generate(prompt, _params(structured_outputs=JSON))[0]
    assert again.num_cached_tokens >= 32 and first.num_cached_tokens < again.num_cached_tokens
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    _follows_schema(again.outputs[0].text)


def test_a_stop_string_ends_a_constrained_answer_where_it_appears(llm):
    so = SO(regex=r"alpha beta gamma")
    out = llm.generate(PROMPTS[0], _params(structured_outputs=so, stop=[" gam"]))[0].outputs[0]
    assert out.text == "alpha beta" and out.finish_reason == "stop" and out.stop_reason == " gam"
