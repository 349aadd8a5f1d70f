// Head Forcing for ComfyUI: the live sampler panel.
//
// On the AR sampler and Continue (and any node that sends `headforcing.progress`): a progress
// bar, chunk k of n, seconds of video done, the current segment's prompt, the KV cache in use
// and the chunks' frames played at the video's own rate (lib/player.js) — one websocket message
// per committed chunk. While the run takes live input, the live box (widgets/live_input.js) sits
// under it: a prompt line and the transition, switched in at the next chunk boundary; when the
// node has run, its take and the "Use take" button.
//
// Exports only (the extension in ../headforcing.js calls the hooks): ComfyUI's extension loader
// imports every .js file under web/, so loading this one on its own must do nothing.

import { EVENT_PROGRESS, NODE, addPanel, api, fitNode, graphNodes, inputNode, nodeByExecutionId, redraw }
  from "../lib/comfy.js";
import { el, fmtSeconds, gib } from "../lib/dom.js";
import { FramePlayer } from "../lib/player.js";
import { LiveBox } from "./live_input.js";

const NODES = new Set([NODE.sampler, NODE.continue]);

export class SamplerPanel {
  constructor(node) {
    this.node = node;
    this.updates = 0;
    this.promptId = null;
    this.nodeId = String(node.id); // the execution id the server names (a subgraph's "a:b" once it reports)
    this.runningChunk = 0; // the chunk being made, as far as this page knows
    this.lastPreview = "";
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
    this.preview = el("canvas", "hf-panel-preview");
    this.preview.title = "the chunks as they are made, at the video's rate";
    this.preview.style.display = "none";
    this.player = new FramePlayer(this.preview, (f, timing) => this.played(f, timing));
    row.append(text, this.preview);
    this.live = new LiveBox(this);
    this.root.append(this.bar, row, this.live.root, this.live.takeRow);
    this.root.headforcing = this;
    this.widget = addPanel(node, "headforcing_panel", this.root, () => this.height());
  }

  height() {
    // bar and row (the frames are 96 px high), then the live box and the take when shown
    return 124 + (this.live.open ? 84 : 0) + (this.live.takeRow.style.display === "none" ? 0 : 30);
  }

  resize() {
    fitNode(this.node);
  }

  played(frame, timing) {
    const ds = this.root.dataset;
    ds.framesShown = String(timing.shown);
    ds.framesDropped = String(timing.dropped);
    ds.drawMsMax = timing.drawMsMax.toFixed(2);
    ds.drawMsMean = timing.drawMsMean.toFixed(2);
    ds.drawMsP95 = timing.drawMsP95.toFixed(2);
    ds.keepsUp16 = String(timing.keepsUp16);
    ds.playingChunk = String(frame.chunk ?? "");
  }

  update(d) {
    this.updates += 1;
    this.root.dataset.updates = String(this.updates);
    this.root.dataset.kind = d.kind || "chunk";
    this.root.dataset.chunk = String(d.chunk ?? 0);
    this.root.dataset.chunks = String(d.chunks ?? 0);
    if (d.prompt_id) this.promptId = d.prompt_id;
    if (d.node !== undefined) this.nodeId = String(d.node);
    this.runningChunk = d.kind === "start" || d.kind === "chunk" ? (d.chunk || 0) + 1 : 0;
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
      const fromGraph = d.segment_live ? "" : promptFromGraph(this.node, d.segment || 1, d.segments || 1);
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
    const frames = d.frames || (d.preview ? [d.preview] : []);
    if (frames.length) {
      this.lastPreview = frames[frames.length - 1];
      this.preview.style.display = "";
      this.player.push(frames, d.frame_seconds, d.chunk);
      this.root.dataset.previews = String(Number(this.root.dataset.previews || 0) + 1);
    }
    this.live.update(d);
    redraw();
  }

  stopped(reason) {
    if (this.root.dataset.kind === "chunk" || this.root.dataset.kind === "start") {
      this.root.dataset.kind = "stopped";
      this.status.textContent = `${reason} at chunk ${this.root.dataset.chunk} of ${this.root.dataset.chunks}`;
      this.live.show(false);
    }
  }
}

/** The text of a CLIPTextEncode-like node (its `text` or `prompt` widget). */
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
    for (const n of graphNodes()) {
      const p = n.headforcingPanel;
      if (p && (!pid || !p.promptId || p.promptId === pid)) p.stopped(reason);
    }
  };
}

// ------------------------------------------------------------------------------------------
// hooks (called by the extension)

export function setup() {
  api.addEventListener(EVENT_PROGRESS, onProgress);
  api.addEventListener("execution_interrupted", onRunEnded("interrupted"));
  api.addEventListener("execution_error", onRunEnded("failed"));
}

/** Adds the live panel to a sampler node; true when it added one. */
export function nodeCreated(node) {
  if (!NODES.has(node.comfyClass)) return false;
  node.headforcingPanel = new SamplerPanel(node);
  return true;
}
