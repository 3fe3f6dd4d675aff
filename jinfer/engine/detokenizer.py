"""Token ids to text as they stream: `IncrementalDetokenizer` yields text deltas, holding back
incomplete UTF-8 (stop strings are searched in its text: `output_processor.py`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from jinfer.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Streams text from ids one at a time, holding back incomplete UTF-8 sequences.

    Uses vLLM's prefix/read offsets: each step decodes only the few ids since the last emitted
    text (plus a little context, so sentencepiece spacing comes out right).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = [int(i) for i in prompt_ids]
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.text = ""

    def _step(self, final: bool) -> str:
        decode = functools.partial(
            self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens
        )
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation)."""
        return self._step(final=True) if self.read_offset < len(self.ids) else ""
