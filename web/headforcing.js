// Head Forcing for ComfyUI: the browser side of the pack (plain ES modules, no build step).
//
// This file is the extension: it registers with ComfyUI and hands each hook to the widgets.
//
// * Head map (widgets/head_map.js): on Profile Heads / Classify Heads / Load Head Profile, a
//   layers x heads grid coloured by head type, drawn from the node's UI data
//   (`headforcing_head_map`, sent with ComfyUI's `executed` event); hovering a cell shows that
//   head's statistics.
// * Sampler panel (widgets/sampler_panel.js): on the AR sampler (and any node that sends
//   `headforcing.progress`), chunk k of n, seconds of video done, the current segment's prompt,
//   the KV cache in use and the chunks' frames played at the video's rate — one websocket message
//   per committed chunk.
// * Live prompts (widgets/live_input.js): in the sampler's panel while it runs, a prompt line and
//   a transition sent to POST /headforcing/live and switched in at the next chunk boundary; after
//   the run, its take and "Use take" (a Prompt Schedule From Text node on the sampler).
// * Policy estimate (widgets/policy_estimate.js): on the Cache Policy node, the memory figure for
//   the current widget values, from the server's own computation (GET /headforcing/estimate).
// * Model preset (widgets/model_preset.js): on the AR sampler, choosing a model preset fills the
//   frames per block, steps, first-chunk steps and shift widgets (GET /headforcing/model_presets);
//   editing one of them afterwards makes the preset "custom".
//
// Shared: lib/comfy.js (ComfyUI's app and api, the server's names, graph and node helpers) and
// lib/dom.js (DOM and text helpers). ComfyUI's extension loader imports every .js file under
// web/; only this one registers anything, the others just export (a module is loaded once per
// URL, so the loader's import and the imports below are the same module).
//
// Payload formats: docs/web.md (server side: nodes/messages.py, nodes/routes.py).

import { app, fitNode } from "./lib/comfy.js";
import * as headMap from "./widgets/head_map.js";
import * as liveInput from "./widgets/live_input.js";
import * as modelPreset from "./widgets/model_preset.js";
import * as policyEstimate from "./widgets/policy_estimate.js";
import * as samplerPanel from "./widgets/sampler_panel.js";

const EXTENSION = "headforcing.web";
// in this order: each hook runs for every widget, as one extension
const WIDGETS = [headMap, samplerPanel, liveInput, policyEstimate, modelPreset];

function loadCss() {
  if (document.querySelector("link[data-headforcing-css]")) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = new URL("./headforcing.css", import.meta.url).href;
  link.dataset.headforcingCss = "1";
  document.head.appendChild(link);
}

app.registerExtension({
  name: EXTENSION,

  async setup() {
    loadCss();
    for (const w of WIDGETS) w.setup?.();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    for (const w of WIDGETS) w.beforeRegisterNodeDef?.(nodeType, name);
  },

  nodeCreated(node) {
    let added = false;
    for (const w of WIDGETS) {
      if (w.nodeCreated?.(node)) added = true;
    }
    if (added) requestAnimationFrame(() => fitNode(node));
  },
});
