"""Output guards: text a guard holds back never reaches a caller, a match ends the request with
finish_reason content_filter and its text cut before the match, offline and streamed over HTTP;
a guard that cannot be loaded fails before anything else."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from server_util import MODEL, expected_text, start

from jinfer import SamplingParams
from jinfer.engine.output_guard import RegexDenyList, Verdict, load_guard

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


class NoDigits:
    """A guard of the test's own, loaded by name: holds back nothing, blocks at a digit."""

    def __call__(self, text: str, done: bool, request_id: str) -> Verdict:
        i = next((i for i, c in enumerate(text) if c.isdigit()), None)
        return Verdict(len(text)) if i is None else Verdict(i, block=True)


def test_regex_deny_list_holds_back_and_blocks():
    g = RegexDenyList(r"secret\w*", hold=4)
    assert g("hello wor", False, "r") == Verdict(5)
    assert g("hello wor", True, "r") == Verdict(9)
    assert g("the SECRETS are", False, "r") == Verdict(4, block=True)


def test_guard_specs_load_or_name_the_problem():
    assert load_guard("") is None
    assert isinstance(load_guard("regex:a+"), RegexDenyList)
    assert isinstance(load_guard("test_output_guard:NoDigits"), NoDigits)
    for spec, message in [
        ("regex:(", "does not compile"),
        ("nocolon", "module:attr"),
        ("no_such_module_xyz:f", "No module named"),
        ("json:no_such_attr", "no attribute"),
        ("json:__doc__", "not callable"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_guard(spec)


def _free_text(make_tiny_llm) -> str:
    return make_tiny_llm().generate("Once upon a time", GREEDY)[0].outputs[0].text


def test_a_match_ends_the_request_with_its_text_cut_before_it(make_tiny_llm):
    free = _free_text(make_tiny_llm)
    word = free.split()[len(free.split()) // 2]  # a word from the middle of the output
    start_at = free.index(word)
    llm = make_tiny_llm(output_guard=f"regex:{re.escape(word)}")
    engine = llm.engine
    engine.add_request("r", llm.tokenizer.encode("Once upon a time"), GREEDY)
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0] for o in engine.step() if o.request_id == "r"]
    final = seen[-1]
    assert final.finish_reason == "content_filter" and final.text == free[:start_at]
    for o in seen:  # nothing past the cut was ever handed out, not even for a moment
        assert free[:start_at].startswith(o.text)
    assert engine.stats.guard_time > 0


def test_a_guard_loaded_by_name_and_other_requests_unharmed(make_tiny_llm):
    llm = make_tiny_llm(output_guard="test_output_guard:NoDigits")
    outs = llm.generate(["Once upon a time", "1, 2, 3,"], GREEDY)
    for out in outs:
        o = out.outputs[0]
        assert not any(c.isdigit() for c in o.text)
        assert o.finish_reason in ("length", "content_filter")


def test_an_unloadable_guard_fails_before_the_model_loads():
    from jinfer import LLM

    with pytest.raises(ValueError, match="output_guard"):
        LLM("no-such-model-is-loaded", output_guard="regex:(")


def test_streamed_text_never_shows_what_the_guard_blocks(tok):
    prompt = "The password is hunter2 and more text follows here"
    with start(tok, output_guard="regex:hunter2") as server:
        server.wait_ready()
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "stream": True}
        text, finish = "", None
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
        echoed = expected_text(tok, prompt, 40)
        assert finish == "content_filter"
        assert text == echoed[: echoed.index("hunter2")] and "hunter" not in text
