// Head Forcing for ComfyUI: what the widgets share about ComfyUI and the pack's server.
//
// The only module that knows where ComfyUI's frontend scripts are, the names the server uses
// (node classes, websocket event, UI data key, HTTP route: docs/web.md, nodes/messages.py,
// nodes/routes.py), and the graph / node helpers every widget needs.
//
// Exports only: ComfyUI's extension loader imports every .js file under web/ (this one too), so
// loading it on its own must do nothing.

import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

export { app, api };

/** Node classes of the pack that get a widget. */
export const NODE = {
  sampler: "HeadForcingARSampler",
  continue: "HeadForcingContinue",
  policy: "HeadForcingCachePolicy",
  profileHeads: "HeadForcingProfileHeads",
  classifyHeads: "HeadForcingClassifyHeads",
  loadProfile: "HeadForcingLoadHeadProfile",
  scheduleText: "HeadForcingPromptScheduleFromText",
};
export const EVENT_PROGRESS = "headforcing.progress"; // websocket event, one per committed chunk
export const EVENT_LIVE = "headforcing.live"; // websocket event: a live switch applied, waiting, refused, expired
export const HEAD_MAP_KEY = "headforcing_head_map"; // key of the profile nodes' UI data
export const TAKE_KEY = "headforcing_take"; // key of the sampler's / Continue's UI data: the take
export const LIVE_ROUTE = "/headforcing/live"; // POST: a prompt for the running sampler
export const ESTIMATE_ROUTE = "/headforcing/estimate"; // GET: the Cache Policy node's memory figure
export const MODEL_PRESETS_ROUTE = "/headforcing/model_presets"; // GET: what each sampler model preset fills in

/** GET a JSON route of the server (never cached): `{status, body}`; throws when it cannot. */
export async function getJson(route, query) {
  const res = await api.fetchApi(`${route}?${query.toString()}`, { cache: "no-store" });
  return { status: res.status, body: await res.json() };
}

/** POST JSON to a route of the server: `{status, body}`; throws when it cannot. */
export async function postJson(route, payload) {
  const res = await api.fetchApi(route, {
    method: "POST", cache: "no-store", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload),
  });
  return { status: res.status, body: await res.json() };
}

/** The id the server knows this page by (ComfyUI's client_id of the prompts it queues). */
export function clientId() {
  return api.clientId ?? api.initialClientId ?? null;
}

export function redraw() {
  app.graph?.setDirtyCanvas(true, true);
}

/** The nodes of the current graph. */
export function graphNodes() {
  return app.graph?._nodes || app.graph?.nodes || [];
}

/** A node by execution id ("12", or "5:12" inside a subgraph). */
export function nodeByExecutionId(id) {
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

/** [origin node, its output slot] of the link into input `name` of `node`, or null. */
export function inputLink(node, name) {
  const slot = node?.findInputSlot?.(name) ?? -1;
  const id = slot >= 0 ? node.inputs?.[slot]?.link : null;
  if (id == null) return null;
  const link = app.graph.links.get ? app.graph.links.get(id) : app.graph.links[id];
  const origin = link ? app.graph.getNodeById(link.origin_id) : null;
  return origin ? [origin, link.origin_slot] : null;
}

/** The node connected to input `name` of `node`, or null. */
export function inputNode(node, name) {
  const slot = node?.findInputSlot?.(name) ?? -1;
  return slot >= 0 && node.inputs?.[slot]?.link != null ? node.getInputNode(slot) : null;
}

/** Call `fn` after `obj[name]` (a node method or a widget callback), keeping its result. */
export function chain(obj, name, fn) {
  const orig = obj[name];
  obj[name] = function (...args) {
    const r = orig?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

/** Add a DOM widget that is never saved in the workflow nor sent in the prompt. */
export function addPanel(node, name, element, height) {
  const widget = node.addDOMWidget(name, "headforcing", element, {
    serialize: false,
    hideOnZoom: true,
    getMinHeight: height,
    getMaxHeight: height,
  });
  widget.serialize = false;
  return widget;
}

/** Grow the node to fit its widgets (never shrink it). */
export function fitNode(node) {
  const size = node.computeSize();
  if (size[1] > node.size[1] || size[0] > node.size[0]) {
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  }
  redraw();
}
