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

import math

import attrs

from owlrun.protocol import Usage
from routecat.network.measure import DEFAULT_BYTES_PER_TOKEN, TOOL_CALL_ALLOWANCE


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
