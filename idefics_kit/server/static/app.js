// The idefics-kit playground: a chat page over the server's own OpenAI-compatible API.
//
// Rules this file keeps (tests/test_playground.py checks them in a real browser):
// - user text and model output reach the page through textContent / createElement
//   only, never as HTML;
// - every request goes to this server, by URLs relative to the page (so a mount prefix
//   or a proxy's root path keeps working): "v1/models", "v1/chat/completions";
// - the API key lives in this tab's sessionStorage and travels only in the
//   Authorization header, never in a URL.
"use strict";

(() => {
  const KEY_STORAGE = "idefics-kit.api-key";

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    apiKey: $("api-key"),
    newChat: $("new-chat"),
    conversation: $("conversation"),
    welcome: $("welcome"),
    notice: $("notice"),
    attachments: $("attachments"),
    images: $("images"),
    question: $("question"),
    send: $("send"),
    stop: $("stop"),
  };

  // The conversation as OpenAI messages: only turns that were answered.
  let history = [];
  // Pictures waiting to go with the next question: {name, url} with url a data: URI.
  let pending = [];
  // The request in flight: {controller, chat} or null; chat is the conversation epoch
  // it belongs to, so that a request from before "New chat" writes nothing.
  let inFlight = null;
  let chatEpoch = 0;

  // -- small DOM helpers (text only) -----------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function thumbnail(image) {
    const img = element("img", "thumb");
    img.src = image.url;
    img.alt = image.name;
    img.title = image.name;
    return img;
  }

  function scrollDown() {
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
  }

  function notice(text, kind) {
    ui.notice.textContent = text || "";
    ui.notice.className = kind || "";
  }

  // -- the API key -----------------------------------------------------------------------

  function apiKey() {
    return ui.apiKey.value.trim();
  }

  // A header value must be Latin-1; fetch would fail with a puzzling message otherwise.
  function keyProblem() {
    return /[^\x20-\x7e]/.test(apiKey())
      ? "The API key can only hold printable ASCII characters; check what was pasted."
      : "";
  }

  function headers(extra) {
    const result = Object.assign({}, extra);
    const key = apiKey();
    if (key) result.Authorization = "Bearer " + key;
    return result;
  }

  function loadKey() {
    try {
      ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      // Storage can be switched off; the field still works for this page view.
    }
  }

  function saveKey() {
    try {
      if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      // As above: without storage the key lasts as long as the page.
    }
  }

  // -- errors in words -------------------------------------------------------------------

  async function errorText(response) {
    let message = "";
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") {
        message = body.error.message;
      }
    } catch (_) {
      // Not an OpenAI error body (a proxy's page, say): the status says enough.
    }
    if (!message) message = response.statusText || "no message";
    return explain(response.status, message, response.headers.get("Retry-After"));
  }

  function explain(status, message, retryAfter) {
    let text = "Error " + status + ": " + message;
    if (status === 401) {
      text =
        "The server needs a valid API key (401): " + message +
        " Enter the key in the API key field at the top, then send again.";
    }
    if ((status === 429 || status === 503) && retryAfter) {
      text += " Try again in " + retryAfter + " s.";
    }
    return text;
  }

  // -- models ----------------------------------------------------------------------------

  async function loadModels() {
    if (keyProblem()) {
      notice(keyProblem(), "error");
      return;
    }
    let response;
    try {
      response = await fetch("v1/models", { headers: headers(), cache: "no-store" });
    } catch (error) {
      notice("Cannot reach the server: " + error.message, "error");
      return;
    }
    if (!response.ok) {
      notice(await errorText(response), "error");
      // Only while no question waits in the box: this reload runs when the key field
      // loses focus, and its answer must not pull the focus back from the question
      // (an Enter pressed there would go to the key field and send nothing).
      if (response.status === 401 && !ui.question.value.trim()) ui.apiKey.focus();
      return;
    }
    const body = await response.json();
    const chosen = ui.model.value;
    ui.model.replaceChildren();
    for (const model of body.data || []) {
      const option = element("option", "", String(model.id));
      option.value = String(model.id);
      ui.model.append(option);
    }
    if (chosen) ui.model.value = chosen;
    notice("");
  }

  // -- pictures --------------------------------------------------------------------------

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function attach(files) {
    const skipped = [];
    for (const file of files) {
      if (file.type && !file.type.startsWith("image/")) {
        skipped.push(file.name);
        continue;
      }
      try {
        pending.push({ name: file.name, url: await readAsDataURL(file) });
      } catch (error) {
        skipped.push(file.name);
      }
    }
    showAttachments();
    notice(skipped.length ? "Not pictures, left out: " + skipped.join(", ") : "");
  }

  function showAttachments() {
    ui.attachments.replaceChildren();
    pending.forEach((image, index) => {
      const item = element("figure", "attachment");
      item.append(thumbnail(image));
      const remove = element("button", "remove", "\u00d7");
      remove.type = "button";
      remove.title = "Remove " + image.name;
      remove.setAttribute("aria-label", "Remove " + image.name);
      remove.addEventListener("click", () => {
        pending.splice(index, 1);
        showAttachments();
      });
      item.append(remove);
      ui.attachments.append(item);
    });
    // The composer grew or shrank: keep the latest answer in view.
    scrollDown();
  }

  // -- the conversation ------------------------------------------------------------------

  function showUserTurn(text, images) {
    ui.welcome.hidden = true;
    const turn = element("article", "turn user");
    turn.append(element("div", "role", "You"));
    if (images.length) {
      const strip = element("div", "images");
      for (const image of images) strip.append(thumbnail(image));
      turn.append(strip);
    }
    if (text) turn.append(element("div", "text", text));
    ui.conversation.append(turn);
    return turn;
  }

  function showAnswerTurn(model) {
    const turn = element("article", "turn assistant");
    turn.append(element("div", "role", model || "model"));
    const text = element("div", "text");
    turn.append(text);
    ui.conversation.append(turn);
    scrollDown();
    return { turn, text };
  }

  function fail(answer, userTurn, message) {
    answer.turn.classList.add("error");
    answer.turn.append(element("div", "error-text", message));
    userTurn.classList.add("failed");
    scrollDown();
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
  }

  function numberOr(input, fallback) {
    const value = Number(input.value);
    return input.value !== "" && Number.isFinite(value) ? value : fallback;
  }

  // Server-sent events from a fetch body: yields each event's data field.
  async function* events(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  }

  function statsLine(finish, usage, pieces, seconds, firstSeconds) {
    const parts = [finish || "ended"];
    const completion = usage ? usage.completion_tokens : pieces;
    if (usage) {
      parts.push(usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens");
    } else {
      parts.push("~" + pieces + " completion tokens");
    }
    parts.push(seconds.toFixed(2) + " s");
    if (firstSeconds !== null) parts.push("first token " + firstSeconds.toFixed(2) + " s");
    parts.push((seconds > 0 ? completion / seconds : 0).toFixed(1) + " tokens/s");
    return parts.join(" \u00b7 ");
  }

  function restoreComposer(text, images) {
    if (!ui.question.value.trim() && !pending.length) {
      ui.question.value = text;
      pending = images.slice();
      showAttachments();
    }
  }

  async function send() {
    if (inFlight) return;
    const text = ui.question.value.trim();
    const images = pending.slice();
    if (!text && !images.length) {
      notice("Type a question or attach a picture first.");
      return;
    }
    if (keyProblem()) {
      notice(keyProblem(), "error");
      ui.apiKey.focus();
      return;
    }
    notice("");
    const content = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
    if (text) content.push({ type: "text", text });
    const userMessage = { role: "user", content };
    const request = {
      messages: history.concat([userMessage]),
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: Math.max(1, Math.round(numberOr(ui.maxTokens, 256))),
      temperature: numberOr(ui.temperature, 0),
    };
    if (ui.model.value) request.model = ui.model.value;

    ui.question.value = "";
    pending = [];
    showAttachments();
    const userTurn = showUserTurn(text, images);
    const answer = showAnswerTurn(ui.model.value);
    const controller = new AbortController();
    const epoch = chatEpoch;
    inFlight = { controller };
    setBusy(true);

    const started = performance.now();
    let firstAt = null;
    let reply = "";
    let pieces = 0;
    let finish = null;
    let usage = null;
    let response = null;
    try {
      response = await fetch("v1/chat/completions", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(request),
        signal: controller.signal,
        cache: "no-store",
      });
      if (!response.ok) {
        const message = await errorText(response);
        if (epoch !== chatEpoch) return;
        fail(answer, userTurn, message);
        restoreComposer(text, images);
        if (response.status === 401) ui.apiKey.focus();
        return;
      }
      for await (const data of events(response.body)) {
        if (epoch !== chatEpoch) return;
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data); // a broken chunk ends the answer (caught below)
        if (chunk.error) {
          // The 200 was already sent when this went wrong: the server says so in the stream.
          fail(answer, userTurn, "The answer broke off: " + String(chunk.error.message));
          restoreComposer(text, images);
          return;
        }
        if (chunk.usage) usage = chunk.usage;
        const choice = (chunk.choices || [])[0];
        if (!choice) continue;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          reply += piece;
          pieces += 1;
          answer.text.textContent = reply;
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (error) {
      if (epoch !== chatEpoch) return;
      if (error.name === "AbortError") {
        finish = "stopped";
      } else {
        const what = response ? "The answer broke off: " : "Cannot reach the server: ";
        fail(answer, userTurn, what + error.message);
        restoreComposer(text, images);
        return;
      }
    } finally {
      if (epoch === chatEpoch) {
        inFlight = null;
        setBusy(false);
      }
    }
    if (epoch !== chatEpoch) return;
    const seconds = (performance.now() - started) / 1000;
    const firstSeconds = firstAt === null ? null : (firstAt - started) / 1000;
    answer.turn.append(element("div", "stats", statsLine(finish, usage, pieces, seconds, firstSeconds)));
    if (reply || finish !== "stopped") {
      history = history.concat([userMessage, { role: "assistant", content: reply }]);
    } else {
      userTurn.classList.add("failed"); // stopped before any answer: not part of the chat
    }
    scrollDown();
  }

  function newChat() {
    chatEpoch += 1;
    if (inFlight) inFlight.controller.abort();
    inFlight = null;
    setBusy(false);
    history = [];
    pending = [];
    showAttachments();
    ui.question.value = "";
    for (const turn of ui.conversation.querySelectorAll(".turn")) turn.remove();
    ui.welcome.hidden = false;
    notice("");
    ui.question.focus();
  }

  // -- wiring ----------------------------------------------------------------------------

  ui.send.addEventListener("click", send);
  ui.stop.addEventListener("click", () => {
    if (inFlight) inFlight.controller.abort();
  });
  ui.newChat.addEventListener("click", newChat);
  ui.question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.images.addEventListener("change", async () => {
    const files = Array.from(ui.images.files || []);
    ui.images.value = "";
    await attach(files);
  });
  ui.apiKey.addEventListener("input", saveKey);
  ui.apiKey.addEventListener("change", loadModels);
  // Only drags that carry files are ours: dropping text into the question works as usual.
  const carriesFiles = (event) =>
    Boolean(event.dataTransfer) && Array.from(event.dataTransfer.types).includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    document.body.classList.remove("dragging");
    if (!carriesFiles(event)) return;
    event.preventDefault();
    attach(Array.from(event.dataTransfer.files));
  });
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    if (files.length) {
      event.preventDefault();
      attach(files);
    }
  });

  loadKey();
  loadModels();
  ui.question.focus();
})();
