// Head Forcing for ComfyUI: the head map widget.
//
// On Profile Heads / Classify Heads / Load Head Profile, a layers x heads grid coloured by head
// type, drawn from the node's UI data (`headforcing_head_map`, sent with ComfyUI's `executed`
// event); hovering a cell shows that head's type in both taxonomies and its statistics.
//
// Exports only (the extension in ../headforcing.js calls the hooks): ComfyUI's extension loader
// imports every .js file under web/, so loading this one on its own must do nothing.

import { HEAD_MAP_KEY, NODE, addPanel, chain, fitNode } from "../lib/comfy.js";
import { el, pct } from "../lib/dom.js";

const NODES = new Set([NODE.profileHeads, NODE.classifyHeads, NODE.loadProfile]);

export class HeadMap {
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
// hooks (called by the extension)

export function beforeRegisterNodeDef(nodeType, name) {
  if (!NODES.has(name)) return;
  chain(nodeType.prototype, "onExecuted", function (output) {
    const maps = output?.[HEAD_MAP_KEY];
    if (Array.isArray(maps) && maps.length) this.headforcingHeadMap?.set(maps[maps.length - 1]);
  });
}

/** Adds the head map to a profile node; true when it added one. */
export function nodeCreated(node) {
  if (!NODES.has(node.comfyClass)) return false;
  node.headforcingHeadMap = new HeadMap(node);
  return true;
}
