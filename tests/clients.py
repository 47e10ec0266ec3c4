"""What a client does against a running gateway: chat bodies, reading SSE streams,
waiting for a condition."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

MODEL = "llama3.1:8b"


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


async def read_sse(response: httpx.Response) -> tuple[list[dict[str, Any]], bool, list[str]]:
    """Events, whether [DONE] came, and comment lines."""
    events: list[dict[str, Any]] = []
    comments: list[str] = []
    done = False
    async for line in response.aiter_lines():
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("data: "):
            payload = line[6:]
            if payload == "[DONE]":
                done = True
            else:
                events.append(json.loads(payload))
    return events, done, comments


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or c.get("text") or ""
        for e in events
        for c in e.get("choices", [])
    )


async def wait_for(predicate: Any, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def topup(c: httpx.AsyncClient, sats: int) -> dict[str, Any]:
    r = await c.post("/v1/auth/topup", json={"amount_sats": sats})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def ask_both_ways(client: Any, model: str, messages: list[dict[str, Any]]) -> tuple[Any, str]:
    """One greedy question to an ``openai.AsyncOpenAI`` client, asked twice: the
    non-stream response, and the text of the same question streamed."""
    r = await client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=20
    )
    stream = await client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=20, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    return r, text
