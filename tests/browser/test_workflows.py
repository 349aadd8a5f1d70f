"""Every workflow in workflows/ opens in the real frontend with zero missing node types, keeps its
widgets and links when the frontend re-saves it, and shows the pack's widgets on its nodes.

Also: the generated workflows are what tools/make_workflows.py writes for the running server's
node schemas (so they cannot drift from the nodes).
"""
from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest

from .conftest import REPO

pytestmark = pytest.mark.browser

WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
EXPECTED = [
    "headforcing_long_video.json",
    "headforcing_policy_comparison.json",
    "headforcing_profile_then_generate.json",
    "headforcing_story.json",
    "headforcing_continuation.json",
    "headforcing_image_to_video.json",
    "headforcing_extend_video.json",
    "headforcing_longlive_story.json",
    "headforcing_krea_realtime.json",
]
# node class -> the DOM widget the extension adds to it
PACK_WIDGETS = {
    "HeadForcingARSampler": "headforcing_panel",
    "HeadForcingContinue": "headforcing_panel",
    "HeadForcingCachePolicy": "headforcing_estimate",
    "HeadForcingProfileHeads": "headforcing_head_map",
    "HeadForcingClassifyHeads": "headforcing_head_map",
    "HeadForcingLoadHeadProfile": "headforcing_head_map",
}


def _make_workflows():
    spec = importlib.util.spec_from_file_location("hf_make_workflows", REPO / "tools" / "make_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_expected_workflows_exist():
    missing = [n for n in EXPECTED if not (WORKFLOW_DIR / n).exists()]
    assert not missing, f"workflows/ lacks {missing}"
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        assert wf.get("version") == 0.4, f"{path.name}: not a UI-format (version 0.4) workflow"
        notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
        assert notes and any(len(str(v)) > 80 for n in notes for v in n.get("widgets_values", [])), \
            f"{path.name} has no Note explaining it"


def test_generated_workflows_are_current(ui_server):
    """workflows/ (and the API twins in workflows/api/) hold exactly what tools/make_workflows.py writes for
    this server's schemas."""
    mw = _make_workflows()
    built = mw.build_workflows(ui_server.object_info())
    assert set(EXPECTED) <= set(built) and {f"api/{n}" for n in EXPECTED} - set(built) == {
        "api/headforcing_policy_comparison.json", "api/headforcing_profile_then_generate.json"}
    for name, wf in built.items():
        path = WORKFLOW_DIR / name
        assert path.exists(), f"{name} missing: run python3 tools/make_workflows.py"
        assert path.read_text() == mw.dumps(wf, name), (
            f"{name} is out of date with the node schemas: run python3 tools/make_workflows.py")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_in_browser(ui, path):
    wf = json.loads(path.read_text())
    res = ui.load_workflow(wf)
    assert res["unregistered"] == [], f"{path.name}: node types unknown to this ComfyUI: {res['unregistered']}"
    assert res["missing"] == [], f"{path.name}: the frontend reported missing node types {res['missing']}"
    assert not [d for d in res["dialogs"] if re.search(r"missing node|not installed", d, re.I)], \
        f"missing-node dialog: {res['dialogs']}"
    assert sorted(res["nodes"]) == sorted(n["id"] for n in wf["nodes"]), f"{path.name}: nodes lost on load"
    ui.close_dialogs()  # e.g. "Missing Models" (the test server has only the tiny models)

    # the frontend re-saves the same widgets and links
    saved = ui.js("() => JSON.parse(JSON.stringify(app.graph.serialize()))")
    by_id = {n["id"]: n for n in saved["nodes"]}
    for node in wf["nodes"]:
        got = by_id[node["id"]]
        assert got["type"] == node["type"]
        want_values = node.get("widgets_values") or []
        got_values = got.get("widgets_values") or []
        assert _same(got_values, want_values), (
            f"{path.name} node {node['id']} ({node['type']}): widgets {want_values} came back as {got_values}")
    assert sorted(map(tuple, saved["links"])) == sorted(map(tuple, wf["links"])), f"{path.name}: links changed"

    # the pack's widgets are on the pack's nodes, rendered in the page
    for cls, widget in PACK_WIDGETS.items():
        for node_id in ui.node_ids(cls):
            ui.focus_node(node_id, scale=1.0)
            state = ui.js("""([id, name]) => { const n = app.graph.getNodeById(id);
                const w = (n.widgets || []).find(w => w.name === name);
                if (!w) return { widget: false };
                const r = w.element.getBoundingClientRect();
                return { widget: true, connected: w.element.isConnected, w: r.width, h: r.height,
                         serialize: w.serialize, text: w.element.innerText }; }""", [node_id, widget])
            assert state["widget"], f"{cls} #{node_id} has no {widget} widget"
            assert state["connected"] and state["w"] > 50 and state["h"] > 20, f"{cls} #{node_id}: {state}"
            assert state["serialize"] is False
    # nothing overlaps once the frontend has sized every node (the pack's widgets make nodes taller)
    overlaps = ui.js("""() => {
        const boxes = app.graph._nodes.map(n => { const b = n.boundingRect; return [n.id, n.title, b[0], b[1], b[2], b[3]]; });
        const out = [];
        for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
          const [ia, ta, xa, ya, wa, ha] = boxes[i], [ib, tb, xb, yb, wb, hb] = boxes[j];
          if (xa < xb + wb - 1 && xb < xa + wa - 1 && ya < yb + hb - 1 && yb < ya + ha - 1) out.push(`${ia} ${ta} / ${ib} ${tb}`);
        }
        return out; }""")
    assert not overlaps, f"{path.name}: overlapping nodes once sized by the frontend: {overlaps}"
    # the prompt the frontend would queue validates against this ComfyUI's nodes (except model files)
    prompt = ui.js("async () => (await app.graphToPrompt()).output")
    assert prompt, "graphToPrompt gave nothing"
    for node_id, node in prompt.items():
        assert node["class_type"] in ui.server.object_info(node["class_type"])
    ui.fit_view()
    ui.shot(f"workflow_{path.stem}")


# what each checkpoint's own inference config sets, restated from its repository (README "Model
# presets"): frames per block, steps, first-chunk steps, shift
CHECKPOINT_SETTINGS = {
    "Self Forcing chunk-wise": (3, "1000,750,500,250", "", 5.0),
    "Causal Forcing chunk-wise": (3, "1000,750,500,250", "", 5.0),
    "Causal Forcing frame-wise 4-step": (1, "1000,750,500,250", "", 5.0),
    "Causal Forcing++ frame-wise 2-step": (1, "1000,500", "1000,750,500,250", 5.0),
    "Causal Forcing++ frame-wise 1-step": (1, "1000", "1000,750,500,250", 5.0),
    "LongLive": (3, "1000,750,500,250", "", 5.0),
    "Krea Realtime 14B": (3, "1000,750,500,250,0", "", 5.0),
    "Krea Realtime 14B, Self Forcing loop": (3, "1000,750,500,250,0", "", 5.0),
}
FILLED = ("frames_per_block", "steps", "first_chunk_steps", "shift")
SET_WIDGET_JS = """([id, name, value]) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === name);
                   w.value = value; w.callback?.(value); }"""  # what the UI does when a widget changes


def test_model_presets_route_is_each_checkpoints_config(ui_server):
    body = ui_server.get_json("/api/headforcing/model_presets")
    assert body["ok"] and body["custom"] == "custom"
    got = {name: tuple(p[k] for k in FILLED) for name, p in body["presets"].items()}
    assert got == CHECKPOINT_SETTINGS
    assert all(p["source"] for p in body["presets"].values())


def test_model_preset_fills_the_sampler_widgets(ui):
    wf = json.loads((WORKFLOW_DIR / "headforcing_long_video.json").read_text())
    assert not ui.load_workflow(wf)["missing"]
    ui.close_dialogs()
    (sid,) = ui.node_ids("HeadForcingARSampler")
    widgets_js = f"""() => Object.fromEntries(app.graph.getNodeById({sid}).widgets
                     .filter(w => {list(FILLED) + ['model_preset']}.includes(w.name)).map(w => [w.name, w.value]))"""
    saved = ui.js(widgets_js)
    assert saved["model_preset"] == "Self Forcing chunk-wise"  # loading fills nothing: saved values stay

    for name, values in CHECKPOINT_SETTINGS.items():
        ui.js(SET_WIDGET_JS, [sid, "model_preset", name])
        want = dict(zip(FILLED, values), model_preset=name)
        ui.page.wait_for_function(f"""() => {{ const w = ({widgets_js})(), want = {json.dumps(want)};
                                       return Object.keys(want).every(k => w[k] === want[k]); }}""", timeout=10_000)
    ui.focus_node(sid, scale=1.0)
    ui.shot("model_preset_filled")

    # an edit the preset does not set: the preset becomes custom and the edit stays (it is what runs)
    ui.js(SET_WIDGET_JS, [sid, "steps", "1000,600"])
    ui.page.wait_for_function(f"() => ({widgets_js})().model_preset === 'custom'", timeout=10_000)
    state = ui.js(widgets_js)
    assert state["steps"] == "1000,600" and state["frames_per_block"] == 3
    prompt = ui.js(f"async () => (await app.graphToPrompt()).output['{sid}'].inputs")
    assert prompt["model_preset"] == "custom" and prompt["steps"] == "1000,600"

    # an edit to the value the preset already sets keeps the preset; custom fills nothing
    ui.js(SET_WIDGET_JS, [sid, "model_preset", "Causal Forcing frame-wise 4-step"])
    ui.page.wait_for_function(f"() => ({widgets_js})().frames_per_block === 1", timeout=10_000)
    ui.js(SET_WIDGET_JS, [sid, "shift", 5.0])
    ui.js(SET_WIDGET_JS, [sid, "model_preset", "custom"])
    ui.page.wait_for_timeout(300)
    state = ui.js(widgets_js)
    assert state == dict(zip(FILLED, CHECKPOINT_SETTINGS["Causal Forcing frame-wise 4-step"]), model_preset="custom")
    assert not ui.extension_problems()
