// Head Forcing for ComfyUI: the AR sampler's model preset fills its widgets.
//
// Choosing a model preset (a public checkpoint's sampling settings) writes its frames per block,
// steps, first-chunk steps and shift into those four widgets, so the node shows what will run.
// The widgets stay editable: editing one to a value the preset does not set switches
// model_preset to "custom", and the edit is what runs. The values come from the server
// (GET /headforcing/model_presets: the table the sampler itself applies, nodes/comfy_bridge.py).
// Loading a saved workflow fills nothing: it keeps the values it was saved with.
//
// Exports only (the extension in ../headforcing.js calls the hooks): ComfyUI's extension loader
// imports every .js file under web/, so loading this one on its own must do nothing.

import { MODEL_PRESETS_ROUTE, NODE, chain, getJson, redraw } from "../lib/comfy.js";

const PRESET_WIDGET = "model_preset";
const FILLED = ["frames_per_block", "steps", "first_chunk_steps", "shift"];

let table = null; // one request per page: {custom, presets: {name: {frames_per_block, steps, ...}}}

function presets() {
  table ??= getJson(MODEL_PRESETS_ROUTE, new URLSearchParams()).then(({ body }) => body)
    .catch(() => { table = null; return null; }); // ask again next time
  return table;
}

/** Step lists compare as numbers ("1000, 500" is "1000,500"); the other widgets as numbers too. */
function same(name, a, b) {
  if (name === "steps" || name === "first_chunk_steps") {
    const list = (v) => String(v ?? "").split(",").map((s) => s.trim()).filter(Boolean).map(Number);
    const x = list(a), y = list(b);
    return x.length === y.length && x.every((v, i) => v === y[i]);
  }
  return Number(a) === Number(b);
}

export class ModelPresetFill {
  constructor(node, presetWidget) {
    this.node = node;
    this.preset = presetWidget;
    this.filling = false;
    this.widgets = Object.fromEntries(FILLED.map((n) => [n, node.widgets?.find((w) => w.name === n)]));
  }

  /** Write the chosen preset's values into the four widgets (nothing for "custom"). */
  async fill(name) {
    const t = await presets();
    const values = t?.presets?.[name];
    if (!values || this.preset.value !== name) return false; // custom, unknown, or changed meanwhile
    this.filling = true;
    try {
      for (const n of FILLED) {
        const w = this.widgets[n];
        if (w) w.value = values[n];
      }
    } finally {
      this.filling = false;
    }
    this.node.setDirtyCanvas?.(true, true);
    redraw();
    return true;
  }

  /** A widget edited by hand: if the preset does not set that value, the node is now "custom". */
  async edited(name) {
    if (this.filling) return;
    const t = await presets();
    const values = t?.presets?.[this.preset.value];
    const w = this.widgets[name];
    if (!values || !w || same(name, w.value, values[name])) return;
    this.preset.value = t.custom;
    redraw();
  }
}

// ------------------------------------------------------------------------------------------
// hooks (called by the extension)

export function setup() {
  presets(); // fetch early: the first choice then fills at once
}

/** Wires the preset widget of an AR sampler (no widget added: false). */
export function nodeCreated(node) {
  if (node.comfyClass !== NODE.sampler) return false;
  const presetWidget = node.widgets?.find((w) => w.name === PRESET_WIDGET);
  if (!presetWidget) return false;
  const fill = new ModelPresetFill(node, presetWidget);
  node.headforcingModelPreset = fill;
  chain(presetWidget, "callback", (value) => { fill.fill(value ?? presetWidget.value); });
  for (const n of FILLED) {
    const w = fill.widgets[n];
    if (w) chain(w, "callback", () => { fill.edited(n); });
  }
  return false;
}
