"""Head profiling nodes: profile, classify, save and load HEAD_PROFILEs (see docs/profiling.md).

* ``HeadForcingProfileHeads`` — run a calibration rollout of the MODEL on 1-4 prompts and
  measure every attention head; outputs the profile, a heat map and a text summary.
* ``HeadForcingClassifyHeads`` — re-label a profile in either taxonomy with other thresholds
  (no new rollout).
* ``HeadForcingSaveHeadProfile`` / ``HeadForcingLoadHeadProfile`` — profile files in ComfyUI's
  ``models/headforcing`` folder (``nodes/files.py``), plus the shipped read-only presets.

Every node outputs the heat map (``nodes/heat_map.py``) and the interactive head map for the
browser (``nodes/messages.py``).
"""
from __future__ import annotations

from dataclasses import fields

import torch
from comfy_api.latest import io, ui

from headforcing_core.errors import HeadForcingError, ProfileError
from headforcing_core.geometry import SPACE_COMPRESSION, model_calls
from headforcing_core.policies import TRAINING_WINDOW
from headforcing_core.profiling import (CLASSIFIED_TAXONOMIES, HeadForcingThresholds, HeadProfile, PyramidThresholds,
                                        classify_profile, is_preset, preset_names, profile_heads, profile_path,
                                        resolve_profile, save_profile)
from headforcing_core.profiling.classify import THRESHOLD_TYPES
from headforcing_core.profiling.profile import check_profile_settings, estimate_profile

from .comfy_bridge import (DEFAULT_SHIFT, DEFAULT_STEPS, MAX_SEED, check_profile, check_video_size, compute_dtype,
                           conditioning_tensor, describe_pixels, schedule_steps, wan_backbone)
from .files import file_fingerprint, profile_file_names, profile_folders, save_file_inputs, save_named_file
from .heat_map import render_heat_map
from .messages import head_map_ui
from .run import ModelRun
from .types import HEAD_PROFILE

CATEGORY = "sampling/head_forcing/profiling"
TAXONOMY_TOOLTIP = ("head_forcing: local / anchor / memory (Head Forcing recipe: top 25 % by sink mass → anchor, of "
                    "the rest top 20 % by current-chunk mass → local, rest → memory). pyramid_forcing: anchor / wave "
                    "/ veil (periodic logits → wave, mass on sink + adjacent frames → veil, rest → anchor).")


def _profile_outputs(profile_tooltip: str, summary_tooltip: str) -> list:
    """The outputs of every node that makes a profile: the HEAD_PROFILE, its heat map, a summary."""
    return [
        HEAD_PROFILE.Output(display_name="head_profile", tooltip=profile_tooltip),
        io.Image.Output(display_name="heat_map", tooltip="Layers × heads coloured by head type."),
        io.String.Output(display_name="summary", tooltip=summary_tooltip),
    ]


def _outputs(profile: HeadProfile, text: str) -> io.NodeOutput:
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
            out.append(conditioning_tensor([entry]))
    if not out:
        raise HeadForcingError("connect at least one conditioning (a calibration prompt)")
    return out


def _thresholds(taxonomy: str, **values) -> dict:
    """Pick the widget values that belong to ``taxonomy``'s classifier."""
    if taxonomy not in THRESHOLD_TYPES:
        return {}  # classify_profile names the taxonomies
    names = {f.name for f in fields(THRESHOLD_TYPES[taxonomy])}
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
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
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
                io.String.Input("steps", default=DEFAULT_STEPS, optional=True,
                                tooltip="Nominal denoising timesteps (as for the AR sampler)."),
                io.Float.Input("shift", default=DEFAULT_SHIFT, min=0.01, max=100.0, step=0.01, optional=True,
                               tooltip="Flow-matching shift (5.0 for Self Forcing / Causal Forcing)."),
            ],
            outputs=_profile_outputs("Statistics and labels per layer and head.",
                                     "Counts per type and calibration settings."),
        )

    @classmethod
    def execute(cls, model, conditioning, latent_frames, width, height, seed, query_samples, taxonomy,
                conditioning_2=None, conditioning_3=None, conditioning_4=None, frames_per_block=3,
                steps=DEFAULT_STEPS, shift=DEFAULT_SHIFT) -> io.NodeOutput:
        check_video_size(width, height)
        step_values = schedule_steps(steps, shift)  # a bad list or shift fails here, before any work
        check_profile_settings(latent_frames, frames_per_block, query_samples)
        prompts = _prompts(conditioning, conditioning_2, conditioning_3, conditioning_4)
        module, spec = wan_backbone(model)
        lh, lw = height // SPACE_COMPRESSION, width // SPACE_COMPRESSION
        dtype = compute_dtype(model)
        run = ModelRun.load(
            model, spec, lambda t, h, w: estimate_profile(spec, frames=t, latent_height=h, latent_width=w,
                                                          frames_per_block=frames_per_block,
                                                          query_samples=query_samples, dtype=dtype),
            dtype=dtype, latent_frames=latent_frames, latent_height=lh, latent_width=lw,
            min_frames=2 * frames_per_block, describe_length=lambda t: f"latent_frames {t}",
            describe_size=describe_pixels, what="the calibration video")
        profile = run.call(
            lambda hooks: profile_heads(
                module, [p.to(run.device) for p in prompts], frames=latent_frames, latent_height=lh,
                latent_width=lw, seed=seed, query_samples=query_samples, frames_per_block=frames_per_block,
                steps=step_values, shift=shift, hooks=hooks, dtype=dtype, taxonomy=taxonomy,
                source=f"profiled in ComfyUI: {len(prompts)} prompt(s), {latent_frames} latent frames at "
                       f"{width}x{height}, seed {seed}"),
            model_calls=len(prompts) * model_calls(latent_frames, frames_per_block, len(step_values)))
        return _outputs(profile, profile.describe())


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
            outputs=_profile_outputs("The profile with the new labels (primary).",
                                     "Counts per type and thresholds."),
        )

    @classmethod
    def execute(cls, head_profile, taxonomy, **thresholds) -> io.NodeOutput:
        profile = classify_profile(check_profile(head_profile), taxonomy, _thresholds(taxonomy, **thresholds))
        used = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in profile.thresholds[taxonomy].items())
        return _outputs(profile, profile.describe() + f"\n{taxonomy} thresholds: {used}")


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
                *save_file_inputs("my_model_profile", "models/headforcing"),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the profile was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, head_profile, filename, overwrite=True) -> io.NodeOutput:
        head_profile = check_profile(head_profile)
        folder = profile_folders()[0]
        path = profile_path(folder, filename)  # the name policy also rules out 'preset: …' (no ':')
        rel = save_named_file(folder, path, lambda p: save_profile(head_profile, p), overwrite=overwrite,
                              kind="head profile", article="a", error=ProfileError)
        text = f"saved head profile {rel} ({path})\n" + head_profile.describe()
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
                               tooltip="A file in models/headforcing or its sub-folders (listed as 'sub/name'), or a "
                                       "'preset: …' shipped with the pack."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: check that the profile was made for this model's shape."),
            ],
            outputs=_profile_outputs("For Head Forcing Cache Policy's head_profile input, or Classify Heads.",
                                     "Shape, source, attribution and counts."),
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
                return file_fingerprint(profile_name, path)
        return profile_name

    @classmethod
    def execute(cls, profile_name, model=None) -> io.NodeOutput:
        expect = wan_backbone(model)[1] if model is not None else None
        profile = resolve_profile(profile_name, profile_folders(), expect=expect)
        return _outputs(profile, profile.describe())
