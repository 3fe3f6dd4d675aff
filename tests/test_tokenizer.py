"""Tests for jinfer.tokenizer.tokenizer against Hugging Face transformers' own GGUF tokenizers.

SmolLM2's reference comes from transformers live (a few seconds). Gemma's takes much longer to
build, so it is recorded once by ``scripts/make_tokenizer_fixtures.py`` into
``tests/fixtures/tokenizer_gemma3-270m.json``. Tests that load transformers are marked slow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jinfer.engine.detokenizer import IncrementalDetokenizer
from jinfer.tokenizer.tokenizer import Tokenizer, load_tokenizer

# Also read (with ast) by scripts/make_tokenizer_fixtures.py: rerun it after editing this list.
SAMPLE_TEXTS = [
    "",
    " ",
    "\n",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(x, y):\n    if x:\n\treturn x + y\n    return None\n",
    "Numbers: 1234567 and 3.14159, 42nd, 1,000,000 and -0.5e10.",
    "Emoji 😀🎉👍🏽 and CJK 你好，世界 こんにちは 안녕하세요",
    "Accents: café, naïve, Ωμέγα, Привет, مرحبا, नमस्ते",
    "multiple   spaces    here\n\n\nand newlines\n",
    "  leading and trailing spaces  ",
    "   x\r\nwindows\r\n line endings",
    "\t\ttabs\tinside\t",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
    "Specials mid-text: a<unk>b <mask> <unused0> <start_of_image> <|endoftext|>",
    '<div class="x">hi</div> and <p>para</p>',
    "Typography: résumé — “quotes” ‘single’ … ©®™ ½",
    "URL https://example.com/path?q=1&b=2#frag",
    "I'm sure you're right, they'll see it's what we'd do.",
    "UPPER lower MiXeD",
    "zero\u200bwidth and non\u00a0breaking",
    "byte fallback: \U00013000\U00010900 done",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]
# Multi-byte text for the streaming tests.
STREAM_TEXTS = [
    "Emoji 😀🎉👍🏽 and CJK 你好，世界 こんにちは",
    "Accents: café, naïve, Ωμέγα — “quoted” 🇫🇷 flag",
    "🤖" * 5 + "\u200b\u00e9\u0301 \U00013000\U00010900!",
]
FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_gemma3-270m.json"
GEMMA_2_TURNS = (
    "<bos><start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nName a color.<end_of_turn>\n"
    "<start_of_turn>model\n"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a color."},
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_gguf_path)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf_path: str):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path)
    )


@pytest.fixture(scope="module")
def gemma_fixture() -> dict:
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} missing: run scripts/make_tokenizer_fixtures.py once")
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


# --- SmolLM2 (byte-level BPE) -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_smollm2_ids_match_hf(smollm2: Tokenizer, hf_smollm2, text: str) -> None:
    for special in (True, False):
        expected = hf_smollm2(text, add_special_tokens=special)["input_ids"]
        assert smollm2.encode(text, add_special_tokens=special) == expected
    ids = smollm2.encode(text)
    assert smollm2.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert smollm2.decode(ids, skip_special_tokens=skip) == hf_smollm2.decode(
            ids, skip_special_tokens=skip
        )
    assert smollm2.convert_ids_to_tokens(ids) == hf_smollm2.convert_ids_to_tokens(ids)


@pytest.mark.slow
def test_smollm2_chat_template_matches_hf(smollm2: Tokenizer, hf_smollm2) -> None:
    for gen in (True, False):
        ours = smollm2.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        theirs = hf_smollm2.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
        assert ours == theirs
    ids = smollm2.apply_chat_template(MESSAGES, tokenize=True)
    prompt = smollm2.apply_chat_template(MESSAGES)
    assert ids == hf_smollm2(prompt, add_special_tokens=False)["input_ids"]


def test_smollm2_properties(smollm2: Tokenizer) -> None:
    assert (smollm2.bos_token_id, smollm2.eos_token_id, smollm2.pad_token_id) == (1, 2, 2)
    assert smollm2.vocab_size == 49152
    assert smollm2.encode("Hi")[0] != smollm2.bos_token_id  # SmolLM2 adds no BOS
    assert smollm2.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)[0] == 1
    assert smollm2.stop_token_ids() == (2,)
    assert smollm2.decode(smollm2.encode("<|im_start|>hi<|im_end|>")) == "hi"


# --- Gemma 3 (sentencepiece) ---------------------------------------------------------------------


def test_gemma_fixture_is_current(gemma_fixture: dict) -> None:
    texts = [case["text"] for case in gemma_fixture["cases"]]
    assert texts == SAMPLE_TEXTS, "SAMPLE_TEXTS changed: rerun scripts/make_tokenizer_fixtures.py"


@pytest.mark.parametrize("index", range(len(SAMPLE_TEXTS)))
def test_gemma_ids_match_hf_fixture(gemma3: Tokenizer, gemma_fixture: dict, index: int) -> None:
    case = gemma_fixture["cases"][index]
    text = case["text"]
    assert gemma3.encode(text) == case["ids"]
    ids = gemma3.encode(text, add_special_tokens=False)
    assert ids == case["ids_no_special"]
    assert gemma3.decode(ids, skip_special_tokens=False) == case["decoded"] == text


def test_gemma_properties(gemma3: Tokenizer, gemma_fixture: dict) -> None:
    ids = (gemma3.bos_token_id, gemma3.eos_token_id, gemma3.pad_token_id)
    assert ids == (2, 1, 0)
    assert ids == tuple(gemma_fixture[f"{n}_token_id"] for n in ("bos", "eos", "pad"))
    assert gemma3.vocab_size == 262144
    assert gemma3.encode("Hi")[0] == 2
    assert gemma3.encode("<start_of_turn>x<end_of_turn>", add_special_tokens=False) == [
        105,
        gemma3.encode("x", add_special_tokens=False)[0],
        106,
    ]
    assert gemma3.stop_token_ids() == (1, 106)
    assert gemma3.convert_ids_to_tokens([2, 105, 106]) == [
        "<bos>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    assert gemma3.decode(gemma3.encode("<start_of_turn>hi there")) == "hi there"


def test_gemma_chat_template(gemma3: Tokenizer) -> None:
    assert gemma3.apply_chat_template(MESSAGES) == GEMMA_2_TURNS
    no_prompt = gemma3.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert no_prompt == GEMMA_2_TURNS.removesuffix("<start_of_turn>model\n")
    ids = gemma3.apply_chat_template(MESSAGES, tokenize=True)
    assert ids == gemma3.encode(GEMMA_2_TURNS[len("<bos>") :])
    assert ids[:2] == [2, 105] and ids.count(2) == 1
    tail = gemma3.encode("<start_of_turn>model\n", add_special_tokens=False)
    assert ids[-len(tail) :] == tail and tail[0] == 105
    with pytest.raises(Exception, match="alternate"):
        gemma3.apply_chat_template([{"role": "assistant", "content": "x"}])


# --- both ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer(request, name: str, text: str) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    tail = detok.flush()
    assert "".join(deltas) + tail == tok.decode(ids) == text
    assert detok.text == text
    # After a prompt, only the generated ids' text comes out.
    prompt = tok.encode("Say: ")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(detok.add(i) for i in tok.encode(text, add_special_tokens=False)) + detok.flush()
    assert out == text


def test_detokenizer_holds_back_partial_characters(gemma3: Tokenizer) -> None:
    # A character outside the vocabulary falls back to one byte token per UTF-8 byte.
    ids = gemma3.encode("\U00013000", add_special_tokens=False)
    assert len(ids) == 4 and gemma3.convert_ids_to_tokens(ids)[0].startswith("<0x")
    detok = IncrementalDetokenizer(gemma3)
    assert [detok.add(i) for i in ids] == ["", "", "", "\U00013000"]
    detok = IncrementalDetokenizer(gemma3)
    assert [detok.add(i) for i in ids[:2]] == ["", ""]
    assert detok.flush() == gemma3.decode(ids[:2])  # broken tail comes out only at the end


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_save_pretrained_round_trip(request, tmp_path: Path, name: str) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    tok.save_pretrained(tmp_path)
    expected_file = "tokenizer.json" if name == "smollm2" else "tokenizer.model"
    assert (tmp_path / expected_file).is_file() and (tmp_path / "tokenizer_config.json").is_file()
    for loaded in (Tokenizer.from_pretrained_dir(tmp_path), load_tokenizer(str(tmp_path))):
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size", "chat_template"):
            assert getattr(loaded, attr) == getattr(tok, attr), attr
        assert loaded.stop_token_ids() == tok.stop_token_ids()
        for text in SAMPLE_TEXTS:
            assert loaded.encode(text) == tok.encode(text), text
            assert loaded.decode(tok.encode(text)) == tok.decode(tok.encode(text))
        assert loaded.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)


def test_chat_template_jinja_file_overrides(smollm2: Tokenizer, tmp_path: Path) -> None:
    smollm2.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{{ eos_token }}"
    )
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert loaded.apply_chat_template(MESSAGES[1:2]) == "[user]Hi!<|im_end|>"


@pytest.mark.slow
def test_from_gguf_reader(smollm2_gguf_path: str, smollm2: Tokenizer) -> None:
    gguf = pytest.importorskip("gguf")
    tok = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path))
    assert tok.chat_template == smollm2.chat_template
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == smollm2.encode(text)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.from_gguf(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_pretrained_dir(tmp_path / "absent")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        load_tokenizer(str(junk))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8 + b"\x05" + b"\x00" * 7)
    with pytest.raises(ValueError, match="truncated.gguf"):
        load_tokenizer(str(truncated))


def test_gguf_without_or_with_unsupported_tokenizer(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")

    def write(path: Path, model: str | None) -> str:
        writer = gguf.GGUFWriter(str(path), "llama")
        if model is not None:
            writer.add_tokenizer_model(model)
            writer.add_token_list(["a", "b"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return str(path)

    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf(write(tmp_path / "none.gguf", None))
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf(write(tmp_path / "bert.gguf", "bert"))


def test_missing_chat_template(smollm2: Tokenizer, tmp_path: Path) -> None:
    smollm2.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained_dir(tmp_path).apply_chat_template(MESSAGES)
