"""Incremental detokenization (TGI's prefix_offset/read_offset algorithm).

Decoding token by token loses information: SentencePiece drops the leading space of a lone token,
and byte-level BPE splits multi-byte characters (emoji, CJK) across tokens, so one token alone
decodes to U+FFFD. Instead, every step decodes a small window that starts a few tokens back
(`prefix_offset`) twice -- without and with the new tokens -- and emits the difference, but only
once the window's text no longer ends with U+FFFD (an incomplete character). Invariant:
`ids[prefix_offset:read_offset]` is the context whose text was already emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens of left context; enough for any tokenizer's space rules


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Feed generated ids one at a time with add(); each call returns the text that became
    final. flush() returns what is left at the end (possibly ending with U+FFFD when the model
    stopped inside a character). The concatenation of all returned strings is the text of the
    generated ids decoded in the context of the prompt."""

    def __init__(
        self,
        decoder: Decoder,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = decoder
        self._skip = skip_special_tokens
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        # A prompt that ends inside a character (e.g. cut by truncation) would make the context
        # text change length once the character completes; decode without context then.
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._emitted: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._emitted.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """Text of the tokens not emitted yet, incomplete characters included."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self._emitted.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)
