"""The JS openai SDK and the Vercel AI SDK (OpenCode's provider) against a live gateway."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio

from tests.servers import start_network

pytestmark = pytest.mark.e2e

JS = Path(__file__).parent / "js"


async def test_js_sdks_through_the_gateway(nursery: trio.Nursery, tmp_path: Path) -> None:
    assert shutil.which("node"), "node.js is required for the e2e session"
    assert (JS / "node_modules" / "ai").is_dir(), "run: npm ci --prefix tests/e2e/js"
    with trio.fail_after(60):
        net = await start_network(nursery, tmp_path)
        done = await trio.run_process(
            ["node", str(JS / "client.mjs"), net.url + "/v1", net.key, "llama3.1:8b"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    out = json.loads(done.stdout)
    assert out["openai_text"] == "You said: hello from js"
    assert out["openai_usage"]["completion_tokens"] == 5
    assert out["openai_stream_text"] == "You said: stream from js"
    assert out["openai_stream_usage"]["total_tokens"] > 0
    assert out["openai_error"]["status"] == 404
    assert out["openai_error"]["code"] == "model_not_found"
    assert out["ai_text"] == "You said: hello from the ai sdk"
    assert out["ai_finish"] == "stop"
    assert out["ai_usage"]["outputTokens"] == 7
    assert out["ai_stream_text"] == "You said: stream from the ai sdk"
    assert out["ai_stream_finish"] == "stop"
    assert out["ai_stream_usage"]["outputTokens"] == 7
