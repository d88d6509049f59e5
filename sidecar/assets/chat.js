// /chat: a streaming chat with any served model. The conversation lives in localStorage.
"use strict";

const CHAT_STORAGE = "mlx-flash-chat";
const state = { messages: [], model: null, controller: null };

const $ = (id) => document.getElementById(id);

function save() {
  localStorage.setItem(CHAT_STORAGE, JSON.stringify({ model: state.model, messages: state.messages }));
}

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(CHAT_STORAGE) || "{}");
    state.messages = Array.isArray(saved.messages) ? saved.messages : [];
    state.model = saved.model || null;
  } catch {
    state.messages = [];
  }
}

function bubble(message) {
  const body = el("div", { class: "body" });
  if (message.role === "assistant") body.innerHTML = renderMarkdown(message.content);
  else body.textContent = message.content;
  const node = el("article", { class: `message ${message.role}` }, el("div", { class: "role" }, message.role), body);
  if (message.error) node.append(el("div", { class: "error" }, message.error));
  return node;
}

function render() {
  const box = $("messages");
  box.replaceChildren(...state.messages.map(bubble));
  box.scrollTop = box.scrollHeight;
}

async function loadModels() {
  const select = $("model");
  const response = await api("/v1/models");
  if (!response.ok) {
    $("status").textContent = await errorText(response);
    return;
  }
  const models = (await response.json()).data;
  select.replaceChildren(...models.map((m) => el("option", { value: m.id }, `${m.id}${m.status && m.status !== "loaded" ? ` (${m.status})` : ""}`)));
  if (state.model && models.some((m) => m.id === state.model)) select.value = state.model;
  state.model = select.value || null;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Each SSE event of an OpenAI chat stream, as parsed JSON, until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "" };
  state.messages.push(reply);
  render();
  const node = $("messages").lastElementChild;
  const body = node.querySelector(".body");
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  $("status").textContent = "…";
  const started = performance.now();
  let tokens = 0;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: state.model,
        messages: state.messages.slice(0, -1).map(({ role, content }) => ({ role, content })),
        stream: true,
        stream_options: { include_usage: true },
      }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message || "the server failed mid-stream");
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply.content += delta.content;
        body.innerHTML = renderMarkdown(reply.content);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    const seconds = (performance.now() - started) / 1000;
    $("status").textContent = tokens ? `${tokens} tokens, ${(tokens / seconds).toFixed(1)} tok/s` : "";
  } catch (error) {
    if (error.name === "AbortError") {
      $("status").textContent = "stopped";
      reply.stopped = true;
    } else {
      reply.error = error.message;
      node.append(el("div", { class: "error" }, error.message));
      $("status").textContent = "";
    }
  } finally {
    state.controller = null;
    busy(false);
    save();
  }
}

function init() {
  load();
  render();
  loadModels();
  $("model").addEventListener("change", () => {
    state.model = $("model").value;
    save();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    save();
    render();
  });
}

init();
