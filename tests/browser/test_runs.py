"""Workflows run from the UI (Run button) on the tiny models; the pack's panels show what happens.

* the one-minute workflow, shrunk: the saved video appears, and the sampler panel is updated for
  every chunk (chunk k of n, seconds of video, KV in use, a thumbnail of the newest chunk);
* the multi-prompt story, shrunk: the panel shows the segment each chunk belongs to;
* a planted head profile (known labels) loaded with Load Head Profile: every cell of the head map
  has its type's colour, and hovering a cell names that head's type;
* profile-then-generate, shrunk: Profile Heads measures the tiny model and its head map shows the
  measured statistics on hover;
* the policy node's memory estimate follows its widgets and equals the server's figure.
"""
from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest

from .conftest import ARTIFACTS, PALETTE, PLANTED_HEADS, PLANTED_LAYERS, PLANTED_PROFILE, REPO, planted_types

pytestmark = pytest.mark.browser

WORKFLOWS = REPO / "workflows"
RUN_TIMEOUT_MS = 300_000

# Shrink a loaded UI workflow to the tiny models: CLIPTextEncode -> HFTestConditioning (same
# links; there is no tiny umT5), loaders -> the tiny files, small sizes and lengths.
TINYIZE_JS = """
(o) => {
  const g = app.graph;
  const setW = (n, name, v) => { const w = n.widgets?.find(w => w.name === name); if (w) { w.value = v; } return !!w; };
  let k = 0;
  for (const n of [...g._nodes]) {
    if (n.comfyClass === 'CLIPTextEncode') {
      const t = LiteGraph.createNode('HFTestConditioning');
      t.pos = [n.pos[0], n.pos[1]];
      t.title = 'tiny: ' + (n.title || 'prompt');
      g.add(t);
      setW(t, 'seed', 1000 + (k++));
      setW(t, 'length', 512);
      for (const linkId of [...(n.outputs[0].links || [])]) {
        const link = g.links.get ? g.links.get(linkId) : g.links[linkId];
        const target = g.getNodeById(link.target_id);
        t.connect(0, target, link.target_slot);
      }
      g.remove(n);
    }
  }
  for (const n of [...g._nodes]) {
    if (n.comfyClass === 'CLIPLoader') g.remove(n);
    if (n.comfyClass === 'UNETLoader') setW(n, 'unet_name', o.unet);
    if (n.comfyClass === 'VAELoader') setW(n, 'vae_name', o.vae);
    if (n.comfyClass === 'HeadForcingARSampler') {
      setW(n, 'width', o.width); setW(n, 'height', o.height); setW(n, 'length', o.length);
      setW(n, 'length_unit', 'frames');
    }
    if (n.comfyClass === 'HeadForcingCachePolicy') { setW(n, 'width', o.width); setW(n, 'height', o.height); }
    if (n.comfyClass === 'HeadForcingProfileHeads') {
      setW(n, 'width', o.width); setW(n, 'height', o.height); setW(n, 'latent_frames', o.profile_frames);
    }
    if (n.comfyClass === 'HeadForcingPromptSegment') {
      setW(n, 'length', o.segment_seconds); setW(n, 'length_unit', 'seconds');
      const tf = n.widgets.find(w => w.name === 'transition_frames');
      if (tf && tf.value > 3) tf.value = 3;
    }
    if (n.comfyClass === 'HeadForcingContinue') {
      setW(n, 'length', o.segment_seconds); setW(n, 'length_unit', 'seconds');
      const tf = n.widgets.find(w => w.name === 'transition_frames');
      if (tf && tf.value > 3) tf.value = 3;
    }
    if (n.comfyClass === 'HeadForcingCachePolicy') setW(n, 'length', Math.max(o.length, 9));
    if (n.comfyClass === 'SaveVideo') setW(n, 'filename_prefix', o.prefix);
    if (n.comfyClass === 'HeadForcingSaveHeadProfile') setW(n, 'filename', o.prefix_profile);
  }
  app.canvas.setDirty(true, true);
  return g._nodes.map(n => n.comfyClass);
}
"""

# Record every state the sampler panel(s) show (one entry per update).
OBSERVE_PANEL_JS = """
(ids) => {
  window.__hfPanelLogs = {};
  for (const id of [].concat(ids)) {
  const n = app.graph.getNodeById(id);
  const root = n.headforcingPanel.root;
  const log = window.__hfPanelLogs[id] = [];
  if (!Array.isArray(ids)) window.__hfPanelLog = log;
  const record = () => log.push({
    updates: Number(root.dataset.updates || 0), kind: root.dataset.kind, chunk: Number(root.dataset.chunk || 0),
    chunks: Number(root.dataset.chunks || 0), segment: root.dataset.segment || '', text: root.innerText,
    kv: root.dataset.kvBytes || '', preview: root.headforcing.lastPreview || '' });
  new MutationObserver(record).observe(root, { attributes: true, attributeFilter: ['data-updates'] });
  }
  return true;
}
"""


def _load(ui, name: str) -> dict:
    wf = json.loads((WORKFLOWS / name).read_text())
    res = ui.load_workflow(wf)
    assert not res["unregistered"] and not res["missing"], res
    ui.close_dialogs()
    return wf


def _tinyize(ui, **kw) -> list[str]:
    opts = dict(unet=ui.server.models["wan"], vae=ui.server.models["vae"], width=64, height=64, length=45,
                profile_frames=6, segment_seconds=1.0, prefix="browser/run", prefix_profile="browser_profile")
    opts.update(kw)
    return ui.js(TINYIZE_JS, opts)


def _run_from_ui(ui, wait_js: str | None = None, timeout_ms: int = RUN_TIMEOUT_MS) -> dict:
    """Press Run, take the prompt id from the frontend's POST /prompt, wait for the run to finish
    (and for ``wait_js`` to hold in the page); returns the /history entry."""
    with ui.page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/prompt"),
                                 timeout=30_000) as resp:
        ui.queue_from_ui()
    body = resp.value.json()
    assert "prompt_id" in body and not body.get("node_errors"), body
    entry = ui.server.wait(body["prompt_id"], timeout=timeout_ms / 1000)
    if wait_js:
        ui.page.wait_for_function(wait_js, timeout=30_000)
    return entry


def _panel_id(ui) -> int:
    ids = ui.node_ids("HeadForcingARSampler")
    assert len(ids) == 1
    return ids[0]


def test_long_video_runs_from_ui_with_live_panel(ui):
    _load(ui, "headforcing_long_video.json")
    _tinyize(ui, length=45, prefix="browser/long_video")       # 45 frames = 12 latent = 4 chunks of 3
    sid = _panel_id(ui)
    ui.focus_node(sid, scale=1.0)
    ui.js(OBSERVE_PANEL_JS, sid)
    t0 = time.time()
    entry = _run_from_ui(ui, f"() => app.graph.getNodeById({sid}).headforcingPanel.root.dataset.kind === 'done'")
    seconds = time.time() - t0
    ui.shot("run_long_video_panel")
    ui.shot_nodes([sid], "node_sampler_panel")

    videos = ui.server.outputs(entry, ".mp4")
    assert videos and all(v.exists() and v.stat().st_size > 0 for v in videos), entry.get("outputs")
    # the frontend shows the saved video on the Save Video node
    save_id = ui.node_ids("SaveVideo")[0]
    ui.page.wait_for_function(
        f"() => !!app.nodeOutputs?.['{save_id}']",
        timeout=30_000)

    log = ui.js("() => window.__hfPanelLog")
    chunks = [e for e in log if e["kind"] == "chunk"]
    assert log[0]["kind"] == "start", log[:2]
    assert chunks and chunks[0]["chunks"] == 4, chunks
    assert [e["chunk"] for e in chunks] == [1, 2, 3, 4], "one panel update per chunk, in order"
    assert [e["updates"] for e in log] == list(range(log[0]["updates"], log[0]["updates"] + len(log)))
    for e in chunks:
        assert f"chunk {e['chunk']} of 4" in e["text"], e["text"]
        assert "of 2.8 s video" in e["text"] and "KV cache in use" in e["text"], e["text"]
        assert e["preview"].startswith("data:image/jpeg;base64,"), "every chunk brings a thumbnail"
        assert int(e["kv"]) > 0
    kv = [int(e["kv"]) for e in chunks]
    assert kv == sorted(kv), "KV in use grows (then stays bounded)"
    assert "0.2 s of 2.8 s" in chunks[0]["text"] or "0.6 s of 2.8 s" in chunks[0]["text"], chunks[0]["text"]
    assert "2.8 s of 2.8 s" in chunks[-1]["text"]
    assert log[-1]["kind"] == "done"
    (ARTIFACTS / "run_long_video_panel_log.json").write_text(json.dumps(
        [{k: v for k, v in e.items() if k != "preview"} for e in log], indent=1))
    print(f"long video (tiny) from the UI: {seconds:.1f} s, {len(log)} panel updates")


def test_story_panel_shows_current_segment(ui):
    _load(ui, "headforcing_story.json")
    _tinyize(ui, segment_seconds=0.75, prefix="browser/story")   # 4 segments x 3 latent frames
    sid = _panel_id(ui)
    ui.focus_node(sid, scale=1.0)
    ui.js(OBSERVE_PANEL_JS, sid)
    entry = _run_from_ui(ui, f"() => app.graph.getNodeById({sid}).headforcingPanel.root.dataset.kind === 'done'")
    ui.shot("run_story_panel")
    assert ui.server.outputs(entry, ".mp4")
    chunks = [e for e in ui.js("() => window.__hfPanelLog") if e["kind"] == "chunk"]
    assert len(chunks) == chunks[0]["chunks"] >= 4
    segments = [e["segment"] for e in chunks]
    assert segments == sorted(segments, key=int) and set(segments) == {"1", "2", "3", "4"}, segments
    labels = ui.js("""() => app.graph._nodes.filter(n => n.comfyClass === 'HeadForcingPromptSegment')
                          .map(n => n.widgets.find(w => w.name === 'label').value)""")
    for e in chunks:
        assert f"segment {e['segment']}/4" in e["text"], e["text"]
        label = [lab for lab in labels if lab.endswith(e["segment"])]
        assert not label or label[0] in e["text"], (label, e["text"])


def test_continuation_chain_panels(ui):
    _load(ui, "headforcing_continuation.json")
    _tinyize(ui, length=21, segment_seconds=0.75, prefix="browser/continuation")   # 6 + 3 + 3 latent frames
    ids = ui.node_ids("HeadForcingARSampler") + ui.node_ids("HeadForcingContinue")
    assert len(ids) == 3
    ui.js(OBSERVE_PANEL_JS, ids)
    last = ids[-1]
    entry = _run_from_ui(ui, f"() => app.graph.getNodeById({last}).headforcingPanel.root.dataset.kind === 'done'")
    assert ui.server.outputs(entry, ".mp4")
    logs = ui.js("() => window.__hfPanelLogs")
    ends = []
    for node_id in ids:
        chunks = [e for e in logs[str(node_id)] if e["kind"] == "chunk"]
        assert chunks and [e["chunk"] for e in chunks] == list(range(1, chunks[0]["chunks"] + 1)), (node_id, chunks)
        assert all(e["preview"] for e in chunks)
        ends.append(chunks[-1]["text"])
    # the video keeps growing across the chain: 21 frames, then +12, then +12
    assert "1.3 s of 1.3 s video" in ends[0] and "2.1 s of 2.1 s video" in ends[1] and "2.8 s of 2.8 s" in ends[2], ends
    ui.focus_node(ids[1], scale=0.9)
    ui.shot("run_continuation_panels")


def _add_profile_loader(ui, profile_name: str) -> int:
    return ui.js("""(name) => {
        app.graph.clear();
        const load = LiteGraph.createNode('HeadForcingLoadHeadProfile'); load.pos = [80, 80]; app.graph.add(load);
        load.widgets.find(w => w.name === 'profile_name').value = name;
        const show = LiteGraph.createNode('PreviewAny'); show.pos = [560, 80]; app.graph.add(show);
        load.connect(2, show, 0);
        load.setSize([460, load.computeSize()[1]]);
        app.canvas.setDirty(true, true);
        return load.id; }""", profile_name)


CELL_JS = """
([id, layer, head]) => {
  const hm = app.graph.getNodeById(id).headforcingHeadMap;
  const r = hm.cellRect(layer, head);
  const cx = Math.floor(r.x + r.w / 2), cy = Math.floor(r.y + r.h / 2);
  const px = hm.canvas.getContext('2d').getImageData(cx, cy, 1, 1).data;
  const box = hm.canvas.getBoundingClientRect();
  return { rgb: [px[0], px[1], px[2]],
           client: [box.left + (cx + 0.5) / hm.canvas.width * box.width, box.top + (cy + 0.5) / hm.canvas.height * box.height] };
}
"""


def test_head_map_shows_planted_head_types(ui):
    lid = _add_profile_loader(ui, PLANTED_PROFILE)
    ui.focus_node(lid, scale=1.0)
    _run_from_ui(ui, f"() => app.graph.getNodeById({lid}).headforcingHeadMap.root.dataset.layers === '{PLANTED_LAYERS}'",
                 timeout_ms=60_000)
    ui.focus_node(lid, scale=1.0)
    ui.page.wait_for_timeout(300)
    state = ui.js("""(id) => { const r = app.graph.getNodeById(id).headforcingHeadMap.root;
                     return { ...r.dataset, title: r.querySelector('.hf-headmap-title').innerText,
                              legend: r.querySelector('.hf-headmap-legend').innerText }; }""", lid)
    assert state["heads"] == str(PLANTED_HEADS) and state["taxonomy"] == "head_forcing", state
    assert "local 8" in state["legend"] and "anchor 8" in state["legend"] and "memory 8" in state["legend"], state

    planted = planted_types("head_forcing")
    other = planted_types("pyramid_forcing")
    for layer in range(PLANTED_LAYERS):
        for head in range(PLANTED_HEADS):
            cell = ui.js(CELL_JS, [lid, layer, head])
            assert tuple(cell["rgb"]) == PALETTE[planted[layer][head]], (
                f"layer {layer} head {head}: planted {planted[layer][head]} {PALETTE[planted[layer][head]]}, "
                f"drawn {cell['rgb']}")
    # hovering a cell (real mouse events) names that head's type and its other-taxonomy label
    for layer, head in [(0, 0), (2, 1), (5, 3), (3, 2)]:
        cell = ui.js(CELL_JS, [lid, layer, head])
        ui.page.mouse.move(*cell["client"])
        ui.page.wait_for_function(
            f"() => app.graph.getNodeById({lid}).headforcingHeadMap.root.dataset.hoverLayer === '{layer}' && "
            f"app.graph.getNodeById({lid}).headforcingHeadMap.root.dataset.hoverHead === '{head}'", timeout=5000)
        info = ui.js(f"() => app.graph.getNodeById({lid}).headforcingHeadMap.info.innerText")
        assert f"layer {layer}, head {head}: {planted[layer][head]}" in info, info
        assert f"pyramid_forcing: {other[layer][head]}" in info, info
        assert "labels only" in info
    ui.shot("head_map_planted")
    ui.shot_nodes([lid], "node_head_map")


def test_head_map_of_the_shipped_preset(ui):
    """Pyramid Forcing's published labels of Self Forcing (30 layers x 12 heads), cell by cell."""
    from headforcing_core.policies import pyramid_forcing_preset_labels

    preset = "preset: pyramid_forcing_self_forcing_1p3b"
    lid = _add_profile_loader(ui, preset)
    ui.js("(id) => app.graph.getNodeById(id).setSize([520, app.graph.getNodeById(id).size[1]])", lid)
    _run_from_ui(ui, f"() => app.graph.getNodeById({lid}).headforcingHeadMap.root.dataset.layers === '30'",
                 timeout_ms=60_000)
    ui.focus_node(lid, scale=1.0)
    hm = f"app.graph.getNodeById({lid}).headforcingHeadMap"
    assert ui.js(f"() => {hm}.root.dataset.taxonomy") == "pyramid_forcing"
    want = pyramid_forcing_preset_labels().types
    for layer in range(30):
        for head in range(12):
            cell = ui.js(CELL_JS, [lid, layer, head])
            assert tuple(cell["rgb"]) == PALETTE[want[layer][head]], (layer, head, want[layer][head], cell["rgb"])
    cell = ui.js(CELL_JS, [lid, 12, 5])
    ui.page.mouse.move(*cell["client"])
    ui.page.wait_for_function(f"() => {hm}.root.dataset.hoverLayer === '12'", timeout=5000)
    info = ui.js(f"() => {hm}.info.innerText")
    assert f"layer 12, head 5: {want[12][5]}" in info and "head_forcing:" in info, info
    ui.shot_nodes([lid], "node_head_map_pyramid_preset")


def test_profile_then_generate_head_map_has_statistics(ui):
    _load(ui, "headforcing_profile_then_generate.json")
    _tinyize(ui, length=21, profile_frames=6, prefix="browser/profiled")
    pid = ui.node_ids("HeadForcingProfileHeads")[0]
    sid = _panel_id(ui)
    _run_from_ui(ui, f"() => app.graph.getNodeById({sid}).headforcingPanel.root.dataset.kind === 'done'")
    hm = f"app.graph.getNodeById({pid}).headforcingHeadMap"
    ui.page.wait_for_function(f"() => {hm}.root.dataset.layers === '2'", timeout=30_000)
    ui.focus_node(pid, scale=1.0)
    ui.page.wait_for_timeout(300)
    payload = ui.js(f"() => {hm}.payload")
    assert payload["stats"] is not None and payload["heads"] == 2
    labels = payload["labels"]
    for layer in range(2):
        for head in range(2):
            cell = ui.js(CELL_JS, [pid, layer, head])
            t = payload["types"][labels[layer][head]]
            assert tuple(cell["rgb"]) == PALETTE[t]
    cell = ui.js(CELL_JS, [pid, 1, 1])
    ui.page.mouse.move(*cell["client"])
    ui.page.wait_for_function(f"() => {hm}.root.dataset.hoverLayer === '1'", timeout=5000)
    info = ui.js(f"() => {hm}.info.innerText")
    assert "layer 1, head 1" in info and "attention: sink" in info and "current" in info, info
    assert "logits vs frame age" in info, info
    ui.shot("run_profile_then_generate")


def _route(ui, **params) -> dict:
    return ui.server.get_json("/headforcing/estimate?" + urlencode(params))


def test_policy_estimate_follows_widgets(ui):
    _load(ui, "headforcing_long_video.json")
    pid = ui.node_ids("HeadForcingCachePolicy")[0]
    ui.focus_node(pid, scale=1.0)
    est = f"app.graph.getNodeById({pid}).headforcingEstimate.root"
    ui.page.wait_for_function(f"() => {est}.dataset.state === 'ok'", timeout=20_000)
    widgets = ui.js(f"""() => Object.fromEntries(app.graph.getNodeById({pid}).widgets
                     .filter(w => w.options?.serialize !== false && w.name && !w.name.startsWith('headforcing'))
                     .map(w => [w.name, w.value]))""")
    want = _route(ui, **widgets)
    assert ui.js(f"() => {est}.dataset.kvBytes") == str(want["kv_bytes"])
    text = ui.js(f"() => {est}.innerText")
    assert f"KV cache {want['kv_bytes'] / 2**30:.2f} GiB" in text, text
    assert f"{want['kv_bytes'] / 2**30:.2f} GiB" in want["summary"], "the panel's figure is the summary's"
    ui.shot("policy_estimate_head_forcing")
    ui.shot_nodes([pid], "node_policy_estimate")

    # change widgets the way the UI does (value + callback): the figure follows
    for name, value in [("preset", "pyramid_forcing"), ("width", 1280), ("preset", "full")]:
        old = ui.js(f"() => {est}.dataset.kvBytes")
        ui.js("""([id, name, value]) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === name);
                 w.value = value; w.callback?.(value); }""", [pid, name, value])
        widgets[name] = value
        want = _route(ui, **widgets)
        ui.page.wait_for_function(f"() => {est}.dataset.state === 'ok' && {est}.dataset.kvBytes === '{want['kv_bytes']}'",
                                  timeout=10_000)
        assert want["kv_bytes"] != int(old)
    assert "grows with length" in ui.js(f"() => {est}.innerText")

    # a head profile from Load Head Profile: the estimate uses its labels (and model shape)
    ui.js("""([id, name]) => { const p = app.graph.getNodeById(id);
        const w = p.widgets.find(w => w.name === 'preset'); w.value = 'head_forcing'; w.callback?.('head_forcing');
        const load = LiteGraph.createNode('HeadForcingLoadHeadProfile'); load.pos = [p.pos[0] - 420, p.pos[1]];
        app.graph.add(load); load.widgets.find(w => w.name === 'profile_name').value = name;
        load.connect(0, p, p.findInputSlot('head_profile')); }""", [pid, PLANTED_PROFILE])
    widgets["preset"] = "head_forcing"
    want = _route(ui, profile=PLANTED_PROFILE, **widgets)
    ui.page.wait_for_function(f"() => {est}.dataset.kvBytes === '{want['kv_bytes']}'", timeout=10_000)
    assert "head labels from profile" in want["summary"]
