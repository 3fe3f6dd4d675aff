"""Constraints compile from both real vocabularies, and decoding under their masks yields text
the constraint accepts, whatever the logits; bad constraints are errors naming the field."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from llguidance.numpy import apply_token_bitmask_inplace

from jinfer.sampling_params import ParamError
from jinfer.sampling_params import StructuredOutputsParams as SO
from jinfer.structured import bitmask
from jinfer.structured.grammar import GrammarCompiler, GrammarError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "admin": {"type": "boolean"},
        "role": {"enum": ["dev", "ops", "pm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "admin", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def compiler(request, smollm2_tokenizer):
    if request.param == "smollm2":
        tokenizer = smollm2_tokenizer
    else:
        from jinfer.tokenizer.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(request.getfixturevalue("gemma3_gguf_path"))
    c = GrammarCompiler(tokenizer)
    yield c
    c.close()


def _decode_under(compiler, params, seed: int, max_steps: int = 200) -> tuple[str, bool]:
    """Greedy decoding of random logits through the constraint's masks: (text, finished)."""
    tok = compiler.tokenizer
    vocab = tok.vocab_size
    matcher = compiler.compile(params).matcher()
    filler = bitmask.MaskFiller()
    rng = np.random.default_rng(seed)
    mask = bitmask.allocate(1, vocab)
    out: list[int] = []
    for _ in range(max_steps):
        filler.fill(mask, [(matcher, 0)])
        logits = rng.standard_normal((1, vocab)).astype(np.float32) * 4
        masked = np.asarray(bitmask.apply_bitmask(logits, mask))
        token = int(masked[0].argmax())
        assert matcher.consume_token(token), matcher.get_error()
        if token in tok.stop_token_ids():
            return tok.decode(out), True
        out.append(token)
        if matcher.is_stopped():
            return tok.decode(out), True
    return tok.decode(out), False


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_output_parses_and_follows_the_schema(compiler, seed):
    text, finished = _decode_under(compiler, SO(json=SCHEMA, disable_any_whitespace=True), seed)
    assert finished, text
    obj = json.loads(text)
    assert set(obj) == set(SCHEMA["required"])
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    assert isinstance(obj["admin"], bool) and obj["role"] in ("dev", "ops", "pm")
    assert len(obj["tags"]) <= 2 and all(len(t) <= 4 for t in obj["tags"])


def test_json_object_is_any_json_object(compiler):
    text, finished = _decode_under(compiler, SO(json_object=True, disable_any_whitespace=True), 0)
    if finished:  # random logits may wander past max_steps; what came out must still parse
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


@pytest.mark.parametrize("seed", range(3))
def test_regex_output_matches_in_full(compiler, seed):
    pattern = r"[A-Z]{2}-\d{3}(x|y)?"
    text, finished = _decode_under(compiler, SO(regex=pattern), seed)
    assert finished and re.fullmatch(pattern, text), text


def test_choice_output_is_one_of_the_choices(compiler):
    choices = ("yes", "no", "maybe so", "ünïcödé")
    seen = {_decode_under(compiler, SO(choice=choices), seed)[0] for seed in range(6)}
    assert seen <= set(choices) and seen


def test_a_gbnf_or_lark_grammar_constrains_the_output(compiler):
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9]{1,2}'
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/'
    for grammar in (gbnf, lark):
        text, finished = _decode_under(compiler, SO(grammar=grammar), 1)
        assert finished and re.fullmatch(r"\(\d{1,2}(\+\d{1,2})*\)", text), (grammar, text)


def test_control_tokens_never_enter_constrained_text(compiler):
    tok = compiler.tokenizer
    matcher = compiler.compile(SO(json={"type": "string"})).matcher()
    mask = bitmask.allocate(1, tok.vocab_size)
    bitmask.MaskFiller().fill(mask, [(matcher, 0)])
    assert matcher.consume_token(tok.encode('"', add_special_tokens=False)[0])
    bitmask.MaskFiller().fill(mask, [(matcher, 0)])
    allowed = bitmask.allowed_tokens(mask[0], tok.vocab_size)
    for special in ("<|im_start|>", "<start_of_turn>", "<end_of_turn>"):
        tid = tok.token_to_id(special)
        if tid is not None:
            assert not allowed[tid], special


def test_compiled_grammars_are_cached_and_evicted_oldest_first(smollm2_tokenizer):
    c = GrammarCompiler(smollm2_tokenizer, cache_size=2)
    a, b, d = SO(regex="a+"), SO(regex="b+"), SO(regex="d+")
    first = c.compile(a)
    assert c.compile(SO(regex="a+")) is first and c.num_compiles == 1
    c.compile(b)
    c.compile(d)  # evicts a
    assert c.compile(a) is not first and c.num_compiles == 4
    m1, m2 = first.matcher(), first.matcher()
    assert m1.consume_token(smollm2_tokenizer.encode("a", add_special_tokens=False)[0])
    assert not m2.is_stopped() and m2.is_accepting() is False  # each request its own state
    c.close()


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(json='{"type": "object"'), "does not parse"),
        (dict(json={"type": "nonsense"}), "invalid"),
        (dict(regex="(unclosed"), "invalid"),
        (dict(grammar="start: ("), "invalid|does not parse"),
    ],
)
def test_a_bad_constraint_is_an_error_naming_structured_outputs(smollm2_tokenizer, params, message):
    c = GrammarCompiler(smollm2_tokenizer)
    with pytest.raises(GrammarError, match=message) as e:
        c.compile(SO(**params))
    assert e.value.param == "structured_outputs"
    c.close()


def test_a_constraint_that_compiles_too_slowly_is_an_error(smollm2_tokenizer):
    c = GrammarCompiler(smollm2_tokenizer, timeout_s=1e-9)
    c.lltokenizer  # noqa: B018 - the vocabulary once, outside the bound
    many = {f"field_{i}": {"type": "string", "pattern": f"[a-z]{{{i}}}"} for i in range(200)}
    with pytest.raises(GrammarError, match="did not compile within"):
        c.compile(SO(json={"type": "object", "properties": many, "required": list(many)}))
    c.close()


@pytest.mark.parametrize(
    "fields",
    [{}, dict(regex="a", choice=["b"]), dict(regex=""), dict(choice=[]), dict(choice=["a", 1]),
     dict(json=5)],
)  # fmt: skip
def test_params_take_exactly_one_well_typed_constraint(fields):
    with pytest.raises(ParamError) as e:
        SO(**fields)
    assert e.value.param == "structured_outputs"


def test_the_device_mask_matches_llguidances_reference():
    rng = np.random.default_rng(0)
    rows, vocab = 5, 1000  # not a multiple of 32
    mask = rng.integers(-(2**31), 2**31, (rows, bitmask.mask_width(vocab))).astype(np.int32)
    mask[0] = -1  # an unconstrained row
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    want = logits.copy()
    apply_token_bitmask_inplace(want, mask)
    got = np.asarray(jax.jit(bitmask.apply_bitmask)(logits, mask))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[0], logits[0])
    np.testing.assert_array_equal(np.isfinite(got[1]), bitmask.allowed_tokens(mask[1], vocab))
