"""An OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics (Prometheus text).

Every field of OpenAI's request schemas is implemented, informational, or refused by name unless
it holds a neutral value (null, `"tools": []`); fields OpenAI does not have are refused, the
extensions top_k and repetition_penalty aside; every number is checked to a range its error states.

Errors come back in the OpenAI shape, {"error": {"message", "type", "param", "code"}}, with a 4xx
status for anything the client can fix (unknown routes and methods included), 401 without the API
key when one is set, and 429 with Retry-After when the queue is full. Streams are server-sent events
ending in `data: [DONE]`. Tokenizing runs in a thread pool, never on the event loop.
"""

from __future__ import annotations

import hmac
import json
import reprlib
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from ..inference.chat import format_chat
from ..inference.engine import Request
from ..inference.generate import check_prompt_length, check_token_ids
from ..inference.sampling import SamplingParams
from ..inference.prefix_cache import PrefixCache
from .metrics import Metrics
from .scheduler import GenerationError, Scheduler, ServerBusy

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
MAX_N = 8  # choices per prompt


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict | None = None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _check_text(text: str, param: str) -> None:
    """JSON can carry a lone UTF-16 surrogate (\\ud800), which is no character of any text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param}: character {exc.start} is a lone UTF-16 surrogate ({text[exc.start]!r}), "
                            f"which is not text; send valid Unicode", param=param) from None


def _number(kind: type, low, high=None, default=None, above: bool = False):
    """A field holding an int or float from `low` (excluded if `above`) to `high` (None: no bound):
    null means `default`, and every refusal, a wrong type included, states the range."""
    what = "an integer" if kind is int else "a number"
    if high is None:
        span = f"of at least {low}"
    elif above:
        span = f"greater than {low} and at most {high}"
    else:
        span = f"from {low} to {high}"

    def check(value, handler):
        if value is None:
            return default
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("out_of_range", f"must be {what} {span}, got {{value}}",
                                      {"value": reprlib.repr(value)}) from None

    bounds = {"gt" if above else "ge": low, "le": high}
    return Annotated[kind, Field(default, **bounds), WrapValidator(check)]


def _unsupported(what: str, *neutral, hint: str = ""):
    """A field of OpenAI's this server does not implement: null, or a value that asks for nothing
    beyond what the server does anyway (`neutral`, compared with its type: 1 is not true), passes;
    any other value is refused, never ignored."""
    fix = "leave it out" + (f" or send {json.dumps(neutral[0])}" if neutral else "") + (f"; {hint}" if hint else "")

    def check(value):
        if not any(type(value) is type(n) and value == n for n in (None, *neutral)):
            raise PydanticCustomError("unsupported", f"is not supported by this server ({what}); {fix}")
        return value

    return Annotated[Any, Field(None), AfterValidator(check)]


_NO_LOGPROBS = "it returns no log probabilities"
_NO_LOGIT_BIAS = "it applies no logit bias"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False
    # A mitigation of a side channel: a client that asks for it must learn it does not get it.
    include_obfuscation: _unsupported("its streams carry no obfuscation", False)


class _Sampling(BaseModel):
    # No NaN or Infinity (Python's JSON reader accepts them): every number must be one the sampler can use.
    # A field this server does not know is refused, since ignoring it would answer a different request.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: _number(int, 1)  # and at most the server's cap, checked in build_requests
    temperature: _number(float, 0, 2, default=1.0)
    top_p: _number(float, 0, 1, default=1.0, above=True)
    top_k: _number(int, 0, 2**31 - 1, default=0)  # not OpenAI's; vLLM and others accept it too
    repetition_penalty: _number(float, 0, 100, default=1.0, above=True)  # not OpenAI's either
    frequency_penalty: _number(float, -2, 2, default=0.0)
    presence_penalty: _number(float, -2, 2, default=0.0)
    seed: _number(int, -2**63, 2**63 - 1)
    stop: str | list[str] | None = None
    n: _number(int, 1, MAX_N, default=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # informational: nothing depends on it
    logit_bias: _unsupported(_NO_LOGIT_BIAS, {})


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids of this model's tokenizer
    logprobs: _unsupported(_NO_LOGPROBS)
    best_of: _unsupported("it does not rank completions", 1, hint="use n for several completions")
    echo: _unsupported("it does not repeat the prompt", False, hint="prepend the prompt yourself")
    suffix: _unsupported("it does not insert text", "")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[dict]  # newer clients may send a list of parts; only text parts are supported
    name: _unsupported("the chat format has no names")
    # The fields of a reply's message, which clients send back as the assistant's turn (model_dump()
    # gives them all, null in a reply of this server); annotations is not in OpenAI's request schema.
    refusal: _unsupported("it writes no refusals")
    tool_calls: _unsupported("it calls no tools", [])
    function_call: _unsupported("it calls no functions")
    audio: _unsupported("it answers in text only")
    annotations: _unsupported("it writes no annotations", [])
    tool_call_id: _unsupported("it calls no tools")  # only tool messages have one, and their role is refused

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(set(part) != {"type", "text"} or part["type"] != "text" or not isinstance(part["text"], str)
               for part in self.content):
            raise APIError(400, "messages: only text content is supported (parts holding just a type 'text' "
                                "and its text)", param="messages")
        return "".join(part["text"] for part in self.content)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: _number(int, 1)
    logprobs: _unsupported(_NO_LOGPROBS, False)
    top_logprobs: _unsupported(_NO_LOGPROBS, 0)
    # Informational: nothing depends on them. The prefix cache needs no key; it finds shared prefixes itself.
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None  # there are no tools (see `tools`), so no parallel calls either
    tools: _unsupported("it calls no tools", [])
    tool_choice: _unsupported("it calls no tools", "none", "auto")
    functions: _unsupported("it calls no functions", [])
    function_call: _unsupported("it calls no functions", "none", "auto")
    response_format: _unsupported("it does not constrain the output's format", {"type": "text"})
    audio: _unsupported("it answers in text only")
    modalities: _unsupported("it answers in text only", ["text"])
    prediction: _unsupported("it takes no predicted output")
    reasoning_effort: _unsupported("the model does not reason before answering", "none")
    verbosity: _unsupported("it has no verbosity setting", "medium")
    web_search_options: _unsupported("it does not search the web")
    moderation: _unsupported("it runs no moderation")
    service_tier: _unsupported("it has one service tier", "auto", "default")
    store: _unsupported("it stores no completions", False)
    prompt_cache_retention: _unsupported("its prefix cache keeps entries in memory only", "in_memory")
    prompt_cache_options: _unsupported("its prefix cache takes no options", {}, {"mode": "implicit"})


def create_app(model, tokenizer, model_name: str, max_tokens_cap: int | None = None,
               max_batch_size: int = 8, api_key: str | None = None, max_prompts: int = 64,
               max_queued_tokens: int | None = None, continuous: bool = True,
               prefix_cache_gb: float = 0.0) -> FastAPI:
    """The app for one model. `max_tokens_cap` bounds max_tokens (default: the model's context);
    `api_key`, if given, must come with every request but /health as `Authorization: Bearer KEY`;
    `max_prompts` bounds the prompts of one completion request, `max_queued_tokens` (default: four
    full batches of the whole context) the work queued at once; `continuous=False` batches statically;
    `prefix_cache_gb` keeps served sequences' state for prompts that repeat them (0: off)."""
    context = model.config.max_position_embeddings
    cap = max_tokens_cap or context
    max_queued_tokens = max_queued_tokens or 4 * max_batch_size * context
    metrics = Metrics()
    metrics.counter("http_requests_total", "HTTP requests answered, by route and status")
    prefix_cache = PrefixCache.from_gb(prefix_cache_gb, (tokenizer.eod_id,))
    if prefix_cache is not None:
        for name, help in (("hits", "prompts that started from a cached prefix"),
                           ("lookups", "prompts looked up in the prefix cache"),
                           ("tokens_reused", "prompt tokens taken from the prefix cache instead of prefilled"),
                           ("bytes", "bytes the prefix cache holds"), ("entries", "sequences the prefix cache holds")):
            metrics.gauge(f"prefix_cache_{name}", help, lambda name=name: prefix_cache.stats()[name])
    scheduler = Scheduler(model, tokenizer, max_batch_size=max_batch_size, continuous=continuous,
                          max_queued_tokens=max_queued_tokens, metrics=metrics, prefix_cache=prefix_cache)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="yuanmoe", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return _error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(GenerationError)
    async def _generation_error(_req, exc: GenerationError):
        return _error_response(500, str(exc))

    @app.exception_handler(ServerBusy)
    async def _busy(_req, exc: ServerBusy):
        return _error_response(429, str(exc), code="server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(HTTPException)
    async def _http_error(req: HTTPRequest, exc: HTTPException):
        if exc.status_code == 404:
            message = f"there is no {req.url.path}; this server answers {', '.join(ROUTES)}"
        elif exc.status_code == 405:
            message = f"{req.url.path} does not take {req.method} requests"
        else:  # FastAPI's own, e.g. a body that is not UTF-8
            message = f"{exc.detail}; send a UTF-8 JSON object"
        return _error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def _authorize_and_count(req: HTTPRequest, call_next):
        given = req.headers.get("authorization", "")
        if api_key is not None and req.url.path != "/health" and not hmac.compare_digest(
                given.encode("utf-8", "replace"), f"Bearer {api_key}".encode()):
            response = _error_response(401, "missing or wrong API key: send the header Authorization: Bearer KEY "
                                            "with the key the server was started with", code="invalid_api_key")
        else:
            response = await call_next(req)
        route = req.url.path if req.url.path in ROUTES else "other"
        metrics.inc("http_requests_total", route=route, status=response.status_code)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(req: HTTPRequest, exc: RequestValidationError):
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return _error_response(400, "the request body is not valid JSON; send a JSON object",
                                   code="invalid_json")
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") in ("out_of_range", "unsupported"):  # messages written to follow the field's name
            message = f"{where} {err['msg']}"
        elif err.get("type") == "extra_forbidden":
            message = f"{where} is not a field of a {req.url.path} request; leave it out"
        else:
            message = f"{where or 'body'}: {err.get('msg', 'invalid value')}"
        return _error_response(400, message, param=where or None)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "finished_requests": dict(scheduler.finished),
                "batch_sizes": dict(scheduler.batch_sizes)}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "yuanmoe"}]}

    def build_requests(body: _Sampling, prompts: list[str | list[int]], chat: bool, max_tokens: int | None,
                       max_tokens_param: str = "max_tokens") -> list[Request]:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"{max_tokens_param} is {max_tokens} but this server allows at most {cap}; "
                                f"send an integer from 1 to {cap}", param=max_tokens_param)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream true; leave it out or send stream: true",
                           param="stream_options")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        param = "messages" if chat else "prompt"
        requests = []
        for text in prompts:
            if isinstance(text, str):
                _check_text(text, param)
                ids = tokenizer.encode(text)
            else:  # token ids already
                try:
                    check_token_ids(text, model.config.vocab_size)
                except ValueError as exc:
                    raise APIError(400, f"prompt: {exc}", param=param) from None
                ids = text
            try:
                check_prompt_length(len(ids), context)
            except ValueError as exc:
                raise APIError(400, str(exc), param=param, code="context_length_exceeded" if ids else None) from None
            for j in range(body.n):
                params = SamplingParams(
                    max_new_tokens=min(max_tokens or cap, cap), temperature=body.temperature,
                    top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                    frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                    seed=None if body.seed is None else body.seed + j, stop=stop)
                requests.append(Request(ids, params, chat=chat))
        work = sum(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        if work > max_queued_tokens:
            raise APIError(400, f"this request needs up to {work} tokens of work (prompts and answers of every "
                                f"choice) but this server takes at most {max_queued_tokens} at a time; send fewer "
                                f"prompts, a smaller n or a smaller max_tokens", param=param)
        return requests

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        # One prompt is a string or a list of token ids; a list of either is several.
        one = isinstance(body.prompt, str) or (bool(body.prompt) and isinstance(body.prompt[0], int))
        prompts = [body.prompt] if one else body.prompt
        if not prompts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        if len(prompts) > max_prompts:
            raise APIError(400, f"prompt: {len(prompts)} prompts in one request, but this server takes at most "
                                f"{max_prompts}; split them over several requests", param="prompt")
        requests = await run_in_threadpool(build_requests, body, prompts, False, body.max_tokens or min(16, cap))
        return await respond(body, requests, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens differ; send max_completion_tokens alone",
                           param="max_tokens")
        try:
            prompt = format_chat([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                  for m in body.messages])
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        given = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        requests = await run_in_threadpool(build_requests, body, [prompt], True,
                                           body.max_completion_tokens or body.max_tokens, given)
        return await respond(body, requests, http, chat=True)

    async def respond(body: _Sampling, requests: list[Request], http: HTTPRequest, chat: bool):
        reply_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        events = scheduler.submit(requests)  # ServerBusy (429) here, before any byte of a stream is sent
        if body.stream:
            include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
            return StreamingResponse(stream_events(events, requests, reply_id, created, chat, include_usage),
                                     media_type="text/event-stream")
        async for _ in _watch(events, http):
            pass
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "finish_reason": r.finish_reason} for i, r in enumerate(requests)]
        else:
            choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                       for i, r in enumerate(requests)]
        return {"id": reply_id, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model_name, "choices": choices, "usage": usage(requests)}

    async def stream_events(events, requests: list[Request], reply_id: str, created: int, chat: bool,
                            include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **extra) -> str:
            data = {"id": reply_id, "object": kind, "created": created, "model": model_name,
                    "choices": choices, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def choice(index: int, text: str | None, finish_reason: str | None) -> dict:
            if not chat:
                return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": finish_reason}

        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(len(requests))])
        try:
            async for index, event in events:
                if event.text:
                    yield chunk([choice(index, event.text, None)])
                if event.finished:
                    yield chunk([choice(index, None, requests[index].finish_reason)])
        except GenerationError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
            return
        if include_usage:
            yield chunk([], usage=usage(requests))
        yield "data: [DONE]\n\n"

    def usage(requests: list[Request]) -> dict:
        # The n choices of one prompt share its ids: count each prompt once, as OpenAI does.
        prompt_tokens = sum({id(r.prompt_ids): len(r.prompt_ids) for r in requests}.values())
        completion_tokens = sum(len(r.output_ids) for r in requests)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    return app


async def _watch(events, http: HTTPRequest):
    """Pass events through, stopping (and so cancelling the requests) if the client disconnects."""
    async for item in events:
        if await http.is_disconnected():
            return
        yield item
