// orion's memory dashboard: plain JavaScript, no library, no build step.
//
// It reads the document `orion ps` shows (GET /api/orion/ps), the server's memory history
// (GET /api/orion/history), the models here (GET /v1/models) and the event stream
// (GET /api/orion/events, read with fetch(): EventSource cannot send the API key's header), and acts
// through the management API `orion load` and `orion stop` use (POST /api/orion/load, /api/orion/unload).
//
// Safety: nothing the server sends is ever parsed as HTML. A model's name is user input: every text
// goes in with textContent or as a text node (el() below), never innerHTML. The API key is sent only
// as an Authorization header, never in a URL, and kept in this tab's sessionStorage.
"use strict";

(() => {
  const KEY_STORE = "orion-api-key";
  const PS_EVERY_MS = 1000;
  const HISTORY_EVERY_MS = 2000;
  const MODELS_HERE_EVERY_MS = 10000;
  const EVENTS_KEPT = 200;

  const state = {
    key: sessionStorage.getItem(KEY_STORE) || "",
    auth: false,
    running: false,
    lastSeq: 0,
    pid: null, // the server's: a restarted server numbers its events from 1 again
    stream: null,
    timers: [],
    rows: new Map(), // model key -> {row, cells}
    ps: null,
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ DOM without HTML

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) node.append(child); // a string becomes a text node
    return node;
  }

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // ------------------------------------------------------------------ numbers, as orion writes them

  function formatBytes(n) {
    if (n === null || n === undefined) return "unknown";
    const sign = n < 0 ? "-" : "";
    let value = Math.abs(n);
    for (const [unit, factor] of [["TiB", 1024 ** 4], ["GiB", 1024 ** 3], ["MiB", 1024 ** 2], ["KiB", 1024]]) {
      if (value >= factor) {
        const scaled = value / factor;
        return sign + (scaled < 100 ? scaled.toFixed(1) : scaled.toFixed(0)) + " " + unit;
      }
    }
    return sign + value.toFixed(0) + " B";
  }

  function formatSeconds(s) {
    if (s === null || s === undefined) return "";
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function percent(part, whole) {
    return whole > 0 ? Math.max(0, Math.min(100, (100 * part) / whole)) : 0;
  }

  function clock(at) {
    return new Date(at * 1000).toLocaleTimeString([], { hour12: false });
  }

  // ------------------------------------------------------------------ the API

  class Refused extends Error {}

  async function api(path, { method = "GET", body, raw = false, signal } = {}) {
    const headers = {};
    if (state.key) headers.Authorization = "Bearer " + state.key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, signal, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      refused();
      throw new Refused("the server refused the API key");
    }
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try {
        const doc = await response.json();
        const err = doc && doc.error;
        if (err && typeof err.message === "string") message = err.message + (err.hint ? " (" + err.hint + ")" : "");
      } catch (_) { /* not JSON: the status says it */ }
      throw new Error(message);
    }
    return raw ? response : response.json();
  }

  function setStatus(text, kind) {
    const node = $("status");
    setText(node, text);
    node.className = kind || "";
  }

  // ------------------------------------------------------------------ the key

  function askKey(message, bad) {
    stop();
    $("dashboard").hidden = true;
    $("key-form").hidden = false;
    const note = $("key-message");
    note.textContent = message;
    note.className = bad ? "bad" : "";
    setStatus(bad ? "refused" : "API key required", "bad");
    $("key-input").focus();
  }

  function refused() {
    if (!state.running && !$("key-form").hidden) return;
    state.key = "";
    sessionStorage.removeItem(KEY_STORE);
    askKey("Refused: the API key is missing or wrong.", true);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    $("key-input").value = "";
    if (!key) return;
    state.key = key;
    sessionStorage.setItem(KEY_STORE, key);
    begin();
  });

  // ------------------------------------------------------------------ polling

  function every(ms, fn) {
    let timer = null;
    const tick = async () => {
      if (!state.running) return;
      try {
        await fn();
      } catch (err) {
        if (err instanceof Refused) return;
        setStatus("server unreachable: " + err.message, "bad");
      }
      if (state.running) {
        timer = setTimeout(tick, ms);
        state.timers.push(timer);
      }
    };
    tick();
  }

  function stop() {
    state.running = false;
    for (const timer of state.timers) clearTimeout(timer);
    state.timers = [];
    if (state.stream) state.stream.abort();
    state.stream = null;
  }

  async function refreshPs() {
    const doc = await api("/api/orion/ps");
    state.ps = doc;
    renderMachine(doc);
    renderModels(doc);
    setStatus("live · " + clock(Date.now() / 1000), "ok");
  }

  async function refreshHistory() {
    renderCharts(await api("/api/orion/history"));
  }

  async function refreshModelsHere() {
    const doc = await api("/v1/models");
    const select = $("load-select");
    const chosen = select.value;
    const names = doc.data.map((m) => m.id + "\u0000" + m.kind).join("\n");
    if (select.dataset.names === names) return;
    select.dataset.names = names;
    select.replaceChildren(...doc.data.map((m) => {
      const option = el("option", "", m.id + " (" + m.kind + ")");
      option.value = m.id;
      option.dataset.kind = m.kind;
      return option;
    }));
    if (doc.data.some((m) => m.id === chosen)) select.value = chosen;
  }

  async function begin() {
    $("key-form").hidden = true;
    $("dashboard").hidden = false;
    stop();
    state.running = true;
    every(PS_EVERY_MS, refreshPs);
    every(HISTORY_EVERY_MS, refreshHistory);
    every(MODELS_HERE_EVERY_MS, refreshModelsHere);
    streamEvents();
  }

  function showServer(health) {
    if (state.pid !== null && health.pid !== state.pid) {
      state.lastSeq = 0; // another server: its events are all new
      $("timeline").replaceChildren();
    }
    state.pid = health.pid;
    setText($("server"), "v" + health.version + " · pid " + health.pid + " · " + health.home);
  }

  async function start() {
    let health;
    try {
      const response = await fetch("/health", { cache: "no-store" });
      health = await response.json();
    } catch (err) {
      setStatus("server unreachable: " + err.message, "bad");
      setTimeout(start, 3000);
      return;
    }
    showServer(health);
    state.auth = Boolean(health.auth);
    if (state.auth && !state.key) {
      askKey("This server requires its API key.", false);
      return;
    }
    begin();
  }

  // ------------------------------------------------------------------ the machine

  function bar(title, detail, total, others, orion, budget, lines) {
    const block = el("div", "bar-block");
    block.append(el("div", "bar-title", el("span", "", title), el("span", "", detail)));
    const track = el("div", "bar");
    const seg1 = el("div", "seg others");
    seg1.style.left = "0%";
    seg1.style.width = percent(others, total) + "%";
    const seg2 = el("div", "seg orion");
    seg2.style.left = percent(others, total) + "%";
    seg2.style.width = percent(orion, total) + "%";
    track.append(seg1, seg2);
    if (budget !== null && budget !== undefined) {
      const mark = el("div", "mark budget");
      mark.style.left = percent(others + budget, total) + "%";
      mark.title = "budget: orion's models may fill up to here (" + formatBytes(budget) + ")";
      track.append(mark);
    }
    for (const [name, fraction] of lines) {
      const mark = el("div", "mark " + name);
      mark.style.left = 100 * fraction + "%";
      mark.title = name + " pressure line (" + Math.round(100 * fraction) + " %)";
      track.append(mark);
    }
    block.append(track);
    return block;
  }

  function legend(withLines, high, critical) {
    const item = (cls, text) => el("span", "", el("span", "swatch " + cls), text);
    const items = [item("others", "other processes"), item("orion", "orion's models"), item("free", "free"),
      item("budget", "budget")];
    if (withLines) {
      items.push(item("high", "high " + Math.round(100 * high) + " %"),
        item("critical", "critical " + Math.round(100 * critical) + " %"));
    }
    return el("div", "legend", ...items);
  }

  function renderMachine(doc) {
    const m = doc.machine;
    const ram = m.ram;
    const lines = [["high", doc.pressure.high], ["critical", doc.pressure.critical]];
    const free = Math.max(0, ram.limit_bytes - ram.in_use_bytes);
    const blocks = [bar("RAM (" + ram.source + ")",
      formatBytes(ram.in_use_bytes) + " in use of " + formatBytes(ram.limit_bytes) + " · orion's models " +
      formatBytes(ram.orion_bytes) + " of a budget of " + formatBytes(ram.budget_bytes) + " · others " +
      formatBytes(ram.others_bytes) + " · free " + formatBytes(free),
      ram.limit_bytes, ram.others_bytes, ram.orion_bytes, ram.budget_bytes, lines), legend(true, doc.pressure.high,
      doc.pressure.critical)];
    for (const g of m.gpus) {
      blocks.push(bar("GPU " + g.index + " (" + g.name + ")",
        formatBytes(g.used_bytes) + " in use of " + formatBytes(g.total_bytes) + " · orion's models " +
        formatBytes(g.orion_bytes) + (g.budget_bytes === null ? "" : " of a budget of " + formatBytes(g.budget_bytes)) +
        " · others " + formatBytes(g.others_bytes) + " · free " + formatBytes(Math.max(0, g.total_bytes - g.used_bytes)),
        g.total_bytes, g.others_bytes, g.orion_bytes, g.budget_bytes, []));
    }
    $("bars").replaceChildren(...blocks);

    const p = doc.pressure;
    $("pressure").replaceChildren("pressure ", el("span", "level-" + p.level, p.level + " (" + Math.round(100 * p.ratio) + " %)"),
      " · " + doc.models.length + " of " + doc.max_models + " models");

    const rpc = $("rpc");
    rpc.hidden = m.rpc_servers.length === 0;
    rpc.tBodies[0].replaceChildren(...m.rpc_servers.map((r) => el("tr", "",
      el("td", "", r.endpoint), el("td", "num", formatBytes(r.orion_bytes)),
      el("td", "num", r.budget_bytes === null ? "not asked yet" : formatBytes(r.budget_bytes)),
      el("td", "", r.devices === null ? "not asked yet (asked when a model is split there)"
        : r.devices.map((d) => "#" + d.device + ": " + formatBytes(d.free_bytes) + " free of " +
          formatBytes(d.total_bytes)).join(", ")))));
  }

  // ------------------------------------------------------------------ the models

  const COLUMNS = ["name", "kind", "type", "where", "memory", "idle", "unloads", "pinned", "in-use", "queue",
    "requests", "speed", "actions"];

  function memoryCell(m) {
    return m.memory.map((r) => {
      const line = el("div", "device", r.device + ": " + formatBytes(r.estimate_bytes) + " / " +
        (r.measured_bytes === null ? "not measured" : formatBytes(r.measured_bytes)));
      if (r.error !== null) {
        line.append(" ", el("span", r.error < 0 ? "err-neg" : "err-pos",
          "(" + (r.error >= 0 ? "+" : "") + (100 * r.error).toFixed(1) + " %)"));
      }
      return line;
    });
  }

  function unloadsText(m) {
    if (m.expires_in_s !== null) return "in " + formatSeconds(m.expires_in_s);
    if (m.pinned) return "never (pinned)";
    if (m.in_use) return "not while in use";
    return "never (no keep-alive)";
  }

  function newRow(key) {
    const row = el("tr");
    row.dataset.key = key;
    const cells = {};
    for (const name of COLUMNS) {
      cells[name] = el("td", name);
      row.append(cells[name]);
    }
    for (const name of ["idle", "queue", "requests", "speed"]) cells[name].classList.add("num");
    const pin = el("button", "pin", "pin");
    pin.type = "button";
    const unload = el("button", "unload", "unload");
    unload.type = "button";
    cells.actions.append(pin, unload);
    return { row, cells, pin, unload, model: null };
  }

  function renderModels(doc) {
    const tbody = $("models").tBodies[0];
    const seen = new Set();
    doc.models.forEach((m, i) => {
      seen.add(m.key);
      let entry = state.rows.get(m.key);
      if (!entry) {
        entry = newRow(m.key);
        entry.pin.addEventListener("click", () => pinModel(entry.model, entry.pin));
        entry.unload.addEventListener("click", () => unloadModel(entry.model, entry.unload));
        state.rows.set(m.key, entry);
      }
      entry.model = m;
      const c = entry.cells;
      setText(c.name, m.name);
      c.name.title = m.file;
      setText(c.kind, m.kind);
      setText(c.type, m.type);
      setText(c.where, m.placement + " · " + m.memory.map((r) => r.device).join(" + "));
      c.memory.replaceChildren(...memoryCell(m));
      setText(c.idle, formatSeconds(m.idle_s));
      setText(c.unloads, unloadsText(m));
      setText(c.pinned, m.pinned ? "yes" : "no");
      setText(c["in-use"], m.in_use ? "yes (" + m.users + ")" : "no");
      setText(c.queue, String(m.queue_depth));
      setText(c.requests, String(m.requests));
      setText(c.speed, m.last_tok_s === null ? "-" : m.last_tok_s.toFixed(1));
      setText(entry.pin, m.pinned ? "unpin" : "pin");
      if (tbody.rows[i] !== entry.row) tbody.insertBefore(entry.row, tbody.rows[i] || null);
    });
    for (const [key, entry] of state.rows) {
      if (!seen.has(key)) {
        entry.row.remove();
        state.rows.delete(key);
      }
    }
    $("no-models").hidden = doc.models.length > 0;
    setText($("model-count"), "(" + doc.models.length + " of " + doc.max_models + ")");
  }

  function say(text, bad) {
    const node = $("action-message");
    node.textContent = text;
    node.className = bad ? "bad" : "";
  }

  async function act(button, doing, done, call) {
    button.disabled = true;
    say(doing, false);
    try {
      await call();
      say(done, false);
      await refreshPs();
    } catch (err) {
      if (!(err instanceof Refused)) say(err.message, true);
    } finally {
      button.disabled = false;
    }
  }

  function unloadModel(m, button) {
    return act(button, "unloading " + m.name + "…", "unloaded " + m.name,
      () => api("/api/orion/unload", { method: "POST", body: { model: m.name } }));
  }

  function pinModel(m, button) {
    const pin = !m.pinned;
    return act(button, (pin ? "pinning " : "unpinning ") + m.name + "…", (pin ? "pinned " : "unpinned ") + m.name,
      () => api("/api/orion/load", { method: "POST", body: { model: m.name, pin, embedding: m.kind === "encoder" } }));
  }

  $("load-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const select = $("load-select");
    const option = select.selectedOptions[0];
    if (!option) return;
    const body = { model: option.value, embedding: option.dataset.kind === "encoder" };
    if ($("load-pin").checked) body.pin = true;
    act($("load-button"), "loading " + option.value + "…", "loaded " + option.value,
      () => api("/api/orion/load", { method: "POST", body }));
  });

  // ------------------------------------------------------------------ the chart

  function chart(title, samples, pick, limit, lines) {
    const W = 720, H = 170, L = 56, R = 8, T = 16, B = 22;
    const node = svg("svg", { viewBox: "0 0 " + W + " " + H, class: "chart", role: "img" });
    node.append(svg("title", {}, title));
    node.append(svg("text", { x: L, y: 11 }, title));
    const top = Math.max(limit || 0, ...samples.map((s) => pick(s).inUse)) || 1;
    const t1 = samples.length ? samples[samples.length - 1].at : 0;
    const t0 = samples.length ? Math.min(samples[0].at, t1 - 60) : 0;
    const x = (t) => L + ((W - L - R) * (t - t0)) / Math.max(1, t1 - t0);
    const y = (v) => T + (H - T - B) * (1 - v / top);
    node.append(svg("line", { class: "axis", x1: L, y1: y(0), x2: W - R, y2: y(0) }));
    node.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: y(0) }));
    node.append(svg("text", { x: 2, y: T + 4 }, formatBytes(top)));
    node.append(svg("text", { x: 2, y: y(0) }, "0"));
    node.append(svg("text", { x: L, y: H - 6 }, "-" + formatSeconds(t1 - t0)));
    node.append(svg("text", { x: W - R - 24, y: H - 6 }, "now"));
    for (const [cls, value] of lines) {
      if (value === null || value === undefined) continue;
      node.append(svg("line", { class: cls, x1: L, y1: y(value), x2: W - R, y2: y(value) }));
    }
    for (const [cls, field] of [["in-use", "inUse"], ["orion", "orion"]]) {
      const points = samples.map((s) => x(s.at).toFixed(1) + "," + y(pick(s)[field]).toFixed(1)).join(" ");
      node.append(svg("polyline", { class: cls, points }));
    }
    return node;
  }

  function renderCharts(history) {
    const samples = history.samples;
    const ps = state.ps;
    const charts = [];
    const ram = ps ? ps.machine.ram : null;
    const limit = ram ? ram.limit_bytes : 0;
    const lines = ram ? [["high", limit * ps.pressure.high], ["critical", limit * ps.pressure.critical]] : [];
    charts.push(chart("RAM: in use (grey), orion's models (blue); pressure lines dashed", samples,
      (s) => ({ inUse: s.ram_in_use_bytes, orion: s.ram_orion_bytes }), limit, lines));
    const gpus = ps ? ps.machine.gpus : [];
    for (const g of gpus) {
      const pick = (s) => {
        const found = s.gpus.find((x) => x.index === g.index) || { used_bytes: 0, orion_bytes: 0 };
        return { inUse: found.used_bytes, orion: found.orion_bytes };
      };
      charts.push(chart("GPU " + g.index + ": in use (grey), orion's models (blue)", samples, pick, g.total_bytes,
        [["budget", g.budget_bytes === null ? null : g.others_bytes + g.budget_bytes]]));
    }
    $("charts").replaceChildren(...charts);
  }

  // ------------------------------------------------------------------ the events

  function addEvent(doc) {
    if (typeof doc.seq === "number") {
      if (doc.seq <= state.lastSeq) return; // seen already (a reconnection replays from the last seen)
      state.lastSeq = doc.seq;
    }
    const kind = String(doc.kind);
    const item = el("li", "event", el("span", "at", clock(doc.at)),
      el("span", "kind kind-" + kind.replace(/[^a-z]/g, ""), kind), el("span", "detail", doc.detail || doc.model));
    item.dataset.kind = kind;
    const list = $("timeline");
    list.prepend(item); // newest first
    while (list.children.length > EVENTS_KEPT) list.lastElementChild.remove();
    if (["loaded", "evicted", "unloaded", "gone", "failed"].includes(kind) && state.running) {
      refreshPs().catch(() => {});
    }
  }

  async function streamEvents(again = false) {
    const controller = new AbortController();
    state.stream = controller;
    try {
      if (again) showServer(await (await fetch("/health", { cache: "no-store", signal: controller.signal })).json());
      const response = await api("/api/orion/events?since=" + state.lastSeq, { raw: true, signal: controller.signal });
      setText($("stream-state"), "live");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of block.split("\n")) {
            if (line.startsWith("data: ")) addEvent(JSON.parse(line.slice(6)));
          }
        }
      }
    } catch (err) {
      if (err instanceof Refused || controller.signal.aborted) return;
    }
    if (state.stream === controller && state.running) {
      setText($("stream-state"), "reconnecting…");
      state.timers.push(setTimeout(() => { if (state.running) streamEvents(true); }, 2000));
    }
  }

  start();
})();
