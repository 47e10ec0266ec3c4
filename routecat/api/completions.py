"""``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI in, scheduler out.

Invariants: authentication, limits, validation, money admission, model lookup and
capacity are all decided before the response starts, so their errors are real HTTP
statuses. Once streaming, an error is one ``data: {"error": ...}`` event and the
stream ends without ``[DONE]`` or ``finish_reason: "stop"``. A stream is a thin pump
over the job's event channel; a whole answer is gathered by a ``Collector`` from a job
run in the request's own task. Whatever ends the response (including the client
leaving) cancels the job through its handle, and the scheduler settles it.

Nothing here speaks HTTP: ``routecat.api.asgi`` serves these two routes as plain ASGI
(they carry nearly all the traffic) with the bodies and headers built here.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import attrs
import trio

from owlrun.protocol import Delta
from routecat import errors
from routecat.api.errors import error_body
from routecat.api.http import on_exchange_end
from routecat.api.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    converter,
    decode_json,
    parse_request,
)
from routecat.gateway import Gateway
from routecat.network.jobs import Bill, Event, Failure, Final, JobKind, JobSpec, mint_job_id
from routecat.network.measure import measure_prompt
from routecat.network.scheduler import JobHandle

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def wire_request(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int
) -> dict[str, Any]:
    """The body the node receives: the client's, validated, with max_tokens applied."""
    data = {k: v for k, v in converter.unstructure(body).items() if v is not None}
    for field in ("stream", "stream_options", "n", "max_completion_tokens", "echo"):
        data.pop(field, None)
    if "messages" in data:
        data["messages"] = [{k: v for k, v in m.items() if v is not None} for m in data["messages"]]
    data["max_tokens"] = max_tokens
    return data


def usage_body(bill: Bill) -> dict[str, int]:
    return {
        "prompt_tokens": bill.prompt_tokens,
        "completion_tokens": bill.completion_tokens,
        "total_tokens": bill.prompt_tokens + bill.completion_tokens,
        "cost_msat": bill.cost_msat,
    }


async def prepare_job(
    gw: Gateway,
    kind: JobKind,
    authorization: str | None,
    read_body: Callable[[], Awaitable[bytes]],
) -> tuple[JobSpec, ChatCompletionRequest | CompletionRequest]:
    """Authenticate, limit, read the body (``read_body``) and validate: the job to start."""
    key = await gw.keys.authenticate(authorization)
    await gw.request_limit.acquire(f"key:{key.id}")
    cls: type[ChatCompletionRequest | CompletionRequest] = (
        ChatCompletionRequest if kind == "chat" else CompletionRequest
    )
    body = parse_request(cls, decode_json(await read_body()))
    if body.n is not None and body.n != 1:
        raise errors.InvalidRequest("only n=1 is supported", param="n")
    if isinstance(body, CompletionRequest) and body.echo:
        raise errors.InvalidRequest("echo is not supported", param="echo")
    gw.scheduler.check_model(body.model)
    max_tokens = gw.admissions.applied_max_tokens(
        body.model, body.requested_max_tokens, gw.registry.context_length(body.model)
    )
    wire = wire_request(body, max_tokens)
    prompt = measure_prompt(kind, wire)
    spec = JobSpec(
        job_id=mint_job_id(kind),
        kind=kind,
        model=body.model,
        request=wire,
        stream=body.stream,
        key_id=key.id,
        max_tokens=max_tokens,
        prompt_bound=prompt.bound,
        requested_max_tokens=body.requested_max_tokens,
        prompt_bytes=prompt.bytes,
    )
    return spec, body


async def start_job(
    gw: Gateway, spec: JobSpec, sink: Callable[[Event], None] | None = None
) -> JobHandle:
    """Admit ``spec`` and start it; the job ends with the HTTP exchange at the latest.

    Without ``sink``, the job runs in the scheduler's task and this returns at once
    with its handle (read ``handle.events``). With ``sink``, it runs in this task and
    this returns when it has ended, every event handed to ``sink``."""
    # Admission is a few milliseconds of database writes whose outcome must be known:
    # shielded, so that a client leaving meanwhile is noticed in the scheduler below,
    # which gives the reservation and the free request back.
    with trio.CancelScope(shield=True):
        spec = await gw.admissions.admit(spec)
    handle: JobHandle | None = None

    def started(job: JobHandle) -> None:
        nonlocal handle
        # Whatever ends the HTTP exchange (the response sent, the client gone at any
        # moment, even before the response starts), the job is cancelled if running.
        on_exchange_end(lambda: job.cancel_nowait("client_gone"))
        handle = job  # from here on, the job's settlement owns the reservation

    try:
        # A client that left during admission is noticed here, before any dispatch.
        await trio.lowlevel.checkpoint_if_cancelled()
        if sink is None:
            started(await gw.scheduler.submit(spec))
        else:
            await gw.scheduler.run_here(spec, sink, started)
    except BaseException:
        if handle is None:
            # No job started (404/503, or the client left while queued): give the
            # reservation and the free request back, even while being cancelled.
            with trio.move_on_after(10, shield=True):
                await gw.admissions.release(spec)
        raise
    assert handle is not None
    return handle


# One encoder for every compact JSON here (``json.dumps`` with options builds one per call).
_compact = json.JSONEncoder(separators=(",", ":")).encode


class _Shape:
    """Builds OpenAI chunk and response objects for one job."""

    def __init__(self, handle: JobHandle, kind: JobKind) -> None:
        self.id = handle.spec.job_id
        self.model = handle.spec.model
        self.kind = kind
        self.created = int(time.time())
        self.role_sent = False
        self._around: tuple[bytes, bytes] | None = None

    def delta_event(self, delta: Delta, with_usage: bool) -> bytes:
        """``_sse(self.chunk(delta))`` (plus ``"usage": null`` when ``with_usage``) without
        building and encoding the whole chunk for every token: the bytes around the
        delta are the same for the whole stream, made once (so ``with_usage`` is the
        stream's, the same on every call)."""
        if self._around is None:
            chat = self.kind != "completion"
            head = (
                f'data: {{"id":{_compact(self.id)},"object":'
                + ('"chat.completion.chunk"' if chat else '"text_completion"')
                + f',"created":{self.created},"model":{_compact(self.model)}'
                + (',"system_fingerprint":null,"choices":[{"index":0,"delta":' if chat else
                   ',"choices":[{"index":0,"text":')
            )  # fmt: skip
            tail = ',"logprobs":null,"finish_reason":null}]'
            tail += (',"usage":null' if with_usage else "") + "}\n\n"
            self._around = (head.encode(), tail.encode())
        before, after = self._around
        if self.kind == "completion":
            inner = _compact(delta.content or "")
        else:
            inner = _compact(self._delta_object(delta))
        return before + inner.encode() + after

    def chunk(self, delta: Delta | None, finish_reason: str | None = None) -> dict[str, Any]:
        if self.kind == "completion":
            return {
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "text": (delta.content or "") if delta else "",
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
        out = self._delta_object(delta)
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": out, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    def _delta_object(self, delta: Delta | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not self.role_sent:
            out["role"] = "assistant"
            self.role_sent = True
        if delta is not None:
            if delta.content is not None:
                out["content"] = delta.content
            if delta.reasoning:
                out["reasoning_content"] = delta.reasoning
            if delta.refusal:
                out["refusal"] = delta.refusal
            if delta.tool_calls:
                out["tool_calls"] = delta.tool_calls
        return out

    def usage_chunk(self, bill: Bill) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_body(bill),
        }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _compact(obj).encode() + b"\n\n"


def stream_body(
    gw: Gateway, handle: JobHandle, body: ChatCompletionRequest | CompletionRequest
) -> AsyncGenerator[bytes, None]:
    """The job's events as the OpenAI SSE body."""
    shape = _Shape(handle, handle.spec.kind)
    include_usage = body.include_usage

    def render(event: Event) -> tuple[bytes, bool]:
        """One event as SSE bytes, and whether the stream ends with it."""
        if isinstance(event, Delta):
            return shape.delta_event(event, include_usage), False
        if isinstance(event, Final):
            chunk = shape.chunk(None, event.finish_reason)
            if include_usage:
                chunk["usage"] = None
            usage = _sse(shape.usage_chunk(event.bill)) if include_usage else b""
            return _sse(chunk) + usage + b"data: [DONE]\n\n", True
        return _sse(error_body(event.error)), True

    return sse_events(handle, render, stopped_event, gw.config.keepalive_interval)


def stopped_event() -> bytes:
    """The job ended without a final event (shutdown): an error, and no [DONE]."""
    return _sse(error_body(errors.ServiceUnavailable("the gateway stopped the job", retry_after=5)))


async def sse_events(
    handle: JobHandle,
    render: Callable[[Event], tuple[bytes, bool]],
    stopped: Callable[[], bytes],
    keepalive: float,
) -> AsyncGenerator[bytes, None]:
    """A job's events as an SSE body: ``render`` turns each event into bytes (and says
    whether it ends the stream); events that arrived together leave in one write; a
    comment line every ``keepalive`` seconds while the engine is silent; ``stopped``
    when the job ends without a final event (shutdown). The job is cancelled when the
    exchange ends (``start_job``), however it ends."""
    while True:
        try:
            event = handle.events.receive_nowait()  # the common case, no timer
        except trio.WouldBlock:
            with trio.move_on_after(keepalive) as timer:
                try:
                    event = await handle.events.receive()
                except trio.EndOfChannel:
                    yield stopped()
                    return
            if timer.cancelled_caught:
                yield b": ping\n\n"
                continue
        except trio.EndOfChannel:
            yield stopped()
            return
        data, ended = render(event)
        # Chunks that arrived together leave in one write (one syscall, not many).
        parts = [data]
        while not ended and len(parts) < 64:
            try:
                event = handle.events.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                parts.append(stopped())
                ended = True
                break
            data, ended = render(event)
            parts.append(data)
        yield b"".join(parts)
        if ended:
            return


@attrs.define(eq=False)
class Collector:
    """A job's events gathered into the whole answer (a response that is not a stream):
    ``add`` is the job's sink, ``answer`` the body and headers once it has ended."""

    text: list[str] = attrs.Factory(list)
    reasoning: list[str] = attrs.Factory(list)
    refusal: list[str] = attrs.Factory(list)
    calls: dict[int, dict[str, Any]] = attrs.Factory(dict)
    final: Final | None = None
    failure: Failure | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, Final):
            self.final = event
        elif isinstance(event, Failure):
            self.failure = event
        else:
            if event.content:
                self.text.append(event.content)
            if event.reasoning:
                self.reasoning.append(event.reasoning)
            if event.refusal:
                self.refusal.append(event.refusal)
            for call in event.tool_calls or ():
                slot = self.calls.setdefault(
                    call["index"],
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"] += fn["arguments"]

    def answer(self, handle: JobHandle) -> tuple[dict[str, Any], dict[str, str]]:
        """The body and headers of the ended job; its error if it failed."""
        if self.failure is not None:
            raise self.failure.error
        if self.final is None:  # ended without a final event: the gateway stopped it
            raise errors.ServiceUnavailable("the gateway stopped the job", retry_after=5)
        headers = {"X-RouteCat-Cost-Msat": str(self.final.bill.cost_msat), **free_header(handle)}
        return _complete(_Shape(handle, handle.spec.kind), self, self.final), headers


def free_header(handle: JobHandle) -> dict[str, str]:
    """``X-RouteCat-Free: 1`` on a request served free (its max_tokens capped), and
    ``X-RouteCat-Max-Tokens: N`` whenever the job runs with less than it asked for
    (the free cap, or the model's ceiling): never a silent cut."""
    spec = handle.spec
    headers = {"X-RouteCat-Free": "1"} if getattr(spec.admission, "free", False) else {}
    if spec.requested_max_tokens is not None and spec.max_tokens < spec.requested_max_tokens:
        headers["X-RouteCat-Max-Tokens"] = str(spec.max_tokens)
    return headers


def _complete(shape: _Shape, collected: Collector, final: Final) -> dict[str, Any]:
    text, reasoning = "".join(collected.text), "".join(collected.reasoning)
    refusal, calls = "".join(collected.refusal), collected.calls
    if shape.kind == "completion":
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": final.finish_reason,
        }
        obj = "text_completion"
    else:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not calls else None,
        }
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        message["refusal"] = refusal or None
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": final.finish_reason,
        }
        obj = "chat.completion"
    return {
        "id": shape.id,
        "object": obj,
        "created": shape.created,
        "model": shape.model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": usage_body(final.bill),
    }
