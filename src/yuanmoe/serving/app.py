"""An OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics (Prometheus text).

Errors come back in the OpenAI shape, {"error": {"message", "type", "param", "code"}}, with a 4xx
status for anything the client can fix (unknown routes and methods included), 401 without the API
key when one is set, and 429 with Retry-After when the queue is full. Streams are server-sent events
ending in `data: [DONE]`. Tokenizing runs in a thread pool, never on the event loop.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..inference.chat import format_chat
from ..inference.engine import Request
from ..inference.generate import check_prompt_length
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


class _Sampling(BaseModel):
    # No NaN or Infinity (Python's JSON reader accepts them): every number must be one the sampler can use.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not in the OpenAI API; vLLM and others accept it too
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]  # newer clients may send a list of parts; only text parts are supported

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise APIError(400, "messages: only text content is supported (parts of type 'text')",
                           param="messages")
        return "".join(part["text"] for part in self.content)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


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
    async def _validation_error(_req, exc: RequestValidationError):
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return _error_response(400, "the request body is not valid JSON; send a JSON object",
                                   code="invalid_json")
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        return _error_response(400, f"{where or 'body'}: {err.get('msg', 'invalid value')}", param=where or None)

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

    def build_requests(body: _Sampling, prompts: list[str], chat: bool,
                       max_tokens: int | None) -> list[Request]:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens is {max_tokens} but this server allows at most {cap}",
                           param="max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        param = "messages" if chat else "prompt"
        requests = []
        for text in prompts:
            _check_text(text, param)
            ids = tokenizer.encode(text)
            try:
                check_prompt_length(len(ids), context)
            except ValueError as exc:
                raise APIError(400, str(exc), param=param, code="context_length_exceeded" if ids else None) from None
            for j in range(body.n):
                params = SamplingParams(
                    max_new_tokens=min(max_tokens or cap, cap), temperature=body.temperature,
                    top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty,
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
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        if len(prompts) > max_prompts:
            raise APIError(400, f"prompt: {len(prompts)} prompts in one request, but this server takes at most "
                                f"{max_prompts}; split them over several requests", param="prompt")
        requests = await run_in_threadpool(build_requests, body, prompts, False, body.max_tokens or min(16, cap))
        return await respond(body, requests, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        try:
            prompt = format_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        requests = await run_in_threadpool(build_requests, body, [prompt], True,
                                           body.max_completion_tokens or body.max_tokens)
        return await respond(body, requests, http, chat=True)

    async def respond(body: _Sampling, requests: list[Request], http: HTTPRequest, chat: bool):
        reply_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        events = scheduler.submit(requests)  # ServerBusy (429) here, before any byte of a stream is sent
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
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
