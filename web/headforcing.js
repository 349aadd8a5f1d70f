// Head Forcing for ComfyUI: the browser side of the pack (no build step, plain ES module).
//
// * Head map: on Profile Heads / Classify Heads / Load Head Profile, a layers x heads grid
//   coloured by head type, drawn from the node's UI data (`headforcing_head_map`, sent with
//   ComfyUI's `executed` event); hovering a cell shows that head's statistics.
// * Sampler panel: on the AR sampler (and any node that sends `headforcing.progress`), chunk
//   k of n, seconds of video done, the current segment's prompt, the KV cache in use and a
//   thumbnail of the newest chunk — one websocket message per committed chunk.
// * Policy estimate: on the Cache Policy node, the memory figure for the current widget
//   values, from the server's own computation (GET /headforcing/estimate).
//
// Payload formats: docs/web.md (server side: nodes/messages.py, nodes/routes.py).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "headforcing.web";
const EVENT_PROGRESS = "headforcing.progress";
const HEAD_MAP_KEY = "headforcing_head_map";
const HEAD_MAP_NODES = new Set([
  "HeadForcingProfileHeads",
  "HeadForcingClassifyHeads",
  "HeadForcingLoadHeadProfile",
]);
const SAMPLER_NODES = new Set(["HeadForcingARSampler", "HeadForcingContinue"]);
const POLICY_NODE = "HeadForcingCachePolicy";
const PROFILE_LOADER = "HeadForcingLoadHeadProfile";
const ESTIMATE_ROUTE = "/headforcing/estimate";
const GiB = 1024 ** 3;
const WINDOW_FRAMES = 21;

// ------------------------------------------------------------------------------------------
// small helpers

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function loadCss() {
  if (document.querySelector("link[data-headforcing-css]")) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = new URL("./headforcing.css", import.meta.url).href;
  link.dataset.headforcingCss = "1";
  document.head.appendChild(link);
}

function gib(bytes) {
  // GiB with 2 decimals, as the server's summaries print it; small figures in MiB
  return bytes >= 0.1 * GiB ? `${(bytes / GiB).toFixed(2)} GiB` : `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function pct(x) {
  return x === null || x === undefined ? "–" : `${Math.round(x * 100)} %`;
}

function fmtSeconds(s) {
  if (!isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${(s - 60 * m).toFixed(1).padStart(4, "0")} s`;
}

function chain(obj, name, fn) {
  const orig = obj[name];
  obj[name] = function (...args) {
    const r = orig?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

function redraw() {
  app.graph?.setDirtyCanvas(true, true);
}

/** A node by execution id ("12", or "5:12" inside a subgraph). */
function nodeByExecutionId(id) {
  if (id === null || id === undefined) return null;
  const parts = String(id).split(":");
  let graph = app.graph;
  let node = null;
  for (const p of parts) {
    node = graph?.getNodeById?.(isNaN(Number(p)) ? p : Number(p)) ?? graph?.getNodeById?.(p);
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

/** Add a DOM widget that is never saved in the workflow nor sent in the prompt. */
function addPanel(node, name, element, height) {
  const widget = node.addDOMWidget(name, "headforcing", element, {
    serialize: false,
    hideOnZoom: true,
    getMinHeight: height,
    getMaxHeight: height,
  });
  widget.serialize = false;
  return widget;
}

function fitNode(node) {
  const size = node.computeSize();
  if (size[1] > node.size[1] || size[0] > node.size[0]) {
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  }
  redraw();
}

// ------------------------------------------------------------------------------------------
// head map

class HeadMap {
  constructor(node) {
    this.node = node;
    this.payload = null;
    this.hovered = null;
    this.root = el("div", "hf-widget hf-headmap");
    this.root.dataset.testid = "hf-headmap";
    this.title = el("div", "hf-headmap-title hf-muted", "Head map: run the node to see its heads");
    this.legend = el("div", "hf-headmap-legend");
    this.canvas = el("canvas", "hf-headmap-canvas");
    this.info = el("div", "hf-headmap-info hf-muted", "");
    this.tooltip = el("div", "hf-tooltip");
    this.root.append(this.title, this.legend, this.canvas, this.info, this.tooltip);
    this.root.headforcing = this; // inspection handle (tests, debugging)
    this.canvas.addEventListener("mousemove", (e) => this.onMove(e));
    this.canvas.addEventListener("mouseleave", () => this.setHover(null));
    if (typeof ResizeObserver !== "undefined") {
      new ResizeObserver(() => this.draw()).observe(this.canvas);
    }
    this.widget = addPanel(node, "headforcing_head_map", this.root, () => this.height());
  }

  height() {
    if (!this.payload) return 48;
    return 60 + this.gridHeightCss() + 66;
  }

  rowHeight() {
    const layers = this.payload?.layers || 1;
    return Math.max(4, Math.min(28, Math.floor(300 / layers)));
  }

  gridHeightCss() {
    return (this.payload?.layers || 0) * this.rowHeight() + 14;
  }

  set(payload) {
    if (!payload || !Array.isArray(payload.labels)) return;
    this.payload = payload;
    this.root.dataset.layers = payload.layers;
    this.root.dataset.heads = payload.heads;
    this.root.dataset.taxonomy = payload.taxonomy;
    const name = payload.name || payload.source || "";
    this.title.textContent = `${payload.layers} layers × ${payload.heads} heads · ${payload.taxonomy}` +
      (name ? ` · ${name}` : "");
    this.title.classList.remove("hf-muted");
    this.title.title = payload.source || "";
    this.legend.replaceChildren();
    const total = payload.layers * payload.heads;
    for (const t of payload.types) {
      const item = el("span");
      const sw = el("span", "hf-swatch");
      sw.style.background = payload.colors?.[t] || "#888";
      const n = payload.counts?.[t] ?? 0;
      item.append(sw, document.createTextNode(`${t} ${n} (${Math.round((100 * n) / total)} %)`));
      this.legend.append(item);
    }
    this.setHover(null);
    this.draw();
    fitNode(this.node);
  }

  /** Grid geometry in canvas (backing-store) pixels. */
  geometry() {
    const p = this.payload;
    const dpr = window.devicePixelRatio || 1;
    const cssW = this.canvas.clientWidth || 200;
    const cssH = this.gridHeightCss();
    const W = Math.max(1, Math.round(cssW * dpr));
    const H = Math.max(1, Math.round(cssH * dpr));
    const labelW = Math.round(28 * dpr);
    const headerH = Math.round(12 * dpr);
    const cellW = Math.max(2, Math.min(Math.round(44 * dpr), Math.floor((W - labelW - 2) / p.heads)));
    const cellH = Math.max(2, Math.floor((H - headerH - 2) / p.layers));
    return { dpr, W, H, cssH, labelW, headerH, cellW, cellH, x0: labelW, y0: headerH };
  }

  /** Rectangle of cell (layer, head) in canvas pixels: {x, y, w, h} (the fill, without the gap). */
  cellRect(layer, head) {
    const g = this.geometry();
    const gap = g.cellW > 5 && g.cellH > 5 ? 1 : 0;
    return { x: g.x0 + head * g.cellW, y: g.y0 + layer * g.cellH, w: g.cellW - gap, h: g.cellH - gap };
  }

  draw() {
    const p = this.payload;
    if (!p) return;
    const g = this.geometry();
    if (this.canvas.style.height !== `${g.cssH}px`) this.canvas.style.height = `${g.cssH}px`;
    if (this.canvas.width !== g.W) this.canvas.width = g.W;
    if (this.canvas.height !== g.H) this.canvas.height = g.H;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, g.W, g.H);
    ctx.imageSmoothingEnabled = false;
    const font = Math.round(9 * g.dpr);
    ctx.font = `${font}px sans-serif`;
    ctx.fillStyle = "#999";
    ctx.textBaseline = "middle";
    // a layer label every row when rows are tall enough, else every 5th (L0, L5, ...)
    const labelEvery = g.cellH >= font && p.layers <= 12 ? 1 : Math.max(5, Math.ceil(font / g.cellH));
    for (let l = 0; l < p.layers; l += labelEvery) {
      ctx.fillText(`L${l}`, 1, g.y0 + l * g.cellH + g.cellH / 2);
    }
    ctx.textAlign = "center";
    const headEvery = g.cellW >= font * 1.6 ? 1 : Math.ceil((font * 1.6) / g.cellW);
    for (let h = 0; h < p.heads; h += headEvery) {
      ctx.fillText(`${h}`, g.x0 + h * g.cellW + g.cellW / 2, g.headerH / 2);
    }
    ctx.textAlign = "start";
    for (let l = 0; l < p.layers; l++) {
      for (let h = 0; h < p.heads; h++) {
        const t = p.types[p.labels[l][h]];
        const r = this.cellRect(l, h);
        ctx.fillStyle = p.colors?.[t] || "#888";
        ctx.fillRect(r.x, r.y, r.w, r.h);
      }
    }
    if (this.hovered) {
      const r = this.cellRect(this.hovered.layer, this.hovered.head);
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = Math.max(1, Math.round(g.dpr));
      ctx.strokeRect(r.x + 0.5, r.y + 0.5, r.w - 1, r.h - 1);
    }
  }

  cellAt(clientX, clientY) {
    if (!this.payload) return null;
    const rect = this.canvas.getBoundingClientRect();
    if (!rect.width || !rect.height) return null;
    const x = ((clientX - rect.left) / rect.width) * this.canvas.width;
    const y = ((clientY - rect.top) / rect.height) * this.canvas.height;
    const g = this.geometry();
    const head = Math.floor((x - g.x0) / g.cellW);
    const layer = Math.floor((y - g.y0) / g.cellH);
    if (head < 0 || layer < 0 || head >= this.payload.heads || layer >= this.payload.layers) return null;
    return { layer, head };
  }

  onMove(e) {
    const cell = this.cellAt(e.clientX, e.clientY);
    this.setHover(cell);
    if (cell) {
      // element coordinates (the widget is scaled with the canvas zoom)
      const box = this.root.getBoundingClientRect();
      const sx = box.width ? this.root.offsetWidth / box.width : 1;
      const sy = box.height ? this.root.offsetHeight / box.height : 1;
      const x = (e.clientX - box.left) * sx, y = (e.clientY - box.top) * sy;
      const w = this.tooltip.offsetWidth, h = this.tooltip.offsetHeight;
      this.tooltip.style.left = `${Math.max(2, Math.min(x + 12, this.root.offsetWidth - w - 4))}px`;
      this.tooltip.style.top = `${y + 14 + h < this.root.offsetHeight ? y + 14 : Math.max(2, y - h - 8)}px`;
    }
  }

  describe(layer, head) {
    const p = this.payload;
    const type = p.types[p.labels[layer][head]];
    const parts = [`layer ${layer}, head ${head}: ${type}`];
    for (const [tax, o] of Object.entries(p.other || {})) {
      parts.push(`${tax}: ${o.types[o.labels[layer][head]]}`);
    }
    let stats = "";
    if (p.stats) {
      const s = p.stats;
      const v = (k) => (s[k] ? s[k][layer][head] : null);
      const mass = ["sink_mass", "middle_mass", "recent_mass", "current_mass"]
        .map((k) => `${p.stat_names?.[k] || k} ${pct(v(k))}`)
        .join(" · ");
      const period = v("period");
      stats = `attention: ${mass}\n` + (period !== null
        ? `logits vs frame age: period ${period.toFixed(1)} frames (strength ${(v("period_strength") ?? 0).toFixed(2)})`
        : "logits vs frame age: no dominant period");
    } else {
      stats = "labels only (no statistics in this profile)";
    }
    return { type, head: parts.join(" · "), stats };
  }

  setHover(cell) {
    const same = (a, b) => (a === b) || (a && b && a.layer === b.layer && a.head === b.head);
    if (same(cell, this.hovered) && cell) return;
    this.hovered = cell;
    if (!this.payload) return;
    if (cell) {
      const d = this.describe(cell.layer, cell.head);
      this.info.textContent = `${d.head}\n${d.stats}`;
      this.info.classList.remove("hf-muted");
      this.root.dataset.hoverLayer = cell.layer;
      this.root.dataset.hoverHead = cell.head;
      this.root.dataset.hoverType = d.type;
      this.tooltip.textContent = d.head;
      this.tooltip.style.display = "block";
    } else {
      this.info.textContent = this.payload.stats
        ? "Hover a head for its statistics"
        : "Hover a head for its type (labels-only profile: no statistics)";
      this.info.classList.add("hf-muted");
      delete this.root.dataset.hoverLayer;
      delete this.root.dataset.hoverHead;
      delete this.root.dataset.hoverType;
      this.tooltip.style.display = "none";
    }
    this.info.style.whiteSpace = "pre-line";
    this.draw();
  }
}

// ------------------------------------------------------------------------------------------
// sampler panel

class SamplerPanel {
  constructor(node) {
    this.node = node;
    this.updates = 0;
    this.promptId = null;
    this.root = el("div", "hf-widget hf-panel");
    this.root.dataset.testid = "hf-sampler-panel";
    this.root.dataset.kind = "idle";
    this.bar = el("div", "hf-bar");
    this.fill = el("div");
    this.bar.append(this.fill);
    const row = el("div", "hf-panel-row");
    const text = el("div", "hf-panel-text");
    this.status = el("div", "hf-panel-status", "Live progress appears here while the sampler runs.");
    this.time = el("div", "hf-panel-time hf-muted", "");
    this.prompt = el("div", "hf-panel-prompt", "");
    this.kv = el("div", "hf-panel-kv hf-muted", "");
    text.append(this.status, this.time, this.prompt, this.kv);
    this.preview = el("img", "hf-panel-preview");
    this.preview.alt = "newest chunk";
    this.preview.style.display = "none";
    row.append(text, this.preview);
    this.root.append(this.bar, row);
    this.root.headforcing = this;
    this.widget = addPanel(node, "headforcing_panel", this.root, () => 92);
  }

  update(d) {
    this.updates += 1;
    this.root.dataset.updates = String(this.updates);
    this.root.dataset.kind = d.kind || "chunk";
    this.root.dataset.chunk = String(d.chunk ?? 0);
    this.root.dataset.chunks = String(d.chunks ?? 0);
    if (d.prompt_id) this.promptId = d.prompt_id;
    const frac = d.chunks ? Math.min(1, (d.chunk || 0) / d.chunks) : 0;
    this.fill.style.width = `${(100 * frac).toFixed(1)}%`;
    const verb = { start: "starting", done: "done", stopped: "stopped" }[d.kind] || "chunk";
    this.status.textContent = d.kind === "start"
      ? `starting: ${d.chunks} chunks (${d.latent_frames_total} latent frames)${d.policy ? ` · ${d.policy}` : ""}`
      : `${verb === "chunk" ? "" : verb + ": "}chunk ${d.chunk} of ${d.chunks}` +
        (d.elapsed ? ` · ${d.elapsed.toFixed(1)} s` : "") +
        (d.policy ? ` · ${d.policy}` : "");
    this.time.textContent = `${fmtSeconds(d.seconds_done ?? 0)} of ${fmtSeconds(d.seconds_total ?? 0)} video` +
      (d.width ? ` at ${d.width}×${d.height}` : "");
    if (d.prompt !== undefined) {
      // the server knows a segment's label (Schedule From Text: its prompt); the graph knows the
      // text of the CLIPTextEncode behind a CONDITIONING
      const fromGraph = promptFromGraph(this.node, d.segment || 1, d.segments || 1);
      const text = fromGraph || d.prompt || "";
      const label = fromGraph && d.prompt && d.prompt !== fromGraph ? ` (${d.prompt})` : "";
      const seg = d.segments > 1 ? `segment ${d.segment}/${d.segments}${label}: ` : `prompt${label}: `;
      // one prompt whose text is nowhere to be found (e.g. a CONDITIONING from another node): no line
      this.prompt.textContent = d.segments > 1 || text ? seg + (text || "(no text)") : "";
      this.prompt.title = text;
      this.root.dataset.segment = String(d.segment ?? "");
    } else {
      this.prompt.textContent = "";
    }
    if (d.kv_bytes !== undefined) {
      this.kv.textContent = `KV cache in use ${gib(d.kv_bytes)}` +
        (d.kv_budget_bytes !== undefined ? ` (bounded at ${gib(d.kv_budget_bytes)})` : "");
      this.root.dataset.kvBytes = String(d.kv_bytes);
    }
    if (d.preview) {
      this.preview.src = d.preview;
      this.preview.style.display = "";
      this.root.dataset.previews = String(Number(this.root.dataset.previews || 0) + 1);
    }
    redraw();
  }

  stopped(reason) {
    if (this.root.dataset.kind === "chunk" || this.root.dataset.kind === "start") {
      this.root.dataset.kind = "stopped";
      this.status.textContent = `${reason} at chunk ${this.root.dataset.chunk} of ${this.root.dataset.chunks}`;
    }
  }
}

/** The text of a CLIPTextEncode-like node feeding `input` of `node` (or of its schedule chain). */
function inputNode(node, name) {
  const slot = node?.findInputSlot?.(name) ?? -1;
  return slot >= 0 && node.inputs?.[slot]?.link != null ? node.getInputNode(slot) : null;
}

function textOf(node) {
  const w = node?.widgets?.find((x) => x.name === "text" || x.name === "prompt");
  return typeof w?.value === "string" ? w.value : "";
}

/** A segment's prompt when the server has no text for it (a CONDITIONING carries none): read the
 *  graph — the sampler's conditioning, or segment k of a chain of Prompt Segment nodes. */
function promptFromGraph(node, segment, segments) {
  try {
    const sched = inputNode(node, "prompt_schedule");
    if (sched) {
      const chain = [];
      for (let n = sched; n && chain.length < 256; n = inputNode(n, "previous")) chain.unshift(n);
      const seg = chain.length === segments ? chain[segment - 1] : null;
      if (!seg) return "";
      return textOf(inputNode(seg, "conditioning"));
    }
    return textOf(inputNode(node, "conditioning"));
  } catch {
    return "";
  }
}

// ------------------------------------------------------------------------------------------
// policy estimate

class PolicyEstimate {
  constructor(node) {
    this.node = node;
    this.seq = 0;
    this.timer = null;
    this.root = el("div", "hf-widget hf-estimate");
    this.root.dataset.testid = "hf-policy-estimate";
    this.root.dataset.state = "idle";
    this.main = el("div", "hf-estimate-main", "memory estimate …");
    this.line2 = el("div", "hf-muted", "");
    this.line3 = el("div", "hf-muted", "");
    this.root.append(this.main, this.line2, this.line3);
    this.root.headforcing = this;
    this.widget = addPanel(node, "headforcing_estimate", this.root, () => 72);
  }

  params() {
    const q = new URLSearchParams();
    const spec = this.node.constructor?.nodeData?.input || {};
    const names = new Set([...Object.keys(spec.required || {}), ...Object.keys(spec.optional || {})]);
    for (const w of this.node.widgets || []) {
      if (!names.has(w.name)) continue;
      const v = w.value;
      if (typeof v === "number" || typeof v === "string" || typeof v === "boolean") q.set(w.name, String(v));
    }
    this.profileNote = "";
    const slot = this.node.findInputSlot?.("head_profile") ?? -1;
    if (slot >= 0 && this.node.inputs?.[slot]?.link != null) {
      const src = this.node.getInputNode(slot);
      const nameWidget = src?.widgets?.find((w) => w.name === "profile_name");
      if (src?.comfyClass === PROFILE_LOADER && nameWidget?.value) {
        q.set("profile", String(nameWidget.value));
      } else {
        this.profileNote = "head labels of the connected profile are known after a run; default labels shown";
      }
    }
    return q;
  }

  schedule(delay = 150) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), delay);
  }

  async refresh() {
    const seq = ++this.seq;
    const q = this.params();
    this.root.dataset.state = "loading";
    let body = null;
    let status = 0;
    try {
      const res = await api.fetchApi(`${ESTIMATE_ROUTE}?${q.toString()}`, { cache: "no-store" });
      status = res.status;
      body = await res.json();
    } catch (e) {
      body = { ok: false, error: `no estimate from the server (${e?.message || e})` };
    }
    if (seq !== this.seq) return; // a newer request is on its way
    this.render(body, status);
  }

  render(body, status) {
    this.root.dataset.query = this.params().toString();
    if (!body?.ok) {
      this.root.dataset.state = "error";
      this.main.textContent = "memory estimate unavailable";
      this.main.classList.add("hf-error");
      this.line2.textContent = body?.error || `HTTP ${status}`;
      this.line2.title = body?.error || "";
      this.line3.textContent = "";
      this.root.title = "";
      return;
    }
    this.root.dataset.state = "ok";
    this.root.dataset.kvBytes = String(body.kv_bytes);
    this.root.dataset.totalBytes = String(body.total_bytes);
    this.main.classList.remove("hf-error");
    const share = body.window_kv_bytes ? Math.round((100 * body.kv_bytes) / body.window_kv_bytes) : null;
    this.main.textContent = `KV cache ${gib(body.kv_bytes)}` +
      (share !== null ? ` · ${share} % of the ${WINDOW_FRAMES}-frame window` : "");
    this.line2.textContent = `total ≈ ${gib(body.total_bytes)} + weights · ${body.attended_frames.toFixed(1)} ` +
      `frames per query`;
    this.line3.textContent = this.profileNote || (body.preset === "full"
      ? `grows with length: here ${fmtSeconds(body.seconds)} (${body.latent_frames} latent frames)`
      : `bounded: the same at any length (here ${fmtSeconds(body.seconds)})`);
    this.root.title = body.summary;
  }
}

function policyNodes() {
  return (app.graph?._nodes || app.graph?.nodes || []).filter((n) => n.comfyClass === POLICY_NODE);
}

function refreshPolicies() {
  for (const n of policyNodes()) n.headforcingEstimate?.schedule();
}

// ------------------------------------------------------------------------------------------
// the extension

function onProgress(event) {
  const d = event.detail || {};
  const node = nodeByExecutionId(d.node);
  if (!node) return;
  if (!node.headforcingPanel) {
    node.headforcingPanel = new SamplerPanel(node);
    fitNode(node);
  }
  node.headforcingPanel.update(d);
}

function onRunEnded(reason) {
  return (event) => {
    const pid = event.detail?.prompt_id;
    for (const n of app.graph?._nodes || []) {
      const p = n.headforcingPanel;
      if (p && (!pid || !p.promptId || p.promptId === pid)) p.stopped(reason);
    }
  };
}

app.registerExtension({
  name: EXTENSION,

  async setup() {
    loadCss();
    api.addEventListener(EVENT_PROGRESS, onProgress);
    api.addEventListener("execution_interrupted", onRunEnded("interrupted"));
    api.addEventListener("execution_error", onRunEnded("failed"));
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (HEAD_MAP_NODES.has(name)) {
      chain(nodeType.prototype, "onExecuted", function (output) {
        const maps = output?.[HEAD_MAP_KEY];
        if (Array.isArray(maps) && maps.length) this.headforcingHeadMap?.set(maps[maps.length - 1]);
      });
    }
    if (name === POLICY_NODE) {
      chain(nodeType.prototype, "onConnectionsChange", function () {
        this.headforcingEstimate?.schedule();
      });
      chain(nodeType.prototype, "onConfigure", function () {
        this.headforcingEstimate?.schedule(50);
      });
    }
    if (name === PROFILE_LOADER) {
      chain(nodeType.prototype, "onConfigure", () => refreshPolicies());
    }
  },

  nodeCreated(node) {
    const cls = node.comfyClass;
    if (HEAD_MAP_NODES.has(cls)) {
      node.headforcingHeadMap = new HeadMap(node);
    }
    if (SAMPLER_NODES.has(cls)) {
      node.headforcingPanel = new SamplerPanel(node);
    }
    if (cls === POLICY_NODE) {
      const est = new PolicyEstimate(node);
      node.headforcingEstimate = est;
      for (const w of node.widgets || []) {
        if (w === est.widget) continue;
        const cb = w.callback;
        w.callback = function (...args) {
          const r = cb?.apply(this, args);
          est.schedule();
          return r;
        };
      }
      est.schedule(50);
    }
    if (cls === PROFILE_LOADER) {
      const w = node.widgets?.find((x) => x.name === "profile_name");
      if (w) {
        const cb = w.callback;
        w.callback = function (...args) {
          const r = cb?.apply(this, args);
          refreshPolicies();
          return r;
        };
      }
    }
    if (HEAD_MAP_NODES.has(cls) || SAMPLER_NODES.has(cls) || cls === POLICY_NODE) {
      requestAnimationFrame(() => fitNode(node));
    }
  },
});
