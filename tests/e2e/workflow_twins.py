"""A UI workflow and its API twin describe the same graph (``tools/make_workflows.py`` writes both).

The check reads the widget order from the running server's ``/object_info`` (what the frontend
does when it loads a UI file), so a node whose inputs change without regenerating the workflows
fails here.
"""
from __future__ import annotations

import json
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # UI-only nodes: no API twin


def widgets(node_info: dict) -> list[tuple[str, bool, bool]]:
    """(name, a control widget follows it, an upload widget follows it) per widget, in frontend order."""
    out = []
    for group in ("required", "optional"):
        for name in node_info.get("input_order", {}).get(group, []):
            spec = node_info["input"][group][name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput"):
                out.append((name, bool(opts.get("control_after_generate")),
                            any(opts.get(k) for k in ("image_upload", "video_upload"))))
    return out


def assert_twins(ui: dict, api: dict, object_info: dict) -> None:
    """Same nodes, classes, titles, widget values (in the frontend's order) and links."""
    assert ui["version"] == 0.4 and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    graph = [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY]
    assert {str(n["id"]) for n in graph} == set(api), "UI node ids and API ids must be the same"
    for node in graph:
        twin = api[str(node["id"])]
        assert node["type"] == twin["class_type"] and node["type"] in object_info, node["type"]
        assert twin["_meta"]["title"], node["id"]
        values = list(node.get("widgets_values") or [])
        for name, control, upload in widgets(object_info[node["type"]]):
            assert values, f"node {node['id']} ({node['type']}): no widget value for {name}"
            assert values.pop(0) == twin["inputs"][name], (node["id"], name)
            if control:
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            if upload:
                assert values.pop(0) == "image"
        assert not values, f"node {node['id']} ({node['type']}): extra widget values {values}"
        sockets = {i["name"]: i for i in node.get("inputs", [])}
        for name, value in twin["inputs"].items():
            if isinstance(value, list):
                assert sockets[name]["link"] is not None, (node["id"], name)
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        name = dst_node["inputs"][dst_slot]["name"]
        assert dst_node["inputs"][dst_slot]["link"] == lid
        assert api[str(dst)]["inputs"][name] == [str(src), src_slot], (lid, name)
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        assert lid in src_node["outputs"][src_slot]["links"]
        assert object_info[src_node["type"]]["output"][src_slot] == typ
    linked = sum(isinstance(v, list) for node in api.values() for v in node["inputs"].values())
    assert linked == len(ui["links"])


def shipped_twins(workflows: Path, name: str, object_info: dict) -> tuple[dict, dict]:
    """A shipped workflow ``name`` and its API twin, checked: one Head Forcing note, and
    :func:`assert_twins`. Returns ``(ui, api)`` for the caller's own checks."""
    ui = json.loads((workflows / f"{name}.json").read_text())
    api = json.loads((workflows / "api" / f"{name}.json").read_text())
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "Head Forcing" in notes[0]["widgets_values"][0], name
    assert_twins(ui, api, object_info)
    return ui, api
