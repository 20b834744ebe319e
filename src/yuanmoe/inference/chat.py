"""The official Yuan 2.0 chat format.

A conversation is one line of text: the turns in order joined by `<n>` (newlines inside a turn are
written `<n>` too), then `<sep>`, after which the model writes the answer and ends it with `<eod>`:

    question 1<n>answer 1<n>question 2<sep>
"""

from __future__ import annotations

from .text import CHAT_NEWLINE

SEP = "<sep>"
ROLES = ("system", "user", "assistant")


def format_chat(messages: list[dict]) -> str:
    """The prompt for a list of {"role", "content"} messages, the last one from the user."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    for m in messages:
        if m.get("role") not in ROLES:
            raise ValueError(f"unknown chat role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"the content of a {m['role']} message must be a string")
    if messages[-1]["role"] != "user":
        raise ValueError("the last chat message must come from the user")
    turns = [m["content"].replace("\r\n", "\n").replace("\n", CHAT_NEWLINE) for m in messages]
    return CHAT_NEWLINE.join(turns) + SEP
