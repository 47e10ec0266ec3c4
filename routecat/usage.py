"""Usage is verified, not trusted: sound upper bounds from what the gateway observed.

Invariant: the tokens billed for a job never exceed what a byte-level tokenizer could
have produced from the text the gateway actually saw. For a byte-level BPE, every
token is at least one byte, so

- completion <= min(applied max_tokens + 1, UTF-8 bytes delivered + 1)
  (the +1 is an end-of-sequence token that some engines count);
- prompt <= UTF-8 bytes of all message content and names + 8 per message + 16
  (8 per message covers role and template markers, 16 the prompt's frame).

A node that reports nothing is billed an *estimate* (bytes over the network's median
bytes per token for that model, else bytes / 4), never the bound.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from owlrun.protocol import Usage

DEFAULT_BYTES_PER_TOKEN = 4.0


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
            total += len(repr(part).encode())
    return total


def prompt_bound(kind: str, request: dict[str, Any]) -> int:
    if kind == "completion":
        prompt = request.get("prompt", "")
        text = prompt if isinstance(prompt, str) else "".join(prompt)
        return len(text.encode()) + len(str(request.get("suffix") or "").encode()) + 16
    total = 16
    for message in request.get("messages", []):
        total += 8 + _text_bytes(message.get("content"))
        total += len(str(message.get("name") or "").encode())
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            total += len(str(fn.get("name", "")).encode()) + len(
                str(fn.get("arguments", "")).encode()
            )
        total += len(str(message.get("tool_call_id") or "").encode())
    tools = request.get("tools")
    if tools:
        # Tool definitions are rendered into the prompt by the chat template.
        import json

        total += len(json.dumps(tools).encode())
    return total


def completion_bound(max_tokens: int, delivered_bytes: int) -> int:
    return min(max_tokens + 1, delivered_bytes + 1)


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
