"""``owlrun.lines.read_lines`` over real httpx responses whose bodies arrive in arbitrary
pieces: whatever the text and however it is cut, the lines are the text's lines split
at ``\\n`` only (one ``\\r`` before it dropped), and a line past the bound raises
``LineTooLong`` instead of being held."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from owlrun.errors import LineTooLong
from owlrun.lines import read_lines


class Pieces(httpx.AsyncByteStream):
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


async def lines_of(pieces: list[bytes], limit: int) -> list[str]:
    response = httpx.Response(200, stream=Pieces(pieces))
    return [line async for line in read_lines(response, limit)]


def expected(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the body ended with a newline: no last line
    return [line.removesuffix("\r") for line in lines]


# Text with newlines, carriage returns and the characters str.splitlines also splits at.
texts = st.text(
    alphabet=st.one_of(
        st.sampled_from("\n\r\u2028\u2029\x85\x0b\x0c\x1c"), st.characters(codec="utf-8")
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=1200), max_size=8))
def test_lines_are_the_texts_lines_however_the_body_is_cut(text: str, cuts: list[int]) -> None:
    data = text.encode()
    points = sorted({c % (len(data) + 1) for c in cuts})  # cuts may split a character
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    want = expected(text)
    limit = max((len(line) for line in text.split("\n")), default=0)
    assert trio.run(lines_of, [p for p in pieces if p], max(limit, 1)) == want
    if limit > 1:  # one character less: the longest line is refused
        with pytest.raises(LineTooLong):
            trio.run(lines_of, [p for p in pieces if p], limit - 1)


def test_a_line_that_never_ends_is_refused_before_it_is_held() -> None:
    seen: list[int] = []

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                seen.append(1)
                yield b"x" * 1000

    async def read() -> None:
        response = httpx.Response(200, stream=Endless())
        async for _ in read_lines(response, 10_000):
            pass

    with pytest.raises(LineTooLong, match="a line over 10000 characters"):
        trio.run(read)
    assert len(seen) == 11  # the eleventh piece passed the bound: nothing more was read
