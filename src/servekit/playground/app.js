// The playground: streaming chat against this server's /v1/chat/completions.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "servekit.apiKey";
  const history = []; // {role, content}
  let controller = null;

  function headers() {
    const key = localStorage.getItem(KEY_STORAGE);
    const h = { "Content-Type": "application/json" };
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function status(text) { $("status").textContent = text || ""; }

  async function loadModels() {
    const select = $("model");
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (error) {
      status("cannot reach the server: " + error);
      return;
    }
    if (response.status === 401) {
      status("this server needs an API key: enter it above");
      $("api-key").focus();
      return;
    }
    if (!response.ok) { status("GET /v1/models failed: HTTP " + response.status); return; }
    const body = await response.json();
    select.innerHTML = "";
    for (const model of body.data || []) {
      const option = document.createElement("option");
      option.value = option.textContent = model.id;
      select.appendChild(option);
    }
    status(select.options.length ? "" : "the server lists no models");
  }

  function addMessage(role, text) {
    const div = document.createElement("div");
    div.className = "message " + role;
    if (role === "user") div.textContent = text;
    else div.innerHTML = window.renderMarkdown(text);
    $("messages").appendChild(div);
    div.scrollIntoView({ block: "end" });
    return div;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  function numberOf(id, fallback) {
    const value = Number($(id).value);
    return Number.isFinite(value) ? value : fallback;
  }

  async function send(text) {
    const model = $("model").value;
    if (!model) { status("no model selected"); return; }
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const reply = addMessage("assistant", "");
    const messages = [];
    const system = $("system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const body = {
      model: model,
      messages: messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberOf("temperature", 0.7),
      top_p: numberOf("top-p", 1),
      max_tokens: Math.max(1, Math.floor(numberOf("max-tokens", 256))),
    };
    controller = new AbortController();
    setBusy(true);
    status("");
    const started = performance.now();
    let first = null;
    let text_ = "";
    let chunks = 0;
    let completionTokens = null;
    let pending = false;
    const paint = () => {
      pending = false;
      reply.innerHTML = window.renderMarkdown(text_);
      reply.scrollIntoView({ block: "end" });
      const now = performance.now();
      if (first !== null) {
        $("ttft").textContent = Math.round(first - started) + " ms";
        const tokens = completionTokens !== null ? completionTokens : chunks;
        const seconds = (now - first) / 1000;
        $("tokens").textContent = String(tokens);
        if (seconds > 0 && tokens > 1) $("tps").textContent = ((tokens - 1) / seconds).toFixed(1);
      }
    };
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) {
        let detail = "HTTP " + response.status;
        try { detail += ": " + (await response.json()).error.message; } catch (_) { /* not JSON */ }
        throw new Error(detail);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
          if (chunk.usage) completionTokens = chunk.usage.completion_tokens;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          const piece = delta && (delta.content || delta.reasoning_content);
          if (piece) {
            if (first === null) first = performance.now();
            text_ += piece;
            chunks += 1;
          }
        }
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      }
      paint();
      reply.dataset.done = "true";
    } catch (error) {
      paint();
      if (error.name === "AbortError") {
        reply.classList.add("stopped");
        reply.dataset.done = "stopped";
      } else {
        reply.classList.add("error");
        reply.textContent = String(error.message || error);
        reply.dataset.done = "error";
      }
    } finally {
      history.push({ role: "assistant", content: text_ });
      controller = null;
      setBusy(false);
    }
  }

  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  // Aborting the fetch closes the connection: the server aborts the sequence and frees its KV cache.
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    history.length = 0;
    $("messages").innerHTML = "";
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    $("api-key").placeholder = key ? "key saved" : "API key (if the server needs one)";
    loadModels();
  });
  for (const [input, output] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
    $(input).addEventListener("input", () => { $(output).textContent = $(input).value; });
  }
  if (localStorage.getItem(KEY_STORAGE)) $("api-key").placeholder = "key saved";
  loadModels();
})();
