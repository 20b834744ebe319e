"""The official Yuan 2.0 chat format.

A conversation is one line of text: the turns in order joined by `<n>` (newlines inside a turn are
written `<n>` too), then `<sep>`, after which the model writes the answer and ends it with `<eod>`:

    question 1<n>answer 1<n>question 2<sep>
"""

from __future__ import annotations

import reprlib

from .text import CHAT_NEWLINE

SEP = "<sep>"
ROLES = ("system", "user", "assistant")


def format_chat(messages: list[dict]) -> str:
    """The prompt for a list of {"role", "content"} messages, the last one from the user."""
    _check_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("the last chat message must come from the user")
    return CHAT_NEWLINE.join(_chat_text(m["content"]) for m in messages) + SEP


def chat_samples(messages: list[dict]) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs a conversation trains on, one per assistant turn: the prompt is
    format_chat of the conversation before that turn without its final <sep> (so `prompt <sep>
    answer` tokenizes exactly as `yuan chat` and the server render it), the answer is the reply
    with newlines written `<n>`, as the model writes them in a chat."""
    _check_messages(messages)
    samples = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0 or messages[i - 1]["role"] != "user":
            raise ValueError(f"message {i + 1} is an assistant reply that does not follow a user message")
        samples.append((format_chat(messages[:i]).removesuffix(SEP), _chat_text(m["content"])))
    if not samples:
        raise ValueError("a conversation to train on needs at least one assistant message")
    return samples


def _chat_text(content: str) -> str:
    return content.replace("\r\n", "\n").replace("\n", CHAT_NEWLINE)


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"a chat's messages must be a list of {{role, content}} objects, got {reprlib.repr(messages)}")
    if not messages:
        raise ValueError("a chat needs at least one message")
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError(f"a chat message must be an object with a role and a content, got {reprlib.repr(m)}")
        if m.get("role") not in ROLES:
            raise ValueError(f"unknown chat role {reprlib.repr(m.get('role'))}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"the content of a {m['role']} message must be a string")
