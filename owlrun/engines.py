"""Engine adapters: turn a job (an OpenAI body) into the engine's request and its
streamed answer back into protocol deltas.

Invariant: leaving the ``serve`` iterator early (a cancel) closes the engine's HTTP
response at once, which is how Ollama, llama.cpp and vLLM learn to stop generating.
Usage is the engine's own count when it gives one; otherwise the agent counts the
chunks it streamed (one chunk per token for llama.cpp-style servers), and says
nothing it does not know. Reasoning (Ollama's ``message.thinking``, OpenAI-compatible
``reasoning_content`` or ``reasoning``) and refusals are forwarded as such: they are
output the user pays for, so they must reach the user.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import struct
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

import attrs
import httpx

from owlrun.errors import EngineError, LineTooLong
from owlrun.lines import drain, read_lines
from owlrun.protocol import MAX_TOKENS, MAX_TOOL_CALLS, Delta, Job, ModelInfo, Usage

# How long the end of an answer's body is waited for once the answer is complete.
REST_OF_BODY_SECONDS = 2.0
# The longest line of an engine's answer (characters): far above any honest event.
MAX_LINE = 16 * 1024 * 1024
# A chat template adds a few tokens per message (role markers) and per prompt (the
# assistant's opening); counted on ChatML-style templates.
TEMPLATE_TOKENS_PER_MESSAGE = 3
TEMPLATE_TOKENS_PER_PROMPT = 3


@attrs.frozen
class Finish:
    finish_reason: str
    usage: Usage | None


@attrs.frozen
class Embeddings:
    """An embedding job's whole result: one base64 little-endian float32 vector per
    input, in input order."""

    vectors: list[str]
    usage: Usage | None


Event = Delta | Finish | Embeddings


def pack_vector(values: Any) -> str:
    """An engine's embedding (a JSON array of numbers) as base64 float32; ValueError
    for anything else. Per-token vectors (an array of arrays: llama.cpp for a model
    without pooling) are mean-pooled into one."""
    if isinstance(values, list) and values and all(isinstance(v, list) for v in values):
        rows = [_numbers(v) for v in values]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("per-token vectors of different sizes")
        values = [sum(column) / len(rows) for column in zip(*rows, strict=True)]
    numbers = _numbers(values)
    return base64.b64encode(struct.pack(f"<{len(numbers)}f", *numbers)).decode()


def _numbers(values: Any) -> list[float]:
    if not isinstance(values, list) or not values or len(values) > MAX_DIMENSIONS:
        raise ValueError("an embedding is a non-empty array of numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError("an embedding is an array of numbers")
    return values


MAX_DIMENSIONS = 65536


class Engine(Protocol):
    url: str

    async def list_models(self) -> list[ModelInfo]: ...

    def serve(self, job: Job) -> AsyncIterator[Event]: ...


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        # The body may echo the prompt: keep only the status in the error.
        retryable = response.status_code >= 500 or response.status_code == 429
        raise EngineError(f"{what}: engine answered HTTP {response.status_code}", retryable)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31:
        return value
    return None


def _openai_context(model: dict[str, Any]) -> int | None:
    """A context length from an OpenAI-compatible ``/v1/models`` entry: vLLM's
    ``max_model_len``, ``context_length`` (LM Studio, OpenRouter-style servers) or
    llama.cpp's ``meta.n_ctx_train``."""
    meta = model.get("meta")
    train = meta.get("n_ctx_train") if isinstance(meta, dict) else None
    for value in (model.get("max_model_len"), model.get("context_length"), train):
        found = _positive_int(value)
        if found is not None:
            return found
    return None


def _ollama_think(request: dict[str, Any]) -> bool | str | None:
    """Ollama's ``think``: the request's own, else from OpenAI's ``reasoning_effort``
    (a level for models that take one; "none"/"minimal" turn thinking off)."""
    think = request.get("think")
    if isinstance(think, bool) or think in ("low", "medium", "high"):
        return think
    effort = request.get("reasoning_effort")
    if effort in ("low", "medium", "high"):
        return str(effort)
    if effort in ("none", "minimal"):
        return False
    return None


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _images(content: Any) -> list[str]:
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if isinstance(url, str) and url.startswith("data:") and "," in url:
                    out.append(url.split(",", 1)[1])
    return out


async def _bounded(events: AsyncGenerator[Event, None]) -> AsyncIterator[Event]:
    """An engine's events; a line of its answer past ``MAX_LINE`` (``owlrun.lines``) is
    the engine's failure, and another node may try."""
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield event
        except LineTooLong as exc:
            raise EngineError(f"engine sent {exc}", True) from None


@attrs.define(eq=False)
class OllamaEngine:
    """Ollama's native API: ``/api/tags``, ``/api/chat``, ``/api/generate`` (NDJSON) and
    ``/api/embed``."""

    url: str
    client: httpx.AsyncClient
    # model -> (context length, capabilities) from ``/api/show``, asked once per model
    _shown: dict[str, tuple[int | None, list[str]]] = attrs.Factory(dict)

    async def list_models(self) -> list[ModelInfo]:
        response = await self.client.get(f"{self.url}/api/tags")
        _raise_for(response, "listing models")
        models = []
        for m in response.json().get("models", []):
            details = m.get("details") or {}
            name = str(m.get("name") or m.get("model"))
            models.append(
                ModelInfo(
                    name=name,
                    family=str(details.get("family", "")),
                    parameter_size=str(details.get("parameter_size", "")),
                    quantization=str(details.get("quantization_level", "")),
                    context_length=(await self._show(name))[0],
                    capabilities=(await self._show(name))[1],
                )
            )
        return models

    async def _show(self, name: str) -> tuple[int | None, list[str]]:
        """``<architecture>.context_length`` of ``/api/show``'s ``model_info``, and its
        ``capabilities`` (``embedding`` for an embedding model)."""
        if name not in self._shown:
            try:
                response = await self.client.post(f"{self.url}/api/show", json={"model": name})
                data = response.json() if response.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                return None, []  # asked again at the next refresh
            info = data.get("model_info") if isinstance(data, dict) else None
            length = None
            if isinstance(info, dict):
                length = _positive_int(
                    next((v for k, v in info.items() if k.endswith(".context_length")), None)
                )
            found = data.get("capabilities") if isinstance(data, dict) else None
            capabilities = [c for c in found if c == "embedding"] if isinstance(found, list) else []
            self._shown[name] = (length, capabilities)
        return self._shown[name]

    async def embed(self, job: Job) -> Embeddings:
        """``/api/embed``: text inputs only (Ollama takes no token arrays)."""
        request = job.request
        inputs = request.get("input")
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise EngineError("this engine embeds text only, not token arrays", False)
        body: dict[str, Any] = {"model": job.model, "input": inputs}
        if request.get("dimensions") is not None:
            body["dimensions"] = request["dimensions"]
        response = await self.client.post(f"{self.url}/api/embed", json=body)
        _raise_for(response, "embedding")
        data = response.json()
        found = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(found, list) or len(found) != len(inputs):
            raise EngineError("the engine's answer holds no embedding per input", True)
        try:
            vectors = [pack_vector(v) for v in found]
        except ValueError as exc:
            raise EngineError(f"the engine's embedding is malformed: {exc}", True) from None
        count = _positive_int(data.get("prompt_eval_count"))
        return Embeddings(vectors, None if count is None else Usage(count, 0))

    @staticmethod
    def options(request: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        for ours, theirs in (
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("seed", "seed"),
            ("presence_penalty", "presence_penalty"),
            ("frequency_penalty", "frequency_penalty"),
        ):
            if request.get(ours) is not None:
                options[theirs] = request[ours]
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        if limit is not None:
            options["num_predict"] = limit
        stop = request.get("stop")
        if stop is not None:
            options["stop"] = [stop] if isinstance(stop, str) else stop
        return options

    @staticmethod
    def messages(request: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for m in request["messages"]:
            role = "system" if m["role"] == "developer" else m["role"]
            message: dict[str, Any] = {"role": role, "content": _text(m.get("content"))}
            images = _images(m.get("content"))
            if images:
                message["images"] = images
            if m.get("tool_calls"):
                calls = []
                for call in m["tool_calls"]:
                    fn = call.get("function") or {}
                    args = fn.get("arguments")
                    try:
                        parsed = json.loads(args) if isinstance(args, str) else (args or {})
                    except ValueError:
                        parsed = {}
                    calls.append({"function": {"name": fn.get("name", ""), "arguments": parsed}})
                message["tool_calls"] = calls
            if m.get("name") and role == "tool":
                message["tool_name"] = m["name"]
            out.append(message)
        return out

    def body(self, job: Job) -> tuple[str, dict[str, Any]]:
        request = job.request
        body: dict[str, Any] = {
            "model": job.model,
            "stream": True,
            "options": self.options(request),
        }
        fmt = request.get("response_format") or {}
        if fmt.get("type") == "json_object":
            body["format"] = "json"
        elif fmt.get("type") == "json_schema":
            body["format"] = (fmt.get("json_schema") or {}).get("schema", "json")
        if job.kind == "completion":
            prompt = request.get("prompt", "")
            body["prompt"] = prompt if isinstance(prompt, str) else "".join(prompt)
            if request.get("suffix"):
                body["suffix"] = request["suffix"]
            return "/api/generate", body
        body["messages"] = self.messages(request)
        if request.get("tools") and request.get("tool_choice") != "none":
            body["tools"] = request["tools"]
        think = _ollama_think(request)
        if think is not None:
            body["think"] = think
        return "/api/chat", body

    def serve(self, job: Job) -> AsyncIterator[Event]:
        return _bounded(self._serve(job))

    async def _serve(self, job: Job) -> AsyncGenerator[Event, None]:
        if job.kind == "embedding":
            yield await self.embed(job)
            return
        path, body = self.body(job)
        tool_index = 0
        async with self.client.stream("POST", f"{self.url}{path}", json=body) as response:
            _raise_for(response, "generation")
            async with contextlib.aclosing(read_lines(response, MAX_LINE)) as lines:
                async for line in lines:
                    if not line.strip():
                        continue
                    try:
                        data = json.loads(line)
                    except ValueError:
                        raise EngineError("engine sent a line that is not JSON", True) from None
                    if data.get("error"):
                        raise EngineError("engine reported an error mid-stream", False)
                    if job.kind == "completion":
                        text = data.get("response") or ""
                        if text:
                            yield Delta(content=text)
                    else:
                        message = data.get("message") or {}
                        calls = []
                        for call in message.get("tool_calls") or []:
                            fn = call.get("function") or {}
                            args = fn.get("arguments", {})
                            calls.append(
                                {
                                    "index": tool_index,
                                    "id": "call_" + secrets.token_hex(12),
                                    "type": "function",
                                    "function": {
                                        "name": fn.get("name", ""),
                                        "arguments": args
                                        if isinstance(args, str)
                                        else json.dumps(args),
                                    },
                                }
                            )
                            tool_index += 1
                        delta = Delta(
                            content=_str_or_none(message.get("content")),
                            tool_calls=calls or None,
                            reasoning=_str_or_none(message.get("thinking")),
                        )
                        if not delta.is_empty():
                            yield delta
                    if data.get("done"):
                        reason = data.get("done_reason") or "stop"
                        if tool_index and reason == "stop":
                            reason = "tool_calls"
                        usage = Usage(
                            prompt_tokens=_count(data.get("prompt_eval_count")),
                            completion_tokens=_count(data.get("eval_count")),
                        )
                        yield Finish(
                            reason if reason in ("stop", "length", "tool_calls") else "stop", usage
                        )
                        await drain(lines, REST_OF_BODY_SECONDS)
                        return
        raise EngineError("engine closed the stream before it was done", True)


def _tool_call_delta(call: Any, index: int) -> dict[str, Any] | None:
    """An engine's tool-call delta in the exact shape the protocol accepts."""
    if not isinstance(call, dict):
        return None
    index = call["index"] if isinstance(call.get("index"), int) else index
    if isinstance(index, bool) or not 0 <= index < MAX_TOOL_CALLS:
        return None  # not a call the protocol can carry
    out: dict[str, Any] = {"index": index}
    for name in ("id", "type"):
        if isinstance(call.get(name), str):
            out[name] = call[name]
    fn = call.get("function")
    if isinstance(fn, dict):
        function: dict[str, str] = {}
        if isinstance(fn.get("name"), str):
            function["name"] = fn["name"]
        args = fn.get("arguments")
        if args is not None:
            function["arguments"] = args if isinstance(args, str) else json.dumps(args)
        out["function"] = function
    return out


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int | None:
    """An engine's token count, or None when it is not one the protocol can carry."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


@attrs.define(eq=False)
class OpenAIEngine:
    """Any OpenAI-compatible server: llama.cpp, vLLM, LM Studio, Ollama's ``/v1``."""

    url: str
    client: httpx.AsyncClient
    api_key: str = ""

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def list_models(self) -> list[ModelInfo]:
        response = await self.client.get(f"{self.url}/v1/models", headers=self._headers())
        _raise_for(response, "listing models")
        return [
            ModelInfo(
                name=str(m["id"]),
                context_length=_openai_context(m),
                # The API does not say; embedding models say so in their names.
                capabilities=["embedding"] if "embed" in str(m["id"]).lower() else [],
            )
            for m in response.json().get("data", [])
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        ]

    async def embed(self, job: Job) -> Embeddings:
        """``/v1/embeddings``: text or token arrays, asked as floats (packed here)."""
        request = job.request
        inputs = request.get("input")
        if not isinstance(inputs, list):
            raise EngineError("an embedding job's input is a list", False)
        body: dict[str, Any] = {"model": job.model, "input": inputs, "encoding_format": "float"}
        if request.get("dimensions") is not None:
            body["dimensions"] = request["dimensions"]
        response = await self.client.post(
            f"{self.url}/v1/embeddings", json=body, headers=self._headers()
        )
        _raise_for(response, "embedding")
        data = response.json()
        found = data.get("data") if isinstance(data, dict) else None
        if not isinstance(found, list) or len(found) != len(inputs):
            raise EngineError("the engine's answer holds no embedding per input", True)
        try:
            ordered = sorted(found, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
            vectors = [
                pack_vector(d.get("embedding") if isinstance(d, dict) else None) for d in ordered
            ]
        except (ValueError, TypeError) as exc:
            raise EngineError(f"the engine's embedding is malformed: {exc}", True) from None
        usage = data.get("usage") if isinstance(data, dict) else None
        count = _positive_int(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        return Embeddings(vectors, None if count is None else Usage(count, 0))

    def body(self, job: Job) -> tuple[str, dict[str, Any]]:
        body = dict(job.request)
        body["model"] = job.model
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        limit = body.pop("max_completion_tokens", None) or body.get("max_tokens")
        if limit is not None:
            # Some servers ignore max_completion_tokens; every one honours max_tokens.
            body["max_tokens"] = limit
        body.pop("n", None)
        think = body.pop("think", None)
        if isinstance(think, bool):
            # llama.cpp and vLLM switch a model's thinking through its chat template.
            body["chat_template_kwargs"] = {"enable_thinking": think}
        elif isinstance(think, str) and "reasoning_effort" not in body:
            body["reasoning_effort"] = think
        path = "/v1/completions" if job.kind == "completion" else "/v1/chat/completions"
        return path, body

    def serve(self, job: Job) -> AsyncIterator[Event]:
        return _bounded(self._serve(job))

    async def _serve(self, job: Job) -> AsyncGenerator[Event, None]:
        if job.kind == "embedding":
            yield await self.embed(job)
            return
        path, body = self.body(job)
        counted = 0
        finish: str | None = None
        usage: Usage | None = None
        async with self.client.stream(
            "POST", f"{self.url}{path}", json=body, headers=self._headers()
        ) as response:
            _raise_for(response, "generation")
            async with contextlib.aclosing(read_lines(response, MAX_LINE)) as lines:
                async for line in lines:
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        data = json.loads(payload)
                    except ValueError:
                        raise EngineError("engine sent an event that is not JSON", True) from None
                    if not isinstance(data, dict):
                        continue
                    if data.get("error"):
                        raise EngineError("engine reported an error mid-stream", False)
                    if isinstance(data.get("usage"), dict):
                        usage = Usage(
                            prompt_tokens=_count(data["usage"].get("prompt_tokens")),
                            completion_tokens=_count(data["usage"].get("completion_tokens")),
                        )
                    for choice in data.get("choices") or []:
                        if job.kind == "completion":
                            text = choice.get("text") or ""
                            delta = Delta(content=text) if text else None
                        else:
                            d = choice.get("delta") or {}
                            raw = d.get("tool_calls")
                            calls = [
                                call
                                for i, item in enumerate(raw if isinstance(raw, list) else [])
                                if (call := _tool_call_delta(item, i)) is not None
                            ]
                            delta = Delta(
                                content=_str_or_none(d.get("content")),
                                tool_calls=calls or None,
                                reasoning=_str_or_none(d.get("reasoning_content"))
                                or _str_or_none(d.get("reasoning")),
                                refusal=_str_or_none(d.get("refusal")),
                            )
                            if delta.is_empty():
                                delta = None
                        if delta is not None:
                            counted += 1
                            yield delta
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
                if finish is None:
                    raise EngineError("engine closed the stream before it was done", True)
                if usage is None or usage.completion_tokens is None:
                    # No usage chunk (llama-cpp-python ignores include_usage): report what we
                    # streamed.
                    usage = Usage(
                        prompt_tokens=usage.prompt_tokens if usage else None,
                        completion_tokens=counted,
                    )
                yield Finish(finish, usage)
                await drain(lines, REST_OF_BODY_SECONDS)
