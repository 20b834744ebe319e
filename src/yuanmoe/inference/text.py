"""From a stream of token ids to a stream of text: incremental detokenization that never cuts a
multi-byte character, the chat newline convention, and stop strings."""

from __future__ import annotations

CHAT_NEWLINE = "<n>"  # how the official chat format writes a newline inside a turn


class IncrementalDetokenizer:
    """Emits the text each new token adds.

    The text of a token depends on its neighbours (SentencePiece drops the space of a leading piece;
    a byte-level token may hold part of a UTF-8 character), so each step decodes a short window
    twice, with and without the new tokens, and emits the difference once it no longer ends in an
    incomplete character (U+FFFD). A few prompt tokens seed the window so that the first generated
    token keeps its leading space.
    """

    PROMPT_CONTEXT = 4

    def __init__(self, tokenizer, prompt_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.PROMPT_CONTEXT:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back at the end of the output, incomplete characters included."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix: self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


def held_suffix(text: str, patterns: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of one of `patterns`."""
    longest = 0
    for pattern in patterns:
        for n in range(min(len(pattern) - 1, len(text)), longest, -1):
            if text.endswith(pattern[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Token ids in, output text out, piece by piece.

    chat=True turns the `<n>` the model writes into newlines. Stop strings end the text before
    them; text that may turn out to be the start of a stop string (or of `<n>`) is held back until
    the next token settles it, so no piece ever has to be taken back.
    """

    def __init__(self, tokenizer, prompt_ids: list[int] = (), stop: tuple[str, ...] = (), chat: bool = False):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.chat = chat
        self.raw = ""  # decoded, not yet converted (a possible partial `<n>`)
        self.pending = ""  # converted, not yet emitted (a possible partial stop string)
        self.stopped = False
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._feed(self.detokenizer.push(token_id), final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._feed(self.detokenizer.flush(), final=True)

    def _feed(self, piece: str, final: bool) -> str:
        self.raw += piece
        if self.chat:
            converted = self.raw.replace(CHAT_NEWLINE, "\n")
            keep = 0 if final else held_suffix(converted, (CHAT_NEWLINE,))
            self.pending += converted[: len(converted) - keep]
            self.raw = converted[len(converted) - keep:]
        else:
            self.pending += self.raw
            self.raw = ""
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.stopped = True
            self.pending = ""
        else:
            keep = 0 if final else held_suffix(self.pending, self.stop)
            out = self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(self.pending) - keep:]
        self.text += out
        return out
