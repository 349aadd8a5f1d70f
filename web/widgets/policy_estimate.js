// Head Forcing for ComfyUI: the policy memory estimate.
//
// On the Cache Policy node, the memory figure for the current widget values, from the server's
// own computation (GET /headforcing/estimate); asked again (debounced) when a widget, a
// connection or the file of a Load Head Profile feeding it changes.
//
// Exports only (the extension in ../headforcing.js calls the hooks): ComfyUI's extension loader
// imports every .js file under web/, so loading this one on its own must do nothing.

import { ESTIMATE_ROUTE, NODE, addPanel, chain, getJson, graphNodes } from "../lib/comfy.js";
import { el, fmtSeconds, gib } from "../lib/dom.js";

const WINDOW_FRAMES = 21;

export class PolicyEstimate {
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
      if (src?.comfyClass === NODE.loadProfile && nameWidget?.value) {
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
      ({ status, body } = await getJson(ESTIMATE_ROUTE, q));
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

/** Ask every Cache Policy node of the graph for a new estimate. */
function refreshPolicies() {
  for (const n of graphNodes()) {
    if (n.comfyClass === NODE.policy) n.headforcingEstimate?.schedule();
  }
}

// ------------------------------------------------------------------------------------------
// hooks (called by the extension)

export function beforeRegisterNodeDef(nodeType, name) {
  if (name === NODE.policy) {
    chain(nodeType.prototype, "onConnectionsChange", function () {
      this.headforcingEstimate?.schedule();
    });
    chain(nodeType.prototype, "onConfigure", function () {
      this.headforcingEstimate?.schedule(50);
    });
  }
  if (name === NODE.loadProfile) {
    chain(nodeType.prototype, "onConfigure", () => refreshPolicies());
  }
}

/** Adds the estimate to a Cache Policy node (true), and makes a Load Head Profile's file choice
 *  refresh the estimates (false: no widget added there). */
export function nodeCreated(node) {
  const cls = node.comfyClass;
  if (cls === NODE.policy) {
    const est = new PolicyEstimate(node);
    node.headforcingEstimate = est;
    for (const w of node.widgets || []) {
      if (w !== est.widget) chain(w, "callback", () => est.schedule());
    }
    est.schedule(50);
    return true;
  }
  if (cls === NODE.loadProfile) {
    const w = node.widgets?.find((x) => x.name === "profile_name");
    if (w) chain(w, "callback", () => refreshPolicies());
  }
  return false;
}
