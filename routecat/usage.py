"""Usage is verified, not trusted: sound upper bounds from what the gateway observed.

Invariant: the tokens billed for a job never exceed what a byte-level tokenizer could
have produced from the text the gateway actually saw. For a byte-level BPE, every
token is at least one byte, so (DESIGN section 3, ``docs/billing.md``)

- ``completion <= min(applied max_tokens + 1, B_out + W * tool_calls + 1)``, where
  ``B_out`` is the UTF-8 bytes of everything delivered (content, reasoning, tool-call
  names and arguments, refusals) and ``W`` (``TOOL_CALL_ALLOWANCE``) covers the tokens
  a chat template wraps around each tool call; the +1 is an end-of-sequence token
  that some engines count;
- ``prompt <= B_in + 8 * messages + T``, where ``B_in`` is the UTF-8 bytes of every
  message's content, name and tool calls plus the JSON of ``tools`` and
  ``response_format``, 8 per message covers role and template markers, and ``T``
  (``TEMPLATE_ALLOWANCE``) what chat templates inject (a default system prompt).

A node that reports nothing is billed an *estimate* (bytes over the network's median
bytes per token for that model, else bytes / 4), never the bound.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from owlrun.protocol import Delta, Usage

DEFAULT_BYTES_PER_TOKEN = 4.0
PER_MESSAGE_ALLOWANCE = 8
TEMPLATE_ALLOWANCE = 64
TOOL_CALL_ALLOWANCE = 32


def _text_bytes(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content.encode())
    total = 0
    for part in content:
        if part.get("type") == "text":
            total += len(str(part.get("text", "")).encode())
        else:
            # Images and audio are tokenised by the model's own encoder: bound by their bytes.
            total += len(json.dumps(part).encode())
    return total


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value).encode()) if value else 0


@attrs.frozen
class Prompt:
    """What the gateway knows of a prompt before it is served."""

    bytes: int  # B_in
    messages: int

    @property
    def bound(self) -> int:
        return self.bytes + PER_MESSAGE_ALLOWANCE * self.messages + TEMPLATE_ALLOWANCE


def measure_prompt(kind: str, request: dict[str, Any]) -> Prompt:
    if kind == "completion":
        prompt = request.get("prompt", "")
        text = prompt if isinstance(prompt, str) else "".join(prompt)
        return Prompt(len(text.encode()) + len(str(request.get("suffix") or "").encode()), 1)
    total = 0
    messages = request.get("messages", [])
    for message in messages:
        total += _text_bytes(message.get("content"))
        total += len(str(message.get("name") or "").encode())
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            total += len(str(fn.get("name", "")).encode()) + len(
                str(fn.get("arguments", "")).encode()
            )
        total += len(str(message.get("tool_call_id") or "").encode())
    # Tool definitions and a JSON schema are rendered into the prompt by the template.
    total += _json_bytes(request.get("tools")) + _json_bytes(request.get("response_format"))
    return Prompt(total, len(messages))


def prompt_bound(kind: str, request: dict[str, Any]) -> int:
    return measure_prompt(kind, request).bound


def delta_bytes(delta: Delta) -> int:
    """``B_out`` of one delta: content, reasoning, refusal, tool-call names and arguments."""
    total = 0
    for text in (delta.content, delta.reasoning, delta.refusal):
        if text:
            total += len(text.encode())
    for call in delta.tool_calls or ():
        fn = call.get("function") or {}
        for value in (fn.get("name"), fn.get("arguments")):
            if value:
                total += len(str(value).encode())
    return total


def completion_bound(max_tokens: int, delivered_bytes: int, tool_calls: int = 0) -> int:
    return min(max_tokens + 1, delivered_bytes + TOOL_CALL_ALLOWANCE * tool_calls + 1)


@attrs.frozen
class Verified:
    prompt_tokens: int
    completion_tokens: int
    reported: bool  # the node reported both counts
    capped: bool  # a reported count was over its bound


def verify(
    reported: Usage | None,
    *,
    prompt_max: int,
    completion_max: int,
    prompt_bytes: int,
    delivered_bytes: int,
    bytes_per_token: float | None,
) -> Verified:
    """What to bill: ``min(reported, bound)``, or an estimate for what is missing."""
    bpt = bytes_per_token if bytes_per_token and bytes_per_token > 0 else DEFAULT_BYTES_PER_TOKEN
    rp = reported.prompt_tokens if reported else None
    rc = reported.completion_tokens if reported else None
    capped = False
    if rp is None:
        prompt = min(prompt_max, math.ceil(prompt_bytes / bpt))
    else:
        capped |= rp > prompt_max
        prompt = min(rp, prompt_max)
    if rc is None:
        completion = min(completion_max, math.ceil(delivered_bytes / bpt))
    else:
        capped |= rc > completion_max
        completion = min(rc, completion_max)
    return Verified(prompt, completion, rp is not None and rc is not None, capped)
