"""The OpenAI-compatible HTTP API over an Engine (FastAPI): GET /v1/models, POST /v1/completions
and /v1/chat/completions (streamed as server-sent events with `stream=true`), GET /health.

Errors come in OpenAI's envelope, {"error": {"message", "type", "param", "code"}}: 400 for bad
fields, 401 for a wrong API key, 404 for an unknown model, 429 when the queue is full, 500 when
the engine fails, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import random
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from decoderjax.data import chat_template
from decoderjax.inference.engine import SETTINGS, Engine
from decoderjax.inference.engine import Request as EngineRequest


class APIError(Exception):
  """An error the client caused (or a full queue), answered in OpenAI's envelope."""

  def __init__(self, status: int, message: str, param: str | None = None, kind=None, code=None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param
    self.kind = kind or {401: "authentication_error", 429: "rate_limit_error"}.get(
      status, "server_error" if status >= 500 else "invalid_request_error"
    )
    self.code = code

  def response(self) -> JSONResponse:
    body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
    return JSONResponse({"error": body}, status_code=self.status)


class _Body(BaseModel):
  """Fields both endpoints take; an unknown field is a 400."""

  model_config = ConfigDict(extra="forbid")

  model: str
  temperature: float | None = Field(None, ge=0)
  top_p: float | None = Field(None, gt=0, le=1)
  top_k: int | None = Field(None, ge=-1)  # -1 or 0: no limit
  min_p: float | None = Field(None, ge=0, lt=1)
  repetition_penalty: float | None = Field(None, gt=0)
  frequency_penalty: float | None = Field(None, ge=-2, le=2)
  presence_penalty: float | None = Field(None, ge=-2, le=2)
  n: int = Field(1, ge=1, le=16)
  stream: bool = False
  stream_options: dict | None = None
  stop: str | list[str] | None = None
  seed: int | None = None
  ignore_eos: bool = False  # vLLM's extra field: run to max_tokens (benchmarks)

  def settings(self, generation: dict) -> dict:
    """Sampling settings: the request's, else the model directory's generation.json."""
    values = {}
    for key in SETTINGS:
      value = getattr(self, key)
      value = generation.get(key) if value is None else value
      if value is not None:
        values[key] = max(value, 0) if key == "top_k" else value
    return values

  def stops(self) -> tuple[str, ...]:
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stops) > 4:
      raise APIError(400, "at most 4 stop sequences", "stop")
    return tuple(s for s in stops if s)

  def include_usage(self) -> bool:
    unknown = set(self.stream_options or {}) - {"include_usage"}
    if unknown:
      raise APIError(400, f"unknown stream_options {sorted(unknown)}", "stream_options")
    return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Body):
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = Field(16, ge=0)
  logprobs: int | None = Field(None, ge=0, le=5)
  echo: bool = False


class TextPart(BaseModel):
  model_config = ConfigDict(extra="forbid")
  type: Literal["text"]
  text: str


class Message(BaseModel):
  model_config = ConfigDict(extra="forbid")
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[TextPart]

  def text(self) -> str:
    return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=5)


class _Call:
  """One HTTP request's choices in the engine: their events, merged into one asyncio queue."""

  def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
    self.engine, self.loop, self.events = engine, loop, asyncio.Queue()
    self.requests: list[EngineRequest] = []

  def emitter(self, index: int):
    return lambda event: self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

  def submit(self, requests: list[EngineRequest]) -> None:
    for r in requests:
      try:
        self.engine.check(r)
      except ValueError as e:
        raise APIError(400, str(e), "max_tokens" if "max_tokens" in str(e) else "prompt") from None
    for r in requests:
      try:
        self.engine.submit(r)
      except queue.Full:
        self.cancel()
        raise APIError(429, "the server's request queue is full; retry later") from None
      self.requests.append(r)

  def cancel(self) -> None:
    for r in self.requests:
      r.cancel()

  async def gather(self) -> list[list[dict]]:
    """Every choice's events, to its finish."""
    out, left = [[] for _ in self.requests], len(self.requests)
    while left:
      index, event = await self.events.get()
      out[index].append(event)
      left -= "finish_reason" in event
    return out


def _sse(data) -> str:
  return f"data: {json.dumps(data)}\n\n"


def _stream_error(reason: str) -> str:
  message = "the server shut down" if reason == "cancelled" else "the engine failed (see its log)"
  return _sse({"error": {"message": message, "type": "server_error"}})


class Server:
  """The API over one engine serving one model under `name`."""

  def __init__(self, engine: Engine, name: str, api_key: str | None = None):
    self.engine, self.name, self.api_key = engine, name, api_key
    self.tok, self.generation = engine.model.tokenizer, engine.model.generation
    self.stop_ids = tuple(
      self.generation.get("stop_ids") or [self.tok.eos_id] * (self.tok.eos_id is not None)
    )
    self.accepting = True

  def check(self, request: Request, model: str | None = None) -> None:
    if not self.accepting:
      raise APIError(503, "the server is shutting down")
    if self.api_key is not None:
      header = request.headers.get("authorization", "")
      if header != f"Bearer {self.api_key}":
        raise APIError(401, "invalid API key (Authorization: Bearer KEY)", code="invalid_api_key")
    if model is not None and model != self.name:
      raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.name}`",
                     "model", code="model_not_found")  # fmt: skip

  def requests(self, call: _Call, prompts, body: _Body, max_tokens: int, **kw):
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    settings, stops = body.settings(self.generation), body.stops()
    return [
      EngineRequest(
        prompt,
        max_tokens,
        call.emitter(i * body.n + j),
        settings,
        seed + j,
        self.stop_ids,
        stops,
        **kw,
      )  # fmt: skip
      for i, prompt in enumerate(prompts)
      for j in range(body.n)
    ]

  def encode_prompts(self, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
      prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
      prompt = [prompt]
    if not prompt:
      raise APIError(400, "empty prompt", "prompt")
    try:
      return [p if isinstance(p, list) else self.tok.encode(p) for p in prompt]
    except ValueError as e:
      raise APIError(400, str(e), "prompt") from None

  def completion_requests(self, call: _Call, body: CompletionBody):
    prompts = self.encode_prompts(body.prompt)
    scoring = body.echo and body.logprobs is not None
    if body.max_tokens == 0 and not body.echo:
      raise APIError(400, "max_tokens=0 needs echo=true (it scores the prompt)", "max_tokens")
    logprobs = body.logprobs is not None
    return prompts, self.requests(
      call, prompts, body, body.max_tokens, logprobs=logprobs, prompt_logprobs=scoring
    )

  def chat_requests(self, call: _Call, body: ChatBody):
    template = self.generation.get("chat_template")
    if not template:
      raise APIError(400, "this model has no chat template (generation.json); use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
      prompt = self.tok.encode(chat_template.render_chat(template, messages, self.tok))
    except ValueError as e:
      raise APIError(400, str(e), "messages") from None
    room = self.engine.max_len - len(prompt)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
    return [prompt], self.requests(call, [prompt], body, max_tokens, logprobs=body.logprobs)


class _Logprobs:
  """A choice's logprobs in the completions API's layout."""

  def __init__(self, tok, k: int):
    self.tok, self.k, self.offset = tok, k, 0
    self.value = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

  def add(self, token: int, logprob: float | None, top) -> dict:
    text = self.tok.decode([token])
    tops = None if logprob is None else {self.tok.decode([i]): lp for i, lp in top[: self.k]}
    entry = {"tokens": text, "token_logprobs": logprob, "top_logprobs": tops,
             "text_offset": self.offset}  # fmt: skip
    for key, item in entry.items():
      self.value[key].append(item)
    self.offset += len(text)
    return {key: [item] for key, item in entry.items()}


def _chat_logprob(tok, token: int, logprob: float, top, k: int) -> dict:
  def one(i, lp):
    text = tok.decode([i])
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

  return {**one(token, logprob), "top_logprobs": [one(i, lp) for i, lp in top[:k]]}


def _usage(prompts, events) -> dict:
  prompt = sum(len(p) for p in prompts)
  completion = sum(e[-1]["completion_tokens"] for e in events)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}  # fmt: skip


def _finished(events) -> None:
  reasons = {e[-1]["finish_reason"] for e in events}
  if "error" in reasons:
    raise APIError(500, "the engine failed while running the request (see the server's log)")
  if "cancelled" in reasons:
    raise APIError(503, "the server shut down before the request finished")


def completion_response(server: Server, body: CompletionBody, prompts, events) -> dict:
  _finished(events)
  choices = []
  for index, choice in enumerate(events):
    prompt = prompts[index // body.n]
    text = "".join(e.get("text", "") for e in choice if "prompt_logprobs" not in e)
    logprobs = None
    if body.logprobs is not None:
      lp = _Logprobs(server.tok, body.logprobs)
      for e in choice:
        for token, logprob, top in e.get("prompt_logprobs", []):
          lp.add(token, logprob, top)
        if "token" in e:
          lp.add(e["token"], e["logprob"], e["top"])
      logprobs = lp.value
    echo = server.tok.decode(prompt) if body.echo else ""
    choices.append({"index": index, "text": echo + text, "logprobs": logprobs,
                    "finish_reason": choice[-1]["finish_reason"]})  # fmt: skip
  return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
          "created": int(time.time()), "model": server.name, "choices": choices,
          "usage": _usage(prompts, events)}  # fmt: skip


def chat_response(server: Server, body: ChatBody, prompts, events) -> dict:
  _finished(events)
  choices = []
  for index, choice in enumerate(events):
    text = "".join(e.get("text", "") for e in choice)
    logprobs = None
    if body.logprobs:
      k = body.top_logprobs or 0
      content = [_chat_logprob(server.tok, e["token"], e["logprob"], e["top"], k)
                 for e in choice if "token" in e]  # fmt: skip
      logprobs = {"content": content}
    message = {"role": "assistant", "content": text}
    choices.append({"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": choice[-1]["finish_reason"]})  # fmt: skip
  return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
          "created": int(time.time()), "model": server.name, "choices": choices,
          "usage": _usage(prompts, events)}  # fmt: skip


async def completion_stream(server: Server, body: CompletionBody, prompts, call: _Call):
  """Server-sent events: per choice, the echoed prompt, each token's text, the finish."""
  base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
          "created": int(time.time()), "model": server.name}  # fmt: skip
  logprobs = [_Logprobs(server.tok, body.logprobs or 0) for _ in call.requests]
  done = [None] * len(call.requests)

  def chunk(index, text, lp=None, finish=None):
    choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
    return _sse({**base, "choices": [choice]})

  try:
    if body.echo and body.logprobs is None:
      for index in range(len(call.requests)):
        yield chunk(index, server.tok.decode(prompts[index // body.n]))
    while None in done:
      index, event = await call.events.get()
      if "prompt_logprobs" in event:
        entries = [logprobs[index].add(*e) for e in event["prompt_logprobs"]]
        merged = {k: [x for e in entries for x in e[k]] for k in entries[0]}
        yield chunk(index, server.tok.decode(prompts[index // body.n]), merged)
      elif "token" in event:
        lp = None
        if body.logprobs is not None:
          lp = logprobs[index].add(event["token"], event["logprob"], event["top"])
        yield chunk(index, event["text"], lp)
      if "finish_reason" in event:
        done[index] = event
        if event["finish_reason"] in ("cancelled", "error"):
          yield _stream_error(event["finish_reason"])
          return
        yield chunk(index, event["text"], finish=event["finish_reason"])
    if body.include_usage():
      yield _sse({**base, "choices": [], "usage": _usage(prompts, [[e] for e in done])})
    yield "data: [DONE]\n\n"
  finally:
    call.cancel()  # a client gone mid-stream frees its slots


async def chat_stream(server: Server, body: ChatBody, prompts, call: _Call):
  base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
          "created": int(time.time()), "model": server.name}  # fmt: skip
  done = [None] * len(call.requests)

  def chunk(index, delta, lp=None, finish=None):
    choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
    return _sse({**base, "choices": [choice]})

  try:
    for index in range(len(call.requests)):
      yield chunk(index, {"role": "assistant", "content": ""})
    while None in done:
      index, event = await call.events.get()
      if "token" in event:
        lp = None
        if body.logprobs:
          k = body.top_logprobs or 0
          lp = {"content": [_chat_logprob(server.tok, event["token"], event["logprob"],
                                          event["top"], k)]}  # fmt: skip
        yield chunk(index, {"content": event["text"]}, lp)
      if "finish_reason" in event:
        done[index] = event
        if event["finish_reason"] in ("cancelled", "error"):
          yield _stream_error(event["finish_reason"])
          return
        if event["text"]:
          yield chunk(index, {"content": event["text"]})
        yield chunk(index, {}, finish=event["finish_reason"])
    if body.include_usage():
      yield _sse({**base, "choices": [], "usage": _usage(prompts, [[e] for e in done])})
    yield "data: [DONE]\n\n"
  finally:
    call.cancel()


def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
  first = exc.errors()[0]
  loc = [str(x) for x in first.get("loc", ()) if x != "body"]
  param = ".".join(loc) or None
  message = f"{param}: {first['msg']}" if param else first["msg"]
  return APIError(400, message, param).response()


def create_app(server: Server) -> FastAPI:
  """The ASGI app; its lifespan runs the engine loop in a thread."""
  stop = threading.Event()
  thread = threading.Thread(target=server.engine.run, args=(stop,), daemon=True)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    thread.start()
    yield
    server.accepting = False
    stop.set()
    thread.join()

  app = FastAPI(title="decoderjax", lifespan=lifespan)
  app.add_exception_handler(APIError, lambda request, e: e.response())
  app.add_exception_handler(RequestValidationError, _validation_error)

  @app.get("/health")
  async def health():
    e = server.engine
    return {"status": "ok", "slots": e.slots, "active": len(e.live), "queued": e.pending.qsize()}

  @app.get("/v1/models")
  async def models(request: Request):
    server.check(request)
    model = {"id": server.name, "object": "model", "created": 0, "owned_by": "decoderjax",
             "max_model_len": server.engine.max_len}  # fmt: skip
    return {"object": "list", "data": [model]}

  async def serve(request, body, make_requests, respond, stream):
    server.check(request, body.model)
    body.include_usage()
    call = _Call(server.engine, asyncio.get_running_loop())
    prompts, requests = make_requests(call, body)
    call.submit(requests)
    if body.stream:
      return StreamingResponse(stream(server, body, prompts, call), media_type="text/event-stream")
    try:
      events = await call.gather()
    finally:
      call.cancel()
    return respond(server, body, prompts, events)

  @app.post("/v1/completions")
  async def completions(body: CompletionBody, request: Request):
    return await serve(request, body, server.completion_requests, completion_response,
                       completion_stream)  # fmt: skip

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatBody, request: Request):
    return await serve(request, body, server.chat_requests, chat_response, chat_stream)

  return app
