"""The node wire protocol: versioned JSON messages with a ``type`` field. No I/O here.

Invariant: :func:`decode` returns a fully typed message of a known type or raises
``ProtocolError``; it never returns a half-checked dict. Both ends (the owlrun agent
and the gateway) use this one converter, so the two can never disagree about a field.

One websocket per node at ``WS_PATH`` on the gateway's port. The node's id and secret
travel in the ``X-Owlrun-Node`` and ``X-Owlrun-Secret`` headers of the upgrade
request, never in the URL. See ``docs/protocol.md`` for the sequences.
"""

from __future__ import annotations

import functools
import json
import operator
from typing import Any, ClassVar, Literal

import attrs
import cattrs

PROTOCOL_VERSION = 1
WS_PATH = "/v1/nodes/ws"
NODE_HEADER = "X-Owlrun-Node"
SECRET_HEADER = "X-Owlrun-Secret"


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


# -- strict primitives (shared with the gateway's OpenAI schema) ------------------------


def _strict_str(value: Any, _t: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _strict_int(value: Any, _t: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def _strict_float(value: Any, _t: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    return float(value)


def _strict_bool(value: Any, _t: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected a boolean")
    return value


def _object(value: Any, _t: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    return value


def _object_list(value: Any, _t: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise TypeError("expected an array of objects")
    return value


def register_exact(converter: cattrs.Converter, kind: Any, hook: Any) -> None:
    """Register ``hook`` for exactly ``kind`` (works for unions and generics too)."""
    converter.register_structure_hook_func(functools.partial(operator.eq, kind), hook)


def strict_converter() -> cattrs.Converter:
    """A converter that never coerces: ``"5"`` is not an int, ``true`` is not a number."""
    converter = cattrs.Converter(forbid_extra_keys=False)
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(bool, _strict_bool)
    register_exact(converter, dict[str, Any], _object)
    register_exact(converter, list[dict[str, Any]], _object_list)
    return converter


# -- values ------------------------------------------------------------------------------


@attrs.frozen
class ModelInfo:
    name: str
    family: str = ""
    parameter_size: str = ""
    quantization: str = ""
    context_length: int | None = None


@attrs.frozen
class Hardware:
    summary: str = ""
    cpu_count: int | None = None
    memory_mb: int | None = None
    gpus: list[str] = attrs.Factory(list)


@attrs.frozen
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@attrs.frozen
class Delta:
    """One step of output: text (``content``) and/or OpenAI-shaped tool-call deltas."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


# -- messages ----------------------------------------------------------------------------


@attrs.frozen
class Hello:
    """Node -> gateway, first frame."""

    type: ClassVar[str] = "hello"
    node_id: str
    agent_version: str
    protocol_version: int
    models: list[ModelInfo]
    max_concurrency: int
    hardware: Hardware = attrs.Factory(Hardware)
    name: str = ""
    payout_address: str = ""
    payout_threshold_sats: int | None = None


@attrs.frozen
class Welcome:
    """Gateway -> node: the hello was accepted."""

    type: ClassVar[str] = "welcome"
    node_id: str
    protocol_version: int
    heartbeat_interval: float
    payout_threshold_sats: int
    message: str = ""


@attrs.frozen
class Refused:
    """Gateway -> node: the hello was refused; the gateway closes the socket next."""

    type: ClassVar[str] = "refused"
    reason: str
    retryable: bool = False


@attrs.frozen
class ModelsUpdate:
    type: ClassVar[str] = "models"
    models: list[ModelInfo]


@attrs.frozen
class Heartbeat:
    """Either way, every ``heartbeat_interval`` seconds."""

    type: ClassVar[str] = "heartbeat"
    in_flight: int = 0


@attrs.frozen
class Job:
    """Gateway -> node: serve this request. ``request`` is the OpenAI body, inline."""

    type: ClassVar[str] = "job"
    job_id: str
    kind: Literal["chat", "completion"]
    model: str
    request: dict[str, Any]


@attrs.frozen
class Chunk:
    type: ClassVar[str] = "chunk"
    job_id: str
    delta: Delta


@attrs.frozen
class Chunks:
    """Several consecutive chunks of one job in one frame (a fast engine's tokens that
    were waiting together in the agent's send queue)."""

    type: ClassVar[str] = "chunks"
    job_id: str
    deltas: list[Delta]


@attrs.frozen
class Done:
    type: ClassVar[str] = "done"
    job_id: str
    finish_reason: str
    usage: Usage | None = None


@attrs.frozen
class JobError:
    type: ClassVar[str] = "error"
    job_id: str
    message: str
    retryable: bool = False


@attrs.frozen
class Cancel:
    """Gateway -> node: stop this job now (client gone, timeout, shutdown)."""

    type: ClassVar[str] = "cancel"
    job_id: str
    reason: str = ""


@attrs.frozen
class Drain:
    """Node -> gateway: send no new jobs (in-flight ones finish).
    Gateway -> node: the gateway is shutting down."""

    type: ClassVar[str] = "drain"
    reason: str = ""


@attrs.frozen
class Earnings:
    """Gateway -> node: the provider's money, in msat."""

    type: ClassVar[str] = "earnings"
    earned_msat: int
    held_msat: int
    payable_msat: int
    paid_msat: int
    pending_msat: int
    threshold_sats: int


Message = (
    Hello
    | Welcome
    | Refused
    | ModelsUpdate
    | Heartbeat
    | Job
    | Chunk
    | Chunks
    | Done
    | JobError
    | Cancel
    | Drain
    | Earnings
)

MESSAGE_TYPES: dict[str, type[Any]] = {
    cls.type: cls
    for cls in (
        Hello,
        Welcome,
        Refused,
        ModelsUpdate,
        Heartbeat,
        Job,
        Chunk,
        Chunks,
        Done,
        JobError,
        Cancel,
        Drain,
        Earnings,
    )
}

converter = strict_converter()


def _literal_kind(value: Any, _t: Any) -> str:
    if value not in ("chat", "completion"):
        raise TypeError("expected 'chat' or 'completion'")
    return str(value)


register_exact(converter, Literal["chat", "completion"], _literal_kind)


def encode(message: Message) -> str:
    if isinstance(message, Chunk):  # the hot path: one per token
        delta = {"content": message.delta.content, "tool_calls": message.delta.tool_calls}
        return json.dumps(
            {"type": "chunk", "job_id": message.job_id, "delta": delta}, separators=(",", ":")
        )
    data = converter.unstructure(message)
    return json.dumps({"type": message.type, **data}, separators=(",", ":"))


MAX_BATCH = 256


def _delta(delta: Any) -> Delta:
    if isinstance(delta, dict):
        content, calls = delta.get("content"), delta.get("tool_calls")
        if (content is None or isinstance(content, str)) and (
            calls is None or (isinstance(calls, list) and all(isinstance(c, dict) for c in calls))
        ):
            return Delta(content, calls)
    raise ProtocolError("invalid delta: content must be a string, tool_calls a list of objects")


def _decode_chunk(data: dict[str, Any]) -> Chunk | Chunks:
    """The hot path (one frame per token or batch), checked by hand as strictly as the
    converter would."""
    job_id = data.get("job_id")
    if not isinstance(job_id, str):
        raise ProtocolError("invalid chunk message: job_id must be a string")
    if "deltas" in data:
        deltas = data["deltas"]
        if not isinstance(deltas, list) or not 1 <= len(deltas) <= MAX_BATCH:
            raise ProtocolError(f"invalid chunks message: 1 to {MAX_BATCH} deltas")
        return Chunks(job_id, [_delta(d) for d in deltas])
    return Chunk(job_id, _delta(data.get("delta")))


def decode(frame: str | bytes) -> Message:
    try:
        data = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("frame is not a JSON object")
    kind = data.pop("type", None)
    if kind == "chunk" or kind == "chunks":
        if (kind == "chunks") != ("deltas" in data):
            raise ProtocolError(f"invalid {kind} message")
        return _decode_chunk(data)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    try:
        message: Message = converter.structure(data, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        detail = "; ".join(cattrs.transform_error(exc)) if isinstance(exc, Exception) else ""
        raise ProtocolError(f"invalid {kind} message: {detail or exc}") from None
    return message
