"""Tests for scripts/generate.py: input validation and resume bookkeeping in-process (no model),
and the real model (smollm2-135m-instruct) end to end in two subprocess runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from jinfer import CompletionOutput, Logprob, RequestOutput

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate.py"
MODEL = "smollm2-135m-instruct"
SMALL_ENGINE = [
    "--model",
    MODEL,
    "--max-model-len",
    "256",
    "--max-num-batched-tokens",
    "64",
    "--max-num-seqs",
    "4",
    "--max-tokens",
    "8",
    "--no-warmup",
    "--no-progress",
]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))  # as running it does: its own modules (_records.py)
    spec = importlib.util.spec_from_file_location("jinfer_generate_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def derive_seed(base: int, record_id: str | int) -> int:
    return sys.modules["_records"].derive_seed(base, record_id)  # loaded by `gen`


def _write_jsonl(path: Path, lines: list[Any]) -> None:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines),
        encoding="utf-8",
    )


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# ------------------------------------------------------------------------- validation
def test_load_records_accepts_all_prompt_kinds_and_overrides(gen: ModuleType, tmp_path: Path):
    path = tmp_path / "in.jsonl"
    _write_jsonl(
        path,
        [
            {"id": "a", "prompt": "Hello"},
            "   ",  # blank lines are skipped but still counted
            {"id": 7, "prompt_token_ids": [1, 2, 3], "temperature": 0.5, "seed": 11, "n": 2},
            {
                "id": "c",
                "messages": [{"role": "user", "content": "Hi"}],
                "stop": "\n",
                "max_tokens": None,
            },
        ],
    )
    defaults = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    records = gen.load_records(path, defaults, seed=123)
    assert [r.id for r in records] == ["a", 7, "c"]
    assert [r.line for r in records] == [1, 3, 4]
    a, b, c = records
    assert a.prompt == "Hello" and a.params.temperature == 0.0 and a.params.max_tokens == 8
    assert a.params.seed == derive_seed(123, "a")  # derived from --seed and the id
    assert b.prompt_token_ids == [1, 2, 3]
    assert (b.params.temperature, b.params.seed, b.params.n) == (0.5, 11, 2)  # its own seed wins
    assert c.messages == [{"role": "user", "content": "Hi"}]
    assert c.params.stop == ["\n"] and c.params.max_tokens is None
    assert derive_seed(123, "a") == derive_seed(123, "a") != derive_seed(124, "a")


def test_load_records_names_every_bad_line(gen: ModuleType, tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(
        path,
        [
            {"id": "ok", "prompt": "fine"},  # 1
            '{"id": "x", "prompt": ',  # 2: invalid JSON
            {"id": "", "prompt": "empty id"},  # 3
            {"id": "ok", "prompt": "again"},  # 4: duplicate
            {"id": "np"},  # 5: no prompt field
            {"id": "t", "prompt": "p", "temperature": -1},  # 6: SamplingParams rejects
            {"id": "k", "prompt": "p", "top_k": "five"},  # 7: wrong type
            {"id": "u", "prompt": "p", "max_token": 3},  # 8: unknown (typo'd) field
            {"id": "two", "prompt": "p", "messages": [{"role": "user", "content": "m"}]},  # 9
            {"id": "m", "messages": [{"content": "no role"}]},  # 10
            {"id": 1.5, "prompt": "p"},  # 11: float id
            [1, 2],  # 12: not an object
            {"id": "e", "prompt_token_ids": []},  # 13
            {"id": 3, "prompt": "p", "min_tokens": 9, "max_tokens": 4},  # 14
        ],
    )
    with pytest.raises(gen.InputError) as info:
        gen.load_records(path, {"max_tokens": 8, "temperature": 0.0})
    err = info.value
    assert [line for line, _ in err.errors] == list(range(2, 15))
    assert isinstance(err, ValueError)
    message = str(err)
    for line, fragment in [
        (2, "invalid JSON"),
        (3, "'id' must not be empty"),
        (4, 'duplicate id "ok" (first on line 1)'),
        (5, "needs one of 'prompt', 'prompt_token_ids' or 'messages'"),
        (6, "temperature must be >= 0"),
        (7, "top_k must be an integer"),
        (8, "unknown field(s) 'max_token'"),
        (9, "give exactly one"),
        (10, "messages[0] needs a non-empty string 'role'"),
        (11, "'id' must be a string or an integer"),
        (12, "must be a JSON object"),
        (13, "non-empty list of integers"),
        (14, "min_tokens (9) must not exceed max_tokens (4)"),
    ]:
        assert f"{path}:{line}: " in message
        assert fragment in dict(err.errors)[line], (line, err.errors)


def test_a_record_without_an_id_is_named_by_its_line(gen: ModuleType, tmp_path: Path):
    path = tmp_path / "in.jsonl"
    _write_jsonl(path, [{"prompt": "a"}, "", {"prompt": "b"}, {"id": 1, "prompt": "c"}])
    with pytest.raises(gen.InputError, match=r"in\.jsonl:4: duplicate id 1 \(first on line 1\)"):
        gen.load_records(path)
    _write_jsonl(path, [{"prompt": "a"}, "", {"prompt": "b"}])
    assert [r.id for r in gen.load_records(path)] == [1, 3]


def test_int_and_string_ids_collide(gen: ModuleType, tmp_path: Path):
    path = tmp_path / "in.jsonl"
    _write_jsonl(path, [{"id": 1, "prompt": "a"}, {"id": "1", "prompt": "b"}])
    with pytest.raises(gen.InputError, match=r"in\.jsonl:2: duplicate id"):
        gen.load_records(path)


def test_prepare_output_truncates_a_partial_last_line(gen: ModuleType, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    assert gen.prepare_output(out) == []  # no file yet
    complete = '{"id": "a", "text": "x"}\n{"id": 2, "text": "y"}\n'
    out.write_text(complete + '{"id": "c", "te', encoding="utf-8")
    assert gen.prepare_output(out) == ["a", "2"]
    assert out.read_text(encoding="utf-8") == complete
    assert gen.prepare_output(out) == ["a", "2"]  # idempotent
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(gen.InputError, match=r"out\.jsonl:2: existing output line"):
        gen.prepare_output(out)


def test_output_record_shapes(gen: ModuleType):
    one = gen.Record(line=1, id="a", params=gen.jinfer.SamplingParams(logprobs=1), prompt="p")
    out = RequestOutput(
        "0",
        "p",
        [5, 6, 7],
        [
            CompletionOutput(
                0, "hi", [9, 10], "length", logprobs=[{9: Logprob(-0.5, 1)}, {10: Logprob(-1.0)}]
            )
        ],
        True,
    )
    rec = gen.output_record(one, out)
    assert rec["id"] == "a" and rec["text"] == "hi" and rec["token_ids"] == [9, 10]
    assert (rec["finish_reason"], rec["prompt_tokens"], rec["completion_tokens"]) == (
        "length",
        3,
        2,
    )
    assert rec["logprobs"][0] == [{"token_id": 9, "logprob": -0.5, "rank": 1, "token": None}]
    json.dumps(rec)

    two = gen.Record(line=1, id=3, params=gen.jinfer.SamplingParams(n=2), prompt="p")
    out2 = RequestOutput(
        "1",
        "p",
        [5],
        [CompletionOutput(1, "b", [2, 3], "stop"), CompletionOutput(0, "a", [1], "length")],
        True,
    )
    rec2 = gen.output_record(two, out2)
    assert rec2["texts"] == ["a", "b"] and "text" not in rec2
    assert rec2["token_ids"] == [[1], [2, 3]]
    assert rec2["finish_reason"] == ["length", "stop"]
    assert rec2["completion_tokens"] == 3


def test_parse_args_modes(gen: ModuleType):
    args = gen.parse_args(["--chat", "one", "--prompt", "two", "--chat", "three"])
    assert args.items == [("chat", "one"), ("prompt", "two"), ("chat", "three")]
    assert args.model == "smollm2-135m-instruct" and args.batch_size == 64
    assert (args.max_model_len, args.max_num_seqs, args.max_num_batched_tokens) == (2048, 32, 512)
    for bad in (
        [],
        ["--chat", "x", "--input", "a", "--output", "b"],
        ["--input", "a"],
        ["--output", "b"],
        ["--input", "a", "--output", "b", "--batch-size", "0"],
        ["--chat", "x", "--temperature", "-1"],
    ):
        with pytest.raises(SystemExit) as info:
            gen.parse_args(bad)
        assert info.value.code == 2, bad


def test_malformed_file_fails_before_loading_a_model(tmp_path: Path):
    """The script itself: exit 2, every bad line named, no output file, no model loaded (a
    nonexistent model would otherwise fail with status 1)."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(src, [{"id": 1, "prompt": "ok"}, "{oops", {"id": 1, "prompt": "dup"}])
    proc = _run("--model", "no-such-model", "--input", str(src), "--output", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{src}:2: invalid JSON" in proc.stderr
    assert f"{src}:3: duplicate id 1 (first on line 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# ------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_batch_generation_resumes(tmp_path: Path):
    """One run covers the happy path and resumption: the output already holds record "d" and a
    partial line from a crash; the run generates the other three in input order, in two batches."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompt_ids = [504, 3575, 282, 4649, 314]
    _write_jsonl(
        src,
        [
            {"id": "d", "prompt": "Already done"},
            {"id": "a", "prompt": "The capital of France is"},
            {"id": 2, "prompt_token_ids": prompt_ids, "n": 2},
            {"id": "c", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
        ],
    )
    done = json.dumps({"id": "d", "text": "from an earlier run"})
    out.write_text(done + '\n{"id": "a", "text": "cut sho', encoding="utf-8")

    args = ["--input", str(src), "--output", str(out), "--temperature", "0", "--batch-size", "2"]
    proc = _run(*SMALL_ENGINE, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 already in" in proc.stderr and "3 to generate" in proc.stderr
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n") and "cut sho" not in text
    lines = text.splitlines()
    assert lines[0] == done  # untouched
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == ["d", "a", 2, "c"]  # input order, no duplicates

    for rec, max_tokens in ((records[1], 8), (records[3], 4)):
        assert isinstance(rec["text"], str) and rec["text"]
        assert rec["finish_reason"] in ("stop", "length")
        assert rec["completion_tokens"] == len(rec["token_ids"]) <= max_tokens
        assert rec["prompt_tokens"] > 0
    assert records[1]["completion_tokens"] == 8 and records[1]["finish_reason"] == "length"
    multi = records[2]
    assert multi["prompt_tokens"] == len(prompt_ids)
    assert len(multi["texts"]) == 2 and len(multi["token_ids"]) == 2
    assert len(multi["finish_reason"]) == 2
    assert multi["completion_tokens"] == sum(len(t) for t in multi["token_ids"])

    # A rerun finds nothing to do and returns before loading the model.
    again = _run(*SMALL_ENGINE, *args, timeout=120)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 to generate" in again.stderr and "jinfer.llm" not in again.stderr
    assert out.read_text(encoding="utf-8") == text


@pytest.mark.slow
def test_chat_and_prompt_print_text():
    proc = _run(
        *SMALL_ENGINE, "--temperature", "0", "--chat", "Say hello.", "--prompt", "Once upon a"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--- [1] chat: Say hello." in proc.stdout
    assert "--- [2] prompt: Once upon a" in proc.stdout
    first = proc.stdout.split("--- [2]")[0].split("\n", 1)[1]
    second = proc.stdout.split("--- [2]")[1].split("\n", 1)[1]
    assert first.strip() and second.strip()


# ------------------------------------------------------------------ OpenAI batch files
def _batch_line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def test_openai_batch_lines_are_read_and_bad_ones_named(gen: ModuleType, tmp_path: Path):
    batch = sys.modules["_openai_batch"]
    path = tmp_path / "batch.jsonl"
    _write_jsonl(path, [
        _batch_line("a", CHAT, {"messages": []}),
        "{not json",
        _batch_line("a", CHAT, {}),
        {"custom_id": "g", "method": "GET", "url": CHAT, "body": {}},
        _batch_line("e", "/v1/embeddings", {}),
        _batch_line("b", COMPLETIONS, "text"),
        {"method": "POST"},
    ])  # fmt: skip
    assert batch.is_batch_file(path)
    lines = batch.read_batch(path)
    assert [b.custom_id for b in lines] == ["a", "(line 2)", "a", "g", "e", "b", "(line 7)"]
    errors = {b.line: b.error.message for b in lines if b.error is not None}
    assert lines[0].error is None and set(errors) == {2, 3, 4, 5, 6, 7}
    assert "not valid JSON" in errors[2] and "duplicate custom_id 'a'" in errors[3]
    assert "method must be POST" in errors[4] and "url must be one of" in errors[5]
    assert "body must be a JSON object" in errors[6] and "custom_id must be" in errors[7]
    records = tmp_path / "records.jsonl"
    _write_jsonl(records, [{"prompt": "x"}])
    assert not batch.is_batch_file(records)


@pytest.mark.slow
def test_openai_batch_file_runs_through_the_servers_handling_and_resumes(tmp_path: Path):
    src, out = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    ask = [{"role": "user", "content": "Say hi."}]
    lines = [
        _batch_line("chat", CHAT, {"model": MODEL, "messages": ask, "max_tokens": 6,
                                   "temperature": 0}),
        _batch_line("cmpl", COMPLETIONS, {"prompt": "The capital of France is", "max_tokens": 5,
                                          "temperature": 0}),
        "{broken",
        _batch_line("invalid", COMPLETIONS, {"prompt": "x", "temperature": -1}),
        _batch_line("chat", CHAT, {"messages": ask}),
        _batch_line("json", CHAT, {"messages": ask, "max_tokens": 40, "temperature": 0,
                                   "response_format": {"type": "json_object"}}),
        _batch_line("other-model", COMPLETIONS, {"model": "gpt-4", "prompt": "x"}),
    ]  # fmt: skip
    _write_jsonl(src, lines)
    done = {"id": "batch_req_0", "custom_id": "json", "response": {"status_code": 200}}
    out.write_text(json.dumps(done) + '\n{"id": "batch_req_1", "custom_id": "cmp', "utf-8")
    proc = _run(*SMALL_ENGINE, "--input", str(src), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 already in" in proc.stderr and "6 to run" in proc.stderr
    assert "2 ok, 4 failed" in proc.stderr
    entries = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    by_id = {}
    for e in entries[1:]:
        assert e["id"].startswith("batch_req_") and set(e) == {"id", "custom_id", "response",
                                                               "error"}  # fmt: skip
        by_id.setdefault(e["custom_id"], []).append(e)
    assert sorted(by_id) == ["(line 3)", "chat", "cmpl", "invalid", "other-model"]
    assert len(by_id["chat"]) == 2  # the first line ran, its duplicate is an error entry
    chat_ok, chat_dup = sorted(by_id["chat"], key=lambda e: e["response"]["status_code"])
    body = chat_ok["response"]["body"]
    assert chat_ok["error"] is None and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] <= 6
    assert chat_ok["response"]["request_id"] == body["id"]
    assert (
        chat_dup["response"]["status_code"] == 400 and "duplicate" in chat_dup["error"]["message"]
    )
    cmpl = by_id["cmpl"][0]["response"]["body"]
    assert cmpl["object"] == "text_completion" and cmpl["usage"]["completion_tokens"] == 5
    invalid = by_id["invalid"][0]
    assert invalid["response"]["status_code"] == 400
    assert invalid["response"]["body"]["error"]["param"] == "temperature"
    assert "temperature must be >= 0" in invalid["error"]["message"]
    assert by_id["other-model"][0]["response"]["status_code"] == 404
    # A rerun has nothing left: every line is in the output once.
    again = _run(*SMALL_ENGINE, "--input", str(src), "--output", str(out), timeout=120)
    assert again.returncode == 0 and "0 to run" in again.stderr, again.stderr[-2000:]
    assert len(out.read_text("utf-8").splitlines()) == len(entries)


@pytest.mark.slow
def test_ray_actors_give_the_single_process_results_line_for_line(tmp_path: Path):
    pytest.importorskip("ray.data", reason="the ray extra is not installed")
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, [
        {"prompt": "The capital of France is"},
        {"messages": [{"role": "user", "content": "Say hi."}]},
        {"id": "sampled", "prompt": "Once upon a time", "n": 2, "temperature": 0.8, "seed": 3},
        {"prompt_token_ids": [504, 3575, 282, 4649, 314], "max_tokens": 4},
        {"prompt": "def f(x):", "stop": ["\n\n"]},
    ])  # fmt: skip
    results = {}
    for name, extra in (("single", []), ("ray", ["--ray-actors", "2", "--batch-size", "2"])):
        out = tmp_path / f"{name}.jsonl"
        proc = _run(*SMALL_ENGINE, "--temperature", "0", "--input", str(src), "--output",
                    str(out), *extra)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
        results[name] = {str(r["id"]): r for r in lines}
    assert "on 2 Ray actors" in proc.stderr
    assert results["ray"] == results["single"] and len(results["ray"]) == 5
