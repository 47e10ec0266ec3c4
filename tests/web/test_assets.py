"""The pages' own files are served from ``routecat/web/static`` (the browser tests
need them; this catches a broken static route without a browser)."""

from __future__ import annotations

import httpx
import pytest
import trio


@pytest.mark.parametrize(
    ("path", "kind"), [("/static/app.css", "text/css"), ("/static/account.js", "javascript")]
)
async def test_static_files_are_served(client: httpx.AsyncClient, path: str, kind: str) -> None:
    with trio.fail_after(10):
        response = await client.get(path)
    assert response.status_code == 200, response.text
    assert kind in response.headers["content-type"]
    assert len(response.content) > 100


async def test_pages_link_their_static_files(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        page = await client.get("/")
    assert page.status_code == 200
    assert 'href="/static/app.css"' in page.text


async def test_docs_page_shows_the_clients_options(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        page = (await client.get("/docs")).text
    assert '"includeUsage": true' in page  # OpenCode shows 0 tokens without it
    assert "/v1/responses" in page and "/v1/embeddings" in page and "/v1/auth/usage" in page
