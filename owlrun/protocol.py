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

from owlrun.errors import ProtocolError as ProtocolError  # re-exported: the protocol raises it

PROTOCOL_VERSION = 4
# From this version the gateway does not answer heartbeats: the agent learns that the
# gateway is alive from any frame, or else from a websocket ping's pong (answered by
# the gateway's server, below its application), sent with a heartbeat after five quiet
# intervals (``owlrun.agent.ping_after``).
QUIET_GATEWAY_PROTOCOL = 4
# The heartbeat intervals (seconds) both ends accept: a welcome outside them is a
# protocol violation (the agent would spin on 0, or stop on a negative sleep), an
# operator's setting outside them a configuration error.
HEARTBEAT_INTERVAL_RANGE = (0.1, 3600.0)
# The oldest version a gateway still accepts; a version-1 agent sends no reasoning or
# refusal deltas and no ``cancelled`` acknowledgements, and is sent nothing it lacks.
MIN_PROTOCOL_VERSION = 1
WS_PATH = "/v1/nodes/ws"
NODE_HEADER = "X-Owlrun-Node"
SECRET_HEADER = "X-Owlrun-Secret"


# -- strict primitives (shared with the gateway's OpenAI schema) ------------------------


def _strict_str(value: Any, _t: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _strict_int(value: Any, _t: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


# Every integer on the node wire is a count or an amount: never negative, and small
# enough for JSON peers and SQLite alike. Token counts have a tighter bound.
MAX_WIRE_INT = 2**53
MAX_TOKENS = 2**31


def _wire_int(value: Any, _t: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    if not 0 <= value <= MAX_WIRE_INT:
        raise ValueError(f"expected an integer from 0 to 2^53, got {value}")
    return value


def token_count(value: Any) -> int | None:
    """A token count from a node: None, or an integer in ``0..2^31``; anything else
    (negative, fractional, huge, a string, a boolean, NaN) raises ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ValueError(f"a token count must be an integer from 0 to 2^31, got {value!r:.40}")
    return value


def _strict_float(value: Any, _t: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    result = float(value)
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return result


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


def strict_converter(*, wire_ints: bool = False) -> cattrs.Converter:
    """A converter that never coerces: ``"5"`` is not an int, ``true`` is not a number,
    NaN is not a number. ``wire_ints``: every integer must lie in ``0..2^53``."""
    converter = cattrs.Converter(forbid_extra_keys=False)
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(int, _wire_int if wire_ints else _strict_int)
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
    # What the model does, when the engine says: "embedding" for embedding models.
    capabilities: list[str] = attrs.Factory(list)


@attrs.frozen
class Hardware:
    summary: str = ""
    cpu_count: int | None = None
    memory_mb: int | None = None
    gpus: list[str] = attrs.Factory(list)


@attrs.frozen
class Usage:
    """What a node says a job used. Each count is None or an integer in ``0..2^31``;
    the constructor refuses anything else, so no invalid count exists past decoding."""

    prompt_tokens: int | None = attrs.field(default=None, converter=token_count)
    completion_tokens: int | None = attrs.field(default=None, converter=token_count)


@attrs.frozen
class Delta:
    """One step of output: text (``content``), reasoning (``reasoning``, version 2), a
    refusal (``refusal``, version 2) and/or OpenAI-shaped tool-call deltas."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning: str | None = None
    refusal: str | None = None

    def is_empty(self) -> bool:
        return not (self.content or self.tool_calls or self.reasoning or self.refusal)


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


# What a job asks of the engine; "embedding" needs protocol 3 on both ends.
JobKind = Literal["chat", "completion", "embedding"]
EMBEDDING_PROTOCOL = 3
MAX_EMBEDDING_INPUTS = 2048


@attrs.frozen
class Job:
    """Gateway -> node: serve this request. ``request`` is the OpenAI body, inline."""

    type: ClassVar[str] = "job"
    job_id: str
    kind: JobKind
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


FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")


@attrs.frozen
class Done:
    """Node -> gateway: the job ended. ``violation`` is never on the wire: the decoder
    sets it when the frame's ``usage`` or ``finish_reason`` was invalid, in which case
    ``usage`` is None (billed as if nothing was reported) and the node is penalised."""

    type: ClassVar[str] = "done"
    job_id: str
    finish_reason: str
    usage: Usage | None = None
    violation: str = attrs.field(default="", kw_only=True)


@attrs.frozen
class Embedded:
    """Node -> gateway (version 3): an embedding job's result, which ends the job.
    ``vectors`` holds one base64 string per input, in input order: the embedding as
    little-endian float32 (compact on the wire; the gateway decodes and checks it)."""

    type: ClassVar[str] = "embedded"
    job_id: str
    vectors: list[str]
    usage: Usage | None = None


@attrs.frozen
class Cancelled:
    """Node -> gateway (version 2): the node stopped this job after a ``cancel`` and
    will send nothing more for it. Frames it sent before are dropped quietly."""

    type: ClassVar[str] = "cancelled"
    job_id: str


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
    | Embedded
    | JobError
    | Cancel
    | Cancelled
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
        Embedded,
        JobError,
        Cancel,
        Cancelled,
        Drain,
        Earnings,
    )
}

converter = strict_converter(wire_ints=True)


def _structure_usage(value: Any, _t: Any) -> Usage:
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    return Usage(value.get("prompt_tokens"), value.get("completion_tokens"))


def _unstructure_done(done: Done) -> dict[str, Any]:
    usage = done.usage
    return {
        "job_id": done.job_id,
        "finish_reason": done.finish_reason,
        "usage": None
        if usage is None
        else {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
    }


converter.register_structure_hook(Usage, _structure_usage)
converter.register_unstructure_hook(Done, _unstructure_done)


def _literal_kind(value: Any, _t: Any) -> str:
    if value not in ("chat", "completion", "embedding"):
        raise TypeError("expected 'chat', 'completion' or 'embedding'")
    return str(value)


register_exact(converter, JobKind, _literal_kind)


def encode(message: Message) -> str:
    if isinstance(message, Chunk):  # the hot path: one per token
        return json.dumps(
            {"type": "chunk", "job_id": message.job_id, "delta": _delta_dict(message.delta)},
            separators=(",", ":"),
        )
    data = converter.unstructure(message)
    return json.dumps({"type": message.type, **data}, separators=(",", ":"))


def _delta_dict(delta: Delta) -> dict[str, Any]:
    out: dict[str, Any] = {"content": delta.content, "tool_calls": delta.tool_calls}
    if delta.reasoning is not None:
        out["reasoning"] = delta.reasoning
    if delta.refusal is not None:
        out["refusal"] = delta.refusal
    return out


MAX_BATCH = 256


MAX_TOOL_CALLS = 128


def _tool_call(call: Any) -> dict[str, Any]:
    """One OpenAI streaming tool-call delta, rebuilt from its known fields only
    (``index``, ``id``, ``type``, ``function.name``, ``function.arguments``), each of its
    own type: nothing else a node sends reaches a client."""
    if not isinstance(call, dict):
        raise ProtocolError("invalid tool call: expected an object")
    out: dict[str, Any] = {}
    index = call.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_TOOL_CALLS:
        raise ProtocolError(f"invalid tool call: index must be an integer below {MAX_TOOL_CALLS}")
    out["index"] = index
    _copy_strings(call, ("id", "type"), out, "")
    fn = call.get("function")
    if fn is not None:
        if not isinstance(fn, dict):
            raise ProtocolError("invalid tool call: function must be an object")
        out["function"] = _copy_strings(fn, ("name", "arguments"), {}, "function.")
    return out


def _copy_strings(
    source: dict[str, Any], names: tuple[str, ...], out: dict[str, Any], where: str
) -> dict[str, Any]:
    """Copy the named fields that are present into ``out``; each must be a string."""
    for name in names:
        value = source.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ProtocolError(f"invalid tool call: {where}{name} must be a string")
            out[name] = value
    return out


def _delta(delta: Any) -> Delta:
    if isinstance(delta, dict):
        content, calls = delta.get("content"), delta.get("tool_calls")
        reasoning, refusal = delta.get("reasoning"), delta.get("refusal")
        if (
            (content is None or isinstance(content, str))
            and (reasoning is None or isinstance(reasoning, str))
            and (refusal is None or isinstance(refusal, str))
        ):
            if calls is None:
                return Delta(content, None, reasoning, refusal)
            if isinstance(calls, list) and len(calls) <= MAX_TOOL_CALLS:
                return Delta(content, [_tool_call(c) for c in calls], reasoning, refusal)
    raise ProtocolError(
        "invalid delta: content, reasoning and refusal must be strings,"
        " tool_calls a list of tool-call objects"
    )


def _decode_done(data: dict[str, Any]) -> Done:
    """A ``done`` frame with a valid job id always decodes: invalid usage or an unknown
    finish reason become a recorded violation of that frame (billed as unreported)."""
    job_id = data.get("job_id")
    if not isinstance(job_id, str):
        raise ProtocolError("invalid done message: job_id must be a string")
    finish, raw = data.get("finish_reason"), data.get("usage")
    problems = []
    if finish not in FINISH_REASONS:
        problems.append(f"finish_reason {str(finish)[:40]!r} is not one of {FINISH_REASONS}")
        finish = "stop"
    usage: Usage | None = None
    if raw is not None:
        try:
            usage = _structure_usage(raw, Usage)
        except (TypeError, ValueError) as exc:
            problems.append(f"invalid usage: {exc}")
    return Done(job_id, str(finish), usage, violation="; ".join(problems))


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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("frame is not a JSON object")
    kind = data.pop("type", None)
    if kind == "chunk" or kind == "chunks":
        if (kind == "chunks") != ("deltas" in data):
            raise ProtocolError(f"invalid {kind} message")
        return _decode_chunk(data)
    if kind == "done":
        return _decode_done(data)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    try:
        message: Message = converter.structure(data, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:
        detail = "; ".join(cattrs.transform_error(exc)) if isinstance(exc, Exception) else ""
        raise ProtocolError(f"invalid {kind} message: {detail or exc}") from None
    return message
