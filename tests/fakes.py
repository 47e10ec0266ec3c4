"""Local servers that speak real engines' documented wire formats, with knobs.

``FakeEngine`` serves both Ollama's native API (``/api/tags``, ``/api/chat``,
``/api/generate``, NDJSON streams) and the OpenAI API (``/v1/models``,
``/v1/chat/completions``, ``/v1/completions``, SSE). By default a chat reply is
``"You said: <last user message>"`` split into word tokens, so every concurrent
client can check its own answer. Knobs make it slow, stall, crash mid-stream, call
tools, or lie about usage; it records every request it saw and every one whose
client went away before the end.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio
from quart import Response, request
from quart_trio import QuartTrio


@attrs.define
class Knobs:
    delay: float = 0.0  # seconds between tokens
    first_delay: float = 0.0  # seconds before the first token
    stall_after: int | None = None  # stop sending (but keep the connection) after N tokens
    crash_after: int | None = None  # drop the connection after N tokens
    fail_status: int | None = None  # answer this HTTP status instead
    tool_call: dict[str, Any] | None = None  # {"name": ..., "arguments": {...}}
    reply: list[str] | None = None  # fixed reply tokens
    repeat: int = 1  # the reply repeated this many times
    report_factor: float = 1.0  # multiply reported completion tokens (a cheating engine)
    report_prompt_factor: float = 1.0  # multiply reported prompt tokens (a cheating engine)
    reasoning: list[str] | None = None  # reasoning tokens streamed before the answer
    report_usage: bool = True
    models: list[str] = attrs.Factory(lambda: ["llama3.1:8b"])
    context_length: int | None = None  # reported by /api/show and /v1/models
    linger: float = 0.0  # seconds the body stays open after the answer's end
    break_at_end: bool = False  # drop the connection after the answer's end (no clean end)
    raw_unicode: bool = False  # JSON with non-ASCII unescaped (as llama.cpp writes it)
    endless_line: bool = False  # after the first token, one line that never ends


def fake_vector(text: Any, dimensions: int | None = None) -> list[float]:
    """A deterministic embedding of ``text`` (a string or token ids), 8 dimensions by
    default: equal inputs, equal vectors."""
    digest = hashlib.sha256(json.dumps(text).encode()).digest()
    size = dimensions or 8
    return [round((digest[i % 32] - 128) / 128, 4) for i in range(size)]


def fake_tokens(text: Any) -> int:
    """The fake engine's token count: a quarter of the bytes (at least 1), or the ids."""
    return len(text) if isinstance(text, list) else max(1, len(str(text).encode()) // 4)


def _unescaped(frame: bytes) -> bytes:
    """An NDJSON line or SSE event with its JSON's non-ASCII characters written raw."""
    out = []
    for line in frame.split(b"\n"):
        prefix = b"data: " if line.startswith(b"data: {") else b""
        if line[len(prefix) :].startswith(b"{"):
            data = json.loads(line[len(prefix) :])
            line = prefix + json.dumps(data, ensure_ascii=False).encode()
        out.append(line)
    return b"\n".join(out)


@attrs.define(eq=False)
class FakeEngine:
    knobs: Knobs = attrs.Factory(Knobs)
    model_knobs: dict[str, Knobs] = attrs.Factory(dict)  # overrides for some models
    requests: list[dict[str, Any]] = attrs.Factory(list)
    # The client address (host, port) of each generation request: one per connection.
    peers: list[Any] = attrs.Factory(list)
    active: int = 0
    aborted: list[float] = attrs.Factory(list)  # when each abort was seen (monotonic)
    finished: int = 0
    url: str = ""
    # One entry per streamed request: its last user message, tokens sent, whether it
    # completed, and when it ended (monotonic): the engine's own log.
    log: list[dict[str, Any]] = attrs.Factory(list)

    def reply_tokens(self, body: dict[str, Any], kind: str) -> list[str]:
        knobs = self.model_knobs.get(str(body.get("model")), self.knobs)
        if knobs.reply is not None:
            base = list(knobs.reply)
        elif kind == "completion":
            prompt = body.get("prompt", "")
            base = ["Completion", " of:", *[" " + w for w in str(prompt).split()]]
        else:
            last = ""
            for m in body.get("messages", []):
                if m.get("role") == "user":
                    content = m.get("content")
                    last = content if isinstance(content, str) else json.dumps(content)
            words = last.split()
            base = ["You", " said:", *[" " + w for w in words]]
        return base * knobs.repeat

    def model_names(self) -> list[str]:
        return [*self.knobs.models, *(m for m in self.model_knobs if m not in self.knobs.models)]

    def app(self) -> QuartTrio:
        app = QuartTrio("fake-engine")
        engine = self

        @app.get("/api/tags")
        async def tags() -> Any:
            return {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "details": {
                            "family": "llama",
                            "parameter_size": "8B",
                            "quantization_level": "Q4_0",
                        },
                    }
                    for m in engine.model_names()
                ]
            }

        @app.get("/v1/models")
        async def models() -> Any:
            extra = {}
            if engine.knobs.context_length:
                extra = {"max_model_len": engine.knobs.context_length}
            return {
                "object": "list",
                "data": [{"id": m, "object": "model", **extra} for m in engine.model_names()],
            }

        @app.post("/api/show")
        async def show() -> Any:
            length = engine.knobs.context_length
            name = str((await request.get_json() or {}).get("model", ""))
            return {
                "model_info": {"llama.context_length": length} if length else {},
                "capabilities": ["embedding"] if "embed" in name else ["completion"],
            }

        @app.post("/api/embed")
        async def ollama_embed() -> Any:
            body = await request.get_json()
            engine.requests.append(body)
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            if engine.knobs.fail_status is not None:
                return Response("{}", status=engine.knobs.fail_status)
            return {
                "model": body["model"],
                "embeddings": [fake_vector(x, body.get("dimensions")) for x in inputs],
                "prompt_eval_count": sum(fake_tokens(x) for x in inputs),
            }

        @app.post("/v1/embeddings")
        async def openai_embed() -> Any:
            body = await request.get_json()
            engine.requests.append(body)
            inputs = body["input"]
            if engine.knobs.fail_status is not None:
                return Response("{}", status=engine.knobs.fail_status)
            return {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": fake_vector(x, body.get("dimensions")),
                    }
                    for i, x in enumerate(inputs)
                ],
                "usage": {"prompt_tokens": sum(fake_tokens(x) for x in inputs)},
            }

        @app.post("/api/chat")
        async def ollama_chat() -> Any:
            return await engine.serve(await request.get_json(), "chat", "ollama")

        @app.post("/api/generate")
        async def ollama_generate() -> Any:
            return await engine.serve(await request.get_json(), "completion", "ollama")

        @app.post("/v1/chat/completions")
        async def openai_chat() -> Any:
            return await engine.serve(await request.get_json(), "chat", "openai")

        @app.post("/v1/completions")
        async def openai_completions() -> Any:
            return await engine.serve(await request.get_json(), "completion", "openai")

        return app

    async def serve(self, body: dict[str, Any], kind: str, dialect: str) -> Any:
        self.requests.append(body)
        self.peers.append(tuple(request.scope.get("client") or ()))
        k = self.model_knobs.get(str(body.get("model")), self.knobs)
        if k.fail_status is not None:
            return Response(json.dumps({"error": "failing on purpose"}), status=k.fail_status)
        tokens = self.reply_tokens(body, kind)
        limit = body.get("max_tokens") or (body.get("options") or {}).get("num_predict")
        finish = "stop"
        if isinstance(limit, int) and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        prompt_tokens = (
            sum(len(str(m.get("content", "")).split()) + 4 for m in body.get("messages", []))
            or len(str(body.get("prompt", "")).split()) + 1
        )
        prompt_tokens = round(prompt_tokens * k.report_prompt_factor)
        completion_tokens = round((len(tokens) + len(k.reasoning or ())) * k.report_factor)
        stream = body.get("stream", dialect == "ollama")
        if dialect == "openai" and not stream:
            await trio.sleep(k.first_delay + k.delay * len(tokens))
            text = "".join(tokens)
            choice: dict[str, Any] = (
                {"index": 0, "text": text, "finish_reason": finish}
                if kind == "completion"
                else {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            )
            return {
                "id": "x",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        gen = self._stream(body, kind, dialect, tokens, finish, prompt_tokens, completion_tokens)
        response = Response(
            gen, content_type="application/x-ndjson" if dialect == "ollama" else "text/event-stream"
        )
        response.timeout = None
        return response

    async def _stream(
        self,
        body: dict[str, Any],
        kind: str,
        dialect: str,
        tokens: list[str],
        finish: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> AsyncIterator[bytes]:
        k = self.model_knobs.get(str(body.get("model")), self.knobs)
        self.active += 1
        complete = False
        messages = body.get("messages") or [{}]
        entry: dict[str, Any] = {
            "text": str(messages[-1].get("content", body.get("prompt", ""))),
            "tokens": 0,
            "bytes": 0,
            "complete": False,
            "started": time.monotonic(),
        }
        self.log.append(entry)
        try:
            await trio.sleep(k.first_delay)
            for thought in k.reasoning or ():
                yield self._frame(dialect, kind, body, reasoning=thought)
                entry["tokens"] += 1
                entry["bytes"] += len(thought.encode())
            for i, token in enumerate(tokens):
                if k.crash_after is not None and i >= k.crash_after:
                    raise RuntimeError("engine crashed on purpose")
                if k.stall_after is not None and i >= k.stall_after:
                    await trio.sleep_forever()
                if i:
                    await trio.sleep(k.delay)
                    if k.endless_line:
                        yield b"data: " if dialect == "openai" else b""
                        while True:  # until the client leaves
                            yield b'{"x": "' + b"x" * 65536
                            await trio.lowlevel.checkpoint()
                frame = self._frame(dialect, kind, body, content=token)
                yield _unescaped(frame) if k.raw_unicode else frame
                entry["tokens"] += 1
                entry["bytes"] += len(token.encode())
            if k.tool_call is not None and kind == "chat":
                yield self._frame(dialect, kind, body, tool_call=k.tool_call)
                finish = "tool_calls"
            yield self._final(dialect, kind, body, finish, prompt_tokens, completion_tokens)
            if dialect == "openai":
                yield b"data: [DONE]\n\n"
            complete = True
            await trio.sleep(k.linger)
            if k.break_at_end:
                raise RuntimeError("engine broke the connection after the answer on purpose")
        finally:
            self.active -= 1
            entry["complete"] = complete
            entry["ended"] = time.monotonic()
            if complete:
                self.finished += 1
            else:
                self.aborted.append(time.monotonic())

    def _frame(
        self,
        dialect: str,
        kind: str,
        body: dict[str, Any],
        content: str = "",
        tool_call: dict[str, Any] | None = None,
        reasoning: str | None = None,
    ) -> bytes:
        if reasoning is not None:
            if dialect == "ollama":
                thinking = {"role": "assistant", "content": "", "thinking": reasoning}
                frame = {"model": body["model"], "message": thinking, "done": False}
                return json.dumps(frame).encode() + b"\n"
            delta = {"reasoning_content": reasoning}
            frame = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            return b"data: " + json.dumps(frame).encode() + b"\n\n"
        if dialect == "ollama":
            if kind == "completion":
                return (
                    json.dumps(
                        {"model": body["model"], "response": content, "done": False}
                    ).encode()
                    + b"\n"
                )
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if tool_call is not None:
                message["tool_calls"] = [
                    {"function": {"name": tool_call["name"], "arguments": tool_call["arguments"]}}
                ]
            return (
                json.dumps({"model": body["model"], "message": message, "done": False}).encode()
                + b"\n"
            )
        if kind == "completion":
            data: dict[str, Any] = {
                "choices": [{"index": 0, "text": content, "finish_reason": None}]
            }
        elif tool_call is not None:
            data = {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_fake1",
                                    "type": "function",
                                    "function": {
                                        "name": tool_call["name"],
                                        "arguments": json.dumps(tool_call["arguments"]),
                                    },
                                }
                            ]
                        },
                        "finish_reason": None,
                    }
                ]
            }
        else:
            data = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    def _final(
        self,
        dialect: str,
        kind: str,
        body: dict[str, Any],
        finish: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> bytes:
        k = self.model_knobs.get(str(body.get("model")), self.knobs)
        if dialect == "ollama":
            final: dict[str, Any] = {
                "model": body["model"],
                "done": True,
                "done_reason": "length" if finish == "length" else "stop",
            }
            if kind == "chat":
                final["message"] = {"role": "assistant", "content": ""}
            else:
                final["response"] = ""
            if k.report_usage:
                final["prompt_eval_count"] = prompt_tokens
                final["eval_count"] = completion_tokens
            return json.dumps(final).encode() + b"\n"
        out = b""
        if kind == "completion":
            out += (
                b"data: "
                + json.dumps(
                    {"choices": [{"index": 0, "text": "", "finish_reason": finish}]}
                ).encode()
                + b"\n\n"
            )
        else:
            out += (
                b"data: "
                + json.dumps(
                    {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
                ).encode()
                + b"\n\n"
            )
        wants_usage = (body.get("stream_options") or {}).get("include_usage")
        if k.report_usage and wants_usage:
            out += (
                b"data: "
                + json.dumps(
                    {
                        "choices": [],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                        },
                    }
                ).encode()
                + b"\n\n"
            )
        return out


async def serve_app(
    app: QuartTrio, *, port: int = 0, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve a Quart-Trio app on 127.0.0.1 (port 0: a free one) until cancelled."""
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    binds: list[str] = []

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn.trio.serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        task_status.started(binds[0])


async def start_engine(nursery: trio.Nursery, knobs: Knobs | None = None) -> FakeEngine:
    engine = FakeEngine(knobs or Knobs())
    engine.url = await nursery.start(functools.partial(serve_app, engine.app()))
    return engine


# -- a Lightning Address server (LUD-16 / LNURL-pay) that can misbehave ----------------


@attrs.define(eq=False)
class LnurlServer:
    """Serves ``/.well-known/lnurlp/<user>`` and its callback, issuing regtest invoices
    signed with its own key. ``mode`` makes it misbehave."""

    # good, wrong_amount, amountless, error, private_callback, slow, mainnet, expired,
    # odd_port, deep_json, huge, not_json, redirect_private, bad_numbers
    mode: str = "good"
    url: str = ""
    invoices: list[tuple[str, int]] = attrs.Factory(list)  # (bolt11, amount asked)
    min_sendable: int = 1000
    max_sendable: int = 10**11
    _key: Any = None

    def invoice(self, amount_msat: int | None, currency: str = "bcrt", age: int = 0) -> str:
        import hashlib
        import secrets as _secrets

        import bolt11
        from bolt11.models.tags import TagChar, Tags
        from coincurve import PrivateKey

        if self._key is None:
            self._key = PrivateKey()
        tags = Tags()
        tags.add(TagChar.payment_hash, hashlib.sha256(_secrets.token_bytes(32)).hexdigest())
        tags.add(TagChar.payment_secret, _secrets.token_hex(32))
        tags.add(TagChar.description_hash, hashlib.sha256(self.metadata().encode()).hexdigest())
        tags.add(TagChar.expire_time, 600)
        inv = bolt11.Bolt11(
            currency=currency,
            date=int(time.time()) - age,
            tags=tags,
            amount_msat=bolt11.MilliSatoshi(amount_msat) if amount_msat else None,
        )
        return str(bolt11.encode(inv, self._key.secret.hex()))

    @staticmethod
    def metadata() -> str:
        return json.dumps([["text/plain", "RouteCat test provider"]])

    def app(self) -> QuartTrio:
        app = QuartTrio("lnurl")
        server = self

        @app.get("/.well-known/lnurlp/<user>")
        async def pay_request(user: str) -> Any:
            callback = f"{server.url}/cb/{user}"
            mode = server.mode
            if mode == "private_callback":
                callback = f"http://localhost:{server.url.rsplit(':', 1)[1]}/cb/{user}"
            elif mode == "odd_port":
                callback = f"https://pay.example:99999/cb/{user}"
            elif mode == "deep_json":
                return Response("[" * 30_000 + "]" * 30_000, content_type="application/json")
            elif mode == "huge":
                return Response(b" " * 5_000_000 + b"{}", content_type="application/json")
            elif mode == "not_json":
                return Response("<html>hello</html>", content_type="text/html")
            elif mode == "redirect_private":
                return Response("", status=302, headers={"Location": "http://10.0.0.1/steal"})
            elif mode == "bad_numbers":
                return Response(
                    '{"tag": "payRequest", "callback": ' + json.dumps(callback) + ","
                    ' "minSendable": 1e400, "maxSendable": NaN, "metadata": "[]"}',
                    content_type="application/json",
                )
            return {
                "tag": "payRequest",
                "callback": callback,
                "minSendable": server.min_sendable,
                "maxSendable": server.max_sendable,
                "metadata": server.metadata(),
            }

        @app.get("/cb/<user>")
        async def callback(user: str) -> Any:
            amount = int(request.args["amount"])
            mode = server.mode
            if mode == "error":
                return {"status": "ERROR", "reason": "this wallet is closed"}
            if mode == "slow":
                await trio.sleep(30)
            pr = {
                "wrong_amount": lambda: server.invoice(amount - 1000),
                "amountless": lambda: server.invoice(None),
                "mainnet": lambda: server.invoice(amount, currency="bc"),
                "expired": lambda: server.invoice(amount, age=3600),
            }.get(mode, lambda: server.invoice(amount))()
            server.invoices.append((pr, amount))
            return {"pr": pr, "routes": []}

        return app


async def start_lnurl(nursery: trio.Nursery, mode: str = "good") -> LnurlServer:
    server = LnurlServer(mode=mode)
    server.url = await nursery.start(functools.partial(serve_app, server.app()))
    return server
