"""Token guards, vLLM's `allowed_token_ids` and `bad_words`, applied through the same token mask
as grammars: allowed ids are a fixed mask row; a bad word is banned as the token sequences it
encodes to (as written and after a space, as vLLM does), its last token masked out whenever the
output ends with the rest of it (a one-token word: always)."""

from __future__ import annotations

import numpy as np

from jinfer.structured.bitmask import mask_width
from jinfer.tokenizer.tokenizer import Tokenizer


def _bit(token: int) -> tuple[int, np.int32]:
    return token // 32, np.int32(np.uint32(1 << (token % 32)).view(np.int32))


class TokenGuards:
    """One request's allowed ids and bad words, ready to mask its rows."""

    def __init__(
        self, vocab_size: int, allowed: list[int] | None, bad_words: list[list[int]]
    ) -> None:
        self.allowed_row: np.ndarray | None = None  # [W] int32
        if allowed is not None:
            bits = np.zeros(mask_width(vocab_size) * 32, np.uint8)
            bits[np.asarray(allowed, np.int64)] = 1
            self.allowed_row = np.packbits(bits, bitorder="little").view(np.int32)
        self.always = sorted({w[0] for w in bad_words if len(w) == 1})
        self.sequences = [w for w in bad_words if len(w) > 1]

    @classmethod
    def build(
        cls,
        tokenizer: Tokenizer,
        vocab_size: int,
        allowed: list[int] | None,
        bad_words: list[str] | None,
    ) -> TokenGuards | None:
        """The guards of a request, or None when it has none."""
        if allowed is None and not bad_words:
            return None
        sequences = []
        for word in bad_words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return cls(vocab_size, allowed, sequences)

    @property
    def needs_history(self) -> bool:
        """Whether masking reads the output so far (a bad word of several tokens)."""
        return bool(self.sequences)

    def apply(self, row: np.ndarray, output_ids: list[int]) -> None:
        """Clears in `row` [W] int32 the bits of every token these guards forbid next."""
        if self.allowed_row is not None:
            row &= self.allowed_row
        banned = list(self.always)
        for seq in self.sequences:
            prefix = seq[:-1]
            if (
                len(output_ids) >= len(prefix)
                and output_ids[len(output_ids) - len(prefix) :] == prefix
            ):
                banned.append(seq[-1])
        for token in banned:
            word, bit = _bit(token)
            row[word] &= ~bit
