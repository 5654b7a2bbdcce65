// mmserve playground: a multi-turn chat with images over the gateway's own OpenAI API
// (/v1/chat/completions, streamed as SSE). No dependencies, works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // OpenAI messages of the conversation so far
let image = null;    // the image of the next user turn: a https:// or data: url
let running = null;  // AbortController of the request in flight

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function describeError(status, body) {
  const e = (body && body.error) || {};
  const where = e.param ? ` (param: ${e.param})` : "";
  const kind = e.type || e.code || "error";
  return `HTTP ${status} ${kind}${where}: ${e.message || JSON.stringify(body)}`;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setImage(url) {
  image = url || null;
  $("image-preview").src = image || "";
  $("image-preview").hidden = !image;
  $("image-clear").hidden = !image;
}

function clearImage() {
  $("image-url").value = "";
  $("image-file").value = "";
  setImage(null);
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => { $("image-url").value = ""; setImage(reader.result); };
  reader.readAsDataURL(file);
}

function addTurn(role, text, imageUrl) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "image sent with this message";
    div.appendChild(img);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("conversation").appendChild(div);
  return body;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    const body = await res.json();
    if (!res.ok) throw new Error(describeError(res.status, body));
    $("model").textContent = `model: ${body.data[0].id}`;
    return body.data[0].id;
  } catch (err) {
    showError(String(err.message || err));
    return null;
  }
}

// Yields each SSE event's parsed data until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function userMessage(text) {
  if (!image) return { role: "user", content: text };
  return { role: "user", content: [{ type: "image_url", image_url: { url: image } }, { type: "text", text }] };
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running) return;
  showError("");
  const model = await loadModel();
  if (!model) return;
  const message = userMessage(text);
  addTurn("user", text, image);
  const answer = addTurn("assistant", "");
  const request = {
    model,
    messages: [...history, message],
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value) || 0,
    stream: true,
    stream_options: { include_usage: true },
  };
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("stats").textContent = "waiting for the first token…";
  const started = performance.now();
  let firstToken = null;
  let usage = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: running.signal,
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({ error: { message: res.statusText } }));
      throw new Error(describeError(res.status, body));
    }
    for await (const chunk of sseEvents(res)) {
      if (chunk.error) throw new Error(describeError(chunk.error.code || res.status, chunk));
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (firstToken === null) firstToken = performance.now();
        answer.textContent += delta.content;
      }
    }
    history.push(message, { role: "assistant", content: answer.textContent });
    $("prompt").value = "";
    clearImage();
    $("stats").textContent = stats(started, firstToken, performance.now(), usage);
    answer.parentElement.dataset.done = "true";
  } catch (err) {
    answer.parentElement.remove();
    $("stats").textContent = "";
    showError(err.name === "AbortError" ? "stopped" : String(err.message || err));
  } finally {
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function stats(started, firstToken, ended, usage) {
  const parts = [];
  if (firstToken !== null) parts.push(`TTFT ${((firstToken - started) / 1000).toFixed(2)} s`);
  if (usage) {
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    const seconds = (ended - (firstToken ?? started)) / 1000;
    if (usage.completion_tokens > 1 && seconds > 0) {
      parts.push(`${((usage.completion_tokens - 1) / seconds).toFixed(1)} tokens/s`);
    }
  }
  return parts.join(" · ");
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) $("composer").requestSubmit();
});
$("image-file").addEventListener("change", (e) => e.target.files[0] && readFile(e.target.files[0]));
$("image-url").addEventListener("change", (e) => setImage(e.target.value.trim()));
$("image-clear").addEventListener("click", clearImage);
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) { e.preventDefault(); readFile(item.getAsFile()); }
});
$("stop").addEventListener("click", () => running && running.abort());
$("reset").addEventListener("click", () => {
  history.length = 0;
  $("conversation").replaceChildren();
  $("stats").textContent = "";
  showError("");
});
loadModel();
