"""What a job moved, in bytes: the prompt the client sent, the deltas a node delivered.

The bounds and estimates of ``routecat.money.usage`` are built from these counts
(DESIGN section 3, ``docs/billing.md``); the scheduler counts delivered bytes as it
relays them, and reputation compares nodes' reports with them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

import attrs

from owlrun.protocol import Delta

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


# Special tokens a tokenizer may add around each embedded text (BOS, EOS, separators).
PER_INPUT_ALLOWANCE = 4


@attrs.frozen
class EmbeddingInput:
    """What the gateway knows of an embedding request's input before it is served."""

    bytes: int  # UTF-8 bytes of the texts (for token arrays: the number of tokens)
    inputs: int
    tokens_given: bool  # token arrays: their length is the exact count

    @property
    def bound(self) -> int:
        """Input tokens at most: a byte-level tokenizer's token is at least one byte; a
        token array is its own count."""
        if self.tokens_given:
            return self.bytes
        return self.bytes + PER_INPUT_ALLOWANCE * self.inputs


def measure_embedding(inputs: list[str] | list[list[int]]) -> EmbeddingInput:
    if inputs and isinstance(inputs[0], list):
        return EmbeddingInput(sum(len(t) for t in inputs), len(inputs), True)
    return EmbeddingInput(sum(len(str(t).encode()) for t in inputs), len(inputs), False)


MAX_DIMENSIONS = 65536


def vector_problem(vectors: list[str] | tuple[str, ...], inputs: int) -> str | None:
    """Why a node's embedding result cannot be given to the client, or None: one
    vector per input, each base64 of little-endian float32, all of one dimension, every
    value finite."""
    if len(vectors) != inputs:
        return f"{len(vectors)} vectors for {inputs} inputs"
    dims = None
    for vector in vectors:
        try:
            raw = base64.b64decode(vector, validate=True)
        except (ValueError, binascii.Error):
            return "a vector is not base64"
        if not raw or len(raw) % 4 or len(raw) > 4 * MAX_DIMENSIONS:
            return "a vector is not float32 of a sane dimension"
        if dims is not None and len(raw) != dims:
            return "vectors of different dimensions"
        dims = len(raw)
        if not all(math.isfinite(v) for v in struct.unpack(f"<{len(raw) // 4}f", raw)):
            return "a vector holds a non-finite number"
    return None


def unpack_vector(vector: str) -> list[float]:
    raw = base64.b64decode(vector)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))
