// Drives a RouteCat gateway as real JS clients do: the openai SDK and the Vercel
// AI SDK's openai-compatible provider (what OpenCode uses). Prints one JSON object.
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { embed, embedMany, generateText, jsonSchema, streamText, tool } from "ai";

const [baseURL, apiKey, model, embedModel, thinkModel, toolsModel] = process.argv.slice(2);
const out = {};

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const r = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "hello from js" }],
});
out.openai_text = r.choices[0].message.content;
out.openai_usage = r.usage;

const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "stream from js" }],
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
for await (const chunk of stream) {
  if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
  else out.openai_stream_usage = chunk.usage;
}
out.openai_stream_text = text;

try {
  await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
} catch (err) {
  out.openai_error = { status: err.status, message: err.message, code: err.code };
}

const routecat = createOpenAICompatible({ name: "routecat", baseURL, apiKey, includeUsage: true });
const g = await generateText({ model: routecat(model), prompt: "hello from the ai sdk" });
out.ai_text = g.text;
out.ai_finish = g.finishReason;
out.ai_usage = g.usage;

const s = streamText({ model: routecat(model), prompt: "stream from the ai sdk" });
let streamed = "";
for await (const part of s.textStream) streamed += part;
out.ai_stream_text = streamed;
out.ai_stream_finish = await s.finishReason;
out.ai_stream_usage = await s.usage;

// Embeddings: the openai SDK, and the AI SDK's embed / embedMany.
const e = await client.embeddings.create({ model: embedModel, input: ["one", "two"] });
out.openai_embeddings = e.data.map((d) => d.embedding.length);
out.openai_embedding_usage = e.usage;
const one = await embed({ model: routecat.embeddingModel(embedModel), value: "one" });
out.ai_embed = one.embedding.length;
const many = await embedMany({ model: routecat.embeddingModel(embedModel), values: ["a", "b", "c"] });
out.ai_embed_many = many.embeddings.map((v) => v.length);

// Responses: the openai SDK, stream and not.
const resp = await client.responses.create({ model, input: "hello responses" });
out.responses_text = resp.output_text;
out.responses_usage = resp.usage;
const rs = await client.responses.create({ model, input: "stream responses", stream: true });
const kinds = [];
for await (const event of rs) kinds.push(event.type);
out.responses_stream_kinds = kinds;

// Reasoning parts through the openai-compatible provider (OpenCode's).
const thinking = streamText({ model: routecat(thinkModel), prompt: "why?" });
const parts = [];
for await (const part of thinking.fullStream) parts.push(part.type);
out.ai_reasoning_parts = parts;
out.ai_reasoning_text = await thinking.reasoningText;
out.ai_reasoning_answer = await thinking.text;

// The AI SDK's OpenAI provider speaks the Responses API: text, then a tool call (it
// takes tool calls from response.output_item.done).
const oa = createOpenAI({ baseURL, apiKey });
const viaResponses = await generateText({ model: oa.responses(model), prompt: "hello from responses" });
out.ai_responses_text = viaResponses.text;
const called = await generateText({
  model: oa.responses(toolsModel),
  prompt: "weather in Paris?",
  tools: {
    get_weather: tool({
      description: "the weather",
      inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } } }),
    }),
  },
});
out.ai_responses_calls = called.toolCalls.map((c) => ({ name: c.toolName, input: c.input }));
const streamedCalls = streamText({
  model: oa.responses(toolsModel),
  prompt: "weather in Paris?",
  tools: {
    get_weather: tool({
      description: "the weather",
      inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } } }),
    }),
  },
});
out.ai_responses_stream_calls = (await streamedCalls.toolCalls).map((c) => c.toolName);

console.log(JSON.stringify(out));
