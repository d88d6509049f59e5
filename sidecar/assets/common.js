// Shared by /admin and /chat: the API key (asked once, kept in sessionStorage) and fetch with it.
"use strict";

const KEY_STORAGE = "mlx-flash-api-key";

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

// Ask for the key in the page's dialog; resolves once the user submits it.
function askKey(message) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = message;
  input.value = "";
  return new Promise((resolve) => {
    const form = dialog.querySelector("form");
    form.onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
      dialog.close();
      resolve();
    };
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
}

// fetch() with the key; on 401 asks for it (once per failure) and retries.
async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    await askKey(key ? "That key was refused. API key:" : "This server needs an API key:");
  }
}

// The text of an error reply in any of our APIs' shapes.
async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    return (typeof error === "string" ? error : error && error.message) || text;
  } catch {
    return text || `${response.status} ${response.statusText}`;
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
