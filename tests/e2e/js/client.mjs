// Drives a RouteCat gateway as real JS clients do: the openai SDK and the Vercel
// AI SDK's openai-compatible provider (what OpenCode uses). Prints one JSON object.
import OpenAI from "openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, streamText } from "ai";

const [baseURL, apiKey, model] = process.argv.slice(2);
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

console.log(JSON.stringify(out));
