"""Turning generated token ids into text deltas, and finding stop strings in them.

Text is only released once it is stable: not ending in a partial UTF-8 character, and not
ending in something that may still grow into a stop string. A stop string itself is never
sent to the client. Stop strings count only once more than `min_tokens` tokens are out, as
in vLLM.

Each token costs the same however long the output: as vLLM does, only a short window of the
latest tokens is decoded (from `prefix_offset`, the tokens already turned into text up to
`read_offset`, and the new ones), and the text it adds past the window's old text is the new
text. The window stays one token wide but while tokens add up to a character only together.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.all_stops = tuple(s for s in stop if s)
        self.stop: tuple[str, ...] = ()  # the stop strings in force: none until past min_tokens
        self.min_tokens = min_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # the window starts here: tokens before it are text for good
        self.read_offset = 0  # tokens before this are in `text`
        self.text = ""  # everything decoded so far
        self.sent = 0  # how many characters of `text` the client has
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text newly safe to send (sets `stopped` on a stop string)."""
        self.token_ids.append(token_id)
        if len(self.token_ids) > self.min_tokens:
            self.stop = self.all_stops
        self.text += self._new_text(final=False)
        cut = self._find_stop()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._release(cut)
        end = len(self.text)
        return self._release(end - self._partial_stop_suffix(end))

    def flush(self) -> str:
        """At the end of generation, whatever was held back (a partial character too)."""
        if not self.stopped:
            self.text += self._new_text(final=True)
        return self._release(len(self.text))

    def _new_text(self, final: bool) -> str:
        """The text the tokens since `read_offset` add, once it does not end mid-character."""
        window = self.token_ids[self.prefix_offset :]
        before = self.tokenizer.decode(window[: self.read_offset - self.prefix_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(window, skip_special_tokens=True)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""  # nothing yet, or half a character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return after[len(before) :]

    def _find_stop(self) -> int | None:
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, self.sent - longest)
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix(self, end: int) -> int:
        """Length of the longest tail of text[:end] that begins some stop string."""
        for n in range(min(end - self.sent, max((len(s) for s in self.stop), default=0)), 0, -1):
            tail = self.text[end - n : end]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta
