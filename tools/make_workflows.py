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

Files written (every example workflow of the pack; ``workflows/api/<name>.json`` is the API-format
twin of a UI file, same node ids, used by the tests and ``tools/host.py demo``):

* ``headforcing_long_video.json`` (+ API twin) — one minute of text-to-video with ``head_forcing``.
* ``headforcing_policy_comparison.json`` — one prompt, two samplers side by side:
  ``self_forcing_window`` (the long-video baseline) and ``pyramid_forcing``; a stitched
  side-by-side video plus each run's report.
* ``headforcing_profile_then_generate.json`` — profile the model's heads on three
  calibration prompts, save the profile, and generate with ``head_forcing`` using its labels.
* ``headforcing_story.json`` (+ API twin) — a one-minute story in four Prompt Segments.
* ``headforcing_continuation.json`` (+ API twin) — Sampler → Continue → Continue, joined, state saved.
* ``headforcing_image_to_video.json`` (+ API twin) — LoadImage → VAEEncode → the sampler's
  ``initial_latent`` with a frame-wise Causal Forcing model; LatentConcat(image, new) → video.
* ``headforcing_extend_video.json`` (+ API twin) — LoadVideo → GetVideoComponents → VAEEncode →
  ``initial_latent``; LatentConcat(video, new) → video.
* ``headforcing_longlive_story.json`` (+ API twin) — a multi-prompt story with LongLive (base +
  LoRA through LoraLoaderModelOnly), the ``longlive`` cache preset and its recache.
* ``headforcing_krea_realtime.json`` (+ API twin) — Krea Realtime 14B (fp8 weights) with its own loop:
  a four-prompt story interpolated between blocks, the Wan 2.1 VAE for the context re-encode.
* ``headforcing_live.json`` (+ API twin) — one minute steered live from the sampler's panel: the
  text encoder wired into the sampler's ``clip`` input, the ``take`` output shown.

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
               ("HeadForcingLoadHeadProfile", "profile_name"), ("LoadImage", "image"), ("LoadVideo", "file"),
               ("LoraLoaderModelOnly", "lora_name"), ("HeadForcingLoadARState", "state_name")}
# a file dropdown with an upload button: the frontend adds an "upload" widget after it, saved as "image"
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
UNET = "self_forcing_dmd.safetensors"
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"
FPS = 16.0  # Wan 2.1's frame rate (headforcing_core.geometry.FPS; this tool runs without torch)
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

    def add(self, node_type: str, pos, size=(320, 0), title: str | None = None, color: tuple[str, str] | None = None,
            **values) -> Node:
        node = Node(self, len(self.nodes) + 1, node_type, pos, size, title)
        if color:
            node.color, node.bgcolor = color
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
            if io_type == "COMBO" and any(opts.get(k) for k in UPLOAD_OPTIONS):
                values.append("image")
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
        out["widgets_values"] = values  # [] for a node without widgets, as the frontend saves it
        if node.color:
            out["color"], out["bgcolor"] = node.color, node.bgcolor
        return out

    def api_json(self) -> dict:
        """The API-format twin (what the frontend queues): same node ids, every widget value (defaults
        filled in), links as ``[source id, output slot]``, titles in ``_meta``; Notes are left out."""
        links = {(dst, name): (src, slot) for _, src, slot, dst, name, _ in self.links}
        out = {}
        for node in self.nodes:
            if node.type == "Note":
                continue
            inputs = {}
            for name, io_type, opts, _ in _input_spec(self.info, node.type):
                if (node.id, name) in links:
                    src, slot = links[(node.id, name)]
                    inputs[name] = [str(src), slot]
                elif _is_widget(io_type, opts):
                    if name in node.values:
                        inputs[name] = node.values[name]
                    elif "default" in opts:
                        inputs[name] = opts["default"]
                    elif io_type == "COMBO" and opts.get("options"):
                        inputs[name] = opts["options"][0]
            title = node.title or self.info[node.type].get("display_name") or node.type
            out[str(node.id)] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": title}}
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


def policy_comparison(info: dict) -> Graph:
    g = Graph(info, "headforcing_policy_comparison")
    unet, clip, vae = _loaders(g, 0, 0)
    prompt = g.add("CLIPTextEncode", (0, 420), (330, 200), "Prompt", text=COMPARISON_PROMPT)
    g.link(clip, prompt, "clip")
    rows = []
    for row, (preset, label) in enumerate((("self_forcing_window", "Self Forcing window"),
                                           ("pyramid_forcing", "Pyramid Forcing"))):
        y = row * 720  # the Cache Policy node is about 660 px tall once the frontend sizes it
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
    video = g.add("CreateVideo", (1680, 520), (300, 78), "Create Video (16 fps)", fps=FPS)
    g.link(stitch, video, "images")
    save = g.add("SaveVideo", (2030, 300), (420, 420), "Save Video (side by side)",
                 filename_prefix="video/headforcing_policy_comparison", format="auto", codec="auto")
    g.link(video, save, "video")
    g.note(COMPARISON_NOTE, (0, 700), (380, 560))
    return g


def profile_then_generate(info: dict) -> Graph:
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
    video = g.add("CreateVideo", (1210, y + 90), (300, 78), "Create Video (16 fps)", fps=FPS)
    g.link(dec, video, "images")
    save = g.add("SaveVideo", (1560, y), (420, 420), "Save Video",
                 filename_prefix="video/headforcing_profiled", format="auto", codec="auto")
    g.link(video, save, "video")
    rep = g.add("PreviewAny", (1210, y + 220), (320, 240), "Sampler report")
    g.link(smp.out("report"), rep, "source")
    g.group("2. Generate with the profiled labels", [pol, prompt, smp, dec, video, save, rep])
    g.note(PROFILE_NOTE, (0, 420), (350, 250))
    return g


PROMPT_COLOR = ("#232", "#353")  # the frontend's green for positive prompts
CAUSAL_FRAMEWISE = "causal_forcing_framewise.safetensors"
LONGLIVE_BASE = "longlive_base.safetensors"
LONGLIVE_LORA = "longlive_lora.safetensors"

LONG_VIDEO_PROMPT = (
    "A red fox trots through a snowy pine forest at dawn, then along a frozen river and up a rocky ridge as the "
    "sun rises over the mountains; soft golden light, drifting snow, cinematic tracking shot following the fox, "
    "highly detailed, natural motion.")

LONG_VIDEO_NOTE = """Head Forcing: one-minute text-to-video (Self Forcing + head-aware KV cache)

Models (ComfyUI/models/...):
- diffusion_models/self_forcing_dmd.safetensors: Self Forcing (Wan2.1-T2V-1.3B distilled). Convert the official .pt with the pack's converter (python -m headforcing_core.convert) if you only have the checkpoint. Causal Forcing works the same way: pick its model_preset on the sampler (frame-wise checkpoints make one latent frame per chunk).
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan)
- vae/wan_2.1_vae.safetensors

How it runs: the AR sampler makes the video chunk by chunk (3 latent frames, 4 steps + 1 clean pass each) and keeps, per attention head, only the history that head needs (Cache Policy: head_forcing). Memory stays flat however long the video is: the policy node's summary shows the KV cache it needs.

Length: 961 frames = 60 s at 16 fps (T = 241 latent frames; VAEDecode makes 4T-3 frames). Or set length_unit to seconds and length to 60.
No CFG, no negative prompt: these are distilled models. model_preset 'Self Forcing chunk-wise' sets frames per block 3, steps 1000,750,500,250 and shift 5.0 (ComfyUI's Wan default 8.0 is wrong here); 'custom' uses the widgets.
Watch: the progress bar moves per model call and a preview appears per chunk when ComfyUI runs with --preview-method auto."""

STORY_PROMPTS = [
    "A red fox trots through a snowy pine forest at dawn, soft golden light, drifting snow, cinematic tracking shot "
    "following the fox, highly detailed, natural motion.",
    "The red fox reaches a frozen river and walks carefully across the ice, the rising sun reflected in the ice, "
    "cinematic tracking shot, highly detailed, natural motion.",
    "The red fox climbs a rocky ridge above the forest, wind blowing powder snow off the rocks, the sun rising over "
    "the mountains, cinematic wide shot, highly detailed.",
    "The red fox sits on the top of the ridge and looks out over the valley while the camera slowly circles it, "
    "warm morning light, calm, highly detailed.",
]

STORY_NOTE = """Head Forcing: a one-minute story in four prompts (multi-prompt AR video)

Models (ComfyUI/models/...): diffusion_models/self_forcing_dmd.safetensors (Self Forcing, Wan2.1-T2V-1.3B distilled; Causal Forcing works the same way), text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan), vae/wan_2.1_vae.safetensors.

How it works: each Prompt Segment adds one prompt to a PROMPT_SCHEDULE (chained through 'previous'): its length (15 s each here: 60 latent frames; seconds are rounded to whole 3-frame chunks) and the transition INTO it. The AR sampler generates the segments one after another in one run, chunk by chunk, with the head-aware cache (Cache Policy: head_forcing), so memory stays flat for the whole minute. With a prompt_schedule connected, the sampler's own conditioning and length are not used. Each segment's chunks start at its first frame, and the prompt switches exactly there.

Transitions (frame counts in latent frames, 1 = 4 video frames):
- cut: the new prompt takes over at the boundary.
- blend N: the two prompts' cross-attention is interpolated over the first N frames (segment 2: 6 frames = 1.5 s; segment 4: 3 frames).
- recache N: at the boundary the last N frames are re-run under the new prompt so the cache matches it (segment 3). recache_mode 'policy default' is block_causal here (chunk by chunk, each chunk seeing only older history); 'longlive' is LongLive's one-call re-run (see headforcing_longlive_story.json and docs/multiprompt.md).
Memory heads open a new episode at every prompt switch.

Text instead of nodes: 'Head Forcing Prompt Schedule From Text' takes the CLIP and one 'seconds | prompt | transition N' per line.

Extend the video later: connect the sampler's ar_state output to 'Head Forcing Continue' (see headforcing_continuation.json).
No CFG, no negative prompt; keep shift 5.0 and steps 1000,750,500,250."""

CONTINUATION_PROMPTS = [
    "A red fox trots through a snowy pine forest at dawn, soft golden light, drifting snow, cinematic tracking shot "
    "following the fox, highly detailed.",
    "The red fox stops, lifts its head and listens, ears turning, snow falling softly, cinematic close-up, highly "
    "detailed.",
    "The red fox pounces head first into a deep snow bank and comes up with snow on its face, playful, cinematic, "
    "highly detailed.",
]

CONTINUATION_NOTE = """Head Forcing: continue a video (AR_STATE chain)

The AR sampler's third output, ar_state, is the finished run: its KV cache (every head's kept frames and memory), position, re-noise RNG state and settings, held in CPU memory. 'Head Forcing Continue' extends it with the next prompt and outputs only the NEW frames' latent plus a longer ar_state for the next Continue. The input state is never changed, so several Continue nodes can branch from one state (try two endings).

Editing is cheap: ComfyUI re-runs only the nodes downstream of a change. Change Prompt 3 and only the second Continue (and the decode) runs again; the first 10 s come from the cache.

Seeds: use the sampler's seed on every Continue (42 here) and the chain gives exactly what one sampler run of the same prompt schedule gives; another seed varies the new frames only.

Transitions into each Continue: cut, recache N (re-run the last N latent frames under the new prompt to refresh the cache), blend N (interpolate the prompts over N frames). Length 5 s = 21 latent frames (rounded to whole chunks).

Joining: LatentConcat (dim t) puts the pieces end to end; decode the joined latent ONCE (the Wan VAE is causal in time: decoding pieces separately restarts it at every piece).

Save AR State writes the last state to output/headforcing_states/fox_story.safetensors; 'Head Forcing Load AR State' reads it back in a later session (same model, same size) for more Continue nodes.

Models: as in headforcing_story.json (Self Forcing, umT5-XXL type wan, Wan 2.1 VAE)."""

I2V_PROMPT = (
    "The scene comes to life: the camera slowly pushes in while leaves sway in a light breeze and soft sunlight "
    "moves across the ground; natural motion, cinematic, highly detailed.")

I2V_NOTE = """Head Forcing: image-to-video with a frame-wise Causal Forcing model

Load Image -> Image Scale (832x480, stretched with no crop, as Causal Forcing's inference.py resizes; set crop to center to keep the aspect ratio instead) -> VAE Encode (Wan 2.1 VAE) gives a 1-frame latent. The AR sampler puts it into the KV cache first (one clean pass at timestep 0, as Causal Forcing's own inference does with initial_latent) and generates the frames after it, one latent frame per chunk.

model_preset 'Causal Forcing frame-wise 4-step' sets frames per block 1, steps 1000,750,500,250, shift 5 (the preset replaces those widgets; 'custom' uses them). The Causal Forcing++ frame-wise 2-step / 1-step checkpoints work the same way with their own preset (their first generated frame gets 4 steps). Chunk-wise models (Self Forcing, 3 frames per block) cannot start from a single image: the sampler says so.

Length counts the whole video, the image included: 81 frames = 21 latent frames = the image + 20 new ones (5 s at 16 fps). The sampler's LATENT output holds only the NEW frames: Latent Concat (dim t) puts the image's latent in front and VAE Decode decodes the joined latent once, so the first video frame is the (VAE-reconstructed) image.

The image is resized to the sampler's width x height (832x480, the size these models were trained at); a latent of another size is refused with the size to use.
Models (ComfyUI/models/...): diffusion_models/causal_forcing_framewise.safetensors (convert framewise/causal_forcing.pt from zhuhz22/Causal-Forcing with --ema: README), text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan), vae/wan_2.1_vae.safetensors. No CFG, no negative prompt."""

EXTEND_PROMPT = (
    "The camera keeps tracking the scene as it goes on: natural, continuous motion, consistent lighting and "
    "subjects, cinematic, highly detailed.")

EXTEND_NOTE = """Head Forcing: extend a video

Load Video -> Get Video Components (frames) -> Image From Batch (the first 81 frames) -> Image Scale (832x480) -> VAE Encode gives the video's latent: 81 frames = 21 latent frames (the Wan VAE makes T latent frames of 4T-3 video frames; extra frames past 4k+1 are dropped). The AR sampler puts them into the KV cache first, chunk by chunk at timestep 0 (what Self Forcing's and Causal Forcing's inference do with initial_latent), then generates the new frames as if it had made the video itself.

Whole chunks: with a chunk-wise model (3 latent frames per chunk) the video must be 9, 21, 33, 45, 57, 69 or 81 ... frames (4 x 3k - 3); Image From Batch trims it (length 81 here). Another length is refused with the lengths that work. Frame-wise models take any 4k+1 frames. The video should be 16 fps (what these models make), or its motion is played at another speed.

Length counts the whole video: 161 frames = the 81 given + 80 new (10 s in all). The sampler's LATENT output holds only the NEW frames: Latent Concat (dim t) joins them after the video's latent and VAE Decode decodes the joined latent once (the first 81 frames are the VAE's reconstruction of the input).

model_preset 'Self Forcing chunk-wise' sets frames per block 3, steps 1000,750,500,250, shift 5; pick the preset of your checkpoint (Causal Forcing chunk-wise / frame-wise, Causal Forcing++) and its file in Load Diffusion Model. The default policy self_forcing_window keeps the last 21 latent frames: exactly what the 21 given frames fill.
Models: diffusion_models/self_forcing_dmd.safetensors, text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan), vae/wan_2.1_vae.safetensors. Put your video in ComfyUI/input (or upload it on the Load Video node)."""

LONGLIVE_PROMPTS = [
    "A lone astronaut walks across a red desert on Mars at sunrise, dust drifting around the boots, wide cinematic "
    "shot, highly detailed, natural motion.",
    "The astronaut stops at the edge of a canyon and looks down into it, the sun rising behind, dust blowing over "
    "the rim, cinematic, highly detailed.",
    "The astronaut climbs down a rocky path into the canyon, the camera following from behind, long shadows on the "
    "canyon walls, highly detailed.",
    "The astronaut reaches the canyon floor and finds a small green plant growing between the rocks, kneels and "
    "looks at it closely, warm light, highly detailed.",
    "The astronaut carefully scoops the plant with its soil into a sample container, close-up of the gloved hands, "
    "soft light, highly detailed.",
    "The astronaut walks back across the desert towards a distant habitat dome at sunset, long shadow, wide "
    "cinematic shot, highly detailed.",
]
# LongLive's interactive config: 240 latent frames, switch_frame_indices 40, 80, 120, 160, 200; a switch happens at
# the first 3-frame chunk starting at or after the index (42, 81, 120, 162, 201), so the segments are
LONGLIVE_SEGMENTS = (42, 39, 39, 42, 39, 39)  # latent frames; 240 in all = 957 video frames (about 60 s)

LONGLIVE_NOTE = """Head Forcing: a LongLive story (interactive prompt switching, LongLive's own window and recache)

LongLive (NVlabs/LongLive v1.0, Wan2.1-T2V-1.3B) is trained for prompt switches: a 12-frame attention window with a 3-frame sink and, at each switch, a 'recache' that re-runs the frames before it under the new prompt. This graph runs LongLive's interactive example as its config sets it: 240 latent frames (957 frames, about 60 s), six prompts.

Models (ComfyUI/models/...): diffusion_models/longlive_base.safetensors + loras/longlive_lora.safetensors, converted from Efficient-Large-Model/LongLive-1.3B's longlive_base.pt and lora.pt with python -m headforcing_core.convert (README). Load Diffusion Model -> LoraLoaderModelOnly (strength 1.0) applies the LoRA (or load the merged longlive.safetensors and bypass the LoRA node). text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan), vae/wan_2.1_vae.safetensors.

Cache Policy 'longlive': LongLive's interactive window - every chunk attends the 3 sink frames, the 6 frames before it and itself (12 frames: LongLive's local_attn_size 12 counts the sink and the chunk), keys at their absolute positions.
Transitions 'recache 12' with recache_mode 'policy default' (= longlive under this preset): LongLive's released _recache_after_switch - at the switch frame s it re-runs the last min(12, s) frames in ONE call under the new prompt, with no causal mask; the 3 sink frames keep the old prompt's K/V (LongLive's global_sink), so past the window the last 9 frames are rewritten. 'longlive_local_sink' is the same without the global sink (the re-run window's first 3 frames become the sink); 'block_causal' is the pack's chunk-by-chunk re-run.

Switch timing: each segment starts its own chunks at its first frame and its prompt takes over exactly there. LongLive switches at the first chunk that starts at or after each of its switch_frame_indices (40, 80, 120, 160, 200 -> 42, 81, 120, 162, 201), so the segments here are 42, 39, 39, 42, 39, 39 latent frames (length_unit latent_frames): the same switch frames. Lengths in seconds are rounded to whole chunks (10 s -> 39 latent frames).
model_preset 'LongLive': 3 frames per block, steps 1000,750,500,250, shift 5. Seed 1 as in LongLive's config (its noise is not ours: same settings, not the same video). No CFG, no negative prompt. docs/multiprompt.md explains both recache modes."""


LIVE_PROMPT = ("A red fox trots through a snowy pine forest at dawn, soft golden light, cinematic tracking shot, "
               "highly detailed, natural motion.")
LIVE_NOTE = """Head Forcing: direct the video while it renders (live prompts, recorded as a take)

Press Run, then watch the sampler's panel: the chunks play there as they are made. Type the next prompt in the panel's prompt line, pick the transition and press Enter (or Switch): the prompt is encoded with this graph's text encoder (the CLIP wired into the sampler's 'clip' input) between two chunks and switched in at the next chunk boundary.
Transitions: cut; recache N (LongLive: re-run the last N frames under the new prompt); blend N (cross-attention blended over N latent frames); interpolate N (Krea Realtime's switch: the text embeddings interpolated over N chunks, 4 as Krea's server does).

Every switch is recorded. When the run ends, the sampler's 'take' output (shown here) is the run as schedule text, and the panel's 'Use take' button puts it into the graph as a Prompt Schedule From Text node on the sampler's prompt_schedule with the seed fixed: Run renders exactly the same video again (and AR_STATE -> Continue goes on from it). ComfyUI caches the sampler's outputs by its inputs: running the same graph again shows the same take; change the seed (or use the take) for a new run.

Length: 60 s (961 frames) gives time to steer; model_preset 'Self Forcing chunk-wise'. Models as in the one-minute workflow. docs/live.md explains the route, the take and what is safe to send."""


def _model_and_prompt(g: Graph, title: str, text: str) -> tuple[Node, Node, Node]:
    """Load Diffusion Model, Load Text Encoder and a CLIP Text Encode, where every one-prompt graph has them
    (the caller links them, in its own order: link ids follow it)."""
    unet = g.add("UNETLoader", (-420, 40), (380, 82), "Load Diffusion Model (Self Forcing)", unet_name=UNET,
                 weight_dtype="default")
    clip = _text_loader(g, -420, 170)
    prompt = g.add("CLIPTextEncode", (0, 40), (420, 200), title, color=PROMPT_COLOR, text=text)
    return unet, clip, prompt


def live(info: dict) -> Graph:
    g = Graph(info, "headforcing_live")
    unet, clip, prompt = _model_and_prompt(g, "First prompt", LIVE_PROMPT)
    smp = g.add("HeadForcingARSampler", (470, 40), (420, 560), "Head Forcing AR Sampler (live)", width=832,
                height=480, length=961, seed=42, length_unit="frames", policy="head_forcing",
                model_preset="Self Forcing chunk-wise")
    vae = g.add("VAELoader", (-420, 330), (380, 60), "Load VAE (Wan 2.1)", vae_name=VAE)
    g.link(unet, smp, "model")
    g.link(clip, prompt, "clip")
    g.link(prompt, smp, "conditioning")
    g.link(clip, smp, "clip")
    _decode_save(g, smp.out("latent"), vae, 940, 40, "video/headforcing_live")
    take = g.add("PreviewAny", (940, 520), (480, 260), "Take (schedule text)")
    g.link(smp.out("take"), take, "source")
    report = g.add("PreviewAny", (470, 900), (420, 220), "Sampler Report")
    g.link(smp.out("report"), report, "source")
    g.note(LIVE_NOTE, (-420, 450), (380, 560), "Read me: Head Forcing live prompts")
    return g


def _text_loader(g: Graph, x: float, y: float) -> Node:
    return g.add("CLIPLoader", (x, y), (380, 106), "Load Text Encoder (umT5-XXL, wan)",
                 clip_name=TEXT_ENCODER, type="wan", device="default")


def _decode_save(g: Graph, latent, vae: Node, x: float, y: float, prefix: str, decode_title: str | None = "VAE Decode",
                 decode_size=(210, 46)) -> tuple[Node, Node, Node]:
    dec = g.add("VAEDecode", (x, y), decode_size, decode_title)
    g.link(latent, dec, "samples")
    g.link(vae, dec, "vae")
    video = g.add("CreateVideo", (x, y + 100), (270, 78), "Create Video (16 fps)", fps=FPS)
    g.link(dec, video, "images")
    save = g.add("SaveVideo", (x + 300, y), (480, 440), "Save Video", filename_prefix=prefix, format="auto",
                 codec="auto")
    g.link(video, save, "video")
    return dec, video, save


def long_video(info: dict) -> Graph:
    g = Graph(info, "headforcing_long_video")
    unet, clip, prompt = _model_and_prompt(g, "Prompt", LONG_VIDEO_PROMPT)
    pol = g.add("HeadForcingCachePolicy", (0, 300), (420, 300), "Head Forcing Cache Policy", preset="head_forcing",
                width=832, height=480, length=961)
    smp = g.add("HeadForcingARSampler", (470, 40), (360, 380), "Head Forcing AR Sampler", width=832, height=480,
                length=961, seed=42, length_unit="frames", policy="head_forcing",
                model_preset="Self Forcing chunk-wise")
    vae = g.add("VAELoader", (-420, 330), (380, 60), "Load VAE (Wan 2.1)", vae_name=VAE)
    g.link(unet, smp, "model")
    g.link(clip, prompt, "clip")
    g.link(prompt, smp, "conditioning")
    g.link(pol.out("kv_policy"), smp, "kv_policy")
    dec = g.add("VAEDecode", (880, 40), (210, 46), None)
    video = g.add("CreateVideo", (880, 140), (270, 78), "Create Video (16 fps)", fps=FPS)
    save = g.add("SaveVideo", (1180, 40), (480, 440), None, filename_prefix="video/headforcing_long", format="auto",
                 codec="auto")
    report = g.add("PreviewAny", (880, 270), (270, 220), "Sampler Report")
    summary = g.add("PreviewAny", (470, 900), (360, 200), "Policy Summary")
    g.link(pol.out("summary"), summary, "source")
    g.link(smp.out("latent"), dec, "samples")
    g.link(smp.out("report"), report, "source")
    g.link(vae, dec, "vae")
    g.link(dec, video, "images")
    g.link(video, save, "video")
    g.note(LONG_VIDEO_NOTE, (-420, 450), (380, 520), "Read me: Head Forcing one-minute video")
    return g


def story(info: dict) -> Graph:
    g = Graph(info, "headforcing_story")
    unet = g.add("UNETLoader", (-460, 40), (380, 82), "Load Diffusion Model (Self Forcing)", unet_name=UNET,
                 weight_dtype="default")
    clip = _text_loader(g, -460, 170)
    prompts = []
    for i, text in enumerate(STORY_PROMPTS):
        node = g.add("CLIPTextEncode", (-20, 40 + 230 * i), (420, 200), f"Prompt {i + 1}", text=text)
        g.link(clip, node, "clip")
        prompts.append(node)
    segments = []
    for i, (transition, frames) in enumerate((("cut", 0), ("blend", 6), ("recache", 3), ("blend", 3))):
        title = f"Segment {i + 1} (15 s, {transition}{'' if transition == 'cut' else f' {frames}'})"
        seg = g.add("HeadForcingPromptSegment", (440, 40 + 264 * i), (330, 230), title, length=15.0,
                    length_unit="seconds", transition=transition, transition_frames=frames, label=f"part {i + 1}")
        g.link(prompts[i], seg, "conditioning")
        if segments:
            g.link(segments[-1].out("prompt_schedule"), seg, "previous")
        segments.append(seg)
    pol = g.add("HeadForcingCachePolicy", (810, 760), (380, 300), "Head Forcing Cache Policy", preset="head_forcing",
                width=832, height=480, length=961)
    smp = g.add("HeadForcingARSampler", (810, 40), (360, 420), "Head Forcing AR Sampler (story)", width=832,
                height=480, length=961, seed=42, length_unit="frames", policy="head_forcing",
                model_preset="Self Forcing chunk-wise")
    g.link(unet, smp, "model")
    g.link(pol.out("kv_policy"), smp, "kv_policy")
    g.link(segments[-1].out("prompt_schedule"), smp, "prompt_schedule")
    vae = g.add("VAELoader", (1220, 620), (330, 60), "Load VAE (Wan 2.1)", vae_name=VAE)
    _decode_save(g, smp.out("latent"), vae, 1220, 40, "video/headforcing_story")
    report = g.add("PreviewAny", (1220, 260), (300, 220), "Sampler Report")
    g.link(smp.out("report"), report, "source")
    sched = g.add("PreviewAny", (440, 1100), (330, 200), "Schedule")
    g.link(segments[-1].out("summary"), sched, "source")
    g.note(STORY_NOTE, (-460, 330), (400, 700), "Read me: Head Forcing multi-prompt story")
    return g


def continuation(info: dict) -> Graph:
    g = Graph(info, "headforcing_continuation")
    unet = g.add("UNETLoader", (-460, 40), (380, 82), "Load Diffusion Model (Self Forcing)", unet_name=UNET,
                 weight_dtype="default")
    clip = _text_loader(g, -460, 170)
    prompts = []
    for i, text in enumerate(CONTINUATION_PROMPTS):
        node = g.add("CLIPTextEncode", (-20, 40 + 230 * i), (420, 200), f"Prompt {i + 1}", text=text)
        g.link(clip, node, "clip")
        prompts.append(node)
    pol = g.add("HeadForcingCachePolicy", (-20, 740), (420, 300), "Head Forcing Cache Policy", preset="head_forcing",
                width=832, height=480, length=249)
    smp = g.add("HeadForcingARSampler", (440, 40), (360, 420), "Head Forcing AR Sampler (first 5 s)", width=832,
                height=480, length=81, seed=42, length_unit="frames", policy="head_forcing",
                model_preset="Self Forcing chunk-wise")
    g.link(unet, smp, "model")
    g.link(prompts[0], smp, "conditioning")
    g.link(pol.out("kv_policy"), smp, "kv_policy")
    cont = []
    state = smp.out("ar_state")
    for i, (transition, frames) in enumerate((("recache", 3), ("blend", 6))):
        node = g.add("HeadForcingContinue", (840, 40 + 470 * i), (340, 280),
                     f"Continue (+5 s, {transition} {frames})", length=5.0, length_unit="seconds",
                     transition=transition, transition_frames=frames, seed=42)
        g.link(unet, node, "model")
        g.link(state, node, "ar_state")
        g.link(prompts[i + 1], node, "conditioning")
        state = node.out("ar_state")
        cont.append(node)
    save_state = g.add("HeadForcingSaveARState", (1220, 520), (330, 130), "Save AR State", filename="fox_story",
                       overwrite=True)
    g.link(state, save_state, "ar_state")
    join1 = g.add("LatentConcat", (1220, 40), (270, 100), "Join 1+2 (t)", dim="t")
    g.link(smp.out("latent"), join1, "samples1")
    g.link(cont[0].out("latent"), join1, "samples2")
    join2 = g.add("LatentConcat", (1220, 180), (270, 100), "Join +3 (t)", dim="t")
    g.link(join1, join2, "samples1")
    g.link(cont[1].out("latent"), join2, "samples2")
    vae = g.add("VAELoader", (1220, 330), (330, 60), "Load VAE (Wan 2.1)", vae_name=VAE)
    _decode_save(g, join2, vae, 1560, 40, "video/headforcing_continuation", "VAE Decode (joined latent, once)",
                 (240, 46))
    report = g.add("PreviewAny", (1560, 260), (300, 220), "Last Continue Report")
    g.link(cont[1].out("report"), report, "source")
    g.note(CONTINUATION_NOTE, (-460, 330), (400, 700), "Read me: Head Forcing continuation chain")
    return g


def _continue_encoded(g: Graph, unet: Node, clip: Node, vae: Node, encoded: Node, prompt_text: str, title: str,
                      join_title: str, prefix: str, **sampler_widgets) -> None:
    """Sample new frames after an encoded image or video, join them to it and decode once."""
    prompt = g.add("CLIPTextEncode", (370, 40), (400, 200), "Prompt", color=PROMPT_COLOR, text=prompt_text)
    g.link(clip, prompt, "clip")
    smp = g.add("HeadForcingARSampler", (820, 40), (360, 420), title, width=832, height=480, seed=42,
                length_unit="frames", **sampler_widgets)
    g.link(unet, smp, "model")
    g.link(prompt, smp, "conditioning")
    g.link(encoded, smp, "initial_latent")
    join = g.add("LatentConcat", (1230, 40), (270, 100), join_title, dim="t")
    g.link(encoded, join, "samples1")
    g.link(smp.out("latent"), join, "samples2")
    _decode_save(g, join, vae, 1230, 200, prefix, "VAE Decode (once)")
    report = g.add("PreviewAny", (1230, 420), (300, 240), "Sampler Report")
    g.link(smp.out("report"), report, "source")


def image_to_video(info: dict) -> Graph:
    g = Graph(info, "headforcing_image_to_video")
    unet = g.add("UNETLoader", (-420, 40), (380, 82), "Load Diffusion Model (Causal Forcing frame-wise)",
                 unet_name=CAUSAL_FRAMEWISE, weight_dtype="default")
    clip = _text_loader(g, -420, 170)
    vae = g.add("VAELoader", (-420, 330), (380, 60), "Load VAE (Wan 2.1)", vae_name=VAE)
    image = g.add("LoadImage", (0, 40), (320, 360), "Start image", image="example.png")
    # stretched to 832x480, no crop: Causal Forcing's inference.py does transforms.Resize((480, 832))
    scale = g.add("ImageScale", (0, 460), (320, 130), "Resize to 832x480 (stretch, as Causal Forcing)",
                  upscale_method="bilinear", width=832, height=480, crop="disabled")
    g.link(image.out(0), scale, "image")
    enc = g.add("VAEEncode", (0, 650), (210, 46), "VAE Encode (1 latent frame)")
    g.link(scale, enc, "pixels")
    g.link(vae, enc, "vae")
    _continue_encoded(g, unet, clip, vae, enc, I2V_PROMPT, "Head Forcing AR Sampler (image-to-video)",
                      "Image + new frames (t)", "video/headforcing_image_to_video", length=81, frames_per_block=1,
                      policy="self_forcing_window", model_preset="Causal Forcing frame-wise 4-step")
    g.note(I2V_NOTE, (-420, 450), (380, 640), "Read me: Head Forcing image-to-video")
    return g


def extend_video(info: dict) -> Graph:
    g = Graph(info, "headforcing_extend_video")
    unet = g.add("UNETLoader", (-420, 40), (380, 82), "Load Diffusion Model (Self Forcing)", unet_name=UNET,
                 weight_dtype="default")
    clip = _text_loader(g, -420, 170)
    vae = g.add("VAELoader", (-420, 330), (380, 60), "Load VAE (Wan 2.1)", vae_name=VAE)
    load = g.add("LoadVideo", (0, 40), (320, 360), "Video to extend", file="input_video.mp4")
    parts = g.add("GetVideoComponents", (0, 460), (260, 70), "Get Video Components")
    g.link(load, parts, "video")
    trim = g.add("ImageFromBatch", (0, 590), (300, 82), "First 81 frames (whole chunks)", batch_index=0, length=81)
    g.link(parts.out("images"), trim, "image")
    scale = g.add("ImageScale", (0, 730), (320, 130), "Resize to 832x480 (crop center)", upscale_method="lanczos",
                  width=832, height=480, crop="center")
    g.link(trim, scale, "image")
    enc = g.add("VAEEncode", (0, 920), (240, 46), "VAE Encode (21 latent frames)")
    g.link(scale, enc, "pixels")
    g.link(vae, enc, "vae")
    _continue_encoded(g, unet, clip, vae, enc, EXTEND_PROMPT, "Head Forcing AR Sampler (extension)",
                      "Video + new frames (t)", "video/headforcing_extended", length=161, policy="self_forcing_window",
                      model_preset="Self Forcing chunk-wise")
    g.note(EXTEND_NOTE, (-420, 450), (380, 700), "Read me: Head Forcing video extension")
    return g


def longlive_story(info: dict) -> Graph:
    g = Graph(info, "headforcing_longlive_story")
    unet = g.add("UNETLoader", (-460, 40), (380, 82), "Load Diffusion Model (LongLive base)",
                 unet_name=LONGLIVE_BASE, weight_dtype="default")
    lora = g.add("LoraLoaderModelOnly", (-460, 170), (380, 82), "LongLive LoRA (strength 1.0)",
                 lora_name=LONGLIVE_LORA, strength_model=1.0)
    g.link(unet, lora, "model")
    clip = _text_loader(g, -460, 300)
    prompts, segments = [], []
    start = 0
    for i, (text, frames) in enumerate(zip(LONGLIVE_PROMPTS, LONGLIVE_SEGMENTS)):
        node = g.add("CLIPTextEncode", (-20, 40 + 264 * i), (420, 200), f"Prompt {i + 1}", text=text)
        g.link(clip, node, "clip")
        prompts.append(node)
        transition = "cut" if i == 0 else "recache"
        seg = g.add("HeadForcingPromptSegment", (440, 40 + 264 * i), (330, 230),
                    f"Segment {i + 1} (frames {start}-{start + frames - 1}{'' if i == 0 else ', recache 12'})",
                    length=float(frames), length_unit="latent_frames", transition=transition,
                    transition_frames=0 if i == 0 else 12, recache_mode="policy default", label=f"part {i + 1}")
        g.link(node, seg, "conditioning")
        if segments:
            g.link(segments[-1].out("prompt_schedule"), seg, "previous")
        segments.append(seg)
        start += frames
    total = 4 * start - 3
    pol = g.add("HeadForcingCachePolicy", (810, 760), (380, 300), "Cache Policy (LongLive window)", preset="longlive",
                width=832, height=480, length=total)
    smp = g.add("HeadForcingARSampler", (810, 40), (360, 420), "Head Forcing AR Sampler (LongLive)", width=832,
                height=480, length=total, seed=1, length_unit="frames", policy="longlive", model_preset="LongLive")
    g.link(lora, smp, "model")
    g.link(pol.out("kv_policy"), smp, "kv_policy")
    g.link(segments[-1].out("prompt_schedule"), smp, "prompt_schedule")
    vae = g.add("VAELoader", (1220, 620), (330, 60), "Load VAE (Wan 2.1)", vae_name=VAE)
    _decode_save(g, smp.out("latent"), vae, 1220, 40, "video/headforcing_longlive_story")
    report = g.add("PreviewAny", (1220, 260), (300, 220), "Sampler Report")
    g.link(smp.out("report"), report, "source")
    sched = g.add("PreviewAny", (440, 40 + 264 * len(segments)), (330, 200), "Schedule")
    g.link(segments[-1].out("summary"), sched, "source")
    g.note(LONGLIVE_NOTE, (-460, 460), (400, 760), "Read me: Head Forcing LongLive story")
    return g


KREA_UNET = "krea-realtime-video-14b.safetensors"
KREA_PROMPTS = [
    "A woman in a yellow raincoat walks her bicycle along a rainy city street at night, neon reflections on the wet "
    "asphalt, cinematic tracking shot, highly detailed, natural motion.",
    "The woman stops under a red awning and shakes the rain off her umbrella, neon signs flickering behind her, "
    "cinematic close-up, highly detailed.",
    "The rain stops; the woman rides her bicycle across a bridge over a dark river, city lights shimmering on the "
    "water, wide cinematic shot, natural motion.",
    "Dawn breaks over the city; the woman rides along an empty avenue lined with trees, soft morning light, "
    "cinematic tracking shot, highly detailed.",
]

KREA_NOTE = """Head Forcing: Krea Realtime 14B with its own loop (a prompt story)

Model: diffusion_models/krea-realtime-video-14b.safetensors from Hugging Face krea/krea-realtime-video (Krea Realtime 14B: Wan 2.1 14B distilled with Self Forcing; CC BY-NC-SA 4.0). Load Diffusion Model reads Krea's file as it is ('model.' + Wan 2.1 names). weight_dtype fp8_e4m3fn keeps the 14B weights at one byte each (about 13.3 GiB instead of 26.6); 'default' loads them in bf16. Text encoder text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan), vae/wan_2.1_vae.safetensors.

model_preset 'Krea Realtime 14B' runs Krea's loop, as its server (release_server.py GenerationSession) does: before every block of 3 latent frames the KV cache is emptied and rebuilt from 3 context frames (context_frames) at RoPE positions 0-2; the block is denoised at positions 3-5 with 5 steps (1000,750,500,250,0 warped through the shift-5 table) and no clean pass. The context is the first latent and the last two while the video is short; later the oldest of the last 9 decoded frames is decoded and VAE-encoded again as its first latent - that is why the VAE is connected to the sampler. Without the vae input the sampler puts the generated latent in its place (an approximation, said in the report). Prompt changes (the segments) are interpolated over 4 blocks (interpolation_blocks), as Krea's server does; the segments' own transitions do not apply. A cache policy does not apply either (the cache is rebuilt every block): this loop holds 6 frames of K/V whatever the length.

The other loop: model_preset 'Krea Realtime 14B, Self Forcing loop' runs the same checkpoint with Self Forcing's loop (a clean pass per chunk, the cache kept) and a Cache Policy (head_forcing, pyramid_forcing, ...): bounded head-aware caches on a 14B model. Set the Cache Policy's model_shape to Wan 2.1 14B to see its memory.

Memory at 832x480 (python -m headforcing_core.bench --estimate --model-shape 14b --seconds 60 --loop krea; README): weights 13.3 GiB in fp8 + the VAE 0.24 GiB + the run about 10.4 GiB (the rebuilt cache 7.1 GiB, the VAE's streaming state 1.8 GiB), about 24 GiB in all: a 32 GB card, not a 24 GB one (README and docs/krea.md have the table). Length: 4 segments of 5 s = 84 latent frames (333 frames, about 21 s); the sampler's own length is not used with a prompt_schedule. No CFG, no negative prompt."""


def krea_realtime(info: dict) -> Graph:
    g = Graph(info, "headforcing_krea_realtime")
    unet = g.add("UNETLoader", (-460, 40), (380, 82), "Load Diffusion Model (Krea Realtime 14B, fp8)",
                 unet_name=KREA_UNET, weight_dtype="fp8_e4m3fn")
    clip = _text_loader(g, -460, 170)
    vae = g.add("VAELoader", (-460, 330), (380, 60), "Load VAE (Wan 2.1)", vae_name=VAE)
    segments = []
    for i, text in enumerate(KREA_PROMPTS):
        node = g.add("CLIPTextEncode", (-20, 40 + 230 * i), (420, 200), f"Prompt {i + 1}", text=text)
        g.link(clip, node, "clip")
        seg = g.add("HeadForcingPromptSegment", (440, 40 + 230 * i), (330, 200), f"Segment {i + 1} (5 s)",
                    length=5.0, length_unit="seconds", transition="cut", transition_frames=0, label=f"part {i + 1}")
        g.link(node, seg, "conditioning")
        if segments:
            g.link(segments[-1].out("prompt_schedule"), seg, "previous")
        segments.append(seg)
    smp = g.add("HeadForcingARSampler", (810, 40), (380, 520), "Head Forcing AR Sampler (Krea's loop)", width=832,
                height=480, length=333, seed=42, length_unit="frames", model_preset="Krea Realtime 14B",
                frames_per_block=3, steps="1000,750,500,250,0", shift=5.0, context_frames=3, interpolation_blocks=4,
                context_first_latent="auto")
    g.link(unet, smp, "model")
    g.link(segments[-1].out("prompt_schedule"), smp, "prompt_schedule")
    g.link(vae, smp, "vae")
    _decode_save(g, smp.out("latent"), vae, 1240, 40, "video/headforcing_krea_realtime")
    report = g.add("PreviewAny", (1240, 260), (300, 260), "Sampler Report")
    g.link(smp.out("report"), report, "source")
    g.note(KREA_NOTE, (-460, 460), (400, 760), "Read me: Krea Realtime 14B")
    return g


# file name -> (builder, whether an API twin is written to workflows/api/)
BUILDERS = {
    "headforcing_long_video.json": (long_video, True),
    "headforcing_policy_comparison.json": (policy_comparison, False),
    "headforcing_profile_then_generate.json": (profile_then_generate, False),
    "headforcing_story.json": (story, True),
    "headforcing_continuation.json": (continuation, True),
    "headforcing_image_to_video.json": (image_to_video, True),
    "headforcing_extend_video.json": (extend_video, True),
    "headforcing_longlive_story.json": (longlive_story, True),
    "headforcing_krea_realtime.json": (krea_realtime, True),
    "headforcing_live.json": (live, True),
}


def build_workflows(info: dict) -> dict[str, dict]:
    """``{path under workflows/: workflow}``: every UI workflow, and ``api/<name>`` for its API twin."""
    out = {}
    for name, (fn, api) in BUILDERS.items():
        graph = fn(info)
        out[name] = graph.ui_json()
        if api:
            out[f"api/{name}"] = graph.api_json()
    return out

def dumps(workflow: dict, name: str = "") -> str:
    """UI files with indent 1, API twins (``api/...``) with indent 2, as ComfyUI's own exports."""
    return json.dumps(workflow, indent=2 if name.startswith("api/") else 1, ensure_ascii=False) + "\n"


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
        text = dumps(wf, name)
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
