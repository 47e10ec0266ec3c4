"""An HTTP body read line by line, bounded: the agent reads its engine's answers this
way (NDJSON, SSE), and a gateway replica the jobs it forwarded to another
(``routecat.network.remote``).

Why not httpx's ``aiter_lines``: it holds a line whole however long it grows, so a
peer that never sends a newline grows it until the process runs out of memory; and it
splits lines where ``str.splitlines`` does, at U+2028, U+2029 and U+0085 too, which
JSON carries unescaped inside strings (llama.cpp writes them raw): an honest token
with one of them broke the line it came in. Here a line ends at ``\\n`` only (one ``\\r``
before it is dropped), as NDJSON and every engine's SSE end theirs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import httpx
import trio

from owlrun.errors import LineTooLong


async def read_lines(response: httpx.Response, limit: int) -> AsyncGenerator[str, None]:
    """The body's lines without their ends; ``LineTooLong`` once a line passes
    ``limit`` characters, before much more than that is held. A last line with no
    newline is yielded at the end of the body. Use it in ``contextlib.aclosing``: a
    reader left before the body's end is then closed at once."""
    held: list[str] = []  # the pieces of a line not yet ended
    size = 0
    async for text in response.aiter_text():
        pieces = text.split("\n")
        if len(pieces) > 1:
            first = "".join(held) + pieces[0] if held else pieces[0]
            held, size = [], 0
            for line in (first, *pieces[1:-1]):
                if len(line) > limit:
                    raise LineTooLong(f"a line over {limit} characters")
                yield line[:-1] if line.endswith("\r") else line
        rest = pieces[-1]
        if rest:
            held.append(rest)
            size += len(rest)
            if size > limit:
                raise LineTooLong(f"a line over {limit} characters")
    if held:
        line = "".join(held)
        yield line[:-1] if line.endswith("\r") else line


async def drain(lines: AsyncIterator[str], seconds: float) -> None:
    """Read what is left of a body once its answer's end was seen (a peer that follows
    its protocol sends nothing more but the end of the chunked body), so that the
    connection goes back to the client's pool instead of being closed: a connection per
    job costs both ends a TCP handshake and a new HTTP exchange. Bounded: a peer that
    keeps the body open after its end, sends more, or breaks the connection there costs
    a new connection, not the job (whose end has already been handed on)."""
    with (
        trio.move_on_after(seconds),
        contextlib.suppress(httpx.HTTPError, LineTooLong),
    ):
        async for _ in lines:
            pass
