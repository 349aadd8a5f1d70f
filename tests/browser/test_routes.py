"""GET /headforcing/estimate on the real server: it validates every input, never takes the server
down, and its figure is exactly the Cache Policy node's own summary. Also: the extension's files are
served through the pack's WEB_DIRECTORY, and the profile nodes send the head map as UI data."""
from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from .conftest import PLANTED_PROFILE, planted_types

pytestmark = pytest.mark.browser

POLICY_DEFAULTS = dict(preset="head_forcing", rope="preset default", sink_frames=-1, recent_frames=-1,
                       memory_episodes=8, memory_similarity=0.9, width=832, height=480, length=961)


def _get(server, params: dict | str, prefix: str = "") -> tuple[int, dict]:
    query = params if isinstance(params, str) else urlencode(params)
    status, body = server.get_raw(f"{prefix}/headforcing/estimate?{query}")
    return status, json.loads(body)


def test_extension_is_served(ui_server):
    exts = ui_server.get_json("/extensions")
    ours = [e for e in exts if e.startswith("/extensions/headforcing/")]
    assert "/extensions/headforcing/headforcing.js" in ours, exts
    for path in ("/extensions/headforcing/headforcing.js", "/extensions/headforcing/headforcing.css"):
        status, body = ui_server.get_raw(path)
        assert status == 200 and len(body) > 500, path


@pytest.mark.parametrize("preset", ["full", "self_forcing_window", "sink_window", "pyramid_forcing", "head_forcing"])
def test_estimate_is_the_policy_nodes_summary(ui_server, preset):
    values = dict(POLICY_DEFAULTS, preset=preset, length=481 if preset == "full" else 961)
    status, body = _get(ui_server, values, prefix="/api")
    assert status == 200 and body["ok"], body
    wf = {"1": {"class_type": "HeadForcingCachePolicy", "inputs": values},
          "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    entry = ui_server.run(wf, timeout=120)
    shown = entry["outputs"]["2"]["text"][0]
    assert shown == body["summary"]
    assert f"KV cache {body['kv_bytes'] / 2**30:.2f} GiB" in shown
    assert body["kv_bytes"] == sum(body["kv_bytes_by_type"].values())
    if preset == "self_forcing_window":
        assert body["kv_bytes"] == body["window_kv_bytes"]


def test_estimate_with_a_profile_uses_its_labels(ui_server):
    values = dict(POLICY_DEFAULTS)
    status, body = _get(ui_server, dict(values, profile=PLANTED_PROFILE))
    assert status == 200, body
    wf = {"1": {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": PLANTED_PROFILE}},
          "2": {"class_type": "HeadForcingCachePolicy", "inputs": dict(values, head_profile=["1", 0])},
          "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    entry = ui_server.run(wf, timeout=120)
    assert entry["outputs"]["3"]["text"][0] == body["summary"]
    counts = {t: sum(r.count(t) for r in planted_types("head_forcing")) for t in ("local", "anchor", "memory")}
    assert all(f"{t} {n}" in body["summary"] for t, n in counts.items()), body["summary"]
    # the load node's UI data carries the head map for the browser
    hm = entry["outputs"]["1"]["headforcing_head_map"][0]
    assert hm["layers"] == 6 and hm["heads"] == 4 and hm["taxonomy"] == "head_forcing"
    assert [[hm["types"][c] for c in row] for row in hm["labels"]] == planted_types("head_forcing")
    # the node shows only the interactive map; the static heat map is its IMAGE output
    assert "images" not in entry["outputs"]["1"]


@pytest.mark.parametrize("query, fragment", [
    ({"preset": "bogus"}, "preset must be one of"),
    ({"width": "abc"}, "width must be an integer"),
    ({"width": "100"}, "multiple of 16"),
    ({"width": "0"}, "width must be at least 16"),
    ({"length": str(10**12)}, "length must be at most"),
    ({"memory_similarity": "nan"}, "memory_similarity must be finite"),
    ({"memory_similarity": "inf"}, "memory_similarity must be finite"),
    ({"sink_frames": "1.5"}, "sink_frames must be an integer"),
    ({"rope": "sideways"}, "rope must be one of"),
    ({"x": "1"}, "unknown parameter"),
    ({"width": "9" * 600}, "too long"),
    ({"profile": "../../../etc/passwd", "preset": "pyramid_forcing"}, "'..' is a folder reference"),
    ({"profile": "/etc/passwd", "preset": "pyramid_forcing"}, "absolute path"),
    ({"profile": "", "preset": "pyramid_forcing"}, "profile must be"),
    ({"preset": "full", "length": "1"}, "shorter than one chunk"),
])
def test_estimate_refuses_bad_input(ui_server, query, fragment):
    status, body = _get(ui_server, query)
    assert status == 400 and body["ok"] is False, body
    assert fragment in body["error"], body["error"]


def test_estimate_of_a_missing_profile_is_404(ui_server):
    status, body = _get(ui_server, {"profile": "no_such_profile", "preset": "pyramid_forcing"})
    assert status == 404 and body["ok"] is False and "no head profile" in body["error"], body


def test_estimate_survives_garbage(ui_server):
    for raw in ["%ff%fe=%00", "preset=%00", "width=1e309", "width=-0", "&&&", "profile=%2e%2e%2f" * 50,
                "preset=head_forcing&preset=full", "memory_similarity=1e-400", "length=%D9%A3"]:
        status, body = _get(ui_server, raw)
        assert status in (200, 400, 404), (raw, status, body)
        assert isinstance(body, dict) and "ok" in body
    assert ui_server.server.alive()
    assert "HeadForcingCachePolicy" in ui_server.object_info("HeadForcingCachePolicy")
