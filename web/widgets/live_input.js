// Head Forcing for ComfyUI: live prompts, from the sampler's panel to the running sampler.
//
// While an AR Sampler (or Continue) runs, its panel (widgets/sampler_panel.js) shows this box: a
// prompt line, the story's prepared segments, the transition (cut, recache, blend, interpolate N) and
// a Switch button (or Enter). The prompt goes to POST /headforcing/live for the running prompt's id
// and node, from this page's client id; the server answers at once (queued for chunk k+1, or why
// not) and tells on the websocket when it is made (`headforcing.live`: applied, waiting, refused,
// expired). When the node has run, its `take` (the run as schedule text, from its UI data) appears
// with a "Use take" button that puts it into the graph as a Prompt Schedule From Text node on the
// node's prompt_schedule, the CLIP wired and the seed fixed: the next run renders the take again.
//
// Exports only (the extension in ../headforcing.js calls the hooks): ComfyUI's extension loader
// imports every .js file under web/, so loading this one on its own must do nothing.

import { EVENT_LIVE, LIVE_ROUTE, NODE, TAKE_KEY, api, app, chain, clientId, fitNode, inputLink,
  nodeByExecutionId, postJson, redraw } from "../lib/comfy.js";
import { el } from "../lib/dom.js";

const NODES = new Set([NODE.sampler, NODE.continue]);
const UNITS = { recache: "frames", blend: "frames", interpolate: "chunks" };
const DEFAULT_N = { recache: 3, blend: 6, interpolate: 4 };

function option(value, text) {
  const o = el("option", "", text);
  o.value = value;
  return o;
}

export class LiveBox {
  constructor(panel) {
    this.panel = panel;
    this.info = null; // the server's `live` block: what may be sent
    this.log = []; // answers and events, in order (the tests read it)
    this.take = null;
    this.root = el("div", "hf-live");
    this.root.dataset.testid = "hf-live";
    this.root.style.display = "none";
    this.text = el("input", "hf-live-text");
    this.text.type = "text";
    this.text.placeholder = "next prompt… (Enter switches at the next chunk)";
    this.text.addEventListener("keydown", (e) => {
      e.stopPropagation(); // typing here is not a canvas shortcut
      if (e.key === "Enter") this.send();
    });
    const row = el("div", "hf-live-row");
    this.segment = el("select", "hf-live-segment");
    this.transition = el("select", "hf-live-transition");
    for (const t of ["cut", "recache", "blend", "interpolate"]) this.transition.append(option(t, t));
    this.frames = el("input", "hf-live-frames");
    this.frames.type = "number";
    this.frames.min = "1";
    this.unit = el("span", "hf-muted", "");
    this.mode = el("select", "hf-live-mode");
    for (const m of ["", "block_causal", "longlive", "longlive_local_sink"]) {
      this.mode.append(option(m, m || "policy default"));
    }
    this.button = el("button", "hf-live-send", "Switch");
    this.button.addEventListener("click", () => this.send());
    this.transition.addEventListener("change", () => this.syncTransition(true));
    row.append(this.segment, this.transition, this.frames, this.unit, this.mode, this.button);
    this.status = el("div", "hf-live-status hf-muted", "");
    this.root.append(this.text, row, this.status);
    this.takeRow = el("div", "hf-take");
    this.takeRow.style.display = "none";
    this.takeText = el("span", "hf-take-text", "");
    this.useButton = el("button", "hf-take-use", "Use take");
    this.useButton.title = "Put this take into the graph as a Prompt Schedule From Text node on this node's " +
      "prompt_schedule (seed fixed): the next run renders it again";
    this.useButton.addEventListener("click", () => this.useTake());
    this.takeRow.append(this.takeText, this.useButton);
    this.syncTransition(true);
  }

  get open() {
    return this.root.style.display !== "none";
  }

  syncTransition(reset) {
    const t = this.transition.value;
    const n = t !== "cut";
    this.frames.style.display = n ? "" : "none";
    this.unit.textContent = n ? UNITS[t] : "";
    this.mode.style.display = t === "recache" ? "" : "none";
    if (n && reset) this.frames.value = String(DEFAULT_N[t]);
    if (t === "interpolate") this.frames.max = String(this.info?.max_interpolate ?? 64);
    else if (t === "recache") this.frames.max = String(this.info?.max_recache ?? 21);
    else this.frames.removeAttribute("max");
  }

  /** A progress payload: show the box while the run goes on. */
  update(d) {
    // nothing to steer with: no text encoder and no second prepared prompt
    if (!d.live || !(d.live.text || (d.live.segments || []).length > 1)) {
      this.show(false);
      return;
    }
    if (d.kind === "start" || !this.info) this.configure(d.live);
    this.show(d.kind === "start" || d.kind === "chunk");
  }

  configure(info) {
    this.info = info;
    this.segment.replaceChildren(option("", info.text ? "new prompt ↑" : "pick a prepared segment"));
    (info.segments || []).forEach((label, i) => this.segment.append(option(String(i + 1), `${i + 1}: ${label}`)));
    this.segment.style.display = info.segments?.length ? "" : "none";
    this.text.disabled = !info.text;
    this.text.placeholder = info.text ? "next prompt… (Enter switches at the next chunk)"
      : "connect the graph's CLIP to this node's 'clip' input to type prompts";
    this.text.maxLength = info.max_chars || 1000;
    this.syncTransition(false);
  }

  show(on) {
    if (on === this.open) return;
    this.root.style.display = on ? "" : "none";
    this.panel.resize();
  }

  say(text, kind = "") {
    this.status.textContent = text;
    this.status.className = `hf-live-status ${kind === "error" ? "hf-error" : kind === "ok" ? "" : "hf-muted"}`;
  }

  /** Send the box's prompt (or the chosen prepared segment) for the next chunk boundary. */
  async send() {
    const p = this.panel;
    const body = { prompt_id: p.promptId, node: p.nodeId, client_id: clientId(), transition: this.transition.value };
    if (body.transition !== "cut") body.frames = Number(this.frames.value);
    if (body.transition === "recache" && this.mode.value) body.recache_mode = this.mode.value;
    if (this.segment.value) body.segment = Number(this.segment.value);
    else body.text = this.text.value.trim();
    if (!body.segment && !body.text) {
      this.say("type a prompt (or pick a prepared segment)", "error");
      return null;
    }
    const entry = { kind: "sent", running_chunk_seen: p.runningChunk, request: body, t: performance.now() };
    this.log.push(entry);
    this.root.dataset.sent = String(this.log.filter((e) => e.kind === "sent").length);
    try {
      const { status, body: answer } = await postJson(LIVE_ROUTE, body);
      Object.assign(entry, { status, answer });
      if (answer.ok) {
        this.say(`queued: ${answer.message}`);
        this.text.value = "";
        this.segment.value = "";
      } else {
        this.say(answer.error, "error");
      }
    } catch (e) {
      Object.assign(entry, { status: 0, answer: { ok: false, error: String(e) } });
      this.say(`not sent: ${e}`, "error");
    }
    this.root.dataset.answered = String(this.log.filter((e) => e.answer).length);
    return entry;
  }

  /** A `headforcing.live` event for this node. */
  event(d) {
    this.log.push({ ...d, t: performance.now() });
    const applied = this.log.filter((e) => e.kind === "applied").length;
    this.root.dataset.applied = String(applied);
    this.say(d.message || d.kind, d.kind === "applied" ? "ok" : d.kind === "waiting" ? "" : "error");
  }

  /** The node's take arrived (its UI data): offer to use it when the run was steered live (otherwise the
   *  graph already says what the take says; the `take` output is there all the same). */
  setTake(text) {
    this.take = text;
    const lines = text.split("\n").filter((l) => l.trim() && !l.startsWith("#"));
    const switches = Number(/(\d+) live switch/.exec(text)?.[1] ?? 0);
    this.takeText.textContent = `take: ${lines.length} line${lines.length === 1 ? "" : "s"}, ` +
      `${switches} live switch${switches === 1 ? "" : "es"}`;
    this.takeText.title = text;
    this.takeRow.style.display = switches ? "" : "none";
    this.takeRow.dataset.lines = String(lines.length);
    this.panel.resize();
  }

  /** Put the take into the graph: a Prompt Schedule From Text node (the node's CLIP) on its prompt_schedule. */
  useTake() {
    const node = this.panel.node;
    if (!this.take) return null;
    const sched = LiteGraph.createNode(NODE.scheduleText);
    sched.pos = [node.pos[0] - 460, node.pos[1] + Math.max(0, node.size[1] - 260)];
    app.graph.add(sched);
    sched.widgets.find((w) => w.name === "text").value = this.take;
    sched.setSize([420, Math.max(sched.size[1], 220)]);
    const clip = inputLink(node, "clip");
    if (clip) clip[0].connect(clip[1], sched, sched.findInputSlot("clip"));
    sched.connect(0, node, node.findInputSlot("prompt_schedule"));
    const m = /seed (\d+)/.exec(this.take);
    const seed = node.widgets?.find((w) => w.name === "seed" || w.name === "noise_seed");
    if (m && seed) seed.value = Number(m[1]);
    const control = node.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
    this.say(clip ? "the take is in the graph: Run renders it again" :
      "the take is in the graph: connect a CLIP to its Prompt Schedule From Text node", clip ? "ok" : "error");
    fitNode(node);
    redraw();
    return sched.id;
  }
}

// ------------------------------------------------------------------------------------------
// hooks (called by the extension)

function onLive(event) {
  const d = event.detail || {};
  const box = nodeByExecutionId(d.node)?.headforcingPanel?.live;
  if (box) box.event(d);
}

export function setup() {
  api.addEventListener(EVENT_LIVE, onLive);
}

export function beforeRegisterNodeDef(nodeType, name) {
  if (!NODES.has(name)) return;
  chain(nodeType.prototype, "onExecuted", function (output) {
    const takes = output?.[TAKE_KEY];
    if (Array.isArray(takes) && takes.length) this.headforcingPanel?.live.setTake(takes[takes.length - 1]);
  });
}
