"""Tokenizers for jinfer: GGUF metadata, Hugging Face directories, chat templates.

Two backends sit behind one :class:`Tokenizer`:

* byte-level BPE (GGUF ``tokenizer.ggml.model == "gpt2"`` or an HF ``tokenizer.json``) on the
  Hugging Face ``tokenizers`` library, built the way ``transformers`` builds it from a GGUF file;
* sentencepiece (GGUF ``"llama"`` or a ``tokenizer.model``), with a ``ModelProto`` rebuilt from
  the GGUF vocabulary. Control tokens such as ``<start_of_turn>`` written in the text encode to
  their single ids, as ``transformers`` does.

Streaming (ids to text deltas, stop strings) is the engine's: `engine/detokenizer.py`.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinfer.loader import gguf_file

logger = logging.getLogger(__name__)

# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json). GGUF files of Gemma often
# carry none; it is used when a tokenizer with Gemma's turn tokens has no template of its own.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n    {%- set loop_messages = messages -%}\n'
    "{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n    {%- else -%}\n'
    "        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n    {%- endif -%}\n'
    "    {{ '<end_of_turn>\\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n"
)
# Tokens chat templates end a turn with; those a template uses become stop tokens.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>")
# Pre-tokenizer split regexes by GGUF ``tokenizer.ggml.pre`` (others use GPT-2's ByteLevel regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
# GGUF token types (they equal sentencepiece's ModelProto.SentencePiece.Type values).
_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class _HFBackend:
    """A Hugging Face ``tokenizers.Tokenizer`` (byte-level BPE or anything in tokenizer.json)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> _HFBackend:
        """Byte-level BPE equal to transformers' GGUF conversion (GPT2Tokenizer + GGUF tokens)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        spell = _bytes_to_unicode()
        alphabet = set(spell.values())
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {
            t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
            for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        bpe = models.BPE(
            vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
        tok = Tokenizer(bpe)
        split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [
                AddedToken(t, normalized=False, special=True)
                for t, ty in zip(tokens, types, strict=True)
                if ty == _CONTROL and set(t) <= alphabet
            ]
        )
        tok.add_tokens(
            [
                AddedToken(t, normalized=False, special=False)
                for t, ty in zip(tokens, types, strict=True)
                if ty == _USER_DEFINED and t in vocab
            ]
        )
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))


class _SPBackend:
    """sentencepiece, plus matching of control tokens (``<start_of_turn>``...) written in text."""

    def __init__(self, serialized_proto: bytes) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=serialized_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.special_ids = {
            i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        self.specials = {self.sp.id_to_piece(i): i for i in self.special_ids}
        self._lengths = sorted({len(t) for t in self.specials}, reverse=True)
        firsts = "".join(sorted({re.escape(t[0]) for t in self.specials if t}))
        self._starts = re.compile(f"[{firsts}]") if firsts else None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> _SPBackend:
        """Rebuild a BPE ``ModelProto`` with byte fallback from the GGUF vocabulary."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        tokens = meta["tokenizer.ggml.tokens"]
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        proto = pb.ModelProto()
        spec = proto.trainer_spec
        spec.model_type = pb.TrainerSpec.BPE
        spec.byte_fallback = True
        spec.vocab_size = len(tokens)
        for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            setattr(spec, f"{name}_id", meta.get(f"tokenizer.ggml.{key}_token_id", -1))
        norm = proto.normalizer_spec
        norm.name = "identity"
        norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        norm.remove_extra_whitespaces = False
        norm.escape_whitespaces = True
        for i, (tok, score, ty) in enumerate(zip(tokens, scores, types, strict=True)):
            if ty == _USER_DEFINED:  # llama.cpp wrote these with plain spaces
                tok = tok.replace(" ", "\u2581")
            ty = _UNKNOWN if i == unk else (ty if ty in (1, 2, 3, 4, 5, 6) else 1)
            proto.pieces.add(piece=tok, score=score, type=ty)
        if unk is None and not any(p.type == _UNKNOWN for p in proto.pieces):
            raise ValueError("sentencepiece GGUF vocabulary has no unknown token")
        return cls(proto.SerializeToString())

    def _split(self, text: str) -> list[str | int]:
        """``text`` cut into plain strings and ids of the special tokens written in it."""
        out: list[str | int] = []
        start = pos = 0
        while self._starts is not None and (m := self._starts.search(text, pos)) is not None:
            pos = m.start()
            for n in self._lengths:
                if (tid := self.specials.get(text[pos : pos + n])) is not None:
                    out += [text[start:pos], tid] if pos > start else [tid]
                    start = pos = pos + n
                    break
            else:
                pos += 1
        if start < len(text):
            out.append(text[start:])
        return out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split(text):
            ids += [part] if isinstance(part, int) else self.sp.encode(part)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    """A chat template compiled like ``transformers`` does (sandboxed, trim/lstrip blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(
        self,
        backend: _HFBackend | _SPBackend,
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

    def _token(self, i: int | None) -> str | None:
        return None if i is None else self._backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first iff the model adds it and ``add_special_tokens``."""
        ids = self._backend.encode(text)
        return [self.bos_token_id, *ids] if add_special_tokens and self.add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special (control) tokens are dropped if ``skip_special_tokens``."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

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
        text = _compile_template(template).render(
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
            backend: _HFBackend | _SPBackend = _HFBackend.from_gguf(meta)
        elif kind == "llama":
            backend = _SPBackend.from_gguf(meta)
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

            backend: _HFBackend | _SPBackend = _HFBackend(
                HFTokenizer.from_file(str(path / "tokenizer.json"))
            )
        elif (path / "tokenizer.model").is_file():
            backend = _SPBackend((path / "tokenizer.model").read_bytes())
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")

        def token_id(name: str) -> int | None:
            token = config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            return None if token is None else backend.token_to_id(token)

        bos = token_id("bos")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # a tokenizer.json post-processor may add BOS; a bare .model does
            add_bos = isinstance(backend, _SPBackend) or (
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
