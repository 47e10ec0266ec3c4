"""A streamed token's SSE event is built from bytes made once per stream: it must say
exactly what the whole chunk object says, whatever the job, the model and the delta."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from owlrun.protocol import Delta
from routecat.api.completions import _Shape, _sse

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
deltas = st.builds(
    Delta,
    content=st.none() | st.text(),
    tool_calls=st.none()
    | st.lists(st.dictionaries(st.text(), json_values, max_size=3), max_size=2),
    reasoning=st.none() | st.text(),
    refusal=st.none() | st.text(),
)


def shape(kind: str, job_id: str, model: str) -> _Shape:
    handle: Any = SimpleNamespace(spec=SimpleNamespace(job_id=job_id, model=model))
    return _Shape(handle, kind)  # type: ignore[arg-type]


@given(
    kind=st.sampled_from(["chat", "completion"]),
    job_id=st.text(),
    model=st.text(),
    with_usage=st.booleans(),
    stream=st.lists(deltas, min_size=1, max_size=4),
)
def test_a_token_event_says_what_its_chunk_says(
    kind: str, job_id: str, model: str, with_usage: bool, stream: list[Delta]
) -> None:
    fast, slow = shape(kind, job_id, model), shape(kind, job_id, model)
    slow.created = fast.created
    for delta in stream:
        event = fast.delta_event(delta, with_usage)
        chunk = slow.chunk(delta)
        if with_usage:
            chunk["usage"] = None
        assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
        assert event.count(b"\n") == 2  # one SSE event, whatever the text holds
        assert json.loads(event[len(b"data: ") :]) == chunk
        assert json.loads(_sse(chunk)[len(b"data: ") :]) == chunk
    # The role is announced once, on the first chunk, as before.
    assert fast.role_sent == slow.role_sent
