#!/usr/bin/env python3
"""Write the pack's example workflows (ComfyUI UI format, schema version 0.4) from the node schemas.

    python3 tools/make_workflows.py              # starts the host's ComfyUI for /object_info, writes workflows/
    python3 tools/make_workflows.py --check      # exit 1 if a file differs from what would be written
    python3 tools/make_workflows.py --url http://127.0.0.1:8188      # use a running server
    python3 tools/make_workflows.py --object-info object_info.json   # or a saved /object_info

Every node is laid out the way ComfyUI's frontend serializes it (``inputs`` with the socket
inputs first, then one entry per widget input; ``widgets_values`` in widget order, with the
``control_after_generate`` value after a seed), computed from ``/object_info``; a value that is
not among a dropdown's options, or an input a node does not have, is an error — so a schema
change shows up here instead of as a broken workflow. The browser tests (tests/browser/) load
every file in workflows/ in the real frontend, check that it re-serializes to the same widgets
and links, and that these files are what this script writes for the running server's schemas.

Files written (the others in workflows/ belong to other parts of the pack):

* ``workflows/headforcing_policy_comparison.json`` — one prompt, two samplers side by side:
  ``self_forcing_window`` (the long-video baseline) and ``pyramid_forcing``; a stitched
  side-by-side video plus each run's report.
* ``workflows/headforcing_profile_then_generate.json`` — profile the model's heads on three
  calibration prompts, save the profile, and generate with ``head_forcing`` using its labels.

Models are referenced by their standard names (``REAL_MODELS`` in ``tools/comfyhost/paths.py``).
Standard library only.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# dropdowns of file names: the files need not exist where the workflow is generated
FILE_COMBOS = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"),
               ("HeadForcingLoadHeadProfile", "profile_name")}
UNET = "self_forcing_dmd.safetensors"
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
# where the frontend's "missing models" dialog sends people (Comfy-Org's Wan 2.1 repackage); the
# diffusion model has no download: Self Forcing's .pt must be converted (README)
_REPACK = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
MODEL_DOWNLOADS = {
    ("CLIPLoader", "clip_name"): {"name": TEXT_ENCODER, "url": f"{_REPACK}/text_encoders/{TEXT_ENCODER}",
                                  "directory": "text_encoders"},
    ("VAELoader", "vae_name"): {"name": VAE, "url": f"{_REPACK}/vae/{VAE}", "directory": "vae"},
}
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
GROUP_COLOR = "#3f789e"
NAMESPACE = uuid.UUID("5f1e9a2c-7d4b-4e0f-9c35-6a8b1d2e3f40")  # stable workflow ids


def _host():
    """The host library (``tools/comfyhost/``, the code behind ``tools/host.py``)."""
    tools = str(REPO / "tools")
    if tools not in sys.path:  # run as a script it is there; loaded by file path (tests) it may not be
        sys.path.insert(0, tools)
    import comfyhost
    return comfyhost


# ------------------------------------------------------------------------------------------
# UI-format graph builder


class SchemaError(ValueError):
    pass


def _input_spec(info: dict, node_type: str) -> list[tuple[str, str, dict, bool]]:
    """``[(name, io_type, options, optional)]`` in the node's input order."""
    if node_type not in info:
        raise SchemaError(f"ComfyUI has no node type {node_type!r}")
    node = info[node_type]
    order = node.get("input_order") or {g: list((node["input"].get(g) or {})) for g in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = node["input"][group][name]
            io_type, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(io_type, list):
                opts = dict(opts, options=io_type)
                io_type = "COMBO"
            out.append((name, io_type, opts, group == "optional"))
    return out


def _is_widget(io_type: str, opts: dict) -> bool:
    return io_type in WIDGET_TYPES and not opts.get("forceInput")


class Node:
    def __init__(self, graph: "Graph", node_id: int, node_type: str, pos, size, title: str | None):
        self.graph, self.id, self.type = graph, node_id, node_type
        self.pos, self.size, self.title = [float(pos[0]), float(pos[1])], [float(size[0]), float(size[1])], title
        self.values: dict = {}
        self.links_in: dict[str, int] = {}
        self.links_out: dict[int, list[int]] = {}
        self.mode = 0
        self.color = self.bgcolor = None

    def out(self, name_or_index) -> tuple["Node", int]:
        names = self.graph.info[self.type].get("output_name") or []
        if isinstance(name_or_index, int):
            index = name_or_index
        elif name_or_index in names:
            index = names.index(name_or_index)
        else:
            raise SchemaError(f"{self.type} has no output {name_or_index!r} (outputs: {names})")
        return self, index


class Graph:
    def __init__(self, info: dict, name: str):
        self.info, self.name = info, name
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, node_type: str, pos, size=(320, 0), title: str | None = None, **values) -> Node:
        node = Node(self, len(self.nodes) + 1, node_type, pos, size, title)
        if node_type != "Note":
            spec = {name: (t, o) for name, t, o, _ in _input_spec(self.info, node_type)}
            for key, value in values.items():
                if key.endswith("__control"):
                    continue
                if key not in spec:
                    raise SchemaError(f"{node_type} has no input {key!r} (inputs: {', '.join(spec)})")
                io_type, opts = spec[key]
                if not _is_widget(io_type, opts):
                    raise SchemaError(f"{node_type}.{key} is a socket ({io_type}); connect it with link()")
                if io_type == "COMBO" and (node_type, key) not in FILE_COMBOS and value not in opts.get("options", []):
                    raise SchemaError(f"{node_type}.{key} = {value!r} is not one of {opts.get('options')}")
                if io_type in ("INT", "FLOAT"):
                    lo, hi = opts.get("min"), opts.get("max")
                    if (lo is not None and value < lo) or (hi is not None and value > hi):
                        raise SchemaError(f"{node_type}.{key} = {value} is outside [{lo}, {hi}]")
        node.values = dict(values)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=(420, 300), title: str = "Read me") -> Node:
        node = self.add("Note", pos, size, title)
        node.values = {"text": text}
        node.color, node.bgcolor = NOTE_COLOR, NOTE_BGCOLOR
        return node

    def link(self, src: tuple[Node, int] | Node, dst: Node, input_name: str) -> None:
        if isinstance(src, Node):
            src = src.out(0)
        node, index = src
        spec = {name: (t, o) for name, t, o, _ in _input_spec(self.info, dst.type)}
        if input_name not in spec:
            raise SchemaError(f"{dst.type} has no input {input_name!r}")
        out_type = self.info[node.type]["output"][index]
        in_type = spec[input_name][0]
        if in_type not in ("*", out_type) and not (in_type == "COMBO" and out_type == "COMBO"):
            raise SchemaError(f"cannot connect {node.type} output {index} ({out_type}) to {dst.type}.{input_name} "
                              f"({in_type})")
        link_id = len(self.links) + 1
        self.links.append([link_id, node.id, index, dst.id, input_name, out_type])
        dst.links_in[input_name] = link_id
        node.links_out.setdefault(index, []).append(link_id)

    def group(self, title: str, nodes: list[Node], pad: float = 30.0) -> None:
        x0 = min(n.pos[0] for n in nodes) - pad
        y0 = min(n.pos[1] for n in nodes) - pad - 40
        x1 = max(n.pos[0] + n.size[0] for n in nodes) + pad
        y1 = max(n.pos[1] + n.size[1] for n in nodes) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": GROUP_COLOR, "font_size": 24, "flags": {}})

    # ---- serialization ----------------------------------------------------------------------
    def _order(self) -> dict[int, int]:
        """Execution order the frontend would compute (Kahn's algorithm, stable by id)."""
        deps = {n.id: set() for n in self.nodes}
        for _, src, _, dst, _, _ in self.links:
            deps[dst].add(src)
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [i for i in sorted(deps) if i not in done and deps[i] <= done]
            for i in ready:
                order[i] = len(order)
                done.add(i)
        return order

    def _ui_node(self, node: Node, order: int) -> dict:
        if node.type == "Note":
            return {"id": node.id, "type": "Note", "pos": node.pos, "size": node.size, "flags": {}, "order": order,
                    "mode": node.mode, "inputs": [], "outputs": [], "title": node.title, "properties": {},
                    "widgets_values": [node.values["text"]], "color": node.color, "bgcolor": node.bgcolor}
        spec = _input_spec(self.info, node.type)
        sockets, widgets = [], []
        for name, io_type, opts, optional in spec:
            entry = {"localized_name": name, "name": name}
            if optional:
                entry["shape"] = 7
            entry["type"] = io_type
            if _is_widget(io_type, opts):
                entry["widget"] = {"name": name}
                widgets.append((name, io_type, opts))
                entry["link"] = node.links_in.get(name)
                sockets.append(("w", entry))
            else:
                entry["link"] = node.links_in.get(name)
                sockets.append(("s", entry))
        inputs = [e for k, e in sockets if k == "s"] + [e for k, e in sockets if k == "w"]
        values = []
        for name, io_type, opts in widgets:
            if name in node.values:
                v = node.values[name]
            elif "default" in opts:
                v = opts["default"]
            elif io_type == "COMBO" and opts.get("options"):
                v = opts["options"][0]
            else:
                raise SchemaError(f"{node.type}.{name} has no default; give a value")
            values.append(v)
            # the frontend adds a control widget (fixed / increment / randomize) after an INT with
            # control_after_generate, and — a legacy convention — after any INT named seed / noise_seed
            if io_type == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                values.append(node.values.get(name + "__control", "fixed"))
        info = self.info[node.type]
        outputs = []
        for i, (otype, oname) in enumerate(zip(info.get("output", []), info.get("output_name", []))):
            outputs.append({"localized_name": oname, "name": oname, "type": otype,
                            "links": node.links_out.get(i) or None})
        out = {"id": node.id, "type": node.type, "pos": node.pos, "size": node.size, "flags": {}, "order": order,
               "mode": node.mode, "inputs": inputs, "outputs": outputs}
        if node.title:
            out["title"] = node.title
        out["properties"] = {"Node name for S&R": node.type}
        models = [m for key, m in MODEL_DOWNLOADS.items() if node.values.get(key[1]) == m["name"]
                  and node.type == key[0]]
        if models:  # the frontend offers these downloads when the file is missing
            out["properties"]["models"] = models
        if values:
            out["widgets_values"] = values
        return out

    def ui_json(self) -> dict:
        order = self._order()
        nodes = [self._ui_node(n, order[n.id]) for n in self.nodes]
        # links name the target input slot by index in the node's UI inputs list
        slot_of = {n["id"]: {e["name"]: i for i, e in enumerate(n["inputs"])} for n in nodes}
        links = [[lid, src, sslot, dst, slot_of[dst][name], t] for lid, src, sslot, dst, name, t in self.links]
        xs = [n.pos[0] for n in self.nodes]
        ys = [n.pos[1] for n in self.nodes]
        return {
            "id": str(uuid.uuid5(NAMESPACE, self.name)),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [-min(xs) + 60, -min(ys) + 120]}},
            "version": 0.4,
        }


# ------------------------------------------------------------------------------------------
# the workflows

COMPARISON_PROMPT = (
    "A vintage red tram travels through a rainy city street at dusk, passing lit shop windows, umbrellas and "
    "reflections on the wet cobblestones, then turns onto a bridge over a river; cinematic tracking shot, "
    "steady camera, highly detailed, natural motion.")

COMPARISON_NOTE = """Head Forcing: the same prompt under two cache policies, side by side

Two Head Forcing AR Samplers share the model, the prompt and the seed; only the KV-cache policy differs:
- top: self_forcing_window: every head keeps the last 21 latent frames (Self Forcing's rolling window; the long-video baseline).
- bottom: pyramid_forcing: Anchor / Wave / Veil heads keep [sink + middle + recent] caches of their own (Pyramid Forcing's published labels for Self Forcing), about 61 % of the window's KV memory.
Image Stitch puts the two decoded videos next to each other (left: window, right: pyramid) and Save Video writes one MP4; each sampler's report (time, memory) is shown in a text preview.

Length: 30 s (481 frames) so the difference past the 5-s training window shows; raise both samplers' length to 60 s for VBench-Long style runs (the decoded frames need ~5 GB of RAM per 60-s video at 832x480).
Watch the policy nodes' memory estimate update as you change their widgets, and each sampler's live panel (chunk, seconds done, KV in use, newest chunk) while it runs.

Models (ComfyUI/models/...): diffusion_models/self_forcing_dmd.safetensors (convert Self Forcing's .pt with python -m headforcing_core.convert), text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan), vae/wan_2.1_vae.safetensors.
No CFG, no negative prompt (distilled models); keep shift 5.0 and steps 1000,750,500,250."""

PROFILE_PROMPTS = [
    "A golden retriever runs along a sunny beach, waves rolling in, camera tracking from the side.",
    "Time-lapse of clouds drifting over a mountain lake, reflections on the water, slow pan.",
    "A busy night market with neon signs, people walking past food stalls, handheld camera.",
]
GENERATE_PROMPT = (
    "A hot-air balloon rises over green hills at sunrise, drifts above a winding river and a small village, "
    "then over a misty forest; soft morning light, wide cinematic shot, natural motion.")

PROFILE_NOTE = """Head Forcing: profile the model's heads, then generate with them

1. Profile Heads runs one short calibration video per prompt (21 latent frames = 81 frames, the window the model was trained on, full KV cache) and measures where every attention head looks: sink frames, middle frames, recent frames, the current chunk, and how its logits change with frame age. It labels every head local / anchor / memory (Head Forcing) and anchor / wave / veil (Pyramid Forcing). The node draws the head map: layers x heads coloured by type; hover a cell for that head's statistics.
2. Save Head Profile writes it to models/headforcing/self_forcing_dmd_heads.safetensors. Next time skip the calibration: use Load Head Profile with that file (it draws the same map) instead of Profile Heads.
3. Cache Policy (head_forcing) takes the profile's labels instead of the stand-in derived from Pyramid Forcing's; its memory estimate updates as you edit it.
4. The AR Sampler makes a 60-s video (961 frames) chunk by chunk; its live panel shows chunk k of n, seconds done, KV in use and the newest chunk.

Calibration costs about 3 x 8 chunks x 5 model calls at 832x480 (a few minutes on one GPU). More and more varied prompts give steadier labels (up to 4 conditioning inputs).
Models: diffusion_models/self_forcing_dmd.safetensors, text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan), vae/wan_2.1_vae.safetensors."""


def _loaders(g: Graph, x: float, y: float) -> tuple[Node, Node, Node]:
    unet = g.add("UNETLoader", (x, y), (330, 82), "Load Diffusion Model (Self Forcing)",
                 unet_name=UNET, weight_dtype="default")
    clip = g.add("CLIPLoader", (x, y + 140), (330, 106), "Load Text Encoder (umT5-XXL, wan)",
                 clip_name=TEXT_ENCODER, type="wan", device="default")
    vae = g.add("VAELoader", (x, y + 300), (330, 58), "Load VAE (Wan 2.1)", vae_name=VAE)
    return unet, clip, vae


def policy_comparison(info: dict) -> dict:
    g = Graph(info, "headforcing_policy_comparison")
    unet, clip, vae = _loaders(g, 0, 0)
    prompt = g.add("CLIPTextEncode", (0, 420), (330, 200), "Prompt", text=COMPARISON_PROMPT)
    g.link(clip, prompt, "clip")
    rows = []
    for row, (preset, label) in enumerate((("self_forcing_window", "Self Forcing window"),
                                           ("pyramid_forcing", "Pyramid Forcing"))):
        y = row * 620
        pol = g.add("HeadForcingCachePolicy", (420, y), (330, 360), f"Cache Policy: {label}", preset=preset,
                    width=832, height=480, length=481)
        smp = g.add("HeadForcingARSampler", (800, y), (340, 420), f"AR Sampler: {label}", width=832, height=480,
                    length=30, seed=42, length_unit="seconds", policy=preset)
        g.link(unet, smp, "model")
        g.link(prompt, smp, "conditioning")
        g.link(pol.out("kv_policy"), smp, "kv_policy")
        dec = g.add("VAEDecode", (1190, y), (210, 46), f"VAE Decode: {label}")
        g.link(smp.out("latent"), dec, "samples")
        g.link(vae, dec, "vae")
        rep = g.add("PreviewAny", (1190, y + 100), (420, 260), f"Report: {label}")
        g.link(smp.out("report"), rep, "source")
        g.group(label + f" ({preset})", [pol, smp, dec, rep])
        rows.append(dec)
    stitch = g.add("ImageStitch", (1680, 300), (300, 150), "Side by side (left: window, right: pyramid)",
                   direction="right", match_image_size=True, spacing_width=8, spacing_color="black")
    g.link(rows[0], stitch, "image1")
    g.link(rows[1], stitch, "image2")
    video = g.add("CreateVideo", (1680, 520), (300, 78), "Create Video (16 fps)", fps=16.0)
    g.link(stitch, video, "images")
    save = g.add("SaveVideo", (2030, 300), (420, 420), "Save Video (side by side)",
                 filename_prefix="video/headforcing_policy_comparison", format="auto", codec="auto")
    g.link(video, save, "video")
    g.note(COMPARISON_NOTE, (0, 700), (380, 560))
    return g.ui_json()


def profile_then_generate(info: dict) -> dict:
    g = Graph(info, "headforcing_profile_then_generate")
    unet, clip, vae = _loaders(g, 0, 0)
    calib = []
    for i, text in enumerate(PROFILE_PROMPTS):
        node = g.add("CLIPTextEncode", (400, i * 215), (330, 150), f"Calibration prompt {i + 1}", text=text)
        g.link(clip, node, "clip")
        calib.append(node)
    prof = g.add("HeadForcingProfileHeads", (780, 0), (380, 640), "Profile Heads", latent_frames=21, width=832,
                 height=480, seed=0, query_samples=64, taxonomy="head_forcing")
    g.link(unet, prof, "model")
    for i, node in enumerate(calib):
        g.link(node, prof, "conditioning" if i == 0 else f"conditioning_{i + 1}")
    save_prof = g.add("HeadForcingSaveHeadProfile", (1210, 0), (330, 130), "Save Head Profile",
                      filename="self_forcing_dmd_heads", overwrite=True)
    g.link(prof.out("head_profile"), save_prof, "head_profile")
    summary = g.add("PreviewAny", (1210, 180), (330, 240), "Profile summary")
    g.link(prof.out("summary"), summary, "source")
    g.group("1. Profile the heads (once per model)", calib + [prof, save_prof, summary])

    y = 760
    pol = g.add("HeadForcingCachePolicy", (400, y), (330, 360), "Cache Policy (profiled labels)",
                preset="head_forcing", width=832, height=480, length=961)
    g.link(prof.out("head_profile"), pol, "head_profile")
    prompt = g.add("CLIPTextEncode", (0, y + 120), (350, 200), "Prompt", text=GENERATE_PROMPT)
    g.link(clip, prompt, "clip")
    smp = g.add("HeadForcingARSampler", (780, y), (380, 420), "Head Forcing AR Sampler", width=832, height=480,
                length=961, seed=7, length_unit="frames", policy="head_forcing")
    g.link(unet, smp, "model")
    g.link(prompt, smp, "conditioning")
    g.link(pol.out("kv_policy"), smp, "kv_policy")
    dec = g.add("VAEDecode", (1210, y), (210, 46), "VAE Decode")
    g.link(smp.out("latent"), dec, "samples")
    g.link(vae, dec, "vae")
    video = g.add("CreateVideo", (1210, y + 90), (300, 78), "Create Video (16 fps)", fps=16.0)
    g.link(dec, video, "images")
    save = g.add("SaveVideo", (1560, y), (420, 420), "Save Video",
                 filename_prefix="video/headforcing_profiled", format="auto", codec="auto")
    g.link(video, save, "video")
    rep = g.add("PreviewAny", (1210, y + 220), (320, 240), "Sampler report")
    g.link(smp.out("report"), rep, "source")
    g.group("2. Generate with the profiled labels", [pol, prompt, smp, dec, video, save, rep])
    g.note(PROFILE_NOTE, (0, 420), (350, 250))
    return g.ui_json()


BUILDERS = {
    "headforcing_policy_comparison.json": policy_comparison,
    "headforcing_profile_then_generate.json": profile_then_generate,
}


def build_workflows(info: dict) -> dict[str, dict]:
    """``{file name: UI workflow}`` for the workflows this script owns."""
    return {name: fn(info) for name, fn in BUILDERS.items()}


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------
# object_info sources


def fetch_object_info(url: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=120) as r:
        return json.loads(r.read())


def object_info_from_host() -> dict:
    """Start the built host's ComfyUI (tools/comfyhost) in a scratch base directory and read /object_info."""
    import tempfile
    host = _host()
    if not host.VENV_PY.exists():
        raise SystemExit("the host is not built: run `python3 tools/host.py build` first, or pass --url / --object-info")
    with tempfile.TemporaryDirectory(prefix="hf-make-workflows-") as tmp:
        base = host.prepare_base(Path(tmp))
        with host.ComfyServer(base, log_path=Path(tmp) / "comfyui.log") as server:
            return fetch_object_info(server.url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running ComfyUI with the pack (default: start the host's)")
    p.add_argument("--object-info", help="a saved /object_info JSON file")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when a file would change")
    p.add_argument("--out", default=str(WORKFLOWS), help="output folder (default workflows/)")
    args = p.parse_args(argv)
    if args.object_info:
        info = json.loads(Path(args.object_info).read_text())
    elif args.url:
        info = fetch_object_info(args.url)
    else:
        info = object_info_from_host()
    out = Path(args.out)
    stale = []
    for name, wf in build_workflows(info).items():
        path = out / name
        text = dumps(wf)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    if stale:
        print("out of date (run python3 tools/make_workflows.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
