"""A job's values: what the API layer asks for, what the scheduler observed, the bill.

Invariant: these are plain frozen values; everything that crosses from the API layer
to the network and from the network to the money layer is one of them.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import attrs

from owlrun.protocol import Delta, Usage
from routecat.errors import RequestError

_ALPHABET = string.ascii_letters + string.digits

JobKind = Literal["chat", "completion", "embedding"]
# How a job ended (DESIGN section 3's table bills by it).
Outcome = Literal["done", "client_gone", "node_failed", "timeout", "shutdown", "no_capacity"]


def mint_job_id(kind: JobKind) -> str:
    prefix = {"chat": "chatcmpl-", "completion": "cmpl-", "embedding": "emb-"}[kind]
    # 29 base-62 digits of a 173-bit random number: one system call, not 29.
    n = secrets.randbits(173)
    digits = []
    for _ in range(29):
        n, digit = divmod(n, 62)
        digits.append(_ALPHABET[digit])
    return prefix + "".join(digits)


@attrs.frozen
class JobSpec:
    """Everything the scheduler and the completion hook need to know about a request."""

    job_id: str
    kind: JobKind
    model: str
    request: dict[str, Any]  # the body sent to the node, max_tokens applied
    stream: bool
    key_id: int
    max_tokens: int
    prompt_bound: int
    requested_max_tokens: int | None = None  # what the client asked for, if anything
    prompt_bytes: int = 0  # B_in: the prompt's own bytes, without the bound's allowances
    admission: Any = None  # the money layer's admission (reservation, free slot, rate)


@attrs.frozen
class JobResult:
    """What a finished job observed; the completion hook's input."""

    spec: JobSpec
    outcome: Outcome
    node_id: str | None
    finish_reason: str | None
    reported: Usage | None
    delivered_chunks: int
    delivered_bytes: int
    attempts: int
    failed_nodes: tuple[str, ...]
    started_at: float  # wall clock
    duration: float
    ttft: float | None
    # The job was sent to a node that did not refuse it (DESIGN section 3's "dispatched").
    dispatched: bool = False
    tool_calls: int = 0  # distinct tool calls delivered (each gets a wrapper allowance)
    violation: str = ""  # the node's done frame broke the protocol (usage not trusted)

    @property
    def delivered(self) -> bool:
        return self.delivered_chunks > 0


@attrs.frozen
class Bill:
    """What the hook decided: the usage shown to the client is the usage billed."""

    prompt_tokens: int
    completion_tokens: int
    cost_msat: int = 0


@attrs.frozen
class Final:
    finish_reason: str
    bill: Bill
    # An embedding job's result: one base64 float32 vector per input, as the node sent it.
    vectors: tuple[str, ...] = ()


@attrs.frozen
class Failure:
    error: RequestError


Event = Delta | Final | Failure
CompletionHook = Callable[[JobResult], Awaitable[Bill]]
