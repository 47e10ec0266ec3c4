"""The JS openai SDK and the Vercel AI SDK (OpenCode's provider) against a live gateway."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio

from tests.fakes import Knobs
from tests.servers import start_network

EMBED = "nomic-embed-text:v1.5"

pytestmark = pytest.mark.e2e

JS = Path(__file__).parent / "js"


async def test_js_sdks_through_the_gateway(nursery: trio.Nursery, tmp_path: Path) -> None:
    assert shutil.which("node"), "node.js is required for the e2e session"
    assert (JS / "node_modules" / "ai").is_dir(), "run: npm ci --prefix tests/e2e/js"
    with trio.fail_after(60):
        net = await start_network(
            nursery,
            tmp_path,
            knobs=Knobs(models=["llama3.1:8b", EMBED, "think:1b", "tools:1b"]),
        )
        net.engine.model_knobs["think:1b"] = Knobs(
            reasoning=["Let me ", "think."], reply=["Because."]
        )
        net.engine.model_knobs["tools:1b"] = Knobs(
            reply=[], tool_call={"name": "get_weather", "arguments": {"city": "Paris"}}
        )
        done = await trio.run_process(
            [
                "node",
                str(JS / "client.mjs"),
                net.url + "/v1",
                net.key,
                "llama3.1:8b",
                EMBED,
                "think:1b",
                "tools:1b",
            ],
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
    # Embeddings through both SDKs (the fake engine's vectors have 8 dimensions).
    assert (
        out["openai_embeddings"] == [8, 8] and out["openai_embedding_usage"]["prompt_tokens"] == 2
    )
    assert out["ai_embed"] == 8 and out["ai_embed_many"] == [8, 8, 8]
    # The Responses API through the openai SDK.
    assert out["responses_text"] == "You said: hello responses"
    assert out["responses_usage"]["output_tokens"] == 4
    kinds = out["responses_stream_kinds"]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    # Reasoning parts in the AI SDK (openai-compatible provider).
    assert "reasoning-delta" in out["ai_reasoning_parts"]
    assert out["ai_reasoning_text"] == "Let me think." and out["ai_reasoning_answer"] == "Because."
    # The AI SDK's OpenAI provider on the Responses API: text and tool calls.
    assert out["ai_responses_text"] == "You said: hello from responses"
    assert out["ai_responses_calls"] == [{"name": "get_weather", "input": {"city": "Paris"}}]
    assert out["ai_responses_stream_calls"] == ["get_weather"]
