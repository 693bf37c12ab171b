"""Stop strings matched on the detokenized text, across token boundaries.

Text arrives in pieces (one per token). Text that could still turn out to be the start of a stop
string is held back until the next pieces resolve it; on a match, the output ends right before
the stop string, which is never released. Invariant: the held-back text is the longest suffix of
the text seen so far that is a proper prefix of some stop string, and contains no full match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)  # per token: slots, not frozen (cheaper to build)
class StopResult:
    text: str  # text safe to release now
    matched: str | None = None  # the stop string that ended the output, if any


class StopMatcher:
    def __init__(self, stop_sequences: Sequence[str]) -> None:
        # An empty stop string would match before any text: it carries no meaning, so it is dropped.
        self._stops: tuple[str, ...] = tuple(s for s in stop_sequences if s)
        self._held = ""
        self._done = False

    @property
    def held(self) -> str:
        return self._held

    def push(self, text: str) -> StopResult:
        """Add the next piece of text. After a match, the matcher accepts nothing more."""
        if self._done:
            return StopResult("")
        if not self._stops:
            return StopResult(text)
        buf = self._held + text
        first: tuple[int, str] | None = None
        for stop in self._stops:
            i = buf.find(stop)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, stop)
        if first is not None:
            self._held = ""
            self._done = True
            return StopResult(buf[: first[0]], matched=first[1])
        keep = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return StopResult(buf[: len(buf) - keep])

    def flush(self) -> str:
        """Release what is held back: the output ended without completing a stop string."""
        held, self._held = self._held, ""
        return "" if self._done else held

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
