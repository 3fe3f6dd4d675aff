"""sentencepiece: GGUF `"llama"` vocabularies (a `ModelProto` rebuilt from the GGUF vocabulary)
and `tokenizer.model` files. Control tokens such as `<start_of_turn>` written in the text encode
to their single ids, as `transformers` does."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinfer.tokenizer.token_types import UNKNOWN, USER_DEFINED


class SentencePieceBackend:
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
    def from_gguf(cls, meta: dict[str, Any]) -> SentencePieceBackend:
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
            if ty == USER_DEFINED:  # llama.cpp wrote these with plain spaces
                tok = tok.replace(" ", "\u2581")
            ty = UNKNOWN if i == unk else (ty if ty in (1, 2, 3, 4, 5, 6) else 1)
            proto.pieces.add(piece=tok, score=score, type=ty)
        if unk is None and not any(p.type == UNKNOWN for p in proto.pieces):
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
