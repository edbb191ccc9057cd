// Plait's web console. It talks only to this server's public HTTP API (same origin), with the key
// the user gives it (kept in sessionStorage), so it can show and do nothing a client could not.
// No framework and no build step: views are plain functions that fill <main id="view">.

const KEY_STORAGE = "plait.key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const state = { admin: null, baseModel: null, timers: [], playground: null };

// --- the API --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, error) {
    super(message);
    this.status = status;
    this.error = error;
  }
}

function authHeaders(extra = {}) {
  const headers = new Headers(extra);
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

// Fetches `path`; a non-2xx answer throws ApiError with the API's own message.
async function request(path, { method = "GET", json, body, headers, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const res = await fetch(path, init);
  if (!res.ok) throw await apiError(res);
  return res;
}

async function apiError(res) {
  let error = null;
  try {
    error = (await res.json()).error || null;
  } catch {
    // not JSON: fall back to the status line
  }
  const message = error && error.message ? error.message : `${res.status} ${res.statusText}`;
  if (res.status === 401 && error) noteUnauthorized(error.message);
  return new ApiError(res.status, message, error);
}

const api = {
  get: async (path) => (await request(path)).json(),
  post: async (path, json) => (await request(path, { method: "POST", json })).json(),
  form: async (path, form) => (await request(path, { method: "POST", body: form })).json(),
  del: async (path) => (await request(path, { method: "DELETE" })).json(),
};

// A 401 naming the admin key means this key may read but not change things.
function noteUnauthorized(message) {
  if (/admin key/i.test(message)) setAdmin(false);
  else showKeyPanel(message);
}

// Whether the key may change adapters: a DELETE of an adapter that does not exist is refused with
// 401 before anything is looked up when the key is not the admin's, and is a 404 when it is.
async function probeAdmin() {
  const res = await fetch("/v1/adapters/console-admin-probe-does-not-exist", {
    method: "DELETE",
    headers: authHeaders(),
  });
  setAdmin(res.status !== 401);
}

function setAdmin(admin) {
  state.admin = admin;
  document.body.classList.toggle("read-only", admin === false);
  const key = sessionStorage.getItem(KEY_STORAGE);
  $("#key-status").textContent =
    (key ? "key set" : "no key") + (admin === false ? " · read-only (no admin key)" : admin ? " · admin" : "");
  for (const el of document.querySelectorAll(".admin-only")) {
    for (const control of el.matches("button, input, select, textarea") ? [el] : el.querySelectorAll("button, input, select, textarea")) {
      control.disabled = admin === false;
    }
    el.title = admin === false ? "Needs the admin key" : "";
  }
}

// --- DOM helpers ----------------------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function field(label, control) {
  return h("label", { class: "field" }, h("span", {}, label), control);
}

function errorBox() {
  return h("p", { class: "error", hidden: true, role: "alert" });
}

function showError(box, err) {
  box.hidden = !err;
  box.textContent = err ? err.message || String(err) : "";
}

const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
const fmtBytes = (n) =>
  n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`;

function every(ms, fn) {
  fn();
  state.timers.push(setInterval(fn, ms));
}

// --- Prometheus text --------------------------------------------------------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v.replace(/\\(.)/g, "$1");
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

const metricSum = (samples, name) => samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);

function byAdapter(samples, name) {
  const out = {};
  for (const s of samples) if (s.name === name && s.labels.adapter !== undefined) out[s.labels.adapter] = s.value;
  return out;
}

async function fetchMetrics() {
  const res = await fetch("/metrics", { headers: authHeaders() });
  if (!res.ok) throw await apiError(res);
  return parseMetrics(await res.text());
}

// Adapters in a device slot now: each load into a slot and each eviction from one is counted per
// adapter id, so an id with more loads than evictions holds a slot.
function residentAdapters(samples) {
  const loads = byAdapter(samples, "plait_adapter_loads_total");
  const evictions = byAdapter(samples, "plait_adapter_evictions_total");
  return new Set(Object.keys(loads).filter((id) => loads[id] > (evictions[id] || 0)));
}

// --- a small SVG line chart -------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

// series: [{name, class, points: [[x, y], ...]}]
function lineChart(series, { width = 640, height = 260, xLabel = "", yLabel = "", fromZero = false } = {}) {
  const pad = { l: 52, r: 16, t: 22, b: 36 };
  const all = series.flatMap((se) => se.points);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  if (!all.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "no points yet"));
    return svg;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const margin = (y1 - y0) * 0.08;
  [y0, y1] = [fromZero ? 0 : y0 - margin, y1 + margin];
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const Y = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(s("line", { x1: pad.l, x2: width - pad.r, y1: Y(y), y2: Y(y), class: "grid" }));
    svg.append(s("text", { x: pad.l - 6, y: Y(y) + 4, "text-anchor": "end", class: "tick" }, y.toPrecision(3)));
  }
  // whole-number ticks when the x values are whole numbers (steps), else five even ones
  const whole = xs.every(Number.isInteger);
  const stride = whole ? Math.max(1, Math.ceil((x1 - x0) / 8)) : (x1 - x0) / 4;
  for (let x = x0; x <= x1 + 1e-9; x += stride) {
    const label = whole ? x : x.toFixed(1);
    svg.append(s("text", { x: X(x), y: height - pad.b + 16, "text-anchor": "middle", class: "tick" }, label));
  }
  svg.append(s("text", { x: (width + pad.l) / 2, y: height - 4, "text-anchor": "middle", class: "axis" }, xLabel));
  svg.append(s("text", { x: pad.l, y: 12, "text-anchor": "end", class: "axis" }, yLabel));
  series.forEach((se, i) => {
    if (!se.points.length) return;
    const d = se.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(s("path", { d, class: `line ${se.class}` }));
    for (const p of se.points) {
      svg.append(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, class: `pt ${se.class}` }, s("title", {}, `${se.name} ${p[1]} at ${p[0]}`)));
    }
    const lx = width - pad.r - 110;
    svg.append(s("circle", { cx: lx, cy: pad.t + 6 + i * 16, r: 4, class: `key ${se.class}` }));
    svg.append(s("text", { x: lx + 10, y: pad.t + 10 + i * 16, class: "legend" }, se.name));
  });
  return svg;
}

// --- Models -----------------------------------------------------------------------------------------

async function modelsView(view) {
  const err = errorBox();
  const base = h("div");
  const adapters = h("div");
  const fusions = h("div");
  const uploadErr = errorBox();
  const fusionErr = errorBox();

  const upload = uploadForm(uploadErr, () => refresh());
  const fusionForm = h("form", { class: "card admin-only", id: "fusion-form" });
  view.append(
    h("h1", {}, "Models"),
    err,
    h("section", { class: "card" }, h("h2", {}, "Base model"), base),
    h("section", { class: "card" }, h("h2", {}, "Adapters"), adapters),
    h("section", { class: "card" }, h("h2", {}, "Fusions"), fusions),
    h("div", { class: "columns" }, upload, fusionForm),
  );

  async function refresh() {
    try {
      const [models, adapterList, fusionList] = await Promise.all([
        api.get("/v1/models"),
        api.get("/v1/adapters"),
        api.get("/v1/fusions"),
      ]);
      let resident = null;
      try {
        resident = residentAdapters(await fetchMetrics());
      } catch {
        resident = null;
      }
      showError(err, null);
      const card = models.data.find((m) => !m.parent) || models.data[0];
      state.baseModel = card.id;
      base.replaceChildren(
        table(["id", "max model length", "created", ""], [[card.id, card.max_model_len, fmtTime(card.created), chatButton(card.id)]], "base"),
      );
      // Chat with it, or delete it through its route (`adapters` or `fusions`).
      const rowActions = (id, kind) =>
        h("span", { class: "actions" }, chatButton(id), deleteButton(`/v1/${kind}/${encodeURIComponent(id)}`, id, err, refresh));
      adapters.replaceChildren(
        adapterList.data.length
          ? table(
              ["id", "rank", "target modules", "size", "version", "created", "on the device", ""],
              adapterList.data.map((a) => [
                h("span", { class: "mono" }, a.id),
                a.rank,
                a.target_modules.join(", "),
                fmtBytes(a.size_bytes),
                a.version,
                fmtTime(a.created),
                resident === null ? "?" : resident.has(a.id) ? h("span", { class: "badge on" }, "resident") : "no",
                rowActions(a.id, "adapters"),
              ]),
              "adapters",
            )
          : h("p", { class: "muted" }, "No adapters yet."),
      );
      fusions.replaceChildren(
        fusionList.data.length
          ? table(
              ["id", "members", "router", "top k / weights", "created", ""],
              fusionList.data.map((f) => [
                h("span", { class: "mono" }, f.id),
                f.members.join(", "),
                f.router,
                f.weights ? f.weights.join(", ") : `top ${f.top_k}, temperature ${f.temperature}`,
                fmtTime(f.created),
                rowActions(f.id, "fusions"),
              ]),
              "fusions",
            )
          : h("p", { class: "muted" }, "No fusions yet."),
      );
      fillFusionForm(fusionForm, adapterList.data, fusionErr, refresh);
      setAdmin(state.admin);
    } catch (e) {
      showError(err, e);
    }
  }
  await refresh();
  state.timers.push(setInterval(refresh, 10000));
}

function table(headers, rows, id) {
  return h(
    "table",
    { id: id ? `${id}-table` : null },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))),
  );
}

function chatButton(model) {
  return h("button", { class: "small secondary", type: "button", onclick: () => openPlayground(model) }, "Chat");
}

function deleteButton(path, id, err, after) {
  return h(
    "button",
    {
      class: "small danger admin-only",
      type: "button",
      "aria-label": `Delete ${id}`,
      onclick: async () => {
        if (!confirm(`Delete ${id}?`)) return;
        try {
          await api.del(path);
          showError(err, null);
        } catch (e) {
          showError(err, e);
        }
        after();
      },
    },
    "Delete",
  );
}

function uploadForm(err, after) {
  const id = h("input", { name: "id", required: true, placeholder: "adapter id", id: "upload-id" });
  const input = h("input", {
    type: "file",
    multiple: true,
    id: "upload-files",
    accept: ".json,.safetensors,.zip,.tar,.gz,.tgz",
  });
  const picked = h("p", { class: "muted" }, "adapter_config.json + adapter_model.safetensors, or one zip/tar");
  let dropped = null;
  const zone = h("div", { class: "drop" }, "Drop the files here or ", input, picked);
  const names = (files) => [...files].map((f) => `${f.name} (${fmtBytes(f.size)})`).join(", ");
  input.addEventListener("change", () => {
    dropped = null;
    picked.textContent = names(input.files);
  });
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    dropped = [...e.dataTransfer.files];
    picked.textContent = names(dropped);
  });
  const done = h("p", { class: "ok", hidden: true });
  const form = h(
    "form",
    {
      class: "card admin-only",
      id: "upload-form",
      onsubmit: async (e) => {
        e.preventDefault();
        const files = dropped || [...input.files];
        const body = new FormData();
        body.append("id", id.value.trim());
        for (const f of files) body.append("files", f, f.name);
        done.hidden = true;
        try {
          const stored = await api.form("/v1/adapters", body);
          showError(err, null);
          done.hidden = false;
          done.textContent = `Uploaded ${stored.id} (version ${stored.version}, rank ${stored.rank}).`;
          id.value = "";
          input.value = "";
          dropped = null;
        } catch (ex) {
          showError(err, ex);
        }
        after();
      },
    },
    h("h2", {}, "Upload an adapter"),
    field("Id", id),
    zone,
    h("button", { type: "submit" }, "Upload"),
    err,
    done,
  );
  return form;
}

function fillFusionForm(form, adapters, err, after) {
  if (form.dataset.filled === adapters.map((a) => a.id).join("\n")) return;
  form.dataset.filled = adapters.map((a) => a.id).join("\n");
  const id = h("input", { required: true, placeholder: "fusion id", id: "fusion-id" });
  const members = h(
    "div",
    { class: "checks" },
    adapters.length
      ? adapters.map((a) => h("label", {}, h("input", { type: "checkbox", value: a.id }), " ", a.id))
      : h("span", { class: "muted" }, "upload adapters first"),
  );
  const router = h("select", {}, h("option", { value: "weights" }, "weights"), h("option", { value: "arrow" }, "arrow"));
  const weights = h("input", { placeholder: "e.g. 0.7, 0.3 (one per member)" });
  const topK = h("input", { type: "number", min: 1, placeholder: "default 3" });
  const sync = () => {
    weights.closest("label").hidden = router.value !== "weights";
    topK.closest("label").hidden = router.value !== "arrow";
  };
  router.addEventListener("change", sync);
  form.onsubmit = async (e) => {
    e.preventDefault();
    const body = {
      id: id.value.trim(),
      members: [...members.querySelectorAll("input:checked")].map((c) => c.value),
      router: router.value,
    };
    if (router.value === "weights" && weights.value.trim()) body.weights = weights.value.split(/[\s,]+/).filter(Boolean).map(Number);
    if (router.value === "arrow" && topK.value) body.top_k = Number(topK.value);
    try {
      await api.post("/v1/fusions", body);
      showError(err, null);
      form.dataset.filled = "";
    } catch (ex) {
      showError(err, ex);
    }
    after();
  };
  form.replaceChildren(
    h("h2", {}, "Create a fusion"),
    field("Id", id),
    field("Members", members),
    field("Router", router),
    field("Weights", weights),
    field("Top k", topK),
    h("button", { type: "submit" }, "Create fusion"),
    err,
  );
  sync();
}

// --- Playground -------------------------------------------------------------------------------------

function openPlayground(model) {
  state.playground = { ...(state.playground || {}), models: [model], compare: 1 };
  location.hash = "#playground";
}

async function modelIds() {
  const models = await api.get("/v1/models");
  return models.data.map((m) => m.id);
}

async function playgroundView(view) {
  const err = errorBox();
  let ids = [];
  try {
    ids = await modelIds();
  } catch (e) {
    showError(err, e);
  }
  const saved = state.playground || { models: [], compare: 1 };
  const system = h("textarea", { id: "system-prompt", rows: 2, placeholder: "System prompt (optional)" }, saved.system || "");
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: saved.temperature ?? 0.7 });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, value: saved.maxTokens ?? 256 });
  const logprobs = h("input", { id: "logprobs", type: "checkbox", checked: saved.logprobs || false });
  const compare = h(
    "select",
    { id: "compare" },
    [1, 2, 3].map((n) => h("option", { value: n, selected: n === saved.compare }, n === 1 ? "one model" : `compare ${n}`)),
  );
  const columns = h("div", { class: "chat-columns" });
  const input = h("textarea", { id: "chat-input", rows: 3, placeholder: "Message (Enter sends, Shift+Enter: new line)" });
  const send = h("button", { id: "send", type: "submit" }, "Send");
  const stop = h("button", { id: "stop", type: "button", class: "secondary", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "secondary" }, "Clear");
  const panes = [];

  function save() {
    state.playground = {
      models: panes.map((p) => p.select.value),
      compare: Number(compare.value),
      system: system.value,
      temperature: temperature.value,
      maxTokens: maxTokens.value,
      logprobs: logprobs.checked,
    };
  }

  function layout() {
    const n = Number(compare.value);
    while (panes.length > n) panes.pop().el.remove();
    while (panes.length < n) {
      const i = panes.length;
      const select = h("select", { class: "model-select", "aria-label": `Model ${i + 1}` }, ids.map((id) => h("option", { value: id }, id)));
      const want = saved.models[i] || ids[Math.min(i, ids.length - 1)];
      if (want && ids.includes(want)) select.value = want;
      const log = h("div", { class: "chat-log" });
      const el = h("div", { class: "pane", dataset: { pane: i } }, select, log);
      select.addEventListener("change", save);
      panes.push({ el, select, log, messages: [] });
      columns.append(el);
    }
    columns.style.setProperty("--n", n);
    save();
  }
  compare.addEventListener("change", layout);
  for (const c of [system, temperature, maxTokens, logprobs]) c.addEventListener("change", save);
  clear.addEventListener("click", () => {
    for (const p of panes) {
      p.messages = [];
      p.log.replaceChildren();
    }
  });

  let controllers = [];
  stop.addEventListener("click", () => controllers.forEach((c) => c.abort()));
  const form = h(
    "form",
    {
      class: "composer",
      onsubmit: async (e) => {
        e.preventDefault();
        const text = input.value.trim();
        if (!text) return;
        input.value = "";
        send.disabled = true;
        stop.disabled = false;
        controllers = panes.map(() => new AbortController());
        await Promise.all(panes.map((p, i) => streamInto(p, text, controllers[i].signal)));
        send.disabled = false;
        stop.disabled = true;
      },
    },
    input,
    h("div", { class: "buttons" }, send, stop, clear),
  );
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      form.requestSubmit();
    }
  });

  async function streamInto(pane, text, signal) {
    pane.messages.push({ role: "user", content: text });
    pane.log.append(h("div", { class: "msg user" }, text));
    const content = h("div", { class: "content" });
    const meta = h("div", { class: "meta" });
    const bubble = h("div", { class: "msg assistant streaming" }, content, meta);
    pane.log.append(bubble);
    const body = {
      model: pane.select.value,
      messages: [...(system.value.trim() ? [{ role: "system", content: system.value }] : []), ...pane.messages],
      stream: true,
      temperature: Number(temperature.value),
      max_tokens: Number(maxTokens.value),
    };
    if (logprobs.checked) Object.assign(body, { logprobs: true, top_logprobs: 5 });
    let answer = "";
    let finish = null;
    try {
      const res = await request("/v1/chat/completions", { method: "POST", json: body, signal });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error);
          const choice = (chunk.choices || [])[0];
          if (!choice) continue;
          const delta = choice.delta || {};
          const tokens = choice.logprobs && choice.logprobs.content;
          if (tokens && tokens.length) {
            for (const t of tokens) content.append(tokenSpan(t));
            answer += delta.content || "";
          } else if (delta.content) {
            answer += delta.content;
            content.append(delta.content);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
          if (chunk.fusion) meta.append(fusionReport(chunk.fusion));
          pane.log.scrollTop = pane.log.scrollHeight;
        }
      }
      pane.messages.push({ role: "assistant", content: answer });
      meta.prepend(h("span", { class: "muted" }, `${body.model} · ${finish || "stopped"}`));
    } catch (e) {
      if (e.name === "AbortError") {
        pane.messages.push({ role: "assistant", content: answer });
        meta.prepend(h("span", { class: "muted" }, `${body.model} · stopped`));
      } else {
        pane.messages.pop();
        bubble.classList.add("failed");
        meta.append(h("span", { class: "error" }, e.message));
      }
    }
    bubble.classList.remove("streaming");
    bubble.dataset.done = "1";
  }

  view.append(
    h("h1", {}, "Playground"),
    err,
    h(
      "div",
      { class: "card settings" },
      field("Models", compare),
      field("Temperature", temperature),
      field("Max tokens", maxTokens),
      h("label", { class: "field check" }, logprobs, h("span", {}, "Logprobs (hover a token)")),
      h("div", { class: "wide" }, field("System prompt", system)),
    ),
    columns,
    form,
  );
  layout();
  input.focus();
}

function tokenSpan(t) {
  const p = Math.exp(t.logprob);
  const top = (t.top_logprobs || []).map((x) => `${JSON.stringify(x.token)}  ${x.logprob.toFixed(3)}`).join("\n");
  const hue = Math.round(120 * p);
  return h(
    "span",
    {
      class: "tok",
      style: `--p: ${p.toFixed(3)}; --hue: ${hue}`,
      title: `${JSON.stringify(t.token)}: logprob ${t.logprob.toFixed(3)} (p ${(100 * p).toFixed(1)}%)\n${top}`,
      "data-tip": `logprob ${t.logprob.toFixed(3)} · p ${(100 * p).toFixed(1)}%\n${top}`,
    },
    t.token,
  );
}

function fusionReport(fusion) {
  return h(
    "div",
    { class: "fusion" },
    h("span", { class: "muted" }, `${fusion.router} routing:`),
    fusion.members.map((m) =>
      h(
        "span",
        { class: "member", title: `${m.id}: ${m.weight.toFixed(3)}` },
        h("span", { class: "bar", style: `width: ${Math.max(2, Math.round(60 * Math.abs(m.weight)))}px` }),
        ` ${m.id} ${m.weight.toFixed(2)}`,
      ),
    ),
  );
}

// --- Fine-tuning ------------------------------------------------------------------------------------

async function fineTuningView(view) {
  const fileErr = errorBox();
  const jobErr = errorBox();
  const listErr = errorBox();
  const fileInput = h("input", { type: "file", id: "training-file", accept: ".jsonl,.json,.txt" });
  const fileDone = h("p", { class: "ok", hidden: true });
  const trainingFile = h("select", { id: "job-training-file", required: true });
  const validationFile = h("select", { id: "job-validation-file" });
  const model = h("input", { id: "job-model", value: state.baseModel || "" });
  const suffix = h("input", { id: "job-suffix", placeholder: "optional" });
  const hp = {};
  for (const [name, attrs] of Object.entries({
    n_epochs: { min: 1, placeholder: "auto (3)" },
    batch_size: { min: 1, placeholder: "auto (4)" },
    learning_rate_multiplier: { step: "any", placeholder: "auto (1)" },
    lora_rank: { min: 1, placeholder: "16" },
    lora_alpha: { step: "any", placeholder: "32" },
  })) {
    hp[name] = h("input", { id: `hp-${name.replaceAll("_", "-")}`, type: "number", ...attrs });
  }
  const jobs = h("div");

  async function loadFiles() {
    const files = await api.get("/v1/files?purpose=fine-tune&limit=100");
    const options = files.data.map((f) => h("option", { value: f.id }, `${f.filename} · ${f.id} · ${fmtBytes(f.bytes)}`));
    const keep = trainingFile.value;
    trainingFile.replaceChildren(...options);
    if (keep) trainingFile.value = keep;
    validationFile.replaceChildren(h("option", { value: "" }, "none"), ...options.map((o) => o.cloneNode(true)));
  }

  async function loadJobs() {
    try {
      const list = await api.get("/v1/fine_tuning/jobs?limit=50");
      showError(listErr, null);
      jobs.replaceChildren(
        list.data.length
          ? table(
              ["job", "status", "model", "fine-tuned model", "created"],
              list.data.map((j) => [
                h("a", { href: `#job/${j.id}`, class: "mono" }, j.id),
                h("span", { class: `status ${j.status}` }, j.status),
                j.model,
                j.fine_tuned_model ? h("span", { class: "mono" }, j.fine_tuned_model) : "",
                fmtTime(j.created_at),
              ]),
              "jobs",
            )
          : h("p", { class: "muted" }, "No jobs yet."),
      );
    } catch (e) {
      showError(listErr, e);
    }
  }

  const uploadForm = h(
    "form",
    {
      class: "card admin-only",
      id: "file-form",
      onsubmit: async (e) => {
        e.preventDefault();
        const file = fileInput.files[0];
        if (!file) return;
        const body = new FormData();
        body.append("purpose", "fine-tune");
        body.append("file", file, file.name);
        fileDone.hidden = true;
        try {
          const stored = await api.form("/v1/files", body);
          showError(fileErr, null);
          fileDone.hidden = false;
          fileDone.textContent = `Stored ${stored.filename} as ${stored.id}.`;
          await loadFiles();
          trainingFile.value = stored.id;
        } catch (ex) {
          showError(fileErr, ex);
        }
      },
    },
    h("h2", {}, "Training file"),
    h("p", { class: "muted" }, "JSONL: chat messages, prompt/completion, Alpaca, or preference pairs. The server checks every line."),
    fileInput,
    h("button", { type: "submit" }, "Upload file"),
    fileErr,
    fileDone,
  );

  const jobForm = h(
    "form",
    {
      class: "card admin-only",
      id: "job-form",
      onsubmit: async (e) => {
        e.preventDefault();
        const hyperparameters = {};
        for (const [name, el] of Object.entries(hp)) if (el.value !== "") hyperparameters[name] = Number(el.value);
        const body = { model: model.value.trim(), training_file: trainingFile.value, hyperparameters };
        if (validationFile.value) body.validation_file = validationFile.value;
        if (suffix.value.trim()) body.suffix = suffix.value.trim();
        try {
          const job = await api.post("/v1/fine_tuning/jobs", body);
          showError(jobErr, null);
          location.hash = `#job/${job.id}`;
        } catch (ex) {
          showError(jobErr, ex);
        }
      },
    },
    h("h2", {}, "New job"),
    h(
      "div",
      { class: "grid" },
      field("Model", model),
      field("Training file", trainingFile),
      field("Validation file", validationFile),
      field("Suffix", suffix),
      Object.entries(hp).map(([name, el]) => field(name, el)),
    ),
    h("button", { type: "submit", id: "create-job" }, "Create job"),
    jobErr,
  );

  view.append(
    h("h1", {}, "Fine-tuning"),
    h("div", { class: "columns" }, uploadForm, jobForm),
    h("section", { class: "card" }, h("h2", {}, "Jobs"), listErr, jobs),
  );
  try {
    if (!state.baseModel) state.baseModel = (await api.get("/v1/models")).data.find((m) => !m.parent).id;
    if (!model.value) model.value = state.baseModel;
    await loadFiles();
  } catch (e) {
    showError(listErr, e);
  }
  setAdmin(state.admin);
  every(5000, loadJobs);
}

// Every page of a newest-first list, oldest first.
async function allPages(path, most = 20) {
  const items = [];
  let after = null;
  for (let i = 0; i < most; i++) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api.get(`${path}${sep}limit=1000${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return items.reverse();
}

async function jobView(view, jobId) {
  const err = errorBox();
  const summary = h("div");
  const chart = h("div", { class: "chart-box", id: "loss-chart" });
  const checkpoints = h("div");
  const events = h("ol", { class: "events" });
  const cancel = h("button", { type: "button", class: "danger admin-only", id: "cancel-job" }, "Cancel job");
  cancel.addEventListener("click", async () => {
    try {
      await api.post(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/cancel`);
      showError(err, null);
    } catch (e) {
      showError(err, e);
    }
    refresh();
  });
  view.append(
    h("p", {}, h("a", { href: "#fine-tuning" }, "← Fine-tuning")),
    h("h1", {}, "Job ", h("span", { class: "mono" }, jobId)),
    err,
    h("section", { class: "card" }, summary),
    h("section", { class: "card" }, h("h2", {}, "Loss"), chart),
    h("div", { class: "columns" }, h("section", { class: "card" }, h("h2", {}, "Checkpoints"), checkpoints), h("section", { class: "card" }, h("h2", {}, "Events"), events)),
  );
  let timer = null;
  async function refresh() {
    try {
      const job = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
      const [eventList, checkpointList] = await Promise.all([
        allPages(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events`),
        api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`),
      ]);
      showError(err, null);
      const hp = job.hyperparameters || {};
      summary.replaceChildren(
        h(
          "dl",
          { class: "facts" },
          h("dt", {}, "status"),
          h("dd", {}, h("span", { class: `status ${job.status}`, id: "job-status" }, job.status)),
          h("dt", {}, "model"),
          h("dd", {}, job.model),
          h("dt", {}, "method"),
          h("dd", {}, job.method ? job.method.type : "supervised"),
          h("dt", {}, "hyperparameters"),
          h("dd", { class: "mono" }, Object.entries(hp).map(([k, v]) => `${k} ${v}`).join(" · ")),
          h("dt", {}, "training file"),
          h("dd", { class: "mono" }, job.training_file),
          h("dt", {}, "created"),
          h("dd", {}, fmtTime(job.created_at)),
          job.finished_at ? [h("dt", {}, "finished"), h("dd", {}, fmtTime(job.finished_at))] : null,
          job.trained_tokens ? [h("dt", {}, "trained tokens"), h("dd", {}, job.trained_tokens)] : null,
          h("dt", {}, "fine-tuned model"),
          h(
            "dd",
            {},
            job.fine_tuned_model
              ? [
                  h("span", { class: "mono", id: "fine-tuned-model" }, job.fine_tuned_model),
                  " ",
                  h("button", { type: "button", class: "small", id: "open-playground", onclick: () => openPlayground(job.fine_tuned_model) }, "Open in playground"),
                ]
              : h("span", { class: "muted" }, "when the job succeeds"),
          ),
          job.error ? [h("dt", {}, "error"), h("dd", { class: "error" }, job.error.message)] : null,
        ),
        ...(TERMINAL.has(job.status) ? [] : [cancel]),
      );
      const metrics = eventList.filter((e) => e.type === "metrics" && e.data);
      const train = metrics.filter((e) => e.data.train_loss != null).map((e) => [e.data.step, e.data.train_loss]);
      const valid = metrics.filter((e) => e.data.valid_loss != null).map((e) => [e.data.step, e.data.valid_loss]);
      chart.replaceChildren(
        lineChart(
          [
            { name: "train loss", class: "train", points: train },
            { name: "valid loss", class: "valid", points: valid },
          ],
          { xLabel: "step", yLabel: "loss", width: 900, height: 300 },
        ),
      );
      checkpoints.replaceChildren(
        checkpointList.data.length
          ? table(
              ["step", "checkpoint", "metrics"],
              checkpointList.data.map((c) => [
                c.step_number,
                h("span", { class: "mono" }, c.fine_tuned_model_checkpoint),
                Object.entries(c.metrics || {})
                  .filter(([, v]) => v != null)
                  .map(([k, v]) => `${k} ${typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : v}`)
                  .join(" · "),
              ]),
              "checkpoints",
            )
          : h("p", { class: "muted" }, "None yet: one per epoch."),
      );
      events.replaceChildren(
        ...eventList
          .filter((e) => e.type !== "metrics")
          .slice(-30)
          .reverse()
          .map((e) => h("li", { class: e.level }, h("span", { class: "muted" }, new Date(e.created_at * 1000).toLocaleTimeString()), " ", e.message)),
      );
      setAdmin(state.admin);
      if (TERMINAL.has(job.status) && timer !== null) {
        clearInterval(timer);
        timer = null;
      }
    } catch (e) {
      showError(err, e);
    }
  }
  await refresh();
  timer = setInterval(refresh, 2000);
  state.timers.push(timer);
}

// --- Live -------------------------------------------------------------------------------------------

async function liveView(view) {
  const err = errorBox();
  const cards = h("div", { class: "stats" });
  const chart = h("div", { class: "chart-box" });
  const adapters = h("div");
  view.append(
    h("h1", {}, "Live"),
    h("p", { class: "muted" }, "From /metrics, every 3 seconds."),
    err,
    cards,
    h("section", { class: "card" }, h("h2", {}, "Tokens per second"), chart),
    h("section", { class: "card" }, h("h2", {}, "Adapters"), adapters),
  );
  let last = null;
  const history = [];
  const t0 = Date.now();
  async function refresh() {
    let samples;
    try {
      samples = await fetchMetrics();
      showError(err, null);
    } catch (e) {
      showError(err, e);
      return;
    }
    const now = Date.now();
    const generated = metricSum(samples, "plait_generation_tokens_total");
    const prompted = metricSum(samples, "plait_prompt_tokens_total");
    let genRate = null;
    let promptRate = null;
    if (last) {
      const dt = (now - last.time) / 1000;
      genRate = Math.max(0, (generated - last.generated) / dt);
      promptRate = Math.max(0, (prompted - last.prompted) / dt);
      history.push([(now - t0) / 1000, genRate]);
      if (history.length > 100) history.shift();
    }
    last = { time: now, generated, prompted };
    const kv = metricSum(samples, "vllm:kv_cache_usage_perc");
    const used = metricSum(samples, "plait_kv_blocks_used");
    const total = metricSum(samples, "plait_kv_blocks_total");
    const info = samples.find((x) => x.name === "vllm:lora_requests_info");
    const stat = (label, value, id) => h("div", { class: "stat", id }, h("div", { class: "value" }, value), h("div", { class: "label" }, label));
    cards.replaceChildren(
      stat("running", metricSum(samples, "plait_requests_running"), "stat-running"),
      stat("waiting", metricSum(samples, "plait_requests_waiting"), "stat-waiting"),
      stat("generated tokens/s", genRate === null ? "…" : genRate.toFixed(1), "stat-tps"),
      stat("prompt tokens/s", promptRate === null ? "…" : promptRate.toFixed(1)),
      stat("KV cache", `${(100 * kv).toFixed(1)}%`, "stat-kv"),
      stat("KV blocks", `${used} / ${total}`),
      stat("adapters on the device", `${metricSum(samples, "plait_adapters_resident")}${info ? ` / ${info.labels.max_lora}` : ""}`),
      stat("requests done", metricSum(samples, "plait_requests_total")),
    );
    chart.replaceChildren(lineChart([{ name: "generated", class: "train", points: history }], { xLabel: "seconds", yLabel: "tokens/s", width: 900, height: 200, fromZero: true }));
    const running = byAdapter(samples, "plait_adapter_requests_running");
    const waiting = byAdapter(samples, "plait_adapter_requests_waiting");
    const loads = byAdapter(samples, "plait_adapter_loads_total");
    const evictions = byAdapter(samples, "plait_adapter_evictions_total");
    const ids = [...new Set([...Object.keys(running), ...Object.keys(waiting), ...Object.keys(loads)])].sort();
    adapters.replaceChildren(
      ids.length
        ? table(
            ["adapter", "running", "waiting", "loads", "evictions", "on the device"],
            ids.map((id) => [
              h("span", { class: "mono" }, id),
              running[id] || 0,
              waiting[id] || 0,
              loads[id] || 0,
              evictions[id] || 0,
              (loads[id] || 0) > (evictions[id] || 0) ? h("span", { class: "badge on" }, "resident") : "no",
            ]),
            "live-adapters",
          )
        : h("p", { class: "muted" }, "No adapter has been used yet."),
    );
  }
  every(3000, refresh);
}

// --- the key panel and the router ---------------------------------------------------------------------

function showKeyPanel(reason) {
  const panel = $("#key-panel");
  panel.hidden = false;
  showError($("#key-error"), reason ? { message: reason } : null);
  $("#key-input").focus();
}

async function health() {
  try {
    const res = await fetch("/health");
    const body = await res.json();
    $("#server-status").textContent = res.ok ? `${body.model} · ${body.requests_in_flight} in flight` : body.error.message;
  } catch {
    $("#server-status").textContent = "server unreachable";
  }
}

const VIEWS = { models: modelsView, playground: playgroundView, "fine-tuning": fineTuningView, live: liveView };

async function route() {
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  const [name, arg] = (location.hash.slice(1) || "models").split("/");
  const view = $("#view");
  const fresh = h("div", { class: "view", dataset: { view: name } });
  view.replaceChildren(fresh);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === (name === "job" ? "fine-tuning" : name));
  if (name === "job" && arg) await jobView(fresh, decodeURIComponent(arg));
  else await (VIEWS[name] || modelsView)(fresh);
  setAdmin(state.admin);
}

// Checks the key against a read route; on success closes the panel and redraws.
async function useKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  const res = await fetch("/v1/models", { headers: authHeaders() });
  if (res.status === 401) {
    const error = await apiError(res);
    showKeyPanel(error.message);
    return false;
  }
  $("#key-panel").hidden = true;
  $("#key-input").value = "";
  await probeAdmin();
  await route();
  return true;
}

$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  useKey($("#key-input").value.trim());
});
$("#key-button").addEventListener("click", () => showKeyPanel(null));
$("#key-cancel").addEventListener("click", () => ($("#key-panel").hidden = true));
$("#key-clear").addEventListener("click", () => useKey(""));
window.addEventListener("hashchange", route);
health();
setInterval(health, 5000);
useKey(sessionStorage.getItem(KEY_STORAGE) || "");
