"""Grammars for constrained decoding, on llguidance: the model's vocabulary is handed to it once
(~0.3 s for SmolLM2's), each constraint compiles to a matcher template (~1 ms for a small
schema) on a worker thread under a time bound, and templates are cached (LRU, bounded). Every
request gets its own matcher, a copy of the template, which it advances token by token."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import threading
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from jinfer.sampling_params import ParamError, StructuredOutputsParams
from jinfer.tokenizer.bpe import BPEBackend
from jinfer.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class GrammarError(ParamError):
    """A constraint that does not compile (invalid, unsupported, or too slow to build)."""

    def __init__(self, message: str) -> None:
        super().__init__("structured_outputs", f"structured_outputs: {message}")


def llguidance_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The vocabulary as llguidance sees it: a byte-level BPE's tokenizer.json as it is, a
    sentencepiece vocabulary as the bytes each piece stands for (control pieces marked with a
    leading 0xff, which keeps them out of every grammar's text). Its end tokens are the
    model's stop tokens: a grammar lets them through once its text is complete."""
    eos = list(tokenizer.stop_token_ids()) or [tokenizer.eos_token_id]
    backend = tokenizer.backend
    if isinstance(backend, BPEBackend):
        return llguidance.LLTokenizer(
            backend.tok.to_str(), n_vocab=tokenizer.vocab_size, eos_token=eos
        )
    special = backend.special_ids
    pieces = [backend.id_to_token(i) for i in range(tokenizer.vocab_size)]
    wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, pieces, special))
    return llguidance.LLTokenizer(wrapper, n_vocab=tokenizer.vocab_size, eos_token=eos)


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads of a sentencepiece vocabulary."""

    def __init__(self, tokenizer: Tokenizer, pieces: list[str], special: set[int]) -> None:
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(special)
        self.tokens = [_piece_bytes(p, i in special) for i, p in enumerate(pieces)]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")
        return self._tokenizer.encode(text, add_special_tokens=False)


def _piece_bytes(piece: str, special: bool) -> bytes:
    if special:
        return b"\xff" + piece.encode("utf-8")
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])  # a byte-fallback piece
    return piece.replace("\u2581", " ").encode("utf-8")


class CompiledGrammar:
    """A compiled constraint; `matcher()` gives each request its own state."""

    def __init__(self, template: llguidance.LLMatcher, grammar: str) -> None:
        self._template = template
        self.grammar = grammar  # llguidance's grammar text (for logs)

    def matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` for one tokenizer: off the caller's thread, each within
    `timeout_s` (past it: GrammarError), the last `cache_size` kept."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        cache_size: int = 256,
        timeout_s: float = 10.0,
        max_workers: int = 2,
    ) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._cache: collections.OrderedDict[tuple, CompiledGrammar] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._vocab_lock = threading.Lock()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="jinfer-grammar"
        )
        self.num_compiles = 0

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary, built once (0.2-1.2 s): two first compiles on the two workers must
        not both build it."""
        with self._vocab_lock:
            if self._lltokenizer is None:
                self._lltokenizer = llguidance_tokenizer(self.tokenizer)
            return self._lltokenizer

    def prepare(self) -> concurrent.futures.Future:
        """Starts building the vocabulary on a worker (engine start), so that the first
        constrained request pays only for its own grammar."""
        return self._pool.submit(lambda: self.lltokenizer)

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        key = params.cache_key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        future = self._pool.submit(self._build, params)
        try:
            compiled = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise GrammarError(
                f"the {params.kind} constraint did not compile within {self.timeout_s:g} s"
            ) from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _build(self, params: StructuredOutputsParams) -> CompiledGrammar:
        grammar = grammar_text(params)
        lltok = self.lltokenizer
        error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"the {params.kind} constraint is invalid: {error}")
        template = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"the {params.kind} constraint is invalid: {template.get_error()}")
        self.num_compiles += 1
        return CompiledGrammar(template, grammar)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# Whitespace JSON may hold between its tokens, unless disable_any_whitespace: any layout a
# pretty-printer writes (one line break per gap, indentation to 48 columns), but bounded, for
# small models that would otherwise pad an object with blank lines until max_tokens.
JSON_WHITESPACE = r"[ \t]{0,4}(\r?\n[ \t]{0,48})?"


def grammar_text(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for `params`."""
    kind = params.kind
    options: dict[str, Any] = {"whitespace_flexible": not params.disable_any_whitespace}
    if not params.disable_any_whitespace:
        options["whitespace_pattern"] = JSON_WHITESPACE
    try:
        if kind in ("json", "json_object"):
            schema = params.json if kind == "json" else {"type": "object"}
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, dict):
                raise GrammarError("json must be a JSON schema object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            lark = "start: " + " | ".join(json.dumps(c) for c in params.choice)
            return llguidance.LLMatcher.grammar_from_lark(lark)
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(params.grammar))
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's parse errors, by many types
        raise GrammarError(f"the {kind} constraint does not parse: {e}") from None
