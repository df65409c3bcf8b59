"""Incremental detokenization that never emits half of a multi-byte character."""
from __future__ import annotations

_PROMPT_CONTEXT_TOKENS = 5  # prompt tail decoded along, so a leading space of token 1 survives


class IncrementalDetokenizer:
    """Per-sequence text stream: feed one token at a time, get the newly completed text.

    Byte-level BPE splits a UTF-8 character across tokens; decoding such a prefix
    yields U+FFFD. We decode a small window [prefix, end) and emit only when the
    window's text grew and does not end in U+FFFD, then slide the window.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0                 # window start (context only, already emitted)
        self._read = len(self._ids)      # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return text that is now complete ("" if still mid-character)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation, minus any dangling partial character."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):].rstrip("\ufffd") if len(after) > len(before) else ""
