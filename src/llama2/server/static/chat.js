// The chat page of `llama2 serve`: a client of the server's own /v1/chat/completions.
//
// No third-party code. Model output and user text only ever reach the page as text nodes
// (textContent, createTextNode): the markdown renderer builds elements itself and never parses
// HTML, so `<img onerror=...>` in a reply is shown as those characters.
// Conversations and settings live in localStorage under versioned keys; a stored value that does
// not validate is kept aside (under its key + ".unreadable") rather than overwritten.
"use strict";

const API = "/v1/chat/completions";
const STORE_KEY = "llama2-chat.conversations.v1";
const SETTINGS_KEY = "llama2-chat.settings.v1";
const DEFAULT_SETTINGS = {system: "", temperature: "", top_p: "", max_tokens: "", seed: "", json: false, api_key: ""};
const NUMBER_FIELDS = ["temperature", "top_p", "max_tokens", "seed"];  // blank: the server's default
const TITLE_LENGTH = 48;
const SAVE_EVERY_MS = 500;  // while a reply streams in

const $ = (id) => document.getElementById(id);
const ui = {};
let store = {version: 1, current: null, conversations: []};
let settings = {...DEFAULT_SETTINGS};
let model = null;  // the served model's name, from /health
let running = null;  // {controller, conv, reply} while a reply streams in
let editing = null;  // index of the user message being edited in the current conversation

// -- storage ----------------------------------------------------------------------------------

function loadJSON(key, validate, fallback) {
  const raw = localStorage.getItem(key);
  if (raw === null) return fallback;
  try {
    const value = JSON.parse(raw);
    if (validate(value)) return value;
    throw new Error("unexpected shape");
  } catch (e) {
    localStorage.setItem(key + ".unreadable", raw);
    notice(`Stored data ${key} could not be read (${e.message}); it was kept as ${key}.unreadable.`);
    return fallback;
  }
}

function validMessage(m) {
  return m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string";
}

function validStore(s) {
  return s && s.version === 1 && Array.isArray(s.conversations) && s.conversations.every(
    (c) => c && typeof c.id === "string" && typeof c.title === "string" &&
           Array.isArray(c.messages) && c.messages.every(validMessage));
}

function validSettings(s) {
  return s && typeof s === "object" && Object.keys(DEFAULT_SETTINGS).every(
    (k) => s[k] === undefined || typeof s[k] === typeof DEFAULT_SETTINGS[k]);
}

function save() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(store));
  } catch (e) {
    notice(`Could not save the conversations in this browser: ${e.message}`);
  }
}

function saveSettings() {
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  } catch (e) {
    notice(`Could not save the settings in this browser: ${e.message}`);
  }
}

function currentConversation() {
  return store.conversations.find((c) => c.id === store.current) || null;
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function titleOf(conv) {
  const first = conv.messages.find((m) => m.role === "user");
  const text = first ? first.content.replace(/\s+/g, " ").trim() : "";
  if (!text) return "New chat";
  return text.length > TITLE_LENGTH ? text.slice(0, TITLE_LENGTH - 1) + "…" : text;
}

// -- markdown ---------------------------------------------------------------------------------
// Blocks: fenced code, headings, lists (nested by indentation), block quotes, rules, paragraphs.
// Inline: `code`, **strong**, *em*, _em_, ~~strike~~, [text](http(s) URL). Everything else is text.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderMarkdown(text, into) {
  renderBlocks(text.replace(/\r\n?/g, "\n").split("\n"), into);
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || ITEM.test(line) || QUOTE.test(line) || RULE.test(line);
}

function renderBlocks(lines, into) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++;  // the closing fence (or the end: a fence still streaming in)
      const pre = el("pre");
      const code = el("code", m[2] ? "language-" + m[2] : "", body.join("\n"));
      pre.append(code);
      into.append(pre);
    } else if ((m = HEADING.exec(line))) {
      const h = el("h" + m[1].length);
      renderInline(m[2], h);
      into.append(h);
      i++;
    } else if (RULE.test(line)) {
      into.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) body.push(m[1]);
      const quote = el("blockquote");
      renderBlocks(body, quote);
      into.append(quote);
    } else if (ITEM.test(line)) {
      i = renderMarkdownList(lines, i, into);
    } else {
      const body = [];
      for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) body.push(lines[i].trim());
      const p = el("p");
      renderInline(body.join("\n"), p);
      into.append(p);
    }
  }
}

function indentOf(line) {
  return line.match(/^\s*/)[0].replace(/\t/g, "    ").length;
}

// A list from lines[i] on: items at the first item's indentation; deeper lines belong to the item
// above (its continuation or a nested list). Returns the index after the list.
function renderMarkdownList(lines, i, into) {
  const first = ITEM.exec(lines[i]);
  const indent = indentOf(lines[i]);
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || indentOf(lines[i]) !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    for (i++; i < lines.length; i++) {
      const line = lines[i];
      if (!line.trim()) {  // a blank line ends the item unless deeper text follows
        if (i + 1 < lines.length && lines[i + 1].trim() && indentOf(lines[i + 1]) > indent) continue;
        break;
      }
      if (indentOf(line) <= indent && (ITEM.test(line) || startsBlock(line))) break;
      if (indentOf(line) <= indent && !ITEM.test(line)) {  // a lazy continuation line
        body.push(line.trim());
        continue;
      }
      body.push(line.slice(Math.min(indentOf(line), indent + 2)));
    }
    const li = el("li");
    const nested = body.findIndex((line, k) => k > 0 && startsBlock(line));
    if (nested < 0) {
      renderInline(body.map((s) => s.trim()).join("\n"), li);
    } else {
      renderInline(body.slice(0, nested).map((s) => s.trim()).join("\n"), li);
      renderBlocks(body.slice(nested), li);
    }
    list.append(li);
    while (i < lines.length && !lines[i].trim()) {  // blank lines between items of one list
      if (i + 1 < lines.length && ITEM.test(lines[i + 1]) && indentOf(lines[i + 1]) === indent) i++;
      else break;
    }
  }
  into.append(list);
  return i;
}

const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,  // 1, 2: code
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,  // 3: strong
  /(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source,  // 4: strong
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,  // 5: em
  /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source,  // 6: em
  /~~(?=\S)([\s\S]*?\S)~~/.source,  // 7: strike
  /\[([^\]\n]+)\]\(\s*(https?:\/\/[^\s()]+)\s*\)/.source,  // 8, 9: link
].join("|"), "g");

function appendText(into, text) {
  text.split("\n").forEach((part, k) => {
    if (k) into.append(el("br"));
    if (part) into.append(document.createTextNode(part));
  });
}

function renderInline(text, into) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    appendText(into, text.slice(last, m.index));
    last = m.index + m[0].length;
    let node;
    if (m[2] !== undefined) {
      node = el("code", "", m[2].length > 2 && m[2][0] === " " && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2]);
    } else if (m[9] !== undefined) {
      let url;
      try {
        url = new URL(m[9]);
      } catch (e) {
        appendText(into, m[0]);  // not a URL after all
        continue;
      }
      node = el("a");
      node.href = url.href;
      node.rel = "noopener noreferrer nofollow";
      node.target = "_blank";
      renderInline(m[8], node);
    } else {
      const [tag, inner] = m[3] !== undefined ? ["strong", m[3]] : m[4] !== undefined ? ["strong", m[4]]
        : m[5] !== undefined ? ["em", m[5]] : m[6] !== undefined ? ["em", m[6]] : ["del", m[7]];
      node = el(tag);
      renderInline(inner, node);
    }
    into.append(node);
  }
  appendText(into, text.slice(last));
}

// -- the server -------------------------------------------------------------------------------

function authHeaders() {
  const key = settings.api_key.trim();
  return key ? {Authorization: "Bearer " + key} : {};
}

async function errorText(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = (body && body.error && body.error.message) || JSON.stringify(body);
  } catch (e) { /* not JSON: keep the status text */ }
  let text = `HTTP ${response.status}: ${detail}`;
  if (response.status === 401) text += " (set the API key in Settings)";
  return text;
}

function describe(e) {
  if (e instanceof TypeError) return `Network error: ${e.message} (is the server running?)`;
  return e.message;
}

// The served model's name, from /health (which needs no key); then whether the API wants a key.
async function fetchModel() {
  try {
    const response = await fetch("/health");
    if (!response.ok) throw new Error(await errorText(response));
    model = (await response.json()).model;
    ui.model.textContent = "· " + model;
  } catch (e) {
    notice(`Cannot read the server's /health: ${describe(e)}`, "server");
    return false;
  }
  clearNotice("server");
  checkKey();
  return true;
}

// Whether the API needs a key that we lack: /v1/models answers 401 then.
async function checkKey() {
  try {
    const response = await fetch("/v1/models", {headers: authHeaders()});
    if (response.status === 401) {
      notice(settings.api_key ? "The API key in Settings is not accepted by this server."
        : "This server needs an API key: enter it in Settings.", "key");
      showSettings(true);
      ui.api_key.focus();
    } else if (response.ok) {
      clearNotice("key");
    }
  } catch (e) {
    notice(describe(e), "server");
  }
}

function requestBody(messages) {
  // the last chunk's usage says when the server left out the oldest turns to fit the context
  const body = {model, stream: true, stream_options: {include_usage: true}, messages: []};
  if (settings.system.trim()) body.messages.push({role: "system", content: settings.system});
  for (const m of messages) body.messages.push({role: m.role, content: m.content});
  for (const name of NUMBER_FIELDS) {
    const text = String(settings[name]).trim();
    if (text === "") continue;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new Error(`Settings: ${name} ${JSON.stringify(text)} is not a number`);
    body[name] = value;
  }
  if (settings.json) body.response_format = {type: "json_object"};
  return body;
}

// Server-sent events from a fetch response: calls onData with each parsed `data:` payload; returns
// true at `data: [DONE]`, false when the stream ends without it.
async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    return await readBlocks(reader, onData);
  } finally {
    reader.cancel().catch(() => {});  // after an error event: stop downloading the rest
  }
}

async function readBlocks(reader, onData) {
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return false;
    buffer = (buffer + value).replace(/\r\n|\r(?=[\s\S])/g, "\n");  // a last \r may be half of \r\n
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(l[5] === " " ? 6 : 5)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return true;
      let event;
      try {
        event = JSON.parse(data);
      } catch (e) {
        throw new Error(`The server sent an event that is not JSON: ${data.slice(0, 80)}`);
      }
      onData(event);
    }
  }
}

// Stream a reply to `conv` (whose last message is the user's) into a new assistant message.
async function generate(conv) {
  const reply = {role: "assistant", content: "", pending: true};
  if (settings.json) reply.json = true;
  const history = conv.messages.slice();
  conv.messages.push(reply);
  conv.updated = Date.now();
  const controller = new AbortController();
  running = {controller, conv, reply};
  setBusy(true);
  save();
  renderAll();
  let lastSave = Date.now();
  try {
    if (!model && !await fetchModel()) throw new Error("Cannot reach the server's /health to learn the model's name.");
    const response = await fetch(API, {
      method: "POST", signal: controller.signal,
      headers: {"Content-Type": "application/json", ...authHeaders()},
      body: JSON.stringify(requestBody(history)),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const complete = await readEvents(response, (event) => {
      if (event.error) throw new Error(`Server error: ${event.error.message || JSON.stringify(event.error)}`);
      const choice = event.choices && event.choices[0];
      if (!choice) {  // the usage chunk
        if (event.usage && event.usage.dropped_messages) reply.dropped = event.usage.dropped_messages;
        return;
      }
      if (choice.delta && typeof choice.delta.content === "string" && choice.delta.content) {
        reply.content += choice.delta.content;
        updateReply(conv, reply);
        if (Date.now() - lastSave > SAVE_EVERY_MS) { save(); lastSave = Date.now(); }
      }
      if (choice.finish_reason) reply.finish = choice.finish_reason;
    });
    if (!complete) throw new Error("The answer was cut off: the connection closed before its end.");
  } catch (e) {
    if (controller.signal.aborted) reply.stopped = true;
    else reply.error = describe(e);
  } finally {
    delete reply.pending;
    running = null;
    setBusy(false);
    save();
    renderAll();
  }
}

// -- actions ----------------------------------------------------------------------------------

function send(text) {
  if (running || !text.trim()) return;
  let conv = currentConversation();
  if (!conv) {
    conv = {id: newId(), title: "New chat", created: Date.now(), updated: Date.now(), messages: []};
    store.conversations.unshift(conv);
    store.current = conv.id;
  }
  conv.messages.push({role: "user", content: text});
  conv.title = titleOf(conv);
  ui.input.value = "";
  generate(conv);
}

function regenerate() {
  const conv = currentConversation();
  if (running || !conv || !conv.messages.length) return;
  if (conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  generate(conv);
}

function resendEdited(index, text) {
  const conv = currentConversation();
  if (running || !conv || !text.trim()) return;
  editing = null;
  conv.messages = conv.messages.slice(0, index);
  conv.messages.push({role: "user", content: text});
  conv.title = titleOf(conv);
  generate(conv);
}

function stop() {
  if (running) running.controller.abort();
}

function select(id) {
  store.current = id;
  editing = null;
  save();
  renderAll();
}

function remove(id) {
  if (running && running.conv.id === id) stop();
  store.conversations = store.conversations.filter((c) => c.id !== id);
  if (store.current === id) store.current = null;
  save();
  renderAll();
}

// -- rendering --------------------------------------------------------------------------------

// One notice above the conversation; `kind` lets the condition that raised it clear it.
function notice(text, kind = "other") {
  ui.notice.textContent = text;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = false;
}

function clearNotice(kind) {
  if (ui.notice.dataset.kind !== kind) return;
  ui.notice.textContent = "";
  ui.notice.hidden = true;
}

function setBusy(busy) {
  document.body.dataset.busy = String(busy);
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  for (const b of document.querySelectorAll(".msg .actions button")) b.disabled = busy;
}

function showSettings(open) {
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
}

function renderConversations() {
  ui.conversations.replaceChildren();
  for (const conv of store.conversations) {
    const li = el("li", conv.id === store.current ? "current" : "");
    li.dataset.id = conv.id;
    const open = el("button", "open", conv.title);
    open.type = "button";
    open.title = conv.title;
    open.addEventListener("click", () => select(conv.id));
    const del = el("button", "delete", "×");
    del.type = "button";
    del.title = "Delete this conversation";
    del.setAttribute("aria-label", "Delete conversation");
    del.addEventListener("click", () => {  // a second click confirms
      if (del.dataset.armed) return remove(conv.id);
      del.dataset.armed = "true";
      del.textContent = "Delete?";
      setTimeout(() => { delete del.dataset.armed; del.textContent = "×"; }, 4000);
    });
    li.append(open, del);
    ui.conversations.append(li);
  }
}

function renderBody(message, body) {
  body.replaceChildren();
  if (message.role === "user") body.textContent = message.content;
  else if (message.json) body.append(el("pre", "json", message.content));
  else renderMarkdown(message.content, body);
}

function renderMeta(message, meta) {
  meta.replaceChildren();
  if (message.pending) meta.append(el("span", "pending", "…"));
  if (message.stopped) meta.append(el("span", "stopped", "stopped"));
  if (message.finish === "length") meta.append(el("span", "length", "cut at the token limit"));
  if (message.dropped) {
    meta.append(el("span", "dropped", `the ${message.dropped} oldest messages no longer fit the context and were left out`));
  }
  if (message.error) meta.append(el("div", "error", message.error));
}

function actionButton(label, onClick) {
  const b = el("button", label.toLowerCase().replace(/\W+/g, "-"), label);
  b.type = "button";
  b.disabled = !!running;
  b.addEventListener("click", onClick);
  return b;
}

function renderMessage(conv, message, index) {
  const node = el("article", "msg " + message.role);
  node.dataset.index = String(index);
  node.dataset.role = message.role;
  const who = el("div", "who", message.role === "user" ? "You" : (model || "assistant"));
  const body = el("div", "body");
  const meta = el("div", "meta");
  const actions = el("div", "actions");
  node.append(who, body, meta, actions);
  if (index === editing) {
    const box = el("textarea", "edit-box");
    box.value = message.content;
    box.rows = Math.min(12, message.content.split("\n").length + 1);
    body.append(box);
    actions.append(actionButton("Save & send", () => resendEdited(index, box.value)),
                   actionButton("Cancel", () => { editing = null; renderAll(); }));
    setTimeout(() => box.focus(), 0);
    return node;
  }
  renderBody(message, body);
  renderMeta(message, meta);
  if (message.role === "user") {
    actions.append(actionButton("Edit", () => { editing = index; renderAll(); }));
  } else if (index === conv.messages.length - 1) {
    actions.append(actionButton("Regenerate", regenerate));
  }
  return node;
}

function renderMessages() {
  const conv = currentConversation();
  ui.messages.replaceChildren();
  if (!conv) {
    ui.messages.append(el("p", "empty", "Start a conversation below."));
    return;
  }
  conv.messages.forEach((m, i) => ui.messages.append(renderMessage(conv, m, i)));
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// One streaming reply changed: redraw just its message.
function updateReply(conv, reply) {
  if (conv.id !== store.current) return;
  const index = conv.messages.indexOf(reply);
  const node = ui.messages.querySelector(`.msg[data-index="${index}"]`);
  if (!node) return;
  const stick = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
  renderBody(reply, node.querySelector(".body"));
  renderMeta(reply, node.querySelector(".meta"));
  if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderAll() {
  renderConversations();
  renderMessages();
}

// -- start ------------------------------------------------------------------------------------

function init() {
  for (const id of ["model", "notice", "messages", "conversations", "input", "send", "stop", "settings",
                    ...Object.keys(DEFAULT_SETTINGS)]) ui[id] = $(id);
  ui.settingsToggle = $("settings-toggle");
  ui.composer = $("composer");

  const saved = loadJSON(SETTINGS_KEY, validSettings, {});
  for (const name of Object.keys(DEFAULT_SETTINGS)) {
    if (saved[name] !== undefined) settings[name] = saved[name];
  }
  store = loadJSON(STORE_KEY, validStore, store);
  for (const conv of store.conversations) {  // a reply that was streaming when the page closed
    for (const m of conv.messages) {
      if (m.pending) { delete m.pending; m.stopped = true; }
    }
  }
  if (!currentConversation()) store.current = null;

  for (const [name, value] of Object.entries(settings)) {
    const input = ui[name];
    if (input.type === "checkbox") input.checked = value;
    else input.value = value;
    input.addEventListener("input", () => {
      settings[name] = input.type === "checkbox" ? input.checked : input.value;
      saveSettings();
    });
  }
  ui.api_key.addEventListener("change", checkKey);
  ui.settingsToggle.addEventListener("click", () => showSettings(ui.settings.hidden));
  ui.settings.addEventListener("submit", (e) => e.preventDefault());
  $("new-chat").addEventListener("click", () => select(null));
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send(ui.input.value);
  });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send(ui.input.value);
    }
  });
  ui.stop.addEventListener("click", stop);
  window.addEventListener("storage", (e) => {  // another tab changed the conversations
    if (e.key === STORE_KEY && !running) {
      store = loadJSON(STORE_KEY, validStore, store);
      renderAll();
    }
  });
  renderAll();
  setBusy(false);
  fetchModel();
}

document.addEventListener("DOMContentLoaded", init);
