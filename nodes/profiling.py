"""Head profiling nodes: profile, classify, save and load HEAD_PROFILEs (see docs/profiling.md).

* ``HeadForcingProfileHeads`` — run a calibration rollout of the MODEL on 1-4 prompts and
  measure every attention head; outputs the profile, a heat map and a text summary.
* ``HeadForcingClassifyHeads`` — re-label a profile in either taxonomy with other thresholds
  (no new rollout).
* ``HeadForcingSaveHeadProfile`` / ``HeadForcingLoadHeadProfile`` — profile files in ComfyUI's
  ``models/headforcing`` folder (registered here; extra_model_paths.yaml may add more), plus the
  shipped read-only presets.

The heat map (layers × heads, coloured by type, legend with counts) is drawn here with PIL
(ComfyUI ships it); the core never needs PIL.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

import folder_paths
from comfy_api.latest import io, ui

from headforcing_core.errors import HeadForcingError, ProfileError
from headforcing_core.policies import TRAINING_WINDOW, HeadLabels
from headforcing_core.profiling import (CLASSIFIED_TAXONOMIES, FOLDER_NAME, HeadForcingThresholds, HeadProfile,
                                        PyramidThresholds, classify_profile, is_preset, preset_names,
                                        list_profiles, profile_heads, profile_path, resolve_profile, save_profile)

from . import comfy_bridge as bridge
from .messages import head_map_ui
from .types import HEAD_PROFILE

log = logging.getLogger("headforcing")

# models/headforcing (under --base-directory when given), first in the list so saves land there
folder_paths.add_model_folder_path(FOLDER_NAME, os.path.join(folder_paths.models_dir, FOLDER_NAME), is_default=True)

CATEGORY = "sampling/head_forcing/profiling"
TAXONOMY_TOOLTIP = ("head_forcing: local / anchor / memory (Head Forcing recipe: top 25 % by sink mass → anchor, of "
                    "the rest top 20 % by current-chunk mass → local, rest → memory). pyramid_forcing: anchor / wave "
                    "/ veil (periodic logits → wave, mass on sink + adjacent frames → veil, rest → anchor).")

# ---------------------------------------------------------------------------------------------
# heat map

TYPE_COLORS = {
    "local": (232, 126, 34),     # orange
    "anchor": (52, 101, 164),    # blue
    "memory": (46, 160, 90),     # green
    "wave": (142, 68, 173),      # purple
    "veil": (22, 160, 160),      # teal
    "all": (140, 140, 140),
}
TYPE_MEANING = {
    "local": "detail, recent frames",
    "anchor": "sink frames" ,
    "memory": "long-range memory",
    "wave": "periodic in time",
    "veil": "sink + adjacent frames",
    "all": "",
}
PYRAMID_MEANING = {"anchor": "broad long-range context"}
TITLES = {"head_forcing": "Head Forcing heads", "pyramid_forcing": "Pyramid Forcing heads", "uniform": "heads"}


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ascii(text: str) -> str:
    """PIL's default font lacks some symbols."""
    return text.replace("×", "x").replace("→", "->").replace("—", "-")


def render_heat_map(labels: HeadLabels, subtitle: str = "") -> torch.Tensor:
    """IMAGE ``[1, H, W, 3]`` in [0, 1]: rows = layers, columns = heads, one colour per type,
    a legend with per-type counts and shares."""
    from PIL import Image, ImageDraw

    layers, heads = labels.shape
    cell = int(np.clip(560 // max(layers, heads), 8, 40))
    font, small = _font(15), _font(max(9, min(13, cell - 2)))
    left, top = 44, 56
    grid_w, grid_h = heads * cell, layers * cell
    legend_w = 300
    counts = labels.counts()
    total = layers * heads
    width = left + grid_w + 24 + legend_w
    height = max(top + grid_h + 30, top + 28 * (len(counts) + 2))
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.text((10, 8), TITLES.get(labels.taxonomy, labels.taxonomy), fill=(20, 20, 20), font=_font(18))
    if subtitle:
        d.text((10, 32), _ascii(subtitle)[:90], fill=(90, 90, 90), font=small)
    rgb = np.zeros((layers, heads, 3), dtype=np.uint8)
    for li, row in enumerate(labels.types):
        for hi, t in enumerate(row):
            rgb[li, hi] = TYPE_COLORS.get(t, (0, 0, 0))
    block = np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))
    if cell >= 6:  # thin white grid lines
        block[::cell, :, :] = 250
        block[:, ::cell, :] = 250
    img.paste(Image.fromarray(block), (left, top))
    d.rectangle([left - 1, top - 1, left + grid_w, top + grid_h], outline=(60, 60, 60))
    step_l = 1 if layers <= 12 else 5
    for li in range(0, layers, step_l):
        d.text((6, top + li * cell + max(0, (cell - 12) // 2)), f"L{li}", fill=(60, 60, 60), font=small)
    step_h = 1 if cell >= 18 else 2
    for hi in range(0, heads, step_h):
        d.text((left + hi * cell + 2, top + grid_h + 4), f"{hi}", fill=(60, 60, 60), font=small)
    d.text((left + grid_w - 40, top + grid_h + 16), "head ->", fill=(90, 90, 90), font=small)
    x0 = left + grid_w + 24
    y = top
    d.text((x0, y), f"{layers} layers x {heads} heads = {total}", fill=(20, 20, 20), font=font)
    y += 28
    for t, n in counts.items():
        d.rectangle([x0, y, x0 + 18, y + 18], fill=TYPE_COLORS.get(t, (0, 0, 0)), outline=(60, 60, 60))
        meaning = PYRAMID_MEANING.get(t) if labels.taxonomy == "pyramid_forcing" and t in PYRAMID_MEANING \
            else TYPE_MEANING.get(t, "")
        d.text((x0 + 26, y), f"{t}: {n} ({100.0 * n / total:.0f} %)", fill=(20, 20, 20), font=font)
        if meaning:
            d.text((x0 + 26, y + 16), meaning, fill=(100, 100, 100), font=small)
        y += 38
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def _outputs(cls, profile: HeadProfile, text: str) -> io.NodeOutput:
    image = render_heat_map(profile.labels, profile.name or profile.source)
    # the node shows the interactive head map the web extension draws (nodes/messages.py); the
    # static heat map is the IMAGE output, for PreviewImage / SaveImage
    return io.NodeOutput(profile, image, text, ui=head_map_ui(profile))


# ---------------------------------------------------------------------------------------------
# helpers


def _prompts(*conditionings) -> list[torch.Tensor]:
    """Every entry of every connected CONDITIONING is one calibration prompt."""
    out = []
    for cond in conditionings:
        if cond is None:
            continue
        if not isinstance(cond, (list, tuple)) or not cond:
            raise HeadForcingError("a conditioning input is empty; connect CLIPTextEncode (umT5, CLIPLoader type 'wan')")
        for entry in cond:
            out.append(bridge.conditioning_tensor([entry]))
    if not out:
        raise HeadForcingError("connect at least one conditioning (a calibration prompt)")
    return out


def profile_folders() -> list[str]:
    return folder_paths.get_folder_paths(FOLDER_NAME)


def profile_file_names() -> list[str]:
    """Profile files Load Head Profile offers: the names in the profile folder(s) the name policy accepts."""
    names: set[str] = set()
    for folder in profile_folders():
        names.update(list_profiles(folder))
    return sorted(names)


def _thresholds(taxonomy: str, **values) -> dict:
    """Pick the widget values that belong to ``taxonomy``'s classifier."""
    from dataclasses import fields
    cls = HeadForcingThresholds if taxonomy == "head_forcing" else PyramidThresholds
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}


def _threshold_inputs() -> list:
    hf, py = HeadForcingThresholds(), PyramidThresholds()
    return [
        io.Float.Input("anchor_fraction", default=hf.anchor_fraction, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="head_forcing: share of all heads, ranked by attention mass on the sink frames, that "
                               "become anchor heads (25 % in the Head Forcing recipe)."),
        io.Float.Input("local_fraction", default=hf.local_fraction, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="head_forcing: share of the remaining heads, ranked by attention mass on the current "
                               "chunk, that become local heads (20 %); the rest are memory heads."),
        io.Float.Input("sign_threshold", default=py.sign_threshold, min=0.51, max=1.0, step=0.01, optional=True,
                       tooltip="pyramid_forcing: a frame age counts as decided positive (negative) when at least "
                               "this share of its centred logits is positive (negative); 0.8 in Pyramid Forcing."),
        io.Float.Input("period_threshold", default=py.period_threshold, min=2.0, max=21.0, step=0.1, optional=True,
                       tooltip="pyramid_forcing: longest dominant period (frames) of the logit-vs-age curve that "
                               "still counts as a wave head; 6.4 in Pyramid Forcing."),
        io.Float.Input("min_period_strength", default=py.min_period_strength, min=0.0, max=1.0, step=0.01,
                       optional=True,
                       tooltip="pyramid_forcing: share of the (detrended) logit-vs-age variance one sinusoid must "
                               "explain for a wave head."),
        io.Float.Input("veil_middle_ratio", default=py.veil_middle_ratio, min=0.0, max=10.0, step=0.01, optional=True,
                       tooltip="pyramid_forcing: a head is a veil head when its attention mass on middle frames is "
                               "at most this multiple of what uniform attention would give them."),
        io.Int.Input("sink_frames", default=py.sink_frames, min=0, max=20, optional=True,
                     tooltip="First latent frames counted as sink frames by the statistics."),
        io.Int.Input("recent_frames", default=py.recent_frames, min=0, max=20, optional=True,
                     tooltip="History frames right before the chunk counted as recent (adjacent) frames."),
    ]


# ---------------------------------------------------------------------------------------------
# nodes


class HeadForcingProfileHeads(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingProfileHeads",
            display_name="Head Forcing Profile Heads",
            category=CATEGORY,
            description=(
                "Measures every attention head of a Self Forcing / Causal Forcing model: it generates a short "
                "calibration video per prompt (full cache, up to 21 latent frames) and records, from a sample of "
                "query tokens, where each head looks (sink / middle / recent frames / current chunk, by frame "
                "age, logit sign rates, periodicity). Then labels every head. Feed the HEAD_PROFILE to Head "
                "Forcing Cache Policy, or save it."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to profile (from 'Load Diffusion Model')."),
                io.Conditioning.Input("conditioning", tooltip="A calibration prompt (CLIPTextEncode, umT5). Use "
                                                              "varied prompts: their statistics are pooled."),
                io.Int.Input("latent_frames", default=TRAINING_WINDOW, min=2, max=TRAINING_WINDOW,
                             tooltip="Latent frames of each calibration video (21 = 81 video frames, the window "
                                     "the model was trained on). At least two chunks."),
                io.Int.Input("width", default=832, min=16, max=16384, step=16,
                             tooltip="Calibration video width in pixels (multiple of 16)."),
                io.Int.Input("height", default=480, min=16, max=16384, step=16,
                             tooltip="Calibration video height in pixels (multiple of 16)."),
                io.Int.Input("seed", default=0, min=0, max=bridge.MAX_SEED, control_after_generate=False,
                             tooltip="Seed of the calibration noise and of the sampled query tokens (fixed, so "
                                     "re-running the graph does not re-profile)."),
                io.Int.Input("query_samples", default=64, min=1, max=4096,
                             tooltip="Query tokens sampled per chunk (split over its frames) whose attention is "
                                     "measured. More: steadier statistics, a little slower."),
                io.Combo.Input("taxonomy", options=list(CLASSIFIED_TAXONOMIES), default="head_forcing",
                               tooltip="Primary labels of the profile (both are computed). " + TAXONOMY_TOOLTIP),
                io.Conditioning.Input("conditioning_2", optional=True, tooltip="Another calibration prompt."),
                io.Conditioning.Input("conditioning_3", optional=True, tooltip="Another calibration prompt."),
                io.Conditioning.Input("conditioning_4", optional=True, tooltip="Another calibration prompt."),
                io.Int.Input("frames_per_block", default=3, min=1, max=21, optional=True,
                             tooltip="Latent frames per chunk: 3 for chunk-wise checkpoints, 1 for frame-wise."),
                io.String.Input("steps", default=bridge.DEFAULT_STEPS, optional=True,
                                tooltip="Nominal denoising timesteps (as for the AR sampler)."),
                io.Float.Input("shift", default=bridge.DEFAULT_SHIFT, min=0.01, max=100.0, step=0.01, optional=True,
                               tooltip="Flow-matching shift (5.0 for Self Forcing / Causal Forcing)."),
            ],
            outputs=[
                HEAD_PROFILE.Output(display_name="head_profile",
                                    tooltip="Statistics and labels per layer and head."),
                io.Image.Output(display_name="heat_map", tooltip="Layers × heads coloured by head type."),
                io.String.Output(display_name="summary", tooltip="Counts per type and calibration settings."),
            ],
        )

    @classmethod
    def execute(cls, model, conditioning, latent_frames, width, height, seed, query_samples, taxonomy,
                conditioning_2=None, conditioning_3=None, conditioning_4=None, frames_per_block=3,
                steps=bridge.DEFAULT_STEPS, shift=bridge.DEFAULT_SHIFT) -> io.NodeOutput:
        from headforcing_core.profiling.profile import check_profile_settings, estimate_profile
        from headforcing_core.schedule import FlowMatchSchedule

        bridge.check_video_size(width, height)
        step_values = bridge.parse_steps(steps)
        FlowMatchSchedule(step_values, float(shift))  # a bad list or shift fails here, before any work
        check_profile_settings(latent_frames, frames_per_block, query_samples)
        prompts = _prompts(conditioning, conditioning_2, conditioning_3, conditioning_4)
        module, spec = bridge.wan_backbone(model)
        lh, lw = height // bridge.SPACE_COMPRESSION, width // bridge.SPACE_COMPRESSION
        dtype = bridge.compute_dtype(model)
        bridge.preflight(
            model, spec, lambda t, h, w: estimate_profile(spec, frames=t, latent_height=h, latent_width=w,
                                                          frames_per_block=frames_per_block,
                                                          query_samples=query_samples, dtype=dtype),
            latent_frames=latent_frames, latent_height=lh, latent_width=lw, min_frames=2 * frames_per_block,
            describe_length=lambda t: f"latent_frames {t}", describe_size=bridge.describe_pixels,
            what="the calibration video")
        chunks = -(-latent_frames // frames_per_block)
        hooks = bridge.ComfyHooks(model, len(prompts) * chunks * (len(step_values) + 1))
        profile = bridge.run_interruptible(lambda: profile_heads(
            module, [p.to(model.load_device) for p in prompts], frames=latent_frames, latent_height=lh,
            latent_width=lw, seed=seed, query_samples=query_samples, frames_per_block=frames_per_block,
            steps=step_values, shift=shift, hooks=hooks, dtype=dtype, taxonomy=taxonomy,
            source=f"profiled in ComfyUI: {len(prompts)} prompt(s), {latent_frames} latent frames at "
                   f"{width}x{height}, seed {seed}"), hooks)
        return _outputs(cls, profile, profile.describe())


class HeadForcingClassifyHeads(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingClassifyHeads",
            display_name="Head Forcing Classify Heads",
            category=CATEGORY,
            description=("Re-labels a head profile's heads in a taxonomy with your thresholds, from its stored "
                         "statistics (no new calibration run). Thresholds of the other taxonomy are ignored."),
            inputs=[
                HEAD_PROFILE.Input("head_profile", tooltip="A profile with statistics (not a labels-only preset)."),
                io.Combo.Input("taxonomy", options=list(CLASSIFIED_TAXONOMIES), default="head_forcing",
                               tooltip=TAXONOMY_TOOLTIP),
                *_threshold_inputs(),
            ],
            outputs=[
                HEAD_PROFILE.Output(display_name="head_profile", tooltip="The profile with the new labels (primary)."),
                io.Image.Output(display_name="heat_map", tooltip="Layers × heads coloured by head type."),
                io.String.Output(display_name="summary", tooltip="Counts per type and thresholds."),
            ],
        )

    @classmethod
    def execute(cls, head_profile, taxonomy, **thresholds) -> io.NodeOutput:
        if not isinstance(head_profile, HeadProfile):
            raise ProfileError(f"head_profile must come from a Head Forcing profile node, got {type(head_profile).__name__}")
        profile = classify_profile(head_profile, taxonomy, _thresholds(taxonomy, **thresholds))
        used = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in profile.thresholds[taxonomy].items())
        return _outputs(cls, profile, profile.describe() + f"\n{taxonomy} thresholds: {used}")


class HeadForcingSaveHeadProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingSaveHeadProfile",
            display_name="Head Forcing Save Head Profile",
            category=CATEGORY,
            description=("Saves a head profile (safetensors + JSON metadata) into models/headforcing, where Load "
                         "Head Profile finds it."),
            inputs=[
                HEAD_PROFILE.Input("head_profile", tooltip="The profile to save (from Profile Heads, Classify "
                                                           "Heads or Load Head Profile)."),
                io.String.Input("filename", default="my_model_profile",
                                tooltip="File name inside models/headforcing: letters, digits, spaces and - _ . , + = ( ) "
                                        "[ ] @ #, up to 100 characters, no folders; '.safetensors' is added."),
                io.Boolean.Input("overwrite", default=True, optional=True,
                                 tooltip="Replace an existing file of that name (off: refuse)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the profile was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, head_profile, filename, overwrite=True) -> io.NodeOutput:
        if not isinstance(head_profile, HeadProfile):
            raise ProfileError(f"head_profile must come from a Head Forcing profile node, got {type(head_profile).__name__}")
        folder = profile_folders()[0]
        path = profile_path(folder, filename)  # the name policy also rules out 'preset: …' (no ':')
        if path.exists() and not overwrite:
            raise ProfileError(f"a head profile {path.name!r} already exists in {folder}; turn on overwrite or pick "
                               "another filename")
        save_profile(head_profile, path)
        rel = path.relative_to(os.path.realpath(folder)).as_posix()
        text = f"saved head profile {rel} ({path})\n" + head_profile.describe()
        log.info("headforcing: saved head profile to %s", path)
        return io.NodeOutput(str(path), ui=ui.PreviewText(text))


class HeadForcingLoadHeadProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        options = preset_names() + profile_file_names()
        return io.Schema(
            node_id="HeadForcingLoadHeadProfile",
            display_name="Head Forcing Load Head Profile",
            category=CATEGORY,
            description=("Loads a head profile from models/headforcing, or a shipped preset (read-only, labels "
                         "only): Pyramid Forcing's published labels of Self Forcing (Wan2.1-T2V-1.3B, Apache-2.0)."),
            inputs=[
                io.Combo.Input("profile_name", options=options, default=options[0],
                               tooltip="A file in models/headforcing, or a 'preset: …' shipped with the pack."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: check that the profile was made for this model's shape."),
            ],
            outputs=[
                HEAD_PROFILE.Output(display_name="head_profile",
                                    tooltip="For Head Forcing Cache Policy's head_profile input, or Classify Heads."),
                io.Image.Output(display_name="heat_map", tooltip="Layers × heads coloured by head type."),
                io.String.Output(display_name="summary", tooltip="Shape, source, attribution and counts."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, profile_name, model=None):
        if is_preset(profile_name):
            return profile_name
        for folder in profile_folders():
            try:
                path = profile_path(folder, profile_name)
            except ProfileError:
                continue
            if path.is_file():
                st = path.stat()
                return f"{profile_name}:{st.st_mtime_ns}:{st.st_size}"
        return profile_name

    @classmethod
    def execute(cls, profile_name, model=None) -> io.NodeOutput:
        expect = bridge.wan_backbone(model)[1] if model is not None else None
        profile = resolve_profile(profile_name, profile_folders(), expect=expect)
        return _outputs(cls, profile, profile.describe())


NODES = [HeadForcingProfileHeads, HeadForcingClassifyHeads, HeadForcingSaveHeadProfile, HeadForcingLoadHeadProfile]


# ---------------------------------------------------------------------------------------------
# used by HeadForcingCachePolicy (nodes/policy.py)

TYPED_PRESETS = ("pyramid_forcing", "head_forcing")


def profile_labels(head_profile, preset: str) -> HeadLabels | None:
    """The labels a HEAD_PROFILE gives ``preset``: its labels of the preset's taxonomy
    (classified with default thresholds if the profile has statistics but no such labels);
    None for presets that do not type heads or when no profile is connected."""
    if head_profile is None or preset not in TYPED_PRESETS:
        return None
    if not isinstance(head_profile, HeadProfile):
        raise ProfileError(f"head_profile must come from a Head Forcing profile node, got {type(head_profile).__name__}")
    return head_profile.labels_for(preset)


def profile_spec(head_profile: HeadProfile):
    """A BackboneSpec of the profile's model shape (for the policy node's memory figure)."""
    from headforcing_core.backbone import BackboneSpec
    m = head_profile.model
    return BackboneSpec(m["dim"], m["num_heads"], m["num_layers"], tuple(m["patch_size"]), m["in_dim"], m["out_dim"],
                        m["text_dim"], 256, 512)


def profile_note(head_profile, preset: str) -> str:
    if head_profile is None:
        return ""
    if preset not in TYPED_PRESETS:
        return f"\nhead profile {head_profile.display_name}: ignored by the {preset} preset (it treats all heads alike)"
    lab = head_profile.labels_for(preset)
    counts = ", ".join(f"{t} {n}" for t, n in lab.counts().items())
    return f"\nhead labels from profile {head_profile.display_name} ({lab.source}): {counts}"
