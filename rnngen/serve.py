"""`rnngen serve`: an HTTP server for loaded models (an ASGI app for uvicorn; needs rnngen[serve]).

``create_app(models, settings)`` builds the Starlette app; the CLI (cli_serve.py) runs it. Each model has an
``Engine``: the streams generating from it at a moment step together as one batch (continuous batching), one
recurrent step for all of them per token, in a worker thread of its own so that the event loop stays free.
Requests join at the next step; finished, stopped and cancelled streams leave.

The OpenAI-compatible endpoints (/v1/completions, /v1/chat/completions, /v1/models) take rnngen's extras as
further fields (top_k, label, guidance, state, return_state); /v1/rnngen/... holds what that API lacks:
classify, score (surprisal), chat sessions kept on the server. A recurrent state can leave the server as an
opaque token (``StateCodec``): HMAC-protected and checked through before it is used again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .chat import DEFAULT_STOP, ChatSession, Notice, Problem, Turn
from .config import SampleConfig
from .errors import RnngenError
from .generate import Cursor, TextStream, guided_logits, pick_tokens, random_stream
from .loaded import LoadedModel
from .model import State

PAGE = Path(__file__).with_name("serve_page.html")
MAX_STOPS = 16  # stop strings per request
MAX_N = 16  # choices per request
PROMPT_CHUNK = 256  # tokens of a prompt read per call in an engine's worker (the batch steps between two)


@dataclass(frozen=True)
class Settings:
    """What the server allows: limits, access and defaults (the CLI's options)."""

    api_key: str | None = None
    secret: bytes = b""  # for state tokens; random per process when empty
    cors_origins: tuple[str, ...] = ()
    max_streams: int = 64  # streams stepping at once, per model
    max_queue: int = 64  # streams waiting for a place, per model; beyond it: 503
    max_tokens: int = 4096  # per request (per choice)
    default_tokens: int = 256  # when a request does not say
    max_request_bytes: int = 1_000_000
    # Seconds a request may take, from its arrival: a generation then ends with finish_reason
    # "time_limit"; a prompt, classification or score still being read then is a 408 (TimeLimit).
    timeout: float = 300.0
    session_ttl: float = 1800.0  # seconds a chat session is kept after its last use
    max_sessions: int = 1000
    user_prefix: dict[str, str] = field(default_factory=dict)  # per model name ("" key: every model)
    bot_prefix: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    KINDS: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                                       408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
                                       503: "server_overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = self.KINDS.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, self.status, headers=self.headers)


# --------------------------------------------------------------------------------------------- state tokens
class StateCodec:
    """A model's recurrent state (and next-token logits) as an opaque, integrity-protected token.

    Layout, base64url without padding: b"rnns1", header length (uint32 LE), a JSON header (checkpoint
    identity, shapes, dtype), the tensors as float32 little-endian, then HMAC-SHA256 over all of it. A token
    is checked in this order: size, HMAC (constant-time), identity, shapes, dtype, length, finiteness.
    """

    MAGIC = b"rnns1"

    def __init__(self, secret: bytes, identity: str, shapes: list[tuple[int, ...]], device: torch.device) -> None:
        self.secret, self.identity, self.shapes, self.device = secret, identity, shapes, device
        self.floats = sum(math.prod(s) for s in shapes)
        self.max_chars = (self.floats * 4 + 1024) * 4 // 3 + 64  # what a genuine token can be, with room

    def encode(self, cursor: Cursor) -> str:
        tensors = [*cursor.state, cursor.logits]  # type: ignore[misc]
        header = json.dumps({"id": self.identity, "dtype": "<f4", "shapes": [list(t.shape) for t in tensors]})
        body = b"".join(t.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes() for t in tensors)
        payload = self.MAGIC + struct.pack("<I", len(header)) + header.encode() + body
        mac = hmac.new(self.secret, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode("ascii")

    def decode(self, token: Any) -> Cursor:
        """The cursor a token holds; any problem with it is a 400 (ApiError), never anything else."""
        def bad(why: str) -> ApiError:
            return ApiError(400, f"invalid state: {why}", param="state", code="invalid_state")

        if not isinstance(token, str) or not token:
            raise bad("expected the string a previous response returned")
        if len(token) > self.max_chars:
            raise bad("too large for this model")
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise bad("not base64url") from None
        payload, mac = raw[:-32], raw[-32:]
        if len(raw) < 32 + len(self.MAGIC) + 4 or not hmac.compare_digest(
                mac, hmac.new(self.secret, payload, hashlib.sha256).digest()):
            raise bad("it was altered, or issued by a server with another secret")
        try:
            if payload[:5] != self.MAGIC:
                raise ValueError("magic")
            (size,) = struct.unpack_from("<I", payload, 5)
            header = json.loads(payload[9:9 + size])
            body = payload[9 + size:]
            shapes = [tuple(int(d) for d in s) for s in header["shapes"]]
        except (ValueError, KeyError, TypeError, struct.error):
            raise bad("malformed") from None
        if header.get("id") != self.identity:
            raise bad("it belongs to another checkpoint")
        if shapes != self.shapes:
            raise bad(f"shapes {shapes} do not match this model's {self.shapes}")
        if header.get("dtype") != "<f4" or len(body) != self.floats * 4:
            raise bad("wrong data type or length")
        values = np.frombuffer(body, dtype="<f4")
        if not np.isfinite(values).all():
            raise bad("it holds values that are not finite")
        tensors, at = [], 0
        for shape in shapes:
            n = math.prod(shape)
            tensors.append(torch.from_numpy(values[at:at + n].astype(np.float32).reshape(shape)).to(self.device))
            at += n
        return Cursor(tuple(tensors[:-1]), tensors[-1])


def checkpoint_identity(directory: Path) -> str:
    """sha256 of the checkpoint's config and weights: a state token is good for exactly these."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- continuous batching
@dataclass
class Stream:
    """One text being generated: its cursor (advanced in place), settings, random stream and output."""

    cursor: Cursor
    config: SampleConfig  # stop strings and sampling; ``length`` is the token limit
    generator: torch.Generator
    out: asyncio.Queue  # (index, text piece, finish reason or None)
    index: int = 0
    deadline: float = math.inf
    on_finish: Callable[[Stream], None] | None = None  # called on the event loop once it has ended, however
    text: TextStream | None = None
    tokens: int = 0
    raw: list[str] = field(default_factory=list)  # everything decoded, stop strings included
    shown: list[str] = field(default_factory=list)  # the pieces sent (the text without stop strings)
    finish: str | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Busy(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, message, code="overloaded", headers={"Retry-After": "1"})


class TimeLimit(ApiError):
    """A request's model work went past the server's time limit (``Settings.timeout``) before any text came."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request took longer than the server's time limit of {seconds:g} s "
                              "(rnngen serve --timeout); send less text", code="time_limit")


class Metrics:
    """Counters for /metrics (Prometheus text format)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens: dict[str, int] = {}
        self.steps: dict[str, int] = {}
        self.step_seconds: dict[str, float] = {}

    def render(self, engines: dict[str, Engine]) -> str:
        lines = ["# HELP rnngen_requests_total HTTP requests answered, by path and status.",
                 "# TYPE rnngen_requests_total counter"]
        lines += [f'rnngen_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
        for name, help_, kind, values in (
                ("rnngen_tokens_generated_total", "Tokens generated.", "counter", self.tokens),
                ("rnngen_model_steps_total", "Batched recurrent steps taken (one per token for all streams).",
                 "counter", self.steps),
                ("rnngen_active_streams", "Streams stepping now.", "gauge",
                 {m: len(e.active) for m, e in engines.items()}),
                ("rnngen_queue_length", "Streams waiting for a place.", "gauge",
                 {m: len(e.waiting) for m, e in engines.items()}),
                ("rnngen_step_seconds_sum", "Time spent in batched steps.", "counter", self.step_seconds),
                ("rnngen_step_seconds_count", "Batched steps timed.", "counter", self.steps)):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{model="{m}"}} {values.get(m, 0)}' for m in engines]
        return "\n".join(lines) + "\n"

    def count(self, model: str, tokens: int, seconds: float) -> None:
        """One batched step of ``tokens`` streams that took ``seconds``."""
        self.steps[model] = self.steps.get(model, 0) + 1
        self.step_seconds[model] = self.step_seconds.get(model, 0.0) + seconds
        self.tokens[model] = self.tokens.get(model, 0) + tokens


class Engine:
    """A model's scheduler: the streams that are generating step together, one batch per token.

    All model work (prompts, steps, classification, scoring) runs in the engine's one worker thread, in the
    order it is asked for; the event loop only moves text and bookkeeping. A prompt is read in chunks of
    PROMPT_CHUNK tokens, each its own turn in the worker, so the batch steps between two chunks.
    """

    def __init__(self, name: str, gen: LoadedModel, settings: Settings, metrics: Metrics) -> None:
        self.name, self.gen, self.settings, self.metrics = name, gen, settings, metrics
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"rnngen-{name}")
        self.active: list[Stream] = []
        self.waiting: deque[Stream] = deque()
        self.held = 0  # places taken: streams active or waiting, and requests reading their prompt
        self.closing = False
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        state = gen.model.encoder.initial_state(1, gen.device)
        self.codec = StateCodec(settings.secret, checkpoint_identity(gen.directory),
                                [tuple(s.shape) for s in state] + [(1, gen.model.config.vocab_size)], gen.device)

    def start(self) -> None:
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"rnngen-engine-{self.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, fn: Callable[..., Any], *args: Any, deadline: float = math.inf) -> Any:
        """``fn(*args)`` in the worker thread (between two batch steps); past ``deadline`` it stops at its next
        model call with TimeLimit. An RnngenError (the input's fault) is a 400."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._until, deadline, fn, *args)
        except RnngenError as exc:
            raise ApiError(400, str(exc)) from None

    def _until(self, deadline: float, fn: Callable[..., Any], *args: Any) -> Any:
        if deadline == math.inf:
            return fn(*args)

        def check(module: torch.nn.Module, inputs: Any) -> None:
            if time.monotonic() > deadline:
                raise TimeLimit(self.settings.timeout)

        # Classification and scoring live in other modules, which know nothing of time limits; every model
        # call (LM, classifier, prompt) starts with the embedding, so a hook there stops them between two calls.
        hook = self.gen.model.encoder.embedding.register_forward_pre_hook(check)
        try:
            return fn(*args)
        finally:
            hook.remove()

    async def read(self, ids: list[int], state: State | None, deadline: float) -> Cursor:
        """The cursor after reading ``ids`` (at least one) from ``state``, PROMPT_CHUNK tokens per call in the
        worker: the batch steps between two calls, so a long prompt does not hold up the other streams."""
        for at in range(0, len(ids), PROMPT_CHUNK):
            cursor = await self.call(self.gen.feed, ids[at:at + PROMPT_CHUNK], state, deadline=deadline)
            state = cursor.state
        return cursor

    async def begin(self, text: str, label: str | None, guidance: float, deadline: float) -> tuple[Cursor, int]:
        """What ``Sampler.start`` returns, read with ``read``; and the number of tokens read."""
        ids, free_ids = await self.call(self.gen.start_ids, text, label, guidance)
        cursor = await self.read(ids, None, deadline)
        if free_ids is not None:
            cursor.free, cursor.guidance = await self.read(free_ids, None, deadline), guidance
        return cursor, len(ids)

    def reserve(self, count: int) -> None:
        """Take ``count`` places, or refuse with a 503 when the streams and the queue are full."""
        if self.closing:
            raise Busy("the server is shutting down")
        if self.held + count > self.settings.max_streams + self.settings.max_queue:
            raise Busy(f"model {self.name!r} is busy: {self.held} streams running or queued; retry shortly")
        self.held += count

    def release(self, count: int = 1) -> None:
        self.held -= count

    def submit(self, stream: Stream) -> None:
        """Queue a stream (its place reserved); it joins the batch at the next step."""
        stream.text = TextStream(self.gen.tokenizer, stream.config.stop)
        if stream.config.length == 0:
            self._send(stream, "", "length")
            return
        self.waiting.append(stream)
        assert self.wake is not None
        self.wake.set()

    def drain(self) -> None:
        """End every stream with finish_reason "shutdown" (after the step in progress) and accept no more."""
        self.closing = True
        if self.wake is not None:
            self.wake.set()

    def _send(self, stream: Stream, piece: str, reason: str | None = None) -> None:
        """Send a piece of ``stream``'s text; with a finish ``reason`` it ends, and its place is given back."""
        if stream.finish is not None:
            return
        if piece:
            stream.shown.append(piece)
        if reason is not None:
            stream.finish = reason
            self.release()
            if stream.on_finish is not None:
                stream.on_finish(stream)
        if piece or reason is not None:
            stream.out.put_nowait((stream.index, piece, reason))

    def _admit(self) -> None:
        """Between two steps: end the streams cancelled (or all, when closing), then fill the free places."""
        for stream in [*self.active, *self.waiting]:
            assert stream.text is not None
            if self.closing:
                self._send(stream, stream.text.finish(), "shutdown")
            elif stream.cancelled:
                self._send(stream, "", "cancelled")
        self.active = [s for s in self.active if s.finish is None]
        self.waiting = deque(s for s in self.waiting if s.finish is None)
        now = time.monotonic()
        while self.waiting and len(self.active) < self.settings.max_streams:
            stream = self.waiting.popleft()
            if now > stream.deadline:
                self._send(stream, "", "time_limit")
            else:
                self.active.append(stream)

    async def _run(self) -> None:
        assert self.wake is not None
        while True:
            self._admit()
            if not self.active:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = list(self.active)
            began = time.perf_counter()
            results = await self.call(self._step, batch)
            self.metrics.count(self.name, len(batch), time.perf_counter() - began)
            for stream, (piece, reason) in zip(batch, results):
                self._send(stream, piece, reason)

    @torch.inference_mode()
    def _step(self, batch: list[Stream]) -> list[tuple[str, str | None]]:
        """One token for every stream: each picks from its logits with its own settings and random stream
        (as ``Sampler.continue_from`` does, so a seed gives `rnngen sample`'s text), then one model call
        advances them all. A guided stream takes two rows: with and without its label."""
        picked, tokens, rows = [], [], []  # a token per stream; a token and a cursor per row
        for stream in batch:
            cursor = stream.cursor
            scores = cursor.logits if cursor.free is None else guided_logits(cursor.logits, cursor.free.logits,
                                                                             cursor.guidance)
            token = pick_tokens(scores, stream.config, stream.generator)
            picked.append(token)
            rows.append(cursor)
            tokens.append(token)
            if cursor.free is not None:
                rows.append(cursor.free)
                tokens.append(token)
        state = tuple(torch.cat([row.state[k] for row in rows], 1)  # type: ignore[index]
                      for k in range(len(rows[0].state)))  # type: ignore[arg-type]
        logits, state = self.gen.model_step(torch.cat(tokens), state)
        for i, row in enumerate(rows):
            row.state, row.logits = tuple(s[:, i:i + 1] for s in state), logits[i:i + 1]
        ids = torch.cat(picked).tolist()
        results: list[tuple[str, str | None]] = []
        now = time.monotonic()
        for stream, token in zip(batch, ids):
            text = stream.text
            assert text is not None
            stream.tokens += 1
            raw = text.decoder.feed(token)
            stream.raw.append(raw)
            piece, stopped = text.scanner.push(raw)
            reason = "stop" if stopped else "length" if stream.tokens >= stream.config.length else (
                "time_limit" if now > stream.deadline else None)
            if reason is not None and not stopped:
                piece += text.finish()
            results.append((piece, reason))
        return results


# --------------------------------------------------------------------------------------------- requests
def _field(body: dict[str, Any], key: str, kind: type[int | float], default: Any, low: float | None = None,
           high: float | None = None) -> Any:
    """The number ``body[key]`` (``default`` when absent or null), checked: an integer, or for a float field any
    number, within [low, high]."""
    value: Any = body.get(key, default)
    if value is None:
        return default
    whole = isinstance(value, int) and not isinstance(value, bool)  # a bool is an int in Python, not in JSON
    if not (whole or kind is float and isinstance(value, float)):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}", param=key)
    # Compared as they are: float() of a huge JSON integer overflows. A float field's range keeps it finite.
    if not ((whole or math.isfinite(value)) and (low is None or value >= low) and (high is None or value <= high)):
        raise ApiError(400, f"{key} must be in [{low}, {high}], got {value}", param=key)
    return float(value) if kind is float else value


def _stops(body: dict[str, Any], default: Sequence[str] = ()) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return tuple(default)
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= MAX_STOPS and all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop")
    return tuple(stops)


@dataclass
class Generation:
    """A parsed generation request: the sampling settings, the choices and the rnngen extras."""

    config: SampleConfig
    n: int
    stream: bool
    include_usage: bool
    label: str | None
    guidance: float
    state: Any
    return_state: bool


def parse_generation(body: dict[str, Any], settings: Settings, default_stop: Sequence[str] = ()) -> Generation:
    temperature = _field(body, "temperature", float, 0.8, 0.0, 100.0)
    top_p = _field(body, "top_p", float, None, 0.0, 1.0)
    top_k = _field(body, "top_k", int, None, 0)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    length = _field({"max_tokens": max_tokens}, "max_tokens", int, settings.default_tokens, 0, settings.max_tokens)
    label = body.get("label")
    if label is not None and not isinstance(label, str):
        raise ApiError(400, "label must be a string", param="label")
    try:
        config = SampleConfig.for_label(label, _stops(body, default_stop), temperature=max(temperature, 1e-6),
                                        top_k=top_k or None, top_p=None if top_p in (None, 1.0) else top_p or 1e-9,
                                        greedy=temperature == 0.0, length=length,
                                        seed=_field(body, "seed", int, None, -2**63, 2**63 - MAX_N))
    except RnngenError as exc:
        raise ApiError(400, str(exc)) from None
    options = body.get("stream_options") or {}
    return Generation(config, _field(body, "n", int, 1, 1, MAX_N), bool(body.get("stream", False)),
                      bool(isinstance(options, dict) and options.get("include_usage")), label,
                      _field(body, "guidance", float, 1.0, 0.0, 100.0), body.get("state"),
                      bool(body.get("return_state", False)))


def chat_text(messages: Any, user_prefix: str, bot_prefix: str, separator: str) -> str:
    """OpenAI chat messages as the text `rnngen chat` feeds (see ChatSession.format_input): system messages
    are context, each user line is "{user_prefix} {line}{separator}{bot_prefix}", each assistant reply is
    followed by the separator."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, "each message needs a role and a text content", param="messages")
        role = m.get("role")
        if role in ("system", "developer"):
            parts.append(content + separator)
        elif role == "user":
            space = "" if not user_prefix or user_prefix[-1].isspace() else " "
            line = f"{user_prefix}{space}{content}" if user_prefix else content
            parts.append(f"{line}{separator}{bot_prefix}" if bot_prefix else line)
        elif role == "assistant":
            parts.append(content + separator)
        else:
            raise ApiError(400, f"unknown message role {role!r}", param="messages")
    return "".join(parts)


@dataclass
class Session:
    """A chat session kept on the server: its model, the conversation, when it was last used, and the reply
    being generated (the session takes no other message meanwhile)."""

    engine: Engine
    chat: ChatSession
    used: float
    reply: Stream | None = None


class Server:
    """The app's state: the engines, chat sessions, metrics and settings; the handlers are its methods."""

    def __init__(self, models: dict[str, LoadedModel], settings: Settings) -> None:
        if not settings.secret:
            settings = replace(settings, secret=secrets.token_bytes(32))
        self.settings, self.metrics = settings, Metrics()
        self.engines = {name: Engine(name, gen, settings, self.metrics) for name, gen in models.items()}
        self.sessions: dict[str, Session] = {}
        self.created = int(time.time())

    # -- helpers -------------------------------------------------------------------------------------
    async def body(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request is larger than the server's limit of {limit} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"the request is larger than the server's limit of {limit} bytes")
        try:
            body = json.loads(bytes(data))
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def engine(self, body: dict[str, Any]) -> Engine:
        name = body.get("model")
        if name is None and len(self.engines) == 1:
            return next(iter(self.engines.values()))
        if not isinstance(name, str) or name not in self.engines:
            raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists: "
                                f"{', '.join(self.engines)}", param="model", code="model_not_found")
        return self.engines[name]

    def deadline(self) -> float:
        """When the model work of a request starting now must end (``Settings.timeout``)."""
        return time.monotonic() + self.settings.timeout

    def prefixes(self, engine: Engine, body: dict[str, Any]) -> tuple[str, str]:
        s = self.settings
        user = body.get("user_prefix", s.user_prefix.get(engine.name, s.user_prefix.get("", "")))
        bot = body.get("bot_prefix", s.bot_prefix.get(engine.name, s.bot_prefix.get("", "")))
        if not (isinstance(user, str) and isinstance(bot, str)):
            raise ApiError(400, "user_prefix and bot_prefix must be strings")
        return user, bot

    async def start_cursor(self, engine: Engine, text: str, g: Generation, deadline: float) -> tuple[Cursor, int]:
        """The cursor after ``text`` (from the returned state when there is one) and the tokens read."""
        if g.state is None:
            if g.return_state and g.guidance != 1.0:
                raise ApiError(400, "return_state is not available with guidance")
            return await engine.begin(text, g.label, g.guidance, deadline)
        if g.label is not None or g.guidance != 1.0:
            raise ApiError(400, "a state continues a text: label and guidance only apply to a new one")
        cursor = engine.codec.decode(g.state)
        ids = [int(i) for i in engine.gen.tokenizer.encode(text)]
        return (await engine.read(ids, cursor.state, deadline) if ids else cursor), len(ids)

    async def generate(self, engine: Engine, text: str, g: Generation) -> tuple[list[Stream], asyncio.Queue, int]:
        """Start ``g.n`` streams after ``text``; their pieces arrive on the returned queue."""
        deadline = self.deadline()
        engine.reserve(g.n)
        try:
            cursor, prompt_tokens = await self.start_cursor(engine, text, g, deadline)
        except BaseException:
            engine.release(g.n)
            raise
        out: asyncio.Queue = asyncio.Queue()
        seeds = [None if g.config.seed is None else g.config.seed + i for i in range(g.n)]  # choice i: seed + i
        streams = [Stream(cursor.copy() if g.n > 1 else cursor, g.config, random_stream(seed, engine.gen.device),
                          out, i, deadline) for i, seed in enumerate(seeds)]
        for stream in streams:
            engine.submit(stream)
        return streams, out, prompt_tokens

    # -- OpenAI-compatible endpoints ----------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card(name) for name in self.engines]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.engines:
            raise ApiError(404, f"model {name!r} is not served here", code="model_not_found")
        return JSONResponse(self.model_card(name))

    def model_card(self, name: str) -> dict[str, Any]:
        engine = self.engines[name]
        m, (user, bot) = engine.gen.model.config, self.prefixes(engine, {})
        return {"id": name, "object": "model", "created": self.created, "owned_by": "rnngen",
                "rnngen": {"arch": m.arch, "layers": m.layers, "hidden": m.hidden,
                           "tokenizer": engine.gen.tokenizer.kind, "labels": engine.gen.labels,
                           "classes": engine.gen.classes, "generates": not m.bidirectional,
                           "user_prefix": user, "bot_prefix": bot}}

    async def completions(self, request: Request) -> Response:
        body = await self.body(request)
        engine = self.engine(body)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
        g = parse_generation(body, self.settings)
        return await self.respond(request, engine, prompt, g, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await self.body(request)
        engine = self.engine(body)
        g = parse_generation(body, self.settings, DEFAULT_STOP)
        user, bot = self.prefixes(engine, body)
        text = chat_text(body.get("messages"), user, bot, g.config.stop[0] if g.config.stop else "\n")
        return await self.respond(request, engine, text, g, chat=True)

    async def respond(self, request: Request, engine: Engine, text: str, g: Generation, chat: bool) -> Response:
        streams, out, prompt_tokens = await self.generate(engine, text, g)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": engine.name}

        def usage() -> dict[str, int]:
            done = sum(s.tokens for s in streams)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        def choice(stream: Stream, text: str, reason: str | None) -> dict[str, Any]:
            """A choice: a stream's whole text, or a piece of it when streaming; with a reason, its end."""
            content: dict[str, Any]
            if not chat:
                content = {"text": text, "logprobs": None}
            elif not g.stream:
                content = {"message": {"role": "assistant", "content": text}, "logprobs": None}
            else:
                content = {"delta": {"content": text} if text else {}}
            if reason is not None and reason != "cancelled" and g.return_state:
                content["state"] = engine.codec.encode(stream.cursor)
            return {"index": stream.index, **content, "finish_reason": reason}

        if not g.stream:
            await _wait(request, streams, out)
            return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice(s, "".join(s.shown), s.finish) for s in streams],
                                 "usage": usage()})

        async def events() -> AsyncIterator[dict[str, Any]]:
            if chat:
                for s in streams:
                    yield {**base, "choices": [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]}
            async for index, piece, reason in _pieces(out, len(streams)):
                if piece:
                    yield {**base, "choices": [choice(streams[index], piece, None)]}
                if reason is not None:
                    yield {**base, "choices": [choice(streams[index], "", reason)]}
            if g.include_usage:
                yield {**base, "choices": [], "usage": usage()}

        return _event_stream(events(), streams)

    # -- native endpoints ----------------------------------------------------------------------------
    async def classify(self, request: Request) -> Response:
        deadline = self.deadline()
        body = await self.body(request)
        engine = self.engine(body)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            raise ApiError(400, "input must be a string or a non-empty list of strings", param="input")
        if not engine.gen.classes:
            raise ApiError(400, f"model {engine.name!r} has no classification head", param="model")
        top = _field(body, "top", int, None, 1)
        results = await engine.call(engine.gen.classify, texts, top, deadline=deadline)
        return JSONResponse({"model": engine.name, "results": results})

    async def score(self, request: Request) -> Response:
        from .inspect import (
            surprisal,  # numpy-heavy analysis code, loaded only when asked for
        )

        deadline = self.deadline()
        body = await self.body(request)
        engine = self.engine(body)
        text = body.get("text")
        if not isinstance(text, str):
            raise ApiError(400, "text must be a string", param="text")
        gen = engine.gen

        def scored() -> tuple[Any, int]:
            # top_k=1: the fewest top predictions, which the answer does not hold
            result = surprisal(gen.model, gen.tokenizer, text, keep_chars=len(text), top_k=1)
            return result, gen.unknown_characters(text)

        result, unknown = await engine.call(scored, deadline=deadline)
        per_char = [None if math.isnan(v) else round(float(v), 5) for v in result.per_char]
        return JSONResponse({"model": engine.name, "summary": result.summary, "text": text,
                             "surprisal": per_char, "unit": "nats", "unknown_characters": unknown})

    # -- chat sessions ---------------------------------------------------------------------------------
    def _expire(self) -> None:
        """Forget the sessions unused for longer than ``session_ttl`` (never one that is replying)."""
        now = time.monotonic()
        for key in [k for k, s in self.sessions.items()
                    if now - s.used > self.settings.session_ttl and s.reply is None]:
            del self.sessions[key]

    def _session(self, request: Request, idle: bool = False) -> tuple[str, Session]:
        """The session the path names (404 if none), marked as used; with ``idle``, a 409 while it replies."""
        self._expire()
        key = request.path_params["sid"]
        if key not in self.sessions:
            raise ApiError(404, f"no session {key!r} (it may have expired)", code="session_not_found")
        session = self.sessions[key]
        session.used = time.monotonic()
        if idle and session.reply is not None:
            raise ApiError(409, "this session is answering a message")
        return key, session

    async def new_session(self, request: Request) -> Response:
        deadline = self.deadline()
        body = await self.body(request)
        engine = self.engine(body)
        g = parse_generation(body, self.settings, DEFAULT_STOP)
        if g.label is not None or g.state is not None or g.n != 1:
            raise ApiError(400, "a session takes sampling settings: no label, state or n")
        user, bot = self.prefixes(engine, body)
        context = body.get("context", "")
        if not isinstance(context, str):
            raise ApiError(400, "context must be a string", param="context")
        self._expire()
        if len(self.sessions) >= self.settings.max_sessions:
            raise Busy("too many chat sessions; retry later")
        engine.reserve(1)  # reading the context is model work, as a prompt is
        try:
            start, _ = await engine.begin(context, None, 1.0, deadline)
        finally:
            engine.release()
        key = uuid.uuid4().hex
        chat = ChatSession(engine.gen, g.config, user, bot, context, start=start)
        self.sessions[key] = Session(engine, chat, time.monotonic())
        return JSONResponse({"id": key, "model": engine.name, "expires_after": self.settings.session_ttl}, 201)

    async def session_info(self, request: Request) -> Response:
        key, session = self._session(request)
        return JSONResponse({"id": key, "model": session.engine.name, "turns": [
            {"user": t.user, "reply": t.reply, "finish_reason": t.ended} for t in session.chat.turns]})

    async def session_say(self, request: Request) -> Response:
        """The reply to a message: as one JSON object, or with "stream": true as server-sent events, a
        {"id", "delta"} per piece and a last one with the finish_reason and the number of turns."""
        deadline = self.deadline()
        body = await self.body(request)
        line = body.get("content")
        if not isinstance(line, str) or not line.strip():
            raise ApiError(400, "content must be a non-empty string", param="content")
        key, session = self._session(request, idle=True)
        engine, chat = session.engine, session.chat
        fed = chat.format_input(line)
        ids = [int(i) for i in engine.gen.tokenizer.encode(fed)]
        before = chat.snapshot()

        def keep(stream: Stream) -> None:
            # The turn is kept whole however it ended (as ChatSession.turn keeps it): the state has read every
            # generated token.
            ended = stream.finish if stream.finish in ("stop", "length") else "interrupted"
            turn = Turn(line, fed, "".join(stream.shown), "".join(stream.raw), ended)
            chat.record_turn(before, _own(stream.cursor), turn)
            session.reply, session.used = None, time.monotonic()

        engine.reserve(1)
        # The session is busy from here, its line being read, until keep() has recorded the turn.
        stream = session.reply = Stream(before, chat.config, chat.rng, asyncio.Queue(), deadline=deadline,
                                        on_finish=keep)
        try:
            if ids:
                stream.cursor = await engine.read(ids, before.state, deadline)
        except BaseException:
            session.reply = None
            engine.release()
            raise
        engine.submit(stream)

        def last() -> dict[str, Any]:
            return {"id": key, "finish_reason": stream.finish, "turns": len(chat.turns)}

        if not body.get("stream", False):
            await _wait(request, [stream], stream.out)
            return JSONResponse({**last(), "reply": "".join(stream.shown)})

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for _, piece, reason in _pieces(stream.out, 1):
                if piece:
                    yield {"id": key, "delta": piece, "finish_reason": None}
                if reason is not None:
                    yield {**last(), "delta": ""}

        return _event_stream(events(), [stream])

    async def session_command(self, request: Request) -> Response:
        key, session = self._session(request, idle=True)
        command = request.path_params["command"]
        if command not in ("undo", "reset"):  # never /save (a file on the server) or the other commands
            raise ApiError(404, f"no session command {command!r}: undo or reset")
        events = list(session.chat.handle(f"/{command}"))
        problems = [e.text for e in events if isinstance(e, Problem)]
        if problems:
            raise ApiError(409, problems[0])
        return JSONResponse({"id": key, "turns": len(session.chat.turns),
                             "notice": " ".join(e.text for e in events if isinstance(e, Notice))})

    async def end_session(self, request: Request) -> Response:
        key, session = self._session(request)
        if session.reply is not None:  # a reply in progress ends now
            session.reply.cancel()
        del self.sessions[key]
        return JSONResponse({"id": key, "deleted": True})

    # -- the rest ----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "shutting down" if any(e.closing for e in self.engines.values()) else "ok",
                             "models": list(self.engines)})

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(self.engines), media_type="text/plain; version=0.0.4")

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    def drain(self) -> None:
        """Graceful shutdown: every stream ends with a final event; new generations get a 503."""
        for engine in self.engines.values():
            engine.drain()


def _own(cursor: Cursor) -> Cursor:
    """``cursor`` with tensors of its own: a stream's are views of its last batch's, all of which a session
    keeping the cursor would keep alive."""
    assert cursor.state is not None and cursor.free is None
    return Cursor(tuple(s.clone() for s in cursor.state), cursor.logits.clone())


async def _cancel_when_gone(request: Request, streams: list[Stream], every: float = 0.2) -> None:
    """Cancel ``streams`` once the client of ``request`` has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    for stream in streams:
        stream.cancel()


async def _wait(request: Request, streams: list[Stream], out: asyncio.Queue) -> None:
    """Until ``streams`` have all finished (their text is then in ``shown``). A client that goes away before
    frees them at once, as a streaming one does (its response is never sent)."""
    watcher = asyncio.create_task(_cancel_when_gone(request, streams))
    try:
        async for _ in _pieces(out, len(streams)):
            pass
    finally:
        watcher.cancel()
        for stream in streams:
            stream.cancel()


async def _pieces(out: asyncio.Queue, count: int) -> AsyncIterator[tuple[int, str, str | None]]:
    """(index, piece, finish reason) from a request's queue until its ``count`` streams have finished."""
    left = count
    while left:
        index, piece, reason = await out.get()
        left -= reason is not None
        yield index, piece, reason


def _event_stream(events: AsyncIterator[dict[str, Any]], streams: list[Stream]) -> StreamingResponse:
    """Server-sent events: "data: {json}" for each of ``events``, then "data: [DONE]"."""
    async def body() -> AsyncIterator[str]:
        try:
            async for data in events:
                yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the server stopped): its streams leave the batch at once
            for stream in streams:
                stream.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Guard:
    """ASGI middleware: the API key (for /v1/...), request counting, and errors in OpenAI's shape."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        label = next((f"{prefix}{{id}}" for prefix in ("/v1/rnngen/sessions/", "/v1/models/")
                      if path.startswith(prefix)), path)
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        key = self.server.settings.api_key
        try:
            if key and path.startswith("/v1") and scope["method"] != "OPTIONS" and not _authorised(scope, key):
                await ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                               code="invalid_api_key").response()(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            known = label if label in KNOWN_PATHS else "other"
            requests = self.server.metrics.requests
            requests[(known, status[0])] = requests.get((known, status[0]), 0) + 1


def _authorised(scope: Scope, key: str) -> bool:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    given = headers.get("authorization", "")
    given = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/models/{id}", "/v1/completions", "/v1/chat/completions",
               "/v1/rnngen/generate", "/v1/rnngen/classify", "/v1/rnngen/score", "/v1/rnngen/sessions",
               "/v1/rnngen/sessions/{id}"}


def create_app(models: dict[str, LoadedModel], settings: Settings | None = None) -> Starlette:
    """The ASGI app serving ``models`` (name: loaded model). ``app.state.server`` is its ``Server``; call
    ``app.state.server.drain()`` on the event loop to end the streams in flight before stopping."""
    server = Server(models, settings or Settings())

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, str(exc.detail)).response()

    async def unexpected(request: Request, exc: Exception) -> Response:
        return ApiError(500, f"internal error: {type(exc).__name__}").response()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for engine in server.engines.values():
            engine.start()
        yield
        for engine in server.engines.values():
            await engine.stop()

    s = server
    routes = [
        Route("/", s.page), Route("/health", s.health), Route("/metrics", s.metrics_text),
        Route("/v1/models", s.models), Route("/v1/models/{name}", s.model),
        Route("/v1/completions", s.completions, methods=["POST"]),
        Route("/v1/rnngen/generate", s.completions, methods=["POST"]),
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/rnngen/classify", s.classify, methods=["POST"]),
        Route("/v1/rnngen/score", s.score, methods=["POST"]),
        Route("/v1/rnngen/sessions", s.new_session, methods=["POST"]),
        Route("/v1/rnngen/sessions/{sid}", s.session_info, methods=["GET"]),
        Route("/v1/rnngen/sessions/{sid}", s.end_session, methods=["DELETE"]),
        Route("/v1/rnngen/sessions/{sid}/messages", s.session_say, methods=["POST"]),
        Route("/v1/rnngen/sessions/{sid}/{command:str}", s.session_command, methods=["POST"]),
    ]
    middleware = [Middleware(Guard, server=server)]
    if settings and settings.cors_origins:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                                        allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: unexpected})
    app.state.server = server
    return app


__all__ = ["ApiError", "Engine", "Server", "Settings", "StateCodec", "Stream", "chat_text", "create_app",
           "parse_generation"]
