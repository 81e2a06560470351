"""Incremental detokenization and stop strings.

Each step decodes only a short window of tokens, so the cost per token does not grow with the
output. Text that could still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = tuple(stop or ())
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.num_released = 0

    def add(self, token_ids: Sequence[int]) -> bool:
        """Append tokens; returns True if a stop string appeared (the text is cut before it)."""
        if self.tokenizer is None:
            return False
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for more tokens
        before = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._cut_at_stop(before)

    def _cut_at_stop(self, before: int) -> bool:
        start = max(0, before - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def release(self, finished: bool) -> str:
        """Text not yet released; holds back a tail that may still become a stop string."""
        end = len(self.text) if finished else max(self.num_released, len(self.text) - self.hold)
        new = self.text[self.num_released:end]
        self.num_released = end
        return new
