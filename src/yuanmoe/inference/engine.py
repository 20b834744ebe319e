"""Text in, text out: requests decoded together as one batch, their text streamed as it appears;
more requests can join a running batch between steps (continuous batching)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .chat import format_chat
from .generate import BatchDecoder
from .prefix_cache import PrefixCache
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


class RunningBatch:
    """Requests decoded together; `add` starts more between steps, `step` advances every running one
    by a token and returns their events: new text, and one final event per request. An event's
    index is the request's sequence number, which `add` returns."""

    def __init__(self, model, tokenizer, prefix_cache: PrefixCache | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.prefix_cache = prefix_cache  # shared by the batches of a chat or a server
        self.decoder: BatchDecoder | None = None
        self.requests: dict[int, Request] = {}  # the running ones, by sequence number
        self.streams: dict[int, TextStream] = {}

    def add(self, requests: list[Request]) -> list[int]:
        """Check and prefill the requests now (a bad prompt raises ValueError and starts none of
        them); they produce tokens from the next step. Returns their sequence numbers."""
        prompts, params = [r.prompt_ids for r in requests], [r.params for r in requests]
        if self.decoder is None or self.decoder.done:
            stop, cache = (self.tokenizer.eod_id,), self.prefix_cache
            if cache is None:
                self.decoder = BatchDecoder(self.model, prompts, params, stop_token_ids=stop)
                seqs = list(range(len(requests)))
            else:  # the first prompt starts the batch from its cached prefix, if any; the rest join it
                decoder = BatchDecoder(self.model, prompts[:1], params[:1], stop, prefix_cache=cache,
                                       prefix=cache.lookup(prompts[0]))
                seqs = [0] + (decoder.add(prompts[1:], params[1:]) if len(prompts) > 1 else [])
                self.decoder = decoder  # only now: a bad prompt among the rest leaves no orphan running
        else:
            seqs = self.decoder.add(prompts, params)
        for seq, r in zip(seqs, requests):
            self.requests[seq] = r
            self.streams[seq] = TextStream(self.tokenizer, r.prompt_ids, r.params.stop, r.chat)
        return seqs

    def step(self) -> list[TextEvent]:
        decoder, eod = self.decoder, self.tokenizer.eod_id
        for seq, r in self.requests.items():
            if r.cancelled:
                decoder.finish(seq, "cancelled")
        new_text = dict.fromkeys(self.requests, "")
        for seq, token in decoder.step():
            self.requests[seq].output_ids.append(token)
            if token != eod:
                new_text[seq] = self.streams[seq].push(token)
                if self.streams[seq].stopped:
                    decoder.finish(seq, "stop")
        events = []
        for seq, r in list(self.requests.items()):
            text, reason = new_text[seq], decoder.finish_reasons[seq]
            if reason is not None:
                text += self.streams.pop(seq).flush()
                r.finish_reason = reason
                del self.requests[seq]
                decoder.forget(seq)
            r.text += text
            if text or reason is not None:
                events.append(TextEvent(seq, text, reason is not None))
        return events


def run_requests(model, tokenizer, requests: list[Request],
                 prefix_cache: PrefixCache | None = None) -> Iterator[TextEvent]:
    """Decode the requests as one batch, yielding their text as it appears and one final event each
    (an event's index is the request's position in `requests`)."""
    batch = RunningBatch(model, tokenizer, prefix_cache)
    batch.add(requests)
    while batch.requests:
        yield from batch.step()


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
