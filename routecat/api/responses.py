"""``POST /v1/responses``: the OpenAI Responses API for text and function tools.

A Responses request is translated into the chat job it means (``instructions`` and
input items to messages, function tools, ``max_output_tokens``, ``text.format``,
``reasoning.effort``) and served by the same admission, scheduler, billing and audit;
the node's deltas are rebuilt into output items (reasoning, message, function calls)
and, when streaming, into the documented event sequence: every event has its
``sequence_number``, the stream ends with ``response.completed`` (or
``response.incomplete`` / ``response.failed``) and no ``[DONE]``.

Stateless on purpose: ``previous_response_id``, ``conversation``, ``background`` and
item references answer 400 (nothing is stored: send the whole conversation as input);
``store`` is accepted and answered ``false``.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from typing import Any

from quart import Response, request

from owlrun.protocol import Delta
from routecat import errors
from routecat.api.completions import (
    SSE_HEADERS,
    free_header,
    sse_events,
    start_job,
    wire_request,
)
from routecat.api.errors import error_body
from routecat.api.http import App, json_response, read_json
from routecat.api.schema import ChatCompletionRequest, parse_request
from routecat.gateway import Gateway
from routecat.network.jobs import Bill, Event, Failure, Final, JobSpec
from routecat.network.measure import measure_prompt

_ALPHABET = string.ascii_letters + string.digits
ROLES = ("user", "system", "developer", "assistant")


def _id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _bad(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param)


def _content(value: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad("content is a string or an array of content parts", where)
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise _bad("a text part needs a string 'text'", f"{where}[{i}].text")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise _bad("an input_image part needs an 'image_url'", f"{where}[{i}]")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise _bad(f"content parts of type {kind!r} are not supported", f"{where}[{i}]")
    return parts


def _messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = data.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions is a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = data.get("input")
    if isinstance(items, str):
        if not items:
            raise _bad("input must not be empty", "input")
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("input is a string or a non-empty array of items", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad("an input item is an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise _bad(f"role must be one of {', '.join(ROLES)}", f"{where}.role")
            messages.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not all(isinstance(x, str) for x in (call_id, name, arguments)):
                raise _bad("a function_call needs string call_id, name and arguments", where)
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad("a function_call_output needs a string call_id", f"{where}.call_id")
            text = output if isinstance(output, str) else json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            continue  # earlier reasoning is the model's own: not sent back to it
        elif kind == "item_reference":
            raise _bad("items are not stored here: send the item itself", where)
        else:
            raise _bad(f"input items of type {kind!r} are not supported", f"{where}.type")
    return messages


def _tools(data: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = data.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("tools is an array", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _bad("only function tools are supported", f"tools[{i}].type")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _bad("a function tool needs a name", f"tools[{i}].name")
        fn = {"name": tool["name"]}
        for field in ("description", "parameters", "strict"):
            if tool.get(field) is not None:
                fn[field] = tool[field]
        out.append({"type": "function", "function": fn})
    return out


def to_chat(data: dict[str, Any]) -> dict[str, Any]:
    """The chat request a Responses request means (400 for what cannot be served)."""
    for field in ("previous_response_id", "conversation"):
        if data.get(field) is not None:
            raise _bad(
                f"{field} is not supported: responses are not stored here;"
                " send the whole conversation as input",
                field,
            )
    if data.get("background"):
        raise _bad("background responses are not supported", "background")
    chat: dict[str, Any] = {"model": data.get("model"), "messages": _messages(data)}
    tools = _tools(data)
    if tools is not None:
        chat["tools"] = tools
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    for ours, theirs in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
    ):
        if data.get(ours) is not None:
            chat[theirs] = data[ours]
    fmt = (data.get("text") or {}).get("format") if isinstance(data.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    reasoning = data.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    return chat


class ResponseBuilder:
    """Rebuilds a chat job's deltas into Responses output items and stream events."""

    def __init__(self, response_id: str, data: dict[str, Any], chat: dict[str, Any]) -> None:
        self.id = response_id
        self.created = int(time.time())
        self.data = data
        self.chat = chat
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its item
        self.reasoning_bytes = 0
        self.text_bytes = 0
        self.sequence = 0

    def response(self, status: str, **extra: Any) -> dict[str, Any]:
        data = self.data
        fmt = (data.get("text") or {}).get("format") if isinstance(data.get("text"), dict) else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": data.get("instructions"),
            "max_output_tokens": data.get("max_output_tokens"),
            "model": self.chat["model"],
            "output": self.output if status != "in_progress" else [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": (data.get("reasoning") or {}).get("effort"), "summary": None},
            "store": False,
            "temperature": data.get("temperature"),
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": data.get("tool_choice", "auto"),
            "tools": data.get("tools") or [],
            "top_p": data.get("top_p"),
            "truncation": "disabled",
            "usage": None,
            "user": None,
            "metadata": data.get("metadata") or {},
            **extra,
        }

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response("in_progress")
        return [
            {"type": "response.created", "response": snapshot},
            {"type": "response.in_progress", "response": snapshot},
        ]

    def _open(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        item["_index"] = len(self.output)
        self.output.append(item)
        self.open = item
        shown = {k: v for k, v in item.items() if not k.startswith("_")}
        events.append(
            {"type": "response.output_item.added", "output_index": item["_index"], "item": shown}
        )
        if item["type"] == "message":
            events.append(
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": item["_index"],
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }
            )
        return events

    def _close(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": item["_index"]}
        events: list[dict[str, Any]] = []
        if item["type"] == "reasoning":
            text = item.pop("_text")
            item["content"] = [{"type": "reasoning_text", "text": text}]
            events.append(
                {"type": "response.reasoning_text.done", **where, "content_index": 0, "text": text}
            )
        elif item["type"] == "message":
            text = item.pop("_text")
            part = {"type": "output_text", "text": text, "annotations": []}
            item["content"] = [part]
            item["status"] = "completed"
            events.append(
                {
                    "type": "response.output_text.done",
                    **where,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                }
            )
            events.append(
                {"type": "response.content_part.done", **where, "content_index": 0, "part": part}
            )
        else:
            item["status"] = "completed"
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    **where,
                    "name": item["name"],
                    "arguments": item["arguments"],
                }
            )
        item.pop("_index")
        events.append(
            {
                "type": "response.output_item.done",
                "output_index": where["output_index"],
                "item": item,
            }
        )
        return events

    def feed(self, delta: Delta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if delta.reasoning:
            self.reasoning_bytes += len(delta.reasoning.encode())
            if self.open is None or self.open["type"] != "reasoning":
                events += self._open(
                    {"type": "reasoning", "id": _id("rs_"), "summary": [], "_text": ""}
                )
            assert self.open is not None
            self.open["_text"] += delta.reasoning
            events.append(
                {
                    "type": "response.reasoning_text.delta",
                    "item_id": self.open["id"],
                    "output_index": self.open["_index"],
                    "content_index": 0,
                    "delta": delta.reasoning,
                }
            )
        text = (delta.content or "") + (delta.refusal or "")
        if text:
            self.text_bytes += len(text.encode())
            if self.open is None or self.open["type"] != "message":
                events += self._open(
                    {
                        "type": "message",
                        "id": _id("msg_"),
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                        "_text": "",
                    }
                )
            assert self.open is not None
            self.open["_text"] += text
            events.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": self.open["id"],
                    "output_index": self.open["_index"],
                    "content_index": 0,
                    "delta": text,
                    "logprobs": [],
                }
            )
        for call in delta.tool_calls or ():
            fn = call.get("function") or {}
            item = self.calls.get(call["index"])
            if item is None:
                item = {
                    "type": "function_call",
                    "id": _id("fc_"),
                    "call_id": call.get("id") or _id("call_"),
                    "name": fn.get("name") or "",
                    "arguments": "",
                    "status": "in_progress",
                }
                self.calls[call["index"]] = item
                events += self._open(item)
            elif fn.get("name"):
                item["name"] += fn["name"]
            if fn.get("arguments"):
                self.text_bytes += len(fn["arguments"].encode())
                item["arguments"] += fn["arguments"]
                events.append(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item["id"],
                        "output_index": item.get("_index", len(self.output) - 1),
                        "delta": fn["arguments"],
                    }
                )
        return events

    def usage(self, bill: Bill) -> dict[str, Any]:
        total = self.reasoning_bytes + self.text_bytes
        # The node counts completion tokens as one number: the reasoning share is
        # estimated from the bytes of reasoning among all output bytes.
        reasoning = round(bill.completion_tokens * self.reasoning_bytes / total) if total else 0
        return {
            "input_tokens": bill.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": bill.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": bill.prompt_tokens + bill.completion_tokens,
            "cost_msat": bill.cost_msat,
        }

    def finish(self, final: Final) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        events = self._close()
        if final.finish_reason == "length":
            status, kind = "incomplete", "response.incomplete"
            extra: dict[str, Any] = {"incomplete_details": {"reason": "max_output_tokens"}}
        else:
            status, kind, extra = "completed", "response.completed", {}
        done = self.response(status, usage=self.usage(final.bill), **extra)
        events.append({"type": kind, "response": done})
        return events, done

    def fail(self, error: errors.RequestError) -> list[dict[str, Any]]:
        events = self._close()
        body = error_body(error)["error"]
        failed = self.response("failed", error={"code": body["code"], "message": body["message"]})
        events.append({"type": "response.failed", "response": failed})
        return events

    def sse(self, events: list[dict[str, Any]]) -> bytes:
        out = []
        for event in events:
            event["sequence_number"] = self.sequence
            self.sequence += 1
            data = json.dumps(event, separators=(",", ":"))
            out.append(f"event: {event['type']}\ndata: {data}\n\n")
        return "".join(out).encode()


def register_responses(app: App, gw: Gateway) -> None:
    @app.post("/v1/responses")
    async def responses() -> Response:
        key = await gw.keys.authenticate(request.headers.get("Authorization"))
        await gw.request_limit.acquire(f"key:{key.id}")
        data = await read_json()
        if not isinstance(data, dict):
            raise errors.InvalidRequest("request body must be a JSON object")
        chat = to_chat(data)
        body = parse_request(ChatCompletionRequest, chat)
        gw.scheduler.check_model(body.model)
        max_tokens = gw.admissions.applied_max_tokens(
            body.model, body.requested_max_tokens, gw.registry.context_length(body.model)
        )
        wire = wire_request(body, max_tokens)
        prompt = measure_prompt("chat", wire)
        response_id = _id("resp_")
        spec = JobSpec(
            job_id=response_id,
            kind="chat",
            model=body.model,
            request=wire,
            stream=body.stream,
            key_id=key.id,
            max_tokens=max_tokens,
            prompt_bound=prompt.bound,
            requested_max_tokens=body.requested_max_tokens,
            prompt_bytes=prompt.bytes,
        )
        handle = await start_job(gw, spec)
        builder = ResponseBuilder(response_id, data, chat)
        if body.stream:
            started = False

            def render(event: Event) -> tuple[bytes, bool]:
                nonlocal started
                events = [] if started else builder.start()
                started = True
                if isinstance(event, Delta):
                    return builder.sse(events + builder.feed(event)), False
                if isinstance(event, Final):
                    return builder.sse(events + builder.finish(event)[0]), True
                return builder.sse(events + builder.fail(event.error)), True

            def stopped() -> bytes:
                shutdown = errors.ServiceUnavailable("the gateway stopped the job", retry_after=5)
                return builder.sse(([] if started else builder.start()) + builder.fail(shutdown))

            response = Response(
                sse_events(handle, render, stopped, gw.config.keepalive_interval),
                status=200,
                content_type="text/event-stream",
                headers={**SSE_HEADERS, **free_header(handle)},
            )
            response.timeout = None
            return response
        async for event in handle.events:
            if isinstance(event, Delta):
                builder.feed(event)
            elif isinstance(event, Final):
                _, done = builder.finish(event)
                headers = {"X-RouteCat-Cost-Msat": str(event.bill.cost_msat), **free_header(handle)}
                return json_response(done, headers=headers)
            elif isinstance(event, Failure):
                raise event.error
        raise errors.ServiceUnavailable("the gateway stopped the job", retry_after=5)
