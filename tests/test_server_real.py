"""`python -m jinfer.serve` as a user runs it: a subprocess on a free localhost port, serving the
real SmolLM2 model, driven by the official `openai` client. Plus SIGTERM during traffic, on a
tiny random checkpoint so that the process starts in seconds.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_util import ServerProcess, serve_real_model, wait_until

pytestmark = pytest.mark.slow

REFERENCE = Path(__file__).parent / "fixtures" / "hf_reference_smollm2-135m-instruct.json"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server():  # (conftest's `client` talks to it)
    yield from serve_real_model()


def test_greedy_completion_matches_transformers(client, smollm2_tokenizer):
    cases = [c for c in json.loads(REFERENCE.read_text())["prompts"] if not c["near_tie_steps"]]
    assert cases
    for case in cases:
        r = client.completions.create(
            model=MODEL,
            prompt=case["prompt_token_ids"],
            max_tokens=len(case["greedy_token_ids"]),
            temperature=0,
            logprobs=5,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
        choice = r.choices[0]
        want = smollm2_tokenizer.decode(case["greedy_token_ids"], skip_special_tokens=False)
        assert choice.text == want, case["id"]
        assert r.usage.prompt_tokens == case["num_prompt_tokens"]
        first_ref = case["top5"][0][0][1]
        assert abs(choice.logprobs.token_logprobs[0] - first_ref) < 0.02


def test_chat_streamed_equals_collected(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content and streamed.strip()
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_streamed_completion_and_usage(client, server):
    prompt = "The three primary colors are"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert text == full.choices[0].text
    count = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["count"]
    assert chunks[-1].usage.prompt_tokens == count == full.usage.prompt_tokens


def test_seeded_sampling_reproduces_and_n_choices_differ(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0)
    a = client.completions.create(n=3, seed=1234, **kwargs)
    b = client.completions.create(n=3, seed=1234, **kwargs)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1
    assert 3 <= a.usage.completion_tokens <= 36 and a.usage == b.usage


def test_stop_string_ends_generation(client):
    kwargs = dict(model=MODEL, prompt="Count: one, two, three,", temperature=0, max_tokens=20)
    free = client.completions.create(**kwargs).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip(), free
    cut = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free[: free.index(stop)]


def test_chat_logprobs_are_ranked(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi!"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
    )
    for item in r.choices[0].logprobs.content:
        tops = [t.logprob for t in item.top_logprobs]
        assert tops == sorted(tops, reverse=True) and len(tops) == 4
        assert item.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the top token


def test_sigterm_during_traffic_exits_zero(tmp_path, smollm2_tokenizer):
    from conftest import tiny_config

    from jinfer.loader.orbax import save_orbax
    from jinfer.models.params import init_params

    cfg = tiny_config()
    save_orbax(tmp_path / "tiny", cfg, init_params(cfg, seed=0, std=0.2))
    smollm2_tokenizer.save_pretrained(tmp_path / "tiny")
    server = ServerProcess(
        "--model", str(tmp_path / "tiny"), "--max-model-len", "512",
        "--max-num-batched-tokens", "32", "--shutdown-timeout", "1", timeout=120,
    )  # fmt: skip
    ends: list[str] = []

    def stream() -> None:
        body = {"prompt": "tell me a long story", "max_tokens": 400, "ignore_eos": True}
        with httpx.stream(
            "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        ends.append(events[-2] + "\n" + events[-1])

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    assert wait_until(lambda: server._health() == 200, 10)
    time.sleep(1.0)  # streams are running
    t0 = time.monotonic()
    rc = server.stop()
    assert rc == 0, "".join(server.log[-30:])
    assert time.monotonic() - t0 < 20
    for t in threads:
        t.join(10)
    assert len(ends) == 4
    for end in ends:
        last_chunk, done = end.split("\n")
        assert done == "data: [DONE]"
        assert json.loads(last_chunk[6:])["choices"][0]["finish_reason"] in ("abort", "length")
