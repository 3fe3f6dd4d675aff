"""Tokenizers for jinfer: GGUF metadata, Hugging Face directories, chat templates.

Two backends sit behind one :class:`Tokenizer`: byte-level BPE (`bpe.py`: GGUF ``"gpt2"``
vocabularies, HF ``tokenizer.json``) and sentencepiece (`sentencepiece.py`: GGUF ``"llama"``
vocabularies, ``tokenizer.model``); chat templates compile in `chat_template.py`.

Streaming (ids to text deltas, stop strings) is the engine's: `engine/detokenizer.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinfer.loader import gguf_file
from jinfer.tokenizer.bpe import BPEBackend
from jinfer.tokenizer.chat_template import END_OF_TURN_TOKENS, GEMMA_CHAT_TEMPLATE, compile_template
from jinfer.tokenizer.sentencepiece import SentencePieceBackend

logger = logging.getLogger(__name__)


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(
        self,
        backend: BPEBackend | SentencePieceBackend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos = add_bos and bos_token_id is not None
        self.vocab_size = backend.vocab_size
        if chat_template is None and all(
            backend.token_to_id(t) is not None for t in ("<start_of_turn>", "<end_of_turn>")
        ):
            logger.info("no chat template given; using Gemma's standard template")
            chat_template = GEMMA_CHAT_TEMPLATE
        self.chat_template = chat_template

    @property
    def backend(self) -> BPEBackend | SentencePieceBackend:
        """The vocabulary's implementation (what a grammar engine reads the tokens from)."""
        return self._backend

    def _token(self, i: int | None) -> str | None:
        return None if i is None else self._backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first iff the model adds it and ``add_special_tokens``."""
        ids = self._backend.encode(text)
        return [self.bos_token_id, *ids] if add_special_tokens and self.add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special (control) tokens are dropped if ``skip_special_tokens``."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: a text longer than n times this cannot
        be n tokens or fewer, which a caller can tell before encoding it. (A vocabulary entry's
        spelling has a character per byte, or per sentencepiece symbol, of what it stands
        for.)"""
        return max(1, *(len(t) for t in self.convert_ids_to_tokens(range(self.vocab_size))))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of ``ids`` (byte-level or sentencepiece spelling)."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry ``token``, or None if there is none."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the chat template (``chat_template=`` overrides it).

        Extra keyword arguments become template variables. With ``tokenize`` the prompt is
        encoded without adding BOS, since templates write it themselves.
        """
        template = kwargs.pop("chat_template", None) or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template=...")
        specials = {
            f"{name}_token": self._token(getattr(self, f"{name}_token_id"))
            for name in ("bos", "eos", "pad")
        }
        variables = {**specials, **kwargs}  # callers may override bos_token etc.
        text = compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def stop_token_ids(self) -> tuple[int, ...]:
        """EOS plus the end-of-turn tokens the chat template closes turns with."""
        stops = [] if self.eos_token_id is None else [self.eos_token_id]
        for token in END_OF_TURN_TOKENS:
            i = self._backend.token_to_id(token)
            if i is not None and i not in stops and token in (self.chat_template or ""):
                stops.append(i)
        return tuple(stops)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write tokenizer.json or tokenizer.model, and tokenizer_config.json, to ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(path)
        config = {
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token": self._token(self.bos_token_id),
            "eos_token": self._token(self.eos_token_id),
            "pad_token": self._token(self.pad_token_id),
            "chat_template": self.chat_template,
        }
        text = json.dumps(config, ensure_ascii=False, indent=2)
        (path / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | Any) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's metadata (path or ``GGUFReader``)."""
        if hasattr(path_or_reader, "fields"):
            meta = {k: f.contents() for k, f in path_or_reader.fields.items()}
        else:
            path = os.fspath(path_or_reader)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GGUF file not found: {path}")
            try:
                meta = gguf_file.read_metadata(path)
            except (OSError, struct.error, KeyError, UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"cannot read GGUF metadata from {path}: {e}") from e
        kind = meta.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
        if kind == "gpt2":
            backend: BPEBackend | SentencePieceBackend = BPEBackend.from_gguf(meta)
        elif kind == "llama":
            backend = SentencePieceBackend.from_gguf(meta)
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise.
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_pretrained_dir(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Load an HF-style directory: tokenizer.json or tokenizer.model + tokenizer_config.json."""
        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                config.update(json.loads((path / name).read_text(encoding="utf-8")))
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            backend: BPEBackend | SentencePieceBackend = BPEBackend(
                HFTokenizer.from_file(str(path / "tokenizer.json"))
            )
        elif (path / "tokenizer.model").is_file():
            backend = SentencePieceBackend((path / "tokenizer.model").read_bytes())
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")

        def token_id(name: str) -> int | None:
            token = config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            return None if token is None else backend.token_to_id(token)

        bos = token_id("bos")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # a tokenizer.json post-processor may add BOS; a bare .model does
            add_bos = isinstance(backend, SentencePieceBackend) or (
                bos is not None and backend.tok.encode("a").ids[:1] == [bos]
            )
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=token_id("eos"),
            pad_token_id=token_id("pad"),
            add_bos=bool(add_bos),
            chat_template=template,
        )


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a GGUF file or an HF-style directory."""
    p = Path(path)
    if p.is_dir():
        return Tokenizer.from_pretrained_dir(p)
    if p.is_file():
        return Tokenizer.from_gguf(p)
    raise FileNotFoundError(f"no GGUF file or tokenizer directory at {p}")
