"""Text in, text out: requests decoded together as one batch, their text streamed as it appears."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .chat import format_chat
from .generate import BatchDecoder
from .sampling import SamplingParams
from .text import TextStream


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    chat: bool = False  # the answer writes newlines as <n> (see chat.py)
    # Filled in while it runs.
    output_ids: list[int] = field(default_factory=list)  # every generated id, a final <eod> included
    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    cancelled: bool = False  # set from any thread: the request leaves the batch at the next step


@dataclass
class TextEvent:
    index: int  # which request
    text: str  # new text, possibly empty
    finished: bool  # the request's last event; its finish_reason is set


def run_requests(model, tokenizer, requests: list[Request]) -> Iterator[TextEvent]:
    """Decode the requests as one batch, yielding their text as it appears and one final event each."""
    decoder = BatchDecoder(model, [r.prompt_ids for r in requests], [r.params for r in requests],
                           stop_token_ids=(tokenizer.eod_id,))
    streams = [TextStream(tokenizer, r.prompt_ids, r.params.stop, r.chat) for r in requests]
    while not decoder.done:
        for i, r in enumerate(requests):
            if r.cancelled:
                decoder.finish(i, "cancelled")
        new_text = dict.fromkeys(range(len(requests)), "")
        for i, token in decoder.step():
            requests[i].output_ids.append(token)
            if token != tokenizer.eod_id:
                new_text[i] = streams[i].push(token)
                if streams[i].stopped:
                    decoder.finish(i, "stop")
        for i, r in enumerate(requests):
            if r.finish_reason is not None:
                continue
            text, reason = new_text[i], decoder.finish_reasons[i]
            if reason is not None:
                text += streams[i].flush()
                r.finish_reason = reason
            r.text += text
            if text or reason is not None:
                yield TextEvent(i, text, reason is not None)


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = False) -> list[int]:
    """Token ids of a plain prompt, or of a chat (a string is then one user message)."""
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.encode(format_chat(messages))
    return tokenizer.encode(prompt)


def complete(model, tokenizer, prompts: list[str] | list[list[dict]], params: SamplingParams | None = None,
             chat: bool = False) -> list[Request]:
    """Complete several prompts (or chats) in one batch; each returned request holds its text."""
    params = params or SamplingParams()
    requests = [Request(encode_prompt(tokenizer, p, chat), params, chat) for p in prompts]
    for _ in run_requests(model, tokenizer, requests):
        pass
    return requests


def stream(model, tokenizer, prompt: str | list[dict], params: SamplingParams | None = None,
           chat: bool = False) -> Iterator[str]:
    """The text of one completion, piece by piece."""
    request = Request(encode_prompt(tokenizer, prompt, chat), params or SamplingParams(), chat)
    for event in run_requests(model, tokenizer, [request]):
        if event.text:
            yield event.text
